//! dough's DNS: what a clone's resolver is told. Messages are parsed and
//! written by hickory-proto; the decision and the host-side resolution are
//! the gateway's. A name the policy allows is resolved on the host and
//! answered (A records; other types get an empty answer: clones have IPv4
//! only); every other name gets NXDOMAIN.

use std::net::Ipv4Addr;

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record, RecordType};

/// Largest DNS message accepted from a guest (UDP datagram or TCP frame).
pub const MSG_MAX: usize = 4096;
/// Most addresses put in one answer.
pub const ANSWER_MAX: usize = 8;
/// TTL of answers, in seconds: short, so a clone asks again (and is
/// logged again) rather than caching for long.
pub const TTL: u32 = 30;

/// One question from a guest, as far as the gateway cares.
#[derive(Debug, Clone)]
pub struct Question {
    msg: Message,
    /// Lower case, no trailing dot.
    pub name: String,
    pub qtype: RecordType,
}

/// Why a message gets no answer of substance.
#[derive(Debug, PartialEq, Eq)]
pub enum Unusable {
    /// Not even a header to answer: dropped.
    Drop,
    /// Answered with this error message (FORMERR, NOTIMP…).
    Reply(Vec<u8>),
}

impl Question {
    /// The single standard query in `buf`.
    pub fn parse(buf: &[u8]) -> Result<Question, Unusable> {
        if buf.len() > MSG_MAX || buf.len() < 12 {
            return Err(Unusable::Drop);
        }
        let id = u16::from_be_bytes([buf[0], buf[1]]);
        let msg = match Message::from_vec(buf) {
            Ok(m) => m,
            Err(_) => {
                return Err(reply_error(id, OpCode::Query, ResponseCode::FormErr));
            }
        };
        if msg.message_type() != MessageType::Query {
            return Err(Unusable::Drop);
        }
        if msg.op_code() != OpCode::Query {
            return Err(reply_error(id, msg.op_code(), ResponseCode::NotImp));
        }
        let [q] = msg.queries() else {
            return Err(reply_error(id, OpCode::Query, ResponseCode::FormErr));
        };
        let name = q.name().to_ascii().to_ascii_lowercase();
        let name = name.strip_suffix('.').unwrap_or(&name).to_string();
        let qtype = q.query_type();
        Ok(Question { msg, name, qtype })
    }

    fn query(&self) -> Query {
        self.msg.queries()[0].clone()
    }

    fn reply(&self, code: ResponseCode) -> Message {
        let mut m = Message::new();
        m.set_id(self.msg.id())
            .set_message_type(MessageType::Response)
            .set_op_code(OpCode::Query)
            .set_recursion_desired(self.msg.recursion_desired())
            .set_recursion_available(true)
            .set_response_code(code)
            .add_query(self.query());
        m
    }

    /// NXDOMAIN: the name does not exist, as far as this clone knows.
    pub fn nxdomain(&self) -> Vec<u8> {
        encode(&self.reply(ResponseCode::NXDomain))
    }

    /// SERVFAIL: allowed, but the host could not resolve it.
    pub fn servfail(&self) -> Vec<u8> {
        encode(&self.reply(ResponseCode::ServFail))
    }

    /// The answer: `addrs` for an A question (at most [`ANSWER_MAX`]),
    /// nothing (NOERROR) for any other type.
    pub fn answer(&self, addrs: &[Ipv4Addr]) -> Vec<u8> {
        let mut m = self.reply(ResponseCode::NoError);
        if self.qtype == RecordType::A {
            let owner = self.query().name().clone();
            for a in addrs.iter().take(ANSWER_MAX) {
                m.add_answer(Record::from_rdata(owner.clone(), TTL, RData::A(A(*a))));
            }
        }
        encode(&m)
    }
}

fn reply_error(id: u16, op: OpCode, code: ResponseCode) -> Unusable {
    let mut m = Message::error_msg(id, op, code);
    m.set_recursion_available(true);
    Unusable::Reply(encode(&m))
}

fn encode(m: &Message) -> Vec<u8> {
    use hickory_proto::serialize::binary::BinEncodable;
    // A message built here from a parsed query always encodes; an empty
    // reply (dropped by the caller) is the fallback, never a panic.
    m.to_bytes().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::rr::Name;
    use hickory_proto::serialize::binary::BinEncodable;

    pub(crate) fn query(name: &str, t: RecordType) -> Vec<u8> {
        let mut m = Message::new();
        m.set_id(0x1234)
            .set_recursion_desired(true)
            .add_query(Query::query(Name::from_ascii(name).unwrap(), t));
        m.to_bytes().unwrap()
    }

    #[test]
    fn answers_nxdomain_and_errors() {
        let q = Question::parse(&query("API.Example.com.", RecordType::A)).unwrap();
        assert_eq!(q.name, "api.example.com");
        let a = Message::from_vec(&q.answer(&["192.0.2.1".parse().unwrap(); 20])).unwrap();
        assert_eq!(a.id(), 0x1234);
        assert_eq!(a.response_code(), ResponseCode::NoError);
        assert_eq!(a.answers().len(), ANSWER_MAX);
        assert!(matches!(a.answers()[0].data(), RData::A(A(ip)) if ip.octets() == [192, 0, 2, 1]));
        let nx = Message::from_vec(&q.nxdomain()).unwrap();
        assert_eq!(nx.response_code(), ResponseCode::NXDomain);
        assert_eq!(nx.queries().len(), 1);
        let six = Question::parse(&query("a.example.com.", RecordType::AAAA)).unwrap();
        let none = Message::from_vec(&six.answer(&["192.0.2.1".parse().unwrap()])).unwrap();
        assert_eq!(none.response_code(), ResponseCode::NoError);
        assert!(none.answers().is_empty());
        assert_eq!(Question::parse(b"short").unwrap_err(), Unusable::Drop);
        let mut garbage = vec![0xab, 0xcd];
        garbage.extend([0xff; 30]);
        match Question::parse(&garbage) {
            Err(Unusable::Reply(r)) => {
                let m = Message::from_vec(&r).unwrap();
                assert_eq!(m.id(), 0xabcd);
                assert_eq!(m.response_code(), ResponseCode::FormErr);
            }
            other => panic!("{other:?}"),
        }
    }
}
