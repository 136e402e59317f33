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
    // Everything goes at once, the veth pair too: teardown deletes it
    // rather than waiting for the kernel to destroy the netns.
    let netns = n.list_netns().unwrap();
    assert!(!netns.contains(&p1.netns) && !netns.contains(&p2.netns));
    assert!(!n.list_tags().unwrap().contains(&p1.tag));
    for p in [&p1, &p2] {
        assert!(dough_net::gone(&mut n, p).unwrap(), "{p:?}");
    }
    assert!(!host_links(&mut n).contains(&veth));
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
    // contract (names are the clone's), so setup again works at once
    // (dough itself never reuses a name: they are its clones' ids).
    assert!(dough_net::gone(&mut n, &first.plan).unwrap());
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

/// A scratch netns of this test's own, deleted on drop.
struct Ns(String);

impl Ns {
    fn new(what: &str) -> Ns {
        let name = format!("dough-ptest-{what}-{}", dough_net::testing::random_tag());
        LinuxNet::default().create_netns(&name).unwrap();
        Ns(name)
    }

    /// `nft` itself, run in this netns.
    fn nft(&self, args: &[&str], stdin: Option<&str>) -> String {
        use std::io::Write;
        use std::process::{Command, Stdio};
        let mut c = Command::new("ip")
            .args(["netns", "exec", &self.0, "nft"])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut input = c.stdin.take().unwrap();
        if let Some(s) = stdin {
            input.write_all(s.as_bytes()).unwrap();
        }
        drop(input);
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "nft {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = LinuxNet::default().delete_netns(&self.0);
    }
}

/// The netlink encoder against the real `nft`: every rule dough makes, for
/// every kind of policy, added once by `nft` from its JSON form and once
/// over netlink, lists the same — text and bytecode (`--debug=netlink`,
/// the expressions as the kernel holds them) — and deleting by tag over
/// netlink leaves the chains empty.
#[test]
fn priv_rules_over_netlink_are_what_nft_makes() {
    use dough_net::nft::Nft;
    use dough_net::plan::{Chain, TABLE};
    use serde_json::json;
    let pool = test_pool(4);
    let mut rules = Vec::new();
    for (k, egress) in [
        "nat",
        "none",
        "allow=10.1.0.0/16:443,192.168.1.5,10.0.0.0/8",
        "allow=*.example.com,api.example.org:22",
    ]
    .into_iter()
    .enumerate()
    {
        let id = format!("vm-n{k}{}", dough_net::testing::random_tag());
        let plan = NetPlan::new(
            "ptest",
            &id,
            egress.parse().unwrap(),
            pool,
            0,
            &InUse::default(),
        )
        .unwrap();
        rules.extend(plan.host_rules(pool));
        rules.extend(plan.ns_rules());
    }
    assert!(rules.len() > 20, "{rules:?}");

    let by_nft = Ns::new("json");
    let mut cmds = vec![json!({"add": {"table": {"family": "ip", "name": TABLE}}})];
    for c in Chain::ALL {
        let (kind, hook, prio) = c.base();
        cmds.push(json!({"add": {"chain": {
            "family": "ip", "table": TABLE, "name": c.name(),
            "type": kind, "hook": hook, "prio": prio, "policy": "accept",
        }}}));
    }
    cmds.extend(rules.iter().map(|r| json!({"add": r.to_json(TABLE)})));
    by_nft.nft(
        &["-j", "-f", "-"],
        Some(&json!({ "nftables": cmds }).to_string()),
    );

    let by_netlink = Ns::new("nl");
    in_netns(Some(&by_netlink.0), || {
        Nft::open()?.add_rules(TABLE, &rules)
    })
    .unwrap();
    // Adding again keeps the table and chains (no error, no second table).
    in_netns(Some(&by_netlink.0), || Nft::open()?.add_rules(TABLE, &[])).unwrap();

    // Handles differ between the two; nothing else may.
    let strip = |s: String| -> String {
        s.lines()
            .map(|l| match l.starts_with("ip ") {
                true => l.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
                false => l.to_string(),
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    let list = ["list", "table", "ip", TABLE];
    assert_eq!(by_netlink.nft(&list, None), by_nft.nft(&list, None));
    let debug = ["--debug=netlink", "list", "table", "ip", TABLE];
    let want = strip(by_nft.nft(&debug, None));
    assert!(want.contains("[ redir proto_min reg 1"), "{want}");
    assert_eq!(strip(by_netlink.nft(&debug, None)), want);

    // Listed and deleted over netlink, by tag.
    let listed = in_netns(Some(&by_netlink.0), || Nft::open()?.list(TABLE)).unwrap();
    assert_eq!(listed.len(), rules.len());
    let tags: std::collections::BTreeSet<&str> = rules.iter().map(|r| r.comment.as_str()).collect();
    for tag in &tags {
        let n = in_netns(Some(&by_netlink.0), || {
            let mut nft = Nft::open()?;
            let doomed: Vec<_> = nft
                .list(TABLE)?
                .into_iter()
                .filter(|r| r.comment == *tag)
                .collect();
            nft.delete(TABLE, &doomed)?;
            Ok(doomed.len())
        })
        .unwrap();
        assert_eq!(n, rules.iter().filter(|r| r.comment == *tag).count());
    }
    assert!(in_netns(Some(&by_netlink.0), || Nft::open()?.list(TABLE))
        .unwrap()
        .is_empty());
    // A table that does not exist lists as empty.
    let empty = Ns::new("empty");
    assert!(in_netns(Some(&empty.0), || Nft::open()?.list(TABLE))
        .unwrap()
        .is_empty());
    // A rule the kernel refuses fails the whole batch, with its reason.
    let mut bad = rules[0].clone();
    bad.chain = Chain::Input;
    bad.verdict = dough_net::plan::Verdict::Masquerade; // masquerade only in nat chains
    let err = in_netns(Some(&empty.0), || {
        Nft::open()?.add_rules(TABLE, &[rules[0].clone(), bad])
    })
    .unwrap_err();
    assert!(err.to_string().contains("adding nftables rules"), "{err}");
    assert!(in_netns(Some(&empty.0), || Nft::open()?.list(TABLE))
        .unwrap()
        .is_empty());
}
