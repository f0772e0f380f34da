//! Agent templates: `base` plus one npm package at a pinned version, stored
//! as a layer that holds only the files the install added.
//!
//! The pins come from the checked-in lock file (`agents.lock`, compiled
//! in) overridden per machine by `<store>/agents.lock` (written by
//! `--update`). The layer is built by running `npm install -g` inside the
//! base template itself (its Node.js and npm, its architecture) in a
//! private mount namespace: an overlay with base as the lower layer and the
//! new template's `rootfs/` as the upper layer, `chroot` into it, with
//! `/tmp` and `/root` on tmpfs so npm's cache and logs never land in the
//! layer. The build uses the host's network, proxy variables and CA bundle
//! (it is a trusted build step, like mmdebstrap using the host's apt).

use crate::{io_err, Progress, TemplateError};
use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};

/// The checked-in lock file.
pub const BUILTIN_LOCK: &str = include_str!("../agents.lock");
/// File name of the per-machine override in the template store.
pub const STORE_LOCK: &str = "agents.lock";

/// One line of a lock file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentPin {
    /// Template name (`claude`).
    pub name: String,
    /// npm package (`@anthropic-ai/claude-code`).
    pub package: String,
    /// Exact version (`2.1.332`).
    pub version: String,
}

impl AgentPin {
    /// `package@version`, what npm installs.
    pub fn spec(&self) -> String {
        format!("{}@{}", self.package, self.version)
    }
}

/// Parse a lock file: `NAME PACKAGE VERSION` per line, `#` comments.
pub fn parse_lock(text: &str) -> Result<Vec<AgentPin>, String> {
    let mut out: Vec<AgentPin> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let w: Vec<&str> = line.split_whitespace().collect();
        let [name, package, version] = w[..] else {
            return Err(format!(
                "line {}: expected `TEMPLATE NPM-PACKAGE VERSION`, got {line:?}",
                i + 1
            ));
        };
        crate::validate_name(name).map_err(|e| format!("line {}: {e}", i + 1))?;
        let pkg_ok = !package.is_empty()
            && package.chars().all(|c| {
                c.is_ascii_lowercase()
                    || c.is_ascii_digit()
                    || matches!(c, '@' | '/' | '-' | '.' | '_')
            })
            && !package[1..].contains('@');
        let ver_ok = version.chars().next().is_some_and(|c| c.is_ascii_digit())
            && version
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '+'));
        if !pkg_ok || !ver_ok {
            return Err(format!(
                "line {}: {package:?} {version:?} is not an npm package and exact version",
                i + 1
            ));
        }
        let pin = AgentPin {
            name: name.into(),
            package: package.into(),
            version: version.into(),
        };
        match out.iter_mut().find(|p| p.name == pin.name) {
            Some(p) => *p = pin,
            None => out.push(pin),
        }
    }
    Ok(out)
}

/// Render pins in the lock file format.
pub fn render_lock(pins: &[AgentPin]) -> String {
    let mut s = String::from(
        "# Written by `airlock template build --update`: overrides the pins compiled\n\
         # into airlock on this machine. TEMPLATE  NPM-PACKAGE  VERSION\n",
    );
    for p in pins {
        s.push_str(&format!("{:<9} {:<26} {}\n", p.name, p.package, p.version));
    }
    s
}

/// The built-in pins.
pub fn builtin_pins() -> Vec<AgentPin> {
    parse_lock(BUILTIN_LOCK).expect("the checked-in agents.lock parses")
}

/// Pins in force for a store: built-in, overridden by `<root>/agents.lock`.
pub(crate) fn pins_for(root: &Path) -> Result<Vec<AgentPin>, TemplateError> {
    let mut pins = builtin_pins();
    let p = root.join(STORE_LOCK);
    let text = match fs::read_to_string(&p) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(pins),
        Err(e) => return Err(io_err("reading", &p)(e)),
    };
    let local = parse_lock(&text).map_err(|reason| TemplateError::Lock {
        path: p.clone(),
        reason,
    })?;
    for l in local {
        match pins.iter_mut().find(|p| p.name == l.name) {
            Some(p) => *p = l,
            None => pins.push(l),
        }
    }
    Ok(pins)
}

/// Record `pin` in `<root>/agents.lock` (other local pins kept).
pub(crate) fn write_pin(root: &Path, pin: &AgentPin) -> Result<(), TemplateError> {
    let p = root.join(STORE_LOCK);
    let mut local = match fs::read_to_string(&p) {
        Ok(t) => parse_lock(&t).map_err(|reason| TemplateError::Lock {
            path: p.clone(),
            reason,
        })?,
        Err(_) => Vec::new(),
    };
    match local.iter_mut().find(|l| l.name == pin.name) {
        Some(l) => *l = pin.clone(),
        None => local.push(pin.clone()),
    }
    let tmp = root.join(format!(".{STORE_LOCK}.tmp"));
    fs::write(&tmp, render_lock(&local)).map_err(io_err("writing", &tmp))?;
    fs::rename(&tmp, &p).map_err(io_err("writing", &p))
}

/// The registry's latest version of `package` (`npm view PACKAGE version`,
/// on the host).
pub fn npm_latest(package: &str) -> Result<String, TemplateError> {
    let out = Command::new("npm")
        .args(["view", package, "version"])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| TemplateError::Npm {
            message: format!("cannot run npm on the host to look up {package}: {e}"),
        })?;
    let v = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() || v.is_empty() || v.contains(char::is_whitespace) {
        return Err(TemplateError::Npm {
            message: format!(
                "npm view {package} version failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(v)
}

/// Install `pin` over `lower` into the (empty) directory `upper`, which
/// then holds exactly the files the install added or changed.
pub(crate) fn install_layer(
    lower: &Path,
    upper: &Path,
    pin: &AgentPin,
    progress: &mut dyn FnMut(Progress),
) -> Result<(), TemplateError> {
    let env: Vec<String> = [
        "npm_config_cache=/tmp/npm-cache",
        "npm_config_update_notifier=false",
        "npm_config_fund=false",
        "npm_config_audit=false",
        "npm_config_loglevel=http",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let argv: Vec<String> = ["npm", "install", "-g", "--no-fund", "--no-audit"]
        .iter()
        .map(|s| s.to_string())
        .chain([pin.spec()])
        .collect();
    let lower = lower.display().to_string();
    let (status, tail) =
        crate::chroot::run_over_layers(&lower, upper, true, &env, &argv, &mut |l| {
            progress(Progress::Line(l))
        })?;
    if !status.success() {
        return Err(TemplateError::Npm {
            message: format!(
                "npm install -g {} failed ({status}); last output:\n{}",
                pin.spec(),
                tail.join("\n")
            ),
        });
    }
    let pruned = prune_foreign_libc(&upper.join("usr/local/lib/node_modules"))?;
    if !pruned.is_empty() {
        progress(Progress::Step(format!(
            "dropped packages for another C library (this npm ignores `libc`): {}",
            pruned.join(", ")
        )));
    }
    Ok(())
}

/// Remove installed packages whose `package.json` restricts them to a C
/// library other than glibc (Debian's): npm before 10 installs every
/// platform's optional native package that matches os/cpu, e.g. both the
/// glibc and the musl build of an agent's binary. Returns their names.
fn prune_foreign_libc(node_modules: &Path) -> Result<Vec<String>, TemplateError> {
    let mut pruned = Vec::new();
    let mut stack = vec![node_modules.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(rd) = fs::read_dir(&dir) else { continue };
        for entry in rd.flatten() {
            let Ok(ft) = entry.file_type() else { continue };
            if !ft.is_dir() {
                continue;
            }
            let p = entry.path();
            let manifest = p.join("package.json");
            if let Ok(text) = fs::read_to_string(&manifest) {
                let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
                if let Some(libc) = v.get("libc").and_then(|l| l.as_array()) {
                    if !libc.iter().any(|l| l.as_str() == Some("glibc")) {
                        fs::remove_dir_all(&p).map_err(io_err("removing", &p))?;
                        pruned.push(
                            v.get("name")
                                .and_then(|n| n.as_str())
                                .unwrap_or("?")
                                .to_string(),
                        );
                        continue;
                    }
                }
            }
            stack.push(p);
        }
    }
    pruned.sort();
    Ok(pruned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_lock_parses_and_pins_exact_versions() {
        let pins = builtin_pins();
        let names: Vec<_> = pins.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["claude", "codex", "gemini", "copilot", "opencode"]);
        let c = &pins[0];
        assert_eq!(c.package, "@anthropic-ai/claude-code");
        assert!(c.spec().starts_with("@anthropic-ai/claude-code@2."));
    }

    #[test]
    fn prunes_only_other_libc_packages() {
        let d = tempfile::tempdir().unwrap();
        let nm = d.path().join("node_modules");
        let pkg = |rel: &str, json: &str| {
            fs::create_dir_all(nm.join(rel)).unwrap();
            fs::write(nm.join(rel).join("package.json"), json).unwrap();
        };
        pkg("@a/agent", r#"{"name":"@a/agent"}"#);
        pkg(
            "@a/agent/node_modules/@a/agent-linux-x64",
            r#"{"name":"x","libc":["glibc"]}"#,
        );
        pkg(
            "@a/agent/node_modules/@a/agent-linux-x64-musl",
            r#"{"name":"@a/agent-linux-x64-musl","libc":["musl"]}"#,
        );
        assert_eq!(
            prune_foreign_libc(&nm).unwrap(),
            vec!["@a/agent-linux-x64-musl"]
        );
        assert!(nm.join("@a/agent/node_modules/@a/agent-linux-x64").is_dir());
        assert!(!nm
            .join("@a/agent/node_modules/@a/agent-linux-x64-musl")
            .exists());
        assert!(prune_foreign_libc(&d.path().join("missing"))
            .unwrap()
            .is_empty());
    }

    #[test]
    fn lock_errors_and_overrides() {
        assert!(parse_lock("claude @a/b").is_err());
        assert!(parse_lock("claude @a/b latest").is_err());
        assert!(parse_lock("claude @a/b@1 1.0.0").is_err());
        assert!(parse_lock("../x pkg 1.0.0").is_err());
        let p = parse_lock("# c\nx pkg 1.0.0 # why\nx pkg 1.0.1\n").unwrap();
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].version, "1.0.1");
        assert_eq!(parse_lock(&render_lock(&p)).unwrap(), p);

        let d = tempfile::tempdir().unwrap();
        let bumped = AgentPin {
            name: "claude".into(),
            package: "@anthropic-ai/claude-code".into(),
            version: "9.9.9".into(),
        };
        write_pin(d.path(), &bumped).unwrap();
        let pins = pins_for(d.path()).unwrap();
        assert_eq!(pins.len(), builtin_pins().len());
        assert_eq!(pins[0], bumped);
        assert_eq!(pins[1], builtin_pins()[1]);
    }
}
