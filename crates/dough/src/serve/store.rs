//! What `dough serve` remembers across restarts, behind a narrow
//! interface ([`Store`]) so that another database can stand behind it
//! later; [`SqliteStore`] is the one file under `$DOUGH_HOME`.

use std::path::Path;
use std::sync::Mutex;

pub use dough_client::types::SandboxState;
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

/// The daemon's state. Every method is one transaction.
pub trait Store: Send + Sync {
    fn put_sandbox(&self, row: &SandboxRow) -> Result<(), StoreError>;
    fn sandbox(&self, id: &str) -> Result<Option<SandboxRow>, StoreError>;
    /// Every sandbox, newest first; live ones only with `live_only`.
    fn sandboxes(&self, live_only: bool) -> Result<Vec<SandboxRow>, StoreError>;
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

    fn sandboxes(&self, live_only: bool) -> Result<Vec<SandboxRow>, StoreError> {
        self.with(|c| {
            let filter = if live_only {
                "WHERE state = 'live'"
            } else {
                ""
            };
            let mut st = c.prepare(&format!(
                "SELECT {SANDBOX_COLUMNS} FROM sandboxes {filter} ORDER BY created_at DESC, id"
            ))?;
            let rows = st.query_map([], row_to_sandbox)?;
            rows.collect()
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

    #[test]
    fn sandboxes_round_trip_and_end_once() {
        let s = SqliteStore::in_memory().unwrap();
        s.put_sandbox(&row("vm-a", 1)).unwrap();
        s.put_sandbox(&row("vm-b", 2)).unwrap();
        assert_eq!(s.sandbox("vm-a").unwrap(), Some(row("vm-a", 1)));
        assert_eq!(s.sandbox("vm-x").unwrap(), None);
        let ids = |live| -> Vec<String> {
            s.sandboxes(live)
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
