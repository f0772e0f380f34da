//! Custom templates: a layer over any template, made either by running
//! commands over it (`template build NEW --from T --run CMD`) or by saving a
//! sandbox's writable layer (`template save SANDBOX NEW`).
//!
//! Both store only the new layer (like agent templates, [`crate::agent`]):
//! `NEW/rootfs/` holds what changed, `meta.json` names the parent, and a
//! sandbox stacks it over the parent's layers ([`TemplateStore::layers`]).
//!
//! Built layers run the commands (`/bin/sh -c CMD`, as root, with the
//! host's network, proxy variables and CA bundle, like agent builds) in a
//! private mount namespace: an overlay of the parent's layers with the new
//! `rootfs/` as the upper layer, `chroot` into it, `/tmp` on tmpfs. The
//! overlay is mounted with `userxattr`, as sandboxes mount theirs, so opaque
//! directories are marked `user.overlay.opaque` and keep their meaning when
//! the layer is a lower layer of a sandbox. A build is cached by (parent,
//! parent's `created`, commands): the same inputs again are a no-op.
//!
//! Saved layers are a copy of the sandbox's upper directory with owners,
//! modes, times, hard links and every extended attribute kept, overlay
//! whiteouts (character devices 0:0) and opaque markers included, since the
//! copy sits in the same overlay stack. The files airlock's runtime writes
//! at each start ([`RUNTIME_PATHS`]) are left out.

use crate::{
    io_err, is_root, validate_name, Meta, Progress, Template, TemplateError, TemplateStore, BASE,
    META_VERSION,
};
use std::collections::HashMap;
use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Paths, relative to the root, that airlock's sandbox runtime writes into
/// a sandbox's writable layer at every start (network names, the
/// installation CA and the trust bundle that includes it, apt's `partial`
/// directories). [`TemplateStore::save_layer`] leaves them out: the next
/// sandbox gets its own, and the CA is never baked into a template.
pub const RUNTIME_PATHS: &[&str] = &[
    "etc/hosts",
    "etc/hostname",
    "etc/resolv.conf",
    "etc/ssl/certs/ca-certificates.crt",
    "etc/ssl/certs/airlock-ca.pem",
    "etc/airlock",
    "usr/local/share/ca-certificates/airlock-ca.crt",
    "var/lib/apt/lists/partial",
    "var/cache/apt/archives/partial",
];

/// Marker line the build script prints before each command.
const STEP_MARK: &str = ">>> airlock-run: ";

/// Runs inside the chroot: each argument with `/bin/sh -c`, stopping at the
/// first failure.
const EACH_SCRIPT: &str = r#"for c do printf '>>> airlock-run: %s\n' "$c" >&2; /bin/sh -c "$c" </dev/null || exit $?; done"#;

/// What [`TemplateStore::build_custom`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Built {
    pub template: Template,
    /// False when the existing template had the same inputs (a no-op).
    pub rebuilt: bool,
}

impl TemplateStore {
    /// Names that custom templates may not take: `base` and agent templates.
    fn check_custom_name(&self, name: &str) -> Result<(), TemplateError> {
        validate_name(name)?;
        if name == BASE || self.agent_pin(name)?.is_some() {
            return Err(TemplateError::Reserved(name.into()));
        }
        Ok(())
    }

    /// `parent` (which must exist) and its layers, refusing a parent whose
    /// chain contains `name` (replacing `name` would pull it from under it).
    fn parent_for(
        &self,
        name: &str,
        parent: &str,
    ) -> Result<(Template, Vec<PathBuf>), TemplateError> {
        let p = self
            .get(parent)?
            .ok_or_else(|| TemplateError::NotFound(parent.into()))?;
        let mut cur = Some(p.clone());
        while let Some(t) = cur {
            if t.name == name {
                return Err(TemplateError::Cycle {
                    name: name.into(),
                    parent: parent.into(),
                });
            }
            cur = match &t.parent {
                Some(pp) => self.get(pp)?,
                None => None,
            };
        }
        let layers = self.layers(&p)?;
        for l in &layers {
            let s = l.as_os_str().as_bytes();
            if s.iter().any(|b| matches!(b, b':' | b',' | b'\\')) {
                return Err(TemplateError::Io {
                    op: "stacking layers",
                    path: l.clone(),
                    source: io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "a layer path holds ',', ':' or '\\', which overlayfs options cannot carry",
                    ),
                });
            }
        }
        Ok((p, layers))
    }

    fn read_meta(&self, name: &str) -> Result<Meta, TemplateError> {
        let path = self.dir(name).join("meta.json");
        let text = fs::read_to_string(&path).map_err(io_err("reading", &path))?;
        serde_json::from_str(&text).map_err(|source| TemplateError::Meta { path, source })
    }

    /// Whether a template is up to date with what it was built from: agent
    /// templates as [`TemplateStore::agent_is_current`]; layers whose parent
    /// was rebuilt (another `created`) or removed since are not.
    pub fn is_current(&self, t: &Template) -> Result<bool, TemplateError> {
        if self.agent_pin(&t.name)?.is_some() {
            return self.agent_is_current(t);
        }
        let Some(parent) = &t.parent else {
            return Ok(true);
        };
        let meta = self.read_meta(&t.name)?;
        Ok(self
            .get(parent)?
            .is_some_and(|p| Some(p.created) == meta.parent_created))
    }

    /// Build template `name` as a layer over `from` by running `commands`
    /// in order (`/bin/sh -c CMD`, as root, network available) over it.
    /// Cached: when `name` exists with the same parent, parent build and
    /// commands, returns it unless `force`. Needs root.
    pub fn build_custom(
        &self,
        name: &str,
        from: &str,
        commands: &[String],
        force: bool,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<Built, TemplateError> {
        self.check_custom_name(name)?;
        validate_name(from)?;
        if commands.is_empty() || commands.iter().any(|c| c.trim().is_empty()) {
            return Err(TemplateError::NoCommands);
        }
        let (parent, layers) = self.parent_for(name, from)?;
        let existing = self.get(name)?;
        if let Some(t) = &existing {
            if t.run.is_empty() && !force {
                // A saved template: rebuilding it from commands would lose it.
                return Err(TemplateError::Exists(name.into()));
            }
            if !force && self.same_inputs(t, &parent, commands)? {
                progress(Progress::Step(format!(
                    "{name} is up to date (same parent build and commands); --force rebuilds it"
                )));
                progress(Progress::Done);
                return Ok(Built {
                    template: t.clone(),
                    rebuilt: false,
                });
            }
        }
        if !is_root() {
            return Err(TemplateError::LayerNeedsRoot(name.into()));
        }
        let lower = layers
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(":");
        let cmds = commands.to_vec();
        let t = self.create(
            name,
            existing.is_some(),
            true,
            progress,
            |rootfs, progress| {
                progress(Progress::Step(format!(
                    "running {} command(s) over {from} (a layer of only their changes)",
                    cmds.len()
                )));
                run_layer(&lower, rootfs, &cmds, progress)?;
                Ok(layer_meta(name, &parent, cmds.clone(), None))
            },
        )?;
        Ok(Built {
            template: t,
            rebuilt: true,
        })
    }

    /// Whether [`TemplateStore::build_custom`] of these inputs (without
    /// `force`) would be a no-op.
    pub fn custom_is_built(
        &self,
        name: &str,
        from: &str,
        commands: &[String],
    ) -> Result<bool, TemplateError> {
        let (Some(t), Some(parent)) = (self.get(name)?, self.get(from)?) else {
            return Ok(false);
        };
        Ok(!t.run.is_empty() && self.same_inputs(&t, &parent, commands)?)
    }

    /// The names of `t` and its ancestors, `t` first.
    pub fn chain(&self, t: &Template) -> Result<Vec<String>, TemplateError> {
        Ok(self
            .layers(t)?
            .iter()
            .filter_map(|p| p.parent()?.file_name()?.to_str().map(str::to_string))
            .collect())
    }

    fn same_inputs(
        &self,
        t: &Template,
        parent: &Template,
        commands: &[String],
    ) -> Result<bool, TemplateError> {
        let meta = self.read_meta(&t.name)?;
        Ok(meta.parent.as_deref() == Some(parent.name.as_str())
            && meta.parent_created.as_deref() == Some(parent.created.as_str())
            && meta.run == commands)
    }

    /// Save `upper` (a sandbox's writable overlay layer over template
    /// `parent`) as template `name`: a copy (ownership, modes, times, hard
    /// links, xattrs, whiteouts and opaque markers kept) without
    /// [`RUNTIME_PATHS`], nor the entries of `if_empty` (relative paths, e.g.
    /// workspace mount points) when they are empty. `saved_from` is recorded.
    /// An existing `name` is replaced only with `replace`. Needs root.
    #[allow(clippy::too_many_arguments)]
    pub fn save_layer(
        &self,
        name: &str,
        parent: &str,
        upper: &Path,
        saved_from: &str,
        if_empty: &[PathBuf],
        replace: bool,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<Template, TemplateError> {
        self.check_custom_name(name)?;
        validate_name(parent)?;
        let (parent_t, _) = self.parent_for(name, parent)?;
        let md = fs::metadata(upper).map_err(io_err("reading the writable layer", upper))?;
        if !md.is_dir() {
            return Err(io_err("reading the writable layer", upper)(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a directory",
            )));
        }
        let existing = self.get(name)?;
        if existing.is_some() && !replace {
            return Err(TemplateError::Exists(name.into()));
        }
        if !is_root() {
            return Err(TemplateError::LayerNeedsRoot(name.into()));
        }
        let excludes = CopyOptions {
            always: RUNTIME_PATHS.iter().map(PathBuf::from).collect(),
            if_empty: if_empty.to_vec(),
            drop_privileges: true,
        };
        self.create(
            name,
            existing.is_some(),
            true,
            progress,
            |rootfs, progress| {
                progress(Progress::Step(format!(
                    "copying the writable layer of {saved_from} ({})",
                    upper.display()
                )));
                let n = copy_layer(upper, rootfs, &excludes)?;
                progress(Progress::Step(format!("copied {n} entries")));
                Ok(layer_meta(
                    name,
                    &parent_t,
                    Vec::new(),
                    Some(saved_from.to_string()),
                ))
            },
        )
    }
}

fn layer_meta(name: &str, parent: &Template, run: Vec<String>, saved_from: Option<String>) -> Meta {
    let mut packages = Vec::new();
    if !run.is_empty() {
        packages.push(format!("+{} command(s)", run.len()));
    }
    Meta {
        version: META_VERSION,
        name: name.to_string(),
        suite: parent.suite.clone(),
        mirror: parent.mirror.clone(),
        packages,
        created: String::new(),
        size_bytes: 0,
        id_shifted: false,
        parent: Some(parent.name.clone()),
        parent_created: Some(parent.created.clone()),
        agent_package: None,
        agent_version: None,
        run,
        saved_from,
    }
}

/// Run `commands` over the layers `lower` (overlayfs `lowerdir`, topmost
/// first) with the empty directory `upper` as the upper layer.
fn run_layer(
    lower: &str,
    upper: &Path,
    commands: &[String],
    progress: &mut dyn FnMut(Progress),
) -> Result<(), TemplateError> {
    let env = vec!["DEBIAN_FRONTEND=noninteractive".to_string()];
    let argv: Vec<String> = ["/bin/sh", "-c", EACH_SCRIPT, "sh"]
        .iter()
        .map(|s| s.to_string())
        .chain(commands.iter().cloned())
        .collect();
    let mut current = String::new();
    let mut n = 0;
    let (status, tail) =
        crate::chroot::run_over_layers(lower, upper, false, &env, &argv, &mut |line| {
            if let Some(c) = line.strip_prefix(STEP_MARK) {
                n += 1;
                current = c.to_string();
                progress(Progress::Step(format!("[{n}/{}] {c}", commands.len())));
            } else {
                progress(Progress::Line(line));
            }
        })?;
    if !status.success() {
        return Err(TemplateError::RunFailed {
            command: current,
            status: status.to_string(),
            tail: tail
                .iter()
                .filter(|l| !l.starts_with(STEP_MARK))
                .cloned()
                .collect::<Vec<_>>()
                .join("\n"),
        });
    }
    Ok(())
}

/// What [`copy_layer`] leaves out (paths relative to the layer's root).
#[derive(Debug, Clone, Default)]
pub struct CopyOptions {
    /// Left out with everything under them.
    pub always: Vec<PathBuf>,
    /// Left out when an empty directory or an empty file (mount points).
    pub if_empty: Vec<PathBuf>,
    /// Clear set-uid/set-gid bits of non-directories and drop
    /// `security.capability`: a sandbox's files are untrusted, and the
    /// template directory may be readable by every host user, so nothing
    /// planted there may grant privileges on the host (inside a namespace
    /// sandbox `no_new_privs` makes them ineffective anyway).
    pub drop_privileges: bool,
}

/// Copy the overlay layer `src` into the existing directory `dst`: every
/// file type (whiteout character devices included; sockets skipped),
/// owners, modes (set-id bits too), times, hard links within the tree and
/// every extended attribute (`trusted.overlay.*`, `user.overlay.*`,
/// capabilities). Returns the number of entries copied.
///
/// Directories left empty only because what they held was left out (the
/// parents of `/etc/airlock` or of a workspace mount point, which overlayfs
/// copied up) are not kept, unless they are opaque.
pub fn copy_layer(src: &Path, dst: &Path, ex: &CopyOptions) -> Result<u64, TemplateError> {
    let mut links: HashMap<(u64, u64), PathBuf> = HashMap::new();
    let mut count = 0;
    let mut skipped = Vec::new();
    copy_dir(
        src,
        dst,
        Path::new(""),
        ex,
        &mut links,
        &mut count,
        &mut skipped,
    )?;
    skipped.sort_by_key(|p: &PathBuf| std::cmp::Reverse(p.components().count()));
    for rel in skipped {
        for dir in rel.ancestors().skip(1) {
            if dir.as_os_str().is_empty() {
                break;
            }
            let d = dst.join(dir);
            let empty = fs::read_dir(&d).is_ok_and(|mut r| r.next().is_none());
            if !empty || is_opaque(&d) || fs::remove_dir(&d).is_err() {
                break;
            }
            count -= 1;
        }
    }
    Ok(count)
}

fn is_opaque(p: &Path) -> bool {
    let Ok(c) = cpath(p) else { return true };
    let mut names = vec![0u8; 4096];
    // SAFETY: buffer of the size given.
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    if n < 0 {
        // Unknown (e.g. a list longer than the buffer): keep the directory.
        return io::Error::last_os_error().raw_os_error() != Some(libc::EOPNOTSUPP);
    }
    names.truncate(n as usize);
    names
        .split(|b| *b == 0)
        .any(|n| n == b"trusted.overlay.opaque" || n == b"user.overlay.opaque")
}

#[allow(clippy::too_many_arguments)]
fn copy_dir(
    src: &Path,
    dst: &Path,
    rel: &Path,
    ex: &CopyOptions,
    links: &mut HashMap<(u64, u64), PathBuf>,
    count: &mut u64,
    skipped: &mut Vec<PathBuf>,
) -> Result<(), TemplateError> {
    let mut entries: Vec<_> = fs::read_dir(src)
        .map_err(io_err("reading", src))?
        .collect::<Result<_, _>>()
        .map_err(io_err("reading", src))?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = e.file_name();
        let r = rel.join(&name);
        if ex.always.contains(&r) {
            skipped.push(r);
            continue;
        }
        let s = e.path();
        let d = dst.join(&name);
        let md = fs::symlink_metadata(&s).map_err(io_err("stat", &s))?;
        let ft = md.file_type();
        if ex.if_empty.contains(&r) {
            let empty = if ft.is_dir() {
                fs::read_dir(&s)
                    .map_err(io_err("reading", &s))?
                    .next()
                    .is_none()
            } else {
                ft.is_file() && md.len() == 0
            };
            if empty {
                skipped.push(r);
                continue;
            }
        }
        use std::os::unix::fs::FileTypeExt;
        if ft.is_dir() {
            fs::create_dir(&d).map_err(io_err("creating", &d))?;
            copy_dir(&s, &d, &r, ex, links, count, skipped)?;
        } else if ft.is_symlink() {
            let target = fs::read_link(&s).map_err(io_err("reading the link", &s))?;
            std::os::unix::fs::symlink(&target, &d).map_err(io_err("creating the link", &d))?;
        } else if ft.is_socket() {
            continue;
        } else {
            if md.nlink() > 1 {
                if let Some(first) = links.get(&(md.dev(), md.ino())) {
                    fs::hard_link(first, &d).map_err(io_err("linking", &d))?;
                    *count += 1;
                    continue;
                }
                links.insert((md.dev(), md.ino()), d.clone());
            }
            if ft.is_file() {
                fs::copy(&s, &d).map_err(io_err("copying", &s))?;
            } else {
                // Character (overlay whiteouts are 0:0) and block devices, FIFOs.
                mknod(&d, md.mode(), md.rdev())?;
            }
        }
        copy_attrs(&s, &d, &md, ex.drop_privileges)?;
        *count += 1;
    }
    Ok(())
}

fn cpath(p: &Path) -> Result<CString, TemplateError> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| {
        io_err("copying", p)(io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))
    })
}

fn mknod(p: &Path, mode: u32, rdev: u64) -> Result<(), TemplateError> {
    let c = cpath(p)?;
    // SAFETY: valid C string.
    if unsafe { libc::mknod(c.as_ptr(), mode as libc::mode_t, rdev as libc::dev_t) } != 0 {
        return Err(io_err("creating the device node", p)(
            io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Owner, mode, xattrs, then times (in that order: chown clears set-id
/// bits, setting xattrs may touch ctime only).
fn copy_attrs(
    s: &Path,
    d: &Path,
    md: &fs::Metadata,
    drop_privileges: bool,
) -> Result<(), TemplateError> {
    let is_link = md.file_type().is_symlink();
    std::os::unix::fs::lchown(d, Some(md.uid()), Some(md.gid())).map_err(io_err("chown", d))?;
    if !is_link {
        let mut mode = md.mode() & 0o7777;
        if drop_privileges && !md.is_dir() {
            mode &= !0o6000;
        }
        fs::set_permissions(d, fs::Permissions::from_mode(mode)).map_err(io_err("chmod", d))?;
    }
    copy_xattrs(s, d, drop_privileges)?;
    let cd = cpath(d)?;
    let times = [
        libc::timespec {
            tv_sec: md.atime() as libc::time_t,
            tv_nsec: md.atime_nsec() as _,
        },
        libc::timespec {
            tv_sec: md.mtime() as libc::time_t,
            tv_nsec: md.mtime_nsec() as _,
        },
    ];
    // SAFETY: valid C string and a two-element array.
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            cd.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r != 0 {
        return Err(io_err("setting times of", d)(io::Error::last_os_error()));
    }
    Ok(())
}

fn copy_xattrs(s: &Path, d: &Path, drop_privileges: bool) -> Result<(), TemplateError> {
    let cs = cpath(s)?;
    let cd = cpath(d)?;
    // SAFETY: size query with a null buffer.
    let n = unsafe { libc::llistxattr(cs.as_ptr(), std::ptr::null_mut(), 0) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
            return Ok(());
        }
        return Err(io_err("listing xattrs of", s)(e));
    }
    if n == 0 {
        return Ok(());
    }
    let mut names = vec![0u8; n as usize];
    // SAFETY: buffer of the size given.
    let n = unsafe { libc::llistxattr(cs.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    if n < 0 {
        return Err(io_err("listing xattrs of", s)(io::Error::last_os_error()));
    }
    names.truncate(n as usize);
    for name in names.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        if drop_privileges && name == b"security.capability" {
            continue;
        }
        let cn = CString::new(name).expect("split at NUL");
        // SAFETY: size query with a null buffer.
        let len = unsafe { libc::lgetxattr(cs.as_ptr(), cn.as_ptr(), std::ptr::null_mut(), 0) };
        if len < 0 {
            return Err(io_err("reading xattrs of", s)(io::Error::last_os_error()));
        }
        let mut val = vec![0u8; len as usize];
        // SAFETY: buffer of the size given.
        let len = unsafe {
            libc::lgetxattr(cs.as_ptr(), cn.as_ptr(), val.as_mut_ptr().cast(), val.len())
        };
        if len < 0 {
            return Err(io_err("reading xattrs of", s)(io::Error::last_os_error()));
        }
        val.truncate(len as usize);
        // SAFETY: valid C strings and buffer.
        let r =
            unsafe { libc::lsetxattr(cd.as_ptr(), cn.as_ptr(), val.as_ptr().cast(), val.len(), 0) };
        if r != 0 {
            let e = io::Error::last_os_error();
            // Labels of a security module the destination does not carry.
            if name.starts_with(b"security.") && name != b"security.capability" {
                continue;
            }
            return Err(io_err("writing xattrs of", d)(io::Error::new(
                e.kind(),
                format!("{}: {e}", String::from_utf8_lossy(name)),
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
