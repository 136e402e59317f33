//! Path globs for task allowlists: `*` (any characters but `/`), `?` (one
//! character but `/`), `**` (anything, `/` included, as a whole path
//! segment: `a/**/b`, `src/**`, `**/x`), and a trailing `/` meaning
//! "everything below". Paths are repo-relative with `/` separators.
//!
//! Each glob is a small NFA, so the same code answers both questions gobrr
//! asks: does a path match, and can two globs match a common path (the
//! overlap check between tasks that may run in the same round). Glob
//! crates answer only the first.

use std::collections::{BTreeSet, VecDeque};
use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Tok {
    Lit(char),
    /// One character other than `/`.
    One,
    /// Any run of characters other than `/`.
    Star,
    /// Any run of characters (a trailing `**`).
    StarStar,
    /// `**/` before more pattern: nothing, or any run of characters that
    /// ends with `/` — whole directories only (`a/**/b` matches `a/b` and
    /// `a/x/y/b`, never `a/xb`).
    AnyDirs,
}

/// A parsed glob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob {
    text: String,
    toks: Vec<Tok>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GlobError {
    #[error("glob {0:?} is empty")]
    Empty(String),
    #[error("glob {0:?} is absolute (globs are relative to the repo root)")]
    Absolute(String),
    #[error("glob {0:?} has a `..` segment (it would escape the repo)")]
    DotDot(String),
    #[error("glob {0:?} uses {1:?}, which allowlists do not support (only *, ** and ?)")]
    Unsupported(String, char),
    #[error("glob {0:?} has `**` inside a path segment (write `a/**/b` or `**/x`)")]
    StarStarInSegment(String),
}

impl Glob {
    pub fn new(text: &str) -> Result<Glob, GlobError> {
        let t = text.trim();
        if t.is_empty() {
            return Err(GlobError::Empty(text.into()));
        }
        if t.starts_with('/') {
            return Err(GlobError::Absolute(text.into()));
        }
        let mut norm = t.trim_start_matches("./").to_string();
        if norm.ends_with('/') {
            norm.push_str("**");
        }
        let mut toks = Vec::new();
        let segs: Vec<&str> = norm.split('/').collect();
        let mut after_anydirs = false;
        for (i, seg) in segs.iter().enumerate() {
            if i > 0 && !after_anydirs {
                toks.push(Tok::Lit('/'));
            }
            after_anydirs = false;
            if *seg == ".." {
                return Err(GlobError::DotDot(text.into()));
            }
            if *seg == "**" {
                if i + 1 == segs.len() {
                    toks.push(Tok::StarStar);
                } else {
                    // Its `/` is part of the token.
                    toks.push(Tok::AnyDirs);
                    after_anydirs = true;
                }
                continue;
            }
            if seg.contains("**") {
                return Err(GlobError::StarStarInSegment(text.into()));
            }
            for c in seg.chars() {
                toks.push(match c {
                    '*' => Tok::Star,
                    '?' => Tok::One,
                    '[' | ']' | '{' | '}' | '\\' | '!' => {
                        return Err(GlobError::Unsupported(text.into(), c))
                    }
                    c => Tok::Lit(c),
                });
            }
        }
        // `a/**` also matches `a` itself? No: allowlists name files, and
        // `a/**` means files below `a`. `**/x` matches `x` at the top too:
        // the `**/` prefix may match nothing.
        Ok(Glob {
            text: text.to_string(),
            toks,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The same glob with every literal lowercased (for case-insensitive
    /// questions such as "can this reach `.git`").
    pub fn lowercase(&self) -> Glob {
        Glob {
            text: self.text.to_lowercase(),
            toks: self
                .toks
                .iter()
                .map(|t| match t {
                    Tok::Lit(c) => Tok::Lit(c.to_ascii_lowercase()),
                    t => t.clone(),
                })
                .collect(),
        }
    }

    /// States reachable from `states` without consuming a character.
    fn closure(&self, states: &mut BTreeSet<usize>) {
        let mut stack: Vec<usize> = states.iter().copied().collect();
        while let Some(s) = stack.pop() {
            let mut next = Vec::new();
            match self.toks.get(s) {
                Some(Tok::Star) => next.push(s + 1),
                Some(Tok::StarStar) => next.push(s + 1),
                // `**/` may match nothing at all (so `**/x` matches `x`).
                Some(Tok::AnyDirs) => next.push(s + 1),
                _ => {}
            }
            for n in next {
                if states.insert(n) {
                    stack.push(n);
                }
            }
        }
    }

    /// The state "inside the `**/` at token `s`": some characters consumed,
    /// waiting for a `/` to leave it.
    fn inside(&self, s: usize) -> usize {
        self.toks.len() + 1 + s
    }

    /// States after consuming `c` from state `s` (before closure).
    fn step(&self, s: usize, c: Sym) -> Vec<usize> {
        if s > self.toks.len() {
            let t = s - self.toks.len() - 1;
            return if c == Sym::Char('/') {
                vec![s, t + 1]
            } else {
                vec![s]
            };
        }
        match (self.toks.get(s), c) {
            (Some(Tok::AnyDirs), Sym::Char('/')) => vec![self.inside(s), s + 1],
            (Some(Tok::AnyDirs), _) => vec![self.inside(s)],
            (Some(Tok::Lit(l)), Sym::Char(x)) if *l == x => vec![s + 1],
            (Some(Tok::One), Sym::Char(x)) if x != '/' => vec![s + 1],
            (Some(Tok::One), Sym::Other) => vec![s + 1],
            (Some(Tok::Star), Sym::Char(x)) if x != '/' => vec![s],
            (Some(Tok::Star), Sym::Other) => vec![s],
            (Some(Tok::StarStar), _) => vec![s],
            _ => vec![],
        }
    }

    fn start(&self) -> BTreeSet<usize> {
        let mut s = BTreeSet::from([0]);
        self.closure(&mut s);
        s
    }

    fn accepts(&self, states: &BTreeSet<usize>) -> bool {
        states.contains(&self.toks.len())
    }

    /// Whether `path` matches.
    pub fn matches(&self, path: &str) -> bool {
        let mut cur = self.start();
        for c in path.chars() {
            let mut next = BTreeSet::new();
            for &s in &cur {
                next.extend(self.step(s, Sym::Char(c)));
            }
            self.closure(&mut next);
            if next.is_empty() {
                return false;
            }
            cur = next;
        }
        self.accepts(&cur)
    }

    /// Whether some path matches both globs; if so, a shortest one (with
    /// `x` standing for "any other character").
    pub fn overlap(&self, other: &Glob) -> Option<String> {
        let mut alphabet: BTreeSet<Sym> = BTreeSet::from([Sym::Char('/'), Sym::Other]);
        for t in self.toks.iter().chain(&other.toks) {
            if let Tok::Lit(c) = t {
                alphabet.insert(Sym::Char(*c));
            }
        }
        // The NFA states of both, and whether the path so far is empty or
        // ends in `/` (no file path ends there).
        type State = (BTreeSet<usize>, BTreeSet<usize>, bool);
        let start: State = (self.start(), other.start(), true);
        let mut seen: BTreeSet<State> = BTreeSet::from([start.clone()]);
        let mut queue: VecDeque<(State, String)> = VecDeque::from([(start, String::new())]);
        while let Some(((a, b, boundary), path)) = queue.pop_front() {
            if self.accepts(&a) && other.accepts(&b) && !boundary {
                return Some(path);
            }
            for &sym in &alphabet {
                let mut na = BTreeSet::new();
                for &s in &a {
                    na.extend(self.step(s, sym));
                }
                let mut nb = BTreeSet::new();
                for &s in &b {
                    nb.extend(other.step(s, sym));
                }
                if na.is_empty() || nb.is_empty() {
                    continue;
                }
                self.closure(&mut na);
                other.closure(&mut nb);
                let st = (na, nb, sym == Sym::Char('/'));
                if seen.insert(st.clone()) {
                    let mut p = path.clone();
                    p.push(match sym {
                        Sym::Char(c) => c,
                        Sym::Other => 'x',
                    });
                    queue.push_back((st, p));
                }
            }
        }
        None
    }
}

impl fmt::Display for Glob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// An input symbol: a character named by some glob, or any other one
/// (never `/`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Sym {
    // First, so witnesses prefer a plain `x` where any character will do.
    Other,
    Char(char),
}

/// Whether a glob can match the repo's `.git` (file or directory) or
/// anything inside it, in any letter case. (`.git` components deeper down
/// are refused path by path when a diff is applied.)
pub fn reaches_git(g: &Glob) -> Option<String> {
    let low = g.lowercase();
    [".git", ".git/**"]
        .iter()
        .find_map(|p| low.overlap(&Glob::new(p).expect("valid")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(s: &str) -> Glob {
        Glob::new(s).unwrap()
    }

    #[test]
    fn matching() {
        assert!(g("src/*.py").matches("src/a.py"));
        assert!(!g("src/*.py").matches("src/x/a.py"));
        assert!(g("src/**").matches("src/x/y/a.py"));
        assert!(g("src/").matches("src/x/a.py"));
        assert!(!g("src/**").matches("srcx/a.py"));
        assert!(g("**/test_*.py").matches("test_a.py"));
        assert!(g("**/test_*.py").matches("a/b/test_a.py"));
        assert!(g("a/**/b.txt").matches("a/b.txt"));
        assert!(g("a/**/b.txt").matches("a/x/y/b.txt"));
        // `**/` stands for whole directories only.
        assert!(!g("a/**/b.txt").matches("a/xb.txt"));
        assert!(!g("**/conftest.py").matches("src/myconftest.py"));
        assert!(g("**/conftest.py").matches("src/conftest.py"));
        assert!(g("README.md").matches("README.md"));
        assert!(!g("README.md").matches("README.mdx"));
        assert!(g("f?.c").matches("f1.c") && !g("f?.c").matches("f/.c"));
        assert!(g("./lib/x.py").matches("lib/x.py"));
    }

    #[test]
    fn bad_globs() {
        assert!(matches!(Glob::new(""), Err(GlobError::Empty(_))));
        assert!(matches!(Glob::new("/etc/*"), Err(GlobError::Absolute(_))));
        assert!(matches!(Glob::new("src/../x"), Err(GlobError::DotDot(_))));
        assert!(matches!(Glob::new("../x"), Err(GlobError::DotDot(_))));
        assert!(matches!(
            Glob::new("a**"),
            Err(GlobError::StarStarInSegment(_))
        ));
        assert!(matches!(
            Glob::new("[ab].py"),
            Err(GlobError::Unsupported(_, '['))
        ));
    }

    #[test]
    fn overlaps() {
        let o = |a: &str, b: &str| g(a).overlap(&g(b));
        assert_eq!(o("src/a.py", "src/*.py").as_deref(), Some("src/a.py"));
        assert!(o("src/**", "src/util/*.py").is_some());
        assert!(o("src/a/**", "src/b/**").is_none());
        assert!(o("src/*.py", "src/*.md").is_none());
        assert!(o("*.py", "src/*.py").is_none(), "* does not cross /");
        assert!(o("**/*.py", "src/x.py").is_some());
        assert!(o("a/**/b.txt", "a/xb.txt").is_none());
        assert!(o("docs/", "docs/index.md").is_some());
        assert!(o("a?c", "abc").is_some());
        assert!(o("tests/test_a.py", "tests/test_b.py").is_none());
        // A witness really matches both.
        let w = o("lib/**/mod_*.rs", "lib/net/*").unwrap();
        assert!(
            g("lib/**/mod_*.rs").matches(&w) && g("lib/net/*").matches(&w),
            "{w}"
        );
    }

    #[test]
    fn git_is_out_of_reach() {
        for bad in [
            "**",
            ".git/hooks/*",
            ".GIT/config",
            "*",
            "*/**",
            "**/*",
            ".g?t/x",
        ] {
            assert!(reaches_git(&g(bad)).is_some(), "{bad}");
        }
        for ok in [
            "src/**",
            "*.py",
            "docs/",
            ".github/workflows/*.yml",
            ".gitignore",
        ] {
            assert!(reaches_git(&g(ok)).is_none(), "{ok}");
        }
    }
}
