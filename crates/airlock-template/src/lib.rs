//! Root filesystem templates of airlock sandboxes.
//!
//! Owns: building a Debian root filesystem with `mmdebstrap`, extracting it
//! into `<root>/<name>/rootfs` (the read-only lower layer every sandbox of
//! that template shares), configuring it for sandbox use, and listing and
//! removing templates. A template directory appears atomically (rename) and
//! only when complete; builds of the same name are serialised by a lock file.
//!
//! Must not: start sandboxes or know about backends beyond the id shift
//! ([`ID_SHIFT_BASE`]) that the namespace backend's uid mapping expects.
//!
//! Layout under the store root:
//! ```text
//! <root>/<name>/meta.json          complete template (what `get` returns)
//! <root>/<name>/rootfs/            extracted root filesystem
//! <root>/.<name>.lock              flock(2) serialising builds/removals
//! <root>/<name>.tmp-<rand>/        build in progress (removed on failure,
//!                                  stale ones removed by the next build)
//! <root>/agents.lock               per-machine agent pins (`--update`)
//! ```
//!
//! An agent template (`claude`, ...; see [`agent`]) has a `parent` in its
//! meta: its `rootfs/` holds only its own files, and a sandbox mounts it
//! over the parent's ([`TemplateStore::layers`]). Custom templates (see
//! [`custom`]) are layers too: built by running commands over any template
//! (cached by parent, parent's `created` and commands, recorded as `run`),
//! or saved from a sandbox's writable layer (recorded as `saved_from`).

use serde::{Deserialize, Serialize};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub mod agent;
mod chroot;
pub mod custom;
pub use agent::{builtin_pins, npm_latest, parse_lock, AgentPin};
pub use custom::{Built, RUNTIME_PATHS};

/// Name of the default template.
pub const BASE: &str = "base";

/// Extracted as root, a file owned by uid/gid `n > 0` in the tarball is owned
/// by `ID_SHIFT_BASE + n` on the host, matching the namespace backend's map
/// (inside `n` = host `ID_SHIFT_BASE + n`, inside 0 = host 0).
pub const ID_SHIFT_BASE: u32 = 1_000_000;
/// Ids above this are not mapped by the namespace backend (left unshifted).
pub const ID_SHIFT_RANGE: u32 = 65_536;

/// Version of `meta.json`.
const META_VERSION: u32 = 1;
const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";

/// Packages of the base template.
pub fn base_packages() -> Vec<&'static str> {
    vec![
        "bash",
        "coreutils",
        "ca-certificates",
        "curl",
        "git",
        "python3",
        "nodejs",
        "npm",
        "procps",
        "iproute2",
        "less",
        "sudo",
    ]
}

/// A complete template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    pub name: String,
    /// Extracted root filesystem, used read-only as the lower layer.
    pub rootfs: PathBuf,
    pub size_bytes: u64,
    /// RFC 3339.
    pub created: String,
    pub packages: Vec<String>,
    pub suite: String,
    /// Debian mirror it was built from (also what apt inside uses).
    pub mirror: String,
    /// File ownership was shifted by [`ID_SHIFT_BASE`] (extracted as root).
    pub id_shifted: bool,
    /// Agent templates: the template this one is a layer over.
    pub parent: Option<String>,
    /// Agent templates: the npm package and exact version installed.
    pub agent_package: Option<String>,
    pub agent_version: Option<String>,
    /// Custom templates (`template build --from`): the commands run, in order.
    pub run: Vec<String>,
    /// Saved templates (`template save`): the sandbox it was saved from.
    pub saved_from: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildOptions {
    /// Debian suite, e.g. `trixie`.
    pub suite: String,
    /// Default: the host's apt mirror ([`host_mirror`]).
    pub mirror: Option<String>,
    pub extra_packages: Vec<String>,
    /// Rebuild even if the template exists (replaced atomically).
    pub force: bool,
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            suite: "trixie".into(),
            mirror: None,
            extra_packages: Vec::new(),
            force: false,
        }
    }
}

/// Progress of a build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// A new phase.
    Step(String),
    /// A line of mmdebstrap's output.
    Line(String),
    Done,
}

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("invalid template name {0:?}: use letters, digits, '.', '_' and '-', starting with a letter or digit")]
    InvalidName(String),
    #[error("{op}: {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("template metadata {path} is unreadable")]
    Meta {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("mmdebstrap is not installed; install it with `apt-get install mmdebstrap`")]
    MmdebstrapMissing,
    #[error(
        "building a template as an unprivileged user needs mmdebstrap --mode=unshare, which \
         needs subordinate ids ({reason}); build it once as root (`sudo airlock template build`) \
         or add a range for this user to /etc/subuid and /etc/subgid"
    )]
    NeedsRoot { reason: String },
    #[error("mmdebstrap failed ({status}); last output:\n{tail}")]
    BuildFailed { status: String, tail: String },
    #[error("extracting the root filesystem into {path} failed ({status}): {stderr}")]
    Extract {
        path: PathBuf,
        status: String,
        stderr: String,
    },
    #[error("template {0} not found")]
    NotFound(String),
    #[error("agent lock file {path}: {reason}")]
    Lock { path: PathBuf, reason: String },
    #[error("{message}")]
    Npm { message: String },
    #[error("template {name} is a layer over {parent}, which is not built; build it with `airlock template build {parent}`")]
    MissingParent { name: String, parent: String },
    #[error("{name:?} is not an agent template; agent templates: {known}")]
    NotAgent { name: String, known: String },
    #[error("building agent templates needs root for now (the layer is installed in a mount namespace over the base template); run `sudo airlock template build {0}`")]
    AgentNeedsRoot(String),
    #[error("{0:?} is a built-in template name (base or an agent template); choose another name")]
    Reserved(String),
    #[error("template {0} exists; remove it first (`airlock template rm {0}`) or replace it (--replace for save, --force for build)")]
    Exists(String),
    #[error("template {parent} is (a layer over) {name}: {name} cannot be built from it")]
    Cycle { name: String, parent: String },
    #[error("give at least one non-empty --run 'COMMAND'")]
    NoCommands,
    #[error("building template layers needs root for now (they are made in a mount namespace over the parent's layers); run `sudo airlock template ...` for {0}")]
    LayerNeedsRoot(String),
    #[error("{command:?} failed ({status}); last output:\n{tail}")]
    RunFailed {
        command: String,
        status: String,
        tail: String,
    },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> TemplateError + 'a {
    move |source| TemplateError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// `meta.json` of a template.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Meta {
    version: u32,
    name: String,
    suite: String,
    mirror: String,
    packages: Vec<String>,
    created: String,
    size_bytes: u64,
    #[serde(default)]
    id_shifted: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    parent: Option<String>,
    /// `created` of the parent this layer was installed over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    parent_created: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    agent_package: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    agent_version: Option<String>,
    /// Custom templates: the commands run over the parent (the cache key,
    /// with `parent` and `parent_created`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    run: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    saved_from: Option<String>,
}

impl Meta {
    fn into_template(self, dir: &Path) -> Template {
        Template {
            name: self.name,
            rootfs: dir.join("rootfs"),
            size_bytes: self.size_bytes,
            created: self.created,
            packages: self.packages,
            suite: self.suite,
            mirror: self.mirror,
            id_shifted: self.id_shifted,
            parent: self.parent,
            agent_package: self.agent_package,
            agent_version: self.agent_version,
            run: self.run,
            saved_from: self.saved_from,
        }
    }
}

/// The store of templates under one directory.
#[derive(Debug, Clone)]
pub struct TemplateStore {
    root: PathBuf,
}

pub(crate) fn validate_name(name: &str) -> Result<(), TemplateError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        && !name.contains(".tmp-")
        && !name.contains(".old-");
    if ok {
        Ok(())
    } else {
        Err(TemplateError::InvalidName(name.to_string()))
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn rand_suffix() -> String {
    use rand::Rng;
    let n: u64 = rand::thread_rng().gen();
    format!("{n:016x}")
}

/// A held flock; released on drop.
struct Lock(#[allow(dead_code)] File);

fn lock(path: &Path) -> Result<Lock, TemplateError> {
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(io_err("opening the lock file", path))?;
    loop {
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } == 0 {
            return Ok(Lock(f));
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(io_err("locking", path)(e));
        }
    }
}

impl TemplateStore {
    pub fn new(root: PathBuf) -> Self {
        TemplateStore { root }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn dir(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    fn lock_path(&self, name: &str) -> PathBuf {
        self.root.join(format!(".{name}.lock"))
    }

    /// A complete template, or None.
    pub fn get(&self, name: &str) -> Result<Option<Template>, TemplateError> {
        validate_name(name)?;
        let dir = self.dir(name);
        if !dir.join("rootfs").is_dir() {
            return Ok(None);
        }
        let meta_path = dir.join("meta.json");
        let text = match fs::read_to_string(&meta_path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("reading", &meta_path)(e)),
        };
        let meta: Meta = serde_json::from_str(&text).map_err(|source| TemplateError::Meta {
            path: meta_path.clone(),
            source,
        })?;
        Ok(Some(meta.into_template(&dir)))
    }

    /// Every complete template, sorted by name.
    pub fn list(&self) -> Result<Vec<Template>, TemplateError> {
        let rd = match fs::read_dir(&self.root) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err("listing", &self.root)(e)),
        };
        let mut out = Vec::new();
        for entry in rd {
            let entry = entry.map_err(io_err("listing", &self.root))?;
            let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                continue;
            };
            if validate_name(&name).is_err() {
                continue;
            }
            if let Some(t) = self.get(&name)? {
                out.push(t);
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Remove a template (waits for a build of it to finish first).
    pub fn remove(&self, name: &str) -> Result<(), TemplateError> {
        validate_name(name)?;
        let dir = self.dir(name);
        if !dir.exists() {
            return Err(TemplateError::NotFound(name.to_string()));
        }
        let _lock = lock(&self.lock_path(name))?;
        let doomed = self.root.join(format!("{name}.old-{}", rand_suffix()));
        fs::rename(&dir, &doomed).map_err(io_err("moving away", &dir))?;
        remove_tree(&doomed)?;
        Ok(())
    }

    /// Build a template from Debian packages with mmdebstrap. Returns the
    /// existing template unless `opts.force`.
    pub fn build(
        &self,
        name: &str,
        opts: &BuildOptions,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<Template, TemplateError> {
        validate_name(name)?;
        if !opts.force {
            if let Some(t) = self.get(name)? {
                progress(Progress::Done);
                return Ok(t);
            }
        }
        if which("mmdebstrap").is_none() {
            return Err(TemplateError::MmdebstrapMissing);
        }
        if !is_root() {
            check_unshare_mode()?;
        }
        let mirror = match &opts.mirror {
            Some(m) => m.clone(),
            None => host_mirror(Path::new("/etc/apt")),
        };
        let mut packages: Vec<String> = base_packages().into_iter().map(String::from).collect();
        for p in &opts.extra_packages {
            if !packages.contains(p) {
                packages.push(p.clone());
            }
        }
        let suite = opts.suite.clone();
        self.create(name, opts.force, false, progress, |rootfs, progress| {
            progress(Progress::Step(format!(
                "running mmdebstrap ({suite}, {} packages, {mirror})",
                packages.len()
            )));
            run_mmdebstrap(&suite, &mirror, &packages, rootfs, progress)?;
            Ok(Meta {
                version: META_VERSION,
                name: name.to_string(),
                suite: suite.clone(),
                mirror: mirror.clone(),
                packages: packages.clone(),
                created: String::new(),
                size_bytes: 0,
                id_shifted: false,
                parent: None,
                parent_created: None,
                agent_package: None,
                agent_version: None,
                run: Vec::new(),
                saved_from: None,
            })
        })
    }

    /// Create a template from an existing root filesystem tarball (e.g. one
    /// mmdebstrap wrote). `packages`, `suite`, `mirror` are recorded only.
    pub fn import(
        &self,
        name: &str,
        tarball: &Path,
        suite: &str,
        mirror: &str,
        packages: Vec<String>,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<Template, TemplateError> {
        validate_name(name)?;
        self.create(name, true, false, progress, |rootfs, progress| {
            progress(Progress::Step(format!("extracting {}", tarball.display())));
            let f = File::open(tarball).map_err(io_err("opening", tarball))?;
            extract(Stdio::from(f), rootfs)?;
            Ok(Meta {
                version: META_VERSION,
                name: name.to_string(),
                suite: suite.to_string(),
                mirror: mirror.to_string(),
                packages: packages.clone(),
                created: String::new(),
                size_bytes: 0,
                id_shifted: false,
                parent: None,
                parent_created: None,
                agent_package: None,
                agent_version: None,
                run: Vec::new(),
                saved_from: None,
            })
        })
    }

    /// The common skeleton: lock, clean stale tmp dirs, fill a tmp dir,
    /// configure, write meta, rename into place.
    fn create(
        &self,
        name: &str,
        replace: bool,
        layer: bool,
        progress: &mut dyn FnMut(Progress),
        fill: impl FnOnce(&Path, &mut dyn FnMut(Progress)) -> Result<Meta, TemplateError>,
    ) -> Result<Template, TemplateError> {
        fs::create_dir_all(&self.root)
            .map_err(io_err("creating the template store", &self.root))?;
        let _lock = lock(&self.lock_path(name))?;
        // Someone else may have built it while we waited.
        if !replace {
            if let Some(t) = self.get(name)? {
                progress(Progress::Done);
                return Ok(t);
            }
        }
        self.remove_stale(name)?;
        let tmp = self.root.join(format!("{name}.tmp-{}", rand_suffix()));
        let result = (|| {
            fs::create_dir(&tmp).map_err(io_err("creating", &tmp))?;
            fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755))
                .map_err(io_err("chmod", &tmp))?;
            let rootfs = tmp.join("rootfs");
            fs::create_dir(&rootfs).map_err(io_err("creating", &rootfs))?;
            let mut meta = fill(&rootfs, progress)?;
            let shifted = is_root();
            if shifted {
                progress(Progress::Step(
                    "shifting file ownership for user namespaces".into(),
                ));
                shift_ids(&rootfs)?;
            }
            if !layer {
                progress(Progress::Step(
                    "configuring the root filesystem for sandboxes".into(),
                ));
                configure_rootfs(&rootfs)?;
            }
            meta.id_shifted = shifted;
            meta.size_bytes = tree_size(&rootfs)?;
            meta.created = now_rfc3339();
            write_meta(&tmp.join("meta.json"), &meta)?;
            let dir = self.dir(name);
            if dir.exists() {
                // Swap atomically, then delete the old one.
                exchange(&tmp, &dir)?;
                remove_tree(&tmp)?;
            } else {
                fs::rename(&tmp, &dir).map_err(io_err("moving the template into place", &dir))?;
            }
            Ok(meta.into_template(&dir))
        })();
        match result {
            Ok(t) => {
                progress(Progress::Done);
                Ok(t)
            }
            Err(e) => {
                let _ = remove_tree(&tmp);
                Err(e)
            }
        }
    }

    /// The read-only layers of a template, topmost first: its own
    /// `rootfs/`, then its parent's, down to a full root filesystem.
    pub fn layers(&self, t: &Template) -> Result<Vec<PathBuf>, TemplateError> {
        let mut out = vec![t.rootfs.clone()];
        let mut cur = t.clone();
        while let Some(parent) = cur.parent.clone() {
            if out.len() > 8 {
                return Err(TemplateError::MissingParent {
                    name: t.name.clone(),
                    parent: format!("{parent} (a chain longer than 8)"),
                });
            }
            cur = self
                .get(&parent)?
                .ok_or_else(|| TemplateError::MissingParent {
                    name: cur.name.clone(),
                    parent: parent.clone(),
                })?;
            out.push(cur.rootfs.clone());
        }
        Ok(out)
    }

    /// Agent pins in force: the checked-in lock, overridden by
    /// `<root>/agents.lock`.
    pub fn agent_pins(&self) -> Result<Vec<AgentPin>, TemplateError> {
        agent::pins_for(&self.root)
    }

    /// The pin of agent template `name`, if it is one.
    pub fn agent_pin(&self, name: &str) -> Result<Option<AgentPin>, TemplateError> {
        Ok(self.agent_pins()?.into_iter().find(|p| p.name == name))
    }

    /// Whether an existing agent template matches its pin and its parent's
    /// current build.
    pub fn agent_is_current(&self, t: &Template) -> Result<bool, TemplateError> {
        let Some(pin) = self.agent_pin(&t.name)? else {
            return Ok(true);
        };
        if t.agent_version.as_deref() != Some(pin.version.as_str())
            || t.agent_package.as_deref() != Some(pin.package.as_str())
        {
            return Ok(false);
        }
        let meta: Meta = serde_json::from_str(
            &fs::read_to_string(self.dir(&t.name).join("meta.json"))
                .map_err(io_err("reading", &self.dir(&t.name)))?,
        )
        .map_err(|source| TemplateError::Meta {
            path: self.dir(&t.name).join("meta.json"),
            source,
        })?;
        let parent = match &meta.parent {
            Some(p) => self.get(p)?,
            None => return Ok(true),
        };
        Ok(parent.is_some_and(|p| Some(p.created) == meta.parent_created))
    }

    /// Build agent template `name` (a lock file entry): `base` (built first
    /// if missing) plus its npm package at the pinned version, as a layer.
    /// Cached: returns the existing template when it has the pinned version
    /// over the current base, unless `force`. `update` first moves the pin
    /// to the registry's latest version (recorded in `<root>/agents.lock`).
    pub fn build_agent(
        &self,
        name: &str,
        force: bool,
        update: bool,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<Template, TemplateError> {
        validate_name(name)?;
        let mut pin = self
            .agent_pin(name)?
            .ok_or_else(|| TemplateError::NotAgent {
                name: name.into(),
                known: self
                    .agent_pins()
                    .map(|p| p.into_iter().map(|p| p.name).collect::<Vec<_>>().join(", "))
                    .unwrap_or_default(),
            })?;
        if update {
            progress(Progress::Step(format!(
                "looking up the latest {} (npm view)",
                pin.package
            )));
            let latest = npm_latest(&pin.package)?;
            if latest != pin.version {
                progress(Progress::Step(format!(
                    "{}: {} -> {latest} (recorded in {})",
                    pin.package,
                    pin.version,
                    self.root.join(agent::STORE_LOCK).display()
                )));
                pin.version = latest;
                fs::create_dir_all(&self.root)
                    .map_err(io_err("creating the template store", &self.root))?;
                agent::write_pin(&self.root, &pin)?;
            }
        }
        let existing = self.get(name)?;
        if !force {
            if let Some(t) = &existing {
                if self.agent_is_current(t)? {
                    progress(Progress::Done);
                    return Ok(t.clone());
                }
            }
        }
        // A first build does not replace: two concurrent first runs build
        // once (the second finds the first's under the lock).
        let replace = force || existing.is_some();
        if !is_root() {
            return Err(TemplateError::AgentNeedsRoot(name.into()));
        }
        let base = self.build(BASE, &BuildOptions::default(), &mut |p| {
            if !matches!(p, Progress::Done) {
                progress(p)
            }
        })?;
        if base.parent.is_some() {
            return Err(TemplateError::MissingParent {
                name: name.into(),
                parent: BASE.into(),
            });
        }
        self.create(name, replace, true, progress, |rootfs, progress| {
            progress(Progress::Step(format!(
                "npm install -g {} inside {BASE} (a layer of only its files)",
                pin.spec()
            )));
            agent::install_layer(&base.rootfs, rootfs, &pin, progress)?;
            Ok(Meta {
                version: META_VERSION,
                name: name.to_string(),
                suite: base.suite.clone(),
                mirror: base.mirror.clone(),
                packages: vec![pin.spec()],
                created: String::new(),
                size_bytes: 0,
                id_shifted: false,
                parent: Some(BASE.into()),
                parent_created: Some(base.created.clone()),
                agent_package: Some(pin.package.clone()),
                agent_version: Some(pin.version.clone()),
                run: Vec::new(),
                saved_from: None,
            })
        })
    }

    /// Remove leftovers of interrupted builds/removals of `name` (we hold
    /// its lock, so none of them is in progress).
    fn remove_stale(&self, name: &str) -> Result<(), TemplateError> {
        let rd = fs::read_dir(&self.root).map_err(io_err("listing", &self.root))?;
        for entry in rd.flatten() {
            let f = entry.file_name();
            let Some(f) = f.to_str() else { continue };
            if let Some(rest) = f.strip_prefix(name) {
                if rest.starts_with(".tmp-") || rest.starts_with(".old-") {
                    remove_tree(&entry.path())?;
                }
            }
        }
        Ok(())
    }
}

fn remove_tree(p: &Path) -> Result<(), TemplateError> {
    match fs::remove_dir_all(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("removing", p)(e)),
    }
}

fn exchange(a: &Path, b: &Path) -> Result<(), TemplateError> {
    let ca = std::ffi::CString::new(a.as_os_str().as_encoded_bytes()).map_err(|_| {
        io_err("renaming", a)(io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))
    })?;
    let cb = std::ffi::CString::new(b.as_os_str().as_encoded_bytes()).map_err(|_| {
        io_err("renaming", b)(io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))
    })?;
    // SAFETY: renameat2(RENAME_EXCHANGE) with valid C strings.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if r != 0 {
        return Err(io_err("swapping in the new template", b)(
            io::Error::last_os_error(),
        ));
    }
    Ok(())
}

fn write_meta(path: &Path, meta: &Meta) -> Result<(), TemplateError> {
    let text = serde_json::to_string_pretty(meta).expect("Meta serialises");
    let mut f = File::create(path).map_err(io_err("writing", path))?;
    f.write_all(text.as_bytes())
        .and_then(|_| f.write_all(b"\n"))
        .and_then(|_| f.sync_all())
        .map_err(io_err("writing", path))
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

fn which(prog: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path)
        .map(|d| d.join(prog))
        .find(|p| p.is_file())
}

/// Unprivileged builds need mmdebstrap's unshare mode: newuidmap/newgidmap
/// and a subordinate id range for this user.
fn check_unshare_mode() -> Result<(), TemplateError> {
    if which("newuidmap").is_none() || which("newgidmap").is_none() {
        return Err(TemplateError::NeedsRoot {
            reason: "newuidmap/newgidmap (package uidmap) are not installed".into(),
        });
    }
    // SAFETY: getuid cannot fail.
    let uid = unsafe { libc::getuid() };
    let user = std::env::var("USER").unwrap_or_default();
    for file in ["/etc/subuid", "/etc/subgid"] {
        let text = fs::read_to_string(file).unwrap_or_default();
        if !subid_has_entry(&text, uid, &user) {
            return Err(TemplateError::NeedsRoot {
                reason: format!("{file} has no range for uid {uid}"),
            });
        }
    }
    Ok(())
}

fn subid_has_entry(text: &str, uid: u32, user: &str) -> bool {
    text.lines().any(|l| {
        let who = l.split(':').next().unwrap_or("").trim();
        !who.is_empty() && (who == user || who.parse::<u32>().ok() == Some(uid))
    })
}

fn run_mmdebstrap(
    suite: &str,
    mirror: &str,
    packages: &[String],
    rootfs: &Path,
    progress: &mut dyn FnMut(Progress),
) -> Result<(), TemplateError> {
    let mut cmd = Command::new("mmdebstrap");
    cmd.arg("--variant=apt")
        .arg(format!("--include={}", packages.join(",")))
        .arg("--format=tar");
    if !is_root() {
        cmd.arg("--mode=unshare");
    }
    cmd.arg(suite)
        .arg("-")
        .arg(mirror)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe; mmdebstrap dies with us.
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
        .map_err(io_err("starting", Path::new("mmdebstrap")))?;
    let stdout = child.stdout.take().expect("stdout was piped");
    let stderr = child.stderr.take().expect("stderr was piped");
    // tar reads mmdebstrap's stdout; we read its stderr for progress.
    let rootfs_owned = rootfs.to_path_buf();
    let tar = std::thread::spawn(move || extract(Stdio::from(stdout), &rootfs_owned));
    let mut tail: Vec<String> = Vec::new();
    for line in BufReader::new(stderr).lines() {
        let Ok(line) = line else { break };
        tail.push(line.clone());
        if tail.len() > 30 {
            tail.remove(0);
        }
        progress(Progress::Line(line));
    }
    let status = child
        .wait()
        .map_err(io_err("waiting for", Path::new("mmdebstrap")))?;
    let extracted = tar.join().unwrap_or_else(|_| {
        Err(TemplateError::Extract {
            path: rootfs.to_path_buf(),
            status: "panicked".into(),
            stderr: String::new(),
        })
    });
    if !status.success() {
        return Err(TemplateError::BuildFailed {
            status: status.to_string(),
            tail: tail.join("\n"),
        });
    }
    extracted
}

/// Extract a tar stream into `dest` with GNU tar: numeric owners (kept when
/// root), permissions, xattrs; `/dev` entries skipped (a sandbox gets its own).
fn extract(input: Stdio, dest: &Path) -> Result<(), TemplateError> {
    let mut cmd = Command::new("tar");
    cmd.arg("-x")
        .arg("--numeric-owner")
        .arg("--xattrs")
        .arg("--xattrs-include=*")
        .arg("--exclude=./dev/*")
        .arg("-C")
        .arg(dest);
    if is_root() {
        cmd.arg("--same-owner").arg("--preserve-permissions");
    } else {
        cmd.arg("--no-same-owner").arg("--preserve-permissions");
    }
    let out = cmd
        .stdin(input)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(io_err("starting tar for", dest))?;
    if !out.status.success() {
        return Err(TemplateError::Extract {
            path: dest.to_path_buf(),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr)
                .chars()
                .take(2000)
                .collect(),
        });
    }
    Ok(())
}

/// Shift every owner n in 1..=ID_SHIFT_RANGE to ID_SHIFT_BASE + n (files
/// owned by 0 stay). chown clears set-id bits, so the mode is restored.
fn shift_ids(root: &Path) -> Result<(), TemplateError> {
    fn shift(id: u32) -> u32 {
        if id == 0 || id > ID_SHIFT_RANGE || id >= ID_SHIFT_BASE {
            id
        } else {
            ID_SHIFT_BASE + id
        }
    }
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let rd = fs::read_dir(&dir).map_err(io_err("walking", &dir))?;
        for entry in rd {
            let entry = entry.map_err(io_err("walking", &dir))?;
            let path = entry.path();
            let md = fs::symlink_metadata(&path).map_err(io_err("stat", &path))?;
            let (uid, gid) = (md.uid(), md.gid());
            let (nu, ng) = (shift(uid), shift(gid));
            if (nu, ng) != (uid, gid) {
                std::os::unix::fs::lchown(&path, Some(nu), Some(ng))
                    .map_err(io_err("chown", &path))?;
                if !md.file_type().is_symlink() && md.mode() & 0o6000 != 0 {
                    fs::set_permissions(&path, fs::Permissions::from_mode(md.mode() & 0o7777))
                        .map_err(io_err("chmod", &path))?;
                }
            }
            if md.is_dir() {
                stack.push(path);
            }
        }
    }
    Ok(())
}

/// Make the extracted root usable in a sandbox.
fn configure_rootfs(root: &Path) -> Result<(), TemplateError> {
    let w = |rel: &str, content: &str| -> Result<(), TemplateError> {
        let p = root.join(rel);
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent).map_err(io_err("creating", parent))?;
        }
        // Replace, never follow, whatever is there (a symlink from a package).
        match fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_symlink() => {
                fs::remove_file(&p).map_err(io_err("removing", &p))?
            }
            _ => {}
        }
        fs::write(&p, content).map_err(io_err("writing", &p))
    };
    // apt cannot drop to _apt with a single-uid mapping (unprivileged sandboxes).
    w(
        "etc/apt/apt.conf.d/99airlock",
        "// Written by airlock: sandboxes may map a single uid, so apt must not\n\
         // switch to the _apt user to download.\nAPT::Sandbox::User \"root\";\n",
    )?;
    // Empty machine-id: each sandbox generates its own (systemd semantics).
    w("etc/machine-id", "")?;
    w(
        "etc/hosts",
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n",
    )?;
    for (rel, mode) in [
        ("run", 0o755),
        ("run/airlock", 0o755),
        ("tmp", 0o1777),
        ("var/tmp", 0o1777),
    ] {
        let p = root.join(rel);
        match fs::symlink_metadata(&p) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                fs::remove_file(&p).map_err(io_err("removing", &p))?;
                fs::create_dir(&p).map_err(io_err("creating", &p))?;
            }
            Err(_) => fs::create_dir_all(&p).map_err(io_err("creating", &p))?,
        }
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).map_err(io_err("chmod", &p))?;
    }
    Ok(())
}

/// Apparent size of a tree, hard links counted once.
fn tree_size(root: &Path) -> Result<u64, TemplateError> {
    let mut seen = std::collections::HashSet::new();
    let mut total = 0u64;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).map_err(io_err("walking", &dir))? {
            let entry = entry.map_err(io_err("walking", &dir))?;
            let md = entry.metadata().map_err(io_err("stat", &entry.path()))?;
            if md.nlink() > 1 && !md.is_dir() && !seen.insert((md.dev(), md.ino())) {
                continue;
            }
            total += md.len();
            if md.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    Ok(total)
}

/// The first http(s) Debian mirror in the host's apt sources under
/// `apt_dir` (`sources.list`, `sources.list.d/*.list`, deb822
/// `sources.list.d/*.sources`), skipping deb-src and security archives;
/// [`DEFAULT_MIRROR`] if none.
pub fn host_mirror(apt_dir: &Path) -> String {
    let mut files = vec![apt_dir.join("sources.list")];
    if let Ok(rd) = fs::read_dir(apt_dir.join("sources.list.d")) {
        let mut more: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
        more.sort();
        files.extend(more);
    }
    for f in files {
        let Some(ext) = f.extension().and_then(|e| e.to_str()).map(str::to_string) else {
            if f.file_name().is_some_and(|n| n == "sources.list") {
                if let Some(m) = fs::read_to_string(&f)
                    .ok()
                    .and_then(|t| mirror_from_list(&t))
                {
                    return m;
                }
            }
            continue;
        };
        let Ok(text) = fs::read_to_string(&f) else {
            continue;
        };
        let found = match ext.as_str() {
            "list" => mirror_from_list(&text),
            "sources" => mirror_from_deb822(&text),
            _ => None,
        };
        if let Some(m) = found {
            return m;
        }
    }
    DEFAULT_MIRROR.to_string()
}

fn usable(uri: &str) -> bool {
    (uri.starts_with("http://") || uri.starts_with("https://"))
        && !uri.trim_end_matches('/').ends_with("-security")
}

/// One-line format: `deb [opts] URI suite comps...`.
fn mirror_from_list(text: &str) -> Option<String> {
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        let mut words = line.split_whitespace();
        if words.next() != Some("deb") {
            continue;
        }
        let mut uri = words.next()?;
        if uri.starts_with('[') {
            // Options may contain spaces: skip to the word after the one ending in ']'.
            let mut w = uri;
            while !w.ends_with(']') {
                w = words.next()?;
            }
            uri = words.next()?;
        }
        if usable(uri) {
            return Some(uri.trim_end_matches('/').to_string());
        }
    }
    None
}

/// deb822 format: stanzas separated by blank lines with `Types:` and `URIs:`.
fn mirror_from_deb822(text: &str) -> Option<String> {
    for stanza in text.split("\n\n") {
        let mut types = Vec::new();
        let mut uris = Vec::new();
        let mut enabled = true;
        for line in stanza.lines() {
            if line.trim_start().starts_with('#') {
                continue;
            }
            let Some((k, v)) = line.split_once(':') else {
                continue;
            };
            match k.trim().to_ascii_lowercase().as_str() {
                "types" => types.extend(v.split_whitespace().map(str::to_string)),
                "uris" => uris.extend(v.split_whitespace().map(str::to_string)),
                "enabled" => enabled = v.trim() != "no",
                _ => {}
            }
        }
        if !enabled || !types.iter().any(|t| t == "deb") {
            continue;
        }
        if let Some(u) = uris.into_iter().find(|u| usable(u)) {
            return Some(u.trim_end_matches('/').to_string());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["base", "my-tpl", "a.b_c", "9x"] {
            validate_name(ok).unwrap();
        }
        for bad in ["", ".hidden", "a/b", "..", "base.tmp-1", "x y", "-a"] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn one_line_sources() {
        let t = "# comment\ndeb-src http://src.example/debian bookworm main\n\
                 deb [arch=amd64 signed-by=/x.gpg] http://mirror.example/debian/ bookworm main\n";
        assert_eq!(
            mirror_from_list(t).as_deref(),
            Some("http://mirror.example/debian")
        );
        let t = "deb http://security.debian.org/debian-security bookworm-security main\n\
                 deb https://m.example/debian bookworm main";
        assert_eq!(
            mirror_from_list(t).as_deref(),
            Some("https://m.example/debian")
        );
        assert_eq!(mirror_from_list("deb cdrom:[Debian]/ bookworm main"), None);
        assert_eq!(mirror_from_list("deb file:/srv/debian bookworm main"), None);
    }

    #[test]
    fn deb822_sources() {
        let t = "Types: deb-src\nURIs: http://src.example/debian\nSuites: bookworm\n\n\
                 Types: deb\n# http://snapshot.debian.org/archive/debian/20250520T000000Z\n\
                 URIs: http://deb.example/debian\nSuites: bookworm bookworm-updates\n\n\
                 Types: deb\nURIs: http://deb.example/debian-security\n";
        assert_eq!(
            mirror_from_deb822(t).as_deref(),
            Some("http://deb.example/debian")
        );
        let t = "Enabled: no\nTypes: deb\nURIs: http://off.example/debian\n";
        assert_eq!(mirror_from_deb822(t), None);
    }

    #[test]
    fn host_mirror_order_and_default() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(host_mirror(d.path()), DEFAULT_MIRROR);
        fs::create_dir(d.path().join("sources.list.d")).unwrap();
        fs::write(
            d.path().join("sources.list.d/debian.sources"),
            "Types: deb\nURIs: http://b.example/debian\nSuites: trixie\n",
        )
        .unwrap();
        fs::write(
            d.path().join("sources.list.d/x.list.disabled"),
            "deb http://disabled.example/debian trixie main\n",
        )
        .unwrap();
        assert_eq!(host_mirror(d.path()), "http://b.example/debian");
        fs::write(
            d.path().join("sources.list"),
            "deb http://a.example/debian trixie main\n",
        )
        .unwrap();
        assert_eq!(host_mirror(d.path()), "http://a.example/debian");
    }

    #[test]
    fn subid_entries() {
        assert!(subid_has_entry("alice:100000:65536\n", 1000, "alice"));
        assert!(subid_has_entry("1000:100000:65536\n", 1000, "bob"));
        assert!(!subid_has_entry("alice:100000:65536\n", 1001, "bob"));
    }

    fn fake_template(store: &TemplateStore, name: &str) {
        let dir = store.dir(name);
        fs::create_dir_all(dir.join("rootfs/usr/bin")).unwrap();
        let meta = Meta {
            version: META_VERSION,
            name: name.into(),
            suite: "trixie".into(),
            mirror: DEFAULT_MIRROR.into(),
            packages: vec!["bash".into()],
            created: now_rfc3339(),
            size_bytes: 42,
            id_shifted: false,
            parent: None,
            parent_created: None,
            agent_package: None,
            agent_version: None,
            run: Vec::new(),
            saved_from: None,
        };
        write_meta(&dir.join("meta.json"), &meta).unwrap();
    }

    #[test]
    fn meta_roundtrip_get_list_remove() {
        let d = tempfile::tempdir().unwrap();
        let store = TemplateStore::new(d.path().join("templates"));
        assert_eq!(store.list().unwrap(), vec![]);
        assert_eq!(store.get("base").unwrap(), None);
        fake_template(&store, "base");
        fake_template(&store, "alpha");
        // A half-built template is invisible.
        fs::create_dir_all(store.root().join("base.tmp-123/rootfs")).unwrap();
        // A directory without rootfs is not a template.
        fs::create_dir_all(store.root().join("broken")).unwrap();
        fs::write(store.root().join("broken/meta.json"), "{}").unwrap();
        let t = store.get("base").unwrap().unwrap();
        assert_eq!(t.packages, vec!["bash"]);
        assert_eq!(t.size_bytes, 42);
        assert_eq!(t.rootfs, store.root().join("base/rootfs"));
        assert_eq!(store.get("broken").unwrap(), None);
        fs::create_dir_all(store.root().join("broken/rootfs")).unwrap();
        assert!(
            store.get("broken").is_err(),
            "missing meta fields are an error"
        );
        fs::remove_dir_all(store.root().join("broken")).unwrap();
        let names: Vec<_> = store.list().unwrap().into_iter().map(|t| t.name).collect();
        assert_eq!(names, vec!["alpha", "base"]);
        store.remove("alpha").unwrap();
        assert!(matches!(
            store.remove("alpha"),
            Err(TemplateError::NotFound(_))
        ));
        assert_eq!(store.list().unwrap().len(), 1);
        // Stale tmp dirs are cleaned by the next build of that name.
        store.remove_stale("base").unwrap();
        assert!(!store.root().join("base.tmp-123").exists());
    }

    #[test]
    fn agent_layers_resolve_over_base_and_go_stale_with_it() {
        let d = tempfile::tempdir().unwrap();
        let store = TemplateStore::new(d.path().join("templates"));
        fake_template(&store, BASE);
        let base = store.get(BASE).unwrap().unwrap();
        let pin = store.agent_pin("claude").unwrap().unwrap();
        let dir = store.dir("claude");
        fs::create_dir_all(dir.join("rootfs/usr/local/bin")).unwrap();
        let meta = |version: &str, parent_created: &str| Meta {
            version: META_VERSION,
            name: "claude".into(),
            suite: "trixie".into(),
            mirror: DEFAULT_MIRROR.into(),
            packages: vec![pin.spec()],
            created: now_rfc3339(),
            size_bytes: 7,
            id_shifted: false,
            parent: Some(BASE.into()),
            parent_created: Some(parent_created.into()),
            agent_package: Some(pin.package.clone()),
            agent_version: Some(version.into()),
            run: Vec::new(),
            saved_from: None,
        };
        write_meta(&dir.join("meta.json"), &meta(&pin.version, &base.created)).unwrap();
        let t = store.get("claude").unwrap().unwrap();
        assert_eq!(t.parent.as_deref(), Some(BASE));
        assert_eq!(
            store.layers(&t).unwrap(),
            vec![dir.join("rootfs"), base.rootfs.clone()]
        );
        assert_eq!(store.layers(&base).unwrap(), vec![base.rootfs.clone()]);
        assert!(store.agent_is_current(&t).unwrap());
        // Another pinned version, or a rebuilt base: outdated.
        write_meta(&dir.join("meta.json"), &meta("0.0.1", &base.created)).unwrap();
        assert!(!store
            .agent_is_current(&store.get("claude").unwrap().unwrap())
            .unwrap());
        write_meta(&dir.join("meta.json"), &meta(&pin.version, "earlier")).unwrap();
        assert!(!store
            .agent_is_current(&store.get("claude").unwrap().unwrap())
            .unwrap());
        // A per-machine pin (--update) takes over.
        agent::write_pin(
            store.root(),
            &AgentPin {
                version: "0.0.1".into(),
                ..pin.clone()
            },
        )
        .unwrap();
        write_meta(&dir.join("meta.json"), &meta("0.0.1", &base.created)).unwrap();
        assert!(store
            .agent_is_current(&store.get("claude").unwrap().unwrap())
            .unwrap());
        // Without its base, a layer cannot be used.
        store.remove(BASE).unwrap();
        let t = store.get("claude").unwrap().unwrap();
        assert!(matches!(
            store.layers(&t),
            Err(TemplateError::MissingParent { .. })
        ));
        assert!(matches!(
            store.build_agent("nope", false, false, &mut |_| {}),
            Err(TemplateError::NotAgent { .. })
        ));
    }

    #[test]
    fn meta_rejects_unknown_fields() {
        let j = r#"{"version":1,"name":"a","suite":"s","mirror":"m","packages":[],"created":"","size_bytes":0,"bogus":1}"#;
        assert!(serde_json::from_str::<Meta>(j).is_err());
    }

    #[test]
    fn import_configures_and_is_atomic() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        fs::create_dir_all(src.join("etc/apt/apt.conf.d")).unwrap();
        fs::create_dir_all(src.join("usr/bin")).unwrap();
        fs::write(src.join("etc/machine-id"), "abc\n").unwrap();
        fs::write(src.join("usr/bin/hello"), "x").unwrap();
        let tarball = d.path().join("root.tar");
        let st = Command::new("tar")
            .arg("-cf")
            .arg(&tarball)
            .arg("-C")
            .arg(&src)
            .arg(".")
            .status()
            .unwrap();
        assert!(st.success());
        let store = TemplateStore::new(d.path().join("templates"));
        let mut steps = Vec::new();
        let t = store
            .import(
                "imp",
                &tarball,
                "trixie",
                DEFAULT_MIRROR,
                vec!["bash".into()],
                &mut |p| steps.push(p),
            )
            .unwrap();
        assert_eq!(steps.last(), Some(&Progress::Done));
        assert_eq!(
            fs::read_to_string(t.rootfs.join("etc/machine-id")).unwrap(),
            ""
        );
        assert!(
            fs::read_to_string(t.rootfs.join("etc/apt/apt.conf.d/99airlock"))
                .unwrap()
                .contains("APT::Sandbox::User \"root\";")
        );
        let tmp_mode = fs::metadata(t.rootfs.join("tmp"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(tmp_mode & 0o7777, 0o1777);
        assert!(t.rootfs.join("run/airlock").is_dir());
        assert_eq!(store.get("imp").unwrap().unwrap(), t);
        // Re-import replaces in place; no tmp dirs remain.
        let t2 = store
            .import(
                "imp",
                &tarball,
                "trixie",
                DEFAULT_MIRROR,
                vec![],
                &mut |_| {},
            )
            .unwrap();
        assert!(t2.packages.is_empty());
        let left: Vec<_> = fs::read_dir(store.root())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .filter(|n| n.contains(".tmp-") || n.contains(".old-"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
        // A failed import leaves nothing behind.
        let err = store.import(
            "bad",
            &d.path().join("missing.tar"),
            "t",
            "m",
            vec![],
            &mut |_| {},
        );
        assert!(err.is_err());
        assert_eq!(store.get("bad").unwrap(), None);
    }

    /// Real build with mmdebstrap (network to the Debian mirror, ~1 min):
    /// `cargo test -p airlock-template -- --ignored real_build --nocapture`
    #[test]
    #[ignore]
    fn real_build() {
        let d = tempfile::tempdir_in("/var/tmp").unwrap();
        let store = TemplateStore::new(d.path().to_path_buf());
        let t = store
            .build(BASE, &BuildOptions::default(), &mut |p| {
                if let Progress::Step(s) = p {
                    eprintln!("== {s}");
                }
            })
            .unwrap();
        assert!(t.rootfs.join("usr/bin/node").exists());
        assert!(t.rootfs.join("usr/bin/sudo").exists());
        assert!(t.size_bytes > 100_000_000);
        // Second build: finds it.
        let t2 = store
            .build(BASE, &BuildOptions::default(), &mut |_| {})
            .unwrap();
        assert_eq!(t, t2);
    }
}
