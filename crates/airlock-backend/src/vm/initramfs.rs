//! The VM's initramfs, in two concatenated `newc` archives:
//! - the base (cached in `cache/initramfs/`, keyed by the content of the
//!   guest agent and the kernel version): `/init` (the static guest agent),
//!   the kernel modules it needs under `/lib/modules/` and their load order
//!   in `/airlock/modules` (dependencies first);
//! - per launch: `/airlock/config.json` (the `GuestConfig`),
//!   `/airlock/vm.conf` (root disk, workspaces, extra files; see
//!   airlock-guest's `vm` module) and `/airlock/files/N`.

use super::cpio::CpioWriter;
use super::{fnv64, Lock};
use crate::{BackendError, LaunchSpec};
use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Modules the guest loads (with their dependencies). Everything else the
/// agent needs (ext4, devtmpfs, ACPI, the serial console) is built into the
/// Debian cloud kernel.
pub const MODULES: &[&str] = &[
    "virtio_mmio",
    "virtio_blk",
    "virtiofs",
    "vmw_vsock_virtio_transport",
    "virtio_net",
    // For a template's Docker daemon (overlay2 storage); small.
    "overlay",
];

/// Modules a template's Docker daemon needs for its bridge network and
/// iptables (nft) rules. Shipped in the initramfs (`/airlock/modules.docker`)
/// and loaded by the agent in the background, only when the root has
/// dockerd, so they never delay readiness.
pub const DOCKER_MODULES: &[&str] = &[
    "bridge",
    "br_netfilter",
    "veth",
    "nf_tables",
    "nft_compat",
    "nft_chain_nat",
    "nft_masq",
    "xt_MASQUERADE",
    "xt_addrtype",
    "xt_conntrack",
    "xt_nat",
    "xt_tcpudp",
    "nf_conntrack_netlink",
];

fn io_err(step: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> BackendError {
    let path = path.to_path_buf();
    move |source| BackendError::Io { step, path, source }
}

/// Module name → file, for every `.ko` under `modules/kernel`.
fn module_index(dir: &Path, out: &mut HashMap<String, PathBuf>) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            module_index(&p, out);
        } else if let Some(n) = p.file_name().and_then(|n| n.to_str()) {
            if let Some(stem) = n.strip_suffix(".ko") {
                out.insert(stem.replace('-', "_"), p);
            }
        }
    }
}

/// The `depends=` field of a module's `.modinfo`.
pub fn module_depends(ko: &[u8]) -> Vec<String> {
    let key = b"depends=";
    let mut i = 0;
    while let Some(pos) = find(&ko[i..], key) {
        let at = i + pos;
        // A field starts after a NUL (or at the start of the section).
        if at == 0 || ko[at - 1] == 0 {
            let rest = &ko[at + key.len()..];
            let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
            return String::from_utf8_lossy(&rest[..end])
                .split(',')
                .filter(|s| !s.is_empty())
                .map(|s| s.replace('-', "_"))
                .collect();
        }
        i = at + 1;
    }
    Vec::new()
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// `wanted` and their dependencies, dependencies first.
pub fn resolve_modules(
    kernel_dir: &Path,
    wanted: &[&str],
) -> Result<Vec<(String, PathBuf)>, BackendError> {
    let mut index = HashMap::new();
    module_index(&kernel_dir.join("modules/kernel"), &mut index);
    let mut done = HashSet::new();
    let mut order = Vec::new();
    fn visit(
        name: &str,
        index: &HashMap<String, PathBuf>,
        done: &mut HashSet<String>,
        order: &mut Vec<(String, PathBuf)>,
        depth: usize,
    ) -> Result<(), BackendError> {
        if done.contains(name) || depth > 32 {
            return Ok(());
        }
        let path = index.get(name).ok_or_else(|| {
            BackendError::InvalidSpec(format!(
                "kernel module {name} not found in the guest kernel"
            ))
        })?;
        let data = fs::read(path).map_err(io_err("reading a kernel module", path))?;
        done.insert(name.to_string());
        for d in module_depends(&data) {
            visit(&d, index, done, order, depth + 1)?;
        }
        order.push((name.to_string(), path.clone()));
        Ok(())
    }
    for w in wanted {
        visit(w, &index, &mut done, &mut order, 0)?;
    }
    Ok(order)
}

/// Is this ELF executable statically linked (no `PT_INTERP`)?
fn is_static_elf(b: &[u8]) -> bool {
    if b.len() < 64 || &b[..4] != b"\x7fELF" || b[4] != 2 {
        return false;
    }
    let rd16 = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
    let mut phoff = [0u8; 8];
    phoff.copy_from_slice(&b[0x20..0x28]);
    let phoff = u64::from_le_bytes(phoff) as usize;
    let (size, num) = (rd16(0x36), rd16(0x38));
    (0..num).all(|i| {
        let o = phoff + i * size;
        o + 4 <= b.len() && u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]) != 3
    })
}

/// The cached base archive for this agent binary and kernel.
pub fn base(cache: &Path, kernel_dir: &Path, guest_binary: &Path) -> Result<PathBuf, BackendError> {
    let agent = fs::read(guest_binary).map_err(io_err("reading the guest agent", guest_binary))?;
    if !is_static_elf(&agent) {
        return Err(BackendError::InvalidSpec(format!(
            "{} is not a statically linked executable (build it with scripts/build-guest.sh)",
            guest_binary.display()
        )));
    }
    let kver = fs::read_to_string(kernel_dir.join("version")).unwrap_or_default();
    let mut key = agent.clone();
    key.extend_from_slice(kver.trim().as_bytes());
    key.extend_from_slice(MODULES.join(",").as_bytes());
    key.extend_from_slice(DOCKER_MODULES.join(",").as_bytes());
    let dir = cache.join("initramfs");
    fs::create_dir_all(&dir).map_err(io_err("creating the initramfs cache", &dir))?;
    let out = dir.join(format!("{:016x}.cpio", fnv64(&key)));
    if out.exists() {
        return Ok(out);
    }
    let _lock = Lock::take(&dir.join(".lock"))?;
    if out.exists() {
        return Ok(out);
    }
    let mods = resolve_modules(kernel_dir, MODULES)?;
    let tmp = out.with_extension("tmp");
    let f = fs::File::create(&tmp).map_err(io_err("writing the initramfs", &tmp))?;
    let mut w = CpioWriter::new(std::io::BufWriter::new(f));
    let wr = |r: std::io::Result<()>| r.map_err(io_err("writing the initramfs", &tmp));
    wr(w.file("init", 0o755, &agent))?;
    let mut list = String::new();
    for (name, path) in &mods {
        let data = fs::read(path).map_err(io_err("reading a kernel module", path))?;
        wr(w.file(&format!("lib/modules/{name}.ko"), 0o644, &data))?;
        list.push_str(&format!("/lib/modules/{name}.ko\n"));
    }
    wr(w.file("airlock/modules", 0o644, list.as_bytes()))?;
    let boot: HashSet<&str> = mods.iter().map(|(n, _)| n.as_str()).collect();
    let mut list = String::new();
    for (name, path) in resolve_modules(kernel_dir, DOCKER_MODULES)? {
        if boot.contains(name.as_str()) {
            continue;
        }
        let data = fs::read(&path).map_err(io_err("reading a kernel module", &path))?;
        wr(w.file(&format!("lib/modules/{name}.ko"), 0o644, &data))?;
        list.push_str(&format!("/lib/modules/{name}.ko\n"));
    }
    wr(w.file("airlock/modules.docker", 0o644, list.as_bytes()))?;
    for d in ["dev", "proc", "sys", "newroot"] {
        wr(w.dir(d))?;
    }
    wr(w.finish().map(drop))?;
    fs::rename(&tmp, &out).map_err(io_err("installing the initramfs", &out))?;
    Ok(out)
}

/// The `vm.conf` the guest agent reads. With `guest_ro`, `:ro` workspaces
/// are also mounted read-only by the guest (virtiofsd enforces it anyway).
/// With `net`, the guest configures its NIC as `eth0` (`net eth0`).
pub fn vm_conf(spec: &LaunchSpec, guest_ro: bool, net: bool) -> String {
    let mut s = String::from("root\t/dev/vda\n");
    if net {
        s.push_str(&format!("net\t{}\n", crate::net::GUEST_IFNAME));
    }
    for (i, w) in spec.workspaces.iter().enumerate() {
        let mode = if w.read_only && guest_ro { "ro" } else { "rw" };
        s.push_str(&format!("ws\tws{i}\t{}\t{mode}\n", w.path.display()));
    }
    for (i, (p, _)) in spec.extra_files.iter().enumerate() {
        s.push_str(&format!("file\t{i}\t{}\n", p.display()));
    }
    s.push_str(&format!(
        "port\t{}\nshutdown-port\t{}\nready-port\t{}\n",
        super::CONTROL_PORT,
        super::SHUTDOWN_PORT,
        super::READY_PORT
    ));
    s
}

/// Write `out` = base archive + this launch's archive.
pub fn per_launch(
    base: &Path,
    out: &Path,
    spec: &LaunchSpec,
    guest_ro: bool,
    net: bool,
) -> Result<(), BackendError> {
    for (p, _) in &spec.extra_files {
        let s = p.to_string_lossy();
        if !p.is_absolute() || s.contains(['\t', '\n']) {
            return Err(BackendError::InvalidSpec(format!(
                "extra file path {s:?} must be absolute and free of tabs and newlines"
            )));
        }
    }
    fs::copy(base, out).map_err(io_err("copying the initramfs", out))?;
    let config = serde_json::to_vec(&spec.guest_config)
        .map_err(|e| BackendError::InvalidSpec(format!("guest config: {e}")))?;
    let mut buf = Vec::new();
    {
        let mut w = CpioWriter::new(&mut buf);
        let r = (|| {
            w.file("airlock/config.json", 0o600, &config)?;
            w.file(
                "airlock/vm.conf",
                0o600,
                vm_conf(spec, guest_ro, net).as_bytes(),
            )?;
            for (i, (_, data)) in spec.extra_files.iter().enumerate() {
                w.file(&format!("airlock/files/{i}"), 0o644, data)?;
            }
            Ok::<_, std::io::Error>(())
        })();
        r.and_then(|_| w.finish().map(drop))
            .map_err(io_err("writing the initramfs", out))?;
    }
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(out)
        .map_err(io_err("writing the initramfs", out))?;
    f.write_all(&buf)
        .map_err(io_err("writing the initramfs", out))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modinfo_depends() {
        let ko = b"\x7fELF junk\0license=GPL\0depends=virtio,virtio_ring\0name=virtio_blk\0";
        assert_eq!(module_depends(ko), vec!["virtio", "virtio_ring"]);
        let none = b"xx\0depends=\0name=virtio\0";
        assert!(module_depends(none).is_empty());
        // "softdepends=" is not "depends=".
        let soft = b"\0softdep=pre: crc32c\0xdepends=a\0depends=b\0";
        assert_eq!(module_depends(soft), vec!["b"]);
    }

    #[test]
    fn host_binaries_are_not_static() {
        let sh = fs::read("/bin/sh").unwrap();
        assert!(!is_static_elf(&sh));
        assert!(!is_static_elf(b"#!/bin/sh\n"));
    }
}
