//! The cgroups of job containers, seen from the host: which limits a
//! container hit (to tell a user their step ran out of memory rather than
//! "exit status 137"), the hierarchies a container must see read-only,
//! placing the embedded runtime's containers in the hierarchies
//! libcontainer leaves alone, and removing a container's cgroups (with
//! whatever children were made in them) or those a previous run left.
//! Under systemd with `Delegate=yes` on a unified (v2) host, the job
//! cgroups live in the service's own subtree ([`job_parent`]).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const ROOT: &str = "/sys/fs/cgroup";

/// Counters of limit hits, cumulative over the container's life.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LimitsHit {
    pub oom_kills: u64,
    pub pids_max: u64,
}

fn unified() -> bool {
    Path::new(ROOT).join("cgroup.controllers").exists()
}

/// The value of `key` in a flat-keyed cgroup file ("key value" lines).
fn keyed(path: &Path, key: &str) -> u64 {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key)?.trim().parse().ok())
        .unwrap_or(0)
}

/// Reads the counters of the cgroup at `path` (as in the OCI spec).
pub fn limits_hit(path: &str) -> LimitsHit {
    let rel = path.trim_start_matches('/');
    if unified() {
        let dir = Path::new(ROOT).join(rel);
        LimitsHit {
            oom_kills: keyed(&dir.join("memory.events"), "oom_kill "),
            pids_max: keyed(&dir.join("pids.events"), "max "),
        }
    } else {
        LimitsHit {
            oom_kills: keyed(
                &Path::new(ROOT)
                    .join("memory")
                    .join(rel)
                    .join("memory.oom_control"),
                "oom_kill ",
            ),
            pids_max: keyed(
                &Path::new(ROOT).join("pids").join(rel).join("pids.events"),
                "max ",
            ),
        }
    }
}

/// Every hierarchy's directory for the cgroup `path`.
fn dirs(path: &str) -> Vec<PathBuf> {
    let rel = path.trim_start_matches('/');
    if unified() {
        return vec![Path::new(ROOT).join(rel)];
    }
    std::fs::read_dir(ROOT)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.path().join(rel))
                .filter(|p| p.is_dir())
                .collect()
        })
        .unwrap_or_default()
}

/// Removes the cgroups under `parent` (each child with everything below
/// it, then `parent`). Returns the job cgroups removed, as paths relative
/// to `parent`.
pub fn remove_tree(parent: &str) -> Vec<String> {
    let mut removed = Vec::new();
    for dir in dirs(parent) {
        if let Ok(children) = std::fs::read_dir(&dir) {
            for child in children.flatten().filter(|c| c.path().is_dir()) {
                if remove_depth_first(&child.path()).is_ok() {
                    let name = child.file_name().to_string_lossy().to_string();
                    if !removed.contains(&name) {
                        removed.push(name);
                    }
                }
            }
        }
        let _ = std::fs::remove_dir(&dir);
    }
    removed
}

/// Removes the cgroup `path` (as in the OCI spec) from every hierarchy,
/// with any cgroups made below it, deepest first. A cgroup whose last
/// process is still exiting is busy for a moment: tried again for up to
/// `patience`. Returns what could not be removed.
pub fn remove(path: &str, patience: Duration) -> Vec<(PathBuf, std::io::Error)> {
    let deadline = Instant::now() + patience;
    loop {
        let failed: Vec<_> = dirs(path)
            .into_iter()
            .filter_map(|d| remove_depth_first(&d).err().map(|e| (d, e)))
            .collect();
        let busy = failed.iter().all(|(_, e)| e.raw_os_error() == Some(libc::EBUSY));
        if failed.is_empty() || !busy || Instant::now() >= deadline {
            return failed;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Removes the cgroup directory `dir` after every cgroup below it. (A
/// cgroup directory holds only control files, which go with it, and
/// child cgroups.)
fn remove_depth_first(dir: &Path) -> std::io::Result<()> {
    for child in std::fs::read_dir(dir)?.flatten() {
        if child.file_type().is_ok_and(|t| t.is_dir()) {
            remove_depth_first(&child.path())?;
        }
    }
    match std::fs::remove_dir(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

/// The v1 controllers libcontainer puts a container's processes in (its
/// `CONTROLLERS`); a hierarchy with none of them is left to us.
const LIBCONTAINER_CONTROLLERS: &[&str] = &[
    "cpu",
    "cpuacct",
    "cpuset",
    "devices",
    "hugetlb",
    "memory",
    "pids",
    "perf_event",
    "blkio",
    "net_prio",
    "net_cls",
    "freezer",
];

/// `(mount point, fstype, super options)` of every cgroup hierarchy
/// mounted under the cgroup root.
fn hierarchies() -> Vec<(PathBuf, String, String)> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let mount_point = left.split(' ').nth(4)?;
            let mut r = right.split(' ');
            let fstype = r.next()?;
            let options = r.nth(1).unwrap_or("");
            ((fstype == "cgroup" || fstype == "cgroup2") && mount_point.starts_with(ROOT)).then(|| {
                (
                    PathBuf::from(mount_point),
                    fstype.to_string(),
                    options.to_string(),
                )
            })
        })
        .collect()
}

/// The cgroup file system as a container mounts it: the root and, on
/// v1, each hierarchy. Every one of them is read-only for the container
/// (libcontainer ignores a v1 cgroup mount's `ro`; read-only paths are
/// honoured by every runtime).
pub fn mount_points() -> Vec<String> {
    let mut out = vec![ROOT.to_string()];
    if !unified() {
        out.extend(
            hierarchies()
                .into_iter()
                .map(|(p, ..)| p.to_string_lossy().to_string())
                .filter(|p| p != ROOT),
        );
    }
    out
}

/// The calling process's cgroup directory in the hierarchy mounted at
/// `mount_point` with `fstype` and super `options`, from
/// `/proc/self/cgroup` ("ID:controllers:path"; cgroup2 is "0::path").
fn own_dir(mount_point: &Path, fstype: &str, options: &str) -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let options: Vec<&str> = options.split(',').collect();
    text.lines().find_map(|l| {
        let mut f = l.splitn(3, ':');
        let (id, controllers, path) = (f.next()?, f.next()?, f.next()?);
        let this = if fstype == "cgroup2" {
            id == "0" && controllers.is_empty()
        } else {
            !controllers.is_empty() && controllers.split(',').all(|c| options.contains(&c))
        };
        this.then(|| mount_point.join(path.trim_start_matches('/')))
    })
}

/// Where [`enter_unmanaged`] took the calling process from.
#[derive(Debug)]
pub struct Entered(Vec<PathBuf>);

impl Entered {
    /// Moves the calling process back; what it started meanwhile stays.
    pub fn leave(self) -> Result<(), MoveError> {
        for dir in self.0 {
            std::fs::write(dir.join("cgroup.procs"), "0").map_err(MoveError::at("return to", &dir))?;
        }
        Ok(())
    }
}

/// A process could not be moved into (or out of) a cgroup.
#[derive(Debug, thiserror::Error)]
#[error("cannot {action} {}: {source}", dir.display())]
pub struct MoveError {
    action: &'static str,
    dir: PathBuf,
    #[source]
    source: std::io::Error,
}

impl MoveError {
    fn at(action: &'static str, dir: &Path) -> impl FnOnce(std::io::Error) -> MoveError {
        let dir = dir.to_path_buf();
        move |source| MoveError { action, dir, source }
    }
}

/// Moves the calling process into the cgroup `path` of every hierarchy
/// libcontainer does not manage (v1 named hierarchies such as
/// `name=systemd`, and cgroup2 beside v1), making it when `create`. What
/// it starts then is there too, and a cgroup namespace made there has its
/// root there: a container sees only its own cgroup in those hierarchies
/// as well, and cannot reach the host's `name=systemd` root.
pub fn enter_unmanaged(path: &str, create: bool) -> Result<Entered, MoveError> {
    let mut left = Vec::new();
    if unified() {
        return Ok(Entered(left));
    }
    let rel = path.trim_start_matches('/');
    for (mount_point, fstype, options) in hierarchies() {
        let managed = fstype == "cgroup" && options.split(',').any(|o| LIBCONTAINER_CONTROLLERS.contains(&o));
        if managed {
            continue;
        }
        let Some(own) = own_dir(&mount_point, &fstype, &options) else {
            continue;
        };
        let dir = mount_point.join(rel);
        if create {
            std::fs::create_dir_all(&dir).map_err(MoveError::at("create", &dir))?;
        }
        std::fs::write(dir.join("cgroup.procs"), "0").map_err(MoveError::at("join", &dir))?;
        left.push(own);
    }
    Ok(Entered(left))
}

/// What runtimes add to a spec's device list: `c *:* m` and `b *:* m`
/// (make any node: Docker's default, added by runc and libcontainer) and
/// `c 10:200 rwm` (tun, added by libcontainer).
const ADDED_DEVICE_RULES: &[&str] = &["c *:* m", "b *:* m", "c 10:200 rwm"];

/// Takes out of the v1 devices cgroup of `path` the rules runtimes add
/// to the spec's, leaving exactly its allow-list. (On v2 the device
/// filter is a BPF program the runtime attaches; runc builds it from the
/// spec's list, libcontainer 0.7 without its `cgroupsv2_devices` feature
/// attaches none.)
pub fn restrict_devices(path: &str) -> std::io::Result<()> {
    // cgroup v2, the whole tree or beside v1: a BPF filter on the job's
    // cgroup (with libcontainer the only one; runc attaches its own too).
    let v2 = if unified() {
        Some(Path::new(ROOT).join(path.trim_start_matches('/')))
    } else {
        let hybrid = Path::new(ROOT).join("unified");
        hybrid
            .join("cgroup.controllers")
            .exists()
            .then(|| hybrid.join(path.trim_start_matches('/')))
    };
    if let Some(dir) = v2.filter(|d| d.is_dir()) {
        match crate::sys::devfilter::attach(&dir, &super::spec::device_filter()) {
            Ok(()) => {}
            // An exclusive filter is attached already: the runtime's own.
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                tracing::debug!(cgroup = %dir.display(), error = %e, "the runtime's device filter is in place");
            }
            Err(e) if unified() => return Err(e),
            // Beside v1, whose devices cgroup holds the same list.
            Err(e) => {
                tracing::warn!(cgroup = %dir.display(), error = %e, "no device filter on the job's cgroup v2")
            }
        }
    }
    if unified() {
        return Ok(());
    }
    let deny = Path::new(ROOT)
        .join("devices")
        .join(path.trim_start_matches('/'))
        .join("devices.deny");
    if !deny.exists() {
        return Ok(());
    }
    for rule in ADDED_DEVICE_RULES {
        std::fs::write(&deny, rule)?;
    }
    Ok(())
}

/// Whether any hierarchy still has the cgroup `path`.
pub fn exists(path: &str) -> bool {
    !dirs(path).is_empty()
}

/// The cgroup v2 path (from the root) in the text of `/proc/<pid>/cgroup`:
/// its "0::PATH" line.
fn unified_path(proc_cgroup: &str) -> Option<&str> {
    proc_cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .filter(|p| p.starts_with('/'))
}

/// Whether systemd delegated the cgroup directory `dir` (`Delegate=yes`):
/// systemd marks a delegated cgroup with the `trusted.delegate` xattr.
fn delegated(dir: &Path) -> bool {
    let Ok(path) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    let mut value = [0u8; 8];
    // SAFETY: both strings are NUL-terminated and `value` is writable for
    // its length.
    let n = unsafe {
        libc::getxattr(
            path.as_ptr(),
            c"trusted.delegate".as_ptr(),
            value.as_mut_ptr().cast(),
            value.len(),
        )
    };
    n > 0 && value[..n as usize].starts_with(b"1")
}

/// Why the agent could not take its delegated cgroup subtree.
#[derive(Debug, thiserror::Error)]
#[error("cannot {action} {} (the agent's delegated cgroup; is `Delegate=yes` set on the unit, and nothing else started in it?): {source}", path.display())]
pub struct DelegateError {
    action: &'static str,
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

fn delegate_err(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> DelegateError {
    let path = path.to_path_buf();
    move |source| DelegateError { action, path, source }
}

/// The leaf the agent moves itself into, and the parent of its jobs'
/// cgroups, inside its delegated cgroup.
const AGENT_LEAF: &str = "agent";
const JOBS: &str = "jobs";

/// The parent of this agent's job cgroups (a path from the cgroup root,
/// as in the OCI spec). Under systemd with `Delegate=yes` on a unified
/// host that is `<the service's cgroup>/jobs`: the agent first moves
/// itself into `<the service's cgroup>/agent` (cgroup v2 lets only a
/// cgroup without processes enable controllers for its children) and
/// enables the controllers it was given in the service's cgroup and in
/// `jobs`, never above. Elsewhere (cgroup v1, or no delegation) it is
/// `fallback`, under the root, as before.
pub fn job_parent(fallback: &str) -> Result<String, DelegateError> {
    if !unified() {
        return Ok(fallback.to_string());
    }
    let text = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let own = own_delegated(Path::new(ROOT), &text, delegated);
    match own {
        Some(own) => take_subtree(Path::new(ROOT), &own),
        None => Ok(fallback.to_string()),
    }
}

/// The delegated cgroup this process sits in (or in whose `agent` leaf it
/// already sits), as a path from the cgroup root mounted at `root`.
fn own_delegated(root: &Path, proc_cgroup: &str, is_delegated: impl Fn(&Path) -> bool) -> Option<String> {
    let own = unified_path(proc_cgroup)?.trim_end_matches('/');
    if own.is_empty() {
        return None;
    }
    let candidates = [Some(own), own.strip_suffix(&format!("/{AGENT_LEAF}"))];
    candidates
        .into_iter()
        .flatten()
        .find(|c| !c.is_empty() && is_delegated(&root.join(c.trim_start_matches('/'))))
        .map(str::to_string)
}

/// Moves the calling process into `<own>/agent` and enables, in `<own>`
/// and `<own>/jobs`, every controller `<own>` has. Returns `<own>/jobs`.
fn take_subtree(root: &Path, own: &str) -> Result<String, DelegateError> {
    let dir = root.join(own.trim_start_matches('/'));
    let leaf = dir.join(AGENT_LEAF);
    let jobs = dir.join(JOBS);
    for d in [&leaf, &jobs] {
        match std::fs::create_dir(d) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                return Err(delegate_err("create", d)(e));
            }
            _ => {}
        }
    }
    let procs = leaf.join("cgroup.procs");
    std::fs::write(&procs, "0").map_err(delegate_err("move the agent into", &procs))?;
    let controllers = std::fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
    let enable: String = controllers.split_whitespace().map(|c| format!("+{c} ")).collect();
    if !enable.is_empty() {
        for d in [&dir, &jobs] {
            let control = d.join("cgroup.subtree_control");
            std::fs::write(&control, enable.trim_end())
                .map_err(delegate_err("enable controllers in", &control))?;
        }
    }
    Ok(format!("{}/{JOBS}", own.trim_end_matches('/')))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str =
        "12:pids:/user.slice\n1:name=systemd:/user.slice/session-1.scope\n0::/user.slice/session-1.scope\n";

    #[test]
    fn the_unified_path_is_the_0_line() {
        assert_eq!(
            unified_path("0::/system.slice/runnel.service\n"),
            Some("/system.slice/runnel.service")
        );
        assert_eq!(unified_path(HYBRID), Some("/user.slice/session-1.scope"));
        assert_eq!(unified_path("4:memory:/x\n"), None);
        assert_eq!(unified_path(""), None);
    }

    #[test]
    fn only_a_delegated_cgroup_is_taken() {
        let root = Path::new("/cg");
        let svc = "0::/system.slice/runnel.service\n";
        let yes = |p: &Path| p == Path::new("/cg/system.slice/runnel.service");
        assert_eq!(
            own_delegated(root, svc, yes).as_deref(),
            Some("/system.slice/runnel.service")
        );
        assert_eq!(own_delegated(root, svc, |_| false), None);
        // Restarted in place (or started again by the agent itself): already in the leaf.
        let leaf = "0::/system.slice/runnel.service/agent\n";
        assert_eq!(
            own_delegated(root, leaf, yes).as_deref(),
            Some("/system.slice/runnel.service")
        );
        // The root is never ours.
        assert_eq!(own_delegated(root, "0::/\n", |_| true), None);
    }

    #[test]
    fn the_agent_moves_into_a_leaf_and_jobs_get_the_controllers() {
        // A fake cgroupfs: plain files where the kernel has control files.
        let root = tempfile::tempdir().unwrap();
        let own = root.path().join("system.slice/runnel.service");
        std::fs::create_dir_all(&own).unwrap();
        std::fs::write(own.join("cgroup.controllers"), "cpu io memory pids\n").unwrap();
        std::fs::write(root.path().join("cgroup.subtree_control"), "untouched").unwrap();
        let parent = take_subtree(root.path(), "/system.slice/runnel.service").unwrap();
        assert_eq!(parent, "/system.slice/runnel.service/jobs");
        assert_eq!(
            std::fs::read_to_string(own.join("agent/cgroup.procs")).unwrap(),
            "0"
        );
        for d in [own.clone(), own.join("jobs")] {
            assert_eq!(
                std::fs::read_to_string(d.join("cgroup.subtree_control")).unwrap(),
                "+cpu +io +memory +pids"
            );
        }
        // Nothing above the service's cgroup is written.
        assert_eq!(
            std::fs::read_to_string(root.path().join("cgroup.subtree_control")).unwrap(),
            "untouched"
        );
        assert!(!root.path().join("system.slice/cgroup.subtree_control").exists());
        // Taken again (a restart): same answer.
        assert_eq!(
            take_subtree(root.path(), "/system.slice/runnel.service").unwrap(),
            parent
        );
    }

    #[test]
    fn systemds_delegate_mark_is_read() {
        // systemd sets trusted.delegate=1 on a unit's cgroup when it has
        // Delegate=yes; setting a trusted xattr takes root.
        if !nix::unistd::geteuid().is_root() {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI runs as root: setting a trusted.* xattr needs it"
            );
            eprintln!("skipped: setting a trusted.* xattr needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        assert!(!delegated(dir.path()));
        let path = std::ffi::CString::new(dir.path().as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: NUL-terminated strings and a one-byte value.
        let r = unsafe {
            libc::setxattr(
                path.as_ptr(),
                c"trusted.delegate".as_ptr(),
                b"1".as_ptr().cast(),
                1,
                0,
            )
        };
        assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
        assert!(delegated(dir.path()));
    }

    #[test]
    fn a_subtree_that_cannot_be_taken_says_what_to_check() {
        let root = tempfile::tempdir().unwrap();
        let e = take_subtree(root.path(), "/system.slice/gone.service").unwrap_err();
        let msg = e.to_string();
        assert!(msg.starts_with("cannot create "), "{msg}");
        assert!(msg.contains("Delegate=yes"), "{msg}");
    }
}
