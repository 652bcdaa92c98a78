//! Retention: how long ended jobs' event logs and status stay. A periodic
//! sweep, owned by whoever serves the registry, removes the ended jobs that
//! fall outside `[retention]` (too old, beyond the count, beyond the bytes)
//! from the registry and from disk, so the state directory stays bounded.
//! Running jobs are never touched. The same sweep removes the checkout
//! mirrors and image layers no job has used for `cache_max_age`.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::Registry;
use crate::config::RetentionConfig;

/// Where removed job directories go before they are deleted, so that the
/// job id is free again at once and the deletion happens outside the lock.
const REMOVED_DIR: &str = "removed";

/// An ended job, as retention sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Ended {
    pub id: String,
    pub finished: SystemTime,
    pub bytes: u64,
}

/// Why a job goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Reason {
    Age,
    Count,
    Bytes,
}

impl Reason {
    fn name(self) -> &'static str {
        match self {
            Reason::Age => "retention.max_age",
            Reason::Count => "retention.max_jobs",
            Reason::Bytes => "retention.max_bytes",
        }
    }
}

/// The ended jobs to remove: newest first, a job is kept while it is
/// younger than `max_age`, among the `max_jobs` newest, and the jobs kept
/// so far (it included) hold no more than `max_bytes`.
pub(super) fn select(
    mut ended: Vec<Ended>,
    now: SystemTime,
    policy: &RetentionConfig,
) -> Vec<(String, Reason)> {
    ended.sort_by(|a, b| b.finished.cmp(&a.finished).then_with(|| a.id.cmp(&b.id)));
    let mut kept = 0usize;
    let mut bytes = 0u64;
    let mut out = Vec::new();
    for e in ended {
        let age = now.duration_since(e.finished).unwrap_or(Duration::ZERO);
        let reason = if age > policy.max_age {
            Some(Reason::Age)
        } else if kept >= policy.max_jobs {
            Some(Reason::Count)
        } else if bytes.saturating_add(e.bytes) > policy.max_bytes {
            Some(Reason::Bytes)
        } else {
            None
        };
        match reason {
            Some(r) => out.push((e.id, r)),
            None => {
                kept += 1;
                bytes += e.bytes;
            }
        }
    }
    out
}

/// Bytes of regular files under `dir`.
fn disk_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .filter_map(|e| Some((e.path(), e.metadata().ok()?)))
        .map(|(p, m)| if m.is_dir() { disk_bytes(&p) } else { m.len() })
        .sum()
}

impl Registry {
    /// Removes the ended jobs that retention no longer keeps, from the
    /// registry and from disk. Returns how many went.
    pub fn sweep(&self) -> usize {
        let policy = &self.config.retention;
        self.expire_caches(policy.cache_max_age);
        let candidates: Vec<(String, SystemTime, PathBuf)> = self
            .jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter_map(|job| {
                let s = job.status.lock().unwrap_or_else(|e| e.into_inner());
                let finished = s.finished.filter(|_| s.state.is_final())?;
                Some((job.id.clone(), finished, job.dir.clone()))
            })
            .collect();
        // Sizes are read outside the registry's lock.
        let ended: Vec<Ended> = candidates
            .into_iter()
            .map(|(id, finished, dir)| Ended {
                id,
                finished,
                bytes: disk_bytes(&dir),
            })
            .collect();
        let doomed = select(ended, SystemTime::now(), policy);
        if doomed.is_empty() {
            return 0;
        }
        let removed_dir = self.removed_dir();
        let mut trash: Vec<PathBuf> = Vec::new();
        {
            let mut jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
            for (id, reason) in &doomed {
                let Some(job) = jobs.remove(id) else { continue };
                let to = removed_dir.join(id);
                // Renamed under the lock: the id is free for a new job at once.
                if let Err(e) =
                    std::fs::create_dir_all(&removed_dir).and_then(|_| std::fs::rename(&job.dir, &to))
                {
                    tracing::error!(job_id = %id, error = %e, "cannot move an expired job's directory aside");
                    trash.push(job.dir.clone());
                } else {
                    trash.push(to);
                }
                tracing::info!(job_id = %id, by = reason.name(), "removed an ended job's logs and status");
            }
        }
        for dir in &trash {
            remove_dir(dir);
        }
        self.metrics.jobs_removed(doomed.len());
        doomed.len()
    }

    /// Removes the checkout mirrors and image layers that no job has used
    /// for `max_age` and none uses now.
    fn expire_caches(&self, max_age: Duration) {
        if let Some(mirrors) = &self.mirrors {
            for name in mirrors.expire(max_age) {
                tracing::info!(mirror = %name, by = "retention.cache_max_age", "removed an unused checkout cache");
            }
        }
        for id in self.images.expire(max_age) {
            tracing::info!(layer = %id, by = "retention.cache_max_age", "removed an unused image layer");
        }
    }

    pub(super) fn removed_dir(&self) -> PathBuf {
        self.config.state_dir.join(REMOVED_DIR)
    }

    /// Finishes removals an earlier run of the agent was cut short in.
    pub(super) fn finish_removals(state_dir: &Path) {
        remove_dir(&state_dir.join(REMOVED_DIR));
    }
}

fn remove_dir(dir: &Path) {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            tracing::error!(path = %dir.display(), error = %e, "cannot remove an expired job's directory");
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(max_age_secs: u64, max_jobs: usize, max_bytes: u64) -> RetentionConfig {
        RetentionConfig {
            max_age: Duration::from_secs(max_age_secs),
            max_jobs,
            max_bytes,
            interval: Duration::from_secs(60),
            cache_max_age: Duration::from_secs(60),
        }
    }

    fn ended(id: &str, secs_ago: u64, bytes: u64, now: SystemTime) -> Ended {
        Ended {
            id: id.into(),
            finished: now - Duration::from_secs(secs_ago),
            bytes,
        }
    }

    #[test]
    fn keeps_the_newest_within_age_count_and_bytes() {
        let now = SystemTime::now();
        let jobs = || {
            vec![
                ended("old", 1000, 10, now),
                ended("a", 30, 10, now),
                ended("b", 20, 10, now),
                ended("c", 10, 10, now),
            ]
        };
        assert_eq!(
            select(jobs(), now, &policy(100, 10, 1000)),
            vec![("old".into(), Reason::Age)]
        );
        assert_eq!(
            select(jobs(), now, &policy(5000, 2, 1000)),
            vec![("a".into(), Reason::Count), ("old".into(), Reason::Count)]
        );
        assert_eq!(
            select(jobs(), now, &policy(5000, 10, 25)),
            vec![("a".into(), Reason::Bytes), ("old".into(), Reason::Bytes)]
        );
        assert!(select(jobs(), now, &policy(5000, 10, 1000)).is_empty());
    }

    #[test]
    fn one_job_larger_than_the_bytes_goes_but_smaller_older_ones_stay() {
        let now = SystemTime::now();
        let jobs = vec![ended("huge", 1, 500, now), ended("small", 2, 10, now)];
        assert_eq!(
            select(jobs, now, &policy(5000, 10, 100)),
            vec![("huge".into(), Reason::Bytes)]
        );
    }
}
