//! An in-process fake of Firecracker's API (HTTP over a Unix socket) for
//! tests. It follows the ordering rules Firecracker documents: boot
//! resources only before `InstanceStart`; `snapshot/load` only on a fresh
//! process (nothing but logger and metrics before it); `snapshot/create`
//! only while paused; `PATCH /vm` only once running. Everything else gets
//! a 400 with a `fault_message`, like the real one. Calls are recorded
//! (and, with [`FakeOptions::log`], appended to a file as JSON lines).
//!
//! A Full snapshot written by the fake holds whatever guest state its user
//! set ([`FakeFirecracker::set_guest_state`]) and a memory file of the
//! configured size; loading one makes that state available again
//! ([`FakeFirecracker::loaded_guest_state`]).

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
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
}

/// How a fake behaves beyond Firecracker's rules.
#[derive(Debug, Clone, Default)]
pub struct FakeOptions {
    /// Append every call (`{"method", "path", "body"}`) to this file.
    pub log: Option<PathBuf>,
    /// Refuse every call to this path with a 400.
    pub refuse: Option<String>,
    /// What `GET /version` answers (default `1.16.0`).
    pub version: Option<String>,
}

/// A fake Firecracker process's API.
#[derive(Debug, Clone)]
pub struct FakeFirecracker {
    pub socket: PathBuf,
    inner: Arc<Mutex<Inner>>,
    opts: Arc<FakeOptions>,
}

impl FakeFirecracker {
    /// Listen on `socket` (serving on a background thread).
    pub fn start(socket: &Path) -> std::io::Result<FakeFirecracker> {
        Self::start_with(socket, FakeOptions::default())
    }

    /// Listen on `socket`, behaving as `opts` says.
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
            for conn in l.incoming().flatten() {
                f.serve(conn);
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

    fn serve(&self, mut s: UnixStream) {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let (method, path, body) = loop {
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
                    let method = req.method.unwrap_or("").to_string();
                    let path = req.path.unwrap_or("").to_string();
                    let mut body = buf[n..].to_vec();
                    while body.len() < len {
                        match s.read(&mut chunk) {
                            Ok(0) | Err(_) => return,
                            Ok(k) => body.extend_from_slice(&chunk[..k]),
                        }
                    }
                    break (method, path, body);
                }
                Ok(httparse::Status::Partial) => match s.read(&mut chunk) {
                    Ok(0) | Err(_) => return,
                    Ok(k) => buf.extend_from_slice(&chunk[..k]),
                },
                Err(_) => return,
            }
        };
        let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let (status, reply) = self.handle(&method, &path, body);
        let text = reply.map(|v| v.to_string()).unwrap_or_default();
        let reason = match status {
            200 => "OK",
            204 => "No Content",
            _ => "Bad Request",
        };
        let _ = write!(
            s,
            "HTTP/1.1 {status} {reason}\r\nServer: Firecracker API\r\nContent-Length: {}\r\n\r\n{text}",
            text.len()
        );
    }

    fn handle(&self, method: &str, path: &str, body: Value) -> (u16, Option<Value>) {
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
            return (
                400,
                Some(json!({ "fault_message": format!("fake refusal of {method} {path}") })),
            );
        }
        let state = g.state.unwrap_or(FakeState::Fresh);
        let fault = |m: &str| (400, Some(json!({ "fault_message": m })));
        let started = matches!(state, FakeState::Running | FakeState::Paused);
        let pre_boot = path == "/boot-source"
            || path == "/machine-config"
            || path.starts_with("/drives/")
            || path.starts_with("/network-interfaces/")
            || path == "/vsock"
            || path == "/entropy";
        match (method, path) {
            ("GET", "/version") => (
                200,
                Some(json!({
                    "firecracker_version": self.opts.version.as_deref().unwrap_or("1.16.0")
                })),
            ),
            ("PUT", "/logger") => (204, None),
            ("PUT", "/metrics") if g.metrics => fault("Reinitialization of metrics not allowed."),
            ("PUT", "/metrics") => {
                g.metrics = true;
                (204, None)
            }
            ("PUT", _) if pre_boot && started => {
                fault("The requested operation is not supported after starting the microVM.")
            }
            ("PUT", _) if pre_boot => {
                if path == "/machine-config" {
                    g.mem_size_mib = body.get("mem_size_mib").and_then(Value::as_u64);
                }
                if path == "/boot-source" {
                    if body.get("kernel_image_path").and_then(Value::as_str).is_none() {
                        return fault("missing field `kernel_image_path`");
                    }
                    g.boot_source = true;
                }
                g.state = Some(FakeState::Configuring);
                (204, None)
            }
            ("PUT", "/actions") => match body.get("action_type").and_then(Value::as_str) {
                Some("InstanceStart") if started => {
                    fault("The requested operation is not supported after starting the microVM.")
                }
                Some("InstanceStart") if !g.boot_source => {
                    fault("Cannot start microvm without kernel configuration.")
                }
                Some("InstanceStart") => {
                    g.state = Some(FakeState::Running);
                    (204, None)
                }
                _ => fault("unknown action"),
            },
            ("PATCH", "/vm") if !started => {
                fault("The requested operation is not supported before starting the microVM.")
            }
            ("PATCH", "/vm") => match body.get("state").and_then(Value::as_str) {
                Some("Paused") => {
                    g.state = Some(FakeState::Paused);
                    (204, None)
                }
                Some("Resumed") => {
                    g.state = Some(FakeState::Running);
                    (204, None)
                }
                _ => fault("unknown state"),
            },
            ("PUT", "/snapshot/create") if state != FakeState::Paused => {
                fault("Cannot create a snapshot while the microVM is not paused.")
            }
            ("PUT", "/snapshot/create") => {
                let (Some(snap), Some(mem)) = (
                    body.get("snapshot_path").and_then(Value::as_str),
                    body.get("mem_file_path").and_then(Value::as_str),
                ) else {
                    return fault("missing field `snapshot_path` or `mem_file_path`");
                };
                let state = json!({
                    "fake_firecracker_snapshot": 1,
                    "mem_size_mib": g.mem_size_mib,
                    "guest": g.guest_state,
                });
                let written = std::fs::write(snap, state.to_string()).and_then(|_| {
                    let f = std::fs::File::create(mem)?;
                    f.set_len(g.mem_size_mib.unwrap_or(1) << 20)
                });
                match written {
                    Ok(()) => (204, None),
                    Err(e) => fault(&format!("cannot write the snapshot: {e}")),
                }
            }
            ("PUT", "/snapshot/load") if state != FakeState::Fresh || g.loaded_from_snapshot => fault(
                "Loading a microVM snapshot not allowed after configuring boot-specific resources.",
            ),
            ("PUT", "/snapshot/load") => {
                let snap = body.get("snapshot_path").and_then(Value::as_str);
                let mem = body
                    .get("mem_backend")
                    .and_then(|m| m.get("backend_path"))
                    .and_then(Value::as_str);
                match (snap, mem) {
                    (Some(s), Some(m)) if Path::new(s).exists() && Path::new(m).exists() => {
                        let saved: Value = std::fs::read(s)
                            .ok()
                            .and_then(|b| serde_json::from_slice(&b).ok())
                            .unwrap_or(Value::Null);
                        g.loaded_guest_state = saved
                            .get("guest")
                            .and_then(Value::as_str)
                            .map(str::to_string);
                        g.loaded_from_snapshot = true;
                        let resume = body.get("resume_vm").and_then(Value::as_bool) == Some(true);
                        g.state = Some(if resume {
                            FakeState::Running
                        } else {
                            FakeState::Paused
                        });
                        (204, None)
                    }
                    _ => fault("Cannot open the snapshot or memory file."),
                }
            }
            _ => fault(&format!("Invalid request method and/or path: {method} {path}.")),
        }
    }
}
