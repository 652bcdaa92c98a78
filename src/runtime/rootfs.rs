//! Root filesystems of job containers: a fresh writable overlay layer over a
//! read-only lower (the host's root for the `host` image), made per job and
//! removed with it. Nothing a job writes reaches the lower layer.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::sys::mount::{mount_overlay, unmount_and_remove};

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
