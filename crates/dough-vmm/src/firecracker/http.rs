//! Just enough HTTP/1.1 over a Unix socket for Firecracker's API: one
//! request per connection, JSON bodies, `Content-Length` framing. Responses
//! are parsed with `httparse` and bounded in size.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// Largest response head and body accepted.
const MAX_HEAD: usize = 16 << 10;
const MAX_BODY: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("connecting to {path}")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("API socket I/O")]
    Io(#[from] std::io::Error),
    #[error("malformed HTTP response: {0}")]
    Malformed(String),
}

/// Send `method path` with an optional JSON body; returns the status code
/// and the body.
pub fn request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    timeout: Duration,
) -> Result<(u16, Vec<u8>), HttpError> {
    let mut s = UnixStream::connect(socket).map_err(|source| HttpError::Connect {
        path: socket.display().to_string(),
        source,
    })?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let body = body.unwrap_or_default();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\nConnection: close\r\n"
    );
    if !body.is_empty() || method != "GET" {
        req += &format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        );
    }
    req += "\r\n";
    let mut out = req.into_bytes();
    out.extend_from_slice(body);
    s.write_all(&out)?;
    read_response(&mut s)
}

/// Read one response: head, then exactly `Content-Length` bytes (or to EOF
/// when there is none).
pub fn read_response(s: &mut impl Read) -> Result<(u16, Vec<u8>), HttpError> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        match resp
            .parse(&buf)
            .map_err(|e| HttpError::Malformed(e.to_string()))?
        {
            httparse::Status::Complete(head_len) => {
                let code = resp
                    .code
                    .ok_or_else(|| HttpError::Malformed("no status code".into()))?;
                let len = resp
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                    .map(|h| {
                        std::str::from_utf8(h.value)
                            .ok()
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .ok_or_else(|| HttpError::Malformed("bad Content-Length".into()))
                    })
                    .transpose()?;
                let mut body = buf[head_len..].to_vec();
                match len {
                    Some(n) if n > MAX_BODY => {
                        return Err(HttpError::Malformed(format!("body of {n} bytes")))
                    }
                    Some(n) => {
                        while body.len() < n {
                            let k = s.read(&mut chunk)?;
                            if k == 0 {
                                return Err(HttpError::Malformed("body cut short".into()));
                            }
                            body.extend_from_slice(&chunk[..k]);
                        }
                        body.truncate(n);
                    }
                    None => {
                        s.take((MAX_BODY + 1 - body.len().min(MAX_BODY)) as u64)
                            .read_to_end(&mut body)?;
                        if body.len() > MAX_BODY {
                            return Err(HttpError::Malformed("body too large".into()));
                        }
                    }
                }
                return Ok((code, body));
            }
            httparse::Status::Partial => {
                if buf.len() > MAX_HEAD {
                    return Err(HttpError::Malformed("response head too large".into()));
                }
                let k = s.read(&mut chunk)?;
                if k == 0 {
                    return Err(HttpError::Malformed(
                        "connection closed before a response".into(),
                    ));
                }
                buf.extend_from_slice(&chunk[..k]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_parse_and_hostile_ones_fail() {
        let ok = b"HTTP/1.1 204 No Content\r\nServer: Firecracker API\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(read_response(&mut &ok[..]).unwrap(), (204, vec![]));
        let body =
            b"HTTP/1.1 400 Bad Request\r\nContent-Length: 24\r\n\r\n{\"fault_message\":\"no\"}  ";
        let (c, b) = read_response(&mut &body[..]).unwrap();
        assert_eq!((c, b.len()), (400, 24));
        let split: Vec<u8> = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello".to_vec();
        assert_eq!(
            read_response(&mut &split[..]).unwrap(),
            (200, b"hello".to_vec())
        );
        for bad in [
            &b"garbage\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
            b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
            b"",
        ] {
            assert!(
                read_response(&mut &bad[..]).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let huge = vec![b'a'; MAX_HEAD * 2];
        assert!(read_response(&mut &huge[..]).is_err());
    }
}
