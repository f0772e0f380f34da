use super::*;
use crate::{now_rfc3339, write_meta, DEFAULT_MIRROR};
use std::os::unix::fs::FileTypeExt;

fn fake(store: &TemplateStore, name: &str, parent: Option<&Template>, run: &[&str]) -> Template {
    let dir = store.dir(name);
    fs::create_dir_all(dir.join("rootfs/usr/bin")).unwrap();
    let meta = Meta {
        version: META_VERSION,
        name: name.into(),
        suite: "trixie".into(),
        mirror: DEFAULT_MIRROR.into(),
        packages: vec![],
        created: now_rfc3339(),
        size_bytes: 1,
        id_shifted: false,
        parent: parent.map(|p| p.name.clone()),
        parent_created: parent.map(|p| p.created.clone()),
        agent_package: None,
        agent_version: None,
        run: run.iter().map(|s| s.to_string()).collect(),
        saved_from: None,
    };
    write_meta(&dir.join("meta.json"), &meta).unwrap();
    store.get(name).unwrap().unwrap()
}

#[test]
fn build_is_cached_by_parent_build_and_commands() {
    let d = tempfile::tempdir().unwrap();
    let store = TemplateStore::new(d.path().join("t"));
    let base = fake(&store, BASE, None, &[]);
    let tools = fake(&store, "tools", Some(&base), &["echo v1 > /opt/marker"]);
    let cmds = vec!["echo v1 > /opt/marker".to_string()];
    let mut steps = Vec::new();
    let b = store
        .build_custom("tools", BASE, &cmds, false, &mut |p| steps.push(p))
        .unwrap();
    assert!(!b.rebuilt);
    assert_eq!(b.template, tools);
    assert_eq!(steps.last(), Some(&Progress::Done));
    assert!(store.is_current(&tools).unwrap());
    assert!(store.custom_is_built("tools", BASE, &cmds).unwrap());
    assert!(!store.custom_is_built("tools", BASE, &[]).unwrap());
    assert_eq!(store.chain(&tools).unwrap(), vec!["tools", BASE]);
    assert_eq!(
        store.layers(&tools).unwrap(),
        vec![tools.rootfs.clone(), base.rootfs.clone()]
    );
    // A rebuilt parent makes it outdated (and a build would run again).
    fake(&store, BASE, None, &[]);
    let mut base2 = store.get(BASE).unwrap().unwrap();
    base2.created = "2099-01-01T00:00:00Z".into();
    let mut m = store.read_meta(BASE).unwrap();
    m.created = base2.created.clone();
    write_meta(&store.dir(BASE).join("meta.json"), &m).unwrap();
    assert!(!store.is_current(&tools).unwrap());
    assert!(!store.same_inputs(&tools, &base2, &cmds).unwrap());
    // Other commands: not the same inputs either.
    let mut m = store.read_meta("tools").unwrap();
    m.parent_created = Some(base2.created.clone());
    write_meta(&store.dir("tools").join("meta.json"), &m).unwrap();
    assert!(store.same_inputs(&tools, &base2, &cmds).unwrap());
    assert!(!store
        .same_inputs(&tools, &base2, &["echo v2 > /opt/marker".to_string()])
        .unwrap());
}

#[test]
fn build_refuses_bad_requests() {
    let d = tempfile::tempdir().unwrap();
    let store = TemplateStore::new(d.path().join("t"));
    let base = fake(&store, BASE, None, &[]);
    let a = fake(&store, "a", Some(&base), &["true"]);
    fake(&store, "b", Some(&a), &["true"]);
    let cmds = vec!["true".to_string()];
    let e = |r: Result<Built, TemplateError>| r.unwrap_err();
    assert!(matches!(
        e(store.build_custom(BASE, "a", &cmds, false, &mut |_| {})),
        TemplateError::Reserved(_)
    ));
    assert!(matches!(
        e(store.build_custom("claude", BASE, &cmds, false, &mut |_| {})),
        TemplateError::Reserved(_)
    ));
    assert!(matches!(
        e(store.build_custom("x", "missing", &cmds, false, &mut |_| {})),
        TemplateError::NotFound(_)
    ));
    assert!(matches!(
        e(store.build_custom("x", BASE, &[], false, &mut |_| {})),
        TemplateError::NoCommands
    ));
    assert!(matches!(
        e(store.build_custom("a", "b", &cmds, false, &mut |_| {})),
        TemplateError::Cycle { .. }
    ));
    assert!(matches!(
        e(store.build_custom("a", "a", &cmds, false, &mut |_| {})),
        TemplateError::Cycle { .. }
    ));
    // A saved template is not replaced by a build without --force.
    let mut m = store.read_meta("a").unwrap();
    m.run.clear();
    m.saved_from = Some("sb".into());
    write_meta(&store.dir("a").join("meta.json"), &m).unwrap();
    assert!(matches!(
        e(store.build_custom("a", BASE, &cmds, false, &mut |_| {})),
        TemplateError::Exists(_)
    ));
}

#[test]
fn failed_build_keeps_the_old_template() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let store = TemplateStore::new(d.path().join("t"));
    // No /bin/sh inside the fake base: the command cannot run.
    let base = fake(&store, BASE, None, &[]);
    let old = fake(&store, "tools", Some(&base), &["true"]);
    let r = store.build_custom("tools", BASE, &["false".to_string()], false, &mut |_| {});
    assert!(r.is_err(), "{r:?}");
    assert_eq!(store.get("tools").unwrap().unwrap(), old);
    let left: Vec<_> = fs::read_dir(store.root())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.contains(".tmp-"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// A v2 `security.capability` value granting cap_net_raw (bit 13) permitted+effective.
const CAP_NET_RAW: [u8; 20] = [
    0x01, 0x00, 0x00, 0x02, 0x00, 0x20, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00,
];

fn set_xattr(p: &Path, name: &str, val: &[u8]) -> bool {
    let c = cpath(p).unwrap();
    let n = CString::new(name).unwrap();
    // SAFETY: valid strings and buffer.
    unsafe { libc::lsetxattr(c.as_ptr(), n.as_ptr(), val.as_ptr().cast(), val.len(), 0) == 0 }
}

fn get_xattr(p: &Path, name: &str) -> Option<Vec<u8>> {
    let c = cpath(p).unwrap();
    let n = CString::new(name).unwrap();
    let mut buf = vec![0u8; 256];
    // SAFETY: valid strings and buffer.
    let r = unsafe { libc::lgetxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    (r >= 0).then(|| {
        buf.truncate(r as usize);
        buf
    })
}

#[test]
fn copy_keeps_layer_semantics_and_drops_runtime_files() {
    let d = tempfile::tempdir_in("/var/tmp").unwrap();
    let up = d.path().join("upper");
    let w = |rel: &str, content: &str| {
        let p = up.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, content).unwrap();
    };
    w("root/kept", "state\n");
    w("etc/hosts", "1.2.3.4 x\n");
    w("etc/hostname", "sb\n");
    w("etc/airlock/ca.pem", "CA");
    w("etc/ssl/certs/ca-certificates.crt", "BUNDLE+CA");
    w("usr/local/share/ca-certificates/airlock-ca.crt", "CA");
    w("etc/motd", "hello\n");
    fs::create_dir_all(up.join("var/lib/apt/lists/partial")).unwrap();
    fs::create_dir_all(up.join("home/me/proj")).unwrap();
    fs::create_dir_all(up.join("home/me/full")).unwrap();
    w("home/me/full/f", "x");
    fs::set_permissions(up.join("root/kept"), fs::Permissions::from_mode(0o4750)).unwrap();
    fs::hard_link(up.join("root/kept"), up.join("root/kept2")).unwrap();
    std::os::unix::fs::symlink("/etc/motd", up.join("root/link")).unwrap();
    fs::create_dir_all(up.join("opt/opaque")).unwrap();
    fs::create_dir_all(up.join("srv/empty")).unwrap();
    let user_x = set_xattr(&up.join("opt/opaque"), "user.overlay.opaque", b"y");
    let root = is_root();
    if root {
        assert!(set_xattr(
            &up.join("opt/opaque"),
            "trusted.overlay.opaque",
            b"y"
        ));
        std::os::unix::fs::lchown(up.join("root/kept"), Some(1_000_033), Some(1_000_033)).unwrap();
        fs::set_permissions(up.join("root/kept"), fs::Permissions::from_mode(0o4750)).unwrap();
    }
    let caps = root && set_xattr(&up.join("etc/motd"), "security.capability", &CAP_NET_RAW);
    // A whiteout: the sandbox deleted /etc/issue.
    // overlayfs marks copied-up directories; that alone keeps nothing.
    set_xattr(&up.join("var/lib"), "user.overlay.impure", b"y");
    let whiteout = mknod(&up.join("etc/issue"), libc::S_IFCHR | 0o600, 0).is_ok();
    let before = fs::read_dir(up.join("etc")).unwrap().count();

    let dst = d.path().join("rootfs");
    fs::create_dir(&dst).unwrap();
    let ex = CopyOptions {
        always: RUNTIME_PATHS.iter().map(PathBuf::from).collect(),
        if_empty: vec![PathBuf::from("home/me/proj"), PathBuf::from("home/me/full")],
        drop_privileges: false,
    };
    copy_layer(&up, &dst, &ex).unwrap();
    // Copied, not moved.
    assert_eq!(fs::read_dir(up.join("etc")).unwrap().count(), before);
    assert_eq!(
        fs::read_to_string(dst.join("root/kept")).unwrap(),
        "state\n"
    );
    assert_eq!(fs::read_to_string(dst.join("etc/motd")).unwrap(), "hello\n");
    for gone in [
        "etc/hosts",
        "etc/hostname",
        "etc/airlock",
        "etc/ssl/certs/ca-certificates.crt",
        "usr/local/share/ca-certificates/airlock-ca.crt",
        "var/lib/apt/lists/partial",
        "home/me/proj",
    ] {
        assert!(
            fs::symlink_metadata(dst.join(gone)).is_err(),
            "{gone} copied"
        );
    }
    // Parents left empty by what was left out are dropped; others kept.
    assert!(!dst.join("var").exists());
    assert!(!dst.join("home/me/proj").exists());
    assert!(!dst.join("usr").exists());
    assert!(!dst.join("etc/ssl").exists());
    assert!(
        dst.join("srv/empty").is_dir(),
        "an empty directory of the sandbox's is kept"
    );
    assert!(dst.join("opt/opaque").is_dir());
    assert!(dst.join("home/me/full/f").is_file(), "non-empty kept");
    let km = fs::metadata(dst.join("root/kept")).unwrap();
    assert_eq!(km.mode() & 0o7777, 0o4750);
    assert_eq!(
        km.ino(),
        fs::metadata(dst.join("root/kept2")).unwrap().ino()
    );
    assert_eq!(
        km.mtime(),
        fs::metadata(up.join("root/kept")).unwrap().mtime()
    );
    assert_eq!(
        fs::read_link(dst.join("root/link")).unwrap(),
        Path::new("/etc/motd")
    );
    if user_x {
        assert_eq!(
            get_xattr(&dst.join("opt/opaque"), "user.overlay.opaque").as_deref(),
            Some(&b"y"[..])
        );
    }
    if root {
        assert_eq!(km.uid(), 1_000_033);
        assert_eq!(
            get_xattr(&dst.join("opt/opaque"), "trusted.overlay.opaque").as_deref(),
            Some(&b"y"[..])
        );
    }
    // Saving a sandbox drops set-id bits and file capabilities.
    let dst2 = d.path().join("rootfs2");
    fs::create_dir(&dst2).unwrap();
    copy_layer(
        &up,
        &dst2,
        &CopyOptions {
            drop_privileges: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(
        fs::metadata(dst2.join("root/kept")).unwrap().mode() & 0o7777,
        0o750
    );
    if caps {
        assert!(get_xattr(&dst.join("etc/motd"), "security.capability").is_some());
        assert!(get_xattr(&dst2.join("etc/motd"), "security.capability").is_none());
    }
    if whiteout {
        let m = fs::symlink_metadata(dst.join("etc/issue")).unwrap();
        assert!(m.file_type().is_char_device());
        assert_eq!(m.rdev(), 0);
    }
}

#[test]
fn save_layer_records_parent_and_source() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let d = tempfile::tempdir_in("/var/tmp").unwrap();
    let store = TemplateStore::new(d.path().join("t"));
    let base = fake(&store, BASE, None, &[]);
    let up = d.path().join("upper");
    fs::create_dir_all(up.join("root")).unwrap();
    fs::write(up.join("root/kept"), "state").unwrap();
    fs::create_dir_all(up.join("etc")).unwrap();
    fs::write(up.join("etc/hostname"), "sb\n").unwrap();
    let t = store
        .save_layer("saved", BASE, &up, "sb", &[], false, &mut |_| {})
        .unwrap();
    assert_eq!(t.parent.as_deref(), Some(BASE));
    assert_eq!(t.saved_from.as_deref(), Some("sb"));
    assert!(t.run.is_empty());
    assert_eq!(
        fs::read_to_string(t.rootfs.join("root/kept")).unwrap(),
        "state"
    );
    assert!(!t.rootfs.join("etc/hostname").exists());
    assert!(up.join("root/kept").exists());
    assert_eq!(
        store.layers(&t).unwrap(),
        vec![t.rootfs.clone(), base.rootfs.clone()]
    );
    assert!(store.is_current(&t).unwrap());
    assert!(matches!(
        store.save_layer("saved", BASE, &up, "sb", &[], false, &mut |_| {}),
        Err(TemplateError::Exists(_))
    ));
    store
        .save_layer("saved", BASE, &up, "sb2", &[], true, &mut |_| {})
        .unwrap();
    assert_eq!(
        store.get("saved").unwrap().unwrap().saved_from.as_deref(),
        Some("sb2")
    );
    assert!(matches!(
        store.save_layer("saved2", "nope", &up, "sb", &[], false, &mut |_| {}),
        Err(TemplateError::NotFound(_))
    ));
}
