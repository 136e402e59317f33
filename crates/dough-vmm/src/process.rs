//! VMM processes, identified by pid and start time so that teardown never
//! signals a process that merely reuses a dead VMM's pid.

use std::process::Child;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("process {0} is not ours any more (exited, or its pid was reused)")]
    NotOurs(i32),
    #[error("signalling process {pid}")]
    Signal {
        pid: i32,
        #[source]
        source: nix::Error,
    },
    #[error("process {0} did not exit within {1:?}")]
    Stuck(i32, Duration),
    #[error("changing the file-size limit of process {pid}")]
    Limit {
        pid: i32,
        #[source]
        source: nix::Error,
    },
}

/// A process's identity: pid plus its start time in clock ticks since boot
/// (field 22 of `/proc/PID/stat`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProcessId {
    pub pid: i32,
    pub start_ticks: u64,
}

impl ProcessId {
    /// Identity of the live process `pid`, if it exists.
    pub fn of(pid: i32) -> Option<ProcessId> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        Some(ProcessId {
            pid,
            start_ticks: parse_start_ticks(&stat)?,
        })
    }

    /// Whether this exact process still exists (and is not a zombie).
    pub fn is_alive(&self) -> bool {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)) else {
            return false;
        };
        parse_start_ticks(&stat) == Some(self.start_ticks) && parse_state(&stat) != Some('Z')
    }

    /// SIGKILL this process, after checking it is still the one we started.
    pub fn kill(&self) -> Result<(), ProcessError> {
        if !self.is_alive() {
            return Err(ProcessError::NotOurs(self.pid));
        }
        kill(Pid::from_raw(self.pid), Signal::SIGKILL).map_err(|source| ProcessError::Signal {
            pid: self.pid,
            source,
        })
    }
}

/// `/proc/PID/stat`: the command name is in parentheses and may contain
/// spaces or parentheses itself, so split after the last `)`.
fn fields_after_comm(stat: &str) -> Option<Vec<&str>> {
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().collect())
}

pub fn parse_start_ticks(stat: &str) -> Option<u64> {
    // Field 3 (state) is index 0 after the comm; field 22 is index 19.
    fields_after_comm(stat)?.get(19)?.parse().ok()
}

fn parse_state(stat: &str) -> Option<char> {
    fields_after_comm(stat)?.first()?.chars().next()
}

/// A VMM process this dough started.
#[derive(Debug)]
pub struct VmmProcess {
    pub id: ProcessId,
    child: Option<Child>,
}

impl VmmProcess {
    pub fn from_child(child: Child) -> Self {
        let pid = child.id() as i32;
        let id = ProcessId::of(pid).unwrap_or(ProcessId {
            pid,
            start_ticks: 0,
        });
        VmmProcess {
            id,
            child: Some(child),
        }
    }

    /// Exit status if the process has exited (reaping it).
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Kill and reap, waiting at most `limit`.
    pub fn kill_and_wait(&mut self, limit: Duration) -> Result<(), ProcessError> {
        if self.try_wait().is_some() {
            return Ok(());
        }
        match self.id.kill() {
            Ok(()) | Err(ProcessError::NotOurs(_)) => {}
            Err(e) => return Err(e),
        }
        let start = Instant::now();
        while start.elapsed() < limit {
            if self.try_wait().is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Err(ProcessError::Stuck(self.id.pid, limit))
    }
}

/// A `/proc/PID/...` figure given in kB: the first number after `key`.
fn proc_kib(file: &str, key: &str) -> Option<u64> {
    std::fs::read_to_string(file)
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Peak resident set (`VmHWM`) of `pid`, in KiB.
pub fn peak_rss_kib(pid: i32) -> Option<u64> {
    proc_kib(&format!("/proc/{pid}/status"), "VmHWM:")
}

/// Proportional set size of `pid` (pages shared with other processes, such
/// as a snapshot's memory file in the page cache, count in part), in KiB.
pub fn pss_kib(pid: i32) -> Option<u64> {
    proc_kib(&format!("/proc/{pid}/smaps_rollup"), "Pss:")
}

/// Poll `cond` every few milliseconds until it is true or `limit` passes.
pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    let mut pause = Duration::from_millis(1);
    loop {
        if cond() {
            return true;
        }
        if start.elapsed() >= limit {
            return false;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_figures_of_this_process() {
        let me = std::process::id() as i32;
        assert!(peak_rss_kib(me).unwrap() > 0);
        assert!(pss_kib(me).unwrap() > 0);
        assert_eq!(pss_kib(-1), None);
    }

    #[test]
    fn stat_parsing_survives_odd_names() {
        let stat = "1234 (we(ird) name) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 50";
        assert_eq!(parse_start_ticks(stat), Some(987654));
        assert_eq!(parse_state(stat), Some('S'));
        assert_eq!(parse_start_ticks("garbage"), None);
    }

    #[test]
    fn identity_detects_exit_and_kill_is_checked() {
        let child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let mut p = VmmProcess::from_child(child);
        assert!(p.id.is_alive());
        p.kill_and_wait(Duration::from_secs(10)).unwrap();
        assert!(!p.id.is_alive());
        assert!(matches!(p.id.kill(), Err(ProcessError::NotOurs(_))));
        // A recorded identity with the wrong start time is not ours.
        let me = ProcessId::of(std::process::id() as i32).unwrap();
        let imposter = ProcessId {
            start_ticks: me.start_ticks + 1,
            ..me
        };
        assert!(!imposter.is_alive());
        assert!(matches!(imposter.kill(), Err(ProcessError::NotOurs(_))));
    }
}

/// The soft limit on open files this process had before [`raise_nofile`]
/// raised it; 0 while it has not.
static INHERITED_NOFILE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Raise this process's soft limit on open files to its hard limit (a
/// daemon holding many VMs, their channels and its clients' connections
/// needs descriptors) and remember the old one, which the VMMs and
/// gateways it starts get back ([`inherited_nofile`]): a guest that took
/// its VMM over finds no more room than before. Returns the soft limit now
/// in force.
pub fn raise_nofile() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the one struct given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 1024;
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            // Only the first raise knows the inherited limit.
            let _ = INHERITED_NOFILE.compare_exchange(
                0,
                lim.rlim_cur,
                std::sync::atomic::Ordering::SeqCst,
                std::sync::atomic::Ordering::SeqCst,
            );
            return raised.rlim_cur;
        }
    }
    lim.rlim_cur
}

/// Give `cmd`'s process the soft limit on open files this process had
/// before [`raise_nofile`] (nothing to do if it never raised it).
pub fn inherited_nofile(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    let soft = INHERITED_NOFILE.load(std::sync::atomic::Ordering::SeqCst);
    if soft == 0 {
        return;
    }
    // SAFETY: between fork and exec, only `set_soft_limit` (two
    // async-signal-safe system calls); no allocation, no lock.
    unsafe {
        cmd.pre_exec(move || set_soft_limit(libc::RLIMIT_NOFILE, soft));
    }
}

/// Set this process's soft limit on `resource` to `to` (at most its hard
/// limit, which stays as it is). Async-signal-safe: two system calls on a
/// struct of its own, no allocation — callable between fork and exec.
fn set_soft_limit(resource: libc::__rlimit_resource_t, to: u64) -> std::io::Result<()> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the one struct given.
    if unsafe { libc::getrlimit(resource, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    lim.rlim_cur = to.min(lim.rlim_max);
    // SAFETY: as above.
    if unsafe { libc::setrlimit(resource, &lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Cap every file `cmd`'s process writes at `bytes` (`RLIMIT_FSIZE`'s soft
/// limit), and ignore `SIGXFSZ` so a write past the cap fails (EFBIG)
/// instead of killing the process. For a VMM whose guest controls how much
/// it writes to its console file. The hard limit stays as it was, so that
/// dough can lift the cap of a running VMM while it writes a snapshot
/// ([`lift_file_cap`]) without CAP_SYS_RESOURCE; the cap is against a guest
/// filling the disk through its console, and a VMM a guest took over is
/// past any file cap anyway.
pub fn cap_file_size(cmd: &mut std::process::Command, bytes: u64) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the child between fork and exec and only
    // makes three async-signal-safe system calls on values it owns; it
    // allocates nothing and touches no lock.
    unsafe {
        cmd.pre_exec(move || {
            set_soft_limit(libc::RLIMIT_FSIZE, bytes)?;
            if libc::signal(libc::SIGXFSZ, libc::SIG_IGN) == libc::SIG_ERR {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A running process's file-size cap, lifted (see [`lift_file_cap`]); put
/// back when dropped.
#[derive(Debug)]
pub struct FileCapLifted {
    id: ProcessId,
    old: libc::rlimit,
}

/// Lift the file-size cap of the running process `id` (set by
/// [`cap_file_size`]: its soft limit, raised to its hard one) until the
/// guard is dropped: a VMM writing a snapshot of its guest writes far more
/// than its console's cap (Firecracker's memory file; the `cat` QEMU's
/// migration runs inherits QEMU's cap). The guest is paused meanwhile, so
/// its console cannot use the room.
pub fn lift_file_cap(id: &ProcessId) -> Result<FileCapLifted, ProcessError> {
    if !id.is_alive() {
        return Err(ProcessError::NotOurs(id.pid));
    }
    let err = || ProcessError::Limit {
        pid: id.pid,
        source: nix::errno::Errno::last(),
    };
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: prlimit writes `old`, ours, and reads nothing.
    if unsafe { libc::prlimit(id.pid, libc::RLIMIT_FSIZE, std::ptr::null(), &mut old) } != 0 {
        return Err(err());
    }
    let lifted = libc::rlimit {
        rlim_cur: old.rlim_max,
        rlim_max: old.rlim_max,
    };
    // SAFETY: prlimit reads `lifted`, ours, and writes nothing.
    if unsafe { libc::prlimit(id.pid, libc::RLIMIT_FSIZE, &lifted, std::ptr::null_mut()) } != 0 {
        return Err(err());
    }
    Ok(FileCapLifted { id: *id, old })
}

impl Drop for FileCapLifted {
    fn drop(&mut self) {
        if self.id.is_alive() {
            // SAFETY: prlimit reads `old`, ours; writes nothing.
            unsafe {
                libc::prlimit(
                    self.id.pid,
                    libc::RLIMIT_FSIZE,
                    &self.old,
                    std::ptr::null_mut(),
                )
            };
        }
    }
}

#[cfg(test)]
mod cap_tests {
    use super::{cap_file_size, lift_file_cap, ProcessId};

    /// `Max file size` soft limit of `pid` (bytes, or "unlimited").
    fn fsize(pid: u32) -> String {
        fsize_limits(pid).0
    }

    /// `Max file size` (soft, hard) of `pid`.
    fn fsize_limits(pid: u32) -> (String, String) {
        let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
        let mut f = limits
            .lines()
            .find(|l| l.starts_with("Max file size"))
            .unwrap()
            .split_whitespace()
            .skip(3);
        (f.next().unwrap().into(), f.next().unwrap().into())
    }

    /// A capped process, its cap lifted, writes past it; dropping the
    /// guard puts the cap back.
    #[test]
    fn a_lifted_cap_lets_a_running_process_write_more_and_comes_back() {
        use std::io::{BufRead, Write};
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("mem");
        let mut cmd = std::process::Command::new("sh");
        cmd.arg("-c")
            .arg("while read x; do head -c 3000000 /dev/zero > \"$1\"; echo wrote=$?; done")
            .arg("sh")
            .arg(&f)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped());
        cap_file_size(&mut cmd, 1 << 20);
        let mut child = cmd.spawn().unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut write_once = || {
            writeln!(stdin, "go").unwrap();
            let mut line = String::new();
            out.read_line(&mut line).unwrap();
            (line, std::fs::metadata(&f).unwrap().len())
        };
        assert_eq!(fsize(child.id()), (1u64 << 20).to_string());
        let (said, len) = write_once();
        assert!(!said.starts_with("wrote=0"), "{said}");
        assert_eq!(len, 1 << 20, "capped");
        let id = ProcessId::of(child.id() as i32).unwrap();
        let lifted = lift_file_cap(&id).unwrap();
        let (soft, hard) = fsize_limits(child.id());
        assert_eq!(soft, hard, "the soft limit raised to the hard one");
        let (said, len) = write_once();
        assert_eq!((said.as_str(), len), ("wrote=0\n", 3_000_000), "lifted");
        drop(lifted);
        assert_eq!(fsize(child.id()), (1u64 << 20).to_string(), "put back");
        let (_, len) = write_once();
        assert_eq!(len, 1 << 20, "capped again");
        drop(stdin);
        child.wait().unwrap();
    }

    /// A process that writes far past the cap keeps running; its file
    /// stops at the cap.
    #[test]
    fn writes_stop_at_the_cap_and_the_writer_survives() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("console.log");
        let mut cmd = std::process::Command::new("sh");
        cmd.arg("-c")
            .arg("head -c 5000000 /dev/zero > \"$1\"; echo wrote=$?")
            .arg("sh")
            .arg(&f);
        cap_file_size(&mut cmd, 1 << 20);
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{out:?}");
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(
            said.starts_with("wrote=") && !said.starts_with("wrote=0"),
            "{said}"
        );
        assert_eq!(std::fs::metadata(&f).unwrap().len(), 1 << 20);
    }
}
