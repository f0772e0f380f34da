//! The namespace backend: a sandbox is a set of Linux namespaces (user, mount,
//! pid, net, ipc, uts, cgroup) around an overlay root, with no_new_privs,
//! Landlock and a seccomp deny list.
//!
//! # How a launch works
//! 1. [`NamespaceBackend::launch`] (the supervisor, possibly multi-threaded)
//!    starts a dedicated *reaper thread*. That thread `clone(2)`s the
//!    sandbox's init directly into all new namespaces (`CLONE_NEWUSER |
//!    CLONE_NEWPID | ...`, `CLONE_PIDFD`) and then blocks in `waitpid` for
//!    it, so the init's parent-death signal (SIGKILL) is tied to a thread that
//!    lives exactly as long as the sandbox, and fires if the supervisor dies.
//! 2. The cloned child only makes async-signal-safe syscalls: it sets
//!    `PR_SET_PDEATHSIG`, waits on a pipe until the supervisor has written its
//!    uid/gid maps, moves the console log onto stdout/stderr and
//!    `fexecve`s the init program (the running executable by default) with
//!    the hidden argument [`NS_INIT_ARG`]. No extra process layer: this
//!    process is PID 1 of the new pid namespace.
//! 3. The init program ([`ns_init_if_requested`]) reads the JSON setup spec
//!    from the pipe, builds the root (overlay, /proc, /dev, /sys, /run,
//!    workspaces, proxy socket, guest binary, extra files), pivots into it,
//!    sets the host name, no_new_privs, Landlock and seccomp, and finally
//!    `execve`s the guest agent with only `AIRLOCK_GUEST_CONFIG` in its
//!    environment. Any failure is written to an error pipe (close-on-exec),
//!    which `launch` reads until EOF: EOF after the "ready" marker means the
//!    agent was exec'd.

use crate::{
    net, sys, Backend, BackendError, BackendKind, Instance, LaunchSpec, NetworkMode, ProbeReport,
};
use serde::{Deserialize, Serialize};
use std::ffi::{CString, OsStr};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Component, Path, PathBuf};
use std::process::ExitStatus;
use std::sync::mpsc;
use std::time::{Duration, Instant};

mod init;

/// Hidden first argument that makes the init program act as a sandbox init.
pub const NS_INIT_ARG: &str = "__ns-init";

/// Host uid/gid `ID_SHIFT_BASE + n` is uid/gid `n` (1..=65536) inside a
/// sandbox launched by root; uid/gid 0 is the host's 0 (the invoker). The
/// template store shifts file ownership the same way when it extracts a
/// template as root (`airlock_template::ID_SHIFT_BASE`, checked by a test).
pub const ID_SHIFT_BASE: u32 = 1_000_000;
/// Number of ids mapped above 0 for a root invoker.
pub const ID_SHIFT_RANGE: u32 = 65_536;

/// How long `launch` waits for the init to report that the guest agent was
/// exec'd.
const SETUP_TIMEOUT: Duration = Duration::from_secs(30);

/// If this process was started as a namespace sandbox init (`PROG __ns-init
/// FD FD`), set the sandbox up and exec the guest agent; never returns in
/// that case. Otherwise returns immediately. Call it first thing in `main`,
/// before any thread is started.
pub fn ns_init_if_requested() {
    let mut args = std::env::args_os();
    let _prog = args.next();
    if args.next().as_deref() == Some(OsStr::new(NS_INIT_ARG)) {
        init::main(args.collect())
    }
}

/// The setup spec sent from `launch` to the init over the sync pipe.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct InitSpec {
    name: String,
    hostname: String,
    rootfs: PathBuf,
    /// Layers over `rootfs`, topmost first.
    #[serde(default)]
    lower_layers: Vec<PathBuf>,
    upper: PathBuf,
    work: PathBuf,
    newroot: PathBuf,
    /// (path, read_only)
    workspaces: Vec<(PathBuf, bool)>,
    proxy_socket: Option<PathBuf>,
    guest_binary: PathBuf,
    guest_config_json: String,
    control_fd: RawFd,
    extra_files: Vec<(PathBuf, Vec<u8>)>,
    /// Root invoker: ids 0 and 1..=65536 are mapped (else only 0).
    full_id_map: bool,
    /// [`NetworkMode::Tap`]: the init creates the TAP `eth0` and sends its fd over this
    /// Unix socket.
    #[serde(default)]
    net_fd: Option<RawFd>,
}

/// The namespace backend.
#[derive(Debug, Clone, Default)]
pub struct NamespaceBackend {
    init_program: Option<PathBuf>,
    network: NetworkMode,
}

impl NamespaceBackend {
    /// Uses the running executable (`/proc/self/exe`) as the init program;
    /// its `main` must call [`ns_init_if_requested`].
    pub fn new() -> Self {
        NamespaceBackend {
            init_program: None,
            network: NetworkMode::Loopback,
        }
    }

    /// The sandboxes' network: [`NetworkMode::Loopback`] (default) or
    /// [`NetworkMode::Tap`] (a TAP `eth0` whose fd [`Instance::take_network`] returns).
    pub fn with_network(mut self, mode: NetworkMode) -> Self {
        self.network = mode;
        self
    }

    /// Uses another program as the init (e.g. this crate's `airlock-ns-init`
    /// binary); it must call [`ns_init_if_requested`].
    pub fn with_init_program(path: PathBuf) -> Self {
        NamespaceBackend {
            init_program: Some(path),
            network: NetworkMode::Loopback,
        }
    }

    fn init_program(&self) -> &Path {
        self.init_program
            .as_deref()
            .unwrap_or(Path::new("/proc/self/exe"))
    }
}

impl Backend for NamespaceBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Namespace
    }

    fn probe(&self) -> Result<ProbeReport, BackendError> {
        Ok(probe(self.init_program()))
    }

    fn launch(&self, spec: LaunchSpec) -> Result<Box<dyn Instance>, BackendError> {
        launch(self.init_program(), self.network, spec).map(|i| Box::new(i) as Box<dyn Instance>)
    }
}

fn read_sysctl(path: &str) -> Option<String> {
    fs::read_to_string(path).ok().map(|s| s.trim().to_string())
}

fn probe(init_program: &Path) -> ProbeReport {
    let mut details = Vec::new();
    let mut ok = true;
    // SAFETY: geteuid cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    details.push(format!(
        "invoker: {}",
        if root {
            "root (uids 0 and 1..65536 mapped)"
        } else {
            "unprivileged (only uid 0 mapped, to the invoker)"
        }
    ));
    match read_sysctl("/proc/sys/user/max_user_namespaces").map(|s| s.parse::<u64>()) {
        Some(Ok(0)) => {
            ok = false;
            details.push("user namespaces: disabled (user.max_user_namespaces = 0)".into());
        }
        Some(Ok(n)) => details.push(format!("user namespaces: max {n}")),
        _ => details.push("user namespaces: /proc/sys/user/max_user_namespaces unreadable".into()),
    }
    if !root {
        if read_sysctl("/proc/sys/kernel/unprivileged_userns_clone").as_deref() == Some("0") {
            ok = false;
            details.push(
                "user namespaces: unprivileged disabled (kernel.unprivileged_userns_clone = 0)"
                    .into(),
            );
        }
        if read_sysctl("/proc/sys/kernel/apparmor_restrict_unprivileged_userns").as_deref()
            == Some("1")
        {
            ok = false;
            details.push(
                "user namespaces: restricted by AppArmor \
                 (kernel.apparmor_restrict_unprivileged_userns = 1)"
                    .into(),
            );
        }
    }
    match try_userns_clone() {
        Ok(()) => details.push(format!(
            "user namespaces: {} allowed (clone test passed)",
            if root { "root" } else { "unprivileged" }
        )),
        Err(e) => {
            ok = false;
            details.push(format!(
                "user namespaces: clone(CLONE_NEWUSER|...) failed: {e}"
            ));
        }
    }
    match sys::landlock_abi() {
        Ok(v) => details.push(format!("landlock: ABI {v}")),
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
            details.push("landlock: built in but disabled at boot (add lsm=...,landlock)".into())
        }
        Err(_) => details.push("landlock: not available in this kernel".into()),
    }
    match crate::seccomp::programs() {
        Ok(p) => details.push(format!(
            "seccomp: filter compiles ({} programs, {} deny entries)",
            p.len(),
            crate::seccomp::DENY.len()
        )),
        Err(e) => {
            ok = false;
            details.push(format!("seccomp: {e}"));
        }
    }
    let fs_list = fs::read_to_string("/proc/filesystems").unwrap_or_default();
    if fs_list.lines().any(|l| l.ends_with("\toverlay")) {
        details.push("overlayfs: available".into());
    } else {
        details.push("overlayfs: not listed in /proc/filesystems (may load on demand)".into());
    }
    match File::open(init_program) {
        Ok(_) => details.push(format!("init program: {}", init_program.display())),
        Err(e) => {
            ok = false;
            details.push(format!("init program {}: {e}", init_program.display()));
        }
    }
    ProbeReport { ok, details }
}

/// Clone a child into new user+mount+pid namespaces that exits at once.
fn try_userns_clone() -> io::Result<()> {
    let flags = libc::CLONE_NEWUSER | libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::SIGCHLD;
    // SAFETY: fork-like clone (no CLONE_VM, no new stack); the child only
    // calls _exit.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone,
            flags as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: child of a fork-like clone: exit without touching anything.
        unsafe { libc::_exit(0) };
    }
    let mut status = 0;
    // SAFETY: reaping our own child.
    unsafe { libc::waitpid(pid as libc::pid_t, &mut status, 0) };
    Ok(())
}

fn io_err<'a>(step: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> BackendError + 'a {
    move |source| BackendError::Io {
        step,
        path: path.to_path_buf(),
        source,
    }
}

fn sys_err(step: &'static str) -> impl FnOnce(io::Error) -> BackendError {
    move |source| BackendError::Sys { step, source }
}

/// An absolute path without `.`/`..` components.
fn check_abs(what: &str, p: &Path) -> Result<(), BackendError> {
    if !p.is_absolute()
        || p.components()
            .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
    {
        return Err(BackendError::InvalidSpec(format!(
            "{what} {} must be an absolute path without . or ..",
            p.display()
        )));
    }
    if p.to_str().is_none() {
        return Err(BackendError::InvalidSpec(format!(
            "{what} {} is not UTF-8",
            p.display()
        )));
    }
    Ok(())
}

/// Paths used in overlay options cannot contain the option separators.
fn check_overlay_path(what: &str, p: &Path) -> Result<(), BackendError> {
    check_abs(what, p)?;
    let s = p.to_string_lossy();
    if s.contains([',', ':', '\\']) {
        return Err(BackendError::InvalidSpec(format!(
            "{what} {} contains ',', ':' or '\\', which overlayfs options cannot carry",
            p.display()
        )));
    }
    Ok(())
}

fn pipe() -> Result<(OwnedFd, OwnedFd), BackendError> {
    let mut fds = [0; 2];
    // SAFETY: fds is a valid array of two ints.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(sys_err("creating a pipe")(io::Error::last_os_error()));
    }
    // SAFETY: pipe2 returned two fresh descriptors that we now own.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Make sure a descriptor we pass on is not 0, 1 or 2 (those are replaced in
/// the child), keeping it close-on-exec.
fn above_stdio(fd: OwnedFd) -> Result<OwnedFd, BackendError> {
    if fd.as_raw_fd() > 2 {
        return Ok(fd);
    }
    // SAFETY: F_DUPFD_CLOEXEC on a valid fd returns a new fd we own.
    let n = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 3) };
    if n < 0 {
        return Err(sys_err("duplicating a descriptor")(
            io::Error::last_os_error(),
        ));
    }
    // SAFETY: n is a fresh descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(n) })
}

/// Everything the cloned child touches, prepared before the clone so that
/// the child does not allocate.
struct ChildArgs {
    exe_fd: RawFd,
    sync_r: RawFd,
    sync_w: RawFd,
    err_r: RawFd,
    err_w: RawFd,
    control_fd: RawFd,
    console_fd: RawFd,
    devnull_fd: RawFd,
    /// -1 when there is none.
    net_fd: RawFd,
    argv: Vec<CString>,
}

const EXEC_FAILED_MSG: &[u8] = b"Eexec of the init program\nfexecve failed, errno ";

/// The clone itself. Runs on the reaper thread.
fn clone_child(a: &ChildArgs) -> io::Result<(libc::pid_t, OwnedFd)> {
    let argv_ptrs: Vec<*const libc::c_char> = a
        .argv
        .iter()
        .map(|s| s.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let envp_ptrs: [*const libc::c_char; 1] = [std::ptr::null()];
    let flags = libc::CLONE_NEWUSER
        | libc::CLONE_NEWNS
        | libc::CLONE_NEWPID
        | libc::CLONE_NEWNET
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWUTS
        | libc::CLONE_NEWCGROUP
        | libc::CLONE_PIDFD
        | libc::SIGCHLD;
    let mut pidfd: libc::c_int = -1;
    // SAFETY: a fork-like clone (no CLONE_VM, stack 0 = continue on a copy of
    // this stack). The parent gets the pid and a pidfd in `pidfd`.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_clone,
            flags as libc::c_ulong,
            0usize,
            &mut pidfd as *mut libc::c_int,
            0usize,
            0usize,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    if ret == 0 {
        // Child. The parent may be multi-threaded: only async-signal-safe
        // syscalls from here to exec, no allocation, no locks.
        // SAFETY: raw syscalls on descriptor numbers and pre-built C arrays.
        unsafe {
            libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            );
            libc::close(a.sync_w);
            libc::close(a.err_r);
            let mut b = 0u8;
            // Wait for the uid/gid maps. EOF: the supervisor died or gave up.
            loop {
                let n = libc::read(a.sync_r, &mut b as *mut u8 as *mut libc::c_void, 1);
                if n == 1 {
                    break;
                }
                if n < 0 && *libc::__errno_location() == libc::EINTR {
                    continue;
                }
                libc::_exit(126);
            }
            libc::dup2(a.devnull_fd, 0);
            libc::dup2(a.console_fd, 1);
            libc::dup2(a.console_fd, 2);
            for fd in [a.sync_r, a.err_w, a.control_fd, a.net_fd] {
                libc::fcntl(fd, libc::F_SETFD, 0);
            }
            libc::fexecve(a.exe_fd, argv_ptrs.as_ptr(), envp_ptrs.as_ptr());
            let errno = *libc::__errno_location();
            libc::write(
                a.err_w,
                EXEC_FAILED_MSG.as_ptr() as *const libc::c_void,
                EXEC_FAILED_MSG.len(),
            );
            let mut digits = [0u8; 12];
            let mut i = digits.len();
            let mut v = errno.unsigned_abs();
            loop {
                i -= 1;
                digits[i] = b'0' + (v % 10) as u8;
                v /= 10;
                if v == 0 {
                    break;
                }
            }
            libc::write(
                a.err_w,
                digits[i..].as_ptr() as *const libc::c_void,
                digits.len() - i,
            );
            libc::_exit(127);
        }
    }
    // SAFETY: CLONE_PIDFD stored a fresh descriptor we now own.
    Ok((ret as libc::pid_t, unsafe { OwnedFd::from_raw_fd(pidfd) }))
}

fn write_file(path: &str, content: &str) -> io::Result<()> {
    fs::write(path, content)
}

fn write_id_maps(pid: libc::pid_t, full: bool) -> Result<(), BackendError> {
    // SAFETY: trivial getters.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    let (umap, gmap) = if full {
        let extra = format!("1 {} {}\n", ID_SHIFT_BASE + 1, ID_SHIFT_RANGE);
        (format!("0 0 1\n{extra}"), format!("0 0 1\n{extra}"))
    } else {
        let p = format!("/proc/{pid}/setgroups");
        write_file(&p, "deny").map_err(io_err_owned("writing setgroups", p))?;
        (format!("0 {uid} 1\n"), format!("0 {gid} 1\n"))
    };
    let p = format!("/proc/{pid}/uid_map");
    write_file(&p, &umap).map_err(io_err_owned("writing the uid map", p))?;
    let p = format!("/proc/{pid}/gid_map");
    write_file(&p, &gmap).map_err(io_err_owned("writing the gid map", p))?;
    Ok(())
}

fn io_err_owned(step: &'static str, path: String) -> impl FnOnce(io::Error) -> BackendError {
    move |source| BackendError::Io {
        step,
        path: PathBuf::from(path),
        source,
    }
}

fn userns_error(e: io::Error) -> BackendError {
    match e.raw_os_error() {
        Some(libc::EPERM) | Some(libc::ENOSPC) | Some(libc::EUSERS) | Some(libc::EACCES) => {
            let mut detail = format!("clone(CLONE_NEWUSER) failed: {e}");
            for (path, bad) in [
                ("/proc/sys/kernel/unprivileged_userns_clone", "0"),
                (
                    "/proc/sys/kernel/apparmor_restrict_unprivileged_userns",
                    "1",
                ),
                ("/proc/sys/user/max_user_namespaces", "0"),
            ] {
                if read_sysctl(path).as_deref() == Some(bad) {
                    detail.push_str(&format!("; {path} = {bad}"));
                }
            }
            BackendError::UserNamespacesDisabled { detail }
        }
        _ => BackendError::Sys {
            step: "creating the sandbox's namespaces (clone)",
            source: e,
        },
    }
}

fn launch(
    init_program: &Path,
    network: NetworkMode,
    spec: LaunchSpec,
) -> Result<NsInstance, BackendError> {
    let LaunchSpec {
        name,
        rootfs,
        lower_layers,
        layer_dir,
        run_dir,
        workspaces,
        control_fd,
        proxy_socket,
        guest_binary,
        mut guest_config,
        console_log,
        extra_files,
    } = spec;

    check_overlay_path("rootfs", &rootfs)?;
    check_overlay_path("layer_dir", &layer_dir)?;
    for l in &lower_layers {
        check_overlay_path("lower layer", l)?;
        if !l.is_dir() {
            return Err(BackendError::InvalidSpec(format!(
                "lower layer {} is not a directory",
                l.display()
            )));
        }
    }
    check_abs("run_dir", &run_dir)?;
    check_abs("guest_binary", &guest_binary)?;
    if !rootfs.join("bin").exists() && !rootfs.join("usr/bin").is_dir() {
        return Err(BackendError::InvalidSpec(format!(
            "rootfs {} does not look like a root filesystem (no usr/bin); build the template first",
            rootfs.display()
        )));
    }
    // SAFETY: geteuid cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        let owner = fs::metadata(&rootfs)
            .map_err(io_err("template rootfs", &rootfs))?
            .uid();
        if owner != euid {
            return Err(BackendError::InvalidSpec(format!(
                "template rootfs {} belongs to uid {owner}, but an unprivileged sandbox maps only \
                 uid {euid} (as root inside); its files could not be changed. Use a template \
                 built or imported by this user, or run as root",
                rootfs.display()
            )));
        }
    }
    let mut ws = Vec::with_capacity(workspaces.len());
    for w in &workspaces {
        check_abs("workspace", &w.path)?;
        if w.path == Path::new("/") {
            return Err(BackendError::InvalidSpec(
                "the workspace cannot be /".into(),
            ));
        }
        fs::metadata(&w.path).map_err(io_err("workspace", &w.path))?;
        ws.push((w.path.clone(), w.read_only));
    }
    for (p, _) in &extra_files {
        check_abs("extra file", p)?;
    }
    if let Some(p) = &proxy_socket {
        check_abs("proxy_socket", p)?;
        fs::metadata(p).map_err(io_err("proxy socket", p))?;
    }
    fs::metadata(&guest_binary).map_err(io_err("guest binary", &guest_binary))?;

    let upper = layer_dir.join("upper");
    let work = layer_dir.join("work");
    fs::create_dir_all(&upper).map_err(io_err("creating the upper layer", &upper))?;
    fs::create_dir_all(&work).map_err(io_err("creating the overlay work dir", &work))?;
    let newroot = run_dir.join("root");
    fs::create_dir_all(&newroot).map_err(io_err("creating the root mount point", &newroot))?;

    let console: OwnedFd = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(&console_log)
        .map_err(io_err("opening the console log", &console_log))?
        .into();
    let devnull: OwnedFd = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(io_err("opening", Path::new("/dev/null")))?
        .into();
    let exe: OwnedFd = File::open(init_program)
        .map_err(io_err("opening the init program", init_program))?
        .into();
    let (sync_r, sync_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let control_fd = above_stdio(control_fd)?;
    let console = above_stdio(console)?;
    let devnull = above_stdio(devnull)?;
    let sync_r = above_stdio(sync_r)?;
    let err_w = above_stdio(err_w)?;
    let (net_parent, net_child) = match network {
        NetworkMode::Loopback => (None, None),
        NetworkMode::Tap => {
            let (p, c) =
                net::socketpair().map_err(sys_err("creating the network fd socket pair"))?;
            (Some(p), Some(above_stdio(c)?))
        }
    };

    // SAFETY: geteuid cannot fail.
    let full_id_map = unsafe { libc::geteuid() } == 0;
    guest_config.control_fd = control_fd.as_raw_fd();
    if proxy_socket.is_some() && guest_config.proxy_socket.is_none() {
        guest_config.proxy_socket = Some(crate::PROXY_SOCKET_PATH.to_string());
    }
    let guest_config_json = serde_json::to_string(&guest_config)
        .map_err(|e| BackendError::InvalidSpec(format!("guest config: {e}")))?;
    let init_spec = InitSpec {
        name: name.clone(),
        hostname: if guest_config.hostname.is_empty() {
            name.clone()
        } else {
            guest_config.hostname.clone()
        },
        rootfs,
        lower_layers,
        upper,
        work,
        newroot,
        workspaces: ws,
        proxy_socket,
        guest_binary,
        guest_config_json,
        control_fd: control_fd.as_raw_fd(),
        extra_files,
        full_id_map,
        net_fd: net_child.as_ref().map(|f| f.as_raw_fd()),
    };
    let mut payload = vec![b'G'];
    serde_json::to_writer(&mut payload, &init_spec)
        .map_err(|e| BackendError::InvalidSpec(format!("setup spec: {e}")))?;

    let args = ChildArgs {
        exe_fd: exe.as_raw_fd(),
        sync_r: sync_r.as_raw_fd(),
        sync_w: sync_w.as_raw_fd(),
        err_r: err_r.as_raw_fd(),
        err_w: err_w.as_raw_fd(),
        control_fd: control_fd.as_raw_fd(),
        console_fd: console.as_raw_fd(),
        devnull_fd: devnull.as_raw_fd(),
        net_fd: net_child.as_ref().map_or(-1, |f| f.as_raw_fd()),
        argv: vec![
            CString::new("airlock-ns-init").expect("no NUL"),
            CString::new(NS_INIT_ARG).expect("no NUL"),
            CString::new(sync_r.as_raw_fd().to_string()).expect("no NUL"),
            CString::new(err_w.as_raw_fd().to_string()).expect("no NUL"),
        ],
    };

    // The reaper thread clones the init and waits for it.
    let (started_tx, started_rx) = mpsc::sync_channel::<io::Result<(libc::pid_t, OwnedFd)>>(1);
    let (status_tx, status_rx) = mpsc::sync_channel::<ExitStatus>(1);
    std::thread::Builder::new()
        .name(format!("airlock-ns-{name}"))
        .spawn(move || {
            let pid = match clone_child(&args) {
                Ok((pid, pidfd)) => {
                    let _ = started_tx.send(Ok((pid, pidfd)));
                    pid
                }
                Err(e) => {
                    let _ = started_tx.send(Err(e));
                    return;
                }
            };
            drop(args);
            let mut status = 0;
            loop {
                // SAFETY: waiting for the child this thread created.
                let r = unsafe { libc::waitpid(pid, &mut status, 0) };
                if r == pid {
                    break;
                }
                if r < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                // ECHILD: someone else reaped it (SIGCHLD ignored?). Report a kill.
                status = libc::SIGKILL;
                break;
            }
            let _ = status_tx.send(ExitStatus::from_raw(status));
        })
        .map_err(sys_err("starting the sandbox's reaper thread"))?;
    let (pid, pidfd) = started_rx
        .recv()
        .map_err(|_| BackendError::Sys {
            step: "starting the sandbox's reaper thread",
            source: io::Error::other("reaper thread ended early"),
        })?
        .map_err(userns_error)?;
    // The child has its copies now.
    drop((exe, sync_r, err_w, control_fd, console, devnull, net_child));

    let mut inst = NsInstance {
        name: name.clone(),
        pid,
        pidfd,
        status_rx,
        status: None,
        net_fd: None,
    };
    let setup = finish_setup(&mut inst, full_id_map, sync_w, err_r, &payload).and_then(|()| {
        // The init sent the TAP fd before it reported readiness.
        if let Some(p) = &net_parent {
            let fd = net::recv_fd(p.as_raw_fd(), true)
                .map_err(sys_err("receiving the sandbox's TAP device"))?;
            inst.net_fd = Some(fd.ok_or_else(|| BackendError::Setup {
                name: inst.name.clone(),
                step: "network".into(),
                message: "the init did not send the TAP device".into(),
            })?);
        }
        Ok(())
    });
    match setup {
        Ok(()) => Ok(inst),
        Err(e) => {
            let _ = inst.kill();
            let _ = inst.wait();
            Err(e)
        }
    }
}

fn finish_setup(
    inst: &mut NsInstance,
    full_id_map: bool,
    sync_w: OwnedFd,
    err_r: OwnedFd,
    payload: &[u8],
) -> Result<(), BackendError> {
    write_id_maps(inst.pid, full_id_map)?;
    // Release the child and send the spec. A write error (EPIPE) means the
    // child died; its report (or its exit status) says why.
    let mut sync = File::from(sync_w);
    let _ = std::io::Write::write_all(&mut sync, payload);
    drop(sync);

    let report = read_report(err_r, SETUP_TIMEOUT).map_err(sys_err("reading the init's report"))?;
    let Some(report) = report else {
        return Err(BackendError::SetupTimeout {
            name: inst.name.clone(),
            secs: SETUP_TIMEOUT.as_secs(),
        });
    };
    let text = String::from_utf8_lossy(&report);
    if let Some(pos) = text.find('E') {
        let body = &text[pos + 1..];
        let (step, message) = body.split_once('\n').unwrap_or((body, ""));
        return Err(BackendError::Setup {
            name: inst.name.clone(),
            step: step.to_string(),
            message: message.to_string(),
        });
    }
    if text.starts_with('R') {
        return Ok(());
    }
    let status = inst.wait()?;
    Err(BackendError::InitDied {
        name: inst.name.clone(),
        status: status.to_string(),
    })
}

/// Read until EOF or timeout (None).
fn read_report(fd: OwnedFd, timeout: Duration) -> io::Result<Option<Vec<u8>>> {
    let deadline = Instant::now() + timeout;
    let mut f = File::from(fd);
    let mut out = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(None);
        }
        let mut pfd = libc::pollfd {
            fd: f.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(i32::MAX as u128) as i32) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            continue;
        }
        let mut buf = [0u8; 4096];
        match f.read(&mut buf) {
            Ok(0) => return Ok(Some(out)),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// A running namespace sandbox. Dropping it kills the sandbox.
#[derive(Debug)]
pub struct NsInstance {
    name: String,
    pid: libc::pid_t,
    pidfd: OwnedFd,
    status_rx: mpsc::Receiver<ExitStatus>,
    status: Option<ExitStatus>,
    /// The TAP device's fd ([`NetworkMode::Tap`]) until taken.
    net_fd: Option<OwnedFd>,
}

impl NsInstance {
    fn signal(&self, sig: libc::c_int) -> io::Result<()> {
        // SAFETY: pidfd_send_signal on our pidfd, no siginfo.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.pidfd.as_raw_fd(),
                sig,
                std::ptr::null::<libc::siginfo_t>(),
                0u32,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ESRCH) {
                return Ok(()); // already exited
            }
            return Err(e);
        }
        Ok(())
    }

    fn kill(&self) -> io::Result<()> {
        self.signal(libc::SIGKILL)
    }

    /// Wait until the init has exited (pidfd readable) or `timeout` passed.
    fn exited_within(&self, timeout: Duration) -> io::Result<bool> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut pfd = libc::pollfd {
                fd: self.pidfd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let r =
                unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(i32::MAX as u128) as i32) };
            if r > 0 {
                return Ok(true);
            }
            if r == 0 {
                return Ok(false);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    fn lost_reaper(&self) -> BackendError {
        BackendError::Sys {
            step: "waiting for the sandbox init",
            source: io::Error::other(format!("reaper thread of {} is gone", self.name)),
        }
    }
}

impl Instance for NsInstance {
    fn take_network(&mut self) -> Option<(OwnedFd, crate::LinkKind)> {
        self.net_fd.take().map(|fd| (fd, crate::LinkKind::Tap))
    }

    fn pid(&self) -> u32 {
        self.pid as u32
    }

    fn wait(&mut self) -> Result<ExitStatus, BackendError> {
        if let Some(s) = self.status {
            return Ok(s);
        }
        let s = self.status_rx.recv().map_err(|_| self.lost_reaper())?;
        self.status = Some(s);
        Ok(s)
    }

    fn try_wait(&mut self) -> Result<Option<ExitStatus>, BackendError> {
        if self.status.is_none() {
            match self.status_rx.try_recv() {
                Ok(s) => self.status = Some(s),
                Err(mpsc::TryRecvError::Empty) => {}
                Err(mpsc::TryRecvError::Disconnected) => return Err(self.lost_reaper()),
            }
        }
        Ok(self.status)
    }

    fn terminate(&mut self, grace: Duration) -> Result<(), BackendError> {
        if self.status.is_some() {
            return Ok(());
        }
        self.signal(libc::SIGTERM)
            .map_err(sys_err("sending SIGTERM to the sandbox init"))?;
        if !self
            .exited_within(grace)
            .map_err(sys_err("waiting for the sandbox init"))?
        {
            self.kill()
                .map_err(sys_err("sending SIGKILL to the sandbox init"))?;
        }
        self.wait().map(|_| ())
    }
}

impl Drop for NsInstance {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.kill();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_paths() {
        assert!(check_abs("x", Path::new("rel/a")).is_err());
        assert!(check_abs("x", Path::new("/a/../b")).is_err());
        assert!(check_abs("x", Path::new("/a/b")).is_ok());
        assert!(check_overlay_path("x", Path::new("/a,b")).is_err());
        assert!(check_overlay_path("x", Path::new("/a:b")).is_err());
    }

    #[test]
    fn probe_reports() {
        let r = probe(Path::new("/proc/self/exe"));
        assert!(r.details.iter().any(|d| d.starts_with("landlock")));
        assert!(r.details.iter().any(|d| d.starts_with("seccomp")));
    }
}
