//! A TLS ClientHello parser: is this stream TLS, and which server name does it ask for?
//! Pure, allocation-light, never panics (property-tested).
//!
//! Feed it the bytes received so far; it answers [`Hello::NeedMore`] until the whole
//! ClientHello (possibly spread over several records) has arrived.

/// Largest ClientHello accepted (handshake message body). Real ones are under 2 KiB
/// (post-quantum key shares included); 64 KiB bounds the buffering.
pub const MAX_HELLO: usize = 64 * 1024;

/// What the first bytes of a stream are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hello {
    /// Not enough bytes yet to decide.
    NeedMore,
    /// Not a TLS handshake (the first byte is not a handshake record).
    NotTls,
    /// Starts like TLS but is not a well-formed ClientHello.
    Malformed(&'static str),
    /// A complete ClientHello; `sni` is the host_name of the server_name extension,
    /// lowercased, if present. (The offered ALPN list: [`parse_client_hello_alpn`].)
    ClientHello { sni: Option<String> },
}

struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.b.len() < n {
            return None;
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Some(h)
    }
    fn u8(&mut self) -> Option<usize> {
        self.take(1).map(|b| b[0] as usize)
    }
    fn u16(&mut self) -> Option<usize> {
        self.take(2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]) as usize)
    }
    fn vec8(&mut self) -> Option<&'a [u8]> {
        let n = self.u8()?;
        self.take(n)
    }
    fn vec16(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()?;
        self.take(n)
    }
}

/// Parse the start of a stream. See [`Hello`].
pub fn parse_client_hello(data: &[u8]) -> Hello {
    parse_client_hello_alpn(data).0
}

/// [`parse_client_hello`], plus the application protocols the ClientHello offers (in
/// order; empty without the ALPN extension or unless it is a complete ClientHello).
pub fn parse_client_hello_alpn(data: &[u8]) -> (Hello, Vec<Vec<u8>>) {
    match parse_records(data) {
        Ok(body) => match parse_body_inner(&body) {
            Ok((sni, alpn)) => (Hello::ClientHello { sni }, alpn),
            Err(why) => (Hello::Malformed(why), Vec::new()),
        },
        Err(h) => (h, Vec::new()),
    }
}

/// The ClientHello body reassembled from its records, or what to answer instead.
fn parse_records(data: &[u8]) -> Result<Vec<u8>, Hello> {
    // Reassemble the handshake layer from consecutive handshake records.
    let mut hs: Vec<u8> = Vec::new();
    let mut rest = data;
    let mut first = true;
    loop {
        if rest.is_empty() {
            return Err(Hello::NeedMore);
        }
        if rest[0] != 0x16 {
            return Err(if first {
                Hello::NotTls
            } else {
                Hello::Malformed("non-handshake record inside the ClientHello")
            });
        }
        if rest.len() < 5 {
            return Err(Hello::NeedMore);
        }
        if rest[1] != 3 {
            return Err(Hello::Malformed("record version"));
        }
        let len = u16::from_be_bytes([rest[3], rest[4]]) as usize;
        if len == 0 || len > 16384 + 2048 {
            return Err(Hello::Malformed("record length"));
        }
        if rest.len() < 5 + len {
            return Err(Hello::NeedMore);
        }
        hs.extend_from_slice(&rest[5..5 + len]);
        rest = &rest[5 + len..];
        first = false;
        if hs.len() >= 4 {
            if hs[0] != 1 {
                return Err(Hello::Malformed(
                    "first handshake message is not a ClientHello",
                ));
            }
            let body = (hs[1] as usize) << 16 | (hs[2] as usize) << 8 | hs[3] as usize;
            if body > MAX_HELLO {
                return Err(Hello::Malformed("ClientHello too large"));
            }
            if hs.len() >= 4 + body {
                hs.truncate(4 + body);
                hs.drain(..4);
                return Ok(hs);
            }
        }
    }
}

type Parsed = (Option<String>, Vec<Vec<u8>>);

fn parse_body_inner(body: &[u8]) -> Result<Parsed, &'static str> {
    let mut r = Reader { b: body };
    let version = r.u16().ok_or("truncated version")?;
    if version >> 8 != 3 {
        return Err("client version");
    }
    r.take(32).ok_or("truncated random")?;
    let sid = r.vec8().ok_or("truncated session id")?;
    if sid.len() > 32 {
        return Err("session id too long");
    }
    let suites = r.vec16().ok_or("truncated cipher suites")?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return Err("cipher suites");
    }
    let comp = r.vec8().ok_or("truncated compression methods")?;
    if comp.is_empty() {
        return Err("compression methods");
    }
    if r.b.is_empty() {
        return Ok((None, Vec::new())); // no extensions (TLS 1.0-style hello)
    }
    let exts = r.vec16().ok_or("truncated extensions")?;
    if !r.b.is_empty() {
        return Err("trailing bytes after extensions");
    }
    let mut e = Reader { b: exts };
    let mut sni = None;
    let mut alpn = Vec::new();
    while !e.b.is_empty() {
        let ty = e.u16().ok_or("truncated extension")?;
        let data = e.vec16().ok_or("truncated extension")?;
        if ty == 16 {
            let mut a = Reader { b: data };
            let list = a.vec16().ok_or("truncated ALPN list")?;
            let mut l = Reader { b: list };
            while !l.b.is_empty() {
                let p = l.vec8().ok_or("truncated ALPN protocol")?;
                if p.is_empty() {
                    return Err("empty ALPN protocol");
                }
                alpn.push(p.to_vec());
            }
            continue;
        }
        if ty != 0 {
            continue;
        }
        if sni.is_some() {
            return Err("duplicate server_name extension");
        }
        let mut s = Reader { b: data };
        let list = s.vec16().ok_or("truncated server_name list")?;
        if !s.b.is_empty() {
            return Err("trailing bytes in server_name");
        }
        let mut l = Reader { b: list };
        while !l.b.is_empty() {
            let name_type = l.u8().ok_or("truncated server name")?;
            let name = l.vec16().ok_or("truncated server name")?;
            if name_type != 0 {
                continue;
            }
            if sni.is_some() {
                return Err("several host names in server_name");
            }
            sni = Some(valid_host_name(name)?);
        }
        if sni.is_none() {
            return Err("server_name without a host name");
        }
    }
    Ok((sni, alpn))
}

/// RFC 6066: ASCII host name, no trailing dot, no IP literals (not enforced: the policy
/// sees whatever was sent, and a literal is compared like any other name).
fn valid_host_name(name: &[u8]) -> Result<String, &'static str> {
    if name.is_empty() || name.len() > 253 {
        return Err("server name length");
    }
    if !name
        .iter()
        .all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
    {
        return Err("server name characters");
    }
    // Checked ASCII above.
    Ok(String::from_utf8_lossy(name).to_ascii_lowercase())
}

/// Build a minimal ClientHello record (tests, benchmarks, fuzz seeds), offering ALPN
/// h2 + http/1.1.
pub fn build_client_hello(sni: Option<&str>) -> Vec<u8> {
    let mut exts = Vec::new();
    let mut alpn = Vec::new();
    for p in [&b"h2"[..], b"http/1.1"] {
        alpn.push(p.len() as u8);
        alpn.extend_from_slice(p);
    }
    exts.extend_from_slice(&16u16.to_be_bytes());
    exts.extend_from_slice(&(alpn.len() as u16 + 2).to_be_bytes());
    exts.extend_from_slice(&(alpn.len() as u16).to_be_bytes());
    exts.extend_from_slice(&alpn);
    if let Some(name) = sni {
        let n = name.as_bytes();
        let mut entry = vec![0u8];
        entry.extend_from_slice(&(n.len() as u16).to_be_bytes());
        entry.extend_from_slice(n);
        let mut list = (entry.len() as u16).to_be_bytes().to_vec();
        list.extend_from_slice(&entry);
        exts.extend_from_slice(&0u16.to_be_bytes());
        exts.extend_from_slice(&(list.len() as u16).to_be_bytes());
        exts.extend_from_slice(&list);
    }
    // supported_versions: TLS 1.3
    exts.extend_from_slice(&[0x00, 0x2b, 0x00, 0x03, 0x02, 0x03, 0x04]);
    let mut body = vec![3, 3];
    body.extend_from_slice(&[7u8; 32]);
    body.push(0); // session id
    body.extend_from_slice(&[0, 2, 0x13, 0x01]); // one cipher suite
    body.extend_from_slice(&[1, 0]); // null compression
    body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
    body.extend_from_slice(&exts);
    let mut hs = vec![1u8];
    hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    let mut rec = vec![0x16, 3, 1];
    rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    rec.extend_from_slice(&hs);
    rec
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn alpn() -> Vec<Vec<u8>> {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    }

    #[test]
    fn basics() {
        let h = build_client_hello(Some("Api.Example.com"));
        assert_eq!(
            parse_client_hello(&h),
            Hello::ClientHello {
                sni: Some("api.example.com".into())
            }
        );
        assert_eq!(
            parse_client_hello(&build_client_hello(None)),
            Hello::ClientHello { sni: None }
        );
        for n in 0..h.len() {
            assert_eq!(parse_client_hello(&h[..n]), Hello::NeedMore, "prefix {n}");
        }
        assert_eq!(parse_client_hello(b"GET / HTTP/1.1\r\n"), Hello::NotTls);
        assert_eq!(
            parse_client_hello(b"\x16\x03\x01\x00\x05\x02\0\0\x01\0"),
            Hello::Malformed("first handshake message is not a ClientHello")
        );
        assert!(matches!(
            parse_client_hello(&build_client_hello(Some("bad name"))),
            Hello::Malformed(_)
        ));
    }

    #[test]
    fn alpn_offered() {
        let h = build_client_hello(Some("a.test"));
        assert_eq!(parse_client_hello_alpn(&h).1, alpn());
        assert!(parse_client_hello_alpn(&h[..h.len() - 1]).1.is_empty());
    }

    #[test]
    fn split_over_records() {
        let h = build_client_hello(Some("split.test"));
        let hs = &h[5..];
        let (a, b) = hs.split_at(10);
        let mut two = Vec::new();
        for part in [a, b] {
            two.extend_from_slice(&[0x16, 3, 1]);
            two.extend_from_slice(&(part.len() as u16).to_be_bytes());
            two.extend_from_slice(part);
        }
        assert_eq!(
            parse_client_hello(&two),
            Hello::ClientHello {
                sni: Some("split.test".into())
            }
        );
    }

    proptest! {
        #[test]
        fn never_panics(data in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = parse_client_hello(&data);
            let mut tls = vec![0x16, 3, 1];
            tls.extend_from_slice(&data);
            let _ = parse_client_hello(&tls);
        }

        #[test]
        fn mutated_hellos_never_panic(name in "[a-z0-9.-]{1,60}", pos in 0usize..200, byte in any::<u8>()) {
            let mut h = build_client_hello(Some(&name));
            prop_assert_eq!(parse_client_hello(&h), Hello::ClientHello { sni: Some(name.clone()) });
            let i = pos % h.len();
            h[i] = byte;
            let _ = parse_client_hello(&h);
        }

        #[test]
        fn trailing_data_is_ignored(name in "[a-z]{1,20}\\.test", extra in proptest::collection::vec(any::<u8>(), 0..100)) {
            let mut h = build_client_hello(Some(&name));
            h.extend_from_slice(&extra);
            prop_assert_eq!(parse_client_hello(&h), Hello::ClientHello { sni: Some(name) });
        }
    }
}
