//! Watching a VM's serial console log: wait for a line without rereading
//! the whole file (a guest can write a lot), and take a tail for errors.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// Incremental search for a marker in a growing file.
#[derive(Debug)]
pub struct SerialWatch {
    path: PathBuf,
    offset: u64,
    carry: Vec<u8>,
}

impl SerialWatch {
    pub fn new(path: &Path) -> Self {
        SerialWatch {
            path: path.to_path_buf(),
            offset: 0,
            carry: Vec::new(),
        }
    }

    /// Read what was appended since the last call; true once `marker` has
    /// appeared (it may straddle two reads).
    pub fn saw(&mut self, marker: &str) -> bool {
        let Ok(mut f) = std::fs::File::open(&self.path) else {
            return false;
        };
        if f.seek(SeekFrom::Start(self.offset)).is_err() {
            return false;
        }
        let mut buf = Vec::new();
        if f.take(1 << 20).read_to_end(&mut buf).is_err() {
            return false;
        }
        self.offset += buf.len() as u64;
        let mut hay = std::mem::take(&mut self.carry);
        hay.extend_from_slice(&buf);
        let m = marker.as_bytes();
        if hay.windows(m.len()).any(|w| w == m) {
            return true;
        }
        let keep = hay.len().saturating_sub(m.len());
        self.carry = hay.split_off(keep);
        false
    }
}

/// The last `lines` lines (from at most the last 8 KiB) of a log file,
/// with control characters other than newline and tab made visible.
pub fn tail(path: &Path, lines: usize) -> String {
    let Ok(mut f) = std::fs::File::open(path) else {
        return format!("(no log at {})", path.display());
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(8192)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let text = printable(&String::from_utf8_lossy(&buf));
    let all: Vec<&str> = text.lines().collect();
    let t = all[all.len().saturating_sub(lines)..].join("\n");
    if t.trim().is_empty() {
        "(the log is empty)".to_string()
    } else {
        t
    }
}

/// The most a VM's console log (and anything else its VMM writes) may grow
/// to: a guest decides how much it prints. The boot output is kept; what
/// comes after the cap is dropped.
pub const CONSOLE_LOG_MAX: u64 = 8 << 20;

/// Create (or truncate) a file only its owner can read: VM logs hold
/// whatever a guest printed, secrets included.
pub fn private_file(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    // An existing file keeps its mode on open: set it.
    use std::os::unix::fs::PermissionsExt;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    Ok(f)
}

/// Text a guest controls, made safe to print on a terminal: control
/// characters other than newline and tab (escape sequences: colours,
/// cursor moves, OSC 52 clipboard writes, title changes) and bidirectional
/// overrides become U+FFFD.
pub fn printable(s: &str) -> String {
    s.chars()
        .map(|c| {
            let bidi = matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
            if (c.is_control() && c != '\n' && c != '\t') || bidi {
                '\u{fffd}'
            } else {
                c
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    proptest! {
        /// Whatever a guest sends, nothing printed can start an escape
        /// sequence or reorder text; newlines, tabs and other text stay.
        #[test]
        fn printable_leaves_no_terminal_controls(s in any::<String>()) {
            let p = super::printable(&s);
            prop_assert!(p.chars().all(|c| !c.is_control() || c == '\n' || c == '\t'));
            let bidi = p.contains('\u{202e}') || p.contains('\u{2066}');
            prop_assert!(!bidi, "bidi control left in {:?}", p);
            prop_assert_eq!(p.chars().count(), s.chars().count());
        }
    }

    #[test]
    fn printable_keeps_text_and_drops_osc52() {
        assert_eq!(
            super::printable("a\tb\n\u{1b}]52;c;cHduZWQ=\u{7}ok é"),
            "a\tb\n\u{fffd}]52;c;cHduZWQ=\u{fffd}ok é"
        );
    }

    use super::*;
    use std::io::Write;

    #[test]
    fn finds_marker_across_appends() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("serial.log");
        let mut w = SerialWatch::new(&p);
        assert!(!w.saw("worker ready"), "no file yet");
        let mut f = std::fs::File::create(&p).unwrap();
        f.write_all(b"[ 0.1] booting\nworker re").unwrap();
        assert!(!w.saw("worker ready"));
        f.write_all(b"ady; polling\n").unwrap();
        assert!(w.saw("worker ready"));
    }

    #[test]
    fn tail_takes_last_lines_and_sanitises() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("log");
        std::fs::write(&p, "a\nb\x1b[31m\nc\nd\n").unwrap();
        assert_eq!(tail(&p, 2), "c\nd");
        assert_eq!(tail(&p, 3), "b\u{fffd}[31m\nc\nd");
        assert!(tail(&d.path().join("none"), 3).contains("no log"));
    }
}
