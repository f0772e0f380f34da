//! airlock-guest: the guest agent, PID 1 inside every airlock sandbox.
//!
//! Owns: init duties (reaping, shutdown on SIGTERM, hostname, loopback), the
//! in-sandbox end of the egress proxy, and serving exec requests from the
//! host on the inherited control socket.
//!
//! Must not: depend on any airlock crate but the protocol, use NSS, DNS or
//! dlopen (it is linked statically), or write to the sandbox's filesystem.
//!
//! It is started with `AIRLOCK_GUEST_CONFIG` (JSON `GuestConfig`) in its
//! environment and the listening control socket as `control_fd`. Outside
//! PID 1 (tests) it still works: it skips the host name, becomes a child
//! subreaper, and never signals processes it did not start.
//!
//! VM mode ([`vm`]): as the init of an airlock microVM (PID 1, no
//! `AIRLOCK_GUEST_CONFIG`, the backend's files in the initramfs) it first
//! sets the machine up, then serves on AF_VSOCK; shutting down powers off.

mod child;
mod exec;
mod log;
mod proxy;
mod reaper;
mod spec;
mod sys;
mod users;
mod vm;

use airlock_protocol::{GuestConfig, GUEST_CONFIG_ENV};
use log::{debug, error, warning};
use std::os::fd::FromRawFd;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

const USAGE: &str = "usage: airlock-guest [--debug]\n\
    The guest agent of an airlock sandbox; started by a backend, not by hand.\n\
    Reads its configuration (JSON) from $AIRLOCK_GUEST_CONFIG.\n\
    --debug   log one line per exec (also: AIRLOCK_GUEST_DEBUG=1)";

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            if vm::detect() {
                // Init of a VM must not exit (the kernel would panic).
                vm::power_off();
            }
            ExitCode::from(1)
        }
    }
}

fn run() -> Result<(), String> {
    // Before any thread exists, so every thread inherits the mask.
    reaper::block_signals().map_err(|e| format!("cannot block signals: {e}"))?;

    let mut debug_flag = std::env::var_os("AIRLOCK_GUEST_DEBUG").is_some_and(|v| v == "1");
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--debug" => debug_flag = true,
            "--version" => {
                println!("airlock-guest {}", env!("CARGO_PKG_VERSION"));
                return Ok(());
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            other => return Err(format!("unknown argument '{other}'\n{USAGE}")),
        }
    }
    log::set_debug(debug_flag);

    let vm_mode = vm::detect();
    let (cfg, vm_conf) = if vm_mode {
        reaper::set_vm_mode();
        match vm::setup() {
            Ok((cfg, conf)) => (cfg, Some(conf)),
            Err(e) => {
                error!("VM setup failed: {e}");
                vm::power_off();
            }
        }
    } else {
        let raw = std::env::var(GUEST_CONFIG_ENV).map_err(|_| {
            format!("${GUEST_CONFIG_ENV} is not set: the backend passes the configuration there")
        })?;
        let cfg: GuestConfig = serde_json::from_str(&raw)
            .map_err(|e| format!("${GUEST_CONFIG_ENV} is not a valid configuration: {e}"))?;
        (cfg, None)
    };
    // Nothing we start may see our own environment (it carries the config).
    for (k, _) in std::env::vars_os() {
        std::env::remove_var(k);
    }

    sys::ensure_std_fds();
    if let Err(e) = sys::set_non_dumpable() {
        warning!("cannot make the agent non-dumpable: {e}");
    }
    // SAFETY: getpid has no preconditions.
    let pid1 = unsafe { libc::getpid() } == 1;
    if !pid1 {
        debug!("not PID 1: skipping the host name, acting as child subreaper");
        if let Err(e) = sys::set_child_subreaper() {
            warning!("cannot become a child subreaper: {e}");
        }
    } else if !cfg.hostname.is_empty() {
        if let Err(e) = sys::sethostname(&cfg.hostname) {
            warning!("cannot set the host name to '{}': {e}", cfg.hostname);
        }
    }
    if let Err(e) = sys::loopback_up() {
        warning!("cannot bring up the loopback interface: {e}");
    }
    match (&cfg.proxy_listen, &cfg.proxy_socket) {
        (Some(listen), Some(socket)) => {
            if let Err(e) = proxy::start(listen, socket) {
                // Not fatal: exec still works, so the sandbox can be inspected.
                error!("cannot start the proxy relay on {listen}: {e}");
            }
        }
        (None, None) => {}
        _ => warning!("proxy_listen and proxy_socket must be set together; no proxy relay"),
    }

    reaper::start(pid1).map_err(|e| format!("cannot start the reaper: {e}"))?;

    let listener = match &vm_conf {
        Some(conf) => {
            let port = conf.port.unwrap_or(vm::CONTROL_PORT);
            let sport = conf.shutdown_port.unwrap_or(vm::SHUTDOWN_PORT);
            if let Err(e) = vm::start_shutdown_listener(sport) {
                warning!("cannot listen on vsock port {sport} for shutdown requests: {e}");
            }
            let l = vm::vsock_listen(port)
                .map_err(|e| format!("cannot listen on vsock port {port}: {e}"))?;
            let uptime = std::fs::read_to_string("/proc/uptime").unwrap_or_default();
            eprintln!(
                "airlock-guest: ready on vsock port {port} at {} s of guest uptime",
                uptime.split(' ').next().unwrap_or("?")
            );
            let r = conf.ready_port.unwrap_or(vm::READY_PORT);
            if let Err(e) = vm::notify_ready(r) {
                warning!("cannot tell the host we are ready (vsock port {r}): {e}");
            }
            vm::start_dockerd();
            Listener::Vsock(l)
        }
        None => Listener::Unix(control_listener(cfg.control_fd)?),
    };
    let ctx = Arc::new(exec::Context {
        base_env: cfg.env.clone(),
        root: PathBuf::from("/"),
        cap_last: sys::cap_last_cap(),
        max_fd: max_fd(),
    });
    debug!("serving exec requests");
    loop {
        match listener.accept() {
            Ok(sock) => {
                let ctx = ctx.clone();
                let r = std::thread::Builder::new()
                    .name("exec".into())
                    .stack_size(256 * 1024)
                    .spawn(move || exec::serve(&ctx, sock));
                if let Err(e) = r {
                    error!("cannot start a thread for a control connection: {e}");
                }
            }
            Err(e) => match e.raw_os_error() {
                Some(libc::EINTR | libc::ECONNABORTED) => {}
                Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM | libc::ENOBUFS) => {
                    error!("accept on the control socket: {e}");
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                _ => return Err(format!("accept on the control socket failed: {e}")),
            },
        }
    }
}

/// Where control connections come from.
enum Listener {
    /// Namespace mode: the inherited listening Unix socket.
    Unix(UnixListener),
    /// VM mode: AF_VSOCK.
    Vsock(std::os::fd::OwnedFd),
}

impl Listener {
    fn accept(&self) -> std::io::Result<std::os::unix::net::UnixStream> {
        match self {
            Listener::Unix(l) => l.accept().map(|(s, _)| s),
            Listener::Vsock(fd) => vm::accept(std::os::fd::AsRawFd::as_raw_fd(fd)),
        }
    }
}

/// Adopt the inherited listening socket.
fn control_listener(fd: i32) -> Result<UnixListener, String> {
    let mut listening: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes an int and its length through valid pointers.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&mut listening as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r < 0 || listening == 0 {
        return Err(format!(
            "control_fd {fd} is not a listening socket ({})",
            if r < 0 {
                std::io::Error::last_os_error().to_string()
            } else {
                "not listening".into()
            }
        ));
    }
    // SAFETY: fcntl on a valid fd; children must not inherit it.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    // SAFETY: the fd was handed to us by the backend and nothing else in the
    // process owns it.
    Ok(unsafe { UnixListener::from_raw_fd(fd) })
}

/// Upper bound for closing fds one by one when close_range is unavailable.
fn max_fd() -> i32 {
    // SAFETY: rlimit is plain data filled by getrlimit.
    let mut rl: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) } == 0 {
        rl.rlim_cur.min(1 << 20) as i32
    } else {
        4096
    }
}
