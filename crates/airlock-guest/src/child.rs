//! What runs in the forked child between `fork` and `execve`.
//!
//! The agent is multi-threaded, so after `fork` only async-signal-safe calls
//! are allowed: everything here is a raw syscall on data prepared by the
//! parent ([`Plan`]). No allocation, no locks, no std I/O.
//!
//! A failure is reported to the parent as `[stage, errno (4 bytes, native)]`
//! on a close-on-exec pipe; a successful `execve` closes that pipe instead.

use std::ffi::CString;
use std::os::fd::RawFd;

/// Steps of the child's setup, reported with the errno on failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Stage {
    Signals = 1,
    Setsid,
    Terminal,
    Stdio,
    Ambient,
    Bounding,
    Setgroups,
    Setgid,
    Setuid,
    Capset,
    NoNewPrivs,
    Chdir,
    Exec,
}

impl Stage {
    pub fn from_u8(v: u8) -> Option<Stage> {
        use Stage::*;
        [
            Signals, Setsid, Terminal, Stdio, Ambient, Bounding, Setgroups, Setgid, Setuid, Capset,
            NoNewPrivs, Chdir, Exec,
        ]
        .into_iter()
        .find(|s| *s as u8 == v)
    }

    pub fn describe(self) -> &'static str {
        match self {
            Stage::Signals => "resetting signals",
            Stage::Setsid => "creating a session",
            Stage::Terminal => "acquiring the terminal",
            Stage::Stdio => "setting up stdin/stdout/stderr",
            Stage::Ambient => "clearing ambient capabilities",
            Stage::Bounding => "dropping the capability bounding set",
            Stage::Setgroups => "setting supplementary groups",
            Stage::Setgid => "setting the group id",
            Stage::Setuid => "setting the user id",
            Stage::Capset => "clearing capabilities",
            Stage::NoNewPrivs => "setting no_new_privs",
            Stage::Chdir => "entering the working directory",
            Stage::Exec => "executing the program",
        }
    }
}

/// Standard streams of the child.
pub enum Stdio {
    /// The pty slave becomes the controlling terminal and fds 0, 1, 2.
    Tty(RawFd),
    /// Pipe ends for stdin, stdout, stderr.
    Pipes([RawFd; 3]),
}

/// Everything the child needs, prepared before `fork`.
pub struct Plan {
    program: CString,
    // Owners of the strings `argv_ptrs` / `envp_ptrs` point into.
    _argv: Vec<CString>,
    _envp: Vec<CString>,
    cwd: CString,
    uid: u32,
    gid: u32,
    groups: Vec<libc::gid_t>,
    cap_last: u32,
    /// Upper bound for the close-every-fd fallback loop.
    max_fd: i32,
    // Null-terminated pointer arrays into `argv` / `envp`.
    argv_ptrs: Vec<*const libc::c_char>,
    envp_ptrs: Vec<*const libc::c_char>,
}

// SAFETY: the raw pointers point into the CStrings owned by the same Plan,
// which are never mutated after `finish`; moving the Plan between threads
// does not move the heap buffers they point to.
unsafe impl Send for Plan {}

impl Plan {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        program: CString,
        argv: Vec<CString>,
        envp: Vec<CString>,
        cwd: CString,
        uid: u32,
        gid: u32,
        groups: Vec<u32>,
        cap_last: u32,
        max_fd: i32,
    ) -> Plan {
        let mut argv_ptrs: Vec<_> = argv.iter().map(|a| a.as_ptr()).collect();
        argv_ptrs.push(std::ptr::null());
        let mut envp_ptrs: Vec<_> = envp.iter().map(|a| a.as_ptr()).collect();
        envp_ptrs.push(std::ptr::null());
        Plan {
            program,
            _argv: argv,
            _envp: envp,
            cwd,
            uid,
            gid,
            groups,
            cap_last,
            max_fd,
            argv_ptrs,
            envp_ptrs,
        }
    }
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
const CLOSE_RANGE_MAX: libc::c_uint = libc::c_uint::MAX;

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Report `stage` and the current errno to the parent and exit.
fn fail(err_fd: RawFd, stage: Stage, err: i32) -> ! {
    let e = err.to_ne_bytes();
    let msg = [stage as u8, e[0], e[1], e[2], e[3]];
    // SAFETY: write and _exit are async-signal-safe; msg is a live buffer.
    unsafe {
        libc::write(err_fd, msg.as_ptr().cast(), msg.len());
        libc::_exit(125);
    }
}

/// Set up the child and exec. Never returns.
///
/// # Safety
/// Must be called only in a freshly forked child of a (possibly
/// multi-threaded) process; `err_fd` and the fds in `stdio` must be open.
pub unsafe fn exec(plan: &Plan, stdio: &Stdio, err_fd: RawFd) -> ! {
    // Signals: empty mask, default dispositions (the agent blocks and
    // ignores several; a child must not inherit that).
    let mut set: libc::sigset_t = std::mem::zeroed();
    libc::sigemptyset(&mut set);
    if libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut()) < 0 {
        fail(err_fd, Stage::Signals, errno());
    }
    for sig in 1..=64 {
        if sig != libc::SIGKILL && sig != libc::SIGSTOP {
            // glibc refuses its two internal RT signals; that is fine.
            libc::signal(sig, libc::SIG_DFL);
        }
    }

    if libc::setsid() < 0 {
        fail(err_fd, Stage::Setsid, errno());
    }

    match *stdio {
        Stdio::Tty(slave) => {
            if libc::ioctl(slave, libc::TIOCSCTTY, 0) < 0 {
                fail(err_fd, Stage::Terminal, errno());
            }
            for fd in 0..3 {
                if libc::dup2(slave, fd) < 0 {
                    fail(err_fd, Stage::Stdio, errno());
                }
            }
        }
        Stdio::Pipes(fds) => {
            for (target, fd) in fds.into_iter().enumerate() {
                if libc::dup2(fd, target as i32) < 0 {
                    fail(err_fd, Stage::Stdio, errno());
                }
            }
        }
    }

    // Capabilities: ambient first (needs nothing), then the bounding set
    // (needs CAP_SETPCAP, so before changing uid).
    if libc::prctl(
        libc::PR_CAP_AMBIENT,
        libc::PR_CAP_AMBIENT_CLEAR_ALL,
        0,
        0,
        0,
    ) < 0
        && errno() != libc::EINVAL
    {
        fail(err_fd, Stage::Ambient, errno());
    }
    for cap in 0..=plan.cap_last {
        if libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) < 0 {
            let e = errno();
            if e != libc::EINVAL {
                fail(err_fd, Stage::Bounding, e);
            }
        }
    }

    // Identity. Raw syscalls: glibc's wrappers would try to broadcast the
    // change to other threads, which a forked child no longer has.
    if libc::syscall(
        libc::SYS_setgroups,
        plan.groups.len() as libc::size_t,
        plan.groups.as_ptr(),
    ) < 0
    {
        let e = errno();
        // EPERM: setgroups is denied in this user namespace
        // (/proc/self/setgroups = deny); the groups cannot be changed by
        // anyone there, so carry on.
        if e != libc::EPERM {
            fail(err_fd, Stage::Setgroups, e);
        }
    }
    if libc::syscall(libc::SYS_setresgid, plan.gid, plan.gid, plan.gid) < 0 {
        fail(err_fd, Stage::Setgid, errno());
    }
    if libc::syscall(libc::SYS_setresuid, plan.uid, plan.uid, plan.uid) < 0 {
        fail(err_fd, Stage::Setuid, errno());
    }
    // A setuid to the same uid 0 keeps every capability: clear them here.
    let mut hdr = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [CapData {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    if libc::syscall(libc::SYS_capset, &mut hdr as *mut CapHeader, data.as_ptr()) < 0 {
        fail(err_fd, Stage::Capset, errno());
    }
    if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0 {
        fail(err_fd, Stage::NoNewPrivs, errno());
    }

    if libc::chdir(plan.cwd.as_ptr()) < 0 {
        fail(err_fd, Stage::Chdir, errno());
    }

    // Close every fd but 0, 1, 2 and the (close-on-exec) error pipe.
    close_from(3, err_fd, plan.max_fd);

    libc::execve(
        plan.program.as_ptr(),
        plan.argv_ptrs.as_ptr(),
        plan.envp_ptrs.as_ptr(),
    );
    fail(err_fd, Stage::Exec, errno());
}

/// Close fds `first..` except `keep`.
unsafe fn close_from(first: RawFd, keep: RawFd, max_fd: i32) {
    let range = |lo: RawFd, hi: libc::c_uint| -> bool {
        lo as libc::c_uint > hi
            || libc::syscall(libc::SYS_close_range, lo as libc::c_uint, hi, 0) == 0
    };
    let ok = if keep >= first {
        range(first, (keep - 1) as libc::c_uint) && range(keep + 1, CLOSE_RANGE_MAX)
    } else {
        range(first, CLOSE_RANGE_MAX)
    };
    if !ok {
        // close_range unavailable (old kernel or seccomp): close one by one.
        for fd in first..max_fd {
            if fd != keep {
                libc::close(fd);
            }
        }
    }
}
