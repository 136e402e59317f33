//! The fake tells the truth: every exchange recorded from real Firecracker
//! v1.16.1 (`fixtures/firecracker-1.16.1.json`, captured byte for byte
//! through a proxy on its API socket) is replayed against dough's fake —
//! same requests, in the same order, each scenario on a fresh process and
//! one kept-open connection — and the fake must answer with exactly the
//! recorded bytes, keep the connection open where the real one did, and
//! exit where the real one exited, with its status.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use dough_vmm::firecracker::fake::FakeFirecracker;
use serde_json::Value;

fn fixtures() -> Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/firecracker-1.16.1.json");
    serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap()
}

/// One request as bytes (what any HTTP/1.1 client sends).
fn request(method: &str, path: &str, body: &Value) -> Vec<u8> {
    let body = if body.is_null() {
        String::new()
    } else {
        body.to_string()
    };
    format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Read one response, framed by its head (a 204 has no body) and
/// `Content-Length`.
fn response(s: &mut UnixStream) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut b = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut b).unwrap(), 1, "reply cut short: {buf:?}");
        buf.push(b[0]);
    }
    let head = String::from_utf8(buf.clone()).unwrap();
    let len = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .map(|n| n.trim().parse::<usize>().unwrap())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).unwrap();
    buf.extend(body);
    buf
}

/// Whether the peer still holds the connection open (no EOF within
/// `wait`).
fn open_after(s: &mut UnixStream, wait: Duration) -> bool {
    s.set_read_timeout(Some(wait)).unwrap();
    let mut b = [0u8; 1];
    let open = match s.read(&mut b) {
        Ok(0) => false,
        Ok(_) => panic!("unexpected bytes after a reply"),
        Err(e) => matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    };
    s.set_read_timeout(None).unwrap();
    open
}

#[test]
fn the_fake_answers_every_recorded_exchange_with_the_recorded_bytes() {
    let fx = fixtures();
    assert_eq!(fx["firecracker_version"], "1.16.1");
    let root = tempfile::tempdir().unwrap();
    let map = |v: &Value| -> Value {
        let s = v
            .to_string()
            .replace("/tmp/fc", &format!("{}/fc", root.path().display()));
        serde_json::from_str(&s).unwrap()
    };
    let exchanges = fx["exchanges"].as_array().unwrap();
    let mut scenarios: Vec<&str> = exchanges
        .iter()
        .map(|e| e["scenario"].as_str().unwrap())
        .collect();
    scenarios.dedup();
    assert!(scenarios.len() >= 7, "{scenarios:?}");
    let mut compared = 0;
    for sc in scenarios {
        let dir = root.path().join(format!("fc{sc}"));
        std::fs::create_dir(&dir).unwrap();
        let fake = FakeFirecracker::start(&dir.join("api.sock")).unwrap();
        let mut conn = UnixStream::connect(&fake.socket).unwrap();
        for e in exchanges.iter().filter(|e| e["scenario"] == sc) {
            let (method, path) = (e["method"].as_str().unwrap(), e["path"].as_str().unwrap());
            let what = format!("scenario {sc} step {}: {method} {path}", e["step"]);
            conn.write_all(&request(method, path, &map(&e["request_body"])))
                .unwrap();
            let got = response(&mut conn);
            assert_eq!(
                String::from_utf8_lossy(&got),
                e["response"].as_str().unwrap(),
                "{what}: the fake's reply differs from the real one"
            );
            compared += 1;
            let alive = e["process_alive_after"].as_bool().unwrap();
            if alive {
                assert_eq!(fake.exit_code(), None, "{what}: the fake exited");
                assert_eq!(
                    open_after(&mut conn, Duration::from_millis(200)),
                    e["connection_open_after"].as_bool().unwrap(),
                    "{what}: keep-alive"
                );
            } else {
                // The process answers, then exits: wait for it (bounded).
                let want = e["exit_status"].as_i64().map(|c| c as i32);
                dough_vmm::process::wait_until(Duration::from_secs(10), || {
                    fake.exit_code().is_some()
                });
                assert_eq!(fake.exit_code(), want, "{what}: exit status");
                assert!(
                    !open_after(&mut conn, Duration::from_secs(10)),
                    "{what}: an exited process's connection"
                );
                assert!(
                    UnixStream::connect(&fake.socket)
                        .and_then(|mut c| {
                            c.write_all(&request("GET", "/version", &Value::Null))?;
                            let mut b = [0u8; 1];
                            c.set_read_timeout(Some(Duration::from_secs(5)))?;
                            c.read(&mut b)
                        })
                        .map_or(true, |n| n == 0),
                    "{what}: an exited process answers nothing more"
                );
                break;
            }
        }
    }
    assert_eq!(
        compared,
        exchanges.len(),
        "every recorded exchange was replayed"
    );
}
