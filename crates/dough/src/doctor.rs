//! `dough doctor`: what this host has, what it lacks, what to install.

use std::path::Path;
use std::process::{Command, ExitCode, Stdio};

use clap::Args;

#[derive(Debug, Args)]
pub struct DoctorArgs {
    #[command(flatten)]
    pub agent: crate::image_cmd::AgentArg,
    /// Also require what this backend needs: for `firecracker`, the
    /// binary (DOUGH_FIRECRACKER) and KVM that boots guests (probed once
    /// per host boot with the current image). Exits non-zero if missing.
    #[arg(long, value_enum)]
    pub backend: Option<crate::vm_args::BackendArg>,
}

struct Check {
    name: &'static str,
    ok: bool,
    required: bool,
    detail: String,
    fix: &'static str,
}

fn version_of(program: &str, arg: &str) -> Result<String, String> {
    match Command::new(program).arg(arg).stdin(Stdio::null()).output() {
        Ok(o) if o.status.success() => {
            let text = String::from_utf8_lossy(&o.stdout);
            Ok(text.lines().next().unwrap_or("").trim().to_string())
        }
        Ok(o) => Err(format!(
            "{program} {arg} failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Err(format!("{program}: {e}")),
    }
}

fn tool(name: &'static str, program: &str, arg: &str, required: bool, fix: &'static str) -> Check {
    let r = version_of(program, arg);
    Check {
        name,
        ok: r.is_ok(),
        required,
        detail: r.unwrap_or_else(|e| e),
        fix,
    }
}

fn free_bytes(path: &Path) -> Option<u64> {
    let mut p = path.to_path_buf();
    while !p.exists() {
        p = p.parent()?.to_path_buf();
    }
    let st = nix::sys::statvfs::statvfs(&p).ok()?;
    Some(st.blocks_available() as u64 * st.fragment_size() as u64)
}

/// dough's network objects on this host, and which belong to this home.
fn network_summary(vms: &Path) -> Result<String, dough_net::NetError> {
    use dough_net::NetOps;
    let mut ops = dough_net::linux::LinuxNet::default();
    let netns: Vec<String> = ops
        .list_netns()?
        .into_iter()
        .filter(|n| n.starts_with(dough_net::plan::NETNS_PREFIX))
        .collect();
    let scope = dough_fabric::host::net_scope(vms);
    let mine = netns
        .iter()
        .filter(|n| n.starts_with(&format!("{}{scope}-", dough_net::plan::NETNS_PREFIX)))
        .count();
    let live = dough_fabric::state::list_ids(vms);
    let left = dough_net::find_leftovers(&mut ops, &scope, &live)?;
    let tags = ops.list_tags()?.len();
    Ok(format!(
        "{} dough netns on this host ({mine} of this home's VMs), {tags} tagged rule sets; {} left over here",
        netns.len(),
        left.netns.len() + left.veths.len() + left.tags.len()
    ))
}

pub fn run(home: &Path, vms: &Path, args: DoctorArgs) -> anyhow::Result<ExitCode> {
    let mut checks = vec![
        tool(
            "qemu",
            "qemu-system-x86_64",
            "--version",
            true,
            "apt-get install -y qemu-system-x86",
        ),
        tool(
            "mmdebstrap",
            "mmdebstrap",
            "--version",
            true,
            "apt-get install -y mmdebstrap",
        ),
        tool(
            "mkfs.ext4",
            "mkfs.ext4",
            "-V",
            true,
            "apt-get install -y e2fsprogs",
        ),
        tool(
            "dpkg-deb",
            "dpkg-deb",
            "--version",
            true,
            "run on Debian (dpkg)",
        ),
        tool(
            "nft",
            "nft",
            "--version",
            false,
            "apt-get install -y nftables (needed for per-clone networking)",
        ),
        tool(
            "ip",
            "ip",
            "-V",
            false,
            "apt-get install -y iproute2 (needed for per-clone networking)",
        ),
    ];
    let gateway = std::env::current_exe()
        .map(|e| e.with_file_name("dough-gateway"))
        .ok()
        .filter(|g| g.is_file());
    checks.push(Check {
        name: "gateway",
        ok: gateway.is_some(),
        required: true,
        detail: match &gateway {
            Some(g) => format!("{} (every clone with a network gets one)", g.display()),
            None => "no dough-gateway next to dough: clones can have --net none only".into(),
        },
        fix: "build and install dough-gateway with dough (cargo build -p dough puts both in target/)",
    });
    let kvm = dough_vmm::accel::kvm_device_usable();
    checks.push(Check {
        name: "kvm",
        ok: kvm.is_ok(),
        required: false,
        detail: match &kvm {
            Ok(()) => "/dev/kvm opens (auto still checks that it boots a guest in time)".into(),
            Err(e) => format!("{e}; guests will run under TCG, which is not a security boundary"),
        },
        fix: "use a host with hardware virtualisation and access to /dev/kvm",
    });
    let netns = Command::new("unshare")
        .args(["--net", "true"])
        .stderr(Stdio::null())
        .status();
    checks.push(Check {
        name: "netns",
        ok: matches!(netns, Ok(s) if s.success()),
        required: true,
        detail: match netns {
            Ok(s) if s.success() => "can create network namespaces".into(),
            Ok(s) => format!("unshare --net failed ({s}); run dough as root"),
            Err(e) => format!("unshare: {e}"),
        },
        fix: "run as root (network namespaces, TAP devices and nftables need it)",
    });
    let tun = std::path::Path::new("/dev/net/tun").exists();
    checks.push(Check {
        name: "tun",
        ok: tun,
        required: true,
        detail: if tun {
            "/dev/net/tun exists (each VM's NIC is a TAP)".into()
        } else {
            "/dev/net/tun is missing".into()
        },
        fix: "modprobe tun (or run where /dev/net/tun is available)",
    });
    let net = network_summary(vms);
    checks.push(Check {
        name: "network",
        ok: net.is_ok(),
        required: false,
        detail: net.unwrap_or_else(|e| format!("cannot list network objects: {e}")),
        fix: "run as root",
    });
    let fc = std::env::var_os("DOUGH_FIRECRACKER")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| "firecracker".into());
    let fc_version = dough_vmm::firecracker::backend::version(&fc).ok();
    let want_fc = args.backend == Some(crate::vm_args::BackendArg::Firecracker);
    checks.push(Check {
        name: "firecracker",
        ok: fc_version.is_some(),
        required: want_fc,
        detail: match &fc_version {
            Some(v) => format!("{v} ({})", fc.display()),
            None if want_fc => {
                format!("{} not found (no registry ships Firecracker)", fc.display())
            }
            None => format!(
                "{} not found; the QEMU backend is used (no registry ships Firecracker)",
                fc.display()
            ),
        },
        fix: "install a Firecracker release binary and set DOUGH_FIRECRACKER=/path/to/firecracker",
    });
    let free = free_bytes(home);
    checks.push(Check {
        name: "disk",
        ok: free.is_some_and(|f| f >= 2 << 30),
        required: true,
        detail: match free {
            Some(f) => format!("{} GiB free for {}", f >> 30, home.display()),
            None => format!("cannot stat {}", home.display()),
        },
        fix: "free at least 2 GiB for the image cache (or set DOUGH_HOME elsewhere)",
    });
    let agent = crate::image_cmd::find_agent(&args.agent);
    checks.push(Check {
        name: "agent",
        ok: agent
            .as_ref()
            .is_ok_and(|p| dough_image::check_static(p).is_ok()),
        required: true,
        detail: match &agent {
            Ok(p) => match dough_image::check_static(p) {
                Ok(()) => format!("{}", p.display()),
                Err(e) => e.to_string(),
            },
            Err(e) => e.to_string(),
        },
        fix: "scripts/build-agent",
    });
    let image = dough_image::Store::new(home).current();
    checks.push(Check {
        name: "image",
        ok: image.is_ok(),
        required: false,
        detail: match &image {
            Ok(i) => format!("{} (kernel {})", i.id, i.kernel_release),
            Err(e) => e.to_string(),
        },
        fix: "dough image build",
    });
    if want_fc {
        // Firecracker has no TCG: KVM must really boot guests here.
        let boots = match &image {
            Ok(img) => dough_fabric::accel::choose(
                dough_vmm::Accel::Auto,
                home,
                img,
                &std::env::var_os("DOUGH_QEMU")
                    .map(std::path::PathBuf::from)
                    .unwrap_or_else(|| "qemu-system-x86_64".into()),
            )
            .map_err(|e| e.to_string())
            .and_then(|c| match c.accel {
                dough_vmm::Resolved::Kvm => Ok("KVM boots guests (probe)".to_string()),
                dough_vmm::Resolved::Tcg => Err(format!(
                    "KVM does not boot guests here: {}",
                    c.fallback_reason.unwrap_or_default()
                )),
            }),
            Err(_) => Err("no image to probe KVM with".to_string()),
        };
        checks.push(Check {
            name: "kvm-guests",
            ok: boots.is_ok(),
            required: true,
            detail: boots.unwrap_or_else(|e| e),
            fix: "Firecracker needs working KVM: run on bare metal or a host with nested virtualisation",
        });
    }

    let mut failed = false;
    for c in &checks {
        let mark = if c.ok {
            "ok  "
        } else if c.required {
            "FAIL"
        } else {
            "warn"
        };
        println!("{mark} {:<11} {}", c.name, c.detail);
        if !c.ok {
            println!("     {:<11} fix: {}", "", c.fix);
            failed |= c.required;
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
