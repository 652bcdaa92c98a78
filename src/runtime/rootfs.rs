//! Root filesystems of job containers: a fresh writable overlay layer over a
//! read-only lower (an image's layers; for the `host` image, a tree of the
//! job's own with overlays of the host's software directories, see
//! `hostroot.rs`), made per job and removed with it. Nothing a job writes
//! reaches a lower layer.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::hostroot::HostView;
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

    /// The `host` image's root (see [`HostView`]), made in `dir`; the
    /// agent's `private` paths in `/etc` are hidden too.
    pub fn host(dir: &Path, private: &[PathBuf]) -> io::Result<Rootfs> {
        let host = Path::new("/");
        let view = HostView::scan(host, private)?;
        let (skeleton, hiding) = (dir.join("skeleton"), dir.join("hidden"));
        view.write_skeleton(&skeleton)?;
        view.write_hiding_layer(&hiding)?;
        let rootfs = Rootfs::overlay(dir, &[&skeleton], None)?;
        // Unmounted and removed with `rootfs` if this fails.
        view.mount(host, rootfs.path(), &dir.join("layers"), &hiding)?;
        Ok(rootfs)
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
