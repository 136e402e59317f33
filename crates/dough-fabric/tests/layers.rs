//! The fabric's modules depend on each other one way only, bottom to top;
//! this fails when a module reaches up (or sideways into a cycle). The
//! order is the one docs/design.md draws.

use std::collections::BTreeMap;
use std::path::Path;

/// Bottom first. A module may use only modules listed before it.
const ORDER: &[&str] = &[
    "host", "disk", "cgroup", "notice", "serial", "options", "channel", "state", "backend", "vm",
    "reaper", "snapshot", "live", "builder", "accel", "gc", "pool",
];

/// `crate::<module>` names a source file uses (the root's re-exports of
/// `host` count as `host`).
fn uses(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (i, _) in text.match_indices("crate::") {
        let rest = &text[i + "crate::".len()..];
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || *c == '_')
            .collect();
        let name = match name.as_str() {
            "new_vm_id" | "fill_random" => "host".to_string(),
            n => n.to_string(),
        };
        if !name.is_empty() {
            out.push(name);
        }
    }
    out
}

#[test]
fn modules_only_use_modules_below_them() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files: BTreeMap<String, String> = BTreeMap::new();
    for e in std::fs::read_dir(&src).unwrap().flatten() {
        let p = e.path();
        let name = p.file_stem().unwrap().to_string_lossy().into_owned();
        if p.is_dir() {
            for f in std::fs::read_dir(&p).unwrap().flatten() {
                let text = std::fs::read_to_string(f.path()).unwrap();
                files.entry(name.clone()).or_default().push_str(&text);
            }
        } else if name != "lib" {
            files.insert(name, std::fs::read_to_string(&p).unwrap());
        }
    }
    let rank = |m: &str| ORDER.iter().position(|x| *x == m);
    let mut wrong = Vec::new();
    for (module, text) in &files {
        let Some(r) = rank(module) else {
            wrong.push(format!("{module} is not in the layer order: place it"));
            continue;
        };
        for used in uses(text) {
            if used == *module {
                continue;
            }
            match rank(&used) {
                Some(u) if u < r => {}
                _ => wrong.push(format!("{module} uses {used}, which is not below it")),
            }
        }
    }
    wrong.sort();
    wrong.dedup();
    assert!(wrong.is_empty(), "{wrong:#?}");
}
