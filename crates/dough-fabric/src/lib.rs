//! dough's fabric: booting VMs from an image, the host end of each VM's
//! channel, running commands in them, and tearing them down exactly.
//!
//! Everything a VM owns on the host lives in `$DOUGH_HOME/vms/<id>/` and
//! is named from its id; its VMM is tracked by pid and start time, its
//! lifecycle by the state machine in [`state`].

pub mod accel;
pub mod channel;
pub mod gc;
pub mod notice;
pub mod pool;
pub mod serial;
pub mod snapshot;
pub mod state;
pub mod vm;
pub mod vmm;

pub use channel::{ChannelError, ExecRequest, HostChannel};
pub use snapshot::{Snapshot, SnapshotSpec, SnapshotStore};
pub use state::{VmKind, VmRecord, VmState};
pub use vm::{BootOptions, FabricError, Vm};

/// A fresh VM id: `vm-` and 8 random hex digits.
pub fn new_vm_id() -> String {
    let mut b = [0u8; 4];
    fill_random(&mut b);
    format!("vm-{:02x}{:02x}{:02x}{:02x}", b[0], b[1], b[2], b[3])
}

/// Fill `buf` from the kernel's CSPRNG.
pub fn fill_random(buf: &mut [u8]) {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(buf))
        .expect("reading /dev/urandom");
}
