//! The namespace sandbox's seccomp filter, as reviewed data.
//!
//! Default allow; every entry of [`DENY`] names a syscall, when it is denied
//! (always, or only for some argument values), the errno returned, and why.
//! `crates/airlock-backend/SECCOMP.md` is the review document for this table;
//! a unit test checks that every syscall here is documented there.
//!
//! Besides the table, the installed program kills the process on any syscall
//! from another ABI (i386 via `int 0x80`, x32): those have their own syscall
//! numbers that a deny list by number would not cover.

use seccompiler::{
    sock_filter, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};
use std::collections::BTreeMap;

/// When an entry applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum When {
    /// Every call.
    Always,
    /// When argument `arg` has any bit of `mask` set.
    AnyBit { arg: u8, mask: u64 },
    /// When the low 32 bits of argument `arg` are none of `allowed`.
    NotIn { arg: u8, allowed: &'static [u32] },
}

/// One reviewed deny rule.
#[derive(Debug, Clone, Copy)]
pub struct Entry {
    pub name: &'static str,
    pub nr: i64,
    pub when: When,
    /// errno returned to the caller.
    pub errno: i32,
    pub reason: &'static str,
}

/// Every namespace-creating clone/unshare flag.
pub const NS_FLAGS: u64 = (libc::CLONE_NEWUSER
    | libc::CLONE_NEWNS
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWCGROUP
    | 0x80/* CLONE_NEWTIME */) as u64;

/// `personality(2)` values allowed (the set Docker's default profile allows):
/// PER_LINUX, PER_LINUX32, UNAME26, PER_LINUX32|UNAME26, and the query 0xffffffff.
pub const PERSONALITY_ALLOWED: &[u32] = &[0x0, 0x8, 0x20000, 0x20008, 0xffff_ffff];

const EPERM: i32 = libc::EPERM;
const ENOSYS: i32 = libc::ENOSYS;

macro_rules! e {
    ($name:ident, $when:expr, $errno:expr, $reason:expr) => {
        Entry {
            name: stringify!($name),
            nr: paste_nr!($name),
            when: $when,
            errno: $errno,
            reason: $reason,
        }
    };
}

macro_rules! paste_nr {
    (mount) => {
        libc::SYS_mount
    };
    (umount2) => {
        libc::SYS_umount2
    };
    (pivot_root) => {
        libc::SYS_pivot_root
    };
    (move_mount) => {
        libc::SYS_move_mount
    };
    (open_tree) => {
        libc::SYS_open_tree
    };
    (fsopen) => {
        libc::SYS_fsopen
    };
    (fsconfig) => {
        libc::SYS_fsconfig
    };
    (fsmount) => {
        libc::SYS_fsmount
    };
    (fspick) => {
        libc::SYS_fspick
    };
    (mount_setattr) => {
        libc::SYS_mount_setattr
    };
    (init_module) => {
        libc::SYS_init_module
    };
    (finit_module) => {
        libc::SYS_finit_module
    };
    (delete_module) => {
        libc::SYS_delete_module
    };
    (kexec_load) => {
        libc::SYS_kexec_load
    };
    (kexec_file_load) => {
        libc::SYS_kexec_file_load
    };
    (bpf) => {
        libc::SYS_bpf
    };
    (perf_event_open) => {
        libc::SYS_perf_event_open
    };
    (userfaultfd) => {
        libc::SYS_userfaultfd
    };
    (keyctl) => {
        libc::SYS_keyctl
    };
    (add_key) => {
        libc::SYS_add_key
    };
    (request_key) => {
        libc::SYS_request_key
    };
    (setns) => {
        libc::SYS_setns
    };
    (unshare) => {
        libc::SYS_unshare
    };
    (clone) => {
        libc::SYS_clone
    };
    (clone3) => {
        libc::SYS_clone3
    };
    (open_by_handle_at) => {
        libc::SYS_open_by_handle_at
    };
    (name_to_handle_at) => {
        libc::SYS_name_to_handle_at
    };
    (swapon) => {
        libc::SYS_swapon
    };
    (swapoff) => {
        libc::SYS_swapoff
    };
    (reboot) => {
        libc::SYS_reboot
    };
    (syslog) => {
        libc::SYS_syslog
    };
    (acct) => {
        libc::SYS_acct
    };
    (quotactl) => {
        libc::SYS_quotactl
    };
    (quotactl_fd) => {
        libc::SYS_quotactl_fd
    };
    (iopl) => {
        libc::SYS_iopl
    };
    (ioperm) => {
        libc::SYS_ioperm
    };
    (settimeofday) => {
        libc::SYS_settimeofday
    };
    (clock_settime) => {
        libc::SYS_clock_settime
    };
    (clock_adjtime) => {
        libc::SYS_clock_adjtime
    };
    (adjtimex) => {
        libc::SYS_adjtimex
    };
    (lookup_dcookie) => {
        libc::SYS_lookup_dcookie
    };
    (vhangup) => {
        libc::SYS_vhangup
    };
    (personality) => {
        libc::SYS_personality
    };
    (uselib) => {
        libc::SYS_uselib
    };
    (io_uring_setup) => {
        libc::SYS_io_uring_setup
    };
    (io_uring_enter) => {
        libc::SYS_io_uring_enter
    };
    (io_uring_register) => {
        libc::SYS_io_uring_register
    };
}

const MOUNT_REASON: &str = "changes the mount tree: could remount a read-only workspace \
     read-write, uncover or replace what the backend mounted; the sandbox is fully set up \
     before the agent starts";

/// The reviewed deny list. Keep in sync with SECCOMP.md (a test checks).
#[cfg(target_arch = "x86_64")]
pub const DENY: &[Entry] = &[
    e!(mount, When::Always, EPERM, MOUNT_REASON),
    e!(umount2, When::Always, EPERM, MOUNT_REASON),
    e!(pivot_root, When::Always, EPERM, MOUNT_REASON),
    e!(move_mount, When::Always, EPERM, MOUNT_REASON),
    e!(open_tree, When::Always, EPERM, "new mount API: clones mounts (could re-attach a copy of a read-only bind without its flags)"),
    e!(fsopen, When::Always, EPERM, "new mount API: creates filesystem contexts"),
    e!(fsconfig, When::Always, EPERM, "new mount API: configures filesystem contexts"),
    e!(fsmount, When::Always, EPERM, "new mount API: turns a context into a mount"),
    e!(fspick, When::Always, EPERM, "new mount API: reconfigures an existing superblock"),
    e!(mount_setattr, When::Always, EPERM, "changes mount flags (e.g. clears MS_RDONLY of a read-only workspace), idmaps mounts"),
    e!(init_module, When::Always, EPERM, "loads kernel code (also needs init-ns CAP_SYS_MODULE; defence in depth)"),
    e!(finit_module, When::Always, EPERM, "loads kernel code (also needs init-ns CAP_SYS_MODULE; defence in depth)"),
    e!(delete_module, When::Always, EPERM, "unloads kernel code"),
    e!(kexec_load, When::Always, EPERM, "replaces the running kernel"),
    e!(kexec_file_load, When::Always, EPERM, "replaces the running kernel"),
    e!(bpf, When::Always, EPERM, "eBPF verifier and maps are a large kernel attack surface with a history of privilege escalations"),
    e!(perf_event_open, When::Always, EPERM, "kernel profiling interface: side channels and a history of kernel bugs"),
    e!(userfaultfd, When::Always, EPERM, "lets an attacker pause kernel copies at will, the classic tool to win kernel races"),
    e!(keyctl, When::Always, EPERM, "kernel keyrings are not namespaced: could read or plant keys of the host user"),
    e!(add_key, When::Always, EPERM, "kernel keyrings are not namespaced"),
    e!(request_key, When::Always, EPERM, "kernel keyrings are not namespaced; can call out to host upcall helpers"),
    e!(setns, When::Always, EPERM, "joins other namespaces; nothing inside needs to"),
    e!(unshare, When::AnyBit { arg: 0, mask: NS_FLAGS }, EPERM, "new namespaces (a nested user namespace regains a full capability set and re-opens mount, so everything mount-related above); unshare of files/fs/sysvsem stays allowed"),
    e!(clone, When::AnyBit { arg: 0, mask: NS_FLAGS }, EPERM, "same as unshare: no new namespaces; plain fork/thread creation stays allowed"),
    e!(clone3, When::Always, ENOSYS, "its flags live in a struct in memory that seccomp cannot inspect; ENOSYS makes glibc fall back to clone, whose flags are checked"),
    e!(open_by_handle_at, When::Always, EPERM, "opens files by handle, bypassing the path walk (the Shocker container escape)"),
    e!(name_to_handle_at, When::Always, EPERM, "companion of open_by_handle_at; leaks file handles"),
    e!(swapon, When::Always, EPERM, "host swap configuration"),
    e!(swapoff, When::Always, EPERM, "host swap configuration"),
    e!(reboot, When::Always, EPERM, "in a pid namespace it only kills the sandbox's init, but the agent must not be killed that way; nothing legitimate calls it"),
    e!(syslog, When::Always, EPERM, "the kernel log is not namespaced: leaks host activity and kernel addresses"),
    e!(acct, When::Always, EPERM, "process accounting is host-wide"),
    e!(quotactl, When::Always, EPERM, "disk quotas are host-wide"),
    e!(quotactl_fd, When::Always, EPERM, "disk quotas are host-wide"),
    e!(iopl, When::Always, EPERM, "raw I/O port access"),
    e!(ioperm, When::Always, EPERM, "raw I/O port access"),
    e!(settimeofday, When::Always, EPERM, "the clock is host-wide"),
    e!(clock_settime, When::Always, EPERM, "the clock is host-wide"),
    e!(clock_adjtime, When::Always, EPERM, "the clock is host-wide"),
    e!(adjtimex, When::Always, EPERM, "the clock is host-wide (read-only queries also fail; ntp tools are not expected inside)"),
    e!(lookup_dcookie, When::Always, EPERM, "oprofile interface, leaks kernel paths"),
    e!(vhangup, When::Always, EPERM, "hangs up the controlling terminal of other sessions"),
    e!(personality, When::NotIn { arg: 0, allowed: PERSONALITY_ALLOWED }, EPERM, "non-default personalities (READ_IMPLIES_EXEC, ADDR_NO_RANDOMIZE, MMAP_PAGE_ZERO...) weaken exploit mitigations"),
    e!(uselib, When::Always, EPERM, "legacy a.out library loader, unused, old kernel bugs"),
    e!(io_uring_setup, When::Always, ENOSYS, "io_uring is a large kernel attack surface with many privilege escalations (Docker and Google block it too); ENOSYS makes libuv/glibc fall back to ordinary syscalls"),
    e!(io_uring_enter, When::Always, ENOSYS, "see io_uring_setup"),
    e!(io_uring_register, When::Always, ENOSYS, "see io_uring_setup"),
];

#[cfg(not(target_arch = "x86_64"))]
compile_error!("the namespace backend's seccomp table is only reviewed for x86_64 so far");

/// Syscalls that are explicitly *allowed* although a reader might expect
/// them to be denied, with the reason (documented in SECCOMP.md too).
pub const NOTABLY_ALLOWED: &[(&str, &str)] = &[
    ("ptrace", "debuggers inside are legitimate; the host's processes are invisible through the pid namespace and the guest agent is non-dumpable"),
    ("process_vm_readv", "same rules as ptrace"),
    ("chroot", "confined to the sandbox's own root; harmless without mount"),
    ("mknod", "the kernel refuses device nodes in a user namespace; FIFOs and sockets are fine"),
];

fn rules_for(when: When) -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
    match when {
        When::Always => Ok(Vec::new()),
        When::AnyBit { arg, mask } => {
            let mut rules = Vec::new();
            for bit in 0..64 {
                let b = 1u64 << bit;
                if mask & b != 0 {
                    rules.push(SeccompRule::new(vec![SeccompCondition::new(
                        arg,
                        SeccompCmpArgLen::Qword,
                        SeccompCmpOp::MaskedEq(b),
                        b,
                    )?])?);
                }
            }
            Ok(rules)
        }
        When::NotIn { arg, allowed } => {
            let conds = allowed
                .iter()
                .map(|&v| {
                    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Ne, v as u64)
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok(vec![SeccompRule::new(conds)?])
        }
    }
}

/// Errors building the filter (a bug in the table, not a runtime condition).
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("building the seccomp filter for errno {errno}")]
    Build {
        errno: i32,
        #[source]
        source: seccompiler::BackendError,
    },
    #[error("compiling the seccomp filter")]
    Compile(#[source] seccompiler::BackendError),
    #[error("installing the seccomp filter")]
    Install(#[source] seccompiler::Error),
}

const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

/// The programs to install, in order. The kernel evaluates all of them and
/// the most severe verdict wins (KILL > ERRNO > ALLOW).
pub fn programs() -> Result<Vec<BpfProgram>, SeccompError> {
    let mut by_errno: BTreeMap<i32, BTreeMap<i64, Vec<SeccompRule>>> = BTreeMap::new();
    for e in DENY {
        let rules = rules_for(e.when).map_err(|source| SeccompError::Build {
            errno: e.errno,
            source,
        })?;
        let prev = by_errno.entry(e.errno).or_default().insert(e.nr, rules);
        debug_assert!(prev.is_none(), "duplicate seccomp entry {}", e.name);
    }
    let mut out = vec![abi_guard()];
    for (errno, rules) in by_errno {
        let filter = SeccompFilter::new(
            rules,
            SeccompAction::Allow,
            SeccompAction::Errno(errno as u32),
            TargetArch::x86_64,
        )
        .map_err(|source| SeccompError::Build { errno, source })?;
        out.push(filter.try_into().map_err(SeccompError::Compile)?);
    }
    Ok(out)
}

/// Kill on any other audit arch (i386 `int 0x80`) and on x32 syscall numbers.
fn abi_guard() -> BpfProgram {
    const LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
    const JEQ_K: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
    const JGE_K: u16 = 0x35; // BPF_JMP | BPF_JGE | BPF_K
    const RET_K: u16 = 0x06; // BPF_RET | BPF_K
    const RET_KILL_PROCESS: u32 = 0x8000_0000;
    const RET_ALLOW: u32 = 0x7fff_0000;
    let s = |code, k| sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    };
    let j = |code, k, jt, jf| sock_filter { code, jt, jf, k };
    vec![
        s(LD_W_ABS, 4), // seccomp_data.arch
        j(JEQ_K, AUDIT_ARCH_X86_64, 1, 0),
        s(RET_K, RET_KILL_PROCESS),
        s(LD_W_ABS, 0), // seccomp_data.nr
        j(JGE_K, X32_SYSCALL_BIT, 0, 1),
        s(RET_K, RET_KILL_PROCESS),
        s(RET_K, RET_ALLOW),
    ]
}

/// Install every program on the calling thread (sets no_new_privs).
pub fn install(programs: &[BpfProgram]) -> Result<(), SeccompError> {
    for p in programs {
        seccompiler::apply_filter(p).map_err(SeccompError::Install)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_compiles() {
        let progs = programs().unwrap();
        assert!(progs.len() >= 3);
        for p in &progs {
            assert!(!p.is_empty() && p.len() < 4096, "BPF program too long");
        }
    }

    #[test]
    fn table_has_required_entries_and_reasons() {
        let required = [
            "mount",
            "umount2",
            "pivot_root",
            "move_mount",
            "open_tree",
            "fsopen",
            "fsconfig",
            "fsmount",
            "fspick",
            "mount_setattr",
            "init_module",
            "finit_module",
            "delete_module",
            "kexec_load",
            "kexec_file_load",
            "bpf",
            "perf_event_open",
            "userfaultfd",
            "keyctl",
            "add_key",
            "request_key",
            "setns",
            "unshare",
            "clone",
            "clone3",
            "open_by_handle_at",
            "name_to_handle_at",
            "swapon",
            "swapoff",
            "reboot",
            "syslog",
            "acct",
            "quotactl",
            "iopl",
            "ioperm",
            "settimeofday",
            "clock_settime",
            "clock_adjtime",
            "adjtimex",
            "lookup_dcookie",
            "vhangup",
            "personality",
        ];
        for r in required {
            assert!(DENY.iter().any(|e| e.name == r), "{r} missing from DENY");
        }
        assert!(
            !DENY.iter().any(|e| e.name == "ptrace"),
            "ptrace must stay allowed"
        );
        let mut seen = std::collections::HashSet::new();
        for e in DENY {
            assert!(seen.insert(e.nr), "duplicate entry {}", e.name);
            assert!(e.reason.len() > 10, "{} needs a reason", e.name);
        }
    }

    #[test]
    fn every_entry_is_documented() {
        let doc = include_str!("../SECCOMP.md");
        for e in DENY {
            assert!(
                doc.contains(&format!("`{}`", e.name)),
                "SECCOMP.md does not document `{}`",
                e.name
            );
        }
        for (name, _) in NOTABLY_ALLOWED {
            assert!(doc.contains(&format!("`{name}`")), "SECCOMP.md: `{name}`");
        }
    }

    /// Install the filter in a forked child and check its verdicts.
    #[test]
    fn filter_denies_in_a_child() {
        let progs = programs().unwrap();
        // SAFETY: the test harness may be multi-threaded; the child only
        // makes raw syscalls and _exit()s (the filter is built before fork).
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let code = (|| {
                for p in &progs {
                    let prog = libc::sock_fprog {
                        len: p.len() as u16,
                        filter: p.as_ptr() as *mut libc::sock_filter,
                    };
                    // SAFETY: raw syscalls, no allocation.
                    unsafe {
                        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                            return 10;
                        }
                        if libc::syscall(libc::SYS_seccomp, 1 /* SET_MODE_FILTER */, 0, &prog) != 0
                        {
                            return 11;
                        }
                    }
                }
                // SAFETY: raw syscalls with harmless arguments.
                unsafe {
                    let errno = || *libc::__errno_location();
                    if libc::syscall(libc::SYS_umount2, c"/nonexistent".as_ptr(), 0) != -1
                        || errno() != libc::EPERM
                    {
                        return 20;
                    }
                    if libc::syscall(libc::SYS_unshare, libc::CLONE_NEWUSER) != -1
                        || errno() != libc::EPERM
                    {
                        return 21;
                    }
                    if libc::syscall(libc::SYS_clone3, 0usize, 0usize) != -1
                        || errno() != libc::ENOSYS
                    {
                        return 22;
                    }
                    if libc::syscall(libc::SYS_personality, 0xffff_ffffu64) == -1 {
                        return 23;
                    }
                    if libc::syscall(libc::SYS_personality, 0x0040000u64) != -1
                        || errno() != libc::EPERM
                    {
                        return 24;
                    }
                    if libc::syscall(libc::SYS_getpid) <= 0 {
                        return 25;
                    }
                    // x32 syscall number: the process must be killed.
                    libc::syscall(libc::SYS_getpid | 0x4000_0000);
                }
                30
            })();
            // SAFETY: terminate the forked child without running destructors.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(
            libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS,
            "child status {status:#x} (exit code {} = failed check)",
            libc::WEXITSTATUS(status)
        );
    }
}
