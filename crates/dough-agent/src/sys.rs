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

/// Load a kernel module from an open file (`finit_module(2)`).
pub fn finit_module(file: &std::fs::File) -> io::Result<()> {
    let params = c"";
    // SAFETY: the fd is valid for the duration of the call and `params` is a
    // static NUL-terminated string; the kernel copies both.
    let r = unsafe { libc::syscall(libc::SYS_finit_module, file.as_raw_fd(), params.as_ptr(), 0) };
    check(r)
}

const RNDADDENTROPY: libc::c_ulong = 0x4008_5203; // _IOW('R', 0x03, int[2])
const RNDRESEEDCRNG: libc::c_ulong = 0x5207; // _IO('R', 0x07)

#[repr(C)]
struct RandPoolInfo {
    entropy_count: libc::c_int,
    buf_size: libc::c_int,
    buf: [u8; 64],
}

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

const SIOCGIFFLAGS: libc::c_ulong = 0x8913;
const SIOCSIFFLAGS: libc::c_ulong = 0x8914;
const SIOCSIFADDR: libc::c_ulong = 0x8916;
const SIOCSIFNETMASK: libc::c_ulong = 0x891c;
const SIOCADDRT: libc::c_ulong = 0x890b;

/// `struct ifreq` with the members we use (the union is 24 bytes).
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    data: [u8; 24],
}

impl IfReq {
    fn new(ifname: &str) -> io::Result<Self> {
        if ifname.len() >= 16 {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        let mut name = [0u8; 16];
        name[..ifname.len()].copy_from_slice(ifname.as_bytes());
        Ok(IfReq {
            name,
            data: [0; 24],
        })
    }

    fn set_addr(&mut self, a: std::net::Ipv4Addr) {
        let sa = sockaddr_in(a);
        // sockaddr_in is 16 bytes; lay it into the union.
        self.data[..16].copy_from_slice(&sa);
    }
}

fn sockaddr_in(a: std::net::Ipv4Addr) -> [u8; 16] {
    let mut sa = [0u8; 16];
    sa[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
    sa[4..8].copy_from_slice(&a.octets());
    sa
}

fn inet_socket() -> io::Result<OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: plain socket(2); the returned fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    check(fd.into())?;
    // SAFETY: fd is a fresh, valid descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn ifreq_ioctl(sock: &OwnedFd, req: libc::c_ulong, ifr: &mut IfReq) -> io::Result<()> {
    // SAFETY: the SIOC*IF* requests used here read/write a struct ifreq,
    // which `IfReq` matches in size and layout.
    let r = unsafe { libc::ioctl(sock.as_raw_fd(), req, ifr as *mut IfReq) };
    check(r.into())
}

/// Bring an interface up (`ip link set IF up`).
pub fn link_up(ifname: &str) -> io::Result<()> {
    let s = inet_socket()?;
    let mut ifr = IfReq::new(ifname)?;
    ifreq_ioctl(&s, SIOCGIFFLAGS, &mut ifr)?;
    let flags = i16::from_ne_bytes([ifr.data[0], ifr.data[1]]) | libc::IFF_UP as i16;
    ifr.data[..2].copy_from_slice(&flags.to_ne_bytes());
    ifreq_ioctl(&s, SIOCSIFFLAGS, &mut ifr)
}

/// Give an interface an IPv4 address and netmask.
pub fn set_ipv4(
    ifname: &str,
    addr: std::net::Ipv4Addr,
    mask: std::net::Ipv4Addr,
) -> io::Result<()> {
    let s = inet_socket()?;
    let mut ifr = IfReq::new(ifname)?;
    ifr.set_addr(addr);
    ifreq_ioctl(&s, SIOCSIFADDR, &mut ifr)?;
    let mut ifr = IfReq::new(ifname)?;
    ifr.set_addr(mask);
    ifreq_ioctl(&s, SIOCSIFNETMASK, &mut ifr)
}

/// Kernel `struct rtentry` (include/uapi/linux/route.h), x86_64 layout.
#[repr(C)]
struct RtEntry {
    rt_pad1: libc::c_ulong,
    rt_dst: [u8; 16],
    rt_gateway: [u8; 16],
    rt_genmask: [u8; 16],
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

/// Add a default route via `gw`.
pub fn add_default_route(gw: std::net::Ipv4Addr) -> io::Result<()> {
    let s = inet_socket()?;
    let any = std::net::Ipv4Addr::UNSPECIFIED;
    let rt = RtEntry {
        rt_pad1: 0,
        rt_dst: sockaddr_in(any),
        rt_gateway: sockaddr_in(gw),
        rt_genmask: sockaddr_in(any),
        rt_flags: 0x0001 | 0x0002, // RTF_UP | RTF_GATEWAY
        rt_pad2: 0,
        rt_pad3: 0,
        rt_pad4: std::ptr::null_mut(),
        rt_metric: 0,
        rt_dev: std::ptr::null_mut(),
        rt_mtu: 0,
        rt_window: 0,
        rt_irtt: 0,
    };
    // SAFETY: SIOCADDRT reads one struct rtentry, which `RtEntry` mirrors;
    // the null rt_dev lets the kernel pick the device from the gateway.
    let r = unsafe { libc::ioctl(s.as_raw_fd(), SIOCADDRT, &rt as *const RtEntry) };
    check(r.into())
}
