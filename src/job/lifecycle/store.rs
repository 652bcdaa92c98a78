//! The steps that move files between a job's container and the store:
//! save_cache, restore_cache, persist_to_workspace, attach_workspace,
//! store_artifacts, store_test_results.
//!
//! Files cross the container's boundary only through `runnel store-io`
//! (`store::archive`), a process that joins the container's user and
//! mount namespaces as the step's user before it touches a path; the
//! agent moves its bytes to and from the store, and checks what it
//! restores against the digest stored with it before any byte reaches
//! the container. As CircleCI: a cache that cannot be saved or restored
//! is a warning; a workspace, artifact or test result that cannot be is
//! a STORAGE failure naming the backend and the key.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};
use tokio::time::Instant;

use super::steps::Steps;
use super::{End, megabytes, rate, report_progress};
use crate::job::Registry;
use crate::model::{EventKind, FailureKind, JobSpec, JobState, Step, StepKind, StepResult, TestResults};
use crate::runtime::JobContainer;
use crate::runtime::spec as oci;
use crate::store::{Progress, Store, archive, key};

/// What the store's steps of a job share.
pub(super) struct StoreCx {
    store: Result<Store, String>,
    project: String,
    /// The workflow whose workspace it is: the job's own id without one.
    workflow: String,
    job_id: String,
    branch: String,
    revision: String,
    progress_interval: Duration,
    /// The names of the job's secrets: never rendered into a key.
    secrets: BTreeSet<String>,
}

/// How a store step did not succeed.
enum Failed {
    /// Logged; the step succeeds (a cache).
    Warning(String),
    /// The job fails with FailureKind::Storage.
    Storage(String),
}

/// A JUnit file larger than this is not read (it is still kept).
const MAX_JUNIT_BYTES: u64 = 32 << 20;
/// Lines of `runnel store-io`'s stderr that reach the log.
const MAX_HELPER_LINES: usize = 40;

/// Whether an upload's manifest may only be created, never replaced (a
/// cache key's first save wins, even against a save running beside it).
#[derive(Clone, Copy)]
enum Once {
    Yes,
    No,
}

impl StoreCx {
    pub fn new(registry: &Registry, spec: &JobSpec, commit: Option<String>) -> StoreCx {
        let revision = spec
            .checkout
            .as_ref()
            .map(|c| c.revision.clone())
            .unwrap_or_default();
        // A revision that is a branch name is the branch.
        let branch = revision
            .strip_prefix("refs/heads/")
            .map(str::to_string)
            .unwrap_or_else(|| {
                let is_sha = revision.len() >= 7 && revision.chars().all(|c| c.is_ascii_hexdigit());
                if is_sha || revision.starts_with("refs/") {
                    String::new()
                } else {
                    revision.clone()
                }
            });
        StoreCx {
            store: registry.store().cloned().map_err(str::to_string),
            project: spec.project.clone(),
            workflow: if spec.workflow_id.is_empty() {
                spec.job_id.clone()
            } else {
                spec.workflow_id.clone()
            },
            job_id: spec.job_id.clone(),
            branch,
            revision: commit.unwrap_or(revision),
            progress_interval: registry.config().progress_interval,
            secrets: spec.secrets.iter().map(|s| s.name.clone()).collect(),
        }
    }

    /// For steps that never use the store (the lifecycle's unit tests).
    #[cfg(test)]
    pub fn none() -> StoreCx {
        StoreCx {
            store: Err("no store in this test".into()),
            project: String::new(),
            workflow: String::new(),
            job_id: String::new(),
            branch: String::new(),
            revision: String::new(),
            progress_interval: Duration::from_secs(1),
            secrets: BTreeSet::new(),
        }
    }
}

/// A running `runnel store-io`, and the task reading its stderr.
struct Helper {
    child: Child,
    stderr: tokio::task::JoinHandle<String>,
}

/// A finished `runnel store-io`: its status and what it said.
struct HelperEnd {
    code: Option<i32>,
    lines: Vec<String>,
}

impl HelperEnd {
    /// "packed: N" / "unpacked: N" as it said it.
    fn count(&self, what: &str) -> Option<u64> {
        self.lines
            .iter()
            .find_map(|l| l.strip_prefix(what).and_then(|n| n.trim().parse().ok()))
    }

    /// Its error, if it ended with one.
    fn error(&self) -> Option<String> {
        match self.code {
            Some(0) => None,
            Some(3) => Some(format!(
                "entries of the archive were refused: {}",
                self.lines
                    .iter()
                    .filter(|l| l.starts_with("refused:"))
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("; ")
            )),
            _ => Some(
                self.lines
                    .iter()
                    .rev()
                    .find(|l| l.starts_with("error:"))
                    .cloned()
                    .unwrap_or_else(|| format!("runnel store-io ended with {:?}", self.code)),
            ),
        }
    }
}

impl Steps<'_> {
    /// Runs one of the store's steps: its result, and how it ended the job
    /// if it did.
    pub(super) async fn run_store_step(
        &self,
        container: &mut dyn JobContainer,
        index: u32,
        step: &Step,
    ) -> (StepResult, Option<End>) {
        self.job.emit(EventKind::StepStarted {
            index,
            name: step.name.clone(),
        });
        let started = Instant::now();
        let mut result = self.result(index, step);
        let step_limit = step.timeout.map(|t| (started + t, t));
        // A timeout or a cancel drops the work: its `runnel store-io` is
        // killed, its upload left uncommitted (no manifest).
        let outcome = tokio::select! {
            outcome = self.store_step(&*container, index, step) => outcome,
            why = self.limits.interrupted(step_limit) => {
                let end = why.end(&format!("step {:?}", step.name));
                self.job.system_line(index, &format!("runnel: {}", end.message));
                result.duration = started.elapsed();
                result.state = end.state;
                return (result, Some(end));
            }
        };
        result.duration = started.elapsed();
        match outcome {
            Ok(()) => {
                result.state = JobState::Succeeded;
                result.exit_code = 0;
                (result, None)
            }
            Err(Failed::Warning(why)) => {
                self.job.system_line(index, &format!("runnel: warning: {why}"));
                result.state = JobState::Succeeded;
                result.exit_code = 0;
                result.note = why;
                (result, None)
            }
            Err(Failed::Storage(why)) => {
                let message = format!("step {:?}: {why}", step.name);
                self.job.system_line(index, &format!("runnel: {message}"));
                result.note = format!("STORAGE: {why}");
                (result, Some(End::failed(FailureKind::Storage, message)))
            }
        }
    }

    async fn store_step(&self, container: &dyn JobContainer, index: u32, step: &Step) -> Result<(), Failed> {
        let warn = matches!(
            step.kind,
            StepKind::SaveCache { .. } | StepKind::RestoreCache { .. }
        );
        let fail = |why: String| {
            if warn {
                Failed::Warning(why)
            } else {
                Failed::Storage(why)
            }
        };
        let store = self
            .store
            .store
            .as_ref()
            .map_err(|e| fail(format!("the store cannot be used: {e}")))?;
        let pid = container
            .init_pid()
            .ok_or_else(|| fail("the container's init is not known: files cannot be moved".into()))?;
        let io = Io {
            steps: self,
            store,
            pid,
            index,
            cwd: step.cwd(oci::WORKSPACE).unwrap_or_else(|| self.cwd.clone()),
        };
        match &step.kind {
            StepKind::SaveCache { key, paths } => {
                io.save_cache(step, key, paths).await.map_err(Failed::Warning)
            }
            StepKind::RestoreCache { keys } => io.restore_cache(step, keys).await.map_err(Failed::Warning),
            StepKind::PersistToWorkspace { root, paths } => {
                io.persist(root, paths).await.map_err(Failed::Storage)
            }
            StepKind::AttachWorkspace { at } => io.attach(at).await.map_err(Failed::Storage),
            StepKind::StoreArtifacts { path, destination } => {
                // CircleCI's default: the path's base name.
                let base = Path::new(path)
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned());
                let destination = match destination.as_str() {
                    "" => base.unwrap_or_default(),
                    d => d.to_string(),
                };
                io.store_files(path, &destination, false)
                    .await
                    .map_err(Failed::Storage)
            }
            StepKind::StoreTestResults { path } => io
                .store_files(path, "test-results", true)
                .await
                .map_err(Failed::Storage),
            StepKind::Run(_) => Ok(()),
        }
    }
}

/// One store step's work.
struct Io<'a, 'b> {
    steps: &'a Steps<'b>,
    store: &'a Store,
    pid: i32,
    index: u32,
    cwd: String,
}

impl Io<'_, '_> {
    fn line(&self, text: &str) {
        self.steps.job.system_line(self.index, &format!("runnel: {text}"));
    }

    fn cx(&self) -> &StoreCx {
        &self.steps.store
    }

    /// `runnel store-io ... ARGS` in the container, as the step's user;
    /// its stderr read as it comes (a chatty one never blocks).
    fn helper(&self, args: &[&str], stdin: Stdio) -> Result<Helper, String> {
        let exe = std::env::current_exe().map_err(|e| format!("cannot find the runnel binary: {e}"))?;
        let user = &self.steps.user;
        let mut child = Command::new(exe)
            .arg("store-io")
            .args(["--pid", &self.pid.to_string()])
            .args(["--uid", &user.uid.to_string(), "--gid", &user.gid.to_string()])
            // `--x=VALUE`: a value the step chose may begin with "-".
            .arg(format!("--cwd={}", self.cwd))
            .arg(format!("--home={}", user.home))
            .args(args)
            .env_clear()
            .stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start runnel store-io: {e}"))?;
        let err = child.stderr.take();
        let stderr = tokio::spawn(async move {
            let mut kept = Vec::new();
            if let Some(mut err) = err {
                let _ = (&mut err).take(1 << 20).read_to_end(&mut kept).await;
                let _ = tokio::io::copy(&mut err, &mut tokio::io::sink()).await;
            }
            String::from_utf8_lossy(&kept).into_owned()
        });
        Ok(Helper { child, stderr })
    }

    /// Waits for a helper, its stderr lines put in the log (warnings
    /// and refusals), the first [`MAX_HELPER_LINES`].
    async fn finish(&self, helper: Helper) -> HelperEnd {
        let Helper { mut child, stderr } = helper;
        drop(child.stdin.take());
        let code = child.wait().await.ok().and_then(|s| s.code());
        let text = stderr.await.unwrap_or_default();
        let lines: Vec<String> = text.lines().map(str::to_string).collect();
        for l in lines
            .iter()
            .filter(|l| !l.starts_with("packed:") && !l.starts_with("unpacked:"))
            .take(MAX_HELPER_LINES)
        {
            self.line(l);
        }
        HelperEnd { code, lines }
    }

    /// Runs `work` with a progress line every interval after the first.
    async fn with_progress<T>(&self, what: &str, progress: &Progress, work: impl Future<Output = T>) -> T {
        let started = Instant::now();
        tokio::select! {
            r = work => r,
            never = report_progress(
                self.steps.job,
                self.index,
                self.cx().progress_interval,
                || Some(progress.get()).filter(|b| *b > 0),
                |b: &u64| format!(
                    "runnel: {what}: {} ({}, {:.0} s)",
                    megabytes(*b),
                    rate(*b, started),
                    started.elapsed().as_secs_f64()
                ),
            ) => match never {},
        }
    }

    /// The template context: the step's environment, the checkout, and
    /// the checksums of the files the templates name, read in the
    /// container.
    async fn template_cx(
        &self,
        step: &Step,
        templates: &[(String, &String)],
    ) -> Result<key::Context, String> {
        let mut files = Vec::new();
        for (field, t) in templates {
            files.extend(key::checksum_files(field, t)?);
        }
        let mut checksums = BTreeMap::new();
        if !files.is_empty() {
            let mut args = vec!["checksum", "--"];
            args.extend(files.iter().map(String::as_str));
            let mut child = self.helper(&args, Stdio::null())?;
            let mut out = String::new();
            if let Some(mut o) = child.child.stdout.take() {
                let _ = (&mut o).take(1 << 20).read_to_string(&mut out).await;
            }
            let end = self.finish(child).await;
            if let Some(e) = end.error() {
                return Err(format!("cannot take checksums: {e}"));
            }
            for (f, sum) in files.iter().zip(out.lines()) {
                if sum != "-" {
                    checksums.insert(f.clone(), sum.to_string());
                }
            }
        }
        let mut env = self.steps.env.clone();
        env.extend(step.env.clone());
        Ok(key::Context {
            branch: self.cx().branch.clone(),
            revision: self.cx().revision.clone(),
            env,
            epoch: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs(),
            checksums,
            secrets: self.cx().secrets.clone(),
        })
    }

    /// Packs `paths` under `base` in the container and uploads the
    /// stream to `stem`; committed (its manifest written) only when the
    /// pack succeeded. Returns whether any path existed (a save that
    /// lost a race for its cache key counts: the other job's cache is kept).
    async fn pack_and_upload(
        &self,
        what: &str,
        base: &str,
        paths: &[String],
        stem: &str,
        once: Once,
    ) -> Result<bool, String> {
        let base = format!("--base={base}");
        let mut args = vec!["pack", &base, "--zstd", "--"];
        args.extend(paths.iter().map(String::as_str));
        let mut child = self.helper(&args, Stdio::null())?;
        let stdout = child.child.stdout.take().ok_or("runnel store-io has no stdout")?;
        let progress = Progress::default();
        let started = Instant::now();
        let project = &self.cx().project;
        let uploaded = self
            .with_progress(
                what,
                &progress,
                self.store.upload(project, stem, stdout, &progress),
            )
            .await;
        let end = self.finish(child).await;
        if let Some(e) = end.error() {
            return Err(format!("{what}: cannot pack the files: {e}"));
        }
        let uploaded = uploaded.map_err(|e| e.to_string())?;
        if end.count("packed:") == Some(0) {
            return Ok(false);
        }
        let size = uploaded.size;
        let job_id = &self.cx().job_id;
        let committed = match once {
            Once::No => self.store.commit(project, stem, job_id, uploaded).await.map(Some),
            Once::Yes => self.store.commit_once(project, stem, job_id, uploaded).await,
        }
        .map_err(|e| e.to_string())?;
        if committed.is_none() {
            self.line(&format!(
                "{what}: another job saved this key meanwhile; its cache is kept and this one \
                 was discarded (cache keys are immutable)"
            ));
            return Ok(true);
        }
        self.line(&format!(
            "{what}: {} in {:.1} s ({})",
            megabytes(size),
            started.elapsed().as_secs_f64(),
            rate(size, started)
        ));
        Ok(true)
    }

    /// Streams `object` into `runnel store-io unpack` into `into` in the
    /// container, each range checked against the manifest before the
    /// helper sees a byte of it. A range that differs ends the helper there.
    async fn download_and_unpack(
        &self,
        what: &str,
        object: &str,
        m: &crate::store::Manifest,
        into: &str,
    ) -> Result<(), String> {
        if let Some(disk) = self.steps.resources.disk_bytes.filter(|d| m.size > *d) {
            return Err(format!(
                "{what}: {object} is {} bytes, more than the job's disk of {disk} \
                 (container.resources.disk_bytes): not downloaded",
                m.size
            ));
        }
        let mut helper = self.helper(&["unpack", &format!("--into={into}")], Stdio::piped())?;
        let stdin = helper.child.stdin.take().ok_or("runnel store-io has no stdin")?;
        let progress = Progress::default();
        let started = Instant::now();
        let downloaded = self
            .with_progress(
                what,
                &progress,
                self.store.download_verified(object, m, stdin, &progress),
            )
            .await;
        if let Err(e) = downloaded {
            // Killed before it reads past what was checked.
            let _ = helper.child.start_kill();
            let _ = self.finish(helper).await;
            return Err(e.to_string());
        }
        let end = self.finish(helper).await;
        if let Some(e) = end.error() {
            return Err(format!("{what}: {object}: {e}"));
        }
        self.line(&format!(
            "{what}: {} files from {} in {:.1} s ({})",
            end.count("unpacked:").unwrap_or(0),
            megabytes(m.size),
            started.elapsed().as_secs_f64(),
            rate(m.size, started)
        ));
        Ok(())
    }

    async fn save_cache(&self, step: &Step, template: &str, paths: &[String]) -> Result<(), String> {
        let field = format!("{}.save_cache.key", step.name);
        let cx = self
            .template_cx(step, &[(field.clone(), &template.to_string())])
            .await?;
        let key = key::render(&field, template, &cx)?;
        let project = &self.cx().project;
        let exists = self
            .store
            .cache_manifest(project, &key)
            .await
            .map_err(|e| e.to_string())?;
        if exists.is_some() {
            self.line(&format!("cache {key} exists, skipped (cache keys are immutable)"));
            return Ok(());
        }
        self.line(&format!("saving cache {key}"));
        let stem = Store::cache_stem(&key);
        // Saved by absolute name, restored where it was.
        let home = &self.steps.user.home;
        let paths: Vec<String> = paths
            .iter()
            .map(|p| archive::resolve(p, &self.cwd, home).display().to_string())
            .collect();
        if self
            .pack_and_upload(&format!("saving cache {key}"), "/", &paths, &stem, Once::Yes)
            .await?
        {
            Ok(())
        } else {
            Err(format!("cache {key}: none of its paths exist; nothing saved"))
        }
    }

    async fn restore_cache(&self, step: &Step, templates: &[String]) -> Result<(), String> {
        let fields: Vec<(String, &String)> = templates
            .iter()
            .enumerate()
            .map(|(i, t)| (format!("{}.restore_cache.keys[{i}]", step.name), t))
            .collect();
        let cx = self.template_cx(step, &fields).await?;
        let project = &self.cx().project;
        let mut tried = Vec::new();
        for (field, template) in &fields {
            let key = match key::render(field, template, &cx) {
                Ok(k) => k,
                Err(e) => {
                    self.line(&format!("warning: {e}"));
                    continue;
                }
            };
            let Some((found, m)) = self
                .store
                .find_cache(project, &key)
                .await
                .map_err(|e| e.to_string())?
            else {
                tried.push(key);
                continue;
            };
            let what = format!("restoring cache {found}");
            self.line(&format!("{what} (key {key})"));
            return self
                .download_and_unpack(
                    &what,
                    &self
                        .store
                        .cache_object(project, &found, &m)
                        .map_err(|e| e.to_string())?,
                    &m,
                    "/",
                )
                .await;
        }
        self.line(&format!("no cache found for keys {}", tried.join(", ")));
        Ok(())
    }

    async fn persist(&self, root: &str, paths: &[String]) -> Result<(), String> {
        let cx = self.cx();
        let stem = Store::workspace_stem(&cx.workflow, &cx.job_id, self.index);
        let what = format!("persisting to workspace {}", cx.workflow);
        if self.pack_and_upload(&what, root, paths, &stem, Once::No).await? {
            Ok(())
        } else {
            Err(format!(
                "{what}: none of its paths exist under {root} ({}/{stem})",
                self.store.name()
            ))
        }
    }

    async fn attach(&self, at: &str) -> Result<(), String> {
        let cx = self.cx();
        let layers = self
            .store
            .workspace_layers(&cx.project, &cx.workflow)
            .await
            .map_err(|e| e.to_string())?;
        if layers.is_empty() {
            return Err(format!(
                "workflow {} has no workspace in {}: no job of it has run persist_to_workspace",
                cx.workflow,
                self.store.name()
            ));
        }
        let n = layers.len();
        for (i, (object, m)) in layers.iter().enumerate() {
            let what = format!(
                "attaching workspace {} layer {}/{n} (job {})",
                cx.workflow,
                i + 1,
                m.job_id
            );
            self.download_and_unpack(&what, object, m, at).await?;
        }
        Ok(())
    }

    /// The files under `path` in the container, each kept as an
    /// artifact under `destination`; with `junit`, each `*.xml` also read
    /// as JUnit results into the job's status.
    async fn store_files(&self, path: &str, destination: &str, junit: bool) -> Result<(), String> {
        let mut child = self.helper(&["pack", &format!("--base={path}"), "--", "."], Stdio::null())?;
        let stdout = child.child.stdout.take().ok_or("runnel store-io has no stdout")?;
        let progress = Arc::new(Progress::default());
        let what = if junit {
            "storing test results"
        } else {
            "storing artifacts"
        };
        let task = {
            let (store, progress) = (self.store.clone(), progress.clone());
            let (project, job_id) = (self.cx().project.clone(), self.cx().job_id.clone());
            let destination = destination.trim_matches('/').to_string();
            let handle = tokio::runtime::Handle::current();
            // Read blocking, on the blocking thread that uploads.
            let reader = stdout
                .into_owned_fd()
                .and_then(|fd| {
                    let flags = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_GETFL)?;
                    let mut flags = nix::fcntl::OFlag::from_bits_retain(flags);
                    flags.remove(nix::fcntl::OFlag::O_NONBLOCK);
                    nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFL(flags))?;
                    Ok(std::fs::File::from(fd))
                })
                .map_err(|e| format!("cannot read runnel store-io's output: {e}"))?;
            tokio::task::spawn_blocking(move || {
                upload_entries(
                    reader,
                    &handle,
                    &store,
                    &project,
                    &job_id,
                    &destination,
                    junit,
                    &progress,
                )
            })
        };
        let uploaded = self
            .with_progress(what, &progress, task)
            .await
            .map_err(|e| format!("{what}: the task failed: {e}"))?;
        let end = self.finish(child).await;
        if let Some(e) = end.error() {
            return Err(format!("{what}: cannot read {path}: {e}"));
        }
        let (files, results) = uploaded?;
        self.line(&format!(
            "{what}: {files} files, {} to {}",
            megabytes(progress.get()),
            self.store.name()
        ));
        if let Some(r) = results {
            self.line(&format!(
                "test results: {} tests, {} failures, {} errors, {} skipped in {} files",
                r.tests, r.failures, r.errors, r.skipped, r.files
            ));
            for u in &r.unreadable {
                self.line(&format!("warning: unreadable test results: {u}"));
            }
            self.steps.job.add_test_results(r);
        }
        Ok(())
    }
}

/// Reads the tar stream of a `pack` and uploads each regular file under
/// `artifacts/JOB/DESTINATION/`; with `junit`, reads the `*.xml` ones.
/// Runs on a blocking thread.
#[allow(clippy::too_many_arguments)]
fn upload_entries(
    reader: impl std::io::Read,
    handle: &tokio::runtime::Handle,
    store: &Store,
    project: &str,
    job_id: &str,
    destination: &str,
    junit: bool,
    progress: &Progress,
) -> Result<(u64, Option<TestResults>), String> {
    let mut ar = tar::Archive::new(reader);
    let mut files = 0;
    let mut results = junit.then(TestResults::default);
    for entry in ar.entries().map_err(|e| format!("cannot read the files: {e}"))? {
        let mut entry = entry.map_err(|e| format!("cannot read the files: {e}"))?;
        if !matches!(
            entry.header().entry_type(),
            tar::EntryType::Regular | tar::EntryType::Continuous
        ) {
            continue;
        }
        let name = entry
            .path()
            .map_err(|e| format!("cannot read the files: {e}"))?
            .to_string_lossy()
            .trim_start_matches("./")
            .to_string();
        let rel = if destination.is_empty() {
            name.clone()
        } else {
            format!("{destination}/{name}")
        };
        if let Err(e) = key::check("artifact", &rel) {
            return Err(format!("{e}: not stored"));
        }
        let xml = results.is_some()
            && name.ends_with(".xml")
            && entry.header().size().unwrap_or(0) <= MAX_JUNIT_BYTES;
        let stored = if xml {
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut entry, &mut bytes)
                .map_err(|e| format!("cannot read {name}: {e}"))?;
            if let Some(r) = results.as_mut() {
                r.merge(crate::store::junit::parse(&name, &bytes));
            }
            handle.block_on(store.put_artifact(project, job_id, &rel, &bytes[..], progress))
        } else {
            handle.block_on(store.put_artifact(project, job_id, &rel, Blocking(&mut entry), progress))
        };
        stored.map_err(|e| e.to_string())?;
        files += 1;
    }
    Ok((files, results))
}

/// A blocking reader as an `AsyncRead`, for a blocking thread's
/// `block_on`.
struct Blocking<R>(R);

impl<R: std::io::Read + Unpin> tokio::io::AsyncRead for Blocking<R> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let n = self.0.read(buf.initialize_unfilled());
        std::task::Poll::Ready(n.map(|n| buf.advance(n)))
    }
}
