//! dough-agent: PID 1 of every dough guest.
//!
//! Boots the guest (pseudo filesystems, modules, read-only root under a
//! tmpfs overlay, network), prints the ready line on the serial console and
//! serves the host over the `dough.0` virtio-serial port. It never exits:
//! if serving fails it says why on the console and starts over.

mod boot;
mod reaper;
mod serve;
mod sys;

use std::io::Write;

/// Print one line on the serial console (PID 1's stderr is /dev/console).
pub(crate) fn log(msg: &str) {
    let mut e = std::io::stderr().lock();
    let _ = writeln!(e, "dough-agent: {msg}");
}

fn main() {
    let _ = sys::set_process_name("dough-agent");
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        log(&format!(
            "panic in thread {}: {info}",
            thread.name().unwrap_or("?")
        ));
    }));
    if std::process::id() != 1 {
        eprintln!("dough-agent is the init process of a dough guest; it does not run on a host");
        std::process::exit(2);
    }
    reaper::start();
    boot::boot();
    loop {
        if std::panic::catch_unwind(serve::serve_forever).is_err() {
            log("the channel loop panicked (see above); restarting it");
        }
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}
