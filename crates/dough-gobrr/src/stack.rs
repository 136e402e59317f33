//! Stacking green results: accepted diffs are applied, as data, in a git
//! worktree of dough's own (never the user's checkout) and committed one
//! task per commit, in plan order. The base advances with each commit.
//!
//! git runs with hooks disabled and without system or global config, so
//! nothing an agent wrote — and no hook of the user's — runs on the host.
//! Commits are deterministic: fixed identity, and dates taken from the run's
//! base commit, so the same plan and the same agent outputs give the same
//! commit ids.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

#[derive(Debug, thiserror::Error)]
pub enum StackError {
    /// What git actually changed breaks a rule (defence in depth behind
    /// the diff parser).
    #[error("after applying, git reports: {0}")]
    Rejected(crate::diff::Rejection),
    #[error("git {args}: {stderr}")]
    Git { args: String, stderr: String },
    #[error("running git")]
    Io(#[from] std::io::Error),
    #[error("branch {0} already exists in the repo (pick another run id)")]
    BranchExists(String),
}

/// Identity of dough's commits.
pub const AUTHOR: (&str, &str) = ("dough", "dough@localhost");

/// A git command hardened for agent-authored content: no hooks, no
/// fsmonitor, no system/global config, no pager or prompts.
fn git(dir: &Path) -> Command {
    let mut c = Command::new("git");
    c.current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_TERMINAL_PROMPT", "0")
        .env_remove("GIT_DIR")
        .env_remove("GIT_WORK_TREE")
        .env_remove("GIT_INDEX_FILE")
        .args([
            "-c",
            "core.hooksPath=/dev/null",
            "-c",
            "core.fsmonitor=false",
            "-c",
            "core.attributesFile=/dev/null",
            "-c",
            "commit.gpgSign=false",
        ]);
    c
}

fn run(mut c: Command, stdin: Option<&[u8]>) -> Result<String, StackError> {
    let args = format!("{:?}", c.get_args().collect::<Vec<_>>());
    c.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = c.spawn()?;
    if let Some(data) = stdin {
        child.stdin.take().expect("piped").write_all(data)?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        return Err(StackError::Git {
            args,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Check what git itself says an applied diff changed — every path and
/// mode of `git diff --cached --raw -z --no-renames HEAD` — against the rules
/// and `allow`. `index` is a scratch index file, if any.
fn verify_cached(
    dir: &Path,
    index: Option<&Path>,
    allow: &[crate::glob::Glob],
) -> Result<(), StackError> {
    use crate::diff::{check_path, Rejection};
    let mut c = git(dir);
    if let Some(i) = index {
        c.env("GIT_INDEX_FILE", i);
    }
    c.args([
        "diff",
        "--cached",
        "--raw",
        "-z",
        "--no-renames",
        "--no-abbrev",
        "HEAD",
    ]);
    let out = c.output()?;
    if !out.status.success() {
        return Err(StackError::Git {
            args: "diff --cached --raw".into(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    // Records: ":<old mode> <new mode> <old> <new> <status>\0<path>\0".
    let mut fields = out.stdout.split(|b| *b == 0).filter(|f| !f.is_empty());
    while let Some(meta) = fields.next() {
        let meta = String::from_utf8_lossy(meta);
        let path = fields
            .next()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .unwrap_or_default();
        check_path(&path).map_err(StackError::Rejected)?;
        if !allow.iter().any(|g| g.matches(&path)) {
            return Err(StackError::Rejected(Rejection::NotAllowed { path }));
        }
        let modes: Vec<&str> = meta.trim_start_matches(':').split(' ').take(2).collect();
        for m in modes {
            match m {
                "000000" | "100644" | "100755" => {}
                "120000" => return Err(StackError::Rejected(Rejection::Symlink { path })),
                "160000" => return Err(StackError::Rejected(Rejection::Submodule { path })),
                m => {
                    return Err(StackError::Rejected(Rejection::Mode {
                        path,
                        mode: m.to_string(),
                    }))
                }
            }
        }
    }
    Ok(())
}

/// dough's worktree for one run, on branch `dough/<run-id>`.
#[derive(Debug)]
pub struct Worktree {
    pub repo: PathBuf,
    pub dir: PathBuf,
    pub branch: String,
    /// Seconds since the epoch of the base commit: every commit's date.
    date: String,
}

impl Worktree {
    /// Add a worktree at `dir` on a new branch `dough/<run_id>` at `base`.
    pub fn create(
        repo: &Path,
        dir: &Path,
        base: &str,
        run_id: &str,
    ) -> Result<Worktree, StackError> {
        let branch = format!("dough/{run_id}");
        let mut c = git(repo);
        c.args(["rev-parse", "--verify", "--quiet"])
            .arg(format!("refs/heads/{branch}"));
        if run(c, None).is_ok() {
            return Err(StackError::BranchExists(branch));
        }
        let mut c = git(repo);
        c.args(["worktree", "add", "--quiet", "-b", &branch])
            .arg(dir)
            .arg(base);
        run(c, None)?;
        let mut c = git(dir);
        c.args(["log", "-1", "--format=%ct", "HEAD"]);
        let date = run(c, None)?;
        Ok(Worktree {
            repo: repo.to_path_buf(),
            dir: dir.to_path_buf(),
            branch,
            date,
        })
    }

    pub fn head(&self) -> Result<String, StackError> {
        let mut c = git(&self.dir);
        c.args(["rev-parse", "HEAD"]);
        run(c, None)
    }

    /// Apply a diff (already parsed and checked against the task's
    /// allowlist) to the index and tree. On failure nothing is left
    /// changed.
    pub fn apply(&self, diff: &[u8], allow: &[crate::glob::Glob]) -> Result<(), StackError> {
        let mut c = git(&self.dir);
        // --index: the index must match; git apply itself also refuses to
        // follow symlinks out of the tree.
        c.args(["apply", "--index", "--binary", "--whitespace=nowarn", "-"]);
        let r = run(c, Some(diff))
            .map(drop)
            .and_then(|_| verify_cached(&self.dir, None, allow));
        if r.is_err() {
            self.reset()?;
        }
        r
    }

    /// Commit what is applied; returns the new commit id.
    pub fn commit(&self, message: &str) -> Result<String, StackError> {
        let date = format!("@{} +0000", self.date);
        let mut c = git(&self.dir);
        c.env("GIT_AUTHOR_NAME", AUTHOR.0)
            .env("GIT_AUTHOR_EMAIL", AUTHOR.1)
            .env("GIT_COMMITTER_NAME", AUTHOR.0)
            .env("GIT_COMMITTER_EMAIL", AUTHOR.1)
            .env("GIT_AUTHOR_DATE", &date)
            .env("GIT_COMMITTER_DATE", &date)
            .args([
                "commit",
                "--quiet",
                "--no-verify",
                "--allow-empty-message",
                "-F",
                "-",
            ]);
        run(c, Some(message.as_bytes()))?;
        self.head()
    }

    /// Throw away anything not committed.
    pub fn reset(&self) -> Result<(), StackError> {
        let mut c = git(&self.dir);
        c.args(["reset", "--quiet", "--hard", "HEAD"]);
        run(c, None)?;
        let mut c = git(&self.dir);
        c.args(["clean", "-fdq"]);
        run(c, None).map(drop)
    }

    /// The tree at HEAD as a tar stream (to ship into a VM).
    pub fn archive(&self) -> Result<Vec<u8>, StackError> {
        self.tar_of("HEAD")
    }

    /// `git archive` of a commit or tree, as bytes (binary: not through
    /// [`run`], which returns text).
    fn tar_of(&self, treeish: &str) -> Result<Vec<u8>, StackError> {
        let mut c = git(&self.dir);
        c.args(["archive", "--format=tar", treeish]);
        let out = c.output()?;
        if !out.status.success() {
            return Err(StackError::Git {
                args: format!("archive {treeish}"),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(out.stdout)
    }

    /// The tree of HEAD with `diff` applied, as a tar stream, without
    /// touching the worktree, its index or the branch (a scratch index).
    pub fn candidate_archive(
        &self,
        diff: &[u8],
        allow: &[crate::glob::Glob],
    ) -> Result<Vec<u8>, StackError> {
        let index = tempfile::NamedTempFile::new()?;
        let with_index = |args: &[&str]| {
            let mut c = git(&self.dir);
            c.env("GIT_INDEX_FILE", index.path()).args(args);
            c
        };
        run(with_index(&["read-tree", "HEAD"]), None)?;
        run(
            with_index(&["apply", "--cached", "--binary", "--whitespace=nowarn", "-"]),
            Some(diff),
        )?;
        verify_cached(&self.dir, Some(index.path()), allow)?;
        let tree = run(with_index(&["write-tree"]), None)?;
        self.tar_of(&tree)
    }

    /// Remove the worktree (the branch and its commits stay).
    pub fn remove(self) -> Result<(), StackError> {
        let mut c = git(&self.repo);
        c.args(["worktree", "remove", "--force"]).arg(&self.dir);
        run(c, None).map(drop)
    }
}

/// The commit message of a green task.
pub fn commit_message(task_id: &str, title: &str, attempts: u32, run_id: &str) -> String {
    format!(
        "{task_id}: {title}\n\ngobrr run {run_id}, task {task_id}, green after {attempts} attempt{}.\n",
        if attempts == 1 { "" } else { "s" }
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn any() -> Vec<crate::glob::Glob> {
        vec![crate::glob::Glob::new("src/**").unwrap()]
    }

    /// Run git in `dir` for a test; its trimmed stdout.
    pub(crate) fn sh(dir: &Path, args: &[&str]) -> String {
        let out = Command::new("git")
            .args(["-c", "user.name=u", "-c", "user.email=u@u"])
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// A user's repo with a hook that would leave a marker if it ever ran.
    /// A repo on `main` with one commit ("base") holding `src/a.py`.
    pub(crate) fn base_repo() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        sh(r, &["init", "-q", "-b", "main"]);
        std::fs::create_dir_all(r.join("src")).unwrap();
        std::fs::write(r.join("src/a.py"), "a = 1\n").unwrap();
        sh(r, &["add", "-A"]);
        sh(r, &["commit", "-qm", "base"]);
        d
    }

    fn user_repo() -> tempfile::TempDir {
        let d = base_repo();
        let r = d.path();
        let marker = r.join("HOOK_RAN");
        for hook in ["pre-commit", "post-commit", "post-checkout", "commit-msg"] {
            let p = r.join(".git/hooks").join(hook);
            std::fs::write(&p, format!("#!/bin/sh\ntouch {}\n", marker.display())).unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        d
    }

    const DIFF_A: &str = "diff --git a/src/a.py b/src/a.py\nindex 1111111..2222222 100644\n--- a/src/a.py\n+++ b/src/a.py\n@@ -1 +1 @@\n-a = 1\n+a = 2\n";
    const DIFF_B: &str = "diff --git a/src/b.py b/src/b.py\nnew file mode 100644\n--- /dev/null\n+++ b/src/b.py\n@@ -0,0 +1 @@\n+b = 1\n";

    fn stack(repo: &Path, wt: &Path) -> (Worktree, Vec<String>) {
        let w = Worktree::create(repo, wt, "main", "r1").unwrap();
        let mut ids = Vec::new();
        for (id, d) in [("a", DIFF_A), ("b", DIFF_B)] {
            w.apply(d.as_bytes(), &any()).unwrap();
            ids.push(w.commit(&commit_message(id, "T", 1, "r1")).unwrap());
        }
        (w, ids)
    }

    #[test]
    fn commits_stack_in_order_deterministically_without_hooks() {
        let u = user_repo();
        let r = u.path();
        let wt = tempfile::tempdir().unwrap();
        let (w, ids) = stack(r, &wt.path().join("w"));
        assert_eq!(
            sh(r, &["log", "--format=%s", "dough/r1"]),
            "b: T\na: T\nbase"
        );
        assert_eq!(
            sh(r, &["log", "-1", "--format=%an <%ae>", "dough/r1"]),
            "dough <dough@localhost>"
        );
        assert!(!r.join("HOOK_RAN").exists(), "no hook of the user's ran");
        // The user's checkout is untouched.
        assert_eq!(sh(r, &["rev-parse", "--abbrev-ref", "HEAD"]), "main");
        assert_eq!(
            std::fs::read_to_string(r.join("src/a.py")).unwrap(),
            "a = 1\n"
        );
        assert!(!r.join("src/b.py").exists());
        w.remove().unwrap();
        // The same base and the same diffs in a clone of the repo: the
        // same commit ids.
        let copy = tempfile::tempdir().unwrap();
        sh(copy.path(), &["clone", "-q", r.to_str().unwrap(), "c"]);
        let c = copy.path().join("c");
        let wt2 = tempfile::tempdir().unwrap();
        let w2 = Worktree::create(&c, &wt2.path().join("w"), "main", "r1").unwrap();
        let mut ids2 = Vec::new();
        for (id, d) in [("a", DIFF_A), ("b", DIFF_B)] {
            w2.apply(d.as_bytes(), &any()).unwrap();
            ids2.push(w2.commit(&commit_message(id, "T", 1, "r1")).unwrap());
        }
        assert_eq!(ids, ids2);
    }

    #[test]
    fn a_diff_that_does_not_apply_leaves_nothing_and_the_branch_can_go_on() {
        let u = user_repo();
        let wt = tempfile::tempdir().unwrap();
        let w = Worktree::create(u.path(), &wt.path().join("w"), "main", "r2").unwrap();
        let before = w.head().unwrap();
        let bad = DIFF_A.replace("-a = 1", "-a = 9");
        assert!(w.apply(bad.as_bytes(), &any()).is_err());
        assert_eq!(w.head().unwrap(), before);
        assert_eq!(
            std::fs::read_to_string(wt.path().join("w/src/a.py")).unwrap(),
            "a = 1\n"
        );
        w.apply(DIFF_B.as_bytes(), &any()).unwrap();
        w.commit("b").unwrap();
        assert!(Worktree::create(u.path(), &wt.path().join("w2"), "main", "r2").is_err());
    }

    #[test]
    fn what_git_applies_is_checked_again() {
        let u = user_repo();
        let wt = tempfile::tempdir().unwrap();
        let w = Worktree::create(u.path(), &wt.path().join("w"), "main", "r4").unwrap();
        // A diff the parser would never pass, handed straight to the
        // worktree: git's own report of the change is refused.
        let outside = "diff --git a/README.md b/README.md\nnew file mode 100644\n--- /dev/null\n+++ b/README.md\n@@ -0,0 +1 @@\n+x\n";
        let e = w.apply(outside.as_bytes(), &any()).unwrap_err();
        assert!(
            matches!(
                e,
                StackError::Rejected(crate::diff::Rejection::NotAllowed { .. })
            ),
            "{e}"
        );
        assert!(!wt.path().join("w/README.md").exists(), "rolled back");
        let link = "diff --git a/src/l b/src/l\nnew file mode 120000\n--- /dev/null\n+++ b/src/l\n@@ -0,0 +1 @@\n+/etc\n\\ No newline at end of file\n";
        let e = w.candidate_archive(link.as_bytes(), &any()).unwrap_err();
        assert!(
            matches!(
                e,
                StackError::Rejected(crate::diff::Rejection::Symlink { .. })
            ),
            "{e}"
        );
        assert_eq!(sh(&wt.path().join("w"), &["status", "--porcelain"]), "");
    }

    #[test]
    fn archive_is_a_tar_of_head() {
        let u = user_repo();
        let wt = tempfile::tempdir().unwrap();
        let w = Worktree::create(u.path(), &wt.path().join("w"), "main", "r3").unwrap();
        let tar = w.archive().unwrap();
        assert!(tar.len() >= 1024 && tar.windows(8).any(|x| x == b"src/a.py"));
    }
}
