//! What the fabric tells a clone's gateway, as JSON on the gateway's
//! standard input (it may hold secrets and dough's CA key: never written to
//! a file, never anywhere near the guest).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;

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
    /// Secrets this clone's guest holds only placeholders of.
    #[serde(default)]
    pub brokers: Vec<crate::broker::Broker>,
    /// dough's CA (needed when `brokers` is not empty).
    #[serde(default)]
    pub ca: Option<crate::tls::CaPem>,
    /// PEM files of roots upstreams may also be signed by (beyond webpki's
    /// and the host's bundle).
    #[serde(default)]
    pub upstream_roots: Vec<PathBuf>,
}

/// Largest configuration read from standard input.
pub const CONFIG_MAX: u64 = 1 << 20;

impl Config {
    /// Read from `r` (the gateway's standard input), at most [`CONFIG_MAX`].
    pub fn read_from(r: impl std::io::Read) -> std::io::Result<Config> {
        let mut b = Vec::new();
        std::io::Read::read_to_end(&mut r.take(CONFIG_MAX), &mut b)?;
        serde_json::from_slice(&b).map_err(std::io::Error::other)
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a config always serialises")
    }
}
