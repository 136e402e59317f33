//! The image cache: a second build with the same inputs does nothing; a
//! changed agent rebuilds only the initramfs.

mod common;

use common::*;

#[test]
fn image_cache_hits_and_agent_change_rebuilds_only_initramfs() {
    let shared = shared_home();
    let agent = std::env::var("DOUGH_AGENT").expect("DOUGH_AGENT is set by scripts/test");
    let home = tempfile::tempdir().unwrap();
    // Share the expensive kernel and rootfs cache entries with the suite's home.
    let cache = home.path().join("cache");
    std::fs::create_dir_all(&cache).unwrap();
    for kind in ["kernel", "rootfs"] {
        std::os::unix::fs::symlink(shared.join("cache").join(kind), cache.join(kind)).unwrap();
    }
    let build = |agent: &str| {
        let out = dough(home.path())
            .args(["image", "build", "--agent", agent])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        (text(&out.stdout).trim().to_string(), text(&out.stderr))
    };
    let (id1, log) = build(&agent);
    assert!(
        log.contains("[kernel] cached") && log.contains("[rootfs] cached"),
        "{log}"
    );
    assert!(log.contains("[initramfs] built"), "{log}");
    let (id2, log) = build(&agent);
    assert_eq!(id1, id2);
    assert!(log.contains("up to date; nothing to build"), "{log}");
    assert!(!log.contains("built"), "{log}");

    // Same program, different bytes: appended data does not change how it runs.
    let changed = home.path().join("agent-changed");
    let mut bytes = std::fs::read(&agent).unwrap();
    bytes.extend_from_slice(b"dough-test-padding");
    std::fs::write(&changed, bytes).unwrap();
    let (id3, log) = build(changed.to_str().unwrap());
    assert_ne!(id3, id1);
    assert!(
        log.contains("[kernel] cached") && log.contains("[rootfs] cached"),
        "{log}"
    );
    assert!(log.contains("[initramfs] built"), "{log}");

    let ls = dough(home.path()).args(["image", "ls"]).output().unwrap();
    let ls = text(&ls.stdout);
    assert!(ls.contains(&id1) && ls.contains(&id3), "{ls}");
    assert!(
        ls.lines().any(|l| l.starts_with(&id3) && l.contains('*')),
        "newest is current: {ls}"
    );
}

#[test]
fn image_build_refuses_a_dynamic_agent() {
    let home = tempfile::tempdir().unwrap();
    let out = dough(home.path())
        .args(["image", "build", "--agent", env!("CARGO_BIN_EXE_dough")])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    assert!(
        text(&out.stderr).contains("dynamically linked"),
        "{}",
        text(&out.stderr)
    );
}
