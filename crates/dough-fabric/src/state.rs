//! Per-VM state on the host: the lifecycle state machine and the record
//! (`state.json`) every VM directory carries, so separate dough processes
//! see the same VMs.
//!
//! A VM directory is `<vms>/<id>/`. It appears atomically with its record
//! (made as `.new-<id>` and renamed), and every change to the record is
//! made under an exclusive `flock` on `<id>/lock`, written to a temporary
//! file and renamed over `state.json`.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use dough_vmm::{ProcessId, Resolved, VmPaths};
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

const RECORD: &str = "state.json";
const LOCK: &str = "lock";
const CHANNEL_LOCK: &str = "channel.lock";
/// `sun_path` holds 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;

/// Where a VM is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    /// Directory and record exist; no VMM yet.
    Creating,
    /// VMM running, booting or restoring; the agent has not greeted yet.
    Starting,
    /// The agent has greeted and been welcomed; commands can run.
    Ready,
    /// vCPUs stopped (a bake between its handshake and its snapshot).
    Paused,
    /// Being torn down; the directory goes away when this finishes.
    Stopping,
    /// The VMM exited without being asked to. Kept (not silently removed)
    /// until `dough down`.
    Dead,
}

impl VmState {
    pub const ALL: [VmState; 6] = [
        VmState::Creating,
        VmState::Starting,
        VmState::Ready,
        VmState::Paused,
        VmState::Stopping,
        VmState::Dead,
    ];

    /// Whether a VMM process should be running in this state.
    pub fn has_vmm(self) -> bool {
        matches!(self, VmState::Starting | VmState::Ready | VmState::Paused)
    }
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            VmState::Creating => "creating",
            VmState::Starting => "starting",
            VmState::Ready => "ready",
            VmState::Paused => "paused",
            VmState::Stopping => "stopping",
            VmState::Dead => "dead",
        };
        f.write_str(s)
    }
}

/// The lifecycle's transition table. Anything not listed is refused.
pub fn valid_transition(from: VmState, to: VmState) -> bool {
    use VmState::*;
    matches!(
        (from, to),
        (Creating, Starting | Stopping)
            | (Starting, Ready | Dead | Stopping)
            | (Ready, Paused | Dead | Stopping)
            | (Paused, Ready | Dead | Stopping)
            | (Dead, Stopping)
    )
}

/// Why the VM exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmKind {
    /// `dough run`: lives as long as the dough that made it.
    Run,
    /// `dough up`: outlives the CLI until `dough down`.
    Clone,
    /// A VM being baked into a snapshot.
    Bake,
}

impl std::fmt::Display for VmKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VmKind::Run => "run",
            VmKind::Clone => "clone",
            VmKind::Bake => "bake",
        })
    }
}

/// `state.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    pub id: String,
    pub kind: VmKind,
    pub state: VmState,
    pub created_unix: u64,
    pub accel: Resolved,
    pub mem_mib: u32,
    pub cpus: u32,
    /// Image it runs.
    pub image: String,
    /// Snapshot it was restored from (None: cold boot).
    pub snapshot: Option<String>,
    /// The dough process responsible for it. While set, the VM dies with
    /// that process (a crashed owner's VMs are reclaimed); `None` once a
    /// clone is handed over to `$DOUGH_HOME` by `dough up`.
    pub owner: Option<ProcessId>,
    /// Its VMM, by pid and start time.
    pub vmm: Option<ProcessId>,
    /// Why it is dead, when it is.
    pub dead_reason: Option<String>,
    /// Its network (netns, TAP, veth, rules), recorded before any of it is
    /// created so that teardown and crash GC know exactly what to remove.
    #[serde(default)]
    pub net: Option<dough_net::NetPlan>,
    /// Its VMM (records written before there was a choice are QEMU's).
    #[serde(default)]
    pub backend: dough_vmm::Backend,
    /// Its egress gateway process, by pid and start time (clones with
    /// egress only).
    #[serde(default)]
    pub gateway: Option<ProcessId>,
    /// Variables every command in it gets before the caller's own (where
    /// its TLS clients find the certificates it was made to trust).
    #[serde(default)]
    pub exec_env: Vec<(String, String)>,
    /// Size of its scratch disk (`scratch.img` in its directory), if it
    /// has one.
    #[serde(default)]
    pub scratch_mib: Option<u64>,
    /// Its VMM's cgroup (recorded before it is made), where the host has
    /// cgroups.
    #[serde(default)]
    pub cgroup: Option<crate::cgroup::Cgroup>,
    /// What it was given that may be secret (values from dough's own
    /// environment, env files, stdin), as descriptions: a VM with any is
    /// never snapshotted (dough-fabric's `live` module).
    #[serde(default)]
    pub received: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("VM {id}: refusing the transition {from} → {to}")]
    Transition {
        id: String,
        from: VmState,
        to: VmState,
    },
    #[error("no VM {0} (see `dough ps`)")]
    Unknown(String),
    #[error("{0:?} matches several VMs: {1}")]
    Ambiguous(String, String),
    #[error("VM socket path {0} is longer than a Unix socket address allows (107 bytes); use a shorter --vms-dir or DOUGH_HOME")]
    PathTooLong(PathBuf),
    #[error("VM record {path} is unreadable")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("VM state under {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl VmRecord {
    pub fn new(id: &str, kind: VmKind, accel: Resolved, mem_mib: u32, cpus: u32) -> Self {
        VmRecord {
            id: id.to_string(),
            kind,
            state: VmState::Creating,
            created_unix: now_unix(),
            accel,
            mem_mib,
            cpus,
            image: String::new(),
            snapshot: None,
            owner: Some(crate::host::me()),
            vmm: None,
            dead_reason: None,
            net: None,
            backend: dough_vmm::Backend::Qemu,
            gateway: None,
            exec_env: Vec::new(),
            scratch_mib: None,
            cgroup: None,
            received: Vec::new(),
        }
    }

    /// Move to `to` if the table allows it.
    pub fn transition(&mut self, to: VmState) -> Result<(), StateError> {
        if !valid_transition(self.state, to) {
            return Err(StateError::Transition {
                id: self.id.clone(),
                from: self.state,
                to,
            });
        }
        self.state = to;
        Ok(())
    }
}

pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A VM's directory of host-side state.
#[derive(Debug, Clone)]
pub struct VmDir {
    pub id: String,
    pub paths: VmPaths,
}

impl VmDir {
    /// Create `<vms>/<id>/` holding `record`, atomically: a concurrent dough
    /// never sees the directory without its record (and owner).
    /// `longest_socket` names the longest Unix socket path the VM will use
    /// (its backend knows), checked against `sun_path` first.
    pub fn create(
        vms: &Path,
        record: &VmRecord,
        longest_socket: impl Fn(&VmPaths) -> PathBuf,
    ) -> Result<VmDir, StateError> {
        let dir = vms.join(&record.id);
        let longest = longest_socket(&VmPaths::new(&dir));
        if longest.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(StateError::PathTooLong(longest));
        }
        let tmp = vms.join(format!(".new-{}", record.id));
        let io = |source| StateError::Io {
            path: dir.clone(),
            source,
        };
        std::fs::create_dir_all(vms).map_err(io)?;
        std::fs::create_dir(&tmp).map_err(io)?;
        let r = write_record(&tmp, record)
            .and_then(|_| File::create(tmp.join(LOCK)).map(drop))
            .and_then(|_| File::create(tmp.join(CHANNEL_LOCK)).map(drop))
            .and_then(|_| std::fs::rename(&tmp, &dir));
        if let Err(e) = r {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(io(e));
        }
        Ok(VmDir::at(vms, &record.id))
    }

    /// The directory named exactly `id` (which may lack a record).
    pub(crate) fn at(vms: &Path, id: &str) -> VmDir {
        VmDir {
            id: id.to_string(),
            paths: VmPaths::new(&vms.join(id)),
        }
    }

    /// The VM whose id is `id` or starts with it.
    pub fn open(vms: &Path, id: &str) -> Result<VmDir, StateError> {
        if vms.join(id).join(RECORD).is_file() {
            return Ok(VmDir::at(vms, id));
        }
        let mut found: Vec<String> = list_ids(vms)
            .into_iter()
            .filter(|n| n.starts_with(id) && !id.is_empty())
            .collect();
        match found.len() {
            0 => Err(StateError::Unknown(id.to_string())),
            1 => Ok(VmDir::at(vms, &found.remove(0))),
            _ => Err(StateError::Ambiguous(id.to_string(), found.join(", "))),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.paths.dir
    }

    fn io(&self, source: std::io::Error) -> StateError {
        StateError::Io {
            path: self.paths.dir.clone(),
            source,
        }
    }

    pub fn read(&self) -> Result<VmRecord, StateError> {
        read_record(self.dir())
    }

    /// Hold the VM's lock (blocking) while `f` reads and changes its record.
    pub fn update<T>(
        &self,
        f: impl FnOnce(&mut VmRecord) -> Result<T, StateError>,
    ) -> Result<T, StateError> {
        let _lock = self.lock()?;
        let mut rec = self.read()?;
        let out = f(&mut rec)?;
        write_record(self.dir(), &rec).map_err(|e| self.io(e))?;
        Ok(out)
    }

    /// Move the VM to `to` (checked against the transition table).
    pub fn set_state(&self, to: VmState) -> Result<(), StateError> {
        self.update(|r| r.transition(to))
    }

    /// The VM's record lock, held until the guard drops.
    pub fn lock(&self) -> Result<Flock<File>, StateError> {
        let f = self.open_lock_file(LOCK)?;
        Flock::lock(f, FlockArg::LockExclusive).map_err(|(_, e)| self.io(e.into()))
    }

    /// Lock files are made with the directory and never recreated: opening
    /// one in a directory being removed must not resurrect the directory.
    fn open_lock_file(&self, name: &str) -> Result<File, StateError> {
        File::options()
            .write(true)
            .open(self.dir().join(name))
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => StateError::Unknown(self.id.clone()),
                _ => self.io(e),
            })
    }

    /// Serialise use of the VM's channel (its VMM accepts one connection at
    /// a time). Returns the guard, and whether we had to wait for it.
    pub fn lock_channel(&self) -> Result<(Flock<File>, bool), StateError> {
        match Flock::lock(
            self.open_lock_file(CHANNEL_LOCK)?,
            FlockArg::LockExclusiveNonblock,
        ) {
            Ok(g) => Ok((g, false)),
            Err((f, nix::errno::Errno::EWOULDBLOCK)) => Flock::lock(f, FlockArg::LockExclusive)
                .map(|g| (g, true))
                .map_err(|(_, e)| self.io(e.into())),
            Err((_, e)) => Err(self.io(e.into())),
        }
    }
}

pub(crate) fn read_record(dir: &Path) -> Result<VmRecord, StateError> {
    let path = dir.join(RECORD);
    let bytes = std::fs::read(&path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => StateError::Unknown(
            dir.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        ),
        _ => StateError::Io {
            path: path.clone(),
            source,
        },
    })?;
    serde_json::from_slice(&bytes).map_err(|source| StateError::Corrupt { path, source })
}

pub(crate) fn write_record(dir: &Path, rec: &VmRecord) -> std::io::Result<()> {
    let tmp = dir.join(".state.json.tmp");
    let bytes = serde_json::to_vec_pretty(rec).map_err(std::io::Error::other)?;
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(tmp, dir.join(RECORD))
}

/// Ids of the VM directories under `vms` (not those still being created).
pub fn list_ids(vms: &Path) -> Vec<String> {
    let mut ids: Vec<String> = std::fs::read_dir(vms)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| !n.starts_with('.'))
        .collect();
    ids.sort();
    ids
}

/// Every VM's record, oldest first (unreadable ones are skipped).
pub fn list(vms: &Path) -> Vec<VmRecord> {
    let mut out: Vec<VmRecord> = list_ids(vms)
        .iter()
        .filter_map(|id| read_record(&vms.join(id)).ok())
        .collect();
    out.sort_by(|a, b| a.created_unix.cmp(&b.created_unix).then(a.id.cmp(&b.id)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use VmState::*;

    #[test]
    fn transition_table() {
        let allowed = [
            (Creating, Starting),
            (Creating, Stopping),
            (Starting, Ready),
            (Starting, Dead),
            (Starting, Stopping),
            (Ready, Paused),
            (Ready, Dead),
            (Ready, Stopping),
            (Paused, Ready),
            (Paused, Dead),
            (Paused, Stopping),
            (Dead, Stopping),
        ];
        for from in VmState::ALL {
            for to in VmState::ALL {
                assert_eq!(
                    valid_transition(from, to),
                    allowed.contains(&(from, to)),
                    "{from} → {to}"
                );
            }
        }
        // Nothing leaves Stopping: the directory is removed instead.
        assert!(VmState::ALL
            .iter()
            .all(|&to| !valid_transition(Stopping, to)));
    }

    #[test]
    fn records_round_trip_and_refuse_bad_transitions() {
        let vms = tempfile::tempdir().unwrap();
        let rec = VmRecord::new("vm-00000001", VmKind::Clone, Resolved::Tcg, 256, 1);
        let d = VmDir::create(vms.path(), &rec, |p| p.channel.clone()).unwrap();
        assert!(!vms.path().join(".new-vm-00000001").exists());
        assert_eq!(d.read().unwrap(), rec);
        d.set_state(Starting).unwrap();
        d.set_state(Ready).unwrap();
        let e = d.set_state(Creating).unwrap_err();
        assert_eq!(
            e.to_string(),
            "VM vm-00000001: refusing the transition ready → creating"
        );
        assert_eq!(d.read().unwrap().state, Ready);
        // A second VM with the same id cannot be created over it.
        let e = VmDir::create(vms.path(), &rec, |p| p.channel.clone()).unwrap_err();
        assert!(
            matches!(&e, StateError::Io { source, .. } if matches!(source.kind(), std::io::ErrorKind::AlreadyExists | std::io::ErrorKind::DirectoryNotEmpty)),
            "{e:?}"
        );
        assert_eq!(d.read().unwrap().state, Ready);
    }

    #[test]
    fn socket_paths_that_do_not_fit_are_refused_up_front() {
        let vms = tempfile::tempdir().unwrap();
        let deep = vms.path().join("x".repeat(100));
        let rec = VmRecord::new("vm-00000001", VmKind::Clone, Resolved::Tcg, 256, 1);
        let e = VmDir::create(&deep, &rec, |p| p.channel.clone()).unwrap_err();
        assert!(matches!(e, StateError::PathTooLong(_)), "{e}");
        assert!(!deep.exists(), "nothing created");
    }

    #[test]
    fn open_by_prefix() {
        let vms = tempfile::tempdir().unwrap();
        for id in ["vm-aa01", "vm-aa02", "vm-bb01"] {
            VmDir::create(
                vms.path(),
                &VmRecord::new(id, VmKind::Clone, Resolved::Tcg, 1, 1),
                |p| p.channel.clone(),
            )
            .unwrap();
        }
        assert_eq!(VmDir::open(vms.path(), "vm-bb").unwrap().id, "vm-bb01");
        assert_eq!(VmDir::open(vms.path(), "vm-aa02").unwrap().id, "vm-aa02");
        assert!(matches!(
            VmDir::open(vms.path(), "vm-aa"),
            Err(StateError::Ambiguous(..))
        ));
        assert!(matches!(
            VmDir::open(vms.path(), "vm-cc"),
            Err(StateError::Unknown(_))
        ));
        assert!(matches!(
            VmDir::open(vms.path(), ""),
            Err(StateError::Unknown(_))
        ));
        assert_eq!(list(vms.path()).len(), 3);
    }
}
