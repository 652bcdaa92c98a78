//! The cgroups of job containers, seen from the host: which limits a
//! container hit (to tell a user their step ran out of memory rather than
//! "exit status 137"), the hierarchies a container must see read-only,
//! placing the embedded runtime's containers in the hierarchies
//! libcontainer leaves alone, and removing a container's cgroups (with
//! whatever children were made in them) or those a previous run left.

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
