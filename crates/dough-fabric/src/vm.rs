//! One VM: boot from an image, wait for the agent, handshake, run
//! commands, tear down exactly.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use dough_image::Image;
use dough_proto::{ExitStatus, Hello, Stream, READY_LINE};
use dough_vmm::process::wait_until;
use dough_vmm::{QemuArgs, Qmp, Resolved, VmPaths, VmmProcess};
use std::os::unix::process::CommandExt;

use crate::channel::{ChannelError, ExecRequest, HostChannel};
use crate::serial::{tail, SerialWatch};

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
    #[error("QEMU for VM {vm} exited during boot ({status}); QEMU said:\n{vmm_tail}\nlast serial console lines:\n{serial_tail}")]
    VmmExited {
        vm: String,
        status: String,
        vmm_tail: String,
        serial_tail: String,
    },
    #[error("cannot start {qemu}; is qemu-system-x86 installed? (`dough doctor`)")]
    Spawn {
        qemu: String,
        #[source]
        source: std::io::Error,
    },
    #[error("VM {vm}: channel handshake failed")]
    Handshake {
        vm: String,
        #[source]
        source: ChannelError,
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

/// How to boot.
#[derive(Debug, Clone)]
pub struct BootOptions {
    pub qemu: PathBuf,
    pub accel: Resolved,
    pub mem_mib: u32,
    pub cpus: u32,
    /// Deadline for one boot attempt (QEMU start → ready line → handshake).
    pub deadline: Duration,
    /// Attempts after the first one failed.
    pub retries: u32,
    pub extra_cmdline: Vec<String>,
}

impl Default for BootOptions {
    fn default() -> Self {
        BootOptions {
            qemu: "qemu-system-x86_64".into(),
            accel: Resolved::Tcg,
            mem_mib: 256,
            cpus: 1,
            deadline: Duration::from_secs(60),
            retries: 1,
            extra_cmdline: Vec::new(),
        }
    }
}

/// A running VM whose agent has said hello.
#[derive(Debug)]
pub struct Vm {
    pub id: String,
    pub paths: VmPaths,
    pub accel: Resolved,
    pub hello: Hello,
    /// Time from spawning QEMU to the finished handshake.
    pub boot_time: Duration,
    process: VmmProcess,
    channel: HostChannel,
    torn_down: bool,
}

impl Vm {
    /// Boot a VM from `image`, retrying a failed boot `opts.retries` times.
    pub fn boot(vms_dir: &Path, image: &Image, opts: &BootOptions) -> Result<Vm, FabricError> {
        let mut attempt = 0;
        loop {
            match Self::boot_once(vms_dir, image, opts) {
                Ok(vm) => return Ok(vm),
                Err(e @ (FabricError::Spawn { .. } | FabricError::StateDir { .. })) => {
                    return Err(e)
                }
                Err(e) if attempt < opts.retries => {
                    attempt += 1;
                    tracing::warn!("boot failed, retrying ({attempt}/{}): {e}", opts.retries);
                    eprintln!("dough: boot attempt {attempt} failed; retrying once more");
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn boot_once(vms_dir: &Path, image: &Image, opts: &BootOptions) -> Result<Vm, FabricError> {
        let id = crate::new_vm_id();
        let dir = vms_dir.join(&id);
        let state_err = |source| FabricError::StateDir {
            path: dir.clone(),
            source,
        };
        crate::gc::create_owned_dir(&dir).map_err(state_err)?;
        let paths = VmPaths::new(&dir);
        let args = QemuArgs {
            accel: opts.accel,
            mem_mib: opts.mem_mib,
            cpus: opts.cpus,
            kernel: image.kernel.clone(),
            initrd: image.initrd.clone(),
            rootfs: image.rootfs.clone(),
            extra_cmdline: opts.extra_cmdline.clone(),
            tsc_khz: dough_vmm::accel::host_tsc_khz(),
            paths: paths.clone(),
        };
        let log = std::fs::File::create(&paths.vmm_log).map_err(state_err)?;
        let log2 = log.try_clone().map_err(state_err)?;
        let start = Instant::now();
        tracing::info!(vm = %id, accel = %opts.accel, "spawning {}", opts.qemu.display());
        let child = Command::new(&opts.qemu)
            .args(args.argv())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            // Its own process group: a terminal's Ctrl-C reaches dough, which
            // tears the VM down, not QEMU directly.
            .process_group(0)
            .spawn()
            .map_err(|source| {
                let _ = std::fs::remove_dir_all(&dir);
                FabricError::Spawn {
                    qemu: opts.qemu.display().to_string(),
                    source,
                }
            })?;
        let mut process = VmmProcess::from_child(child);
        crate::gc::record_vmm(&dir, &process.id).map_err(state_err)?;

        let fail = |process: &mut VmmProcess, e: FabricError| {
            let _ = process.kill_and_wait(Duration::from_secs(10));
            let _ = std::fs::remove_dir_all(&dir);
            e
        };
        let mut watch = SerialWatch::new(&paths.serial);
        let mut exited = None;
        let ready = wait_until(opts.deadline, || {
            if let Some(st) = process.try_wait() {
                exited = Some(st);
                return true;
            }
            watch.saw(READY_LINE)
        });
        if let Some(st) = exited {
            let e = FabricError::VmmExited {
                vm: id.clone(),
                status: st.to_string(),
                vmm_tail: tail(&paths.vmm_log, 10),
                serial_tail: tail(&paths.serial, TAIL_LINES),
            };
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
        let left = opts
            .deadline
            .saturating_sub(start.elapsed())
            .max(Duration::from_secs(5));
        let handshake = HostChannel::connect(&paths.channel, left).and_then(|mut ch| {
            let hello = ch.handshake(&id, left)?;
            Ok((ch, hello))
        });
        let (channel, hello) = match handshake {
            Ok(x) => x,
            Err(source) => {
                return Err(fail(
                    &mut process,
                    FabricError::Handshake {
                        vm: id.clone(),
                        source,
                    },
                ))
            }
        };
        let boot_time = start.elapsed();
        tracing::info!(vm = %id, ?boot_time, boot_id = %hello.boot_id, "agent ready");
        Ok(Vm {
            id,
            paths,
            accel: opts.accel,
            hello,
            boot_time,
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
        let r = HostChannel::connect(&self.paths.channel, limit).and_then(|mut ch| {
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
            }),
        }
    }

    /// Peak resident set of the VMM process so far (`VmHWM`), in KiB.
    pub fn vmm_peak_rss_kib(&self) -> Option<u64> {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.process.id.pid)).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
    }

    pub fn pid(&self) -> i32 {
        self.process.id.pid
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
        if let Ok(mut q) = Qmp::connect(&self.paths.qmp, Duration::from_secs(2)) {
            let _ = q.quit();
            wait_until(Duration::from_secs(2), || self.process.try_wait().is_some());
        }
        let r = self
            .process
            .kill_and_wait(Duration::from_secs(10))
            .map_err(|source| FabricError::Teardown {
                vm: self.id.clone(),
                source,
            });
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
