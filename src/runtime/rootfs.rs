//! Root filesystems of job containers: a fresh writable overlay layer over a
//! read-only lower (the host's root for the `host` image), made per job and
//! removed with it. Nothing a job writes reaches the lower layer.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags};

/// A mounted overlay; unmounted and removed on drop.
#[derive(Debug)]
pub struct Rootfs {
    dir: PathBuf,
    mountpoint: PathBuf,
}

impl Rootfs {
    /// Mounts `lower` (read-only, top first) under a new writable layer in
    /// `dir`, whose root belongs to `owner` (the container's root as the
    /// host sees it; host root when `None`).
    pub fn overlay(dir: &Path, lower: &[&Path], owner: Option<(u32, u32)>) -> io::Result<Rootfs> {
        let upper = dir.join("upper");
        let work = dir.join("work");
        let mountpoint = dir.join("rootfs");
        for d in [&upper, &work, &mountpoint] {
            fs::create_dir_all(d)?;
        }
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&upper, Some(uid), Some(gid))?;
        }
        mount_overlay(&mountpoint, lower, &upper, &work).map_err(|e| {
            io::Error::other(format!(
                "cannot mount the overlay root at {}: {e}",
                mountpoint.display()
            ))
        })?;
        Ok(Rootfs {
            dir: dir.to_path_buf(),
            mountpoint,
        })
    }

    pub fn path(&self) -> &Path {
        &self.mountpoint
    }
}

impl Drop for Rootfs {
    fn drop(&mut self) {
        if let Err(e) = unmount_and_remove(&self.mountpoint, &self.dir) {
            tracing::error!(path = %self.dir.display(), error = %e, "failed to remove a container root filesystem");
        }
    }
}

/// Mounts an overlay of `lower` (read-only, top first) under `upper` (with
/// its `work` directory) at `target`.
pub fn mount_overlay(target: &Path, lower: &[&Path], upper: &Path, work: &Path) -> nix::Result<()> {
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
        MsFlags::empty(),
        Some(data.as_str()),
    )
}

/// Lazily unmounts whatever is mounted at or under `mountpoint`, then
/// removes `dir` (what a job wrote: it may take long, so an async runtime's
/// worker hands its other tasks on first).
pub fn unmount_and_remove(mountpoint: &Path, dir: &Path) -> io::Result<()> {
    super::may_block(|| {
        for m in mounts_under(mountpoint)?.into_iter().rev() {
            let _ = nix::mount::umount2(&m, MntFlags::MNT_DETACH);
        }
        match fs::remove_dir_all(dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    })
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
