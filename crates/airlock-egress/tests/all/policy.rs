//! Blocking: default ranges, rebinding, policy swaps, upstream failures.

use std::sync::atomic::Ordering;

use airlock_policy::{Action, Policy, Rule};

use crate::support::*;

#[tokio::test]
async fn default_policy_blocks_loopback_metadata_and_rebinding() {
    let up = upstream().await;
    let px = proxy(
        Policy::default(),
        &[
            ("rebind.test", "127.0.0.1"),
            ("meta.test", "169.254.169.254"),
        ],
    )
    .await;
    let mut c = Raw::connect(px.addr).await;
    let port = up.addr.port();

    let r = c
        .roundtrip(&get(&format!("http://127.0.0.1:{port}/hello")))
        .await;
    assert_eq!(r.status, 403);
    assert_eq!(
        r.header("x-airlock-block").as_deref(),
        Some("default-range:loopback")
    );
    assert_eq!(
        r.text(),
        format!(
            "airlock: blocked 127.0.0.1:{port} by default-range:loopback: 127.0.0.1 is loopback\n"
        )
    );
    assert!(r.header("content-type").unwrap().starts_with("text/plain"));

    let r = c
        .roundtrip(&get("http://169.254.169.254/latest/meta-data/"))
        .await;
    assert_eq!(r.status, 403);
    assert!(r.text().contains("cloud metadata"), "{}", r.text());

    // a name that resolves to loopback (DNS rebinding) is blocked; nothing is dialed
    let r = c
        .roundtrip(&get(&format!("http://rebind.test:{port}/hello")))
        .await;
    assert_eq!(r.status, 403);
    let r = c
        .roundtrip(&format!(
            "CONNECT rebind.test:{port} HTTP/1.1\r\nHost: rebind.test:{port}\r\n\r\n"
        ))
        .await;
    assert_eq!(r.status, 403);
    let r = c.roundtrip(&get("http://meta.test/")).await;
    assert_eq!(
        r.header("x-airlock-block").as_deref(),
        Some("default-range:link-local")
    );
    // IPv6 loopback and mapped forms
    let r = c
        .roundtrip(&format!("CONNECT [::1]:{port} HTTP/1.1\r\nHost: x\r\n\r\n"))
        .await;
    assert_eq!(
        r.header("x-airlock-block").as_deref(),
        Some("default-range:loopback")
    );
    let r = c
        .roundtrip(&get(&format!("http://[::ffff:127.0.0.1]:{port}/hello")))
        .await;
    assert_eq!(
        r.header("x-airlock-block").as_deref(),
        Some("default-range:loopback")
    );
    // host loopback alias is blocked unless a rule allows it
    let r = c
        .roundtrip(&get(&format!("http://host.docker.internal:{port}/hello")))
        .await;
    assert_eq!(r.status, 403);

    assert_eq!(
        up.conns.load(Ordering::SeqCst),
        0,
        "upstream must see no connection"
    );
    let evs = px.events.wait(8).await;
    assert!(evs.iter().all(|e| e.action == "block"), "{evs:#?}");
    assert_eq!(evs[2].host, "rebind.test");
    assert_eq!(evs[2].addr.as_deref(), Some("127.0.0.1"));
    assert_eq!(evs[3].method, "CONNECT");
    assert_eq!(evs[5].host, "::1");
}

#[tokio::test]
async fn set_policy_applies_to_next_request() {
    let up = upstream().await;
    let mut allow = Policy::default();
    allow.add(Rule::cidr(Action::Allow, "127.0.0.1/32").unwrap());
    let px = proxy(allow.clone(), &[]).await;
    let mut c = Raw::connect(px.addr).await;
    let url = format!("http://{}/hello", up.addr);
    assert_eq!(c.roundtrip(&get(&url)).await.status, 200);
    px.egress.set_policy(Policy::default());
    let r = c.roundtrip(&get(&url)).await;
    assert_eq!(
        r.status, 403,
        "same client connection, cached upstream must not bypass the new policy"
    );
    let mut block = allow.clone();
    block.add(Rule::host(Action::Block, &format!("127.0.0.1:{}", up.addr.port())).unwrap());
    px.egress.set_policy(allow);
    assert_eq!(c.roundtrip(&get(&url)).await.status, 200);
    px.egress.set_policy(block);
    let r = c.roundtrip(&get(&url)).await;
    assert_eq!(
        r.header("x-airlock-block"),
        Some(format!("block-host 127.0.0.1:{}", up.addr.port()))
    );
    let evs = px.events.wait(4).await;
    let actions: Vec<&str> = evs.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(actions, ["allow", "block", "allow", "block"]);
}

#[tokio::test]
async fn upstream_connect_failure_is_502() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = l.local_addr().unwrap();
    drop(l);
    let mut p = Policy::default();
    p.add(Rule::cidr(Action::Allow, "127.0.0.1/32").unwrap());
    let px = proxy(p, &[]).await;
    let mut c = Raw::connect(px.addr).await;
    let r = c.roundtrip(&get(&format!("http://{dead}/"))).await;
    assert_eq!(r.status, 502);
    let r = c
        .roundtrip(&format!("CONNECT {dead} HTTP/1.1\r\nHost: x\r\n\r\n"))
        .await;
    assert_eq!(r.status, 502);
    let r = c.roundtrip(&get("http://nxdomain.test/")).await;
    assert_eq!(r.status, 502);
    let evs = px.events.wait(3).await;
    assert_eq!(evs[0].action, "allow");
    assert!(
        evs[0].reason.contains("upstream error"),
        "{}",
        evs[0].reason
    );
    assert!(evs[2].reason.contains("resolve"), "{}", evs[2].reason);
}

#[tokio::test]
async fn bypass_rule_is_reported() {
    let up = upstream().await;
    let mut p = Policy::default();
    p.add(Rule::host(Action::Bypass, &format!("localhost:{}", up.addr.port())).unwrap());
    let px = proxy(p, &[]).await;
    let mut c = Raw::connect(px.addr).await;
    c.send(
        format!(
            "CONNECT localhost:{} HTTP/1.1\r\nHost: x\r\n\r\n",
            up.addr.port()
        )
        .as_bytes(),
    )
    .await;
    let (status, _) = c.head().await.unwrap().unwrap();
    assert_eq!(status, 200);
    drop(c);
    let evs = px.events.wait(1).await;
    assert_eq!(evs[0].action, "bypass");
}
