//! `dough run`: boot a fresh VM, run one command, stream its output, exit
//! with its exit code, destroy the VM (like `docker run --rm`).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, ValueEnum};
use dough_fabric::snapshot::Ensured;
use dough_fabric::{gc, BootOptions, ExecRequest, SnapshotSpec, SnapshotStore, Vm, VmKind};
use dough_image::{Image, Store};
use dough_proto::{ExitStatus, Stream};
use dough_vmm::{Accel, Backend, Resolved};

use crate::cli::Ctx;
use crate::image_cmd::{self, AgentArg, BuildArgs};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AccelArg {
    /// KVM when it is present and boots a guest in time, else TCG.
    Auto,
    /// Hardware virtualisation (the only real isolation boundary).
    Kvm,
    /// Software emulation: works everywhere, is not a security boundary.
    Tcg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendArg {
    /// QEMU microvm: KVM when usable, else TCG; runs everywhere.
    Qemu,
    /// Firecracker: needs usable KVM and a firecracker binary
    /// (--firecracker / DOUGH_FIRECRACKER); docs/firecracker.md.
    Firecracker,
}

impl From<BackendArg> for Backend {
    fn from(b: BackendArg) -> Backend {
        match b {
            BackendArg::Qemu => Backend::Qemu,
            BackendArg::Firecracker => Backend::Firecracker,
        }
    }
}

impl From<AccelArg> for Accel {
    fn from(a: AccelArg) -> Accel {
        match a {
            AccelArg::Auto => Accel::Auto,
            AccelArg::Kvm => Accel::Kvm,
            AccelArg::Tcg => Accel::Tcg,
        }
    }
}

/// Options shared by every command that boots a VM.
#[derive(Debug, Clone, Args)]
pub struct VmArgs {
    /// Which VMM runs the VMs. Snapshots are baked per backend; clones
    /// restore with the backend of their snapshot.
    #[arg(long, value_enum, default_value = "qemu", env = "DOUGH_BACKEND")]
    pub backend: BackendArg,
    /// Firecracker binary (for --backend firecracker); no registry ships
    /// one, so point dough at a release binary.
    #[arg(
        long,
        default_value = "firecracker",
        env = "DOUGH_FIRECRACKER",
        value_name = "PATH"
    )]
    pub firecracker: PathBuf,
    /// Start Firecracker with `--enable-pci` (virtio over PCI instead of
    /// MMIO; Firecracker 1.13+). Part of the snapshot key.
    #[arg(long, env = "DOUGH_FIRECRACKER_PCI")]
    pub firecracker_pci: bool,
    /// Accelerator (QEMU; Firecracker always uses KVM).
    #[arg(long, value_enum, default_value = "auto", env = "DOUGH_ACCEL")]
    pub accel: AccelArg,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    pub mem: u32,
    /// Guest vCPUs.
    #[arg(long, default_value_t = 1)]
    pub cpus: u32,
    /// Seconds one boot attempt may take before it counts as failed (one retry follows).
    #[arg(long, default_value_t = 60, value_name = "SECS")]
    pub boot_timeout: u64,
    /// QEMU binary.
    #[arg(long, default_value = "qemu-system-x86_64", env = "DOUGH_QEMU")]
    pub qemu: PathBuf,
    /// Image id to boot (default: the current image; built if there is none).
    #[arg(long)]
    pub image: Option<String>,
    /// Extra kernel command-line argument (repeatable), e.g. `ignore_loglevel`
    /// to see every kernel message in `serial.log`.
    #[arg(long = "kernel-arg", value_name = "ARG")]
    pub kernel_args: Vec<String>,
    /// What the VM's network may reach: `nat` (anything, through NAT),
    /// `none` (no way out), or `allow=CIDR[:PORT],...` (only those).
    #[arg(long, default_value = "nat", env = "DOUGH_NET", value_name = "POLICY")]
    pub net: dough_net::Egress,
    /// Pool the per-clone /30 transfer subnets are taken from.
    #[arg(long, default_value = dough_net::plan::DEFAULT_POOL, env = "DOUGH_NET_POOL", value_name = "CIDR")]
    pub net_pool: dough_net::Ipv4Net,
    #[command(flatten)]
    pub agent: AgentArg,
}

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
    #[command(flatten)]
    pub exec: ExecArgs,
}

/// What to run in a VM and how.
#[derive(Debug, Args)]
pub struct ExecArgs {
    /// Kill the command after SECS seconds (exit code 124).
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<f64>,
    /// Set an environment variable in the command (repeatable). `-e KEY`
    /// alone takes KEY's value from dough's own environment: use it (or
    /// --env-file) for secrets, since a KEY=VALUE argument is visible in
    /// `ps` to every user of this host.
    #[arg(short, long = "env", value_name = "KEY[=VALUE]", value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    /// Read variables from FILE: one KEY=VALUE per line; blank lines and
    /// lines starting with # are skipped (repeatable; -e wins over a file).
    #[arg(long, value_name = "FILE")]
    pub env_file: Vec<PathBuf>,
    /// Working directory inside the guest (default /root).
    #[arg(short = 'w', long)]
    pub workdir: Option<String>,
    /// Send this process's stdin to the command (read to the end first).
    #[arg(short, long)]
    pub interactive: bool,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<String>,
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        Some(_) => Err(format!("expected KEY=VALUE or KEY, got {s:?}")),
        // KEY alone: the value comes from dough's environment, so it never
        // appears on a command line.
        None if !s.is_empty() => std::env::var(s)
            .map(|v| (s.to_string(), v))
            .map_err(|_| format!("-e {s}: {s} is not set in dough's environment")),
        None => Err("expected KEY=VALUE or KEY".into()),
    }
}

/// Variables from an `--env-file`: `KEY=VALUE` lines; blank lines and
/// `#` comments skipped; a malformed line is an error naming it.
fn read_env_file(path: &Path) -> anyhow::Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading --env-file {}", path.display()))?;
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let l = line.trim_start();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        match l.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => out.push((k.trim().to_string(), v.to_string())),
            _ => anyhow::bail!(
                "--env-file {} line {}: expected KEY=VALUE",
                path.display(),
                n + 1
            ),
        }
    }
    Ok(out)
}

/// The image to boot: the one named, else the current one, else build it.
pub fn resolve_image(home: &Path, vm: &VmArgs) -> anyhow::Result<Image> {
    let store = Store::new(home);
    if let Some(id) = &vm.image {
        return Ok(store.get(id)?);
    }
    match store.current() {
        Ok(img) => Ok(img),
        Err(dough_image::ImageError::NoImage) => {
            eprintln!("dough: no guest image yet; building one (first time only)");
            image_cmd::build(
                home,
                &BuildArgs {
                    agent: vm.agent.clone(),
                    packages: vec![],
                    mirror: None,
                },
            )
        }
        Err(e) => Err(e.into()),
    }
}

/// Boot options for `vm`, resolving the accelerator (and warning about TCG once).
pub fn boot_options(home: &Path, image: &Image, vm: &VmArgs) -> anyhow::Result<BootOptions> {
    let base = BootOptions {
        backend: vm.backend.into(),
        qemu: vm.qemu.clone(),
        firecracker: dough_vmm::firecracker::backend::FcConfig {
            binary: vm.firecracker.clone(),
            extra_args: if vm.firecracker_pci {
                vec!["--enable-pci".into()]
            } else {
                vec![]
            },
            ..Default::default()
        },
        mem_mib: vm.mem,
        cpus: vm.cpus,
        deadline: Duration::from_secs(vm.boot_timeout),
        extra_cmdline: vm.kernel_args.clone(),
        egress: vm.net.clone(),
        net_pool: vm.net_pool,
        ..BootOptions::default()
    };
    if base.backend == Backend::Firecracker {
        anyhow::ensure!(
            vm.accel != AccelArg::Tcg,
            "--accel tcg: Firecracker runs guests under KVM only (use --backend qemu for TCG)"
        );
        return Ok(BootOptions {
            accel: Resolved::Kvm,
            ..base
        });
    }
    let choice = dough_fabric::accel::choose(vm.accel.into(), home, image, &vm.qemu)?;
    if let Some(why) = &choice.fallback_reason {
        eprintln!("dough: KVM is not usable here ({why}); using TCG");
    }
    if choice.accel == Resolved::Tcg {
        eprintln!("dough: warning: {}", dough_vmm::accel::TCG_WARNING);
    }
    Ok(BootOptions {
        accel: choice.accel,
        ..base
    })
}

/// Reclaim what crashed dough processes left behind and mark clones whose
/// VMM died, saying what was done.
pub fn sweep(vms: &Path) {
    for s in gc::sweep(vms) {
        eprintln!("dough: {s}");
    }
}

static TEARING_DOWN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether a signal is tearing this process's VMs down (errors the main
/// thread sees meanwhile are a consequence, not news: the signal thread
/// reports and exits).
pub fn tearing_down() -> bool {
    TEARING_DOWN.load(std::sync::atomic::Ordering::SeqCst)
}

/// On SIGINT/SIGTERM/SIGHUP, tear down this process's VMs and exit 130.
/// Must be called before any other thread starts (it sets the signal mask).
pub fn install_teardown_on_signal(vms: &Path) {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        set.add(s);
    }
    if set.thread_block().is_err() {
        return;
    }
    let vms = vms.to_path_buf();
    std::thread::spawn(move || {
        if let Ok(sig) = set.wait() {
            TEARING_DOWN.store(true, std::sync::atomic::Ordering::SeqCst);
            eprintln!("dough: {sig}; tearing down");
            gc::reclaim_mine(&vms);
            std::process::exit(130);
        }
    });
}

/// Map a guest command's status to our exit code, explaining the unusual ones.
pub fn exit_code(status: &ExitStatus) -> ExitCode {
    match status {
        ExitStatus::Exited(_) => {}
        ExitStatus::Signaled(s) => eprintln!("dough: command killed by signal {s}"),
        ExitStatus::TimedOut => eprintln!("dough: command timed out and was killed"),
        ExitStatus::SpawnFailed(why) => eprintln!("dough: command could not be started: {why}"),
    }
    ExitCode::from(status.shell_code().clamp(0, 255) as u8)
}

/// Write guest output to our stdout/stderr as it arrives.
pub fn stream_sink(stream: Stream, data: &[u8]) {
    let _ = match stream {
        Stream::Stdout => std::io::stdout()
            .lock()
            .write_all(data)
            .and_then(|_| std::io::stdout().flush()),
        Stream::Stderr => std::io::stderr().lock().write_all(data),
    };
}

impl ExecArgs {
    /// The request to send, reading stdin first when asked to.
    pub fn request(&self) -> anyhow::Result<ExecRequest> {
        let stdin = if self.interactive {
            let mut buf = Vec::new();
            std::io::stdin()
                .read_to_end(&mut buf)
                .context("reading stdin")?;
            Some(buf)
        } else {
            None
        };
        let timeout = match self.timeout {
            Some(t) if t.is_finite() && t > 0.0 => Some(Duration::from_secs_f64(t)),
            Some(t) => anyhow::bail!("--timeout must be a positive number of seconds, got {t}"),
            None => None,
        };
        let mut env = Vec::new();
        for f in &self.env_file {
            env.extend(read_env_file(f)?);
        }
        // Later entries win in the guest; -e comes last.
        env.extend(self.env.iter().cloned());
        Ok(ExecRequest {
            argv: self.command.clone(),
            env,
            cwd: self.workdir.clone(),
            stdin,
            timeout,
        })
    }
}

/// Everything that shapes the snapshot `vm` would be restored from.
pub fn snapshot_spec(image: &Image, opts: &BootOptions) -> anyhow::Result<SnapshotSpec> {
    Ok(SnapshotSpec {
        image: image.clone(),
        accel: opts.accel,
        mem_mib: opts.mem_mib,
        cpus: opts.cpus,
        extra_cmdline: opts.extra_cmdline.clone(),
        backend: opts.backend,
        vmm_version: dough_fabric::snapshot::vmm_version(opts)?,
    })
}

/// The snapshot for these VM options, baked first if there is none (or
/// if `force`), saying why.
pub fn ensure_snapshot(
    ctx: &Ctx,
    image: &Image,
    opts: &BootOptions,
    force: bool,
) -> anyhow::Result<Ensured> {
    let spec = snapshot_spec(image, opts)?;
    let store = SnapshotStore::new(&ctx.home);
    Ok(store.ensure(&spec, opts, &ctx.vms, force, &mut |m| {
        eprintln!("dough: {m}")
    })?)
}

pub fn run(ctx: &Ctx, args: RunArgs) -> anyhow::Result<ExitCode> {
    install_teardown_on_signal(&ctx.vms);
    let image = resolve_image(&ctx.home, &args.vm)?;
    let opts = boot_options(&ctx.home, &image, &args.vm)?;
    let req = args.exec.request()?;
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
    vm.destroy()?;
    Ok(exit_code(&result?))
}
