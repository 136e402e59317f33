//! What gobrr needs from a clone: run a command with a deadline and capped
//! output ([`Sandbox`]), and fresh clones for agents and gates ([`Pool`]).
//! dough's binary implements both over its VMs; the tests over a script.

use std::time::Duration;

/// Why a sandbox could not do what was asked (the command's own failure is
/// an [`Exit`], not an error).
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("no clone could be made")]
    NoClone(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("the command could not be run in the clone")]
    Exec(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("the command wrote more than {limit} bytes to stdout")]
    TooMuchOutput { limit: usize },
}

impl SandboxError {
    /// The error and all its causes, on one line.
    pub fn chain(&self) -> String {
        let mut s = self.to_string();
        let mut src = std::error::Error::source(self);
        while let Some(c) = src {
            s += &format!(": {c}");
            src = c.source();
        }
        s
    }
}

/// How a command in a sandbox ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    TimedOut,
    Failed(String),
}

impl Exit {
    pub fn ok(&self) -> bool {
        *self == Exit::Code(0)
    }
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exit::Code(c) => write!(f, "exit code {c}"),
            Exit::TimedOut => f.write_str("timed out"),
            Exit::Failed(w) => write!(f, "could not run: {w}"),
        }
    }
}

/// How long a command may take when nothing else says: the guest controls
/// how long any command takes — an agent can replace `git` with `sleep` —
/// so every command has a deadline; there is no "wait forever". The plan's
/// `step_timeout_secs` bounds dough's own steps (shipping a tree, writing
/// the work order, taking the diff).
pub const STEP_TIMEOUT: Duration = Duration::from_secs(300);

/// A command for a sandbox.
#[derive(Debug, Clone)]
pub struct Cmd {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: Option<String>,
    pub stdin: Option<Vec<u8>>,
    /// Always set: [`STEP_TIMEOUT`] unless the plan says otherwise.
    pub timeout: Duration,
}

impl Default for Cmd {
    fn default() -> Self {
        Cmd {
            argv: Vec::new(),
            env: Vec::new(),
            cwd: None,
            stdin: None,
            timeout: STEP_TIMEOUT,
        }
    }
}

/// Output of a command (capped).
#[derive(Debug, Clone, Default)]
pub struct Output {
    pub exit: Option<Exit>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// One fresh clone.
pub trait Sandbox: Send {
    /// Run a command; stdout beyond `max_stdout` bytes is an error.
    fn run(&mut self, cmd: &Cmd, max_stdout: usize) -> Result<Output, SandboxError>;
    /// What went through the clone's egress gateway so far (one line per
    /// DNS query, connection or brokered request); none without egress.
    fn egress_log(&mut self) -> Vec<String> {
        Vec::new()
    }
}

/// A round's warm workspace (the plan's `setup`): one clone, prepared and
/// saved; the round's agents, and its gates when they run the agents'
/// image, are forks of it. Dropped, it is removed.
pub trait Workspace: Sync {
    /// A fork for an agent: the round's tree at [`super::REPO`], what the
    /// setup made in it, its egress and brokers as [`Pool::agent`]'s.
    fn agent(
        &self,
        egress: &str,
        brokers: &[dough_gateway::broker::Broker],
    ) -> Result<Box<dyn Sandbox>, SandboxError>;
    /// A fork for a gate (offline, never given a secret); None when gates
    /// run another image than the agents' (they then start cold).
    fn gate(&self) -> Option<Result<Box<dyn Sandbox>, SandboxError>>;
}

/// Why a round's workspace could not be made.
#[derive(Debug, thiserror::Error)]
pub enum WorkspaceError {
    /// Preparing it (shipping the tree, the setup) failed: why.
    #[error("{0}")]
    Prepare(String),
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
}

/// Where clones come from.
pub trait Pool: Sync {
    /// A clone for an agent, with the plan's egress policy; its gateway
    /// brokers `brokers` (the agent holds their placeholders).
    fn agent(
        &self,
        egress: &str,
        brokers: &[dough_gateway::broker::Broker],
    ) -> Result<Box<dyn Sandbox>, SandboxError>;
    /// A clone for a gate: egress `none`, never given a secret.
    fn gate(&self) -> Result<Box<dyn Sandbox>, SandboxError>;
    /// A round's workspace: a clone of the agents' image with `egress` (no
    /// secret), handed to `prepare`, then saved.
    fn workspace(
        &self,
        egress: &str,
        prepare: &mut dyn FnMut(&mut dyn Sandbox) -> Result<(), String>,
    ) -> Result<Box<dyn Workspace>, WorkspaceError>;
}
