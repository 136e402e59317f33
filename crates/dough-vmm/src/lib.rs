//! VMM backends for dough.
//!
//! Two backends ([`Backend`]): QEMU's `microvm` machine, driven by a typed
//! argv builder ([`qemu::QemuArgs`]) and a QMP client ([`qmp::Qmp`]); and
//! Firecracker, driven over its REST API ([`firecracker`]). Processes are
//! tracked by pid *and* start time ([`process::ProcessId`]) so that a
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

/// Which VMM runs a VM.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// QEMU `microvm`: KVM or TCG; the guest channel is virtio-serial.
    #[default]
    Qemu,
    /// Firecracker: KVM only; the guest channel is vsock.
    Firecracker,
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Backend::Qemu => "qemu",
            Backend::Firecracker => "firecracker",
        })
    }
}
