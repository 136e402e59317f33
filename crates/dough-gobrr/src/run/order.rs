//! Work orders: what an agent is told — its task, what its dependencies
//! built (redacted), and why earlier attempts failed.

use std::collections::BTreeMap;

use super::{Outcome, Runner, TaskResult};

impl Runner<'_> {
    /// What each green task so far exported: changed files and signatures.
    pub(super) fn dependency_context(
        &self,
        results: &[Option<TaskResult>],
    ) -> BTreeMap<String, String> {
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

    pub(super) fn work_order(
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
}
