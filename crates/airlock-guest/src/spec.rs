//! Pure parts of turning an exec request into a process: the environment and
//! the program path.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// `PATH` used for lookup (and set) when neither the sandbox nor the request
/// defines one.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Merge environment layers; a later layer's value wins, a variable keeps the
/// position of its first definition.
pub fn merge_env(layers: &[&[(String, String)]]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for layer in layers {
        for (k, v) in layer.iter() {
            match out.iter_mut().find(|(ok, _)| ok == k) {
                Some(slot) => slot.1 = v.clone(),
                None => out.push((k.clone(), v.clone())),
            }
        }
    }
    out
}

/// A variable name the kernel and libc can carry: non-empty, no `=`, no NUL.
pub fn valid_env_name(k: &str) -> bool {
    !k.is_empty() && !k.contains('=') && !k.contains('\0')
}

pub fn env_get<'a>(env: &'a [(String, String)], key: &str) -> Option<&'a str> {
    env.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

/// Why a program could not be resolved; maps to the shell's exit codes.
#[derive(Debug, PartialEq, Eq)]
pub enum LookupError {
    /// 127
    NotFound(String),
    /// 126: a file of that name exists but cannot be executed.
    NotExecutable(String),
}

impl LookupError {
    pub fn code(&self) -> i32 {
        match self {
            LookupError::NotFound(_) => 127,
            LookupError::NotExecutable(_) => 126,
        }
    }

    pub fn message(&self) -> String {
        match self {
            LookupError::NotFound(p) => format!("{p}: command not found"),
            LookupError::NotExecutable(p) => format!("{p}: permission denied (not executable)"),
        }
    }
}

/// Resolve `argv0` like `execvp`: a name containing `/` is used as given
/// (relative to `cwd`, which the child enters before exec); otherwise each
/// `PATH` entry is tried in order (an empty entry means `cwd`). The first
/// executable regular file wins; a non-executable match is remembered so
/// the error can say 126 rather than 127.
pub fn find_program(argv0: &str, path_var: &str, cwd: &Path) -> Result<PathBuf, LookupError> {
    if argv0.is_empty() {
        return Err(LookupError::NotFound(String::new()));
    }
    if argv0.contains('/') {
        // execve reports ENOENT/EACCES itself; no need to stat twice.
        return Ok(PathBuf::from(argv0));
    }
    let mut non_exec = None;
    for dir in path_var.split(':') {
        let dir = if dir.is_empty() {
            cwd.to_path_buf()
        } else {
            cwd.join(dir)
        };
        let cand = dir.join(argv0);
        let Ok(meta) = std::fs::metadata(&cand) else {
            continue;
        };
        if !meta.is_file() {
            continue;
        }
        if meta.permissions().mode() & 0o111 != 0 {
            return Ok(cand);
        }
        non_exec.get_or_insert(cand);
    }
    match non_exec {
        Some(p) => Err(LookupError::NotExecutable(p.display().to_string())),
        None => Err(LookupError::NotFound(argv0.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn kv(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn env_later_layer_wins_and_order_is_stable() {
        let base = kv(&[("PATH", "/bin"), ("HOME", "/root"), ("A", "1")]);
        let user = kv(&[("HOME", "/home/dev"), ("USER", "dev")]);
        let req = kv(&[("A", "2"), ("B", "x=y")]);
        let got = merge_env(&[&base, &user, &req]);
        assert_eq!(
            got,
            kv(&[
                ("PATH", "/bin"),
                ("HOME", "/home/dev"),
                ("A", "2"),
                ("USER", "dev"),
                ("B", "x=y")
            ])
        );
        assert_eq!(env_get(&got, "B"), Some("x=y"));
        assert_eq!(env_get(&got, "C"), None);
    }

    #[test]
    fn env_names() {
        assert!(valid_env_name("FOO_1"));
        assert!(!valid_env_name(""));
        assert!(!valid_env_name("A=B"));
        assert!(!valid_env_name("A\0"));
    }

    #[test]
    fn path_lookup() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        fs::create_dir_all(&a).unwrap();
        fs::create_dir_all(&b).unwrap();
        let write = |p: &Path, mode: u32| {
            fs::write(p, "#!/bin/sh\n").unwrap();
            fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
        };
        write(&a.join("tool"), 0o644); // not executable: skipped, remembered
        write(&b.join("tool"), 0o755);
        write(&a.join("plain"), 0o600);
        fs::create_dir(b.join("adir")).unwrap();
        let path = format!("{}:{}", a.display(), b.display());

        assert_eq!(
            find_program("tool", &path, dir.path()).unwrap(),
            b.join("tool")
        );
        let e = find_program("plain", &path, dir.path()).unwrap_err();
        assert_eq!(e.code(), 126);
        assert_eq!(
            find_program("adir", &path, dir.path()).unwrap_err().code(),
            127
        );
        assert_eq!(
            find_program("missing", &path, dir.path()).unwrap_err(),
            LookupError::NotFound("missing".into())
        );
        assert_eq!(
            find_program("./x/y", &path, dir.path()).unwrap(),
            PathBuf::from("./x/y")
        );
        // Relative and empty PATH entries are relative to the working directory.
        assert_eq!(
            find_program("tool", "a:b", dir.path()).unwrap(),
            b.join("tool")
        );
        assert_eq!(find_program("tool", ":", &b).unwrap(), b.join("tool"));
        assert_eq!(find_program("", &path, dir.path()).unwrap_err().code(), 127);
    }
}
