//! Mounts: overlays, and unmounting whatever is mounted under a directory
//! before it is removed.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags};

/// Mounts an overlay of `lower` (read-only, top first) under `upper` (with
/// its `work` directory) at `target`.
pub fn mount_overlay(target: &Path, lower: &[&Path], upper: &Path, work: &Path) -> nix::Result<()> {
    mount_overlay_with(target, lower, upper, work, MsFlags::empty())
}

/// [`mount_overlay`] with mount flags (`MS_NOSUID`, `MS_NODEV`, ...).
pub fn mount_overlay_with(
    target: &Path,
    lower: &[&Path],
    upper: &Path,
    work: &Path,
    flags: MsFlags,
) -> nix::Result<()> {
    let lowerdirs: Vec<String> = lower
        .iter()
        .map(|p| p.to_string_lossy().replace(':', "\\:"))
        .collect();
    let data = format!(
        "lowerdir={},upperdir={},workdir={}",
        lowerdirs.join(":"),
        upper.display(),
        work.display()
    );
    nix::mount::mount(
        Some("overlay"),
        target,
        Some("overlay"),
        flags,
        Some(data.as_str()),
    )
}

/// Lazily unmounts whatever is mounted at or under `mountpoint`, then
/// removes `dir`.
pub fn unmount_and_remove(mountpoint: &Path, dir: &Path) -> io::Result<()> {
    for m in mounts_under(mountpoint)?.into_iter().rev() {
        let _ = nix::mount::umount2(&m, MntFlags::MNT_DETACH);
    }
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Mount points at or under `path`, from /proc/self/mountinfo, in mount order.
pub fn mounts_under(path: &Path) -> io::Result<Vec<PathBuf>> {
    let info = fs::read_to_string("/proc/self/mountinfo")?;
    Ok(info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mountinfo)
        .map(PathBuf::from)
        .filter(|p| p.starts_with(path))
        .collect())
}

fn unescape_mountinfo(s: &str) -> String {
    // Spaces, tabs, newlines and backslashes appear as \ooo octal escapes.
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
