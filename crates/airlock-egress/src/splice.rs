//! Zero-copy tunnel data path: splice(2) socket → pipe → socket, both directions, driven
//! by tokio readiness. Used for CONNECT tunnels when both legs are plain sockets; the
//! caller falls back to `copy_bidirectional` otherwise. No policy or logging here.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::Interest;
use tokio::net::{TcpStream, UnixStream};

/// A tokio socket we can splice from/to with readiness.
pub(crate) trait SpliceIo: AsRawFd {
    fn try_io_(
        &self,
        interest: Interest,
        f: impl FnOnce() -> io::Result<usize>,
    ) -> io::Result<usize>;
    async fn ready_(&self, interest: Interest) -> io::Result<()>;
}

macro_rules! splice_io {
    ($t:ty) => {
        impl SpliceIo for $t {
            fn try_io_(
                &self,
                interest: Interest,
                f: impl FnOnce() -> io::Result<usize>,
            ) -> io::Result<usize> {
                self.try_io(interest, f)
            }
            async fn ready_(&self, interest: Interest) -> io::Result<()> {
                self.ready(interest).await.map(|_| ())
            }
        }
    };
}
splice_io!(TcpStream);
splice_io!(UnixStream);

struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
}

const PIPE_SIZE: i32 = 1 << 20;
const CHUNK: usize = 1 << 20;

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: fds is a valid, writable array of two ints, as pipe2 requires.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both fds are open and owned by nobody else.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // A larger pipe means fewer syscalls; failure (limits) only costs speed.
        // SAFETY: F_SETPIPE_SZ on an open pipe fd with an int argument.
        unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE) };
        Ok(Pipe { r, w })
    }
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: plain syscall on fds we hold open for the duration of the call; null
    // offsets mean "current position" (required for sockets and pipes).
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Copy `src` → `dst` until EOF on `src`, then shut down `dst`'s write side.
async fn one_way<A: SpliceIo, B: SpliceIo>(src: &A, dst: &B, count: &AtomicU64) -> io::Result<()> {
    let pipe = Pipe::new()?;
    let mut in_pipe = 0usize;
    loop {
        // Fill the pipe from the source.
        match src.try_io_(Interest::READABLE, || {
            splice(src.as_raw_fd(), pipe.w.as_raw_fd(), CHUNK)
        }) {
            Ok(0) => break,
            Ok(n) => in_pipe += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if in_pipe == 0 {
                    src.ready_(Interest::READABLE).await?;
                    continue;
                }
            }
            Err(e) => return Err(e),
        }
        // Drain it into the destination.
        while in_pipe > 0 {
            match dst.try_io_(Interest::WRITABLE, || {
                splice(pipe.r.as_raw_fd(), dst.as_raw_fd(), in_pipe)
            }) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(m) => {
                    in_pipe -= m;
                    count.fetch_add(m as u64, Ordering::Relaxed);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    dst.ready_(Interest::WRITABLE).await?
                }
                Err(e) => return Err(e),
            }
        }
    }
    // SAFETY: shutdown(2) on a socket fd we hold open.
    unsafe { libc::shutdown(dst.as_raw_fd(), libc::SHUT_WR) };
    Ok(())
}

/// Tunnel `client` ↔ `upstream` until both directions end or one fails.
pub(crate) async fn tunnel<A: SpliceIo, B: SpliceIo>(
    client: &A,
    upstream: &B,
    up: &AtomicU64,
    down: &AtomicU64,
) -> io::Result<()> {
    tokio::try_join!(
        one_way(client, upstream, up),
        one_way(upstream, client, down)
    )
    .map(|_| ())
}
