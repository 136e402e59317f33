//! VMM backends for dough.
//!
//! Today one backend: QEMU's `microvm` machine, driven by a typed argv
//! builder ([`qemu::QemuArgs`]) and a QMP client ([`qmp::Qmp`]). Processes
//! are tracked by pid *and* start time ([`process::ProcessId`]) so that a
//! recycled pid is never mistaken for our VMM.

pub mod accel;
pub mod firecracker;
pub mod process;
pub mod qemu;
pub mod qmp;

pub use accel::{Accel, Resolved};
pub use process::{ProcessError, ProcessId, VmmProcess};
pub use qemu::{Incoming, Memory, QemuArgs, VmPaths, DEVICE_SET};
pub use qmp::{Qmp, QmpError};
