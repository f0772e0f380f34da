//! PID 1 duties: reap every child (our own execs and re-parented orphans),
//! deliver exit statuses to the exec that is waiting for them, and shut the
//! sandbox down on SIGTERM.
//!
//! All signals the agent cares about are blocked in every thread (the mask
//! is set before any thread exists) and consumed by one thread with
//! `sigwaitinfo`, so no handler ever runs.

use crate::log::{debug, warning};
use crate::sys;
use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// Signals handled by the reaper thread.
const HANDLED: &[libc::c_int] = &[
    libc::SIGCHLD,
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGPWR,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
];

/// Grace period between SIGTERM and SIGKILL at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// Exec'd processes still running: pid → write end of the pipe on which the
/// reaper delivers the raw wait status (4 bytes, native endian).
static CHILDREN: Mutex<Option<HashMap<libc::pid_t, OwnedFd>>> = Mutex::new(None);
static SHUTTING_DOWN: AtomicBool = AtomicBool::new(false);
/// Init of a VM: shutting down means powering the machine off.
static VM_MODE: AtomicBool = AtomicBool::new(false);

/// Make `shutdown` sync and power the VM off instead of exiting.
pub fn set_vm_mode() {
    VM_MODE.store(true, Ordering::SeqCst);
}

/// Shut the sandbox down as on SIGTERM from outside (VM mode: the host asked
/// over the shutdown port).
pub fn request_shutdown() {
    if !SHUTTING_DOWN.swap(true, Ordering::SeqCst) {
        let spawned = std::thread::Builder::new()
            .name("shutdown".into())
            .spawn(|| shutdown(true));
        if spawned.is_err() {
            finish();
        }
    }
}

fn finish() -> ! {
    if VM_MODE.load(Ordering::SeqCst) {
        crate::vm::power_off()
    }
    std::process::exit(0)
}

fn children() -> MutexGuard<'static, Option<HashMap<libc::pid_t, OwnedFd>>> {
    // A panic while holding the lock leaves the map consistent (inserts and
    // removes are single operations), so poisoning is ignored.
    CHILDREN.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Block the handled signals in the calling thread (and so in every thread
/// it spawns afterwards). Call first thing in `main`.
pub fn block_signals() -> io::Result<()> {
    let set = sys::sigset(HANDLED);
    // SAFETY: valid sigset pointer; null old-set pointer is allowed.
    let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    // SIGCHLD may have been inherited as ignored, which would make the
    // kernel auto-reap and hide exit statuses.
    // SAFETY: setting a default disposition.
    unsafe { libc::signal(libc::SIGCHLD, libc::SIG_DFL) };
    Ok(())
}

/// Fork while holding the child registry lock, so the reaper cannot reap the
/// child before `notify` is registered for it. In the child, `child` runs
/// and must not return (it execs or exits).
///
/// # Safety
/// `child` runs in a forked copy of a multi-threaded process and may only
/// use async-signal-safe operations.
pub unsafe fn fork_registered(notify: OwnedFd, child: impl FnOnce()) -> io::Result<libc::pid_t> {
    let mut map = children();
    let pid = libc::fork();
    if pid == 0 {
        child();
        libc::_exit(125);
    }
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    map.get_or_insert_with(HashMap::new).insert(pid, notify);
    Ok(pid)
}

/// Start the thread that waits for signals.
pub fn start(pid1: bool) -> io::Result<()> {
    reap_all();
    std::thread::Builder::new()
        .name("reaper".into())
        .stack_size(128 * 1024)
        .spawn(move || signal_loop(pid1))?;
    Ok(())
}

fn signal_loop(pid1: bool) {
    let set = sys::sigset(HANDLED);
    loop {
        // SAFETY: siginfo_t is plain data, filled by sigwaitinfo.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: valid pointers to a sigset and a siginfo.
        let sig = unsafe { libc::sigwaitinfo(&set, &mut info) };
        if sig < 0 {
            continue; // EINTR
        }
        match sig {
            libc::SIGCHLD => reap_all(),
            libc::SIGTERM | libc::SIGINT | libc::SIGPWR => {
                // SAFETY: si_pid is valid for signals sent by kill().
                let sender = unsafe { info.si_pid() };
                if pid1 && sender != 0 {
                    // Sent from inside the sandbox (a sender outside our pid
                    // namespace shows as 0): a sandboxed process does not
                    // get to shut the sandbox down.
                    warning!("ignoring signal {sig} from pid {sender} inside the sandbox");
                } else if !SHUTTING_DOWN.swap(true, Ordering::SeqCst) {
                    let spawned = std::thread::Builder::new()
                        .name("shutdown".into())
                        .spawn(move || shutdown(pid1));
                    if spawned.is_err() {
                        finish();
                    }
                }
            }
            _ => debug!("ignoring signal {sig}"),
        }
    }
}

/// Reap every child that has exited and notify the exec waiting for it.
fn reap_all() {
    loop {
        let mut status: libc::c_int = 0;
        // SAFETY: valid pointer to an int.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG | libc::__WALL) };
        if pid <= 0 {
            return;
        }
        let notify = children().as_mut().and_then(|m| m.remove(&pid));
        if let Some(fd) = notify {
            let b = status.to_ne_bytes();
            // SAFETY: writing 4 bytes from a live buffer. A pipe holds far
            // more than 4 bytes, so this never blocks; if the exec thread is
            // gone the write fails with EPIPE, which is fine.
            unsafe { libc::write(fd.as_raw_fd(), b.as_ptr().cast(), b.len()) };
        }
    }
}

fn has_children() -> bool {
    // SAFETY: siginfo_t is plain data.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer; WNOWAIT leaves any zombie for the reaper.
    let r = unsafe {
        libc::waitid(
            libc::P_ALL,
            0,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT | libc::__WALL,
        )
    };
    !(r < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ECHILD))
}

fn signal_all(pid1: bool, sig: libc::c_int) {
    if pid1 {
        // Every process in our pid namespace but ourselves.
        let _ = sys::kill(-1, sig);
    } else {
        // Not init: never kill(-1) (that would hit the whole machine); signal
        // the process groups of our execs.
        let pids: Vec<_> = children()
            .as_ref()
            .map(|m| m.keys().copied().collect())
            .unwrap_or_default();
        for pid in pids {
            let _ = sys::kill(-pid, sig);
            let _ = sys::kill(pid, sig);
        }
    }
}

fn wait_children_gone(deadline: Instant) -> bool {
    while Instant::now() < deadline {
        if !has_children() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    !has_children()
}

fn shutdown(pid1: bool) {
    warning!("shutting down: terminating all processes");
    signal_all(pid1, libc::SIGTERM);
    if !wait_children_gone(Instant::now() + SHUTDOWN_GRACE) {
        warning!("processes still running after {SHUTDOWN_GRACE:?}: killing them");
        signal_all(pid1, libc::SIGKILL);
        wait_children_gone(Instant::now() + Duration::from_secs(1));
    }
    // Give exec threads a moment to send their Exit frames.
    std::thread::sleep(Duration::from_millis(50));
    finish()
}
