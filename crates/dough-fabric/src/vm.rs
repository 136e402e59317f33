//! One VM: boot from an image, wait for the agent, handshake, run
//! commands, tear down exactly.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use std::os::unix::process::CommandExt;

use dough_image::Image;
use dough_net::linux::LinuxNet;
use dough_proto::{ExitStatus, Hello, Stream, READY_LINE};
use dough_vmm::firecracker::backend::{FcConfig, FcMachine};
use dough_vmm::firecracker::{Client as FcClient, FcError};
use dough_vmm::process::wait_until;
use dough_vmm::{
    Backend, Incoming, Memory, QemuArgs, Qmp, QmpError, Resolved, VmPaths, VmmProcess,
};

use crate::channel::{ChannelError, ExecRequest, HostChannel, VsockListener};
use crate::serial::{tail, SerialWatch};
use crate::snapshot::Snapshot;
use crate::state::{StateError, VmDir, VmKind, VmRecord, VmState};
use dough_net::{Egress, Ipv4Net, NetPlan};

/// Lines of serial console shown in boot errors.
const TAIL_LINES: usize = 25;

#[derive(Debug, thiserror::Error)]
pub enum FabricError {
    #[error(
        "VM {vm} did not print its ready line within {secs}s (accel {accel}); last serial console lines:\n{serial_tail}"
    )]
    BootTimeout {
        vm: String,
        secs: u64,
        accel: Resolved,
        serial_tail: String,
    },
    #[error("{backend} for VM {vm} exited during boot ({status}); it said:\n{vmm_tail}\nlast serial console lines:\n{serial_tail}")]
    VmmExited {
        backend: Backend,
        vm: String,
        status: String,
        vmm_tail: String,
        serial_tail: String,
    },
    #[error("cannot start {vmm}; {hint} (`dough doctor`)")]
    Spawn {
        vmm: String,
        hint: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("VM {vm}: {what}; Firecracker said:\n{vmm_tail}")]
    Firecracker {
        vm: String,
        what: &'static str,
        #[source]
        source: Box<FcError>,
        vmm_tail: String,
    },
    #[error("snapshot {key} was baked for {snapshot}, not {wanted}")]
    WrongBackend {
        key: String,
        snapshot: Backend,
        wanted: Backend,
    },
    #[error("VM {vm}: channel handshake failed; last serial console lines:\n{serial_tail}")]
    Handshake {
        vm: String,
        #[source]
        source: ChannelError,
        serial_tail: String,
    },
    #[error("VM {vm}: restoring the snapshot failed; QEMU said:\n{vmm_tail}")]
    Restore {
        vm: String,
        #[source]
        source: QmpError,
        vmm_tail: String,
    },
    #[error("VM {vm}: {what}")]
    Qmp {
        vm: String,
        what: &'static str,
        #[source]
        source: QmpError,
    },
    #[error("VM {id} is dead: {reason} (`dough logs {id}` shows its console, `dough down {id}` removes it)")]
    Dead { id: String, reason: String },
    #[error("VM {id} is {state}, not ready")]
    NotReady { id: String, state: VmState },
    #[error(transparent)]
    State(#[from] StateError),
    #[error("VM {vm}: network")]
    Net {
        vm: String,
        #[source]
        source: NetSetupError,
    },
    #[error("VM {vm}: {source}; last serial console lines:\n{serial_tail}")]
    Channel {
        vm: String,
        #[source]
        source: ChannelError,
        serial_tail: String,
    },
    #[error("VM state directory {path}")]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("tearing down VM {vm}")]
    Teardown {
        vm: String,
        #[source]
        source: dough_vmm::ProcessError,
    },
}

/// Why a VM's network could not be planned or built.
#[derive(Debug, thiserror::Error)]
pub enum NetSetupError {
    #[error(transparent)]
    Plan(#[from] dough_net::PlanError),
    #[error("{0} (network namespaces, TAPs and nftables need root; see `dough doctor`)")]
    Ops(#[from] dough_net::NetError),
}

impl FabricError {
    /// Errors a retry cannot fix (QEMU missing, state directory unusable).
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            FabricError::Spawn { .. }
                | FabricError::WrongBackend { .. }
                | FabricError::State(_)
                | FabricError::StateDir { .. }
                | FabricError::Net { .. }
        )
    }
}

/// How to boot.
#[derive(Debug, Clone)]
pub struct BootOptions {
    /// Which VMM boots and bakes (a restore uses its snapshot's).
    pub backend: Backend,
    pub qemu: PathBuf,
    /// The Firecracker binary and its arguments (`--backend firecracker`).
    pub firecracker: FcConfig,
    pub accel: Resolved,
    pub mem_mib: u32,
    pub cpus: u32,
    /// Deadline for one boot attempt (QEMU start → ready line → handshake).
    pub deadline: Duration,
    /// Attempts after the first one failed.
    pub retries: u32,
    pub extra_cmdline: Vec<String>,
    /// What the VM's network may reach (bakes always get `none`).
    pub egress: Egress,
    /// Transfer subnets for clones' veths are taken from here.
    pub net_pool: Ipv4Net,
}

impl Default for BootOptions {
    fn default() -> Self {
        BootOptions {
            backend: Backend::Qemu,
            qemu: "qemu-system-x86_64".into(),
            firecracker: FcConfig::default(),
            accel: Resolved::Tcg,
            mem_mib: 256,
            cpus: 1,
            deadline: Duration::from_secs(60),
            retries: 1,
            extra_cmdline: Vec::new(),
            egress: Egress::Nat,
            net_pool: dough_net::plan::DEFAULT_POOL.parse().expect("valid pool"),
        }
    }
}

/// How a VM comes up.
#[derive(Debug, Clone)]
pub(crate) enum Launch<'a> {
    /// Boot the image; RAM is anonymous.
    Cold,
    /// Boot the image with RAM in the shared file `mem`, to be snapshotted
    /// (the TSC rate is recorded with the snapshot).
    Bake { mem: PathBuf, tsc_khz: Option<u64> },
    /// Restore a snapshot: RAM mapped privately from its memory file.
    Restore(&'a Snapshot),
}

/// A running VM whose agent has said hello.
#[derive(Debug)]
pub struct Vm {
    pub id: String,
    pub kind: VmKind,
    pub backend: Backend,
    pub paths: VmPaths,
    pub accel: Resolved,
    pub hello: Hello,
    /// Time from spawning QEMU to the finished handshake.
    pub boot_time: Duration,
    dir: VmDir,
    /// Kept here as well as in the record: teardown must not depend on
    /// the directory still being readable.
    net: NetPlan,
    process: VmmProcess,
    /// Firecracker's API (None under QEMU).
    fc: Option<FcClient>,
    channel: HostChannel,
    torn_down: bool,
}

impl Vm {
    /// Boot a VM from `image` (no snapshot), retrying a failed boot
    /// `opts.retries` times. It lives as long as this process.
    pub fn boot(vms_dir: &Path, image: &Image, opts: &BootOptions) -> Result<Vm, FabricError> {
        Self::with_retries(opts, || {
            Self::launch(vms_dir, image, opts, VmKind::Run, Launch::Cold)
        })
    }

    /// Restore a clone of `snap`. The snapshot fixes the image, memory,
    /// vCPUs, accelerator and kernel command line; `opts` gives the QEMU
    /// binary, deadline and retries. A `Clone` outlives this process once
    /// [`Vm::detach`]ed; a `Run` does not.
    pub fn restore(
        vms_dir: &Path,
        snap: &Snapshot,
        kind: VmKind,
        opts: &BootOptions,
    ) -> Result<Vm, FabricError> {
        if snap.meta.backend != opts.backend {
            return Err(FabricError::WrongBackend {
                key: snap.key.clone(),
                snapshot: snap.meta.backend,
                wanted: opts.backend,
            });
        }
        let opts = BootOptions {
            accel: snap.meta.accel,
            mem_mib: snap.meta.mem_mib,
            cpus: snap.meta.cpus,
            extra_cmdline: snap.meta.extra_cmdline.clone(),
            ..opts.clone()
        };
        Self::with_retries(&opts, || {
            Self::launch(
                vms_dir,
                &snap.meta.image,
                &opts,
                kind,
                Launch::Restore(snap),
            )
        })
    }

    fn with_retries(
        opts: &BootOptions,
        mut once: impl FnMut() -> Result<Vm, FabricError>,
    ) -> Result<Vm, FabricError> {
        let mut attempt = 0;
        loop {
            match once() {
                Ok(vm) => return Ok(vm),
                Err(e) if attempt < opts.retries && !e.is_permanent() => {
                    attempt += 1;
                    tracing::warn!("start failed, retrying ({attempt}/{}): {e}", opts.retries);
                    eprintln!("dough: VM start attempt {attempt} failed; retrying once more");
                }
                Err(e) => return Err(e),
            }
        }
    }

    pub(crate) fn launch(
        vms_dir: &Path,
        image: &Image,
        opts: &BootOptions,
        kind: VmKind,
        launch: Launch<'_>,
    ) -> Result<Vm, FabricError> {
        let id = crate::new_vm_id();
        let mut rec = VmRecord::new(&id, kind, opts.accel, opts.mem_mib, opts.cpus);
        rec.image = image.id.clone();
        rec.backend = opts.backend;
        if let Launch::Restore(snap) = &launch {
            rec.snapshot = Some(snap.key.clone());
        }
        // A bake must reach nothing; its NIC exists only so that clones
        // restored from it have one.
        let egress = match launch {
            Launch::Bake { .. } => Egress::None,
            _ => opts.egress.clone(),
        };
        let net_err = |source: NetSetupError| FabricError::Net {
            vm: id.clone(),
            source,
        };
        // Planning, recording and building a network claim names and
        // subnets on the host: one dough (of any home) at a time.
        let _net = net_lock()?;
        let (dir, plan) = {
            let mut used = dough_net::in_use_on_host(&mut LinuxNet::default())
                .map_err(|e| net_err(e.into()))?;
            for r in crate::state::list(vms_dir) {
                if let Some(p) = &r.net {
                    used.add(p);
                }
            }
            let plan = NetPlan::new(&net_scope(vms_dir), &id, egress, opts.net_pool, 0, &used)
                .map_err(|e| net_err(e.into()))?;
            rec.net = Some(plan.clone());
            let dir = VmDir::create(vms_dir, &rec)?;
            // Now that the directory exists, its canonical path is known.
            register_scope(vms_dir);
            (dir, plan)
        };
        let paths = dir.paths.clone();
        if let Err(e) = setup_net(&plan, opts.net_pool) {
            let _ = std::fs::remove_dir_all(&paths.dir);
            return Err(net_err(e.into()));
        }
        drop(_net);
        let state_err = |source| FabricError::StateDir {
            path: paths.dir.clone(),
            source,
        };
        let remove = || {
            if let Err(e) = dough_net::teardown(&mut LinuxNet::default(), &plan) {
                tracing::warn!(vm = %id, "network teardown: {e}");
            }
            let _ = std::fs::remove_dir_all(&paths.dir);
        };
        // Under Firecracker the agent connects to us over vsock as soon as
        // it runs: listen before it can.
        let listener = match opts.backend {
            Backend::Qemu => None,
            Backend::Firecracker => {
                match VsockListener::bind(&paths.vsock, dough_proto::VSOCK_PORT) {
                    Ok(l) => Some(l),
                    Err(e) => {
                        remove();
                        return Err(state_err(e));
                    }
                }
            }
        };
        let mut cmd = match vmm_command(opts, image, &plan, &launch, &paths) {
            Ok(c) => c,
            Err(e) => {
                remove();
                return Err(state_err(e));
            }
        };
        let start = Instant::now();
        tracing::info!(vm = %id, accel = %opts.accel, backend = %opts.backend, "spawning the VMM");
        // No teardown on a signal may run between the spawn and the record.
        let spawning = crate::gc::SPAWNING.read();
        // Spawned from a thread inside the clone's netns, the VMM lives
        // there and opens the TAP there.
        let spawned = dough_net::linux::in_netns(Some(&plan.netns), || Ok(cmd.spawn()));
        let child = match spawned {
            Ok(Ok(c)) => c,
            Ok(Err(source)) => {
                remove();
                let (vmm, hint) = match opts.backend {
                    Backend::Qemu => (&opts.qemu, "is qemu-system-x86 installed?"),
                    Backend::Firecracker => (
                        &opts.firecracker.binary,
                        "is Firecracker installed? point dough at it with --firecracker or DOUGH_FIRECRACKER",
                    ),
                };
                return Err(FabricError::Spawn {
                    vmm: vmm.display().to_string(),
                    hint,
                    source,
                });
            }
            Err(e) => {
                remove();
                return Err(net_err(e.into()));
            }
        };
        let mut process = VmmProcess::from_child(child);
        let vmm = process.id;
        let recorded = dir.update(|r| {
            r.vmm = Some(vmm);
            r.transition(VmState::Starting)
        });
        drop(spawning);
        if let Err(e) = recorded {
            let _ = process.kill_and_wait(Duration::from_secs(10));
            remove();
            return Err(e.into());
        }

        let fail = |process: &mut VmmProcess, e: FabricError| {
            let _ = process.kill_and_wait(Duration::from_secs(10));
            remove();
            e
        };
        let exited = |st: std::process::ExitStatus| FabricError::VmmExited {
            backend: opts.backend,
            vm: id.clone(),
            status: st.to_string(),
            vmm_tail: vmm_tail(&paths, opts.backend, 10),
            serial_tail: tail(&paths.serial, TAIL_LINES),
        };
        let left = |start: Instant| {
            opts.deadline
                .saturating_sub(start.elapsed())
                .max(Duration::from_secs(5))
        };

        // Firecracker: its API first, then configure + start, or load.
        let mut fc = None;
        if opts.backend == Backend::Firecracker {
            let r = FcClient::wait(&paths.api, opts.firecracker.start_limit, &mut || {
                process.try_wait().map(|st| st.to_string())
            })
            .and_then(|c| {
                match &launch {
                    Launch::Restore(snap) => {
                        c.load_and_resume(&snap.state, &snap.mem, Some(&plan.tap), &paths.vsock)?
                    }
                    Launch::Cold | Launch::Bake { .. } => {
                        c.configure_and_start(&fc_machine(image, opts, &plan.tap), &paths.vsock)?
                    }
                }
                Ok(c)
            });
            match r {
                Ok(c) => fc = Some(c),
                Err(source) => {
                    // Firecracker's own refusal says more than its exit.
                    let refused = matches!(source, FcError::Refused { .. });
                    let e = match process.try_wait() {
                        Some(st) if !refused => exited(st),
                        _ => FabricError::Firecracker {
                            vm: id.clone(),
                            what: match launch {
                                Launch::Restore(_) => "loading the snapshot",
                                _ => "configuring and starting the guest",
                            },
                            source: Box::new(source),
                            vmm_tail: vmm_tail(&paths, opts.backend, 10),
                        },
                    };
                    return Err(fail(&mut process, e));
                }
            }
        }

        match (&launch, opts.backend) {
            (Launch::Cold | Launch::Bake { .. }, _) => {
                let mut watch = SerialWatch::new(&paths.serial);
                let mut status = None;
                let ready = wait_until(opts.deadline, || {
                    if let Some(st) = process.try_wait() {
                        status = Some(st);
                        return true;
                    }
                    watch.saw(READY_LINE)
                });
                if let Some(st) = status {
                    let e = exited(st);
                    return Err(fail(&mut process, e));
                }
                if !ready {
                    let e = FabricError::BootTimeout {
                        vm: id.clone(),
                        secs: opts.deadline.as_secs(),
                        accel: opts.accel,
                        serial_tail: tail(&paths.serial, TAIL_LINES),
                    };
                    return Err(fail(&mut process, e));
                }
            }
            (Launch::Restore(snap), Backend::Qemu) => {
                let mut gone = || process.try_wait().is_some();
                if let Err(source) = restore_from(&paths.qmp, &snap.state, opts.deadline, &mut gone)
                {
                    let e = match process.try_wait() {
                        Some(st) => exited(st),
                        None => FabricError::Restore {
                            vm: id.clone(),
                            source,
                            vmm_tail: vmm_tail(&paths, opts.backend, 10),
                        },
                    };
                    return Err(fail(&mut process, e));
                }
            }
            // Loaded and resumed above.
            (Launch::Restore(_), Backend::Firecracker) => {}
        }
        let limit = left(start);
        let connected = match listener {
            None => HostChannel::connect(&paths.channel, limit),
            Some(l) => l.accept(limit, &mut || process.try_wait().is_some()),
        };
        let handshake = connected.and_then(|mut ch| {
            let hello = ch.handshake(&id, limit)?;
            Ok((ch, hello))
        });
        let (channel, hello) = match handshake {
            Ok(x) => x,
            Err(source) => {
                let e = match process.try_wait() {
                    Some(st) => exited(st),
                    None => FabricError::Handshake {
                        vm: id.clone(),
                        source,
                        serial_tail: tail(&paths.serial, TAIL_LINES),
                    },
                };
                return Err(fail(&mut process, e));
            }
        };
        if let Err(e) = dir.set_state(VmState::Ready) {
            return Err(fail(&mut process, e.into()));
        }
        let boot_time = start.elapsed();
        tracing::info!(vm = %id, ?boot_time, boot_id = %hello.boot_id, "agent ready");
        Ok(Vm {
            id,
            kind,
            backend: opts.backend,
            paths,
            accel: opts.accel,
            hello,
            boot_time,
            dir,
            net: plan,
            process,
            fc,
            channel,
            torn_down: false,
        })
    }

    /// Run a command in the VM, streaming its output to `sink`.
    pub fn exec(
        &mut self,
        req: &ExecRequest,
        sink: &mut dyn FnMut(Stream, &[u8]),
    ) -> Result<ExitStatus, FabricError> {
        self.channel
            .exec(req, sink)
            .map_err(|source| FabricError::Channel {
                vm: self.id.clone(),
                source,
                serial_tail: tail(&self.paths.serial, TAIL_LINES),
            })
    }

    /// Close the channel and open a new connection with a fresh handshake.
    /// The agent sees the host leave and come back, as after a restore.
    pub fn reconnect(&mut self, limit: Duration) -> Result<Hello, FabricError> {
        self.channel.shutdown();
        let process = &mut self.process;
        let r = open_channel(&self.paths, self.backend, limit, &mut || {
            process.try_wait().is_some()
        })
        .and_then(|mut ch| {
            let hello = ch.handshake(&self.id, limit)?;
            Ok((ch, hello))
        });
        match r {
            Ok((ch, hello)) => {
                self.channel = ch;
                self.hello = hello.clone();
                Ok(hello)
            }
            Err(source) => Err(FabricError::Handshake {
                vm: self.id.clone(),
                source,
                serial_tail: tail(&self.paths.serial, TAIL_LINES),
            }),
        }
    }

    /// Peak resident set of the VMM process so far (`VmHWM`), in KiB.
    pub fn vmm_peak_rss_kib(&self) -> Option<u64> {
        dough_vmm::process::peak_rss_kib(self.process.id.pid)
    }

    pub fn pid(&self) -> i32 {
        self.process.id.pid
    }

    /// Firecracker's API of this VM (None under QEMU).
    pub(crate) fn fc(&self) -> Option<&FcClient> {
        self.fc.as_ref()
    }

    /// A QMP connection to this VM's VMM.
    pub(crate) fn qmp(&self) -> Result<Qmp, FabricError> {
        Qmp::connect(&self.paths.qmp, Duration::from_secs(10)).map_err(|source| FabricError::Qmp {
            vm: self.id.clone(),
            what: "connecting to QMP",
            source,
        })
    }

    pub(crate) fn set_state(&self, to: VmState) -> Result<(), FabricError> {
        Ok(self.dir.set_state(to)?)
    }

    /// Close the channel (the agent goes back to waiting for a host).
    pub(crate) fn close_channel(&self) {
        self.channel.shutdown();
    }

    /// Hand the VM over to `$DOUGH_HOME`: it keeps running after this
    /// process exits, until `dough down`. The channel is closed first.
    pub fn detach(mut self) -> Result<String, FabricError> {
        self.channel.shutdown();
        self.dir.update(|r| {
            r.owner = None;
            r.kind = VmKind::Clone;
            Ok(())
        })?;
        self.torn_down = true;
        Ok(self.id.clone())
    }

    /// Stop the VMM (QMP `quit`, then SIGKILL by verified pid) and remove
    /// everything the VM had on the host.
    pub fn destroy(mut self) -> Result<(), FabricError> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<(), FabricError> {
        if self.torn_down {
            return Ok(());
        }
        self.torn_down = true;
        self.channel.shutdown();
        // Someone may have run `dough down` on it already; that is fine.
        let _ = self.dir.set_state(VmState::Stopping);
        if self.backend == Backend::Qemu && self.process.try_wait().is_none() {
            if let Ok(mut q) = Qmp::connect(&self.paths.qmp, Duration::from_secs(2)) {
                let _ = q.quit();
                wait_until(Duration::from_secs(2), || self.process.try_wait().is_some());
            }
        }
        let r = self
            .process
            .kill_and_wait(Duration::from_secs(10))
            .map_err(|source| FabricError::Teardown {
                vm: self.id.clone(),
                source,
            });
        if let Err(e) = dough_net::teardown(&mut LinuxNet::default(), &self.net) {
            tracing::warn!(vm = %self.id, "network teardown: {e}");
        }
        let _ = std::fs::remove_dir_all(&self.paths.dir);
        r
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            tracing::error!("{e}");
        }
    }
}

/// The VMM's command, its output wired to the VM's files. QEMU writes the
/// serial console to `serial.log` itself (chardev) and says everything else
/// on stdout/stderr (`vmm.log`); Firecracker's stdout *is* the serial
/// console, its stderr goes to `vmm.log` and its own log to
/// `firecracker.log`.
fn vmm_command(
    opts: &BootOptions,
    image: &Image,
    plan: &NetPlan,
    launch: &Launch<'_>,
    paths: &VmPaths,
) -> std::io::Result<Command> {
    let log = std::fs::File::create(&paths.vmm_log)?;
    let mut cmd = match opts.backend {
        Backend::Qemu => {
            let (memory, incoming, start_paused) = match launch {
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
                kernel: image.kernel.clone(),
                initrd: image.initrd.clone(),
                rootfs: image.rootfs.clone(),
                extra_cmdline: guest_cmdline(opts),
                tsc_khz: tsc_khz(opts.accel, launch),
                paths: paths.clone(),
                memory,
                incoming,
                start_paused,
                tap: Some(plan.tap.clone()),
            };
            let mut c = Command::new(&opts.qemu);
            c.args(args.argv())
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                // Its own process group: a terminal's Ctrl-C reaches dough,
                // which tears the VM down, not QEMU directly.
                .process_group(0);
            c
        }
        Backend::Firecracker => {
            let fc_log = fc_log_path(paths);
            std::fs::File::create(&fc_log)?;
            let mut c = opts.firecracker.command(&paths.api);
            c.arg("--log-path")
                .arg(&fc_log)
                .stdout(std::fs::File::create(&paths.serial)?);
            c
        }
    };
    cmd.stderr(log);
    Ok(cmd)
}

/// Firecracker's own log (`--log-path`), beside `vmm.log`.
fn fc_log_path(paths: &VmPaths) -> PathBuf {
    paths.dir.join("firecracker.log")
}

/// The end of what the VMM said, for error messages.
pub(crate) fn vmm_tail(paths: &VmPaths, backend: Backend, lines: usize) -> String {
    match backend {
        Backend::Qemu => tail(&paths.vmm_log, lines),
        Backend::Firecracker => format!(
            "{}\n{}",
            tail(&fc_log_path(paths), lines),
            tail(&paths.vmm_log, lines)
        ),
    }
}

/// The guest's kernel command line beyond the VMM's fixed part: its
/// network and the user's extra arguments.
fn guest_cmdline(opts: &BootOptions) -> Vec<String> {
    NetPlan::guest_cmdline()
        .into_iter()
        .chain(opts.extra_cmdline.iter().cloned())
        .collect()
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

/// A new connection to a running VM's agent: QEMU's socket for its
/// virtio-serial port, or (Firecracker) the agent's next vsock connection,
/// which it makes within ~100 ms of finding someone listening.
pub(crate) fn open_channel(
    paths: &VmPaths,
    backend: Backend,
    limit: Duration,
    vmm_gone: &mut dyn FnMut() -> bool,
) -> Result<HostChannel, ChannelError> {
    match backend {
        Backend::Qemu => HostChannel::connect(&paths.channel, limit),
        Backend::Firecracker => {
            VsockListener::bind(&paths.vsock, dough_proto::VSOCK_PORT)?.accept(limit, vmm_gone)
        }
    }
}

/// Build a VM's network. `DOUGH_TEST_HOLD_IN_NET_SETUP=N` stops (forever)
/// before the N-th step, for the test that SIGKILLs dough mid-setup.
fn setup_net(plan: &NetPlan, pool: Ipv4Net) -> Result<(), dough_net::NetError> {
    let hold_at: Option<usize> = std::env::var("DOUGH_TEST_HOLD_IN_NET_SETUP")
        .ok()
        .and_then(|v| v.parse().ok());
    let mut linux = LinuxNet::default();
    let Some(hold_at) = hold_at else {
        return dough_net::setup(&mut linux, plan, pool);
    };
    let mut step = 0;
    let mut hook = |op: &'static str, done: bool| {
        if !done {
            if step == hold_at {
                eprintln!("dough: test hook: holding network setup before {op}");
                loop {
                    std::thread::park();
                }
            }
            step += 1;
        }
    };
    let mut ops = dough_net::ops::Observed {
        inner: &mut linux,
        hook: &mut hook,
    };
    dough_net::setup(&mut ops, plan, pool)
}

/// Where the host-wide network lock lives.
pub const NET_LOCK: &str = "/run/dough/net.lock";

/// Serialises claiming network names and subnets across every dough on
/// this host (and the leftover sweep, which must not see a network that is
/// half-built or not yet recorded).
pub fn net_lock() -> Result<nix::fcntl::Flock<std::fs::File>, FabricError> {
    let path = Path::new(NET_LOCK);
    let io = |source| FabricError::StateDir {
        path: path.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(path.parent().expect("has a parent")).map_err(io)?;
    let f = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(io)?;
    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| io(std::io::Error::from(e)))
}

/// Where each scope's VM directory is noted (`<scope>` → its path), so a
/// sweep can tell a scope whose directory is gone: everything in it is
/// left over.
pub const SCOPES_DIR: &str = "/run/dough/scopes";

/// Note `vms` under its scope (call with the network lock held).
pub(crate) fn register_scope(vms: &Path) {
    let scope = net_scope(vms);
    let file = Path::new(SCOPES_DIR).join(&scope);
    if !file.exists() {
        let canon = std::fs::canonicalize(vms).unwrap_or_else(|_| vms.to_path_buf());
        let _ = std::fs::create_dir_all(SCOPES_DIR)
            .and_then(|_| std::fs::write(&file, canon.as_os_str().as_encoded_bytes()));
    }
}

/// A short name for a VM directory, part of its clones' netns names and
/// rule tags, so doughs with different homes never sweep each other's.
pub fn net_scope(vms: &Path) -> String {
    use sha2::Digest;
    let canon = std::fs::canonicalize(vms).unwrap_or_else(|_| vms.to_path_buf());
    let h = sha2::Sha256::digest(canon.as_os_str().as_encoded_bytes());
    hex::encode(&h[..3])
}

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
