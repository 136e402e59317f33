//! How VMs boot: the options every layer above the record store reads.

use std::path::PathBuf;
use std::time::Duration;

use dough_net::{Egress, Ipv4Net};
use dough_vmm::firecracker::backend::FcConfig;
use dough_vmm::{Backend, Resolved};

use crate::host::HostNet;

/// How to boot.
#[derive(Debug, Clone)]
pub struct BootOptions {
    /// Which VMM boots and bakes (a restore uses its snapshot's).
    pub backend: Backend,
    pub qemu: PathBuf,
    /// The Firecracker binary and its arguments (`--backend firecracker`).
    pub firecracker: FcConfig,
    pub accel: Resolved,
    pub mem_mib: u32,
    pub cpus: u32,
    /// Deadline for one boot attempt (QEMU start → ready line → handshake).
    pub deadline: Duration,
    /// Attempts after the first one failed.
    pub retries: u32,
    pub extra_cmdline: Vec<String>,
    /// What the VM's network may reach (bakes always get `none`).
    pub egress: Egress,
    /// Transfer subnets for clones' veths are taken from here.
    pub net_pool: Ipv4Net,
    /// The host network VMs are built on (the real one by default).
    pub net: HostNet,
    /// Secrets the clone's guest holds placeholders of; its gateway puts
    /// the real values into requests to the hosts each one names.
    pub brokers: Vec<dough_gateway::broker::Broker>,
    /// dough's CA (needed with `brokers`).
    pub ca: Option<dough_gateway::tls::CaPem>,
    /// More certificates (PEM) a clone with a network trusts: put into its
    /// system bundle at restore, next to dough's CA.
    pub trust: Vec<String>,
    /// Attach the image's rootfs read-write and make it the guest's root
    /// (no overlay): only for an image builder's private copy of a rootfs,
    /// never for a bake or a clone.
    pub root_rw: bool,
    /// A disk of its own as the guest's writable layer (instead of RAM):
    /// every VM gets a private sparse copy of `source`.
    pub scratch: Option<ScratchDisk>,
    /// QEMU under TCG: the translated-code cache, MiB (None: QEMU's 1 GiB).
    pub tcg_cache_mib: Option<u32>,
}

/// A VM's scratch disk: its size, and the file each VM's copy starts
/// from (an empty filesystem for a boot or a bake; a snapshot's own, as
/// its guest left it, for a restore).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScratchDisk {
    pub size_mib: u64,
    pub source: PathBuf,
}

impl Default for BootOptions {
    fn default() -> Self {
        BootOptions {
            backend: Backend::Qemu,
            qemu: "qemu-system-x86_64".into(),
            firecracker: FcConfig::default(),
            accel: Resolved::Tcg,
            mem_mib: 256,
            cpus: 1,
            deadline: Duration::from_secs(60),
            retries: 1,
            extra_cmdline: Vec::new(),
            // Nothing leaves unless asked for (and a way out needs a
            // gateway program: see `HostNet::with_gateway`).
            egress: Egress::None,
            net_pool: dough_net::plan::DEFAULT_POOL.parse().expect("valid pool"),
            net: HostNet::linux(),
            brokers: Vec::new(),
            ca: None,
            trust: Vec::new(),
            root_rw: false,
            tcg_cache_mib: None,
            scratch: None,
        }
    }
}
