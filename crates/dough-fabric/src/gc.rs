//! Exact ownership records and reclaiming what a dead dough left behind.
//!
//! Each VM directory holds `vmm.json` (the VMM's pid and start time) and
//! `owner.json` (the dough process that started it). A VM whose owner is
//! gone is an orphan: its VMM is killed by its verified identity — never by
//! name — and its directory removed.

use std::path::{Path, PathBuf};

use dough_vmm::ProcessId;

const VMM_FILE: &str = "vmm.json";
const OWNER_FILE: &str = "owner.json";

/// Identity of this dough process.
pub fn me() -> ProcessId {
    let pid = std::process::id() as i32;
    ProcessId::of(pid).unwrap_or(ProcessId {
        pid,
        start_ticks: 0,
    })
}

/// Create a VM directory that already names its owner when it appears
/// (made under a dot-name, then renamed), so a concurrent dough never sees
/// it without an owner and mistakes it for an orphan.
pub fn create_owned_dir(dir: &Path) -> std::io::Result<()> {
    let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("vm");
    let parent = dir.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)?;
    let tmp = parent.join(format!(".new-{name}"));
    std::fs::create_dir(&tmp)?;
    write_json(&tmp.join(OWNER_FILE), &me())?;
    std::fs::rename(&tmp, dir)
}

/// Record a VM's VMM process in its directory.
pub fn record_vmm(dir: &Path, vmm: &ProcessId) -> std::io::Result<()> {
    write_json(&dir.join(VMM_FILE), vmm)
}

fn write_json(path: &Path, id: &ProcessId) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec(id).map_err(std::io::Error::other)?)?;
    std::fs::rename(tmp, path)
}

fn read_id(path: &Path) -> Option<ProcessId> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// What [`reclaim`] did to one VM directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reclaimed {
    pub dir: PathBuf,
    /// The VMM was still running and was killed.
    pub killed_vmm: Option<i32>,
}

/// Kill and remove every VM under `vms_dir` that `select` picks, given the
/// VM's owner (None when the record is missing or unreadable).
fn reclaim(vms_dir: &Path, mut select: impl FnMut(Option<&ProcessId>) -> bool) -> Vec<Reclaimed> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(vms_dir) else {
        return out;
    };
    for e in rd.flatten() {
        let dir = e.path();
        if !dir.is_dir() {
            continue;
        }
        let owner = read_id(&dir.join(OWNER_FILE));
        let in_creation = dir
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.'));
        if owner.is_none() && in_creation {
            // Another dough is between mkdir and writing the owner record.
            continue;
        }
        if !select(owner.as_ref()) {
            continue;
        }
        let mut killed_vmm = None;
        if let Some(vmm) = read_id(&dir.join(VMM_FILE)) {
            if vmm.kill().is_ok() {
                killed_vmm = Some(vmm.pid);
                dough_vmm::process::wait_until(std::time::Duration::from_secs(5), || {
                    !vmm.is_alive()
                });
            }
        }
        if std::fs::remove_dir_all(&dir).is_ok() {
            out.push(Reclaimed { dir, killed_vmm });
        }
    }
    out
}

/// Reclaim VMs whose owning dough process no longer exists (or that have
/// no owner record, e.g. a crash before it was written).
pub fn reclaim_orphans(vms_dir: &Path) -> Vec<Reclaimed> {
    reclaim(vms_dir, |owner| !owner.is_some_and(|o| o.is_alive()))
}

/// Reclaim every VM this process owns (used on Ctrl-C).
pub fn reclaim_mine(vms_dir: &Path) -> Vec<Reclaimed> {
    let me = me();
    reclaim(vms_dir, |owner| owner == Some(&me))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orphans_are_killed_by_identity_and_removed_and_live_ones_kept() {
        let vms = tempfile::tempdir().unwrap();
        // An orphan: its VMM (a sleep) runs, its owner is a dead process.
        let mut child = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        let vmm = ProcessId::of(child.id() as i32).unwrap();
        let orphan = vms.path().join("vm-orphan");
        std::fs::create_dir(&orphan).unwrap();
        write_json(&orphan.join(VMM_FILE), &vmm).unwrap();
        write_json(
            &orphan.join(OWNER_FILE),
            &ProcessId {
                pid: me().pid,
                start_ticks: me().start_ticks + 1,
            },
        )
        .unwrap();
        // A VM of ours: must survive orphan collection.
        let mine = vms.path().join("vm-mine");
        std::fs::create_dir(&mine).unwrap();
        write_json(&mine.join(OWNER_FILE), &me()).unwrap();
        // Half-made directory without records.
        std::fs::create_dir(vms.path().join("vm-half")).unwrap();
        // A directory another dough is creating right now: left alone.
        std::fs::create_dir(vms.path().join(".new-vm-busy")).unwrap();
        create_owned_dir(&vms.path().join("vm-fresh")).unwrap();
        assert!(!vms.path().join(".new-vm-fresh").exists());

        let got = reclaim_orphans(vms.path());
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(got.iter().any(|r| r.killed_vmm == Some(vmm.pid)));
        let st = child.wait().unwrap();
        assert!(!st.success(), "the orphan's VMM was killed");
        assert!(!orphan.exists());
        assert!(mine.exists());
        assert!(vms.path().join(".new-vm-busy").exists());

        let got = reclaim_mine(vms.path());
        assert_eq!(got.len(), 2, "vm-mine and vm-fresh: {got:?}");
        assert!(!mine.exists());
    }

    #[test]
    fn a_reused_pid_is_not_killed() {
        let vms = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        let real = ProcessId::of(child.id() as i32).unwrap();
        let dir = vms.path().join("vm-x");
        std::fs::create_dir(&dir).unwrap();
        // Same pid, different start time: a different process.
        write_json(
            &dir.join(VMM_FILE),
            &ProcessId {
                start_ticks: real.start_ticks + 5,
                ..real
            },
        )
        .unwrap();
        let got = reclaim_orphans(vms.path());
        assert_eq!(
            got,
            vec![Reclaimed {
                dir: dir.clone(),
                killed_vmm: None
            }]
        );
        assert!(real.is_alive(), "the unrelated process must survive");
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
