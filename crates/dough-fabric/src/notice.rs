//! Notices for the user (a retry, a one-time check that takes a while).
//! The library does not print: it hands each notice to the sink the
//! program installed (the CLI prints `dough: ...` on stderr), or, with no
//! sink, to `tracing`.

use std::sync::OnceLock;

static SINK: OnceLock<fn(&str)> = OnceLock::new();

/// Install where notices go (once; later calls are ignored).
pub fn set_sink(sink: fn(&str)) {
    let _ = SINK.set(sink);
}

/// Tell the user `msg`.
pub fn notice(msg: &str) {
    match SINK.get() {
        Some(sink) => sink(msg),
        None => tracing::info!("{msg}"),
    }
}
