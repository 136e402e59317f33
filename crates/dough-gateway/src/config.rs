//! What the fabric tells a clone's gateway: written to `gateway.json` in
//! the VM's directory before the gateway starts (host side only; nothing of
//! it enters the guest).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use dough_net::{Egress, Ipv4Net};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Config {
    /// The clone it serves (in every audit line).
    pub vm: String,
    pub egress: Egress,
    /// Networks never reached, beyond [`crate::guard`]'s own list: the
    /// transfer pool (every clone's veth addresses).
    pub deny: Vec<Ipv4Net>,
    /// The audit log (JSON lines).
    pub log: PathBuf,
    /// Names answered from here before the host's resolver is asked, like
    /// an `/etc/hosts` of the gateway's own (the tests' stand-in world).
    #[serde(default)]
    pub hosts: BTreeMap<String, Vec<Ipv4Addr>>,
    /// The clone's VMM (pid, start time in clock ticks): the gateway exits
    /// when it is gone.
    pub vmm: Option<(i32, u64)>,
}

impl Config {
    pub fn read(path: &Path) -> std::io::Result<Config> {
        let b = std::fs::read(path)?;
        serde_json::from_slice(&b).map_err(std::io::Error::other)
    }

    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let b = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(path, b)
    }
}
