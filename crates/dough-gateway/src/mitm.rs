//! Brokered connections. For a host some secret of the clone's names, the
//! gateway terminates the guest's TLS with a leaf certificate from dough's
//! CA (the clone trusts it; the key never leaves the host), puts the real
//! value in place of the placeholder in each request's header, and
//! forwards the request over a verified TLS connection to the host it
//! resolved itself. HTTP/1.1 (keep-alive) and HTTP/2 (ALPN) both ways;
//! bodies stream frame by frame, so server-sent events arrive as they are
//! sent; anything coming back has the real value replaced by the
//! placeholder again.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::{SocketAddr, SocketAddrV4};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::Frame;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::audit::{Event, Kind, Verdict};
use crate::broker::{self, Broker, Scrubber};
use crate::server::{Ctx, Resolver, CONNECT_DEADLINE, SNIFF_DEADLINE};
use crate::tls::{LeafIssuer, TlsError};

type Connector = hyper_rustls::HttpsConnector<HttpConnector<HostResolver>>;
type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What brokered connections need: the clone's secrets, dough's CA, and
/// an upstream client that resolves on the host and verifies TLS.
pub struct Brokering {
    pub brokers: Vec<Broker>,
    leaves: LeafIssuer,
    /// For guests that speak HTTP/2: HTTP/2 upstream where offered (one
    /// pooled connection).
    client: hyper_util::client::legacy::Client<Connector, Incoming>,
    /// For guests that speak HTTP/1.1: HTTP/1.1 upstream too (a download
    /// through HTTP/2 framing and flow control ran at ~60 % of one through
    /// HTTP/1.1 here: `dough bench gateway`).
    client_h1: hyper_util::client::legacy::Client<Connector, Incoming>,
}

impl std::fmt::Debug for Brokering {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Brokering({:?})", self.brokers)
    }
}

impl Brokering {
    pub fn new(
        brokers: Vec<Broker>,
        ca: &crate::tls::CaPem,
        upstream: rustls::ClientConfig,
        resolver: Arc<Resolver>,
    ) -> Result<Brokering, TlsError> {
        let mut http = HttpConnector::new_with_resolver(HostResolver(resolver));
        http.enforce_http(false);
        http.set_connect_timeout(Some(CONNECT_DEADLINE));
        http.set_nodelay(true);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(upstream.clone())
            .https_only()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http.clone());
        let https_h1 = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(upstream)
            .https_only()
            .enable_http1()
            .wrap_connector(http);
        // HTTP/2's default 64 KiB windows would cap a download at a window
        // per round trip: large fixed windows (faster here than adaptive
        // ones; what an upstream may send ahead is bounded by them).
        let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .http2_initial_stream_window_size(16 << 20)
            .http2_initial_connection_window_size(32 << 20)
            .http2_max_frame_size(256 << 10)
            .build(https);
        // Reads of 64 KiB (hyper's adaptive default starts at 8 KiB): fewer,
        // larger chunks through the scrubber and the guest's TLS; at most
        // 16 MiB for a gateway's 256 connections.
        let client_h1 = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .http1_read_buf_exact_size(64 << 10)
            .build(https_h1);
        Ok(Brokering {
            brokers,
            leaves: LeafIssuer::new(ca)?,
            client,
            client_h1,
        })
    }

    /// Whether a connection to `name` is brokered.
    pub fn serves(&self, name: &str) -> bool {
        self.brokers.iter().any(|b| b.serves(name))
    }
}

/// Host-side resolution (the gateway's table, the host's resolver, less
/// forbidden addresses) for the upstream client.
#[derive(Debug, Clone)]
pub struct HostResolver(Arc<Resolver>);

impl tower_service::Service<Name> for HostResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let r = self.0.clone();
        Box::pin(async move {
            let addrs = r.resolve(name.as_str()).await?;
            if addrs.is_empty() {
                return Err(io::Error::other("no reachable IPv4 address"));
            }
            Ok(addrs
                .into_iter()
                .map(|ip| SocketAddr::from((ip, 0)))
                .collect::<Vec<_>>()
                .into_iter())
        })
    }
}

/// Serve one brokered connection (its ClientHello already read into
/// `first`) to its end; `ev` is the connection's audit event.
pub(crate) async fn serve(
    ctx: Arc<Ctx>,
    guest: TcpStream,
    first: Vec<u8>,
    name: String,
    dialed: SocketAddrV4,
    mut ev: Event,
) -> Event {
    let Some(b) = ctx.brokering.as_ref() else {
        ev.reason = "brokering is not configured".into();
        return ev;
    };
    let config = match b.leaves.server_config(&name) {
        Ok(c) => c,
        Err(e) => {
            ev.verdict = Verdict::Fail;
            ev.reason = format!("issuing a certificate: {e}");
            return ev;
        }
    };
    let io = Prefixed {
        first,
        pos: 0,
        inner: guest,
    };
    let acceptor = tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), io);
    let tls = async {
        let start = acceptor.await?;
        start.into_stream(config).await
    };
    let tls = match tokio::time::timeout(SNIFF_DEADLINE, tls).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            ev.reason = format!("TLS with the guest failed (does it trust dough's CA?): {e}");
            return ev;
        }
        Err(_) => {
            ev.reason = "TLS handshake with the guest timed out".into();
            return ev;
        }
    };
    let port = dialed.port();
    let svc_ctx = ctx.clone();
    let svc_name = name.clone();
    let svc = hyper::service::service_fn(move |req| {
        let (ctx, name) = (svc_ctx.clone(), svc_name.clone());
        async move { Ok::<_, Infallible>(forward(ctx, &name, port, req).await) }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder.http2().adaptive_window(true);
    let served = builder.serve_connection(TokioIo::new(tls), svc).await;
    ev.verdict = Verdict::Allow;
    ev.reason = match served {
        Ok(()) => "brokered".into(),
        Err(e) => format!("brokered; ended: {e}"),
    };
    ev
}

/// Headers that belong to one hop, not to the request.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "proxy-connection",
    "keep-alive",
    "te",
    "transfer-encoding",
    "upgrade",
    "host",
    "proxy-authorization",
];

async fn forward(
    ctx: Arc<Ctx>,
    name: &str,
    port: u16,
    mut req: http::Request<Incoming>,
) -> http::Response<Body> {
    let mut ev = ctx.event(Kind::Tcp, Verdict::Fail, "");
    let Some(b) = ctx.brokering.as_ref() else {
        ev.reason = "brokering is not configured".into();
        ctx.audit.log(&ev);
        return text_reply(502, "dough gateway: no brokering here\n");
    };
    ev.name = Some(name.to_string());
    ev.what = Some("request".into());
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    ev.method = Some(req.method().to_string());
    ev.path = Some(crate::audit::clip(&path));
    let authority = if port == 443 {
        name.to_string()
    } else {
        format!("{name}:{port}")
    };
    let uri = match format!("https://{authority}{path}").parse::<http::Uri>() {
        Ok(u) => u,
        Err(_) => {
            ev.reason = "a request path that is not a URI".into();
            ctx.audit.log(&ev);
            return text_reply(400, "dough gateway: bad request path\n");
        }
    };
    *req.uri_mut() = uri;
    // Upstream the guest's protocol (HTTP/2 only where the upstream offers
    // it); the client negotiates from an HTTP/1.1 request.
    let client = match req.version() {
        http::Version::HTTP_2 => &b.client,
        _ => &b.client_h1,
    };
    *req.version_mut() = http::Version::HTTP_11;
    for h in HOP_BY_HOP {
        req.headers_mut().remove(h);
    }
    let used = broker::inject(&b.brokers, name, req.headers_mut());
    if !used.is_empty() {
        ev.secrets = Some(used);
    }
    match client.request(req).await {
        Ok(resp) => {
            ev.verdict = Verdict::Allow;
            ev.reason = "brokered".into();
            ev.status = Some(resp.status().as_u16());
            ctx.audit.log(&ev);
            let (mut parts, body) = resp.into_parts();
            scrub_headers(&b.brokers, &mut parts.headers);
            let body = ScrubBody {
                inner: body,
                scrub: Scrubber::new(&b.brokers),
                done: false,
            };
            http::Response::from_parts(parts, body.map_err(BoxError::from).boxed_unsync())
        }
        Err(e) => {
            ev.reason = format!("upstream: {e}");
            ctx.audit.log(&ev);
            text_reply(502, "dough gateway: the upstream could not be reached\n")
        }
    }
}

fn text_reply(status: u16, text: &'static str) -> http::Response<Body> {
    let body = http_body_util::Full::new(Bytes::from_static(text.as_bytes()))
        .map_err(|never| match never {})
        .boxed_unsync();
    let mut r = http::Response::new(body);
    *r.status_mut() = http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::BAD_GATEWAY);
    r
}

/// The real values out of response headers.
fn scrub_headers(brokers: &[Broker], headers: &mut http::HeaderMap) {
    for v in headers.values_mut() {
        let Ok(s) = v.to_str() else { continue };
        let mut s2 = s.to_string();
        for b in brokers {
            if !b.value.is_empty() {
                s2 = s2.replace(&b.value, &b.placeholder);
            }
        }
        if s2 != s {
            if let Ok(nv) = http::HeaderValue::from_str(&s2) {
                *v = nv;
            }
        }
    }
}

/// A response body with the real values replaced, frame by frame.
struct ScrubBody {
    inner: Incoming,
    scrub: Scrubber,
    done: bool,
}

impl http_body::Body for ScrubBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(d) => {
                        let out = this.scrub.push_bytes(d);
                        if !out.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::data(out))));
                        }
                    }
                    Err(trailers) => return Poll::Ready(Some(Ok(trailers))),
                },
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => {
                    this.done = true;
                    let rest = this.scrub.finish();
                    if !rest.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(Bytes::from(rest)))));
                    }
                }
            }
        }
    }
}

/// The guest's connection with the bytes already read from it put back
/// in front.
struct Prefixed {
    first: Vec<u8>,
    pos: usize,
    inner: TcpStream,
}

impl AsyncRead for Prefixed {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pos < this.first.len() {
            let n = (this.first.len() - this.pos).min(buf.remaining());
            buf.put_slice(&this.first[this.pos..this.pos + n]);
            this.pos += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
