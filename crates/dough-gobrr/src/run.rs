//! Running a validated plan: rounds of tasks, each attempt in a fresh
//! clone (ship the base tree, run the agent, take its diff), the diff
//! checked as data, the candidate verified by the gate in an offline clone,
//! failures fed back into a retry, green results stacked in plan order.
//!
//! VMs are behind [`Pool`]/[`Sandbox`], so the orchestration is unit-tested
//! with a scripted fake; dough's binary implements them over its clones.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::diff::{Diff, MAX_DIFF_BYTES};
use crate::plan::ValidPlan;
use crate::secrets::{Redactor, Value};
use crate::stack::{commit_message, Stack, StackError};

/// How a command in a sandbox ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    TimedOut,
    Failed(String),
}

impl Exit {
    pub fn ok(&self) -> bool {
        *self == Exit::Code(0)
    }
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exit::Code(c) => write!(f, "exit code {c}"),
            Exit::TimedOut => f.write_str("timed out"),
            Exit::Failed(w) => write!(f, "could not run: {w}"),
        }
    }
}

/// How long a command may take when nothing else says: the guest controls
/// how long any command takes — an agent can replace `git` with `sleep` —
/// so every command has a deadline; there is no "wait forever". The plan's
/// `step_timeout_secs` bounds dough's own steps (shipping a tree, writing
/// the work order, taking the diff).
pub const STEP_TIMEOUT: Duration = Duration::from_secs(300);

/// A command for a sandbox.
#[derive(Debug, Clone)]
pub struct Cmd {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: Option<String>,
    pub stdin: Option<Vec<u8>>,
    /// Always set: [`STEP_TIMEOUT`] unless the plan says otherwise.
    pub timeout: Duration,
}

impl Default for Cmd {
    fn default() -> Self {
        Cmd {
            argv: Vec::new(),
            env: Vec::new(),
            cwd: None,
            stdin: None,
            timeout: STEP_TIMEOUT,
        }
    }
}

/// Output of a command (capped).
#[derive(Debug, Clone, Default)]
pub struct Output {
    pub exit: Option<Exit>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// One fresh clone.
pub trait Sandbox: Send {
    /// Run a command; stdout beyond `max_stdout` bytes is an error.
    fn run(&mut self, cmd: &Cmd, max_stdout: usize) -> Result<Output, String>;
}

/// Where clones come from.
pub trait Pool: Sync {
    /// A clone for an agent, with the plan's egress policy.
    fn agent(&self, egress: &str) -> Result<Box<dyn Sandbox>, String>;
    /// A clone for a gate: egress `none`, never given a secret.
    fn gate(&self) -> Result<Box<dyn Sandbox>, String>;
}

/// Where the tree lives inside a clone.
pub const REPO: &str = "/work/repo";
pub const ORDER: &str = "/work/order.md";

/// One attempt at a task.
#[derive(Debug, Clone, Serialize)]
pub struct Attempt {
    pub n: u32,
    pub green: bool,
    /// Why it failed, redacted.
    pub failure: Option<String>,
    /// Seconds per phase: restore, ship, agent, diff, gate.
    pub phases: BTreeMap<&'static str, f64>,
    pub files: usize,
    pub added: u64,
    pub removed: u64,
    /// Tail of the gate's output, redacted.
    pub gate_log: String,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Green,
    Failed,
    /// Not run: a dependency did not go green.
    Blocked,
}

#[derive(Debug, Clone, Serialize)]
pub struct TaskResult {
    pub id: String,
    pub title: String,
    pub round: usize,
    pub outcome: Outcome,
    pub attempts: Vec<Attempt>,
    pub commit: Option<String>,
    pub changed: Vec<String>,
    /// Exported signatures of the changed files (for dependents).
    pub signatures: String,
    pub blocked_by: Vec<String>,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    pub run_id: String,
    pub branch: String,
    pub goal: String,
    pub base: String,
    pub head: String,
    pub concurrency: u32,
    pub seconds: f64,
    pub tasks: Vec<TaskResult>,
    /// The plan's check on each round's stacked result (run when a round
    /// stacked two or more tasks: each was gated alone, not together).
    pub round_checks: Vec<RoundCheck>,
    /// Why the run stopped early, if it did (what finished before is kept).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RoundCheck {
    pub round: usize,
    pub passed: bool,
    /// Tail of its output, redacted.
    pub log: String,
}

/// Progress events (also the JSON-lines log), already redacted.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    pub t: f64,
    pub task: String,
    pub attempt: u32,
    pub what: String,
}

const LOG_TAIL: usize = 4000;

fn tail(b: &[u8]) -> String {
    let s = String::from_utf8_lossy(b);
    let start = s.len().saturating_sub(LOG_TAIL);
    let start = (start..=s.len())
        .find(|&i| s.is_char_boundary(i))
        .unwrap_or(s.len());
    s[start..].to_string()
}

fn sh(script: &str) -> Vec<String> {
    vec!["sh".into(), "-c".into(), script.into()]
}

/// Unpack a tar on stdin as the repo, and make it a git repo whose HEAD is
/// that tree (the agent's diff is taken against it).
const SHIP: &str = "set -e; rm -rf /work/repo; mkdir -p /work/repo; cd /work/repo; tar -x; \
git init -q; git add -A; git -c user.name=dough -c user.email=dough@localhost commit -qm base --allow-empty";

/// Unpack the candidate tree and make it read-only (HOME and /tmp stay
/// writable tmpfs).
const SHIP_RO: &str =
    "set -e; rm -rf /work/repo; mkdir -p /work/repo /tmp/home; cd /work/repo; tar -x; \
mount --bind /work/repo /work/repo; mount -o remount,bind,ro /work/repo";

const TAKE_DIFF: &str = "cd /work/repo && git add -A && git diff --binary --cached HEAD";

/// The runner's inputs.
pub struct Runner<'a> {
    pub plan: &'a ValidPlan,
    pub pool: &'a dyn Pool,
    pub stack: &'a Stack,
    pub secrets: Vec<Value>,
    pub run_id: String,
    /// Told every event as it happens (already redacted).
    pub on_event: &'a (dyn Fn(&Event) + Sync),
}

impl std::fmt::Debug for Runner<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Runner({})", self.run_id)
    }
}

struct Shared<'a> {
    start: Instant,
    redactor: Redactor,
    on_event: &'a (dyn Fn(&Event) + Sync),
}

impl Shared<'_> {
    /// The end of some output, redacted before it is cut (a cut could
    /// split a secret so that it no longer matches).
    fn tail(&self, b: &[u8]) -> String {
        tail(self.redactor.redact(&String::from_utf8_lossy(b)).as_bytes())
    }

    fn event(&self, task: &str, attempt: u32, what: String) {
        (self.on_event)(&Event {
            t: (self.start.elapsed().as_secs_f64() * 10.0).round() / 10.0,
            task: task.into(),
            attempt,
            what: self.redactor.redact(&what),
        });
    }
}

impl Runner<'_> {
    /// Run every round. A run that fails part way (git refusing to work,
    /// a bug) still returns what finished, with `error` saying why it
    /// stopped.
    pub fn run(&self) -> RunResult {
        let start = Instant::now();
        let shared = Shared {
            start,
            redactor: Redactor::new(&self.secrets),
            on_event: self.on_event,
        };
        let plan = &self.plan.plan;
        let base = self.stack.head().unwrap_or_default();
        let mut results: Vec<Option<TaskResult>> = vec![None; plan.tasks.len()];
        let mut round_checks = Vec::new();
        let rounds = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.rounds(&shared, &mut results, &mut round_checks)
        }));
        let error = match rounds {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(format!("the run stopped: {e}")),
            Err(panic) => Some(format!(
                "the run stopped on an internal error (a bug in dough): {}",
                panic_message(&*panic)
            )),
        }
        .map(|e| shared.redactor.redact(&e));
        if let Some(e) = &error {
            shared.event("run", 0, e.clone());
        }
        RunResult {
            run_id: self.run_id.clone(),
            branch: self.stack.branch.clone(),
            goal: plan.goal.clone(),
            head: self.stack.head().unwrap_or_else(|_| base.clone()),
            base,
            concurrency: plan.concurrency,
            seconds: start.elapsed().as_secs_f64(),
            tasks: results.into_iter().flatten().collect(),
            round_checks,
            error,
        }
    }

    fn rounds(
        &self,
        shared: &Shared<'_>,
        results: &mut [Option<TaskResult>],
        round_checks: &mut Vec<RoundCheck>,
    ) -> Result<(), StackError> {
        let plan = &self.plan.plan;
        let mut stopped: Option<String> = None;
        for (k, round) in self.plan.rounds.iter().enumerate() {
            if let Some(why) = &stopped {
                // An earlier round's combined result failed the check: no
                // task builds on it.
                for &t in round {
                    let task = &plan.tasks[t];
                    shared.event(&task.id, 0, format!("blocked by {why}"));
                    results[t] = Some(TaskResult {
                        id: task.id.clone(),
                        title: task.title.clone(),
                        round: k + 1,
                        outcome: Outcome::Blocked,
                        attempts: vec![],
                        commit: None,
                        changed: vec![],
                        signatures: String::new(),
                        blocked_by: vec![why.clone()],
                        seconds: 0.0,
                    });
                }
                continue;
            }
            // Blocked tasks first: a dependency did not go green.
            let mut runnable = Vec::new();
            for &t in round {
                let task = &plan.tasks[t];
                let blocked_by: Vec<String> = task
                    .deps
                    .iter()
                    .filter(|d| {
                        results
                            .iter()
                            .flatten()
                            .any(|r| &r.id == *d && r.outcome != Outcome::Green)
                    })
                    .cloned()
                    .collect();
                if blocked_by.is_empty() {
                    runnable.push(t);
                } else {
                    shared.event(&task.id, 0, format!("blocked by {}", blocked_by.join(", ")));
                    results[t] = Some(TaskResult {
                        id: task.id.clone(),
                        title: task.title.clone(),
                        round: k + 1,
                        outcome: Outcome::Blocked,
                        attempts: vec![],
                        commit: None,
                        changed: vec![],
                        signatures: String::new(),
                        blocked_by,
                        seconds: 0.0,
                    });
                }
            }
            let base_tar = self.stack.archive()?;
            let context = self.dependency_context(results);
            // Up to `concurrency` tasks at once.
            let queue = Mutex::new(runnable.clone().into_iter());
            let done: Mutex<BTreeMap<usize, Finished>> = Mutex::new(BTreeMap::new());
            std::thread::scope(|s| {
                for _ in 0..plan.concurrency.min(runnable.len() as u32).max(1) {
                    s.spawn(|| loop {
                        let Some(t) = queue.lock().expect("queue").next() else {
                            return;
                        };
                        // A bug in one task must not take the run down: a
                        // panic becomes that task's failure.
                        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            self.task(t, k + 1, &base_tar, &context, shared)
                        }))
                        .unwrap_or_else(|panic| {
                            let why = panic_message(&*panic);
                            shared.event(&plan.tasks[t].id, 0, format!("internal error: {why}"));
                            (self.internal_failure(t, k + 1, &why), None)
                        });
                        done.lock().expect("results").insert(t, r);
                    });
                }
            });
            // Stack the green ones in plan order.
            for (t, (mut r, diff)) in done.into_inner().expect("results") {
                if let (Outcome::Green, Some(d)) = (&r.outcome, diff) {
                    let stacked = self.stack.apply_and_commit(
                        &d,
                        &self.plan.allow[t],
                        &commit_message(&r.id, &r.title, r.attempts.len() as u32, &self.run_id),
                    );
                    match stacked {
                        Ok(c) => {
                            shared.event(&r.id, r.attempts.len() as u32, format!("committed {c}"));
                            r.commit = Some(c);
                        }
                        Err(e) => {
                            r.outcome = Outcome::Failed;
                            if let Some(a) = r.attempts.last_mut() {
                                a.failure = Some(shared.redactor.redact(&format!(
                                    "green, but did not stack onto the round's base: {e}"
                                )));
                            }
                            shared.event(&r.id, 0, format!("could not be stacked: {e}"));
                        }
                    }
                }
                results[t] = Some(r);
            }
            let stacked = round
                .iter()
                .filter(|&&t| results[t].as_ref().is_some_and(|r| r.commit.is_some()))
                .count();
            if stacked >= 2 {
                let tree = self.stack.archive()?;
                let (passed, log) = match self.round_gate(&tree) {
                    Ok(log) => (true, log),
                    Err(log) => (false, log),
                };
                let what = format!("round {}", k + 1);
                shared.event(
                    &what,
                    0,
                    format!(
                        "combined check of {stacked} stacked tasks {}",
                        if passed { "passed" } else { "failed" }
                    ),
                );
                if !passed {
                    stopped = Some(format!("round {}'s combined check", k + 1));
                }
                round_checks.push(RoundCheck {
                    round: k + 1,
                    passed,
                    log: shared.tail(log.as_bytes()),
                });
            }
        }
        Ok(())
    }

    /// The result of a task whose processing hit a bug in dough.
    fn internal_failure(&self, t: usize, round: usize, why: &str) -> TaskResult {
        let task = &self.plan.plan.tasks[t];
        TaskResult {
            id: task.id.clone(),
            title: task.title.clone(),
            round,
            outcome: Outcome::Failed,
            attempts: vec![Attempt {
                n: 1,
                green: false,
                failure: Some(format!(
                    "dough hit an internal error on this task (a bug in dough, not the agent's doing): {why}"
                )),
                phases: BTreeMap::new(),
                files: 0,
                added: 0,
                removed: 0,
                gate_log: String::new(),
            }],
            commit: None,
            changed: vec![],
            signatures: String::new(),
            blocked_by: vec![],
            seconds: 0.0,
        }
    }

    /// The plan's check on a whole tree in a fresh offline clone.
    fn round_gate(&self, tree: &[u8]) -> Result<String, String> {
        self.offline_checks(tree, "the stacked tree", &[&self.plan.plan.check])
            .map(|(_, log)| log)
    }

    /// In a fresh gate clone (no network, no secrets): unpack `tree`
    /// read-only and run `checks` in order at its root. Ok((the clone, the
    /// log)) when all pass; Err(the log so far) otherwise.
    fn offline_checks(
        &self,
        tree: &[u8],
        what: &str,
        checks: &[&String],
    ) -> Result<(Box<dyn Sandbox>, String), String> {
        let plan = &self.plan.plan;
        let mut vm = self
            .pool
            .gate()
            .map_err(|e| format!("no clone for the gate: {e}"))?;
        let shipped = vm.run(
            &Cmd {
                argv: sh(SHIP_RO),
                stdin: Some(tree.to_vec()),
                timeout: Duration::from_secs(plan.step_timeout_secs),
                ..Cmd::default()
            },
            1 << 16,
        );
        check_ok(shipped, &format!("shipping {what}"))?;
        let mut log = String::new();
        for check in checks {
            let o = vm
                .run(
                    &Cmd {
                        argv: sh(check),
                        env: gate_env(),
                        cwd: Some(REPO.into()),
                        timeout: Duration::from_secs(plan.check_timeout_secs),
                        ..Cmd::default()
                    },
                    1 << 20,
                )
                .map_err(|e| format!("the check could not run: {e}"))?;
            log += &format!("$ {check}\n{}{}", tail(&o.stdout), tail(&o.stderr));
            match o.exit {
                Some(e) if e.ok() => {}
                Some(e) => return Err(format!("{log}\n({e})")),
                None => return Err(log),
            }
        }
        Ok((vm, log))
    }

    /// What each green task so far exported: changed files and signatures.
    fn dependency_context(&self, results: &[Option<TaskResult>]) -> BTreeMap<String, String> {
        results
            .iter()
            .flatten()
            .filter(|r| r.outcome == Outcome::Green)
            .map(|r| {
                (
                    r.id.clone(),
                    format!(
                        "### {} ({})\nChanged files: {}\n\nSignatures:\n```\n{}\n```\n",
                        r.id,
                        r.title,
                        r.changed.join(", "),
                        r.signatures.trim_end()
                    ),
                )
            })
            .collect()
    }

    fn work_order(
        &self,
        t: usize,
        context: &BTreeMap<String, String>,
        feedback: &[String],
    ) -> String {
        let plan = &self.plan.plan;
        let task = &plan.tasks[t];
        let mut w = format!(
            "# Task {}: {}\n\nGoal of the whole run: {}\n\n{}\n\nYou may change only files matching: {}\n",
            task.id,
            task.title,
            plan.goal,
            task.work.trim_end(),
            task.allow.join(", ")
        );
        let deps: Vec<&String> = task.deps.iter().filter_map(|d| context.get(d)).collect();
        if !deps.is_empty() {
            w += "\n## What your dependencies built\n\n";
            for d in deps {
                w += d;
            }
        }
        for (i, f) in feedback.iter().enumerate() {
            w += &format!("\n## Attempt {} failed\n\n{}\n", i + 1, f.trim_end());
        }
        w
    }

    fn task(
        &self,
        t: usize,
        round: usize,
        base_tar: &[u8],
        context: &BTreeMap<String, String>,
        shared: &Shared<'_>,
    ) -> Finished {
        let plan = &self.plan.plan;
        let task = &plan.tasks[t];
        let started = Instant::now();
        let mut attempts = Vec::new();
        let mut feedback = Vec::new();
        let mut green = None;
        for n in 1..=plan.retries + 1 {
            shared.event(&task.id, n, "starting".into());
            let order = self.work_order(t, context, &feedback);
            let (attempt, diff) = self.attempt(t, n, base_tar, &order, shared);
            let ok = attempt.green;
            if let Some(f) = &attempt.failure {
                shared.event(&task.id, n, format!("failed: {}", first_line(f)));
                feedback.push(f.clone());
            }
            attempts.push(attempt);
            if ok {
                shared.event(&task.id, n, "green".into());
                green = diff;
                break;
            }
        }
        let outcome = if green.is_some() {
            Outcome::Green
        } else {
            Outcome::Failed
        };
        let (changed, signatures) = green
            .as_ref()
            .map(|(d, sig)| (d.changed_paths(), sig.clone()))
            .unwrap_or_default();
        (
            TaskResult {
                id: task.id.clone(),
                title: task.title.clone(),
                round,
                outcome,
                attempts,
                commit: None,
                changed,
                signatures,
                blocked_by: vec![],
                seconds: started.elapsed().as_secs_f64(),
            },
            green.map(|(d, _)| d.raw),
        )
    }

    /// One attempt: agent clone, diff, checks, gate.
    fn attempt(
        &self,
        t: usize,
        n: u32,
        base_tar: &[u8],
        order: &str,
        shared: &Shared<'_>,
    ) -> (Attempt, Option<(Checked, String)>) {
        let plan = &self.plan.plan;
        let task = &plan.tasks[t];
        let mut a = Attempt {
            n,
            green: false,
            failure: None,
            phases: BTreeMap::new(),
            files: 0,
            added: 0,
            removed: 0,
            gate_log: String::new(),
        };
        let phase = |a: &mut Attempt, name: &'static str, since: Instant| {
            a.phases.insert(
                name,
                (since.elapsed().as_secs_f64() * 100.0).round() / 100.0,
            );
        };
        let fail = |mut a: Attempt, why: String| {
            a.failure = Some(shared.redactor.redact(&why));
            (a, None)
        };
        // Agent clone.
        let t0 = Instant::now();
        let mut vm = match self.pool.agent(&plan.egress) {
            Ok(v) => v,
            Err(e) => return fail(a, format!("no clone for the agent: {e}")),
        };
        phase(&mut a, "restore", t0);
        let t0 = Instant::now();
        let shipped = vm.run(
            &Cmd {
                argv: sh(SHIP),
                stdin: Some(base_tar.to_vec()),
                timeout: Duration::from_secs(plan.step_timeout_secs),
                ..Cmd::default()
            },
            1 << 16,
        );
        if let Err(e) = check_ok(shipped, "shipping the repo") {
            return fail(a, e);
        }
        let wrote = vm.run(
            &Cmd {
                argv: sh(&format!("cat > {ORDER}")),
                stdin: Some(order.as_bytes().to_vec()),
                timeout: Duration::from_secs(plan.step_timeout_secs),
                ..Cmd::default()
            },
            1 << 16,
        );
        if let Err(e) = check_ok(wrote, "writing the work order") {
            return fail(a, e);
        }
        phase(&mut a, "ship", t0);
        // The agent, with its secrets (only here: never in a gate).
        let t0 = Instant::now();
        let mut env: Vec<(String, String)> = vec![("WORK_ORDER".into(), ORDER.into())];
        for name in &task.secrets {
            if let Some(v) = self.secrets.iter().find(|s| &s.name == name) {
                env.push((v.name.clone(), v.value.clone()));
            }
        }
        let argv = match &task.script {
            Some(script) => sh(script),
            None => plan
                .agent
                .iter()
                .map(|x| x.replace("{work_order}", ORDER))
                .collect(),
        };
        let out = vm.run(
            &Cmd {
                argv,
                env,
                cwd: Some(REPO.into()),
                timeout: Duration::from_secs(plan.agent_timeout_secs),
                ..Cmd::default()
            },
            1 << 20,
        );
        phase(&mut a, "agent", t0);
        match out {
            Ok(o) if o.exit.as_ref().is_some_and(Exit::ok) => {}
            Ok(o) => {
                return fail(
                    a,
                    format!(
                        "the agent failed ({}); its output ended with:\n{}{}",
                        o.exit.map(|e| e.to_string()).unwrap_or_default(),
                        shared.tail(&o.stdout),
                        shared.tail(&o.stderr)
                    ),
                )
            }
            Err(e) => return fail(a, format!("the agent could not run: {e}")),
        }
        // The diff, as data.
        let t0 = Instant::now();
        let raw = match vm.run(
            &Cmd {
                argv: sh(TAKE_DIFF),
                timeout: Duration::from_secs(plan.step_timeout_secs),
                ..Cmd::default()
            },
            MAX_DIFF_BYTES,
        ) {
            Ok(o) if o.exit.as_ref().is_some_and(Exit::ok) => o.stdout,
            Ok(o) => {
                return fail(
                    a,
                    format!(
                        "taking the diff failed ({}): {}",
                        o.exit
                            .map(|e| e.to_string())
                            .unwrap_or_else(|| "no exit status".into()),
                        shared.tail(&o.stderr)
                    ),
                )
            }
            Err(e) => return fail(a, format!("taking the diff failed: {e}")),
        };
        drop(vm);
        // A secret the agent wrote into a file would be committed, gated
        // and shipped to every later task: refuse the diff.
        if let Some(v) = self
            .secrets
            .iter()
            .find(|v| raw.windows(v.value.len()).any(|w| w == v.value.as_bytes()))
        {
            return fail(
                a,
                format!(
                    "the diff contains the value of secret {}; secrets must never be committed",
                    v.name
                ),
            );
        }
        let diff = match Diff::parse(&raw).and_then(|d| d.check(&self.plan.allow[t]).map(|_| d)) {
            Ok(d) => d,
            Err(e) => return fail(a, format!("the diff was rejected: {e}")),
        };
        let (files, added, removed) = diff.stats();
        (a.files, a.added, a.removed) = (files, added, removed);
        let candidate = match self.stack.candidate(&raw, &self.plan.allow[t]) {
            Ok(c) => c,
            Err(e) => return fail(a, format!("the diff does not apply to the base: {e}")),
        };
        // What would be committed — every added or modified file's bytes as
        // git stores them (a binary patch's inflated data included) and its
        // path as git names it — must not hold a secret's value either: the
        // diff's text can encode it (compression, path escapes).
        match candidate.changed_files() {
            Ok(files) => {
                for v in &self.secrets {
                    let needle = v.value.as_bytes();
                    let hit = files.iter().find(|(p, body)| {
                        p.contains(&v.value) || body.windows(needle.len()).any(|w| w == needle)
                    });
                    if let Some((p, _)) = hit {
                        return fail(
                            a,
                            format!(
                                "{} (as it would be committed) contains the value of secret {}; secrets must never be committed",
                                shared.redactor.redact(p),
                                v.name
                            ),
                        );
                    }
                }
            }
            Err(e) => return fail(a, format!("reading the candidate tree failed: {e}")),
        }
        let candidate = candidate.tar;
        phase(&mut a, "diff", t0);
        // The gate: offline, read-only tree, no secrets.
        let t0 = Instant::now();
        let gate = self.gate(t, &candidate, &diff.changed_paths());
        phase(&mut a, "gate", t0);
        match gate {
            Ok((log, signatures)) => {
                a.gate_log = shared.redactor.redact(&log);
                a.green = true;
                (
                    a,
                    Some((Checked { raw, diff }, shared.redactor.redact(&signatures))),
                )
            }
            Err(log) => {
                a.gate_log = shared.redactor.redact(&log);
                fail(a, format!("the gate check failed:\n{log}"))
            }
        }
    }

    /// Run the checks on the candidate tree; Ok((log, signatures)) when
    /// they pass, Err(log) otherwise.
    fn gate(
        &self,
        t: usize,
        candidate: &[u8],
        changed: &[String],
    ) -> Result<(String, String), String> {
        let plan = &self.plan.plan;
        let checks: Vec<&String> = std::iter::once(&plan.check)
            .chain(plan.tasks[t].check.as_ref())
            .collect();
        let (mut vm, log) = self.offline_checks(candidate, "the candidate", &checks)?;
        // `sh -c CMD signatures FILE...`: the files are CMD's "$@".
        let mut argv = sh(&plan.signatures);
        argv.push("signatures".into());
        argv.extend(changed.iter().cloned());
        let sig = vm
            .run(
                &Cmd {
                    argv,
                    env: gate_env(),
                    cwd: Some(REPO.into()),
                    timeout: Duration::from_secs(60),
                    ..Cmd::default()
                },
                1 << 16,
            )
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        Ok((log, sig))
    }
}

/// Environment of commands in a gate: HOME on the guest's tmpfs, and no
/// bytecode written next to the read-only tree.
fn gate_env() -> Vec<(String, String)> {
    vec![
        ("HOME".to_string(), "/tmp/home".to_string()),
        ("PYTHONDONTWRITEBYTECODE".to_string(), "1".to_string()),
    ]
}

/// A task's result and, when green, the diff to stack.
type Finished = (TaskResult, Option<Vec<u8>>);

/// A diff that passed the checks, with its bytes.
struct Checked {
    raw: Vec<u8>,
    diff: Diff,
}

impl Checked {
    fn changed_paths(&self) -> Vec<String> {
        self.diff.changed_paths()
    }
}

/// What a caught panic said.
pub fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("")
}

fn check_ok(r: Result<Output, String>, what: &str) -> Result<(), String> {
    match r {
        Ok(o) if o.exit.as_ref().is_some_and(Exit::ok) => Ok(()),
        Ok(o) => Err(format!(
            "{what} failed ({}): {}",
            o.exit.map(|e| e.to_string()).unwrap_or_default(),
            tail(&o.stderr)
        )),
        Err(e) => Err(format!("{what} failed: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::Plan;
    use crate::stack::tests::{base_repo, sh};
    use std::sync::Arc;

    /// A scripted world: agents "write" the diff `diff_for(work order)`
    /// returns; the gate fails when the candidate tree contains `BROKEN`.
    struct FakePool {
        orders: Arc<Mutex<Vec<String>>>,
        gates: Arc<Mutex<u32>>,
        secrets_seen_by_gates: Arc<Mutex<bool>>,
        diff_for: fn(&str) -> String,
    }

    struct FakeVm {
        gate: bool,
        order: String,
        candidate: Vec<u8>,
        pool_orders: Arc<Mutex<Vec<String>>>,
        secrets_seen_by_gates: Arc<Mutex<bool>>,
        diff_for: fn(&str) -> String,
    }

    impl Sandbox for FakeVm {
        fn run(&mut self, cmd: &Cmd, _max: usize) -> Result<Output, String> {
            let script = cmd.argv.get(2).cloned().unwrap_or_default();
            let ok = |stdout: Vec<u8>| {
                Ok(Output {
                    exit: Some(Exit::Code(0)),
                    stdout,
                    stderr: vec![],
                })
            };
            if self.gate && cmd.env.iter().any(|(k, _)| k == "API_KEY") {
                *self.secrets_seen_by_gates.lock().unwrap() = true;
            }
            if script.starts_with("cat > ") {
                self.order = String::from_utf8(cmd.stdin.clone().unwrap()).unwrap();
                self.pool_orders.lock().unwrap().push(self.order.clone());
                return ok(vec![]);
            }
            if script == SHIP_RO {
                self.candidate = cmd.stdin.clone().unwrap();
                return ok(vec![]);
            }
            if script == TAKE_DIFF {
                return ok((self.diff_for)(&self.order).into_bytes());
            }
            if self.gate && script == "run the tests" {
                let has = |m: &[u8]| self.candidate.windows(m.len()).any(|w| w == m);
                let broken = has(b"BROKEN") || (has(b"PART_A") && has(b"PART_B"));
                return Ok(Output {
                    exit: Some(Exit::Code(if broken { 1 } else { 0 })),
                    stdout: if broken {
                        b"FAIL: test_two (BROKEN found)\n".to_vec()
                    } else {
                        b"ok\n".to_vec()
                    },
                    stderr: vec![],
                });
            }
            if self.gate {
                // The signatures command.
                return ok(b"def exported()".to_vec());
            }
            ok(vec![])
        }
    }

    impl FakePool {
        fn vm(&self, gate: bool) -> Box<dyn Sandbox> {
            Box::new(FakeVm {
                gate,
                order: String::new(),
                candidate: vec![],
                pool_orders: self.orders.clone(),
                secrets_seen_by_gates: self.secrets_seen_by_gates.clone(),
                diff_for: self.diff_for,
            })
        }
    }

    impl Pool for FakePool {
        fn agent(&self, _egress: &str) -> Result<Box<dyn Sandbox>, String> {
            Ok(self.vm(false))
        }
        fn gate(&self) -> Result<Box<dyn Sandbox>, String> {
            *self.gates.lock().unwrap() += 1;
            Ok(self.vm(true))
        }
    }

    fn new_file(path: &str, body: &str) -> String {
        format!(
            "diff --git a/{path} b/{path}\nnew file mode 100644\n--- /dev/null\n+++ b/{path}\n@@ -0,0 +1 @@\n+{body}\n"
        )
    }

    /// The task id a work order is for.
    fn task_of(order: &str) -> &str {
        order
            .strip_prefix("# Task ")
            .and_then(|r| r.split(':').next())
            .unwrap_or("")
    }

    fn diff_for(order: &str) -> String {
        match task_of(order) {
            "two" if !order.contains("## Attempt 1 failed") => new_file("src/two.py", "BROKEN = 1"),
            "bad" => new_file("README.md", "pwned"),
            "leaky" => new_file("src/leaky.py", "KEY = 'sk-topsecret'"),
            "boom" => panic!("simulated bug in dough"),
            id => new_file(&format!("src/{id}.py"), &format!("{id} = 1")),
        }
    }

    const PLAN: &str = r#"
goal = "test"
repo = "."
agent = ["true"]
check = "run the tests"
retries = 1
concurrency = 2

[[secrets]]
name = "API_KEY"
env = "X"
prefix = "sk-"

[[tasks]]
id = "one"
title = "One"
work = "w"
allow = ["src/one.py"]
secrets = ["API_KEY"]

[[tasks]]
id = "two"
title = "Two"
work = "w"
allow = ["src/two.py"]

[[tasks]]
id = "bad"
title = "Bad"
work = "w"
allow = ["src/bad.py"]

[[tasks]]
id = "three"
title = "Three"
work = "w"
allow = ["src/three.py"]
deps = ["one"]

[[tasks]]
id = "leaky"
title = "Commits its key"
work = "w"
allow = ["src/leaky.py"]
secrets = ["API_KEY"]

[[tasks]]
id = "after-bad"
title = "After bad"
work = "w"
allow = ["src/after.py"]
deps = ["bad"]
"#;

    fn diff_parts(order: &str) -> String {
        match task_of(order) {
            "a" => new_file("src/a2.py", "PART_A = 1"),
            "b" => new_file("src/b2.py", "PART_B = 1"),
            id => new_file(&format!("src/{id}.py"), "x = 1"),
        }
    }

    const PARTS: &str = r#"
goal = "two halves that only fail together"
repo = "."
agent = ["true"]
check = "run the tests"
retries = 0

[[tasks]]
id = "a"
title = "A"
work = "w"
allow = ["src/a2.py"]

[[tasks]]
id = "b"
title = "B"
work = "w"
allow = ["src/b2.py"]

[[tasks]]
id = "c"
title = "C"
work = "w"
allow = ["src/c.py"]
deps = ["a"]
"#;

    /// `git diff --binary` of a new file, made by real git.
    fn git_binary_new_file(path: &str, content: &[u8]) -> String {
        let d = tempfile::tempdir().unwrap();
        sh(d.path(), &["init", "-q"]);
        let f = d.path().join(path);
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(&f, content).unwrap();
        sh(d.path(), &["add", "-A"]);
        let out = std::process::Command::new("git")
            .args(["diff", "--cached", "--binary"])
            .current_dir(d.path())
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap()
    }

    fn diff_encoded(order: &str) -> String {
        match task_of(order) {
            // The key inside a binary file: compressed in the diff.
            "zipped" => {
                let mut body = b"\0\0\0header\0".to_vec();
                body.extend_from_slice(b"sk-topsecret");
                body.extend_from_slice(&[0u8; 64]);
                git_binary_new_file("bin/zipped.bin", &body)
            }
            // The key as a file name, one letter escaped in octal.
            "named" => "diff --git \"a/src/\\163k-topsecret\" \"b/src/\\163k-topsecret\"\nnew file mode 100644\n--- /dev/null\n+++ \"b/src/\\163k-topsecret\"\n@@ -0,0 +1 @@\n+x\n".into(),
            id => new_file(&format!("src/{id}.py"), "x = 1"),
        }
    }

    const ENCODED: &str = r#"
goal = "secrets in encodings"
repo = "."
agent = ["true"]
check = "run the tests"
retries = 0

[[secrets]]
name = "API_KEY"
env = "X"
prefix = "sk-"

[[tasks]]
id = "zipped"
title = "Key in a binary file"
work = "w"
allow = ["bin/zipped.bin"]
secrets = ["API_KEY"]

[[tasks]]
id = "named"
title = "Key as a file name"
work = "w"
allow = ["src/**"]
secrets = ["API_KEY"]
"#;

    /// A secret that reaches the diff only encoded — compressed in a binary
    /// patch, or in an escaped path — is still found in what would be
    /// committed, and refused.
    #[test]
    fn a_secret_hidden_by_an_encoding_is_refused() {
        for id in ["zipped", "named"] {
            let raw = diff_encoded(&format!("# Task {id}: x"));
            assert!(!raw.contains("sk-topsecret"), "{id}: the diff hides it");
        }
        let ran = run_plan(
            ENCODED,
            diff_encoded,
            vec![Value {
                name: "API_KEY".into(),
                value: "sk-topsecret".into(),
            }],
        );
        let r = &ran.result;
        for id in ["zipped", "named"] {
            let t = r.tasks.iter().find(|t| t.id == id).unwrap();
            assert_eq!(t.outcome, Outcome::Failed, "{id}");
            let why = t.attempts[0].failure.clone().unwrap();
            assert!(
                why.contains("(as it would be committed) contains the value of secret API_KEY"),
                "{id}: {why}"
            );
            assert!(!why.contains("sk-topsecret"), "{why}");
        }
        assert_eq!(
            sh(ran.repo.path(), &["log", "--format=%s", "dough/t1"]),
            "base"
        );
    }

    const BOOM: &str = r#"
goal = "one task hits a bug"
repo = "."
agent = ["true"]
check = "run the tests"
retries = 0
concurrency = 1

[[tasks]]
id = "boom"
title = "Hits a bug in dough"
work = "w"
allow = ["src/boom.py"]

[[tasks]]
id = "fine"
title = "Fine"
work = "w"
allow = ["src/fine.py"]
"#;

    /// A panic while handling one task fails that task with the reason;
    /// its sibling still lands, and the run finishes with its report.
    #[test]
    fn a_panic_in_one_task_fails_only_that_task() {
        let ran = run_plan(BOOM, diff_for, vec![]);
        let r = &ran.result;
        assert!(r.error.is_none(), "{:?}", r.error);
        let by_id = |id: &str| r.tasks.iter().find(|t| t.id == id).unwrap();
        assert_eq!(by_id("boom").outcome, Outcome::Failed);
        let why = by_id("boom").attempts[0].failure.clone().unwrap();
        assert!(
            why.contains("internal error") && why.contains("simulated bug in dough"),
            "{why}"
        );
        assert_eq!(by_id("fine").outcome, Outcome::Green);
        assert!(by_id("fine").commit.is_some());
    }

    #[test]
    fn a_round_whose_combination_fails_stops_later_rounds() {
        let r = run_plan(PARTS, diff_parts, vec![]).result;
        let by_id = |id: &str| r.tasks.iter().find(|t| t.id == id).unwrap();
        assert_eq!(by_id("a").outcome, Outcome::Green, "each passed alone");
        assert_eq!(by_id("b").outcome, Outcome::Green);
        assert_eq!(r.round_checks.len(), 1);
        assert!(!r.round_checks[0].passed);
        assert!(r.round_checks[0].log.contains("FAIL"));
        assert_eq!(by_id("c").outcome, Outcome::Blocked);
        assert_eq!(by_id("c").blocked_by, vec!["round 1's combined check"]);
    }

    /// Everything one fake run leaves for the assertions.
    struct Ran {
        result: RunResult,
        pool: FakePool,
        events: Vec<Event>,
        repo: tempfile::TempDir,
        _scratch: tempfile::TempDir,
    }

    /// Run `plan` on a fresh base repo with a fake pool whose agents
    /// produce `diff_for(work order)`.
    fn run_plan(plan: &str, diff_for: fn(&str) -> String, secrets: Vec<Value>) -> Ran {
        let repo = base_repo();
        let wt = tempfile::tempdir().unwrap();
        let stack = Stack::create(repo.path(), &wt.path().join("w"), "main", "t1").unwrap();
        let plan = Plan::parse(plan).unwrap().check().unwrap();
        let pool = FakePool {
            orders: Arc::new(Mutex::new(vec![])),
            gates: Arc::new(Mutex::new(0)),
            secrets_seen_by_gates: Arc::new(Mutex::new(false)),
            diff_for,
        };
        let events = Mutex::new(Vec::new());
        let on_event = |e: &Event| events.lock().unwrap().push(e.clone());
        let result = Runner {
            plan: &plan,
            pool: &pool,
            stack: &stack,
            secrets,
            run_id: "t1".into(),
            on_event: &on_event,
        }
        .run();
        Ran {
            result,
            pool,
            events: events.into_inner().unwrap(),
            repo,
            _scratch: wt,
        }
    }

    #[test]
    fn rounds_retry_with_feedback_stack_in_order_and_block_dependents() {
        let ran = run_plan(
            PLAN,
            diff_for,
            vec![Value {
                name: "API_KEY".into(),
                value: "sk-topsecret".into(),
            }],
        );
        let (r, pool, repo) = (&ran.result, &ran.pool, &ran.repo);
        let by_id = |id: &str| r.tasks.iter().find(|t| t.id == id).unwrap();
        assert_eq!(by_id("one").outcome, Outcome::Green);
        assert_eq!(by_id("two").outcome, Outcome::Green);
        assert_eq!(by_id("two").attempts.len(), 2, "the retry");
        assert!(by_id("two").attempts[0]
            .failure
            .as_deref()
            .unwrap()
            .contains("FAIL: test_two"));
        assert_eq!(by_id("bad").outcome, Outcome::Failed);
        assert!(by_id("bad").attempts[1]
            .failure
            .as_deref()
            .unwrap()
            .contains("\"README.md\" is outside the task's allowlist"));
        assert_eq!(by_id("after-bad").outcome, Outcome::Blocked);
        assert_eq!(by_id("leaky").outcome, Outcome::Failed);
        assert!(by_id("leaky").attempts[0]
            .failure
            .as_deref()
            .unwrap()
            .contains("contains the value of secret API_KEY"));
        assert_eq!(by_id("after-bad").blocked_by, vec!["bad"]);
        assert_eq!(by_id("three").outcome, Outcome::Green);
        // One commit per green task, in plan order within each round.
        assert_eq!(
            sh(repo.path(), &["log", "--format=%s", "dough/t1"]),
            "three: Three\ntwo: Two\none: One\nbase"
        );
        // Dependents see what their dependencies exported; retries see why
        // the last attempt failed.
        let orders = pool.orders.lock().unwrap().clone();
        let three = orders
            .iter()
            .find(|o| o.starts_with("# Task three"))
            .unwrap();
        assert!(
            three.contains("### one (One)\nChanged files: src/one.py"),
            "{three}"
        );
        assert!(three.contains("def exported()"));
        assert!(orders
            .iter()
            .any(|o| o.starts_with("# Task two") && o.contains("## Attempt 1 failed")));
        // Gates never got the secret; nothing reported carries it.
        assert!(!*pool.secrets_seen_by_gates.lock().unwrap());
        let json = serde_json::to_string(r).unwrap();
        assert!(!json.contains("topsecret"));
        assert!(ran.events.iter().all(|e| !e.what.contains("topsecret")));
        // Stats of the green attempt.
        assert_eq!(by_id("one").attempts[0].files, 1);
        assert!(by_id("one").attempts[0].phases.contains_key("gate"));
    }
}
