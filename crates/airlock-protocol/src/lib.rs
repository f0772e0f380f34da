//! Host ↔ guest protocol of airlock.
//!
//! Owns: the wire format of the control channel between a host-side client
//! (the CLI's `exec`, the supervisor) and the guest agent (PID 1 inside a
//! sandbox), the version handshake, and [`GuestConfig`], the configuration the
//! backend hands to the guest agent at boot.
//!
//! Must not: do any I/O beyond reading and writing frames on a stream it is
//! given, or depend on any other airlock crate (it is a leaf, shared by the
//! statically linked guest agent).
//!
//! # Wire format
//! Every frame is `len: u32 (big endian) | kind: u8 | payload`, where `len`
//! counts `kind` and `payload`. Data frames (stdin, stdout, stderr) carry raw
//! bytes; control frames carry a JSON object. New fields are added as
//! `Option`/`#[serde(default)]` so that an older peer still parses them; a new
//! frame kind needs a protocol version bump, negotiated by [`Hello`].
//! See `VERSIONING.md` next to this crate.

use serde::{Deserialize, Serialize};
use std::io::{self, Read, Write};

/// Highest protocol version this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;
/// Oldest protocol version this build still accepts.
pub const MIN_PROTOCOL_VERSION: u32 = 1;
/// Upper bound on one frame, so a corrupt length cannot make a peer allocate
/// gigabytes.
pub const MAX_FRAME: usize = 4 * 1024 * 1024;

/// First frame in each direction. The connection then speaks
/// `min(client.version, guest.version)`, refused if that is below either
/// side's minimum.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub version: u32,
    pub min_version: u32,
    /// Free-form build identifier (`airlock-guest 0.1.0`), for diagnostics.
    #[serde(default)]
    pub agent: String,
}

impl Hello {
    pub fn ours(agent: &str) -> Self {
        Hello {
            version: PROTOCOL_VERSION,
            min_version: MIN_PROTOCOL_VERSION,
            agent: agent.to_string(),
        }
    }

    /// The version both sides speak, or an error if the ranges do not meet.
    pub fn negotiate(&self, peer: &Hello) -> Result<u32, ProtocolError> {
        let v = self.version.min(peer.version);
        if v < self.min_version || v < peer.min_version {
            return Err(ProtocolError::Version {
                ours: self.version,
                theirs: peer.version,
            });
        }
        Ok(v)
    }
}

/// A request to run one process inside the sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// Program and arguments; `argv[0]` is looked up in `PATH` if it has no `/`.
    pub argv: Vec<String>,
    /// Extra environment, applied over the sandbox's base environment.
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// Working directory; default is the user's home directory.
    #[serde(default)]
    pub cwd: Option<String>,
    /// User name or numeric uid inside the sandbox; default root (uid 0).
    #[serde(default)]
    pub user: Option<String>,
    /// Allocate a pseudo-terminal; stdout and stderr then arrive merged as
    /// [`Frame::Stdout`].
    #[serde(default)]
    pub tty: bool,
    /// Initial terminal size when `tty` is set.
    #[serde(default)]
    pub rows: u16,
    #[serde(default)]
    pub cols: u16,
    /// Value of `TERM` when `tty` is set.
    #[serde(default)]
    pub term: Option<String>,
}

/// Terminal size change for a process started with `tty`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resize {
    pub rows: u16,
    pub cols: u16,
}

/// Deliver a signal (Linux number) to the process (its process group when it
/// has a terminal).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signal {
    pub signal: i32,
}

/// The process was started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Started {
    /// Its pid inside the sandbox's pid namespace.
    pub pid: i32,
}

/// The process ended: exactly one of `code` and `signal` is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exit {
    #[serde(default)]
    pub code: Option<i32>,
    #[serde(default)]
    pub signal: Option<i32>,
}

impl Exit {
    /// Shell convention: the exit code, or 128 + signal number.
    pub fn status(&self) -> i32 {
        match (self.code, self.signal) {
            (Some(c), _) => c,
            (None, Some(s)) => 128 + s,
            (None, None) => 255,
        }
    }
}

/// The request failed before or instead of running (bad cwd, unknown user,
/// program not found). `code` follows the shell: 126 not executable, 127 not
/// found, 125 other failure of the guest agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorMsg {
    pub message: String,
    #[serde(default)]
    pub code: Option<i32>,
}

/// One frame on the control channel. Matches on this enum are exhaustive, so
/// adding a kind does not compile until every side handles it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Hello(Hello),
    /// client → guest
    Exec(ExecRequest),
    /// client → guest; an empty payload closes the process's stdin.
    Stdin(Vec<u8>),
    /// client → guest
    Resize(Resize),
    /// client → guest
    Signal(Signal),
    /// guest → client
    Started(Started),
    /// guest → client
    Stdout(Vec<u8>),
    /// guest → client
    Stderr(Vec<u8>),
    /// guest → client; the last frame of an exec.
    Exit(Exit),
    /// guest → client; the last frame of a failed exec.
    Error(ErrorMsg),
}

const K_HELLO: u8 = 0x01;
const K_EXEC: u8 = 0x02;
const K_STDIN: u8 = 0x03;
const K_RESIZE: u8 = 0x04;
const K_SIGNAL: u8 = 0x05;
const K_STARTED: u8 = 0x10;
const K_STDOUT: u8 = 0x11;
const K_STDERR: u8 = 0x12;
const K_EXIT: u8 = 0x13;
const K_ERROR: u8 = 0x14;

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("i/o on the control channel")]
    Io(#[from] io::Error),
    #[error("frame of {0} bytes exceeds the limit")]
    TooLarge(usize),
    #[error("empty frame")]
    Empty,
    #[error("unknown frame kind {0:#04x}")]
    UnknownKind(u8),
    #[error("malformed {kind} frame")]
    Json {
        kind: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("protocol version mismatch: we speak up to {ours}, the peer up to {theirs}")]
    Version { ours: u32, theirs: u32 },
    #[error("unexpected frame: {0}")]
    Unexpected(&'static str),
}

impl Frame {
    pub fn name(&self) -> &'static str {
        match self {
            Frame::Hello(_) => "hello",
            Frame::Exec(_) => "exec",
            Frame::Stdin(_) => "stdin",
            Frame::Resize(_) => "resize",
            Frame::Signal(_) => "signal",
            Frame::Started(_) => "started",
            Frame::Stdout(_) => "stdout",
            Frame::Stderr(_) => "stderr",
            Frame::Exit(_) => "exit",
            Frame::Error(_) => "error",
        }
    }

    /// Serialise into one buffer (length prefix included).
    pub fn encode(&self) -> Vec<u8> {
        fn json<T: Serialize>(v: &T) -> Vec<u8> {
            // Serialising these plain structs cannot fail: no maps with
            // non-string keys, no custom Serialize impls.
            serde_json::to_vec(v).expect("protocol structs serialise")
        }
        let (kind, payload): (u8, std::borrow::Cow<'_, [u8]>) = match self {
            Frame::Hello(v) => (K_HELLO, json(v).into()),
            Frame::Exec(v) => (K_EXEC, json(v).into()),
            Frame::Stdin(d) => (K_STDIN, d.as_slice().into()),
            Frame::Resize(v) => (K_RESIZE, json(v).into()),
            Frame::Signal(v) => (K_SIGNAL, json(v).into()),
            Frame::Started(v) => (K_STARTED, json(v).into()),
            Frame::Stdout(d) => (K_STDOUT, d.as_slice().into()),
            Frame::Stderr(d) => (K_STDERR, d.as_slice().into()),
            Frame::Exit(v) => (K_EXIT, json(v).into()),
            Frame::Error(v) => (K_ERROR, json(v).into()),
        };
        let len = (payload.len() + 1) as u32;
        let mut out = Vec::with_capacity(payload.len() + 5);
        out.extend_from_slice(&len.to_be_bytes());
        out.push(kind);
        out.extend_from_slice(&payload);
        out
    }

    /// Parse the body of a frame (`kind | payload`, without the length).
    pub fn decode(body: &[u8]) -> Result<Frame, ProtocolError> {
        fn json<'a, T: Deserialize<'a>>(
            kind: &'static str,
            p: &'a [u8],
        ) -> Result<T, ProtocolError> {
            serde_json::from_slice(p).map_err(|source| ProtocolError::Json { kind, source })
        }
        let (&kind, p) = body.split_first().ok_or(ProtocolError::Empty)?;
        Ok(match kind {
            K_HELLO => Frame::Hello(json("hello", p)?),
            K_EXEC => Frame::Exec(json("exec", p)?),
            K_STDIN => Frame::Stdin(p.to_vec()),
            K_RESIZE => Frame::Resize(json("resize", p)?),
            K_SIGNAL => Frame::Signal(json("signal", p)?),
            K_STARTED => Frame::Started(json("started", p)?),
            K_STDOUT => Frame::Stdout(p.to_vec()),
            K_STDERR => Frame::Stderr(p.to_vec()),
            K_EXIT => Frame::Exit(json("exit", p)?),
            K_ERROR => Frame::Error(json("error", p)?),
            other => return Err(ProtocolError::UnknownKind(other)),
        })
    }
}

/// Write one frame and flush.
pub fn write_frame<W: Write>(w: &mut W, frame: &Frame) -> Result<(), ProtocolError> {
    w.write_all(&frame.encode())?;
    w.flush()?;
    Ok(())
}

/// Read one frame; `Ok(None)` on a clean end of stream between frames.
pub fn read_frame<R: Read>(r: &mut R) -> Result<Option<Frame>, ProtocolError> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut len[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let len = u32::from_be_bytes(len) as usize;
    if len == 0 {
        return Err(ProtocolError::Empty);
    }
    if len > MAX_FRAME {
        return Err(ProtocolError::TooLarge(len));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Frame::decode(&body).map(Some)
}

/// Configuration the backend hands to the guest agent when it starts it, as
/// JSON in the environment variable [`GUEST_CONFIG_ENV`]. The agent removes
/// that variable from its own environment before starting anything.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct GuestConfig {
    /// Sandbox name, also used as the host name.
    pub hostname: String,
    /// Base environment of every process the agent starts (PATH, HOME, TERM,
    /// proxy variables...). Exec requests add to it.
    pub env: Vec<(String, String)>,
    /// File descriptor (inherited) on which the agent accepts control
    /// connections.
    pub control_fd: i32,
    /// Loopback address inside the sandbox where the agent accepts proxy
    /// clients (`127.0.0.1:3128`) and relays each connection to
    /// `proxy_socket`.
    #[serde(default)]
    pub proxy_listen: Option<String>,
    /// Path, inside the sandbox, of the host egress engine's Unix socket.
    #[serde(default)]
    pub proxy_socket: Option<String>,
    /// Directories to create (mode 1777 for /tmp-like dirs is up to the
    /// agent) before serving — none needed yet; reserved for backends.
    #[serde(default)]
    pub workspaces: Vec<String>,
}

/// Environment variable carrying the JSON [`GuestConfig`].
pub const GUEST_CONFIG_ENV: &str = "AIRLOCK_GUEST_CONFIG";

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(f: Frame) {
        let bytes = f.encode();
        let got = read_frame(&mut &bytes[..]).unwrap().unwrap();
        assert_eq!(got, f);
    }

    #[test]
    fn frames_roundtrip() {
        roundtrip(Frame::Hello(Hello::ours("t")));
        roundtrip(Frame::Exec(ExecRequest {
            argv: vec!["sh".into(), "-c".into(), "echo hi".into()],
            env: vec![("A".into(), "b=c".into())],
            cwd: Some("/tmp".into()),
            user: None,
            tty: true,
            rows: 24,
            cols: 80,
            term: Some("xterm".into()),
        }));
        roundtrip(Frame::Stdin(vec![]));
        roundtrip(Frame::Stdin(vec![0, 1, 2, 255]));
        roundtrip(Frame::Resize(Resize { rows: 1, cols: 2 }));
        roundtrip(Frame::Signal(Signal { signal: 15 }));
        roundtrip(Frame::Started(Started { pid: 7 }));
        roundtrip(Frame::Stdout(b"out".to_vec()));
        roundtrip(Frame::Stderr(b"err".to_vec()));
        roundtrip(Frame::Exit(Exit {
            code: Some(3),
            signal: None,
        }));
        roundtrip(Frame::Error(ErrorMsg {
            message: "x".into(),
            code: Some(127),
        }));
    }

    #[test]
    fn clean_eof_is_none_and_torn_frame_is_error() {
        assert!(read_frame(&mut &b""[..]).unwrap().is_none());
        assert!(read_frame(&mut &b"\0\0"[..]).is_err());
        let mut f = Frame::Stdout(b"hello".to_vec()).encode();
        f.truncate(f.len() - 1);
        assert!(read_frame(&mut &f[..]).is_err());
    }

    #[test]
    fn rejects_bad_frames() {
        assert!(matches!(
            read_frame(&mut &[0u8, 0, 0, 0][..]),
            Err(ProtocolError::Empty)
        ));
        assert!(matches!(
            read_frame(&mut &[0xffu8, 0xff, 0xff, 0xff][..]),
            Err(ProtocolError::TooLarge(_))
        ));
        assert!(matches!(
            read_frame(&mut &[0u8, 0, 0, 1, 0x7f][..]),
            Err(ProtocolError::UnknownKind(0x7f))
        ));
        assert!(matches!(
            read_frame(&mut &[0u8, 0, 0, 2, K_EXIT, b'{'][..]),
            Err(ProtocolError::Json { .. })
        ));
        // Unknown fields in an exec request are refused, not ignored.
        let body = br#"{"argv":["x"],"evil":1}"#;
        let mut v = ((body.len() + 1) as u32).to_be_bytes().to_vec();
        v.push(K_EXEC);
        v.extend_from_slice(body);
        assert!(read_frame(&mut &v[..]).is_err());
    }

    #[test]
    fn negotiation() {
        let a = Hello {
            version: 3,
            min_version: 1,
            agent: String::new(),
        };
        let b = Hello {
            version: 2,
            min_version: 2,
            agent: String::new(),
        };
        assert_eq!(a.negotiate(&b).unwrap(), 2);
        let c = Hello {
            version: 5,
            min_version: 4,
            agent: String::new(),
        };
        assert!(b.negotiate(&c).is_err());
    }
}
