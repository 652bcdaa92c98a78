//! Unpacking one image layer into a directory that overlayfs can stack:
//! OCI whiteouts (`.wh.NAME`) become overlay whiteouts (a 0/0 character
//! device), opaque directories (`.wh..wh..opq`) get `trusted.overlay.opaque`,
//! device nodes are skipped.
//!
//! A layer is written by whoever built the image, and is unpacked by host
//! root: every name in it is resolved below the layer's root one directory
//! at a time (`openat2` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`), and
//! every entry is made with the `*at` calls relative to its parent's
//! descriptor, never following a symlink. A symlink the layer made is only
//! ever a symlink (it resolves inside the container); an entry that climbs
//! out with `..`, goes through a symlink, or hard-links to a file outside
//! the layer refuses the whole layer. Never touches anything outside the
//! directory it is given.

use std::ffi::{CString, OsStr};
use std::fs;
use std::io::{self, BufRead, BufReader, Read};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{Mode, SFlag};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid, UnlinkatFlags};

const WHITEOUT_PREFIX: &[u8] = b".wh.";
const OPAQUE: &[u8] = b".wh..wh..opq";
/// Names starting so are aufs's own bookkeeping (`.wh..wh.plnk`), not whiteouts.
const AUFS_META: &[u8] = b".wh..wh.";

/// How a layer blob is compressed, as its media type says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Tar,
    Gzip,
    Zstd,
    /// No media type given (an OCI layout may leave it out): told by the
    /// blob's first bytes.
    Unnamed,
}

impl Format {
    /// The format of a layer with `media_type`, or why it cannot be unpacked.
    pub fn of(digest: &str, media_type: &str) -> Result<Format, LayerError> {
        Ok(match media_type {
            "" => Format::Unnamed,
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar"
            | "application/vnd.docker.image.rootfs.diff.tar" => Format::Tar,
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip" => Format::Gzip,
            "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"
            | "application/vnd.docker.image.rootfs.diff.tar.zstd" => Format::Zstd,
            other => {
                return Err(LayerError::MediaType {
                    digest: digest.to_string(),
                    media_type: other.to_string(),
                });
            }
        })
    }

    /// The blob as an uncompressed tar stream.
    fn open(self, blob: &Path) -> io::Result<Box<dyn Read>> {
        let mut f = BufReader::new(fs::File::open(blob)?);
        let format = match self {
            Format::Unnamed => match f.fill_buf()? {
                [0x1f, 0x8b, ..] => Format::Gzip,
                [0x28, 0xb5, 0x2f, 0xfd, ..] => Format::Zstd,
                _ => Format::Tar,
            },
            known => known,
        };
        Ok(match format {
            Format::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(f)),
            Format::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(f)?),
            Format::Tar | Format::Unnamed => Box::new(f),
        })
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Format::Tar | Format::Unnamed => "tar",
            Format::Gzip => "gzip-compressed tar",
            Format::Zstd => "zstd-compressed tar",
        })
    }
}

/// Why a layer cannot be used. Each names the layer, and the entry if one
/// is to blame.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error(
        "layer {digest}: entry {entry:?} {why}: a layer may only write inside itself, so the image \
         is refused; rebuild it from layers you trust"
    )]
    Escapes {
        digest: String,
        entry: String,
        why: Escape,
    },
    #[error("layer {digest}: entry {entry:?}: {source}")]
    Entry {
        digest: String,
        entry: String,
        #[source]
        source: io::Error,
    },
    #[error("layer {digest} is not a readable {format} archive: {source}")]
    Archive {
        digest: String,
        format: Format,
        #[source]
        source: io::Error,
    },
    #[error(
        "layer {digest} has media type {media_type:?}, which runnel cannot unpack: it takes tar \
         layers, plain or compressed with gzip or zstd"
    )]
    MediaType { digest: String, media_type: String },
    #[error("cannot unpack layer {digest} into {}: {source}", dest.display())]
    Dest {
        digest: String,
        dest: std::path::PathBuf,
        #[source]
        source: io::Error,
    },
}

/// How an entry tried to reach outside the layer.
#[derive(Debug, thiserror::Error)]
pub enum Escape {
    #[error("climbs out with \"..\"")]
    DotDot,
    #[error("goes through {0:?}, a symlink")]
    Symlink(String),
    #[error("is a hard link to {0:?}, which climbs out with \"..\"")]
    LinkDotDot(String),
    #[error("is a hard link to {target:?}, which goes through {symlink:?}, a symlink")]
    LinkSymlink { target: String, symlink: String },
    #[error("whites out {0:?}, which is no name in its directory")]
    Whiteout(String),
}

/// The names of `path` below the layer's root: `.` and a leading `/` are
/// dropped (a tar's paths are relative to its root however written), and
/// `None` if it climbs with `..`.
fn names(path: &Path) -> Option<Vec<&OsStr>> {
    let mut out = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

/// Where walking down to a directory stopped.
#[derive(Debug)]
enum Stop {
    /// The first `n` names lead to a symlink.
    Symlink(usize),
    /// The first `n` names lead to something that is not a directory.
    NotDir(usize),
    /// A directory on the way is missing.
    Missing,
    Io(io::Error),
}

impl From<Errno> for Stop {
    fn from(e: Errno) -> Stop {
        Stop::Io(e.into())
    }
}

/// Opens `name` in `dir` as a directory: one name, below `dir`, never
/// through a symlink.
fn open_dir(dir: impl AsFd, name: &OsStr) -> nix::Result<OwnedFd> {
    let how = OpenHow::new()
        .flags(OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
        .resolve(
            ResolveFlag::RESOLVE_BENEATH
                | ResolveFlag::RESOLVE_NO_SYMLINKS
                | ResolveFlag::RESOLVE_NO_MAGICLINKS
                | ResolveFlag::RESOLVE_NO_XDEV,
        );
    nix::fcntl::openat2(dir, name, how)
}

/// Opens the directory `names` below `root`, one name at a time. With
/// `make`, missing directories are made (mode 0755, owned by `make`).
fn walk(root: &OwnedFd, names: &[&OsStr], make: Option<u32>) -> Result<OwnedFd, Stop> {
    let mut dir = root.try_clone().map_err(Stop::Io)?;
    for (i, name) in names.iter().enumerate() {
        let next = match (open_dir(&dir, name), make) {
            (Err(Errno::ENOENT), Some(owner)) => {
                nix::sys::stat::mkdirat(&dir, *name, Mode::from_bits_truncate(0o755))?;
                let fd = open_dir(&dir, name)?;
                if owner != 0 {
                    nix::unistd::fchown(&fd, Some(Uid::from_raw(owner)), Some(Gid::from_raw(owner)))?;
                }
                nix::sys::stat::fchmod(&fd, Mode::from_bits_truncate(0o755))?;
                fd
            }
            (Ok(fd), _) => fd,
            // A symlink is refused either way (O_DIRECTORY finds it first).
            (Err(Errno::ELOOP | Errno::ENOTDIR), _) => {
                let st = nix::sys::stat::fstatat(&dir, *name, AtFlags::AT_SYMLINK_NOFOLLOW)?;
                return Err(if file_type(&st) == SFlag::S_IFLNK {
                    Stop::Symlink(i + 1)
                } else {
                    Stop::NotDir(i + 1)
                });
            }
            (Err(Errno::ENOENT), None) => return Err(Stop::Missing),
            (Err(e), _) => return Err(e.into()),
        };
        dir = next;
    }
    Ok(dir)
}

fn file_type(st: &nix::sys::stat::FileStat) -> SFlag {
    SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT
}

/// `names` as a path, for messages.
fn shown(names: &[&OsStr]) -> String {
    let mut p = std::path::PathBuf::new();
    p.extend(names);
    p.display().to_string()
}

/// What an entry already in the layer at `name` is made way for.
/// Returns whether a directory is there and stays (when `keep_dir`).
fn clear(dir: &OwnedFd, name: &OsStr, keep_dir: bool) -> io::Result<bool> {
    let st = match nix::sys::stat::fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Err(Errno::ENOENT) => return Ok(false),
        r => r?,
    };
    let is_dir = file_type(&st) == SFlag::S_IFDIR;
    if is_dir && keep_dir {
        return Ok(true);
    }
    let how = if is_dir {
        UnlinkatFlags::RemoveDir
    } else {
        UnlinkatFlags::NoRemoveDir
    };
    match nix::unistd::unlinkat(dir, name, how) {
        Err(Errno::ENOTEMPTY) => Err(io::Error::other(format!(
            "replaces the directory {:?} of this same layer, which is not empty",
            name.to_string_lossy()
        ))),
        r => r.map(|_| false).map_err(io::Error::from),
    }
}

/// Owner, mode and time of an entry, from its header.
struct Meta {
    uid: u32,
    gid: u32,
    mode: Mode,
    mtime: TimeSpec,
}

impl Meta {
    fn of(h: &tar::Header, shift: u32) -> io::Result<Meta> {
        let id = |v: u64| {
            u32::try_from(v)
                .ok()
                .and_then(|v| v.checked_add(shift))
                .ok_or_else(|| io::Error::other(format!("owner {v} is out of range")))
        };
        let mtime = i64::try_from(h.mtime()?).unwrap_or(i64::MAX);
        Ok(Meta {
            uid: id(h.uid()?)?,
            gid: id(h.gid()?)?,
            mode: Mode::from_bits_truncate(h.mode()? & 0o7777),
            mtime: TimeSpec::new(mtime, 0),
        })
    }

    /// Sets all of it on an open file or directory (the mode after the
    /// owner: chown clears set-id bits).
    fn set(&self, fd: &OwnedFd) -> io::Result<()> {
        nix::unistd::fchown(fd, Some(Uid::from_raw(self.uid)), Some(Gid::from_raw(self.gid)))?;
        nix::sys::stat::fchmod(fd, self.mode)?;
        nix::sys::stat::futimens(fd, &self.mtime, &self.mtime)?;
        Ok(())
    }

    /// Sets the owner and time of `name` in `dir`, a symlink or fifo.
    fn set_at(&self, dir: &OwnedFd, name: &OsStr) -> io::Result<()> {
        nix::unistd::fchownat(
            dir,
            name,
            Some(Uid::from_raw(self.uid)),
            Some(Gid::from_raw(self.gid)),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )?;
        nix::sys::stat::utimensat(
            dir,
            name,
            &self.mtime,
            &self.mtime,
            nix::sys::stat::UtimensatFlags::NoFollowSymlink,
        )?;
        Ok(())
    }
}

/// Extended attributes a layer may set: its own (`user.*`, but not
/// overlayfs's) and file capabilities. `trusted.overlay.*` comes only from
/// the layer's opaque markers.
fn xattr_allowed(name: &[u8]) -> bool {
    (name.starts_with(b"user.") && !name.starts_with(b"user.overlay.")) || name == b"security.capability"
}

fn set_xattrs(fd: &OwnedFd, entry: &mut tar::Entry<'_, Box<dyn Read>>) -> io::Result<()> {
    let Some(exts) = entry.pax_extensions()? else {
        return Ok(());
    };
    for ext in exts {
        let ext = ext?;
        let Some(name) = ext.key_bytes().strip_prefix(b"SCHILY.xattr.") else {
            continue;
        };
        if xattr_allowed(name) {
            fsetxattr(fd, name, ext.value_bytes())?;
        }
    }
    Ok(())
}

fn fsetxattr(fd: &OwnedFd, name: &[u8], value: &[u8]) -> io::Result<()> {
    let n = CString::new(name)?;
    // SAFETY: the descriptor is open, the name is NUL-terminated and lives
    // across the call; value points to `value.len()` readable bytes.
    let rc = unsafe { libc::fsetxattr(fd.as_raw_fd(), n.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Why one entry failed: an escape, or an error of the file system.
enum Fault {
    Escape(Escape),
    Io(io::Error),
}

impl From<io::Error> for Fault {
    fn from(e: io::Error) -> Fault {
        Fault::Io(e)
    }
}

impl From<Errno> for Fault {
    fn from(e: Errno) -> Fault {
        Fault::Io(e.into())
    }
}

/// Unpacks the layer `blob` (with `digest`, compressed as `format`) into
/// `dest`, which must exist and be empty. Owners are shifted by `shift`
/// (for containers in a user namespace whose root is host uid `shift`).
/// On an error `dest` holds part of the layer: the caller throws it away.
pub fn unpack(blob: &Path, format: Format, digest: &str, dest: &Path, shift: u32) -> Result<(), LayerError> {
    let dest_err = |source: io::Error| LayerError::Dest {
        digest: digest.to_string(),
        dest: dest.to_path_buf(),
        source,
    };
    let root: OwnedFd = fs::File::open(dest).map_err(dest_err)?.into();
    if shift > 0 {
        nix::unistd::fchown(&root, Some(Uid::from_raw(shift)), Some(Gid::from_raw(shift)))
            .map_err(|e| dest_err(e.into()))?;
    }
    let archive_err = |source: io::Error| LayerError::Archive {
        digest: digest.to_string(),
        format,
        source,
    };
    let mut archive = tar::Archive::new(format.open(blob).map_err(archive_err)?);
    // Directories get their times last: what is made in them changes them.
    let mut dirs: Vec<DirTime> = Vec::new();
    for entry in archive.entries().map_err(archive_err)? {
        let mut entry = entry.map_err(archive_err)?;
        let raw = entry.path_bytes().into_owned();
        let fault = |f: Fault| match f {
            Fault::Escape(why) => LayerError::Escapes {
                digest: digest.to_string(),
                entry: String::from_utf8_lossy(&raw).into_owned(),
                why,
            },
            Fault::Io(source) => LayerError::Entry {
                digest: digest.to_string(),
                entry: String::from_utf8_lossy(&raw).into_owned(),
                source,
            },
        };
        if let Some(dir) = unpack_entry(&root, &mut entry, shift).map_err(fault)? {
            dirs.push(dir);
        }
    }
    for (names, mtime) in dirs.iter().rev() {
        let names: Vec<&OsStr> = names.iter().map(|n| n.as_os_str()).collect();
        // Replaced by a later entry if it cannot be opened as a directory.
        if let Ok(fd) = walk(&root, &names, None) {
            let _ = nix::sys::stat::futimens(&fd, mtime, mtime);
        }
    }
    Ok(())
}

/// A directory's names below the root, and the time to give it.
type DirTime = (Vec<std::ffi::OsString>, TimeSpec);

/// Unpacks one entry below `root`. Returns a directory's names and time,
/// to be set when the layer is done.
fn unpack_entry(
    root: &OwnedFd,
    entry: &mut tar::Entry<'_, Box<dyn Read>>,
    shift: u32,
) -> Result<Option<DirTime>, Fault> {
    use tar::EntryType as T;
    let kind = entry.header().entry_type();
    match kind {
        // Containers get their own /dev; pax and GNU headers of the whole
        // archive say nothing about files.
        T::Block | T::Char | T::XGlobalHeader | T::XHeader | T::GNULongName | T::GNULongLink => {
            return Ok(None);
        }
        _ => {}
    }
    let path = entry.path()?.into_owned();
    let all = names(&path).ok_or(Fault::Escape(Escape::DotDot))?;
    let Some((name, parents)) = all.split_last() else {
        return Ok(None); // the root itself: the caller's directory
    };
    let name = *name;
    let dir = walk(root, parents, Some(shift)).map_err(|stop| match stop {
        Stop::Symlink(n) => Fault::Escape(Escape::Symlink(shown(&parents[..n]))),
        Stop::NotDir(n) => Fault::Io(io::Error::other(format!(
            "{:?} is not a directory",
            shown(&parents[..n])
        ))),
        Stop::Missing => Fault::Io(Errno::ENOENT.into()),
        Stop::Io(e) => Fault::Io(e),
    })?;
    let bytes = name.as_bytes();
    if bytes == OPAQUE {
        fsetxattr(&dir, b"trusted.overlay.opaque", b"y")?;
        return Ok(None);
    }
    if bytes.starts_with(AUFS_META) {
        return Ok(None);
    }
    if let Some(hidden) = bytes.strip_prefix(WHITEOUT_PREFIX) {
        if hidden.is_empty() || hidden == b"." || hidden == b".." {
            return Err(Fault::Escape(Escape::Whiteout(
                String::from_utf8_lossy(hidden).into_owned(),
            )));
        }
        let hidden = OsStr::from_bytes(hidden);
        clear(&dir, hidden, false)?;
        nix::sys::stat::mknodat(
            &dir,
            hidden,
            SFlag::S_IFCHR,
            Mode::empty(),
            nix::sys::stat::makedev(0, 0),
        )?;
        if shift > 0 {
            nix::unistd::fchownat(
                &dir,
                hidden,
                Some(Uid::from_raw(shift)),
                Some(Gid::from_raw(shift)),
                AtFlags::AT_SYMLINK_NOFOLLOW,
            )?;
        }
        return Ok(None);
    }
    let meta = Meta::of(entry.header(), shift)?;
    match kind {
        T::Directory => {
            if !clear(&dir, name, true)? {
                nix::sys::stat::mkdirat(&dir, name, Mode::from_bits_truncate(0o700))?;
            }
            let fd = open_dir(&dir, name)?;
            meta.set(&fd)?;
            set_xattrs(&fd, entry)?;
            let names = all.iter().map(|n| n.to_os_string()).collect();
            return Ok(Some((names, meta.mtime)));
        }
        T::Symlink => {
            let target = entry
                .link_name_bytes()
                .ok_or_else(|| io::Error::other("a symlink without a target"))?;
            clear(&dir, name, false)?;
            nix::unistd::symlinkat(OsStr::from_bytes(&target), &dir, name)?;
            meta.set_at(&dir, name)?;
        }
        T::Link => {
            let raw = entry
                .link_name_bytes()
                .ok_or_else(|| io::Error::other("a hard link without a target"))?
                .into_owned();
            let target = String::from_utf8_lossy(&raw).into_owned();
            let target_path = Path::new(OsStr::from_bytes(&raw));
            let tnames =
                names(target_path).ok_or_else(|| Fault::Escape(Escape::LinkDotDot(target.clone())))?;
            let missing = || {
                Fault::Io(io::Error::other(format!(
                    "a hard link to {target:?}, which names no file earlier in this layer"
                )))
            };
            let Some((tname, tparents)) = tnames.split_last() else {
                return Err(missing());
            };
            let tdir = walk(root, tparents, None).map_err(|stop| match stop {
                Stop::Symlink(n) => Fault::Escape(Escape::LinkSymlink {
                    target: target.clone(),
                    symlink: shown(&tparents[..n]),
                }),
                Stop::NotDir(_) | Stop::Missing => missing(),
                Stop::Io(e) => Fault::Io(e),
            })?;
            clear(&dir, name, false)?;
            // No AT_SYMLINK_FOLLOW: a link to a symlink is that symlink.
            match nix::unistd::linkat(&tdir, *tname, &dir, name, AtFlags::empty()) {
                Err(Errno::ENOENT) => return Err(missing()),
                r => r?,
            }
        }
        T::Fifo => {
            clear(&dir, name, false)?;
            nix::sys::stat::mknodat(&dir, name, SFlag::S_IFIFO, Mode::empty(), 0)?;
            meta.set_at(&dir, name)?;
            nix::sys::stat::fchmodat(
                &dir,
                name,
                meta.mode,
                nix::sys::stat::FchmodatFlags::NoFollowSymlink,
            )?;
        }
        _ => {
            // Regular, contiguous and sparse files: their data.
            clear(&dir, name, false)?;
            let fd = nix::fcntl::openat(
                &dir,
                name,
                OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                Mode::from_bits_truncate(0o600),
            )?;
            let mut file = fs::File::from(fd);
            io::copy(entry, &mut file)?;
            let fd = OwnedFd::from(file);
            meta.set(&fd)?;
            // After the owner: chown drops file capabilities.
            set_xattrs(&fd, entry)?;
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};

    type Spec<'a> = (&'a str, tar::EntryType, &'a [u8], Option<&'a str>);

    fn tar_bytes(entries: &[Spec<'_>]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, kind, data, link) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_mode(0o755);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            h.set_size(data.len() as u64);
            // Bypass the builder's own path checks: layers come from anyone.
            if let Some(l) = link {
                let l = l.as_bytes();
                h.as_old_mut().linkname[..l.len()].copy_from_slice(l);
            }
            let name = path.as_bytes();
            h.as_old_mut().name[..name.len()].copy_from_slice(name);
            h.set_cksum();
            b.append(&h, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn layer(entries: &[Spec<'_>]) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        let mut gz = flate2::write::GzEncoder::new(f.reopen().unwrap(), flate2::Compression::fast());
        io::Write::write_all(&mut gz, &tar_bytes(entries)).unwrap();
        gz.finish().unwrap();
        f
    }

    fn unpack_to(blob: &Path, dest: &Path) -> Result<(), LayerError> {
        unpack(blob, Format::Unnamed, "sha256:test", dest, 0)
    }

    #[test]
    fn names_stay_below_the_root() {
        let n = |p: &str| {
            names(Path::new(p)).map(|v| {
                v.iter()
                    .map(|s| s.to_str().unwrap().to_string())
                    .collect::<Vec<_>>()
            })
        };
        assert_eq!(n("a/b/c"), Some(vec!["a".into(), "b".into(), "c".into()]));
        assert_eq!(n("./a//b/./"), Some(vec!["a".into(), "b".into()]));
        assert_eq!(n("/etc/passwd"), Some(vec!["etc".into(), "passwd".into()]));
        assert_eq!(n("./"), Some(vec![]));
        for bad in ["..", "../x", "a/../b", "a/b/..", "/../etc"] {
            assert_eq!(n(bad), None, "{bad}");
        }
    }

    #[test]
    fn walking_makes_directories_but_never_follows_a_symlink() {
        let root_dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let root: OwnedFd = fs::File::open(root_dir.path()).unwrap().into();
        let made = walk(&root, &[OsStr::new("a"), OsStr::new("b")], Some(0)).unwrap();
        drop(made);
        assert!(root_dir.path().join("a/b").is_dir());
        std::os::unix::fs::symlink(outside.path(), root_dir.path().join("a/link")).unwrap();
        std::os::unix::fs::symlink("b", root_dir.path().join("a/inner")).unwrap();
        fs::write(root_dir.path().join("a/file"), "").unwrap();
        let at = |p: &[&str], make| walk(&root, &p.iter().map(OsStr::new).collect::<Vec<_>>(), make);
        assert!(matches!(at(&["a", "link", "x"], Some(0)), Err(Stop::Symlink(2))));
        assert!(matches!(at(&["a", "inner"], None), Err(Stop::Symlink(2))));
        assert!(matches!(at(&["a", "file", "x"], Some(0)), Err(Stop::NotDir(2))));
        assert!(matches!(at(&["a", "none"], None), Err(Stop::Missing)));
        assert_eq!(fs::read_dir(outside.path()).unwrap().count(), 0);
        // Even a name that is not one: openat2 keeps it beneath.
        assert!(open_dir(&root, OsStr::new("..")).is_err());
        assert!(open_dir(&root, OsStr::new("/")).is_err());
    }

    #[test]
    fn media_types_choose_the_decompressor() {
        assert_eq!(
            Format::of("d", "application/vnd.oci.image.layer.v1.tar+zstd").unwrap(),
            Format::Zstd
        );
        assert_eq!(
            Format::of("d", "application/vnd.docker.image.rootfs.diff.tar.zstd").unwrap(),
            Format::Zstd
        );
        assert_eq!(
            Format::of("d", "application/vnd.docker.image.rootfs.diff.tar.gzip").unwrap(),
            Format::Gzip
        );
        assert_eq!(
            Format::of("d", "application/vnd.oci.image.layer.v1.tar").unwrap(),
            Format::Tar
        );
        assert_eq!(Format::of("d", "").unwrap(), Format::Unnamed);
        let e = Format::of("sha256:ab", "application/vnd.oci.image.layer.v1.tar+encrypted").unwrap_err();
        assert!(
            e.to_string().contains("sha256:ab") && e.to_string().contains("+encrypted"),
            "{e}"
        );
        // Each compression unpacks, named or told by its bytes.
        let raw = tar_bytes(&[("f", tar::EntryType::Regular, b"zstd!", None)]);
        let z = tempfile::NamedTempFile::new().unwrap();
        fs::write(z.path(), zstd::encode_all(&raw[..], 3).unwrap()).unwrap();
        let plain = tempfile::NamedTempFile::new().unwrap();
        fs::write(plain.path(), &raw).unwrap();
        for (blob, format) in [
            (z.path(), Format::Zstd),
            (z.path(), Format::Unnamed),
            (plain.path(), Format::Tar),
            (plain.path(), Format::Unnamed),
        ] {
            let dest = tempfile::tempdir().unwrap();
            unpack(blob, format, "d", dest.path(), 0).unwrap();
            assert_eq!(fs::read(dest.path().join("f")).unwrap(), b"zstd!");
        }
        // Named gzip, given zstd: said plainly.
        let dest = tempfile::tempdir().unwrap();
        let e = unpack(z.path(), Format::Gzip, "sha256:cd", dest.path(), 0).unwrap_err();
        assert!(matches!(e, LayerError::Archive { .. }), "{e}");
        assert!(e.to_string().contains("sha256:cd is not a readable gzip"), "{e}");
    }

    #[test]
    fn files_links_whiteouts_and_opaque_dirs() {
        let blob = layer(&[
            ("etc/", tar::EntryType::Directory, b"", None),
            ("etc/hello", tar::EntryType::Regular, b"hi\n", None),
            ("etc/.wh.gone", tar::EntryType::Regular, b"", None),
            ("var/.wh..wh..opq", tar::EntryType::Regular, b"", None),
            ("bin/sh", tar::EntryType::Symlink, b"", Some("/bin/busybox")),
            ("etc/rel", tar::EntryType::Symlink, b"", Some("hello")),
            ("etc/hard", tar::EntryType::Link, b"", Some("./etc/hello")),
            ("/abs/hard", tar::EntryType::Link, b"", Some("/etc/hello")),
            ("dev/sda", tar::EntryType::Block, b"", None),
            ("run/fifo", tar::EntryType::Fifo, b"", None),
            // A later entry replaces an earlier one, never through it.
            ("etc/swap", tar::EntryType::Symlink, b"", Some("/etc/passwd")),
            ("etc/swap", tar::EntryType::Regular, b"file\n", None),
        ]);
        let dest = tempfile::tempdir().unwrap();
        unpack_to(blob.path(), dest.path()).unwrap();
        let d = dest.path();
        assert_eq!(fs::read(d.join("etc/hello")).unwrap(), b"hi\n");
        assert!(
            fs::symlink_metadata(d.join("etc/gone"))
                .unwrap()
                .file_type()
                .is_char_device()
        );
        assert_eq!(
            fs::read_link(d.join("bin/sh")).unwrap(),
            Path::new("/bin/busybox")
        );
        assert_eq!(fs::read(d.join("etc/rel")).unwrap(), b"hi\n");
        assert_eq!(fs::metadata(d.join("etc/hello")).unwrap().nlink(), 3);
        assert_eq!(fs::read(d.join("abs/hard")).unwrap(), b"hi\n");
        assert!(!d.join("dev/sda").exists());
        assert!(d.join("var").is_dir());
        assert!(
            fs::symlink_metadata(d.join("run/fifo"))
                .unwrap()
                .file_type()
                .is_fifo()
        );
        assert_eq!(fs::read(d.join("etc/swap")).unwrap(), b"file\n");
        assert_eq!(
            fs::metadata(d.join("etc")).unwrap().mtime(),
            0,
            "directory times are set last"
        );
    }

    #[test]
    fn owners_are_shifted_for_user_namespaces() {
        let blob = layer(&[
            ("bin/", tar::EntryType::Directory, b"", None),
            ("bin/su", tar::EntryType::Regular, b"x", None),
            ("etc/.wh.gone", tar::EntryType::Regular, b"", None),
        ]);
        let dest = tempfile::tempdir().unwrap();
        unpack(blob.path(), Format::Gzip, "d", dest.path(), 100_000).unwrap();
        let m = fs::metadata(dest.path().join("bin/su")).unwrap();
        assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (100_000, 100_000, 0o755));
        // A directory made on the way to a whiteout belongs to the container's root too.
        assert_eq!(fs::metadata(dest.path().join("etc")).unwrap().uid(), 100_000);
        assert_eq!(fs::metadata(dest.path()).unwrap().uid(), 100_000);
    }

    /// Each attack: a canary outside the layer stays as it was, and the
    /// error names the entry.
    #[test]
    fn escaping_entries_refuse_the_layer_and_touch_nothing_outside() {
        let canary = tempfile::tempdir().unwrap();
        let c = canary.path().display().to_string();
        fs::write(canary.path().join("victim"), "precious").unwrap();
        let deep = format!("../../../../../../../../..{c}/victim");
        let victim = format!("{c}/victim");
        let cases: Vec<(Vec<Spec<'_>>, &str, &str)> = vec![
            (
                vec![("../evil", tar::EntryType::Regular, b"x", None)],
                "../evil",
                "climbs out",
            ),
            (
                vec![("a/../../evil", tar::EntryType::Regular, b"x", None)],
                "a/../../evil",
                "climbs out",
            ),
            (
                vec![(deep.as_str(), tar::EntryType::Regular, b"pwned", None)],
                deep.as_str(),
                "climbs out",
            ),
            (
                vec![
                    ("x", tar::EntryType::Symlink, b"", Some(c.as_str())),
                    ("x/.wh.victim", tar::EntryType::Regular, b"", None),
                ],
                "x/.wh.victim",
                "goes through \"x\", a symlink",
            ),
            (
                vec![
                    ("x", tar::EntryType::Symlink, b"", Some(c.as_str())),
                    ("x/new/.wh..wh..opq", tar::EntryType::Regular, b"", None),
                ],
                "x/new/.wh..wh..opq",
                "goes through \"x\", a symlink",
            ),
            (
                vec![
                    ("x", tar::EntryType::Symlink, b"", Some(c.as_str())),
                    ("x/.wh..wh..opq", tar::EntryType::Regular, b"", None),
                ],
                "x/.wh..wh..opq",
                "goes through \"x\", a symlink",
            ),
            (
                vec![
                    ("x", tar::EntryType::Symlink, b"", Some(c.as_str())),
                    ("x/victim", tar::EntryType::Regular, b"pwned", None),
                ],
                "x/victim",
                "a symlink",
            ),
            (
                vec![
                    ("d/x", tar::EntryType::Symlink, b"", Some(deep.as_str())),
                    ("d/x/sub/", tar::EntryType::Directory, b"", None),
                ],
                "d/x/sub/",
                "goes through \"d/x\", a symlink",
            ),
            (
                vec![("h", tar::EntryType::Link, b"", Some(deep.as_str()))],
                "h",
                "climbs out",
            ),
            (
                vec![("h", tar::EntryType::Link, b"", Some(victim.as_str()))],
                "h",
                "names no file",
            ),
            (
                vec![
                    ("x", tar::EntryType::Symlink, b"", Some(c.as_str())),
                    ("h", tar::EntryType::Link, b"", Some("x/victim")),
                ],
                "h",
                "goes through \"x\", a symlink",
            ),
            (
                vec![("x/.wh...", tar::EntryType::Regular, b"", None)],
                "x/.wh...",
                "whites out \"..\"",
            ),
        ];
        for (entries, entry, why) in cases {
            let blob = layer(&entries);
            let dest = tempfile::tempdir().unwrap();
            let e = unpack(blob.path(), Format::Gzip, "sha256:bad", dest.path(), 0).unwrap_err();
            let msg = e.to_string();
            assert!(msg.contains("layer sha256:bad"), "{msg}");
            assert!(msg.contains(&format!("entry {entry:?}")), "{entry}: {msg}");
            assert!(msg.contains(why), "{entry}: {msg}");
            let names: Vec<_> = fs::read_dir(canary.path())
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert_eq!(names, ["victim"], "{entry}");
            let m = fs::metadata(canary.path().join("victim")).unwrap();
            assert_eq!(
                (
                    fs::read_to_string(canary.path().join("victim")).unwrap().as_str(),
                    m.nlink()
                ),
                ("precious", 1),
                "{entry}"
            );
        }
    }
}
