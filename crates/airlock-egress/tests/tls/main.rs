//! TLS termination and credential injection through the egress proxy (CONNECT path).
//! Everything listens on and dials 127.0.0.1 only.

mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use airlock_policy::{Action, Policy, Rule};
use airlock_secrets::{Credentials, Provider, SecretStore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use support::*;

fn allow_localhost(port: u16) -> Policy {
    let mut p = Policy::default();
    p.add(Rule::host(Action::Allow, &format!("localhost:{port}")).unwrap());
    p
}

const SECRET: &str = "sk-real-secret-0123456789";

fn test_credentials() -> Credentials {
    let p = Provider {
        name: "testprov".into(),
        hosts: vec!["localhost".into()],
        header: "x-api-key".into(),
        value_template: "{secret}".into(),
        env: vec!["TEST_API_KEY".into()],
        secret_name: "testprov".into(),
        placeholder_prefix: Some("sk-test-placeholder-".into()),
    };
    let store = SecretStore::open(std::path::Path::new("/nonexistent-airlock-store"));
    Credentials::resolve(&[p], &store, |k| {
        (k == "TEST_API_KEY").then(|| SECRET.to_string())
    })
    .unwrap()
}

#[tokio::test]
async fn get_over_h1_and_h2_with_leaf_cache() {
    let cases = [
        (BOTH, H1),
        (BOTH, H2),
        (BOTH, BOTH),
        (H1, H2),
        (H1, H1),
        (H1, BOTH),
    ];
    for (up_alpn, client_alpn) in cases {
        let up = upstream(up_alpn).await;
        let port = up.addr.port();
        let px = proxy(allow_localhost(port), &up.ca.der, None).await;
        let authority = format!("localhost:{port}");
        for _ in 0..2 {
            let tls = tls_via_proxy(
                px.addr,
                &authority,
                "localhost",
                px.ca.cert_der(),
                client_alpn,
            )
            .await
            .unwrap();
            let mut c = Client::new(tls).await;
            // mirrored ALPN: h2 to the client only if the upstream speaks it, unless the
            // client offers nothing else
            let client_h2 = client_alpn == H2 || (client_alpn == BOTH && up_alpn == BOTH);
            assert_eq!(c.is_h2(), client_h2, "{up_alpn:?} {client_alpn:?}");
            for _ in 0..2 {
                let r = c.get(&authority, "/hello", &[]).await;
                assert_eq!(r.status(), 200);
                assert_eq!(body_bytes(r.into_body()).await, b"hello");
            }
        }
        let evs = px.events.wait(4).await;
        for ev in &evs {
            assert_eq!(
                (
                    ev.method.as_str(),
                    ev.host.as_str(),
                    ev.port,
                    ev.action.as_str()
                ),
                ("GET", "localhost", port, "allow")
            );
            assert_eq!(ev.rule, format!("allow-host localhost:{port}"));
            assert_eq!(ev.addr.as_deref(), Some("127.0.0.1"));
            assert_eq!((ev.bytes_down, ev.path.as_str()), (5, "proxy"));
        }
        // one leaf minted for both connections
        assert_eq!(px.ca.cached_leaves(), 1);
        // the upstream spoke what it negotiated; requests on one client connection
        // share one upstream connection
        let seen = up.seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 4);
        // ALPN is mirrored: the upstream is offered what the client offered (an h2-only
        // client facing an h1-only upstream gets h2, translated)
        let want = if up_alpn == BOTH && client_alpn != H1 {
            http::Version::HTTP_2
        } else {
            http::Version::HTTP_11
        };
        assert!(seen.iter().all(|s| s.version == want), "{seen:?}");
        assert!(seen.iter().all(|s| s
            .headers
            .get("host")
            .is_none_or(|h| h == authority.as_str())));
        // each CONNECT dials the upstream before answering 200, but the second client
        // connection reuses the first one's upstream TLS connection
        assert_eq!(
            up.conns.load(Ordering::SeqCst),
            2,
            "{up_alpn:?} {client_alpn:?}"
        );
        assert_eq!(
            up.tls_conns.load(Ordering::SeqCst),
            1,
            "{up_alpn:?} {client_alpn:?}"
        );
    }
}

#[tokio::test]
async fn streaming_response_is_not_buffered() {
    for alpn in [H1, H2] {
        let up = upstream(BOTH).await;
        let port = up.addr.port();
        let px = proxy(allow_localhost(port), &up.ca.der, None).await;
        let authority = format!("localhost:{port}");
        let tls = tls_via_proxy(px.addr, &authority, "localhost", px.ca.cert_der(), alpn)
            .await
            .unwrap();
        let mut c = Client::new(tls).await;
        let r = c.get(&authority, "/stream", &[]).await;
        assert_eq!(r.status(), 200);
        let mut body = r.into_body();
        // the first event arrives while the upstream is still holding the second
        let first = tokio::time::timeout(Duration::from_secs(5), next_chunk(&mut body))
            .await
            .expect("first chunk must arrive before the upstream finishes")
            .unwrap();
        assert_eq!(&first[..], b"data: 1\n\n");
        up.release.notify_one();
        let rest = body_bytes(body).await;
        assert_eq!(rest, b"data: 2\n\n");
        let evs = px.events.wait(1).await;
        assert_eq!(evs[0].bytes_down, 18);
    }
}

#[tokio::test]
async fn credential_injected_and_placeholder_leak_blocked() {
    let up = upstream(BOTH).await;
    let port = up.addr.port();
    let creds = test_credentials();
    let env = creds.placeholder_env();
    assert_eq!(env.len(), 1);
    let (var, placeholder) = env[0].clone();
    assert_eq!(var, "TEST_API_KEY");
    assert!(placeholder.starts_with("sk-test-placeholder-"));
    let px = proxy(allow_localhost(port), &up.ca.der, Some(creds)).await;

    for alpn in [H1, H2] {
        let authority = format!("localhost:{port}");
        let tls = tls_via_proxy(px.addr, &authority, "localhost", px.ca.cert_der(), alpn)
            .await
            .unwrap();
        let mut c = Client::new(tls).await;
        let bearer = format!("Bearer {placeholder}");
        let r = c
            .get(
                &authority,
                "/v1/messages",
                &[("x-api-key", &placeholder), ("authorization", &bearer)],
            )
            .await;
        assert_eq!(r.status(), 200);
        body_bytes(r.into_body()).await;
    }
    {
        let seen = up.seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 2);
        for s in &seen {
            let got: Vec<_> = s.headers.get_all("x-api-key").iter().collect();
            assert_eq!(got, vec![SECRET], "upstream sees the real key only");
            // the provider's own placeholder in another header is dropped
            assert!(s.headers.get("authorization").is_none());
        }
    }
    let evs = px.events.wait(2).await;
    for ev in &evs {
        assert!(
            ev.reason.ends_with("credential injected: testprov"),
            "{ev:?}"
        );
        assert!(!format!("{ev:?}").contains(SECRET));
    }

    // The placeholder sent to another allowed host (same upstream, another name) is
    // refused and logged; the upstream sees nothing.
    let other = format!("host.docker.internal:{port}");
    for alpn in [H1, H2] {
        let tls = tls_via_proxy(
            px.addr,
            &other,
            "host.docker.internal",
            px.ca.cert_der(),
            alpn,
        )
        .await
        .unwrap();
        let mut c = Client::new(tls).await;
        let bearer = format!("Bearer {placeholder}");
        let r = c
            .get(&other, "/upload", &[("authorization", bearer.as_str())])
            .await;
        assert_eq!(r.status(), 403);
        assert_eq!(
            r.headers().get("x-airlock-block").unwrap(),
            "credential-placeholder"
        );
        let text = String::from_utf8(body_bytes(r.into_body()).await).unwrap();
        assert!(
            text.contains("credential placeholder sent to non-provider host"),
            "{text}"
        );
        // without a placeholder the same host works (no injection there)
        let r = c.get(&other, "/ok", &[("x-api-key", "mine")]).await;
        assert_eq!(r.status(), 200);
        body_bytes(r.into_body()).await;
    }
    let evs = px.events.wait(6).await;
    let blocked: Vec<_> = evs.iter().filter(|e| e.action == "block").collect();
    assert_eq!(blocked.len(), 2);
    for ev in blocked {
        assert_eq!(ev.rule, "credential-placeholder");
        assert!(ev
            .reason
            .contains("credential placeholder sent to non-provider host"));
        assert_eq!(ev.host, "host.docker.internal");
    }
    let seen = up.seen.lock().unwrap().clone();
    assert_eq!(
        seen.len(),
        4,
        "the leaking requests never reached the upstream"
    );
    assert!(seen.iter().all(|s| s.method == "GET"));
    assert!(seen.iter().all(|s| s.path != "/upload"));
    let ok: Vec<_> = seen.iter().filter(|s| s.path == "/ok").collect();
    assert!(ok
        .iter()
        .all(|s| s.headers.get("x-api-key").unwrap() == "mine"));
}

#[tokio::test]
async fn host_differing_from_sni_is_blocked() {
    let up = upstream(BOTH).await;
    let port = up.addr.port();
    let px = proxy(allow_localhost(port), &up.ca.der, None).await;
    let authority = format!("localhost:{port}");
    for alpn in [H1, H2] {
        let tls = tls_via_proxy(px.addr, &authority, "localhost", px.ca.cert_der(), alpn)
            .await
            .unwrap();
        let mut c = Client::new(tls).await;
        let r = c
            .get(&format!("host.docker.internal:{port}"), "/hello", &[])
            .await;
        assert_eq!(r.status(), 421);
        assert_eq!(
            r.headers().get("x-airlock-block").unwrap(),
            "domain-fronting"
        );
    }
    let evs = px.events.wait(2).await;
    for ev in &evs {
        assert_eq!(
            (ev.action.as_str(), ev.rule.as_str()),
            ("block", "domain-fronting")
        );
        assert_eq!(
            ev.reason,
            "domain fronting: Host host.docker.internal ≠ SNI localhost"
        );
    }
    assert!(up.seen.lock().unwrap().is_empty());
}

#[tokio::test]
async fn sni_differing_from_connect_is_blocked() {
    let up = upstream(BOTH).await;
    let port = up.addr.port();
    let px = proxy(allow_localhost(port), &up.ca.der, None).await;
    let r = tls_via_proxy(
        px.addr,
        &format!("localhost:{port}"),
        "host.docker.internal",
        px.ca.cert_der(),
        H1,
    )
    .await;
    assert!(r.is_err(), "handshake must fail");
    let evs = px.events.wait(1).await;
    assert_eq!(
        (evs[0].action.as_str(), evs[0].rule.as_str()),
        ("block", "domain-fronting")
    );
    assert_eq!(
        evs[0].reason,
        "domain fronting: SNI host.docker.internal ≠ CONNECT localhost"
    );
    // (the CONNECT dialed the upstream before answering 200, but sent it nothing)
    assert!(up.seen.lock().unwrap().is_empty(), "nothing sent upstream");
}

#[tokio::test]
async fn bypass_sees_the_upstream_certificate() {
    let up = upstream(BOTH).await;
    let port = up.addr.port();
    let mut p = Policy::default();
    p.add(Rule::host(Action::Bypass, &format!("localhost:{port}")).unwrap());
    let px = proxy(p, &up.ca.der, Some(test_credentials())).await;
    let authority = format!("localhost:{port}");
    // the airlock CA does not vouch for what the client sees...
    let e = tls_via_proxy(px.addr, &authority, "localhost", px.ca.cert_der(), H1)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("UnknownIssuer"), "{e}");
    // ...the upstream's own CA does
    let tls = tls_via_proxy(px.addr, &authority, "localhost", &up.ca.der, H1)
        .await
        .unwrap();
    let mut c = Client::new(tls).await;
    let r = c
        .get(&authority, "/hello", &[("x-api-key", "client-sent")])
        .await;
    assert_eq!(r.status(), 200);
    body_bytes(r.into_body()).await;
    drop(c);
    // no injection on a bypassed host
    let seen = up.seen.lock().unwrap().clone();
    assert_eq!(seen[0].headers.get("x-api-key").unwrap(), "client-sent");
    let evs = px.events.wait(2).await;
    assert!(evs
        .iter()
        .all(|e| e.action == "bypass" && e.method == "CONNECT"));
    assert_eq!(px.ca.cached_leaves(), 0);
}

#[tokio::test]
async fn plain_bytes_in_connect_are_tunnelled() {
    // a plain TCP echo-ish server
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut b = [0u8; 4];
        s.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"ping");
        s.write_all(b"pong").await.unwrap();
    });
    let ca = test_ca();
    let mut p = Policy::default();
    p.add(Rule::cidr(Action::Allow, "127.0.0.1/32").unwrap());
    let px = proxy(p, &ca.der, None).await;
    let mut s = connect(px.addr, &addr.to_string()).await.unwrap();
    s.write_all(b"ping").await.unwrap();
    let mut b = [0u8; 4];
    s.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"pong");
    drop(s);
    let evs = px.events.wait(1).await;
    assert_eq!(
        (evs[0].method.as_str(), evs[0].bytes_up, evs[0].bytes_down),
        ("CONNECT", 4, 4)
    );
}

#[tokio::test]
async fn upstream_not_trusted_is_502() {
    let up = upstream(BOTH).await;
    let port = up.addr.port();
    let other = test_ca(); // the proxy trusts a different CA
    let px = proxy(allow_localhost(port), &other.der, None).await;
    let authority = format!("localhost:{port}");
    let tls = tls_via_proxy(px.addr, &authority, "localhost", px.ca.cert_der(), H1)
        .await
        .unwrap();
    let mut c = Client::new(tls).await;
    let r = c.get(&authority, "/hello", &[]).await;
    assert_eq!(r.status(), 502);
    let text = String::from_utf8(body_bytes(r.into_body()).await).unwrap();
    assert!(text.contains("upstream TLS"), "{text}");
    let evs = px.events.wait(1).await;
    assert!(evs[0].reason.contains("upstream TLS"), "{:?}", evs[0]);
}

#[tokio::test]
async fn client_not_trusting_the_ca_is_logged() {
    let up = upstream(BOTH).await;
    let port = up.addr.port();
    let px = proxy(allow_localhost(port), &up.ca.der, None).await;
    let authority = format!("localhost:{port}");
    let e = tls_via_proxy(px.addr, &authority, "localhost", &up.ca.der, H1)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("UnknownIssuer"), "{e}");
    let evs = px.events.wait(1).await;
    assert!(
        evs[0].reason.contains("client TLS handshake failed"),
        "{:?}",
        evs[0]
    );
}

#[tokio::test]
async fn policy_change_applies_to_the_next_request_inside_a_session() {
    let up = upstream(BOTH).await;
    let port = up.addr.port();
    let px = proxy(allow_localhost(port), &up.ca.der, None).await;
    let authority = format!("localhost:{port}");
    for alpn in [H1, H2] {
        px.egress.set_policy(allow_localhost(port));
        let tls = tls_via_proxy(px.addr, &authority, "localhost", px.ca.cert_der(), alpn)
            .await
            .unwrap();
        let mut c = Client::new(tls).await;
        let r = c.get(&authority, "/hello", &[]).await;
        assert_eq!(r.status(), 200);
        body_bytes(r.into_body()).await;
        let mut p = Policy::default();
        p.add(Rule::host(Action::Block, "localhost").unwrap());
        px.egress.set_policy(p);
        let r = c.get(&authority, "/hello", &[]).await;
        assert_eq!(r.status(), 403);
        assert_eq!(
            r.headers().get("x-airlock-block").unwrap(),
            "block-host localhost"
        );
    }
    let evs = px.events.wait(4).await;
    let actions: Vec<_> = evs.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(actions, vec!["allow", "block", "allow", "block"]);
}

#[tokio::test]
async fn transparent_entry_point_terminates_and_polices() {
    let up = upstream(BOTH).await;
    let port = up.addr.port();
    let creds = test_credentials();
    let placeholder = creds.placeholders()[0].clone();
    let px = proxy(allow_localhost(port), &up.ca.der, Some(creds)).await;
    // stand-in for the transparent path: a listener whose flows "were destined to"
    // localhost:PORT
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let entry = l.local_addr().unwrap();
    let egress = px.egress.clone();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            let egress = egress.clone();
            tokio::spawn(async move {
                egress
                    .serve_tls_intercepted(s, "localhost", port, "transparent")
                    .await
            });
        }
    });
    let authority = format!("localhost:{port}");
    for alpn in [H1, H2] {
        let tcp = tokio::net::TcpStream::connect(entry).await.unwrap();
        let name = airlock_tls::rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let tls = tokio_rustls::TlsConnector::from(client_config(px.ca.cert_der(), alpn))
            .connect(name, tcp)
            .await
            .unwrap();
        let mut c = Client::new(tls).await;
        let r = c
            .get(&authority, "/v1", &[("x-api-key", &placeholder)])
            .await;
        assert_eq!(r.status(), 200);
        body_bytes(r.into_body()).await;
    }
    // known by address only: SNI decides, the upstream is dialed at that address
    let tls = {
        let l2 = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let entry2 = l2.local_addr().unwrap();
        let egress = px.egress.clone();
        tokio::spawn(async move {
            let (s, _) = l2.accept().await.unwrap();
            egress
                .serve_tls_intercepted(s, "127.0.0.1", port, "transparent")
                .await
        });
        let tcp = tokio::net::TcpStream::connect(entry2).await.unwrap();
        let name = airlock_tls::rustls::pki_types::ServerName::try_from("localhost").unwrap();
        tokio_rustls::TlsConnector::from(client_config(px.ca.cert_der(), H1))
            .connect(name, tcp)
            .await
            .unwrap()
    };
    let mut c = Client::new(tls).await;
    let r = c
        .get(&authority, "/pinned", &[("x-api-key", &placeholder)])
        .await;
    assert_eq!(r.status(), 200);
    body_bytes(r.into_body()).await;
    // not TLS on the TLS path: refused and logged
    let mut s = tokio::net::TcpStream::connect(entry).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf).await;
    assert!(buf.is_empty());
    let evs = px.events.wait(4).await;
    for ev in &evs[..3] {
        assert_eq!(ev.host, "localhost");
        assert_eq!(
            (ev.path.as_str(), ev.action.as_str()),
            ("transparent", "allow")
        );
        assert!(ev.reason.ends_with("credential injected: testprov"));
    }
    assert_eq!(
        (evs[3].action.as_str(), evs[3].reason.as_str()),
        ("block", "not a TLS ClientHello")
    );
    let seen = up.seen.lock().unwrap().clone();
    assert!(seen
        .iter()
        .all(|s| s.headers.get("x-api-key").unwrap() == SECRET));
}

#[tokio::test]
async fn placeholder_over_plain_http_is_blocked() {
    let creds = test_credentials();
    let placeholder = creds.placeholders()[0].clone();
    let ca = test_ca();
    let mut p = Policy::default();
    p.add(Rule::cidr(Action::Allow, "127.0.0.1/32").unwrap());
    let px = proxy(p, &ca.der, Some(creds)).await;
    // nothing listens there: the request must be refused before any dial
    let mut s = tokio::net::TcpStream::connect(px.addr).await.unwrap();
    let req = format!(
        "GET http://127.0.0.1:9/x?k={placeholder} HTTP/1.1\r\nHost: 127.0.0.1:9\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 403"), "{out}");
    assert!(
        out.contains("x-airlock-block: credential-placeholder"),
        "{out}"
    );
    let evs = px.events.wait(1).await;
    assert!(evs[0]
        .reason
        .contains("credential placeholder sent to non-provider host"));
}
