//! The same operations done by spawning `ip` and `nft`, as most tools do.
//! dough does not use this to run clones: it is the baseline that
//! `dough bench net` measures the netlink implementation against.

use std::io::Write;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use crate::linux::LinuxNet;
use crate::ops::{HostLink, NetError, NetOps};
use crate::plan::{Chain, Rule, TABLE};

#[derive(Debug, Default, Clone)]
pub struct CommandNet {
    /// Listing (not measured) goes through netlink.
    lister: LinuxNet,
}

fn run(args: &[&str], stdin: Option<&str>, ok_if: &[&str]) -> Result<(), NetError> {
    let op = args.join(" ");
    let mut child = Command::new(args[0])
        .args(&args[1..])
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| NetError::io(op.clone(), e))?;
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(input.as_bytes())
            .map_err(|e| NetError::io(op.clone(), e))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| NetError::io(op.clone(), e))?;
    let err = String::from_utf8_lossy(&out.stderr);
    if out.status.success() || ok_if.iter().any(|m| err.contains(m)) {
        Ok(())
    } else {
        Err(NetError::op(op, err.trim().to_string()))
    }
}

fn ip(netns: Option<&str>, rest: &[&str]) -> Result<(), NetError> {
    let mut a = vec!["ip"];
    if let Some(n) = netns {
        a.extend(["-n", n]);
    }
    a.extend(rest);
    run(&a, None, &[])
}

/// `nft` commands that create dough's table and chains, then `rules`.
pub fn nft_script(rules: &[Rule]) -> String {
    let mut s = format!("add table ip {TABLE}\n");
    for c in Chain::ALL {
        let (kind, hook, prio) = c.base();
        s += &format!(
            "add chain ip {TABLE} {} {{ type {kind} hook {hook} priority {prio}; policy accept; }}\n",
            c.name()
        );
    }
    for r in rules {
        s += &format!("add rule ip {TABLE} {} {}\n", r.chain.name(), r.to_nft());
    }
    s
}

impl NetOps for CommandNet {
    fn create_netns(&mut self, name: &str) -> Result<(), NetError> {
        run(&["ip", "netns", "add", name], None, &[])
    }

    fn delete_netns(&mut self, name: &str) -> Result<(), NetError> {
        run(&["ip", "netns", "del", name], None, &["No such file"])
    }

    fn create_tap(&mut self, netns: &str, name: &str, owner: u32) -> Result<(), NetError> {
        let uid = owner.to_string();
        ip(
            Some(netns),
            &["tuntap", "add", "dev", name, "mode", "tap", "user", &uid],
        )
    }

    fn create_veth(&mut self, host: &str, netns: &str, peer: &str) -> Result<(), NetError> {
        ip(
            None,
            &[
                "link", "add", host, "type", "veth", "peer", "name", peer, "netns", netns,
            ],
        )
    }

    fn delete_link(&mut self, name: &str) -> Result<(), NetError> {
        run(&["ip", "link", "del", name], None, &["Cannot find device"])
    }

    fn add_addr(
        &mut self,
        netns: Option<&str>,
        ifname: &str,
        addr: Ipv4Addr,
        prefix: u8,
    ) -> Result<(), NetError> {
        let a = format!("{addr}/{prefix}");
        ip(netns, &["addr", "add", &a, "dev", ifname])
    }

    fn link_up(&mut self, netns: Option<&str>, ifname: &str) -> Result<(), NetError> {
        ip(netns, &["link", "set", ifname, "up"])
    }

    fn add_default_route(&mut self, netns: &str, via: Ipv4Addr) -> Result<(), NetError> {
        ip(
            Some(netns),
            &["route", "add", "default", "via", &via.to_string()],
        )
    }

    fn enable_forwarding(&mut self, netns: Option<&str>) -> Result<(), NetError> {
        let w = "echo 1 > /proc/sys/net/ipv4/ip_forward";
        match netns {
            Some(n) => run(&["ip", "netns", "exec", n, "sh", "-c", w], None, &[]),
            None => run(&["sh", "-c", w], None, &[]),
        }
    }

    fn add_rules(&mut self, netns: Option<&str>, rules: &[Rule]) -> Result<(), NetError> {
        if rules.is_empty() {
            return Ok(());
        }
        let script = nft_script(rules);
        match netns {
            Some(n) => run(
                &["ip", "netns", "exec", n, "nft", "-f", "-"],
                Some(&script),
                &[],
            ),
            None => run(&["nft", "-f", "-"], Some(&script), &[]),
        }
    }

    fn flush_tag(&mut self, tag: &str) -> Result<usize, NetError> {
        // `nft -a list` prints each rule with `# handle N`.
        let out = Command::new("nft")
            .args(["-a", "list", "table", "ip", TABLE])
            .output()
            .map_err(|e| NetError::io("nft -a list", e))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let mut chain = String::new();
        let mut n = 0;
        for line in text.lines() {
            let l = line.trim();
            if let Some(c) = l.strip_prefix("chain ") {
                chain = c.split_whitespace().next().unwrap_or("").to_string();
            } else if l.contains(&format!("comment \"{tag}\"")) {
                if let Some(h) = l.rsplit("# handle ").next() {
                    run(
                        &[
                            "nft",
                            "delete",
                            "rule",
                            "ip",
                            TABLE,
                            &chain,
                            "handle",
                            h.trim(),
                        ],
                        None,
                        &[],
                    )?;
                    n += 1;
                }
            }
        }
        Ok(n)
    }

    fn list_netns(&mut self) -> Result<Vec<String>, NetError> {
        self.lister.list_netns()
    }

    fn list_links(&mut self) -> Result<Vec<HostLink>, NetError> {
        self.lister.list_links()
    }

    fn host_addrs(&mut self) -> Result<Vec<(String, Ipv4Addr, u8)>, NetError> {
        self.lister.host_addrs()
    }

    fn list_tags(&mut self) -> Result<Vec<String>, NetError> {
        self.lister.list_tags()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{Egress, InUse, NetPlan, DEFAULT_POOL};

    #[test]
    fn nft_script_creates_table_chains_and_tagged_rules() {
        let pool = DEFAULT_POOL.parse().unwrap();
        let p = NetPlan::new("s1", "vm-1", Egress::Nat, pool, 0, &InUse::default()).unwrap();
        let s = nft_script(&p.host_rules(pool));
        assert!(s.starts_with("add table ip dough\n"));
        assert!(s.contains(
            "add chain ip dough postrouting { type nat hook postrouting priority 100; policy accept; }"
        ));
        assert_eq!(
            s.lines().filter(|l| l.starts_with("add rule")).count(),
            p.host_rules(pool).len()
        );
        assert!(s
            .lines()
            .filter(|l| l.starts_with("add rule"))
            .all(|l| l.ends_with("comment \"dough:s1:vm-1\"")));
    }
}
