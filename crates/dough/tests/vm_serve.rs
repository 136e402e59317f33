//! VM tier: `dough serve`, through a real HTTP client (dough-client, on
//! hyper) against a real daemon with real VMs.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::*;
use dough_client::{Client, ClientError, CreateSandbox, ExecBody, ExecEvent, FileKind};

/// A daemon on a socket of its own, stopped (SIGKILL) when dropped.
struct Daemon {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
}

impl Daemon {
    fn start(home: &Path, extra: &[&str]) -> Daemon {
        Daemon::start_with(home, extra, |_| {})
    }

    /// The same, with `tweak` applied to its command first.
    fn start_with(
        home: &Path,
        extra: &[&str],
        tweak: impl FnOnce(&mut std::process::Command),
    ) -> Daemon {
        let socket = home.join("serve.sock");
        // A log per start: a restarted daemon's does not overwrite the first's.
        static STARTS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = STARTS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let log = home.join(format!("serve-{n}.log"));
        let mut cmd = dough(home);
        cmd.arg("serve")
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        tweak(&mut cmd);
        let child = cmd.spawn().unwrap();
        let mut d = Daemon { child, socket, log };
        let deadline = Instant::now() + Duration::from_secs(60);
        // This daemon's own word that it serves: after a kill -9 the old
        // socket path has been seen to accept a connection for a moment
        // (and reset it) while the new daemon was still sweeping.
        while !d.log_text().contains("dough: serving on")
            || std::os::unix::net::UnixStream::connect(&d.socket).is_err()
        {
            if let Ok(Some(st)) = d.child.try_wait() {
                panic!("dough serve exited {st}: {}", d.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "dough serve did not listen: {}",
                d.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        d
    }

    fn client(&self, home: &Path) -> Client {
        let token = std::fs::read_to_string(home.join("serve.token")).unwrap();
        Client::new(&format!("unix://{}", self.socket.display()), &token).unwrap()
    }

    fn log_text(&mut self) -> String {
        let status = match self.child.try_wait() {
            Ok(Some(st)) => format!("(dough serve exited: {st})\n"),
            _ => String::new(),
        };
        status + &std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn none_net() -> CreateSandbox {
    CreateSandbox {
        net: Some("none".into()),
        ..Default::default()
    }
}

/// Run a command, gathering its output and exec id.
fn exec(c: &Client, id: &str, argv: &[&str]) -> (dough_client::ExecExit, String, String) {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let exit = c
        .exec(
            id,
            &ExecBody {
                argv: argv.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            },
            &mut |e| match e {
                ExecEvent::Stdout(b) => out.extend(b),
                ExecEvent::Stderr(b) => err.extend(b),
                ExecEvent::Start(_) => {}
            },
        )
        .unwrap();
    (exit, text(&out), text(&err))
}

fn api_code(e: ClientError) -> (u16, String) {
    match e {
        ClientError::Api { status, code, .. } => (status, code),
        other => panic!("expected an API error, got {other:?}"),
    }
}

/// create → exec (streamed, stdin, env, exit codes, signals) → upload →
/// stat → download (file and tar) → delete, over the Unix socket and TCP.
#[test]
fn vm_serve_runs_a_sandbox_from_create_to_delete() {
    let home = private_home();
    let h = home.path();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let addr = format!("127.0.0.1:{port}");
    let d = Daemon::start(h, &["--listen", &addr]);
    let c = d.client(h);
    assert_eq!(c.health().unwrap().status, "ok");
    let token = std::fs::read_to_string(h.join("serve.token")).unwrap();
    let tcp = Client::new(&format!("http://{addr}"), &token).unwrap();
    assert_eq!(tcp.version().unwrap().api, 1);

    let sb = c.create_sandbox(&none_net()).unwrap();
    assert_eq!(sb.state, dough_client::SandboxState::Live);
    assert_eq!(sb.vm_state.as_deref(), Some("ready"));
    assert_eq!(sb.net, "none");
    assert!(ps(h).iter().any(|v| v["id"] == sb.id.as_str()));
    assert_eq!(
        c.sandbox(&sb.id).unwrap().vm_state.as_deref(),
        Some("ready")
    );

    // Output streamed with its stream, env and stdin delivered, the exit
    // code reported.
    let mut events = Vec::new();
    let exit = c
        .exec(
            &sb.id,
            &ExecBody {
                argv: vec![
                    "sh".into(),
                    "-c".into(),
                    "echo out-$X; cat; echo err >&2; exit 3".into(),
                ],
                env: [("X".to_string(), "1".to_string())].into(),
                stdin: Some("from-stdin\n".into()),
                ..Default::default()
            },
            &mut |e| events.push(e),
        )
        .unwrap();
    assert_eq!(exit.exit_code, 3);
    assert!(
        matches!(&events[0], ExecEvent::Start(id) if id.starts_with("ex-")),
        "{events:?}"
    );
    let out: Vec<u8> = events
        .iter()
        .filter_map(|e| match e {
            ExecEvent::Stdout(b) => Some(b.clone()),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(text(&out), "out-1\nfrom-stdin\n");
    assert!(
        events.contains(&ExecEvent::Stderr(b"err\n".to_vec())),
        "{events:?}"
    );
    // The same sandbox over TCP.
    assert_eq!(exec(&tcp, &sb.id, &["hostname"]).1.trim(), sb.id);
    // A working directory, and a timeout that kills.
    let mut out = Vec::new();
    let exit = c
        .exec(
            &sb.id,
            &ExecBody {
                argv: vec!["sh".into(), "-c".into(), "pwd; sleep 30".into()],
                cwd: Some("/tmp".into()),
                timeout_secs: Some(1.0),
                ..Default::default()
            },
            &mut |e| {
                if let ExecEvent::Stdout(b) = e {
                    out.extend(b)
                }
            },
        )
        .unwrap();
    assert_eq!((exit.timed_out, exit.exit_code), (true, 124));
    assert_eq!(text(&out), "/tmp\n");

    // A signal reaches a running command, by the id its stream started with.
    let (tx, rx) = std::sync::mpsc::channel();
    let t = {
        let c = d.client(h);
        let id = sb.id.clone();
        std::thread::spawn(move || {
            c.exec(
                &id,
                &ExecBody {
                    argv: vec!["sleep".into(), "600".into()],
                    ..Default::default()
                },
                &mut |e| {
                    if let ExecEvent::Start(x) = e {
                        tx.send(x).unwrap();
                    }
                },
            )
            .unwrap()
        })
    };
    let exec_id = rx.recv_timeout(Duration::from_secs(60)).unwrap();
    // The command may not have been spawned yet when `start` arrives:
    // signal until it is delivered and the exec ends.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !t.is_finished() {
        assert!(
            Instant::now() < deadline,
            "the signal never ended the command"
        );
        let _ = c.signal(&sb.id, &exec_id, 15);
        std::thread::sleep(Duration::from_millis(200));
    }
    let exit = t.join().unwrap();
    assert_eq!((exit.signal, exit.exit_code), (Some(15), 143));
    assert_eq!(
        api_code(c.signal(&sb.id, &exec_id, 15).unwrap_err()),
        (404, "not_found".into())
    );

    // Files: a file into a new directory, its stat, back out; a tar
    // stream in and out.
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let up = c
        .upload(
            &sb.id,
            "/root/new/dir/blob.bin",
            false,
            std::io::Cursor::new(data.clone()),
        )
        .unwrap();
    assert_eq!(up.bytes, data.len() as u64);
    let st = c.stat(&sb.id, "/root/new/dir/blob.bin").unwrap();
    assert_eq!((st.kind, st.size), (FileKind::File, data.len() as u64));
    let mut back = Vec::new();
    assert_eq!(
        c.download(&sb.id, "/root/new/dir/blob.bin", false, &mut back)
            .unwrap(),
        data.len() as u64
    );
    assert!(back == data, "the file came back different");
    let dir = c.stat(&sb.id, "/root/new/dir").unwrap();
    assert_eq!(dir.kind, FileKind::Dir);
    let names: Vec<_> = dir.entries.unwrap().into_iter().map(|e| e.name).collect();
    assert_eq!(names, ["blob.bin"]);

    let mut tarball = Vec::new();
    {
        let mut b = tar::Builder::new(&mut tarball);
        for (name, body) in [("a.txt", "alpha\n"), ("sub/b.txt", "beta\n")] {
            let mut hd = tar::Header::new_gnu();
            hd.set_size(body.len() as u64);
            hd.set_mode(0o644);
            hd.set_cksum();
            b.append_data(&mut hd, name, body.as_bytes()).unwrap();
        }
        b.finish().unwrap();
    }
    c.upload(&sb.id, "/srv/tree", true, std::io::Cursor::new(tarball))
        .unwrap();
    assert_eq!(
        exec(&c, &sb.id, &["cat", "/srv/tree/sub/b.txt"]).1,
        "beta\n"
    );
    let mut tar_back = Vec::new();
    c.download(&sb.id, "/srv/tree", true, &mut tar_back)
        .unwrap();
    let mut got = Vec::new();
    for e in tar::Archive::new(&tar_back[..]).entries().unwrap() {
        let mut e = e.unwrap();
        let mut s = String::new();
        e.read_to_string(&mut s).unwrap();
        got.push((e.path().unwrap().display().to_string(), s));
    }
    assert!(
        got.contains(&("./a.txt".into(), "alpha\n".into())),
        "{got:?}"
    );
    assert!(
        got.contains(&("./sub/b.txt".into(), "beta\n".into())),
        "{got:?}"
    );
    // A symlink is downloaded as what it points to; a FIFO (whose reading
    // might never end) is refused.
    exec(
        &c,
        &sb.id,
        &[
            "sh",
            "-c",
            "echo pointed > /root/target; ln -s /root/target /root/link; mkfifo /root/fifo",
        ],
    );
    let mut linked = Vec::new();
    c.download(&sb.id, "/root/link", false, &mut linked)
        .unwrap();
    assert_eq!(text(&linked), "pointed\n");
    assert_eq!(
        c.stat(&sb.id, "/root/link").unwrap().kind,
        FileKind::Symlink
    );
    assert_eq!(
        api_code(
            c.download(&sb.id, "/root/fifo", false, &mut Vec::new())
                .unwrap_err()
        ),
        (400, "bad_request".into())
    );
    // Missing paths and directories without tar are refused plainly.
    assert_eq!(
        api_code(c.stat(&sb.id, "/no/such").unwrap_err()),
        (404, "not_found".into())
    );
    assert_eq!(
        api_code(
            c.download(&sb.id, "/srv/tree", false, &mut Vec::new())
                .unwrap_err()
        ),
        (400, "bad_request".into())
    );

    let metrics = c.metrics().unwrap();
    assert!(
        metrics.contains("dough_sandboxes{state=\"ready\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("dough_restore_seconds_count 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("dough_execs_total{result=\"signaled\"} 1"),
        "{metrics}"
    );

    c.delete_sandbox(&sb.id).unwrap();
    let gone = c.sandbox(&sb.id).unwrap();
    assert_eq!(gone.state, dough_client::SandboxState::Deleted);
    assert!(!ps(h).iter().any(|v| v["id"] == sb.id.as_str()));
    assert_eq!(
        api_code(c.delete_sandbox(&sb.id).unwrap_err()),
        (410, "gone".into())
    );
    let e = c
        .exec(
            &sb.id,
            &ExecBody {
                argv: vec!["true".into()],
                ..Default::default()
            },
            &mut |_| {},
        )
        .unwrap_err();
    assert_eq!(api_code(e), (410, "gone".into()));
    assert_eq!(
        api_code(c.sandbox("vm-nothere").unwrap_err()),
        (404, "not_found".into())
    );
}

/// No token, a wrong one, malformed and oversized bodies, unknown routes
/// and methods: each refused with its status and a JSON error, and the
/// daemon serves on.
#[test]
fn vm_serve_refuses_unauthenticated_and_malformed_requests() {
    let home = private_home();
    let h = home.path();
    let d = Daemon::start(h, &["--max-request", "4096"]);
    let c = d.client(h);
    let token = std::fs::read_to_string(h.join("serve.token")).unwrap();
    let token = token.trim();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(h.join("serve.token"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let wrong = format!("{}x", &token[..token.len() - 1]);
    type Case<'a> = (&'a str, &'a str, Option<&'a str>, Vec<u8>, u16, &'a str);
    let cases: Vec<Case> = vec![
        ("GET", "/v1/health", None, vec![], 401, "unauthorized"),
        (
            "GET",
            "/v1/health",
            Some(&wrong),
            vec![],
            401,
            "unauthorized",
        ),
        ("GET", "/v1/health", Some(""), vec![], 401, "unauthorized"),
        ("GET", "/openapi.json", None, vec![], 401, "unauthorized"),
        (
            "POST",
            "/v1/sandboxes",
            None,
            b"{}".to_vec(),
            401,
            "unauthorized",
        ),
        (
            "POST",
            "/v1/sandboxes",
            Some(token),
            b"{not json".to_vec(),
            400,
            "bad_request",
        ),
        (
            "POST",
            "/v1/sandboxes",
            Some(token),
            b"{\"nett\": \"none\"}".to_vec(),
            400,
            "bad_request",
        ),
        (
            "POST",
            "/v1/sandboxes",
            Some(token),
            b"{\"net\": \"sideways\"}".to_vec(),
            400,
            "bad_request",
        ),
        (
            "POST",
            "/v1/sandboxes",
            Some(token),
            b"{\"image\": \"../etc/passwd\"}".to_vec(),
            400,
            "bad_request",
        ),
        (
            "POST",
            "/v1/sandboxes",
            Some(token),
            b"{\"memory_mib\": 1}".to_vec(),
            400,
            "bad_request",
        ),
        (
            "POST",
            "/v1/sandboxes",
            Some(token),
            vec![b' '; 10_000],
            413,
            "too_large",
        ),
        (
            "POST",
            "/v1/sandboxes/vm-nothere/exec",
            Some(token),
            b"{\"argv\": [\"true\"]}".to_vec(),
            404,
            "not_found",
        ),
        (
            "POST",
            "/v1/sandboxes/vm-nothere/exec",
            Some(token),
            b"{\"argv\": []}".to_vec(),
            400,
            "bad_request",
        ),
        (
            "GET",
            "/v1/sandboxes/vm-nothere/files?path=relative",
            Some(token),
            vec![],
            400,
            "bad_request",
        ),
        (
            "GET",
            "/v1/sandboxes/vm-nothere/files",
            Some(token),
            vec![],
            400,
            "bad_request",
        ),
        ("GET", "/v1/nope", Some(token), vec![], 404, "not_found"),
        (
            "GET",
            "/v1/runs?limit=0",
            Some(token),
            vec![],
            400,
            "bad_request",
        ),
        (
            "GET",
            "/v1/runs?limit=1001",
            Some(token),
            vec![],
            400,
            "bad_request",
        ),
        (
            "GET",
            "/v1/runs?limit=-1",
            Some(token),
            vec![],
            400,
            "bad_request",
        ),
        (
            "GET",
            "/v1/runs?before=run-nothere",
            Some(token),
            vec![],
            400,
            "bad_request",
        ),
        (
            "GET",
            "/v1/sandboxes?before=vm-nothere&live=true",
            Some(token),
            vec![],
            400,
            "bad_request",
        ),
        (
            "GET",
            "/v1/sandboxes?live=maybe",
            Some(token),
            vec![],
            400,
            "bad_request",
        ),
        (
            "PATCH",
            "/v1/sandboxes",
            Some(token),
            vec![],
            405,
            "method_not_allowed",
        ),
    ];
    for (method, path, tok, body, status, code) in cases {
        let (got, resp) = c.raw(method, path, tok, body).unwrap();
        let e: dough_client::ErrorBody = serde_json::from_slice(&resp)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}: {}", text(&resp)));
        assert_eq!(
            (got, e.error.code.as_str()),
            (status, code),
            "{method} {path}: {}",
            e.error.message
        );
    }
    assert_eq!(c.health().unwrap().status, "ok");
    let m = c.metrics().unwrap();
    assert!(m.contains("dough_requests_unauthorized_total 5"), "{m}");
    // Nothing was created by any of it.
    assert!(c.sandboxes().unwrap().is_empty());
    assert!(vm_dirs(h).is_empty());
}

/// An upload over the file limit is refused (413) whether it declares its
/// length or streams without one, the partial file is removed, and the
/// daemon's memory does not grow with what was sent.
#[test]
fn vm_serve_refuses_an_upload_over_the_limit_without_growing() {
    let home = private_home();
    let h = home.path();
    let d = Daemon::start(h, &["--max-file", "8000000"]);
    let c = d.client(h);
    let sb = c.create_sandbox(&none_net()).unwrap();
    // A file there before the failed upload is kept as it was.
    c.upload(
        &sb.id,
        "/root/big",
        false,
        std::io::Cursor::new(b"old\n".to_vec()),
    )
    .unwrap();
    let before = d.rss_kib();
    // 256 MiB streamed (chunked: no length to refuse it by up front).
    let big = std::io::repeat(b'x').take(256 << 20);
    let e = c.upload(&sb.id, "/root/big", false, big).unwrap_err();
    match e {
        ClientError::Api { status: 413, .. } => {}
        // The daemon may answer and close before it read all we sent.
        ClientError::Http(_) => {}
        other => panic!("expected 413, got {other:?}"),
    }
    let grew = d.rss_kib().saturating_sub(before);
    assert!(grew < 64 << 10, "the daemon grew by {grew} KiB");
    let mut kept = Vec::new();
    c.download(&sb.id, "/root/big", false, &mut kept).unwrap();
    assert_eq!(text(&kept), "old\n", "the failed upload replaced the file");
    let names: Vec<String> = c
        .stat(&sb.id, "/root")
        .unwrap()
        .entries
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert!(
        !names.iter().any(|n| n.contains("dough-upload")),
        "the partial upload was left: {names:?}"
    );
    // Declared too large: refused before a byte of it is sent.
    {
        use std::io::Write;
        let token = std::fs::read_to_string(h.join("serve.token")).unwrap();
        let mut s = std::os::unix::net::UnixStream::connect(h.join("serve.sock")).unwrap();
        write!(
            s,
            "PUT /v1/sandboxes/{}/files?path=/root/x HTTP/1.1\r\nHost: dough\r\n\
             Authorization: Bearer {}\r\nContent-Length: 8000001\r\n\r\n",
            sb.id,
            token.trim()
        )
        .unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut head = [0u8; 12];
        s.read_exact(&mut head).unwrap();
        assert_eq!(&head, b"HTTP/1.1 413");
    }
    // Under the limit still works.
    c.upload(
        &sb.id,
        "/root/ok",
        false,
        std::io::Cursor::new(vec![1u8; 1000]),
    )
    .unwrap();
    c.delete_sandbox(&sb.id).unwrap();
}

/// Killed with -9 and started again, the daemon adopts its live sandboxes,
/// marks dead the one whose VM went meanwhile, and still enforces TTLs.
#[test]
fn vm_serve_restarted_after_kill_adopts_its_sandboxes() {
    let home = private_home();
    let h = home.path();
    let mut d = Daemon::start(h, &[]);
    let c = d.client(h);
    let keep = c.create_sandbox(&none_net()).unwrap();
    let lost = c.create_sandbox(&none_net()).unwrap();
    let short = c
        .create_sandbox(&CreateSandbox {
            ttl_secs: Some(20),
            ..none_net()
        })
        .unwrap();
    exec(&c, &keep.id, &["sh", "-c", "echo kept > /root/state"]);
    d.kill9();
    // Sandboxes outlive their daemon; one is removed behind its back.
    let out = run(h, &["down", &lost.id]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let d = Daemon::start(h, &[]);
    let c = d.client(h);
    assert_eq!(exec(&c, &keep.id, &["cat", "/root/state"]).1, "kept\n");
    let l = c.sandbox(&lost.id).unwrap();
    assert_eq!(l.state, dough_client::SandboxState::Dead);
    assert!(l.ended_why.unwrap().contains("gone"));
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let s = c.sandbox(&short.id).unwrap();
        if s.state == dough_client::SandboxState::Deleted {
            assert_eq!(s.ended_why.as_deref(), Some("its TTL ran out"));
            break;
        }
        assert!(Instant::now() < deadline, "the TTL never ran out: {s:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(!ps(h).iter().any(|v| v["id"] == short.id.as_str()));
    let live: Vec<String> = c
        .sandboxes()
        .unwrap()
        .into_iter()
        .filter(|s| s.state == dough_client::SandboxState::Live)
        .map(|s| s.id)
        .collect();
    assert_eq!(live, std::slice::from_ref(&keep.id));
    c.delete_sandbox(&keep.id).unwrap();
}

/// 100 execs at once across 8 sandboxes: each completes with its own
/// output (one command at a time per sandbox; the rest wait their turn).
#[test]
fn vm_serve_runs_100_concurrent_execs_across_8_sandboxes() {
    let home = private_home();
    let h = home.path();
    let d = Daemon::start(h, &[]);
    let c = d.client(h);
    let ids: Vec<String> = (0..8)
        .map(|_| c.create_sandbox(&none_net()).unwrap().id)
        .collect();
    let threads: Vec<_> = (0..100)
        .map(|i| {
            let c = d.client(h);
            let id = ids[i % 8].clone();
            std::thread::spawn(move || {
                let (exit, out, _) = exec(&c, &id, &["sh", "-c", &format!("echo $(hostname) {i}")]);
                (i, id, exit.exit_code, out)
            })
        })
        .collect();
    for t in threads {
        let (i, id, code, out) = t.join().unwrap();
        assert_eq!((code, out), (0, format!("{id} {i}\n")));
    }
    // The list, a page of 3 at a time, newest first: each once.
    let mut paged: Vec<String> = Vec::new();
    loop {
        let page: Vec<dough_client::Sandbox> = c
            .page(
                "/v1/sandboxes?live=true&",
                paged.last().map(String::as_str),
                3,
            )
            .unwrap();
        let last = page.len() < 3;
        paged.extend(page.into_iter().map(|s| s.id));
        if last {
            break;
        }
    }
    let listed: Vec<String> = c
        .live_sandboxes()
        .unwrap()
        .into_iter()
        .map(|s| s.id)
        .collect();
    assert_eq!(paged, listed);
    let (mut a, mut b) = (paged.clone(), ids.clone());
    a.sort();
    b.sort();
    assert_eq!(a, b, "every sandbox once");
    for id in &ids {
        c.delete_sandbox(id).unwrap();
    }
    assert!(c.live_sandboxes().unwrap().is_empty());
    assert_eq!(c.sandboxes().unwrap().len(), 8, "ended ones are listed too");
}

/// The Python snippet in docs/api.md (standard library only) works as
/// printed, against a daemon on TCP.
#[test]
fn vm_serve_the_python_snippet_in_the_docs_works() {
    let doc =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/api.md"))
            .unwrap();
    let start = doc
        .find("```python\n")
        .expect("a python block in docs/api.md")
        + 10;
    let snippet = &doc[start..start + doc[start..].find("```").unwrap()];
    let home = private_home();
    let h = home.path();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let addr = format!("127.0.0.1:{port}");
    let mut d = Daemon::start(h, &["--listen", &addr]);
    let token = std::fs::read_to_string(h.join("serve.token")).unwrap();
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(snippet)
        .env("DOUGH_URL", &addr)
        .env("DOUGH_TOKEN", token.trim())
        .output()
        .expect("python3 (scripts/test installs it)");
    assert!(
        out.status.success(),
        "{}\n{}",
        text(&out.stderr),
        d.log_text()
    );
    let printed = text(&out.stdout);
    let mut lines = printed.lines();
    assert!(
        lines.next().unwrap().starts_with("hello from vm-"),
        "{printed}"
    );
    assert_eq!(lines.next(), Some("exit code 0"), "{printed}");
    // It deleted its sandbox.
    assert!(vm_dirs(h).is_empty(), "{printed}");
}

/// SIGTERM: a command in flight finishes and reports its exit, the daemon
/// then exits 0 and its sandbox stays up; systemd is told READY=1 once the
/// daemon listens and STOPPING=1 when it stops (`Type=notify`).
#[test]
fn vm_serve_stops_gracefully_and_tells_systemd() {
    let home = private_home();
    let h = home.path();
    let notify = h.join("notify.sock");
    let sd = std::os::unix::net::UnixDatagram::bind(&notify).unwrap();
    sd.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut cmd = dough(h);
    let log = h.join("serve.log");
    let mut child = cmd
        .arg("serve")
        .env("NOTIFY_SOCKET", &notify)
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 256];
    let n = sd.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"READY=1");
    let token = std::fs::read_to_string(h.join("serve.token")).unwrap();
    let c = Client::new(
        &format!("unix://{}", h.join("serve.sock").display()),
        &token,
    )
    .unwrap();
    let sb = c.create_sandbox(&none_net()).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let t = {
        let c = Client::new(
            &format!("unix://{}", h.join("serve.sock").display()),
            &token,
        )
        .unwrap();
        let id = sb.id.clone();
        std::thread::spawn(move || {
            let mut out = Vec::new();
            let exit = c
                .exec(
                    &id,
                    &ExecBody {
                        argv: vec!["sh".into(), "-c".into(), "sleep 3; echo finished".into()],
                        ..Default::default()
                    },
                    &mut |e| match e {
                        ExecEvent::Start(_) => tx.send(()).unwrap(),
                        ExecEvent::Stdout(b) => out.extend(b),
                        ExecEvent::Stderr(_) => {}
                    },
                )
                .unwrap();
            (exit, out)
        })
    };
    rx.recv_timeout(Duration::from_secs(60)).unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let n = sd.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"STOPPING=1");
    let (exit, out) = t.join().unwrap();
    assert_eq!((exit.exit_code, text(&out)), (0, "finished\n".to_string()));
    let st = child.wait().unwrap();
    assert!(
        st.success(),
        "{st}: {}",
        std::fs::read_to_string(&log).unwrap()
    );
    // The sandbox outlives the daemon; a new one adopts it.
    assert!(ps(h).iter().any(|v| v["id"] == sb.id.as_str()));
    let d = Daemon::start(h, &[]);
    let c = d.client(h);
    assert_eq!(exec(&c, &sb.id, &["echo", "still"]).1, "still\n");
    c.delete_sandbox(&sb.id).unwrap();
}

/// A run submitted through the API, its daemon killed with -9 once a
/// task is committed, the daemon started again: the run goes on and ends
/// green, every task committed exactly once, the tasks committed before
/// the kill never run again; its events (followed across the restart)
/// and its report are all there.
#[test]
fn vm_serve_a_run_survives_its_daemon_killed_mid_way() {
    let home = private_home();
    let h = home.path();
    let (dir, plan) = calc_example();
    let mut d = Daemon::start(h, &[]);
    let c = d.client(h);
    // A plan with problems is refused; nothing runs.
    let broken = dir.path().join("broken.toml");
    std::fs::write(&broken, "goal = \"x\"\n[[task]]\nid = \"a\"\n").unwrap();
    let e = c
        .create_run(&dough_client::CreateRun {
            plan: broken.display().to_string(),
            ..Default::default()
        })
        .unwrap_err();
    assert_eq!(api_code(e), (400, "bad_request".into()));

    let run = c
        .create_run(&dough_client::CreateRun {
            plan: plan.display().to_string(),
            run_id: Some("serve-run".into()),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(
        (run.state, run.branch.as_str()),
        (dough_client::RunState::Running, "dough/serve-run")
    );
    let deadline = Instant::now() + Duration::from_secs(600);
    let committed_before: Vec<String> = loop {
        let r = c.run(&run.id).unwrap();
        let done: Vec<String> = r
            .tasks
            .iter()
            .filter(|t| t.commit.is_some())
            .map(|t| t.id.clone())
            .collect();
        if !done.is_empty() {
            break done;
        }
        assert_eq!(r.state, dough_client::RunState::Running, "{r:?}");
        assert!(Instant::now() < deadline, "no task committed: {r:?}");
        std::thread::sleep(Duration::from_millis(100));
    };
    d.kill9();

    let mut d = Daemon::start(h, &[]);
    let c = d.client(h);
    let mut events = Vec::new();
    let end = c
        .follow_run(&run.id, 0, &mut |e| events.push(e))
        .unwrap_or_else(|e| panic!("following the run: {e:?}\n{}", d.log_text()));
    assert_eq!(end, dough_client::RunState::Green, "{}", d.log_text());
    let seqs: Vec<i64> = events.iter().map(|e| e.seq).collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
    let resumed_at = events
        .iter()
        .position(|e| e.what == "resumed after the daemon restarted")
        .expect("a resume event");
    for t in &committed_before {
        assert!(
            !events[resumed_at..].iter().any(|e| &e.task == t),
            "{t} ran again after the restart"
        );
    }
    let repo = dir.path().join("calc/repo");
    assert_eq!(
        git(&repo, &["log", "--reverse", "--format=%s", "dough/serve-run"]),
        "base\ntokens: Tokenizer\nerrors: Error type\ndocs: Usage guide\nparser: Parser\nevaluate: Evaluator\ncli: Command line"
    );
    let r = c.run(&run.id).unwrap();
    assert_eq!(r.resumed, 1);
    assert_eq!(r.tasks.len(), 6);
    assert!(
        r.tasks
            .iter()
            .all(|t| t.outcome == "green" && t.commit.is_some()),
        "{r:?}"
    );
    let m = c.metrics().unwrap();
    for line in [
        "dough_runs{state=\"green\"} 1",
        "dough_tasks{outcome=\"green\"} 6",
        "dough_attempts{result=\"failed\"} 1",
        "dough_attempts{result=\"green\"} 6",
    ] {
        assert!(m.lines().any(|l| l == line), "{line} missing in\n{m}");
    }
    let report = c.run_report(&run.id).unwrap();
    assert!(report.contains("# gobrr run serve-run"), "{report}");
    assert!(report.contains("## parser attempt 1: failed"), "{report}");
    // A finished run cannot be cancelled; nothing of it is left running.
    assert_eq!(
        api_code(c.cancel_run(&run.id).unwrap_err()),
        (409, "conflict".into())
    );
    assert!(vm_dirs(h).is_empty(), "{:?}", vm_dirs(h));
}

/// The CLI through a daemon (`--host` / DOUGH_HOST): up, ps, exec (output
/// and exit code as on this machine), down; other commands say they do
/// not work that way.
#[test]
fn vm_serve_the_cli_works_through_the_daemon() {
    let home = private_home();
    let h = home.path();
    let d = Daemon::start(h, &[]);
    let host = format!("unix://{}", d.socket.display());
    let remote = |args: &[&str]| {
        dough(h)
            .env("DOUGH_HOST", &host)
            .args(args)
            .output()
            .unwrap()
    };
    let out = remote(&["up", "--net", "none"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let id = text(&out.stdout).trim().to_string();
    let c = d.client(h);
    assert_eq!(c.sandbox(&id).unwrap().net, "none");
    let out = remote(&["ps"]);
    assert!(text(&out.stdout).contains(&id), "{}", text(&out.stdout));
    let out = remote(&[
        "exec",
        &id,
        "-e",
        "X=7",
        "--",
        "sh",
        "-c",
        "echo out-$X; echo err >&2; exit 4",
    ]);
    assert_eq!(out.status.code(), Some(4));
    assert_eq!(
        (text(&out.stdout), text(&out.stderr)),
        ("out-7\n".to_string(), "err\n".to_string())
    );
    let out = remote(&["logs", &id]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("does not work through --host"),
        "{}",
        text(&out.stderr)
    );
    let out = remote(&["down", &id]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        c.sandbox(&id).unwrap().state,
        dough_client::SandboxState::Deleted
    );
    // A wrong token is refused with the daemon's reason.
    let out = dough(h)
        .env("DOUGH_HOST", &host)
        .env("DOUGH_TOKEN", "wrong")
        .args(["ps"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("unauthorized"),
        "{}",
        text(&out.stderr)
    );
}

/// A cancelled run makes no more clones and ends `cancelled`, its
/// unfinished tasks failed as cancelled; nothing of it is left running.
#[test]
fn vm_serve_a_cancelled_run_stops() {
    let home = private_home();
    let h = home.path();
    let (_dir, plan) = calc_example();
    let mut d = Daemon::start(h, &[]);
    let c = d.client(h);
    let run = c
        .create_run(&dough_client::CreateRun {
            plan: plan.display().to_string(),
            ..Default::default()
        })
        .unwrap();
    let r = c.cancel_run(&run.id).unwrap();
    assert_eq!(r.id, run.id);
    let end = c.follow_run(&run.id, 0, &mut |_| {}).unwrap();
    assert_eq!(end, dough_client::RunState::Cancelled, "{}", d.log_text());
    let r = c.run(&run.id).unwrap();
    assert_eq!(r.tasks.len(), 6, "{r:?}");
    assert!(r.tasks.iter().any(|t| t.outcome != "green"), "{r:?}");
    let report = c.run_report(&run.id).unwrap();
    assert!(report.contains("the run was cancelled"), "{report}");
    assert!(vm_dirs(h).is_empty(), "{:?}", vm_dirs(h));
}

/// A client that goes away kills its command, even one that prints
/// nothing.
#[test]
fn vm_serve_a_client_that_leaves_kills_its_command() {
    use std::io::{BufRead, Write};
    let home = private_home();
    let h = home.path();
    let d = Daemon::start(h, &[]);
    let c = d.client(h);
    let sb = c.create_sandbox(&none_net()).unwrap();
    let token = std::fs::read_to_string(h.join("serve.token")).unwrap();
    let body = r#"{"argv": ["sh", "-c", "sleep 600; echo left-marker"]}"#;
    {
        let mut s = std::os::unix::net::UnixStream::connect(&d.socket).unwrap();
        write!(
            s,
            "POST /v1/sandboxes/{}/exec HTTP/1.1\r\nHost: dough\r\nAuthorization: Bearer {}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            sb.id,
            token.trim(),
            body.len()
        )
        .unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut r = std::io::BufReader::new(s);
        let mut line = String::new();
        while !line.starts_with("event: start") {
            line.clear();
            assert!(r.read_line(&mut line).unwrap() > 0, "the stream ended");
        }
        // The client goes away here, the command still sleeping.
    }
    let count = "for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline 2>/dev/null; echo; done | grep -c '[l]eft-marker'";
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, out, _) = exec(&c, &sb.id, &["sh", "-c", count]);
        if out.trim() == "0" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the command outlived its client: {out}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    c.delete_sandbox(&sb.id).unwrap();
}

/// What a raw connection to the daemon gets within `wait`: `Some(bytes)`
/// once the daemon closes it (with whatever it sent first), `None` if it
/// is still open then.
fn read_until_closed(s: &mut std::os::unix::net::UnixStream, wait: Duration) -> Option<Vec<u8>> {
    s.set_read_timeout(Some(wait)).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Some(got),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Some(got),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return None
            }
            Err(e) => panic!("reading from the daemon: {e}"),
        }
    }
}

/// A client that connects and sends no request, or half a head, or goes
/// quiet after a reply, is cut off after --header-timeout (slowloris); one
/// that asks in time is served.
#[test]
fn vm_serve_cuts_off_clients_that_send_no_request() {
    use std::io::Write;
    let home = private_home();
    let h = home.path();
    let d = Daemon::start(h, &["--header-timeout", "1"]);
    let token = std::fs::read_to_string(h.join("serve.token")).unwrap();
    let connect = || std::os::unix::net::UnixStream::connect(&d.socket).unwrap();
    // Nothing at all.
    let mut silent = connect();
    // Half a head.
    let mut half = connect();
    half.write_all(b"GET /v1/health HTTP/1.1\r\nHost: dough\r\n")
        .unwrap();
    // A whole request, answered, then nothing more on the kept-alive
    // connection.
    let mut quiet = connect();
    write!(
        quiet,
        "GET /v1/health HTTP/1.1\r\nHost: dough\r\nAuthorization: Bearer {}\r\n\r\n",
        token.trim()
    )
    .unwrap();
    for (name, s) in [
        ("silent", &mut silent),
        ("half", &mut half),
        ("quiet", &mut quiet),
    ] {
        let got = read_until_closed(s, Duration::from_secs(60))
            .unwrap_or_else(|| panic!("{name}: still open after 60 s"));
        let got = text(&got);
        if name == "quiet" {
            assert!(got.starts_with("HTTP/1.1 200"), "{name}: {got}");
            assert_eq!(got.matches("HTTP/1.1").count(), 1, "{name}: {got}");
        } else {
            assert!(!got.contains("200 OK"), "{name}: {got}");
        }
    }
    assert_eq!(d.client(h).health().unwrap().status, "ok");
}

/// At most --max-connections are served at once: one more waits (it is
/// not refused, and nothing is dropped) until one of them ends. The
/// daemon raised its open-file limit to the hard limit.
#[test]
fn vm_serve_caps_its_connections() {
    let home = private_home();
    let h = home.path();
    // Started with a low soft limit on open files (the hard one as it is).
    let d = Daemon::start_with(
        h,
        &[
            "--max-connections",
            "2",
            "--header-timeout",
            "600",
            "--listen",
            "127.0.0.1:0",
        ],
        |cmd| {
            use std::os::unix::process::CommandExt;
            // SAFETY: between fork and exec: two async-signal-safe calls on
            // a value of its own, no allocation.
            unsafe {
                cmd.pre_exec(|| {
                    let mut lim = libc::rlimit {
                        rlim_cur: 0,
                        rlim_max: 0,
                    };
                    if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    lim.rlim_cur = lim.rlim_max.min(256);
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        },
    );
    let (soft, hard) = open_files_limit(d.child.id() as i64);
    assert_eq!(soft, hard, "soft limit raised to the hard one");
    assert_ne!(soft, "256");
    // Two idle connections take both slots (the daemon has accepted them:
    // it has seen a whole request on each, keep-alive).
    let token = std::fs::read_to_string(h.join("serve.token")).unwrap();
    let mut held: Vec<_> = (0..2)
        .map(|_| {
            use std::io::{BufRead, Write};
            let mut s = std::os::unix::net::UnixStream::connect(&d.socket).unwrap();
            write!(
                s,
                "GET /v1/health HTTP/1.1\r\nHost: dough\r\nAuthorization: Bearer {}\r\n\r\n",
                token.trim()
            )
            .unwrap();
            s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
            let mut r = std::io::BufReader::new(s.try_clone().unwrap());
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            assert!(line.starts_with("HTTP/1.1 200"), "{line}");
            s
        })
        .collect();
    let (tx, rx) = std::sync::mpsc::channel();
    let c = d.client(h);
    std::thread::spawn(move || {
        let _ = tx.send(c.health().map(|h| h.status));
    });
    // With both slots held it is not served (had it been, it would have
    // answered in milliseconds).
    assert!(
        rx.recv_timeout(Duration::from_secs(3)).is_err(),
        "a third connection was served while two were held"
    );
    // TCP has slots of its own: served while the Unix socket's are full.
    let mut d = d;
    let log = d.log_text();
    let addr = log
        .split("serving on http://")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("no TCP address in {log}"))
        .to_string();
    let tcp = Client::new(&format!("http://{addr}"), token.trim()).unwrap();
    assert_eq!(tcp.health().unwrap().status, "ok");
    // A request without the token is answered 401 and its connection
    // closed (it keeps no slot), though the head timeout is 600 s.
    {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        s.write_all(b"GET /v1/health HTTP/1.1\r\nHost: dough\r\n\r\n")
            .unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got)
            .expect("the connection was closed after the 401");
        let got = text(&got);
        assert!(got.starts_with("HTTP/1.1 401"), "{got}");
        assert!(
            got.to_ascii_lowercase().contains("connection: close"),
            "{got}"
        );
    }
    held.pop();
    let served = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("not served after a slot was freed");
    assert_eq!(served.unwrap(), "ok");
    drop(held);
    // What it raised is its own: a sandbox's VMM and gateway get the limit
    // the daemon was started with.
    let sb = tcp
        .create_sandbox(&CreateSandbox {
            net: Some("nat".into()),
            ..none_net()
        })
        .unwrap();
    let rec = records(h)
        .into_iter()
        .find(|r| r["id"] == sb.id.as_str())
        .unwrap();
    for who in ["vmm", "gateway"] {
        let (soft, _) = open_files_limit(rec[who]["pid"].as_i64().unwrap());
        assert_eq!(soft, "256", "the {who}'s");
    }
    tcp.delete_sandbox(&sb.id).unwrap();
}

/// Process `pid`'s soft and hard limits on open files, as
/// `/proc/PID/limits` writes them.
fn open_files_limit(pid: i64) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap_or_else(|| panic!("no open-file limit in {limits}"));
    let v: Vec<&str> = line.split_whitespace().skip(3).take(2).collect();
    (v[0].to_string(), v[1].to_string())
}
