//! Disk files: a VM's scratch disk is a sparse copy of a small, mostly
//! empty filesystem image, made on the restore path (a few MiB of data in
//! a file of GiBs, so only the data is copied).

use std::os::fd::AsRawFd;
use std::path::Path;

use nix::unistd::{lseek, Whence};

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
    let mut pos: i64 = 0;
    while (pos as u64) < len {
        let data = match lseek(from.as_raw_fd(), pos, Whence::SeekData) {
            Ok(d) => d,
            // No data after `pos`: the rest is a hole.
            Err(nix::errno::Errno::ENXIO) => break,
            Err(e) => return Err(e.into()),
        };
        let hole = lseek(from.as_raw_fd(), data, Whence::SeekHole)?;
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
        pos = hole;
    }
    Ok(copied)
}

/// SHA-256 of `path`'s content as (offset, bytes) of each data extent,
/// with its length: reads only the data (a sparse disk of GiBs with MiBs
/// in it hashes in MiBs). Two files with the same data at the same places
/// hash alike, however their holes were made.
pub fn sparse_sha256(path: &Path) -> std::io::Result<String> {
    use sha2::Digest;
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    let mut h = sha2::Sha256::new();
    h.update(len.to_le_bytes());
    let mut buf = vec![0u8; 1 << 20];
    let mut pos: i64 = 0;
    while (pos as u64) < len {
        let data = match lseek(f.as_raw_fd(), pos, Whence::SeekData) {
            Ok(d) => d,
            Err(nix::errno::Errno::ENXIO) => break,
            Err(e) => return Err(e.into()),
        };
        let hole = lseek(f.as_raw_fd(), data, Whence::SeekHole)?;
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
        pos = hole;
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
}
