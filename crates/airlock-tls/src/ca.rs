//! The installation CA and the leaf certificates it mints.

use std::fmt;
use std::fs;
use std::io::Write;
use std::num::NonZeroUsize;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lru::LruCache;
use rand::RngCore;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SerialNumber,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;

use crate::{provider, TlsError, ALPN};

/// The CA certificate, world-readable (it is copied into sandboxes).
pub const CA_CERT_FILE: &str = "ca.pem";
/// The CA private key, 0600, never leaves the host.
pub const CA_KEY_FILE: &str = "ca-key.pem";
/// Leaf certificates kept (least recently used are evicted).
pub const LEAF_CACHE_SIZE: usize = 1024;

/// Leaves are valid from a day ago (clock skew) for this long...
const LEAF_VALIDITY: time::Duration = time::Duration::days(7);
/// ...and re-minted once they are this old.
const LEAF_REFRESH: Duration = Duration::from_secs(2 * 24 * 3600);

struct Leaf {
    minted: Instant,
    key: Arc<CertifiedKey>,
    server: Arc<ServerConfig>,
}

/// A per-installation certificate authority. Cheap to share (`Arc<Ca>`); minting is
/// thread-safe.
pub struct Ca {
    dir: PathBuf,
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    /// The issuer as rcgen needs it (re-signed from the stored params; same subject and
    /// key as `ca.pem`, so leaves chain to the stored certificate).
    issuer: rcgen::Certificate,
    key: KeyPair,
    cache: Mutex<LruCache<String, Leaf>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca")
            .field("dir", &self.dir)
            .field("key", &"***")
            .finish_non_exhaustive()
    }
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> TlsError + 'a {
    move |source| TlsError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

fn random_serial() -> SerialNumber {
    let mut b = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut b);
    b[0] &= 0x7f; // positive
    SerialNumber::from_slice(&b)
}

impl Ca {
    /// Load the CA from `dir`, creating it (and `dir`, 0700) on first use. Creation is
    /// atomic: concurrent callers end up with the same CA. A key file readable by group
    /// or others is refused.
    pub fn load_or_create(dir: &Path) -> Result<Ca, TlsError> {
        let key_path = dir.join(CA_KEY_FILE);
        let cert_path = dir.join(CA_CERT_FILE);
        if !key_path.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io_err("create directory", dir))?;
            Self::create(dir, &key_path, &cert_path)?;
        }
        // Another process may have linked the key and not yet renamed the certificate.
        for _ in 0..40 {
            if cert_path.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        Self::load(dir, &key_path, &cert_path)
    }

    fn create(dir: &Path, key_path: &Path, cert_path: &Path) -> Result<(), TlsError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        let mut id = [0u8; 4];
        rand::thread_rng().fill_bytes(&mut id);
        let id: String = id.iter().map(|b| format!("{b:02x}")).collect();
        dn.push(DnType::CommonName, format!("airlock sandbox CA {id}"));
        dn.push(DnType::OrganizationName, "airlock");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + time::Duration::days(3650);
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key)?;

        let tag = format!(
            "{}.{:08x}",
            std::process::id(),
            rand::thread_rng().next_u32()
        );
        let tmp_key = dir.join(format!(".{CA_KEY_FILE}.{tag}.tmp"));
        let tmp_cert = dir.join(format!(".{CA_CERT_FILE}.{tag}.tmp"));
        write_file(&tmp_key, key.serialize_pem().as_bytes(), 0o600)?;
        write_file(&tmp_cert, cert.pem().as_bytes(), 0o644)?;
        // link(2) fails if the key exists: whoever links first owns the CA.
        let won = match fs::hard_link(&tmp_key, key_path) {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
            Err(e) => return Err(io_err("create", key_path)(e)),
        };
        let _ = fs::remove_file(&tmp_key);
        if won {
            fs::rename(&tmp_cert, cert_path).map_err(io_err("create", cert_path))?;
        } else {
            let _ = fs::remove_file(&tmp_cert);
        }
        Ok(())
    }

    fn load(dir: &Path, key_path: &Path, cert_path: &Path) -> Result<Ca, TlsError> {
        let meta = fs::metadata(key_path).map_err(io_err("read", key_path))?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(TlsError::KeyPermissions {
                path: key_path.to_path_buf(),
                mode,
            });
        }
        let key_pem = fs::read_to_string(key_path).map_err(io_err("read", key_path))?;
        let cert_pem = fs::read_to_string(cert_path).map_err(io_err("read", cert_path))?;
        let bad = |why: String, path: &Path| TlsError::BadFile {
            path: path.to_path_buf(),
            why,
        };
        let key = KeyPair::from_pem(&key_pem).map_err(|e| bad(e.to_string(), key_path))?;
        let params = CertificateParams::from_ca_cert_pem(&cert_pem)
            .map_err(|e| bad(e.to_string(), cert_path))?;
        let cert_der = crate::parse_pem_certs(cert_pem.as_bytes())
            .into_iter()
            .next()
            .ok_or_else(|| bad("no certificate".into(), cert_path))?;
        let issuer = params.self_signed(&key)?;
        if !same_public_key(&key, &cert_der) {
            return Err(bad(
                format!("{CA_CERT_FILE} does not match {CA_KEY_FILE}"),
                cert_path,
            ));
        }
        Ok(Ca {
            dir: dir.to_path_buf(),
            cert_pem,
            cert_der,
            issuer,
            key,
            cache: Mutex::new(LruCache::new(
                NonZeroUsize::new(LEAF_CACHE_SIZE).unwrap_or(NonZeroUsize::MIN),
            )),
            provider: provider(),
        })
    }

    /// The directory holding `ca.pem` and `ca-key.pem`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of the CA certificate (safe to copy into a sandbox).
    pub fn cert_path(&self) -> PathBuf {
        self.dir.join(CA_CERT_FILE)
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The leaf for `host` (a DNS name or IP literal), minted on first use and cached.
    pub fn leaf(&self, host: &str) -> Result<Arc<CertifiedKey>, TlsError> {
        Ok(self.entry(host)?.0)
    }

    /// A server configuration presenting the leaf for `host`, ALPN h2 + http/1.1. Cached
    /// with the leaf.
    pub fn server_config(&self, host: &str) -> Result<Arc<ServerConfig>, TlsError> {
        Ok(self.entry(host)?.1)
    }

    /// Number of cached leaves.
    pub fn cached_leaves(&self) -> usize {
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    fn entry(&self, host: &str) -> Result<(Arc<CertifiedKey>, Arc<ServerConfig>), TlsError> {
        let host = normalize(host)?;
        {
            let mut c = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(l) = c.get(&host) {
                if l.minted.elapsed() < LEAF_REFRESH {
                    return Ok((l.key.clone(), l.server.clone()));
                }
            }
        }
        // Mint outside the lock; a concurrent duplicate is harmless.
        let key = Arc::new(self.mint(&host)?);
        let mut server = ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(Fixed(key.clone())));
        server.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
        // Our cipher order (AES-128-GCM first), whatever the client lists first.
        server.ignore_client_order = true;
        let server = Arc::new(server);
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).put(
            host,
            Leaf {
                minted: Instant::now(),
                key: key.clone(),
                server: server.clone(),
            },
        );
        Ok((key, server))
    }

    fn mint(&self, host: &str) -> Result<CertifiedKey, TlsError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::new(vec![host.to_string()])?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, host);
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + LEAF_VALIDITY;
        params.serial_number = Some(random_serial());
        let cert = params.signed_by(&key, &self.issuer, &self.key)?;
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signer = self.provider.key_provider.load_private_key(der)?;
        Ok(CertifiedKey::new(
            vec![cert.der().clone(), self.cert_der.clone()],
            signer,
        ))
    }
}

/// Does the stored certificate carry this key's public key?
fn same_public_key(key: &KeyPair, cert: &CertificateDer<'_>) -> bool {
    let raw = key.public_key_raw();
    !raw.is_empty() && cert.windows(raw.len()).any(|w| w == raw)
}

/// Host names are lowercase without a trailing dot; IP literals as they are.
fn normalize(host: &str) -> Result<String, TlsError> {
    let h = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let h = h.strip_suffix('.').unwrap_or(h).to_ascii_lowercase();
    let ok = !h.is_empty()
        && h.len() <= 253
        && (h.parse::<std::net::IpAddr>().is_ok()
            || h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_'));
    if ok {
        Ok(h)
    } else {
        Err(TlsError::BadName(host.to_string()))
    }
}

/// Always presents one certificate.
#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl ResolvesServerCert for Fixed {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// Mints by SNI; without SNI, presents the leaf for `default_host`.
#[derive(Debug)]
pub struct LeafResolver {
    pub ca: Arc<Ca>,
    pub default_host: Option<String>,
}

impl ResolvesServerCert for LeafResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let host = hello.server_name().or(self.default_host.as_deref())?;
        match self.ca.leaf(host) {
            Ok(k) => Some(k),
            Err(e) => {
                tracing::warn!("cannot mint a certificate for {host}: {e}");
                None
            }
        }
    }
}

fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), TlsError> {
    let _ = fs::remove_file(path);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io_err("create", path))?;
    f.write_all(data).map_err(io_err("write", path))?;
    f.sync_all().map_err(io_err("sync", path))?;
    // The umask may have narrowed the mode; set it exactly.
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(io_err("chmod", path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_load_modes_and_cache() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("ca");
        let ca = Ca::load_or_create(&dir).unwrap();
        let mode = |f: &str| fs::metadata(dir.join(f)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(CA_KEY_FILE), 0o600);
        assert_eq!(mode(CA_CERT_FILE), 0o644);
        assert_eq!(mode("."), 0o700);
        assert!(ca.cert_pem().starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(!format!("{ca:?}").contains("PRIVATE"));

        // the same CA is loaded again
        let again = Ca::load_or_create(&dir).unwrap();
        assert_eq!(again.cert_pem(), ca.cert_pem());

        // leaf cache: hit returns the same key, names are normalized
        let a = ca.leaf("Example.COM.").unwrap();
        let b = ca.leaf("example.com").unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(ca.cached_leaves(), 1);
        let s1 = ca.server_config("example.com").unwrap();
        let s2 = ca.server_config("example.com").unwrap();
        assert!(Arc::ptr_eq(&s1, &s2));
        assert_eq!(
            s1.alpn_protocols,
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        );
        ca.leaf("127.0.0.1").unwrap();
        ca.leaf("[::1]").unwrap();
        assert_eq!(ca.cached_leaves(), 3);
        assert_eq!(a.cert.len(), 2, "leaf + CA");
        assert!(ca.leaf("bad name/").is_err());
    }

    #[test]
    fn refuses_readable_key() {
        let d = tempfile::tempdir().unwrap();
        Ca::load_or_create(d.path()).unwrap();
        let key = d.path().join(CA_KEY_FILE);
        fs::set_permissions(&key, fs::Permissions::from_mode(0o640)).unwrap();
        let e = Ca::load_or_create(d.path()).unwrap_err();
        assert!(
            matches!(e, TlsError::KeyPermissions { mode: 0o640, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("chmod 600"), "{e}");
    }

    #[test]
    fn concurrent_creation_agrees() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().to_path_buf();
        let hs: Vec<_> = (0..4)
            .map(|_| {
                let p = p.clone();
                std::thread::spawn(move || Ca::load_or_create(&p).unwrap().cert_pem().to_string())
            })
            .collect();
        let pems: Vec<String> = hs.into_iter().map(|h| h.join().unwrap()).collect();
        assert!(pems.iter().all(|p| p == &pems[0]));
    }
}
