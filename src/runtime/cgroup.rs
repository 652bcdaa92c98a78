//! The cgroups of job containers, seen from the host: which limits a
//! container hit (to tell a user their step ran out of memory rather than
//! "exit status 137"), and removing the cgroups a previous run left.

use std::path::{Path, PathBuf};

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

/// Removes the cgroups under `parent` (children first, then `parent`).
/// Returns the job cgroups removed, as paths relative to `parent`.
pub fn remove_tree(parent: &str) -> Vec<String> {
    let mut removed = Vec::new();
    for dir in dirs(parent) {
        if let Ok(children) = std::fs::read_dir(&dir) {
            for child in children.flatten().filter(|c| c.path().is_dir()) {
                if std::fs::remove_dir(child.path()).is_ok() {
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

/// Whether any hierarchy still has the cgroup `path`.
pub fn exists(path: &str) -> bool {
    !dirs(path).is_empty()
}
