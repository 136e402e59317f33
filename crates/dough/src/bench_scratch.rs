//! `dough bench scratch`: what a scratch disk costs a clone, next to the
//! same clone with its writable layer in RAM, in one run.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;
use dough_fabric::{ExecRequest, Vm, VmKind};
use serde_json::{json, Value};

use crate::cli::Ctx;
use crate::snapshots::ensure_snapshot;
use crate::teardown::install_teardown_on_signal;
use crate::vm_args::{boot_options, resolve_image, ScratchArg, VmArgs, DEFAULT_SCRATCH_MIB};

#[derive(Debug, Args)]
pub struct ScratchBenchArgs {
    /// Clones restored with each writable layer (one at a time, alternating).
    #[arg(long, default_value_t = 10)]
    pub count: usize,
    /// MiB each clone writes (and syncs) to its writable layer after it is
    /// ready; it must fit the RAM layer (tmpfs: half the guest's memory).
    #[arg(long, default_value_t = 32)]
    pub write_mib: u64,
    #[command(flatten)]
    pub vm: VmArgs,
}

fn percentiles(mut ms: Vec<f64>) -> Value {
    ms.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| {
        let i = ((p / 100.0) * ms.len() as f64).ceil() as usize;
        ms[i.clamp(1, ms.len()) - 1]
    };
    let r = |x: f64| (x * 10.0).round() / 10.0;
    json!({"p50_ms": r(pct(50.0)), "p90_ms": r(pct(90.0)), "max_ms": r(*ms.last().unwrap_or(&0.0))})
}

#[derive(Default)]
struct Times {
    ready: Vec<f64>,
    first_exec: Vec<f64>,
    write: Vec<f64>,
}

pub fn scratch(ctx: &Ctx, a: ScratchBenchArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!((1..=200).contains(&a.count), "--count must be 1 to 200");
    anyhow::ensure!(
        a.vm.backend == crate::vm_args::BackendArg::Qemu,
        "scratch disks are a QEMU-backend feature"
    );
    install_teardown_on_signal(&ctx.vms);
    let image = resolve_image(ctx, &a.vm)?;
    let size = match a.vm.scratch {
        Some(ScratchArg::Mib(m)) => m,
        _ => DEFAULT_SCRATCH_MIB,
    };
    let disk_args = VmArgs {
        scratch: Some(ScratchArg::Mib(size)),
        net: dough_net::Egress::None,
        ..a.vm.clone()
    };
    let ram_args = VmArgs {
        scratch: Some(ScratchArg::None),
        ..disk_args.clone()
    };
    let disk_opts = boot_options(&ctx.home, &image, &disk_args)?;
    let ram_opts = boot_options(&ctx.home, &image, &ram_args)?;
    let disk_snap = ensure_snapshot(ctx, &image, &disk_opts, false)?
        .snapshot()
        .clone();
    let ram_snap = ensure_snapshot(ctx, &image, &ram_opts, false)?
        .snapshot()
        .clone();
    let write = ExecRequest {
        argv: vec![
            "dd".into(),
            "if=/dev/zero".into(),
            "of=/root/bench".into(),
            "bs=1M".into(),
            format!("count={}", a.write_mib),
            "conv=fsync".into(),
            "status=none".into(),
        ],
        timeout: Some(Duration::from_secs(300)),
        ..ExecRequest::default()
    };
    let truth = ExecRequest {
        argv: vec!["true".into()],
        ..ExecRequest::default()
    };
    let one = |snap: &dough_fabric::Snapshot,
               opts: &dough_fabric::BootOptions,
               t: &mut Times|
     -> anyhow::Result<()> {
        let start = Instant::now();
        let mut vm = Vm::restore(&ctx.vms, snap, VmKind::Run, opts)?;
        t.ready.push(start.elapsed().as_secs_f64() * 1e3);
        vm.exec(&truth, &mut |_, _| {})?;
        t.first_exec.push(start.elapsed().as_secs_f64() * 1e3);
        let w = Instant::now();
        let st = vm.exec(&write, &mut |_, _| {})?;
        anyhow::ensure!(
            st == dough_proto::ExitStatus::Exited(0),
            "writing {} MiB in a clone failed: {st:?}",
            a.write_mib
        );
        t.write.push(w.elapsed().as_secs_f64() * 1e3);
        vm.destroy()?;
        Ok(())
    };
    eprintln!("dough: bench: warming up");
    one(&disk_snap, &disk_opts, &mut Times::default())?;
    one(&ram_snap, &ram_opts, &mut Times::default())?;
    let (mut disk, mut ram) = (Times::default(), Times::default());
    for i in 0..a.count {
        eprintln!("dough: bench: round {}/{}", i + 1, a.count);
        one(&disk_snap, &disk_opts, &mut disk)?;
        one(&ram_snap, &ram_opts, &mut ram)?;
    }
    let p50 = |v: &[f64]| percentiles(v.to_vec())["p50_ms"].as_f64().unwrap_or(0.0);
    let ratio = |d: &[f64], r: &[f64]| {
        let r50 = p50(r);
        if r50 > 0.0 {
            json!(((p50(d) / r50) * 100.0).round() / 100.0)
        } else {
            Value::Null
        }
    };
    let side = |t: &Times| {
        json!({
            "restore_to_ready": percentiles(t.ready.clone()),
            "restore_to_first_exec": percentiles(t.first_exec.clone()),
            "write_fsync": percentiles(t.write.clone()),
        })
    };
    let out = json!({
        "bench": "scratch",
        "accel": disk_opts.accel.to_string(),
        "count": a.count,
        "mem_mib": disk_opts.mem_mib,
        "write_mib": a.write_mib,
        "scratch_disk": { "size_mib": size, "snapshot": disk_snap.key, "clone": side(&disk) },
        "ram": { "snapshot": ram_snap.key, "clone": side(&ram) },
        "ratio_disk_over_ram_p50": {
            "restore_to_ready": ratio(&disk.ready, &ram.ready),
            "restore_to_first_exec": ratio(&disk.first_exec, &ram.first_exec),
            "write_fsync": ratio(&disk.write, &ram.write),
        },
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(ExitCode::SUCCESS)
}
