//! HTTP/1.1 over Firecracker's API socket, with `hyper`.
//!
//! Responses are framed by the rules (RFC 9112 §6.3): a 204 has no body and
//! ends at its head, whatever the connection does next — real Firecracker
//! answers `HTTP/1.1 204 ` with no `Content-Length` and keeps the connection
//! open. Each call opens a connection, sends one request, reads one
//! response and closes it; the whole call has one absolute deadline, and the
//! response head and body are bounded.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;

/// Largest response head (hyper's read buffer) and body accepted.
const MAX_HEAD: usize = 16 << 10;
pub const MAX_BODY: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot connect to the API socket {path}")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no complete response within {secs}s")]
    Timeout { secs: u64 },
    #[error("invalid request {method} {path}")]
    Request {
        method: String,
        path: String,
        #[source]
        source: hyper::http::Error,
    },
    #[error("HTTP exchange failed")]
    Exchange(#[source] hyper::Error),
    #[error("response body larger than {MAX_BODY} bytes")]
    BodyTooLarge,
    #[error("cannot start the I/O runtime")]
    Runtime(#[source] std::io::Error),
}

/// Send `method path` with an optional JSON body; returns the status code
/// and the body. The whole exchange (connect, send, response) must finish
/// within `timeout`.
pub fn request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    timeout: Duration,
) -> Result<(u16, Vec<u8>), HttpError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(HttpError::Runtime)?;
    rt.block_on(async {
        tokio::time::timeout(timeout, exchange(socket, method, path, body))
            .await
            .unwrap_or(Err(HttpError::Timeout {
                secs: timeout.as_secs(),
            }))
    })
}

async fn exchange(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
) -> Result<(u16, Vec<u8>), HttpError> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|source| HttpError::Connect {
            path: socket.display().to_string(),
            source,
        })?;
    let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
        .max_buf_size(MAX_HEAD.max(8192))
        .handshake::<_, Full<Bytes>>(TokioIo::new(stream))
        .await
        .map_err(HttpError::Exchange)?;
    // The connection task ends when `sender` is dropped (or on an error,
    // which `send_request` reports too).
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, "localhost")
        .header(hyper::header::ACCEPT, "application/json");
    let body = body.unwrap_or_default();
    if !body.is_empty() || method != "GET" {
        req = req.header(hyper::header::CONTENT_TYPE, "application/json");
    }
    let req = req
        .body(Full::new(Bytes::copy_from_slice(body)))
        .map_err(|source| HttpError::Request {
            method: method.into(),
            path: path.into(),
            source,
        })?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(HttpError::Exchange)?;
    let status = resp.status().as_u16();
    let body = Limited::new(resp.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| match e.downcast::<hyper::Error>() {
            Ok(e) => HttpError::Exchange(*e),
            Err(_) => HttpError::BodyTooLarge,
        })?
        .to_bytes();
    drop(sender);
    driver.abort();
    Ok((status, body.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixListener;

    /// Serve one connection: read a request head (and `Content-Length`
    /// body), write `reply`, then keep the connection open until the
    /// client closes it, as Firecracker does. Returns what was received.
    fn serve_once(l: UnixListener, reply: Vec<u8>) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut got = Vec::new();
            let mut chunk = [0u8; 4096];
            loop {
                let mut h = [httparse::EMPTY_HEADER; 32];
                let mut r = httparse::Request::new(&mut h);
                if let Ok(httparse::Status::Complete(n)) = r.parse(&got) {
                    let len = r
                        .headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                        .map(|h| {
                            std::str::from_utf8(h.value)
                                .unwrap()
                                .parse::<usize>()
                                .unwrap()
                        })
                        .unwrap_or(0);
                    if got.len() >= n + len {
                        break;
                    }
                }
                let k = s.read(&mut chunk).unwrap();
                if k == 0 {
                    return got;
                }
                got.extend_from_slice(&chunk[..k]);
            }
            s.write_all(&reply).unwrap();
            // Hold the connection open until the client goes away.
            let _ = s.read(&mut chunk);
            got
        })
    }

    type Reply = Result<(u16, Vec<u8>), HttpError>;

    /// The client's result, and the bytes the server received.
    fn call(reply: &[u8], timeout: Duration) -> (Reply, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("api.sock");
        let server = serve_once(UnixListener::bind(&sock).unwrap(), reply.to_vec());
        let r = request(
            &sock,
            "PUT",
            "/vm",
            Some(b"{\"state\":\"Paused\"}"),
            timeout,
        );
        (r, server.join().unwrap())
    }

    #[test]
    fn a_204_without_content_length_on_a_kept_connection_completes() {
        // Real Firecracker v1.16.1's success reply, byte for byte.
        let real = b"HTTP/1.1 204 \r\nServer: Firecracker API\r\nConnection: keep-alive\r\n\r\n";
        let (r, sent) = call(real, Duration::from_secs(30));
        assert_eq!(r.unwrap(), (204, vec![]));
        let sent = String::from_utf8(sent).unwrap();
        assert!(sent.starts_with("PUT /vm HTTP/1.1\r\n"), "{sent}");
        assert!(
            sent.to_ascii_lowercase().contains("content-length: 18\r\n"),
            "{sent}"
        );
        assert!(sent.ends_with("\r\n\r\n{\"state\":\"Paused\"}"), "{sent}");
    }

    #[test]
    fn bodies_are_framed_by_content_length_or_chunks() {
        let cl = b"HTTP/1.1 400 \r\nServer: Firecracker API\r\nConnection: keep-alive\r\nContent-Type: application/json\r\nContent-Length: 22\r\n\r\n{\"fault_message\":\"no\"}";
        assert_eq!(
            call(cl, Duration::from_secs(30)).0.unwrap(),
            (400, b"{\"fault_message\":\"no\"}".to_vec())
        );
        let chunked =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
        assert_eq!(
            call(chunked, Duration::from_secs(30)).0.unwrap(),
            (200, b"hello".to_vec())
        );
    }

    #[test]
    fn a_reply_that_never_completes_ends_at_the_deadline() {
        // Content-Length promises more than ever arrives; the server keeps
        // the connection open.
        let short = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort";
        let r = call(short, Duration::from_millis(300)).0;
        assert!(matches!(r, Err(HttpError::Timeout { .. })), "{r:?}");
    }

    #[test]
    fn hostile_replies_are_errors() {
        let big = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
            MAX_BODY + 1
        );
        let mut big = big.into_bytes();
        big.resize(big.len() + MAX_BODY + 1, b'a');
        let r = call(&big, Duration::from_secs(30)).0;
        assert!(matches!(r, Err(HttpError::BodyTooLarge)), "{r:?}");
        for bad in [
            &b"garbage\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
        ] {
            let r = call(bad, Duration::from_secs(30)).0;
            assert!(matches!(r, Err(HttpError::Exchange(_))), "{r:?}");
        }
        let mut head = b"HTTP/1.1 200 OK\r\n".to_vec();
        head.extend(std::iter::repeat_n(b"X-Pad: aaaaaaaaaaaaaaaa\r\n", 4000).flatten());
        let r = call(&head, Duration::from_secs(30)).0;
        assert!(matches!(r, Err(HttpError::Exchange(_))), "{r:?}");
    }

    #[test]
    fn a_missing_socket_is_a_connect_error() {
        let dir = tempfile::tempdir().unwrap();
        let r = request(
            &dir.path().join("none.sock"),
            "GET",
            "/version",
            None,
            Duration::from_secs(5),
        );
        assert!(matches!(r, Err(HttpError::Connect { .. })), "{r:?}");
    }
}
