//! VM tier: per-clone network isolation with real guests (root).

mod common;

use std::net::Ipv4Addr;
use std::path::Path;

use common::*;
use dough_net::linux::LinuxNet;
use dough_net::testing::{serve_in, World};
use dough_net::NetOps;

const ADDR_PY: &str = "import socket,fcntl,struct
s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)
print(socket.inet_ntoa(fcntl.ioctl(s.fileno(),0x8915,struct.pack('256s',b'eth0'))[20:24]))";

const CONNECT_PY: &str = "import socket,sys
s=socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=3)
print(s.recv(16).decode())";

fn up(home: &Path, n: u32, net: &str) -> Vec<String> {
    let out = run(home, &["up", &n.to_string(), "--net", net]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout).lines().map(String::from).collect()
}

/// Connect from inside clone `id` to host:port; what came back, if anything.
fn connect(home: &Path, id: &str, host: &str, port: u16) -> Option<String> {
    let out = run(
        home,
        &[
            "exec",
            id,
            "--",
            "python3",
            "-c",
            CONNECT_PY,
            host,
            &port.to_string(),
        ],
    );
    // Through the gateway a refused connection is accepted and then
    // closed: nothing coming back is the same as no connection.
    let got = text(&out.stdout).trim().to_string();
    (out.status.success() && !got.is_empty()).then_some(got)
}

fn record(home: &Path, id: &str) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(home.join("vms").join(id).join("state.json")).unwrap())
        .unwrap()
}

#[test]
fn vm_net_clones_share_one_address_and_cannot_reach_each_other() {
    let home = private_home();
    let h = home.path();
    let ids = up(h, 2, "nat");
    for id in &ids {
        let out = run(h, &["exec", id, "--", "python3", "-c", ADDR_PY]);
        assert_eq!(
            text(&out.stdout).trim(),
            "172.16.0.2",
            "{}",
            text(&out.stderr)
        );
    }
    let b = record(h, &ids[1]);
    let t = &b["net"]["transfer"];
    for addr in [
        t["ns_addr"].as_str().unwrap(),
        t["host_addr"].as_str().unwrap(),
    ] {
        assert_eq!(connect(h, &ids[0], addr, 22), None, "A reached {addr}");
    }
    // A listener inside B's netns (on its transfer address) stays out of
    // A's reach (and B's own guest's: clones' TCP leaves through the
    // gateway, which never connects to a clone's network), while it works
    // from inside B's netns itself.
    let ns = b["net"]["netns"].as_str().unwrap().to_string();
    let ns_addr: Ipv4Addr = t["ns_addr"].as_str().unwrap().parse().unwrap();
    serve_in(&ns, ns_addr, 7070, b"b").unwrap();
    assert_eq!(connect(h, &ids[0], &ns_addr.to_string(), 7070), None);
    assert_eq!(connect(h, &ids[1], &ns_addr.to_string(), 7070), None);
    let inside = dough_net::linux::in_netns(Some(&ns), || {
        let mut s = std::net::TcpStream::connect((ns_addr, 7070))
            .map_err(|e| dough_net::NetError::io("connect", e))?;
        let mut b = String::new();
        std::io::Read::read_to_string(&mut s, &mut b).ok();
        Ok(b)
    });
    assert_eq!(inside.unwrap(), "b");
    let out = run(h, &["down", "--all"]);
    assert!(out.status.success());
}

#[test]
fn vm_net_egress_policies() {
    let home = private_home();
    let h = home.path();
    let s = dough_net::testing::random_tag();
    let net = dough_net::testing::world_net(198);
    let world = World::new(&s, net).unwrap();
    world.serve(8080, b"hello").unwrap();
    world.serve(9090, b"hello").unwrap();
    let w = world.addr.to_string();
    let nat = &up(h, 1, "nat")[0];
    let none = &up(h, 1, "none")[0];
    let allow = &up(h, 1, &format!("allow={w}:8080"))[0];
    assert_eq!(connect(h, nat, &w, 8080).as_deref(), Some("hello"));
    // The host's own addresses are never a destination, even under nat:
    // here the host side of the world's link, with a listener on it.
    let host_side = net.host(1);
    let l = std::net::TcpListener::bind((host_side, 0)).unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut c in l.incoming().flatten() {
            let _ = std::io::Write::write_all(&mut c, b"host");
        }
    });
    assert_eq!(connect(h, nat, &host_side.to_string(), port), None);
    // (The listener itself works: the world reaches it.)
    let from_world = dough_net::linux::in_netns(Some(&world.ns), || {
        let mut s = std::net::TcpStream::connect((host_side, port))
            .map_err(|e| dough_net::NetError::io("connect", e))?;
        let mut b = String::new();
        std::io::Read::read_to_string(&mut s, &mut b).ok();
        Ok(b)
    });
    assert_eq!(from_world.unwrap(), "host");
    assert_eq!(connect(h, none, &w, 8080), None);
    assert!(
        record(h, none)["net"]["transfer"].is_null(),
        "none has no veth"
    );
    assert_eq!(connect(h, allow, &w, 8080).as_deref(), Some("hello"));
    assert_eq!(connect(h, allow, &w, 9090), None);
    // Under nat too, TCP goes through the clone's gateway and is logged;
    // the host's own address was refused there.
    let log = text(&run(h, &["logs", "--net", nat]).stdout);
    assert!(
        log.contains(&format!("allow tcp {w}:8080 -> {w}:8080")),
        "{log}"
    );
    assert!(
        log.contains(&format!(
            "DENY  tcp {host_side}:{port} (never reachable: the host itself)"
        )),
        "{log}"
    );
    let table = run(h, &["ps"]);
    assert!(
        text(&table.stdout).contains(&format!("allow={w}/32:8080")),
        "{}",
        text(&table.stdout)
    );
    let out = run(h, &["down", "--all"]);
    assert!(out.status.success());
}

/// Network objects of `home`'s clones still on the host.
fn net_objects(home: &Path, plans: &[serde_json::Value]) -> Vec<String> {
    let mut n = LinuxNet::default();
    let netns = n.list_netns().unwrap();
    let links: Vec<String> = n
        .list_links()
        .unwrap()
        .into_iter()
        .map(|l| l.name)
        .collect();
    let tags = n.list_tags().unwrap();
    let mut left = Vec::new();
    for p in plans {
        let ns = p["netns"].as_str().unwrap().to_string();
        if netns.contains(&ns) {
            left.push(ns);
        }
        if let Some(v) = p["transfer"]["host_veth"].as_str() {
            if links.contains(&v.to_string()) {
                left.push(v.to_string());
            }
        }
        let tag = p["tag"].as_str().unwrap().to_string();
        if tags.contains(&tag) {
            left.push(tag);
        }
    }
    let _ = home;
    left
}

#[test]
fn vm_net_sixteen_clones_leave_nothing_behind() {
    let home = private_home();
    let h = home.path();
    let ids = up(h, 16, "nat");
    assert_eq!(ids.len(), 16);
    let plans: Vec<serde_json::Value> = ids.iter().map(|id| record(h, id)["net"].clone()).collect();
    let mut veths: Vec<&str> = plans
        .iter()
        .map(|p| p["transfer"]["host_veth"].as_str().unwrap())
        .collect();
    assert!(veths.iter().all(|v| v.len() <= 15));
    veths.sort();
    veths.dedup();
    assert_eq!(veths.len(), 16, "distinct names");
    assert_eq!(net_objects(h, &plans).len(), 16 * 3);
    let gateways = gateway_pids(h);
    assert_eq!(gateways.len(), 16);
    let out = run(h, &["down", "--all"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(net_objects(h, &plans), Vec::<String>::new());
    assert!(
        gateways.iter().all(|p| process_gone(*p)),
        "a gateway outlived its clone"
    );
}

#[test]
#[cfg_attr(
    not(feature = "test-hooks"),
    ignore = "stops dough with a test hook: needs --features dough/test-hooks (scripts/test has it)"
)]
fn vm_net_sigkill_mid_up_is_reclaimed() {
    let home = private_home();
    let h = home.path();
    let (mut child, seen) = spawn_until(
        h,
        &["up", "3"],
        ("DOUGH_TEST_HOLD_BEFORE_HANDOVER", "1"),
        "holding the clones",
    );
    let plans: Vec<serde_json::Value> = records(h).iter().map(|r| r["net"].clone()).collect();
    assert_eq!(plans.len(), 3, "{seen}");
    assert_eq!(net_objects(h, &plans).len(), 9);
    let gateways = gateway_pids(h);
    assert_eq!(gateways.len(), 3);
    kill_dough_and_its_watchdog(&mut child);
    let out = run(h, &["ps"]);
    assert_eq!(
        text(&out.stderr).matches("reclaimed orphaned VM").count(),
        3,
        "{}",
        text(&out.stderr)
    );
    assert_eq!(net_objects(h, &plans), Vec::<String>::new());
    assert!(
        gateways.iter().all(|p| process_gone(*p)),
        "a reclaimed clone's gateway is still running"
    );
}

/// The gateway processes `home`'s clones recorded.
fn gateway_pids(home: &Path) -> Vec<i64> {
    records(home)
        .iter()
        .filter_map(|r| r["gateway"]["pid"].as_i64())
        .collect()
}

#[test]
#[cfg_attr(
    not(feature = "test-hooks"),
    ignore = "stops dough with a test hook: needs --features dough/test-hooks (scripts/test has it)"
)]
fn vm_net_sigkill_mid_network_setup_is_reclaimed() {
    let home = private_home();
    let h = home.path();
    // Stop after the veth exists and has its host address, before the
    // rest: a crash in the middle of building the network.
    let (mut child, seen) = spawn_until(
        h,
        &["up", "1"],
        ("DOUGH_TEST_HOLD_IN_NET_SETUP", "8"),
        "holding network setup",
    );
    // The rest of the network is built while the VMM and the gateway
    // start: wait (deadline 60 s) until both are recorded, so the crash is
    // one with a VMM running and its network half-built.
    let end = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let recs = loop {
        let recs = records(h);
        let started =
            |r: &serde_json::Value| r["vmm"]["pid"].is_i64() && r["gateway"]["pid"].is_i64();
        if recs.len() == 1 && started(&recs[0]) || std::time::Instant::now() >= end {
            break recs;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert_eq!(recs.len(), 1, "{seen}");
    assert_eq!(recs[0]["state"], "starting", "{:?}", recs[0]);
    let vmm = recs[0]["vmm"]["pid"].as_i64().unwrap();
    let gateway = recs[0]["gateway"]["pid"].as_i64().unwrap();
    let plans = vec![recs[0]["net"].clone()];
    let present = net_objects(h, &plans);
    assert_eq!(
        present.len(),
        2,
        "netns and veth exist, no rules yet: {present:?}"
    );
    kill_dough_and_its_watchdog(&mut child);
    let out = run(h, &["ps"]);
    assert!(
        text(&out.stderr).contains("reclaimed orphaned VM"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(net_objects(h, &plans), Vec::<String>::new());
    assert!(vm_dirs(h).is_empty());
    assert!(
        process_gone(vmm),
        "the reclaimed clone's VMM is still running"
    );
    assert!(
        process_gone(gateway),
        "the reclaimed clone's gateway is still running"
    );
}

/// dough SIGKILLed after spawning a VMM and before recording it: no record
/// names that VMM, but it runs in its VM's cgroup (joined before it ran),
/// and the next sweep finds it there and kills it.
#[test]
#[cfg_attr(
    not(feature = "test-hooks"),
    ignore = "stops dough with a test hook: needs --features dough/test-hooks (scripts/test has it)"
)]
fn vm_sigkill_between_spawning_a_vmm_and_recording_it_is_reclaimed() {
    if dough_fabric::cgroup::layout().is_none() {
        panic!("this host has no cgroup hierarchy dough can use (cpu, memory, pids)");
    }
    let home = private_home();
    let h = home.path();
    let (mut child, seen) = spawn_until(
        h,
        &["up", "1", "--net", "none"],
        ("DOUGH_TEST_HOLD_AFTER_VMM_SPAWN", "1"),
        "holding after spawning the VMM",
    );
    let pid: i64 = seen
        .split("(pid ")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {seen}"));
    let recs = records(h);
    assert_eq!(recs.len(), 1, "{seen}");
    assert!(recs[0]["vmm"].is_null(), "not recorded: {:?}", recs[0]);
    assert!(!process_gone(pid), "the VMM runs");
    kill_dough_and_its_watchdog(&mut child);
    let out = run(h, &["ps"]);
    assert!(vm_dirs(h).is_empty(), "{}", text(&out.stderr));
    let end = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !process_gone(pid) && std::time::Instant::now() < end {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(
        process_gone(pid),
        "the unrecorded VMM (pid {pid}) is still running: {}",
        text(&out.stderr)
    );
}
