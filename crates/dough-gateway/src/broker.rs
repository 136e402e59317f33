//! Credential brokering: the guest holds a placeholder; for the hosts a
//! secret names, the gateway puts the real value into the request header
//! the secret names, and takes it out of anything that comes back.

use std::fmt;
use std::str::FromStr;

use dough_net::NamePattern;
use serde::{Deserialize, Serialize};

/// One brokered secret of one clone.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Broker {
    /// The secret's name (in logs; never its value).
    pub name: String,
    /// What the guest holds instead (random per clone).
    pub placeholder: String,
    /// The real value: only ever sent to `hosts`, in `header`.
    pub value: String,
    pub hosts: Vec<NamePattern>,
    pub header: HeaderRule,
}

impl fmt::Debug for Broker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Broker({} for {:?} in {}: [redacted])",
            self.name, self.hosts, self.header
        )
    }
}

impl Broker {
    /// Whether this secret is used on `host`.
    pub fn serves(&self, host: &str) -> bool {
        self.hosts.iter().any(|p| p.matches(host))
    }
}

/// Which request header carries a brokered secret, and how.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeaderRule {
    /// Lower case.
    pub name: String,
    pub scheme: Scheme,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scheme {
    /// The header's value holds the secret as it is (`x-api-key: KEY`;
    /// `authorization: Bearer KEY` too, since the placeholder is replaced
    /// wherever it appears in the value).
    Raw,
    /// HTTP Basic: the secret is the password inside the base64 of
    /// `user:password` (git over HTTPS).
    Basic,
}

impl Default for HeaderRule {
    fn default() -> Self {
        HeaderRule {
            name: "authorization".into(),
            scheme: Scheme::Raw,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0:?} is not a header rule (expected a header name such as x-api-key, \"authorization: Bearer\" or \"authorization: Basic\")")]
pub struct BadHeader(pub String);

impl FromStr for HeaderRule {
    type Err = BadHeader;
    fn from_str(s: &str) -> Result<Self, BadHeader> {
        let bad = || BadHeader(s.to_string());
        let (name, scheme) = match s.split_once(':') {
            Some((n, sch)) => (n.trim(), sch.trim()),
            None => (s.trim(), ""),
        };
        let token_ok = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !token_ok {
            return Err(bad());
        }
        let scheme = match scheme.to_ascii_lowercase().as_str() {
            "" | "bearer" | "token" => Scheme::Raw,
            "basic" => Scheme::Basic,
            _ => return Err(bad()),
        };
        Ok(HeaderRule {
            name: name.to_ascii_lowercase(),
            scheme,
        })
    }
}

impl fmt::Display for HeaderRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.scheme {
            Scheme::Raw => f.write_str(&self.name),
            Scheme::Basic => write!(f, "{}: Basic", self.name),
        }
    }
}

/// A placeholder for a secret: its required `prefix` (so CLIs that check
/// the shape accept it), `dough-`, and random letters and digits, at least
/// as long as the real value.
pub fn placeholder(prefix: &str, real_len: usize, random: &[u8]) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut s = format!("{prefix}dough-");
    let want = real_len.max(s.len() + 32);
    let mut i = 0;
    while s.len() < want {
        let b = random.get(i % random.len().max(1)).copied().unwrap_or(0);
        s.push(ALPHABET[(b as usize + i / random.len().max(1)) % ALPHABET.len()] as char);
        i += 1;
    }
    s
}

/// Put the real values into a request for `host`: in each header a broker
/// for `host` names, every occurrence of its placeholder becomes the real
/// value. Returns the names of the secrets used.
pub fn inject(brokers: &[Broker], host: &str, headers: &mut http::HeaderMap) -> Vec<String> {
    let mut used = Vec::new();
    for b in brokers.iter().filter(|b| b.serves(host)) {
        let Ok(name) = http::HeaderName::from_bytes(b.header.name.as_bytes()) else {
            continue;
        };
        let mut changed = false;
        let values: Vec<http::HeaderValue> = headers
            .get_all(&name)
            .iter()
            .map(|v| match swap(b, v.as_bytes()) {
                Some(new) => {
                    changed = true;
                    http::HeaderValue::from_bytes(&new).unwrap_or_else(|_| v.clone())
                }
                None => v.clone(),
            })
            .collect();
        if changed {
            headers.remove(&name);
            for v in values {
                headers.append(name.clone(), v);
            }
            used.push(b.name.clone());
        }
    }
    used
}

/// `value` with `b`'s placeholder replaced by the real value, if it holds it.
fn swap(b: &Broker, value: &[u8]) -> Option<Vec<u8>> {
    use base64::Engine;
    match b.header.scheme {
        Scheme::Raw => {
            let v = std::str::from_utf8(value).ok()?;
            v.contains(&b.placeholder)
                .then(|| v.replace(&b.placeholder, &b.value).into_bytes())
        }
        Scheme::Basic => {
            let v = std::str::from_utf8(value).ok()?;
            let (scheme, enc) = v.trim().split_once(' ')?;
            if !scheme.eq_ignore_ascii_case("basic") {
                return None;
            }
            let engine = base64::engine::general_purpose::STANDARD;
            let dec = String::from_utf8(engine.decode(enc.trim()).ok()?).ok()?;
            let (user, pass) = dec.split_once(':')?;
            (pass == b.placeholder).then(|| {
                format!("Basic {}", engine.encode(format!("{user}:{}", b.value))).into_bytes()
            })
        }
    }
}

/// Replaces every real value with its placeholder in a byte stream cut
/// into arbitrary chunks, holding back only the bytes that may be the
/// start of a real value (so a stream of events is passed on as it comes).
#[derive(Debug)]
pub struct Scrubber {
    pairs: Vec<(Vec<u8>, Vec<u8>)>,
    carry: Vec<u8>,
}

impl Scrubber {
    pub fn new(brokers: &[Broker]) -> Scrubber {
        Scrubber {
            pairs: brokers
                .iter()
                .filter(|b| !b.value.is_empty())
                .map(|b| {
                    (
                        b.value.clone().into_bytes(),
                        b.placeholder.clone().into_bytes(),
                    )
                })
                .collect(),
            carry: Vec::new(),
        }
    }

    /// The next chunk: what may be passed on now.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<u8> {
        if self.pairs.is_empty() {
            return chunk.to_vec();
        }
        let mut buf = std::mem::take(&mut self.carry);
        buf.extend_from_slice(chunk);
        // Complete occurrences, leftmost first (the first pair wins a tie);
        // then hold back any tail that could still become one. The search
        // is memchr's substring search: a response body streams through
        // at memory speed, not a comparison per byte.
        let mut out = Vec::with_capacity(buf.len());
        let mut last_end = 0;
        while let Some((at, k)) = self
            .pairs
            .iter()
            .enumerate()
            .filter_map(|(k, (real, _))| {
                memchr::memmem::find(&buf[last_end..], real).map(|off| (last_end + off, k))
            })
            .min()
        {
            let (real, ph) = &self.pairs[k];
            out.extend_from_slice(&buf[last_end..at]);
            out.extend_from_slice(ph);
            last_end = at + real.len();
        }
        let tail = &buf[last_end..];
        let hold = self.hold(tail);
        out.extend_from_slice(&tail[..tail.len() - hold]);
        self.carry = tail[tail.len() - hold..].to_vec();
        out
    }

    /// [`Scrubber::push`] without copying when it can: a chunk that holds
    /// no real value and arrives with nothing held back is passed on as it
    /// is (less any tail that could start one).
    pub fn push_bytes(&mut self, chunk: bytes::Bytes) -> bytes::Bytes {
        if self.pairs.is_empty() {
            return chunk;
        }
        let clean = self.carry.is_empty()
            && self
                .pairs
                .iter()
                .all(|(real, _)| memchr::memmem::find(&chunk, real).is_none());
        if !clean {
            return bytes::Bytes::from(self.push(&chunk));
        }
        let hold = self.hold(&chunk);
        self.carry = chunk[chunk.len() - hold..].to_vec();
        chunk.slice(..chunk.len() - hold)
    }

    /// How much of `tail`'s end could be the start of a real value.
    fn hold(&self, tail: &[u8]) -> usize {
        self.pairs
            .iter()
            .map(|(real, _)| {
                (1..real.len().min(tail.len() + 1))
                    .rev()
                    .find(|k| tail.ends_with(&real[..*k]))
                    .unwrap_or(0)
            })
            .max()
            .unwrap_or(0)
    }

    /// The end of the stream: whatever was held back.
    pub fn finish(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.carry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn broker(header: &str) -> Broker {
        Broker {
            name: "KEY".into(),
            placeholder: "sk-ant-dough-PLACEHOLDER".into(),
            value: "sk-ant-REALVALUE".into(),
            hosts: vec!["api.example.com".parse().unwrap()],
            header: header.parse().unwrap(),
        }
    }

    #[test]
    fn header_rules_parse() {
        assert_eq!(
            "x-api-key".parse::<HeaderRule>().unwrap(),
            HeaderRule {
                name: "x-api-key".into(),
                scheme: Scheme::Raw
            }
        );
        assert_eq!(
            "Authorization: Bearer".parse::<HeaderRule>().unwrap().name,
            "authorization"
        );
        assert_eq!(
            "authorization: basic".parse::<HeaderRule>().unwrap().scheme,
            Scheme::Basic
        );
        for bad in ["", "x api", "authorization: Digest", "a:b:c"] {
            assert!(bad.parse::<HeaderRule>().is_err(), "{bad}");
        }
    }

    #[test]
    fn the_real_value_goes_only_to_named_hosts_and_headers() {
        let b = broker("x-api-key");
        let mut h = http::HeaderMap::new();
        h.insert("x-api-key", "sk-ant-dough-PLACEHOLDER".parse().unwrap());
        h.insert("x-other", "sk-ant-dough-PLACEHOLDER".parse().unwrap());
        let mut elsewhere = h.clone();
        assert_eq!(
            inject(std::slice::from_ref(&b), "api.example.com", &mut h),
            ["KEY"]
        );
        assert_eq!(h["x-api-key"], "sk-ant-REALVALUE");
        assert_eq!(h["x-other"], "sk-ant-dough-PLACEHOLDER");
        assert!(inject(&[b], "evil.example.com", &mut elsewhere).is_empty());
        assert_eq!(elsewhere["x-api-key"], "sk-ant-dough-PLACEHOLDER");

        let bearer = broker("authorization: Bearer");
        let mut h = http::HeaderMap::new();
        h.insert(
            "authorization",
            "Bearer sk-ant-dough-PLACEHOLDER".parse().unwrap(),
        );
        inject(&[bearer], "API.example.com", &mut h);
        assert_eq!(h["authorization"], "Bearer sk-ant-REALVALUE");

        use base64::Engine;
        let e = base64::engine::general_purpose::STANDARD;
        let basic = broker("authorization: Basic");
        let mut h = http::HeaderMap::new();
        let v = format!("Basic {}", e.encode("git:sk-ant-dough-PLACEHOLDER"));
        h.insert("authorization", v.parse().unwrap());
        inject(&[basic], "api.example.com", &mut h);
        let got = h["authorization"].to_str().unwrap();
        let dec = e.decode(got.strip_prefix("Basic ").unwrap()).unwrap();
        assert_eq!(dec, b"git:sk-ant-REALVALUE");
    }

    #[test]
    fn placeholders_keep_the_prefix_and_length() {
        let p = placeholder("sk-ant-", 108, &[7, 200, 13, 99]);
        assert!(p.starts_with("sk-ant-dough-"));
        assert_eq!(p.len(), 108);
        assert!(p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
        assert_eq!(placeholder("", 3, &[1]).len(), "dough-".len() + 32);
    }

    /// `input` through `s` cut at the lengths `cuts` (cycled), and the end;
    /// `both_ways`: by turns through `push` and `push_bytes`.
    fn scrub_in_pieces(s: &mut Scrubber, input: &[u8], cuts: &[usize], both_ways: bool) -> Vec<u8> {
        let (mut out, mut i) = (Vec::new(), 0);
        for n in cuts.iter().cycle() {
            if i >= input.len() {
                break;
            }
            let j = (i + n).min(input.len());
            if both_ways && n % 2 == 1 {
                out.extend(s.push_bytes(bytes::Bytes::copy_from_slice(&input[i..j])));
            } else {
                out.extend(s.push(&input[i..j]));
            }
            i = j;
        }
        out.extend(s.finish());
        out
    }

    /// The scrubber's first, obviously correct form (a comparison at every
    /// byte): the oracle for the fast one.
    fn scrub_naive(pairs: &[(&str, &str)], input: &str) -> String {
        let buf = input.as_bytes();
        let (mut out, mut i, mut last_end) = (Vec::new(), 0, 0);
        while i < buf.len() {
            match pairs
                .iter()
                .find(|(real, _)| buf[i..].starts_with(real.as_bytes()))
            {
                Some((real, ph)) => {
                    out.extend_from_slice(&buf[last_end..i]);
                    out.extend_from_slice(ph.as_bytes());
                    i += real.len();
                    last_end = i;
                }
                None => i += 1,
            }
        }
        out.extend_from_slice(&buf[last_end..]);
        String::from_utf8(out).unwrap()
    }

    proptest::proptest! {
        /// Three secrets (two overlapping: one's end is the other's start),
        /// cut anywhere: the same as the naive scrubber on the whole stream.
        #[test]
        fn fast_scrubbing_matches_the_naive_one(
            pieces in proptest::collection::vec("(sk-ant-REALVALUE|REALVALUE-2|sk-ant-|REAL|ghp_TOKEN|VALUE|gh|x|\n)", 0..40),
            cuts in proptest::collection::vec(1usize..25, 1..30),
        ) {
            let a = broker("x-api-key");
            let mut b = broker("x-api-key");
            b.name = "GH".into();
            b.value = "ghp_TOKEN".into();
            b.placeholder = "ghp_dough_PH".into();
            let mut c = broker("x-api-key");
            c.name = "SHORT".into();
            c.value = "REALVALUE-2".into();
            c.placeholder = "dough-OTHER".into();
            let brokers = [a, b, c];
            let input: String = pieces.concat();
            let out = scrub_in_pieces(&mut Scrubber::new(&brokers), input.as_bytes(), &cuts, true);
            let pairs: Vec<(&str, &str)> = brokers
                .iter()
                .map(|b| (b.value.as_str(), b.placeholder.as_str()))
                .collect();
            let whole = scrub_naive(&pairs, &input);
            let out = String::from_utf8(out).unwrap();
            for b in &brokers {
                proptest::prop_assert!(!out.contains(&b.value));
            }
            proptest::prop_assert_eq!(out, whole);
        }

        /// However a stream is cut, the real value never comes out whole,
        /// and everything else comes out unchanged.
        #[test]
        fn scrubbing_survives_any_chunking(
            pieces in proptest::collection::vec("(sk-ant-REALVALUE|sk-ant-|REAL|x|\n\n|data: )", 0..40),
            cuts in proptest::collection::vec(1usize..20, 1..30),
        ) {
            let b = broker("x-api-key");
            let input: String = pieces.concat();
            let mut s = Scrubber::new(std::slice::from_ref(&b));
            let out = scrub_in_pieces(&mut s, input.as_bytes(), &cuts, false);
            let out = String::from_utf8(out).unwrap();
            proptest::prop_assert!(!out.contains("sk-ant-REALVALUE"));
            proptest::prop_assert_eq!(out, input.replace("sk-ant-REALVALUE", "sk-ant-dough-PLACEHOLDER"));
        }
    }
}
