//! Files out of and into a job's container: the `runnel store-io`
//! process. It joins the container's user and mount namespaces, becomes
//! the step's user, and only then touches a path: every path and symlink
//! resolves inside the container, as the step's own would, with the step
//! user's rights. It packs paths into a tar (+ zstd) stream on stdout, or
//! unpacks one from stdin into a directory, refusing entries that would
//! land outside it (`..`, absolute names, links, through a symlink the
//! archive made). The agent moves the bytes to and from the store.
//!
//! Joining a user namespace needs a single-threaded process: the join is
//! the first thing the process does, before any thread (zstd's workers)
//! starts.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

/// Joins the namespaces of the container whose init is `pid` (as the host
/// sees it) and becomes `uid:gid` there, with no other group and no way
/// to gain privileges. Must run before the process has a second thread.
pub fn join(pid: i32, uid: u32, gid: u32) -> Result<(), String> {
    let open = |ns: &str| {
        let path = format!("/proc/{pid}/ns/{ns}");
        std::fs::File::open(&path).map_err(|e| format!("cannot open {path}: {e}"))
    };
    let user = open("user")?;
    let mnt = open("mnt")?;
    let own = std::fs::metadata("/proc/self/ns/user")
        .map_err(|e| format!("cannot stat /proc/self/ns/user: {e}"))?;
    let theirs = user
        .metadata()
        .map_err(|e| format!("cannot stat the container's user namespace: {e}"))?;
    if (own.dev(), own.ino()) != (theirs.dev(), theirs.ino()) {
        nix::sched::setns(user.as_fd(), nix::sched::CloneFlags::CLONE_NEWUSER)
            .map_err(|e| format!("cannot join the container's user namespace: {e}"))?;
    }
    // Root and working directory become the container's root.
    nix::sched::setns(mnt.as_fd(), nix::sched::CloneFlags::CLONE_NEWNS)
        .map_err(|e| format!("cannot join the container's mount namespace: {e}"))?;
    drop((user, mnt));
    std::env::set_current_dir("/").map_err(|e| format!("cannot chdir to the container's root: {e}"))?;
    let gid = nix::unistd::Gid::from_raw(gid);
    nix::unistd::setgroups(&[gid]).map_err(|e| format!("cannot drop the agent's groups: {e}"))?;
    nix::unistd::setresgid(gid, gid, gid).map_err(|e| format!("cannot become group {gid}: {e}"))?;
    let uid = nix::unistd::Uid::from_raw(uid);
    nix::unistd::setresuid(uid, uid, uid).map_err(|e| format!("cannot become user {uid}: {e}"))?;
    // The agent's root is not mapped in the container's namespace, so
    // the kernel's "root becomes a user: capabilities cleared" does not
    // apply: the join left every capability of the namespace in place
    // (a save as uid 1000 read a root-only 0600 file). Set them as the
    // step's would be: none for a user, a root's file rights for root.
    let caps: u32 = if uid.is_root() {
        // CAP_CHOWN 0, CAP_DAC_OVERRIDE 1, CAP_FOWNER 3, CAP_FSETID 4.
        [0u32, 1, 3, 4].iter().fold(0, |m, c| m | 1 << c)
    } else {
        0
    };
    set_capabilities(caps)?;
    // SAFETY: prctl with integer arguments.
    unsafe {
        // Not inspectable by the container's processes; no setuid gains;
        // gone with the agent (a change of ids cleared the death signal).
        if libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) != 0
            || libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
            || libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0
        {
            return Err(format!(
                "cannot restrict the process: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(())
}

/// Effective and permitted capabilities exactly `mask` (of the first 32),
/// none inheritable or ambient.
fn set_capabilities(mask: u32) -> Result<(), String> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    let mut header = Header {
        version: VERSION_3,
        pid: 0,
    };
    let data = [
        Data {
            effective: mask,
            permitted: mask,
            inheritable: 0,
        },
        Data {
            effective: 0,
            permitted: 0,
            inheritable: 0,
        },
    ];
    // SAFETY: capset reads a version-3 header and two data structs, both
    // alive for the call; prctl takes integers.
    let r = unsafe {
        libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0);
        libc::syscall(libc::SYS_capset, &mut header as *mut Header, data.as_ptr())
    };
    if r != 0 {
        return Err(format!(
            "cannot drop capabilities: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// `path` as the step means it: `~` is its home, a relative path is
/// under `cwd`; `.` and `..` resolved by name.
pub fn resolve(path: &str, cwd: &str, home: &str) -> PathBuf {
    let p = if path == "~" {
        PathBuf::from(home)
    } else if let Some(rest) = path.strip_prefix("~/") {
        Path::new(home).join(rest)
    } else {
        Path::new(cwd).join(path)
    };
    let mut out = PathBuf::from("/");
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => {
                out.pop();
            }
            _ => {}
        }
    }
    out
}

/// What a pack or unpack did.
#[derive(Debug, Default)]
pub struct Counts {
    pub paths: usize,
    pub refused: usize,
}

/// Packs `paths` (each under `base`) into a tar on `out`, zstd-compressed
/// when `zstd`; names in it are relative to `base`. Symlinks are kept as
/// links, never followed. A path that is missing or not under `base` is
/// a warning on stderr.
pub fn pack<W: Write>(base: &Path, paths: &[PathBuf], zstd: bool, out: W) -> Result<Counts, String> {
    let write_err = |e: std::io::Error| format!("cannot write the archive: {e}");
    if !zstd {
        let (counts, mut out) = pack_tar(base, paths, out)?;
        out.flush().map_err(write_err)?;
        return Ok(counts);
    }
    let mut enc = zstd::stream::write::Encoder::new(out, 3).map_err(|e| format!("zstd: {e}"))?;
    // Two workers beside the walk: what `zstd -T2` does.
    let _ = enc.multithread(2);
    let (counts, enc) = pack_tar(base, paths, enc)?;
    enc.finish().and_then(|mut out| out.flush()).map_err(write_err)?;
    Ok(counts)
}

fn pack_tar<W: Write>(base: &Path, paths: &[PathBuf], out: W) -> Result<(Counts, W), String> {
    let mut counts = Counts::default();
    let mut tar = tar::Builder::new(out);
    tar.follow_symlinks(false);
    tar.mode(tar::HeaderMode::Complete);
    for path in paths {
        let Ok(rel) = path.strip_prefix(base) else {
            eprintln!(
                "warning: {} is not under {}: skipped",
                path.display(),
                base.display()
            );
            continue;
        };
        let meta = match std::fs::symlink_metadata(path) {
            Ok(m) => m,
            Err(e) => {
                eprintln!("warning: {}: {e}: skipped", path.display());
                continue;
            }
        };
        let added = if meta.is_dir() {
            let name = if rel.as_os_str().is_empty() {
                Path::new(".")
            } else {
                rel
            };
            tar.append_dir_all(name, path)
        } else {
            let name = if rel.as_os_str().is_empty() {
                Path::new(path.file_name().unwrap_or_default())
            } else {
                rel
            };
            tar.append_path_with_name(path, name)
        };
        added.map_err(|e| format!("cannot pack {}: {e}", path.display()))?;
        counts.paths += 1;
    }
    let out = tar
        .into_inner()
        .map_err(|e| format!("cannot write the archive: {e}"))?;
    Ok((counts, out))
}

/// The name of an archive entry as a relative path of normal
/// components; `None` for one that would climb out (`..`, absolute).
fn contained(name: &Path) -> Option<PathBuf> {
    let mut rel = PathBuf::new();
    for c in name.components() {
        match c {
            Component::Normal(n) => rel.push(n),
            Component::CurDir => {}
            _ => return None,
        }
    }
    Some(rel)
}

/// Unpacks the tar + zstd stream `input` into `into` (made if missing).
/// An entry whose name climbs out of `into`, a hard link or device, and
/// an entry under a symlink the archive itself made are refused (a
/// warning on stderr each), and nothing is written through a symlink
/// that leads out of `into`.
pub fn unpack(into: &Path, input: impl Read) -> Result<Counts, String> {
    std::fs::create_dir_all(into).map_err(|e| format!("cannot make {}: {e}", into.display()))?;
    let dec = zstd::stream::read::Decoder::new(input).map_err(|e| format!("zstd: {e}"))?;
    let mut ar = tar::Archive::new(dec);
    ar.set_overwrite(true);
    ar.set_preserve_mtime(true);
    ar.set_unpack_xattrs(false);
    let mut counts = Counts::default();
    let mut links: HashSet<PathBuf> = HashSet::new();
    let refuse = |counts: &mut Counts, name: &Path, why: &str| {
        eprintln!("refused: {}: {why}", name.display());
        counts.refused += 1;
    };
    let entries = ar
        .entries()
        .map_err(|e| format!("cannot read the archive: {e}"))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| format!("cannot read the archive: {e}"))?;
        let name = entry
            .path()
            .map_err(|e| format!("cannot read the archive: {e}"))?
            .into_owned();
        let Some(rel) = contained(&name) else {
            refuse(&mut counts, &name, "its name leads out of the directory");
            continue;
        };
        if rel.as_os_str().is_empty() {
            continue;
        }
        use tar::EntryType as T;
        match entry.header().entry_type() {
            T::Regular | T::Continuous | T::GNUSparse | T::Directory | T::Symlink => {}
            other => {
                refuse(&mut counts, &name, &format!("a {other:?} entry is not restored"));
                continue;
            }
        }
        if rel.ancestors().skip(1).any(|a| links.contains(a)) {
            refuse(&mut counts, &name, "it lies under a symlink the archive made");
            continue;
        }
        if entry.header().entry_type() == T::Symlink {
            links.insert(rel.clone());
        }
        match entry.unpack_in(into) {
            Ok(true) => counts.paths += 1,
            Ok(false) => refuse(&mut counts, &name, "it would land outside the directory"),
            Err(e) => refuse(&mut counts, &name, &format!("cannot write it: {e}")),
        }
    }
    Ok(counts)
}

/// sha256 (hex) of `path`'s content.
pub fn checksum(path: &Path) -> Result<String, String> {
    use sha2::Digest;
    let mut f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf).map_err(|e| format!("{}: {e}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tar + zstd archive of `entries`: (name, kind, content or link
    /// target), names written raw (as a hostile archive would).
    fn crafted(entries: &[(&str, tar::EntryType, &str)]) -> Vec<u8> {
        let mut tar = tar::Builder::new(Vec::new());
        for (name, kind, body) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_mode(0o644);
            h.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name.as_bytes());
            if *kind == tar::EntryType::Symlink || *kind == tar::EntryType::Link {
                h.set_link_name(body).unwrap();
                h.set_size(0);
                h.set_cksum();
                tar.append(&h, &[][..]).unwrap();
            } else {
                h.set_size(body.len() as u64);
                h.set_cksum();
                tar.append(&h, body.as_bytes()).unwrap();
            }
        }
        zstd::encode_all(&tar.into_inner().unwrap()[..], 1).unwrap()
    }

    #[test]
    fn a_hostile_archive_writes_nothing_outside_its_directory() {
        let dir = tempfile::tempdir().unwrap();
        let into = dir.path().join("into");
        let outside = dir.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        use tar::EntryType as T;
        let out = outside.display().to_string();
        let archive = crafted(&[
            ("ok.txt", T::Regular, "fine"),
            ("../escaped.txt", T::Regular, "no"),
            (&format!("{out}/absolute.txt"), T::Regular, "no"),
            ("link", T::Symlink, &out),
            ("link/through.txt", T::Regular, "no"),
            ("hard", T::Link, &format!("{out}/x")),
        ]);
        let counts = unpack(&into, &archive[..]).unwrap();
        assert_eq!(std::fs::read_to_string(into.join("ok.txt")).unwrap(), "fine");
        assert_eq!(counts.refused, 4, "{counts:?}");
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
        assert!(!dir.path().join("escaped.txt").exists());
    }

    #[test]
    fn pack_keeps_links_as_links_and_unpack_restores_them() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir_all(src.join("node_modules/a")).unwrap();
        std::fs::write(src.join("node_modules/a/index.js"), "x").unwrap();
        std::os::unix::fs::symlink("/etc/shadow", src.join("node_modules/shadow")).unwrap();
        let mut out = Vec::new();
        let c = pack(
            &src,
            &[src.join("node_modules"), src.join("missing")],
            true,
            &mut out,
        )
        .unwrap();
        assert_eq!(c.paths, 1);
        let into = dir.path().join("into");
        unpack(&into, &out[..]).unwrap();
        assert_eq!(
            std::fs::read_to_string(into.join("node_modules/a/index.js")).unwrap(),
            "x"
        );
        assert_eq!(
            std::fs::read_link(into.join("node_modules/shadow")).unwrap(),
            Path::new("/etc/shadow")
        );
    }

    #[test]
    fn paths_resolve_as_the_step_means_them() {
        assert_eq!(resolve("~/.npm", "/w", "/home/u"), Path::new("/home/u/.npm"));
        assert_eq!(resolve("node_modules", "/w", "/h"), Path::new("/w/node_modules"));
        assert_eq!(resolve("../../x", "/w", "/h"), Path::new("/x"));
        assert_eq!(resolve("/abs/./y", "/w", "/h"), Path::new("/abs/y"));
    }
}
