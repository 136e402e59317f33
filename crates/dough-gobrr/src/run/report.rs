//! What a run produces: per-task results with every attempt, the round
//! checks, progress events. Everything here is already redacted.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::plan::Task;

/// One attempt at a task.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Attempt {
    pub n: u32,
    pub green: bool,
    /// Why it failed, redacted.
    pub failure: Option<String>,
    /// Seconds per phase: restore, ship, agent, diff, gate.
    pub phases: BTreeMap<String, f64>,
    pub files: usize,
    pub added: u64,
    pub removed: u64,
    /// Tail of the gate's output, redacted.
    pub gate_log: String,
    /// The agent clone's egress (its gateway's log: allowed and denied
    /// names, connections, brokered requests), redacted, at most
    /// [`EGRESS_LINES`] lines.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress: Vec<String>,
}

/// Most egress lines kept per attempt (denied ones first).
pub const EGRESS_LINES: usize = 100;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Green,
    Failed,
    /// Not run: a dependency did not go green.
    Blocked,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
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

#[derive(Debug, Clone, Serialize, Deserialize)]
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
    /// Each round's warm workspace (plans with a `setup`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub workspaces: Vec<WorkspaceReport>,
    /// Why the run stopped early, if it did (what finished before is kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A round's warm workspace: made once, forked by the round's tasks.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkspaceReport {
    pub round: usize,
    /// Shipping the tree, the setup, committing what it made (what every
    /// task's clone would otherwise do itself), seconds.
    pub setup_secs: f64,
    /// Saving the prepared clone, seconds.
    pub save_secs: f64,
    /// Tasks that started from it.
    pub tasks: usize,
    /// Why it could not be made (its tasks then failed), redacted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoundCheck {
    pub round: usize,
    pub passed: bool,
    /// Tail of its output, redacted.
    pub log: String,
}

/// Progress events (also the JSON-lines log), already redacted.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Event {
    pub t: f64,
    pub task: String,
    pub attempt: u32,
    pub what: String,
}

impl TaskResult {
    /// A task that did not run because of `blocked_by`.
    pub fn blocked(task: &Task, round: usize, blocked_by: Vec<String>) -> TaskResult {
        TaskResult {
            id: task.id.clone(),
            title: task.title.clone(),
            round,
            outcome: Outcome::Blocked,
            attempts: vec![],
            commit: None,
            changed: vec![],
            signatures: String::new(),
            blocked_by,
            seconds: 0.0,
        }
    }
}

/// How far a run got, kept by whoever runs it so that a run interrupted
/// (its process killed) can go on where it stopped
/// ([`crate::run::Runner::resume`]): finished rounds are not run again,
/// nor is any task of the current round that finished. A green task is
/// committed exactly once: on resuming, its commit is looked for on the
/// branch before it is stacked.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Progress {
    /// The branch's base commit (its head when the run first started).
    pub base: Option<String>,
    /// Rounds stacked and checked.
    pub rounds_done: usize,
    /// Tasks done for good: stacked (with their commit), failed, blocked.
    pub tasks: BTreeMap<String, TaskResult>,
    /// Tasks that went green and wait for their round to stack them.
    pub pending: BTreeMap<String, Pending>,
    pub round_checks: Vec<RoundCheck>,
    pub workspaces: Vec<WorkspaceReport>,
    /// Seconds the run took before it was last interrupted.
    #[serde(default)]
    pub seconds_before: f64,
}

/// A green task's result and the diff to stack.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Pending {
    pub result: TaskResult,
    /// The diff, hex (it is bytes).
    pub diff_hex: String,
}
