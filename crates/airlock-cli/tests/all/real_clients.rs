//! Real clients against the package registries this machine can reach
//! (the only tests that use the real network, and only toward those
//! registries): from inside a sandbox in deny mode, through the egress
//! engine with TLS termination on, verified upstream with the host's roots.

use crate::world::*;
use std::process::{Command, Stdio};

const REGISTRIES: &[&str] = &[
    "registry.npmjs.org",
    "deb.debian.org",
    "pypi.org",
    "files.pythonhosted.org",
];

#[test]
fn package_managers_work_through_the_engine() {
    require_root();
    let tmp = tempfile::Builder::new()
        .prefix("alr")
        .tempdir_in("/tmp")
        .unwrap();
    let ws = tmp.path().join("proj");
    std::fs::create_dir_all(&ws).unwrap();
    let data = tmp.path().join("d");
    let airlock = |args: &[&str]| {
        Command::new(airlock_bin())
            .args(args)
            .current_dir(&ws)
            .env("AIRLOCK_HOME", &data)
            .env("AIRLOCK_TEMPLATES", templates_dir())
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    // Remove the sandbox even when an assertion below fails.
    struct Cleanup<'a>(&'a dyn Fn(&[&str]) -> std::process::Output);
    impl Drop for Cleanup<'_> {
        fn drop(&mut self) {
            let _ = (self.0)(&["rm", "-f", "real"]);
        }
    }
    let _cleanup = Cleanup(&airlock);
    let out = airlock(&[
        "run",
        "shell",
        ws.to_str().unwrap(),
        "--name",
        "real",
        "--",
        "true",
    ]);
    assert_ok(&out, "run");
    let mut args = vec![
        "network".to_string(),
        "proxy".into(),
        "real".into(),
        "--policy".into(),
        "deny".into(),
    ];
    for r in REGISTRIES {
        args.extend(["--allow-host".into(), r.to_string()]);
        // An exact host rule also unlocks that host's address when this
        // machine's resolver maps it into a reserved range (an
        // intercepting gateway), so no CIDR rule is needed (one would
        // also let every other name at that address through).
    }
    let argv: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    assert_ok(&airlock(&argv), "network proxy");
    let sh = |script: &str| airlock(&["exec", "real", "bash", "-c", script]);
    let out = sh("cd /tmp && mkdir -p n && cd n && npm install --no-audit --no-fund is-number@7.0.0 2>&1 && node -e \"console.log(require('is-number')(5))\"");
    assert!(
        text(&out.stdout).contains("true"),
        "npm: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let out = sh("apt-get update -q > /tmp/apt.log 2>&1; rc=$?; tail -3 /tmp/apt.log; exit $rc");
    assert_ok(&out, "apt-get update");
    assert!(
        !text(&out.stdout).contains("Err:"),
        "apt: {}",
        text(&out.stdout)
    );
    // pip's index over HTTPS with the merged bundle (python's own TLS).
    let out = sh("python3 -c \"import urllib.request; print(urllib.request.urlopen('https://pypi.org/simple/six/').status)\"");
    assert_eq!(text(&out.stdout).trim(), "200", "{}", text(&out.stderr));
    // pip itself, installed from Debian through the engine, then used.
    let out = sh("apt-get install -y -q --no-install-recommends python3-pip >/dev/null 2>&1 && cd /tmp && python3 -m pip download --no-deps -q -d /tmp/wheels six==1.16.0 2>&1 && ls /tmp/wheels");
    assert!(
        text(&out.stdout).contains("six-1.16.0"),
        "pip: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    // Anything else is refused in deny mode.
    let out = sh("curl -sS -m 10 -o /dev/null -w '%{http_code}' https://example.com/");
    assert_ne!(text(&out.stdout), "200");
    std::thread::sleep(std::time::Duration::from_millis(300));
    let out = airlock(&["network", "log", "real", "--json"]);
    let evs: Vec<serde_json::Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        evs.iter()
            .any(|e| e["host"] == "registry.npmjs.org" && e["action"] == "allow"),
        "{evs:#?}"
    );
    assert!(
        evs.iter()
            .any(|e| e["host"] == "example.com" && e["action"] == "block"),
        "{evs:#?}"
    );
}
