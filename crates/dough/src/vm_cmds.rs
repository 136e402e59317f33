//! `dough bake|up|ps|exec|logs|down`: warm snapshots and the clones that
//! outlive a single dough invocation.

use std::io::Write;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use dough_fabric::pool;
use dough_fabric::snapshot::Ensured;
use dough_fabric::{Vm, VmKind};

use crate::cli::Ctx;
use crate::exec_args::{exit_code, stream_sink, ExecArgs};
use crate::snapshots::ensure_snapshot;
use crate::teardown::install_teardown_on_signal;
use crate::vm_args::{boot_options, resolve_image, VmArgs};

#[derive(Debug, Args)]
pub struct BakeArgs {
    #[command(flatten)]
    pub vm: VmArgs,
    /// Bake again even if a snapshot for these inputs exists.
    #[arg(long)]
    pub force: bool,
    /// Then delete every other snapshot except those of VMs still listed in
    /// `dough ps` (running clones keep working either way).
    #[arg(long)]
    pub prune: bool,
}

#[derive(Debug, Args)]
pub struct UpArgs {
    /// How many clones to restore.
    #[arg(default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub count: u32,
    /// Restore them from this snapshot (a key from `dough snapshots`, or a
    /// unique prefix): one a clone was saved to with `dough snapshot`, after
    /// dough or the host restarted too. Default: the warm snapshot of the
    /// image, baked first when needed.
    #[arg(long, value_name = "SNAPSHOT")]
    pub from: Option<String>,
    #[command(flatten)]
    pub vm: VmArgs,
}

#[derive(Debug, Args)]
pub struct PsArgs {
    /// Print JSON (one array of records) instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ExecCmdArgs {
    /// The VM's id (or a unique prefix of it).
    pub id: String,
    #[command(flatten)]
    pub exec: ExecArgs,
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// The VM's id (or a unique prefix of it).
    pub id: String,
    /// Print the clone's egress log instead of its console: every DNS
    /// query and TCP connection its gateway saw — time, name, where the
    /// guest dialed and where the gateway connected, verdict and reason,
    /// bytes each way.
    #[arg(long)]
    pub net: bool,
    /// With --net: the raw JSON lines.
    #[arg(long, requires = "net")]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct DownArgs {
    /// VM ids (or unique prefixes).
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    pub ids: Vec<String>,
    /// Every VM in the VM directory.
    #[arg(long)]
    pub all: bool,
}

pub fn bake(ctx: &Ctx, args: BakeArgs) -> anyhow::Result<ExitCode> {
    install_teardown_on_signal(&ctx.vms);
    let image = resolve_image(ctx, &args.vm)?;
    let opts = boot_options(&ctx.home, &image, &args.vm)?;
    let got = ensure_snapshot(ctx, &image, &opts, args.force)?;
    if let Ensured::Existing(s) = &got {
        eprintln!("dough: snapshot {} is up to date; nothing to bake", s.key);
    }
    if args.prune {
        let mut keep: std::collections::BTreeSet<String> = dough_fabric::state::list(&ctx.vms)
            .into_iter()
            .filter_map(|r| r.snapshot)
            .collect();
        keep.insert(got.snapshot().key.clone());
        let removed = dough_fabric::SnapshotStore::new(&ctx.home).prune(&keep)?;
        let total: u64 = removed.iter().map(|(_, b)| b).sum();
        for (key, bytes) in &removed {
            eprintln!("dough: removed snapshot {key} ({} MiB)", bytes >> 20);
        }
        eprintln!(
            "dough: pruned {} snapshot(s), {} MiB freed",
            removed.len(),
            total >> 20
        );
    }
    println!("{}", got.snapshot().key);
    Ok(ExitCode::SUCCESS)
}

pub fn up(ctx: &Ctx, args: UpArgs) -> anyhow::Result<ExitCode> {
    // Until every clone is handed over at the end, they belong to this
    // process: Ctrl-C, or a crash followed by any dough command, removes
    // them all.
    install_teardown_on_signal(&ctx.vms);
    let n = args.count as usize;
    if let Some(key) = &args.from {
        let snap = crate::live_cmd::find_snapshot(ctx, key)?;
        let opts = boot_options(&ctx.home, &snap.meta.image, &args.vm)?;
        return restore_clones(ctx, &snap, &opts, n);
    }
    let image = resolve_image(ctx, &args.vm)?;
    let opts = boot_options(&ctx.home, &image, &args.vm)?;
    let got = ensure_snapshot(ctx, &image, &opts, false)?;
    restore_clones(ctx, got.snapshot(), &opts, n)
}

/// Restore `n` clones of `snap` and hand them over; prints their ids.
pub fn restore_clones(
    ctx: &Ctx,
    snap: &dough_fabric::Snapshot,
    opts: &dough_fabric::BootOptions,
    n: usize,
) -> anyhow::Result<ExitCode> {
    eprintln!("dough: restoring {n} clone(s) of snapshot {}", snap.key);
    let start = Instant::now();
    let results: Vec<Result<Vm, dough_fabric::FabricError>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|_| {
                s.spawn(|| {
                    let r = Vm::restore(&ctx.vms, snap, VmKind::Clone, opts);
                    if let Ok(vm) = &r {
                        eprintln!(
                            "dough: {} ready in {:.2}s",
                            vm.id,
                            vm.boot_time.as_secs_f64()
                        );
                    }
                    r
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("restore thread panicked"))
            .collect()
    });
    // Built only with `--features test-hooks` (the test suite's build).
    #[cfg(feature = "test-hooks")]
    if std::env::var_os("DOUGH_TEST_HOLD_BEFORE_HANDOVER").is_some() {
        // For the crash test: stop where a SIGKILL must leave nothing behind.
        eprintln!("dough: test hook: holding the clones before handover");
        loop {
            std::thread::park();
        }
    }
    let mut ids = Vec::new();
    let mut failed = 0;
    let mut out = std::io::stdout().lock();
    for r in results {
        match r.and_then(|vm| vm.detach()) {
            Ok(id) => {
                // Printed as soon as it is handed over, so a caller always
                // learns the id of every clone left running.
                writeln!(out, "{id}")?;
                out.flush()?;
                ids.push(id);
            }
            Err(e) => {
                failed += 1;
                crate::cli::print_error("a clone failed to start: ", &e);
            }
        }
    }
    eprintln!(
        "dough: {} of {n} clone(s) up in {:.2}s",
        ids.len(),
        start.elapsed().as_secs_f64()
    );
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn age(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

/// The NET column: the policy, and the gateway's state when it is not
/// serving (a clone whose gateway died has no way out).
fn net_column(r: &dough_fabric::VmRecord) -> String {
    let Some(n) = &r.net else {
        return "-".into();
    };
    let policy = n.egress.to_string();
    let vmm_alive = r.vmm.is_some_and(|v| v.is_alive());
    match r.gateway {
        Some(g) if vmm_alive && !g.is_alive() => format!("{policy} (gateway {} is gone)", g.pid),
        None if vmm_alive && n.egress.has_gateway() && r.state == dough_fabric::VmState::Ready => {
            format!("{policy} (no gateway)")
        }
        _ => policy,
    }
}

/// The VMM's cgroup: memory used of its limit, and its CPU cap in cores
/// (`-` where the host has no cgroups).
fn cgroup_column(v: &dough_fabric::pool::VmStatus) -> String {
    let Some(cg) = &v.record.cgroup else {
        return "-".into();
    };
    let limit = size(cg.limits.memory_bytes >> 20);
    let cpus = cg.limits.cpu_quota_us as f64 / dough_fabric::cgroup::CPU_PERIOD_US as f64;
    match v.cgroup_memory_kib {
        Some(k) => format!("{}M/{limit} {cpus}c", k / 1024),
        None => format!("-/{limit} {cpus}c"),
    }
}

fn size(mib: u64) -> String {
    if mib.is_multiple_of(1024) {
        format!("{}G", mib / 1024)
    } else {
        format!("{mib}M")
    }
}

pub fn ps(ctx: &Ctx, args: PsArgs) -> anyhow::Result<ExitCode> {
    let vms = pool::status(&ctx.vms);
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &vms)?;
        writeln!(out)?;
        return Ok(ExitCode::SUCCESS);
    }
    writeln!(
        out,
        "{:<12} {:<6} {:<9} {:>5} {:>8} {:>8} {:>11} {:>14} {:<11} {:<5} NET",
        "ID", "KIND", "STATE", "AGE", "PID", "PSS", "SCRATCH", "CGROUP", "BACKEND", "ACCEL"
    )?;
    for v in &vms {
        let r = &v.record;
        writeln!(
            out,
            "{:<12} {:<6} {:<9} {:>5} {:>8} {:>8} {:>11} {:>14} {:<11} {:<5} {}",
            r.id,
            r.kind.to_string(),
            r.state.to_string(),
            age(v.age_secs),
            r.vmm.map(|p| p.pid.to_string()).unwrap_or("-".into()),
            v.pss_kib
                .map(|k| format!("{}M", k / 1024))
                .unwrap_or("-".into()),
            // Used of its size; `ram` when the writable layer is tmpfs.
            match (v.scratch_used_kib, r.scratch_mib) {
                (Some(u), Some(m)) => format!("{}M/{}", u / 1024, size(m)),
                (None, Some(m)) => format!("-/{}", size(m)),
                _ => "ram".into(),
            },
            cgroup_column(v),
            r.backend.to_string(),
            r.accel.to_string(),
            net_column(r),
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

pub fn exec(ctx: &Ctx, args: ExecCmdArgs) -> anyhow::Result<ExitCode> {
    let req = args.exec.request()?;
    // Recorded before it is sent: a clone that got any of it is never
    // snapshotted (`dough snapshot`).
    pool::note_received(&ctx.vms, &args.id, &args.exec.may_be_secret())?;
    let status = pool::exec(&ctx.vms, &args.id, &req, &mut stream_sink, &mut |id| {
        eprintln!("dough: waiting for another command on {id} to finish")
    })?;
    Ok(exit_code(&status))
}

pub fn logs(ctx: &Ctx, args: LogsArgs) -> anyhow::Result<ExitCode> {
    use dough_fabric::serial::printable;
    use std::io::Read;
    let dir = dough_fabric::state::VmDir::open(&ctx.vms, &args.id)?;
    let rec = dir.read()?;
    let mut out = std::io::stdout().lock();
    if args.net {
        let path = dir.dir().join(dough_fabric::vm::GATEWAY_AUDIT_LOG);
        if !rec.net.as_ref().is_some_and(|n| n.egress.has_gateway()) {
            anyhow::bail!("{} has no egress (--net none): nothing to log", rec.id);
        }
        let events = match dough_gateway::audit::read(&path) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        for e in &events {
            let line = if args.json {
                serde_json::to_string(e)?
            } else {
                e.line()
            };
            writeln!(out, "{}", printable(&line))?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(key) = &rec.snapshot {
        let snap = dough_fabric::SnapshotStore::new(&ctx.home).get(key);
        match snap {
            Some(s) => {
                eprintln!("dough: -- boot console of snapshot {key} --");
                let boot = std::fs::read(&s.boot_log).unwrap_or_default();
                out.write_all(printable(&String::from_utf8_lossy(&boot)).as_bytes())?;
                out.flush()?;
                eprintln!("dough: -- {} since restore --", rec.id);
            }
            None => eprintln!("dough: (snapshot {key} is gone; its boot log with it)"),
        }
    }
    // A guest decides what its console says: it is bounded (its VMM may
    // write at most CONSOLE_LOG_MAX) and made printable (no escape
    // sequences reach the terminal).
    let mut serial = std::fs::File::open(&dir.paths.serial)
        .with_context(|| format!("reading {}", dir.paths.serial.display()))?;
    let mut text = Vec::new();
    std::io::Read::by_ref(&mut serial)
        .take(dough_fabric::serial::CONSOLE_LOG_MAX)
        .read_to_end(&mut text)?;
    out.write_all(printable(&String::from_utf8_lossy(&text)).as_bytes())?;
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Args)]
pub struct IdsArgs {
    /// Clone ids (or unique prefixes).
    #[arg(required = true)]
    pub ids: Vec<String>,
}

/// `dough pause` (`pause`) or `dough resume`.
pub fn pause_or_resume(ctx: &Ctx, args: IdsArgs, pause: bool) -> anyhow::Result<ExitCode> {
    let mut failed = false;
    for id in &args.ids {
        let r = if pause {
            pool::pause(&ctx.vms, id)
        } else {
            pool::resume(&ctx.vms, id)
        };
        match r {
            Ok(id) => eprintln!("dough: {id} {}", if pause { "paused" } else { "resumed" }),
            Err(e) => {
                failed = true;
                crate::cli::print_error(&format!("{id}: "), &e);
            }
        }
    }
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

pub fn down(ctx: &Ctx, args: DownArgs) -> anyhow::Result<ExitCode> {
    let ids = if args.all {
        let (free, busy) = pool::unowned_ids(&ctx.vms);
        for (id, pid) in busy {
            eprintln!(
                "dough: skipping {id}: dough pid {pid} is using it (name it to stop it anyway)"
            );
        }
        free
    } else {
        args.ids
    };
    if ids.is_empty() {
        eprintln!("dough: no VMs");
    }
    let failed = std::sync::atomic::AtomicBool::new(false);
    pool::down_many(
        &ctx.vms,
        &ids,
        &dough_fabric::host::HostNet::linux,
        &|id, r| match r {
            Ok((id, Some(pid))) => eprintln!("dough: {id} stopped (VMM pid {pid}) and removed"),
            Ok((id, None)) => eprintln!("dough: {id} removed (its VMM had already exited)"),
            Err(e) => {
                failed.store(true, std::sync::atomic::Ordering::Relaxed);
                eprintln!("dough: error: {id}: {e}");
            }
        },
    );
    Ok(if failed.into_inner() {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}
