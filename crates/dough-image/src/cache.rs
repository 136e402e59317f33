//! Content-addressed cache entries: a key is the hash of everything that
//! shapes an artifact; an entry is a directory that appears atomically
//! (built under a temporary name, then renamed) so a crash mid-build never
//! leaves a half-made entry that looks complete.

use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Builds a cache key from labelled parts, so that `("a","bc")` and
/// `("ab","c")` hash differently.
#[derive(Debug, Default, Clone)]
pub struct KeyBuilder(Sha256);

impl KeyBuilder {
    pub fn new(kind: &str) -> Self {
        let mut k = KeyBuilder(Sha256::new());
        k.part("kind", kind.as_bytes());
        k
    }

    pub fn part(&mut self, label: &str, value: &[u8]) -> &mut Self {
        for chunk in [label.as_bytes(), value] {
            self.0.update((chunk.len() as u64).to_le_bytes());
            self.0.update(chunk);
        }
        self
    }

    pub fn str(&mut self, label: &str, value: &str) -> &mut Self {
        self.part(label, value.as_bytes())
    }

    /// Hex digest, shortened to 16 characters for directory names.
    pub fn finish(&self) -> String {
        hex::encode(self.0.clone().finalize())[..16].to_string()
    }
}

/// Full sha256 of a file, hex.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// A cache entry directory `<root>/<kind>/<key>`.
#[derive(Debug, Clone)]
pub struct Entry {
    pub dir: PathBuf,
}

/// Marker written last into a finished entry.
/// The marker a complete entry holds.
pub const DONE: &str = ".complete";

impl Entry {
    pub fn new(root: &Path, kind: &str, key: &str) -> Self {
        Entry {
            dir: root.join(kind).join(key),
        }
    }

    pub fn is_complete(&self) -> bool {
        self.dir.join(DONE).exists()
    }

    /// Build the entry with `f`, which fills the directory it is given.
    /// The result becomes visible only if `f` succeeds. One builder at a
    /// time per entry (a lock file beside it): another process building
    /// the same entry waits, then finds it built and builds nothing — so a
    /// complete entry is never replaced (a recipe's output differs from
    /// build to build, and a snapshot may already point at it).
    pub fn build<E, F>(&self, f: F) -> Result<(), E>
    where
        F: FnOnce(&Path) -> Result<(), E>,
        E: From<std::io::Error>,
    {
        let parent = self.dir.parent().expect("entry has a parent");
        std::fs::create_dir_all(parent)?;
        let name = self.dir.file_name().and_then(|n| n.to_str()).unwrap_or("x");
        // Lock files live apart (`<root>/.locks`), where nothing lists them
        // as entries; they stay (removing one would let a waiter and a
        // newcomer lock different files).
        let kind = parent.file_name().and_then(|n| n.to_str()).unwrap_or("x");
        let locks = parent.parent().unwrap_or(parent).join(".locks");
        std::fs::create_dir_all(&locks)?;
        let lock = std::fs::File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(locks.join(format!("{kind}-{name}.lock")))?;
        lock.lock()?;
        if self.is_complete() {
            return Ok(());
        }
        let tmp = parent.join(format!(".tmp-{name}-{}", std::process::id()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)?;
        }
        std::fs::create_dir_all(&tmp)?;
        if let Err(e) = f(&tmp) {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
        std::fs::write(tmp.join(DONE), b"")?;
        // Only an incomplete leftover can be here (entries appear whole).
        if self.dir.exists() {
            std::fs::remove_dir_all(&self.dir)?;
        }
        std::fs::rename(&tmp, &self.dir)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builders racing for one entry: one builds, the others wait and find
    /// it built; what the first made is never replaced.
    #[test]
    fn racing_builders_build_once_and_never_replace() {
        let d = tempfile::tempdir().unwrap();
        let built = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|s| {
            for i in 0..6 {
                let (root, built) = (d.path(), &built);
                s.spawn(move || {
                    let e = Entry::new(root, "recipe", "k1");
                    e.build(|dir| -> std::io::Result<()> {
                        built.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        std::thread::sleep(std::time::Duration::from_millis(50));
                        std::fs::write(dir.join("out"), format!("builder {i}"))
                    })
                    .unwrap();
                });
            }
        });
        assert_eq!(built.load(std::sync::atomic::Ordering::SeqCst), 1);
        let e = Entry::new(d.path(), "recipe", "k1");
        assert!(e.is_complete());
        assert!(std::fs::read_to_string(e.dir.join("out"))
            .unwrap()
            .starts_with("builder "));
    }

    #[test]
    fn keys_are_labelled_and_stable() {
        let a = KeyBuilder::new("k").str("x", "ab").str("y", "c").finish();
        let b = KeyBuilder::new("k").str("x", "a").str("y", "bc").finish();
        let a2 = KeyBuilder::new("k").str("x", "ab").str("y", "c").finish();
        assert_ne!(a, b);
        assert_eq!(a, a2);
        assert_eq!(a.len(), 16);
    }

    #[test]
    fn failed_build_leaves_nothing() {
        let root = tempfile::tempdir().unwrap();
        let e = Entry::new(root.path(), "thing", "k1");
        let r: Result<(), std::io::Error> = e.build(|d| {
            std::fs::write(d.join("half"), b"x")?;
            Err(std::io::Error::other("boom"))
        });
        assert!(r.is_err());
        assert!(!e.is_complete());
        assert!(!e.dir.exists());
        assert_eq!(
            std::fs::read_dir(root.path().join("thing"))
                .unwrap()
                .count(),
            0
        );
        e.build(|d| std::fs::write(d.join("f"), b"ok")).unwrap();
        assert!(e.is_complete());
        assert_eq!(std::fs::read(e.dir.join("f")).unwrap(), b"ok");
    }
}
