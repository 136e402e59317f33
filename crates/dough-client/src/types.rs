//! The API's request and response bodies (JSON), shared by the daemon
//! and its clients; with the `openapi` feature each has its schema.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[cfg(feature = "openapi")]
use utoipa::ToSchema;

/// Version of the HTTP API (the `/v1` in its paths).
pub const API_VERSION: u32 = 1;

/// `POST /v1/sandboxes`: a new sandbox, a clone of a snapshot. Every field
/// is optional; defaults are the daemon's (as `dough up` would have them).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateSandbox {
    /// An image id (`dough image ls`); default: the current image. Its
    /// warm snapshot is baked first if there is none.
    pub image: Option<String>,
    /// Restore from this snapshot instead (a key from `dough snapshots`,
    /// or a unique prefix): e.g. one a sandbox was saved to.
    pub snapshot: Option<String>,
    /// Egress policy, as `dough up --net` takes it: `none`, `nat`, or
    /// `allow=RULE,...` (host names, `*.domain`, CIDRs, optional `:PORT`).
    pub net: Option<String>,
    /// Guest memory in MiB.
    pub memory_mib: Option<u32>,
    /// Guest vCPUs.
    pub vcpus: Option<u32>,
    /// The writable layer: a size (`8G`, `512M`) or `none` (RAM).
    pub scratch: Option<String>,
    /// Destroy the sandbox this many seconds after it was created.
    pub ttl_secs: Option<u64>,
}

/// Where a sandbox is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum SandboxState {
    /// Its VM is up (see `vm_state`: running or paused).
    Live,
    /// Deleted through the API, or its TTL ran out.
    Deleted,
    /// Its VM stopped on its own, or was removed behind the daemon's back.
    Dead,
}

/// A sandbox.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct Sandbox {
    pub id: String,
    pub state: SandboxState,
    /// The VM's own state while live (`running`, `paused`, ...).
    pub vm_state: Option<String>,
    /// The snapshot it was restored from.
    pub snapshot: String,
    pub image: String,
    /// Its egress policy.
    pub net: String,
    pub memory_mib: u32,
    pub vcpus: u32,
    /// Unix seconds.
    pub created_at: i64,
    /// When its TTL runs out (unix seconds).
    pub expires_at: Option<i64>,
    pub ended_at: Option<i64>,
    /// Why it ended.
    pub ended_why: Option<String>,
}

/// `POST /v1/sandboxes/{id}/exec`: a command to run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ExecBody {
    /// The program and its arguments.
    pub argv: Vec<String>,
    /// Environment variables (on top of the sandbox's own).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory (default /root).
    pub cwd: Option<String>,
    /// Kill the command after this many seconds (exit code 124).
    pub timeout_secs: Option<f64>,
    /// Its stdin, as text.
    pub stdin: Option<String>,
    /// Its stdin, as base64 (for bytes that are not text).
    pub stdin_b64: Option<String>,
}

/// Event `start` of an exec stream: the id to signal it by.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct ExecStart {
    pub exec_id: String,
}

/// Events `stdout` and `stderr`: output as it came, base64.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct ExecOutput {
    pub data: String,
}

/// Event `exit`: how the command ended (always the last event).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct ExecExit {
    /// As a shell reports it: the exit code, 128+N for signal N, 124 for
    /// a timeout, 127 when it could not be started.
    pub exit_code: i32,
    /// The signal that killed it.
    pub signal: Option<i32>,
    pub timed_out: bool,
    /// Why it could not be started.
    pub spawn_error: Option<String>,
}

/// `POST /v1/sandboxes/{id}/execs/{exec_id}/signal`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SignalBody {
    /// A signal number (15: SIGTERM, 9: SIGKILL, 2: SIGINT).
    pub signal: i32,
}

/// A signal was sent to the command (or queued to follow it, if it had
/// not started yet).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct Signalled {
    pub delivered: bool,
}

/// Every error: `{"error": {"code": ..., "message": ...}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct ErrorBody {
    pub error: ErrorInfo,
}

/// A stable code (for programs) and a message (for people).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct ErrorInfo {
    /// One of: `unauthorized`, `bad_request`, `not_found`, `conflict`,
    /// `too_large`, `method_not_allowed`, `unavailable`, `internal`.
    pub code: String,
    pub message: String,
}

/// `GET /v1/health`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct Health {
    /// `ok`.
    pub status: String,
    /// Sandboxes live now.
    pub sandboxes: u64,
}

/// `GET /v1/version`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct Version {
    /// dough's version.
    pub version: String,
    /// The API's version.
    pub api: u32,
}

/// What a path in a sandbox is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    Other,
}

/// `GET /v1/sandboxes/{id}/stat`: a path, and a directory's entries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct FileStat {
    pub path: String,
    pub kind: FileKind,
    pub size: u64,
    /// Permission bits.
    pub mode: u32,
    /// Last modification, unix seconds.
    pub mtime: i64,
    /// A directory's entries (at most the daemon's listing limit).
    pub entries: Option<Vec<DirEntry>>,
}

/// One entry of a directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct DirEntry {
    pub name: String,
    pub kind: FileKind,
    pub size: u64,
    pub mode: u32,
    pub mtime: i64,
}

/// `PUT /v1/sandboxes/{id}/files`: what was written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct Uploaded {
    pub path: String,
    pub bytes: u64,
}

/// `POST /v1/runs`: run a plan (`dough go`) in the daemon.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateRun {
    /// The plan file, an absolute path on the daemon's host.
    pub plan: String,
    /// Run it on this repository (absolute path on the daemon's host)
    /// instead of the plan's own `repo`.
    pub repo: Option<String>,
    /// The run's id (default: the UTC time and a random suffix); its
    /// branch is `dough/<id>`.
    pub run_id: Option<String>,
}

/// Where a run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    Running,
    /// Every task green.
    Green,
    /// Ended with some task not green.
    Finished,
    /// Stopped by an error (see `error`).
    Failed,
    Cancelled,
}

/// A run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct Run {
    pub id: String,
    pub state: RunState,
    pub plan: String,
    pub repo: Option<String>,
    /// `dough/<id>`.
    pub branch: String,
    pub created_at: i64,
    pub ended_at: Option<i64>,
    /// Tasks that finished so far (all of them once the run ended).
    pub tasks: Vec<RunTask>,
    /// How many times the daemon resumed it after being stopped.
    pub resumed: u32,
    pub error: Option<String>,
}

/// A task of a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct RunTask {
    pub id: String,
    /// `green`, `failed`, `blocked`, or `pending` (green, waiting for its
    /// round to be stacked).
    pub outcome: String,
    /// Its commit on the branch, once stacked.
    pub commit: Option<String>,
    pub attempts: u32,
}

/// Event `event` of a run's stream (`end`, last, carries `RunEnd`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct RunEvent {
    /// Its place in the run's log: ask for `?after=SEQ` to go on from it.
    pub seq: i64,
    /// Seconds since the run (or its last resumption) started.
    pub t: f64,
    pub task: String,
    pub attempt: u32,
    pub what: String,
}

/// Event `end`: the run is over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct RunEnd {
    pub state: RunState,
}
