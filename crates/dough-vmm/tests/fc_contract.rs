//! Contract tier: dough's Firecracker code paths against a **real**
//! `firecracker` binary (`DOUGH_FIRECRACKER=/path/to/firecracker`), with a
//! byte-level proxy on the API socket that records every reply. Each reply
//! must be exactly what dough's fake answers in the same situation — the
//! fake's bytes are the real ones, or this fails.
//!
//! Needs no booted guest: configuration, InstanceStart, Pause, a Full
//! snapshot, kill; then a new process restored with `network_overrides` and
//! `vsock_override`, Resume/Pause/Resume, its own Full snapshot (a live
//! snapshot) and a fork loaded from it; then the refusals and the exits.
//! Run as root (Firecracker creates the TAPs) on a host with /dev/kvm:
//!
//! ```sh
//! DOUGH_FIRECRACKER=/path/to/firecracker cargo nextest run -p dough-vmm \
//!     --test fc_contract --run-ignored only
//! ```
//!
//! The guest kernel and initramfs come from `DOUGH_FC_KERNEL` /
//! `DOUGH_FC_INITRD`, else from dough's image cache under `$DOUGH_HOME`.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dough_vmm::firecracker::api::{
    BackendType, MachineConfiguration, MemoryBackend, SnapshotLoadParams,
};
use dough_vmm::firecracker::backend::{FcConfig, FcMachine, FcProcess};
use dough_vmm::firecracker::fake::{fault, json_reply, NO_CONTENT};
use dough_vmm::firecracker::FcError;

const IGNORED: &str = "contract tier: needs DOUGH_FIRECRACKER=<a real firecracker binary>";

/// dough's rule: `DOUGH_FIRECRACKER`, else `firecracker` on `PATH`.
fn real_binary() -> PathBuf {
    std::env::var_os("DOUGH_FIRECRACKER")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::split_paths(&std::env::var_os("PATH")?)
                .map(|d| d.join("firecracker"))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| panic!("{IGNORED}"))
}

/// The first file under `$DOUGH_HOME/cache/<kind>/*/` named `name`.
fn cached(kind: &str, name: &str, var: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(var) {
        return p.into();
    }
    let home = std::env::var_os("DOUGH_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap()).join(".local/share/dough")
        });
    let dir = home.join("cache").join(kind);
    std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e} (build the image, or set {var})", dir.display()))
        .flatten()
        .map(|e| e.path().join(name))
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("no {name} under {} (set {var})", dir.display()))
}

/// What went over one API connection: the request, and the reply bytes.
type Exchange = (Vec<u8>, Vec<u8>);

/// A byte-level proxy: listens on `front`, forwards each connection to
/// `back` (waiting for it to appear), and records both directions.
fn proxy(front: &Path, back: PathBuf) -> Arc<Mutex<Vec<Exchange>>> {
    let log = Arc::new(Mutex::new(Vec::new()));
    let l = UnixListener::bind(front).unwrap();
    let rec = log.clone();
    std::thread::spawn(move || {
        for client in l.incoming().flatten() {
            let mut up = None;
            for _ in 0..1000 {
                match UnixStream::connect(&back) {
                    Ok(s) => {
                        up = Some(s);
                        break;
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
            let Some(up) = up else { continue };
            let idx = {
                let mut g = rec.lock().unwrap();
                g.push((Vec::new(), Vec::new()));
                g.len() - 1
            };
            let pump = |mut from: UnixStream,
                        mut to: UnixStream,
                        rec: Arc<Mutex<Vec<Exchange>>>,
                        reply: bool| {
                std::thread::spawn(move || {
                    let mut buf = [0u8; 8192];
                    loop {
                        match from.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                {
                                    let mut g = rec.lock().unwrap();
                                    let e = &mut g[idx];
                                    if reply { &mut e.1 } else { &mut e.0 }
                                        .extend_from_slice(&buf[..n]);
                                }
                                if to.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                            }
                        }
                    }
                    // One side is done: end both (Firecracker keeps its
                    // side open; the client's close ends the exchange).
                    let _ = to.shutdown(std::net::Shutdown::Both);
                    let _ = from.shutdown(std::net::Shutdown::Both);
                })
            };
            pump(
                client.try_clone().unwrap(),
                up.try_clone().unwrap(),
                rec.clone(),
                false,
            );
            pump(up, client, rec.clone(), true);
        }
    });
    log
}

/// A VM directory whose `api.sock` is the recording proxy in front of the
/// real process (started through a wrapper that moves its socket aside).
struct Recorded {
    dir: PathBuf,
    log: Arc<Mutex<Vec<Exchange>>>,
    seen: usize,
}

impl Recorded {
    fn new(root: &Path, name: &str) -> Recorded {
        let dir = root.join(name);
        std::fs::create_dir(&dir).unwrap();
        let log = proxy(&dir.join("api.sock"), dir.join("api.sock.real"));
        Recorded { dir, log, seen: 0 }
    }

    /// The replies since the last look, each checked against `want`.
    fn expect(&mut self, what: &str, want: &[&[u8]]) {
        // The proxy may still be copying the last reply to the client.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let (got, total): (Vec<Vec<u8>>, usize) = loop {
            let g = self.log.lock().unwrap();
            // Connections that sent nothing (the socket wait's probes)
            // are no exchange.
            let new: Vec<Vec<u8>> = g[self.seen.min(g.len())..]
                .iter()
                .filter(|e| !e.0.is_empty())
                .map(|e| e.1.clone())
                .collect();
            let total = g.len();
            if (new.len() >= want.len() && new.iter().all(|r| !r.is_empty()))
                || std::time::Instant::now() > deadline
            {
                break (new, total);
            }
            drop(g);
            std::thread::sleep(Duration::from_millis(5));
        };
        self.seen = total;
        let got: Vec<String> = got
            .iter()
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .collect();
        let want: Vec<String> = want
            .iter()
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .collect();
        assert_eq!(got, want, "{what}: the real replies differ from the fake's");
    }
}

fn refusal(message: &str) -> Vec<u8> {
    json_reply(
        400,
        &serde_json::json!({ "fault_message": message }).to_string(),
    )
}

fn refused_with(r: Result<(), FcError>, message: &str) {
    match r {
        Err(FcError::Refused {
            status: 400,
            fault_message,
            ..
        }) => {
            assert_eq!(fault_message, message)
        }
        other => panic!("expected the refusal {message:?}, got {other:?}"),
    }
}

#[test]
#[ignore = "contract tier: needs DOUGH_FIRECRACKER=<a real firecracker binary>"]
fn real_firecracker_answers_as_the_fake_does() {
    let real = real_binary();
    let root = tempfile::tempdir().unwrap();
    // `firecracker --api-sock X ...` becomes `REAL --api-sock X.real ...`;
    // `exec` keeps the pid dough records.
    let wrapper = root.path().join("firecracker");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\napi=\"$2\"; shift 2\nexec '{}' --api-sock \"$api.real\" \"$@\"\n",
            real.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let cfg = FcConfig {
        binary: wrapper,
        extra_args: vec![],
        start_limit: Duration::from_secs(10),
    };
    let rootfs = root.path().join("rootfs.img");
    std::fs::File::create(&rootfs)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let tag = std::process::id() % 100_000;
    let machine = FcMachine {
        kernel: cached("kernel", "vmlinux", "DOUGH_FC_KERNEL"),
        initrd: cached("initramfs", "initrd.cpio", "DOUGH_FC_INITRD"),
        rootfs,
        rootfs_writable: false,
        mem_mib: 256,
        vcpus: 1,
        boot_args: "console=ttyS0 reboot=k panic=1".into(),
        tap: Some(format!("dfc{tag}a")),
        guest_mac: "06:00:ac:10:00:02".into(),
        guest_cid: 3,
    };
    let snap = root.path().join("snap");
    std::fs::create_dir(&snap).unwrap();
    let (state, mem) = (snap.join("state"), snap.join("mem"));

    // 1. Bake: version, every configuration call, InstanceStart, Pause,
    //    Full snapshot; then the refusals of a started VM.
    let mut rec = Recorded::new(root.path(), "bake");
    let bake = FcProcess::spawn(&cfg, &rec.dir).unwrap();
    let version = bake.client.version().unwrap();
    rec.expect(
        "GET /version",
        &[&json_reply(
            200,
            &format!("{{\"firecracker_version\":\"{version}\"}}"),
        )],
    );
    bake.boot(&machine).unwrap();
    rec.expect("configure and start", &[NO_CONTENT; 7]);
    bake.snapshot(&state, &mem).unwrap();
    rec.expect("pause and Full snapshot", &[NO_CONTENT; 2]);
    bake.resume().unwrap();
    rec.expect("resume", &[NO_CONTENT]);
    refused_with(
        bake.client
            .snapshot_full(&snap.join("s2"), &snap.join("m2")),
        fault::CREATE_WHILE_RUNNING,
    );
    refused_with(bake.client.start(), fault::AFTER_START);
    refused_with(
        bake.client.machine_config(&MachineConfiguration {
            vcpu_count: 1,
            mem_size_mib: 256,
            smt: Some(false),
            huge_pages: None,
            track_dirty_pages: None,
        }),
        fault::AFTER_START,
    );
    rec.expect(
        "refusals after start",
        &[
            &refusal(fault::CREATE_WHILE_RUNNING),
            &refusal(fault::AFTER_START),
            &refusal(fault::AFTER_START),
        ],
    );
    let bake_vsock = bake.vsock_uds.clone();
    bake.kill();

    // 2. Restore into a new process: load with this clone's TAP and vsock
    //    socket, resume; pause, resume, pause, resume.
    let mut rec = Recorded::new(root.path(), "clone");
    let clone =
        FcProcess::restore(&cfg, &rec.dir, &state, &mem, Some(&format!("dfc{tag}b"))).unwrap();
    rec.expect("snapshot/load with overrides", &[NO_CONTENT]);
    for _ in 0..2 {
        clone.pause().unwrap();
        clone.resume().unwrap();
    }
    rec.expect("pause/resume twice", &[NO_CONTENT; 4]);
    // A live snapshot of the clone (`dough snapshot`): pause, Full
    // snapshot, resume.
    let live = root.path().join("live");
    std::fs::create_dir(&live).unwrap();
    let (live_state, live_mem) = (live.join("state"), live.join("mem"));
    clone.snapshot(&live_state, &live_mem).unwrap();
    clone.resume().unwrap();
    rec.expect("live snapshot of a clone", &[NO_CONTENT; 3]);
    assert!(live_state.is_file() && live_mem.is_file());
    clone.kill();

    // 2b. A fork: a new process loads the clone's snapshot with its own
    //     TAP and vsock socket.
    let mut rec = Recorded::new(root.path(), "fork");
    let fork = FcProcess::restore(
        &cfg,
        &rec.dir,
        &live_state,
        &live_mem,
        Some(&format!("dfc{tag}d")),
    )
    .unwrap();
    rec.expect("snapshot/load of a clone's snapshot", &[NO_CONTENT]);
    fork.pause().unwrap();
    fork.resume().unwrap();
    rec.expect("the fork pauses and resumes", &[NO_CONTENT; 2]);
    fork.kill();

    // 3. A fresh process refuses what needs a started VM.
    let mut rec = Recorded::new(root.path(), "fresh");
    let fresh = FcProcess::spawn(&cfg, &rec.dir).unwrap();
    refused_with(fresh.client.start(), fault::NO_KERNEL);
    refused_with(fresh.pause(), fault::BEFORE_START);
    refused_with(
        fresh
            .client
            .snapshot_full(&snap.join("s3"), &snap.join("m3")),
        fault::BEFORE_START,
    );
    rec.expect(
        "refusals before start",
        &[
            &refusal(fault::NO_KERNEL),
            &refusal(fault::BEFORE_START),
            &refusal(fault::BEFORE_START),
        ],
    );
    // ... and a load once anything is configured (and stays up).
    fresh
        .client
        .machine_config(&MachineConfiguration {
            vcpu_count: 1,
            mem_size_mib: 128,
            smt: None,
            huge_pages: None,
            track_dirty_pages: None,
        })
        .unwrap();
    let load = |snapshot: &Path, vsock: Option<&Path>| SnapshotLoadParams {
        snapshot_path: snapshot.display().to_string(),
        mem_backend: MemoryBackend {
            backend_type: BackendType::File,
            backend_path: mem.display().to_string(),
        },
        resume_vm: Some(true),
        network_overrides: vec![],
        vsock_override: vsock.map(|p| dough_vmm::firecracker::api::VsockOverride {
            uds_path: p.display().to_string(),
        }),
    };
    let elsewhere = root.path().join("elsewhere.sock");
    refused_with(
        fresh.client.snapshot_load(&load(&state, Some(&elsewhere))),
        fault::LOAD_AFTER_CONFIG,
    );
    rec.expect(
        "load after configuring",
        &[NO_CONTENT, &refusal(fault::LOAD_AFTER_CONFIG)],
    );
    fresh.kill();

    // 4. A failed load ends the process with status 1: a snapshot file
    //    that is not there, and a vsock socket still in use (the bake's,
    //    which a killed Firecracker leaves behind).
    assert!(
        bake_vsock.exists(),
        "a killed Firecracker leaves its vsock socket"
    );
    let mut in_use = load(&state, None);
    in_use.network_overrides = vec![dough_vmm::firecracker::api::NetworkOverride {
        iface_id: dough_vmm::firecracker::backend::IFACE.into(),
        host_dev_name: format!("dfc{tag}c"),
    }];
    for (name, params, message) in [
        (
            "missing",
            load(&snap.join("nope"), Some(&elsewhere)),
            fault::LOAD_NO_SNAPSHOT_FILE,
        ),
        ("in-use", in_use, fault::LOAD_VSOCK_IN_USE),
    ] {
        let mut rec = Recorded::new(root.path(), name);
        let mut p = FcProcess::spawn(&cfg, &rec.dir).unwrap();
        refused_with(p.client.snapshot_load(&params), message);
        rec.expect(name, &[&refusal(message)]);
        let status = p.wait_exit(Duration::from_secs(10));
        assert_eq!(status.and_then(|s| s.code()), Some(1), "{name}: {status:?}");
        p.kill();
    }
}
