//! A small synchronous QMP client: greeting, capability negotiation, then
//! one command at a time, skipping asynchronous events.
//!
//! Why not a crate: the `qapi` crate generates bindings for QEMU's whole
//! schema (slow to build on two cores) and we use a handful of commands.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("connecting to QMP socket {path}")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to QEMU over its QMP socket failed")]
    Io(#[from] std::io::Error),
    #[error("QMP peer closed the connection")]
    Closed,
    #[error("QMP sent something that is not JSON: {0}")]
    BadJson(String),
    #[error("migration failed: {0}")]
    Migration(String),
    #[error("QMP command {command} failed: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
}

/// Longest line accepted from QEMU (a reply to the commands we use is small).
const MAX_LINE: usize = 1 << 20;

#[derive(Debug)]
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connect, read the greeting and leave negotiation mode.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        let s = UnixStream::connect(path).map_err(|source| QmpError::Connect {
            path: path.display().to_string(),
            source,
        })?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        let mut q = Qmp {
            reader: BufReader::new(s.try_clone()?),
            writer: s,
        };
        let greeting = q.read_msg()?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::BadJson(format!(
                "expected a greeting, got {greeting}"
            )));
        }
        q.execute("qmp_capabilities", None)?;
        Ok(q)
    }

    fn read_msg(&mut self) -> Result<Value, QmpError> {
        let mut line = String::new();
        let n = std::io::Read::take(&mut self.reader, MAX_LINE as u64).read_line(&mut line)?;
        if n == 0 {
            return Err(QmpError::Closed);
        }
        serde_json::from_str(&line)
            .map_err(|_| QmpError::BadJson(line.trim().chars().take(200).collect()))
    }

    /// Run one command and return its `return` value.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        let mut req = json!({ "execute": command });
        if let Some(a) = arguments {
            req["arguments"] = a;
        }
        let mut bytes = serde_json::to_vec(&req).expect("QMP request serializes");
        bytes.push(b'\n');
        self.writer.write_all(&bytes)?;
        loop {
            let msg = self.read_msg()?;
            if msg.get("event").is_some() {
                continue;
            }
            if let Some(r) = msg.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = msg.get("error") {
                let s = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("?").to_string();
                return Err(QmpError::Command {
                    command: command.to_string(),
                    class: s("class"),
                    desc: s("desc"),
                });
            }
            return Err(QmpError::BadJson(msg.to_string()));
        }
    }

    /// `query-status`'s `status` field (`running`, `paused`, ...).
    pub fn status(&mut self) -> Result<String, QmpError> {
        let r = self.execute("query-status", None)?;
        Ok(r.get("status")
            .and_then(Value::as_str)
            .unwrap_or("unknown")
            .to_string())
    }

    /// Pause the vCPUs.
    pub fn stop(&mut self) -> Result<(), QmpError> {
        self.execute("stop", None).map(drop)
    }

    /// Run the vCPUs.
    pub fn cont(&mut self) -> Result<(), QmpError> {
        self.execute("cont", None).map(drop)
    }

    /// Leave RAM that lives in a shared file out of the migration stream
    /// (`x-ignore-shared`); needed on both the saving and restoring side.
    pub fn ignore_shared_ram(&mut self) -> Result<(), QmpError> {
        self.set_ignore_shared(true)
    }

    /// Set the `x-ignore-shared` migration capability (both ends of a
    /// migration must agree: QEMU checks).
    pub fn set_ignore_shared(&mut self, on: bool) -> Result<(), QmpError> {
        self.execute(
            "migrate-set-capabilities",
            Some(json!({"capabilities": [{"capability": "x-ignore-shared", "state": on}]})),
        )
        .map(drop)
    }

    /// Let a migration use all the bandwidth it can (QEMU's default is
    /// 32 MiB/s, meant for live migration over a network: saving a guest's
    /// RAM to a local file at that rate takes seconds).
    pub fn unthrottle_migration(&mut self) -> Result<(), QmpError> {
        self.execute(
            "migrate-set-parameters",
            Some(json!({"max-bandwidth": 16u64 << 30})),
        )
        .map(drop)
    }

    /// Start an outgoing migration to `uri`.
    pub fn migrate(&mut self, uri: &str) -> Result<(), QmpError> {
        self.execute("migrate", Some(json!({ "uri": uri })))
            .map(drop)
    }

    /// Start the incoming migration of a `-incoming defer` QEMU.
    pub fn migrate_incoming(&mut self, uri: &str) -> Result<(), QmpError> {
        self.execute("migrate-incoming", Some(json!({ "uri": uri })))
            .map(drop)
    }

    /// Poll `query-migrate` until the migration (either direction) has
    /// completed, failing on `failed`/`cancelled` or after `limit`.
    pub fn wait_migration(&mut self, limit: Duration) -> Result<(), QmpError> {
        let start = std::time::Instant::now();
        let mut pause = Duration::from_millis(1);
        loop {
            let r = self.execute("query-migrate", None)?;
            let status = r.get("status").and_then(Value::as_str).unwrap_or("none");
            match status {
                "completed" => return Ok(()),
                "failed" | "cancelled" => {
                    return Err(QmpError::Migration(
                        r.get("error-desc")
                            .and_then(Value::as_str)
                            .unwrap_or(status)
                            .to_string(),
                    ))
                }
                _ if start.elapsed() >= limit => {
                    return Err(QmpError::Migration(format!(
                        "still {status} after {limit:?}"
                    )))
                }
                _ => {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(20));
                }
            }
        }
    }

    /// Ask QEMU to exit. The connection closes as it does.
    pub fn quit(&mut self) -> Result<(), QmpError> {
        match self.execute("quit", None) {
            Ok(_) | Err(QmpError::Closed) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A scripted QMP server: greeting, then canned replies per command.
    fn fake(dir: &Path, replies: Vec<&'static str>) -> std::path::PathBuf {
        let path = dir.join("qmp.sock");
        let l = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let mut w = s.try_clone().unwrap();
            let mut r = BufReader::new(s);
            w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
                .unwrap();
            for reply in replies {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap() == 0 {
                    return;
                }
                w.write_all(reply.as_bytes()).unwrap();
            }
        });
        path
    }

    #[test]
    fn negotiates_skips_events_and_reports_errors() {
        let d = tempfile::tempdir().unwrap();
        let path = fake(
            d.path(),
            vec![
                "{\"return\": {}}\n",
                "{\"event\": \"RESUME\", \"timestamp\": {}}\n{\"return\": {\"status\": \"running\", \"running\": true}}\n",
                "{\"error\": {\"class\": \"GenericError\", \"desc\": \"no such thing\"}}\n",
                "not json\n",
            ],
        );
        let mut q = Qmp::connect(&path, Duration::from_secs(5)).unwrap();
        assert_eq!(q.status().unwrap(), "running");
        let e = q.execute("bogus", None).unwrap_err();
        assert_eq!(
            e.to_string(),
            "QMP command bogus failed: GenericError: no such thing"
        );
        assert!(matches!(q.execute("x", None), Err(QmpError::BadJson(_))));
        assert!(matches!(
            q.execute("y", None),
            Err(QmpError::Closed | QmpError::Io(_))
        ));
    }

    #[test]
    fn migration_waits_for_completion_and_reports_failure() {
        let d = tempfile::tempdir().unwrap();
        let path = fake(
            d.path(),
            vec![
                "{\"return\": {}}\n",
                "{\"return\": {}}\n",
                "{\"return\": {\"status\": \"setup\"}}\n",
                "{\"return\": {\"status\": \"active\"}}\n",
                "{\"return\": {\"status\": \"completed\"}}\n",
                "{\"return\": {\"status\": \"failed\", \"error-desc\": \"disk full\"}}\n",
            ],
        );
        let mut q = Qmp::connect(&path, Duration::from_secs(5)).unwrap();
        q.migrate("exec:cat > /x").unwrap();
        q.wait_migration(Duration::from_secs(5)).unwrap();
        let e = q.wait_migration(Duration::from_secs(5)).unwrap_err();
        assert_eq!(e.to_string(), "migration failed: disk full");
    }
}
