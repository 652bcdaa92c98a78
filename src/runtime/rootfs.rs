//! Root filesystems of job containers: a fresh writable overlay layer over a
//! read-only lower (the host's root for the `host` image), made per job and
//! removed with it. Nothing a job writes reaches the lower layer.
//!
//! In a user namespace, an image's layers (unpacked once, with the owners
//! they were built with) are each bound read-only and idmapped into the
//! job's id range first ([`Rootfs::overlay_idmapped`]): no job changes an
//! owner on disk, and two jobs of different ranges share one layer cache.

use std::fs;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use super::spec::USERNS_SIZE;
use crate::sys::mount::{bind_all_idmapped, mount_overlay, unmount_and_remove};
use crate::sys::userns::{IdRange, UserNs};

/// A mounted overlay; unmounted (with its idmapped lower layers) and
/// removed on drop.
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
        let rootfs = Rootfs::upper(dir, owner)?;
        rootfs.mount(lower)?;
        Ok(rootfs)
    }

    /// As [`Rootfs::overlay`], for a container in the user namespace whose
    /// ids 0..65536 are host ids `base`..: each lower layer is first bound
    /// read-only under `dir/lower/`, idmapped so that a file owned by N on
    /// disk shows as owned by `base + N` (the container's N). Copied up,
    /// a file keeps that owner. ~0.03 ms per layer.
    pub fn overlay_idmapped(dir: &Path, lower: &[&Path], base: u32) -> io::Result<Rootfs> {
        let rootfs = Rootfs::upper(dir, Some((base, base)))?;
        let range = [IdRange::from_zero(base, USERNS_SIZE)];
        let ns = UserNs::new(&range, &range)?;
        let mapped = bind_all_idmapped(lower, &dir.join("lower"), ns.as_fd())?;
        let mapped: Vec<&Path> = mapped.iter().map(PathBuf::as_path).collect();
        rootfs.mount(&mapped)?;
        Ok(rootfs)
    }

    /// The `host` image: the host's root under a new writable layer. In a
    /// user namespace (its root host uid `base`) nothing of the host is
    /// remapped: host files keep their owners, which the namespace does not
    /// map, so a step, its root included, reads what any unprivileged host
    /// user can and changes none of it; it writes to its own new
    /// directories, `/workspace`, `/tmp` and an empty `/root` of its own.
    pub fn host(dir: &Path, userns_base: Option<u32>) -> io::Result<Rootfs> {
        let owner = userns_base.map(|b| (b, b));
        let rootfs = Rootfs::upper(dir, owner)?;
        if let Some(owner) = owner {
            fresh_dir(&dir.join("upper"), "root", owner)?;
        }
        rootfs.mount(&[Path::new("/")])?;
        Ok(rootfs)
    }

    /// The writable layer's directories, its root given to `owner`.
    fn upper(dir: &Path, owner: Option<(u32, u32)>) -> io::Result<Rootfs> {
        let upper = dir.join("upper");
        let work = dir.join("work");
        let mountpoint = dir.join("rootfs");
        for d in [&upper, &work, &mountpoint] {
            fs::create_dir_all(d)?;
        }
        let rootfs = Rootfs {
            dir: dir.to_path_buf(),
            mountpoint,
        };
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&upper, Some(uid), Some(gid))?;
        }
        Ok(rootfs)
    }

    fn mount(&self, lower: &[&Path]) -> io::Result<()> {
        let (upper, work) = (self.dir.join("upper"), self.dir.join("work"));
        mount_overlay(&self.mountpoint, lower, &upper, &work).map_err(|e| {
            io::Error::other(format!(
                "cannot mount the overlay root at {}: {e}",
                self.mountpoint.display()
            ))
        })
    }

    pub fn path(&self) -> &Path {
        &self.mountpoint
    }
}

/// An empty directory `name` in the writable layer `upper`, owned by
/// `owner` (mode 0700), that hides whatever the lower layers have there
/// (an opaque directory).
fn fresh_dir(upper: &Path, name: &str, (uid, gid): (u32, u32)) -> io::Result<()> {
    let dir = upper.join(name);
    fs::DirBuilder::new().mode(0o700).create(&dir)?;
    std::os::unix::fs::chown(&dir, Some(uid), Some(gid))?;
    xattr_set(&dir, c"trusted.overlay.opaque", b"y")
}

fn xattr_set(path: &Path, name: &std::ffi::CStr, value: &[u8]) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let p = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::other(format!("{} contains a NUL byte", path.display())))?;
    // SAFETY: lsetxattr with NUL-terminated path and name and a value
    // buffer of the length passed.
    let r = unsafe { libc::lsetxattr(p.as_ptr(), name.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Drop for Rootfs {
    fn drop(&mut self) {
        // The overlay, then the idmapped layers it was laid over.
        if let Err(e) = unmount_and_remove(&self.dir, &self.dir) {
            tracing::error!(path = %self.dir.display(), error = %e, "failed to remove a container root filesystem");
        }
    }
}
