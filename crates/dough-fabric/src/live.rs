//! Snapshots of live clones (`dough snapshot`, `dough fork`).
//!
//! A handed-over clone is paused with no host attached (its channel lock
//! held, so no command is running in it), and saved whole, plus a copy of
//! its scratch disk as the pause left it; then it runs on.
//!
//! - QEMU saves the device state and its RAM in one stream (a clone's RAM
//!   is a private mapping of its snapshot's memory file, which a
//!   device-state-only save cannot describe). That is made into a snapshot
//!   like a bake's ("rebake"): a VM of dough's own is restored from it with
//!   its RAM in a new shared file, greets the host as a baked guest does,
//!   is paused, and only its device state is saved.
//! - Firecracker writes a Full snapshot (device state + a memory file of
//!   what the guest sees): already a snapshot like a bake's.
//!
//! Clones of the result ("forks") map the memory file privately and share
//! its pages, as clones of a bake do, and get their own id, entropy, clock,
//! hostname, machine-id, network and channel. The snapshot is recorded with
//! its parent (the snapshot and the clone it came from), keyed by what was
//! saved of the clone, read-only.
//!
//! Secrets: a VM that received one is never snapshotted. dough cannot see
//! which values are secret, so it counts as received whatever came from
//! its own environment (`-e KEY`), an `--env-file`, or stdin (`-i`): the
//! routes `dough exec` documents for secrets. A clone that got any of
//! these is refused, with the list — not "proven clean": a value can be
//! copied anywhere in a guest, and nothing short of a fresh clone proves it
//! gone.

use std::path::Path;
use std::time::Instant;

use dough_image::cache::KeyBuilder;

use crate::backend::{Launch, LiveFiles, LiveSaved, RestoreFrom};
use crate::options::BootOptions;
use crate::snapshot::{Snapshot, SnapshotError, SnapshotMeta, SnapshotParent, SnapshotStore};
use crate::state::{now_unix, VmDir, VmKind, VmState};
use crate::vm::{FabricError, Vm};

#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    #[error(transparent)]
    Fabric(Box<FabricError>),
    #[error(transparent)]
    Snapshot(Box<SnapshotError>),
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    #[error(
        "{id} is not a clone handed over to this home (a `dough up` clone): only those can be snapshotted"
    )]
    NotAClone { id: String },
    #[error("{id} is {state}: only a ready or paused clone can be snapshotted")]
    NotReady { id: String, state: VmState },
    #[error(
        "{id} has received what may be secrets ({}): a snapshot would hand them to every fork. \
         Snapshot a clone before giving it secrets, and give each fork its own",
        .received.join(", ")
    )]
    HoldsSecrets { id: String, received: Vec<String> },
    #[error(
        "{id} was restored from snapshot {parent}, which is gone (pruned): its snapshot cannot be described"
    )]
    NoParent { id: String, parent: String },
    #[error("{id} was not restored from a snapshot")]
    NotRestored { id: String },
    #[error("saving {id}")]
    Save {
        id: String,
        #[source]
        source: crate::backend::BackendError,
    },
    #[error("writing the snapshot of {id}")]
    Io {
        id: String,
        #[source]
        source: std::io::Error,
    },
}

impl From<FabricError> for LiveError {
    fn from(e: FabricError) -> Self {
        LiveError::Fabric(Box::new(e))
    }
}

impl From<SnapshotError> for LiveError {
    fn from(e: SnapshotError) -> Self {
        LiveError::Snapshot(Box::new(e))
    }
}

/// After the snapshot, the clone is as it was (`Resume`: a running clone
/// runs on, a paused one stays paused) or paused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum After {
    Resume,
    StayPaused,
}

/// Snapshot the handed-over clone `id` (see the module documentation).
/// `say` hears progress. Returns the snapshot (an existing one when the
/// same content was saved before).
pub fn snapshot(
    vms: &Path,
    store: &SnapshotStore,
    id: &str,
    after: After,
    opts: &BootOptions,
    say: &mut dyn FnMut(&str),
) -> Result<Snapshot, LiveError> {
    let dir = VmDir::open(vms, id)?;
    let rec = dir.read()?;
    let id = rec.id.clone();
    if rec.kind != VmKind::Clone || rec.owner.is_some() {
        return Err(LiveError::NotAClone { id });
    }
    parent_of(&rec, store)?;
    // No command may be running in it, and none may start: the agent in
    // the snapshot is one with no host attached.
    let _channel = match dir.lock_channel()? {
        (g, false) => g,
        (g, true) => {
            say(&format!(
                "waiting for the command running in {id} to finish"
            ));
            g
        }
    };
    // Read again under the lock: a command with what may be secrets may
    // have run in it while this waited.
    let rec = dir.read()?;
    let parent = parent_of(&rec, store)?;
    if !matches!(rec.state, VmState::Ready | VmState::Paused) {
        return Err(LiveError::NotReady {
            id,
            state: rec.state,
        });
    }
    if !rec.vmm.is_some_and(|v| v.is_alive()) {
        return Err(LiveError::NotReady {
            id,
            state: VmState::Dead,
        });
    }
    let backend = crate::backend::vmm(rec.backend);
    let save_err = |source| LiveError::Save {
        id: id.clone(),
        source,
    };
    let was_paused = rec.state == VmState::Paused;
    let started = Instant::now();
    // Under the store's lock (taken before the clone is paused): a bake
    // that starts meanwhile would take the temporary directory for an
    // interrupted bake's and remove it.
    let _lock = store.bake_lock(say)?;
    let tmp = temp_dir(store, &id)?;
    if !was_paused {
        backend.pause(&dir.paths).map_err(save_err)?;
        dir.update(|r| r.transition(VmState::Paused))?;
    }
    let saved = save_whole(&tmp, &dir.paths, rec.vmm, &id, &parent, backend);
    // The clone is done with: it carries on as it was asked to, whatever
    // happened to the save.
    if after == After::Resume && !was_paused {
        let resumed = backend.resume(&dir.paths).map_err(save_err);
        if resumed.is_ok() {
            dir.update(|r| r.transition(VmState::Ready))?;
        }
        if let Err(e) = resumed {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
    }
    let r = saved.and_then(|(key, how)| match store.get(&key) {
        // The same content, saved before: that one stands.
        Some(existing) => Ok(existing),
        None if how == LiveSaved::Whole => {
            say(&format!("making {id}'s memory into a snapshot file"));
            rebake(vms, store, &tmp, &key, &id, &parent, opts, started)
        }
        None => install(store, &tmp, &key, &id, &parent, started),
    });
    let _ = std::fs::remove_dir_all(&tmp);
    r
}

/// Snapshot `vm`, a VM the caller owns and is done with (gobrr's round
/// workspace: a clone that ran the plan's setup and was given no secret),
/// the same way as [`snapshot`]; the VM is destroyed after it is saved.
pub fn save_vm(
    vm: Vm,
    vms: &Path,
    store: &SnapshotStore,
    opts: &BootOptions,
    say: &mut dyn FnMut(&str),
) -> Result<Snapshot, LiveError> {
    let id = vm.id.clone();
    let rec = vm.dir.read()?;
    let parent = parent_of(&rec, store)?;
    let started = Instant::now();
    let _lock = store.bake_lock(say)?;
    let tmp = temp_dir(store, &id)?;
    // The agent goes back to waiting for a host, as in a bake.
    vm.close_channel();
    let backend = crate::backend::vmm(vm.backend);
    let saved = backend
        .pause(&vm.paths)
        .map_err(|source| LiveError::Save {
            id: id.clone(),
            source,
        })
        .and_then(|()| Ok(vm.set_state(VmState::Paused)?))
        .and_then(|()| save_whole(&tmp, &vm.paths, rec.vmm, &id, &parent, backend));
    vm.destroy()?;
    let r = saved.and_then(|(key, how)| match store.get(&key) {
        Some(existing) => Ok(existing),
        None if how == LiveSaved::Whole => {
            rebake(vms, store, &tmp, &key, &id, &parent, opts, started)
        }
        None => install(store, &tmp, &key, &id, &parent, started),
    });
    let _ = std::fs::remove_dir_all(&tmp);
    r
}

/// The snapshot `rec` was restored from, once it is known that the VM
/// holds nothing that may be secret.
fn parent_of(rec: &crate::state::VmRecord, store: &SnapshotStore) -> Result<Snapshot, LiveError> {
    let id = rec.id.clone();
    if !rec.received.is_empty() {
        return Err(LiveError::HoldsSecrets {
            id,
            received: rec.received.clone(),
        });
    }
    let parent_key = rec
        .snapshot
        .clone()
        .ok_or_else(|| LiveError::NotRestored { id: id.clone() })?;
    store.get(&parent_key).ok_or(LiveError::NoParent {
        id,
        parent: parent_key,
    })
}

/// A fresh temporary directory in the store for VM `id`'s snapshot (the
/// caller holds the store's lock).
fn temp_dir(store: &SnapshotStore, id: &str) -> Result<std::path::PathBuf, LiveError> {
    let io = |source| LiveError::Io {
        id: id.to_string(),
        source,
    };
    let tmp = store
        .root()
        .join(format!(".tmp-live-{id}-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io)?;
    }
    std::fs::create_dir_all(&tmp).map_err(io)?;
    Ok(tmp)
}

/// Save the paused clone whole into `tmp` (`whole`, the stream with its
/// RAM, or `state` + `mem`, as the backend saves; `clone-scratch.img`;
/// `boot-serial.log`); its content key and what was written.
fn save_whole(
    tmp: &Path,
    paths: &dough_vmm::VmPaths,
    vmm: Option<dough_vmm::ProcessId>,
    id: &str,
    parent: &Snapshot,
    backend: &dyn crate::backend::Vmm,
) -> Result<(String, LiveSaved), LiveError> {
    let io = |source| LiveError::Io {
        id: id.to_string(),
        source,
    };
    let whole = tmp.join(WHOLE);
    let (state, mem) = (tmp.join(STATE), tmp.join(MEM));
    // The VMM (or the `cat` it runs) writes the guest's memory: far more
    // than the cap on what a clone's VMM may write, lifted while it is
    // paused and put back after.
    let _lifted = match vmm {
        Some(v) => Some(
            dough_vmm::process::lift_file_cap(&v).map_err(|e| LiveError::Io {
                id: id.to_string(),
                source: std::io::Error::other(e),
            })?,
        ),
        None => None,
    };
    let how = backend
        .save_live(
            paths,
            &LiveFiles {
                whole: &whole,
                state: &state,
                mem: &mem,
            },
        )
        .map_err(|source| LiveError::Save {
            id: id.to_string(),
            source,
        })?;
    // QEMU flushed its disks when the migration completed; the clone stays
    // paused until after this copy.
    let scratch = tmp.join(CLONE_SCRATCH);
    if parent.meta.scratch_mib.is_some() {
        crate::disk::copy_sparse(&paths.scratch, &scratch).map_err(io)?;
    }
    std::fs::copy(&paths.serial, tmp.join("boot-serial.log")).map_err(io)?;
    let mut k = KeyBuilder::new("live-snapshot-v1");
    k.str("parent", &parent.key);
    let written: &[(&str, &Path)] = match how {
        LiveSaved::Whole => &[("whole", &whole)],
        LiveSaved::StateAndMem => &[("state", &state), ("mem", &mem)],
    };
    for (name, f) in written {
        k.str(name, &dough_image::cache::sha256_file(f).map_err(io)?);
    }
    if scratch.exists() {
        k.str(
            "scratch",
            &crate::disk::sparse_sha256(&scratch).map_err(io)?,
        );
    }
    Ok((k.finish(), how))
}

const WHOLE: &str = "whole";
const STATE: &str = "state";
const MEM: &str = "mem";
const CLONE_SCRATCH: &str = "clone-scratch.img";

/// Turn the saved clone in `tmp` into a snapshot like a bake's, under
/// `key`: restore it into a VM of its own whose RAM is a new shared file
/// (`mem`), let its agent greet the host (as a bake's does), pause it and
/// save only its device state. Its clones then map `mem` privately and
/// share its pages, as clones of a bake do; the agent takes each clone's
/// own identity at its handshake.
#[allow(clippy::too_many_arguments)]
fn rebake(
    vms: &Path,
    store: &SnapshotStore,
    tmp: &Path,
    key: &str,
    id: &str,
    parent: &Snapshot,
    opts: &BootOptions,
    started: Instant,
) -> Result<Snapshot, LiveError> {
    let io = |source| LiveError::Io {
        id: id.to_string(),
        source,
    };
    let meta = &parent.meta;
    let mem = tmp.join(MEM);
    let state = tmp.join(STATE);
    let scratch = tmp.join("scratch.img");
    let helper_opts = BootOptions {
        backend: meta.backend,
        accel: meta.accel,
        mem_mib: meta.mem_mib,
        cpus: meta.cpus,
        extra_cmdline: meta.extra_cmdline.clone(),
        root_rw: false,
        egress: dough_net::Egress::None,
        brokers: Vec::new(),
        scratch: meta.scratch_mib.map(|m| crate::options::ScratchDisk {
            size_mib: m,
            source: tmp.join(CLONE_SCRATCH),
        }),
        ..opts.clone()
    };
    let helper = Vm::launch(
        vms,
        &meta.image,
        &helper_opts,
        VmKind::Bake,
        Launch::Restore(RestoreFrom {
            key: parent.key.clone(),
            state: tmp.join(WHOLE),
            mem: mem.clone(),
            tsc_khz: meta.tsc_khz,
            ram_in_state: true,
            into_mem: Some(mem.clone()),
        }),
    )?;
    helper.close_channel();
    let backend = crate::backend::vmm(meta.backend);
    let save_err = |source| LiveError::Save {
        id: id.to_string(),
        source,
    };
    backend.pause(&helper.paths).map_err(save_err)?;
    helper.set_state(VmState::Paused)?;
    backend
        .save(&helper.paths, &state, &mem)
        .map_err(save_err)?;
    if meta.scratch_mib.is_some() && std::fs::rename(&helper.paths.scratch, &scratch).is_err() {
        crate::disk::copy_sparse(&helper.paths.scratch, &scratch).map_err(io)?;
    }
    helper.destroy()?;
    for f in [WHOLE, CLONE_SCRATCH] {
        let _ = std::fs::remove_file(tmp.join(f));
    }
    install(store, tmp, key, id, parent, started)
}

/// Record the snapshot in `tmp` (`state`, `mem`, `scratch.img` when the
/// parent has a scratch disk, `boot-serial.log`) in the store under `key`,
/// with its parent, read-only.
fn install(
    store: &SnapshotStore,
    tmp: &Path,
    key: &str,
    id: &str,
    parent: &Snapshot,
    started: Instant,
) -> Result<Snapshot, LiveError> {
    let io = |source| LiveError::Io {
        id: id.to_string(),
        source,
    };
    let scratch = tmp.join("scratch.img");
    if parent.meta.scratch_mib.is_some() && !scratch.exists() {
        std::fs::rename(tmp.join(CLONE_SCRATCH), &scratch).map_err(io)?;
    }
    let state = tmp.join(STATE);
    let meta = SnapshotMeta {
        key: key.to_string(),
        created_unix: now_unix(),
        bake_secs: started.elapsed().as_secs_f64(),
        state_bytes: std::fs::metadata(&state).map_err(io)?.len(),
        parent: Some(SnapshotParent {
            snapshot: parent.key.clone(),
            vm: id.to_string(),
        }),
        ram_in_state: false,
        ..parent.meta.clone()
    };
    crate::snapshot::write_meta_and_seal(tmp, &meta)?;
    std::fs::write(tmp.join(dough_image::cache::DONE), b"").map_err(io)?;
    let dest = store.root().join(key);
    if dest.exists() {
        std::fs::remove_dir_all(&dest).map_err(io)?;
    }
    std::fs::rename(tmp, &dest).map_err(io)?;
    store.get(key).ok_or_else(|| {
        io(std::io::Error::other(format!(
            "snapshot {key} vanished after it was written"
        )))
    })
}
