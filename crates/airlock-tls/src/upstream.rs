//! Trust on the way out (upstream client configuration) and on the way in (the guest's
//! merged CA bundle).

use std::path::Path;
use std::sync::OnceLock;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, RootCertStore};

use crate::{provider, TlsError, ALPN};

/// Environment variable naming a PEM file of extra CA certificates that upstream servers
/// may chain to (a corporate TLS-inspecting proxy, a private registry). Read by
/// [`upstream_client_config_from_env`].
pub const EXTRA_CA_ENV: &str = "AIRLOCK_UPSTREAM_EXTRA_CA";

/// All `CERTIFICATE` blocks of a PEM text (other blocks and garbage are skipped).
pub fn parse_pem_certs(pem: &[u8]) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem)
        .filter_map(Result::ok)
        .collect()
}

/// The host's native roots, loaded once per process.
fn native_roots() -> &'static [CertificateDer<'static>] {
    static ROOTS: OnceLock<Vec<CertificateDer<'static>>> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let r = rustls_native_certs::load_native_certs();
        for e in &r.errors {
            tracing::warn!("loading native root certificates: {e}");
        }
        if r.certs.is_empty() {
            tracing::warn!("no native root certificates found: upstream TLS will fail");
        }
        r.certs
    })
}

/// Client configuration for upstream TLS: the host's native roots plus `extra_roots`,
/// ALPN h2 + http/1.1, ring provider. Certificates the root store rejects are skipped
/// (logged).
pub fn upstream_client_config(extra_roots: &[CertificateDer<'_>]) -> ClientConfig {
    let mut roots = RootCertStore::empty();
    let (_, bad) = roots.add_parsable_certificates(native_roots().iter().cloned());
    if bad > 0 {
        tracing::debug!("{bad} native root certificates were not usable");
    }
    for c in extra_roots {
        if let Err(e) = roots.add(c.clone().into_owned()) {
            tracing::warn!("extra upstream root rejected: {e}");
        }
    }
    // Invariant: ring implements TLS 1.2 and 1.3, the safe default versions.
    #[allow(clippy::expect_used)]
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default TLS versions");
    let mut cfg = builder.with_root_certificates(roots).with_no_client_auth();
    cfg.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    cfg
}

/// The certificates named by `$AIRLOCK_UPSTREAM_EXTRA_CA` (empty if unset). An unreadable
/// file or one without certificates is an error: a corporate CA that silently fails to
/// load would break every upstream.
pub fn env_extra_roots() -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let Some(path) = std::env::var_os(EXTRA_CA_ENV) else {
        return Ok(Vec::new());
    };
    let path = Path::new(&path);
    let data = std::fs::read(path).map_err(|source| TlsError::Io {
        what: "read",
        path: path.to_path_buf(),
        source,
    })?;
    let certs = parse_pem_certs(&data);
    if certs.is_empty() {
        return Err(TlsError::BadFile {
            path: path.to_path_buf(),
            why: format!("no PEM certificates (from ${EXTRA_CA_ENV})"),
        });
    }
    Ok(certs)
}

/// [`upstream_client_config`] with the native roots plus `$AIRLOCK_UPSTREAM_EXTRA_CA`.
pub fn upstream_client_config_from_env() -> Result<ClientConfig, TlsError> {
    Ok(upstream_client_config(&env_extra_roots()?))
}

/// Where distributions keep the system CA bundle (Debian/Ubuntu, Fedora/RHEL, Alpine/
/// macOS-style), first match wins: read the guest root's copy and pass it to
/// [`guest_bundle`].
pub const SYSTEM_BUNDLE_PATHS: &[&str] = &[
    "etc/ssl/certs/ca-certificates.crt",
    "etc/pki/tls/certs/ca-bundle.crt",
    "etc/ssl/cert.pem",
];

/// The guest environment that makes clients trust the airlock CA: the merged bundle
/// (from [`guest_bundle`]) for the variables that replace the store, and the CA alone for
/// `NODE_EXTRA_CA_CERTS`, which extends Node's built-in roots. Paths are as seen inside
/// the sandbox.
pub fn guest_env(bundle_path: &str, ca_path: &str) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = [
        "SSL_CERT_FILE",
        "REQUESTS_CA_BUNDLE",
        "CURL_CA_BUNDLE",
        "GIT_SSL_CAINFO",
    ]
    .iter()
    .map(|k| (k.to_string(), bundle_path.to_string()))
    .collect();
    env.push(("NODE_EXTRA_CA_CERTS".into(), ca_path.into()));
    env
}

/// The guest's trust bundle: the system bundle as it is, then the airlock CA. Used for
/// `SSL_CERT_FILE`, `REQUESTS_CA_BUNDLE`, `CURL_CA_BUNDLE` and `GIT_SSL_CAINFO`, which
/// replace rather than extend the store.
pub fn guest_bundle(system_bundle: &[u8], ca_pem: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(system_bundle.len() + ca_pem.len() + 32);
    out.extend_from_slice(system_bundle);
    if !out.is_empty() && !out.ends_with(b"\n") {
        out.push(b'\n');
    }
    out.extend_from_slice(b"# airlock sandbox CA\n");
    out.extend_from_slice(ca_pem.as_bytes());
    if !out.ends_with(b"\n") {
        out.push(b'\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundle_appends_ca() {
        let ca = crate::Ca::load_or_create(tempfile::tempdir().unwrap().path()).unwrap();
        let sys = std::fs::read("/etc/ssl/certs/ca-certificates.crt").unwrap_or_default();
        let b = guest_bundle(&sys, ca.cert_pem());
        let certs = parse_pem_certs(&b);
        assert_eq!(certs.len(), parse_pem_certs(&sys).len() + 1);
        assert_eq!(certs.last().unwrap(), ca.cert_der());
        assert_eq!(parse_pem_certs(&guest_bundle(b"", ca.cert_pem())).len(), 1);
    }

    #[test]
    fn client_config_has_native_and_extra_roots() {
        let ca = crate::Ca::load_or_create(tempfile::tempdir().unwrap().path()).unwrap();
        let cfg = upstream_client_config(&[ca.cert_der().clone()]);
        assert_eq!(
            cfg.alpn_protocols,
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        );
        assert!(!native_roots().is_empty(), "this machine has a trust store");
    }
}
