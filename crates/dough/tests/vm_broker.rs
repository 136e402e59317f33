//! VM tier: credential brokering through the gateway, with a real guest
//! and an HTTPS world (two namespaces behind host veths, TLS certificates
//! from a test CA the gateways are told to trust). The promise: the
//! brokered host receives the real key; the guest holds only a
//! placeholder — not in its environment, files or RAM — and gets the
//! placeholder back even where the upstream echoes the key.
#![cfg(feature = "test-hooks")]

mod common;
mod https;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use dough_net::testing::World;
use https::{server_config, test_ca};

const REAL_KEY: &str = "sk-test-api03-REALvalue0123456789abcdefREALvalue0123456789abcdef";

/// What the world's HTTPS servers saw: (server, path, x-api-key).
type Seen = Arc<Mutex<Vec<(String, String, String)>>>;

/// An HTTPS/1.1 server on `world`:443 for `name`. `/check` records the
/// request's x-api-key and echoes it; `/events` is a server-sent event
/// stream whose second event is only sent once `/ack` was requested.
fn serve_https(world: &World, name: &'static str, config: Arc<rustls::ServerConfig>, seen: Seen) {
    let l = dough_net::linux::in_netns(Some(&world.ns), || {
        TcpListener::bind((world.addr, 443)).map_err(|e| dough_net::NetError::io("bind", e))
    })
    .unwrap();
    let (ack_tx, ack_rx) = mpsc::channel::<()>();
    let ack_rx = Arc::new(Mutex::new(ack_rx));
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let (config, seen, ack_tx, ack_rx) =
                (config.clone(), seen.clone(), ack_tx.clone(), ack_rx.clone());
            std::thread::spawn(move || {
                let _ = s.set_read_timeout(Some(Duration::from_secs(120)));
                let conn = rustls::ServerConnection::new(config).unwrap();
                let mut tls = rustls::StreamOwned::new(conn, s);
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && head.len() < 65536 {
                    match tls.read(&mut b) {
                        Ok(1) => head.push(b[0]),
                        _ => return,
                    }
                }
                let mut hs = [httparse::EMPTY_HEADER; 64];
                let mut req = httparse::Request::new(&mut hs);
                let _ = req.parse(&head);
                let path = req.path.unwrap_or("").to_string();
                let key = req
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("x-api-key"))
                    .map(|h| String::from_utf8_lossy(h.value).into_owned())
                    .unwrap_or_default();
                seen.lock()
                    .unwrap()
                    .push((name.to_string(), path.clone(), key.clone()));
                let reply = |tls: &mut rustls::StreamOwned<_, _>, ctype: &str, body: &str| {
                    let _ = write!(
                        tls,
                        "HTTP/1.1 200 OK\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = tls.flush();
                };
                match path.as_str() {
                    "/check" => reply(&mut tls, "text/plain", &format!("{name} got {key}")),
                    "/ack" => {
                        let _ = ack_tx.send(());
                        reply(&mut tls, "text/plain", "acked")
                    }
                    "/events" => {
                        let _ = write!(
                            tls,
                            "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\ndata: one\n\n"
                        );
                        let _ = tls.flush();
                        // The second event waits for the client to have
                        // seen the first one (it then asks for /ack).
                        let acked = ack_rx
                            .lock()
                            .unwrap()
                            .recv_timeout(Duration::from_secs(120));
                        if acked.is_ok() {
                            let _ = write!(tls, "data: two\n\n");
                            let _ = tls.flush();
                        }
                    }
                    _ => reply(&mut tls, "text/plain", "?"),
                }
                tls.conn.send_close_notify();
                let _ = tls.flush();
            });
        }
    });
}

/// In the guest: the placeholder, the brokered and unbrokered requests,
/// an event stream; then it waits (listening on :9999) until the host has
/// searched its RAM — which holds its environment and its whole writable
/// layer (a tmpfs) — for the real key.
const GUEST_PY: &str = r#"
import os, ssl, socket, urllib.request, sys
key = os.environ['API_KEY']
print('placeholder', key, flush=True)
def get(url, ctx=None):
    r = urllib.request.Request(url, headers={'x-api-key': key})
    return urllib.request.urlopen(r, timeout=60, context=ctx)
# Verified against the system bundle: dough's CA was installed in it.
print('brokered', get('https://api.test/check').read().decode(), flush=True)
# Not brokered: the name is allowed, TLS passes through untouched (the
# world's own CA is not the guest's business here).
u = ssl._create_unverified_context()
print('other', get('https://other.test/check', u).read().decode(), flush=True)
ev = get('https://api.test/events')
buf = b''
while b'\n\n' not in buf:
    buf += ev.read1(64)
print('event', buf.decode().strip(), flush=True)
print('ack', get('https://api.test/ack').read().decode(), flush=True)
while buf.count(b'\n\n') < 2:
    chunk = ev.read1(64)
    if not chunk: break
    buf += chunk
print('events', buf.decode().replace('\n', '|'), flush=True)
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('0.0.0.0', 9999)); s.listen(1); s.settimeout(300)
print('SCAN-NOW', flush=True)
s.accept()
print('done', flush=True)
"#;

/// Every readable mapping of process `pid`, searched for `needle`.
fn memory_contains(pid: i64, needle: &[u8]) -> bool {
    use std::os::unix::fs::FileExt;
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let (range, perms) = (f.next().unwrap(), f.next().unwrap());
        if !perms.starts_with('r') {
            continue;
        }
        let (a, b) = range.split_once('-').unwrap();
        let (mut a, b) = (
            u64::from_str_radix(a, 16).unwrap(),
            u64::from_str_radix(b, 16).unwrap(),
        );
        let mut carry: Vec<u8> = Vec::new();
        while a < b {
            let n = ((b - a) as usize).min(buf.len());
            let Ok(got) = mem.read_at(&mut buf[..n], a) else {
                break;
            };
            if got == 0 {
                break;
            }
            carry.extend_from_slice(&buf[..got]);
            if carry.windows(needle.len()).any(|w| w == needle) {
                return true;
            }
            let keep = carry.len().saturating_sub(needle.len());
            carry.drain(..keep);
            a += got as u64;
        }
    }
    false
}

/// The HTTPS world: `api.test` on world A, `other.test` on world B, both
/// with certificates from a test CA; the env `dough` needs to use them
/// (the gateways' name table and extra upstream roots).
struct HttpsWorld {
    _a: World,
    _b: World,
    _roots: tempfile::NamedTempFile,
    seen: Seen,
    env: Vec<(String, String)>,
}

fn https_world(tag: &str) -> HttpsWorld {
    let s = dough_net::testing::random_tag();
    let a = World::new(&format!("{tag}a{s}"), dough_net::testing::world_net(195)).unwrap();
    let b = World::new(&format!("{tag}b{s}"), dough_net::testing::world_net(194)).unwrap();
    let (ca, ca_pem) = test_ca();
    let roots = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(roots.path(), &ca_pem).unwrap();
    let seen: Seen = Arc::default();
    serve_https(&a, "api", server_config(&ca, "api.test"), seen.clone());
    serve_https(&b, "other", server_config(&ca, "other.test"), seen.clone());
    let env = vec![
        (
            "DOUGH_TEST_GATEWAY_HOSTS".to_string(),
            format!("api.test={},other.test={}", a.addr, b.addr),
        ),
        (
            "DOUGH_TEST_GATEWAY_ROOTS".to_string(),
            roots.path().display().to_string(),
        ),
        ("TEST_REAL_KEY".to_string(), REAL_KEY.to_string()),
    ];
    HttpsWorld {
        _a: a,
        _b: b,
        _roots: roots,
        seen,
        env,
    }
}

/// All `child` wrote to its (piped) stderr.
fn stderr_of(child: &mut std::process::Child) -> String {
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        e.read_to_string(&mut err).unwrap();
    }
    err
}

/// Kills `dough run` if the test ends before it does (its watchdog then
/// reclaims the clone).
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            kill_dough_and_its_watchdog(&mut self.0);
        }
    }
}

#[test]
fn vm_broker_the_key_reaches_the_host_and_never_the_guest() {
    let home = private_home();
    let h = home.path();
    let w = https_world("k");
    let seen = w.seen.clone();
    let child = dough(h)
        .args([
            "run",
            "--net",
            "allow=api.test,other.test",
            "--secret",
            "API_KEY=env:TEST_REAL_KEY",
            "--inject",
            "API_KEY@api.test:x-api-key",
            "--",
            "python3",
            "-c",
            GUEST_PY,
        ])
        .envs(w.env.iter().map(|(k, v)| (k, v)))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = Running(child);
    let child = &mut child.0;
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut lines = Vec::new();
    loop {
        let mut l = String::new();
        if out.read_line(&mut l).unwrap() == 0 {
            let err = stderr_of(child);
            panic!("the guest stopped early: {lines:#?}\n{err}");
        }
        let l = l.trim_end().to_string();
        if l == "SCAN-NOW" {
            break;
        }
        lines.push(l);
    }
    let field = |k: &str| {
        lines
            .iter()
            .find_map(|l| l.strip_prefix(&format!("{k} ")))
            .unwrap_or_else(|| panic!("no {k} line in {lines:#?}"))
            .to_string()
    };
    let placeholder = field("placeholder");
    assert!(
        placeholder.starts_with("sk-test-api03-dough-"),
        "{placeholder}"
    );
    assert!(!placeholder.contains(REAL_KEY));

    // While the guest waits: its RAM (the VMM's guest memory) has the
    // placeholder and not the key; nothing dough wrote for it has the key.
    let recs = records(h);
    assert_eq!(recs.len(), 1);
    let vmm = recs[0]["vmm"]["pid"].as_i64().unwrap();
    assert!(
        memory_contains(vmm, placeholder.as_bytes()),
        "the scan does not see the guest's memory: the placeholder is not found"
    );
    assert!(
        !memory_contains(vmm, REAL_KEY.as_bytes()),
        "the real key is in the guest's RAM"
    );
    // Its directory: records, logs, and its scratch disk (everything the
    // guest wrote).
    let dir = vm_dirs(h).pop().unwrap();
    assert!(dir.join("scratch.img").is_file());
    for e in std::fs::read_dir(&dir).unwrap().flatten() {
        assert!(
            !tree_contains(&e.path(), REAL_KEY.as_bytes()),
            "the real key is in {}",
            e.path().display()
        );
    }
    let log = std::fs::read_to_string(dir.join("net.log")).unwrap();
    let brokered: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|e: &serde_json::Value| e["secrets"] == serde_json::json!(["API_KEY"]))
        .collect();
    assert!(
        brokered.iter().any(|e| e["name"] == "api.test"
            && e["method"] == "GET"
            && e["path"] == "/check"
            && e["status"] == 200),
        "{log}"
    );

    // Let the guest finish.
    let ns = recs[0]["net"]["netns"].as_str().unwrap().to_string();
    dough_net::linux::in_netns(Some(&ns), || {
        TcpStream::connect((Ipv4Addr::new(172, 16, 0, 2), 9999))
            .map_err(|e| dough_net::NetError::io("connect", e))
    })
    .unwrap();
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    let status = child.wait().unwrap();
    let err = stderr_of(child);
    assert!(status.success(), "{rest}\n{err}");
    assert!(rest.contains("done"), "{rest}");

    // The brokered host got the real key (and echoed it: the guest saw
    // its placeholder instead); the other host got the placeholder.
    assert_eq!(field("brokered"), format!("api got {placeholder}"));
    assert_eq!(field("other"), format!("other got {placeholder}"));
    let seen = seen.lock().unwrap().clone();
    assert!(
        seen.contains(&("api".into(), "/check".into(), REAL_KEY.into())),
        "{seen:?}"
    );
    assert!(
        seen.contains(&("other".into(), "/check".into(), placeholder.clone())),
        "{seen:?}"
    );
    // The event stream came event by event: the second was sent only
    // after the guest, having read the first, asked for /ack.
    assert_eq!(field("event"), "data: one");
    assert_eq!(field("ack"), "acked");
    assert_eq!(field("events"), "data: one||data: two||");
}

/// The agent asks api.test for what key it got, and commits the answer.
const BROKERED_PLAN: &str = r#"
goal = "brokered key"
repo = "repo"
agent = ["sh", "-c", "true"]
check = "grep -q 'api got sk-test-' src/answer.txt"
egress = ["api.test"]

[[secrets]]
name = "API_KEY"
env = "TEST_REAL_KEY"
prefix = "sk-test-"
inject = { hosts = ["api.test"], header = "x-api-key" }

[[tasks]]
id = "ask"
title = "Ask the API"
work = "ask"
allow = ["src/answer.txt"]
secrets = ["API_KEY"]
script = """python3 -c "
import os, urllib.request
r = urllib.request.Request('https://api.test/check', headers={'x-api-key': os.environ['API_KEY']})
open('src/answer.txt', 'w').write(urllib.request.urlopen(r, timeout=60).read().decode() + '\\n')
" """
"#;

#[test]
fn vm_broker_a_plan_brokers_its_secret_and_reports_egress() {
    let home = private_home();
    let w = https_world("g");
    let (dir, plan) = small_repo(BROKERED_PLAN);
    let env: Vec<(&str, &str)> = w
        .env
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let (out, run, report) = go(home.path(), &plan, &env);
    assert!(out.status.success(), "{}\n{report}", text(&out.stderr));
    let t = task(&run, "ask");
    assert_eq!(t["outcome"], "green", "{report}");
    // The committed answer holds the placeholder the agent had (the
    // upstream's echo of the real key was scrubbed on its way back).
    let branch = run["branch"].as_str().unwrap();
    let answer = git(
        &dir.path().join("repo"),
        &["show", &format!("{branch}:src/answer.txt")],
    );
    assert!(answer.starts_with("api got sk-test-dough-"), "{answer}");
    assert!(!answer.contains(REAL_KEY));
    let seen = w.seen.lock().unwrap().clone();
    assert!(
        seen.contains(&("api".into(), "/check".into(), REAL_KEY.into())),
        "{seen:?}"
    );
    // The report shows the agent's egress, the brokered request included,
    // and never the key.
    assert!(
        report.contains("https GET api.test/check -> 200") && report.contains("[secrets: API_KEY]"),
        "{report}"
    );
    assert!(!report.contains(REAL_KEY));
    // Nor anything else dough wrote: the run's events and run.json, every
    // record and log under the home (its snapshots are a link to the shared
    // ones, baked before any secret existed).
    assert!(
        !tree_contains(home.path(), REAL_KEY.as_bytes()),
        "the real key is in a file under the home"
    );
}

/// `--ca FILE`: a clone trusts a CA its image does not (here the world's
/// test CA, as a TLS-intercepting proxy's would be with `--ca host`).
#[test]
fn vm_broker_ca_adds_trust_to_a_clone() {
    let home = private_home();
    let w = https_world("c");
    let roots = w
        .env
        .iter()
        .find(|(k, _)| k == "DOUGH_TEST_GATEWAY_ROOTS")
        .map(|(_, v)| v.clone())
        .unwrap();
    let fetch = "import urllib.request
try: print(urllib.request.urlopen('https://api.test/check', timeout=30).read().decode())
except Exception as e: print('ERR', e)";
    let run_with = |extra: &[&str]| {
        let mut a = vec!["run", "--net", "allow=api.test"];
        a.extend(extra);
        a.extend(["--", "python3", "-c", fetch]);
        let out = dough(home.path())
            .args(&a)
            .envs(w.env.iter().map(|(k, v)| (k, v)))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout).trim().to_string()
    };
    let without = run_with(&[]);
    assert!(without.contains("CERTIFICATE_VERIFY_FAILED"), "{without}");
    assert_eq!(run_with(&["--ca", &roots]), "api got");
    // A clone that outlives its `up` keeps it for every later command.
    let out = dough(home.path())
        .args(["up", "1", "--net", "allow=api.test", "--ca", &roots])
        .envs(w.env.iter().map(|(k, v)| (k, v)))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let id = text(&out.stdout).trim().to_string();
    let out = run(
        home.path(),
        &["exec", &id, "--", "sh", "-c", "echo $NODE_EXTRA_CA_CERTS"],
    );
    assert_eq!(text(&out.stdout).trim(), "/etc/dough/ca.pem");
    let out = run(home.path(), &["exec", &id, "--", "python3", "-c", fetch]);
    assert_eq!(text(&out.stdout).trim(), "api got");
    let bad = dough(home.path())
        .args(["run", "--ca", "/etc/hostname", "--", "true"])
        .output()
        .unwrap();
    assert!(
        text(&bad.stderr).contains("--ca /etc/hostname: /etc/hostname holds no PEM certificate")
    );
}
