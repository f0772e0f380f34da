//! airlock invoked by an unprivileged user: the whole chain (CLI,
//! supervisor, egress, namespace backend) with a single-uid mapping.

use crate::world::*;
use std::os::unix::fs::MetadataExt;
use std::process::Command;

const USER: &str = "airlock-test";

fn ensure_user() -> u32 {
    let id = Command::new("id").args(["-u", USER]).output().unwrap();
    if !id.status.success() {
        let st = Command::new("useradd")
            .args(["--create-home", "--shell", "/bin/bash", USER])
            .status()
            .expect("useradd (passwd) is needed for this test");
        assert!(st.success(), "useradd {USER}");
    }
    let id = Command::new("id").args(["-u", USER]).output().unwrap();
    text(&id.stdout).trim().parse().unwrap()
}

#[test]
fn unprivileged_user_runs_a_sandbox() {
    // The world's namespaces keep the user's egress engine off the real
    // network; its listeners catch any leak.
    let w = World::new();
    let uid = ensure_user();
    let tmp = tempfile::Builder::new()
        .prefix("alu")
        .tempdir_in("/tmp")
        .unwrap();
    let dir = tmp.path();
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    // The user's own template, imported from the shared one (files end up
    // owned by the user, who is root inside).
    let tar = dir.join("root.tar");
    let rootfs = templates_dir().join("base/rootfs");
    let st = Command::new("tar")
        .arg("-cf")
        .arg(&tar)
        .arg("-C")
        .arg(&rootfs)
        .arg(".")
        .status()
        .unwrap();
    assert!(st.success(), "tar of the base template");
    let home = dir.join("home");
    let ws = home.join("proj");
    std::fs::create_dir_all(&ws).unwrap();
    for p in [&home, &ws] {
        std::os::unix::fs::chown(p, Some(uid), Some(uid)).unwrap();
    }
    std::fs::set_permissions(&tar, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let as_user = |args: &[&str]| {
        Command::new("ip")
            .args(["netns", "exec", &w.ns_in, "setpriv"])
            .args([
                &format!("--reuid={uid}"),
                &format!("--regid={uid}"),
                "--clear-groups",
                "--",
                airlock_bin(),
            ])
            .args(args)
            .current_dir(&ws)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("HOME", &home)
            .env(
                "AIRLOCK_GUEST",
                std::env::var("AIRLOCK_GUEST").unwrap_or_default(),
            )
            .output()
            .unwrap()
    };
    let out = as_user(&["template", "import", "base", tar.to_str().unwrap()]);
    assert_ok(&out, "template import as the user");
    let out = as_user(&[
        "run",
        "shell",
        "--",
        "bash",
        "-c",
        "id -u; cat /proc/self/uid_map; echo mine > made-by-sandbox; grep -c . /proc/self/status >/dev/null",
    ]);
    assert_ok(&out, "run as the user");
    let t = text(&out.stdout);
    assert!(t.starts_with("0\n"), "{t}");
    // Only the user's own uid is mapped (to root inside).
    let map: Vec<&str> = t.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(map, vec!["0", &uid.to_string(), "1"], "{t}");
    let meta = std::fs::metadata(ws.join("made-by-sandbox")).unwrap();
    assert_eq!(meta.uid(), uid);
    // The sandbox's egress is the user's: a blocked destination is refused.
    let out = as_user(&[
        "exec",
        "shell-proj",
        "curl",
        "-sS",
        "-m",
        "5",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "http://169.254.169.254/",
    ]);
    assert_eq!(text(&out.stdout), "403", "{}", text(&out.stderr));
    assert!(w.outer.hits().is_empty(), "leaked: {:?}", w.outer.hits());
    let out = as_user(&["rm", "-f", "shell-proj"]);
    assert_ok(&out, "rm as the user");
    // State lives in the user's home, not in root's.
    assert!(home.join(".local/share/airlock/state.db").exists());
}
