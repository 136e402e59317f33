//! Per-clone network isolation.
//!
//! [`plan`] derives everything about a clone's network as plain data;
//! [`ops::NetOps`] is the narrow set of privileged effects it needs, with a
//! recording fake ([`ops::FakeNet`]) for unit tests; [`setup`] and
//! [`teardown`] apply a plan through any `NetOps`, rolling back a failed
//! setup so nothing is left half-created.

pub mod commands;
pub mod linux;
pub mod nft;
pub mod ops;
pub mod plan;
pub mod testing;

pub use ops::{HostLink, NetError, NetOps};
pub use plan::{Allow, Egress, InUse, Ipv4Net, NamePattern, NetPlan, PlanError};

use plan::{Chain, GUEST_GW, GUEST_PREFIX, NS_VETH};

/// Build everything `plan` describes. On failure, whatever was created is
/// removed again before the error is returned.
pub fn setup(ops: &mut dyn NetOps, plan: &NetPlan, pool: Ipv4Net) -> Result<(), NetError> {
    setup_start(ops, plan)?;
    setup_finish(ops, plan, pool)
}

/// The part of [`setup`] a clone's processes need before they start: the
/// netns (with `lo` up) and the TAP its VMM opens by name, with the
/// guest's gateway address its egress gateway listens on. On failure
/// nothing is left. Nothing can leave the netns yet: it has no other link.
pub fn setup_start(ops: &mut dyn NetOps, plan: &NetPlan) -> Result<(), NetError> {
    rolled_back(ops, plan, |ops| {
        let ns = Some(plan.netns.as_str());
        ops.create_netns(&plan.netns)?;
        ops.link_up(ns, "lo")?;
        ops.create_tap(&plan.netns, &plan.tap, plan.tap_owner)?;
        ops.add_addr(ns, &plan.tap, GUEST_GW, GUEST_PREFIX)?;
        ops.link_up(ns, &plan.tap)
    })
}

/// The rest of [`setup`], after [`setup_start`]: addresses, the veth
/// pair, routes, rules and, last, forwarding — so no packet is forwarded
/// before every rule is in place. It may run while the VMM starts, as long
/// as it is done before the guest runs. On failure, everything of the
/// plan is removed (what `setup_start` made too).
pub fn setup_finish(ops: &mut dyn NetOps, plan: &NetPlan, pool: Ipv4Net) -> Result<(), NetError> {
    rolled_back(ops, plan, |ops| finish_steps(ops, plan, pool))
}

fn rolled_back(
    ops: &mut dyn NetOps,
    plan: &NetPlan,
    steps: impl FnOnce(&mut dyn NetOps) -> Result<(), NetError>,
) -> Result<(), NetError> {
    let r = steps(ops);
    if let Err(e) = r {
        if let Err(undo) = teardown(ops, plan) {
            tracing::error!(netns = %plan.netns, "rolling back a failed network setup: {undo}");
        }
        return Err(e);
    }
    Ok(())
}

fn finish_steps(ops: &mut dyn NetOps, plan: &NetPlan, pool: Ipv4Net) -> Result<(), NetError> {
    let ns = Some(plan.netns.as_str());
    let Some(t) = &plan.transfer else {
        // Nothing forwarded: at most the gateway's redirects.
        return ops.add_rules(ns, &plan.ns_rules());
    };
    ops.create_veth(&t.host_veth, &plan.netns, NS_VETH)?;
    ops.add_addr(None, &t.host_veth, t.host_addr, 30)?;
    ops.link_up(None, &t.host_veth)?;
    ops.add_addr(ns, NS_VETH, t.ns_addr, 30)?;
    ops.link_up(ns, NS_VETH)?;
    ops.add_default_route(&plan.netns, t.host_addr)?;
    ops.add_rules(ns, &plan.ns_rules())?;
    ops.add_rules(None, &plan.host_rules(pool))?;
    ops.enable_forwarding(ns)?;
    ops.enable_forwarding(None)?;
    Ok(())
}

/// Remove everything `plan` describes: the netns, every host rule
/// carrying the clone's tag, and the host end of its veth pair. Missing
/// pieces are not errors.
///
/// The veth is deleted here rather than left to go with the netns: the
/// kernel destroys a deleted netns (and the veth pair in it) only once
/// nothing holds it any more, and in its own cleanup work after that. On
/// fresh CI machines a deleted netns's host veth was seen still there
/// after 90 s, holding the clone's addresses and name. Deleting one end
/// removes both at once, whoever still holds the namespace; it costs the
/// caller an RCU grace period (~20 ms).
pub fn teardown(ops: &mut dyn NetOps, plan: &NetPlan) -> Result<(), NetError> {
    let mut first_err = None;
    if let Err(e) = ops.delete_netns(&plan.netns) {
        first_err.get_or_insert(e);
    }
    if let Err(e) = ops.flush_tag(&plan.tag) {
        first_err.get_or_insert(e);
    }
    if let Some(t) = &plan.transfer {
        if let Err(e) = ops.delete_link(&t.host_veth) {
            first_err.get_or_insert(e);
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Whether nothing of `plan` is left on the host: no netns, no host veth,
/// no rule with its tag.
pub fn gone(ops: &mut dyn NetOps, plan: &NetPlan) -> Result<bool, NetError> {
    if ops.list_netns()?.contains(&plan.netns) || ops.list_tags()?.contains(&plan.tag) {
        return Ok(false);
    }
    Ok(match &plan.transfer {
        None => true,
        Some(t) => !ops.list_links()?.iter().any(|l| l.name == t.host_veth),
    })
}

/// What a sweep of leftovers found and removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Leftovers {
    pub netns: Vec<String>,
    pub veths: Vec<String>,
    pub tags: Vec<String>,
}

impl Leftovers {
    pub fn is_empty(&self) -> bool {
        self.netns.is_empty() && self.veths.is_empty() && self.tags.is_empty()
    }
}

/// dough's network objects in `scope` that belong to no clone in `live`
/// (clone ids), plus host veths of any scope abandoned half-made. The
/// caller holds the host-wide network lock, so nothing is mid-setup.
pub fn find_leftovers(
    ops: &mut dyn NetOps,
    scope: &str,
    live: &[String],
) -> Result<Leftovers, NetError> {
    let live_ns: Vec<String> = live
        .iter()
        .filter_map(|id| plan::netns_name(scope, id).ok())
        .collect();
    let live_tags: Vec<String> = live.iter().map(|id| plan::tag(scope, id)).collect();
    let ns_prefix = format!("{}{scope}-", plan::NETNS_PREFIX);
    let tag_prefix = format!("dough:{scope}:");
    let netns = ops
        .list_netns()?
        .into_iter()
        .filter(|n| n.starts_with(&ns_prefix) && !live_ns.contains(n))
        .collect();
    // A clone's host veth dies with its netns; one whose peer is still on
    // the host never got its netns.
    let veths = ops
        .list_links()?
        .into_iter()
        .filter(|l| {
            l.name.starts_with(plan::VETH_PREFIX)
                && l.name.len() == plan::IFNAME_MAX
                && !l.peer_elsewhere
        })
        .map(|l| l.name)
        .collect();
    let tags = ops
        .list_tags()?
        .into_iter()
        .filter(|t| t.starts_with(&tag_prefix) && !live_tags.contains(t))
        .collect();
    Ok(Leftovers { netns, veths, tags })
}

/// What live dough veths on this host already use (any scope): their
/// names and transfer subnets, read from the system itself.
pub fn in_use_on_host(ops: &mut dyn NetOps) -> Result<InUse, NetError> {
    let mut u = InUse::default();
    for l in ops.list_links()? {
        u.veths.insert(l.name);
    }
    for (ifname, addr, _) in ops.host_addrs()? {
        if ifname.starts_with(plan::VETH_PREFIX) {
            if let Some(n) = Ipv4Net::new(addr, 30) {
                u.subnets.insert(n);
            }
        }
    }
    Ok(u)
}

/// Remove what [`find_leftovers`] found.
pub fn remove_leftovers(ops: &mut dyn NetOps, l: &Leftovers) -> Result<(), NetError> {
    for n in &l.netns {
        ops.delete_netns(n)?;
    }
    for v in &l.veths {
        ops.delete_link(v)?;
    }
    for t in &l.tags {
        ops.flush_tag(t)?;
    }
    Ok(())
}

/// The chains of dough's table, for implementations that create it.
pub fn chains() -> [Chain; 4] {
    Chain::ALL
}
