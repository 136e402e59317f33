//! The channel to the host: find the virtio-serial port, wait for the host
//! to connect, handshake, then serve requests until the host goes away —
//! and start over when it comes back.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dough_proto::{
    decode_host, encode, Exec, ExitStatus, FrameDecoder, FrameError, GuestMsg, Hello, HostMsg,
    RequestId, Stream, Welcome, OUTPUT_CHUNK, PORT_NAME, PROTO_VERSION, READY_LINE, VSOCK_PORT,
};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{killpg, Signal};
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;

use crate::{log, reaper, sys};

const BASE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// How long a finished command's pipes may stay open (held by its
/// background children) before the agent stops waiting for them.
const PIPE_GRACE: Duration = Duration::from_secs(2);

/// Find `/dev/<port>` whose sysfs name is [`PORT_NAME`].
fn find_port() -> Option<PathBuf> {
    let dir = std::fs::read_dir("/sys/class/virtio-ports").ok()?;
    for e in dir.flatten() {
        let name = std::fs::read_to_string(e.path().join("name")).unwrap_or_default();
        if name.trim() == PORT_NAME {
            return Some(Path::new("/dev").join(e.file_name()));
        }
    }
    None
}

/// Where a request is.
enum Run {
    /// Being spawned: signals that came meanwhile, delivered once it runs.
    Pending(Vec<Signal>),
    /// Its process group.
    Running(i32),
}

/// State shared by the session loop and the command threads.
struct Shared {
    port: Mutex<File>,
    /// Connection generation; messages of an older connection are dropped.
    generation: AtomicU64,
    /// Requests of the current connection, from the moment their Exec
    /// arrives: a Signal may come before the command is spawned.
    /// Keyed by connection generation too: every connection numbers its
    /// requests from 1.
    running: Mutex<HashMap<(u64, RequestId), Run>>,
    /// Requests whose stdin is still streaming in: id → their writer.
    inputs: Mutex<HashMap<RequestId, Sender<Option<Vec<u8>>>>>,
    vm_id: Mutex<String>,
}

impl Shared {
    /// Send `msg` if connection `generation` is still the current one.
    ///
    /// A frame is never abandoned half-written while its connection lasts:
    /// a slow host only slows the command down (backpressure), it never
    /// gets a cut frame or loses an `Exit`. The write gives up only when
    /// the connection is gone (the generation moved on, the port reports
    /// the host gone, or it fails). How long to wait is the host's
    /// decision; it has its own deadlines.
    fn send(&self, generation: u64, msg: &GuestMsg) {
        if self.generation.load(Ordering::SeqCst) != generation {
            return;
        }
        let frame = match encode(msg) {
            Ok(f) => f,
            Err(e) => return log(&format!("encoding reply: {e}")),
        };
        let mut port = self.port.lock().unwrap_or_else(|p| p.into_inner());
        let mut off = 0;
        while off < frame.len() {
            match port.write(&frame[off..]) {
                Ok(n) => off += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if self.generation.load(Ordering::SeqCst) != generation {
                        // The host left while this frame was going out.
                        return;
                    }
                    let mut fds = [PollFd::new(port.as_fd(), PollFlags::POLLOUT)];
                    let _ = poll(&mut fds, PollTimeout::from(100u16));
                    // A virtio-serial port whose host is gone reports
                    // POLLHUP and blocks writes: the writer notices by
                    // itself, since the session loop may be waiting for
                    // this very lock to answer the host.
                    if fds[0]
                        .revents()
                        .is_some_and(|r| r.contains(PollFlags::POLLHUP))
                    {
                        return;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return, // host went away; the session loop notices
            }
        }
    }
}

/// How the agent reaches the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// A virtio-serial port named `dough.0` (QEMU).
    Serial,
    /// AF_VSOCK to the host, CID 2, [`VSOCK_PORT`] (Firecracker).
    Vsock,
}

/// Vsock when a virtio vsock device is bound to its driver under `sys`
/// (normally `/sys`), else the serial port.
pub fn detect_transport(sys: &Path) -> Transport {
    let drv = sys.join("bus/virtio/drivers/vmw_vsock_virtio_transport");
    let bound = std::fs::read_dir(drv)
        .map(|rd| {
            rd.flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with("virtio"))
        })
        .unwrap_or(false);
    if bound {
        Transport::Vsock
    } else {
        Transport::Serial
    }
}

fn new_shared(file: File) -> Arc<Shared> {
    Arc::new(Shared {
        port: Mutex::new(file),
        generation: AtomicU64::new(1),
        running: Mutex::new(HashMap::new()),
        inputs: Mutex::new(HashMap::new()),
        vm_id: Mutex::new(String::new()),
    })
}

/// Serve the host forever over whichever transport this VM has.
pub fn serve_forever() {
    match detect_transport(Path::new("/sys")) {
        Transport::Vsock => serve_vsock(),
        Transport::Serial => serve_serial(),
    }
}

/// Connect to the host over vsock, again and again: connections are reset
/// across a snapshot restore, and the host may not be listening yet.
fn serve_vsock() {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, VsockAddr};
    const HOST_CID: u32 = 2;
    println!("{READY_LINE}");
    let _ = std::io::stdout().flush();
    let mut shared: Option<Arc<Shared>> = None;
    let mut backoff = Duration::from_millis(1);
    loop {
        let conn = socket(
            AddressFamily::Vsock,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .and_then(|fd| {
            connect(fd.as_raw_fd(), &VsockAddr::new(HOST_CID, VSOCK_PORT))?;
            Ok(fd)
        });
        let fd = match conn {
            Ok(fd) => fd,
            Err(_) => {
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_millis(100));
                continue;
            }
        };
        backoff = Duration::from_millis(1);
        let file = File::from(fd);
        let _ = nix::fcntl::fcntl(
            file.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        );
        let writer = file.try_clone().expect("dup vsock fd");
        let sh = match &shared {
            Some(s) => {
                *s.port.lock().unwrap_or_else(|p| p.into_inner()) = writer;
                s.clone()
            }
            None => shared.insert(new_shared(writer)).clone(),
        };
        session(&sh, &file);
        sh.end_session();
    }
}

/// Open the virtio-serial port and serve the host forever.
fn serve_serial() {
    let started = Instant::now();
    let mut warned = false;
    let path = loop {
        if let Some(p) = find_port() {
            break p;
        }
        if !warned && started.elapsed() > Duration::from_secs(10) {
            log(&format!(
                "no virtio-serial port named {PORT_NAME} yet; still looking"
            ));
            warned = true;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(&path)
    {
        Ok(f) => f,
        Err(e) => {
            log(&format!("opening {}: {e}", path.display()));
            std::thread::sleep(Duration::from_secs(1));
            return;
        }
    };
    let reader = file.try_clone().expect("dup port fd");
    // The driver tells us when the host comes and goes (SIGIO): an idle
    // agent sleeps instead of polling.
    if let Err(e) = sys::notify_sigio(&reader) {
        log(&format!("no SIGIO on the port ({e}); polling instead"));
    }
    let shared = new_shared(file);
    println!("{READY_LINE}");
    let _ = std::io::stdout().flush();
    loop {
        wait_for_host(&reader);
        session(&shared, &reader);
        // The host went away: its requests cannot be answered any more.
        shared.end_session();
    }
}

impl Shared {
    /// Start a new session: a new generation, so replies of the old one
    /// are dropped, and a Hello for the host that asked with `Attach`.
    fn new_session(&self) -> u64 {
        self.kill_running();
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        self.send(
            generation,
            &GuestMsg::Hello(Hello {
                proto_version: PROTO_VERSION,
                agent_version: env!("CARGO_PKG_VERSION").to_string(),
                boot_id: boot_id(),
            }),
        );
        generation
    }

    /// The host went away: a writer waiting for it gives up (the rest of
    /// its frame reaches nobody), and its requests are killed.
    fn end_session(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.kill_running();
    }

    fn kill_running(&self) {
        self.inputs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        for (_, run) in running.drain() {
            // A pending one is killed by its thread, which finds it gone.
            if let Run::Running(pgid) = run {
                let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
            }
        }
    }
}

/// How long the agent waits for the host before looking again anyway.
const HOST_WAIT_FALLBACK: Duration = Duration::from_secs(10);

/// Block until the host side of the port is connected. While it is not,
/// poll reports POLLHUP at once, so the agent sleeps until the driver's
/// SIGIO says the host side changed — a waiting clone costs nothing — and
/// looks again every 10 s in case a notification was missed (none has
/// been: restores reach the agent in ~0.1 s). It used to poll every 20 ms
/// (50 emulated wake-ups a second per idle clone), then every second.
fn wait_for_host(port: &File) {
    let mut sigio = nix::sys::signal::SigSet::empty();
    sigio.add(Signal::SIGIO);
    loop {
        let mut fds = [PollFd::new(port.as_fd(), PollFlags::POLLIN)];
        if poll(&mut fds, PollTimeout::ZERO).is_ok() {
            let re = fds[0].revents().unwrap_or(PollFlags::empty());
            if !re.contains(PollFlags::POLLHUP) {
                return;
            }
        }
        // A SIGIO that came since the poll is still pending: no race.
        sys::wait_signal(&sigio, HOST_WAIT_FALLBACK);
    }
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// One connection: requests until the host disconnects. Nothing is
/// answered until the host's `Attach` (which gets our Hello) and `Welcome`.
fn session(shared: &Arc<Shared>, mut port: &File) {
    shared.kill_running();
    // Generation 0 never matches: nothing is sent before the Attach.
    let mut generation = 0;
    let mut dec = FrameDecoder::new();
    let mut welcomed = false;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let mut fds = [PollFd::new(port.as_fd(), PollFlags::POLLIN)];
        if poll(&mut fds, PollTimeout::from(1000u16)).is_err() {
            continue;
        }
        let re = fds[0].revents().unwrap_or(PollFlags::empty());
        // The host side is closed (as far as the driver knows yet): this
        // session is over, even with data waiting. The data may be a new
        // host's, come before the driver processed that host's open:
        // answered now, our Hello would be written to a closed port and
        // lost (seen: one connect in hundreds waited for a Hello that never
        // came). The next session reads it once the host is there.
        if re.contains(PollFlags::POLLHUP) {
            return;
        }
        if re.contains(PollFlags::POLLIN) {
            loop {
                match port.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => {
                        dec.push(&buf[..n]);
                        loop {
                            match dec.next_frame() {
                                Ok(Some(payload)) => match decode_host(&payload) {
                                    Ok(HostMsg::Attach) => {
                                        generation = shared.new_session();
                                        welcomed = false;
                                    }
                                    Ok(msg) => handle(shared, generation, msg, &mut welcomed),
                                    Err(e) => log(&format!("bad message from host: {e}")),
                                },
                                Ok(None) => break,
                                Err(e @ FrameError::TooLarge(_)) => {
                                    log(&format!("{e}; dropping the stream"));
                                    break;
                                }
                                Err(e) => {
                                    log(&format!("channel: {e}"));
                                    break;
                                }
                            }
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => return,
                }
            }
        }
    }
}

fn handle(shared: &Arc<Shared>, generation: u64, msg: HostMsg, welcomed: &mut bool) {
    match msg {
        HostMsg::Welcome(w) => {
            apply_welcome(shared, &w);
            *welcomed = true;
        }
        HostMsg::Exec(exec) if !*welcomed => shared.send(
            generation,
            &GuestMsg::Error {
                id: exec.id,
                message: "exec before Welcome: the host must send Welcome first".into(),
            },
        ),
        HostMsg::Exec(exec) => {
            let id = exec.id;
            // Registered before the exec thread exists: Input may follow
            // right behind this message.
            let input = exec.stdin_follows.then(|| {
                let (tx, rx) = std::sync::mpsc::channel();
                shared
                    .inputs
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(id, tx);
                rx
            });
            shared
                .running
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert((generation, id), Run::Pending(Vec::new()));
            let outer = shared;
            let shared = shared.clone();
            let r = std::thread::Builder::new()
                .name(format!("exec-{id}"))
                .spawn(move || {
                    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        run_exec(&shared, generation, exec, input)
                    }));

                    if r.is_err() {
                        let status = ExitStatus::SpawnFailed(
                            "the agent failed while running this request (see the serial console)"
                                .into(),
                        );
                        shared.send(generation, &GuestMsg::Exit { id, status });
                    }
                });
            if let Err(e) = r {
                log(&format!("cannot start a thread for request {id}: {e}"));
                outer
                    .running
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&(generation, id));
            }
        }
        HostMsg::Signal { id, signal } => {
            let Ok(sig) = Signal::try_from(signal) else {
                log(&format!(
                    "request {id}: ignoring signal {signal}: not a signal here"
                ));
                return;
            };
            let mut running = shared.running.lock().unwrap_or_else(|p| p.into_inner());
            match running.get_mut(&(generation, id)) {
                Some(Run::Running(pgid)) => {
                    let _ = killpg(Pid::from_raw(*pgid), sig);
                }
                // Not spawned yet: delivered as soon as it is.
                Some(Run::Pending(queued)) => queued.push(sig),
                // Ended already (a signal racing the exit): nothing to do.
                None => {}
            }
        }
        HostMsg::Ping { seq } => shared.send(generation, &GuestMsg::Pong { seq }),
        HostMsg::Input { id, data } => {
            let inputs = shared.inputs.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(tx) = inputs.get(&id) {
                // The writer may be gone (the command exited): fine.
                let _ = tx.send(Some(data));
            } else {
                drop(inputs);
                shared.send(
                    generation,
                    &GuestMsg::Error {
                        id,
                        message: format!("request {id} is not waiting for input"),
                    },
                );
            }
        }
        HostMsg::InputEnd { id } => {
            let tx = shared
                .inputs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
            if let Some(tx) = tx {
                let _ = tx.send(None);
            }
        }
        HostMsg::Attach => {} // handled by the session loop
    }
}

/// Set the clock and reseed the kernel's RNG from the host's Welcome.
fn apply_welcome(shared: &Shared, w: &Welcome) {
    if w.proto_version != PROTO_VERSION {
        log(&format!(
            "host speaks protocol {}, agent {PROTO_VERSION}",
            w.proto_version
        ));
    }
    let ts = nix::sys::time::TimeSpec::new(
        (w.host_time_ns / 1_000_000_000) as i64,
        (w.host_time_ns % 1_000_000_000) as i64,
    );
    if let Err(e) = nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, ts) {
        log(&format!("setting the clock: {e}"));
    }
    match std::fs::OpenOptions::new().write(true).open("/dev/urandom") {
        Ok(f) => {
            if let Err(e) = sys::add_entropy(&f, &w.entropy.bytes()) {
                log(&format!("seeding the RNG: {e}"));
            }
        }
        Err(e) => log(&format!("opening /dev/urandom: {e}")),
    }
    let mut id = shared.vm_id.lock().unwrap_or_else(|p| p.into_inner());
    if *id != w.vm_id {
        // A new identity (the first host after a restore): this clone's own
        // hostname and machine-id before anything runs, not the bake's.
        take_identity(&w.vm_id);
        *id = w.vm_id.clone();
    }
}

/// Become `vm_id`: the hostname (kernel and /etc/hostname) and a fresh
/// /etc/machine-id, drawn from the kernel's RNG once the host's entropy is
/// in it (not the host's bytes themselves, which stay unseen). The
/// kernel's boot_id stays the bake's: it is fixed at boot and cannot be
/// changed.
fn take_identity(vm_id: &str) {
    let host_ok = !vm_id.is_empty()
        && vm_id.len() <= 63
        && vm_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if host_ok {
        if let Err(e) = nix::unistd::sethostname(vm_id) {
            log(&format!("setting the hostname: {e}"));
        }
        if let Err(e) = std::fs::write("/etc/hostname", format!("{vm_id}\n")) {
            log(&format!("writing /etc/hostname: {e}"));
        }
    }
    let mut raw = [0u8; 16];
    let drawn = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut raw));
    let machine_id: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    if let Err(e) = drawn {
        log(&format!("drawing a machine-id: {e}"));
    } else {
        if let Err(e) = std::fs::write("/etc/machine-id", format!("{machine_id}\n")) {
            log(&format!("writing /etc/machine-id: {e}"));
        }
    }
}

fn run_exec(
    shared: &Arc<Shared>,
    generation: u64,
    exec: Exec,
    input: Option<Receiver<Option<Vec<u8>>>>,
) {
    let id = exec.id;
    // Not spawned after all: no longer pending (removed before the Exit
    // goes out, so never a later request's entry of the same id).
    let not_pending = || {
        let mut running = shared.running.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(Run::Pending(_)) = running.get(&(generation, id)) {
            running.remove(&(generation, id));
        }
    };
    let Some(program) = exec.argv.first() else {
        not_pending();
        return shared.send(
            generation,
            &GuestMsg::Exit {
                id,
                status: ExitStatus::SpawnFailed("empty argv".into()),
            },
        );
    };
    let mut cmd = Command::new(program);
    cmd.args(&exec.argv[1..])
        .env_clear()
        .env("PATH", BASE_PATH)
        .env("HOME", "/root")
        .env("LANG", "C.UTF-8")
        .env("IS_SANDBOX", "1")
        .env(
            "DOUGH_VM_ID",
            shared
                .vm_id
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_str(),
        )
        .envs(exec.env.iter().map(|(k, v)| (k, v)))
        .stdin(if exec.stdin.is_some() || input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let cwd = exec.cwd.clone().unwrap_or_else(|| {
        if Path::new("/root").is_dir() {
            "/root".into()
        } else {
            "/".into()
        }
    });
    cmd.current_dir(&cwd);
    let spawned = reaper::spawn(|| {
        cmd.spawn().map(|c| {
            let pid = c.id();
            (c, pid)
        })
    });
    let (mut child, pid, status_rx) = match spawned {
        Ok(x) => x,
        Err(e) => {
            let why = format!("{program}: {e}");
            not_pending();
            return shared.send(
                generation,
                &GuestMsg::Exit {
                    id,
                    status: ExitStatus::SpawnFailed(why),
                },
            );
        }
    };
    {
        let mut running = shared.running.lock().unwrap_or_else(|p| p.into_inner());
        match running.insert((generation, id), Run::Running(pid as i32)) {
            Some(Run::Pending(queued)) => {
                for sig in queued {
                    let _ = killpg(Pid::from_raw(pid as i32), sig);
                }
            }
            // The host left while it was being spawned: it goes too (and
            // is reaped below like any other).
            _ => {
                running.remove(&(generation, id));
                let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
        }
    }

    if let Some(mut stdin) = child.stdin.take() {
        let data = exec.stdin;
        std::thread::spawn(move || {
            if let Some(d) = data {
                if stdin.write_all(&d).is_err() {
                    return;
                }
            }
            // Streamed chunks until InputEnd (None) or the session ends.
            if let Some(rx) = input {
                while let Ok(Some(chunk)) = rx.recv() {
                    if stdin.write_all(&chunk).is_err() {
                        return;
                    }
                }
            }
        });
    }
    let finished = Arc::new(AtomicBool::new(false));
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let pipes: Vec<(Box<dyn Read + Send>, Stream)> = [
        child
            .stdout
            .take()
            .map(|p| (Box::new(p) as Box<dyn Read + Send>, Stream::Stdout)),
        child
            .stderr
            .take()
            .map(|p| (Box::new(p) as Box<dyn Read + Send>, Stream::Stderr)),
    ]
    .into_iter()
    .flatten()
    .collect();
    let npipes = pipes.len();
    for (mut pipe, stream) in pipes {
        let shared = shared.clone();
        let finished = finished.clone();
        let done_tx = done_tx.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; OUTPUT_CHUNK];
            loop {
                match pipe.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if !finished.load(Ordering::SeqCst) {
                            shared.send(
                                generation,
                                &GuestMsg::Output {
                                    id,
                                    stream,
                                    data: buf[..n].to_vec(),
                                },
                            );
                        }
                    }
                }
            }
            let _ = done_tx.send(());
        });
    }
    drop(done_tx);

    let timeout = exec.timeout_ms.map(Duration::from_millis);
    let mut timed_out = false;
    let status = match timeout {
        Some(t) => match status_rx.recv_timeout(t) {
            Ok(s) => Some(s),
            Err(_) => {
                timed_out = true;
                let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
                status_rx.recv().ok()
            }
        },
        None => status_rx.recv().ok(),
    };
    if timed_out {
        // Nothing the group left behind may keep the pipes open.
        let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
    }
    let deadline = Instant::now() + PIPE_GRACE;
    for _ in 0..npipes {
        let left = deadline.saturating_duration_since(Instant::now());
        if done_rx.recv_timeout(left).is_err() {
            break;
        }
    }
    finished.store(true, Ordering::SeqCst);
    shared
        .running
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&(generation, id));
    let status = match (timed_out, status) {
        (true, _) => ExitStatus::TimedOut,
        (false, Some(WaitStatus::Exited(_, code))) => ExitStatus::Exited(code),
        (false, Some(WaitStatus::Signaled(_, sig, _))) => ExitStatus::Signaled(sig as i32),
        (false, other) => ExitStatus::SpawnFailed(format!("unexpected wait status {other:?}")),
    };
    shared.send(generation, &GuestMsg::Exit { id, status });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transport_is_vsock_only_with_a_bound_vsock_device() {
        let sys = std::env::temp_dir().join(format!("dough-agent-sys-{}", std::process::id()));
        let drv = sys.join("bus/virtio/drivers/vmw_vsock_virtio_transport");
        std::fs::create_dir_all(&drv).unwrap();
        // The driver is loaded (bind/unbind files) but no device is bound.
        std::fs::write(drv.join("bind"), b"").unwrap();
        std::fs::write(drv.join("unbind"), b"").unwrap();
        assert_eq!(detect_transport(&sys), Transport::Serial);
        std::fs::create_dir(drv.join("virtio2")).unwrap();
        assert_eq!(detect_transport(&sys), Transport::Vsock);
        std::fs::remove_dir_all(&sys).unwrap();
        assert_eq!(detect_transport(&sys), Transport::Serial, "no sysfs at all");
    }
}
