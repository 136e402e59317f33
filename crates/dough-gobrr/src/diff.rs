//! Agent diffs as data. The host never runs what an agent wrote: it parses
//! the `git diff --binary` the clone returns, strictly (anything it does not
//! understand is a rejection, so `git apply` never sees something this
//! parser read differently), and checks every path and mode against the
//! task's allowlist before the diff may be applied in dough's own worktree.

use std::fmt;

use crate::glob::Glob;

/// The most a diff may be (it came from an untrusted guest).
pub const MAX_DIFF_BYTES: usize = 16 << 20;

/// The most one binary patch — and all of a diff's binary patches together
/// (both blocks of each, and what deltas produce) — may unpack to. A `GIT binary patch` is zlib-compressed: a few hundred
/// KiB of diff can declare gigabytes, which `git apply` would allocate.
/// Every declared size (a `literal`'s, and the result size a `delta`
/// carries inside its compressed data) is checked before git sees it.
pub const MAX_UNPACKED_BYTES: u64 = 32 << 20;

/// Modes a file may have: a plain or an executable file.
const FILE_MODES: [&str; 2] = ["100644", "100755"];

/// One file's change.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FileChange {
    /// Path before (None for a new file).
    pub old_path: Option<String>,
    /// Path after (None for a deleted file).
    pub new_path: Option<String>,
    pub old_mode: Option<String>,
    pub new_mode: Option<String>,
    pub rename: bool,
    pub copy: bool,
    pub binary: bool,
    pub added_lines: u64,
    pub removed_lines: u64,
}

/// A parsed diff.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Diff {
    pub files: Vec<FileChange>,
}

/// Why a diff was refused. The whole diff is refused for any of them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("the diff is {0} bytes; at most {MAX_DIFF_BYTES} are accepted")]
    TooLarge(usize),
    #[error("the diff is not valid UTF-8 text")]
    NotText,
    #[error("line {line}: {what}")]
    Malformed { line: usize, what: String },
    #[error("{path:?} is outside the task's allowlist")]
    NotAllowed { path: String },
    #[error("{path:?} is an absolute path")]
    Absolute { path: String },
    #[error("{path:?} has a `..`, `.` or empty path component")]
    Traversal { path: String },
    #[error("{path:?} is or is inside a `.git` directory")]
    GitDir { path: String },
    #[error("{path:?} is a .gitmodules file (submodules are not allowed)")]
    GitModules { path: String },
    #[error("{path:?} has a control character in its name")]
    ControlChar { path: String },
    #[error("{path:?} would become a symlink (mode 120000)")]
    Symlink { path: String },
    #[error("{path:?} would become a submodule entry (mode 160000)")]
    Submodule { path: String },
    #[error("{path:?}: mode {mode} is not allowed (only 100644 and 100755 files)")]
    Mode { path: String, mode: String },
    #[error("the diff is empty: the agent changed nothing")]
    Empty,
    #[error("{path:?}: a binary patch that unpacks to {declared} bytes (at most {MAX_UNPACKED_BYTES} are accepted)")]
    BinaryTooLarge { path: String, declared: u64 },
    #[error("the binary patches unpack to more than {MAX_UNPACKED_BYTES} bytes in all")]
    BinaryTotalTooLarge,
}

fn malformed(line: usize, what: impl Into<String>) -> Rejection {
    Rejection::Malformed {
        line: line + 1,
        what: what.into(),
    }
}

/// Undo git's C-style quoting of a path (`"a/b\tc"`), if quoted.
fn unquote(s: &str, line: usize) -> Result<String, Rejection> {
    let Some(inner) = s.strip_prefix('"').and_then(|x| x.strip_suffix('"')) else {
        return Ok(s.to_string());
    };
    let mut out: Vec<u8> = Vec::new();
    let b = inner.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'"' {
            // git ends the name at the first unescaped quote; anything after
            // it would be read differently by git and by us.
            return Err(malformed(
                line,
                "a quoted path has an unescaped quote inside",
            ));
        }
        if b[i] != b'\\' {
            out.push(b[i]);
            i += 1;
            continue;
        }
        let c = *b
            .get(i + 1)
            .ok_or_else(|| malformed(line, "a quoted path ends in a backslash"))?;
        i += 2;
        out.push(match c {
            b'n' => b'\n',
            b't' => b'\t',
            b'r' => b'\r',
            b'a' => 7,
            b'b' => 8,
            b'f' => 12,
            b'v' => 11,
            b'"' => b'"',
            b'\\' => b'\\',
            b'0'..=b'3' => {
                let oct = inner
                    .get(i - 1..i + 2)
                    .ok_or_else(|| malformed(line, "a short octal escape in a quoted path"))?;
                i += 2;
                u8::from_str_radix(oct, 8)
                    .map_err(|_| malformed(line, "a bad octal escape in a quoted path"))?
            }
            _ => return Err(malformed(line, "an unknown escape in a quoted path")),
        });
    }
    String::from_utf8(out).map_err(|_| malformed(line, "a quoted path is not UTF-8"))
}

/// Strip the `a/` or `b/` prefix from a side of the diff.
fn side(s: &str, prefix: &str, line: usize) -> Result<Option<String>, Rejection> {
    if s == "/dev/null" {
        return Ok(None);
    }
    let p = unquote(s, line)?;
    p.strip_prefix(prefix)
        .map(|x| Some(x.to_string()))
        .ok_or_else(|| malformed(line, format!("path {s:?} does not start with {prefix:?}")))
}

/// The two paths of a `diff --git` header.
fn header_paths(rest: &str, line: usize) -> Result<(String, String), Rejection> {
    if rest.starts_with('"') {
        // Quoted a-side: find its closing quote (not escaped).
        let b = rest.as_bytes();
        let mut i = 1;
        while i < b.len() && b[i] != b'"' {
            i += if b[i] == b'\\' { 2 } else { 1 };
        }
        // `i` may sit inside a multi-byte character (an escape before one);
        // the split must fall on a character boundary or the header is bad.
        let cut = (i + 1).min(rest.len());
        let (Some(a), Some(bside)) = (rest.get(..cut), rest.get(cut..)) else {
            return Err(malformed(line, "bad diff --git header"));
        };
        let a = side(a, "a/", line)?.unwrap_or_default();
        let bside = bside
            .strip_prefix(' ')
            .ok_or_else(|| malformed(line, "bad diff --git header"))?;
        let b = side(bside, "b/", line)?.unwrap_or_default();
        return Ok((a, b));
    }
    if rest.ends_with('"') {
        let q = rest
            .find(" \"")
            .ok_or_else(|| malformed(line, "bad diff --git header"))?;
        let a = side(&rest[..q], "a/", line)?.unwrap_or_default();
        let b = side(&rest[q + 1..], "b/", line)?.unwrap_or_default();
        return Ok((a, b));
    }
    // Unquoted: "a/P b/Q". With no rename both are the same path, which is
    // the only split where the halves agree; otherwise the rename/copy or
    // ---/+++ lines give the paths and the header must agree with them.
    // Byte offsets are computed, so every slice is checked: the middle of
    // a name with non-ASCII characters is not a character boundary.
    let n = rest.len();
    if n >= 5 && (n - 1).is_multiple_of(2) {
        let half = (n - 1) / 2;
        if let (Some(a), Some(b)) = (rest.get(..half), rest.get(half + 1..)) {
            if rest.as_bytes()[half] == b' '
                && a.len() > 2
                && a.as_bytes().get(2..) == b.as_bytes().get(2..)
            {
                return Ok((
                    side(a, "a/", line)?.unwrap_or_default(),
                    side(b, "b/", line)?.unwrap_or_default(),
                ));
            }
        }
    }
    let q = rest
        .find(" b/")
        .ok_or_else(|| malformed(line, "bad diff --git header"))?;
    Ok((
        side(&rest[..q], "a/", line)?.unwrap_or_default(),
        side(&rest[q + 1..], "b/", line)?.unwrap_or_default(),
    ))
}

fn parse_range(s: &str, line: usize) -> Result<u64, Rejection> {
    // "-l,s" or "-l" (s = 1); the caller checked the ASCII sign.
    let s = s.get(1..).unwrap_or_default();
    let count = match s.split_once(',') {
        Some((_, c)) => c,
        None => "1",
    };
    count
        .parse()
        .map_err(|_| malformed(line, format!("bad hunk range {s:?}")))
}

impl Diff {
    /// Parse `git diff --binary` output.
    pub fn parse(bytes: &[u8]) -> Result<Diff, Rejection> {
        if bytes.len() > MAX_DIFF_BYTES {
            return Err(Rejection::TooLarge(bytes.len()));
        }
        let text = std::str::from_utf8(bytes).map_err(|_| Rejection::NotText)?;
        let lines: Vec<&str> = text.split_inclusive('\n').collect();
        let mut files = Vec::new();
        let mut unpacked = 0u64;
        let mut i = 0;
        while i < lines.len() {
            let l = lines[i].strip_suffix('\n').unwrap_or(lines[i]);
            let rest = l.strip_prefix("diff --git ").ok_or_else(|| {
                malformed(i, format!("expected `diff --git`, found {:?}", trunc(l)))
            })?;
            let (ha, hb) = header_paths(rest, i)?;
            let mut f = FileChange {
                old_path: Some(ha.clone()),
                new_path: Some(hb.clone()),
                ..Default::default()
            };
            i += 1;
            // Extended header lines.
            let mut from = None;
            let mut to = None;
            let mut minus = None;
            let mut plus = None;
            // Once hunks or a binary patch began, only more hunks may follow
            // in this section (git stops reading headers there; a later
            // `---`/`+++` would start a patch of another file for it).
            let mut body_started = false;
            while i < lines.len() {
                let l = lines[i].strip_suffix('\n').unwrap_or(lines[i]);
                if l.starts_with("diff --git ") {
                    break;
                }
                if body_started && !l.starts_with("@@ ") {
                    return Err(malformed(
                        i,
                        format!("unexpected line after the patch body: {:?}", trunc(l)),
                    ));
                }
                if let Some(m) = l.strip_prefix("old mode ") {
                    f.old_mode = Some(m.into());
                } else if let Some(m) = l.strip_prefix("new mode ") {
                    f.new_mode = Some(m.into());
                } else if let Some(m) = l.strip_prefix("deleted file mode ") {
                    f.old_mode = Some(m.into());
                    f.new_path = None;
                } else if let Some(m) = l.strip_prefix("new file mode ") {
                    f.new_mode = Some(m.into());
                    f.old_path = None;
                } else if l.starts_with("similarity index ")
                    || l.starts_with("dissimilarity index ")
                {
                } else if let Some(p) = l.strip_prefix("rename from ") {
                    f.rename = true;
                    from = Some(unquote(p, i)?);
                } else if let Some(p) = l.strip_prefix("rename to ") {
                    f.rename = true;
                    to = Some(unquote(p, i)?);
                } else if let Some(p) = l.strip_prefix("copy from ") {
                    f.copy = true;
                    from = Some(unquote(p, i)?);
                } else if let Some(p) = l.strip_prefix("copy to ") {
                    f.copy = true;
                    to = Some(unquote(p, i)?);
                } else if let Some(ix) = l.strip_prefix("index ") {
                    // "index abc..def[ mode]"
                    let mut parts = ix.split(' ');
                    let hashes = parts.next().unwrap_or("");
                    if !hashes.contains("..") {
                        return Err(malformed(i, "bad index line"));
                    }
                    if let Some(mode) = parts.next() {
                        f.old_mode.get_or_insert_with(|| mode.to_string());
                        f.new_mode.get_or_insert_with(|| mode.to_string());
                    }
                    if parts.next().is_some() {
                        return Err(malformed(i, "bad index line"));
                    }
                } else if l == "GIT binary patch" {
                    f.binary = true;
                    let path = f
                        .new_path
                        .clone()
                        .or(f.old_path.clone())
                        .unwrap_or_default();
                    i = skip_binary(&lines, i + 1, &path, &mut unpacked)?;
                    // Nothing but the next file may follow a binary patch.
                    if lines.get(i).is_some_and(|l| !l.starts_with("diff --git ")) {
                        return Err(malformed(i, "unexpected line after a binary patch"));
                    }
                    continue;
                } else if l.starts_with("Binary files ") {
                    return Err(malformed(
                        i,
                        "a binary change without its data (the diff must be made with --binary)",
                    ));
                } else if let Some(p) = l.strip_prefix("--- ") {
                    if minus.is_some() {
                        return Err(malformed(i, "a second --- line"));
                    }
                    minus = Some(side(p.trim_end_matches('\t'), "a/", i)?);
                } else if let Some(p) = l.strip_prefix("+++ ") {
                    if plus.is_some() || minus.is_none() {
                        return Err(malformed(i, "a +++ line without exactly one --- before it"));
                    }
                    plus = Some(side(p.trim_end_matches('\t'), "b/", i)?);
                } else if l.starts_with("@@ ") {
                    if minus.is_none() || plus.is_none() {
                        return Err(malformed(i, "a hunk without ---/+++ lines"));
                    }
                    body_started = true;
                    let (a, r, next) = hunk(&lines, i)?;
                    f.added_lines += a;
                    f.removed_lines += r;
                    i = next;
                    continue;
                } else {
                    return Err(malformed(i, format!("unexpected line {:?}", trunc(l))));
                }
                i += 1;
            }
            // Every statement of the paths must agree.
            if let (Some(a), Some(b)) = (&from, &to) {
                if *a != ha || *b != hb {
                    return Err(malformed(i, "rename/copy paths disagree with the header"));
                }
            } else if from.is_some() || to.is_some() {
                return Err(malformed(i, "a rename or copy without both paths"));
            }
            if let Some(m) = minus {
                if m != f.old_path {
                    return Err(malformed(i, "--- path disagrees with the header"));
                }
            }
            if let Some(p) = plus {
                if p != f.new_path {
                    return Err(malformed(i, "+++ path disagrees with the header"));
                }
            }
            if !f.rename && !f.copy && ha != hb {
                return Err(malformed(
                    i,
                    "the header names two paths but this is no rename",
                ));
            }
            files.push(f);
        }
        if files.is_empty() {
            return Err(Rejection::Empty);
        }
        Ok(Diff { files })
    }

    /// Check every path and mode against the allowlist and the rules.
    pub fn check(&self, allow: &[Glob]) -> Result<(), Rejection> {
        for f in &self.files {
            for p in [&f.old_path, &f.new_path].into_iter().flatten() {
                check_path(p)?;
                if !allow.iter().any(|g| g.matches(p)) {
                    return Err(Rejection::NotAllowed { path: p.clone() });
                }
            }
            let path = f
                .new_path
                .clone()
                .or(f.old_path.clone())
                .unwrap_or_default();
            for m in [&f.old_mode, &f.new_mode].into_iter().flatten() {
                match m.as_str() {
                    m if FILE_MODES.contains(&m) => {}
                    "120000" => return Err(Rejection::Symlink { path }),
                    "160000" => return Err(Rejection::Submodule { path }),
                    _ => {
                        return Err(Rejection::Mode {
                            path,
                            mode: m.clone(),
                        })
                    }
                }
            }
        }
        Ok(())
    }

    /// Files changed, lines added, lines removed.
    pub fn stats(&self) -> (usize, u64, u64) {
        (
            self.files.len(),
            self.files.iter().map(|f| f.added_lines).sum(),
            self.files.iter().map(|f| f.removed_lines).sum(),
        )
    }

    /// Paths the diff leaves behind (new side), for dependents' work orders.
    pub fn changed_paths(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .files
            .iter()
            .filter_map(|f| f.new_path.clone())
            .collect();
        v.sort();
        v.dedup();
        v
    }
}

/// A path component as a case-insensitive filesystem might see it:
/// lowercase, without characters HFS+ ignores, without trailing dots and
/// spaces (NTFS).
fn fold(component: &str) -> String {
    let ignorable = |c: char| matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{206a}'..='\u{206f}' | '\u{feff}');
    component
        .chars()
        .filter(|c| !ignorable(*c))
        .collect::<String>()
        .to_lowercase()
        .trim_end_matches(['.', ' '])
        .to_string()
}

/// The path rules, without the allowlist.
pub fn check_path(p: &str) -> Result<(), Rejection> {
    let path = || p.to_string();
    if p.starts_with('/') {
        return Err(Rejection::Absolute { path: path() });
    }
    if p.chars().any(|c| c.is_control()) {
        return Err(Rejection::ControlChar { path: path() });
    }
    for c in p.split('/') {
        if c.is_empty() || c == "." || c == ".." {
            return Err(Rejection::Traversal { path: path() });
        }
        let f = fold(c);
        if f == ".git" || f == "git~1" {
            return Err(Rejection::GitDir { path: path() });
        }
        if f == ".gitmodules" {
            return Err(Rejection::GitModules { path: path() });
        }
    }
    Ok(())
}

fn trunc(s: &str) -> String {
    s.chars().take(60).collect()
}

/// Consume one hunk starting at `lines[i]` (its `@@` line); returns lines
/// added, removed, and the index after it.
fn hunk(lines: &[&str], i: usize) -> Result<(u64, u64, usize), Rejection> {
    let l = lines[i].trim_end_matches('\n');
    let body = l
        .strip_prefix("@@ ")
        .and_then(|r| r.split(" @@").next())
        .ok_or_else(|| malformed(i, "bad hunk header"))?;
    let mut parts = body.split(' ');
    let (Some(old), Some(new), None) = (parts.next(), parts.next(), parts.next()) else {
        return Err(malformed(i, "bad hunk header"));
    };
    if !old.starts_with('-') || !new.starts_with('+') {
        return Err(malformed(i, "bad hunk header"));
    }
    let (mut old_left, mut new_left) = (parse_range(old, i)?, parse_range(new, i)?);
    let (mut added, mut removed) = (0, 0);
    let mut j = i + 1;
    while old_left > 0 || new_left > 0 {
        let l = lines
            .get(j)
            .ok_or_else(|| malformed(j, "the diff ends inside a hunk"))?;
        match l.as_bytes().first() {
            Some(b' ') => {
                old_left = old_left
                    .checked_sub(1)
                    .ok_or_else(|| malformed(j, "hunk longer than its header says"))?;
                new_left = new_left
                    .checked_sub(1)
                    .ok_or_else(|| malformed(j, "hunk longer than its header says"))?;
            }
            Some(b'-') => {
                old_left = old_left
                    .checked_sub(1)
                    .ok_or_else(|| malformed(j, "hunk longer than its header says"))?;
                removed += 1;
            }
            Some(b'+') => {
                new_left = new_left
                    .checked_sub(1)
                    .ok_or_else(|| malformed(j, "hunk longer than its header says"))?;
                added += 1;
            }
            Some(b'\\') => {}
            _ => {
                return Err(malformed(
                    j,
                    "a hunk line must start with ' ', '-', '+' or '\\'",
                ))
            }
        }
        j += 1;
    }
    // "\ No newline at end of file" may follow the last line.
    while lines.get(j).is_some_and(|l| l.starts_with('\\')) {
        j += 1;
    }
    Ok((added, removed, j))
}

/// Check a `GIT binary patch` body: two blocks (forward, reverse), each
/// `literal N` or `delta N`, base85 lines, then a blank line. Every block
/// is decoded and inflated (streaming, nothing kept) to check that it
/// unpacks to exactly its declared size, and that size — for a delta, the
/// size of the file it produces — is bounded; `unpacked` adds up the
/// forward blocks of the whole diff.
fn skip_binary(
    lines: &[&str],
    mut i: usize,
    path: &str,
    unpacked: &mut u64,
) -> Result<usize, Rejection> {
    for block in 0..2 {
        let Some(l) = lines.get(i).map(|l| l.trim_end_matches('\n')) else {
            return if block == 1 {
                Ok(i)
            } else {
                Err(malformed(i, "the binary patch ends early"))
            };
        };
        if block == 1 && l.starts_with("diff --git ") {
            return Ok(i);
        }
        let (delta, declared) = match (l.strip_prefix("literal "), l.strip_prefix("delta ")) {
            (Some(n), _) => (false, n),
            (_, Some(n)) => (true, n),
            _ => return Err(malformed(i, "expected `literal N` or `delta N`")),
        };
        let declared: u64 = declared
            .parse()
            .map_err(|_| malformed(i, "expected `literal N` or `delta N`"))?;
        let too_large = || Rejection::BinaryTooLarge {
            path: path.to_string(),
            declared,
        };
        // A delta is never larger than what it produces plus its header;
        // the result size is checked below.
        if declared > MAX_UNPACKED_BYTES + 64 {
            return Err(too_large());
        }
        let start = i;
        i += 1;
        let mut packed = Vec::new();
        loop {
            let l = lines
                .get(i)
                .map(|l| l.trim_end_matches('\n'))
                .ok_or_else(|| malformed(i, "the binary patch ends early"))?;
            i += 1;
            if l.is_empty() {
                break;
            }
            base85_line(l, &mut packed).map_err(|what| malformed(i - 1, what))?;
        }
        let produces =
            inflated_size(&packed, declared, delta).map_err(|what| malformed(start, what))?;
        if produces > MAX_UNPACKED_BYTES {
            return Err(Rejection::BinaryTooLarge {
                path: path.to_string(),
                declared: produces,
            });
        }
        // What git allocates for this block: `git apply` reads every
        // file's patch before applying any, inflating both blocks (each to
        // its declared size), and a forward delta's result on top.
        let allocates = declared.saturating_add(if delta && block == 0 { produces } else { 0 });
        *unpacked = unpacked.saturating_add(allocates);
        if *unpacked > MAX_UNPACKED_BYTES {
            return Err(Rejection::BinaryTotalTooLarge);
        }
    }
    Ok(i)
}

/// Decode one line of git's base85: a length character (`A`–`Z` for 1–26
/// bytes, `a`–`z` for 27–52), then 5 characters per 4 bytes.
fn base85_line(l: &str, out: &mut Vec<u8>) -> Result<(), &'static str> {
    const ALPHABET: &[u8; 85] =
        b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz!#$%&()*+-;<=>?@^_`{|}~";
    let b = l.as_bytes();
    let len = match b.first() {
        Some(c @ b'A'..=b'Z') => (c - b'A') as usize + 1,
        Some(c @ b'a'..=b'z') => (c - b'a') as usize + 27,
        _ => return Err("a binary patch line is not base85"),
    };
    let data = &b[1..];
    if data.len() != len.div_ceil(4) * 5 {
        return Err("a binary patch line's length disagrees with its data");
    }
    let mut left = len;
    for group in data.chunks(5) {
        let mut acc: u64 = 0;
        for c in group {
            let v = ALPHABET
                .iter()
                .position(|a| a == c)
                .ok_or("a binary patch line is not base85")?;
            acc = acc * 85 + v as u64;
        }
        let word = u32::try_from(acc).map_err(|_| "a base85 group overflows")?;
        let take = left.min(4);
        out.extend_from_slice(&word.to_be_bytes()[..take]);
        left -= take;
    }
    Ok(())
}

/// Inflate `packed` without keeping the output, checking that it is
/// exactly `declared` bytes; returns the size of the file the block
/// produces (`declared` for a literal; a delta's result size, from its
/// header).
fn inflated_size(packed: &[u8], declared: u64, delta: bool) -> Result<u64, &'static str> {
    use std::io::Read;
    let mut z = flate2::read::ZlibDecoder::new(packed).take(declared + 1);
    let mut head = Vec::with_capacity(20);
    let mut buf = [0u8; 8192];
    let mut total = 0u64;
    loop {
        let n = z
            .read(&mut buf)
            .map_err(|_| "a binary patch does not inflate (corrupt zlib data)")?;
        if n == 0 {
            break;
        }
        if head.len() < 20 {
            let k = (20 - head.len()).min(n);
            head.extend_from_slice(&buf[..k]);
        }
        total += n as u64;
    }
    if total != declared {
        return Err("a binary patch does not unpack to its declared size");
    }
    if !delta {
        return Ok(declared);
    }
    // A delta starts with two little-endian base-128 sizes: the source's,
    // then the result's.
    let mut sizes = [0u64; 2];
    let mut pos = 0;
    for size in &mut sizes {
        let mut shift = 0;
        loop {
            let b = *head.get(pos).ok_or("a delta's header is cut short")?;
            pos += 1;
            if shift > 56 {
                return Err("a delta's header is malformed");
            }
            *size |= u64::from(b & 0x7f) << shift;
            shift += 7;
            if b & 0x80 == 0 {
                break;
            }
        }
    }
    Ok(sizes[1])
}

impl fmt::Display for Diff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (n, a, r) = self.stats();
        write!(f, "{n} file(s), +{a} -{r}")
    }
}
