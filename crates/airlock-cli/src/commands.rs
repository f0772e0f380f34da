//! Command implementations: argument checks, calls into
//! `airlock_sandbox::Manager`, and output.

use crate::cli::{
    Cli, Command, ExecArgs, Isolation, ModeArg, NetworkCmd, ProxyArgs, RunArgs, SecretCmd,
    TemplateCmd,
};
use airlock_policy::{Action, Mode, Policy, Rule};
use airlock_sandbox::{agents, workspace, CreateSpec, ExecOptions, Manager};
use airlock_store::{Paths, SandboxRecord, Status};
use anyhow::{bail, Context, Result};
use serde_json::json;
use std::ffi::OsString;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

/// Entry points airlock runs itself: the supervisor and the namespace
/// backend's init stage. `None` when `args` is a user command.
pub fn hidden_entry(args: &[OsString]) -> Option<u8> {
    let first = args.get(1)?.to_str()?;
    if first == airlock_sandbox::SUPERVISE_ARG {
        let (Some(id), Some(fd)) = (
            args.get(2).and_then(|s| s.to_str()),
            args.get(3)
                .and_then(|s| s.to_str())
                .and_then(|s| s.parse().ok()),
        ) else {
            eprintln!(
                "usage: airlock {} ID READY_FD",
                airlock_sandbox::SUPERVISE_ARG
            );
            return Some(2);
        };
        let code = airlock_sandbox::supervisor::main(Paths::from_env(), id, fd);
        return Some(code.clamp(0, 255) as u8);
    }
    None
}

/// As a Docker CLI plugin (`docker-sandbox`), answer the metadata probe and
/// drop the `sandbox` word Docker inserts.
pub fn plugin_args(mut args: Vec<OsString>) -> Vec<OsString> {
    let invoked = args
        .first()
        .and_then(|a| PathBuf::from(a).file_name().map(|f| f.to_os_string()));
    if invoked.as_deref() == Some(std::ffi::OsStr::new("docker-sandbox")) {
        if args.get(1).and_then(|a| a.to_str()) == Some("docker-cli-plugin-metadata") {
            println!(
                "{}",
                json!({
                    "SchemaVersion": "0.1.0",
                    "Vendor": "airlock",
                    "Version": env!("CARGO_PKG_VERSION"),
                    "ShortDescription": "Run AI coding agents in disposable sandboxes",
                })
            );
            std::process::exit(0);
        }
        if args.get(1).and_then(|a| a.to_str()) == Some("sandbox") {
            args.remove(1);
        }
        args[0] = "airlock".into();
    }
    args
}

pub fn run(cli: Cli) -> Result<i32> {
    let paths = Paths::from_env();
    let mgr = Manager::new(paths)?;
    match cli.command {
        Command::Run(a) => cmd_run(&mgr, a, true),
        Command::Create(a) => cmd_run(&mgr, a, false),
        Command::Ls { json, quiet } => cmd_ls(&mgr, json, quiet),
        Command::Exec(a) => cmd_exec(&mgr, a),
        Command::Stop { names } => each(&names, |n| {
            let _l = mgr.lock()?;
            mgr.stop(n)?;
            println!("{n}");
            Ok(())
        }),
        Command::Start { names } => each(&names, |n| {
            let _l = mgr.lock()?;
            mgr.start(n)?;
            println!("{n}");
            Ok(())
        }),
        Command::Rm { force, names } => each(&names, |n| {
            let _l = mgr.lock()?;
            mgr.remove(n, force)?;
            println!("{n}");
            Ok(())
        }),
        Command::Inspect { name, json } => cmd_inspect(&mgr, &name, json),
        Command::Network(NetworkCmd::Proxy(a)) => cmd_proxy(&mgr, a),
        Command::Network(NetworkCmd::Log {
            name,
            json,
            limit,
            follow,
        }) => cmd_log(&mgr, name, json, limit, follow),
        Command::Template(t) => cmd_template(&mgr, t),
        Command::Secret(c) => cmd_secret(&mgr, c),
        Command::Doctor { json } => cmd_doctor(&mgr, json),
    }
}

/// Apply `f` to every name; report each failure, fail if any did.
fn each(names: &[String], mut f: impl FnMut(&str) -> Result<()>) -> Result<i32> {
    let mut failed = 0;
    for n in names {
        if let Err(e) = f(n) {
            failed += 1;
            eprint!("airlock: error: {e}");
            for c in e.chain().skip(1) {
                eprint!(": {c}");
            }
            eprintln!();
        }
    }
    Ok(if failed > 0 { 1 } else { 0 })
}

fn home_dir() -> Option<PathBuf> {
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
}

fn cmd_run(mgr: &Manager, a: RunArgs, attach: bool) -> Result<i32> {
    let is_agent = agents::find(&a.agent).is_some();
    let cwd = std::env::current_dir().context("cannot read the current directory")?;
    let mut progress = template_progress();
    // `run NAME` re-enters an existing sandbox.
    let existing = if !is_agent && a.workspaces.is_empty() && a.name.is_none() {
        mgr.store()?.get(&a.agent)?
    } else {
        None
    };
    let rec = {
        let _lock = mgr.lock()?;
        let (rec, new) = match existing {
            Some(rec) => (rec, false),
            None => {
                if !is_agent {
                    bail!(
                        "unknown agent {:?} and no sandbox of that name; known agents: {} (see `airlock ls` for sandboxes)",
                        a.agent,
                        agents::names().join(", ")
                    );
                }
                let ws_args = if a.workspaces.is_empty() {
                    vec![cwd.display().to_string()]
                } else {
                    a.workspaces.clone()
                };
                let workspaces = workspace::parse_all(
                    &ws_args,
                    &cwd,
                    home_dir().as_deref(),
                    &mgr.paths.data,
                    a.force,
                )?;
                let template = a.template.clone().unwrap_or_else(|| {
                    agents::find(&a.agent)
                        .map_or(airlock_template::BASE, |ag| ag.template)
                        .to_string()
                });
                // Agent templates are layers over base, which only the
                // namespace backend stacks so far: `auto` picks it for them.
                let layered = mgr.templates().agent_pin(&template)?.is_some()
                    || mgr
                        .templates()
                        .get(&template)
                        .ok()
                        .flatten()
                        .is_some_and(|t| t.parent.is_some());
                let (backend, notice) = airlock_sandbox::choose_backend(match a.isolation {
                    Isolation::Auto if layered => airlock_sandbox::Isolation::Ns,
                    Isolation::Auto => airlock_sandbox::Isolation::Auto,
                    Isolation::Vm => airlock_sandbox::Isolation::Vm,
                    Isolation::Ns => airlock_sandbox::Isolation::Ns,
                })?;
                let spec = CreateSpec {
                    backend,
                    agent: a.agent.clone(),
                    workspaces,
                    name: a.name.clone(),
                    template,
                    agent_args: a.agent_args.clone(),
                    policy: Policy::default(),
                };
                // Validate before building a template for nothing.
                if let Some(n) = &spec.name {
                    airlock_sandbox::validate_name(n)?;
                }
                mgr.ensure_template(&spec.template, &mut progress)?;
                let created = mgr.create(&spec)?;
                if let (Some(n), true) = (notice, created.new) {
                    eprintln!("airlock: {n}");
                }
                (created.record, created.new)
            }
        };
        if !attach {
            if !new {
                bail!(
                    "sandbox {:?} already exists (workspaces {})",
                    rec.name,
                    airlock_sandbox::describe_workspaces(&rec.workspaces)
                );
            }
            println!("{}", rec.name);
            return Ok(0);
        }
        if rec.status() != Status::Running {
            mgr.ensure_template(&rec.template, &mut progress)?;
            if let Err(e) = mgr.start(&rec.name) {
                if new {
                    // Never leave a half-created sandbox behind.
                    let _ = mgr.remove(&rec.name, true);
                }
                return Err(e.into());
            }
        }
        mgr.get(&rec.name)?
    };
    let agent = agents::find(&rec.agent)
        .with_context(|| format!("sandbox {:?} runs unknown agent {:?}", rec.name, rec.agent))?;
    let args = if a.agent_args.is_empty() && !is_agent {
        vec![]
    } else {
        a.agent_args.clone()
    };
    let argv = (agent.command)(&args);
    let tty = std::io::stdin().is_terminal() && std::io::stdout().is_terminal();
    let cwd_inside = rec
        .workspaces
        .iter()
        .find(|w| cwd.starts_with(&w.path))
        .map(|_| cwd.clone())
        .or_else(|| rec.workspaces.first().map(|w| w.path.clone()));
    let opts = ExecOptions {
        argv,
        env: vec![],
        cwd: cwd_inside.map(|p| p.display().to_string()),
        user: None,
        tty,
        interactive: true,
    };
    Ok(mgr.exec(&rec, &opts)?)
}

fn cmd_exec(mgr: &Manager, a: ExecArgs) -> Result<i32> {
    let rec = mgr.get(&a.name)?;
    let mut env = Vec::new();
    for kv in &a.env {
        match kv.split_once('=') {
            Some((k, v)) if !k.is_empty() => env.push((k.to_string(), v.to_string())),
            _ => match std::env::var(kv) {
                // Docker's `-e NAME` takes the value from our environment.
                Ok(v) if !kv.is_empty() => env.push((kv.clone(), v)),
                _ => bail!("bad -e {kv:?}: expected KEY=VALUE"),
            },
        }
    }
    if a.tty && !std::io::stdin().is_terminal() {
        bail!("-t needs a terminal on stdin (drop -t to run without one)");
    }
    let opts = ExecOptions {
        argv: a.command,
        env,
        cwd: a.workdir,
        user: a.user,
        tty: a.tty,
        interactive: a.interactive,
    };
    Ok(mgr.exec(&rec, &opts)?)
}

/// `ns`, or `vm (kvm)` / `vm (tcg)` with the acceleration this host gives
/// (the backend's cached probe).
fn backend_label(backend: &str) -> String {
    if backend != "vm" {
        return backend.to_string();
    }
    match airlock_backend::VmBackend::new().accel() {
        Ok((a, _)) => format!("vm ({})", a.as_str()),
        Err(_) => "vm".into(),
    }
}

fn record_json(mgr: &Manager, r: &SandboxRecord) -> serde_json::Value {
    json!({
        "backend_detail": backend_label(&r.backend),
        "name": r.name,
        "id": r.id,
        "agent": r.agent,
        "status": r.status().to_string(),
        "backend": r.backend,
        "template": r.template,
        "workspaces": r.workspaces,
        "agent_args": r.agent_args,
        "created": r.created,
        "supervisor_pid": r.supervisor.map(|s| s.pid),
        "init_pid": r.init_pid,
        "last_error": r.last_error,
        "policy": r.policy,
        "dir": mgr.paths.sandbox_dir(&r.id),
    })
}

fn cmd_ls(mgr: &Manager, as_json: bool, quiet: bool) -> Result<i32> {
    let list = mgr.list()?;
    if quiet {
        for r in &list {
            println!("{}", r.name);
        }
    } else if as_json {
        let v: Vec<_> = list.iter().map(|r| record_json(mgr, r)).collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        let rows: Vec<[String; 5]> = list
            .iter()
            .map(|r| {
                [
                    r.name.clone(),
                    r.agent.clone(),
                    r.status().to_string(),
                    backend_label(&r.backend),
                    airlock_sandbox::describe_workspaces(&r.workspaces),
                ]
            })
            .collect();
        print_table(&["NAME", "AGENT", "STATUS", "BACKEND", "WORKSPACES"], &rows);
    }
    Ok(0)
}

fn print_table<const N: usize>(head: &[&str; N], rows: &[[String; N]]) {
    let mut w = head.map(|h| h.len());
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == N {
                s.push_str(c);
            } else {
                s.push_str(&format!("{:<width$}  ", c, width = w[i]));
            }
        }
        println!("{}", s.trim_end());
    };
    line(head.to_vec());
    for r in rows {
        line(r.iter().map(|s| s.as_str()).collect());
    }
}

fn cmd_inspect(mgr: &Manager, name: &str, as_json: bool) -> Result<i32> {
    let r = mgr.get(name)?;
    let v = record_json(mgr, &r);
    if as_json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(0);
    }
    println!("Name:        {}", r.name);
    println!("ID:          {}", r.id);
    println!("Agent:       {}", r.agent);
    println!("Status:      {}", r.status());
    println!("Backend:     {}", r.backend);
    println!("Template:    {}", r.template);
    println!("Created:     {}", r.created);
    println!(
        "Workspaces:  {}",
        airlock_sandbox::describe_workspaces(&r.workspaces)
    );
    if let Some(s) = r.supervisor {
        println!("Supervisor:  pid {}", s.pid);
    }
    if let Some(e) = &r.last_error {
        println!("Last error:  {e}");
    }
    println!("Directory:   {}", mgr.paths.sandbox_dir(&r.id).display());
    print_policy(&r.policy);
    Ok(0)
}

fn print_policy(p: &Policy) {
    println!(
        "Network:     mode {}",
        match p.mode {
            Mode::Allow => "allow",
            Mode::Deny => "deny",
        }
    );
    for r in &p.rules {
        println!("             {r}");
    }
}

fn cmd_proxy(mgr: &Manager, a: ProxyArgs) -> Result<i32> {
    // Parse everything first: bad input changes nothing.
    let mut add = Vec::new();
    let groups: [(&Vec<String>, Action, bool); 6] = [
        (&a.allow_host, Action::Allow, true),
        (&a.block_host, Action::Block, true),
        (&a.bypass_host, Action::Bypass, true),
        (&a.allow_cidr, Action::Allow, false),
        (&a.block_cidr, Action::Block, false),
        (&a.bypass_cidr, Action::Bypass, false),
    ];
    for (vals, action, is_host) in groups {
        for v in vals {
            let rule = if is_host {
                Rule::host(action, v)
            } else {
                Rule::cidr(action, v)
            }
            .with_context(|| {
                format!(
                    "invalid {} {v:?}",
                    if is_host { "host pattern" } else { "CIDR" }
                )
            })?;
            add.push(rule);
        }
    }
    let mut remove = Vec::new();
    for r in &a.remove {
        let (kind, val) = r.split_once(' ').with_context(|| {
            format!("bad --remove {r:?}: expected e.g. \"allow-host example.com\"")
        })?;
        let rule = match kind {
            "allow-host" => Rule::host(Action::Allow, val),
            "block-host" => Rule::host(Action::Block, val),
            "bypass-host" => Rule::host(Action::Bypass, val),
            "allow-cidr" => Rule::cidr(Action::Allow, val),
            "block-cidr" => Rule::cidr(Action::Block, val),
            "bypass-cidr" => Rule::cidr(Action::Bypass, val),
            _ => bail!("bad --remove {r:?}: unknown rule kind {kind:?}"),
        }
        .with_context(|| format!("bad --remove {r:?}"))?;
        remove.push(rule);
    }
    let profile = match &a.profile {
        None => None,
        Some(n) => Some(airlock_sandbox::profiles::find(n).with_context(|| {
            format!(
                "unknown profile {n:?}; known: {}",
                airlock_sandbox::profiles::names().join(", ")
            )
        })?),
    };
    let mut missing = Vec::new();
    let (policy, live) = mgr.update_policy(&a.name, |p| {
        if a.clear {
            *p = Policy::default();
        }
        if let Some(prof) = profile {
            prof.apply(p);
        }
        if let Some(m) = a.policy {
            p.mode = match m {
                ModeArg::Allow => Mode::Allow,
                ModeArg::Deny => Mode::Deny,
            };
        }
        for r in &remove {
            if !p.remove(r) {
                missing.push(r.to_string());
            }
        }
        for r in add {
            p.add(r);
        }
    })?;
    for m in missing {
        eprintln!("airlock: warning: no rule {m:?} to remove");
    }
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &json!({"name": a.name, "applied": live, "policy": policy})
            )?
        );
    } else {
        print_policy(&policy);
        if !live {
            println!("(sandbox not running: applies when it starts)");
        }
    }
    Ok(0)
}

fn cmd_log(
    mgr: &Manager,
    name: Option<String>,
    as_json: bool,
    limit: Option<usize>,
    follow: bool,
) -> Result<i32> {
    let store = mgr.store()?;
    if let Some(n) = &name {
        // A removed sandbox's events stay in the log; only complain when
        // the name was never seen at all.
        if store.get(n)?.is_none() && store.events(Some(n), 0, Some(1))?.is_empty() {
            bail!("no sandbox named {n:?} and no events for it (see `airlock ls`)");
        }
    }
    let mut last_seq = 0;
    if as_json || follow {
        let evs = store.events(
            name.as_deref(),
            0,
            if follow && limit.is_none() {
                Some(10)
            } else {
                limit
            },
        )?;
        for e in &evs {
            print_event(&e.event, as_json);
            last_seq = e.seq;
        }
        if !follow {
            return Ok(0);
        }
        if evs.is_empty() {
            last_seq = store
                .events(name.as_deref(), 0, Some(1))?
                .last()
                .map(|e| e.seq)
                .unwrap_or(0);
        }
        loop {
            std::thread::sleep(Duration::from_millis(200));
            for e in store.events(name.as_deref(), last_seq, None)? {
                print_event(&e.event, as_json);
                last_seq = e.seq;
            }
        }
    }
    let sum = store.host_summary(name.as_deref(), limit)?;
    let rows: Vec<[String; 6]> = sum
        .iter()
        .map(|s| {
            [
                s.sandbox.clone(),
                format!("{}:{}", s.host, s.port),
                s.allowed.to_string(),
                s.blocked.to_string(),
                s.last_seen.clone(),
                format!("{} ({})", s.last_action, s.last_rule),
            ]
        })
        .collect();
    print_table(
        &[
            "SANDBOX",
            "HOST",
            "ALLOWED",
            "BLOCKED",
            "LAST SEEN",
            "LAST DECISION",
        ],
        &rows,
    );
    Ok(0)
}

fn print_event(e: &airlock_policy::Event, as_json: bool) {
    use std::io::Write;
    if as_json {
        println!("{}", serde_json::to_string(e).unwrap_or_default());
    } else {
        println!(
            "{} {} {:<6} {} {}:{} {} [{}] {}",
            e.time,
            e.sandbox,
            e.action,
            e.method,
            e.host,
            e.port,
            e.addr.as_deref().unwrap_or("-"),
            e.rule,
            e.reason
        );
    }
    let _ = std::io::stdout().flush();
}

/// Progress for template builds: a spinner with the current step on a
/// terminal, plain lines otherwise.
fn template_progress() -> impl FnMut(airlock_template::Progress) {
    use airlock_template::Progress;
    let bar = if std::io::stderr().is_terminal() {
        let b = indicatif::ProgressBar::new_spinner();
        b.enable_steady_tick(Duration::from_millis(120));
        Some(b)
    } else {
        None
    };
    let started = std::time::Instant::now();
    move |p: Progress| match p {
        Progress::Step(s) => match &bar {
            Some(b) => {
                b.println(format!("[{:>5.1}s] {s}", started.elapsed().as_secs_f32()));
                b.set_message(s);
            }
            None => eprintln!("[{:>5.1}s] {s}", started.elapsed().as_secs_f32()),
        },
        Progress::Line(l) => {
            if let Some(b) = &bar {
                b.set_message(l);
            }
        }
        Progress::Done => {
            if let Some(b) = &bar {
                b.finish_and_clear();
            }
            eprintln!("[{:>5.1}s] template ready", started.elapsed().as_secs_f32());
        }
    }
}

/// Replacing a template deletes its old files, which running sandboxes of
/// it (or of a template over it) still have mounted.
fn refuse_replacing_in_use(mgr: &Manager, name: &str) -> Result<()> {
    let store = mgr.templates();
    if store.get(name)?.is_none() {
        return Ok(());
    }
    let mut users = Vec::new();
    for r in mgr.list()? {
        if r.status() != Status::Running {
            continue;
        }
        let uses = match store.get(&r.template) {
            Ok(Some(t)) => store
                .chain(&t)
                .map(|c| c.iter().any(|n| n == name))
                .unwrap_or(r.template == name),
            _ => r.template == name,
        };
        if uses {
            users.push(r.name);
        }
    }
    if !users.is_empty() {
        bail!(
            "template {name:?} is in use by running sandboxes {}; stop them before replacing it",
            users.join(", ")
        );
    }
    Ok(())
}

fn cmd_template(mgr: &Manager, t: TemplateCmd) -> Result<i32> {
    let store = mgr.templates();
    match t {
        TemplateCmd::Ls { json: as_json } => {
            let list = store.list()?;
            if as_json {
                let v: Vec<_> = list
                    .iter()
                    .map(|t| {
                        json!({"name": t.name, "rootfs": t.rootfs, "size_bytes": t.size_bytes,
                               "created": t.created, "suite": t.suite, "packages": t.packages,
                               "parent": t.parent, "agent_package": t.agent_package,
                               "agent_version": t.agent_version,
                               "run": t.run, "saved_from": t.saved_from,
                               "current": store.is_current(t).unwrap_or(false)})
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                let rows: Vec<[String; 6]> = list
                    .iter()
                    .map(|t| {
                        let stale = if store.is_current(t).unwrap_or(false) {
                            ""
                        } else if t.saved_from.is_some() {
                            " (outdated: its parent was rebuilt since)"
                        } else {
                            " (outdated: `airlock template build` it)"
                        };
                        let agent = match (&t.agent_package, &t.agent_version) {
                            (Some(p), Some(v)) => format!("{p}@{v}{stale}"),
                            _ if !t.run.is_empty() => {
                                format!("{} command(s){stale}", t.run.len())
                            }
                            _ => match &t.saved_from {
                                Some(sb) => format!("saved from {sb}{stale}"),
                                None => "-".into(),
                            },
                        };
                        let size = match &t.parent {
                            Some(p) => format!("{:.0} MB (+{p})", t.size_bytes as f64 / 1e6),
                            None => format!("{:.0} MB", t.size_bytes as f64 / 1e6),
                        };
                        [
                            t.name.clone(),
                            t.parent.clone().unwrap_or_else(|| "-".into()),
                            agent,
                            size,
                            t.created.clone(),
                            t.suite.clone(),
                        ]
                    })
                    .collect();
                print_table(
                    &["NAME", "PARENT", "CONTENTS", "SIZE", "CREATED", "SUITE"],
                    &rows,
                );
            }
        }
        TemplateCmd::Build {
            name,
            force,
            update,
            suite,
            mirror,
            packages,
            from,
            run,
        } => {
            if let Some(from) = from {
                if update || mirror.is_some() || !packages.is_empty() {
                    bail!(
                        "--update, --mirror and --package do not apply to --from/--run templates"
                    );
                }
                if force || !store.custom_is_built(&name, &from, &run)? {
                    refuse_replacing_in_use(mgr, &name)?;
                }
                let mut progress = template_progress();
                let b = store.build_custom(&name, &from, &run, force, &mut progress)?;
                let t = b.template;
                println!(
                    "{} ({:.0} MB over {}{}) at {}",
                    t.name,
                    t.size_bytes as f64 / 1e6,
                    t.parent.as_deref().unwrap_or("-"),
                    if b.rebuilt { "" } else { "; up to date" },
                    t.rootfs.display()
                );
                return Ok(0);
            }
            if store.agent_pin(&name)?.is_some() {
                if !packages.is_empty() || mirror.is_some() {
                    bail!(
                        "{name} is an agent template (a layer over base): --package and --mirror apply to base"
                    );
                }
                let mut progress = template_progress();
                let t = store.build_agent(&name, force, update, &mut progress)?;
                println!(
                    "{} {}@{} ({:.0} MB over {}) at {}",
                    t.name,
                    t.agent_package.as_deref().unwrap_or("?"),
                    t.agent_version.as_deref().unwrap_or("?"),
                    t.size_bytes as f64 / 1e6,
                    t.parent.as_deref().unwrap_or("-"),
                    t.rootfs.display()
                );
                return Ok(0);
            }
            if update {
                bail!("--update applies to agent templates (claude, codex, gemini, copilot, opencode)");
            }
            let opts = airlock_template::BuildOptions {
                suite,
                mirror,
                extra_packages: packages,
                force,
            };
            let mut progress = template_progress();
            let t = store.build(&name, &opts, &mut progress)?;
            println!(
                "{} ({:.0} MB) at {}",
                t.name,
                t.size_bytes as f64 / 1e6,
                t.rootfs.display()
            );
        }
        TemplateCmd::Import {
            name,
            tarball,
            suite,
        } => {
            if !tarball.is_file() {
                bail!("{} is not a file", tarball.display());
            }
            let mut progress = template_progress();
            let t = store.import(&name, &tarball, &suite, "", vec![], &mut progress)?;
            println!(
                "{} ({:.0} MB) at {}",
                t.name,
                t.size_bytes as f64 / 1e6,
                t.rootfs.display()
            );
        }
        TemplateCmd::Save {
            sandbox,
            name,
            force,
            replace,
        } => {
            // Held throughout: the sandbox cannot start while its layer is copied.
            let _lock = mgr.lock()?;
            let rec = mgr.get(&sandbox)?;
            if rec.backend == "vm" {
                bail!(
                    "{} is a VM sandbox (its writable layer is a disk image); saving is supported for namespace sandboxes (--isolation ns) for now",
                    rec.name
                );
            }
            if rec.status() == Status::Running {
                if !force {
                    bail!(
                        "{} is running; stop it first (`airlock stop {}`) or pass --force to save it as it is",
                        rec.name,
                        rec.name
                    );
                }
                eprintln!(
                    "airlock: warning: {} is running: files being written while it is copied may be saved inconsistent",
                    rec.name
                );
            }
            if replace {
                refuse_replacing_in_use(mgr, &name)?;
            }
            let upper = mgr.paths.sandbox_dir(&rec.id).join("layer").join("upper");
            if !upper.is_dir() {
                bail!(
                    "{} has no writable layer yet (it never started): nothing to save",
                    rec.name
                );
            }
            // The workspaces' mount points (empty directories in the layer).
            let mount_points: Vec<PathBuf> = rec
                .workspaces
                .iter()
                .filter_map(|w| w.path.strip_prefix("/").ok().map(PathBuf::from))
                .collect();
            let mut progress = template_progress();
            let t = store.save_layer(
                &name,
                &rec.template,
                &upper,
                &rec.name,
                &mount_points,
                replace,
                &mut progress,
            )?;
            println!(
                "{} ({:.0} MB over {}) at {}",
                t.name,
                t.size_bytes as f64 / 1e6,
                t.parent.as_deref().unwrap_or("-"),
                t.rootfs.display()
            );
        }
        TemplateCmd::Rm { name } => {
            let _lock = mgr.lock()?;
            let users: Vec<String> = mgr
                .list()?
                .into_iter()
                .filter(|r| r.template == name)
                .map(|r| r.name)
                .collect();
            if !users.is_empty() {
                bail!(
                    "template {name:?} is used by sandboxes {}; remove them first",
                    users.join(", ")
                );
            }
            let children: Vec<String> = store
                .list()?
                .into_iter()
                .filter(|t| t.parent.as_deref() == Some(name.as_str()))
                .map(|t| t.name)
                .collect();
            if !children.is_empty() {
                bail!(
                    "template {name:?} is the parent of templates {}; remove them first",
                    children.join(", ")
                );
            }
            store.remove(&name)?;
            println!("{name}");
        }
    }
    Ok(0)
}

fn cmd_doctor(mgr: &Manager, as_json: bool) -> Result<i32> {
    use airlock_backend::Backend;
    let mut checks: Vec<(String, bool, String)> = Vec::new();
    let ns = airlock_backend::NamespaceBackend::new();
    match ns.probe() {
        Ok(r) => checks.push(("namespace backend".into(), r.ok, r.details.join("; "))),
        Err(e) => checks.push(("namespace backend".into(), false, format!("{e:#}"))),
    }
    let vm = airlock_backend::VmBackend::new();
    match vm.probe() {
        Ok(r) => checks.push(("vm backend".into(), r.ok, r.details.join("; "))),
        Err(e) => checks.push(("vm backend".into(), false, format!("{e:#}"))),
    }
    match airlock_sandbox::choose_backend(airlock_sandbox::Isolation::Auto) {
        Ok((b, notice)) => checks.push((
            "isolation auto".into(),
            true,
            format!(
                "{b}{}",
                notice.map(|n| format!(": {n}")).unwrap_or_default()
            ),
        )),
        Err(e) => checks.push(("isolation auto".into(), false, e.to_string())),
    }
    let mm = which("mmdebstrap");
    checks.push((
        "mmdebstrap".into(),
        mm.is_some(),
        mm.map(|p| p.display().to_string()).unwrap_or_else(|| {
            "missing: apt-get install mmdebstrap (needed to build templates)".into()
        }),
    ));
    match mgr.templates().get(airlock_template::BASE) {
        Ok(Some(t)) => checks.push(("base template".into(), true, t.rootfs.display().to_string())),
        Ok(None) => checks.push((
            "base template".into(),
            false,
            "not built yet: `airlock template build` (the first run builds it)".into(),
        )),
        Err(e) => checks.push(("base template".into(), false, e.to_string())),
    }
    match airlock_sandbox::supervisor::find_guest_binary() {
        Ok(p) => checks.push(("guest agent".into(), true, p.display().to_string())),
        Err(e) => checks.push(("guest agent".into(), false, e)),
    }
    checks.push((
        "state directory".into(),
        true,
        mgr.paths.data.display().to_string(),
    ));
    let ok = checks.iter().filter(|c| c.0 != "vm backend").all(|c| c.1);
    if as_json {
        let v: Vec<_> = checks
            .iter()
            .map(|(n, ok, d)| json!({"check": n, "ok": ok, "detail": d}))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"ok": ok, "checks": v}))?
        );
    } else {
        for (n, ok, d) in &checks {
            println!("{} {:<18} {}", if *ok { "ok  " } else { "FAIL" }, n, d);
        }
    }
    Ok(if ok { 0 } else { 1 })
}

fn which(prog: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(prog))
            .find(|p| p.is_file())
    })
}

fn cmd_secret(mgr: &Manager, c: SecretCmd) -> Result<i32> {
    use airlock_secrets::{Secret, SecretStore};
    mgr.paths.ensure()?;
    let store = SecretStore::open(&mgr.paths.data);
    let providers = airlock_secrets::load_providers(&mgr.paths.data)?;
    match c {
        SecretCmd::Set { name } => {
            if !providers.iter().any(|p| p.secret_name == name) {
                let mut known: Vec<&str> =
                    providers.iter().map(|p| p.secret_name.as_str()).collect();
                known.dedup();
                bail!(
                    "no provider uses a secret named {name:?}; known: {} (add providers in {})",
                    known.join(", "),
                    mgr.paths
                        .data
                        .join(airlock_secrets::PROVIDERS_FILE)
                        .display()
                );
            }
            let value = read_secret_value(&name)?;
            if value.is_empty() {
                bail!("empty value; nothing stored");
            }
            store.set(&name, Secret::new(value))?;
            eprintln!("stored secret {name:?} in {}", store.path().display());
        }
        SecretCmd::Ls { json: as_json } => {
            let names = store.list()?;
            let rows: Vec<(String, Vec<String>)> = names
                .iter()
                .map(|n| {
                    let users = providers
                        .iter()
                        .filter(|p| &p.secret_name == n)
                        .map(|p| p.name.clone())
                        .collect();
                    (n.clone(), users)
                })
                .collect();
            if as_json {
                let v: Vec<_> = rows
                    .iter()
                    .map(|(n, p)| json!({"name": n, "providers": p}))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                let rows: Vec<[String; 2]> =
                    rows.into_iter().map(|(n, p)| [n, p.join(", ")]).collect();
                print_table(&["NAME", "PROVIDERS"], &rows);
            }
        }
        SecretCmd::Rm { name } => {
            if !store.remove(&name)? {
                bail!("no stored secret named {name:?} (see `airlock secret ls`)");
            }
            println!("{name}");
        }
    }
    Ok(0)
}

/// The value from stdin: prompted without echo on a terminal, else the
/// first line.
fn read_secret_value(name: &str) -> Result<String> {
    use std::io::BufRead;
    let stdin = std::io::stdin();
    let tty = stdin.is_terminal();
    let mut saved = None;
    if tty {
        eprint!("value for {name}: ");
        // SAFETY: termios calls on fd 0, which is a terminal.
        unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(0, &mut t) == 0 {
                saved = Some(t);
                t.c_lflag &= !libc::ECHO;
                libc::tcsetattr(0, libc::TCSANOW, &t);
            }
        }
    }
    let mut line = String::new();
    let r = stdin.lock().read_line(&mut line);
    if let Some(t) = saved {
        // SAFETY: restoring the attributes read above.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &t) };
        eprintln!();
    }
    r.context("reading the secret from stdin")?;
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}
