//! The Firecracker lifecycle against a real `firecracker` binary: first
//! the backend alone (boot the image, reach the agent over vsock, run a
//! command, snapshot, restore two clones and check they are alive and
//! distinct), then the same through dough's CLI as the QEMU VM tests do
//! (bake, up, exec, ps, a killed VMM seen dead, down leaving nothing).
//!
//! It needs a Firecracker binary (`DOUGH_FIRECRACKER`) and KVM that boots
//! guests, which our CI machines do not have, so it is `#[ignore]`d:
//! nextest reports it as skipped — not run, never counted as passing — and
//! `scripts/test` prints why it was not run. Where both exist,
//! `scripts/test` runs it (it asks `dough doctor --backend firecracker`);
//! by hand: `cargo nextest run --run-ignored only -E 'binary(fc_real)'`.
//! Run without them, it fails and says which is missing.

mod common;

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use dough_fabric::channel::vsock_listen_path;
use dough_fabric::serial::SerialWatch;
use dough_fabric::HostChannel;
use dough_proto::{READY_LINE, VSOCK_PORT};
use dough_vmm::firecracker::backend::{FcConfig, FcMachine, FcProcess};

fn prerequisites() -> FcConfig {
    // The same rule as dough's: DOUGH_FIRECRACKER, else `firecracker` on PATH.
    let bin = std::env::var_os("DOUGH_FIRECRACKER")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::split_paths(&std::env::var_os("PATH")?)
                .map(|d| d.join("firecracker"))
                .find(|p| p.is_file())
        })
        .expect("not run: no firecracker binary (set DOUGH_FIRECRACKER or put one on PATH)");
    assert!(bin.is_file(), "not run: {} does not exist", bin.display());
    if let Err(why) = dough_vmm::accel::kvm_device_usable() {
        panic!("not run: KVM is not usable: {why}");
    }
    FcConfig {
        binary: bin,
        extra_args: vec![],
        start_limit: Duration::from_secs(10),
    }
}

/// Wait for the agent's vsock connection on `listener` and welcome it.
fn attach(listener: &UnixListener, vm: &str) -> HostChannel {
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let stream = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => panic!("the agent never connected over vsock: {e}"),
        }
    };
    stream.set_nonblocking(false).unwrap();
    let mut ch = HostChannel::from_stream(stream);
    ch.handshake(vm, Duration::from_secs(10)).unwrap();
    ch
}

fn fresh_dir(root: &Path, name: &str) -> PathBuf {
    let d = root.join(name);
    std::fs::create_dir(&d).unwrap();
    d
}

#[test]
#[ignore = "needs a firecracker binary (DOUGH_FIRECRACKER) and KVM that boots guests"]
fn fc_boot_snapshot_restore_two_clones() {
    let cfg = prerequisites();
    let img = common::current_image();
    let root = tempfile::tempdir().unwrap();
    let machine = FcMachine {
        kernel: img.kernel.clone(),
        initrd: img.initrd.clone(),
        rootfs: img.rootfs.clone(),
        rootfs_writable: false,
        mem_mib: 256,
        vcpus: 1,
        boot_args: dough_vmm::qemu::BASE_CMDLINE.join(" "),
        tap: None,
        guest_mac: dough_vmm::qemu::GUEST_MAC.into(),
        guest_cid: 3,
    };

    let d = fresh_dir(root.path(), "bake");
    let listener =
        UnixListener::bind(vsock_listen_path(&d.join("vsock.sock"), VSOCK_PORT)).unwrap();
    let vm = FcProcess::spawn(&cfg, &d).unwrap();
    vm.boot(&machine).unwrap();
    let mut watch = SerialWatch::new(&vm.console);
    assert!(
        dough_vmm::process::wait_until(Duration::from_secs(30), || watch.saw(READY_LINE)),
        "no ready line: {}",
        dough_fabric::serial::tail(&vm.console, 20)
    );
    let mut ch = attach(&listener, "fc-bake");
    assert_eq!(common::sh(&mut ch, "cat /proc/1/comm"), "dough-agent");
    ch.shutdown();
    let snap = fresh_dir(root.path(), "snap");
    vm.snapshot(&snap.join("state"), &snap.join("mem")).unwrap();
    vm.kill();

    let mut randoms = Vec::new();
    for i in 0..2 {
        let d = fresh_dir(root.path(), &format!("clone{i}"));
        let listener =
            UnixListener::bind(vsock_listen_path(&d.join("vsock.sock"), VSOCK_PORT)).unwrap();
        let c = FcProcess::restore(&cfg, &d, &snap.join("state"), &snap.join("mem"), None).unwrap();
        let mut ch = attach(&listener, &format!("fc-clone-{i}"));
        assert_eq!(
            common::sh(&mut ch, "echo $DOUGH_VM_ID"),
            format!("fc-clone-{i}")
        );
        randoms.push(common::sh(&mut ch, "head -c 16 /dev/urandom | od -An -tx1"));
        c.pause().unwrap();
        c.resume().unwrap();
        c.kill();
    }
    assert_ne!(randoms[0], randoms[1], "clones reseeded their RNG");
}

fn dough_fc(home: &Path, args: &[&str]) -> std::process::Output {
    let cfg = prerequisites();
    common::dough(home)
        .args(args)
        .env("DOUGH_BACKEND", "firecracker")
        .env("DOUGH_FIRECRACKER", &cfg.binary)
        .output()
        .unwrap()
}

fn ok(out: std::process::Output) -> String {
    assert!(
        out.status.success(),
        "dough failed ({}):\n{}",
        out.status,
        common::text(&out.stderr)
    );
    common::text(&out.stdout)
}

#[test]
#[ignore = "needs a firecracker binary (DOUGH_FIRECRACKER) and KVM that boots guests"]
fn fc_cli_bake_up_exec_ps_down() {
    prerequisites();
    let home = common::private_home_own_snapshots();
    let h = home.path();
    ok(dough_fc(h, &["bake"]));
    let ids: Vec<String> = ok(dough_fc(h, &["up", "2"]))
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(ids.len(), 2);
    let mut randoms = Vec::new();
    for id in &ids {
        let out = ok(dough_fc(
            h,
            &[
                "exec",
                id,
                "--",
                "sh",
                "-c",
                "cat /proc/1/comm; echo $IS_SANDBOX $DOUGH_VM_ID",
            ],
        ));
        assert_eq!(out, format!("dough-agent\n1 {id}\n"));
        randoms.push(ok(dough_fc(
            h,
            &[
                "exec",
                id,
                "--",
                "sh",
                "-c",
                "head -c 16 /dev/urandom | od -An -tx1",
            ],
        )));
    }
    assert_ne!(randoms[0], randoms[1], "clones reseeded their RNG");
    let vms = common::ps(h);
    assert!(vms
        .iter()
        .all(|v| v["backend"] == "firecracker" && v["state"] == "ready"));
    let pid = vms[0]["vmm"]["pid"].as_i64().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert!(dough_vmm::process::wait_until(
        Duration::from_secs(10),
        || { common::process_gone(pid) }
    ));
    let dead = common::ps(h)
        .into_iter()
        .find(|v| v["vmm"]["pid"].as_i64() == Some(pid))
        .unwrap();
    assert_eq!(dead["state"], "dead");
    ok(dough_fc(h, &["down", "--all"]));
    assert!(common::vm_dirs(h).is_empty());
    let out = dough_fc(h, &["run", "--", "sh", "-c", "exit 5"]);
    assert_eq!(out.status.code(), Some(5));
}
