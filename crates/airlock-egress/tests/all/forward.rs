//! Allowed traffic: keep-alive GET, POST bodies, chunked streaming, CONNECT, 100-continue,
//! header hygiene, Unix socket serving.

use std::sync::atomic::Ordering;

use airlock_policy::{Action, Mode, Policy, Rule};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::*;

fn allow_loopback() -> Policy {
    let mut p = Policy::default();
    p.add(Rule::cidr(Action::Allow, "127.0.0.1/32").unwrap());
    p
}

#[tokio::test]
async fn get_keep_alive_reuses_both_legs() {
    let up = upstream().await;
    let px = proxy(allow_loopback(), &[]).await;
    let mut c = Raw::connect(px.addr).await;
    let url = format!("http://{}/hello", up.addr);
    for _ in 0..2 {
        let r = c.roundtrip(&get(&url)).await;
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.text(), "hello");
    }
    let evs = px.events.wait(2).await;
    assert_eq!(
        up.conns.load(Ordering::SeqCst),
        1,
        "upstream connection reused"
    );
    for ev in &evs {
        assert_eq!(
            (ev.action.as_str(), ev.rule.as_str(), ev.method.as_str()),
            ("allow", "allow-cidr 127.0.0.1/32", "GET")
        );
        assert_eq!(
            (ev.host.as_str(), ev.port, ev.addr.as_deref()),
            ("127.0.0.1", up.addr.port(), Some("127.0.0.1"))
        );
        assert_eq!(
            (
                ev.bytes_up,
                ev.bytes_down,
                ev.path.as_str(),
                ev.sandbox.as_str()
            ),
            (0, 5, "proxy", "sb-test")
        );
    }
    // origin-form upstream, Host rewritten to the target
    let seen = up.seen.lock().unwrap().clone();
    assert_eq!(seen[0], format!("GET /hello host={}", up.addr));
}

#[tokio::test]
async fn post_content_length_and_chunked_bodies() {
    let up = upstream().await;
    let px = proxy(allow_loopback(), &[]).await;
    let mut c = Raw::connect(px.addr).await;
    let body: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let head = format!(
        "POST http://{}/echo HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        up.addr,
        body.len()
    );
    c.send(head.as_bytes()).await;
    c.send(&body).await;
    let r = c.response().await.unwrap().unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.body, body);
    // chunked request body on the same client connection
    let head = format!(
        "POST http://{}/echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
        up.addr
    );
    c.send(head.as_bytes()).await;
    c.send(b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n").await;
    let r = c.response().await.unwrap().unwrap();
    assert_eq!(r.text(), "hello world");
    let evs = px.events.wait(2).await;
    assert_eq!((evs[0].bytes_up, evs[0].bytes_down), (200_000, 200_000));
    assert_eq!((evs[1].bytes_up, evs[1].bytes_down), (11, 11));
    assert_eq!(evs[0].method, "POST");
}

#[tokio::test]
async fn chunked_response_streams() {
    let up = upstream().await;
    let px = proxy(allow_loopback(), &[]).await;
    let mut c = Raw::connect(px.addr).await;
    c.send(get(&format!("http://{}/chunked", up.addr)).as_bytes())
        .await;
    // The first chunk arrives before the upstream has sent the last one.
    let (status, head) = c.head().await.unwrap().unwrap();
    assert_eq!(status, 200);
    assert!(
        head.to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "{head}"
    );
    let mut rest = Vec::new();
    let mut tmp = [0u8; 1024];
    rest.extend(c.take_buf());
    while !rest.ends_with(b"0\r\n\r\n") {
        let n = c.s.read(&mut tmp).await.unwrap();
        assert!(n > 0);
        rest.extend_from_slice(&tmp[..n]);
    }
    let text = String::from_utf8(rest).unwrap();
    assert_eq!(text, "3\r\none\r\n3\r\ntwo\r\n5\r\nthree\r\n0\r\n\r\n");
    let evs = px.events.wait(1).await;
    assert_eq!(evs[0].bytes_down, 11);
}

#[tokio::test]
async fn connect_tunnel() {
    let up = upstream().await;
    let px = proxy(allow_loopback(), &[]).await;
    let mut c = Raw::connect(px.addr).await;
    let (status, head) = {
        c.send(format!("CONNECT {0} HTTP/1.1\r\nHost: {0}\r\n\r\n", up.addr).as_bytes())
            .await;
        c.head().await.unwrap().unwrap()
    };
    assert_eq!(status, 200);
    assert!(
        head.starts_with("HTTP/1.1 200 Connection established"),
        "{head}"
    );
    // Speak HTTP to the upstream through the tunnel, twice.
    let mut t = c;
    for _ in 0..2 {
        let r = t.roundtrip("GET /hello HTTP/1.1\r\nHost: up\r\n\r\n").await;
        assert_eq!(r.text(), "hello");
    }
    t.s.shutdown().await.unwrap();
    drop(t);
    let evs = px.events.wait(1).await;
    let ev = &evs[0];
    assert_eq!(
        (ev.method.as_str(), ev.action.as_str(), ev.rule.as_str()),
        ("CONNECT", "allow", "allow-cidr 127.0.0.1/32")
    );
    assert_eq!(
        ev.bytes_up,
        2 * "GET /hello HTTP/1.1\r\nHost: up\r\n\r\n".len() as u64
    );
    assert!(ev.bytes_down > 10);
}

#[tokio::test]
async fn expect_100_continue() {
    let up = upstream().await;
    let px = proxy(allow_loopback(), &[]).await;
    let mut c = Raw::connect(px.addr).await;
    let head = format!("POST http://{}/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n", up.addr);
    c.send(head.as_bytes()).await;
    let (status, _) = c.head().await.unwrap().unwrap();
    assert_eq!(
        status, 100,
        "proxy answers 100 Continue before the body is sent"
    );
    c.send(b"ping").await;
    let r = c.response().await.unwrap().unwrap();
    assert_eq!((r.status, r.text().as_str()), (200, "ping"));
    // blocked with Expect: 403 without waiting for the body
    let r = c.roundtrip("POST http://169.254.169.254/ HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n").await;
    assert_eq!(r.status, 403);
}

#[tokio::test]
async fn hop_by_hop_headers_are_stripped() {
    let up = upstream().await;
    let px = proxy(allow_loopback(), &[]).await;
    let mut c = Raw::connect(px.addr).await;
    let req = format!(
        "GET http://{}/headers HTTP/1.1\r\nHost: evil.example\r\nProxy-Authorization: Basic c2VjcmV0\r\n\
         Proxy-Connection: keep-alive\r\nConnection: keep-alive, X-Drop\r\nX-Drop: 1\r\nX-Keep: 2\r\nKeep-Alive: 5\r\n\r\n",
        up.addr
    );
    let r = c.roundtrip(&req).await;
    let text = r.text().to_ascii_lowercase();
    assert!(text.contains("x-keep: 2"), "{text}");
    assert!(text.contains(&format!("host: {}", up.addr)), "{text}");
    for gone in [
        "proxy-authorization",
        "proxy-connection",
        "x-drop",
        "keep-alive",
        "connection:",
    ] {
        assert!(!text.contains(gone), "{gone} forwarded: {text}");
    }
}

#[tokio::test]
async fn serve_unix_socket() {
    let up = upstream().await;
    let dir = std::env::temp_dir().join(format!("airlock-egress-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("egress.sock");
    let _ = std::fs::remove_file(&path);
    let l = tokio::net::UnixListener::bind(&path).unwrap();
    let px = proxy(allow_loopback(), &[]).await;
    tokio::spawn(px.egress.clone().serve_unix(l));
    let mut s = tokio::net::UnixStream::connect(&path).await.unwrap();
    s.write_all(get(&format!("http://{}/hello", up.addr)).as_bytes())
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let mut got = Vec::new();
    while !got.ends_with(b"hello") {
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    assert!(got.starts_with(b"HTTP/1.1 200"));
    px.events.wait(1).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn deny_mode_allows_only_listed() {
    let up = upstream().await;
    let mut p = Policy::new(Mode::Deny);
    p.add(Rule::host(Action::Allow, &format!("localhost:{}", up.addr.port())).unwrap());
    let px = proxy(p, &[("example.com", "93.184.216.34")]).await;
    let mut c = Raw::connect(px.addr).await;
    let r = c
        .roundtrip(&get(&format!("http://localhost:{}/hello", up.addr.port())))
        .await;
    assert_eq!((r.status, r.text().as_str()), (200, "hello"));
    // host.docker.internal is the host's loopback, and the localhost rule covers it
    let r = c
        .roundtrip(&get(&format!(
            "http://host.docker.internal:{}/hello",
            up.addr.port()
        )))
        .await;
    assert_eq!(r.status, 200);
    let r = c.roundtrip(&get("http://example.com/")).await;
    assert_eq!(r.status, 403);
    assert_eq!(r.header("x-airlock-block").as_deref(), Some("mode:deny"));
    assert_eq!(
        px.resolver.calls.load(Ordering::SeqCst),
        0,
        "a name blocked by name is never resolved"
    );
    let evs = px.events.wait(3).await;
    let rule = format!("allow-host localhost:{}", up.addr.port());
    assert_eq!(
        (evs[0].action.as_str(), evs[0].rule.as_str()),
        ("allow", rule.as_str())
    );
    assert_eq!(
        (evs[1].action.as_str(), evs[1].host.as_str()),
        ("allow", "host.docker.internal")
    );
    assert_eq!(
        (
            evs[2].action.as_str(),
            evs[2].rule.as_str(),
            evs[2].addr.as_deref()
        ),
        ("block", "mode:deny", None)
    );
}

/// A large echo through a CONNECT tunnel reached over a Unix socket (the sandbox path):
/// the spliced data path must carry every byte and count it.
#[tokio::test]
async fn connect_over_unix_large_echo() {
    let up = upstream().await;
    let dir = std::env::temp_dir().join(format!("airlock-egress-test-u{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("egress.sock");
    let _ = std::fs::remove_file(&path);
    let l = tokio::net::UnixListener::bind(&path).unwrap();
    let px = proxy(allow_loopback(), &[]).await;
    tokio::spawn(px.egress.clone().serve_unix(l));
    let s = tokio::net::UnixStream::connect(&path).await.unwrap();
    let (mut rd, mut wr) = s.into_split();
    let body: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
    let head = format!(
        "CONNECT {0} HTTP/1.1\r\nHost: {0}\r\n\r\nPOST /echo HTTP/1.1\r\nHost: up\r\nContent-Length: {1}\r\nConnection: close\r\n\r\n",
        up.addr,
        body.len()
    );
    let b2 = body.clone();
    let writer = tokio::spawn(async move {
        wr.write_all(head.as_bytes()).await.unwrap();
        wr.write_all(&b2).await.unwrap();
        wr
    });
    let mut got = Vec::new();
    rd.read_to_end(&mut got).await.unwrap();
    let _wr = writer.await.unwrap();
    let text_end = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    assert!(got.starts_with(b"HTTP/1.1 200 Connection established"));
    let rest = &got[text_end + 4..];
    let inner_end = rest.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    assert!(rest.starts_with(b"HTTP/1.1 200"));
    assert_eq!(&rest[inner_end + 4..], &body[..]);
    drop(_wr);
    let evs = px.events.wait(1).await;
    assert!(
        evs[0].bytes_up >= body.len() as u64 && evs[0].bytes_down >= body.len() as u64,
        "{:?}",
        evs[0]
    );
    let _ = std::fs::remove_dir_all(&dir);
}
