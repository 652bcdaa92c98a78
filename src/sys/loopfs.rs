//! A filesystem of a fixed size in a sparse file: ext4 on a loop device.
//! What is written to it can never take more than its size of the host's
//! disk, and it goes, whole, when it is unmounted. Nothing on the way asks
//! the disk to sync: the file system is made in memory (`mkfs.ext4` on a
//! memfd, no journal, once per size) and copied into the sparse file, and it is mounted
//! `nobarrier`, so neither making nor unmounting it waits on other
//! writers of a busy host disk.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};
use nix::unistd::Whence;

/// `linux/loop.h`.
const LOOP_CLR_FD: libc::Ioctl = 0x4C01;
const LOOP_CONFIGURE: libc::Ioctl = 0x4C0A;
const LOOP_CTL_GET_FREE: libc::Ioctl = 0x4C82;
const LO_FLAGS_AUTOCLEAR: u32 = 4;
const LO_NAME_SIZE: usize = 64;

#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; LO_NAME_SIZE],
    lo_crypt_name: [u8; LO_NAME_SIZE],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

/// Mount options: no flushes to the backing file (nothing here has to
/// survive a crash), and no background zeroing of inode tables (a sparse
/// file reads as zeros already).
const MOUNT_OPTIONS: &str = "nobarrier,noinit_itable";

/// A mounted loop filesystem: on drop, unmounted, its loop device
/// detached and its file removed.
#[derive(Debug)]
pub struct LoopFs {
    image: PathBuf,
    mountpoint: PathBuf,
}

impl LoopFs {
    /// Makes an ext4 filesystem of `bytes` in a new sparse file `image`
    /// and mounts it at `mountpoint` (created), whose root gets `mode`.
    pub fn create(image: &Path, mountpoint: &Path, bytes: u64, mode: u32) -> io::Result<LoopFs> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(image)?;
        // From here on, dropping `fs` undoes whatever was done.
        let fs = LoopFs {
            image: image.to_path_buf(),
            mountpoint: mountpoint.to_path_buf(),
        };
        file.set_len(bytes)?;
        // The device stays attached while it is open or mounted
        // (autoclear): after a crash, unmounting it is enough.
        let (device, open) = attach(&file, image)?;
        // Written through the device, after attaching: the kernel flushes
        // a file's dirty pages when it is attached, which would allocate
        // them on the host disk (and make removing the file slow).
        format(&open, bytes)?;
        fs::DirBuilder::new().mode(0o700).create(mountpoint)?;
        nix::mount::mount(
            Some(&device),
            mountpoint,
            Some("ext4"),
            MsFlags::empty(),
            Some(MOUNT_OPTIONS),
        )
        .map_err(|e| {
            io::Error::other(format!(
                "cannot mount {} at {}: {e}",
                device.display(),
                mountpoint.display()
            ))
        })?;
        fs::set_permissions(mountpoint, fs::Permissions::from_mode(mode))?;
        Ok(fs)
    }

    pub fn path(&self) -> &Path {
        &self.mountpoint
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        match nix::mount::umount2(&self.mountpoint, MntFlags::empty()) {
            // EINVAL: not mounted (creation stopped short).
            Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => {}
            Err(e) => {
                // Something still uses it: it goes, with its loop device,
                // when the last user does.
                tracing::warn!(path = %self.mountpoint.display(), error = %e, "a job's filesystem is busy; detaching it lazily");
                let _ = nix::mount::umount2(&self.mountpoint, MntFlags::MNT_DETACH);
            }
        }
        if let Err(e) = detach_under(&self.image) {
            tracing::error!(image = %self.image.display(), error = %e, "cannot detach a job's loop device");
        }
        match fs::remove_file(&self.image) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                tracing::error!(image = %self.image.display(), error = %e, "cannot remove a job's filesystem image");
            }
            _ => {}
        }
    }
}

/// Checks, before any job needs one, that filesystems of `bytes` can be
/// made here: `mkfs.ext4` runs (its result kept for the jobs) and loop
/// devices can be had.
pub fn prepare(bytes: u64) -> io::Result<()> {
    Template::of(bytes)?;
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/loop-control")
        .map(drop)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot open /dev/loop-control: {e}")))
}

/// Writes an empty ext4 filesystem of `bytes` to `device`: the blocks of
/// [`Template::of`] that size, holes left as holes.
fn format(device: &File, bytes: u64) -> io::Result<()> {
    let template = Template::of(bytes)?;
    for (offset, data) in &template.extents {
        device.write_all_at(data, *offset)?;
    }
    Ok(())
}

/// An empty ext4 filesystem of one size, as the blocks `mkfs.ext4` wrote
/// (about 160 KiB for 10 GiB): made once per size and agent, then copied
/// to each new job's device, so that a job's disk costs no `mkfs` process
/// (which took two thirds of the ~12 ms a disk took to make). Every
/// job's filesystem has the same UUID, which ext4 does not mind.
struct Template {
    extents: Vec<(u64, Vec<u8>)>,
}

impl Template {
    fn of(bytes: u64) -> io::Result<Arc<Template>> {
        static MADE: Mutex<BTreeMap<u64, Arc<Template>>> = Mutex::new(BTreeMap::new());
        // Held while making one: the next job of that size waits for it
        // rather than making its own.
        let mut made = MADE.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = made.get(&bytes) {
            return Ok(t.clone());
        }
        let t = Arc::new(Template::make(bytes)?);
        made.insert(bytes, t.clone());
        Ok(t)
    }

    /// `mkfs.ext4` in memory (where its syncs cost nothing); its data.
    /// No journal (nothing on a job's disk survives a crash), no blocks
    /// reserved for root or for growing the filesystem online.
    fn make(bytes: u64) -> io::Result<Template> {
        let mem = File::from(nix::sys::memfd::memfd_create(
            "runnel-disk",
            nix::sys::memfd::MFdFlags::MFD_CLOEXEC,
        )?);
        mem.set_len(bytes)?;
        // The memfd is close-on-exec; mkfs (root, like the agent) opens it
        // through the agent's /proc entry.
        let path = format!("/proc/{}/fd/{}", std::process::id(), mem.as_raw_fd());
        let out = Command::new(mkfs_program())
            .args(["-q", "-F", "-O", "^has_journal,^resize_inode", "-m", "0"])
            .args(["-E", "lazy_itable_init=1,nodiscard", &path])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("cannot run mkfs.ext4 (Debian's e2fsprogs): {e}"),
                )
            })?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "mkfs.ext4 failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let mut extents = Vec::new();
        let mut offset = 0i64;
        loop {
            let start = match nix::unistd::lseek(&mem, offset, Whence::SeekData) {
                Ok(s) => s,
                Err(Errno::ENXIO) => return Ok(Template { extents }),
                Err(e) => return Err(e.into()),
            };
            let end = nix::unistd::lseek(&mem, start, Whence::SeekHole)?;
            let mut data = vec![0u8; (end - start) as usize];
            mem.read_exact_at(&mut data, start as u64)?;
            extents.push((start as u64, data));
            offset = end;
        }
    }
}

/// `mkfs.ext4`, also where root's PATH is not searched.
fn mkfs_program() -> &'static str {
    ["/usr/sbin/mkfs.ext4", "/sbin/mkfs.ext4"]
        .into_iter()
        .find(|p| Path::new(p).is_file())
        .unwrap_or("mkfs.ext4")
}

/// Binds `file` to a free loop device with autoclear; the device's path
/// and an open handle that keeps it attached until it is mounted.
fn attach(file: &File, name: &Path) -> io::Result<(PathBuf, File)> {
    let rw = |path: &Path| {
        OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| io::Error::new(e.kind(), format!("cannot open {}: {e}", path.display())))
    };
    let control = rw(Path::new("/dev/loop-control"))?;
    // SAFETY: plain data; all zeros is a valid value of each field.
    let mut config: LoopConfig = unsafe { std::mem::zeroed() };
    config.fd = file.as_raw_fd() as u32;
    config.info.lo_flags = LO_FLAGS_AUTOCLEAR;
    let shown = name.as_os_str().as_encoded_bytes();
    let shown = &shown[shown.len().saturating_sub(LO_NAME_SIZE - 1)..];
    config.info.lo_file_name[..shown.len()].copy_from_slice(shown);
    // LOOP_CTL_GET_FREE gives every caller the same free device until one
    // binds it: this agent's own jobs take turns (50 at once made 32
    // tries too few); another process may still take it first, and then
    // we ask again.
    static TURN: Mutex<()> = Mutex::new(());
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    for attempt in 0..200 {
        if attempt > 0 {
            std::thread::sleep(std::time::Duration::from_micros(200 * attempt.min(10)));
        }
        // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a number.
        let n = unsafe { libc::ioctl(control.as_raw_fd(), LOOP_CTL_GET_FREE) };
        if n < 0 {
            return Err(io::Error::other(format!(
                "no free loop device: {}",
                io::Error::last_os_error()
            )));
        }
        let path = PathBuf::from(format!("/dev/loop{n}"));
        let device = rw(&path)?;
        // SAFETY: LOOP_CONFIGURE reads a `struct loop_config`, which
        // `config` is laid out as (repr(C)) and outlives the call.
        let r = unsafe { libc::ioctl(device.as_raw_fd(), LOOP_CONFIGURE, &config) };
        if r == 0 {
            return Ok((path, device));
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EBUSY) {
            return Err(io::Error::other(format!(
                "cannot attach {} to {}: {e}",
                name.display(),
                path.display()
            )));
        }
    }
    Err(io::Error::other(
        "every free loop device was taken by another process first",
    ))
}

/// Loop devices whose backing file is at or under `path`, as
/// `/sys/block` names them (`loop3`).
pub fn devices_under(path: &Path) -> io::Result<Vec<String>> {
    let mut out = Vec::new();
    for entry in fs::read_dir("/sys/block")? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        let Ok(backing) = fs::read_to_string(format!("/sys/block/{name}/loop/backing_file")) else {
            continue;
        };
        // A removed file shows as "PATH (deleted)".
        let backing = backing.trim_end_matches('\n');
        let backing = backing.strip_suffix(" (deleted)").unwrap_or(backing);
        if Path::new(backing).starts_with(path) {
            out.push(name);
        }
    }
    Ok(out)
}

/// Detaches the loop devices backed by files at or under `path` (a device
/// still mounted or open is detached when that ends). For the devices a
/// crashed agent left; autoclear has normally done it already.
pub fn detach_under(path: &Path) -> io::Result<()> {
    for name in devices_under(path)? {
        let device = match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(format!("/dev/{name}"))
        {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        // SAFETY: LOOP_CLR_FD takes no argument.
        if unsafe { libc::ioctl(device.as_raw_fd(), LOOP_CLR_FD, 0) } < 0 {
            let e = io::Error::last_os_error();
            // ENXIO: already detached.
            if e.raw_os_error() != Some(libc::ENXIO) {
                return Err(io::Error::other(format!("cannot detach /dev/{name}: {e}")));
            }
        }
    }
    Ok(())
}

/// Whether the filesystem at `path` is full: under 2% of its space, or
/// no inode, left to take. (ext4 keeps about 2% of a small filesystem for
/// its delayed allocation: a write fails with ENOSPC while `df` still
/// shows 1.1% of 64 MiB available.)
pub fn is_full(path: &Path) -> bool {
    nix::sys::statvfs::statvfs(path)
        .is_ok_and(|s| s.blocks_available() <= s.blocks() / 50 || s.files_available() == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_template_is_an_ext4_filesystem_of_a_few_blocks() {
        if !Path::new(mkfs_program()).exists() {
            eprintln!("skipped: no mkfs.ext4 (Debian's e2fsprogs; scripts/setup installs it)");
            return;
        }
        let t = Template::of(64 << 20).unwrap();
        let first = &t.extents[0];
        assert_eq!(first.0, 0);
        // The superblock at 1024, its magic 0xEF53 at byte 56 of it.
        assert_eq!(&first.1[1024 + 56..1024 + 58], &[0x53, 0xEF]);
        let written: usize = t.extents.iter().map(|(_, d)| d.len()).sum();
        assert!(written < 1 << 20, "{written} bytes to copy per disk");
        // Made once per size.
        assert!(Arc::ptr_eq(&t, &Template::of(64 << 20).unwrap()));
    }

    #[test]
    fn the_loop_config_has_the_kernels_layout() {
        assert_eq!(std::mem::size_of::<LoopInfo64>(), 232);
        assert_eq!(std::mem::size_of::<LoopConfig>(), 304);
    }
}
