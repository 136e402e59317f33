//! What a run produces: per-task results with every attempt, the round
//! checks, progress events. Everything here is already redacted.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::plan::Task;

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
    /// The agent clone's egress (its gateway's log: allowed and denied
    /// names, connections, brokered requests), redacted, at most
    /// [`EGRESS_LINES`] lines.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub egress: Vec<String>,
}

/// Most egress lines kept per attempt (denied ones first).
pub const EGRESS_LINES: usize = 100;

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
    /// Each round's warm workspace (plans with a `setup`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub workspaces: Vec<WorkspaceReport>,
    /// Why the run stopped early, if it did (what finished before is kept).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A round's warm workspace: made once, forked by the round's tasks.
#[derive(Debug, Clone, Serialize)]
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
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
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
