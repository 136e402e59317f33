//! What `dough serve` remembers across restarts, behind a narrow
//! interface ([`Store`]) so that another database can stand behind it
//! later; [`SqliteStore`] is the one file under `$DOUGH_HOME`.

use std::path::Path;
use std::sync::Mutex;

pub use dough_client::types::{RunState, SandboxState};

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunEnding {
    pub state: RunState,
    pub at: i64,
    pub result: Option<String>,
    pub report: Option<String>,
    pub error: Option<String>,
}

fn run_state_str(s: RunState) -> &'static str {
    match s {
        RunState::Running => "running",
        RunState::Green => "green",
        RunState::Finished => "finished",
        RunState::Failed => "failed",
        RunState::Cancelled => "cancelled",
    }
}

fn parse_run_state(s: &str) -> RunState {
    match s {
        "running" => RunState::Running,
        "green" => RunState::Green,
        "finished" => RunState::Finished,
        "cancelled" => RunState::Cancelled,
        _ => RunState::Failed,
    }
}

const RUN_COLUMNS: &str = "id, state, plan, repo, progress, result, report, error, resumed, \
                           plan_sha256, cancel_requested, created_at, ended_at";

fn row_to_run(r: &rusqlite::Row<'_>) -> rusqlite::Result<RunRow> {
    Ok(RunRow {
        id: r.get(0)?,
        state: parse_run_state(&r.get::<_, String>(1)?),
        plan: r.get(2)?,
        repo: r.get(3)?,
        progress: r.get(4)?,
        result: r.get(5)?,
        report: r.get(6)?,
        error: r.get(7)?,
        resumed: r.get(8)?,
        plan_sha256: r.get(9)?,
        cancel_requested: r.get(10)?,
        created_at: r.get(11)?,
        ended_at: r.get(12)?,
    })
}
use rusqlite::{params, Connection, OptionalExtension};

/// What can go wrong keeping state.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the daemon's database failed")]
    Sqlite(#[from] rusqlite::Error),
    #[error(
        "the daemon's database is at schema version {found}, newer than this dough knows \
         ({known}); use a newer dough or move the database away"
    )]
    TooNew { found: i64, known: i64 },
}

fn state_str(s: SandboxState) -> &'static str {
    match s {
        SandboxState::Live => "live",
        SandboxState::Deleted => "deleted",
        SandboxState::Dead => "dead",
    }
}

fn parse_state(s: &str) -> SandboxState {
    match s {
        "live" => SandboxState::Live,
        "deleted" => SandboxState::Deleted,
        _ => SandboxState::Dead,
    }
}

/// One sandbox's row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxRow {
    pub id: String,
    pub state: SandboxState,
    /// The snapshot it was restored from.
    pub snapshot: String,
    pub image: String,
    /// Its egress policy, as `--net` spells it.
    pub net: String,
    pub memory_mib: u32,
    pub vcpus: u32,
    /// Unix seconds.
    pub created_at: i64,
    /// When it is destroyed (unix seconds), if it has a TTL.
    pub expires_at: Option<i64>,
    pub ended_at: Option<i64>,
    /// Why it ended, in words.
    pub ended_why: Option<String>,
}

/// One run's row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunRow {
    pub id: String,
    pub state: RunState,
    pub plan: String,
    pub repo: Option<String>,
    /// Its last progress (JSON), to resume it.
    pub progress: Option<String>,
    /// Its result (JSON, redacted), once ended.
    pub result: Option<String>,
    /// Its report (markdown), once ended.
    pub report: Option<String>,
    pub error: Option<String>,
    pub resumed: u32,
    /// sha256 of the plan file when the run started.
    pub plan_sha256: Option<String>,
    /// Cancel was asked for (kept across a restart).
    pub cancel_requested: bool,
    pub created_at: i64,
    pub ended_at: Option<i64>,
}

/// A task as a run's progress has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskRow {
    pub id: String,
    pub outcome: String,
    pub commit: Option<String>,
    /// (n, green, failure) of each attempt.
    pub attempts: Vec<(u32, bool, Option<String>)>,
    /// The task's result (JSON).
    pub result: String,
}

/// Which part of a list to return. Lists are newest first; a page is the
/// rows after the row `before` (by its id: keyset paging, so rows added
/// meanwhile shift nothing), at most `limit` of them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Page {
    pub before: Option<String>,
    pub limit: Option<u32>,
}

impl Page {
    /// Every row.
    pub fn all() -> Page {
        Page::default()
    }
}

/// The daemon's state. Every method is one transaction.
pub trait Store: Send + Sync {
    /// Record a new run; false if one with its id exists.
    fn insert_run(&self, row: &RunRow) -> Result<bool, StoreError>;
    /// Remember that cancelling run `id` was asked for.
    fn request_cancel(&self, id: &str) -> Result<(), StoreError>;
    fn run(&self, id: &str) -> Result<Option<RunRow>, StoreError>;
    /// Runs, newest first (a page of them; `Ok(None)`: `page.before`
    /// names no run).
    fn runs(&self, page: &Page) -> Result<Option<Vec<RunRow>>, StoreError>;
    /// Keep a run's progress and its tasks (replacing the ones before).
    fn save_progress(&self, id: &str, progress: &str, tasks: &[TaskRow]) -> Result<(), StoreError>;
    fn tasks(&self, run_id: &str) -> Result<Vec<TaskRow>, StoreError>;
    /// End a running run (false: it was not running).
    fn end_run(&self, id: &str, end: &RunEnding) -> Result<bool, StoreError>;
    /// Count one more resumption of a run.
    fn resumed(&self, id: &str) -> Result<(), StoreError>;
    /// Append to a run's event log; returns the event's sequence number.
    fn run_event(&self, id: &str, body: &str) -> Result<i64, StoreError>;
    /// A run's events after `after`, at most `limit`.
    fn run_events(
        &self,
        id: &str,
        after: i64,
        limit: u32,
    ) -> Result<Vec<(i64, String)>, StoreError>;
    /// Counts for the metrics: runs by state, tasks by outcome, attempts
    /// by result (`green`/`failed`), as (group, label, count).
    fn counts(&self) -> Result<Vec<(&'static str, String, u64)>, StoreError>;
    fn put_sandbox(&self, row: &SandboxRow) -> Result<(), StoreError>;
    fn sandbox(&self, id: &str) -> Result<Option<SandboxRow>, StoreError>;
    /// Sandboxes, newest first; live ones only with `live_only` (a page of
    /// them; `Ok(None)`: `page.before` names no sandbox).
    fn sandboxes(
        &self,
        live_only: bool,
        page: &Page,
    ) -> Result<Option<Vec<SandboxRow>>, StoreError>;
    /// Mark a live sandbox ended (`Deleted` or `Dead`), saying why. Returns
    /// false when it was not live.
    fn end_sandbox(
        &self,
        id: &str,
        state: SandboxState,
        at: i64,
        why: &str,
    ) -> Result<bool, StoreError>;
    /// Append an event (what happened, to what, JSON details).
    fn event(&self, at: i64, kind: &str, subject: &str, body: &str) -> Result<(), StoreError>;
}

/// A page of `table` (which has `id` and `created_at`), newest first (ties
/// by id), filtered by `filter` (an SQL condition or ""); `None` when
/// `page.before` is not a row of it.
fn paged<T>(
    c: &rusqlite::Connection,
    table: &str,
    columns: &str,
    filter: &str,
    page: &Page,
    row: fn(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
) -> rusqlite::Result<Option<Vec<T>>> {
    let mut conds: Vec<&str> = Vec::new();
    if !filter.is_empty() {
        conds.push(filter);
    }
    let after_cursor = format!(
        "(created_at < (SELECT created_at FROM {table} WHERE id = ?1) \
         OR (created_at = (SELECT created_at FROM {table} WHERE id = ?1) AND id > ?1))"
    );
    if let Some(before) = &page.before {
        let known: Option<i64> = c
            .query_row(
                &format!("SELECT 1 FROM {table} WHERE id = ?1"),
                [before],
                |r| r.get(0),
            )
            .optional()?;
        if known.is_none() {
            return Ok(None);
        }
        conds.push(&after_cursor);
    }
    let filter = if conds.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", conds.join(" AND "))
    };
    // SQLite: a negative LIMIT is no limit.
    let limit = page.limit.map_or(-1, i64::from);
    let mut st = c.prepare(&format!(
        "SELECT {columns} FROM {table} {filter} ORDER BY created_at DESC, id LIMIT ?2"
    ))?;
    let before = page.before.as_deref().unwrap_or("");
    let rows = st.query_map(params![before, limit], row)?;
    rows.collect::<rusqlite::Result<Vec<T>>>().map(Some)
}

/// Schema migrations, in order: the database's `user_version` says how
/// many have run. Never edit one that shipped; add another.
const MIGRATIONS: &[&str] = &[
    // 1: sandboxes and an event log.
    "CREATE TABLE sandboxes (
        id TEXT PRIMARY KEY,
        state TEXT NOT NULL,
        snapshot TEXT NOT NULL,
        image TEXT NOT NULL,
        net TEXT NOT NULL,
        memory_mib INTEGER NOT NULL,
        vcpus INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        expires_at INTEGER,
        ended_at INTEGER,
        ended_why TEXT
    );
    CREATE INDEX sandboxes_live ON sandboxes(state) WHERE state = 'live';
    CREATE TABLE events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        at INTEGER NOT NULL,
        kind TEXT NOT NULL,
        subject TEXT NOT NULL,
        body TEXT NOT NULL
    );",
    // 2: runs of plans, their tasks and attempts, and their event logs.
    "CREATE TABLE runs (
        id TEXT PRIMARY KEY,
        state TEXT NOT NULL,
        plan TEXT NOT NULL,
        repo TEXT,
        progress TEXT,
        result TEXT,
        report TEXT,
        error TEXT,
        resumed INTEGER NOT NULL DEFAULT 0,
        plan_sha256 TEXT,
        cancel_requested INTEGER NOT NULL DEFAULT 0,
        created_at INTEGER NOT NULL,
        ended_at INTEGER
    );
    CREATE TABLE tasks (
        run_id TEXT NOT NULL REFERENCES runs(id),
        id TEXT NOT NULL,
        outcome TEXT NOT NULL,
        commit_sha TEXT,
        result TEXT NOT NULL,
        PRIMARY KEY (run_id, id)
    );
    CREATE TABLE attempts (
        run_id TEXT NOT NULL,
        task_id TEXT NOT NULL,
        n INTEGER NOT NULL,
        green INTEGER NOT NULL,
        failure TEXT,
        PRIMARY KEY (run_id, task_id, n)
    );
    CREATE TABLE run_events (
        run_id TEXT NOT NULL REFERENCES runs(id),
        seq INTEGER NOT NULL,
        body TEXT NOT NULL,
        PRIMARY KEY (run_id, seq)
    );",
];

/// [`Store`] in one SQLite file.
#[derive(Debug)]
pub struct SqliteStore {
    conn: Mutex<Connection>,
}

impl SqliteStore {
    /// Open (creating) the database at `path` and bring its schema up to
    /// date.
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        let conn = Connection::open(path)?;
        Self::init(conn)
    }

    /// A database in memory (tests).
    #[cfg(test)]
    pub fn in_memory() -> Result<SqliteStore, StoreError> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(mut conn: Connection) -> Result<SqliteStore, StoreError> {
        // WAL: readers never wait for the writer; NORMAL sync is durable
        // across a crash of this process (the case that matters here).
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        migrate(&mut conn)?;
        Ok(SqliteStore {
            conn: Mutex::new(conn),
        })
    }

    fn with<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T, StoreError> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        Ok(f(&conn)?)
    }
}

/// Run the migrations the database has not seen, each in a transaction.
fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let have: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let known = MIGRATIONS.len() as i64;
    if have > known {
        return Err(StoreError::TooNew { found: have, known });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(have as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
    }
    Ok(())
}

fn row_to_sandbox(r: &rusqlite::Row<'_>) -> rusqlite::Result<SandboxRow> {
    Ok(SandboxRow {
        id: r.get(0)?,
        state: parse_state(&r.get::<_, String>(1)?),
        snapshot: r.get(2)?,
        image: r.get(3)?,
        net: r.get(4)?,
        memory_mib: r.get(5)?,
        vcpus: r.get(6)?,
        created_at: r.get(7)?,
        expires_at: r.get(8)?,
        ended_at: r.get(9)?,
        ended_why: r.get(10)?,
    })
}

const SANDBOX_COLUMNS: &str = "id, state, snapshot, image, net, memory_mib, vcpus, created_at, \
                               expires_at, ended_at, ended_why";

impl Store for SqliteStore {
    fn request_cancel(&self, id: &str) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute("UPDATE runs SET cancel_requested = 1 WHERE id = ?1", [id])
                .map(drop)
        })
    }

    fn insert_run(&self, s: &RunRow) -> Result<bool, StoreError> {
        self.with(|c| {
            c.execute(
                &format!(
                    "INSERT OR IGNORE INTO runs ({RUN_COLUMNS}) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)"
                ),
                params![
                    s.id,
                    run_state_str(s.state),
                    s.plan,
                    s.repo,
                    s.progress,
                    s.result,
                    s.report,
                    s.error,
                    s.resumed,
                    s.plan_sha256,
                    s.cancel_requested,
                    s.created_at,
                    s.ended_at
                ],
            )
            .map(|n| n == 1)
        })
    }

    fn run(&self, id: &str) -> Result<Option<RunRow>, StoreError> {
        self.with(|c| {
            c.query_row(
                &format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = ?1"),
                [id],
                row_to_run,
            )
            .optional()
        })
    }

    fn runs(&self, page: &Page) -> Result<Option<Vec<RunRow>>, StoreError> {
        self.with(|c| paged(c, "runs", RUN_COLUMNS, "", page, row_to_run))
    }

    fn save_progress(&self, id: &str, progress: &str, tasks: &[TaskRow]) -> Result<(), StoreError> {
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let tx = conn.transaction()?;
        tx.execute(
            "UPDATE runs SET progress = ?2 WHERE id = ?1",
            params![id, progress],
        )?;
        tx.execute("DELETE FROM tasks WHERE run_id = ?1", [id])?;
        tx.execute("DELETE FROM attempts WHERE run_id = ?1", [id])?;
        for t in tasks {
            tx.execute(
                "INSERT INTO tasks (run_id, id, outcome, commit_sha, result) \
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![id, t.id, t.outcome, t.commit, t.result],
            )?;
            for (n, green, failure) in &t.attempts {
                tx.execute(
                    "INSERT INTO attempts (run_id, task_id, n, green, failure) \
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![id, t.id, n, green, failure],
                )?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn tasks(&self, run_id: &str) -> Result<Vec<TaskRow>, StoreError> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT id, outcome, commit_sha, result FROM tasks WHERE run_id = ?1 ORDER BY id",
            )?;
            let rows = st.query_map([run_id], |r| {
                Ok(TaskRow {
                    id: r.get(0)?,
                    outcome: r.get(1)?,
                    commit: r.get(2)?,
                    attempts: Vec::new(),
                    result: r.get(3)?,
                })
            })?;
            let mut tasks: Vec<TaskRow> = rows.collect::<rusqlite::Result<_>>()?;
            let mut st = c.prepare(
                "SELECT task_id, n, green, failure FROM attempts WHERE run_id = ?1 \
                 ORDER BY task_id, n",
            )?;
            let rows = st.query_map([run_id], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, u32>(1)?,
                    r.get::<_, bool>(2)?,
                    r.get::<_, Option<String>>(3)?,
                ))
            })?;
            for a in rows {
                let (task, n, green, failure) = a?;
                if let Some(t) = tasks.iter_mut().find(|t| t.id == task) {
                    t.attempts.push((n, green, failure));
                }
            }
            Ok(tasks)
        })
    }

    fn end_run(&self, id: &str, e: &RunEnding) -> Result<bool, StoreError> {
        self.with(|c| {
            c.execute(
                "UPDATE runs SET state = ?2, ended_at = ?3, result = ?4, report = ?5, error = ?6 \
                 WHERE id = ?1 AND state = 'running'",
                params![
                    id,
                    run_state_str(e.state),
                    e.at,
                    e.result,
                    e.report,
                    e.error
                ],
            )
            .map(|n| n == 1)
        })
    }

    fn resumed(&self, id: &str) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute("UPDATE runs SET resumed = resumed + 1 WHERE id = ?1", [id])
                .map(drop)
        })
    }

    fn run_event(&self, id: &str, body: &str) -> Result<i64, StoreError> {
        self.with(|c| {
            let seq: i64 = c.query_row(
                "SELECT COALESCE(MAX(seq), 0) + 1 FROM run_events WHERE run_id = ?1",
                [id],
                |r| r.get(0),
            )?;
            c.execute(
                "INSERT INTO run_events (run_id, seq, body) VALUES (?1, ?2, ?3)",
                params![id, seq, body],
            )?;
            Ok(seq)
        })
    }

    fn counts(&self) -> Result<Vec<(&'static str, String, u64)>, StoreError> {
        self.with(|c| {
            let mut out = Vec::new();
            for (group, sql) in [
                ("runs", "SELECT state, COUNT(*) FROM runs GROUP BY state"),
                (
                    "tasks",
                    "SELECT outcome, COUNT(*) FROM tasks GROUP BY outcome",
                ),
                (
                    "attempts",
                    "SELECT CASE green WHEN 1 THEN 'green' ELSE 'failed' END, COUNT(*) \
                     FROM attempts GROUP BY green",
                ),
            ] {
                let mut st = c.prepare(sql)?;
                let rows =
                    st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, u64>(1)?)))?;
                for r in rows {
                    let (label, n) = r?;
                    out.push((group, label, n));
                }
            }
            Ok(out)
        })
    }

    fn run_events(
        &self,
        id: &str,
        after: i64,
        limit: u32,
    ) -> Result<Vec<(i64, String)>, StoreError> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT seq, body FROM run_events WHERE run_id = ?1 AND seq > ?2 \
                 ORDER BY seq LIMIT ?3",
            )?;
            let rows = st.query_map(params![id, after, limit], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect()
        })
    }

    fn put_sandbox(&self, s: &SandboxRow) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                &format!(
                    "INSERT OR REPLACE INTO sandboxes ({SANDBOX_COLUMNS}) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)"
                ),
                params![
                    s.id,
                    state_str(s.state),
                    s.snapshot,
                    s.image,
                    s.net,
                    s.memory_mib,
                    s.vcpus,
                    s.created_at,
                    s.expires_at,
                    s.ended_at,
                    s.ended_why
                ],
            )
            .map(drop)
        })
    }

    fn sandbox(&self, id: &str) -> Result<Option<SandboxRow>, StoreError> {
        self.with(|c| {
            c.query_row(
                &format!("SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE id = ?1"),
                [id],
                row_to_sandbox,
            )
            .optional()
        })
    }

    fn sandboxes(
        &self,
        live_only: bool,
        page: &Page,
    ) -> Result<Option<Vec<SandboxRow>>, StoreError> {
        let filter = if live_only { "state = 'live'" } else { "" };
        self.with(|c| {
            paged(
                c,
                "sandboxes",
                SANDBOX_COLUMNS,
                filter,
                page,
                row_to_sandbox,
            )
        })
    }

    fn end_sandbox(
        &self,
        id: &str,
        state: SandboxState,
        at: i64,
        why: &str,
    ) -> Result<bool, StoreError> {
        self.with(|c| {
            c.execute(
                "UPDATE sandboxes SET state = ?2, ended_at = ?3, ended_why = ?4 \
                 WHERE id = ?1 AND state = 'live'",
                params![id, state_str(state), at, why],
            )
            .map(|n| n == 1)
        })
    }

    fn event(&self, at: i64, kind: &str, subject: &str, body: &str) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "INSERT INTO events (at, kind, subject, body) VALUES (?1, ?2, ?3, ?4)",
                params![at, kind, subject, body],
            )
            .map(drop)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str, created: i64) -> SandboxRow {
        SandboxRow {
            id: id.into(),
            state: SandboxState::Live,
            snapshot: "snap".into(),
            image: "img".into(),
            net: "none".into(),
            memory_mib: 256,
            vcpus: 1,
            created_at: created,
            expires_at: Some(created + 60),
            ended_at: None,
            ended_why: None,
        }
    }

    /// Pages walk the list newest first, ties by id, without gaps or
    /// repeats, whatever the page size; a row added meanwhile (newer than
    /// the cursor) shifts nothing; an unknown cursor is said.
    #[test]
    fn pages_walk_the_list_once() {
        let s = SqliteStore::in_memory().unwrap();
        // Created at 1, 2, 2, 2, 3, ..., with ties.
        let ids: Vec<String> = (0..9).map(|i| format!("vm-{i}")).collect();
        for (i, id) in ids.iter().enumerate() {
            s.put_sandbox(&row(id, (i as i64 + 2) / 3)).unwrap();
        }
        for limit in 1..=10 {
            let all: Vec<String> = s
                .sandboxes(false, &Page::all())
                .unwrap()
                .unwrap()
                .into_iter()
                .map(|r| r.id)
                .collect();
            assert_eq!(all.len(), if limit <= 3 { 9 } else { 10 });
            let mut seen = Vec::new();
            let mut before = None;
            loop {
                let page = s
                    .sandboxes(
                        false,
                        &Page {
                            before: before.clone(),
                            limit: Some(limit),
                        },
                    )
                    .unwrap()
                    .unwrap();
                assert!(page.len() <= limit as usize);
                let done = page.len() < limit as usize;
                seen.extend(page.into_iter().map(|r| r.id));
                if seen.len() == 3 && limit == 3 {
                    // Newer than every cursor: not in a later page.
                    s.put_sandbox(&row("vm-new", 99)).unwrap();
                }
                before = seen.last().cloned();
                if done {
                    break;
                }
            }
            assert_eq!(seen, all, "limit {limit}");
        }
        let unknown = Page {
            before: Some("vm-nope".into()),
            limit: None,
        };
        assert_eq!(s.sandboxes(false, &unknown).unwrap(), None);
        assert_eq!(s.runs(&unknown).unwrap(), None);
    }

    #[test]
    fn sandboxes_round_trip_and_end_once() {
        let s = SqliteStore::in_memory().unwrap();
        s.put_sandbox(&row("vm-a", 1)).unwrap();
        s.put_sandbox(&row("vm-b", 2)).unwrap();
        assert_eq!(s.sandbox("vm-a").unwrap(), Some(row("vm-a", 1)));
        assert_eq!(s.sandbox("vm-x").unwrap(), None);
        let ids = |live| -> Vec<String> {
            s.sandboxes(live, &Page::all())
                .unwrap()
                .unwrap()
                .into_iter()
                .map(|r| r.id)
                .collect()
        };
        assert_eq!(ids(true), ["vm-b", "vm-a"]);
        assert!(s
            .end_sandbox("vm-a", SandboxState::Deleted, 5, "deleted")
            .unwrap());
        // Only a live one ends, once.
        assert!(!s
            .end_sandbox("vm-a", SandboxState::Dead, 6, "gone")
            .unwrap());
        assert_eq!(ids(true), ["vm-b"]);
        assert_eq!(ids(false), ["vm-b", "vm-a"]);
        let a = s.sandbox("vm-a").unwrap().unwrap();
        assert_eq!(
            (a.state, a.ended_at, a.ended_why.as_deref()),
            (SandboxState::Deleted, Some(5), Some("deleted"))
        );
    }

    #[test]
    fn a_file_keeps_its_rows_and_migrations_run_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("serve.db");
        SqliteStore::open(&path)
            .unwrap()
            .put_sandbox(&row("vm-a", 1))
            .unwrap();
        let again = SqliteStore::open(&path).unwrap();
        assert_eq!(again.sandbox("vm-a").unwrap(), Some(row("vm-a", 1)));
        let v: i64 = again
            .with(|c| c.pragma_query_value(None, "user_version", |r| r.get(0)))
            .unwrap();
        assert_eq!(v, MIGRATIONS.len() as i64);
    }

    #[test]
    fn runs_keep_progress_tasks_and_events() {
        let s = SqliteStore::in_memory().unwrap();
        let run = RunRow {
            id: "r1".into(),
            state: RunState::Running,
            plan: "/p/plan.toml".into(),
            repo: None,
            progress: None,
            result: None,
            report: None,
            error: None,
            resumed: 0,
            plan_sha256: None,
            cancel_requested: false,
            created_at: 1,
            ended_at: None,
        };
        assert!(s.insert_run(&run).unwrap());
        assert!(!s.insert_run(&run).unwrap(), "one run per id");
        s.request_cancel("r1").unwrap();
        assert!(s.run("r1").unwrap().unwrap().cancel_requested);
        let task = |id: &str, n: u32| TaskRow {
            id: id.into(),
            outcome: "green".into(),
            commit: Some("abc".into()),
            attempts: (1..=n)
                .map(|i| (i, i == n, (i < n).then(|| "no".to_string())))
                .collect(),
            result: "{}".into(),
        };
        s.save_progress("r1", "{\"a\":1}", &[task("one", 1)])
            .unwrap();
        s.save_progress("r1", "{\"a\":2}", &[task("one", 1), task("two", 2)])
            .unwrap();
        assert_eq!(s.tasks("r1").unwrap(), vec![task("one", 1), task("two", 2)]);
        assert_eq!(
            s.run("r1").unwrap().unwrap().progress.as_deref(),
            Some("{\"a\":2}")
        );
        assert_eq!(s.run_event("r1", "e1").unwrap(), 1);
        assert_eq!(s.run_event("r1", "e2").unwrap(), 2);
        assert_eq!(
            s.run_events("r1", 1, 10).unwrap(),
            vec![(2, "e2".to_string())]
        );
        s.resumed("r1").unwrap();
        let end = RunEnding {
            state: RunState::Green,
            at: 5,
            result: Some("{}".into()),
            report: Some("# r".into()),
            error: None,
        };
        assert!(s.end_run("r1", &end).unwrap());
        assert!(!s.end_run("r1", &end).unwrap(), "ends once");
        let r = s.run("r1").unwrap().unwrap();
        assert_eq!(
            (r.state, r.resumed, r.ended_at),
            (RunState::Green, 1, Some(5))
        );
        assert_eq!(s.runs(&Page::all()).unwrap().unwrap().len(), 1);
        let counts = s.counts().unwrap();
        for want in [
            ("runs", "green".to_string(), 1),
            ("tasks", "green".to_string(), 2),
            ("attempts", "green".to_string(), 2),
            ("attempts", "failed".to_string(), 1),
        ] {
            assert!(counts.contains(&want), "{want:?} in {counts:?}");
        }
    }

    #[test]
    fn a_database_from_a_newer_dough_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("serve.db");
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "user_version", 99)
            .unwrap();
        match SqliteStore::open(&path) {
            Err(StoreError::TooNew { found: 99, .. }) => {}
            other => panic!("expected TooNew, got {other:?}"),
        }
    }
}
