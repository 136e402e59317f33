//! Messages exchanged between the dough host and the guest agent, and the
//! framing that carries them over a byte stream (virtio-serial or vsock).
//!
//! This crate does no I/O of its own beyond generic [`std::io::Read`] /
//! [`std::io::Write`] helpers. The guest is untrusted: every decoder here
//! returns an error on hostile input, never panics, and never allocates more
//! than [`MAX_FRAME`] bytes for one frame.
//!
//! Wire format: each frame is a 4-byte big-endian payload length followed by
//! that many bytes of [postcard]-encoded message. A length above
//! [`MAX_FRAME`] is rejected before anything is allocated.

use serde::{Deserialize, Serialize};

mod frame;
pub use frame::{encode, read_frame, write_frame, FrameDecoder, FrameError, HEADER_LEN, MAX_FRAME};

/// Protocol version. Bumped on any incompatible change to the messages.
pub const PROTO_VERSION: u32 = 2;

/// Name of the virtio-serial port the agent looks for under
/// `/sys/class/virtio-ports/*/name`.
pub const PORT_NAME: &str = "dough.0";

/// vsock port the agent connects to on the host (Firecracker backend).
pub const VSOCK_PORT: u32 = 1024;

/// The exact line the agent prints on the serial console once it can take work.
pub const READY_LINE: &str = "worker ready; polling for tasks";

/// Largest chunk of child output carried in one [`GuestMsg::Output`].
pub const OUTPUT_CHUNK: usize = 32 * 1024;

/// Identifier of one request, chosen by the host, unique per connection.
pub type RequestId = u64;

/// Messages sent by the guest agent to the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GuestMsg {
    /// First message on every (re)connection.
    Hello(Hello),
    /// A chunk of a child's output.
    Output {
        id: RequestId,
        stream: Stream,
        data: Vec<u8>,
    },
    /// The request finished; no more messages for this id follow.
    Exit { id: RequestId, status: ExitStatus },
    /// The request could not be served at all (bad cwd, unknown id, ...).
    Error { id: RequestId, message: String },
    /// Answer to [`HostMsg::Ping`].
    Pong { seq: u64 },
}

/// Messages sent by the host to the guest agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HostMsg {
    /// The host has just connected: the agent starts a new session (running
    /// requests of the previous one are killed) and answers with [`Hello`].
    /// Sent first on every connection, because a guest may not notice a
    /// short disconnect and so would not greet a new host by itself.
    Attach,
    /// Answer to [`Hello`]: clock, entropy and identity for this VM.
    Welcome(Welcome),
    /// Run a command.
    Exec(Exec),
    /// Send a signal to the process group of a running request.
    Signal { id: RequestId, signal: i32 },
    /// Liveness probe.
    Ping { seq: u64 },
    /// A chunk of stdin for a request sent with `stdin_follows`.
    Input { id: RequestId, data: Vec<u8> },
    /// The end of a request's streamed stdin (its stdin is closed).
    InputEnd { id: RequestId },
}

/// The guest agent's greeting, sent first on every connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub proto_version: u32,
    pub agent_version: String,
    /// The guest kernel's boot id (`/proc/sys/kernel/random/boot_id`).
    pub boot_id: String,
}

/// The host's answer to [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    pub proto_version: u32,
    /// Host wall clock, nanoseconds since the Unix epoch.
    pub host_time_ns: u64,
    /// Fresh randomness the agent feeds to the guest kernel before running anything.
    pub entropy: Entropy,
    /// The host's name for this VM.
    pub vm_id: String,
}

/// 64 bytes of host randomness (two halves, because serde derives stop at 32).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entropy([u8; 32], [u8; 32]);

impl Entropy {
    /// Wrap 64 random bytes.
    pub fn new(bytes: [u8; 64]) -> Self {
        let mut a = [0u8; 32];
        let mut b = [0u8; 32];
        a.copy_from_slice(&bytes[..32]);
        b.copy_from_slice(&bytes[32..]);
        Entropy(a, b)
    }

    /// The 64 bytes, in the order given to [`Entropy::new`].
    pub fn bytes(&self) -> [u8; 64] {
        let mut out = [0u8; 64];
        out[..32].copy_from_slice(&self.0);
        out[32..].copy_from_slice(&self.1);
        out
    }
}

impl std::fmt::Debug for Entropy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material into logs.
        f.write_str("Entropy(<64 bytes>)")
    }
}

/// A command for the guest agent to run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exec {
    pub id: RequestId,
    pub argv: Vec<String>,
    /// Extra environment on top of the agent's base environment.
    pub env: Vec<(String, String)>,
    pub cwd: Option<String>,
    /// Bytes written to the child's stdin, which is then closed. `None`: stdin is /dev/null
    /// (unless `stdin_follows`).
    pub stdin: Option<Vec<u8>>,
    /// Stdin comes in [`HostMsg::Input`] chunks after this message, ended
    /// by [`HostMsg::InputEnd`] (for input larger than one frame).
    pub stdin_follows: bool,
    /// Kill the child's process group after this many milliseconds.
    pub timeout_ms: Option<u64>,
}

/// Which output stream of the child a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// How a request ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitStatus {
    /// The child exited with this code.
    Exited(i32),
    /// The child was killed by this signal.
    Signaled(i32),
    /// The child ran past its timeout and was killed.
    TimedOut,
    /// The child could not be started.
    SpawnFailed(String),
}

impl ExitStatus {
    /// Shell-style exit code for this status: the code, 128+signal, 124 for a
    /// timeout (as `timeout(1)`), 127 when the command could not be started.
    /// The signal arithmetic saturates, so hostile values never overflow.
    pub fn shell_code(&self) -> i32 {
        match self {
            ExitStatus::Exited(c) => *c,
            // Saturating: the value comes from the untrusted guest, and a
            // plain `128 + s` would overflow (and panic in debug builds) for
            // a bogus signal number near `i32::MAX`.
            ExitStatus::Signaled(s) => 128i32.saturating_add(*s),
            ExitStatus::TimedOut => 124,
            ExitStatus::SpawnFailed(_) => 127,
        }
    }
}

/// Decode a host message from one frame payload.
///
/// Never panics, whatever the bytes, and memory use is bounded by a small
/// multiple of `payload.len()` (never by a length claimed inside the
/// payload). Bytes after the end of the message are ignored, so a newer
/// peer's message with extra trailing fields still decodes far enough for the
/// version check in [`Hello`] / [`Welcome`] to reject it cleanly.
pub fn decode_host(payload: &[u8]) -> Result<HostMsg, FrameError> {
    postcard::from_bytes(payload).map_err(FrameError::Decode)
}

/// Decode a guest message from one frame payload. Same guarantees as
/// [`decode_host`].
pub fn decode_guest(payload: &[u8]) -> Result<GuestMsg, FrameError> {
    postcard::from_bytes(payload).map_err(FrameError::Decode)
}
