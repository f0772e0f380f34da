//! Sandbox lifecycle and the per-sandbox supervisor.
//!
//! Owns: the meaning of `create`, `start`, `stop`, `rm`, `exec` and policy
//! changes ([`Manager`]); the agents airlock knows ([`agents`]); workspace
//! validation ([`workspace`]); and the supervisor process that owns one
//! running sandbox: its backend instance, its egress engine, its event
//! writer and its control socket ([`supervisor`]).
//!
//! Must not: parse command lines or print for humans (the CLI does), or
//! know how a backend isolates (it only calls the [`airlock_backend`] trait).

pub mod agents;
pub mod control;
pub mod profiles;
pub mod supervisor;
pub mod workspace;

use airlock_policy::Policy;
use airlock_store::{
    now_rfc3339, LockGuard, Paths, ProcessId, RecordedState, SandboxRecord, Status, Store,
    StoreError, Workspace,
};
use airlock_template::{Progress, TemplateStore};
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub use airlock_exec::ExecOptions;

/// Hidden subcommand that turns the `airlock` binary into a supervisor.
pub const SUPERVISE_ARG: &str = "__supervise";

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("no sandbox named {name:?} (see `airlock ls`)")]
    NotFound { name: String },
    #[error("unknown agent {agent:?}; known agents: {known}")]
    UnknownAgent { agent: String, known: String },
    #[error("invalid sandbox name {name:?}: use 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit")]
    BadName { name: String },
    #[error("workspace {path}: {reason}")]
    Workspace { path: String, reason: String },
    #[error("sandbox {name:?} already exists with workspaces {existing}; pick another --name or remove it with `airlock rm {name}`")]
    NameClash { name: String, existing: String },
    #[error("sandbox {name:?} is running; stop it first (`airlock stop {name}`) or use `rm -f`")]
    Running { name: String },
    #[error("sandbox {name:?} is not running; start it with `airlock start {name}`")]
    NotRunning { name: String },
    #[error("template {name:?} is not built; build it with `airlock template build {name}`")]
    NoTemplate { name: String },
    #[error("cannot start sandbox {name:?}: {message}")]
    Start { name: String, message: String },
    #[error("cannot stop sandbox {name:?}: {message}")]
    Stop { name: String, message: String },
    #[error("cannot reach the supervisor of sandbox {name:?}: {message}")]
    Control { name: String, message: String },
    #[error(transparent)]
    Template(#[from] airlock_template::TemplateError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Exec(#[from] airlock_exec::ExecError),
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = SandboxError> = std::result::Result<T, E>;

/// What `create`/`run` are asked to make.
#[derive(Debug, Clone)]
pub struct CreateSpec {
    pub agent: String,
    pub workspaces: Vec<Workspace>,
    pub name: Option<String>,
    pub template: String,
    pub agent_args: Vec<String>,
    pub policy: Policy,
    /// `ns` or `vm` (see [`choose_backend`]).
    pub backend: String,
}

/// Isolation the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isolation {
    Auto,
    Vm,
    Ns,
}

/// Resolve `--isolation` to a backend name. `auto` takes a VM only where
/// hardware virtualization works (software emulation is correct but slow),
/// and otherwise the namespace backend with a one-line notice (returned).
pub fn choose_backend(iso: Isolation) -> Result<(String, Option<String>)> {
    use airlock_backend::Backend;
    match iso {
        Isolation::Ns => Ok(("ns".into(), None)),
        Isolation::Vm => {
            let vm = airlock_backend::VmBackend::new();
            let r = vm.probe().map_err(|e| SandboxError::Start {
                name: "(new)".into(),
                message: format!("the VM backend is not usable: {e}"),
            })?;
            if !r.ok {
                return Err(SandboxError::Start {
                    name: "(new)".into(),
                    message: format!("the VM backend is not usable: {}", r.details.join("; ")),
                });
            }
            Ok(("vm".into(), None))
        }
        Isolation::Auto => {
            let vm = airlock_backend::VmBackend::new();
            let why = match vm.probe() {
                Ok(r) if r.ok => match vm.accel() {
                    Ok((airlock_backend::vm::Accel::Kvm, _)) => return Ok(("vm".into(), None)),
                    Ok((_, why)) => why,
                    Err(e) => e.to_string(),
                },
                Ok(r) => r.details.join("; "),
                Err(e) => e.to_string(),
            };
            Ok((
                "ns".into(),
                Some(format!(
                    "no hardware-accelerated VM here ({why}); using the namespace backend (--isolation vm forces a VM under software emulation)"
                )),
            ))
        }
    }
}

/// File names inside a sandbox's run directory.
pub mod files {
    pub const AGENT_SOCK: &str = "agent.sock";
    pub const PROXY_SOCK: &str = "proxy.sock";
    pub const CONTROL_SOCK: &str = "control.sock";
    pub const CONSOLE_LOG: &str = "console.log";
    pub const SUPERVISOR_LOG: &str = "supervisor.log";
    pub const LAYER: &str = "layer";
}

pub struct Manager {
    pub paths: Paths,
    /// The `airlock` executable, re-run as the supervisor.
    exe: PathBuf,
}

/// Outcome of [`Manager::create`].
pub struct Created {
    pub record: SandboxRecord,
    /// False when an existing sandbox was re-entered.
    pub new: bool,
}

impl Manager {
    pub fn new(paths: Paths) -> Result<Manager> {
        let exe = std::env::current_exe().map_err(|source| SandboxError::Io {
            what: "cannot find the airlock executable",
            path: PathBuf::from("/proc/self/exe"),
            source,
        })?;
        Ok(Manager { paths, exe })
    }

    pub fn store(&self) -> Result<Store> {
        Ok(Store::open(&self.paths)?)
    }

    pub fn templates(&self) -> TemplateStore {
        TemplateStore::new(self.paths.templates.clone())
    }

    pub fn lock(&self) -> Result<LockGuard> {
        Ok(self.paths.lock()?)
    }

    pub fn get(&self, name: &str) -> Result<SandboxRecord> {
        self.store()?
            .get(name)?
            .ok_or_else(|| SandboxError::NotFound { name: name.into() })
    }

    pub fn list(&self) -> Result<Vec<SandboxRecord>> {
        Ok(self.store()?.list()?)
    }

    pub fn agent_sock(&self, r: &SandboxRecord) -> PathBuf {
        self.paths.run_dir(&r.id).join(files::AGENT_SOCK)
    }

    /// Make sure the template exists, building it (with progress) if not.
    pub fn ensure_template(
        &self,
        name: &str,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<airlock_template::Template> {
        let store = self.templates();
        if store.agent_pin(name)?.is_some() {
            // Agent templates: built (cached) at their pinned version.
            if let Some(t) = store.get(name)? {
                if store.agent_is_current(&t)? {
                    return Ok(t);
                }
            }
            return Ok(store.build_agent(name, false, false, progress)?);
        }
        if let Some(t) = store.get(name)? {
            return Ok(t);
        }
        if name != airlock_template::BASE {
            return Err(SandboxError::NoTemplate { name: name.into() });
        }
        let opts = airlock_template::BuildOptions {
            suite: "trixie".into(),
            mirror: None,
            extra_packages: vec![],
            force: false,
        };
        Ok(store.build(name, &opts, progress)?)
    }

    /// Create a sandbox record and its directories, or return the existing
    /// one of that name when it has the same workspaces (re-entry).
    /// Call with [`Manager::lock`] held.
    pub fn create(&self, spec: &CreateSpec) -> Result<Created> {
        let agent = agents::find(&spec.agent).ok_or_else(|| SandboxError::UnknownAgent {
            agent: spec.agent.clone(),
            known: agents::names().join(", "),
        })?;
        let name = match &spec.name {
            Some(n) => n.clone(),
            None => default_name(agent.name, &spec.workspaces),
        };
        validate_name(&name)?;
        let store = self.store()?;
        if let Some(existing) = store.get(&name)? {
            if !spec.workspaces.is_empty() && existing.workspaces != spec.workspaces
                || existing.agent != agent.name
            {
                return Err(SandboxError::NameClash {
                    existing: describe_workspaces(&existing.workspaces),
                    name,
                });
            }
            return Ok(Created {
                record: existing,
                new: false,
            });
        }
        let id = new_id();
        let record = SandboxRecord {
            id: id.clone(),
            name: name.clone(),
            agent: agent.name.to_string(),
            template: spec.template.clone(),
            backend: spec.backend.clone(),
            workspaces: spec.workspaces.clone(),
            agent_args: spec.agent_args.clone(),
            policy: spec.policy.clone(),
            created: now_rfc3339(),
            state: RecordedState::Created,
            supervisor: None,
            init_pid: None,
            last_error: None,
        };
        let dir = self.paths.sandbox_dir(&id);
        std::fs::create_dir_all(dir.join(files::LAYER)).map_err(|source| SandboxError::Io {
            what: "cannot create sandbox directory",
            path: dir.clone(),
            source,
        })?;
        if let Err(e) = store.insert(&record) {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e.into());
        }
        Ok(Created { record, new: true })
    }

    /// Start a sandbox's supervisor and wait until its guest agent answers.
    /// Call with [`Manager::lock`] held. A running sandbox is left alone.
    pub fn start(&self, name: &str) -> Result<SandboxRecord> {
        let rec = self.get(name)?;
        match rec.status() {
            Status::Running => return Ok(rec),
            Status::Crashed => {
                // The supervisor died without cleaning up (kill -9, crash).
                // Its sandbox died with it (PDEATHSIG); make sure of that and
                // clear what it left.
                if let Some(pid) = rec.init_pid {
                    kill_if_alive(pid);
                }
                let _ = std::fs::remove_dir_all(self.paths.run_dir(&rec.id));
            }
            Status::Created | Status::Stopped => {}
        }
        if self.templates().get(&rec.template)?.is_none() {
            return Err(SandboxError::NoTemplate {
                name: rec.template.clone(),
            });
        }
        self.spawn_supervisor(&rec)?;
        self.get(name)
    }

    fn spawn_supervisor(&self, rec: &SandboxRecord) -> Result<()> {
        let start_err = |message: String| SandboxError::Start {
            name: rec.name.clone(),
            message,
        };
        let dir = self.paths.sandbox_dir(&rec.id);
        std::fs::create_dir_all(&dir).map_err(|source| SandboxError::Io {
            what: "cannot create sandbox directory",
            path: dir.clone(),
            source,
        })?;
        let log_path = dir.join(files::SUPERVISOR_LOG);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|source| SandboxError::Io {
                what: "cannot open supervisor log",
                path: log_path.clone(),
                source,
            })?;
        // The supervisor reports readiness (or the reason it failed) on a
        // pipe, so that `start` never guesses from timing.
        let (rd, wr) = pipe()?;
        let wr_fd = wr.as_raw_fd();
        let mut cmd = Command::new(&self.exe);
        cmd.arg(SUPERVISE_ARG)
            .arg(&rec.id)
            .arg(wr_fd.to_string())
            .env("AIRLOCK_HOME", &self.paths.data)
            .env("AIRLOCK_TEMPLATES", &self.paths.templates)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|source| SandboxError::Io {
                what: "cannot open supervisor log",
                path: log_path.clone(),
                source,
            })?)
            .stderr(log);
        // SAFETY: only async-signal-safe calls (setsid, fcntl) between fork
        // and exec.
        unsafe {
            cmd.pre_exec(move || {
                libc::setsid();
                // Let the readiness pipe survive exec.
                let flags = libc::fcntl(wr_fd, libc::F_GETFD);
                libc::fcntl(wr_fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| start_err(format!("cannot run {}: {e}", self.exe.display())))?;
        drop(wr);
        let mut msg = String::new();
        let mut f = std::fs::File::from(rd);
        let _ = f.read_to_string(&mut msg);
        let msg = msg.trim();
        if msg == "ok" {
            // The supervisor stays running in its own session; we do not
            // wait for it (init reaps it when we exit).
            std::mem::forget(child);
            return Ok(());
        }
        // It failed: make sure it is gone, and explain.
        let _ = child.kill();
        let _ = child.wait();
        let message = if msg.is_empty() {
            format!(
                "the supervisor exited before it was ready; see {}:\n{}",
                log_path.display(),
                tail(&log_path, 10)
            )
        } else {
            msg.to_string()
        };
        Err(start_err(message))
    }

    /// Stop a running sandbox; a no-op for a stopped one. Call with
    /// [`Manager::lock`] held.
    pub fn stop(&self, name: &str) -> Result<()> {
        let rec = self.get(name)?;
        match rec.status() {
            Status::Created | Status::Stopped => Ok(()),
            Status::Crashed => {
                if let Some(pid) = rec.init_pid {
                    kill_if_alive(pid);
                }
                let _ = std::fs::remove_dir_all(self.paths.run_dir(&rec.id));
                self.store()?
                    .set_stopped(&rec.id, Some("supervisor died"))?;
                Ok(())
            }
            Status::Running => {
                let sup = rec.supervisor.expect("running implies a supervisor");
                let sock = self.paths.run_dir(&rec.id).join(files::CONTROL_SOCK);
                if control::request(&sock, &control::Request::Stop).is_err() {
                    // SAFETY: signalling a pid we verified is our supervisor.
                    unsafe { libc::kill(sup.pid as i32, libc::SIGTERM) };
                }
                let deadline = Instant::now() + Duration::from_secs(15);
                while sup.alive() {
                    if Instant::now() > deadline {
                        // SAFETY: as above.
                        unsafe { libc::kill(sup.pid as i32, libc::SIGKILL) };
                        if let Some(pid) = rec.init_pid {
                            kill_if_alive(pid);
                        }
                        let _ = std::fs::remove_dir_all(self.paths.run_dir(&rec.id));
                        self.store()?.set_stopped(
                            &rec.id,
                            Some("supervisor did not stop in time; killed"),
                        )?;
                        return Ok(());
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                // The supervisor records the stop itself; if it could not,
                // make the record truthful.
                let now = self.get(name)?;
                if now.state == RecordedState::Running {
                    self.store()?.set_stopped(&rec.id, None)?;
                }
                Ok(())
            }
        }
    }

    /// Delete a sandbox: its writable layer, logs and record. Workspace
    /// files on the host are untouched. Call with [`Manager::lock`] held.
    pub fn remove(&self, name: &str, force: bool) -> Result<()> {
        let rec = self.get(name)?;
        if rec.status() == Status::Running {
            if !force {
                return Err(SandboxError::Running { name: name.into() });
            }
            self.stop(name)?;
        } else if rec.status() == Status::Crashed {
            self.stop(name)?;
        }
        let dir = self.paths.sandbox_dir(&rec.id);
        remove_tree(&dir)?;
        let _ = std::fs::remove_dir_all(self.paths.run_dir(&rec.id));
        self.store()?.delete(&rec.id)?;
        Ok(())
    }

    /// Run a command in a running sandbox attached to our stdio.
    pub fn exec(&self, rec: &SandboxRecord, opts: &ExecOptions) -> Result<i32> {
        if rec.status() != Status::Running {
            return Err(SandboxError::NotRunning {
                name: rec.name.clone(),
            });
        }
        Ok(airlock_exec::run_attached(
            &self.agent_sock(rec),
            opts,
            Duration::from_secs(10),
        )?)
    }

    /// Change a sandbox's policy; a running sandbox applies it to its next
    /// connection before this returns.
    pub fn update_policy(
        &self,
        name: &str,
        change: impl FnOnce(&mut Policy),
    ) -> Result<(Policy, bool)> {
        let _lock = self.lock()?;
        let rec = self.get(name)?;
        let mut policy = rec.policy.clone();
        change(&mut policy);
        self.store()?.set_policy(&rec.id, &policy)?;
        let live = rec.status() == Status::Running;
        if live {
            let sock = self.paths.run_dir(&rec.id).join(files::CONTROL_SOCK);
            control::request(&sock, &control::Request::ReloadPolicy).map_err(|message| {
                SandboxError::Control {
                    name: name.into(),
                    message,
                }
            })?;
        }
        Ok((policy, live))
    }
}

/// `<agent>-<basename of the first workspace>`, reduced to valid name
/// characters.
pub fn default_name(agent: &str, workspaces: &[Workspace]) -> String {
    let base = workspaces
        .first()
        .and_then(|w| w.path.file_name())
        .map(|b| b.to_string_lossy().into_owned())
        .unwrap_or_else(|| "root".into());
    let mut s: String = format!("{agent}-{base}")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect();
    s.truncate(63);
    s
}

pub fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(SandboxError::BadName { name: name.into() })
    }
}

pub fn describe_workspaces(ws: &[Workspace]) -> String {
    if ws.is_empty() {
        return "(none)".into();
    }
    ws.iter()
        .map(|w| {
            format!(
                "{}{}",
                w.path.display(),
                if w.read_only { ":ro" } else { "" }
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn new_id() -> String {
    use rand::Rng;
    let n: u64 = rand::thread_rng().gen();
    format!("{:012x}", n & 0xffff_ffff_ffff)
}

fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array we pass.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(SandboxError::Io {
            what: "cannot create a pipe",
            path: PathBuf::new(),
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn kill_if_alive(pid: u32) {
    if let Some(p) = ProcessId::of(pid) {
        if p.alive() {
            // SAFETY: plain kill(2); the pid was our sandbox init and still
            // exists. The init of a pid namespace takes the namespace with it.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
}

/// Last `n` lines of a log file, for error messages.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Remove a sandbox directory. Files created inside by other mapped uids may
/// lack owner write permission on directories; fix and retry.
fn remove_tree(dir: &Path) -> Result<()> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(_) => {
            let _ = Command::new("chmod")
                .arg("-R")
                .arg("u+rwX")
                .arg(dir)
                .status();
            std::fs::remove_dir_all(dir).map_err(|source| SandboxError::Io {
                what: "cannot remove sandbox directory",
                path: dir.to_path_buf(),
                source,
            })
        }
    }
}
