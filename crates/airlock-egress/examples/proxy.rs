//! A standalone egress proxy for benchmarks and manual tests.
//!
//! cargo run --release -p airlock-egress --example proxy -- --listen 127.0.0.1:PORT \
//!     [--allow-cidr C]... [--allow-host P]... [--block-host P]... [--policy allow|deny] [--log]
//!     [--bypass-host P]... [--bypass-cidr C]... [--tls-ca-dir DIR]
//!
//! With `--tls-ca-dir DIR` the proxy terminates TLS on allowed, non-bypassed CONNECTs with
//! the CA in DIR (created on first use); upstreams are verified against the native roots
//! plus `$AIRLOCK_UPSTREAM_EXTRA_CA` (a PEM file) if set.
//!
//! With `--log` every event is printed to stderr as a JSON line; otherwise events are
//! only counted, and the count is printed on SIGINT/SIGTERM.

use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use airlock_egress::{Egress, EgressConfig, EventSink, SystemResolver, TlsTermination};
use airlock_policy::{Action, Event, Mode, Policy, Rule};

struct Sink {
    log: bool,
    count: AtomicU64,
}

impl EventSink for Sink {
    fn record(&self, ev: Event) {
        self.count.fetch_add(1, Ordering::Relaxed);
        if self.log {
            if let Ok(line) = serde_json::to_string(&ev) {
                eprintln!("{line}");
            }
        }
    }
}

const USAGE: &str = "usage: proxy --listen ADDR:PORT [--policy allow|deny] [--allow-cidr C]... [--allow-host P]... \
[--block-cidr C]... [--block-host P]... [--bypass-host P]... [--bypass-cidr C]... [--tls-ca-dir DIR] [--log]";

struct Args {
    listen: String,
    policy: Policy,
    log: bool,
    tls_ca_dir: Option<std::path::PathBuf>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = std::env::args().skip(1);
    let mut listen = None;
    let mut policy = Policy::default();
    let mut log = false;
    let mut tls_ca_dir = None;
    while let Some(a) = args.next() {
        let mut val = || {
            args.next()
                .ok_or_else(|| format!("{a} needs a value\n{USAGE}"))
        };
        match a.as_str() {
            "--listen" => listen = Some(val()?),
            "--policy" => policy.mode = val()?.parse::<Mode>().map_err(|e| e.to_string())?,
            "--allow-cidr" => {
                policy.add(Rule::cidr(Action::Allow, &val()?).map_err(|e| e.to_string())?)
            }
            "--block-cidr" => {
                policy.add(Rule::cidr(Action::Block, &val()?).map_err(|e| e.to_string())?)
            }
            "--allow-host" => {
                policy.add(Rule::host(Action::Allow, &val()?).map_err(|e| e.to_string())?)
            }
            "--block-host" => {
                policy.add(Rule::host(Action::Block, &val()?).map_err(|e| e.to_string())?)
            }
            "--bypass-cidr" => {
                policy.add(Rule::cidr(Action::Bypass, &val()?).map_err(|e| e.to_string())?)
            }
            "--bypass-host" => {
                policy.add(Rule::host(Action::Bypass, &val()?).map_err(|e| e.to_string())?)
            }
            "--tls-ca-dir" => tls_ca_dir = Some(val()?.into()),
            "--log" => log = true,
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    Ok(Args {
        listen: listen.ok_or_else(|| format!("--listen is required\n{USAGE}"))?,
        policy,
        log,
        tls_ca_dir,
    })
}

fn main() -> ExitCode {
    let Args {
        listen,
        policy,
        log,
        tls_ca_dir,
    } = match parse_args() {
        Ok(x) => x,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("proxy: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let sink = Arc::new(Sink {
        log,
        count: AtomicU64::new(0),
    });
    let res: std::io::Result<()> = rt.block_on(async {
        let l = tokio::net::TcpListener::bind(&listen).await?;
        eprintln!(
            "proxy: listening on {} ({} rules, mode {})",
            l.local_addr()?,
            policy.rules.len(),
            policy.mode
        );
        let mut egress = Egress::new(EgressConfig {
            sandbox: "bench".into(),
            policy,
            sink: sink.clone(),
            resolver: Arc::new(SystemResolver),
        });
        if let Some(dir) = tls_ca_dir {
            let ca = airlock_tls::Ca::load_or_create(&dir).map_err(std::io::Error::other)?;
            let upstream =
                airlock_tls::upstream_client_config_from_env().map_err(std::io::Error::other)?;
            eprintln!("proxy: terminating TLS with {}", ca.cert_path().display());
            egress = egress.with_tls(Arc::new(TlsTermination::new(Arc::new(ca), upstream)));
        }
        let egress = Arc::new(egress);
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = egress.serve_tcp(l) => r,
            _ = tokio::signal::ctrl_c() => Ok(()),
            _ = term.recv() => Ok(()),
        }
    });
    eprintln!("proxy: {} events", sink.count.load(Ordering::Relaxed));
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("proxy: {e}");
            ExitCode::FAILURE
        }
    }
}
