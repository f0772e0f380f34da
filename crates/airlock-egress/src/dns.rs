//! The sandbox's DNS resolver (transparent capture, DESIGN §3): every UDP query the
//! sandbox sends to port 53 is answered here, under the policy.
//!
//! - A/AAAA for a name the policy blocks (for every port) → NXDOMAIN.
//! - A: resolve with the engine's [`crate::Resolver`], keep only the IPv4 addresses the
//!   policy allows *for that name* (so a public name pointing at 127.0.0.1, 10.x or
//!   169.254.x is refused unless a rule allows it: DNS rebinding), answer them with a
//!   short TTL and record them in the [`Pins`] table: a later transparent flow for that
//!   name may dial only those. Nothing left → NXDOMAIN (not REFUSED: stub resolvers
//!   retry other servers on REFUSED and report a temporary failure; NXDOMAIN fails at
//!   once and clearly).
//! - AAAA for an allowed name → NOERROR with no records: the sandbox has no IPv6, so
//!   clients fall back to IPv4 at once.
//! - `host.docker.internal` / `host.airlock.internal` → the gateway (10.0.2.2), when a
//!   `localhost[:PORT]` rule allows it; flows to 10.0.2.2 are the host's loopback.
//! - `localhost` → 127.0.0.1 (the sandbox's own loopback, as RFC 6761 says).
//! - Other query types → NOTIMP; malformed queries → FORMERR (or nothing if even the
//!   header is unreadable).
//!
//! Every query is one event with path `dns`.
//!
//! Wire format: `simple-dns` — small, no dependencies, parses and builds the whole
//! message (we need the question and a few A records, not a resolver); hickory-proto
//! would pull in a much larger tree for the same.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use airlock_policy::{Decision, Event, Policy, Request as PolicyRequest, Target as RuleTarget};
use simple_dns::rdata::{RData, A};
use simple_dns::{Packet, PacketFlag, Question, ResourceRecord, CLASS, QCLASS, QTYPE, RCODE, TYPE};

use crate::{now_rfc3339, Egress};

/// TTL of our answers, seconds. Short, so that a policy change takes effect soon.
pub const DNS_TTL: u32 = 30;
/// How long an answered address stays pinned to its name. Longer than the TTL: many
/// clients cache answers beyond it.
pub const PIN_LIFETIME: Duration = Duration::from_secs(3600);
/// Most names in the pin table (expired entries are purged first, then the oldest).
const MAX_PINNED_NAMES: usize = 20_000;
/// The gateway address: where `host.docker.internal` points inside (the host's
/// loopback services). Same as `airlock_netstack::GATEWAY`.
pub const GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);

/// Name → addresses airlock's DNS gave the sandbox, with expiry.
#[derive(Debug, Default)]
pub struct Pins {
    inner: Mutex<HashMap<String, PinEntry>>,
}

#[derive(Debug)]
struct PinEntry {
    addrs: Vec<(IpAddr, Instant)>,
    touched: Instant,
}

impl Pins {
    /// Record that `name` (normalized) was answered with `addrs`.
    pub fn record(&self, name: &str, addrs: &[IpAddr]) {
        let now = Instant::now();
        let until = now + PIN_LIFETIME;
        let mut m = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if m.len() >= MAX_PINNED_NAMES && !m.contains_key(name) {
            m.retain(|_, e| {
                e.addrs.retain(|(_, t)| *t > now);
                !e.addrs.is_empty()
            });
            if m.len() >= MAX_PINNED_NAMES {
                if let Some(oldest) = m
                    .iter()
                    .min_by_key(|(_, e)| e.touched)
                    .map(|(k, _)| k.clone())
                {
                    m.remove(&oldest);
                }
            }
        }
        let e = m.entry(name.to_string()).or_insert_with(|| PinEntry {
            addrs: Vec::new(),
            touched: now,
        });
        e.touched = now;
        e.addrs.retain(|(_, t)| *t > now);
        for a in addrs {
            let a = a.to_canonical();
            match e.addrs.iter_mut().find(|(x, _)| *x == a) {
                Some(slot) => slot.1 = until,
                None => e.addrs.push((a, until)),
            }
        }
    }

    /// Did airlock's DNS answer `name` with `addr` (not yet expired)?
    pub fn is_pinned(&self, name: &str, addr: IpAddr) -> bool {
        let now = Instant::now();
        let addr = addr.to_canonical();
        let m = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        m.get(name)
            .is_some_and(|e| e.addrs.iter().any(|(a, t)| *a == addr && *t > now))
    }
}

/// The ports worth asking the policy about for a name before any port is known: "any
/// port" (0 matches only port-less rules) plus every port that some host rule names.
pub(crate) fn candidate_ports(policy: &Policy) -> Vec<u16> {
    let mut ports = vec![0u16, 80, 443];
    for r in &policy.rules {
        if let RuleTarget::Host(h) = &r.target {
            if let Some(p) = h.port() {
                if !ports.contains(&p) {
                    ports.push(p);
                }
            }
        }
    }
    ports
}

/// Decide `name` (and `addr`) for the most permissive candidate port: the allowing
/// decision if any port allows it, else the decision for "any port".
fn decide_any_port(policy: &Policy, name: &str, addr: Option<IpAddr>) -> Decision {
    let ports = candidate_ports(policy);
    let mut first = None;
    for p in ports {
        let d = policy.decide(&PolicyRequest {
            host: name,
            port: p,
            addr,
        });
        if d.is_allowed() {
            return d;
        }
        first.get_or_insert(d);
    }
    // ports is never empty (it starts with 0, 80, 443).
    first.unwrap_or(Decision::Block {
        rule: "dns".into(),
        reason: "no port".into(),
    })
}

fn valid_query_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 253
        && n.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

struct Outcome {
    rcode: RCODE,
    answers: Vec<Ipv4Addr>,
    action: &'static str,
    rule: String,
    reason: String,
    addr: Option<IpAddr>,
}

impl Outcome {
    fn from_decision(rcode: RCODE, d: &Decision, reason: String, addr: Option<IpAddr>) -> Outcome {
        Outcome {
            rcode,
            answers: Vec::new(),
            action: d.action_str(),
            rule: d.rule().to_string(),
            reason,
            addr,
        }
    }
}

fn qtype_name(q: QTYPE) -> String {
    match q {
        QTYPE::TYPE(TYPE::A) => "A".into(),
        QTYPE::TYPE(TYPE::AAAA) => "AAAA".into(),
        QTYPE::TYPE(t) => format!("TYPE{}", u16::from(t)),
        QTYPE::ANY => "ANY".into(),
        other => format!("{other:?}"),
    }
}

impl Egress {
    /// Answer one DNS query (a UDP payload) under the policy; `None` = send nothing
    /// (not a query at all). Records one event (path `dns`).
    pub async fn answer_dns(&self, query: &[u8]) -> Option<Vec<u8>> {
        let packet = match Packet::parse(query) {
            Ok(p) => p,
            Err(e) => {
                // Answer FORMERR if at least the header is there.
                if query.len() < 12 || query[2] & 0x80 != 0 {
                    return None;
                }
                let id = u16::from_be_bytes([query[0], query[1]]);
                self.dns_event(
                    "",
                    "",
                    "block",
                    "bad-request",
                    format!("malformed DNS query: {e}"),
                    None,
                );
                let mut reply = Packet::new_reply(id);
                *reply.rcode_mut() = RCODE::FormatError;
                return reply.build_bytes_vec().ok();
            }
        };
        if packet.has_flags(PacketFlag::RESPONSE) {
            return None;
        }
        let mut reply = Packet::new_reply(packet.id());
        reply.set_flags(PacketFlag::RECURSION_AVAILABLE);
        if packet.has_flags(PacketFlag::RECURSION_DESIRED) {
            reply.set_flags(PacketFlag::RECURSION_DESIRED);
        }
        if packet.questions.len() != 1 {
            self.dns_event(
                "",
                "",
                "block",
                "bad-request",
                format!("{} questions in one query", packet.questions.len()),
                None,
            );
            *reply.rcode_mut() = RCODE::FormatError;
            return reply.build_bytes_vec().ok();
        }
        let q: &Question = &packet.questions[0];
        let raw_name = q.qname.to_string();
        let name = airlock_policy::normalize_host(&raw_name);
        let qt = qtype_name(q.qtype);
        reply.questions.push(q.clone());

        let outcome = if q.qclass != QCLASS::CLASS(CLASS::IN) {
            Outcome {
                rcode: RCODE::NotImplemented,
                answers: Vec::new(),
                action: "block",
                rule: "dns".into(),
                reason: "only class IN is served".into(),
                addr: None,
            }
        } else if !valid_query_name(&name) {
            Outcome {
                rcode: RCODE::NameError,
                answers: Vec::new(),
                action: "block",
                rule: "dns".into(),
                reason: format!("invalid name {raw_name:?}"),
                addr: None,
            }
        } else {
            match q.qtype {
                QTYPE::TYPE(TYPE::A) => self.dns_a(&name).await,
                QTYPE::TYPE(TYPE::AAAA) => self.dns_aaaa(&name),
                _ => Outcome {
                    rcode: RCODE::NotImplemented,
                    answers: Vec::new(),
                    action: "block",
                    rule: "dns".into(),
                    reason: format!("query type {qt} is not served (only A and AAAA)"),
                    addr: None,
                },
            }
        };
        *reply.rcode_mut() = outcome.rcode;
        for a in &outcome.answers {
            reply.answers.push(ResourceRecord::new(
                q.qname.clone(),
                CLASS::IN,
                DNS_TTL,
                RData::A(A {
                    address: u32::from(*a),
                }),
            ));
        }
        self.dns_event(
            &qt,
            &name,
            outcome.action,
            &outcome.rule,
            outcome.reason,
            outcome.addr,
        );
        reply.build_bytes_vec().ok()
    }

    async fn dns_a(&self, name: &str) -> Outcome {
        let policy = self.policy();
        if name == "localhost" {
            return Outcome {
                rcode: RCODE::NoError,
                answers: vec![Ipv4Addr::LOCALHOST],
                action: "allow",
                rule: "dns".into(),
                reason: "localhost is the sandbox's own loopback".into(),
                addr: Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            };
        }
        let by_name = decide_any_port(&policy, name, None);
        if !by_name.is_allowed() {
            let reason = format!("NXDOMAIN: {}", by_name.reason());
            return Outcome::from_decision(RCODE::NameError, &by_name, reason, None);
        }
        if airlock_policy::is_host_loopback_name(name) {
            // The host's loopback, reached through the gateway; needs a rule for it.
            let d = decide_any_port(&policy, name, Some(IpAddr::V4(Ipv4Addr::LOCALHOST)));
            if !d.is_allowed() {
                let reason = format!("NXDOMAIN: {}", d.reason());
                return Outcome::from_decision(RCODE::NameError, &d, reason, None);
            }
            let reason = format!("{name} is the host's loopback, reached via {GATEWAY_V4}");
            let mut o = Outcome::from_decision(RCODE::NoError, &d, reason, Some(GATEWAY_V4.into()));
            o.answers.push(GATEWAY_V4);
            return o;
        }
        let addrs = match self.lookup(name, 443).await {
            Ok(a) => a,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let reason = format!("NXDOMAIN: {name} does not resolve: {e}");
                return Outcome::from_decision(RCODE::NameError, &by_name, reason, None);
            }
            Err(e) => {
                let reason = format!("SERVFAIL: resolving {name}: {e}");
                return Outcome::from_decision(RCODE::ServerFailure, &by_name, reason, None);
            }
        };
        let mut allowed: Vec<Ipv4Addr> = Vec::new();
        let mut allowed_d = None;
        let mut first_block = None;
        for a in addrs {
            let IpAddr::V4(v4) = a.to_canonical() else {
                continue; // no IPv6 in the sandbox
            };
            let d = decide_any_port(&policy, name, Some(IpAddr::V4(v4)));
            if d.is_allowed() {
                if !allowed.contains(&v4) {
                    allowed.push(v4);
                }
                allowed_d.get_or_insert(d);
            } else if first_block.is_none() {
                first_block = Some((d, v4));
            }
        }
        match allowed_d {
            Some(d) => {
                let ips: Vec<IpAddr> = allowed.iter().map(|a| IpAddr::V4(*a)).collect();
                self.pins.record(name, &ips);
                let list: Vec<String> = allowed.iter().map(|a| a.to_string()).collect();
                let mut reason = format!("answered {}", list.join(", "));
                if let Some((bd, ba)) = &first_block {
                    reason.push_str(&format!("; withheld {ba}: {}", bd.reason()));
                }
                let mut o = Outcome::from_decision(RCODE::NoError, &d, reason, Some(ips[0]));
                o.answers = allowed;
                o
            }
            None => match first_block {
                Some((d, a)) => {
                    let reason = format!("NXDOMAIN: {name} resolves to {a}: {}", d.reason());
                    Outcome::from_decision(RCODE::NameError, &d, reason, Some(IpAddr::V4(a)))
                }
                None => {
                    let reason = format!("NXDOMAIN: {name} has no IPv4 address");
                    Outcome::from_decision(RCODE::NameError, &by_name, reason, None)
                }
            },
        }
    }

    fn dns_aaaa(&self, name: &str) -> Outcome {
        let policy = self.policy();
        let d = decide_any_port(&policy, name, None);
        if !d.is_allowed() {
            let reason = format!("NXDOMAIN: {}", d.reason());
            return Outcome::from_decision(RCODE::NameError, &d, reason, None);
        }
        let reason = "no AAAA records: the sandbox has no IPv6".to_string();
        Outcome::from_decision(RCODE::NoError, &d, reason, None)
    }

    fn dns_event(
        &self,
        qtype: &str,
        name: &str,
        action: &str,
        rule: &str,
        reason: String,
        addr: Option<IpAddr>,
    ) {
        self.record(Event {
            time: now_rfc3339(),
            sandbox: self.sandbox.clone(),
            path: "dns".into(),
            method: qtype.into(),
            host: name.into(),
            port: 53,
            addr: addr.map(|a| a.to_string()),
            action: action.into(),
            rule: rule.into(),
            reason,
            bytes_up: 0,
            bytes_down: 0,
        });
    }

    /// Did airlock's DNS give the sandbox `addr` for `name`?
    pub fn dns_pinned(&self, name: &str, addr: IpAddr) -> bool {
        self.pins
            .is_pinned(&airlock_policy::normalize_host(name), addr)
    }
}
