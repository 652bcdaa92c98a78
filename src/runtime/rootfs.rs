//! Root filesystems of job containers: a fresh writable overlay layer over a
//! read-only lower (an image's layers; for the `host` image, a tree of the
//! job's own with overlays of the host's software directories, see
//! `hostroot.rs`), made per job and removed with it. Nothing a job writes
//! reaches a lower layer.
//!
//! In a user namespace, an image's layers (unpacked once, with the owners
//! they were built with) are each bound read-only and idmapped into the
//! job's id range first ([`Rootfs::overlay_idmapped`]): no job changes an
//! owner on disk, and two jobs of different ranges share one layer cache.

use std::fs;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::Mode;
use nix::unistd::{Gid, Uid};

use super::hostroot::HostView;
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

    /// The `host` image's root (see [`HostView`]), made in `dir`; the
    /// agent's `private` paths in `/etc` are hidden too. In a user
    /// namespace (its root host uid `userns_base`) nothing of the host is
    /// remapped: host files keep their owners, which the namespace does not
    /// map, so a step, its root included, reads what any unprivileged host
    /// user can and changes none of it; the job's own empty directories
    /// (`/root`, `/home`, `/var`, `/tmp`, ...) belong to its root.
    pub fn host(dir: &Path, private: &[PathBuf], userns_base: Option<u32>) -> io::Result<Rootfs> {
        let host = Path::new("/");
        let owner = userns_base.map(|b| (b, b));
        let view = HostView::scan(host, private)?;
        let (skeleton, hiding) = (dir.join("skeleton"), dir.join("hidden"));
        view.write_skeleton(&skeleton, owner)?;
        view.write_hiding_layer(&hiding)?;
        let rootfs = Rootfs::overlay(dir, &[&skeleton], owner)?;
        // Unmounted and removed with `rootfs` if this fails.
        view.mount(host, rootfs.path(), &dir.join("layers"), &hiding)?;
        Ok(rootfs)
    }

    /// Makes the directory `path` (absolute, as the container sees it)
    /// and its parents where missing, mode 0755, owned by `owner` (host
    /// root when `None`). Every name is resolved inside the root, as the
    /// container would resolve it: a link the image made cannot lead out.
    pub fn make_dir(&self, path: &str, owner: Option<(u32, u32)>) -> io::Result<()> {
        let in_root = |fd: &OwnedFd, rel: &Path| {
            let how = OpenHow::new()
                .flags(OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
                .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
            nix::fcntl::openat2(fd, rel, how)
        };
        let root = nix::fcntl::open(
            &self.mountpoint,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        let mut done = PathBuf::from(".");
        for name in Path::new(path).components() {
            let Component::Normal(name) = name else {
                continue;
            };
            let parent = in_root(&root, &done)?;
            done.push(name);
            match in_root(&root, &done) {
                Ok(_) => continue,
                Err(Errno::ENOENT) => {}
                Err(e) => return Err(e.into()),
            }
            nix::sys::stat::mkdirat(&parent, name, Mode::from_bits_truncate(0o755))?;
            if let Some((uid, gid)) = owner {
                nix::unistd::fchownat(
                    &parent,
                    name,
                    Some(Uid::from_raw(uid)),
                    Some(Gid::from_raw(gid)),
                    AtFlags::AT_SYMLINK_NOFOLLOW,
                )?;
            }
        }
        Ok(())
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

impl Drop for Rootfs {
    fn drop(&mut self) {
        // The overlay, then the idmapped layers it was laid over.
        if let Err(e) = unmount_and_remove(&self.dir, &self.dir) {
            tracing::error!(path = %self.dir.display(), error = %e, "failed to remove a container root filesystem");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_is_made_inside_the_root_whatever_links_the_image_made() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("job");
        let mountpoint = dir.join("rootfs");
        fs::create_dir_all(mountpoint.join("outside")).unwrap();
        fs::create_dir(t.path().join("outside")).unwrap();
        // Climbs out, as the host would resolve it.
        std::os::unix::fs::symlink("../../outside", mountpoint.join("link")).unwrap();
        let rootfs = Rootfs {
            dir: dir.clone(),
            mountpoint: mountpoint.clone(),
        };
        rootfs.make_dir("/link/work/deep", None).unwrap();
        assert!(mountpoint.join("outside/work/deep").is_dir());
        assert!(!t.path().join("outside/work").exists());
        // Already there: nothing to do.
        rootfs.make_dir("/outside/work", None).unwrap();
        // A file in the way is an error, not replaced.
        fs::write(mountpoint.join("file"), "x").unwrap();
        assert!(rootfs.make_dir("/file/sub", None).is_err());
        drop(rootfs);
        assert!(!dir.exists());
    }
}
