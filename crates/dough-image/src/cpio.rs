//! A minimal writer for the `newc` cpio format the kernel unpacks as its
//! initramfs.

use std::io::{self, Write};

/// Kind of a cpio entry, with what it needs beyond a name and mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Dir,
    File(Vec<u8>),
    /// Character device with (major, minor).
    CharDev(u32, u32),
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFCHR: u32 = 0o020000;

/// Writes entries in order; call [`CpioWriter::finish`] to append the trailer.
#[derive(Debug)]
pub struct CpioWriter<W: Write> {
    out: W,
    ino: u32,
    written: u64,
}

impl<W: Write> CpioWriter<W> {
    pub fn new(out: W) -> Self {
        CpioWriter {
            out,
            ino: 1,
            written: 0,
        }
    }

    /// Add one entry. `name` is relative (no leading `/`); `perm` the permission bits.
    pub fn add(&mut self, name: &str, perm: u32, entry: &Entry) -> io::Result<()> {
        let (kind, data, rdev): (u32, &[u8], (u32, u32)) = match entry {
            Entry::Dir => (S_IFDIR, &[], (0, 0)),
            Entry::File(d) => (S_IFREG, d, (0, 0)),
            Entry::CharDev(ma, mi) => (S_IFCHR, &[], (*ma, *mi)),
        };
        let nlink = if matches!(entry, Entry::Dir) { 2 } else { 1 };
        let ino = self.ino;
        self.ino += 1;
        self.header(name, ino, kind | (perm & 0o7777), nlink, data.len(), rdev)?;
        self.write(data)?;
        self.pad()
    }

    /// Append the `TRAILER!!!` entry and return the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.header("TRAILER!!!", 0, 0, 1, 0, (0, 0))?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn header(
        &mut self,
        name: &str,
        ino: u32,
        mode: u32,
        nlink: u32,
        size: usize,
        rdev: (u32, u32),
    ) -> io::Result<()> {
        let size = u32::try_from(size)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "file too large for cpio"))?;
        let namesize = name.len() as u32 + 1;
        let hdr = format!(
            "070701{ino:08x}{mode:08x}{uid:08x}{gid:08x}{nlink:08x}{mtime:08x}{size:08x}{dmaj:08x}{dmin:08x}{rmaj:08x}{rmin:08x}{namesize:08x}{check:08x}",
            uid = 0,
            gid = 0,
            mtime = 0,
            dmaj = 0,
            dmin = 0,
            rmaj = rdev.0,
            rmin = rdev.1,
            check = 0,
        );
        self.write(hdr.as_bytes())?;
        self.write(name.as_bytes())?;
        self.write(&[0])?;
        self.pad()
    }

    fn write(&mut self, data: &[u8]) -> io::Result<()> {
        self.out.write_all(data)?;
        self.written += data.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let rem = (4 - (self.written % 4) as usize) % 4;
        self.write(&[0u8; 3][..rem])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(hdr: &[u8], i: usize) -> u32 {
        let s = std::str::from_utf8(&hdr[6 + i * 8..6 + (i + 1) * 8]).unwrap();
        u32::from_str_radix(s, 16).unwrap()
    }

    #[test]
    fn newc_layout() {
        let mut w = CpioWriter::new(Vec::new());
        w.add("init", 0o755, &Entry::File(b"abcde".to_vec()))
            .unwrap();
        w.add("dev", 0o755, &Entry::Dir).unwrap();
        w.add("dev/console", 0o600, &Entry::CharDev(5, 1)).unwrap();
        let out = w.finish().unwrap();
        assert_eq!(&out[..6], b"070701");
        assert_eq!(field(&out, 1), S_IFREG | 0o755);
        assert_eq!(field(&out, 6), 5, "file size");
        assert_eq!(field(&out, 11), 5, "name size includes NUL");
        // header (110) + "init\0" (5) = 115 → pad to 116, then 5 data bytes → pad to 124.
        assert_eq!(&out[116..121], b"abcde");
        assert_eq!(&out[124..130], b"070701");
        assert_eq!(out.len() % 4, 0);
        let dev = &out[124..];
        assert_eq!(field(dev, 1), S_IFDIR | 0o755);
        let con_at = out.windows(11).position(|w| w == b"dev/console").unwrap() - 110;
        assert_eq!(field(&out[con_at..], 1), S_IFCHR | 0o600);
        assert_eq!(
            (field(&out[con_at..], 9), field(&out[con_at..], 10)),
            (5, 1)
        );
        assert!(out.windows(10).any(|w| w == b"TRAILER!!!"));
    }

    /// GNU cpio (installed by the test command) must list what we wrote.
    #[test]
    fn readable_by_gnu_cpio() {
        let mut w = CpioWriter::new(Vec::new());
        w.add("a", 0o755, &Entry::Dir).unwrap();
        w.add("a/b.txt", 0o644, &Entry::File(b"hi\n".to_vec()))
            .unwrap();
        let data = w.finish().unwrap();
        let mut child = std::process::Command::new("cpio")
            .args(["-t", "--quiet"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(&data).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        assert_eq!(String::from_utf8_lossy(&out.stdout), "a\na/b.txt\n");
    }
}
