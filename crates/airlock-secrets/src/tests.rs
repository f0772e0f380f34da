use super::*;

fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let m: BTreeMap<String, String> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    move |k| m.get(k).cloned()
}

#[test]
fn secret_is_redacted() {
    let s = Secret::new("hunter2-very-secret".into());
    assert_eq!(format!("{s:?}"), "Secret(***)");
    let c = Credentials::resolve(
        &builtin_providers(),
        &SecretStore::open(Path::new("/nonexistent-airlock")),
        env(&[("ANTHROPIC_API_KEY", "sk-ant-real-value")]),
    )
    .unwrap();
    let dbg = format!("{c:?}");
    assert!(!dbg.contains("sk-ant-real-value"), "{dbg}");
}

#[test]
fn store_mode_set_list_get_remove() {
    let d = tempfile::tempdir().unwrap();
    let st = SecretStore::open(&d.path().join("data"));
    assert!(st.list().unwrap().is_empty());
    st.set("anthropic", Secret::new("v1".into())).unwrap();
    st.set("github", Secret::new("v2".into())).unwrap();
    st.set("anthropic", Secret::new("v3".into())).unwrap();
    let mode = fs::metadata(st.path()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert_eq!(st.list().unwrap(), vec!["anthropic", "github"]);
    assert_eq!(st.get("anthropic").unwrap().unwrap().expose(), "v3");
    assert!(st.remove("anthropic").unwrap());
    assert!(!st.remove("anthropic").unwrap());
    assert!(st.get("anthropic").unwrap().is_none());
    assert_eq!(st.list().unwrap(), vec!["github"]);
    assert!(st.set("../x", Secret::new("v".into())).is_err());
    // no temporary files left behind
    let n = fs::read_dir(d.path().join("data")).unwrap().count();
    assert_eq!(n, 1);
    // a readable store is refused
    fs::set_permissions(st.path(), fs::Permissions::from_mode(0o644)).unwrap();
    assert!(matches!(
        st.list(),
        Err(SecretsError::Permissions { mode: 0o644, .. })
    ));
}

#[test]
fn unknown_fields_rejected() {
    let d = tempfile::tempdir().unwrap();
    let st = SecretStore::open(d.path());
    fs::write(st.path(), r#"{"secrets":{},"extra":1}"#).unwrap();
    fs::set_permissions(st.path(), fs::Permissions::from_mode(0o600)).unwrap();
    assert!(matches!(st.list(), Err(SecretsError::Json { .. })));

    fs::write(
        d.path().join(PROVIDERS_FILE),
        r#"{"providers":[{"name":"x","hosts":["a.test"],"header":"h","value_template":"{secret}","secret_name":"x","colour":"red"}]}"#,
    )
    .unwrap();
    assert!(matches!(
        load_providers(d.path()),
        Err(SecretsError::Json { .. })
    ));
}

#[test]
fn user_providers_extend_and_replace() {
    let d = tempfile::tempdir().unwrap();
    assert_eq!(load_providers(d.path()).unwrap(), builtin_providers());
    fs::write(
        d.path().join(PROVIDERS_FILE),
        r#"{"providers":[
            {"name":"acme","hosts":["*.acme.test"],"header":"X-Acme","value_template":"Token {secret}","env":["ACME"],"secret_name":"acme"},
            {"name":"openai","hosts":["proxy.openai.test"],"header":"authorization","value_template":"Bearer {secret}","secret_name":"openai"}
        ]}"#,
    )
    .unwrap();
    let ps = load_providers(d.path()).unwrap();
    assert_eq!(ps.len(), builtin_providers().len() + 1);
    let acme = ps.iter().find(|p| p.name == "acme").unwrap();
    assert!(acme.matches("API.acme.test."));
    assert!(!acme.matches("acme.test"));
    assert!(!acme.matches("evilacme.test"));
    let openai = ps.iter().find(|p| p.name == "openai").unwrap();
    assert_eq!(openai.hosts, vec!["proxy.openai.test"]);

    fs::write(
        d.path().join(PROVIDERS_FILE),
        r#"{"providers":[{"name":"x","hosts":["a.test:443"],"header":"h","value_template":"{secret}","secret_name":"x"}]}"#,
    )
    .unwrap();
    assert!(matches!(
        load_providers(d.path()),
        Err(SecretsError::BadProvider { .. })
    ));
}

#[test]
fn resolve_env_wins_then_store() {
    let d = tempfile::tempdir().unwrap();
    let st = SecretStore::open(d.path());
    st.set("anthropic", Secret::new("from-store".into()))
        .unwrap();
    st.set("openai", Secret::new("oa-store".into())).unwrap();
    let c = Credentials::resolve(
        &builtin_providers(),
        &st,
        env(&[
            ("ANTHROPIC_API_KEY", "from-env"),
            ("GEMINI_API_KEY", ""),
            ("GOOGLE_API_KEY", "g-env"),
            ("GITHUB_TOKEN", "gh-env"),
        ]),
    )
    .unwrap();
    let a = c.for_host("API.Anthropic.com").unwrap();
    assert_eq!(
        (a.provider, a.header, a.value),
        ("anthropic", "x-api-key", "from-env")
    );
    let o = c.for_host("api.openai.com").unwrap();
    assert_eq!(o.value, "Bearer oa-store");
    assert_eq!(
        c.for_host("generativelanguage.googleapis.com")
            .unwrap()
            .value,
        "g-env"
    );
    assert_eq!(c.for_host("api.github.com").unwrap().value, "Bearer gh-env");
    let git = c.for_host("github.com").unwrap();
    assert_eq!(git.provider, "github-git");
    assert_eq!(
        git.value,
        format!("Basic {}", base64(b"x-access-token:gh-env"))
    );
    assert!(c.for_host("example.com").is_none());

    let envs = c.placeholder_env();
    let get = |k: &str| envs.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let ph = get("ANTHROPIC_API_KEY").unwrap();
    assert!(ph.starts_with("sk-ant-api03-airlock-placeholder-"), "{ph}");
    assert_eq!(ph.len(), "sk-ant-api03-airlock-placeholder-".len() + 32);
    assert_eq!(get("GEMINI_API_KEY"), get("GOOGLE_API_KEY"));
    assert_eq!(get("GH_TOKEN"), get("GITHUB_TOKEN"));
    assert!(get("OPENAI_API_KEY").is_some());
    assert_eq!(c.placeholders().len(), 4, "one per secret");
    assert!(c.contains_placeholder(format!("x-api-key: {ph}").as_bytes()));
    assert_eq!(a.placeholder, ph);
    assert!(!c.contains_placeholder(b"sk-ant-api03-airlock-placeholder-"));
    // placeholders are random per sandbox
    let c2 = Credentials::resolve(&builtin_providers(), &st, env(&[])).unwrap();
    assert_ne!(c2.placeholders()[0], ph);
    // ...unless reused: another process agrees with the guest's environment
    let c3 = Credentials::resolve_with_placeholders(
        &builtin_providers(),
        &st,
        env(&[("ANTHROPIC_API_KEY", "from-env")]),
        &c.placeholder_map(),
    )
    .unwrap();
    assert_eq!(c3.placeholder_map()["anthropic"], ph);
    assert_eq!(
        c3.placeholder_map()["openai"],
        c.placeholder_map()["openai"]
    );
    assert_eq!(c2.provider_names(), vec!["anthropic", "openai"]);
}

#[test]
fn base64_known_answers() {
    assert_eq!(base64(b""), "");
    assert_eq!(base64(b"f"), "Zg==");
    assert_eq!(base64(b"fo"), "Zm8=");
    assert_eq!(base64(b"foo"), "Zm9v");
    assert_eq!(base64(b"foobar"), "Zm9vYmFy");
}
