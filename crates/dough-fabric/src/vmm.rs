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

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use std::os::unix::process::CommandExt;

use dough_image::Image;
use dough_net::NetPlan;
use dough_vmm::firecracker::backend::FcMachine;
use dough_vmm::firecracker::{Client as FcClient, FcError};
use dough_vmm::{
    Backend, Incoming, Memory, QemuArgs, Qmp, QmpError, Resolved, VmPaths, VmmProcess,
};

use crate::channel::{ChannelError, HostChannel, VsockListener};
use crate::serial::tail;
use crate::snapshot::SnapshotError;
use crate::state::VmState;
use crate::vm::{BootOptions, FabricError, Launch, Vm};

/// Everything a VMM needs to know to start one VM.
#[derive(Debug)]
pub(crate) struct Start<'a> {
    pub id: &'a str,
    pub opts: &'a BootOptions,
    pub image: &'a Image,
    pub plan: &'a NetPlan,
    pub launch: &'a Launch<'a>,
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
    /// returns. `exited` builds the error for a VMM that died.
    fn start(
        &self,
        s: &Start<'_>,
        process: &mut VmmProcess,
        exited: &dyn Fn(std::process::ExitStatus) -> FabricError,
    ) -> Result<(), FabricError>;

    /// Pause a baking VM (moving it to `paused`) and save it: device state
    /// to `state`, guest memory to `mem` unless the RAM already is that file.
    fn freeze(&self, vm: &Vm, state: &Path, mem: &Path) -> Result<(), SnapshotError>;

    /// Ask a running VMM to exit by itself (before it is killed).
    fn ask_to_quit(&self, paths: &VmPaths, gone: &mut dyn FnMut() -> bool);

    /// The end of what the VMM said, for error messages.
    fn log_tail(&self, paths: &VmPaths, lines: usize) -> String;

    /// The longest Unix socket path the VM will use (checked against
    /// `sun_path` before the VM directory is made).
    fn longest_socket(&self, paths: &VmPaths) -> PathBuf;

    /// `--version` of the VMM `opts` runs, as keyed in snapshots.
    fn version(&self, opts: &BootOptions) -> Result<String, SnapshotError>;

    /// The snapshot key's VMM inputs: (device set, label of the version).
    fn key_labels(&self) -> (&'static str, &'static str);
}

/// The VMM for `backend`.
pub(crate) fn vmm(backend: Backend) -> &'static dyn Vmm {
    match backend {
        Backend::Qemu => &QemuVmm,
        Backend::Firecracker => &FirecrackerVmm,
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
fn guest_cmdline(opts: &BootOptions) -> Vec<String> {
    NetPlan::guest_cmdline()
        .into_iter()
        .chain(opts.extra_cmdline.iter().cloned())
        .collect()
}

#[derive(Debug)]
pub(crate) struct QemuVmm;

/// TSC rate to give a TCG guest: the host's for a boot; a restore keeps
/// the rate its snapshot's guest calibrated with.
fn tsc_khz(accel: Resolved, launch: &Launch<'_>) -> Option<u64> {
    match launch {
        Launch::Restore(snap) => snap.meta.tsc_khz,
        Launch::Bake { tsc_khz, .. } => *tsc_khz,
        Launch::Cold if accel == Resolved::Tcg => dough_vmm::accel::host_tsc_khz(),
        Launch::Cold => None,
    }
}

/// How long saving the device state may take.
const SAVE_LIMIT: Duration = Duration::from_secs(60);

impl Vmm for QemuVmm {
    fn binary<'a>(&self, opts: &'a BootOptions) -> (&'a Path, &'static str) {
        (&opts.qemu, "is qemu-system-x86 installed?")
    }

    fn endpoint(&self, paths: &VmPaths) -> std::io::Result<Endpoint> {
        Ok(Endpoint::Connect(paths.channel.clone()))
    }

    /// QEMU writes the serial console to `serial.log` itself (chardev) and
    /// says everything else on stdout/stderr (`vmm.log`).
    fn command(&self, s: &Start<'_>) -> std::io::Result<Command> {
        let opts = s.opts;
        let log = crate::serial::private_file(&s.paths.vmm_log)?;
        // QEMU's file chardev opens this without changing its mode.
        crate::serial::private_file(&s.paths.serial)?;
        let (memory, incoming, start_paused) = match s.launch {
            Launch::Cold => (Memory::Anonymous, None, false),
            Launch::Bake { mem, .. } => (
                Memory::File {
                    path: mem.clone(),
                    shared: true,
                },
                None,
                false,
            ),
            Launch::Restore(snap) => (
                Memory::File {
                    path: snap.mem.clone(),
                    shared: false,
                },
                Some(Incoming::Defer),
                true,
            ),
        };
        let args = QemuArgs {
            accel: opts.accel,
            mem_mib: opts.mem_mib,
            cpus: opts.cpus,
            kernel: s.image.kernel.clone(),
            initrd: s.image.initrd.clone(),
            rootfs: s.image.rootfs.clone(),
            extra_cmdline: guest_cmdline(opts),
            tsc_khz: tsc_khz(opts.accel, s.launch),
            paths: s.paths.clone(),
            memory,
            incoming,
            start_paused,
            tap: Some(s.plan.tap.clone()),
        };
        let mut c = Command::new(&opts.qemu);
        c.args(args.argv())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // Its own process group: a terminal's Ctrl-C reaches dough,
            // which tears the VM down, not QEMU directly.
            .process_group(0);
        Ok(c)
    }

    fn start(
        &self,
        s: &Start<'_>,
        process: &mut VmmProcess,
        exited: &dyn Fn(std::process::ExitStatus) -> FabricError,
    ) -> Result<(), FabricError> {
        let Launch::Restore(snap) = s.launch else {
            // A boot needs nothing more: the guest is running.
            return Ok(());
        };
        let mut gone = || process.try_wait().is_some();
        let r = restore_from(&s.paths.qmp, &snap.state, s.opts.deadline, &mut gone);
        r.map_err(|source| match process.try_wait() {
            Some(st) => exited(st),
            None => FabricError::Restore {
                vm: s.id.to_string(),
                source,
                vmm_tail: self.log_tail(s.paths, 10),
            },
        })
    }

    /// Stop the vCPUs and save only the device state: with `x-ignore-shared`
    /// the RAM is not in the stream, because it already is the shared file.
    fn freeze(&self, vm: &Vm, state: &Path, _mem: &Path) -> Result<(), SnapshotError> {
        let qmp_err = |what, source| FabricError::Qmp {
            vm: vm.id.clone(),
            what,
            source,
        };
        let mut q = Qmp::connect(&vm.paths.qmp, Duration::from_secs(10))
            .map_err(|e| qmp_err("connecting to QMP", e))?;
        q.stop().map_err(|e| qmp_err("pausing", e))?;
        vm.set_state(VmState::Paused)?;
        q.ignore_shared_ram()
            .map_err(|e| qmp_err("enabling x-ignore-shared", e))?;
        q.migrate(&dough_vmm::qemu::exec_uri(state, true))
            .map_err(|e| qmp_err("saving the device state", e))?;
        q.wait_migration(SAVE_LIMIT)
            .map_err(|e| qmp_err("saving the device state", e))?;
        Ok(())
    }

    fn ask_to_quit(&self, paths: &VmPaths, gone: &mut dyn FnMut() -> bool) {
        if let Ok(mut q) = Qmp::connect(&paths.qmp, Duration::from_secs(2)) {
            let _ = q.quit();
            dough_vmm::process::wait_until(Duration::from_secs(3), gone);
        }
    }

    fn log_tail(&self, paths: &VmPaths, lines: usize) -> String {
        tail(&paths.vmm_log, lines)
    }

    fn longest_socket(&self, paths: &VmPaths) -> PathBuf {
        paths.channel.clone()
    }

    /// Migration streams are only promised to load into the same QEMU.
    fn version(&self, opts: &BootOptions) -> Result<String, SnapshotError> {
        crate::snapshot::qemu_version(&opts.qemu)
    }

    fn key_labels(&self) -> (&'static str, &'static str) {
        (dough_vmm::DEVICE_SET, "qemu")
    }
}

/// Drive a `-incoming defer -S` QEMU through restoring `state`: skip the
/// shared RAM (it is the snapshot's memory file), load the device state,
/// then run the vCPUs.
fn restore_from(
    qmp_path: &Path,
    state: &Path,
    limit: Duration,
    vmm_exited: &mut dyn FnMut() -> bool,
) -> Result<(), QmpError> {
    let start = Instant::now();
    let mut q = loop {
        match Qmp::connect(qmp_path, Duration::from_secs(5)) {
            Ok(q) => break q,
            Err(e @ QmpError::Connect { .. }) if start.elapsed() >= limit || vmm_exited() => {
                return Err(e)
            }
            Err(QmpError::Connect { .. }) => std::thread::sleep(Duration::from_millis(2)),
            Err(e) => return Err(e),
        }
    };
    q.ignore_shared_ram()?;
    q.migrate_incoming(&dough_vmm::qemu::exec_uri(state, false))?;
    q.wait_migration(limit.saturating_sub(start.elapsed()))?;
    q.cont()
}

#[derive(Debug)]
pub(crate) struct FirecrackerVmm;

/// The device set a Firecracker guest gets (virtio-mmio block, net, vsock,
/// entropy; serial console): part of its snapshots' key.
pub const FC_DEVICE_SET: &str = "fc-v1: blk(ro) net vsock entropy serial";

/// Firecracker's own log (`--log-path`), beside `vmm.log`.
fn fc_log_path(paths: &VmPaths) -> PathBuf {
    paths.dir.join("firecracker.log")
}

/// What a Firecracker guest boots with: the same kernel, initramfs and
/// read-only rootfs as under QEMU, the same command line.
fn fc_machine(image: &Image, opts: &BootOptions, tap: &str) -> FcMachine {
    let mut args: Vec<String> = dough_vmm::qemu::BASE_CMDLINE
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend(guest_cmdline(opts));
    FcMachine {
        kernel: image.kernel.clone(),
        initrd: image.initrd.clone(),
        rootfs: image.rootfs.clone(),
        mem_mib: opts.mem_mib,
        vcpus: opts.cpus,
        boot_args: args.join(" "),
        tap: Some(tap.to_string()),
        guest_mac: dough_vmm::qemu::GUEST_MAC.to_string(),
        guest_cid: 3,
    }
}

impl Vmm for FirecrackerVmm {
    fn binary<'a>(&self, opts: &'a BootOptions) -> (&'a Path, &'static str) {
        (
            &opts.firecracker.binary,
            "is Firecracker installed? point dough at it with --firecracker or DOUGH_FIRECRACKER",
        )
    }

    /// The agent connects to CID 2 as soon as it runs (and again after a
    /// restore, or whenever its connection drops): listen first.
    fn endpoint(&self, paths: &VmPaths) -> std::io::Result<Endpoint> {
        VsockListener::bind(&paths.vsock, dough_proto::VSOCK_PORT).map(Endpoint::Accept)
    }

    /// Firecracker's stdout *is* the serial console (`serial.log`); its
    /// stderr goes to `vmm.log` and its own log to `firecracker.log`.
    fn command(&self, s: &Start<'_>) -> std::io::Result<Command> {
        let log = crate::serial::private_file(&s.paths.vmm_log)?;
        let fc_log = fc_log_path(s.paths);
        crate::serial::private_file(&fc_log)?;
        let mut c = s.opts.firecracker.command(&s.paths.api);
        c.arg("--log-path")
            .arg(&fc_log)
            .stdout(crate::serial::private_file(&s.paths.serial)?)
            .stderr(log);
        Ok(c)
    }

    /// Its API first, then configure + `InstanceStart`, or load the
    /// snapshot with this clone's TAP and vsock socket and resume.
    fn start(
        &self,
        s: &Start<'_>,
        process: &mut VmmProcess,
        exited: &dyn Fn(std::process::ExitStatus) -> FabricError,
    ) -> Result<(), FabricError> {
        let r = FcClient::wait(&s.paths.api, s.opts.firecracker.start_limit, &mut || {
            process.try_wait().map(|st| st.to_string())
        })
        .and_then(|c| match s.launch {
            Launch::Restore(snap) => {
                c.load_and_resume(&snap.state, &snap.mem, Some(&s.plan.tap), &s.paths.vsock)
            }
            Launch::Cold | Launch::Bake { .. } => {
                c.configure_and_start(&fc_machine(s.image, s.opts, &s.plan.tap), &s.paths.vsock)
            }
        });
        r.map_err(|source| {
            // Firecracker's own refusal says more than its exit.
            let refused = matches!(source, FcError::Refused { .. });
            match process.try_wait() {
                Some(st) if !refused => exited(st),
                _ => FabricError::Firecracker {
                    vm: s.id.to_string(),
                    what: match s.launch {
                        Launch::Restore(_) => "loading the snapshot",
                        _ => "configuring and starting the guest",
                    },
                    source: Box::new(source),
                    vmm_tail: self.log_tail(s.paths, 10),
                },
            }
        })
    }

    /// `PATCH /vm Paused`, then a Full snapshot: device state and memory.
    fn freeze(&self, vm: &Vm, state: &Path, mem: &Path) -> Result<(), SnapshotError> {
        let fc = FcClient {
            socket: vm.paths.api.clone(),
        };
        let fc_err = |what, source| SnapshotError::Firecracker {
            vm: vm.id.clone(),
            what,
            source: Box::new(source),
        };
        fc.pause().map_err(|e| fc_err("pausing", e))?;
        vm.set_state(VmState::Paused)?;
        fc.snapshot_full(state, mem)
            .map_err(|e| fc_err("writing the Full snapshot", e))?;
        for f in [state, mem] {
            if !f.is_file() {
                return Err(std::io::Error::other(format!(
                    "Firecracker reported a snapshot but wrote no {}",
                    f.display()
                ))
                .into());
            }
        }
        Ok(())
    }

    /// Firecracker has no polite exit for a guest that ignores
    /// Ctrl-Alt-Del; it is killed by verified pid.
    fn ask_to_quit(&self, _paths: &VmPaths, _gone: &mut dyn FnMut() -> bool) {}

    fn log_tail(&self, paths: &VmPaths, lines: usize) -> String {
        format!(
            "{}\n{}",
            tail(&fc_log_path(paths), lines),
            tail(&paths.vmm_log, lines)
        )
    }

    /// The guest-initiated vsock socket, `vsock.sock_1024`.
    fn longest_socket(&self, paths: &VmPaths) -> PathBuf {
        crate::channel::vsock_listen_path(&paths.vsock, dough_proto::VSOCK_PORT)
    }

    /// Its arguments (`--enable-pci`) change the guest's devices.
    fn version(&self, opts: &BootOptions) -> Result<String, SnapshotError> {
        dough_vmm::firecracker::backend::version(&opts.firecracker.binary)
            .map(|v| {
                std::iter::once(v)
                    .chain(opts.firecracker.extra_args.iter().cloned())
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .map_err(|e| SnapshotError::FirecrackerVersion(Box::new(e)))
    }

    fn key_labels(&self) -> (&'static str, &'static str) {
        (FC_DEVICE_SET, "firecracker")
    }
}
