//! Driving Firecracker processes: spawn with `--api-sock`, configure and
//! start a guest, pause and take a Full snapshot, restore a snapshot into a
//! fresh process with the clone's own TAP and vsock socket, kill exactly.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::api::*;
use super::{Client, FcError};
use crate::process::VmmProcess;

/// Which Firecracker to run, and how.
#[derive(Debug, Clone)]
pub struct FcConfig {
    pub binary: PathBuf,
    /// Extra arguments, e.g. `--enable-pci`.
    pub extra_args: Vec<String>,
    /// How long the API socket may take to appear.
    pub start_limit: Duration,
}

/// What a guest boots with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FcMachine {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub rootfs: PathBuf,
    /// Attach the rootfs read-write (an image builder's own copy).
    pub rootfs_writable: bool,
    pub mem_mib: u32,
    pub vcpus: u32,
    pub boot_args: String,
    /// TAP in the VMM's network namespace.
    pub tap: Option<String>,
    pub guest_mac: String,
    pub guest_cid: u32,
}

/// The guest's NIC and vsock ids.
pub const IFACE: &str = "eth0";
pub const ROOT_DRIVE: &str = "rootfs";

impl FcConfig {
    /// `firecracker --api-sock API [extra args]`, in its own process group
    /// (a terminal's Ctrl-C reaches dough, which tears the VM down), stdin
    /// closed. The caller sets stdout (the serial console) and stderr.
    pub fn command(&self, api: &Path) -> Command {
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--api-sock")
            .arg(api)
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .process_group(0);
        cmd
    }
}

impl Default for FcConfig {
    fn default() -> Self {
        FcConfig {
            binary: "firecracker".into(),
            extra_args: Vec::new(),
            start_limit: Duration::from_secs(10),
        }
    }
}

/// `firecracker --version`'s first line (e.g. `Firecracker v1.16.0`).
pub fn version(binary: &Path) -> Result<String, FcError> {
    let out = Command::new(binary)
        .arg("--version")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .map_err(|source| FcError::Spawn {
            binary: binary.display().to_string(),
            source,
        })?;
    let first = String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or("")
        .trim()
        .to_string();
    if !out.status.success() || first.is_empty() {
        return Err(FcError::Spawn {
            binary: binary.display().to_string(),
            source: std::io::Error::other(format!("`--version` failed ({})", out.status)),
        });
    }
    Ok(first)
}

impl Client {
    /// Every pre-boot call for machine `m` (vsock host side at
    /// `vsock_uds`), then `InstanceStart`.
    pub fn configure_and_start(&self, m: &FcMachine, vsock_uds: &Path) -> Result<(), FcError> {
        self.machine_config(&MachineConfiguration {
            vcpu_count: m.vcpus,
            mem_size_mib: m.mem_mib,
            smt: Some(false),
            huge_pages: None,
            track_dirty_pages: None,
        })?;
        self.boot_source(&BootSource {
            kernel_image_path: s(&m.kernel),
            initrd_path: Some(s(&m.initrd)),
            boot_args: Some(m.boot_args.clone()),
        })?;
        self.drive(&Drive {
            drive_id: ROOT_DRIVE.into(),
            is_root_device: false,
            path_on_host: s(&m.rootfs),
            is_read_only: !m.rootfs_writable,
        })?;
        if let Some(tap) = &m.tap {
            self.network_interface(&NetworkInterface {
                iface_id: IFACE.into(),
                host_dev_name: tap.clone(),
                guest_mac: Some(m.guest_mac.clone()),
            })?;
        }
        self.vsock(&Vsock {
            guest_cid: m.guest_cid,
            uds_path: s(vsock_uds),
        })?;
        self.entropy()?;
        self.start()
    }

    /// A Full snapshot of the paused guest: device state to `state`, guest
    /// memory to `mem`.
    pub fn snapshot_full(&self, state: &Path, mem: &Path) -> Result<(), FcError> {
        self.snapshot_create(&SnapshotCreateParams {
            snapshot_type: SnapshotType::Full,
            snapshot_path: s(state),
            mem_file_path: s(mem),
        })
    }

    /// Load a snapshot into this fresh process with its own TAP and vsock
    /// socket, and resume it. Firecracker maps `mem` privately.
    pub fn load_and_resume(
        &self,
        state: &Path,
        mem: &Path,
        tap: Option<&str>,
        vsock_uds: &Path,
    ) -> Result<(), FcError> {
        self.snapshot_load(&SnapshotLoadParams {
            snapshot_path: s(state),
            mem_backend: MemoryBackend {
                backend_type: BackendType::File,
                backend_path: s(mem),
            },
            resume_vm: Some(true),
            network_overrides: tap
                .map(|t| {
                    vec![NetworkOverride {
                        iface_id: IFACE.into(),
                        host_dev_name: t.into(),
                    }]
                })
                .unwrap_or_default(),
            vsock_override: Some(VsockOverride {
                uds_path: s(vsock_uds),
            }),
        })
    }
}

/// One Firecracker process and the files it owns, all in its directory.
#[derive(Debug)]
pub struct FcProcess {
    pub dir: PathBuf,
    pub api: PathBuf,
    /// Host side of the hybrid vsock (`<uds>_<port>` for guest connections).
    pub vsock_uds: PathBuf,
    /// The serial console (Firecracker's stdout).
    pub console: PathBuf,
    pub client: Client,
    process: VmmProcess,
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

impl FcProcess {
    /// Start Firecracker in `dir` (which must be fresh: Firecracker refuses
    /// an existing socket path) and wait for its API.
    pub fn spawn(cfg: &FcConfig, dir: &Path) -> Result<FcProcess, FcError> {
        let api = dir.join("api.sock");
        let console = dir.join("console.log");
        let io = |e| FcError::Spawn {
            binary: cfg.binary.display().to_string(),
            source: e,
        };
        let out = std::fs::File::create(&console).map_err(io)?;
        let err = std::fs::File::create(dir.join("firecracker.log")).map_err(io)?;
        let mut cmd = cfg.command(&api);
        cmd.stdout(out).stderr(err);
        // ETXTBSY: the binary was just written and another thread's child
        // still holds it open for a moment; try again briefly.
        let mut tries = 0;
        let child = loop {
            match cmd.spawn() {
                Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 50 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(10));
                }
                r => break r.map_err(io)?,
            }
        };
        let mut process = VmmProcess::from_child(child);
        let client = match Client::wait(&api, cfg.start_limit, &mut || {
            process.try_wait().map(|st| st.to_string())
        }) {
            Ok(c) => c,
            Err(e) => {
                let _ = process.kill_and_wait(Duration::from_secs(5));
                return Err(e);
            }
        };
        Ok(FcProcess {
            dir: dir.to_path_buf(),
            api,
            vsock_uds: dir.join("vsock.sock"),
            console,
            client,
            process,
        })
    }

    pub fn pid(&self) -> i32 {
        self.process.id.pid
    }

    pub fn identity(&self) -> crate::ProcessId {
        self.process.id
    }

    /// Configure a guest and start it.
    pub fn boot(&self, m: &FcMachine) -> Result<(), FcError> {
        self.client.configure_and_start(m, &self.vsock_uds)
    }

    /// Pause and write a Full snapshot (device state + guest memory).
    pub fn snapshot(&self, state: &Path, mem: &Path) -> Result<(), FcError> {
        self.client.pause()?;
        self.client.snapshot_full(state, mem)
    }

    /// A new process in `dir` restored from a snapshot, with this clone's
    /// TAP and vsock socket, running.
    pub fn restore(
        cfg: &FcConfig,
        dir: &Path,
        state: &Path,
        mem: &Path,
        tap: Option<&str>,
    ) -> Result<FcProcess, FcError> {
        let p = FcProcess::spawn(cfg, dir)?;
        match p.client.load_and_resume(state, mem, tap, &p.vsock_uds) {
            Ok(()) => Ok(p),
            Err(e) => {
                p.kill();
                Err(e)
            }
        }
    }

    pub fn pause(&self) -> Result<(), FcError> {
        self.client.pause()
    }

    pub fn resume(&self) -> Result<(), FcError> {
        self.client.resume()
    }

    /// Wait up to `limit` for the process to exit by itself (e.g. after a
    /// refused `snapshot/load`, which ends a real Firecracker with status
    /// 1); its status, or None if it is still running.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let mut status = None;
        crate::process::wait_until(limit, || {
            status = self.process.try_wait();
            status.is_some()
        });
        status
    }

    /// SIGKILL by verified pid and reap.
    pub fn kill(mut self) {
        let _ = self.process.kill_and_wait(Duration::from_secs(10));
    }
}

/// A process nobody killed (an error path, a panicking test) is killed
/// when its handle goes: a Firecracker never outlives its owner's handle.
impl Drop for FcProcess {
    fn drop(&mut self) {
        let _ = self.process.kill_and_wait(Duration::from_secs(10));
    }
}
