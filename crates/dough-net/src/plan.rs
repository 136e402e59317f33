//! A clone's network plan as plain data: names, addresses and firewall
//! rules, derived from the clone id. Nothing here touches the system.
//!
//! Every clone's guest is byte-identical, so it always has
//! [`GUEST_IP`]/30 with gateway [`GUEST_GW`] on `eth0`. Isolation comes from
//! giving each clone its own network namespace:
//!
//! ```text
//!  guest eth0 172.16.0.2 ── tap0 172.16.0.1 ┐ netns dough-<id>
//!                                           │ masquerade → veth0 (transfer .2)
//!                      host: dv<hash> (transfer .1) ── masquerade → host egress
//! ```

use std::collections::BTreeSet;
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The guest's address in every clone.
pub const GUEST_IP: Ipv4Addr = Ipv4Addr::new(172, 16, 0, 2);
/// The guest's gateway: the TAP's address inside the clone's netns.
pub const GUEST_GW: Ipv4Addr = Ipv4Addr::new(172, 16, 0, 1);
/// Prefix length of the guest link.
pub const GUEST_PREFIX: u8 = 30;
/// The TAP's name; the same in every netns, so a snapshot restores anywhere.
pub const TAP: &str = "tap0";
/// The veth end inside a clone's netns.
pub const NS_VETH: &str = "veth0";
/// dough's nftables table (family `ip`), on the host and in each netns.
pub const TABLE: &str = "dough";
/// Prefix of every dough netns name.
pub const NETNS_PREFIX: &str = "dough-";
/// Prefix of every host-side dough veth (then 13 hex digits: 15 in all).
pub const VETH_PREFIX: &str = "dv";
/// Linux's limit on interface names (IFNAMSIZ - 1).
pub const IFNAME_MAX: usize = 15;
/// Port of dough's gateway on [`GUEST_GW`] in each clone's netns, where
/// the guest's TCP is redirected (its DNS goes to port 53 there).
pub const GATEWAY_TCP_PORT: u16 = 15001;
/// Default pool of transfer subnets.
pub const DEFAULT_POOL: &str = "10.213.0.0/16";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    #[error("scope {0:?} must be 1 to 8 characters of [a-z0-9]")]
    BadScope(String),
    #[error(
        "transfer pool {pool} is exhausted: all {count} /30 subnets are in use by live clones"
    )]
    PoolExhausted { pool: Ipv4Net, count: u32 },
    #[error("transfer pool {0} is too small: it must hold at least one /30")]
    PoolTooSmall(Ipv4Net),
    #[error(
        "clone id {0:?} cannot name a network namespace (use [a-z0-9-], at most 40 characters)"
    )]
    BadId(String),
    #[error("no free interface name for {0} (every candidate is taken)")]
    NameCollision(String),
    #[error("{0:?} is not an IPv4 network (expected a.b.c.d/n)")]
    BadNet(String),
    #[error("{0:?} is not an allow rule (expected a host name, *.domain or CIDR, each with an optional :PORT, e.g. api.example.com, *.github.com:443, 10.0.0.0/8:443)")]
    BadAllow(String),
    #[error("{0:?} is not a host name pattern (expected e.g. api.example.com or *.example.com)")]
    BadName(String),
    #[error("{0:?} is not an egress policy (expected none, nat or allow=RULE,... where a rule is NAME[:PORT], *.DOMAIN[:PORT] or CIDR[:PORT])")]
    BadEgress(String),
}

/// An IPv4 network: an address and a prefix length (host bits cleared).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Ipv4Net {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Ipv4Net {
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Option<Ipv4Net> {
        (prefix <= 32).then(|| Ipv4Net {
            addr: Ipv4Addr::from(u32::from(addr) & Self::mask(prefix)),
            prefix,
        })
    }

    fn mask(prefix: u8) -> u32 {
        if prefix == 0 {
            0
        } else {
            u32::MAX << (32 - prefix)
        }
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & Self::mask(self.prefix) == u32::from(self.addr)
    }

    pub fn overlaps(&self, other: &Ipv4Net) -> bool {
        let p = self.prefix.min(other.prefix);
        u32::from(self.addr) & Self::mask(p) == u32::from(other.addr) & Self::mask(p)
    }

    /// The `n`th address in the network (0 is the network address).
    pub fn host(&self, n: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr).wrapping_add(n))
    }

    /// How many subnets of length `prefix` it holds.
    pub fn subnets(&self, prefix: u8) -> u32 {
        if prefix < self.prefix || prefix > 32 {
            0
        } else {
            1u32.checked_shl(u32::from(prefix - self.prefix))
                .unwrap_or(u32::MAX)
        }
    }

    /// Its `i`th subnet of length `prefix`.
    pub fn subnet(&self, prefix: u8, i: u32) -> Ipv4Net {
        let size = 1u64 << (32 - prefix);
        let addr = u64::from(u32::from(self.addr)) + u64::from(i) * size;
        Ipv4Net {
            addr: Ipv4Addr::from(addr as u32),
            prefix,
        }
    }
}

impl fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Ipv4Net {
    type Err = PlanError;
    fn from_str(s: &str) -> Result<Self, PlanError> {
        let bad = || PlanError::BadNet(s.to_string());
        let (a, p) = s.split_once('/').unwrap_or((s, "32"));
        let addr: Ipv4Addr = a.parse().map_err(|_| bad())?;
        let prefix: u8 = p.parse().map_err(|_| bad())?;
        Ipv4Net::new(addr, prefix).ok_or_else(bad)
    }
}

impl TryFrom<String> for Ipv4Net {
    type Error = PlanError;
    fn try_from(s: String) -> Result<Self, PlanError> {
        s.parse()
    }
}

impl From<Ipv4Net> for String {
    fn from(n: Ipv4Net) -> String {
        n.to_string()
    }
}

/// One destination an `allow` clone may reach: a network (TCP to any
/// port, or TCP and UDP to `port` when given), or a host name, exact or
/// `*.` and a domain (TCP to `ports`), checked by dough's gateway against
/// the name the client itself sends (TLS SNI, HTTP `Host`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Allow {
    Net { net: Ipv4Net, port: Option<u16> },
    Name { name: NamePattern, ports: Vec<u16> },
}

/// Ports a name rule opens when it names none: HTTPS and HTTP.
pub const DEFAULT_NAME_PORTS: [u16; 2] = [443, 80];

/// A host name a policy allows: exact (`api.example.com`) or every name
/// under a domain (`*.example.com`, which does not match `example.com`
/// itself). Lower case, no trailing dot; at least two labels after any
/// `*.`, so `*.com` is refused.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NamePattern(String);

impl NamePattern {
    /// Whether `name` (as a client sent it: any case, maybe a trailing
    /// dot) is one this pattern allows.
    pub fn matches(&self, name: &str) -> bool {
        let name = name.strip_suffix('.').unwrap_or(name);
        if !valid_host_name(name) {
            return false;
        }
        let n = name.as_bytes();
        match self.0.strip_prefix("*.") {
            Some(domain) => {
                let d = domain.as_bytes();
                n.len() > d.len() + 1
                    && n[n.len() - d.len() - 1] == b'.'
                    && n[n.len() - d.len()..].eq_ignore_ascii_case(d)
            }
            None => n.eq_ignore_ascii_case(self.0.as_bytes()),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Whether `s` is a host name dough accepts in a policy or from a client:
/// 1 to 253 characters, dot-separated labels of 1 to 63 letters, digits
/// and inner hyphens.
pub fn valid_host_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

impl FromStr for NamePattern {
    type Err = PlanError;
    fn from_str(s: &str) -> Result<Self, PlanError> {
        let bad = || PlanError::BadName(s.to_string());
        let lower = s.to_ascii_lowercase();
        let rest = lower.strip_prefix("*.").unwrap_or(&lower);
        let labels = rest.split('.').count();
        // A name is not an address: `10.0.0.1` belongs in a CIDR rule, and
        // no top-level domain is all digits.
        let numeric = rest
            .rsplit('.')
            .next()
            .is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit()));
        // At least two labels: no bare `localhost`, and no `*.com`.
        if !valid_host_name(rest) || numeric || labels < 2 {
            return Err(bad());
        }
        Ok(NamePattern(lower))
    }
}

impl TryFrom<String> for NamePattern {
    type Error = PlanError;
    fn try_from(s: String) -> Result<Self, PlanError> {
        s.parse()
    }
}

impl From<NamePattern> for String {
    fn from(n: NamePattern) -> String {
        n.0
    }
}

impl fmt::Display for NamePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for Allow {
    type Err = PlanError;
    fn from_str(s: &str) -> Result<Self, PlanError> {
        let bad = || PlanError::BadAllow(s.to_string());
        let (target, port) = match s.rsplit_once(':') {
            Some((n, p)) => (
                n,
                Some(p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(bad)?),
            ),
            None => (s, None),
        };
        // A network starts with a digit; anything else is a name.
        if target.starts_with(|c: char| c.is_ascii_digit()) {
            if let Ok(net) = target.parse() {
                return Ok(Allow::Net { net, port });
            }
        }
        let name: NamePattern = target.parse().map_err(|_| bad())?;
        let ports = match port {
            Some(p) => vec![p],
            None => DEFAULT_NAME_PORTS.to_vec(),
        };
        Ok(Allow::Name { name, ports })
    }
}

impl fmt::Display for Allow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Allow::Net { net, port: Some(p) } => write!(f, "{net}:{p}"),
            Allow::Net { net, port: None } => write!(f, "{net}"),
            Allow::Name { name, ports } if ports[..] == DEFAULT_NAME_PORTS => write!(f, "{name}"),
            Allow::Name { name, ports } => {
                let p: Vec<String> = ports.iter().map(|p| format!("{name}:{p}")).collect();
                f.write_str(&p.join(","))
            }
        }
    }
}

/// What a clone may reach.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Egress {
    /// No way out at all: no veth, no gateway (the offline gate uses this).
    None,
    /// Anything beyond the host: TCP and DNS through dough's gateway
    /// (logged), other IPv4 through NAT (default).
    #[default]
    Nat,
    /// Only the listed destinations, TCP and DNS through dough's gateway;
    /// everything else dropped.
    Allow(Vec<Allow>),
}

impl Egress {
    /// Whether the clone's TCP and DNS go to a gateway (every policy but
    /// `none`).
    pub fn has_gateway(&self) -> bool {
        !matches!(self, Egress::None)
    }

    /// Whether every name `host` stands for may be reached on `port` by
    /// name (a secret brokered for `host` needs this).
    pub fn reaches(&self, host: &NamePattern, port: u16) -> bool {
        match self {
            Egress::None => false,
            Egress::Nat => true,
            Egress::Allow(rules) => rules.iter().any(|r| match r {
                Allow::Name { name, ports } => {
                    ports.contains(&port)
                        && match host.as_str().strip_prefix("*.") {
                            Some(domain) => {
                                name == host
                                    || (name.as_str().starts_with("*.") && name.matches(domain))
                            }
                            None => name.matches(host.as_str()),
                        }
                }
                Allow::Net { .. } => false,
            }),
        }
    }

    /// Whether anything but TCP and DNS may leave the clone, forwarded and
    /// NATed through a veth: under `nat`, and to an allow list's networks.
    /// A policy of names alone forwards nothing: its clone has no veth.
    pub fn forwards(&self) -> bool {
        match self {
            Egress::None => false,
            Egress::Nat => true,
            Egress::Allow(a) => a.iter().any(|x| matches!(x, Allow::Net { .. })),
        }
    }
}

impl FromStr for Egress {
    type Err = PlanError;
    fn from_str(s: &str) -> Result<Self, PlanError> {
        match s {
            "none" => Ok(Egress::None),
            "nat" => Ok(Egress::Nat),
            _ => {
                let list = s
                    .strip_prefix("allow=")
                    .ok_or_else(|| PlanError::BadEgress(s.to_string()))?;
                let allows = list
                    .split(',')
                    .filter(|x| !x.is_empty())
                    .map(str::parse)
                    .collect::<Result<Vec<Allow>, _>>()?;
                if allows.is_empty() {
                    return Err(PlanError::BadEgress(s.to_string()));
                }
                Ok(Egress::Allow(allows))
            }
        }
    }
}

impl fmt::Display for Egress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Egress::None => f.write_str("none"),
            Egress::Nat => f.write_str("nat"),
            Egress::Allow(a) => {
                let parts: Vec<String> = a.iter().map(|x| x.to_string()).collect();
                write!(f, "allow={}", parts.join(","))
            }
        }
    }
}

/// Destinations no clone may reach under any egress policy (the host
/// itself, the pool and other clones are denied by their own rules).
pub const ALWAYS_DENIED: [Ipv4Net; 1] = [Ipv4Net {
    addr: Ipv4Addr::new(169, 254, 0, 0),
    prefix: 16,
}];

/// The link between a clone's netns and the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transfer {
    pub subnet: Ipv4Net,
    /// Host-side veth name (hashed, ≤ 15 characters).
    pub host_veth: String,
    /// `.1` of the subnet, on the host side.
    pub host_addr: Ipv4Addr,
    /// `.2` of the subnet, on `veth0` inside the netns.
    pub ns_addr: Ipv4Addr,
}

/// Everything about one clone's network, as data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetPlan {
    pub clone_id: String,
    /// Carried by every nftables rule made for this clone (as its comment).
    pub tag: String,
    pub netns: String,
    pub tap: String,
    /// Uid that owns the TAP (the VMM's user).
    pub tap_owner: u32,
    pub egress: Egress,
    /// None when `egress` is `none`.
    pub transfer: Option<Transfer>,
}

/// What live clones already use: names and subnets a new plan must avoid.
#[derive(Debug, Clone, Default)]
pub struct InUse {
    pub veths: BTreeSet<String>,
    pub subnets: BTreeSet<Ipv4Net>,
}

impl InUse {
    pub fn add(&mut self, p: &NetPlan) {
        if let Some(t) = &p.transfer {
            self.veths.insert(t.host_veth.clone());
            self.subnets.insert(t.subnet);
        }
    }
}

/// The host-side veth name for a netns: `dv` and 13 hex digits of a hash
/// of the netns name (and `salt`, bumped on a collision).
pub fn veth_name(netns: &str, salt: u32) -> String {
    let mut h = Sha256::new();
    h.update(netns.as_bytes());
    if salt > 0 {
        h.update(salt.to_be_bytes());
    }
    let hex = hex::encode(h.finalize());
    format!("{VETH_PREFIX}{}", &hex[..IFNAME_MAX - VETH_PREFIX.len()])
}

/// The netns name of a clone. `scope` tells apart the VM directories
/// (dough homes) sharing one host, so one never sweeps another's clones.
pub fn netns_name(scope: &str, clone_id: &str) -> Result<String, PlanError> {
    let scope_ok = (1..=8).contains(&scope.len())
        && scope
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if !scope_ok {
        return Err(PlanError::BadScope(scope.to_string()));
    }
    let ok = !clone_id.is_empty()
        && clone_id.len() <= 40
        && clone_id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !ok {
        return Err(PlanError::BadId(clone_id.to_string()));
    }
    Ok(format!("{NETNS_PREFIX}{scope}-{clone_id}"))
}

/// The tag on every rule of a clone.
pub fn tag(scope: &str, clone_id: &str) -> String {
    format!("dough:{scope}:{clone_id}")
}

impl NetPlan {
    /// Plan clone `clone_id`'s network, avoiding what `in_use` holds.
    pub fn new(
        scope: &str,
        clone_id: &str,
        egress: Egress,
        pool: Ipv4Net,
        tap_owner: u32,
        in_use: &InUse,
    ) -> Result<NetPlan, PlanError> {
        let netns = netns_name(scope, clone_id)?;
        let transfer = match egress.forwards() {
            false => None,
            true => {
                let count = pool.subnets(30);
                if count == 0 {
                    return Err(PlanError::PoolTooSmall(pool));
                }
                // Walk the pool and the (sorted) used set together.
                let mut used = in_use.subnets.range(pool.subnet(30, 0)..).peekable();
                let subnet = (0..count)
                    .map(|i| pool.subnet(30, i))
                    .find(|c| {
                        while used.next_if(|u| *u < c).is_some() {}
                        used.peek() != Some(&c)
                    })
                    .ok_or(PlanError::PoolExhausted { pool, count })?;
                let host_veth = (0..64)
                    .map(|salt| veth_name(&netns, salt))
                    .find(|n| !in_use.veths.contains(n))
                    .ok_or_else(|| PlanError::NameCollision(netns.clone()))?;
                Some(Transfer {
                    subnet,
                    host_veth,
                    host_addr: subnet.host(1),
                    ns_addr: subnet.host(2),
                })
            }
        };
        Ok(NetPlan {
            clone_id: clone_id.to_string(),
            tag: tag(scope, clone_id),
            netns,
            tap: TAP.to_string(),
            tap_owner,
            egress,
            transfer,
        })
    }

    /// Kernel command-line arguments that configure the guest's `eth0`
    /// (baked into the snapshot: the same in every clone).
    pub fn guest_cmdline() -> Vec<String> {
        vec![
            format!("dough.ip={GUEST_IP}/{GUEST_PREFIX}"),
            format!("dough.gw={GUEST_GW}"),
        ]
    }

    /// Rules in the host's `dough` table. `pool` is the whole transfer pool
    /// (a clone may not reach any other clone's transfer subnet).
    pub fn host_rules(&self, pool: Ipv4Net) -> Vec<Rule> {
        let Some(t) = &self.transfer else {
            return Vec::new();
        };
        let v = &t.host_veth;
        let r = |chain, matches, verdict| Rule {
            chain,
            matches,
            verdict,
            comment: self.tag.clone(),
        };
        let mut rules = vec![
            // The host itself is not a destination: only replies get in.
            r(
                Chain::Input,
                vec![Match::Iif(v.clone()), Match::Established],
                Verdict::Accept,
            ),
            r(Chain::Input, vec![Match::Iif(v.clone())], Verdict::Drop),
            // Replies back to the clone; nothing new may enter it.
            r(
                Chain::Forward,
                vec![Match::Oif(v.clone()), Match::Established],
                Verdict::Accept,
            ),
            r(Chain::Forward, vec![Match::Oif(v.clone())], Verdict::Drop),
            // Nothing leaves with a forged source (it would not be NATed).
            r(
                Chain::Forward,
                vec![Match::Iif(v.clone()), Match::NotSaddr(t.subnet)],
                Verdict::Drop,
            ),
            // Other clones are never reachable.
            r(
                Chain::Forward,
                vec![Match::Iif(v.clone()), Match::Daddr(pool)],
                Verdict::Drop,
            ),
        ];
        // Never reachable under any policy, before any accept: link-local
        // (cloud metadata endpoints live there) is not "the network beyond
        // the host", whatever an allow list says.
        for net in ALWAYS_DENIED {
            rules.push(r(
                Chain::Forward,
                vec![Match::Iif(v.clone()), Match::Daddr(net)],
                Verdict::Drop,
            ));
        }
        match &self.egress {
            Egress::None => {}
            Egress::Nat => {
                rules.push(r(
                    Chain::Forward,
                    vec![Match::Iif(v.clone())],
                    Verdict::Accept,
                ));
            }
            Egress::Allow(allows) => {
                for a in allows {
                    // Names are the gateway's business: nothing forwarded.
                    let Allow::Net { net, port } = a else {
                        continue;
                    };
                    let m = vec![Match::Iif(v.clone()), Match::Daddr(*net)];
                    match port {
                        None => rules.push(r(Chain::Forward, m, Verdict::Accept)),
                        Some(port) => {
                            for proto in [L4::Tcp, L4::Udp] {
                                let mut m2 = m.clone();
                                m2.push(Match::Dport(proto, *port));
                                rules.push(r(Chain::Forward, m2, Verdict::Accept));
                            }
                        }
                    }
                }
                rules.push(r(
                    Chain::Forward,
                    vec![Match::Iif(v.clone())],
                    Verdict::Drop,
                ));
            }
        }
        rules.push(r(
            Chain::Postrouting,
            vec![Match::Saddr(t.subnet), Match::NotOif(v.clone())],
            Verdict::Masquerade,
        ));
        rules
    }

    /// Rules in the `dough` table inside the clone's netns. Under every
    /// policy but `none`, all of the guest's TCP (any port) and DNS (UDP and
    /// TCP 53) is redirected to dough's gateway, whose sockets live in this
    /// netns on the TAP's address ([`GUEST_GW`]:[`GATEWAY_TCP_PORT`] and
    /// :53): nothing the guest sends over TCP is ever forwarded. What else
    /// may leave (UDP, ICMP under `nat` and to allowed networks) leaves
    /// through the veth under the netns's own transfer address.
    pub fn ns_rules(&self) -> Vec<Rule> {
        if !self.egress.has_gateway() {
            return Vec::new();
        }
        let guest = Ipv4Net::new(GUEST_IP, 32).expect("valid");
        let tap = || Match::Iif(TAP.to_string());
        let r = |chain, matches, verdict| Rule {
            chain,
            matches,
            verdict,
            comment: self.tag.clone(),
        };
        let mut rules = vec![
            r(
                Chain::Prerouting,
                vec![tap(), Match::Dport(L4::Udp, 53)],
                Verdict::Redirect(53),
            ),
            r(
                Chain::Prerouting,
                vec![tap(), Match::Dport(L4::Tcp, 53)],
                Verdict::Redirect(53),
            ),
            r(
                Chain::Prerouting,
                vec![tap(), Match::L4(L4::Tcp)],
                Verdict::Redirect(GATEWAY_TCP_PORT),
            ),
            // The guest may only use its own address.
            r(
                Chain::Input,
                vec![tap(), Match::NotSaddr(guest)],
                Verdict::Drop,
            ),
            // Of this netns, the guest reaches the gateway's sockets only
            // (and answers what the netns itself opened to it).
            r(
                Chain::Input,
                vec![tap(), Match::Established],
                Verdict::Accept,
            ),
            r(
                Chain::Input,
                vec![tap(), Match::Dport(L4::Tcp, GATEWAY_TCP_PORT)],
                Verdict::Accept,
            ),
            r(
                Chain::Input,
                vec![tap(), Match::Dport(L4::Tcp, 53)],
                Verdict::Accept,
            ),
            r(
                Chain::Input,
                vec![tap(), Match::Dport(L4::Udp, 53)],
                Verdict::Accept,
            ),
            r(Chain::Input, vec![tap()], Verdict::Drop),
            r(
                Chain::Forward,
                vec![tap(), Match::NotSaddr(guest)],
                Verdict::Drop,
            ),
            // Never forwarded, whatever happens to the redirect above.
            r(
                Chain::Forward,
                vec![tap(), Match::L4(L4::Tcp)],
                Verdict::Drop,
            ),
            r(
                Chain::Forward,
                vec![tap(), Match::Dport(L4::Udp, 53)],
                Verdict::Drop,
            ),
        ];
        if self.transfer.is_none() {
            rules.push(r(Chain::Forward, vec![tap()], Verdict::Drop));
        } else {
            rules.push(r(
                Chain::Postrouting,
                vec![
                    Match::Saddr(Ipv4Net::new(GUEST_IP, GUEST_PREFIX).expect("valid")),
                    Match::Oif(NS_VETH.to_string()),
                ],
                Verdict::Masquerade,
            ));
        }
        rules
    }
}

/// The base chains of dough's table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Chain {
    Prerouting,
    Input,
    Forward,
    Postrouting,
}

impl Chain {
    pub const ALL: [Chain; 4] = [
        Chain::Prerouting,
        Chain::Input,
        Chain::Forward,
        Chain::Postrouting,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Chain::Prerouting => "prerouting",
            Chain::Input => "input",
            Chain::Forward => "forward",
            Chain::Postrouting => "postrouting",
        }
    }

    /// (type, hook, priority) of the base chain.
    pub fn base(self) -> (&'static str, &'static str, i32) {
        match self {
            Chain::Prerouting => ("nat", "prerouting", -100),
            Chain::Input => ("filter", "input", 0),
            Chain::Forward => ("filter", "forward", 0),
            Chain::Postrouting => ("nat", "postrouting", 100),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum L4 {
    Tcp,
    Udp,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Match {
    Iif(String),
    Oif(String),
    NotOif(String),
    Saddr(Ipv4Net),
    NotSaddr(Ipv4Net),
    Daddr(Ipv4Net),
    Dport(L4, u16),
    /// `meta l4proto tcp|udp`
    L4(L4),
    /// `ct state established,related`
    Established,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Accept,
    Drop,
    Masquerade,
    /// To this port on the incoming interface's address (nat chains).
    Redirect(u16),
}

/// One nftables rule, tagged with its clone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    pub chain: Chain,
    pub matches: Vec<Match>,
    pub verdict: Verdict,
    pub comment: String,
}

impl Rule {
    /// The rule in `nft` syntax (for `nft add rule ip dough CHAIN ...`).
    pub fn to_nft(&self) -> String {
        let mut parts: Vec<String> = self
            .matches
            .iter()
            .map(|m| match m {
                Match::Iif(i) => format!("iifname \"{i}\""),
                Match::Oif(o) => format!("oifname \"{o}\""),
                Match::NotOif(o) => format!("oifname != \"{o}\""),
                Match::Saddr(n) => format!("ip saddr {n}"),
                Match::NotSaddr(n) => format!("ip saddr != {n}"),
                Match::Daddr(n) => format!("ip daddr {n}"),
                Match::Dport(L4::Tcp, p) => format!("tcp dport {p}"),
                Match::Dport(L4::Udp, p) => format!("udp dport {p}"),
                Match::L4(L4::Tcp) => "meta l4proto tcp".to_string(),
                Match::L4(L4::Udp) => "meta l4proto udp".to_string(),
                Match::Established => "ct state established,related".to_string(),
            })
            .collect();
        parts.push(match self.verdict {
            Verdict::Accept => "accept".to_string(),
            Verdict::Drop => "drop".to_string(),
            Verdict::Masquerade => "masquerade".to_string(),
            Verdict::Redirect(p) => format!("redirect to :{p}"),
        });
        parts.push(format!("comment \"{}\"", self.comment));
        parts.join(" ")
    }

    /// The rule as an object of nftables' JSON API (`{"rule": ...}`).
    pub fn to_json(&self, table: &str) -> serde_json::Value {
        use serde_json::json;
        let field =
            |proto: &str, field: &str| json!({"payload": {"protocol": proto, "field": field}});
        let prefix = |n: &Ipv4Net| json!({"prefix": {"addr": n.addr.to_string(), "len": n.prefix}});
        let cmp = |left: serde_json::Value, op: &str, right: serde_json::Value| json!({"match": {"op": op, "left": left, "right": right}});
        let mut expr: Vec<serde_json::Value> = self
            .matches
            .iter()
            .map(|m| match m {
                Match::Iif(i) => cmp(json!({"meta": {"key": "iifname"}}), "==", json!(i)),
                Match::Oif(o) => cmp(json!({"meta": {"key": "oifname"}}), "==", json!(o)),
                Match::NotOif(o) => cmp(json!({"meta": {"key": "oifname"}}), "!=", json!(o)),
                Match::Saddr(n) => cmp(field("ip", "saddr"), "==", prefix(n)),
                Match::NotSaddr(n) => cmp(field("ip", "saddr"), "!=", prefix(n)),
                Match::Daddr(n) => cmp(field("ip", "daddr"), "==", prefix(n)),
                Match::Dport(L4::Tcp, p) => cmp(field("tcp", "dport"), "==", json!(p)),
                Match::Dport(L4::Udp, p) => cmp(field("udp", "dport"), "==", json!(p)),
                Match::L4(p) => cmp(
                    json!({"meta": {"key": "l4proto"}}),
                    "==",
                    json!(match p {
                        L4::Tcp => "tcp",
                        L4::Udp => "udp",
                    }),
                ),
                Match::Established => cmp(
                    json!({"ct": {"key": "state"}}),
                    "in",
                    json!(["established", "related"]),
                ),
            })
            .collect();
        expr.push(match self.verdict {
            Verdict::Accept => json!({"accept": null}),
            Verdict::Drop => json!({"drop": null}),
            Verdict::Masquerade => json!({"masquerade": null}),
            Verdict::Redirect(p) => json!({"redirect": {"port": p}}),
        });
        json!({"rule": {
            "family": "ip",
            "table": table,
            "chain": self.chain.name(),
            "expr": expr,
            "comment": self.comment,
        }})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool() -> Ipv4Net {
        DEFAULT_POOL.parse().unwrap()
    }

    #[test]
    fn networks_parse_and_split() {
        let p: Ipv4Net = "10.213.7.9/16".parse().unwrap();
        assert_eq!(p.to_string(), "10.213.0.0/16");
        assert_eq!(p.subnets(30), 16384);
        assert_eq!(p.subnet(30, 1).to_string(), "10.213.0.4/30");
        assert_eq!(p.subnet(30, 1).host(2), Ipv4Addr::new(10, 213, 0, 6));
        assert!(p.contains(Ipv4Addr::new(10, 213, 255, 255)));
        assert!(!p.contains(Ipv4Addr::new(10, 214, 0, 0)));
        assert!(p.overlaps(&"10.0.0.0/8".parse().unwrap()));
        assert!(!p.overlaps(&"10.214.0.0/16".parse().unwrap()));
        for bad in ["10.0.0.0/33", "10.0.0/8", "x", "10.0.0.0/"] {
            assert!(bad.parse::<Ipv4Net>().is_err(), "{bad}");
        }
    }

    #[test]
    fn egress_policies_parse() {
        assert_eq!("none".parse::<Egress>().unwrap(), Egress::None);
        assert_eq!("nat".parse::<Egress>().unwrap(), Egress::Nat);
        let a: Egress = "allow=10.1.0.0/16:443,192.168.1.5".parse().unwrap();
        assert_eq!(a.to_string(), "allow=10.1.0.0/16:443,192.168.1.5/32");
        let n: Egress = "allow=API.Example.com,*.github.com:22,10.0.0.0/8"
            .parse()
            .unwrap();
        assert_eq!(
            n.to_string(),
            "allow=api.example.com,*.github.com:22,10.0.0.0/8"
        );
        let Egress::Allow(rules) = &n else {
            panic!("{n:?}")
        };
        assert_eq!(
            rules[0],
            Allow::Name {
                name: "api.example.com".parse().unwrap(),
                ports: vec![443, 80]
            }
        );
        assert!(n.forwards() && n.has_gateway());
        let names_only: Egress = "allow=api.example.com".parse().unwrap();
        assert!(!names_only.forwards() && names_only.has_gateway());
        assert!(!Egress::None.has_gateway());
        for bad in [
            "allow=",
            "allow=10.0.0.0/8:0",
            "allow=10.0.0.0/8:x",
            "open",
            "allow=1.2.3/8",
            "allow=*.com",
            "allow=com",
            "allow=exa_mple.com",
            "allow=-a.example.com",
            "allow=a.*.example.com",
            "allow=*",
            "allow=1.2.3.4.5",
            "allow=example.com:99999",
        ] {
            assert!(bad.parse::<Egress>().is_err(), "{bad}");
        }
    }

    #[test]
    fn name_patterns_match_names_not_tricks() {
        let exact: NamePattern = "api.example.com".parse().unwrap();
        let wild: NamePattern = "*.github.com".parse().unwrap();
        assert!(exact.matches("api.example.com"));
        assert!(exact.matches("API.example.COM."));
        assert!(!exact.matches("api.example.com.evil.net"));
        assert!(!exact.matches("xapi.example.com"));
        assert!(wild.matches("codeload.github.com"));
        assert!(wild.matches("a.b.github.com"));
        assert!(!wild.matches("github.com"), "*. needs a label in front");
        assert!(!wild.matches("evilgithub.com"));
        assert!(!wild.matches("github.com.evil.net"));
        assert!(!wild.matches(".github.com"));
        assert!(!wild.matches("a..github.com"));
        assert!(!wild.matches("é.github.com"));
        assert!(!exact.matches(""));
        // Old records (a network and a port) still read.
        let old: Allow = serde_json::from_str(r#"{"net":"10.0.0.0/8","port":443}"#).unwrap();
        assert_eq!(old, "10.0.0.0/8:443".parse().unwrap());
        let back: Allow =
            serde_json::from_value(serde_json::to_value(wild_rule()).unwrap()).unwrap();
        assert_eq!(back, wild_rule());
    }

    fn wild_rule() -> Allow {
        "*.github.com:443".parse().unwrap()
    }

    proptest::proptest! {
        /// Whatever a client sends as a name, matching never panics, and a
        /// match is always the pattern itself or a name under its domain.
        #[test]
        fn matching_arbitrary_names_is_total(name in "\\PC{0,80}", sub in "[a-z0-9-]{0,20}") {
            let exact: NamePattern = "api.example.com".parse().unwrap();
            let wild: NamePattern = "*.example.com".parse().unwrap();
            for n in [name.clone(), format!("{sub}.example.com"), format!("{name}.example.com")] {
                if exact.matches(&n) {
                    proptest::prop_assert!(n.trim_end_matches('.').eq_ignore_ascii_case("api.example.com"));
                }
                if wild.matches(&n) {
                    proptest::prop_assert!(n.to_ascii_lowercase().trim_end_matches('.').ends_with(".example.com"));
                }
            }
        }
    }

    #[test]
    fn names_fit_and_are_stable() {
        let p = NetPlan::new(
            "s1",
            "vm-1a2b3c4d",
            Egress::Nat,
            pool(),
            0,
            &InUse::default(),
        )
        .unwrap();
        assert_eq!(p.netns, "dough-s1-vm-1a2b3c4d");
        assert_eq!(p.tap, "tap0");
        let t = p.transfer.as_ref().unwrap();
        assert_eq!(t.host_veth.len(), IFNAME_MAX);
        assert!(t.host_veth.starts_with(VETH_PREFIX));
        assert_eq!(t.host_veth, veth_name("dough-s1-vm-1a2b3c4d", 0));
        assert_eq!(t.subnet.to_string(), "10.213.0.0/30");
        assert_eq!(t.host_addr.to_string(), "10.213.0.1");
        assert_eq!(t.ns_addr.to_string(), "10.213.0.2");
        assert_eq!(p.tag, "dough:s1:vm-1a2b3c4d");
        for bad in ["", "VM-1", "vm/../x", "vm 1", &"a".repeat(41)] {
            assert!(matches!(
                NetPlan::new("s1", bad, Egress::Nat, pool(), 0, &InUse::default()),
                Err(PlanError::BadId(_))
            ));
        }
    }

    #[test]
    fn ten_thousand_clones_get_distinct_names_and_subnets() {
        let mut used = InUse::default();
        let mut names = BTreeSet::new();
        for i in 0..10_000u32 {
            let id = format!("vm-{:08x}", i.wrapping_mul(2_654_435_761));
            let p = NetPlan::new("s1", &id, Egress::Nat, pool(), 0, &used).unwrap();
            let t = p.transfer.as_ref().unwrap();
            assert!(t.host_veth.len() <= IFNAME_MAX);
            assert!(names.insert(t.host_veth.clone()), "collision at {id}");
            used.add(&p);
        }
        assert_eq!(used.subnets.len(), 10_000);
        // Raw hashes of the 10,000 netns names do not collide either.
        let raw: BTreeSet<String> = (0..10_000u32)
            .map(|i| {
                veth_name(
                    &format!("dough-vm-{:08x}", i.wrapping_mul(2_654_435_761)),
                    0,
                )
            })
            .collect();
        assert_eq!(raw.len(), 10_000);
    }

    #[test]
    fn a_taken_name_is_rehashed() {
        let mut used = InUse::default();
        used.veths.insert(veth_name("dough-s1-vm-00000001", 0));
        let p = NetPlan::new("s1", "vm-00000001", Egress::Nat, pool(), 0, &used).unwrap();
        let t = p.transfer.unwrap();
        assert_eq!(t.host_veth, veth_name("dough-s1-vm-00000001", 1));
        assert_ne!(t.host_veth, veth_name("dough-s1-vm-00000001", 0));
    }

    #[test]
    fn pool_exhaustion_is_a_clear_error() {
        let small: Ipv4Net = "10.9.0.0/29".parse().unwrap();
        let mut used = InUse::default();
        for id in ["vm-a", "vm-b"] {
            let p = NetPlan::new("s1", id, Egress::Nat, small, 0, &used).unwrap();
            used.add(&p);
        }
        let e = NetPlan::new("s1", "vm-c", Egress::Nat, small, 0, &used).unwrap_err();
        assert_eq!(
            e.to_string(),
            "transfer pool 10.9.0.0/29 is exhausted: all 2 /30 subnets are in use by live clones"
        );
        // `none` needs no subnet, so it still works.
        let none = NetPlan::new("s1", "vm-c", Egress::None, small, 0, &used).unwrap();
        assert!(none.transfer.is_none());
        let tiny: Ipv4Net = "10.9.0.0/31".parse().unwrap();
        assert_eq!(
            NetPlan::new("s1", "vm-d", Egress::Nat, tiny, 0, &InUse::default()),
            Err(PlanError::PoolTooSmall(tiny))
        );
    }

    #[test]
    fn rules_follow_the_policy_and_carry_the_tag() {
        let used = InUse::default();
        let none = NetPlan::new("s1", "vm-n", Egress::None, pool(), 0, &used).unwrap();
        assert!(none.transfer.is_none());
        assert!(none.host_rules(pool()).is_empty());
        assert!(none.ns_rules().is_empty());

        let nat = NetPlan::new("s1", "vm-x", Egress::Nat, pool(), 0, &used).unwrap();
        let v = nat.transfer.as_ref().unwrap().host_veth.clone();
        let text: Vec<String> = nat.host_rules(pool()).iter().map(Rule::to_nft).collect();
        assert!(text
            .iter()
            .all(|r| r.ends_with("comment \"dough:s1:vm-x\"")));
        assert!(text.contains(&format!(
            "iifname \"{v}\" ip daddr 10.213.0.0/16 drop comment \"dough:s1:vm-x\""
        )));
        assert!(text.contains(&format!("iifname \"{v}\" accept comment \"dough:s1:vm-x\"")));
        assert!(text.contains(&format!(
            "iifname \"{v}\" ip daddr 169.254.0.0/16 drop comment \"dough:s1:vm-x\""
        )));
        assert!(text.contains(&format!(
            "ip saddr 10.213.0.0/30 oifname != \"{v}\" masquerade comment \"dough:s1:vm-x\""
        )));
        let ns: Vec<String> = nat.ns_rules().iter().map(Rule::to_nft).collect();
        let tagged = |r: &str| format!("{r} comment \"dough:s1:vm-x\"");
        assert_eq!(
            ns,
            [
                tagged("iifname \"tap0\" udp dport 53 redirect to :53"),
                tagged("iifname \"tap0\" tcp dport 53 redirect to :53"),
                tagged("iifname \"tap0\" meta l4proto tcp redirect to :15001"),
                tagged("iifname \"tap0\" ip saddr != 172.16.0.2/32 drop"),
                tagged("iifname \"tap0\" ct state established,related accept"),
                tagged("iifname \"tap0\" tcp dport 15001 accept"),
                tagged("iifname \"tap0\" tcp dport 53 accept"),
                tagged("iifname \"tap0\" udp dport 53 accept"),
                tagged("iifname \"tap0\" drop"),
                tagged("iifname \"tap0\" ip saddr != 172.16.0.2/32 drop"),
                tagged("iifname \"tap0\" meta l4proto tcp drop"),
                tagged("iifname \"tap0\" udp dport 53 drop"),
                tagged("ip saddr 172.16.0.0/30 oifname \"veth0\" masquerade"),
            ]
        );
        // Names alone forward nothing: no veth, nothing from the TAP is
        // forwarded, only the gateway's redirects.
        let names = NetPlan::new(
            "s1",
            "vm-z",
            "allow=api.example.com,*.github.com:22".parse().unwrap(),
            pool(),
            0,
            &used,
        )
        .unwrap();
        assert!(names.transfer.is_none());
        assert!(names.host_rules(pool()).is_empty());
        let ns: Vec<String> = names.ns_rules().iter().map(Rule::to_nft).collect();
        assert_eq!(
            ns.last().unwrap(),
            "iifname \"tap0\" drop comment \"dough:s1:vm-z\""
        );
        assert!(!ns.iter().any(|r| r.contains("masquerade")));
        // A forged source is dropped before anything is accepted.
        let all: Vec<String> = nat.host_rules(pool()).iter().map(Rule::to_nft).collect();
        let spoof = all
            .iter()
            .position(|r| r.contains("ip saddr != 10.213.0.0/30 drop"))
            .unwrap();
        let accept = all
            .iter()
            .position(|r| r == &format!("iifname \"{v}\" accept comment \"dough:s1:vm-x\""))
            .unwrap();
        assert!(spoof < accept);

        let allow = NetPlan::new(
            "s1",
            "vm-y",
            "allow=10.50.0.0/24:8080".parse().unwrap(),
            pool(),
            0,
            &used,
        )
        .unwrap();
        let v = allow.transfer.as_ref().unwrap().host_veth.clone();
        let fwd: Vec<String> = allow
            .host_rules(pool())
            .iter()
            .filter(|r| r.chain == Chain::Forward)
            .map(Rule::to_nft)
            .collect();
        let tail = &fwd[fwd.len() - 3..];
        assert_eq!(
            tail,
            [
                format!("iifname \"{v}\" ip daddr 10.50.0.0/24 tcp dport 8080 accept comment \"dough:s1:vm-y\""),
                format!("iifname \"{v}\" ip daddr 10.50.0.0/24 udp dport 8080 accept comment \"dough:s1:vm-y\""),
                format!("iifname \"{v}\" drop comment \"dough:s1:vm-y\""),
            ]
        );
        // Pool isolation comes before any accept.
        let pool_drop = fwd
            .iter()
            .position(|r| r.contains("10.213.0.0/16 drop"))
            .unwrap();
        let first_accept = fwd.iter().position(|r| r.contains("dport")).unwrap();
        assert!(pool_drop < first_accept);
    }

    /// Under every policy with a way out — nat, and any allow list, even
    /// `0.0.0.0/0` — link-local is dropped before anything is accepted.
    #[test]
    fn link_local_is_denied_before_any_accept_under_every_policy() {
        let used = InUse::default();
        let mut policies: Vec<Egress> = vec![Egress::Nat];
        for a in [
            "allow=0.0.0.0/0",
            "allow=169.254.169.254/32:80",
            "allow=169.254.0.0/16",
            "allow=10.0.0.0/8:443,0.0.0.0/1,128.0.0.0/1",
        ] {
            policies.push(a.parse().unwrap());
        }
        for egress in policies {
            let p = NetPlan::new("s1", "vm-l", egress.clone(), pool(), 0, &used).unwrap();
            let fwd: Vec<String> = p
                .host_rules(pool())
                .iter()
                .filter(|r| r.chain == Chain::Forward)
                .map(Rule::to_nft)
                .collect();
            let deny = fwd
                .iter()
                .position(|r| r.contains("ip daddr 169.254.0.0/16 drop"))
                .unwrap_or_else(|| panic!("{egress}: no link-local drop in {fwd:#?}"));
            let first_accept = fwd
                .iter()
                .position(|r| r.contains(" accept ") && r.starts_with("iifname"))
                .unwrap();
            assert!(deny < first_accept, "{egress}: {fwd:#?}");
        }
    }

    #[test]
    fn json_rules_name_table_chain_and_comment() {
        let nat = NetPlan::new("s1", "vm-x", Egress::Nat, pool(), 0, &InUse::default()).unwrap();
        let rules = nat.ns_rules();
        let j = rules.last().unwrap().to_json("dough");
        assert_eq!(j["rule"]["family"], "ip");
        assert_eq!(j["rule"]["table"], "dough");
        assert_eq!(j["rule"]["chain"], "postrouting");
        assert_eq!(j["rule"]["comment"], "dough:s1:vm-x");
        assert_eq!(j["rule"]["expr"][0]["match"]["right"]["prefix"]["len"], 30);
        assert!(j["rule"]["expr"][2].get("masquerade").is_some());
        let d = rules[9].to_json("dough");
        assert_eq!(d["rule"]["chain"], "forward");
        assert_eq!(d["rule"]["expr"][1]["match"]["op"], "!=");
        let redirect = rules[2].to_json("dough");
        assert_eq!(redirect["rule"]["chain"], "prerouting");
        assert_eq!(
            redirect["rule"]["expr"][1]["match"]["left"]["meta"]["key"],
            "l4proto"
        );
        assert_eq!(redirect["rule"]["expr"][1]["match"]["right"], "tcp");
        assert_eq!(redirect["rule"]["expr"][2]["redirect"]["port"], 15001);
    }
}
