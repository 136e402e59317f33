//! VM tier: snapshots of live clones and forks (`dough snapshot`, `dough
//! fork`, `dough up --from`, `dough snapshots`).

mod common;

use std::path::Path;

use common::*;

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn ok(home: &Path, args: &[&str]) -> String {
    let out = run(home, args);
    assert!(
        out.status.success(),
        "dough {args:?}: {}",
        text(&out.stderr)
    );
    text(&out.stdout)
}

fn sh(home: &Path, id: &str, cmd: &str) -> String {
    ok(home, &["exec", id, "--", "sh", "-c", cmd])
}

/// A process whose command line names `tag`, found through /proc.
const FIND: &str = "for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline 2>/dev/null; echo; done | grep -c '[f]ork-marker'";

/// A file written and a process started in a clone are in every fork of
/// it; the forks then diverge (ids, hostnames, machine-ids, entropy) and
/// write without seeing each other; the parent runs on.
#[test]
fn vm_forks_carry_files_and_processes_and_then_diverge() {
    // A snapshot store of its own: this test writes and prunes snapshots.
    let home = private_home_own_snapshots();
    let h = home.path();
    let parent = ok(h, &["up", "--net", "none"]).trim().to_string();
    sh(
        h,
        &parent,
        "echo before-fork > /root/state; nohup sh -c 'while :; do sleep 1; done # fork-marker' >/dev/null 2>&1 & echo ok",
    );
    let out = run(h, &["fork", &parent, "2", "--net", "none"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!("saved {parent} as snapshot")),
        "{err}"
    );
    let forks: Vec<String> = text(&out.stdout).lines().map(String::from).collect();
    assert_eq!(forks.len(), 2, "{err}");

    let mut seen = Vec::new();
    for f in &forks {
        assert_eq!(sh(h, f, "cat /root/state"), "before-fork\n");
        assert_eq!(sh(h, f, FIND).trim(), "1", "the process lives on in {f}");
        let before = now();
        let ident = sh(
            h,
            f,
            "hostname; cat /etc/machine-id; head -c16 /dev/urandom | od -An -tx1; date +%s",
        );
        let after = now();
        assert!(ident.starts_with(&format!("{f}\n")), "{ident}");
        // The host's clock, not the parent's frozen one.
        let t: i64 = ident.lines().last().unwrap().parse().unwrap();
        assert!(
            t >= before - 2 && t <= after + 2,
            "fork clock {t} vs host {before}..{after}"
        );
        seen.push(ident.lines().take(3).collect::<Vec<_>>().join("\n"));
        sh(h, f, &format!("echo {f} > /root/mine"));
    }
    assert_ne!(seen[0], seen[1], "forks share an identity or entropy");
    for f in &forks {
        assert_eq!(sh(h, f, "cat /root/mine"), format!("{f}\n"));
    }
    // The parent runs on, with its own state, and none of the forks'.
    assert_eq!(
        sh(
            h,
            &parent,
            "cat /root/state; ls /root/mine 2>&1 | grep -c 'No such'"
        ),
        "before-fork\n1\n"
    );

    // The snapshot is listed with what it came from and its users.
    let list: serde_json::Value = serde_json::from_str(&ok(h, &["snapshots", "--json"])).unwrap();
    let live: Vec<&serde_json::Value> = list
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| !s["parent"].is_null())
        .collect();
    assert_eq!(live.len(), 1, "{list}");
    assert_eq!(live[0]["parent"]["vm"], parent.as_str());
    assert_eq!(live[0]["clones"], 2);
    let key = live[0]["key"].as_str().unwrap().to_string();

    // Saved with --pause, the clone stays paused; a clone restored from the
    // saved snapshot later (a new dough process: nothing is held in
    // memory) has what it had.
    sh(h, &parent, "echo second > /root/state");
    let key2 = ok(h, &["snapshot", &parent, "--pause"]).trim().to_string();
    assert_ne!(key2, key, "different content, different key");
    assert_eq!(
        records(h)
            .iter()
            .find(|r| r["id"] == parent.as_str())
            .unwrap()["state"],
        "paused"
    );
    ok(h, &["down", "--all"]);
    let again = ok(h, &["up", "--from", &key2[..10], "--net", "none"])
        .trim()
        .to_string();
    assert_eq!(sh(h, &again, "cat /root/state"), "second\n");
    assert_eq!(sh(h, &again, FIND).trim(), "1");
    ok(h, &["down", "--all"]);

    // Pruning removes live snapshots no clone uses.
    let out = run(h, &["bake", "--prune", "--net", "none"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let list: serde_json::Value = serde_json::from_str(&ok(h, &["snapshots", "--json"])).unwrap();
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .all(|s| s["parent"].is_null()),
        "{list}"
    );
}

/// A clone that was given what may be a secret is never snapshotted: not
/// by `snapshot`, not by `fork`; nothing is written.
#[test]
fn vm_a_clone_given_secrets_is_never_snapshotted() {
    let home = private_home();
    let h = home.path();
    let id = ok(h, &["up", "--net", "none"]).trim().to_string();
    // A literal on the command line is no secret (anyone can see it).
    sh(h, &id, "true");
    let out = run(h, &["exec", &id, "-e", "PLAIN=visible", "--", "true"]);
    assert!(out.status.success());
    // A value from dough's own environment may be one.
    let out = dough(h)
        .env("MY_TOKEN", "s3cr3t")
        .args([
            "exec",
            &id,
            "-e",
            "MY_TOKEN",
            "--",
            "sh",
            "-c",
            "test -n \"$MY_TOKEN\"",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    for args in [
        vec!["snapshot", id.as_str()],
        vec!["fork", id.as_str(), "1"],
    ] {
        let out = run(h, &args);
        assert_eq!(out.status.code(), Some(125), "{args:?}");
        let err = text(&out.stderr);
        assert!(
            err.contains("may be secrets ($MY_TOKEN from dough's environment)"),
            "{err}"
        );
    }
    let list: serde_json::Value = serde_json::from_str(&ok(h, &["snapshots", "--json"])).unwrap();
    assert!(list
        .as_array()
        .unwrap()
        .iter()
        .all(|s| s["parent"].is_null()));
    assert_eq!(records(h).len(), 1, "no fork was made");
    ok(h, &["down", "--all"]);
}

/// A clone without a scratch disk (its writable layer is tmpfs, in its
/// RAM) is forked with what it wrote there: the save writes far more than
/// its VMM's file cap (8 MiB, the console's), which is lifted for the save
/// and put back after.
#[test]
fn vm_a_clone_without_a_scratch_disk_is_forked_with_its_ram() {
    let home = private_home_own_snapshots();
    let h = home.path();
    let parent = ok(h, &["up", "--net", "none", "--scratch", "none"])
        .trim()
        .to_string();
    let limits = || {
        let pid = common::ps(h)
            .into_iter()
            .find(|v| v["id"] == parent.as_str())
            .unwrap()["vmm"]["pid"]
            .as_i64()
            .unwrap();
        std::fs::read_to_string(format!("/proc/{pid}/limits"))
            .unwrap()
            .lines()
            .find(|l| l.starts_with("Max file size"))
            .unwrap()
            .split_whitespace()
            .nth(3)
            .unwrap()
            .to_string()
    };
    let capped = limits();
    assert_eq!(capped, (8u64 << 20).to_string(), "the console's cap");
    // 32 MiB of incompressible data in RAM.
    sh(
        h,
        &parent,
        "head -c 33554432 /dev/urandom > /tmp/big && sha256sum /tmp/big > /tmp/big.sum && echo ok",
    );
    let out = run(h, &["fork", &parent, "1", "--net", "none"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let fork = text(&out.stdout).trim().to_string();
    assert_eq!(sh(h, &fork, "sha256sum -c /tmp/big.sum"), "/tmp/big: OK\n");
    assert_eq!(limits(), capped, "the cap is back on the parent");
    assert_eq!(sh(h, &parent, "echo still"), "still\n");
}
