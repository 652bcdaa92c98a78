//! Writing a commit's files as `git checkout` writes them, for direct
//! checkouts, submodules and the cached tree layers alike: every path
//! checked as git checks it; attributes read from the commit itself (the
//! `.gitattributes` of each of its directories, never whatever work tree
//! happens to be on disk, so files that sort before `.gitattributes` get
//! them too); conversions as git's `convert.c` does them (`ident`,
//! `text`/`eol`/`crlf`, `working-tree-encoding`; a job's checkout has no
//! filter driver configured, so `filter=` passes content through as git
//! does); and files written by several threads at once, as git's parallel
//! checkout workers do (libgit2 writes one file at a time, and applies
//! only the attributes of the work tree it finds).

use std::borrow::Cow;
use std::collections::HashSet;
use std::ffi::{CStr, CString, OsStr};
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use git2::{Binding, Oid, Repository, Tree};

use super::lfs::{Pointer, PointerFile, Store};

fn other(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

/// Which paths (relative to the tree's root) to write.
pub(crate) type Only<'a> = Option<&'a dyn Fn(&[u8]) -> bool>;

/// Who is to own what is written, as the host sees it (`uid`, `gid`):
/// each file, directory and link is given to them as it is made, so that
/// nothing has to walk the tree afterwards (and its ctimes, which the
/// index records, stay as written).
pub type Owner = Option<(u32, u32)>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    File,
    Exec,
    Link,
    Gitlink,
}

/// One entry of the commit's tree that is not a directory.
#[derive(Debug)]
pub(crate) struct Entry {
    pub path: Vec<u8>,
    pub id: Oid,
    kind: Kind,
}

impl Entry {
    /// The entry's mode as the index records it.
    pub fn mode(&self) -> u32 {
        match self.kind {
            Kind::File => 0o100644,
            Kind::Exec => 0o100755,
            Kind::Link => 0o120000,
            Kind::Gitlink => 0o160000,
        }
    }
}

/// What was written: the entries, and for each the file's metadata (none
/// for a submodule's directory) when asked for.
pub(crate) struct Written {
    pub entries: Vec<Entry>,
    pub meta: Vec<Option<fs::Metadata>>,
}

/// A name git refuses to check out (core.protectNTFS is on by default in
/// git: `.git` in any case, with trailing dots or spaces, or as `git~1`).
fn refused_name(name: &[u8]) -> bool {
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0) {
        return true;
    }
    let lower = name.to_ascii_lowercase();
    let trimmed: &[u8] = {
        let mut end = lower.len();
        while end > 0 && matches!(lower[end - 1], b'.' | b' ') {
            end -= 1;
        }
        &lower[..end]
    };
    trimmed == b".git" || trimmed == b"git~1"
}

/// The entries (not directories) of `tree`, preorder, and its directories;
/// whether any `.gitattributes` is among them.
fn collect(
    repo: &Repository,
    tree: &Tree,
    prefix: &[u8],
    entries: &mut Vec<Entry>,
    dirs: &mut Vec<Vec<u8>>,
    attributes: &mut bool,
) -> io::Result<()> {
    for e in tree.iter() {
        let name = e.name_bytes();
        let mut path = prefix.to_vec();
        if !path.is_empty() {
            path.push(b'/');
        }
        path.extend_from_slice(name);
        if refused_name(name) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "the commit holds a path git refuses to check out: {:?}",
                    String::from_utf8_lossy(&path)
                ),
            ));
        }
        let kind = match e.filemode() {
            0o040000 => {
                dirs.push(path.clone());
                let sub = repo.find_tree(e.id()).map_err(other)?;
                collect(repo, &sub, &path, entries, dirs, attributes)?;
                continue;
            }
            0o160000 => Kind::Gitlink,
            0o120000 => Kind::Link,
            0o100755 => Kind::Exec,
            _ => Kind::File,
        };
        // git refuses a symlinked .gitmodules (its verify_path): read by
        // the agent, it could point at any file of the host.
        if kind == Kind::Link && name.eq_ignore_ascii_case(b".gitmodules") {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{:?} is a symbolic link; git refuses to check out a .gitmodules that is one",
                    String::from_utf8_lossy(&path)
                ),
            ));
        }
        if name == b".gitattributes" && kind != Kind::Gitlink {
            *attributes = true;
        }
        entries.push(Entry {
            path,
            id: e.id(),
            kind,
        });
    }
    Ok(())
}

/// Writes the files of `commit` (in the repository at `git_dir`, whose
/// objects may be borrowed) into `dest`, an existing directory holding at
/// most a `.git`: all of them, or those `only` takes (by path relative to
/// the tree's root; with the directories leading to them). `stat`: return the
/// metadata of each file written (for an index git need not refresh).
/// `lfs`: smudge LFS pointers with the objects of this store (which must
/// hold them: [`lfs_pointers`] lists them). `cancel` stops the writing
/// between files.
#[allow(clippy::too_many_arguments)]
pub(crate) fn write(
    git_dir: &Path,
    commit: Oid,
    dest: &Path,
    only: Only<'_>,
    stat: bool,
    lfs: Option<&Store>,
    owner: Owner,
    cancel: &AtomicBool,
) -> io::Result<Written> {
    let repo = Repository::open_bare(git_dir).map_err(other)?;
    let tree = repo.find_commit(commit).and_then(|c| c.tree()).map_err(other)?;
    let (mut entries, mut dirs, mut attributes) = (Vec::new(), Vec::new(), false);
    collect(&repo, &tree, b"", &mut entries, &mut dirs, &mut attributes)?;
    if let Some(only) = only {
        entries.retain(|e| only(&e.path));
        let mut needed = HashSet::new();
        for e in &entries {
            let mut p = e.path.as_slice();
            while let Some(i) = p.iter().rposition(|&b| b == b'/') {
                p = &p[..i];
                if !needed.insert(p.to_vec()) {
                    break;
                }
            }
        }
        dirs.retain(|d| needed.contains(d));
    }
    for d in &dirs {
        make_dir(&dest.join(OsStr::from_bytes(d)), owner)?;
    }
    // A submodule's directory stays the agent's until its checkout is done:
    // libgit2 opens no repository whose work tree someone else owns.
    for e in entries.iter().filter(|e| e.kind == Kind::Gitlink) {
        make_dir(&dest.join(OsStr::from_bytes(&e.path)), None)?;
    }
    // Creating a file waits on the file system more than on a CPU: two
    // writers per core.
    let workers = std::thread::available_parallelism()
        .map_or(2, |n| n.get() * 2)
        .clamp(2, 8)
        .min(entries.len().div_ceil(BATCH).max(1));
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let results: Vec<io::Result<Vec<(usize, fs::Metadata)>>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                s.spawn(|| {
                    let r = worker(
                        git_dir, commit, dest, &entries, &next, attributes, stat, lfs, owner, cancel, &failed,
                    );
                    if r.is_err() {
                        failed.store(true, Ordering::Relaxed);
                    }
                    r
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(other("a checkout worker panicked")))
            })
            .collect()
    });
    if cancel.load(Ordering::Relaxed) {
        return Err(io::Error::new(
            io::ErrorKind::Interrupted,
            "the checkout was cancelled",
        ));
    }
    let mut meta: Vec<Option<fs::Metadata>> = entries.iter().map(|_| None).collect();
    for r in results {
        for (i, m) in r? {
            meta[i] = Some(m);
        }
    }
    Ok(Written { entries, meta })
}

/// The files of `commit` that are LFS pointers (`filter=lfs` and a blob
/// that parses as one), among those `only` takes.
pub(crate) fn lfs_pointers(git_dir: &Path, commit: Oid, only: Only<'_>) -> io::Result<Vec<PointerFile>> {
    let repo = Repository::open_bare(git_dir).map_err(other)?;
    let tree = repo.find_commit(commit).and_then(|c| c.tree()).map_err(other)?;
    let (mut entries, mut dirs, mut attributes) = (Vec::new(), Vec::new(), false);
    collect(&repo, &tree, b"", &mut entries, &mut dirs, &mut attributes)?;
    let mut out = Vec::new();
    if !attributes {
        return Ok(out);
    }
    let odb = repo.odb().map_err(other)?;
    for e in &entries {
        if !matches!(e.kind, Kind::File | Kind::Exec) || only.is_some_and(|o| !o(&e.path)) {
            continue;
        }
        // Cheap first: only small blobs can be pointers.
        let (size, _) = odb.read_header(e.id).map_err(other)?;
        if size > 1024 || !Conversion::of(&repo, commit, &e.path)?.lfs {
            continue;
        }
        let blob = repo.find_blob(e.id).map_err(other)?;
        if let Some(pointer) = Pointer::parse(blob.content()) {
            out.push(PointerFile {
                path: String::from_utf8_lossy(&e.path).into_owned(),
                pointer,
            });
        }
    }
    Ok(out)
}

/// Entries a writer takes at a time: neighbours in a directory, so that
/// writers seldom wait on each other for the same directory's lock.
const BATCH: usize = 32;

fn make_dir(dir: &Path, owner: Owner) -> io::Result<()> {
    match fs::DirBuilder::new().mode(0o755).create(dir) {
        Ok(()) => {
            if let Some((uid, gid)) = owner {
                std::os::unix::fs::lchown(dir, Some(uid), Some(gid))?;
            }
            fs::set_permissions(dir, fs::Permissions::from_mode(0o755))
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            if fs::symlink_metadata(dir)?.is_dir() {
                Ok(())
            } else {
                Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a directory", dir.display()),
                ))
            }
        }
        Err(e) => Err(e),
    }
}

#[allow(clippy::too_many_arguments)]
fn worker(
    git_dir: &Path,
    commit: Oid,
    dest: &Path,
    entries: &[Entry],
    next: &AtomicUsize,
    attributes: bool,
    stat: bool,
    lfs: Option<&Store>,
    owner: Owner,
    cancel: &AtomicBool,
    failed: &AtomicBool,
) -> io::Result<Vec<(usize, fs::Metadata)>> {
    let repo = Repository::open_bare(git_dir).map_err(other)?;
    let mut out = Vec::new();
    loop {
        let start = next.fetch_add(BATCH, Ordering::Relaxed);
        if start >= entries.len() || cancel.load(Ordering::Relaxed) || failed.load(Ordering::Relaxed) {
            break;
        }
        for (i, e) in entries.iter().enumerate().skip(start).take(BATCH) {
            if let Some(m) = write_entry(&repo, commit, dest, e, attributes, stat, lfs, owner)? {
                out.push((i, m));
            }
        }
    }
    Ok(out)
}

/// Writes one entry; its metadata when `stat`.
#[allow(clippy::too_many_arguments)]
fn write_entry(
    repo: &Repository,
    commit: Oid,
    dest: &Path,
    e: &Entry,
    attributes: bool,
    stat: bool,
    lfs: Option<&Store>,
    owner: Owner,
) -> io::Result<Option<fs::Metadata>> {
    if e.kind == Kind::Gitlink {
        return Ok(None);
    }
    let at = dest.join(OsStr::from_bytes(&e.path));
    let named = |err: io::Error| io::Error::new(err.kind(), format!("{}: {err}", at.display()));
    let blob = repo.find_blob(e.id).map_err(other)?;
    if e.kind == Kind::Link {
        std::os::unix::fs::symlink(OsStr::from_bytes(blob.content()), &at).map_err(named)?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::lchown(&at, Some(uid), Some(gid)).map_err(named)?;
        }
        return stat.then(|| fs::symlink_metadata(&at)).transpose();
    }
    let conv = if attributes {
        Conversion::of(repo, commit, &e.path)?
    } else {
        Conversion::default()
    };
    let pointer = lfs
        .filter(|_| conv.lfs)
        .and_then(|_| Pointer::parse(blob.content()));
    let bytes = match (lfs, pointer) {
        // git-lfs's smudge: the object's bytes as they are.
        (Some(store), Some(p)) => Cow::Owned(store.read(&p).map_err(|err| {
            io::Error::other(format!(
                "Git LFS object {} of {}: {err}",
                p.oid,
                String::from_utf8_lossy(&e.path)
            ))
        })?),
        _ => conv.to_worktree(blob.content(), e.id),
    };
    let mode = if e.kind == Kind::Exec { 0o755 } else { 0o644 };
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&at)
        .map_err(named)?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::fchown(&f, Some(uid), Some(gid)).map_err(named)?;
    }
    f.write_all(&bytes).map_err(named)?;
    // The mode exactly, whatever the agent's umask.
    f.set_permissions(fs::Permissions::from_mode(mode))?;
    stat.then(|| f.metadata()).transpose()
}

/// How git's convert.c turns a blob into a work tree file, for one path.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Conversion {
    /// `filter=lfs`: a pointer here is smudged when the job asks for LFS.
    lfs: bool,
    ident: bool,
    crlf: Crlf,
    encoding: Option<String>,
}

/// convert.c's `crlf_action`, as resolved for a checkout with git's
/// defaults (core.autocrlf false, core.eol native = LF).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Crlf {
    /// No conversion (binary, `-text`, unspecified, or LF output).
    #[default]
    None,
    /// `text eol=crlf`: every lone LF becomes CRLF.
    Text,
    /// `text=auto eol=crlf`: the same, unless the blob looks binary or
    /// already has a CR.
    Auto,
}

#[repr(C)]
struct AttrOptions {
    version: libc::c_uint,
    flags: libc::c_uint,
    commit_id: *mut libgit2_sys::git_oid,
    attr_commit_id: libgit2_sys::git_oid,
}

const GIT_ATTR_CHECK_INCLUDE_COMMIT: libc::c_uint = 1 << 4;

unsafe extern "C" {
    // libgit2 1.9's git_attr_get_many_ext (include/git2/attr.h), which
    // libgit2-sys does not declare.
    fn git_attr_get_many_ext(
        values_out: *mut *const libc::c_char,
        repo: *mut libgit2_sys::git_repository,
        opts: *mut AttrOptions,
        path: *const libc::c_char,
        num_attr: libc::size_t,
        names: *mut *const libc::c_char,
    ) -> libc::c_int;
}

/// An attribute's value for a path: unspecified, set (`text`), unset
/// (`-text`) or a value (`eol=crlf`).
#[derive(Debug, PartialEq, Eq)]
enum Attr {
    Unspecified,
    True,
    False,
    Value(String),
}

const NAMES: [&CStr; 6] = [
    c"crlf",
    c"ident",
    c"filter",
    c"eol",
    c"text",
    c"working-tree-encoding",
];

/// The conversion attributes of `path` as the commit's own
/// `.gitattributes` files give them (and `$GIT_DIR/info/attributes`; never
/// the system's or the agent's).
fn attributes(repo: &Repository, commit: Oid, path: &[u8]) -> io::Result<[Attr; 6]> {
    let cpath = CString::new(path).map_err(other)?;
    let mut names: Vec<*const libc::c_char> = NAMES.iter().map(|n| n.as_ptr()).collect();
    let mut values: [*const libc::c_char; 6] = [std::ptr::null(); 6];
    let mut opts = AttrOptions {
        version: 1,
        flags: libgit2_sys::GIT_ATTR_CHECK_INDEX_ONLY
            | libgit2_sys::GIT_ATTR_CHECK_NO_SYSTEM
            | GIT_ATTR_CHECK_INCLUDE_COMMIT,
        commit_id: std::ptr::null_mut(),
        // SAFETY: `Oid::raw` points at a valid git_oid for the call.
        attr_commit_id: unsafe { *commit.raw() },
    };
    // SAFETY: `values` has room for the 6 names; `names`, `cpath` and
    // `opts` (layout of libgit2 1.9's git_attr_options, version 1) outlive
    // the call; the repository handle is used by this thread only. The
    // values point into the repository's attribute cache, read before the
    // handle is used again.
    let rc = unsafe {
        git_attr_get_many_ext(
            values.as_mut_ptr(),
            repo.raw(),
            &mut opts,
            cpath.as_ptr(),
            NAMES.len(),
            names.as_mut_ptr(),
        )
    };
    if rc < 0 {
        return Err(other(git2::Error::last_error(rc)));
    }
    Ok(values.map(|v| {
        // SAFETY: `v` came from libgit2 for this lookup (NULL, a sentinel or
        // a NUL-terminated string in the attribute cache).
        match unsafe { libgit2_sys::git_attr_value(v) } {
            libgit2_sys::GIT_ATTR_VALUE_TRUE => Attr::True,
            libgit2_sys::GIT_ATTR_VALUE_FALSE => Attr::False,
            libgit2_sys::GIT_ATTR_VALUE_STRING => {
                // SAFETY: as above, a string value is NUL-terminated.
                Attr::Value(unsafe { CStr::from_ptr(v) }.to_string_lossy().into_owned())
            }
            _ => Attr::Unspecified,
        }
    }))
}

impl Conversion {
    fn of(repo: &Repository, commit: Oid, path: &[u8]) -> io::Result<Conversion> {
        let [crlf, ident, filter, eol, text, encoding] = attributes(repo, commit, path)?;
        Ok(Conversion {
            lfs: matches!(&filter, Attr::Value(v) if v == "lfs"),
            ..Conversion::from_attrs(&crlf, &ident, &eol, &text, &encoding)
        })
    }

    /// convert.c's `convert_attrs`, with core.autocrlf false and core.eol
    /// native (LF): only `eol=crlf` makes CRLF.
    fn from_attrs(crlf: &Attr, ident: &Attr, eol: &Attr, text: &Attr, encoding: &Attr) -> Conversion {
        #[derive(PartialEq)]
        enum Action {
            Undefined,
            Binary,
            Text,
            TextInput,
            TextCrlf,
            Auto,
            AutoInput,
            AutoCrlf,
        }
        let check = |a: &Attr| match a {
            Attr::True => Action::Text,
            Attr::False => Action::Binary,
            Attr::Value(v) if v == "input" => Action::TextInput,
            Attr::Value(v) if v == "auto" => Action::Auto,
            _ => Action::Undefined,
        };
        let mut action = check(text);
        if action == Action::Undefined {
            action = check(crlf);
        }
        if action != Action::Binary {
            let eol = match eol {
                Attr::Value(v) if v == "lf" => Some(false),
                Attr::Value(v) if v == "crlf" => Some(true),
                _ => None,
            };
            action = match (action, eol) {
                (Action::Auto, Some(false)) => Action::AutoInput,
                (Action::Auto, Some(true)) => Action::AutoCrlf,
                (_, Some(false)) => Action::TextInput,
                (_, Some(true)) => Action::TextCrlf,
                (a, None) => a,
            };
        }
        let crlf = match action {
            Action::TextCrlf => Crlf::Text,
            Action::AutoCrlf => Crlf::Auto,
            _ => Crlf::None,
        };
        let encoding = match encoding {
            Attr::Value(v) if !v.is_empty() && !is_utf8(v) => Some(v.clone()),
            _ => None,
        };
        Conversion {
            lfs: false,
            ident: *ident == Attr::True,
            crlf,
            encoding,
        }
    }

    /// convert.c's `convert_to_working_tree`: ident, then line endings,
    /// then the encoding.
    fn to_worktree<'a>(&self, blob: &'a [u8], id: Oid) -> Cow<'a, [u8]> {
        let mut out = Cow::Borrowed(blob);
        if self.ident {
            out = Cow::Owned(ident_to_worktree(&out, id));
        }
        if self.crlf != Crlf::None && will_convert_lf_to_crlf(&out, self.crlf) {
            out = Cow::Owned(lf_to_crlf(&out));
        }
        if let Some(enc) = &self.encoding
            && !out.is_empty()
            && let Some(encoded) = reencode(&out, enc)
        {
            out = Cow::Owned(encoded);
        }
        out
    }
}

fn is_utf8(name: &str) -> bool {
    name.eq_ignore_ascii_case("utf-8") || name.eq_ignore_ascii_case("utf8")
}

#[derive(Default)]
struct Stats {
    nul: usize,
    lonecr: usize,
    lonelf: usize,
    crlf: usize,
    printable: usize,
    nonprintable: usize,
}

/// convert.c's `gather_stats`.
fn gather_stats(buf: &[u8]) -> Stats {
    let mut s = Stats::default();
    let mut i = 0;
    while i < buf.len() {
        let c = buf[i];
        if c == b'\r' {
            if buf.get(i + 1) == Some(&b'\n') {
                s.crlf += 1;
                i += 1;
            } else {
                s.lonecr += 1;
            }
        } else if c == b'\n' {
            s.lonelf += 1;
        } else if c == 127 {
            s.nonprintable += 1;
        } else if c < 32 {
            match c {
                b'\x08' | b'\t' | b'\x1b' | b'\x0c' => s.printable += 1,
                0 => {
                    s.nul += 1;
                    s.nonprintable += 1;
                }
                _ => s.nonprintable += 1,
            }
        } else {
            s.printable += 1;
        }
        i += 1;
    }
    if buf.last() == Some(&b'\x1a') {
        s.nonprintable = s.nonprintable.saturating_sub(1);
    }
    s
}

/// convert.c's `will_convert_lf_to_crlf` for CRLF output.
fn will_convert_lf_to_crlf(buf: &[u8], crlf: Crlf) -> bool {
    let s = gather_stats(buf);
    if s.lonelf == 0 {
        return false;
    }
    if crlf == Crlf::Auto {
        let binary = s.lonecr > 0 || s.nul > 0 || (s.printable >> 7) < s.nonprintable;
        if s.lonecr > 0 || s.crlf > 0 || binary {
            return false;
        }
    }
    true
}

/// Every LF not already preceded by a CR becomes CRLF.
fn lf_to_crlf(buf: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(buf.len() + buf.len() / 16);
    for (i, &c) in buf.iter().enumerate() {
        if c == b'\n' && (i == 0 || buf[i - 1] != b'\r') {
            out.push(b'\r');
        }
        out.push(c);
    }
    out
}

/// convert.c's `ident_to_worktree`: every `$Id$` (and git-style
/// `$Id: ... $` on one line) becomes `$Id: <blob id> $`.
fn ident_to_worktree(src: &[u8], id: Oid) -> Vec<u8> {
    let replacement = format!("Id: {id} $");
    let mut out = Vec::with_capacity(src.len() + 48);
    let mut rest = src;
    while let Some(dollar) = rest.iter().position(|&b| b == b'$') {
        out.extend_from_slice(&rest[..=dollar]);
        rest = &rest[dollar + 1..];
        if rest.len() < 3 || &rest[..2] != b"Id" {
            continue;
        }
        if rest[2] == b'$' {
            rest = &rest[3..];
        } else if rest[2] == b':' {
            let Some(end) = rest[3..].iter().position(|&b| b == b'$').map(|p| p + 3) else {
                break;
            };
            if rest[3..end].contains(&b'\n') {
                continue;
            }
            // A space other than the last before the '$': another
            // system's id; kept.
            if rest.len() > 4
                && end > 4
                && let Some(spc) = rest[4..end].iter().position(|&b| b == b' ').map(|p| p + 4)
                && spc < end - 1
            {
                continue;
            }
            rest = &rest[end + 1..];
        } else {
            continue;
        }
        out.extend_from_slice(replacement.as_bytes());
    }
    out.extend_from_slice(rest);
    out
}

/// UTF-8 → `encoding` with the C library's iconv, as git does (glibc
/// writes UTF-16 with a byte order mark). `None` when it cannot: git then
/// writes the blob as it is, and so do we.
fn reencode(src: &[u8], encoding: &str) -> Option<Vec<u8>> {
    let to = CString::new(encoding).ok()?;
    // SAFETY: both names are NUL-terminated; the descriptor is closed below.
    let cd = unsafe { libc::iconv_open(to.as_ptr(), c"UTF-8".as_ptr()) };
    if cd as isize == -1 {
        return None;
    }
    let mut out = vec![0u8; src.len() * 4 + 16];
    let mut inbuf = src.as_ptr() as *mut libc::c_char;
    let mut inleft = src.len();
    let mut outbuf = out.as_mut_ptr() as *mut libc::c_char;
    let mut outleft = out.len();
    // SAFETY: the in and out pointers and lengths describe `src` and `out`,
    // which outlive the calls; iconv only advances them within bounds. A
    // NULL input flushes the shift state.
    let ok = unsafe {
        libc::iconv(cd, &mut inbuf, &mut inleft, &mut outbuf, &mut outleft) != usize::MAX
            && libc::iconv(
                cd,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                &mut outbuf,
                &mut outleft,
            ) != usize::MAX
    };
    // SAFETY: `cd` came from iconv_open and is closed once.
    unsafe { libc::iconv_close(cd) };
    if !ok || inleft != 0 {
        return None;
    }
    out.truncate(out.len() - outleft);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ident_expands_every_keyword_as_git_does() {
        let id = Oid::from_str("0123456789012345678901234567890123456789").unwrap();
        let got = ident_to_worktree(b"a $Id$ b $Id$\n$Id: old $\n$Id: foreign id $\n$Id:\n$ $Id", id);
        let want = format!("a $Id: {id} $ b $Id: {id} $\n$Id: {id} $\n$Id: foreign id $\n$Id:\n$ $Id");
        assert_eq!(String::from_utf8(got).unwrap(), want);
    }

    #[test]
    fn line_endings_follow_text_and_eol() {
        let v = |s: &str| Attr::Value(s.into());
        let u = || Attr::Unspecified;
        let auto_crlf = Conversion::from_attrs(&u(), &u(), &v("crlf"), &v("auto"), &u());
        assert_eq!(auto_crlf.crlf, Crlf::Auto);
        let binary = Conversion::from_attrs(&u(), &u(), &v("crlf"), &Attr::False, &u());
        assert_eq!(binary.crlf, Crlf::None);
        let eol_only = Conversion::from_attrs(&u(), &u(), &v("crlf"), &u(), &u());
        assert_eq!(eol_only.crlf, Crlf::Text);
        let text = Conversion::from_attrs(&u(), &u(), &u(), &Attr::True, &v("UTF-8"));
        assert_eq!(text, Conversion::default());
        assert_eq!(lf_to_crlf(b"a\nb\r\nc\n"), b"a\r\nb\r\nc\r\n");
        assert!(!will_convert_lf_to_crlf(b"a\r\nb\n", Crlf::Auto));
        assert!(will_convert_lf_to_crlf(b"a\r\nb\n", Crlf::Text));
        assert!(!will_convert_lf_to_crlf(b"\0a\nb\n", Crlf::Auto));
    }

    #[test]
    fn utf16_has_a_byte_order_mark() {
        assert_eq!(
            reencode(b"a\n", "UTF-16").unwrap(),
            [0xff, 0xfe, b'a', 0, b'\n', 0]
        );
        assert!(reencode(b"\xff", "UTF-16").is_none());
        assert!(reencode(b"a", "NO-SUCH-ENCODING").is_none());
    }

    #[test]
    fn git_dirs_and_windows_aliases_are_refused() {
        for bad in [".git", ".GIT", ".git.", ".git ", "git~1", "GIT~1.", "..", ""] {
            assert!(refused_name(bad.as_bytes()), "{bad}");
        }
        for good in [
            ".gitattributes",
            ".github",
            "#hash.txt",
            "-early.txt",
            "git",
            "git~10",
        ] {
            assert!(!refused_name(good.as_bytes()), "{good}");
        }
    }
}
