//! TLS for brokered hosts: dough's own CA (its key stays on the host; its
//! certificate is what clones trust), leaf certificates issued on the fly
//! for the names a clone asks for, and the verified client configuration
//! for upstreams (webpki's roots, the host's CA bundle, extra roots).

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("certificate: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// dough's CA, as PEM. The key is read by the gateway (on the host) only.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaPem {
    pub cert: String,
    pub key: String,
}

impl std::fmt::Debug for CaPem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CaPem([key redacted])")
    }
}

/// File names of the CA under its directory.
pub const CA_CERT_FILE: &str = "dough-ca.pem";
pub const CA_KEY_FILE: &str = "dough-ca.key";

impl CaPem {
    /// A new CA (ECDSA P-256, valid ten years).
    pub fn generate() -> Result<CaPem, TlsError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "dough egress gateway CA");
        dn.push(DnType::OrganizationName, "dough (this host)");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = time_now();
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + ten_years();
        let cert = params.self_signed(&key)?;
        Ok(CaPem {
            cert: cert.pem(),
            key: key.serialize_pem(),
        })
    }

    /// The CA under `dir`, made on first use (key 0600, directory 0700).
    /// Safe when several threads or processes make it at once: each writes
    /// a complete CA into a directory of its own and renames it into place;
    /// the first rename wins and the others load the winner's.
    pub fn load_or_create(dir: &Path) -> Result<CaPem, TlsError> {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        let io = |what: String| move |source| TlsError::Io { what, source };
        let load = || -> Result<CaPem, TlsError> {
            let (cp, kp) = (dir.join(CA_CERT_FILE), dir.join(CA_KEY_FILE));
            Ok(CaPem {
                cert: std::fs::read_to_string(&cp)
                    .map_err(io(format!("reading {}", cp.display())))?,
                key: std::fs::read_to_string(&kp)
                    .map_err(io(format!("reading {}", kp.display())))?,
            })
        };
        if dir.join(CA_CERT_FILE).exists() && dir.join(CA_KEY_FILE).exists() {
            return load();
        }
        let parent = dir.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent).map_err(io(format!("creating {}", parent.display())))?;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("ca");
        let staging = parent.join(format!(".{name}.new-{}-{nanos}", std::process::id()));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&staging)
            .map_err(io(format!("creating {}", staging.display())))?;
        let ca = CaPem::generate()?;
        let write = |file: &str, text: &str, mode: u32| {
            let p = staging.join(file);
            let mut f = std::fs::File::options()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(&p)?;
            std::io::Write::write_all(&mut f, text.as_bytes())?;
            f.sync_all()
        };
        let written = write(CA_KEY_FILE, &ca.key, 0o600)
            .and_then(|()| write(CA_CERT_FILE, &ca.cert, 0o644))
            .map_err(io(format!("writing a new CA in {}", staging.display())));
        if let Err(e) = written {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(e);
        }
        // Replaces `dir` only if it is missing or empty.
        match std::fs::rename(&staging, dir) {
            Ok(()) => Ok(ca),
            Err(_) if dir.join(CA_CERT_FILE).exists() => {
                let _ = std::fs::remove_dir_all(&staging);
                load()
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(&staging);
                Err(io(format!("putting the new CA at {}", dir.display()))(e))
            }
        }
    }
}

fn time_now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

fn ten_years() -> time::Duration {
    time::Duration::days(3650)
}

/// Issues (and remembers) leaf certificates for the names clients ask for.
pub struct LeafIssuer {
    issuer: Issuer<'static, KeyPair>,
    ca_der: CertificateDer<'static>,
    cache: Mutex<HashMap<String, Arc<rustls::ServerConfig>>>,
}

impl std::fmt::Debug for LeafIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LeafIssuer")
    }
}

/// Most leaf configurations kept per gateway.
const LEAF_CACHE_MAX: usize = 64;

impl LeafIssuer {
    pub fn new(ca: &CaPem) -> Result<LeafIssuer, TlsError> {
        let key = KeyPair::from_pem(&ca.key)?;
        let issuer = Issuer::from_ca_cert_pem(&ca.cert, key)?;
        let ca_der =
            CertificateDer::from_pem_slice(ca.cert.as_bytes()).map_err(|e| TlsError::Io {
                what: "reading the CA certificate".into(),
                source: std::io::Error::other(e.to_string()),
            })?;
        Ok(LeafIssuer {
            issuer,
            ca_der,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// A server configuration presenting a certificate for `name` (and
    /// offering HTTP/2 and HTTP/1.1 by ALPN).
    pub fn server_config(&self, name: &str) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = cache.get(name) {
            return Ok(c.clone());
        }
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec![name.to_string()])?;
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, name.to_string());
        let now = time_now();
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + time::Duration::days(30);
        let cert = params.signed_by(&key, &self.issuer)?;
        let chain = vec![cert.der().clone(), self.ca_der.clone()];
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(chain, key_der)?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let config = Arc::new(config);
        if cache.len() >= LEAF_CACHE_MAX {
            cache.clear();
        }
        cache.insert(name.to_string(), config.clone());
        Ok(config)
    }
}

pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The host's CA bundle, where Debian keeps it.
pub const HOST_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// How the gateway verifies upstreams: webpki's roots, the host's bundle
/// (which holds a TLS-intercepting proxy's CA where the host trusts one),
/// and `extra` PEM files.
pub fn upstream_config(extra: &[std::path::PathBuf]) -> Result<rustls::ClientConfig, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let mut files: Vec<&Path> = vec![Path::new(HOST_BUNDLE)];
    files.extend(extra.iter().map(|p| p.as_path()));
    for f in files {
        let Ok(iter) = CertificateDer::pem_file_iter(f) else {
            continue;
        };
        for c in iter.flatten() {
            let _ = roots.add(c);
        }
    }
    // ALPN (h2, http/1.1) is set by the HTTPS connector that uses it.
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Many makers at once (a plan's concurrent clones) end with one CA,
    /// each of them holding it, none failing.
    #[test]
    fn makers_racing_agree_on_one_ca() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("home/ca");
        let got: Vec<CaPem> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..8)
                .map(|_| s.spawn(|| CaPem::load_or_create(&dir).unwrap()))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let on_disk = CaPem::load_or_create(&dir).unwrap();
        for ca in &got {
            assert_eq!((&ca.cert, &ca.key), (&on_disk.cert, &on_disk.key));
        }
        let left: Vec<_> = std::fs::read_dir(d.path().join("home"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(
            left,
            vec![std::ffi::OsString::from("ca")],
            "no staging left"
        );
    }

    #[test]
    fn a_made_ca_is_kept_private_and_reused() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("ca");
        let a = CaPem::load_or_create(&dir).unwrap();
        let b = CaPem::load_or_create(&dir).unwrap();
        assert_eq!(a, b);
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir.join(CA_KEY_FILE)), 0o600);
        assert_eq!(mode(&dir), 0o700);
        let issuer = LeafIssuer::new(&a).unwrap();
        let c1 = issuer.server_config("api.example.com").unwrap();
        let c2 = issuer.server_config("api.example.com").unwrap();
        assert!(Arc::ptr_eq(&c1, &c2));

        // A client that trusts the CA (and nothing else) completes a
        // handshake with the leaf; under another name it does not.
        let handshake = |name: &str| -> Result<(), rustls::Error> {
            let mut roots = rustls::RootCertStore::empty();
            roots
                .add(CertificateDer::from_pem_slice(a.cert.as_bytes()).unwrap())
                .unwrap();
            let cc = rustls::ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
            let sn = rustls::pki_types::ServerName::try_from(name.to_string()).unwrap();
            let mut client = rustls::ClientConnection::new(Arc::new(cc), sn).unwrap();
            let mut server = rustls::ServerConnection::new(c1.clone()).unwrap();
            for _ in 0..10 {
                let mut buf = Vec::new();
                client.write_tls(&mut buf).unwrap();
                server.read_tls(&mut &buf[..]).unwrap();
                server.process_new_packets()?;
                let mut buf = Vec::new();
                server.write_tls(&mut buf).unwrap();
                client.read_tls(&mut &buf[..]).unwrap();
                client.process_new_packets()?;
                if !client.is_handshaking() && !server.is_handshaking() {
                    return Ok(());
                }
            }
            Err(rustls::Error::General("no progress".into()))
        };
        handshake("api.example.com").unwrap();
        assert!(handshake("other.example.com").is_err());
    }
}
