//! Root disks: one read-only ext4 image per template (cached, shared by all
//! sandboxes) and one qcow2 copy-on-write overlay per sandbox in its layer
//! directory.

use super::{fnv64, run_tool, Lock};
use crate::BackendError;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Owners shifted by the template store for the namespace backend's uid map
/// (airlock-template `ID_SHIFT_BASE`, `ID_SHIFT_RANGE`): inside `n` is host
/// `BASE + n`. The VM sees the image's owners as they are, so they are
/// shifted back.
const ID_SHIFT_BASE: u32 = 1_000_000;
const ID_SHIFT_RANGE: u32 = 65_536;

/// Virtual size of the root disk; the image file is sparse.
const DISK_SIZE_GIB: u64 = 16;

/// Build (once) the ext4 image of `rootfs` under `cache/rootfs/`. The key is
/// the template path and the modification times of the rootfs and its
/// `meta.json`, so a rebuilt template gets a new image.
pub fn base_image(cache: &Path, rootfs: &Path) -> Result<PathBuf, BackendError> {
    let io = |step: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| BackendError::Io { step, path, source }
    };
    let meta = fs::metadata(rootfs).map_err(io("template rootfs", rootfs))?;
    let meta_json = rootfs.parent().map(|p| p.join("meta.json"));
    let json_mtime = meta_json
        .as_ref()
        .and_then(|p| fs::metadata(p).ok())
        .map(|m| (m.mtime(), m.mtime_nsec()))
        .unwrap_or_default();
    let key = format!(
        "{}\0{}.{}\0{}.{}",
        rootfs.display(),
        meta.mtime(),
        meta.mtime_nsec(),
        json_mtime.0,
        json_mtime.1
    );
    let dir = cache.join("rootfs");
    fs::create_dir_all(&dir).map_err(io("creating the image cache", &dir))?;
    let img = dir.join(format!("{:016x}.ext4", fnv64(key.as_bytes())));
    if img.exists() {
        return Ok(img);
    }
    let _lock = Lock::take(&dir.join(".lock"))?;
    if img.exists() {
        return Ok(img);
    }
    let tmp = img.with_extension("ext4.tmp");
    let _ = fs::remove_file(&tmp);
    let mut mkfs = Command::new("mkfs.ext4");
    mkfs.args([
        "-q",
        "-F",
        "-t",
        "ext4",
        "-L",
        "airlock-root",
        "-E",
        "root_owner=0:0",
    ])
    .arg("-d")
    .arg(rootfs)
    .arg(&tmp)
    .arg(format!("{DISK_SIZE_GIB}G"));
    run_tool(&mut mkfs, "building the root disk image (mkfs.ext4 -d)")?;

    // Shift owners back: few files are owned by non-root users in a base
    // system, so one debugfs script fixes them all.
    let mut script = String::new();
    collect_shifted(rootfs, rootfs, &mut script)?;
    if !script.is_empty() {
        let sf = img.with_extension("debugfs");
        fs::write(&sf, &script).map_err(io("writing the debugfs script", &sf))?;
        let mut dbg = Command::new("debugfs");
        dbg.arg("-w").arg("-f").arg(&sf).arg(&tmp);
        let r = run_tool(&mut dbg, "shifting owners back in the root image (debugfs)");
        let _ = fs::remove_file(&sf);
        r?;
    }
    // Shared by every sandbox's overlay: never written again.
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o444))
        .map_err(io("protecting the root image", &tmp))?;
    fs::rename(&tmp, &img).map_err(io("installing the root image", &img))?;
    Ok(img)
}

fn unshift(id: u32) -> Option<u32> {
    (id > ID_SHIFT_BASE && id <= ID_SHIFT_BASE + ID_SHIFT_RANGE).then(|| id - ID_SHIFT_BASE)
}

fn collect_shifted(root: &Path, dir: &Path, out: &mut String) -> Result<(), BackendError> {
    let rd = fs::read_dir(dir).map_err(|source| BackendError::Io {
        step: "reading the template",
        path: dir.to_path_buf(),
        source,
    })?;
    for e in rd.flatten() {
        let Ok(m) = e.metadata() else { continue };
        let p = e.path();
        let rel = Path::new("/").join(p.strip_prefix(root).unwrap_or(&p));
        let quoted = format!("\"{}\"", rel.display());
        if let Some(u) = unshift(m.uid()) {
            out.push_str(&format!("sif {quoted} uid {u}\n"));
        }
        if let Some(g) = unshift(m.gid()) {
            out.push_str(&format!("sif {quoted} gid {g}\n"));
        }
        if m.is_dir() {
            collect_shifted(root, &p, out)?;
        }
    }
    Ok(())
}

/// The sandbox's copy-on-write layer: `layer_dir/root.qcow2` backed by
/// `base` (created on first launch, kept across stop/start).
pub fn overlay(layer_dir: &Path, base: &Path) -> Result<PathBuf, BackendError> {
    let disk = layer_dir.join("root.qcow2");
    if disk.exists() {
        return Ok(disk);
    }
    fs::create_dir_all(layer_dir).map_err(|source| BackendError::Io {
        step: "creating the layer directory",
        path: layer_dir.to_path_buf(),
        source,
    })?;
    let tmp = layer_dir.join("root.qcow2.tmp");
    let mut c = Command::new("qemu-img");
    c.args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(base)
        .arg(&tmp);
    run_tool(
        &mut c,
        "creating the sandbox's disk overlay (qemu-img create)",
    )?;
    fs::rename(&tmp, &disk).map_err(|source| BackendError::Io {
        step: "installing the disk overlay",
        path: disk.clone(),
        source,
    })?;
    Ok(disk)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unshift_range() {
        assert_eq!(unshift(0), None);
        assert_eq!(unshift(1000), None);
        assert_eq!(unshift(ID_SHIFT_BASE), None);
        assert_eq!(unshift(ID_SHIFT_BASE + 42), Some(42));
        assert_eq!(
            unshift(ID_SHIFT_BASE + ID_SHIFT_RANGE),
            Some(ID_SHIFT_RANGE)
        );
        assert_eq!(unshift(ID_SHIFT_BASE + ID_SHIFT_RANGE + 1), None);
    }
}
