//! Accepting the API's connections: at most `max` at once on each listener
//! (more wait in the listen backlog until one ends, rather than taking file
//! descriptors the daemon needs for its VMs; each listener has its own
//! slots, so clients on TCP cannot crowd out the Unix socket), a request's
//! head within
//! `header_timeout` (a client that connects and says nothing, or sends its
//! head a byte at a time, is cut off — also between requests on a kept-alive
//! connection), and a graceful stop: each connection finishes the request
//! it is serving, then closes.

use std::sync::Arc;
use std::time::Duration;

use axum::serve::Listener;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::sync::{watch, Semaphore};

/// How many connections at once, and how long a request's head may take.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    pub max: usize,
    pub header_timeout: Duration,
}

/// Serve `router` on `listener` until `stop` turns true; then close the
/// listener and wait for the connections to finish their requests.
pub async fn serve<L: Listener>(
    mut listener: L,
    router: Router,
    limits: ConnLimits,
    mut stop: watch::Receiver<bool>,
) where
    L::Io: Unpin,
{
    let permits = Arc::new(Semaphore::new(limits.max));
    let mut conns = tokio::task::JoinSet::new();
    loop {
        // A slot first: without one, the next client waits in the
        // kernel's backlog instead of holding a descriptor here.
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => p.expect("the semaphore is never closed"),
            _ = stop.wait_for(|s| *s) => break,
        };
        // (axum's accept retries errors such as EMFILE after a pause.)
        let io = tokio::select! {
            (io, _) = listener.accept() => io,
            _ = stop.wait_for(|s| *s) => break,
        };
        let svc = TowerToHyperService::new(router.clone());
        let conn_stop = stop.clone();
        conns.spawn(async move {
            let _permit = permit;
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout);
            let conn = http.serve_connection(TokioIo::new(io), svc);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stopped(conn_stop) => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
        while conns.try_join_next().is_some() {}
    }
    // No one new waits in the backlog while the others finish.
    drop(listener);
    while conns.join_next().await.is_some() {}
}

/// Once `stop` turns true.
async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}
