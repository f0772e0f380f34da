//! The same CLI against the microVM backend (QEMU microvm; TCG here).
//! Needs the VM tools (scripts/vm-deps.sh); scripts/test.sh installs them
//! and runs these with `--ignored`. They never pass silently: without the
//! tools the run fails with the backend's error.

use crate::world::*;

#[test]
#[ignore = "needs VM tools (scripts/vm-deps.sh); run by scripts/test.sh with --ignored"]
fn vm_sandbox_isolates_and_cleans_up() {
    let w = World::new();
    let ws = w.ws.display().to_string();
    let ro = format!("{}:ro", w.ro.display());
    let home = w.home.display().to_string();
    let host_kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let out = w.airlock(&[
        "run",
        "shell",
        &ws,
        &ro,
        "--name",
        "vm1",
        "--isolation",
        "vm",
        "--",
        "uname",
        "-r",
    ]);
    assert_ok(&out, "run --isolation vm");
    let guest_kernel = text(&out.stdout);
    assert_ne!(
        guest_kernel.trim(),
        host_kernel.trim(),
        "same kernel as the host"
    );
    let v: serde_json::Value =
        serde_json::from_slice(&w.airlock(&["ls", "--json"]).stdout).unwrap();
    assert_eq!(v[0]["backend"], "vm");
    let sh = |script: &str| w.sh("vm1", script);
    // Workspaces at the same path, both ways, at once.
    assert_ok(
        &sh(&format!("echo from-vm > {ws}/vm-made")),
        "write workspace",
    );
    assert_eq!(
        std::fs::read_to_string(w.ws.join("vm-made")).unwrap(),
        "from-vm\n"
    );
    std::fs::write(w.ws.join("host-made"), "from-host\n").unwrap();
    assert_eq!(
        text(&sh(&format!("cat {ws}/host-made")).stdout),
        "from-host\n"
    );
    // The attacker's first tries.
    for (what, script) in [
        ("write :ro workspace", format!("touch {}/x", w.ro.display())),
        (
            "remount :ro rw",
            format!("mount -o remount,rw {}", w.ro.display()),
        ),
        (
            "read planted ssh key",
            format!("cat {home}/.ssh/id_ed25519"),
        ),
        ("docker socket", "test -e /var/run/docker.sock".to_string()),
        (
            "host block device",
            "ls /dev/sd* /dev/nvme* 2>/dev/null | grep -q .".to_string(),
        ),
    ] {
        assert_fails(&sh(&script), what);
    }
    let env = text(&sh("env").stdout);
    assert!(!env.contains(HOST_SECRET), "host secret leaked: {env}");
    let blocks = text(&sh("ls /sys/block").stdout);
    assert_eq!(
        blocks.split_whitespace().collect::<Vec<_>>(),
        vec!["vda"],
        "{blocks}"
    );
    // Stop/start keeps the root disk; rm leaves nothing behind.
    assert_ok(&sh("echo kept > /root/state"), "write root");
    assert_ok(&w.airlock(&["stop", "vm1"]), "stop");
    assert_ok(&w.airlock(&["start", "vm1"]), "start");
    assert_eq!(text(&sh("cat /root/state").stdout), "kept\n");
    let dir = v[0]["dir"].as_str().unwrap().to_string();
    assert_ok(&w.airlock(&["rm", "-f", "vm1"]), "rm");
    assert!(!std::path::Path::new(&dir).exists(), "{dir} left behind");
    let ps = std::process::Command::new("ps")
        .args(["-eo", "args"])
        .output()
        .unwrap();
    let left: Vec<String> = text(&ps.stdout)
        .lines()
        .filter(|l| l.contains(&dir) || l.contains(w.data.to_str().unwrap()))
        .map(String::from)
        .collect();
    assert!(left.is_empty(), "processes left: {left:?}");
    assert!(w.outer.hits().is_empty(), "leaked: {:?}", w.outer.hits());
}

/// The VM's NIC reaches only airlock's egress path: the explicit proxy at
/// 10.0.2.2:3128, airlock's DNS, and transparent capture of the rest,
/// under the same policy and log as the namespace backend.
#[test]
#[ignore = "needs VM tools (scripts/vm-deps.sh); run by scripts/test.sh with --ignored"]
fn vm_network_goes_through_the_egress_path() {
    let w = World::new();
    let ws = w.ws.display().to_string();
    let out = w.airlock(&[
        "run",
        "shell",
        &ws,
        "--name",
        "vmnet",
        "--isolation",
        "vm",
        "--",
        "true",
    ]);
    assert_ok(&out, "run --isolation vm");
    w.track("vmnet");
    let sh = |script: &str| w.sh("vmnet", script);
    // eth0 as the namespace backend's TAP: address, MTU, route, no IPv6;
    // the proxy is the gateway, not a relay on loopback.
    let t = text(
        &sh(
            "ip -o -4 addr show dev eth0; cat /sys/class/net/eth0/mtu; ip route; \
             ip -6 -o addr show scope global | wc -l; echo $HTTP_PROXY; cat /etc/resolv.conf",
        )
        .stdout,
    );
    for want in [
        "10.0.2.15/24",
        "65520",
        "default via 10.0.2.2 dev eth0",
        "http://10.0.2.2:3128",
        "nameserver 10.0.2.3",
    ] {
        assert!(t.contains(want), "{want} missing in:\n{t}");
    }
    assert!(
        t.lines().any(|l| l.trim() == "0"),
        "IPv6 address present:\n{t}"
    );
    let curl = |args: &str| {
        let out = sh(&format!(
            "curl -sS -m 10 -o - -w '\\n%{{http_code}}' {args} 2>&1"
        ));
        let so = text(&out.stdout);
        (so.lines().last().unwrap_or("").to_string(), so)
    };
    // Through the explicit proxy: forbidden places are refused by airlock.
    for url in [
        format!("http://{METADATA_IP}/latest/meta-data/"),
        format!("http://{PRIVATE10_IP}/"),
        "http://metadata.test/".to_string(),
    ] {
        let (code, body) = curl(&url);
        assert_eq!(code, "403", "{url} not blocked: {body}");
        assert!(body.contains("airlock: blocked"), "{body}");
    }
    let (code, body) = curl("http://allowed.test/via-proxy");
    assert_eq!(code, "200", "{body}");
    assert!(body.contains("hello from outer"), "{body}");
    // Ignoring the proxy: airlock's DNS and transparent capture.
    let (code, body) = curl("--noproxy '*' http://allowed.test/direct");
    assert_eq!(code, "200", "{body}");
    assert!(body.contains("hello from outer"), "{body}");
    let (_, body) = curl(&format!("--noproxy '*' http://{METADATA_IP}/latest/"));
    assert!(!body.contains("hello from"), "{body}");
    let (_, body) = curl(&format!("--noproxy '*' http://{PRIVATE10_IP}/"));
    assert!(!body.contains("hello from"), "{body}");
    // DNS is airlock's: names resolve under the policy.
    let t = text(&sh("getent hosts allowed.test; getent hosts metadata.test; true").stdout);
    assert!(t.contains(ALLOWED_IP), "{t}");
    assert!(!t.contains(METADATA_IP), "{t}");
    // Raw TCP to a public address's port 22 reaches nothing.
    let t = text(
        &sh(&format!(
            "timeout 8 bash -c 'exec 3<>/dev/tcp/{ALLOWED_IP}/22 && \
             printf \"SSH-2.0-x\\r\\n\" >&3 && timeout 3 cat <&3'; echo rc=$?"
        ))
        .stdout,
    );
    assert!(!t.contains("hello from"), "{t}");
    // What arrived outside: only the two allowed requests.
    for ip in [METADATA_IP, PRIVATE10_IP, PRIVATE192_IP, BLOCKED_IP] {
        assert!(
            w.outer.hits_to(ip).is_empty(),
            "leaked: {:?}",
            w.outer.hits_to(ip)
        );
    }
    let hits = w.outer.hits_to(ALLOWED_IP);
    assert!(
        hits.iter().all(|h| h.local.port() == 80),
        "port 22 reached: {hits:?}"
    );
    for p in ["/via-proxy", "/direct"] {
        assert!(
            hits.iter().any(|h| h.first_line.contains(p)),
            "{p}: {hits:?}"
        );
    }
    assert!(w.host_service.hits().is_empty());
    assert!(w.udp.hits().is_empty(), "UDP leaked: {:?}", w.udp.hits());
    // Every decision is logged, on the proxy, transparent and DNS paths.
    let evs = w.events("vmnet");
    let blocked = |host: &str| {
        evs.iter()
            .any(|e| e["host"] == host && e["action"] == "block" && e["sandbox"] == "vmnet")
    };
    for h in [METADATA_IP, PRIVATE10_IP, "metadata.test"] {
        assert!(blocked(h), "no block event for {h}: {evs:#?}");
    }
    assert!(
        evs.iter()
            .any(|e| e["path"] == "transparent" && e["port"] == 22 && e["action"] == "block"),
        "{evs:#?}"
    );
    assert!(
        evs.iter().any(|e| e["path"] == "transparent"
            && e["host"] == "allowed.test"
            && e["action"] == "allow"),
        "{evs:#?}"
    );
    // A live policy change applies to the VM as well.
    assert_ok(
        &w.airlock(&[
            "network",
            "proxy",
            "vmnet",
            "--policy",
            "deny",
            "--allow-host",
            "blocked.test",
        ]),
        "network proxy --policy deny",
    );
    let (code, body) = curl("http://allowed.test/after-deny");
    assert_eq!(code, "403", "{body}");
    let (code, body) = curl("--noproxy '*' http://allowed.test/after-deny");
    assert_ne!(code, "200", "{body}");
    assert!(
        !w.outer
            .hits()
            .iter()
            .any(|h| h.first_line.contains("/after-deny")),
        "deny mode leaked"
    );
}

/// `docker` template (Debian's docker.io): each VM sandbox runs its own
/// dockerd (started by the guest agent in the background); images built
/// or imported there are invisible to another sandbox and to the host.
#[test]
#[ignore = "needs VM tools (scripts/vm-deps.sh); run by scripts/test.sh with --ignored"]
fn vm_private_docker_daemon() {
    let tmpl = templates_dir().join("docker");
    assert!(
        tmpl.is_dir(),
        "the docker template is not built in {}; build it with \
         `airlock template build docker --package docker.io --package docker-cli`",
        templates_dir().display()
    );
    let w = World::new();
    let ws = w.ws.display().to_string();
    for name in ["dock1", "dock2"] {
        let out = w.airlock(&[
            "run",
            "shell",
            &ws,
            "--name",
            name,
            "-t",
            "docker",
            "--isolation",
            "vm",
            "--",
            "true",
        ]);
        assert_ok(&out, "run -t docker --isolation vm");
        w.track(name);
    }
    let wait = "timeout 120 sh -c 'until docker info >/dev/null 2>&1; do sleep 0.5; done' \
                || { tail -20 /var/log/dockerd.log; exit 1; }";
    for name in ["dock1", "dock2"] {
        assert_ok(&w.sh(name, wait), "dockerd up");
    }
    // Build FROM scratch with a static binary, and import a tarball; run both.
    let script = r#"set -e
d=$(mktemp -d)
cp /usr/bin/tini-static "$d/tini"
printf 'FROM scratch\nCOPY tini /tini\nENTRYPOINT ["/tini", "--version"]\n' > "$d/Dockerfile"
DOCKER_BUILDKIT=0 docker build -q -t airlock-test/built "$d" >/dev/null
docker run --rm airlock-test/built
tar -C "$d" -c tini | docker import - airlock-test/imported >/dev/null
docker run --rm --network none airlock-test/imported /tini --version
docker images --format '{{.Repository}}' | sort | tr '\n' ' '
docker info --format 'name={{.Name}}'
"#;
    let out = w.sh("dock1", script);
    assert_ok(&out, "docker build/import/run");
    let t = text(&out.stdout);
    assert_eq!(t.matches("tini version").count(), 2, "{t}");
    assert!(
        t.contains("airlock-test/built airlock-test/imported"),
        "{t}"
    );
    assert!(
        t.contains("name=dock1"),
        "not the sandbox's own daemon: {t}"
    );
    // A container on dockerd's default bridge leaves through the VM's NIC,
    // so airlock's policy applies to it too: the proxy at 10.0.2.2:3128
    // serves an allowed name, the metadata address gets nothing.
    let script = format!(
        r#"set -e
d=$(mktemp -d)
# Only bash (and its libraries) in the image: no cat, no timeout.
for f in /usr/bin/bash $(ldd /usr/bin/bash | grep -o '/[^ ]*'); do
  mkdir -p "$d$(dirname "$f")"; cp -L "$f" "$d$f"
done
tar -C "$d" -c . | docker import - airlock-test/bash >/dev/null
docker network ls --format '{{{{.Name}}}}' | grep -qx bridge
docker run --rm airlock-test/bash /usr/bin/bash -c '
exec 3<>/dev/tcp/10.0.2.2/3128
printf "GET http://allowed.test/from-container HTTP/1.1\r\nHost: allowed.test\r\nConnection: close\r\n\r\n" >&3
while IFS= read -r -t 10 l <&3; do echo "$l"; done
exec 4<>/dev/tcp/{METADATA_IP}/80 || exit 0
printf "GET /latest/ HTTP/1.1\r\nHost: {METADATA_IP}\r\nConnection: close\r\n\r\n" >&4
while IFS= read -r -t 10 l <&4; do echo "$l"; done; true'
"#
    );
    let out = w.sh("dock1", &script);
    assert_ok(&out, "container on the bridge");
    let t = text(&out.stdout);
    assert!(t.contains("hello from outer"), "{t}");
    assert!(
        !t.contains(&format!("hello from outer at {METADATA_IP}")),
        "{t}"
    );
    assert!(
        w.outer.hits_to(METADATA_IP).is_empty(),
        "leaked from a container"
    );
    assert!(
        w.outer
            .hits_to(ALLOWED_IP)
            .iter()
            .any(|h| h.first_line.contains("/from-container")),
        "{:?}",
        w.outer.hits()
    );
    let evs = w.events("dock1");
    assert!(
        evs.iter()
            .any(|e| e["host"] == METADATA_IP && e["action"] == "block"),
        "{evs:#?}"
    );
    // The other sandbox has its own, empty daemon.
    let out = w.sh(
        "dock2",
        "docker images -q | wc -l; docker info --format 'name={{.Name}}'",
    );
    assert_ok(&out, "docker images in dock2");
    assert_eq!(text(&out.stdout), "0\nname=dock2\n");
    // The host has no engine and sees nothing: no daemon socket appeared.
    assert!(!std::path::Path::new("/var/run/docker.sock").exists());
}
