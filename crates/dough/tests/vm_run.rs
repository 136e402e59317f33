//! VM tier: `dough run` against real guests under TCG.

mod common;

use std::time::{Duration, Instant};

use common::*;

#[test]
fn vm_run_prints_the_agent_name_as_pid_1() {
    let home = shared_home();
    // Both paths: a clone of the baked snapshot, and a cold boot.
    let out = run(&home, &["run", "--cold", "--", "cat", "/proc/1/comm"]);
    assert_eq!(text(&out.stdout), "dough-agent\n", "{}", text(&out.stderr));
    let out = run(&home, &["run", "--", "cat", "/proc/1/comm"]);
    assert_eq!(
        text(&out.stdout),
        "dough-agent\n",
        "stderr: {}",
        text(&out.stderr)
    );
    assert!(out.status.success());
    assert!(
        text(&out.stderr)
            .to_lowercase()
            .contains("not a security boundary"),
        "TCG warning: {}",
        text(&out.stderr)
    );
}

#[test]
fn vm_run_propagates_exit_codes_and_signals() {
    let home = shared_home();
    let out = run(&home, &["run", "--", "sh", "-c", "exit 7"]);
    assert_eq!(out.status.code(), Some(7), "stderr: {}", text(&out.stderr));
    let out = run(&home, &["run", "--", "sh", "-c", "kill -TERM $$"]);
    assert_eq!(
        out.status.code(),
        Some(128 + 15),
        "stderr: {}",
        text(&out.stderr)
    );
    assert!(text(&out.stderr).contains("killed by signal 15"));
}

#[test]
fn vm_run_keeps_stdout_and_stderr_apart_and_passes_stdin_env_cwd() {
    let home = shared_home();
    let mut c = dough(&home);
    c.args([
        "run",
        "-i",
        "-e",
        "GREETING=hej",
        "-w",
        "/tmp",
        "--",
        "sh",
        "-c",
    ]);
    c.arg("echo out:$GREETING:$IS_SANDBOX:$(pwd); echo err >&2; tr a-z A-Z");
    c.stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = c.spawn().unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"from stdin\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "out:hej:1:/tmp\nFROM STDIN\n");
    let err = text(&out.stderr);
    assert!(err.lines().any(|l| l == "err"), "{err}");
    assert!(!err.contains("out:"), "{err}");
}

#[test]
fn vm_run_timeout_kills_the_command_and_says_so() {
    let home = shared_home();
    let out = run(
        &home,
        &[
            "run",
            "--timeout",
            "2",
            "--",
            "sh",
            "-c",
            "echo started; sleep 120; echo never",
        ],
    );
    assert_eq!(
        out.status.code(),
        Some(124),
        "stderr: {}",
        text(&out.stderr)
    );
    assert_eq!(text(&out.stdout), "started\n");
    assert!(
        text(&out.stderr).contains("timed out"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn vm_run_reports_a_command_that_cannot_start() {
    let home = shared_home();
    let out = run(&home, &["run", "--", "/no/such/program"]);
    assert_eq!(out.status.code(), Some(127));
    assert!(
        text(&out.stderr).contains("could not be started"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn vm_guest_filesystem_is_a_throwaway_overlay() {
    let home = shared_home();
    let out = run(
        &home,
        &[
            "run",
            "--",
            "sh",
            "-c",
            "test ! -e /root/marker && touch /root/marker && grep ' / ' /proc/mounts",
        ],
    );
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert!(
        text(&out.stdout).starts_with("overlay / overlay"),
        "{}",
        text(&out.stdout)
    );
    // A second VM starts clean again.
    let out = run(&home, &["run", "--", "test", "!", "-e", "/root/marker"]);
    assert!(out.status.success());
}

#[test]
fn vm_boot_without_ready_line_fails_with_the_serial_tail() {
    let home = private_home();
    // The agent waits 20 s for a root device that never appears; the boot
    // deadline is 4 s, so both attempts must fail with the console tail:
    // booting cold, and baking the snapshot a clone would come from.
    for cold in [true, false] {
        no_ready_line(home.path(), cold);
    }
}

fn no_ready_line(home: &std::path::Path, cold: bool) {
    let start = Instant::now();
    let out = run(
        home,
        &[
            "run",
            if cold { "--cold" } else { "--stats" },
            "--boot-timeout",
            "4",
            "--kernel-arg",
            "dough.root=/dev/nope",
            "--kernel-arg",
            "ignore_loglevel",
            "--",
            "true",
        ],
    );
    let elapsed = start.elapsed();
    assert_eq!(
        out.status.code(),
        Some(125),
        "stdout: {}",
        text(&out.stdout)
    );
    let err = text(&out.stderr);
    assert!(
        err.contains("did not print its ready line within 4s"),
        "{err}"
    );
    assert!(err.contains("retrying"), "one retry: {err}");
    if !cold {
        assert!(err.contains("baking the snapshot"), "{err}");
    }
    let tail = err.split("last serial console lines:").nth(1).unwrap_or("");
    assert!(
        tail.contains("Linux version") || tail.contains("virtio"),
        "kernel output in the tail: {err}"
    );
    assert!(
        elapsed < Duration::from_secs(60),
        "failed within the deadlines, took {elapsed:?}"
    );
    assert!(
        vm_dirs(home).is_empty(),
        "failed boots leave nothing behind"
    );
}

/// A `dough run -- sleep 600` whose VM is ready, and its VMM's pid.
fn running_dough(home: &std::path::Path) -> (std::process::Child, i64) {
    let victim = dough(home)
        .args(["run", "--", "sleep", "600"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    (victim, wait_for_ready_vm(home))
}

/// A SIGKILLed `dough run` leaves nothing running: its watchdog notices the
/// owner is gone and reclaims the VM — VMM killed by its recorded identity,
/// directory and network removed — without any other dough command.
#[test]
fn vm_orphans_of_a_killed_dough_are_reclaimed_by_its_watchdog() {
    let home = private_home();
    let (mut victim, qemu_pid) = running_dough(home.path());
    victim.kill().unwrap();
    victim.wait().unwrap();
    let reclaimed = dough_vmm::process::wait_until(Duration::from_secs(30), || {
        process_gone(qemu_pid) && vm_dirs(home.path()).is_empty()
    });
    assert!(
        reclaimed,
        "QEMU {qemu_pid} gone: {}, VM dirs left: {:?}",
        process_gone(qemu_pid),
        vm_dirs(home.path())
    );
}

/// Where the watchdog could not help (it was killed too), the next dough
/// command reclaims the orphan and says so.
#[test]
fn vm_orphans_whose_watchdog_died_too_are_reclaimed_by_the_next_command() {
    let home = private_home();
    let (mut victim, qemu_pid) = running_dough(home.path());
    kill_dough_and_its_watchdog(&mut victim);
    assert!(
        std::path::Path::new(&format!("/proc/{qemu_pid}")).exists(),
        "with no watchdog, QEMU outlives a SIGKILLed dough"
    );

    let out = run(home.path(), &["run", "--", "true"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("reclaimed orphaned VM"),
        "{}",
        text(&out.stderr)
    );
    assert!(
        text(&out.stderr).contains(&format!("pid {qemu_pid}")),
        "{}",
        text(&out.stderr)
    );
    assert!(
        dough_vmm::process::wait_until(Duration::from_secs(5), || process_gone(qemu_pid)),
        "orphaned QEMU {qemu_pid} was killed"
    );
    assert!(
        vm_dirs(home.path()).is_empty(),
        "{:?}",
        vm_dirs(home.path())
    );
}

#[test]
fn vm_sigint_tears_the_vm_down() {
    let home = private_home();
    let child = dough(home.path())
        .args(["run", "--", "sleep", "600"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_ready_vm(home.path());
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", text(&out.stderr));
    assert!(
        vm_dirs(home.path()).is_empty(),
        "{:?}",
        vm_dirs(home.path())
    );
}

#[test]
fn vm_run_streams_stdin_larger_than_a_frame() {
    let home = shared_home();
    // 3 MiB of non-repeating bytes: more than one frame, several chunks.
    let mut data = Vec::with_capacity(3 << 20);
    let mut x: u32 = 12345;
    while data.len() < 3 << 20 {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        data.push((x >> 16) as u8);
    }
    let mut c = dough(&home);
    c.args([
        "run",
        "-i",
        "--",
        "sh",
        "-c",
        "tee /tmp/in | md5sum; wc -c < /tmp/in",
    ]);
    c.stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = c.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let feed = data.clone();
    let writer = std::thread::spawn(move || {
        use std::io::Write;
        stdin.write_all(&feed).unwrap();
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let host_md5 = std::process::Command::new("md5sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut p| {
            use std::io::Write;
            p.stdin.take().unwrap().write_all(&data)?;
            p.wait_with_output()
        })
        .unwrap();
    let want = text(&host_md5.stdout);
    let got = text(&out.stdout);
    assert_eq!(
        got.lines().next().unwrap().split_whitespace().next(),
        want.split_whitespace().next()
    );
    assert_eq!(got.lines().nth(1), Some("3145728"));
}

/// Secrets need not be on dough's command line (where `ps` shows them):
/// `-e KEY` takes the value from dough's environment, `--env-file` from a
/// file; `-e` wins over a file; a missing variable is an error naming it.
#[test]
fn vm_run_takes_variables_from_its_environment_and_files() {
    let home = shared_home();
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("vars");
    std::fs::write(&f, "# comment\n\nFROM_FILE=file value\nBOTH=from-file\n").unwrap();
    let out = dough(&home)
        .args(["run", "-e", "DOUGH_TEST_TOKEN", "--env-file"])
        .arg(&f)
        .args(["-e", "BOTH=from-flag", "--", "sh", "-c"])
        .arg("echo \"$DOUGH_TEST_TOKEN|$FROM_FILE|$BOTH\"")
        .env("DOUGH_TEST_TOKEN", "tok-123")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "tok-123|file value|from-flag\n");
    let out = dough(&home)
        .args(["run", "-e", "DOUGH_TEST_UNSET_VAR", "--", "true"])
        .env_remove("DOUGH_TEST_UNSET_VAR")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("DOUGH_TEST_UNSET_VAR is not set in dough's environment"),
        "{}",
        text(&out.stderr)
    );
}
