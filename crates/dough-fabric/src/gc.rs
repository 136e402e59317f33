//! Exact teardown and reclaiming what a crashed or killed dough left behind.
//!
//! Every VM directory's record names the VM's VMM (pid + start time) and,
//! while some dough process is responsible for it, that owner. On every
//! start dough sweeps:
//! - a VM whose owner is gone is an orphan (a `dough run` or a `dough up`
//!   that died before handing its clones over): its VMM is killed by its
//!   verified identity — never by name — and its directory removed;
//! - a handed-over clone whose VMM has exited is marked `dead`, with the
//!   reason, and kept until `dough down`;
//! - a teardown that was interrupted (`stopping`) is finished;
//! - directories left half-created are removed.

use std::path::{Path, PathBuf};
use std::time::Duration;

use dough_vmm::process::wait_until;
use dough_vmm::ProcessId;

use crate::host::HostNet;
use crate::state::{read_record, StateError, VmDir, VmRecord, VmState};

/// Something the sweep did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Swept {
    /// An orphaned or half-torn-down VM was removed; its VMM was killed
    /// when it was still running.
    Reclaimed { id: String, killed_vmm: Option<i32> },
    /// A directory without a usable record was removed.
    StaleDir(PathBuf),
    /// A clone's VMM had exited; the clone is now marked dead.
    MarkedDead { id: String, reason: String },
    /// Network objects that belonged to no VM were removed.
    Network(dough_net::Leftovers),
    /// VMM cgroups that belonged to no VM were removed.
    Cgroups(Vec<PathBuf>),
    /// A VMM no record named (its dough was killed between spawning and
    /// recording it) was found in its VM's cgroup and killed.
    UnrecordedVmm { pid: i32, cgroup: PathBuf },
}

impl std::fmt::Display for Swept {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Swept::Reclaimed {
                id,
                killed_vmm: Some(pid),
            } => write!(f, "reclaimed orphaned VM {id} (killed its VMM, pid {pid})"),
            Swept::Reclaimed {
                id,
                killed_vmm: None,
            } => write!(f, "reclaimed orphaned VM {id} (its VMM had already exited)"),
            Swept::StaleDir(p) => write!(f, "removed stale VM directory {}", p.display()),
            Swept::Cgroups(dirs) => write!(f, "removed {} leftover VMM cgroup(s): {dirs:?}", dirs.len()),
            Swept::UnrecordedVmm { pid, cgroup } => write!(
                f,
                "killed pid {pid}, a VMM no record named, found in the leftover cgroup {}",
                cgroup.display()
            ),
            Swept::Network(l) => write!(
                f,
                "removed leftover network objects: netns {:?}, veths {:?}, rules tagged {:?}",
                l.netns, l.veths, l.tags
            ),
            Swept::MarkedDead { id, reason } => write!(
                f,
                "VM {id} is dead: {reason} (`dough down {id}` removes it, `dough logs {id}` shows its console)"
            ),
        }
    }
}

/// Kill a VM's VMM (or gateway) by its verified identity and wait for it
/// to go. Returns the pid when something was killed.
pub fn kill_vmm(vmm: Option<&ProcessId>) -> Option<i32> {
    let vmm = vmm?;
    if vmm.kill().is_err() {
        return None;
    }
    wait_until(Duration::from_secs(5), || !vmm.is_alive());
    Some(vmm.pid)
}

/// Remove a VM's network — its gateway process (by verified identity),
/// netns, veth, tagged rules — and its VMM's cgroup, logging failures: the
/// leftover sweep retries what this could not do. Its VMM is gone.
pub fn teardown_net(rec: &VmRecord, net: &HostNet) {
    kill_vmm(rec.gateway.as_ref());
    if let Some(plan) = &rec.net {
        if let Err(e) = dough_net::teardown(&mut **net.ops(), plan) {
            tracing::warn!(vm = %rec.id, "network teardown: {e}");
        }
    }
    if let Some(cg) = &rec.cgroup {
        if let Err(e) = cg.remove(Duration::from_secs(2)) {
            tracing::warn!(vm = %rec.id, "{e}");
        }
    }
}

/// Stop a VM exactly: ask its VMM to quit (QEMU: QMP `quit`), then SIGKILL the
/// recorded pid if it is still our process, then remove its directory.
/// The caller has moved the record to `stopping`.
pub fn stop_and_remove(
    dir: &VmDir,
    rec: &VmRecord,
    net: &HostNet,
) -> Result<Option<i32>, StateError> {
    let mut killed = None;
    if let Some(vmm) = rec.vmm.filter(|v| v.is_alive()) {
        crate::backend::vmm(rec.backend).ask_to_quit(&dir.paths, &mut || !vmm.is_alive());
        killed = kill_vmm(Some(&vmm)).or(Some(vmm.pid));
    }
    teardown_net(rec, net);
    match std::fs::remove_dir_all(dir.dir()) {
        Ok(()) => Ok(killed),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(killed),
        Err(source) => Err(StateError::Io {
            path: dir.dir().to_path_buf(),
            source,
        }),
    }
}

/// Look at every VM under `vms` and clean up as described in the module
/// documentation. VMs owned by live dough processes are left alone.
pub fn sweep(vms: &Path, net: &HostNet) -> Vec<Swept> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(vms) else {
        return out;
    };
    for e in rd.flatten() {
        let path = e.path();
        if !path.is_dir() {
            continue;
        }
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(id) = name.strip_prefix(".new-") {
            // Half-created: the record is written before the rename, so
            // only a crash leaves one behind; skip those a live dough is
            // making right now.
            let owner_alive = read_record(&path)
                .ok()
                .and_then(|r| r.owner)
                .is_some_and(|o| o.is_alive());
            if !owner_alive && old_enough(&path) && std::fs::remove_dir_all(&path).is_ok() {
                tracing::info!(vm = id, "removed half-created VM directory");
                out.push(Swept::StaleDir(path));
            }
            continue;
        }
        let dir = VmDir::at(vms, &name);
        if !path.join("state.json").is_file() || !path.join("lock").is_file() {
            // No record (or no lock to take): a crash between creation
            // steps, or a directory half-removed.
            if old_enough(&path) && std::fs::remove_dir_all(&path).is_ok() {
                out.push(Swept::StaleDir(path));
            }
            continue;
        }
        if let Some(s) = sweep_one(&dir, net) {
            out.push(s);
        }
    }
    if let Some(l) = sweep_network(vms, net) {
        out.push(Swept::Network(l));
    }
    if let Some(layout) = crate::cgroup::layout() {
        // Looked at when each cgroup is (a VM made meanwhile is live).
        let live = |id: &str| vms.join(id).exists();
        let swept = crate::cgroup::sweep(layout, &crate::host::net_scope(vms), &live);
        for (pid, cgroup) in swept.killed {
            out.push(Swept::UnrecordedVmm { pid, cgroup });
        }
        if !swept.removed.is_empty() {
            out.push(Swept::Cgroups(swept.removed));
        }
    }
    out
}

/// Remove this VM directory's network objects that no VM record names
/// (and veths any dough abandoned half-made). Skipped, with a log line,
/// where networking is not available (not root).
fn sweep_network(vms: &Path, net: &HostNet) -> Option<dough_net::Leftovers> {
    let _net = net
        .lock()
        .map_err(|e| tracing::debug!("network sweep skipped: {e}"))
        .ok()?;
    let live = crate::state::list_ids(vms);
    let mut ops = net.ops();
    let scope = crate::host::net_scope(vms);
    let found = dough_net::find_leftovers(&mut **ops, &scope, &live)
        .map_err(|e| tracing::debug!("network sweep skipped: {e}"))
        .ok()?;
    let mut found = found;
    // Scopes whose VM directory no longer exists (a deleted dough home):
    // nothing of theirs can be live.
    for e in std::fs::read_dir(net.scopes_dir())
        .into_iter()
        .flatten()
        .flatten()
    {
        // Gone only when the recorded absolute path certainly does not
        // exist (not on a permission error or an unreadable record).
        let gone_dir = std::fs::read(e.path())
            .ok()
            .map(|p| std::path::PathBuf::from(String::from_utf8_lossy(&p).into_owned()))
            .filter(|p| p.is_absolute())
            .is_some_and(|p| matches!(p.try_exists(), Ok(false)));
        let s = e.file_name().to_string_lossy().into_owned();
        if gone_dir && s != scope {
            if let Ok(l) = dough_net::find_leftovers(&mut **ops, &s, &[]) {
                found.netns.extend(l.netns);
                found.tags.extend(l.tags);
            }
            let _ = std::fs::remove_file(e.path());
        }
    }
    if found.is_empty() {
        return None;
    }
    if let Err(e) = dough_net::remove_leftovers(&mut **ops, &found) {
        tracing::warn!("removing leftover network objects: {e}");
    }
    Some(found)
}

/// A directory with no usable record is only stale once it is not
/// brand new (another dough may be between mkdir and its first write).
fn old_enough(p: &Path) -> bool {
    std::fs::metadata(p)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_none_or(|age| age > Duration::from_secs(30))
}

fn sweep_one(dir: &VmDir, net: &HostNet) -> Option<Swept> {
    let Ok(_lock) = dir.lock() else {
        return None;
    };
    let rec = match dir.read() {
        Ok(r) => r,
        Err(StateError::Corrupt { .. }) => {
            let p = dir.dir().to_path_buf();
            return std::fs::remove_dir_all(&p).ok().map(|_| Swept::StaleDir(p));
        }
        Err(_) => return None,
    };
    // A `down` in progress owns the VM it is stopping, so an interrupted
    // one shows up here as an orphan too.
    let orphan = rec.owner.is_some_and(|o| !o.is_alive());
    if orphan {
        let killed_vmm = kill_vmm(rec.vmm.as_ref());
        teardown_net(&rec, net);
        return std::fs::remove_dir_all(dir.dir())
            .ok()
            .map(|_| Swept::Reclaimed {
                id: rec.id.clone(),
                killed_vmm,
            });
    }
    if rec.owner.is_none() && rec.state.has_vmm() && !rec.vmm.is_some_and(|v| v.is_alive()) {
        let reason = match rec.vmm {
            Some(v) => format!("its VMM (pid {}) exited", v.pid),
            None => "it has no VMM".to_string(),
        };
        let mut rec = rec;
        rec.transition(VmState::Dead).ok()?;
        rec.dead_reason = Some(reason.clone());
        crate::state::write_record(dir.dir(), &rec).ok()?;
        return Some(Swept::MarkedDead { id: rec.id, reason });
    }
    None
}

/// Tear down every VM this process owns (on Ctrl-C). Threads still
/// starting VMs are blocked from spawning more while it runs.
pub fn reclaim_mine(vms: &Path, net: &HostNet) -> Vec<Swept> {
    // VM directories appear under the network lock: holding it, no thread
    // of ours can create one behind this sweep's back.
    let _no_creation = net.lock().ok();
    let _no_spawns = crate::host::SPAWNING.write();
    let me = crate::host::me();
    let mut out = Vec::new();
    for id in crate::state::list_ids(vms) {
        let dir = VmDir::at(vms, &id);
        let Ok(_lock) = dir.lock() else {
            continue;
        };
        let Ok(rec) = dir.read() else { continue };
        if rec.owner == Some(me) {
            let killed_vmm = kill_vmm(rec.vmm.as_ref());
            teardown_net(&rec, net);
            if std::fs::remove_dir_all(dir.dir()).is_ok() {
                out.push(Swept::Reclaimed { id, killed_vmm });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{VmKind, VmRecord};
    use dough_vmm::Resolved;

    fn sleeper() -> (std::process::Child, ProcessId) {
        let child = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        let id = ProcessId::of(child.id() as i32).unwrap();
        (child, id)
    }

    fn vm(vms: &Path, id: &str, f: impl FnOnce(&mut VmRecord)) -> VmDir {
        let mut rec = VmRecord::new(id, VmKind::Clone, Resolved::Tcg, 256, 1);
        f(&mut rec);
        VmDir::create(vms, &rec, |p| p.channel.clone()).unwrap()
    }

    fn dead_owner() -> ProcessId {
        ProcessId {
            pid: crate::host::me().pid,
            start_ticks: crate::host::me().start_ticks + 1,
        }
    }

    #[test]
    fn sweep_reclaims_orphans_marks_dead_clones_and_keeps_live_ones() {
        let vms = tempfile::tempdir().unwrap();
        let v = vms.path();
        // An orphan of a crashed `up`: its VMM (a sleep) runs, its owner is gone.
        let (mut orphan_child, orphan_vmm) = sleeper();
        vm(v, "vm-orphan", |r| {
            r.state = VmState::Starting;
            r.owner = Some(dead_owner());
            r.vmm = Some(orphan_vmm);
        });
        // A handed-over clone whose VMM died.
        let (mut dead_child, dead_vmm) = sleeper();
        dead_child.kill().unwrap();
        dead_child.wait().unwrap();
        vm(v, "vm-dead", |r| {
            r.state = VmState::Ready;
            r.owner = None;
            r.vmm = Some(dead_vmm);
        });
        // A handed-over clone that is fine.
        let (mut live_child, live_vmm) = sleeper();
        vm(v, "vm-live", |r| {
            r.state = VmState::Ready;
            r.owner = None;
            r.vmm = Some(live_vmm);
        });
        // A VM of ours (a live owner) that is still creating.
        vm(v, "vm-mine", |_| {});
        // An interrupted `down` (it owns what it stops).
        vm(v, "vm-stopping", |r| {
            r.state = VmState::Stopping;
            r.owner = Some(dead_owner());
        });
        // Another dough is creating this one right now: left alone.
        std::fs::create_dir(v.join(".new-vm-busy")).unwrap();

        let (_run, _fake, net) = crate::host::fake_host_net();
        let mut got = sweep(v, &net);
        got.sort_by_key(|s| format!("{s:?}"));
        assert_eq!(
            got,
            vec![
                Swept::MarkedDead {
                    id: "vm-dead".into(),
                    reason: format!("its VMM (pid {}) exited", dead_vmm.pid)
                },
                Swept::Reclaimed {
                    id: "vm-orphan".into(),
                    killed_vmm: Some(orphan_vmm.pid)
                },
                Swept::Reclaimed {
                    id: "vm-stopping".into(),
                    killed_vmm: None
                },
            ]
        );
        assert!(
            !orphan_child.wait().unwrap().success(),
            "orphan's VMM killed"
        );
        let dead = VmDir::open(v, "vm-dead").unwrap().read().unwrap();
        assert_eq!(dead.state, VmState::Dead);
        assert!(dead.dead_reason.unwrap().contains("exited"));
        assert!(live_vmm.is_alive());
        assert_eq!(
            crate::state::list_ids(v),
            vec!["vm-dead", "vm-live", "vm-mine"]
        );
        assert!(v.join(".new-vm-busy").exists());
        // A second sweep has nothing left to do.
        assert_eq!(sweep(v, &net), vec![]);

        let mine = reclaim_mine(v, &net);
        assert_eq!(
            mine,
            vec![Swept::Reclaimed {
                id: "vm-mine".into(),
                killed_vmm: None
            }]
        );
        live_child.kill().unwrap();
        live_child.wait().unwrap();
    }

    #[test]
    fn a_reused_pid_is_not_killed() {
        let vms = tempfile::tempdir().unwrap();
        let (mut child, real) = sleeper();
        // Same pid, different start time: a different process.
        vm(vms.path(), "vm-x", |r| {
            r.state = VmState::Ready;
            r.owner = Some(dead_owner());
            r.vmm = Some(ProcessId {
                start_ticks: real.start_ticks + 5,
                ..real
            });
        });
        let (_run, _fake, net) = crate::host::fake_host_net();
        assert_eq!(
            sweep(vms.path(), &net),
            vec![Swept::Reclaimed {
                id: "vm-x".into(),
                killed_vmm: None
            }]
        );
        assert!(real.is_alive(), "the unrelated process must survive");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// The sweep against a fake host network: an orphan's recorded network
    /// is torn down with it, and network objects of this VM directory's
    /// scope that no record names are found and removed.
    #[test]
    fn sweep_removes_orphan_and_leftover_networks() {
        use dough_net::{Egress, InUse, NetPlan};
        let vms = tempfile::tempdir().unwrap();
        let v = vms.path();
        let (_run, fake, net) = crate::host::fake_host_net();
        let pool = dough_net::plan::DEFAULT_POOL.parse().unwrap();
        let scope = crate::host::net_scope(v);
        let mut used = InUse::default();
        let orphan = NetPlan::new(&scope, "vm-orphan", Egress::Nat, pool, 0, &used).unwrap();
        used.add(&orphan);
        let ghost = NetPlan::new(&scope, "vm-ghost", Egress::Nat, pool, 0, &used).unwrap();
        for p in [&orphan, &ghost] {
            dough_net::setup(&mut **net.ops(), p, pool).unwrap();
        }
        vm(v, "vm-orphan", |r| {
            r.state = VmState::Ready;
            r.owner = Some(dead_owner());
            r.net = Some(orphan.clone());
        });
        assert!(!fake.lock().unwrap().is_clean());
        let got = sweep(v, &net);
        assert!(
            got.contains(&Swept::Reclaimed {
                id: "vm-orphan".into(),
                killed_vmm: None
            }),
            "{got:?}"
        );
        let Some(Swept::Network(l)) = got.iter().find(|s| matches!(s, Swept::Network(_))) else {
            panic!("the ghost's network was not found: {got:?}");
        };
        assert_eq!(l.netns, vec![ghost.netns.clone()]);
        assert!(
            fake.lock().unwrap().is_clean(),
            "{:?}",
            fake.lock().unwrap()
        );
    }
}
