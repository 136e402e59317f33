//! Stacking green results: accepted diffs are applied, as data, to git
//! objects of dough's own — a scratch index per step, never a checkout,
//! never the user's working tree — and committed one task per commit, in
//! plan order, on branch `dough/<run-id>`. The base advances with each
//! commit.
//!
//! Nothing in an agent's tree changes what the host's git does with it:
//! only plumbing that does not read attributes touches agent content
//! (`apply --cached` writes the patch's bytes as blobs, `write-tree`,
//! `commit-tree`), and the tree shipped to a gate is a tar dough writes
//! itself from the tree object — no `git archive`, so no `export-ignore`,
//! `export-subst`, eol conversion or filter. The gate sees exactly the
//! blobs that are committed. Nothing is checked out, so no smudge filter
//! or hook runs, and no worktree is registered in the user's repo.
//!
//! git runs with hooks disabled and without system or global config.
//! Commits are deterministic: fixed identity, and dates taken from the
//! run's base commit, so the same plan and the same agent outputs give the
//! same commit ids.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The most a tree shipped into a clone may hold: the sum of its files'
/// sizes, checked from the tree object before any blob is read.
pub const MAX_TREE_BYTES: u64 = 32 << 20;

/// The most entries such a tree may have (each costs a 512-byte tar
/// header and more, whatever its size).
pub const MAX_TREE_ENTRIES: usize = 65_536;

#[derive(Debug, thiserror::Error)]
pub enum StackError {
    /// What git actually changed breaks a rule (defence in depth behind
    /// the diff parser).
    #[error("after applying, git reports: {0}")]
    Rejected(crate::diff::Rejection),
    #[error("git {args}: {stderr}")]
    Git { args: String, stderr: String },
    #[error("cannot run git {args}")]
    Spawn {
        args: String,
        #[source]
        source: std::io::Error,
    },
    #[error("branch {0} already exists in the repo (pick another run id)")]
    BranchExists(String),
    #[error("branch {0} is not in the repo any more: the interrupted run cannot go on")]
    NoBranch(String),
    #[error(
        "the branch has commit {commit} for task {task}, which the run's record does not \
         have: the branch was changed outside dough"
    )]
    Unrecorded { task: String, commit: String },
    #[error(
        "the tree holds {size} bytes of files; at most {MAX_TREE_BYTES} are shipped into a clone"
    )]
    TreeTooLarge { size: u64 },
    #[error("the tree has more than {MAX_TREE_ENTRIES} entries; no more are shipped into a clone")]
    TooManyEntries,
    #[error("unexpected output from git {args}: {what}")]
    Unexpected { args: String, what: String },
    #[error("cannot write a tar of the tree")]
    Tar(#[source] std::io::Error),
    #[error("cannot create dough's scratch directory {path}")]
    Scratch {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Identity of dough's commits.
pub const AUTHOR: (&str, &str) = ("dough", "dough@localhost");

/// A git command on `git_dir`, hardened for agent-authored content: no
/// hooks, no fsmonitor, no system/global config, no attributes file, no
/// pager or prompts. It runs in `cwd` (dough's scratch directory: if git
/// ever looked for a work tree, it would find that empty one).
fn git(git_dir: &Path, cwd: &Path) -> Command {
    let mut c = Command::new("git");
    c.current_dir(cwd)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_DIR", git_dir)
        .env("GIT_WORK_TREE", cwd)
        // Replace refs and grafts would make `cat-file` (the gate's tar)
        // disagree with the trees that are committed.
        .env("GIT_NO_REPLACE_OBJECTS", "1")
        .env_remove("GIT_GRAFT_FILE")
        .env_remove("GIT_INDEX_FILE")
        .env_remove("GIT_OBJECT_DIRECTORY")
        .env_remove("GIT_ALTERNATE_OBJECT_DIRECTORIES")
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

fn args_of(c: &Command) -> String {
    c.get_args()
        .skip(8)
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Run `c` (with `stdin`, if any); its stdout as bytes.
fn run_bytes(mut c: Command, stdin: Option<&[u8]>) -> Result<Vec<u8>, StackError> {
    let args = args_of(&c);
    c.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let spawn = |source| StackError::Spawn {
        args: args.clone(),
        source,
    };
    let mut child = c.spawn().map_err(spawn)?;
    // Feed stdin from a thread: git may answer before it has read it all.
    let feeder = stdin.map(|data| {
        let mut pipe = child.stdin.take().expect("piped");
        let data = data.to_vec();
        std::thread::spawn(move || {
            let _ = pipe.write_all(&data);
        })
    });
    let out = child.wait_with_output().map_err(spawn)?;
    if let Some(f) = feeder {
        let _ = f.join();
    }
    if !out.status.success() {
        return Err(StackError::Git {
            args,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(out.stdout)
}

fn run(c: Command, stdin: Option<&[u8]>) -> Result<String, StackError> {
    run_bytes(c, stdin).map(|o| String::from_utf8_lossy(&o).trim().to_string())
}

/// Check what git itself says an applied diff changed — every path and
/// mode of `git diff-index --cached --raw -z --no-renames BASE` on the
/// scratch `index` — against the rules and `allow`. Returns the paths that
/// exist after the change (added or modified), as git names them.
fn verify_cached(
    git_dir: &Path,
    cwd: &Path,
    index: &Path,
    base: &str,
    allow: &[crate::glob::Glob],
) -> Result<Vec<String>, StackError> {
    use crate::diff::{check_path, Rejection};
    let mut c = git(git_dir, cwd);
    c.env("GIT_INDEX_FILE", index).args([
        "diff-index",
        "--cached",
        "--raw",
        "-z",
        "--no-renames",
        "--no-abbrev",
        base,
    ]);
    let out = run_bytes(c, None)?;
    // Records: ":<old mode> <new mode> <old> <new> <status>\0<path>\0".
    let mut fields = out.split(|b| *b == 0).filter(|f| !f.is_empty());
    let mut present = Vec::new();
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
        if modes.get(1).is_some_and(|m| *m != "000000") {
            present.push(path.clone());
        }
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
    Ok(present)
}

/// A diff applied to the stack's head, not yet committed: the tree object,
/// and the tar a gate gets — written from that tree, byte for byte.
#[derive(Debug)]
pub struct Candidate {
    pub tree: String,
    pub tar: Vec<u8>,
    /// Paths the diff added or modified, as git names them.
    pub changed: Vec<String>,
}

impl Candidate {
    /// Files of the candidate the diff added or modified, with their bytes
    /// exactly as the gate gets them and as they would be committed.
    pub fn changed_files(&self) -> Result<Vec<(String, Vec<u8>)>, StackError> {
        let changed: std::collections::HashSet<&str> =
            self.changed.iter().map(String::as_str).collect();
        let mut a = tar::Archive::new(&self.tar[..]);
        let mut out = Vec::new();
        for e in a.entries().map_err(StackError::Tar)? {
            let mut e = e.map_err(StackError::Tar)?;
            let path = e
                .path()
                .map_err(StackError::Tar)?
                .to_string_lossy()
                .into_owned();
            if changed.contains(path.as_str()) {
                let mut body = Vec::new();
                e.read_to_end(&mut body).map_err(StackError::Tar)?;
                out.push((path, body));
            }
        }
        Ok(out)
    }
}

/// dough's branch for one run, `dough/<run-id>`, and its scratch
/// directory (scratch index files; nothing checked out).
#[derive(Debug)]
pub struct Stack {
    pub repo: PathBuf,
    git_dir: PathBuf,
    scratch: PathBuf,
    pub branch: String,
    /// Seconds since the epoch of the base commit: every commit's date.
    date: String,
}

impl Stack {
    /// Create branch `dough/<run_id>` at `base` in `repo`, with `scratch`
    /// (created here) as dough's own directory for it.
    pub fn create(
        repo: &Path,
        scratch: &Path,
        base: &str,
        run_id: &str,
    ) -> Result<Stack, StackError> {
        Self::at(repo, scratch, base, run_id, true)
    }

    /// The branch `dough/<run_id>` an interrupted run made from `base`, to
    /// go on stacking on it (`scratch` is made again if it is gone).
    pub fn open(
        repo: &Path,
        scratch: &Path,
        base: &str,
        run_id: &str,
    ) -> Result<Stack, StackError> {
        Self::at(repo, scratch, base, run_id, false)
    }

    fn at(
        repo: &Path,
        scratch: &Path,
        base: &str,
        run_id: &str,
        create: bool,
    ) -> Result<Stack, StackError> {
        std::fs::create_dir_all(scratch).map_err(|source| StackError::Scratch {
            path: scratch.to_path_buf(),
            source,
        })?;
        let scratch = std::fs::canonicalize(scratch).map_err(|source| StackError::Scratch {
            path: scratch.to_path_buf(),
            source,
        })?;
        // Where the repo's git directory is, asked in the repo itself.
        let mut c = Command::new("git");
        c.current_dir(repo)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env_remove("GIT_DIR")
            .env_remove("GIT_WORK_TREE")
            .args(["rev-parse", "--git-common-dir"]);
        // The common directory (a linked worktree's own git dir has no
        // objects of its own); branches live there too.
        let common = PathBuf::from(run(c, None)?);
        let git_dir =
            std::fs::canonicalize(repo.join(&common)).map_err(|source| StackError::Scratch {
                path: repo.join(&common),
                source,
            })?;
        let branch = format!("dough/{run_id}");
        let g = |args: &[&str]| {
            let mut c = git(&git_dir, &scratch);
            c.args(args);
            c
        };
        let base = run(
            g(&[
                "rev-parse",
                "--verify",
                "--quiet",
                &format!("{base}^{{commit}}"),
            ]),
            None,
        )?;
        // Create the branch only if it does not exist (old value: none).
        let zero = "0".repeat(base.len());
        if !create {
            // A run killed while moving its branch leaves git's lock on
            // it; nothing else moves dough's branch of this run.
            let _ = std::fs::remove_file(git_dir.join(format!("refs/heads/{branch}.lock")));
            let r = format!("refs/heads/{branch}");
            run(g(&["rev-parse", "--verify", "--quiet", &r]), None)
                .map_err(|_| StackError::NoBranch(branch.clone()))?;
        } else if run(
            g(&["update-ref", &format!("refs/heads/{branch}"), &base, &zero]),
            None,
        )
        .is_err()
        {
            return Err(StackError::BranchExists(branch));
        }
        let date = run(g(&["log", "-1", "--format=%ct", &base]), None)?;
        // dough's own object store, reading the user's through an
        // alternates file (not the environment variable, which splits on
        // `:` and would break a repo path containing one).
        let info = scratch.join("objects/info");
        std::fs::create_dir_all(&info)
            .and_then(|_| {
                std::fs::write(
                    info.join("alternates"),
                    [
                        git_dir.join("objects").as_os_str().as_encoded_bytes(),
                        b"\n",
                    ]
                    .concat(),
                )
            })
            .map_err(|source| StackError::Scratch {
                path: info.clone(),
                source,
            })?;
        Ok(Stack {
            repo: repo.to_path_buf(),
            git_dir,
            scratch,
            branch,
            date,
        })
    }

    /// git on dough's own object store: objects it writes (blobs of every
    /// attempt, trees, commits) land in the scratch directory; the user's
    /// objects are read through it as an alternate. Only what is accepted
    /// is copied into the user's repo ([`Stack::commit_tree`]).
    fn git(&self) -> Command {
        let mut c = git(&self.git_dir, &self.scratch);
        c.env("GIT_OBJECT_DIRECTORY", self.scratch.join("objects"));
        c
    }

    /// git on the user's repo itself (its own object store).
    fn user_git(&self) -> Command {
        git(&self.git_dir, &self.scratch)
    }

    /// The branch's commit.
    pub fn head(&self) -> Result<String, StackError> {
        let mut c = self.git();
        c.args([
            "rev-parse",
            "--verify",
            &format!("refs/heads/{}", self.branch),
        ]);
        run(c, None)
    }

    /// `diff` applied to the head's tree in a scratch index (the branch and
    /// the user's repo untouched), checked again as git applied it, as a
    /// tree object.
    fn apply_to_head(
        &self,
        diff: &[u8],
        allow: &[crate::glob::Glob],
    ) -> Result<(String, String, Vec<String>), StackError> {
        let head = self.head()?;
        let index = tempfile::NamedTempFile::new_in(&self.scratch).map_err(|source| {
            StackError::Scratch {
                path: self.scratch.clone(),
                source,
            }
        })?;
        let with_index = |args: &[&str]| {
            let mut c = self.git();
            c.env("GIT_INDEX_FILE", index.path()).args(args);
            c
        };
        run(with_index(&["read-tree", &head]), None)?;
        run(
            with_index(&["apply", "--cached", "--binary", "--whitespace=nowarn", "-"]),
            Some(diff),
        )?;
        let changed = verify_cached(&self.git_dir, &self.scratch, index.path(), &head, allow)?;
        let tree = run(with_index(&["write-tree"]), None)?;
        Ok((head, tree, changed))
    }

    /// The head's tree with `diff` applied, and the tar of exactly that
    /// tree (what the gate checks).
    pub fn candidate(
        &self,
        diff: &[u8],
        allow: &[crate::glob::Glob],
    ) -> Result<Candidate, StackError> {
        let (_, tree, changed) = self.apply_to_head(diff, allow)?;
        let tar = self.tar_of(&tree)?;
        Ok(Candidate { tree, tar, changed })
    }

    /// Apply `diff` to the head and commit the result on the branch;
    /// returns the new commit id. On failure nothing changes.
    pub fn apply_and_commit(
        &self,
        diff: &[u8],
        allow: &[crate::glob::Glob],
        message: &str,
    ) -> Result<String, StackError> {
        let (head, tree, _) = self.apply_to_head(diff, allow)?;
        self.commit_tree(&head, &tree, message)
    }

    /// Commit `tree` on top of `parent` (the branch's head) and move the
    /// branch there, only if it is still at `parent`.
    fn commit_tree(&self, parent: &str, tree: &str, message: &str) -> Result<String, StackError> {
        let date = format!("@{} +0000", self.date);
        let mut c = self.git();
        c.env("GIT_AUTHOR_NAME", AUTHOR.0)
            .env("GIT_AUTHOR_EMAIL", AUTHOR.1)
            .env("GIT_COMMITTER_NAME", AUTHOR.0)
            .env("GIT_COMMITTER_EMAIL", AUTHOR.1)
            .env("GIT_AUTHOR_DATE", &date)
            .env("GIT_COMMITTER_DATE", &date)
            .args(["commit-tree", tree, "-p", parent, "-F", "-"]);
        let commit = run(c, Some(message.as_bytes()))?;
        // Accepted: copy the commit and what it adds into the user's repo
        // (a pack of `commit ^parent` from dough's store), then move the
        // branch there — its ref is checked against the user's own store.
        let mut c = self.git();
        c.args(["pack-objects", "--revs", "--stdout", "-q"]);
        let pack = run_bytes(c, Some(format!("{commit}\n^{parent}\n").as_bytes()))?;
        let mut c = self.user_git();
        c.args(["index-pack", "--stdin", "--fix-thin"]);
        run(c, Some(&pack))?;
        let mut c = self.user_git();
        c.args([
            "update-ref",
            &format!("refs/heads/{}", self.branch),
            &commit,
            parent,
        ]);
        run(c, None)?;
        Ok(commit)
    }

    /// The commit `rev` names in the repo.
    pub fn commit_of(&self, rev: &str) -> Result<String, StackError> {
        let mut c = self.user_git();
        c.args([
            "rev-parse",
            "--verify",
            "--quiet",
            &format!("{rev}^{{commit}}"),
        ]);
        run(c, None)
    }

    /// The tasks of run `run_id` committed on the branch since `base`: task
    /// id → commit (read from dough's own commit messages).
    pub fn task_commits(
        &self,
        base: &str,
        run_id: &str,
    ) -> Result<BTreeMap<String, String>, StackError> {
        let mut c = self.user_git();
        c.args([
            "log",
            "--format=%H%x00%B%x01",
            &format!("{base}..refs/heads/{}", self.branch),
        ]);
        let out = run(c, None)?;
        let mark = format!("gobrr run {run_id}, task ");
        let mut found = BTreeMap::new();
        for entry in out.split('\u{1}') {
            let Some((commit, body)) = entry.trim_start_matches('\n').split_once('\0') else {
                continue;
            };
            let task = body.lines().find_map(|l| {
                let rest = l.strip_prefix(&mark)?;
                Some(rest.split(',').next()?.to_string())
            });
            if let Some(t) = task {
                found.insert(t, commit.to_string());
            }
        }
        Ok(found)
    }

    /// The tree at the head as a tar stream (to ship into a VM).
    pub fn archive(&self) -> Result<Vec<u8>, StackError> {
        let head = self.head()?;
        self.tar_of(&format!("{head}^{{tree}}"))
    }

    /// A tar of `tree`, written by dough from the tree object: every file's
    /// bytes as stored (no attributes apply), symlinks as symlinks,
    /// submodules as empty directories. The total size is checked from the
    /// tree listing before any blob is read.
    fn tar_of(&self, tree: &str) -> Result<Vec<u8>, StackError> {
        let mut c = self.git();
        c.args(["ls-tree", "-r", "-z", "-l", "--full-tree", tree]);
        let listing = run_bytes(c, None)?;
        let unexpected = |what: &str| StackError::Unexpected {
            args: "ls-tree".into(),
            what: what.into(),
        };
        // "<mode> SP <type> SP <oid> SP+ <size>\t<path>"
        let mut entries = Vec::new();
        let mut total: u64 = 0;
        for rec in listing.split(|b| *b == 0).filter(|r| !r.is_empty()) {
            let tab = rec
                .iter()
                .position(|b| *b == b'\t')
                .ok_or_else(|| unexpected("a record without a tab"))?;
            let meta = std::str::from_utf8(&rec[..tab]).map_err(|_| unexpected("not UTF-8"))?;
            let path = rec[tab + 1..].to_vec();
            let mut f = meta.split_whitespace();
            let (Some(mode), Some(kind), Some(oid), Some(size)) =
                (f.next(), f.next(), f.next(), f.next())
            else {
                return Err(unexpected(meta));
            };
            if kind == "blob" {
                total = total.saturating_add(size.parse().map_err(|_| unexpected(meta))?);
                if total > MAX_TREE_BYTES {
                    return Err(StackError::TreeTooLarge { size: total });
                }
            }
            entries.push((mode.to_string(), kind.to_string(), oid.to_string(), path));
            if entries.len() > MAX_TREE_ENTRIES {
                return Err(StackError::TooManyEntries);
            }
        }
        // Blobs, streamed in listing order.
        let mut c = self.git();
        c.args(["cat-file", "--batch"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let spawn = |source| StackError::Spawn {
            args: "cat-file --batch".into(),
            source,
        };
        let mut child = c.spawn().map_err(spawn)?;
        let mut stdin = child.stdin.take().expect("piped");
        let oids: Vec<String> = entries
            .iter()
            .filter(|e| e.1 == "blob")
            .map(|e| e.2.clone())
            .collect();
        let feeder = std::thread::spawn(move || {
            for o in oids {
                if writeln!(stdin, "{o}").is_err() {
                    return;
                }
            }
        });
        let mut out = BufReader::new(child.stdout.take().expect("piped"));
        let mtime: u64 = self.date.parse().unwrap_or(0);
        let mut tar = tar::Builder::new(Vec::new());
        let result = (|| -> Result<(), StackError> {
            for (mode, kind, _oid, path) in &entries {
                let path = Path::new(std::ffi::OsStr::from_bytes(path));
                let mut h = tar::Header::new_gnu();
                h.set_mtime(mtime);
                h.set_uid(0);
                h.set_gid(0);
                if kind != "blob" {
                    // A submodule: an empty directory, as git archive does.
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_mode(0o755);
                    h.set_size(0);
                    tar.append_data(&mut h, path, std::io::empty())
                        .map_err(StackError::Tar)?;
                    continue;
                }
                let mut line = String::new();
                out.read_line(&mut line).map_err(StackError::Tar)?;
                let size: u64 = line
                    .trim_end()
                    .rsplit(' ')
                    .next()
                    .and_then(|n| n.parse().ok())
                    .ok_or_else(|| unexpected(&line))?;
                let mut body = (&mut out).take(size);
                match mode.as_str() {
                    "120000" => {
                        let mut target = Vec::new();
                        body.read_to_end(&mut target).map_err(StackError::Tar)?;
                        h.set_entry_type(tar::EntryType::Symlink);
                        h.set_mode(0o777);
                        h.set_size(0);
                        let target = std::ffi::OsStr::from_bytes(&target);
                        tar.append_link(&mut h, path, target)
                            .map_err(StackError::Tar)?;
                    }
                    m => {
                        h.set_entry_type(tar::EntryType::Regular);
                        h.set_mode(if m == "100755" { 0o755 } else { 0o644 });
                        h.set_size(size);
                        tar.append_data(&mut h, path, &mut body)
                            .map_err(StackError::Tar)?;
                    }
                }
                // The newline after each object.
                let mut nl = [0u8; 1];
                out.read_exact(&mut nl).map_err(StackError::Tar)?;
            }
            Ok(())
        })();
        drop(out);
        let _ = feeder.join();
        let status = child.wait().map_err(spawn)?;
        result?;
        if !status.success() {
            return Err(StackError::Git {
                args: "cat-file --batch".into(),
                stderr: status.to_string(),
            });
        }
        tar.into_inner().map_err(StackError::Tar)
    }

    /// Delete the branch if nothing was ever committed on it (a run that
    /// failed before it started), leaving the user's repo as it was.
    pub fn discard_if_empty(&self, base: &str) -> Result<(), StackError> {
        if self.head()? != base {
            return Ok(());
        }
        let mut c = self.user_git();
        c.args([
            "update-ref",
            "-d",
            &format!("refs/heads/{}", self.branch),
            base,
        ]);
        run(c, None).map(drop)
    }

    /// The branch's changes since `base`, as a patch (binary parts
    /// included), for showing: no external diff program, no textconv.
    pub fn diff_since(&self, base: &str) -> Result<Vec<u8>, StackError> {
        let mut c = self.user_git();
        c.args([
            "diff",
            "--no-ext-diff",
            "--no-textconv",
            "--no-color",
            "--binary",
            base,
            &format!("refs/heads/{}", self.branch),
        ]);
        run_bytes(c, None)
    }

    /// Delete the branch (whatever it holds; its commits stay in the
    /// object store until git collects them).
    pub fn delete_branch(&self) -> Result<(), StackError> {
        let head = self.head()?;
        let mut c = self.user_git();
        c.args([
            "update-ref",
            "-d",
            &format!("refs/heads/{}", self.branch),
            &head,
        ]);
        run(c, None).map(drop)
    }

    /// Remove dough's scratch directory (the branch and its commits stay).
    pub fn remove(self) -> Result<(), StackError> {
        std::fs::remove_dir_all(&self.scratch).map_err(|source| StackError::Scratch {
            path: self.scratch.clone(),
            source,
        })
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

    fn stack(repo: &Path, scratch: &Path) -> (Stack, Vec<String>) {
        let w = Stack::create(repo, scratch, "main", "r1").unwrap();
        let mut ids = Vec::new();
        for (id, d) in [("a", DIFF_A), ("b", DIFF_B)] {
            ids.push(
                w.apply_and_commit(d.as_bytes(), &any(), &commit_message(id, "T", 1, "r1"))
                    .unwrap(),
            );
        }
        (w, ids)
    }

    /// Every file of a tar: path → (bytes, or the link target; mode).
    fn untar(tar: &[u8]) -> std::collections::BTreeMap<String, (Vec<u8>, u32)> {
        let mut a = tar::Archive::new(tar);
        let mut m = std::collections::BTreeMap::new();
        for e in a.entries().unwrap() {
            let mut e = e.unwrap();
            let path = e.path().unwrap().to_string_lossy().into_owned();
            let mode = e.header().mode().unwrap();
            let body = match e.link_name().unwrap() {
                Some(t) => t.to_string_lossy().as_bytes().to_vec(),
                None => {
                    let mut b = Vec::new();
                    e.read_to_end(&mut b).unwrap();
                    b
                }
            };
            m.insert(path, (body, mode));
        }
        m
    }

    /// Every blob of a commit's tree, as git stores it: path → bytes.
    fn committed(repo: &Path, commit: &str) -> std::collections::BTreeMap<String, Vec<u8>> {
        sh(repo, &["ls-tree", "-r", "--name-only", commit])
            .lines()
            .map(|p| {
                let out = Command::new("git")
                    .args(["cat-file", "blob", &format!("{commit}:{p}")])
                    .current_dir(repo)
                    .output()
                    .unwrap();
                (p.to_string(), out.stdout)
            })
            .collect()
    }

    #[test]
    fn commits_stack_in_order_deterministically_without_hooks() {
        let u = user_repo();
        let r = u.path();
        let scratch = tempfile::tempdir().unwrap();
        let (w, ids) = stack(r, &scratch.path().join("w"));
        assert_eq!(
            sh(r, &["log", "--format=%s", "dough/r1"]),
            "b: T\na: T\nbase"
        );
        assert_eq!(
            sh(r, &["log", "-1", "--format=%an <%ae>", "dough/r1"]),
            "dough <dough@localhost>"
        );
        assert!(!r.join("HOOK_RAN").exists(), "no hook of the user's ran");
        // The user's checkout is untouched, and no worktree is registered.
        assert_eq!(sh(r, &["rev-parse", "--abbrev-ref", "HEAD"]), "main");
        assert_eq!(
            std::fs::read_to_string(r.join("src/a.py")).unwrap(),
            "a = 1\n"
        );
        assert!(!r.join("src/b.py").exists());
        assert_eq!(sh(r, &["status", "--porcelain"]), "");
        assert_eq!(sh(r, &["worktree", "list"]).lines().count(), 1);
        w.remove().unwrap();
        assert!(!scratch.path().join("w").exists());
        // The same base and the same diffs in a clone of the repo: the
        // same commit ids.
        let copy = tempfile::tempdir().unwrap();
        sh(copy.path(), &["clone", "-q", r.to_str().unwrap(), "c"]);
        let c = copy.path().join("c");
        let scratch2 = tempfile::tempdir().unwrap();
        let (_, ids2) = stack(&c, &scratch2.path().join("w"));
        assert_eq!(ids, ids2);
    }

    #[test]
    fn a_diff_that_does_not_apply_leaves_nothing_and_the_branch_can_go_on() {
        let u = user_repo();
        let scratch = tempfile::tempdir().unwrap();
        let w = Stack::create(u.path(), &scratch.path().join("w"), "main", "r2").unwrap();
        let before = w.head().unwrap();
        let bad = DIFF_A.replace("-a = 1", "-a = 9");
        let e = w
            .apply_and_commit(bad.as_bytes(), &any(), "bad")
            .unwrap_err();
        assert!(matches!(e, StackError::Git { .. }), "{e}");
        assert_eq!(w.head().unwrap(), before);
        w.apply_and_commit(DIFF_B.as_bytes(), &any(), "b").unwrap();
        assert_ne!(w.head().unwrap(), before);
        let e = Stack::create(u.path(), &scratch.path().join("w2"), "main", "r2").unwrap_err();
        assert!(
            matches!(e, StackError::BranchExists(ref b) if b == "dough/r2"),
            "{e}"
        );
        // Opened again (a resumed run): the same branch, the commit kept,
        // its task found by its message.
        let head = w.head().unwrap();
        drop(w);
        let again = Stack::open(u.path(), &scratch.path().join("w"), &before, "r2").unwrap();
        assert_eq!(again.head().unwrap(), head);
        assert_eq!(again.commit_of("main").unwrap(), before);
        let e = Stack::open(u.path(), &scratch.path().join("w3"), "main", "nope").unwrap_err();
        assert!(
            matches!(e, StackError::NoBranch(ref b) if b == "dough/nope"),
            "{e}"
        );
    }

    #[test]
    fn what_git_applies_is_checked_again() {
        let u = user_repo();
        let scratch = tempfile::tempdir().unwrap();
        let w = Stack::create(u.path(), &scratch.path().join("w"), "main", "r4").unwrap();
        let before = w.head().unwrap();
        // A diff the parser would never pass, handed straight to the
        // stack: git's own report of the change is refused.
        let outside = "diff --git a/README.md b/README.md\nnew file mode 100644\n--- /dev/null\n+++ b/README.md\n@@ -0,0 +1 @@\n+x\n";
        let e = w
            .apply_and_commit(outside.as_bytes(), &any(), "x")
            .unwrap_err();
        assert!(
            matches!(
                e,
                StackError::Rejected(crate::diff::Rejection::NotAllowed { .. })
            ),
            "{e}"
        );
        assert_eq!(w.head().unwrap(), before, "nothing committed");
        let link = "diff --git a/src/l b/src/l\nnew file mode 120000\n--- /dev/null\n+++ b/src/l\n@@ -0,0 +1 @@\n+/etc\n\\ No newline at end of file\n";
        let e = w.candidate(link.as_bytes(), &any()).unwrap_err();
        assert!(
            matches!(
                e,
                StackError::Rejected(crate::diff::Rejection::Symlink { .. })
            ),
            "{e}"
        );
        assert_eq!(sh(u.path(), &["status", "--porcelain"]), "");
    }

    #[test]
    fn archive_is_a_tar_of_head_with_symlinks_and_modes() {
        let u = user_repo();
        let r = u.path();
        std::os::unix::fs::symlink("src/a.py", r.join("link")).unwrap();
        std::fs::write(r.join("run.sh"), "#!/bin/sh\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(r.join("run.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
        sh(r, &["add", "-A"]);
        sh(r, &["commit", "-qm", "more"]);
        let scratch = tempfile::tempdir().unwrap();
        let w = Stack::create(r, &scratch.path().join("w"), "main", "r3").unwrap();
        let files = untar(&w.archive().unwrap());
        assert_eq!(files["src/a.py"], (b"a = 1\n".to_vec(), 0o644));
        assert_eq!(files["run.sh"].1, 0o755);
        assert_eq!(files["link"].0, b"src/a.py");
        // GNU tar unpacks it as the guest will.
        let out = tempfile::tempdir().unwrap();
        let mut tar = Command::new("tar")
            .args(["-x", "-C"])
            .arg(out.path())
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        tar.stdin
            .take()
            .unwrap()
            .write_all(&w.archive().unwrap())
            .unwrap();
        assert!(tar.wait().unwrap().success());
        assert_eq!(
            std::fs::read_link(out.path().join("link")).unwrap(),
            Path::new("src/a.py")
        );
        assert_eq!(
            std::fs::read_to_string(out.path().join("src/a.py")).unwrap(),
            "a = 1\n"
        );
    }

    /// An agent's `.gitattributes` cannot hide files from the gate or
    /// change their bytes (export-ignore, export-subst, eol, ident): the
    /// gate's tar holds exactly the blobs that are committed.
    #[test]
    fn agent_attributes_change_nothing_between_gate_and_commit() {
        let u = user_repo();
        let r = u.path();
        let scratch = tempfile::tempdir().unwrap();
        let w = Stack::create(r, &scratch.path().join("w"), "main", "r5").unwrap();
        let file = |path: &str, body: &str| {
            let lines: String = body.lines().map(|l| format!("+{l}\n")).collect();
            format!(
                "diff --git a/{path} b/{path}\nnew file mode 100644\n--- /dev/null\n+++ b/{path}\n@@ -0,0 +1,{} @@\n{lines}",
                body.lines().count()
            )
        };
        let diff = file(
            "src/.gitattributes",
            "hidden.py export-ignore\nsubst.py export-subst\n* text eol=crlf ident\n",
        ) + &file("src/hidden.py", "import os; os.system('evil')\n")
            + &file("src/subst.py", "version = '$Format:%H$'\nid = '$Id$'\n");
        let allow = any();
        let cand = w.candidate(diff.as_bytes(), &allow).unwrap();
        let gate = untar(&cand.tar);
        assert_eq!(
            gate["src/hidden.py"].0, b"import os; os.system('evil')\n",
            "export-ignore hid nothing"
        );
        assert_eq!(
            gate["src/subst.py"].0, b"version = '$Format:%H$'\nid = '$Id$'\n",
            "no substitution, no eol conversion"
        );
        let commit = w
            .apply_and_commit(diff.as_bytes(), &allow, "attrs")
            .unwrap();
        assert_eq!(
            sh(r, &["rev-parse", &format!("{commit}^{{tree}}")]),
            cand.tree
        );
        let stored = committed(r, &commit);
        let seen: std::collections::BTreeMap<String, Vec<u8>> =
            gate.into_iter().map(|(p, (b, _))| (p, b)).collect();
        assert_eq!(seen, stored, "the gate saw exactly what was committed");
    }

    /// Attempts write into dough's own object store; only an accepted
    /// commit (and what it adds) reaches the user's repo, and it is
    /// complete there once dough's scratch directory is gone.
    #[test]
    fn only_accepted_objects_reach_the_users_repo() {
        let u = user_repo();
        let r = u.path();
        let scratch = tempfile::tempdir().unwrap();
        let w = Stack::create(r, &scratch.path().join("w"), "main", "r7").unwrap();
        let oid_of = |content: &str| {
            let out = Command::new("git")
                .args(["hash-object", "--stdin"])
                .current_dir(r)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .and_then(|mut c| {
                    c.stdin.take().unwrap().write_all(content.as_bytes())?;
                    c.wait_with_output()
                })
                .unwrap();
            String::from_utf8(out.stdout).unwrap().trim().to_string()
        };
        let in_user_repo = |oid: &str| {
            Command::new("git")
                .args(["cat-file", "-e", oid])
                .current_dir(r)
                .status()
                .unwrap()
                .success()
        };
        let rejected = "diff --git a/src/r.py b/src/r.py\nnew file mode 100644\n--- /dev/null\n+++ b/src/r.py\n@@ -0,0 +1 @@\n+rejected attempt 1234\n";
        let c = w.candidate(rejected.as_bytes(), &any()).unwrap();
        assert!(!in_user_repo(&oid_of("rejected attempt 1234\n")));
        assert!(!in_user_repo(&c.tree));
        let commit = w.apply_and_commit(DIFF_B.as_bytes(), &any(), "b").unwrap();
        w.remove().unwrap();
        assert!(in_user_repo(&commit));
        assert!(in_user_repo(&oid_of("b = 1\n")));
        assert_eq!(sh(r, &["show", "dough/r7:src/b.py"]), "b = 1");
        assert_eq!(sh(r, &["fsck", "--no-dangling"]), "");
    }

    /// The user's repo may be a linked worktree, live under a path with a
    /// `:` in it, and have replace refs: the stack still reads its objects
    /// (through the common directory's store), and what the gate gets is
    /// what is committed, not what a replace ref says.
    #[test]
    fn linked_worktrees_colons_and_replace_refs() {
        let parent = tempfile::tempdir().unwrap();
        let main = parent.path().join("a:b");
        std::fs::create_dir(&main).unwrap();
        sh(&main, &["init", "-q", "-b", "main"]);
        std::fs::create_dir_all(main.join("src")).unwrap();
        std::fs::write(main.join("src/a.py"), "a = 1\n").unwrap();
        sh(&main, &["add", "-A"]);
        sh(&main, &["commit", "-qm", "base"]);
        // A replace ref that swaps src/a.py's blob for another.
        let real = sh(&main, &["rev-parse", "HEAD:src/a.py"]);
        std::fs::write(main.join("fake.txt"), "replaced!\n").unwrap();
        let fake = sh(&main, &["hash-object", "-w", "fake.txt"]);
        std::fs::remove_file(main.join("fake.txt")).unwrap();
        sh(&main, &["replace", &real, &fake]);
        let linked = parent.path().join("linked");
        sh(
            &main,
            &[
                "worktree",
                "add",
                "-q",
                "-b",
                "side",
                linked.to_str().unwrap(),
            ],
        );
        let scratch = tempfile::tempdir().unwrap();
        let w = Stack::create(&linked, &scratch.path().join("w"), "main", "r8").unwrap();
        let cand = w.candidate(DIFF_B.as_bytes(), &any()).unwrap();
        assert_eq!(
            untar(&cand.tar)["src/a.py"].0,
            b"a = 1\n",
            "not the replacement"
        );
        let commit = w.apply_and_commit(DIFF_B.as_bytes(), &any(), "b").unwrap();
        w.remove().unwrap();
        assert_eq!(sh(&main, &["rev-parse", "dough/r8"]), commit);
        assert_eq!(sh(&main, &["show", "dough/r8:src/b.py"]), "b = 1");
    }

    /// A tree too large to ship is refused from its listing, before any
    /// blob is read.
    #[test]
    fn a_tree_too_large_is_refused_before_it_is_read() {
        let u = user_repo();
        let r = u.path();
        let f = std::fs::File::create(r.join("big.bin")).unwrap();
        f.set_len(MAX_TREE_BYTES + 1).unwrap();
        sh(r, &["add", "-A"]);
        sh(r, &["commit", "-qm", "big"]);
        let scratch = tempfile::tempdir().unwrap();
        let w = Stack::create(r, &scratch.path().join("w"), "main", "r6").unwrap();
        let e = w.archive().unwrap_err();
        assert!(
            matches!(e, StackError::TreeTooLarge { size } if size > MAX_TREE_BYTES),
            "{e}"
        );
    }
}
