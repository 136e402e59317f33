//! The VMM behind a VM (the bottom of the fabric's VM stack: it knows
//! nothing of `Vm`, snapshots or the record store above it; it speaks its
//! own [`BackendError`] and plain file paths).
//!
//! The VMM behind a VM. Everything around it is shared by both backends —
//! the VM directory and state machine, the netns the VMM is spawned in,
//! pid + start-time identity, the sweep, `down` — and what differs is
//! behind [`Vmm`]: how the VMM is started and brings the guest up, how a
//! bake freezes it, where the host reaches the agent, how to ask it to
//! quit, and what goes into a snapshot's key.
//!
//! [`QemuVmm`]: QEMU microvm; argv, QMP, the virtio-serial port's socket.
//! [`FirecrackerVmm`]: Firecracker's REST API; the agent connects over vsock
//! to a socket the host binds before the guest runs.

mod firecracker;
mod qemu;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use dough_image::Image;
use dough_net::NetPlan;
use dough_vmm::firecracker::FcError;
use dough_vmm::{Backend, QmpError, VmPaths, VmmProcess};

use crate::channel::{ChannelError, HostChannel, VsockListener};
use crate::options::BootOptions;

pub use firecracker::FC_DEVICE_SET;

/// What a backend could not do. A VMM that exits while it works is
/// [`BackendError::Exited`]: the VM layer reports it with the logs.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("the VMM exited ({0})")]
    Exited(std::process::ExitStatus),
    #[error("restoring the snapshot failed; QEMU said:\n{vmm_tail}")]
    QemuRestore {
        #[source]
        source: QmpError,
        vmm_tail: String,
    },
    #[error("{what} over QMP failed")]
    Qmp {
        what: &'static str,
        #[source]
        source: QmpError,
    },
    #[error("{what}; Firecracker said:\n{vmm_tail}")]
    Firecracker {
        what: &'static str,
        #[source]
        source: Box<FcError>,
        vmm_tail: String,
    },
    #[error("{what} failed")]
    FirecrackerApi {
        what: &'static str,
        #[source]
        source: Box<FcError>,
    },
    #[error("Firecracker reported a snapshot but wrote no {0}")]
    NoSnapshotFile(PathBuf),
    #[error("{0}")]
    Unsupported(&'static str),
    #[error("cannot run {binary} --version")]
    Version {
        binary: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// A snapshot to restore, as files.
#[derive(Debug, Clone)]
pub struct RestoreFrom {
    /// The snapshot's key (recorded with the VM).
    pub key: String,
    /// Device state.
    pub state: PathBuf,
    /// Guest memory, mapped privately.
    pub mem: PathBuf,
    /// The TSC rate its guest calibrated with (QEMU under TCG).
    pub tsc_khz: Option<u64>,
    /// The guest's RAM is in the `state` stream, not in `mem` (a live
    /// clone saved whole): it is loaded into memory of the VM's own.
    pub ram_in_state: bool,
    /// With `ram_in_state`: load the RAM into this new file, shared (the
    /// VM's RAM is then that file, as a bake's is), not anonymous memory.
    pub into_mem: Option<PathBuf>,
}

/// How a VM comes up.
#[derive(Debug, Clone)]
pub enum Launch {
    /// Boot the image; RAM is anonymous.
    Cold,
    /// Boot the image with RAM in the shared file `mem`, to be snapshotted
    /// (the TSC rate is recorded with the snapshot).
    Bake { mem: PathBuf, tsc_khz: Option<u64> },
    /// Restore a snapshot: RAM mapped privately from its memory file.
    Restore(RestoreFrom),
}

/// Everything a VMM needs to know to start one VM.
#[derive(Debug)]
pub(crate) struct Start<'a> {
    pub opts: &'a BootOptions,
    pub image: &'a Image,
    pub plan: &'a NetPlan,
    pub launch: &'a Launch,
    pub paths: &'a VmPaths,
}

/// Where the host reaches a VM's agent.
#[derive(Debug)]
pub(crate) enum Endpoint {
    /// Connect to the VMM's socket for the agent's port (QEMU).
    Connect(PathBuf),
    /// Accept the agent's own connection (Firecracker's hybrid vsock).
    Accept(VsockListener),
}

impl Endpoint {
    pub(crate) fn open(
        self,
        limit: Duration,
        vmm_gone: &mut dyn FnMut() -> bool,
    ) -> Result<HostChannel, ChannelError> {
        match self {
            Endpoint::Connect(path) => HostChannel::connect(&path, limit),
            Endpoint::Accept(l) => l.accept(limit, vmm_gone),
        }
    }
}

/// Where a live save may write.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LiveFiles<'a> {
    /// One stream: the device state with the RAM in it.
    pub whole: &'a Path,
    /// Device state, as a bake saves it.
    pub state: &'a Path,
    /// Guest memory, as a bake saves it.
    pub mem: &'a Path,
}

/// What a live save wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LiveSaved {
    /// `whole` (QEMU's migration stream): it is made into a snapshot by
    /// restoring it into a VM whose RAM is a shared file ("rebake").
    Whole,
    /// `state` + `mem`, a snapshot as a bake's is (Firecracker's Full
    /// snapshot writes all guest memory to its own file).
    StateAndMem,
}

/// What differs between VMMs.
pub(crate) trait Vmm: Sync {
    /// The binary `opts` runs, and what to tell a user who lacks it.
    fn binary<'a>(&self, opts: &'a BootOptions) -> (&'a Path, &'static str);

    /// Where the host will reach the agent, made ready before the VMM is
    /// spawned (a guest may connect as soon as it runs).
    fn endpoint(&self, paths: &VmPaths) -> std::io::Result<Endpoint>;

    /// The VMM's command, its output wired to the VM's files.
    fn command(&self, s: &Start<'_>) -> std::io::Result<Command>;

    /// Once the VMM is spawned and recorded: bring the guest up. A boot
    /// then waits for the ready line; a restore is running when this
    /// returns.
    fn start(&self, s: &Start<'_>, process: &mut VmmProcess) -> Result<(), BackendError>;

    /// Stop a VM's vCPUs (a bake before its snapshot, `dough pause`).
    fn pause(&self, paths: &VmPaths) -> Result<(), BackendError>;

    /// Let a paused VM's vCPUs run again.
    fn resume(&self, paths: &VmPaths) -> Result<(), BackendError>;

    /// Save a paused VM: device state to `state`, guest memory to `mem`
    /// unless the RAM already is that file.
    fn save(&self, paths: &VmPaths, state: &Path, mem: &Path) -> Result<(), BackendError>;

    /// Save a paused live VM whole (device state and RAM) into `to`; it
    /// stays paused. A clone's RAM is a private mapping of its snapshot's
    /// file, which a device-state-only save cannot describe. Says which
    /// of `to`'s files it wrote.
    fn save_live(&self, paths: &VmPaths, to: &LiveFiles<'_>) -> Result<LiveSaved, BackendError>;

    /// Ask a running VMM to exit by itself (before it is killed).
    fn ask_to_quit(&self, paths: &VmPaths, gone: &mut dyn FnMut() -> bool);

    /// The end of what the VMM said, for error messages.
    fn log_tail(&self, paths: &VmPaths, lines: usize) -> String;

    /// The longest Unix socket path the VM will use (checked against
    /// `sun_path` before the VM directory is made).
    fn longest_socket(&self, paths: &VmPaths) -> PathBuf;

    /// `--version` of the VMM `opts` runs, as keyed in snapshots.
    fn version(&self, opts: &BootOptions) -> Result<String, BackendError>;

    /// The snapshot key's VMM inputs: (device set, label of the version).
    fn key_labels(&self) -> (&'static str, &'static str);
}

/// The VMM for `backend`.
pub(crate) fn vmm(backend: Backend) -> &'static dyn Vmm {
    match backend {
        Backend::Qemu => &qemu::QemuVmm,
        Backend::Firecracker => &firecracker::FirecrackerVmm,
    }
}

/// A new connection to a running VM's agent (exec on a detached clone,
/// reconnect): see [`Vmm::endpoint`].
pub(crate) fn open_channel(
    paths: &VmPaths,
    backend: Backend,
    limit: Duration,
    vmm_gone: &mut dyn FnMut() -> bool,
) -> Result<HostChannel, ChannelError> {
    vmm(backend).endpoint(paths)?.open(limit, vmm_gone)
}

/// The guest's kernel command line beyond the VMM's fixed part: its
/// network and the user's extra arguments.
/// Tells the agent to make the (writable) root device its root, no overlay.
pub const ROOT_RW_CMDLINE: &str = "dough.rootrw=1";
/// Tells the agent its writable layer is the scratch disk.
pub const SCRATCH_CMDLINE: &str = "dough.scratch=1";

pub(crate) fn guest_cmdline(opts: &BootOptions) -> Vec<String> {
    let rw = opts.root_rw.then(|| ROOT_RW_CMDLINE.to_string());
    let scratch = opts.scratch.is_some().then(|| SCRATCH_CMDLINE.to_string());
    NetPlan::guest_cmdline()
        .into_iter()
        .chain(rw)
        .chain(scratch)
        .chain(opts.extra_cmdline.iter().cloned())
        .collect()
}
