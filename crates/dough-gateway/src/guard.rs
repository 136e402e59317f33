//! Addresses no clone reaches under any policy, whatever a name resolves
//! to or a network rule says: this host (loopback and every address on its
//! interfaces, which includes every clone's transfer address), the
//! transfer pool (other clones), link-local (cloud metadata), and
//! addresses that are not unicast destinations at all.

use std::net::Ipv4Addr;

use dough_net::Ipv4Net;

/// Why `ip` is never a destination, if it is not.
pub fn forbidden(ip: Ipv4Addr, deny: &[Ipv4Net]) -> Option<&'static str> {
    forbidden_on(ip, deny, &host_addrs())
}

/// `ips` less every address that is never a destination (the host's own
/// addresses read once for all of them).
pub fn reachable(ips: Vec<Ipv4Addr>, deny: &[Ipv4Net]) -> Vec<Ipv4Addr> {
    let host = host_addrs();
    ips.into_iter()
        .filter(|ip| forbidden_on(*ip, deny, &host).is_none())
        .collect()
}

fn forbidden_on(ip: Ipv4Addr, deny: &[Ipv4Net], host: &[Ipv4Addr]) -> Option<&'static str> {
    if ip.is_loopback() {
        return Some("loopback");
    }
    if ip.is_unspecified() || ip.octets()[0] == 0 {
        return Some("unspecified");
    }
    if ip.is_link_local() {
        return Some("link-local");
    }
    if ip.is_multicast() || ip.is_broadcast() || ip.octets()[0] >= 240 {
        return Some("not a unicast address");
    }
    if deny.iter().any(|n| n.contains(ip)) {
        return Some("another clone's network");
    }
    if host.contains(&ip) {
        return Some("the host itself");
    }
    None
}

/// Every IPv4 address on this host's interfaces, read now (they change).
pub fn host_addrs() -> Vec<Ipv4Addr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    addrs
        .filter_map(|a| a.address)
        .filter_map(|a| a.as_sockaddr_in().map(|s| s.ip()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_and_special_ranges_are_forbidden() {
        let pool: Ipv4Net = "10.213.0.0/16".parse().unwrap();
        for (ip, why) in [
            ("127.0.0.1", "loopback"),
            ("127.9.9.9", "loopback"),
            ("0.0.0.0", "unspecified"),
            ("0.1.2.3", "unspecified"),
            ("169.254.169.254", "link-local"),
            ("224.0.0.1", "not a unicast address"),
            ("255.255.255.255", "not a unicast address"),
            ("10.213.4.6", "another clone's network"),
        ] {
            assert_eq!(forbidden(ip.parse().unwrap(), &[pool]), Some(why), "{ip}");
        }
        for ip in host_addrs() {
            assert!(forbidden(ip, &[]).is_some(), "{ip}");
        }
        assert_eq!(forbidden("192.0.2.10".parse().unwrap(), &[pool]), None);
    }
}
