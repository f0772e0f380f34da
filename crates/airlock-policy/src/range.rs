//! The address ranges that are always blocked unless a rule explicitly allows them.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// A special-purpose address range that egress never reaches by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RangeClass {
    /// 127.0.0.0/8, ::1
    Loopback,
    /// RFC 1918: 10/8, 172.16/12, 192.168/16
    Private,
    /// 169.254.0.0/16 (cloud metadata lives at 169.254.169.254)
    LinkLocal,
    /// 100.64.0.0/10 (RFC 6598 shared address space)
    Cgnat,
    /// 0.0.0.0/8, ::
    Unspecified,
    /// 224.0.0.0/4
    Multicast,
    /// 240.0.0.0/4 except the broadcast address
    Reserved,
    /// 255.255.255.255
    Broadcast,
    /// 192.0.2/24, 198.51.100/24, 203.0.113/24, 2001:db8::/32
    Documentation,
    /// 198.18.0.0/15
    Benchmark,
    /// 192.0.0.0/24 (IETF protocol assignments)
    IetfProtocol,
    /// fc00::/7
    UniqueLocal,
    /// fe80::/10
    LinkLocalV6,
    /// ff00::/8
    MulticastV6,
}

impl RangeClass {
    /// Short stable name, used in `default-range:<name>`.
    pub fn name(self) -> &'static str {
        match self {
            RangeClass::Loopback => "loopback",
            RangeClass::Private => "private",
            RangeClass::LinkLocal => "link-local",
            RangeClass::Cgnat => "cgnat",
            RangeClass::Unspecified => "unspecified",
            RangeClass::Multicast => "multicast",
            RangeClass::Reserved => "reserved",
            RangeClass::Broadcast => "broadcast",
            RangeClass::Documentation => "documentation",
            RangeClass::Benchmark => "benchmark",
            RangeClass::IetfProtocol => "ietf-protocol",
            RangeClass::UniqueLocal => "unique-local",
            RangeClass::LinkLocalV6 => "link-local-v6",
            RangeClass::MulticastV6 => "multicast-v6",
        }
    }

    /// Human text for a block reason: "<addr> is <describe()>".
    pub fn describe(self) -> &'static str {
        match self {
            RangeClass::Loopback => "loopback",
            RangeClass::Private => "private (RFC 1918)",
            RangeClass::LinkLocal => "link-local (cloud metadata)",
            RangeClass::Cgnat => "carrier-grade NAT (RFC 6598)",
            RangeClass::Unspecified => "unspecified (\"this network\")",
            RangeClass::Multicast => "multicast",
            RangeClass::Reserved => "reserved (240.0.0.0/4)",
            RangeClass::Broadcast => "broadcast",
            RangeClass::Documentation => "a documentation range",
            RangeClass::Benchmark => "a benchmarking range (198.18.0.0/15)",
            RangeClass::IetfProtocol => "IETF protocol assignments (192.0.0.0/24)",
            RangeClass::UniqueLocal => "IPv6 unique-local (fc00::/7)",
            RangeClass::LinkLocalV6 => "IPv6 link-local (fe80::/10)",
            RangeClass::MulticastV6 => "IPv6 multicast",
        }
    }
}

/// How an IPv4 address is embedded in an IPv6 one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Embedding {
    /// ::ffff:0:0/96
    Mapped,
    /// 64:ff9b::/96 (and the local-use 64:ff9b:1::/48)
    Nat64,
    /// ::/96 (deprecated IPv4-compatible)
    Compatible,
    /// 2002::/16
    SixToFour,
}

impl Embedding {
    pub fn name(self) -> &'static str {
        match self {
            Embedding::Mapped => "IPv4-mapped",
            Embedding::Nat64 => "NAT64",
            Embedding::Compatible => "IPv4-compatible",
            Embedding::SixToFour => "6to4",
        }
    }
}

/// The IPv4 address embedded in an IPv6 address, if it has one. `::` and `::1` are
/// not treated as IPv4-compatible.
pub fn embedded_v4(a: Ipv6Addr) -> Option<(Ipv4Addr, Embedding)> {
    let s = a.segments();
    let o = a.octets();
    let tail = Ipv4Addr::new(o[12], o[13], o[14], o[15]);
    if let Some(v4) = a.to_ipv4_mapped() {
        return Some((v4, Embedding::Mapped));
    }
    if s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0] {
        return Some((tail, Embedding::Nat64));
    }
    if s[0] == 0x64 && s[1] == 0xff9b && s[2] == 1 {
        // RFC 8215 local-use NAT64 prefix; the v4 sits in the last 32 bits for a /96.
        return Some((tail, Embedding::Nat64));
    }
    if s[0..6] == [0, 0, 0, 0, 0, 0] && !(s[6] == 0 && s[7] <= 1) {
        return Some((tail, Embedding::Compatible));
    }
    if s[0] == 0x2002 {
        return Some((Ipv4Addr::new(o[2], o[3], o[4], o[5]), Embedding::SixToFour));
    }
    None
}

fn classify_v4(a: Ipv4Addr) -> Option<RangeClass> {
    let o = a.octets();
    let c = match o {
        [127, ..] => RangeClass::Loopback,
        [10, ..] => RangeClass::Private,
        [172, b, ..] if (16..32).contains(&b) => RangeClass::Private,
        [192, 168, ..] => RangeClass::Private,
        [169, 254, ..] => RangeClass::LinkLocal,
        [100, b, ..] if (64..128).contains(&b) => RangeClass::Cgnat,
        [0, ..] => RangeClass::Unspecified,
        [255, 255, 255, 255] => RangeClass::Broadcast,
        [224..=239, ..] => RangeClass::Multicast,
        [240..=255, ..] => RangeClass::Reserved,
        [192, 0, 2, _] | [198, 51, 100, _] | [203, 0, 113, _] => RangeClass::Documentation,
        [198, 18 | 19, ..] => RangeClass::Benchmark,
        [192, 0, 0, _] => RangeClass::IetfProtocol,
        _ => return None,
    };
    Some(c)
}

/// The always-blocked range `addr` falls in, if any. IPv6 addresses that embed an IPv4
/// address (mapped, NAT64, compatible, 6to4) are classified by the embedded address.
pub fn classify(addr: IpAddr) -> Option<RangeClass> {
    match addr {
        IpAddr::V4(a) => classify_v4(a),
        IpAddr::V6(a) => {
            if a.is_unspecified() {
                return Some(RangeClass::Unspecified);
            }
            if a.is_loopback() {
                return Some(RangeClass::Loopback);
            }
            if let Some((v4, _)) = embedded_v4(a) {
                return classify_v4(v4);
            }
            let s0 = a.segments()[0];
            let s1 = a.segments()[1];
            if s0 & 0xfe00 == 0xfc00 {
                Some(RangeClass::UniqueLocal)
            } else if s0 & 0xffc0 == 0xfe80 {
                Some(RangeClass::LinkLocalV6)
            } else if s0 & 0xff00 == 0xff00 {
                Some(RangeClass::MulticastV6)
            } else if s0 == 0x2001 && s1 == 0x0db8 {
                Some(RangeClass::Documentation)
            } else {
                None
            }
        }
    }
}
