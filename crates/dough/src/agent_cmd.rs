//! `dough agent`: one agent, one command. Ship a repository into a fresh
//! clone, run the agent there, bring its changes back through the same
//! strict checks as a plan's task (parsed as data, every path inside
//! `--allow`, no secret in it, optionally a check in an offline clone), and
//! show them — or keep them as a branch with `--commit`. A one-task plan
//! without a plan file.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use dough_gobrr::plan::Plan;

use crate::broker_args::SecretArgs;
use crate::cli::Ctx;
use crate::go_cmd::{execute, Keep};
use crate::vm_args::VmArgs;

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// The git repository to ship in (its `--base` commit; uncommitted
    /// changes are not shipped).
    #[arg(long, default_value = ".")]
    pub repo: PathBuf,
    /// The commit the agent starts from.
    #[arg(long, default_value = "HEAD")]
    pub base: String,
    /// Globs of the files the agent may change (repeatable; at least one).
    /// A change to any other path is refused whole.
    #[arg(long = "allow", required = true, value_name = "GLOB")]
    pub allow: Vec<String>,
    /// The work order: what the agent is asked to do. It is written to a
    /// file in the clone; `{work_order}` in CMD is replaced by its path,
    /// and WORK_ORDER holds it.
    #[arg(long, default_value = "")]
    pub work: String,
    /// A check the result must pass, run with `sh -c` at the repo root in
    /// a fresh clone with no network and no secrets (e.g. `make test`).
    #[arg(long, value_name = "CMD")]
    pub check: Option<String>,
    /// Extra attempts after a failed one (the failure is fed back).
    #[arg(long, default_value_t = 0)]
    pub retries: u32,
    /// Seconds the agent may run.
    #[arg(long, default_value_t = 1800)]
    pub agent_timeout: u64,
    /// Keep the result as branch `dough/<run-id>` of the repository
    /// (otherwise the changes are only shown, and the branch removed).
    #[arg(long)]
    pub commit: bool,
    /// Name of this run (default: the UTC time and a random suffix).
    #[arg(long)]
    pub run_id: Option<String>,
    #[command(flatten)]
    pub secrets: SecretArgs,
    #[command(flatten)]
    pub vm: VmArgs,
    /// The agent and its arguments.
    ///
    /// Example: dough agent --allow 'src/**' --work 'Fix the failing test' -- claude -p @{work_order}
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<String>,
}

pub fn run(ctx: &Ctx, args: AgentArgs) -> anyhow::Result<ExitCode> {
    let repo = std::fs::canonicalize(&args.repo)
        .with_context(|| format!("--repo {} does not exist", args.repo.display()))?;
    // The secrets, read here; the plan names them (and what is brokered)
    // so that the task's clone gets them exactly as a plan's would.
    let resolved = args.secrets.values()?;
    let injects = args.secrets.injects()?;
    let mut secrets = Vec::new();
    let mut names = Vec::new();
    for (name, value) in &resolved {
        let prefix = match crate::broker_args::visible_prefix(value) {
            "" => value.chars().take(3).collect::<String>(),
            p => p.to_string(),
        };
        let inject = injects.iter().find(|i| &i.name == name).map(|i| {
            serde_json::json!({
                "hosts": i.hosts.iter().map(|h| h.to_string()).collect::<Vec<_>>(),
                "header": i.header.to_string(),
            })
        });
        let mut s = serde_json::json!({"name": name, "env": name, "prefix": prefix});
        if let Some(i) = inject {
            s["inject"] = i;
        }
        secrets.push(s);
        names.push(name.clone());
    }
    let plan = serde_json::json!({
        "goal": if args.work.is_empty() { "dough agent" } else { args.work.as_str() },
        "repo": ".",
        "base": args.base,
        "agent": args.command,
        "check": args.check.clone().unwrap_or_else(|| "true".into()),
        "retries": args.retries,
        "concurrency": 1,
        "egress": args.vm.net.to_string(),
        "agent_timeout_secs": args.agent_timeout,
        "secrets": secrets,
        "tasks": [{
            "id": "agent",
            "title": "dough agent",
            "work": args.work,
            "allow": args.allow,
            "secrets": names,
        }],
    });
    let plan: Plan = serde_json::from_value(plan).context("building the one-task plan")?;
    let plan = match plan.check() {
        Ok(p) => p,
        Err(problems) => {
            for p in &problems.0 {
                eprintln!("dough: {p}");
            }
            return Ok(ExitCode::from(2));
        }
    };
    let values = resolved
        .into_iter()
        .map(|(name, value)| dough_gobrr::secrets::Value { name, value })
        .collect();
    let run_id = args
        .run_id
        .clone()
        .unwrap_or_else(crate::go_cmd::new_run_id);
    let keep = if args.commit {
        Keep::BranchAndDiff
    } else {
        Keep::Diff
    };
    let done = execute(
        ctx,
        &plan,
        values,
        &repo,
        &run_id,
        &args.vm,
        keep,
        &crate::go_cmd::Hooks::default(),
    )?;
    let green = done.green() == 1;
    let diff = done.diff.clone().unwrap_or_default();
    if green {
        // The changes, as data: the terminal gets printable text only.
        let text = String::from_utf8_lossy(&diff);
        std::io::stdout()
            .lock()
            .write_all(dough_fabric::serial::printable(&text).as_bytes())?;
        if diff.is_empty() {
            eprintln!("dough: the agent changed nothing");
        }
        if args.commit {
            eprintln!("dough: kept as branch dough/{run_id}");
        } else {
            eprintln!("dough: not kept (--commit keeps the result as a branch)");
        }
    } else {
        eprintln!(
            "dough: the agent's result was not accepted; see {}",
            done.report.display()
        );
    }
    Ok(done.exit_code())
}
