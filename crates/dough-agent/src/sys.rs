//! The few syscalls std and nix do not wrap. Every `unsafe` block of the
//! agent lives here.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

fn check(ret: libc::c_long) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Set the calling thread's name; on the main thread this is `/proc/self/comm`.
pub fn set_process_name(name: &str) -> io::Result<()> {
    let c = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes
    // (longer names are truncated by the kernel); `c` outlives the call.
    let r = unsafe { libc::prctl(libc::PR_SET_NAME, c.as_ptr() as libc::c_ulong, 0, 0, 0) };
    check(r.into())
}

/// Wait up to `timeout` for one of `set`'s signals (which the caller has
/// blocked); whether one came.
pub fn wait_signal(set: &nix::sys::signal::SigSet, timeout: std::time::Duration) -> bool {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `set` is a valid sigset_t for the call's duration, `ts` a
    // valid timespec; a null siginfo pointer is allowed.
    let r = unsafe { libc::sigtimedwait(set.as_ref(), std::ptr::null_mut(), &ts) };
    r > 0
}

/// Ask the kernel to send SIGIO to this process when `fd`'s state changes
/// (`F_SETOWN` + `O_ASYNC`).
pub fn notify_sigio(fd: &impl AsRawFd) -> io::Result<()> {
    let fd = fd.as_raw_fd();
    // SAFETY: fcntl on an fd the caller owns, with plain integer arguments.
    check(unsafe { libc::fcntl(fd, libc::F_SETOWN, libc::getpid()) }.into())?;
    // SAFETY: as above; F_GETFL/F_SETFL only read and set the fd's flags.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    check(flags.into())?;
    // SAFETY: as above.
    check(unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_ASYNC) }.into())
}

/// Load a kernel module from an open file (`finit_module(2)`).
pub fn finit_module(file: &std::fs::File) -> io::Result<()> {
    let params = c"";
    // SAFETY: the fd is valid for the duration of the call and `params` is a
    // static NUL-terminated string; the kernel copies both.
    let r = unsafe { libc::syscall(libc::SYS_finit_module, file.as_raw_fd(), params.as_ptr(), 0) };
    check(r)
}

// The ioctl numbers below come from nix's request-code macros (the
// kernel's _IO/_IOW) or libc's constants, never typed in by hand; the one
// kernel struct libc does not have for glibc targets (`rtentry`) is mirrored
// with a compile-time size check, for the only architecture the agent is
// built for.
#[cfg(not(target_arch = "x86_64"))]
compile_error!("dough-agent's kernel structs are laid out for x86_64 only");

/// `RNDADDENTROPY` = `_IOW('R', 0x03, int[2])` (include/uapi/linux/random.h).
const RNDADDENTROPY: libc::Ioctl =
    nix::request_code_write!(b'R', 0x03, std::mem::size_of::<[libc::c_int; 2]>()) as libc::Ioctl;
/// `RNDRESEEDCRNG` = `_IO('R', 0x07)`.
const RNDRESEEDCRNG: libc::Ioctl = nix::request_code_none!(b'R', 0x07) as libc::Ioctl;

/// `struct rand_pool_info` with its 64-byte buffer in place.
#[repr(C)]
struct RandPoolInfo {
    entropy_count: libc::c_int,
    buf_size: libc::c_int,
    buf: [u8; 64],
}
const _: () = assert!(std::mem::size_of::<RandPoolInfo>() == 8 + 64);

/// Credit `bytes` to the kernel's entropy pool and force the CRNG to reseed,
/// so that clones of one snapshot diverge immediately.
pub fn add_entropy(random: &std::fs::File, bytes: &[u8; 64]) -> io::Result<()> {
    let info = RandPoolInfo {
        entropy_count: 64 * 8,
        buf_size: 64,
        buf: *bytes,
    };
    // SAFETY: RNDADDENTROPY reads a rand_pool_info header followed by
    // `buf_size` bytes, all inside `info`, which lives across the call.
    let r = unsafe {
        libc::ioctl(
            random.as_raw_fd(),
            RNDADDENTROPY,
            &info as *const RandPoolInfo,
        )
    };
    check(r.into())?;
    // SAFETY: RNDRESEEDCRNG takes no argument.
    let r = unsafe { libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG) };
    check(r.into())
}

/// A `struct ifreq` for `ifname` (libc's definition), all else zero.
fn ifreq(ifname: &str) -> io::Result<libc::ifreq> {
    // SAFETY: ifreq is plain data (a name and a union of plain data); all
    // zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    if ifname.len() >= ifr.ifr_name.len() {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    for (d, s) in ifr.ifr_name.iter_mut().zip(ifname.bytes()) {
        *d = s as libc::c_char;
    }
    Ok(ifr)
}

/// `struct sockaddr` holding an IPv4 address (a `sockaddr_in`).
fn sockaddr_in(a: std::net::Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(a.octets()),
        },
        sin_zero: [0; 8],
    };
    const _: () =
        assert!(std::mem::size_of::<libc::sockaddr_in>() == std::mem::size_of::<libc::sockaddr>());
    // SAFETY: sockaddr_in and sockaddr have the same size (checked above)
    // and both are plain data: this is how the kernel API reinterprets them.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn inet_socket() -> io::Result<OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: plain socket(2); the returned fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    check(fd.into())?;
    // SAFETY: fd is a fresh, valid descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn ifreq_ioctl(sock: &OwnedFd, req: libc::Ioctl, ifr: &mut libc::ifreq) -> io::Result<()> {
    // SAFETY: the SIOC*IF* requests used here read/write one struct ifreq,
    // which `ifr` is (libc's definition) and which outlives the call.
    let r = unsafe { libc::ioctl(sock.as_raw_fd(), req, ifr as *mut libc::ifreq) };
    check(r.into())
}

/// Bring an interface up (`ip link set IF up`).
pub fn link_up(ifname: &str) -> io::Result<()> {
    let s = inet_socket()?;
    let mut ifr = ifreq(ifname)?;
    ifreq_ioctl(&s, libc::SIOCGIFFLAGS as libc::Ioctl, &mut ifr)?;
    // SAFETY: SIOCGIFFLAGS filled the union's flags member.
    let flags = unsafe { ifr.ifr_ifru.ifru_flags };
    ifr.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
    ifreq_ioctl(&s, libc::SIOCSIFFLAGS as libc::Ioctl, &mut ifr)
}

/// Give an interface an IPv4 address and netmask.
pub fn set_ipv4(
    ifname: &str,
    addr: std::net::Ipv4Addr,
    mask: std::net::Ipv4Addr,
) -> io::Result<()> {
    let s = inet_socket()?;
    let mut ifr = ifreq(ifname)?;
    ifr.ifr_ifru.ifru_addr = sockaddr_in(addr);
    ifreq_ioctl(&s, libc::SIOCSIFADDR as libc::Ioctl, &mut ifr)?;
    let mut ifr = ifreq(ifname)?;
    ifr.ifr_ifru.ifru_netmask = sockaddr_in(mask);
    ifreq_ioctl(&s, libc::SIOCSIFNETMASK as libc::Ioctl, &mut ifr)
}

/// Kernel `struct rtentry` (include/uapi/linux/route.h): libc has it only
/// for musl and uClibc targets, so it is mirrored here for x86_64, with its
/// size checked at compile time.
#[repr(C)]
struct RtEntry {
    rt_pad1: libc::c_ulong,
    rt_dst: libc::sockaddr,
    rt_gateway: libc::sockaddr,
    rt_genmask: libc::sockaddr,
    rt_flags: libc::c_ushort,
    rt_pad2: libc::c_short,
    rt_pad3: libc::c_ulong,
    rt_pad4: *mut libc::c_void,
    rt_metric: libc::c_short,
    rt_dev: *mut libc::c_char,
    rt_mtu: libc::c_ulong,
    rt_window: libc::c_ulong,
    rt_irtt: libc::c_ushort,
}
const _: () = assert!(std::mem::size_of::<RtEntry>() == 120);

/// Add a default route via `gw`.
pub fn add_default_route(gw: std::net::Ipv4Addr) -> io::Result<()> {
    let s = inet_socket()?;
    let any = std::net::Ipv4Addr::UNSPECIFIED;
    let rt = RtEntry {
        rt_pad1: 0,
        rt_dst: sockaddr_in(any),
        rt_gateway: sockaddr_in(gw),
        rt_genmask: sockaddr_in(any),
        rt_flags: libc::RTF_UP | libc::RTF_GATEWAY,
        rt_pad2: 0,
        rt_pad3: 0,
        rt_pad4: std::ptr::null_mut(),
        rt_metric: 0,
        rt_dev: std::ptr::null_mut(),
        rt_mtu: 0,
        rt_window: 0,
        rt_irtt: 0,
    };
    // SAFETY: SIOCADDRT reads one struct rtentry, which `RtEntry` mirrors
    // (size checked); the null rt_dev lets the kernel pick the device from
    // the gateway.
    let r = unsafe {
        libc::ioctl(
            s.as_raw_fd(),
            libc::SIOCADDRT as libc::Ioctl,
            &rt as *const RtEntry,
        )
    };
    check(r.into())
}

#[cfg(test)]
mod tests {
    /// The request codes nix computes are the kernel's (as printed by
    /// `printf("%#lx", RNDADDENTROPY)` against linux/random.h on x86_64).
    #[test]
    fn request_codes_are_the_kernels() {
        assert_eq!(super::RNDADDENTROPY, 0x4008_5203);
        assert_eq!(super::RNDRESEEDCRNG, 0x5207);
        assert_eq!(libc::SIOCADDRT, 0x890b);
    }

    #[test]
    fn sockaddr_in_lays_out_an_ipv4_address() {
        let sa = super::sockaddr_in(std::net::Ipv4Addr::new(172, 16, 0, 1));
        assert_eq!(sa.sa_family, libc::AF_INET as libc::sa_family_t);
        // Port 0, then the address in network order.
        assert_eq!(
            &sa.sa_data[..6],
            &[0, 0, 172, 16, 0, 1].map(|b| b as libc::c_char)
        );
        let long = super::ifreq("a-name-far-too-long-for-ifreq");
        assert!(matches!(long, Err(e) if e.kind() == std::io::ErrorKind::InvalidInput));
    }
}
