//! One task: its attempts, each in a fresh agent clone (ship the base tree,
//! write the work order, run the agent, take the diff), the diff checked
//! as data and against secrets, the candidate verified by the gate in an
//! offline clone; and the offline checks a round's stacked tree gets.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::guest::{gate_env, sh, APPLY_RO, KEEP_RO, ORDER, REPO, SHIP, SHIP_RO, TAKE_DIFF};
use super::{
    tail, Attempt, Cmd, Exit, Outcome, Output, Runner, Sandbox, SandboxError, Shared, TaskResult,
    Workspace,
};
use crate::diff::{Diff, MAX_DIFF_BYTES};

impl Runner<'_> {
    /// The result of a task whose processing hit a bug in dough.
    pub(super) fn internal_failure(&self, t: usize, round: usize, why: &str) -> TaskResult {
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
                egress: Vec::new(),
            }],
            commit: None,
            changed: vec![],
            signatures: String::new(),
            blocked_by: vec![],
            seconds: 0.0,
        }
    }

    /// The plan's check on a whole tree in a fresh offline clone (a fork
    /// of the round's workspace with the round's `changes` applied, when
    /// there is one).
    pub(super) fn round_gate(
        &self,
        tree: &[u8],
        changes: Option<&[u8]>,
        ws: Option<&dyn Workspace>,
    ) -> Result<String, String> {
        self.offline_checks(
            tree,
            changes,
            ws,
            "the stacked tree",
            &[&self.plan.plan.check],
        )
        .map(|(_, log)| log)
    }

    /// In a fresh gate clone (no network, no secrets): the tree read-only,
    /// then `checks` in order at its root. The clone is a fork of the
    /// round's workspace with `diff` applied when the workspace serves
    /// gates, else a cold one with `tree` unpacked. Ok((the clone, the
    /// log)) when all pass; Err(the log so far) otherwise.
    fn offline_checks(
        &self,
        tree: &[u8],
        diff: Option<&[u8]>,
        ws: Option<&dyn Workspace>,
        what: &str,
        checks: &[&String],
    ) -> Result<(Box<dyn Sandbox>, String), String> {
        let plan = &self.plan.plan;
        let no_clone = |e: SandboxError| format!("no clone for the gate: {}", e.chain());
        let fork = match (ws, diff) {
            (Some(w), Some(_)) => w.gate(),
            _ => None,
        };
        let (mut vm, script, stdin) = match (fork, diff) {
            (Some(vm), Some([])) => (vm.map_err(no_clone)?, KEEP_RO, None),
            (Some(vm), Some(d)) => (vm.map_err(no_clone)?, APPLY_RO, Some(d.to_vec())),
            _ => (
                self.pool.gate().map_err(no_clone)?,
                SHIP_RO,
                Some(tree.to_vec()),
            ),
        };
        let shipped = vm.run(
            &Cmd {
                argv: sh(script),
                stdin,
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
                .map_err(|e| format!("the check could not run: {}", e.chain()))?;
            log += &format!("$ {check}\n{}{}", tail(&o.stdout), tail(&o.stderr));
            match o.exit {
                Some(e) if e.ok() => {}
                Some(e) => return Err(format!("{log}\n({e})")),
                None => return Err(log),
            }
        }
        Ok((vm, log))
    }

    pub(super) fn task(
        &self,
        t: usize,
        round: usize,
        base_tar: &[u8],
        context: &BTreeMap<String, String>,
        shared: &Shared<'_>,
        ws: Option<&dyn Workspace>,
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
            let (attempt, diff) = self.attempt(t, n, base_tar, &order, shared, ws);
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
        ws: Option<&dyn Workspace>,
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
            egress: Vec::new(),
        };
        let phase = |a: &mut Attempt, name: &'static str, since: Instant| {
            a.phases.insert(
                name.to_string(),
                (since.elapsed().as_secs_f64() * 100.0).round() / 100.0,
            );
        };
        let fail = |mut a: Attempt, why: String| {
            a.failure = Some(shared.redactor.redact(&why));
            (a, None)
        };
        // The agent's secrets (only here: never in a gate): brokered ones
        // as placeholders, their real values for the clone's gateway.
        let mut env: Vec<(String, String)> = vec![("WORK_ORDER".into(), ORDER.into())];
        let mut brokers = Vec::new();
        for name in &task.secrets {
            let Some(v) = self.secrets.iter().find(|s| &s.name == name) else {
                continue;
            };
            let inject = plan
                .secrets
                .iter()
                .find(|s| &s.name == name)
                .and_then(|s| s.inject.as_ref().map(|i| (s, i)));
            match inject {
                Some((spec, i)) => match crate::secrets::broker(spec, i, v) {
                    Ok(b) => {
                        env.push((name.clone(), b.placeholder.clone()));
                        brokers.push(b);
                    }
                    Err(e) => return fail(a, e),
                },
                None => env.push((v.name.clone(), v.value.clone())),
            }
        }
        // Agent clone: a fork of the round's workspace (the tree and the
        // setup's work already in it), or a cold one the tree is shipped to.
        let t0 = Instant::now();
        let got = match ws {
            Some(w) => w.agent(&plan.egress, &brokers),
            None => self.pool.agent(&plan.egress, &brokers),
        };
        let mut vm = match got {
            Ok(v) => v,
            Err(e) => return fail(a, format!("no clone for the agent: {}", e.chain())),
        };
        phase(&mut a, "restore", t0);
        let t0 = Instant::now();
        if ws.is_none() {
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
        // The agent, with its secrets.
        let t0 = Instant::now();
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
        a.egress = egress_summary(vm.egress_log(), &shared.redactor);
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
            Err(e) => return fail(a, format!("the agent could not run: {}", e.chain())),
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
            Err(e) => return fail(a, format!("taking the diff failed: {}", e.chain())),
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
        let gate = self.gate(t, &candidate, &raw, &diff.changed_paths(), ws);
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
        raw_diff: &[u8],
        changed: &[String],
        ws: Option<&dyn Workspace>,
    ) -> Result<(String, String), String> {
        let plan = &self.plan.plan;
        let checks: Vec<&String> = std::iter::once(&plan.check)
            .chain(plan.tasks[t].check.as_ref())
            .collect();
        let (mut vm, log) =
            self.offline_checks(candidate, Some(raw_diff), ws, "the candidate", &checks)?;
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

/// A task's result and, when green, the diff to stack.
pub(super) type Finished = (TaskResult, Option<Vec<u8>>);

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

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("")
}

pub(super) fn check_ok(r: Result<Output, SandboxError>, what: &str) -> Result<(), String> {
    match r {
        Ok(o) if o.exit.as_ref().is_some_and(Exit::ok) => Ok(()),
        Ok(o) => Err(format!(
            "{what} failed ({}): {}",
            o.exit.map(|e| e.to_string()).unwrap_or_default(),
            tail(&o.stderr)
        )),
        Err(e) => Err(format!("{what} failed: {}", e.chain())),
    }
}

/// The egress lines kept for a report: denied and failed ones first, then
/// the rest, at most [`super::report::EGRESS_LINES`], redacted.
fn egress_summary(lines: Vec<String>, redactor: &crate::secrets::Redactor) -> Vec<String> {
    let max = super::report::EGRESS_LINES;
    let total = lines.len();
    let (mut bad, good): (Vec<String>, Vec<String>) = lines
        .into_iter()
        .partition(|l| l.contains(" DENY ") || l.contains(" fail "));
    bad.extend(good);
    let mut out: Vec<String> = bad.iter().take(max).map(|l| redactor.redact(l)).collect();
    if total > max {
        out.push(format!("... and {} more", total - max));
    }
    out
}
