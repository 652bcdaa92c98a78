//! Root filesystems of job containers: a fresh writable overlay layer over a
//! read-only lower (an image's layers; for the `host` image, a tree of the
//! job's own with overlays of the host's software directories, see
//! `hostroot.rs`), made per job and removed with it. Nothing a job writes
//! reaches a lower layer.

use std::fs;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::Mode;
use nix::unistd::{Gid, Uid};

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
