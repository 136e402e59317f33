//! `dough bench api`: what `dough serve`'s HTTP API adds to a sandbox's
//! create + exec + delete, next to the same work done in-process (the
//! library) and through the CLI (three dough processes), interleaved in
//! one run; and the daemon's memory idle and with many sandboxes.

use std::io::Write;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use dough_client::{Client, CreateSandbox, ExecBody};
use dough_fabric::{ExecRequest, Vm, VmKind};
use serde_json::json;

use crate::cli::Ctx;
use crate::snapshots::ensure_snapshot;
use crate::vm_args::{boot_options, resolve_image, VmArgs};

#[derive(Debug, Args)]
pub struct ApiBenchArgs {
    /// create + exec + delete rounds per path.
    #[arg(long, default_value_t = 20)]
    pub rounds: usize,
    /// Sandboxes held up at once for the daemon's memory figure.
    #[arg(long, default_value_t = 64)]
    pub sandboxes: usize,
    #[command(flatten)]
    pub vm: VmArgs,
}

/// A daemon of the benchmark's own (socket, database and token in a
/// temporary directory), killed when dropped.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    (v[i.min(v.len() - 1)] * 10.0).round() / 10.0
}

fn vm_flags(vm: &VmArgs) -> Vec<String> {
    let mut f = vec!["--net".to_string(), vm.net.to_string()];
    if let Some(m) = vm.mem {
        f.extend(["--mem".into(), m.to_string()]);
    }
    f.extend(["--cpus".into(), vm.cpus.to_string()]);
    f
}

fn dough_cmd(ctx: &Ctx) -> anyhow::Result<Command> {
    let mut c = Command::new(std::env::current_exe()?);
    c.env("DOUGH_HOME", &ctx.home)
        .env("DOUGH_VMS_DIR", &ctx.vms)
        .env_remove("DOUGH_HOST")
        .stdin(Stdio::null());
    Ok(c)
}

fn ok(out: std::process::Output, what: &str) -> anyhow::Result<String> {
    anyhow::ensure!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

pub fn api(ctx: &Ctx, a: ApiBenchArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!((1..=1000).contains(&a.rounds), "--rounds must be 1 to 1000");
    anyhow::ensure!(
        (1..=256).contains(&a.sandboxes),
        "--sandboxes must be 1 to 256"
    );
    let image = resolve_image(ctx, &a.vm)?;
    let opts = boot_options(&ctx.home, &image, &a.vm)?;
    let snap = ensure_snapshot(ctx, &image, &opts, false)?
        .snapshot()
        .clone();
    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("s.sock");
    let token_file = dir.path().join("token");
    let log = std::fs::File::create(dir.path().join("serve.log"))?;
    let mut serve = dough_cmd(ctx)?;
    serve
        .arg("serve")
        .arg("--socket")
        .arg(&socket)
        .arg("--db")
        .arg(dir.path().join("serve.db"))
        .arg("--token-file")
        .arg(&token_file)
        .args(vm_flags(&a.vm))
        .stdout(Stdio::null())
        .stderr(log);
    let daemon = Daemon(serve.spawn().context("starting dough serve")?);
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "dough serve did not listen: {}",
            std::fs::read_to_string(dir.path().join("serve.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let pid = daemon.0.id();
    let client = Client::new(
        &format!("unix://{}", socket.display()),
        &std::fs::read_to_string(&token_file)?,
    )?;
    let rss_start = kib(pid, "VmRSS:");
    let truth = ExecRequest {
        argv: vec!["true".into()],
        ..Default::default()
    };
    let body = ExecBody {
        argv: vec!["true".into()],
        ..Default::default()
    };
    let library = || -> anyhow::Result<()> {
        let vm = Vm::restore(&ctx.vms, &snap, VmKind::Clone, &opts)?;
        let id = vm.detach()?;
        let st = dough_fabric::pool::exec(&ctx.vms, &id, &truth, &mut |_, _| {}, &mut |_| {});
        dough_fabric::pool::down(&ctx.vms, &id, &crate::vm_args::host_net())?;
        anyhow::ensure!(st? == dough_proto::ExitStatus::Exited(0), "exec failed");
        Ok(())
    };
    let cli = || -> anyhow::Result<()> {
        let up = dough_cmd(ctx)?.arg("up").args(vm_flags(&a.vm)).output()?;
        let id = ok(up, "dough up")?;
        let ex = dough_cmd(ctx)?.args(["exec", &id, "--", "true"]).output();
        let down = dough_cmd(ctx)?.args(["down", &id]).output()?;
        ok(ex?, "dough exec")?;
        ok(down, "dough down")?;
        Ok(())
    };
    let api = || -> anyhow::Result<()> {
        let sb = client.create_sandbox(&CreateSandbox::default())?;
        let ex = client.exec(&sb.id, &body, &mut |_| {});
        client.delete_sandbox(&sb.id)?;
        anyhow::ensure!(ex?.exit_code == 0, "exec failed");
        Ok(())
    };
    let paths: [(&str, &dyn Fn() -> anyhow::Result<()>); 3] =
        [("library", &library), ("cli", &cli), ("api", &api)];
    // One warm-up round of each, not counted.
    for (_, f) in &paths {
        f()?;
    }
    let mut times: [Vec<f64>; 3] = Default::default();
    for r in 0..a.rounds {
        // Each path first in turn.
        for k in 0..3 {
            let i = (r + k) % 3;
            let t = Instant::now();
            paths[i].1()?;
            times[i].push(t.elapsed().as_secs_f64() * 1000.0);
        }
        eprintln!("dough: round {} of {} done", r + 1, a.rounds);
    }
    let rss_idle = kib(pid, "VmRSS:");
    // Memory with many sandboxes up.
    let t = Instant::now();
    let mut ids = Vec::new();
    for _ in 0..a.sandboxes {
        ids.push(client.create_sandbox(&CreateSandbox::default())?.id);
    }
    let up_secs = t.elapsed().as_secs_f64();
    let health = client.health()?;
    let rss_many = kib(pid, "VmRSS:");
    let hwm = kib(pid, "VmHWM:");
    let t = Instant::now();
    for id in &ids {
        client.delete_sandbox(id)?;
    }
    let down_secs = t.elapsed().as_secs_f64();
    let summary = |i: usize| {
        let mut v = times[i].clone();
        json!({"p50_ms": pct(&mut v, 0.5), "p90_ms": pct(&mut v, 0.9)})
    };
    let p50 = |i: usize| pct(&mut times[i].clone(), 0.5);
    let out = json!({
        "bench": "api",
        "rounds": a.rounds,
        "net": a.vm.net.to_string(),
        "create_exec_delete": {
            "library": summary(0),
            "cli": summary(1),
            "api": summary(2),
        },
        "api_over_library_p50_ms": ((p50(2) - p50(0)) * 10.0).round() / 10.0,
        "api_vs_cli_p50": ((p50(2) / p50(1)) * 100.0).round() / 100.0,
        "daemon": {
            "rss_kib_at_start": rss_start,
            "rss_kib_idle_after_rounds": rss_idle,
            "sandboxes": health.sandboxes,
            "rss_kib_with_sandboxes": rss_many,
            "rss_kib_peak": hwm,
            "create_all_secs": (up_secs * 100.0).round() / 100.0,
            "delete_all_secs": (down_secs * 100.0).round() / 100.0,
        },
    });
    let mut o = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut o, &out)?;
    writeln!(o)?;
    drop(daemon);
    Ok(ExitCode::SUCCESS)
}
