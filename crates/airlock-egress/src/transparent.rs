//! The transparent path: TCP flows the sandbox opened to *any* address, captured by the
//! user-space network stack and handed here with their original destination.
//!
//! - To the explicit proxy (`10.0.2.2:3128`, [`EXPLICIT_PROXY`]) → the proxy protocol.
//! - To port 53 (any address) → DNS over TCP, answered like UDP by [`crate::dns`].
//! - To the gateway on another port (`10.0.2.2:PORT`) → the host's loopback service,
//!   policed as `localhost:PORT`, dialed at `127.0.0.1:PORT`.
//! - HTTP (sniffed: a request line in the first bytes) → every request is policed by its
//!   Host header and forwarded to the original destination address.
//! - TLS (a ClientHello) → policed by SNI, then tunnelled to the original destination
//!   address (or terminated, when the engine terminates TLS). No SNI (or an IP-literal
//!   Host/SNI) → the address is decided as the explicit proxy decides an IP-literal
//!   target (the mode applies).
//! - Anything else → by address only: allowed only by an `IP:PORT` host rule or a CIDR
//!   rule (DESIGN §3: "other TCP is blocked unless an IP:PORT/CIDR rule allows it"); the
//!   mode alone never allows it.
//!
//! Pinning: for a name (Host/SNI), the destination address must be one that airlock's DNS
//! gave the sandbox for that name ([`crate::dns::Pins`]), unless a CIDR rule allows the
//! address itself. Otherwise the flow is blocked with "destination not from airlock DNS
//! for NAME". The address dialed is always the original destination the policy checked:
//! the name is never resolved again here.
//!
//! Sniffing waits for the client's first bytes: up to the head timeout on ports 80/443,
//! [`SNIFF_OTHER_PORTS`] elsewhere (server-speaks-first protocols such as SSH then go
//! straight to the address check).

use std::convert::Infallible;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use airlock_policy::{Decision, Event, Request as PolicyRequest};
use airlock_tls::sni::{parse_client_hello, Hello, MAX_HELLO};
use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::body::{Counters, EventGuard, ProxyBody, ReqBody};
use crate::target::parse_authority;
use crate::{now_rfc3339, Egress};

/// The explicit proxy as the sandbox sees it (`airlock_netstack::GATEWAY:PROXY_PORT`).
pub const EXPLICIT_PROXY: SocketAddr =
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 2, 2)), 3128);
/// How long to wait for a client's first bytes on ports other than 80 and 443.
pub const SNIFF_OTHER_PORTS: Duration = Duration::from_millis(300);
const PATH: &str = "transparent";

/// What the first bytes of a flow look like.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Sniffed {
    Http,
    Tls(Option<String>),
    Other,
}

const METHODS: &[&[u8]] = &[
    b"GET ",
    b"HEAD ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"OPTIONS ",
    b"PATCH ",
    b"TRACE ",
    b"CONNECT ",
];

/// `None` = need more bytes.
fn classify(buf: &[u8]) -> Option<Sniffed> {
    if buf.is_empty() {
        return None;
    }
    if buf[0] == 0x16 {
        return match parse_client_hello(buf) {
            Hello::NeedMore if buf.len() < MAX_HELLO + 4096 => None,
            Hello::ClientHello { sni } => Some(Sniffed::Tls(sni)),
            _ => Some(Sniffed::Other),
        };
    }
    for m in METHODS {
        let n = m.len().min(buf.len());
        if buf[..n] == m[..n] {
            return if buf.len() >= m.len() {
                Some(Sniffed::Http)
            } else {
                None
            };
        }
    }
    Some(Sniffed::Other)
}

/// A stream with bytes already read from it put back in front.
pub(crate) struct PrefixedIo<IO> {
    prefix: Vec<u8>,
    pos: usize,
    io: IO,
}

impl<IO: AsyncRead + Unpin> AsyncRead for PrefixedIo<IO> {
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
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for PrefixedIo<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The result of policing one flow (or one HTTP request).
struct Checked {
    /// Where to connect.
    dial: SocketAddr,
    decision: Decision,
    /// Host for the event (name, IP literal or `localhost`).
    host: String,
}

fn is_gateway(ip: IpAddr) -> bool {
    ip == EXPLICIT_PROXY.ip()
}

impl Egress {
    /// Serve one captured TCP flow whose original destination is `orig_dst` (see the
    /// module docs). Returns when the flow ends.
    pub async fn serve_transparent<IO>(self: Arc<Self>, io: IO, orig_dst: SocketAddr)
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        self.serve_transparent_with(io, orig_dst, EXPLICIT_PROXY)
            .await
    }

    /// [`Egress::serve_transparent`] with another address for the explicit proxy.
    pub async fn serve_transparent_with<IO>(
        self: Arc<Self>,
        mut io: IO,
        orig_dst: SocketAddr,
        explicit_proxy: SocketAddr,
    ) where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        if orig_dst == explicit_proxy {
            return self.serve_connection(io).await;
        }
        if orig_dst.port() == 53 {
            // DNS over TCP (clients use it after a truncated answer, or by choice): the
            // same resolver as UDP, whatever the address.
            return self.serve_dns_tcp(io).await;
        }
        let wait = if matches!(orig_dst.port(), 80 | 443) {
            self.limits.head_timeout
        } else {
            SNIFF_OTHER_PORTS
        };
        let mut buf = Vec::with_capacity(4096);
        let deadline = tokio::time::Instant::now() + wait;
        let kind = loop {
            if let Some(k) = classify(&buf) {
                break k;
            }
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout_at(deadline, io.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) => {
                    if buf.is_empty() {
                        return; // closed without a byte: nothing was attempted
                    }
                    break Sniffed::Other;
                }
                Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
                Err(_) => break Sniffed::Other,
            }
        };
        let io = PrefixedIo {
            prefix: buf,
            pos: 0,
            io,
        };
        match kind {
            Sniffed::Http => self.transparent_http(io, orig_dst).await,
            Sniffed::Tls(sni) => self.transparent_tls(io, orig_dst, sni).await,
            Sniffed::Other => {
                let (host, d) = self.check_addr(orig_dst, true);
                let method = "TCP";
                match d {
                    Ok(c) => self.tunnel_checked(io, orig_dst, c, method).await,
                    Err(d) => self.record(self.t_event(method, &host, orig_dst, &d, None)),
                }
            }
        }
    }

    /// Record a packet the network stack dropped (other UDP, ICMP, IPv6, ...) as a
    /// `block` event on the transparent path: `proto` goes into `method` (`"udp"`,
    /// `"icmp"`, `"ipv6"`), the destination into host/port/addr.
    pub fn record_dropped(&self, proto: &str, dst: Option<SocketAddr>, reason: &str) {
        self.record(Event {
            time: now_rfc3339(),
            sandbox: self.sandbox.clone(),
            path: PATH.into(),
            method: proto.into(),
            host: dst.map(|d| d.ip().to_string()).unwrap_or_default(),
            port: dst.map_or(0, |d| d.port()),
            addr: dst.map(|d| d.ip().to_string()),
            action: "block".into(),
            rule: format!("transparent:{proto}"),
            reason: reason.into(),
            bytes_up: 0,
            bytes_down: 0,
        });
    }

    /// DNS over TCP: 2-byte length-prefixed messages, answered by [`Egress::answer_dns`].
    async fn serve_dns_tcp<IO>(&self, mut io: IO)
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        use tokio::io::AsyncWriteExt;
        loop {
            let mut len = [0u8; 2];
            let read = tokio::time::timeout(self.limits.head_timeout, io.read_exact(&mut len));
            if !matches!(read.await, Ok(Ok(_))) {
                return;
            }
            let mut q = vec![0u8; u16::from_be_bytes(len) as usize];
            let read = tokio::time::timeout(self.limits.head_timeout, io.read_exact(&mut q));
            if !matches!(read.await, Ok(Ok(_))) {
                return;
            }
            let Some(a) = self.answer_dns(&q).await else {
                return;
            };
            let Ok(n) = u16::try_from(a.len()) else {
                return;
            };
            if io.write_all(&n.to_be_bytes()).await.is_err() || io.write_all(&a).await.is_err() {
                return;
            }
        }
    }

    fn t_event(
        &self,
        method: &str,
        host: &str,
        orig_dst: SocketAddr,
        d: &Decision,
        reason: Option<String>,
    ) -> Event {
        // The gateway's ports are policed as localhost:PORT, whatever name was used.
        let host = if is_gateway(orig_dst.ip()) {
            "localhost"
        } else {
            host
        };
        Event {
            time: now_rfc3339(),
            sandbox: self.sandbox.clone(),
            path: PATH.into(),
            method: method.into(),
            host: host.into(),
            port: orig_dst.port(),
            addr: Some(orig_dst.ip().to_string()),
            action: d.action_str().into(),
            rule: d.rule().into(),
            reason: reason.unwrap_or_else(|| d.reason().to_string()),
            bytes_up: 0,
            bytes_down: 0,
        }
    }

    /// Police a flow by its address only. For raw TCP (`ip_rule_only`) the mode alone
    /// never allows it; HTTP/TLS addressed by IP (IP-literal Host/SNI, no SNI) are decided
    /// like the explicit proxy decides an IP-literal target.
    fn check_addr(
        &self,
        orig_dst: SocketAddr,
        ip_rule_only: bool,
    ) -> (String, Result<Checked, Decision>) {
        let policy = self.policy();
        let port = orig_dst.port();
        if is_gateway(orig_dst.ip()) {
            return ("localhost".into(), self.check_gateway(port));
        }
        let ip = orig_dst.ip().to_canonical();
        let host = ip.to_string();
        let d = policy.decide(&PolicyRequest {
            host: &host,
            port,
            addr: Some(ip),
        });
        let r = if !d.is_allowed() {
            Err(d)
        } else if ip_rule_only && d.rule().starts_with("mode:") {
            Err(Decision::Block {
                rule: "transparent:ip-only".into(),
                reason: format!(
                    "{ip}:{port}: TCP that is not HTTP or TLS with a name is allowed only by an \
                     IP:PORT or CIDR rule"
                ),
            })
        } else {
            Ok(Checked {
                dial: SocketAddr::new(ip, port),
                decision: d,
                host: host.clone(),
            })
        };
        (host, r)
    }

    /// `10.0.2.2:PORT` = the host's loopback service `localhost:PORT`.
    fn check_gateway(&self, port: u16) -> Result<Checked, Decision> {
        let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let d = self.policy().decide(&PolicyRequest {
            host: "localhost",
            port,
            addr: Some(lo),
        });
        if !d.is_allowed() {
            return Err(d);
        }
        Ok(Checked {
            dial: SocketAddr::new(lo, port),
            decision: d,
            host: "localhost".into(),
        })
    }

    /// Police a flow by the name it asked for (Host or SNI) at its original destination.
    fn check_name(&self, name: &str, orig_dst: SocketAddr) -> Result<Checked, Decision> {
        let port = orig_dst.port();
        if is_gateway(orig_dst.ip()) {
            return self.check_gateway(port);
        }
        let name = airlock_policy::normalize_host(name);
        let ip = orig_dst.ip().to_canonical();
        if let Ok(lit) = name.parse::<IpAddr>() {
            // An IP literal as the name: it must be the destination itself.
            if lit.to_canonical() != ip {
                return Err(Decision::Block {
                    rule: "transparent:mismatch".into(),
                    reason: format!("{name} is not the destination address {ip}"),
                });
            }
            return self.check_addr(orig_dst, false).1;
        }
        let policy = self.policy();
        let d = policy.decide(&PolicyRequest {
            host: &name,
            port,
            addr: Some(ip),
        });
        if !d.is_allowed() {
            return Err(d);
        }
        if !self.pins.is_pinned(&name, ip) {
            // Not an address our DNS gave for this name: only a CIDR rule for the
            // address itself can allow it.
            let by_ip = policy.decide(&PolicyRequest {
                host: &ip.to_string(),
                port,
                addr: Some(ip),
            });
            let cidr = by_ip.is_allowed()
                && (by_ip.rule().starts_with("allow-cidr")
                    || by_ip.rule().starts_with("bypass-cidr"));
            if !cidr {
                return Err(Decision::Block {
                    rule: "dns-pin".into(),
                    reason: format!("destination {ip} not from airlock DNS for {name}"),
                });
            }
            return Ok(Checked {
                dial: SocketAddr::new(ip, port),
                decision: by_ip,
                host: name,
            });
        }
        Ok(Checked {
            dial: SocketAddr::new(ip, port),
            decision: d,
            host: name,
        })
    }

    async fn dial_checked(&self, addr: SocketAddr) -> io::Result<TcpStream> {
        let s = tokio::time::timeout(self.limits.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
        let _ = s.set_nodelay(true);
        Ok(s)
    }

    /// Dial the checked address and copy both ways; one event at the end.
    async fn tunnel_checked<IO>(
        self: &Arc<Self>,
        mut io: IO,
        orig_dst: SocketAddr,
        c: Checked,
        method: &str,
    ) where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let mut upstream = match self.dial_checked(c.dial).await {
            Ok(s) => s,
            Err(e) => {
                let why = format!(
                    "{}; upstream error: connect {}: {e}",
                    c.decision.reason(),
                    c.dial
                );
                self.record(self.t_event(method, &c.host, orig_dst, &c.decision, Some(why)));
                return;
            }
        };
        let mut ev = self.t_event(method, &c.host, orig_dst, &c.decision, None);
        ev.addr = Some(c.dial.ip().to_string());
        let counters = Arc::new(Counters::default());
        let _guard = EventGuard {
            egress: self.clone(),
            event: Some(Box::new(ev)),
            counters: counters.clone(),
        };
        let buf = self.limits.tunnel_buf;
        let mut client = Counting {
            inner: &mut io,
            up: &counters.up,
        };
        match tokio::io::copy_bidirectional_with_sizes(&mut client, &mut upstream, buf, buf).await {
            Ok((_, down)) => {
                counters.down.fetch_add(down, Ordering::Relaxed);
            }
            Err(e) => tracing::debug!("transparent tunnel {}: {e}", c.dial),
        }
    }

    async fn transparent_tls<IO>(
        self: Arc<Self>,
        io: PrefixedIo<IO>,
        orig_dst: SocketAddr,
        sni: Option<String>,
    ) where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let method = "TLS";
        let (host, checked) = match &sni {
            Some(name) => (
                airlock_policy::normalize_host(name),
                self.check_name(name, orig_dst),
            ),
            None => self.check_addr(orig_dst, false),
        };
        let c = match checked {
            Ok(c) => c,
            Err(d) => return self.record(self.t_event(method, &host, orig_dst, &d, None)),
        };
        if self.tls.is_some() && !c.decision.is_bypass() {
            // Terminate (credentials, per-request Host = SNI checks): the TLS engine dials
            // the checked address only.
            let me = self.clone();
            let connect_host = c.dial.ip().to_string();
            return me
                .serve_tls_intercepted(io, &connect_host, c.dial.port(), PATH)
                .await;
        }
        self.tunnel_checked(io, orig_dst, c, method).await
    }

    async fn transparent_http<IO>(self: Arc<Self>, io: PrefixedIo<IO>, orig_dst: SocketAddr)
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let limits = self.limits.clone();
        let conn = Arc::new(HttpConn {
            egress: self.clone(),
            orig_dst,
            upstream: Mutex::new(None),
        });
        let svc = hyper::service::service_fn(move |req| {
            let conn = conn.clone();
            async move { Ok::<_, Infallible>(conn.handle(req).await) }
        });
        let mut b = hyper::server::conn::http1::Builder::new();
        b.timer(TokioTimer::new())
            .header_read_timeout(limits.head_timeout)
            .max_header_size(limits.max_head)
            .max_buf_size(limits.max_head.max(8192) + 16 * 1024);
        if let Err(e) = b.serve_connection(TokioIo::new(io), svc).await {
            tracing::debug!("transparent http {orig_dst}: {e}");
        }
    }
}

/// Counts bytes read from the client (= up).
struct Counting<'a, IO> {
    inner: &'a mut IO,
    up: &'a AtomicU64,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Counting<'_, IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut *self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            self.up
                .fetch_add((buf.filled().len() - before) as u64, Ordering::Relaxed);
        }
        r
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Counting<'_, IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}

/// One sniffed plain-HTTP client connection: each request is policed by its Host header;
/// all go to the flow's checked destination over one upstream connection.
struct HttpConn {
    egress: Arc<Egress>,
    orig_dst: SocketAddr,
    upstream: Mutex<Option<SendRequest<ReqBody>>>,
}

const HOP_BY_HOP: &[HeaderName] = &[
    header::CONNECTION,
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

fn strip_hop_by_hop(h: &mut http::HeaderMap) {
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in HOP_BY_HOP {
        h.remove(n);
    }
    h.remove("keep-alive");
    h.remove("proxy-connection");
}

fn text(status: StatusCode, body: String, block_rule: Option<&str>) -> Response<ProxyBody> {
    let len = body.len();
    let mut resp = Response::new(ProxyBody::text(body));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    if let Some(rule) = block_rule {
        if let Ok(v) = HeaderValue::from_str(rule) {
            h.insert("x-airlock-block", v);
        }
    }
    resp
}

impl HttpConn {
    async fn handle(&self, req: Request<Incoming>) -> Response<ProxyBody> {
        let eg = &self.egress;
        let method = req.method().as_str().to_string();
        let host_hdr = req
            .headers()
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        // Absolute-form (a client that thinks it talks to a proxy) names its target too.
        let named = req
            .uri()
            .authority()
            .map(|a| a.as_str().to_string())
            .or(host_hdr);
        let port = self.orig_dst.port();
        let target = named
            .as_deref()
            .map(|h| parse_authority(h.trim(), Some(port)));
        let (host, checked) = match target {
            Some(Ok(t)) => (t.host.clone(), eg.check_name(&t.host, self.orig_dst)),
            Some(Err(e)) => {
                let d = Decision::Block {
                    rule: "bad-request".into(),
                    reason: format!("bad Host: {e}"),
                };
                eg.record(eg.t_event(&method, "", self.orig_dst, &d, None));
                return text(
                    StatusCode::BAD_REQUEST,
                    format!("airlock: bad request: {e}\n"),
                    None,
                );
            }
            // HTTP/1.0 without Host: police by address.
            None => eg.check_addr(self.orig_dst, false),
        };
        let c = match checked {
            Ok(c) => c,
            Err(d) => {
                eg.record(eg.t_event(&method, &host, self.orig_dst, &d, None));
                let body = format!(
                    "airlock: blocked {host}:{port} by {}: {}\n",
                    d.rule(),
                    d.reason()
                );
                return text(StatusCode::FORBIDDEN, body, Some(d.rule()));
            }
        };

        let (mut parts, body) = req.into_parts();
        let pq = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "/".into());
        parts.uri = match Uri::builder()
            .path_and_query(if pq.starts_with('/') {
                pq.as_str()
            } else {
                "/"
            })
            .build()
        {
            Ok(u) => u,
            Err(_) => {
                return text(
                    StatusCode::BAD_REQUEST,
                    "airlock: bad request target\n".into(),
                    None,
                )
            }
        };
        parts.version = Version::HTTP_11;
        parts.extensions = http::Extensions::new();
        strip_hop_by_hop(&mut parts.headers);
        parts.headers.remove(header::EXPECT);
        if let Some(n) = &named {
            if let Ok(v) = HeaderValue::from_str(n) {
                parts.headers.insert(header::HOST, v);
            }
        }
        let counters = Arc::new(Counters::default());
        let up_req = Request::from_parts(
            parts,
            ReqBody {
                inner: body,
                counters: counters.clone(),
            },
        );
        let mut cached = self
            .upstream
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(s) = cached.as_mut() {
            // The previous response was read to its end: a live connection is ready at once.
            let ready = tokio::time::timeout(Duration::from_millis(500), s.ready()).await;
            if !matches!(ready, Ok(Ok(()))) {
                cached = None;
            }
        }
        let mut sender = match cached {
            Some(s) => s,
            None => {
                let stream = match eg.dial_checked(c.dial).await {
                    Ok(s) => s,
                    Err(e) => return self.failed(&method, &c, e.to_string()),
                };
                let (s, conn) = match hyper::client::conn::http1::Builder::new()
                    .handshake::<_, ReqBody>(TokioIo::new(stream))
                    .await
                {
                    Ok(x) => x,
                    Err(e) => return self.failed(&method, &c, e.to_string()),
                };
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!("transparent upstream: {e}");
                    }
                });
                s
            }
        };
        let resp = match sender.send_request(up_req).await {
            Ok(r) => r,
            Err(e) => return self.failed(&method, &c, e.to_string()),
        };
        *self.upstream.lock().unwrap_or_else(|e| e.into_inner()) = Some(sender);
        let mut ev = eg.t_event(&method, &c.host, self.orig_dst, &c.decision, None);
        ev.addr = Some(c.dial.ip().to_string());
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        parts.version = Version::HTTP_11;
        let reason = parts.extensions.remove::<hyper::ext::ReasonPhrase>();
        parts.extensions = http::Extensions::new();
        if let Some(r) = reason {
            parts.extensions.insert(r);
        }
        let guard = EventGuard {
            egress: eg.clone(),
            event: Some(Box::new(ev)),
            counters,
        };
        Response::from_parts(
            parts,
            ProxyBody::Stream {
                inner: body,
                guard: Some(guard),
            },
        )
    }

    fn failed(&self, method: &str, c: &Checked, why: String) -> Response<ProxyBody> {
        let eg = &self.egress;
        let reason = format!("{}; upstream error: {why}", c.decision.reason());
        eg.record(eg.t_event(method, &c.host, self.orig_dst, &c.decision, Some(reason)));
        text(
            StatusCode::BAD_GATEWAY,
            format!("airlock: could not reach {}: {why}\n", c.dial),
            None,
        )
    }
}

#[cfg(test)]
#[path = "transparent_tests.rs"]
mod tests;
