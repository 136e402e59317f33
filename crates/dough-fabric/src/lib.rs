//! dough's fabric: booting VMs from an image, the host end of each VM's
//! channel, running commands in them, and tearing them down exactly.
//!
//! Everything a VM owns on the host lives in `$DOUGH_HOME/vms/<id>/` and
//! is named from its id; its VMM is tracked by pid and start time, its
//! lifecycle by the state machine in [`state`].

pub mod accel;
pub mod backend;
pub mod builder;
pub mod cgroup;
pub mod channel;
pub mod disk;
pub mod gc;
pub mod host;
pub mod live;
pub mod notice;
pub mod options;
pub mod pool;
pub mod reaper;
pub mod serial;
pub mod snapshot;
pub mod state;
pub mod vm;

pub use channel::{ChannelError, ExecRequest, HostChannel, Signaller};
pub use host::{fill_random, new_vm_id};
pub use options::BootOptions;
pub use snapshot::{Snapshot, SnapshotSpec, SnapshotStore};
pub use state::{VmKind, VmRecord, VmState};
pub use vm::{FabricError, Vm};
