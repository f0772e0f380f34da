//! The sandbox init: runs as PID 1 of the new namespaces (single-threaded,
//! freshly exec'd), builds the root, locks itself down and execs the guest
//! agent. Errors go to the error pipe as `E<step>\n<message>`; `R` is
//! written right before the final exec.

use super::InitSpec;
use crate::{seccomp, sys, GUEST_BINARY_PATH, PROXY_SOCKET_PATH};
use landlock::{
    path_beneath_rules, Access, AccessFs, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus,
    ABI,
};
use std::convert::Infallible;
use std::ffi::{CString, OsString};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

/// Landlock ABI whose access rights we request (best effort below it).
const LANDLOCK_ABI: ABI = ABI::V6;

struct Fail {
    step: String,
    message: String,
}

trait Step<T> {
    fn step(self, step: &str) -> Result<T, Fail>;
}

impl<T> Step<T> for io::Result<T> {
    fn step(self, step: &str) -> Result<T, Fail> {
        self.map_err(|e| Fail {
            step: step.to_string(),
            message: explain(&e),
        })
    }
}

fn explain(e: &io::Error) -> String {
    let hint = match e.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => {
            " (permission denied inside the user namespace: is the path readable by the \
             invoking user, or are user namespaces restricted by AppArmor/SELinux?)"
        }
        Some(libc::ENODEV) => " (filesystem type not available in this kernel)",
        Some(libc::ELOOP) => " (a symlink was found where the sandbox needs a real directory)",
        Some(libc::EOVERFLOW) => {
            " (the template's files belong to ids that are not mapped in this user namespace: \
             an unprivileged invoker needs a template extracted by that same user)"
        }
        _ => "",
    };
    format!("{e}{hint}")
}

fn fail(step: &str, message: impl Into<String>) -> Fail {
    Fail {
        step: step.to_string(),
        message: message.into(),
    }
}

pub(super) fn main(args: Vec<OsString>) -> ! {
    let parse = |i: usize| -> Option<RawFd> { args.get(i)?.to_str()?.parse().ok() };
    let (Some(sync_r), Some(err_w)) = (parse(0), parse(1)) else {
        eprintln!(
            "airlock: {} is internal (usage: PROG {} SYNC_FD ERR_FD)",
            super::NS_INIT_ARG,
            super::NS_INIT_ARG
        );
        std::process::exit(2);
    };
    let Err(f) = run(sync_r, err_w);
    let msg = format!("E{}\n{}", f.step, f.message.replace('\n', " "));
    let _ = sys::write_fd(err_w, msg.as_bytes());
    eprintln!("airlock-ns: setup failed at {}: {}", f.step, f.message);
    std::process::exit(1);
}

fn run(sync_r: RawFd, err_w: RawFd) -> Result<Infallible, Fail> {
    sys::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong).step("PR_SET_PDEATHSIG")?;
    let mut buf = Vec::new();
    // SAFETY: sync_r was handed to us by number and is ours alone.
    let mut f = unsafe { File::from_raw_fd(sync_r) };
    f.read_to_end(&mut buf).step("reading the setup spec")?;
    drop(f);
    let spec: InitSpec =
        serde_json::from_slice(&buf).map_err(|e| fail("parsing the setup spec", e.to_string()))?;

    if let Some(sock) = spec.net_fd {
        let tap = crate::net::create_guest_tap().map_err(|e| fail(e.step, explain(&e.source)))?;
        crate::net::send_fd(sock, tap.as_raw_fd())
            .step("sending the TAP device to the supervisor")?;
        drop(tap);
        // SAFETY: sock was handed to us by number and is ours alone; not used again.
        unsafe { libc::close(sock) };
    }
    build_root(&spec)?;
    sys::sethostname(&spec.hostname).step("setting the host name")?;
    enter_root(&spec.newroot)?;
    if spec.full_id_map {
        // SAFETY: setgroups with an empty list.
        if unsafe { libc::setgroups(0, std::ptr::null()) } != 0 {
            return Err(io::Error::last_os_error()).step("clearing supplementary groups");
        }
    }
    // SAFETY: umask cannot fail.
    unsafe { libc::umask(0o022) };
    std::env::set_current_dir("/").step("chdir /")?;

    sys::close_fds_except(&[err_w, spec.control_fd]).step("closing inherited descriptors")?;
    sys::set_cloexec(err_w, true).step("error pipe close-on-exec")?;
    sys::set_cloexec(spec.control_fd, false).step("control socket inheritable")?;
    reset_signals();

    let programs =
        seccomp::programs().map_err(|e| fail("building the seccomp filter", e.to_string()))?;
    sys::prctl(libc::PR_SET_NO_NEW_PRIVS, 1).step("PR_SET_NO_NEW_PRIVS")?;
    let landlock = restrict_landlock(&spec.workspaces)?;
    seccomp::install(&programs).map_err(|e| {
        fail(
            "installing the seccomp filter",
            format!("{e}: {:?}", std::error::Error::source(&e)),
        )
    })?;

    let mut err = io::stderr();
    let _ = writeln!(
        err,
        "airlock-ns: sandbox {}: namespaces user,mnt,pid,net,ipc,uts,cgroup; no_new_privs; \
         landlock {landlock}; seccomp {} deny entries + 32-bit/x32 ABI kill",
        spec.name,
        seccomp::DENY.len()
    );

    let prog = CString::new(GUEST_BINARY_PATH).expect("constant has no NUL");
    let env = CString::new(format!(
        "{}={}",
        airlock_protocol::GUEST_CONFIG_ENV,
        spec.guest_config_json
    ))
    .map_err(|_| fail("guest config", "contains a NUL byte"))?;
    let argv = [prog.as_ptr(), std::ptr::null()];
    let envp = [env.as_ptr(), std::ptr::null()];
    sys::write_fd(err_w, b"R").step("reporting readiness")?;
    // SAFETY: NUL-terminated argv/envp arrays of valid C strings.
    unsafe { libc::execve(prog.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
    Err(io::Error::last_os_error()).step("exec of the guest agent")
}

/// Create `base/rel` as real directories, refusing symlinks on the way (the
/// upper layer is writable by the sandbox, which could plant a symlink to
/// make a later setup step act on a host path).
fn mkdir_nofollow(base: &Path, rel: &Path, mode: u32) -> Result<PathBuf, Fail> {
    let mut cur = base.to_path_buf();
    for c in rel.components() {
        let Component::Normal(c) = c else { continue };
        cur.push(c);
        match fs::symlink_metadata(&cur) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(fail(
                    "creating a mount point",
                    format!(
                        "{} exists and is not a directory (symlinks are refused)",
                        cur.display()
                    ),
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::DirBuilder::new()
                    .mode(mode)
                    .create(&cur)
                    .step(&format!("mkdir {}", cur.display()))?;
            }
            Err(e) => return Err(e).step(&format!("stat {}", cur.display())),
        }
    }
    Ok(cur)
}

/// The path inside `root` for an absolute path.
fn inside(root: &Path, abs: &Path) -> PathBuf {
    root.join(abs.strip_prefix("/").unwrap_or(abs))
}

/// Create an empty regular file to bind a non-directory onto.
fn file_mount_point(root: &Path, abs: &Path) -> Result<PathBuf, Fail> {
    let parent = abs.parent().unwrap_or(Path::new("/"));
    let dir = mkdir_nofollow(root, parent.strip_prefix("/").unwrap_or(parent), 0o755)?;
    let target = dir.join(abs.file_name().unwrap_or_default());
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(0o644)
        .open(&target)
        .step(&format!("creating mount point {}", target.display()))?;
    Ok(target)
}

/// Mount flags (MS_*) currently set on the mount at `path`.
fn current_mount_flags(path: &Path) -> io::Result<libc::c_ulong> {
    let c = sys::cstr(path)?;
    // SAFETY: zeroed statvfs is a valid out-parameter.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and out-pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let f = st.f_flag;
    let mut out = 0;
    for (st_flag, ms) in [
        (libc::ST_RDONLY, libc::MS_RDONLY),
        (libc::ST_NOSUID, libc::MS_NOSUID),
        (libc::ST_NODEV, libc::MS_NODEV),
        (libc::ST_NOEXEC, libc::MS_NOEXEC),
        (libc::ST_NOATIME, libc::MS_NOATIME),
        (libc::ST_NODIRATIME, libc::MS_NODIRATIME),
        (libc::ST_RELATIME, libc::MS_RELATIME),
    ] {
        if f & st_flag != 0 {
            out |= ms;
        }
    }
    Ok(out)
}

/// Remount a bind mount read-only (plus nosuid,nodev), keeping the flags
/// the kernel locks for mounts inherited from the host.
fn remount_ro(path: &Path) -> Result<(), Fail> {
    let cur = current_mount_flags(path).step(&format!("statvfs {}", path.display()))?;
    sys::mount(
        None,
        path,
        None,
        cur | libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV,
        None,
    )
    .step(&format!("remounting {} read-only", path.display()))
}

fn build_root(spec: &InitSpec) -> Result<(), Fail> {
    let nr = &spec.newroot;
    sys::mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
    )
    .step("making the mount tree private")?;

    // Topmost first: agent layers, then the base root filesystem.
    let lowerdir: Vec<String> = spec
        .lower_layers
        .iter()
        .chain(std::iter::once(&spec.rootfs))
        .map(|p| p.display().to_string())
        .collect();
    let opts = format!(
        "lowerdir={},upperdir={},workdir={},userxattr",
        lowerdir.join(":"),
        spec.upper.display(),
        spec.work.display()
    );
    sys::mount(Some("overlay"), nr, Some("overlay"), 0, Some(&opts)).map_err(|e| {
        fail(
            "mounting the overlay root",
            format!(
                "{} ({opts}). overlayfs in a user namespace needs Linux >= 5.11, an upper \
                 layer on a filesystem with user xattrs (ext4, xfs, btrfs, tmpfs >= 6.6), and \
                 a lower layer that is not itself an overlay mount",
                explain(&e)
            ),
        )
    })?;

    // /proc: a new instance for the new pid namespace.
    let p = mkdir_nofollow(nr, Path::new("proc"), 0o555)?;
    sys::mount(
        Some("proc"),
        &p,
        Some("proc"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        None,
    )
    .step("mounting /proc")?;

    // /sys read-only; optional (needs a visible sysfs and our own net ns).
    let p = mkdir_nofollow(nr, Path::new("sys"), 0o555)?;
    if let Err(e) = sys::mount(
        Some("sysfs"),
        &p,
        Some("sysfs"),
        libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        None,
    ) {
        eprintln!("airlock-ns: /sys not mounted: {e}");
    }

    // /dev: a small tmpfs with the harmless host devices bound in.
    let dev = mkdir_nofollow(nr, Path::new("dev"), 0o755)?;
    sys::mount(
        Some("tmpfs"),
        &dev,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some("mode=755,size=65536k"),
    )
    .step("mounting /dev")?;
    for name in ["null", "zero", "full", "random", "urandom", "tty"] {
        let t = dev.join(name);
        File::create(&t).step(&format!("creating {}", t.display()))?;
        sys::bind(&Path::new("/dev").join(name), &t, false)
            .step(&format!("binding /dev/{name}"))?;
    }
    let pts = mkdir_nofollow(nr, Path::new("dev/pts"), 0o755)?;
    let pts_opts = if spec.full_id_map {
        "newinstance,ptmxmode=0666,mode=0620,gid=5"
    } else {
        "newinstance,ptmxmode=0666,mode=0620"
    };
    sys::mount(
        Some("devpts"),
        &pts,
        Some("devpts"),
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some(pts_opts),
    )
    .step("mounting /dev/pts")?;
    for (link, target) in [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        std::os::unix::fs::symlink(target, dev.join(link)).step(&format!("symlink /dev/{link}"))?;
    }
    let shm = mkdir_nofollow(nr, Path::new("dev/shm"), 0o1777)?;
    sys::mount(
        Some("tmpfs"),
        &shm,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV,
        Some("mode=1777"),
    )
    .step("mounting /dev/shm")?;

    // /run: fresh on every start.
    let run = mkdir_nofollow(nr, Path::new("run"), 0o755)?;
    sys::mount(
        Some("tmpfs"),
        &run,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV,
        Some("mode=755"),
    )
    .step("mounting /run")?;
    let lock = mkdir_nofollow(nr, Path::new("run/lock"), 0o1777)?;
    fs::set_permissions(&lock, fs::Permissions::from_mode(0o1777)).step("chmod /run/lock")?;
    mkdir_nofollow(nr, Path::new("run/airlock"), 0o755)?;

    // /tmp must be 1777 (it lives in the overlay).
    let tmp = mkdir_nofollow(nr, Path::new("tmp"), 0o1777)?;
    let mode = fs::metadata(&tmp).step("stat /tmp")?.permissions().mode() & 0o7777;
    if mode != 0o1777 {
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o1777)).step("chmod /tmp")?;
    }

    // The guest agent, read-only.
    let g = file_mount_point(nr, Path::new(GUEST_BINARY_PATH))?;
    sys::bind(&spec.guest_binary, &g, false).step("binding the guest binary")?;
    remount_ro(&g)?;

    if let Some(sock) = &spec.proxy_socket {
        let t = file_mount_point(nr, Path::new(PROXY_SOCKET_PATH))?;
        sys::bind(sock, &t, false).step("binding the proxy socket")?;
    }

    for (path, ro) in &spec.workspaces {
        let is_dir = fs::metadata(path)
            .step(&format!("workspace {}", path.display()))?
            .is_dir();
        let t = if is_dir {
            mkdir_nofollow(nr, path.strip_prefix("/").unwrap_or(path), 0o755)?
        } else {
            file_mount_point(nr, path)?
        };
        sys::bind(path, &t, true).step(&format!("binding workspace {}", path.display()))?;
        if *ro {
            remount_ro(&t)?;
        }
    }

    for (path, content) in &spec.extra_files {
        let parent = path.parent().unwrap_or(Path::new("/"));
        let dir = mkdir_nofollow(nr, parent.strip_prefix("/").unwrap_or(parent), 0o755)?;
        let target = dir.join(path.file_name().unwrap_or_default());
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(0o644)
            .open(&target)
            .step(&format!(
                "writing {}",
                inside(Path::new("/"), path).display()
            ))?;
        f.write_all(content)
            .step(&format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn enter_root(nr: &Path) -> Result<(), Fail> {
    std::env::set_current_dir(nr).step("chdir to the new root")?;
    sys::pivot_root_here().step("pivot_root")?;
    sys::umount_detach(Path::new(".")).step("detaching the host root")?;
    std::env::set_current_dir("/").step("chdir /")?;
    Ok(())
}

fn reset_signals() {
    // SAFETY: resetting dispositions and the mask of this single-threaded
    // process before exec; zeroed sigset is then emptied properly.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
        for sig in [libc::SIGPIPE, libc::SIGXFSZ, libc::SIGCHLD] {
            libc::signal(sig, libc::SIG_DFL);
        }
    }
}

/// Paths that get full (write) access under Landlock: every top-level entry
/// of the sandbox root except `/proc` and `/sys`, which stay read-only
/// (no writes to kernel tunables or other processes' attributes, even where
/// a mount or capability check would let one through).
///
/// Read-only workspaces are deliberately *not* expressed here: Landlock
/// grants access beneath a path, so keeping a workspace read-only would mean
/// denying file creation in every ancestor directory (`/tmp`, `/home`...),
/// which breaks ordinary programs. They are enforced by a read-only bind
/// mount that the sandbox can neither remount (no capabilities, seccomp
/// denies the mount family) nor unmount. Symlinks are skipped: a rule
/// follows them.
pub(crate) fn write_roots(
    root: &Path,
    _workspaces: &[(PathBuf, bool)],
) -> io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(root)? {
        let entry = entry?;
        let name = entry.file_name();
        if name == "proc" || name == "sys" || entry.file_type()?.is_symlink() {
            continue;
        }
        out.push(root.join(name));
    }
    out.sort();
    Ok(out)
}

fn restrict_landlock(workspaces: &[(PathBuf, bool)]) -> Result<String, Fail> {
    let abi = match sys::landlock_abi() {
        Ok(v) => v,
        Err(e) => {
            let why = if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
                "disabled at boot"
            } else {
                "not in this kernel"
            };
            eprintln!("airlock-ns: WARNING: Landlock {why}; relying on mounts and seccomp");
            return Ok(format!("unavailable ({why})"));
        }
    };
    let full = write_roots(Path::new("/"), workspaces).step("listing paths for Landlock")?;
    let all = AccessFs::from_all(LANDLOCK_ABI);
    let read = AccessFs::from_read(LANDLOCK_ABI);
    let lfail = |e: landlock::RulesetError| fail("Landlock", e.to_string());
    let status = Ruleset::default()
        .handle_access(all)
        .map_err(lfail)?
        .create()
        .map_err(lfail)?
        .add_rules(path_beneath_rules(["/"], read))
        .map_err(lfail)?
        .add_rules(path_beneath_rules(&full, all))
        .map_err(lfail)?
        .restrict_self()
        .map_err(lfail)?;
    let state = match status.ruleset {
        RulesetStatus::FullyEnforced => "fully enforced",
        RulesetStatus::PartiallyEnforced => "partially enforced",
        RulesetStatus::NotEnforced => "NOT enforced",
    };
    let ro = workspaces.iter().filter(|(_, r)| *r).count();
    Ok(format!(
        "ABI {abi} {state} ({ro} read-only workspaces, {} write roots)",
        full.len()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_roots_are_top_level_entries_but_proc_and_sys() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        for p in ["etc", "home/u/proj", "proc", "sys", "tmp"] {
            fs::create_dir_all(root.join(p)).unwrap();
        }
        std::os::unix::fs::symlink("/usr/bin", root.join("bin")).unwrap();
        let ws = vec![(PathBuf::from("/home/u/proj"), true)];
        let r = write_roots(root, &ws).unwrap();
        let rel: Vec<String> = r
            .iter()
            .map(|p| format!("/{}", p.strip_prefix(root).unwrap().display()))
            .collect();
        assert_eq!(rel, vec!["/etc", "/home", "/tmp"]);
    }
}
