//! [`run_attached`](crate::run_attached): a remote command attached to this
//! process's stdio.
//!
//! - With `tty`, `interactive` and stdin a terminal, the local terminal is put
//!   in raw mode (restored on every return path: errors, forwarded signals,
//!   panics) so that ^C, ^Z and friends are bytes for the remote terminal.
//! - SIGWINCH becomes a Resize frame (with `tty`).
//! - SIGINT, SIGTERM, SIGHUP and SIGQUIT are forwarded as Signal frames (in
//!   raw mode ^C does not raise SIGINT locally, so it is only a byte). A
//!   third SIGINT gives up: the connection is dropped, the guest hangs up
//!   and kills the process, and the status is 130.
//! - Without `interactive`, stdin is not read; the process sees EOF at once.
//!
//! Signal handlers are process-wide: one attached run at a time per process
//! (serialised by a lock); previous handlers are restored afterwards.

use crate::term::{self, RawMode};
use crate::{
    request, term_name, Event, ExecError, ExecOptions, Sender, Session, DEFAULT_ERROR_CODE,
};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

const FORWARDED: &[libc::c_int] = &[libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT];

/// Write end of the self-pipe the signal handler writes to (-1: none).
static SIG_PIPE: AtomicI32 = AtomicI32::new(-1);
static ATTACHED: Mutex<()> = Mutex::new(());

extern "C" fn on_signal(sig: libc::c_int) {
    let fd = SIG_PIPE.load(Ordering::Relaxed);
    if fd >= 0 {
        // SAFETY: only async-signal-safe calls; errno is saved and restored
        // so the interrupted code does not see it change.
        unsafe {
            let errno = *libc::__errno_location();
            let b = sig as u8;
            libc::write(fd, (&b as *const u8).cast(), 1);
            *libc::__errno_location() = errno;
        }
    }
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: valid 2-element array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 returned two fresh fds that we now own.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Installed signal handlers; the previous ones come back on drop.
struct Handlers {
    saved: Vec<(libc::c_int, libc::sigaction)>,
    _pipe_w: OwnedFd,
}

impl Handlers {
    fn install(sigs: &[libc::c_int], pipe_w: OwnedFd) -> io::Result<Handlers> {
        SIG_PIPE.store(pipe_w.as_raw_fd(), Ordering::SeqCst);
        let mut h = Handlers {
            saved: Vec::new(),
            _pipe_w: pipe_w,
        };
        for &sig in sigs {
            // SAFETY: sigaction is plain data; we fill the fields we use.
            let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
            sa.sa_sigaction = on_signal as *const () as libc::sighandler_t;
            sa.sa_flags = libc::SA_RESTART;
            // SAFETY: valid pointer to a sigset.
            unsafe { libc::sigemptyset(&mut sa.sa_mask) };
            // SAFETY: see above.
            let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
            // SAFETY: valid pointers to two sigaction structs.
            if unsafe { libc::sigaction(sig, &sa, &mut old) } < 0 {
                return Err(io::Error::last_os_error());
            }
            h.saved.push((sig, old));
        }
        Ok(h)
    }
}

impl Drop for Handlers {
    fn drop(&mut self) {
        for (sig, old) in self.saved.drain(..).rev() {
            // SAFETY: restoring a sigaction read earlier.
            unsafe { libc::sigaction(sig, &old, std::ptr::null_mut()) };
        }
        SIG_PIPE.store(-1, Ordering::SeqCst);
    }
}

/// Helper threads, stopped and joined on drop.
struct Helpers {
    stop_w: Option<OwnedFd>,
    threads: Vec<JoinHandle<()>>,
}

impl Drop for Helpers {
    fn drop(&mut self) {
        self.stop_w = None; // EOF on the stop pipe wakes every helper
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Wait until `fd` is readable or `stop` is closed. False: stop.
fn wait_readable(fd: RawFd, stop: RawFd) -> bool {
    let mut fds = [
        libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: stop,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: valid array of two pollfd.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return false;
        }
        return fds[1].revents == 0;
    }
}

fn signal_thread(
    sig_r: OwnedFd,
    stop: OwnedFd,
    sender: Sender,
    tty: bool,
    gave_up: Arc<AtomicBool>,
) {
    let mut sigints = 0;
    while wait_readable(sig_r.as_raw_fd(), stop.as_raw_fd()) {
        let mut buf = [0u8; 64];
        // SAFETY: reading into a live buffer (non-blocking pipe).
        let n = unsafe { libc::read(sig_r.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            continue;
        }
        for &s in &buf[..n as usize] {
            let sig = s as libc::c_int;
            let sent = if sig == libc::SIGWINCH {
                if !tty {
                    continue;
                }
                let (rows, cols) = term::our_size();
                sender.resize(rows, cols)
            } else {
                if sig == libc::SIGINT {
                    sigints += 1;
                    if sigints >= 3 {
                        gave_up.store(true, Ordering::SeqCst);
                        sender.abort();
                        return;
                    }
                }
                sender.signal(sig)
            };
            if sent.is_err() {
                return;
            }
        }
    }
}

fn stdin_thread(stop: OwnedFd, sender: Sender) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if !wait_readable(0, stop.as_raw_fd()) {
            return;
        }
        // SAFETY: reading into a live buffer.
        let n = unsafe { libc::read(0, buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if matches!(
                e.kind(),
                io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
            ) {
                continue;
            }
        }
        if n <= 0 {
            let _ = sender.close_stdin();
            return;
        }
        if sender.stdin(&buf[..n as usize]).is_err() {
            return;
        }
    }
}

pub fn run(socket: &Path, opts: &ExecOptions, connect_timeout: Duration) -> Result<i32, ExecError> {
    let _one_at_a_time = ATTACHED.lock().unwrap_or_else(PoisonError::into_inner);
    let term_err = |source| ExecError::Terminal {
        socket: socket.to_path_buf(),
        source,
    };
    let mut req = request(opts);
    if opts.tty {
        let (rows, cols) = term::our_size();
        req.rows = rows;
        req.cols = cols;
        req.term = Some(term_name(opts));
    }

    // While we wait for the sandbox, ^C still interrupts us as usual.
    let mut session = Session::start(socket, &req, connect_timeout)?;
    let sender = session.sender();

    let (sig_r, sig_w) = pipe().map_err(term_err)?;
    let mut sigs = FORWARDED.to_vec();
    if opts.tty {
        sigs.push(libc::SIGWINCH);
    }
    let _handlers = Handlers::install(&sigs, sig_w).map_err(term_err)?;

    // Raw mode only when we forward a real terminal's keystrokes.
    let _raw = if opts.tty && opts.interactive && term::isatty(0) {
        Some(RawMode::enable(0).map_err(term_err)?)
    } else {
        None
    };

    let (stop_r, stop_w) = pipe().map_err(term_err)?;
    let dup = |fd: &OwnedFd| fd.try_clone().map_err(term_err);
    let gave_up = Arc::new(AtomicBool::new(false));
    let mut helpers = Helpers {
        stop_w: Some(stop_w),
        threads: Vec::new(),
    };
    {
        let (stop, s, g) = (dup(&stop_r)?, sender.clone(), gave_up.clone());
        let tty = opts.tty;
        helpers.threads.push(std::thread::spawn(move || {
            signal_thread(sig_r, stop, s, tty, g)
        }));
    }
    if opts.interactive {
        let (stop, s) = (dup(&stop_r)?, sender.clone());
        helpers
            .threads
            .push(std::thread::spawn(move || stdin_thread(stop, s)));
    } else {
        // May fail if the guest already answered and closed; the reader
        // below reports that.
        let _ = sender.close_stdin();
    }

    let io_err = |source| ExecError::Io {
        socket: socket.to_path_buf(),
        source,
    };
    let status = loop {
        let ev = match session.next_event() {
            Ok(ev) => ev,
            Err(_) if gave_up.load(Ordering::SeqCst) => break 128 + libc::SIGINT,
            Err(e) => return Err(e),
        };
        let (data, out): (Vec<u8>, &mut dyn Write) = match ev {
            Event::Started { .. } => continue,
            Event::Stdout(d) => (d, &mut io::stdout().lock()),
            Event::Stderr(d) => (d, &mut io::stderr().lock()),
            Event::Exit(e) => break e.status(),
            Event::Error(e) => {
                drop(_raw);
                eprintln!("airlock: {}", e.message);
                break e.code.unwrap_or(DEFAULT_ERROR_CODE);
            }
        };
        if let Err(e) = out.write_all(&data).and_then(|()| out.flush()) {
            if e.kind() == io::ErrorKind::BrokenPipe {
                // Our reader went away (`| head`): stop the remote process
                // as a local one would be stopped by SIGPIPE.
                sender.abort();
                break 128 + libc::SIGPIPE;
            }
            return Err(io_err(e));
        }
    };
    drop(helpers);
    Ok(status)
}
