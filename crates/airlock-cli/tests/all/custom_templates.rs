//! Custom templates: `template build NEW --from T --run CMD` and
//! `template save SANDBOX NEW`, used by sandboxes with `-t`. Template names
//! are unique per run (the template directory is shared by every test) and
//! removed at the end, also when a test fails.

use crate::world::*;
use std::path::PathBuf;

/// Unique template names; their directories are removed on drop.
struct Names(Vec<String>);

impl Names {
    fn new(prefix: &str, n: usize) -> Names {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        Names(
            (0..n)
                .map(|i| format!("t-{prefix}{i}-{}-{nanos:x}", std::process::id()))
                .collect(),
        )
    }
}

impl Drop for Names {
    fn drop(&mut self) {
        for n in self.0.iter().rev() {
            let _ = std::fs::remove_dir_all(templates_dir().join(n));
            let _ = std::fs::remove_file(templates_dir().join(format!(".{n}.lock")));
        }
    }
}

fn template_json(w: &World, name: &str) -> Option<serde_json::Value> {
    let out = w.airlock(&["template", "ls", "--json"]);
    assert_ok(&out, "template ls --json");
    let v: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    v.into_iter().find(|t| t["name"] == name)
}

fn rootfs(name: &str) -> PathBuf {
    templates_dir().join(name).join("rootfs")
}

#[test]
fn build_from_runs_commands_as_a_cached_layer() {
    let w = World::new();
    let names = Names::new("b", 2);
    let (tools, more) = (names.0[0].as_str(), names.0[1].as_str());
    let ws = w.ws.display().to_string();

    let out = w.airlock(&[
        "template",
        "build",
        tools,
        "--from",
        "base",
        "--run",
        "echo v1 > /opt/marker",
        "--run",
        "mkdir -p /root/.cfg && echo cfg > /root/.cfg/y && rm /etc/issue",
    ]);
    assert_ok(&out, "template build --from --run");
    assert!(text(&out.stderr).contains("[2/2]"), "{}", text(&out.stderr));
    // Only the new layer is stored; base's files are not copied.
    assert_eq!(
        std::fs::read_to_string(rootfs(tools).join("opt/marker")).unwrap(),
        "v1\n"
    );
    assert!(!rootfs(tools).join("usr/bin/bash").exists());
    let t = template_json(&w, tools).expect("listed");
    assert_eq!(t["parent"], "base");
    assert_eq!(t["run"].as_array().unwrap().len(), 2);
    assert_eq!(t["current"], true);
    let created = t["created"].clone();
    let out = w.airlock(&["template", "ls"]);
    assert!(
        text(&out.stdout)
            .lines()
            .any(|l| l.starts_with(tools) && l.contains("base")),
        "{}",
        text(&out.stdout)
    );

    // Same inputs: a no-op.
    let out = w.airlock(&[
        "template",
        "build",
        tools,
        "--from",
        "base",
        "--run",
        "echo v1 > /opt/marker",
        "--run",
        "mkdir -p /root/.cfg && echo cfg > /root/.cfg/y && rm /etc/issue",
    ]);
    assert_ok(&out, "cached build");
    assert!(
        text(&out.stdout).contains("up to date"),
        "{}",
        text(&out.stdout)
    );
    assert_eq!(template_json(&w, tools).unwrap()["created"], created);

    // A failing command fails the build and leaves the template as it was.
    let out = w.airlock(&[
        "template", "build", tools, "--from", "base", "--run", "exit 7",
    ]);
    assert_fails(&out, "failing --run");
    assert!(
        text(&out.stderr).contains("exit 7"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(template_json(&w, tools).unwrap()["created"], created);

    // A sandbox of it sees the commands' changes over base.
    let out = w.airlock(&[
        "run",
        "shell",
        &ws,
        "-t",
        tools,
        "--name",
        "tb1",
        "--",
        "bash",
        "-c",
        "cat /opt/marker /root/.cfg/y; test -e /etc/issue && echo issue-present; echo ok",
    ]);
    assert_ok(&out, "run -t custom template");
    assert_eq!(text(&out.stdout), "v1\ncfg\nok\n");

    // A template over it (three layers), and rm refuses the parent.
    let out = w.airlock(&[
        "template",
        "build",
        more,
        "--from",
        tools,
        "--run",
        "cat /opt/marker > /opt/copy",
    ]);
    assert_ok(&out, "template over a custom template");
    assert_eq!(template_json(&w, more).unwrap()["parent"], tools);
    let out = w.airlock(&["template", "rm", tools]);
    assert_fails(&out, "rm while used");
    let out = w.airlock(&[
        "run",
        "shell",
        &ws,
        "-t",
        more,
        "--name",
        "tb2",
        "--",
        "cat",
        "/opt/copy",
    ]);
    assert_ok(&out, "run -t a layer over a layer");
    assert_eq!(text(&out.stdout), "v1\n");

    // Other commands rebuild, but not under running sandboxes (tb2 runs
    // over a template over it); then the template over it is outdated.
    let out = w.airlock(&[
        "template",
        "build",
        tools,
        "--from",
        "base",
        "--run",
        "echo v2 > /opt/marker",
    ]);
    assert_fails(&out, "replace a template in use");
    assert!(text(&out.stderr).contains("tb2"), "{}", text(&out.stderr));
    assert_ok(&w.airlock(&["stop", "tb1"]), "stop tb1");
    assert_ok(&w.airlock(&["stop", "tb2"]), "stop tb2");
    let out = w.airlock(&[
        "template",
        "build",
        tools,
        "--from",
        "base",
        "--run",
        "echo v2 > /opt/marker",
    ]);
    assert_ok(&out, "rebuild with other commands");
    assert_eq!(template_json(&w, more).unwrap()["current"], false);

    assert_ok(&w.airlock(&["rm", "-f", "tb1"]), "rm tb1");
    assert_ok(&w.airlock(&["rm", "-f", "tb2"]), "rm tb2");
    let out = w.airlock(&["template", "rm", tools]);
    assert_fails(&out, "rm with a child template");
    assert!(text(&out.stderr).contains(more), "{}", text(&out.stderr));
    assert_ok(&w.airlock(&["template", "rm", more]), "template rm child");
    assert_ok(&w.airlock(&["template", "rm", tools]), "template rm");
    assert!(template_json(&w, tools).is_none());
}

#[test]
fn save_turns_a_sandbox_into_a_template() {
    let w = World::new();
    let names = Names::new("s", 1);
    let saved = names.0[0].as_str();
    let ws = w.ws.display().to_string();

    let out = w.airlock(&[
        "run",
        "shell",
        &ws,
        "--name",
        "sv1",
        "--",
        "bash",
        "-c",
        // A file, a deletion (whiteout) and a replaced directory (opaque).
        "echo saved-state > /root/kept && rm /etc/issue && rm -rf /etc/skel && mkdir /etc/skel && echo n > /etc/skel/new",
    ]);
    assert_ok(&out, "configure sv1");
    let out = w.airlock(&["template", "save", "sv1", saved]);
    assert_fails(&out, "save while running");
    assert!(text(&out.stderr).contains("stop"), "{}", text(&out.stderr));
    assert_ok(&w.airlock(&["stop", "sv1"]), "stop sv1");
    let out = w.airlock(&["template", "save", "sv1", saved]);
    assert_ok(&out, "template save");
    let t = template_json(&w, saved).expect("listed");
    assert_eq!(t["parent"], "base");
    assert_eq!(t["saved_from"], "sv1");

    // airlock's per-start files are not in the template.
    let r = rootfs(saved);
    assert_eq!(
        std::fs::read_to_string(r.join("root/kept")).unwrap(),
        "saved-state\n"
    );
    for gone in [
        "etc/hostname",
        "etc/hosts",
        "etc/airlock",
        "etc/ssl/certs/ca-certificates.crt",
        "usr/local/share/ca-certificates/airlock-ca.crt",
    ] {
        assert!(
            std::fs::symlink_metadata(r.join(gone)).is_err(),
            "{gone} saved into the template"
        );
    }
    assert!(!r.join(w.ws.strip_prefix("/").unwrap()).exists());

    let out = w.airlock(&[
        "run",
        "shell",
        &ws,
        "-t",
        saved,
        "--name",
        "sv2",
        "--",
        "bash",
        "-c",
        "cat /root/kept /etc/hostname; ls -A /etc/skel; test -e /etc/issue && echo issue-present; \
         grep -c BEGIN /etc/ssl/certs/ca-certificates.crt >/dev/null && echo bundle; echo ok",
    ]);
    assert_ok(&out, "run -t saved template");
    assert_eq!(text(&out.stdout), "saved-state\nsv2\nnew\nbundle\nok\n");
    // The saved sandbox is untouched (copied, not moved).
    let out = w.airlock(&["run", "sv1", "--", "cat", "/root/kept", "/etc/hostname"]);
    assert_ok(&out, "sv1 still has its state");
    assert_eq!(text(&out.stdout), "saved-state\nsv1\n");

    // Saving over an existing name needs --replace; running needs --force.
    assert_fails(
        &w.airlock(&["template", "save", "--force", "sv2", saved]),
        "save over an existing template",
    );
    assert_ok(&w.airlock(&["rm", "-f", "sv1"]), "rm sv1");
    assert_ok(&w.airlock(&["rm", "-f", "sv2"]), "rm sv2");
    assert_ok(&w.airlock(&["template", "rm", saved]), "template rm");
}
