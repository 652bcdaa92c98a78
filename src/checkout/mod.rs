//! Checking out a job's repository and its submodules with libgit2, in the
//! agent (never in the container). Owns the clone/fetch, revision
//! resolution, submodule recursion and the mapping of git failures to a
//! [`FailureKind`] and a sentence a person can act on. Which SSH key to offer
//! and which host keys to trust is decided by [`Auth`] (`auth.rs`).

mod auth;
pub mod mirror;
mod submodules;
mod trees;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use git2::{FetchOptions, Oid, Repository};

use crate::model::{CheckoutDone, CheckoutSpec, FailureKind, SubmoduleDone};

pub use auth::{Auth, KeyKind};
pub use mirror::{MirrorUse, Mirrors};

/// A checkout that failed, with the sentence the user sees.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct CheckoutError {
    pub kind: FailureKind,
    pub message: String,
    /// The URL whose checkout cache could not serve the checkout: the
    /// cache is rebuilt and the checkout done without it.
    cache_failed: Option<String>,
}

impl CheckoutError {
    pub(crate) fn new(kind: FailureKind, message: impl Into<String>) -> Self {
        CheckoutError {
            kind,
            message: message.into(),
            cache_failed: None,
        }
    }

    fn with_message(mut self, message: String) -> Self {
        self.message = message;
        self
    }

    /// Blames the checkout cache of `url` for this failure.
    fn blaming_cache(mut self, url: &str) -> Self {
        self.cache_failed = Some(url.to_string());
        self
    }
}

/// A finished checkout; the mirrors its workspace borrows objects from stay
/// locked while this lives.
#[derive(Debug)]
pub struct Checkout {
    pub done: CheckoutDone,
    pub mirrors: Vec<MirrorUse>,
}

/// What one checkout works with.
pub(crate) struct Ctx<'a> {
    pub auth: &'a Auth,
    pub cancel: &'a AtomicBool,
    pub mirrors: Option<&'a Mirrors>,
    pub workspace: &'a Path,
    pub depth: u32,
}

/// Checks out `oid` detached (a submodule's pinned commit).
fn check_out_detached(repo: &Repository, oid: Oid) -> Result<(), git2::Error> {
    repo.set_head_detached(oid)?;
    repo.checkout_head(Some(git2::build::CheckoutBuilder::new().force()))
}

impl Ctx<'_> {
    /// Gets `url`'s objects and refs into `repo` (a fresh repository) as
    /// `origin`: from the checkout cache when there is one (fetched first
    /// with the job's keys), else straight from the remote. Returns the
    /// key the server accepted.
    fn fetch_into<'k>(
        &'k self,
        repo: &Repository,
        url: &str,
        depth: u32,
        what: &str,
        uses: &mut Vec<MirrorUse>,
    ) -> Result<Option<&'k auth::Key>, CheckoutError> {
        let cacheable = auth::ssh_target(url).is_some() || url.starts_with("https://");
        if let Some(mirrors) = self.mirrors.filter(|_| cacheable)
            && let Some((mirror, key)) = mirrors.update(url, self.auth, self.cancel, what)?
        {
            mirror::borrow(repo, url, &mirror).map_err(|e| {
                CheckoutError::new(FailureKind::Checkout, format!("{what}: {}", e.message()))
                    .blaming_cache(url)
            })?;
            uses.push(mirror);
            return Ok(key);
        }
        fetch(repo, url, depth, self.auth, self.cancel, what)
    }
}

/// Unmounts a workspace laid over cached work tree layers (a warm
/// checkout) and removes its writable layer; nothing when not mounted.
pub fn unmount_workspace(workspace: &Path) -> std::io::Result<()> {
    trees::unmount(workspace)
}

/// Gives a workspace laid over cached work tree layers `layers` (a warm
/// checkout, see [`MirrorUse::layer_dirs`]) to `uid:gid`, the step user as
/// the host sees it: the layers are bound again, idmapped, and only the
/// writable layer's few files change owner; nothing is copied up.
/// `Ok(Err(e))`: idmapped mounts failed here, the workspace is as it was;
/// `Err`: the workspace could not be mounted again.
pub fn give_warm_workspace(
    workspace: &Path,
    layers: &[PathBuf],
    uid: u32,
    gid: u32,
) -> std::io::Result<std::io::Result<()>> {
    trees::remount_idmapped(workspace, layers, uid, gid)
}

/// Sets libgit2's process-wide options so that nothing of the agent's own
/// home (its `~/.ssh/known_hosts`, its `~/.gitconfig`) changes what a job
/// gets: libgit2 reorders the host-key algorithms it asks for by what it
/// finds in `$HOME/.ssh/known_hosts`, which breaks pinning. Call once.
pub fn isolate_libgit2(empty_home: &Path) -> Result<(), git2::Error> {
    std::fs::create_dir_all(empty_home).map_err(|e| git2::Error::from_str(&e.to_string()))?;
    let home = std::ffi::CString::new(empty_home.as_os_str().as_encoded_bytes())
        .map_err(|_| git2::Error::from_str("home path contains a NUL byte"))?;
    libgit2_sys::init();
    // SAFETY: git_libgit2_opts is variadic; GIT_OPT_SET_HOMEDIR takes
    // exactly one `const char *`: `home`, NUL-terminated and alive across
    // the call (libgit2 copies it). libgit2's global options must not change
    // while another thread uses libgit2: this runs while the job registry is
    // built, before any job (libgit2's only user) exists.
    let rc = unsafe {
        libgit2_sys::git_libgit2_opts(libgit2_sys::GIT_OPT_SET_HOMEDIR as libc::c_int, home.as_ptr())
    };
    if rc < 0 {
        return Err(git2::Error::last_error(rc));
    }
    for level in [
        git2::ConfigLevel::System,
        git2::ConfigLevel::XDG,
        git2::ConfigLevel::Global,
        git2::ConfigLevel::ProgramData,
    ] {
        // SAFETY: changes libgit2's global search paths; as above, no other
        // thread uses libgit2 yet.
        unsafe { git2::opts::set_search_path(level, empty_home)? };
    }
    Ok(())
}

/// Clones `spec.repo_url` into `workspace` (which must be empty) at
/// `spec.revision`, with submodules if asked, through the checkout cache
/// when `mirrors` is given. Blocking; `cancel` aborts a transfer.
pub fn checkout(
    spec: &CheckoutSpec,
    workspace: &Path,
    auth: &Auth,
    cancel: &AtomicBool,
    mirrors: Option<&Mirrors>,
) -> Result<Checkout, CheckoutError> {
    let ctx = Ctx {
        auth,
        cancel,
        mirrors,
        workspace,
        depth: spec.depth,
    };
    match checkout_with(spec, &ctx) {
        Err(CheckoutError {
            cache_failed: Some(url),
            message,
            ..
        }) if mirrors.is_some() => {
            // A corrupt cache never fails a job: rebuild it, go direct.
            if let Some(m) = mirrors {
                m.mark_corrupt(&url, &message);
            }
            trees::unmount(workspace)
                .and_then(|_| empty_dir(workspace))
                .map_err(|e| CheckoutError::new(FailureKind::Agent, e.to_string()))?;
            checkout_with(spec, &Ctx { mirrors: None, ..ctx })
        }
        other => other,
    }
}

fn empty_dir(dir: &Path) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if std::fs::symlink_metadata(&p)?.is_dir() {
            std::fs::remove_dir_all(&p)?;
        } else {
            std::fs::remove_file(&p)?;
        }
    }
    Ok(())
}

fn checkout_with(spec: &CheckoutSpec, ctx: &Ctx<'_>) -> Result<Checkout, CheckoutError> {
    let url = spec.repo_url.trim();
    let repo = Repository::init(ctx.workspace).map_err(|e| {
        CheckoutError::new(
            FailureKind::Agent,
            format!("cannot create the workspace repository: {}", e.message()),
        )
    })?;
    let mut uses = Vec::new();
    let key = ctx.fetch_into(&repo, url, ctx.depth, "the repository", &mut uses)?;
    // Reopen: the object database must see a borrowed mirror's objects.
    let repo = Repository::open(ctx.workspace)
        .map_err(|e| CheckoutError::new(FailureKind::Agent, e.message().to_string()))?;
    let cached = !uses.is_empty();
    let blame_cache = |e: CheckoutError| if cached { e.blaming_cache(url) } else { e };
    let (oid, branch) = resolve(&repo, url, &spec.revision)?;
    let repo = match uses.first_mut() {
        Some(mirror) => match over_cached_tree(ctx.workspace, mirror, oid, branch.as_deref()) {
            Ok(repo) => repo,
            Err(e) => {
                tracing::warn!(error = %e, "cannot lay the workspace over a cached work tree; writing it");
                check_out(&repo, oid, branch.as_deref()).map_err(blame_cache)?;
                repo
            }
        },
        None => {
            check_out(&repo, oid, branch.as_deref()).map_err(blame_cache)?;
            repo
        }
    };
    let mut submodules = Vec::new();
    if spec.submodules {
        submodules::update(&repo, url, ctx, "", &mut submodules, &mut uses)?;
    }
    mirror::alternates_for_container(repo.path(), &uses).map_err(|e| {
        CheckoutError::new(
            FailureKind::Agent,
            format!("cannot point the workspace at the cache: {e}"),
        )
    })?;
    Ok(Checkout {
        done: CheckoutDone {
            commit: oid.to_string(),
            key: key.map(|k| k.kind).unwrap_or(KeyKind::None),
            key_fingerprint: key.map(|k| k.fingerprint.clone()).unwrap_or_default(),
            submodules,
        },
        mirrors: uses,
    })
}

/// Fetches every branch and tag of `url` into `repo` as `origin`, trying
/// the keys of `auth` in order. Returns the key the server accepted.
fn fetch<'a>(
    repo: &Repository,
    url: &str,
    depth: u32,
    auth: &'a Auth,
    cancel: &AtomicBool,
    what: &str,
) -> Result<Option<&'a auth::Key>, CheckoutError> {
    let git_url = auth::git_url(url);
    let mut remote = match repo.find_remote("origin") {
        Ok(r) => r,
        Err(_) => repo.remote("origin", &git_url).map_err(|e| {
            CheckoutError::new(
                FailureKind::BadSpec,
                format!(
                    "{url:?} is not a repository URL libgit2 understands: {}",
                    e.message()
                ),
            )
        })?,
    };
    let refspecs = [
        "+refs/heads/*:refs/remotes/origin/*",
        "+refs/tags/*:refs/tags/*",
        "+HEAD:refs/remotes/origin/HEAD",
    ];
    auth.with_each_key(url, what, |session| {
        let mut opts = FetchOptions::new();
        opts.remote_callbacks(session.callbacks(cancel));
        opts.download_tags(git2::AutotagOption::None);
        if depth > 0 {
            opts.depth(depth as i32);
        }
        remote.fetch(&refspecs, Some(&mut opts), None)
    })
    .map_err(|e| {
        if cancel.load(Ordering::Relaxed) {
            CheckoutError::new(FailureKind::Cancelled, "the checkout was cancelled")
        } else {
            e
        }
    })
}

/// The commit to check out, and the branch it is the tip of, if any.
fn resolve(repo: &Repository, url: &str, revision: &str) -> Result<(Oid, Option<String>), CheckoutError> {
    let peel = |r: git2::Reference| r.peel_to_commit().map(|c| c.id()).ok();
    if revision.is_empty() {
        let head = repo
            .find_reference("refs/remotes/origin/HEAD")
            .ok()
            .and_then(peel)
            .ok_or_else(|| {
                CheckoutError::new(
                    FailureKind::Revision,
                    format!("{url} has no HEAD to check out (an empty repository?); name a revision"),
                )
            })?;
        // Name the branch HEAD points at, if one has that commit.
        let branch = repo
            .references_glob("refs/remotes/origin/*")
            .ok()
            .and_then(|refs| {
                refs.flatten()
                    .filter(|r| r.name().ok() != Some("refs/remotes/origin/HEAD"))
                    .find(|r| r.target() == Some(head))
                    .and_then(|r| {
                        r.shorthand()
                            .ok()
                            .map(|s| s.trim_start_matches("origin/").to_string())
                    })
            });
        return Ok((head, branch));
    }
    if let Some(oid) = repo
        .find_reference(&format!("refs/remotes/origin/{revision}"))
        .ok()
        .and_then(peel)
    {
        return Ok((oid, Some(revision.to_string())));
    }
    if let Some(oid) = repo
        .find_reference(&format!("refs/tags/{revision}"))
        .ok()
        .and_then(peel)
    {
        return Ok((oid, None));
    }
    let looks_like_sha = revision.len() >= 4 && revision.chars().all(|c| c.is_ascii_hexdigit());
    if looks_like_sha && let Ok(commit) = repo.revparse_single(revision).and_then(|o| o.peel_to_commit()) {
        return Ok((commit.id(), None));
    }
    Err(CheckoutError::new(
        FailureKind::Revision,
        format!(
            "revision {revision:?} not found in {url}: no branch, tag or commit of that name \
             (is it pushed?)"
        ),
    ))
}

/// Lays `workspace` (holding only the repository's `.git`) over the cached
/// work tree of `oid` from `mirror`: the `.git` moves into the overlay's
/// writable layer, the overlay is mounted, and HEAD and the index are set
/// without writing a file of the tree. On failure the workspace is as it
/// was, for a plain checkout.
fn over_cached_tree(
    workspace: &Path,
    mirror: &mut MirrorUse,
    oid: Oid,
    branch: Option<&str>,
) -> Result<Repository, String> {
    let source = Repository::open_bare(mirror.objects.parent().unwrap_or(Path::new("/")))
        .map_err(|e| e.message().to_string())?;
    let layers = trees::layers(&source, &mirror.trees, oid).map_err(|e| e.to_string())?;
    let git_dir = workspace.join(".git");
    let upper = trees::prepare_upper(workspace).map_err(|e| e.to_string())?;
    std::fs::rename(&git_dir, upper.join(".git")).map_err(|e| e.to_string())?;
    if let Err(e) = trees::mount(workspace, &layers.dirs) {
        let _ = std::fs::rename(upper.join(".git"), &git_dir);
        return Err(e.to_string());
    }
    mirror.layer_dirs = layers.dirs.clone();
    mirror.layer_locks = layers.into_locks();
    let repo = Repository::open(workspace).map_err(|e| e.message().to_string())?;
    trees::adopt(&repo, oid, branch).map_err(|e| e.message().to_string())?;
    Ok(repo)
}

/// Checks out `oid` in the work tree; on a local branch when `branch` names one.
fn check_out(repo: &Repository, oid: Oid, branch: Option<&str>) -> Result<(), CheckoutError> {
    let fail = |e: git2::Error| {
        CheckoutError::new(
            FailureKind::Checkout,
            format!("cannot check out {oid}: {}", e.message()),
        )
    };
    let commit = repo.find_commit(oid).map_err(fail)?;
    match branch {
        Some(name) if git2::Branch::name_is_valid(name).unwrap_or(false) => {
            repo.branch(name, &commit, true).map_err(fail)?;
            repo.checkout_tree(
                commit.as_object(),
                Some(git2::build::CheckoutBuilder::new().force()),
            )
            .map_err(fail)?;
            repo.set_head(&format!("refs/heads/{name}")).map_err(fail)?;
            if let Ok(mut b) = repo.find_branch(name, git2::BranchType::Local) {
                let _ = b.set_upstream(Some(&format!("origin/{name}")));
            }
        }
        _ => {
            repo.checkout_tree(
                commit.as_object(),
                Some(git2::build::CheckoutBuilder::new().force()),
            )
            .map_err(fail)?;
            repo.set_head_detached(oid).map_err(fail)?;
        }
    }
    Ok(())
}

/// Joins `rel` onto `base` and checks it stays inside `base`, without
/// touching the file system (the path may not exist yet).
pub(crate) fn contained_path(base: &Path, rel: &str) -> Option<PathBuf> {
    let rel_path = Path::new(rel);
    if rel.is_empty() || rel_path.is_absolute() {
        return None;
    }
    let mut out = base.to_path_buf();
    for c in rel_path.components() {
        match c {
            std::path::Component::Normal(part) => out.push(part),
            std::path::Component::CurDir => {}
            _ => return None,
        }
    }
    (out != base).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn try_checkout(url: &str) -> CheckoutError {
        let dir = tempfile::tempdir().unwrap();
        let spec = CheckoutSpec {
            repo_url: url.into(),
            ..Default::default()
        };
        checkout(&spec, dir.path(), &Auth::default(), &AtomicBool::new(false), None).unwrap_err()
    }

    #[test]
    fn https_is_a_transport_runnel_speaks() {
        // Nothing listens on port 1: the failure is the connection, not an
        // unsupported scheme.
        let e = try_checkout("https://127.0.0.1:1/org/app.git");
        assert_eq!(e.kind, FailureKind::Checkout, "{e}");
        assert!(!e.message.contains("unsupported URL protocol"), "{e}");
        assert!(e.message.contains("127.0.0.1:1"), "{e}");
    }

    #[test]
    fn a_missing_local_repository_is_repo_not_found() {
        let e = try_checkout("/nonexistent/runnel-test-repo");
        assert!(
            matches!(e.kind, FailureKind::RepoNotFound | FailureKind::Checkout),
            "{e}"
        );
        assert!(e.message.contains("/nonexistent/runnel-test-repo"), "{e}");
    }
}
