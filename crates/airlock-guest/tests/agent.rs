//! Integration tests: the real `airlock-guest` binary, started as an
//! ordinary child process (not PID 1, no namespaces) with a listening Unix
//! socket as its control fd, driven through `airlock-exec`.
//!
//! Set `AIRLOCK_GUEST_BIN` to run the suite against another build of the
//! agent (the static release binary).
//!
//! Tests that switch users need root; run as another user they fail loudly
//! rather than pass.

use airlock_exec::{ping, run_captured, Event, ExecOptions, Session};
use airlock_protocol::{ExecRequest, GuestConfig, GUEST_CONFIG_ENV};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(10);

struct Agent {
    child: Child,
    dir: tempfile::TempDir,
    sock: PathBuf,
}

impl Agent {
    fn start() -> Agent {
        Agent::start_with(|_| {})
    }

    fn start_with(tweak: impl FnOnce(&mut GuestConfig)) -> Agent {
        Agent::start_wrapped(&[], tweak)
    }

    /// Start the agent behind `wrapper` (e.g. `unshare ...`), which must
    /// exec it with the inherited fds.
    fn start_wrapped(wrapper: &[&str], tweak: impl FnOnce(&mut GuestConfig)) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("control.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let fd = listener.as_raw_fd();
        let mut cfg = GuestConfig {
            hostname: String::new(),
            env: vec![
                (
                    "PATH".into(),
                    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
                ),
                ("AIRLOCK_BASE".into(), "base".into()),
            ],
            control_fd: fd,
            ..Default::default()
        };
        tweak(&mut cfg);
        let log = std::fs::File::create(dir.path().join("agent.log")).unwrap();
        let agent = agent_binary();
        let mut cmd = match wrapper.split_first() {
            Some((w, rest)) => {
                let mut c = Command::new(w);
                c.args(rest).arg(&agent);
                c
            }
            None => Command::new(&agent),
        };
        cmd.arg("--debug")
            .env_clear()
            .env(GUEST_CONFIG_ENV, serde_json::to_string(&cfg).unwrap())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                // Hand the listener over, and die with the test.
                libc::fcntl(fd, libc::F_SETFD, 0);
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap();
        drop(listener);
        Agent { child, dir, sock }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    fn run(&self, argv: &[&str]) -> (i32, String, String) {
        self.run_opts(opts(argv), b"")
    }

    fn run_opts(&self, o: ExecOptions, stdin: &[u8]) -> (i32, String, String) {
        let (code, out, err) = run_captured(&self.sock, &o, stdin, T).unwrap();
        (
            code,
            String::from_utf8_lossy(&out).into(),
            String::from_utf8_lossy(&err).into(),
        )
    }

    fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(6) {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- agent log ----\n{}-------------------", self.log());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The agent under test: `AIRLOCK_GUEST_BIN` (e.g. the static release build
/// from `build-static.sh`) or the one cargo built for this test run.
fn agent_binary() -> PathBuf {
    std::env::var_os("AIRLOCK_GUEST_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_airlock-guest")))
}

fn opts(argv: &[&str]) -> ExecOptions {
    ExecOptions {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

fn sh(script: &str) -> ExecOptions {
    opts(&["sh", "-c", script])
}

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test needs root (it switches users); run the suite as root"
    );
}

#[test]
fn ping_answers() {
    let a = Agent::start();
    ping(&a.sock, T).unwrap();
}

#[test]
fn echo_stdout_and_stderr() {
    let a = Agent::start();
    let (code, out, err) = a.run(&["sh", "-c", "echo hello; echo oops >&2"]);
    assert_eq!((code, out.as_str(), err.as_str()), (0, "hello\n", "oops\n"));
}

#[test]
fn exit_code_is_propagated() {
    let a = Agent::start();
    assert_eq!(a.run(&["sh", "-c", "exit 7"]).0, 7);
    assert_eq!(a.run(&["false"]).0, 1);
}

#[test]
fn death_by_signal_is_128_plus_signal() {
    let a = Agent::start();
    assert_eq!(a.run(&["sh", "-c", "kill -TERM $$"]).0, 143);
}

#[test]
fn stdin_round_trip_and_eof() {
    let a = Agent::start();
    let (code, out, _) = a.run_opts(opts(&["cat"]), b"round trip\n");
    assert_eq!((code, out.as_str()), (0, "round trip\n"));
    // No input: EOF at once.
    assert_eq!(a.run(&["cat"]), (0, String::new(), String::new()));
    // More than every buffer on the way, both directions at once.
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let (code, out, _) = run_captured(&a.sock, &opts(&["cat"]), &big, T).unwrap();
    assert_eq!(code, 0);
    assert!(
        out == big,
        "cat returned {} bytes, sent {}",
        out.len(),
        big.len()
    );
}

#[test]
fn large_output_is_fully_drained_before_exit() {
    let a = Agent::start();
    let (code, out, _) = run_captured(
        &a.sock,
        &sh("head -c 5000000 /dev/zero; echo end >&2"),
        b"",
        T,
    )
    .unwrap();
    assert_eq!(code, 0);
    assert_eq!(out.len(), 5_000_000);
}

#[test]
fn background_process_holding_stdout_does_not_hang_exec() {
    let a = Agent::start();
    let t0 = Instant::now();
    let (code, out, _) = a.run(&["sh", "-c", "sleep 5 & echo done"]);
    assert_eq!((code, out.as_str()), (0, "done\n"));
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "took {:?}",
        t0.elapsed()
    );
}

#[test]
fn command_not_found_is_127_and_not_executable_is_126() {
    let a = Agent::start();
    let (code, _, err) = a.run(&["no-such-command-xyz"]);
    assert_eq!(code, 127);
    assert!(
        err.contains("airlock: no-such-command-xyz: command not found"),
        "{err}"
    );
    let (code, _, err) = a.run(&["/no/such/path"]);
    assert_eq!(code, 127, "{err}");
    let f = a.dir.path().join("not-exec");
    std::fs::write(&f, "#!/bin/sh\necho hi\n").unwrap();
    let (code, _, err) = a.run(&[f.to_str().unwrap()]);
    assert_eq!(code, 126, "{err}");
    let (code, _, err) = a.run_opts(
        ExecOptions {
            cwd: Some("/no/such/dir".into()),
            ..opts(&["true"])
        },
        b"",
    );
    assert_eq!(code, 125);
    assert!(err.contains("/no/such/dir"), "{err}");
}

#[test]
fn environment_cwd_and_path_lookup() {
    let a = Agent::start();
    let o = ExecOptions {
        env: vec![
            ("AIRLOCK_BASE".into(), "req".into()),
            ("X".into(), "a=b".into()),
        ],
        cwd: Some("/tmp".into()),
        ..sh("echo $AIRLOCK_BASE $X $HOME $USER; pwd")
    };
    let (code, out, _) = a.run_opts(o, b"");
    assert_eq!((code, out.as_str()), (0, "req a=b /root root\n/tmp\n"));
    // Base environment without request env; the agent's own config is gone.
    let (_, out, _) = a.run(&[
        "sh",
        "-c",
        "echo $AIRLOCK_BASE; env | grep -c AIRLOCK_GUEST_CONFIG",
    ]);
    assert_eq!(out, "base\n0\n");
    // Default working directory: root's home.
    assert_eq!(a.run(&["pwd"]).1, "/root\n");
}

#[test]
fn processes_run_without_capabilities() {
    let a = Agent::start();
    let (code, out, _) = a.run(&[
        "grep",
        "-E",
        "^(Cap(Inh|Prm|Eff|Bnd|Amb)|NoNewPrivs):",
        "/proc/self/status",
    ]);
    assert_eq!(code, 0);
    for line in out.lines() {
        let (k, v) = line.split_once(':').unwrap();
        let want = if k == "NoNewPrivs" {
            "1"
        } else {
            "0000000000000000"
        };
        assert_eq!(v.trim(), want, "{line}");
    }
    assert_eq!(out.lines().count(), 6, "{out}");
    // A new session: the process leads its own session and group.
    let (_, out, _) = a.run(&[
        "sh",
        "-c",
        "ps -o sid= -o pgid= -p $$ 2>/dev/null || cut -d' ' -f6,5 /proc/$$/stat; echo $$",
    ]);
    let nums: Vec<&str> = out.split_whitespace().collect();
    assert!(nums.iter().all(|n| *n == nums[0]), "{out}");
}

#[test]
fn runs_as_another_user() {
    require_root();
    let a = Agent::start();
    let o = ExecOptions {
        user: Some("nobody".into()),
        ..sh("id -u; id -g; echo $USER $HOME $LOGNAME; id -G")
    };
    let (code, out, err) = a.run_opts(o, b"");
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "65534");
    assert_eq!(lines[2], "nobody /nonexistent nobody");
    // Numeric uid without a passwd entry: uid as given, group 0.
    let o = ExecOptions {
        user: Some("4321".into()),
        ..sh("id -u; id -g")
    };
    assert_eq!(a.run_opts(o, b"").1, "4321\n0\n");
    // The request's HOME wins.
    let o = ExecOptions {
        user: Some("nobody".into()),
        env: vec![("HOME".into(), "/tmp".into())],
        ..sh("echo $HOME")
    };
    assert_eq!(a.run_opts(o, b"").1, "/tmp\n");
    let (code, _, err) = a.run_opts(
        ExecOptions {
            user: Some("no-such-user".into()),
            ..opts(&["true"])
        },
        b"",
    );
    assert_eq!(code, 125);
    assert!(err.contains("unknown user 'no-such-user'"), "{err}");
}

#[test]
fn tty_mode() {
    let a = Agent::start();
    let o = ExecOptions {
        tty: true,
        ..sh("tty; [ -t 0 ] && [ -t 1 ] && [ -t 2 ] && echo all-tty; echo $TERM")
    };
    let (code, out, err) = a.run_opts(o, b"");
    assert_eq!(code, 0);
    assert!(err.is_empty());
    let lines: Vec<&str> = out.lines().map(|l| l.trim_end_matches('\r')).collect();
    assert!(lines[0].starts_with("/dev/pts/"), "{out:?}");
    assert_eq!(lines[1], "all-tty");
    assert!(!lines[2].is_empty());
}

fn read_until(s: &mut Session, needle: &str, acc: &mut String) -> Option<i32> {
    let deadline = Instant::now() + T;
    while Instant::now() < deadline {
        match s.next_event().unwrap() {
            Event::Stdout(d) | Event::Stderr(d) => {
                acc.push_str(&String::from_utf8_lossy(&d));
                if !needle.is_empty() && acc.contains(needle) {
                    return None;
                }
            }
            Event::Started { .. } => {}
            Event::Exit(e) => return Some(e.status()),
            Event::Error(e) => panic!("error: {}", e.message),
        }
    }
    panic!("timed out waiting for {needle:?}; got {acc:?}");
}

#[test]
fn tty_size_and_resize() {
    let a = Agent::start();
    let req = ExecRequest {
        argv: [
            "sh",
            "-c",
            "stty size; while read line; do stty size; done; echo bye",
        ]
        .map(String::from)
        .to_vec(),
        tty: true,
        rows: 33,
        cols: 101,
        term: Some("xterm".into()),
        ..Default::default()
    };
    let mut s = Session::start(&a.sock, &req, T).unwrap();
    let tx = s.sender();
    let mut acc = String::new();
    assert_eq!(read_until(&mut s, "33 101", &mut acc), None);
    tx.resize(40, 120).unwrap();
    tx.stdin(b"x\n").unwrap();
    assert_eq!(read_until(&mut s, "40 120", &mut acc), None);
    tx.resize(10, 20).unwrap();
    tx.stdin(b"y\n").unwrap();
    assert_eq!(read_until(&mut s, "10 20", &mut acc), None);
    tx.close_stdin().unwrap(); // ^D ends the read loop
    assert_eq!(read_until(&mut s, "", &mut acc), Some(0));
    assert!(acc.contains("bye"), "{acc:?}");
}

#[test]
fn signal_frames_reach_the_process() {
    let a = Agent::start();
    // Without a terminal: the process itself.
    let req = ExecRequest {
        argv: vec!["sleep".into(), "30".into()],
        ..Default::default()
    };
    let mut s = Session::start(&a.sock, &req, T).unwrap();
    assert!(matches!(s.next_event().unwrap(), Event::Started { .. }));
    let t0 = Instant::now();
    s.sender().signal(libc::SIGTERM).unwrap();
    assert_eq!(read_until(&mut s, "", &mut String::new()), Some(143));
    assert!(t0.elapsed() < Duration::from_secs(5));
    // With a terminal: the foreground process group (^C as a signal).
    let req = ExecRequest {
        argv: vec!["sleep".into(), "30".into()],
        tty: true,
        ..Default::default()
    };
    let mut s = Session::start(&a.sock, &req, T).unwrap();
    assert!(matches!(s.next_event().unwrap(), Event::Started { .. }));
    s.sender().signal(libc::SIGINT).unwrap();
    assert_eq!(read_until(&mut s, "", &mut String::new()), Some(130));
}

#[test]
fn client_disconnect_kills_the_process() {
    let a = Agent::start();
    // The shell ignores SIGHUP, so the agent must escalate to SIGKILL.
    let req = ExecRequest {
        argv: ["sh", "-c", "trap '' HUP; echo ready; sleep 60"]
            .map(String::from)
            .to_vec(),
        ..Default::default()
    };
    let mut s = Session::start(&a.sock, &req, T).unwrap();
    let Event::Started { pid } = s.next_event().unwrap() else {
        panic!("not started")
    };
    assert_eq!(read_until(&mut s, "ready", &mut String::new()), None);
    assert!(PathBuf::from(format!("/proc/{pid}")).exists());
    drop(s);
    let t0 = Instant::now();
    while PathBuf::from(format!("/proc/{pid}")).exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(6),
            "process {pid} still alive after disconnect"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // It ignored SIGHUP, so it took the SIGKILL after the grace period.
    assert!(t0.elapsed() >= Duration::from_secs(1), "{:?}", t0.elapsed());
}

#[test]
fn concurrent_execs() {
    let a = Agent::start();
    std::thread::scope(|scope| {
        for t in 0..12 {
            let a = &a;
            scope.spawn(move || {
                for i in 0..8 {
                    let script = format!("echo {t}-{i}; exit {}", (t + i) % 5);
                    let (code, out, _) = a.run(&["sh", "-c", &script]);
                    assert_eq!((code, out), ((t + i) % 5, format!("{t}-{i}\n")));
                }
            });
        }
    });
}

#[test]
fn warm_exec_round_trip_is_fast() {
    let a = Agent::start();
    a.run(&["true"]);
    let mut times: Vec<Duration> = (0..30)
        .map(|_| {
            let t0 = Instant::now();
            assert_eq!(a.run(&["true"]).0, 0);
            t0.elapsed()
        })
        .collect();
    times.sort();
    let median = times[times.len() / 2];
    eprintln!(
        "warm `exec true` round trip: median {median:?}, min {:?}",
        times[0]
    );
    // Generous bound for a loaded CI machine; a few ms is typical.
    assert!(median < Duration::from_millis(50), "median {median:?}");
}

#[test]
fn proxy_relay_to_unix_socket() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let dir = tempfile::tempdir().unwrap();
    let egress = dir.path().join("egress.sock");
    // A fake egress engine: uppercases what it reads until EOF, then closes.
    let server = UnixListener::bind(&egress).unwrap();
    let srv = std::thread::spawn(move || {
        for _ in 0..2 {
            let (mut c, _) = server.accept().unwrap();
            let mut buf = Vec::new();
            c.read_to_end(&mut buf).unwrap(); // needs the half-close
            c.write_all(&buf.to_ascii_uppercase()).unwrap();
        }
    });
    let listen = format!("127.0.0.1:{port}");
    let a = Agent::start_with(|c| {
        c.proxy_listen = Some(listen.clone());
        c.proxy_socket = Some(egress.to_string_lossy().into());
    });
    let connect = || {
        let t0 = Instant::now();
        loop {
            match std::net::TcpStream::connect(&listen) {
                Ok(s) => return s,
                Err(e) if t0.elapsed() < T => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(e) => panic!("proxy not listening: {e}\n{}", a.log()),
            }
        }
    };
    for payload in [b"hello proxy".to_vec(), vec![b'a'; 2_000_000]] {
        let mut c = connect();
        c.write_all(&payload).unwrap();
        c.shutdown(std::net::Shutdown::Write).unwrap();
        let mut back = Vec::new();
        c.read_to_end(&mut back).unwrap();
        assert!(
            back == payload.to_ascii_uppercase(),
            "got {} bytes",
            back.len()
        );
    }
    srv.join().unwrap();
}

#[test]
fn sigterm_stops_running_processes_and_the_agent() {
    let mut a = Agent::start();
    let req = ExecRequest {
        argv: vec!["sleep".into(), "60".into()],
        ..Default::default()
    };
    let mut s = Session::start(&a.sock, &req, T).unwrap();
    assert!(matches!(s.next_event().unwrap(), Event::Started { .. }));
    let st = a.terminate().expect("agent did not exit after SIGTERM");
    assert!(st.success(), "{st:?}");
    assert_eq!(read_until(&mut s, "", &mut String::new()), Some(143));
    assert!(a.log().contains("shutting down"), "{}", a.log());
}

/// The real setting: the agent as PID 1 of new user (root mapped only),
/// pid, uts, net and ipc namespaces.
#[test]
fn as_pid1_in_namespaces() {
    let probe = Command::new("unshare")
        .args([
            "--user",
            "--map-root-user",
            "--pid",
            "--fork",
            "--uts",
            "--net",
            "true",
        ])
        .status();
    assert!(
        matches!(probe, Ok(s) if s.success()),
        "this test needs unshare(1) and unprivileged user namespaces: {probe:?}"
    );
    let dir = tempfile::tempdir().unwrap();
    let egress = dir.path().join("egress.sock");
    let server = UnixListener::bind(&egress).unwrap();
    let srv = std::thread::spawn(move || {
        let (mut c, _) = server.accept().unwrap();
        let mut buf = Vec::new();
        c.read_to_end(&mut buf).unwrap();
        buf
    });
    let egress_path = egress.to_string_lossy().into_owned();
    let mut a = Agent::start_wrapped(
        &[
            "unshare",
            "--user",
            "--map-root-user",
            "--pid",
            "--fork",
            "--mount",
            "--mount-proc",
            "--uts",
            "--net",
            "--ipc",
            "--kill-child",
        ],
        |c| {
            c.hostname = "sbx-test".into();
            c.proxy_listen = Some("127.0.0.1:3128".into());
            c.proxy_socket = Some(egress_path);
        },
    );
    ping(&a.sock, T).unwrap();
    let (code, out, err) = a.run(&["sh", "-c", "hostname; echo $$"]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "sbx-test");
    let pid: i32 = lines[1].parse().unwrap();
    assert!(
        pid > 1 && pid < 100,
        "pid {pid} is not in the new pid namespace"
    );

    // Loopback is up (else connect fails) and the relay reaches the host.
    let (code, _, err) = a.run(&["bash", "-c", "echo via-proxy >/dev/tcp/127.0.0.1/3128"]);
    assert_eq!(code, 0, "{err}\n{}", a.log());
    assert_eq!(srv.join().unwrap(), b"via-proxy\n");

    // Only root is mapped: another user is a clear error.
    let o = ExecOptions {
        user: Some("nobody".into()),
        ..opts(&["true"])
    };
    let (code, _, err) = a.run_opts(o, b"");
    assert_eq!(code, 125);
    assert!(
        err.contains("user 'nobody' (uid 65534) is not mapped in this sandbox"),
        "{err}"
    );

    // A sandboxed process cannot ptrace or shut down the agent.
    let (_, out, _) = a.run(&["sh", "-c", "kill -TERM 1; sleep 0.2; echo alive"]);
    assert_eq!(out, "alive\n");
    let (code, _, _) = a.run(&["sh", "-c", "grep -q . /proc/1/environ"]);
    assert_ne!(code, 0, "agent memory readable from the sandbox");
    assert!(a.log().contains("ignoring signal 15"), "{}", a.log());

    // Orphans are reaped by PID 1.
    let (code, _, _) = a.run(&["sh", "-c", "(sleep 0.1 &) ; true"]);
    assert_eq!(code, 0);
    std::thread::sleep(Duration::from_millis(300));
    let (_, out, _) = a.run(&[
        "sh",
        "-c",
        "grep -l '^State:.*Z' /proc/[0-9]*/status 2>/dev/null | wc -l",
    ]);
    assert_eq!(out.trim(), "0", "zombies left behind");

    // SIGTERM from outside: everything inside ends, then the agent.
    let req = ExecRequest {
        argv: vec!["sleep".into(), "60".into()],
        ..Default::default()
    };
    let mut s = Session::start(&a.sock, &req, T).unwrap();
    assert!(matches!(s.next_event().unwrap(), Event::Started { .. }));
    // unshare forwards nothing; signal the agent (unshare's child) directly.
    let agent_pid = std::fs::read_to_string(format!(
        "/proc/{}/task/{}/children",
        a.child.id(),
        a.child.id()
    ))
    .unwrap()
    .trim()
    .parse::<i32>()
    .unwrap();
    // SAFETY: signalling a process we started.
    unsafe { libc::kill(agent_pid, libc::SIGTERM) };
    assert_eq!(read_until(&mut s, "", &mut String::new()), Some(143));
    let t0 = Instant::now();
    while a.child.try_wait().unwrap().is_none() {
        assert!(
            t0.elapsed() < Duration::from_secs(6),
            "agent did not exit:\n{}",
            a.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Not a test by itself: the child half of `attached_terminal`, run in a
/// re-executed copy of this test binary whose stdio is a pty.
#[test]
fn attached_helper() {
    let Some(sock) = std::env::var_os("AIRLOCK_TEST_ATTACH_SOCK") else {
        return;
    };
    let o = ExecOptions {
        tty: true,
        interactive: true,
        ..sh("stty size; read x; stty size; echo got-$x; exit 3")
    };
    let mut before: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer; fd 0 is the pty slave.
    unsafe { libc::tcgetattr(0, &mut before) };
    let status = airlock_exec::run_attached(std::path::Path::new(&sock), &o, T).unwrap();
    let mut after: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::tcgetattr(0, &mut after) };
    let same = before.c_lflag == after.c_lflag
        && before.c_iflag == after.c_iflag
        && before.c_oflag == after.c_oflag;
    println!("\nterminal-restored={same}");
    std::process::exit(status);
}

fn read_master_until(master: &mut std::fs::File, needle: &str, acc: &mut String) {
    let deadline = Instant::now() + T;
    let mut buf = [0u8; 4096];
    while !acc.contains(needle) {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {needle:?}: {acc:?}"
        );
        match master.read(&mut buf) {
            Ok(0) | Err(_) => panic!("terminal closed before {needle:?}: {acc:?}"),
            Ok(n) => acc.push_str(&String::from_utf8_lossy(&buf[..n])),
        }
    }
}

/// `run_attached` on a real terminal: raw mode, initial size, SIGWINCH →
/// Resize, keystrokes forwarded, exit status returned, terminal restored.
#[test]
fn attached_terminal() {
    use std::os::fd::FromRawFd;
    let a = Agent::start();
    let (mut m, mut s) = (0, 0);
    let mut ws = libc::winsize {
        ws_row: 20,
        ws_col: 70,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: valid out-pointers; null name/termios are allowed.
    let r = unsafe { libc::openpty(&mut m, &mut s, std::ptr::null_mut(), std::ptr::null(), &ws) };
    assert_eq!(r, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: openpty returned two fds we now own.
    let (mut master, slave) = unsafe {
        (
            std::fs::File::from_raw_fd(m),
            std::os::fd::OwnedFd::from_raw_fd(s),
        )
    };
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "attached_helper",
        "--nocapture",
        "--test-threads=1",
    ])
    .env("AIRLOCK_TEST_ATTACH_SOCK", &a.sock)
    .stdin(slave.try_clone().unwrap())
    .stdout(slave.try_clone().unwrap())
    .stderr(slave.try_clone().unwrap());
    // SAFETY: setsid and ioctl are async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            libc::ioctl(0, libc::TIOCSCTTY, 0);
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    drop(slave);
    let mut acc = String::new();
    read_master_until(&mut master, "20 70", &mut acc);
    ws.ws_row = 30;
    ws.ws_col = 90;
    // SAFETY: TIOCSWINSZ reads a winsize; the kernel sends SIGWINCH.
    unsafe { libc::ioctl(m, libc::TIOCSWINSZ, &ws) };
    std::thread::sleep(Duration::from_millis(200));
    master.write_all(b"hello\r").unwrap();
    read_master_until(&mut master, "got-hello", &mut acc);
    assert!(acc.contains("30 90"), "{acc:?}");
    read_master_until(&mut master, "terminal-restored=", &mut acc);
    let st = child.wait().unwrap();
    assert_eq!(st.code(), Some(3), "{acc:?}");
    assert!(acc.contains("terminal-restored=true"), "{acc:?}");
}
