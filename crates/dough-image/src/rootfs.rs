//! The guest's root filesystem: a minimal Debian made by mmdebstrap, packed
//! into an ext4 image with `mkfs.ext4 -d`. Attached read-only; each VM writes
//! only to a tmpfs overlay inside the guest.

use std::ffi::OsString;
use std::path::Path;

/// Packages every guest gets on top of `minbase`.
/// `python3` (not just -minimal): the orchestrator's example project runs its
/// unittest suite in the gate.
pub const BASE_PACKAGES: &[&str] = &["git", "ca-certificates", "coreutils", "python3"];

/// Paths dpkg leaves out of the image: documentation and translations only.
const DPKG_EXCLUDES: &[&str] = &[
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/locale/*",
    "path-exclude=/usr/share/info/*",
];

/// Typed argv for `mmdebstrap` producing a directory tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mmdebstrap<'a> {
    pub suite: &'a str,
    pub mirror: &'a str,
    pub packages: &'a [String],
    pub target: &'a Path,
}

impl Mmdebstrap<'_> {
    pub fn argv(&self) -> Vec<OsString> {
        let mut v: Vec<OsString> = vec![
            "--variant=minbase".into(),
            "--mode=root".into(),
            "--format=directory".into(),
            "--components=main".into(),
            "--quiet".into(),
        ];
        if !self.packages.is_empty() {
            v.push(format!("--include={}", self.packages.join(",")).into());
        }
        for ex in DPKG_EXCLUDES {
            v.push(format!("--dpkgopt={ex}").into());
        }
        v.push(self.suite.into());
        v.push(self.target.into());
        v.push(self.mirror.into());
        v
    }
}

/// The guest's `/etc/resolv.conf`: its gateway's address (dough-net's
/// `GUEST_GW`), where the clone's netns redirects every DNS query to
/// dough's DNS anyway — but a resolver on the guest's own loopback (what a
/// host running systemd-resolved would have given the image) would never
/// leave the guest.
pub const GUEST_RESOLV_CONF: &str =
    "# dough: DNS is answered by the clone's egress gateway\nnameserver 172.16.0.1\noptions timeout:2 attempts:2\n";

/// Write [`GUEST_RESOLV_CONF`] into the tree `mmdebstrap` made (replacing
/// the host's copy, or a symlink).
pub fn set_resolver(tree: &Path) -> std::io::Result<()> {
    let p = tree.join("etc/resolv.conf");
    match std::fs::remove_file(&p) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    std::fs::write(p, GUEST_RESOLV_CONF)
}

/// Typed argv for `mkfs.ext4` populating an image file from a directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MkfsExt4<'a> {
    pub source_dir: &'a Path,
    pub image: &'a Path,
    pub size_mib: u64,
}

impl MkfsExt4<'_> {
    pub fn argv(&self) -> Vec<OsString> {
        vec![
            "-q".into(),
            "-F".into(),
            "-t".into(),
            "ext4".into(),
            "-L".into(),
            "dough-root".into(),
            "-O".into(),
            "^has_journal".into(),
            "-E".into(),
            "root_owner=0:0".into(),
            "-d".into(),
            self.source_dir.into(),
            self.image.into(),
            format!("{}M", self.size_mib).into(),
        ]
    }
}

/// Typed argv for `mkfs.ext4` making an empty scratch filesystem (a VM's
/// writable layer) in a sparse file: no journal (it lives as long as its
/// VM), inode tables left to be zeroed lazily (the guest mounts it with
/// `noinit_itable`, so never), no blocks reserved for root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MkfsScratch<'a> {
    pub image: &'a Path,
    pub size_mib: u64,
}

impl MkfsScratch<'_> {
    pub fn argv(&self) -> Vec<OsString> {
        [
            "-q",
            "-F",
            "-t",
            "ext4",
            "-L",
            "dough-scratch",
            "-O",
            "^has_journal",
            "-m",
            "0",
            "-i",
            "65536",
            "-E",
            "lazy_itable_init=1,root_owner=0:0",
        ]
        .into_iter()
        .map(OsString::from)
        .chain([self.image.into(), format!("{}M", self.size_mib).into()])
        .collect()
    }
}

/// Bytes used by the files under `dir` (regular files, rounded up to 4 KiB
/// blocks), not following symlinks.
pub fn tree_size(dir: &Path) -> std::io::Result<u64> {
    let mut total = 0u64;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let e = e?;
            let md = e.metadata()?;
            total += md.len().div_ceil(4096) * 4096 + 256;
            if md.is_dir() {
                stack.push(e.path());
            }
        }
    }
    Ok(total)
}

/// Image size for a tree of `used` bytes: 30% headroom plus 64 MiB for
/// metadata, rounded to whole MiB.
pub fn image_size_mib(used: u64) -> u64 {
    (used + used * 3 / 10).div_ceil(1 << 20) + 64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strs(v: Vec<OsString>) -> Vec<String> {
        v.into_iter().map(|s| s.into_string().unwrap()).collect()
    }

    #[test]
    fn mmdebstrap_argv() {
        let pk = vec!["git".to_string(), "python3-minimal".to_string()];
        let a = strs(
            Mmdebstrap {
                suite: "bookworm",
                mirror: "http://m/d",
                packages: &pk,
                target: Path::new("/t"),
            }
            .argv(),
        );
        assert_eq!(
            &a[..5],
            [
                "--variant=minbase",
                "--mode=root",
                "--format=directory",
                "--components=main",
                "--quiet"
            ]
        );
        assert!(a.contains(&"--include=git,python3-minimal".to_string()));
        assert!(a.contains(&"--dpkgopt=path-exclude=/usr/share/doc/*".to_string()));
        assert_eq!(&a[a.len() - 3..], ["bookworm", "/t", "http://m/d"]);
    }

    #[test]
    fn mkfs_argv() {
        let a = strs(
            MkfsExt4 {
                source_dir: Path::new("/src"),
                image: Path::new("/o.ext4"),
                size_mib: 300,
            }
            .argv(),
        );
        assert_eq!(
            a,
            [
                "-q",
                "-F",
                "-t",
                "ext4",
                "-L",
                "dough-root",
                "-O",
                "^has_journal",
                "-E",
                "root_owner=0:0",
                "-d",
                "/src",
                "/o.ext4",
                "300M"
            ]
        );
    }

    #[test]
    fn sizing() {
        assert_eq!(image_size_mib(0), 64);
        assert_eq!(image_size_mib(100 << 20), 130 + 64);
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("a"), vec![0u8; 5000]).unwrap();
        assert!(tree_size(d.path()).unwrap() >= 8192);
    }
}
