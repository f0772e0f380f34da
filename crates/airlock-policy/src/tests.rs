use super::*;
use proptest::prelude::*;

fn pol(mode: Mode, rules: &[&str]) -> Policy {
    let mut p = Policy::new(mode);
    for r in rules {
        p.add(r.parse().unwrap_or_else(|e| panic!("{r}: {e}")));
    }
    p
}

/// (mode, rules, host, port, addr, expected action, expected rule)
type Row = (
    Mode,
    &'static [&'static str],
    &'static str,
    u16,
    Option<&'static str>,
    &'static str,
    &'static str,
);

#[test]
fn decision_table() {
    use Mode::{Allow as A, Deny as D};
    let rows: &[Row] = &[
        // --- modes
        (
            A,
            &[],
            "example.com",
            443,
            Some("93.184.216.34"),
            "allow",
            "mode:allow",
        ),
        (
            D,
            &[],
            "example.com",
            443,
            Some("93.184.216.34"),
            "block",
            "mode:deny",
        ),
        (D, &[], "example.com", 443, None, "block", "mode:deny"),
        (A, &[], "example.com", 443, None, "allow", "mode:allow"),
        // --- precedence: exact host:port > exact host > longest wildcard > cidr > mode
        (
            D,
            &["allow-host example.com"],
            "example.com",
            443,
            Some("93.184.216.34"),
            "allow",
            "allow-host example.com",
        ),
        (
            D,
            &["allow-host example.com", "block-host example.com:22"],
            "example.com",
            22,
            Some("93.184.216.34"),
            "block",
            "block-host example.com:22",
        ),
        (
            D,
            &["allow-host example.com", "block-host example.com:22"],
            "example.com",
            443,
            Some("93.184.216.34"),
            "allow",
            "allow-host example.com",
        ),
        (
            A,
            &["block-host example.com", "allow-host example.com:443"],
            "example.com",
            443,
            Some("93.184.216.34"),
            "allow",
            "allow-host example.com:443",
        ),
        (
            A,
            &["block-host *.example.com", "allow-host api.example.com"],
            "api.example.com",
            443,
            Some("93.184.216.34"),
            "allow",
            "allow-host api.example.com",
        ),
        (
            A,
            &["block-host *.example.com", "allow-host api.example.com"],
            "www.example.com",
            443,
            Some("93.184.216.34"),
            "block",
            "block-host *.example.com",
        ),
        (
            D,
            &[
                "allow-host *.example.com",
                "block-host *.internal.example.com",
            ],
            "x.internal.example.com",
            443,
            Some("93.184.216.34"),
            "block",
            "block-host *.internal.example.com",
        ),
        (
            A,
            &["block-host *.example.com", "allow-host *.cdn.example.com"],
            "a.cdn.example.com",
            443,
            Some("93.184.216.34"),
            "allow",
            "allow-host *.cdn.example.com",
        ),
        (
            D,
            &["allow-host *.example.com:443", "block-host *.example.com"],
            "a.example.com",
            443,
            Some("93.184.216.34"),
            "allow",
            "allow-host *.example.com:443",
        ),
        (
            D,
            &["allow-host *.example.com:443", "block-host *.example.com"],
            "a.example.com",
            80,
            Some("93.184.216.34"),
            "block",
            "block-host *.example.com",
        ),
        (
            D,
            &["allow-host *.example.com"],
            "example.com",
            443,
            Some("93.184.216.34"),
            "block",
            "mode:deny",
        ),
        (
            D,
            &["allow-host *.example.com"],
            "a.b.example.com",
            443,
            Some("93.184.216.34"),
            "allow",
            "allow-host *.example.com",
        ),
        (
            D,
            &["allow-host *.example.com"],
            "badexample.com",
            443,
            Some("93.184.216.34"),
            "block",
            "mode:deny",
        ),
        // equal specificity: block beats allow (rule order irrelevant)
        (
            A,
            &["allow-host example.com", "block-host example.com"],
            "example.com",
            443,
            Some("93.184.216.34"),
            "block",
            "block-host example.com",
        ),
        (
            A,
            &["block-cidr 93.184.216.0/24", "allow-cidr 93.184.216.0/24"],
            "example.com",
            443,
            Some("93.184.216.34"),
            "block",
            "block-cidr 93.184.216.0/24",
        ),
        // host rules beat CIDR rules; longest CIDR prefix wins
        (
            A,
            &["allow-host example.com", "block-cidr 93.184.216.0/24"],
            "example.com",
            443,
            Some("93.184.216.34"),
            "allow",
            "allow-host example.com",
        ),
        (
            D,
            &["allow-cidr 93.184.0.0/16", "block-cidr 93.184.216.0/24"],
            "example.com",
            443,
            Some("93.184.216.34"),
            "block",
            "block-cidr 93.184.216.0/24",
        ),
        (
            D,
            &["block-cidr 93.184.0.0/16", "allow-cidr 93.184.216.34"],
            "example.com",
            443,
            Some("93.184.216.34"),
            "allow",
            "allow-cidr 93.184.216.34/32",
        ),
        // deny mode with an allow CIDR cannot block on the name alone
        (
            D,
            &["allow-cidr 93.184.0.0/16"],
            "example.com",
            443,
            None,
            "allow",
            "mode:deny",
        ),
        (
            A,
            &["block-host evil.com"],
            "EVIL.com.",
            443,
            None,
            "block",
            "block-host evil.com",
        ),
        // bypass
        (
            D,
            &["bypass-host pinned.example.com"],
            "pinned.example.com",
            443,
            Some("93.184.216.34"),
            "bypass",
            "bypass-host pinned.example.com",
        ),
        (
            A,
            &[
                "allow-host pinned.example.com",
                "bypass-host pinned.example.com",
            ],
            "pinned.example.com",
            443,
            Some("93.184.216.34"),
            "bypass",
            "bypass-host pinned.example.com",
        ),
        // --- always-blocked ranges
        (
            A,
            &[],
            "localhost",
            8080,
            Some("127.0.0.1"),
            "block",
            "default-range:loopback",
        ),
        (
            A,
            &[],
            "127.0.0.1",
            80,
            None,
            "block",
            "default-range:loopback",
        ),
        (
            A,
            &[],
            "169.254.169.254",
            80,
            None,
            "block",
            "default-range:link-local",
        ),
        (
            A,
            &[],
            "metadata.google.internal",
            80,
            Some("169.254.169.254"),
            "block",
            "default-range:link-local",
        ),
        (
            A,
            &[],
            "a.example.com",
            80,
            Some("10.1.2.3"),
            "block",
            "default-range:private",
        ),
        (
            A,
            &[],
            "a.example.com",
            80,
            Some("172.16.0.1"),
            "block",
            "default-range:private",
        ),
        (
            A,
            &[],
            "a.example.com",
            80,
            Some("172.32.0.1"),
            "allow",
            "mode:allow",
        ),
        (
            A,
            &[],
            "a.example.com",
            80,
            Some("192.168.1.1"),
            "block",
            "default-range:private",
        ),
        (
            A,
            &[],
            "a.example.com",
            80,
            Some("100.64.0.1"),
            "block",
            "default-range:cgnat",
        ),
        (
            A,
            &[],
            "a.example.com",
            80,
            Some("100.128.0.1"),
            "allow",
            "mode:allow",
        ),
        (
            A,
            &[],
            "a.example.com",
            80,
            Some("0.0.0.0"),
            "block",
            "default-range:unspecified",
        ),
        (
            A,
            &[],
            "a.example.com",
            80,
            Some("224.0.0.1"),
            "block",
            "default-range:multicast",
        ),
        (
            A,
            &[],
            "a.example.com",
            80,
            Some("240.0.0.1"),
            "block",
            "default-range:reserved",
        ),
        (
            A,
            &[],
            "a.example.com",
            80,
            Some("255.255.255.255"),
            "block",
            "default-range:broadcast",
        ),
        (
            A,
            &[],
            "a.example.com",
            80,
            Some("192.0.2.1"),
            "block",
            "default-range:documentation",
        ),
        (
            A,
            &[],
            "a.example.com",
            80,
            Some("198.51.100.7"),
            "block",
            "default-range:documentation",
        ),
        (
            A,
            &[],
            "a.example.com",
            80,
            Some("203.0.113.9"),
            "block",
            "default-range:documentation",
        ),
        (
            A,
            &[],
            "a.example.com",
            80,
            Some("198.19.255.1"),
            "block",
            "default-range:benchmark",
        ),
        (
            A,
            &[],
            "a.example.com",
            80,
            Some("192.0.0.8"),
            "block",
            "default-range:ietf-protocol",
        ),
        // a wildcard or the mode never unlocks a range; an exact host rule or allow CIDR does
        (
            A,
            &["allow-host *.example.com"],
            "a.example.com",
            80,
            Some("10.0.0.1"),
            "block",
            "default-range:private",
        ),
        (
            D,
            &["allow-host *.example.com"],
            "a.example.com",
            80,
            Some("10.0.0.1"),
            "block",
            "default-range:private",
        ),
        (
            D,
            &["allow-host *.example.com", "allow-cidr 10.0.0.0/8"],
            "a.example.com",
            80,
            Some("10.0.0.1"),
            "allow",
            "allow-cidr 10.0.0.0/8",
        ),
        (
            A,
            &["allow-host intranet.corp"],
            "intranet.corp",
            80,
            Some("10.0.0.1"),
            "allow",
            "allow-host intranet.corp",
        ),
        (
            A,
            &["allow-cidr 127.0.0.1/32"],
            "127.0.0.1",
            8080,
            None,
            "allow",
            "allow-cidr 127.0.0.1/32",
        ),
        (
            A,
            &["allow-cidr 10.0.0.0/8"],
            "x",
            80,
            Some("10.0.0.1"),
            "allow",
            "allow-cidr 10.0.0.0/8",
        ),
        (
            A,
            &["block-host 127.0.0.1:8080", "allow-cidr 127.0.0.1/32"],
            "127.0.0.1",
            8080,
            None,
            "block",
            "block-host 127.0.0.1:8080",
        ),
        (
            A,
            &["allow-host 10.0.0.1:22"],
            "10.0.0.1",
            22,
            None,
            "allow",
            "allow-host 10.0.0.1:22",
        ),
        (
            A,
            &["allow-host 10.0.0.1:22"],
            "10.0.0.1",
            23,
            None,
            "block",
            "default-range:private",
        ),
        // --- host loopback aliases and ports
        (
            D,
            &["allow-host localhost:8080"],
            "host.docker.internal",
            8080,
            Some("127.0.0.1"),
            "allow",
            "allow-host localhost:8080",
        ),
        (
            D,
            &["allow-host localhost:8080"],
            "host.airlock.internal",
            8080,
            Some("127.0.0.1"),
            "allow",
            "allow-host localhost:8080",
        ),
        (
            D,
            &["allow-host localhost:8080"],
            "localhost",
            8080,
            Some("::1"),
            "allow",
            "allow-host localhost:8080",
        ),
        (
            D,
            &["allow-host localhost:8080"],
            "host.docker.internal",
            8081,
            Some("127.0.0.1"),
            "block",
            "default-range:loopback",
        ),
        (
            A,
            &["allow-host localhost:8080"],
            "host.docker.internal",
            8081,
            Some("127.0.0.1"),
            "block",
            "default-range:loopback",
        ),
        (
            D,
            &["allow-host host.docker.internal"],
            "LOCALHOST.",
            3000,
            Some("127.0.0.1"),
            "allow",
            "allow-host host.docker.internal",
        ),
        (
            D,
            &["allow-host localhost:8080"],
            "127.0.0.1",
            8080,
            None,
            "block",
            "default-range:loopback",
        ),
        (
            D,
            &["allow-host localhost:8080"],
            "example.org",
            8080,
            Some("8.8.8.8"),
            "block",
            "mode:deny",
        ),
        // --- IPv6 and embedded IPv4
        (
            A,
            &[],
            "v6.example.com",
            443,
            Some("2606:4700::1111"),
            "allow",
            "mode:allow",
        ),
        (
            A,
            &[],
            "[::1]",
            8080,
            None,
            "block",
            "default-range:loopback",
        ),
        (
            A,
            &[],
            "v6.example.com",
            443,
            Some("::"),
            "block",
            "default-range:unspecified",
        ),
        (
            A,
            &[],
            "v6.example.com",
            443,
            Some("fd00::1"),
            "block",
            "default-range:unique-local",
        ),
        (
            A,
            &[],
            "v6.example.com",
            443,
            Some("fe80::1"),
            "block",
            "default-range:link-local-v6",
        ),
        (
            A,
            &[],
            "v6.example.com",
            443,
            Some("ff02::1"),
            "block",
            "default-range:multicast-v6",
        ),
        (
            A,
            &[],
            "v6.example.com",
            443,
            Some("::ffff:169.254.169.254"),
            "block",
            "default-range:link-local",
        ),
        (
            A,
            &[],
            "v6.example.com",
            443,
            Some("::ffff:8.8.8.8"),
            "allow",
            "mode:allow",
        ),
        (
            A,
            &[],
            "v6.example.com",
            443,
            Some("64:ff9b::a00:1"),
            "block",
            "default-range:private",
        ),
        (
            A,
            &[],
            "v6.example.com",
            443,
            Some("64:ff9b::808:808"),
            "allow",
            "mode:allow",
        ),
        (
            A,
            &[],
            "v6.example.com",
            443,
            Some("::127.0.0.1"),
            "block",
            "default-range:loopback",
        ),
        (
            A,
            &[],
            "v6.example.com",
            443,
            Some("2002:7f00:1::1"),
            "block",
            "default-range:loopback",
        ),
        (
            A,
            &[],
            "v6.example.com",
            443,
            Some("2001:db8::1"),
            "block",
            "default-range:documentation",
        ),
        (
            A,
            &["allow-cidr 127.0.0.1/32"],
            "x.example.com",
            80,
            Some("::ffff:127.0.0.1"),
            "allow",
            "allow-cidr 127.0.0.1/32",
        ),
        (
            A,
            &["allow-cidr ::ffff:127.0.0.0/104"],
            "x.example.com",
            80,
            Some("127.0.0.1"),
            "allow",
            "allow-cidr 127.0.0.0/8",
        ),
        (
            A,
            &[],
            "[::ffff:127.0.0.1]",
            80,
            None,
            "block",
            "default-range:loopback",
        ),
        (
            A,
            &["allow-host 127.0.0.1:80"],
            "[::ffff:127.0.0.1]",
            80,
            None,
            "allow",
            "allow-host 127.0.0.1:80",
        ),
        (
            D,
            &["allow-host [::1]:8080"],
            "[::1]",
            8080,
            None,
            "allow",
            "allow-host [::1]:8080",
        ),
        (
            D,
            &["allow-cidr 2606:4700::/32"],
            "v6.example.com",
            443,
            Some("2606:4700::1111"),
            "allow",
            "allow-cidr 2606:4700::/32",
        ),
        (
            D,
            &["block-cidr 2606:4700::/32", "allow-cidr ::/0"],
            "v6.example.com",
            443,
            Some("2606:4700::1111"),
            "block",
            "block-cidr 2606:4700::/32",
        ),
    ];
    assert!(rows.len() >= 40);
    for (i, (mode, rules, host, port, addr, action, rule)) in rows.iter().enumerate() {
        let p = pol(*mode, rules);
        let addr = addr.map(|a| a.parse::<IpAddr>().unwrap());
        let d = p.decide(&Request {
            host,
            port: *port,
            addr,
        });
        assert_eq!(
            (d.action_str(), d.rule()),
            (*action, *rule),
            "row {i}: {mode} {rules:?} {host}:{port} {addr:?} -> {d:?}"
        );
        assert!(!d.reason().is_empty());
    }
}

#[test]
fn metadata_reason_mentions_cloud_metadata() {
    let d = Policy::default().decide(&Request {
        host: "169.254.169.254",
        port: 80,
        addr: None,
    });
    assert_eq!(d.reason(), "169.254.169.254 is link-local (cloud metadata)");
    assert!(!d.is_allowed());
    let d = Policy::default().decide(&Request {
        host: "x",
        port: 80,
        addr: Some("::ffff:10.0.0.1".parse().unwrap()),
    });
    assert_eq!(d.rule(), "default-range:private");
}

#[test]
fn host_pattern_parse_ok() {
    let ok = [
        ("example.com", "example.com"),
        ("Example.COM.", "example.com"),
        ("*.example.com", "*.example.com"),
        ("*.Example.com:443", "*.example.com:443"),
        ("example.com:8080", "example.com:8080"),
        ("localhost:65535", "localhost:65535"),
        ("10.0.0.1:22", "10.0.0.1:22"),
        ("10.0.0.1", "10.0.0.1"),
        ("[::1]:8080", "[::1]:8080"),
        ("[::1]", "::1"),
        ("::1", "::1"),
        ("[0:0::1]:1", "[::1]:1"),
        ("[::ffff:127.0.0.1]:80", "127.0.0.1:80"),
        ("_dmarc.example.com", "_dmarc.example.com"),
        ("xn--nxasmq6b.com", "xn--nxasmq6b.com"),
        ("*.com", "*.com"),
    ];
    for (input, shown) in ok {
        let p: HostPattern = input.parse().unwrap_or_else(|e| panic!("{input}: {e}"));
        assert_eq!(p.to_string(), shown, "{input}");
        // display round-trips
        assert_eq!(p.to_string().parse::<HostPattern>().unwrap(), p);
    }
}

#[test]
fn host_pattern_parse_bad() {
    let bad = [
        "",
        " ",
        "*",
        "*.",
        "*foo.com",
        "foo.*.com",
        "f*o.com",
        "**.foo.com",
        "*.*.com",
        "a..b",
        ".a.com",
        "a.com..",
        "exa mple.com",
        "exam/ple.com",
        "ex@mple.com",
        "-a.com",
        "a-.com",
        "example.com:",
        "example.com:0",
        "example.com:65536",
        "example.com:99999999",
        "example.com:-1",
        "example.com:+1",
        "example.com:ab",
        "example.com:80:80",
        "[::1",
        "[::1]x",
        "[::1]:",
        "[example.com]:80",
        "::1:80x",
        "1.2.3",
        "1.2.3.999",
        "*.10.0.0.1",
        "exämple.com",
        &"a".repeat(64),
        &format!("{}.com", ["a"; 130].join(".")),
    ];
    for input in bad {
        assert!(
            input.parse::<HostPattern>().is_err(),
            "{input:?} should be rejected"
        );
        assert!(Rule::host(Action::Allow, input).is_err());
    }
}

#[test]
fn cidr_parse() {
    for (input, shown) in [
        ("10.0.0.0/8", "10.0.0.0/8"),
        ("10.1.2.3/8", "10.0.0.0/8"),
        ("10.0.0.1", "10.0.0.1/32"),
        ("2001:db8::/32", "2001:db8::/32"),
        ("::1", "::1/128"),
        ("::ffff:10.0.0.0/104", "10.0.0.0/8"),
        ("0.0.0.0/0", "0.0.0.0/0"),
    ] {
        let r = Rule::cidr(Action::Block, input).unwrap_or_else(|e| panic!("{input}: {e}"));
        assert_eq!(r.to_string(), format!("block-cidr {shown}"));
    }
    for bad in [
        "",
        "10.0.0.0/33",
        "10.0.0.0/",
        "/8",
        "10.0.0/8",
        "example.com",
        "::/129",
        "10.0.0.0/8/8",
        "10.0.0.0/-1",
        "10.0.0.0/ 8",
    ] {
        assert!(
            Rule::cidr(Action::Allow, bad).is_err(),
            "{bad:?} should be rejected"
        );
    }
}

#[test]
fn rule_display_and_parse() {
    for s in [
        "allow-host *.example.com:443",
        "block-cidr 10.0.0.0/8",
        "bypass-host pinned.example.com",
        "allow-host [::1]:8080",
        "bypass-cidr 2001:db8::/32",
    ] {
        let r: Rule = s.parse().unwrap();
        assert_eq!(r.to_string(), s);
    }
    for bad in [
        "allow example.com",
        "permit-host example.com",
        "allow-dns example.com",
        "allow-host",
        "allow-host *",
    ] {
        assert!(bad.parse::<Rule>().is_err(), "{bad}");
    }
}

#[test]
fn policy_json_round_trip_and_unknown_fields() {
    let p = pol(
        Mode::Deny,
        &["allow-host *.example.com:443", "block-cidr 10.0.0.0/8"],
    );
    let j = serde_json::to_string(&p).unwrap();
    assert_eq!(
        j,
        r#"{"mode":"deny","rules":["allow-host *.example.com:443","block-cidr 10.0.0.0/8"]}"#
    );
    assert_eq!(serde_json::from_str::<Policy>(&j).unwrap(), p);
    assert!(serde_json::from_str::<Policy>(r#"{"mode":"deny","rules":[],"extra":1}"#).is_err());
    assert!(serde_json::from_str::<Policy>(r#"{"mode":"maybe","rules":[]}"#).is_err());
    assert!(serde_json::from_str::<Policy>(r#"{"mode":"deny","rules":["allow-host *"]}"#).is_err());
    assert_eq!(
        serde_json::from_str::<Policy>("{}").unwrap(),
        Policy::default()
    );
    assert_eq!("DENY".parse::<Mode>().unwrap(), Mode::Deny);
    assert!("x".parse::<Mode>().is_err());
}

#[test]
fn add_remove() {
    let mut p = Policy::default();
    let r = Rule::host(Action::Allow, "Example.com.").unwrap();
    p.add(r.clone());
    p.add(Rule::host(Action::Allow, "example.com").unwrap());
    assert_eq!(p.rules.len(), 1);
    assert!(p.remove(&r));
    assert!(!p.remove(&r));
    assert!(p.rules.is_empty());
}

#[test]
fn event_json_shape() {
    let ev = Event {
        time: "2026-11-27T06:30:01.123Z".into(),
        sandbox: "sb1".into(),
        path: "proxy".into(),
        method: "CONNECT".into(),
        host: "example.com".into(),
        port: 443,
        addr: Some("93.184.216.34".into()),
        action: "allow".into(),
        rule: "mode:allow".into(),
        reason: "r".into(),
        bytes_up: 1,
        bytes_down: 2,
    };
    let j = serde_json::to_string(&ev).unwrap();
    assert_eq!(
        j,
        r#"{"time":"2026-11-27T06:30:01.123Z","sandbox":"sb1","path":"proxy","method":"CONNECT","host":"example.com","port":443,"addr":"93.184.216.34","action":"allow","rule":"mode:allow","reason":"r","bytes_up":1,"bytes_down":2}"#
    );
    assert_eq!(serde_json::from_str::<Event>(&j).unwrap(), ev);
}

proptest! {
    /// Parsing never panics; whatever parses displays to a string that parses back to
    /// the same pattern, and that string is lowercase with no trailing dot.
    #[test]
    fn host_pattern_parse_total(s in "\\PC{0,40}") {
        if let Ok(p) = s.parse::<HostPattern>() {
            let shown = p.to_string();
            prop_assert_eq!(shown.parse::<HostPattern>().unwrap(), p);
            prop_assert_eq!(shown.to_ascii_lowercase(), shown.clone());
            prop_assert!(!shown.ends_with('.'));
        }
    }

    #[test]
    fn host_pattern_valid_names(labels in proptest::collection::vec("[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", 1..5),
                                wild in any::<bool>(), port in proptest::option::of(1u16..)) {
        let name = labels.join(".");
        prop_assume!(!name.split('.').all(|l| l.bytes().all(|b| b.is_ascii_digit())));
        let mut s = if wild { format!("*.{name}") } else { name.clone() };
        if let Some(p) = port { s.push_str(&format!(":{p}")); }
        let p: HostPattern = s.parse().unwrap();
        prop_assert_eq!(p.to_string(), s.clone());
        prop_assert_eq!(p.is_wildcard(), wild);
        prop_assert_eq!(p.port(), port);
        // a wildcard matches a subdomain but never the apex
        let d = pol(Mode::Deny, &[&format!("allow-host {s}")]);
        let port = port.unwrap_or(443);
        let sub = format!("x.{name}");
        let apex = d.decide(&Request { host: &name, port, addr: Some("8.8.8.8".parse().unwrap()) });
        let subd = d.decide(&Request { host: &sub, port, addr: Some("8.8.8.8".parse().unwrap()) });
        prop_assert_eq!(apex.is_allowed(), !wild);
        prop_assert_eq!(subd.is_allowed(), wild);
    }

    /// Any IPv4-mapped address decides exactly like its IPv4 address.
    #[test]
    fn mapped_decides_like_v4(a in any::<u32>()) {
        let v4 = Ipv4Addr::from(a);
        let p = pol(Mode::Allow, &["allow-cidr 10.1.0.0/16", "block-cidr 8.0.0.0/8"]);
        let d4 = p.decide(&Request { host: "h.example", port: 80, addr: Some(IpAddr::V4(v4)) });
        let d6 = p.decide(&Request { host: "h.example", port: 80, addr: Some(IpAddr::V6(v4.to_ipv6_mapped())) });
        prop_assert_eq!(d4, d6);
    }
}
