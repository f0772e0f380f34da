//! Lifecycle through the CLI: create, run, re-enter, exec, stop, start, rm,
//! bad input, crashes and races.

use crate::world::*;
use std::process::Stdio;

fn ls_json(w: &World) -> Vec<serde_json::Value> {
    let out = w.airlock(&["ls", "--json"]);
    assert_ok(&out, "ls --json");
    serde_json::from_slice(&out.stdout).unwrap()
}

fn status(w: &World, name: &str) -> String {
    ls_json(w)
        .into_iter()
        .find(|s| s["name"] == name)
        .map(|s| s["status"].as_str().unwrap().to_string())
        .unwrap_or_else(|| "absent".into())
}

#[test]
fn run_is_idempotent_and_state_persists() {
    let w = World::new();
    // Default name is <agent>-<basename of the workspace>; cwd is the workspace.
    let out = w.airlock(&[
        "run",
        "shell",
        "--",
        "bash",
        "-c",
        "pwd; echo state > /root/kept; exit 3",
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), w.ws.display().to_string());
    assert_eq!(status(&w, "shell-proj"), "running");
    // Same name again: the same sandbox, state kept.
    let out = w.airlock(&["run", "shell", "--", "cat", "/root/kept"]);
    assert_ok(&out, "re-enter");
    assert_eq!(text(&out.stdout).trim(), "state");
    let out = w.airlock(&["run", "shell-proj", "--", "cat", "/root/kept"]);
    assert_ok(&out, "re-enter by name");
    assert_eq!(ls_json(&w).len(), 1);
    // Stop/start keeps the writable layer.
    assert_ok(&w.airlock(&["stop", "shell-proj"]), "stop");
    assert_eq!(status(&w, "shell-proj"), "stopped");
    assert_fails(
        &w.airlock(&["exec", "shell-proj", "true"]),
        "exec on stopped",
    );
    assert_ok(&w.airlock(&["start", "shell-proj"]), "start");
    let out = w.airlock(&["exec", "shell-proj", "cat", "/root/kept"]);
    assert_eq!(text(&out.stdout).trim(), "state");
    // Workspace writes land on the host, owned by the invoking user.
    let out = w.airlock(&[
        "exec",
        "shell-proj",
        "bash",
        "-c",
        &format!("echo hi > {}/made-inside", w.ws.display()),
    ]);
    assert_ok(&out, "write workspace");
    let meta = std::fs::metadata(w.ws.join("made-inside")).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(meta.uid(), unsafe { libc::geteuid() });
    // rm removes everything but the workspace.
    let dir = ls_json(&w)[0]["dir"].as_str().unwrap().to_string();
    assert_ok(&w.airlock(&["rm", "-f", "shell-proj"]), "rm -f");
    assert!(!std::path::Path::new(&dir).exists(), "{dir} left behind");
    assert_eq!(ls_json(&w).len(), 0);
    assert!(w.ws.join("made-inside").exists());
}

#[test]
fn exec_options_and_exit_codes() {
    let w = World::new();
    let sb = w.sandbox("execopts");
    let out = w.airlock(&[
        "exec",
        "-e",
        "FOO=bar baz",
        "-w",
        "/tmp",
        &sb,
        "bash",
        "-c",
        "echo \"$FOO\"; pwd; id -u",
    ]);
    assert_ok(&out, "exec with -e -w");
    assert_eq!(text(&out.stdout), "bar baz\n/tmp\n0\n");
    let out = w.airlock(&["exec", &sb, "bash", "-c", "exit 42"]);
    assert_eq!(out.status.code(), Some(42));
    let out = w.airlock(&["exec", &sb, "bash", "-c", "kill -TERM $$"]);
    assert_eq!(out.status.code(), Some(143));
    let out = w.airlock(&["exec", &sb, "no-such-command"]);
    assert_eq!(out.status.code(), Some(127));
    let out = w.airlock(&["exec", "-u", "nobody", &sb, "id", "-un"]);
    assert_ok(&out, "exec -u nobody");
    assert_eq!(text(&out.stdout).trim(), "nobody");
    // stdin with -i
    let mut child = w
        .airlock_cmd(&["exec", "-i", &sb, "tr", "a-z", "A-Z"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(b"hello\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(text(&out.stdout), "HELLO\n");
    // A real terminal with -it (via script(1)), with its size.
    let cmd = format!(
        "stty cols 91 rows 17; ip netns exec {} {} exec -it {} bash -c 'tty; stty size'",
        w.ns_in,
        airlock_bin(),
        sb
    );
    let out = std::process::Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .env("AIRLOCK_HOME", &w.data)
        .env("AIRLOCK_TEMPLATES", templates_dir())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let t = text(&out.stdout);
    assert!(t.contains("/dev/pts/"), "{t}");
    assert!(t.contains("17 91"), "{t}");
}

#[test]
fn bad_input_is_refused_cleanly() {
    let w = World::new();
    let ws = w.ws.display().to_string();
    let home = w.home.display().to_string();
    let missing = format!("{}/nope", ws);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["run", "no-such-agent", &ws], "unknown agent"),
        (vec!["run", "shell", &missing], "does not exist"),
        (vec!["run", "shell", "/"], "whole host"),
        (vec!["run", "shell", &home], "home directory"),
        (
            vec!["run", "shell", &ws, "--name", "bad name!"],
            "invalid sandbox name",
        ),
        (vec!["exec", "ghost", "true"], "no sandbox named"),
        (vec!["rm", "ghost"], "no sandbox named"),
        (
            vec!["network", "proxy", "ghost", "--allow-host", "a.com"],
            "no sandbox named",
        ),
    ];
    for (args, want) in cases {
        let out = w.airlock(&args);
        assert_fails(&out, &format!("{args:?}"));
        let err = text(&out.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    assert_eq!(ls_json(&w).len(), 0, "something was half-created");
    // Usage errors exit 2.
    assert_eq!(w.airlock(&["exec"]).status.code(), Some(2));
    // A name clash with a different workspace.
    let sb = w.sandbox("clash");
    let ro = w.ro.display().to_string();
    let out = w.airlock(&["run", "shell", &ro, "--name", &sb, "--", "true"]);
    assert_fails(&out, "name clash");
    assert!(
        text(&out.stderr).contains("already exists"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(ls_json(&w).len(), 1);
    // rm of a running sandbox needs -f.
    assert_fails(&w.airlock(&["rm", &sb]), "rm running without -f");
}

#[test]
fn killed_supervisor_is_reported_and_recovered() {
    let w = World::new();
    let sb = w.sandbox("crash");
    let v = ls_json(&w);
    let sup = v[0]["supervisor_pid"].as_u64().unwrap() as i32;
    let init = v[0]["init_pid"].as_u64().unwrap() as i32;
    // SAFETY: kill(2) on the supervisor pid airlock reported.
    assert_eq!(unsafe { libc::kill(sup, libc::SIGKILL) }, 0);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while std::path::Path::new(&format!("/proc/{init}")).exists()
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(
        !std::path::Path::new(&format!("/proc/{init}/cmdline")).exists()
            || std::fs::read(format!("/proc/{init}/cmdline"))
                .unwrap()
                .is_empty(),
        "sandbox init survived its supervisor"
    );
    assert_eq!(status(&w, &sb), "crashed");
    assert_ok(&w.airlock(&["start", &sb]), "start after crash");
    assert_eq!(status(&w, &sb), "running");
    assert_ok(&w.airlock(&["exec", &sb, "true"]), "exec after recovery");
    // SAFETY: as above, for the new supervisor.
    let sup = ls_json(&w)[0]["supervisor_pid"].as_u64().unwrap() as i32;
    assert_eq!(unsafe { libc::kill(sup, libc::SIGKILL) }, 0);
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_ok(&w.airlock(&["rm", &sb]), "rm after crash");
    assert_eq!(ls_json(&w).len(), 0);
}

#[test]
fn concurrent_runs_create_one_sandbox() {
    let w = World::new();
    let ws = w.ws.display().to_string();
    let children: Vec<_> = (0..4)
        .map(|_| {
            w.airlock_cmd(&["run", "shell", &ws, "--name", "race", "--", "true"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert_ok(&out, "concurrent run");
    }
    let v = ls_json(&w);
    assert_eq!(v.len(), 1, "{v:?}");
    assert_eq!(v[0]["status"], "running");
}

#[test]
fn ls_and_inspect_outputs() {
    let w = World::new();
    let sb = w.sandbox("listed");
    let out = w.airlock(&["ls", "-q"]);
    assert_eq!(text(&out.stdout), format!("{sb}\n"));
    let out = w.airlock(&["ls"]);
    let t = text(&out.stdout);
    assert!(t.starts_with("NAME"), "{t}");
    assert!(t.contains("running") && t.contains(":ro"), "{t}");
    let out = w.airlock(&["inspect", &sb]);
    assert_ok(&out, "inspect");
    assert!(text(&out.stdout).contains("Status:      running"));
    let v = ls_json(&w);
    assert_eq!(v[0]["backend"], "ns");
    assert_eq!(v[0]["workspaces"][1]["read_only"], true);
    // --help has examples everywhere.
    for sub in [
        vec!["run"],
        vec!["exec"],
        vec!["ls"],
        vec!["network", "proxy"],
        vec!["network", "log"],
        vec!["template", "build"],
    ] {
        let mut a = sub.clone();
        a.push("--help");
        let out = w.airlock(&a);
        assert_ok(&out, "help");
        assert!(text(&out.stdout).contains("Example"), "{sub:?}");
    }
}
