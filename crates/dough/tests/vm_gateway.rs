//! VM tier: the egress gateway with real guests (root). A stand-in world
//! (two namespaces behind host veths) serves TCP under names the gateways
//! answer from their test table (DOUGH_TEST_GATEWAY_HOSTS), so nothing off
//! this machine is contacted.
#![cfg(feature = "test-hooks")]

mod common;

use std::path::Path;

use common::*;
use dough_net::testing::World;

/// Connect to argv[1]:argv[2], send an HTTP/1.1 request for host argv[3],
/// print what came back (nothing: the connection was closed).
const HTTP_PY: &str = "import socket,sys
s=socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=20)
s.sendall(b'GET / HTTP/1.1\\r\\nHost: '+sys.argv[3].encode()+b'\\r\\n\\r\\n')
print(s.recv(64).decode())";

/// The same with a real TLS ClientHello for server name argv[3] (made by
/// Python's ssl module), and nothing more of TLS: the world's servers
/// answer with a plain banner that names them.
const TLS_PY: &str = "import socket,ssl,sys
c=ssl.create_default_context(); c.check_hostname=False; c.verify_mode=ssl.CERT_NONE
i,o=ssl.MemoryBIO(),ssl.MemoryBIO()
t=c.wrap_bio(i,o,server_hostname=sys.argv[3])
try: t.do_handshake()
except ssl.SSLWantReadError: pass
s=socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=20)
s.sendall(o.read())
print(s.recv(64).decode())";

const RESOLVE_PY: &str = "import socket,sys
print(socket.gethostbyname(sys.argv[1]))";

/// `dough up 1 --net NET` with the gateways' name table `hosts`.
fn up(home: &Path, net: &str, hosts: &str) -> String {
    let out = dough(home)
        .args(["up", "1", "--net", net])
        .env("DOUGH_TEST_GATEWAY_HOSTS", hosts)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout).trim().to_string()
}

/// Run a Python script in clone `id`: (success, stdout trimmed, stderr).
fn py(home: &Path, id: &str, script: &str, args: &[&str]) -> (bool, String, String) {
    let mut a = vec!["exec", id, "--", "python3", "-c", script];
    a.extend(args);
    let out = run(home, &a);
    (
        out.status.success(),
        text(&out.stdout).trim().to_string(),
        text(&out.stderr),
    )
}

fn net_log(home: &Path, id: &str) -> Vec<serde_json::Value> {
    let out = run(home, &["logs", "--net", "--json", id]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn record(home: &Path, id: &str) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(home.join("vms").join(id).join("state.json")).unwrap())
        .unwrap()
}

struct Worlds {
    a: World,
    b: World,
}

/// World A serves the allowed name; world B is an address no rule allows.
/// Every server names itself and its port.
fn worlds() -> Worlds {
    let s = dough_net::testing::random_tag();
    let a = World::new(&format!("a{s}"), dough_net::testing::world_net(197)).unwrap();
    let b = World::new(&format!("b{s}"), dough_net::testing::world_net(196)).unwrap();
    for (w, tag) in [(&a, "A"), (&b, "B")] {
        for port in [80u16, 443, 8080] {
            let reply: &'static [u8] = Box::leak(format!("{tag}{port}").into_bytes().into());
            w.serve(port, reply).unwrap();
        }
    }
    Worlds { a, b }
}

#[test]
fn vm_gateway_allows_by_name_and_nothing_else() {
    let home = private_home();
    let h = home.path();
    let w = worlds();
    let (a, b) = (w.a.addr.to_string(), w.b.addr.to_string());
    let id = up(
        h,
        "allow=allowed.test",
        &format!("allowed.test={a},other.test={b}"),
    );
    assert!(
        record(h, &id)["net"]["transfer"].is_null(),
        "a policy of names forwards nothing: no veth"
    );

    // The allowed name resolves (dough's DNS) and answers on 80 and 443.
    let (ok, out, err) = py(h, &id, RESOLVE_PY, &["allowed.test"]);
    assert!(ok, "{err}");
    assert_eq!(out, a);
    assert_eq!(
        py(h, &id, HTTP_PY, &["allowed.test", "80", "allowed.test"]).1,
        "A80"
    );
    assert_eq!(
        py(h, &id, TLS_PY, &["allowed.test", "443", "allowed.test"]).1,
        "A443"
    );

    // Any other name is NXDOMAIN, even one the gateway could resolve.
    let (ok, _, err) = py(h, &id, RESOLVE_PY, &["other.test"]);
    assert!(!ok && err.contains("Name or service not known"), "{err}");

    // An allowed name sent to a forbidden address reaches the allowed
    // name's own address, never the one dialed.
    assert_eq!(py(h, &id, TLS_PY, &[&b, "443", "allowed.test"]).1, "A443");
    assert_eq!(py(h, &id, HTTP_PY, &[&b, "80", "allowed.test"]).1, "A80");
    // A denied name, or a raw address, gets nowhere.
    assert_eq!(py(h, &id, TLS_PY, &[&b, "443", "other.test"]).1, "");
    assert_eq!(py(h, &id, HTTP_PY, &[&b, "80", "other.test"]).1, "");
    assert_eq!(py(h, &id, HTTP_PY, &[&b, "8080", "allowed.test"]).1, "");
    assert_eq!(py(h, &id, HTTP_PY, &[&a, "8080", "allowed.test"]).1, "");

    // IPv6 goes nowhere.
    let (ok, _, err) = py(
        h,
        &id,
        "import socket; socket.create_connection(('2001:db8::1',443),timeout=5)",
        &[],
    );
    assert!(!ok && err.contains("unreachable"), "{err}");

    // Every query and connection is in the audit log, with its verdict.
    let log = net_log(h, &id);
    let has = |kind: &str, verdict: &str, f: &dyn Fn(&serde_json::Value) -> bool| {
        log.iter()
            .any(|e| e["kind"] == kind && e["verdict"] == verdict && f(e))
    };
    assert!(has("dns", "allow", &|e| e["name"] == "allowed.test"));
    assert!(has("dns", "deny", &|e| e["name"] == "other.test"));
    assert!(has("tcp", "allow", &|e| {
        e["dialed"] == format!("{b}:443")
            && e["name"] == "allowed.test"
            && e["upstream"] == format!("{a}:443")
            && e["down"] == 4
    }));
    assert!(has("tcp", "deny", &|e| e["name"] == "other.test"));
    assert!(has("tcp", "deny", &|e| e["dialed"] == format!("{b}:8080")));
    // Shown readably too.
    let out = run(h, &["logs", "--net", &id]);
    assert!(
        text(&out.stdout).contains("DENY  dns A other.test"),
        "{}",
        text(&out.stdout)
    );

    // The gateway goes with its clone.
    let gw = record(h, &id)["gateway"]["pid"].as_i64().unwrap();
    assert!(!process_gone(gw));
    let out = run(h, &["down", &id]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(process_gone(gw), "gateway {gw} outlived its clone");
}

#[test]
fn vm_gateway_cuts_slow_clients_and_bounds_denied_queries() {
    let home = private_home();
    let h = home.path();
    let w = worlds();
    let a = w.a.addr.to_string();
    let id = up(h, "allow=allowed.test", &format!("allowed.test={a}"));
    let gw = record(h, &id)["gateway"]["pid"].as_i64().unwrap();
    let rss = || -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{gw}/status")).unwrap();
        s.lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    };
    let before = rss();

    // A client that never sends its ClientHello is closed at the deadline.
    let (ok, out, err) = py(
        h,
        &id,
        "import socket,sys
s=socket.create_connection((sys.argv[1],443),timeout=60)
print('closed' if s.recv(16)==b'' else 'data')",
        &[&a],
    );
    assert!(ok, "{err}");
    assert_eq!(out, "closed");

    // 1,000 queries for denied names: each gets NXDOMAIN, each is logged,
    // and the gateway keeps nothing per query.
    let (ok, out, err) = py(
        h,
        &id,
        "import socket,struct
s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); s.settimeout(5)
nx=0
for i in range(1000):
    q=struct.pack('>HHHHHH',i,0x0100,1,0,0,0)
    for l in (b'x%d' % i, b'denied', b'test'): q+=bytes([len(l)])+l
    q+=b'\\0'+struct.pack('>HH',1,1)
    s.sendto(q,('172.16.0.1',53))
    r=s.recv(4096)
    nx+= struct.unpack('>H',r[:2])[0]==i and (r[3]&15)==3
print(nx)",
        &[],
    );
    assert!(ok, "{err}");
    assert_eq!(out, "1000");
    let after = rss();
    assert!(
        after < before + 4096,
        "gateway RSS grew from {before} kB to {after} kB over 1,000 denied queries"
    );
    let log = net_log(h, &id);
    let denied = log
        .iter()
        .filter(|e| e["kind"] == "dns" && e["verdict"] == "deny")
        .count();
    assert_eq!(denied, 1000);
    assert!(log.iter().any(|e| e["kind"] == "tcp"
        && e["reason"]
            .as_str()
            .unwrap()
            .contains("no TLS ClientHello or HTTP request within")));
    // A gateway that died leaves its clone without a way out: ps says so.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(gw as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let gone = format!("(gateway {gw} is gone)");
    let mut table = String::new();
    for _ in 0..100 {
        table = text(&run(h, &["ps"]).stdout);
        if table.contains(&gone) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(table.contains(&gone), "{table}");
    let out = run(h, &["down", "--all"]);
    assert!(out.status.success());
}

#[test]
fn vm_gateway_missing_program_is_a_clear_error_and_none_still_works() {
    let home = private_home();
    let bin = tempfile::tempdir().unwrap();
    let lone = bin.path().join("dough");
    std::fs::copy(env!("CARGO_BIN_EXE_dough"), &lone).unwrap();
    let dough_alone = |args: &[&str]| {
        std::process::Command::new(&lone)
            .args(args)
            .env("DOUGH_HOME", home.path())
            .env_remove("DOUGH_BACKEND")
            .output()
            .unwrap()
    };
    let out = dough_alone(&["run", "--net", "nat", "--", "true"]);
    assert_eq!(out.status.code(), Some(125));
    let err = text(&out.stderr);
    assert!(
        err.contains("dough-gateway is missing (it is built with dough")
            && err.contains("only --net none is possible without one"),
        "{err}"
    );
    assert!(vm_dirs(home.path()).is_empty(), "a failed start left a VM");
    let out = dough_alone(&["run", "--net", "none", "--", "true"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[test]
fn vm_gateway_run_keeps_or_sums_up_its_egress() {
    let home = private_home();
    let log = tempfile::NamedTempFile::new().unwrap();
    let resolve = |extra: &[&str]| {
        let mut a = vec!["run", "--net", "allow=allowed.test"];
        a.extend(extra);
        a.extend(["--", "python3", "-c", RESOLVE_PY, "denied.test"]);
        dough(home.path())
            .args(&a)
            .env("DOUGH_TEST_GATEWAY_HOSTS", "allowed.test=192.0.2.1")
            .output()
            .unwrap()
    };
    let out = resolve(&[]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("dough: egress: 1 of 1 queries and connections were denied")
            && err.contains("DENY  dns A denied.test (name not allowed)"),
        "{err}"
    );
    let out = resolve(&["--net-log", log.path().to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(!text(&out.stderr).contains("were denied"));
    let events = dough_gateway::audit::read(log.path()).unwrap();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].name.as_deref(), Some("denied.test"));
}
