//! `dough bench gateway`: what a clone's egress gateway adds to an HTTPS
//! request and to a download, side by side in one run, on the production
//! path: a stand-in guest (a netns whose `eth0` is the other end of the
//! clone netns's `tap0`, so its packets arrive where a guest's do), the
//! clone netns with dough's own rules, a real `dough gateway` process, and a
//! stand-in upstream (a namespace behind a host veth serving HTTPS under a
//! benchmark CA). Modes: `direct` (the host straight to the upstream),
//! `nat` (a stand-in guest whose TCP is forwarded and masqueraded through
//! a clone netns and the host, as `nat` clones were before the gateway: the
//! issue's baseline), `passthrough` (a name rule: SNI checked, resolved on
//! the host, bytes spliced), `brokered` (TLS terminated with dough's CA, a
//! header swapped, re-encrypted upstream). Each request is a new TCP+TLS
//! connection. Needs root.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use dough_gateway::broker::Broker;
use dough_gateway::tls::{CaPem, LeafIssuer};
use dough_net::linux::{in_netns, LinuxNet};
use dough_net::testing::World;
use dough_net::{NetError, NetOps, NetPlan};
use rustls::pki_types::pem::PemObject;
use serde_json::json;

#[derive(Debug, Args)]
pub struct GatewayArgs {
    /// HTTPS requests per mode (each on a new connection).
    #[arg(long, default_value_t = 200)]
    pub requests: usize,
    /// Size of the download per mode, in MiB.
    #[arg(long, default_value_t = 100)]
    pub megabytes: usize,
    /// Downloads per mode: the modes take turns, in a different order each
    /// round, and each mode's median counts (one download each was seen to
    /// move by ±20 % from run to run on this 2-core host).
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
}

const PASS_NAME: &str = "pass.bench";
const BROKER_NAME: &str = "broker.bench";
const PLACEHOLDER: &str = "sk-bench-dough-placeholder";
const REAL_VALUE: &str = "sk-bench-the-real-value";

/// The stand-in guest and clone namespaces, removed on drop.
struct Netns(Vec<String>);

/// The forwarding clone network of the `nat` mode (its netns, host veth
/// and tagged host rules), removed on drop.
struct NatNet(NetPlan);

impl Drop for NatNet {
    fn drop(&mut self) {
        let _ = dough_net::teardown(&mut LinuxNet::default(), &self.0);
    }
}

/// A stand-in guest namespace `guest_ns` whose `eth0` is the other end of
/// `clone_ns`'s `tap0`, addressed as a clone's guest and TAP are, with its
/// default route through the TAP. `veth` names the pair's end while it is
/// made (before it moves into `clone_ns` as `tap0`).
fn stand_in_guest(guest_ns: &str, clone_ns: &str, veth: &str) -> anyhow::Result<()> {
    ip(&[
        "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", guest_ns,
    ])?;
    ip(&["link", "set", veth, "netns", clone_ns])?;
    ip(&["-n", clone_ns, "link", "set", veth, "name", "tap0"])?;
    ip(&[
        "-n",
        clone_ns,
        "addr",
        "add",
        "172.16.0.1/30",
        "dev",
        "tap0",
    ])?;
    ip(&[
        "-n",
        guest_ns,
        "addr",
        "add",
        "172.16.0.2/30",
        "dev",
        "eth0",
    ])?;
    for (ns, dev) in [
        (clone_ns, "tap0"),
        (clone_ns, "lo"),
        (guest_ns, "eth0"),
        (guest_ns, "lo"),
    ] {
        ip(&["-n", ns, "link", "set", dev, "up"])?;
    }
    ip(&[
        "-n",
        guest_ns,
        "route",
        "add",
        "default",
        "via",
        "172.16.0.1",
    ])
}

impl Drop for Netns {
    fn drop(&mut self) {
        let mut n = LinuxNet::default();
        for ns in &self.0 {
            let _ = n.delete_netns(ns);
        }
    }
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    anyhow::ensure!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// An HTTPS server (HTTP/1.1 and HTTP/2 by ALPN) on `addr`:443 in
/// `netns`, with the certificate for the SNI asked (from `configs`):
/// `GET /small` → `ok`, `GET /big?N` → N bytes, `GET /key` → whether the
/// request carried `real` as its x-api-key, and its HTTP version.
fn serve(
    netns: &str,
    addr: Ipv4Addr,
    configs: Vec<(String, Arc<rustls::ServerConfig>)>,
    real: &'static str,
) -> anyhow::Result<()> {
    let l = in_netns(Some(netns), || {
        TcpListener::bind((addr, 443)).map_err(|e| NetError::io("bind", e))
    })?;
    l.set_nonblocking(true)?;
    let configs = Arc::new(configs);
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        rt.block_on(async move {
            let l = tokio::net::TcpListener::from_std(l).expect("listener");
            loop {
                let Ok((s, _)) = l.accept().await else {
                    continue;
                };
                let _ = s.set_nodelay(true);
                let configs = configs.clone();
                tokio::spawn(async move {
                    let acceptor = tokio_rustls::LazyConfigAcceptor::new(
                        rustls::server::Acceptor::default(),
                        s,
                    );
                    let Ok(start) = acceptor.await else { return };
                    let name = start.client_hello().server_name().unwrap_or("").to_string();
                    let Some((_, config)) = configs.iter().find(|(n, _)| *n == name) else {
                        return;
                    };
                    let Ok(tls) = start.into_stream(config.clone()).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(move |req| async move {
                        Ok::<_, std::convert::Infallible>(reply(&req, real))
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                    .await;
                });
            }
        });
    });
    Ok(())
}

type ReplyBody = http_body_util::combinators::UnsyncBoxBody<bytes::Bytes, std::convert::Infallible>;

/// 64 KiB of `x`, shared by every chunk of a big reply.
static CHUNK: [u8; 64 << 10] = [b'x'; 64 << 10];

fn reply(req: &hyper::Request<hyper::body::Incoming>, real: &str) -> hyper::Response<ReplyBody> {
    use http_body_util::BodyExt;
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let small = |b: Vec<u8>| http_body_util::Full::new(bytes::Bytes::from(b)).boxed_unsync();
    let body = if let Some(n) = path.strip_prefix("/big?") {
        // Streamed from one static buffer: the upstream's own cost is the
        // same small constant in every mode (a 100 MiB body built per
        // request cost more than the network path being measured).
        let n: usize = n.parse().unwrap_or(0);
        let chunks = (0..n.div_ceil(CHUNK.len())).map(move |i| {
            let len = (n - i * CHUNK.len()).min(CHUNK.len());
            Ok(hyper::body::Frame::data(bytes::Bytes::from_static(
                &CHUNK[..len],
            )))
        });
        let body = http_body_util::StreamBody::new(futures::stream::iter(chunks));
        let mut r = hyper::Response::new(body.boxed_unsync());
        r.headers_mut()
            .insert(hyper::header::CONTENT_LENGTH, n.into());
        return r;
    } else if path == "/key" {
        let ok = req.headers().get("x-api-key").is_some_and(|v| v == real);
        small(format!("{} {:?}", if ok { "real" } else { "other" }, req.version()).into_bytes())
    } else {
        small(b"ok".to_vec())
    };
    hyper::Response::new(body)
}

/// `n` requests for `/key` over one HTTP/2 connection (ALPN h2 only) to
/// `addr`:443 asking for `name`; the distinct answers.
fn h2_requests(
    client: &rustls::ClientConfig,
    addr: Ipv4Addr,
    name: &str,
    n: usize,
) -> anyhow::Result<Vec<String>> {
    use http_body_util::BodyExt;
    let mut config = client.clone();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let s = tokio::net::TcpStream::connect((addr, 443)).await?;
        let sn = rustls::pki_types::ServerName::try_from(name.to_string())?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(sn, s)
            .await?;
        anyhow::ensure!(
            tls.get_ref().1.alpn_protocol() == Some(b"h2"),
            "the gateway did not agree to HTTP/2"
        );
        let (mut send, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tls),
        )
        .await?;
        tokio::spawn(conn);
        let mut answers = std::collections::BTreeSet::new();
        for _ in 0..n {
            let req = hyper::Request::get(format!("https://{name}/key"))
                .header("x-api-key", PLACEHOLDER)
                .body(http_body_util::Empty::<bytes::Bytes>::new())?;
            let resp = send.send_request(req).await?;
            anyhow::ensure!(resp.status() == 200, "status {}", resp.status());
            let body = resp.into_body().collect().await?.to_bytes();
            answers.insert(String::from_utf8_lossy(&body).into_owned());
        }
        Ok(answers.into_iter().collect())
    })
}

/// One HTTPS GET on a new connection to `addr`:443 asking for `name`;
/// the body's length.
fn get(
    client: &Arc<rustls::ClientConfig>,
    addr: Ipv4Addr,
    name: &str,
    path: &str,
) -> anyhow::Result<usize> {
    let sn = rustls::pki_types::ServerName::try_from(name.to_string())?;
    let conn = rustls::ClientConnection::new(client.clone(), sn)?;
    let s = TcpStream::connect((addr, 443))?;
    s.set_nodelay(true)?;
    let mut tls = rustls::StreamOwned::new(conn, s);
    write!(
        tls,
        "GET {path} HTTP/1.1\r\nHost: {name}\r\nx-api-key: {PLACEHOLDER}\r\nConnection: close\r\n\r\n"
    )?;
    tls.flush()?;
    // The body is counted, not kept: the client's own cost stays the same
    // small constant in every mode.
    let mut head = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    let mut body = None::<usize>;
    loop {
        let n = match tls.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            // Some servers close without close_notify; the length still counts.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e.into()),
        };
        match &mut body {
            Some(len) => *len += n,
            None => {
                head.extend_from_slice(&buf[..n]);
                if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                    body = Some(head.len() - end - 4);
                    head = Vec::new();
                } else {
                    anyhow::ensure!(head.len() <= 64 << 10, "a response head over 64 KiB");
                }
            }
        }
    }
    body.context("no response head")
}

/// CPU time of all of `pid`'s threads so far, in ns (the scheduler's
/// count, /proc/PID/schedstat; clock ticks are too coarse for one download).
fn cpu_ns(pid: i32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

pub fn gateway(a: GatewayArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        (1..=100_000).contains(&a.requests),
        "--requests must be 1 to 100000"
    );
    anyhow::ensure!(
        (1..=4096).contains(&a.megabytes),
        "--megabytes must be 1 to 4096"
    );
    anyhow::ensure!((1..=100).contains(&a.rounds), "--rounds must be 1 to 100");
    let tag = format!("{}", std::process::id() % 100_000);
    let world = World::new(&format!("bw{tag}"), "10.191.0.0/30".parse()?)?;
    // The upstream's CA (the gateway is told to trust it) and dough's.
    let upstream_ca = CaPem::generate()?;
    let upstream_leaves = LeafIssuer::new(&upstream_ca)?;
    let dough_ca = CaPem::generate()?;
    let mut configs = Vec::new();
    for n in [PASS_NAME, BROKER_NAME] {
        configs.push((n.to_string(), upstream_leaves.server_config(n)?));
    }
    serve(&world.ns, world.addr, configs, REAL_VALUE)?;
    let dir = tempfile::tempdir()?;
    let roots = dir.path().join("upstream-ca.pem");
    std::fs::write(&roots, &upstream_ca.cert)?;

    // The clone's netns, with dough's own rules, and a stand-in guest.
    let egress: dough_net::Egress = format!("allow={PASS_NAME},{BROKER_NAME}").parse()?;
    let plan = NetPlan::new(
        "bg",
        &format!("bench-{tag}"),
        egress.clone(),
        dough_net::plan::DEFAULT_POOL.parse()?,
        0,
        &Default::default(),
    )?;
    let guest_ns = format!("bgg{tag}");
    let mut n = LinuxNet::default();
    n.create_netns(&plan.netns)?;
    let _cleanup = Netns(vec![plan.netns.clone(), guest_ns.clone()]);
    n.create_netns(&guest_ns)?;
    stand_in_guest(&guest_ns, &plan.netns, &format!("bgv{tag}"))?;
    n.add_rules(Some(&plan.netns), &plan.ns_rules())?;

    // The `nat` baseline: another stand-in guest behind a clone netns that
    // forwards its TCP (no gateway) through the netns's veth to the host,
    // masqueraded there and again on the host by the host rules a `nat`
    // clone gets — the path clones took before the gateway.
    let pool: dough_net::Ipv4Net = dough_net::plan::DEFAULT_POOL.parse()?;
    let nat_plan = NetPlan::new(
        "bn",
        &format!("bench-nat-{tag}"),
        dough_net::Egress::Nat,
        pool,
        0,
        &dough_net::in_use_on_host(&mut n)?,
    )?;
    let nat_guest = format!("bgn{tag}");
    n.create_netns(&nat_plan.netns)?;
    let _nat_cleanup = NatNet(nat_plan.clone());
    let _nat_guest_cleanup = Netns(vec![nat_guest.clone()]);
    n.create_netns(&nat_guest)?;
    stand_in_guest(&nat_guest, &nat_plan.netns, &format!("bnv{tag}"))?;
    {
        let ns = Some(nat_plan.netns.as_str());
        let t = nat_plan
            .transfer
            .as_ref()
            .context("a nat plan has a veth")?;
        n.create_veth(&t.host_veth, &nat_plan.netns, dough_net::plan::NS_VETH)?;
        n.add_addr(None, &t.host_veth, t.host_addr, 30)?;
        n.link_up(None, &t.host_veth)?;
        n.add_addr(ns, dough_net::plan::NS_VETH, t.ns_addr, 30)?;
        n.link_up(ns, dough_net::plan::NS_VETH)?;
        n.add_default_route(&nat_plan.netns, t.host_addr)?;
        n.add_rules(
            ns,
            &[dough_net::plan::Rule {
                chain: dough_net::plan::Chain::Postrouting,
                matches: vec![
                    dough_net::plan::Match::Saddr("172.16.0.0/30".parse()?),
                    dough_net::plan::Match::Oif(dough_net::plan::NS_VETH.into()),
                ],
                verdict: dough_net::plan::Verdict::Masquerade,
                comment: nat_plan.tag.clone(),
            }],
        )?;
        n.add_rules(None, &nat_plan.host_rules(pool))?;
        n.enable_forwarding(ns)?;
        n.enable_forwarding(None)?;
    }

    // A real gateway process, started the way a clone's is.
    let config = dough_gateway::Config {
        vm: "bench".into(),
        egress,
        deny: vec![dough_net::plan::DEFAULT_POOL.parse()?],
        log: dir.path().join("net.log"),
        hosts: [PASS_NAME, BROKER_NAME]
            .iter()
            .map(|h| (h.to_string(), vec![world.addr]))
            .collect(),
        vmm: Some((
            std::process::id() as i32,
            dough_vmm::ProcessId::of(std::process::id() as i32)
                .map(|p| p.start_ticks)
                .unwrap_or(0),
        )),
        brokers: vec![Broker {
            name: "BENCH_KEY".into(),
            placeholder: PLACEHOLDER.into(),
            value: REAL_VALUE.into(),
            hosts: vec![BROKER_NAME.parse()?],
            header: "x-api-key".parse()?,
        }],
        ca: Some(dough_ca.clone()),
        upstream_roots: vec![roots],
    };
    let net = crate::vm_args::host_net();
    let mut gw = net.start_gateway(&dough_fabric::host::GatewayStart {
        netns: &plan.netns,
        vm_dir: dir.path(),
        config: &config.to_json(),
    })?;
    let gw_pid = gw.id() as i32;
    std::thread::sleep(std::time::Duration::from_millis(300));
    let idle_pss = dough_vmm::process::pss_kib(gw_pid);
    let idle_rss = dough_vmm::process::peak_rss_kib(gw_pid);

    // Clients: the baseline trusts the upstream CA; through the gateway,
    // also dough's (the brokered leaf).
    let mut roots = rustls::RootCertStore::empty();
    for pem in [&upstream_ca.cert, &dough_ca.cert] {
        roots.add(rustls::pki_types::CertificateDer::from_pem_slice(
            pem.as_bytes(),
        )?)?;
    }
    let client = Arc::new(
        rustls::ClientConfig::builder_with_provider(dough_gateway::tls::provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    let modes: [(&str, Option<&str>, &str); 4] = [
        ("direct", None, PASS_NAME),
        ("nat", Some(nat_guest.as_str()), PASS_NAME),
        ("passthrough", Some(guest_ns.as_str()), PASS_NAME),
        ("brokered", Some(guest_ns.as_str()), BROKER_NAME),
    ];
    let big = a.megabytes << 20;
    let mut results = serde_json::Map::new();
    let mut p50 = std::collections::BTreeMap::new();
    let mut mbps = std::collections::BTreeMap::new();
    for &(mode, ns, name) in &modes {
        eprintln!("dough: bench gateway: {mode}: {} requests", a.requests);
        let client = client.clone();
        let addr = world.addr;
        let requests = a.requests;
        let mut lat = in_netns(ns, move || {
            let run = || -> anyhow::Result<Vec<f64>> {
                // Warm up (name resolution, leaf issuance, caches).
                for _ in 0..3 {
                    get(&client, addr, name, "/small")?;
                }
                let mut lat = Vec::new();
                for _ in 0..requests {
                    let t = Instant::now();
                    let n = get(&client, addr, name, "/small")?;
                    anyhow::ensure!(n == 2, "a short reply ({n} bytes)");
                    lat.push(t.elapsed().as_secs_f64() * 1e3);
                }
                Ok(lat)
            };
            run().map_err(|e| NetError::op("bench client", e))
        })?;
        let (m50, m90) = (percentile(&mut lat, 0.5), percentile(&mut lat, 0.9));
        p50.insert(mode, m50);
        results.insert(
            mode.into(),
            json!({"request_ms_p50": m50, "request_ms_p90": m90}),
        );
    }
    // Downloads: the modes take turns, round after round, each round
    // starting with the next mode, so drift on the host and the order of
    // modes weigh on all of them alike.
    let mut rates: std::collections::BTreeMap<&str, Vec<f64>> = Default::default();
    // What the gateway itself spent on each mode's downloads (its threads'
    // time on a CPU): the cost per MiB, whatever the rest of the host does.
    let mut gw_cpu: std::collections::BTreeMap<&str, f64> = Default::default();
    for round in 0..a.rounds {
        eprintln!(
            "dough: bench gateway: download round {}/{}: {} MiB per mode",
            round + 1,
            a.rounds,
            a.megabytes
        );
        for k in 0..modes.len() {
            let (mode, ns, name) = modes[(round + k) % modes.len()];
            let client = client.clone();
            let addr = world.addr;
            let cpu_before = cpu_ns(gw_pid);
            let secs = in_netns(ns, move || {
                let run = || -> anyhow::Result<f64> {
                    let t = Instant::now();
                    let n = get(&client, addr, name, &format!("/big?{big}"))?;
                    anyhow::ensure!(n == big, "the download was cut short ({n} of {big} bytes)");
                    Ok(t.elapsed().as_secs_f64())
                };
                run().map_err(|e| NetError::op("bench client", e))
            })?;
            rates
                .entry(mode)
                .or_default()
                .push(a.megabytes as f64 / secs);
            *gw_cpu.entry(mode).or_default() += (cpu_ns(gw_pid) - cpu_before) as f64 / 1e6;
        }
    }
    for (mode, mut v) in rates {
        let median = percentile(&mut v, 0.5);
        mbps.insert(mode, median);
        let r = results[mode].as_object_mut().expect("a mode's results");
        r.insert("download_mib_per_s".into(), json!(median));
        r.insert("download_mib_per_s_each".into(), json!(v));
        let per_mib = gw_cpu[mode] / (a.megabytes * a.rounds) as f64;
        r.insert("gateway_cpu_ms_per_mib".into(), json!(per_mib));
    }
    // HTTP/2 from the guest's side, brokered: the key must arrive (and the
    // upstream be spoken to over HTTP/2 too, since it offers it).
    let h2 = {
        let client = client.clone();
        let addr = world.addr;
        in_netns(Some(&guest_ns), move || {
            h2_requests(&client, addr, BROKER_NAME, 10).map_err(|e| NetError::op("h2 client", e))
        })?
    };
    let busy_pss = dough_vmm::process::pss_kib(gw_pid);
    let _ = gw.kill();
    let _ = gw.wait();
    // Against the `nat` path (what a clone had before the gateway: the
    // issue's baseline), and against the host itself.
    let added = |m: &str| p50[m] - p50["nat"];
    let share = |m: &str| mbps[m] / mbps["nat"];
    let share_host = |m: &str| mbps[m] / mbps["direct"];
    let out = json!({
        "bench": "gateway",
        "requests": a.requests,
        "megabytes": a.megabytes,
        "rounds": a.rounds,
        "modes": results,
        "added_ms_p50_vs_nat": {"passthrough": added("passthrough"), "brokered": added("brokered")},
        "added_ms_p50_vs_direct": {
            "passthrough": p50["passthrough"] - p50["direct"],
            "brokered": p50["brokered"] - p50["direct"],
        },
        "throughput_vs_nat": {"passthrough": share("passthrough"), "brokered": share("brokered")},
        "throughput_vs_direct": {
            "nat": share_host("nat"),
            "passthrough": share_host("passthrough"),
            "brokered": share_host("brokered"),
        },
        // One gateway alone: its program's pages are shared with no other
        // process here. What a gateway costs per clone when many run is
        // `dough bench density`'s `gateway_pss_kib_per_clone`.
        "lone_gateway_kib": {"idle_pss": idle_pss, "idle_peak_rss": idle_rss, "after_pss": busy_pss},
        "h2_brokered_answers": h2,
        // Judged against `nat`, the path the gateway replaced.
        "targets": {
            "passthrough_added_p50_le_1ms": added("passthrough") <= 1.0,
            "brokered_added_p50_le_3ms": added("brokered") <= 3.0,
            "throughput_ge_80pct": share("passthrough") >= 0.8 && share("brokered") >= 0.8,
        },
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(ExitCode::SUCCESS)
}
