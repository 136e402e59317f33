//! VMs that outlive the dough that started them: listing, running commands
//! in them, and tearing them down, from any dough process.

use std::path::Path;
use std::time::Duration;

use dough_proto::{ExitStatus, Stream};

use crate::channel::{ExecRequest, HostChannel};
use crate::serial::tail;
use crate::state::{VmDir, VmRecord, VmState};
use crate::vm::FabricError;

/// What `dough ps` shows for one VM.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VmStatus {
    #[serde(flatten)]
    pub record: VmRecord,
    /// Seconds since it was created.
    pub age_secs: u64,
    /// Its VMM's proportional set size, when it runs.
    pub pss_kib: Option<u64>,
    /// What its scratch disk takes on the host (of `record.scratch_mib`).
    pub scratch_used_kib: Option<u64>,
    /// Memory its VMM's cgroup uses now (of `record.cgroup`'s limit).
    pub cgroup_memory_kib: Option<u64>,
}

/// Every VM under `vms`, oldest first.
pub fn status(vms: &Path) -> Vec<VmStatus> {
    let now = crate::state::now_unix();
    crate::state::list(vms)
        .into_iter()
        .map(|record| VmStatus {
            age_secs: now.saturating_sub(record.created_unix),
            scratch_used_kib: record.scratch_mib.and_then(|_| {
                use std::os::unix::fs::MetadataExt;
                let f = vms.join(&record.id).join("scratch.img");
                std::fs::metadata(f).ok().map(|m| m.blocks() / 2)
            }),
            cgroup_memory_kib: record
                .cgroup
                .as_ref()
                .and_then(|c| c.memory_current())
                .map(|b| b / 1024),
            pss_kib: record
                .vmm
                .filter(|v| v.is_alive())
                .and_then(|v| dough_vmm::process::pss_kib(v.pid)),
            record,
        })
        .collect()
}

/// The ready VM `id` (or unique prefix); a VM whose VMM has gone is marked
/// dead on the spot.
fn dead(rec: &VmRecord) -> FabricError {
    FabricError::Dead {
        id: rec.id.clone(),
        reason: rec
            .dead_reason
            .clone()
            .unwrap_or_else(|| "its VMM exited".into()),
    }
}

fn ready(vms: &Path, id: &str) -> Result<(VmDir, VmRecord), FabricError> {
    let dir = VmDir::open(vms, id)?;
    let rec = dir.read()?;
    if rec.kind != crate::state::VmKind::Clone || rec.owner.is_some() {
        // A bake must receive nothing but the handshake; a `run` VM or a
        // clone not yet handed over belongs to the dough running it.
        return Err(FabricError::NotReady {
            id: rec.id.clone(),
            state: rec.state,
        });
    }
    match rec.state {
        VmState::Ready => {}
        VmState::Dead => return Err(dead(&rec)),
        state => {
            return Err(FabricError::NotReady {
                id: rec.id.clone(),
                state,
            })
        }
    }
    if !rec.vmm.is_some_and(|v| v.is_alive()) {
        let rec = dir.update(|r| {
            // Another dough may have got here first.
            if r.state == VmState::Ready {
                r.transition(VmState::Dead)?;
                r.dead_reason = Some(format!(
                    "its VMM (pid {}) exited",
                    r.vmm.map(|v| v.pid).unwrap_or(0)
                ));
            }
            Ok(r.clone())
        })?;
        return Err(dead(&rec));
    }
    Ok((dir, rec))
}

/// Run a command in the ready VM `id`, as `dough run` would: connect to
/// its channel, welcome the agent afresh (clock, entropy, id), stream the
/// output to `sink`. One command at a time per VM: a second caller waits
/// (`waiting` is told when it has to).
pub fn exec(
    vms: &Path,
    id: &str,
    req: &ExecRequest,
    sink: &mut dyn FnMut(Stream, &[u8]),
    waiting: &mut dyn FnMut(&str),
) -> Result<ExitStatus, FabricError> {
    exec_with(vms, id, req, Exec::default(), sink, waiting)
}

/// What [`exec_with`] does besides [`exec`].
#[derive(Default)]
pub struct Exec<'a> {
    /// The command's stdin, read and sent as it comes (instead of the
    /// request's own `stdin`).
    pub stdin: Option<&'a mut dyn std::io::Read>,
    /// Told, once the command is about to start, how to signal it.
    pub started: Option<&'a mut dyn FnMut(crate::channel::Signaller)>,
}

impl std::fmt::Debug for Exec<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exec")
            .field("stdin", &self.stdin.is_some())
            .field("started", &self.started.is_some())
            .finish()
    }
}

/// [`exec`], with stdin streamed from a reader and/or a way to signal the
/// command while it runs.
pub fn exec_with(
    vms: &Path,
    id: &str,
    req: &ExecRequest,
    with: Exec<'_>,
    sink: &mut dyn FnMut(Stream, &[u8]),
    waiting: &mut dyn FnMut(&str),
) -> Result<ExitStatus, FabricError> {
    let (dir, rec) = ready(vms, id)?;
    let _channel = match dir.lock_channel()? {
        (g, false) => g,
        (g, true) => {
            waiting(&rec.id);
            g
        }
    };
    // Generous: many doughs may be talking to busy TCG guests at once.
    let limit = Duration::from_secs(30);
    let chan_err = |source| FabricError::Channel {
        vm: rec.id.clone(),
        source,
        serial_tail: tail(&dir.paths.serial, 25),
    };
    let vmm = rec.vmm;
    let (mut ch, _) = HostChannel::attach(
        &mut |left| {
            crate::backend::open_channel(&dir.paths, rec.backend, left, &mut || {
                !vmm.is_some_and(|v| v.is_alive())
            })
        },
        &rec.id,
        limit,
        crate::channel::FIRST_ATTACH_TRY,
    )
    .map_err(chan_err)?;
    let req = req.with_base_env(&rec.exec_env);
    if let Some(started) = with.started {
        started(ch.signaller().map_err(|e| chan_err(e.into()))?);
    }
    let r = ch.exec_from(&req, with.stdin, sink).map_err(chan_err);
    ch.shutdown();
    r
}

/// Record that VM `id` is about to receive what may be secrets (`what`
/// describes each), before it does: such a VM is never snapshotted.
pub fn note_received(vms: &Path, id: &str, what: &[String]) -> Result<(), FabricError> {
    if what.is_empty() {
        return Ok(());
    }
    let dir = VmDir::open(vms, id)?;
    dir.update(|r| {
        for w in what {
            if !r.received.contains(w) {
                r.received.push(w.clone());
            }
        }
        Ok(())
    })?;
    Ok(())
}

/// Tear down VM `id` exactly (see [`crate::gc::stop_and_remove`]). Works
/// in any state, dead included. Returns the VM's full id and the VMM pid
/// that was stopped.
pub fn down(vms: &Path, id: &str, net: &crate::host::HostNet) -> Downed {
    let dir = VmDir::open(vms, id)?;
    let rec = dir.update(|r| {
        if r.state != VmState::Stopping {
            r.transition(VmState::Stopping)?;
        }
        // This dough now answers for it: if it dies half-way, the next
        // sweep sees an orphan and finishes the job; a live one is left be.
        r.owner = Some(crate::host::me());
        Ok(r.clone())
    })?;
    Ok((rec.id.clone(), crate::gc::stop_and_remove(&dir, &rec, net)?))
}

/// What [`down`] returns: the VM's full id and the VMM pid it stopped.
pub type Downed = Result<(String, Option<i32>), FabricError>;

/// How many VMs [`down_many`] tears down at once.
pub const DOWN_WORKERS: usize = 8;

/// [`down`] each of `ids`, [`DOWN_WORKERS`] at a time, each worker with a
/// host network of its own (`make_net`) so that their network teardowns
/// (an RCU grace period each, for the veth) overlap too. `done` hears of
/// each as it finishes.
pub fn down_many(
    vms: &Path,
    ids: &[String],
    make_net: &(dyn Fn() -> crate::host::HostNet + Sync),
    done: &(dyn Fn(&str, Downed) + Sync),
) {
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..DOWN_WORKERS.min(ids.len()) {
            s.spawn(|| {
                let net = make_net();
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(id) = ids.get(i) else { break };
                    done(id, down(vms, id, &net));
                }
            });
        }
    });
}

/// Ids of every VM under `vms` that no other live dough is responsible
/// for (a running `dough run`, an `up` still restoring, a bake), and those
/// it skipped with the owner's pid.
pub fn unowned_ids(vms: &Path) -> (Vec<String>, Vec<(String, i32)>) {
    let me = crate::host::me();
    let mut free = Vec::new();
    let mut busy = Vec::new();
    for r in crate::state::list(vms) {
        match r.owner {
            Some(o) if o != me && o.is_alive() => busy.push((r.id, o.pid)),
            _ => free.push(r.id),
        }
    }
    (free, busy)
}

/// Stop VM `id`'s vCPUs (`dough pause`): it keeps its memory, network and
/// processes but uses no CPU until [`resume`]. Only a ready VM can be
/// paused; a command running in it waits with it (and may reach its
/// deadline). Returns the VM's full id.
pub fn pause(vms: &Path, id: &str) -> Result<String, FabricError> {
    pause_or_resume(vms, id, VmState::Ready, VmState::Paused)
}

/// Let a paused VM run again (`dough resume`).
pub fn resume(vms: &Path, id: &str) -> Result<String, FabricError> {
    pause_or_resume(vms, id, VmState::Paused, VmState::Ready)
}

fn pause_or_resume(
    vms: &Path,
    id: &str,
    from: VmState,
    to: VmState,
) -> Result<String, FabricError> {
    let dir = VmDir::open(vms, id)?;
    let rec = dir.read()?;
    // Like `exec`: a clone handed over to the home, not a VM another dough
    // is driving (a `run`, a bake, an `up` still restoring).
    let handed_over = rec.kind == crate::state::VmKind::Clone && rec.owner.is_none();
    if rec.state == to && handed_over {
        return Ok(rec.id); // Already there.
    }
    if rec.state != from || !handed_over {
        return Err(FabricError::NotReady {
            id: rec.id.clone(),
            state: rec.state,
        });
    }
    if !rec.vmm.is_some_and(|v| v.is_alive()) {
        return Err(dead(&rec));
    }
    let backend = crate::backend::vmm(rec.backend);
    let done = if to == VmState::Paused {
        backend.pause(&dir.paths)
    } else {
        backend.resume(&dir.paths)
    };
    done.map_err(|source| FabricError::Backend {
        vm: rec.id.clone(),
        source,
    })?;
    // The record moves only from the state checked above (a concurrent
    // pause or `down` makes this one an error, not a lie).
    dir.update(|r| {
        if r.state != from {
            return Err(crate::state::StateError::Transition {
                id: r.id.clone(),
                from: r.state,
                to,
            });
        }
        r.transition(to)
    })?;
    Ok(rec.id)
}
