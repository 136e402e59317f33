//! One VM: boot from an image, wait for the agent, handshake, run
//! commands, tear down exactly.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use dough_image::Image;
use dough_net::linux::LinuxNet;
use dough_proto::{ExitStatus, Hello, Stream, READY_LINE};
use dough_vmm::process::wait_until;
use dough_vmm::{Backend, Resolved, VmPaths, VmmProcess};

use crate::backend::{BackendError, Launch, Start};
use crate::channel::{ChannelError, ExecRequest, HostChannel};
pub use crate::options::BootOptions;
use crate::serial::{tail, SerialWatch};
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
    dir: VmDir,
    /// Kept here as well as in the record: teardown must not depend on
    /// the directory still being readable.
    net: NetPlan,
    process: VmmProcess,
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
        let id = crate::new_vm_id();
        let mut rec = VmRecord::new(&id, kind, opts.accel, opts.mem_mib, opts.cpus);
        rec.image = image.id.clone();
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
        let net_err = |source: NetSetupError| FabricError::Net {
            vm: id.clone(),
            source,
        };
        // Planning, recording and building a network claim names and
        // subnets on the host: one dough (of any home) at a time.
        let _net = crate::host::net_lock()?;
        let (dir, plan) = {
            let mut used = dough_net::in_use_on_host(&mut LinuxNet::default())
                .map_err(|e| net_err(e.into()))?;
            for r in crate::state::list(vms_dir) {
                if let Some(p) = &r.net {
                    used.add(p);
                }
            }
            let plan = NetPlan::new(
                &crate::host::net_scope(vms_dir),
                &id,
                egress,
                opts.net_pool,
                0,
                &used,
            )
            .map_err(|e| net_err(e.into()))?;
            rec.net = Some(plan.clone());
            let dir = create_dir(vms_dir, &rec)?;
            // Now that the directory exists, its canonical path is known.
            crate::host::register_scope(vms_dir);
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
        let vmm_impl = crate::backend::vmm(opts.backend);
        let start_info = Start {
            opts,
            image,
            plan: &plan,
            launch: &launch,
            paths: &paths,
        };
        // Made before the spawn: a guest may connect as soon as it runs.
        let endpoint = match vmm_impl.endpoint(&paths) {
            Ok(e) => e,
            Err(e) => {
                remove();
                return Err(state_err(e));
            }
        };
        let mut cmd = match vmm_impl.command(&start_info) {
            Ok(c) => c,
            Err(e) => {
                remove();
                return Err(state_err(e));
            }
        };
        // A clone's guest may run anything: what its VMM writes (the console
        // log above all) is capped. A bake writes the snapshot's memory
        // file, and runs only dough's own agent: no cap.
        if !matches!(launch, Launch::Bake { .. }) {
            dough_vmm::process::cap_file_size(&mut cmd, crate::serial::CONSOLE_LOG_MAX);
        }
        let start = Instant::now();
        tracing::info!(vm = %id, accel = %opts.accel, backend = %opts.backend, "spawning the VMM");
        // No teardown on a signal may run between the spawn and the record.
        let spawning = crate::host::SPAWNING.read();
        // Spawned from a thread inside the clone's netns, the VMM lives
        // there and opens the TAP there.
        let spawned = dough_net::linux::in_netns(Some(&plan.netns), || Ok(cmd.spawn()));
        let child = match spawned {
            Ok(Ok(c)) => c,
            Ok(Err(source)) => {
                remove();
                let (vmm, hint) = vmm_impl.binary(opts);
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
        let exited = |st: std::process::ExitStatus| {
            let vmm_tail = vmm_impl.log_tail(&paths, 10);
            FabricError::VmmExited {
                backend: opts.backend,
                vm: id.clone(),
                status: format!("{st}{}", exit_reason(&vmm_tail)),
                vmm_tail,
                serial_tail: tail(&paths.serial, TAIL_LINES),
            }
        };
        let left = |start: Instant| {
            opts.deadline
                .saturating_sub(start.elapsed())
                .max(Duration::from_secs(5))
        };

        if let Err(e) = vmm_impl.start(&start_info, &mut process) {
            let e = match e {
                BackendError::Exited(st) => exited(st),
                source => FabricError::Backend {
                    vm: id.clone(),
                    source,
                },
            };
            return Err(fail(&mut process, e));
        }
        if let Launch::Cold | Launch::Bake { .. } = launch {
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
        let limit = left(start);
        let connected = endpoint.open(limit, &mut || process.try_wait().is_some());
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
        let r = crate::backend::open_channel(&self.paths, self.backend, limit, &mut || {
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

/// Create a VM's directory for `record`, checking its backend's longest
/// socket path.
pub fn create_dir(vms: &Path, record: &VmRecord) -> Result<VmDir, StateError> {
    let backend = crate::backend::vmm(record.backend);
    VmDir::create(vms, record, |p| backend.longest_socket(p))
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
    #[test]
    fn a_kvm_internal_error_is_named() {
        // Real Firecracker v1.16.1's last log lines on a host whose KVM
        // cannot run its guest.
        let fc = "[anonymous-instance:fc_vcpu 0] Received KVM_EXIT_INTERNAL_ERROR signal\n[anonymous-instance:main] Firecracker exiting with error. exit_code=1";
        assert!(super::exit_reason(fc).contains("this host's KVM cannot run the guest"));
        assert_eq!(super::exit_reason("qemu: something else"), "");
    }
}
