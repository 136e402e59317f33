//! The host end of a VM's channel: under QEMU, the VMM's Unix socket for
//! that VM's virtio-serial port; under Firecracker, the connection its
//! agent opens over vsock, which arrives on a socket in that VM's own
//! directory. A message's sender is known by which socket it came from,
//! never by anything the guest says about itself.

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dough_proto::{
    decode_guest, read_frame, Entropy, Exec, ExitStatus, FrameError, GuestMsg, Hello, HostMsg,
    RequestId, Stream, Welcome, PROTO_VERSION,
};

#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("channel socket {path} did not accept a connection within {secs}s")]
    Connect { path: String, secs: u64 },
    #[error("the guest's agent did not connect to {path} over vsock within {secs}s")]
    NoGuestConnection { path: String, secs: u64 },
    #[error("the VMM exited while waiting for the guest's agent")]
    VmmGone,
    #[error("the guest closed the channel (the VM stopped or its agent died)")]
    Closed,
    #[error("no message from the guest within {0:?}")]
    Timeout(Duration),
    #[error("the guest did not take a message within {0:?} (it stopped reading its channel)")]
    SendTimeout(Duration),
    #[error(
        "guest agent speaks protocol {guest}, this dough speaks {PROTO_VERSION}; rebuild the image"
    )]
    Version { guest: u32 },
    #[error("expected Hello from the guest, got {0}")]
    Unexpected(String),
    #[error("the guest refused request {id}: {message}")]
    Refused { id: RequestId, message: String },
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("the channel's socket failed")]
    Io(#[from] std::io::Error),
    #[error("reading the command's input failed; the command was killed")]
    Stdin(#[source] std::io::Error),
}

/// How long [`HostChannel::attach`] waits for the first Hello before it
/// connects again: a restored or idle guest answers in well under a
/// second; a guest that has not in 3 s under load is most likely one whose
/// driver did not hear the host arrive.
pub const FIRST_ATTACH_TRY: Duration = Duration::from_secs(3);

impl ChannelError {
    fn from_write(e: std::io::Error, limit: Duration) -> Self {
        match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                ChannelError::SendTimeout(limit)
            }
            _ => ChannelError::Io(e),
        }
    }

    fn from_frame(e: FrameError) -> Self {
        match e {
            FrameError::Io(io)
                if matches!(
                    io.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                ChannelError::Timeout(Duration::ZERO)
            }
            e => ChannelError::Frame(e),
        }
    }
}

/// A command to run in the guest.
#[derive(Debug, Clone, Default)]
pub struct ExecRequest {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: Option<String>,
    pub stdin: Option<Vec<u8>>,
    pub timeout: Option<Duration>,
}

impl ExecRequest {
    /// This request with `base` variables before its own (its own win,
    /// coming last); itself when `base` is empty.
    pub fn with_base_env(&self, base: &[(String, String)]) -> std::borrow::Cow<'_, ExecRequest> {
        if base.is_empty() {
            return std::borrow::Cow::Borrowed(self);
        }
        let mut r = self.clone();
        r.env = base.iter().cloned().chain(r.env).collect();
        std::borrow::Cow::Owned(r)
    }
}

/// Stdin up to this size travels inside the Exec message; more is sent in
/// chunks of this size.
pub const INLINE_STDIN: usize = 256 << 10;

/// How long past a request's own timeout the host waits for the guest to
/// report it, before calling the guest unresponsive.
const TIMEOUT_GRACE: Duration = Duration::from_secs(30);

/// The most one message to the guest may take to write, when the request
/// has no sooner deadline: a guest that stops reading its channel cannot
/// hold the host.
const SEND_LIMIT: Duration = Duration::from_secs(30);

/// One absolute deadline over a stream: before every read or write the
/// socket's timeout is set to the time that is left, so a guest that
/// trickles a frame a byte at a time cannot stretch the wait past it.
struct DeadlineIo<'a> {
    stream: &'a UnixStream,
    deadline: Option<Instant>,
}

impl DeadlineIo<'_> {
    fn arm(
        &self,
        set: impl Fn(&UnixStream, Option<Duration>) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        let left = match self.deadline {
            None => None,
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(std::io::ErrorKind::TimedOut.into());
                }
                Some(left)
            }
        };
        set(self.stream, left)
    }
}

impl std::io::Read for DeadlineIo<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.arm(UnixStream::set_read_timeout)?;
        (&mut &*self.stream).read(buf)
    }
}

impl Write for DeadlineIo<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.arm(UnixStream::set_write_timeout)?;
        (&mut &*self.stream).write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Sends signals to the command a [`HostChannel`] is running, from any
/// thread ([`HostChannel::signaller`]).
#[derive(Debug)]
pub struct Signaller {
    stream: UnixStream,
    write_lock: Arc<Mutex<()>>,
    current: Arc<AtomicU64>,
    pending: Arc<AtomicI32>,
    signalled: Arc<AtomicU64>,
    send_limit: Duration,
}

impl Signaller {
    /// Send `signal` to the command's process group; asked for before
    /// the command went out, it follows it.
    pub fn signal(&self, signal: i32) -> Result<(), ChannelError> {
        let _w = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        let id = self.current.load(Ordering::SeqCst);
        if id == 0 {
            self.pending.store(signal, Ordering::SeqCst);
            return Ok(());
        }
        let frame = dough_proto::encode(&HostMsg::Signal { id, signal })?;
        self.signalled.store(id, Ordering::SeqCst);
        let mut io = DeadlineIo {
            stream: &self.stream,
            deadline: Some(Instant::now() + self.send_limit),
        };
        io.write_all(&frame)
            .map_err(|e| ChannelError::from_write(e, self.send_limit))?;
        Ok(())
    }
}

#[derive(Debug)]
pub struct HostChannel {
    stream: UnixStream,
    /// Held while a frame is written, by this channel and its
    /// [`Signaller`]s (which write on a clone of the stream).
    write_lock: Arc<Mutex<()>>,
    /// The request [`HostChannel::exec`] is running (0: none), set once
    /// its Exec frame is out.
    current: Arc<AtomicU64>,
    /// A signal asked for before that: sent right after the Exec frame.
    pending: Arc<AtomicI32>,
    /// The last request a [`Signaller`] signalled: an older agent answers
    /// a signal that raced the command's start with an Error, which is
    /// then no reason to fail the request.
    signalled: Arc<AtomicU64>,
    next_id: RequestId,
    /// Guest messages ignored because they made no sense (rate-limits warnings).
    ignored: u64,
    /// [`SEND_LIMIT`] and [`TIMEOUT_GRACE`] (tests shorten them).
    send_limit: Duration,
    grace: Duration,
}

impl HostChannel {
    /// Connect to the VMM's socket for this VM's port, retrying until `deadline`.
    pub fn connect(path: &Path, limit: Duration) -> Result<HostChannel, ChannelError> {
        let start = Instant::now();
        loop {
            match UnixStream::connect(path) {
                Ok(stream) => {
                    return Ok(HostChannel {
                        stream,
                        write_lock: Arc::default(),
                        current: Arc::default(),
                        pending: Arc::default(),
                        signalled: Arc::default(),
                        next_id: 1,
                        ignored: 0,
                        send_limit: SEND_LIMIT,
                        grace: TIMEOUT_GRACE,
                    })
                }
                Err(_) if start.elapsed() < limit => std::thread::sleep(Duration::from_millis(10)),
                Err(_) => {
                    return Err(ChannelError::Connect {
                        path: path.display().to_string(),
                        secs: limit.as_secs(),
                    })
                }
            }
        }
    }

    /// A channel over an already connected stream (e.g. a guest-initiated
    /// vsock connection accepted on Firecracker's `<uds>_<port>` socket).
    pub fn from_stream(stream: UnixStream) -> HostChannel {
        HostChannel {
            stream,
            write_lock: Arc::default(),
            current: Arc::default(),
            pending: Arc::default(),
            signalled: Arc::default(),
            next_id: 1,
            ignored: 0,
            send_limit: SEND_LIMIT,
            grace: TIMEOUT_GRACE,
        }
    }

    /// Connect to guest vsock `port` through Firecracker's hybrid vsock
    /// socket `uds`: send `CONNECT <port>\n`, expect `OK <host port>\n`.
    pub fn connect_vsock(
        uds: &Path,
        port: u32,
        limit: Duration,
    ) -> Result<HostChannel, ChannelError> {
        let deadline = Instant::now() + limit;
        let ch = HostChannel::connect(uds, limit)?;
        let mut s = DeadlineIo {
            stream: &ch.stream,
            deadline: Some(deadline),
        };
        s.write_all(format!("CONNECT {port}\n").as_bytes())
            .map_err(|e| ChannelError::from_write(e, limit))?;
        // Read the reply byte by byte: what follows it is the guest's data.
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while line.len() < 64 {
            match std::io::Read::read(&mut s, &mut b) {
                Ok(0) => return Err(ChannelError::Closed),
                Ok(_) if b[0] == b'\n' => break,
                Ok(_) => line.push(b[0]),
                Err(e) => {
                    return Err(match ChannelError::from_frame(FrameError::Io(e)) {
                        ChannelError::Timeout(_) => ChannelError::Timeout(limit),
                        e => e,
                    })
                }
            }
        }
        let reply = String::from_utf8_lossy(&line).into_owned();
        let ok = reply
            .strip_prefix("OK ")
            .is_some_and(|n| n.trim().parse::<u32>().is_ok());
        if !ok {
            return Err(ChannelError::Unexpected(format!(
                "vsock CONNECT {port} answered {reply:?}"
            )));
        }
        Ok(ch)
    }

    /// The next message, by `deadline` (none: wait as long as it takes);
    /// `limit` is what a timeout reports.
    fn recv(
        &mut self,
        deadline: Option<Instant>,
        limit: Duration,
    ) -> Result<GuestMsg, ChannelError> {
        let mut io = DeadlineIo {
            stream: &self.stream,
            deadline,
        };
        match read_frame(&mut io) {
            Ok(Some(payload)) => Ok(decode_guest(&payload)?),
            Ok(None) => Err(ChannelError::Closed),
            Err(e) => Err(match ChannelError::from_frame(e) {
                ChannelError::Timeout(_) => ChannelError::Timeout(limit),
                e => e,
            }),
        }
    }

    /// Write one message by `deadline`, and at most within [`SEND_LIMIT`].
    fn send(&mut self, msg: &HostMsg, deadline: Option<Instant>) -> Result<(), ChannelError> {
        let frame = dough_proto::encode(msg)?;
        let own = Instant::now() + self.send_limit;
        let deadline = deadline.map_or(own, |d| d.min(own));
        let _w = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut io = DeadlineIo {
            stream: &self.stream,
            deadline: Some(deadline),
        };
        io.write_all(&frame)
            .map_err(|e| ChannelError::from_write(e, self.send_limit))
    }

    /// A handle that can signal the command [`HostChannel::exec`] is
    /// running, from another thread (e.g. when whoever asked for it went
    /// away).
    pub fn signaller(&self) -> std::io::Result<Signaller> {
        Ok(Signaller {
            stream: self.stream.try_clone()?,
            write_lock: self.write_lock.clone(),
            current: self.current.clone(),
            pending: self.pending.clone(),
            signalled: self.signalled.clone(),
            send_limit: self.send_limit,
        })
    }

    /// Wait for the guest's Hello and answer with a Welcome carrying the
    /// host clock, fresh entropy and the VM's id.
    pub fn handshake(&mut self, vm_id: &str, limit: Duration) -> Result<Hello, ChannelError> {
        // Ask for a Hello. The guest greets only when asked: it may not
        // even have noticed that a previous host left.
        let deadline = Some(Instant::now() + limit);
        self.send(&HostMsg::Attach, deadline)?;
        let hello = loop {
            match self.recv(deadline, limit)? {
                GuestMsg::Hello(h) => break h,
                // Late replies of an earlier session.
                GuestMsg::Output { .. } | GuestMsg::Exit { .. } | GuestMsg::Pong { .. } => {}
                other => {
                    return Err(ChannelError::Unexpected(
                        format!("{other:?}").chars().take(100).collect(),
                    ))
                }
            }
        };
        if hello.proto_version != PROTO_VERSION {
            return Err(ChannelError::Version {
                guest: hello.proto_version,
            });
        }
        let mut entropy = [0u8; 64];
        crate::fill_random(&mut entropy);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        self.send(
            &HostMsg::Welcome(Welcome {
                proto_version: PROTO_VERSION,
                host_time_ns: now.as_nanos() as u64,
                entropy: Entropy::new(entropy),
                vm_id: vm_id.to_string(),
            }),
            deadline,
        )?;
        Ok(hello)
    }

    /// Open a channel with `open` and handshake, all within `limit` (see
    /// [`FIRST_ATTACH_TRY`]). A guest
    /// that has not answered the `Attach` after `first_try` is asked again
    /// on a fresh connection (then after twice that, and so on; the last
    /// try gets what is left): the agent sleeps until its driver says a host
    /// arrived, and under load that word has been seen not to come (about
    /// one connect in a few hundred waited the whole 30 s), while a host
    /// that leaves and comes back always wakes it. A slow guest loses
    /// nothing by it: its session starts again.
    pub fn attach(
        open: &mut dyn FnMut(Duration) -> Result<HostChannel, ChannelError>,
        vm_id: &str,
        limit: Duration,
        first_try: Duration,
    ) -> Result<(HostChannel, Hello), ChannelError> {
        let end = Instant::now() + limit;
        let mut try_for = first_try;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            let mut ch = open(left)?;
            let left = end.saturating_duration_since(Instant::now());
            // Another try only if there will be time for a longer one.
            let this = if left > try_for * 3 { try_for } else { left };
            match ch.handshake(vm_id, this) {
                Ok(hello) => return Ok((ch, hello)),
                Err(ChannelError::Timeout(_)) if this < left => {
                    tracing::debug!(vm = vm_id, "no Hello within {this:?}; connecting again");
                    ch.shutdown();
                    try_for *= 2;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Run a command; `sink` receives its output as it arrives.
    pub fn exec(
        &mut self,
        req: &ExecRequest,
        sink: &mut dyn FnMut(Stream, &[u8]),
    ) -> Result<ExitStatus, ChannelError> {
        self.exec_from(req, None, sink)
    }

    /// [`HostChannel::exec`], with the command's stdin read from `stdin`
    /// (instead of `req.stdin`) and sent in chunks as it is read: nothing
    /// is held whole. A read error ends the request: the command is killed
    /// and the error returned.
    pub fn exec_from(
        &mut self,
        req: &ExecRequest,
        stdin: Option<&mut dyn std::io::Read>,
        sink: &mut dyn FnMut(Stream, &[u8]),
    ) -> Result<ExitStatus, ChannelError> {
        let id = self.next_id;
        self.next_id += 1;
        let r = self.exec_id(id, req, stdin, sink);
        self.current.store(0, Ordering::SeqCst);
        self.pending.store(0, Ordering::SeqCst);
        r
    }

    fn exec_id(
        &mut self,
        id: RequestId,
        req: &ExecRequest,
        reader: Option<&mut dyn std::io::Read>,
        sink: &mut dyn FnMut(Stream, &[u8]),
    ) -> Result<ExitStatus, ChannelError> {
        // One deadline for the whole request: sending it, its stdin, and
        // every message of its output.
        let limit = req.timeout.map(|t| t + self.grace);
        let deadline = limit.map(|l| Instant::now() + l);
        // Small stdin rides in the Exec frame; larger is streamed in chunks
        // that each fit a frame.
        let stream_stdin =
            reader.is_some() || req.stdin.as_ref().is_some_and(|d| d.len() > INLINE_STDIN);
        self.send(
            &HostMsg::Exec(Exec {
                id,
                argv: req.argv.clone(),
                env: req.env.clone(),
                cwd: req.cwd.clone(),
                stdin: if stream_stdin {
                    None
                } else {
                    req.stdin.clone()
                },
                stdin_follows: stream_stdin,
                timeout_ms: req.timeout.map(|t| t.as_millis() as u64),
            }),
            deadline,
        )?;
        // From now on a signal goes straight out; one asked for before
        // follows the Exec frame (the lock orders it against `signal`).
        let queued = {
            let _w = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
            self.current.store(id, Ordering::SeqCst);
            self.pending.swap(0, Ordering::SeqCst)
        };
        if queued != 0 {
            self.signalled.store(id, Ordering::SeqCst);
            self.send(&HostMsg::Signal { id, signal: queued }, deadline)?;
        }
        if let Some(reader) = reader {
            let mut buf = vec![0u8; INLINE_STDIN];
            loop {
                let n = match reader.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        let _ = self.send(&HostMsg::Signal { id, signal: 9 }, deadline);
                        // Close only once the agent has read all we sent:
                        // QEMU drops what it had not yet passed on when a
                        // connection closes, and half a frame left in the
                        // guest garbles the next connection's first ones.
                        let _ = self.ping(u64::MAX, Duration::from_secs(10));
                        return Err(ChannelError::Stdin(e));
                    }
                };
                self.send(
                    &HostMsg::Input {
                        id,
                        data: buf[..n].to_vec(),
                    },
                    deadline,
                )?;
            }
            self.send(&HostMsg::InputEnd { id }, deadline)?;
        } else if stream_stdin {
            for chunk in req
                .stdin
                .as_deref()
                .unwrap_or_default()
                .chunks(INLINE_STDIN)
            {
                self.send(
                    &HostMsg::Input {
                        id,
                        data: chunk.to_vec(),
                    },
                    deadline,
                )?;
            }
            self.send(&HostMsg::InputEnd { id }, deadline)?;
        }
        loop {
            match self.recv(deadline, limit.unwrap_or_default())? {
                GuestMsg::Output {
                    id: got,
                    stream,
                    data,
                } if got == id => sink(stream, &data),
                GuestMsg::Exit { id: got, status } if got == id => return Ok(status),
                GuestMsg::Error { id: got, message } if got == id => {
                    if self.signalled.load(Ordering::SeqCst) == id {
                        tracing::debug!("request {id}: the guest says of a signal: {message:.100}");
                        continue;
                    }
                    return Err(ChannelError::Refused { id, message });
                }
                other => {
                    self.ignored += 1;
                    if self.ignored.is_power_of_two() {
                        tracing::warn!(
                            count = self.ignored,
                            "ignoring unexpected guest message: {:.100}",
                            format!("{other:?}")
                        );
                    }
                }
            }
        }
    }

    /// Close the connection (the VMM accepts one connection at a time).
    pub fn shutdown(&self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }

    /// Round trip a Ping.
    pub fn ping(&mut self, seq: u64, limit: Duration) -> Result<(), ChannelError> {
        let deadline = Some(Instant::now() + limit);
        self.send(&HostMsg::Ping { seq }, deadline)?;
        loop {
            if let GuestMsg::Pong { seq: s } = self.recv(deadline, limit)? {
                if s == seq {
                    return Ok(());
                }
            }
        }
    }
}

/// Where Firecracker delivers guest-initiated vsock connections to host
/// `port`: a Unix socket the host listens on, `<uds>_<port>`.
pub fn vsock_listen_path(uds: &Path, port: u32) -> std::path::PathBuf {
    let mut p = uds.as_os_str().to_owned();
    p.push(format!("_{port}"));
    p.into()
}

/// The host's end of guest-initiated vsock connections to one port: a
/// Unix socket at `<uds>_<port>`, where Firecracker delivers them. It is
/// bound before the guest may connect (before boot, before a restore, or
/// while an idle agent keeps retrying) and removed when dropped, so an
/// agent that reconnects later finds nobody listening until the next
/// host comes.
#[derive(Debug)]
pub struct VsockListener {
    listener: UnixListener,
    path: PathBuf,
}

impl VsockListener {
    /// Listen on `<uds>_<port>`, replacing a socket file a dead host left.
    pub fn bind(uds: &Path, port: u32) -> std::io::Result<VsockListener> {
        let path = vsock_listen_path(uds, port);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let listener = UnixListener::bind(&path)?;
        listener.set_nonblocking(true)?;
        Ok(VsockListener { listener, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Wait up to `limit` for the guest's connection, asking `vmm_gone`
    /// between polls so that a dead VMM is reported at once. The listener
    /// goes away with `self`.
    pub fn accept(
        self,
        limit: Duration,
        vmm_gone: &mut dyn FnMut() -> bool,
    ) -> Result<HostChannel, ChannelError> {
        let start = Instant::now();
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    stream.set_nonblocking(false)?;
                    return Ok(HostChannel::from_stream(stream));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e.into()),
            }
            if vmm_gone() {
                return Err(ChannelError::VmmGone);
            }
            if start.elapsed() >= limit {
                return Err(ChannelError::NoGuestConnection {
                    path: self.path.display().to_string(),
                    secs: limit.as_secs(),
                });
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

impl Drop for VsockListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dough_proto::{decode_host, write_frame};
    use std::os::unix::net::UnixListener;

    /// A fake guest on the other end of a socket pair, driven by `script`.
    fn with_guest(script: impl FnOnce(UnixStream) + Send + 'static) -> HostChannel {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("ch.sock");
        let l = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            script(s);
            drop(d);
        });
        HostChannel::connect(&path, Duration::from_secs(5)).unwrap()
    }

    fn hello(v: u32) -> GuestMsg {
        GuestMsg::Hello(Hello {
            proto_version: v,
            agent_version: "t".into(),
            boot_id: "b".into(),
        })
    }

    /// The next host message other than `Attach`.
    fn next_host(s: &mut UnixStream) -> HostMsg {
        loop {
            match decode_host(&read_frame(s).unwrap().unwrap()).unwrap() {
                HostMsg::Attach => continue,
                m => return m,
            }
        }
    }

    /// A guest that never answers the first connection's `Attach` (its
    /// driver never told it the host came) answers on the next one, within
    /// the same deadline.
    #[test]
    fn attach_asks_again_on_a_fresh_connection() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("ch.sock");
        let l = UnixListener::bind(&path).unwrap();
        let guest = std::thread::spawn(move || {
            // First host: its Attach is read and never answered.
            let (mut first, _) = l.accept().unwrap();
            assert_eq!(
                decode_host(&read_frame(&mut first).unwrap().unwrap()).unwrap(),
                HostMsg::Attach
            );
            // Second host: greeted.
            let (mut s, _) = l.accept().unwrap();
            assert_eq!(
                decode_host(&read_frame(&mut s).unwrap().unwrap()).unwrap(),
                HostMsg::Attach
            );
            write_frame(&mut s, &hello(PROTO_VERSION)).unwrap();
            assert!(matches!(next_host(&mut s), HostMsg::Welcome(_)));
            // The first connection was closed by the host.
            assert!(read_frame(&mut first).unwrap().is_none());
        });
        let (r, opened) =
            attach_counting(&path, Duration::from_secs(20), Duration::from_millis(300));
        let (_ch, hello) = r.unwrap();
        assert_eq!((hello.boot_id.as_str(), opened), ("b", 2));
        guest.join().unwrap();
    }

    /// [`HostChannel::attach`] to the socket at `path`, counting the
    /// connections it opens.
    fn attach_counting(
        path: &Path,
        limit: Duration,
        first_try: Duration,
    ) -> (Result<(HostChannel, Hello), ChannelError>, usize) {
        let mut opened = 0;
        let r = HostChannel::attach(
            &mut |left| {
                opened += 1;
                HostChannel::connect(path, left)
            },
            "vm",
            limit,
            first_try,
        );
        (r, opened)
    }

    /// A guest that answers nothing at all: the whole limit, then the
    /// timeout (no endless reconnecting).
    #[test]
    fn attach_gives_up_at_the_limit() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("ch.sock");
        let l = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for s in l.incoming() {
                held.push(s);
            }
        });
        let (r, opened) =
            attach_counting(&path, Duration::from_secs(2), Duration::from_millis(100));
        assert!(matches!(r, Err(ChannelError::Timeout(_))), "{r:?}");
        // 0.1 + 0.2 + 0.4 s, then the rest (3 x 0.8 s is not left).
        assert!((2..=4).contains(&opened), "{opened} connections");
    }

    #[test]
    fn handshake_asks_for_hello_and_skips_stale_replies() {
        let mut ch = with_guest(|mut s| {
            let first = decode_host(&read_frame(&mut s).unwrap().unwrap()).unwrap();
            assert_eq!(first, HostMsg::Attach);
            // Leftovers of an earlier session, then the greeting.
            let stale = GuestMsg::Exit {
                id: 4,
                status: ExitStatus::Exited(0),
            };
            write_frame(&mut s, &stale).unwrap();
            write_frame(&mut s, &hello(PROTO_VERSION)).unwrap();
            assert!(matches!(next_host(&mut s), HostMsg::Welcome(_)));
        });
        let h = ch.handshake("vm", Duration::from_secs(5)).unwrap();
        assert_eq!(h.boot_id, "b");
    }

    #[test]
    fn handshake_then_exec_routes_output_by_id() {
        let mut ch = with_guest(|mut s| {
            write_frame(&mut s, &hello(PROTO_VERSION)).unwrap();
            let HostMsg::Welcome(w) = next_host(&mut s) else {
                panic!("want Welcome")
            };
            assert_eq!(w.vm_id, "vm-test");
            assert_ne!(w.entropy.bytes(), [0u8; 64]);
            let HostMsg::Exec(e) = next_host(&mut s) else {
                panic!("want Exec")
            };
            assert_eq!(e.argv, ["echo", "hi"]);
            write_frame(
                &mut s,
                &GuestMsg::Output {
                    id: e.id + 7,
                    stream: Stream::Stdout,
                    data: b"stray".to_vec(),
                },
            )
            .unwrap();
            write_frame(&mut s, &GuestMsg::Pong { seq: 99 }).unwrap();
            write_frame(
                &mut s,
                &GuestMsg::Output {
                    id: e.id,
                    stream: Stream::Stdout,
                    data: b"hi\n".to_vec(),
                },
            )
            .unwrap();
            write_frame(
                &mut s,
                &GuestMsg::Output {
                    id: e.id,
                    stream: Stream::Stderr,
                    data: b"err".to_vec(),
                },
            )
            .unwrap();
            write_frame(
                &mut s,
                &GuestMsg::Exit {
                    id: e.id,
                    status: ExitStatus::Exited(3),
                },
            )
            .unwrap();
        });
        ch.handshake("vm-test", Duration::from_secs(5)).unwrap();
        let mut out = Vec::new();
        let mut err = Vec::new();
        let req = ExecRequest {
            argv: vec!["echo".into(), "hi".into()],
            ..Default::default()
        };
        let st = ch
            .exec(&req, &mut |s, d| match s {
                Stream::Stdout => out.extend_from_slice(d),
                Stream::Stderr => err.extend_from_slice(d),
            })
            .unwrap();
        assert_eq!(st, ExitStatus::Exited(3));
        assert_eq!(out, b"hi\n");
        assert_eq!(err, b"err");
    }

    #[test]
    fn version_mismatch_is_refused() {
        let mut ch = with_guest(|mut s| {
            write_frame(&mut s, &hello(PROTO_VERSION + 1)).unwrap();
            std::thread::sleep(Duration::from_millis(200));
        });
        let e = ch.handshake("vm", Duration::from_secs(5)).unwrap_err();
        assert!(matches!(e, ChannelError::Version { .. }), "{e}");
    }

    /// A guest that trickles a frame a byte at a time — each byte well
    /// within any per-read timeout — cannot stretch a wait past its one
    /// deadline: not the handshake's, not an exec's.
    #[test]
    fn trickled_frames_cannot_outlast_the_deadline() {
        fn trickle(mut s: UnixStream, msg: GuestMsg) {
            let _ = read_frame(&mut s); // the Attach or the Exec
            let mut frame = Vec::new();
            write_frame(&mut frame, &msg).unwrap();
            for b in frame {
                if s.write_all(&[b]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let slow_hello = GuestMsg::Hello(Hello {
            proto_version: PROTO_VERSION,
            agent_version: "x".repeat(200),
            boot_id: "b".into(),
        });
        let mut ch = with_guest(move |s| trickle(s, slow_hello));
        let r = ch.handshake("vm", Duration::from_millis(300));
        assert!(matches!(r, Err(ChannelError::Timeout(_))), "{r:?}");

        let slow_output = GuestMsg::Output {
            id: 1,
            stream: Stream::Stdout,
            data: vec![b'x'; 200],
        };
        let mut ch = with_guest(move |s| trickle(s, slow_output));
        ch.grace = Duration::ZERO;
        let req = ExecRequest {
            argv: vec!["true".into()],
            timeout: Some(Duration::from_millis(300)),
            ..Default::default()
        };
        let r = ch.exec(&req, &mut |_, _| {});
        assert!(matches!(r, Err(ChannelError::Timeout(_))), "{r:?}");
    }

    /// A guest that never reads its channel cannot block the host's
    /// writes: they end with a clear error.
    #[test]
    fn a_guest_that_stops_reading_cannot_block_writes() {
        let mut ch = with_guest(|_s| std::thread::sleep(Duration::from_secs(30)));
        ch.send_limit = Duration::from_millis(300);
        let req = ExecRequest {
            argv: vec!["cat".into()],
            stdin: Some(vec![0u8; 16 << 20]),
            ..Default::default()
        };
        let r = ch.exec(&req, &mut |_, _| {});
        assert!(matches!(r, Err(ChannelError::SendTimeout(_))), "{r:?}");
    }

    #[test]
    fn hostile_guest_gets_errors_not_panics() {
        // Oversized length prefix.
        let mut ch = with_guest(|mut s| {
            s.write_all(&u32::MAX.to_be_bytes()).unwrap();
            std::thread::sleep(Duration::from_millis(200));
        });
        assert!(matches!(
            ch.handshake("vm", Duration::from_secs(5)),
            Err(ChannelError::Frame(FrameError::TooLarge(_)))
        ));
        // Garbage payload.
        let mut ch = with_guest(|mut s| {
            s.write_all(&[0, 0, 0, 3, 0xff, 0xff, 0xff]).unwrap();
            std::thread::sleep(Duration::from_millis(200));
        });
        assert!(matches!(
            ch.handshake("vm", Duration::from_secs(5)),
            Err(ChannelError::Frame(FrameError::Decode(_)))
        ));
        // Silence, then close mid-frame.
        let mut ch = with_guest(|mut s| {
            let _ = read_frame(&mut s); // the Attach
            s.write_all(&[0, 0, 0, 50, 1, 2]).unwrap();
        });
        assert!(matches!(
            ch.handshake("vm", Duration::from_secs(5)),
            Err(ChannelError::Frame(FrameError::Truncated { .. }))
        ));
        // Nothing at all within the deadline.
        let mut ch = with_guest(|_s| std::thread::sleep(Duration::from_secs(2)));
        assert!(matches!(
            ch.handshake("vm", Duration::from_millis(100)),
            Err(ChannelError::Timeout(_))
        ));
    }

    #[test]
    fn refusal_and_closed_channel_are_errors() {
        let mut ch = with_guest(|mut s| {
            write_frame(&mut s, &hello(PROTO_VERSION)).unwrap();
            let _ = next_host(&mut s);
            let HostMsg::Exec(e) = next_host(&mut s) else {
                panic!()
            };
            write_frame(
                &mut s,
                &GuestMsg::Error {
                    id: e.id,
                    message: "no".into(),
                },
            )
            .unwrap();
            let _ = next_host(&mut s);
        });
        ch.handshake("vm", Duration::from_secs(5)).unwrap();
        let req = ExecRequest {
            argv: vec!["x".into()],
            ..Default::default()
        };
        assert!(matches!(
            ch.exec(&req, &mut |_, _| {}),
            Err(ChannelError::Refused { .. })
        ));
        assert!(matches!(
            ch.exec(&req, &mut |_, _| {}),
            Err(ChannelError::Closed)
        ));
    }

    /// A fake of Firecracker's vsock muxer: answers `CONNECT <port>` with
    /// `OK <n>` (or refuses), then plays a guest agent that greets.
    fn fake_muxer(uds: &Path, answer: &'static str) {
        let l = UnixListener::bind(uds).unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut line = Vec::new();
            let mut b = [0u8; 1];
            while std::io::Read::read(&mut s, &mut b).unwrap() == 1 && b[0] != b'\n' {
                line.push(b[0]);
            }
            assert_eq!(line, b"CONNECT 1024");
            s.write_all(answer.as_bytes()).unwrap();
            if answer.starts_with("OK") {
                // Attach, then our Hello, then the Welcome.
                let _ = read_frame(&mut s).unwrap();
                write_frame(&mut s, &hello(PROTO_VERSION)).unwrap();
                let _ = next_host(&mut s);
            }
        });
    }

    #[test]
    fn host_initiated_vsock_connects_through_the_muxer() {
        let d = tempfile::tempdir().unwrap();
        let uds = d.path().join("v.sock");
        fake_muxer(&uds, "OK 1073741824\n");
        let mut ch = HostChannel::connect_vsock(&uds, 1024, Duration::from_secs(5)).unwrap();
        assert_eq!(
            ch.handshake("vm-1", Duration::from_secs(5))
                .unwrap()
                .proto_version,
            PROTO_VERSION
        );

        let uds2 = d.path().join("v2.sock");
        fake_muxer(&uds2, "FAILURE\n");
        let e = HostChannel::connect_vsock(&uds2, 1024, Duration::from_secs(5)).unwrap_err();
        assert!(e.to_string().contains("answered \"FAILURE\""), "{e}");
    }

    #[test]
    fn guest_initiated_vsock_lands_on_uds_underscore_port() {
        let d = tempfile::tempdir().unwrap();
        let uds = d.path().join("v.sock");
        let listen = vsock_listen_path(&uds, 1024);
        assert_eq!(listen, d.path().join("v.sock_1024"));
        let l = UnixListener::bind(&listen).unwrap();
        // The "guest" (Firecracker forwarding its connection) connects.
        let guest = std::thread::spawn(move || {
            let mut s = UnixStream::connect(&listen).unwrap();
            let _ = read_frame(&mut s).unwrap();
            write_frame(&mut s, &hello(PROTO_VERSION)).unwrap();
            let _ = next_host(&mut s);
        });
        let (s, _) = l.accept().unwrap();
        let mut ch = HostChannel::from_stream(s);
        ch.handshake("vm-2", Duration::from_secs(5)).unwrap();
        guest.join().unwrap();
    }

    #[test]
    fn vsock_listener_accepts_the_guest_and_removes_its_socket() {
        let d = tempfile::tempdir().unwrap();
        let uds = d.path().join("v.sock");
        // A stale socket file from a dead host is replaced.
        std::fs::write(vsock_listen_path(&uds, 1024), b"").unwrap();
        let l = VsockListener::bind(&uds, 1024).unwrap();
        let listen = l.path().to_path_buf();
        let guest = std::thread::spawn(move || {
            let mut s = UnixStream::connect(&listen).unwrap();
            let _ = read_frame(&mut s).unwrap();
            write_frame(&mut s, &hello(PROTO_VERSION)).unwrap();
            let _ = next_host(&mut s);
        });
        let mut ch = l.accept(Duration::from_secs(5), &mut || false).unwrap();
        assert!(
            !vsock_listen_path(&uds, 1024).exists(),
            "nobody listens once the guest is connected"
        );
        ch.handshake("vm-3", Duration::from_secs(5)).unwrap();
        guest.join().unwrap();

        // No guest: a dead VMM is reported at once, a silent one at the deadline.
        let l = VsockListener::bind(&uds, 1024).unwrap();
        let e = l.accept(Duration::from_secs(60), &mut || true).unwrap_err();
        assert!(matches!(e, ChannelError::VmmGone), "{e}");
        let l = VsockListener::bind(&uds, 1024).unwrap();
        let e = l.accept(Duration::ZERO, &mut || false).unwrap_err();
        assert!(e.to_string().contains("did not connect"), "{e}");
    }
}
