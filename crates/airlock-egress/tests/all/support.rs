//! Test harness: an upstream HTTP server, a proxy, an event collector, a stub resolver
//! and a minimal raw HTTP/1.1 client.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use airlock_egress::{BoxFuture, Egress, EgressConfig, EventSink, Resolver};
use airlock_policy::{Event, Policy};
use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Default)]
pub struct Events(pub Mutex<Vec<Event>>);

impl EventSink for Events {
    fn record(&self, ev: Event) {
        self.0.lock().unwrap().push(ev);
    }
}

impl Events {
    /// Wait until exactly `n` events are recorded (events are recorded when an exchange
    /// ends, possibly just after the client saw the response), then return them.
    pub async fn wait(&self, n: usize) -> Vec<Event> {
        for _ in 0..200 {
            if self.0.lock().unwrap().len() >= n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
        let evs = self.0.lock().unwrap().clone();
        assert_eq!(evs.len(), n, "expected {n} events, got {evs:#?}");
        evs
    }
}

/// Maps fixed names to addresses; counts lookups.
#[derive(Default)]
pub struct StubResolver {
    pub map: HashMap<String, Vec<IpAddr>>,
    pub calls: AtomicUsize,
}

impl Resolver for StubResolver {
    fn resolve<'a>(&'a self, host: &'a str, _port: u16) -> BoxFuture<'a, io::Result<Vec<IpAddr>>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let r = self.map.get(host).cloned().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("stub: no such host {host}"),
            )
        });
        Box::pin(async move { r })
    }
}

pub struct Proxy {
    pub addr: SocketAddr,
    pub egress: Arc<Egress>,
    pub events: Arc<Events>,
    pub resolver: Arc<StubResolver>,
}

pub async fn proxy(policy: Policy, names: &[(&str, &str)]) -> Proxy {
    let events = Arc::new(Events::default());
    let mut stub = StubResolver::default();
    for (n, a) in names {
        stub.map
            .entry(n.to_string())
            .or_default()
            .push(a.parse().unwrap());
    }
    let resolver = Arc::new(stub);
    let egress = Arc::new(Egress::new(EgressConfig {
        sandbox: "sb-test".into(),
        policy,
        sink: events.clone(),
        resolver: resolver.clone(),
    }));
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(egress.clone().serve_tcp(l));
    Proxy {
        addr,
        egress,
        events,
        resolver,
    }
}

/// A streaming body made of chunks sent with small pauses (no size known in advance).
pub struct Chunks(pub Vec<Bytes>, pub Option<Pin<Box<tokio::time::Sleep>>>);
use std::pin::Pin;
use std::task::{Context, Poll};

impl Body for Chunks {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(s) = self.1.as_mut() {
            if s.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
        if self.0.is_empty() {
            return Poll::Ready(None);
        }
        self.1 = Some(Box::pin(tokio::time::sleep(Duration::from_millis(5))));
        let c = self.0.remove(0);
        Poll::Ready(Some(Ok(Frame::data(c))))
    }
    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}
use std::future::Future;

pub enum UpBody {
    Full(Option<Bytes>),
    Chunks(Chunks),
    Echo(Incoming),
}

impl Body for UpBody {
    type Data = Bytes;
    type Error = hyper::Error;
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            UpBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            UpBody::Chunks(c) => Pin::new(c)
                .poll_frame(cx)
                .map(|o| o.map(|r| Ok(r.unwrap()))),
            UpBody::Echo(i) => Pin::new(i).poll_frame(cx),
        }
    }
    fn size_hint(&self) -> SizeHint {
        match self {
            UpBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            UpBody::Chunks(_) => SizeHint::default(),
            UpBody::Echo(i) => i.size_hint(),
        }
    }
}

pub struct Upstream {
    pub addr: SocketAddr,
    /// TCP connections accepted.
    pub conns: Arc<AtomicUsize>,
    /// Request lines seen, with the Host header: "GET /x host=..."
    pub seen: Arc<Mutex<Vec<String>>>,
}

/// An upstream HTTP/1.1 server on 127.0.0.1:
/// `/hello` → "hello" (Content-Length), `/chunked` → "one","two","three" (chunked),
/// `/echo` → the request body streamed back, `/headers` → the request headers as text.
pub async fn upstream() -> Upstream {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let conns = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (c2, s2) = (conns.clone(), seen.clone());
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            c2.fetch_add(1, Ordering::SeqCst);
            let seen = s2.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let seen = seen.clone();
                    async move {
                        let host = req
                            .headers()
                            .get("host")
                            .map(|h| h.to_str().unwrap().to_string())
                            .unwrap_or_default();
                        seen.lock().unwrap().push(format!(
                            "{} {} host={host}",
                            req.method(),
                            req.uri()
                        ));
                        let body = match req.uri().path() {
                            "/hello" => UpBody::Full(Some(Bytes::from_static(b"hello"))),
                            "/chunked" => UpBody::Chunks(Chunks(
                                vec![
                                    Bytes::from_static(b"one"),
                                    Bytes::from_static(b"two"),
                                    Bytes::from_static(b"three"),
                                ],
                                None,
                            )),
                            "/echo" => UpBody::Echo(req.into_body()),
                            "/headers" => {
                                let mut names: Vec<String> = req
                                    .headers()
                                    .iter()
                                    .map(|(k, v)| format!("{k}: {}", v.to_str().unwrap_or("?")))
                                    .collect();
                                names.sort();
                                UpBody::Full(Some(Bytes::from(names.join("\n"))))
                            }
                            _ => UpBody::Full(Some(Bytes::from_static(b"not found"))),
                        };
                        Ok::<_, Infallible>(Response::new(body))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    Upstream { addr, conns, seen }
}

/// A parsed response from the raw client.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A minimal HTTP/1.1 client over one connection (keep-alive), reading responses
/// framed by Content-Length or chunked encoding.
pub struct Raw {
    pub s: TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    pub async fn connect(addr: SocketAddr) -> Raw {
        Raw {
            s: TcpStream::connect(addr).await.unwrap(),
            buf: Vec::new(),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).await.unwrap();
    }

    async fn fill(&mut self) -> io::Result<usize> {
        let mut tmp = [0u8; 16384];
        let n = tokio::time::timeout(Duration::from_secs(10), self.s.read(&mut tmp))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "read timed out"))??;
        self.buf.extend_from_slice(&tmp[..n]);
        Ok(n)
    }

    /// Read a response head; `None` when the connection closed first.
    pub async fn head(&mut self) -> io::Result<Option<(u16, String)>> {
        loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..i]).into_owned();
                self.buf.drain(..i + 4);
                let status = head
                    .split(' ')
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                return Ok(Some((status, head)));
            }
            if self.fill().await? == 0 {
                return Ok(None);
            }
        }
    }

    /// Read a whole response (skipping 1xx), for a request that was not HEAD.
    pub async fn response(&mut self) -> io::Result<Option<Resp>> {
        let (status, head) = loop {
            match self.head().await? {
                None => return Ok(None),
                Some((s, _)) if (100..200).contains(&s) => continue,
                Some(x) => break x,
            }
        };
        let mut r = Resp {
            status,
            head,
            body: Vec::new(),
        };
        if let Some(len) = r.header("content-length") {
            let len: usize = len.parse().unwrap();
            while self.buf.len() < len {
                if self.fill().await? == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
            }
            r.body = self.buf.drain(..len).collect();
        } else if r
            .header("transfer-encoding")
            .is_some_and(|t| t.contains("chunked"))
        {
            loop {
                let line_end = loop {
                    if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                        break i;
                    }
                    if self.fill().await? == 0 {
                        return Err(io::ErrorKind::UnexpectedEof.into());
                    }
                };
                let size_line = String::from_utf8_lossy(&self.buf[..line_end]).into_owned();
                let size =
                    usize::from_str_radix(size_line.split(';').next().unwrap().trim(), 16).unwrap();
                self.buf.drain(..line_end + 2);
                while self.buf.len() < size + 2 {
                    if self.fill().await? == 0 {
                        return Err(io::ErrorKind::UnexpectedEof.into());
                    }
                }
                r.body.extend(self.buf.drain(..size));
                self.buf.drain(..2);
                if size == 0 {
                    break;
                }
            }
        } else if status != 204 && status != 304 {
            while self.fill().await? > 0 {}
            r.body = std::mem::take(&mut self.buf);
        }
        Ok(Some(r))
    }

    /// Send one request and read its response.
    pub async fn roundtrip(&mut self, req: &str) -> Resp {
        self.send(req.as_bytes()).await;
        self.response()
            .await
            .unwrap()
            .expect("connection closed before a response")
    }

    /// Bytes already read past the last response (tunnel data).
    pub fn take_buf(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.buf)
    }
}

pub fn get(url: &str) -> String {
    let host = url.trim_start_matches("http://").split('/').next().unwrap();
    format!("GET {url} HTTP/1.1\r\nHost: {host}\r\n\r\n")
}
