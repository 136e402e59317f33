//! Turning Debian's kernel package into what a microVM boots: an ELF
//! `vmlinux` (PVH entry) decompressed from the bzImage's LZ4 payload, and the
//! handful of modules the guest needs, in dependency order.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Modules the guest agent needs (names as `modinfo` spells them, `_` not `-`).
/// Their dependencies are added automatically.
pub const GUEST_MODULES: &[&str] = &[
    "virtio_mmio",
    "virtio_console",
    "virtio_rng",
    "virtio_blk",
    "virtio_net",
    "overlay",
    "vmw_vsock_virtio_transport",
];

/// Magic of the LZ4 "legacy" frame format the kernel uses.
const LZ4_LEGACY_MAGIC: u32 = 0x184C_2102;
/// Each legacy block decompresses to at most 8 MiB.
const LZ4_LEGACY_BLOCK: usize = 8 << 20;
/// A decompressed kernel larger than this is refused (a corrupt size field
/// must not make us allocate without bound).
const MAX_VMLINUX: usize = 512 << 20;

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("{0}: not a bzImage (no HdrS setup header)")]
    NotBzImage(String),
    #[error("bzImage payload lies outside the file (offset {offset}, length {len}, file {file})")]
    PayloadBounds {
        offset: usize,
        len: usize,
        file: usize,
    },
    #[error(
        "bzImage payload is not LZ4 legacy (magic {0:02x?}); this kernel is compressed differently"
    )]
    NotLz4([u8; 4]),
    #[error("LZ4 block at payload offset {offset} is corrupt")]
    Lz4Block {
        offset: usize,
        #[source]
        source: lz4_flex::block::DecompressError,
    },
    #[error("decompressed kernel is {got} bytes but the trailer says {want}")]
    SizeMismatch { got: usize, want: usize },
    #[error("decompressed kernel exceeds {MAX_VMLINUX} bytes")]
    TooLarge,
    #[error("decompressed payload is not an ELF image")]
    NotElf,
    #[error("module {name} not found under {dir}")]
    MissingModule { name: String, dir: PathBuf },
    #[error("module {0} has a dependency cycle")]
    Cycle(String),
    #[error("reading module {path}")]
    ModInfo {
        path: PathBuf,
        #[source]
        source: object::Error,
    },
    #[error("module {0} has no .modinfo section")]
    NoModInfo(PathBuf),
    #[error("I/O on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> KernelError + '_ {
    move |source| KernelError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn le32(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

/// Extract the compressed payload from a bzImage, using the boot protocol's
/// setup header (`setup_sects`, `payload_offset`, `payload_length`).
pub fn bzimage_payload<'a>(bz: &'a [u8], name: &str) -> Result<&'a [u8], KernelError> {
    if bz.get(0x202..0x206) != Some(b"HdrS") {
        return Err(KernelError::NotBzImage(name.to_string()));
    }
    let setup_sects = match bz[0x1f1] {
        0 => 4,
        n => n as usize,
    };
    let (off, len) = match (le32(bz, 0x248), le32(bz, 0x24c)) {
        (Some(o), Some(l)) => (o as usize, l as usize),
        _ => return Err(KernelError::NotBzImage(name.to_string())),
    };
    let start = (setup_sects + 1) * 512 + off;
    match start.checked_add(len) {
        Some(end) if end <= bz.len() => Ok(&bz[start..end]),
        _ => Err(KernelError::PayloadBounds {
            offset: start,
            len,
            file: bz.len(),
        }),
    }
}

/// Decompress an LZ4 legacy-frame stream as the kernel's build writes it:
/// magic, then blocks of `[u32 LE compressed size][data]`, then a 4-byte
/// trailer with the total decompressed size.
pub fn lz4_legacy_decompress(data: &[u8]) -> Result<Vec<u8>, KernelError> {
    let magic = le32(data, 0).ok_or(KernelError::NotLz4([0; 4]))?;
    if magic != LZ4_LEGACY_MAGIC {
        let mut m = [0u8; 4];
        m.copy_from_slice(&data[..4]);
        return Err(KernelError::NotLz4(m));
    }
    let mut out = Vec::new();
    let mut pos = 4;
    let mut block = vec![0u8; LZ4_LEGACY_BLOCK];
    let mut trailer = None;
    while let Some(size) = le32(data, pos) {
        let size = size as usize;
        if size == LZ4_LEGACY_MAGIC as usize {
            // A concatenated legacy frame: just continue with its blocks.
            pos += 4;
            continue;
        }
        let body = pos + 4;
        if body + size > data.len() {
            // Not a block: the kernel's size trailer.
            trailer = Some(size);
            break;
        }
        let n = lz4_flex::block::decompress_into(&data[body..body + size], &mut block).map_err(
            |source| KernelError::Lz4Block {
                offset: pos,
                source,
            },
        )?;
        if out.len() + n > MAX_VMLINUX {
            return Err(KernelError::TooLarge);
        }
        out.extend_from_slice(&block[..n]);
        pos = body + size;
    }
    if let Some(want) = trailer {
        if want != out.len() {
            return Err(KernelError::SizeMismatch {
                got: out.len(),
                want,
            });
        }
    }
    Ok(out)
}

/// bzImage bytes → ELF vmlinux bytes.
pub fn vmlinux_from_bzimage(bz: &[u8], name: &str) -> Result<Vec<u8>, KernelError> {
    let payload = bzimage_payload(bz, name)?;
    let elf = lz4_legacy_decompress(payload)?;
    if !elf.starts_with(b"\x7fELF") {
        return Err(KernelError::NotElf);
    }
    Ok(elf)
}

/// The `depends=` list from a module's `.modinfo` section.
pub fn module_depends(path: &Path) -> Result<Vec<String>, KernelError> {
    use object::{Object, ObjectSection};
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    let file = object::File::parse(&*bytes).map_err(|source| KernelError::ModInfo {
        path: path.to_path_buf(),
        source,
    })?;
    let section = file
        .section_by_name(".modinfo")
        .ok_or_else(|| KernelError::NoModInfo(path.to_path_buf()))?;
    let data = section.data().map_err(|source| KernelError::ModInfo {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(parse_modinfo_depends(data))
}

/// Parse NUL-separated `key=value` strings and return the `depends` entries.
pub fn parse_modinfo_depends(data: &[u8]) -> Vec<String> {
    data.split(|b| *b == 0)
        .filter_map(|kv| kv.strip_prefix(b"depends="))
        .flat_map(|v| {
            String::from_utf8_lossy(v)
                .split(',')
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .filter(|s| !s.is_empty())
        .collect()
}

/// Index every `*.ko` under `dir` by module name (`-` normalised to `_`).
pub fn index_modules(dir: &Path) -> Result<BTreeMap<String, PathBuf>, KernelError> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).map_err(io_err(&d))? {
            let entry = entry.map_err(io_err(&d))?;
            let p = entry.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Some(stem) = p
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".ko"))
            {
                out.insert(stem.replace('-', "_"), p);
            }
        }
    }
    Ok(out)
}

/// Resolve `wanted` plus all their dependencies into a load order in which
/// every module comes after the modules it depends on. `deps` gives a
/// module's direct dependencies. Order among independent modules is stable
/// (alphabetical by name) so the result — and the initramfs — is reproducible.
pub fn load_order<F>(wanted: &[&str], mut deps: F) -> Result<Vec<String>, KernelError>
where
    F: FnMut(&str) -> Result<Vec<String>, KernelError>,
{
    let mut order = Vec::new();
    let mut done = BTreeSet::new();
    let mut roots: Vec<&str> = wanted.to_vec();
    roots.sort_unstable();
    for root in roots {
        visit(root, &mut deps, &mut done, &mut BTreeSet::new(), &mut order)?;
    }
    Ok(order)
}

fn visit<F>(
    name: &str,
    deps: &mut F,
    done: &mut BTreeSet<String>,
    active: &mut BTreeSet<String>,
    order: &mut Vec<String>,
) -> Result<(), KernelError>
where
    F: FnMut(&str) -> Result<Vec<String>, KernelError>,
{
    if done.contains(name) {
        return Ok(());
    }
    if !active.insert(name.to_string()) {
        return Err(KernelError::Cycle(name.to_string()));
    }
    let mut ds = deps(name)?;
    ds.sort();
    for d in ds {
        visit(&d, deps, done, active, order)?;
    }
    active.remove(name);
    done.insert(name.to_string());
    order.push(name.to_string());
    Ok(())
}

/// Resolve the guest's modules in `modules_dir` to `(name, path)` in load order.
pub fn resolve_modules(
    modules_dir: &Path,
    wanted: &[&str],
) -> Result<Vec<(String, PathBuf)>, KernelError> {
    let index = index_modules(modules_dir)?;
    let find = |name: &str| -> Result<PathBuf, KernelError> {
        index
            .get(name)
            .cloned()
            .ok_or_else(|| KernelError::MissingModule {
                name: name.to_string(),
                dir: modules_dir.to_path_buf(),
            })
    };
    let order = load_order(wanted, |name| module_depends(&find(name)?))?;
    order
        .into_iter()
        .map(|n| find(&n).map(|p| (n, p)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn legacy(blocks: &[&[u8]]) -> Vec<u8> {
        let mut out = LZ4_LEGACY_MAGIC.to_le_bytes().to_vec();
        let mut total = 0;
        for b in blocks {
            let c = lz4_flex::block::compress(b);
            out.extend_from_slice(&(c.len() as u32).to_le_bytes());
            out.extend_from_slice(&c);
            total += b.len();
        }
        out.extend_from_slice(&(total as u32).to_le_bytes());
        out
    }

    #[test]
    fn lz4_legacy_round_trip() {
        let a = vec![7u8; 100_000];
        let b: Vec<u8> = (0..50_000u32).map(|i| (i * 31 % 251) as u8).collect();
        let out = lz4_legacy_decompress(&legacy(&[&a, &b])).unwrap();
        assert_eq!(out.len(), a.len() + b.len());
        assert_eq!(&out[..a.len()], &a[..]);
        assert_eq!(&out[a.len()..], &b[..]);
    }

    #[test]
    fn lz4_legacy_rejects_wrong_trailer_and_magic() {
        let mut data = legacy(&[b"hello hello hello"]);
        let n = data.len();
        data[n - 4..].copy_from_slice(&999u32.to_le_bytes());
        assert!(matches!(
            lz4_legacy_decompress(&data),
            Err(KernelError::SizeMismatch { want: 999, .. })
        ));
        assert!(matches!(
            lz4_legacy_decompress(b"\x1f\x8b\x08\x00xx"),
            Err(KernelError::NotLz4(_))
        ));
        assert!(matches!(
            lz4_legacy_decompress(b"\x02"),
            Err(KernelError::NotLz4([0, 0, 0, 0]))
        ));
    }

    #[test]
    fn lz4_legacy_corrupt_block_is_an_error() {
        let mut data = LZ4_LEGACY_MAGIC.to_le_bytes().to_vec();
        data.extend_from_slice(&8u32.to_le_bytes());
        data.extend_from_slice(&[0xff; 8]);
        data.extend_from_slice(&[0, 0, 0, 0]);
        assert!(matches!(
            lz4_legacy_decompress(&data),
            Err(KernelError::Lz4Block { .. })
        ));
    }

    #[test]
    fn bzimage_payload_uses_setup_header() {
        let mut bz = vec![0u8; 4096];
        bz[0x1f1] = 3;
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        bz[0x248..0x24c].copy_from_slice(&16u32.to_le_bytes());
        bz[0x24c..0x250].copy_from_slice(&5u32.to_le_bytes());
        bz[4 * 512 + 16..4 * 512 + 21].copy_from_slice(b"LZ4!!");
        assert_eq!(bzimage_payload(&bz, "t").unwrap(), b"LZ4!!");
        bz[0x24c..0x250].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            bzimage_payload(&bz, "t"),
            Err(KernelError::PayloadBounds { .. })
        ));
        assert!(matches!(
            bzimage_payload(&[0u8; 1024], "t"),
            Err(KernelError::NotBzImage(_))
        ));
    }

    #[test]
    fn modinfo_depends_parsing() {
        let data = b"license=GPL\0depends=virtio,virtio_ring\0intree=Y\0";
        assert_eq!(parse_modinfo_depends(data), vec!["virtio", "virtio_ring"]);
        assert!(parse_modinfo_depends(b"depends=\0").is_empty());
    }

    #[test]
    fn load_order_puts_dependencies_first() {
        let graph: BTreeMap<&str, Vec<&str>> = [
            ("virtio_net", vec!["virtio_ring", "virtio", "net_failover"]),
            ("net_failover", vec!["failover"]),
            ("failover", vec![]),
            ("virtio", vec!["virtio_ring"]),
            ("virtio_ring", vec![]),
            ("virtio_blk", vec!["virtio", "virtio_ring"]),
        ]
        .into_iter()
        .collect();
        let order = load_order(&["virtio_net", "virtio_blk"], |n| {
            Ok(graph[n].iter().map(|s| s.to_string()).collect())
        })
        .unwrap();
        let pos = |n: &str| order.iter().position(|m| m == n).unwrap();
        for (m, ds) in &graph {
            for d in ds {
                assert!(pos(d) < pos(m), "{d} must load before {m}: {order:?}");
            }
        }
        assert_eq!(order.len(), graph.len());
    }

    #[test]
    fn load_order_detects_cycles() {
        let r = load_order(&["a"], |n| {
            Ok(vec![if n == "a" { "b" } else { "a" }.to_string()])
        });
        assert!(matches!(r, Err(KernelError::Cycle(_))));
    }
}
