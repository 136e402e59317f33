//! The options every command that boots a VM shares (`VmArgs`), and how
//! they become an image and boot options.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, ValueEnum};
use dough_fabric::BootOptions;
use dough_image::{Image, Store};
use dough_vmm::{Accel, Backend, Resolved};

use crate::cli::Ctx;
use crate::image_cmd::{self, AgentArg, BuildArgs};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AccelArg {
    /// KVM when it is present and boots a guest in time, else TCG.
    Auto,
    /// Hardware virtualisation (the only real isolation boundary).
    Kvm,
    /// Software emulation: works everywhere, is not a security boundary.
    Tcg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendArg {
    /// QEMU microvm: KVM when usable, else TCG; runs everywhere.
    Qemu,
    /// Firecracker: needs usable KVM and a firecracker binary
    /// (--firecracker / DOUGH_FIRECRACKER); docs/firecracker.md.
    Firecracker,
}

impl From<BackendArg> for Backend {
    fn from(b: BackendArg) -> Backend {
        match b {
            BackendArg::Qemu => Backend::Qemu,
            BackendArg::Firecracker => Backend::Firecracker,
        }
    }
}

impl From<AccelArg> for Accel {
    fn from(a: AccelArg) -> Accel {
        match a {
            AccelArg::Auto => Accel::Auto,
            AccelArg::Kvm => Accel::Kvm,
            AccelArg::Tcg => Accel::Tcg,
        }
    }
}

/// `--scratch`: a size or `none`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScratchArg {
    None,
    Mib(u64),
}

/// Scratch disks dough makes when none is asked for (QEMU).
pub const DEFAULT_SCRATCH_MIB: u64 = 4096;

impl std::str::FromStr for ScratchArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "none" {
            return Ok(ScratchArg::None);
        }
        let bad = || format!("{s:?} is not a size like 4G or 512M, or none");
        let (num, unit) = s.split_at(s.len().saturating_sub(1));
        let mult = match unit {
            "G" | "g" => 1024,
            "M" | "m" => 1,
            _ => return Err(bad()),
        };
        let mib = num
            .parse::<u64>()
            .map_err(|_| bad())?
            .checked_mul(mult)
            .ok_or_else(bad)?;
        if !(64..=(1 << 20)).contains(&mib) {
            return Err(format!("{s}: a scratch disk is 64M to 1024G"));
        }
        Ok(ScratchArg::Mib(mib))
    }
}

/// Options shared by every command that boots a VM.
#[derive(Debug, Clone, Args)]
pub struct VmArgs {
    /// Which VMM runs the VMs. Snapshots are baked per backend; clones
    /// restore with the backend of their snapshot.
    #[arg(long, value_enum, default_value = "qemu", env = "DOUGH_BACKEND")]
    pub backend: BackendArg,
    /// Firecracker binary (for --backend firecracker); no registry ships
    /// one, so point dough at a release binary.
    #[arg(
        long,
        default_value = "firecracker",
        env = "DOUGH_FIRECRACKER",
        value_name = "PATH"
    )]
    pub firecracker: PathBuf,
    /// Start Firecracker with `--enable-pci` (virtio over PCI instead of
    /// MMIO; Firecracker 1.13+). Part of the snapshot key.
    #[arg(long, env = "DOUGH_FIRECRACKER_PCI")]
    pub firecracker_pci: bool,
    /// Accelerator (QEMU; Firecracker always uses KVM).
    #[arg(long, value_enum, default_value = "auto", env = "DOUGH_ACCEL")]
    pub accel: AccelArg,
    /// Guest memory in MiB (default: what the image's recipe asks for, else 256).
    #[arg(long)]
    pub mem: Option<u32>,
    /// Guest vCPUs.
    #[arg(long, default_value_t = 1)]
    pub cpus: u32,
    /// Seconds one boot attempt may take before it counts as failed (one retry follows).
    #[arg(long, default_value_t = 60, value_name = "SECS")]
    pub boot_timeout: u64,
    /// QEMU binary.
    #[arg(long, default_value = "qemu-system-x86_64", env = "DOUGH_QEMU")]
    pub qemu: PathBuf,
    /// Image to boot: an image id (`dough image ls`), or a recipe file
    /// whose image is built first if it is not yet (default: the current
    /// image; built if there is none).
    #[arg(long, value_name = "ID|RECIPE")]
    pub image: Option<String>,
    /// Extra kernel command-line argument (repeatable), e.g. `ignore_loglevel`
    /// to see every kernel message in `serial.log`.
    #[arg(long = "kernel-arg", value_name = "ARG")]
    pub kernel_args: Vec<String>,
    /// Under TCG: QEMU's translated-code cache per VM, in MiB (default:
    /// QEMU's 1 GiB, filled as code runs). A small one caps each clone's
    /// memory; code that no longer fits is translated again (CPU).
    #[arg(long, value_name = "MIB", env = "DOUGH_TCG_CACHE", value_parser = clap::value_parser!(u32).range(1..=2048))]
    pub tcg_cache: Option<u32>,
    /// What the VM's network may reach, through its egress gateway: `nat`
    /// (anything beyond this host), `none` (no way out), or `allow=RULE,...`
    /// where a rule is a host name (`api.example.com`), `*.domain` or a
    /// CIDR, each with an optional `:PORT` (names: 443 and 80 by default).
    /// Names are checked against what the client asks for (TLS SNI, HTTP
    /// Host) and resolved by the host (docs/network.md).
    #[arg(long, default_value = "nat", env = "DOUGH_NET", value_name = "POLICY")]
    pub net: dough_net::Egress,
    /// Pool the per-clone /30 transfer subnets are taken from.
    #[arg(long, default_value = dough_net::plan::DEFAULT_POOL, env = "DOUGH_NET_POOL", value_name = "CIDR")]
    pub net_pool: dough_net::Ipv4Net,
    /// Certificates clones with a network trust besides their image's
    /// (repeatable): `host` takes this host's bundle (e.g. behind a
    /// TLS-intercepting proxy whose CA the host trusts), or a PEM file. Put
    /// into the clone's system bundle at restore; NODE_EXTRA_CA_CERTS and
    /// friends point at them.
    #[arg(long = "ca", value_name = "host|FILE")]
    pub ca: Vec<String>,
    /// The guest's writable layer: a disk of its own of this size (sparse:
    /// it takes only what the guest writes; `8G`, `512M`), so a workspace
    /// may be larger than guest memory, or `none` for RAM (tmpfs). Default
    /// 4G with QEMU, none with Firecracker. Part of the snapshot key; the
    /// disk goes with its VM.
    #[arg(long, value_name = "SIZE|none", env = "DOUGH_SCRATCH")]
    pub scratch: Option<ScratchArg>,
    #[command(flatten)]
    pub agent: AgentArg,
}

/// The image to boot: the one named (an image id, or a recipe file whose
/// image is built if it is not yet), else the current one, else build it.
pub fn resolve_image(ctx: &Ctx, vm: &VmArgs) -> anyhow::Result<Image> {
    let home = &ctx.home;
    let store = Store::new(home);
    if let Some(id) = &vm.image {
        if Path::new(id).is_file() {
            return image_cmd::build_recipe(ctx, Path::new(id), &BuildArgs::for_vm(vm));
        }
        return Ok(store.get(id)?);
    }
    match store.current() {
        Ok(img) => Ok(img),
        Err(dough_image::ImageError::NoImage) => {
            eprintln!("dough: no guest image yet; building one (first time only)");
            let img = image_cmd::build(home, &BuildArgs::plain(vm.agent.clone()))?;
            store.set_current(&img.id)?;
            Ok(img)
        }
        Err(e) => Err(e.into()),
    }
}

/// The host network VMs are built on: the real one. A test build
/// (`--features test-hooks`) can be told to stop for good before the N-th
/// step of building a network (`DOUGH_TEST_HOLD_IN_NET_SETUP=N`), for the
/// test that SIGKILLs dough there; a release build has no such switch.
pub fn host_net() -> dough_fabric::host::HostNet {
    let net = dough_fabric::host::HostNet::linux();
    // Every clone with egress gets a gateway: the `dough-gateway` program
    // built and installed next to this one (a process per clone, so a
    // program of its own, a fraction of dough's size). Without it only
    // `--net none` clones can be made, and an error says why.
    let net = match std::env::current_exe() {
        Ok(exe) => {
            let gateway = exe.with_file_name("dough-gateway");
            if gateway.is_file() {
                net.with_gateway(gateway, vec![])
            } else {
                net.without_gateway(format!(
                    "{} is missing (it is built with dough: cargo build -p dough)",
                    gateway.display()
                ))
            }
        }
        Err(e) => net.without_gateway(format!("cannot find dough's own program: {e}")),
    };
    // The tests' stand-in world has names no resolver knows: the gateways
    // answer them from a table (name=ip[+ip...],...).
    #[cfg(feature = "test-hooks")]
    let net = match std::env::var("DOUGH_TEST_GATEWAY_HOSTS") {
        Ok(v) => net.with_gateway_hosts(
            v.split(',')
                .filter_map(|e| e.split_once('='))
                .map(|(n, ips)| {
                    let ips = ips.split('+').filter_map(|ip| ip.parse().ok()).collect();
                    (n.to_ascii_lowercase(), ips)
                })
                .collect(),
        ),
        Err(_) => net,
    };
    // ... and are signed by a test CA the gateways must trust (PEM files,
    // colon separated).
    #[cfg(feature = "test-hooks")]
    let net = match std::env::var_os("DOUGH_TEST_GATEWAY_ROOTS") {
        Some(v) => net.with_gateway_roots(std::env::split_paths(&v).collect()),
        None => net,
    };
    // ... and stop for good once a VMM is spawned, before it is recorded
    // (`DOUGH_TEST_HOLD_AFTER_VMM_SPAWN`): the crash no record can tell.
    #[cfg(feature = "test-hooks")]
    let net = match std::env::var_os("DOUGH_TEST_HOLD_AFTER_VMM_SPAWN") {
        Some(_) => net.with_spawn(spawn_then_hold),
        None => net,
    };
    #[cfg(feature = "test-hooks")]
    if let Some(hold_at) = std::env::var("DOUGH_TEST_HOLD_IN_NET_SETUP")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    {
        let mut step = 0;
        return net.observed(move |op, done| {
            if !done {
                if step == hold_at {
                    eprintln!("dough: test hook: holding network setup before {op}");
                    loop {
                        std::thread::park();
                    }
                }
                step += 1;
            }
        });
    }
    net
}

/// The real spawn, then a stop for good (test builds only: see
/// [`host_net`]).
#[cfg(feature = "test-hooks")]
fn spawn_then_hold(
    netns: Option<&str>,
    cmd: &mut std::process::Command,
) -> Result<std::io::Result<std::process::Child>, dough_net::NetError> {
    let spawned = dough_fabric::host::spawn_in_netns(netns, cmd);
    if let Ok(Ok(child)) = &spawned {
        eprintln!(
            "dough: test hook: holding after spawning the VMM (pid {}), before recording it",
            child.id()
        );
        loop {
            std::thread::park();
        }
    }
    spawned
}

/// Where Debian keeps the host's CA bundle.
const HOST_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The PEM text of every `--ca`.
fn trusted_certs(cas: &[String]) -> anyhow::Result<Vec<String>> {
    cas.iter()
        .map(|c| {
            let path = if c == "host" { HOST_BUNDLE } else { c.as_str() };
            let text = std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("--ca {c}: reading {path}: {e}"))?;
            anyhow::ensure!(
                text.contains("-----BEGIN CERTIFICATE-----"),
                "--ca {c}: {path} holds no PEM certificate"
            );
            Ok(text)
        })
        .collect()
}

/// The scratch disk `vm` asks for (or the backend's default), with the
/// empty filesystem its copies start from.
fn scratch_disk(
    home: &Path,
    vm: &VmArgs,
) -> anyhow::Result<Option<dough_fabric::options::ScratchDisk>> {
    let mib = match (vm.scratch, vm.backend) {
        (Some(ScratchArg::None), _) => return Ok(None),
        (Some(ScratchArg::Mib(m)), _) => m,
        (None, BackendArg::Qemu) => DEFAULT_SCRATCH_MIB,
        (None, BackendArg::Firecracker) => return Ok(None),
    };
    let source = Store::new(home).scratch_template(mib)?;
    Ok(Some(dough_fabric::options::ScratchDisk {
        size_mib: mib,
        source,
    }))
}

/// Boot options for `vm`, resolving the accelerator (and warning about TCG once).
pub fn boot_options(home: &Path, image: &Image, vm: &VmArgs) -> anyhow::Result<BootOptions> {
    let base = BootOptions {
        backend: vm.backend.into(),
        qemu: vm.qemu.clone(),
        firecracker: dough_vmm::firecracker::backend::FcConfig {
            binary: vm.firecracker.clone(),
            extra_args: if vm.firecracker_pci {
                vec!["--enable-pci".into()]
            } else {
                vec![]
            },
            ..Default::default()
        },
        mem_mib: vm.mem.or(image.mem_mib).unwrap_or(256),
        cpus: vm.cpus,
        deadline: Duration::from_secs(vm.boot_timeout),
        extra_cmdline: vm.kernel_args.clone(),
        egress: vm.net.clone(),
        net_pool: vm.net_pool,
        trust: trusted_certs(&vm.ca)?,
        net: host_net(),
        scratch: scratch_disk(home, vm)?,
        tcg_cache_mib: vm.tcg_cache,
        ..BootOptions::default()
    };
    if base.backend == Backend::Firecracker {
        anyhow::ensure!(
            vm.accel != AccelArg::Tcg,
            "--accel tcg: Firecracker runs guests under KVM only (use --backend qemu for TCG)"
        );
        return Ok(BootOptions {
            accel: Resolved::Kvm,
            ..base
        });
    }
    let choice = dough_fabric::accel::choose(vm.accel.into(), home, image, &vm.qemu)?;
    if let Some(why) = &choice.fallback_reason {
        eprintln!("dough: KVM is not usable here ({why}); using TCG");
    }
    if choice.accel == Resolved::Tcg {
        eprintln!("dough: warning: {}", dough_vmm::accel::TCG_WARNING);
    }
    Ok(BootOptions {
        accel: choice.accel,
        ..base
    })
}

#[cfg(test)]
mod tests {
    use super::ScratchArg;

    #[test]
    fn scratch_sizes_parse_in_range() {
        assert_eq!("none".parse(), Ok(ScratchArg::None));
        assert_eq!("4G".parse(), Ok(ScratchArg::Mib(4096)));
        assert_eq!("512M".parse(), Ok(ScratchArg::Mib(512)));
        for bad in [
            "",
            "4",
            "4T",
            "-1G",
            "G",
            "1M",
            "2000G",
            "99999999999999999999G",
        ] {
            assert!(bad.parse::<ScratchArg>().is_err(), "{bad:?}");
        }
    }
}
