//! dough's Firecracker backend end to end through the CLI, against
//! `dough-fake-firecracker`: Firecracker's API (with its documented call
//! order enforced) and a stand-in guest that speaks dough's protocol over
//! the hybrid vsock socket. No VM boots here — what these tests show is
//! dough's host side: the process spawned inside each clone's netns, the
//! API calls and their bodies, the vsock listener, the state machine,
//! snapshot keys, `ps`, GC and exact teardown. The same lifecycle against
//! a real Firecracker is `fc_real.rs`.
//!
//! Privileged tier: clones get real network namespaces (root).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::{process_gone, ps, text, vm_dirs};

fn fake_binary() -> PathBuf {
    let p = Path::new(env!("CARGO_BIN_EXE_dough")).with_file_name("dough-fake-firecracker");
    assert!(
        p.is_file(),
        "{} is missing: build it with `cargo build -p dough-fake-firecracker` (scripts/test does)",
        p.display()
    );
    p
}

/// dough with the Firecracker backend pointed at the fake.
fn fc(home: &Path) -> Command {
    let mut c = common::dough(home);
    c.env("DOUGH_BACKEND", "firecracker")
        .env("DOUGH_FIRECRACKER", fake_binary())
        .env_remove("DOUGH_ACCEL")
        .env_remove("DOUGH_FAKE_FC_VERSION")
        .env_remove("DOUGH_FAKE_FC_REFUSE");
    c
}

fn ok(out: Output) -> Output {
    assert!(
        out.status.success(),
        "dough failed ({}):\n{}\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    out
}

fn netns_of(pid: i64) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/net"))
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

/// Netns of this home's scope still on the host.
fn netns_left(home: &Path) -> Vec<String> {
    let vms = home.join("vms");
    std::fs::create_dir_all(&vms).unwrap();
    let scope = dough_fabric::host::net_scope(&vms);
    std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&format!("dough-{scope}-")))
        .collect()
}

/// The API calls a VM's Firecracker received (the fake logs them to its
/// `--log-path`).
fn api_calls(vm_dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(vm_dir.join("firecracker.log"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn snapshot_metas(home: &Path) -> Vec<serde_json::Value> {
    std::fs::read_dir(home.join("snapshots"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("meta.json")).ok())
        .map(|b| serde_json::from_slice(&b).unwrap())
        .collect()
}

#[test]
fn bake_up_exec_ps_kill_down_through_the_firecracker_backend() {
    let home = common::private_home_own_snapshots();
    let h = home.path();

    // Bake: configure + InstanceStart, ready line on the console, the
    // agent's vsock connection, pause, Full snapshot.
    let out = ok(fc(h).arg("bake").output().unwrap());
    let err = text(&out.stderr);
    assert!(err.contains("baking snapshot"), "{err}");
    assert!(
        !err.contains("TCG"),
        "no TCG warning under Firecracker: {err}"
    );
    let metas = snapshot_metas(h);
    assert_eq!(metas.len(), 1);
    let meta = &metas[0];
    assert_eq!(meta["backend"], "firecracker");
    assert_eq!(meta["inputs"]["accel"], "kvm");
    assert_eq!(meta["inputs"]["backend"], "firecracker");
    assert!(
        meta["inputs"]["firecracker"]
            .as_str()
            .unwrap()
            .contains("v1.16.1"),
        "the Firecracker version is part of the key: {meta}"
    );
    assert!(meta["inputs"].get("qemu").is_none(), "{meta}");

    // Two clones, each its own Firecracker in its own netns.
    let out = ok(fc(h).args(["up", "2"]).output().unwrap());
    let ids: Vec<String> = text(&out.stdout).lines().map(str::to_string).collect();
    assert_eq!(ids.len(), 2, "{}", text(&out.stdout));
    let vms = ps(h);
    assert_eq!(vms.len(), 2);
    let mut pids = Vec::new();
    for v in &vms {
        assert_eq!(v["backend"], "firecracker", "{v}");
        assert_eq!(v["state"], "ready", "{v}");
        let pid = v["vmm"]["pid"].as_i64().unwrap();
        assert!(!process_gone(pid));
        assert_ne!(netns_of(pid), netns_of(std::process::id() as i64));
        pids.push(pid);
    }
    assert_ne!(netns_of(pids[0]), netns_of(pids[1]), "one netns per clone");
    let table = text(&ok(fc(h).arg("ps").output().unwrap()).stdout);
    assert!(table.contains("BACKEND"), "{table}");
    assert_eq!(table.matches("firecracker").count(), 2, "{table}");

    // Each was restored (never booted) with its own vsock socket and TAP.
    for id in &ids {
        let dir = h.join("vms").join(id);
        let calls = api_calls(&dir);
        let paths: Vec<&str> = calls.iter().map(|c| c["path"].as_str().unwrap()).collect();
        assert_eq!(paths, ["/snapshot/load"], "{calls:?}");
        let load = &calls[0]["body"];
        assert_eq!(
            load["vsock_override"]["uds_path"],
            dir.join("vsock.sock").display().to_string()
        );
        assert_eq!(load["network_overrides"][0]["host_dev_name"], "tap0");
        assert_eq!(load["mem_backend"]["backend_type"], "File");
        assert_eq!(load["resume_vm"], true);
    }

    // Pause and resume through Firecracker's API (`PATCH /vm`, recorded
    // from the real binary).
    let id = &ids[0];
    ok(fc(h).args(["pause", id]).output().unwrap());
    assert_eq!(
        ps(h).iter().find(|v| v["id"] == id.as_str()).unwrap()["state"],
        "paused"
    );
    ok(fc(h).args(["resume", id]).output().unwrap());
    let calls = api_calls(&h.join("vms").join(id));
    let vm_states: Vec<&serde_json::Value> = calls
        .iter()
        .filter(|c| c["path"] == "/vm")
        .map(|c| &c["body"]["state"])
        .collect();
    assert_eq!(vm_states, ["Paused", "Resumed"], "{calls:?}");

    // exec reaches the agent over vsock: inline and streamed stdin (over
    // the 256 KiB inline limit), exit codes, and two execs at once.
    let out = ok(fc(h)
        .args(["exec", id, "--", "sh", "-c", "echo sandbox=$IS_SANDBOX"])
        .output()
        .unwrap());
    assert_eq!(text(&out.stdout), "sandbox=1\n");
    let mut child = fc(h)
        .args(["exec", "-i", id, "--", "wc", "-c"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(&vec![b'x'; 300 << 10]).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(text(&out.stdout).trim(), (300 << 10).to_string());
    let out = fc(h)
        .args(["exec", id, "--", "sh", "-c", "exit 7"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(7));
    let both: Vec<_> = (0..2)
        .map(|i| {
            fc(h)
                .args(["exec", id, "--", "echo", &format!("concurrent-{i}")])
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for (i, c) in both.into_iter().enumerate() {
        let out = c.wait_with_output().unwrap();
        assert!(out.status.success());
        assert_eq!(text(&out.stdout), format!("concurrent-{i}\n"));
    }

    // A clone whose Firecracker dies is seen dead, and exec says so.
    let victim = ps(h)
        .into_iter()
        .find(|v| v["id"] == ids[1].as_str())
        .unwrap();
    let vpid = victim["vmm"]["pid"].as_i64().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(vpid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !process_gone(vpid) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = fc(h)
        .args(["exec", &ids[1], "--", "true"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("is dead"),
        "{}",
        text(&out.stderr)
    );
    let dead = ps(h)
        .into_iter()
        .find(|v| v["id"] == ids[1].as_str())
        .unwrap();
    assert_eq!(dead["state"], "dead");

    // down --all: every process, directory and netns goes.
    ok(fc(h).args(["down", "--all"]).output().unwrap());
    assert!(vm_dirs(h).is_empty(), "{:?}", vm_dirs(h));
    for pid in pids {
        assert!(process_gone(pid), "pid {pid} still runs");
    }
    assert!(netns_left(h).is_empty(), "{:?}", netns_left(h));

    // `run` restores a clone of the same snapshot and passes the exit code.
    let out = fc(h)
        .args(["run", "--", "sh", "-c", "echo run-ok; exit 3"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "run-ok\n");
    assert!(vm_dirs(h).is_empty());

    // A new Firecracker version means a new snapshot, and dough says why.
    let out = ok(fc(h)
        .arg("bake")
        .env("DOUGH_FAKE_FC_VERSION", "1.17.0")
        .output()
        .unwrap());
    let err = text(&out.stderr);
    assert!(
        err.contains("firecracker") && err.contains("v1.16.1") && err.contains("v1.17.0"),
        "{err}"
    );
    assert_eq!(snapshot_metas(h).len(), 2);

    // --firecracker-pci changes the guest's devices: its own snapshot, and
    // clones' Firecrackers get the flag.
    ok(fc(h).args(["bake", "--firecracker-pci"]).output().unwrap());
    let metas = snapshot_metas(h);
    assert_eq!(metas.len(), 3);
    assert!(metas.iter().any(|m| m["inputs"]["firecracker"]
        .as_str()
        .unwrap()
        .ends_with("--enable-pci")));
    let out = ok(fc(h)
        .args([
            "run",
            "--firecracker-pci",
            "--",
            "sh",
            "-c",
            "tr '\\0' ' ' < /proc/$PPID/cmdline",
        ])
        .output()
        .unwrap());
    // The stand-in guest runs commands as its children: $PPID is the VMM.
    let argv = text(&out.stdout);
    assert!(
        argv.contains("--api-sock") && argv.contains("--enable-pci"),
        "{argv}"
    );
}

#[test]
fn firecracker_failures_are_reported_and_leave_nothing_behind() {
    let home = common::private_home_own_snapshots();
    let h = home.path();
    ok(fc(h).arg("bake").output().unwrap());

    // Firecracker's fault_message reaches the user verbatim.
    let out = fc(h)
        .args(["up", "1"])
        .env("DOUGH_FAKE_FC_REFUSE", "/snapshot/load")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains(
            "Firecracker refused PUT /snapshot/load (400): dough's fake refuses this (DOUGH_FAKE_FC_REFUSE=/snapshot/load)"
        ),
        "{err}"
    );
    assert!(vm_dirs(h).is_empty(), "{:?}", vm_dirs(h));
    assert!(netns_left(h).is_empty(), "{:?}", netns_left(h));

    // A bake refused at InstanceStart: same, and no snapshot appears.
    let fresh = common::private_home_own_snapshots();
    let out = fc(fresh.path())
        .arg("bake")
        .env("DOUGH_FAKE_FC_REFUSE", "/actions")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("Firecracker refused PUT /actions (400): dough's fake refuses this"),
        "{err}"
    );
    assert!(snapshot_metas(fresh.path()).is_empty());
    assert!(vm_dirs(fresh.path()).is_empty());

    // No binary: say what to do.
    let out = fc(h)
        .args(["up", "1"])
        .env("DOUGH_FIRECRACKER", "/nonexistent/firecracker")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("/nonexistent/firecracker") && err.contains("Firecracker installed"),
        "{err}"
    );

    // Firecracker has no TCG.
    let out = fc(h)
        .args(["run", "--accel", "tcg", "--", "true"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("KVM only"),
        "{}",
        text(&out.stderr)
    );
    assert!(vm_dirs(h).is_empty());
}

#[test]
#[cfg_attr(
    not(feature = "test-hooks"),
    ignore = "stops dough with a test hook: needs --features dough/test-hooks (scripts/test has it)"
)]
fn firecracker_clones_of_a_killed_up_are_reclaimed_by_the_next_command() {
    let home = common::private_home_own_snapshots();
    let h = home.path();
    ok(fc(h).arg("bake").output().unwrap());
    let bin = fake_binary();
    let (mut child, seen) = common::spawn_until(
        h,
        &[
            "up",
            "2",
            "--backend",
            "firecracker",
            "--firecracker",
            bin.to_str().unwrap(),
        ],
        ("DOUGH_TEST_HOLD_BEFORE_HANDOVER", "1"),
        "holding the clones before handover",
    );
    let pids: Vec<i64> = common::records(h)
        .iter()
        .filter_map(|r| r["vmm"]["pid"].as_i64())
        .collect();
    assert_eq!(pids.len(), 2, "{seen}");
    common::kill_dough_and_its_watchdog(&mut child);
    assert!(pids.iter().all(|p| !process_gone(*p)), "VMMs outlive dough");

    let out = common::run(h, &["ps"]);
    let err = text(&out.stderr);
    assert_eq!(err.matches("reclaimed orphaned VM").count(), 2, "{err}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !pids.iter().all(|p| process_gone(*p)) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(pids.iter().all(|p| process_gone(*p)));
    assert!(vm_dirs(h).is_empty(), "{:?}", vm_dirs(h));
    assert!(netns_left(h).is_empty(), "{:?}", netns_left(h));
}

#[test]
fn config_file_selects_the_backend_and_flags_beat_it() {
    let home = common::private_home_own_snapshots();
    let h = home.path();
    std::fs::write(
        h.join("config.toml"),
        format!(
            "backend = \"firecracker\"\nfirecracker = {:?}\n",
            fake_binary().display().to_string()
        ),
    )
    .unwrap();
    // No flag, no DOUGH_BACKEND: the file chooses Firecracker.
    ok(common::dough(h).arg("bake").output().unwrap());
    let metas = snapshot_metas(h);
    assert_eq!(metas.len(), 1);
    assert_eq!(metas[0]["backend"], "firecracker");
    // A flag beats the file (this QEMU does not exist, so nothing boots).
    let out = common::dough(h)
        .args(["bake", "--backend", "qemu", "--qemu", "/nonexistent/qemu"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("/nonexistent/qemu"),
        "{}",
        text(&out.stderr)
    );
    // A file dough cannot use is an error naming it, before anything runs.
    std::fs::write(h.join("config.toml"), "backnd = \"qemu\"\n").unwrap();
    let out = common::dough(h).arg("ps").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains("config.toml") && err.contains("backnd"),
        "{err}"
    );
}

/// `dough snapshot` and `dough fork` of a Firecracker clone: pause, a Full
/// snapshot of the clone (state + memory, recorded from the real binary:
/// scenarios I and J of the fixtures), resume; the snapshot is recorded
/// with its parent; forks are restored from it (never booted), each with
/// its own netns, TAP and vsock socket, and answer; the parent runs on.
#[test]
fn firecracker_clones_are_snapshotted_and_forked() {
    let home = common::private_home_own_snapshots();
    let h = home.path();
    ok(fc(h).arg("bake").output().unwrap());
    let bake_key = snapshot_metas(h)[0]["key"].as_str().unwrap().to_string();
    let out = ok(fc(h).args(["up", "1"]).output().unwrap());
    let parent = text(&out.stdout).trim().to_string();
    let out = ok(fc(h)
        .args(["exec", &parent, "--", "echo", "before"])
        .output()
        .unwrap());
    assert_eq!(text(&out.stdout), "before\n");

    let out = ok(fc(h).args(["snapshot", &parent]).output().unwrap());
    let key = text(&out.stdout).trim().to_string();
    assert_ne!(key, bake_key);
    let calls = api_calls(&h.join("vms").join(&parent));
    let tail: Vec<(String, serde_json::Value)> = calls
        .iter()
        .skip(1)
        .map(|c| (c["path"].as_str().unwrap().to_string(), c["body"].clone()))
        .collect();
    assert_eq!(tail.len(), 3, "{calls:?}");
    assert_eq!(
        tail[0],
        ("/vm".into(), serde_json::json!({"state": "Paused"}))
    );
    assert_eq!(tail[1].0, "/snapshot/create");
    assert_eq!(tail[1].1["snapshot_type"], "Full");
    assert_eq!(
        tail[2],
        ("/vm".into(), serde_json::json!({"state": "Resumed"}))
    );
    // Recorded with its parent, the snapshot's files read-only.
    let metas = snapshot_metas(h);
    let meta = metas.iter().find(|m| m["key"] == key.as_str()).unwrap();
    assert_eq!(meta["parent"]["snapshot"], bake_key.as_str());
    assert_eq!(meta["parent"]["vm"], parent.as_str());
    assert_eq!(meta["backend"], "firecracker");
    let dir = h.join("snapshots").join(&key);
    for f in ["state", "mem"] {
        let m = std::fs::metadata(dir.join(f)).unwrap();
        assert!(m.permissions().readonly(), "{f} is read-only");
    }
    let listed = text(&ok(fc(h).args(["snapshots", "--json"]).output().unwrap()).stdout);
    assert!(listed.contains(&key), "{listed}");

    // Two forks: each a fresh Firecracker that loads the clone's snapshot
    // with its own TAP and vsock socket.
    let out = ok(fc(h).args(["fork", &parent, "2"]).output().unwrap());
    let forks: Vec<String> = text(&out.stdout).lines().map(str::to_string).collect();
    assert_eq!(forks.len(), 2, "{}", text(&out.stdout));
    let mut netns = vec![netns_of(
        ps(h).iter().find(|v| v["id"] == parent.as_str()).unwrap()["vmm"]["pid"]
            .as_i64()
            .unwrap(),
    )];
    for f in &forks {
        let vm = h.join("vms").join(f);
        let calls = api_calls(&vm);
        assert_eq!(calls.len(), 1, "{calls:?}");
        assert_eq!(calls[0]["path"], "/snapshot/load");
        let load = &calls[0]["body"];
        assert_eq!(
            load["snapshot_path"],
            dir.join("state").display().to_string()
        );
        assert_eq!(
            load["mem_backend"]["backend_path"],
            dir.join("mem").display().to_string()
        );
        assert_eq!(
            load["vsock_override"]["uds_path"],
            vm.join("vsock.sock").display().to_string()
        );
        let out = ok(fc(h)
            .args(["exec", f, "--", "sh", "-c", "echo fork"])
            .output()
            .unwrap());
        assert_eq!(text(&out.stdout), "fork\n");
        let rec = ps(h).into_iter().find(|v| v["id"] == f.as_str()).unwrap();
        assert_eq!(rec["backend"], "firecracker");
        assert_eq!(rec["snapshot"], key.as_str(), "{rec}");
        netns.push(netns_of(rec["vmm"]["pid"].as_i64().unwrap()));
    }
    netns.sort();
    netns.dedup();
    assert_eq!(netns.len(), 3, "one netns each: {netns:?}");
    // The parent runs on.
    let out = ok(fc(h)
        .args(["exec", &parent, "--", "echo", "after"])
        .output()
        .unwrap());
    assert_eq!(text(&out.stdout), "after\n");
    ok(fc(h).args(["down", "--all"]).output().unwrap());
    assert!(vm_dirs(h).is_empty());
    assert!(netns_left(h).is_empty(), "{:?}", netns_left(h));
}
