//! Unpacking one image layer into a directory that overlayfs can stack:
//! OCI whiteouts (`.wh.NAME`) become overlay whiteouts (a 0/0 character
//! device), opaque directories (`.wh..wh..opq`) get `trusted.overlay.opaque`,
//! device nodes are skipped, and an entry whose path or link target would
//! leave the layer's root refuses the whole layer.

use std::fs;
use std::io::{self, BufReader, Read};
use std::path::{Component, Path, PathBuf};

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";

/// Why a layer cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("entry {0:?} would leave the layer's root")]
    Escapes(String),
    #[error("zstd-compressed layers are not supported; push the image with gzip layers")]
    Zstd,
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// A path inside the layer, or `None` if it would leave it.
fn inside(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            Component::RootDir => {}
            _ => return None,
        }
    }
    Some(out)
}

/// Opens a layer blob, gzip or plain tar (by its first bytes).
fn open(blob: &Path) -> Result<Box<dyn Read>, LayerError> {
    let mut f = fs::File::open(blob)?;
    let mut magic = [0u8; 4];
    let n = f.read(&mut magic)?;
    drop(f);
    let f = BufReader::new(fs::File::open(blob)?);
    match &magic[..n] {
        [0x1f, 0x8b, ..] => Ok(Box::new(flate2::read::GzDecoder::new(f))),
        [0x28, 0xb5, 0x2f, 0xfd] => Err(LayerError::Zstd),
        _ => Ok(Box::new(f)),
    }
}

/// Unpacks the layer `blob` into `dest` (which must exist and be empty).
/// Owners are shifted by `shift` (for containers in a user namespace whose
/// root is host uid `shift`).
pub fn unpack(blob: &Path, dest: &Path, shift: u32) -> Result<(), LayerError> {
    let mut archive = tar::Archive::new(open(blob)?);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_preserve_mtime(true);
    archive.set_unpack_xattrs(true);
    archive.set_overwrite(true);
    for entry in archive.entries()? {
        let mut entry = entry?;
        let raw = entry.path()?.into_owned();
        let shown = raw.display().to_string();
        let rel = inside(&raw).ok_or_else(|| LayerError::Escapes(shown.clone()))?;
        if rel.as_os_str().is_empty() {
            continue;
        }
        let kind = entry.header().entry_type();
        if kind.is_block_special() || kind.is_character_special() {
            continue; // containers get their own /dev
        }
        if kind.is_hard_link() || kind.is_symlink() {
            let target = entry
                .link_name()?
                .ok_or_else(|| LayerError::Escapes(shown.clone()))?;
            // Symlinks may point anywhere (they resolve inside the container);
            // hard links must name a file of this layer.
            if kind.is_hard_link() && inside(&target).is_none() {
                return Err(LayerError::Escapes(format!("{shown} -> {}", target.display())));
            }
        }
        let name = rel
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        let parent = dest.join(rel.parent().unwrap_or(Path::new("")));
        if name == OPAQUE {
            fs::create_dir_all(&parent)?;
            xattr_set(&parent, "trusted.overlay.opaque", b"y")?;
            continue;
        }
        if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
            fs::create_dir_all(&parent)?;
            let target = parent.join(hidden);
            let _ = fs::remove_file(&target);
            nix::sys::stat::mknod(
                &target,
                nix::sys::stat::SFlag::S_IFCHR,
                nix::sys::stat::Mode::empty(),
                nix::sys::stat::makedev(0, 0),
            )
            .map_err(io::Error::from)?;
            continue;
        }
        if !entry.unpack_in(dest)? {
            return Err(LayerError::Escapes(shown));
        }
    }
    if shift > 0 {
        shift_owners(dest, shift)?;
    }
    Ok(())
}

/// Adds `shift` to the owner of everything under `dir` (also of the
/// directories made on the way, which belong to host root until now).
fn shift_owners(dir: &Path, shift: u32) -> io::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        let m = fs::symlink_metadata(&p)?;
        std::os::unix::fs::lchown(
            &p,
            Some(m.uid().saturating_add(shift)),
            Some(m.gid().saturating_add(shift)),
        )?;
        if m.file_type().is_symlink() {
            continue;
        }
        // chown clears set-id bits: put the mode back.
        fs::set_permissions(&p, fs::Permissions::from_mode(m.mode() & 0o7777))?;
        if m.is_dir() {
            for e in fs::read_dir(&p)? {
                stack.push(e?.path());
            }
        }
    }
    Ok(())
}

fn xattr_set(path: &Path, name: &str, value: &[u8]) -> io::Result<()> {
    let p = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    let n = std::ffi::CString::new(name)?;
    // SAFETY: both strings are NUL-terminated and live across the call;
    // value points to `value.len()` readable bytes.
    let rc = unsafe { libc::lsetxattr(p.as_ptr(), n.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(entries: &[(&str, tar::EntryType, &[u8], Option<&str>)]) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        let gz = flate2::write::GzEncoder::new(f.reopen().unwrap(), flate2::Compression::fast());
        let mut b = tar::Builder::new(gz);
        for (path, kind, data, link) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_mode(0o755);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            h.set_size(data.len() as u64);
            if let Some(l) = link {
                h.set_link_name(l).unwrap();
            }
            // Bypass the builder's own path checks: layers come from anyone.
            let name = path.as_bytes();
            h.as_old_mut().name[..name.len()].copy_from_slice(name);
            h.set_cksum();
            b.append(&h, *data).unwrap();
        }
        b.into_inner().unwrap().finish().unwrap();
        f
    }

    #[test]
    fn files_whiteouts_and_opaque_dirs() {
        let blob = layer(&[
            ("etc/", tar::EntryType::Directory, b"", None),
            ("etc/hello", tar::EntryType::Regular, b"hi\n", None),
            ("etc/.wh.gone", tar::EntryType::Regular, b"", None),
            ("var/.wh..wh..opq", tar::EntryType::Regular, b"", None),
            ("bin/sh", tar::EntryType::Symlink, b"", Some("/bin/busybox")),
            ("dev/sda", tar::EntryType::Block, b"", None),
        ]);
        let dest = tempfile::tempdir().unwrap();
        unpack(blob.path(), dest.path(), 0).unwrap();
        assert_eq!(fs::read(dest.path().join("etc/hello")).unwrap(), b"hi\n");
        let wh = fs::symlink_metadata(dest.path().join("etc/gone")).unwrap();
        use std::os::unix::fs::FileTypeExt;
        assert!(wh.file_type().is_char_device());
        assert_eq!(
            fs::read_link(dest.path().join("bin/sh")).unwrap(),
            Path::new("/bin/busybox")
        );
        assert!(!dest.path().join("dev/sda").exists());
        assert!(dest.path().join("var").is_dir());
    }

    #[test]
    fn owners_are_shifted_for_user_namespaces() {
        use std::os::unix::fs::MetadataExt;
        let blob = layer(&[
            ("bin/", tar::EntryType::Directory, b"", None),
            ("bin/su", tar::EntryType::Regular, b"x", None),
            ("etc/.wh.gone", tar::EntryType::Regular, b"", None),
        ]);
        let dest = tempfile::tempdir().unwrap();
        unpack(blob.path(), dest.path(), 100_000).unwrap();
        let m = fs::metadata(dest.path().join("bin/su")).unwrap();
        assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (100_000, 100_000, 0o755));
        // A directory made on the way to a whiteout belongs to the container's root too.
        assert_eq!(fs::metadata(dest.path().join("etc")).unwrap().uid(), 100_000);
    }

    #[test]
    fn an_escaping_entry_refuses_the_layer() {
        for (path, kind, link) in [
            ("../evil", tar::EntryType::Regular, None),
            ("a/../../evil", tar::EntryType::Regular, None),
            ("hl", tar::EntryType::Link, Some("../../etc/passwd")),
        ] {
            let blob = layer(&[(path, kind, b"x", link)]);
            let dest = tempfile::tempdir().unwrap();
            let e = unpack(blob.path(), dest.path(), 0).unwrap_err();
            assert!(matches!(e, LayerError::Escapes(_)), "{path}: {e}");
        }
    }
}
