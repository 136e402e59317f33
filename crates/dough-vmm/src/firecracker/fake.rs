//! An in-process fake of Firecracker's API (HTTP over a Unix socket) for
//! tests, answering **with the bytes real Firecracker v1.16.1 sends**
//! (recorded through a byte-level proxy on its API socket; the recordings
//! are `crates/dough-vmm/tests/fixtures/firecracker-1.16.1.json`, and
//! `tests/firecracker_fixtures.rs` fails if this fake and they disagree):
//!
//! - success: `HTTP/1.1 204 ` + `Server` + `Connection: keep-alive`, no
//!   `Content-Length`; `GET /version` a 200 with a JSON body; refusals a
//!   400 with `{"fault_message": ...}` — the recorded texts, verbatim;
//! - the connection stays open after every reply (keep-alive), and more
//!   requests may follow on it; `Connection: close` is ignored, as the real
//!   one ignores it;
//! - the ordering rules the real one enforces: boot resources only before
//!   `InstanceStart`; `snapshot/load` only on a fresh process;
//!   `snapshot/create` only while paused; `PATCH /vm` only once started;
//! - `PUT /vsock` binds its `uds_path` (a load binds the override's or the
//!   snapshot's), so a load onto a path in use fails as the real one does;
//! - a failed `snapshot/load` ends the process with status 1 after its
//!   reply ([`FakeFirecracker::exit_code`]; the in-process fake stops
//!   serving, `dough-fake-firecracker` exits).
//!
//! Refusals no recording covers say so in their `fault_message` instead of
//! imitating a text nobody saw. Calls are recorded (and, with
//! [`FakeOptions::log`], appended to a file as JSON lines).
//!
//! A Full snapshot written by the fake holds whatever guest state its user
//! set ([`FakeFirecracker::set_guest_state`]) and a memory file of the
//! configured size; loading one makes that state available again
//! ([`FakeFirecracker::loaded_guest_state`]).

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FakeState {
    Fresh,
    Configuring,
    Running,
    Paused,
}

#[derive(Debug, Default)]
struct Inner {
    state: Option<FakeState>,
    calls: Vec<(String, String, Value)>,
    boot_source: bool,
    metrics: bool,
    loaded_from_snapshot: bool,
    mem_size_mib: Option<u64>,
    guest_state: Option<String>,
    loaded_guest_state: Option<String>,
    /// The vsock device's host socket (bound as the real one binds it).
    vsock: Option<UnixListener>,
    vsock_path: Option<String>,
    /// Set when the process "exits" (after a failed load).
    exit_code: Option<i32>,
}

/// How a fake behaves beyond Firecracker's rules.
#[derive(Debug, Clone, Default)]
pub struct FakeOptions {
    /// Append every call (`{"method", "path", "body"}`) to this file.
    pub log: Option<PathBuf>,
    /// Refuse every call to this path with a 400.
    pub refuse: Option<String>,
    /// What `GET /version` answers (default `1.16.1`).
    pub version: Option<String>,
}

/// A fake Firecracker process's API.
#[derive(Debug, Clone)]
pub struct FakeFirecracker {
    pub socket: PathBuf,
    inner: Arc<Mutex<Inner>>,
    opts: Arc<FakeOptions>,
}

/// The success reply, exactly as real Firecracker v1.16.1 sends it.
pub const NO_CONTENT: &[u8] =
    b"HTTP/1.1 204 \r\nServer: Firecracker API\r\nConnection: keep-alive\r\n\r\n";

/// A reply with a JSON body, laid out exactly as real Firecracker v1.16.1
/// lays it out (no reason phrase; `Content-Type` then `Content-Length`).
pub fn json_reply(status: u16, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status} \r\nServer: Firecracker API\r\nConnection: keep-alive\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Refusal texts recorded from real Firecracker v1.16.1.
pub mod fault {
    pub const AFTER_START: &str =
        "The requested operation is not supported after starting the microVM.";
    pub const BEFORE_START: &str =
        "The requested operation is not supported before starting the microVM.";
    pub const NO_KERNEL: &str =
        "Start microvm error: Cannot start microvm without kernel configuration.";
    pub const CREATE_WHILE_RUNNING: &str = "Create snapshot error: Cannot save the microVM state: Operation not allowed: save/restore unavailable while running";
    pub const LOAD_AFTER_CONFIG: &str = "Load snapshot error: Loading a microVM snapshot not allowed after configuring boot-specific resources.";
    pub const LOAD_NO_SNAPSHOT_FILE: &str = "Load snapshot error: Failed to restore from snapshot: Failed to get snapshot state from file: Failed to open snapshot file: No such file or directory (os error 2)";
    pub const LOAD_VSOCK_IN_USE: &str = "Load snapshot error: Failed to restore from snapshot: Failed to build microVM from snapshot: Failed to restore devices: Error restoring MMIO devices: VsockUnixBackend: Error binding to the host-side Unix socket: Address already in use (os error 98)";
    pub const METRICS_AGAIN: &str = "Metrics error: Cannot initialize the metrics system due to bad user input: Reinitialization of metrics not allowed.";

    /// `Invalid request method and/or path: GET nonexistent.` (the path
    /// without its leading slash, as recorded).
    pub fn invalid_path(method: &str, path: &str) -> String {
        format!(
            "Invalid request method and/or path: {method} {}.",
            path.trim_start_matches('/')
        )
    }

    /// A refusal no recording covers: said plainly, not imitated.
    pub fn unrecorded(what: &str) -> String {
        format!(
            "dough's fake refuses this ({what}); no real Firecracker refusal was recorded for it"
        )
    }
}

/// What one request gets: the reply, and whether the process then exits.
struct Answer {
    bytes: Vec<u8>,
    exit: Option<i32>,
}

impl Answer {
    fn ok() -> Answer {
        Answer {
            bytes: NO_CONTENT.to_vec(),
            exit: None,
        }
    }
    fn json(status: u16, v: Value) -> Answer {
        Answer {
            bytes: json_reply(status, &v.to_string()),
            exit: None,
        }
    }
    fn fault(m: &str) -> Answer {
        Answer::json(400, json!({ "fault_message": m }))
    }
    /// A refused load: the real process answers, then exits with 1.
    fn fatal(m: &str) -> Answer {
        Answer {
            exit: Some(1),
            ..Answer::fault(m)
        }
    }
}

impl FakeFirecracker {
    /// Listen on `socket` (serving on a background thread).
    pub fn start(socket: &Path) -> std::io::Result<FakeFirecracker> {
        Self::start_with(socket, FakeOptions::default())
    }

    /// Listen on `socket`, behaving as `opts` says. Each connection is
    /// served on a thread of its own, request after request, until the
    /// client closes it or the process "exits".
    pub fn start_with(socket: &Path, opts: FakeOptions) -> std::io::Result<FakeFirecracker> {
        let l = UnixListener::bind(socket)?;
        let fake = FakeFirecracker {
            socket: socket.to_path_buf(),
            inner: Arc::new(Mutex::new(Inner {
                state: Some(FakeState::Fresh),
                ..Inner::default()
            })),
            opts: Arc::new(opts),
        };
        let f = fake.clone();
        std::thread::spawn(move || {
            let stop = Arc::new(AtomicBool::new(false));
            for conn in l.incoming() {
                if f.exit_code().is_some() {
                    // The process is gone: nothing more is accepted.
                    break;
                }
                let Ok(conn) = conn else { continue };
                let f = f.clone();
                let stop = stop.clone();
                std::thread::spawn(move || f.serve(conn, &stop));
            }
        });
        Ok(fake)
    }

    pub fn state(&self) -> FakeState {
        self.inner
            .lock()
            .expect("fake")
            .state
            .unwrap_or(FakeState::Fresh)
    }

    /// The status the process exited with, once it has (a failed load).
    pub fn exit_code(&self) -> Option<i32> {
        self.inner.lock().expect("fake").exit_code
    }

    /// Set what the next Full snapshot records as the guest's state.
    pub fn set_guest_state(&self, state: String) {
        self.inner.lock().expect("fake").guest_state = Some(state);
    }

    /// The guest state of the snapshot this process loaded.
    pub fn loaded_guest_state(&self) -> Option<String> {
        self.inner.lock().expect("fake").loaded_guest_state.clone()
    }

    /// Whether this process was restored from a snapshot.
    pub fn loaded_from_snapshot(&self) -> bool {
        self.inner.lock().expect("fake").loaded_from_snapshot
    }

    /// `METHOD /path` of every call, in order.
    pub fn calls(&self) -> Vec<String> {
        self.inner
            .lock()
            .expect("fake")
            .calls
            .iter()
            .map(|(m, p, _)| format!("{m} {p}"))
            .collect()
    }

    /// The JSON body of the last call to `path`.
    pub fn body(&self, path: &str) -> Option<Value> {
        self.inner
            .lock()
            .expect("fake")
            .calls
            .iter()
            .rev()
            .find(|(_, p, _)| p == path)
            .map(|(_, _, b)| b.clone())
    }

    /// Serve requests on one connection, keeping it open between them.
    fn serve(&self, mut s: UnixStream, stop: &AtomicBool) {
        let mut buf: Vec<u8> = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            // Parse a request out of what has arrived, reading more as needed.
            let parsed = {
                let mut headers = [httparse::EMPTY_HEADER; 32];
                let mut req = httparse::Request::new(&mut headers);
                match req.parse(&buf) {
                    Ok(httparse::Status::Complete(n)) => {
                        let len = req
                            .headers
                            .iter()
                            .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                            .and_then(|h| std::str::from_utf8(h.value).ok()?.parse::<usize>().ok())
                            .unwrap_or(0);
                        Some((
                            req.method.unwrap_or("").to_string(),
                            req.path.unwrap_or("").to_string(),
                            n,
                            len,
                        ))
                    }
                    Ok(httparse::Status::Partial) => None,
                    Err(_) => return,
                }
            };
            match parsed {
                Some((method, path, head, len)) if buf.len() >= head + len => {
                    let body: Value =
                        serde_json::from_slice(&buf[head..head + len]).unwrap_or(Value::Null);
                    buf.drain(..head + len);
                    let answer = self.handle(&method, &path, body);
                    if s.write_all(&answer.bytes).is_err() {
                        return;
                    }
                    if let Some(code) = answer.exit {
                        self.exit(code, stop);
                        return;
                    }
                }
                _ => {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    match s.read(&mut chunk) {
                        Ok(0) | Err(_) => return,
                        Ok(k) => buf.extend_from_slice(&chunk[..k]),
                    }
                }
            }
        }
    }

    /// The process exits: record the status, close the vsock socket, and
    /// wake the accept loop so that it stops.
    fn exit(&self, code: i32, stop: &AtomicBool) {
        {
            let mut g = self.inner.lock().expect("fake");
            g.exit_code = Some(code);
            g.vsock = None;
        }
        stop.store(true, Ordering::SeqCst);
        let _ = UnixStream::connect(&self.socket);
    }

    /// Bind the vsock device's host socket, as Firecracker does.
    fn bind_vsock(g: &mut Inner, path: &str) -> std::io::Result<()> {
        let l = UnixListener::bind(path)?;
        g.vsock = Some(l);
        g.vsock_path = Some(path.to_string());
        Ok(())
    }

    fn handle(&self, method: &str, path: &str, body: Value) -> Answer {
        let mut g = self.inner.lock().expect("fake");
        g.calls.push((method.into(), path.into(), body.clone()));
        if let Some(log) = &self.opts.log {
            let line = json!({"method": method, "path": path, "body": body}).to_string() + "\n";
            let _ = std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(log)
                .and_then(|mut f| f.write_all(line.as_bytes()));
        }
        if self.opts.refuse.as_deref() == Some(path) {
            return Answer::fault(&fault::unrecorded(&format!("DOUGH_FAKE_FC_REFUSE={path}")));
        }
        let state = g.state.unwrap_or(FakeState::Fresh);
        let started = matches!(state, FakeState::Running | FakeState::Paused);
        let pre_boot = path == "/boot-source"
            || path == "/machine-config"
            || path.starts_with("/drives/")
            || path.starts_with("/network-interfaces/")
            || path == "/vsock"
            || path == "/entropy"
            || path == "/metrics";
        match (method, path) {
            ("GET", "/version") => Answer::json(
                200,
                json!({
                    "firecracker_version": self.opts.version.as_deref().unwrap_or("1.16.1")
                }),
            ),
            ("PUT", "/logger") => Answer::ok(),
            ("PUT", _) if pre_boot && started => Answer::fault(fault::AFTER_START),
            ("PUT", "/metrics") if g.metrics => Answer::fault(fault::METRICS_AGAIN),
            ("PUT", "/metrics") => {
                g.metrics = true;
                Answer::ok()
            }
            ("PUT", _) if pre_boot && g.loaded_from_snapshot => {
                Answer::fault(&fault::unrecorded("a boot resource after a snapshot load"))
            }
            ("PUT", _) if pre_boot => {
                if path == "/machine-config" {
                    g.mem_size_mib = body.get("mem_size_mib").and_then(Value::as_u64);
                }
                if path == "/boot-source" {
                    if body
                        .get("kernel_image_path")
                        .and_then(Value::as_str)
                        .is_none()
                    {
                        return Answer::fault(&fault::unrecorded("no kernel_image_path"));
                    }
                    g.boot_source = true;
                }
                if path == "/vsock" {
                    let Some(uds) = body.get("uds_path").and_then(Value::as_str) else {
                        return Answer::fault(&fault::unrecorded("no uds_path"));
                    };
                    g.vsock = None;
                    if let Err(e) = Self::bind_vsock(&mut g, uds) {
                        return Answer::fault(&fault::unrecorded(&format!(
                            "cannot bind the vsock socket: {e}"
                        )));
                    }
                }
                g.state = Some(FakeState::Configuring);
                Answer::ok()
            }
            ("PUT", "/actions") => match body.get("action_type").and_then(Value::as_str) {
                Some("InstanceStart") if started => Answer::fault(fault::AFTER_START),
                Some("InstanceStart") if !g.boot_source => Answer::fault(fault::NO_KERNEL),
                Some("InstanceStart") => {
                    g.state = Some(FakeState::Running);
                    Answer::ok()
                }
                _ => Answer::fault(&fault::unrecorded("an action other than InstanceStart")),
            },
            ("PATCH", "/vm") if !started => Answer::fault(fault::BEFORE_START),
            ("PATCH", "/vm") => match body.get("state").and_then(Value::as_str) {
                Some("Paused") => {
                    g.state = Some(FakeState::Paused);
                    Answer::ok()
                }
                Some("Resumed") => {
                    g.state = Some(FakeState::Running);
                    Answer::ok()
                }
                _ => Answer::fault(&fault::unrecorded("an unknown VM state")),
            },
            ("PUT", "/snapshot/create") if !started => Answer::fault(fault::BEFORE_START),
            ("PUT", "/snapshot/create") if state != FakeState::Paused => {
                Answer::fault(fault::CREATE_WHILE_RUNNING)
            }
            ("PUT", "/snapshot/create") => {
                let (Some(snap), Some(mem)) = (
                    body.get("snapshot_path").and_then(Value::as_str),
                    body.get("mem_file_path").and_then(Value::as_str),
                ) else {
                    return Answer::fault(&fault::unrecorded("no snapshot_path or mem_file_path"));
                };
                let saved = json!({
                    "fake_firecracker_snapshot": 1,
                    "mem_size_mib": g.mem_size_mib,
                    "vsock_uds": g.vsock_path,
                    "guest": g.guest_state,
                });
                let written = std::fs::write(snap, saved.to_string()).and_then(|_| {
                    let f = std::fs::File::create(mem)?;
                    f.set_len(g.mem_size_mib.unwrap_or(1) << 20)
                });
                match written {
                    Ok(()) => Answer::ok(),
                    Err(e) => Answer::fault(&fault::unrecorded(&format!(
                        "cannot write the snapshot: {e}"
                    ))),
                }
            }
            ("PUT", "/snapshot/load") if g.loaded_from_snapshot => {
                Answer::fault(&fault::unrecorded("a second snapshot load"))
            }
            ("PUT", "/snapshot/load") if state != FakeState::Fresh => {
                Answer::fault(fault::LOAD_AFTER_CONFIG)
            }
            ("PUT", "/snapshot/load") => {
                let snap = body.get("snapshot_path").and_then(Value::as_str);
                let mem = body
                    .get("mem_backend")
                    .and_then(|m| m.get("backend_path"))
                    .and_then(Value::as_str);
                let saved: Option<Value> = snap
                    .and_then(|s| std::fs::read(s).ok())
                    .map(|b| serde_json::from_slice(&b).unwrap_or(Value::Null));
                let Some(saved) = saved else {
                    return Answer::fatal(fault::LOAD_NO_SNAPSHOT_FILE);
                };
                if !mem.is_some_and(|m| Path::new(m).exists()) {
                    return Answer::fatal(&fault::unrecorded(
                        "a memory file that cannot be opened",
                    ));
                }
                let uds = body
                    .pointer("/vsock_override/uds_path")
                    .and_then(Value::as_str)
                    .or_else(|| saved.get("vsock_uds").and_then(Value::as_str))
                    .map(str::to_string);
                if let Some(uds) = uds {
                    if Self::bind_vsock(&mut g, &uds).is_err() {
                        return Answer::fatal(fault::LOAD_VSOCK_IN_USE);
                    }
                }
                g.loaded_guest_state = saved
                    .get("guest")
                    .and_then(Value::as_str)
                    .map(str::to_string);
                g.mem_size_mib = saved.get("mem_size_mib").and_then(Value::as_u64);
                g.loaded_from_snapshot = true;
                let resume = body.get("resume_vm").and_then(Value::as_bool) == Some(true);
                g.state = Some(if resume {
                    FakeState::Running
                } else {
                    FakeState::Paused
                });
                Answer::ok()
            }
            _ => Answer::fault(&fault::invalid_path(method, path)),
        }
    }
}
