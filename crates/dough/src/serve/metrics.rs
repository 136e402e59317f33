//! The daemon's counters and histograms, written as Prometheus text
//! (`GET /metrics`). Few and fixed, so plain atomics.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A histogram with fixed buckets (seconds).
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    /// Sum in microseconds.
    sum_us: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_us: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            if s <= *b {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.sum_us
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn write(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{b}\"}} {}",
                c.load(Ordering::Relaxed)
            );
        }
        let n = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {n}");
        let _ = writeln!(
            out,
            "{name}_sum {}",
            self.sum_us.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count {n}");
    }
}

const RESTORE_BUCKETS: &[f64] = &[0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0];
const EXEC_BUCKETS: &[f64] = &[0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0, 120.0, 600.0];

/// How an exec ended, for `dough_execs_total{result=...}`.
pub const EXEC_RESULTS: [&str; 5] = ["exited", "signaled", "timed_out", "spawn_failed", "error"];

/// Everything `/metrics` reports besides what it reads live.
#[derive(Debug)]
pub struct Metrics {
    pub restore: Histogram,
    pub exec: Histogram,
    execs: [AtomicU64; 5],
    pub bytes_up: AtomicU64,
    pub bytes_down: AtomicU64,
    pub bakes: AtomicU64,
    pub sandboxes_created: AtomicU64,
    pub sandboxes_expired: AtomicU64,
    pub requests_refused_auth: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics {
            restore: Histogram::new(RESTORE_BUCKETS),
            exec: Histogram::new(EXEC_BUCKETS),
            execs: Default::default(),
            bytes_up: AtomicU64::new(0),
            bytes_down: AtomicU64::new(0),
            bakes: AtomicU64::new(0),
            sandboxes_created: AtomicU64::new(0),
            sandboxes_expired: AtomicU64::new(0),
            requests_refused_auth: AtomicU64::new(0),
        }
    }
}

impl Metrics {
    /// Count an exec that ended with `result` (one of [`EXEC_RESULTS`]).
    pub fn exec_done(&self, result: &str, took: Duration) {
        if let Some(i) = EXEC_RESULTS.iter().position(|r| *r == result) {
            self.execs[i].fetch_add(1, Ordering::Relaxed);
        }
        self.exec.observe(took);
    }

    /// Prometheus text; `live` is (VM state, count) of the daemon's live
    /// sandboxes; `counts` the store's (group, label, count) of runs by
    /// state, tasks by outcome, attempts by result.
    pub fn render(&self, live: &[(String, u64)], counts: &[(&str, String, u64)]) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "# HELP dough_sandboxes Live sandboxes by their VM's state.\n# TYPE dough_sandboxes gauge"
        );
        for (state, n) in live {
            let _ = writeln!(o, "dough_sandboxes{{state=\"{state}\"}} {n}");
        }
        self.restore.write(
            &mut o,
            "dough_restore_seconds",
            "Time to restore a sandbox from its snapshot until its agent answered.",
        );
        let _ = writeln!(
            o,
            "# HELP dough_execs_total Commands run, by how they ended.\n# TYPE dough_execs_total counter"
        );
        for (r, c) in EXEC_RESULTS.iter().zip(&self.execs) {
            let _ = writeln!(
                o,
                "dough_execs_total{{result=\"{r}\"}} {}",
                c.load(Ordering::Relaxed)
            );
        }
        self.exec.write(
            &mut o,
            "dough_exec_seconds",
            "Time commands took, start to exit.",
        );
        let counter = |o: &mut String, name: &str, help: &str, labels: &str, v: &AtomicU64| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter");
            let _ = writeln!(o, "{name}{labels} {}", v.load(Ordering::Relaxed));
        };
        let _ = writeln!(
            o,
            "# HELP dough_bytes_shipped_total File bytes moved into and out of sandboxes.\n\
             # TYPE dough_bytes_shipped_total counter\n\
             dough_bytes_shipped_total{{direction=\"up\"}} {}\n\
             dough_bytes_shipped_total{{direction=\"down\"}} {}",
            self.bytes_up.load(Ordering::Relaxed),
            self.bytes_down.load(Ordering::Relaxed)
        );
        for (group, name, label, help) in [
            ("runs", "dough_runs", "state", "Runs by state (running, green, finished, failed, cancelled)."),
            ("tasks", "dough_tasks", "outcome", "Tasks of runs by outcome (pending: green, not yet stacked)."),
            (
                "attempts",
                "dough_attempts",
                "result",
                "Task attempts by result: green passed its gate; failed did not (its gate, its diff, or its clone).",
            ),
        ] {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} gauge");
            for (g, l, n) in counts {
                if *g == group {
                    let _ = writeln!(o, "{name}{{{label}=\"{l}\"}} {n}");
                }
            }
        }
        counter(
            &mut o,
            "dough_bakes_total",
            "Warm snapshots baked because a sandbox needed one.",
            "",
            &self.bakes,
        );
        counter(
            &mut o,
            "dough_sandboxes_created_total",
            "Sandboxes created.",
            "",
            &self.sandboxes_created,
        );
        counter(
            &mut o,
            "dough_sandboxes_expired_total",
            "Sandboxes destroyed because their TTL ran out.",
            "",
            &self.sandboxes_expired,
        );
        counter(
            &mut o,
            "dough_requests_unauthorized_total",
            "Requests refused for a missing or wrong token.",
            "",
            &self.requests_refused_auth,
        );
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let m = Metrics::default();
        m.restore.observe(Duration::from_millis(200));
        m.restore.observe(Duration::from_secs(3));
        m.exec_done("exited", Duration::from_millis(10));
        m.exec_done("timed_out", Duration::from_secs(700));
        let t = m.render(&[("ready".into(), 2)], &[("runs", "green".into(), 3)]);
        for line in [
            "dough_sandboxes{state=\"ready\"} 2",
            "dough_runs{state=\"green\"} 3",
            "dough_restore_seconds_bucket{le=\"0.1\"} 0",
            "dough_restore_seconds_bucket{le=\"0.25\"} 1",
            "dough_restore_seconds_bucket{le=\"5\"} 2",
            "dough_restore_seconds_bucket{le=\"+Inf\"} 2",
            "dough_restore_seconds_sum 3.2",
            "dough_restore_seconds_count 2",
            "dough_execs_total{result=\"exited\"} 1",
            "dough_execs_total{result=\"timed_out\"} 1",
            "dough_exec_seconds_bucket{le=\"600\"} 1",
            "dough_exec_seconds_bucket{le=\"+Inf\"} 2",
        ] {
            assert!(t.lines().any(|l| l == line), "{line} missing in\n{t}");
        }
    }
}
