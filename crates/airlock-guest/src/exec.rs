//! One control connection: handshake, one exec request, then the process's
//! I/O until it exits.

use crate::child::{self, Plan, Stage, Stdio};
use crate::log::{debug, error, warning};
use crate::spec::{self, LookupError};
use crate::{reaper, sys, users};
use airlock_protocol::{
    read_frame, write_frame, ErrorMsg, ExecRequest, Exit, Frame, Hello, ProtocolError, Started,
    MAX_FRAME,
};
use std::ffi::CString;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// What every exec shares, fixed at agent start.
pub struct Context {
    pub base_env: Vec<(String, String)>,
    /// Root of the sandbox's filesystem for /etc/passwd lookups ("/").
    pub root: PathBuf,
    pub cap_last: u32,
    pub max_fd: i32,
}

const AGENT: &str = concat!("airlock-guest ", env!("CARGO_PKG_VERSION"));
/// How long a client may take to send Hello and its request.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);
/// Bytes read from the process per frame.
const READ_CHUNK: usize = 64 * 1024;
/// Buffered bytes (each direction) before we stop reading more.
const BUF_LIMIT: usize = 1 << 20;
/// After the process exits, output still open (a background process holds
/// the pipe or terminal) is forwarded until it has been idle this long...
const DRAIN_IDLE: Duration = Duration::from_millis(100);
/// ...but no longer than this.
const DRAIN_MAX: Duration = Duration::from_secs(2);
/// After the client disconnects: SIGHUP, then SIGKILL this much later.
const HANGUP_GRACE: Duration = Duration::from_secs(2);

fn err_msg(message: impl Into<String>, code: i32) -> ErrorMsg {
    ErrorMsg {
        message: message.into(),
        code: Some(code),
    }
}

/// Serve one control connection to completion.
pub fn serve(ctx: &Context, mut sock: UnixStream) {
    let _ = sock.set_read_timeout(Some(HANDSHAKE_TIMEOUT));
    let _ = sock.set_write_timeout(Some(HANDSHAKE_TIMEOUT));
    let req = match handshake(&mut sock) {
        Ok(Some(req)) => req,
        Ok(None) => return, // a readiness probe: Hello only
        Err(e) => {
            let _ = write_frame(&mut sock, &Frame::Error(err_msg(e.to_string(), 125)));
            debug!("control connection dropped: {e}");
            return;
        }
    };
    let t0 = Instant::now();
    let argv0 = req.argv.first().cloned().unwrap_or_default();
    let running = match prepare(ctx, &req).and_then(|(plan, desc)| spawn(plan, &req, desc)) {
        Ok(r) => r,
        Err(e) => {
            debug!("exec {argv0:?} failed: {} (code {:?})", e.message, e.code);
            let _ = write_frame(&mut sock, &Frame::Error(e));
            return;
        }
    };
    let pid = running.pid;
    if let Err(e) = write_frame(&mut sock, &Frame::Started(Started { pid })) {
        debug!("client went away before start: {e}");
    }
    match pump(sock, running) {
        Ok(Some(exit)) => debug!(
            "exec pid={pid} {argv0:?} tty={} -> {:?} in {:.1?}",
            req.tty,
            exit,
            t0.elapsed()
        ),
        Ok(None) => debug!("exec pid={pid} {argv0:?}: client disconnected, process ended"),
        Err(e) => error!("exec pid={pid} {argv0:?}: {e}"),
    }
}

/// Exchange Hello and read the request. `None`: the client hung up after
/// the Hello (a ping).
fn handshake(sock: &mut UnixStream) -> Result<Option<ExecRequest>, ProtocolError> {
    let ours = Hello::ours(AGENT);
    write_frame(sock, &Frame::Hello(ours.clone()))?;
    match read_frame(sock)? {
        None => return Ok(None),
        Some(Frame::Hello(theirs)) => {
            ours.negotiate(&theirs)?;
        }
        Some(_) => return Err(ProtocolError::Unexpected("expected hello")),
    }
    match read_frame(sock)? {
        None => Ok(None),
        Some(Frame::Exec(req)) => Ok(Some(req)),
        Some(_) => Err(ProtocolError::Unexpected("expected an exec request")),
    }
}

/// Facts about the request needed to describe a failure of the child.
struct Desc {
    argv0: String,
    user: String,
    uid: u32,
    gid: u32,
    cwd: String,
}

fn cstring(what: &str, s: &str) -> Result<CString, ErrorMsg> {
    CString::new(s).map_err(|_| err_msg(format!("{what} contains a NUL byte"), 125))
}

/// Resolve user, environment, working directory and program.
fn prepare(ctx: &Context, req: &ExecRequest) -> Result<(Plan, Desc), ErrorMsg> {
    let argv0 = req
        .argv
        .first()
        .ok_or_else(|| err_msg("empty command", 125))?
        .clone();
    let id = users::lookup(req.user.as_deref(), &ctx.root).map_err(|e| err_msg(e, 125))?;
    let user_label = req.user.clone().unwrap_or_else(|| id.name.clone());
    users::check_mapped(&id, &user_label).map_err(|e| err_msg(e, 125))?;

    let user_env = vec![
        ("HOME".to_string(), id.home.clone()),
        ("USER".to_string(), id.name.clone()),
        ("LOGNAME".to_string(), id.name.clone()),
    ];
    let mut term_env = Vec::new();
    if req.tty {
        match &req.term {
            Some(t) => term_env.push(("TERM".to_string(), t.clone())),
            None if spec::env_get(&ctx.base_env, "TERM").is_none() => {
                term_env.push(("TERM".to_string(), "xterm".to_string()))
            }
            None => {}
        }
    }
    let mut env = spec::merge_env(&[&ctx.base_env, &user_env, &term_env, &req.env]);
    if let Some((k, _)) = env.iter().find(|(k, _)| !spec::valid_env_name(k)) {
        return Err(err_msg(
            format!("invalid environment variable name {k:?}"),
            125,
        ));
    }
    if spec::env_get(&env, "PATH").is_none() {
        env.push(("PATH".into(), spec::DEFAULT_PATH.into()));
    }

    let cwd = match &req.cwd {
        Some(d) => {
            let p = Path::new("/").join(d);
            if !p.is_dir() {
                return Err(err_msg(
                    format!("working directory '{d}' does not exist in the sandbox"),
                    125,
                ));
            }
            p
        }
        // A home that does not exist (nobody's /nonexistent) falls back to /.
        None if Path::new(&id.home).is_dir() => PathBuf::from(&id.home),
        None => PathBuf::from("/"),
    };
    let path_var = spec::env_get(&env, "PATH").unwrap_or(spec::DEFAULT_PATH);
    let program = spec::find_program(&argv0, path_var, &cwd)
        .map_err(|e: LookupError| err_msg(e.message(), e.code()))?;

    let argv = req
        .argv
        .iter()
        .map(|a| cstring("an argument", a))
        .collect::<Result<Vec<_>, _>>()?;
    let envp = env
        .iter()
        .map(|(k, v)| cstring("the environment", &format!("{k}={v}")))
        .collect::<Result<Vec<_>, _>>()?;
    let cwd_s = cwd.to_string_lossy().into_owned();
    let plan = Plan::new(
        cstring("the program path", &program.to_string_lossy())?,
        argv,
        envp,
        cstring("the working directory", &cwd_s)?,
        id.uid,
        id.gid,
        id.groups.clone(),
        ctx.cap_last,
        ctx.max_fd,
    );
    let desc = Desc {
        argv0,
        user: user_label,
        uid: id.uid,
        gid: id.gid,
        cwd: cwd_s,
    };
    Ok((plan, desc))
}

/// A started process and the parent's ends of its I/O.
struct Running {
    pid: libc::pid_t,
    tty: Option<OwnedFd>,
    stdin: Option<OwnedFd>,
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
    exit: OwnedFd,
}

fn io_err(what: &str, e: io::Error) -> ErrorMsg {
    err_msg(format!("{what}: {e}"), 125)
}

fn spawn(plan: Plan, req: &ExecRequest, desc: Desc) -> Result<Running, ErrorMsg> {
    // Parent ends are kept; child ends are dropped right after fork.
    let (tty, child_fds, stdio, parent) = if req.tty {
        let rows = if req.rows == 0 { 24 } else { req.rows };
        let cols = if req.cols == 0 { 80 } else { req.cols };
        let (master, slave) =
            sys::open_pty(rows, cols).map_err(|e| io_err("cannot allocate a terminal", e))?;
        let stdio = Stdio::Tty(slave.as_raw_fd());
        (Some(master), vec![slave], stdio, [None, None, None])
    } else {
        let p = || sys::pipe().map_err(|e| io_err("cannot create pipes", e));
        let (in_r, in_w) = p()?;
        let (out_r, out_w) = p()?;
        let (err_r, err_w) = p()?;
        let stdio = Stdio::Pipes([in_r.as_raw_fd(), out_w.as_raw_fd(), err_w.as_raw_fd()]);
        (
            None,
            vec![in_r, out_w, err_w],
            stdio,
            [Some(in_w), Some(out_r), Some(err_r)],
        )
    };
    let (err_r, err_w) = sys::pipe().map_err(|e| io_err("cannot create a pipe", e))?;
    let (exit_r, exit_w) = sys::pipe().map_err(|e| io_err("cannot create a pipe", e))?;
    let err_w_fd = err_w.as_raw_fd();

    // SAFETY: the closure only calls child::exec, which is written for a
    // forked child (raw syscalls on data prepared above, no allocation).
    let pid = unsafe { reaper::fork_registered(exit_w, || child::exec(&plan, &stdio, err_w_fd)) }
        .map_err(|e| io_err("cannot fork", e))?;
    drop(child_fds);
    drop(err_w);

    // The error pipe closes on a successful execve; otherwise it carries
    // the failing stage and errno.
    let mut report = [0u8; 5];
    let mut got = 0;
    let mut f = std::fs::File::from(err_r);
    while got < report.len() {
        match f.read(&mut report[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    if got == report.len() {
        let errno = i32::from_ne_bytes([report[1], report[2], report[3], report[4]]);
        return Err(describe_failure(Stage::from_u8(report[0]), errno, &desc));
    }
    let [stdin, stdout, stderr] = parent;
    Ok(Running {
        pid,
        tty,
        stdin,
        stdout,
        stderr,
        exit: exit_r,
    })
}

fn describe_failure(stage: Option<Stage>, errno: i32, d: &Desc) -> ErrorMsg {
    let e = io::Error::from_raw_os_error(errno);
    match stage {
        Some(Stage::Exec) => {
            let code = match errno {
                libc::ENOENT | libc::ENOTDIR => 127,
                libc::EACCES | libc::EPERM | libc::ENOEXEC | libc::EISDIR | libc::ETXTBSY => 126,
                _ => 125,
            };
            err_msg(format!("{}: cannot execute: {e}", d.argv0), code)
        }
        Some(Stage::Setuid) if errno == libc::EINVAL => err_msg(
            format!("user '{}' (uid {}) is not mapped in this sandbox", d.user, d.uid),
            125,
        ),
        Some(Stage::Setgid | Stage::Setgroups) if errno == libc::EINVAL => err_msg(
            format!(
                "a group of user '{}' (gid {} or a supplementary group) is not mapped in this sandbox",
                d.user, d.gid
            ),
            125,
        ),
        Some(Stage::Chdir) => err_msg(
            format!("cannot enter working directory '{}' as user '{}': {e}", d.cwd, d.user),
            125,
        ),
        Some(s) => err_msg(format!("failed {} for {}: {e}", s.describe(), d.argv0), 125),
        None => err_msg(format!("failed to start {}: {e}", d.argv0), 125),
    }
}

/// Which stream an output fd feeds.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Out,
    Err,
}

/// The I/O loop of a running exec. Returns the exit, or `None` if the
/// client went away (the process is then hung up and killed).
fn pump(sock: UnixStream, r: Running) -> io::Result<Option<Exit>> {
    let mut p = Pump::new(sock, r)?;
    p.run()
}

struct Pump {
    sock: UnixStream,
    inbuf: Vec<u8>,
    /// Read buffer for the process's output.
    scratch: Vec<u8>,
    out: Vec<u8>,
    out_pos: usize,
    client_gone: bool,
    pid: libc::pid_t,
    master: Option<OwnedFd>,
    /// Where stdin bytes go: the pipe, or the terminal master.
    stdin: Option<OwnedFd>,
    stdin_buf: Vec<u8>,
    stdin_pos: usize,
    stdin_eof: bool,
    /// Open output fds (raw; owned by `owned_outputs` or `master`).
    outputs: Vec<(RawFd, Kind)>,
    owned_outputs: Vec<OwnedFd>,
    exit_fd: OwnedFd,
    status: Option<libc::c_int>,
    exited_at: Option<Instant>,
    last_output: Instant,
    hangup_at: Option<Instant>,
    killed: bool,
}

impl Pump {
    fn new(sock: UnixStream, r: Running) -> io::Result<Pump> {
        sock.set_nonblocking(true)?;
        let mut outputs = Vec::new();
        let mut owned_outputs = Vec::new();
        let mut stdin = r.stdin;
        if let Some(m) = &r.tty {
            sys::set_nonblocking(m.as_raw_fd())?;
            outputs.push((m.as_raw_fd(), Kind::Out));
            // Our own descriptor for writing input to the terminal.
            // SAFETY: dup of an fd we own; the result is a fresh fd we own.
            let d = sys::cvt(unsafe { libc::fcntl(m.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 3) })?;
            // SAFETY: fcntl returned a new fd.
            stdin = Some(unsafe { OwnedFd::from_raw_fd(d) });
        }
        for (fd, kind) in [(r.stdout, Kind::Out), (r.stderr, Kind::Err)] {
            if let Some(fd) = fd {
                sys::set_nonblocking(fd.as_raw_fd())?;
                outputs.push((fd.as_raw_fd(), kind));
                owned_outputs.push(fd);
            }
        }
        if let Some(s) = &stdin {
            sys::set_nonblocking(s.as_raw_fd())?;
        }
        Ok(Pump {
            sock,
            inbuf: Vec::new(),
            scratch: vec![0u8; READ_CHUNK],
            out: Vec::new(),
            out_pos: 0,
            client_gone: false,
            pid: r.pid,
            master: r.tty,
            stdin,
            stdin_buf: Vec::new(),
            stdin_pos: 0,
            stdin_eof: false,
            outputs,
            owned_outputs,
            exit_fd: r.exit,
            status: None,
            exited_at: None,
            last_output: Instant::now(),
            hangup_at: None,
            killed: false,
        })
    }

    fn run(&mut self) -> io::Result<Option<Exit>> {
        loop {
            let now = Instant::now();
            if let (Some(status), Some(t)) = (self.status, self.exited_at) {
                if self.client_gone {
                    return Ok(None);
                }
                let drained = self.outputs.is_empty()
                    || now >= t + DRAIN_MAX
                    || now >= self.last_output.max(t) + DRAIN_IDLE;
                if drained {
                    let exit = to_exit(status);
                    self.finish(exit)?;
                    return Ok(Some(exit));
                }
            }
            if let Some(h) = self.hangup_at {
                if !self.killed && self.status.is_none() && now >= h + HANGUP_GRACE {
                    let _ = sys::kill(-self.pid, libc::SIGKILL);
                    let _ = sys::kill(self.pid, libc::SIGKILL);
                    self.killed = true;
                }
            }

            let mut fds: Vec<libc::pollfd> = Vec::with_capacity(6);
            let pfd = |fd: RawFd, events: libc::c_short| libc::pollfd {
                fd,
                events,
                revents: 0,
            };
            // [0] socket
            let mut ev = 0;
            if !self.client_gone {
                if self.stdin_buf.len() - self.stdin_pos < BUF_LIMIT {
                    ev |= libc::POLLIN;
                }
                if self.out_pos < self.out.len() {
                    ev |= libc::POLLOUT;
                }
            }
            fds.push(pfd(
                if self.client_gone {
                    -1
                } else {
                    self.sock.as_raw_fd()
                },
                ev,
            ));
            // [1] exit notification
            fds.push(pfd(
                if self.status.is_none() {
                    self.exit_fd.as_raw_fd()
                } else {
                    -1
                },
                libc::POLLIN,
            ));
            // [2] stdin target
            let stdin_pending = self.stdin_pos < self.stdin_buf.len();
            fds.push(pfd(
                match (&self.stdin, stdin_pending) {
                    (Some(s), true) => s.as_raw_fd(),
                    _ => -1,
                },
                libc::POLLOUT,
            ));
            // [3..] outputs, unless the client is not keeping up
            let out_room = self.client_gone || self.out.len() - self.out_pos < BUF_LIMIT;
            for &(fd, _) in &self.outputs {
                fds.push(pfd(if out_room { fd } else { -1 }, libc::POLLIN));
            }

            let mut deadline: Option<Instant> = None;
            if let Some(t) = self.exited_at {
                deadline = Some((t + DRAIN_MAX).min(self.last_output.max(t) + DRAIN_IDLE));
            }
            if let (Some(h), false) = (self.hangup_at, self.killed) {
                let k = h + HANGUP_GRACE;
                deadline = Some(deadline.map_or(k, |d| d.min(k)));
            }
            let timeout = deadline.map_or(-1, |d| {
                d.saturating_duration_since(now)
                    .as_millis()
                    .min(i32::MAX as u128) as i32
                    + 1
            });
            // SAFETY: `fds` is a live array of pollfd of the given length.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            let ready = |i: usize| fds[i].revents != 0;

            if ready(1) {
                let mut b = [0u8; 4];
                // SAFETY: reading 4 bytes into a live buffer.
                let got = unsafe { libc::read(self.exit_fd.as_raw_fd(), b.as_mut_ptr().cast(), 4) };
                if got == 4 {
                    self.status = Some(libc::c_int::from_ne_bytes(b));
                    self.exited_at = Some(Instant::now());
                    // Input can no longer be delivered.
                    self.stdin = None;
                }
            }
            // Outputs (iterate backwards so removal keeps indices valid).
            for i in (0..self.outputs.len()).rev() {
                if ready(3 + i) {
                    self.read_output(i);
                }
            }
            if ready(2) {
                self.write_stdin();
            }
            if ready(0) {
                let re = fds[0].revents;
                if re & libc::POLLOUT != 0 {
                    self.flush_some();
                }
                if re & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
                    self.read_client();
                }
            }
            if self.stdin_eof && self.stdin_pos >= self.stdin_buf.len() && self.master.is_none() {
                self.stdin = None; // closes the pipe: EOF for the process
            }
        }
    }

    fn read_output(&mut self, i: usize) {
        let (fd, kind) = self.outputs[i];
        let buf = &mut self.scratch;
        // SAFETY: reading into a live buffer of the given length.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n > 0 {
            let buf = buf[..n as usize].to_vec();
            self.last_output = Instant::now();
            if !self.client_gone {
                let f = match kind {
                    Kind::Out => Frame::Stdout(buf),
                    Kind::Err => Frame::Stderr(buf),
                };
                self.out.extend_from_slice(&f.encode());
            }
            return;
        }
        let e = io::Error::last_os_error();
        if n < 0 && matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EINTR)) {
            return;
        }
        // 0 = EOF on a pipe; EIO = every slave fd of the terminal closed.
        self.outputs.remove(i);
    }

    fn write_stdin(&mut self) {
        let Some(fd) = &self.stdin else { return };
        let data = &self.stdin_buf[self.stdin_pos..];
        // SAFETY: writing from a live buffer within its bounds.
        let n = unsafe { libc::write(fd.as_raw_fd(), data.as_ptr().cast(), data.len()) };
        if n >= 0 {
            self.stdin_pos += n as usize;
            if self.stdin_pos == self.stdin_buf.len() {
                self.stdin_buf.clear();
                self.stdin_pos = 0;
            }
            return;
        }
        let e = io::Error::last_os_error();
        if !matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EINTR)) {
            // EPIPE: the process closed its stdin. Drop what it won't read.
            self.stdin = None;
            self.stdin_buf.clear();
            self.stdin_pos = 0;
        }
    }

    fn flush_some(&mut self) {
        match self.sock.write(&self.out[self.out_pos..]) {
            Ok(n) => {
                self.out_pos += n;
                if self.out_pos == self.out.len() {
                    self.out.clear();
                    self.out_pos = 0;
                } else if self.out_pos > BUF_LIMIT {
                    self.out.drain(..self.out_pos);
                    self.out_pos = 0;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) => {}
            Err(_) => self.hang_up(),
        }
    }

    fn read_client(&mut self) {
        let mut buf = [0u8; READ_CHUNK];
        match self.sock.read(&mut buf) {
            Ok(0) => self.hang_up(),
            Ok(n) => {
                self.inbuf.extend_from_slice(&buf[..n]);
                if let Err(e) = self.parse_frames() {
                    warning!("exec pid={}: bad frame from client: {e}", self.pid);
                    self.hang_up();
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) => {}
            Err(_) => self.hang_up(),
        }
    }

    fn parse_frames(&mut self) -> Result<(), ProtocolError> {
        let mut pos = 0;
        while self.inbuf.len() - pos >= 4 {
            let len =
                u32::from_be_bytes(self.inbuf[pos..pos + 4].try_into().expect("4 bytes")) as usize;
            if len == 0 {
                return Err(ProtocolError::Empty);
            }
            if len > MAX_FRAME {
                return Err(ProtocolError::TooLarge(len));
            }
            if self.inbuf.len() - pos - 4 < len {
                break;
            }
            let frame = Frame::decode(&self.inbuf[pos + 4..pos + 4 + len])?;
            pos += 4 + len;
            self.on_frame(frame);
        }
        self.inbuf.drain(..pos);
        Ok(())
    }

    fn on_frame(&mut self, frame: Frame) {
        match frame {
            Frame::Stdin(data) => {
                if self.stdin.is_none() {
                    return;
                }
                if data.is_empty() {
                    match &self.master {
                        // A terminal has no separate stdin to close: send
                        // its end-of-file character, as a user typing ^D.
                        Some(m) => self.stdin_buf.push(sys::veof_char(m.as_raw_fd())),
                        None => self.stdin_eof = true,
                    }
                } else if !self.stdin_eof {
                    self.stdin_buf.extend_from_slice(&data);
                }
            }
            Frame::Resize(r) => {
                if let Some(m) = &self.master {
                    if let Err(e) = sys::set_winsize(m.as_raw_fd(), r.rows, r.cols) {
                        debug!("resize failed: {e}");
                    }
                }
            }
            Frame::Signal(s) => {
                if self.status.is_some() || !(1..=64).contains(&s.signal) {
                    return;
                }
                let target = match &self.master {
                    Some(m) => -sys::foreground_pgrp(m.as_raw_fd()).unwrap_or(self.pid),
                    None => self.pid,
                };
                if let Err(e) = sys::kill(target, s.signal) {
                    debug!("signal {} to {target}: {e}", s.signal);
                }
            }
            Frame::Hello(_)
            | Frame::Exec(_)
            | Frame::Started(_)
            | Frame::Stdout(_)
            | Frame::Stderr(_)
            | Frame::Exit(_)
            | Frame::Error(_) => {
                warning!(
                    "exec pid={}: ignoring unexpected {} frame",
                    self.pid,
                    frame.name()
                );
            }
        }
    }

    /// The client is gone: hang the process up, kill it after a grace
    /// period, keep draining its output so it never blocks on a full pipe.
    fn hang_up(&mut self) {
        if self.client_gone {
            return;
        }
        self.client_gone = true;
        self.out.clear();
        self.out_pos = 0;
        self.stdin = None;
        self.stdin_buf.clear();
        self.stdin_pos = 0;
        if self.status.is_none() {
            let _ = sys::kill(-self.pid, libc::SIGHUP);
            let _ = sys::kill(self.pid, libc::SIGHUP);
            self.hangup_at = Some(Instant::now());
        }
    }

    /// Send what is buffered plus the Exit frame, blocking (bounded by the
    /// socket's write timeout).
    fn finish(&mut self, exit: Exit) -> io::Result<()> {
        self.sock.set_nonblocking(false)?;
        self.out.extend_from_slice(&Frame::Exit(exit).encode());
        self.sock.write_all(&self.out[self.out_pos..])?;
        self.out.clear();
        self.out_pos = 0;
        // Hold on to the remaining fds until here so the terminal is not
        // torn down before the exit status is sent.
        self.owned_outputs.clear();
        Ok(())
    }
}

fn to_exit(status: libc::c_int) -> Exit {
    if libc::WIFSIGNALED(status) {
        Exit {
            code: None,
            signal: Some(libc::WTERMSIG(status)),
        }
    } else {
        Exit {
            code: Some(libc::WEXITSTATUS(status)),
            signal: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_status_decoding() {
        assert_eq!(
            to_exit(7 << 8),
            Exit {
                code: Some(7),
                signal: None
            }
        );
        assert_eq!(
            to_exit(15),
            Exit {
                code: None,
                signal: Some(15)
            }
        );
        assert_eq!(to_exit(15).status(), 143);
    }

    #[test]
    fn failure_messages() {
        let d = Desc {
            argv0: "x".into(),
            user: "dev".into(),
            uid: 1000,
            gid: 1000,
            cwd: "/w".into(),
        };
        let m = describe_failure(Some(Stage::Setuid), libc::EINVAL, &d);
        assert_eq!(
            m.message,
            "user 'dev' (uid 1000) is not mapped in this sandbox"
        );
        assert_eq!(
            describe_failure(Some(Stage::Exec), libc::ENOENT, &d).code,
            Some(127)
        );
        assert_eq!(
            describe_failure(Some(Stage::Exec), libc::EACCES, &d).code,
            Some(126)
        );
        assert_eq!(
            describe_failure(Some(Stage::Chdir), libc::EACCES, &d).code,
            Some(125)
        );
    }
}
