//! airlock's persistent state.
//!
//! Owns: where airlock keeps things on disk ([`Paths`]), the embedded SQLite
//! database (WAL mode) holding sandbox records and egress events
//! ([`Store`]), the append-only JSON-lines audit file ([`AuditLog`]), and the
//! liveness check that tells a live supervisor from a stale pid
//! ([`ProcessId`]).
//!
//! Must not: start processes, talk to sandboxes or decide policy. Callers
//! serialise lifecycle changes with [`Paths::lock`].

use airlock_policy::{Event, Policy};
use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the state database {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("state database query failed")]
    Sql(#[from] rusqlite::Error),
    #[error("corrupt record for sandbox {name}: {what}")]
    Corrupt { name: String, what: String },
    #[error("a sandbox named {0:?} already exists")]
    NameTaken(String),
    #[error("cannot access {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Where everything lives. The data directory is `$AIRLOCK_HOME`, else
/// `/var/lib/airlock` for root, else `$XDG_DATA_HOME/airlock`
/// (`~/.local/share/airlock`). Templates can be shared between data
/// directories with `$AIRLOCK_TEMPLATES`.
#[derive(Debug, Clone)]
pub struct Paths {
    pub data: PathBuf,
    pub templates: PathBuf,
}

impl Paths {
    pub fn from_env() -> Paths {
        let data = match std::env::var_os("AIRLOCK_HOME") {
            Some(p) if !p.is_empty() => PathBuf::from(p),
            _ => {
                // SAFETY: geteuid has no preconditions and cannot fail.
                if unsafe { libc::geteuid() } == 0 {
                    PathBuf::from("/var/lib/airlock")
                } else if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|x| !x.is_empty())
                {
                    PathBuf::from(x).join("airlock")
                } else {
                    let home = std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into());
                    PathBuf::from(home).join(".local/share/airlock")
                }
            }
        };
        let templates = match std::env::var_os("AIRLOCK_TEMPLATES") {
            Some(p) if !p.is_empty() => PathBuf::from(p),
            _ => data.join("templates"),
        };
        Paths { data, templates }
    }

    pub fn db(&self) -> PathBuf {
        self.data.join("state.db")
    }
    pub fn audit(&self) -> PathBuf {
        self.data.join("audit.jsonl")
    }
    /// Persistent per-sandbox directory: writable layer, logs.
    pub fn sandbox_dir(&self, id: &str) -> PathBuf {
        self.data.join("sandboxes").join(id)
    }
    /// Per-run directory: sockets and the mount point of the root. Kept short
    /// because Unix socket paths are limited to 108 bytes.
    pub fn run_dir(&self, id: &str) -> PathBuf {
        self.data.join("run").join(id)
    }

    pub fn ensure(&self) -> Result<(), StoreError> {
        for d in [
            &self.data,
            &self.data.join("sandboxes"),
            &self.data.join("run"),
        ] {
            fs::create_dir_all(d).map_err(io_err(d))?;
        }
        // The data directory holds the audit log and, later, secrets.
        let _ = fs::set_permissions(
            &self.data,
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        );
        Ok(())
    }

    /// Exclusive lock serialising lifecycle changes (create, start, stop,
    /// rm) across airlock processes. Released on drop.
    pub fn lock(&self) -> Result<LockGuard, StoreError> {
        self.ensure()?;
        let path = self.data.join("lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(io_err(&path))?;
        loop {
            // SAFETY: flock on a descriptor we own.
            let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
            if r == 0 {
                break;
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(io_err(&path)(e));
            }
        }
        Ok(LockGuard { _file: file })
    }
}

/// Holds [`Paths::lock`] until dropped.
pub struct LockGuard {
    _file: File,
}

/// A process identified by pid *and* start time, so that a recycled pid is
/// never mistaken for the supervisor that once had it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessId {
    pub pid: u32,
    pub start_ticks: u64,
}

impl ProcessId {
    pub fn of(pid: u32) -> Option<ProcessId> {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name is in parentheses and may contain spaces; fields
        // after the last ')' are space separated; starttime is field 22.
        let rest = &stat[stat.rfind(')')? + 2..];
        let start_ticks = rest.split(' ').nth(19)?.parse().ok()?;
        Some(ProcessId { pid, start_ticks })
    }

    pub fn current() -> ProcessId {
        let pid = std::process::id();
        // Our own /proc entry always exists.
        ProcessId::of(pid).unwrap_or(ProcessId {
            pid,
            start_ticks: 0,
        })
    }

    /// True when the same process (not a zombie) is still running.
    pub fn alive(&self) -> bool {
        match ProcessId::of(self.pid) {
            Some(p) if p == *self => {
                let state = fs::read_to_string(format!("/proc/{}/stat", self.pid))
                    .ok()
                    .and_then(|s| {
                        s.rfind(')')
                            .and_then(|i| s.get(i + 2..i + 3).map(String::from))
                    });
                state.as_deref() != Some("Z")
            }
            _ => false,
        }
    }
}

/// A workspace directory shared into the sandbox at the same path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workspace {
    pub path: PathBuf,
    #[serde(default)]
    pub read_only: bool,
}

/// The state recorded for a sandbox; whether it really runs is decided by
/// [`SandboxRecord::status`] from the supervisor's liveness.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecordedState {
    Created,
    Running,
    Stopped,
}

impl RecordedState {
    fn as_str(self) -> &'static str {
        match self {
            RecordedState::Created => "created",
            RecordedState::Running => "running",
            RecordedState::Stopped => "stopped",
        }
    }
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "created" => RecordedState::Created,
            "running" => RecordedState::Running,
            "stopped" => RecordedState::Stopped,
            _ => return None,
        })
    }
}

/// What `ls` shows: the truth, not what the database last recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Created,
    Running,
    Stopped,
    /// The database says running but the supervisor is gone (killed,
    /// crashed, host rebooted). `start` and `rm` recover from this.
    Crashed,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Status::Created => "created",
            Status::Running => "running",
            Status::Stopped => "stopped",
            Status::Crashed => "crashed",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxRecord {
    pub id: String,
    pub name: String,
    pub agent: String,
    pub template: String,
    pub backend: String,
    pub workspaces: Vec<Workspace>,
    pub agent_args: Vec<String>,
    pub policy: Policy,
    pub created: String,
    pub state: RecordedState,
    pub supervisor: Option<ProcessId>,
    pub init_pid: Option<u32>,
    pub last_error: Option<String>,
}

impl SandboxRecord {
    pub fn status(&self) -> Status {
        match self.state {
            RecordedState::Created => Status::Created,
            RecordedState::Stopped => Status::Stopped,
            RecordedState::Running => match self.supervisor {
                Some(p) if p.alive() => Status::Running,
                _ => Status::Crashed,
            },
        }
    }
}

/// Per-host summary for `network log`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostSummary {
    pub sandbox: String,
    pub host: String,
    pub port: u16,
    pub allowed: u64,
    pub blocked: u64,
    pub last_seen: String,
    pub last_action: String,
    pub last_rule: String,
}

/// A stored event with its sequence number (for `--follow`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StoredEvent {
    pub seq: i64,
    #[serde(flatten)]
    pub event: Event,
}

pub struct Store {
    conn: Connection,
}

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS sandboxes (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    agent       TEXT NOT NULL,
    template    TEXT NOT NULL,
    backend     TEXT NOT NULL,
    workspaces  TEXT NOT NULL,
    agent_args  TEXT NOT NULL,
    policy      TEXT NOT NULL,
    created     TEXT NOT NULL,
    state       TEXT NOT NULL,
    supervisor  TEXT,
    init_pid    INTEGER,
    last_error  TEXT
);
CREATE TABLE IF NOT EXISTS events (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    time        TEXT NOT NULL,
    sandbox     TEXT NOT NULL,
    path        TEXT NOT NULL,
    method      TEXT NOT NULL,
    host        TEXT NOT NULL,
    port        INTEGER NOT NULL,
    addr        TEXT,
    action      TEXT NOT NULL,
    rule        TEXT NOT NULL,
    reason      TEXT NOT NULL,
    bytes_up    INTEGER NOT NULL,
    bytes_down  INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS events_sandbox ON events(sandbox, seq);
"#;

impl Store {
    pub fn open(paths: &Paths) -> Result<Store, StoreError> {
        paths.ensure()?;
        Self::open_file(&paths.db())
    }

    pub fn open_file(path: &Path) -> Result<Store, StoreError> {
        let wrap = |source| StoreError::Open {
            path: path.to_path_buf(),
            source,
        };
        let conn = Connection::open(path).map_err(wrap)?;
        conn.busy_timeout(Duration::from_secs(10)).map_err(wrap)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(wrap)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(wrap)?;
        conn.execute_batch(SCHEMA).map_err(wrap)?;
        Ok(Store { conn })
    }

    pub fn insert(&self, r: &SandboxRecord) -> Result<(), StoreError> {
        let res = self.conn.execute(
            "INSERT INTO sandboxes (id, name, agent, template, backend, workspaces, agent_args, policy, created, state, supervisor, init_pid, last_error)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
            params![
                r.id,
                r.name,
                r.agent,
                r.template,
                r.backend,
                json(&r.workspaces),
                json(&r.agent_args),
                json(&r.policy),
                r.created,
                r.state.as_str(),
                r.supervisor.map(|p| json(&p)),
                r.init_pid,
                r.last_error,
            ],
        );
        match res {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                Err(StoreError::NameTaken(r.name.clone()))
            }
            Err(e) => Err(e.into()),
            Ok(_) => Ok(()),
        }
    }

    pub fn get(&self, name: &str) -> Result<Option<SandboxRecord>, StoreError> {
        self.conn
            .query_row(
                &format!("SELECT {COLS} FROM sandboxes WHERE name = ?1"),
                [name],
                row_raw,
            )
            .optional()?
            .map(RawRecord::into_record)
            .transpose()
    }

    pub fn get_by_id(&self, id: &str) -> Result<Option<SandboxRecord>, StoreError> {
        self.conn
            .query_row(
                &format!("SELECT {COLS} FROM sandboxes WHERE id = ?1"),
                [id],
                row_raw,
            )
            .optional()?
            .map(RawRecord::into_record)
            .transpose()
    }

    pub fn list(&self) -> Result<Vec<SandboxRecord>, StoreError> {
        let mut st = self.conn.prepare(&format!(
            "SELECT {COLS} FROM sandboxes ORDER BY created, name"
        ))?;
        let rows = st.query_map([], row_raw)?;
        let mut out = Vec::new();
        for r in rows {
            out.push(r?.into_record()?);
        }
        Ok(out)
    }

    pub fn set_running(&self, id: &str, sup: ProcessId, init_pid: u32) -> Result<(), StoreError> {
        self.conn.execute(
            "UPDATE sandboxes SET state='running', supervisor=?2, init_pid=?3, last_error=NULL WHERE id=?1",
            params![id, json(&sup), init_pid],
        )?;
        Ok(())
    }

    pub fn set_stopped(&self, id: &str, error: Option<&str>) -> Result<(), StoreError> {
        self.conn.execute(
            "UPDATE sandboxes SET state='stopped', supervisor=NULL, init_pid=NULL, last_error=?2 WHERE id=?1",
            params![id, error],
        )?;
        Ok(())
    }

    pub fn set_policy(&self, id: &str, policy: &Policy) -> Result<(), StoreError> {
        self.conn.execute(
            "UPDATE sandboxes SET policy=?2 WHERE id=?1",
            params![id, json(policy)],
        )?;
        Ok(())
    }

    pub fn set_agent_args(&self, id: &str, args: &[String]) -> Result<(), StoreError> {
        self.conn.execute(
            "UPDATE sandboxes SET agent_args=?2 WHERE id=?1",
            params![id, json(&args)],
        )?;
        Ok(())
    }

    pub fn delete(&self, id: &str) -> Result<(), StoreError> {
        self.conn
            .execute("DELETE FROM sandboxes WHERE id=?1", [id])?;
        Ok(())
    }

    /// Insert a batch of events in one transaction.
    pub fn insert_events(&mut self, events: &[Event]) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        {
            let mut st = tx.prepare_cached(
                "INSERT INTO events (time, sandbox, path, method, host, port, addr, action, rule, reason, bytes_up, bytes_down)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
            )?;
            for e in events {
                st.execute(params![
                    e.time,
                    e.sandbox,
                    e.path,
                    e.method,
                    e.host,
                    e.port,
                    e.addr,
                    e.action,
                    e.rule,
                    e.reason,
                    e.bytes_up as i64,
                    e.bytes_down as i64,
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Events after `after_seq`, oldest first, optionally for one sandbox;
    /// with `limit`, only the newest `limit` of them.
    pub fn events(
        &self,
        sandbox: Option<&str>,
        after_seq: i64,
        limit: Option<usize>,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let limit = limit.map(|l| l as i64).unwrap_or(-1);
        let mut st = self.conn.prepare(
            "SELECT * FROM (
               SELECT seq, time, sandbox, path, method, host, port, addr, action, rule, reason, bytes_up, bytes_down
               FROM events WHERE seq > ?1 AND (?2 IS NULL OR sandbox = ?2)
               ORDER BY seq DESC LIMIT ?3
             ) ORDER BY seq ASC",
        )?;
        let rows = st.query_map(params![after_seq, sandbox, limit], |r| {
            Ok(StoredEvent {
                seq: r.get(0)?,
                event: Event {
                    time: r.get(1)?,
                    sandbox: r.get(2)?,
                    path: r.get(3)?,
                    method: r.get(4)?,
                    host: r.get(5)?,
                    port: r.get(6)?,
                    addr: r.get(7)?,
                    action: r.get(8)?,
                    rule: r.get(9)?,
                    reason: r.get(10)?,
                    bytes_up: r.get::<_, i64>(11)? as u64,
                    bytes_down: r.get::<_, i64>(12)? as u64,
                },
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Events grouped by sandbox and host:port, most recently seen first.
    pub fn host_summary(
        &self,
        sandbox: Option<&str>,
        limit: Option<usize>,
    ) -> Result<Vec<HostSummary>, StoreError> {
        let limit = limit.map(|l| l as i64).unwrap_or(-1);
        let mut st = self.conn.prepare(
            "SELECT e.sandbox, e.host, e.port,
                    SUM(e.action != 'block'), SUM(e.action = 'block'), MAX(e.seq)
             FROM events e WHERE (?1 IS NULL OR e.sandbox = ?1)
             GROUP BY e.sandbox, e.host, e.port
             ORDER BY MAX(e.seq) DESC LIMIT ?2",
        )?;
        let groups: Vec<(String, String, u16, i64, i64, i64)> = st
            .query_map(params![sandbox, limit], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                ))
            })?
            .collect::<Result<_, _>>()?;
        let mut last = self
            .conn
            .prepare_cached("SELECT time, action, rule FROM events WHERE seq = ?1")?;
        let mut out = Vec::with_capacity(groups.len());
        for (sandbox, host, port, allowed, blocked, seq) in groups {
            let (last_seen, last_action, last_rule) =
                last.query_row([seq], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
            out.push(HostSummary {
                sandbox,
                host,
                port,
                allowed: allowed as u64,
                blocked: blocked as u64,
                last_seen,
                last_action,
                last_rule,
            });
        }
        Ok(out)
    }
}

const COLS: &str = "id, name, agent, template, backend, workspaces, agent_args, policy, created, state, supervisor, init_pid, last_error";

struct RawRecord {
    id: String,
    name: String,
    agent: String,
    template: String,
    backend: String,
    workspaces: String,
    agent_args: String,
    policy: String,
    created: String,
    state: String,
    supervisor: Option<String>,
    init_pid: Option<u32>,
    last_error: Option<String>,
}

fn row_raw(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawRecord> {
    Ok(RawRecord {
        id: r.get(0)?,
        name: r.get(1)?,
        agent: r.get(2)?,
        template: r.get(3)?,
        backend: r.get(4)?,
        workspaces: r.get(5)?,
        agent_args: r.get(6)?,
        policy: r.get(7)?,
        created: r.get(8)?,
        state: r.get(9)?,
        supervisor: r.get(10)?,
        init_pid: r.get(11)?,
        last_error: r.get(12)?,
    })
}

impl RawRecord {
    fn into_record(self) -> Result<SandboxRecord, StoreError> {
        let name = self.name.clone();
        let corrupt = |what: &str, e: &dyn std::fmt::Display| StoreError::Corrupt {
            name: name.clone(),
            what: format!("{what}: {e}"),
        };
        Ok(SandboxRecord {
            workspaces: serde_json::from_str(&self.workspaces)
                .map_err(|e| corrupt("workspaces", &e))?,
            agent_args: serde_json::from_str(&self.agent_args)
                .map_err(|e| corrupt("agent_args", &e))?,
            policy: serde_json::from_str(&self.policy).map_err(|e| corrupt("policy", &e))?,
            state: RecordedState::parse(&self.state)
                .ok_or_else(|| corrupt("state", &self.state))?,
            supervisor: match self.supervisor {
                Some(s) => Some(serde_json::from_str(&s).map_err(|e| corrupt("supervisor", &e))?),
                None => None,
            },
            id: self.id,
            name: self.name,
            agent: self.agent,
            template: self.template,
            backend: self.backend,
            created: self.created,
            init_pid: self.init_pid,
            last_error: self.last_error,
        })
    }
}

fn json<T: Serialize + ?Sized>(v: &T) -> String {
    // Our record types are plain data; serialising them cannot fail.
    serde_json::to_string(v).expect("record serialises")
}

/// The append-only audit file, one JSON event per line, for a SIEM to tail.
/// Opened with `O_APPEND`, so concurrent supervisors never interleave
/// within a line (each line is one `write`).
pub struct AuditLog {
    file: File,
    path: PathBuf,
}

impl AuditLog {
    pub fn open(path: &Path) -> Result<AuditLog, StoreError> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .map_err(io_err(path))?;
        Ok(AuditLog {
            file,
            path: path.to_path_buf(),
        })
    }

    pub fn append(&mut self, events: &[Event]) -> Result<(), StoreError> {
        let mut buf = Vec::new();
        for e in events {
            buf.clear();
            serde_json::to_writer(&mut buf, e).expect("event serialises");
            buf.push(b'\n');
            self.file.write_all(&buf).map_err(io_err(&self.path))?;
        }
        Ok(())
    }
}

/// Current UTC time as RFC 3339 with milliseconds.
pub fn now_rfc3339() -> String {
    let now = time::OffsetDateTime::now_utc();
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second(),
        now.millisecond()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(name: &str) -> SandboxRecord {
        SandboxRecord {
            id: format!("id-{name}"),
            name: name.into(),
            agent: "shell".into(),
            template: "base".into(),
            backend: "ns".into(),
            workspaces: vec![Workspace {
                path: "/w".into(),
                read_only: false,
            }],
            agent_args: vec!["-c".into(), "x y".into()],
            policy: Policy::default(),
            created: now_rfc3339(),
            state: RecordedState::Created,
            supervisor: None,
            init_pid: None,
            last_error: None,
        }
    }

    fn ev(sandbox: &str, host: &str, action: &str) -> Event {
        Event {
            time: now_rfc3339(),
            sandbox: sandbox.into(),
            path: "proxy".into(),
            method: "GET".into(),
            host: host.into(),
            port: 80,
            addr: Some("1.2.3.4".into()),
            action: action.into(),
            rule: "mode:allow".into(),
            reason: "r".into(),
            bytes_up: 1,
            bytes_down: 2,
        }
    }

    #[test]
    fn sandbox_records_roundtrip_and_names_are_unique() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open_file(&dir.path().join("db")).unwrap();
        s.insert(&rec("a")).unwrap();
        let mut b = rec("a");
        b.id = "other".into();
        assert!(matches!(s.insert(&b), Err(StoreError::NameTaken(_))));
        let got = s.get("a").unwrap().unwrap();
        assert_eq!(got, rec_with_created(&got));
        assert_eq!(got.status(), Status::Created);
        s.set_running(&got.id, ProcessId::current(), 5).unwrap();
        assert_eq!(s.get("a").unwrap().unwrap().status(), Status::Running);
        // A supervisor that is gone (pid reused or dead) reads as crashed.
        let dead = ProcessId {
            pid: std::process::id(),
            start_ticks: 1,
        };
        s.set_running(&got.id, dead, 5).unwrap();
        assert_eq!(s.get("a").unwrap().unwrap().status(), Status::Crashed);
        s.set_stopped(&got.id, Some("boom")).unwrap();
        let st = s.get("a").unwrap().unwrap();
        assert_eq!(st.status(), Status::Stopped);
        assert_eq!(st.last_error.as_deref(), Some("boom"));
        s.delete(&got.id).unwrap();
        assert!(s.get("a").unwrap().is_none());
    }

    fn rec_with_created(got: &SandboxRecord) -> SandboxRecord {
        let mut r = rec("a");
        r.created = got.created.clone();
        r
    }

    #[test]
    fn events_and_summary() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open_file(&dir.path().join("db")).unwrap();
        s.insert_events(&[
            ev("x", "a.com", "allow"),
            ev("x", "a.com", "block"),
            ev("y", "b.com", "allow"),
        ])
        .unwrap();
        let all = s.events(None, 0, None).unwrap();
        assert_eq!(all.len(), 3);
        assert!(all.windows(2).all(|w| w[0].seq < w[1].seq));
        assert_eq!(s.events(Some("x"), 0, None).unwrap().len(), 2);
        let last = s.events(None, 0, Some(1)).unwrap();
        assert_eq!(last.len(), 1);
        assert_eq!(last[0].event.host, "b.com");
        assert_eq!(s.events(None, all[1].seq, None).unwrap().len(), 1);
        let sum = s.host_summary(Some("x"), None).unwrap();
        assert_eq!(sum.len(), 1);
        assert_eq!((sum[0].allowed, sum[0].blocked), (1, 1));
        assert_eq!(sum[0].last_action, "block");
    }

    #[test]
    fn audit_lines_are_json() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("audit.jsonl");
        let mut a = AuditLog::open(&p).unwrap();
        a.append(&[ev("x", "a.com", "allow"), ev("x", "b.com", "block")])
            .unwrap();
        let text = fs::read_to_string(&p).unwrap();
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        let e: Event = serde_json::from_str(lines[1]).unwrap();
        assert_eq!(e.host, "b.com");
    }

    #[test]
    fn process_liveness() {
        assert!(ProcessId::current().alive());
        assert!(!ProcessId {
            pid: u32::MAX - 1,
            start_ticks: 0
        }
        .alive());
    }
}
