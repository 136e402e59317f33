//! The Firecracker backend against an in-process fake of its API: the full
//! lifecycle (bake → restore ×2 → pause/resume → kill) in the order
//! Firecracker documents, and its failure modes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use dough_vmm::firecracker::backend::{FcConfig, FcMachine, FcProcess};
use dough_vmm::firecracker::fake::{fault, FakeFirecracker, FakeState};
use dough_vmm::firecracker::FcError;

/// A stand-in `firecracker` binary: a script that just sleeps (or exits).
fn binary(dir: &Path, body: &str) -> PathBuf {
    let p = dir.join("firecracker");
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

fn cfg(bin: PathBuf) -> FcConfig {
    FcConfig {
        binary: bin,
        extra_args: vec![],
        start_limit: Duration::from_secs(5),
    }
}

fn machine() -> FcMachine {
    FcMachine {
        kernel: "/img/vmlinux".into(),
        initrd: "/img/initrd".into(),
        rootfs: "/img/rootfs.ext4".into(),
        rootfs_writable: false,
        mem_mib: 256,
        vcpus: 1,
        boot_args: "console=ttyS0 dough.ip=172.16.0.2/30".into(),
        tap: Some("tap0".into()),
        guest_mac: "52:54:00:d0:06:01".into(),
        guest_cid: 3,
    }
}

/// A fresh VM directory with a fake API already listening in it.
fn vm_dir(root: &Path, name: &str) -> (PathBuf, FakeFirecracker) {
    let d = root.join(name);
    std::fs::create_dir(&d).unwrap();
    let fake = FakeFirecracker::start(&d.join("api.sock")).unwrap();
    (d, fake)
}

#[test]
fn bake_restore_twice_pause_resume_kill_in_documented_order() {
    let root = tempfile::tempdir().unwrap();
    let cfg = cfg(binary(root.path(), "exec sleep 600"));
    let snap = root.path().join("snap");
    std::fs::create_dir(&snap).unwrap();
    let (state, mem) = (snap.join("state"), snap.join("mem"));

    // Bake: configure, start, pause, Full snapshot.
    let (d, bake_api) = vm_dir(root.path(), "bake");
    let bake = FcProcess::spawn(&cfg, &d).unwrap();
    assert_eq!(bake.client.version().unwrap(), "1.16.1");
    bake.boot(&machine()).unwrap();
    assert_eq!(bake_api.state(), FakeState::Running);
    bake.snapshot(&state, &mem).unwrap();
    assert_eq!(
        bake_api.calls(),
        [
            "GET /version",
            "PUT /machine-config",
            "PUT /boot-source",
            "PUT /drives/rootfs",
            "PUT /network-interfaces/eth0",
            "PUT /vsock",
            "PUT /entropy",
            "PUT /actions",
            "PATCH /vm",
            "PUT /snapshot/create",
        ]
    );
    assert_eq!(
        bake_api.body("/drives/rootfs").unwrap()["is_read_only"],
        true
    );
    // Boot resources are refused once started, with Firecracker's message.
    let e = bake.boot(&machine()).unwrap_err();
    assert_eq!(
        e.to_string(),
        "Firecracker refused PUT /machine-config (400): The requested operation is not supported after starting the microVM."
    );
    let pid = bake.pid();
    bake.kill();
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists() || {
            let st = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            st.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        }
    );

    // Two clones, each a fresh process with its own TAP and vsock socket.
    let mut clones = Vec::new();
    for (i, tap) in ["tap0", "tap0"].iter().enumerate() {
        let (d, api) = vm_dir(root.path(), &format!("clone{i}"));
        let c = FcProcess::restore(&cfg, &d, &state, &mem, Some(tap)).unwrap();
        assert_eq!(api.calls(), ["PUT /snapshot/load"]);
        let body = api.body("/snapshot/load").unwrap();
        assert_eq!(body["mem_backend"]["backend_type"], "File");
        assert_eq!(body["resume_vm"], true);
        assert_eq!(body["network_overrides"][0]["host_dev_name"], *tap);
        assert_eq!(
            body["vsock_override"]["uds_path"],
            d.join("vsock.sock").to_string_lossy().as_ref()
        );
        assert_eq!(api.state(), FakeState::Running);
        clones.push((c, api));
    }
    let (c0, api0) = &clones[0];
    c0.pause().unwrap();
    assert_eq!(api0.state(), FakeState::Paused);
    c0.resume().unwrap();
    assert_eq!(api0.state(), FakeState::Running);
    // A loaded process cannot load again (no real refusal text was
    // recorded for this; the fake says so).
    let e = c0
        .client
        .snapshot_load(&serde_json::from_value(api0.body("/snapshot/load").unwrap()).unwrap())
        .unwrap_err();
    assert!(
        matches!(&e, FcError::Refused { status: 400, fault_message, .. } if fault_message.contains("no real Firecracker refusal was recorded")),
        "{e}"
    );
    for (c, _) in clones {
        c.kill();
    }
}

#[test]
fn snapshot_load_after_configuring_is_refused_verbatim() {
    let root = tempfile::tempdir().unwrap();
    let cfg = cfg(binary(root.path(), "exec sleep 600"));
    let (d, _api) = vm_dir(root.path(), "vm");
    let p = FcProcess::spawn(&cfg, &d).unwrap();
    p.client
        .machine_config(&dough_vmm::firecracker::api::MachineConfiguration {
            vcpu_count: 1,
            mem_size_mib: 128,
            smt: None,
            huge_pages: None,
            track_dirty_pages: None,
        })
        .unwrap();
    // After configuring a boot resource, a snapshot can no longer load.
    let load = serde_json::from_value(serde_json::json!({
        "snapshot_path": "/s",
        "mem_backend": {"backend_type": "File", "backend_path": "/m"}
    }))
    .unwrap();
    let e = p.client.snapshot_load(&load).unwrap_err();
    assert_eq!(
        e.to_string(),
        "Firecracker refused PUT /snapshot/load (400): Load snapshot error: Loading a microVM snapshot not allowed after configuring boot-specific resources."
    );
    // Restoring into a directory that does not exist fails to start.
    let e = FcProcess::restore(
        &cfg,
        &root.path().join("nope"),
        Path::new("/s"),
        Path::new("/m"),
        None,
    );
    assert!(matches!(e, Err(FcError::Spawn { .. })));
    // Creating a snapshot while running is refused too.
    p.boot(&machine()).unwrap();
    let e = p
        .client
        .snapshot_create(&dough_vmm::firecracker::api::SnapshotCreateParams {
            snapshot_type: dough_vmm::firecracker::api::SnapshotType::Full,
            snapshot_path: "/tmp/x".into(),
            mem_file_path: "/tmp/y".into(),
        })
        .unwrap_err();
    match e {
        FcError::Refused {
            status,
            fault_message,
            ..
        } => {
            assert_eq!(status, 400);
            assert_eq!(fault_message, fault::CREATE_WHILE_RUNNING);
        }
        other => panic!("{other}"),
    }
    p.kill();
}

#[test]
fn a_socket_that_never_appears_and_an_early_exit_are_reported() {
    let root = tempfile::tempdir().unwrap();
    let mut c = cfg(binary(root.path(), "exec sleep 600"));
    c.start_limit = Duration::from_millis(300);
    let d = root.path().join("a");
    std::fs::create_dir(&d).unwrap();
    match FcProcess::spawn(&c, &d) {
        Err(FcError::NoSocket { secs: 0, .. }) => {}
        other => panic!("{other:?}"),
    }
    let c = cfg(binary(root.path(), "echo 'bad args' >&2; exit 3"));
    let d = root.path().join("b");
    std::fs::create_dir(&d).unwrap();
    match FcProcess::spawn(&c, &d) {
        Err(FcError::Exited { status }) => assert!(status.contains('3'), "{status}"),
        other => panic!("{other:?}"),
    }
    let c = cfg(root.path().join("no-such-firecracker"));
    let d = root.path().join("c");
    std::fs::create_dir(&d).unwrap();
    let e = FcProcess::spawn(&c, &d).unwrap_err();
    assert!(e.to_string().contains("is Firecracker installed?"), "{e}");
}
