//! `dough plan check`: good plans print their rounds; bad ones exit 1 and
//! name every problem.

mod common;

use common::text;

fn check(plan: &str) -> std::process::Output {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("plan.toml");
    std::fs::write(&p, plan).unwrap();
    std::process::Command::new(env!("CARGO_BIN_EXE_dough"))
        .args(["plan", "check"])
        .arg(&p)
        .env("DOUGH_HOME", d.path())
        .output()
        .unwrap()
}

const HEAD: &str = r#"
goal = "g"
repo = "."
agent = ["sh", "{work_order}"]
check = "true"
"#;

#[test]
fn a_good_plan_prints_its_rounds() {
    let out = check(&format!(
        "{HEAD}
[[tasks]]
id = \"a\"
title = \"A\"
work = \"w\"
allow = [\"src/a.py\"]
[[tasks]]
id = \"b\"
title = \"B\"
work = \"w\"
allow = [\"src/a.py\", \"src/b.py\"]
deps = [\"a\"]
"
    ));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let o = text(&out.stdout);
    assert!(o.starts_with("plan ok: 2 task(s) in 2 round(s)"), "{o}");
    assert!(o.contains("round 2:\n  b "), "{o}");
}

#[test]
fn a_bad_plan_exits_1_naming_every_problem() {
    let out = check(&format!(
        "{HEAD}
[[tasks]]
id = \"a\"
title = \"A\"
work = \"w\"
allow = [\"src/*.py\"]
deps = [\"c\"]
[[tasks]]
id = \"b\"
title = \"B\"
work = \"w\"
allow = [\"src/b.py\"]
[[tasks]]
id = \"c\"
title = \"C\"
work = \"w\"
allow = [\".git/config\"]
deps = [\"a\"]
"
    ));
    assert_eq!(out.status.code(), Some(1));
    let e = text(&out.stderr);
    assert!(e.contains("dependency cycle: a → c → a"), "{e}");
    assert!(
        e.contains("glob \".git/config\" reaches git's own files"),
        "{e}"
    );
    assert!(e.contains("nothing will run"), "{e}");
    assert!(out.stdout.is_empty());
}

/// `dough go` on a one-task plan in `dir` whose repo is `dir/repo`, with a
/// home of its own under `dir`.
fn go_one_task_plan(dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    let plan = dir.join("plan.toml");
    std::fs::write(
        &plan,
        "goal = \"g\"\nrepo = \"repo\"\nagent = [\"true\"]\ncheck = \"true\"\n\n[[tasks]]\nid = \"a\"\ntitle = \"A\"\nwork = \"w\"\nallow = [\"a.py\"]\n",
    )
    .unwrap();
    std::process::Command::new(env!("CARGO_BIN_EXE_dough"))
        .arg("go")
        .arg(&plan)
        .args(args)
        .env("DOUGH_HOME", dir.join("home"))
        .output()
        .unwrap()
}

/// A plan may not reach host files or repositories outside its directory,
/// not even through a symlink; `--repo` is the user's explicit choice.
#[test]
fn go_refuses_a_plan_that_reaches_outside_its_directory() {
    let d = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let git = |dir: &std::path::Path, args: &[&str]| {
        assert!(std::process::Command::new("git")
            .args(["-c", "user.name=u", "-c", "user.email=u@u"])
            .args(args)
            .current_dir(dir)
            .status()
            .unwrap()
            .success());
    };
    git(elsewhere.path(), &["init", "-q"]);
    git(
        elsewhere.path(),
        &["commit", "-q", "--allow-empty", "-m", "private"],
    );
    std::os::unix::fs::symlink(elsewhere.path(), d.path().join("repo")).unwrap();
    let out = go_one_task_plan(d.path(), &[]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("outside the plan's directory") && err.contains("--repo"),
        "{err}"
    );
    // Nothing was created in the other repository.
    let branches = std::process::Command::new("git")
        .args(["branch", "--list", "dough/*"])
        .current_dir(elsewhere.path())
        .output()
        .unwrap();
    assert!(text(&branches.stdout).trim().is_empty());
    // An absolute path in the plan is a plan problem, named by check.
    let abs = check(&format!(
        "goal = \"g\"\nrepo = {:?}\nagent = [\"true\"]\ncheck = \"true\"\n\n[[tasks]]\nid = \"a\"\ntitle = \"A\"\nwork = \"w\"\nallow = [\"a.py\"]\n",
        elsewhere.path()
    ));
    assert_eq!(abs.status.code(), Some(1));
    assert!(text(&abs.stderr).contains("must be inside the plan's directory"));
}

/// A run that fails before it starts (here: an image that does not exist) leaves no
/// branch behind in the user's repo.
#[test]
fn go_that_fails_before_starting_leaves_no_branch() {
    let d = tempfile::tempdir().unwrap();
    let repo = d.path().join("repo");
    std::fs::create_dir(&repo).unwrap();
    let git = |args: &[&str]| {
        let out = std::process::Command::new("git")
            .args(["-c", "user.name=u", "-c", "user.email=u@u"])
            .args(args)
            .current_dir(&repo)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout)
    };
    git(&["init", "-q"]);
    git(&["commit", "-q", "--allow-empty", "-m", "base"]);
    let out = go_one_task_plan(d.path(), &["--image", "no-such-image"]);
    assert!(!out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        git(&["branch", "--list", "dough/*"]).trim(),
        "",
        "{}",
        text(&out.stderr)
    );
}
