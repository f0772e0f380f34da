//! airlock-secrets: API keys that agents use without ever seeing them.
//!
//! Owns: credential providers (built-ins of DESIGN §4 plus user-defined ones from
//! `providers.json`), the secret store (`secrets.json`, 0600, written atomically), the
//! [`Secret`] type (zeroized on drop, `Debug` prints `Secret(***)`, no `Display`), and
//! [`Credentials`]: for one sandbox, which header to inject for which host, and the
//! random placeholders the guest's environment carries instead of the real values.
//!
//! Must not: log, print or serialize a secret value anywhere except `secrets.json`; do
//! network I/O; know about TLS. Where a value comes from: the invoking environment at
//! `run` time first (the first non-empty variable of the provider's `env` list), then
//! the store (`airlock secret set`). An explicit environment variable wins because it is
//! what the user just typed; the store is the fallback that survives shells.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rand::RngCore;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use zeroize::Zeroize;

/// The store file in the data directory.
pub const SECRETS_FILE: &str = "secrets.json";
/// User-defined providers in the data directory (optional).
pub const PROVIDERS_FILE: &str = "providers.json";

/// Errors; paths and names are in the fields, values never are.
#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    #[error("cannot {what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path} is readable by group or others (mode {mode:o}); run `chmod 600 {path}`")]
    Permissions { path: PathBuf, mode: u32 },
    #[error("invalid secret name {0:?} (use letters, digits, '-', '_', '.'; at most 64)")]
    BadName(String),
    #[error("provider {name:?}: {why}")]
    BadProvider { name: String, why: String },
}

/// A secret value. Zeroized on drop; `Debug` is redacted; there is no `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Secret {
        Secret(value)
    }
    /// The value, for injection only. Never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// How to inject one credential. JSON (in `providers.json`):
/// `{"name":"acme","hosts":["api.acme.dev","*.acme.dev"],"header":"authorization",
///   "value_template":"Bearer {secret}","env":["ACME_TOKEN"],"secret_name":"acme"}`.
///
/// `hosts`: exact names or `*.example.com` (any subdomain, not the apex); no ports.
/// `value_template`: `{secret}` is replaced by the value; `{basic:USER}` by the base64 of
/// `USER:value` (HTTP basic auth, as git over HTTPS uses).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Provider {
    pub name: String,
    pub hosts: Vec<String>,
    pub header: String,
    pub value_template: String,
    #[serde(default)]
    pub env: Vec<String>,
    pub secret_name: String,
    /// Start of the placeholder put in the guest's environment, so that clients which
    /// check a key's shape accept it. Default `airlock-placeholder-`.
    #[serde(default)]
    pub placeholder_prefix: Option<String>,
}

fn provider(
    name: &str,
    hosts: &[&str],
    header: &str,
    template: &str,
    env: &[&str],
    secret: &str,
    prefix: &str,
) -> Provider {
    Provider {
        name: name.into(),
        hosts: hosts.iter().map(|s| s.to_string()).collect(),
        header: header.into(),
        value_template: template.into(),
        env: env.iter().map(|s| s.to_string()).collect(),
        secret_name: secret.into(),
        placeholder_prefix: Some(prefix.into()),
    }
}

/// The built-in providers (DESIGN §4). GitHub is two providers sharing the secret
/// `github`: the REST API takes `Bearer`, git over HTTPS on `github.com` takes basic auth
/// with the user `x-access-token`.
pub fn builtin_providers() -> Vec<Provider> {
    vec![
        provider(
            "anthropic",
            &["api.anthropic.com"],
            "x-api-key",
            "{secret}",
            &["ANTHROPIC_API_KEY"],
            "anthropic",
            "sk-ant-api03-airlock-placeholder-",
        ),
        provider(
            "openai",
            &["api.openai.com"],
            "authorization",
            "Bearer {secret}",
            &["OPENAI_API_KEY"],
            "openai",
            "sk-proj-airlock-placeholder-",
        ),
        provider(
            "google",
            &["generativelanguage.googleapis.com"],
            "x-goog-api-key",
            "{secret}",
            &["GEMINI_API_KEY", "GOOGLE_API_KEY"],
            "google",
            "AIzaSy-airlock-placeholder-",
        ),
        provider(
            "github",
            &["api.github.com"],
            "authorization",
            "Bearer {secret}",
            &["GH_TOKEN", "GITHUB_TOKEN"],
            "github",
            "ghp_airlockplaceholder",
        ),
        provider(
            "github-git",
            &["github.com"],
            "authorization",
            "Basic {basic:x-access-token}",
            &["GH_TOKEN", "GITHUB_TOKEN"],
            "github",
            "ghp_airlockplaceholder",
        ),
    ]
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProvidersFile {
    providers: Vec<Provider>,
}

impl Provider {
    /// Check names, header and template.
    pub fn validate(&self) -> Result<(), SecretsError> {
        let bad = |why: &str| SecretsError::BadProvider {
            name: self.name.clone(),
            why: why.into(),
        };
        valid_name(&self.name).map_err(|_| bad("invalid name"))?;
        valid_name(&self.secret_name).map_err(|_| bad("invalid secret_name"))?;
        if self.hosts.is_empty() {
            return Err(bad("no hosts"));
        }
        for h in &self.hosts {
            let n = h.strip_prefix("*.").unwrap_or(h);
            if n.is_empty()
                || n.contains(':')
                || !n
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
            {
                return Err(bad(&format!("invalid host pattern {h:?}")));
            }
        }
        if self.header.is_empty()
            || !self
                .header
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_!#$%&'*+.^`|~".contains(&b))
        {
            return Err(bad("invalid header name"));
        }
        if !self.value_template.contains("{secret}") && !self.value_template.contains("{basic:") {
            return Err(bad("value_template must contain {secret} or {basic:USER}"));
        }
        for e in &self.env {
            if e.is_empty() || e.contains('=') || e.contains('\0') {
                return Err(bad(&format!("invalid env name {e:?}")));
            }
        }
        Ok(())
    }

    /// Does this provider serve `host` (any case, trailing dot ignored, no port)?
    pub fn matches(&self, host: &str) -> bool {
        let h = normalize(host);
        self.hosts.iter().any(|p| {
            let p = normalize(p);
            match p.strip_prefix("*.") {
                Some(suffix) => h.len() > suffix.len() + 1 && h.ends_with(&format!(".{suffix}")),
                None => h == p,
            }
        })
    }

    fn render(&self, secret: &Secret) -> Secret {
        let mut out = self.value_template.replace("{secret}", secret.expose());
        while let Some(start) = out.find("{basic:") {
            let Some(end) = out[start..].find('}') else {
                break;
            };
            let user = &out[start + 7..start + end];
            let mut cred = format!("{user}:{}", secret.expose());
            let enc = base64(cred.as_bytes());
            cred.zeroize();
            out.replace_range(start..start + end + 1, &enc);
        }
        Secret(out)
    }
}

fn normalize(h: &str) -> String {
    h.strip_suffix('.').unwrap_or(h).to_ascii_lowercase()
}

fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let b = [c[0], *c.get(1).unwrap_or(&0), *c.get(2).unwrap_or(&0)];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Built-ins plus `dir/providers.json` (if present). A user provider with a built-in's
/// name replaces it.
pub fn load_providers(dir: &Path) -> Result<Vec<Provider>, SecretsError> {
    let path = dir.join(PROVIDERS_FILE);
    let mut out = builtin_providers();
    let data = match fs::read(&path) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(source) => {
            return Err(SecretsError::Io {
                what: "read",
                path,
                source,
            })
        }
    };
    let file: ProvidersFile =
        serde_json::from_slice(&data).map_err(|source| SecretsError::Json {
            path: path.clone(),
            source,
        })?;
    for p in file.providers {
        p.validate()?;
        out.retain(|b| b.name != p.name);
        out.push(p);
    }
    Ok(out)
}

fn valid_name(n: &str) -> Result<(), SecretsError> {
    if n.is_empty()
        || n.len() > 64
        || !n
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        || n.starts_with('.')
    {
        return Err(SecretsError::BadName(n.into()));
    }
    Ok(())
}

/// The on-disk form; the only place a [`Secret`] is serialized.
#[derive(Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct StoreFile {
    secrets: BTreeMap<String, FileSecret>,
}

struct FileSecret(Secret);

impl Serialize for FileSecret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.0.expose())
    }
}

impl<'de> Deserialize<'de> for FileSecret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(|s| FileSecret(Secret(s)))
    }
}

/// `dir/secrets.json`, 0600: `{"secrets":{"NAME":"VALUE"}}`. Every change rewrites the
/// file atomically (temporary 0600 file, then rename).
#[derive(Debug, Clone)]
pub struct SecretStore {
    path: PathBuf,
}

impl SecretStore {
    /// The store in `dir` (created 0700 on first write).
    pub fn open(dir: &Path) -> SecretStore {
        SecretStore {
            path: dir.join(SECRETS_FILE),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn read(&self) -> Result<StoreFile, SecretsError> {
        let io = |what| {
            let path = self.path.clone();
            move |source| SecretsError::Io { what, path, source }
        };
        let meta = match fs::metadata(&self.path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(StoreFile::default()),
            Err(e) => return Err(io("read")(e)),
        };
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(SecretsError::Permissions {
                path: self.path.clone(),
                mode,
            });
        }
        let mut data = fs::read(&self.path).map_err(io("read"))?;
        let r = serde_json::from_slice(&data).map_err(|source| SecretsError::Json {
            path: self.path.clone(),
            source,
        });
        data.zeroize();
        r
    }

    fn write(&self, f: &StoreFile) -> Result<(), SecretsError> {
        let io = |what, path: &Path| {
            let path = path.to_path_buf();
            move |source| SecretsError::Io { what, path, source }
        };
        if let Some(dir) = self.path.parent() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io("create directory", dir))?;
        }
        let mut data = serde_json::to_vec_pretty(f).map_err(|source| SecretsError::Json {
            path: self.path.clone(),
            source,
        })?;
        let tmp = self.path.with_extension(format!(
            "json.{}.{:08x}.tmp",
            std::process::id(),
            rand::thread_rng().next_u32()
        ));
        let res = (|| {
            let mut file = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(io("create", &tmp))?;
            fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600))
                .map_err(io("chmod", &tmp))?;
            file.write_all(&data).map_err(io("write", &tmp))?;
            file.sync_all().map_err(io("sync", &tmp))?;
            fs::rename(&tmp, &self.path).map_err(io("replace", &self.path))
        })();
        data.zeroize();
        if res.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        res
    }

    /// Store (or replace) a secret.
    pub fn set(&self, name: &str, value: Secret) -> Result<(), SecretsError> {
        valid_name(name)?;
        let mut f = self.read()?;
        f.secrets.insert(name.to_string(), FileSecret(value));
        self.write(&f)
    }

    /// Names of the stored secrets, sorted. Never the values.
    pub fn list(&self) -> Result<Vec<String>, SecretsError> {
        Ok(self.read()?.secrets.into_keys().collect())
    }

    /// Remove a secret; `false` if there was none by that name.
    pub fn remove(&self, name: &str) -> Result<bool, SecretsError> {
        let mut f = self.read()?;
        if f.secrets.remove(name).is_none() {
            return Ok(false);
        }
        self.write(&f)?;
        Ok(true)
    }

    pub fn get(&self, name: &str) -> Result<Option<Secret>, SecretsError> {
        Ok(self.read()?.secrets.remove(name).map(|s| s.0.clone()))
    }
}

/// One provider with a value, ready to inject.
#[derive(Debug)]
struct Entry {
    provider: Provider,
    /// The rendered header value.
    value: Secret,
}

/// What an injection looks like, for one request.
#[derive(Debug, Clone, Copy)]
pub struct Injection<'a> {
    /// Provider name, for the event (`credential injected: anthropic`).
    pub provider: &'a str,
    /// Header name, lowercase.
    pub header: &'a str,
    /// Header value. Never log it.
    pub value: &'a str,
    /// This provider's placeholder: a header that carries it (other than `header`) is
    /// the client's own attempt at this credential and can simply be dropped.
    pub placeholder: &'a str,
}

/// The credentials of one sandbox: resolved once at `run` time.
#[derive(Debug, Default)]
pub struct Credentials {
    entries: Vec<Entry>,
    /// (secret name, placeholder, env var names)
    placeholders: Vec<(String, Secret, Vec<String>)>,
}

/// A fresh placeholder: `prefix` + 32 random hex digits.
fn placeholder(prefix: &str) -> String {
    let mut b = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut b);
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("{prefix}{hex}")
}

impl Credentials {
    /// Resolve each provider's secret: the first non-empty `host_env(var)` of its `env`
    /// list, else the store's `secret_name`. Providers without a value are left out
    /// (their hosts get no injection, and their variables no placeholder). Providers that
    /// share a secret share one placeholder.
    pub fn resolve(
        providers: &[Provider],
        store: &SecretStore,
        host_env: impl Fn(&str) -> Option<String>,
    ) -> Result<Credentials, SecretsError> {
        Self::resolve_with_placeholders(providers, store, host_env, &BTreeMap::new())
    }

    /// [`Credentials::resolve`], reusing placeholders chosen earlier (secret name →
    /// placeholder, from [`Credentials::placeholder_map`]) — for a process that must agree
    /// with the guest environment another process already built. Secrets not in the map
    /// get fresh placeholders.
    pub fn resolve_with_placeholders(
        providers: &[Provider],
        store: &SecretStore,
        host_env: impl Fn(&str) -> Option<String>,
        placeholders: &BTreeMap<String, String>,
    ) -> Result<Credentials, SecretsError> {
        let mut c = Credentials::default();
        let mut values: BTreeMap<String, Secret> = BTreeMap::new();
        for p in providers {
            p.validate()?;
            let value = match values.get(&p.secret_name) {
                Some(v) => Some(v.clone()),
                None => {
                    let from_env = p
                        .env
                        .iter()
                        .filter_map(|e| host_env(e))
                        .find(|v| !v.is_empty())
                        .map(Secret);
                    match from_env {
                        Some(v) => Some(v),
                        None => store.get(&p.secret_name)?,
                    }
                }
            };
            let Some(value) = value.filter(|v| !v.is_empty()) else {
                continue;
            };
            values.insert(p.secret_name.clone(), value.clone());
            let mut p = p.clone();
            p.header = p.header.to_ascii_lowercase();
            c.entries.push(Entry {
                value: p.render(&value),
                provider: p.clone(),
            });
            match c.placeholders.iter_mut().find(|x| x.0 == p.secret_name) {
                Some(x) => {
                    for e in &p.env {
                        if !x.2.contains(e) {
                            x.2.push(e.clone());
                        }
                    }
                }
                None => c.placeholders.push((
                    p.secret_name.clone(),
                    Secret(
                        placeholders
                            .get(&p.secret_name)
                            .filter(|v| v.len() >= 16)
                            .cloned()
                            .unwrap_or_else(|| {
                                placeholder(
                                    p.placeholder_prefix
                                        .as_deref()
                                        .unwrap_or("airlock-placeholder-"),
                                )
                            }),
                    ),
                    p.env.clone(),
                )),
            }
        }
        Ok(c)
    }

    /// No provider has a value.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// For the guest's environment: each variable of each provider that has a value →
    /// that secret's placeholder.
    pub fn placeholder_env(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (_, ph, envs) in &self.placeholders {
            for e in envs {
                if !out.iter().any(|(n, _): &(String, String)| n == e) {
                    out.push((e.clone(), ph.expose().to_string()));
                }
            }
        }
        out
    }

    /// Secret name → placeholder (not secret; safe to store with the sandbox record).
    pub fn placeholder_map(&self) -> BTreeMap<String, String> {
        self.placeholders
            .iter()
            .map(|(n, p, _)| (n.clone(), p.expose().to_string()))
            .collect()
    }

    /// All placeholders (to detect them leaving for the wrong host).
    pub fn placeholders(&self) -> Vec<String> {
        self.placeholders
            .iter()
            .map(|(_, p, _)| p.expose().to_string())
            .collect()
    }

    /// Does `data` contain any placeholder?
    pub fn contains_placeholder(&self, data: &[u8]) -> bool {
        self.placeholders.iter().any(|(_, p, _)| {
            let p = p.expose().as_bytes();
            data.len() >= p.len() && data.windows(p.len()).any(|w| w == p)
        })
    }

    /// The injection for `host` (the first provider that matches), if any.
    pub fn for_host(&self, host: &str) -> Option<Injection<'_>> {
        let e = self.entries.iter().find(|e| e.provider.matches(host))?;
        let placeholder = self
            .placeholders
            .iter()
            .find(|p| p.0 == e.provider.secret_name)
            .map_or("", |p| p.1.expose());
        Some(Injection {
            provider: &e.provider.name,
            header: &e.provider.header,
            value: e.value.expose(),
            placeholder,
        })
    }

    /// Names of the providers that have a value.
    pub fn provider_names(&self) -> Vec<&str> {
        self.entries
            .iter()
            .map(|e| e.provider.name.as_str())
            .collect()
    }
}

#[cfg(test)]
mod tests;
