//! One VM: boot from an image, wait for the agent, handshake, run
//! commands, tear down exactly.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use dough_image::Image;
use dough_proto::{ExitStatus, Hello, Stream, READY_LINE};
use dough_vmm::process::wait_until;
use dough_vmm::{Backend, Resolved, VmPaths, VmmProcess};

use crate::backend::{BackendError, Endpoint, Launch, Start, Vmm};
use crate::channel::{ChannelError, ExecRequest, HostChannel};
use crate::host::HostNet;
pub use crate::options::BootOptions;
use crate::serial::{tail, SerialWatch};
use crate::state::{StateError, VmDir, VmKind, VmRecord, VmState};
use dough_net::{Egress, NetPlan};

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
        /// The exit status, and the reason the VMM's log gives when dough
        /// recognises it.
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
    #[error("VM {vm}: its VMM failed")]
    Backend {
        vm: String,
        #[source]
        source: BackendError,
    },
    #[error("VM {id} is dead: {reason} (`dough logs {id}` shows its console, `dough down {id}` removes it)")]
    Dead { id: String, reason: String },
    #[error("VM {id} is {state}, not ready{}", if *.state == VmState::Paused { " (`dough resume` it first)" } else { "" })]
    NotReady { id: String, state: VmState },
    #[error(transparent)]
    State(#[from] StateError),
    #[error("VM {vm}: network")]
    Net {
        vm: String,
        #[source]
        source: NetSetupError,
    },
    #[error("VM {vm}: its agent's channel failed; last serial console lines:\n{serial_tail}")]
    Channel {
        vm: String,
        #[source]
        source: ChannelError,
        serial_tail: String,
    },
    #[error(transparent)]
    Host(#[from] crate::host::HostError),
    #[error("VM state directory {path}")]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("VM {vm}: could not install dough's CA in the guest; it said: {said}")]
    TrustCa { vm: String, said: String },
    #[error("the Firecracker backend has no scratch disk yet (its snapshots name one disk file for every clone); use --scratch none")]
    NoScratchOnFirecracker,
    #[error("VM {vm}: its VMM's cgroup")]
    Cgroup {
        vm: String,
        #[source]
        source: crate::cgroup::CgroupError,
    },
    #[error("VM {vm}: making its scratch disk from {source_file}")]
    Scratch {
        vm: String,
        source_file: PathBuf,
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
    #[error("building the network failed (network namespaces, TAPs and nftables need root; see `dough doctor`)")]
    Ops(#[from] dough_net::NetError),
}

impl FabricError {
    /// Errors a retry cannot fix (QEMU missing, state directory unusable).
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            FabricError::Spawn { .. }
                | FabricError::WrongBackend { .. }
                | FabricError::NoScratchOnFirecracker
                | FabricError::Scratch { .. }
                | FabricError::Cgroup { .. }
                | FabricError::State(_)
                | FabricError::StateDir { .. }
                | FabricError::Net { .. }
        )
    }
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
    /// What building its network cost the launch on its own path: the
    /// netns and TAP before the VMM starts, then any wait for the rest
    /// (built while the VMM and gateway start).
    pub net_on_path: Duration,
    pub(crate) dir: VmDir,
    /// Kept here as well as in the record: teardown must not depend on
    /// the directory still being readable.
    net: NetPlan,
    host_net: HostNet,
    /// Its VMM's cgroup, removed after the VMM.
    cgroup: Option<crate::cgroup::Cgroup>,
    process: VmmProcess,
    /// Its egress gateway (every policy but `none`).
    gateway: Option<VmmProcess>,
    /// Variables every command gets before its own: the image's (a
    /// recipe's `env`), then those that make TLS clients trust dough's CA
    /// (clones with brokered secrets) and `--ca` certificates.
    base_env: Vec<(String, String)>,
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

    pub(crate) fn with_retries(
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
                    crate::notice::notice(&format!(
                        "VM start attempt {attempt} failed; retrying once more"
                    ));
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
        launch: Launch,
    ) -> Result<Vm, FabricError> {
        Self::launch_on(
            crate::backend::vmm(opts.backend),
            vms_dir,
            image,
            opts,
            kind,
            launch,
        )
    }

    /// Bring a VM up on `backend`, in named steps — claim the network and
    /// the record, spawn the VMM in the clone's namespace, bring the guest
    /// up — with an [`Unwind`] guard: whatever fails, everything already
    /// made (process, network, directory) is undone when it drops.
    pub(crate) fn launch_on(
        backend: &dyn Vmm,
        vms_dir: &Path,
        image: &Image,
        opts: &BootOptions,
        kind: VmKind,
        launch: Launch,
    ) -> Result<Vm, FabricError> {
        if opts.scratch.is_some() && opts.backend == dough_vmm::Backend::Firecracker {
            return Err(FabricError::NoScratchOnFirecracker);
        }
        let id = crate::new_vm_id();
        let mut rec = VmRecord::new(&id, kind, opts.accel, opts.mem_mib, opts.cpus);
        rec.image = image.id.clone();
        rec.scratch_mib = opts.scratch.as_ref().map(|s| s.size_mib);
        rec.backend = opts.backend;
        if let Launch::Restore(from) = &launch {
            rec.snapshot = Some(from.key.clone());
        }
        // A bake must reach nothing; its NIC exists only so that clones
        // restored from it have one.
        let egress = match launch {
            Launch::Bake { .. } => Egress::None,
            _ => opts.egress.clone(),
        };
        let mut undo = Unwind::new(&opts.net);
        let (dir, plan, rest) = claim_network(
            backend,
            vms_dir,
            &mut rec,
            opts,
            egress,
            &mut undo,
            Build::StartOnly,
        )?;
        let paths = dir.paths.clone();
        let start_info = Start {
            opts,
            image,
            plan: &plan,
            launch: &launch,
            paths: &paths,
        };
        let start = Instant::now();
        // The rest of the network is built while the VMM and the gateway
        // start (they need only the netns and the TAP), and is done before
        // the guest runs (`bring_up`): off the restore path.
        let net_err = |source: dough_net::NetError| FabricError::Net {
            vm: id.clone(),
            source: source.into(),
        };
        let net_started_in = rest.as_ref().map_or(Duration::ZERO, |r| r.started_in);
        let (endpoint, net_waited) = std::thread::scope(|sc| {
            let finishing = rest.map(|rest| {
                sc.spawn(|| {
                    let _lock = rest.lock;
                    opts.net
                        .building(|ops| dough_net::setup_finish(ops, &plan, opts.net_pool))
                })
            });
            let spawned = spawn_vmm(backend, &start_info, &dir, &mut undo).and_then(|e| {
                start_gateway(&start_info, &dir, &mut undo)?;
                Ok(e)
            });
            let waiting = Instant::now();
            let finished = finishing.map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(dough_net::NetError::op(
                        "building the network",
                        "its thread panicked",
                    ))
                })
            });
            let waited = waiting.elapsed();
            let endpoint = spawned?;
            if let Some(r) = finished {
                r.map_err(net_err)?;
            }
            Ok::<_, FabricError>((endpoint, waited))
        })?;
        // What the network cost this launch on its own path: its first part
        // and any wait for the rest.
        let net_on_path = net_started_in + net_waited;
        let process = undo.process.as_mut().expect("spawn_vmm recorded the VMM");
        let (mut channel, hello) = bring_up(backend, &start_info, &id, endpoint, process, start)?;
        // What the clone trusts besides its image: dough's CA when a secret
        // is brokered, and what the caller asked for — for clones with a
        // network only (a gate or a bake reaches nothing to trust).
        let mut pems: Vec<&str> = opts.trust.iter().map(String::as_str).collect();
        if let (Some(ca), false) = (&opts.ca, opts.brokers.is_empty()) {
            pems.push(&ca.cert);
        }
        let trusted = if pems.is_empty() || !plan.egress.has_gateway() {
            Vec::new()
        } else {
            trust_ca(&mut channel, &id, &pems.join("\n"), &paths)?
        };
        // The image's own variables (a recipe's `env`), then these.
        let base_env: Vec<(String, String)> = image.env.iter().cloned().chain(trusted).collect();
        if !base_env.is_empty() {
            // Commands run later through the record (`dough exec`) get them too.
            dir.update(|r| {
                r.exec_env = base_env.clone();
                Ok(())
            })?;
        }
        dir.set_state(VmState::Ready)?;
        let boot_time = start.elapsed();
        tracing::info!(vm = %id, ?boot_time, boot_id = %hello.boot_id, "agent ready");
        let (process, gateway) = undo.keep();
        Ok(Vm {
            id,
            kind,
            backend: opts.backend,
            paths,
            accel: opts.accel,
            hello,
            boot_time,
            net_on_path,
            dir,
            net: plan,
            host_net: opts.net.clone(),
            cgroup: rec.cgroup.clone(),
            process,
            gateway,
            base_env,
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
        let req = req.with_base_env(&self.base_env);
        self.channel.exec(&req, sink).map_err(|source| {
            // A deadline that ran out mid-frame leaves the stream out of
            // step: nothing more may be read from this connection.
            if matches!(
                source,
                ChannelError::Timeout(_) | ChannelError::SendTimeout(_)
            ) {
                self.channel.shutdown();
            }
            FabricError::Channel {
                vm: self.id.clone(),
                source,
                serial_tail: tail(&self.paths.serial, TAIL_LINES),
            }
        })
    }

    /// Close the channel and open a new connection with a fresh handshake.
    /// The agent sees the host leave and come back, as after a restore.
    pub fn reconnect(&mut self, limit: Duration) -> Result<Hello, FabricError> {
        self.channel.shutdown();
        let process = &mut self.process;
        let (paths, backend) = (&self.paths, self.backend);
        let r = HostChannel::attach(
            &mut |left| {
                crate::backend::open_channel(paths, backend, left, &mut || {
                    process.try_wait().is_some()
                })
            },
            &self.id,
            limit,
            crate::channel::FIRST_ATTACH_TRY,
        );
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
        if self.process.try_wait().is_none() {
            let process = &mut self.process;
            crate::backend::vmm(self.backend)
                .ask_to_quit(&self.paths, &mut || process.try_wait().is_some());
        }
        let r = self
            .process
            .kill_and_wait(Duration::from_secs(10))
            .map_err(|source| FabricError::Teardown {
                vm: self.id.clone(),
                source,
            });
        if let Some(g) = &mut self.gateway {
            if let Err(e) = g.kill_and_wait(Duration::from_secs(5)) {
                tracing::warn!(vm = %self.id, "stopping the gateway: {e}");
            }
        }
        if let Err(e) = dough_net::teardown(&mut **self.host_net.ops(), &self.net) {
            tracing::warn!(vm = %self.id, "network teardown: {e}");
        }
        if let Some(cg) = &self.cgroup {
            if let Err(e) = cg.remove(Duration::from_secs(2)) {
                tracing::warn!(vm = %self.id, "{e}");
            }
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

/// What a launch has made so far. Dropped before [`Unwind::keep`], it
/// undoes all of it: kills the VMM by its identity, tears the network
/// down, removes the VM directory.
pub(crate) struct Unwind<'a> {
    net: &'a HostNet,
    cgroup: Option<crate::cgroup::Cgroup>,
    dir: Option<PathBuf>,
    plan: Option<NetPlan>,
    process: Option<VmmProcess>,
    gateway: Option<VmmProcess>,
}

impl<'a> Unwind<'a> {
    pub(crate) fn new(net: &'a HostNet) -> Self {
        Unwind {
            net,
            cgroup: None,
            dir: None,
            plan: None,
            process: None,
            gateway: None,
        }
    }

    /// The launch succeeded: keep everything; the VMM process (and the
    /// gateway's, if any) is handed to the caller.
    pub(crate) fn keep(mut self) -> (VmmProcess, Option<VmmProcess>) {
        self.dir = None;
        self.plan = None;
        self.cgroup = None;
        let vmm = self
            .process
            .take()
            .expect("a launch that got this far has a VMM");
        (vmm, self.gateway.take())
    }

    /// Keep the directory and network (no VMM was spawned here).
    fn keep_claim(mut self) {
        self.dir = None;
        self.plan = None;
        self.cgroup = None;
    }
}

impl Drop for Unwind<'_> {
    fn drop(&mut self) {
        if let Some(mut p) = self.process.take() {
            let _ = p.kill_and_wait(Duration::from_secs(10));
        }
        if let Some(mut g) = self.gateway.take() {
            let _ = g.kill_and_wait(Duration::from_secs(5));
        }
        if let Some(plan) = self.plan.take() {
            if let Err(e) = dough_net::teardown(&mut **self.net.ops(), &plan) {
                tracing::warn!("network teardown: {e}");
            }
        }
        if let Some(cg) = self.cgroup.take() {
            if let Err(e) = cg.remove(Duration::from_secs(2)) {
                tracing::warn!("{e}");
            }
        }
        if let Some(dir) = self.dir.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Step 1: plan the VM's network, record the VM (its directory), and build
/// the network — under the host-wide network lock, since planning claims
/// names and subnets.
fn claim_network(
    backend: &dyn Vmm,
    vms_dir: &Path,
    rec: &mut VmRecord,
    opts: &BootOptions,
    egress: Egress,
    undo: &mut Unwind<'_>,
    build: Build,
) -> Result<(VmDir, NetPlan, Option<NetRest>), FabricError> {
    let net_err = |source: NetSetupError| FabricError::Net {
        vm: rec.id.clone(),
        source,
    };
    let lock = opts.net.lock()?;
    let mut used =
        dough_net::in_use_on_host(&mut **opts.net.ops()).map_err(|e| net_err(e.into()))?;
    for r in crate::state::list(vms_dir) {
        if let Some(p) = &r.net {
            used.add(p);
        }
    }
    let plan = NetPlan::new(
        &crate::host::net_scope(vms_dir),
        &rec.id,
        egress,
        opts.net_pool,
        0,
        &used,
    )
    .map_err(|e| net_err(e.into()))?;
    rec.net = Some(plan.clone());
    rec.cgroup = crate::cgroup::layout().map(|l| {
        let tcg = opts.accel == dough_vmm::Resolved::Tcg;
        let limits = crate::cgroup::Limits::for_vm(opts.cpus, opts.mem_mib, tcg);
        crate::cgroup::plan(l, &crate::host::net_scope(vms_dir), &rec.id, limits)
    });
    let dir = VmDir::create(vms_dir, rec, |p| backend.longest_socket(p))?;
    undo.dir = Some(dir.paths.dir.clone());
    if let Some(cg) = &rec.cgroup {
        undo.cgroup = Some(cg.clone());
        cg.create().map_err(|source| FabricError::Cgroup {
            vm: rec.id.clone(),
            source,
        })?;
    }
    // Now that the directory exists, its canonical path is known.
    opts.net.register_scope(vms_dir);
    // A failed setup rolls itself back; a finished one is undone by `undo`.
    let rest = match build {
        Build::All => {
            opts.net
                .setup(&plan, opts.net_pool)
                .map_err(|e| net_err(e.into()))?;
            None
        }
        Build::StartOnly => {
            let t = Instant::now();
            opts.net
                .building(|ops| dough_net::setup_start(ops, &plan))
                .map_err(|e| net_err(e.into()))?;
            Some(NetRest {
                lock,
                started_in: t.elapsed(),
            })
        }
    };
    undo.plan = Some(plan.clone());
    Ok((dir, plan, rest))
}

/// How much of a clone's network [`claim_network`] builds.
#[derive(Debug, Clone, Copy)]
enum Build {
    All,
    /// What its processes need to start (`dough_net::setup_start`); the
    /// caller finishes it (`dough_net::setup_finish`) before the guest runs.
    StartOnly,
}

/// A network [`claim_network`] only started: the host-wide network lock
/// stays held until it is finished (a sweep must not see it half-built).
struct NetRest {
    lock: nix::fcntl::Flock<std::fs::File>,
    /// How long its first part took.
    started_in: Duration,
}

/// Step 2: the endpoint (before the guest can run), the VMM's command, and
/// the VMM spawned inside the clone's namespace and recorded by identity.
fn spawn_vmm(
    backend: &dyn Vmm,
    s: &Start<'_>,
    dir: &VmDir,
    undo: &mut Unwind<'_>,
) -> Result<Endpoint, FabricError> {
    let state_err = |source| FabricError::StateDir {
        path: s.paths.dir.clone(),
        source,
    };
    // Made before the spawn: a guest may connect as soon as it runs.
    let endpoint = backend.endpoint(s.paths).map_err(state_err)?;
    let mut cmd = backend.command(s).map_err(state_err)?;
    // The VMM gets none of dough's environment (which may hold the very
    // secrets a clone is only given placeholders of): a guest that broke
    // out into its VMM would find them there. Only PATH, and the switches
    // of dough's own test doubles (DOUGH_FAKE_*: the fake firecracker's).
    cmd.env_clear();
    for (k, v) in std::env::vars_os() {
        let keep = k == "PATH" || k.to_str().is_some_and(|k| k.starts_with("DOUGH_FAKE_"));
        if keep {
            cmd.env(k, v);
        }
    }
    // A clone's guest may run anything: what its VMM writes (the console
    // log above all) is capped. A bake writes the snapshot's memory file,
    // and runs only dough's own agent: no cap.
    // An image builder's VMM writes its own copy of the rootfs, so its cap
    // is that file's size (which the recipe chose).
    // So is a VM's scratch disk: it may fill its own, no more.
    if !matches!(s.launch, Launch::Bake { .. }) {
        let mut cap = crate::serial::CONSOLE_LOG_MAX;
        if s.opts.root_rw {
            let rootfs = std::fs::metadata(&s.image.rootfs).map(|m| m.len());
            cap = cap.max(rootfs.unwrap_or(0));
        }
        if let Some(sd) = &s.opts.scratch {
            cap = cap.max(sd.size_mib << 20);
        }
        // One restored into a new memory file writes that file.
        if let Launch::Restore(r) = s.launch {
            if r.into_mem.is_some() {
                cap = cap.max(u64::from(s.opts.mem_mib) << 20);
            }
        }
        dough_vmm::process::cap_file_size(&mut cmd, cap);
    }
    // Not the open-file limit a daemon raised for itself.
    dough_vmm::process::inherited_nofile(&mut cmd);
    // The VM's own writable disk: a sparse copy of an empty filesystem (a
    // boot, a bake) or of its snapshot's (a restore). In the VM directory,
    // it goes with it.
    if let Some(sd) = &s.opts.scratch {
        crate::disk::copy_sparse(&sd.source, &s.paths.scratch).map_err(|source| {
            FabricError::Scratch {
                vm: dir.id.clone(),
                source_file: sd.source.clone(),
                source,
            }
        })?;
    }
    // It runs in its cgroup from its first instruction on.
    if let Some(cg) = &undo.cgroup {
        let files = cg.procs_files().map_err(|source| FabricError::Cgroup {
            vm: dir.id.clone(),
            source,
        })?;
        crate::cgroup::join_before_exec(&mut cmd, files);
    }
    tracing::info!(vm = %dir.id, accel = %s.opts.accel, backend = %s.opts.backend, "spawning the VMM");
    // No teardown on a signal may run between the spawn and the record.
    let spawning = crate::host::SPAWNING.read();
    // Spawned inside the clone's netns, the VMM lives there and opens the
    // TAP there.
    let child = match s.opts.net.spawn_in(Some(&s.plan.netns), &mut cmd) {
        Ok(Ok(c)) => c,
        Ok(Err(source)) => {
            let (vmm, hint) = backend.binary(s.opts);
            return Err(FabricError::Spawn {
                vmm: vmm.display().to_string(),
                hint,
                source,
            });
        }
        Err(e) => {
            return Err(FabricError::Net {
                vm: dir.id.clone(),
                source: e.into(),
            })
        }
    };
    let process = undo.process.insert(VmmProcess::from_child(child));
    let vmm = process.id;
    let recorded = dir.update(|r| {
        r.vmm = Some(vmm);
        r.transition(VmState::Starting)
    });
    drop(spawning);
    recorded?;
    Ok(endpoint)
}

/// Step 2b: the clone's egress gateway (every policy but `none`), told
/// its policy and its VMM (it exits when the VMM does), recorded by
/// identity like the VMM. Its sockets exist before the guest runs, so no
/// connection of the guest's can miss it.
fn start_gateway(s: &Start<'_>, dir: &VmDir, undo: &mut Unwind<'_>) -> Result<(), FabricError> {
    if !s.plan.egress.has_gateway() {
        return Ok(());
    }
    let net_err = |source: dough_net::NetError| FabricError::Net {
        vm: dir.id.clone(),
        source: source.into(),
    };
    let vmm = undo.process.as_ref().map(|p| p.id);
    let config = dough_gateway::Config {
        vm: dir.id.clone(),
        egress: s.plan.egress.clone(),
        deny: vec![s.opts.net_pool],
        log: s.paths.dir.join(GATEWAY_AUDIT_LOG),
        hosts: s.opts.net.gateway_hosts().clone(),
        vmm: vmm.map(|v| (v.pid, v.start_ticks)),
        brokers: s.opts.brokers.clone(),
        ca: s.opts.ca.clone(),
        upstream_roots: s.opts.net.gateway_roots().to_vec(),
    };
    let spawning = crate::host::SPAWNING.read();
    let child = s
        .opts
        .net
        .start_gateway(&crate::host::GatewayStart {
            netns: &s.plan.netns,
            vm_dir: &s.paths.dir,
            config: &config.to_json(),
        })
        .map_err(net_err)?;
    let gateway = undo.gateway.insert(VmmProcess::from_child(child));
    let id = gateway.id;
    let recorded = dir.update(|r| {
        r.gateway = Some(id);
        Ok(())
    });
    drop(spawning);
    recorded?;
    Ok(())
}

/// Where a clone with brokered secrets keeps dough's CA certificate.
pub const GUEST_CA_PATH: &str = "/etc/dough/ca.pem";
/// The guest's system bundle, which gets dough's CA appended.
pub const GUEST_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Step 4 (clones with a network that trust more than their image: dough's
/// CA for brokered secrets, `--ca`): the certificates into the system
/// bundle of the clone's own writable layer and at [`GUEST_CA_PATH`],
/// before anything else runs; the variables that point TLS clients at them.
fn trust_ca(
    ch: &mut HostChannel,
    id: &str,
    cert_pem: &str,
    paths: &VmPaths,
) -> Result<Vec<(String, String)>, FabricError> {
    // On stdin: a host's whole bundle is larger than an environment
    // variable may be.
    let script = format!(
        "set -e; mkdir -p /etc/dough /etc/ssl/certs; t=$(mktemp); cat > \"$t\"; \
         cat \"$t\" >> {GUEST_CA_PATH}; printf '\\n' >> {GUEST_BUNDLE}; \
         cat \"$t\" >> {GUEST_BUNDLE}; rm -f \"$t\""
    );
    let req = ExecRequest {
        argv: vec!["sh".into(), "-c".into(), script],
        env: vec![],
        cwd: None,
        stdin: Some(format!("{}\n", cert_pem.trim_end()).into_bytes()),
        timeout: Some(Duration::from_secs(30)),
    };
    let mut said = Vec::new();
    let status = ch
        .exec(&req, &mut |_, b| {
            said.extend_from_slice(&b[..b.len().min(4096)])
        })
        .map_err(|source| FabricError::Channel {
            vm: id.to_string(),
            source,
            serial_tail: tail(&paths.serial, TAIL_LINES),
        })?;
    if status != ExitStatus::Exited(0) {
        return Err(FabricError::TrustCa {
            vm: id.to_string(),
            said: crate::serial::printable(&String::from_utf8_lossy(&said)),
        });
    }
    Ok(ca_env())
}

/// The variables that make a guest's TLS clients trust the certificates
/// at [`GUEST_CA_PATH`] (node reads only that file; the rest read the
/// system bundle it was added to).
pub(crate) fn ca_env() -> Vec<(String, String)> {
    let bundle = GUEST_BUNDLE.to_string();
    vec![
        ("NODE_EXTRA_CA_CERTS".into(), GUEST_CA_PATH.into()),
        ("SSL_CERT_FILE".into(), bundle.clone()),
        ("REQUESTS_CA_BUNDLE".into(), bundle.clone()),
        ("CURL_CA_BUNDLE".into(), bundle.clone()),
        ("GIT_SSL_CAINFO".into(), bundle),
    ]
}

/// The gateway's audit log (JSON lines) in a VM's directory.
pub const GATEWAY_AUDIT_LOG: &str = "net.log";

/// Step 3: bring the guest up (the backend's start; for a boot, the ready
/// line) and shake hands with its agent, all within the boot deadline.
fn bring_up(
    backend: &dyn Vmm,
    s: &Start<'_>,
    id: &str,
    endpoint: Endpoint,
    process: &mut VmmProcess,
    start: Instant,
) -> Result<(HostChannel, Hello), FabricError> {
    let paths = s.paths;
    let opts = s.opts;
    let exited = |st: std::process::ExitStatus| {
        let vmm_tail = backend.log_tail(paths, 10);
        FabricError::VmmExited {
            backend: opts.backend,
            vm: id.to_string(),
            status: format!("{st}{}", exit_reason(&vmm_tail)),
            vmm_tail,
            serial_tail: tail(&paths.serial, TAIL_LINES),
        }
    };
    backend.start(s, process).map_err(|e| match e {
        BackendError::Exited(st) => exited(st),
        source => FabricError::Backend {
            vm: id.to_string(),
            source,
        },
    })?;
    if let Launch::Cold | Launch::Bake { .. } = s.launch {
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
            return Err(exited(st));
        }
        if !ready {
            return Err(FabricError::BootTimeout {
                vm: id.to_string(),
                secs: opts.deadline.as_secs(),
                accel: opts.accel,
                serial_tail: tail(&paths.serial, TAIL_LINES),
            });
        }
    }
    let limit = opts
        .deadline
        .saturating_sub(start.elapsed())
        .max(Duration::from_secs(5));
    let handshake = match endpoint {
        // QEMU's socket can be connected again: a guest that did not hear
        // the host arrive is asked again on a fresh connection.
        crate::backend::Endpoint::Connect(path) => HostChannel::attach(
            &mut |left| HostChannel::connect(&path, left),
            id,
            limit,
            crate::channel::FIRST_ATTACH_TRY,
        ),
        accept => accept
            .open(limit, &mut || process.try_wait().is_some())
            .and_then(|mut ch| {
                let hello = ch.handshake(id, limit)?;
                Ok((ch, hello))
            }),
    };
    handshake.map_err(|source| match process.try_wait() {
        Some(st) => exited(st),
        None => FabricError::Handshake {
            vm: id.to_string(),
            source,
            serial_tail: tail(&paths.serial, TAIL_LINES),
        },
    })
}

/// A launch's first step alone, for a VMM dough does not drive itself (the
/// benchmark's raw QEMU): plan and build `rec`'s network with `egress`
/// and record the VM. On success the caller owns teardown (the record
/// names everything, so a sweep can too); on failure nothing is left.
pub fn claim(
    vms_dir: &Path,
    rec: &mut VmRecord,
    opts: &BootOptions,
    egress: Egress,
) -> Result<(VmDir, NetPlan), FabricError> {
    let mut undo = Unwind::new(&opts.net);
    let (dir, plan, _) = claim_network(
        crate::backend::vmm(rec.backend),
        vms_dir,
        rec,
        opts,
        egress,
        &mut undo,
        Build::All,
    )?;
    undo.keep_claim();
    Ok((dir, plan))
}

/// The reason a VMM's log gives for a guest that died, in words, when it
/// is one dough recognises (empty otherwise).
fn exit_reason(vmm_tail: &str) -> String {
    if vmm_tail.contains("KVM_EXIT_INTERNAL_ERROR") {
        ": KVM stopped the guest's vCPU with KVM_EXIT_INTERNAL_ERROR — this host's KVM cannot \
         run the guest (nested or paravirtual KVM often cannot; `dough doctor` checks)"
            .into()
    } else if vmm_tail.contains("kvm_buf_set_msrs") {
        ": QEMU's KVM setup failed (kvm_buf_set_msrs) — this host's KVM cannot run the guest; \
         use --accel tcg"
            .into()
    } else {
        String::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[test]
    fn a_kvm_internal_error_is_named() {
        // Real Firecracker v1.16.1's last log lines on a host whose KVM
        // cannot run its guest.
        let fc = "[anonymous-instance:fc_vcpu 0] Received KVM_EXIT_INTERNAL_ERROR signal\n[anonymous-instance:main] Firecracker exiting with error. exit_code=1";
        assert!(super::exit_reason(fc).contains("this host's KVM cannot run the guest"));
        assert_eq!(super::exit_reason("qemu: something else"), "");
    }

    /// Where a launch is made to fail.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum FailAt {
        Endpoint,
        Command,
        Spawn,
        Start,
        VmmExits,
        NoReadyLine,
        Handshake,
    }

    /// A backend that fails where it is told to; its VMM is a `sleep`
    /// with a marker duration, so the test can tell whether it is left.
    struct FakeVmm {
        fail: FailAt,
        marker: String,
    }

    impl Vmm for FakeVmm {
        fn binary<'a>(&self, _opts: &'a BootOptions) -> (&'a Path, &'static str) {
            (Path::new("/nonexistent/fake-vmm"), "a test double")
        }
        fn endpoint(&self, paths: &VmPaths) -> std::io::Result<Endpoint> {
            if self.fail == FailAt::Endpoint {
                return Err(std::io::Error::other("no endpoint"));
            }
            Ok(Endpoint::Connect(paths.channel.clone()))
        }
        fn command(&self, s: &Start<'_>) -> std::io::Result<std::process::Command> {
            let mut c = std::process::Command::new("sh");
            match self.fail {
                FailAt::Command => return Err(std::io::Error::other("no command")),
                FailAt::Spawn => return Ok(std::process::Command::new("/nonexistent/fake-vmm")),
                FailAt::VmmExits => c.args(["-c", "exit 3"]),
                // The ready line, then nobody on the channel.
                FailAt::Handshake => c.args([
                    "-c",
                    &format!("echo '{READY_LINE}' > \"$1\"; exec sleep {}", self.marker),
                    "sh",
                    &s.paths.serial.display().to_string(),
                ]),
                _ => c.args(["-c", &format!("exec sleep {}", self.marker)]),
            };
            Ok(c)
        }
        fn start(&self, _s: &Start<'_>, _p: &mut VmmProcess) -> Result<(), BackendError> {
            if self.fail == FailAt::Start {
                return Err(BackendError::NoSnapshotFile("/nonexistent/state".into()));
            }
            Ok(())
        }
        fn save_live(
            &self,
            _paths: &VmPaths,
            _to: &crate::backend::LiveFiles<'_>,
        ) -> Result<crate::backend::LiveSaved, BackendError> {
            Err(BackendError::Unsupported("a test double"))
        }
        fn pause(&self, _paths: &VmPaths) -> Result<(), BackendError> {
            Ok(())
        }
        fn resume(&self, _paths: &VmPaths) -> Result<(), BackendError> {
            Ok(())
        }
        fn save(&self, _paths: &VmPaths, _s: &Path, _m: &Path) -> Result<(), BackendError> {
            Ok(())
        }
        fn ask_to_quit(&self, _paths: &VmPaths, _gone: &mut dyn FnMut() -> bool) {}
        fn log_tail(&self, paths: &VmPaths, lines: usize) -> String {
            tail(&paths.vmm_log, lines)
        }
        fn longest_socket(&self, paths: &VmPaths) -> PathBuf {
            paths.channel.clone()
        }
        fn version(&self, _opts: &BootOptions) -> Result<String, BackendError> {
            Ok("fake".into())
        }
        fn key_labels(&self) -> (&'static str, &'static str) {
            ("fake", "fake")
        }
    }

    fn image() -> Image {
        Image {
            id: "img".into(),
            created_unix: 0,
            kernel: "/nonexistent/vmlinux".into(),
            initrd: "/nonexistent/initrd".into(),
            rootfs: "/nonexistent/rootfs".into(),
            kernel_release: String::new(),
            kernel_package: String::new(),
            suite: String::new(),
            packages: vec![],
            kernel_key: String::new(),
            rootfs_key: String::new(),
            initrd_key: String::new(),
            agent_sha256: String::new(),
            env: Vec::new(),
            recipe: None,
            mem_mib: None,
        }
    }

    /// Whether a process with `sleep <marker>` on its command line lives.
    fn sleeper_alive(marker: &str) -> bool {
        std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
            let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
            let zombie = stat.rsplit(") ").next().is_some_and(|r| r.starts_with('Z'));
            !zombie && cmd.split(|b| *b == 0).any(|a| a == marker.as_bytes())
        })
    }

    /// Launch on a fake backend failing at `fail` and a fake network that
    /// fails its `net_fail_at`-th step; the error, and whether anything was
    /// left: a live VMM, a network object, a directory.
    fn failed_launch(fail: FailAt, net_fail_at: Option<usize>) -> (FabricError, Vec<String>) {
        static N: AtomicU64 = AtomicU64::new(0);
        let vms = tempfile::tempdir().unwrap();
        let (run, fake, net) = crate::host::fake_host_net();
        fake.lock().unwrap().fail_at = net_fail_at;
        let marker = format!(
            "{}.{}",
            7000 + std::process::id() % 1000,
            N.fetch_add(1, Ordering::SeqCst)
        );
        let backend = FakeVmm {
            fail,
            marker: marker.clone(),
        };
        let opts = BootOptions {
            deadline: Duration::from_millis(300),
            net,
            egress: Egress::Nat,
            ..BootOptions::default()
        };
        let e = Vm::launch_on(
            &backend,
            vms.path(),
            &image(),
            &opts,
            VmKind::Run,
            Launch::Cold,
        )
        .unwrap_err();
        let mut left = Vec::new();
        if sleeper_alive(&marker) {
            left.push("a running VMM".to_string());
        }
        if !fake.lock().unwrap().is_clean() {
            left.push(format!("network objects: {:?}", fake.lock().unwrap()));
        }
        if std::fs::read_dir(vms.path()).unwrap().next().is_some() {
            left.push("a VM directory".to_string());
        }
        let gateways = std::fs::read_to_string(run.path().join("gateways")).unwrap_or_default();
        for g in gateways.lines() {
            if sleeper_alive(g) {
                left.push(format!("a running gateway ({g})"));
            }
        }
        if !gateways.is_empty() {
            left.push("gateway started".to_string());
        }
        (e, left)
    }

    /// The image's resolver is the address the clone's gateway answers
    /// DNS on (dough-image cannot name dough-net's constant itself).
    #[test]
    fn the_guest_resolver_is_its_gateway() {
        let conf = dough_image::rootfs::GUEST_RESOLV_CONF;
        let ns: Vec<&str> = conf
            .lines()
            .filter_map(|l| l.strip_prefix("nameserver "))
            .collect();
        assert_eq!(ns, [dough_net::plan::GUEST_GW.to_string()]);
    }

    /// A launch that fails at any step — in the backend or half-way
    /// through building the network — leaves nothing: no VMM process, no
    /// network object (the fake network is clean), no VM directory, and
    /// says which step failed. No root, no real VM, no real network.
    #[test]
    fn a_failed_launch_undoes_every_step() {
        let cases = [
            (FailAt::Endpoint, "VM state directory"),
            (FailAt::Command, "VM state directory"),
            (FailAt::Spawn, "cannot start /nonexistent/fake-vmm"),
            (FailAt::Start, "its VMM failed"),
            (FailAt::VmmExits, "exited during boot"),
            (FailAt::NoReadyLine, "did not print its ready line"),
            (FailAt::Handshake, "channel handshake failed"),
        ];
        for (fail, says) in cases {
            let (e, mut left) = failed_launch(fail, None);
            assert!(e.to_string().contains(says), "{fail:?}: {e}");
            // Once the VMM is running, the clone's gateway is started too
            // (and must be gone again).
            let started = left.iter().position(|l| l == "gateway started");
            let vmm_ran = !matches!(fail, FailAt::Endpoint | FailAt::Command | FailAt::Spawn);
            assert_eq!(started.is_some(), vmm_ran, "{fail:?}: {left:?}");
            if let Some(i) = started {
                left.remove(i);
            }
            assert!(left.is_empty(), "{fail:?} left {left:?}");
        }
        // The network failing at each of its steps rolls back too.
        let mut net_failures = 0;
        for k in 0..12 {
            let (e, left) = failed_launch(FailAt::NoReadyLine, Some(k));
            assert!(
                matches!(e, FabricError::Net { .. } | FabricError::BootTimeout { .. }),
                "step {k}: {e}"
            );
            net_failures += usize::from(matches!(e, FabricError::Net { .. }));
            let left: Vec<&String> = left.iter().filter(|l| *l != "gateway started").collect();
            assert!(left.is_empty(), "step {k} left {left:?}");
        }
        assert!(
            net_failures >= 6,
            "only {net_failures} network steps failed"
        );
    }
}
