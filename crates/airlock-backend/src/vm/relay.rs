//! The control channel of a VM sandbox: every connection accepted on the
//! supervisor's control socket is relayed to the guest agent over vsock,
//! through vhost-device-vsock's Unix socket (`CONNECT <port>\n` → `OK ..\n`,
//! then a plain byte stream). The CLI and airlock-exec stay unchanged.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// How long a connection waits for the guest to start listening (boot).
const CONNECT_PATIENCE: Duration = Duration::from_secs(60);

/// Set once the guest agent has told us (over vsock, host port
/// `READY_PORT`) that it listens. Until then nobody connects to the guest:
/// early host-initiated connections to a booting guest are how vsock
/// devices get wedged.
#[derive(Default)]
pub struct Ready {
    flag: Mutex<bool>,
    cv: Condvar,
}

impl Ready {
    pub fn set(&self) {
        *self.flag.lock().unwrap_or_else(PoisonError::into_inner) = true;
        self.cv.notify_all();
    }

    pub fn is_set(&self) -> bool {
        *self.flag.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Wait until set, `stop` is set, or `timeout`; true if set.
    pub fn wait(&self, stop: &AtomicBool, timeout: Duration) -> bool {
        let t0 = Instant::now();
        let mut g = self.flag.lock().unwrap_or_else(PoisonError::into_inner);
        while !*g && !stop.load(Ordering::SeqCst) && t0.elapsed() < timeout {
            g = self
                .cv
                .wait_timeout(g, Duration::from_millis(50))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        *g
    }
}

/// Accept the guest's ready notification on `listener` (the Unix socket
/// vhost-device-vsock connects to for guest connections to host port
/// `READY_PORT`), then return.
pub fn await_ready(listener: UnixListener, ready: Arc<Ready>, stop: Arc<AtomicBool>) {
    loop {
        match listener.accept() {
            Ok((mut c, _)) => {
                let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
                let mut buf = [0u8; 16];
                if matches!(c.read(&mut buf), Ok(n) if n > 0) {
                    ready.set();
                    return;
                }
            }
            Err(_) if stop.load(Ordering::SeqCst) => return,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return,
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Open a stream to the guest's vsock `port` through the vhost-device-vsock
/// socket at `uds`. Fails at once if the guest is not listening.
pub fn connect(uds: &Path, port: u32) -> io::Result<UnixStream> {
    let mut s = UnixStream::connect(uds)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())?;
    // Read the reply byte by byte so nothing after the line is consumed.
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match s.read(&mut b)? {
            0 => {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    format!("guest vsock port {port}: connection closed"),
                ))
            }
            _ if b[0] == b'\n' => break,
            _ if line.len() > 64 => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "bad vsock reply",
                ))
            }
            _ => line.push(b[0]),
        }
    }
    if !line.starts_with(b"OK ") {
        return Err(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            format!(
                "guest vsock port {port}: {}",
                String::from_utf8_lossy(&line)
            ),
        ));
    }
    s.set_read_timeout(None)?;
    Ok(s)
}

/// Connect, retrying while the guest boots or until `stop` is set.
pub fn connect_patiently(uds: &Path, port: u32, stop: &AtomicBool) -> io::Result<UnixStream> {
    let t0 = Instant::now();
    loop {
        match connect(uds, port) {
            Ok(s) => return Ok(s),
            Err(e) if t0.elapsed() > CONNECT_PATIENCE || stop.load(Ordering::SeqCst) => {
                return Err(e)
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Accept on `listener` until `stop` is set (the caller then shuts the
/// listener down to wake the accept), relaying each connection.
pub fn serve(
    listener: UnixListener,
    uds: PathBuf,
    port: u32,
    ready: Arc<Ready>,
    stop: Arc<AtomicBool>,
) {
    loop {
        let client = match listener.accept() {
            Ok((c, _)) => c,
            Err(_) if stop.load(Ordering::SeqCst) => return,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return, // shut down
            Err(_) => {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
        };
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let uds = uds.clone();
        let stop = stop.clone();
        let ready = ready.clone();
        let _ = std::thread::Builder::new()
            .name("vm-relay".into())
            .stack_size(128 * 1024)
            .spawn(move || {
                // Without a notification (an older agent), connect anyway.
                ready.wait(&stop, CONNECT_PATIENCE);
                if let Ok(guest) = connect_patiently(&uds, port, &stop) {
                    splice(client, guest);
                }
            });
    }
}

/// Copy both ways until each side has closed its direction.
fn splice(a: UnixStream, b: UnixStream) {
    let (a2, b2) = match (a.try_clone(), b.try_clone()) {
        (Ok(a2), Ok(b2)) => (a2, b2),
        _ => return,
    };
    let t = std::thread::Builder::new()
        .stack_size(128 * 1024)
        .spawn(move || pump(a2, b2));
    pump(b, a);
    if let Ok(t) = t {
        let _ = t.join();
    }
}

fn pump(from: UnixStream, mut to: UnixStream) {
    let mut r = BufReader::with_capacity(64 * 1024, &from);
    loop {
        let n = match r.fill_buf() {
            Ok([]) | Err(_) => break,
            Ok(buf) => match to.write_all(buf) {
                Ok(()) => buf.len(),
                Err(_) => break,
            },
        };
        r.consume(n);
    }
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}
