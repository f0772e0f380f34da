//! Frame transports: how Ethernet frames get between the guest's network device and the
//! stack. One frame per `poll_recv`/`poll_send`.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::task::{ready, Context, Poll};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;

/// Largest frame we accept or send: the link MTU plus the Ethernet header, rounded up.
pub const MAX_FRAME: usize = 65536 + 64;

/// A bidirectional Ethernet frame transport (the guest's side of the link).
pub trait Link: Send + 'static {
    /// Receive one frame into `buf` (replacing its content). `Ready(Ok(false))` means the
    /// link is closed (the guest is gone).
    fn poll_recv(&mut self, cx: &mut Context<'_>, buf: &mut Vec<u8>) -> Poll<io::Result<bool>>;
    /// Send (or queue) one frame. `Pending` = the link cannot take it now; `cx` is woken
    /// when it can.
    fn poll_send(&mut self, cx: &mut Context<'_>, frame: &[u8]) -> Poll<io::Result<()>>;
    /// Push out anything queued by `poll_send`.
    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

/// A TAP device fd (`IFF_TAP | IFF_NO_PI`): one frame per read/write.
pub struct TapLink {
    fd: AsyncFd<OwnedFd>,
    scratch: Box<[u8]>,
}

impl TapLink {
    /// Wrap a TAP fd (made non-blocking here). Must be called inside a tokio runtime.
    pub fn new(fd: OwnedFd) -> io::Result<TapLink> {
        set_nonblocking(&fd)?;
        // SAFETY: `OwnedFd` owns a valid descriptor that is neither replaced nor closed
        // while the `AsyncFd` holds it.
        let fd = unsafe { AsyncFd::register(fd)? };
        Ok(TapLink {
            fd,
            scratch: vec![0u8; MAX_FRAME].into_boxed_slice(),
        })
    }
}

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on a valid open descriptor.
    unsafe {
        let fl = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        if fl < 0 || libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// TAP errors that mean "the device is gone" (its network namespace was destroyed).
fn is_gone(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EBADFD) | Some(libc::EIO) | Some(libc::ENXIO) | Some(libc::ENODEV)
    )
}

impl Link for TapLink {
    fn poll_recv(&mut self, cx: &mut Context<'_>, buf: &mut Vec<u8>) -> Poll<io::Result<bool>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            let scratch = &mut self.scratch;
            let r = guard.try_io(|fd| {
                // SAFETY: reading into a valid, writable buffer of scratch.len() bytes.
                let n = unsafe {
                    libc::read(
                        fd.as_raw_fd(),
                        scratch.as_mut_ptr() as *mut libc::c_void,
                        scratch.len(),
                    )
                };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match r {
                Ok(Ok(0)) => return Poll::Ready(Ok(false)),
                Ok(Ok(n)) => {
                    buf.clear();
                    buf.extend_from_slice(&self.scratch[..n]);
                    return Poll::Ready(Ok(true));
                }
                Ok(Err(e)) if is_gone(&e) => return Poll::Ready(Ok(false)),
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_send(&mut self, cx: &mut Context<'_>, frame: &[u8]) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_write_ready(cx))?;
            let r = guard.try_io(|fd| {
                // SAFETY: writing from a valid buffer of frame.len() bytes.
                let n = unsafe {
                    libc::write(
                        fd.as_raw_fd(),
                        frame.as_ptr() as *const libc::c_void,
                        frame.len(),
                    )
                };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(())
                }
            });
            match r {
                Ok(Ok(())) => return Poll::Ready(Ok(())),
                // The device is gone or the frame was refused: frames are datagrams, so
                // drop it; the next recv reports the closed link.
                Ok(Err(e)) if is_gone(&e) || e.raw_os_error() == Some(libc::EINVAL) => {
                    return Poll::Ready(Ok(()))
                }
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// A QEMU `-netdev stream` connection (Unix or TCP socket): each frame is prefixed by
/// its length as a 4-byte big-endian integer.
pub struct StreamLink<S = UnixStream> {
    io: S,
    rx: Vec<u8>,
    rx_start: usize,
    tx: Vec<u8>,
    tx_start: usize,
    eof: bool,
}

/// Queue at most this many bytes towards the guest before `poll_send` says Pending.
const STREAM_TX_LIMIT: usize = 1 << 20;

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> StreamLink<S> {
    pub fn new(io: S) -> StreamLink<S> {
        StreamLink {
            io,
            rx: Vec::with_capacity(256 * 1024),
            rx_start: 0,
            tx: Vec::with_capacity(256 * 1024),
            tx_start: 0,
            eof: false,
        }
    }

    /// A complete frame at the start of the receive buffer, as (start, len).
    fn parsed(&self) -> io::Result<Option<(usize, usize)>> {
        let avail = &self.rx[self.rx_start..];
        if avail.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([avail[0], avail[1], avail[2], avail[3]]) as usize;
        if len > MAX_FRAME {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("stream link: frame of {len} bytes is larger than {MAX_FRAME}"),
            ));
        }
        if avail.len() < 4 + len {
            return Ok(None);
        }
        Ok(Some((self.rx_start + 4, len)))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> Link for StreamLink<S> {
    fn poll_recv(&mut self, cx: &mut Context<'_>, buf: &mut Vec<u8>) -> Poll<io::Result<bool>> {
        loop {
            if let Some((start, len)) = self.parsed()? {
                buf.clear();
                buf.extend_from_slice(&self.rx[start..start + len]);
                self.rx_start = start + len;
                return Poll::Ready(Ok(true));
            }
            if self.eof {
                return Poll::Ready(Ok(false));
            }
            // Compact, then read more.
            if self.rx_start > 0 {
                self.rx.drain(..self.rx_start);
                self.rx_start = 0;
            }
            let old = self.rx.len();
            self.rx.resize(old + 128 * 1024, 0);
            let mut rb = ReadBuf::new(&mut self.rx[old..]);
            let r = std::pin::Pin::new(&mut self.io).poll_read(cx, &mut rb);
            let n = rb.filled().len();
            self.rx.truncate(old + n);
            match r {
                Poll::Ready(Ok(())) if n == 0 => self.eof = true,
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::ConnectionReset => {
                    self.eof = true
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn poll_send(&mut self, cx: &mut Context<'_>, frame: &[u8]) -> Poll<io::Result<()>> {
        if self.tx.len() - self.tx_start >= STREAM_TX_LIMIT {
            ready!(self.poll_flush(cx))?;
        }
        if self.tx_start > 0 && self.tx_start == self.tx.len() {
            self.tx.clear();
            self.tx_start = 0;
        }
        self.tx
            .extend_from_slice(&(frame.len() as u32).to_be_bytes());
        self.tx.extend_from_slice(frame);
        Poll::Ready(Ok(()))
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.tx_start < self.tx.len() {
            let n =
                ready!(std::pin::Pin::new(&mut self.io).poll_write(cx, &self.tx[self.tx_start..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.tx_start += n;
        }
        self.tx.clear();
        self.tx_start = 0;
        Poll::Ready(Ok(()))
    }
}
