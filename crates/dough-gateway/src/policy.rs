//! What a clone's egress policy lets through the gateway.

use std::net::SocketAddrV4;

use dough_net::plan::valid_host_name;
use dough_net::{Allow, Egress};

/// How a TCP connection may leave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// To the address the guest dialed (`nat`, or a network rule).
    Direct(SocketAddrV4),
    /// Only by the name the client sends (TLS SNI or HTTP `Host`): some
    /// name rule covers this port.
    ByName,
    /// Nothing allows it.
    Deny(&'static str),
}

/// A clone's policy, as the gateway applies it.
#[derive(Debug, Clone)]
pub struct Policy {
    egress: Egress,
}

impl Policy {
    pub fn new(egress: Egress) -> Policy {
        Policy { egress }
    }

    pub fn egress(&self) -> &Egress {
        &self.egress
    }

    /// Whether the guest may resolve `name`: under `nat` any well-formed
    /// name, under an allow list a name some name rule matches.
    pub fn resolves(&self, name: &str) -> bool {
        if !valid_host_name(name.strip_suffix('.').unwrap_or(name)) {
            return false;
        }
        match &self.egress {
            Egress::None => false,
            Egress::Nat => true,
            Egress::Allow(rules) => rules
                .iter()
                .any(|r| matches!(r, Allow::Name { name: p, .. } if p.matches(name))),
        }
    }

    /// How a connection the guest made to `dst` may leave, before anything
    /// is read from it.
    pub fn route(&self, dst: SocketAddrV4) -> Route {
        match &self.egress {
            Egress::None => Route::Deny("no egress"),
            Egress::Nat => Route::Direct(dst),
            Egress::Allow(rules) => {
                let by_net = rules.iter().any(|r| match r {
                    Allow::Net { net, port } => {
                        net.contains(*dst.ip()) && port.is_none_or(|p| p == dst.port())
                    }
                    Allow::Name { .. } => false,
                });
                if by_net {
                    return Route::Direct(dst);
                }
                let by_name = rules.iter().any(|r| match r {
                    Allow::Name { ports, .. } => ports.contains(&dst.port()),
                    Allow::Net { .. } => false,
                });
                if by_name {
                    Route::ByName
                } else {
                    Route::Deny("no rule allows this address and port")
                }
            }
        }
    }

    /// Whether a client that asked for `name` may reach it on `port`.
    pub fn allows_name(&self, name: &str, port: u16) -> bool {
        match &self.egress {
            Egress::None => false,
            Egress::Nat => valid_host_name(name.strip_suffix('.').unwrap_or(name)),
            Egress::Allow(rules) => rules.iter().any(|r| match r {
                Allow::Name { name: p, ports } => ports.contains(&port) && p.matches(name),
                Allow::Net { .. } => false,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(s: &str) -> Policy {
        Policy::new(s.parse().unwrap())
    }

    fn dst(s: &str) -> SocketAddrV4 {
        s.parse().unwrap()
    }

    #[test]
    fn routes_follow_the_rules() {
        let p = policy("allow=api.example.com,*.github.com:22,10.5.0.0/16:8080");
        assert_eq!(p.route(dst("1.2.3.4:443")), Route::ByName);
        assert_eq!(p.route(dst("1.2.3.4:80")), Route::ByName);
        assert_eq!(p.route(dst("1.2.3.4:22")), Route::ByName);
        assert!(matches!(p.route(dst("1.2.3.4:25")), Route::Deny(_)));
        assert_eq!(
            p.route(dst("10.5.9.9:8080")),
            Route::Direct(dst("10.5.9.9:8080"))
        );
        assert!(matches!(p.route(dst("10.5.9.9:8081")), Route::Deny(_)));
        assert!(p.allows_name("api.example.com", 443));
        assert!(p.allows_name("API.example.com.", 80));
        assert!(!p.allows_name("api.example.com", 22));
        assert!(p.allows_name("codeload.github.com", 22));
        assert!(!p.allows_name("codeload.github.com", 443));
        assert!(!p.allows_name("evil.net", 443));
        assert!(p.resolves("codeload.github.com"));
        assert!(!p.resolves("github.com"));
        assert!(!p.resolves("evil.net"));

        let nat = policy("nat");
        assert_eq!(
            nat.route(dst("8.8.8.8:53")),
            Route::Direct(dst("8.8.8.8:53"))
        );
        assert!(nat.resolves("anything.example"));
        assert!(!nat.resolves("bad_name"));
        let none = policy("none");
        assert!(matches!(none.route(dst("1.2.3.4:443")), Route::Deny(_)));
        assert!(!none.resolves("api.example.com"));
    }
}
