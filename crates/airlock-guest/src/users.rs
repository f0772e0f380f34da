//! `/etc/passwd` and `/etc/group` parsing, done by hand: the agent is linked
//! statically and must not go through NSS.

use std::path::Path;

/// One `/etc/passwd` entry (the fields the agent uses).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswdEntry {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: String,
}

/// One `/etc/group` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupEntry {
    pub name: String,
    pub gid: u32,
    pub members: Vec<String>,
}

/// Who a process runs as, resolved from an exec request's `user` field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// User name (the numeric uid as text when the uid has no entry).
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups, primary group first.
    pub groups: Vec<u32>,
    pub home: String,
}

/// Parse passwd(5) text; malformed lines and comments are skipped.
pub fn parse_passwd(text: &str) -> Vec<PasswdEntry> {
    text.lines()
        .filter_map(|line| {
            if line.starts_with('#') {
                return None;
            }
            let f: Vec<&str> = line.split(':').collect();
            if f.len() < 7 || f[0].is_empty() {
                return None;
            }
            Some(PasswdEntry {
                name: f[0].to_string(),
                uid: f[2].parse().ok()?,
                gid: f[3].parse().ok()?,
                home: f[5].to_string(),
            })
        })
        .collect()
}

/// Parse group(5) text; malformed lines and comments are skipped.
pub fn parse_group(text: &str) -> Vec<GroupEntry> {
    text.lines()
        .filter_map(|line| {
            if line.starts_with('#') {
                return None;
            }
            let f: Vec<&str> = line.split(':').collect();
            if f.len() < 4 || f[0].is_empty() {
                return None;
            }
            Some(GroupEntry {
                name: f[0].to_string(),
                gid: f[2].parse().ok()?,
                members: f[3]
                    .split(',')
                    .map(str::trim)
                    .filter(|m| !m.is_empty())
                    .map(str::to_string)
                    .collect(),
            })
        })
        .collect()
}

/// Resolve `spec` (`name`, `uid`, `name:group`, `uid:gid`; `None` = root)
/// against the given databases. Unknown numeric ids are accepted as they are
/// (group 0, home `/`), as Docker does; unknown names are an error.
pub fn resolve(
    spec: Option<&str>,
    passwd: &[PasswdEntry],
    group: &[GroupEntry],
) -> Result<Identity, String> {
    let spec = spec.map(str::trim).filter(|s| !s.is_empty()).unwrap_or("0");
    let (user, grp) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let entry = match user.parse::<u32>() {
        Ok(uid) => passwd
            .iter()
            .find(|e| e.uid == uid)
            .cloned()
            .unwrap_or(PasswdEntry {
                name: user.to_string(),
                uid,
                gid: 0,
                home: "/".to_string(),
            }),
        Err(_) => passwd
            .iter()
            .find(|e| e.name == user)
            .cloned()
            .ok_or_else(|| format!("unknown user '{user}': no such entry in /etc/passwd"))?,
    };
    let gid = match grp {
        None => entry.gid,
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => group
                .iter()
                .find(|e| e.name == g)
                .map(|e| e.gid)
                .ok_or_else(|| format!("unknown group '{g}': no such entry in /etc/group"))?,
        },
    };
    let mut groups = vec![gid];
    // An explicit group replaces the supplementary list, as with Docker.
    if grp.is_none() {
        for g in group {
            if g.members.contains(&entry.name) && !groups.contains(&g.gid) {
                groups.push(g.gid);
            }
        }
    }
    Ok(Identity {
        name: entry.name,
        uid: entry.uid,
        gid,
        groups,
        home: if entry.home.is_empty() {
            "/".into()
        } else {
            entry.home
        },
    })
}

/// Read the sandbox's databases (missing files count as empty) and resolve.
pub fn lookup(spec: Option<&str>, root: &Path) -> Result<Identity, String> {
    let read = |p: &str| std::fs::read_to_string(root.join(p)).unwrap_or_default();
    resolve(
        spec,
        &parse_passwd(&read("etc/passwd")),
        &parse_group(&read("etc/group")),
    )
}

/// Whether `id` is mapped in a user namespace id map (`/proc/self/uid_map`
/// format: `inside outside count` per line).
pub fn id_mapped(map: &str, id: u32) -> bool {
    map.lines().any(|l| {
        let f: Vec<u64> = l
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        f.len() == 3 && (f[0]..f[0] + f[2]).contains(&(id as u64))
    })
}

/// Check `id` against our user namespace's maps (readable ones only), so an
/// unmapped user gets a clear message before anything is forked.
pub fn check_mapped(id: &Identity, spec: &str) -> Result<(), String> {
    let map = |p: &str| std::fs::read_to_string(p).ok();
    if let Some(m) = map("/proc/self/uid_map") {
        if !id_mapped(&m, id.uid) {
            return Err(format!(
                "user '{spec}' (uid {}) is not mapped in this sandbox",
                id.uid
            ));
        }
    }
    if let Some(m) = map("/proc/self/gid_map") {
        if let Some(g) = id.groups.iter().find(|g| !id_mapped(&m, **g)) {
            return Err(format!(
                "group gid {g} of user '{spec}' is not mapped in this sandbox"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\n\
        # comment\n\
        daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n\
        broken line\n\
        bad:x:notanumber:1::/:/bin/sh\n\
        dev:x:1000:1000:Dev,,,:/home/dev:/bin/bash\n\
        nohome:x:1001:1001::::\n";
    const GROUP: &str = "root:x:0:\n\
        sudo:x:27:dev\n\
        docker:x:999:other, dev\n\
        dev:x:1000:\n\
        junk\n";

    fn db() -> (Vec<PasswdEntry>, Vec<GroupEntry>) {
        (parse_passwd(PASSWD), parse_group(GROUP))
    }

    #[test]
    fn parses_passwd_and_skips_junk() {
        let p = parse_passwd(PASSWD);
        let names: Vec<_> = p.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["root", "daemon", "dev", "nohome"]);
        assert_eq!(
            p[2],
            PasswdEntry {
                name: "dev".into(),
                uid: 1000,
                gid: 1000,
                home: "/home/dev".into()
            }
        );
    }

    #[test]
    fn id_maps() {
        let host = "         0          0 4294967295\n";
        assert!(id_mapped(host, 0) && id_mapped(host, 65534));
        let rootless = "         0       1000          1\n         1     100000      65536\n";
        assert!(id_mapped(rootless, 0));
        assert!(id_mapped(rootless, 65536));
        assert!(!id_mapped(rootless, 65537));
        assert!(!id_mapped("0 0 1\n", 1000));
        assert!(!id_mapped("", 0));
    }

    #[test]
    fn parses_group_members() {
        let g = parse_group(GROUP);
        assert_eq!(g.len(), 4);
        assert_eq!(g[2].members, ["other", "dev"]);
        assert!(g[0].members.is_empty());
    }

    #[test]
    fn resolves_names_ids_and_groups() {
        let (p, g) = db();
        let root = resolve(None, &p, &g).unwrap();
        assert_eq!((root.uid, root.gid, root.home.as_str()), (0, 0, "/root"));
        assert_eq!(root.groups, [0]);

        let dev = resolve(Some("dev"), &p, &g).unwrap();
        assert_eq!((dev.uid, dev.gid), (1000, 1000));
        assert_eq!(dev.groups, [1000, 27, 999]);

        let by_uid = resolve(Some("1000"), &p, &g).unwrap();
        assert_eq!(by_uid, dev);

        let unknown_uid = resolve(Some("4242"), &p, &g).unwrap();
        assert_eq!(
            (
                unknown_uid.name.as_str(),
                unknown_uid.gid,
                unknown_uid.home.as_str()
            ),
            ("4242", 0, "/")
        );

        let with_group = resolve(Some("dev:docker"), &p, &g).unwrap();
        assert_eq!(
            (with_group.gid, with_group.groups.clone()),
            (999, vec![999])
        );
        assert_eq!(resolve(Some("dev:5"), &p, &g).unwrap().gid, 5);

        assert_eq!(resolve(Some("nohome"), &p, &g).unwrap().home, "/");
        assert!(resolve(Some("nobody-here"), &p, &g)
            .unwrap_err()
            .contains("unknown user"));
        assert!(resolve(Some("dev:nogroup"), &p, &g)
            .unwrap_err()
            .contains("unknown group"));
    }
}
