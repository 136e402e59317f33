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
