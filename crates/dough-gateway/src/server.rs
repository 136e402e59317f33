//! The gateway's event loop (one clone, one process): the TCP listener all
//! of the guest's connections are redirected to, and DNS over UDP and TCP.
//! A single-threaded tokio runtime; every wait has a deadline and every
//! count a guest controls (connections, queries in flight, bytes read
//! before a name) a limit.

use std::collections::BTreeMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use dough_net::Ipv4Net;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;

use crate::audit::{Audit, Event, Kind, Verdict};
use crate::config::Config;
use crate::dns::{Question, Unusable, MSG_MAX};
use crate::policy::{Policy, Route};
use crate::sniff::{sniff, Sniffed, SNIFF_MAX};

/// Connections of one clone open at once; more are closed on arrival.
pub const MAX_CONNS: usize = 256;
/// DNS questions of one clone being resolved at once; more are dropped
/// (the guest's resolver retries).
pub const MAX_DNS_INFLIGHT: usize = 32;
/// A client must have sent its ClientHello or request head by then (and,
/// for a brokered host, finished its TLS handshake).
pub const SNIFF_DEADLINE: Duration = Duration::from_secs(10);
/// Resolving a name on the host.
pub const RESOLVE_DEADLINE: Duration = Duration::from_secs(5);
/// Connecting upstream (each address).
pub const CONNECT_DEADLINE: Duration = Duration::from_secs(10);
/// A DNS-over-TCP client idle between messages.
pub const DNS_TCP_IDLE: Duration = Duration::from_secs(10);

/// Bytes moved per read while splicing a connection (each direction).
const SPLICE_BUF: usize = 64 << 10;

/// The descriptors a gateway process inherits, in this order.
pub const INHERITED_FDS: [RawFd; 3] = [3, 4, 5];

/// A clone's gateway sockets, made inside its network namespace.
#[derive(Debug)]
pub struct Sockets {
    /// Where the guest's TCP is redirected.
    pub tcp: std::net::TcpListener,
    pub dns_udp: std::net::UdpSocket,
    pub dns_tcp: std::net::TcpListener,
}

impl Sockets {
    /// Bind on `addr` in the calling thread's network namespace (the
    /// caller has entered the clone's).
    pub fn bind(addr: Ipv4Addr, tcp_port: u16) -> io::Result<Sockets> {
        Ok(Sockets {
            tcp: std::net::TcpListener::bind((addr, tcp_port))?,
            dns_udp: std::net::UdpSocket::bind((addr, 53))?,
            dns_tcp: std::net::TcpListener::bind((addr, 53))?,
        })
    }

    /// Take the sockets a gateway process was started with
    /// ([`INHERITED_FDS`]), checking each is the kind of socket expected.
    pub fn inherited() -> io::Result<Sockets> {
        let [a, b, c] = INHERITED_FDS;
        for (fd, ty) in [
            (a, libc::SOCK_STREAM),
            (b, libc::SOCK_DGRAM),
            (c, libc::SOCK_STREAM),
        ] {
            let t = nix::sys::socket::getsockopt(
                &unsafe_borrow(fd)?,
                nix::sys::socket::sockopt::SockType,
            )
            .map_err(io::Error::from)?;
            if t as i32 != ty {
                return Err(io::Error::other(format!(
                    "descriptor {fd} is not the expected socket"
                )));
            }
        }
        // SAFETY: each descriptor was checked above to be an open socket of
        // the right type, inherited for this process alone; ownership is
        // taken once.
        unsafe {
            Ok(Sockets {
                tcp: std::net::TcpListener::from_raw_fd(a),
                dns_udp: std::net::UdpSocket::from_raw_fd(b),
                dns_tcp: std::net::TcpListener::from_raw_fd(c),
            })
        }
    }

    /// `exe args...` (a gateway program: its configuration comes on
    /// standard input), with these sockets as its [`INHERITED_FDS`] (and
    /// nothing else of ours).
    pub fn command(&self, exe: &Path, args: &[String]) -> Command {
        use std::os::unix::process::CommandExt;
        let fds = [
            self.tcp.as_raw_fd(),
            self.dns_udp.as_raw_fd(),
            self.dns_tcp.as_raw_fd(),
        ];
        let mut cmd = Command::new(exe);
        cmd.args(args);
        // SAFETY: between fork and exec only async-signal-safe calls
        // (fcntl, dup2, close_range) on descriptors this process owns.
        unsafe {
            cmd.pre_exec(move || {
                // Move out of the way first, so no dup2 clobbers a source.
                let mut high = [0; 3];
                for (i, fd) in fds.iter().enumerate() {
                    let h = libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 10);
                    if h < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    high[i] = h;
                }
                for (h, to) in high.iter().zip(INHERITED_FDS) {
                    // dup2 clears close-on-exec on the new descriptor.
                    if libc::dup2(*h, to) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                // Nothing else of this process's (or what it inherited
                // without close-on-exec) reaches the gateway.
                libc::syscall(libc::SYS_close_range, 6u32, u32::MAX, 0u32);
                Ok(())
            });
        }
        cmd
    }
}

/// A borrowed view of `fd` for a getsockopt, refusing a closed one.
fn unsafe_borrow(fd: RawFd) -> io::Result<std::os::fd::BorrowedFd<'static>> {
    // SAFETY: F_GETFD only asks whether the descriptor is open.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(io::Error::other(format!(
            "descriptor {fd} was not inherited"
        )));
    }
    // SAFETY: open (checked above) and never closed while borrowed: the
    // borrow is used for one getsockopt before ownership is taken.
    Ok(unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) })
}

/// Everything a connection or query handler reads.
#[derive(Debug)]
pub(crate) struct Ctx {
    vm: String,
    policy: Policy,
    resolver: Arc<Resolver>,
    pub(crate) audit: Audit,
    pub(crate) brokering: Option<crate::mitm::Brokering>,
}

impl Ctx {
    pub(crate) fn event(&self, kind: Kind, verdict: Verdict, reason: impl Into<String>) -> Event {
        Event::new(&self.vm, kind, verdict, reason)
    }

    async fn resolve(&self, name: &str) -> io::Result<Vec<Ipv4Addr>> {
        self.resolver.resolve(name).await
    }
}

/// Names resolved on the host: the gateway's own table first, then the
/// host's resolver; addresses no clone may reach are dropped.
#[derive(Debug)]
pub struct Resolver {
    pub hosts: BTreeMap<String, Vec<Ipv4Addr>>,
    pub deny: Vec<Ipv4Net>,
}

impl Resolver {
    /// `name`'s reachable IPv4 addresses.
    pub async fn resolve(&self, name: &str) -> io::Result<Vec<Ipv4Addr>> {
        let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
        let all: Vec<Ipv4Addr> = match self.hosts.get(&name) {
            Some(a) => a.clone(),
            None => {
                let found =
                    tokio::time::timeout(RESOLVE_DEADLINE, tokio::net::lookup_host((name, 0)))
                        .await
                        .map_err(|_| {
                            io::Error::new(io::ErrorKind::TimedOut, "resolving timed out")
                        })??;
                let mut v: Vec<Ipv4Addr> = found
                    .filter_map(|a| match a {
                        SocketAddr::V4(a) => Some(*a.ip()),
                        SocketAddr::V6(_) => None,
                    })
                    .collect();
                v.dedup();
                v
            }
        };
        Ok(crate::guard::reachable(all, &self.deny))
    }
}

/// Serve one clone until its VMM is gone (or forever, with no VMM named).
pub fn run(config: Config, sockets: Sockets) -> io::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        // Host name resolution (getaddrinfo) blocks: a few threads for it.
        .max_blocking_threads(4)
        .build()?;
    let audit = Audit::open(&config.log, crate::audit::LOG_MAX)?;
    let resolver = Arc::new(Resolver {
        hosts: config.hosts.clone(),
        deny: config.deny.clone(),
    });
    let vm = config.vm.clone();
    let policy = Policy::new(config.egress.clone());
    let vmm = config.vmm;
    rt.block_on(async move {
        let brokering = match (config.brokers.is_empty(), &config.ca) {
            (true, _) => None,
            (false, None) => {
                return Err(io::Error::other(
                    "brokered secrets need dough's CA, and none was given",
                ))
            }
            (false, Some(ca)) => {
                let upstream = crate::tls::upstream_config(&config.upstream_roots)
                    .map_err(io::Error::other)?;
                Some(
                    crate::mitm::Brokering::new(config.brokers, ca, upstream, resolver.clone())
                        .map_err(io::Error::other)?,
                )
            }
        };
        let ctx = Arc::new(Ctx {
            vm,
            policy,
            resolver,
            audit,
            brokering,
        });
        for s in [&sockets.tcp, &sockets.dns_tcp] {
            s.set_nonblocking(true)?;
        }
        sockets.dns_udp.set_nonblocking(true)?;
        let tcp = TcpListener::from_std(sockets.tcp)?;
        let dns_tcp = TcpListener::from_std(sockets.dns_tcp)?;
        let dns_udp = UdpSocket::from_std(sockets.dns_udp)?;
        let served = async {
            tokio::select! {
                r = accept_tcp(ctx.clone(), tcp) => r,
                r = serve_dns_udp(ctx.clone(), dns_udp) => r,
                r = accept_dns_tcp(ctx.clone(), dns_tcp) => r,
            }
        };
        match vmm {
            Some((pid, start)) => tokio::select! {
                r = served => r,
                r = vmm_gone(pid, start) => {
                    tracing::info!(vm = %ctx.vm, "the clone's VMM is gone; the gateway stops");
                    r
                }
            },
            None => served.await,
        }
    })
}

/// Resolves when process `pid` (started at `start` clock ticks) has exited.
async fn vmm_gone(pid: i32, start: u64) -> io::Result<()> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor
    // (or -1); nothing is borrowed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Ok(()); // Already gone.
    }
    // SAFETY: a fresh descriptor from pidfd_open, owned from here on.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    // The pid may have been reused before the pidfd was opened: it must
    // still be the same process.
    if start_ticks(pid) != Some(start) {
        return Ok(());
    }
    // SAFETY: the OwnedFd is moved into the AsyncFd, which alone owns it
    // (open, the same descriptor) until it is dropped.
    let afd = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
    }
    .map_err(|e| io::Error::other(e.to_string()))?;
    let _ = afd.readable().await?;
    Ok(())
}

/// Field 22 of `/proc/PID/stat`: when the process started.
fn start_ticks(pid: i32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = s.rsplit_once(')')?.1;
    after.split_whitespace().nth(19)?.parse().ok()
}

async fn accept_tcp(ctx: Arc<Ctx>, l: TcpListener) -> io::Result<()> {
    let slots = Arc::new(Semaphore::new(MAX_CONNS));
    loop {
        let (s, _) = match l.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            ctx.audit.log(&ctx.event(
                Kind::Tcp,
                Verdict::Deny,
                format!("more than {MAX_CONNS} connections open"),
            ));
            continue;
        };
        // Bytes are passed on as they come: no Nagle delay on either side.
        let _ = s.set_nodelay(true);
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let ev = connection(&ctx, s).await;
            ctx.audit.log(&ev);
            drop(permit);
        });
    }
}

/// Where the guest dialed, before the redirect. A connection that was not
/// redirected (made to the gateway's own address) has none: with
/// connection tracking on, the kernel answers with the socket's own local
/// address for it, without, with an error.
fn original_dst(s: &TcpStream) -> io::Result<SocketAddrV4> {
    let a = nix::sys::socket::getsockopt(s, nix::sys::socket::sockopt::OriginalDst)
        .map_err(io::Error::from)?;
    let dst = SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
        u16::from_be(a.sin_port),
    );
    if s.local_addr()
        .is_ok_and(|l| l == std::net::SocketAddr::V4(dst))
    {
        return Err(io::Error::other("the gateway itself was dialed"));
    }
    Ok(dst)
}

/// Handle one redirected connection to its end; what to log.
async fn connection(ctx: &Arc<Ctx>, mut guest: TcpStream) -> Event {
    let dialed = match original_dst(&guest) {
        Ok(d) => d,
        Err(e) => {
            return ctx.event(
                Kind::Tcp,
                Verdict::Deny,
                format!("no original destination: {e}"),
            )
        }
    };
    let mut ev = ctx.event(Kind::Tcp, Verdict::Deny, "");
    ev.dialed = Some(dialed.to_string());
    let mut first = Vec::new();
    let route = ctx.policy.route(dialed);
    if let Route::Deny(why) = route {
        ev.reason = why.to_string();
        return ev;
    }
    // The name the client asks for: needed to route by name, and on 443
    // whenever some secret is brokered (its hosts are intercepted under
    // any policy that lets them through).
    let brokering = ctx.brokering.is_some() && dialed.port() == 443;
    let mut named = None;
    if route == Route::ByName || brokering {
        match read_name(&mut guest, &mut first).await {
            Ok(n) => named = Some(n),
            Err(why) if route == Route::ByName => {
                ev.reason = why;
                return ev;
            }
            Err(_) => {}
        }
    }
    if let Some((name, how)) = &named {
        ev.name = Some(name.clone());
        ev.what = Some(how.to_string());
    }
    if let (Some((name, "sni")), Some(b)) = (&named, &ctx.brokering) {
        if b.serves(name) && ctx.policy.allows_name(name, dialed.port()) {
            let name = name.clone();
            return crate::mitm::serve(ctx.clone(), guest, first, name, dialed, ev).await;
        }
    }
    let candidates: Vec<SocketAddrV4> = match (route, named) {
        (Route::Direct(d), _) => {
            if let Some(why) = crate::guard::forbidden(*d.ip(), &ctx.resolver.deny) {
                ev.reason = format!("never reachable: {why}");
                return ev;
            }
            vec![d]
        }
        // Both answered above; nothing to connect to either way.
        (Route::Deny(_), _) | (Route::ByName, None) => {
            ev.reason = "no route".into();
            return ev;
        }
        (Route::ByName, Some((name, _))) => {
            if !ctx.policy.allows_name(&name, dialed.port()) {
                ev.reason = "name not allowed on this port".into();
                return ev;
            }
            match ctx.resolve(&name).await {
                Ok(a) if !a.is_empty() => a
                    .into_iter()
                    .map(|ip| SocketAddrV4::new(ip, dialed.port()))
                    .collect(),
                Ok(_) => {
                    ev.verdict = Verdict::Fail;
                    ev.reason = "the name has no reachable IPv4 address".into();
                    return ev;
                }
                Err(e) => {
                    ev.verdict = Verdict::Fail;
                    ev.reason = format!("resolving on the host: {e}");
                    return ev;
                }
            }
        }
    };
    let mut upstream = None;
    let mut last_err = String::new();
    for c in candidates {
        match tokio::time::timeout(CONNECT_DEADLINE, TcpStream::connect(c)).await {
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                upstream = Some((s, c));
                break;
            }
            Ok(Err(e)) => last_err = format!("connecting to {c}: {e}"),
            Err(_) => last_err = format!("connecting to {c}: timed out"),
        }
    }
    let Some((mut up, addr)) = upstream else {
        ev.verdict = Verdict::Fail;
        ev.reason = last_err;
        return ev;
    };
    ev.upstream = Some(addr.to_string());
    ev.verdict = Verdict::Allow;
    ev.reason = match ev.what {
        Some(_) => "name allowed".into(),
        None => "address allowed".into(),
    };
    if up.write_all(&first).await.is_err() {
        ev.up = Some(0);
        return ev;
    }
    let (a, b) = splice(guest, up).await;
    ev.up = Some(a + first.len() as u64);
    ev.down = Some(b);
    ev
}

/// Copy both ways until both sides are done; the bytes moved each way
/// (counted even when a side ends with an error, as TLS peers often do).
async fn splice(a: TcpStream, b: TcpStream) -> (u64, u64) {
    let (mut ar, mut aw) = a.into_split();
    let (mut br, mut bw) = b.into_split();
    let (x, y) = tokio::join!(one_way(&mut ar, &mut bw), one_way(&mut br, &mut aw));
    (x, y)
}

async fn one_way(
    from: &mut tokio::net::tcp::OwnedReadHalf,
    to: &mut tokio::net::tcp::OwnedWriteHalf,
) -> u64 {
    let mut buf = vec![0u8; SPLICE_BUF];
    let mut n = 0u64;
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(k) => {
                if to.write_all(&buf[..k]).await.is_err() {
                    break;
                }
                n += k as u64;
            }
        }
    }
    // Pass the end on (a half-close), so the other side sees it.
    let _ = to.shutdown().await;
    n
}

/// Read the client's first bytes into `buf` until they name a host (SNI or
/// `Host`), within [`SNIFF_MAX`] bytes and [`SNIFF_DEADLINE`].
async fn read_name(
    guest: &mut TcpStream,
    buf: &mut Vec<u8>,
) -> Result<(String, &'static str), String> {
    let deadline = tokio::time::Instant::now() + SNIFF_DEADLINE;
    let mut chunk = [0u8; 4096];
    loop {
        match sniff(buf) {
            Sniffed::Tls(n) => return Ok((n, "sni")),
            Sniffed::Http(n) => return Ok((n, "host")),
            Sniffed::Refused(why) => return Err(format!("refused: {why}")),
            Sniffed::More if buf.len() >= SNIFF_MAX => {
                return Err(format!("no host name in the first {SNIFF_MAX} bytes"))
            }
            Sniffed::More => {}
        }
        let room = (SNIFF_MAX - buf.len()).min(chunk.len());
        let n = match tokio::time::timeout_at(deadline, guest.read(&mut chunk[..room])).await {
            Err(_) => {
                return Err(format!(
                    "no TLS ClientHello or HTTP request within {} s",
                    SNIFF_DEADLINE.as_secs()
                ))
            }
            Ok(Err(e)) => return Err(format!("reading from the guest: {e}")),
            Ok(Ok(0)) => return Err("the guest closed before naming a host".into()),
            Ok(Ok(n)) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// One DNS message in, the reply to send (if any) and the event to log.
async fn dns_answer(ctx: &Ctx, buf: &[u8]) -> (Option<Vec<u8>>, Option<Event>) {
    let q = match Question::parse(buf) {
        Ok(q) => q,
        Err(Unusable::Drop) => return (None, None),
        Err(Unusable::Reply(r)) => {
            let ev = ctx.event(Kind::Dns, Verdict::Deny, "malformed or unsupported query");
            return (Some(r), Some(ev));
        }
    };
    let mut ev = ctx.event(Kind::Dns, Verdict::Deny, "name not allowed");
    ev.name = Some(q.name.clone());
    ev.what = Some(q.qtype.to_string());
    if !ctx.policy.resolves(&q.name) {
        return (Some(q.nxdomain()), Some(ev));
    }
    if q.qtype != hickory_proto::rr::RecordType::A {
        ev.verdict = Verdict::Allow;
        ev.reason = "allowed; no records of this type (IPv4 only)".into();
        return (Some(q.answer(&[])), Some(ev));
    }
    match ctx.resolve(&q.name).await {
        Ok(addrs) => {
            ev.verdict = Verdict::Allow;
            ev.reason = "name allowed".into();
            ev.upstream = Some(
                addrs
                    .iter()
                    .map(|a| a.to_string())
                    .collect::<Vec<_>>()
                    .join(","),
            );
            (Some(q.answer(&addrs)), Some(ev))
        }
        Err(e) => {
            ev.verdict = Verdict::Fail;
            ev.reason = format!("resolving on the host: {e}");
            (Some(q.servfail()), Some(ev))
        }
    }
}

async fn serve_dns_udp(ctx: Arc<Ctx>, sock: UdpSocket) -> io::Result<()> {
    let sock = Arc::new(sock);
    let inflight = Arc::new(Semaphore::new(MAX_DNS_INFLIGHT));
    let mut buf = vec![0u8; MSG_MAX];
    loop {
        let (n, from) = match sock.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("dns recv: {e}");
                continue;
            }
        };
        let Ok(permit) = inflight.clone().try_acquire_owned() else {
            continue;
        };
        let msg = buf[..n].to_vec();
        let (ctx, sock) = (ctx.clone(), sock.clone());
        tokio::spawn(async move {
            let (reply, ev) = dns_answer(&ctx, &msg).await;
            if let Some(r) = reply.filter(|r| !r.is_empty()) {
                let _ = sock.send_to(&r, from).await;
            }
            if let Some(ev) = ev {
                ctx.audit.log(&ev);
            }
            drop(permit);
        });
    }
}

async fn accept_dns_tcp(ctx: Arc<Ctx>, l: TcpListener) -> io::Result<()> {
    let slots = Arc::new(Semaphore::new(MAX_DNS_INFLIGHT));
    loop {
        let Ok((s, _)) = l.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let _ = dns_tcp_conn(&ctx, s).await;
            drop(permit);
        });
    }
}

async fn dns_tcp_conn(ctx: &Ctx, mut s: TcpStream) -> io::Result<()> {
    loop {
        let mut len = [0u8; 2];
        match tokio::time::timeout(DNS_TCP_IDLE, s.read_exact(&mut len)).await {
            Ok(Ok(_)) => {}
            _ => return Ok(()),
        }
        let n = u16::from_be_bytes(len) as usize;
        if n > MSG_MAX {
            return Ok(());
        }
        let mut msg = vec![0u8; n];
        match tokio::time::timeout(DNS_TCP_IDLE, s.read_exact(&mut msg)).await {
            Ok(Ok(_)) => {}
            _ => return Ok(()),
        }
        let (reply, ev) = dns_answer(ctx, &msg).await;
        if let Some(ev) = ev {
            ctx.audit.log(&ev);
        }
        let Some(r) = reply.filter(|r| !r.is_empty() && r.len() <= u16::MAX as usize) else {
            return Ok(());
        };
        s.write_all(&(r.len() as u16).to_be_bytes()).await?;
        s.write_all(&r).await?;
    }
}
