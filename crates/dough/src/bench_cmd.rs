//! Benchmarks that print JSON: `dough bench clones` (dough's restore path
//! against a raw QEMU restore of the same snapshot, side by side in one
//! run), `dough bench density` (what idle clones cost), `dough bench net`.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Subcommand};
use dough_fabric::state::{VmDir, VmRecord, VmState};
use dough_fabric::{ExecRequest, Snapshot, Vm, VmKind};
use dough_net::linux::LinuxNet;
use dough_net::{Egress, NetPlan};
use dough_proto::{GuestMsg, HostMsg};
use dough_vmm::{Incoming, Memory, ProcessId, QemuArgs, Qmp};
use serde_json::{json, Value};

use crate::cli::Ctx;
use crate::snapshots::ensure_snapshot;
use crate::teardown::install_teardown_on_signal;
use crate::vm_args::{boot_options, resolve_image, VmArgs};

#[derive(Debug, Subcommand)]
pub enum BenchCmd {
    /// Restore N clones at once for each N and time restore → first exec,
    /// clones per second and idle memory, next to a raw QEMU restore
    /// (`-incoming` of the same snapshot, time to the agent's first
    /// message). Prints JSON on stdout; progress on stderr.
    Clones(ClonesArgs),
    /// Bring up N idle clones (as `dough up` leaves them), let them settle,
    /// and report what they cost: host CPU while idle (total and per
    /// clone), memory (PSS) per clone, `exec true` latency on a sample
    /// next to a lone clone measured in the same run, then teardown time
    /// and anything left behind. Prints JSON, with the targets it checks.
    Density(DensityArgs),
    /// What a clone's egress gateway adds to an HTTPS request (p50/p90,
    /// new connection each) and to a download, for SNI pass-through and
    /// brokered (re-terminated) connections, next to the host reaching the
    /// same upstream directly; and the gateway's memory. Needs root.
    Gateway(crate::bench_gateway::GatewayArgs),
    /// Restore → ready, → first exec, and a synced write, for clones whose
    /// writable layer is a scratch disk next to clones with it in RAM,
    /// alternating in one run. Prints JSON.
    Scratch(crate::bench_scratch::ScratchBenchArgs),
    /// Per-clone network setup and teardown (netns, TAP, veth, addresses,
    /// routes, forwarding, nftables rules): dough's netlink implementation
    /// against the same plan applied by spawning `ip` and `nft`. Needs root.
    Net(NetArgs),
    /// Snapshot a live clone that wrote --write-mib MiB (time, size), then
    /// restore N forks of it at once next to N clones of the baked
    /// snapshot, for each N: clones/s, restore → first exec, memory (PSS).
    /// Prints JSON.
    Fork(crate::bench_fork::ForkBenchArgs),
    /// `dough serve`'s API against the same create + exec + delete done
    /// in-process and through the CLI, interleaved (p50/p90); the daemon's
    /// memory idle and with --sandboxes up. Prints JSON.
    Api(crate::bench_api::ApiBenchArgs),
}

#[derive(Debug, Args)]
pub struct NetArgs {
    /// Clones to set up and tear down with each implementation.
    #[arg(long, default_value_t = 50)]
    pub count: usize,
    /// Egress policy of the measured plans.
    #[arg(long, default_value = "nat")]
    pub net: dough_net::Egress,
}

#[derive(Debug, Args)]
pub struct DensityArgs {
    /// Idle clones to bring up.
    #[arg(long, default_value_t = 128)]
    pub clones: usize,
    /// Seconds to let them go idle before measuring.
    #[arg(long, default_value_t = 5)]
    pub settle: u64,
    /// Seconds over which idle CPU is measured.
    #[arg(long, default_value_t = 10)]
    pub window: u64,
    /// Clones (spread over all of them) that get an `exec true`.
    #[arg(long, default_value_t = 16)]
    pub sample: usize,
    #[command(flatten)]
    pub vm: VmArgs,
}

#[derive(Debug, Args)]
pub struct ClonesArgs {
    /// Clone counts to measure, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1,4,8,16")]
    pub sizes: Vec<usize>,
    /// Seconds to let clones go idle before reading their memory.
    #[arg(long, default_value_t = 2)]
    pub settle: u64,
    #[command(flatten)]
    pub vm: VmArgs,
}

pub fn run(ctx: &Ctx, cmd: BenchCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        BenchCmd::Clones(a) => clones(ctx, a),
        BenchCmd::Density(a) => density(ctx, a),
        BenchCmd::Net(a) => net(a),
        BenchCmd::Fork(a) => crate::bench_fork::fork(ctx, a),
        BenchCmd::Api(a) => crate::bench_api::api(ctx, a),
        BenchCmd::Gateway(a) => crate::bench_gateway::gateway(a),
        BenchCmd::Scratch(a) => crate::bench_scratch::scratch(ctx, a),
    }
}

fn net(a: NetArgs) -> anyhow::Result<ExitCode> {
    use dough_net::commands::CommandNet;
    anyhow::ensure!((1..=1000).contains(&a.count), "--count must be 1 to 1000");
    // A pool and scope of the benchmark's own, and alternating rounds so
    // neither implementation always runs on a warmer kernel.
    let pool: dough_net::Ipv4Net = "10.197.0.0/16".parse()?;
    let scope = format!("bn{}", std::process::id() % 100_000);
    let mut times: [(Vec<f64>, Vec<f64>); 2] = Default::default();
    let mut steps: [std::collections::BTreeMap<&'static str, f64>; 2] = Default::default();
    let _net = dough_fabric::host::HostNet::linux().lock()?;
    let used = dough_net::in_use_on_host(&mut LinuxNet::default())?;
    for i in 0..a.count {
        for which in [i % 2, (i + 1) % 2] {
            let id = format!("b{i}-{which}");
            let plan = NetPlan::new(&scope, &id, a.net.clone(), pool, 0, &used)?;
            let mut linux = LinuxNet::default();
            let mut cmds = CommandNet::default();
            let inner: &mut dyn dough_net::NetOps = if which == 0 { &mut linux } else { &mut cmds };
            let spent = &mut steps[which];
            let mut started = Instant::now();
            let mut hook = |op: &'static str, done: bool| {
                if done {
                    *spent.entry(op).or_default() += started.elapsed().as_secs_f64() * 1e3;
                } else {
                    started = Instant::now();
                }
            };
            let mut ops = dough_net::ops::Observed {
                inner,
                hook: &mut hook,
            };
            let t = Instant::now();
            dough_net::setup(&mut ops, &plan, pool).with_context(|| format!("setting up {id}"))?;
            let up = t.elapsed().as_secs_f64() * 1e3;
            let t = Instant::now();
            dough_net::teardown(&mut ops, &plan).with_context(|| format!("tearing down {id}"))?;
            let down = t.elapsed().as_secs_f64() * 1e3;
            times[which].0.push(up);
            times[which].1.push(down);
        }
    }
    let stats = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        let pct = |p: f64| v[((p / 100.0 * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
        json!({
            "p50_ms": round(pct(50.0)),
            "p90_ms": round(pct(90.0)),
            "max_ms": round(*v.last().unwrap_or(&0.0)),
            "mean_ms": round(v.iter().sum::<f64>() / v.len() as f64),
        })
    };
    let [(nl_up, nl_down), (c_up, c_down)] = times;
    let per_step = |m: &std::collections::BTreeMap<&'static str, f64>| {
        let v: serde_json::Map<String, Value> = m
            .iter()
            .map(|(k, t)| (k.to_string(), json!(round(t / a.count as f64))))
            .collect();
        Value::Object(v)
    };
    let nl = json!({"setup": stats(nl_up), "teardown": stats(nl_down), "mean_ms_per_clone_by_step": per_step(&steps[0])});
    let cm = json!({"setup": stats(c_up), "teardown": stats(c_down), "mean_ms_per_clone_by_step": per_step(&steps[1])});
    let ratio = |phase: &str| {
        let n = nl[phase]["p50_ms"].as_f64().unwrap_or(0.0);
        let c = cm[phase]["p50_ms"].as_f64().unwrap_or(0.0);
        if c > 0.0 {
            json!((n / c * 100.0).round() / 100.0)
        } else {
            Value::Null
        }
    };
    let out = json!({
        "bench": "net",
        "count": a.count,
        "egress": a.net.to_string(),
        "netlink": nl,
        "commands": cm,
        "ratio_netlink_over_commands": {"setup_p50": ratio("setup"), "teardown_p50": ratio("teardown")},
    });
    let mut stdout = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut stdout, &out)?;
    writeln!(stdout)?;
    Ok(ExitCode::SUCCESS)
}

/// Latency figures in milliseconds (nearest-rank percentiles).
/// The `p`-th percentile (nearest rank) of `sorted`, which is not empty.
fn nearest_rank(sorted: &[f64], p: f64) -> f64 {
    let i = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[i.clamp(1, sorted.len()) - 1]
}

fn summary(mut ms: Vec<f64>, wall: Duration) -> Value {
    ms.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| nearest_rank(&ms, p);
    json!({
        "p50_ms": round(pct(50.0)),
        "p90_ms": round(pct(90.0)),
        "max_ms": round(*ms.last().unwrap_or(&0.0)),
        "wall_ms": round(wall.as_secs_f64() * 1e3),
        "clones_per_sec": round(ms.len() as f64 / wall.as_secs_f64()),
    })
}

fn round(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn mean_pss_kib(pids: &[i32]) -> Option<u64> {
    let v: Vec<u64> = pids
        .iter()
        .filter_map(|&p| dough_vmm::process::pss_kib(p))
        .collect();
    (!v.is_empty()).then(|| v.iter().sum::<u64>() / v.len() as u64)
}

fn mem_available_kib() -> Option<u64> {
    std::fs::read_to_string("/proc/meminfo")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn clones(ctx: &Ctx, a: ClonesArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        !a.sizes.is_empty() && a.sizes.iter().all(|&n| (1..=64).contains(&n)),
        "--sizes must be numbers from 1 to 64"
    );
    install_teardown_on_signal(&ctx.vms);
    let image = resolve_image(ctx, &a.vm)?;
    anyhow::ensure!(
        a.vm.backend == crate::vm_args::BackendArg::Qemu,
        "`dough bench clones` compares dough's restore with a raw QEMU restore of the same snapshot; it measures the QEMU backend only"
    );
    let opts = boot_options(&ctx.home, &image, &a.vm)?;
    let got = ensure_snapshot(ctx, &image, &opts, false)?;
    let snap = got.snapshot().clone();
    let settle = Duration::from_secs(a.settle);
    // One unmeasured round of each first, so neither side pays for cold
    // caches (QEMU's binary and libraries, the memory file's pages).
    eprintln!("dough: bench: warming up");
    dough_round(ctx, &snap, &opts, 1, Duration::ZERO, Round::FirstExec)?;
    raw_round(ctx, &snap, &opts, 1, Duration::ZERO)?;
    let mut rows = Vec::new();
    let mut last_pss = None;
    for &n in &a.sizes {
        eprintln!("dough: bench: {n} dough clone(s)");
        let (mut dough, _) = dough_round(ctx, &snap, &opts, n, settle, Round::Ready)?;
        eprintln!("dough: bench: {n} raw QEMU restore(s)");
        let (raw, raw_pss) = raw_round(ctx, &snap, &opts, n, settle)?;
        eprintln!("dough: bench: {n} dough clone(s), each running `true` once ready");
        let (exec, exec_pss) = dough_round(ctx, &snap, &opts, n, settle, Round::FirstExec)?;
        dough["restore_to_first_exec"] = exec["restore_to_first_exec"].clone();
        dough["pss_kib_after_first_exec"] = exec["pss_kib_per_idle_clone"].clone();
        let ratio = |k: &str| {
            let d = dough["restore_to_ready"][k].as_f64().unwrap_or(0.0);
            let r = raw[k].as_f64().unwrap_or(0.0);
            if r > 0.0 {
                json!((d / r * 100.0).round() / 100.0)
            } else {
                Value::Null
            }
        };
        last_pss = exec_pss;
        rows.push(json!({
            "n": n,
            "dough": dough,
            "raw_qemu": { "restore_to_first_message": raw, "pss_kib_per_idle_clone": raw_pss },
            // dough's restore → ready (Welcome sent) against the raw
            // restore → the agent's first message.
            "ratio_dough_over_raw": {
                "p50": ratio("p50_ms"),
                "p90": ratio("p90_ms"),
                "clones_per_sec": ratio("clones_per_sec"),
            },
        }));
    }
    let avail = mem_available_kib();
    let out = json!({
        "bench": "clones",
        "host": {
            "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            "mem_available_kib": avail,
        },
        "accel": opts.accel.to_string(),
        "snapshot": {
            "key": snap.key,
            "mem_mib": snap.meta.mem_mib,
            "vcpus": snap.meta.cpus,
            "bake_secs": round(snap.meta.bake_secs * 10.0) / 10.0,
            "device_state_bytes": snap.meta.state_bytes,
        },
        "results": rows,
        "clones_that_fit_in_available_memory": match (avail, last_pss) {
            (Some(m), Some(p)) if p > 0 => json!(m / p),
            _ => Value::Null,
        },
    });
    let mut stdout = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut stdout, &out)?;
    writeln!(stdout)?;
    Ok(ExitCode::SUCCESS)
}

/// CPU time (user + system) of `pid` so far, in clock ticks.
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime is the
    // 14th field of the line, stime the 15th.
    let rest = stat.rsplit(") ").next().unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
    n(11) + n(12)
}

/// Clones handed over by a benchmark, taken down whatever
/// happens.
pub(crate) struct Handed<'a> {
    pub(crate) vms: &'a std::path::Path,
    pub(crate) ids: Vec<String>,
}

impl Drop for Handed<'_> {
    fn drop(&mut self) {
        let ids: Vec<String> = self.ids.drain(..).collect();
        dough_fabric::pool::down_many(
            self.vms,
            &ids,
            &dough_fabric::host::HostNet::linux,
            &|_, _| {},
        );
    }
}

fn density(ctx: &Ctx, a: DensityArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!((1..=512).contains(&a.clones), "--clones must be 1 to 512");
    anyhow::ensure!(a.window >= 1, "--window must be at least 1 second");
    install_teardown_on_signal(&ctx.vms);
    let image = resolve_image(ctx, &a.vm)?;
    let opts = boot_options(&ctx.home, &image, &a.vm)?;
    let got = ensure_snapshot(ctx, &image, &opts, false)?;
    let snap = got.snapshot().clone();
    let req = ExecRequest {
        argv: vec!["true".into()],
        ..ExecRequest::default()
    };
    let exec_ms = |id: &str| -> anyhow::Result<f64> {
        let t = Instant::now();
        dough_fabric::pool::exec(&ctx.vms, id, &req, &mut |_, _| {}, &mut |_| {})?;
        Ok(t.elapsed().as_secs_f64() * 1e3)
    };
    // The baseline: one clone alone on the host, handed over like the
    // others, a few `exec true` after a first one.
    eprintln!("dough: bench: a lone clone");
    let lone_id = Vm::restore(&ctx.vms, &snap, VmKind::Clone, &opts)?.detach()?;
    let lone = Handed {
        vms: &ctx.vms,
        ids: vec![lone_id.clone()],
    };
    let lone_first = exec_ms(&lone_id)?;
    let mut lone_ms: Vec<f64> = (0..9)
        .map(|_| exec_ms(&lone_id))
        .collect::<Result<_, _>>()?;
    drop(lone);
    lone_ms.sort_by(f64::total_cmp);
    let lone_p50 = lone_ms[lone_ms.len() / 2];

    eprintln!("dough: bench: bringing up {} clones", a.clones);
    let up = Instant::now();
    let mut handed = Handed {
        vms: &ctx.vms,
        ids: Vec::new(),
    };
    // A few at a time: the point is the steady state, not the stampede.
    for chunk in (0..a.clones).collect::<Vec<_>>().chunks(8) {
        let got: Vec<anyhow::Result<String>> = std::thread::scope(|s| {
            let hs: Vec<_> = chunk
                .iter()
                .map(|_| {
                    s.spawn(|| -> anyhow::Result<String> {
                        Ok(Vm::restore(&ctx.vms, &snap, VmKind::Clone, &opts)?.detach()?)
                    })
                })
                .collect();
            hs.into_iter()
                .map(|h| h.join().expect("bench thread"))
                .collect()
        });
        for r in got {
            handed.ids.push(r.context("a clone failed to come up")?);
        }
    }
    let up_secs = up.elapsed().as_secs_f64();
    eprintln!("dough: bench: letting them settle for {}s", a.settle);
    std::thread::sleep(Duration::from_secs(a.settle));
    let pids: Vec<i32> = dough_fabric::state::list(&ctx.vms)
        .iter()
        .filter(|r| handed.ids.contains(&r.id))
        .filter_map(|r| r.vmm.map(|v| v.pid))
        .collect();
    let before: u64 = pids.iter().map(|&p| cpu_ticks(p)).sum();
    let window = Instant::now();
    std::thread::sleep(Duration::from_secs(a.window));
    let after: u64 = pids.iter().map(|&p| cpu_ticks(p)).sum();
    // SAFETY: sysconf only reads a constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let idle_core_pct = (after - before) as f64 / hz / window.elapsed().as_secs_f64() * 100.0;
    let idle_pss = mean_pss_kib(&pids);
    // Each clone with a network also has its egress gateway process; it is
    // part of what a clone costs, and its idle CPU is measured too.
    let gateways: Vec<i32> = dough_fabric::state::list(&ctx.vms)
        .iter()
        .filter(|r| handed.ids.contains(&r.id))
        .filter_map(|r| r.gateway.map(|g| g.pid))
        .collect();
    let gateway_pss = mean_pss_kib(&gateways);
    let gateway_ticks: u64 = gateways.iter().map(|&p| cpu_ticks(p)).sum();
    eprintln!(
        "dough: bench: exec true on {} of them",
        a.sample.min(a.clones)
    );
    let step = (a.clones / a.sample.clamp(1, a.clones)).max(1);
    let sampled: Vec<String> = handed
        .ids
        .iter()
        .step_by(step)
        .take(a.sample)
        .cloned()
        .collect();
    // Each sampled clone's first exec (its first host in a while, pages
    // touched for the first time), then a second one: the steady state,
    // compared with the lone clone's.
    let (mut first, mut ms) = (Vec::new(), Vec::new());
    for id in &sampled {
        first.push(exec_ms(id)?);
        ms.push(exec_ms(id)?);
    }
    first.sort_by(f64::total_cmp);
    ms.sort_by(f64::total_cmp);
    let sampled_pids: Vec<i32> = dough_fabric::state::list(&ctx.vms)
        .iter()
        .filter(|r| sampled.contains(&r.id))
        .filter_map(|r| r.vmm.map(|v| v.pid))
        .collect();
    let pss_after_exec = mean_pss_kib(&sampled_pids);
    // A noisy neighbour: one clone spins every vCPU it has; the others'
    // `exec true` (steady state) next to the idle figure above. Its VMM's
    // cgroup caps it at its vCPUs' worth of CPU.
    let noisy = handed.ids[0].clone();
    eprintln!("dough: bench: {noisy} spins all its vCPUs; exec true on the others");
    let spin = ExecRequest {
        argv: vec![
            "sh".into(),
            "-c".into(),
            "for i in $(seq $(nproc)); do nohup sh -c 'while :; do :; done' >/dev/null 2>&1 & done"
                .into(),
        ],
        ..ExecRequest::default()
    };
    dough_fabric::pool::exec(&ctx.vms, &noisy, &spin, &mut |_, _| {}, &mut |_| {})?;
    std::thread::sleep(Duration::from_secs(2));
    let noisy_pid = dough_fabric::state::list(&ctx.vms)
        .iter()
        .find(|r| r.id == noisy)
        .and_then(|r| r.vmm.map(|v| v.pid));
    let noisy_before = noisy_pid.map(cpu_ticks);
    let noisy_window = Instant::now();
    let mut busy_ms = Vec::new();
    for id in sampled.iter().filter(|id| **id != noisy) {
        busy_ms.push(exec_ms(id)?);
    }
    let noisy_cores = noisy_pid
        .zip(noisy_before)
        .map(|(p, b)| (cpu_ticks(p) - b) as f64 / hz / noisy_window.elapsed().as_secs_f64());
    busy_ms.sort_by(f64::total_cmp);
    eprintln!("dough: bench: tearing down");
    let plans: Vec<dough_net::NetPlan> = dough_fabric::state::list(&ctx.vms)
        .into_iter()
        .filter_map(|r| r.net)
        .collect();
    let down = Instant::now();
    drop(handed);
    let down_secs = down.elapsed().as_secs_f64();
    // Teardown is exact (the veth pair is deleted, not left to the
    // kernel's netns cleanup): whatever of the clones' plans is still on
    // the host now is left over.
    let mut ops = LinuxNet::default();
    let lingering = plans
        .iter()
        .filter(|p| !dough_net::gone(&mut ops, p).unwrap_or(false))
        .count();
    let dirs_left = dough_fabric::state::list(&ctx.vms).len();
    let net_left = dough_net::find_leftovers(
        &mut LinuxNet::default(),
        &dough_fabric::host::net_scope(&ctx.vms),
        &dough_fabric::state::list_ids(&ctx.vms),
    )
    .map(|l| l.netns.len() + l.veths.len() + l.tags.len() + lingering)
    .ok();
    let pct = |v: &[f64], q: f64| v[((v.len() - 1) as f64 * q / 100.0).round() as usize];
    let p50 = pct(&ms, 50.0);
    let busy_p50 = (!busy_ms.is_empty()).then(|| pct(&busy_ms, 50.0));
    let per_clone_pct = idle_core_pct / a.clones as f64;
    let out = json!({
        "bench": "density",
        "host": {
            "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            "mem_available_kib": mem_available_kib(),
        },
        "accel": opts.accel.to_string(),
        "backend": opts.backend.to_string(),
        "clones": a.clones,
        "up_secs": round(up_secs),
        "idle": {
            "settle_secs": a.settle,
            "window_secs": a.window,
            "cpu_pct_of_one_core_total": round(idle_core_pct),
            "cpu_pct_of_one_core_per_clone": (per_clone_pct * 1000.0).round() / 1000.0,
            "pss_kib_per_clone": idle_pss,
            "gateways": gateways.len(),
            "gateway_pss_kib_per_clone": gateway_pss,
            "gateway_cpu_ticks_total_since_start": gateway_ticks,
        },
        "exec_true_ms": {
            "sampled": ms.len(),
            "first_p50": round(pct(&first, 50.0)),
            "first_p90": round(pct(&first, 90.0)),
            "lone_clone_first": round(lone_first),
            "p50": round(p50),
            "p90": round(pct(&ms, 90.0)),
            "lone_clone_p50": round(lone_p50),
            "ratio_p50_over_lone": (p50 / lone_p50 * 100.0).round() / 100.0,
            "pss_kib_per_clone_after_exec": pss_after_exec,
        },
        "noisy_neighbour": {
            "vcpus_spinning": opts.cpus,
            "its_cpu_cores_used": noisy_cores.map(|c| (c * 100.0).round() / 100.0),
            "others_exec_true_p50": busy_p50.map(round),
            "others_exec_true_p90": (!busy_ms.is_empty()).then(|| round(pct(&busy_ms, 90.0))),
            "ratio_p50_over_idle": busy_p50.map(|b| (b / p50 * 100.0).round() / 100.0),
        },
        "teardown": {
            "secs": round(down_secs),
            "vm_dirs_left": dirs_left,
            "network_objects_left": net_left,
        },
        // Issue 15's targets for 128 clones on a 2-core host.
        "targets": {
            "idle_cpu_total_le_10pct": idle_core_pct <= 10.0,
            "exec_p50_le_1_5x_lone": p50 <= 1.5 * lone_p50,
            "pss_after_exec_le_24mib": pss_after_exec.map(|k| k <= 24 << 10),
            "gateway_pss_le_1mib": gateway_pss.map(|k| k <= 1024),
            "noisy_neighbour_exec_p50_le_2x_idle": busy_p50.map(|b| b <= 2.0 * p50),
        },
    });
    let mut stdout = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut stdout, &out)?;
    writeln!(stdout)?;
    Ok(ExitCode::SUCCESS)
}

/// What a round of dough clones measures.
#[derive(Clone, Copy, PartialEq)]
enum Round {
    /// Restore → ready alone, as the raw round does (no clone's command
    /// loads the host while others are still restoring).
    Ready,
    /// Restore → ready → `true` run and exited, each clone on its own.
    FirstExec,
}

/// N clones through dough's own path: restore, Welcome, and for
/// [`Round::FirstExec`] `true` run in each.
fn dough_round(
    ctx: &Ctx,
    snap: &Snapshot,
    opts: &dough_fabric::BootOptions,
    n: usize,
    settle: Duration,
    round: Round,
) -> anyhow::Result<(Value, Option<u64>)> {
    let req = ExecRequest {
        argv: vec!["true".into()],
        ..ExecRequest::default()
    };
    let start = Instant::now();
    type Timed = (Vm, f64, f64, Duration);
    let results: Vec<anyhow::Result<Timed>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..n)
            .map(|_| {
                s.spawn(|| {
                    let t = Instant::now();
                    let mut vm = Vm::restore(&ctx.vms, snap, VmKind::Run, opts)?;
                    let ready = t.elapsed().as_secs_f64() * 1e3;
                    let ready_at = start.elapsed();
                    if round == Round::FirstExec {
                        vm.exec(&req, &mut |_, _| {})?;
                    }
                    Ok((vm, ready, t.elapsed().as_secs_f64() * 1e3, ready_at))
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("bench thread"))
            .collect()
    });
    let wall = start.elapsed();
    let mut vms = Vec::new();
    let (mut ready_ms, mut exec_ms, mut net_ms) = (Vec::new(), Vec::new(), Vec::new());
    let mut ready_wall = Duration::ZERO;
    for r in results {
        let (vm, ready, exec, at) = r.context("a dough clone failed")?;
        net_ms.push(vm.net_on_path.as_secs_f64() * 1e3);
        vms.push(vm);
        ready_ms.push(ready);
        exec_ms.push(exec);
        ready_wall = ready_wall.max(at);
    }
    std::thread::sleep(settle);
    let pids: Vec<i32> = vms.iter().map(|v| v.pid()).collect();
    let pss = mean_pss_kib(&pids);
    for vm in vms {
        vm.destroy()?;
    }
    net_ms.sort_by(f64::total_cmp);
    let net_pct = |p: f64| (nearest_rank(&net_ms, p) * 100.0).round() / 100.0;
    let first_exec = match round {
        Round::FirstExec => summary(exec_ms, wall),
        Round::Ready => Value::Null,
    };
    let v = json!({
        "restore_to_ready": summary(ready_ms, ready_wall),
        "restore_to_first_exec": first_exec,
        // Building the clone's network, on the restore's own path (the
        // netns and TAP, then any wait for the rest, which is built while
        // the VMM starts).
        "network_on_restore_path_ms": {"p50": net_pct(50.0), "p90": net_pct(90.0)},
        "pss_kib_per_idle_clone": pss,
    });
    Ok((v, pss))
}

/// A QEMU restored by hand: the same argv dough uses for a clone, and only
/// the QMP steps a restore cannot do without; no state records, no
/// Welcome, no exec.
struct RawClone {
    dir: VmDir,
    /// None until spawned: the guard exists from the claim on.
    child: Option<std::process::Child>,
}

impl Drop for RawClone {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Ok(rec) = self.dir.read() {
            dough_fabric::gc::teardown_net(&rec, &dough_fabric::host::HostNet::linux());
        }
        let _ = std::fs::remove_dir_all(self.dir.dir());
    }
}

fn raw_one(
    ctx: &Ctx,
    snap: &Snapshot,
    dough_opts: &dough_fabric::BootOptions,
) -> anyhow::Result<(RawClone, f64)> {
    let (qemu, pool) = (&dough_opts.qemu, dough_opts.net_pool);
    let m = &snap.meta;
    let id = format!("raw-{}", &dough_fabric::new_vm_id()[3..]);
    // Recorded like any VM (owned by this process), so a crash mid-bench
    // leaves nothing the next dough would not reclaim.
    let mut rec = VmRecord::new(&id, VmKind::Run, m.accel, m.mem_mib, m.cpus);
    rec.snapshot = Some(snap.key.clone());
    // The snapshot has a NIC, so the raw clone needs a TAP too (in its own
    // netns, no way out), built by dough's own first launch step but
    // outside the timing.
    let opts = dough_fabric::BootOptions {
        net_pool: pool,
        ..dough_fabric::BootOptions::default()
    };
    let (dir, plan) = dough_fabric::vm::claim(&ctx.vms, &mut rec, &opts, Egress::None)?;
    // From here on, whatever fails leaves nothing behind.
    let mut raw = RawClone { dir, child: None };
    let args = QemuArgs {
        accel: m.accel,
        mem_mib: m.mem_mib,
        cpus: m.cpus,
        kernel: m.image.kernel.clone(),
        initrd: m.image.initrd.clone(),
        rootfs: m.image.rootfs.clone(),
        rootfs_writable: false,
        scratch: snap.scratch.is_some(),
        extra_cmdline: NetPlan::guest_cmdline()
            .into_iter()
            .chain(
                snap.scratch
                    .as_ref()
                    .map(|_| dough_fabric::backend::SCRATCH_CMDLINE.to_string()),
            )
            .chain(m.extra_cmdline.iter().cloned())
            .collect(),
        tsc_khz: m.tsc_khz,
        paths: raw.dir.paths.clone(),
        memory: Memory::File {
            path: snap.mem.clone(),
            shared: false,
        },
        // QEMU 7.2 cannot set x-ignore-shared from the command line, so
        // even by hand it takes `-incoming defer` and two QMP commands.
        incoming: Some(Incoming::Defer),
        start_paused: false,
        tap: Some(plan.tap.clone()),
        tcg_cache_mib: dough_opts.tcg_cache_mib,
    };
    let t = Instant::now();
    // Its own copy of the snapshot's scratch disk, as dough makes one.
    if let Some(scratch) = &snap.scratch {
        dough_fabric::disk::copy_sparse(scratch, &raw.dir.paths.scratch)?;
    }
    let mut cmd = Command::new(qemu);
    cmd.args(args.argv())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0);
    // No teardown on a signal may run between the spawn and the record.
    let spawning = dough_fabric::host::SPAWNING.read();
    let spawned = opts.net.spawn_in(Some(&plan.netns), &mut cmd);
    let child = spawned?.with_context(|| format!("starting {}", qemu.display()))?;
    let vmm = ProcessId::of(child.id() as i32);
    raw.child = Some(child);
    raw.dir.update(|r| {
        r.vmm = vmm;
        r.transition(VmState::Starting)
    })?;
    drop(spawning);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut q = loop {
        match Qmp::connect(&raw.dir.paths.qmp, Duration::from_secs(10)) {
            Ok(q) => break q,
            Err(e) if Instant::now() >= deadline => return Err(e).context("raw clone's QMP"),
            Err(_) => std::thread::sleep(Duration::from_millis(1)),
        }
    };
    q.ignore_shared_ram()?;
    q.migrate_incoming(&dough_vmm::qemu::exec_uri(&snap.state, false))?;
    // The snapshot was saved paused, and QEMU keeps a migrated VM's run
    // state: it needs a `cont` even by hand.
    q.wait_migration(Duration::from_secs(30))?;
    q.cont()?;
    // Ask the agent to greet and wait for its first message.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match greet(&raw.dir.paths.channel) {
            Ok(()) => break,
            Err(e) if Instant::now() >= deadline => {
                return Err(e).context("the raw clone's agent never greeted")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(1)),
        }
    }
    Ok((raw, t.elapsed().as_secs_f64() * 1e3))
}

/// Connect to a channel socket, send Attach, read until the agent's Hello.
fn greet(path: &std::path::Path) -> anyhow::Result<()> {
    let mut s = UnixStream::connect(path)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(&dough_proto::encode(&HostMsg::Attach)?)?;
    loop {
        let frame =
            dough_proto::read_frame(&mut s)?.ok_or_else(|| anyhow::anyhow!("channel closed"))?;
        if let GuestMsg::Hello(_) = dough_proto::decode_guest(&frame)? {
            return Ok(());
        }
    }
}

fn raw_round(
    ctx: &Ctx,
    snap: &Snapshot,
    opts: &dough_fabric::BootOptions,
    n: usize,
    settle: Duration,
) -> anyhow::Result<(Value, Option<u64>)> {
    let start = Instant::now();
    let results: Vec<anyhow::Result<(RawClone, f64)>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..n)
            .map(|_| s.spawn(|| raw_one(ctx, snap, opts)))
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("bench thread"))
            .collect()
    });
    let wall = start.elapsed();
    let mut raws = Vec::new();
    let mut ms = Vec::new();
    for r in results {
        let (raw, t) = r.context("a raw QEMU restore failed")?;
        raws.push(raw);
        ms.push(t);
    }
    std::thread::sleep(settle);
    let pids: Vec<i32> = raws
        .iter()
        .filter_map(|r| r.child.as_ref().map(|c| c.id() as i32))
        .collect();
    let pss = mean_pss_kib(&pids);
    drop(raws);
    Ok((summary(ms, wall), pss))
}
