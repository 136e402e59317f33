//! Tearing VMs down off their users' path.
//!
//! A VM's teardown (stop its VMM and gateway, delete its network — the
//! veth alone waits out an RCU grace period — remove its cgroup and its
//! directory) takes tens of milliseconds that whoever is done with the VM
//! (an orchestrator task on its way to its gate, a daemon answering a
//! DELETE) need not wait for. A [`Reaper`] takes such VMs and tears them
//! down on a thread of its own, one after another, and [`Reaper::finish`]
//! waits until every VM handed to it is gone.
//!
//! Exact after a crash as before: a VM waiting here is still recorded
//! under `$DOUGH_HOME/vms`, owned by this process, so if the process dies
//! first the next sweep finds it orphaned and reclaims it (and a signal's
//! teardown reclaims it with the rest of this process's VMs).

use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::Vm;

/// Tears VMs down on a thread of its own. Dropping it waits like
/// [`Reaper::finish`].
pub struct Reaper {
    hand: Option<ReaperHandle>,
    thread: Option<JoinHandle<Reaped>>,
}

/// Hands VMs to a [`Reaper`]; cloned freely, sent anywhere.
#[derive(Clone)]
pub struct ReaperHandle {
    tx: mpsc::Sender<Vm>,
}

/// What a reaper did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Reaped {
    /// VMs torn down.
    pub vms: usize,
    /// Teardowns that reported an error (logged as they happened).
    pub failed: usize,
    /// Time spent tearing down, all VMs together.
    pub busy: Duration,
}

/// Told of each VM before the reaper tears it down.
pub type Observer = Box<dyn FnMut(&Vm) + Send>;

impl Reaper {
    pub fn new() -> Reaper {
        Reaper::observed(Box::new(|_| {}))
    }

    /// A reaper that tells `before` of each VM before tearing it down.
    pub fn observed(mut before: Observer) -> Reaper {
        let (tx, rx) = mpsc::channel::<Vm>();
        let thread = std::thread::Builder::new()
            .name("dough-reaper".into())
            .spawn(move || {
                let mut done = Reaped::default();
                // Ends when every handle is gone.
                for vm in rx {
                    before(&vm);
                    let t0 = Instant::now();
                    let id = vm.id.clone();
                    if let Err(e) = vm.destroy() {
                        tracing::warn!(vm = %id, "tearing down: {e}");
                        done.failed += 1;
                    }
                    done.busy += t0.elapsed();
                    done.vms += 1;
                }
                done
            });
        match thread {
            Ok(t) => Reaper {
                hand: Some(ReaperHandle { tx }),
                thread: Some(t),
            },
            // No thread to be had: VMs are torn down where they are handed
            // over (the receiver is gone, so every send fails).
            Err(e) => {
                tracing::warn!("no reaper thread ({e}): VMs are torn down in line");
                Reaper {
                    hand: Some(ReaperHandle { tx }),
                    thread: None,
                }
            }
        }
    }

    pub fn handle(&self) -> ReaperHandle {
        self.hand.clone().expect("present until finished")
    }

    /// Wait until every VM handed over (through any handle) is torn down.
    /// Handles still held elsewhere keep it waiting: drop them first.
    pub fn finish(mut self) -> Reaped {
        self.wait()
    }

    fn wait(&mut self) -> Reaped {
        self.hand = None;
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

impl Default for Reaper {
    fn default() -> Self {
        Reaper::new()
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        self.wait();
    }
}

impl ReaperHandle {
    /// Tear `vm` down in the background; in line if the reaper is gone.
    pub fn reap(&self, vm: Vm) {
        if let Err(mpsc::SendError(vm)) = self.tx.send(vm) {
            let id = vm.id.clone();
            if let Err(e) = vm.destroy() {
                tracing::warn!(vm = %id, "tearing down: {e}");
            }
        }
    }
}

impl std::fmt::Debug for Reaper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reaper")
            .field("running", &self.thread.is_some())
            .finish()
    }
}

impl std::fmt::Debug for ReaperHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReaperHandle")
    }
}
