//! `dough serve`: dough as a daemon with an HTTP API (docs/api.md).
//!
//! One process owns the API; the sandboxes it makes are ordinary clones
//! handed over like `dough up`'s, so they outlive a daemon that is killed
//! and are adopted again when it restarts (its SQLite database says which
//! are its own).

mod api;
mod conn;
mod files;
mod metrics;
mod runs;
mod sandboxes;
mod store;

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use crate::cli::Ctx;
use crate::vm_args::VmArgs;
pub use api::now_unix;
pub use metrics::Metrics;

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The Unix socket to listen on (created 0600; default
    /// <home>/serve.sock).
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Also listen on this TCP address (e.g. 127.0.0.1:7070). Plain HTTP:
    /// keep it on loopback or put a TLS proxy in front.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<std::net::SocketAddr>,
    /// The bearer token file: created (0600, a fresh random token) on the
    /// first start, read on later ones (default <home>/serve.token).
    #[arg(long, value_name = "PATH")]
    pub token_file: Option<PathBuf>,
    /// The daemon's database (default <home>/serve.db).
    #[arg(long, value_name = "PATH")]
    pub db: Option<PathBuf>,
    /// Largest JSON request body, in bytes.
    #[arg(long, default_value_t = 1 << 20, value_name = "BYTES")]
    pub max_request: usize,
    /// Largest file or tar stream moved into or out of a sandbox, in bytes.
    #[arg(long, default_value_t = 1 << 30, value_name = "BYTES")]
    pub max_file: u64,
    /// Most entries a directory listing (`stat`) returns.
    #[arg(long, default_value_t = 10_000, value_name = "N")]
    pub max_entries: usize,
    /// Most connections served at once on each listener (the Unix socket,
    /// and TCP with --listen); more wait until one ends. A followed exec
    /// or run holds one while it streams.
    #[arg(long, default_value_t = 512, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub max_connections: u32,
    /// A request's head (line and headers) must arrive within this many
    /// seconds of the connection opening or of the previous reply; a
    /// client that sends nothing, or a byte at a time, is cut off.
    #[arg(long, default_value_t = 30, value_name = "SECS",
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub header_timeout: u64,
    /// On SIGTERM or SIGINT, wait this long for requests in flight (a
    /// long exec, a download) before exiting anyway. Sandboxes stay up
    /// either way.
    #[arg(long, default_value_t = 30, value_name = "SECS")]
    pub shutdown_grace: u64,
    /// Print the OpenAPI document and exit (no daemon started): for SDK
    /// generators.
    #[arg(long)]
    pub openapi: bool,
    /// Defaults for the sandboxes' VMs (a create request overrides image,
    /// net, memory, vCPUs and scratch).
    #[command(flatten)]
    pub vm: VmArgs,
}

/// The token in `path`, or a new random one written there (0600).
fn token(path: &Path) -> anyhow::Result<String> {
    match std::fs::read_to_string(path) {
        Ok(t) if !t.trim().is_empty() => {
            let mode = std::fs::metadata(path)?.permissions().mode();
            if mode & 0o077 != 0 {
                anyhow::bail!(
                    "{} is readable by others (mode {:o}): chmod 600 it, or delete it for a new token",
                    path.display(),
                    mode & 0o777
                );
            }
            return Ok(t.trim().to_string());
        }
        Ok(_) => anyhow::bail!("{} is empty: delete it for a new token", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    let mut raw = [0u8; 32];
    dough_fabric::fill_random(&mut raw);
    let t = hex_string(&raw);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    writeln!(f, "{t}")?;
    eprintln!("dough: wrote a new API token to {}", path.display());
    Ok(t)
}

fn hex_string(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Bind the Unix socket: a stale one (nobody listening) is replaced, a
/// live one means another daemon.
fn bind_unix(path: &Path) -> anyhow::Result<tokio::net::UnixListener> {
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!(
                "another dough serve is listening on {} (stop it, or give --socket)",
                path.display()
            );
        }
        std::fs::remove_file(path).with_context(|| format!("removing stale {}", path.display()))?;
    }
    let l = std::os::unix::net::UnixListener::bind(path)
        .with_context(|| format!("listening on {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    l.set_nonblocking(true)?;
    Ok(tokio::net::UnixListener::from_std(l)?)
}

/// Tell systemd (`Type=notify`) how the daemon is doing, when it runs
/// under it.
fn sd_notify(state: &str) {
    use std::os::linux::net::SocketAddrExt;
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let path = path.to_string_lossy().into_owned();
    let addr = match path.strip_prefix('@') {
        Some(abs) => std::os::unix::net::SocketAddr::from_abstract_name(abs.as_bytes()),
        None => std::os::unix::net::SocketAddr::from_pathname(&path),
    };
    let sent = addr.and_then(|a| {
        let s = std::os::unix::net::UnixDatagram::unbound()?;
        s.send_to_addr(state.as_bytes(), &a)
    });
    if let Err(e) = sent {
        eprintln!("dough: could not notify systemd ({path}): {e}");
    }
}

pub fn run(ctx: &Ctx, args: ServeArgs) -> anyhow::Result<ExitCode> {
    if args.openapi {
        println!("{}", api::openapi_text());
        return Ok(ExitCode::SUCCESS);
    }
    std::fs::create_dir_all(&ctx.home)
        .with_context(|| format!("creating {}", ctx.home.display()))?;
    let db = args.db.unwrap_or_else(|| ctx.home.join("serve.db"));
    // One daemon per database: it owns the runs it records as running.
    let lock_path = db.with_extension("lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("opening {}", lock_path.display()))?;
    let lock = match nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(l) => l,
        Err((_, e)) => anyhow::bail!(
            "another dough serve is running with the database {}: {e}",
            db.display()
        ),
    };
    let token = token(
        &args
            .token_file
            .unwrap_or_else(|| ctx.home.join("serve.token")),
    )?;
    let store =
        store::SqliteStore::open(&db).with_context(|| format!("opening {}", db.display()))?;
    let limits = api::Limits {
        max_request: args.max_request,
        max_file: args.max_file,
        max_entries: args.max_entries,
    };
    let app = Arc::new(api::App::new(
        ctx.clone(),
        Arc::new(store),
        token,
        limits,
        args.vm,
    ));
    let socket = args.socket.unwrap_or_else(|| ctx.home.join("serve.sock"));
    // Each connection takes a descriptor; so do VMs' channels and logs.
    let nofile = dough_vmm::process::raise_nofile();
    let conn_limits = conn::ConnLimits {
        max: args.max_connections as usize,
        header_timeout: Duration::from_secs(args.header_timeout),
    };
    let listeners = if args.listen.is_some() { 2 } else { 1 };
    if (conn_limits.max as u64 * listeners).saturating_add(256) > nofile {
        eprintln!(
            "dough: warning: --max-connections {} (per listener) is near the open-file limit \
             ({nofile}): raise `ulimit -n` (LimitNOFILE= under systemd) or lower it",
            conn_limits.max
        );
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let grace = Duration::from_secs(args.shutdown_grace);
    rt.block_on(async {
        let unix = bind_unix(&socket)?;
        // Adopt what a previous daemon left: live VMs stay ours, dead ones
        // are marked, expired ones go; runs it left running go on
        // (finished tasks are not run again).
        sandboxes::reconcile(&app).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        runs::resume_all(&app).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let tcp = match args.listen {
            Some(a) => Some(
                tokio::net::TcpListener::bind(a)
                    .await
                    .with_context(|| format!("listening on {a}"))?,
            ),
            None => None,
        };
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let router = api::router(app.clone());
        let mut servers = tokio::task::JoinSet::new();
        servers.spawn(conn::serve(
            unix,
            router.clone(),
            conn_limits,
            stop_rx.clone(),
        ));
        eprintln!("dough: serving on unix://{}", socket.display());
        if let Some(tcp) = tcp {
            eprintln!("dough: serving on http://{}", tcp.local_addr()?);
            servers.spawn(conn::serve(tcp, router, conn_limits, stop_rx.clone()));
        }
        // TTLs, and VMs that died.
        let a = app.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let a = a.clone();
                let r = tokio::task::spawn_blocking(move || sandboxes::reconcile(&a)).await;
                if let Ok(Err(e)) = r {
                    eprintln!("dough: keeping sandboxes in step failed: {e:?}");
                }
            }
        });
        sd_notify("READY=1");
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        eprintln!(
            "dough: stopping: finishing requests in flight (at most {}s); sandboxes stay up",
            grace.as_secs()
        );
        sd_notify("STOPPING=1");
        let _ = stop_tx.send(true);
        let all = async { while servers.join_next().await.is_some() {} };
        if tokio::time::timeout(grace, all).await.is_err() {
            eprintln!(
                "dough: requests still in flight after {}s; exiting anyway",
                grace.as_secs()
            );
        }
        anyhow::Ok(())
    })?;
    let _ = std::fs::remove_file(&socket);
    // Blocking work still running (an exec whose client stays) is left.
    rt.shutdown_timeout(Duration::from_secs(1));
    drop(lock);
    eprintln!("dough: stopped");
    Ok(ExitCode::SUCCESS)
}
