//! airlock-egress: the host-side egress proxy of one sandbox.
//!
//! Owns: an HTTP/1.1 forward proxy (absolute-form requests and `CONNECT`) that decides
//! every request with [`airlock_policy::Policy`], dials only the address it checked
//! (resolve → classify → dial; no DNS rebinding), streams bodies and tunnels without
//! buffering them, and reports one [`airlock_policy::Event`] per decision to an
//! [`EventSink`]. With [`Egress::with_tls`], allowed non-bypassed CONNECTs are TLS-terminated
//! (module `mitm`): SNI and Host are checked against the CONNECT (domain fronting), every
//! request is decided and logged, and [`Egress::with_credentials`] injects API keys for
//! provider hosts and refuses their placeholders elsewhere.
//!
//! Must not: persist events (the sink does), know about sandboxes' lifecycle, or put
//! policy evaluation or logging on the per-byte data path. Policy evaluation happens
//! once per request/tunnel; the event is handed to the sink when the exchange ends.
//!
//! Clients reach the proxy over a Unix socket (a relay inside the sandbox) or TCP, so
//! nothing here relies on the peer address.

use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use airlock_policy::{Event, Policy};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};

mod body;
pub mod dns;
mod mitm;
mod proxy;
mod splice;
pub mod target;
pub mod transparent;

/// Receives one event per decision. Called off the data path, once per exchange; must not
/// block (push into a channel).
pub trait EventSink: Send + Sync + 'static {
    fn record(&self, ev: Event);
}

/// A boxed, sendable future.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Name resolution. The proxy never passes IP literals, `localhost` or the
/// [`airlock_policy::HOST_LOOPBACK_ALIASES`] here: it maps those itself.
pub trait Resolver: Send + Sync + 'static {
    fn resolve<'a>(&'a self, host: &'a str, port: u16) -> BoxFuture<'a, io::Result<Vec<IpAddr>>>;
}

/// The system resolver (`getaddrinfo` via `tokio::net::lookup_host`; honours /etc/hosts).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemResolver;

impl Resolver for SystemResolver {
    fn resolve<'a>(&'a self, host: &'a str, port: u16) -> BoxFuture<'a, io::Result<Vec<IpAddr>>> {
        Box::pin(async move {
            if let Some(fixed) = fixed_addrs(host) {
                return Ok(fixed);
            }
            let mut out: Vec<IpAddr> = Vec::new();
            for sa in tokio::net::lookup_host((host, port)).await? {
                if !out.contains(&sa.ip()) {
                    out.push(sa.ip());
                }
            }
            Ok(out)
        })
    }
}

/// IP literals and the host-loopback names, which are never resolved.
pub(crate) fn fixed_addrs(host: &str) -> Option<Vec<IpAddr>> {
    let h = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if let Ok(ip) = h.parse::<IpAddr>() {
        return Some(vec![ip]);
    }
    let n = airlock_policy::normalize_host(h);
    if airlock_policy::is_host_loopback_name(&n) {
        return Some(vec![
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
        ]);
    }
    None
}

/// Everything an [`Egress`] needs.
pub struct EgressConfig {
    /// Sandbox id, copied into every event.
    pub sandbox: String,
    pub policy: Policy,
    pub sink: Arc<dyn EventSink>,
    pub resolver: Arc<dyn Resolver>,
}

/// Limits and timeouts (defaults match the design: 64 KiB head, 30 s head timeout).
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest accepted request head (start line + headers), bytes.
    pub max_head: usize,
    /// How long a client may take to send a request head (also closes idle keep-alive
    /// connections after this long).
    pub head_timeout: Duration,
    /// Upstream TCP connect timeout, per address.
    pub connect_timeout: Duration,
    /// Buffer size per direction for CONNECT tunnels.
    pub tunnel_buf: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_head: 64 * 1024,
            head_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            tunnel_buf: 64 * 1024,
        }
    }
}

/// The egress proxy of one sandbox.
pub struct Egress {
    sandbox: String,
    policy: RwLock<Arc<Policy>>,
    sink: Arc<dyn EventSink>,
    resolver: Arc<dyn Resolver>,
    limits: Limits,
    /// Name → addresses airlock's DNS answered ([`dns`]), consulted by [`transparent`].
    pins: dns::Pins,
    /// TLS termination for CONNECT/443 (see [`Egress::with_tls`]); `None` = tunnel.
    tls: Option<Arc<TlsTermination>>,
    /// Credentials injected into terminated requests ([`Egress::with_credentials`]).
    credentials: Option<Arc<Credentials>>,
}

impl Egress {
    pub fn new(cfg: EgressConfig) -> Egress {
        Egress::with_limits(cfg, Limits::default())
    }

    pub fn with_limits(cfg: EgressConfig, limits: Limits) -> Egress {
        Egress {
            sandbox: cfg.sandbox,
            policy: RwLock::new(Arc::new(cfg.policy)),
            sink: cfg.sink,
            resolver: cfg.resolver,
            limits,
            pins: dns::Pins::default(),
            tls: None,
            credentials: None,
        }
    }

    pub fn sandbox(&self) -> &str {
        &self.sandbox
    }

    /// Replace the policy. Requests decided after this call use the new policy; tunnels
    /// and exchanges already running are not interrupted.
    pub fn set_policy(&self, policy: Policy) {
        let new = Arc::new(policy);
        // A poisoned lock only means a writer panicked mid-assignment of an Arc, which
        // cannot leave it half-written: keep going with the inner value.
        *self.policy.write().unwrap_or_else(|e| e.into_inner()) = new;
    }

    /// The current policy.
    pub fn policy(&self) -> Arc<Policy> {
        self.policy
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Accept loop on a Unix socket; one task per client connection.
    pub async fn serve_unix(self: Arc<Self>, l: UnixListener) -> io::Result<()> {
        loop {
            match l.accept().await {
                Ok((s, _)) => {
                    let me = self.clone();
                    tokio::spawn(async move { me.serve_connection(s).await });
                }
                Err(e) => accept_error(e).await?,
            }
        }
    }

    /// Accept loop on a TCP socket; one task per client connection.
    pub async fn serve_tcp(self: Arc<Self>, l: TcpListener) -> io::Result<()> {
        loop {
            match l.accept().await {
                Ok((s, _)) => {
                    let _ = s.set_nodelay(true);
                    let me = self.clone();
                    tokio::spawn(async move { me.serve_connection(s).await });
                }
                Err(e) => accept_error(e).await?,
            }
        }
    }

    /// Serve one client connection (any byte stream) until it closes.
    pub async fn serve_connection<S>(self: Arc<Self>, io: S)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        proxy::serve(self, io).await
    }

    pub(crate) fn record(&self, ev: Event) {
        self.sink.record(ev);
    }

    /// Resolve a name to candidate addresses (IP literals and loopback names are fixed).
    pub(crate) async fn lookup(&self, host: &str, port: u16) -> io::Result<Vec<IpAddr>> {
        if let Some(fixed) = fixed_addrs(host) {
            return Ok(fixed);
        }
        let addrs = self.resolver.resolve(host, port).await?;
        if addrs.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{host}: no addresses"),
            ));
        }
        Ok(addrs)
    }
}

/// Transient accept errors (aborted handshakes, fd exhaustion) must not end the loop.
async fn accept_error(e: io::Error) -> io::Result<()> {
    match e.kind() {
        io::ErrorKind::ConnectionAborted
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::Interrupted => Ok(()),
        _ if matches!(e.raw_os_error(), Some(libc_emfile) if is_resource_errno(libc_emfile)) => {
            tracing::warn!("egress accept: {e}; backing off");
            tokio::time::sleep(Duration::from_millis(50)).await;
            Ok(())
        }
        _ => Err(e),
    }
}

/// EMFILE, ENFILE, ENOBUFS, ENOMEM on Linux.
fn is_resource_errno(n: i32) -> bool {
    matches!(n, 24 | 23 | 105 | 12)
}

/// RFC 3339 UTC with milliseconds, e.g. `2026-11-27T06:30:01.123Z`.
pub fn now_rfc3339() -> String {
    let now = time::OffsetDateTime::now_utc();
    let fmt = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    now.format(&fmt)
        .unwrap_or_else(|_| now.unix_timestamp().to_string())
}

pub use airlock_secrets::Credentials;
pub use mitm::TlsTermination;
pub use target::{Target, TargetError};

#[cfg(test)]
mod unit_tests {
    #[test]
    fn time_format() {
        let t = super::now_rfc3339();
        assert_eq!(t.len(), 24, "{t}");
        assert!(t.ends_with('Z') && t.as_bytes()[10] == b'T' && t.as_bytes()[19] == b'.');
    }

    #[test]
    fn fixed() {
        use std::net::IpAddr;
        assert_eq!(
            super::fixed_addrs("[::1]").unwrap(),
            vec!["::1".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(
            super::fixed_addrs("Host.Docker.Internal.").unwrap().len(),
            2
        );
        assert!(super::fixed_addrs("example.com").is_none());
    }
}
