//! nftables over netlink, in-process: dough's table, chains and rules go to
//! the kernel as one `NETLINK_NETFILTER` batch per call, with no `nft`
//! process (two spawns used to be ~19 ms of a clone's ~20 ms network
//! setup). The rules are encoded as `nft` 1.0 encodes the same rule text
//! (checked in the privileged tier: the two listings, bytecode included,
//! are compared), so `nft list ruleset` shows them as if `nft` had added
//! them, comments included.
//!
//! Written here rather than taken from a crate: the one pure-Rust nftables
//! crate is GPL-3.0 and the others wrap libnftnl (a C library and its
//! headers on every host); dough needs a dozen expression kinds.
//!
//! The socket is opened in the calling thread's network namespace (a
//! netlink socket stays bound to the namespace it was created in): use
//! [`crate::linux::in_netns`] to work in a clone's.

use std::time::Duration;

use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};

use crate::plan::{Chain, Ipv4Net, Match, Rule, Verdict, L4};
use crate::NetError;

// linux/netlink.h
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_MULTI: u16 = 0x2;
/// A dump the ruleset changed under (another dough adding or deleting
/// rules between two of its parts): what it listed may lack rules.
const NLM_F_DUMP_INTR: u16 = 0x10;
/// Dumps [`Nft::list`] takes before it gives up on a changing ruleset.
const DUMP_TRIES: usize = 20;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_APPEND: u16 = 0x800;
const NLMSG_ERROR: u16 = 0x2;
const NLMSG_DONE: u16 = 0x3;
const NLA_F_NESTED: u16 = 0x8000;
// linux/netfilter/nfnetlink.h
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFPROTO_IPV4: u8 = 2;
// linux/netfilter/nf_tables.h: messages
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_GETRULE: u16 = 7;
const NFT_MSG_DELRULE: u16 = 8;
// attributes
const NFTA_TABLE_NAME: u16 = 1;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_HANDLE: u16 = 3;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_RULE_USERDATA: u16 = 7;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_META_DREG: u16 = 1;
const NFTA_META_KEY: u16 = 2;
const NFTA_CMP_SREG: u16 = 1;
const NFTA_CMP_OP: u16 = 2;
const NFTA_CMP_DATA: u16 = 3;
const NFTA_PAYLOAD_DREG: u16 = 1;
const NFTA_PAYLOAD_BASE: u16 = 2;
const NFTA_PAYLOAD_OFFSET: u16 = 3;
const NFTA_PAYLOAD_LEN: u16 = 4;
const NFTA_BITWISE_SREG: u16 = 1;
const NFTA_BITWISE_DREG: u16 = 2;
const NFTA_BITWISE_LEN: u16 = 3;
const NFTA_BITWISE_MASK: u16 = 4;
const NFTA_BITWISE_XOR: u16 = 5;
const NFTA_CT_DREG: u16 = 1;
const NFTA_CT_KEY: u16 = 2;
const NFTA_IMMEDIATE_DREG: u16 = 1;
const NFTA_IMMEDIATE_DATA: u16 = 2;
const NFTA_REDIR_REG_PROTO_MIN: u16 = 1;
const NFTA_REDIR_FLAGS: u16 = 3;
// values
const NFT_REG_VERDICT: u32 = 0;
const NFT_REG_1: u32 = 1;
const NFT_CMP_EQ: u32 = 0;
const NFT_CMP_NEQ: u32 = 1;
const NFT_META_IIFNAME: u32 = 6;
const NFT_META_OIFNAME: u32 = 7;
const NFT_META_L4PROTO: u32 = 16;
const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
const NFT_PAYLOAD_TRANSPORT_HEADER: u32 = 2;
const NFT_CT_STATE: u32 = 0;
const NF_DROP: u32 = 0;
const NF_ACCEPT: u32 = 1;
const NF_NAT_RANGE_PROTO_SPECIFIED: u32 = 2;
// ct state bits: established (1 << 1) | related (1 << 2)
const CT_ESTABLISHED_RELATED: u32 = 0b110;
// libnftnl's rule user data: TLV, type 0 = the comment (NUL-terminated).
const UDATA_RULE_COMMENT: u8 = 0;
const IFNAMSIZ: usize = 16;
/// A reply the kernel has not sent by then is an error, never a hang.
const REPLY_DEADLINE: Duration = Duration::from_secs(5);

/// One netlink attribute list under construction.
#[derive(Default)]
struct Attrs(Vec<u8>);

impl Attrs {
    fn bytes(&mut self, kind: u16, v: &[u8]) -> &mut Self {
        let len = 4 + v.len();
        self.0.extend_from_slice(&(len as u16).to_ne_bytes());
        self.0.extend_from_slice(&kind.to_ne_bytes());
        self.0.extend_from_slice(v);
        self.0.resize(self.0.len().next_multiple_of(4), 0);
        self
    }
    fn str(&mut self, kind: u16, s: &str) -> &mut Self {
        let mut v = s.as_bytes().to_vec();
        v.push(0);
        self.bytes(kind, &v)
    }
    /// nf_tables' integers are big-endian.
    fn be32(&mut self, kind: u16, v: u32) -> &mut Self {
        self.bytes(kind, &v.to_be_bytes())
    }
    fn nest(&mut self, kind: u16, inner: Attrs) -> &mut Self {
        self.bytes(kind | NLA_F_NESTED, &inner.0)
    }
    fn with(f: impl FnOnce(&mut Attrs)) -> Attrs {
        let mut a = Attrs::default();
        f(&mut a);
        a
    }
}

/// The expressions of one rule, in order.
#[derive(Default)]
struct Exprs(Attrs);

impl Exprs {
    fn push(&mut self, name: &str, data: Attrs) {
        let elem = Attrs::with(|e| {
            e.str(NFTA_EXPR_NAME, name);
            if !data.0.is_empty() {
                e.nest(NFTA_EXPR_DATA, data);
            }
        });
        self.0.nest(NFTA_LIST_ELEM, elem);
    }
    fn meta(&mut self, key: u32) {
        self.push(
            "meta",
            Attrs::with(|a| {
                a.be32(NFTA_META_KEY, key).be32(NFTA_META_DREG, NFT_REG_1);
            }),
        );
    }
    fn payload(&mut self, base: u32, offset: u32, len: u32) {
        self.push(
            "payload",
            Attrs::with(|a| {
                a.be32(NFTA_PAYLOAD_DREG, NFT_REG_1)
                    .be32(NFTA_PAYLOAD_BASE, base)
                    .be32(NFTA_PAYLOAD_OFFSET, offset)
                    .be32(NFTA_PAYLOAD_LEN, len);
            }),
        );
    }
    fn cmp(&mut self, op: u32, data: &[u8]) {
        self.push(
            "cmp",
            Attrs::with(|a| {
                a.be32(NFTA_CMP_SREG, NFT_REG_1).be32(NFTA_CMP_OP, op).nest(
                    NFTA_CMP_DATA,
                    Attrs::with(|d| {
                        d.bytes(NFTA_DATA_VALUE, data);
                    }),
                );
            }),
        );
    }
    fn bitwise(&mut self, mask: &[u8]) {
        let zero = vec![0u8; mask.len()];
        self.push(
            "bitwise",
            Attrs::with(|a| {
                a.be32(NFTA_BITWISE_SREG, NFT_REG_1)
                    .be32(NFTA_BITWISE_DREG, NFT_REG_1)
                    .be32(NFTA_BITWISE_LEN, mask.len() as u32)
                    .nest(
                        NFTA_BITWISE_MASK,
                        Attrs::with(|d| {
                            d.bytes(NFTA_DATA_VALUE, mask);
                        }),
                    )
                    .nest(
                        NFTA_BITWISE_XOR,
                        Attrs::with(|d| {
                            d.bytes(NFTA_DATA_VALUE, &zero);
                        }),
                    );
            }),
        );
    }
    fn l4proto(&mut self, p: L4) {
        self.meta(NFT_META_L4PROTO);
        self.cmp(NFT_CMP_EQ, &[l4_number(p)]);
    }
    /// `ip saddr|daddr [!=] NET`, as nft encodes a prefix: whole bytes are
    /// loaded and compared as they are, other prefixes masked first.
    fn addr(&mut self, offset: u32, net: &Ipv4Net, op: u32) {
        let octets = net.addr.octets();
        if net.prefix.is_multiple_of(8) && net.prefix > 0 {
            let n = usize::from(net.prefix / 8);
            self.payload(NFT_PAYLOAD_NETWORK_HEADER, offset, n as u32);
            self.cmp(op, &octets[..n]);
        } else {
            self.payload(NFT_PAYLOAD_NETWORK_HEADER, offset, 4);
            let mask = match net.prefix {
                0 => 0u32,
                p => u32::MAX << (32 - u32::from(p)),
            };
            self.bitwise(&mask.to_be_bytes());
            self.cmp(op, &octets);
        }
    }
    fn ifname(&mut self, key: u32, name: &str, op: u32) {
        let mut v = [0u8; IFNAMSIZ];
        let b = name.as_bytes();
        let n = b.len().min(IFNAMSIZ - 1);
        v[..n].copy_from_slice(&b[..n]);
        self.meta(key);
        self.cmp(op, &v);
    }
    fn verdict(&mut self, code: u32) {
        let data = Attrs::with(|d| {
            d.nest(
                NFTA_DATA_VERDICT,
                Attrs::with(|v| {
                    v.be32(NFTA_VERDICT_CODE, code);
                }),
            );
        });
        self.push(
            "immediate",
            Attrs::with(|a| {
                a.be32(NFTA_IMMEDIATE_DREG, NFT_REG_VERDICT)
                    .nest(NFTA_IMMEDIATE_DATA, data);
            }),
        );
    }
}

fn l4_number(p: L4) -> u8 {
    match p {
        L4::Tcp => libc::IPPROTO_TCP as u8,
        L4::Udp => libc::IPPROTO_UDP as u8,
    }
}

/// The rule's expressions, as `nft` encodes its text form.
fn rule_exprs(rule: &Rule) -> Attrs {
    let mut x = Exprs::default();
    for m in &rule.matches {
        match m {
            Match::Iif(i) => x.ifname(NFT_META_IIFNAME, i, NFT_CMP_EQ),
            Match::Oif(o) => x.ifname(NFT_META_OIFNAME, o, NFT_CMP_EQ),
            Match::NotOif(o) => x.ifname(NFT_META_OIFNAME, o, NFT_CMP_NEQ),
            Match::Saddr(n) => x.addr(12, n, NFT_CMP_EQ),
            Match::NotSaddr(n) => x.addr(12, n, NFT_CMP_NEQ),
            Match::Daddr(n) => x.addr(16, n, NFT_CMP_EQ),
            Match::Dport(p, port) => {
                // nft adds the protocol the port belongs to.
                x.l4proto(*p);
                x.payload(NFT_PAYLOAD_TRANSPORT_HEADER, 2, 2);
                x.cmp(NFT_CMP_EQ, &port.to_be_bytes());
            }
            Match::L4(p) => x.l4proto(*p),
            Match::Established => {
                x.push(
                    "ct",
                    Attrs::with(|a| {
                        a.be32(NFTA_CT_KEY, NFT_CT_STATE)
                            .be32(NFTA_CT_DREG, NFT_REG_1);
                    }),
                );
                // ct state is a host-order u32.
                x.bitwise(&CT_ESTABLISHED_RELATED.to_ne_bytes());
                x.cmp(NFT_CMP_NEQ, &0u32.to_ne_bytes());
            }
        }
    }
    match rule.verdict {
        Verdict::Accept => x.verdict(NF_ACCEPT),
        Verdict::Drop => x.verdict(NF_DROP),
        Verdict::Masquerade => x.push("masq", Attrs::default()),
        Verdict::Redirect(port) => {
            x.push(
                "immediate",
                Attrs::with(|a| {
                    a.be32(NFTA_IMMEDIATE_DREG, NFT_REG_1).nest(
                        NFTA_IMMEDIATE_DATA,
                        Attrs::with(|d| {
                            d.bytes(NFTA_DATA_VALUE, &port.to_be_bytes());
                        }),
                    );
                }),
            );
            x.push(
                "redir",
                Attrs::with(|a| {
                    a.be32(NFTA_REDIR_REG_PROTO_MIN, NFT_REG_1)
                        .be32(NFTA_REDIR_FLAGS, NF_NAT_RANGE_PROTO_SPECIFIED);
                }),
            );
        }
    }
    x.0
}

/// libnftnl's user data holding a comment (what `nft list` shows).
fn comment_udata(comment: &str) -> Option<Vec<u8>> {
    let b = comment.as_bytes();
    // One TLV byte of length, the NUL included; nft allows 128 bytes.
    if b.is_empty() || b.len() > 127 || b.contains(&0) {
        return None;
    }
    let mut v = vec![UDATA_RULE_COMMENT, (b.len() + 1) as u8];
    v.extend_from_slice(b);
    v.push(0);
    Some(v)
}

fn hook_number(c: Chain) -> u32 {
    // NF_INET_PRE_ROUTING 0, LOCAL_IN 1, FORWARD 2, POST_ROUTING 4
    match c {
        Chain::Prerouting => 0,
        Chain::Input => 1,
        Chain::Forward => 2,
        Chain::Postrouting => 4,
    }
}

/// One message of a batch: its nftables message type, flags and attributes.
struct Msg {
    kind: u16,
    flags: u16,
    attrs: Attrs,
}

/// `table` and dough's four base chains, created if missing (never
/// replaced: `NLM_F_CREATE` without `NLM_F_EXCL`).
fn table_msgs(table: &str) -> Vec<Msg> {
    let mut v = vec![Msg {
        kind: NFT_MSG_NEWTABLE,
        flags: NLM_F_CREATE,
        attrs: Attrs::with(|a| {
            a.str(NFTA_TABLE_NAME, table);
        }),
    }];
    for c in Chain::ALL {
        let (kind, _, prio) = c.base();
        v.push(Msg {
            kind: NFT_MSG_NEWCHAIN,
            flags: NLM_F_CREATE,
            attrs: Attrs::with(|a| {
                a.str(NFTA_CHAIN_TABLE, table)
                    .str(NFTA_CHAIN_NAME, c.name())
                    .nest(
                        NFTA_CHAIN_HOOK,
                        Attrs::with(|h| {
                            h.be32(NFTA_HOOK_HOOKNUM, hook_number(c))
                                .be32(NFTA_HOOK_PRIORITY, prio as u32);
                        }),
                    )
                    .be32(NFTA_CHAIN_POLICY, NF_ACCEPT)
                    .str(NFTA_CHAIN_TYPE, kind);
            }),
        });
    }
    v
}

fn rule_msg(table: &str, rule: &Rule) -> Result<Msg, NetError> {
    let udata = comment_udata(&rule.comment).ok_or_else(|| {
        NetError::op(
            "nftables rule",
            format!("comment {:?} is not 1-127 bytes without NUL", rule.comment),
        )
    })?;
    Ok(Msg {
        kind: NFT_MSG_NEWRULE,
        flags: NLM_F_CREATE | NLM_F_APPEND,
        attrs: Attrs::with(|a| {
            a.str(NFTA_RULE_TABLE, table)
                .str(NFTA_RULE_CHAIN, rule.chain.name())
                .nest(NFTA_RULE_EXPRESSIONS, rule_exprs(rule))
                .bytes(NFTA_RULE_USERDATA, &udata);
        }),
    })
}

fn nlmsg(out: &mut Vec<u8>, kind: u16, flags: u16, seq: u32, family: u8, res_id: u16, body: &[u8]) {
    let len = 16 + 4 + body.len();
    out.extend_from_slice(&(len as u32).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(&flags.to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes());
    // struct nfgenmsg
    out.push(family);
    out.push(0); // NFNETLINK_V0
    out.extend_from_slice(&res_id.to_be_bytes());
    out.extend_from_slice(body);
}

/// A batch: begin, the messages (each acknowledged), end. Returns the
/// bytes and the sequence numbers that will be acknowledged.
fn batch(first_seq: u32, msgs: &[Msg]) -> (Vec<u8>, Vec<u32>) {
    let mut out = Vec::new();
    let mut seq = first_seq;
    nlmsg(
        &mut out,
        NFNL_MSG_BATCH_BEGIN,
        NLM_F_REQUEST,
        seq,
        0,
        NFNL_SUBSYS_NFTABLES,
        &[],
    );
    let mut acked = Vec::new();
    for m in msgs {
        seq += 1;
        acked.push(seq);
        nlmsg(
            &mut out,
            (NFNL_SUBSYS_NFTABLES << 8) | m.kind,
            NLM_F_REQUEST | NLM_F_ACK | m.flags,
            seq,
            NFPROTO_IPV4,
            0,
            &m.attrs.0,
        );
    }
    seq += 1;
    nlmsg(
        &mut out,
        NFNL_MSG_BATCH_END,
        NLM_F_REQUEST,
        seq,
        0,
        NFNL_SUBSYS_NFTABLES,
        &[],
    );
    (out, acked)
}

/// A rule as listed: its chain, handle and comment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub chain: String,
    pub handle: u64,
    pub comment: String,
}

/// Netlink messages in `buf`: (type, flags, seq, payload after the header).
fn messages(buf: &[u8]) -> impl Iterator<Item = (u16, u16, u32, &[u8])> {
    let mut rest = buf;
    std::iter::from_fn(move || {
        if rest.len() < 16 {
            return None;
        }
        let len = u32::from_ne_bytes(rest[0..4].try_into().ok()?) as usize;
        if len < 16 || len > rest.len() {
            return None;
        }
        let kind = u16::from_ne_bytes(rest[4..6].try_into().ok()?);
        let flags = u16::from_ne_bytes(rest[6..8].try_into().ok()?);
        let seq = u32::from_ne_bytes(rest[8..12].try_into().ok()?);
        let body = &rest[16..len];
        rest = &rest[len.next_multiple_of(4).min(rest.len())..];
        Some((kind, flags, seq, body))
    })
}

/// Attributes in `buf`: (type without flags, value).
fn attrs(buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut rest = buf;
    std::iter::from_fn(move || {
        if rest.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([rest[0], rest[1]]) as usize;
        let kind = u16::from_ne_bytes([rest[2], rest[3]]) & 0x3fff;
        if len < 4 || len > rest.len() {
            return None;
        }
        let v = &rest[4..len];
        rest = &rest[len.next_multiple_of(4).min(rest.len())..];
        Some((kind, v))
    })
}

fn c_str(v: &[u8]) -> String {
    let end = v.iter().position(|&b| b == 0).unwrap_or(v.len());
    String::from_utf8_lossy(&v[..end]).into_owned()
}

/// A listed rule from a `NFT_MSG_NEWRULE` dump message's attributes.
fn parse_rule(body: &[u8]) -> Option<Listed> {
    // struct nfgenmsg comes first.
    let mut r = Listed {
        chain: String::new(),
        handle: 0,
        comment: String::new(),
    };
    for (kind, v) in attrs(body.get(4..)?) {
        match kind {
            NFTA_RULE_CHAIN => r.chain = c_str(v),
            NFTA_RULE_HANDLE => r.handle = u64::from_be_bytes(v.try_into().ok()?),
            NFTA_RULE_USERDATA => {
                let mut u = v;
                while u.len() >= 2 {
                    let (t, l) = (u[0], usize::from(u[1]));
                    let val = u.get(2..2 + l)?;
                    if t == UDATA_RULE_COMMENT {
                        r.comment = c_str(val);
                    }
                    u = &u[2 + l..];
                }
            }
            _ => {}
        }
    }
    Some(r)
}

/// A netfilter netlink socket in this thread's network namespace.
pub struct Nft {
    sock: Socket,
    seq: u32,
}

impl Nft {
    pub fn open() -> Result<Nft, NetError> {
        let op = "opening a netfilter netlink socket";
        let mut sock = Socket::new(NETLINK_NETFILTER).map_err(|e| NetError::io(op, e))?;
        sock.bind_auto().map_err(|e| NetError::io(op, e))?;
        sock.connect(&SocketAddr::new(0, 0))
            .map_err(|e| NetError::io(op, e))?;
        set_rcv_timeout(&sock, REPLY_DEADLINE).map_err(|e| NetError::io(op, e))?;
        // Sequence numbers only need to differ between requests on this socket.
        let seq = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(1);
        Ok(Nft { sock, seq })
    }

    /// Close the socket on a thread of its own: after a change, the close
    /// waits in the kernel for the change's cleanup (an RCU grace period).
    pub fn close_in_background(self) {
        std::thread::spawn(move || drop(self));
    }

    fn send_batch(&mut self, what: &str, msgs: &[Msg]) -> Result<(), NetError> {
        if msgs.is_empty() {
            return Ok(());
        }
        let (bytes, mut waiting) = batch(self.seq, msgs);
        self.seq = self.seq.wrapping_add(msgs.len() as u32 + 2);
        self.sock
            .send(&bytes, 0)
            .map_err(|e| NetError::io(what, e))?;
        let mut first_err: Option<i32> = None;
        let mut buf = vec![0u8; 64 * 1024];
        while !waiting.is_empty() {
            let n = self.recv(what, &mut buf)?;
            for (kind, _, seq, body) in messages(&buf[..n]) {
                if kind != NLMSG_ERROR || body.len() < 4 {
                    continue;
                }
                waiting.retain(|s| *s != seq);
                let code = i32::from_ne_bytes(body[0..4].try_into().expect("4 bytes"));
                if code != 0 && first_err.is_none() {
                    first_err = Some(-code);
                }
            }
        }
        match first_err {
            None => Ok(()),
            Some(errno) => Err(NetError::op(
                what,
                std::io::Error::from_raw_os_error(errno).to_string(),
            )),
        }
    }

    fn recv(&self, what: &str, buf: &mut [u8]) -> Result<usize, NetError> {
        self.sock.recv(&mut &mut buf[..], 0).map_err(|e| {
            let timed_out = matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            );
            match timed_out {
                true => NetError::op(what, "the kernel did not answer within 5 s"),
                false => NetError::io(what, e),
            }
        })
    }

    /// Create `table` and its base chains if missing, then append `rules`:
    /// one batch, all or nothing.
    pub fn add_rules(&mut self, table: &str, rules: &[Rule]) -> Result<(), NetError> {
        let mut msgs = table_msgs(table);
        for r in rules {
            msgs.push(rule_msg(table, r)?);
        }
        self.send_batch("adding nftables rules", &msgs)
    }

    /// Delete rules by (chain, handle): one batch.
    pub fn delete(&mut self, table: &str, rules: &[Listed]) -> Result<(), NetError> {
        let msgs: Vec<Msg> = rules
            .iter()
            .map(|r| Msg {
                kind: NFT_MSG_DELRULE,
                flags: 0,
                attrs: Attrs::with(|a| {
                    a.str(NFTA_RULE_TABLE, table)
                        .str(NFTA_RULE_CHAIN, &r.chain)
                        .bytes(NFTA_RULE_HANDLE, &r.handle.to_be_bytes());
                }),
            })
            .collect();
        self.send_batch("deleting nftables rules", &msgs)
    }

    /// Every rule of `table` (none when it does not exist). A dump the
    /// ruleset changed under is taken again (a few times, then an error):
    /// a rule missing from it would be a rule a teardown leaves behind.
    pub fn list(&mut self, table: &str) -> Result<Vec<Listed>, NetError> {
        for _ in 0..DUMP_TRIES {
            if let Some(rules) = self.list_once(table)? {
                return Ok(rules);
            }
        }
        Err(NetError::op(
            "listing nftables rules",
            format!("the ruleset kept changing during {DUMP_TRIES} dumps in a row"),
        ))
    }

    /// One dump of `table`'s rules; `None` when it was interrupted.
    fn list_once(&mut self, table: &str) -> Result<Option<Vec<Listed>>, NetError> {
        let what = "listing nftables rules";
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let mut req = Vec::new();
        let attrs = Attrs::with(|a| {
            a.str(NFTA_RULE_TABLE, table);
        });
        nlmsg(
            &mut req,
            (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETRULE,
            NLM_F_REQUEST | NLM_F_DUMP,
            seq,
            NFPROTO_IPV4,
            0,
            &attrs.0,
        );
        self.sock.send(&req, 0).map_err(|e| NetError::io(what, e))?;
        let mut out = Vec::new();
        let mut interrupted = false;
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = self.recv(what, &mut buf)?;
            for (kind, flags, s, body) in messages(&buf[..n]) {
                if s != seq {
                    continue;
                }
                interrupted |= flags & NLM_F_DUMP_INTR != 0;
                let done = |out| if interrupted { None } else { Some(out) };
                match kind {
                    NLMSG_DONE => return Ok(done(out)),
                    NLMSG_ERROR => {
                        let code = body
                            .get(0..4)
                            .map(|b| i32::from_ne_bytes(b.try_into().expect("4 bytes")))
                            .unwrap_or(0);
                        return match code {
                            0 => Ok(done(out)),
                            c if -c == libc::ENOENT => Ok(Some(Vec::new())),
                            c => Err(NetError::op(
                                what,
                                std::io::Error::from_raw_os_error(-c).to_string(),
                            )),
                        };
                    }
                    k if k == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWRULE => {
                        if let Some(r) = parse_rule(body) {
                            out.push(r);
                        }
                        if flags & NLM_F_MULTI == 0 {
                            return Ok(done(out));
                        }
                    }
                    _ => {}
                }
            }
        }
    }
}

impl std::fmt::Debug for Nft {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nft").field("seq", &self.seq).finish()
    }
}

fn set_rcv_timeout(sock: &Socket, d: Duration) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let tv = libc::timeval {
        tv_sec: d.as_secs() as libc::time_t,
        tv_usec: d.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: a valid socket fd and a timeval of the size given.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    match r {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(matches: Vec<Match>, verdict: Verdict) -> Rule {
        Rule {
            chain: Chain::Forward,
            matches,
            verdict,
            comment: "dough-x".into(),
        }
    }

    /// Expression names of an encoded rule, in order (our own decoder, so
    /// the nesting is checked too).
    fn names(r: &Rule) -> Vec<String> {
        let e = rule_exprs(r);
        attrs(&e.0)
            .map(|(k, elem)| {
                assert_eq!(k, NFTA_LIST_ELEM);
                let (k, name) = attrs(elem).next().unwrap();
                assert_eq!(k, NFTA_EXPR_NAME);
                c_str(name)
            })
            .collect()
    }

    #[test]
    fn rules_encode_as_nft_does() {
        // Sequences recorded from `nft --debug=netlink add rule ...` (1.0.6).
        let net = |s: &str| s.parse::<Ipv4Net>().unwrap();
        let cases = [
            (
                rule(
                    vec![Match::Iif("tap0".into()), Match::L4(L4::Tcp)],
                    Verdict::Redirect(4000),
                ),
                vec!["meta", "cmp", "meta", "cmp", "immediate", "redir"],
            ),
            (
                rule(vec![Match::Dport(L4::Udp, 53)], Verdict::Accept),
                vec!["meta", "cmp", "payload", "cmp", "immediate"],
            ),
            (
                rule(
                    vec![
                        Match::Saddr(net("10.0.0.0/30")),
                        Match::Daddr(net("1.2.3.4/32")),
                    ],
                    Verdict::Drop,
                ),
                vec!["payload", "bitwise", "cmp", "payload", "cmp", "immediate"],
            ),
            (
                rule(
                    vec![Match::Saddr(net("10.0.0.0/8")), Match::Established],
                    Verdict::Masquerade,
                ),
                vec!["payload", "cmp", "ct", "bitwise", "cmp", "masq"],
            ),
        ];
        for (r, want) in cases {
            assert_eq!(names(&r), want, "{}", r.to_nft());
        }
    }

    #[test]
    fn attributes_are_padded_and_nested() {
        let a = Attrs::with(|a| {
            a.str(1, "abc").be32(2, 7);
        });
        // "abc\0" + header = 8; u32 + header = 8
        assert_eq!(a.0.len(), 16);
        let got: Vec<(u16, Vec<u8>)> = attrs(&a.0).map(|(k, v)| (k, v.to_vec())).collect();
        assert_eq!(got, vec![(1, b"abc\0".to_vec()), (2, vec![0, 0, 0, 7])]);
        let odd = Attrs::with(|a| {
            a.bytes(3, &[1]);
        });
        assert_eq!(odd.0.len(), 8, "a 1-byte value is padded to 4");
    }

    #[test]
    fn comments_are_bounded() {
        assert_eq!(comment_udata("t").unwrap(), vec![0, 2, b't', 0]);
        assert!(comment_udata("").is_none());
        assert!(comment_udata(&"x".repeat(128)).is_none());
        assert!(comment_udata("a\0b").is_none());
        let parsed = parse_rule(
            &[
                &[2u8, 0, 0, 0][..],
                &Attrs::with(|a| {
                    a.str(NFTA_RULE_CHAIN, "forward")
                        .bytes(NFTA_RULE_HANDLE, &9u64.to_be_bytes())
                        .bytes(NFTA_RULE_USERDATA, &comment_udata("dough-y").unwrap());
                })
                .0,
            ]
            .concat(),
        )
        .unwrap();
        assert_eq!(
            parsed,
            Listed {
                chain: "forward".into(),
                handle: 9,
                comment: "dough-y".into()
            }
        );
    }

    proptest::proptest! {
        /// Whatever bytes come back, parsing never panics.
        #[test]
        fn parsing_arbitrary_replies_never_panics(buf in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            for (_, _, _, body) in messages(&buf) {
                let _ = parse_rule(body);
            }
            let _ = parse_rule(&buf);
        }
    }
}
