//! An in-process fake of Firecracker's API (HTTP over a Unix socket) for
//! tests. It follows the ordering rules Firecracker documents: boot
//! resources only before `InstanceStart`; `snapshot/load` only on a fresh
//! process (nothing but logger and metrics before it); `snapshot/create`
//! only while paused; `PATCH /vm` only once running. Everything else gets
//! a 400 with a `fault_message`, like the real one. Calls are recorded.

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
}

/// A fake Firecracker process's API.
#[derive(Debug, Clone)]
pub struct FakeFirecracker {
    pub socket: PathBuf,
    inner: Arc<Mutex<Inner>>,
}

impl FakeFirecracker {
    /// Listen on `socket` (serving on a background thread).
    pub fn start(socket: &Path) -> std::io::Result<FakeFirecracker> {
        let l = UnixListener::bind(socket)?;
        let fake = FakeFirecracker {
            socket: socket.to_path_buf(),
            inner: Arc::new(Mutex::new(Inner {
                state: Some(FakeState::Fresh),
                ..Inner::default()
            })),
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
            ("GET", "/version") => (200, Some(json!({"firecracker_version": "1.16.0"}))),
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
                for k in ["snapshot_path", "mem_file_path"] {
                    match body.get(k).and_then(Value::as_str) {
                        Some(p) => {
                            if std::fs::write(p, format!("fake {k}")).is_err() {
                                return fault(&format!("cannot write {p}"));
                            }
                        }
                        None => return fault(&format!("missing field `{k}`")),
                    }
                }
                (204, None)
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
