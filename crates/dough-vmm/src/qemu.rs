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
}

impl VmPaths {
    pub fn new(dir: &Path) -> Self {
        VmPaths {
            dir: dir.to_path_buf(),
            qmp: dir.join("qmp.sock"),
            channel: dir.join("channel.sock"),
            serial: dir.join("serial.log"),
            vmm_log: dir.join("qemu.log"),
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
    /// Kernel command line after dough's fixed prefix.
    pub extra_cmdline: Vec<String>,
    /// Host TSC rate, passed to TCG guests (see [`crate::accel::host_tsc_khz`]).
    pub tsc_khz: Option<u64>,
    pub paths: VmPaths,
}

/// Fixed kernel command line: serial console, quiet, reboot = exit (QEMU is
/// started with `-no-reboot`), panic reboots at once, the agent is init.
pub const BASE_CMDLINE: &[&str] = &[
    "console=ttyS0",
    "quiet",
    "reboot=t",
    "panic=-1",
    "rdinit=/init",
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
        push("-M", "microvm".into());
        push("-accel", self.accel.qemu_name().into());
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
        push(
            "-drive",
            opt_path("id=root,format=raw,if=none,readonly=on,file=", &self.rootfs),
        );
        push("-device", "virtio-blk-device,drive=root".into());
        push("-device", "virtio-serial-device".into());
        push(
            "-chardev",
            opt_path("socket,id=ch0,server=on,wait=off,path=", &p.channel),
        );
        push(
            "-device",
            format!("virtserialport,chardev=ch0,name={}", dough_port_name()).into(),
        );
        push("-serial", opt_path("file:", &p.serial));
        let mut qmp = opt_path("unix:", &p.qmp);
        qmp.push(",server=on,wait=off");
        push("-qmp", qmp);
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
            extra_cmdline: vec!["dough.root=/dev/vda".into()],
            tsc_khz: Some(2_100_000),
            paths: VmPaths::new(Path::new("/h/vms/vm-1")),
        }
    }

    #[test]
    fn tcg_argv() {
        let argv: Vec<String> = args(Resolved::Tcg)
            .argv()
            .into_iter()
            .map(|s| s.into_string().unwrap())
            .collect();
        let expect = [
            "-M", "microvm", "-accel", "tcg", "-cpu", "max", "-m", "256", "-smp", "1",
            "-nodefaults", "-no-user-config", "-no-reboot", "-display", "none",
            "-kernel", "/img/vmlinux", "-initrd", "/img/initrd.cpio",
            "-append", "console=ttyS0 quiet reboot=t panic=-1 rdinit=/init tsc_early_khz=2100000 dough.root=/dev/vda",
            "-object", "rng-random,id=rng0,filename=/dev/urandom", "-device", "virtio-rng-device,rng=rng0",
            "-drive", "id=root,format=raw,if=none,readonly=on,file=/img/root,,fs.ext4",
            "-device", "virtio-blk-device,drive=root",
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
