//! `dough plan check PLAN`: validate a plan and show its rounds.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use dough_gobrr::plan::Plan;

#[derive(Debug, Subcommand)]
pub enum PlanCmd {
    /// Validate a plan (TOML, see docs/plan.md) and print its rounds. Every
    /// problem is listed, naming the tasks and paths involved; the exit
    /// status is 1 when there is any, and nothing runs.
    Check(CheckArgs),
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The plan file.
    pub plan: PathBuf,
}

pub fn run(cmd: PlanCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        PlanCmd::Check(a) => check(&a.plan),
    }
}

fn check(path: &std::path::Path) -> anyhow::Result<ExitCode> {
    let checked = Plan::load(path).and_then(Plan::check);
    match checked {
        Err(problems) => {
            for p in &problems.0 {
                eprintln!("dough: plan {}: {p}", path.display());
            }
            eprintln!(
                "dough: plan {}: {} problem(s); nothing will run",
                path.display(),
                problems.0.len()
            );
            Ok(ExitCode::from(1))
        }
        Ok(v) => {
            println!(
                "plan ok: {} task(s) in {} round(s), up to {} at once, {} retr{} each",
                v.plan.tasks.len(),
                v.rounds.len(),
                v.plan.concurrency,
                v.plan.retries,
                if v.plan.retries == 1 { "y" } else { "ies" }
            );
            for (k, round) in v.rounds.iter().enumerate() {
                println!("round {}:", k + 1);
                for &t in round {
                    let task = &v.plan.tasks[t];
                    println!(
                        "  {:<16} {}  [{}]",
                        task.id,
                        task.title,
                        task.allow.join(", ")
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
