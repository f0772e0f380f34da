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
