//! Workspace arguments: `PATH[:ro]`, resolved to an absolute canonical path
//! that is shared at the same path inside the sandbox.

use crate::SandboxError;
use airlock_store::Workspace;
use std::path::{Path, PathBuf};

/// Parse and check one workspace argument. `cwd` resolves relative paths.
/// Refuses `/`, the home directory and any directory containing it (or the
/// airlock data directory) unless `force`: sharing those would expose
/// `~/.ssh`, cloud credentials and airlock's own state.
pub fn parse(
    arg: &str,
    cwd: &Path,
    home: Option<&Path>,
    data_dir: &Path,
    force: bool,
) -> Result<Workspace, SandboxError> {
    let (path, read_only) = if let Some(p) = arg.strip_suffix(":ro") {
        (p, true)
    } else if let Some(p) = arg.strip_suffix(":rw") {
        (p, false)
    } else {
        (arg, false)
    };
    let bad = |reason: String| SandboxError::Workspace {
        path: path.to_string(),
        reason,
    };
    if path.is_empty() {
        return Err(bad("empty path".into()));
    }
    let abs = if Path::new(path).is_absolute() {
        PathBuf::from(path)
    } else {
        cwd.join(path)
    };
    let canon = abs.canonicalize().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => bad("does not exist; create it first".into()),
        _ => bad(format!("cannot access it: {e}")),
    })?;
    if !canon.is_dir() {
        return Err(bad("is not a directory".into()));
    }
    if !force {
        if canon == Path::new("/") {
            return Err(bad(
                "refusing to share the whole host filesystem; name a project directory (or pass --force)"
                    .into(),
            ));
        }
        if let Some(home) = home.and_then(|h| h.canonicalize().ok()) {
            if home.starts_with(&canon) {
                return Err(bad(format!(
                    "refusing to share {} because it contains your home directory {} (~/.ssh, ~/.aws...); name a project directory (or pass --force)",
                    canon.display(),
                    home.display()
                )));
            }
        }
        if let Ok(data) = data_dir.canonicalize() {
            if data.starts_with(&canon) {
                return Err(bad(format!(
                    "refusing to share {} because it contains airlock's state directory {}",
                    canon.display(),
                    data.display()
                )));
            }
        }
    }
    Ok(Workspace {
        path: canon,
        read_only,
    })
}

/// Parse a list; the same directory twice is an error.
pub fn parse_all(
    args: &[String],
    cwd: &Path,
    home: Option<&Path>,
    data_dir: &Path,
    force: bool,
) -> Result<Vec<Workspace>, SandboxError> {
    let mut out: Vec<Workspace> = Vec::new();
    for a in args {
        let w = parse(a, cwd, home, data_dir, force)?;
        if out.iter().any(|o| o.path == w.path) {
            return Err(SandboxError::Workspace {
                path: w.path.display().to_string(),
                reason: "given twice".into(),
            });
        }
        out.push(w);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_refuses() {
        let t = tempfile::tempdir().unwrap();
        let home = t.path().join("home");
        let proj = home.join("proj");
        let data = t.path().join("data");
        std::fs::create_dir_all(&proj).unwrap();
        std::fs::create_dir_all(&data).unwrap();
        let p = |a: &str, force| parse(a, &home, Some(&home), &data, force);
        let w = p("proj", false).unwrap();
        assert_eq!(w.path, proj.canonicalize().unwrap());
        assert!(!w.read_only);
        assert!(
            p(&format!("{}:ro", proj.display()), false)
                .unwrap()
                .read_only
        );
        assert!(p("missing", false)
            .unwrap_err()
            .to_string()
            .contains("does not exist"));
        assert!(p("/", false)
            .unwrap_err()
            .to_string()
            .contains("whole host"));
        assert!(p(home.to_str().unwrap(), false)
            .unwrap_err()
            .to_string()
            .contains("home"));
        assert!(p(t.path().to_str().unwrap(), false).is_err());
        assert!(p(home.to_str().unwrap(), true).is_ok());
        let f = proj.join("file");
        std::fs::write(&f, "x").unwrap();
        assert!(p(f.to_str().unwrap(), false)
            .unwrap_err()
            .to_string()
            .contains("not a directory"));
        let dup = parse_all(
            &["proj".into(), proj.display().to_string()],
            &home,
            Some(&home),
            &data,
            false,
        );
        assert!(dup.is_err());
    }
}
