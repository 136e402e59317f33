//! The corpus of hostile (and a few honest) agent diffs: each hostile one
//! is refused with the right reason; the honest ones pass.

use dough_gobrr::diff::{Diff, Rejection};
use dough_gobrr::glob::Glob;

fn allow() -> Vec<Glob> {
    ["src/**", "tests/test_a.py", "bin/run"]
        .iter()
        .map(|g| Glob::new(g).unwrap())
        .collect()
}

fn modify(p: &str) -> String {
    format!(
        "diff --git a/{p} b/{p}\nindex 1111111..2222222 100644\n--- a/{p}\n+++ b/{p}\n@@ -1 +1 @@\n-old\n+new\n"
    )
}

fn new_file(p: &str, mode: &str) -> String {
    format!(
        "diff --git a/{p} b/{p}\nnew file mode {mode}\nindex 0000000..2222222\n--- /dev/null\n+++ b/{p}\n@@ -0,0 +1 @@\n+x\n"
    )
}

fn rename(from: &str, to: &str) -> String {
    format!(
        "diff --git a/{from} b/{to}\nsimilarity index 100%\nrename from {from}\nrename to {to}\n"
    )
}

fn verdict(d: &str) -> Result<Diff, Rejection> {
    let diff = Diff::parse(d.as_bytes())?;
    diff.check(&allow())?;
    Ok(diff)
}

#[test]
fn honest_diffs_pass() {
    // Real `git diff --binary` of a new 12-byte file (b"hello\0world\x01").
    let binary = "diff --git a/src/data.bin b/src/data.bin\nnew file mode 100644\nindex 0000000000000000000000000000000000000000..5e1d45307b4fc5a95213bb7100a63d8f7682caec\nGIT binary patch\nliteral 12\nTcmc~u&B@7UD9<m-Nnr#49f<@!\n\nliteral 0\nHcmV?d00001\n\n";
    let chmod = "diff --git a/bin/run b/bin/run\nold mode 100644\nnew mode 100755\n";
    let delete = "diff --git a/src/old.py b/src/old.py\ndeleted file mode 100644\nindex 2222222..0000000\n--- a/src/old.py\n+++ /dev/null\n@@ -1,2 +0,0 @@\n-a\n-b\n";
    let no_newline = "diff --git a/src/a.py b/src/a.py\nindex 1111111..2222222 100644\n--- a/src/a.py\n+++ b/src/a.py\n@@ -1,2 +1,2 @@\n a\n-b\n\\ No newline at end of file\n+c\n\\ No newline at end of file\n";
    let spaced = "diff --git a/src/my file.py b/src/my file.py\nindex 1111111..2222222 100644\n--- a/src/my file.py\n+++ b/src/my file.py\n@@ -1 +1 @@\n-old\n+new\n";
    for (name, d) in [
        ("modify", modify("src/a.py")),
        ("new test", new_file("tests/test_a.py", "100644")),
        ("chmod +x", chmod.into()),
        ("rename inside", rename("src/a.py", "src/b.py")),
        ("binary", binary.into()),
        ("delete", delete.into()),
        ("no newline", no_newline.into()),
        ("space in name", spaced.into()),
        (
            "two files",
            modify("src/a.py") + &new_file("src/b.py", "100755"),
        ),
    ] {
        assert!(verdict(&d).is_ok(), "{name}: {:?}", verdict(&d));
    }
    let d = verdict(&(modify("src/a.py") + &new_file("src/b.py", "100644"))).unwrap();
    assert_eq!(d.stats(), (2, 2, 1));
    assert_eq!(d.changed_paths(), vec!["src/a.py", "src/b.py"]);
}

#[test]
fn hostile_diffs_are_refused_with_the_reason() {
    use Rejection::*;
    let na = |p: &str| NotAllowed { path: p.into() };
    let git = |p: &str| GitDir { path: p.into() };
    let cases: Vec<(&str, String, Rejection)> = vec![
        ("outside the allowlist", modify("README.md"), na("README.md")),
        ("rename out of the allowlist", rename("src/a.py", "docs/a.py"), na("docs/a.py")),
        ("rename into the allowlist", rename("secret.txt", "src/s.txt"), na("secret.txt")),
        (
            "copy from outside",
            "diff --git a/secret.txt b/src/s.txt\nsimilarity index 100%\ncopy from secret.txt\ncopy to src/s.txt\n".into(),
            na("secret.txt"),
        ),
        ("absolute", modify("/etc/passwd"), Absolute { path: "/etc/passwd".into() }),
        ("dot-dot", modify("src/../../etc/x"), Traversal { path: "src/../../etc/x".into() }),
        ("dot", modify("src/./a.py"), Traversal { path: "src/./a.py".into() }),
        ("empty component", modify("src//a.py"), Traversal { path: "src//a.py".into() }),
        ("git hooks", new_file(".git/hooks/pre-commit", "100755"), git(".git/hooks/pre-commit")),
        ("nested .git", modify("src/.git/config"), git("src/.git/config")),
        ("upper-case .GIT", modify("src/.GIT/HEAD"), git("src/.GIT/HEAD")),
        ("NTFS trailing dot", modify("src/.git./config"), git("src/.git./config")),
        ("NTFS short name", modify("src/GIT~1/config"), git("src/GIT~1/config")),
        (
            "HFS ignorable character",
            "diff --git \"a/src/.g\\342\\200\\214it/config\" \"b/src/.g\\342\\200\\214it/config\"\nindex 1111111..2222222 100644\n--- \"a/src/.g\\342\\200\\214it/config\"\n+++ \"b/src/.g\\342\\200\\214it/config\"\n@@ -1 +1 @@\n-a\n+b\n".into(),
            git("src/.g\u{200c}it/config"),
        ),
        ("gitmodules", new_file(".gitmodules", "100644"), GitModules { path: ".gitmodules".into() }),
        ("nested gitmodules", modify("src/.gitmodules"), GitModules { path: "src/.gitmodules".into() }),
        ("new symlink", new_file("src/link", "120000"), Symlink { path: "src/link".into() }),
        (
            "file becomes symlink",
            "diff --git a/src/a.py b/src/a.py\nold mode 100644\nnew mode 120000\n".into(),
            Symlink { path: "src/a.py".into() },
        ),
        (
            "edit a symlink",
            "diff --git a/src/l b/src/l\nindex 1111111..2222222 120000\n--- a/src/l\n+++ b/src/l\n@@ -1 +1 @@\n-/x\n+/etc/shadow\n".into(),
            Symlink { path: "src/l".into() },
        ),
        ("submodule", new_file("src/sub", "160000"), Submodule { path: "src/sub".into() }),
        (
            "odd mode",
            "diff --git a/src/a.py b/src/a.py\nold mode 100644\nnew mode 100777\n".into(),
            Mode { path: "src/a.py".into(), mode: "100777".into() },
        ),
        (
            "control character",
            "diff --git \"a/src/a\\nb\" \"b/src/a\\nb\"\nindex 1111111..2222222 100644\n--- \"a/src/a\\nb\"\n+++ \"b/src/a\\nb\"\n@@ -1 +1 @@\n-a\n+b\n".into(),
            ControlChar { path: "src/a\nb".into() },
        ),
        ("empty", String::new(), Empty),
    ];
    assert!(cases.len() >= 20);
    for (name, d, want) in cases {
        assert_eq!(verdict(&d).unwrap_err(), want, "{name}");
    }
}

#[test]
fn malformed_diffs_are_refused() {
    let cases = [
        ("garbage", "hello\n".to_string()),
        (
            "+++ disagrees with the header",
            "diff --git a/src/a.py b/src/a.py\nindex 1111111..2222222 100644\n--- a/src/a.py\n+++ b/README.md\n@@ -1 +1 @@\n-a\n+b\n".into(),
        ),
        (
            "binary without data",
            "diff --git a/src/x.bin b/src/x.bin\nindex 1111111..2222222 100644\nBinary files a/src/x.bin and b/src/x.bin differ\n".into(),
        ),
        (
            "hunk longer than its header",
            "diff --git a/src/a.py b/src/a.py\n--- a/src/a.py\n+++ b/src/a.py\n@@ -1 +1 @@\n-a\n+b\n+c\n".into(),
        ),
        (
            "hunk shorter than its header",
            "diff --git a/src/a.py b/src/a.py\n--- a/src/a.py\n+++ b/src/a.py\n@@ -1,3 +1,3 @@\n-a\n+b\n".into(),
        ),
        (
            "rename disagrees with the header",
            "diff --git a/src/a.py b/src/b.py\nrename from src/a.py\nrename to README.md\n".into(),
        ),
        (
            "rename with one side",
            "diff --git a/src/a.py b/src/b.py\nrename from src/a.py\n".into(),
        ),
        (
            "two paths without a rename",
            "diff --git a/src/a.py b/README.md\nold mode 100644\nnew mode 100755\n".into(),
        ),
        (
            "not base85",
            "diff --git a/src/d.bin b/src/d.bin\nnew file mode 100644\nGIT binary patch\nliteral 3\n$$ not base85 ..\n\n".into(),
        ),
        ("unknown header line", "diff --git a/src/a.py b/src/a.py\nexecute me\n".into()),
        (
            "a second file smuggled after a hunk",
            "diff --git a/src/a.py b/src/a.py\n--- a/src/a.py\n+++ b/src/a.py\n@@ -1 +1 @@\n-a\n+b\n--- a/README.md\n+++ b/README.md\n@@ -1 +1 @@\n-x\n+y\n".into(),
        ),
        (
            "a mode line after a hunk",
            "diff --git a/src/l b/src/l\nnew file mode 120000\n--- /dev/null\n+++ b/src/l\n@@ -0,0 +1 @@\n+/etc\nnew file mode 100644\n".into(),
        ),
        (
            "a bare quote inside a quoted name",
            "diff --git \"a/src/m.py\"/x.py\" \"b/src/m.py\"/x.py\"\n--- \"a/src/m.py\"/x.py\"\n+++ \"b/src/m.py\"/x.py\"\n@@ -1 +1 @@\n-a\n+b\n".into(),
        ),
        (
            "a new file whose header halves differ",
            "diff --git a/src/p.py b/README.md\nnew file mode 100644\nindex 0000000..1111111\n".into(),
        ),
        (
            "a hunk without ---/+++",
            "diff --git a/src/a.py b/src/a.py\n@@ -1 +1 @@\n-a\n+b\n".into(),
        ),
    ];
    for (name, d) in cases {
        match verdict(&d) {
            Err(Rejection::Malformed { .. }) => {}
            other => panic!("{name}: {other:?}"),
        }
    }
    assert_eq!(
        verdict("\u{0}\u{ff}").unwrap_err(),
        Rejection::Malformed {
            line: 1,
            what: "expected `diff --git`, found \"\\0ÿ\"".into()
        }
    );
    assert_eq!(Diff::parse(&[0xff, 0xfe]).unwrap_err(), Rejection::NotText);
    let big = vec![b'a'; dough_gobrr::diff::MAX_DIFF_BYTES + 1];
    assert!(matches!(Diff::parse(&big), Err(Rejection::TooLarge(_))));
}

#[test]
fn arbitrary_bytes_never_panic() {
    // A cheap fuzz: every prefix of every corpus diff, and byte flips.
    let d = modify("src/a.py") + &rename("src/a.py", "src/b.py") + &new_file("src/l", "120000");
    let b = d.as_bytes();
    for cut in 0..b.len() {
        let _ = Diff::parse(&b[..cut]);
        let mut flipped = b.to_vec();
        flipped[cut] ^= 0x20;
        let _ = Diff::parse(&flipped).map(|x| x.check(&allow()));
    }
}

/// What real `git diff --binary` prints parses, and its stats are right.
#[test]
fn real_git_diffs_parse() {
    let d = tempfile::tempdir().unwrap();
    let git = |args: &[&str]| {
        let out = std::process::Command::new("git")
            .args([
                "-c",
                "user.name=t",
                "-c",
                "user.email=t@t",
                "-c",
                "core.hooksPath=/dev/null",
            ])
            .args(args)
            .current_dir(d.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    };
    git(&["init", "-q"]);
    std::fs::create_dir_all(d.path().join("src")).unwrap();
    std::fs::create_dir_all(d.path().join("bin")).unwrap();
    std::fs::write(
        d.path().join("src/a.py"),
        "one\ntwo\nthree\nfour\nfive\nsix\n",
    )
    .unwrap();
    std::fs::write(d.path().join("src/old.py"), "x\n").unwrap();
    std::fs::write(d.path().join("bin/run"), "#!/bin/sh\n").unwrap();
    std::fs::write(d.path().join("src/mv.py"), "a\nb\nc\nd\ne\nf\ng\nh\n").unwrap();
    git(&["add", "-A"]);
    git(&["commit", "-qm", "base"]);
    std::fs::write(
        d.path().join("src/a.py"),
        "one\n2\nthree\nfour\nfive\nsix\nseven",
    )
    .unwrap();
    std::fs::remove_file(d.path().join("src/old.py")).unwrap();
    std::fs::write(d.path().join("src/blob.bin"), [0u8, 1, 2, 255, 254, 0, 7]).unwrap();
    std::fs::write(d.path().join("src/with space.py"), "s\n").unwrap();
    std::fs::rename(d.path().join("src/mv.py"), d.path().join("src/moved.py")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        d.path().join("bin/run"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    git(&["add", "-A"]);
    let out = git(&["diff", "--binary", "-M", "--cached", "HEAD"]);
    let diff =
        Diff::parse(&out).unwrap_or_else(|e| panic!("{e}\n{}", String::from_utf8_lossy(&out)));
    diff.check(&allow()).unwrap();
    let mut paths = diff.changed_paths();
    paths.sort();
    assert_eq!(
        paths,
        vec![
            "bin/run",
            "src/a.py",
            "src/blob.bin",
            "src/moved.py",
            "src/with space.py"
        ]
    );
    assert!(diff.files.iter().any(|f| f.rename));
    assert!(diff.files.iter().any(|f| f.binary));
    assert!(
        diff.files.iter().any(|f| f.new_path.is_none()),
        "the deletion"
    );
    // A symlink made by git is refused.
    std::os::unix::fs::symlink("/etc/passwd", d.path().join("src/link")).unwrap();
    git(&["add", "-A"]);
    let out = git(&["diff", "--binary", "-M", "--cached", "HEAD"]);
    assert_eq!(
        Diff::parse(&out).unwrap().check(&allow()).unwrap_err(),
        Rejection::Symlink {
            path: "src/link".into()
        }
    );
}
