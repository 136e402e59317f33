//! `dough run`: boot a fresh VM, run one command, stream its output, exit
//! with its exit code, destroy the VM (like `docker run --rm`).

use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use dough_fabric::{Vm, VmKind};

use crate::cli::Ctx;
use crate::exec_args::{exit_code, stream_sink, ExecArgs};
use crate::snapshots::ensure_snapshot;
use crate::teardown::install_teardown_on_signal;
use crate::vm_args::{boot_options, resolve_image, VmArgs};

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub vm: VmArgs,
    /// Boot the image instead of restoring a clone of its baked snapshot
    /// (slower; nothing is baked).
    #[arg(long)]
    pub cold: bool,
    /// Print boot timing and the VMM's peak RSS on stderr.
    #[arg(long)]
    pub stats: bool,
    /// Save the clone's egress log (every DNS query and connection through
    /// its gateway, as JSON lines: see `dough logs --net`) to FILE before
    /// the clone is destroyed. Without it, denied queries and connections
    /// are summed up on stderr.
    #[arg(long, value_name = "FILE")]
    pub net_log: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub secrets: crate::broker_args::SecretArgs,
    #[command(flatten)]
    pub exec: ExecArgs,
}

pub fn run(ctx: &Ctx, args: RunArgs) -> anyhow::Result<ExitCode> {
    install_teardown_on_signal(&ctx.vms);
    let image = resolve_image(ctx, &args.vm)?;
    let mut opts = boot_options(&ctx.home, &image, &args.vm)?;
    let mut req = args.exec.request()?;
    let secrets = args.secrets.resolve(&opts.egress)?;
    if !secrets.brokers.is_empty() {
        opts.ca = Some(crate::broker_args::dough_ca(&ctx.home)?);
        opts.brokers = secrets.brokers;
    }
    // -e and --env-file win over a secret of the same name.
    req.env = secrets.env.into_iter().chain(req.env).collect();
    let mut vm = if args.cold {
        Vm::boot(&ctx.vms, &image, &opts).context("booting the VM")?
    } else {
        let snap = ensure_snapshot(ctx, &image, &opts, false)?;
        Vm::restore(&ctx.vms, snap.snapshot(), VmKind::Run, &opts).context("restoring a clone")?
    };
    if args.stats {
        eprintln!(
            "dough: VM {} ready in {:.2}s ({}, {})",
            vm.id,
            vm.boot_time.as_secs_f64(),
            vm.accel,
            if args.cold { "cold boot" } else { "restored" }
        );
    }
    let result = vm.exec(&req, &mut stream_sink);
    if args.stats {
        if let Some(kib) = vm.vmm_peak_rss_kib() {
            eprintln!("dough: VMM peak RSS {} MiB", kib / 1024);
        }
    }
    let log = vm.paths.dir.join(dough_fabric::vm::GATEWAY_AUDIT_LOG);
    if let Some(to) = &args.net_log {
        match std::fs::copy(&log, to) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::write(to, b"").with_context(|| format!("writing {}", to.display()))?
            }
            Err(e) => {
                return Err(e).with_context(|| format!("saving the egress log to {}", to.display()))
            }
        }
    } else if let Ok(events) = dough_gateway::audit::read(&log) {
        let denied: Vec<_> = events
            .iter()
            .filter(|e| e.verdict == dough_gateway::audit::Verdict::Deny)
            .collect();
        if !denied.is_empty() {
            eprintln!(
                "dough: egress: {} of {} queries and connections were denied (--net-log FILE keeps them all); the first:",
                denied.len(),
                events.len()
            );
            for e in denied.iter().take(5) {
                eprintln!("dough:   {}", dough_fabric::serial::printable(&e.line()));
            }
        }
    }
    vm.destroy()?;
    Ok(exit_code(&result?))
}
