//! The supervisor: one process per running sandbox (`airlock __supervise ID
//! READY_FD`), started in its own session by [`crate::Manager::start`].
//!
//! It owns the sandbox's backend instance, its egress engine (listening on
//! `proxy.sock`), the event writer (SQLite + audit file) and the control
//! socket. It reports readiness — or the reason it failed — on the pipe
//! `READY_FD`, and records the truth in the store when the sandbox ends.
//!
//! Threads: the main thread launches the backend instance and waits for it
//! (the instance's parent-death signal is tied to this thread, which lives
//! as long as the process); a small tokio runtime serves the proxy and the
//! control socket; one thread writes events.

use crate::{control, files, SandboxError};
use airlock_backend::{Backend, LaunchSpec, NamespaceBackend, NetworkMode, WorkspaceMount};
use airlock_egress::{Egress, EgressConfig, EventSink, SystemResolver};
use airlock_policy::Event;
use airlock_protocol::GuestConfig;
use airlock_store::{AuditLog, Paths, ProcessId, SandboxRecord, Store};
use std::fs::File;
use std::io::Write;
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

/// Where the guest agent relays proxy clients, inside the sandbox.
pub const GUEST_PROXY_LISTEN: &str = "127.0.0.1:3128";
pub const GUEST_PROXY_URL: &str = "http://127.0.0.1:3128";
/// The explicit proxy in a VM: the user-space stack's gateway
/// (`airlock_netstack::GATEWAY:PROXY_PORT`); no relay inside.
pub const GUEST_VM_PROXY_URL: &str = "http://10.0.2.2:3128";
/// The system trust store inside (replaced by system roots + airlock CA).
pub const GUEST_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
/// airlock's CA certificate alone (NODE_EXTRA_CA_CERTS).
pub const GUEST_CA_CERT: &str = "/etc/airlock/ca.pem";
/// Where the egress socket is bind-mounted inside the sandbox.
pub const GUEST_PROXY_SOCKET: &str = "/run/airlock/proxy.sock";

struct Ready(Option<File>);

impl Ready {
    fn send(&mut self, msg: &str) {
        if let Some(mut f) = self.0.take() {
            let _ = f.write_all(msg.as_bytes());
        }
    }
}

/// Entry point of `airlock __supervise ID READY_FD`. Returns the process
/// exit code.
pub fn main(paths: Paths, id: &str, ready_fd: RawFd) -> i32 {
    // SAFETY: READY_FD was passed to us by `Manager::spawn_supervisor`, open
    // and owned by nobody else in this process. Mark it close-on-exec so the
    // sandbox does not inherit it.
    let ready = unsafe {
        libc::fcntl(ready_fd, libc::F_SETFD, libc::FD_CLOEXEC);
        File::from_raw_fd(ready_fd)
    };
    let mut ready = Ready(Some(ready));
    match run(&paths, id, &mut ready) {
        Ok(()) => 0,
        Err(msg) => {
            eprintln!("airlock supervisor {id}: {msg}");
            ready.send(&msg);
            1
        }
    }
}

struct Sink(Mutex<mpsc::Sender<Event>>);

impl EventSink for Sink {
    fn record(&self, ev: Event) {
        // An unbounded channel: never blocks the proxy. The lock is held
        // only for the send.
        if let Ok(tx) = self.0.lock() {
            let _ = tx.send(ev);
        }
    }
}

fn run(paths: &Paths, id: &str, ready: &mut Ready) -> Result<(), String> {
    let store = Store::open(paths).map_err(|e| chain(&e))?;
    let rec = store
        .get_by_id(id)
        .map_err(|e| chain(&e))?
        .ok_or_else(|| format!("no sandbox with id {id}"))?;
    let run_dir = paths.run_dir(id);
    let sandbox_dir = paths.sandbox_dir(id);
    let _ = std::fs::remove_dir_all(&run_dir);
    std::fs::create_dir_all(&run_dir).map_err(|e| format!("{}: {e}", run_dir.display()))?;
    std::fs::set_permissions(&run_dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| format!("{}: {e}", run_dir.display()))?;

    let result = run_in(paths, &rec, &store, &run_dir, &sandbox_dir, ready);
    let _ = std::fs::remove_dir_all(&run_dir);
    result
}

fn run_in(
    paths: &Paths,
    rec: &SandboxRecord,
    store: &Store,
    run_dir: &Path,
    sandbox_dir: &Path,
    ready: &mut Ready,
) -> Result<(), String> {
    let bind = |name: &str| {
        let p = run_dir.join(name);
        std::os::unix::net::UnixListener::bind(&p).map_err(|e| format!("{}: {e}", p.display()))
    };
    let proxy_l = bind(files::PROXY_SOCK)?;
    let agent_l = bind(files::AGENT_SOCK)?;
    let control_l = bind(files::CONTROL_SOCK)?;

    let templates = airlock_template::TemplateStore::new(paths.templates.clone());
    let template = templates
        .get(&rec.template)
        .map_err(|e| chain(&e))?
        .ok_or_else(|| {
            SandboxError::NoTemplate {
                name: rec.template.clone(),
            }
            .to_string()
        })?;
    // Agent templates are layers over base: topmost first, base last.
    let mut layers = templates.layers(&template).map_err(|e| chain(&e))?;
    let base_rootfs = layers
        .pop()
        .expect("layers holds at least the template's own");
    if rec.backend == "vm" && !layers.is_empty() {
        return Err(format!(
            "template {} is a layer over {}; the VM backend does not stack template layers yet: \
             use --isolation ns",
            rec.template,
            template.parent.as_deref().unwrap_or("base")
        ));
    }
    let guest_binary = find_guest_binary()?;

    // TLS termination: the CA stays on the host (DATA/tls, never mounted
    // in); the sandbox trusts its certificate. Credentials: real values
    // stay here, the guest gets placeholders.
    let ca =
        Arc::new(airlock_tls::Ca::load_or_create(&paths.data.join("tls")).map_err(|e| chain(&e))?);
    let upstream = airlock_tls::upstream_client_config_from_env().map_err(|e| chain(&e))?;
    let providers = airlock_secrets::load_providers(&paths.data).map_err(|e| chain(&e))?;
    let secrets = airlock_secrets::SecretStore::open(&paths.data);
    let creds = Arc::new(
        airlock_secrets::Credentials::resolve(&providers, &secrets, |k| std::env::var(k).ok())
            .map_err(|e| chain(&e))?,
    );
    let system_bundle = airlock_tls::SYSTEM_BUNDLE_PATHS
        .iter()
        .find_map(|p| std::fs::read(base_rootfs.join(p)).ok())
        .unwrap_or_default();
    let bundle = airlock_tls::guest_bundle(&system_bundle, ca.cert_pem());
    let mut env = base_env(rec);
    env.extend(airlock_tls::guest_env(GUEST_CA_BUNDLE, GUEST_CA_CERT));
    env.extend(creds.placeholder_env());

    // A VM reaches the proxy over its NIC (10.0.2.2:3128): no relay.
    let relay = rec.backend != "vm";
    let config = GuestConfig {
        hostname: rec.name.clone(),
        env,
        control_fd: -1,
        proxy_listen: relay.then(|| GUEST_PROXY_LISTEN.into()),
        proxy_socket: relay.then(|| GUEST_PROXY_SOCKET.into()),
        workspaces: rec
            .workspaces
            .iter()
            .map(|w| w.path.display().to_string())
            .collect(),
    };
    // Transparent capture needs a TAP device (/dev/net/tun); without it the
    // sandbox keeps only loopback and the explicit proxy relay.
    let vm = rec.backend == "vm";
    let network = if vm {
        // A virtio-net NIC on a stream socket: always available.
        NetworkMode::Tap
    } else {
        network_mode()
    };
    let hosts = format!(
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{}\n",
        rec.name
    );
    if !vm {
        prepare_layer(&sandbox_dir.join(files::LAYER))?;
    }
    let spec = LaunchSpec {
        name: rec.name.clone(),
        rootfs: base_rootfs,
        lower_layers: layers,
        layer_dir: sandbox_dir.join(files::LAYER),
        run_dir: run_dir.to_path_buf(),
        workspaces: rec
            .workspaces
            .iter()
            .map(|w| WorkspaceMount {
                path: w.path.clone(),
                read_only: w.read_only,
            })
            .collect(),
        control_fd: agent_l.into(),
        proxy_socket: Some(run_dir.join(files::PROXY_SOCK)),
        guest_binary,
        guest_config: config,
        console_log: sandbox_dir.join(files::CONSOLE_LOG),
        extra_files: {
            let mut f = vec![
                (PathBuf::from(GUEST_CA_BUNDLE), bundle),
                (
                    PathBuf::from(GUEST_CA_CERT),
                    ca.cert_pem().as_bytes().to_vec(),
                ),
                // So that update-ca-certificates inside keeps trusting it.
                (
                    PathBuf::from("/usr/local/share/ca-certificates/airlock-ca.crt"),
                    ca.cert_pem().as_bytes().to_vec(),
                ),
                (PathBuf::from("/etc/hosts"), hosts.into_bytes()),
                (
                    PathBuf::from("/etc/hostname"),
                    format!("{}\n", rec.name).into_bytes(),
                ),
            ];
            if network == NetworkMode::Tap {
                f.push((
                    PathBuf::from("/etc/resolv.conf"),
                    airlock_backend::net::resolv_conf().into_bytes(),
                ));
            }
            f
        },
    };
    eprintln!("airlock supervisor {}: network {network:?}", rec.id);
    let backend: Box<dyn Backend> = if vm {
        Box::new(airlock_backend::VmBackend::new().with_network(network))
    } else {
        Box::new(NamespaceBackend::new().with_network(network))
    };
    let mut instance = backend.launch(spec).map_err(|e| chain(&e))?;
    let init_pid = instance.pid();
    let console = sandbox_dir.join(files::CONSOLE_LOG);

    if let Err(e) = airlock_exec::ping(&run_dir.join(files::AGENT_SOCK), Duration::from_secs(20)) {
        let _ = instance.terminate(Duration::from_secs(1));
        return Err(format!(
            "the guest agent did not answer ({}); console log {}:\n{}",
            chain(&e),
            console.display(),
            crate::tail(&console, 10)
        ));
    }

    // Event writer: batches into SQLite and the audit file.
    let (tx, rx) = mpsc::channel::<Event>();
    let writer = {
        let paths = paths.clone();
        std::thread::Builder::new()
            .name("events".into())
            .spawn(move || write_events(&paths, rx))
            .map_err(|e| format!("cannot start the event writer: {e}"))?
    };

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("egress")
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    let egress = Arc::new(
        Egress::new(EgressConfig {
            sandbox: rec.name.clone(),
            policy: rec.policy.clone(),
            sink: Arc::new(Sink(Mutex::new(tx))),
            resolver: Arc::new(SystemResolver),
        })
        .with_tls(Arc::new(airlock_egress::TlsTermination::new(ca, upstream)))
        .with_credentials(creds),
    );
    let stopping = Arc::new(AtomicBool::new(false));
    {
        let _guard = rt.enter();
        proxy_l
            .set_nonblocking(true)
            .and_then(|_| control_l.set_nonblocking(true))
            .map_err(|e| format!("sockets: {e}"))?;
        let proxy_l = tokio::net::UnixListener::from_std(proxy_l)
            .map_err(|e| format!("proxy socket: {e}"))?;
        let control_l = tokio::net::UnixListener::from_std(control_l)
            .map_err(|e| format!("control socket: {e}"))?;
        let eg = egress.clone();
        rt.spawn(async move {
            if let Err(e) = eg.serve_unix(proxy_l).await {
                eprintln!("egress proxy stopped: {e}");
            }
        });
        rt.spawn(serve_control(
            control_l,
            paths.clone(),
            rec.id.clone(),
            egress.clone(),
            stopping.clone(),
            init_pid,
        ));
        rt.spawn(watch_signals(stopping.clone(), init_pid));
        if let Some((fd, kind)) = instance.take_network() {
            let link: Box<dyn airlock_netstack::Link> = match kind {
                airlock_backend::LinkKind::Tap => Box::new(
                    airlock_netstack::TapLink::new(fd)
                        .map_err(|e| format!("the sandbox's network device: {e}"))?,
                ),
                airlock_backend::LinkKind::Stream => {
                    let s = std::os::unix::net::UnixStream::from(fd);
                    let s = s
                        .set_nonblocking(true)
                        .and_then(|_| tokio::net::UnixStream::from_std(s))
                        .map_err(|e| format!("the VM's network socket: {e}"))?;
                    Box::new(airlock_netstack::StreamLink::new(s))
                }
            };
            let stack = airlock_netstack::Netstack::new(link, Arc::new(ToEgress(egress.clone())));
            rt.spawn(async move {
                if let Err(e) = stack.run().await {
                    eprintln!("network stack stopped: {e}");
                }
            });
        }
    }

    store
        .set_running(&rec.id, ProcessId::current(), init_pid)
        .map_err(|e| chain(&e))?;
    ready.send("ok");

    // Wait for the sandbox to end; a stop request ends it through the
    // backend (a VM powers off cleanly so its disk is synced).
    let status = loop {
        match instance.try_wait() {
            Ok(Some(st)) => break Ok(st),
            Ok(None) => {}
            Err(e) => break Err(e),
        }
        if stopping.load(Ordering::SeqCst) {
            let _ = instance.terminate(Duration::from_secs(5));
            break instance.wait();
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let error = if stopping.load(Ordering::SeqCst) {
        None
    } else {
        Some(match status {
            Ok(s) => format!(
                "the sandbox's init exited unexpectedly ({s:?}); see {}",
                console.display()
            ),
            Err(e) => format!("lost the sandbox's init: {}", chain(&e)),
        })
    };
    if let Some(e) = &error {
        eprintln!("{e}");
    }
    if let Err(e) = store.set_stopped(&rec.id, error.as_deref()) {
        eprintln!("cannot record the stop: {}", chain(&e));
    }
    // Stop accepting, let the writer drain.
    rt.shutdown_timeout(Duration::from_millis(200));
    drop(egress);
    let _ = writer.join();
    Ok(())
}

fn write_events(paths: &Paths, rx: mpsc::Receiver<Event>) {
    let mut store = match Store::open(paths) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("event writer: {}", chain(&e));
            return;
        }
    };
    let mut audit = match AuditLog::open(&paths.audit()) {
        Ok(a) => Some(a),
        Err(e) => {
            eprintln!("audit log: {}", chain(&e));
            None
        }
    };
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < 512 {
            match rx.try_recv() {
                Ok(e) => batch.push(e),
                Err(_) => break,
            }
        }
        if let Some(a) = audit.as_mut() {
            if let Err(e) = a.append(&batch) {
                eprintln!("audit log: {}", chain(&e));
            }
        }
        if let Err(e) = store.insert_events(&batch) {
            eprintln!("event store: {}", chain(&e));
        }
    }
}

async fn serve_control(
    l: tokio::net::UnixListener,
    paths: Paths,
    id: String,
    egress: Arc<Egress>,
    stopping: Arc<AtomicBool>,
    init_pid: u32,
) {
    loop {
        let Ok((conn, _)) = l.accept().await else {
            continue;
        };
        let (rd, mut wr) = conn.into_split();
        let mut line = String::new();
        let mut rd = tokio::io::BufReader::new(rd);
        if rd.read_line(&mut line).await.is_err() {
            continue;
        }
        let reply = match serde_json::from_str::<control::Request>(line.trim()) {
            Err(e) => control::Reply {
                ok: false,
                error: Some(format!("bad request: {e}")),
            },
            Ok(control::Request::ReloadPolicy) => match reload_policy(&paths, &id) {
                Ok(p) => {
                    egress.set_policy(p);
                    control::Reply {
                        ok: true,
                        error: None,
                    }
                }
                Err(e) => control::Reply {
                    ok: false,
                    error: Some(e),
                },
            },
            Ok(control::Request::Stop) => {
                stop_sandbox(&stopping, init_pid);
                control::Reply {
                    ok: true,
                    error: None,
                }
            }
        };
        let mut out = serde_json::to_vec(&reply).unwrap_or_default();
        out.push(b'\n');
        let _ = wr.write_all(&out).await;
    }
}

fn reload_policy(paths: &Paths, id: &str) -> Result<airlock_policy::Policy, String> {
    let store = Store::open(paths).map_err(|e| chain(&e))?;
    let rec = store
        .get_by_id(id)
        .map_err(|e| chain(&e))?
        .ok_or("the sandbox record is gone")?;
    Ok(rec.policy)
}

/// Ask the main thread to end the sandbox through its backend (SIGTERM to
/// the namespace init, which ends every process; a clean power-off for a
/// VM; SIGKILL after a grace period either way).
fn stop_sandbox(stopping: &AtomicBool, _init_pid: u32) {
    stopping.store(true, Ordering::SeqCst);
}

async fn watch_signals(stopping: Arc<AtomicBool>, init_pid: u32) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        return;
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
        _ = hup.recv() => {},
    }
    stop_sandbox(&stopping, init_pid);
}

/// The environment every process in the sandbox starts with.
pub fn base_env(rec: &SandboxRecord) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = vec![
        (
            "PATH".into(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        ),
        ("LANG".into(), "C.UTF-8".into()),
        ("AIRLOCK_SANDBOX".into(), rec.name.clone()),
        // Tells agents (Claude Code among them) that they run in a sandbox.
        ("IS_SANDBOX".into(), "1".into()),
    ];
    let proxy = if rec.backend == "vm" {
        GUEST_VM_PROXY_URL
    } else {
        GUEST_PROXY_URL
    };
    for k in ["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"] {
        env.push((k.into(), proxy.into()));
    }
    for k in ["NO_PROXY", "no_proxy"] {
        env.push((k.into(), "localhost,127.0.0.1,::1".into()));
    }
    env
}

/// The static guest agent binary: `$AIRLOCK_GUEST`, else next to the
/// `airlock` executable, else in `../lib/airlock/`, else the development
/// build under `target/guest/`.
pub fn find_guest_binary() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("AIRLOCK_GUEST").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        return if p.is_file() {
            p.canonicalize()
                .map_err(|e| format!("AIRLOCK_GUEST={}: {e}", p.display()))
        } else {
            Err(format!("AIRLOCK_GUEST={} does not exist", p.display()))
        };
    }
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let dir = exe.parent().unwrap_or(Path::new("/"));
    // A development tree prefers the static build of scripts/build-guest.sh
    // over cargo's dynamically linked one next to the binary.
    let candidates = [
        dir.join("../guest/x86_64-unknown-linux-gnu/release/airlock-guest"),
        dir.join("../../guest/x86_64-unknown-linux-gnu/release/airlock-guest"),
        dir.join("airlock-guest"),
        dir.join("../lib/airlock/airlock-guest"),
    ];
    candidates
        .iter()
        .find(|p| p.is_file())
        .and_then(|p| p.canonicalize().ok())
        .ok_or_else(|| {
            format!(
                "the guest agent binary airlock-guest was not found next to {} or in ../lib/airlock; build it with `scripts/build-guest.sh` or set AIRLOCK_GUEST",
                exe.display()
            )
        })
}

/// An error and its sources on one line.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// TAP (transparent capture) when this process can open /dev/net/tun,
/// else loopback only (the explicit proxy still works).
fn network_mode() -> NetworkMode {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
    {
        Ok(_) => NetworkMode::Tap,
        Err(e) => {
            eprintln!("no transparent capture ({e} opening /dev/net/tun): loopback and explicit proxy only");
            NetworkMode::Loopback
        }
    }
}

/// Hands the sandbox's captured traffic to the egress engine.
struct ToEgress(Arc<Egress>);

impl airlock_netstack::FlowHandler for ToEgress {
    fn tcp(&self, flow: airlock_netstack::TcpFlow, orig_dst: std::net::SocketAddr) {
        tokio::spawn(self.0.clone().serve_transparent(flow, orig_dst));
    }

    fn dns(
        &self,
        query: Vec<u8>,
        _orig_dst: std::net::SocketAddr,
    ) -> airlock_netstack::BoxFuture<'static, Option<Vec<u8>>> {
        let e = self.0.clone();
        Box::pin(async move { e.answer_dns(&query).await })
    }

    fn dropped(&self, d: airlock_netstack::Dropped) {
        self.0.record_dropped(d.proto.as_str(), d.dst, d.reason);
    }
}

/// Directories that the template's packages give to system users but that
/// the sandbox's root must own: workloads run without capabilities, so root
/// inside cannot chmod or unlink files of other users (apt's `partial`
/// directories belong to `_apt`; airlock runs apt as root). Created in the
/// sandbox's writable layer, owned by the invoker (root inside), so they
/// shadow the template's.
fn prepare_layer(layer: &Path) -> Result<(), String> {
    for d in [
        "var/lib/apt/lists/partial",
        "var/cache/apt/archives/partial",
    ] {
        let p = layer.join("upper").join(d);
        if !p.exists() {
            std::fs::create_dir_all(&p).map_err(|e| format!("{}: {e}", p.display()))?;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| format!("{}: {e}", p.display()))?;
        }
    }
    Ok(())
}
