//! Agent templates (issue 5): the agent at its pinned version, started from
//! inside a sandbox of its own template (a layer over base), and Claude Code
//! talking to a test Anthropic upstream through the egress engine, which
//! injects the host's key while the sandbox holds only a placeholder.
//!
//! Needs the agent templates built beforehand (scripts/test.sh builds
//! them; the test world has no way to the npm registry).

use crate::world::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// The version the `claude` template is pinned to on this machine.
fn pinned(agent: &str) -> String {
    let store = airlock_template::TemplateStore::new(templates_dir());
    let pin = store
        .agent_pin(agent)
        .unwrap()
        .unwrap_or_else(|| panic!("{agent} has no lock entry"));
    match store.get(agent).unwrap() {
        Some(t) if store.agent_is_current(&t).unwrap() => {}
        _ => panic!(
            "the {agent} template at {} is not built in {}; run scripts/test.sh (it builds it) or \
             `airlock template build {agent}` before the suite",
            pin.spec(),
            templates_dir().display()
        ),
    }
    pin.version
}

#[test]
fn claude_version_from_inside_its_template() {
    let version = pinned("claude");
    let w = World::new();
    let ws = w.ws.display().to_string();
    w.track("cl-ver");
    let out = w.airlock(&["run", "claude", &ws, "--name", "cl-ver", "--", "--version"]);
    assert_ok(&out, "run claude -- --version");
    assert_eq!(
        text(&out.stdout).trim(),
        format!("{version} (Claude Code)"),
        "{}",
        text(&out.stderr)
    );
    // The sandbox runs the claude template, whose layer holds only the
    // agent (base's files come from base's layer).
    let out = w.airlock(&["inspect", "cl-ver", "--json"]);
    assert_ok(&out, "inspect");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["template"], "claude", "{v}");
    let layer = templates_dir().join("claude/rootfs");
    assert!(layer.join("usr/local/bin/claude").exists());
    assert!(
        !layer.join("usr/bin/node").exists(),
        "base files leaked into the agent layer"
    );
    // Re-entry (warm) gives the same version; processes run as root
    // inside (the invoking user on the host), where IS_SANDBOX=1 lets
    // Claude Code accept --dangerously-skip-permissions.
    let out = w.airlock(&["run", "cl-ver", "--", "--version"]);
    assert_ok(&out, "re-enter");
    assert!(text(&out.stdout).contains(&version));
    let out = w.sh("cl-ver", "id -u; printf %s \"$IS_SANDBOX\"");
    assert_eq!(text(&out.stdout), "0\n1");
}

/// A minimal Anthropic Messages API over HTTPS on TLS_IP:443 (api.test),
/// logging each request's path and x-api-key.
struct Upstream {
    child: Child,
    log: PathBuf,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        text(&out.stderr)
    );
}

const REPLY: &str = "hi from the test upstream";

fn anthropic_upstream(w: &World) -> Upstream {
    let dir = w.tmp.path().join("anthropic");
    std::fs::create_dir_all(&dir).unwrap();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut a = vec!["req", "-x509"];
    a.extend(ec);
    a.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-subj",
        "/CN=test CA",
        "-days",
        "2",
    ]);
    openssl(&dir, &a);
    let mut a = vec!["req"];
    a.extend(ec);
    a.extend([
        "-keyout",
        "leaf.key",
        "-out",
        "leaf.csr",
        "-subj",
        "/CN=api.test",
    ]);
    openssl(&dir, &a);
    std::fs::write(dir.join("ext"), "subjectAltName=DNS:api.test\n").unwrap();
    openssl(
        &dir,
        &[
            "x509",
            "-req",
            "-in",
            "leaf.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "leaf.pem",
            "-days",
            "2",
            "-extfile",
            "ext",
        ],
    );
    let log = dir.join("requests.jsonl");
    let script = format!(
        r#"
import http.server, ssl, json
REPLY = {reply:?}
def sse():
    ev = [
      ('message_start', {{'type':'message_start','message':{{'id':'msg_test','type':'message','role':'assistant','model':'claude-test','content':[],'stop_reason':None,'stop_sequence':None,'usage':{{'input_tokens':3,'output_tokens':1}}}}}}),
      ('content_block_start', {{'type':'content_block_start','index':0,'content_block':{{'type':'text','text':''}}}}),
      ('content_block_delta', {{'type':'content_block_delta','index':0,'delta':{{'type':'text_delta','text':REPLY}}}}),
      ('content_block_stop', {{'type':'content_block_stop','index':0}}),
      ('message_delta', {{'type':'message_delta','delta':{{'stop_reason':'end_turn','stop_sequence':None}},'usage':{{'output_tokens':6}}}}),
      ('message_stop', {{'type':'message_stop'}}),
    ]
    return ''.join('event: %s\ndata: %s\n\n' % (n, json.dumps(d)) for n, d in ev).encode()
MSG = json.dumps({{'id':'msg_test','type':'message','role':'assistant','model':'claude-test','content':[{{'type':'text','text':REPLY}}],'stop_reason':'end_turn','stop_sequence':None,'usage':{{'input_tokens':3,'output_tokens':6}}}}).encode()
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'
    def one(self):
        n = int(self.headers.get('content-length') or 0)
        body = self.rfile.read(n) if n else b''
        try: stream = bool(json.loads(body or b'{{}}').get('stream'))
        except Exception: stream = False
        with open('{log}', 'a') as f:
            f.write(json.dumps({{'method': self.command, 'path': self.path, 'host': self.headers.get('host'),
                                 'key': self.headers.get('x-api-key'), 'stream': stream}}) + '\n')
        if self.path.startswith('/v1/messages') and 'count_tokens' not in self.path:
            out, ctype = (sse(), 'text/event-stream') if stream else (MSG, 'application/json')
        else:
            out, ctype = b'{{"input_tokens": 3}}', 'application/json'
        self.send_response(200)
        self.send_header('content-type', ctype)
        self.send_header('content-length', str(len(out)))
        self.end_headers()
        self.wfile.write(out)
    do_GET = do_POST = do_HEAD = one
    def log_message(self, *a): pass
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain('{leaf}', '{key}')
srv = http.server.ThreadingHTTPServer(('{ip}', 443), H)
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
print('READY', flush=True)
srv.serve_forever()
"#,
        reply = REPLY,
        log = log.display(),
        leaf = dir.join("leaf.pem").display(),
        key = dir.join("leaf.key").display(),
        ip = TLS_IP
    );
    let mut child = Command::new("ip")
        .args(["netns", "exec", &w.ns_out, "python3", "-c", &script])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    use std::io::BufRead;
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "READY", "upstream did not start");
    w.extra_env.lock().unwrap().push((
        "AIRLOCK_UPSTREAM_EXTRA_CA".to_string(),
        dir.join("ca.pem").display().to_string(),
    ));
    // api.test is an Anthropic-style provider whose key is the host's
    // ANTHROPIC_API_KEY (World sets it to HOST_SECRET for every command).
    std::fs::write(
        w.data.join("providers.json"),
        r#"{"providers":[{"name":"anthropic-test","hosts":["api.test"],"header":"x-api-key","value_template":"{secret}","env":["ANTHROPIC_API_KEY"],"secret_name":"anthropic"}]}"#,
    )
    .unwrap();
    Upstream { child, log }
}

#[test]
fn claude_prompt_reaches_the_upstream_with_the_hosts_key() {
    pinned("claude");
    let w = World::new();
    std::fs::create_dir_all(&w.data).unwrap();
    let up = anthropic_upstream(&w);
    let ws = w.ws.display().to_string();
    w.track("cl-say");
    let out = w.airlock(&["run", "claude", &ws, "--name", "cl-say", "--", "--version"]);
    assert_ok(&out, "run claude");
    let inside = text(&w.sh("cl-say", "printf %s \"$ANTHROPIC_API_KEY\"").stdout);
    assert!(!inside.is_empty() && inside != HOST_SECRET, "{inside}");
    let out = w.airlock(&[
        "exec",
        "-e",
        "ANTHROPIC_BASE_URL=https://api.test",
        "-e",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1",
        "cl-say",
        "timeout",
        "60",
        "claude",
        "--dangerously-skip-permissions",
        "-p",
        "say hi",
    ]);
    let reqs: Vec<serde_json::Value> = std::fs::read_to_string(&up.log)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        text(&out.stdout).contains(REPLY),
        "stdout: {}\nstderr: {}\nrequests: {reqs:?}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let msgs: Vec<_> = reqs
        .iter()
        .filter(|r| {
            r["path"]
                .as_str()
                .is_some_and(|p| p.starts_with("/v1/messages"))
        })
        .collect();
    assert!(!msgs.is_empty(), "{reqs:?}");
    for r in &reqs {
        assert_eq!(
            r["key"], HOST_SECRET,
            "every request carries the host's key: {r}"
        );
    }
    // The key never entered the sandbox.
    let out = w.sh(
        "cl-say",
        &format!("grep -rl {HOST_SECRET} /root /tmp /etc 2>/dev/null; env | grep -c {HOST_SECRET}"),
    );
    assert_eq!(text(&out.stdout).trim(), "0", "{}", text(&out.stdout));
}

/// Every agent of the lock file starts from inside its own template (in its
/// autonomous mode, arguments after `--` passed through) and reports the
/// pinned version.
#[test]
fn every_agent_prints_its_pinned_version() {
    let agents = ["claude", "codex", "gemini", "copilot", "opencode"];
    let versions: Vec<String> = agents.iter().map(|a| pinned(a)).collect();
    let w = World::new();
    let ws = w.ws.display().to_string();
    for (agent, version) in agents.iter().zip(&versions) {
        let name = format!("ver-{agent}");
        w.track(&name);
        let out = w.airlock(&["run", agent, &ws, "--name", &name, "--", "--version"]);
        assert_ok(&out, &format!("run {agent} -- --version"));
        assert!(
            text(&out.stdout).contains(version.as_str()),
            "{agent}: expected {version} in {:?} (stderr {})",
            text(&out.stdout),
            text(&out.stderr)
        );
    }
}
