//! Work trees without writing them: next to each mirror, a checked-out tree
//! of one commit (the *base*) and, per other commit a job asked for, a small
//! *delta* layer (the files that differ from the base, overlay whiteouts for
//! what the commit does not have). A job's workspace is then an overlay of
//! delta and base under the job's own writable layer, mounted in constant
//! time: on a file system where creating a file is expensive this is most of
//! a warm checkout (see BENCHMARKS.md). Nothing a job writes reaches the
//! layers, which are never changed once made.
//!
//! Layout under `NAME.trees/`: `base` (the base's commit id), `base-<id>/`,
//! `delta-<base id>-<id>/`, each with a `.lock` file beside it; `tmp-*`
//! while one is being made. `NAME.trees.lock` is held to make or remove
//! layers; a job holds the lock file of each layer it mounts shared until it
//! ends, and a layer is removed only when its lock can be taken
//! exclusively, so old layers go even while other jobs run.
//!
//! A job that asks for Git LFS gets layers of its own, `NAME-lfs.trees/`
//! (same layout), whose LFS pointers were written as their objects.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use git2::{Delta, DiffOptions, Oid, Repository, Tree};
use nix::fcntl::{Flock, FlockArg};
use nix::sys::stat::{Mode, SFlag, mknod};

use super::lfs::Store;
use crate::sys::lockfile;
use crate::sys::mount::bind_all_idmapped;
use crate::sys::userns::{IdRange, UserNs, chown_tree};

/// Past this many changed paths a delta is not worth it: a new base is made.
const MAX_DELTA: usize = 256;
/// Deltas kept per base when old layers are collected.
const KEEP_DELTAS: usize = 16;

fn other(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

/// The read-only layers of a commit's work tree, top first, each locked
/// (shared) against removal while this lives.
pub(crate) struct Layers {
    pub dirs: Vec<PathBuf>,
    locks: Vec<Flock<File>>,
}

impl Layers {
    /// Keeps the layers from removal until `self` is dropped.
    pub(crate) fn into_locks(self) -> Vec<Flock<File>> {
        self.locks
    }
}

fn layer_lock(dir: &Path) -> PathBuf {
    dir.with_extension("lock")
}

/// The layers of `commit`'s work tree; made when missing. `trees` is the
/// mirror's `NAME.trees` directory (`NAME-lfs.trees` with `lfs`, whose
/// objects smudge the pointers). Layers no job uses any more go when a
/// new one is made.
pub(crate) fn layers(
    mirror: &Repository,
    trees: &Path,
    commit: Oid,
    lfs: Option<&Store>,
) -> io::Result<Layers> {
    fs::create_dir_all(trees)?;
    let _lock = lockfile::lock(&trees.with_extension("trees.lock"), FlockArg::LockExclusive)?;
    let dirs = find_or_make(mirror, trees, commit, lfs)?;
    let mut locks = Vec::new();
    for d in &dirs {
        locks.push(lockfile::lock(&layer_lock(d), FlockArg::LockShared)?);
    }
    Ok(Layers { dirs, locks })
}

fn find_or_make(
    mirror: &Repository,
    trees: &Path,
    commit: Oid,
    lfs: Option<&Store>,
) -> io::Result<Vec<PathBuf>> {
    let tree = mirror.find_commit(commit).and_then(|c| c.tree()).map_err(other)?;
    if let Some(base) = current_base(trees) {
        let base_dir = trees.join(format!("base-{base}"));
        if base == commit {
            return Ok(vec![base_dir]);
        }
        let delta_dir = trees.join(format!("delta-{base}-{commit}"));
        if delta_dir.is_dir() {
            return Ok(vec![delta_dir, base_dir]);
        }
        let base_tree = mirror.find_commit(base).and_then(|c| c.tree()).map_err(other)?;
        if let Some(()) = write_delta(mirror, &base_tree, &tree, commit, trees, &delta_dir, lfs)? {
            collect(trees);
            return Ok(vec![delta_dir, base_dir]);
        }
    }
    let base_dir = trees.join(format!("base-{commit}"));
    if !base_dir.is_dir() {
        let tmp = tempfile::Builder::new().prefix("tmp-").tempdir_in(trees)?;
        write_files(mirror, commit, tmp.path(), None, lfs)?;
        fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755))?;
        fs::rename(tmp.keep(), &base_dir)?;
    }
    let marker = trees.join("base.tmp");
    fs::write(&marker, commit.to_string())?;
    fs::rename(&marker, trees.join("base"))?;
    collect(trees);
    Ok(vec![base_dir])
}

/// Writes the files of `commit` (only `only`, when given) into `dir`, as
/// a checkout would ([`super::worktree`]: the commit's own attributes).
fn write_files(
    mirror: &Repository,
    commit: Oid,
    dir: &Path,
    only: super::worktree::Only<'_>,
    lfs: Option<&Store>,
) -> io::Result<()> {
    super::worktree::write(
        mirror.path(),
        commit,
        dir,
        only,
        false,
        lfs,
        None,
        &AtomicBool::new(false),
    )
    .map(drop)
}

fn current_base(trees: &Path) -> Option<Oid> {
    let id = fs::read_to_string(trees.join("base")).ok()?;
    let oid = Oid::from_str(id.trim()).ok()?;
    trees.join(format!("base-{oid}")).is_dir().then_some(oid)
}

/// Writes what `to` changes against `from` into `dest`, made atomically.
/// `None` when a delta will not do (too many changes, or a change to
/// `.gitattributes`, which may change how every file is written).
fn write_delta(
    repo: &Repository,
    from: &Tree,
    to: &Tree,
    commit: Oid,
    trees: &Path,
    dest: &Path,
    lfs: Option<&Store>,
) -> io::Result<Option<()>> {
    let mut opts = DiffOptions::new();
    opts.include_typechange(true);
    let diff = repo
        .diff_tree_to_tree(Some(from), Some(to), Some(&mut opts))
        .map_err(other)?;
    if diff.deltas().len() > MAX_DELTA {
        return Ok(None);
    }
    let mut written = Vec::new();
    let mut gone = Vec::new();
    for d in diff.deltas() {
        let new_path = d.new_file().path().map(Path::to_path_buf);
        let old_path = d.old_file().path().map(Path::to_path_buf);
        if [&new_path, &old_path].iter().any(|p| {
            p.as_ref()
                .and_then(|p| p.file_name())
                .is_some_and(|n| n == ".gitattributes")
        }) {
            return Ok(None);
        }
        match d.status() {
            Delta::Deleted => gone.extend(old_path),
            Delta::Typechange => {
                gone.extend(old_path);
                written.extend(new_path);
            }
            _ => written.extend(new_path),
        }
    }
    let tmp = tempfile::Builder::new().prefix("tmp-").tempdir_in(trees)?;
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755))?;
    // What the commit has, written as a checkout writes it (attributes,
    // modes, symlinks, path checks), restricted to these paths.
    if !written.is_empty() {
        let only: HashSet<Vec<u8>> = written
            .iter()
            .map(|p| p.as_os_str().as_bytes().to_vec())
            .collect();
        write_files(repo, commit, tmp.path(), Some(&|p: &[u8]| only.contains(p)), lfs)?;
    }
    // What it does not have: a whiteout at the highest directory that is
    // gone, else at the file; nothing under a path the delta replaces.
    let mut whited = Vec::<PathBuf>::new();
    for path in gone {
        let Some(rel) = super::contained_path(Path::new("/"), &path.to_string_lossy()) else {
            return Ok(None);
        };
        let rel = rel.strip_prefix("/").map_err(other)?.to_path_buf();
        let mut target = rel.clone();
        for a in rel.ancestors().skip(1) {
            if a.as_os_str().is_empty() {
                break;
            }
            if to.get_path(a).is_err() {
                target = a.to_path_buf();
            }
        }
        if whited.iter().any(|w| target.starts_with(w)) || replaced_by_file(tmp.path(), &target) {
            continue;
        }
        let at = tmp.path().join(&target);
        if let Some(parent) = at.parent() {
            fs::DirBuilder::new().recursive(true).mode(0o755).create(parent)?;
        }
        if fs::symlink_metadata(&at).is_ok() {
            continue; // a typechange: the new entry is already there
        }
        mknod(&at, SFlag::S_IFCHR, Mode::empty(), 0).map_err(other)?;
        whited.push(target);
    }
    fs::rename(tmp.keep(), dest)?;
    Ok(Some(()))
}

/// Whether an ancestor of `rel` is a non-directory in `layer`.
fn replaced_by_file(layer: &Path, rel: &Path) -> bool {
    rel.ancestors()
        .skip(1)
        .filter(|a| !a.as_os_str().is_empty())
        .any(|a| fs::symlink_metadata(layer.join(a)).is_ok_and(|m| !m.is_dir()))
}

/// Removes the layers no job has mounted, but the current base and its
/// newest deltas; and what a crash left half made. Call with
/// `NAME.trees.lock` held.
fn collect(trees: &Path) {
    let Ok(entries) = fs::read_dir(trees) else {
        return;
    };
    let base = current_base(trees).map(|b| b.to_string());
    let mut deltas = Vec::new();
    let mut old = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue; // `base`, lock files: they go with their layer
        }
        match &base {
            Some(b) if name == format!("base-{b}") => {}
            Some(b) if name.starts_with(&format!("delta-{b}-")) => {
                let mtime = e.metadata().and_then(|m| m.modified()).ok();
                deltas.push((mtime, e.path()));
            }
            _ => old.push(e.path()),
        }
    }
    deltas.sort();
    let surplus = deltas.len().saturating_sub(KEEP_DELTAS);
    old.extend(deltas.into_iter().take(surplus).map(|(_, p)| p));
    for dir in old {
        let lock = layer_lock(&dir);
        // Mounted by a running job: its turn comes later.
        let Some(_unused) = lockfile::try_exclusive(&lock) else {
            continue;
        };
        match fs::remove_dir_all(&dir) {
            Ok(()) => {
                let _ = fs::remove_file(&lock);
            }
            Err(e) => {
                tracing::warn!(path = %dir.display(), error = %e, "cannot remove an old work tree layer")
            }
        }
    }
}

/// Mounts `lower` (top first) under a new writable layer at `workspace`;
/// the writable layer lives beside it (`workspace.upper`, `.work`) and goes
/// with the job's run directory.
pub(crate) fn mount(workspace: &Path, lower: &[PathBuf]) -> io::Result<()> {
    fs::DirBuilder::new()
        .mode(0o755)
        .create(workspace.with_extension("work"))?;
    mount_again(workspace, lower)
}

/// Mounts the workspace overlay with the writable layer [`mount`] made.
fn mount_again(workspace: &Path, lower: &[PathBuf]) -> io::Result<()> {
    let upper = workspace.with_extension("upper");
    let work = workspace.with_extension("work");
    let lower: Vec<&Path> = lower.iter().map(PathBuf::as_path).collect();
    crate::sys::mount::mount_overlay(workspace, &lower, &upper, &work)
        .map_err(|e| other(format!("cannot mount the workspace overlay: {e}")))
}

/// Makes the writable layer of the workspace overlay, empty, with the
/// workspace's mode (the overlay's root takes it).
pub(crate) fn prepare_upper(workspace: &Path) -> io::Result<PathBuf> {
    let upper = workspace.with_extension("upper");
    let _ = fs::remove_dir_all(&upper);
    fs::DirBuilder::new().mode(0o700).create(&upper)?;
    fs::set_permissions(&upper, fs::metadata(workspace)?.permissions())?;
    Ok(upper)
}

/// Lays the mounted `workspace` over `lower` again, each layer now bound
/// read-only and idmapped so that its files (owned by host root on disk)
/// show as owned by `uid:gid`, the step user as the host sees it; its
/// writable layer (`.git`, submodules) is given to them. No file of the
/// tree is copied or changed. `Ok(Err(e))`: idmapped mounts cannot be had
/// here, and the workspace is laid over `lower` as it was; `Err`: the
/// workspace could not be mounted again at all.
pub(crate) fn remount_idmapped(
    workspace: &Path,
    lower: &[PathBuf],
    uid: u32,
    gid: u32,
) -> io::Result<io::Result<()>> {
    let upper = workspace.with_extension("upper");
    nix::mount::umount2(workspace, nix::mount::MntFlags::empty()).map_err(other)?;
    let laid = chown_tree(&upper, uid, gid).and_then(|_| mount_idmapped(workspace, lower, uid, gid));
    if let Err(e) = laid {
        unmount_binds(workspace)?;
        mount_again(workspace, lower)?;
        return Ok(Err(e));
    }
    Ok(Ok(()))
}

fn mount_idmapped(workspace: &Path, lower: &[PathBuf], uid: u32, gid: u32) -> io::Result<()> {
    let ns = UserNs::new(&[IdRange::from_zero(uid, 1)], &[IdRange::from_zero(gid, 1)])?;
    let lower: Vec<&Path> = lower.iter().map(PathBuf::as_path).collect();
    let mapped = bind_all_idmapped(&lower, &workspace.with_extension("lower"), ns.as_fd())?;
    mount_again(workspace, &mapped)
}

/// Detaches and removes the idmapped binds of [`remount_idmapped`].
fn unmount_binds(workspace: &Path) -> io::Result<()> {
    let binds = workspace.with_extension("lower");
    for m in crate::sys::mount::mounts_under(&binds)?.into_iter().rev() {
        nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH).map_err(other)?;
    }
    match fs::remove_dir_all(&binds) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Undoes [`mount`] (and [`remount_idmapped`]): unmounts the workspace
/// and removes its writable layer.
pub(crate) fn unmount(workspace: &Path) -> io::Result<()> {
    if crate::sys::mount::mounts_under(workspace)?.is_empty() {
        return unmount_binds(workspace);
    }
    nix::mount::umount2(workspace, nix::mount::MntFlags::MNT_DETACH).map_err(other)?;
    unmount_binds(workspace)?;
    for d in [
        workspace.with_extension("upper"),
        workspace.with_extension("work"),
    ] {
        let _ = fs::remove_dir_all(d);
    }
    Ok(())
}

/// The workspace's repository for `commit` over a mounted tree: HEAD (on
/// `branch` when it names one) and an index of the commit's tree, written
/// without touching the work tree.
pub(crate) fn adopt(repo: &Repository, commit: Oid, branch: Option<&str>) -> Result<(), git2::Error> {
    let c = repo.find_commit(commit)?;
    super::set_head(repo, commit, branch)?;
    let mut index = repo.index()?;
    index.read_tree(&c.tree()?)?;
    index.write()
}
