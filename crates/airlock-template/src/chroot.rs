//! Running commands over a stack of template layers, collecting what they
//! write in a new (empty) upper layer: the one mechanism behind agent
//! templates (`npm install -g`) and custom templates (`--run CMD`).

use crate::{io_err, TemplateError};
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

/// Runs in a private mount namespace: overlay (`userxattr`, as sandboxes
/// mount theirs, so opaque-directory markers mean the same there), /proc,
/// /dev, a scratch /tmp (and /root when asked), the host's resolv.conf and
/// CA bundle, then chroot.
const SCRIPT: &str = r#"
set -e
lower="$1"; upper="$2"; work="$3"; m="$4"; ca="$5"; private_root="$6"; shift 6
mount --make-rprivate /
mount -t overlay overlay -o "lowerdir=$lower,upperdir=$upper,workdir=$work,userxattr" "$m"
mount -t proc proc "$m/proc"
mount --rbind /dev "$m/dev"
mount -t tmpfs -o mode=1777 tmpfs "$m/tmp"
if [ "$private_root" = 1 ]; then mount -t tmpfs -o mode=0700 tmpfs "$m/root"; fi
if [ -f /etc/resolv.conf ] && [ -f "$m/etc/resolv.conf" ] && [ ! -L "$m/etc/resolv.conf" ]; then
    mount --bind /etc/resolv.conf "$m/etc/resolv.conf"
fi
if [ -n "$ca" ]; then cp "$ca" "$m/tmp/host-ca.crt"; fi
exec chroot "$m" "$@"
"#;

/// Host CA bundles tried for the build (registry traffic may go through a
/// corporate proxy that the host trusts); copied to /tmp/host-ca.crt.
const HOST_CA: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
];

/// Host variables passed through so the build reaches the registries the
/// way the host does.
const PASS_ENV: &[&str] = &[
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "npm_config_registry",
    "NPM_CONFIG_REGISTRY",
];

/// Run `argv` (inside the chroot, with a clean environment plus `env`)
/// over the layers `lower` (overlayfs `lowerdir`, topmost first) with the
/// empty directory `upper` as the upper layer. `private_root`: /root is a
/// scratch tmpfs too. Every output line goes to `on_line`; returns the exit
/// status and the last 30 lines.
pub(crate) fn run_over_layers(
    lower: &str,
    upper: &Path,
    private_root: bool,
    env: &[String],
    argv: &[String],
    on_line: &mut dyn FnMut(String),
) -> Result<(ExitStatus, Vec<String>), TemplateError> {
    let scratch = upper.parent().expect("upper has a parent");
    let work = scratch.join("work");
    let merged = scratch.join("merged");
    for d in [&work, &merged] {
        fs::create_dir_all(d).map_err(io_err("creating", d))?;
    }
    let ca = HOST_CA
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let mut full_env: Vec<String> = vec![
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        "HOME=/root".into(),
        "LANG=C.UTF-8".into(),
    ];
    if !ca.is_empty() {
        full_env.push("NODE_EXTRA_CA_CERTS=/tmp/host-ca.crt".into());
        full_env.push("npm_config_cafile=/tmp/host-ca.crt".into());
    }
    for k in PASS_ENV {
        if let Ok(v) = std::env::var(k) {
            full_env.push(format!("{k}={v}"));
        }
    }
    full_env.extend(env.iter().cloned());
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--fork", "--", "sh", "-ec", SCRIPT, "sh"])
        .arg(lower)
        .arg(upper)
        .arg(&work)
        .arg(&merged)
        .arg(&ca)
        .arg(if private_root { "1" } else { "0" })
        .args(["/usr/bin/env", "-i"])
        .args(&full_env)
        .args(argv)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe; the build dies with us.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGTERM as libc::c_ulong,
                0,
                0,
                0,
            );
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(io_err("running unshare (util-linux) for", upper))?;
    let stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let tx2 = tx.clone();
    let t1 = std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let t2 = std::thread::spawn(move || {
        for l in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx2.send(l);
        }
    });
    let mut tail: Vec<String> = Vec::new();
    for line in rx {
        tail.push(line.clone());
        if tail.len() > 30 {
            tail.remove(0);
        }
        on_line(line);
    }
    let _ = t1.join();
    let _ = t2.join();
    let status = child
        .wait()
        .map_err(io_err("waiting for the build in", upper))?;
    for d in [&work, &merged] {
        let _ = fs::remove_dir_all(d);
    }
    // Mount points that overlayfs may have copied up: nothing of the build
    // environment stays in the layer.
    let mut scratch_dirs = vec!["tmp", "proc", "dev"];
    if private_root {
        scratch_dirs.push("root");
    }
    for rel in scratch_dirs {
        let p = upper.join(rel);
        if p.is_dir()
            && fs::read_dir(&p)
                .map(|mut r| r.next().is_none())
                .unwrap_or(false)
        {
            let _ = fs::remove_dir(&p);
        }
    }
    Ok((status, tail))
}
