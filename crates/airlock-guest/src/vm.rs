//! VM mode: the agent is the kernel's init, started from an initramfs that
//! the VM backend built (see airlock-backend `vm::initramfs`). It sets the
//! machine up (pseudo file systems, modules, root disk, workspaces), switches
//! into the root disk and then serves exec requests on AF_VSOCK instead of an
//! inherited Unix socket.
//!
//! Initramfs layout (written by the backend):
//! - `/init`: this binary;
//! - `/airlock/modules`: module file paths (in the initramfs), one a line, in
//!   load order (dependencies first);
//! - `/airlock/config.json`: the [`GuestConfig`] (from the per-launch archive);
//! - `/airlock/vm.conf`: tab-separated lines `root DEV`, `ws TAG PATH ro|rw`,
//!   `file N PATH` (content in `/airlock/files/N`), `port N`,
//!   `shutdown-port N`, `ready-port N` (host port told when we listen),
//!   `net IFNAME` (configure the NIC as the namespace backend's TAP is:
//!   10.0.2.15/24, default route via 10.0.2.2, MTU 65520, no IPv6).

use crate::log::{debug, warning};
use crate::sys::cvt;
use airlock_protocol::GuestConfig;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const CONFIG: &str = "/airlock/config.json";
const VM_CONF: &str = "/airlock/vm.conf";
const MODULES: &str = "/airlock/modules";
const DOCKER_MODULE_LIST: &str = "/airlock/modules.docker";
/// Docker's kernel modules, opened before the switch into the root disk.
static DOCKER_MODULE_FILES: std::sync::Mutex<Vec<(String, std::fs::File)>> =
    std::sync::Mutex::new(Vec::new());
const NEWROOT: &str = "/newroot";
/// Default vsock port of the control channel.
pub const CONTROL_PORT: u32 = 1024;
/// Default vsock port on which a connection asks for a clean power-off.
pub const SHUTDOWN_PORT: u32 = 1025;
/// Host vsock port (CID 2) the agent connects to once it listens, to tell
/// the backend it is ready (so the host never connects to a booting guest).
pub const READY_PORT: u32 = 1026;

/// Are we the init of an airlock VM? (PID 1, no configuration in the
/// environment, and the backend's initramfs files present.)
pub fn detect() -> bool {
    // SAFETY: getpid has no preconditions.
    let pid1 = unsafe { libc::getpid() } == 1;
    pid1 && std::env::var_os(airlock_protocol::GUEST_CONFIG_ENV).is_none()
        && Path::new(CONFIG).exists()
}

/// What `vm.conf` asks for.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct VmConf {
    pub root: Option<String>,
    pub workspaces: Vec<(String, PathBuf, bool)>,
    pub files: Vec<(String, PathBuf)>,
    pub port: Option<u32>,
    pub shutdown_port: Option<u32>,
    pub ready_port: Option<u32>,
    pub net: Option<String>,
}

pub fn parse_conf(text: &str) -> Result<VmConf, String> {
    let mut c = VmConf::default();
    for (n, line) in text.lines().enumerate() {
        let f: Vec<&str> = line.split('\t').collect();
        let bad = || format!("{VM_CONF}:{}: bad line {line:?}", n + 1);
        match f.as_slice() {
            [] | [""] => {}
            ["root", dev] => c.root = Some(dev.to_string()),
            ["ws", tag, path, mode] if path.starts_with('/') => {
                let ro = match *mode {
                    "ro" => true,
                    "rw" => false,
                    _ => return Err(bad()),
                };
                c.workspaces
                    .push((tag.to_string(), PathBuf::from(path), ro));
            }
            ["file", id, path] if path.starts_with('/') => {
                c.files.push((id.to_string(), PathBuf::from(path)))
            }
            ["port", p] => c.port = Some(p.parse().map_err(|_| bad())?),
            ["shutdown-port", p] => c.shutdown_port = Some(p.parse().map_err(|_| bad())?),
            ["ready-port", p] => c.ready_port = Some(p.parse().map_err(|_| bad())?),
            ["net", ifname] if !ifname.is_empty() && ifname.len() < libc::IFNAMSIZ => {
                c.net = Some(ifname.to_string())
            }
            _ => return Err(bad()),
        }
    }
    Ok(c)
}

fn cstr(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))
}

fn mount(
    src: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> io::Result<()> {
    let (s, t, f, d) = (cstr(src)?, cstr(target)?, cstr(fstype)?, cstr(data)?);
    // SAFETY: valid NUL-terminated strings that outlive the call.
    let r = unsafe {
        libc::mount(
            s.as_ptr(),
            t.as_ptr(),
            f.as_ptr(),
            flags,
            if data.is_empty() {
                std::ptr::null()
            } else {
                d.as_ptr().cast()
            },
        )
    };
    cvt(r)
        .map(drop)
        .map_err(|e| io::Error::new(e.kind(), format!("mount {fstype} {src} on {target}: {e}")))
}

fn load_module(path: &str) -> io::Result<()> {
    load_module_file(&std::fs::File::open(path)?)
}

fn load_module_file(f: &std::fs::File) -> io::Result<()> {
    // SAFETY: finit_module on an open fd with an empty parameter string.
    let r = unsafe { libc::syscall(libc::SYS_finit_module, f.as_raw_fd(), c"".as_ptr(), 0) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EEXIST) {
            return Err(e);
        }
    }
    Ok(())
}

fn wait_for(path: &str, timeout: Duration) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < timeout {
        if Path::new(path).exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

/// Set the VM up and switch into its root disk. Returns the configuration
/// and what vm.conf asked for. Fatal errors are returned; the caller powers
/// the machine off.
pub fn setup() -> Result<(GuestConfig, VmConf), String> {
    let _ = std::fs::create_dir_all("/proc");
    let _ = std::fs::create_dir_all("/sys");
    let _ = std::fs::create_dir_all("/dev");
    let nosuid = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    mount("proc", "/proc", "proc", nosuid, "").map_err(|e| e.to_string())?;
    mount("sysfs", "/sys", "sysfs", nosuid, "").map_err(|e| e.to_string())?;
    mount("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID, "mode=0755")
        .map_err(|e| e.to_string())?;
    // The console is /dev/console; make sure our stdio is on it.
    redirect_stdio("/dev/console");

    let t0 = Instant::now();
    let list = std::fs::read_to_string(MODULES).unwrap_or_default();
    for m in list.lines().filter(|l| !l.is_empty()) {
        if let Err(e) = load_module(m) {
            warning!("cannot load module {m}: {e}");
        }
    }
    debug!("modules loaded in {:.1?}", t0.elapsed());
    // Docker's modules: opened now (the initramfs is gone after the switch
    // into the root disk), loaded later by start_dockerd, if at all.
    let docker = std::fs::read_to_string(DOCKER_MODULE_LIST).unwrap_or_default();
    let files = docker
        .lines()
        .filter(|l| !l.is_empty())
        .filter_map(|m| std::fs::File::open(m).ok().map(|f| (m.to_string(), f)))
        .collect();
    *DOCKER_MODULE_FILES
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = files;

    let raw = std::fs::read_to_string(CONFIG).map_err(|e| format!("{CONFIG}: {e}"))?;
    let cfg: GuestConfig = serde_json::from_str(&raw)
        .map_err(|e| format!("{CONFIG} is not a valid configuration: {e}"))?;
    let conf = parse_conf(&std::fs::read_to_string(VM_CONF).unwrap_or_default())?;

    let root = conf.root.clone().unwrap_or_else(|| "/dev/vda".into());
    if !wait_for(&root, Duration::from_secs(10)) {
        return Err(format!("root disk {root} did not appear"));
    }
    std::fs::create_dir_all(NEWROOT).map_err(|e| format!("{NEWROOT}: {e}"))?;
    debug!("{root} present at {:.1?}", t0.elapsed());
    mount(&root, NEWROOT, "ext4", 0, "").map_err(|e| e.to_string())?;
    debug!("root mounted at {:.1?}", t0.elapsed());

    for (tag, path, ro) in &conf.workspaces {
        let target = format!("{NEWROOT}{}", path.display());
        std::fs::create_dir_all(&target).map_err(|e| format!("creating {target}: {e}"))?;
        let flags = if *ro { libc::MS_RDONLY } else { 0 } | libc::MS_NOSUID | libc::MS_NODEV;
        mount(tag, &target, "virtiofs", flags, "").map_err(|e| e.to_string())?;
    }
    for (id, path) in &conf.files {
        let target = format!("{NEWROOT}{}", path.display());
        if let Some(parent) = Path::new(&target).parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        if let Err(e) = std::fs::copy(format!("/airlock/files/{id}"), &target) {
            warning!("cannot write {}: {e}", path.display());
        }
    }

    // Move the pseudo file systems, then make the root disk our root.
    for d in ["/proc", "/sys", "/dev"] {
        let target = format!("{NEWROOT}{d}");
        let _ = std::fs::create_dir_all(&target);
        mount(d, &target, "", libc::MS_MOVE, "").map_err(|e| e.to_string())?;
    }
    std::env::set_current_dir(NEWROOT).map_err(|e| format!("chdir {NEWROOT}: {e}"))?;
    mount(".", "/", "", libc::MS_MOVE, "").map_err(|e| e.to_string())?;
    // SAFETY: valid C string.
    cvt(unsafe { libc::chroot(c".".as_ptr()) }).map_err(|e| format!("chroot: {e}"))?;
    std::env::set_current_dir("/").map_err(|e| format!("chdir /: {e}"))?;

    let _ = std::fs::create_dir_all("/dev/pts");
    let _ = mount(
        "devpts",
        "/dev/pts",
        "devpts",
        libc::MS_NOSUID | libc::MS_NOEXEC,
        "newinstance,ptmxmode=0666,mode=0620,gid=5",
    );
    let _ = std::os::unix::fs::symlink("pts/ptmx", "/dev/ptmx");
    let _ = std::fs::create_dir_all("/dev/shm");
    let _ = mount(
        "tmpfs",
        "/dev/shm",
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        "mode=1777",
    );
    let _ = mount(
        "tmpfs",
        "/run",
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        "mode=0755",
    );
    let _ = mount("cgroup2", "/sys/fs/cgroup", "cgroup2", nosuid, "");
    if let Some(ifname) = &conf.net {
        // Not fatal: exec still works, so the machine can be inspected.
        match configure_net(ifname) {
            Ok(()) => debug!("{ifname} configured at {:.1?}", t0.elapsed()),
            Err(e) => warning!("cannot configure {ifname}: {e}"),
        }
    }
    Ok((cfg, conf))
}

/// The guest network, as `airlock_backend::net` sets the namespace
/// backend's TAP up (the user-space stack in the supervisor expects it).
const NET_ADDR: [u8; 4] = [10, 0, 2, 15];
const NET_MASK: [u8; 4] = [255, 255, 255, 0];
const NET_GATEWAY: [u8; 4] = [10, 0, 2, 2];
const NET_MTU: i32 = 65520;

fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain data.
    let mut r: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, c) in r.ifr_name.iter_mut().zip(name.bytes()) {
        *d = c as libc::c_char;
    }
    r
}

fn sockaddr_in(a: [u8; 4]) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(a),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr are both 16 bytes of plain data.
    unsafe { std::mem::transmute(sin) }
}

/// Wait for `ifname` (the driver probes the device when its module loads),
/// then: MTU, address, netmask, IPv6 off, up, default route.
fn configure_net(ifname: &str) -> Result<(), String> {
    let sys = format!("/sys/class/net/{ifname}");
    if !wait_for(&sys, Duration::from_secs(5)) {
        return Err(format!("{sys} did not appear"));
    }
    // SAFETY: plain socket creation.
    let s = cvt(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })
        .map_err(|e| format!("socket: {e}"))?;
    // SAFETY: socket succeeded; we own the fd.
    let sock = unsafe { OwnedFd::from_raw_fd(s) };
    let fd = sock.as_raw_fd();
    let ioc = |what: &str, req: libc::c_ulong, r: &mut libc::ifreq| {
        // SAFETY: these ioctls read/write the `struct ifreq` we pass.
        cvt(unsafe { libc::ioctl(fd, req as _, r as *mut libc::ifreq) })
            .map(drop)
            .map_err(|e| format!("{what}: {e}"))
    };
    let mut r = ifreq(ifname);
    r.ifr_ifru.ifru_mtu = NET_MTU;
    ioc("setting the MTU", libc::SIOCSIFMTU, &mut r)?;
    let mut r = ifreq(ifname);
    r.ifr_ifru.ifru_addr = sockaddr_in(NET_ADDR);
    ioc("setting the address", libc::SIOCSIFADDR, &mut r)?;
    let mut r = ifreq(ifname);
    r.ifr_ifru.ifru_netmask = sockaddr_in(NET_MASK);
    ioc("setting the netmask", libc::SIOCSIFNETMASK, &mut r)?;
    // No IPv6 at all (the stack drops it anyway); best effort.
    let _ = std::fs::write(
        format!("/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6"),
        "1",
    );
    let mut r = ifreq(ifname);
    ioc("reading the flags", libc::SIOCGIFFLAGS, &mut r)?;
    // SAFETY: after SIOCGIFFLAGS the flags member is the live one.
    let flags = unsafe { r.ifr_ifru.ifru_flags } | (libc::IFF_UP | libc::IFF_RUNNING) as i16;
    r.ifr_ifru.ifru_flags = flags;
    ioc("bringing it up", libc::SIOCSIFFLAGS, &mut r)?;
    // SAFETY: rtentry is plain data (null pointers are valid for it).
    let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
    rt.rt_dst = sockaddr_in([0; 4]);
    rt.rt_genmask = sockaddr_in([0; 4]);
    rt.rt_gateway = sockaddr_in(NET_GATEWAY);
    rt.rt_flags = (libc::RTF_UP | libc::RTF_GATEWAY) as libc::c_ushort;
    // SAFETY: SIOCADDRT reads the `struct rtentry` we pass; rt_dev is null.
    cvt(unsafe { libc::ioctl(fd, libc::SIOCADDRT as _, &mut rt as *mut libc::rtentry) })
        .map(drop)
        .map_err(|e| format!("adding the default route via 10.0.2.2: {e}"))
}

fn redirect_stdio(path: &str) {
    let Ok(c) = cstr(path) else { return };
    // SAFETY: valid C string.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDWR | libc::O_NOCTTY) };
    if fd < 0 {
        return;
    }
    for t in 0..3 {
        // SAFETY: dup2 onto the standard descriptors.
        unsafe { libc::dup2(fd, t) };
    }
    if fd > 2 {
        // SAFETY: fd is ours.
        unsafe { libc::close(fd) };
    }
}

/// A listening AF_VSOCK socket on `port` (any CID).
pub fn vsock_listen(port: u32) -> io::Result<OwnedFd> {
    // SAFETY: plain socket creation.
    let s =
        cvt(unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: we own the new fd.
    let sock = unsafe { OwnedFd::from_raw_fd(s) };
    // SAFETY: sockaddr_vm is plain data.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_port = port;
    addr.svm_cid = libc::VMADDR_CID_ANY;
    // SAFETY: pointer and length describe `addr`.
    cvt(unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&addr as *const libc::sockaddr_vm).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    })?;
    // SAFETY: listen on our socket.
    cvt(unsafe { libc::listen(sock.as_raw_fd(), 128) })?;
    Ok(sock)
}

/// Tell the host we are ready: connect to its vsock `port` and say so.
pub fn notify_ready(port: u32) -> io::Result<()> {
    // SAFETY: plain socket creation.
    let s =
        cvt(unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: we own the new fd.
    let sock = unsafe { OwnedFd::from_raw_fd(s) };
    // SAFETY: sockaddr_vm is plain data.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_port = port;
    addr.svm_cid = libc::VMADDR_CID_HOST;
    // SAFETY: pointer and length describe `addr`.
    cvt(unsafe {
        libc::connect(
            sock.as_raw_fd(),
            (&addr as *const libc::sockaddr_vm).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    })?;
    let mut f = std::fs::File::from(sock);
    std::io::Write::write_all(&mut f, b"ready\n")
}

/// Accept one connection on a listening socket of any family. The stream
/// is returned as a `UnixStream`: the exec code only reads, writes, sets
/// timeouts and non-blocking mode, which work the same on AF_VSOCK.
pub fn accept(listener: RawFd) -> io::Result<UnixStream> {
    // SAFETY: accept4 with null address pointers is allowed.
    let fd = cvt(unsafe {
        libc::accept4(
            listener,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC,
        )
    })?;
    // SAFETY: accept4 returned a new fd that we own.
    Ok(unsafe { UnixStream::from_raw_fd(fd) })
}

/// Where the template's Docker daemon may be.
const DOCKERD: &[&str] = &["/usr/sbin/dockerd", "/usr/bin/dockerd"];
/// The daemon's log inside the VM.
pub const DOCKERD_LOG: &str = "/var/log/dockerd.log";

/// Start the template's Docker daemon, if it has one, in the background
/// (it never delays readiness; `docker` clients wait for its socket). The
/// VM is the daemon's boundary: its images and containers live on this
/// sandbox's root disk only. With Docker's kernel modules loaded it gets its
/// default bridge network and iptables NAT (containers' traffic leaves
/// through eth0, i.e. airlock's egress path); if they cannot be loaded, or
/// dockerd dies before it listens, it is restarted with
/// `--iptables=false --bridge=none` (containers: `--network none` or `host`).
pub fn start_dockerd() {
    let Some(bin) = DOCKERD.iter().find(|p| Path::new(p).is_file()) else {
        return;
    };
    let r = std::thread::Builder::new()
        .name("dockerd".into())
        .stack_size(128 * 1024)
        .spawn(move || {
            let mods = std::mem::take(
                &mut *DOCKER_MODULE_FILES
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
            );
            let mut bridged = !mods.is_empty();
            for (m, f) in &mods {
                if let Err(e) = load_module_file(f) {
                    warning!("cannot load module {m}: {e}; dockerd without bridge/iptables");
                    bridged = false;
                    break;
                }
            }
            drop(mods);
            if bridged {
                match spawn_dockerd(bin, &[]) {
                    Some(pid) if dockerd_listens(pid) => return,
                    Some(_) => warning!(
                        "dockerd exited before listening (see {DOCKERD_LOG}); \
                         restarting it without bridge/iptables"
                    ),
                    None => return,
                }
            }
            spawn_dockerd(
                bin,
                &["--iptables=false", "--ip6tables=false", "--bridge=none"],
            );
        });
    if let Err(e) = r {
        warning!("cannot start the dockerd thread: {e}");
    }
}

/// Wait until dockerd's socket exists (true) or the process is gone.
fn dockerd_listens(pid: u32) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(120) {
        if Path::new("/var/run/docker.sock").exists() {
            return true;
        }
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat.rsplit(')').next().unwrap_or("").trim_start();
        if stat.is_empty() || state.starts_with('Z') {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    true
}

fn spawn_dockerd(bin: &str, extra: &[&str]) -> Option<u32> {
    let log = match std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(DOCKERD_LOG)
    {
        Ok(f) => f,
        Err(e) => {
            warning!("cannot open {DOCKERD_LOG}: {e}; not starting dockerd");
            return None;
        }
    };
    let (Ok(out), Ok(err)) = (log.try_clone(), log.try_clone()) else {
        return None;
    };
    let mut cmd = std::process::Command::new(bin);
    cmd.args(["--storage-driver=overlay2"])
        .args(extra)
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .stdin(std::process::Stdio::null())
        .stdout(out)
        .stderr(err);
    // SAFETY: setsid is async-signal-safe.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            libc::setsid();
            Ok(())
        });
    }
    // The reaper collects it when it exits; nobody waits for it here.
    match cmd.spawn() {
        Ok(c) => {
            debug!("started {bin} {extra:?} (pid {})", c.id());
            Some(c.id())
        }
        Err(e) => {
            warning!("cannot start {bin}: {e}");
            None
        }
    }
}

/// Power the machine off after syncing (VM mode's end of `shutdown`).
pub fn power_off() -> ! {
    // SAFETY: sync and reboot have no memory-safety preconditions.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_POWER_OFF);
    }
    std::process::exit(0)
}

/// Serve the shutdown port: any connection (only the host can connect to
/// the guest's vsock ports) asks for a clean shutdown.
pub fn start_shutdown_listener(port: u32) -> io::Result<()> {
    let l = vsock_listen(port)?;
    std::thread::Builder::new()
        .name("vm-shutdown".into())
        .stack_size(64 * 1024)
        .spawn(move || loop {
            if accept(l.as_raw_fd()).is_ok() {
                crate::reaper::request_shutdown();
                return;
            }
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conf_parses() {
        let c = parse_conf(
            "root\t/dev/vda\nnet\teth0\nws\tws0\t/home/u/p\trw\nws\tws1\t/data\tro\nfile\t0\t/etc/x\nport\t1024\n\n",
        )
            .unwrap();
        assert_eq!(c.root.as_deref(), Some("/dev/vda"));
        assert_eq!(
            c.workspaces,
            vec![
                ("ws0".into(), PathBuf::from("/home/u/p"), false),
                ("ws1".into(), PathBuf::from("/data"), true)
            ]
        );
        assert_eq!(c.files, vec![("0".into(), PathBuf::from("/etc/x"))]);
        assert_eq!(c.port, Some(1024));
        assert_eq!(c.net.as_deref(), Some("eth0"));
        assert!(parse_conf("net\t").is_err());
        assert!(parse_conf("ws\ta\trel\trw").is_err());
        assert!(parse_conf("ws\ta\t/x\tmaybe").is_err());
        assert!(parse_conf("bogus").is_err());
    }
}
