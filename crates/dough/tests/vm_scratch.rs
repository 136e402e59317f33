//! VM tier: each clone's writable layer is a scratch disk of its own (a
//! sparse file in its VM directory), so a workspace may be larger than the
//! guest's memory; `--scratch none` keeps it in RAM.
#![cfg(feature = "test-hooks")]

mod common;

use common::*;

/// Writes 600 MiB in a 256 MiB guest.
const BIG_WRITE: &str = "dd if=/dev/urandom of=/root/big bs=1M count=600 status=none && \
                         sync && stat -c %s /root/big";

#[test]
fn vm_scratch_each_clone_has_its_own_disk_larger_than_its_memory() {
    let home = private_home();
    let h = home.path();
    let out = run(h, &["up", "2", "--net", "none", "--scratch", "2G"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let ids: Vec<String> = text(&out.stdout).lines().map(str::to_string).collect();
    let (a, b) = (&ids[0], &ids[1]);

    let out = run(h, &["exec", a, "--", "sh", "-c", BIG_WRITE]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), (600u64 << 20).to_string());
    let out = run(
        h,
        &[
            "exec",
            a,
            "--",
            "sh",
            "-c",
            "df -m / | tail -1; grep MemTotal /proc/meminfo",
        ],
    );
    let said = text(&out.stdout);
    let size_mib: u64 = said.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!((1900..=2048).contains(&size_mib), "{said}");

    // Its neighbour sees none of it.
    let out = run(
        h,
        &[
            "exec",
            b,
            "--",
            "sh",
            "-c",
            "test ! -e /root/big && echo clean",
        ],
    );
    assert_eq!(text(&out.stdout).trim(), "clean", "{}", text(&out.stderr));

    // Shown in ps; on the host it is the clone's own sparse file.
    let vms = ps(h);
    let used = |id: &str| {
        let v = vms.iter().find(|v| v["id"] == id).unwrap();
        assert_eq!(v["scratch_mib"], 2048);
        v["scratch_used_kib"].as_u64().unwrap()
    };
    assert!(used(a) > 550 << 10, "{vms:#?}");
    assert!(used(b) < 64 << 10, "{vms:#?}");
    let disk = h.join("vms").join(a).join("scratch.img");
    assert_eq!(std::fs::metadata(&disk).unwrap().len(), 2 << 30);
    // Its VMM may write no file larger than the disk (the console log
    // included: docs/threat-model.md).
    let pid = vms[0]["vmm"]["pid"].as_i64().unwrap();
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let cap = limits
        .lines()
        .find(|l| l.starts_with("Max file size"))
        .unwrap();
    assert!(cap.contains(&(2u64 << 30).to_string()), "{cap}");
    let table = text(&run(h, &["ps"]).stdout);
    assert!(table.contains("/2G"), "{table}");

    // It goes with its clone.
    let out = run(h, &["down", a]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(!disk.exists());
    assert!(!h.join("vms").join(a).exists());
}

#[test]
fn vm_scratch_none_keeps_the_writable_layer_in_memory() {
    let home = private_home();
    let out = run(
        home.path(),
        &[
            "run",
            "--net",
            "none",
            "--scratch",
            "none",
            "--",
            "sh",
            "-c",
            BIG_WRITE,
        ],
    );
    assert!(
        !out.status.success(),
        "600 MiB fit in a 256 MiB guest's RAM?"
    );
    assert!(
        text(&out.stderr).contains("No space left on device"),
        "{}",
        text(&out.stderr)
    );
    assert!(vm_dirs(home.path()).is_empty());
}
