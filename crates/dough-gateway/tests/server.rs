//! The gateway's event loop on loopback sockets (no namespace, no root):
//! DNS answers by policy, a connection that was not redirected to it is
//! refused and logged, and the gateway stops when the VMM it serves is gone.

use std::net::{Ipv4Addr, UdpSocket};
use std::time::Duration;

use dough_gateway::server::{run, Sockets};
use dough_gateway::Config;
use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RecordType};
use hickory_proto::serialize::binary::BinEncodable;

fn query(name: &str) -> Vec<u8> {
    let mut m = Message::new();
    m.set_id(7)
        .add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
    m.to_bytes().unwrap()
}

#[test]
fn answers_by_policy_logs_and_stops_with_its_vmm() {
    let dir = tempfile::tempdir().unwrap();
    let lo = Ipv4Addr::LOCALHOST;
    let sockets = Sockets {
        tcp: std::net::TcpListener::bind((lo, 0)).unwrap(),
        dns_udp: UdpSocket::bind((lo, 0)).unwrap(),
        dns_tcp: std::net::TcpListener::bind((lo, 0)).unwrap(),
    };
    let dns = sockets.dns_udp.local_addr().unwrap();
    let tcp = sockets.tcp.local_addr().unwrap();
    let mut vmm = std::process::Command::new("sleep")
        .arg("600")
        .spawn()
        .unwrap();
    let pid = vmm.id() as i32;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let start: u64 = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .nth(19)
        .unwrap()
        .parse()
        .unwrap();
    let config = Config {
        vm: "vm-test".into(),
        egress: "allow=allowed.test".parse().unwrap(),
        deny: vec![],
        log: dir.path().join("net.log"),
        hosts: [(
            "allowed.test".to_string(),
            vec!["192.0.2.7".parse().unwrap()],
        )]
        .into_iter()
        .collect(),
        vmm: Some((pid, start)),
        brokers: vec![],
        ca: None,
        upstream_roots: vec![],
    };
    let server = std::thread::spawn(move || run(config, sockets));

    let c = UdpSocket::bind((lo, 0)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 1500];
    c.send_to(&query("allowed.test."), dns).unwrap();
    let n = c.recv(&mut buf).unwrap();
    let m = Message::from_vec(&buf[..n]).unwrap();
    assert_eq!(m.response_code(), ResponseCode::NoError);
    assert_eq!(m.answers().len(), 1);
    assert_eq!(m.answers()[0].data().to_string(), "192.0.2.7");
    c.send_to(&query("other.test."), dns).unwrap();
    let n = c.recv(&mut buf).unwrap();
    assert_eq!(
        Message::from_vec(&buf[..n]).unwrap().response_code(),
        ResponseCode::NXDomain
    );

    // Not redirected: no original destination, so nothing to decide on.
    let mut s = std::net::TcpStream::connect(tcp).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut b = [0u8; 8];
    let got = std::io::Read::read(&mut s, &mut b);
    assert!(matches!(got, Ok(0) | Err(_)), "{got:?}");

    vmm.kill().unwrap();
    vmm.wait().unwrap();
    let r = server.join().unwrap();
    r.unwrap();
    let events = dough_gateway::audit::read(&dir.path().join("net.log")).unwrap();
    let verdicts: Vec<(String, String)> = events
        .iter()
        .map(|e| {
            (
                e.name.clone().unwrap_or_default(),
                format!("{:?}", e.verdict),
            )
        })
        .collect();
    assert!(
        verdicts.contains(&("allowed.test".into(), "Allow".into())),
        "{verdicts:?}"
    );
    assert!(
        verdicts.contains(&("other.test".into(), "Deny".into())),
        "{verdicts:?}"
    );
    assert!(
        events
            .iter()
            .any(|e| e.reason.starts_with("no original destination")),
        "{events:?}"
    );
}
