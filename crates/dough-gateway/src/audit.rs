//! The gateway's audit log: one JSON object per line for every DNS query
//! and every connection, with its verdict and reason. Capped: once the log
//! reaches its limit one last line says so and later events are counted,
//! not written (a guest cannot fill the host's disk through it).

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Largest audit log a clone may produce.
pub const LOG_MAX: u64 = 16 << 20;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Dns,
    Tcp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Allow,
    Deny,
    /// Allowed, but it failed upstream (resolution, connect).
    Fail,
}

/// One audit line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Unix time in milliseconds.
    pub t: u64,
    pub vm: String,
    pub kind: Kind,
    /// The name asked for (DNS query, SNI, Host), when there is one.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub name: Option<String>,
    /// DNS: the record type; TCP: how the name was learnt (sni, host).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub what: Option<String>,
    /// TCP: where the guest dialed.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub dialed: Option<String>,
    /// TCP: where the gateway connected (DNS: the addresses answered).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub upstream: Option<String>,
    pub verdict: Verdict,
    pub reason: String,
    /// Brokered requests: method, path (clipped), the upstream's status,
    /// and which secrets were put in.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub method: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub secrets: Option<Vec<String>>,
    /// Bytes guest → upstream and back (TCP, once closed).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub up: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub down: Option<u64>,
}

impl Event {
    pub fn new(vm: &str, kind: Kind, verdict: Verdict, reason: impl Into<String>) -> Event {
        Event {
            t: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            vm: vm.to_string(),
            kind,
            name: None,
            what: None,
            dialed: None,
            upstream: None,
            verdict,
            reason: reason.into(),
            method: None,
            path: None,
            status: None,
            secrets: None,
            up: None,
            down: None,
        }
    }
}

impl Event {
    /// The event as one line: `HH:MM:SS.mmm VERDICT dns|tcp what -> where
    /// (reason) [method path -> status] [up N B, down N B]` (UTC time).
    pub fn line(&self) -> String {
        let ms = self.t % 86_400_000;
        let t = format!(
            "{:02}:{:02}:{:02}.{:03}",
            ms / 3_600_000,
            ms / 60_000 % 60,
            ms / 1000 % 60,
            ms % 1000
        );
        let verdict = match self.verdict {
            Verdict::Allow => "allow",
            Verdict::Deny => "DENY ",
            Verdict::Fail => "fail ",
        };
        let mut what = match self.kind {
            Kind::Dns => format!(
                "dns {} {}",
                self.what.as_deref().unwrap_or("?"),
                self.name.as_deref().unwrap_or("?")
            ),
            Kind::Tcp => match (&self.method, &self.name) {
                (Some(m), Some(n)) => format!(
                    "https {m} {n}{} -> {}",
                    self.path.as_deref().unwrap_or(""),
                    self.status.map(|s| s.to_string()).unwrap_or("-".into())
                ),
                _ => {
                    let mut w = format!("tcp {}", self.dialed.as_deref().unwrap_or("?"));
                    if let (Some(n), Some(how)) = (&self.name, &self.what) {
                        w += &format!(" {how}={n}");
                    }
                    w
                }
            },
        };
        if let Some(u) = &self.upstream {
            what += &format!(" -> {u}");
        }
        let mut line = format!("{t} {verdict} {what} ({})", self.reason);
        if let Some(s) = &self.secrets {
            line += &format!(" [secrets: {}]", s.join(", "));
        }
        if let (Some(up), Some(down)) = (self.up, self.down) {
            line += &format!(" up {up} B, down {down} B");
        }
        line
    }
}

/// At most 200 characters of `s` (paths in the log).
pub fn clip(s: &str) -> String {
    match s.char_indices().nth(200) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// Where events go.
#[derive(Debug)]
pub struct Audit {
    inner: Mutex<Sink>,
    max: u64,
}

#[derive(Debug)]
struct Sink {
    file: Option<File>,
    written: u64,
    dropped: u64,
}

impl Audit {
    /// Append to `path` (created 0600), at most `max` bytes in all.
    pub fn open(path: &Path, max: u64) -> std::io::Result<Audit> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = File::options()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)?;
        let written = file.metadata()?.len();
        Ok(Audit {
            inner: Mutex::new(Sink {
                file: Some(file),
                written,
                dropped: 0,
            }),
            max,
        })
    }

    /// Record `e`, or count it once the log is full.
    pub fn log(&self, e: &Event) {
        tracing::debug!(?e, "egress");
        let mut s = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let Ok(mut line) = serde_json::to_vec(e) else {
            return;
        };
        line.push(b'\n');
        // Room is kept for the last line, which says the log is full.
        if s.written + line.len() as u64 + 200 > self.max {
            s.dropped += 1;
            if s.dropped == 1 {
                let note = format!(
                    "{{\"vm\":{},\"kind\":\"log\",\"reason\":\"audit log full ({} bytes): later events are not written\"}}\n",
                    serde_json::Value::from(e.vm.clone()),
                    self.max
                );
                if let Some(f) = s.file.as_mut() {
                    let _ = f.write_all(note.as_bytes());
                }
            }
            return;
        }
        if let Some(f) = s.file.as_mut() {
            if f.write_all(&line).is_ok() {
                s.written += line.len() as u64;
            }
        }
    }

    /// Events not written because the log was full.
    pub fn dropped(&self) -> u64 {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).dropped
    }
}

/// Read an audit log back (lines that are not events — the "full" note —
/// are skipped).
pub fn read(path: &Path) -> std::io::Result<Vec<Event>> {
    let text = std::fs::read_to_string(path)?;
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_is_capped_and_says_so() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("net.log");
        let a = Audit::open(&p, 4096).unwrap();
        let mut e = Event::new("vm-1", Kind::Dns, Verdict::Deny, "not allowed");
        e.name = Some("x".repeat(100));
        for _ in 0..1000 {
            a.log(&e);
        }
        let len = std::fs::metadata(&p).unwrap().len();
        assert!(len <= 4096, "{len}");
        assert!(a.dropped() > 900);
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(
            text.ends_with("later events are not written\"}\n"),
            "{text}"
        );
        let back = read(&p).unwrap();
        assert_eq!(back.len() as u64 + a.dropped(), 1000);
        assert_eq!(back[0], e);
    }
}
