//! What a job holds while it runs, and the one order in which it lets go:
//! service containers, the container (its network namespace, with the
//! job's veth, goes with it), the workspace overlay, the container's root filesystem,
//! the image's layers, the keys (overwritten, then unlinked), the checkout
//! cache's locks, the job's disk (which held the workspace and the
//! root's writable layer), the run directory. The fields of [`Held`] are declared in
//! that order, so a job cut short by a panic drops them in the same order
//! as [`Held::teardown`] releases them.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::disk::{DISK, JobDisk};
use super::timed;
use crate::checkout::MirrorUse;
use crate::runtime::JobContainer;
use crate::runtime::image::LayerHold;
use crate::runtime::network::NetNs;
use crate::runtime::rootfs::Rootfs;
use crate::ssh::{self, SshDir};

/// The run directory's parts.
pub(super) const WORKSPACE: &str = "workspace";
pub(super) const BUNDLE: &str = "bundle";
pub(super) const SSH: &str = "ssh";
pub(super) const ROOT: &str = "root";

/// A job's resources, declared in teardown order.
#[derive(Debug, Default)]
pub(super) struct Held {
    /// Service containers, in the job container's namespaces: removed
    /// first, their roots (on the job's disk) with them.
    pub services: Vec<super::services::Service>,
    pub container: Option<Box<dyn JobContainer>>,
    /// The container's network namespace, held open until the container
    /// is gone (see `NetNs`); with it goes the job's veth pair.
    pub netns: Option<NetNs>,
    /// The workspace, an overlay over cached work tree layers when the
    /// checkout was warm: unmounted before those layers' locks go.
    pub workspace: Option<Workspace>,
    pub rootfs: Option<Rootfs>,
    /// Keeps the image's layers in the cache while the job runs.
    pub image_layers: Option<Arc<Vec<LayerHold>>>,
    pub ssh_dir: Option<SshDir>,
    /// The mirrors and work tree layers the workspace borrows from.
    pub borrowed: Vec<MirrorUse>,
    /// The filesystem the workspace and the root's writable layer are on,
    /// when the job's disk is limited: unmounted after both.
    pub disk: Option<JobDisk>,
    pub run_dir: Option<RunDir>,
}

impl Held {
    /// Creates the run directory (with its bundle) at `path`; the job's
    /// disk, with the workspace, comes next (`disk::make`).
    pub fn create(path: PathBuf, mode: u32) -> std::io::Result<Held> {
        let run_dir = RunDir::create(path, mode)?;
        let workspace = Workspace(run_dir.0.join(DISK).join(WORKSPACE));
        Ok(Held {
            workspace: Some(workspace),
            run_dir: Some(run_dir),
            ..Held::default()
        })
    }

    pub fn run_dir(&self) -> &Path {
        &self
            .run_dir
            .as_ref()
            .expect("the run directory lives until teardown")
            .0
    }

    /// Where the job writes: its workspace and its root's writable layer.
    pub fn disk(&self) -> PathBuf {
        self.run_dir().join(DISK)
    }

    pub fn workspace(&self) -> PathBuf {
        self.disk().join(WORKSPACE)
    }

    /// Lets go of everything, in order: the container first (async), the
    /// rest off the async threads (unmounts, wiping keys, removing
    /// directories). Returns the stages it went through, in order.
    pub async fn teardown(mut self, grace: Duration) -> Vec<&'static str> {
        let mut stages = Vec::new();
        for s in &mut self.services {
            if let Some(c) = s.container.take() {
                c.remove(grace).await;
            }
            if let Some(t) = s.task.take() {
                // Its process went with the container: the pipes close.
                if tokio::time::timeout(Duration::from_secs(10), t).await.is_err() {
                    tracing::warn!("a service's output did not end with its container");
                }
            }
        }
        if !self.services.is_empty() {
            stages.push("services");
        }
        if let Some(c) = self.container.take() {
            super::timed!("remove_container", c.remove(grace).await);
            stages.push("container");
        }
        match tokio::task::spawn_blocking(move || self.release()).await {
            Ok(rest) => stages.extend(rest),
            Err(e) => tracing::error!(error = %e, "the job's teardown failed"),
        }
        stages
    }

    /// Drops each resource in declaration order; the stages it released.
    fn release(mut self) -> Vec<&'static str> {
        let mut stages = Vec::new();
        let mut stage = |name, released: bool| {
            if released {
                stages.push(name);
            }
        };
        stage("service roots", !std::mem::take(&mut self.services).is_empty());
        stage("network namespace", self.netns.take().map(drop).is_some());
        stage(
            "workspace",
            timed!("release_workspace", self.workspace.take().map(drop).is_some()),
        );
        stage(
            "rootfs",
            timed!("release_rootfs", self.rootfs.take().map(drop).is_some()),
        );
        stage("image", self.image_layers.take().map(drop).is_some());
        stage(
            "keys",
            timed!("release_keys", self.ssh_dir.take().map(drop).is_some()),
        );
        stage("checkout cache", !std::mem::take(&mut self.borrowed).is_empty());
        stage(
            "disk",
            timed!("release_disk", self.disk.take().map(drop).is_some()),
        );
        stage(
            "run directory",
            timed!("release_run_dir", self.run_dir.take().map(drop).is_some()),
        );
        stages
    }
}

/// The workspace; its overlay (a warm checkout) is unmounted on drop.
#[derive(Debug)]
pub(super) struct Workspace(PathBuf);

impl Drop for Workspace {
    fn drop(&mut self) {
        if let Err(e) = crate::checkout::unmount_workspace(&self.0) {
            tracing::error!(path = %self.0.display(), error = %e, "cannot unmount a job's workspace");
        }
    }
}

/// The run directory: removed, with its keys wiped and anything still
/// mounted under it unmounted, on drop.
#[derive(Debug)]
pub(super) struct RunDir(PathBuf);

impl RunDir {
    fn create(path: PathBuf, mode: u32) -> std::io::Result<RunDir> {
        std::fs::DirBuilder::new().mode(mode).create(&path)?;
        let dir = RunDir(path);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(dir.0.join(BUNDLE))?;
        Ok(dir)
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        remove_run_dir(&self.0);
    }
}

/// Wipes the keys under a run directory, unmounts anything under it (the
/// job's disk last), detaches its disk's loop device and removes it. Also
/// used at agent start for jobs an earlier run left.
pub(in crate::job) fn remove_run_dir(path: &Path) {
    if let Err(e) = ssh::dir::wipe_dir(&path.join(SSH)) {
        tracing::error!(path = %path.display(), error = %e, "cannot wipe a job's keys");
    }
    if let Err(e) = crate::sys::mount::unmount_and_remove(path, path) {
        tracing::error!(path = %path.display(), error = %e, "cannot remove a job's run directory");
    }
    // Unmounting the disk detached it (autoclear), unless it was busy.
    if let Err(e) = crate::sys::loopfs::detach_under(path) {
        tracing::error!(path = %path.display(), error = %e, "cannot detach a job's loop device");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::lifecycle::disk;
    use crate::job::lifecycle::steps::tests::FakeRuntime;
    use crate::ssh::KnownHosts;

    #[tokio::test]
    async fn teardown_removes_the_container_first_and_the_run_directory_last() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        let mut held = Held::create(run.clone(), 0o700).unwrap();
        held.disk = disk::make(&run, None, 0o700).unwrap();
        let known = KnownHosts::parse(&[
            "h ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl".into(),
        ])
        .unwrap();
        held.ssh_dir = Some(SshDir::write(&run.join(SSH), &[], &[], &known).unwrap());
        let rt = FakeRuntime::default();
        let mut container = rt.container();
        container.checks = vec![held.workspace(), run.join(SSH).join("known_hosts")];
        held.container = Some(Box::new(container));

        let stages = held.teardown(Duration::from_secs(1)).await;
        assert_eq!(stages, ["container", "workspace", "keys", "run directory"]);
        // When the container went, its workspace and keys were still there.
        assert_eq!(
            *rt.calls.lock().unwrap(),
            ["remove workspace=true known_hosts=true"]
        );
        assert!(!run.exists());
    }

    #[tokio::test]
    async fn dropping_what_a_job_holds_removes_its_run_directory() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        let held = Held::create(run.clone(), 0o700).unwrap();
        disk::make(&run, None, 0o700).unwrap();
        assert!(held.workspace().is_dir() && run.join(BUNDLE).is_dir());
        drop(held);
        assert!(!run.exists());
    }
}
