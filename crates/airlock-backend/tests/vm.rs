//! Integration tests of the microVM backend: real QEMU microVMs (TCG on
//! hosts without working KVM) booting the Debian cloud kernel, the static
//! guest agent as init, and a template root filesystem.
//!
//! They are `#[ignore]`d because they need the VM tools; run them with
//!
//! ```text
//! scripts/vm-deps.sh && scripts/build-guest.sh
//! cargo test -p airlock-backend --test vm -- --ignored --test-threads=2
//! ```
//!
//! (scripts/test.sh runs them that way after vm-deps.sh). Missing tools make
//! them fail loudly, never pass. Inputs: the template rootfs from
//! `$AIRLOCK_TEMPLATES/base/rootfs` (default
//! `/var/lib/airlock/templates/base/rootfs`), the guest agent from
//! `$AIRLOCK_GUEST_BINARY` (default `target/guest/.../airlock-guest`, built
//! by scripts/build-guest.sh). The console log of a failed test is kept
//! under /var/tmp/airlock-vmtest-*.
//!
//! `vm_boot_figures` prints the boot time against the floor (the same QEMU
//! and kernel booting a trivial init that powers off) and the idle RSS.

use airlock_backend::vm::VmBackend;
use airlock_backend::{Backend, Instance, LaunchSpec, WorkspaceMount};
use airlock_exec::ExecOptions;
use airlock_protocol::GuestConfig;
use std::fs;
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn rootfs() -> PathBuf {
    let base = std::env::var_os("AIRLOCK_TEMPLATES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/airlock/templates"));
    let p = base.join("base/rootfs");
    assert!(
        p.join("bin").exists(),
        "no template rootfs at {}",
        p.display()
    );
    p
}

fn guest_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("AIRLOCK_GUEST_BINARY") {
        return PathBuf::from(p);
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../target/guest/x86_64-unknown-linux-gnu/release/airlock-guest");
    assert!(
        p.exists(),
        "no static guest agent at {}: run scripts/build-guest.sh",
        p.display()
    );
    p
}

fn backend() -> VmBackend {
    let b = VmBackend::new();
    let r = b.probe().expect("probe");
    assert!(r.ok, "VM backend unavailable: {:?}", r.details);
    b
}

struct Vm {
    dir: tempfile::TempDir,
    layer: PathBuf,
    console: PathBuf,
    sock: PathBuf,
    inst: Option<Box<dyn Instance>>,
    ok: bool,
}

impl Vm {
    fn new() -> Vm {
        let dir = tempfile::Builder::new()
            .prefix("airlock-vmtest-")
            .tempdir_in("/var/tmp")
            .unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        Vm {
            layer: dir.path().join("layer"),
            console: dir.path().join("console.log"),
            sock: dir.path().join("run/agent.sock"),
            dir,
            inst: None,
            ok: false,
        }
    }

    fn spec(&self, workspaces: Vec<WorkspaceMount>) -> LaunchSpec {
        let run = self.dir.path().join("run");
        let _ = fs::remove_dir_all(&run);
        fs::create_dir_all(&run).unwrap();
        let listener = UnixListener::bind(&self.sock).unwrap();
        LaunchSpec {
            name: "vmtest".into(),
            rootfs: rootfs(),
            lower_layers: vec![],
            layer_dir: self.layer.clone(),
            run_dir: run,
            workspaces,
            control_fd: OwnedFd::from(listener),
            proxy_socket: None,
            guest_binary: guest_binary(),
            guest_config: GuestConfig {
                hostname: "vmtest".into(),
                env: vec![(
                    "PATH".into(),
                    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
                )],
                ..Default::default()
            },
            console_log: self.console.clone(),
            extra_files: vec![(PathBuf::from("/etc/airlock-extra"), b"extra\n".to_vec())],
        }
    }

    /// Launch and wait for the agent to answer; returns the time it took.
    fn start(&mut self, workspaces: Vec<WorkspaceMount>) -> Duration {
        self.start_with(backend(), workspaces)
    }

    fn start_with(&mut self, backend: VmBackend, workspaces: Vec<WorkspaceMount>) -> Duration {
        let t0 = Instant::now();
        let inst = backend
            .launch(self.spec(workspaces))
            .unwrap_or_else(|e| panic!("launch: {e}\nconsole:\n{}", self.console_text()));
        self.inst = Some(inst);
        let launched = t0.elapsed();
        if let Err(e) = airlock_exec::ping(&self.sock, Duration::from_secs(60)) {
            panic!(
                "agent did not answer: {e}\nconsole:\n{}",
                self.console_text()
            );
        }
        if std::env::var_os("AIRLOCK_TEST_VERBOSE").is_some() {
            let console = self.console_text();
            let line = console.lines().find(|l| l.contains("ready on vsock"));
            eprintln!(
                "launch() {launched:.2?}, agent ready {:.2?} ({})",
                t0.elapsed(),
                line.unwrap_or("no ready line")
            );
            if std::env::var_os("AIRLOCK_VM_GUEST_DEBUG").is_some() {
                eprintln!("{console}");
            }
        }
        t0.elapsed()
    }

    fn sh(&self, script: &str) -> (i32, String, String) {
        let opts = ExecOptions {
            argv: vec!["sh".into(), "-c".into(), script.into()],
            ..Default::default()
        };
        let (code, out, err) =
            airlock_exec::run_captured(&self.sock, &opts, b"", Duration::from_secs(30))
                .unwrap_or_else(|e| {
                    panic!("exec {script:?}: {e}\nconsole:\n{}", self.console_text())
                });
        (
            code,
            String::from_utf8_lossy(&out).into_owned(),
            String::from_utf8_lossy(&err).into_owned(),
        )
    }

    fn stop(&mut self) {
        if let Some(mut i) = self.inst.take() {
            i.terminate(Duration::from_secs(10)).unwrap();
        }
        let _ = fs::remove_file(&self.sock);
    }

    fn console_text(&self) -> String {
        fs::read_to_string(&self.console).unwrap_or_default()
    }

    fn pass(&mut self) {
        self.ok = true;
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.stop();
        if !self.ok {
            // Keep the console log of a failed test.
            let keep = self.dir.path().to_path_buf();
            eprintln!("keeping {} (console.log)", keep.display());
            let d = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
            let _ = d.keep();
        }
    }
}

#[test]
#[ignore = "needs VM tools: scripts/vm-deps.sh, then --ignored"]
fn vm_boots_and_execs() {
    let probe = backend().probe().unwrap();
    let details = probe.details.join("\n");
    assert!(details.contains("acceleration: "), "{details}");
    eprintln!("probe:\n{details}");
    let mut vm = Vm::new();
    let t = vm.start(vec![]);
    eprintln!("agent ready after {t:.2?}");
    let (code, out, _) = vm.sh("uname -r");
    assert_eq!(code, 0);
    let host = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert_ne!(out.trim(), host.trim(), "the guest runs its own kernel");
    assert!(out.contains("cloud-amd64"), "guest kernel: {out}");
    for c in [0, 1, 7, 42] {
        assert_eq!(vm.sh(&format!("exit {c}")).0, c);
    }
    let (_, out, err) = vm.sh("echo out; echo err >&2; cat /etc/airlock-extra; hostname");
    assert_eq!(out, "out\nextra\nvmtest\n");
    assert_eq!(err, "err\n");
    // A pseudo-terminal.
    let opts = ExecOptions {
        argv: vec!["sh".into(), "-c".into(), "tty; stty size".into()],
        tty: true,
        ..Default::default()
    };
    let (code, out, _) =
        airlock_exec::run_captured(&vm.sock, &opts, b"", Duration::from_secs(30)).unwrap();
    assert_eq!(code, 0);
    assert_eq!(String::from_utf8_lossy(&out), "/dev/pts/0\r\n24 80\r\n");
    // Only the root disk: no host block device is visible.
    let (_, out, _) = vm.sh("ls /sys/block | grep -v '^loop' | tr '\\n' ' '");
    assert_eq!(out.trim(), "vda");
    vm.stop();
    vm.pass();
}

#[test]
#[ignore = "needs VM tools: scripts/vm-deps.sh, then --ignored"]
fn vm_workspaces_rw_and_ro() {
    let mut vm = Vm::new();
    let rw = vm.dir.path().join("ws rw");
    let ro = vm.dir.path().join("ws-ro");
    fs::create_dir_all(&rw).unwrap();
    fs::create_dir_all(&ro).unwrap();
    fs::write(ro.join("keep"), "host\n").unwrap();
    let mut cfg = backend().config().clone();
    cfg.guest_ro_mounts = false;
    vm.start_with(
        VmBackend::with_config(cfg),
        vec![
            WorkspaceMount {
                path: rw.clone(),
                read_only: false,
            },
            WorkspaceMount {
                path: ro.clone(),
                read_only: true,
            },
        ],
    );
    let (rwp, rop) = (rw.display().to_string(), ro.display().to_string());
    // Written inside, visible on the host at once, and the reverse.
    let (code, _, err) = vm.sh(&format!("echo guest > '{rwp}/from-guest'"));
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        fs::read_to_string(rw.join("from-guest")).unwrap(),
        "guest\n"
    );
    fs::write(rw.join("from-host"), "host\n").unwrap();
    assert_eq!(vm.sh(&format!("cat '{rwp}/from-host'")).1, "host\n");
    // :ro is enforced by virtiofsd on the host: here the guest mounted it
    // read-write (as a guest root that remounted it would), and still every
    // write fails.
    assert_eq!(vm.sh(&format!("cat '{rop}/keep'")).1, "host\n");
    let (_, out, _) = vm.sh(&format!(
        "grep ' {rop} ' /proc/mounts; echo x > '{rop}/new'; echo write=$?; \
         echo y >> '{rop}/keep'; echo append=$?; rm -f '{rop}/keep'; echo rm=$?; \
         mkdir '{rop}/d'; echo mkdir=$?"
    ));
    assert!(
        out.contains("virtiofs rw,"),
        "mounted read-write inside: {out}"
    );
    for op in ["write", "append", "rm", "mkdir"] {
        assert!(!out.contains(&format!("{op}=0")), "{op} succeeded: {out}");
    }
    // And sandboxed processes cannot remount anything (no capabilities).
    let (_, out, _) = vm.sh(
        "python3 -c 'import ctypes,os; l=ctypes.CDLL(None, use_errno=True); \
         r=l.mount(b\"none\", b\"/\", None, 32|1, None); print(r, ctypes.get_errno())'",
    );
    assert_eq!(out.trim(), "-1 1", "remount as a sandboxed process: {out}");
    assert!(!ro.join("new").exists());
    assert_eq!(fs::read_to_string(ro.join("keep")).unwrap(), "host\n");
    // Nothing of the host outside the workspaces: their parent directory
    // inside holds only them (not the console log or the disk layer).
    let parent = vm.dir.path().display().to_string();
    let (_, out, _) = vm.sh(&format!("ls -A '{parent}' | tr '\\n' '|'"));
    assert_eq!(out, "ws rw|ws-ro|", "host files visible inside");
    vm.stop();
    vm.pass();
}

#[test]
#[ignore = "needs VM tools: scripts/vm-deps.sh, then --ignored"]
fn vm_stop_start_keeps_disk_and_terminate_cleans_up() {
    let mut vm = Vm::new();
    let ws = vm.dir.path().join("ws");
    fs::create_dir_all(&ws).unwrap();
    vm.start(vec![WorkspaceMount {
        path: ws,
        read_only: true,
    }]);
    let run = vm.dir.path().join("run");
    assert_eq!(
        processes_mentioning(&run).len(),
        4,
        "QEMU, 2 virtiofsd, vsock"
    );
    assert_eq!(vm.sh("echo persisted > /root/marker").0, 0);
    let qemu = vm.inst.as_ref().unwrap().pid();
    let t0 = Instant::now();
    vm.stop();
    eprintln!("clean stop took {:.2?}", t0.elapsed());
    // No QEMU, virtiofsd or vhost-device-vsock of ours left, no socket.
    assert!(
        !Path::new(&format!("/proc/{qemu}")).exists(),
        "QEMU {qemu} still runs"
    );
    let ours = processes_mentioning(&run);
    assert!(ours.is_empty(), "left behind: {ours:?}");
    assert!(!run.join("vm").exists(), "run dir not cleaned");
    let overlay = vm.layer.join("root.qcow2");
    let bytes = fs::metadata(&overlay).unwrap().len();
    eprintln!("overlay after one boot and a write: {bytes} bytes");

    vm.start(vec![]);
    assert_eq!(vm.sh("cat /root/marker").1, "persisted\n");
    // A hard kill of QEMU is reported through wait(), and cleans up too.
    let mut inst = vm.inst.take().unwrap();
    // SAFETY: QEMU is a child of the backend, alive.
    unsafe { libc::kill(inst.pid() as i32, libc::SIGKILL) };
    let st = inst.wait().unwrap();
    assert!(!st.success());
    std::thread::sleep(Duration::from_millis(200));
    let ours = processes_mentioning(&run);
    assert!(ours.is_empty(), "left behind after a crash: {ours:?}");
    vm.pass();
}

/// Pids whose command line mentions `dir` (our daemons and QEMU).
fn processes_mentioning(dir: &Path) -> Vec<String> {
    let needle = dir.display().to_string();
    let mut out = Vec::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.chars().all(|c| c.is_ascii_digit()) {
            continue;
        }
        if let Ok(c) = fs::read(e.path().join("cmdline")) {
            let c = String::from_utf8_lossy(&c).replace('\0', " ");
            if c.contains(&needle) {
                out.push(format!("{name}: {c}"));
            }
        }
    }
    out
}

/// A static init that powers the machine off at once (the boot floor).
fn floor_initrd(dir: &Path) -> PathBuf {
    let c = dir.join("poweroff.c");
    fs::write(
        &c,
        "#include <sys/reboot.h>\n#include <unistd.h>\n\
         int main(void) { reboot(RB_POWER_OFF); for (;;) pause(); }\n",
    )
    .unwrap();
    let bin = dir.join("poweroff");
    let st = Command::new("cc")
        .args(["-static", "-O2", "-o"])
        .arg(&bin)
        .arg(&c)
        .status()
        .expect("cc (build-essential) for the floor init");
    assert!(st.success(), "cc -static failed");
    let mut w = airlock_backend::vm::cpio::CpioWriter::new(Vec::new());
    w.file("init", 0o755, &fs::read(&bin).unwrap()).unwrap();
    let out = dir.join("floor.cpio");
    fs::write(&out, w.finish().unwrap()).unwrap();
    out
}

fn status_kib(pid: &str, field: &str) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

fn rss_kib(pid: &str) -> u64 {
    status_kib(pid, "VmRSS:")
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[test]
#[ignore = "needs VM tools: scripts/vm-deps.sh, then --ignored"]
fn vm_boot_figures() {
    // As sandboxes run: with the NIC.
    let b = backend().with_network(airlock_backend::NetworkMode::Tap);
    let (accel, _) = b.accel().unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let initrd = floor_initrd(scratch.path());
    let mut floors = Vec::new();
    for _ in 0..3 {
        let t0 = Instant::now();
        let st = airlock_backend::vm::qemu_command(b.config(), accel, &initrd)
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(st.success(), "floor VM: {st}");
        floors.push(t0.elapsed());
    }
    let floor = median(floors);

    let ws = scratch.path().join("ws");
    fs::create_dir_all(&ws).unwrap();
    let mut boots = Vec::new();
    let mut rss = String::new();
    for i in 0..3 {
        let mut vm = Vm::new();
        boots.push(vm.start_with(
            b.clone(),
            vec![WorkspaceMount {
                path: ws.clone(),
                read_only: false,
            }],
        ));
        if i == 0 {
            // Warm exec through the relay.
            let mut execs = Vec::new();
            for _ in 0..10 {
                let t0 = Instant::now();
                assert_eq!(vm.sh("true").0, 0);
                execs.push(t0.elapsed());
            }
            std::thread::sleep(Duration::from_secs(2));
            let run = vm.dir.path().join("run");
            let mut total = 0;
            for p in processes_mentioning(&run) {
                let (pid, cmd) = p.split_once(": ").unwrap();
                let k = rss_kib(pid);
                total += k;
                let prog = cmd.split(' ').next().unwrap_or("");
                rss.push_str(&format!(
                    "  {k:>8} KiB  {prog} (anon {} KiB, shmem/guest RAM {} KiB)\n",
                    status_kib(pid, "RssAnon:"),
                    status_kib(pid, "RssShmem:")
                ));
            }
            rss.push_str(&format!("  {total:>8} KiB  total\n"));
            let overlay = fs::metadata(vm.layer.join("root.qcow2")).unwrap();
            eprintln!(
                "warm exec `true`: median {:.1?}\ndisk: overlay after boot {} bytes ({} KiB allocated)",
                median(execs),
                overlay.len(),
                std::os::unix::fs::MetadataExt::blocks(&overlay) / 2
            );
        }
        vm.stop();
        vm.pass();
    }
    let boot = median(boots);
    eprintln!(
        "accel {}: floor (QEMU+kernel, init powers off) {floor:.2?}; launch→agent ready {boot:.2?}; \
         ratio {:.2}\nidle RSS:\n{rss}",
        accel.as_str(),
        boot.as_secs_f64() / floor.as_secs_f64()
    );
}

/// QEMU and its daemons die with the supervisor (PR_SET_PDEATHSIG from the
/// owner thread), also when the thread that called launch() has ended.
#[test]
#[ignore = "needs VM tools: scripts/vm-deps.sh, then --ignored"]
fn vm_dies_with_supervisor() {
    use std::io::BufRead;
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "vm_supervisor_helper",
            "--nocapture",
        ])
        .env("AIRLOCK_TEST_VM_SUPERVISOR", "1")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (mut pid, mut dir) = (None, None);
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line.unwrap();
        if let Some((_, d)) = line.split_once("VM_DIR ") {
            dir = Some(PathBuf::from(d.trim()));
        }
        if let Some((_, p)) = line.split_once("VM_PID ") {
            pid = Some(p.trim().parse::<u32>().unwrap());
            break;
        }
    }
    let pid = pid.expect("the helper did not launch a VM");
    let dir = dir.expect("the helper did not print its directory");
    let run = dir.join("run");
    assert!(
        processes_mentioning(&run).len() >= 3,
        "QEMU, virtiofsd and vhost-device-vsock should run: {:?}",
        processes_mentioning(&run)
    );
    child.kill().unwrap();
    child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left: Vec<_> = processes_mentioning(&run)
            .into_iter()
            .filter(|p| {
                let pid = p.split(':').next().unwrap_or("");
                let st = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                !st.is_empty() && !st.contains(") Z ")
            })
            .collect();
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "survived the supervisor (QEMU {pid}): {left:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = fs::remove_dir_all(dir);
}

/// Helper process of `vm_dies_with_supervisor` (does nothing on its own).
#[test]
#[ignore = "needs VM tools: scripts/vm-deps.sh, then --ignored"]
fn vm_supervisor_helper() {
    if std::env::var_os("AIRLOCK_TEST_VM_SUPERVISOR").is_none() {
        eprintln!("helper of vm_dies_with_supervisor: nothing to do on its own");
        return;
    }
    let vm = Vm::new();
    let ws = vm.dir.path().join("ws");
    fs::create_dir_all(&ws).unwrap();
    let spec = vm.spec(vec![WorkspaceMount {
        path: ws,
        read_only: false,
    }]);
    // Launch from a thread that ends at once.
    let inst = std::thread::spawn(move || backend().launch(spec).unwrap())
        .join()
        .unwrap();
    airlock_exec::ping(&vm.sock, Duration::from_secs(60)).unwrap();
    println!("VM_DIR {}", vm.dir.path().display());
    println!("VM_PID {}", inst.pid());
    std::mem::forget(inst);
    std::mem::forget(vm);
    loop {
        std::thread::sleep(Duration::from_secs(1000));
    }
}

#[test]
#[ignore = "needs VM tools: scripts/vm-deps.sh, then --ignored"]
fn vm_launch_errors_are_clear() {
    let vm = Vm::new();
    // A dynamically linked "agent" is refused before anything starts.
    let mut spec = vm.spec(vec![]);
    spec.guest_binary = PathBuf::from("/bin/sh");
    let e = backend()
        .launch(spec)
        .err()
        .expect("launch must fail")
        .to_string();
    assert!(e.contains("not a statically linked"), "{e}");
    // A missing template.
    let _ = fs::remove_file(&vm.sock);
    let mut spec = vm.spec(vec![]);
    spec.rootfs = PathBuf::from("/nonexistent/rootfs");
    let e = backend()
        .launch(spec)
        .err()
        .expect("launch must fail")
        .to_string();
    assert!(e.contains("/nonexistent/rootfs"), "{e}");
    let mut vm = vm;
    vm.pass();
}

/// With `NetworkMode::Tap` the VM gets one virtio-net NIC on a QEMU
/// `-netdev stream` socket whose host end `take_network` hands out once (as
/// `LinkKind::Stream`); the guest configures eth0 like the namespace
/// backend's TAP, and its frames arrive length-prefixed on that socket.
#[test]
#[ignore = "needs VM tools: scripts/vm-deps.sh, then --ignored"]
fn vm_nic_is_a_stream_link() {
    use airlock_backend::{LinkKind, NetworkMode};
    use std::io::Read;
    let mut vm = Vm::new();
    vm.start_with(backend().with_network(NetworkMode::Tap), vec![]);
    let inst = vm.inst.as_mut().unwrap();
    let (fd, kind) = inst.take_network().expect("network fd");
    assert_eq!(kind, LinkKind::Stream);
    assert!(inst.take_network().is_none(), "handed out once");
    let (code, out, err) = vm.sh(
        "ls /sys/class/net | tr '\\n' ' '; echo; cat /sys/class/net/eth0/mtu \
         /proc/sys/net/ipv6/conf/eth0/disable_ipv6; ip -o -4 addr show dev eth0; ip route",
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("eth0 lo \n65520\n1\n"), "{out}");
    assert!(out.contains("10.0.2.15/24"), "{out}");
    assert!(out.contains("default via 10.0.2.2 dev eth0"), "{out}");
    // One UDP datagram to the gateway: the guest first asks for its MAC.
    vm.sh("bash -c 'echo x > /dev/udp/10.0.2.2/9' || true");
    let mut s = std::os::unix::net::UnixStream::from(fd);
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut found = false;
    for _ in 0..16 {
        let mut len = [0u8; 4];
        s.read_exact(&mut len).expect("a frame from the guest");
        let mut frame = vec![0u8; u32::from_be_bytes(len) as usize];
        s.read_exact(&mut frame).unwrap();
        // ARP request (ethertype 0x0806, op 1), sender 10.0.2.15, target 10.0.2.2.
        if frame.len() >= 42
            && frame[12..14] == [0x08, 0x06]
            && frame[20..22] == [0, 1]
            && frame[28..32] == [10, 0, 2, 15]
            && frame[38..42] == [10, 0, 2, 2]
        {
            found = true;
            break;
        }
    }
    assert!(found, "no ARP request for the gateway");
    vm.stop();
    vm.pass();
}
