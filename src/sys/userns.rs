//! User namespaces made for their id mapping alone, to idmap mounts with
//! (`mount_setattr(MOUNT_ATTR_IDMAP)` takes a user namespace, not a
//! mapping); and giving a tree to an owner where no idmapped mount can.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::Path;

/// One line of a `uid_map`/`gid_map`: `count` ids from `inside` (in the
/// namespace; for an idmapped mount, the id a file has on disk) are host
/// ids from `outside`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdRange {
    pub inside: u32,
    pub outside: u32,
    pub count: u32,
}

impl IdRange {
    /// `count` ids from 0 are host ids from `outside`.
    pub fn from_zero(outside: u32, count: u32) -> IdRange {
        IdRange {
            inside: 0,
            outside,
            count,
        }
    }
}

/// A user namespace with a fixed mapping and no process in it: it lives as
/// long as this handle (and any mount idmapped with it).
#[derive(Debug)]
pub struct UserNs(File);

impl AsFd for UserNs {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

fn map_text(ranges: &[IdRange]) -> String {
    ranges
        .iter()
        .map(|r| format!("{} {} {}\n", r.inside, r.outside, r.count))
        .collect()
}

fn pipe() -> io::Result<(File, File)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into an array of two.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just made and are owned by nothing else.
    Ok(unsafe {
        (
            File::from(OwnedFd::from_raw_fd(fds[0])),
            File::from(OwnedFd::from_raw_fd(fds[1])),
        )
    })
}

impl UserNs {
    /// A new user namespace whose uids are `uids` and gids `gids`. A child
    /// process unshares it and says so; this process writes its maps,
    /// keeps `/proc/CHILD/ns/user` open and kills the child. Blocking
    /// (about a millisecond).
    ///
    /// The child never waits for the end of a pipe: another thread may
    /// fork meanwhile (another job's namespace, say) and hold a copy of
    /// any pipe end of ours until its child is done.
    pub fn new(uids: &[IdRange], gids: &[IdRange]) -> io::Result<UserNs> {
        let (uid_map, gid_map) = (map_text(uids), map_text(gids));
        let (mut ready_r, ready_w) = pipe()?;
        let ready_w_fd = ready_w.as_raw_fd();
        // SAFETY: the child makes raw syscalls only (no allocation, no
        // locks: the agent is multi-threaded) and never returns.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(io::Error::last_os_error());
        }
        if pid == 0 {
            // SAFETY: in the child: unshare, write to a descriptor it
            // inherited, then wait to be killed; nothing allocates or takes
            // a lock.
            unsafe {
                let byte = [(libc::unshare(libc::CLONE_NEWUSER) == 0) as u8];
                libc::write(ready_w_fd, byte.as_ptr().cast(), 1);
                loop {
                    libc::pause();
                }
            }
        }
        drop(ready_w);
        let made = (|| {
            wait_readable(&ready_r, 10_000)?;
            let mut byte = [0u8; 1];
            ready_r.read_exact(&mut byte)?;
            if byte[0] != 1 {
                return Err(io::Error::other(
                    "cannot create a user namespace (unshare(CLONE_NEWUSER) failed; are user \
                     namespaces enabled? see sysctl user.max_user_namespaces)",
                ));
            }
            let proc = format!("/proc/{pid}");
            for (file, map) in [("uid_map", &uid_map), ("gid_map", &gid_map)] {
                File::options()
                    .write(true)
                    .open(format!("{proc}/{file}"))
                    .and_then(|mut f| f.write_all(map.as_bytes()))
                    .map_err(|e| io::Error::new(e.kind(), format!("cannot write {file} {map:?}: {e}")))?;
            }
            File::open(format!("{proc}/ns/user"))
        })();
        // SAFETY: kills and reaps our own child, which waits for this.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            let mut status = 0;
            while libc::waitpid(pid, &mut status, 0) < 0
                && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted
            {}
        }
        made.map(UserNs)
    }
}

/// Waits up to `millis` for `f` to be readable (or at its end).
fn wait_readable(f: &File, millis: i32) -> io::Result<()> {
    let mut pfd = libc::pollfd {
        fd: f.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: poll on one pollfd we own.
        match unsafe { libc::poll(&mut pfd, 1, millis) } {
            0 => {
                return Err(io::Error::other(
                    "the user namespace helper did not answer in 10 s",
                ));
            }
            n if n > 0 => return Ok(()),
            _ if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted => continue,
            _ => return Err(io::Error::last_os_error()),
        }
    }
}

/// Gives `dir` and everything under it to `uid:gid` (symlinks themselves,
/// never their targets).
pub fn chown_tree(dir: &Path, uid: u32, gid: u32) -> io::Result<()> {
    std::os::unix::fs::lchown(dir, Some(uid), Some(gid))?;
    if std::fs::symlink_metadata(dir)?.is_dir() {
        for entry in std::fs::read_dir(dir)? {
            chown_tree(&entry?.path(), uid, gid)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;
    use crate::sys::mount::{bind_idmapped, idmap_supported, unmount_and_remove};

    #[test]
    fn a_bind_idmapped_with_a_namespace_shows_its_host_ids_and_changes_nothing() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: idmapped mounts need root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (lower, at) = (dir.path().join("lower"), dir.path().join("at"));
        std::fs::create_dir_all(lower.join("sub")).unwrap();
        std::fs::create_dir(&at).unwrap();
        std::fs::write(lower.join("sub/built"), "x").unwrap();
        std::os::unix::fs::lchown(lower.join("sub/built"), Some(1000), Some(50)).unwrap();
        std::fs::write(lower.join("big"), "x").unwrap();
        std::os::unix::fs::lchown(lower.join("big"), Some(70_000), Some(0)).unwrap();
        let ns = UserNs::new(
            &[IdRange::from_zero(200_000, 65_536)],
            &[IdRange {
                inside: 0,
                outside: 300_000,
                count: 100,
            }],
        )
        .unwrap();
        idmap_supported(&lower, ns.as_fd()).unwrap();
        bind_idmapped(&lower, &at, ns.as_fd()).unwrap();
        let ids = |p: &Path| {
            let m = std::fs::symlink_metadata(p).unwrap();
            (m.uid(), m.gid())
        };
        assert_eq!(ids(&at), (200_000, 300_000));
        assert_eq!(ids(&at.join("sub/built")), (201_000, 300_050));
        // Ids the namespace does not map show as the overflow id.
        assert_eq!(ids(&at.join("big")).0, 65_534);
        assert_eq!(ids(&lower.join("sub/built")), (1000, 50));
        // Read-only.
        let e = std::fs::write(at.join("new"), "x").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EROFS));
        unmount_and_remove(&at, dir.path()).unwrap();
    }
}
