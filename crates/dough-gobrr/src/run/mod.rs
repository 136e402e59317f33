//! Running a validated plan: rounds of tasks, each attempt in a fresh
//! clone (ship the base tree, run the agent, take its diff), the diff
//! checked as data, the candidate verified by the gate in an offline clone,
//! failures fed back into a retry, green results stacked in plan order.
//!
//! VMs are behind [`Pool`]/[`Sandbox`], so the orchestration is unit-tested
//! with a scripted fake; dough's binary implements them over its clones.
//!
//! The module, by concern: [`sandbox`] (what a clone must do for gobrr),
//! [`report`] (what a run produces), `guest` (the shell gobrr runs in
//! clones), `order` (work orders), `attempt` (one task: attempts, diff,
//! gate); the scheduler (rounds) is here.

mod attempt;
mod guest;
mod order;
pub mod report;
pub mod sandbox;

pub use guest::{ORDER, REPO};
pub use report::{
    Attempt, Event, Outcome, Pending, Progress, RoundCheck, RunResult, TaskResult, WorkspaceReport,
};
pub use sandbox::{
    Cmd, Exit, Output, Pool, Sandbox, SandboxError, Workspace, WorkspaceError, STEP_TIMEOUT,
};

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Instant;

use crate::plan::ValidPlan;
use crate::secrets::{Redactor, Value};
use crate::stack::{commit_message, Stack, StackError};
use attempt::Finished;

const LOG_TAIL: usize = 4000;

fn tail(b: &[u8]) -> String {
    let s = String::from_utf8_lossy(b);
    let start = s.len().saturating_sub(LOG_TAIL);
    let start = (start..=s.len())
        .find(|&i| s.is_char_boundary(i))
        .unwrap_or(s.len());
    s[start..].to_string()
}

/// The runner's inputs.
pub struct Runner<'a> {
    pub plan: &'a ValidPlan,
    pub pool: &'a dyn Pool,
    pub stack: &'a Stack,
    pub secrets: Vec<Value>,
    pub run_id: String,
    /// Told every event as it happens (already redacted).
    pub on_event: &'a (dyn Fn(&Event) + Sync),
    /// How far an interrupted run on this branch got (default: a new run).
    pub resume: Progress,
    /// Told the run's progress each time a task finishes, is stacked, or
    /// a round is done: keep the last one to resume the run after a crash.
    pub on_progress: &'a (dyn Fn(&Progress) + Sync),
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
        let progress = Mutex::new(self.resume.clone());
        let mut results: Vec<Option<TaskResult>> = vec![None; plan.tasks.len()];
        let rounds = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.rounds(&shared, &mut results, &progress)
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
        let p = progress.into_inner().unwrap_or_else(|p| p.into_inner());
        let base = p.base.clone().unwrap_or_default();
        RunResult {
            run_id: self.run_id.clone(),
            branch: self.stack.branch.clone(),
            goal: plan.goal.clone(),
            head: self.stack.head().unwrap_or_else(|_| base.clone()),
            base,
            concurrency: plan.concurrency,
            seconds: p.seconds_before + start.elapsed().as_secs_f64(),
            tasks: results.into_iter().flatten().collect(),
            round_checks: p.round_checks,
            workspaces: p.workspaces,
            error,
        }
    }

    /// Tell `on_progress` where the run is.
    fn save(&self, p: &Progress, shared: &Shared<'_>) {
        let mut p = p.clone();
        p.seconds_before += shared.start.elapsed().as_secs_f64();
        (self.on_progress)(&p);
    }

    /// Record a finished task: green ones wait to be stacked.
    fn finished(&self, progress: &Mutex<Progress>, f: &Finished, shared: &Shared<'_>) {
        let mut p = progress.lock().unwrap_or_else(|e| e.into_inner());
        let (r, diff) = f;
        match (&r.outcome, diff) {
            (Outcome::Green, Some(d)) => {
                p.pending.insert(
                    r.id.clone(),
                    Pending {
                        result: r.clone(),
                        diff_hex: hex::encode(d),
                    },
                );
            }
            _ => {
                p.tasks.insert(r.id.clone(), r.clone());
            }
        }
        self.save(&p, shared);
    }

    /// Resuming: where the run began, and the green tasks whose commit
    /// landed before the interruption (stacked, not to be stacked again).
    fn reconcile(&self, progress: &Mutex<Progress>) -> Result<(), StackError> {
        let mut p = progress.lock().unwrap_or_else(|e| e.into_inner());
        if p.base.is_none() {
            p.base = Some(self.stack.head()?);
            return Ok(());
        }
        let base = p.base.clone().unwrap_or_default();
        let landed = self.stack.task_commits(&base, &self.run_id)?;
        for (id, pending) in std::mem::take(&mut p.pending) {
            match landed.get(&id) {
                Some(c) => {
                    let mut r = pending.result;
                    r.commit = Some(c.clone());
                    p.tasks.insert(id, r);
                }
                None => {
                    p.pending.insert(id, pending);
                }
            }
        }
        for (task, commit) in landed {
            if p.tasks.get(&task).and_then(|r| r.commit.as_deref()) != Some(commit.as_str()) {
                return Err(StackError::Unrecorded { task, commit });
            }
        }
        Ok(())
    }

    fn rounds(
        &self,
        shared: &Shared<'_>,
        results: &mut [Option<TaskResult>],
        progress: &Mutex<Progress>,
    ) -> Result<(), StackError> {
        let plan = &self.plan.plan;
        let lock = || progress.lock().unwrap_or_else(|e| e.into_inner());
        self.reconcile(progress)?;
        // Its base, recorded before anything else happens.
        self.save(&lock(), shared);
        // A round check that failed before an interruption still stops
        // the rounds after it.
        let mut stopped: Option<String> = lock()
            .round_checks
            .iter()
            .find(|c| !c.passed)
            .map(|c| format!("round {}'s combined check", c.round));
        for (k, round) in self.plan.rounds.iter().enumerate() {
            if k < lock().rounds_done {
                // Done before an interruption: its results stand.
                let p = lock();
                for &t in round {
                    results[t] = p.tasks.get(&plan.tasks[t].id).cloned();
                }
                continue;
            }
            if let Some(why) = &stopped {
                // An earlier round's combined result failed the check: no
                // task builds on it.
                for &t in round {
                    let task = &plan.tasks[t];
                    shared.event(&task.id, 0, format!("blocked by {why}"));
                    let r = TaskResult::blocked(task, k + 1, vec![why.clone()]);
                    lock().tasks.insert(task.id.clone(), r.clone());
                    results[t] = Some(r);
                }
                continue;
            }
            // Finished before an interruption: final ones stand, green ones
            // are stacked with the round.
            let mut resumed: BTreeMap<usize, Finished> = BTreeMap::new();
            {
                let p = lock();
                for &t in round {
                    let id = &plan.tasks[t].id;
                    if let Some(r) = p.tasks.get(id) {
                        results[t] = Some(r.clone());
                    } else if let Some(pend) = p.pending.get(id) {
                        let diff = hex::decode(&pend.diff_hex).unwrap_or_default();
                        resumed.insert(t, (pend.result.clone(), Some(diff)));
                    }
                }
            }
            // Blocked tasks first: a dependency did not go green.
            let mut runnable = Vec::new();
            for &t in round {
                if results[t].is_some() || resumed.contains_key(&t) {
                    continue;
                }
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
                    let r = TaskResult::blocked(task, k + 1, blocked_by);
                    lock().tasks.insert(task.id.clone(), r.clone());
                    results[t] = Some(r);
                }
            }
            let base_tar = self.stack.archive()?;
            let round_base = self.stack.head()?;
            let context = self.dependency_context(results);
            // The plan's setup, once for the round: its tasks fork from it.
            let workspace = match (&plan.setup, runnable.is_empty()) {
                (Some(setup), false) => {
                    let (ws, report) =
                        self.workspace(k + 1, setup, &base_tar, runnable.len(), shared);
                    if let Some(why) = &report.failure {
                        for &t in &runnable {
                            let r = self.setup_failure(t, k + 1, why);
                            lock().tasks.insert(r.id.clone(), r.clone());
                            results[t] = Some(r);
                        }
                        runnable.clear();
                    }
                    lock().workspaces.push(report);
                    ws
                }
                _ => None,
            };
            let ws = workspace.as_deref();
            // Up to `concurrency` tasks at once.
            let queue = Mutex::new(runnable.clone().into_iter());
            let done: Mutex<BTreeMap<usize, Finished>> = Mutex::new(resumed);
            std::thread::scope(|s| {
                for _ in 0..plan.concurrency.min(runnable.len() as u32).max(1) {
                    s.spawn(|| loop {
                        let Some(t) = queue.lock().expect("queue").next() else {
                            return;
                        };
                        // A bug in one task must not take the run down: a
                        // panic becomes that task's failure.
                        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            self.task(t, k + 1, &base_tar, &context, shared, ws)
                        }))
                        .unwrap_or_else(|panic| {
                            let why = panic_message(&*panic);
                            shared.event(&plan.tasks[t].id, 0, format!("internal error: {why}"));
                            (self.internal_failure(t, k + 1, &why), None)
                        });
                        self.finished(progress, &r, shared);
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
                {
                    let mut p = lock();
                    p.pending.remove(&r.id);
                    p.tasks.insert(r.id.clone(), r.clone());
                    self.save(&p, shared);
                }
                results[t] = Some(r);
            }
            let stacked = round
                .iter()
                .filter(|&&t| results[t].as_ref().is_some_and(|r| r.commit.is_some()))
                .count();
            if stacked >= 2 {
                let tree = self.stack.archive()?;
                let changes = match ws {
                    Some(_) => Some(self.stack.diff_since(&round_base)?),
                    None => None,
                };
                let (passed, log) = match self.round_gate(&tree, changes.as_deref(), ws) {
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
                lock().round_checks.push(RoundCheck {
                    round: k + 1,
                    passed,
                    log: shared.tail(log.as_bytes()),
                });
            }
            let mut p = lock();
            p.rounds_done = k + 1;
            self.save(&p, shared);
        }
        Ok(())
    }
}

impl Runner<'_> {
    /// Make round `round`'s workspace: a clone with the round's tree, the
    /// plan's `setup` run at its root and what it made committed, saved.
    fn workspace(
        &self,
        round: usize,
        setup: &str,
        base_tar: &[u8],
        tasks: usize,
        shared: &Shared<'_>,
    ) -> (Option<Box<dyn Workspace>>, WorkspaceReport) {
        let plan = &self.plan.plan;
        let what = format!("round {round}");
        shared.event(&what, 0, format!("setting up its workspace: {setup}"));
        let started = Instant::now();
        let mut setup_secs = 0.0;
        let made = self.pool.workspace(&plan.egress, &mut |vm| {
            let t0 = Instant::now();
            let step =
                |vm: &mut dyn Sandbox, argv, stdin: Option<Vec<u8>>, cwd, timeout, what: &str| {
                    attempt::check_ok(
                        vm.run(
                            &Cmd {
                                argv,
                                stdin,
                                cwd,
                                timeout,
                                ..Cmd::default()
                            },
                            1 << 20,
                        ),
                        what,
                    )
                };
            let step_timeout = std::time::Duration::from_secs(plan.step_timeout_secs);
            step(
                vm,
                guest::sh(guest::SHIP),
                Some(base_tar.to_vec()),
                None,
                step_timeout,
                "shipping the repo",
            )?;
            step(
                vm,
                guest::sh(setup),
                None,
                Some(REPO.to_string()),
                std::time::Duration::from_secs(plan.setup_timeout_secs),
                "the plan's setup",
            )?;
            step(
                vm,
                guest::sh(guest::COMMIT_SETUP),
                None,
                None,
                step_timeout,
                "recording what the setup made",
            )?;
            setup_secs = t0.elapsed().as_secs_f64();
            Ok(())
        });
        let total = started.elapsed().as_secs_f64();
        let round2 = |x: f64| (x * 100.0).round() / 100.0;
        let mut report = WorkspaceReport {
            round,
            setup_secs: round2(setup_secs),
            save_secs: round2((total - setup_secs).max(0.0)),
            tasks,
            failure: None,
        };
        match made {
            Ok(ws) => {
                shared.event(
                    &what,
                    0,
                    format!(
                        "workspace ready: setup {:.1}s, saved in {:.1}s; its {tasks} task(s) fork from it",
                        report.setup_secs, report.save_secs
                    ),
                );
                (Some(ws), report)
            }
            Err(e) => {
                let why = shared
                    .redactor
                    .redact(&format!("the plan's setup failed: {e}"));
                shared.event(&what, 0, why.clone());
                report.failure = Some(why);
                (None, report)
            }
        }
    }

    /// A task that did not run: its round's workspace could not be made.
    fn setup_failure(&self, t: usize, round: usize, why: &str) -> TaskResult {
        let mut r = self.internal_failure(t, round, why);
        if let Some(a) = r.attempts.first_mut() {
            a.failure = Some(why.to_string());
        }
        r
    }
}

/// What a caught panic said.
pub fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

#[cfg(test)]
mod tests {
    use super::guest::{APPLY_RO, COMMIT_SETUP, SHIP, SHIP_RO, TAKE_DIFF};
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
        /// Every script a clone ran, with "agent"/"gate"/"setup" before it.
        scripts: Arc<Mutex<Vec<String>>>,
        /// Forks of workspaces: (agents, gates).
        forks: Arc<Mutex<(u32, u32)>>,
    }

    struct FakeWorkspace {
        pool: FakePool,
    }

    impl Workspace for FakeWorkspace {
        fn agent(
            &self,
            _egress: &str,
            _brokers: &[dough_gateway::broker::Broker],
        ) -> Result<Box<dyn Sandbox>, SandboxError> {
            self.pool.forks.lock().unwrap().0 += 1;
            Ok(self.pool.vm("agent"))
        }
        fn gate(&self) -> Option<Result<Box<dyn Sandbox>, SandboxError>> {
            self.pool.forks.lock().unwrap().1 += 1;
            Some(Ok(self.pool.vm("gate")))
        }
    }

    struct FakeVm {
        gate: bool,
        role: &'static str,
        scripts: Arc<Mutex<Vec<String>>>,
        order: String,
        candidate: Vec<u8>,
        pool_orders: Arc<Mutex<Vec<String>>>,
        secrets_seen_by_gates: Arc<Mutex<bool>>,
        diff_for: fn(&str) -> String,
    }

    impl Sandbox for FakeVm {
        fn run(&mut self, cmd: &Cmd, _max: usize) -> Result<Output, SandboxError> {
            let script = cmd.argv.get(2).cloned().unwrap_or_default();
            let ok = |stdout: Vec<u8>| {
                Ok(Output {
                    exit: Some(Exit::Code(0)),
                    stdout,
                    stderr: vec![],
                })
            };
            self.scripts
                .lock()
                .unwrap()
                .push(format!("{}: {script}", self.role));
            if script == "fail to set up" {
                return Ok(Output {
                    exit: Some(Exit::Code(2)),
                    stdout: vec![],
                    stderr: b"E: no such package".to_vec(),
                });
            }
            if self.gate && cmd.env.iter().any(|(k, _)| k == "API_KEY") {
                *self.secrets_seen_by_gates.lock().unwrap() = true;
            }
            if script.starts_with("cat > ") {
                self.order = String::from_utf8(cmd.stdin.clone().unwrap()).unwrap();
                self.pool_orders.lock().unwrap().push(self.order.clone());
                return ok(vec![]);
            }
            if script == SHIP_RO || script == APPLY_RO {
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
        fn vm(&self, role: &'static str) -> Box<dyn Sandbox> {
            Box::new(FakeVm {
                gate: role == "gate",
                role,
                scripts: self.scripts.clone(),
                order: String::new(),
                candidate: vec![],
                pool_orders: self.orders.clone(),
                secrets_seen_by_gates: self.secrets_seen_by_gates.clone(),
                diff_for: self.diff_for,
            })
        }

        fn twin(&self) -> FakePool {
            FakePool {
                orders: self.orders.clone(),
                gates: self.gates.clone(),
                secrets_seen_by_gates: self.secrets_seen_by_gates.clone(),
                diff_for: self.diff_for,
                scripts: self.scripts.clone(),
                forks: self.forks.clone(),
            }
        }
    }

    impl Pool for FakePool {
        fn agent(
            &self,
            _egress: &str,
            _brokers: &[dough_gateway::broker::Broker],
        ) -> Result<Box<dyn Sandbox>, SandboxError> {
            Ok(self.vm("agent"))
        }
        fn gate(&self) -> Result<Box<dyn Sandbox>, SandboxError> {
            *self.gates.lock().unwrap() += 1;
            Ok(self.vm("gate"))
        }
        fn workspace(
            &self,
            _egress: &str,
            prepare: &mut dyn FnMut(&mut dyn Sandbox) -> Result<(), String>,
        ) -> Result<Box<dyn Workspace>, WorkspaceError> {
            let mut vm = self.vm("setup");
            prepare(&mut *vm).map_err(WorkspaceError::Prepare)?;
            Ok(Box::new(FakeWorkspace { pool: self.twin() }))
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

    /// With a `setup`, each round prepares one workspace — the tree
    /// shipped, the setup run at the repo root, what it made committed —
    /// and every agent and gate of the round is a fork of it: no agent
    /// ships the tree, gates apply the candidate's diff. The outcomes are
    /// those of the same plan without it.
    #[test]
    fn a_setup_runs_once_per_round_and_tasks_fork_from_it() {
        let with = PARTS.replace("retries = 0", "retries = 0\nsetup = \"install deps\"");
        assert_ne!(with, PARTS);
        let ran = run_plan(&with, diff_parts, vec![]);
        let cold = run_plan(PARTS, diff_parts, vec![]).result;
        let r = &ran.result;
        let outcomes = |r: &RunResult| -> Vec<(String, Outcome)> {
            r.tasks
                .iter()
                .map(|t| (t.id.clone(), t.outcome.clone()))
                .collect()
        };
        assert_eq!(outcomes(r), outcomes(&cold));
        let scripts = ran.pool.scripts.lock().unwrap().clone();
        let setups: Vec<&String> = scripts
            .iter()
            .filter(|s| s.starts_with("setup: "))
            .collect();
        assert_eq!(
            setups,
            vec![
                &format!("setup: {SHIP}"),
                &"setup: install deps".to_string(),
                &format!("setup: {COMMIT_SETUP}")
            ],
            "one workspace (round 1 ran; round 2 was blocked)"
        );
        assert!(
            !scripts.iter().any(|s| *s == format!("agent: {SHIP}")),
            "{scripts:?}"
        );
        assert!(
            !scripts.iter().any(|s| *s == format!("gate: {SHIP_RO}")),
            "{scripts:?}"
        );
        let (agents, gates) = *ran.pool.forks.lock().unwrap();
        assert_eq!(
            (agents, gates),
            (2, 3),
            "two agents, two gates and the round's check"
        );
        assert_eq!(*ran.pool.gates.lock().unwrap(), 0, "no cold gate");
        assert_eq!(r.workspaces.len(), 1);
        assert_eq!((r.workspaces[0].round, r.workspaces[0].tasks), (1, 2));
        assert!(r.workspaces[0].failure.is_none());
        // The round's combined check saw both parts, applied in a fork.
        assert!(!r.round_checks[0].passed && r.round_checks[0].log.contains("FAIL"));
        assert!(ran
            .events
            .iter()
            .any(|e| e.what.contains("workspace ready")));
    }

    /// A setup that fails fails its round's tasks with its output; no agent
    /// runs on a half-made workspace.
    #[test]
    fn a_failed_setup_fails_its_rounds_tasks() {
        let with = PARTS.replace("retries = 0", "retries = 0\nsetup = \"fail to set up\"");
        let ran = run_plan(&with, diff_parts, vec![]);
        let r = &ran.result;
        for id in ["a", "b"] {
            let t = r.tasks.iter().find(|t| t.id == id).unwrap();
            assert_eq!(t.outcome, Outcome::Failed);
            let why = t.attempts[0].failure.clone().unwrap();
            assert!(
                why.contains("the plan's setup failed") && why.contains("no such package"),
                "{why}"
            );
        }
        assert!(ran.pool.orders.lock().unwrap().is_empty(), "no agent ran");
        assert!(r.workspaces[0].failure.is_some());
        assert!(r.tasks.iter().all(|t| t.commit.is_none()));
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
            scripts: Arc::new(Mutex::new(vec![])),
            forks: Arc::new(Mutex::new((0, 0))),
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
            resume: Progress::default(),
            on_progress: &|_| {},
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

    fn run_with(
        plan: &ValidPlan,
        pool: &FakePool,
        stack: &Stack,
        resume: Progress,
        on_progress: &(dyn Fn(&Progress) + Sync),
    ) -> RunResult {
        Runner {
            plan,
            pool,
            stack,
            secrets: vec![],
            run_id: "t1".into(),
            on_event: &|_| {},
            resume,
            on_progress,
        }
        .run()
    }

    fn fake_pool(diff_for: fn(&str) -> String) -> FakePool {
        FakePool {
            orders: Arc::new(Mutex::new(vec![])),
            gates: Arc::new(Mutex::new(0)),
            secrets_seen_by_gates: Arc::new(Mutex::new(false)),
            diff_for,
            scripts: Arc::new(Mutex::new(vec![])),
            forks: Arc::new(Mutex::new((0, 0))),
        }
    }

    /// A run killed at any point — here: at every moment it reports its
    /// progress, before that report is kept (so the last kept one is
    /// behind what happened, as after a crash) — and resumed from its last
    /// kept progress ends as an uninterrupted run does: the same outcomes,
    /// each green task committed exactly once, no finished task run again.
    #[test]
    fn an_interrupted_run_resumes_without_rerunning_or_recommitting() {
        let plan = Plan::parse(PLAN).unwrap().check().unwrap();
        let outcomes = |r: &RunResult| -> Vec<(String, Outcome)> {
            r.tasks
                .iter()
                .map(|t| (t.id.clone(), t.outcome.clone()))
                .collect()
        };
        let whole = run_plan(PLAN, diff_for, vec![]);
        let expected = outcomes(&whole.result);
        let log = |repo: &std::path::Path| sh(repo, &["log", "--format=%s", "dough/t1"]);
        let expected_log = log(whole.repo.path());
        // How many progress reports a whole run makes.
        let reports = {
            let repo = base_repo();
            let wt = tempfile::tempdir().unwrap();
            let stack = Stack::create(repo.path(), &wt.path().join("w"), "main", "t1").unwrap();
            let n = Mutex::new(0);
            let pool = fake_pool(diff_for);
            run_with(&plan, &pool, &stack, Progress::default(), &|_| {
                *n.lock().unwrap() += 1
            });
            n.into_inner().unwrap()
        };
        assert!(reports >= 6, "{reports}");
        for kill_at in 1..=reports {
            let repo = base_repo();
            let wt = tempfile::tempdir().unwrap();
            let scratch = wt.path().join("w");
            let stack = Stack::create(repo.path(), &scratch, "main", "t1").unwrap();
            let kept: Mutex<(usize, Option<Progress>)> = Mutex::new((0, None));
            let pool = fake_pool(diff_for);
            let first = run_with(&plan, &pool, &stack, Progress::default(), &|p| {
                let mut k = kept.lock().unwrap_or_else(|e| e.into_inner());
                k.0 += 1;
                if k.0 == kill_at {
                    panic!("killed");
                }
                k.1 = Some(p.clone());
            });
            assert!(
                first.error.is_some(),
                "kill {kill_at}: the run was not stopped"
            );
            drop(stack);
            let progress = kept
                .into_inner()
                .unwrap_or_else(|e| e.into_inner())
                .1
                .unwrap_or_default();
            let stack = Stack::open(repo.path(), &scratch, "main", "t1").unwrap();
            let pool = fake_pool(diff_for);
            let again = run_with(&plan, &pool, &stack, progress.clone(), &|_| {});
            assert_eq!(again.error, None, "kill {kill_at}");
            assert_eq!(outcomes(&again), expected, "kill {kill_at}");
            assert_eq!(log(repo.path()), expected_log, "kill {kill_at}");
            // Nothing that had finished ran again.
            let orders = pool.orders.lock().unwrap().clone();
            for id in progress.tasks.keys().chain(progress.pending.keys()) {
                let head = format!("# Task {id}\n");
                assert!(
                    !orders.iter().any(|o| o.starts_with(&head)),
                    "kill {kill_at}: {id} ran again"
                );
            }
        }
    }
}
