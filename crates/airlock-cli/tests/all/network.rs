//! Egress policy, tried from inside a sandbox through the proxy it is
//! given, with every forbidden destination backed by a test listener.

use crate::world::*;

fn curl(w: &World, sb: &str, args: &str) -> (String, String) {
    let out = w.sh(
        sb,
        &format!("curl -sS -m 10 -o - -w '\\n%{{http_code}}' {args}"),
    );
    let so = text(&out.stdout);
    let code = so.lines().last().unwrap_or("").to_string();
    (code, so)
}

fn find_event<'a>(
    evs: &'a [serde_json::Value],
    host: &str,
    port: u16,
) -> Vec<&'a serde_json::Value> {
    evs.iter()
        .filter(|e| e["host"] == host && e["port"] == port)
        .collect()
}

#[test]
fn forbidden_destinations_are_blocked_and_logged() {
    let w = World::new();
    let sb = w.sandbox("egress");
    // Cloud metadata, a 10.x address, a 192.168.x address, by IP and by a
    // name that points there; and the host's loopback service by its
    // in-sandbox name.
    let port = w.host_port;
    let cases: Vec<(String, String, u16)> = vec![
        (
            format!("http://{METADATA_IP}/latest/meta-data/"),
            METADATA_IP.into(),
            80,
        ),
        ("http://metadata.test/".into(), "metadata.test".into(), 80),
        (format!("http://{PRIVATE10_IP}/"), PRIVATE10_IP.into(), 80),
        ("http://internal.test/".into(), "internal.test".into(), 80),
        (format!("http://{PRIVATE192_IP}/"), PRIVATE192_IP.into(), 80),
        (
            format!("http://host.docker.internal:{port}/"),
            "host.docker.internal".into(),
            port,
        ),
        (
            format!("http://rebind.test:{port}/"),
            "rebind.test".into(),
            port,
        ),
    ];
    for (url, _, _) in &cases {
        let (code, body) = curl(&w, &sb, url);
        assert_eq!(code, "403", "{url} not blocked: {body}");
        assert!(body.contains("airlock: blocked"), "{body}");
    }
    // CONNECT to a forbidden place is refused the same way.
    let out = w.sh(
        &sb,
        &format!("curl -sS -m 10 -p http://{METADATA_IP}:443/ 2>&1"),
    );
    assert_fails(&out, "CONNECT to metadata");
    // Nothing arrived anywhere.
    assert!(w.outer.hits().is_empty(), "leaked: {:?}", w.outer.hits());
    assert!(
        w.host_service.hits().is_empty(),
        "leaked: {:?}",
        w.host_service.hits()
    );
    // Every attempt is an event with a rule and a reason.
    let evs = w.events(&sb);
    for (_, host, port) in &cases {
        let e = find_event(&evs, host, *port);
        assert!(!e.is_empty(), "no event for {host}:{port}: {evs:?}");
        assert_eq!(e[0]["action"], "block", "{:?}", e[0]);
        assert!(!e[0]["rule"].as_str().unwrap().is_empty());
        assert!(!e[0]["reason"].as_str().unwrap().is_empty());
        assert_eq!(e[0]["sandbox"], sb);
        assert_eq!(e[0]["path"], "proxy");
    }
    // The human log groups by host.
    let out = w.airlock(&["network", "log", &sb]);
    assert_ok(&out, "network log");
    let t = text(&out.stdout);
    assert!(
        t.contains("169.254.169.254:80") && t.contains("BLOCKED"),
        "{t}"
    );
    // And the audit file has the same events as JSON lines.
    let audit = std::fs::read_to_string(w.data_dir().join("audit.jsonl")).unwrap();
    assert!(audit.lines().count() >= cases.len(), "{audit}");
    assert!(audit.contains("\"169.254.169.254\""));
}

#[test]
fn host_service_opens_with_a_live_policy_change() {
    let w = World::new();
    let sb = w.sandbox("hostsvc");
    let port = w.host_port;
    let url = format!("http://host.docker.internal:{port}/ping");
    let (code, _) = curl(&w, &sb, &url);
    assert_eq!(code, "403");
    assert!(w.host_service.hits().is_empty());
    let out = w.airlock(&[
        "network",
        "proxy",
        &sb,
        "--allow-host",
        &format!("localhost:{port}"),
    ]);
    assert_ok(&out, "network proxy --allow-host");
    let (code, body) = curl(&w, &sb, &url);
    assert_eq!(code, "200", "{body}");
    assert!(body.contains("hello from host-service"), "{body}");
    assert_eq!(w.host_service.hits().len(), 1);
    // The alias works too, and another port stays closed.
    let (code, _) = curl(&w, &sb, &format!("http://host.airlock.internal:{port}/"));
    assert_eq!(code, "200");
    let (code, _) = curl(
        &w,
        &sb,
        &format!(
            "http://host.docker.internal:{}/",
            port.wrapping_add(1).max(1)
        ),
    );
    assert_eq!(code, "403");
    // A name that rebinds to loopback is still blocked: the rule names
    // localhost, not rebind.test.
    let (code, _) = curl(&w, &sb, &format!("http://rebind.test:{port}/"));
    assert_eq!(code, "403");
    assert_eq!(w.host_service.hits().len(), 2);
    let evs = w.events(&sb);
    assert!(
        evs.iter().any(|e| e["action"] == "allow"
            && e["rule"]
                .as_str()
                .unwrap()
                .contains(&format!("localhost:{port}"))),
        "{evs:?}"
    );
}

#[test]
fn deny_mode_allows_only_what_is_listed() {
    let w = World::new();
    let sb = w.sandbox("deny");
    // Allow mode: a public name goes through.
    let (code, body) = curl(&w, &sb, "http://allowed.test/a");
    assert_eq!(code, "200", "{body}");
    let out = w.airlock(&[
        "network",
        "proxy",
        &sb,
        "--policy",
        "deny",
        "--allow-host",
        "allowed.test",
    ]);
    assert_ok(&out, "network proxy --policy deny");
    let (code, body) = curl(&w, &sb, "-X POST -d secret=1 http://blocked.test/upload");
    assert_eq!(code, "403", "{body}");
    let (code, _) = curl(&w, &sb, &format!("http://{BLOCKED_IP}/"));
    assert_eq!(code, "403");
    let (code, body) = curl(&w, &sb, "-X POST -d ok=1 http://allowed.test/b");
    assert_eq!(code, "200", "{body}");
    // HTTPS-style tunnel to an allowed host reaches it; to others not.
    let out = w.sh(
        &sb,
        "curl -sS -m 10 -p http://allowed.test:443/ -o /dev/null -w '%{http_connect}'",
    );
    assert!(text(&out.stdout).contains("200"), "{}", text(&out.stdout));
    let out = w.sh(
        &sb,
        "curl -sS -m 10 -p http://blocked.test:443/ -o /dev/null -w '%{http_connect}'",
    );
    assert!(text(&out.stdout).contains("403"), "{}", text(&out.stdout));
    assert!(
        w.outer.hits_to(BLOCKED_IP).is_empty(),
        "leaked: {:?}",
        w.outer.hits_to(BLOCKED_IP)
    );
    let hits = w.outer.hits_to(ALLOWED_IP);
    assert!(
        hits.iter().any(|h| h.first_line.starts_with("POST /b")),
        "{hits:?}"
    );
    let evs = w.events(&sb);
    let blocked_post = evs
        .iter()
        .find(|e| e["host"] == "blocked.test")
        .expect("event for blocked.test");
    assert_eq!(blocked_post["action"], "block");
    assert_eq!(blocked_post["method"], "POST");
    // inspect shows the policy
    let out = w.airlock(&["inspect", &sb, "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["policy"]["mode"], "deny");
}

#[test]
fn bad_policy_input_changes_nothing() {
    let w = World::new();
    let sb = w.sandbox("badpol");
    for args in [
        vec!["--allow-host", "exa mple.com"],
        vec!["--allow-host", "*"],
        vec!["--block-host", "example.com:99999"],
        vec!["--allow-cidr", "10.0.0.0/33"],
        vec!["--allow-cidr", "nonsense"],
        vec!["--allow-host", "ok.com", "--block-cidr", "1.2.3.4/40"],
    ] {
        let mut a = vec!["network", "proxy", sb.as_str()];
        a.extend(args.iter().copied());
        let out = w.airlock(&a);
        assert_fails(&out, &format!("{args:?}"));
        let err = text(&out.stderr);
        assert!(err.starts_with("airlock: error: invalid"), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
    let out = w.airlock(&["inspect", &sb, "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["policy"]["rules"].as_array().unwrap().len(), 0, "{v}");
    // Unknown profile: refused, nothing changed.
    let out = w.airlock(&["network", "proxy", &sb, "--profile", "nope"]);
    assert_fails(&out, "unknown profile");
    assert!(text(&out.stderr).contains("unknown profile"));
    // A named profile: deny mode with the agent's hosts.
    let out = w.airlock(&["network", "proxy", &sb, "--profile", "claude", "--json"]);
    assert_ok(&out, "--profile claude");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["policy"]["mode"], "deny");
    let rules = v["policy"]["rules"].to_string();
    assert!(
        rules.contains("allow-host api.anthropic.com") && rules.contains("registry.npmjs.org"),
        "{rules}"
    );
    let (code, _) = curl(&w, &sb, "http://allowed.test/");
    assert_eq!(code, "403");
}
