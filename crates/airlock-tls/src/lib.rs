//! airlock-tls: the TLS material of an airlock installation.
//!
//! Owns: the per-installation certificate authority ([`Ca`]: `ca.pem` 0644 and
//! `ca-key.pem` 0600, created atomically), leaf certificates minted on demand for a host
//! name or IP and kept in a bounded cache, the rustls server configuration that presents
//! them ([`Ca::server_config`], [`LeafResolver`]), the client configuration used to reach
//! upstreams ([`upstream_client_config`]: the host's native roots, never webpki-roots),
//! the merged trust bundle for the guest ([`guest_bundle`]) and a ClientHello/SNI parser
//! ([`sni::parse_client_hello`]).
//!
//! Must not: do network I/O, make policy decisions, or ever copy the CA private key
//! anywhere except `ca-key.pem` on the host. Only the `ring` crypto provider is used.

mod ca;
pub mod sni;
mod upstream;

pub use ca::{Ca, LeafResolver, CA_CERT_FILE, CA_KEY_FILE, LEAF_CACHE_SIZE};
pub use rustls;
pub use rustls::pki_types::CertificateDer;
pub use upstream::{
    env_extra_roots, guest_bundle, guest_env, parse_pem_certs, upstream_client_config,
    upstream_client_config_from_env, EXTRA_CA_ENV, SYSTEM_BUNDLE_PATHS,
};

use std::path::PathBuf;

/// ALPN protocols offered on both legs, in preference order.
pub const ALPN: &[&[u8]] = &[b"h2", b"http/1.1"];

/// Errors of this crate. Paths are in the fields; the source is not repeated.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot {what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} is readable by group or others (mode {mode:o}); the CA private key must be 0600: run `chmod 600 {path}`"
    )]
    KeyPermissions { path: PathBuf, mode: u32 },
    #[error("{path}: {why}")]
    BadFile { path: PathBuf, why: String },
    #[error("certificate generation failed")]
    Rcgen(#[from] rcgen::Error),
    #[error("TLS configuration failed")]
    Rustls(#[from] rustls::Error),
    #[error("invalid certificate name {0:?}")]
    BadName(String),
}

/// The crypto provider used everywhere in airlock (ring; aws-lc needs cmake/clang), with
/// AES-128-GCM preferred over AES-256-GCM (both legs of a terminated connection are
/// encrypted on the host, so the cheaper AEAD matters for throughput), then ChaCha20.
pub fn provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites.sort_by_key(|s| {
        let name = format!("{:?}", s.suite());
        if name.contains("AES_128") {
            0
        } else if name.contains("AES_256") {
            1
        } else {
            2
        }
    });
    std::sync::Arc::new(p)
}

#[cfg(test)]
mod tests {
    #[test]
    fn aes128_first_tls13_before_tls12() {
        let p = super::provider();
        let names: Vec<String> = p
            .cipher_suites
            .iter()
            .map(|s| format!("{:?}", s.suite()))
            .collect();
        assert_eq!(names[0], "TLS13_AES_128_GCM_SHA256", "{names:?}");
        assert_eq!(
            p.cipher_suites.len(),
            rustls::crypto::ring::default_provider().cipher_suites.len()
        );
    }
}
