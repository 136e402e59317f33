//! What the machine's apt knows: its mirror, package versions and checksums,
//! and downloading a package. The mirror is always read from the machine's
//! apt sources, never hard-coded.

use std::path::{Path, PathBuf};

use crate::tool::{run_tool, ToolError};

#[derive(Debug, thiserror::Error)]
pub enum AptError {
    #[error("no apt source for suite {suite} in {searched}; set DOUGH_APT_MIRROR or add one")]
    NoMirror { suite: String, searched: String },
    #[error("apt knows no package {0}; run `apt-get update` first")]
    UnknownPackage(String),
    #[error("apt's record for {package} lacks {field}")]
    MissingField {
        package: String,
        field: &'static str,
    },
    #[error("downloaded {path} has sha256 {got}, apt's index says {want}")]
    Checksum {
        path: PathBuf,
        got: String,
        want: String,
    },
    #[error(transparent)]
    Tool(#[from] ToolError),
    #[error("reading {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// One binary package as apt's index describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackageRecord {
    pub package: String,
    pub version: String,
    pub depends: String,
    pub sha256: String,
}

/// Find the mirror URI serving `suite` (e.g. `bookworm`) in the apt sources
/// under `root` (normally `/`): one-line `sources.list` files and deb822
/// `.sources` files both count. Security and updates suites are skipped.
pub fn find_mirror(root: &Path, suite: &str) -> Result<String, AptError> {
    let etc = root.join("etc/apt");
    let mut files = vec![etc.join("sources.list")];
    if let Ok(rd) = std::fs::read_dir(etc.join("sources.list.d")) {
        let mut more: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
        more.sort();
        files.extend(more);
    }
    for f in &files {
        let Ok(text) = std::fs::read_to_string(f) else {
            continue;
        };
        let found = if f.extension().is_some_and(|e| e == "sources") {
            mirror_from_deb822(&text, suite)
        } else {
            mirror_from_one_line(&text, suite)
        };
        if let Some(m) = found {
            return Ok(m);
        }
    }
    Err(AptError::NoMirror {
        suite: suite.to_string(),
        searched: etc.display().to_string(),
    })
}

/// `deb [options] URI SUITE COMPONENTS...`
pub fn mirror_from_one_line(text: &str, suite: &str) -> Option<String> {
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        let mut words = line.split_whitespace().peekable();
        if words.next() != Some("deb") {
            continue;
        }
        if words.peek().is_some_and(|w| w.starts_with('[')) {
            for w in words.by_ref() {
                if w.ends_with(']') {
                    break;
                }
            }
        }
        let (Some(uri), Some(s)) = (words.next(), words.next()) else {
            continue;
        };
        if s == suite {
            return Some(uri.to_string());
        }
    }
    None
}

/// deb822 stanzas with `Types: deb`, `URIs:` and `Suites:`.
pub fn mirror_from_deb822(text: &str, suite: &str) -> Option<String> {
    for stanza in text.split("\n\n") {
        let mut types = "";
        let mut uris = "";
        let mut suites = "";
        let mut enabled = true;
        for line in stanza.lines() {
            if line.starts_with('#') {
                continue;
            }
            if let Some((k, v)) = line.split_once(':') {
                match k.trim().to_ascii_lowercase().as_str() {
                    "types" => types = v.trim(),
                    "uris" => uris = v.trim(),
                    "suites" => suites = v.trim(),
                    "enabled" => enabled = v.trim() != "no",
                    _ => {}
                }
            }
        }
        if enabled
            && types.split_whitespace().any(|t| t == "deb")
            && suites.split_whitespace().any(|s| s == suite)
        {
            if let Some(u) = uris.split_whitespace().next() {
                return Some(u.to_string());
            }
        }
    }
    None
}

/// Parse the first stanza of `apt-cache show` output.
pub fn parse_record(text: &str, package: &str) -> Result<PackageRecord, AptError> {
    let stanza = text.split("\n\n").next().unwrap_or("");
    let field = |name: &'static str| -> Result<String, AptError> {
        stanza
            .lines()
            .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(':')))
            .map(|v| v.trim().to_string())
            .ok_or(AptError::MissingField {
                package: package.to_string(),
                field: name,
            })
    };
    Ok(PackageRecord {
        package: field("Package")?,
        version: field("Version")?,
        depends: field("Depends").unwrap_or_default(),
        sha256: field("SHA256")?,
    })
}

/// apt's candidate record for `package`.
pub fn show(package: &str) -> Result<PackageRecord, AptError> {
    let out = run_tool(
        "apt-cache",
        ["show", "--no-all-versions", package]
            .map(Into::into)
            .to_vec(),
    )
    .map_err(|e| match e {
        ToolError::Failed { .. } => AptError::UnknownPackage(package.to_string()),
        e => AptError::Tool(e),
    })?;
    if out.trim().is_empty() {
        return Err(AptError::UnknownPackage(package.to_string()));
    }
    parse_record(&out, package)
}

/// Follow a metapackage such as `linux-image-cloud-amd64` to the versioned
/// image package it depends on (`linux-image-6.1.0-NN-cloud-amd64`).
pub fn resolve_kernel_package(meta: &str) -> Result<PackageRecord, AptError> {
    let rec = show(meta)?;
    let dep = rec
        .depends
        .split(',')
        .map(|d| d.split_whitespace().next().unwrap_or(""))
        .find(|d| d.starts_with("linux-image-"))
        .ok_or(AptError::MissingField {
            package: meta.to_string(),
            field: "Depends (linux-image-*)",
        })?;
    show(dep)
}

/// Download `rec` into `dir` and check it against apt's checksum.
pub fn download(rec: &PackageRecord, dir: &Path) -> Result<PathBuf, AptError> {
    let spec = format!("{}={}", rec.package, rec.version);
    crate::tool::run_tool_in(
        "apt-get",
        vec![
            "-q".into(),
            "-o".into(),
            "APT::Sandbox::User=root".into(),
            "download".into(),
            spec.into(),
        ],
        dir,
    )?;
    let found = std::fs::read_dir(dir)
        .map_err(|source| AptError::Io {
            path: dir.to_path_buf(),
            source,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("{}_", rec.package)) && n.ends_with(".deb"))
        })
        .ok_or(AptError::UnknownPackage(rec.package.clone()))?;
    let got = crate::cache::sha256_file(&found).map_err(|source| AptError::Io {
        path: found.clone(),
        source,
    })?;
    if got != rec.sha256 {
        return Err(AptError::Checksum {
            path: found,
            got,
            want: rec.sha256.clone(),
        });
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deb822_mirror() {
        let text = "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\nComponents: main\n\n\
                    Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\n";
        assert_eq!(
            mirror_from_deb822(text, "bookworm").as_deref(),
            Some("http://mirror.example/debian")
        );
        assert_eq!(
            mirror_from_deb822(text, "bookworm-security").as_deref(),
            Some("http://mirror.example/debian-security")
        );
        assert_eq!(mirror_from_deb822(text, "trixie"), None);
        let disabled = "Enabled: no\nTypes: deb\nURIs: http://x/\nSuites: bookworm\n";
        assert_eq!(mirror_from_deb822(disabled, "bookworm"), None);
    }

    #[test]
    fn one_line_mirror() {
        let text = "# comment\ndeb-src http://src.example/ bookworm main\n\
                    deb [arch=amd64 signed-by=/k.gpg] http://a.example/debian bookworm main\n";
        assert_eq!(
            mirror_from_one_line(text, "bookworm").as_deref(),
            Some("http://a.example/debian")
        );
        assert_eq!(
            mirror_from_one_line("deb http://b.example/ sid main", "bookworm"),
            None
        );
    }

    #[test]
    fn find_mirror_reads_both_formats_and_errors_clearly() {
        let root = tempfile::tempdir().unwrap();
        let etc = root.path().join("etc/apt/sources.list.d");
        std::fs::create_dir_all(&etc).unwrap();
        let err = find_mirror(root.path(), "bookworm").unwrap_err();
        assert!(
            err.to_string().contains("no apt source for suite bookworm"),
            "{err}"
        );
        std::fs::write(
            etc.join("debian.sources"),
            "Types: deb\nURIs: http://m.example/d\nSuites: bookworm\n",
        )
        .unwrap();
        assert_eq!(
            find_mirror(root.path(), "bookworm").unwrap(),
            "http://m.example/d"
        );
    }

    #[test]
    fn parse_apt_cache_record() {
        let text = "Package: linux-image-cloud-amd64\nSource: linux-signed-amd64 (6.1.1)\nVersion: 6.1.192-2\n\
                    Depends: linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)\nSHA256: abc123\n\nPackage: other\n";
        let r = parse_record(text, "linux-image-cloud-amd64").unwrap();
        assert_eq!(r.version, "6.1.192-2");
        assert_eq!(r.sha256, "abc123");
        assert!(r.depends.starts_with("linux-image-6.1.0-56"));
        assert!(matches!(
            parse_record("Package: x\n", "x"),
            Err(AptError::MissingField {
                field: "Version",
                ..
            })
        ));
    }
}
