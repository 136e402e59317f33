//! The Firecracker backend's API side: typed request bodies ([`api`]), a
//! small HTTP/1.1 client over the API socket ([`http`]), and [`Client`],
//! which maps Firecracker's refusals to errors carrying its
//! `fault_message` verbatim.

pub mod api;
pub mod backend;
pub mod fake;
pub mod http;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use api::*;

/// How long one API call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a snapshot call may take: `snapshot/create` writes all of guest
/// memory before it answers.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum FcError {
    /// Firecracker answered with an error; its message, verbatim.
    #[error("Firecracker refused {method} {path} ({status}): {fault_message}")]
    Refused {
        method: String,
        path: String,
        status: u16,
        fault_message: String,
    },
    #[error("cannot start {binary} (is Firecracker installed? point dough at it with --firecracker or DOUGH_FIRECRACKER)")]
    Spawn {
        binary: String,
        #[source]
        source: std::io::Error,
    },
    #[error("Firecracker's API socket {path} did not appear within {secs}s")]
    NoSocket { path: PathBuf, secs: u64 },
    #[error("Firecracker exited before its API socket appeared ({status})")]
    Exited { status: String },
    #[error("Firecracker API {method} {path}")]
    Http {
        method: String,
        path: String,
        #[source]
        source: http::HttpError,
    },
    #[error("Firecracker API {path}: unexpected response body: {body}")]
    BadBody { path: String, body: String },
}

/// A Firecracker API client for one process's socket.
#[derive(Debug, Clone)]
pub struct Client {
    pub socket: PathBuf,
}

impl Client {
    /// Wait (bounded polling) until the API socket accepts connections.
    /// `exited` is asked between polls whether the process has died, so a
    /// Firecracker that fails at start is reported at once, not after the
    /// deadline.
    pub fn wait(
        socket: &Path,
        limit: Duration,
        exited: &mut dyn FnMut() -> Option<String>,
    ) -> Result<Client, FcError> {
        let start = Instant::now();
        let mut pause = Duration::from_millis(1);
        loop {
            if std::os::unix::net::UnixStream::connect(socket).is_ok() {
                return Ok(Client {
                    socket: socket.to_path_buf(),
                });
            }
            if let Some(status) = exited() {
                return Err(FcError::Exited { status });
            }
            if start.elapsed() >= limit {
                return Err(FcError::NoSocket {
                    path: socket.to_path_buf(),
                    secs: limit.as_secs(),
                });
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }

    fn call(&self, method: &str, path: &str, body: Option<Vec<u8>>) -> Result<Vec<u8>, FcError> {
        let limit = if path.starts_with("/snapshot/") {
            SNAPSHOT_TIMEOUT
        } else {
            CALL_TIMEOUT
        };
        let (status, resp) = http::request(&self.socket, method, path, body.as_deref(), limit)
            .map_err(|source| FcError::Http {
                method: method.into(),
                path: path.into(),
                source,
            })?;
        if (200..300).contains(&status) {
            return Ok(resp);
        }
        let fault_message = serde_json::from_slice::<ApiError>(&resp)
            .map(|e| e.fault_message)
            .unwrap_or_else(|_| String::from_utf8_lossy(&resp).chars().take(500).collect());
        Err(FcError::Refused {
            method: method.into(),
            path: path.into(),
            status,
            fault_message,
        })
    }

    fn send<T: Serialize>(&self, method: &str, path: &str, body: &T) -> Result<(), FcError> {
        let bytes = serde_json::to_vec(body).expect("API bodies serialize");
        self.call(method, path, Some(bytes)).map(drop)
    }

    pub fn boot_source(&self, b: &BootSource) -> Result<(), FcError> {
        self.send("PUT", "/boot-source", b)
    }
    pub fn machine_config(&self, m: &MachineConfiguration) -> Result<(), FcError> {
        self.send("PUT", "/machine-config", m)
    }
    pub fn drive(&self, d: &Drive) -> Result<(), FcError> {
        self.send("PUT", &format!("/drives/{}", d.drive_id), d)
    }
    pub fn network_interface(&self, n: &NetworkInterface) -> Result<(), FcError> {
        self.send("PUT", &format!("/network-interfaces/{}", n.iface_id), n)
    }
    pub fn vsock(&self, v: &Vsock) -> Result<(), FcError> {
        self.send("PUT", "/vsock", v)
    }
    pub fn entropy(&self) -> Result<(), FcError> {
        self.send("PUT", "/entropy", &EntropyDevice {})
    }
    pub fn logger(&self, l: &Logger) -> Result<(), FcError> {
        self.send("PUT", "/logger", l)
    }
    pub fn metrics(&self, m: &Metrics) -> Result<(), FcError> {
        self.send("PUT", "/metrics", m)
    }
    pub fn start(&self) -> Result<(), FcError> {
        self.send(
            "PUT",
            "/actions",
            &InstanceActionInfo {
                action_type: ActionType::InstanceStart,
            },
        )
    }
    pub fn pause(&self) -> Result<(), FcError> {
        self.send(
            "PATCH",
            "/vm",
            &Vm {
                state: VmState::Paused,
            },
        )
    }
    pub fn resume(&self) -> Result<(), FcError> {
        self.send(
            "PATCH",
            "/vm",
            &Vm {
                state: VmState::Resumed,
            },
        )
    }
    pub fn snapshot_create(&self, s: &SnapshotCreateParams) -> Result<(), FcError> {
        self.send("PUT", "/snapshot/create", s)
    }
    pub fn snapshot_load(&self, s: &SnapshotLoadParams) -> Result<(), FcError> {
        self.send("PUT", "/snapshot/load", s)
    }
    pub fn version(&self) -> Result<String, FcError> {
        let body = self.call("GET", "/version", None)?;
        serde_json::from_slice::<FirecrackerVersion>(&body)
            .map(|v| v.firecracker_version)
            .map_err(|_| FcError::BadBody {
                path: "/version".into(),
                body: String::from_utf8_lossy(&body).chars().take(200).collect(),
            })
    }
}
