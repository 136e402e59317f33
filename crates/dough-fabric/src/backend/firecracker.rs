//! Firecracker: its REST API; the agent connects over vsock to a socket
//! the host binds before the guest runs.

use std::path::{Path, PathBuf};
use std::process::Command;

use dough_image::Image;
use dough_vmm::firecracker::backend::FcMachine;
use dough_vmm::firecracker::{Client as FcClient, FcError};
use dough_vmm::{VmPaths, VmmProcess};

use super::{guest_cmdline, BackendError, Endpoint, Launch, LiveFiles, LiveSaved, Start, Vmm};
use crate::channel::VsockListener;
use crate::options::BootOptions;
use crate::serial::tail;

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
        rootfs_writable: opts.root_rw,
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
    fn start(&self, s: &Start<'_>, process: &mut VmmProcess) -> Result<(), BackendError> {
        let r = FcClient::wait(&s.paths.api, s.opts.firecracker.start_limit, &mut || {
            process.try_wait().map(|st| st.to_string())
        })
        .and_then(|c| match s.launch {
            Launch::Restore(from) => {
                c.load_and_resume(&from.state, &from.mem, Some(&s.plan.tap), &s.paths.vsock)
            }
            Launch::Cold | Launch::Bake { .. } => {
                c.configure_and_start(&fc_machine(s.image, s.opts, &s.plan.tap), &s.paths.vsock)
            }
        });
        r.map_err(|source| {
            // Firecracker's own refusal says more than its exit.
            let refused = matches!(source, FcError::Refused { .. });
            match process.try_wait() {
                Some(st) if !refused => BackendError::Exited(st),
                _ => BackendError::Firecracker {
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

    /// `PATCH /vm Paused`.
    fn pause(&self, paths: &VmPaths) -> Result<(), BackendError> {
        let fc = FcClient {
            socket: paths.api.clone(),
        };
        fc.pause().map_err(|e| BackendError::FirecrackerApi {
            what: "pausing",
            source: Box::new(e),
        })
    }

    /// `PATCH /vm Resumed`.
    fn resume(&self, paths: &VmPaths) -> Result<(), BackendError> {
        let fc = FcClient {
            socket: paths.api.clone(),
        };
        fc.resume().map_err(|e| BackendError::FirecrackerApi {
            what: "resuming",
            source: Box::new(e),
        })
    }

    /// A Full snapshot of the paused clone: its device state, and all of
    /// its memory written out (a clone maps its snapshot's file privately;
    /// Firecracker writes what the guest sees, its own pages and the
    /// file's). The result is a snapshot as a bake's is: no rebake. (A
    /// Diff snapshot would write only the pages the clone dirtied, but
    /// Firecracker loads one memory file, so it would have to be merged
    /// onto a copy of the parent's first: the same bytes written, later.)
    fn save_live(&self, paths: &VmPaths, to: &LiveFiles<'_>) -> Result<LiveSaved, BackendError> {
        self.save(paths, to.state, to.mem)?;
        Ok(LiveSaved::StateAndMem)
    }

    /// A Full snapshot: device state and memory.
    fn save(&self, paths: &VmPaths, state: &Path, mem: &Path) -> Result<(), BackendError> {
        let fc = FcClient {
            socket: paths.api.clone(),
        };
        fc.snapshot_full(state, mem)
            .map_err(|e| BackendError::FirecrackerApi {
                what: "writing the Full snapshot",
                source: Box::new(e),
            })?;
        for f in [state, mem] {
            if !f.is_file() {
                return Err(BackendError::NoSnapshotFile(f.to_path_buf()));
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
    fn version(&self, opts: &BootOptions) -> Result<String, BackendError> {
        dough_vmm::firecracker::backend::version(&opts.firecracker.binary)
            .map(|v| {
                std::iter::once(v)
                    .chain(opts.firecracker.extra_args.iter().cloned())
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .map_err(|e| BackendError::Version {
                binary: opts.firecracker.binary.display().to_string(),
                source: Box::new(e),
            })
    }

    fn key_labels(&self) -> (&'static str, &'static str) {
        (FC_DEVICE_SET, "firecracker")
    }
}
