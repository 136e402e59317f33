//! Every parser a guest feeds — DNS messages, TLS ClientHellos, HTTP/1
//! request heads — with generated input: never a panic, and real input
//! (a real TLS client's ClientHello, well-formed queries and requests)
//! gives the name it carries.

use std::sync::Arc;

use dough_gateway::dns::{Question, Unusable};
use dough_gateway::sniff::{sniff, Sniffed};
use hickory_proto::op::{Message, Query};
use hickory_proto::rr::{Name, RecordType};
use hickory_proto::serialize::binary::BinEncodable;
use proptest::prelude::*;

/// The first flight of a real rustls client asking for `name`.
fn client_hello(name: &str) -> Vec<u8> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let server = rustls::pki_types::ServerName::try_from(name.to_string()).unwrap();
    let mut c = rustls::ClientConnection::new(Arc::new(config), server).unwrap();
    let mut out = Vec::new();
    c.write_tls(&mut out).unwrap();
    out
}

fn name_strategy() -> impl Strategy<Value = String> {
    proptest::collection::vec("[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", 1..5)
        .prop_map(|labels| format!("{}.example", labels.join(".")))
}

#[test]
fn a_real_client_hello_names_its_server() {
    let hello = client_hello("api.example.com");
    assert_eq!(sniff(&hello), Sniffed::Tls("api.example.com".into()));
    // Every strict prefix asks for more; never a wrong answer.
    for n in 0..hello.len() {
        assert_eq!(sniff(&hello[..n]), Sniffed::More, "prefix {n}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn sniffing_arbitrary_bytes_never_panics(b in proptest::collection::vec(any::<u8>(), 0..3000)) {
        let _ = sniff(&b);
        let mut tls = vec![0x16, 0x03, 0x01];
        tls.extend(&b);
        let _ = sniff(&tls);
    }

    #[test]
    fn mutated_client_hellos_never_panic(name in name_strategy(), flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)) {
        let mut hello = client_hello(&name);
        for (i, v) in flips {
            let i = i.index(hello.len());
            hello[i] = v;
        }
        match sniff(&hello) {
            // A mutation may leave the name (or another valid one) intact.
            Sniffed::Tls(n) => prop_assert!(dough_net::plan::valid_host_name(&n)),
            Sniffed::Http(_) => prop_assert!(false, "a TLS record read as HTTP"),
            Sniffed::More | Sniffed::Refused(_) => {}
        }
    }

    #[test]
    fn client_hellos_give_their_name(name in name_strategy()) {
        prop_assert_eq!(sniff(&client_hello(&name)), Sniffed::Tls(name));
    }

    #[test]
    fn http_requests_give_their_host(name in name_strategy(), port in proptest::option::of(1u16..), path in "/[a-z0-9/]{0,30}", extra in proptest::collection::vec(("[A-Za-z-]{1,20}", "[ -~]{0,40}"), 0..10)) {
        let mut req = format!("GET {path} HTTP/1.1\r\n");
        for (k, v) in &extra {
            if !k.eq_ignore_ascii_case("host") {
                req += &format!("{k}: {}\r\n", v.trim());
            }
        }
        match port {
            Some(p) => req += &format!("Host: {}:{p}\r\n\r\n", name.to_uppercase()),
            None => req += &format!("Host: {name}\r\n\r\n"),
        }
        prop_assert_eq!(sniff(req.as_bytes()), Sniffed::Http(name));
        // Cut anywhere before the end: more is needed (or refused), never a name.
        let cut = req.len() / 2;
        prop_assert!(!matches!(sniff(&req.as_bytes()[..cut]), Sniffed::Http(_) | Sniffed::Tls(_)));
    }

    #[test]
    fn arbitrary_dns_messages_are_answered_or_dropped(b in proptest::collection::vec(any::<u8>(), 0..600)) {
        match Question::parse(&b) {
            Ok(q) => {
                for reply in [q.nxdomain(), q.servfail(), q.answer(&["192.0.2.1".parse().unwrap()])] {
                    let m = Message::from_vec(&reply).unwrap();
                    prop_assert_eq!(m.id(), u16::from_be_bytes([b[0], b[1]]));
                }
            }
            Err(Unusable::Reply(r)) => {
                let m = Message::from_vec(&r).unwrap();
                prop_assert_eq!(m.id(), u16::from_be_bytes([b[0], b[1]]));
            }
            Err(Unusable::Drop) => {}
        }
    }

    #[test]
    fn queries_for_any_name_are_understood(name in name_strategy(), id in any::<u16>(), upper in any::<bool>()) {
        let asked = if upper { name.to_uppercase() } else { name.clone() };
        let mut m = Message::new();
        m.set_id(id).add_query(Query::query(Name::from_ascii(&asked).unwrap(), RecordType::A));
        let q = Question::parse(&m.to_bytes().unwrap()).unwrap();
        prop_assert_eq!(&q.name, &name);
        let a = Message::from_vec(&q.nxdomain()).unwrap();
        prop_assert_eq!(a.id(), id);
        prop_assert_eq!(a.queries().len(), 1);
    }
}
