//! Checking out a job's repository and its submodules with libgit2, in the
//! agent (never in the container). Owns the clone/fetch, revision
//! resolution, submodule recursion and the mapping of git failures to a
//! [`FailureKind`] and a sentence a person can act on. Which SSH key to offer
//! and which host keys to trust is decided by [`Auth`] (`auth.rs`).

mod auth;
mod lfs;
pub mod mirror;
mod sparse;
mod submodules;
mod trees;
mod worktree;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use git2::{FetchOptions, Oid, Repository};

use crate::model::{CheckoutDone, CheckoutSpec, FailureKind, SubmoduleDone};

pub use auth::{Auth, KeyKind, TransferProgress};
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
    /// The repository's own content is at fault (a path git refuses): no
    /// cache is to blame.
    refused: bool,
}

impl CheckoutError {
    pub(crate) fn new(kind: FailureKind, message: impl Into<String>) -> Self {
        CheckoutError {
            kind,
            message: message.into(),
            cache_failed: None,
            refused: false,
        }
    }

    /// Blames the checkout cache of `url` for this failure (unless the
    /// repository's content was refused).
    fn blaming_cache(mut self, url: &str) -> Self {
        if !self.refused {
            self.cache_failed = Some(url.to_string());
        }
        self
    }
}

/// A git2 error standing for content [`worktree`] refuses to write.
fn refusal(e: &std::io::Error) -> git2::Error {
    git2::Error::new(
        git2::ErrorCode::Invalid,
        git2::ErrorClass::Checkout,
        e.to_string(),
    )
}

fn is_refusal(e: &git2::Error) -> bool {
    e.code() == git2::ErrorCode::Invalid && e.class() == git2::ErrorClass::Checkout
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
    pub owner: Option<Owner>,
    pub cancel: &'a AtomicBool,
    pub mirrors: Option<&'a Mirrors>,
    pub workspace: &'a Path,
    pub depth: u32,
}

/// A ref to fetch beyond branches and tags: `[+]src[:dst]`, both under
/// `refs/`, `*` standing for the same part of a name on both sides. Without
/// `dst`, the ref keeps its name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refspec {
    src: String,
    dst: String,
}

impl Refspec {
    pub(crate) fn parse(spec: &str) -> Option<Refspec> {
        let spec = spec.trim().trim_start_matches('+');
        let (src, dst) = spec.split_once(':').unwrap_or((spec, spec));
        let stars = |s: &str| s.matches('*').count();
        let valid = |s: &str| {
            s.starts_with("refs/") && git2::Reference::is_valid_name(&s.replace('*', "x")) && stars(s) <= 1
        };
        (valid(src) && valid(dst) && stars(src) == stars(dst)).then(|| Refspec {
            src: src.to_string(),
            dst: dst.to_string(),
        })
    }

    /// The ref `name` of the remote becomes, if this refspec takes it.
    pub(crate) fn map(&self, name: &str) -> Option<String> {
        match self.src.split_once('*') {
            None => (name == self.src).then(|| self.dst.clone()),
            Some((pre, post)) => {
                let middle = name.strip_prefix(pre)?.strip_suffix(post)?;
                Some(self.dst.replacen('*', middle, 1))
            }
        }
    }

    /// The mirror keeps what it fetches under the remote's names.
    pub(crate) fn for_mirror(&self) -> String {
        format!("+{0}:{0}", self.src)
    }

    fn for_workspace(&self) -> String {
        format!("+{}:{}", self.src, self.dst)
    }
}

/// The refs a checkout fetches beyond branches and tags: the revision when
/// it is a ref outside `refs/heads/` and `refs/tags/`, and `refspecs`.
fn extra_refs(spec: &CheckoutSpec) -> Result<Vec<Refspec>, CheckoutError> {
    let mut out = Vec::new();
    let rev = spec.revision.trim();
    if rev.starts_with("refs/") && !rev.starts_with("refs/heads/") && !rev.starts_with("refs/tags/") {
        out.push(Refspec::parse(rev).ok_or_else(|| {
            CheckoutError::new(
                FailureKind::BadSpec,
                format!("revision {rev:?} is not a valid ref name"),
            )
        })?);
    }
    for r in &spec.refspecs {
        out.push(Refspec::parse(r).ok_or_else(|| {
            CheckoutError::new(
                FailureKind::BadSpec,
                format!(
                    "checkout refspec {r:?} is not one runnel fetches: write [+]refs/SRC[:refs/DST], \
                     with at most one '*' on each side"
                ),
            )
        })?);
    }
    Ok(out)
}

/// Fetches `commit` from `url` into `repo` by its id (no ref advertises
/// it: git does the same for a pinned submodule; the server must allow it).
pub(crate) fn fetch_commit(
    repo: &Repository,
    url: &str,
    auth: &Auth,
    cancel: &AtomicBool,
    what: &str,
    commit: Oid,
) -> Result<(), CheckoutError> {
    let mut remote = repo
        .remote_anonymous(&auth::git_url(url))
        .map_err(|e| CheckoutError::new(FailureKind::BadSpec, format!("{url:?}: {}", e.message())))?;
    let spec = format!("+{commit}:refs/runnel/want/{commit}");
    auth.with_each_key(url, what, |attempt| {
        let mut opts = FetchOptions::new();
        opts.remote_callbacks(attempt.callbacks(cancel));
        opts.download_tags(git2::AutotagOption::None);
        remote.fetch(&[spec.as_str()], Some(&mut opts), None)
    })?;
    Ok(())
}

/// Who a checkout's files belong to: the step user as the host sees them
/// (`host`, given each file as it is written) and as the container does
/// (`inside`, which the index records so that `git status` in a step finds
/// its stat data fresh).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub host: (u32, u32),
    pub inside: (u32, u32),
}

/// Checks out `oid` detached (a submodule's pinned commit).
fn check_out_detached(
    repo: &Repository,
    oid: Oid,
    cancel: &AtomicBool,
    owner: Option<Owner>,
) -> Result<(), git2::Error> {
    repo.set_head_detached(oid)?;
    write_work_tree(repo, oid, cancel, None, None, owner)
}

/// Writes the files of `oid` into the (empty) work tree of `repo` as git
/// does ([`worktree`]), and an index of them with their metadata, so that
/// `git status` need not read them again.
/// With a `cone`, only its files are written; the index marks the others
/// skip-worktree and the repository is set up as `git sparse-checkout set
/// --cone` leaves it. With `lfs`, LFS pointers get their objects from it.
fn write_work_tree(
    repo: &Repository,
    oid: Oid,
    cancel: &AtomicBool,
    cone: Option<&sparse::Cone>,
    lfs: Option<&lfs::Store>,
    owner: Option<Owner>,
) -> Result<(), git2::Error> {
    let io = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::InvalidData => refusal(&e),
        _ => git2::Error::from_str(&e.to_string()),
    };
    let workdir = repo
        .workdir()
        .ok_or_else(|| git2::Error::from_str("a bare repository has no work tree"))?;
    let in_cone = |p: &[u8]| cone.is_none_or(|c| c.contains(p));
    let only: worktree::Only<'_> = cone.map(|_| &in_cone as &dyn Fn(&[u8]) -> bool);
    let written = worktree::write(
        repo.path(),
        oid,
        workdir,
        only,
        true,
        lfs,
        owner.map(|o| o.host),
        cancel,
    )
    .map_err(io)?;
    let tree = repo.find_commit(oid)?.tree()?;
    let mut index = repo.index()?;
    index.read_tree(&tree)?;
    for (e, m) in written.entries.iter().zip(&written.meta) {
        let Some(m) = m else { continue };
        use std::os::unix::fs::MetadataExt;
        let time = |s: i64, ns: i64| git2::IndexTime::new(s as i32, ns as u32);
        index.add(&git2::IndexEntry {
            ctime: time(m.ctime(), m.ctime_nsec()),
            mtime: time(m.mtime(), m.mtime_nsec()),
            dev: m.dev() as u32,
            ino: m.ino() as u32,
            mode: e.mode(),
            uid: owner.map_or(m.uid(), |o| o.inside.0),
            gid: owner.map_or(m.gid(), |o| o.inside.1),
            file_size: m.size() as u32,
            id: e.id,
            flags: e.path.len().min(0xfff) as u16,
            flags_extended: 0,
            path: e.path.clone(),
        })?;
    }
    if let Some(cone) = cone {
        let outside: Vec<git2::IndexEntry> = index.iter().filter(|e| !cone.contains(&e.path)).collect();
        for mut e in outside {
            e.flags_extended |= SKIP_WORKTREE;
            index.add(&e)?;
        }
        let mut config = repo.config()?;
        config.set_bool("core.sparseCheckout", true)?;
        config.set_bool("core.sparseCheckoutCone", true)?;
        let info = repo.path().join("info");
        std::fs::create_dir_all(&info)
            .and_then(|_| std::fs::write(info.join("sparse-checkout"), cone.patterns()))
            .map_err(io)?;
    }
    index.write()
}

/// libgit2's GIT_INDEX_ENTRY_SKIP_WORKTREE (an extended index flag).
const SKIP_WORKTREE: u16 = 1 << 14;

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
        extra: &[Refspec],
        uses: &mut Vec<MirrorUse>,
    ) -> Result<Option<&'k auth::Key>, CheckoutError> {
        if let Some(mirrors) = self.mirrors.filter(|_| cacheable(url))
            && let Some((mirror, key)) = mirrors.update(url, self.auth, self.cancel, what, extra)?
        {
            mirror::borrow(repo, url, &mirror, extra).map_err(|e| {
                CheckoutError::new(FailureKind::Checkout, format!("{what}: {}", e.message()))
                    .blaming_cache(url)
            })?;
            uses.push(mirror);
            return Ok(key);
        }
        fetch(repo, url, depth, self.auth, self.cancel, what, extra)
    }

    /// Makes sure `repo` (fetched from `url` by [`Ctx::fetch_into`]) has
    /// `commit`: when no ref advertised it, it is fetched by id, into the
    /// mirror if `repo` borrows one. `Ok(false)`: the server does not have
    /// it (or will not give it by id).
    fn ensure_commit(
        &self,
        repo: &Repository,
        url: &str,
        what: &str,
        commit: Oid,
        cached: bool,
    ) -> Result<bool, CheckoutError> {
        let has =
            |repo: &Repository| Repository::open(repo.path()).is_ok_and(|r| r.find_commit(commit).is_ok());
        if has(repo) {
            return Ok(true);
        }
        let fetched = match self.mirrors.filter(|_| cached) {
            Some(m) => m.fetch_commit(url, self.auth, self.cancel, what, commit),
            None => fetch_commit(repo, url, self.auth, self.cancel, what, commit),
        };
        if let Err(e) = fetched {
            if self.cancel.load(Ordering::Relaxed) {
                return Err(CheckoutError::new(
                    FailureKind::Cancelled,
                    "the checkout was cancelled",
                ));
            }
            tracing::info!(url, %commit, error = %e, "cannot fetch a commit by id");
            return Ok(false);
        }
        if !cached && let Ok(mut r) = repo.find_reference(&format!("refs/runnel/want/{commit}")) {
            let _ = r.delete();
        }
        Ok(has(repo))
    }
}

fn cacheable(url: &str) -> bool {
    auth::ssh_target(url).is_some() || url.starts_with("https://")
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
/// when `mirrors` is given. Files written (not laid over cached layers)
/// belong to `owner` as they are made. Blocking; `cancel` aborts a transfer.
pub fn checkout(
    spec: &CheckoutSpec,
    workspace: &Path,
    auth: &Auth,
    cancel: &AtomicBool,
    mirrors: Option<&Mirrors>,
    owner: Option<Owner>,
) -> Result<Checkout, CheckoutError> {
    // As git makes a clone's directory (the job's run directory above it
    // keeps others out).
    std::fs::set_permissions(workspace, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .map_err(|e| CheckoutError::new(FailureKind::Agent, format!("cannot open up the workspace: {e}")))?;
    let ctx = Ctx {
        auth,
        owner,
        cancel,
        mirrors,
        workspace,
        depth: spec.depth,
    };
    let done = match checkout_with(spec, &ctx) {
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
    }?;
    let warm = done.mirrors.iter().any(|m| !m.layer_dirs.is_empty());
    if let Some(o) = owner.filter(|_| !warm) {
        give_the_rest(workspace, &done.done.submodules, o.host).map_err(|e| {
            CheckoutError::new(
                FailureKind::Agent,
                format!("cannot give the workspace to uid {}: {e}", o.host.0),
            )
        })?;
    }
    Ok(done)
}

/// Gives `owner` what of a written workspace the work tree writer did not
/// make: the workspace itself, `.git` (a few files: objects are borrowed
/// or packed), the directory of every submodule (checked out or not) and
/// those on the way to it, and its `.git` file. The files of the trees
/// are theirs already.
fn give_the_rest(workspace: &Path, submodules: &[SubmoduleDone], owner: (u32, u32)) -> std::io::Result<()> {
    let lchown = |p: &Path| match std::os::unix::fs::lchown(p, Some(owner.0), Some(owner.1)) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        r => r,
    };
    // Listed first: libgit2 opens no repository someone else owns.
    let mut dirs = Vec::new();
    let repos = std::iter::once(workspace.to_path_buf()).chain(
        submodules
            .iter()
            .filter_map(|sm| contained_path(workspace, &sm.path)),
    );
    for repo in repos {
        // The gitlinks of its index: submodules' directories.
        let Ok(index) = Repository::open(&repo).and_then(|r| r.index()) else {
            continue;
        };
        for e in index.iter().filter(|e| e.mode == 0o160000) {
            if let Some(dir) = std::str::from_utf8(&e.path)
                .ok()
                .and_then(|p| contained_path(&repo, p))
            {
                dirs.push((repo.clone(), dir));
            }
        }
    }
    lchown(workspace)?;
    crate::sys::userns::chown_tree(&workspace.join(".git"), owner.0, owner.1)?;
    for (repo, dir) in dirs {
        lchown(&dir.join(".git"))?;
        let mut on_the_way = dir.as_path();
        while on_the_way != repo && on_the_way.starts_with(&repo) {
            lchown(on_the_way)?;
            on_the_way = on_the_way.parent().unwrap_or(&repo);
        }
    }
    Ok(())
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
    let extra = extra_refs(spec)?;
    let key = ctx.fetch_into(&repo, url, ctx.depth, "the repository", &extra, &mut uses)?;
    // Reopen: the object database must see a borrowed mirror's objects.
    let repo = Repository::open(ctx.workspace)
        .map_err(|e| CheckoutError::new(FailureKind::Agent, e.message().to_string()))?;
    let cached = !uses.is_empty();
    let blame_cache = |e: CheckoutError| if cached { e.blaming_cache(url) } else { e };
    let cone =
        sparse::Cone::parse(&spec.sparse_paths).map_err(|m| CheckoutError::new(FailureKind::BadSpec, m))?;
    let revision = spec.revision.trim();
    let (oid, branch) = match resolve(&repo, url, revision) {
        Ok(found) => found,
        // A commit no ref advertises: fetched by id, as git would.
        Err(e) => match Oid::from_str(revision) {
            Ok(oid)
                if revision.len() == 40
                    && ctx.ensure_commit(&repo, url, "the repository", oid, cached)? =>
            {
                (oid, None)
            }
            _ => return Err(e),
        },
    };
    let repo = Repository::open(ctx.workspace)
        .map_err(|e| CheckoutError::new(FailureKind::Agent, e.message().to_string()))?;
    let lfs = match spec.lfs {
        true => fetch_lfs(&repo, url, oid, cone.as_ref(), ctx)?,
        false => None,
    };
    // A sparse workspace is written (its objects still borrowed): the
    // cached layers hold every file. With LFS files, layers of their own.
    let write = |repo: &Repository| {
        check_out(
            repo,
            oid,
            branch.as_deref(),
            ctx.cancel,
            cone.as_ref(),
            lfs.as_ref(),
            ctx.owner,
        )
        .map_err(blame_cache)
    };
    let repo = match uses.first_mut().filter(|_| cone.is_none()) {
        Some(mirror) => match over_cached_tree(ctx.workspace, mirror, oid, branch.as_deref(), lfs.as_ref()) {
            Ok(repo) => repo,
            Err(e) => {
                tracing::warn!(error = %e, "cannot lay the workspace over a cached work tree; writing it");
                write(&repo)?;
                repo
            }
        },
        None => {
            write(&repo)?;
            repo
        }
    };
    if cached && ctx.depth > 0 {
        make_shallow(&repo, oid, ctx.depth).map_err(|e| {
            CheckoutError::new(
                FailureKind::Agent,
                format!("cannot cut the history at depth {}: {e}", ctx.depth),
            )
        })?;
    }
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

/// Fetches the LFS objects of the pointers `oid` has (in the cone) into
/// the store next to the mirrors, or without a cache into the workspace's
/// `.git/lfs/objects` as git-lfs does. `None`: the commit has no pointers.
fn fetch_lfs(
    repo: &Repository,
    url: &str,
    oid: Oid,
    cone: Option<&sparse::Cone>,
    ctx: &Ctx<'_>,
) -> Result<Option<lfs::Store>, CheckoutError> {
    let in_cone = |p: &[u8]| cone.is_none_or(|c| c.contains(p));
    let only: worktree::Only<'_> = cone.map(|_| &in_cone as &dyn Fn(&[u8]) -> bool);
    let files = worktree::lfs_pointers(repo.path(), oid, only).map_err(|e| {
        CheckoutError::new(
            FailureKind::Checkout,
            format!("cannot list the Git LFS files of {oid}: {e}"),
        )
    })?;
    if files.is_empty() {
        return Ok(None);
    }
    let store = match ctx.mirrors.filter(|_| cacheable(url)) {
        Some(m) => m.lfs_store(),
        None => lfs::Store::new(repo.path().join("lfs").join("objects")),
    };
    lfs::fetch(url, &files, &store, ctx.auth)?;
    Ok(Some(store))
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
    extra: &[Refspec],
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
    let mut refspecs = vec![
        "+refs/heads/*:refs/remotes/origin/*".to_string(),
        "+refs/tags/*:refs/tags/*".to_string(),
        "+HEAD:refs/remotes/origin/HEAD".to_string(),
    ];
    refspecs.extend(extra.iter().map(Refspec::for_workspace));
    auth.with_each_key(url, what, |session| {
        let mut opts = FetchOptions::new();
        opts.remote_callbacks(session.callbacks(cancel));
        opts.download_tags(git2::AutotagOption::None);
        if depth > 0 {
            opts.depth(depth as i32);
        }
        remote.fetch(&refspecs, Some(&mut opts), None)?;
        if let Ok(head) = remote.default_branch()
            && let Ok(head) = head.as_str()
        {
            name_origin_head(repo, head)?;
        }
        Ok(())
    })
    .map_err(|e| {
        if cancel.load(Ordering::Relaxed) {
            CheckoutError::new(FailureKind::Cancelled, "the checkout was cancelled")
        } else {
            e
        }
    })
}

/// Makes `origin/HEAD` name the remote's HEAD branch `head`
/// (`refs/heads/trunk`), as in a clone, when it points at that branch's
/// commit.
pub(crate) fn name_origin_head(repo: &Repository, head: &str) -> Result<(), git2::Error> {
    let Some(branch) = head.strip_prefix("refs/heads/") else {
        return Ok(());
    };
    let tracking = format!("refs/remotes/origin/{branch}");
    match (
        repo.refname_to_id(&tracking),
        repo.refname_to_id("refs/remotes/origin/HEAD"),
    ) {
        (Ok(a), Ok(b)) if a == b => repo
            .reference_symbolic(
                "refs/remotes/origin/HEAD",
                &tracking,
                true,
                "runnel: the remote's HEAD",
            )
            .map(drop),
        _ => Ok(()),
    }
}

/// The commit to check out, and the branch it is the tip of, if any.
fn resolve(repo: &Repository, url: &str, revision: &str) -> Result<(Oid, Option<String>), CheckoutError> {
    let peel = |r: git2::Reference| r.peel_to_commit().map(|c| c.id()).ok();
    let find = |name: &str| repo.find_reference(name).ok().and_then(peel);
    if revision.is_empty() {
        let head = find("refs/remotes/origin/HEAD").ok_or_else(|| {
            CheckoutError::new(
                FailureKind::Revision,
                format!("{url} has no HEAD to check out (an empty repository?); name a revision"),
            )
        })?;
        // The branch the remote's HEAD names; else one with that commit.
        let named = repo
            .find_reference("refs/remotes/origin/HEAD")
            .ok()
            .and_then(|r| r.symbolic_target().ok().flatten().map(str::to_string))
            .and_then(|t| t.strip_prefix("refs/remotes/origin/").map(str::to_string));
        let branch = named.or_else(|| {
            repo.references_glob("refs/remotes/origin/*")
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
                })
        });
        return Ok((head, branch));
    }
    let branch = revision.strip_prefix("refs/heads/").unwrap_or(revision);
    if let Some(oid) = find(&format!("refs/remotes/origin/{branch}")) {
        return Ok((oid, Some(branch.to_string())));
    }
    let tag = revision.strip_prefix("refs/tags/").unwrap_or(revision);
    if let Some(oid) = find(&format!("refs/tags/{tag}")) {
        return Ok((oid, None));
    }
    // Any other ref (a pull request's), fetched under its own name.
    if revision.starts_with("refs/")
        && let Some(oid) = find(revision)
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
            "revision {revision:?} not found in {url}: no branch, tag, ref or commit of that name \
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
    lfs: Option<&lfs::Store>,
) -> Result<Repository, String> {
    let source = Repository::open_bare(mirror.objects.parent().unwrap_or(Path::new("/")))
        .map_err(|e| e.message().to_string())?;
    let trees = match lfs {
        Some(_) => mirror.trees.with_file_name(format!(
            "{}-lfs.trees",
            mirror.trees.file_stem().unwrap_or_default().to_string_lossy()
        )),
        None => mirror.trees.clone(),
    };
    let layers = trees::layers(&source, &trees, oid, lfs).map_err(|e| e.to_string())?;
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
fn check_out(
    repo: &Repository,
    oid: Oid,
    branch: Option<&str>,
    cancel: &AtomicBool,
    cone: Option<&sparse::Cone>,
    lfs: Option<&lfs::Store>,
    owner: Option<Owner>,
) -> Result<(), CheckoutError> {
    let fail = |e: git2::Error| {
        let mut out = CheckoutError::new(
            FailureKind::Checkout,
            format!("cannot check out {oid}: {}", e.message()),
        );
        out.refused = is_refusal(&e);
        out
    };
    set_head(repo, oid, branch).map_err(fail)?;
    write_work_tree(repo, oid, cancel, cone, lfs, owner).map_err(fail)
}

/// Points HEAD at `oid`: on the local branch `branch` (made there, its
/// upstream `origin/<branch>`) when it names one, else detached.
pub(crate) fn set_head(repo: &Repository, oid: Oid, branch: Option<&str>) -> Result<(), git2::Error> {
    match branch {
        Some(name) if git2::Branch::name_is_valid(name).unwrap_or(false) => {
            let commit = repo.find_commit(oid)?;
            repo.branch(name, &commit, true)?;
            repo.set_head(&format!("refs/heads/{name}"))?;
            if let Ok(mut b) = repo.find_branch(name, git2::BranchType::Local) {
                let _ = b.set_upstream(Some(&format!("origin/{name}")));
            }
            Ok(())
        }
        _ => repo.set_head_detached(oid),
    }
}

/// Makes the history of a workspace that borrows a complete mirror as
/// shallow as a clone of `depth` would be: `.git/shallow` lists the commits
/// `depth - 1` parents below `tip` (git shows nothing beyond them). The
/// objects stay borrowed, so nothing is fetched again.
fn make_shallow(repo: &Repository, tip: Oid, depth: u32) -> Result<(), String> {
    let mut level = vec![tip];
    let mut seen = std::collections::HashSet::from([tip]);
    let mut boundary = Vec::new();
    for d in 1..=depth {
        let mut next = Vec::new();
        for oid in level {
            let commit = repo.find_commit(oid).map_err(|e| e.message().to_string())?;
            if d == depth {
                if commit.parent_count() > 0 {
                    boundary.push(oid);
                }
                continue;
            }
            next.extend(commit.parent_ids().filter(|p| seen.insert(*p)));
        }
        level = next;
    }
    if boundary.is_empty() {
        return Ok(());
    }
    boundary.sort();
    let text: String = boundary.iter().map(|o| format!("{o}\n")).collect();
    std::fs::write(repo.path().join("shallow"), text).map_err(|e| e.to_string())
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
        checkout(
            &spec,
            dir.path(),
            &Auth::default(),
            &AtomicBool::new(false),
            None,
            None,
        )
        .unwrap_err()
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
