//! Secrets: read from the host when a task is served, checked against
//! their required prefix, and redacted from everything dough writes.

use std::path::Path;

use crate::plan::Secret;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error("secret {name}: host environment variable {var} is not set")]
    MissingEnv { name: String, var: String },
    #[error("secret {name}: cannot read {path}: {why}")]
    File {
        name: String,
        path: String,
        why: String,
    },
    #[error(
        "secret {name} does not start with its required prefix {prefix:?} (is it the right value?)"
    )]
    Prefix { name: String, prefix: String },
    #[error("secret {name} is empty")]
    Empty { name: String },
    #[error("secret {name}: {path} is outside the plan's directory {base} (a plan may only name its own files)")]
    Outside {
        name: String,
        path: String,
        base: String,
    },
}

/// A secret's value, which never appears in `Debug` output.
#[derive(Clone, PartialEq, Eq)]
pub struct Value {
    pub name: String,
    pub value: String,
}

impl std::fmt::Debug for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Value({}: [redacted])", self.name)
    }
}

/// The broker for secret `v` as `spec` injects it: a fresh random
/// placeholder with the secret's prefix, for the hosts and header named.
pub fn broker(
    spec: &Secret,
    inject: &crate::plan::Inject,
    v: &Value,
) -> Result<dough_gateway::broker::Broker, String> {
    use std::io::Read;
    let hosts = inject
        .hosts
        .iter()
        .map(|h| h.parse().map_err(|e| format!("secret {}: {e}", spec.name)))
        .collect::<Result<Vec<_>, _>>()?;
    let header = match &inject.header {
        Some(h) => h
            .parse()
            .map_err(|e| format!("secret {}: {e}", spec.name))?,
        None => Default::default(),
    };
    let mut random = [0u8; 64];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut random))
        .map_err(|e| format!("reading /dev/urandom: {e}"))?;
    Ok(dough_gateway::broker::Broker {
        name: spec.name.clone(),
        placeholder: dough_gateway::broker::placeholder(&spec.prefix, v.value.len(), &random),
        value: v.value.clone(),
        hosts,
        header,
    })
}

/// Read every secret of the plan (`env` looks up host variables), checking
/// prefixes. Errors name the secret, never its value.
pub fn resolve(
    secrets: &[Secret],
    base: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<Value>, SecretError> {
    secrets
        .iter()
        .map(|s| {
            let value = match (&s.env, &s.file) {
                (Some(var), _) => env(var).ok_or_else(|| SecretError::MissingEnv {
                    name: s.name.clone(),
                    var: var.clone(),
                })?,
                (None, Some(file)) => {
                    let p = base.join(file);
                    // Symlinks resolved: the file must really be inside.
                    let real = |q: &Path| {
                        std::fs::canonicalize(q).map_err(|e| SecretError::File {
                            name: s.name.clone(),
                            path: q.display().to_string(),
                            why: e.kind().to_string(),
                        })
                    };
                    let (rp, rb) = (real(&p)?, real(base)?);
                    if !rp.starts_with(&rb) {
                        return Err(SecretError::Outside {
                            name: s.name.clone(),
                            path: p.display().to_string(),
                            base: rb.display().to_string(),
                        });
                    }
                    std::fs::read_to_string(&rp)
                        .map_err(|e| SecretError::File {
                            name: s.name.clone(),
                            path: p.display().to_string(),
                            why: e.kind().to_string(),
                        })?
                        .trim_end_matches(['\n', '\r'])
                        .to_string()
                }
                (None, None) => String::new(),
            };
            if value.is_empty() {
                return Err(SecretError::Empty {
                    name: s.name.clone(),
                });
            }
            if !value.starts_with(&s.prefix) {
                return Err(SecretError::Prefix {
                    name: s.name.clone(),
                    prefix: s.prefix.clone(),
                });
            }
            Ok(Value {
                name: s.name.clone(),
                value,
            })
        })
        .collect()
}

/// Replaces secret values with `[redacted:NAME]` in a stream of bytes,
/// holding back just enough at the end of each chunk that a value split
/// across two chunks is still caught.
#[derive(Debug, Clone)]
pub struct Redactor {
    secrets: Vec<Value>,
    held: Vec<u8>,
}

impl Redactor {
    pub fn new(secrets: &[Value]) -> Self {
        let mut secrets: Vec<Value> = secrets
            .iter()
            .filter(|s| !s.value.is_empty())
            .cloned()
            .collect();
        // Longest first, so a secret containing another is replaced whole.
        secrets.sort_by_key(|s| std::cmp::Reverse(s.value.len()));
        Redactor {
            secrets,
            held: Vec::new(),
        }
    }

    fn longest(&self) -> usize {
        self.secrets.first().map(|s| s.value.len()).unwrap_or(0)
    }

    fn replace(&self, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(data.len());
        let mut i = 0;
        'outer: while i < data.len() {
            for s in &self.secrets {
                if data[i..].starts_with(s.value.as_bytes()) {
                    out.extend_from_slice(format!("[redacted:{}]", s.name).as_bytes());
                    i += s.value.len();
                    continue 'outer;
                }
            }
            out.push(data[i]);
            i += 1;
        }
        out
    }

    /// Feed a chunk; returns what can be written now.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<u8> {
        self.held.extend_from_slice(chunk);
        let keep = self.longest().saturating_sub(1);
        if self.held.len() <= keep {
            return Vec::new();
        }
        // Redact everything, then hold back an unredacted tail that might
        // be the start of a secret continued in the next chunk.
        let cut = self.safe_cut(keep);
        let head: Vec<u8> = self.held.drain(..cut).collect();
        self.replace(&head)
    }

    /// A cut point leaving at most `keep` bytes, never inside a secret.
    fn safe_cut(&self, keep: usize) -> usize {
        let limit = self.held.len() - keep;
        // If a secret (or what may be the start of one) begins before the
        // cut and runs past it, cut before it.
        let straddles = |start: usize| {
            self.secrets.iter().any(|s| {
                let v = s.value.as_bytes();
                let have = (self.held.len() - start).min(v.len());
                start + v.len() > limit && self.held[start..].starts_with(&v[..have])
            })
        };
        (limit.saturating_sub(self.longest())..limit)
            .find(|&start| straddles(start))
            .unwrap_or(limit)
    }

    /// Flush the held tail.
    pub fn finish(&mut self) -> Vec<u8> {
        let rest = std::mem::take(&mut self.held);
        self.replace(&rest)
    }

    /// Redact a whole string at once.
    pub fn redact(&self, s: &str) -> String {
        String::from_utf8_lossy(&self.replace(s.as_bytes())).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(name: &str, env: Option<&str>, file: Option<&str>, prefix: &str) -> Secret {
        Secret {
            name: name.into(),
            env: env.map(Into::into),
            file: file.map(Into::into),
            prefix: prefix.into(),
            inject: None,
        }
    }

    /// A plan names its own files only: a symlink out of its directory (to
    /// any root-readable host file) is refused, naming no value.
    #[test]
    fn a_secret_file_must_really_be_inside_the_plan_directory() {
        let d = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("host-key"), "sk-host-only\n").unwrap();
        std::os::unix::fs::symlink(outside.path().join("host-key"), d.path().join("key")).unwrap();
        let e = resolve(&[secret("K", None, Some("key"), "sk-")], d.path(), &|_| {
            None
        })
        .unwrap_err();
        assert!(matches!(e, SecretError::Outside { .. }), "{e}");
        assert!(!e.to_string().contains("sk-host-only"));
    }

    #[test]
    fn resolving_checks_presence_and_prefix_and_never_shows_values() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("tok"), "tk-filevalue\n").unwrap();
        let env = |k: &str| (k == "HOST_KEY").then(|| "sk-abc123".to_string());
        let got = resolve(
            &[
                secret("API_KEY", Some("HOST_KEY"), None, "sk-"),
                secret("TOKEN", None, Some("tok"), "tk-"),
            ],
            d.path(),
            &env,
        )
        .unwrap();
        assert_eq!(got[0].value, "sk-abc123");
        assert_eq!(got[1].value, "tk-filevalue");
        assert!(!format!("{got:?}").contains("abc123"));
        let e = resolve(
            &[secret("API_KEY", Some("HOST_KEY"), None, "pk-")],
            d.path(),
            &env,
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "secret API_KEY does not start with its required prefix \"pk-\" (is it the right value?)"
        );
        assert!(!e.to_string().contains("abc123"));
        let e = resolve(&[secret("X", Some("NOPE"), None, "")], d.path(), &env).unwrap_err();
        assert_eq!(
            e.to_string(),
            "secret X: host environment variable NOPE is not set"
        );
        let e = resolve(&[secret("X", None, Some("missing"), "")], d.path(), &env).unwrap_err();
        assert!(e.to_string().starts_with("secret X: cannot read"), "{e}");
    }

    fn v(name: &str, value: &str) -> Value {
        Value {
            name: name.into(),
            value: value.into(),
        }
    }

    #[test]
    fn redaction_catches_values_split_across_chunks() {
        let secrets = [v("API_KEY", "sk-SECRET-123"), v("SHORT", "zz9")];
        let text = "token sk-SECRET-123 and zz9 and sk-SECRET-12 (not it) end sk-SECRET-123";
        let want = "token [redacted:API_KEY] and [redacted:SHORT] and sk-SECRET-12 (not it) end [redacted:API_KEY]";
        assert_eq!(Redactor::new(&secrets).redact(text), want);
        // Every split into two or three chunks gives the same output.
        let b = text.as_bytes();
        for i in 0..b.len() {
            for j in i..b.len() {
                let mut r = Redactor::new(&secrets);
                let mut out = r.push(&b[..i]);
                out.extend(r.push(&b[i..j]));
                out.extend(r.push(&b[j..]));
                out.extend(r.finish());
                assert_eq!(String::from_utf8(out).unwrap(), want, "split at {i},{j}");
            }
        }
    }

    #[test]
    fn no_secrets_passes_everything_through() {
        let mut r = Redactor::new(&[]);
        assert_eq!(r.push(b"abc"), b"abc");
        assert_eq!(r.finish(), b"");
    }
}
