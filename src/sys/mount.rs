//! Mounts: overlays, idmapped read-only binds (the lower layers of a job's
//! overlays, shown with the job's ids), and unmounting whatever is mounted
//! under a directory before it is removed.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use nix::errno::Errno;
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
    let mount = |data: &str| nix::mount::mount(Some("overlay"), target, Some("overlay"), flags, Some(data));
    // Every overlay here has a job's throwaway upper layer: `volatile`
    // (Linux 5.10) skips syncing it, above all at unmount, where each sync
    // of the upper's filesystem cost ~25 ms on a journaled host disk (the
    // host image's seven overlays: 180 ms of its teardown). After a crash
    // such an upper is never mounted again: it is removed.
    // An upper mounted before (a job's workspace, mounted again when it
    // is given to the step's user) carries the marker of a volatile
    // mount, which makes overlayfs refuse it: in the same boot, after a
    // clean unmount, its data is whole, so the marker goes.
    let marker = work.join("work/incompat/volatile");
    if marker.exists() {
        let _ = fs::remove_dir_all(&marker);
    }
    static VOLATILE: AtomicBool = AtomicBool::new(true);
    if VOLATILE.load(Ordering::Relaxed) {
        return match mount(&format!("{data},volatile")) {
            // An older kernel; or a bad layer, which fails again below.
            Err(Errno::EINVAL) => mount(&data).inspect(|()| VOLATILE.store(false, Ordering::Relaxed)),
            done => done,
        };
    }
    mount(&data)
}

/// A detached copy of the mount at `source` (not of mounts under it).
fn clone_tree(source: &Path) -> io::Result<OwnedFd> {
    let path = CString::new(source.as_os_str().as_bytes())
        .map_err(|_| io::Error::other(format!("{} contains a NUL byte", source.display())))?;
    // SAFETY: open_tree with a NUL-terminated path; returns a new descriptor.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            path.as_ptr(),
            libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the descriptor was just made and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

/// Makes the detached mount `tree` read-only and idmapped with `userns`.
fn set_idmap(tree: &OwnedFd, userns: BorrowedFd<'_>) -> io::Result<()> {
    let attr = libc::mount_attr {
        attr_set: libc::MOUNT_ATTR_IDMAP | libc::MOUNT_ATTR_RDONLY,
        attr_clr: 0,
        propagation: 0,
        userns_fd: userns.as_raw_fd() as u64,
    };
    // SAFETY: mount_setattr on a descriptor we own, an empty path with
    // AT_EMPTY_PATH, and a mount_attr of the size passed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            &attr as *const libc::mount_attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Binds `source` at `target` (an empty directory) read-only and
/// idmapped with `userns`: a file whose owner on disk is N shows as owned
/// by the host id that N is in `userns`. Nothing on disk changes.
pub fn bind_idmapped(source: &Path, target: &Path, userns: BorrowedFd<'_>) -> io::Result<()> {
    let tree = clone_tree(source)?;
    set_idmap(&tree, userns)?;
    let to = CString::new(target.as_os_str().as_bytes())
        .map_err(|_| io::Error::other(format!("{} contains a NUL byte", target.display())))?;
    // SAFETY: move_mount of a descriptor we own (empty path) onto a
    // NUL-terminated path.
    let r = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Binds each of `layers` read-only and idmapped with `userns` at
/// `dir/0`, `dir/1`, ... (`dir`, made here, is 0700); returns those paths,
/// in the same order.
pub fn bind_all_idmapped(layers: &[&Path], dir: &Path, userns: BorrowedFd<'_>) -> io::Result<Vec<PathBuf>> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new().mode(0o700).create(dir)?;
    let mut mapped = Vec::with_capacity(layers.len());
    for (i, layer) in layers.iter().enumerate() {
        let at = dir.join(i.to_string());
        fs::create_dir(&at)?;
        bind_idmapped(layer, &at, userns)
            .map_err(|e| io::Error::new(e.kind(), format!("cannot idmap {}: {e}", layer.display())))?;
        mapped.push(at);
    }
    Ok(mapped)
}

/// Whether the file system of `dir` can be idmapped (with `userns`):
/// `Err` says why not. Mounts nothing.
pub fn idmap_supported(dir: &Path, userns: BorrowedFd<'_>) -> io::Result<()> {
    set_idmap(&clone_tree(dir)?, userns)
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
