//! A VMM must not outlive a SIGKILLed dough. A process that owns VMs
//! (`run`, `go`, `up` while it creates clones, `bake`, `bench`) starts a
//! small watchdog first: `dough watchdog`, in its own process group, whose
//! stdin is the read end of a pipe only this process holds (close-on-exec,
//! so no VMM inherits it). However this process ends — exit, panic,
//! SIGKILL — the kernel closes the write end; the watchdog reads EOF,
//! waits until its owner is really gone, and runs the same sweep every
//! dough command runs first: VMs whose owner is dead are killed by their
//! recorded identity and removed, network included. Clones that `up`
//! handed over have no owner and are left alone.
//!
//! Why a process and not the parent-death signal: the kernel sends
//! `PR_SET_PDEATHSIG` when the *thread* that forked exits, and VMMs are
//! spawned from short-lived threads inside each clone's network namespace;
//! and a handed-over clone must outlive its creator, which a death signal
//! set at spawn time could not allow.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use dough_fabric::gc;

/// The write end of the watchdog's pipe, held until this process ends.
static LIFELINE: OnceLock<OwnedFd> = OnceLock::new();

#[derive(Debug, clap::Args)]
pub struct WatchdogArgs {
    /// The pid of the dough process this watchdog outlives.
    #[arg(long)]
    pub owner: i32,
    /// Its start time (clock ticks after boot), so a reused pid is never
    /// mistaken for it.
    #[arg(long)]
    pub owner_start: u64,
}

/// Start this process's watchdog (once). Failing to start it is not
/// fatal: the next dough command's sweep reclaims orphans too.
pub fn arm(home: &Path, vms: &Path) {
    if LIFELINE.get().is_some() {
        return;
    }
    let (read, write) = match nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC) {
        Ok(p) => p,
        Err(e) => {
            return tracing::warn!("no watchdog (pipe: {e}); orphans wait for the next sweep")
        }
    };
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => return tracing::warn!("no watchdog ({e}); orphans wait for the next sweep"),
    };
    use std::os::unix::process::CommandExt;
    let me = dough_fabric::host::me();
    let spawned = Command::new(exe)
        .arg("--home")
        .arg(home)
        .arg("--vms-dir")
        .arg(vms)
        .args([
            "watchdog",
            "--owner",
            &me.pid.to_string(),
            "--owner-start",
            &me.start_ticks.to_string(),
        ])
        .stdin(Stdio::from(read))
        .stdout(Stdio::null())
        // What it reclaims is worth saying where the user is looking.
        .stderr(Stdio::inherit())
        // Not in the terminal's foreground group: Ctrl-C is dough's to
        // handle (it tears its VMs down itself).
        .process_group(0)
        .spawn();
    match spawned {
        Ok(_child) => {
            let _ = LIFELINE.set(write);
        }
        Err(e) => tracing::warn!("no watchdog ({e}); orphans wait for the next sweep"),
    }
}

/// The watchdog itself: wait for EOF on stdin, then for the owner to be
/// gone, then sweep.
pub fn run(vms: &Path, args: WatchdogArgs) -> anyhow::Result<ExitCode> {
    let stdin = std::io::stdin();
    let fd = stdin.as_raw_fd();
    let mut buf = [0u8; 64];
    loop {
        match nix::unistd::read(fd, &mut buf) {
            Ok(0) => break,
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => {}
            Err(_) => break,
        }
    }
    // EOF comes as the owner exits; the sweep only takes VMs whose owner
    // is really gone (not a zombie in its last moment either).
    let owner = dough_vmm::ProcessId {
        pid: args.owner,
        start_ticks: args.owner_start,
    };
    dough_vmm::process::wait_until(Duration::from_secs(30), || !owner.is_alive());
    for s in gc::sweep(vms, &dough_fabric::host::HostNet::linux()) {
        eprintln!("dough (watchdog of pid {}): {s}", args.owner);
    }
    Ok(ExitCode::SUCCESS)
}
