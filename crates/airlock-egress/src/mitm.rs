//! TLS termination: after a CONNECT (or a transparent flow to port 443) that the policy
//! allows and does not bypass, read the ClientHello, refuse domain fronting, present a
//! leaf minted by the installation CA, and serve HTTP/1.1 or HTTP/2 (per ALPN). Every
//! request is decided again (Host / :authority must equal the SNI), gets the provider's
//! credential when its host is a provider host, is refused when it carries a credential
//! placeholder anywhere else, and is forwarded over verified TLS to the address the
//! policy checked. Bodies stream both ways; one event per request.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use airlock_policy::{Decision, Event, Request as PolicyRequest};
use airlock_tls::sni::{parse_client_hello_alpn, Hello, MAX_HELLO};
use airlock_tls::Ca;
use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::{http1, http2};
use hyper::upgrade::Upgraded;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::body::{Counters, EventGuard, ProxyBody, ReqBody};
use crate::proxy::{add, strip_hop_by_hop, text_response, tunnel, DialError};
use crate::target::Target;
use crate::{now_rfc3339, Credentials, Egress};

/// What the egress engine needs to terminate TLS: the installation CA (mints leaves) and
/// the client configuration for upstreams (native roots, plus any extra roots).
pub struct TlsTermination {
    ca: Arc<Ca>,
    /// Offers the upstream h2 + http/1.1 (for clients that offer h2).
    connector: TlsConnector,
    /// Offers the upstream http/1.1 only (for clients that do not offer h2).
    connector_h1: TlsConnector,
    /// Idle upstream connections, shared by the terminated client connections of one
    /// sandbox to one destination (saves an upstream handshake per client connection).
    pools: Mutex<HashMap<PoolKey, Arc<Mutex<Pool>>>>,
}

/// Upstream connections are shared only within (sandbox, host, port, pinned address,
/// whether the client offered h2).
type PoolKey = (String, String, u16, Option<IpAddr>, bool);

/// Destinations with pools kept before empty ones are dropped.
const MAX_POOLS: usize = 1024;

impl TlsTermination {
    fn pool(&self, key: PoolKey) -> Arc<Mutex<Pool>> {
        let mut m = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        if m.len() >= MAX_POOLS && !m.contains_key(&key) {
            m.retain(|_, p| {
                let p = p.lock().unwrap_or_else(|e| e.into_inner());
                p.h2.is_some() || !p.idle_h1.is_empty()
            });
        }
        m.entry(key).or_default().clone()
    }
}

impl TlsTermination {
    /// `upstream` is usually [`airlock_tls::upstream_client_config_from_env`]`()?`; its
    /// ALPN list is used as it is (h2 + http/1.1 from airlock-tls).
    pub fn new(ca: Arc<Ca>, upstream: airlock_tls::rustls::ClientConfig) -> TlsTermination {
        let mut h1 = upstream.clone();
        h1.alpn_protocols = vec![b"http/1.1".to_vec()];
        TlsTermination {
            ca,
            connector: TlsConnector::from(Arc::new(upstream)),
            connector_h1: TlsConnector::from(Arc::new(h1)),
            pools: Mutex::new(HashMap::new()),
        }
    }

    pub fn ca(&self) -> &Arc<Ca> {
        &self.ca
    }
}

/// An upstream TCP connection already made to an address the policy checked.
pub(crate) struct Dialed {
    pub stream: TcpStream,
    pub addr: IpAddr,
    pub decision: Decision,
}

impl Egress {
    /// Terminate TLS on allowed, non-bypassed CONNECTs (and in
    /// [`Egress::serve_tls_intercepted`]). Call before wrapping the egress in an `Arc`.
    pub fn with_tls(mut self, tls: Arc<TlsTermination>) -> Egress {
        self.tls = Some(tls);
        self
    }

    /// Inject these credentials into terminated requests to provider hosts, and refuse
    /// their placeholders everywhere else. Without TLS termination they are unused.
    pub fn with_credentials(mut self, credentials: Arc<Credentials>) -> Egress {
        self.credentials = Some(credentials);
        self
    }

    /// Serve a TLS client stream whose destination is `connect_host:port` (the transparent
    /// path: a flow to port 443 without CONNECT). Reads the ClientHello, then:
    /// - `connect_host` a name (e.g. the name the sandbox's DNS answer was pinned to): the
    ///   SNI must equal it (else blocked as domain fronting); the name is resolved →
    ///   classified → dialed as for CONNECT;
    /// - `connect_host` an IP literal (the original destination address) and an SNI name:
    ///   the policy decides the SNI name *at that address*, and upstreams are dialed at
    ///   that address only (upstream TLS is verified for the SNI name);
    /// - no SNI: the policy decides `connect_host`.
    ///
    /// Then terminates as for CONNECT — or, without TLS termination or for a bypass rule,
    /// tunnels to the checked address. `path` goes into the events (`"transparent"`). A
    /// stream that does not start with a ClientHello is refused and logged.
    pub async fn serve_tls_intercepted<IO>(
        self: &Arc<Self>,
        io: IO,
        connect_host: &str,
        port: u16,
        path: &'static str,
    ) where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let mut io = io;
        let host = normalize(connect_host);
        let t = make_target(&host, port);
        let (prefix, hello, alpn) = match read_hello(&mut io, self.limits.head_timeout).await {
            Ok(x) => x,
            Err(e) => {
                tracing::debug!("{t}: reading ClientHello: {e}");
                return;
            }
        };
        match hello {
            Hello::ClientHello { sni } => {
                let io = Prefixed::new(prefix, io);
                // Destination known only by address: police the SNI name, dial that address.
                let pin = t.ip().filter(|ip| {
                    sni.as_deref()
                        .is_some_and(|s| normalize(s) != ip.to_string())
                });
                let hello = (sni, alpn);
                intercept(self.clone(), io, &t, hello, None, path, pin).await
            }
            Hello::NotTls => self.record(block_event(
                self,
                path,
                &t,
                "tls-required",
                "not a TLS ClientHello".into(),
            )),
            Hello::Malformed(why) => self.record(block_event(
                self,
                path,
                &t,
                "tls-required",
                format!("malformed TLS ClientHello: {why}"),
            )),
            Hello::NeedMore => {} // closed before a whole ClientHello
        }
    }
}

/// After `200 Connection established` on an intercepting CONNECT: TLS → terminate; other
/// bytes → the plain tunnel (the guard's CONNECT event stands); junk → refuse.
pub(crate) async fn after_connect(
    egress: Arc<Egress>,
    mut up: Upgraded,
    t: Target,
    dialed: Dialed,
    guard: &mut EventGuard,
) {
    let mut client = TokioIo::new(&mut up);
    let read = read_hello(&mut client, egress.limits.head_timeout).await;
    let (prefix, hello, alpn) = match read {
        Ok(x) => x,
        Err(e) => {
            tracing::debug!("CONNECT {t}: reading ClientHello: {e}");
            return;
        }
    };
    match hello {
        Hello::ClientHello { sni } => {
            // Requests inside are logged one by one instead of the CONNECT.
            guard.event = None;
            let io = Prefixed::new(prefix, TokioIo::new(up));
            intercept(egress, io, &t, (sni, alpn), Some(dialed), "proxy", None).await;
        }
        Hello::NotTls => {
            let mut upstream = dialed.stream;
            if upstream.write_all(&prefix).await.is_err() {
                return;
            }
            add(&guard.counters.up, prefix.len());
            let buf = egress.limits.tunnel_buf;
            if let Err(e) = tunnel(up, upstream, &guard.counters, buf).await {
                tracing::debug!("tunnel {t}: {e}");
            }
        }
        Hello::Malformed(why) => {
            if let Some(ev) = guard.event.as_mut() {
                ev.action = "block".into();
                ev.rule = "tls-required".into();
                ev.reason = format!("malformed TLS ClientHello: {why}");
            }
        }
        Hello::NeedMore => {}
    }
}

/// Read until the bytes are known to be (or not be) a complete ClientHello. Returns the
/// bytes read, the verdict and the offered ALPN protocols.
async fn read_hello<IO: AsyncRead + Unpin>(
    io: &mut IO,
    timeout: std::time::Duration,
) -> io::Result<(Vec<u8>, Hello, Vec<Vec<u8>>)> {
    let fut = async {
        let mut buf = Vec::with_capacity(2048);
        let mut chunk = [0u8; 4096];
        loop {
            let n = io.read(&mut chunk).await?;
            if n == 0 {
                return Ok((buf, Hello::NeedMore, Vec::new()));
            }
            buf.extend_from_slice(&chunk[..n]);
            match parse_client_hello_alpn(&buf) {
                (Hello::NeedMore, _) if buf.len() <= MAX_HELLO + 64 * 5 => {}
                (Hello::NeedMore, _) => {
                    let h = Hello::Malformed("ClientHello too large");
                    return Ok((buf, h, Vec::new()));
                }
                (h, alpn) => return Ok((buf, h, alpn)),
            }
        }
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no ClientHello in time"))?
}

fn normalize(h: &str) -> String {
    airlock_policy::normalize_host(
        h.strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(h),
    )
}

fn make_target(host: &str, port: u16) -> Target {
    let h = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    };
    Target {
        host: host.to_string(),
        port,
        authority: if port == 443 {
            h
        } else {
            format!("{h}:{port}")
        },
    }
}

fn base_event(egress: &Egress, path: &str, method: &str, t: &Target) -> Event {
    Event {
        time: now_rfc3339(),
        sandbox: egress.sandbox.clone(),
        path: path.into(),
        method: method.into(),
        host: t.host.clone(),
        port: t.port,
        addr: None,
        action: "allow".into(),
        rule: String::new(),
        reason: String::new(),
        bytes_up: 0,
        bytes_down: 0,
    }
}

fn block_event(egress: &Egress, path: &str, t: &Target, rule: &str, reason: String) -> Event {
    let mut ev = base_event(egress, path, "CONNECT", t);
    ev.action = "block".into();
    ev.rule = rule.into();
    ev.reason = reason;
    ev
}

fn decision_event(
    egress: &Egress,
    path: &str,
    t: &Target,
    d: &Decision,
    addr: Option<IpAddr>,
) -> Event {
    let mut ev = base_event(egress, path, "CONNECT", t);
    ev.action = d.action_str().into();
    ev.rule = d.rule().into();
    ev.reason = d.reason().into();
    ev.addr = addr.map(|a| a.to_string());
    ev
}

/// The TLS session: check SNI, decide, then terminate or tunnel.
async fn intercept<IO>(
    egress: Arc<Egress>,
    io: Prefixed<IO>,
    connect: &Target,
    (sni, alpn): (Option<String>, Vec<Vec<u8>>),
    dialed: Option<Dialed>,
    path: &'static str,
    pin: Option<IpAddr>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let t = match (&sni, pin) {
        (Some(s), Some(_)) => make_target(&normalize(s), connect.port),
        _ => connect.clone(),
    };
    if let (Some(s), None) = (&sni, pin) {
        if normalize(s) != connect.host {
            let reason = format!("domain fronting: SNI {s} ≠ CONNECT {}", connect.host);
            egress.record(block_event(
                &egress,
                path,
                connect,
                "domain-fronting",
                reason,
            ));
            return;
        }
    }
    let policy = egress.policy();
    let by_name = policy.decide(&PolicyRequest {
        host: &t.host,
        port: t.port,
        addr: None,
    });
    if !by_name.is_allowed() {
        egress.record(decision_event(&egress, path, &t, &by_name, t.ip()));
        return;
    }
    let tls = match egress.tls.clone() {
        Some(tls) if !by_name.is_bypass() => tls,
        _ => return tunnel_prefixed(egress, io, t, by_name, dialed, path, pin).await,
    };
    let server = match tls.ca.server_config(&t.host) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("{t}: cannot mint a certificate: {e}");
            return;
        }
    };
    // Mirror the protocol: connect upstream first, offering what the client offered, and
    // give the client what the upstream chose (h1 ↔ h1 and h2 ↔ h2 need no translation).
    let client_h2 = alpn.iter().any(|p| p == b"h2");
    let session = Arc::new(Session {
        egress: egress.clone(),
        connector: if client_h2 {
            tls.connector.clone()
        } else {
            tls.connector_h1.clone()
        },
        target: t.clone(),
        path,
        dialed: Mutex::new(dialed),
        pin,
        pool: tls.pool((
            egress.sandbox.clone(),
            t.host.clone(),
            t.port,
            pin,
            client_h2,
        )),
        connecting: tokio::sync::Mutex::new(()),
    });
    let first = session.upstream(&by_name).await;
    // An unused pre-dialed connection (a pooled one served) would only go stale.
    drop(
        session
            .dialed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take(),
    );
    let server = match first {
        Ok(conn) => {
            let h2 = matches!(conn.sender, Sender::H2(_));
            if let Sender::H1(s) = conn.sender {
                session.give_back(s, conn.addr, conn.decision);
            }
            let proto: &[u8] = if h2 { b"h2" } else { b"http/1.1" };
            if alpn.is_empty() || alpn.iter().any(|p| p == proto) {
                let mut cfg = (*server).clone();
                cfg.alpn_protocols = vec![proto.to_vec()];
                Arc::new(cfg)
            } else {
                server
            }
        }
        // Requests will retry and answer 502 with the reason.
        Err(_) => server,
    };
    let accepted = tokio::time::timeout(
        egress.limits.head_timeout,
        TlsAcceptor::from(server).accept(io),
    )
    .await;
    let stream = match accepted {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            // Usually a client that does not trust the airlock CA: worth an event.
            let mut ev = decision_event(&egress, path, &t, &by_name, None);
            ev.reason = format!("{}; client TLS handshake failed: {e}", by_name.reason());
            egress.record(ev);
            return;
        }
        Err(_) => {
            tracing::debug!("{t}: client TLS handshake timed out");
            return;
        }
    };
    let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
    let svc = hyper::service::service_fn(move |req| {
        let s = session.clone();
        async move { Ok::<_, Infallible>(s.handle(req).await) }
    });
    let io = TokioIo::new(stream);
    let res = if h2 {
        hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .serve_connection(io, svc)
            .await
    } else {
        let limits = &egress.limits;
        hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.head_timeout)
            .max_buf_size(limits.max_head.max(8192) + 16 * 1024)
            .serve_connection(io, svc)
            .await
    };
    if let Err(e) = res {
        tracing::debug!("terminated connection: {e}");
    }
}

/// No termination (bypass, or none configured): dial the checked address and splice.
async fn tunnel_prefixed<IO>(
    egress: Arc<Egress>,
    mut io: Prefixed<IO>,
    t: Target,
    by_name: Decision,
    dialed: Option<Dialed>,
    path: &'static str,
    pin: Option<IpAddr>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let dialed = match dialed {
        Some(d) => d,
        None => match dial_target(&egress, &t, &by_name, pin).await {
            Ok(d) => d,
            Err(DialError::Blocked(d, a)) => {
                egress.record(decision_event(&egress, path, &t, &d, a));
                return;
            }
            Err(DialError::Failed {
                decision,
                addr,
                why,
            }) => {
                let mut ev = decision_event(&egress, path, &t, &decision, addr);
                ev.reason = format!("{}; upstream error: {why}", decision.reason());
                egress.record(ev);
                return;
            }
        },
    };
    let counters = Arc::new(Counters::default());
    let _guard = EventGuard {
        egress: egress.clone(),
        event: Some(Box::new(decision_event(
            &egress,
            path,
            &t,
            &dialed.decision,
            Some(dialed.addr),
        ))),
        counters: counters.clone(),
    };
    let mut upstream = dialed.stream;
    match tokio::io::copy_bidirectional_with_sizes(
        &mut io,
        &mut upstream,
        egress.limits.tunnel_buf,
        egress.limits.tunnel_buf,
    )
    .await
    {
        Ok((up, down)) => {
            add(&counters.up, up as usize);
            add(&counters.down, down as usize);
        }
        Err(e) => tracing::debug!("tunnel {t}: {e}"),
    }
}

/// Dial `t` at an address the policy allows: the pinned one (transparent flow to an
/// address), else resolve → classify → dial.
async fn dial_target(
    egress: &Egress,
    t: &Target,
    by_name: &Decision,
    pin: Option<IpAddr>,
) -> Result<Dialed, DialError> {
    let Some(ip) = pin else {
        let (stream, addr, decision) = egress.dial(&egress.policy(), t, by_name).await?;
        return Ok(Dialed {
            stream,
            addr,
            decision,
        });
    };
    let d = egress.policy().decide(&PolicyRequest {
        host: &t.host,
        port: t.port,
        addr: Some(ip),
    });
    if !d.is_allowed() {
        return Err(DialError::Blocked(d, Some(ip)));
    }
    let sa = std::net::SocketAddr::new(ip, t.port);
    match tokio::time::timeout(egress.limits.connect_timeout, TcpStream::connect(sa)).await {
        Ok(Ok(stream)) => {
            let _ = stream.set_nodelay(true);
            Ok(Dialed {
                stream,
                addr: ip,
                decision: d,
            })
        }
        Ok(Err(e)) => Err(DialError::Failed {
            decision: d,
            addr: Some(ip),
            why: format!("connect {sa}: {e}"),
        }),
        Err(_) => Err(DialError::Failed {
            decision: d,
            addr: Some(ip),
            why: format!("connect {sa}: connect timed out"),
        }),
    }
}

enum Sender {
    H1(http1::SendRequest<ReqBody>),
    H2(http2::SendRequest<ReqBody>),
}

/// An upstream connection and how the policy decided its address.
struct Conn {
    sender: Sender,
    addr: IpAddr,
    decision: Decision,
    /// Taken from the pool (it may have been closed by the upstream meanwhile).
    reused: bool,
}

#[derive(Default)]
struct Pool {
    h2: Option<(http2::SendRequest<ReqBody>, IpAddr, Decision)>,
    idle_h1: Vec<(http1::SendRequest<ReqBody>, IpAddr, Decision)>,
}

/// Most idle HTTP/1.1 upstream connections kept per destination.
const MAX_IDLE_H1: usize = 64;

/// One terminated client connection.
struct Session {
    egress: Arc<Egress>,
    /// Upstream TLS, offering ALPN according to what the client offered.
    connector: TlsConnector,
    /// The SNI host (or CONNECT host without SNI) and port.
    target: Target,
    path: &'static str,
    /// The connection dialed for the CONNECT, used for the first upstream.
    dialed: Mutex<Option<Dialed>>,
    /// Transparent flow known by address only: upstreams go to this address.
    pin: Option<IpAddr>,
    pool: Arc<Mutex<Pool>>,
    /// Serializes dialing so concurrent HTTP/2 streams share one new upstream.
    connecting: tokio::sync::Mutex<()>,
}

/// Why a request was refused before it went upstream.
struct Refusal {
    status: StatusCode,
    rule: String,
    reason: String,
    addr: Option<IpAddr>,
    action: &'static str,
}

impl Session {
    fn event(&self, method: &Method, addr: Option<IpAddr>) -> Event {
        let mut ev = base_event(&self.egress, self.path, method.as_str(), &self.target);
        ev.addr = addr.map(|a| a.to_string());
        ev
    }

    fn refuse(&self, method: &Method, r: Refusal) -> Response<MitmBody> {
        let mut ev = self.event(method, r.addr);
        ev.action = r.action.into();
        ev.rule = r.rule.clone();
        ev.reason = r.reason.clone();
        self.egress.record(ev);
        let block = (r.action == "block").then_some(r.rule.as_str());
        let verb = if r.status == StatusCode::BAD_GATEWAY {
            "could not reach"
        } else {
            "blocked"
        };
        MitmBody::wrap(
            text_response(
                r.status,
                format!("airlock: {verb} {}: {}\n", self.target, r.reason),
                block,
            ),
            None,
        )
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<MitmBody> {
        let method = req.method().clone();
        match self.check(&req) {
            Ok(()) => {}
            Err(r) => return self.refuse(&method, r),
        }
        let policy = self.egress.policy();
        let by_name = policy.decide(&PolicyRequest {
            host: &self.target.host,
            port: self.target.port,
            addr: None,
        });
        if !by_name.is_allowed() {
            return self.refuse(
                &method,
                Refusal {
                    status: StatusCode::FORBIDDEN,
                    rule: by_name.rule().into(),
                    reason: by_name.reason().into(),
                    addr: self.target.ip(),
                    action: "block",
                },
            );
        }
        let (mut parts, body) = req.into_parts();
        let client_version = parts.version;
        // `te: trailers` is the one TE value HTTP/2 allows (gRPC needs it); keep it for h2.
        let te_trailers = parts
            .headers
            .get(header::TE)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
        strip_hop_by_hop(&mut parts.headers);
        parts.headers.remove(header::EXPECT);
        parts.headers.remove(header::HOST);
        parts.extensions = http::Extensions::new();

        // Credentials: inject for provider hosts; a placeholder anywhere else is refused.
        let mut injected = None;
        if let Some(creds) = &self.egress.credentials {
            let inj = creds.for_host(&self.target.host);
            if let Some(inj) = inj {
                let name = HeaderName::from_bytes(inj.header.as_bytes());
                let value = HeaderValue::from_str(inj.value);
                if let (Ok(name), Ok(mut value)) = (name, value) {
                    // Other headers carrying this provider's own placeholder (e.g. an
                    // `authorization` next to `x-api-key`) are dropped, not refused.
                    let own = inj.placeholder.as_bytes();
                    let stale: Vec<HeaderName> = parts
                        .headers
                        .iter()
                        .filter(|(n, v)| {
                            !own.is_empty()
                                && **n != name
                                && v.as_bytes().windows(own.len()).any(|w| w == own)
                        })
                        .map(|(n, _)| n.clone())
                        .collect();
                    for n in stale {
                        parts.headers.remove(n);
                    }
                    value.set_sensitive(true);
                    parts.headers.insert(name, value);
                    injected = Some((inj.provider.to_string(), inj.header.to_string()));
                }
            }
            let leak_header = parts.headers.iter().find(|(n, v)| {
                injected.as_ref().map(|(_, h)| h.as_str()) != Some(n.as_str())
                    && creds.contains_placeholder(v.as_bytes())
            });
            let leak = leak_header.map(|(n, _)| format!("header {n}")).or_else(|| {
                creds
                    .contains_placeholder(parts.uri.to_string().as_bytes())
                    .then(|| "URL".to_string())
            });
            if let Some(where_) = leak {
                let reason = if injected.is_some() {
                    format!("credential placeholder for another provider in {where_}")
                } else {
                    format!("credential placeholder sent to non-provider host (in {where_})")
                };
                return self.refuse(
                    &method,
                    Refusal {
                        status: StatusCode::FORBIDDEN,
                        rule: "credential-placeholder".into(),
                        reason,
                        addr: None,
                        action: "block",
                    },
                );
            }
        }

        let counters = Arc::new(Counters::default());
        let req = Request::from_parts(
            parts,
            ReqBody {
                inner: body,
                counters: counters.clone(),
            },
        );
        let (resp, give_back, addr, decision) = match self.send(req, &by_name, te_trailers).await {
            Ok(x) => x,
            Err(r) => return self.refuse(&method, r),
        };
        let mut ev = self.event(&method, Some(addr));
        ev.action = decision.action_str().into();
        ev.rule = decision.rule().into();
        ev.reason = match &injected {
            Some((p, _)) => format!("{}; credential injected: {p}", decision.reason()),
            None => decision.reason().into(),
        };
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        parts.version = client_version;
        parts.extensions = http::Extensions::new();
        let guard = EventGuard {
            egress: self.egress.clone(),
            event: Some(Box::new(ev)),
            counters,
        };
        let body = ProxyBody::Stream {
            inner: body,
            guard: Some(guard),
        };
        MitmBody::wrap(
            Response::from_parts(parts, body),
            give_back.map(|g| (self.clone(), g)),
        )
    }

    /// Send upstream: on a pooled connection, or a fresh one if the pooled one turns out
    /// to be closed before the request went out.
    async fn send(
        &self,
        mut req: Request<ReqBody>,
        by_name: &Decision,
        te_trailers: bool,
    ) -> Result<SendOk, Refusal> {
        let mut conn = self.upstream(by_name).await?;
        loop {
            let h2 = matches!(conn.sender, Sender::H2(_));
            req = self.adapt(req, h2, te_trailers).ok_or_else(|| Refusal {
                status: StatusCode::BAD_REQUEST,
                rule: "bad-request".into(),
                reason: "invalid request target".into(),
                addr: None,
                action: "block",
            })?;
            let (res, back) = match conn.sender {
                Sender::H2(mut s) => (s.try_send_request(req).await, None),
                Sender::H1(mut s) => {
                    let r = s.try_send_request(req).await;
                    (r, Some(s))
                }
            };
            match res {
                Ok(resp) => {
                    let back = back.map(|s| (s, conn.addr, conn.decision.clone()));
                    return Ok((resp, back, conn.addr, conn.decision));
                }
                Err(mut e) => match e.take_message() {
                    Some(r) if conn.reused => {
                        req = r; // never sent: a stale pooled connection; dial afresh
                        conn = self.connect_fresh(by_name).await?;
                    }
                    _ => {
                        let why = e.into_error().to_string();
                        return Err(self.failure(&conn.decision, Some(conn.addr), why));
                    }
                },
            }
        }
    }

    /// Shape a request for the upstream's protocol: absolute URI for h2, origin-form and
    /// Host for HTTP/1.1.
    fn adapt(&self, req: Request<ReqBody>, h2: bool, te: bool) -> Option<Request<ReqBody>> {
        let (mut parts, body) = req.into_parts();
        let pq = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/")
            .to_string();
        parts.headers.remove(header::HOST);
        if h2 {
            parts.version = Version::HTTP_2;
            if te {
                parts
                    .headers
                    .insert(header::TE, HeaderValue::from_static("trailers"));
            }
            parts.uri = format!("https://{}{pq}", self.target.authority)
                .parse()
                .ok()?;
        } else {
            parts.version = Version::HTTP_11;
            parts.headers.remove(header::TE);
            parts.uri = pq.parse().ok()?;
            let host = HeaderValue::from_str(&self.target.authority).ok()?;
            parts.headers.insert(header::HOST, host);
        }
        Some(Request::from_parts(parts, body))
    }

    /// The request must be for the SNI host (domain fronting otherwise).
    fn check(&self, req: &Request<Incoming>) -> Result<(), Refusal> {
        let authority = req
            .uri()
            .authority()
            .map(|a| a.as_str().to_string())
            .or_else(|| {
                req.headers()
                    .get(header::HOST)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string)
            });
        let Some(authority) = authority else {
            return Err(Refusal {
                status: StatusCode::BAD_REQUEST,
                rule: "bad-request".into(),
                reason: "request has no Host".into(),
                addr: None,
                action: "block",
            });
        };
        let host = match crate::target::parse_authority(&authority, Some(self.target.port)) {
            Ok(t) => t.host,
            Err(_) => normalize(&authority),
        };
        if host != self.target.host {
            return Err(Refusal {
                status: StatusCode::MISDIRECTED_REQUEST,
                rule: "domain-fronting".into(),
                reason: format!("domain fronting: Host {host} ≠ SNI {}", self.target.host),
                addr: None,
                action: "block",
            });
        }
        Ok(())
    }

    /// An upstream connection: pooled if the policy still decides its address the same
    /// way, else the CONNECT's pre-dialed one, else a new one (resolve → classify → dial).
    async fn upstream(&self, by_name: &Decision) -> Result<Conn, Refusal> {
        if let Some(c) = self.pooled().await {
            return Ok(c);
        }
        let _one = self.connecting.lock().await;
        if let Some(c) = self.pooled().await {
            return Ok(c);
        }
        self.connect_fresh(by_name).await
    }

    /// A new upstream connection: the CONNECT's pre-dialed one, else resolve → classify →
    /// dial (or the pinned address); then TLS and the HTTP handshake.
    async fn connect_fresh(&self, by_name: &Decision) -> Result<Conn, Refusal> {
        let t = &self.target;
        let pre = self.dialed.lock().unwrap_or_else(|e| e.into_inner()).take();
        let dialed = match pre {
            Some(d) => d,
            None => match dial_target(&self.egress, t, by_name, self.pin).await {
                Ok(d) => d,
                Err(DialError::Blocked(d, a)) => {
                    return Err(Refusal {
                        status: StatusCode::FORBIDDEN,
                        rule: d.rule().into(),
                        reason: d.reason().into(),
                        addr: a,
                        action: "block",
                    })
                }
                Err(DialError::Failed {
                    decision,
                    addr,
                    why,
                }) => return Err(self.failure(&decision, addr, why)),
            },
        };
        let name = match ServerName::try_from(t.host.clone()) {
            Ok(n) => n,
            Err(_) => {
                let why = format!("invalid TLS server name {}", t.host);
                return Err(self.failure(&dialed.decision, Some(dialed.addr), why));
            }
        };
        let tls = match tokio::time::timeout(
            self.egress.limits.connect_timeout,
            self.connector.connect(name, dialed.stream),
        )
        .await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                let why = format!("upstream TLS: {e}");
                return Err(self.failure(&dialed.decision, Some(dialed.addr), why));
            }
            Err(_) => {
                let why = "upstream TLS handshake timed out".to_string();
                return Err(self.failure(&dialed.decision, Some(dialed.addr), why));
            }
        };
        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
        let io = TokioIo::new(tls);
        let (addr, decision) = (dialed.addr, dialed.decision);
        if h2 {
            let r = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .handshake::<_, ReqBody>(io)
                .await;
            let (sender, conn) =
                r.map_err(|e| self.failure(&decision, Some(addr), e.to_string()))?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!("upstream h2 connection: {e}");
                }
            });
            self.pool.lock().unwrap_or_else(|e| e.into_inner()).h2 =
                Some((sender.clone(), addr, decision.clone()));
            Ok(Conn {
                sender: Sender::H2(sender),
                addr,
                decision,
                reused: false,
            })
        } else {
            let r = http1::Builder::new().handshake::<_, ReqBody>(io).await;
            let (sender, conn) =
                r.map_err(|e| self.failure(&decision, Some(addr), e.to_string()))?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!("upstream h1 connection: {e}");
                }
            });
            Ok(Conn {
                sender: Sender::H1(sender),
                addr,
                decision,
                reused: false,
            })
        }
    }

    fn failure(&self, d: &Decision, addr: Option<IpAddr>, why: String) -> Refusal {
        Refusal {
            status: StatusCode::BAD_GATEWAY,
            rule: d.rule().into(),
            reason: format!("{}; upstream error: {why}", d.reason()),
            addr,
            action: d.action_str(),
        }
    }

    /// A pooled connection whose address the current policy still allows by the same rule.
    async fn pooled(&self) -> Option<Conn> {
        let policy = self.egress.policy();
        let same = |addr: IpAddr, d: &Decision| {
            let now = policy.decide(&PolicyRequest {
                host: &self.target.host,
                port: self.target.port,
                addr: Some(addr),
            });
            now.is_allowed() && now.rule() == d.rule() && now.is_bypass() == d.is_bypass()
        };
        let idle = {
            let mut p = self.pool.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((s, a, d)) = &p.h2 {
                if !s.is_closed() && same(*a, d) {
                    return Some(Conn {
                        sender: Sender::H2(s.clone()),
                        addr: *a,
                        decision: d.clone(),
                        reused: true,
                    });
                }
                p.h2 = None;
            }
            p.idle_h1.pop()
        };
        let (mut s, a, d) = idle?;
        if s.is_closed() || !same(a, &d) {
            return None;
        }
        // The previous response was read to its end, so a live connection is ready at
        // once; bounded in case it is not.
        match tokio::time::timeout(crate::proxy::REUSE_WAIT, s.ready()).await {
            Ok(Ok(())) => Some(Conn {
                sender: Sender::H1(s),
                addr: a,
                decision: d,
                reused: true,
            }),
            _ => None,
        }
    }

    fn give_back(&self, s: http1::SendRequest<ReqBody>, addr: IpAddr, d: Decision) {
        let mut p = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        if p.idle_h1.len() < MAX_IDLE_H1 && !s.is_closed() {
            p.idle_h1.push((s, addr, d));
        }
    }
}

/// Response, the HTTP/1.1 sender to return to the pool after the body, address, decision.
type SendOk = (
    Response<Incoming>,
    Option<(http1::SendRequest<ReqBody>, IpAddr, Decision)>,
    IpAddr,
    Decision,
);

type GiveBack = (
    Arc<Session>,
    (http1::SendRequest<ReqBody>, IpAddr, Decision),
);

/// The response body; returns an HTTP/1.1 upstream connection to the pool when the body
/// has been read to its end.
struct MitmBody {
    inner: ProxyBody,
    ended: bool,
    give_back: Option<GiveBack>,
}

impl MitmBody {
    fn wrap(resp: Response<ProxyBody>, give_back: Option<GiveBack>) -> Response<MitmBody> {
        resp.map(|inner| MitmBody {
            inner,
            ended: false,
            give_back,
        })
    }
}

impl Drop for MitmBody {
    fn drop(&mut self) {
        if self.ended || self.inner.is_end_stream() {
            if let Some((session, (s, a, d))) = self.give_back.take() {
                session.give_back(s, a, d);
            }
        }
    }
}

impl Body for MitmBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(None) = r {
            self.ended = true;
        }
        r
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A stream whose first bytes were already read: replays them, then reads on.
pub(crate) struct Prefixed<IO> {
    prefix: Vec<u8>,
    pos: usize,
    io: IO,
}

impl<IO> Prefixed<IO> {
    pub(crate) fn new(prefix: Vec<u8>, io: IO) -> Self {
        Prefixed { prefix, pos: 0, io }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Prefixed<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.pos < self.prefix.len() {
            let n = (self.prefix.len() - self.pos).min(buf.remaining());
            let start = self.pos;
            buf.put_slice(&self.prefix[start..start + n]);
            self.pos += n;
            if self.pos == self.prefix.len() {
                self.prefix = Vec::new();
                self.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Prefixed<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, data)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn prefixed_replays_then_reads() {
        let (a, mut b) = tokio::io::duplex(64);
        let mut p = Prefixed::new(b"hello ".to_vec(), a);
        b.write_all(b"world").await.unwrap();
        drop(b);
        let mut out = String::new();
        p.read_to_string(&mut out).await.unwrap();
        assert_eq!(out, "hello world");
    }

    #[test]
    fn targets() {
        assert_eq!(make_target("example.com", 443).authority, "example.com");
        assert_eq!(make_target("::1", 8443).authority, "[::1]:8443");
        assert_eq!(normalize("[::1]"), "::1");
        assert_eq!(normalize("Example.COM."), "example.com");
    }
}
