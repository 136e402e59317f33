//! Typed argv for `qemu-system-x86_64 -M microvm`.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use crate::accel::Resolved;

/// Host-side files one VM owns, all inside its own directory (named from
/// the VM id), so no two VMs share a path.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VmPaths {
    pub dir: PathBuf,
    pub qmp: PathBuf,
    pub channel: PathBuf,
    pub serial: PathBuf,
    pub vmm_log: PathBuf,
    /// Firecracker's API socket.
    pub api: PathBuf,
    /// Firecracker's hybrid vsock socket; guest-initiated connections to
    /// host port P arrive on `<vsock>_P`.
    pub vsock: PathBuf,
    /// The VM's own scratch disk (the writable layer), when it has one.
    pub scratch: PathBuf,
}

impl VmPaths {
    pub fn new(dir: &Path) -> Self {
        VmPaths {
            dir: dir.to_path_buf(),
            qmp: dir.join("qmp.sock"),
            channel: dir.join("channel.sock"),
            serial: dir.join("serial.log"),
            vmm_log: dir.join("vmm.log"),
            api: dir.join("api.sock"),
            vsock: dir.join("vsock.sock"),
            scratch: dir.join("scratch.img"),
        }
    }
}

/// Everything that shapes a QEMU microvm command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuArgs {
    pub accel: Resolved,
    pub mem_mib: u32,
    pub cpus: u32,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// Attached read-only as a virtio-blk device (`/dev/vda` in the guest).
    pub rootfs: PathBuf,
    /// Attach it read-write instead (with discard passed through, so that
    /// blocks the guest frees become holes again): an image builder's copy.
    pub rootfs_writable: bool,
    /// A second, writable disk (`paths.scratch`, serial `dough-scratch`):
    /// the guest's writable layer.
    pub scratch: bool,
    /// Kernel command line after dough's fixed prefix.
    pub extra_cmdline: Vec<String>,
    /// Host TSC rate, passed to TCG guests (see [`crate::accel::host_tsc_khz`]).
    pub tsc_khz: Option<u64>,
    pub paths: VmPaths,
    /// Where guest RAM lives.
    pub memory: Memory,
    /// Wait for an incoming migration instead of booting.
    pub incoming: Option<Incoming>,
    /// Start with vCPUs stopped (`-S`); QMP `cont` runs them.
    pub start_paused: bool,
    /// A virtio-net NIC on this TAP (which QEMU opens by name, so it must
    /// exist in the namespace QEMU runs in).
    pub tap: Option<String>,
    /// TCG's translated-code cache, MiB (`-accel tcg,tb-size=`); None:
    /// QEMU's default (1 GiB, touched as code is translated). Host-side
    /// only: no part of a snapshot.
    pub tcg_cache_mib: Option<u32>,
}

/// Serial numbers of the guest's disks (`/sys/block/*/serial`).
pub const ROOT_SERIAL: &str = "dough-root";
pub const SCRATCH_SERIAL: &str = "dough-scratch";

/// The guest NIC's MAC address: the same in every clone (clones are
/// byte-identical and never share a link).
pub const GUEST_MAC: &str = "52:54:00:d0:06:01";

/// Guest RAM backing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Memory {
    /// Ordinary anonymous memory (a cold boot that is never snapshotted).
    Anonymous,
    /// RAM is the file at `path`. `shared`: writes go to the file (bake);
    /// otherwise the file is mapped privately, copy-on-write (clones).
    File { path: PathBuf, shared: bool },
    /// Anonymous memory under the name a snapshot's RAM has (`mem`): a
    /// clone of a live clone's snapshot, whose RAM comes in the stream.
    Named,
}

/// Where an incoming migration comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// `-incoming defer`: QMP `migrate-incoming` names the source later.
    Defer,
    /// Read the migration stream from `file` at start (`exec:cat FILE`).
    File(PathBuf),
}

/// The device set dough's argv gives a guest, versioned: a snapshot can
/// only be restored into the same set, so snapshot keys include this.
pub const DEVICE_SET: &str =
    "microvm,pit=off/rng,blk-ro:root,virtio-serial:dough.0,net:tap,serial:ttyS0/v3";

/// The machine: microvm without its i8254 PIT. The guest keeps time with
/// the TSC and its local APIC timer and never uses the PIT, but QEMU's
/// emulation of one left running from reset (channel 0, square wave)
/// woke every idle VMM's main loop at each edge, every 27.5 ms.
const MACHINE: &str = "microvm,pit=off";

/// A migration URI that streams to (`save`) or from a file through `cat`.
/// QEMU runs `exec:` URIs with `/bin/sh -c`, so the path is shell-quoted.
pub fn exec_uri(path: &Path, save: bool) -> String {
    let quoted = format!("'{}'", path.to_string_lossy().replace('\'', "'\\''"));
    if save {
        format!("exec:cat > {quoted}")
    } else {
        format!("exec:cat {quoted}")
    }
}

/// Fixed kernel command line: serial console, quiet, reboot = exit (QEMU is
/// started with `-no-reboot`), panic reboots at once, the agent is init.
/// No lockup detectors and no clocksource watchdog: periodic timers that
/// wake every idle guest (an emulated wake-up costs host CPU; together
/// they took idle clones from 0.72 to 0.53 % of a core each, measured with
/// `dough bench density`). The TSC a VMM gives its guest is the host's
/// clock, and a snapshot is restored on the host that made it.
/// The other periodic work an idle guest did, found by tracing one
/// (timer and workqueue events) and each measured away with `dough bench
/// density --clones 8` (idle CPU per clone, with the PIT already gone:
/// 0.32–0.36 % → 0.14 % with the first two, 0.044 % with all four):
/// pressure-stall averaging every 2 s (`psi=0`), proactive compaction's
/// kcompactd wake-up every 500 ms, the memory controller's statistics
/// flush every 2 s (the guest's own cgroups have no memory controller:
/// dough bounds the VM from outside, in the host's cgroup), and vmstat's
/// per-second refresh (every 10 s instead).
pub const BASE_CMDLINE: &[&str] = &[
    "console=ttyS0",
    "quiet",
    "reboot=t",
    "panic=-1",
    "rdinit=/init",
    "nowatchdog",
    "tsc=reliable",
    "psi=0",
    "cgroup_disable=memory",
    "sysctl.vm.compaction_proactiveness=0",
    "sysctl.vm.stat_interval=10",
];

impl QemuArgs {
    pub fn cmdline(&self) -> String {
        let mut parts: Vec<String> = BASE_CMDLINE.iter().map(|s| s.to_string()).collect();
        if let (Resolved::Tcg, Some(khz)) = (self.accel, self.tsc_khz) {
            parts.push(format!("tsc_early_khz={khz}"));
        }
        parts.extend(self.extra_cmdline.iter().cloned());
        parts.join(" ")
    }

    pub fn argv(&self) -> Vec<OsString> {
        let p = &self.paths;
        let mut v: Vec<OsString> = Vec::new();
        let mut push = |a: &str, b: OsString| {
            v.push(a.into());
            if !b.is_empty() {
                v.push(b);
            }
        };
        match &self.memory {
            Memory::Anonymous => push("-M", MACHINE.into()),
            Memory::Named => {
                push("-M", format!("{MACHINE},memory-backend=mem").into());
                push(
                    "-object",
                    format!("memory-backend-ram,id=mem,size={}M", self.mem_mib).into(),
                );
            }
            Memory::File { path, shared } => {
                push("-M", format!("{MACHINE},memory-backend=mem").into());
                let mut o = opt_path(
                    &format!(
                        "memory-backend-file,id=mem,size={}M,mem-path=",
                        self.mem_mib
                    ),
                    path,
                );
                o.push(if *shared { ",share=on" } else { ",share=off" });
                push("-object", o);
            }
        }
        match (self.accel, self.tcg_cache_mib) {
            (Resolved::Tcg, Some(mib)) => push("-accel", format!("tcg,tb-size={mib}").into()),
            _ => push("-accel", self.accel.qemu_name().into()),
        }
        push(
            "-cpu",
            if self.accel == Resolved::Kvm {
                "host"
            } else {
                "max"
            }
            .into(),
        );
        push("-m", self.mem_mib.to_string().into());
        push("-smp", self.cpus.to_string().into());
        for flag in ["-nodefaults", "-no-user-config", "-no-reboot"] {
            push(flag, OsString::new());
        }
        push("-display", "none".into());
        push("-kernel", self.kernel.clone().into());
        push("-initrd", self.initrd.clone().into());
        push("-append", self.cmdline().into());
        // The rng device comes first so the guest has entropy early; the
        // agent finds its port by name, not by device order.
        push("-object", "rng-random,id=rng0,filename=/dev/urandom".into());
        push("-device", "virtio-rng-device,rng=rng0".into());
        let drive = match self.rootfs_writable {
            true => "id=root,format=raw,if=none,discard=unmap,file=",
            false => "id=root,format=raw,if=none,readonly=on,file=",
        };
        push("-drive", opt_path(drive, &self.rootfs));
        // The agent finds its disks by serial, not by probe order.
        push(
            "-device",
            format!("virtio-blk-device,drive=root,serial={ROOT_SERIAL}").into(),
        );
        if self.scratch {
            push(
                "-drive",
                opt_path(
                    "id=scratch,format=raw,if=none,discard=unmap,file=",
                    &p.scratch,
                ),
            );
            push(
                "-device",
                format!("virtio-blk-device,drive=scratch,serial={SCRATCH_SERIAL}").into(),
            );
        }
        push("-device", "virtio-serial-device".into());
        push(
            "-chardev",
            opt_path("socket,id=ch0,server=on,wait=off,path=", &p.channel),
        );
        push(
            "-device",
            format!("virtserialport,chardev=ch0,name={}", dough_port_name()).into(),
        );
        if let Some(tap) = &self.tap {
            push(
                "-netdev",
                format!("tap,id=n0,ifname={tap},script=no,downscript=no").into(),
            );
            push(
                "-device",
                format!("virtio-net-device,netdev=n0,mac={GUEST_MAC}").into(),
            );
        }
        push("-serial", opt_path("file:", &p.serial));
        let mut qmp = opt_path("unix:", &p.qmp);
        qmp.push(",server=on,wait=off");
        push("-qmp", qmp);
        if self.start_paused {
            push("-S", OsString::new());
        }
        match &self.incoming {
            None => {}
            Some(Incoming::Defer) => push("-incoming", "defer".into()),
            Some(Incoming::File(f)) => push("-incoming", exec_uri(f, false).into()),
        }
        v
    }
}

fn dough_port_name() -> &'static str {
    "dough.0"
}

/// QEMU option values are comma separated; a comma inside a path is
/// escaped by doubling it.
fn opt_path(prefix: &str, path: &Path) -> OsString {
    let s = path.to_string_lossy().replace(',', ",,");
    format!("{prefix}{s}").into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(accel: Resolved) -> QemuArgs {
        QemuArgs {
            accel,
            mem_mib: 256,
            cpus: 1,
            kernel: "/img/vmlinux".into(),
            initrd: "/img/initrd.cpio".into(),
            rootfs: "/img/root,fs.ext4".into(),
            rootfs_writable: false,
            scratch: false,
            extra_cmdline: vec!["dough.root=/dev/vda".into()],
            tsc_khz: Some(2_100_000),
            paths: VmPaths::new(Path::new("/h/vms/vm-1")),
            memory: Memory::Anonymous,
            incoming: None,
            start_paused: false,
            tap: None,
            tcg_cache_mib: None,
        }
    }

    #[test]
    fn a_tcg_code_cache_of_a_given_size() {
        let mut a = args(Resolved::Tcg);
        a.tcg_cache_mib = Some(32);
        assert!(strings(&a)
            .windows(2)
            .any(|w| w == ["-accel", "tcg,tb-size=32"]));
        // KVM translates nothing.
        let mut k = args(Resolved::Kvm);
        k.tcg_cache_mib = Some(32);
        assert!(strings(&k).windows(2).any(|w| w == ["-accel", "kvm"]));
    }

    #[test]
    fn named_anonymous_ram_for_a_live_clones_snapshot() {
        // A live clone's stream names its RAM block `mem`: the restoring
        // QEMU needs a block of that name, in memory of its own.
        let mut a = args(Resolved::Tcg);
        a.memory = Memory::Named;
        let argv = strings(&a);
        assert!(argv
            .windows(2)
            .any(|w| w == ["-M", "microvm,pit=off,memory-backend=mem"]));
        assert!(argv
            .windows(2)
            .any(|w| w == ["-object", "memory-backend-ram,id=mem,size=256M"]));
        assert!(!argv.iter().any(|s| s.contains("mem-path")));
    }

    #[test]
    fn nic_on_a_named_tap() {
        let mut a = args(Resolved::Tcg);
        a.tap = Some("tap0".into());
        let argv = strings(&a);
        assert!(argv
            .windows(2)
            .any(|w| w == ["-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no"]));
        assert!(argv.windows(2).any(|w| w
            == [
                "-device",
                "virtio-net-device,netdev=n0,mac=52:54:00:d0:06:01"
            ]));
    }

    fn strings(a: &QemuArgs) -> Vec<String> {
        a.argv()
            .into_iter()
            .map(|s| s.into_string().unwrap())
            .collect()
    }

    #[test]
    fn bake_maps_ram_from_a_shared_file() {
        let mut a = args(Resolved::Tcg);
        a.memory = Memory::File {
            path: "/snap/mem".into(),
            shared: true,
        };
        let argv = strings(&a);
        assert_eq!(argv[..2], ["-M", "microvm,pit=off,memory-backend=mem"]);
        assert!(argv.windows(2).any(|w| w
            == [
                "-object",
                "memory-backend-file,id=mem,size=256M,mem-path=/snap/mem,share=on"
            ]));
        assert!(!argv.iter().any(|s| s == "-incoming" || s == "-S"));
    }

    #[test]
    fn clone_maps_ram_privately_and_waits_for_incoming() {
        let mut a = args(Resolved::Tcg);
        a.memory = Memory::File {
            path: "/snap/mem".into(),
            shared: false,
        };
        a.incoming = Some(Incoming::Defer);
        a.start_paused = true;
        let argv = strings(&a);
        assert!(argv
            .iter()
            .any(|s| s.ends_with("mem-path=/snap/mem,share=off")));
        assert_eq!(argv[argv.len() - 3..], ["-S", "-incoming", "defer"]);
        // Same device set as the bake: only memory sharing and incoming differ.
        let mut bake = a.clone();
        bake.memory = Memory::File {
            path: "/snap/mem".into(),
            shared: true,
        };
        bake.incoming = None;
        bake.start_paused = false;
        let b = strings(&bake);
        let strip = |v: &[String]| -> Vec<String> {
            v.iter()
                .filter(|s| {
                    !s.contains("share=") && *s != "-S" && *s != "-incoming" && *s != "defer"
                })
                .cloned()
                .collect()
        };
        assert_eq!(strip(&argv), strip(&b));
    }

    #[test]
    fn incoming_from_file_is_shell_quoted() {
        let mut a = args(Resolved::Tcg);
        a.incoming = Some(Incoming::File("/x/it's here".into()));
        let argv = strings(&a);
        assert_eq!(argv.last().unwrap(), "exec:cat '/x/it'\\''s here'");
        assert_eq!(exec_uri(Path::new("/a b"), true), "exec:cat > '/a b'");
    }

    #[test]
    fn tcg_argv() {
        let argv: Vec<String> = args(Resolved::Tcg)
            .argv()
            .into_iter()
            .map(|s| s.into_string().unwrap())
            .collect();
        let expect = [
            "-M", "microvm,pit=off", "-accel", "tcg", "-cpu", "max", "-m", "256", "-smp", "1",
            "-nodefaults", "-no-user-config", "-no-reboot", "-display", "none",
            "-kernel", "/img/vmlinux", "-initrd", "/img/initrd.cpio",
            "-append", "console=ttyS0 quiet reboot=t panic=-1 rdinit=/init nowatchdog tsc=reliable psi=0 cgroup_disable=memory sysctl.vm.compaction_proactiveness=0 sysctl.vm.stat_interval=10 tsc_early_khz=2100000 dough.root=/dev/vda",
            "-object", "rng-random,id=rng0,filename=/dev/urandom", "-device", "virtio-rng-device,rng=rng0",
            "-drive", "id=root,format=raw,if=none,readonly=on,file=/img/root,,fs.ext4",
            "-device", "virtio-blk-device,drive=root,serial=dough-root",
            "-device", "virtio-serial-device",
            "-chardev", "socket,id=ch0,server=on,wait=off,path=/h/vms/vm-1/channel.sock",
            "-device", "virtserialport,chardev=ch0,name=dough.0",
            "-serial", "file:/h/vms/vm-1/serial.log",
            "-qmp", "unix:/h/vms/vm-1/qmp.sock,server=on,wait=off",
        ];
        assert_eq!(argv, expect);
    }

    #[test]
    fn kvm_uses_host_cpu_and_no_tsc_hint() {
        let a = args(Resolved::Kvm);
        let argv: Vec<String> = a
            .argv()
            .into_iter()
            .map(|s| s.into_string().unwrap())
            .collect();
        assert!(argv.windows(2).any(|w| w == ["-accel", "kvm"]));
        assert!(argv.windows(2).any(|w| w == ["-cpu", "host"]));
        assert!(!a.cmdline().contains("tsc_early_khz"));
    }

    #[test]
    fn rootfs_is_read_only() {
        let argv = args(Resolved::Tcg).argv();
        let drive = argv
            .iter()
            .map(|s| s.to_string_lossy())
            .find(|s| s.starts_with("id=root"))
            .unwrap()
            .to_string();
        assert!(drive.contains("readonly=on"));
    }
}
