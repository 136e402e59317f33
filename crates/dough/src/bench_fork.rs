//! `dough bench fork`: what a snapshot of a live clone costs, and forks of
//! it next to clones of the baked snapshot, in one run.

use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use dough_fabric::live::{self, After};
use dough_fabric::{ExecRequest, Snapshot, SnapshotStore, Vm, VmKind};
use serde_json::json;

use crate::bench_cmd::Handed;
use crate::cli::Ctx;
use crate::snapshots::ensure_snapshot;
use crate::teardown::install_teardown_on_signal;
use crate::vm_args::{boot_options, resolve_image, VmArgs};

#[derive(Debug, Args)]
pub struct ForkBenchArgs {
    /// Numbers of forks (and of clones) to restore at once, comma separated.
    #[arg(long, default_value = "1,8,16", value_delimiter = ',')]
    pub sizes: Vec<usize>,
    /// MiB the clone writes (to a file, and kept in its page cache) before
    /// it is snapshotted.
    #[arg(long, default_value_t = 100)]
    pub write_mib: u64,
    #[command(flatten)]
    pub vm: VmArgs,
}

fn exec(ctx: &Ctx, id: &str, cmd: &str) -> anyhow::Result<()> {
    let req = ExecRequest {
        argv: vec!["sh".into(), "-c".into(), cmd.into()],
        ..ExecRequest::default()
    };
    let st = dough_fabric::pool::exec(&ctx.vms, id, &req, &mut |_, _| {}, &mut |_| {})?;
    anyhow::ensure!(
        st == dough_proto::ExitStatus::Exited(0),
        "`{cmd}` in {id} failed: {st:?}"
    );
    Ok(())
}

/// Restore `n` clones of `snap` at once, each then running `exec true`:
/// (wall seconds, per-clone restore → first exec ms, mean PSS KiB).
fn round(
    ctx: &Ctx,
    snap: &Snapshot,
    opts: &dough_fabric::BootOptions,
    n: usize,
) -> anyhow::Result<serde_json::Value> {
    let mut up = Handed {
        vms: &ctx.vms,
        ids: Vec::new(),
    };
    let start = Instant::now();
    let got: Vec<anyhow::Result<(String, f64)>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..n)
            .map(|_| {
                s.spawn(|| -> anyhow::Result<(String, f64)> {
                    let t = Instant::now();
                    let id = Vm::restore(&ctx.vms, snap, VmKind::Clone, opts)?.detach()?;
                    exec(ctx, &id, "true")?;
                    Ok((id, t.elapsed().as_secs_f64() * 1e3))
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("bench thread"))
            .collect()
    });
    let wall = start.elapsed().as_secs_f64();
    let mut ms = Vec::new();
    for r in got {
        let (id, t) = r.context("a restore failed")?;
        up.ids.push(id);
        ms.push(t);
    }
    ms.sort_by(f64::total_cmp);
    let pids: Vec<i32> = dough_fabric::state::list(&ctx.vms)
        .iter()
        .filter(|r| up.ids.contains(&r.id))
        .filter_map(|r| r.vmm.map(|v| v.pid))
        .collect();
    let pss: Vec<u64> = pids
        .iter()
        .filter_map(|&p| dough_vmm::process::pss_kib(p))
        .collect();
    let pct = |q: f64| ms[((ms.len() - 1) as f64 * q).round() as usize];
    let r = |x: f64| (x * 10.0).round() / 10.0;
    Ok(json!({
        "n": n,
        "wall_secs": r(wall),
        "clones_per_sec": r(n as f64 / wall),
        "restore_to_first_exec_ms": { "p50": r(pct(0.5)), "p90": r(pct(0.9)) },
        "pss_kib_per_clone": (!pss.is_empty()).then(|| pss.iter().sum::<u64>() / pss.len() as u64),
    }))
}

pub fn fork(ctx: &Ctx, a: ForkBenchArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        a.sizes.iter().all(|&n| (1..=64).contains(&n)),
        "--sizes must be 1 to 64 each"
    );
    install_teardown_on_signal(&ctx.vms);
    let image = resolve_image(ctx, &a.vm)?;
    let opts = boot_options(&ctx.home, &image, &a.vm)?;
    let got = ensure_snapshot(ctx, &image, &opts, false)?;
    let baked = got.snapshot().clone();

    eprintln!("dough: bench: a clone writes {} MiB", a.write_mib);
    let parent = Handed {
        vms: &ctx.vms,
        ids: vec![Vm::restore(&ctx.vms, &baked, VmKind::Clone, &opts)?.detach()?],
    };
    let id = parent.ids[0].clone();
    exec(
        ctx,
        &id,
        &format!(
            "head -c {} /dev/urandom > /root/data && nohup sleep 100000 >/dev/null 2>&1 &",
            a.write_mib << 20
        ),
    )?;
    let store = SnapshotStore::new(&ctx.home);
    let t = Instant::now();
    let snap = live::snapshot(&ctx.vms, &store, &id, After::Resume, &opts, &mut |m| {
        eprintln!("dough: {m}")
    })?;
    let save_secs = t.elapsed().as_secs_f64();
    let on_disk = dough_fabric::snapshot::disk_usage(&snap.dir);
    // The snapshot is the benchmark's own: removed at the end.
    struct Remove(std::path::PathBuf);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _remove = Remove(snap.dir.clone());
    // The parent goes: forks and clones are measured on a quiet host.
    drop(parent);

    let mut rounds = Vec::new();
    for &n in &a.sizes {
        eprintln!("dough: bench: {n} fork(s), then {n} clone(s) of the baked snapshot");
        let forks = round(ctx, &snap, &opts, n)?;
        std::thread::sleep(Duration::from_millis(500));
        let clones = round(ctx, &baked, &opts, n)?;
        rounds.push(json!({ "forks": forks, "clones": clones }));
    }
    let out = json!({
        "bench": "fork",
        "host": { "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) },
        "accel": opts.accel.to_string(),
        "mem_mib": baked.meta.mem_mib,
        "written_mib": a.write_mib,
        "snapshot": {
            "save_secs": (save_secs * 100.0).round() / 100.0,
            "state_bytes": snap.meta.state_bytes,
            "bytes_on_disk": on_disk,
            "ram": "a memory file of its own (made by restoring the clone saved whole into it)",
        },
        "rounds": rounds,
    });
    let mut stdout = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut stdout, &out)?;
    writeln!(stdout)?;
    Ok(ExitCode::SUCCESS)
}
