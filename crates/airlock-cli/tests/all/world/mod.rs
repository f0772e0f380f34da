//! The test world (DESIGN §8): airlock and its egress engine run inside a
//! network namespace this test creates ("inner"), whose only way out is a
//! veth into a second namespace ("outer") holding the addresses an attacker
//! would aim at — 169.254.169.254, a 10.x and a 192.168.x address, public
//! stand-ins, a DNS stand-in — each served by listeners this test owns. A
//! leak lands on a test listener and fails the test; no packet can leave
//! the machine whatever the code under test does.
//!
//! Names are resolved through `/etc/netns/<inner>/hosts`, which
//! `ip netns exec` mounts over /etc/hosts for airlock (and so for its
//! supervisor and egress engine).

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub const ALLOWED_IP: &str = "11.0.0.80";
pub const BLOCKED_IP: &str = "11.0.0.81";
pub const DNS_IP: &str = "11.0.0.53";
pub const METADATA_IP: &str = "169.254.169.254";
pub const PRIVATE10_IP: &str = "10.99.0.1";
pub const PRIVATE192_IP: &str = "192.168.99.1";
/// The HTTPS upstream of the TLS tests (api.test, other.test, bypass.test).
pub const TLS_IP: &str = "11.0.0.90";
/// A value set in airlock's environment on the host; it must never appear
/// inside.
pub const HOST_SECRET: &str = "sk-ant-host-secret-DO-NOT-LEAK";

static COUNTER: AtomicUsize = AtomicUsize::new(0);

pub fn airlock_bin() -> &'static str {
    env!("CARGO_BIN_EXE_airlock")
}

/// Fail loudly (never pass silently) when the suite cannot run here.
pub fn require_root() {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        panic!("the sandbox integration suite needs root (network namespaces, test listeners); run it with sudo or via scripts/test.sh");
    }
}

/// Template cache shared by all tests (built once by scripts/test.sh).
pub fn templates_dir() -> PathBuf {
    std::env::var_os("AIRLOCK_TEMPLATES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/airlock/templates"))
}

fn require_template() {
    let meta = templates_dir().join("base");
    if !meta.is_dir() {
        panic!(
            "the base template is not built in {}; run `scripts/test.sh` (it builds it) or `airlock template build`",
            templates_dir().display()
        );
    }
}

#[derive(Debug, Clone)]
pub struct Hit {
    pub local: SocketAddr,
    pub first_line: String,
    pub host: Option<String>,
}

/// A listener that records every connection and, for HTTP, answers 200
/// with a body naming it.
#[derive(Clone)]
pub struct Recorder {
    pub hits: Arc<Mutex<Vec<Hit>>>,
    pub name: String,
}

impl Recorder {
    fn new(name: &str) -> Recorder {
        Recorder {
            hits: Arc::new(Mutex::new(Vec::new())),
            name: name.into(),
        }
    }

    pub fn hits(&self) -> Vec<Hit> {
        self.hits.lock().unwrap().clone()
    }

    pub fn hits_to(&self, ip: &str) -> Vec<Hit> {
        self.hits()
            .into_iter()
            .filter(|h| h.local.ip().to_string() == ip)
            .collect()
    }

    fn serve(&self, l: TcpListener) {
        let me = self.clone();
        std::thread::spawn(move || {
            for conn in l.incoming() {
                let Ok(conn) = conn else { continue };
                let me = me.clone();
                std::thread::spawn(move || me.handle(conn));
            }
        });
    }

    fn serve_udp(&self, sock: UdpSocket) {
        let me = self.clone();
        std::thread::spawn(move || {
            let local = sock.local_addr().unwrap();
            let mut buf = [0u8; 2048];
            while let Ok((n, from)) = sock.recv_from(&mut buf) {
                me.hits.lock().unwrap().push(Hit {
                    local,
                    first_line: format!("udp {n} bytes from {from}"),
                    host: None,
                });
            }
        });
    }

    fn handle(&self, mut conn: TcpStream) {
        let local = conn.local_addr().unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(5))).ok();
        let mut r = BufReader::new(conn.try_clone().unwrap());
        let mut first = String::new();
        let _ = r.read_line(&mut first);
        let mut host = None;
        let mut len = 0usize;
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
                break;
            }
            let lower = line.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("host:") {
                host = Some(v.trim().to_string());
            }
            if let Some(v) = lower.strip_prefix("content-length:") {
                len = v.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0; len.min(1 << 20)];
        let _ = r.read_exact(&mut body);
        self.hits.lock().unwrap().push(Hit {
            local,
            first_line: first.trim().to_string(),
            host,
        });
        let reply = format!("hello from {} at {}\n", self.name, local.ip());
        let _ = write!(
            conn,
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
            reply.len(),
            reply
        );
    }
}

/// Run `f` on a new thread that has entered network namespace `ns`
/// (setns only affects the calling thread).
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let fd = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        // SAFETY: setns on a namespace fd we opened; affects this thread only.
        let r = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .unwrap()
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub struct World {
    pub tmp: tempfile::TempDir,
    pub home: PathBuf,
    pub ws: PathBuf,
    pub ro: PathBuf,
    pub data: PathBuf,
    pub ns_in: String,
    pub ns_out: String,
    /// Listeners on every outer address, ports 80, 443 and 22.
    pub outer: Recorder,
    /// A service on the inner namespace's 127.0.0.1 (the "host" loopback).
    pub host_service: Recorder,
    pub host_port: u16,
    /// UDP listeners on every outer address, ports 53 and 9999.
    pub udp: Recorder,
    /// Extra environment for every airlock command (tests that need it).
    pub extra_env: Mutex<Vec<(String, String)>>,
    names: Mutex<Vec<String>>,
}

impl World {
    pub fn new() -> World {
        require_root();
        require_template();
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let tag = format!("{}{}", std::process::id() % 100000, n);
        let ns_in = format!("alin{tag}");
        let ns_out = format!("alout{tag}");
        let (va, vb) = (format!("ali{tag}"), format!("alo{tag}"));
        ip(&["netns", "add", &ns_in]);
        ip(&["netns", "add", &ns_out]);
        ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb]);
        ip(&["link", "set", &va, "netns", &ns_in]);
        ip(&["link", "set", &vb, "netns", &ns_out]);
        let ipn = |ns: &str, rest: &[&str]| {
            let mut a = vec!["-n", ns];
            a.extend_from_slice(rest);
            ip(&a);
        };
        ipn(&ns_in, &["link", "set", "lo", "up"]);
        ipn(&ns_in, &["addr", "add", "10.200.0.2/24", "dev", &va]);
        ipn(&ns_in, &["link", "set", &va, "up"]);
        ipn(&ns_in, &["route", "add", "default", "via", "10.200.0.1"]);
        ipn(&ns_out, &["link", "set", "lo", "up"]);
        ipn(&ns_out, &["addr", "add", "10.200.0.1/24", "dev", &vb]);
        ipn(&ns_out, &["link", "set", &vb, "up"]);
        for a in [
            ALLOWED_IP,
            BLOCKED_IP,
            DNS_IP,
            METADATA_IP,
            PRIVATE10_IP,
            PRIVATE192_IP,
        ] {
            ipn(&ns_out, &["addr", "add", &format!("{a}/32"), "dev", "lo"]);
        }
        // Names for the egress engine's resolver.
        let etc = PathBuf::from(format!("/etc/netns/{ns_in}"));
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::write(
            etc.join("hosts"),
            format!(
                "127.0.0.1 localhost\n{ALLOWED_IP} allowed.test\n{BLOCKED_IP} blocked.test\n127.0.0.1 rebind.test\n{METADATA_IP} metadata.test\n{PRIVATE10_IP} internal.test\n{TLS_IP} api.test other.test bypass.test\n"
            ),
        )
        .unwrap();
        std::fs::write(etc.join("resolv.conf"), format!("nameserver {DNS_IP}\n")).unwrap();

        let outer = Recorder::new("outer");
        ipn(
            &ns_out,
            &["addr", "add", &format!("{TLS_IP}/32"), "dev", "lo"],
        );
        for ip in [
            ALLOWED_IP,
            BLOCKED_IP,
            DNS_IP,
            METADATA_IP,
            PRIVATE10_IP,
            PRIVATE192_IP,
        ] {
            for port in [80u16, 443, 22] {
                let l = in_netns(&ns_out, move || TcpListener::bind((ip, port)).unwrap());
                outer.serve(l);
            }
        }
        let udp = Recorder::new("udp");
        for port in [53u16, 9999] {
            let sock = in_netns(&ns_out, move || UdpSocket::bind(("0.0.0.0", port)).unwrap());
            udp.serve_udp(sock);
        }
        let host_service = Recorder::new("host-service");
        let l = in_netns(&ns_in, || TcpListener::bind("127.0.0.1:0").unwrap());
        let host_port = l.local_addr().unwrap().port();
        host_service.serve(l);

        let tmp = tempfile::Builder::new()
            .prefix("al")
            .tempdir_in("/tmp")
            .unwrap();
        let home = tmp.path().join("home");
        let ws = home.join("proj");
        let ro = home.join("docs");
        let data = tmp.path().join("d");
        for d in [&ws, &ro, &home.join(".ssh"), &home.join(".aws")] {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::write(home.join(".ssh/id_ed25519"), "PLANTED-SSH-KEY\n").unwrap();
        std::fs::write(home.join(".aws/credentials"), "PLANTED-AWS-CREDS\n").unwrap();
        std::fs::write(ro.join("readme.txt"), "read only\n").unwrap();
        World {
            tmp,
            home,
            ws,
            ro,
            data,
            ns_in,
            ns_out,
            outer,
            host_service,
            host_port,
            udp,
            extra_env: Mutex::new(Vec::new()),
            names: Mutex::new(Vec::new()),
        }
    }

    /// `airlock ARGS` inside the inner namespace, as the test user would
    /// run it (HOME = the planted home, a host secret in the environment).
    pub fn airlock(&self, args: &[&str]) -> Output {
        self.airlock_cmd(args).output().expect("run airlock")
    }

    pub fn airlock_cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns_in, airlock_bin()])
            .args(args)
            .current_dir(&self.ws)
            .env("HOME", &self.home)
            .env("AIRLOCK_HOME", &self.data)
            .env("AIRLOCK_TEMPLATES", templates_dir())
            .env("ANTHROPIC_API_KEY", HOST_SECRET)
            .envs(self.extra_env.lock().unwrap().clone())
            .stdin(Stdio::null());
        c
    }

    /// Create and start a sandbox `name` with the world's workspaces.
    pub fn sandbox(&self, name: &str) -> String {
        let ro = format!("{}:ro", self.ro.display());
        let ws = self.ws.display().to_string();
        let out = self.airlock(&["run", "shell", &ws, &ro, "--name", name, "--", "true"]);
        assert_ok(&out, "run sandbox");
        self.names.lock().unwrap().push(name.to_string());
        name.to_string()
    }

    /// `bash -c SCRIPT` inside sandbox `name`.
    pub fn sh(&self, name: &str, script: &str) -> Output {
        self.airlock(&["exec", name, "bash", "-c", script])
    }

    pub fn track(&self, name: &str) {
        self.names.lock().unwrap().push(name.to_string());
    }

    pub fn events(&self, name: &str) -> Vec<serde_json::Value> {
        // Events reach the store through the supervisor's writer thread a
        // moment after the request; give it that moment.
        std::thread::sleep(Duration::from_millis(300));
        let out = self.airlock(&["network", "log", name, "--json"]);
        assert_ok(&out, "network log");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    pub fn data_dir(&self) -> &Path {
        &self.data
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // Keep the evidence: logs of every sandbox and the audit file.
            let keep = PathBuf::from("/tmp/airlock-test-artifacts")
                .join(self.tmp.path().file_name().unwrap());
            let _ = std::fs::create_dir_all(&keep);
            let _ = Command::new("cp")
                .args(["-r"])
                .arg(&self.data)
                .arg(&keep)
                .stderr(Stdio::null())
                .status();
            eprintln!("test artifacts kept in {}", keep.display());
        }
        let out = self.airlock(&["ls", "-q"]);
        for n in String::from_utf8_lossy(&out.stdout).lines() {
            let _ = self.airlock(&["rm", "-f", n]);
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.ns_in])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.ns_out])
            .status();
        let _ = std::fs::remove_dir_all(format!("/etc/netns/{}", self.ns_in));
    }
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[track_caller]
pub fn assert_ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed ({:?})\nstdout: {}\nstderr: {}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
}

#[track_caller]
pub fn assert_fails(out: &Output, what: &str) {
    assert!(
        !out.status.success(),
        "{what} unexpectedly succeeded\nstdout: {}\nstderr: {}",
        text(&out.stdout),
        text(&out.stderr)
    );
}
