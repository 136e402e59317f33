//! Zombie reaping for PID 1. One thread waits for SIGCHLD and reaps every
//! child — the agent's own commands and orphans reparented to init alike —
//! and hands each status to whoever spawned that pid. Spawning happens under
//! the same lock the reaper takes before dispatching, so a child that exits
//! at once cannot be reaped before its waiter is registered.

use std::collections::HashMap;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Mutex, OnceLock};

use nix::sys::signal::{SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

static WAITERS: OnceLock<Mutex<HashMap<i32, Sender<WaitStatus>>>> = OnceLock::new();

fn waiters() -> &'static Mutex<HashMap<i32, Sender<WaitStatus>>> {
    WAITERS.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Start the reaper. Must run before any other thread exists, because it
/// blocks SIGCHLD in the calling thread and threads inherit that mask
/// (children get a clean mask from std's spawn).
pub fn start() {
    // SIGIO is blocked here too, for every thread to inherit: the serving
    // thread takes it with `sys::wait_signal` (the virtio console driver
    // sends it when the host opens or closes its end of the port).
    let mut all = SigSet::empty();
    all.add(Signal::SIGCHLD);
    all.add(Signal::SIGIO);
    if let Err(e) = all.thread_block() {
        crate::log(&format!("blocking SIGCHLD and SIGIO: {e}"));
    }
    let mut set = SigSet::empty();
    set.add(Signal::SIGCHLD);
    std::thread::Builder::new()
        .name("reaper".into())
        .spawn(move || loop {
            let _ = set.wait();
            // Hold the lock while reaping: a spawn in progress holds it too,
            // and std waits for a child whose exec failed itself; reaping
            // that child here would make std's wait fail.
            let mut w = waiters().lock().unwrap_or_else(|p| p.into_inner());
            reap_all(&mut w);
        })
        .expect("spawn reaper thread");
}

fn reap_all(w: &mut HashMap<i32, Sender<WaitStatus>>) {
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(_) => return,
            Ok(status) => {
                if let Some(pid) = status.pid() {
                    if let Some(tx) = w.remove(&pid.as_raw()) {
                        let _ = tx.send(status);
                    }
                }
            }
        }
    }
}

/// Spawn a child with `spawn` and get a receiver for its exit status.
pub fn spawn<T, E>(
    spawn: impl FnOnce() -> Result<(T, u32), E>,
) -> Result<(T, u32, Receiver<WaitStatus>), E> {
    let mut w = waiters().lock().unwrap_or_else(|p| p.into_inner());
    let (child, pid) = spawn()?;
    let (tx, rx) = channel();
    w.insert(pid as i32, tx);
    Ok((child, pid, rx))
}
