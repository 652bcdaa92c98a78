//! The job's disk: the directory `run/disk` that holds everything the job
//! writes — the workspace (with a warm checkout's writable layer beside
//! it) and the container's writable layer. With a limit
//! (`container.resources.disk_bytes`, or the agent's `runtime.disk_bytes`)
//! it is a filesystem of that size of its own (`sys::loopfs`), so a job
//! that writes too much fills its own disk, never the host's, and the
//! message of the step that failed says so.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::held::WORKSPACE;
use super::{End, Phases, blocking};
use crate::model::FailureKind;
use crate::sys::loopfs::{self, LoopFs};

/// Under the run directory: the job's disk, and its image when limited.
pub(super) const DISK: &str = "disk";
const IMAGE: &str = "disk.img";

/// A job's own filesystem and its size; unmounted (loop device detached,
/// image removed) on drop.
#[derive(Debug)]
pub(super) struct JobDisk {
    fs: Option<LoopFs>,
    bytes: u64,
}

impl Drop for JobDisk {
    fn drop(&mut self) {
        let started = Instant::now();
        drop(self.fs.take());
        tracing::debug!(seconds = started.elapsed().as_secs_f64(), "job disk removed");
    }
}

impl JobDisk {
    pub fn limit(&self) -> DiskLimit {
        DiskLimit {
            path: self.fs.as_ref().expect("until dropped").path().to_path_buf(),
            bytes: self.bytes,
        }
    }
}

/// Makes `run/disk` (a filesystem of `bytes` when given, else a
/// directory) with the workspace in it.
pub(super) fn make(run_dir: &Path, bytes: Option<u64>, mode: u32) -> std::io::Result<Option<JobDisk>> {
    let path = run_dir.join(DISK);
    let disk = match bytes {
        Some(bytes) => {
            let started = Instant::now();
            let fs = LoopFs::create(&run_dir.join(IMAGE), &path, bytes, mode)?;
            tracing::debug!(
                mib = bytes >> 20,
                seconds = started.elapsed().as_secs_f64(),
                "job disk made"
            );
            Some(JobDisk { fs: Some(fs), bytes })
        }
        None => {
            std::fs::DirBuilder::new().mode(mode).create(&path)?;
            None
        }
    };
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(path.join(WORKSPACE))?;
    Ok(disk)
}

/// A job's disk limit, to explain a failure.
#[derive(Debug, Clone)]
pub(super) struct DiskLimit {
    path: PathBuf,
    bytes: u64,
}

impl DiskLimit {
    /// "the job's disk limit of N MiB (...)" when the job's disk is full.
    pub fn full(&self) -> Option<String> {
        loopfs::is_full(&self.path).then(|| self.named())
    }

    /// The same when the job's disk is full, or `error` says a write under
    /// it found no space (what failed may have removed what it wrote, as
    /// libgit2 does with a pack it could not finish).
    pub fn filled(&self, error: &str) -> Option<String> {
        let here =
            error.contains("No space left on device") && error.contains(self.path.to_string_lossy().as_ref());
        if here { Some(self.named()) } else { self.full() }
    }

    fn named(&self) -> String {
        format!(
            "the job's disk limit of {} MiB (container.resources.disk_bytes)",
            self.bytes >> 20
        )
    }
}

impl Phases<'_> {
    /// The job's disk, before anything is written to it.
    pub(super) async fn make_disk(&self, held: &mut super::Held) -> Result<(), End> {
        let config = self.registry.config();
        let bytes = self.resources().disk_bytes;
        let mode = crate::job::dir_mode(config.runtime.userns_base.is_some());
        let run_dir = held.run_dir().to_path_buf();
        held.disk = blocking(move || make(&run_dir, bytes, mode)).await.map_err(|e| {
            let size = bytes.map(|b| format!(" of {} MiB", b >> 20)).unwrap_or_default();
            End::failed(
                FailureKind::Agent,
                format!(
                    "cannot make the job's disk{size}: {e}. A disk limit needs mkfs.ext4 \
                         (e2fsprogs) and loop devices on the agent's host; runtime.disk_bytes = 0 \
                         in the agent's config turns it off"
                ),
            )
        })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_that_found_no_space_under_the_disk_names_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let limit = DiskLimit {
            path: dir.path().join(DISK),
            bytes: 64 << 20,
        };
        let pack = format!(
            "cannot extend packfile '{}/workspace/.git/objects/pack/p': No space left on device",
            limit.path.display()
        );
        assert_eq!(
            limit.filled(&pack).as_deref(),
            Some("the job's disk limit of 64 MiB (container.resources.disk_bytes)")
        );
        // Elsewhere (the host's disk, under the checkout cache), or not
        // about space: not the job's disk.
        let mirror = "cannot write '/var/lib/runnel/mirrors/x/pack': No space left on device";
        assert_eq!(limit.filled(mirror), None);
        assert_eq!(
            limit.filled(&pack.replace("No space left on device", "Permission denied")),
            None
        );
    }
}
