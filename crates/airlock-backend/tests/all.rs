//! Integration tests of the namespace backend: real sandboxes on a real
//! Debian root filesystem. They need root (the root invoker path; the
//! unprivileged path is tested by re-running one test as uid 65534) and a
//! root filesystem: `/tmp/mmtest/root.tar` is imported into a template under
//! /var/tmp/airlock-test-templates (or, without it, a base template is built
//! there with mmdebstrap, about a minute). They fail loudly otherwise.
//!
//! The guest "agent" here is a shell script (bound at
//! /run/airlock/airlock-guest and run by the template's /bin/sh) that prints
//! `RESULT key=value` lines to the console log.

use airlock_backend::{
    Backend, BackendError, Instance, LaunchSpec, NamespaceBackend, WorkspaceMount,
};
use airlock_protocol::GuestConfig;
use std::collections::HashMap;
use std::fs;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const TEMPLATE_DIR: &str = "/var/tmp/airlock-test-templates";
const TARBALL: &str = "/tmp/mmtest/root.tar";

fn is_root() -> bool {
    // SAFETY: trivial getter.
    unsafe { libc::geteuid() == 0 }
}

fn rootfs() -> PathBuf {
    static ROOTFS: OnceLock<PathBuf> = OnceLock::new();
    ROOTFS
        .get_or_init(|| {
            if let Ok(p) = std::env::var("AIRLOCK_TEST_ROOTFS") {
                return PathBuf::from(p);
            }
            assert!(
                is_root(),
                "the namespace backend integration tests must run as root (they test the root \
                 invoker path and run the unprivileged one via setpriv)"
            );
            // The suite's shared template cache (scripts/test.sh builds it).
            if let Some(dir) = std::env::var_os("AIRLOCK_TEMPLATES") {
                let shared = airlock_template::TemplateStore::new(PathBuf::from(dir));
                if let Some(t) = shared.get(airlock_template::BASE).expect("template store readable") {
                    return t.rootfs;
                }
            }
            let store = airlock_template::TemplateStore::new(PathBuf::from(TEMPLATE_DIR));
            let t = if Path::new(TARBALL).exists() {
                match store.get("mmtest").expect("template store readable") {
                    Some(t) => t,
                    None => {
                        eprintln!("importing {TARBALL} into {TEMPLATE_DIR}/mmtest ...");
                        store
                            .import("mmtest", Path::new(TARBALL), "trixie", "http://deb.debian.org/debian", vec![], &mut |_| {})
                            .expect("importing the test root filesystem")
                    }
                }
            } else {
                eprintln!("{TARBALL} missing: building a base template in {TEMPLATE_DIR} (about a minute) ...");
                store
                    .build(airlock_template::BASE, &Default::default(), &mut |p| {
                        if let airlock_template::Progress::Step(s) = p {
                            eprintln!("  {s}");
                        }
                    })
                    .expect("building a base template for the tests")
            };
            t.rootfs
        })
        .clone()
}

fn init_program() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_airlock-ns-init"))
}

struct Sandbox {
    dir: tempfile::TempDir,
    layer: PathBuf,
    console: PathBuf,
    lower_layers: Vec<PathBuf>,
}

impl Sandbox {
    fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("airlock-nstest-")
            .tempdir_in("/var/tmp")
            .unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let layer = dir.path().join("layer");
        let console = dir.path().join("console.log");
        Sandbox {
            lower_layers: Vec::new(),
            dir,
            layer,
            console,
        }
    }

    fn spec(&self, guest: &Path, workspaces: Vec<WorkspaceMount>) -> LaunchSpec {
        let run = self.dir.path().join(format!("run-{}", rand_id()));
        fs::create_dir_all(&run).unwrap();
        let sock = run.join("control.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        LaunchSpec {
            name: "tsbx".into(),
            rootfs: rootfs(),
            lower_layers: self.lower_layers.clone(),
            layer_dir: self.layer.clone(),
            run_dir: run,
            workspaces,
            control_fd: OwnedFd::from(listener),
            proxy_socket: None,
            guest_binary: guest.to_path_buf(),
            guest_config: GuestConfig {
                hostname: "tsbx".into(),
                env: vec![("PATH".into(), "/usr/bin:/bin".into())],
                ..Default::default()
            },
            console_log: self.console.clone(),
            extra_files: vec![(
                PathBuf::from("/etc/airlock-extra"),
                b"extra-content\n".to_vec(),
            )],
        }
    }

    fn script(&self, body: &str) -> PathBuf {
        let p = self.dir.path().join(format!("guest-{}.sh", rand_id()));
        fs::write(
            &p,
            format!("#!/bin/sh\nexport PATH=/usr/sbin:/usr/bin:/sbin:/bin\n{body}\n"),
        )
        .unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    /// Launch, wait (30 s max), return the RESULT lines of the console log.
    fn run(&self, body: &str, workspaces: Vec<WorkspaceMount>) -> HashMap<String, String> {
        let guest = self.script(body);
        let before = fs::read_to_string(&self.console).unwrap_or_default().len();
        let mut inst = NamespaceBackend::with_init_program(init_program())
            .launch(self.spec(&guest, workspaces))
            .unwrap_or_else(|e| panic!("launch failed: {e}\nconsole:\n{}", self.console_text()));
        let status = wait_timeout(&mut *inst, Duration::from_secs(60));
        let log = fs::read_to_string(&self.console).unwrap();
        let log = &log[before..];
        assert!(
            status.success(),
            "guest script failed: {status}\nconsole:\n{log}"
        );
        let mut out = HashMap::new();
        for line in log.lines() {
            if let Some(kv) = line.strip_prefix("RESULT ") {
                let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                out.insert(k.to_string(), v.to_string());
            }
        }
        out.insert("__log".into(), log.to_string());
        out
    }

    fn console_text(&self) -> String {
        fs::read_to_string(&self.console).unwrap_or_default()
    }
}

fn wait_timeout(inst: &mut dyn Instance, t: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + t;
    loop {
        if let Some(s) = inst.try_wait().unwrap() {
            return s;
        }
        if Instant::now() > deadline {
            inst.terminate(Duration::from_millis(100)).unwrap();
            panic!("sandbox did not exit within {t:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn rand_id() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn get<'a>(r: &'a HashMap<String, String>, k: &str) -> &'a str {
    r.get(k)
        .map(String::as_str)
        .unwrap_or_else(|| panic!("no RESULT {k} in console:\n{}", r["__log"]))
}

#[test]
fn isolation_from_inside() {
    let sb = Sandbox::new();
    // Host files that must not be visible inside.
    let secret_dir = PathBuf::from(format!("/root/.airlock-ssh-test-{}", std::process::id()));
    fs::create_dir_all(&secret_dir).unwrap();
    fs::write(secret_dir.join("id_rsa"), "secret").unwrap();
    let tmp_secret = PathBuf::from(format!("/tmp/airlock-host-secret-{}", std::process::id()));
    fs::write(&tmp_secret, "secret").unwrap();
    let body = format!(
        r#"
r() {{ echo "RESULT $1=$2"; }}
r pid "$$"
r procs "$(cd /proc && echo [0-9]* | wc -w)"
r hostname "$(hostname)"
test -e /proc/{hostpid} && r hostpid visible || r hostpid invisible
r uid "$(id -u)"
r links "$(ls /sys/class/net 2>/dev/null | tr '\n' ' ')"
r netdev "$(tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | tr '\n' ' ')"
echo hi > /dev/null && r devnull ok
r devzero "$(head -c 3 /dev/zero | od -An -tx1 | tr -d ' ')"
test -e /var/run/docker.sock && r docker present || r docker absent
test -e /run/docker.sock && r docker2 present || r docker2 absent
test -e {secret} && r ssh visible || r ssh hidden
test -e {tmp_secret} && r tmpsecret visible || r tmpsecret hidden
test -e /work && r work visible || r work hidden
mount -t tmpfs x /mnt 2>/dev/null && r mount ok || r mount denied
unshare -U true 2>/dev/null && r unshare ok || r unshare denied
unshare -n true 2>/dev/null && r unshare_net ok || r unshare_net denied
r nnp "$(grep NoNewPrivs /proc/self/status | tr -d ' \t' | cut -d: -f2)"
r seccomp "$(grep '^Seccomp:' /proc/self/status | tr -d ' \t' | cut -d: -f2)"
r capeff "$(grep CapEff /proc/self/status | tr -d ' \t' | cut -d: -f2)"
r env "$(env | cut -d= -f1 | grep -v -e '^PWD$' -e '^SHLVL$' -e '^_$' -e '^PATH$' | sort | tr '\n' ' ')"
r config "$AIRLOCK_GUEST_CONFIG"
fd=$(echo "$AIRLOCK_GUEST_CONFIG" | sed 's/.*"control_fd":\([0-9]*\).*/\1/')
r controlfd "$(readlink /proc/self/fd/$fd | cut -d: -f1)"
r fds "$(ls /proc/self/fd | sort -n | tr '\n' ' ')"
r extra "$(cat /etc/airlock-extra)"
r guestbin "$(test -w /run/airlock/airlock-guest && echo writable || echo readonly)"
r tmpmode "$(stat -c %a /tmp)"
r apt "$(cat /etc/apt/apt.conf.d/99airlock 2>/dev/null | grep -c Sandbox)"
r rootfstype "$(awk '$2=="/" {{print $3}}' /proc/mounts)"
r mounts "$(awk '{{print $2}}' /proc/mounts | tr '\n' ' ')"
r ptmx "$(test -c /dev/pts/ptmx && echo ok)"
r kmsg "$(dmesg 2>&1 | head -c 0 ; dmesg >/dev/null 2>&1 && echo readable || echo denied)"
r ping_host "$(cat /proc/1/cmdline | tr '\0' ' ')"
echo written > /etc/airlock-persist && r write_etc ok
r apt_user "$(id -u _apt 2>/dev/null)"
python3 -c 'import socket; s=socket.socket(socket.AF_UNIX); s.connect("/run/airlock/proxy.sock"); s.sendall(b"hello-proxy")' && r proxy ok
"#,
        secret = secret_dir.join("id_rsa").display(),
        tmp_secret = tmp_secret.display(),
        hostpid = std::process::id(),
    );
    let r = {
        // The egress engine's socket, reachable inside at /run/airlock/proxy.sock.
        let proxy_path = sb.dir.path().join("proxy.sock");
        let proxy = UnixListener::bind(&proxy_path).unwrap();
        let server = std::thread::spawn(move || {
            use std::io::Read;
            let (mut c, _) = proxy.accept().unwrap();
            let mut s = String::new();
            c.read_to_string(&mut s).unwrap();
            s
        });
        let guest = sb.script(&body);
        let mut spec = sb.spec(&guest, vec![]);
        spec.proxy_socket = Some(proxy_path);
        let mut inst = NamespaceBackend::with_init_program(init_program())
            .launch(spec)
            .unwrap();
        let st = wait_timeout(&mut *inst, Duration::from_secs(60));
        let log = sb.console_text();
        assert!(st.success(), "{st}\n{log}");
        assert_eq!(server.join().unwrap(), "hello-proxy");
        let mut out = HashMap::new();
        for line in log.lines() {
            if let Some((k, v)) = line
                .strip_prefix("RESULT ")
                .and_then(|kv| kv.split_once('='))
            {
                out.insert(k.to_string(), v.to_string());
            }
        }
        out.insert("__log".to_string(), log);
        out
    };
    let _ = fs::remove_dir_all(&secret_dir);
    let _ = fs::remove_file(&tmp_secret);
    let log = &r["__log"];
    assert_eq!(get(&r, "pid"), "1", "{log}");
    // sh (pid 1) plus the few processes of the $(...) pipeline.
    let procs: u32 = get(&r, "procs").parse().unwrap();
    assert!(procs <= 5, "host processes visible: {procs}\n{log}");
    assert_eq!(get(&r, "hostpid"), "invisible", "{log}");
    assert_eq!(get(&r, "hostname"), "tsbx");
    assert_eq!(get(&r, "uid"), "0");
    assert_eq!(get(&r, "netdev").trim(), "lo", "{log}");
    assert_eq!(get(&r, "devnull"), "ok");
    assert_eq!(get(&r, "devzero"), "000000");
    assert_eq!(get(&r, "docker"), "absent");
    assert_eq!(get(&r, "docker2"), "absent");
    assert_eq!(get(&r, "ssh"), "hidden");
    assert_eq!(get(&r, "tmpsecret"), "hidden");
    assert_eq!(get(&r, "work"), "hidden");
    assert_eq!(get(&r, "mount"), "denied");
    assert_eq!(get(&r, "unshare"), "denied");
    assert_eq!(get(&r, "unshare_net"), "denied");
    assert_eq!(get(&r, "nnp"), "1");
    assert_eq!(get(&r, "seccomp"), "2");
    assert_eq!(get(&r, "env").trim(), "AIRLOCK_GUEST_CONFIG");
    assert!(get(&r, "config").contains("\"hostname\":\"tsbx\""));
    assert_eq!(get(&r, "controlfd"), "socket", "{log}");
    assert_eq!(get(&r, "extra"), "extra-content");
    assert_eq!(get(&r, "guestbin"), "readonly");
    assert_eq!(get(&r, "tmpmode"), "1777");
    assert_eq!(get(&r, "apt"), "1");
    assert_eq!(get(&r, "rootfstype"), "overlay");
    assert_eq!(get(&r, "ptmx"), "ok");
    assert_eq!(get(&r, "kmsg"), "denied");
    assert_eq!(get(&r, "write_etc"), "ok");
    assert_eq!(get(&r, "proxy"), "ok");
    assert!(get(&r, "config").contains("\"proxy_socket\":\"/run/airlock/proxy.sock\""));
    // Only the sandbox's own mounts.
    for m in get(&r, "mounts").split_whitespace() {
        assert!(
            [
                "/",
                "/proc",
                "/sys",
                "/dev",
                "/dev/pts",
                "/dev/shm",
                "/run",
                "/run/airlock/airlock-guest",
                "/run/airlock/proxy.sock"
            ]
            .contains(&m)
                || m.starts_with("/dev/"),
            "unexpected mount {m}\n{log}"
        );
    }
    assert!(
        log.contains("landlock ABI"),
        "console should report Landlock: {log}"
    );
    // The write landed in the upper layer on the host, owned by the invoker.
    let up = sb.layer.join("upper/etc/airlock-persist");
    assert_eq!(fs::read_to_string(&up).unwrap(), "written\n");
    assert_eq!(fs::metadata(&up).unwrap().uid(), 0);

    // ... and persists into a second launch with the same layer.
    let r2 = sb.run(
        r#"echo "RESULT persist=$(cat /etc/airlock-persist)""#,
        vec![],
    );
    assert_eq!(get(&r2, "persist"), "written");
}

#[test]
fn workspaces_rw_and_ro() {
    let sb = Sandbox::new();
    let base = tempfile::Builder::new()
        .prefix("airlock-ws-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let rw = base.path().join("proj");
    let ro = base.path().join("ref");
    fs::create_dir_all(&rw).unwrap();
    fs::create_dir_all(&ro).unwrap();
    fs::write(ro.join("README"), "read me\n").unwrap();
    let body = format!(
        r#"
r() {{ echo "RESULT $1=$2"; }}
cd {rw} && echo from-inside > made-inside.txt && r rw_write ok
r ro_read "$(cat {ro}/README)"
touch {ro}/new 2>/dev/null && r ro_write ok || r ro_write denied
mount -o remount,rw {ro} 2>/dev/null && r remount ok || r remount denied
touch {ro}/new2 2>/dev/null && r ro_write2 ok || r ro_write2 denied
echo x > /etc/landlock-sibling-ok && r sibling_write ok || r sibling_write denied
mkdir -p /var/tmp/elsewhere 2>/dev/null && r vartmp_write ok || r vartmp_write denied
touch {base}/newfile 2>/dev/null && r ancestor_write ok || r ancestor_write denied
umount {ro} 2>/dev/null && r umount ok || r umount denied
echo 0 > /proc/self/oom_score_adj 2>/dev/null && r proc_write ok || r proc_write denied
echo piped > /dev/stdout | cat >/dev/null && r stdout_write ok || r stdout_write denied
"#,
        rw = rw.display(),
        ro = ro.display(),
        base = base.path().display(),
    );
    let r = sb.run(
        &body,
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
    let log = &r["__log"];
    assert_eq!(get(&r, "rw_write"), "ok", "{log}");
    let made = rw.join("made-inside.txt");
    assert_eq!(fs::read_to_string(&made).unwrap(), "from-inside\n");
    assert_eq!(
        fs::metadata(&made).unwrap().uid(),
        0,
        "owned by the invoker (root)"
    );
    assert_eq!(get(&r, "ro_read"), "read me");
    assert_eq!(get(&r, "ro_write"), "denied");
    assert_eq!(get(&r, "remount"), "denied");
    assert_eq!(get(&r, "ro_write2"), "denied");
    assert_eq!(get(&r, "umount"), "denied");
    assert_eq!(
        get(&r, "sibling_write"),
        "ok",
        "Landlock must keep the rest writable: {log}"
    );
    // Ancestors of a read-only workspace stay usable (/var/tmp, the parent
    // of `ref`): read-only is enforced by the mount, not by Landlock.
    assert_eq!(get(&r, "vartmp_write"), "ok", "{log}");
    // Landlock keeps /proc read-only, but /dev/stdout (a pipe via /proc) works.
    assert_eq!(get(&r, "proc_write"), "denied", "{log}");
    assert_eq!(get(&r, "stdout_write"), "ok", "{log}");
    assert_eq!(get(&r, "ancestor_write"), "ok", "{log}");
    assert!(!ro.join("new").exists() && !ro.join("new2").exists());
}

#[test]
fn launch_time_to_true() {
    let sb = Sandbox::new();
    let backend = NamespaceBackend::with_init_program(init_program());
    let _ = rootfs();
    let mut times = Vec::new();
    for _ in 0..5 {
        let spec = sb.spec(Path::new("/usr/bin/true"), vec![]);
        let t0 = Instant::now();
        let mut inst = backend.launch(spec).expect("launch");
        let launched = t0.elapsed();
        let st = inst.wait().unwrap();
        let total = t0.elapsed();
        assert!(st.success(), "true failed: {st}\n{}", sb.console_text());
        times.push((launched, total));
    }
    for (l, t) in &times {
        eprintln!(
            "launch() returned after {:.1} ms; `true` exited after {:.1} ms",
            l.as_secs_f64() * 1e3,
            t.as_secs_f64() * 1e3
        );
    }
    let best = times.iter().map(|t| t.1).min().unwrap();
    assert!(
        best < Duration::from_millis(500),
        "cold start too slow: {best:?}"
    );
}

#[test]
fn terminate_kills_the_whole_sandbox() {
    let sb = Sandbox::new();
    let marker = format!("1000.{}", std::process::id());
    let guest = sb.script(&format!("trap '' TERM\nsleep {marker} &\nwait"));
    let mut inst = NamespaceBackend::with_init_program(init_program())
        .launch(sb.spec(&guest, vec![]))
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert!(inst.try_wait().unwrap().is_none());
    let pid = inst.pid();
    let t0 = Instant::now();
    inst.terminate(Duration::from_millis(300)).unwrap();
    let st = inst.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert!(
        st.signal() == Some(libc::SIGKILL) || st.signal() == Some(libc::SIGTERM),
        "{st}"
    );
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert!(!Path::new(&format!("/proc/{pid}")).exists());
    // The background sleep died with the pid namespace.
    std::thread::sleep(Duration::from_millis(100));
    for e in fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmd) = fs::read_to_string(e.path().join("cmdline")) {
            assert!(!cmd.contains(&marker), "process survived its sandbox");
        }
    }
}

#[test]
fn setup_errors_are_reported() {
    let sb = Sandbox::new();
    let backend = NamespaceBackend::with_init_program(init_program());
    // Guest binary that is not executable: fails at the final exec, inside.
    let not_exec = sb.dir.path().join("not-exec");
    fs::write(&not_exec, "#!/bin/sh\ntrue\n").unwrap();
    fs::set_permissions(&not_exec, fs::Permissions::from_mode(0o644)).unwrap();
    match backend.launch(sb.spec(&not_exec, vec![])) {
        Err(BackendError::Setup { step, message, .. }) => {
            assert!(
                step.contains("exec of the guest agent"),
                "{step}: {message}"
            );
        }
        other => panic!("expected a setup error, got {:?}", other.map(|i| i.pid())),
    }
    // Missing workspace: refused before anything starts.
    let mut spec = sb.spec(
        Path::new("/usr/bin/true"),
        vec![WorkspaceMount {
            path: "/nonexistent/ws".into(),
            read_only: false,
        }],
    );
    assert!(matches!(backend.launch(spec), Err(BackendError::Io { .. })));
    // Not a root filesystem.
    spec = sb.spec(Path::new("/usr/bin/true"), vec![]);
    spec.rootfs = sb.dir.path().to_path_buf();
    let e = backend.launch(spec).err().expect("must fail");
    assert!(e.to_string().contains("build the template"), "{e}");
    // A symlink planted in the upper layer where a workspace goes is refused.
    let ws = tempfile::Builder::new()
        .prefix("airlock-ws-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let plant = sb
        .layer
        .join("upper")
        .join(ws.path().strip_prefix("/").unwrap());
    fs::create_dir_all(plant.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink("/etc", &plant).unwrap();
    let spec = sb.spec(
        Path::new("/usr/bin/true"),
        vec![WorkspaceMount {
            path: ws.path().to_path_buf(),
            read_only: false,
        }],
    );
    match backend.launch(spec) {
        Err(BackendError::Setup { message, .. }) => {
            assert!(message.contains("symlink"), "{message}")
        }
        other => panic!("expected a setup error, got {:?}", other.map(|i| i.pid())),
    }
}

/// Agent templates: read-only layers stacked over the base root, topmost
/// first; the top one wins, writes go to the sandbox's own layer.
#[test]
fn lower_layers_stack_over_rootfs() {
    let mut sb = Sandbox::new();
    let top = sb.dir.path().join("top");
    let mid = sb.dir.path().join("mid");
    for (l, who) in [(&top, "top"), (&mid, "mid")] {
        fs::create_dir_all(l.join("usr/local/bin")).unwrap();
        fs::write(l.join("usr/local/bin/which-layer"), who).unwrap();
        fs::write(l.join(format!("usr/local/bin/only-{who}")), who).unwrap();
    }
    sb.lower_layers = vec![top.clone(), mid.clone()];
    let r = sb.run(
        r#"
r() { echo "RESULT $1=$2"; }
r which "$(cat /usr/local/bin/which-layer)"
r top "$(cat /usr/local/bin/only-top)"
r mid "$(cat /usr/local/bin/only-mid)"
test -x /bin/sh && r base ok
echo changed > /usr/local/bin/only-mid && r write ok
r after "$(cat /usr/local/bin/only-mid)"
"#,
        vec![],
    );
    assert_eq!(get(&r, "which"), "top");
    assert_eq!(get(&r, "top"), "top");
    assert_eq!(get(&r, "mid"), "mid");
    assert_eq!(get(&r, "base"), "ok");
    assert_eq!(get(&r, "write"), "ok");
    assert_eq!(get(&r, "after"), "changed");
    // The shared layer is untouched; the change is in the sandbox's upper.
    assert_eq!(
        fs::read_to_string(mid.join("usr/local/bin/only-mid")).unwrap(),
        "mid"
    );
    assert_eq!(
        fs::read_to_string(sb.layer.join("upper/usr/local/bin/only-mid")).unwrap(),
        "changed\n"
    );
    // A missing layer is refused before anything starts.
    sb.lower_layers = vec![sb.dir.path().join("missing")];
    let spec = sb.spec(Path::new("/usr/bin/true"), vec![]);
    let e = NamespaceBackend::with_init_program(init_program())
        .launch(spec)
        .err()
        .expect("must fail");
    assert!(e.to_string().contains("lower layer"), "{e}");
}

#[test]
fn probe_is_ok_here() {
    let r = NamespaceBackend::with_init_program(init_program())
        .probe()
        .unwrap();
    eprintln!("{:#?}", r);
    assert!(r.ok, "{:?}", r.details);
    assert!(r.details.iter().any(|d| d.starts_with("landlock: ABI")));
}

#[test]
fn id_shift_matches_template_store() {
    assert_eq!(
        airlock_backend::ns::ID_SHIFT_BASE,
        airlock_template::ID_SHIFT_BASE
    );
    assert_eq!(
        airlock_backend::ns::ID_SHIFT_RANGE,
        airlock_template::ID_SHIFT_RANGE
    );
}

/// The unprivileged invoker path: re-runs `unprivileged_inner` as uid 65534.
#[test]
fn unprivileged_invoker() {
    let rootfs = rootfs();
    let exe = std::env::current_exe().unwrap();
    let work = tempfile::Builder::new()
        .prefix("airlock-unpriv-")
        .tempdir_in("/var/tmp")
        .unwrap();
    fs::set_permissions(work.path(), fs::Permissions::from_mode(0o777)).unwrap();
    // An unprivileged sandbox needs a template owned by its invoker (the
    // root-extracted one has shifted owners): import one as uid 65534.
    let tarball =
        if fs::File::open(TARBALL).is_ok() && fs::metadata(TARBALL).unwrap().mode() & 0o004 != 0 {
            PathBuf::from(TARBALL)
        } else {
            let t = work.path().join("root.tar");
            let st = std::process::Command::new("tar")
                .args(["-cf"])
                .arg(&t)
                .arg("-C")
                .arg(&rootfs)
                .arg(".")
                .status()
                .unwrap();
            assert!(st.success());
            fs::set_permissions(&t, fs::Permissions::from_mode(0o644)).unwrap();
            t
        };
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(&exe)
        .args([
            "--ignored",
            "--exact",
            "unprivileged_inner",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("AIRLOCK_TEST_TARBALL", &tarball)
        .env("AIRLOCK_TEST_WORKDIR", work.path())
        .env("HOME", work.path())
        .output()
        .expect("setpriv (util-linux) is needed for this test");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains("1 passed"),
        "unprivileged run failed:\n{text}"
    );
}

#[test]
#[ignore = "run by unprivileged_invoker as uid 65534"]
fn unprivileged_inner() {
    let work =
        PathBuf::from(std::env::var("AIRLOCK_TEST_WORKDIR").expect("run via unprivileged_invoker"));
    assert!(!is_root());
    let sb = Sandbox {
        lower_layers: Vec::new(),
        layer: work.join("layer"),
        console: work.join("console.log"),
        dir: tempfile::Builder::new()
            .prefix("sb-")
            .tempdir_in(&work)
            .unwrap(),
    };
    let ws = work.join("ws");
    fs::create_dir_all(&ws).unwrap();
    let tarball = PathBuf::from(std::env::var("AIRLOCK_TEST_TARBALL").unwrap());
    let store = airlock_template::TemplateStore::new(work.join("templates"));
    let t0 = Instant::now();
    let t = store
        .import("unpriv", &tarball, "trixie", "", vec![], &mut |_| {})
        .expect("import as uid 65534");
    eprintln!("unprivileged import took {:?}", t0.elapsed());
    assert!(!t.id_shifted);
    // This inner test runs alone (--test-threads=1); rootfs() reads this once.
    std::env::set_var("AIRLOCK_TEST_ROOTFS", &t.rootfs);
    let body = format!(
        r#"
r() {{ echo "RESULT $1=$2"; }}
r uid "$(id -u)"
r uidmap "$(cat /proc/self/uid_map | tr -s ' ' | tr '\n' ';')"
echo hi > {ws}/inside.txt && r ws_write ok
mount -t tmpfs x /mnt 2>/dev/null && r mount ok || r mount denied
unshare -U true 2>/dev/null && r unshare ok || r unshare denied
r procs "$(cd /proc && echo [0-9]* | wc -w)"
echo x > /etc/apt/written-inside && r apt_write ok
"#,
        ws = ws.display()
    );
    let r = sb.run(
        &body,
        vec![WorkspaceMount {
            path: ws.clone(),
            read_only: false,
        }],
    );
    assert_eq!(get(&r, "uid"), "0");
    assert_eq!(get(&r, "ws_write"), "ok", "{}", r["__log"]);
    assert_eq!(fs::metadata(ws.join("inside.txt")).unwrap().uid(), 65534);
    assert_eq!(get(&r, "mount"), "denied");
    assert_eq!(get(&r, "unshare"), "denied");
    assert!(
        get(&r, "procs").parse::<u32>().unwrap() <= 5,
        "{}",
        r["__log"]
    );
    assert_eq!(get(&r, "apt_write"), "ok", "{}", r["__log"]);
    // A root-extracted (shifted) template is refused with a clear message.
    let root_tpl = PathBuf::from(TEMPLATE_DIR).join("mmtest/rootfs");
    if root_tpl.exists() {
        let mut spec = sb.spec(Path::new("/usr/bin/true"), vec![]);
        spec.rootfs = root_tpl;
        let e = NamespaceBackend::with_init_program(init_program())
            .launch(spec)
            .err()
            .expect("refused");
        assert!(
            e.to_string().contains("built or imported by this user"),
            "{e}"
        );
    }
}

/// The sandbox dies with its supervisor (PR_SET_PDEATHSIG), but not when the
/// thread that called launch() ends.
#[test]
fn sandbox_dies_with_supervisor() {
    use std::io::BufRead;
    let _ = rootfs();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "supervisor_inner",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("AIRLOCK_TEST_SUPERVISOR", "1")
        .env("AIRLOCK_TEST_ROOTFS", rootfs())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut pid = None;
    let mut dir = None;
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line.unwrap();
        if let Some((_, d)) = line.split_once("SANDBOX_DIR ") {
            dir = Some(PathBuf::from(d.trim()));
        }
        // libtest prints "test supervisor_inner ... " on the same line.
        if let Some((_, p)) = line.split_once("SANDBOX_PID ") {
            pid = Some(p.trim().parse::<u32>().unwrap());
            break;
        }
    }
    let pid = pid.expect("inner supervisor did not launch a sandbox");
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    // Still alive after the launching thread ended.
    std::thread::sleep(Duration::from_millis(300));
    assert!(proc_dir.exists(), "sandbox died with the launching thread");
    child.kill().unwrap();
    child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while proc_dir.exists() {
        // A zombie (reparented to init, not yet reaped) counts as dead.
        let st = fs::read_to_string(proc_dir.join("stat")).unwrap_or_default();
        if st.is_empty() || st.contains(") Z ") {
            break;
        }
        assert!(Instant::now() < deadline, "sandbox survived its supervisor");
        std::thread::sleep(Duration::from_millis(20));
    }
    if let Some(d) = dir {
        let _ = fs::remove_dir_all(d);
    }
}

#[test]
#[ignore = "run by sandbox_dies_with_supervisor"]
fn supervisor_inner() {
    assert!(
        std::env::var("AIRLOCK_TEST_SUPERVISOR").is_ok(),
        "run via sandbox_dies_with_supervisor"
    );
    let sb = Sandbox::new();
    let guest = sb.script("sleep 1000");
    let spec = sb.spec(&guest, vec![]);
    // Launch from a short-lived thread.
    let inst = std::thread::spawn(move || {
        NamespaceBackend::with_init_program(init_program())
            .launch(spec)
            .unwrap()
    })
    .join()
    .unwrap();
    println!("SANDBOX_DIR {}", sb.dir.path().display());
    println!("SANDBOX_PID {}", inst.pid());
    std::mem::forget(sb);
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// `NetworkMode::Tap`: the init creates `eth0` (10.0.2.15/24, MTU 65520, no IPv6) with
/// a default route via 10.0.2.2 inside the sandbox's netns and hands the TAP fd over.
#[test]
fn tap_network_mode() {
    use airlock_backend::NetworkMode;
    use std::io::Read;
    use std::os::fd::AsRawFd;
    let sb = Sandbox::new();
    let guest = sb.script(
        r#"
r() { echo "RESULT $1=$2"; }
r links "$(ls /sys/class/net | tr '\n' ' ')"
r mtu "$(cat /sys/class/net/eth0/mtu)"
r up "$(cat /sys/class/net/eth0/operstate)"
grep -q '10.0.2.15' /proc/net/fib_trie && r addr yes || r addr no
r gw "$(awk '$1=="eth0" && $2=="00000000" {print $3}' /proc/net/route)"
r v6 "$(cat /proc/sys/net/ipv6/conf/eth0/disable_ipv6 2>/dev/null || echo none)"
r fds "$(ls /proc/self/fd | sort -n | tr '\n' ' ')"
# Send one frame: an ARP request for the gateway shows up on the TAP fd.
bash -c 'echo x > /dev/udp/10.0.2.2/9' 2>/dev/null
true
"#,
    );
    let mut inst = NamespaceBackend::with_init_program(init_program())
        .with_network(NetworkMode::Tap)
        .launch(sb.spec(&guest, vec![]))
        .unwrap_or_else(|e| panic!("launch failed: {e}\nconsole:\n{}", sb.console_text()));
    let (tap, kind) = inst.take_network().expect("TAP fd received");
    assert_eq!(kind, airlock_backend::LinkKind::Tap);
    assert!(inst.take_network().is_none(), "the fd is handed out once");
    let fdinfo = fs::read_to_string(format!("/proc/self/fdinfo/{}", tap.as_raw_fd())).unwrap();
    assert!(fdinfo.contains("iff:\teth0"), "not the TAP eth0: {fdinfo}");
    // The guest's first frame (ARP for 10.0.2.2) arrives on the fd.
    let mut pfd = libc::pollfd {
        fd: tap.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let ready = unsafe { libc::poll(&mut pfd, 1, 20_000) };
    assert_eq!(
        ready,
        1,
        "no frame from the guest within 20 s\n{}",
        sb.console_text()
    );
    let mut f = fs::File::from(tap);
    let mut buf = vec![0u8; 70000];
    let n = f.read(&mut buf).unwrap();
    assert!(n >= 42, "short frame {n}");
    assert_eq!(
        &buf[12..14],
        &[0x08, 0x06],
        "expected ARP, got {:02x?}",
        &buf[..n.min(64)]
    );
    assert_eq!(&buf[38..42], &[10, 0, 2, 2], "ARP target");
    let status = wait_timeout(&mut *inst, Duration::from_secs(60));
    let log = sb.console_text();
    assert!(status.success(), "{status}\n{log}");
    let mut r = HashMap::new();
    for line in log.lines() {
        if let Some((k, v)) = line
            .strip_prefix("RESULT ")
            .and_then(|kv| kv.split_once('='))
        {
            r.insert(k.to_string(), v.to_string());
        }
    }
    r.insert("__log".into(), log.clone());
    let links = get(&r, "links");
    assert!(links.contains("eth0") && links.contains("lo"), "{links}");
    assert_eq!(get(&r, "mtu"), "65520");
    assert_eq!(get(&r, "addr"), "yes");
    assert_eq!(get(&r, "gw"), "0202000A", "default route via 10.0.2.2");
    assert_eq!(get(&r, "v6"), "1");
    assert_eq!(
        get(&r, "up"),
        "unknown",
        "TAP with a reader is up (operstate unknown)"
    );
    // The TAP fd and the socket it came over were not left to the guest.
    let fds: Vec<&str> = get(&r, "fds").split_whitespace().collect();
    assert!(fds.len() <= 5, "unexpected fds in the guest: {fds:?}");
}
