//! Warm checkouts: one bare mirror per normalised repository URL under
//! `state_dir/mirrors`, fetched incrementally **with the job's own keys and
//! pinned hosts** before every use (so a job never uses a mirror it could
//! not fetch itself). A workspace borrows the mirror's objects through
//! git's alternates instead of copying them, and its files are an overlay
//! of the mirror's checked-out trees ([`super::trees`]).
//!
//! Locks (flock, so they hold across threads and processes):
//! `NAME.fetch.lock` serialises fetches; `NAME.use.lock` is held shared by
//! every job whose workspace borrows the objects, and exclusively only to
//! rebuild a mirror found corrupt. Fetching only adds objects, so it never
//! needs to wait for jobs that use the mirror.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use std::collections::HashSet;

use git2::{Direction, FetchOptions, Repository};
use nix::fcntl::{Flock, FlockArg};
use sha2::{Digest, Sha256};

use super::auth::{Auth, Key};
use super::{CheckoutError, Refspec};
use crate::model::state::FailureKind;
use crate::sys::lockfile::{self, try_exclusive};

/// Where a mirror's objects appear inside the job's container.
pub const CONTAINER_DIR: &str = "/.runnel/mirrors";

/// The mirror store.
#[derive(Debug, Clone)]
pub struct Mirrors {
    dir: PathBuf,
}

/// A mirror a workspace borrows objects from; the shared lock is held
/// until this is dropped (at the end of the job).
#[derive(Debug)]
pub struct MirrorUse {
    /// The mirror's objects directory on the host.
    pub objects: PathBuf,
    /// ... and inside the container.
    pub container_objects: String,
    /// Its checked-out work trees (see [`super::trees`]).
    pub(crate) trees: PathBuf,
    /// The work tree layers the workspace is laid over (top first), and
    /// locks on them.
    pub(crate) layer_dirs: Vec<PathBuf>,
    pub(crate) layer_locks: Vec<Flock<File>>,
    _lock: Flock<File>,
}

impl MirrorUse {
    /// The cached work tree layers the workspace is laid over, top first;
    /// none when its files were written.
    pub fn layer_dirs(&self) -> &[PathBuf] {
        &self.layer_dirs
    }
}

/// `url` without what does not change the repository: the user, a trailing
/// `.git` or `/`, the case of the host.
pub fn normalise(url: &str) -> String {
    let url = url.trim().trim_end_matches('/').trim_end_matches(".git");
    if let Some(t) = super::auth::ssh_target(url) {
        let path = match url.split_once("://") {
            Some((_, rest)) => rest.split_once('/').map(|(_, p)| p).unwrap_or(""),
            None => url.split_once(':').map(|(_, p)| p).unwrap_or(""),
        };
        return format!(
            "ssh://{}:{}/{}",
            t.host.to_ascii_lowercase(),
            t.port,
            path.trim_start_matches('/')
        );
    }
    url.to_string()
}

fn agent_error(what: &str, e: impl std::fmt::Display) -> CheckoutError {
    CheckoutError::new(
        FailureKind::Agent,
        format!("{what}: the checkout cache failed: {e}"),
    )
}

impl Mirrors {
    pub fn new(dir: PathBuf) -> std::io::Result<Mirrors> {
        std::fs::create_dir_all(&dir)?;
        Ok(Mirrors { dir })
    }

    /// The Git LFS objects of every repository, by oid.
    pub(crate) fn lfs_store(&self) -> super::lfs::Store {
        super::lfs::Store::new(self.dir.join("lfs"))
    }

    fn name(url: &str) -> String {
        let d = Sha256::digest(normalise(url).as_bytes());
        d.iter().take(12).map(|b| format!("{b:02x}")).collect()
    }

    /// Brings the mirror of `url` up to date with the job's keys. Returns
    /// the mirror in use and the key the server accepted; `Ok(None)` when
    /// the mirror is unusable (found corrupt: it is rebuilt as soon as no
    /// job borrows it), in which case the caller checks out directly.
    pub(crate) fn update<'a>(
        &self,
        url: &str,
        auth: &'a Auth,
        cancel: &AtomicBool,
        what: &str,
        extra: &[Refspec],
    ) -> Result<Option<(MirrorUse, Option<&'a Key>)>, CheckoutError> {
        let name = Self::name(url);
        let path = self.dir.join(format!("{name}.git"));
        let use_lock = self.dir.join(format!("{name}.use.lock"));
        let corrupt = self.dir.join(format!("{name}.corrupt"));
        let trees = self.dir.join(format!("{name}.trees"));
        let _fetching = lockfile::lock(
            &self.dir.join(format!("{name}.fetch.lock")),
            FlockArg::LockExclusive,
        )
        .map_err(|e| agent_error(what, e))?;
        if corrupt.exists() {
            match try_exclusive(&use_lock) {
                Some(_exclusive) => {
                    tracing::warn!(mirror = %path.display(), "rebuilding a corrupt checkout cache");
                    let _ = std::fs::remove_dir_all(&path);
                    let _ = std::fs::remove_dir_all(&trees);
                    let _ = std::fs::remove_dir_all(self.dir.join(format!("{name}-lfs.trees")));
                    let _ = std::fs::remove_file(&corrupt);
                }
                None => return Ok(None),
            }
        }
        let using = lockfile::lock(&use_lock, FlockArg::LockShared).map_err(|e| agent_error(what, e))?;
        // When it was last used, for [`Mirrors::expire`].
        lockfile::touch(&using);
        let repo = match Repository::open_bare(&path) {
            Ok(r) => r,
            Err(_) if !path.exists() => Repository::init_bare(&path).map_err(|e| agent_error(what, e))?,
            Err(e) => {
                self.mark_corrupt(url, &e.to_string());
                return Ok(None);
            }
        };
        match fetch(&repo, url, auth, cancel, what, extra) {
            Ok(key) => Ok(Some((
                MirrorUse {
                    objects: path.join("objects"),
                    container_objects: format!("{CONTAINER_DIR}/{name}/objects"),
                    trees,
                    layer_dirs: Vec::new(),
                    layer_locks: Vec::new(),
                    _lock: using,
                },
                key,
            ))),
            // Any other failure (a broken object store, a cut connection)
            // gets a direct checkout, which reports it if it is real.
            Err(e) if e.kind == FailureKind::Checkout => {
                self.mark_corrupt(url, &e.message);
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Removes the mirrors (and their work trees) no job has used for
    /// `max_age`, unless one is being fetched or used right now. Returns
    /// their names. The small lock files stay: a job may be waiting on
    /// them.
    pub fn expire(&self, max_age: std::time::Duration) -> Vec<String> {
        let mut removed = Vec::new();
        for (name, use_lock) in lockfile::idle_in(&self.dir, ".use.lock", max_age) {
            let repo = self.dir.join(format!("{name}.git"));
            if !repo.exists() {
                continue;
            }
            let Some(_fetching) = try_exclusive(&self.dir.join(format!("{name}.fetch.lock"))) else {
                continue;
            };
            let Some(_unused) = try_exclusive(&use_lock) else {
                continue;
            };
            for p in [
                repo,
                self.dir.join(format!("{name}.trees")),
                self.dir.join(format!("{name}-lfs.trees")),
            ] {
                if let Err(e) = std::fs::remove_dir_all(&p)
                    && e.kind() != std::io::ErrorKind::NotFound
                {
                    tracing::warn!(path = %p.display(), error = %e, "cannot remove an unused checkout cache");
                }
            }
            let _ = std::fs::remove_file(self.dir.join(format!("{name}.corrupt")));
            removed.push(name);
        }
        let objects = self.lfs_store().expire(max_age);
        if objects > 0 {
            tracing::info!(objects, "removed Git LFS objects no job used");
        }
        removed
    }

    /// The mirror of `url` failed a job's checkout: rebuild it before its
    /// next use.
    pub(crate) fn mark_corrupt(&self, url: &str, why: &str) {
        tracing::warn!(url, why, "the checkout cache of this repository will be rebuilt");
        let _ = std::fs::write(self.dir.join(format!("{}.corrupt", Self::name(url))), why);
    }

    /// Fetches `commit`, which no ref of `url` advertises, into its mirror
    /// by id (as git does for a submodule pinned to such a commit; the
    /// server must allow it). A failure says nothing about the mirror.
    pub(crate) fn fetch_commit(
        &self,
        url: &str,
        auth: &Auth,
        cancel: &AtomicBool,
        what: &str,
        commit: git2::Oid,
    ) -> Result<(), CheckoutError> {
        let name = Self::name(url);
        let _fetching = lockfile::lock(
            &self.dir.join(format!("{name}.fetch.lock")),
            FlockArg::LockExclusive,
        )
        .map_err(|e| agent_error(what, e))?;
        let repo =
            Repository::open_bare(self.dir.join(format!("{name}.git"))).map_err(|e| agent_error(what, e))?;
        super::fetch_commit(&repo, url, auth, cancel, what, commit)
    }
}

fn fetch<'a>(
    repo: &Repository,
    url: &str,
    auth: &'a Auth,
    cancel: &AtomicBool,
    what: &str,
    extra: &[Refspec],
) -> Result<Option<&'a Key>, CheckoutError> {
    let mut remote = repo
        .remote_anonymous(url)
        .map_err(|e| CheckoutError::new(FailureKind::BadSpec, format!("{url:?}: {}", e.message())))?;
    let mut refspecs = vec![
        "+refs/heads/*:refs/heads/*".to_string(),
        "+refs/tags/*:refs/tags/*".to_string(),
        "+HEAD:refs/runnel/HEAD".to_string(),
    ];
    refspecs.extend(extra.iter().map(Refspec::for_mirror));
    let key = auth.with_each_key(url, what, |attempt| {
        // One connection: what the remote advertises first, so that refs it
        // no longer has go before the fetch writes new ones (a branch
        // `feat` deleted and `feat/x` pushed would collide).
        let mut conn = remote.connect_auth(Direction::Fetch, Some(attempt.callbacks(cancel)), None)?;
        let advertised: HashSet<String> = conn.list()?.iter().map(|h| h.name().to_string()).collect();
        prune(repo, &advertised)?;
        let mut opts = FetchOptions::new();
        opts.remote_callbacks(attempt.callbacks(cancel));
        opts.download_tags(git2::AutotagOption::None);
        conn.remote().fetch(&refspecs, Some(&mut opts), None)?;
        // The remote's HEAD is the mirror's: the branch an empty revision
        // checks out.
        if let Ok(head) = conn.default_branch()
            && let Ok(head) = head.as_str()
            && head.starts_with("refs/heads/")
        {
            repo.set_head(head)?;
        }
        Ok(())
    })?;
    // A fetch that "worked" on a broken object store shows here.
    if let Ok(head) = repo.refname_to_id("refs/runnel/HEAD") {
        repo.find_commit(head).and_then(|c| c.tree()).map_err(|e| {
            CheckoutError::new(
                FailureKind::Checkout,
                format!("the mirror is unreadable: {}", e.message()),
            )
        })?;
    }
    Ok(key)
}

/// Deletes the mirror's refs the remote does not advertise (but runnel's
/// own, `refs/runnel/*`).
fn prune(repo: &Repository, advertised: &HashSet<String>) -> Result<(), git2::Error> {
    let mut gone = Vec::new();
    for r in repo.references()? {
        let r = r?;
        if let Ok(name) = r.name()
            && !name.starts_with("refs/runnel/")
            && !advertised.contains(name)
        {
            gone.push(name.to_string());
        }
    }
    for name in gone {
        repo.find_reference(&name)?.delete()?;
    }
    Ok(())
}

/// Makes `repo` (a fresh, empty work-tree repository) borrow the objects of
/// `mirror` and take its branches as `origin/*`, its tags and its HEAD.
pub(crate) fn borrow(
    repo: &Repository,
    url: &str,
    mirror: &MirrorUse,
    extra: &[Refspec],
) -> Result<(), git2::Error> {
    let info = repo.path().join("objects/info");
    std::fs::create_dir_all(&info).map_err(|e| git2::Error::from_str(&e.to_string()))?;
    std::fs::write(info.join("alternates"), format!("{}\n", mirror.objects.display()))
        .map_err(|e| git2::Error::from_str(&e.to_string()))?;
    // Reopen so the object database sees the alternate.
    let repo = Repository::open(repo.path())?;
    if repo.find_remote("origin").is_err() {
        repo.remote("origin", url)?;
    } else {
        repo.remote_set_url("origin", url)?;
    }
    let source = Repository::open_bare(mirror.objects.parent().unwrap_or(Path::new("/")))?;
    for r in source.references()? {
        let r = r?;
        let (Ok(name), Some(oid)) = (r.name(), r.target()) else {
            continue;
        };
        for local in extra.iter().filter_map(|spec| spec.map(name)) {
            repo.reference(&local, oid, true, "runnel: from the checkout cache")?;
        }
        let local = if let Some(b) = name.strip_prefix("refs/heads/") {
            format!("refs/remotes/origin/{b}")
        } else if name.starts_with("refs/tags/") {
            name.to_string()
        } else if name == "refs/runnel/HEAD" {
            "refs/remotes/origin/HEAD".to_string()
        } else {
            continue;
        };
        repo.reference(&local, oid, true, "runnel: from the checkout cache")?;
    }
    // origin/HEAD names the remote's HEAD branch, as in a clone.
    if let Ok(head) = source.find_reference("HEAD")
        && let Some(branch) = head.symbolic_target().ok().flatten()
    {
        super::name_origin_head(&repo, branch)?;
    }
    Ok(())
}

/// Points every alternates file under `git_dir` that names a mirror at the
/// mirror's path inside the container: the workspace's and its
/// submodules', however deep their paths (`.git/modules/libs/a`).
pub(crate) fn alternates_for_container(git_dir: &Path, mirrors: &[MirrorUse]) -> std::io::Result<()> {
    let mut stack = vec![git_dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        if !dir.join("HEAD").exists() {
            // A directory of a submodule path (`libs` of `libs/a`).
            if let Ok(entries) = std::fs::read_dir(&dir) {
                stack.extend(
                    entries
                        .flatten()
                        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                        .map(|e| e.path()),
                );
            }
            continue;
        }
        let alt = dir.join("objects/info/alternates");
        if let Ok(text) = std::fs::read_to_string(&alt) {
            let mut out = String::new();
            for line in text.lines() {
                let m = mirrors.iter().find(|m| Path::new(line) == m.objects);
                out.push_str(m.map(|m| m.container_objects.as_str()).unwrap_or(line));
                out.push('\n');
            }
            std::fs::write(&alt, out)?;
        }
        if let Ok(modules) = std::fs::read_dir(dir.join("modules")) {
            stack.extend(modules.flatten().map(|e| e.path()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_of_one_repository_share_a_mirror() {
        let n = normalise("ssh://git@Bitbucket.org:22/team/app.git");
        assert_eq!(n, "ssh://bitbucket.org:22/team/app");
        assert_eq!(normalise("git@bitbucket.org:team/app.git"), n);
        assert_eq!(normalise("ssh://other@bitbucket.org/team/app/"), n);
        assert_ne!(normalise("ssh://bitbucket.org:7999/team/app"), n);
        assert_eq!(normalise("https://example.org/a.git"), "https://example.org/a");
    }
}
