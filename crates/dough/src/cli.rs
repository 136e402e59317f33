//! Argument parsing and dispatch.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::{bench_cmd, doctor, go_cmd, image_cmd, plan_cmd, run_cmd, vm_cmds};

/// dough runs autonomous coding agents inside microVMs.
///
/// It builds a guest image (kernel + initramfs with dough's agent as PID 1 +
/// a read-only Debian rootfs), bakes a warm snapshot of a booted guest, and
/// restores byte-identical clones from it, each in its own network namespace
/// and cgroup, with a writable layer of its own (a sparse scratch disk, or
/// RAM); running clones can be saved and forked. `dough go` runs a plan of
/// file-disjoint agent tasks in such clones and stacks the verified results
/// on a branch; the host never runs anything an agent wrote.
///
/// Start with `dough doctor`, then `dough run -- CMD`, `dough up N`, or
/// `dough plan check PLAN` and `dough go PLAN` (docs/plan.md).
///
/// Settings such as --backend, --firecracker, --qemu, --accel, --net and
/// --net-pool can also come from their DOUGH_* environment variables or from
/// `$DOUGH_HOME/config.toml` (keys: backend, firecracker, firecracker_pci,
/// qemu, accel, net, net_pool); a flag beats the environment, which beats
/// the file.
#[derive(Debug, Parser)]
#[command(name = "dough", version, propagate_version = true)]
pub struct Cli {
    /// dough's state and cache directory.
    #[arg(long, global = true, env = "DOUGH_HOME")]
    pub home: Option<PathBuf>,
    /// Where running VMs are recorded (default: <home>/vms). Separate
    /// dough invocations with the same directory see the same VMs.
    #[arg(long, global = true, env = "DOUGH_VMS_DIR", value_name = "DIR")]
    pub vms_dir: Option<PathBuf>,
    /// Talk to a `dough serve` daemon instead of working on this machine:
    /// `unix:///path/serve.sock` or `http://HOST:PORT` (`up`, `ps`, `exec`
    /// and `down`). Its token comes from DOUGH_TOKEN, else the daemon's
    /// token file under this home.
    #[arg(long, global = true, env = "DOUGH_HOST", value_name = "URL")]
    pub host: Option<String>,
    /// More log output (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Build or list guest images.
    #[command(subcommand)]
    Image(image_cmd::ImageCmd),
    /// Start a fresh VM (a clone of the baked snapshot, baked first if
    /// needed), run CMD in it, stream its output, exit with its exit code
    /// and destroy the VM.
    ///
    /// Example: dough run -- python3 -c 'print(6*7)'
    Run(run_cmd::RunArgs),
    /// Boot a guest, wait for its agent, and freeze it into the warm
    /// snapshot clones are restored from. `up` and `run` bake on their own
    /// when the inputs (image, agent, memory, vCPUs, accelerator, kernel
    /// command line, backend and its version) changed; this forces it or
    /// does it ahead of time.
    Bake(vm_cmds::BakeArgs),
    /// Restore N clones of the baked snapshot; they keep running after
    /// this command exits, until `dough down`. Prints their ids.
    Up(vm_cmds::UpArgs),
    /// List VMs: id, state, age, VMM pid, memory (PSS), backend,
    /// accelerator, network policy.
    Ps(vm_cmds::PsArgs),
    /// Run CMD in a running clone (same output and exit code as `run`).
    ///
    /// Example: dough exec vm-1a2b3c4d -- uname -a
    Exec(vm_cmds::ExecCmdArgs),
    /// Print a VM's serial console (the bake's boot log, then the clone's).
    Logs(vm_cmds::LogsArgs),
    /// Stop VMs exactly (by their recorded pid) and remove their state.
    Down(vm_cmds::DownArgs),
    /// Freeze clones: their vCPUs stop (no CPU used), memory, network and
    /// processes stay; commands are refused until `dough resume`.
    Pause(vm_cmds::IdsArgs),
    /// Let paused clones run again.
    Resume(vm_cmds::IdsArgs),
    /// Save a running clone whole (memory, devices, scratch disk) as a new
    /// snapshot, recorded with what it came from; prints its key. The clone
    /// runs on (or stays paused with --pause). `dough up --from KEY`
    /// restores it, after a restart too. Refused for a clone that was given
    /// what may be secrets (`-e KEY` from dough's environment, --env-file,
    /// -i): every restore would get them.
    ///
    /// Example: dough snapshot vm-1a2b3c4d
    Snapshot(crate::live_cmd::SnapshotArgs),
    /// Snapshot a running clone and restore N copies of it ("forks"): each
    /// has the clone's files, processes and memory, and its own id,
    /// entropy, clock, network and channel. Prints their ids.
    ///
    /// Example: dough fork vm-1a2b3c4d 4
    Fork(crate::live_cmd::ForkArgs),
    /// List snapshots: baked ones and those of live clones, what each came
    /// from, its size on disk, and how many clones use it. `dough bake
    /// --prune` removes those no clone uses.
    Snapshots(crate::live_cmd::SnapshotsArgs),
    /// One agent, one command: ship a repository into a fresh clone, run
    /// the agent, bring its changes back through the same strict checks as
    /// a plan's task (every path inside --allow, no secret, an optional
    /// --check in an offline clone) and show them; --commit keeps them as a
    /// branch. A one-task plan without a plan file.
    ///
    /// Example: dough agent --allow 'src/**' --work 'Fix the failing test' -- claude -p @{work_order}
    Agent(crate::agent_cmd::AgentArgs),
    /// Run a plan: rounds of file-disjoint agent tasks in clones, each diff
    /// checked against its allowlist and verified offline, green results
    /// stacked on a branch `dough/<run-id>` of the plan's repo.
    Go(go_cmd::GoArgs),
    /// Work with gobrr plans (DAGs of file-disjoint agent tasks).
    #[command(subcommand)]
    Plan(plan_cmd::PlanCmd),
    /// Benchmarks that print JSON.
    #[command(subcommand)]
    Bench(bench_cmd::BenchCmd),
    /// Check that this host has what dough needs, and say what to install.
    Doctor(doctor::DoctorArgs),
    /// Run dough as a daemon with an HTTP API (docs/api.md): sandboxes,
    /// commands in them (output streamed), files in and out, plans run and
    /// followed. Listens on a Unix socket (and optionally TCP); every
    /// request needs the bearer token in the token file. State is kept in
    /// SQLite under the home: its sandboxes outlive it and are adopted
    /// again when it restarts, and runs go on where they stopped.
    ///
    /// Example: dough serve --listen 127.0.0.1:7070
    Serve(crate::serve::ServeArgs),
    /// (internal) Outlive a dough process and reclaim its VMs if it dies.
    #[command(hide = true)]
    Watchdog(crate::watchdog::WatchdogArgs),
}

/// Print `dough: error: <headline><e>` and each cause on its own line.
/// Errors can carry what a guest said: printable text only.
pub fn print_error(headline: &str, e: &(dyn std::error::Error + 'static)) {
    let p = |x: &dyn std::fmt::Display| dough_fabric::serial::printable(&x.to_string());
    eprintln!("dough: error: {headline}{}", p(e));
    let mut src = e.source();
    while let Some(c) = src {
        eprintln!("  caused by: {}", p(c));
        src = c.source();
    }
}

pub fn init_tracing(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

/// `$DOUGH_HOME`, else `$XDG_DATA_HOME/dough`, else `~/.local/share/dough`.
pub fn home_dir(flag: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(h) = flag {
        return Ok(h);
    }
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|x| !x.is_empty()) {
        return Ok(PathBuf::from(x).join("dough"));
    }
    let home = std::env::var_os("HOME")
        .ok_or_else(|| anyhow::anyhow!("neither DOUGH_HOME nor HOME is set"))?;
    Ok(PathBuf::from(home).join(".local/share/dough"))
}

/// `$DOUGH_HOME/config.toml`: defaults for settings that also have a flag
/// and an environment variable. A flag beats the environment, which beats
/// the file, which beats the built-in default.
///
/// ```toml
/// backend = "firecracker"
/// firecracker = "/opt/firecracker/firecracker"
/// ```
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub backend: Option<String>,
    pub firecracker: Option<PathBuf>,
    pub firecracker_pci: Option<bool>,
    pub qemu: Option<PathBuf>,
    pub accel: Option<String>,
    pub net: Option<String>,
    pub net_pool: Option<String>,
}

impl ConfigFile {
    /// (environment variable, value) for every setting the file sets.
    pub fn env(&self) -> Vec<(&'static str, std::ffi::OsString)> {
        let s = |v: &Option<String>| v.clone().map(Into::into);
        let p = |v: &Option<PathBuf>| v.clone().map(Into::into);
        [
            ("DOUGH_BACKEND", s(&self.backend)),
            ("DOUGH_FIRECRACKER", p(&self.firecracker)),
            (
                "DOUGH_FIRECRACKER_PCI",
                self.firecracker_pci.map(|b| b.to_string().into()),
            ),
            ("DOUGH_QEMU", p(&self.qemu)),
            ("DOUGH_ACCEL", s(&self.accel)),
            ("DOUGH_NET", s(&self.net)),
            ("DOUGH_NET_POOL", s(&self.net_pool)),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| (k, v)))
        .collect()
    }
}

/// Read `<home>/config.toml` (home as `--home`/`DOUGH_HOME`/the default
/// would give it) and put what it sets into the environment where the
/// environment does not already say, so that clap's `env` defaults pick it
/// up. Call before any thread starts. Returns the file when there is one.
pub fn apply_config_file(args: &[std::ffi::OsString]) -> anyhow::Result<Option<PathBuf>> {
    let flag = args.iter().enumerate().find_map(|(i, a)| {
        let a = a.to_str()?;
        if let Some(v) = a.strip_prefix("--home=") {
            return Some(PathBuf::from(v));
        }
        (a == "--home").then(|| args.get(i + 1).map(PathBuf::from))?
    });
    let flag = flag.or_else(|| std::env::var_os("DOUGH_HOME").map(PathBuf::from));
    let Ok(home) = home_dir(flag) else {
        return Ok(None);
    };
    let path = home.join("config.toml");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(anyhow::anyhow!("reading {}: {e}", path.display())),
    };
    let cfg: ConfigFile = toml::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e.to_string().trim()))?;
    for (k, v) in cfg.env() {
        if std::env::var_os(k).is_none() {
            std::env::set_var(k, v);
        }
    }
    Ok(Some(path))
}

/// Where this invocation keeps things.
#[derive(Debug, Clone)]
pub struct Ctx {
    /// Images, snapshots, caches.
    pub home: PathBuf,
    /// Records and host-side files of running VMs.
    pub vms: PathBuf,
}

pub fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    let home = home_dir(cli.home)?;
    let vms = cli.vms_dir.unwrap_or_else(|| home.join("vms"));
    let ctx = Ctx { home, vms };
    // The daemon itself (and its helpers) run here whatever DOUGH_HOST says.
    if let Some(host) = cli
        .host
        .as_ref()
        .filter(|_| !matches!(cli.command, Command::Serve(_) | Command::Watchdog(_)))
    {
        return crate::remote::dispatch(&ctx, host, cli.command);
    }
    // Every command that deals with VMs first cleans up after crashed
    // doughs and notices dead clones.
    let builds_in_vm = matches!(
        &cli.command,
        Command::Image(image_cmd::ImageCmd::Build(a)) if a.recipe.is_some()
    );
    if builds_in_vm
        || !matches!(
            cli.command,
            Command::Image(_) | Command::Plan(_) | Command::Watchdog(_)
        )
    {
        crate::teardown::sweep(&ctx.vms);
        for p in dough_fabric::SnapshotStore::new(&ctx.home).remove_interrupted() {
            eprintln!(
                "dough: removed the remains of an interrupted bake or snapshot ({})",
                p.display()
            );
        }
    }
    // Commands that own VMs while they run: their VMs must not outlive
    // them, even if they are killed.
    if builds_in_vm
        || matches!(
            cli.command,
            Command::Run(_)
                | Command::Up(_)
                | Command::Go(_)
                | Command::Agent(_)
                | Command::Bake(_)
                | Command::Bench(_)
        )
    {
        crate::watchdog::arm(&ctx.home, &ctx.vms);
    }
    match cli.command {
        Command::Image(cmd) => image_cmd::run(&ctx, cmd),
        Command::Run(args) => run_cmd::run(&ctx, args),
        Command::Bake(args) => vm_cmds::bake(&ctx, args),
        Command::Up(args) => vm_cmds::up(&ctx, args),
        Command::Ps(args) => vm_cmds::ps(&ctx, args),
        Command::Exec(args) => vm_cmds::exec(&ctx, args),
        Command::Logs(args) => vm_cmds::logs(&ctx, args),
        Command::Down(args) => vm_cmds::down(&ctx, args),
        Command::Bench(cmd) => bench_cmd::run(&ctx, cmd),
        Command::Plan(cmd) => plan_cmd::run(cmd),
        Command::Go(args) => go_cmd::run(&ctx, args),
        Command::Pause(args) => vm_cmds::pause_or_resume(&ctx, args, true),
        Command::Resume(args) => vm_cmds::pause_or_resume(&ctx, args, false),
        Command::Snapshot(args) => crate::live_cmd::snapshot(&ctx, args),
        Command::Fork(args) => crate::live_cmd::fork(&ctx, args),
        Command::Snapshots(args) => crate::live_cmd::list(&ctx, args),
        Command::Agent(args) => crate::agent_cmd::run(&ctx, args),
        Command::Doctor(args) => doctor::run(&ctx.home, &ctx.vms, args),
        Command::Serve(args) => crate::serve::run(&ctx, args),
        Command::Watchdog(args) => crate::watchdog::run(&ctx.vms, args),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_file_maps_to_the_environment_and_refuses_unknown_keys() {
        let cfg: ConfigFile = toml::from_str(
            "backend = \"firecracker\"\nfirecracker = \"/opt/fc\"\nfirecracker_pci = true\n",
        )
        .unwrap();
        let env = cfg.env();
        assert_eq!(
            env,
            [
                ("DOUGH_BACKEND", "firecracker".into()),
                ("DOUGH_FIRECRACKER", "/opt/fc".into()),
                ("DOUGH_FIRECRACKER_PCI", "true".into()),
            ]
        );
        let e = toml::from_str::<ConfigFile>("backnd = \"qemu\"\n").unwrap_err();
        assert!(e.to_string().contains("backnd"), "{e}");
    }
}
