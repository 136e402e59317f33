//! The real [`NetOps`]: rtnetlink for namespaces' links, addresses and
//! routes; the TUN ioctls for TAPs (netlink cannot create one); nftables
//! over netlink ([`crate::nft`]) for rules, one batch per call.
//!
//! Work inside a clone's namespace runs on a short-lived thread that has
//! joined it (`setns`): a netlink socket belongs to the namespace it was
//! opened in, and so does a process that thread spawns.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use futures::TryStreamExt;
use nix::sched::CloneFlags;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

use crate::nft::{Listed, Nft};
use crate::ops::{HostLink, NetError, NetOps};
use crate::plan::{Rule, TABLE};

/// Where named network namespaces live (as `ip netns` keeps them).
pub const NETNS_DIR: &str = "/run/netns";

/// Network operations on this host.
#[derive(Debug, Default)]
pub struct LinuxNet {
    /// The host namespace's nftables socket, kept open: closing a netfilter
    /// socket after a change waits for an RCU grace period in the kernel
    /// (~10 ms here), on every clone's setup and teardown.
    host_nft: Option<Nft>,
}

impl Clone for LinuxNet {
    /// A copy opens its own socket when it needs one.
    fn clone(&self) -> Self {
        LinuxNet::default()
    }
}

impl LinuxNet {
    /// The host's nftables socket (opened on first use).
    fn host_nft(&mut self) -> Result<&mut Nft, NetError> {
        if self.host_nft.is_none() {
            self.host_nft = Some(Nft::open()?);
        }
        Ok(self.host_nft.as_mut().expect("just opened"))
    }
}

fn ns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// Run `f` inside network namespace `netns` (or as it is for the host's):
/// this thread joins the namespace for the call and returns to its own
/// afterwards, also when `f` fails or panics. Threads and processes `f`
/// starts are born in `netns`, and so is every socket it opens.
pub fn in_netns<T: Send>(
    netns: Option<&str>,
    f: impl FnOnce() -> Result<T, NetError> + Send,
) -> Result<T, NetError> {
    let Some(name) = netns else { return f() };
    let path = ns_path(name);
    let target = File::open(&path).map_err(|e| NetError::io(format!("opening netns {name}"), e))?;
    let home = File::open("/proc/thread-self/ns/net")
        .map_err(|e| NetError::io("opening this thread's netns", e))?;
    nix::sched::setns(&target, CloneFlags::CLONE_NEWNET)
        .map_err(|e| NetError::op(format!("entering netns {name}"), e))?;
    let _back = Back(home);
    f()
}

/// Returns the thread to its namespace when dropped.
struct Back(File);

impl Drop for Back {
    fn drop(&mut self) {
        // Going back to a namespace this thread was in cannot fail short
        // of losing CAP_SYS_ADMIN meanwhile; a thread left elsewhere would
        // do the host's work in a clone's namespace, so that is fatal.
        if let Err(e) = nix::sched::setns(&self.0, CloneFlags::CLONE_NEWNET) {
            eprintln!("dough: returning to the host network namespace: {e}");
            std::process::abort();
        }
    }
}

thread_local! {
    /// One runtime per thread for rtnetlink conversations (building one per
    /// call cost more than the call).
    static RUNTIME: std::cell::RefCell<Option<tokio::runtime::Runtime>> =
        const { std::cell::RefCell::new(None) };
}

/// Run an rtnetlink conversation on this thread (in its namespace: the
/// socket is opened here, for this call).
fn netlink<T, F, Fut>(op: &str, f: F) -> Result<T, NetError>
where
    F: FnOnce(Handle) -> Fut,
    Fut: std::future::Future<Output = Result<T, rtnetlink::Error>>,
{
    RUNTIME.with(|cell| {
        let mut rt = cell.borrow_mut();
        if rt.is_none() {
            *rt = Some(
                tokio::runtime::Builder::new_current_thread()
                    .enable_io()
                    .build()
                    .map_err(|e| NetError::io("starting the netlink runtime", e))?,
            );
        }
        let rt = rt.as_ref().expect("just built");
        rt.block_on(async {
            let (conn, handle, _) =
                rtnetlink::new_connection().map_err(|e| NetError::io("opening netlink", e))?;
            // The connection is driven alongside the conversation and
            // dropped (its socket closed) with it.
            let talk = std::pin::pin!(f(handle));
            match futures::future::select(talk, std::pin::pin!(conn)).await {
                futures::future::Either::Left((r, _)) => r.map_err(|e| NetError::op(op, e)),
                futures::future::Either::Right(_) => {
                    Err(NetError::op(op, "the netlink connection closed"))
                }
            }
        })
    })
}

async fn index_of(h: &Handle, name: &str) -> Result<Option<u32>, rtnetlink::Error> {
    let mut links = h.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(Some(l)) => Ok(Some(l.header.index)),
        Ok(None) => Ok(None),
        // ENODEV: no such interface.
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
        Err(e) => Err(e),
    }
}

async fn need_index(h: &Handle, name: &str) -> Result<u32, rtnetlink::Error> {
    index_of(h, name)
        .await?
        .ok_or_else(|| rtnetlink::Error::NamespaceError(format!("no interface {name}")))
}

// TUN ioctls (linux/if_tun.h): libc's request codes and flags. TUNSETIFF
// is declared `_IOW('T', 202, int)` although it takes a `struct ifreq`.
nix::ioctl_write_ptr_bad!(tun_set_iff, libc::TUNSETIFF, libc::ifreq);
nix::ioctl_write_int_bad!(tun_set_persist, libc::TUNSETPERSIST);
nix::ioctl_write_int_bad!(tun_set_owner, libc::TUNSETOWNER);

fn make_tap(name: &str, owner: u32) -> Result<(), NetError> {
    let op = format!("creating TAP {name}");
    let tun = File::options()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(|e| NetError::io(op.clone(), e))?;
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.len() >= req.ifr_name.len() {
        return Err(NetError::op(op, "name too long"));
    }
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
    let fd = tun.as_raw_fd();
    // SAFETY: fd is an open /dev/net/tun; req is a valid ifreq that outlives the call.
    unsafe { tun_set_iff(fd, &req) }.map_err(|e| NetError::op(op.clone(), e))?;
    // SAFETY: fd is the TUN fd just attached to the device; the argument is a plain integer.
    unsafe { tun_set_owner(fd, owner as libc::c_int) }.map_err(|e| NetError::op(op.clone(), e))?;
    // SAFETY: as above.
    unsafe { tun_set_persist(fd, 1) }.map_err(|e| NetError::op(op, e))?;
    Ok(())
}

/// Make `/run/netns` a shared mount of its own, as `ip netns add` does.
/// Without this, the first `ip netns add` on the host bind-mounts the
/// directory over itself and hides (and pins) every namespace mounted in it
/// before.
fn make_netns_dir_shared() -> nix::Result<()> {
    use nix::mount::{mount, MsFlags};
    let shared = || {
        mount(
            None::<&str>,
            NETNS_DIR,
            None::<&str>,
            MsFlags::MS_SHARED | MsFlags::MS_REC,
            None::<&str>,
        )
    };
    match shared() {
        Ok(()) => Ok(()),
        // Not a mount point yet: make it one, then share it.
        Err(nix::errno::Errno::EINVAL) => {
            mount(
                Some(NETNS_DIR),
                NETNS_DIR,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )?;
            shared()
        }
        Err(e) => Err(e),
    }
}

/// Passes of delete-then-look [`LinuxNet::flush_tag`] makes.
const FLUSH_PASSES: usize = 5;

impl NetOps for LinuxNet {
    fn create_netns(&mut self, name: &str) -> Result<(), NetError> {
        let op = format!("creating netns {name}");
        std::fs::create_dir_all(NETNS_DIR).map_err(|e| NetError::io(op.clone(), e))?;
        make_netns_dir_shared().map_err(|e| NetError::op(op.clone(), e))?;
        let path = ns_path(name);
        File::options()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| NetError::io(op.clone(), e))?;
        // A thread of its own unshares (so this one stays on the host) and
        // pins its new namespace by bind-mounting it onto the file.
        let r = std::thread::scope(|s| {
            s.spawn(|| -> Result<(), NetError> {
                nix::sched::unshare(CloneFlags::CLONE_NEWNET)
                    .map_err(|e| NetError::op(op.clone(), e))?;
                // No IPv6 at all inside (no link-local addresses either):
                // a clone's traffic is IPv4 through its gateway, and links
                // come up without IPv6's address configuration. A kernel
                // without IPv6 has no such files, and nothing to disable.
                for f in ["default", "all"] {
                    let p = format!("/proc/sys/net/ipv6/conf/{f}/disable_ipv6");
                    match std::fs::write(&p, b"1") {
                        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                            return Err(NetError::io(format!("{op}: {p}"), e))
                        }
                        _ => {}
                    }
                }
                nix::mount::mount(
                    Some("/proc/thread-self/ns/net"),
                    &path,
                    None::<&str>,
                    nix::mount::MsFlags::MS_BIND,
                    None::<&str>,
                )
                .map_err(|e| NetError::op(op.clone(), e))
            })
            .join()
            .unwrap_or_else(|_| Err(NetError::op(op.clone(), "thread panicked")))
        });
        if r.is_err() {
            let _ = std::fs::remove_file(&path);
        }
        r
    }

    fn delete_netns(&mut self, name: &str) -> Result<(), NetError> {
        let path = ns_path(name);
        if !path.exists() {
            return Ok(());
        }
        let _ = nix::mount::umount2(&path, nix::mount::MntFlags::MNT_DETACH);
        std::fs::remove_file(&path).map_err(|e| NetError::io(format!("deleting netns {name}"), e))
    }

    fn create_tap(&mut self, netns: &str, name: &str, owner: u32) -> Result<(), NetError> {
        in_netns(Some(netns), || make_tap(name, owner))
    }

    fn create_veth(&mut self, host: &str, netns: &str, peer: &str) -> Result<(), NetError> {
        let ns = File::open(ns_path(netns))
            .map_err(|e| NetError::io(format!("opening netns {netns}"), e))?;
        let fd = ns.as_raw_fd();
        netlink(&format!("creating veth {host}/{peer}"), |h| async move {
            use rtnetlink::packet_route::link::{InfoData, InfoKind, InfoVeth};
            use rtnetlink::LinkMessageBuilder;
            // The peer is created directly inside the netns: moving an
            // interface between namespaces afterwards waits for an RCU
            // grace period (tens of milliseconds).
            let peer_msg = LinkMessageBuilder::<LinkUnspec>::new()
                .name(peer.to_string())
                .setns_by_fd(fd)
                .build();
            let msg = LinkMessageBuilder::<LinkUnspec>::new_with_info_kind(InfoKind::Veth)
                .name(host.to_string())
                .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_msg)))
                .build();
            h.link().add(msg).execute().await
        })
    }

    fn delete_link(&mut self, name: &str) -> Result<(), NetError> {
        netlink(&format!("deleting {name}"), |h| async move {
            match index_of(&h, name).await? {
                // It may vanish meanwhile: the kernel removes a veth whose
                // peer's namespace is being destroyed, asynchronously.
                Some(i) => match h.link().del(i).execute().await {
                    Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => {
                        Ok(())
                    }
                    r => r,
                },
                None => Ok(()),
            }
        })
    }

    fn add_addr(
        &mut self,
        netns: Option<&str>,
        ifname: &str,
        addr: Ipv4Addr,
        prefix: u8,
    ) -> Result<(), NetError> {
        in_netns(netns, || {
            netlink(
                &format!("adding {addr}/{prefix} to {ifname}"),
                |h| async move {
                    let i = need_index(&h, ifname).await?;
                    h.address().add(i, IpAddr::V4(addr), prefix).execute().await
                },
            )
        })
    }

    fn link_up(&mut self, netns: Option<&str>, ifname: &str) -> Result<(), NetError> {
        in_netns(netns, || {
            netlink(&format!("bringing {ifname} up"), |h| async move {
                let i = need_index(&h, ifname).await?;
                h.link()
                    .set(LinkUnspec::new_with_index(i).up().build())
                    .execute()
                    .await
            })
        })
    }

    fn add_default_route(&mut self, netns: &str, via: Ipv4Addr) -> Result<(), NetError> {
        in_netns(Some(netns), || {
            netlink(&format!("default route via {via}"), |h| async move {
                h.route()
                    .add(RouteMessageBuilder::<Ipv4Addr>::new().gateway(via).build())
                    .execute()
                    .await
            })
        })
    }

    fn enable_forwarding(&mut self, netns: Option<&str>) -> Result<(), NetError> {
        in_netns(netns, || {
            // /proc/sys/net is the namespace of whoever opens it.
            std::fs::write("/proc/sys/net/ipv4/ip_forward", b"1")
                .map_err(|e| NetError::io("enabling IPv4 forwarding", e))
        })
    }

    fn add_rules(&mut self, netns: Option<&str>, rules: &[Rule]) -> Result<(), NetError> {
        if rules.is_empty() {
            return Ok(());
        }
        match netns {
            None => self.host_nft()?.add_rules(TABLE, rules),
            Some(_) => in_netns(netns, || {
                let mut nft = Nft::open()?;
                let r = nft.add_rules(TABLE, rules);
                nft.close_in_background();
                r
            }),
        }
    }

    /// Delete every rule tagged `tag`, and look again until none is
    /// listed: other doughs change the ruleset at the same time (`dough
    /// down --all` tears 8 clones down at once), and a rule one listing
    /// missed would be left behind (seen once: 1 of 16 clones' rules).
    fn flush_tag(&mut self, tag: &str) -> Result<usize, NetError> {
        let nft = self.host_nft()?;
        let mut deleted = 0;
        for _ in 0..FLUSH_PASSES {
            let doomed: Vec<Listed> = nft
                .list(TABLE)?
                .into_iter()
                .filter(|r| r.comment == tag)
                .collect();
            if doomed.is_empty() {
                return Ok(deleted);
            }
            nft.delete(TABLE, &doomed)?;
            deleted += doomed.len();
        }
        Err(NetError::op(
            "deleting nftables rules",
            format!("rules tagged {tag} were still listed after {FLUSH_PASSES} passes"),
        ))
    }

    fn list_netns(&mut self) -> Result<Vec<String>, NetError> {
        let mut v: Vec<String> = match std::fs::read_dir(NETNS_DIR) {
            Ok(rd) => rd
                .flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(NetError::io("listing network namespaces", e)),
        };
        v.sort();
        Ok(v)
    }

    fn list_links(&mut self) -> Result<Vec<HostLink>, NetError> {
        use rtnetlink::packet_route::link::LinkAttribute;
        netlink("listing interfaces", |h| async move {
            let mut out = Vec::new();
            let mut links = h.link().get().execute();
            while let Some(l) = links.try_next().await? {
                let mut name = None;
                let mut peer_elsewhere = false;
                for a in l.attributes {
                    match a {
                        LinkAttribute::IfName(n) => name = Some(n),
                        LinkAttribute::LinkNetNsId(_) => peer_elsewhere = true,
                        _ => {}
                    }
                }
                if let Some(name) = name {
                    out.push(HostLink {
                        name,
                        peer_elsewhere,
                    });
                }
            }
            Ok(out)
        })
    }

    fn host_addrs(&mut self) -> Result<Vec<(String, Ipv4Addr, u8)>, NetError> {
        use rtnetlink::packet_route::address::AddressAttribute;
        netlink("listing addresses", |h| async move {
            let mut names = std::collections::HashMap::new();
            let mut links = h.link().get().execute();
            while let Some(l) = links.try_next().await? {
                for a in l.attributes {
                    if let rtnetlink::packet_route::link::LinkAttribute::IfName(n) = a {
                        names.insert(l.header.index, n);
                    }
                }
            }
            let mut out = Vec::new();
            let mut addrs = h.address().get().execute();
            while let Some(m) = addrs.try_next().await? {
                for a in m.attributes {
                    if let AddressAttribute::Address(IpAddr::V4(ip)) = a {
                        if let Some(n) = names.get(&m.header.index) {
                            out.push((n.clone(), ip, m.header.prefix_len));
                        }
                    }
                }
            }
            Ok(out)
        })
    }

    fn list_tags(&mut self) -> Result<Vec<String>, NetError> {
        let mut tags: Vec<String> = self
            .host_nft()?
            .list(TABLE)?
            .into_iter()
            .map(|r| r.comment)
            .filter(|c| !c.is_empty())
            .collect();
        tags.sort();
        tags.dedup();
        Ok(tags)
    }
}
