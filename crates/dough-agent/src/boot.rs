//! Early boot as PID 1: pseudo filesystems, modules, the read-only root with a
//! tmpfs overlay, switching root, and the network.

use std::path::Path;
use std::time::{Duration, Instant};

use nix::mount::{mount, MsFlags};

use crate::{log, sys};

/// Settings the host passes on the kernel command line (`dough.KEY=VALUE`).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BootArgs {
    /// Block device holding the root filesystem.
    pub root: String,
    /// `root` came from `dough.root=` (else the disk with the root serial,
    /// or `/dev/vda`, is used).
    pub root_given: bool,
    /// `ADDR/PREFIX` for eth0, when the VM has a NIC.
    pub ip: Option<(std::net::Ipv4Addr, u8)>,
    pub gateway: Option<std::net::Ipv4Addr>,
    /// `dough.rootrw=1`: mount the root device read-write as the root
    /// itself, no overlay (an image builder's writable copy of a rootfs).
    pub root_rw: bool,
    /// `dough.scratch=1`: a disk of its own (serial `dough-scratch`) holds
    /// the writable layer instead of RAM.
    pub scratch: bool,
}

/// Serial numbers the host gives the disks (QEMU; Firecracker's single
/// disk has none and is `root`).
const ROOT_SERIAL: &str = "dough-root";
const SCRATCH_SERIAL: &str = "dough-scratch";

impl BootArgs {
    pub fn parse(cmdline: &str) -> Self {
        let mut a = BootArgs {
            root: "/dev/vda".into(),
            ..Default::default()
        };
        for word in cmdline.split_whitespace() {
            let Some((k, v)) = word.split_once('=') else {
                continue;
            };
            match k {
                "dough.root" => {
                    a.root = v.to_string();
                    a.root_given = true;
                }
                "dough.ip" => {
                    a.ip = v.split_once('/').and_then(|(ip, p)| {
                        Some((ip.parse().ok()?, p.parse().ok().filter(|p| *p <= 32)?))
                    })
                }
                "dough.gw" => a.gateway = v.parse().ok(),
                "dough.rootrw" => a.root_rw = v == "1",
                "dough.scratch" => a.scratch = v == "1",
                _ => {}
            }
        }
        a
    }
}

fn mnt(
    src: &str,
    target: &str,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), String> {
    let _ = std::fs::create_dir_all(target);
    mount(Some(src), target, Some(fstype), flags, data)
        .map_err(|e| format!("mount {fstype} on {target}: {e}"))
}

fn move_mount(from: &str, to: &str) -> Result<(), String> {
    let _ = std::fs::create_dir_all(to);
    mount(Some(from), to, None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(|e| format!("move {from} to {to}: {e}"))
}

/// Everything before the agent can take work. Failures are reported on the
/// console and boot continues as far as it can: a half-booted guest that
/// says why is easier to debug than one that stops silently.
/// Periodic kernel work that wakes an idle guest, slowed down: every
/// emulated wake-up costs the host CPU, times every idle clone. The VM
/// statistics' per-CPU counters are folded every 10 s instead of every
/// second (their totals in /proc are that much less fresh).
fn quiet_kernel_timers() {
    if let Err(e) = std::fs::write("/proc/sys/vm/stat_interval", b"10") {
        log(&format!("vm.stat_interval: {e}"));
    }
}

pub fn boot() -> BootArgs {
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    for (src, target, fs, flags, data) in [
        ("proc", "/proc", "proc", nosuid, None),
        ("sysfs", "/sys", "sysfs", nosuid, None),
        (
            "devtmpfs",
            "/dev",
            "devtmpfs",
            MsFlags::MS_NOSUID,
            Some("mode=0755"),
        ),
    ] {
        if let Err(e) = mnt(src, target, fs, flags, data) {
            log(&e);
        }
    }
    let args = BootArgs::parse(&std::fs::read_to_string("/proc/cmdline").unwrap_or_default());
    quiet_kernel_timers();
    load_modules(Path::new("/lib/modules"));
    let (root_dev, scratch_dev) = disks(&args);
    let root = match args.root_rw {
        true => writable_root(&root_dev),
        false => overlay_root(&root_dev, scratch_dev.as_deref()),
    };
    match root {
        Ok(()) => {}
        Err(e) => log(&format!("root filesystem: {e}; staying in the initramfs")),
    }
    for (src, target, fs, flags, data) in [
        (
            "devpts",
            "/dev/pts",
            "devpts",
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("mode=0620,ptmxmode=0666"),
        ),
        (
            "tmpfs",
            "/dev/shm",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=1777"),
        ),
        (
            "tmpfs",
            "/run",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=0755"),
        ),
        (
            "tmpfs",
            "/tmp",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=1777"),
        ),
    ] {
        if let Err(e) = mnt(src, target, fs, flags, data) {
            log(&e);
        }
    }
    if !args.root_rw {
        identity_in_ram();
    }
    let _ = nix::unistd::sethostname("dough");
    if let Err(e) = sys::link_up("lo") {
        log(&format!("bringing up lo: {e}"));
    }
    if Path::new("/sys/class/net/eth0").exists() {
        if let Err(e) = configure_eth0(&args) {
            log(&format!("eth0: {e}"));
        }
    }
    // What booting wrote (the scratch disk's mount, the overlay's
    // directories) goes to disk now: a snapshot of this guest then has no
    // write-back pending, which every clone of it would otherwise do again
    // when it resumes (measured: raw restores of 16 clones at once ran at
    // half the rate from a snapshot that had some).
    nix::unistd::sync();
    args
}

/// The files a guest's identity is written to, `/etc/hostname` and
/// `/etc/machine-id`, are files in RAM bound over those in `/etc`: a clone
/// taking its identity at restore writes nothing to its disk, and the bake
/// (which takes one too) leaves nothing to write back. An image builder
/// (root read-write) keeps the image's own files.
fn identity_in_ram() {
    let dir = Path::new("/run/dough-identity");
    if let Err(e) = std::fs::create_dir_all(dir) {
        return log(&format!("{}: {e}", dir.display()));
    }
    for name in ["hostname", "machine-id"] {
        let etc = Path::new("/etc").join(name);
        let ram = dir.join(name);
        let current = std::fs::read(&etc).unwrap_or_default();
        if let Err(e) = std::fs::write(&ram, current) {
            log(&format!("{}: {e}", ram.display()));
            continue;
        }
        if !etc.exists() {
            if let Err(e) = std::fs::write(&etc, b"") {
                log(&format!("{}: {e}", etc.display()));
                continue;
            }
        }
        if let Err(e) = mount(
            Some(&ram),
            &etc,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        ) {
            log(&format!(
                "binding {} over {}: {e}",
                ram.display(),
                etc.display()
            ));
        }
    }
}

/// Load the modules listed in `dir/load-order`, in that order.
fn load_modules(dir: &Path) {
    let order = match std::fs::read_to_string(dir.join("load-order")) {
        Ok(o) => o,
        Err(e) => return log(&format!("no module list in {}: {e}", dir.display())),
    };
    for name in order.lines().filter(|l| !l.is_empty()) {
        let path = dir.join(format!("{name}.ko"));
        let r = std::fs::File::open(&path).and_then(|f| sys::finit_module(&f));
        match r {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => log(&format!("loading module {name}: {e}")),
        }
    }
}

/// Wait for `path` to exist, up to `limit`.
pub fn wait_for(path: &Path, limit: Duration) -> bool {
    let start = Instant::now();
    while !path.exists() {
        if start.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

/// The device with serial `serial`, from `/sys/block/*/serial`.
fn by_serial(serial: &str) -> Option<String> {
    std::fs::read_dir("/sys/block")
        .ok()?
        .flatten()
        .find_map(|e| {
            let s = std::fs::read_to_string(e.path().join("serial")).ok()?;
            (s.trim() == serial).then(|| format!("/dev/{}", e.file_name().to_string_lossy()))
        })
}

/// The root device and the scratch disk (when the host gave one): found
/// by serial, once they have appeared (within 20 s); the root falls back
/// to `dough.root` (a disk without serials).
fn disks(args: &BootArgs) -> (String, Option<String>) {
    let start = Instant::now();
    loop {
        // An explicit `dough.root=` wins over the serial.
        let root = match args.root_given {
            true => None,
            false => by_serial(ROOT_SERIAL),
        };
        let scratch = by_serial(SCRATCH_SERIAL);
        let have_root = root.is_some() || Path::new(&args.root).exists();
        let done = have_root && (!args.scratch || scratch.is_some());
        if done || start.elapsed() > Duration::from_secs(20) {
            if args.scratch && scratch.is_none() {
                log("the scratch disk did not appear; the writable layer is in RAM");
            }
            return (root.unwrap_or_else(|| args.root.clone()), scratch);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Mount `dev` read-only under an overlay whose writable layer is the
/// `scratch` disk (ext4, made by the host) or else RAM, and make that the
/// root.
fn overlay_root(dev: &str, scratch: Option<&str>) -> Result<(), String> {
    if !wait_for(Path::new(dev), Duration::from_secs(20)) {
        return Err(format!("{dev} did not appear"));
    }
    let ro = MsFlags::MS_RDONLY;
    mnt(dev, "/lower", "ext4", ro, Some("noload"))?;
    // The host's empty filesystem leaves inode tables to be zeroed lazily;
    // a throwaway disk need not be (`noinit_itable`: no background writes).
    let on_disk = scratch.map(|s| {
        mnt(s, "/rw", "ext4", MsFlags::MS_NOATIME, Some("noinit_itable")).map_err(|e| {
            log(&format!(
                "scratch disk {s}: {e}; the writable layer is in RAM"
            ))
        })
    });
    if !matches!(on_disk, Some(Ok(()))) {
        mnt("tmpfs", "/rw", "tmpfs", MsFlags::empty(), Some("mode=0755"))?;
    }
    for d in ["/rw/upper", "/rw/work"] {
        std::fs::create_dir_all(d).map_err(|e| format!("mkdir {d}: {e}"))?;
    }
    mnt(
        "overlay",
        "/newroot",
        "overlay",
        MsFlags::empty(),
        Some("lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work"),
    )?;
    switch_root()
}

/// Mount `dev` read-write (ext4) and make it the root: an image builder's
/// own copy of a rootfs, which its run steps change for good.
fn writable_root(dev: &str) -> Result<(), String> {
    if !wait_for(Path::new(dev), Duration::from_secs(20)) {
        return Err(format!("{dev} did not appear"));
    }
    mnt(dev, "/newroot", "ext4", MsFlags::empty(), None)?;
    switch_root()
}

/// Move the pseudo filesystems under `/newroot` and make it the root.
fn switch_root() -> Result<(), String> {
    for d in ["/dev", "/proc", "/sys"] {
        move_mount(d, &format!("/newroot{d}"))?;
    }
    std::env::set_current_dir("/newroot").map_err(|e| format!("chdir /newroot: {e}"))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(|e| format!("move root: {e}"))?;
    nix::unistd::chroot(".").map_err(|e| format!("chroot: {e}"))?;
    std::env::set_current_dir("/").map_err(|e| format!("chdir /: {e}"))?;
    Ok(())
}

fn configure_eth0(args: &BootArgs) -> Result<(), String> {
    sys::link_up("eth0").map_err(|e| format!("link up: {e}"))?;
    if let Some((addr, prefix)) = args.ip {
        let mask = std::net::Ipv4Addr::from(u32::MAX.checked_shl(32 - prefix as u32).unwrap_or(0));
        sys::set_ipv4("eth0", addr, mask).map_err(|e| format!("address {addr}/{prefix}: {e}"))?;
        if let Some(gw) = args.gateway {
            sys::add_default_route(gw).map_err(|e| format!("default route via {gw}: {e}"))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cmdline() {
        let a = BootArgs::parse(
            "console=ttyS0 quiet dough.ip=172.16.0.2/30 dough.gw=172.16.0.1 rdinit=/init",
        );
        assert_eq!(a.root, "/dev/vda");
        assert_eq!(a.ip, Some(("172.16.0.2".parse().unwrap(), 30)));
        assert_eq!(a.gateway, Some("172.16.0.1".parse().unwrap()));
        let b = BootArgs::parse("dough.root=/dev/vdb dough.ip=garbage dough.gw=1.2.3");
        assert_eq!(b.root, "/dev/vdb");
        assert!(b.root_given && !a.root_given);
        assert_eq!((b.ip, b.gateway), (None, None));
        assert_eq!(BootArgs::parse("dough.ip=10.0.0.1/33").ip, None);
        assert!(!a.root_rw);
        assert!(BootArgs::parse("dough.rootrw=1").root_rw);
        assert!(!BootArgs::parse("dough.rootrw=yes").root_rw);
        assert!(BootArgs::parse("dough.scratch=1").scratch);
        assert!(!a.scratch);
    }
}
