//! VM tier: `dough go` — the example plan end to end, hostile agents, and
//! secrets that must never land on disk.

mod common;

use std::path::Path;

use common::*;

#[test]
fn vm_go_runs_the_example_plan_end_to_end() {
    let home = private_home();
    let (dir, plan) = calc_example();
    let (out, run, report) = go(home.path(), &plan, &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    for t in run["tasks"].as_array().unwrap() {
        assert_eq!(t["outcome"], "green", "{t}");
    }
    // The retry: parser's first attempt failed its gate, the second passed.
    let parser = task(&run, "parser");
    assert_eq!(parser["attempts"].as_array().unwrap().len(), 2);
    assert!(parser["attempts"][0]["failure"]
        .as_str()
        .unwrap()
        .contains("the gate check failed"));
    assert!(report.contains("## parser attempt 1: failed"));
    // One commit per task, in plan order (round by round).
    let repo = dir.path().join("calc/repo");
    let branch = run["branch"].as_str().unwrap();
    assert_eq!(
        git(&repo, &["log", "--reverse", "--format=%s", branch]),
        "base\ntokens: Tokenizer\nerrors: Error type\ndocs: Usage guide\nparser: Parser\nevaluate: Evaluator\ncli: Command line"
    );
    // The user's checkout was not touched.
    assert_eq!(git(&repo, &["rev-parse", "--abbrev-ref", "HEAD"]), "main");
    assert_eq!(git(&repo, &["status", "--porcelain"]), "");
    // The example's own tests pass on the branch.
    let wt = dir.path().join("check");
    git(
        &repo,
        &["worktree", "add", "-q", wt.to_str().unwrap(), branch],
    );
    let t = std::process::Command::new("python3")
        .args(["-m", "unittest", "discover", "-s", "tests", "-t", "."])
        .current_dir(&wt)
        .output()
        .unwrap();
    assert!(t.status.success(), "{}", text(&t.stderr));
    assert!(
        text(&t.stderr).contains("Ran 10 tests"),
        "{}",
        text(&t.stderr)
    );
    assert!(vm_dirs(home.path()).is_empty(), "every clone was torn down");
}

const HOSTILE: &str = r##"
goal = "hostile agents"
repo = "repo"
agent = ["false"]
check = "true"
retries = 0
concurrency = 2
egress = "none"
step_timeout_secs = 20

[[tasks]]
id = "outside"
title = "Writes outside its allowlist"
work = "w"
allow = ["src/outside.py"]
script = "echo pwned > README.md"

[[tasks]]
id = "symlink"
title = "Plants a symlink"
work = "w"
allow = ["links/**"]
script = "mkdir links && ln -s /etc/shadow links/link"

[[tasks]]
id = "hooks"
title = "Edits .git/hooks through a fake git"
work = "w"
allow = ["src/hooks.py"]
script = """
mkdir -p /usr/local/bin
cat > /usr/local/bin/git <<'END'
#!/bin/sh
[ "$1" = diff ] || exec /usr/bin/git "$@"
printf 'diff --git a/.git/hooks/post-commit b/.git/hooks/post-commit\\nnew file mode 100755\\n--- /dev/null\\n+++ b/.git/hooks/post-commit\\n@@ -0,0 +1 @@\\n+touch /tmp/pwned\\n'
END
chmod +x /usr/local/bin/git
"""

[[tasks]]
id = "hang"
title = "Makes taking the diff hang (git replaced by sleep)"
work = "w"
allow = ["src/hang.py"]
script = """
echo 'hang = 1' > src/hang.py
mkdir -p /usr/local/bin
printf '#!/bin/sh\\nexec sleep 100000\\n' > /usr/local/bin/git
chmod +x /usr/local/bin/git
"""

[[tasks]]
id = "hide"
title = "Hides a file from the gate with .gitattributes export-ignore"
work = "w"
allow = ["hide/**"]
check = "test ! -e hide/hidden.py"
script = """
mkdir -p hide
echo 'hidden.py export-ignore' > hide/.gitattributes
echo 'import os' > hide/hidden.py
"""

[[tasks]]
id = "good"
title = "An honest sibling"
work = "w"
allow = ["src/good.py"]
script = "echo 'good = 1' > src/good.py"
"##;

#[test]
fn vm_go_hostile_agents_fail_with_the_reason_and_siblings_land() {
    let home = private_home();
    let (dir, plan) = small_repo(HOSTILE);
    let (out, run, report) = go(home.path(), &plan, &[]);
    assert_eq!(out.status.code(), Some(1), "not all green");
    let reason = |id: &str| {
        task(&run, id)["attempts"][0]["failure"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(task(&run, "outside")["outcome"], "failed");
    assert!(reason("outside").contains("\"README.md\" is outside the task's allowlist"));
    assert!(reason("symlink").contains("\"links/link\" would become a symlink"));
    assert!(
        reason("hooks").contains("\".git/hooks/post-commit\" is or is inside a `.git` directory"),
        "{}",
        reason("hooks")
    );
    assert!(
        reason("hang").contains("taking the diff failed (timed out)"),
        "{}",
        reason("hang")
    );
    // The gate saw the file the agent tried to hide (its check failed).
    assert_eq!(task(&run, "hide")["outcome"], "failed");
    assert!(
        reason("hide").contains("the gate check failed"),
        "{}",
        reason("hide")
    );
    assert_eq!(task(&run, "good")["outcome"], "green");
    for r in [
        "README.md",
        "would become a symlink",
        ".git/hooks/post-commit",
    ] {
        assert!(report.contains(r), "report names {r}");
    }
    let repo = dir.path().join("repo");
    let branch = run["branch"].as_str().unwrap();
    assert_eq!(
        git(&repo, &["log", "--format=%s", branch]),
        "good: An honest sibling\nbase"
    );
    assert!(!repo.join(".git/hooks/post-commit").exists());
}

const SECRET_PLAN: &str = r##"
goal = "use a secret"
repo = "repo"
agent = ["false"]
check = "true"
retries = 1
egress = "none"

[[secrets]]
name = "API_KEY"
env = "DOUGH_TEST_API_KEY"
prefix = "sk-test-"

[[tasks]]
id = "uses-key"
title = "Uses the key"
work = "w"
allow = ["src/b.py"]
secrets = ["API_KEY"]
# Shouts the key on both streams and fails once (so it is in the failure
# that is fed back and reported), then succeeds without committing it.
script = """
echo "key is $API_KEY"; echo "key is $API_KEY" >&2
echo "$API_KEY" > /tmp/key-copy
grep -q "Attempt 1 failed" "$WORK_ORDER" || exit 3
echo 'b = 1' > src/b.py
"""
"##;

#[test]
fn vm_go_secrets_never_land_on_disk() {
    let home = private_home();
    let (dir, plan) = small_repo(SECRET_PLAN);
    // Wrong prefix: refused before anything runs, without showing it.
    let out = dough(home.path())
        .arg("go")
        .arg(&plan)
        .env("DOUGH_TEST_API_KEY", "pk-wrong")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    assert!(text(&out.stderr).contains("does not start with its required prefix"));
    assert!(!text(&out.stderr).contains("pk-wrong"));

    let secret = format!("sk-test-{}", std::process::id() as u64 * 7919 + 12345);
    let (out, run, report) = go(home.path(), &plan, &[("DOUGH_TEST_API_KEY", &secret)]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let t = task(&run, "uses-key");
    assert_eq!(t["attempts"].as_array().unwrap().len(), 2);
    let failure = t["attempts"][0]["failure"].as_str().unwrap();
    assert!(failure.contains("key is [redacted:API_KEY]"), "{failure}");
    assert!(report.contains("[redacted:API_KEY]"));
    let s = secret.as_bytes();
    assert!(!text(&out.stderr).contains(&secret));
    // Not in anything dough wrote: the home's state, runs, logs, records —
    // and the snapshot the clones came from (its memory file included).
    let shared = shared_home();
    for p in [home.path().to_path_buf(), shared.join("snapshots")] {
        assert!(
            !tree_contains(&p, s),
            "the secret is in a file under {}",
            p.display()
        );
    }
    assert!(
        !tree_contains(&dir.path().join("repo"), s),
        "the secret is in the repo"
    );
    // Nor on the clone's disk: the rootfs image it ran from (read-only; the
    // clone's writes went to its scratch disk, which died with it).
    let id = std::fs::read_to_string(home.path().join("images/current")).unwrap();
    let image: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            home.path()
                .join("images")
                .join(format!("{}.json", id.trim())),
        )
        .unwrap(),
    )
    .unwrap();
    assert!(!tree_contains(
        Path::new(image["rootfs"].as_str().unwrap()),
        s
    ));
}

#[test]
fn vm_go_ctrl_c_tears_clones_down_and_keeps_what_was_green() {
    use std::io::BufRead;
    let home = private_home();
    let (dir, plan) = calc_example();
    let mut child = dough(home.path())
        .arg("go")
        .arg(&plan)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until round 1 is stacked and round 2 has started.
    let mut seen = String::new();
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    for line in lines.by_ref() {
        let line = line.unwrap();
        seen.push_str(&line);
        seen.push('\n');
        if line.contains("parser #1: starting") {
            break;
        }
    }
    assert!(seen.contains("parser #1: starting"), "{seen}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{seen}{}", rest.join("\n"));
    assert!(
        vm_dirs(home.path()).is_empty(),
        "clones torn down: {:?}",
        vm_dirs(home.path())
    );
    let repo = dir.path().join("calc/repo");
    let branches = git(
        &repo,
        &["branch", "--list", "dough/*", "--format=%(refname:short)"],
    );
    assert_eq!(
        git(&repo, &["log", "--reverse", "--format=%s", branches.trim()]),
        "base\ntokens: Tokenizer\nerrors: Error type\ndocs: Usage guide",
        "round 1 stays on the branch"
    );
}

/// A task does not wait for its clones' teardown: they go to the run's
/// reaper while the run goes on. Held there (a test hook) when dough is
/// killed, they are still recorded as dough's, and the next command's
/// sweep reclaims them: VMMs and gateways stopped, directories gone.
#[test]
fn vm_go_tears_clones_down_off_the_tasks_path_and_a_crash_loses_none() {
    let home = private_home();
    let h = home.path();
    let (_dir, plan) = calc_example();
    let plan = plan.to_str().unwrap();
    // Round 2 starts while the first clone round 1 was done with is still
    // held by the reaper, VMM and all.
    let (mut child, seen) = spawn_until(
        h,
        &["go", plan],
        ("DOUGH_TEST_HOLD_REAPER", "1"),
        "parser #1: starting",
    );
    let held = seen
        .lines()
        .find_map(|l| l.split("the reaper holds ").nth(1))
        .unwrap_or_else(|| panic!("no clone went to the reaper before round 2: {seen}"))
        .trim()
        .to_string();
    let recs = records(h);
    let rec = recs
        .iter()
        .find(|r| r["id"] == held.as_str())
        .unwrap_or_else(|| panic!("{held} is not recorded any more: {recs:?}"));
    let vmm = rec["vmm"]["pid"].as_i64().unwrap() as i32;
    assert!(alive(vmm), "the held clone's VMM is already gone");
    let pids: Vec<i32> = recs
        .iter()
        .flat_map(|r| [&r["vmm"]["pid"], &r["gateway"]["pid"]])
        .filter_map(|p| p.as_i64())
        .map(|p| p as i32)
        .collect();
    // A crash with clones still queued.
    child.kill().unwrap();
    child.wait().unwrap();
    let out = run(h, &["ps"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(vm_dirs(h).is_empty(), "left: {:?}", vm_dirs(h));
    for p in pids {
        assert!(!alive(p), "process {p} of a reclaimed clone still runs");
    }
}

/// Whether process `pid` exists (a zombie counts as gone).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

/// `dough agent` on `repo` with `args` before `--` and the agent `script`.
fn agent(home: &Path, repo: &Path, args: &[&str], script: &str) -> std::process::Output {
    dough(home)
        .arg("agent")
        .arg("--repo")
        .arg(repo)
        .args(args)
        .args(["--", "sh", "-c", script])
        .output()
        .unwrap()
}

#[test]
fn vm_agent_shows_or_commits_what_passes_and_refuses_the_rest() {
    let home = private_home();
    let h = home.path();
    let (dir, _) = small_repo("");
    let repo = dir.path().join("repo");
    let branches = || git(&repo, &["branch", "--format=%(refname:short)"]);

    // Shown, not kept: the patch on stdout, no branch left behind.
    let out = agent(
        h,
        &repo,
        &[
            "--allow",
            "src/**",
            "--work",
            "set a to 2",
            "--check",
            "grep -q 'a = 2' src/a.py",
        ],
        "grep -q 'set a to 2' \"$WORK_ORDER\" && echo 'a = 2' > src/a.py",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let patch = text(&out.stdout);
    assert!(patch.contains("-a = 1\n+a = 2"), "{patch}");
    assert!(text(&out.stderr).contains("not kept (--commit keeps"));
    assert_eq!(branches(), "main");

    // Kept with --commit: the branch holds the change.
    let out = agent(
        h,
        &repo,
        &["--allow", "src/**", "--commit", "--run-id", "kept"],
        "echo 'b = 1' > src/b.py",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(git(&repo, &["show", "dough/kept:src/b.py"]), "b = 1");

    // A change outside --allow is refused whole, with the reason; nothing
    // is kept even with --commit.
    let out = agent(
        h,
        &repo,
        &["--allow", "src/**", "--commit", "--run-id", "refused"],
        "echo x > README; echo 'c = 1' > src/c.py",
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stdout).is_empty());
    let report = std::fs::read_to_string(h.join("runs/refused/report.md")).unwrap();
    assert!(
        report.contains("\"README\" is outside the task's allowlist"),
        "{report}"
    );
    assert!(!branches().contains("dough/refused"), "{}", branches());
}

/// A plan with a `setup`: each round's setup runs once in a workspace
/// clone, whose snapshot every agent and gate of the round is a fork of —
/// the gate's check finds what the setup made — and the run ends as the
/// plan without it does; the workspaces' snapshots are removed.
#[test]
fn vm_go_with_a_setup_forks_each_round_from_one_workspace() {
    let home = private_home();
    let (dir, plan) = calc_example();
    let repo = dir.path().join("calc/repo");
    std::fs::write(repo.join(".gitignore"), ".deps/\n").unwrap();
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-qm", "ignore deps"]);
    let text_plan = std::fs::read_to_string(&plan).unwrap();
    let with = text_plan
        .replace(
            "check = \"python3 -m unittest",
            "setup = \"sleep 2; mkdir -p .deps && echo installed > .deps/marker\"\ncheck = \"test -f .deps/marker && python3 -m unittest",
        );
    assert_ne!(with, text_plan);
    std::fs::write(&plan, with).unwrap();
    let live_before = live_snapshots(home.path());
    let (out, run, report) = go(home.path(), &plan, &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    for t in run["tasks"].as_array().unwrap() {
        assert_eq!(t["outcome"], "green", "{t}");
    }
    let ws = run["workspaces"].as_array().unwrap();
    assert_eq!(ws.len(), 3, "one per round: {run}");
    assert_eq!(
        ws.iter().map(|w| w["tasks"].as_u64().unwrap()).sum::<u64>(),
        6
    );
    assert!(ws.iter().all(|w| w["setup_secs"].as_f64().unwrap() >= 2.0));
    assert!(
        report.contains("workspace: the plan's setup ran once"),
        "{report}"
    );
    assert!(
        text(&out.stderr).contains("workspace ready"),
        "{}",
        text(&out.stderr)
    );
    let branch = run["branch"].as_str().unwrap();
    assert_eq!(
        git(&repo, &["log", "--reverse", "--format=%s", branch]),
        "base\nignore deps\ntokens: Tokenizer\nerrors: Error type\ndocs: Usage guide\nparser: Parser\nevaluate: Evaluator\ncli: Command line"
    );
    // What the setup made never reaches the branch.
    assert_eq!(
        git(&repo, &["ls-tree", "-r", "--name-only", branch, ".deps"]),
        ""
    );
    assert!(vm_dirs(home.path()).is_empty(), "every clone was torn down");
    assert_eq!(
        live_snapshots(home.path()),
        live_before,
        "workspaces removed"
    );
}

/// Keys of the live snapshots in `home`'s store.
fn live_snapshots(home: &Path) -> Vec<String> {
    let out = run(home, &["snapshots", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut keys: Vec<String> = v
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| !s["parent"].is_null())
        .map(|s| s["key"].as_str().unwrap().to_string())
        .collect();
    keys.sort();
    keys
}
