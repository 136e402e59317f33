//! Test support: a stand-in for "the network beyond the host", so tests of
//! egress never contact anything off this machine. Used by the privileged
//! and VM test tiers; not by dough itself.

use std::io::Write;
use std::net::{Ipv4Addr, TcpListener};

use crate::linux::{in_netns, LinuxNet};
use crate::ops::{NetError, NetOps};
use crate::plan::Ipv4Net;

/// Six random hex digits: names of a test's own (worlds, namespaces) that
/// no other test run picks.
pub fn random_tag() -> String {
    use std::io::Read;
    let mut b = [0u8; 3];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .expect("reading /dev/urandom");
    format!("{:02x}{:02x}{:02x}", b[0], b[1], b[2])
}

/// A random /30 of `10.<octet>.0.0/16` for a test's world, so tests that
/// run at the same time (and share `octet`) almost never pick the same
/// one: 16,384 choices.
pub fn world_net(octet: u8) -> Ipv4Net {
    use std::io::Read;
    let mut b = [0u8; 2];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .expect("reading /dev/urandom");
    let i = u32::from(u16::from_be_bytes(b)) % 16_384;
    Ipv4Net::new(Ipv4Addr::new(10, octet, 0, 0), 16)
        .expect("a /16")
        .subnet(30, i)
}

/// A network namespace behind a host veth (`net`'s `.1` on the host, `.2`
/// inside), where tests run TCP servers. Its names do not look like
/// dough's, so no leftover sweep touches it. Removed on drop.
#[derive(Debug)]
pub struct World {
    pub ns: String,
    pub host_veth: String,
    pub addr: Ipv4Addr,
}

impl World {
    /// `tag` (at most 10 characters of [a-z0-9]) makes the names unique.
    pub fn new(tag: &str, net: Ipv4Net) -> Result<World, NetError> {
        let w = World {
            ns: format!("tw-{tag}"),
            host_veth: format!("tw{tag}"),
            addr: net.host(2),
        };
        let mut n = LinuxNet::default();
        n.create_netns(&w.ns)?;
        n.create_veth(&w.host_veth, &w.ns, "eth0")?;
        n.add_addr(None, &w.host_veth, net.host(1), net.prefix)?;
        n.link_up(None, &w.host_veth)?;
        n.add_addr(Some(&w.ns), "eth0", w.addr, net.prefix)?;
        n.link_up(Some(&w.ns), "eth0")?;
        n.link_up(Some(&w.ns), "lo")?;
        Ok(w)
    }

    /// Answer every connection to `port` with `reply`, until the process ends.
    pub fn serve(&self, port: u16, reply: &'static [u8]) -> Result<(), NetError> {
        serve_in(&self.ns, self.addr, port, reply)
    }
}

/// Listen on `addr:port` inside `netns` and answer every connection with
/// `reply`, on a background thread.
pub fn serve_in(
    netns: &str,
    addr: Ipv4Addr,
    port: u16,
    reply: &'static [u8],
) -> Result<(), NetError> {
    let l = in_netns(Some(netns), || {
        TcpListener::bind((addr, port)).map_err(|e| NetError::io("bind", e))
    })?;
    std::thread::spawn(move || {
        for mut c in l.incoming().flatten() {
            let _ = c.write_all(reply);
        }
    });
    Ok(())
}

impl Drop for World {
    fn drop(&mut self) {
        let mut n = LinuxNet::default();
        let _ = n.delete_link(&self.host_veth);
        let _ = n.delete_netns(&self.ns);
    }
}
