//! The name a client asks for, from the first bytes it sends: the SNI of a
//! TLS ClientHello (parsed by rustls's own server-side `Acceptor`) or the
//! `Host` header of an HTTP/1 request (httparse). The caller reads at most
//! [`SNIFF_MAX`] bytes, under a deadline.

use dough_net::plan::valid_host_name;

/// Most bytes read from a client before it must have said which name it
/// wants.
pub const SNIFF_MAX: usize = 16 << 10;

/// Most request headers looked at for `Host`.
const MAX_HEADERS: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sniffed {
    /// Not enough bytes yet to tell.
    More,
    /// A TLS ClientHello asking for this server name.
    Tls(String),
    /// An HTTP/1 request for this host.
    Http(String),
    /// Neither, or one that names no usable host: why.
    Refused(&'static str),
}

/// What `buf` (everything the client sent so far) asks for.
pub fn sniff(buf: &[u8]) -> Sniffed {
    match buf.first() {
        None => Sniffed::More,
        // A TLS handshake record.
        Some(0x16) => tls(buf),
        Some(_) => http(buf),
    }
}

fn tls(buf: &[u8]) -> Sniffed {
    let mut acceptor = rustls::server::Acceptor::default();
    let mut rest = buf;
    while !rest.is_empty() {
        match acceptor.read_tls(&mut rest) {
            Ok(0) => break,
            Ok(_) => {}
            Err(_) => return Sniffed::Refused("a TLS record too large"),
        }
    }
    match acceptor.accept() {
        Ok(None) => Sniffed::More,
        Ok(Some(accepted)) => match accepted.client_hello().server_name() {
            Some(n) if valid_host_name(n) => Sniffed::Tls(n.to_ascii_lowercase()),
            Some(_) => Sniffed::Refused("a server name that is not a host name"),
            None => Sniffed::Refused("a TLS ClientHello without a server name (SNI)"),
        },
        Err(_) => Sniffed::Refused("a malformed TLS ClientHello"),
    }
}

fn http(buf: &[u8]) -> Sniffed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Partial) => Sniffed::More,
        Ok(httparse::Status::Complete(_)) => {
            let mut hosts = req
                .headers
                .iter()
                .filter(|h| h.name.eq_ignore_ascii_case("host"));
            let (Some(h), None) = (hosts.next(), hosts.next()) else {
                return Sniffed::Refused("an HTTP request without exactly one Host header");
            };
            let Ok(v) = std::str::from_utf8(h.value) else {
                return Sniffed::Refused("an HTTP Host header that is not a host name");
            };
            let v = v.trim();
            // `name:port`: the port is the one dialed; the name is what counts.
            let name = match v.rsplit_once(':') {
                Some((n, p)) if p.bytes().all(|b| b.is_ascii_digit()) => n,
                _ => v,
            };
            let name = name.strip_suffix('.').unwrap_or(name);
            if valid_host_name(name) {
                Sniffed::Http(name.to_ascii_lowercase())
            } else {
                Sniffed::Refused("an HTTP Host header that is not a host name")
            }
        }
        Err(_) => Sniffed::Refused("neither a TLS ClientHello nor an HTTP/1 request"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_hosts() {
        assert_eq!(
            sniff(b"GET / HTTP/1.1\r\nHost: Example.COM:8080\r\n\r\n"),
            Sniffed::Http("example.com".into())
        );
        assert_eq!(sniff(b"GET / HTTP/1.1\r\nHost: exa"), Sniffed::More);
        assert_eq!(sniff(b"GET / HT"), Sniffed::More);
        assert!(matches!(
            sniff(b"GET / HTTP/1.1\r\nHost: a.com\r\nHost: b.com\r\n\r\n"),
            Sniffed::Refused(_)
        ));
        assert!(matches!(
            sniff(b"GET / HTTP/1.1\r\n\r\n"),
            Sniffed::Refused(_)
        ));
        assert!(matches!(
            sniff(b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n"),
            Sniffed::Refused(_)
        ));
        assert!(matches!(sniff(b"SSH-2.0-OpenSSH\r\n"), Sniffed::Refused(_)));
    }
}
