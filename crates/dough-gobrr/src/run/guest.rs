//! The shell gobrr runs inside clones, and where things live there.

/// Where the tree lives inside a clone.
pub const REPO: &str = "/work/repo";
pub const ORDER: &str = "/work/order.md";

pub(super) fn sh(script: &str) -> Vec<String> {
    vec!["sh".into(), "-c".into(), script.into()]
}

/// Unpack a tar on stdin as the repo, and make it a git repo whose HEAD is
/// that tree (the agent's diff is taken against it).
pub(super) const SHIP: &str = "set -e; rm -rf /work/repo; mkdir -p /work/repo; cd /work/repo; tar -x; \
git init -q; git add -A; git -c user.name=dough -c user.email=dough@localhost commit -qm base --allow-empty";

/// Unpack the candidate tree and make it read-only (HOME and /tmp stay
/// writable tmpfs).
pub(super) const SHIP_RO: &str =
    "set -e; rm -rf /work/repo; mkdir -p /work/repo /tmp/home; cd /work/repo; tar -x; \
mount --bind /work/repo /work/repo; mount -o remount,bind,ro /work/repo";

/// In a fork of a round's workspace (the round's tree and what the setup
/// made, committed as HEAD): apply a diff on stdin (the candidate's, or
/// the round's stacked changes), then make the tree read-only as
/// [`SHIP_RO`] does.
pub(super) const APPLY_RO: &str = "set -e; mkdir -p /tmp/home; cd /work/repo; \
git apply --index --binary --whitespace=nowarn; \
mount --bind /work/repo /work/repo; mount -o remount,bind,ro /work/repo";

/// The same with nothing to apply.
pub(super) const KEEP_RO: &str =
    "set -e; mkdir -p /tmp/home; mount --bind /work/repo /work/repo; mount -o remount,bind,ro /work/repo";

/// After a round's setup: what it made becomes the base (HEAD) that the
/// agents' diffs are taken against.
pub(super) const COMMIT_SETUP: &str = "set -e; cd /work/repo; git add -A; \
git -c user.name=dough -c user.email=dough@localhost commit -qm setup --allow-empty";

pub(super) const TAKE_DIFF: &str = "cd /work/repo && git add -A && git diff --binary --cached HEAD";

/// Environment of commands in a gate: HOME on the guest's tmpfs, and no
/// bytecode written next to the read-only tree.
pub(super) fn gate_env() -> Vec<(String, String)> {
    vec![
        ("HOME".to_string(), "/tmp/home".to_string()),
        ("PYTHONDONTWRITEBYTECODE".to_string(), "1".to_string()),
    ]
}
