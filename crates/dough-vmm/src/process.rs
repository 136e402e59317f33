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

/// Cap every file `cmd`'s process writes at `bytes` (`RLIMIT_FSIZE`), and
/// ignore `SIGXFSZ` so a write past the cap fails (EFBIG) instead of
/// killing the process. For a VMM whose guest controls how much it writes
/// to its console file.
pub fn cap_file_size(cmd: &mut std::process::Command, bytes: u64) {
    use std::os::unix::process::CommandExt;
    let lim = libc::rlimit {
        rlim_cur: bytes,
        rlim_max: bytes,
    };
    // SAFETY: the closure runs in the child between fork and exec and only
    // makes two async-signal-safe system calls on values it owns; it
    // allocates nothing and touches no lock.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::signal(libc::SIGXFSZ, libc::SIG_IGN) == libc::SIG_ERR {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod cap_tests {
    use super::cap_file_size;

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
