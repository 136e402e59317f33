//! A small blocking client for dough's HTTP API (`dough serve`), over its
//! Unix socket or TCP, and the API's types ([`types`]).
//!
//! ```no_run
//! let c = dough_client::Client::new("unix:///var/lib/dough/serve.sock", "TOKEN").unwrap();
//! let sb = c.create_sandbox(&Default::default()).unwrap();
//! let exit = c
//!     .exec(&sb.id, &dough_client::ExecBody { argv: vec!["uname".into(), "-a".into()], ..Default::default() },
//!           &mut |ev| if let dough_client::ExecEvent::Stdout(b) = ev { print!("{}", String::from_utf8_lossy(&b)) })
//!     .unwrap();
//! assert_eq!(exit.exit_code, 0);
//! c.delete_sandbox(&sb.id).unwrap();
//! ```

pub mod types;

use std::io::{Read, Write};
use std::path::PathBuf;

use base64::Engine;
use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::{Method, Request, StatusCode};

pub use types::*;

/// What can go wrong talking to the daemon.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to the dough daemon at {addr}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP exchange with the dough daemon failed")]
    Http(#[from] hyper::Error),
    #[error("the dough daemon answered {status}: {code}: {message}")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
    #[error("unexpected answer from the dough daemon: {0}")]
    Decode(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Where the daemon listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    Unix(PathBuf),
    Tcp(String),
}

impl std::str::FromStr for Host {
    type Err = String;
    /// `unix:///path/to/serve.sock`, `http://127.0.0.1:PORT`, or
    /// `tcp://127.0.0.1:PORT`.
    fn from_str(s: &str) -> Result<Host, String> {
        if let Some(p) = s.strip_prefix("unix://") {
            if !p.starts_with('/') {
                return Err(format!("{s}: expected unix:///absolute/path"));
            }
            return Ok(Host::Unix(p.into()));
        }
        for pre in ["http://", "tcp://"] {
            if let Some(a) = s.strip_prefix(pre) {
                let a = a.trim_end_matches('/');
                if a.is_empty() || a.contains('/') {
                    return Err(format!("{s}: expected {pre}HOST:PORT"));
                }
                return Ok(Host::Tcp(a.to_string()));
            }
        }
        Err(format!(
            "{s}: expected unix:///path or http://HOST:PORT (https is not served)"
        ))
    }
}

/// One exec's events, as they arrive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    /// The command is starting; signal it by this id.
    Start(String),
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
}

/// A blocking client. Each call is one HTTP/1.1 request on a connection
/// of its own.
#[derive(Debug)]
pub struct Client {
    host: Host,
    token: String,
    rt: tokio::runtime::Runtime,
}

/// The longest line of an event stream this client reads.
const MAX_EVENT_LINE: usize = 4 << 20;

type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, std::io::Error>;

impl Client {
    /// A client for the daemon at `host` (see [`Host`]'s forms) with this
    /// bearer token.
    pub fn new(host: &str, token: &str) -> Result<Client, ClientError> {
        let host = host.parse().map_err(ClientError::Decode)?;
        if token.trim().is_empty() || !token.trim().bytes().all(|b| b.is_ascii_graphic()) {
            return Err(ClientError::Decode(
                "the token is empty or has characters a header cannot carry".into(),
            ));
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()?;
        Ok(Client {
            host,
            token: token.trim().to_string(),
            rt,
        })
    }

    /// `DOUGH_HOST` (default: the daemon's socket under `home`) and the
    /// token in `DOUGH_TOKEN`, else in the daemon's token file under `home`.
    pub fn from_env(home: &std::path::Path) -> Result<Client, ClientError> {
        let host = std::env::var("DOUGH_HOST")
            .unwrap_or_else(|_| format!("unix://{}", home.join("serve.sock").display()));
        let token = match std::env::var("DOUGH_TOKEN") {
            Ok(t) => t,
            Err(_) => std::fs::read_to_string(home.join("serve.token"))?,
        };
        Client::new(&host, &token)
    }

    async fn send(
        &self,
        req: Request<Body>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, ClientError> {
        macro_rules! go {
            ($io:expr) => {{
                let (mut send, conn) =
                    hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new($io))
                        .await?;
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                Ok(send.send_request(req).await?)
            }};
        }
        match &self.host {
            Host::Unix(p) => {
                let io = tokio::net::UnixStream::connect(p).await.map_err(|source| {
                    ClientError::Connect {
                        addr: format!("unix://{}", p.display()),
                        source,
                    }
                })?;
                go!(io)
            }
            Host::Tcp(a) => {
                let io = tokio::net::TcpStream::connect(a.as_str())
                    .await
                    .map_err(|source| ClientError::Connect {
                        addr: a.clone(),
                        source,
                    })?;
                go!(io)
            }
        }
    }

    fn request(&self, method: Method, path: &str, body: Body, json: bool) -> Request<Body> {
        let mut b = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "dough")
            .header("authorization", format!("Bearer {}", self.token));
        if json {
            b = b.header("content-type", "application/json");
        }
        // Every part was encoded: a request from them is valid.
        b.body(body).expect("a request from encoded parts")
    }

    /// Send, and fail with the API's error unless the status is a success.
    async fn call(
        &self,
        req: Request<Body>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, ClientError> {
        let resp = self.send(req).await?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        Err(api_error(status, &bytes))
    }

    fn json<T: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl serde::Serialize>,
    ) -> Result<T, ClientError> {
        self.rt.block_on(async {
            let b = match body {
                Some(b) => full(serde_json::to_vec(b).expect("serializable")),
                None => full(Vec::new()),
            };
            let resp = self
                .call(self.request(method, path, b, body.is_some()))
                .await?;
            let bytes = resp.into_body().collect().await?.to_bytes();
            serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode(format!("{path}: {e}")))
        })
    }

    /// Raw request for anything else (tests send malformed ones): the
    /// status and the body.
    pub fn raw(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Vec<u8>,
    ) -> Result<(u16, Vec<u8>), ClientError> {
        self.rt.block_on(async {
            let mut b = Request::builder()
                .method(method)
                .uri(path)
                .header("host", "dough")
                .header("content-type", "application/json");
            if let Some(t) = token {
                b = b.header("authorization", format!("Bearer {t}"));
            }
            let req = b
                .body(full(body))
                .map_err(|e| ClientError::Decode(e.to_string()))?;
            let resp = self.send(req).await?;
            let status = resp.status().as_u16();
            let bytes = resp.into_body().collect().await?.to_bytes();
            Ok((status, bytes.to_vec()))
        })
    }

    pub fn health(&self) -> Result<Health, ClientError> {
        self.json(Method::GET, "/v1/health", None::<&()>)
    }

    pub fn version(&self) -> Result<Version, ClientError> {
        self.json(Method::GET, "/v1/version", None::<&()>)
    }

    /// The OpenAPI document.
    pub fn openapi(&self) -> Result<serde_json::Value, ClientError> {
        self.json(Method::GET, "/openapi.json", None::<&()>)
    }

    /// Prometheus text.
    pub fn metrics(&self) -> Result<String, ClientError> {
        self.rt.block_on(async {
            let resp = self
                .call(self.request(Method::GET, "/metrics", full(Vec::new()), false))
                .await?;
            let bytes = resp.into_body().collect().await?.to_bytes();
            Ok(String::from_utf8_lossy(&bytes).into_owned())
        })
    }

    pub fn create_sandbox(&self, req: &CreateSandbox) -> Result<Sandbox, ClientError> {
        self.json(Method::POST, "/v1/sandboxes", Some(req))
    }

    /// Every sandbox the daemon made, newest first (ended ones too), all
    /// pages of them.
    pub fn sandboxes(&self) -> Result<Vec<Sandbox>, ClientError> {
        self.all_pages("/v1/sandboxes?", |s: &Sandbox| &s.id)
    }

    /// The live sandboxes, newest first.
    pub fn live_sandboxes(&self) -> Result<Vec<Sandbox>, ClientError> {
        self.all_pages("/v1/sandboxes?live=true&", |s: &Sandbox| &s.id)
    }

    /// One page of a list (`path` ends in `?` or `&`): at most `limit` rows
    /// after the row `before`, newest first. A page shorter than `limit`
    /// is the last.
    pub fn page<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        before: Option<&str>,
        limit: u32,
    ) -> Result<Vec<T>, ClientError> {
        let mut q = format!("{path}limit={limit}");
        if let Some(b) = before {
            q.push_str("&before=");
            q.push_str(&encode_query(b));
        }
        self.json(Method::GET, &q, None::<&()>)
    }

    /// Every page of a list. A daemon that does not page (older than
    /// paging) answers the whole list every time: a page longer than asked
    /// for is all of it, and a page that starts where the last one did
    /// adds nothing.
    fn all_pages<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        id: fn(&T) -> &str,
    ) -> Result<Vec<T>, ClientError> {
        const LIMIT: usize = 1000;
        let mut all: Vec<T> = Vec::new();
        loop {
            let page: Vec<T> = self.page(path, all.last().map(id), LIMIT as u32)?;
            if page.len() > LIMIT {
                return Ok(page);
            }
            let first_again = match (all.first(), page.first()) {
                (Some(a), Some(p)) => id(a) == id(p),
                _ => false,
            };
            if first_again {
                return Ok(all);
            }
            let last = page.len() < LIMIT;
            all.extend(page);
            if last {
                return Ok(all);
            }
        }
    }

    pub fn sandbox(&self, id: &str) -> Result<Sandbox, ClientError> {
        let id = &segment(id);
        self.json(Method::GET, &format!("/v1/sandboxes/{id}"), None::<&()>)
    }

    pub fn delete_sandbox(&self, id: &str) -> Result<(), ClientError> {
        let id = &segment(id);
        self.rt.block_on(async {
            self.call(self.request(
                Method::DELETE,
                &format!("/v1/sandboxes/{id}"),
                full(Vec::new()),
                false,
            ))
            .await
            .map(drop)
        })
    }

    /// Run a command; `on` gets its events as they arrive; returns how it
    /// ended.
    pub fn exec(
        &self,
        id: &str,
        req: &ExecBody,
        on: &mut dyn FnMut(ExecEvent),
    ) -> Result<ExecExit, ClientError> {
        let id = &segment(id);
        self.rt.block_on(async {
            let body = full(serde_json::to_vec(req).expect("serializable"));
            let resp = self
                .call(self.request(
                    Method::POST,
                    &format!("/v1/sandboxes/{id}/exec"),
                    body,
                    true,
                ))
                .await?;
            read_events(resp.into_body(), "the exec stream", |event, data| {
                match event {
                    "start" => {
                        let s: ExecStart = decode(&data)?;
                        on(ExecEvent::Start(s.exec_id))
                    }
                    "stdout" | "stderr" => {
                        let o: ExecOutput = decode(&data)?;
                        let b = base64::engine::general_purpose::STANDARD
                            .decode(o.data)
                            .map_err(|e| ClientError::Decode(e.to_string()))?;
                        on(if event == "stdout" {
                            ExecEvent::Stdout(b)
                        } else {
                            ExecEvent::Stderr(b)
                        })
                    }
                    "exit" => return decode::<ExecExit>(&data).map(Some),
                    "error" => {
                        let e: ErrorInfo = decode(&data)?;
                        return Err(ClientError::Api {
                            status: 200,
                            code: e.code,
                            message: e.message,
                        });
                    }
                    _ => {}
                }
                Ok(None)
            })
            .await
        })
    }

    /// Send a signal to a running exec.
    pub fn signal(&self, id: &str, exec_id: &str, signal: i32) -> Result<Signalled, ClientError> {
        let id = &segment(id);
        let exec_id = &segment(exec_id);
        self.json(
            Method::POST,
            &format!("/v1/sandboxes/{id}/execs/{exec_id}/signal"),
            Some(&SignalBody { signal }),
        )
    }

    /// Write `data` to `path` in the sandbox (a file), or unpack it into
    /// directory `path` when `tar`. Streams: nothing is held whole.
    pub fn upload(
        &self,
        id: &str,
        path: &str,
        tar: bool,
        data: impl Read + Send + 'static,
    ) -> Result<Uploaded, ClientError> {
        let id = &segment(id);
        let chunks = futures::stream::unfold(data, |mut r| async move {
            let mut buf = vec![0u8; 64 << 10];
            match r.read(&mut buf) {
                Ok(0) => None,
                Ok(n) => {
                    buf.truncate(n);
                    Some((Ok(Frame::data(Bytes::from(buf))), r))
                }
                Err(e) => Some((Err(e), r)),
            }
        });
        let body = BodyExt::boxed_unsync(StreamBody::new(chunks));
        let uri = files_uri(id, path, tar);
        self.rt.block_on(async {
            let resp = self
                .call(self.request(Method::PUT, &uri, body, false))
                .await?;
            let bytes = resp.into_body().collect().await?.to_bytes();
            serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode(e.to_string()))
        })
    }

    /// Copy `path` in the sandbox (a file, or a directory as a tar stream
    /// when `tar`) to `out` as it arrives; returns the bytes written.
    pub fn download(
        &self,
        id: &str,
        path: &str,
        tar: bool,
        out: &mut dyn Write,
    ) -> Result<u64, ClientError> {
        let id = &segment(id);
        let uri = files_uri(id, path, tar);
        self.rt.block_on(async {
            let resp = self
                .call(self.request(Method::GET, &uri, full(Vec::new()), false))
                .await?;
            let mut body = resp.into_body().into_data_stream();
            let mut n = 0u64;
            while let Some(chunk) = body.next().await {
                let chunk = chunk?;
                out.write_all(&chunk)?;
                n += chunk.len() as u64;
            }
            Ok(n)
        })
    }

    /// What `path` is in the sandbox (and a directory's entries).
    pub fn stat(&self, id: &str, path: &str) -> Result<FileStat, ClientError> {
        let id = &segment(id);
        self.json(
            Method::GET,
            &format!("/v1/sandboxes/{id}/stat?path={}", encode_query(path)),
            None::<&()>,
        )
    }
}

impl Client {
    /// Start a run of a plan (a file on the daemon's host).
    pub fn create_run(&self, req: &CreateRun) -> Result<Run, ClientError> {
        self.json(Method::POST, "/v1/runs", Some(req))
    }

    /// Every run, newest first, all pages of them.
    pub fn runs(&self) -> Result<Vec<Run>, ClientError> {
        self.all_pages("/v1/runs?", |r: &Run| &r.id)
    }

    pub fn run(&self, id: &str) -> Result<Run, ClientError> {
        let id = &segment(id);
        self.json(Method::GET, &format!("/v1/runs/{id}"), None::<&()>)
    }

    pub fn cancel_run(&self, id: &str) -> Result<Run, ClientError> {
        let id = &segment(id);
        self.json(Method::POST, &format!("/v1/runs/{id}/cancel"), None::<&()>)
    }

    /// A finished run's report (markdown).
    pub fn run_report(&self, id: &str) -> Result<String, ClientError> {
        let id = &segment(id);
        self.rt.block_on(async {
            let resp = self
                .call(self.request(
                    Method::GET,
                    &format!("/v1/runs/{id}/report"),
                    full(Vec::new()),
                    false,
                ))
                .await?;
            let bytes = resp.into_body().collect().await?.to_bytes();
            Ok(String::from_utf8_lossy(&bytes).into_owned())
        })
    }

    /// Follow a run's events after sequence number `after` (0: from the
    /// start) until it ends; returns how it ended. A daemon that goes away
    /// ends this with an error: call again with the last event's `seq`.
    pub fn follow_run(
        &self,
        id: &str,
        after: i64,
        on: &mut dyn FnMut(RunEvent),
    ) -> Result<RunState, ClientError> {
        let id = &segment(id);
        self.rt.block_on(async {
            let resp = self
                .call(self.request(
                    Method::GET,
                    &format!("/v1/runs/{id}/events?after={after}"),
                    full(Vec::new()),
                    false,
                ))
                .await?;
            read_events(resp.into_body(), "the run's event stream", |event, data| {
                match event {
                    "event" => on(decode(&data)?),
                    "end" => return Ok(Some(decode::<RunEnd>(&data)?.state)),
                    _ => {}
                }
                Ok(None)
            })
            .await
        })
    }
}

/// Read server-sent events from `body`, each given to `on` (event name,
/// data) until it returns a value; a stream that ends first is an error.
async fn read_events<T>(
    mut body: hyper::body::Incoming,
    what: &str,
    mut on: impl FnMut(&str, String) -> Result<Option<T>, ClientError>,
) -> Result<T, ClientError> {
    let mut sse = SseParser::default();
    loop {
        let Some(frame) = body.frame().await else {
            return Err(ClientError::Decode(format!(
                "{what} ended before its last event"
            )));
        };
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        for (event, data) in sse.push(&data)? {
            if let Some(t) = on(&event, data)? {
                return Ok(t);
            }
        }
    }
}

fn full(b: Vec<u8>) -> Body {
    BodyExt::boxed_unsync(Full::new(Bytes::from(b)).map_err(|never| match never {}))
}

fn files_uri(id: &str, path: &str, tar: bool) -> String {
    format!(
        "/v1/sandboxes/{id}/files?path={}{}",
        encode_query(path),
        if tar { "&format=tar" } else { "" }
    )
}

/// Percent-encode one path segment (an id): `/`, `?` and the like cannot
/// reach another route.
pub fn segment(s: &str) -> String {
    encode_query(s).replace('/', "%2F")
}

/// Percent-encode a query value (everything but unreserved characters).
pub fn encode_query(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn decode<T: serde::de::DeserializeOwned>(data: &str) -> Result<T, ClientError> {
    serde_json::from_str(data).map_err(|e| ClientError::Decode(format!("event data: {e}")))
}

fn api_error(status: StatusCode, body: &[u8]) -> ClientError {
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(e) => ClientError::Api {
            status: status.as_u16(),
            code: e.error.code,
            message: e.error.message,
        },
        Err(_) => ClientError::Api {
            status: status.as_u16(),
            code: "unknown".into(),
            message: String::from_utf8_lossy(&body[..body.len().min(500)]).into_owned(),
        },
    }
}

/// Server-sent events, parsed as bytes arrive: `event:` and `data:` lines,
/// dispatched at a blank line.
#[derive(Debug, Default)]
struct SseParser {
    line: Vec<u8>,
    event: String,
    data: String,
}

impl SseParser {
    fn push(&mut self, bytes: &[u8]) -> Result<Vec<(String, String)>, ClientError> {
        let mut out = Vec::new();
        for &b in bytes {
            if b != b'\n' {
                if self.line.len() >= MAX_EVENT_LINE {
                    return Err(ClientError::Decode("an event line is too long".into()));
                }
                self.line.push(b);
                continue;
            }
            let line = String::from_utf8_lossy(&self.line)
                .trim_end_matches('\r')
                .to_string();
            self.line.clear();
            if line.is_empty() {
                if !self.data.is_empty() || !self.event.is_empty() {
                    let ev = if self.event.is_empty() {
                        "message".to_string()
                    } else {
                        std::mem::take(&mut self.event)
                    };
                    out.push((ev, std::mem::take(&mut self.data)));
                }
            } else if let Some(v) = line.strip_prefix("event:") {
                self.event = v.trim_start().to_string();
            } else if let Some(v) = line.strip_prefix("data:") {
                if !self.data.is_empty() {
                    self.data.push('\n');
                }
                self.data.push_str(v.strip_prefix(' ').unwrap_or(v));
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_parse() {
        assert_eq!(
            "unix:///run/dough.sock".parse::<Host>(),
            Ok(Host::Unix("/run/dough.sock".into()))
        );
        assert_eq!(
            "http://127.0.0.1:7070/".parse::<Host>(),
            Ok(Host::Tcp("127.0.0.1:7070".into()))
        );
        "unix://relative".parse::<Host>().unwrap_err();
        "https://x:1".parse::<Host>().unwrap_err();
    }

    #[test]
    fn events_split_anywhere_are_parsed_whole() {
        let text = b"event: start\ndata: {\"exec_id\":\"ex-1\"}\n\n: comment\nevent: exit\r\ndata: {}\r\n\r\n";
        for cut in 0..text.len() {
            let mut p = SseParser::default();
            let mut evs = p.push(&text[..cut]).unwrap();
            evs.extend(p.push(&text[cut..]).unwrap());
            assert_eq!(
                evs,
                vec![
                    ("start".to_string(), "{\"exec_id\":\"ex-1\"}".to_string()),
                    ("exit".to_string(), "{}".to_string())
                ]
            );
        }
    }

    #[test]
    fn ids_cannot_reach_other_routes_and_bad_tokens_are_refused() {
        assert_eq!(segment("../x?y"), "..%2Fx%3Fy");
        Client::new("unix:///x", "a\nb").unwrap_err();
        Client::new("unix:///x", " ").unwrap_err();
        Client::new("unix:///x", "ok-token\n").unwrap();
    }

    #[test]
    fn query_values_are_encoded() {
        assert_eq!(encode_query("/a b/ü&x=1"), "/a%20b/%C3%BC%26x%3D1");
    }
}
