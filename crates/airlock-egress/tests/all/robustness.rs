//! Abusive and malformed input: every bad request gets 400/431 (or a close) and the
//! proxy keeps serving.

use airlock_policy::{Action, Policy, Rule};
use proptest::prelude::*;

use crate::support::*;

async fn still_serves(px: &Proxy) {
    let up = upstream().await;
    px.egress.set_policy({
        let mut p = Policy::default();
        p.add(Rule::cidr(Action::Allow, "127.0.0.1/32").unwrap());
        p
    });
    let mut c = Raw::connect(px.addr).await;
    let r = c
        .roundtrip(&get(&format!("http://{}/hello", up.addr)))
        .await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn bad_requests_get_400_and_an_event() {
    let px = proxy(Policy::default(), &[]).await;
    let cases = [
        "CONNECT example.com HTTP/1.1\r\nHost: example.com\r\n\r\n",
        "CONNECT example.com: HTTP/1.1\r\nHost: example.com\r\n\r\n",
        "CONNECT example.com:0 HTTP/1.1\r\nHost: example.com\r\n\r\n",
        "GET /path HTTP/1.1\r\n\r\n",
        "GET https://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n",
        "GET http://exa mple.com/ HTTP/1.1\r\nHost: x\r\n\r\n",
        "GARBAGE\r\n\r\n",
    ];
    for (i, req) in cases.iter().enumerate() {
        let mut c = Raw::connect(px.addr).await;
        c.send(req.as_bytes()).await;
        let r = c
            .response()
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("case {i}: closed without a response"));
        assert_eq!(r.status, 400, "case {i} {req:?}: {r:?}");
    }
    let evs = px.events.wait(cases.len()).await;
    assert!(
        evs.iter()
            .all(|e| e.action == "block" && e.rule == "bad-request"),
        "{evs:#?}"
    );
    still_serves(&px).await;
}

#[tokio::test]
async fn oversized_head_is_refused() {
    let px = proxy(Policy::default(), &[]).await;
    let mut c = Raw::connect(px.addr).await;
    let big = format!(
        "GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\nX-Big: {}\r\n\r\n",
        "a".repeat(70 * 1024)
    );
    // The proxy may answer and close before reading everything: ignore write errors.
    let _ = tokio::io::AsyncWriteExt::write_all(&mut c.s, big.as_bytes()).await;
    match c.response().await {
        Ok(Some(r)) => assert_eq!(r.status, 431),
        other => panic!("expected 431, got {other:?}"),
    }
    // just under the limit is fine (blocked by policy, but parsed)
    let mut c = Raw::connect(px.addr).await;
    let ok = format!(
        "GET http://127.0.0.1/ HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(60 * 1024)
    );
    assert_eq!(c.roundtrip(&ok).await.status, 403);
    still_serves(&px).await;
}

#[tokio::test]
async fn slow_head_times_out() {
    use std::time::Duration;
    let events = std::sync::Arc::new(Events::default());
    let egress = std::sync::Arc::new(airlock_egress::Egress::with_limits(
        airlock_egress::EgressConfig {
            sandbox: "t".into(),
            policy: Policy::default(),
            sink: events.clone(),
            resolver: std::sync::Arc::new(StubResolver::default()),
        },
        airlock_egress::Limits {
            head_timeout: Duration::from_millis(300),
            ..Default::default()
        },
    ));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(egress.serve_tcp(l));
    let mut c = Raw::connect(addr).await;
    c.send(b"GET http://example.com/ HTTP/1.1\r\nHost: exa")
        .await;
    let t0 = std::time::Instant::now();
    let r = c.response().await;
    assert!(matches!(r, Ok(None) | Ok(Some(_)) | Err(_)));
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]

    /// Random request heads never crash the proxy: each gets an HTTP response or a
    /// close, and the proxy serves a valid request afterwards.
    #[test]
    fn random_heads(method in "(GET|CONNECT|POST|[A-Z]{1,8})",
                    target in "[ -~]{0,40}",
                    headers in proptest::collection::vec("[ -~]{0,30}", 0..4),
                    raw in proptest::collection::vec(any::<u8>(), 0..64)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let px = proxy(Policy::default(), &[]).await;
            for req in [
                format!("{method} {target} HTTP/1.1\r\n{}\r\n\r\n", headers.join("\r\n")),
                String::from_utf8_lossy(&raw).into_owned() + "\r\n\r\n",
            ] {
                let mut c = Raw::connect(px.addr).await;
                c.send(req.as_bytes()).await;
                if let Ok(Some(r)) = c.response().await {
                    assert!(matches!(r.status, 400 | 403 | 405 | 431 | 501 | 502 | 505), "{req:?} -> {r:?}");
                }
            }
            still_serves(&px).await;
        });
    }
}
