//! dough-fake-firecracker: a stand-in for the `firecracker` binary in
//! dough's tests, on hosts where Firecracker cannot run (no registry ships
//! it, and our machines' KVM does not boot guests).
//!
//! It serves Firecracker's API with dough-vmm's fake, which enforces the
//! call order Firecracker documents, and plays the guest: on
//! `InstanceStart` it prints the agent's ready line on its stdout (the
//! serial console) and, like the real agent over AF_VSOCK, keeps
//! connecting to the host at `<vsock uds>_1024` and answers dough's
//! protocol (Attach → Hello, Welcome, Exec, Ping). A Full snapshot records
//! the guest's boot id; a process restored from it answers with that boot
//! id through the vsock socket named in `vsock_override`.
//!
//! It is **not** a VM: commands run on the host, as whoever started it, in
//! its network namespace. It exists to test dough's host side of the
//! Firecracker backend (process, API, vsock listener, state machine,
//! snapshots, GC); what only a real guest can show is tested by
//! `crates/dough/tests/fc_real.rs` where Firecracker and KVM work.
//!
//! Its API replies are the bytes real Firecracker v1.16.1 sends (see
//! dough-vmm's `firecracker::fake`), and like the real one it exits with
//! status 1 after a failed `snapshot/load`.
//!
//! Environment: `DOUGH_FAKE_FC_VERSION` (what `--version` and
//! `GET /version` report, default 1.16.1), `DOUGH_FAKE_FC_REFUSE=/path`
//! (answer that API path with a 400 and a `fault_message`).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use dough_proto::{
    decode_host, read_frame, write_frame, Exec, ExitStatus, GuestMsg, Hello, HostMsg, Stream,
    OUTPUT_CHUNK, PROTO_VERSION, READY_LINE, VSOCK_PORT,
};
use dough_vmm::firecracker::fake::{FakeFirecracker, FakeOptions, FakeState};
use serde_json::{json, Value};

fn usage_error(msg: &str) -> ! {
    eprintln!("dough-fake-firecracker: {msg}");
    std::process::exit(1);
}

fn main() {
    let version = std::env::var("DOUGH_FAKE_FC_VERSION").unwrap_or_else(|_| "1.16.1".into());
    let mut api = None;
    let mut log = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--version" => {
                println!("Firecracker v{version} (dough-fake-firecracker, a test double)");
                return;
            }
            "--api-sock" => api = args.next().map(PathBuf::from),
            "--log-path" => log = args.next().map(PathBuf::from),
            "--level" => {
                args.next();
            }
            "--enable-pci" => {}
            other => usage_error(&format!("unknown argument {other:?}")),
        }
    }
    let Some(api) = api else {
        usage_error("--api-sock PATH is required")
    };
    let fake = FakeFirecracker::start_with(
        &api,
        FakeOptions {
            log,
            refuse: std::env::var("DOUGH_FAKE_FC_REFUSE").ok(),
            version: Some(version),
        },
    )
    .unwrap_or_else(|e| usage_error(&format!("cannot listen on {}: {e}", api.display())));
    guest(&fake);
}

/// The stand-in guest: nothing until the VM runs, then the agent's loop.
fn guest(fake: &FakeFirecracker) -> ! {
    let mut running: Option<(String, PathBuf)> = None;
    loop {
        // A failed snapshot load ends the real process (status 1).
        if let Some(code) = fake.exit_code() {
            std::process::exit(code);
        }
        if fake.state() != FakeState::Running {
            std::thread::sleep(Duration::from_millis(5));
            continue;
        }
        let (boot_id, uds) = running.get_or_insert_with(|| start(fake));
        let mut listen = uds.as_os_str().to_owned();
        listen.push(format!("_{VSOCK_PORT}"));
        match UnixStream::connect(&listen) {
            Ok(s) => session(s, boot_id),
            // Nobody listening: the real agent retries too.
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// The guest has just started (booted or restored): its boot id and the
/// host side of its vsock.
fn start(fake: &FakeFirecracker) -> (String, PathBuf) {
    let str_at = |v: Option<Value>, ptr: &str| {
        v.and_then(|v| v.pointer(ptr).and_then(Value::as_str).map(str::to_string))
    };
    if fake.loaded_from_snapshot() {
        let saved: Value = fake
            .loaded_guest_state()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or(Value::Null);
        let boot_id = str_at(Some(saved.clone()), "/boot_id").unwrap_or_default();
        let uds = str_at(fake.body("/snapshot/load"), "/vsock_override/uds_path")
            .or_else(|| str_at(Some(saved), "/uds"))
            .unwrap_or_default();
        return (boot_id, uds.into());
    }
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/uuid")
        .unwrap_or_default()
        .trim()
        .to_string();
    let uds = str_at(fake.body("/vsock"), "/uds_path").unwrap_or_default();
    fake.set_guest_state(json!({"boot_id": boot_id, "uds": uds}).to_string());
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "dough-fake-firecracker: guest started (a test double, not a VM)\n{READY_LINE}"
    );
    let _ = out.flush();
    (boot_id, uds.into())
}

/// Serve one host connection until it closes.
fn session(stream: UnixStream, boot_id: &str) {
    let Ok(mut r) = stream.try_clone() else {
        return;
    };
    let mut w = stream;
    let mut send = |m: GuestMsg| write_frame(&mut w, &m).is_ok();
    loop {
        let Ok(Some(frame)) = read_frame(&mut r) else {
            return;
        };
        let Ok(msg) = decode_host(&frame) else {
            return;
        };
        let ok = match msg {
            HostMsg::Attach => send(GuestMsg::Hello(Hello {
                proto_version: PROTO_VERSION,
                agent_version: "dough-fake-firecracker".into(),
                boot_id: boot_id.into(),
            })),
            HostMsg::Ping { seq } => send(GuestMsg::Pong { seq }),
            HostMsg::Exec(e) => {
                let stdin = if e.stdin_follows {
                    match streamed_stdin(&mut r, e.id) {
                        Some(s) => Some(s),
                        None => return,
                    }
                } else {
                    e.stdin.clone()
                };
                let (out, err, status) = run(&e, stdin);
                [(Stream::Stdout, out), (Stream::Stderr, err)]
                    .into_iter()
                    .flat_map(|(stream, data)| {
                        data.chunks(OUTPUT_CHUNK)
                            .map(|c| (stream, c.to_vec()))
                            .collect::<Vec<_>>()
                    })
                    .all(|(stream, data)| {
                        send(GuestMsg::Output {
                            id: e.id,
                            stream,
                            data,
                        })
                    })
                    && send(GuestMsg::Exit { id: e.id, status })
            }
            HostMsg::Welcome(_) | HostMsg::Signal { .. } => true,
            HostMsg::Input { .. } | HostMsg::InputEnd { .. } => true,
        };
        if !ok {
            return;
        }
    }
}

/// Collect `Input` chunks for request `id` up to its `InputEnd`.
fn streamed_stdin(r: &mut UnixStream, id: u64) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    loop {
        match decode_host(&read_frame(r).ok()??).ok()? {
            HostMsg::Input { id: i, data } if i == id => buf.extend_from_slice(&data),
            HostMsg::InputEnd { id: i } if i == id => return Some(buf),
            _ => {}
        }
    }
}

/// Run the request on the host (see the module comment) with the agent's
/// `IS_SANDBOX=1`.
fn run(e: &Exec, stdin: Option<Vec<u8>>) -> (Vec<u8>, Vec<u8>, ExitStatus) {
    let Some((prog, args)) = e.argv.split_first() else {
        return (vec![], vec![], ExitStatus::SpawnFailed("empty argv".into()));
    };
    let mut cmd = Command::new(prog);
    cmd.args(args)
        .envs(e.env.iter().map(|(k, v)| (k, v)))
        .env("IS_SANDBOX", "1")
        .current_dir(e.cwd.as_deref().unwrap_or("/"))
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(err) => return (vec![], vec![], ExitStatus::SpawnFailed(err.to_string())),
    };
    if let (Some(data), Some(mut pipe)) = (stdin, child.stdin.take()) {
        std::thread::spawn(move || {
            let _ = pipe.write_all(&data);
        });
    }
    let mut err_pipe = child.stderr.take();
    let err_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        if let Some(p) = err_pipe.as_mut() {
            let _ = p.read_to_end(&mut v);
        }
        v
    });
    let mut out = Vec::new();
    if let Some(mut p) = child.stdout.take() {
        let _ = p.read_to_end(&mut out);
    }
    let err = err_reader.join().unwrap_or_default();
    use std::os::unix::process::ExitStatusExt;
    let status = match child.wait() {
        Ok(st) => match (st.code(), st.signal()) {
            (Some(c), _) => ExitStatus::Exited(c),
            (None, Some(s)) => ExitStatus::Signaled(s),
            (None, None) => ExitStatus::Exited(-1),
        },
        Err(err) => ExitStatus::SpawnFailed(err.to_string()),
    };
    (out, err, status)
}
