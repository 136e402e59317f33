//! Warm snapshots: bake once, restore many clones.
//!
//! A bake boots the image with guest RAM in a shared file, waits for the
//! agent's ready line, lets the agent greet the host once (so the host
//! knows it is alive), closes the channel, pauses the vCPUs and saves only
//! the device state (`x-ignore-shared`: the RAM *is* the file). Clones map
//! that file privately (copy-on-write), so they share its pages in the page
//! cache until they write them. Nothing but the handshake has reached the
//! guest when it is frozen: no task, no secret.
//!
//! Under Firecracker a bake is the same up to the freeze: the guest is
//! paused and a Full snapshot written (`state` = Firecracker's snapshot
//! file, `mem` = guest memory), which clones load with their own TAP and
//! vsock socket; Firecracker maps the memory file privately too.
//!
//! Snapshots live in `$DOUGH_HOME/snapshots/<key>/` and are keyed by every
//! input that shapes them, the backend and its version included; the files
//! never change after the bake.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Instant;

use dough_image::cache::{Entry, KeyBuilder};
use dough_image::Image;
use dough_vmm::{Backend, Resolved};
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::backend::{BackendError, Launch, RestoreFrom};
use crate::options::BootOptions;
use crate::state::{now_unix, VmKind};
use crate::vm::{FabricError, Vm};

const META: &str = "meta.json";

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("baking the snapshot")]
    Bake(#[from] FabricError),
    #[error("cannot tell the VMM's version")]
    Version(#[source] BackendError),
    #[error("VM {vm}: saving its state failed")]
    Save {
        vm: String,
        #[source]
        source: BackendError,
    },
    #[error("snapshot metadata {path}")]
    Meta {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("snapshot store")]
    Io(#[from] std::io::Error),
    #[error("the bake's warm-up command failed in the guest: {0}")]
    WarmUp(String),
}

/// The baked guest's scratch disk, in a snapshot's directory.
const SCRATCH_FILE: &str = "scratch.img";

/// Everything that shapes a snapshot. Change any of it and the key changes.
#[derive(Debug, Clone)]
pub struct SnapshotSpec {
    pub image: Image,
    pub accel: Resolved,
    pub mem_mib: u32,
    pub cpus: u32,
    pub extra_cmdline: Vec<String>,
    pub backend: Backend,
    /// `qemu --version` or `firecracker --version`: neither promises that
    /// its snapshots load into another version.
    pub vmm_version: String,
    /// Its scratch disk's size (the guest's writable layer), if it has one.
    pub scratch_mib: Option<u64>,
}

pub use crate::backend::FC_DEVICE_SET;

impl SnapshotSpec {
    /// Everything that shapes the snapshot VMs booted with `opts` from
    /// `image` would be restored from (asks the VMM for its version).
    pub fn for_boot(image: &Image, opts: &BootOptions) -> Result<SnapshotSpec, SnapshotError> {
        Ok(SnapshotSpec {
            image: image.clone(),
            accel: opts.accel,
            mem_mib: opts.mem_mib,
            cpus: opts.cpus,
            extra_cmdline: opts.extra_cmdline.clone(),
            backend: opts.backend,
            vmm_version: vmm_version(opts)?,
            scratch_mib: opts.scratch.as_ref().map(|s| s.size_mib),
        })
    }

    /// The labelled inputs, as shown when explaining a re-bake.
    pub fn inputs(&self) -> BTreeMap<String, String> {
        let i = &self.image;
        let (device_set, version_label) = crate::backend::vmm(self.backend).key_labels();
        [
            ("kernel", i.kernel_key.clone()),
            ("rootfs", i.rootfs_key.clone()),
            ("initramfs", i.initrd_key.clone()),
            ("agent", i.agent_sha256.chars().take(16).collect()),
            ("accel", self.accel.to_string()),
            ("memory MiB", self.mem_mib.to_string()),
            ("vCPUs", self.cpus.to_string()),
            (
                "kernel command line",
                dough_vmm::qemu::BASE_CMDLINE
                    .iter()
                    .map(|s| s.to_string())
                    .chain(dough_net::NetPlan::guest_cmdline())
                    .chain(self.extra_cmdline.iter().cloned())
                    .collect::<Vec<_>>()
                    .join(" "),
            ),
            ("device set", device_set.to_string()),
            (
                "scratch MiB",
                self.scratch_mib
                    .map_or_else(|| "none (RAM)".to_string(), |m| m.to_string()),
            ),
            ("backend", self.backend.to_string()),
            ("warm-up command", WARM_UP.to_string()),
            // Labelled by backend so QEMU snapshots keep their keys.
            (version_label, self.vmm_version.clone()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    pub fn key(&self) -> String {
        let mut k = KeyBuilder::new("snapshot-v1");
        for (label, v) in self.inputs() {
            k.str(&label, &v);
        }
        k.finish()
    }
}

/// `meta.json` of a snapshot.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotMeta {
    pub key: String,
    pub created_unix: u64,
    /// Boot + handshake + save.
    pub bake_secs: f64,
    pub inputs: BTreeMap<String, String>,
    pub image: Image,
    pub accel: Resolved,
    pub mem_mib: u32,
    pub cpus: u32,
    pub extra_cmdline: Vec<String>,
    pub tsc_khz: Option<u64>,
    /// Size of the saved device state.
    pub state_bytes: u64,
    /// Snapshots from before there was a choice are QEMU's.
    #[serde(default)]
    pub backend: Backend,
    /// Its scratch disk's size; the disk as the guest left it is
    /// `scratch.img`, which every clone gets a copy of.
    #[serde(default)]
    pub scratch_mib: Option<u64>,
    /// A snapshot of a live clone (`dough snapshot`): what it was taken of.
    /// None: a bake.
    #[serde(default)]
    pub parent: Option<SnapshotParent>,
    /// The guest's RAM is in `state` (a live clone's snapshot), not in a
    /// `mem` file.
    #[serde(default)]
    pub ram_in_state: bool,
}

/// What a live snapshot was taken of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotParent {
    /// The snapshot the clone was restored from.
    pub snapshot: String,
    /// The clone.
    pub vm: String,
}

/// A snapshot on disk: baked, or of a live clone.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub key: String,
    pub dir: PathBuf,
    /// Guest RAM; mapped privately by every clone. Never modified.
    pub mem: PathBuf,
    /// Device state (the migration stream without RAM).
    pub state: PathBuf,
    /// The baked guest's serial console up to the snapshot.
    pub boot_log: PathBuf,
    /// The baked guest's scratch disk (its writable layer), if it has one.
    pub scratch: Option<PathBuf>,
    pub meta: SnapshotMeta,
}

/// Write a snapshot's `meta.json` into `dir` and make its data files
/// read-only. Clones see the memory file's pages until they write their
/// own copies: it must never change. (QEMU opens it read-write even for a
/// private mapping, which root may do despite the mode.)
pub(crate) fn write_meta_and_seal(dir: &Path, meta: &SnapshotMeta) -> Result<(), SnapshotError> {
    let bytes = serde_json::to_vec_pretty(meta).map_err(|source| SnapshotError::Meta {
        path: dir.join(META),
        source,
    })?;
    std::fs::write(dir.join(META), bytes)?;
    use std::os::unix::fs::PermissionsExt;
    for f in ["mem", "state", SCRATCH_FILE].map(|n| dir.join(n)) {
        if f.exists() {
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o444))?;
        }
    }
    Ok(())
}

/// Bytes allocated on disk below `dir` (sparse files count what they use).
pub fn disk_usage(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.blocks() * 512)
        .sum()
}

/// The version of the VMM `opts` would run, for the snapshot key.
pub fn vmm_version(opts: &BootOptions) -> Result<String, SnapshotError> {
    crate::backend::vmm(opts.backend)
        .version(opts)
        .map_err(SnapshotError::Version)
}

/// Why a bake is happening.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BakeReason {
    Forced,
    /// No snapshot was ever baked in this store.
    First,
    /// Inputs differ from the newest snapshot's: (input, old, new).
    Changed(Vec<(String, String, String)>),
}

impl std::fmt::Display for BakeReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BakeReason::Forced => f.write_str("--force"),
            BakeReason::First => f.write_str("no snapshot yet"),
            BakeReason::Changed(d) => {
                f.write_str("inputs changed since the last bake: ")?;
                let parts: Vec<String> = d
                    .iter()
                    .map(|(k, old, new)| format!("{k} {old:?} → {new:?}"))
                    .collect();
                f.write_str(&parts.join(", "))
            }
        }
    }
}

/// What [`SnapshotStore::ensure`] did.
#[derive(Debug)]
pub enum Ensured {
    Existing(Snapshot),
    Baked(Snapshot, BakeReason),
}

impl Ensured {
    pub fn snapshot(&self) -> &Snapshot {
        match self {
            Ensured::Existing(s) | Ensured::Baked(s, _) => s,
        }
    }
}

#[derive(Debug, Clone)]
pub struct SnapshotStore {
    root: PathBuf,
}

impl SnapshotStore {
    /// Where its snapshots are.
    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn new(home: &Path) -> Self {
        SnapshotStore {
            root: home.join("snapshots"),
        }
    }

    fn entry(&self, key: &str) -> Entry {
        Entry {
            dir: self.root.join(key),
        }
    }

    /// The complete snapshot `key`, if there is one.
    pub fn get(&self, key: &str) -> Option<Snapshot> {
        let e = self.entry(key);
        if !e.is_complete() {
            return None;
        }
        let meta: SnapshotMeta =
            serde_json::from_slice(&std::fs::read(e.dir.join(META)).ok()?).ok()?;
        let s = Snapshot {
            key: key.to_string(),
            mem: e.dir.join("mem"),
            state: e.dir.join("state"),
            boot_log: e.dir.join("boot-serial.log"),
            scratch: meta.scratch_mib.map(|_| e.dir.join(SCRATCH_FILE)),
            dir: e.dir,
            meta,
        };
        let scratch_ok = s.scratch.as_ref().is_none_or(|p| p.is_file());
        let mem_ok = s.meta.ram_in_state || s.mem.is_file();
        (mem_ok && s.state.is_file() && scratch_ok).then_some(s)
    }

    /// All complete snapshots, newest first.
    pub fn list(&self) -> Vec<Snapshot> {
        let mut out: Vec<Snapshot> = std::fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| !n.starts_with('.'))
            .filter_map(|n| self.get(&n))
            .collect();
        out.sort_by(|a, b| {
            b.meta
                .created_unix
                .cmp(&a.meta.created_unix)
                .then(a.key.cmp(&b.key))
        });
        out
    }

    /// The store's lock, held while baking or pruning; `say` hears when
    /// another dough holds it and we wait.
    pub(crate) fn bake_lock(
        &self,
        say: &mut dyn FnMut(&str),
    ) -> Result<Flock<File>, SnapshotError> {
        std::fs::create_dir_all(&self.root)?;
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.root.join(".bake.lock"))?;
        Ok(match Flock::lock(lock, FlockArg::LockExclusiveNonblock) {
            Ok(g) => g,
            Err((f, _)) => {
                say("waiting for another dough that is baking");
                Flock::lock(f, FlockArg::LockExclusive).map_err(|(_, e)| std::io::Error::from(e))?
            }
        })
    }

    /// Remove every complete snapshot whose key is not in `keep`, under the
    /// bake lock; returns (key, bytes on disk) of each removed. Running
    /// clones are unaffected (their memory mapping outlives the file); only
    /// their boot log for `dough logs` goes.
    pub fn prune(
        &self,
        keep: &std::collections::BTreeSet<String>,
    ) -> Result<Vec<(String, u64)>, SnapshotError> {
        let _guard = self.bake_lock(&mut |_| {})?;
        let mut removed = Vec::new();
        for snap in self.list() {
            if keep.contains(&snap.key) {
                continue;
            }
            let bytes = disk_usage(&snap.dir);
            std::fs::remove_dir_all(&snap.dir)?;
            removed.push((snap.key, bytes));
        }
        Ok(removed)
    }

    /// Remove what interrupted bakes and live snapshots left (`.tmp-*`
    /// directories), when no other dough holds the store's lock (one that
    /// does may be writing them); returns what was removed.
    pub fn remove_interrupted(&self) -> Vec<PathBuf> {
        let Ok(lock) = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.root.join(".bake.lock"))
        else {
            return Vec::new();
        };
        let Ok(_guard) = Flock::lock(lock, FlockArg::LockExclusiveNonblock) else {
            return Vec::new();
        };
        let mut removed = Vec::new();
        for e in std::fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .flatten()
        {
            if e.file_name().to_string_lossy().starts_with(".tmp-")
                && std::fs::remove_dir_all(e.path()).is_ok()
            {
                removed.push(e.path());
            }
        }
        removed
    }

    /// Why `spec` has no snapshot: compared with the newest one.
    pub fn why_bake(&self, spec: &SnapshotSpec) -> BakeReason {
        let baked = self.list().into_iter().filter(|s| s.meta.parent.is_none());
        let Some(last) = baked.into_iter().next() else {
            return BakeReason::First;
        };
        let new = spec.inputs();
        let mut diff: Vec<(String, String, String)> = new
            .iter()
            .filter(|(k, v)| last.meta.inputs.get(*k) != Some(v))
            .map(|(k, v)| {
                let old = last.meta.inputs.get(k).cloned().unwrap_or_default();
                (k.clone(), old, v.clone())
            })
            .collect();
        if diff.is_empty() {
            // Same inputs under another key: the key recipe changed.
            diff.push(("snapshot format".into(), last.key, spec.key()));
        }
        BakeReason::Changed(diff)
    }

    /// The snapshot for `spec`, baking it first when there is none (or when
    /// `force`). Concurrent callers bake once: the others wait and use it.
    pub fn ensure(
        &self,
        spec: &SnapshotSpec,
        opts: &BootOptions,
        vms_dir: &Path,
        force: bool,
        say: &mut dyn FnMut(&str),
    ) -> Result<Ensured, SnapshotError> {
        let key = spec.key();
        if !force {
            if let Some(s) = self.get(&key) {
                return Ok(Ensured::Existing(s));
            }
        }
        let _guard = self.bake_lock(say)?;
        if !force {
            if let Some(s) = self.get(&key) {
                return Ok(Ensured::Existing(s));
            }
        }
        // Holding the bake lock, no bake is in progress: temporary
        // directories left here are from a bake that crashed or was killed
        // (each holds a RAM-sized file).
        for e in std::fs::read_dir(&self.root)?.flatten() {
            if e.file_name().to_string_lossy().starts_with(".tmp-") {
                let _ = std::fs::remove_dir_all(e.path());
                say(&format!(
                    "removed the remains of an interrupted bake ({})",
                    e.path().display()
                ));
            }
        }
        let reason = if force {
            BakeReason::Forced
        } else {
            self.why_bake(spec)
        };
        say(&format!("baking snapshot {key} ({reason})"));
        let snap = self.bake(spec, opts, vms_dir)?;
        say(&format!(
            "baked snapshot {key} in {:.2}s (device state {} KiB)",
            snap.meta.bake_secs,
            snap.meta.state_bytes / 1024
        ));
        Ok(Ensured::Baked(snap, reason))
    }

    fn bake(
        &self,
        spec: &SnapshotSpec,
        opts: &BootOptions,
        vms_dir: &Path,
    ) -> Result<Snapshot, SnapshotError> {
        let key = spec.key();
        let opts = BootOptions {
            backend: spec.backend,
            accel: spec.accel,
            mem_mib: spec.mem_mib,
            cpus: spec.cpus,
            extra_cmdline: spec.extra_cmdline.clone(),
            // A bake is of the shared, read-only rootfs: always.
            root_rw: false,
            ..opts.clone()
        };
        let tsc_khz = match (spec.backend, spec.accel) {
            (Backend::Qemu, Resolved::Tcg) => dough_vmm::accel::host_tsc_khz(),
            _ => None,
        };
        let started = Instant::now();
        self.entry(&key).build(|tmp| -> Result<(), SnapshotError> {
            let mem = tmp.join("mem");
            let state = tmp.join("state");
            let mut attempt = 0;
            let mut vm = loop {
                let launch = Launch::Bake {
                    mem: mem.clone(),
                    tsc_khz,
                };
                match Vm::launch(vms_dir, &spec.image, &opts, VmKind::Bake, launch) {
                    Ok(vm) => break vm,
                    Err(e) if attempt < opts.retries && !e.is_permanent() => {
                        attempt += 1;
                        tracing::warn!("bake boot failed, retrying: {e}");
                        crate::notice::notice(&format!(
                            "bake boot attempt {attempt} failed; retrying once more"
                        ));
                        let _ = std::fs::remove_file(&mem);
                    }
                    Err(e) => return Err(e.into()),
                }
            };
            warm_up(&mut vm)?;
            // The host has seen the agent alive; now leave it idle and freeze it.
            vm.close_channel();
            let backend = crate::backend::vmm(spec.backend);
            let save_err = |source| SnapshotError::Save {
                vm: vm.id.clone(),
                source,
            };
            backend.pause(&vm.paths).map_err(save_err)?;
            vm.set_state(crate::state::VmState::Paused)?;
            backend.save(&vm.paths, &state, &mem).map_err(save_err)?;
            std::fs::copy(&vm.paths.serial, tmp.join("boot-serial.log"))?;
            // The scratch disk as the paused guest left it belongs with its
            // memory: clones start from the pair (QEMU flushed it at the pause).
            let scratch = tmp.join(SCRATCH_FILE);
            if spec.scratch_mib.is_some() && std::fs::rename(&vm.paths.scratch, &scratch).is_err() {
                crate::disk::copy_sparse(&vm.paths.scratch, &scratch)?;
            }
            vm.destroy()?;
            let meta = SnapshotMeta {
                key: key.clone(),
                created_unix: now_unix(),
                bake_secs: started.elapsed().as_secs_f64(),
                inputs: spec.inputs(),
                image: spec.image.clone(),
                accel: spec.accel,
                mem_mib: spec.mem_mib,
                cpus: spec.cpus,
                extra_cmdline: spec.extra_cmdline.clone(),
                tsc_khz,
                state_bytes: std::fs::metadata(&state)?.len(),
                backend: spec.backend,
                scratch_mib: spec.scratch_mib,
                parent: None,
                ram_in_state: false,
            };
            write_meta_and_seal(tmp, &meta)?;
            Ok(())
        })?;
        self.get(&key)
            .ok_or_else(|| std::io::Error::other(format!("snapshot {key} vanished after baking")))
            .map_err(SnapshotError::Io)
    }
}

impl Vm {
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
            root_rw: false,
            // The snapshot's guest has (or has not) its writable layer on a
            // scratch disk: every clone gets a copy of it.
            scratch: snap
                .scratch
                .as_ref()
                .zip(snap.meta.scratch_mib)
                .map(|(p, m)| crate::options::ScratchDisk {
                    size_mib: m,
                    source: p.clone(),
                }),
            ..opts.clone()
        };
        Self::with_retries(&opts, || {
            Self::launch(
                vms_dir,
                &snap.meta.image,
                &opts,
                kind,
                Launch::Restore(RestoreFrom {
                    key: snap.key.clone(),
                    state: snap.state.clone(),
                    mem: snap.mem.clone(),
                    tsc_khz: snap.meta.tsc_khz,
                    ram_in_state: snap.meta.ram_in_state,
                    into_mem: None,
                }),
            )
        })
    }
}

/// What the bake runs in its guest before freezing it: a shell that runs a
/// program, as nearly every command a clone is given does (`dough exec`, a
/// plan's agent and gate), then what gobrr runs in each of its clones (tar
/// to unpack a tree, git to commit it and take a diff; git only where the
/// image has it), in a scratch directory under /tmp (RAM) that it removes.
/// Their files (the shell, the dynamic loader, the C library, tar, git and
/// its libraries) are then in the guest's page cache in every clone, so a
/// clone's first commands do not read them from its disk; the `sync`
/// leaves no write-back pending in the snapshot.
const WARM_UP: &str = "/bin/true && w=$(mktemp -d) && cd \"$w\" && echo dough > f \
&& tar -cf t f && tar -xf t && rm -f t \
&& { ! command -v git >/dev/null || { git init -q && git add -A \
&& git -c user.name=dough -c user.email=dough@localhost commit -qm warm-up \
&& git diff --binary --cached HEAD >/dev/null; }; } \
&& cd / && rm -rf \"$w\" && sync";

fn warm_up(vm: &mut Vm) -> Result<(), SnapshotError> {
    let req = crate::channel::ExecRequest {
        argv: vec!["/bin/sh".into(), "-c".into(), WARM_UP.into()],
        timeout: Some(std::time::Duration::from_secs(60)),
        ..Default::default()
    };
    let mut err = Vec::new();
    let status = vm.exec(&req, &mut |s, d| {
        if s == dough_proto::Stream::Stderr && err.len() < 4096 {
            err.extend_from_slice(d);
        }
    })?;
    match status {
        dough_proto::ExitStatus::Exited(0) => Ok(()),
        other => Err(SnapshotError::WarmUp(format!(
            "{other:?}: {}",
            String::from_utf8_lossy(&err).trim()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(backend: Backend, version: &str) -> SnapshotSpec {
        SnapshotSpec {
            image: Image {
                id: "img".into(),
                created_unix: 0,
                kernel: "/k".into(),
                initrd: "/i".into(),
                rootfs: "/r".into(),
                kernel_release: "6.1".into(),
                kernel_package: "linux-image-cloud-amd64".into(),
                suite: "bookworm".into(),
                packages: vec![],
                kernel_key: "kk".into(),
                rootfs_key: "rk".into(),
                initrd_key: "ik".into(),
                agent_sha256: "ab".repeat(32),
                env: Vec::new(),
                recipe: None,
                mem_mib: None,
            },
            accel: Resolved::Kvm,
            mem_mib: 256,
            cpus: 1,
            extra_cmdline: vec![],
            backend,
            vmm_version: version.into(),
            scratch_mib: None,
        }
    }

    #[test]
    fn keys_name_the_backend_and_its_version() {
        let q = spec(Backend::Qemu, "QEMU emulator version 7.2.22");
        let f = spec(Backend::Firecracker, "Firecracker v1.16.0");
        assert_ne!(q.key(), f.key());
        assert_ne!(
            f.key(),
            spec(Backend::Firecracker, "Firecracker v1.17.0").key(),
            "a new Firecracker release re-bakes"
        );
        let (qi, fi) = (q.inputs(), f.inputs());
        assert_eq!(qi["backend"], "qemu");
        assert_eq!(qi["qemu"], "QEMU emulator version 7.2.22");
        assert_eq!(qi["device set"], dough_vmm::DEVICE_SET);
        assert!(!qi.contains_key("firecracker"));
        assert_eq!(fi["backend"], "firecracker");
        assert_eq!(fi["firecracker"], "Firecracker v1.16.0");
        assert_eq!(fi["device set"], FC_DEVICE_SET);
        assert!(!fi.contains_key("qemu"));
    }

    /// What an interrupted bake or live snapshot left is removed — but not
    /// while another dough holds the store's lock (it may be writing it).
    #[test]
    fn interrupted_saves_are_removed_when_nobody_holds_the_lock() {
        let home = tempfile::tempdir().unwrap();
        let store = SnapshotStore::new(home.path());
        std::fs::create_dir_all(store.root().join(".tmp-live-vm-1-42/x")).unwrap();
        std::fs::create_dir_all(store.root().join("kept")).unwrap();
        let held = store.bake_lock(&mut |_| {}).unwrap();
        assert!(store.remove_interrupted().is_empty());
        drop(held);
        let removed = store.remove_interrupted();
        assert_eq!(removed, vec![store.root().join(".tmp-live-vm-1-42")]);
        assert!(store.root().join("kept").exists());
    }

    #[test]
    fn snapshots_from_before_the_choice_are_qemu() {
        let old = r#"{"key":"k","created_unix":1,"bake_secs":1.0,"inputs":{},
            "image":{"id":"i","created_unix":0,"kernel":"/k","initrd":"/i","rootfs":"/r",
            "kernel_release":"","kernel_package":"","suite":"","packages":[],"kernel_key":"",
            "rootfs_key":"","initrd_key":"","agent_sha256":""},
            "accel":"Tcg","mem_mib":256,"cpus":1,"extra_cmdline":[],"tsc_khz":null,"state_bytes":1}"#;
        let meta: SnapshotMeta = serde_json::from_str(old).unwrap();
        assert_eq!(meta.backend, Backend::Qemu);
    }
}
