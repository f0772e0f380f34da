//! Tests of the sandbox DNS resolver (dns.rs) and the transparent path (transparent.rs):
//! in-memory client streams, upstreams on 127.0.0.1 that a test policy allows.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use airlock_policy::{Event, Policy};
use simple_dns::rdata::RData;
use simple_dns::{Name, Packet, Question, CLASS, QCLASS, QTYPE, RCODE, TYPE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::{BoxFuture, Egress, EgressConfig, EventSink, Resolver};

#[derive(Default)]
struct Sink(Mutex<Vec<Event>>);

impl EventSink for Sink {
    fn record(&self, ev: Event) {
        self.0.lock().unwrap().push(ev);
    }
}

struct MapResolver(HashMap<String, Vec<IpAddr>>);

impl Resolver for MapResolver {
    fn resolve<'a>(&'a self, host: &'a str, _port: u16) -> BoxFuture<'a, io::Result<Vec<IpAddr>>> {
        let r = self
            .0
            .get(host)
            .cloned()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such host"));
        Box::pin(async move { r })
    }
}

fn policy(s: &str) -> Policy {
    serde_json::from_str(s).unwrap()
}

fn engine(p: &str, names: &[(&str, &[&str])]) -> (Arc<Egress>, Arc<Sink>) {
    let sink = Arc::new(Sink::default());
    let map = names
        .iter()
        .map(|(n, a)| {
            (
                n.to_string(),
                a.iter().map(|x| x.parse().unwrap()).collect(),
            )
        })
        .collect();
    let e = Egress::new(EgressConfig {
        sandbox: "t".into(),
        policy: policy(p),
        sink: sink.clone(),
        resolver: Arc::new(MapResolver(map)),
    });
    (Arc::new(e), sink)
}

fn query(name: &str, t: TYPE) -> Vec<u8> {
    let mut p = Packet::new_query(0x4242);
    p.set_flags(simple_dns::PacketFlag::RECURSION_DESIRED);
    p.questions.push(Question::new(
        Name::new_unchecked(name),
        QTYPE::TYPE(t),
        QCLASS::CLASS(CLASS::IN),
        false,
    ));
    p.build_bytes_vec().unwrap()
}

/// (rcode, A addresses)
fn answer(bytes: &[u8]) -> (RCODE, Vec<IpAddr>) {
    let p = Packet::parse(bytes).unwrap();
    assert_eq!(p.id(), 0x4242);
    assert!(p.has_flags(simple_dns::PacketFlag::RESPONSE));
    let addrs = p
        .answers
        .iter()
        .filter_map(|rr| match &rr.rdata {
            RData::A(a) => Some(IpAddr::from(std::net::Ipv4Addr::from(a.address))),
            _ => None,
        })
        .collect();
    (p.rcode(), addrs)
}

fn last(sink: &Sink) -> Event {
    sink.0.lock().unwrap().last().cloned().expect("an event")
}

const ALLOW_WITH_BLOCK: &str = r#"{"mode":"allow","rules":["block-host blocked.test"]}"#;

#[tokio::test]
async fn dns_blocked_name_is_nxdomain() {
    let (e, sink) = engine(ALLOW_WITH_BLOCK, &[("blocked.test", &["93.184.216.34"])]);
    let (rc, a) = answer(&e.answer_dns(&query("blocked.test", TYPE::A)).await.unwrap());
    assert_eq!(rc, RCODE::NameError);
    assert!(a.is_empty());
    let ev = last(&sink);
    assert_eq!(
        (
            ev.path.as_str(),
            ev.action.as_str(),
            ev.method.as_str(),
            ev.host.as_str()
        ),
        ("dns", "block", "A", "blocked.test")
    );
    assert_eq!(ev.rule, "block-host blocked.test");
    // AAAA for it too.
    let (rc, _) = answer(
        &e.answer_dns(&query("blocked.test", TYPE::AAAA))
            .await
            .unwrap(),
    );
    assert_eq!(rc, RCODE::NameError);
}

#[tokio::test]
async fn dns_rebinding_to_private_ranges_is_refused() {
    let (e, sink) = engine(
        r#"{"mode":"allow"}"#,
        &[
            ("evil.test", &["127.0.0.1"]),
            ("meta.test", &["169.254.169.254"]),
            ("mixed.test", &["10.1.2.3", "93.184.216.34"]),
        ],
    );
    let (rc, a) = answer(&e.answer_dns(&query("evil.test", TYPE::A)).await.unwrap());
    assert_eq!((rc, a.len()), (RCODE::NameError, 0));
    let ev = last(&sink);
    assert_eq!(ev.action, "block");
    assert!(ev.rule.starts_with("default-range:"), "{ev:?}");
    assert!(ev.reason.contains("127.0.0.1"), "{ev:?}");
    assert!(!e.dns_pinned("evil.test", "127.0.0.1".parse().unwrap()));
    let (rc, _) = answer(&e.answer_dns(&query("meta.test", TYPE::A)).await.unwrap());
    assert_eq!(rc, RCODE::NameError);
    // Only the public address is answered.
    let (rc, a) = answer(&e.answer_dns(&query("mixed.test", TYPE::A)).await.unwrap());
    assert_eq!(
        (rc, a),
        (RCODE::NoError, vec!["93.184.216.34".parse().unwrap()])
    );
    assert!(last(&sink).reason.contains("withheld 10.1.2.3"));
}

#[tokio::test]
async fn dns_allowed_name_is_answered_and_pinned() {
    let (e, sink) = engine(
        r#"{"mode":"deny","rules":["allow-host good.test:443","allow-host localhost:8080"]}"#,
        &[
            ("good.test", &["93.184.216.34", "2606:2800::1"]),
            ("other.test", &["1.1.1.1"]),
        ],
    );
    let (rc, a) = answer(&e.answer_dns(&query("Good.Test.", TYPE::A)).await.unwrap());
    assert_eq!(
        (rc, a),
        (RCODE::NoError, vec!["93.184.216.34".parse().unwrap()])
    );
    let ev = last(&sink);
    assert_eq!(
        (ev.action.as_str(), ev.host.as_str()),
        ("allow", "good.test")
    );
    assert!(e.dns_pinned("good.test", "93.184.216.34".parse().unwrap()));
    assert!(!e.dns_pinned("good.test", "1.1.1.1".parse().unwrap()));
    // Deny mode: a name no rule allows is NXDOMAIN.
    let (rc, _) = answer(&e.answer_dns(&query("other.test", TYPE::A)).await.unwrap());
    assert_eq!(rc, RCODE::NameError);
    // AAAA: allowed name, no records (no IPv6 inside).
    let bytes = e.answer_dns(&query("good.test", TYPE::AAAA)).await.unwrap();
    let p = Packet::parse(&bytes).unwrap();
    assert_eq!((p.rcode(), p.answers.len()), (RCODE::NoError, 0));
    // Other types: not implemented.
    let (rc, _) = answer(&e.answer_dns(&query("good.test", TYPE::TXT)).await.unwrap());
    assert_eq!(rc, RCODE::NotImplemented);
    // The host's services: the gateway address, when a localhost rule allows them.
    let (rc, a) = answer(
        &e.answer_dns(&query("host.docker.internal", TYPE::A))
            .await
            .unwrap(),
    );
    assert_eq!((rc, a), (RCODE::NoError, vec!["10.0.2.2".parse().unwrap()]));
    // Every query was an event.
    assert_eq!(sink.0.lock().unwrap().len(), 5);
    // Garbage: no answer, or FORMERR.
    assert!(e.answer_dns(b"\x01").await.is_none());
    let mut junk = query("good.test", TYPE::A);
    junk.truncate(15);
    let bytes = e.answer_dns(&junk).await.unwrap();
    let p = Packet::parse(&bytes).unwrap();
    assert_eq!(p.rcode(), RCODE::FormatError);
}

#[tokio::test]
async fn dns_host_alias_without_rule_is_nxdomain() {
    let (e, _) = engine(r#"{"mode":"allow"}"#, &[]);
    let (rc, _) = answer(
        &e.answer_dns(&query("host.airlock.internal", TYPE::A))
            .await
            .unwrap(),
    );
    assert_eq!(rc, RCODE::NameError);
}

/// An HTTP/1.1 upstream on 127.0.0.1 that answers `host=<Host>` and keeps the
/// connection open.
async fn http_upstream() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut b = [0u8; 4096];
                loop {
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..end]).to_string();
                        buf.drain(..end + 4);
                        let host = head
                            .lines()
                            .find_map(|l| l.strip_prefix("host: ").or(l.strip_prefix("Host: ")))
                            .unwrap_or("")
                            .to_string();
                        let body = format!("host={host}");
                        let resp = format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        s.write_all(resp.as_bytes()).await.unwrap();
                    }
                    match s.read(&mut b).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&b[..n]),
                    }
                }
            });
        }
    });
    addr
}

/// A raw upstream that echoes, and reports the first bytes it received.
async fn echo_upstream() -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut b = vec![0u8; 65536];
                loop {
                    match s.read(&mut b).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            let _ = tx.send(b[..n].to_vec());
                            if s.write_all(&b[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    (addr, rx)
}

/// Run one transparent flow with `send` as the client's bytes; returns what came back
/// (until the engine closes or 3 s pass).
async fn flow(e: &Arc<Egress>, orig_dst: SocketAddr, send: &[u8], half_close: bool) -> Vec<u8> {
    let (mut client, server) = tokio::io::duplex(1 << 16);
    let task = tokio::spawn(e.clone().serve_transparent(server, orig_dst));
    client.write_all(send).await.unwrap();
    if half_close {
        client.shutdown().await.unwrap();
    }
    let mut out = Vec::new();
    let mut b = [0u8; 8192];
    loop {
        match tokio::time::timeout(Duration::from_secs(3), client.read(&mut b)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => {
                out.extend_from_slice(&b[..n]);
                // Enough for an HTTP exchange: one full response.
                if !half_close && out.windows(4).any(|w| w == b"\r\n\r\n") {
                    let s = String::from_utf8_lossy(&out);
                    if let Some(len) = s
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length: ")
                                .map(|v| v.trim().to_string())
                        })
                        .and_then(|v| v.parse::<usize>().ok())
                    {
                        let head = s.find("\r\n\r\n").unwrap() + 4;
                        if out.len() >= head + len {
                            break;
                        }
                    }
                }
            }
        }
    }
    drop(client);
    let _ = tokio::time::timeout(Duration::from_secs(3), task).await;
    out
}

const ALLOWED: &str = r#"{"mode":"allow","rules":["allow-host allowed.test","block-host blocked.test","allow-host unpinned.test"]}"#;

#[tokio::test]
async fn http_is_policed_by_host_and_pinned() {
    let up = http_upstream().await;
    let (e, sink) = engine(
        ALLOWED,
        &[
            ("allowed.test", &["127.0.0.1"]),
            ("unpinned.test", &["127.0.0.1"]),
        ],
    );
    // The sandbox resolves the name through airlock's DNS first: 127.0.0.1 is pinned
    // (the exact allow rule unlocks loopback for this test).
    let (rc, a) = answer(&e.answer_dns(&query("allowed.test", TYPE::A)).await.unwrap());
    assert_eq!(
        (rc, a),
        (RCODE::NoError, vec!["127.0.0.1".parse().unwrap()])
    );

    let req = format!(
        "GET /x HTTP/1.1\r\nHost: allowed.test:{}\r\n\r\n",
        up.port()
    );
    let out = String::from_utf8(flow(&e, up, req.as_bytes(), false).await).unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(
        out.ends_with(&format!("host=allowed.test:{}", up.port())),
        "{out}"
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    let ev = last(&sink);
    assert_eq!(
        (
            ev.path.as_str(),
            ev.method.as_str(),
            ev.host.as_str(),
            ev.action.as_str()
        ),
        ("transparent", "GET", "allowed.test", "allow")
    );
    assert_eq!(ev.addr.as_deref(), Some("127.0.0.1"));

    // Blocked by name.
    let out = String::from_utf8(
        flow(
            &e,
            up,
            b"GET / HTTP/1.1\r\nHost: blocked.test\r\n\r\n",
            false,
        )
        .await,
    )
    .unwrap();
    assert!(out.starts_with("HTTP/1.1 403"), "{out}");
    let ev = last(&sink);
    assert_eq!(
        (ev.path.as_str(), ev.action.as_str(), ev.rule.as_str()),
        ("transparent", "block", "block-host blocked.test")
    );

    // Allowed name, but the address never came from our DNS for it.
    let out = String::from_utf8(
        flow(
            &e,
            up,
            b"GET / HTTP/1.1\r\nHost: unpinned.test\r\n\r\n",
            false,
        )
        .await,
    )
    .unwrap();
    assert!(out.starts_with("HTTP/1.1 403"), "{out}");
    let ev = last(&sink);
    assert_eq!(
        ev.reason,
        "destination 127.0.0.1 not from airlock DNS for unpinned.test"
    );

    // A second request on the same connection naming another host is policed again.
    let two =
        "GET / HTTP/1.1\r\nHost: allowed.test\r\n\r\nGET / HTTP/1.1\r\nHost: blocked.test\r\n\r\n";
    let (mut client, server) = tokio::io::duplex(1 << 16);
    let task = tokio::spawn(e.clone().serve_transparent(server, up));
    client.write_all(two.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let mut b = [0u8; 4096];
    while !String::from_utf8_lossy(&out).contains("HTTP/1.1 403") {
        let n = tokio::time::timeout(Duration::from_secs(3), client.read(&mut b))
            .await
            .expect("second response")
            .unwrap();
        assert!(n > 0, "{}", String::from_utf8_lossy(&out));
        out.extend_from_slice(&b[..n]);
    }
    assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 200"));
    drop(client);
    let _ = task.await;
    let evs = sink.0.lock().unwrap();
    let n = evs.len();
    assert_eq!(evs[n - 1].host, "blocked.test", "{:?}", &evs[n - 2..]);
    assert_eq!(evs[n - 1].action, "block");
}

#[tokio::test]
async fn tls_is_policed_by_sni() {
    // A ClientHello captured from curl 7.88 for https://allowed.test:18443/.
    let hello: &[u8] = include_bytes!("testdata/clienthello-curl.bin");
    let openssl: &[u8] = include_bytes!("testdata/clienthello-openssl.bin");
    let (up, mut rx) = echo_upstream().await;
    let (e, sink) = engine(ALLOWED, &[("allowed.test", &["127.0.0.1"])]);
    // Before any DNS answer: the destination is not pinned for allowed.test.
    let out = flow(&e, up, hello, true).await;
    assert!(out.is_empty());
    let ev = last(&sink);
    assert_eq!(
        (ev.method.as_str(), ev.host.as_str(), ev.action.as_str()),
        ("TLS", "allowed.test", "block")
    );
    assert!(
        ev.reason.contains("not from airlock DNS for allowed.test"),
        "{ev:?}"
    );
    assert!(rx.try_recv().is_err(), "nothing may reach the upstream");

    answer(&e.answer_dns(&query("allowed.test", TYPE::A)).await.unwrap());
    for h in [hello, openssl] {
        let out = flow(&e, up, h, true).await;
        assert_eq!(out, h, "tunnelled to the upstream and echoed");
        let mut got = Vec::new();
        while got.len() < h.len() {
            got.extend(rx.recv().await.unwrap());
        }
        assert_eq!(got, h);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let ev = last(&sink);
        assert_eq!((ev.method.as_str(), ev.action.as_str()), ("TLS", "allow"));
        assert_eq!(ev.bytes_up, h.len() as u64);
    }

    // Blocked by SNI.
    let (e, sink) = engine(
        r#"{"mode":"allow","rules":["block-host allowed.test","allow-cidr 127.0.0.1/32"]}"#,
        &[],
    );
    let out = flow(&e, up, hello, true).await;
    assert!(out.is_empty());
    let ev = last(&sink);
    assert_eq!(
        (ev.host.as_str(), ev.action.as_str(), ev.rule.as_str()),
        ("allowed.test", "block", "block-host allowed.test")
    );
}

#[tokio::test]
async fn other_tcp_needs_an_ip_rule() {
    let (up, _rx) = echo_upstream().await;
    // Allow mode alone does not allow raw TCP to an address.
    let (e, sink) = engine(r#"{"mode":"allow"}"#, &[]);
    let out = flow(&e, "1.1.1.1:2222".parse().unwrap(), b"SSH-2.0-x\r\n", true).await;
    assert!(out.is_empty());
    let ev = last(&sink);
    assert_eq!(
        (ev.method.as_str(), ev.action.as_str(), ev.rule.as_str()),
        ("TCP", "block", "transparent:ip-only")
    );
    assert_eq!(ev.host, "1.1.1.1");
    // Loopback without a rule: the default range block.
    let _ = flow(&e, up, b"hello\n", true).await;
    assert_eq!(last(&sink).rule, "default-range:loopback");

    // An IP:PORT rule or a CIDR rule allows it.
    for rule in [
        format!("allow-host 127.0.0.1:{}", up.port()),
        "allow-cidr 127.0.0.0/8".to_string(),
    ] {
        let (e, sink) = engine(&format!(r#"{{"mode":"deny","rules":["{rule}"]}}"#), &[]);
        let out = flow(&e, up, b"hello\n", true).await;
        assert_eq!(out, b"hello\n", "{rule}");
        tokio::time::sleep(Duration::from_millis(50)).await;
        let ev = last(&sink);
        assert_eq!(
            (ev.action.as_str(), ev.rule.as_str()),
            ("allow", rule.as_str())
        );
    }

    // The gateway's ports are the host's loopback services (localhost:PORT rules).
    let gw: SocketAddr = format!("10.0.2.2:{}", up.port()).parse().unwrap();
    let (e, sink) = engine(
        &format!(
            r#"{{"mode":"deny","rules":["allow-host localhost:{}"]}}"#,
            up.port()
        ),
        &[],
    );
    assert_eq!(flow(&e, gw, b"hi\n", true).await, b"hi\n");
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(last(&sink).host, "localhost");
    let (e, _) = engine(r#"{"mode":"allow"}"#, &[]);
    assert!(flow(&e, gw, b"hi\n", true).await.is_empty());

    // HTTP addressed by IP literal is decided like the proxy decides it: the mode
    // applies (here: deny, so blocked; a CIDR rule allows it).
    let (e, sink) = engine(r#"{"mode":"deny"}"#, &[]);
    let req = format!("GET / HTTP/1.1\r\nHost: 127.0.0.1:{}\r\n\r\n", up.port());
    let out = String::from_utf8(flow(&e, up, req.as_bytes(), false).await).unwrap();
    assert!(out.starts_with("HTTP/1.1 403"), "{out}");
    assert_eq!(last(&sink).rule, "default-range:loopback");
    // An IP-literal Host that is not the destination is refused.
    let (e, sink) = engine(
        r#"{"mode":"allow","rules":["allow-cidr 127.0.0.0/8"]}"#,
        &[],
    );
    let out =
        String::from_utf8(flow(&e, up, b"GET / HTTP/1.1\r\nHost: 1.1.1.1\r\n\r\n", false).await)
            .unwrap();
    assert!(out.starts_with("HTTP/1.1 403"), "{out}");
    assert_eq!(last(&sink).rule, "transparent:mismatch");
}

#[tokio::test]
async fn explicit_proxy_address_speaks_the_proxy_protocol() {
    let (e, sink) = engine(ALLOW_WITH_BLOCK, &[]);
    let out = flow(
        &e,
        super::EXPLICIT_PROXY,
        b"GET http://blocked.test/ HTTP/1.1\r\nHost: blocked.test\r\n\r\n",
        false,
    )
    .await;
    assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 403"));
    assert_eq!(last(&sink).path, "proxy");
}

#[tokio::test]
async fn dns_over_tcp() {
    let (e, sink) = engine(ALLOW_WITH_BLOCK, &[("good.test", &["93.184.216.34"])]);
    let mut msg = Vec::new();
    for name in ["good.test", "blocked.test"] {
        let q = query(name, TYPE::A);
        msg.extend_from_slice(&(q.len() as u16).to_be_bytes());
        msg.extend_from_slice(&q);
    }
    let out = flow(&e, "8.8.8.8:53".parse().unwrap(), &msg, true).await;
    let n1 = u16::from_be_bytes([out[0], out[1]]) as usize;
    let (rc, a) = answer(&out[2..2 + n1]);
    assert_eq!(
        (rc, a),
        (RCODE::NoError, vec!["93.184.216.34".parse().unwrap()])
    );
    let (rc, _) = answer(&out[4 + n1..]);
    assert_eq!(rc, RCODE::NameError);
    assert_eq!(sink.0.lock().unwrap().len(), 2);
}

#[test]
fn dropped_packets_are_events() {
    let (e, sink) = engine(r#"{"mode":"allow"}"#, &[]);
    e.record_dropped(
        "udp",
        Some("1.2.3.4:9999".parse().unwrap()),
        "UDP is blocked",
    );
    let ev = last(&sink);
    assert_eq!(
        (
            ev.path.as_str(),
            ev.method.as_str(),
            ev.host.as_str(),
            ev.port,
            ev.action.as_str()
        ),
        ("transparent", "udp", "1.2.3.4", 9999, "block")
    );
    assert_eq!(ev.rule, "transparent:udp");
}

#[test]
fn classify_first_bytes() {
    use super::{classify, Sniffed};
    assert_eq!(classify(b""), None);
    assert_eq!(classify(b"GE"), None);
    assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Sniffed::Http));
    assert_eq!(classify(b"SSH-2.0"), Some(Sniffed::Other));
    let hello: &[u8] = include_bytes!("testdata/clienthello-curl.bin");
    assert_eq!(classify(&hello[..100]), None);
    assert_eq!(
        classify(hello),
        Some(Sniffed::Tls(Some("allowed.test".into())))
    );
}
