//! The plan: a goal decomposed into file-disjoint tasks with dependencies
//! (TOML, docs/plan.md), its validation, and its rounds.
//!
//! gobrr refuses a bad decomposition rather than improvise: [`Plan::check`]
//! reports every problem it finds, each naming the tasks and paths
//! involved, and nothing runs unless there are none.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::glob::{reaches_git, Glob};

/// A plan as written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// What the whole run is for (shown in reports; given to every task).
    pub goal: String,
    /// The git repository, relative to the plan file.
    pub repo: PathBuf,
    /// Ref the first round starts from.
    #[serde(default = "default_base")]
    pub base: String,
    /// The agent command, run in the VM at the repo root. `{work_order}`
    /// is replaced with the path of the work-order file.
    pub agent: Vec<String>,
    /// Gate check, run with `sh -c` at the repo root in an offline VM.
    pub check: String,
    /// Extra attempts after a failed one.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// Tasks of a round running at once (each in its own clone).
    #[serde(default = "default_concurrency")]
    pub concurrency: u32,
    /// Egress policy of agent clones: `none`, `nat`, `allow=RULE,...`, or
    /// a list of rules (`["api.anthropic.com", "*.github.com:443",
    /// "10.0.0.0/8"]`, the same as `allow=` with them).
    #[serde(default = "default_egress", deserialize_with = "egress_spec")]
    pub egress: String,
    /// Seconds the agent may run.
    #[serde(default = "default_agent_timeout")]
    pub agent_timeout_secs: u64,
    /// Seconds a gate check may run.
    #[serde(default = "default_check_timeout")]
    pub check_timeout_secs: u64,
    /// Seconds each of dough's own steps in a clone may run (shipping the
    /// tree, writing the work order, taking the diff): the guest decides
    /// how long they take, so they have a deadline too.
    #[serde(default = "default_check_timeout")]
    pub step_timeout_secs: u64,
    /// Command printing the exported signatures of the files given as
    /// arguments (run in the gate VM; embedded in dependents' work orders).
    #[serde(default = "default_signatures")]
    pub signatures: String,
    #[serde(default)]
    pub secrets: Vec<Secret>,
    /// Run once per round, at the repo root of a clone of the agents' image
    /// holding the round's tree, with the plan's egress and no secret
    /// (`npm ci`, `pip install -e .`); that clone is then saved, and the
    /// round's agents (and gates, when they use the same image) are forks
    /// of it: what the setup made is there without running it again. What
    /// it writes is the new base the agents' diffs are taken against (list
    /// it in `.gitignore` or it is part of every candidate tree).
    #[serde(default)]
    pub setup: Option<String>,
    /// Seconds the setup may run.
    #[serde(default = "default_agent_timeout")]
    pub setup_timeout_secs: u64,
    /// The image agents run in: an image id (`dough image ls`) or a recipe
    /// file (`*.toml`, relative to the plan) whose image is built first if
    /// it is not yet. Default: `dough go --image`, else the current image.
    #[serde(default)]
    pub image: Option<String>,
    /// The image gates run in, in the same forms and with the same default
    /// — not the agents' image: a gate wants a fixed toolchain, offline.
    #[serde(default)]
    pub gate_image: Option<String>,
    pub tasks: Vec<Task>,
}

/// What is wrong with a plan's `image`/`gate_image` value, if anything.
fn image_problem(field: &str, v: &str) -> Option<String> {
    if v.ends_with(".toml") {
        return (!inside(Path::new(v))).then(|| {
            format!(
                "{field} {v:?}: a recipe must be inside the plan's directory (a relative path without `..`)"
            )
        });
    }
    let id = !v.is_empty() && v.len() <= 64 && v.bytes().all(|b| b.is_ascii_hexdigit());
    (!id).then(|| format!("{field} {v:?} is neither an image id nor a recipe file (*.toml)"))
}

/// A path a plan may name: relative, and without `..` (so it stays inside
/// the plan's directory; symlinks are checked when it is opened).
fn inside(p: &Path) -> bool {
    p.is_relative()
        && p.components()
            .all(|c| !matches!(c, std::path::Component::ParentDir))
}

fn default_base() -> String {
    "HEAD".into()
}
fn default_retries() -> u32 {
    1
}
fn default_concurrency() -> u32 {
    4
}
fn default_egress() -> String {
    "nat".into()
}

/// `egress` as written: one policy string, or a list of allow rules
/// (normalised to `allow=a,b,...`; checked later, with the other settings).
fn egress_spec<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Spec {
        One(String),
        Rules(Vec<String>),
    }
    Ok(match Spec::deserialize(d)? {
        Spec::One(s) => s,
        Spec::Rules(r) if r.is_empty() => "none".into(),
        Spec::Rules(r) => format!("allow={}", r.join(",")),
    })
}
fn default_agent_timeout() -> u64 {
    1800
}
fn default_check_timeout() -> u64 {
    300
}
/// Python's `def`/`class` lines: the default for the demo's language.
pub const DEFAULT_SIGNATURES: &str = "grep -nE '^(async def|def|class) ' \"$@\" || true";
fn default_signatures() -> String {
    DEFAULT_SIGNATURES.into()
}

/// A secret the agent of some tasks needs, taken from the host when the
/// task is served and never written anywhere.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Secret {
    /// Environment variable name inside the VM.
    pub name: String,
    /// Host environment variable to read it from...
    pub env: Option<String>,
    /// ...or host file.
    pub file: Option<PathBuf>,
    /// The value must start with this (a guard against pasting the wrong
    /// thing, and what redaction keys on).
    #[serde(default)]
    pub prefix: String,
    /// Broker it: the agent gets a placeholder (this prefix and random
    /// characters), and its clone's gateway puts the real value into the
    /// header named here of HTTPS requests to these hosts only.
    #[serde(default)]
    pub inject: Option<Inject>,
}

/// Where a brokered secret is used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Inject {
    /// Host names (exact or `*.domain`) that get the real value.
    pub hosts: Vec<String>,
    /// `x-api-key`, `authorization` (default; also for `Bearer`),
    /// `authorization: Basic` (git over HTTPS).
    #[serde(default)]
    pub header: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Task {
    pub id: String,
    pub title: String,
    /// The work order given to the agent.
    pub work: String,
    /// Globs (relative to the repo) of the files the task may change.
    pub allow: Vec<String>,
    #[serde(default)]
    pub deps: Vec<String>,
    /// A check of its own, run after the plan's.
    pub check: Option<String>,
    /// Secrets (by name) its agent gets.
    #[serde(default)]
    pub secrets: Vec<String>,
    /// For the scripted agent: a shell script run instead of a real agent.
    pub script: Option<String>,
}

/// One thing wrong with a plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    Parse(String),
    NoTasks,
    BadId(String),
    DuplicateId(String),
    UnknownDep {
        task: String,
        dep: String,
    },
    SelfDep(String),
    Cycle(Vec<String>),
    EmptyAllowlist(String),
    BadGlob {
        task: String,
        error: String,
    },
    ReachesGit {
        task: String,
        glob: String,
        path: String,
    },
    Overlap {
        a: String,
        glob_a: String,
        b: String,
        glob_b: String,
        path: String,
    },
    BadSetting(String),
    BadSecret(String),
    UnknownSecret {
        task: String,
        secret: String,
    },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Parse(e) => write!(f, "the plan does not parse: {e}"),
            Problem::NoTasks => f.write_str("the plan has no tasks"),
            Problem::BadId(id) => write!(
                f,
                "task id {id:?} is not valid (use 1-40 of [a-z0-9_-], starting with a letter or digit)"
            ),
            Problem::DuplicateId(id) => write!(f, "task id {id:?} is used more than once"),
            Problem::UnknownDep { task, dep } => {
                write!(f, "task {task:?} depends on {dep:?}, which is not a task")
            }
            Problem::SelfDep(t) => write!(f, "task {t:?} depends on itself"),
            Problem::Cycle(c) => write!(f, "dependency cycle: {}", c.join(" → ")),
            Problem::EmptyAllowlist(t) => {
                write!(f, "task {t:?} has an empty allowlist (it could change nothing)")
            }
            Problem::BadGlob { task, error } => write!(f, "task {task:?}: {error}"),
            Problem::ReachesGit { task, glob, path } => write!(
                f,
                "task {task:?}: glob {glob:?} reaches git's own files (it matches {path:?})"
            ),
            Problem::Overlap {
                a,
                glob_a,
                b,
                glob_b,
                path,
            } => write!(
                f,
                "tasks {a:?} and {b:?} may run in the same round but their allowlists overlap: \
                 {glob_a:?} and {glob_b:?} both match {path:?} (make one depend on the other, or split the files)"
            ),
            Problem::BadSetting(s) => f.write_str(s),
            Problem::BadSecret(s) => f.write_str(s),
            Problem::UnknownSecret { task, secret } => {
                write!(f, "task {task:?} wants secret {secret:?}, which the plan does not define")
            }
        }
    }
}

/// Every problem found, one per line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .0.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("\n"))]
pub struct Problems(pub Vec<Problem>);

/// A plan that passed every check, with its rounds.
#[derive(Debug, Clone)]
pub struct ValidPlan {
    pub plan: Plan,
    /// Task indices per round, each round in plan order.
    pub rounds: Vec<Vec<usize>>,
    /// Parsed allowlists, per task.
    pub allow: Vec<Vec<Glob>>,
}

fn valid_id(id: &str) -> bool {
    (1..=40).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && id.as_bytes()[0].is_ascii_alphanumeric()
}

/// What is wrong with a secret's `inject`: its hosts must be names the
/// plan's egress lets through on 443, its header a header rule.
fn inject_problems(name: &str, i: &Inject, egress: &str) -> Vec<String> {
    let mut out = Vec::new();
    if i.hosts.is_empty() {
        out.push(format!("secret {name:?}: inject.hosts is empty"));
    }
    let egress = egress.parse::<dough_net::Egress>().ok();
    for h in &i.hosts {
        match h.parse::<dough_net::NamePattern>() {
            Err(e) => out.push(format!("secret {name:?}: inject host: {e}")),
            Ok(p) => {
                if egress.as_ref().is_some_and(|e| !e.reaches(&p, 443)) {
                    out.push(format!(
                        "secret {name:?} is injected for {h}, which the plan's egress does not let agents reach on port 443 (add it to egress)"
                    ));
                }
            }
        }
    }
    if let Some(hd) = &i.header {
        if let Err(e) = hd.parse::<dough_gateway::broker::HeaderRule>() {
            out.push(format!("secret {name:?}: inject.header: {e}"));
        }
    }
    out
}

fn valid_env_name(n: &str) -> bool {
    !n.is_empty()
        && n.bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
        && !n.as_bytes()[0].is_ascii_digit()
}

impl Plan {
    pub fn parse(text: &str) -> Result<Plan, Problems> {
        toml::from_str(text).map_err(|e| Problems(vec![Problem::Parse(e.to_string())]))
    }

    pub fn load(path: &Path) -> Result<Plan, Problems> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Problems(vec![Problem::Parse(format!(
                "reading {}: {e}",
                path.display()
            ))])
        })?;
        Plan::parse(&text)
    }

    /// Validate and schedule, reporting every problem.
    pub fn check(self) -> Result<ValidPlan, Problems> {
        let mut problems = Vec::new();
        if self.tasks.is_empty() {
            problems.push(Problem::NoTasks);
        }
        if self.concurrency == 0 || self.concurrency > 64 {
            problems.push(Problem::BadSetting(format!(
                "concurrency must be 1 to 64, not {}",
                self.concurrency
            )));
        }
        if self.retries > 10 {
            problems.push(Problem::BadSetting(format!(
                "retries must be at most 10, not {}",
                self.retries
            )));
        }
        if self.agent.is_empty() {
            problems.push(Problem::BadSetting(
                "agent must be a non-empty command".into(),
            ));
        }
        if self.check.trim().is_empty() {
            problems.push(Problem::BadSetting("check must be a command".into()));
        }
        if self.setup.as_ref().is_some_and(|s| s.trim().is_empty()) {
            problems.push(Problem::BadSetting(
                "setup must be a command (or left out)".into(),
            ));
        }
        if let Err(e) = self.egress.parse::<dough_net::Egress>() {
            problems.push(Problem::BadSetting(format!("egress: {e}")));
        }
        let mut secret_names = BTreeSet::new();
        for s in &self.secrets {
            if !valid_env_name(&s.name) {
                problems.push(Problem::BadSecret(format!(
                    "secret name {:?} is not an environment variable name (A-Z, 0-9, _)",
                    s.name
                )));
            }
            if !secret_names.insert(s.name.clone()) {
                problems.push(Problem::BadSecret(format!(
                    "secret {:?} is defined twice",
                    s.name
                )));
            }
            if s.env.is_some() == s.file.is_some() {
                problems.push(Problem::BadSecret(format!(
                    "secret {:?} needs exactly one source: env or file",
                    s.name
                )));
            }
            // A plan is untrusted input: it may not name any host file.
            if let Some(f) = &s.file {
                if !inside(f) {
                    problems.push(Problem::BadSecret(format!(
                        "secret {:?}: file {:?} must be inside the plan's directory (a relative path without `..`)",
                        s.name, f
                    )));
                }
            }
            if s.prefix.is_empty() {
                problems.push(Problem::BadSecret(format!(
                    "secret {:?} has no prefix: set `prefix` to how its value starts (e.g. \"sk-ant-\"), so that a wrong value is refused before it is sent anywhere",
                    s.name
                )));
            }
            if let Some(i) = &s.inject {
                for problem in inject_problems(&s.name, i, &self.egress) {
                    problems.push(Problem::BadSecret(problem));
                }
            }
        }
        for (field, v) in [("image", &self.image), ("gate_image", &self.gate_image)] {
            if let Some(p) = v.as_deref().and_then(|v| image_problem(field, v)) {
                problems.push(Problem::BadSetting(p));
            }
        }
        if !inside(&self.repo) {
            problems.push(Problem::BadSetting(format!(
                "repo {:?} must be inside the plan's directory (a relative path without `..`); to run a plan on another repository, give it with `dough go --repo PATH`",
                self.repo
            )));
        }

        // Ids.
        let mut index: BTreeMap<&str, usize> = BTreeMap::new();
        for (i, t) in self.tasks.iter().enumerate() {
            if !valid_id(&t.id) {
                problems.push(Problem::BadId(t.id.clone()));
            }
            if index.insert(&t.id, i).is_some() {
                problems.push(Problem::DuplicateId(t.id.clone()));
            }
        }
        // Deps.
        let mut deps: Vec<Vec<usize>> = vec![Vec::new(); self.tasks.len()];
        for (i, t) in self.tasks.iter().enumerate() {
            for d in &t.deps {
                if *d == t.id {
                    problems.push(Problem::SelfDep(t.id.clone()));
                } else if let Some(&j) = index.get(d.as_str()) {
                    if !deps[i].contains(&j) {
                        deps[i].push(j);
                    }
                } else {
                    problems.push(Problem::UnknownDep {
                        task: t.id.clone(),
                        dep: d.clone(),
                    });
                }
            }
            for s in &t.secrets {
                if !secret_names.contains(s) {
                    problems.push(Problem::UnknownSecret {
                        task: t.id.clone(),
                        secret: s.clone(),
                    });
                }
            }
        }
        if let Some(cycle) = find_cycle(&deps) {
            let mut names: Vec<String> = cycle.iter().map(|&i| self.tasks[i].id.clone()).collect();
            names.push(names[0].clone());
            problems.push(Problem::Cycle(names));
        }
        // Allowlists.
        let mut allow: Vec<Vec<Glob>> = Vec::new();
        for t in &self.tasks {
            if t.allow.is_empty() {
                problems.push(Problem::EmptyAllowlist(t.id.clone()));
            }
            let mut gs = Vec::new();
            for a in &t.allow {
                match Glob::new(a) {
                    Ok(g) => {
                        if let Some(path) = reaches_git(&g) {
                            problems.push(Problem::ReachesGit {
                                task: t.id.clone(),
                                glob: a.clone(),
                                path,
                            });
                        }
                        gs.push(g);
                    }
                    Err(e) => problems.push(Problem::BadGlob {
                        task: t.id.clone(),
                        error: e.to_string(),
                    }),
                }
            }
            allow.push(gs);
        }
        if !problems.is_empty() {
            return Err(Problems(problems));
        }
        // Overlaps between tasks with no dependency path either way.
        let reach = reachability(&deps);
        for a in 0..self.tasks.len() {
            for b in a + 1..self.tasks.len() {
                if reach[a].contains(&b) || reach[b].contains(&a) {
                    continue;
                }
                'pair: for ga in &allow[a] {
                    for gb in &allow[b] {
                        if let Some(path) = ga.overlap(gb) {
                            problems.push(Problem::Overlap {
                                a: self.tasks[a].id.clone(),
                                glob_a: ga.to_string(),
                                b: self.tasks[b].id.clone(),
                                glob_b: gb.to_string(),
                                path,
                            });
                            break 'pair;
                        }
                    }
                }
            }
        }
        if !problems.is_empty() {
            return Err(Problems(problems));
        }
        let rounds = rounds(&deps);
        Ok(ValidPlan {
            plan: self,
            rounds,
            allow,
        })
    }
}

/// A cycle in the dependency graph (`deps[i]` = what `i` depends on), as
/// the task indices along it.
fn find_cycle(deps: &[Vec<usize>]) -> Option<Vec<usize>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Active,
        Done,
    }
    fn visit(
        i: usize,
        deps: &[Vec<usize>],
        mark: &mut [Mark],
        stack: &mut Vec<usize>,
    ) -> Option<Vec<usize>> {
        mark[i] = Mark::Active;
        stack.push(i);
        for &d in &deps[i] {
            match mark[d] {
                Mark::Active => {
                    let from = stack.iter().position(|&x| x == d).expect("on the stack");
                    let mut c: Vec<usize> = stack[from..].to_vec();
                    // Show it in dependency order: a needs b needs ... needs a.
                    c.rotate_left(0);
                    return Some(c);
                }
                Mark::New => {
                    if let Some(c) = visit(d, deps, mark, stack) {
                        return Some(c);
                    }
                }
                Mark::Done => {}
            }
        }
        stack.pop();
        mark[i] = Mark::Done;
        None
    }
    let mut mark = vec![Mark::New; deps.len()];
    for i in 0..deps.len() {
        if mark[i] == Mark::New {
            if let Some(c) = visit(i, deps, &mut mark, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

/// `reach[i]`: every task `i` depends on, directly or not.
fn reachability(deps: &[Vec<usize>]) -> Vec<BTreeSet<usize>> {
    let mut reach: Vec<BTreeSet<usize>> = vec![BTreeSet::new(); deps.len()];
    for (i, r) in reach.iter_mut().enumerate() {
        let mut stack = deps[i].clone();
        while let Some(d) = stack.pop() {
            if r.insert(d) {
                stack.extend(&deps[d]);
            }
        }
    }
    reach
}

/// Topological layers of an acyclic graph: a task's round is one past the
/// latest round of its dependencies; within a round, plan order.
pub fn rounds(deps: &[Vec<usize>]) -> Vec<Vec<usize>> {
    let n = deps.len();
    let mut level: Vec<Option<usize>> = vec![None; n];
    fn level_of(i: usize, deps: &[Vec<usize>], level: &mut [Option<usize>]) -> usize {
        if let Some(l) = level[i] {
            return l;
        }
        let l = deps[i]
            .iter()
            .map(|&d| level_of(d, deps, level) + 1)
            .max()
            .unwrap_or(0);
        level[i] = Some(l);
        l
    }
    let mut out: Vec<Vec<usize>> = Vec::new();
    for i in 0..n {
        let l = level_of(i, deps, &mut level);
        if out.len() <= l {
            out.resize(l + 1, Vec::new());
        }
        out[l].push(i);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
goal = "a calculator"
repo = "calc"
agent = ["sh", "{work_order}"]
check = "python3 -m unittest -q"
concurrency = 2

[[secrets]]
name = "API_KEY"
env = "CALC_API_KEY"
prefix = "sk-"

[[tasks]]
id = "lexer"
title = "Tokenizer"
work = "Write calc/lexer.py"
allow = ["calc/lexer.py", "tests/test_lexer.py"]

[[tasks]]
id = "parser"
title = "Parser"
work = "Write calc/parser.py"
allow = ["calc/parser.py", "tests/test_parser.py"]
deps = ["lexer"]
secrets = ["API_KEY"]

[[tasks]]
id = "docs"
title = "Docs"
work = "Write docs"
allow = ["docs/**"]

[[tasks]]
id = "cli"
title = "CLI"
work = "Write calc/cli.py"
allow = ["calc/cli.py", "calc/parser.py"]
deps = ["parser"]
"#;

    #[test]
    fn brokered_secrets_must_name_reachable_hosts_and_a_header() {
        let inject = |hosts: &[&str], header: Option<&str>| Inject {
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            header: header.map(String::from),
        };
        let set = |p: &mut Plan, egress: &str, i: Inject| {
            p.egress = egress.into();
            p.secrets[0].inject = Some(i);
        };
        with(|p| {
            set(
                p,
                "allow=api.example.com",
                inject(&["api.example.com"], Some("x-api-key")),
            )
        })
        .unwrap();
        assert_eq!(
            problems(|p| set(p, "allow=api.example.com", inject(&["other.example.com"], None))),
            vec!["secret \"API_KEY\" is injected for other.example.com, which the plan's egress does not let agents reach on port 443 (add it to egress)"]
        );
        assert_eq!(
            problems(|p| set(p, "nat", inject(&["api.example.com"], Some("x api")))),
            vec!["secret \"API_KEY\": inject.header: \"x api\" is not a header rule (expected a header name such as x-api-key, \"authorization: Bearer\" or \"authorization: Basic\")"]
        );
        assert_eq!(
            problems(|p| set(p, "nat", inject(&[], None))),
            vec!["secret \"API_KEY\": inject.hosts is empty"]
        );
    }

    #[test]
    fn egress_is_a_policy_or_a_list_of_rules() {
        let list = format!(
            "egress = [\"api.anthropic.com\", \"*.github.com:443\", \"10.0.0.0/8\"]\n{GOOD}"
        );
        let p = Plan::parse(&list).unwrap();
        assert_eq!(
            p.egress,
            "allow=api.anthropic.com,*.github.com:443,10.0.0.0/8"
        );
        p.check().unwrap();
        let one = format!("egress = \"none\"\n{GOOD}");
        assert_eq!(Plan::parse(&one).unwrap().egress, "none");
        assert_eq!(Plan::parse(GOOD).unwrap().egress, "nat");
    }

    fn with(edit: impl FnOnce(&mut Plan)) -> Result<ValidPlan, Problems> {
        let mut p = Plan::parse(GOOD).unwrap();
        edit(&mut p);
        p.check()
    }

    fn problems(edit: impl FnOnce(&mut Plan)) -> Vec<String> {
        with(edit)
            .unwrap_err()
            .0
            .iter()
            .map(|p| p.to_string())
            .collect()
    }

    #[test]
    fn a_good_plan_has_rounds_in_plan_order() {
        let v = with(|_| {}).unwrap();
        assert_eq!(v.rounds, vec![vec![0, 2], vec![1], vec![3]]);
        assert_eq!(v.plan.retries, 1);
        assert_eq!(v.plan.base, "HEAD");
    }

    #[test]
    fn every_kind_of_bad_plan_is_named() {
        assert_eq!(
            problems(|p| p.tasks[2].id = "lexer".into()),
            vec!["task id \"lexer\" is used more than once"]
        );
        assert_eq!(
            problems(|p| p.tasks[1].deps = vec!["lexr".into()]),
            vec!["task \"parser\" depends on \"lexr\", which is not a task"]
        );
        assert_eq!(
            problems(|p| p.tasks[0].deps = vec!["cli".into()]),
            vec!["dependency cycle: lexer → cli → parser → lexer"]
        );
        assert_eq!(
            problems(|p| p.tasks[0].deps = vec!["lexer".into()]),
            vec!["task \"lexer\" depends on itself"]
        );
        assert_eq!(
            problems(|p| p.tasks[2].allow.clear()),
            vec!["task \"docs\" has an empty allowlist (it could change nothing)"]
        );
        assert_eq!(
            problems(|p| p.tasks[2].allow = vec!["../elsewhere/*".into()]),
            vec!["task \"docs\": glob \"../elsewhere/*\" has a `..` segment (it would escape the repo)"]
        );
        assert_eq!(
            problems(|p| p.tasks[2].allow = vec!["/etc/passwd".into()]),
            vec!["task \"docs\": glob \"/etc/passwd\" is absolute (globs are relative to the repo root)"]
        );
        assert_eq!(
            problems(|p| p.tasks[2].allow = vec![".Git/hooks/*".into()]),
            vec!["task \"docs\": glob \".Git/hooks/*\" reaches git's own files (it matches \".git/hooks/x\")"]
        );
        let o = problems(|p| p.tasks[2].allow = vec!["calc/*.py".into()]);
        assert_eq!(
            o[0],
            "tasks \"lexer\" and \"docs\" may run in the same round but their allowlists overlap: \"calc/lexer.py\" and \"calc/*.py\" both match \"calc/lexer.py\" (make one depend on the other, or split the files)"
        );
        // No dependency path between docs and any of the three: all named.
        assert_eq!(o.len(), 3, "{o:?}");
        assert!(o[2].contains("\"docs\" and \"cli\"") && o[2].contains("\"calc/cli.py\""));
        assert_eq!(
            problems(|p| p.tasks[1].id = "Parser!".into()),
            vec![
                "task id \"Parser!\" is not valid (use 1-40 of [a-z0-9_-], starting with a letter or digit)",
                "task \"cli\" depends on \"parser\", which is not a task"
            ]
        );
        assert_eq!(
            problems(|p| p.tasks[1].secrets = vec!["TOKEN".into()]),
            vec!["task \"parser\" wants secret \"TOKEN\", which the plan does not define"]
        );
        assert_eq!(
            problems(|p| p.secrets[0].file = Some("k".into())),
            vec!["secret \"API_KEY\" needs exactly one source: env or file"]
        );
        // A plan may not name host files outside its directory, and every
        // secret has a prefix.
        for file in ["/etc/shadow", "../../root/.ssh/id_rsa"] {
            assert_eq!(
                problems(|p| {
                    p.secrets[0].env = None;
                    p.secrets[0].file = Some(file.into());
                }),
                vec![format!(
                    "secret \"API_KEY\": file {file:?} must be inside the plan's directory (a relative path without `..`)"
                )]
            );
        }
        assert_eq!(
            problems(|p| p.secrets[0].prefix = String::new()),
            vec!["secret \"API_KEY\" has no prefix: set `prefix` to how its value starts (e.g. \"sk-ant-\"), so that a wrong value is refused before it is sent anywhere"]
        );
        for repo in ["/root/private", "../other"] {
            assert_eq!(
                problems(|p| p.repo = repo.into()),
                vec![format!("repo {repo:?} must be inside the plan's directory (a relative path without `..`); to run a plan on another repository, give it with `dough go --repo PATH`")]
            );
        }
        assert_eq!(
            problems(|p| p.concurrency = 0),
            vec!["concurrency must be 1 to 64, not 0"]
        );
        assert_eq!(
            problems(|p| p.egress = "open".into()),
            vec!["egress: \"open\" is not an egress policy (expected none, nat or allow=RULE,... where a rule is NAME[:PORT], *.DOMAIN[:PORT] or CIDR[:PORT])"]
        );
        assert_eq!(
            problems(|p| p.egress = "allow=*.com".into()),
            vec!["egress: \"*.com\" is not an allow rule (expected a host name, *.domain or CIDR, each with an optional :PORT, e.g. api.example.com, *.github.com:443, 10.0.0.0/8:443)"]
        );
        assert_eq!(problems(|p| p.tasks.clear()), vec!["the plan has no tasks"]);
        assert_eq!(
            problems(|p| {
                p.image = Some("../agent.toml".into());
                p.gate_image = Some("latest".into());
            }),
            vec![
                "image \"../agent.toml\": a recipe must be inside the plan's directory (a relative path without `..`)",
                "gate_image \"latest\" is neither an image id nor a recipe file (*.toml)",
            ]
        );
        with(|p| {
            p.image = Some("images/claude.toml".into());
            p.gate_image = Some("09ac37cb".into());
        })
        .expect("a recipe path and an image id are fine");
        // parser and cli overlap on calc/parser.py, but cli depends on
        // parser: never the same round, so that is fine (GOOD passes).
    }

    #[test]
    fn unknown_fields_and_syntax_errors_are_refused() {
        let e = Plan::parse(&GOOD.replace("concurrency = 2", "concurency = 2")).unwrap_err();
        assert!(e.to_string().contains("unknown field `concurency`"), "{e}");
        let e = Plan::parse("goal = ").unwrap_err();
        assert!(
            matches!(e.0.as_slice(), [Problem::Parse(m)] if m.contains("TOML parse error at line 1")),
            "{e:?}"
        );
    }

    use proptest::prelude::*;

    proptest! {
        /// Random DAGs (edges only to earlier tasks): every dependency is
        /// in an earlier round, each task is in exactly one round, rounds
        /// keep plan order, and the same input gives the same rounds.
        #[test]
        fn rounds_are_layers_in_plan_order(edges in proptest::collection::vec(proptest::collection::vec(any::<prop::sample::Index>(), 0..4), 1..40)) {
            let deps: Vec<Vec<usize>> = edges
                .iter()
                .enumerate()
                .map(|(i, es)| {
                    let mut d: Vec<usize> = if i == 0 { vec![] } else { es.iter().map(|x| x.index(i)).collect() };
                    d.sort();
                    d.dedup();
                    d
                })
                .collect();
            let r = rounds(&deps);
            prop_assert_eq!(&r, &rounds(&deps));
            let mut round_of = vec![usize::MAX; deps.len()];
            for (k, round) in r.iter().enumerate() {
                prop_assert!(!round.is_empty());
                prop_assert!(round.windows(2).all(|w| w[0] < w[1]));
                for &t in round {
                    prop_assert_eq!(round_of[t], usize::MAX);
                    round_of[t] = k;
                }
            }
            for (i, ds) in deps.iter().enumerate() {
                prop_assert!(round_of[i] != usize::MAX);
                for &d in ds {
                    prop_assert!(round_of[d] < round_of[i]);
                }
                // As early as possible: round 0, or right after a dependency.
                prop_assert!(round_of[i] == 0 || ds.iter().any(|&d| round_of[d] + 1 == round_of[i]));
            }
            prop_assert!(find_cycle(&deps).is_none());
        }
    }
}
