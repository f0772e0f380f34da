//! airlock-policy: the per-sandbox network policy and its decision function.
//!
//! Owns: host patterns and CIDR rules (parsing, display, JSON form), the policy
//! (mode + rules), the always-blocked address ranges ([`classify`]), the decision
//! function ([`Policy::decide`]) and the audit [`Event`] record.
//!
//! Must not: do I/O, resolve names, read clocks or depend on an async runtime. It is a
//! leaf crate: the egress proxy and the CLI depend on it, never the other way round.
//!
//! Semantics (DESIGN §3): mode `allow` allows everything not blocked, mode `deny` blocks
//! everything not allowed. Precedence: exact `host:port`, exact host, longest wildcard
//! (with a port beats without at equal suffix), CIDR on the resolved address (longest
//! prefix), then the mode. At equal specificity block beats bypass beats allow.
//! Private/special ranges (see [`classify`]) are blocked unless an exact host rule for the
//! requested name or an allow CIDR containing the address allows them.

use std::cmp::Ordering;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use ipnet::{IpNet, Ipv4Net};
use serde::{Deserialize, Serialize};

mod range;
pub use range::{classify, embedded_v4, Embedding, RangeClass};

/// Names that mean "the host's loopback" inside a sandbox. A rule for `localhost`
/// (with or without a port) or any of these names matches requests to all of them.
pub const HOST_LOOPBACK_ALIASES: &[&str] = &["host.docker.internal", "host.airlock.internal"];

/// Errors from parsing rules, patterns, CIDRs and modes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("invalid host pattern {input:?}: {why}")]
    HostPattern { input: String, why: &'static str },
    #[error("invalid CIDR {input:?}: {why}")]
    Cidr { input: String, why: &'static str },
    #[error("invalid rule {input:?}: {why}")]
    Rule { input: String, why: &'static str },
    #[error("invalid mode {input:?}: expected \"allow\" or \"deny\"")]
    Mode { input: String },
}

/// What happens to traffic that no rule decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Allow,
    Deny,
}

impl FromStr for Mode {
    type Err = PolicyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "allow" => Ok(Mode::Allow),
            "deny" => Ok(Mode::Deny),
            _ => Err(PolicyError::Mode {
                input: s.to_string(),
            }),
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Allow => "allow",
            Mode::Deny => "deny",
        })
    }
}

/// What a rule does to the traffic it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Block,
    /// Allow, and tunnel TLS without inspection (certificate pinning).
    Bypass,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Block => "block",
            Action::Bypass => "bypass",
        }
    }
    /// Tie-break at equal specificity: block > bypass > allow.
    fn strength(self) -> u8 {
        match self {
            Action::Block => 2,
            Action::Bypass => 1,
            Action::Allow => 0,
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A host name pattern: exact (`example.com`) or wildcard (`*.example.com`, subdomains
/// only, not the apex), with an optional port. Exact patterns may be IP literals.
/// Stored lowercased, without a trailing dot; IP literals in canonical form.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostPattern {
    /// For a wildcard, the suffix without the leading `*.`.
    name: String,
    wildcard: bool,
    port: Option<u16>,
}

impl HostPattern {
    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn is_wildcard(&self) -> bool {
        self.wildcard
    }
    pub fn port(&self) -> Option<u16> {
        self.port
    }
    /// The IP address, when the pattern is an IP literal.
    pub fn ip(&self) -> Option<IpAddr> {
        if self.wildcard {
            None
        } else {
            self.name.parse().ok()
        }
    }

    /// Does this pattern match the normalized request name (see [`normalize_host`])?
    /// Ports are checked by the caller.
    fn matches_name(&self, canon_req: &str) -> bool {
        if self.wildcard {
            canon_req.len() > self.name.len() + 1
                && canon_req.ends_with(self.name.as_str())
                && canon_req.as_bytes()[canon_req.len() - self.name.len() - 1] == b'.'
        } else {
            canonical_alias(&self.name) == canonical_alias(canon_req)
        }
    }
}

/// `localhost` and [`HOST_LOOPBACK_ALIASES`] all compare as `localhost`.
fn canonical_alias(name: &str) -> &str {
    if name == "localhost" || HOST_LOOPBACK_ALIASES.contains(&name) {
        "localhost"
    } else {
        name
    }
}

/// Is `name` (already normalized) `localhost` or one of [`HOST_LOOPBACK_ALIASES`]?
pub fn is_host_loopback_name(name: &str) -> bool {
    canonical_alias(name) == "localhost"
}

/// Normalize a requested host name for matching: strip `[...]` around IPv6 literals,
/// strip one trailing dot, lowercase, and print IP literals canonically (IPv4-mapped
/// IPv6 literals become their IPv4 address).
pub fn normalize_host(host: &str) -> String {
    let h = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let h = h.strip_suffix('.').unwrap_or(h);
    if let Ok(ip) = h.parse::<IpAddr>() {
        return ip.to_canonical().to_string();
    }
    h.to_ascii_lowercase()
}

fn valid_dns_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("empty host name");
    }
    if name.len() > 253 {
        return Err("host name longer than 253 characters");
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err("empty label");
        }
        if label.len() > 63 {
            return Err("label longer than 63 characters");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        {
            return Err("invalid character (allowed: a-z 0-9 - _ and '*.' as a prefix)");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("label starts or ends with '-'");
        }
    }
    // An all-numeric dotted name that is not a valid IPv4 address ("1.2.3", "1.2.3.999")
    // would be interpreted inconsistently by resolvers: reject it.
    if name
        .split('.')
        .all(|l| l.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err("numeric name that is not an IPv4 address");
    }
    Ok(())
}

fn parse_port(s: &str) -> Result<u16, &'static str> {
    if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err("port must be a number 1-65535");
    }
    match s.parse::<u32>() {
        Ok(p) if (1..=65535).contains(&p) => Ok(p as u16),
        _ => Err("port must be a number 1-65535"),
    }
}

impl FromStr for HostPattern {
    type Err = PolicyError;
    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let err = |why| PolicyError::HostPattern {
            input: input.to_string(),
            why,
        };
        let s = input.trim();
        if s.is_empty() {
            return Err(err("empty"));
        }
        // Split off the port. Forms: "[v6]", "[v6]:port", bare "v6", "name", "name:port".
        let (host, port): (&str, Option<&str>) = if let Some(rest) = s.strip_prefix('[') {
            let end = rest.find(']').ok_or_else(|| err("missing ']'"))?;
            let inner = &rest[..end];
            let after = &rest[end + 1..];
            let port = match after {
                "" => None,
                p => Some(p.strip_prefix(':').ok_or_else(|| err("junk after ']'"))?),
            };
            if inner.parse::<Ipv6Addr>().is_err() {
                return Err(err("brackets must hold an IPv6 address"));
            }
            (inner, port)
        } else if s.matches(':').count() > 1 {
            if s.parse::<Ipv6Addr>().is_err() {
                return Err(err("IPv6 address with a port must be written [addr]:port"));
            }
            (s, None)
        } else if let Some((h, p)) = s.split_once(':') {
            (h, Some(p))
        } else {
            (s, None)
        };
        let port = port.map(parse_port).transpose().map_err(err)?;
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(HostPattern {
                name: ip.to_canonical().to_string(),
                wildcard: false,
                port,
            });
        }
        let lower = host.to_ascii_lowercase();
        let lower = lower.strip_suffix('.').unwrap_or(&lower);
        let (wildcard, name) = match lower.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, lower),
        };
        if name.contains('*') {
            return Err(err(
                "'*' is only allowed as a whole first label, as in *.example.com",
            ));
        }
        valid_dns_name(name).map_err(err)?;
        if wildcard && name.parse::<Ipv4Addr>().is_ok() {
            return Err(err("a wildcard cannot cover an IP address"));
        }
        Ok(HostPattern {
            name: name.to_string(),
            wildcard,
            port,
        })
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.wildcard {
            f.write_str("*.")?;
        }
        let v6 = self.name.contains(':');
        match (v6, self.port) {
            (true, Some(p)) => write!(f, "[{}]:{p}", self.name),
            (true, None) => f.write_str(&self.name),
            (false, Some(p)) => write!(f, "{}:{p}", self.name),
            (false, None) => f.write_str(&self.name),
        }
    }
}

/// What a rule matches.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    Host(HostPattern),
    Cidr(IpNet),
}

/// One policy rule. Serializes as its display string, e.g. `allow-host *.example.com:443`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Rule {
    pub action: Action,
    pub target: Target,
}

/// Parse a CIDR or bare IP (bare = /32 or /128). Host bits are cleared; an IPv4-mapped
/// IPv6 network inside `::ffff:0:0/96` becomes the IPv4 network.
pub fn parse_cidr(input: &str) -> Result<IpNet, PolicyError> {
    let err = |why| PolicyError::Cidr {
        input: input.to_string(),
        why,
    };
    let s = input.trim();
    if s.is_empty() {
        return Err(err("empty"));
    }
    let net: IpNet = if s.contains('/') {
        let (a, p) = s.split_once('/').ok_or_else(|| err("bad form"))?;
        if p.is_empty() || p.len() > 3 || !p.bytes().all(|b| b.is_ascii_digit()) {
            return Err(err("prefix length must be a number"));
        }
        let addr: IpAddr = a.parse().map_err(|_| err("not an IP address"))?;
        let len: u8 = p
            .parse()
            .map_err(|_| err("prefix length must be a number"))?;
        IpNet::new(addr, len).map_err(|_| err("prefix length too long"))?
    } else {
        let addr: IpAddr = s.parse().map_err(|_| err("not an IP address or CIDR"))?;
        IpNet::from(addr)
    };
    let net = net.trunc();
    if let IpNet::V6(n6) = net {
        if n6.prefix_len() >= 96 {
            if let Some(v4) = n6.network().to_ipv4_mapped() {
                let v4net =
                    Ipv4Net::new(v4, n6.prefix_len() - 96).map_err(|_| err("bad mapped prefix"))?;
                return Ok(IpNet::V4(v4net));
            }
        }
    }
    Ok(net)
}

impl Rule {
    /// A host rule: `example.com`, `*.example.com`, either with `:PORT`, or an IP literal
    /// (`10.0.0.1:22`, `[::1]:8080`).
    pub fn host(action: Action, pattern: &str) -> Result<Rule, PolicyError> {
        Ok(Rule {
            action,
            target: Target::Host(pattern.parse()?),
        })
    }
    /// A CIDR rule: `10.0.0.0/8`, `2001:db8::/32`, or a bare IP (= /32 or /128).
    pub fn cidr(action: Action, cidr: &str) -> Result<Rule, PolicyError> {
        Ok(Rule {
            action,
            target: Target::Cidr(parse_cidr(cidr)?),
        })
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.target {
            Target::Host(h) => write!(f, "{}-host {h}", self.action),
            Target::Cidr(c) => write!(f, "{}-cidr {c}", self.action),
        }
    }
}

impl FromStr for Rule {
    type Err = PolicyError;
    /// Parses the display form: `allow-host example.com`, `block-cidr 10.0.0.0/8`, ...
    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let err = |why| PolicyError::Rule {
            input: input.to_string(),
            why,
        };
        let s = input.trim();
        let (kind, arg) = s
            .split_once(char::is_whitespace)
            .ok_or_else(|| err("expected '<action>-<host|cidr> <target>'"))?;
        let (action, what) = kind
            .split_once('-')
            .ok_or_else(|| err("expected '<action>-<host|cidr>'"))?;
        let action = match action {
            "allow" => Action::Allow,
            "block" => Action::Block,
            "bypass" => Action::Bypass,
            _ => return Err(err("action must be allow, block or bypass")),
        };
        match what {
            "host" => Rule::host(action, arg.trim()),
            "cidr" => Rule::cidr(action, arg.trim()),
            _ => Err(err("kind must be host or cidr")),
        }
    }
}

impl Serialize for Rule {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Rule {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A sandbox's network policy. JSON: `{"mode":"deny","rules":["allow-host example.com"]}`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    #[serde(default)]
    pub mode: Mode,
    #[serde(default)]
    pub rules: Vec<Rule>,
}

/// One connection attempt to decide.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// The name (or IP literal) the client asked for.
    pub host: &'a str,
    pub port: u16,
    /// One resolved address; `None` = decide on the name alone, before resolving.
    pub addr: Option<IpAddr>,
}

/// The outcome of [`Policy::decide`]. A denial is a value, not an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow {
        rule: String,
        reason: String,
        bypass: bool,
    },
    Block {
        rule: String,
        reason: String,
    },
}

impl Decision {
    pub fn is_allowed(&self) -> bool {
        matches!(self, Decision::Allow { .. })
    }
    /// The deciding rule's display string, or `mode:allow`, `mode:deny`,
    /// `default-range:<class>`.
    pub fn rule(&self) -> &str {
        match self {
            Decision::Allow { rule, .. } | Decision::Block { rule, .. } => rule,
        }
    }
    pub fn reason(&self) -> &str {
        match self {
            Decision::Allow { reason, .. } | Decision::Block { reason, .. } => reason,
        }
    }
    pub fn is_bypass(&self) -> bool {
        matches!(self, Decision::Allow { bypass: true, .. })
    }
    /// `"allow"`, `"block"` or `"bypass"`, as in [`Event::action`].
    pub fn action_str(&self) -> &'static str {
        match self {
            Decision::Allow { bypass: true, .. } => "bypass",
            Decision::Allow { .. } => "allow",
            Decision::Block { .. } => "block",
        }
    }
    fn from_rule(rule: &Rule, reason: String) -> Decision {
        match rule.action {
            Action::Block => Decision::Block {
                rule: rule.to_string(),
                reason,
            },
            a => Decision::Allow {
                rule: rule.to_string(),
                reason,
                bypass: a == Action::Bypass,
            },
        }
    }
}

/// Host-rule specificity: higher wins. Exact host:port > exact host > wildcards by
/// (suffix length, has port).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum HostSpec {
    Wildcard { suffix_len: usize, port: bool },
    Exact,
    ExactPort,
}

impl Policy {
    /// A policy with this mode and no rules.
    pub fn new(mode: Mode) -> Policy {
        Policy {
            mode,
            rules: Vec::new(),
        }
    }

    /// Add a rule; an identical rule already present is not added twice.
    pub fn add(&mut self, rule: Rule) {
        if !self.rules.contains(&rule) {
            self.rules.push(rule);
        }
    }

    /// Remove a rule; returns whether it was present.
    pub fn remove(&mut self, rule: &Rule) -> bool {
        let before = self.rules.len();
        self.rules.retain(|r| r != rule);
        self.rules.len() != before
    }

    /// Whether any allow/bypass CIDR rule exists (only then can a name that no host
    /// rule allows still be allowed in deny mode, after resolving).
    fn has_allowing_cidr(&self) -> bool {
        self.rules
            .iter()
            .any(|r| r.action != Action::Block && matches!(r.target, Target::Cidr(_)))
    }

    /// Best host rule for the request, by precedence; block > bypass > allow on ties.
    fn best_host_rule(&self, canon_host: &str, port: u16) -> Option<(&Rule, HostSpec)> {
        let mut best: Option<(&Rule, HostSpec)> = None;
        for rule in &self.rules {
            let Target::Host(p) = &rule.target else {
                continue;
            };
            if p.port.is_some_and(|pp| pp != port) || !p.matches_name(canon_host) {
                continue;
            }
            let spec = match (p.wildcard, p.port.is_some()) {
                (false, true) => HostSpec::ExactPort,
                (false, false) => HostSpec::Exact,
                (true, port) => HostSpec::Wildcard {
                    suffix_len: p.name.len(),
                    port,
                },
            };
            best = match best {
                None => Some((rule, spec)),
                Some((b, bs)) => match spec
                    .cmp(&bs)
                    .then(rule.action.strength().cmp(&b.action.strength()))
                {
                    Ordering::Greater => Some((rule, spec)),
                    _ => Some((b, bs)),
                },
            };
        }
        best
    }

    /// Best CIDR rule containing `addr` (already canonical): longest prefix, then
    /// block > bypass > allow.
    fn best_cidr_rule(&self, addr: IpAddr) -> Option<&Rule> {
        let mut best: Option<(&Rule, u8)> = None;
        for rule in &self.rules {
            let Target::Cidr(net) = &rule.target else {
                continue;
            };
            if !net.contains(&addr) {
                continue;
            }
            let len = net.prefix_len();
            best = match best {
                None => Some((rule, len)),
                Some((b, bl)) => match len
                    .cmp(&bl)
                    .then(rule.action.strength().cmp(&b.action.strength()))
                {
                    Ordering::Greater => Some((rule, len)),
                    _ => Some((b, bl)),
                },
            };
        }
        best.map(|(r, _)| r)
    }

    /// Decide a request. With `addr: None`, decides on the name only: returns `Block`
    /// when the name alone decides it (a block host rule, or deny mode with nothing that
    /// could allow it); otherwise a provisional `Allow` — the caller must then resolve and
    /// decide every address it may dial. An IP-literal host is decided as its address.
    pub fn decide(&self, req: &Request) -> Decision {
        let host = normalize_host(req.host);
        let literal = host.parse::<IpAddr>().ok();
        let addr = req.addr.or(literal).map(|a| a.to_canonical());
        let host_rule = self.best_host_rule(&host, req.port);

        if let Some((rule, _)) = host_rule {
            if rule.action == Action::Block {
                return Decision::from_rule(
                    rule,
                    format!("{}:{} matches {}", host, req.port, rule),
                );
            }
        }
        let Some(addr) = addr else {
            return match host_rule {
                Some((rule, _)) => Decision::from_rule(
                    rule,
                    format!("{} matches {} (address not yet checked)", host, rule),
                ),
                None if self.mode == Mode::Deny && !self.has_allowing_cidr() => Decision::Block {
                    rule: "mode:deny".into(),
                    reason: format!("no rule allows {}:{}", host, req.port),
                },
                None => Decision::Allow {
                    rule: format!("mode:{}", self.mode),
                    reason: format!("no rule blocks the name {} (address not yet checked)", host),
                    bypass: false,
                },
            };
        };

        let range = classify(addr);
        let range_block = |class: RangeClass| Decision::Block {
            rule: format!("default-range:{}", class.name()),
            reason: range_reason(addr, class),
        };
        if let Some((rule, spec)) = host_rule {
            // Allow or bypass by name. A wildcard never unlocks a special range; an exact
            // rule for the requested name does.
            let exact = matches!(spec, HostSpec::Exact | HostSpec::ExactPort);
            match range {
                None => {
                    return Decision::from_rule(
                        rule,
                        format!("{}:{} matches {}", host, req.port, rule),
                    )
                }
                Some(_) if exact => {
                    return Decision::from_rule(
                        rule,
                        format!(
                            "{}:{} ({addr}) explicitly allowed by {}",
                            host, req.port, rule
                        ),
                    )
                }
                Some(class) => {
                    return match self.best_cidr_rule(addr) {
                        Some(c) if c.action != Action::Block => Decision::from_rule(
                            c,
                            format!(
                                "{addr} is inside {c} ({} range explicitly allowed)",
                                class.name()
                            ),
                        ),
                        _ => range_block(class),
                    };
                }
            }
        }
        if let Some(c) = self.best_cidr_rule(addr) {
            return Decision::from_rule(c, format!("{addr} is inside {c}"));
        }
        if let Some(class) = range {
            return range_block(class);
        }
        match self.mode {
            Mode::Allow => Decision::Allow {
                rule: "mode:allow".into(),
                reason: format!("no rule blocks {}:{} ({addr})", host, req.port),
                bypass: false,
            },
            Mode::Deny => Decision::Block {
                rule: "mode:deny".into(),
                reason: format!("no rule allows {}:{} ({addr})", host, req.port),
            },
        }
    }
}

fn range_reason(addr: IpAddr, class: RangeClass) -> String {
    if let IpAddr::V6(v6) = addr {
        if let Some((v4, how)) = embedded_v4(v6) {
            if classify(IpAddr::V4(v4)) == Some(class) {
                return format!(
                    "{addr} embeds {v4} ({}), which is {}",
                    how.name(),
                    class.describe()
                );
            }
        }
    }
    format!("{addr} is {}", class.describe())
}

/// One logged egress decision: one line of the audit file (JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// RFC 3339 UTC with milliseconds, e.g. `2026-11-27T06:30:01.123Z`.
    pub time: String,
    pub sandbox: String,
    /// `"proxy"` (explicit forward proxy) or `"transparent"`.
    pub path: String,
    /// `"GET"`, `"CONNECT"`, ...
    pub method: String,
    pub host: String,
    pub port: u16,
    /// The resolved address dialed or refused.
    pub addr: Option<String>,
    /// `"allow"`, `"block"` or `"bypass"`.
    pub action: String,
    pub rule: String,
    pub reason: String,
    pub bytes_up: u64,
    pub bytes_down: u64,
}

#[cfg(test)]
mod tests;
