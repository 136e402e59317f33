//! dough's egress gateway: the only way out of a clone.
//!
//! Every clone with egress gets a gateway process of its own
//! (`dough gateway`, spawned by the fabric next to the VMM). Its listening
//! sockets are made inside the clone's network namespace (on the TAP's
//! address, where the netns's nftables rules redirect all of the guest's
//! TCP and DNS), so the clone a connection belongs to is the socket it
//! arrived on — never anything the guest says. The process itself lives in
//! the host's namespace: it resolves names with the host's resolver and
//! connects upstream as the host.
//!
//! - [`policy`]: what an egress policy allows, by name, port and network.
//! - [`guard`]: addresses no clone may reach under any policy (the host,
//!   other clones, link-local, loopback).
//! - [`dns`]: dough's DNS answers: allowed names resolved on the host,
//!   everything else NXDOMAIN.
//! - [`sniff`]: the name a client asks for (TLS SNI, HTTP `Host`), read
//!   from its first bytes with a bound and a deadline.
//! - [`audit`]: every query and connection as one JSON line.
//! - [`broker`], [`tls`], [`mitm`]: credential brokering — placeholders in
//!   the guest, real values put into requests to the hosts a secret names,
//!   TLS terminated with dough's CA and forwarded verified.
//! - [`server`]: the event loop tying them together.

pub mod audit;
pub mod broker;
pub mod config;
pub mod dns;
pub mod guard;
pub mod mitm;
pub mod policy;
pub mod server;
pub mod sniff;
pub mod tls;

pub use config::Config;
