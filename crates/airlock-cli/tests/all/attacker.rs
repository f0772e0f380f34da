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

#[test]
fn raw_network_access_goes_nowhere() {
    let w = World::new();
    let sb = w.sandbox("raw");
    for (what, cmd) in [
        ("raw TCP to a public address", format!("timeout 5 bash -c 'echo x > /dev/tcp/{ALLOWED_IP}/80'")),
        ("raw TCP to metadata", format!("timeout 5 bash -c 'echo x > /dev/tcp/{METADATA_IP}/80'")),
        ("raw TCP to the host's veth", "timeout 5 bash -c 'echo x > /dev/tcp/10.200.0.1/22'".into()),
        ("curl ignoring the proxy", format!("curl -sS -m 5 --noproxy '*' http://{ALLOWED_IP}/")),
        ("UDP DNS query", format!("timeout 5 python3 -c \"import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.sendto(b'x', ('{DNS_IP}', 53))\"")),
    ] {
        let out = w.sh(&sb, &cmd);
        assert_fails(&out, what);
    }
    // The sandbox's own loopback is its own: the host service is not there.
    let out = w.sh(
        &sb,
        &format!(
            "timeout 5 bash -c 'echo x > /dev/tcp/127.0.0.1/{}'",
            w.host_port
        ),
    );
    assert_fails(&out, "host loopback service via raw TCP");
    let out = w.sh(&sb, "ip -o link show | awk '{print $2}'");
    let links = text(&out.stdout);
    assert_eq!(links.trim(), "lo:", "unexpected interfaces: {links}");
    assert!(w.outer.hits().is_empty(), "leaked: {:?}", w.outer.hits());
    assert!(
        w.host_service.hits().is_empty(),
        "leaked: {:?}",
        w.host_service.hits()
    );
}
