//! A cgroup per VMM: its CPU (the clone's vCPUs' worth of cores), memory
//! (guest RAM plus what the VMM itself needs) and number of tasks are
//! capped, so one clone spinning or leaking cannot take its neighbours'
//! share of the host.
//!
//! cgroup v2 where the host has its controllers (`cpu`, `memory`, `pids`
//! in the unified hierarchy's `cgroup.controllers`: a VMM's cgroup is
//! `<root>/dough/<scope>/<id>`); else the v1 hierarchies of the same
//! controllers, each under the cgroup dough itself runs in (so a VMM stays
//! inside whatever limits dough was started under); else none, said once.
//!
//! The VMM joins its cgroup between fork and exec (it never runs outside
//! it). The directories are recorded before they are made, removed with
//! the VM, and swept after a crash like its network.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// CPU period the quota is a share of (µs), as both versions default.
pub const CPU_PERIOD_US: u64 = 100_000;
/// Tasks (threads included) a VMM may have: QEMU's I/O pool is at most 64
/// workers, plus vCPUs and a handful of its own.
pub const PIDS_MAX: u64 = 512;
/// Memory a VMM needs beyond guest RAM, besides TCG's code cache.
pub const VMM_OVERHEAD_MIB: u64 = 256;
/// QEMU's TCG translation cache on 64-bit hosts (filled as code runs).
pub const TCG_CODE_CACHE_MIB: u64 = 1024;

/// Which cgroup interface a directory belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Version {
    V1,
    V2,
}

/// Where VMM cgroups go on this host: one directory per hierarchy (one for
/// v2; cpu, memory and pids for v1), each the parent of `dough/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub version: Version,
    /// (controller or "" for v2, the directory `dough/` is made in)
    pub bases: Vec<(String, PathBuf)>,
}

/// What a VMM may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// CPU time per period, in µs (`cpus` × the period).
    pub cpu_quota_us: u64,
    pub memory_bytes: u64,
    pub pids: u64,
}

impl Limits {
    /// For a VM of `cpus` vCPUs and `mem_mib` of RAM; `tcg`: its VMM
    /// translates code (room for the translation cache).
    pub fn for_vm(cpus: u32, mem_mib: u32, tcg: bool) -> Limits {
        let extra = VMM_OVERHEAD_MIB + if tcg { TCG_CODE_CACHE_MIB } else { 0 };
        Limits {
            cpu_quota_us: u64::from(cpus.max(1)) * CPU_PERIOD_US,
            memory_bytes: (u64::from(mem_mib) + extra) << 20,
            pids: PIDS_MAX,
        }
    }
}

/// A VMM's cgroup, as recorded with its VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cgroup {
    pub version: Version,
    /// Its directories (one per hierarchy).
    pub dirs: Vec<PathBuf>,
    pub limits: Limits,
}

#[derive(Debug, thiserror::Error)]
#[error("cgroup {path}: {what}: {source}")]
pub struct CgroupError {
    pub path: PathBuf,
    pub what: &'static str,
    #[source]
    pub source: std::io::Error,
}

fn err<'a>(path: &'a Path, what: &'static str) -> impl FnOnce(std::io::Error) -> CgroupError + 'a {
    move |source| CgroupError {
        path: path.to_path_buf(),
        what,
        source,
    }
}

const V1_CONTROLLERS: [&str; 3] = ["cpu", "memory", "pids"];

/// `/proc/self/mountinfo` → (mount point, filesystem type, super options).
fn cgroup_mounts(mountinfo: &str) -> Vec<(PathBuf, String, String)> {
    mountinfo
        .lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let point = pre.split_whitespace().nth(4)?;
            let mut post = post.split_whitespace();
            let fstype = post.next()?.to_string();
            let _source = post.next()?;
            let opts = post.next().unwrap_or("").to_string();
            fstype
                .starts_with("cgroup")
                .then(|| (PathBuf::from(point), fstype, opts))
        })
        .collect()
}

/// This host's layout, detected once per process (None is logged once).
pub fn layout() -> Option<&'static Layout> {
    static LAYOUT: std::sync::OnceLock<Option<Layout>> = std::sync::OnceLock::new();
    LAYOUT
        .get_or_init(|| {
            let l = detect();
            if l.is_none() {
                tracing::warn!(
                    "no usable cgroups (cpu, memory and pids, v2 or v1): VMMs run without CPU, memory and task limits"
                );
            }
            l
        })
        .as_ref()
}

/// This host's layout, from its mount table, `/proc/self/cgroup` and the
/// unified hierarchy's controllers. None: no usable cgroups.
pub fn detect() -> Option<Layout> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    layout_from(&mountinfo, &own, &|p| std::fs::read_to_string(p).ok())
}

fn layout_from(
    mountinfo: &str,
    own: &str,
    read: &dyn Fn(&Path) -> Option<String>,
) -> Option<Layout> {
    let mounts = cgroup_mounts(mountinfo);
    for (point, fstype, _) in &mounts {
        if fstype != "cgroup2" {
            continue;
        }
        let ctl = read(&point.join("cgroup.controllers")).unwrap_or_default();
        let have: Vec<&str> = ctl.split_whitespace().collect();
        if V1_CONTROLLERS.iter().all(|c| have.contains(c)) {
            // The root: a cgroup with processes cannot hand controllers
            // down, so VMMs go in a tree of dough's own beside it.
            return Some(Layout {
                version: Version::V2,
                bases: vec![(String::new(), point.clone())],
            });
        }
    }
    // v1: each controller's hierarchy, under the cgroup dough runs in.
    let mut bases = Vec::new();
    for c in V1_CONTROLLERS {
        let (point, _, _) = mounts
            .iter()
            .find(|(_, t, o)| t == "cgroup" && o.split(',').any(|x| x == c))?;
        let path = own.lines().find_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, ctls, path) = (f.next()?, f.next()?, f.next()?);
            ctls.split(',').any(|x| x == c).then(|| path.to_string())
        })?;
        bases.push((c.to_string(), point.join(path.trim_start_matches('/'))));
    }
    Some(Layout {
        version: Version::V1,
        bases,
    })
}

/// The directories of VM `id`'s cgroup in `scope` (nothing made yet).
pub fn plan(layout: &Layout, scope: &str, id: &str, limits: Limits) -> Cgroup {
    Cgroup {
        version: layout.version,
        dirs: layout
            .bases
            .iter()
            .map(|(_, b)| b.join("dough").join(scope).join(id))
            .collect(),
        limits,
    }
}

/// The scope directories of `layout` (where the sweep looks).
pub fn scope_dirs(layout: &Layout, scope: &str) -> Vec<PathBuf> {
    layout
        .bases
        .iter()
        .map(|(_, b)| b.join("dough").join(scope))
        .collect()
}

fn write(path: &Path, what: &'static str, v: &str) -> Result<(), CgroupError> {
    std::fs::write(path, v).map_err(err(path, what))
}

impl Cgroup {
    /// Make the directories and set the limits.
    pub fn create(&self) -> Result<(), CgroupError> {
        let l = self.limits;
        for dir in &self.dirs {
            std::fs::create_dir_all(dir).map_err(err(dir, "creating"))?;
            if self.version == Version::V2 {
                // Each level above hands the controllers down (…/dough/<scope>/<id>).
                let mut levels: Vec<&Path> = dir.ancestors().skip(1).take(3).collect();
                levels.reverse();
                for level in levels {
                    write(
                        &level.join("cgroup.subtree_control"),
                        "enabling controllers",
                        "+cpu +memory +pids",
                    )?;
                }
            }
            // (file, value): every one a v2 cgroup has; in v1 each
            // directory is one controller's and has only its own.
            let settings: [(&str, String); 4] = match self.version {
                Version::V2 => [
                    ("cpu.max", format!("{} {CPU_PERIOD_US}", l.cpu_quota_us)),
                    ("memory.max", l.memory_bytes.to_string()),
                    // No swapping a guest's memory out behind its back.
                    ("memory.swap.max", "0".to_string()),
                    ("pids.max", l.pids.to_string()),
                ],
                Version::V1 => [
                    ("cpu.cfs_period_us", CPU_PERIOD_US.to_string()),
                    ("cpu.cfs_quota_us", l.cpu_quota_us.to_string()),
                    ("memory.limit_in_bytes", l.memory_bytes.to_string()),
                    ("pids.max", l.pids.to_string()),
                ],
            };
            for (file, value) in settings {
                let path = dir.join(file);
                match (self.version, file) {
                    // Only with swap accounting: best effort.
                    (_, "memory.swap.max") => {
                        let _ = std::fs::write(&path, &value);
                    }
                    (Version::V1, _) if !path.exists() => {}
                    _ => write(&path, "setting a limit", &value)?,
                }
            }
        }
        Ok(())
    }

    /// Open each directory's `cgroup.procs` for [`join_before_exec`].
    pub fn procs_files(&self) -> Result<Vec<OwnedFd>, CgroupError> {
        self.dirs
            .iter()
            .map(|d| {
                let p = d.join("cgroup.procs");
                std::fs::File::options()
                    .write(true)
                    .open(&p)
                    .map(OwnedFd::from)
                    .map_err(err(d, "opening cgroup.procs"))
            })
            .collect()
    }

    /// Memory the cgroup uses now (bytes), if readable.
    pub fn memory_current(&self) -> Option<u64> {
        let file = match self.version {
            Version::V2 => "memory.current",
            Version::V1 => "memory.usage_in_bytes",
        };
        self.dirs
            .iter()
            .find_map(|d| std::fs::read_to_string(d.join(file)).ok())
            .and_then(|s| s.trim().parse().ok())
    }

    /// Remove the directories (deepest first), waiting up to `deadline`
    /// for their last task to be gone. Missing is fine.
    pub fn remove(&self, deadline: Duration) -> Result<(), CgroupError> {
        for dir in &self.dirs {
            remove_dir(dir, deadline)?;
        }
        Ok(())
    }
}

/// rmdir a cgroup, retrying while a task that was killed has not left it.
pub fn remove_dir(dir: &Path, deadline: Duration) -> Result<(), CgroupError> {
    let end = Instant::now() + deadline;
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < end => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(err(dir, "removing")(e)),
        }
    }
}

/// Make the child join the cgroups whose `cgroup.procs` files are `fds`
/// (written "0": the writer itself) between fork and exec.
pub fn join_before_exec(cmd: &mut std::process::Command, fds: Vec<OwnedFd>) {
    use std::os::unix::process::CommandExt;
    let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
    // SAFETY: the closure runs in the child between fork and exec; it only
    // calls write(2) on descriptors opened before the fork (kept open by
    // `fds`, which the closure owns) and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            let _keep = &fds;
            for &fd in &raw {
                if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// What [`sweep`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SweptCgroups {
    /// Directories removed.
    pub removed: Vec<PathBuf>,
    /// Processes found in them and killed: (pid, the cgroup directory).
    pub killed: Vec<(i32, PathBuf)>,
}

/// Cgroup directories in `scope` of no VM that `live` knows, removed. The
/// sweep kills recorded VMMs first, so a process still in one is a VMM no
/// record names: its dough was killed between spawning it (the VMM joins
/// its cgroup before it runs) and recording it. It is killed — by identity,
/// after checking it is still in that cgroup and that its VM still has no
/// directory (a VM's directory is made before its cgroup: one being made
/// now is seen) — and then the cgroup directory goes.
pub fn sweep(layout: &Layout, scope: &str, live: &dyn Fn(&str) -> bool) -> SweptCgroups {
    let mut out = SweptCgroups::default();
    for s in scope_dirs(layout, scope) {
        let Ok(rd) = std::fs::read_dir(&s) else {
            continue;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.starts_with("vm-") || live(&name) || !e.path().is_dir() {
                continue;
            }
            for pid in kill_members(&e.path(), &|| !live(&name)) {
                out.killed.push((pid, e.path()));
            }
            match remove_dir(&e.path(), Duration::from_secs(2)) {
                Ok(()) => out.removed.push(e.path()),
                Err(e) => tracing::warn!("leftover cgroup: {e}"),
            }
        }
    }
    out
}

/// The pids in cgroup directory `dir` (its `cgroup.procs`).
fn members(dir: &Path) -> Vec<i32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// SIGKILL every process in `dir`: each by its identity (pid + start
/// time) taken while it was listed there, only if it still is, and only
/// while `still_leftover()`.
fn kill_members(dir: &Path, still_leftover: &dyn Fn() -> bool) -> Vec<i32> {
    let mut killed = Vec::new();
    for pid in members(dir) {
        let Some(id) = dough_vmm::ProcessId::of(pid) else {
            continue;
        };
        // Listed again after its identity was taken: the identity is of a
        // member, not of a process that reused a pid that has left.
        if members(dir).contains(&pid) && still_leftover() && id.kill().is_ok() {
            killed.push(pid);
        }
    }
    killed
}

#[cfg(test)]
mod tests {
    use super::*;

    const V1_MOUNTS: &str = "\
30 25 0:26 / /sys/fs/cgroup rw - tmpfs tmpfs rw,mode=755
31 30 0:27 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
32 30 0:28 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
33 30 0:29 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
34 30 0:30 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
35 30 0:31 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    const V1_OWN: &str = "8:pids:/\n4:memory:/process_api/abc\n1:cpu:/\n0::/\n";

    #[test]
    fn a_hybrid_host_uses_v1_under_its_own_cgroups() {
        // The unified hierarchy has no controllers here (they are v1's).
        let read = |p: &Path| (p.ends_with("cgroup.controllers")).then(|| "hugetlb\n".to_string());
        let l = layout_from(V1_MOUNTS, V1_OWN, &read).unwrap();
        assert_eq!(l.version, Version::V1);
        assert_eq!(
            l.bases,
            vec![
                ("cpu".into(), PathBuf::from("/sys/fs/cgroup/cpu/")),
                (
                    "memory".into(),
                    PathBuf::from("/sys/fs/cgroup/memory/process_api/abc")
                ),
                ("pids".into(), PathBuf::from("/sys/fs/cgroup/pids/")),
            ]
        );
        let c = plan(&l, "s1", "vm-1", Limits::for_vm(2, 256, true));
        assert_eq!(
            c.dirs[1],
            PathBuf::from("/sys/fs/cgroup/memory/process_api/abc/dough/s1/vm-1")
        );
        assert_eq!(c.limits.cpu_quota_us, 200_000);
        assert_eq!(c.limits.memory_bytes, (256 + 256 + 1024) << 20);
    }

    #[test]
    fn a_unified_host_uses_v2_at_its_root() {
        let mounts = "35 30 0:31 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
        let read = |_: &Path| Some("cpuset cpu io memory hugetlb pids rdma misc\n".to_string());
        let l = layout_from(mounts, "0::/user.slice/session-1.scope\n", &read).unwrap();
        assert_eq!(l.version, Version::V2);
        assert_eq!(
            l.bases,
            vec![(String::new(), PathBuf::from("/sys/fs/cgroup"))]
        );
        assert_eq!(
            Limits::for_vm(1, 512, false).memory_bytes,
            (512 + 256) << 20
        );
    }

    #[test]
    fn no_controllers_no_layout() {
        let mounts = "35 30 0:31 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        let read = |_: &Path| Some("hugetlb\n".to_string());
        assert_eq!(layout_from(mounts, "0::/\n", &read), None);
        assert_eq!(layout_from("", "", &read), None);
    }
}
