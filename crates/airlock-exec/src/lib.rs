//! Host-side exec client of airlock.
//!
//! Owns: connecting to a sandbox's guest agent control socket (waiting for
//! it while the sandbox starts), the handshake, running one command attached
//! to this process's terminal or with captured output, and forwarding
//! terminal size, signals and stdin.
//!
//! Must not: know how sandboxes are started or where their sockets live
//! (callers pass the path), or keep any state between calls.
//!
//! Three entry points: [`run_attached`] (the `airlock exec` CLI),
//! [`run_captured`] (tests and internal callers), [`ping`] (readiness).
//! [`Session`] is the lower-level API they are built on, for callers that
//! need to drive a process step by step (resize, signals, streaming).

mod attach;
mod term;

use airlock_protocol::{
    read_frame, write_frame, ErrorMsg, ExecRequest, Exit, Frame, Hello, ProtocolError, Resize,
    Signal,
};
use std::io;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

pub use airlock_protocol::{ErrorMsg as GuestError, Exit as ExitStatus};

/// Name we give in the handshake.
const CLIENT: &str = concat!("airlock-exec ", env!("CARGO_PKG_VERSION"));
/// Largest stdin chunk per frame (well below the protocol's frame limit).
const STDIN_CHUNK: usize = 256 * 1024;
/// Exit status reported when the guest's Error frame carries no code.
pub const DEFAULT_ERROR_CODE: i32 = 125;

/// What to run and how.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecOptions {
    /// Program and arguments; the program is looked up in the sandbox's PATH.
    pub argv: Vec<String>,
    /// Extra environment, over the sandbox's base environment.
    pub env: Vec<(String, String)>,
    /// Working directory inside the sandbox (default: the user's home).
    pub cwd: Option<String>,
    /// User name or uid inside the sandbox (default: root).
    pub user: Option<String>,
    /// Allocate a pseudo-terminal inside the sandbox.
    pub tty: bool,
    /// Forward our stdin (otherwise the process sees EOF at once).
    pub interactive: bool,
}

/// Errors of this crate; each names the control socket involved.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("empty command: nothing to execute")]
    EmptyCommand,
    #[error("cannot connect to the guest agent at {}", .socket.display())]
    Connect {
        socket: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "the guest agent at {} did not accept a connection within {timeout:?} (is the sandbox running?)",
        .socket.display()
    )]
    ConnectTimeout {
        socket: PathBuf,
        timeout: Duration,
        #[source]
        source: io::Error,
    },
    #[error("protocol error talking to the guest agent at {}", .socket.display())]
    Protocol {
        socket: PathBuf,
        #[source]
        source: ProtocolError,
    },
    #[error("the guest agent at {} closed the connection before the command finished", .socket.display())]
    Disconnected { socket: PathBuf },
    #[error("the guest agent at {} sent an unexpected {frame} frame", .socket.display())]
    Unexpected {
        socket: PathBuf,
        frame: &'static str,
    },
    #[error("the guest agent at {} refused the connection: {message}", .socket.display())]
    Refused { socket: PathBuf, message: String },
    #[error("i/o error while running a command through {}", .socket.display())]
    Io {
        socket: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot set up the local terminal for {}", .socket.display())]
    Terminal {
        socket: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn proto(socket: &Path) -> impl Fn(ProtocolError) -> ExecError + '_ {
    move |source| ExecError::Protocol {
        socket: socket.to_path_buf(),
        source,
    }
}

/// Connect, retrying while the socket does not exist yet or nobody listens
/// (the sandbox may still be starting).
fn connect(socket: &Path, timeout: Duration) -> Result<UnixStream, ExecError> {
    let deadline = Instant::now() + timeout;
    let mut backoff = Duration::from_millis(1);
    loop {
        match UnixStream::connect(socket) {
            Ok(s) => return Ok(s),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ENOENT | libc::ECONNREFUSED | libc::EAGAIN)
                ) =>
            {
                let now = Instant::now();
                if now >= deadline {
                    return Err(ExecError::ConnectTimeout {
                        socket: socket.to_path_buf(),
                        timeout,
                        source: e,
                    });
                }
                std::thread::sleep(backoff.min(deadline - now));
                backoff = (backoff * 2).min(Duration::from_millis(50));
            }
            Err(source) => {
                return Err(ExecError::Connect {
                    socket: socket.to_path_buf(),
                    source,
                })
            }
        }
    }
}

/// Exchange Hello frames; returns the negotiated version.
fn handshake(socket: &Path, stream: &mut UnixStream) -> Result<u32, ExecError> {
    let ours = Hello::ours(CLIENT);
    write_frame(stream, &Frame::Hello(ours.clone())).map_err(proto(socket))?;
    match read_frame(stream).map_err(proto(socket))? {
        Some(Frame::Hello(theirs)) => ours.negotiate(&theirs).map_err(proto(socket)),
        Some(Frame::Error(e)) => Err(ExecError::Refused {
            socket: socket.to_path_buf(),
            message: e.message,
        }),
        Some(other) => Err(ExecError::Unexpected {
            socket: socket.to_path_buf(),
            frame: other.name(),
        }),
        None => Err(ExecError::Disconnected {
            socket: socket.to_path_buf(),
        }),
    }
}

/// Wait until the guest agent at `socket` answers a handshake, for at most
/// `timeout`.
pub fn ping(socket: &Path, timeout: Duration) -> Result<(), ExecError> {
    let deadline = Instant::now() + timeout;
    let mut stream = connect(socket, timeout)?;
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1));
    let io_err = |source| ExecError::Io {
        socket: socket.to_path_buf(),
        source,
    };
    stream.set_read_timeout(Some(left)).map_err(io_err)?;
    stream.set_write_timeout(Some(left)).map_err(io_err)?;
    handshake(socket, &mut stream).map(drop)
}

/// Something the guest reported about a running command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Started {
        pid: i32,
    },
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    /// Last event: the process ended.
    Exit(Exit),
    /// Last event: the command could not be run.
    Error(ErrorMsg),
}

/// A command running in a sandbox.
pub struct Session {
    socket: PathBuf,
    reader: UnixStream,
    sender: Sender,
    version: u32,
}

/// Cloneable handle to send input, resizes and signals to a [`Session`]'s
/// process from any thread.
#[derive(Clone)]
pub struct Sender {
    socket: PathBuf,
    stream: Arc<Mutex<UnixStream>>,
}

impl Sender {
    fn send(&self, frame: &Frame) -> Result<(), ExecError> {
        let mut s = self.stream.lock().unwrap_or_else(PoisonError::into_inner);
        write_frame(&mut *s, frame).map_err(proto(&self.socket))
    }

    /// Bytes for the process's stdin (or its terminal).
    pub fn stdin(&self, data: &[u8]) -> Result<(), ExecError> {
        for chunk in data.chunks(STDIN_CHUNK) {
            self.send(&Frame::Stdin(chunk.to_vec()))?;
        }
        Ok(())
    }

    /// End of input (with a terminal: the EOF character, ^D).
    pub fn close_stdin(&self) -> Result<(), ExecError> {
        self.send(&Frame::Stdin(Vec::new()))
    }

    pub fn resize(&self, rows: u16, cols: u16) -> Result<(), ExecError> {
        self.send(&Frame::Resize(Resize { rows, cols }))
    }

    /// Deliver signal `signal` (Linux number) to the process (its
    /// foreground process group when it has a terminal).
    pub fn signal(&self, signal: i32) -> Result<(), ExecError> {
        self.send(&Frame::Signal(Signal { signal }))
    }

    /// Drop the connection; the guest hangs up and then kills the process.
    pub fn abort(&self) {
        let s = self.stream.lock().unwrap_or_else(PoisonError::into_inner);
        let _ = s.shutdown(std::net::Shutdown::Both);
    }
}

impl Session {
    /// Connect (waiting up to `connect_timeout` for the agent), handshake and
    /// send the request. The first event is `Started` or `Error`.
    pub fn start(
        socket: &Path,
        req: &ExecRequest,
        connect_timeout: Duration,
    ) -> Result<Session, ExecError> {
        if req.argv.is_empty() {
            return Err(ExecError::EmptyCommand);
        }
        let mut stream = connect(socket, connect_timeout)?;
        let version = handshake(socket, &mut stream)?;
        write_frame(&mut stream, &Frame::Exec(req.clone())).map_err(proto(socket))?;
        let writer = stream.try_clone().map_err(|source| ExecError::Io {
            socket: socket.to_path_buf(),
            source,
        })?;
        Ok(Session {
            socket: socket.to_path_buf(),
            reader: stream,
            sender: Sender {
                socket: socket.to_path_buf(),
                stream: Arc::new(Mutex::new(writer)),
            },
            version,
        })
    }

    pub fn sender(&self) -> Sender {
        self.sender.clone()
    }

    /// Protocol version negotiated with the guest.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Next event; after `Exit` or `Error` there are no more.
    pub fn next_event(&mut self) -> Result<Event, ExecError> {
        let frame = read_frame(&mut self.reader).map_err(proto(&self.socket))?;
        Ok(match frame {
            Some(Frame::Started(s)) => Event::Started { pid: s.pid },
            Some(Frame::Stdout(d)) => Event::Stdout(d),
            Some(Frame::Stderr(d)) => Event::Stderr(d),
            Some(Frame::Exit(e)) => Event::Exit(e),
            Some(Frame::Error(e)) => Event::Error(e),
            Some(
                f @ (Frame::Hello(_)
                | Frame::Exec(_)
                | Frame::Stdin(_)
                | Frame::Resize(_)
                | Frame::Signal(_)),
            ) => {
                return Err(ExecError::Unexpected {
                    socket: self.socket.clone(),
                    frame: f.name(),
                })
            }
            None => {
                return Err(ExecError::Disconnected {
                    socket: self.socket.clone(),
                })
            }
        })
    }
}

fn request(opts: &ExecOptions) -> ExecRequest {
    ExecRequest {
        argv: opts.argv.clone(),
        env: opts.env.clone(),
        cwd: opts.cwd.clone(),
        user: opts.user.clone(),
        tty: opts.tty,
        rows: 0,
        cols: 0,
        term: None,
    }
}

/// Run a command with `stdin` as its input, capturing its output. Returns
/// `(status, stdout, stderr)`; status is the exit code or 128 + signal. If
/// the guest cannot run the command, its message goes to the returned
/// stderr as `airlock: MESSAGE` and the status is the guest's code (127 not
/// found, 126 not executable, 125 other). With `tty`, the terminal is 24×80
/// and all output arrives as stdout.
pub fn run_captured(
    socket: &Path,
    opts: &ExecOptions,
    stdin: &[u8],
    connect_timeout: Duration,
) -> Result<(i32, Vec<u8>, Vec<u8>), ExecError> {
    let mut req = request(opts);
    if req.tty {
        req.rows = 24;
        req.cols = 80;
        req.term = Some(term_name(opts));
    }
    let mut session = Session::start(socket, &req, connect_timeout)?;
    let sender = session.sender();
    // Input goes from its own thread so that a large stdin cannot deadlock
    // against output we have not read yet.
    // Send errors are not fatal here: the guest may already have answered
    // (Error frame) and closed; the reader below reports what happened.
    let feeder = if stdin.is_empty() {
        let _ = sender.close_stdin();
        None
    } else {
        let data = stdin.to_vec();
        let s = sender.clone();
        Some(std::thread::spawn(move || {
            // The process may exit without reading everything: errors here
            // only mean the connection is gone, which the reader sees.
            let _ = s.stdin(&data).and_then(|()| s.close_stdin());
        }))
    };
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let status = loop {
        match session.next_event()? {
            Event::Started { .. } => {}
            Event::Stdout(d) => out.extend_from_slice(&d),
            Event::Stderr(d) => err.extend_from_slice(&d),
            Event::Exit(e) => break e.status(),
            Event::Error(e) => {
                err.extend_from_slice(format!("airlock: {}\n", e.message).as_bytes());
                break e.code.unwrap_or(DEFAULT_ERROR_CODE);
            }
        }
    };
    if let Some(f) = feeder {
        sender.abort(); // unblocks the feeder if the process ignored stdin
        let _ = f.join();
    }
    Ok((status, out, err))
}

/// Run a command attached to this process's stdin/stdout/stderr and
/// terminal; returns its status (exit code, or 128 + signal). See the crate
/// docs of [`attach`](crate) for terminal and signal handling.
pub fn run_attached(
    socket: &Path,
    opts: &ExecOptions,
    connect_timeout: Duration,
) -> Result<i32, ExecError> {
    attach::run(socket, opts, connect_timeout)
}

/// `TERM` for a remote terminal: the request's, else ours, else `xterm`.
fn term_name(opts: &ExecOptions) -> String {
    opts.env
        .iter()
        .rev()
        .find(|(k, _)| k == "TERM")
        .map(|(_, v)| v.clone())
        .or_else(|| std::env::var("TERM").ok().filter(|t| !t.is_empty()))
        .unwrap_or_else(|| "xterm".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn connect_times_out_with_the_path_in_the_error() {
        let dir = std::env::temp_dir().join(format!("airlock-exec-test-{}", std::process::id()));
        let sock = dir.join("missing.sock");
        let t0 = Instant::now();
        let e = ping(&sock, Duration::from_millis(60)).unwrap_err();
        assert!(t0.elapsed() >= Duration::from_millis(60));
        assert!(matches!(e, ExecError::ConnectTimeout { .. }), "{e:?}");
        assert!(e.to_string().contains("missing.sock"), "{e}");
    }

    #[test]
    fn waits_for_a_socket_that_appears_later() {
        let dir = std::env::temp_dir().join(format!("airlock-exec-late-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let sock = dir.join("late.sock");
        let _ = std::fs::remove_file(&sock);
        let s2 = sock.clone();
        let server = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            let l = UnixListener::bind(&s2).unwrap();
            let (mut c, _) = l.accept().unwrap();
            write_frame(&mut c, &Frame::Hello(Hello::ours("fake"))).unwrap();
            assert!(matches!(read_frame(&mut c).unwrap(), Some(Frame::Hello(_))));
        });
        ping(&sock, Duration::from_secs(5)).unwrap();
        server.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn empty_command_is_refused_locally() {
        let e = run_captured(
            Path::new("/nonexistent"),
            &ExecOptions::default(),
            b"",
            Duration::ZERO,
        );
        assert!(matches!(e, Err(ExecError::EmptyCommand)));
    }

    #[test]
    fn term_name_prefers_request_env() {
        let opts = ExecOptions {
            env: vec![("TERM".into(), "vt100".into())],
            ..Default::default()
        };
        assert_eq!(term_name(&opts), "vt100");
    }
}
