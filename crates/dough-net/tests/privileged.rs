//! Privileged tier: real network namespaces, veths, TAPs and nftables
//! rules (needs root, /dev/net/tun and nft; scripts/test installs nft).
//! No VM is involved: a clone's guest is stood in for by its netns, which
//! is where the guest's traffic enters the host.

use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use dough_net::linux::{in_netns, LinuxNet};
use dough_net::plan::{InUse, Ipv4Net, NetPlan};
use dough_net::testing::{serve_in, World};
use dough_net::{Egress, NetError, NetOps};

/// A pool private to one test, so parallel tests never share subnets.
fn test_pool(n: u8) -> Ipv4Net {
    format!(
        "10.{}.{}.0/24",
        200 + n,
        dough_net::testing::random_tag().as_bytes()[0] % 200
    )
    .parse()
    .unwrap()
}

fn links_in(netns: &str) -> Vec<String> {
    in_netns(Some(netns), || LinuxNet::default().list_links())
        .unwrap()
        .into_iter()
        .map(|l| l.name)
        .collect()
}

/// Connect from inside `netns` to `to`; what the server said, if anything.
fn connect_from(netns: &str, to: SocketAddr) -> Option<String> {
    in_netns(Some(netns), || {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(2))
            .map_err(|e| NetError::io("connect", e))?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok();
        let mut buf = String::new();
        s.read_to_string(&mut buf)
            .map_err(|e| NetError::io("read", e))?;
        Ok(buf)
    })
    .ok()
}

struct Clone {
    plan: NetPlan,
}

impl Drop for Clone {
    fn drop(&mut self) {
        let _ = dough_net::teardown(&mut LinuxNet::default(), &self.plan);
    }
}

fn clone(egress: Egress, pool: Ipv4Net, used: &mut InUse) -> Clone {
    let id = format!("vm-t{}", dough_net::testing::random_tag());
    // A scope of its own: the sweep of any dough home never touches it.
    let plan = NetPlan::new("ptest", &id, egress, pool, 0, used).unwrap();
    used.add(&plan);
    dough_net::setup(&mut LinuxNet::default(), &plan, pool).unwrap();
    Clone { plan }
}

#[test]
fn priv_setup_builds_the_plan_and_teardown_leaves_nothing() {
    let pool = test_pool(0);
    let mut used = InUse::default();
    let nat = clone(Egress::Nat, pool, &mut used);
    let none = clone(Egress::None, pool, &mut used);
    let mut n = LinuxNet::default();

    let netns = n.list_netns().unwrap();
    assert!(netns.contains(&nat.plan.netns) && netns.contains(&none.plan.netns));
    let inside = links_in(&nat.plan.netns);
    for l in ["lo", "tap0", "veth0"] {
        assert!(inside.contains(&l.to_string()), "{inside:?}");
    }
    assert_eq!(links_in(&none.plan.netns), vec!["lo", "tap0"]);
    let veth = nat.plan.transfer.as_ref().unwrap().host_veth.clone();
    let host_links = |n: &mut LinuxNet| -> Vec<String> {
        n.list_links()
            .unwrap()
            .into_iter()
            .map(|l| l.name)
            .collect()
    };
    assert!(host_links(&mut n).contains(&veth));
    let tags = n.list_tags().unwrap();
    assert!(tags.contains(&nat.plan.tag), "{tags:?}");
    assert!(!tags.contains(&none.plan.tag), "none has no host rules");

    let (p1, p2) = (nat.plan.clone(), none.plan.clone());
    drop(nat);
    drop(none);
    let netns = n.list_netns().unwrap();
    assert!(!netns.contains(&p1.netns) && !netns.contains(&p2.netns));
    assert!(!host_links(&mut n).contains(&veth));
    assert!(!n.list_tags().unwrap().contains(&p1.tag));
}

#[test]
fn priv_a_failed_setup_rolls_back() {
    let pool = test_pool(1);
    let mut used = InUse::default();
    let first = clone(Egress::Nat, pool, &mut used);
    // Same netns name again: creation fails, and the first is untouched.
    let e = dough_net::setup(&mut LinuxNet::default(), &first.plan, pool).unwrap_err();
    assert!(e.to_string().contains("creating netns"), "{e}");
    let mut n = LinuxNet::default();
    // The rollback of the duplicate tore down the same names: that is the
    // contract (names are the clone's), so setup again must work.
    dough_net::setup(&mut n, &first.plan, pool).unwrap();
    assert!(links_in(&first.plan.netns).contains(&"tap0".to_string()));
}

#[test]
fn priv_isolation_and_egress_policies() {
    let pool = test_pool(2);
    let world_net = dough_net::testing::world_net(199);
    let world = World::new(&dough_net::testing::random_tag(), world_net).unwrap();
    world.serve(8080, b"hello").unwrap();
    world.serve(9090, b"hello").unwrap();
    let server = |port| SocketAddr::from((world.addr, port));
    let mut used = InUse::default();
    let a = clone(Egress::Nat, pool, &mut used);
    let b = clone(Egress::Nat, pool, &mut used);
    let allow = clone(
        format!("allow={}:8080", world.addr).parse().unwrap(),
        pool,
        &mut used,
    );
    let none = clone(Egress::None, pool, &mut used);

    // nat reaches the world, through NAT.
    assert_eq!(
        connect_from(&a.plan.netns, server(8080)).as_deref(),
        Some("hello")
    );
    // allow reaches only what is allowed.
    assert_eq!(
        connect_from(&allow.plan.netns, server(8080)).as_deref(),
        Some("hello")
    );
    assert_eq!(connect_from(&allow.plan.netns, server(9090)), None);
    // none has no way out at all.
    assert_eq!(connect_from(&none.plan.netns, server(8080)), None);
    // Clones cannot reach each other, nor the host behind their veth.
    let tb = b.plan.transfer.as_ref().unwrap();
    let ta = a.plan.transfer.as_ref().unwrap();
    serve_in(&b.plan.netns, tb.ns_addr, 7070, b"b").unwrap();
    assert_eq!(
        connect_from(&a.plan.netns, SocketAddr::from((tb.ns_addr, 7070))),
        None
    );
    assert_eq!(
        connect_from(&a.plan.netns, SocketAddr::from((tb.host_addr, 22))),
        None
    );
    let host_listener = TcpListener::bind((ta.host_addr, 0)).unwrap();
    let hp = host_listener.local_addr().unwrap().port();
    assert_eq!(
        connect_from(&a.plan.netns, SocketAddr::from((ta.host_addr, hp))),
        None
    );
    // From B itself the listener works (so the failures above are policy).
    assert_eq!(
        connect_from(&b.plan.netns, SocketAddr::from((tb.ns_addr, 7070))).as_deref(),
        Some("b")
    );
}

#[test]
fn priv_the_command_baseline_builds_the_same_network() {
    use dough_net::commands::CommandNet;
    let pool = test_pool(3);
    let id = format!("vm-c{}", dough_net::testing::random_tag());
    let plan = NetPlan::new("ptest", &id, Egress::Nat, pool, 0, &InUse::default()).unwrap();
    let mut c = CommandNet::default();
    dough_net::setup(&mut c, &plan, pool).unwrap();
    let inside = links_in(&plan.netns);
    for l in ["lo", "tap0", "veth0"] {
        assert!(inside.contains(&l.to_string()), "{inside:?}");
    }
    let mut n = LinuxNet::default();
    assert!(n.list_tags().unwrap().contains(&plan.tag));
    dough_net::teardown(&mut c, &plan).unwrap();
    assert!(!n.list_netns().unwrap().contains(&plan.netns));
    assert!(!n.list_tags().unwrap().contains(&plan.tag));
}
