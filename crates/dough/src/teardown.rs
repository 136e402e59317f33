//! This process's part in leaving nothing behind: the sweep every command
//! starts with, and tearing this process's VMs down on a signal.

use std::path::Path;

use dough_fabric::gc;

/// Reclaim what crashed dough processes left behind and mark clones whose
/// VMM died, saying what was done.
pub fn sweep(vms: &Path) {
    for s in gc::sweep(vms, &dough_fabric::host::HostNet::linux()) {
        eprintln!("dough: {s}");
    }
}

static TEARING_DOWN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether a signal is tearing this process's VMs down (errors the main
/// thread sees meanwhile are a consequence, not news: the signal thread
/// reports and exits).
pub fn tearing_down() -> bool {
    TEARING_DOWN.load(std::sync::atomic::Ordering::SeqCst)
}

/// On SIGINT/SIGTERM/SIGHUP, tear down this process's VMs and exit 130.
/// Must be called before any other thread starts (it sets the signal mask).
pub fn install_teardown_on_signal(vms: &Path) {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        set.add(s);
    }
    if set.thread_block().is_err() {
        return;
    }
    let vms = vms.to_path_buf();
    std::thread::spawn(move || {
        if let Ok(sig) = set.wait() {
            TEARING_DOWN.store(true, std::sync::atomic::Ordering::SeqCst);
            eprintln!("dough: {sig}; tearing down");
            gc::reclaim_mine(&vms, &dough_fabric::host::HostNet::linux());
            std::process::exit(130);
        }
    });
}
