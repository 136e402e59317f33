//! VM tier: warm snapshots and clones — `bake`, `up`, `ps`, `exec`,
//! `logs`, `down`, per-clone identity, exact teardown and crash GC.

mod common;

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;

fn up(home: &Path, n: u32, extra: &[&str]) -> Vec<String> {
    let mut args = vec!["up".to_string(), n.to_string()];
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let out = run(home, &args);
    assert!(out.status.success(), "up: {}", text(&out.stderr));
    let ids: Vec<String> = text(&out.stdout).lines().map(String::from).collect();
    assert_eq!(ids.len(), n as usize, "{}", text(&out.stderr));
    ids
}

fn exec(home: &Path, id: &str, cmd: &str) -> (String, String, Option<i32>) {
    let out = run(home, &["exec", id, "--", "sh", "-c", cmd]);
    (text(&out.stdout), text(&out.stderr), out.status.code())
}

fn down_all(home: &Path) {
    let out = run(home, &["down", "--all"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(vm_dirs(home).is_empty(), "{:?}", vm_dirs(home));
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[test]
fn vm_clones_have_their_own_entropy_clock_and_id() {
    let home = private_home();
    let ids = up(home.path(), 8, &[]);
    let mut randoms = std::collections::HashSet::new();
    for id in &ids {
        let before = now();
        let (out, err, code) = exec(
            home.path(),
            id,
            "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; date +%s; echo $DOUGH_VM_ID",
        );
        let after = now();
        assert_eq!(code, Some(0), "{err}");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3, "{out}");
        assert_eq!(lines[0].len(), 64, "32 random bytes in hex: {out}");
        randoms.insert(lines[0].to_string());
        let t: i64 = lines[1].parse().unwrap();
        assert!(
            t >= before - 2 && t <= after + 2,
            "clone clock {t} vs host {before}..{after}"
        );
        assert_eq!(lines[2], id, "the clone knows its own id");
    }
    assert_eq!(randoms.len(), 8, "8 clones, 8 distinct random values");
    let listed: Vec<String> = ps(home.path())
        .iter()
        .map(|v| v["id"].as_str().unwrap().to_string())
        .collect();
    let mut sorted = ids.clone();
    sorted.sort();
    let mut listed_sorted = listed.clone();
    listed_sorted.sort();
    assert_eq!(listed_sorted, sorted);
    // Serial console: the bake's boot log, with the ready line.
    let out = run(home.path(), &["logs", &ids[0]]);
    assert!(text(&out.stdout).contains("worker ready; polling for tasks"));
    down_all(home.path());
}

/// A guest's console log is private (0600), bounded (its VMM cannot write
/// past CONSOLE_LOG_MAX) and printed without the escape sequences the
/// guest put in it (an OSC 52 clipboard write, colours).
#[test]
fn vm_console_log_is_private_bounded_and_printable() {
    let home = private_home();
    let h = home.path();
    // Without a scratch disk, so that the cap is the console's own (with
    // one it is the disk's size: vm_scratch).
    let ids = up(h, 1, &["--scratch", "none"]);
    let id = &ids[0];
    let (_, err, code) = exec(
        h,
        id,
        "printf '\\033]52;c;cHduZWQ=\\007\\033[31mhello-console\\033[0m\\n' > /dev/ttyS0",
    );
    assert_eq!(code, Some(0), "{err}");
    let serial = h.join("vms").join(id).join("serial.log");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&serial).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let raw = std::fs::read(&serial).unwrap();
    assert!(raw.contains(&0x1b), "the guest did write escapes");
    let out = run(h, &["logs", id]);
    let shown = text(&out.stdout);
    assert!(shown.contains("hello-console"), "{shown}");
    assert!(
        !shown.contains('\u{1b}') && !shown.contains('\u{7}'),
        "{shown:?}"
    );
    // The VMM runs with its files capped at the console log's bound.
    let pid = ps(h)[0]["vmm"]["pid"].as_i64().unwrap();
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max file size"))
        .unwrap();
    assert!(line.contains(&(8u64 << 20).to_string()), "{line}");
    down_all(h);
}

#[test]
fn vm_concurrent_execs_get_their_own_output() {
    let home = private_home();
    let ids = up(home.path(), 8, &[]);
    let h = home.path();
    std::thread::scope(|s| {
        for (i, id) in ids.iter().enumerate() {
            s.spawn(move || {
                for round in 0..4 {
                    let tag = format!("{id}-{i}-{round}");
                    let cmd = format!(
                        "for k in 1 2 3; do echo {tag}-$k; echo err-{tag}-$k >&2; done; exit {}",
                        (i + round) % 5
                    );
                    let (out, err, code) = exec(h, id, &cmd);
                    assert_eq!(out, format!("{tag}-1\n{tag}-2\n{tag}-3\n"), "{err}");
                    for k in 1..=3 {
                        assert!(err.contains(&format!("err-{tag}-{k}")), "{err}");
                    }
                    assert_eq!(code, Some(((i + round) % 5) as i32));
                }
            });
        }
        // Two commands at once on the same clone: serialised, both correct.
        let id = &ids[0];
        let a = s.spawn(move || exec(h, id, "sleep 1; echo first"));
        let b = s.spawn(move || exec(h, id, "echo second"));
        assert_eq!(a.join().unwrap().0, "first\n");
        assert_eq!(b.join().unwrap().0, "second\n");
    });
    down_all(home.path());
}

#[test]
fn vm_changed_inputs_rebake() {
    let home = private_home_own_snapshots();
    let h = home.path();
    let out = run(h, &["bake"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("no snapshot yet"),
        "{}",
        text(&out.stderr)
    );
    let first = text(&out.stdout);
    let out = run(h, &["bake"]);
    assert!(
        text(&out.stderr).contains("up to date"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(text(&out.stdout), first);

    // A different memory size: the next `up` bakes again and says why.
    let out = run(h, &["up", "1", "--mem", "288"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains("inputs changed since the last bake: memory MiB \"256\" → \"288\""),
        "{err}"
    );
    let id = text(&out.stdout).trim().to_string();
    let (mem, _, _) = exec(h, &id, "grep MemTotal /proc/meminfo");
    assert!(mem.contains("MemTotal"), "{mem}");
    // Same inputs again: no bake.
    let out = run(h, &["up", "1", "--mem", "288"]);
    assert!(out.status.success());
    assert!(
        !text(&out.stderr).contains("baking"),
        "{}",
        text(&out.stderr)
    );
    // --force bakes regardless.
    let out = run(h, &["bake", "--force"]);
    assert!(
        text(&out.stderr).contains("(--force)"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(text(&out.stdout), first);
    let snapshots = || {
        std::fs::read_dir(h.join("snapshots"))
            .unwrap()
            .flatten()
            .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
            .count()
    };
    assert_eq!(snapshots(), 2);
    // Pruning keeps the current snapshot and those of listed clones...
    let out = run(h, &["bake", "--prune"]);
    let err = text(&out.stderr);
    assert!(err.contains("pruned 0 snapshot(s)"), "{err}");
    down_all(h);
    // ...and removes the rest once nothing refers to them.
    let out = run(h, &["bake", "--prune"]);
    let err = text(&out.stderr);
    assert!(err.contains("pruned 1 snapshot(s)"), "{err}");
    assert_eq!(snapshots(), 1);
}

#[test]
fn vm_dead_clone_is_marked_and_down_all_leaves_nothing() {
    let home = private_home();
    let h = home.path();
    let ids = up(h, 2, &[]);
    let victims: Vec<(String, i64)> = ps(h)
        .iter()
        .map(|v| {
            (
                v["id"].as_str().unwrap().to_string(),
                v["vmm"]["pid"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(victims.len(), 2);
    let (dead_id, dead_pid) = &victims[0];
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(*dead_pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !process_gone(*dead_pid) {
        assert!(std::time::Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = run(h, &["ps"]);
    let table = text(&out.stdout);
    let row = table
        .lines()
        .find(|l| l.starts_with(dead_id.as_str()))
        .unwrap();
    assert!(row.contains("dead"), "{table}");
    assert!(
        text(&out.stderr).contains("is dead"),
        "{}",
        text(&out.stderr)
    );
    let other = ids.iter().find(|i| *i != dead_id).unwrap();
    assert!(table
        .lines()
        .any(|l| l.starts_with(other.as_str()) && l.contains("ready")));
    // A command on the dead clone fails clearly.
    let (_, err, code) = exec(h, dead_id, "true");
    assert_eq!(code, Some(125));
    assert!(err.contains("is dead"), "{err}");
    // The dead one is kept (not silently removed) until `down`.
    assert_eq!(ps(h).len(), 2);

    let out = run(h, &["down", "--all"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    for (_, pid) in &victims {
        let gone = (0..200).any(|_| {
            let g = process_gone(*pid);
            if !g {
                std::thread::sleep(Duration::from_millis(20));
            }
            g
        });
        assert!(gone, "VMM {pid} still running");
    }
    assert!(
        vm_dirs(h).is_empty(),
        "no sockets or directories left: {:?}",
        vm_dirs(h)
    );
}

#[test]
#[cfg_attr(
    not(feature = "test-hooks"),
    ignore = "stops dough with a test hook: needs --features dough/test-hooks (scripts/test has it)"
)]
fn vm_sigkill_of_dough_during_up_is_reclaimed_by_the_next_command() {
    let home = private_home();
    let h = home.path();
    let (mut child, seen) = spawn_until(
        h,
        &["up", "4"],
        ("DOUGH_TEST_HOLD_BEFORE_HANDOVER", "1"),
        "holding the clones before handover",
    );
    assert!(
        seen.contains("holding"),
        "up never reached the hook: {seen}"
    );
    let pids: Vec<i64> = records(h)
        .iter()
        .filter_map(|r| r["vmm"]["pid"].as_i64())
        .collect();
    assert_eq!(pids.len(), 4, "{seen}");
    kill_dough_and_its_watchdog(&mut child);
    assert!(
        pids.iter().all(|p| !process_gone(*p)),
        "QEMUs outlive dough"
    );

    let out = run(h, &["ps"]);
    let err = text(&out.stderr);
    assert_eq!(err.matches("reclaimed orphaned VM").count(), 4, "{err}");
    for p in &pids {
        assert!(err.contains(&format!("pid {p}")), "{err}");
        let gone = (0..200).any(|_| {
            let g = process_gone(*p);
            if !g {
                std::thread::sleep(Duration::from_millis(20));
            }
            g
        });
        assert!(gone, "VMM {p} reclaimed");
    }
    assert!(vm_dirs(h).is_empty(), "{:?}", vm_dirs(h));
    assert_eq!(text(&out.stdout).lines().count(), 1, "only the header");
}

/// Backpressure never corrupts the stream: a reader that stops for longer
/// than the agent used to wait (10 s) still gets every byte, in order,
/// and the exit status.
#[test]
fn vm_a_slow_reader_loses_nothing() {
    use std::io::Read;
    let home = private_home();
    let h = home.path();
    let ids = up(h, 1, &[]);
    let mut child = dough(h)
        .args(["exec", &ids[0], "--", "sh", "-c"])
        .arg("seq 1 3000000; exit 7")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut first = vec![0u8; 1 << 16];
    out.read_exact(&mut first).unwrap();
    // Stall well past the old 10 s write limit while the guest keeps
    // writing into a full channel.
    std::thread::sleep(Duration::from_secs(13));
    let mut rest = Vec::new();
    out.read_to_end(&mut rest).unwrap();
    let status = child.wait().unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(status.code(), Some(7), "{err}");
    first.extend(rest);
    let text = String::from_utf8(first).unwrap();
    let mut n = 0u64;
    for line in text.lines() {
        n += 1;
        assert_eq!(line, n.to_string(), "line {n} out of order or cut");
    }
    assert_eq!(n, 3_000_000);
    down_all(h);
}

/// Every clone is itself from its first command on: its hostname is its
/// id and its /etc/machine-id its own (stable across commands); only the
/// kernel's boot_id is the bake's, shared by all of them.
#[test]
fn vm_clones_get_their_own_hostname_and_machine_id() {
    let home = private_home();
    let h = home.path();
    let out = run(h, &["up", "2", "--net", "none"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let ids: Vec<String> = text(&out.stdout).lines().map(String::from).collect();
    let ask = |id: &str| {
        let out = run(
            h,
            &[
                "exec",
                id,
                "--",
                "sh",
                "-c",
                "hostname; cat /etc/hostname /etc/machine-id /proc/sys/kernel/random/boot_id",
            ],
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout)
            .lines()
            .map(String::from)
            .collect::<Vec<_>>()
    };
    let (a, b) = (ask(&ids[0]), ask(&ids[1]));
    for (id, got) in [(&ids[0], &a), (&ids[1], &b)] {
        assert_eq!(&got[0], id);
        assert_eq!(&got[1], id);
        assert_eq!(got[2].len(), 32, "{got:?}");
        assert!(got[2].bytes().all(|c| c.is_ascii_hexdigit()));
    }
    assert_ne!(a[2], b[2], "two clones share a machine-id");
    assert_eq!(
        a[3], b[3],
        "boot_id is the bake's (the kernel fixes it at boot)"
    );
    assert_eq!(
        ask(&ids[0])[2],
        a[2],
        "the machine-id changed between commands"
    );
    // Both live in RAM (bound over /etc's): taking an identity writes
    // nothing to the clone's disk, and the bake left nothing to write back.
    let out = run(
        h,
        &[
            "exec",
            &ids[0],
            "--",
            "sh",
            "-c",
            "grep -E ' /etc/(hostname|machine-id) ' /proc/mounts",
        ],
    );
    let mounts = text(&out.stdout);
    for f in ["/etc/hostname", "/etc/machine-id"] {
        assert!(
            mounts
                .lines()
                .any(|l| l.starts_with(&format!("tmpfs {f} tmpfs"))),
            "{f} is not in RAM: {mounts}"
        );
    }
    let out = run(h, &["down", "--all"]);
    assert!(out.status.success());
}

/// CPU time (utime + stime, in clock ticks) process `pid` used so far.
fn cpu_ticks(pid: i64) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = stat.rsplit_once(')').unwrap().1;
    let f: Vec<&str> = after.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// One handed-over clone without a network in `h`: its id.
fn up_one(h: &Path) -> String {
    let out = run(h, &["up", "1", "--net", "none"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout).trim().to_string()
}

/// `dough exec ID -- argv` in `h`, which must succeed: its stdout.
fn exec_ok(h: &Path, id: &str, argv: &[&str]) -> String {
    let args: Vec<&str> = ["exec", id, "--"]
        .into_iter()
        .chain(argv.iter().copied())
        .collect();
    let out = run(h, &args);
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout)
}

/// The bake runs a shell and a program in its guest before freezing it,
/// and what gobrr runs in every clone (tar, git), so every clone starts
/// with their files in its page cache and its first commands read nothing
/// from disk; a program nothing ran is not cached.
#[test]
fn vm_clones_start_with_the_shell_and_a_program_cached() {
    let home = private_home();
    let h = home.path();
    let id = up_one(h);
    // fincore (util-linux) runs first: what it loads is cached by then;
    // the files it asks about are the point.
    let listed = exec_ok(
        h,
        &id,
        &[
            "fincore",
            "--noheadings",
            "--bytes",
            "--output",
            "RES,FILE",
            "/bin/dash",
            "/usr/bin/true",
            "/usr/bin/tar",
            "/usr/bin/git",
            "/usr/bin/cat",
        ],
    );
    let resident: std::collections::HashMap<String, u64> = listed
        .lines()
        .filter_map(|l| {
            let (res, file) = l.trim().split_once(char::is_whitespace)?;
            Some((file.trim().to_string(), res.parse().ok()?))
        })
        .collect();
    assert!(resident["/bin/dash"] > 0, "{resident:?}");
    for f in ["/usr/bin/true", "/usr/bin/tar", "/usr/bin/git"] {
        assert!(resident[f] > 0, "{f}: {resident:?}");
    }
    assert_eq!(resident["/usr/bin/cat"], 0, "{resident:?}");
    let out = run(h, &["down", &id]);
    assert!(out.status.success());
}

/// A paused clone uses no CPU, refuses commands until it is resumed, and
/// then carries on where it was (its processes included).
#[test]
fn vm_pause_stops_a_busy_clone_and_resume_carries_on() {
    let home = private_home();
    let h = home.path();
    let id = up_one(h);
    // A guest process that spins, and a counter it leaves behind.
    exec_ok(
        h,
        &id,
        &[
            "sh",
            "-c",
            // Each count replaces the file whole: a reader never sees it half-written.
            "nohup sh -c 'i=0; while :; do i=$((i+1)); echo $i > /tmp/spin.new; mv /tmp/spin.new /tmp/spin; done' >/dev/null 2>&1 &",
        ],
    );
    let vmm = records(h)[0]["vmm"]["pid"].as_i64().unwrap();
    let over = |secs: u64| {
        let t0 = cpu_ticks(vmm);
        std::thread::sleep(std::time::Duration::from_secs(secs));
        cpu_ticks(vmm) - t0
    };
    let busy = over(3);
    let out = run(h, &["pause", &id]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(records(h)[0]["state"], "paused");
    let paused = over(3);
    assert!(
        paused * 10 < busy,
        "paused: {paused} ticks in 3 s, running: {busy}"
    );
    let out = run(h, &["exec", &id, "--", "true"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(
        text(&out.stderr).contains("is paused, not ready (`dough resume` it first)"),
        "{}",
        text(&out.stderr)
    );
    let out = run(h, &["resume", &id]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let count = |h: &Path| {
        let out = run(h, &["exec", &id, "--", "cat", "/tmp/spin"]);
        text(&out.stdout).trim().parse::<u64>().unwrap()
    };
    // It counts on: a later read sees a larger count. Under load (two cores,
    // other guests) the spinner may get no guest time between two quick
    // reads, so the later read is retried until an absolute deadline.
    let a = count(h);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let b = loop {
        let b = count(h);
        if b > a || std::time::Instant::now() > deadline {
            break b;
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    };
    assert!(
        b > a,
        "the guest's process did not carry on: {a} then {b} a minute later"
    );
    let out = run(h, &["down", &id]);
    assert!(out.status.success());
}

/// The recorded cgroup directories of every VM in `home`.
fn cgroup_dirs(home: &Path) -> Vec<std::path::PathBuf> {
    records(home)
        .iter()
        .flat_map(|r| {
            r["cgroup"]["dirs"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(|d| std::path::PathBuf::from(d.as_str().unwrap()))
        })
        .collect()
}

/// Each clone's VMM runs in a cgroup of its own from its start (every
/// hierarchy the host has for cpu, memory and pids), capped at its vCPUs,
/// its memory plus the VMM's, and a task count; `ps` shows it; it goes
/// with the clone, and the sweep takes what a killed dough left.
#[test]
fn vm_each_vmm_runs_capped_in_a_cgroup_of_its_own() {
    use dough_fabric::cgroup::{self, Limits, Version};
    let home = private_home();
    let h = home.path();
    let ids = up(h, 2, &["--net", "none"]);
    let Some(layout) = cgroup::layout() else {
        // A host without cpu/memory/pids cgroups: none is recorded.
        assert!(cgroup_dirs(h).is_empty());
        down_all(h);
        return;
    };
    let want = Limits::for_vm(1, 256, records(h)[0]["accel"] == "Tcg");
    let mut all_dirs = Vec::new();
    for r in records(h) {
        let cg: cgroup::Cgroup = serde_json::from_value(r["cgroup"].clone()).unwrap();
        assert_eq!(cg.limits, want);
        assert_eq!(cg.dirs.len(), layout.bases.len());
        let pid = r["vmm"]["pid"].as_i64().unwrap();
        let member_of = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
        for d in &cg.dirs {
            // The VMM is in it (its own path in that hierarchy ends so)...
            let id = r["id"].as_str().unwrap();
            assert!(d.ends_with(id), "{d:?}");
            let procs = std::fs::read_to_string(d.join("cgroup.procs")).unwrap();
            assert!(
                procs.lines().any(|l| l == pid.to_string()),
                "{d:?}: {procs}"
            );
            // ...and only it (the gateway or dough are not).
            assert_eq!(procs.lines().count(), 1, "{d:?}: {procs}");
            let rel = d.to_string_lossy().into_owned();
            let tail = rel.split("/dough/").nth(1).unwrap();
            assert!(member_of.contains(tail), "{member_of}");
        }
        let read = |d: &std::path::PathBuf, f: &str| {
            std::fs::read_to_string(d.join(f)).map(|s| s.trim().to_string())
        };
        match cg.version {
            Version::V2 => {
                let d = &cg.dirs[0];
                assert_eq!(
                    read(d, "cpu.max").unwrap(),
                    format!("{} 100000", want.cpu_quota_us)
                );
                assert_eq!(
                    read(d, "memory.max").unwrap(),
                    want.memory_bytes.to_string()
                );
                assert_eq!(read(d, "pids.max").unwrap(), want.pids.to_string());
            }
            Version::V1 => {
                for d in &cg.dirs {
                    if let Ok(q) = read(d, "cpu.cfs_quota_us") {
                        assert_eq!(q, want.cpu_quota_us.to_string());
                    }
                    if let Ok(m) = read(d, "memory.limit_in_bytes") {
                        assert_eq!(m, want.memory_bytes.to_string());
                    }
                    if let Ok(p) = read(d, "pids.max") {
                        assert_eq!(p, want.pids.to_string());
                    }
                }
            }
        }
        all_dirs.extend(cg.dirs);
    }
    let out = run(h, &["ps"]);
    let table = text(&out.stdout);
    assert!(table.lines().next().unwrap().contains("CGROUP"), "{table}");
    assert_eq!(table.matches("/1536M 1c").count(), 2, "{table}");

    // Down: the cgroups go with their clones.
    let out = run(h, &["down", &ids[0]]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let left: Vec<_> = all_dirs.iter().filter(|d| d.exists()).collect();
    assert_eq!(
        left.len(),
        layout.bases.len(),
        "only the other clone's: {left:?}"
    );
    // A VM record gone without its teardown (as after a crash between the
    // two): the next command's sweep removes its cgroup.
    let vmm = records(h)[0]["vmm"]["pid"].as_i64().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(vmm as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let gone = (0..250).any(|_| {
        std::thread::sleep(Duration::from_millis(20));
        process_gone(vmm)
    });
    assert!(gone);
    std::fs::remove_dir_all(h.join("vms").join(&ids[1])).unwrap();
    let out = run(h, &["ps"]);
    assert!(out.status.success());
    assert!(
        text(&out.stderr).contains("leftover VMM cgroup"),
        "{}",
        text(&out.stderr)
    );
    let left: Vec<_> = all_dirs.iter().filter(|d| d.exists()).collect();
    assert!(left.is_empty(), "{left:?}");
}
