//! Disk files: a VM's scratch disk is a sparse copy of a small, mostly
//! empty filesystem image, made on the restore path (a few MiB of data in
//! a file of GiBs, so only the data is copied).

use std::os::fd::AsRawFd;
use std::path::Path;

use nix::unistd::{lseek, Whence};

/// The data extents of `f` (of length `len`), as (start, end) offsets, in
/// order: what SEEK_DATA / SEEK_HOLE find; holes are skipped.
fn data_extents(
    f: &std::fs::File,
    len: u64,
) -> impl Iterator<Item = std::io::Result<(i64, i64)>> + '_ {
    let mut pos: i64 = 0;
    std::iter::from_fn(move || {
        if pos < 0 || pos as u64 >= len {
            return None;
        }
        let data = match lseek(f.as_raw_fd(), pos, Whence::SeekData) {
            Ok(d) => d,
            // No data after `pos`: the rest is a hole.
            Err(nix::errno::Errno::ENXIO) => return None,
            Err(e) => {
                pos = -1;
                return Some(Err(e.into()));
            }
        };
        match lseek(f.as_raw_fd(), data, Whence::SeekHole) {
            Ok(hole) => {
                pos = hole;
                Some(Ok((data, hole)))
            }
            Err(e) => {
                pos = -1;
                Some(Err(e.into()))
            }
        }
    })
}

/// Copy `src` to a new file `dst` (mode 0600) of the same length, copying
/// only `src`'s data extents: its holes stay holes. Returns the bytes
/// copied.
pub fn copy_sparse(src: &Path, dst: &Path) -> std::io::Result<u64> {
    use std::os::unix::fs::OpenOptionsExt;
    let from = std::fs::File::open(src)?;
    let len = from.metadata()?.len();
    let to = std::fs::File::options()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dst)?;
    to.set_len(len)?;
    let mut copied = 0u64;
    for extent in data_extents(&from, len) {
        let (data, hole) = extent?;
        let (mut off_in, mut off_out) = (data, data);
        while off_in < hole {
            let want = usize::try_from(hole - off_in).unwrap_or(usize::MAX);
            let n = nix::fcntl::copy_file_range(
                &from,
                Some(&mut off_in),
                &to,
                Some(&mut off_out),
                want,
            )?;
            if n == 0 {
                return Err(std::io::Error::other(format!(
                    "{} ended while it was being copied",
                    src.display()
                )));
            }
            copied += n as u64;
        }
    }
    Ok(copied)
}

/// SHA-256 of `path`'s length and of each data extent (offset, length,
/// bytes): reads only the data (a sparse disk of GiBs with MiBs in it
/// hashes in MiBs). A sparse copy ([`copy_sparse`]) hashes like its source;
/// the same bytes laid out in other extents (zeros written where the other
/// has a hole) hash differently — a key, not a content comparison.
pub fn sparse_sha256(path: &Path) -> std::io::Result<String> {
    use sha2::Digest;
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    let mut h = sha2::Sha256::new();
    h.update(len.to_le_bytes());
    let mut buf = vec![0u8; 1 << 20];
    for extent in data_extents(&f, len) {
        let (data, hole) = extent?;
        h.update((data as u64).to_le_bytes());
        h.update(((hole - data) as u64).to_le_bytes());
        let mut off = data as u64;
        while off < hole as u64 {
            let want = ((hole as u64 - off) as usize).min(buf.len());
            let n = f.read_at(&mut buf[..want], off)?;
            if n == 0 {
                return Err(std::io::Error::other(format!(
                    "{} shrank while hashed",
                    path.display()
                )));
            }
            h.update(&buf[..n]);
            off += n as u64;
        }
    }
    Ok(hex::encode(h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileExt, MetadataExt};

    #[test]
    fn data_is_copied_and_holes_stay_holes() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        let f = std::fs::File::create(&src).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(b"head", 0).unwrap();
        f.write_all_at(&[7u8; 8192], 40 << 20).unwrap();
        f.write_all_at(b"tail", (64 << 20) - 4).unwrap();
        drop(f);
        let dst = d.path().join("dst");
        let n = copy_sparse(&src, &dst).unwrap();
        assert!(n < 1 << 20, "copied {n} bytes of a 64 MiB file");
        assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
        let m = std::fs::metadata(&dst).unwrap();
        assert_eq!(m.len(), 64 << 20);
        assert!(m.blocks() * 512 < 1 << 20, "the copy is sparse");
        assert_eq!(m.mode() & 0o777, 0o600);
        // Never over an existing file.
        let e = copy_sparse(&src, &dst).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists);
    }

    #[test]
    fn a_sparse_copy_hashes_like_its_source_and_a_changed_byte_does_not() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        let f = std::fs::File::create(&src).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(b"data at 1 MiB", 1 << 20).unwrap();
        f.write_all_at(b"and at 40 MiB", 40 << 20).unwrap();
        drop(f);
        let copy = d.path().join("copy");
        copy_sparse(&src, &copy).unwrap();
        let h = sparse_sha256(&src).unwrap();
        assert_eq!(sparse_sha256(&copy).unwrap(), h);
        let f = std::fs::OpenOptions::new().write(true).open(&copy).unwrap();
        f.write_all_at(b"X", 40 << 20).unwrap();
        assert_ne!(sparse_sha256(&copy).unwrap(), h);
    }
}
