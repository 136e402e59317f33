//! The privileged effects a network plan needs, behind a narrow trait, and
//! a recording fake that models the resulting system state.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use crate::plan::Rule;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("{op}: {message}")]
    Op { op: String, message: String },
    #[error("{op}")]
    Io {
        op: String,
        #[source]
        source: std::io::Error,
    },
}

impl NetError {
    pub fn op(op: impl Into<String>, message: impl std::fmt::Display) -> Self {
        NetError::Op {
            op: op.into(),
            message: message.to_string(),
        }
    }

    pub fn io(op: impl Into<String>, source: std::io::Error) -> Self {
        NetError::Io {
            op: op.into(),
            source,
        }
    }
}

/// A host interface as the leftover sweep sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostLink {
    pub name: String,
    /// The other end of a veth lives in another namespace (a clone's veth
    /// whose namespace exists). A dough veth whose peer is still on the
    /// host was abandoned half-made.
    pub peer_elsewhere: bool,
}

/// Privileged network operations. `netns: None` means the host's.
pub trait NetOps {
    fn create_netns(&mut self, name: &str) -> Result<(), NetError>;
    /// Delete a netns (its interfaces go with it). Missing is fine.
    fn delete_netns(&mut self, name: &str) -> Result<(), NetError>;
    /// A persistent TAP owned by `owner` inside `netns`.
    fn create_tap(&mut self, netns: &str, name: &str, owner: u32) -> Result<(), NetError>;
    /// A veth pair: `host` stays on the host, `peer` moves into `netns`.
    fn create_veth(&mut self, host: &str, netns: &str, peer: &str) -> Result<(), NetError>;
    /// Delete a host interface. Missing is fine.
    fn delete_link(&mut self, name: &str) -> Result<(), NetError>;
    fn add_addr(
        &mut self,
        netns: Option<&str>,
        ifname: &str,
        addr: Ipv4Addr,
        prefix: u8,
    ) -> Result<(), NetError>;
    fn link_up(&mut self, netns: Option<&str>, ifname: &str) -> Result<(), NetError>;
    fn add_default_route(&mut self, netns: &str, via: Ipv4Addr) -> Result<(), NetError>;
    fn enable_forwarding(&mut self, netns: Option<&str>) -> Result<(), NetError>;
    /// Add rules to dough's table (created with its chains when missing).
    fn add_rules(&mut self, netns: Option<&str>, rules: &[Rule]) -> Result<(), NetError>;
    /// Delete every host rule whose comment is `tag`; how many went.
    fn flush_tag(&mut self, tag: &str) -> Result<usize, NetError>;
    fn list_netns(&mut self) -> Result<Vec<String>, NetError>;
    /// Host interfaces.
    fn list_links(&mut self) -> Result<Vec<HostLink>, NetError>;
    /// IPv4 addresses on host interfaces: (interface, address, prefix).
    fn host_addrs(&mut self) -> Result<Vec<(String, Ipv4Addr, u8)>, NetError>;
    /// Distinct comments of the rules in the host's dough table.
    fn list_tags(&mut self) -> Result<Vec<String>, NetError>;
}

/// A fake that records every call and models the state it would produce:
/// which netns exist, which interfaces live where, which rules are loaded.
/// `fail_at` makes the n-th mutating call (0-based) fail.
#[derive(Debug, Default)]
pub struct FakeNet {
    pub calls: Vec<String>,
    pub netns: BTreeSet<String>,
    /// (netns or "" for the host, interface)
    pub links: BTreeSet<(String, String)>,
    /// (netns or "", interface, address)
    pub addrs: Vec<(String, String, Ipv4Addr)>,
    /// (netns or "", rule)
    pub rules: Vec<(String, Rule)>,
    /// Host veth → (netns or "", peer interface).
    pub peers: BTreeMap<String, (String, String)>,
    pub fail_at: Option<usize>,
    mutations: usize,
}

fn host(name: &str) -> (String, String) {
    (String::new(), name.to_string())
}

impl FakeNet {
    fn mutate(&mut self, call: String) -> Result<(), NetError> {
        self.calls.push(call.clone());
        let n = self.mutations;
        self.mutations += 1;
        if self.fail_at == Some(n) {
            return Err(NetError::op(call, "injected failure"));
        }
        Ok(())
    }

    fn key(netns: Option<&str>) -> String {
        netns.unwrap_or("").to_string()
    }

    fn need_link(&self, netns: Option<&str>, ifname: &str) -> Result<(), NetError> {
        let here = Self::key(netns);
        if ifname == "lo" && netns.is_none_or(|n| self.netns.contains(n)) {
            return Ok(());
        }
        if self.links.contains(&(here.clone(), ifname.to_string())) {
            return Ok(());
        }
        Err(NetError::op(
            format!("{ifname} in {here:?}"),
            "no such interface",
        ))
    }

    /// Put an interface on the host (for tests of what is not dough's).
    pub fn add_host_link(&mut self, name: &str) {
        self.links.insert(host(name));
    }

    /// Nothing dough made is left (interfaces, namespaces, rules).
    pub fn is_clean(&self) -> bool {
        self.netns.is_empty() && self.links.is_empty() && self.rules.is_empty()
    }
}

impl NetOps for FakeNet {
    fn create_netns(&mut self, name: &str) -> Result<(), NetError> {
        self.mutate(format!("create_netns {name}"))?;
        if !self.netns.insert(name.to_string()) {
            return Err(NetError::op(format!("create netns {name}"), "exists"));
        }
        Ok(())
    }

    fn delete_netns(&mut self, name: &str) -> Result<(), NetError> {
        self.mutate(format!("delete_netns {name}"))?;
        self.netns.remove(name);
        // Interfaces inside go; a veth's host end goes with its peer.
        self.links.retain(|(ns, _)| ns != name);
        let host_ends: Vec<String> = self
            .peers
            .iter()
            .filter(|(_, (ns, _))| ns == name)
            .map(|(h, _)| h.clone())
            .collect();
        for h in host_ends {
            self.links.remove(&host(&h));
            self.peers.remove(&h);
            self.addrs.retain(|(ns, l, _)| !(ns.is_empty() && *l == h));
        }
        self.rules.retain(|(ns, _)| ns != name);
        self.addrs.retain(|(ns, _, _)| ns != name);
        Ok(())
    }

    fn create_tap(&mut self, netns: &str, name: &str, owner: u32) -> Result<(), NetError> {
        self.mutate(format!("create_tap {netns} {name} uid={owner}"))?;
        if !self.netns.contains(netns) {
            return Err(NetError::op("create tap", "no such netns"));
        }
        self.links.insert((netns.to_string(), name.to_string()));
        Ok(())
    }

    fn create_veth(&mut self, host_end: &str, netns: &str, peer: &str) -> Result<(), NetError> {
        self.mutate(format!("create_veth {host_end} {netns}:{peer}"))?;
        if !self.netns.contains(netns) || self.links.contains(&host(host_end)) {
            return Err(NetError::op("create veth", "exists or no netns"));
        }
        self.links.insert(host(host_end));
        self.links.insert((netns.to_string(), peer.to_string()));
        self.peers
            .insert(host_end.to_string(), (netns.to_string(), peer.to_string()));
        Ok(())
    }

    fn delete_link(&mut self, name: &str) -> Result<(), NetError> {
        self.mutate(format!("delete_link {name}"))?;
        if self.links.remove(&host(name)) {
            self.addrs
                .retain(|(ns, l, _)| !(ns.is_empty() && l == name));
            if let Some(p) = self.peers.remove(name) {
                self.links.remove(&p);
            }
        }
        Ok(())
    }

    fn add_addr(
        &mut self,
        netns: Option<&str>,
        ifname: &str,
        addr: Ipv4Addr,
        prefix: u8,
    ) -> Result<(), NetError> {
        self.mutate(format!("add_addr {netns:?} {ifname} {addr}/{prefix}"))?;
        self.need_link(netns, ifname)?;
        self.addrs
            .push((Self::key(netns), ifname.to_string(), addr));
        Ok(())
    }

    fn link_up(&mut self, netns: Option<&str>, ifname: &str) -> Result<(), NetError> {
        self.mutate(format!("link_up {netns:?} {ifname}"))?;
        self.need_link(netns, ifname)
    }

    fn add_default_route(&mut self, netns: &str, via: Ipv4Addr) -> Result<(), NetError> {
        self.mutate(format!("add_default_route {netns} via {via}"))
    }

    fn enable_forwarding(&mut self, netns: Option<&str>) -> Result<(), NetError> {
        self.mutate(format!("enable_forwarding {netns:?}"))
    }

    fn add_rules(&mut self, netns: Option<&str>, rules: &[Rule]) -> Result<(), NetError> {
        self.mutate(format!("add_rules {netns:?} x{}", rules.len()))?;
        for r in rules {
            self.rules.push((Self::key(netns), r.clone()));
        }
        Ok(())
    }

    fn flush_tag(&mut self, tag: &str) -> Result<usize, NetError> {
        self.mutate(format!("flush_tag {tag}"))?;
        let before = self.rules.len();
        self.rules
            .retain(|(ns, r)| !(ns.is_empty() && r.comment == tag));
        Ok(before - self.rules.len())
    }

    fn list_netns(&mut self) -> Result<Vec<String>, NetError> {
        Ok(self.netns.iter().cloned().collect())
    }

    fn list_links(&mut self) -> Result<Vec<HostLink>, NetError> {
        Ok(self
            .links
            .iter()
            .filter(|(ns, _)| ns.is_empty())
            .map(|(_, l)| HostLink {
                name: l.clone(),
                peer_elsewhere: self.peers.get(l).is_some_and(|(ns, _)| !ns.is_empty()),
            })
            .collect())
    }

    fn host_addrs(&mut self) -> Result<Vec<(String, Ipv4Addr, u8)>, NetError> {
        Ok(self
            .addrs
            .iter()
            .filter(|(ns, _, _)| ns.is_empty())
            .map(|(_, l, a)| (l.clone(), *a, 30))
            .collect())
    }

    fn list_tags(&mut self) -> Result<Vec<String>, NetError> {
        let tags: BTreeSet<String> = self
            .rules
            .iter()
            .filter(|(ns, _)| ns.is_empty())
            .map(|(_, r)| r.comment.clone())
            .collect();
        Ok(tags.into_iter().collect())
    }
}

/// Wraps another [`NetOps`] and calls `hook(op, false)` before and
/// `hook(op, true)` after every mutating call: for timing each kind of step
/// (the benchmark) or stopping at one (the crash test).
pub struct Observed<'a> {
    pub inner: &'a mut dyn NetOps,
    pub hook: &'a mut dyn FnMut(&'static str, bool),
}

impl std::fmt::Debug for Observed<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Observed")
    }
}

impl Observed<'_> {
    fn around<T>(&mut self, op: &'static str, f: impl FnOnce(&mut dyn NetOps) -> T) -> T {
        (self.hook)(op, false);
        let r = f(&mut *self.inner);
        (self.hook)(op, true);
        r
    }
}

impl NetOps for Observed<'_> {
    fn create_netns(&mut self, n: &str) -> Result<(), NetError> {
        self.around("create_netns", |o| o.create_netns(n))
    }
    fn delete_netns(&mut self, n: &str) -> Result<(), NetError> {
        self.around("delete_netns", |o| o.delete_netns(n))
    }
    fn create_tap(&mut self, ns: &str, n: &str, u: u32) -> Result<(), NetError> {
        self.around("create_tap", |o| o.create_tap(ns, n, u))
    }
    fn create_veth(&mut self, h: &str, ns: &str, p: &str) -> Result<(), NetError> {
        self.around("create_veth", |o| o.create_veth(h, ns, p))
    }
    fn delete_link(&mut self, n: &str) -> Result<(), NetError> {
        self.around("delete_link", |o| o.delete_link(n))
    }
    fn add_addr(&mut self, ns: Option<&str>, i: &str, a: Ipv4Addr, p: u8) -> Result<(), NetError> {
        self.around("add_addr", |o| o.add_addr(ns, i, a, p))
    }
    fn link_up(&mut self, ns: Option<&str>, i: &str) -> Result<(), NetError> {
        self.around("link_up", |o| o.link_up(ns, i))
    }
    fn add_default_route(&mut self, ns: &str, v: Ipv4Addr) -> Result<(), NetError> {
        self.around("add_default_route", |o| o.add_default_route(ns, v))
    }
    fn enable_forwarding(&mut self, ns: Option<&str>) -> Result<(), NetError> {
        self.around("enable_forwarding", |o| o.enable_forwarding(ns))
    }
    fn add_rules(&mut self, ns: Option<&str>, r: &[Rule]) -> Result<(), NetError> {
        self.around("add_rules", |o| o.add_rules(ns, r))
    }
    fn flush_tag(&mut self, t: &str) -> Result<usize, NetError> {
        self.around("flush_tag", |o| o.flush_tag(t))
    }
    fn list_netns(&mut self) -> Result<Vec<String>, NetError> {
        self.inner.list_netns()
    }
    fn list_links(&mut self) -> Result<Vec<HostLink>, NetError> {
        self.inner.list_links()
    }
    fn host_addrs(&mut self) -> Result<Vec<(String, Ipv4Addr, u8)>, NetError> {
        self.inner.host_addrs()
    }
    fn list_tags(&mut self) -> Result<Vec<String>, NetError> {
        self.inner.list_tags()
    }
}

/// Operations on a shared implementation: a test keeps one handle to a
/// [`FakeNet`] and gives the other to the code under test, then looks at
/// what it did.
impl<T: NetOps + ?Sized> NetOps for std::sync::Arc<std::sync::Mutex<T>> {
    fn create_netns(&mut self, n: &str) -> Result<(), NetError> {
        self.lock()
            .unwrap_or_else(|p| p.into_inner())
            .create_netns(n)
    }
    fn delete_netns(&mut self, n: &str) -> Result<(), NetError> {
        self.lock()
            .unwrap_or_else(|p| p.into_inner())
            .delete_netns(n)
    }
    fn create_tap(&mut self, ns: &str, n: &str, u: u32) -> Result<(), NetError> {
        self.lock()
            .unwrap_or_else(|p| p.into_inner())
            .create_tap(ns, n, u)
    }
    fn create_veth(&mut self, h: &str, ns: &str, p: &str) -> Result<(), NetError> {
        self.lock()
            .unwrap_or_else(|e| e.into_inner())
            .create_veth(h, ns, p)
    }
    fn delete_link(&mut self, n: &str) -> Result<(), NetError> {
        self.lock()
            .unwrap_or_else(|p| p.into_inner())
            .delete_link(n)
    }
    fn add_addr(&mut self, ns: Option<&str>, i: &str, a: Ipv4Addr, p: u8) -> Result<(), NetError> {
        self.lock()
            .unwrap_or_else(|e| e.into_inner())
            .add_addr(ns, i, a, p)
    }
    fn link_up(&mut self, ns: Option<&str>, i: &str) -> Result<(), NetError> {
        self.lock()
            .unwrap_or_else(|p| p.into_inner())
            .link_up(ns, i)
    }
    fn add_default_route(&mut self, ns: &str, v: Ipv4Addr) -> Result<(), NetError> {
        self.lock()
            .unwrap_or_else(|p| p.into_inner())
            .add_default_route(ns, v)
    }
    fn enable_forwarding(&mut self, ns: Option<&str>) -> Result<(), NetError> {
        self.lock()
            .unwrap_or_else(|p| p.into_inner())
            .enable_forwarding(ns)
    }
    fn add_rules(&mut self, ns: Option<&str>, r: &[Rule]) -> Result<(), NetError> {
        self.lock()
            .unwrap_or_else(|p| p.into_inner())
            .add_rules(ns, r)
    }
    fn flush_tag(&mut self, t: &str) -> Result<usize, NetError> {
        self.lock().unwrap_or_else(|p| p.into_inner()).flush_tag(t)
    }
    fn list_netns(&mut self) -> Result<Vec<String>, NetError> {
        self.lock().unwrap_or_else(|p| p.into_inner()).list_netns()
    }
    fn list_links(&mut self) -> Result<Vec<HostLink>, NetError> {
        self.lock().unwrap_or_else(|p| p.into_inner()).list_links()
    }
    fn host_addrs(&mut self) -> Result<Vec<(String, Ipv4Addr, u8)>, NetError> {
        self.lock().unwrap_or_else(|p| p.into_inner()).host_addrs()
    }
    fn list_tags(&mut self) -> Result<Vec<String>, NetError> {
        self.lock().unwrap_or_else(|p| p.into_inner()).list_tags()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{Egress, InUse, Ipv4Net, NetPlan, DEFAULT_POOL};

    fn pool() -> Ipv4Net {
        DEFAULT_POOL.parse().unwrap()
    }

    #[test]
    fn setup_builds_the_plan_and_teardown_removes_it() {
        let mut f = FakeNet::default();
        let p = NetPlan::new("s1", "vm-1", Egress::Nat, pool(), 0, &InUse::default()).unwrap();
        crate::setup(&mut f, &p, pool()).unwrap();
        let v = p.transfer.as_ref().unwrap().host_veth.clone();
        let has = |ns: &str, l: &str| f.links.contains(&(ns.to_string(), l.to_string()));
        assert!(has("dough-s1-vm-1", "tap0") && has("dough-s1-vm-1", "veth0") && has("", &v));
        assert_eq!(f.list_tags().unwrap(), vec!["dough:s1:vm-1".to_string()]);
        assert!(f.rules.iter().any(|(ns, _)| ns == "dough-s1-vm-1"));
        crate::teardown(&mut f, &p).unwrap();
        assert!(f.is_clean(), "{f:?}");
        // Idempotent.
        crate::teardown(&mut f, &p).unwrap();
    }

    #[test]
    fn none_has_a_tap_and_nothing_else() {
        let mut f = FakeNet::default();
        let p = NetPlan::new("s1", "vm-2", Egress::None, pool(), 1000, &InUse::default()).unwrap();
        crate::setup(&mut f, &p, pool()).unwrap();
        assert_eq!(f.links.len(), 1);
        assert!(f
            .calls
            .iter()
            .any(|c| c == "create_tap dough-s1-vm-2 tap0 uid=1000"));
        assert!(f.rules.is_empty());
        assert!(!f.calls.iter().any(|c| c.contains("forwarding")));
    }

    #[test]
    fn a_failure_at_any_step_rolls_everything_back() {
        let p = NetPlan::new("s1", "vm-3", Egress::Nat, pool(), 0, &InUse::default()).unwrap();
        let mut ok = FakeNet::default();
        crate::setup(&mut ok, &p, pool()).unwrap();
        let steps = ok.calls.len();
        assert!(steps > 10);
        for k in 0..steps {
            let mut f = FakeNet {
                fail_at: Some(k),
                ..FakeNet::default()
            };
            let e = crate::setup(&mut f, &p, pool()).unwrap_err();
            assert!(e.to_string().contains("injected failure"), "{e}");
            assert!(
                f.is_clean(),
                "failing step {k} ({}) left {f:?}",
                ok.calls[k]
            );
        }
    }

    /// Built in two parts (the second while the VMM starts), a network is
    /// the same as built at once; the first part leaves no way out of the
    /// netns, and the second turns forwarding on only after every rule.
    #[test]
    fn setup_in_two_parts_is_setup_and_forwards_only_after_the_rules() {
        let p = NetPlan::new("s1", "vm-4", Egress::Nat, pool(), 0, &InUse::default()).unwrap();
        let mut whole = FakeNet::default();
        crate::setup(&mut whole, &p, pool()).unwrap();
        let mut parts = FakeNet::default();
        crate::setup_start(&mut parts, &p).unwrap();
        assert_eq!(
            parts
                .links
                .iter()
                .map(|(_, l)| l.as_str())
                .collect::<Vec<_>>(),
            vec!["tap0"],
            "{parts:?}"
        );
        assert!(
            parts.rules.is_empty() && parts.peers.is_empty(),
            "{parts:?}"
        );
        assert!(!parts.calls.iter().any(|c| c.contains("forwarding")));
        crate::setup_finish(&mut parts, &p, pool()).unwrap();
        assert_eq!(parts.calls, whole.calls);
        let last_rule = parts
            .calls
            .iter()
            .rposition(|c| c.starts_with("add_rules"))
            .unwrap();
        let first_fwd = parts
            .calls
            .iter()
            .position(|c| c.contains("forwarding"))
            .unwrap();
        assert!(last_rule < first_fwd, "{:?}", parts.calls);
        // A failed second part removes the first's too.
        let start_steps = {
            let mut f = FakeNet::default();
            crate::setup_start(&mut f, &p).unwrap();
            f.calls.len()
        };
        for k in start_steps..whole.calls.len() {
            let mut f = FakeNet {
                fail_at: Some(k),
                ..FakeNet::default()
            };
            crate::setup_start(&mut f, &p).unwrap();
            assert!(crate::setup_finish(&mut f, &p, pool()).is_err());
            assert!(f.is_clean(), "failing step {k} left {f:?}");
        }
    }

    #[test]
    fn leftovers_of_dead_clones_are_found_and_removed() {
        let mut f = FakeNet::default();
        let mut used = InUse::default();
        let live = NetPlan::new("s1", "vm-live", Egress::Nat, pool(), 0, &used).unwrap();
        used.add(&live);
        let dead = NetPlan::new("s1", "vm-dead", Egress::Nat, pool(), 0, &used).unwrap();
        crate::setup(&mut f, &live, pool()).unwrap();
        crate::setup(&mut f, &dead, pool()).unwrap();
        // Another scope's clone (another dough home): never touched.
        let other = NetPlan::new("s2", "vm-dead", Egress::Nat, pool(), 0, &used).unwrap();
        crate::setup(&mut f, &other, pool()).unwrap();
        // A veth abandoned half-made (its peer never left the host).
        f.add_host_link("dv0123456789abc");
        f.add_host_link("v0123456789abcp");
        f.peers.insert(
            "dv0123456789abc".into(),
            (String::new(), "v0123456789abcp".into()),
        );
        // Something that is not dough's is never touched.
        f.netns.insert("other".into());
        // Something that is not dough's is never touched.
        f.netns.insert("other".into());
        f.add_host_link("eth0");
        let l = crate::find_leftovers(&mut f, "s1", &["vm-live".to_string()]).unwrap();
        assert_eq!(l.netns, vec!["dough-s1-vm-dead".to_string()]);
        assert_eq!(l.veths, vec!["dv0123456789abc".to_string()]);
        assert_eq!(l.tags, vec!["dough:s1:vm-dead".to_string()]);
        crate::remove_leftovers(&mut f, &l).unwrap();
        assert!(
            crate::find_leftovers(&mut f, "s1", &["vm-live".to_string()])
                .unwrap()
                .is_empty()
        );
        assert!(f.netns.contains("other") && f.links.contains(&host("eth0")));
        assert!(f.netns.contains("dough-s1-vm-live"));
        assert!(f.netns.contains("dough-s2-vm-dead"));
        let _ = dead;
    }
}
