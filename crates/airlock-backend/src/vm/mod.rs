//! The microVM backend: one QEMU `microvm` per sandbox.
//!
//! Per sandbox the backend starts, all as children of one long-lived
//! "vm-owner" thread (so `PR_SET_PDEATHSIG` kills them with the supervisor):
//! - `vhost-device-vsock` (the control channel: vsock in the guest, a Unix
//!   socket on the host, see [`relay`]);
//! - one `virtiofsd` per workspace (`--readonly` for `:ro`, enforced on the
//!   host side);
//! - QEMU: `-M microvm,acpi=on`, qboot, the Debian cloud kernel as a PVH
//!   vmlinux, an initramfs that airlock builds ([`initramfs`]) with the
//!   static guest agent as `/init`, the root disk as a qcow2 overlay
//!   (`disk`) over a shared ext4 image of the template, and, with
//!   [`NetworkMode::Tap`] ([`VmBackend::with_network`]), one virtio-net NIC
//!   on `-netdev stream` over an inherited `AF_UNIX` `SOCK_STREAM` socketpair
//!   whose other end [`Instance::take_network`] hands out
//!   ([`crate::LinkKind::Stream`]); nothing else (no slirp, no TAP on the host).
//!
//! Connections to `spec.control_fd` are relayed to the agent's vsock port
//! 1024. `terminate` asks the agent for a clean power-off over vsock port
//! 1025 (it syncs the disk), then kills QEMU after the grace period.
//!
//! Host prerequisites: `scripts/vm-deps.sh`. Caches live in
//! [`VmConfig::cache_dir`] (default `/var/cache/airlock/vm`,
//! `$AIRLOCK_VM_CACHE`): `kernel/` (from vm-deps.sh), `initramfs/`,
//! `rootfs/` (one ext4 image per template), `accel` (probe result).

pub mod cpio;
mod disk;
pub mod initramfs;
pub mod relay;

use crate::{
    Backend, BackendError, BackendKind, Instance, LaunchSpec, LinkKind, NetworkMode, ProbeReport,
};
use std::fs;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// vsock port of the guest agent's control channel.
pub const CONTROL_PORT: u32 = 1024;
/// vsock port on which a connection asks the agent to power off cleanly.
pub const SHUTDOWN_PORT: u32 = 1025;
/// Host vsock port the agent connects to when it is ready.
pub const READY_PORT: u32 = 1026;
/// Guest CID (each sandbox has its own vhost-device-vsock, so CIDs never
/// meet).
const GUEST_CID: u32 = 3;

/// Which accelerator QEMU uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// Where the VM backend finds its tools and keeps its caches.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub cache_dir: PathBuf,
    /// Directory with `vmlinux`, `modules/`, `config`, `version`.
    pub kernel_dir: PathBuf,
    pub qemu: PathBuf,
    pub firmware: PathBuf,
    pub virtiofsd: PathBuf,
    pub vsock_daemon: PathBuf,
    pub memory_mib: u32,
    pub cpus: u32,
    /// Force an accelerator instead of probing (`$AIRLOCK_VM_ACCEL`).
    pub accel: Option<Accel>,
    /// Also mount `:ro` workspaces read-only inside (default). virtiofsd
    /// `--readonly` enforces `:ro` on the host side regardless; tests turn
    /// this off to show that.
    pub guest_ro_mounts: bool,
}

impl Default for VmConfig {
    fn default() -> Self {
        let cache_dir = std::env::var_os("AIRLOCK_VM_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/var/cache/airlock/vm"));
        let accel = match std::env::var("AIRLOCK_VM_ACCEL").as_deref() {
            Ok("kvm") => Some(Accel::Kvm),
            Ok("tcg") => Some(Accel::Tcg),
            _ => None,
        };
        VmConfig {
            kernel_dir: cache_dir.join("kernel"),
            cache_dir,
            qemu: find_tool("qemu-system-x86_64"),
            firmware: PathBuf::from("/usr/share/qemu/qboot.rom"),
            virtiofsd: find_tool("virtiofsd"),
            vsock_daemon: find_tool("vhost-device-vsock"),
            memory_mib: 1024,
            cpus: 2,
            accel,
            guest_ro_mounts: true,
        }
    }
}

/// `name` in `$PATH`, else in root's and the invoker's cargo bin directory,
/// else the bare name (the launch then fails with a clear error).
fn find_tool(name: &str) -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(h) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(h).join(".cargo/bin"));
    }
    dirs.push(PathBuf::from("/root/.cargo/bin"));
    dirs.push(PathBuf::from("/usr/local/bin"));
    dirs.into_iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// The microVM backend. See the module documentation.
#[derive(Debug, Clone, Default)]
pub struct VmBackend {
    cfg: VmConfig,
    network: NetworkMode,
}

impl VmBackend {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with_config(cfg: VmConfig) -> Self {
        VmBackend {
            cfg,
            network: NetworkMode::Loopback,
        }
    }

    /// The sandboxes' network: [`NetworkMode::Loopback`] (default: no NIC at
    /// all) or [`NetworkMode::Tap`] (a virtio-net NIC whose frames come out
    /// of the socket [`Instance::take_network`] returns, as
    /// [`LinkKind::Stream`]; the guest configures it like the namespace
    /// backend's TAP: 10.0.2.15/24 via 10.0.2.2, MTU 65520, no IPv6).
    pub fn with_network(mut self, mode: NetworkMode) -> Self {
        self.network = mode;
        self
    }

    pub fn config(&self) -> &VmConfig {
        &self.cfg
    }

    fn missing(&self) -> Vec<String> {
        let mut out = Vec::new();
        let c = &self.cfg;
        for (what, p) in [
            ("qemu-system-x86_64", &c.qemu),
            ("qboot firmware", &c.firmware),
            ("virtiofsd", &c.virtiofsd),
            ("vhost-device-vsock", &c.vsock_daemon),
        ] {
            if !p.is_file() {
                out.push(format!("{what}: not found ({})", p.display()));
            }
        }
        let k = c.kernel_dir.join("vmlinux");
        if !k.is_file() {
            out.push(format!("guest kernel: not found ({})", k.display()));
        }
        out
    }

    /// The accelerator that works on this host: the cached probe result, or
    /// a fresh probe (boots the kernel without a root file system, once).
    pub fn accel(&self) -> Result<(Accel, String), BackendError> {
        if let Some(a) = self.cfg.accel {
            return Ok((a, "forced by $AIRLOCK_VM_ACCEL".into()));
        }
        let kver = kernel_version(&self.cfg.kernel_dir);
        let cache = self.cfg.cache_dir.join("accel");
        if let Ok(s) = fs::read_to_string(&cache) {
            let mut l = s.lines();
            if let (Some(v), Some(a), Some(why)) = (l.next(), l.next(), l.next()) {
                if v == kver {
                    let a = if a == "kvm" { Accel::Kvm } else { Accel::Tcg };
                    return Ok((a, format!("{why} (cached in {})", cache.display())));
                }
            }
        }
        let (a, why) = self.probe_accel();
        let _ = fs::create_dir_all(&self.cfg.cache_dir);
        let _ = fs::write(&cache, format!("{kver}\n{}\n{why}\n", a.as_str()));
        Ok((a, why))
    }

    fn probe_accel(&self) -> (Accel, String) {
        let kvm = Path::new("/dev/kvm");
        if fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(kvm)
            .is_err()
        {
            return (
                Accel::Tcg,
                "/dev/kvm cannot be opened: TCG (software emulation)".into(),
            );
        }
        // /dev/kvm opens, but paravirtual KVMs (kvm-pvm) cannot boot stock
        // kernels: boot ours without a root file system; it must reach the
        // "VFS: Unable to mount root" panic (then -no-reboot exits QEMU).
        let t0 = Instant::now();
        let log = self.cfg.cache_dir.join("accel-probe.log");
        let _ = fs::create_dir_all(&self.cfg.cache_dir);
        let mut cmd = Command::new(&self.cfg.qemu);
        cmd.args([
            "-M",
            "microvm,acpi=on",
            "-accel",
            "kvm",
            "-cpu",
            "host",
            "-m",
            "256",
        ])
        .arg("-bios")
        .arg(&self.cfg.firmware)
        .arg("-kernel")
        .arg(self.cfg.kernel_dir.join("vmlinux"))
        .args(["-append", "console=ttyS0 panic=-1 reboot=t"])
        .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
        .arg("-serial")
        .arg(format!("file:{}", log.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                return (
                    Accel::Tcg,
                    format!("cannot run QEMU for the KVM probe ({e}): TCG"),
                )
            }
        };
        let limit = Duration::from_secs(10);
        let status = loop {
            match child.try_wait() {
                Ok(Some(s)) => break Some(s),
                Ok(None) if t0.elapsed() < limit => std::thread::sleep(Duration::from_millis(50)),
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break None;
                }
            }
        };
        let mut stderr = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut stderr);
        }
        let console = fs::read_to_string(&log).unwrap_or_default();
        if status.is_some() && console.contains("Unable to mount root") {
            (
                Accel::Kvm,
                format!("KVM boots the guest kernel (probe: {:.1?})", t0.elapsed()),
            )
        } else {
            let why = match status {
                None => format!("did not finish in {limit:?}"),
                Some(s) => format!(
                    "exited with {s} before the kernel ran ({})",
                    stderr.lines().next().unwrap_or("no message").trim()
                ),
            };
            (
                Accel::Tcg,
                format!(
                    "/dev/kvm opens but a KVM boot probe {why} (paravirtual KVM?): TCG \
                     (software emulation)"
                ),
            )
        }
    }
}

fn kernel_version(kdir: &Path) -> String {
    fs::read_to_string(kdir.join("version"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

impl Backend for VmBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Vm
    }

    fn probe(&self) -> Result<ProbeReport, BackendError> {
        let missing = self.missing();
        let mut details = Vec::new();
        if !missing.is_empty() {
            details.extend(missing);
            details.push("install the VM tools with scripts/vm-deps.sh".into());
            return Ok(ProbeReport { ok: false, details });
        }
        let (a, why) = self.accel()?;
        details.push(format!("acceleration: {} — {why}", a.as_str()));
        details.push(format!(
            "kernel: {} ({})",
            kernel_version(&self.cfg.kernel_dir),
            self.cfg.kernel_dir.display()
        ));
        details.push(format!("qemu: {}", self.cfg.qemu.display()));
        Ok(ProbeReport { ok: true, details })
    }

    fn launch(&self, spec: LaunchSpec) -> Result<Box<dyn Instance>, BackendError> {
        launch(&self.cfg, self.network, spec).map(|i| Box::new(i) as Box<dyn Instance>)
    }
}

/// The QEMU command of a sandbox without its devices: machine, accelerator,
/// memory (memfd, shared with the vhost-user daemons), qboot, kernel,
/// `initrd`, kernel command line, serial console on stdout. Also the floor
/// of the boot benchmark (with an init that powers off at once).
pub fn qemu_command(cfg: &VmConfig, accel: Accel, initrd: &Path) -> Command {
    let mem = cfg.memory_mib;
    let mut append = String::from(
        "console=ttyS0 quiet loglevel=3 panic=-1 reboot=t rdinit=/init airlock.vm \
         i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd random.trust_cpu=on",
    );
    if std::env::var_os("AIRLOCK_VM_GUEST_DEBUG").is_some_and(|v| v == "1") {
        // Unknown `key=value` parameters reach init's environment.
        append.push_str(" AIRLOCK_GUEST_DEBUG=1");
    }
    if accel == Accel::Tcg {
        if let Some(k) = tsc_khz() {
            append.push_str(&format!(" tsc_early_khz={k}"));
        }
    }
    let mut q = Command::new(&cfg.qemu);
    q.args([
        "-M",
        "microvm,acpi=on,pit=off,pic=off,rtc=on,memory-backend=mem",
    ])
    .args(["-accel", accel.as_str()])
    .args(["-cpu", if accel == Accel::Kvm { "host" } else { "max" }])
    .args(["-m", &format!("{mem}M"), "-smp", &cfg.cpus.to_string()])
    .args([
        "-object",
        &format!("memory-backend-memfd,id=mem,size={mem}M,share=on"),
    ])
    .arg("-bios")
    .arg(&cfg.firmware)
    .arg("-kernel")
    .arg(cfg.kernel_dir.join("vmlinux"))
    .arg("-initrd")
    .arg(initrd)
    .arg("-append")
    .arg(&append)
    .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
    .args(["-serial", "stdio"]);
    q
}

/// Run a host tool to completion; its stderr goes into the error.
fn run_tool(cmd: &mut Command, step: &'static str) -> Result<(), BackendError> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| BackendError::Sys { step, source })?;
    if out.status.success() {
        return Ok(());
    }
    Err(BackendError::Sys {
        step,
        source: std::io::Error::other(format!(
            "{:?} failed ({}): {}",
            cmd.get_program(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
    })
}

/// FNV-1a, 64 bit: stable cache keys (not a security boundary).
pub(crate) fn fnv64(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// An exclusive `flock` on a file, released on drop (cache builds by
/// concurrent launches).
pub(crate) struct Lock(#[allow(dead_code)] fs::File);

impl Lock {
    pub(crate) fn take(path: &Path) -> Result<Lock, BackendError> {
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(|source| BackendError::Io {
                step: "opening a cache lock",
                path: path.to_path_buf(),
                source,
            })?;
        // SAFETY: flock on an fd we own.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } < 0 {
            return Err(BackendError::Sys {
                step: "locking the cache",
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(Lock(f))
    }
}

/// The guest's TSC frequency under TCG is the host's; the kernel's early
/// calibration can hang without it.
fn tsc_khz() -> Option<u64> {
    let s = fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: f64 = s
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    Some((mhz * 1000.0) as u64)
}

struct Files {
    vsock_sock: PathBuf,
    vsock_uds: PathBuf,
    fs_socks: Vec<PathBuf>,
    initrd: PathBuf,
}

/// A connected `AF_UNIX` `SOCK_STREAM` pair (close-on-exec).
fn stream_pair() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: fds is a valid array of two ints.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: two fresh descriptors we now own.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn launch(
    cfg: &VmConfig,
    network: NetworkMode,
    spec: LaunchSpec,
) -> Result<VmInstance, BackendError> {
    let name = spec.name.clone();
    let setup = |step: &str, message: String| BackendError::Setup {
        name: name.clone(),
        step: step.into(),
        message,
    };
    let missing = VmBackend::with_config(cfg.clone()).missing();
    if !missing.is_empty() {
        return Err(setup(
            "checking the VM tools",
            format!(
                "{}; install them with scripts/vm-deps.sh",
                missing.join("; ")
            ),
        ));
    }
    for w in &spec.workspaces {
        let p = w.path.to_string_lossy();
        if !w.path.is_absolute() || p.contains(['\t', '\n']) {
            return Err(BackendError::InvalidSpec(format!(
                "workspace path {p:?} must be absolute and free of tabs and newlines"
            )));
        }
    }
    let (accel, _) = VmBackend::with_config(cfg.clone()).accel()?;
    let run = spec.run_dir.join("vm");
    let _ = fs::remove_dir_all(&run);
    fs::create_dir_all(&run).map_err(|source| BackendError::Io {
        step: "creating the VM run directory",
        path: run.clone(),
        source,
    })?;

    // Initramfs: the cached base (agent + modules) + this launch's config.
    let base = initramfs::base(&cfg.cache_dir, &cfg.kernel_dir, &spec.guest_binary)?;
    let files = Files {
        vsock_sock: run.join("vsock.sock"),
        vsock_uds: run.join("vsock.uds"),
        fs_socks: (0..spec.workspaces.len())
            .map(|i| run.join(format!("fs{i}.sock")))
            .collect(),
        initrd: run.join("initrd.cpio"),
    };
    let net = network == NetworkMode::Tap;
    initramfs::per_launch(&base, &files.initrd, &spec, cfg.guest_ro_mounts, net)?;

    // Root disk.
    let image = disk::base_image(&cfg.cache_dir, &spec.rootfs)?;
    let overlay = disk::overlay(&spec.layer_dir, &image)?;

    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&spec.console_log)
        .map_err(|source| BackendError::Io {
            step: "opening the console log",
            path: spec.console_log.clone(),
            source,
        })?;

    // Commands.
    let mut daemons = Vec::new();
    let mut vsock = Command::new(&cfg.vsock_daemon);
    vsock
        .arg("--guest-cid")
        .arg(GUEST_CID.to_string())
        .arg("--socket")
        .arg(&files.vsock_sock)
        .arg("--uds-path")
        .arg(&files.vsock_uds);
    daemons.push((vsock, files.vsock_sock.clone()));
    for (w, sock) in spec.workspaces.iter().zip(&files.fs_socks) {
        let mut v = Command::new(&cfg.virtiofsd);
        v.arg("--shared-dir")
            .arg(&w.path)
            .arg("--socket-path")
            .arg(sock)
            .args([
                "--sandbox",
                "namespace",
                "--cache",
                "auto",
                "--log-level",
                "error",
            ]);
        if w.read_only {
            v.arg("--readonly");
        }
        daemons.push((v, sock.clone()));
    }

    let mut q = qemu_command(cfg, accel, &files.initrd);
    q.arg("-drive")
        .arg(format!(
            "id=root,file={},format=qcow2,if=none,cache=writeback,discard=unmap",
            overlay.display()
        ))
        .args(["-device", "virtio-blk-device,drive=root"])
        .args(["-chardev"])
        .arg(format!(
            "socket,id=vsock,path={}",
            files.vsock_sock.display()
        ))
        .args(["-device", "vhost-user-vsock-device,chardev=vsock"]);
    for (i, sock) in files.fs_socks.iter().enumerate() {
        q.arg("-chardev")
            .arg(format!("socket,id=fs{i},path={}", sock.display()))
            .arg("-device")
            .arg(format!("vhost-user-fs-device,chardev=fs{i},tag=ws{i}"));
    }
    // The NIC: QEMU's end of a socketpair, inherited (its number stays the
    // same in the child: only close-on-exec is cleared there).
    let (net_host, net_qemu) = if net {
        let (h, g) = stream_pair().map_err(|source| BackendError::Sys {
            step: "creating the network socket pair",
            source,
        })?;
        let raw = g.as_raw_fd();
        q.arg("-netdev")
            .arg(format!(
                "stream,id=n0,server=off,addr.type=fd,addr.str={raw}"
            ))
            .args(["-device", "virtio-net-device,netdev=n0"]);
        // SAFETY: fcntl on a descriptor that stays open until after the
        // spawn (the owner thread holds `g`); async-signal-safe.
        unsafe {
            q.pre_exec(move || {
                if libc::fcntl(raw, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        (Some(h), Some(g))
    } else {
        (None, None)
    };

    let listener = UnixListener::from(spec.control_fd);
    // Set when QEMU has exited (the relay stops waiting for the guest) or
    // the instance is being cleaned up.
    let stop = Arc::new(AtomicBool::new(false));
    let ready = Arc::new(relay::Ready::default());
    let ready_path = PathBuf::from(format!("{}_{READY_PORT}", files.vsock_uds.display()));
    let ready_l = UnixListener::bind(&ready_path).map_err(|source| BackendError::Io {
        step: "binding the readiness socket",
        path: ready_path.clone(),
        source,
    })?;
    let ready_l2 = ready_l.try_clone().map_err(|source| BackendError::Sys {
        step: "sharing the readiness socket",
        source,
    })?;
    {
        let (ready, stop) = (ready.clone(), stop.clone());
        std::thread::Builder::new()
            .name("vm-ready".into())
            .spawn(move || relay::await_ready(ready_l2, ready, stop))
            .map_err(|source| BackendError::Sys {
                step: "starting the readiness listener",
                source,
            })?;
    }
    let owner = match Owner::start(daemons, q, net_qemu, log, name.clone(), stop.clone()) {
        Ok(o) => o,
        Err(e) => {
            stop.store(true, Ordering::SeqCst);
            // SAFETY: shutdown on a listening socket we own wakes accept().
            unsafe { libc::shutdown(ready_l.as_raw_fd(), libc::SHUT_RDWR) };
            let _ = fs::remove_dir_all(&run);
            return Err(e);
        }
    };
    let relay = {
        let l = listener.try_clone().map_err(|source| BackendError::Sys {
            step: "sharing the control socket",
            source,
        })?;
        let uds = files.vsock_uds.clone();
        let (ready, stop) = (ready.clone(), stop.clone());
        std::thread::Builder::new()
            .name("vm-control".into())
            .spawn(move || relay::serve(l, uds, CONTROL_PORT, ready, stop))
            .map_err(|source| BackendError::Sys {
                step: "starting the control relay",
                source,
            })?
    };
    Ok(VmInstance {
        owner,
        listener: Some(listener),
        ready_listener: Some(ready_l),
        ready,
        relay: Some(relay),
        stop,
        run_dir: run,
        vsock_uds: files.vsock_uds,
        network: net_host,
    })
}

/// State shared with the owner thread.
#[derive(Default)]
struct OwnerState {
    qemu_pid: u32,
    /// QEMU has exited (possibly not yet reaped: its pid stays reserved
    /// until `status` is set).
    exited: bool,
    status: Option<ExitStatus>,
    error: Option<String>,
}

/// The thread that spawned (and so, through PDEATHSIG, owns) the processes
/// of one VM; it lives until QEMU has exited and the daemons are gone.
struct Owner {
    state: Arc<(Mutex<OwnerState>, Condvar)>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Owner {
    fn start(
        daemons: Vec<(Command, PathBuf)>,
        qemu: Command,
        qemu_fd: Option<OwnedFd>,
        log: fs::File,
        name: String,
        gone: Arc<AtomicBool>,
    ) -> Result<Owner, BackendError> {
        let state: Arc<(Mutex<OwnerState>, Condvar)> = Arc::default();
        let st = state.clone();
        std::thread::Builder::new()
            .name("vm-owner".into())
            .spawn(move || owner_main(daemons, qemu, qemu_fd, log, st, gone))
            .map_err(|source| BackendError::Sys {
                step: "starting the VM owner thread",
                source,
            })?;
        // Wait until QEMU runs (or the start failed).
        let (m, cv) = &*state;
        let mut g = lock(m);
        while g.qemu_pid == 0 && g.error.is_none() {
            g = cv.wait(g).unwrap_or_else(PoisonError::into_inner);
        }
        if let Some(e) = g.error.take() {
            return Err(BackendError::Setup {
                name,
                step: "starting the VM".into(),
                message: e,
            });
        }
        drop(g);
        Ok(Owner { state })
    }
}

fn spawn_owned(cmd: &mut Command, log: &fs::File) -> std::io::Result<Child> {
    let (out, err) = (log.try_clone()?, log.try_clone()?);
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    // SAFETY: the closure only makes async-signal-safe syscalls.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Own process group: a ^C on the supervisor's terminal is the
            // supervisor's business.
            libc::setpgid(0, 0);
            Ok(())
        });
    }
    cmd.spawn()
}

fn stop_child(c: &mut Child, grace: Duration) {
    if let Ok(Some(_)) = c.try_wait() {
        return;
    }
    // SAFETY: kill on our own child's pid (not yet reaped, so not reused).
    unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
    let t0 = Instant::now();
    while t0.elapsed() < grace {
        if let Ok(Some(_)) = c.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = c.kill();
    let _ = c.wait();
}

fn owner_main(
    daemons: Vec<(Command, PathBuf)>,
    mut qemu: Command,
    qemu_fd: Option<OwnedFd>,
    log: fs::File,
    state: Arc<(Mutex<OwnerState>, Condvar)>,
    gone: Arc<AtomicBool>,
) {
    let (m, cv) = &*state;
    let fail = |msg: String| {
        lock(m).error = Some(msg);
        cv.notify_all();
    };
    let mut children: Vec<Child> = Vec::new();
    let kill_all = |children: &mut Vec<Child>| {
        for c in children.iter_mut() {
            stop_child(c, Duration::from_millis(500));
        }
    };
    for (mut cmd, sock) in daemons {
        let prog = cmd.get_program().to_string_lossy().into_owned();
        match spawn_owned(&mut cmd, &log) {
            Ok(c) => children.push(c),
            Err(e) => {
                kill_all(&mut children);
                return fail(format!("cannot start {prog}: {e}"));
            }
        }
        // The daemon's socket must exist before QEMU connects.
        let t0 = Instant::now();
        while !sock.exists() {
            let exited = children
                .last_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if exited.is_some() || t0.elapsed() > Duration::from_secs(10) {
                kill_all(&mut children);
                return fail(format!(
                    "{prog} did not create {} ({}); see the console log",
                    sock.display(),
                    exited.map_or("timeout".to_string(), |s| s.to_string())
                ));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    let spawned = spawn_owned(&mut qemu, &log);
    // QEMU has its copy now (or failed): ours must go, so that the
    // supervisor's end sees EOF when QEMU exits.
    drop(qemu_fd);
    let mut q = match spawned {
        Ok(q) => q,
        Err(e) => {
            kill_all(&mut children);
            return fail(format!("cannot start {:?}: {e}", qemu.get_program()));
        }
    };
    lock(m).qemu_pid = q.id();
    cv.notify_all();
    // Wait without reaping first, so `terminate` never signals a reused pid.
    // SAFETY: siginfo_t is plain data filled by waitid.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer; WNOWAIT leaves the child to be reaped below.
    while unsafe {
        libc::waitid(
            libc::P_PID,
            q.id(),
            &mut info,
            libc::WEXITED | libc::WNOWAIT,
        )
    } < 0
        && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR)
    {}
    lock(m).exited = true;
    gone.store(true, Ordering::SeqCst);
    let status = q.wait().unwrap_or_else(|_| ExitStatus::from_raw(0x7f00));
    kill_all(&mut children);
    let mut logw = &log;
    let _ = writeln!(logw, "airlock: QEMU exited ({status})");
    lock(m).status = Some(status);
    cv.notify_all();
}

/// A running VM sandbox.
pub struct VmInstance {
    owner: Owner,
    listener: Option<UnixListener>,
    ready_listener: Option<UnixListener>,
    ready: Arc<relay::Ready>,
    relay: Option<std::thread::JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    run_dir: PathBuf,
    vsock_uds: PathBuf,
    /// The host end of the NIC's stream socket, until taken.
    network: Option<OwnedFd>,
}

impl VmInstance {
    fn status(&self) -> Option<ExitStatus> {
        lock(&self.owner.state.0).status
    }

    /// After QEMU exited: stop the relay, remove the sockets.
    fn cleanup(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for l in [self.listener.take(), self.ready_listener.take()]
            .into_iter()
            .flatten()
        {
            // SAFETY: shutdown on a listening socket we own wakes accept().
            unsafe { libc::shutdown(l.as_raw_fd(), libc::SHUT_RDWR) };
        }
        if let Some(r) = self.relay.take() {
            let _ = r.join();
        }
        let _ = fs::remove_dir_all(&self.run_dir);
    }
}

impl Instance for VmInstance {
    fn take_network(&mut self) -> Option<(OwnedFd, LinkKind)> {
        self.network.take().map(|fd| (fd, LinkKind::Stream))
    }

    fn pid(&self) -> u32 {
        lock(&self.owner.state.0).qemu_pid
    }

    fn wait(&mut self) -> Result<ExitStatus, BackendError> {
        let (m, cv) = &*self.owner.state;
        let mut g = lock(m);
        while g.status.is_none() {
            g = cv.wait(g).unwrap_or_else(PoisonError::into_inner);
        }
        let s = g.status.unwrap_or_else(|| ExitStatus::from_raw(0));
        drop(g);
        self.cleanup();
        Ok(s)
    }

    fn try_wait(&mut self) -> Result<Option<ExitStatus>, BackendError> {
        let s = self.status();
        if s.is_some() {
            self.cleanup();
        }
        Ok(s)
    }

    fn terminate(&mut self, grace: Duration) -> Result<(), BackendError> {
        if self.status().is_none() {
            // Ask the agent to power off cleanly (it syncs the disk); not
            // before it is ready (connecting to a booting guest is unsafe).
            let asked =
                self.ready.is_set() && relay::connect(&self.vsock_uds, SHUTDOWN_PORT).is_ok();
            let (m, cv) = &*self.owner.state;
            let deadline = Instant::now() + if asked { grace } else { Duration::ZERO };
            let mut g = lock(m);
            while g.status.is_none() && Instant::now() < deadline {
                let left = deadline.saturating_duration_since(Instant::now());
                g = cv
                    .wait_timeout(g, left)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
            if !g.exited {
                // SAFETY: kill on QEMU's pid: the owner thread reaps it only
                // after setting `exited` under this lock, so it is not reused.
                unsafe { libc::kill(g.qemu_pid as libc::pid_t, libc::SIGKILL) };
            }
        }
        self.wait().map(drop)
    }
}

impl Drop for VmInstance {
    fn drop(&mut self) {
        if self.status().is_none() {
            let _ = self.terminate(Duration::from_secs(5));
        } else {
            self.cleanup();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_reports_missing_tools() {
        let cfg = VmConfig {
            cache_dir: PathBuf::from("/nonexistent/airlock-vm"),
            kernel_dir: PathBuf::from("/nonexistent/airlock-vm/kernel"),
            qemu: PathBuf::from("/nonexistent/qemu"),
            firmware: PathBuf::from("/nonexistent/qboot.rom"),
            virtiofsd: PathBuf::from("/nonexistent/virtiofsd"),
            vsock_daemon: PathBuf::from("/nonexistent/vhost-device-vsock"),
            memory_mib: 256,
            cpus: 1,
            accel: None,
            guest_ro_mounts: true,
        };
        let r = VmBackend::with_config(cfg).probe().unwrap();
        assert!(!r.ok);
        let all = r.details.join("\n");
        for what in [
            "qemu",
            "qboot",
            "virtiofsd",
            "vhost-device-vsock",
            "guest kernel",
            "vm-deps.sh",
        ] {
            assert!(all.contains(what), "{what} not reported: {all}");
        }
    }

    #[test]
    fn fnv_is_stable() {
        assert_eq!(fnv64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv64(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
