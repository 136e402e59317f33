//! VM tier: images built from recipes in a builder VM (root, TCG).
#![cfg(feature = "test-hooks")]

mod common;

use std::path::Path;

use common::*;

fn build(home: &Path, recipe: &Path) -> (bool, String, String) {
    let out = run(
        home,
        &["image", "build", "--recipe", recipe.to_str().unwrap()],
    );
    (
        out.status.success(),
        text(&out.stdout).trim().to_string(),
        text(&out.stderr),
    )
}

fn count_certs(pem: &str) -> usize {
    pem.matches("-----BEGIN CERTIFICATE-----").count()
}

/// A recipe's files, env, certificates and run steps end up in an image
/// whose clones see them; its steps ran in a VM, not here; an unchanged
/// recipe is a cache hit and a changed file rebuilds only the recipe.
#[test]
fn vm_recipe_builds_an_image_in_a_builder_vm_and_caches_it() {
    let home = private_home_own_snapshots();
    let dir = tempfile::tempdir().unwrap();
    let token = format!("tok{}", std::process::id());
    let host_marker = format!("/tmp/dough-recipe-host-{token}");
    std::fs::write(dir.path().join("note.txt"), format!("note {token}\n")).unwrap();
    let recipe = dir.path().join("demo.toml");
    std::fs::write(
        &recipe,
        format!(
            r#"
name = "demo"
ca = "host"
run = [
  "echo step-one-says-$TOKEN",
  "mkdir -p /opt/demo && echo \"$TOKEN\" > /opt/demo/marker && touch {host_marker}",
  "dd if=/dev/zero of=/opt/demo/junk bs=1M count=64 status=none && rm /opt/demo/junk",
]
[env]
TOKEN = "{token}"
[[files]]
src = "note.txt"
dest = "/etc/demo/note"
mode = "0600"
[build]
mem_mib = 512
size_gib = 2
"#
        ),
    )
    .unwrap();

    let (ok, id, err) = build(home.path(), &recipe);
    assert!(ok, "{err}");
    for want in [
        "[recipe 1/7] boot the builder VM",
        "trust the recipe's certificates",
        "copy the recipe's files in",
        &format!("step-one-says-{token}"),
        "settle the filesystem",
    ] {
        assert!(err.contains(want), "{want:?} missing from:\n{err}");
    }
    assert!(
        !Path::new(&host_marker).exists(),
        "a run step touched the host"
    );
    assert!(vm_dirs(home.path()).is_empty(), "the builder VM is gone");

    // The image: listed with its recipe, its root filesystem sparse (the
    // 64 MiB written and removed were discarded).
    let ls = text(&run(home.path(), &["image", "ls"]).stdout);
    let line = ls.lines().find(|l| l.starts_with(&id)).expect("listed");
    assert!(line.contains("demo on "), "{line}");
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(home.path().join(format!("images/{id}.json"))).unwrap(),
    )
    .unwrap();
    let rootfs = Path::new(manifest["rootfs"].as_str().unwrap());
    let base: serde_json::Value = serde_json::from_slice(
        &std::fs::read(home.path().join(format!(
            "images/{}.json",
            manifest["recipe"]["base"].as_str().unwrap()
        )))
        .unwrap(),
    )
    .unwrap();
    let base_used =
        dough_image::allocated_bytes(Path::new(base["rootfs"].as_str().unwrap())).unwrap();
    let used = dough_image::allocated_bytes(rootfs).unwrap();
    assert_eq!(std::fs::metadata(rootfs).unwrap().len(), 2 << 30);
    assert!(
        used < base_used + (48 << 20),
        "freed blocks were not discarded: {used} bytes used, base {base_used}"
    );

    // A clone of it sees everything the recipe put there.
    let script = "cat /etc/demo/note /opt/demo/marker; stat -c %a /etc/demo/note; \
                  echo \"env=$TOKEN\"; cat \"$NODE_EXTRA_CA_CERTS\"";
    let out = run(
        home.path(),
        &[
            "run", "--image", &id, "--net", "none", "--", "sh", "-c", script,
        ],
    );
    let said = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let host_bundle = std::fs::read_to_string(dough_image::recipe::HOST_CA_BUNDLE).unwrap();
    assert!(
        said.starts_with(&format!("note {token}\n{token}\n600\nenv={token}\n")),
        "{said}"
    );
    assert_eq!(count_certs(&said), count_certs(&host_bundle), "{said}");

    // Unchanged: a cache hit, no VM.
    let (ok, again, err) = build(home.path(), &recipe);
    assert!(ok, "{err}");
    assert_eq!(again, id);
    assert!(err.contains("[recipe] cached"), "{err}");
    assert!(!err.contains("builder VM"), "{err}");

    // A file changed: the recipe rebuilds, its base does not.
    std::fs::write(dir.path().join("note.txt"), "changed\n").unwrap();
    let (ok, changed, err) = build(home.path(), &recipe);
    assert!(ok, "{err}");
    assert_ne!(changed, id);
    assert!(err.contains("is up to date; nothing to build"), "{err}");
    assert!(err.contains("[recipe 1/7] boot the builder VM"), "{err}");
}

/// A failing step fails the build with the step named; nothing is left:
/// no image, no VM, no half-made cache entry.
#[test]
fn vm_recipe_step_failure_names_the_step_and_leaves_nothing() {
    let home = private_home_own_snapshots();
    let dir = tempfile::tempdir().unwrap();
    let recipe = dir.path().join("bad.toml");
    std::fs::write(
        &recipe,
        "run = [\"true\", \"echo about to fail; exit 3\", \"echo never\"]\n\
         [build]\nmem_mib = 512\nsize_gib = 1\negress = \"none\"\n",
    )
    .unwrap();
    let before = std::fs::read_dir(home.path().join("images"))
        .unwrap()
        .count();
    let (ok, _, err) = build(home.path(), &recipe);
    assert!(!ok);
    assert!(
        err.contains("run step 2 (`echo about to fail; exit 3`) exited with code 3"),
        "{err}"
    );
    assert!(err.contains("about to fail"), "{err}");
    assert!(!err.contains("never"), "{err}");
    assert_eq!(
        std::fs::read_dir(home.path().join("images"))
            .unwrap()
            .count(),
        before
    );
    assert!(vm_dirs(home.path()).is_empty());
    let recipes = home.path().join("cache/recipe");
    let left: Vec<_> = std::fs::read_dir(&recipes)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");

    // A recipe that is wrong on its face never boots anything.
    std::fs::write(&recipe, "run = [\"true\"]\n[build]\nsize_gib = 0\n").unwrap();
    let (ok, _, err) = build(home.path(), &recipe);
    assert!(!ok);
    assert!(err.contains("build.size_gib 0"), "{err}");
    assert!(!err.contains("builder VM"), "{err}");
}
