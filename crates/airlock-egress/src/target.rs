//! Parsing the target of a proxy request: `host:port` authorities (CONNECT), absolute-form
//! URIs and the Host header. Pure functions, property-tested.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr};

/// Where a request wants to go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Host as the policy sees it: lowercase, no brackets, no trailing dot.
    pub host: String,
    pub port: u16,
    /// The authority as sent (for the upstream Host header), e.g. `Example.com:8080`.
    pub authority: String,
}

impl Target {
    /// The literal IP address, if the host is one.
    pub fn ip(&self) -> Option<IpAddr> {
        self.host.parse().ok()
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Why a request target was refused (answered with 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error("empty host")]
    EmptyHost,
    #[error("missing port in {0:?}")]
    MissingPort(String),
    #[error("invalid port in {0:?}")]
    BadPort(String),
    #[error("invalid host in {0:?}")]
    BadHost(String),
    #[error("unsupported scheme {0:?} (use CONNECT for https)")]
    Scheme(String),
    #[error("request has no absolute URI and no Host header")]
    NoHost,
    #[error("CONNECT needs host:port, got {0:?}")]
    ConnectForm(String),
}

fn valid_name(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').enumerate().all(|(i, l)| {
            // one trailing dot is allowed (empty last label)
            (!l.is_empty() || i == h.split('.').count() - 1 && i > 0)
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// Parse `host:port`, `[v6]:port`, or (when `default_port` is given) `host` / `[v6]`.
pub fn parse_authority(s: &str, default_port: Option<u16>) -> Result<Target, TargetError> {
    if s.is_empty() {
        return Err(TargetError::EmptyHost);
    }
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let end = rest
            .find(']')
            .ok_or_else(|| TargetError::BadHost(s.into()))?;
        let inner = &rest[..end];
        inner
            .parse::<Ipv6Addr>()
            .map_err(|_| TargetError::BadHost(s.into()))?;
        match &rest[end + 1..] {
            "" => (inner, None),
            p => (
                inner,
                Some(
                    p.strip_prefix(':')
                        .ok_or_else(|| TargetError::BadHost(s.into()))?,
                ),
            ),
        }
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        }
    };
    let port = match port {
        Some(p) => {
            if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
                return Err(TargetError::BadPort(s.into()));
            }
            match p.parse::<u32>() {
                Ok(n) if (1..=65535).contains(&n) => n as u16,
                _ => return Err(TargetError::BadPort(s.into())),
            }
        }
        None => default_port.ok_or_else(|| TargetError::MissingPort(s.into()))?,
    };
    if host.is_empty() {
        return Err(TargetError::EmptyHost);
    }
    let norm = if let Ok(v6) = host.parse::<Ipv6Addr>() {
        if !s.starts_with('[') {
            return Err(TargetError::BadHost(s.into()));
        }
        v6.to_string()
    } else {
        if !valid_name(host) {
            return Err(TargetError::BadHost(s.into()));
        }
        let h = host.strip_suffix('.').unwrap_or(host);
        h.to_ascii_lowercase()
    };
    Ok(Target {
        host: norm,
        port,
        authority: s.to_string(),
    })
}

/// The target of a non-CONNECT request: the absolute-form URI (`http://host[:port]/...`),
/// or for origin-form the Host header.
pub fn http_target(uri: &http::Uri, host_header: Option<&str>) -> Result<Target, TargetError> {
    if let Some(auth) = uri.authority() {
        match uri.scheme_str() {
            Some(s) if s.eq_ignore_ascii_case("http") => {}
            Some(s) => return Err(TargetError::Scheme(s.to_string())),
            None => return Err(TargetError::Scheme(String::new())),
        }
        if auth.as_str().contains('@') {
            return Err(TargetError::BadHost(auth.as_str().into()));
        }
        return parse_authority(auth.as_str(), Some(80));
    }
    match host_header {
        Some(h) if !h.trim().is_empty() => parse_authority(h.trim(), Some(80)),
        _ => Err(TargetError::NoHost),
    }
}

/// The target of a CONNECT request: authority-form with a port.
pub fn connect_target(uri: &http::Uri) -> Result<Target, TargetError> {
    if uri.scheme().is_some()
        || uri
            .path_and_query()
            .is_some_and(|p| !p.as_str().is_empty() && p.as_str() != "/")
    {
        return Err(TargetError::ConnectForm(uri.to_string()));
    }
    let auth = uri
        .authority()
        .ok_or_else(|| TargetError::ConnectForm(uri.to_string()))?;
    if auth.as_str().contains('@') {
        return Err(TargetError::ConnectForm(auth.as_str().into()));
    }
    parse_authority(auth.as_str(), None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn authorities() {
        let ok = [
            ("example.com:443", None, "example.com", 443),
            ("Example.COM.:80", None, "example.com", 80),
            ("example.com", Some(80), "example.com", 80),
            ("[2001:db8::1]:443", None, "2001:db8::1", 443),
            ("[::1]", Some(80), "::1", 80),
            ("10.0.0.1:22", None, "10.0.0.1", 22),
            ("a_b.example:65535", None, "a_b.example", 65535),
        ];
        for (s, d, h, p) in ok {
            let t = parse_authority(s, d).unwrap_or_else(|e| panic!("{s}: {e}"));
            assert_eq!((t.host.as_str(), t.port), (h, p), "{s}");
        }
        let bad = [
            ("example.com", None),
            ("", Some(80)),
            (":443", None),
            ("example.com:", None),
            ("example.com:0", None),
            ("example.com:65536", None),
            ("example.com:+1", None),
            ("example.com:1x", None),
            ("2001:db8::1", Some(80)),
            ("[2001:db8::1", None),
            ("[2001:db8::1]443", None),
            ("[example.com]:443", None),
            ("exa mple.com:443", None),
            ("user@example.com:443", None),
            ("a..b:443", None),
            ("[::1]", None),
        ];
        for (s, d) in bad {
            assert!(parse_authority(s, d).is_err(), "{s:?} should fail");
        }
    }

    #[test]
    fn uris() {
        let t = http_target(
            &"http://Example.com:8080/x?y".parse().unwrap(),
            Some("other"),
        )
        .unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.authority.as_str()),
            ("example.com", 8080, "Example.com:8080")
        );
        let t = http_target(&"http://[::1]/".parse().unwrap(), None).unwrap();
        assert_eq!((t.host.as_str(), t.port), ("::1", 80));
        assert_eq!(
            http_target(&"/x".parse().unwrap(), None),
            Err(TargetError::NoHost)
        );
        assert_eq!(
            http_target(&"/x".parse().unwrap(), Some("h.example:81"))
                .unwrap()
                .port,
            81
        );
        assert!(matches!(
            http_target(&"https://e.com/".parse().unwrap(), None),
            Err(TargetError::Scheme(_))
        ));
        assert!(http_target(&"http://u:p@e.com/".parse().unwrap(), None).is_err());
        assert_eq!(
            connect_target(&"e.com:443".parse().unwrap()).unwrap().port,
            443
        );
        assert!(connect_target(&"e.com".parse().unwrap()).is_err());
        assert!(connect_target(&"http://e.com:443/".parse().unwrap()).is_err());
        assert_eq!(
            connect_target(&"[2001:db8::1]:443".parse().unwrap())
                .unwrap()
                .host,
            "2001:db8::1"
        );
    }

    proptest! {
        #[test]
        fn parse_authority_total(s in "\\PC{0,60}", d in proptest::option::of(any::<u16>())) {
            if let Ok(t) = parse_authority(&s, d) {
                prop_assert!(t.port != 0);
                prop_assert!(!t.host.is_empty());
                prop_assert!(!t.host.contains(['[', ']', ' ', '@', '/']));
                // re-parsing the display form gives the same target
                let again = parse_authority(&t.to_string(), None).unwrap();
                prop_assert_eq!((again.host, again.port), (t.host, t.port));
            }
        }

        #[test]
        fn parse_authority_roundtrip(labels in proptest::collection::vec("[a-zA-Z0-9]([a-zA-Z0-9-]{0,8}[a-zA-Z0-9])?", 1..4),
                                     port in 1u16..) {
            let host = labels.join(".");
            let t = parse_authority(&format!("{host}:{port}"), None).unwrap();
            prop_assert_eq!(t.host, host.to_ascii_lowercase());
            prop_assert_eq!(t.port, port);
        }

        #[test]
        fn v6_roundtrip(a in any::<u128>(), port in 1u16..) {
            let ip = Ipv6Addr::from(a);
            let t = parse_authority(&format!("[{ip}]:{port}"), None).unwrap();
            prop_assert_eq!(t.host, ip.to_string());
            prop_assert_eq!(t.port, port);
        }

        /// Arbitrary strings that the http crate accepts as a URI never panic our parsers.
        #[test]
        fn uri_targets_total(s in "[ -~]{0,60}") {
            if let Ok(uri) = s.parse::<http::Uri>() {
                let _ = http_target(&uri, Some(&s));
                let _ = connect_target(&uri);
            }
        }
    }
}
