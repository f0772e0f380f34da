//! Harness for the TLS-termination tests: a test CA, an HTTPS upstream trusted through
//! `extra_roots`, an intercepting proxy with an airlock CA, and a CONNECT + TLS client.
//! Everything listens on and dials 127.0.0.1 only.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use airlock_egress::{
    Credentials, Egress, EgressConfig, EventSink, SystemResolver, TlsTermination,
};
use airlock_policy::{Event, Policy};
use airlock_tls::rustls::pki_types::{
    CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName,
};
use airlock_tls::rustls::{ClientConfig, RootCertStore, ServerConfig};
use airlock_tls::Ca;
use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify};
use tokio_rustls::client::TlsStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

pub const H1: &[&[u8]] = &[b"http/1.1"];
pub const H2: &[&[u8]] = &[b"h2"];
pub const BOTH: &[&[u8]] = &[b"h2", b"http/1.1"];

#[derive(Default)]
pub struct Events(pub Mutex<Vec<Event>>);

impl EventSink for Events {
    fn record(&self, ev: Event) {
        self.0.lock().unwrap().push(ev);
    }
}

impl Events {
    /// Wait until exactly `n` events are recorded, then return them.
    pub async fn wait(&self, n: usize) -> Vec<Event> {
        for _ in 0..300 {
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

/// A test CA (not the airlock CA) that signs the upstream's certificate.
pub struct TestCa {
    pub der: CertificateDer<'static>,
    pub leaf: CertificateDer<'static>,
    pub key: PrivateKeyDer<'static>,
}

pub fn test_ca() -> TestCa {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "upstream test CA");
    let ca = p.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let lp = rcgen::CertificateParams::new(vec![
        "localhost".to_string(),
        "host.docker.internal".to_string(),
        "127.0.0.1".to_string(),
    ])
    .unwrap();
    let leaf = lp.signed_by(&key, &ca, &ca_key).unwrap();
    TestCa {
        der: ca.der().clone(),
        leaf: leaf.der().clone(),
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    }
}

/// What the upstream saw: method, path, negotiated version and headers.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub version: http::Version,
    pub headers: http::HeaderMap,
}

pub struct Upstream {
    pub addr: SocketAddr,
    pub ca: TestCa,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    /// Released by the test to let `/stream` send its second chunk.
    pub release: Arc<Notify>,
    pub conns: Arc<std::sync::atomic::AtomicUsize>,
    /// TLS handshakes completed.
    pub tls_conns: Arc<std::sync::atomic::AtomicUsize>,
}

pub enum UpBody {
    Full(Option<Bytes>),
    Chan(mpsc::Receiver<Bytes>),
}

impl Body for UpBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            UpBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            UpBody::Chan(r) => r.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b)))),
        }
    }
    fn size_hint(&self) -> SizeHint {
        match self {
            UpBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            UpBody::Chan(_) => SizeHint::default(),
        }
    }
}

/// An HTTPS upstream on 127.0.0.1 offering `alpn`. Routes: `/hello`, `/stream` (one
/// chunk, then a second after `release`), `/big/N` (N bytes), anything else echoes the
/// path.
pub async fn upstream(alpn: &[&[u8]]) -> Upstream {
    let ca = test_ca();
    let mut cfg = ServerConfig::builder_with_provider(airlock_tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![ca.leaf.clone(), ca.der.clone()], ca.key.clone_key())
        .unwrap();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let acceptor = TlsAcceptor::from(Arc::new(cfg));
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let release = Arc::new(Notify::new());
    let conns = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let tls_conns = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (s2, r2, c2, t2) = (
        seen.clone(),
        release.clone(),
        conns.clone(),
        tls_conns.clone(),
    );
    tokio::spawn(async move {
        loop {
            let (tcp, _) = l.accept().await.unwrap();
            c2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let acceptor = acceptor.clone();
            let (seen, release, tls_conns) = (s2.clone(), r2.clone(), t2.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                tls_conns.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let (seen, release) = (seen.clone(), release.clone());
                    async move {
                        seen.lock().unwrap().push(Seen {
                            method: req.method().to_string(),
                            path: req.uri().path().to_string(),
                            version: req.version(),
                            headers: req.headers().clone(),
                        });
                        let path = req.uri().path().to_string();
                        let body = if path == "/hello" {
                            UpBody::Full(Some(Bytes::from_static(b"hello")))
                        } else if path == "/stream" {
                            let (tx, rx) = mpsc::channel(4);
                            tokio::spawn(async move {
                                let _ = tx.send(Bytes::from_static(b"data: 1\n\n")).await;
                                release.notified().await;
                                let _ = tx.send(Bytes::from_static(b"data: 2\n\n")).await;
                            });
                            UpBody::Chan(rx)
                        } else if let Some(n) = path.strip_prefix("/big/") {
                            let n: usize = n.parse().unwrap();
                            UpBody::Full(Some(Bytes::from(vec![b'x'; n])))
                        } else {
                            UpBody::Full(Some(Bytes::from(path)))
                        };
                        Ok::<_, Infallible>(Response::new(body))
                    }
                });
                let io = TokioIo::new(tls);
                if h2 {
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(io, svc)
                        .await;
                } else {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, svc)
                        .await;
                }
            });
        }
    });
    Upstream {
        addr,
        ca,
        seen,
        release,
        conns,
        tls_conns,
    }
}

pub struct Proxy {
    pub addr: SocketAddr,
    pub egress: Arc<Egress>,
    pub events: Arc<Events>,
    pub ca: Arc<Ca>,
    pub _dir: tempfile::TempDir,
}

/// An intercepting proxy whose upstream config trusts `upstream_ca` as an extra root.
pub async fn proxy(
    policy: Policy,
    upstream_ca: &CertificateDer<'static>,
    creds: Option<Credentials>,
) -> Proxy {
    let dir = tempfile::tempdir().unwrap();
    let ca = Arc::new(Ca::load_or_create(&dir.path().join("ca")).unwrap());
    let events = Arc::new(Events::default());
    let tls = TlsTermination::new(
        ca.clone(),
        airlock_tls::upstream_client_config(std::slice::from_ref(upstream_ca)),
    );
    let mut egress = Egress::new(EgressConfig {
        sandbox: "sb-tls".into(),
        policy,
        sink: events.clone(),
        resolver: Arc::new(SystemResolver),
    })
    .with_tls(Arc::new(tls));
    if let Some(c) = creds {
        egress = egress.with_credentials(Arc::new(c));
    }
    let egress = Arc::new(egress);
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(egress.clone().serve_tcp(l));
    Proxy {
        addr,
        egress,
        events,
        ca,
        _dir: dir,
    }
}

/// CONNECT through the proxy; returns the tunnel once the proxy answered 200.
pub async fn connect(proxy: SocketAddr, authority: &str) -> io::Result<TcpStream> {
    let mut s = TcpStream::connect(proxy).await?;
    s.write_all(format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n").as_bytes())
        .await?;
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut b).await? == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "proxy closed"));
        }
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head).to_string();
    if !head.starts_with("HTTP/1.1 200") {
        return Err(io::Error::other(format!("CONNECT refused: {head}")));
    }
    Ok(s)
}

pub fn client_config(root: &CertificateDer<'static>, alpn: &[&[u8]]) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots.add(root.clone()).unwrap();
    let mut c = ClientConfig::builder_with_provider(airlock_tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(c)
}

/// CONNECT to `authority`, then TLS with server name `sni`, trusting `root`.
pub async fn tls_via_proxy(
    proxy: SocketAddr,
    authority: &str,
    sni: &str,
    root: &CertificateDer<'static>,
    alpn: &[&[u8]],
) -> io::Result<TlsStream<TcpStream>> {
    let tcp = connect(proxy, authority).await?;
    let name = ServerName::try_from(sni.to_string()).unwrap();
    TlsConnector::from(client_config(root, alpn))
        .connect(name, tcp)
        .await
}

pub enum Client {
    H1(hyper::client::conn::http1::SendRequest<UpBody>),
    H2(hyper::client::conn::http2::SendRequest<UpBody>),
}

impl Client {
    pub async fn new(tls: TlsStream<TcpStream>) -> Client {
        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
        let io = TokioIo::new(tls);
        if h2 {
            let (s, c) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .unwrap();
            tokio::spawn(c);
            Client::H2(s)
        } else {
            let (s, c) = hyper::client::conn::http1::handshake(io).await.unwrap();
            tokio::spawn(c);
            Client::H1(s)
        }
    }

    pub fn is_h2(&self) -> bool {
        matches!(self, Client::H2(_))
    }

    /// GET `path` with `Host`/`:authority` = `authority` and extra headers.
    pub async fn get(
        &mut self,
        authority: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Response<Incoming> {
        let mut b = Request::builder().method("GET");
        b = match self {
            Client::H1(_) => b.uri(path).header("host", authority),
            Client::H2(_) => b
                .uri(format!("https://{authority}{path}"))
                .version(http::Version::HTTP_2),
        };
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let req = b.body(UpBody::Full(None)).unwrap();
        match self {
            Client::H1(s) => {
                s.ready().await.unwrap();
                s.send_request(req).await.unwrap()
            }
            Client::H2(s) => s.send_request(req).await.unwrap(),
        }
    }
}

/// Read a whole body.
pub async fn body_bytes(mut b: Incoming) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(f) = std::future::poll_fn(|cx| Pin::new(&mut b).poll_frame(cx)).await {
        if let Ok(d) = f.unwrap().into_data() {
            out.extend_from_slice(&d);
        }
    }
    out
}

/// The next data frame of a body (None at its end).
pub async fn next_chunk(b: &mut Incoming) -> Option<Bytes> {
    loop {
        let f = std::future::poll_fn(|cx| Pin::new(&mut *b).poll_frame(cx)).await?;
        if let Ok(d) = f.unwrap().into_data() {
            return Some(d);
        }
    }
}
