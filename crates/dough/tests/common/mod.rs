//! Shared set-up for the VM-tier tests: they boot real guests from the image
//! that `scripts/test` builds once into `$DOUGH_HOME`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The dough home holding the built image. Missing is a failure, not a skip:
/// these tests are the point of the suite.
pub fn shared_home() -> PathBuf {
    let home = std::env::var_os("DOUGH_HOME")
        .map(PathBuf::from)
        .expect("DOUGH_HOME is not set: run the suite with scripts/test, which builds the guest image first");
    assert!(
        home.join("images/current").exists(),
        "no guest image in {}: run scripts/test (or `dough image build`) first",
        home.display()
    );
    home
}

/// A private dough home that shares the built image's artifacts (manifests
/// point at absolute paths in the shared cache) and the baked snapshots,
/// but has its own VM state.
pub fn private_home() -> Home {
    let d = private_home_own_snapshots();
    std::os::unix::fs::symlink(shared_home().join("snapshots"), d.path().join("snapshots"))
        .unwrap();
    d
}

/// A test's private dough home. Dropped — also when the test failed half
/// way — it first stops every VM still recorded there (`dough down
/// --all`), so a failing test leaves no clone running.
#[derive(Debug)]
pub struct Home(tempfile::TempDir);

impl Home {
    pub fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Drop for Home {
    fn drop(&mut self) {
        let vms = self.path().join("vms");
        let any = std::fs::read_dir(&vms).is_ok_and(|mut d| d.next().is_some());
        if any {
            let _ = run(self.path(), &["down", "--all"]);
        }
    }
}

/// Like [`private_home`], with an empty snapshot store of its own.
pub fn private_home_own_snapshots() -> Home {
    let shared = shared_home();
    let d = Home(tempfile::tempdir().unwrap());
    let images = d.path().join("images");
    std::fs::create_dir_all(&images).unwrap();
    for e in std::fs::read_dir(shared.join("images")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), images.join(e.file_name())).unwrap();
    }
    // The KVM probe's answer for this host boot, so `auto` does not probe again.
    let _ = std::fs::copy(
        shared.join("kvm-probe.json"),
        d.path().join("kvm-probe.json"),
    );
    d
}

/// A VM record (`state.json`) as JSON.
pub fn records(home: &Path) -> Vec<serde_json::Value> {
    vm_dirs(home)
        .iter()
        .filter_map(|d| std::fs::read(d.join("state.json")).ok())
        .filter_map(|b| serde_json::from_slice(&b).ok())
        .collect()
}

/// `dough ps --json`.
pub fn ps(home: &Path) -> Vec<serde_json::Value> {
    let out = run(home, &["ps", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Wait (with a deadline) until some VM under `home` is ready; its VMM pid.
pub fn wait_for_ready_vm(home: &Path) -> i64 {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        if let Some(pid) = records(home)
            .iter()
            .find(|r| r["state"] == "ready")
            .and_then(|r| r["vmm"]["pid"].as_i64())
        {
            return pid;
        }
        assert!(std::time::Instant::now() < deadline, "no VM became ready");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Whether process `pid` is gone (or a zombie nobody has reaped yet).
pub fn process_gone(pid: i64) -> bool {
    let st = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    st.is_empty()
        || st
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
}

pub fn dough(home: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_dough"));
    // Tests choose their backend themselves.
    c.env("DOUGH_HOME", home)
        .env_remove("RUST_LOG")
        .env_remove("DOUGH_BACKEND")
        .env_remove("DOUGH_FIRECRACKER");
    c
}

pub fn run(home: &Path, args: &[&str]) -> Output {
    dough(home).args(args).output().unwrap()
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Entries of `home/vms` (VM state directories).
pub fn vm_dirs(home: &Path) -> Vec<PathBuf> {
    match std::fs::read_dir(home.join("vms")) {
        Ok(rd) => rd.map(|e| e.unwrap().path()).collect(),
        Err(_) => vec![],
    }
}

/// Start dough with `args` and one test-hook variable set, and read its
/// stderr until a line contains `marker` (the hook says it is holding).
/// Returns the child (still running) and the stderr read so far.
pub fn spawn_until(
    home: &Path,
    args: &[&str],
    hook: (&str, &str),
    marker: &str,
) -> (std::process::Child, String) {
    use std::io::BufRead;
    let mut child = dough(home)
        .args(args)
        .env(hook.0, hook.1)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut seen = String::new();
    for line in std::io::BufReader::new(child.stderr.take().unwrap()).lines() {
        let line = line.unwrap();
        seen.push_str(&line);
        seen.push('\n');
        if line.contains(marker) {
            return (child, seen);
        }
    }
    let _ = child.kill();
    let status = child.wait();
    panic!("dough never reached the test hook ({marker}), exit {status:?}: {seen}");
}

/// The current image of the shared home (as built by `scripts/test`).
pub fn current_image() -> dough_image::Image {
    let home = shared_home();
    let id = std::fs::read_to_string(home.join("images/current")).unwrap();
    serde_json::from_slice(
        &std::fs::read(home.join("images").join(format!("{}.json", id.trim()))).unwrap(),
    )
    .unwrap()
}

/// Run `sh -c script` over a channel; it must exit 0. Its output, trimmed.
pub fn sh(ch: &mut dough_fabric::HostChannel, script: &str) -> String {
    let mut out = Vec::new();
    let st = ch
        .exec(
            &dough_fabric::ExecRequest {
                argv: vec!["sh".into(), "-c".into(), script.into()],
                ..Default::default()
            },
            &mut |_, d| out.extend_from_slice(d),
        )
        .unwrap();
    assert_eq!(
        st,
        dough_proto::ExitStatus::Exited(0),
        "{}",
        String::from_utf8_lossy(&out)
    );
    String::from_utf8_lossy(&out).trim().to_string()
}

/// SIGKILL a dough process *and* its watchdog (`dough watchdog --owner
/// PID`), so that nothing reclaims its VMs until the next dough command:
/// how the tests of that path make it happen.
pub fn kill_dough_and_its_watchdog(child: &mut std::process::Child) {
    let owner = child.id().to_string();
    let watchdogs: Vec<i32> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
            args.iter().any(|a| *a == b"watchdog")
                && args
                    .windows(2)
                    .any(|w| w[0] == b"--owner" && w[1] == owner.as_bytes())
        })
        .collect();
    assert_eq!(watchdogs.len(), 1, "one watchdog for dough pid {owner}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(watchdogs[0]),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
}

/// `git ARGS` in `dir` (as user t), its trimmed stdout.
pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new("git")
        .args(["-c", "user.name=t", "-c", "user.email=t@t"])
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "git {args:?}: {}", text(&out.stderr));
    text(&out.stdout).trim().to_string()
}

/// A repo with one file and the given plan text next to it.
pub fn small_repo(plan: &str) -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let repo = d.path().join("repo");
    std::fs::create_dir_all(repo.join("src")).unwrap();
    std::fs::write(repo.join("src/a.py"), "a = 1\n").unwrap();
    git(&repo, &["init", "-q", "-b", "main"]);
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-qm", "base"]);
    let p = d.path().join("plan.toml");
    std::fs::write(&p, plan).unwrap();
    (d, p)
}

pub fn go(
    home: &Path,
    plan: &Path,
    env: &[(&str, &str)],
) -> (std::process::Output, serde_json::Value, String) {
    let mut c = dough(home);
    c.arg("go").arg(plan);
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().unwrap();
    let stdout = text(&out.stdout);
    let report = stdout
        .lines()
        .find_map(|l| l.strip_prefix("report: "))
        .unwrap_or_else(|| panic!("no report line: {stdout}\n{}", text(&out.stderr)))
        .to_string();
    let run_json = Path::new(&report).with_file_name("run.json");
    let run: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&run_json).unwrap()).unwrap();
    (out, run, std::fs::read_to_string(&report).unwrap())
}

pub fn task<'a>(run: &'a serde_json::Value, id: &str) -> &'a serde_json::Value {
    run["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == id)
        .unwrap()
}

/// Whether any file under `path` (or `path` itself) holds `needle`. Only
/// a file's data is read: a sparse file's holes (a scratch disk's, a memory
/// file's) read as zeros and hold no needle.
pub fn tree_contains(path: &Path, needle: &[u8]) -> bool {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return false;
    };
    if meta.is_dir() {
        return std::fs::read_dir(path)
            .unwrap()
            .flatten()
            .any(|e| tree_contains(&e.path(), needle));
    }
    if !meta.is_file() {
        return false;
    }
    // Only the data: a sparse file's holes (a scratch disk's, a memory
    // file's) read as zeros and hold no needle.
    use nix::unistd::{lseek, Whence};
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    let Ok(f) = std::fs::File::open(path) else {
        return false;
    };
    let (len, fd) = (meta.len() as i64, f.as_raw_fd());
    let mut pos = 0i64;
    let mut buf = vec![0u8; 1 << 20];
    while pos < len {
        let Ok(data) = lseek(fd, pos, Whence::SeekData) else {
            break;
        };
        let hole = lseek(fd, data, Whence::SeekHole).unwrap_or(len);
        let mut at = data;
        let mut carry: Vec<u8> = Vec::new();
        while at < hole {
            let want = ((hole - at) as usize).min(buf.len());
            let n = f.read_at(&mut buf[..want], at as u64).unwrap_or(0);
            if n == 0 {
                break;
            }
            carry.extend_from_slice(&buf[..n]);
            if carry.windows(needle.len()).any(|w| w == needle) {
                return true;
            }
            carry.drain(..carry.len().saturating_sub(needle.len()));
            at += n as i64;
        }
        pos = hole;
    }
    false
}

/// A copy of `examples/calc` whose repo is a git repository; returns the
/// directory and the plan.
pub fn calc_example() -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/calc");
    let out = std::process::Command::new("cp")
        .arg("-r")
        .arg(&src)
        .arg(d.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    let repo = d.path().join("calc/repo");
    git(&repo, &["init", "-q", "-b", "main"]);
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-qm", "base"]);
    let plan = d.path().join("calc/plan.toml");
    (d, plan)
}
