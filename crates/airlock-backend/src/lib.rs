//! Sandbox backends of airlock, behind one trait.
//!
//! Owns: creating a sandbox's isolation boundary around the guest agent and
//! nothing more — namespaces, mounts, uid/gid mappings, Landlock, seccomp,
//! no_new_privs ([`ns`], the namespace backend), the QEMU microVM ([`vm`])
//! — plus each backend's runtime availability probe.
//!
//! Must not: talk the host↔guest protocol beyond handing the guest its
//! [`airlock_protocol::GuestConfig`], touch the egress engine (it only
//! receives the path of its socket), or keep state on disk besides the
//! sandbox's layer directory it is given (and, for the VM backend, its
//! shared caches: kernel, initramfs, root images; see [`vm`]).
//!
//! # Wiring the namespace backend into a binary
//! The namespace backend re-executes a program (by default the running
//! executable, `/proc/self/exe`) as the sandbox's PID 1 to set the sandbox up
//! before it becomes the guest agent. That program must call
//! [`ns_init_if_requested`] first thing in `main`, before any threads exist:
//!
//! ```ignore
//! fn main() {
//!     airlock_backend::ns_init_if_requested(); // diverges for `PROG __ns-init ...`
//!     // ... normal CLI ...
//! }
//! ```
//!
//! The small `airlock-ns-init` binary of this crate does just that and can be
//! used instead (see [`ns::NamespaceBackend::with_init_program`]).

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

pub mod net;
pub mod ns;
pub mod seccomp;
mod sys;
pub mod vm;

pub use ns::{ns_init_if_requested, NamespaceBackend, NS_INIT_ARG};
pub use vm::{VmBackend, VmConfig};

/// Which isolation a backend provides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackendKind {
    /// Linux namespaces + seccomp + Landlock + no_new_privs (`ns`).
    Namespace,
    /// One QEMU microVM per sandbox (`vm`, see [`vm::VmBackend`]).
    Vm,
}

impl BackendKind {
    /// The short name used on the command line (`--isolation ns|vm`).
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Namespace => "ns",
            BackendKind::Vm => "vm",
        }
    }
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for BackendKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "ns" | "namespace" => Ok(BackendKind::Namespace),
            "vm" => Ok(BackendKind::Vm),
            other => Err(format!("unknown isolation {other:?} (expected ns or vm)")),
        }
    }
}

/// A sandbox backend.
pub trait Backend: Send + Sync {
    fn kind(&self) -> BackendKind;
    /// Runtime availability check: can this host create this kind of sandbox
    /// for the invoking user? `ok == false` comes with the reasons in
    /// `details`; `Err` only for a failure of the probe itself.
    fn probe(&self) -> Result<ProbeReport, BackendError>;
    /// Create the sandbox and start the guest agent as its PID 1. Returns
    /// once the guest agent has been exec'd (or with the reason it could not).
    fn launch(&self, spec: LaunchSpec) -> Result<Box<dyn Instance>, BackendError>;
}

/// What [`Backend::probe`] found.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProbeReport {
    pub ok: bool,
    /// One finding per line, e.g. `landlock: ABI 7`,
    /// `user namespaces: unprivileged allowed`.
    pub details: Vec<String>,
}

/// A running sandbox.
pub trait Instance: Send {
    /// Host pid of the sandbox's init (the guest agent, PID 1 inside).
    fn pid(&self) -> u32;
    /// Block until the sandbox's init exits; later calls return the same status.
    fn wait(&mut self) -> Result<ExitStatus, BackendError>;
    /// Has the init exited? Never blocks.
    fn try_wait(&mut self) -> Result<Option<ExitStatus>, BackendError>;
    /// SIGTERM the init, SIGKILL after `grace`; returns once it is dead. The
    /// whole sandbox (its pid namespace) dies with its init.
    fn terminate(&mut self, grace: Duration) -> Result<(), BackendError>;
    /// The guest's network link, for [`NetworkMode::Tap`]: the fd to serve with the
    /// user-space stack and how frames travel on it ([`LinkKind`]). Returns it once;
    /// `None` in loopback mode.
    fn take_network(&mut self) -> Option<(OwnedFd, LinkKind)> {
        None
    }
}

/// How Ethernet frames travel on the fd of [`Instance::take_network`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LinkKind {
    /// A TAP device fd (`IFF_TAP | IFF_NO_PI`): one frame per read/write
    /// (the namespace backend; serve with `airlock_netstack::TapLink`).
    Tap,
    /// A connected `AF_UNIX` `SOCK_STREAM` socket speaking QEMU's `-netdev stream`
    /// framing, 4-byte big-endian length + frame (the VM backend; serve with
    /// `airlock_netstack::StreamLink`).
    Stream,
}

/// The sandbox's network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum NetworkMode {
    /// Only `lo`; the guest agent relays 127.0.0.1:3128 to the egress socket.
    #[default]
    Loopback,
    /// `lo` plus an `eth0` (10.0.2.15/24, default route via 10.0.2.2, MTU 65520)
    /// whose frames the supervisor serves with the user-space stack
    /// ([`Instance::take_network`]). Namespaces: a TAP device created inside the
    /// sandbox's network namespace (see [`net`]); VM: a virtio-net NIC on a QEMU
    /// `-netdev stream` socket (see [`vm`]).
    Tap,
}

/// A host directory made visible inside at the same absolute path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkspaceMount {
    pub path: PathBuf,
    pub read_only: bool,
}

/// Everything a backend needs to start one sandbox.
#[derive(Debug)]
pub struct LaunchSpec {
    /// Sandbox name (diagnostics; the host name comes from `guest_config`).
    pub name: String,
    /// Template root filesystem: read-only lower layer, shared.
    pub rootfs: PathBuf,
    /// Further read-only layers stacked over `rootfs`, topmost first (an
    /// agent template's own files over the base template). Shared too.
    pub lower_layers: Vec<PathBuf>,
    /// This sandbox's persistent writable layer; `upper/` and `work/` are
    /// created in it.
    pub layer_dir: PathBuf,
    /// Per-run scratch directory on the host (exists, owned by the invoker).
    pub run_dir: PathBuf,
    pub workspaces: Vec<WorkspaceMount>,
    /// Bound, listening AF_UNIX socket; inherited by the guest agent, its
    /// number is written into `guest_config.control_fd`.
    pub control_fd: OwnedFd,
    /// Host path of the egress engine's socket, bound at
    /// `/run/airlock/proxy.sock` inside.
    pub proxy_socket: Option<PathBuf>,
    /// Host path of the (static) guest agent binary; bound read-only at
    /// [`GUEST_BINARY_PATH`] inside and exec'd from there.
    pub guest_binary: PathBuf,
    pub guest_config: airlock_protocol::GuestConfig,
    /// The agent's stdout and stderr (appended).
    pub console_log: PathBuf,
    /// Small files written inside (through the overlay, so into the upper
    /// layer) before the agent starts: `(absolute path inside, content)`.
    pub extra_files: Vec<(PathBuf, Vec<u8>)>,
}

/// Where the guest binary is found inside a namespace sandbox.
pub const GUEST_BINARY_PATH: &str = "/run/airlock/airlock-guest";
/// Where the egress engine's socket is found inside a namespace sandbox.
pub const PROXY_SOCKET_PATH: &str = "/run/airlock/proxy.sock";

/// Errors of the backends. Messages say what failed and, for the common
/// causes, what to do.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error(
        "unprivileged user namespaces are disabled on this host ({detail}); \
         run as root or enable them (sysctl kernel.unprivileged_userns_clone=1, \
         kernel.apparmor_restrict_unprivileged_userns=0, user.max_user_namespaces>0)"
    )]
    UserNamespacesDisabled { detail: String },
    #[error("{step}: {path}")]
    Io {
        step: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{step}")]
    Sys {
        step: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid launch spec: {0}")]
    InvalidSpec(String),
    /// The sandbox's init reported a failure while setting the sandbox up.
    #[error("sandbox {name}: setup failed at {step}: {message}")]
    Setup {
        name: String,
        step: String,
        message: String,
    },
    /// The sandbox's init died before it could start the guest agent and
    /// without saying why.
    #[error("sandbox {name}: init exited during setup without a report ({status})")]
    InitDied { name: String, status: String },
    #[error("sandbox {name}: setup did not finish within {secs} s")]
    SetupTimeout { name: String, secs: u64 },
    #[error("the {0} backend is not implemented yet")]
    Unsupported(BackendKind),
}
