//! The per-connection HTTP/1.1 proxy: decide, resolve, decide each address, dial the
//! checked address, forward (keep-alive, streaming) or tunnel (CONNECT).

use std::convert::Infallible;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use airlock_policy::{Decision, Event, Policy, Request as PolicyRequest};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::upgrade::Upgraded;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

use crate::body::{Counters, EventGuard, ProxyBody, ReqBody};
use crate::splice;
use crate::target::{connect_target, http_target, Target, TargetError};
use crate::{now_rfc3339, Egress};

pub(crate) const REUSE_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

/// The upstream connection kept for the next request of the same client connection.
struct Upstream {
    host: String,
    port: u16,
    addr: SocketAddr,
    rule: String,
    bypass: bool,
    sender: SendRequest<ReqBody>,
}

struct Conn {
    egress: Arc<Egress>,
    upstream: Mutex<Option<Upstream>>,
}

pub(crate) async fn serve<S>(egress: Arc<Egress>, io: S)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = egress.limits.clone();
    let conn = Arc::new(Conn {
        egress: egress.clone(),
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
    if let Err(e) = b
        .serve_connection(TokioIo::new(io), svc)
        .with_upgrades()
        .await
    {
        // hyper has already answered 400/431 where it could. Parse errors are decisions
        // about a request (log them); timeouts and resets are not.
        if e.is_parse() || e.is_parse_too_large() {
            egress.record(bad_event(&egress, "", format!("bad request: {e}")));
        } else {
            tracing::debug!("egress connection: {e}");
        }
    }
}

fn bad_event(egress: &Egress, method: &str, reason: String) -> Event {
    Event {
        time: now_rfc3339(),
        sandbox: egress.sandbox.clone(),
        path: "proxy".into(),
        method: method.into(),
        host: String::new(),
        port: 0,
        addr: None,
        action: "block".into(),
        rule: "bad-request".into(),
        reason,
        bytes_up: 0,
        bytes_down: 0,
    }
}

/// Why we could not get an upstream connection.
pub(crate) enum DialError {
    Blocked(Decision, Option<IpAddr>),
    /// Allowed, but resolving or connecting failed.
    Failed {
        decision: Decision,
        addr: Option<IpAddr>,
        why: String,
    },
}

/// Headers that belong to one hop and are never forwarded.
const HOP_BY_HOP: &[HeaderName] = &[
    header::CONNECTION,
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

pub(crate) fn strip_hop_by_hop(h: &mut HeaderMap) {
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

impl Conn {
    fn event(&self, method: &Method, t: &Target, addr: Option<IpAddr>, d: &Decision) -> Event {
        Event {
            time: now_rfc3339(),
            sandbox: self.egress.sandbox.clone(),
            path: "proxy".into(),
            method: method.as_str().into(),
            host: t.host.clone(),
            port: t.port,
            addr: addr.map(|a| a.to_string()),
            action: d.action_str().into(),
            rule: d.rule().into(),
            reason: d.reason().into(),
            bytes_up: 0,
            bytes_down: 0,
        }
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<ProxyBody> {
        let method = req.method().clone();
        let target = if method == Method::CONNECT {
            connect_target(req.uri())
        } else {
            let host = req
                .headers()
                .get(header::HOST)
                .and_then(|v| v.to_str().ok());
            http_target(req.uri(), host)
        };
        let target = match target {
            Ok(t) => t,
            Err(e) => return self.bad_request(&method, e),
        };
        let policy = self.egress.policy();
        let by_name = policy.decide(&PolicyRequest {
            host: &target.host,
            port: target.port,
            addr: None,
        });
        if !by_name.is_allowed() {
            return self.blocked(&method, &target, by_name, target.ip());
        }
        if method == Method::CONNECT {
            self.connect(req, target, &policy).await
        } else {
            self.forward(req, target, &policy).await
        }
    }

    fn bad_request(&self, method: &Method, e: TargetError) -> Response<ProxyBody> {
        let reason = e.to_string();
        self.egress
            .record(bad_event(&self.egress, method.as_str(), reason.clone()));
        text_response(
            StatusCode::BAD_REQUEST,
            format!("airlock: bad request: {reason}\n"),
            None,
        )
    }

    fn blocked(
        &self,
        method: &Method,
        t: &Target,
        d: Decision,
        addr: Option<IpAddr>,
    ) -> Response<ProxyBody> {
        let body = format!("airlock: blocked {t} by {}: {}\n", d.rule(), d.reason());
        let rule = d.rule().to_string();
        self.egress.record(self.event(method, t, addr, &d));
        text_response(StatusCode::FORBIDDEN, body, Some(&rule))
    }

    fn failed(
        &self,
        method: &Method,
        t: &Target,
        d: &Decision,
        addr: Option<IpAddr>,
        why: String,
    ) -> Response<ProxyBody> {
        let mut ev = self.event(method, t, addr, d);
        ev.reason = format!("{}; upstream error: {why}", d.reason());
        self.egress.record(ev);
        text_response(
            StatusCode::BAD_GATEWAY,
            format!("airlock: could not reach {t}: {why}\n"),
            None,
        )
    }

    async fn connect(
        &self,
        mut req: Request<Incoming>,
        t: Target,
        policy: &Policy,
    ) -> Response<ProxyBody> {
        let method = Method::CONNECT;
        let by_name = policy.decide(&PolicyRequest {
            host: &t.host,
            port: t.port,
            addr: None,
        });
        let (upstream, addr, d) = match self.egress.dial(policy, &t, &by_name).await {
            Ok(x) => x,
            Err(DialError::Blocked(d, a)) => return self.blocked(&method, &t, d, a),
            Err(DialError::Failed {
                decision,
                addr,
                why,
            }) => return self.failed(&method, &t, &decision, addr, why),
        };
        let on_upgrade = hyper::upgrade::on(&mut req);
        let ev = self.event(&method, &t, Some(addr), &d);
        let egress = self.egress.clone();
        let buf = egress.limits.tunnel_buf;
        // TLS termination, unless the policy says bypass (certificate pinning).
        let intercept = egress.tls.is_some() && !d.is_bypass();
        tokio::spawn(async move {
            let counters = Arc::new(Counters::default());
            let mut guard = EventGuard {
                egress: egress.clone(),
                event: Some(Box::new(ev)),
                counters: counters.clone(),
            };
            match on_upgrade.await {
                Ok(up) if intercept => {
                    let dialed = crate::mitm::Dialed {
                        stream: upstream,
                        addr,
                        decision: d,
                    };
                    crate::mitm::after_connect(egress, up, t, dialed, &mut guard).await;
                }
                Ok(up) => {
                    if let Err(e) = tunnel(up, upstream, &counters, buf).await {
                        tracing::debug!("tunnel {t}: {e}");
                    }
                }
                Err(e) => tracing::debug!("CONNECT {t}: upgrade failed: {e}"),
            }
            drop(guard);
        });
        let mut resp = Response::new(ProxyBody::empty());
        resp.extensions_mut()
            .insert(hyper::ext::ReasonPhrase::from_static(
                b"Connection established",
            ));
        resp
    }

    async fn forward(
        &self,
        req: Request<Incoming>,
        t: Target,
        policy: &Policy,
    ) -> Response<ProxyBody> {
        let (mut parts, body) = req.into_parts();
        let method = parts.method.clone();
        // Plain HTTP never carries credentials: a placeholder here is a leak attempt.
        if let Some(creds) = &self.egress.credentials {
            let leak = parts
                .headers
                .iter()
                .find(|(_, v)| creds.contains_placeholder(v.as_bytes()))
                .map(|(n, _)| format!("header {n}"))
                .or_else(|| {
                    creds
                        .contains_placeholder(parts.uri.to_string().as_bytes())
                        .then(|| "URL".to_string())
                });
            if let Some(place) = leak {
                let d = Decision::Block {
                    rule: "credential-placeholder".into(),
                    reason: format!(
                        "credential placeholder sent to non-provider host (plain HTTP, in {place})"
                    ),
                };
                return self.blocked(&method, &t, d, None);
            }
        }
        // Upstream request: origin-form, HTTP/1.1, no hop-by-hop headers, Host = target.
        let pq = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        parts.uri = match Uri::builder()
            .path_and_query(if pq.starts_with('/') { pq } else { "/" })
            .build()
        {
            Ok(u) => u,
            Err(_) => return self.bad_request(&method, TargetError::BadHost(pq.to_string())),
        };
        parts.version = Version::HTTP_11;
        parts.extensions = http::Extensions::new();
        strip_hop_by_hop(&mut parts.headers);
        // We answer 100-continue to the client ourselves, when we start reading the body.
        parts.headers.remove(header::EXPECT);
        match HeaderValue::from_str(&t.authority) {
            Ok(v) => {
                parts.headers.insert(header::HOST, v);
            }
            Err(_) => return self.bad_request(&method, TargetError::BadHost(t.authority.clone())),
        }
        let counters = Arc::new(Counters::default());
        let up_req = Request::from_parts(
            parts,
            ReqBody {
                inner: body,
                counters: counters.clone(),
            },
        );

        // Reuse this client's previous upstream connection if it goes to the same place
        // and the (current) policy decides that address the same way.
        let cached = self
            .upstream
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let mut up_req = up_req;
        if let Some(mut u) = cached.filter(|u| u.host == t.host && u.port == t.port) {
            let d = policy.decide(&PolicyRequest {
                host: &t.host,
                port: t.port,
                addr: Some(u.addr.ip()),
            });
            let same = d.is_allowed() && d.rule() == u.rule && d.is_bypass() == u.bypass;
            // The previous response has been fully read, so a live connection is ready at
            // once and a closed one errors. Bounded in case neither happens promptly.
            if same
                && matches!(
                    tokio::time::timeout(REUSE_WAIT, u.sender.ready()).await,
                    Ok(Ok(()))
                )
            {
                match u.sender.try_send_request(up_req).await {
                    Ok(resp) => return self.respond(resp, u, d, &method, &t, counters),
                    Err(mut e) => match e.take_message() {
                        Some(r) => up_req = r, // not sent: dial afresh below
                        None => {
                            let why = e.into_error().to_string();
                            return self.failed(&method, &t, &d, Some(u.addr.ip()), why);
                        }
                    },
                }
            }
        }
        let by_name = policy.decide(&PolicyRequest {
            host: &t.host,
            port: t.port,
            addr: None,
        });
        let (stream, addr, d) = match self.egress.dial(policy, &t, &by_name).await {
            Ok(x) => x,
            Err(DialError::Blocked(d, a)) => return self.blocked(&method, &t, d, a),
            Err(DialError::Failed {
                decision,
                addr,
                why,
            }) => return self.failed(&method, &t, &decision, addr, why),
        };
        let (mut sender, conn) = match hyper::client::conn::http1::Builder::new()
            .handshake::<_, ReqBody>(TokioIo::new(stream))
            .await
        {
            Ok(x) => x,
            Err(e) => return self.failed(&method, &t, &d, Some(addr), e.to_string()),
        };
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("upstream connection: {e}");
            }
        });
        let resp = match sender.send_request(up_req).await {
            Ok(r) => r,
            Err(e) => return self.failed(&method, &t, &d, Some(addr), e.to_string()),
        };
        let u = Upstream {
            host: t.host.clone(),
            port: t.port,
            addr: SocketAddr::new(addr, t.port),
            rule: d.rule().to_string(),
            bypass: d.is_bypass(),
            sender,
        };
        self.respond(resp, u, d, &method, &t, counters)
    }

    /// Keep the upstream for the next request and stream the response back; the event
    /// is recorded when the response body ends.
    fn respond(
        &self,
        resp: Response<Incoming>,
        upstream: Upstream,
        d: Decision,
        method: &Method,
        t: &Target,
        counters: Arc<Counters>,
    ) -> Response<ProxyBody> {
        let ev = self.event(method, t, Some(upstream.addr.ip()), &d);
        *self.upstream.lock().unwrap_or_else(|e| e.into_inner()) = Some(upstream);

        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        parts.version = Version::HTTP_11;
        let reason = parts.extensions.remove::<hyper::ext::ReasonPhrase>();
        parts.extensions = http::Extensions::new();
        if let Some(r) = reason {
            parts.extensions.insert(r);
        }
        let guard = EventGuard {
            egress: self.egress.clone(),
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
}

/// Splice both ways when the client leg is a plain socket (TCP or Unix), else copy.
pub(crate) async fn tunnel(
    up: Upgraded,
    mut upstream: TcpStream,
    c: &Counters,
    buf: usize,
) -> io::Result<()> {
    let up = match up.downcast::<TokioIo<TcpStream>>() {
        Ok(parts) => {
            upstream.write_all(&parts.read_buf).await?;
            add(&c.up, parts.read_buf.len());
            return splice::tunnel(parts.io.inner(), &upstream, &c.up, &c.down).await;
        }
        Err(up) => up,
    };
    let up = match up.downcast::<TokioIo<UnixStream>>() {
        Ok(parts) => {
            upstream.write_all(&parts.read_buf).await?;
            add(&c.up, parts.read_buf.len());
            return splice::tunnel(parts.io.inner(), &upstream, &c.up, &c.down).await;
        }
        Err(up) => up,
    };
    let mut client = TokioIo::new(up);
    let mut upstream = CountingStream {
        inner: upstream,
        counters: c,
    };
    tokio::io::copy_bidirectional_with_sizes(&mut client, &mut upstream, buf, buf)
        .await
        .map(|_| ())
}

pub(crate) fn text_response(
    status: StatusCode,
    body: String,
    block_rule: Option<&str>,
) -> Response<ProxyBody> {
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
        let v = HeaderValue::from_str(rule).unwrap_or_else(|_| HeaderValue::from_static("invalid"));
        h.insert("x-airlock-block", v);
    }
    resp
}

/// The upstream side of a tunnel, counting bytes (written = up, read = down) so the
/// counts survive an error on either side.
struct CountingStream<'a> {
    inner: TcpStream,
    counters: &'a Counters,
}

pub(crate) fn add(c: &AtomicU64, n: usize) {
    c.fetch_add(n as u64, Ordering::Relaxed);
}

impl AsyncRead for CountingStream<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            add(&self.counters.down, buf.filled().len() - before);
        }
        r
    }
}

impl AsyncWrite for CountingStream<'_> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = r {
            add(&self.counters.up, n);
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl Egress {
    /// Resolve, decide every address, dial the first allowed one that answers.
    pub(crate) async fn dial(
        &self,
        policy: &Policy,
        t: &Target,
        by_name: &Decision,
    ) -> Result<(TcpStream, IpAddr, Decision), DialError> {
        let addrs = match self.lookup(&t.host, t.port).await {
            Ok(a) => a,
            Err(e) => {
                return Err(DialError::Failed {
                    decision: by_name.clone(),
                    addr: None,
                    why: format!("resolve {}: {e}", t.host),
                })
            }
        };
        let mut first_block = None;
        let mut allowed = Vec::with_capacity(addrs.len());
        for a in addrs {
            let d = policy.decide(&PolicyRequest {
                host: &t.host,
                port: t.port,
                addr: Some(a),
            });
            if d.is_allowed() {
                allowed.push((a, d));
            } else if first_block.is_none() {
                first_block = Some((d, a));
            }
        }
        if allowed.is_empty() {
            let (d, a) =
                first_block.unwrap_or_else(|| (by_name.clone(), IpAddr::from([0, 0, 0, 0])));
            return Err(DialError::Blocked(d, Some(a)));
        }
        let mut last = None;
        for (a, d) in allowed {
            match tokio::time::timeout(
                self.limits.connect_timeout,
                TcpStream::connect(SocketAddr::new(a, t.port)),
            )
            .await
            {
                Ok(Ok(s)) => {
                    let _ = s.set_nodelay(true);
                    return Ok((s, a, d));
                }
                Ok(Err(e)) => last = Some((d, a, e.to_string())),
                Err(_) => last = Some((d, a, "connect timed out".to_string())),
            }
        }
        // `allowed` was not empty, so the loop ran and set `last`.
        let (decision, a, why) = last.unwrap_or_else(|| {
            (
                by_name.clone(),
                IpAddr::from([0, 0, 0, 0]),
                "no address".into(),
            )
        });
        Err(DialError::Failed {
            decision,
            addr: Some(a),
            why: format!("connect {}: {why}", SocketAddr::new(a, t.port)),
        })
    }
}
