//! QEMU microvm: typed argv, QMP for restore and save, the virtio-serial
//! port's socket for the agent.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use dough_vmm::{Incoming, Memory, QemuArgs, Qmp, QmpError, Resolved, VmPaths, VmmProcess};

use super::{guest_cmdline, BackendError, Endpoint, Launch, LiveFiles, LiveSaved, Start, Vmm};
use crate::options::BootOptions;
use crate::serial::tail;

#[derive(Debug)]
pub(crate) struct QemuVmm;

/// TSC rate to give a TCG guest: the host's for a boot; a restore keeps
/// the rate its snapshot's guest calibrated with.
fn tsc_khz(accel: Resolved, launch: &Launch) -> Option<u64> {
    match launch {
        Launch::Restore(r) => r.tsc_khz,
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
            // A live clone saved whole carries its RAM in the stream: into
            // a new shared file (made into a snapshot), or memory of its own.
            Launch::Restore(snap) if snap.ram_in_state => {
                let memory = match &snap.into_mem {
                    Some(path) => Memory::File {
                        path: path.clone(),
                        shared: true,
                    },
                    None => Memory::Named,
                };
                (memory, Some(Incoming::Defer), true)
            }
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
            rootfs_writable: opts.root_rw,
            scratch: opts.scratch.is_some(),
            extra_cmdline: guest_cmdline(opts),
            tsc_khz: tsc_khz(opts.accel, s.launch),
            paths: s.paths.clone(),
            memory,
            incoming,
            start_paused,
            tap: Some(s.plan.tap.clone()),
            tcg_cache_mib: opts.tcg_cache_mib,
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

    fn start(&self, s: &Start<'_>, process: &mut VmmProcess) -> Result<(), BackendError> {
        let Launch::Restore(from) = s.launch else {
            // A boot needs nothing more: the guest is running.
            return Ok(());
        };
        let mut gone = || process.try_wait().is_some();
        let r = restore_from(
            &s.paths.qmp,
            &from.state,
            !from.ram_in_state,
            s.opts.deadline,
            &mut gone,
        );
        r.map_err(|source| match process.try_wait() {
            Some(st) => BackendError::Exited(st),
            None => BackendError::QemuRestore {
                source,
                vmm_tail: self.log_tail(s.paths, 10),
            },
        })
    }

    /// Stop the vCPUs.
    fn pause(&self, paths: &VmPaths) -> Result<(), BackendError> {
        let qmp_err = |what, source| BackendError::Qmp { what, source };
        let mut q = Qmp::connect(&paths.qmp, Duration::from_secs(10))
            .map_err(|e| qmp_err("connecting", e))?;
        q.stop().map_err(|e| qmp_err("pausing", e))
    }

    /// `cont`.
    fn resume(&self, paths: &VmPaths) -> Result<(), BackendError> {
        let qmp_err = |what, source| BackendError::Qmp { what, source };
        let mut q = Qmp::connect(&paths.qmp, Duration::from_secs(10))
            .map_err(|e| qmp_err("connecting", e))?;
        q.cont().map_err(|e| qmp_err("resuming", e))
    }

    /// Save only the device state: with `x-ignore-shared` the RAM is not in
    /// the stream, because it already is the shared file.
    fn save(&self, paths: &VmPaths, state: &Path, _mem: &Path) -> Result<(), BackendError> {
        let qmp_err = |what, source| BackendError::Qmp { what, source };
        let mut q = Qmp::connect(&paths.qmp, Duration::from_secs(10))
            .map_err(|e| qmp_err("connecting", e))?;
        q.ignore_shared_ram()
            .map_err(|e| qmp_err("enabling x-ignore-shared", e))?;
        q.migrate(&dough_vmm::qemu::exec_uri(state, true))
            .map_err(|e| qmp_err("saving the device state", e))?;
        q.wait_migration(SAVE_LIMIT)
            .map_err(|e| qmp_err("saving the device state", e))?;
        Ok(())
    }

    /// The whole machine, RAM included (no `x-ignore-shared`: a clone's RAM
    /// is a private mapping, so it is not "shared" to QEMU).
    fn save_live(&self, paths: &VmPaths, to: &LiveFiles<'_>) -> Result<LiveSaved, BackendError> {
        let state = to.whole;
        let qmp_err = |what, source| BackendError::Qmp { what, source };
        let mut q = Qmp::connect(&paths.qmp, Duration::from_secs(10))
            .map_err(|e| qmp_err("connecting", e))?;
        // Off (the clone's own restore turned it on): the stream carries
        // the RAM, and the VM it is restored into may share its RAM with a
        // file (which it then must load, not skip).
        q.set_ignore_shared(false)
            .map_err(|e| qmp_err("turning x-ignore-shared off", e))?;
        q.unthrottle_migration()
            .map_err(|e| qmp_err("lifting the migration bandwidth limit", e))?;
        q.migrate(&dough_vmm::qemu::exec_uri(state, true))
            .map_err(|e| qmp_err("saving the VM", e))?;
        q.wait_migration(SAVE_LIMIT)
            .map_err(|e| qmp_err("saving the VM", e))?;
        Ok(LiveSaved::Whole)
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
    fn version(&self, opts: &BootOptions) -> Result<String, BackendError> {
        qemu_version(&opts.qemu)
    }

    fn key_labels(&self) -> (&'static str, &'static str) {
        (dough_vmm::DEVICE_SET, "qemu")
    }
}

/// `qemu --version`'s first line.
pub(crate) fn qemu_version(qemu: &Path) -> Result<String, BackendError> {
    let out = std::process::Command::new(qemu)
        .arg("--version")
        .output()
        .map_err(|source| BackendError::Version {
            binary: qemu.display().to_string(),
            source: Box::new(source),
        })?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or("")
        .trim()
        .to_string())
}

/// Drive a `-incoming defer -S` QEMU through restoring `state`: skip the
/// shared RAM (it is the snapshot's memory file), load the device state,
/// then run the vCPUs.
fn restore_from(
    qmp_path: &Path,
    state: &Path,
    ram_is_shared: bool,
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
    // As it was when the stream was saved (QEMU checks): on for a bake's
    // device state, off for a live clone saved whole.
    q.set_ignore_shared(ram_is_shared)?;
    q.migrate_incoming(&dough_vmm::qemu::exec_uri(state, false))?;
    q.wait_migration(limit.saturating_sub(start.elapsed()))?;
    q.cont()
}
