//! `dough go PLAN`: run a plan's rounds in clones and stack the green
//! results on a branch `dough/<run-id>` of the plan's repo.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use anyhow::Context;
use clap::Args;
use dough_fabric::reaper::{Reaper, ReaperHandle};
use dough_fabric::{BootOptions, ExecRequest, Snapshot, Vm, VmKind};
use dough_gobrr::plan::Plan;
use dough_gobrr::run::{
    Cmd, Event, Exit, Outcome, Output, Pool, Progress, RunResult, Runner, Sandbox, SandboxError,
    Workspace, WorkspaceError,
};
use dough_gobrr::secrets::Redactor;
use dough_gobrr::stack::Stack;
use dough_image::Image;
use dough_proto::{ExitStatus, Stream};

use crate::cli::Ctx;
use crate::snapshots::ensure_snapshot;
use crate::teardown::install_teardown_on_signal;
use crate::vm_args::{boot_options, resolve_image, VmArgs};

#[derive(Debug, Args)]
pub struct GoArgs {
    /// The plan (TOML; see docs/plan.md). Checked first: nothing runs if
    /// it has any problem.
    pub plan: PathBuf,
    /// Name of this run (default: the UTC time and a random suffix); the
    /// branch is `dough/<run-id>`.
    #[arg(long)]
    pub run_id: Option<String>,
    /// Run the plan on this repository instead of the plan's `repo`. A plan
    /// is untrusted input, so on its own it may only name a repository
    /// inside its own directory; this is how you point it elsewhere.
    #[arg(long, value_name = "PATH")]
    pub repo: Option<PathBuf>,
    #[command(flatten)]
    pub vm: VmArgs,
}

/// A `YYYYMMDD-HHMMSS-xxxx` run id from the UTC clock.
pub fn new_run_id() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let suffix = &dough_fabric::new_vm_id()[3..7];
    format!(
        "{y:04}{m:02}{d:02}-{:02}{:02}{:02}-{suffix}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// One clone as a gobrr sandbox. When dropped it goes to the run's reaper,
/// which tears it down while the task goes on.
struct VmSandbox {
    vm: Option<Vm>,
    reaper: ReaperHandle,
}

impl VmSandbox {
    fn new(vm: Vm, reaper: &ReaperHandle) -> VmSandbox {
        VmSandbox {
            vm: Some(vm),
            reaper: reaper.clone(),
        }
    }

    fn vm(&mut self) -> &mut Vm {
        self.vm.as_mut().expect("present until dropped")
    }
}

impl Drop for VmSandbox {
    fn drop(&mut self) {
        if let Some(vm) = self.vm.take() {
            self.reaper.reap(vm);
        }
    }
}

impl Sandbox for VmSandbox {
    fn egress_log(&mut self) -> Vec<String> {
        let path = self
            .vm()
            .paths
            .dir
            .join(dough_fabric::vm::GATEWAY_AUDIT_LOG);
        dough_gateway::audit::read(&path)
            .unwrap_or_default()
            .iter()
            .map(|e| dough_fabric::serial::printable(&e.line()))
            .collect()
    }

    fn run(&mut self, cmd: &Cmd, max_stdout: usize) -> Result<Output, SandboxError> {
        let mut out = Output::default();
        let mut too_big = false;
        let req = ExecRequest {
            argv: cmd.argv.clone(),
            env: cmd.env.clone(),
            cwd: cmd.cwd.clone(),
            stdin: cmd.stdin.clone(),
            timeout: Some(cmd.timeout),
        };
        let status = self
            .vm()
            .exec(&req, &mut |s, d| match s {
                Stream::Stdout if out.stdout.len() + d.len() > max_stdout => too_big = true,
                Stream::Stdout => out.stdout.extend_from_slice(d),
                // Keep the last 64 KiB of stderr.
                Stream::Stderr => {
                    out.stderr.extend_from_slice(d);
                    if out.stderr.len() > 64 << 10 {
                        out.stderr.drain(..out.stderr.len() - (64 << 10));
                    }
                }
            })
            .map_err(|e| SandboxError::Exec(Box::new(e)))?;
        if too_big {
            return Err(SandboxError::TooMuchOutput { limit: max_stdout });
        }
        out.exit = Some(match status {
            ExitStatus::Exited(c) => Exit::Code(c),
            ExitStatus::Signaled(s) => Exit::Code(128 + s),
            ExitStatus::TimedOut => Exit::TimedOut,
            ExitStatus::SpawnFailed(w) => Exit::Failed(w),
        });
        Ok(out)
    }
}

/// A snapshot clones are restored from, and how they boot.
struct Source<'a> {
    snap: &'a Snapshot,
    opts: &'a BootOptions,
}

/// Where a run's clones live and who tears them down: what every clone
/// of the run is made with (the pool's and each round workspace's).
#[derive(Clone)]
struct Clones {
    home: PathBuf,
    vms: PathBuf,
    /// Tears down the clones the run is done with.
    reaper: ReaperHandle,
}

impl Clones {
    /// A run clone of `snap` with `egress` whose gateway brokers `brokers`
    /// (the clone then trusts dough's CA).
    fn restore(
        &self,
        snap: &Snapshot,
        base: &BootOptions,
        egress: &str,
        brokers: &[dough_gateway::broker::Broker],
    ) -> Result<Box<dyn Sandbox>, SandboxError> {
        let egress = egress
            .parse()
            .map_err(|e: dough_net::PlanError| SandboxError::NoClone(Box::new(e)))?;
        let ca = match brokers.is_empty() {
            true => None,
            false => Some(
                crate::broker_args::dough_ca(&self.home)
                    .map_err(|e| SandboxError::NoClone(e.into()))?,
            ),
        };
        let opts = BootOptions {
            egress,
            brokers: brokers.to_vec(),
            ca,
            ..base.clone()
        };
        Vm::restore(&self.vms, snap, VmKind::Run, &opts)
            .map(|vm| Box::new(VmSandbox::new(vm, &self.reaper)) as Box<dyn Sandbox>)
            .map_err(|e| SandboxError::NoClone(Box::new(e)))
    }
}

struct ClonePool<'a> {
    clones: Clones,
    /// Agents' clones come from the plan's `image`, gates' from its
    /// `gate_image`.
    agent: Source<'a>,
    gate: Source<'a>,
    /// Once set, no more clones: the run winds down.
    cancel: Option<&'a AtomicBool>,
}

impl ClonePool<'_> {
    fn cancelled(&self) -> Result<(), SandboxError> {
        match self.cancel.is_some_and(|c| c.load(Ordering::SeqCst)) {
            true => Err(SandboxError::NoClone("the run was cancelled".into())),
            false => Ok(()),
        }
    }
}

impl Pool for ClonePool<'_> {
    fn agent(
        &self,
        egress: &str,
        brokers: &[dough_gateway::broker::Broker],
    ) -> Result<Box<dyn Sandbox>, SandboxError> {
        self.cancelled()?;
        let a = &self.agent;
        self.clones.restore(a.snap, a.opts, egress, brokers)
    }

    fn gate(&self) -> Result<Box<dyn Sandbox>, SandboxError> {
        self.cancelled()?;
        let g = &self.gate;
        self.clones.restore(g.snap, g.opts, "none", &[])
    }

    /// A clone of the agents' snapshot, prepared, then saved as a live
    /// snapshot of the run's own (removed with the workspace).
    fn workspace(
        &self,
        egress: &str,
        prepare: &mut dyn FnMut(&mut dyn Sandbox) -> Result<(), String>,
    ) -> Result<Box<dyn Workspace>, WorkspaceError> {
        self.cancelled().map_err(WorkspaceError::Sandbox)?;
        let no_clone = |e: Box<dyn std::error::Error + Send + Sync>| {
            WorkspaceError::Sandbox(SandboxError::NoClone(e))
        };
        let egress: dough_net::Egress = egress
            .parse()
            .map_err(|e: dough_net::PlanError| no_clone(Box::new(e)))?;
        let opts = BootOptions {
            egress,
            ..self.agent.opts.clone()
        };
        let c = &self.clones;
        let vm = Vm::restore(&c.vms, self.agent.snap, VmKind::Run, &opts)
            .map_err(|e| no_clone(Box::new(e)))?;
        let mut sandbox = VmSandbox::new(vm, &c.reaper);
        prepare(&mut sandbox).map_err(WorkspaceError::Prepare)?;
        let store = dough_fabric::SnapshotStore::new(&c.home);
        let vm = sandbox.vm.take().expect("present until dropped");
        let snap = dough_fabric::live::save_vm(vm, &c.vms, &store, self.agent.opts, &mut |_| {})
            .map_err(|e| no_clone(Box::new(e)))?;
        Ok(Box::new(RoundWorkspace {
            clones: c.clone(),
            agent_opts: self.agent.opts.clone(),
            // Gates fork from it only when they run the agents' image.
            gate_opts: (self.gate.snap.key == self.agent.snap.key).then(|| self.gate.opts.clone()),
            snap,
        }))
    }
}

/// A round's workspace: a snapshot of the run's own that its agents (and
/// gates, on the agents' image) are restored from; removed when dropped.
struct RoundWorkspace {
    clones: Clones,
    agent_opts: BootOptions,
    gate_opts: Option<BootOptions>,
    snap: Snapshot,
}

impl Workspace for RoundWorkspace {
    fn agent(
        &self,
        egress: &str,
        brokers: &[dough_gateway::broker::Broker],
    ) -> Result<Box<dyn Sandbox>, SandboxError> {
        self.clones
            .restore(&self.snap, &self.agent_opts, egress, brokers)
    }

    fn gate(&self) -> Option<Result<Box<dyn Sandbox>, SandboxError>> {
        let opts = self.gate_opts.as_ref()?;
        Some(self.clones.restore(&self.snap, opts, "none", &[]))
    }
}

impl Drop for RoundWorkspace {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.snap.dir);
    }
}

/// The image a plan's `image`/`gate_image` names (an id, or a recipe file
/// already made absolute), else the command's.
fn plan_image(ctx: &Ctx, vm: &VmArgs, named: Option<&str>) -> anyhow::Result<Image> {
    match named {
        None => resolve_image(ctx, vm),
        Some(s) => resolve_image(
            ctx,
            &VmArgs {
                image: Some(s.to_string()),
                ..vm.clone()
            },
        ),
    }
}

/// The largest tree shipped into a clone (as a tar on an exec's streamed
/// stdin; it lands in the guest's RAM-backed overlay).
const MAX_SHIP: usize = 32 << 20;

/// A plan ready to run: checked, its recipes and secrets resolved, its
/// repository found.
pub struct Loaded {
    pub plan: dough_gobrr::plan::ValidPlan,
    pub secrets: Vec<dough_gobrr::secrets::Value>,
    pub repo: PathBuf,
}

/// Why a plan cannot run.
#[derive(Debug)]
pub enum LoadError {
    /// What `dough plan check` reports.
    Problems(Vec<String>),
    Other(anyhow::Error),
}

impl From<anyhow::Error> for LoadError {
    fn from(e: anyhow::Error) -> LoadError {
        LoadError::Other(e)
    }
}

/// Load and check `plan`, on `repo` if given (else the plan's own, which
/// must be inside the plan's directory). Secrets come from this process's
/// environment.
pub fn load(plan_path: &Path, repo: Option<&Path>) -> Result<Loaded, LoadError> {
    let plan = Plan::load(plan_path)
        .and_then(Plan::check)
        .map_err(|problems| {
            LoadError::Problems(problems.0.iter().map(|p| p.to_string()).collect())
        })?;
    let plan_dir = plan_path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    // A recipe the plan names is relative to the plan.
    let mut plan = plan;
    for named in [&mut plan.plan.image, &mut plan.plan.gate_image] {
        if let Some(r) = named.as_mut().filter(|r| r.ends_with(".toml")) {
            *r = plan_dir.join(&*r).display().to_string();
        }
    }
    let secrets =
        dough_gobrr::secrets::resolve(&plan.plan.secrets, &plan_dir, &|k| std::env::var(k).ok())
            .map_err(anyhow::Error::from)?;
    let repo = match repo {
        Some(r) => std::fs::canonicalize(r)
            .with_context(|| format!("--repo {} does not exist", r.display()))?,
        None => {
            let repo = plan_dir.join(&plan.plan.repo);
            let repo = std::fs::canonicalize(&repo)
                .with_context(|| format!("the plan's repo {} does not exist", repo.display()))?;
            // Symlinks resolved: the plan may not reach outside its directory.
            let dir = std::fs::canonicalize(&plan_dir).map_err(anyhow::Error::from)?;
            if !repo.starts_with(&dir) {
                return Err(anyhow::anyhow!(
                    "the plan's repo resolves to {}, outside the plan's directory {}; to run a plan on another repository, give it with --repo",
                    repo.display(),
                    dir.display()
                )
                .into());
            }
            repo
        }
    };
    Ok(Loaded {
        plan,
        secrets,
        repo,
    })
}

pub fn run(ctx: &Ctx, args: GoArgs) -> anyhow::Result<ExitCode> {
    let Loaded {
        plan,
        secrets,
        repo,
    } = match load(&args.plan, args.repo.as_deref()) {
        Ok(l) => l,
        Err(LoadError::Problems(problems)) => {
            for p in &problems {
                eprintln!("dough: plan {}: {p}", args.plan.display());
            }
            eprintln!(
                "dough: the plan has {} problem(s); nothing ran",
                problems.len()
            );
            return Ok(ExitCode::from(1));
        }
        Err(LoadError::Other(e)) => return Err(e),
    };
    anyhow::ensure!(
        args.vm.net == dough_net::Egress::Nat,
        "--net does not apply to `dough go`: the plan's `egress` decides for agent clones, and gates never have a network"
    );
    let run_id = args.run_id.clone().unwrap_or_else(new_run_id);
    let done = execute(
        ctx,
        &plan,
        secrets,
        &repo,
        &run_id,
        &args.vm,
        Keep::Branch,
        &Hooks::default(),
    )?;
    println!("branch: dough/{run_id}");
    println!("report: {}", done.report.display());
    Ok(done.exit_code())
}

/// What a run leaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// The branch `dough/<run-id>` with the green commits.
    Branch,
    /// Its changes as a patch ([`Done::diff`]), and the branch too if
    /// anything went green.
    BranchAndDiff,
    /// Its changes as a patch only: the branch is deleted.
    Diff,
}

/// A finished run.
pub struct Done {
    pub result: RunResult,
    pub report: PathBuf,
    /// The branch's changes since its base (with [`Keep::Diff`] and
    /// [`Keep::BranchAndDiff`]).
    pub diff: Option<Vec<u8>>,
}

impl Done {
    pub fn green(&self) -> usize {
        self.result
            .tasks
            .iter()
            .filter(|t| t.outcome == Outcome::Green)
            .count()
    }

    pub fn exit_code(&self) -> ExitCode {
        if self.result.error.is_none() && self.green() == self.result.tasks.len() {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        }
    }
}

/// Run a checked plan on `repo` (a git repository) as run `run_id`: the
/// branch `dough/<run_id>`, `run.json` and `report.md` under
/// `$DOUGH_HOME/runs/<run_id>`.
/// What a run started by something other than `dough go` (the daemon)
/// adds: resuming, its own event and progress sinks, cancelling.
#[derive(Default)]
pub struct Hooks<'a> {
    /// Go on with an interrupted run: its branch exists; this is its last
    /// progress.
    pub resume: Option<Progress>,
    /// Told every event (besides stderr and the run's events.jsonl).
    pub on_event: Option<&'a (dyn Fn(&Event) + Sync)>,
    /// Told the run's progress (keep the last one to resume).
    pub on_progress: Option<&'a (dyn Fn(&Progress) + Sync)>,
    /// Set: no more clones are made; the run winds down.
    pub cancel: Option<&'a AtomicBool>,
    /// In a daemon: it handles signals itself (no teardown handler).
    pub daemon: bool,
}

#[allow(clippy::too_many_arguments)]
pub fn execute(
    ctx: &Ctx,
    plan: &dough_gobrr::plan::ValidPlan,
    secrets: Vec<dough_gobrr::secrets::Value>,
    repo: &Path,
    run_id: &str,
    vm: &VmArgs,
    keep: Keep,
    hooks: &Hooks<'_>,
) -> anyhow::Result<Done> {
    anyhow::ensure!(
        repo.join(".git").exists(),
        "the plan's repo {} is not a git repository",
        repo.display()
    );
    if !hooks.daemon {
        install_teardown_on_signal(&ctx.vms);
    }
    let run_dir = ctx.home.join("runs").join(run_id);
    std::fs::create_dir_all(&run_dir)?;
    // dough's branch and scratch directory; nothing is checked out and no
    // worktree is registered in the user's repo. Removed whatever happens
    // (the branch too while it is empty, unless a resumed run made it).
    let resumed_base = hooks.resume.as_ref().and_then(|p| p.base.clone());
    let scratch = run_dir.join("scratch");
    let stack = match &resumed_base {
        Some(b) => Stack::open(repo, &scratch, b, run_id)
            .context("opening the interrupted run's branch")?,
        None => match Stack::create(repo, &scratch, &plan.plan.base, run_id) {
            // Resumed, but killed before it recorded its base: its branch
            // can hold nothing but that base yet.
            Err(dough_gobrr::stack::StackError::BranchExists(_)) if hooks.resume.is_some() => {
                let s = Stack::open(repo, &scratch, &plan.plan.base, run_id)
                    .context("opening the interrupted run's branch")?;
                anyhow::ensure!(
                    s.head()? == s.commit_of(&plan.plan.base)?,
                    "branch {} exists and is not at the plan's base {}: it is not this run's to resume",
                    s.branch,
                    plan.plan.base
                );
                s
            }
            r => r.context("creating dough's branch")?,
        },
    };
    let base = resumed_base.clone().map_or_else(|| stack.head(), Ok)?;
    let mut stack = RemoveOnDrop {
        stack: Some(stack),
        unused_base: resumed_base.is_none().then(|| base.clone()),
    };
    let tree = stack.get().archive()?.len();
    anyhow::ensure!(
        tree <= MAX_SHIP,
        "the repo's tree is {tree} bytes as a tar; dough ships at most {MAX_SHIP} bytes into a clone today"
    );

    let agent_image = plan_image(ctx, vm, plan.plan.image.as_deref())?;
    let gate_image = plan_image(ctx, vm, plan.plan.gate_image.as_deref())?;
    let agent_opts = boot_options(&ctx.home, &agent_image, vm)?;
    let agent_snap = ensure_snapshot(ctx, &agent_image, &agent_opts, false)?;
    let gate_opts = match gate_image.id == agent_image.id {
        true => agent_opts.clone(),
        false => boot_options(&ctx.home, &gate_image, vm)?,
    };
    let gate_snap = match gate_image.id == agent_image.id {
        true => None,
        false => Some(ensure_snapshot(ctx, &gate_image, &gate_opts, false)?),
    };
    // Clones a task is done with are torn down while it goes on (to its
    // gate, its next attempt, the next round); all are gone before the run
    // reports.
    let reaper = new_reaper();
    let pool = ClonePool {
        clones: Clones {
            home: ctx.home.clone(),
            vms: ctx.vms.clone(),
            reaper: reaper.handle(),
        },
        agent: Source {
            snap: agent_snap.snapshot(),
            opts: &agent_opts,
        },
        gate: Source {
            snap: gate_snap.as_ref().unwrap_or(&agent_snap).snapshot(),
            opts: &gate_opts,
        },
        cancel: hooks.cancel,
    };
    let rounds = plan.rounds.len();
    eprintln!(
        "dough: run {run_id}: {} task(s) in {rounds} round(s), up to {} clone(s) at once, branch dough/{run_id}",
        plan.plan.tasks.len(),
        plan.plan.concurrency
    );
    let events = Mutex::new(
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(run_dir.join("events.jsonl"))?,
    );
    let on_event = |e: &Event| {
        // Events quote agent output: printable only on the terminal.
        let what = dough_fabric::serial::printable(&e.what);
        if e.attempt > 0 {
            eprintln!("dough: [{:>6.1}s] {} #{}: {what}", e.t, e.task, e.attempt);
        } else {
            eprintln!("dough: [{:>6.1}s] {}: {what}", e.t, e.task);
        }
        if let Ok(line) = serde_json::to_string(e) {
            let _ = writeln!(events.lock().expect("events"), "{line}");
        }
        if let Some(f) = hooks.on_event {
            f(e);
        }
    };
    let on_progress = |p: &Progress| {
        if let Some(f) = hooks.on_progress {
            f(p);
        }
    };
    // From here on the branch is the run's result, even if empty.
    stack.unused_base = None;
    let runner = Runner {
        plan,
        pool: &pool,
        stack: stack.get(),
        secrets: secrets.clone(),
        run_id: run_id.to_string(),
        on_event: &on_event,
        resume: hooks.resume.clone().unwrap_or_default(),
        on_progress: &on_progress,
    };
    let result = runner.run();
    drop(runner);
    drop(pool);
    let reaped = reaper.finish();
    tracing::debug!(
        "the reaper tore down {} clone(s) off the tasks' path in {:.2}s ({} failed)",
        reaped.vms,
        reaped.busy.as_secs_f64(),
        reaped.failed
    );
    let redactor = Redactor::new(&secrets);
    std::fs::write(
        run_dir.join("run.json"),
        redactor.redact(&serde_json::to_string_pretty(&result)?),
    )?;
    let report_text = dough_fabric::serial::printable(&redactor.redact(&report(&result)));
    std::fs::write(run_dir.join("report.md"), &report_text)?;
    let diff = match keep {
        Keep::Branch => None,
        Keep::Diff | Keep::BranchAndDiff => Some(
            stack
                .get()
                .diff_since(&base)
                .context("showing the run's changes")?,
        ),
    };
    // `dough agent` keeps a branch only for a result it accepted.
    let any_green = result.tasks.iter().any(|t| t.outcome == Outcome::Green);
    if keep == Keep::Diff || (keep == Keep::BranchAndDiff && !any_green) {
        stack
            .get()
            .delete_branch()
            .context("deleting the run's branch")?;
    }
    drop(stack);
    if let Some(e) = &result.error {
        eprintln!("dough: {}", redactor.redact(e));
    }
    let done = Done {
        result,
        report: run_dir.join("report.md"),
        diff,
    };
    eprintln!(
        "dough: {} of {} task(s) green in {:.1}s",
        done.green(),
        done.result.tasks.len(),
        done.result.seconds
    );
    Ok(done)
}

/// The run's reaper. Test builds (`--features test-hooks`) can make it
/// hold every clone it is given for good (`DOUGH_TEST_HOLD_REAPER`): the
/// crash test's clones are then still queued when dough is killed.
fn new_reaper() -> Reaper {
    #[cfg(feature = "test-hooks")]
    if std::env::var_os("DOUGH_TEST_HOLD_REAPER").is_some() {
        return Reaper::observed(Box::new(|vm| {
            eprintln!("dough: test hook: the reaper holds {}", vm.id);
            loop {
                std::thread::park();
            }
        }));
    }
    Reaper::new()
}

/// dough's stack for a run, whose scratch directory goes away on every
/// way out (errors and panics included) — and whose branch goes too if the
/// run never started (`unused_base` is still set).
struct RemoveOnDrop {
    stack: Option<Stack>,
    unused_base: Option<String>,
}

impl RemoveOnDrop {
    fn get(&self) -> &Stack {
        self.stack.as_ref().expect("present until dropped")
    }
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(s) = self.stack.take() {
            if let Some(base) = self.unused_base.take() {
                if let Err(e) = s.discard_if_empty(&base) {
                    tracing::warn!("cannot remove the unused branch {}: {e}", s.branch);
                }
            }
            if let Err(e) = s.remove() {
                tracing::warn!("cannot remove dough's scratch directory: {e}");
            }
        }
    }
}

/// `report.md`.
fn report(r: &RunResult) -> String {
    let mut s = format!(
        "# gobrr run {}\n\nGoal: {}\n\nBranch `{}`: {} → {}, {:.1}s, up to {} clones at once.\n\n",
        r.run_id,
        r.goal,
        r.branch,
        &r.base[..12.min(r.base.len())],
        &r.head[..12.min(r.head.len())],
        r.seconds,
        r.concurrency
    );
    if let Some(e) = &r.error {
        s += &format!("**The run stopped early**: {e}\n\nWhat finished before is below.\n\n");
    }
    s += "| task | round | outcome | attempts | files | +/- | seconds | commit |\n|---|---|---|---|---|---|---|---|\n";
    for t in &r.tasks {
        let last = t.attempts.last();
        s += &format!(
            "| {} | {} | {:?} | {} | {} | +{} -{} | {:.1} | {} |\n",
            t.id,
            t.round,
            t.outcome,
            t.attempts.len(),
            last.map(|a| a.files).unwrap_or(0),
            last.map(|a| a.added).unwrap_or(0),
            last.map(|a| a.removed).unwrap_or(0),
            t.seconds,
            t.commit
                .as_deref()
                .map(|c| &c[..12.min(c.len())])
                .unwrap_or("-"),
        );
    }
    for w in &r.workspaces {
        match &w.failure {
            None => {
                s += &format!(
                    "\nRound {} workspace: the plan's setup ran once ({:.1}s with the tree shipped), saved in {:.1}s; its {} task(s) forked from it instead of each shipping the tree and running the setup (about {:.1}s saved per task, before the fork's own cost).\n",
                    w.round, w.setup_secs, w.save_secs, w.tasks, w.setup_secs
                )
            }
            Some(why) => {
                s += &format!(
                    "\nRound {} workspace: **could not be made**; its {} task(s) failed.\n\n```\n{}\n```\n",
                    w.round,
                    w.tasks,
                    why.trim_end()
                )
            }
        }
    }
    for c in &r.round_checks {
        s += &format!(
            "\nRound {} combined check (the plan's check on the stacked round): {}\n",
            c.round,
            if c.passed {
                "passed"
            } else {
                "**failed** — later rounds did not run"
            }
        );
        if !c.passed {
            s += &format!("\n```\n{}\n```\n", c.log.trim_end());
        }
    }
    for t in &r.tasks {
        if !t.blocked_by.is_empty() {
            s += &format!(
                "\n## {}: blocked\n\nNot run: {} did not go green.\n",
                t.id,
                t.blocked_by.join(", ")
            );
        }
        for a in &t.attempts {
            let phases: Vec<String> = a
                .phases
                .iter()
                .map(|(k, v)| format!("{k} {v:.2}s"))
                .collect();
            s += &format!(
                "\n## {} attempt {}: {}\n\nPhases: {}\n",
                t.id,
                a.n,
                if a.green { "green" } else { "failed" },
                phases.join(", ")
            );
            if let Some(f) = &a.failure {
                s += &format!("\n```\n{}\n```\n", f.trim_end());
            }
            if !a.egress.is_empty() {
                let denied = a.egress.iter().filter(|l| l.contains(" DENY ")).count();
                s += &format!(
                    "\nEgress ({} events, {denied} denied; `dough logs --net` format):\n\n```\n{}\n```\n",
                    a.egress.len(),
                    a.egress.join("\n")
                );
            }
        }
    }
    s
}
