//! The in-sandbox end of the egress path: a TCP listener on loopback
//! (`127.0.0.1:3128`) whose connections are relayed byte for byte to the host
//! egress engine's Unix socket. No parsing here: policy lives on the host.

use crate::log::{debug, warning};
use crate::sys;
use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

/// Bytes moved per splice and capacity of the relay pipes.
const CHUNK: usize = 1 << 20;
const RELAY_STACK: usize = 64 * 1024;

/// Bind `listen` now (so a bad address is reported at start) and relay its
/// connections to `socket` from a background thread.
pub fn start(listen: &str, socket: &str) -> io::Result<()> {
    // Parse, never resolve: the agent must not touch DNS.
    let addr: SocketAddr = listen.parse().map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("proxy_listen '{listen}' is not an IP:PORT address"),
        )
    })?;
    let listener = TcpListener::bind(addr)?;
    let socket = PathBuf::from(socket);
    std::thread::Builder::new()
        .name("proxy-accept".into())
        .stack_size(RELAY_STACK)
        .spawn(move || {
            for conn in listener.incoming() {
                match conn {
                    Ok(tcp) => {
                        let socket = socket.clone();
                        let r = std::thread::Builder::new()
                            .name("proxy".into())
                            .stack_size(RELAY_STACK)
                            .spawn(move || relay_pair(tcp, &socket));
                        if let Err(e) = r {
                            warning!("proxy: cannot start relay thread: {e}");
                        }
                    }
                    Err(e) => {
                        warning!("proxy: accept failed: {e}");
                        std::thread::sleep(std::time::Duration::from_millis(10));
                    }
                }
            }
        })?;
    Ok(())
}

fn relay_pair(tcp: TcpStream, socket: &std::path::Path) {
    let _ = tcp.set_nodelay(true);
    let unix = match UnixStream::connect(socket) {
        Ok(u) => u,
        Err(e) => {
            warning!(
                "proxy: cannot reach the egress engine at {}: {e}",
                socket.display()
            );
            return;
        }
    };
    let (tcp2, unix2) = match (tcp.try_clone(), unix.try_clone()) {
        (Ok(t), Ok(u)) => (t, u),
        (Err(e), _) | (_, Err(e)) => {
            warning!("proxy: {e}");
            return;
        }
    };
    let up = std::thread::Builder::new()
        .name("proxy-up".into())
        .stack_size(RELAY_STACK)
        .spawn(move || {
            relay_dir(
                tcp2.as_raw_fd(),
                unix2.as_raw_fd(),
                &|| unix2.shutdown(Shutdown::Write),
                &|| {
                    let _ = tcp2.shutdown(Shutdown::Both);
                    let _ = unix2.shutdown(Shutdown::Both);
                },
            )
        });
    let abort = || {
        let _ = tcp.shutdown(Shutdown::Both);
        let _ = unix.shutdown(Shutdown::Both);
    };
    relay_dir(
        unix.as_raw_fd(),
        tcp.as_raw_fd(),
        &|| tcp.shutdown(Shutdown::Write),
        &abort,
    );
    match up {
        Ok(h) => {
            let _ = h.join();
        }
        Err(e) => {
            warning!("proxy: cannot start relay thread: {e}");
            abort();
        }
    }
}

/// Move bytes `src` → `dst` until EOF (then half-close `dst`) or an error
/// (then tear down both sockets so the other direction ends too).
fn relay_dir(src: RawFd, dst: RawFd, half_close: &dyn Fn() -> io::Result<()>, abort: &dyn Fn()) {
    match splice_loop(src, dst) {
        Ok(()) => {
            let _ = half_close();
        }
        Err(e) => {
            debug!("proxy: relay ended: {e}");
            abort();
        }
    }
}

fn splice_loop(src: RawFd, dst: RawFd) -> io::Result<()> {
    let (pr, pw) = sys::pipe()?;
    sys::set_pipe_size(pw.as_raw_fd(), CHUNK as i32);
    let flags = libc::SPLICE_F_MOVE | libc::SPLICE_F_MORE;
    loop {
        // SAFETY: splice between fds we hold; null offsets for sockets/pipes.
        let n = unsafe {
            libc::splice(
                src,
                std::ptr::null_mut(),
                pw.as_raw_fd(),
                std::ptr::null_mut(),
                CHUNK,
                flags,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EINVAL) => return copy_loop(src, dst),
                _ => return Err(e),
            }
        }
        if n == 0 {
            return Ok(());
        }
        let mut left = n as usize;
        while left > 0 {
            // SAFETY: as above.
            let m = unsafe {
                libc::splice(
                    pr.as_raw_fd(),
                    std::ptr::null_mut(),
                    dst,
                    std::ptr::null_mut(),
                    left,
                    flags,
                )
            };
            if m < 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                return Err(e);
            }
            left -= m as usize;
        }
    }
}

/// Fallback when splice is refused: plain read/write with a large buffer.
fn copy_loop(src: RawFd, dst: RawFd) -> io::Result<()> {
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        // SAFETY: reading into a live buffer of the given length.
        let n = unsafe { libc::read(src, buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Ok(());
        }
        let mut off = 0;
        while off < n as usize {
            // SAFETY: writing from a live buffer within its bounds.
            let m = unsafe { libc::write(dst, buf[off..].as_ptr().cast(), n as usize - off) };
            if m < 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                return Err(e);
            }
            off += m as usize;
        }
    }
}
