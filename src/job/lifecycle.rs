//! One job, from QUEUED to its end: prepare keys → check out → start the
//! container → run the steps → clean up. Cleanup is owned: the run
//! directory, the job's ssh directory, the container root and the container
//! are guards that remove themselves however the job ends (success,
//! failure, timeout, cancel, panic).

use std::collections::BTreeMap;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use futures::FutureExt;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::spec::{JobSpec, Network, Step};
use super::state::{FailureKind, JobState, StepResult};
use super::{Job, RUN_DIR, Registry};
use crate::checkout::{self, Auth, Checkout, MirrorUse};
use crate::logs::output::{CHUNK_CAP, Chunker, pump};
use crate::logs::{EventKind, Masker, Stream as Out};
use crate::runtime::Container;
use crate::runtime::cgroup::{self, LimitsHit};
use crate::runtime::image::LayerHold;
use crate::runtime::rootfs::{self, Rootfs};
use crate::runtime::spec::{self as oci, ContainerConfig, WORKSPACE};
use crate::runtime::user::{self, User};
use crate::secret::Secret;
use crate::ssh::{self, KeyKind, KnownHosts, SshDir};

/// How a job ended.
#[derive(Debug)]
struct End {
    state: JobState,
    failure: FailureKind,
    message: String,
}

impl End {
    fn ok() -> End {
        End {
            state: JobState::Succeeded,
            failure: FailureKind::None,
            message: String::new(),
        }
    }

    fn failed(failure: FailureKind, message: impl Into<String>) -> End {
        End {
            state: JobState::Failed,
            failure,
            message: message.into(),
        }
    }
}

/// Why a phase was cut short.
#[derive(Debug, Clone, Copy)]
enum Interrupt {
    Cancelled,
    JobTimeout(Duration),
    StepTimeout(Duration),
}

impl Interrupt {
    fn end(self, during: &str) -> End {
        match self {
            Interrupt::Cancelled => End {
                state: JobState::Cancelled,
                failure: FailureKind::Cancelled,
                message: format!("cancelled during {during}"),
            },
            Interrupt::JobTimeout(t) => End {
                state: JobState::TimedOut,
                failure: FailureKind::Timeout,
                message: format!(
                    "the job exceeded its timeout of {} during {during}",
                    humantime::format_duration(t)
                ),
            },
            Interrupt::StepTimeout(t) => End {
                state: JobState::TimedOut,
                failure: FailureKind::Timeout,
                message: format!(
                    "{during} exceeded its timeout of {}",
                    humantime::format_duration(t)
                ),
            },
        }
    }
}

/// The deadlines a job runs under.
struct Limits {
    cancel: CancellationToken,
    job_deadline: Instant,
    job_timeout: Duration,
}

impl Limits {
    /// Resolves when the job is cancelled or a deadline passes.
    async fn interrupted(&self, step: Option<(Instant, Duration)>) -> Interrupt {
        let (deadline, why) = match step {
            Some((d, t)) if d < self.job_deadline => (d, Interrupt::StepTimeout(t)),
            _ => (self.job_deadline, Interrupt::JobTimeout(self.job_timeout)),
        };
        tokio::select! {
            _ = self.cancel.cancelled() => Interrupt::Cancelled,
            _ = tokio::time::sleep_until(deadline) => why,
        }
    }
}

pub(super) async fn run(registry: &Arc<Registry>, job: &Arc<Job>, spec: JobSpec) {
    let span = tracing::info_span!("job", job_id = %job.id);
    async {
        let started = Instant::now();
        let end = std::panic::AssertUnwindSafe(phases(registry, job, &spec))
            .catch_unwind()
            .await
            .unwrap_or_else(|_| {
                End::failed(
                    FailureKind::Agent,
                    "runnel itself failed while running this job (a bug); see the agent's log",
                )
            });
        tracing::info!(
            state = end.state.name(),
            failure = end.failure.name(),
            seconds = started.elapsed().as_secs_f64(),
            "job ended"
        );
        job.transition(|s| {
            s.state = end.state;
            s.failure = end.failure;
            s.message = end.message;
            s.finished = Some(SystemTime::now());
        });
        job.log.close();
    }
    .instrument(span)
    .await
}

/// The run directory: removed, with its keys wiped and its mounts
/// unmounted, on drop.
struct RunDir(PathBuf);

impl RunDir {
    fn create(path: PathBuf, mode: u32) -> std::io::Result<RunDir> {
        std::fs::DirBuilder::new().mode(mode).create(&path)?;
        let dir = RunDir(path);
        for sub in ["workspace", "bundle"] {
            std::fs::DirBuilder::new().mode(0o700).create(dir.0.join(sub))?;
        }
        Ok(dir)
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        remove_run_dir(&self.0);
    }
}

/// Wipes the keys under a run directory, unmounts anything under it and
/// removes it. Also used at agent start for jobs an earlier run left.
pub(super) fn remove_run_dir(path: &Path) {
    if let Err(e) = ssh::dir::wipe_dir(&path.join("ssh")) {
        tracing::error!(path = %path.display(), error = %e, "cannot wipe a job's keys");
    }
    if let Err(e) = rootfs::unmount_and_remove(path, path) {
        tracing::error!(path = %path.display(), error = %e, "cannot remove a job's run directory");
    }
}

async fn phases(registry: &Registry, job: &Arc<Job>, spec: &JobSpec) -> End {
    let config = registry.config();
    let job_timeout = spec.timeout.unwrap_or(config.runtime.job_timeout);
    let limits = Limits {
        cancel: job.cancel.clone(),
        job_deadline: Instant::now() + job_timeout,
        job_timeout,
    };
    job.transition(|s| {
        s.state = JobState::Preparing;
        s.started = Some(SystemTime::now());
    });

    // Keys: parsed and checked before anything touches the network.
    let prepared = match prepare_keys(spec) {
        Ok(p) => p,
        Err(message) => {
            let _ = job.masker.set(Arc::new(Masker::new(&secrets_of(spec, &[]))));
            return End::failed(FailureKind::BadSpec, message);
        }
    };
    let masker = Arc::new(Masker::new(&secrets_of(spec, &prepared.mask)));
    let _ = job.masker.set(masker.clone());

    let userns = config.runtime.userns_base;
    let run_dir = match RunDir::create(job.dir.join(RUN_DIR), super::dir_mode(userns.is_some())) {
        Ok(d) => d,
        Err(e) => {
            return End::failed(
                FailureKind::Agent,
                format!("cannot create the job's run directory: {e}"),
            );
        }
    };
    let workspace = run_dir.0.join("workspace");
    let ssh_dir = if prepared.keys.is_empty() && prepared.known_hosts.is_empty() {
        None
    } else {
        match SshDir::write(&run_dir.0.join("ssh"), &prepared.keys, &prepared.known_hosts) {
            Ok(d) => Some(d),
            Err(e) => {
                return End::failed(
                    FailureKind::Agent,
                    format!("cannot write the job's ssh directory: {e}"),
                );
            }
        }
    };
    for k in &prepared.keys {
        job.system_line(
            0,
            &format!("runnel: {} {} {}", k.kind.label(), k.algorithm, k.fingerprint),
        );
    }

    // Mirrors the workspace borrows objects from: locked until the job ends.
    let mut borrowed: Vec<MirrorUse> = Vec::new();
    if let Some(co) = &spec.checkout {
        let auth = Auth::new(prepared.keys.clone(), prepared.known_hosts.clone());
        job.system_line(0, &format!("runnel: checking out {}", co.repo_url));
        let cancel = Arc::new(AtomicBool::new(false));
        let checkout_started = Instant::now();
        let task = tokio::task::spawn_blocking({
            let (co, workspace, cancel) = (co.clone(), workspace.clone(), cancel.clone());
            let mirrors = registry.mirrors.clone();
            move || checkout::checkout(&co, &workspace, &auth, &cancel, mirrors.as_ref())
        });
        tokio::pin!(task);
        let result = tokio::select! {
            r = &mut task => r,
            why = limits.interrupted(None) => {
                cancel.store(true, Ordering::Relaxed);
                let _ = task.await;
                return why.end("the checkout");
            }
        };
        registry.metrics.checkout_ended(checkout_started.elapsed());
        match result {
            Ok(Ok(Checkout { done, mirrors })) => {
                tracing::info!(
                    seconds = checkout_started.elapsed().as_secs_f64(),
                    cached = !mirrors.is_empty(),
                    "checked out"
                );
                borrowed = mirrors;
                let key = match done.key {
                    KeyKind::None => String::new(),
                    k => format!(" with the {} {}", k.label(), done.key_fingerprint),
                };
                job.system_line(0, &format!("runnel: checked out {}{key}", done.commit));
                for sm in &done.submodules {
                    job.system_line(
                        0,
                        &format!(
                            "runnel: submodule {} at {} ({})",
                            sm.path,
                            sm.commit,
                            sm.key.label()
                        ),
                    );
                }
                job.emit(EventKind::Checkout(done));
            }
            Ok(Err(e)) => return End::failed(e.kind, e.message),
            Err(e) => return End::failed(FailureKind::Agent, format!("the checkout task failed: {e}")),
        }
    }

    // The container: a fresh writable layer over the image, fresh every time.
    let image = tokio::select! {
        i = prepare_image(registry, spec, &run_dir.0) => i,
        why = limits.interrupted(None) => return why.end("the image pull"),
    };
    // The layers' hold first: dropped last, after the overlay over them.
    let PreparedImage {
        layers: image_layers,
        rootfs,
        user,
        env: image_env,
    } = match image {
        Ok(i) => i,
        Err(end) => return end,
    };
    // The step user owns the workspace and its keys, as the host sees it.
    let shift = config.runtime.userns_base.unwrap_or(0);
    let (host_uid, host_gid) = (user.uid + shift, user.gid + shift);
    if host_uid != 0 {
        let owned = user::chown_tree(&workspace, host_uid, host_gid).and_then(|_| match &ssh_dir {
            Some(d) => user::chown_tree(d.path(), host_uid, host_gid),
            None => Ok(()),
        });
        if let Err(e) = owned {
            return End::failed(
                FailureKind::Agent,
                format!("cannot give the workspace to uid {host_uid}: {e}"),
            );
        }
    }
    let r = &spec.container.resources;
    let d = &config.runtime;
    let container_config = ContainerConfig {
        hostname: job.id.chars().take(63).collect(),
        rootfs: rootfs.path().to_path_buf(),
        workspace: workspace.clone(),
        ssh_dir: ssh_dir.as_ref().map(|d| d.path().to_path_buf()),
        home: user.home.clone(),
        init: registry.runtime.init_path().to_path_buf(),
        network: match spec.container.network {
            Network::Default => d.network,
            n => n,
        },
        resources: super::spec::Resources {
            memory_bytes: r.memory_bytes.or(d.memory_bytes),
            max_pids: r.max_pids.or(d.max_pids),
            cpu_millis: r.cpu_millis.or(d.cpu_millis),
        },
        cgroup_path: registry.runtime.cgroup_path(&job.id),
        userns_base: config.runtime.userns_base,
        readonly_mounts: borrowed
            .iter()
            .map(|m| (m.objects.clone(), m.container_objects.clone()))
            .collect(),
        masked: config.private_paths.clone(),
    };
    let oci_spec = oci::container_spec(&container_config);
    let bundle = run_dir.0.join("bundle");
    let start = registry.runtime.start(&job.id, &bundle, &oci_spec);
    tokio::pin!(start);
    let container = tokio::select! {
        c = &mut start => c,
        why = limits.interrupted(None) => {
            // A start cut short would leave its container's init running
            // with no one to stop it: let it finish (it takes milliseconds),
            // then remove the container.
            if let Ok(c) = start.await {
                c.remove(config.runtime.grace_period).await;
            }
            return why.end("the container start");
        }
    };
    let mut container = match container {
        Ok(c) => c,
        Err(e) => {
            return End::failed(
                FailureKind::Agent,
                format!(
                    "cannot start the job's container ({}): {e}",
                    registry.runtime.name()
                ),
            );
        }
    };

    job.transition(|s| s.state = JobState::Running);
    let steps = Steps {
        job,
        env: base_env(spec, &job.id, &image_env, &user),
        user,
        masker,
        limits: &limits,
        grace: config.runtime.grace_period,
        cgroup: container_config.cgroup_path.clone(),
        resources: container_config.resources,
    };
    let end = steps.run_all(&mut container, &spec.steps).await;
    container.remove(config.runtime.grace_period).await;
    drop(rootfs);
    drop(image_layers);
    drop(ssh_dir);
    drop(run_dir);
    drop(borrowed);
    end
}

/// The job's keys and pinned hosts, checked; the values to mask.
struct PreparedKeys {
    keys: Vec<ssh::Key>,
    known_hosts: KnownHosts,
    mask: Vec<Secret>,
}

fn prepare_keys(spec: &JobSpec) -> Result<PreparedKeys, String> {
    let known_hosts = KnownHosts::parse(&spec.ssh.known_hosts).map_err(|e| e.to_string())?;
    let mut keys = Vec::new();
    let mut mask = Vec::new();
    for (kind, field, bytes) in [
        (KeyKind::User, "ssh.user_key", &spec.ssh.user_key),
        (KeyKind::Deploy, "ssh.deploy_key", &spec.ssh.deploy_key),
    ] {
        let Some(bytes) = bytes else { continue };
        mask.extend(ssh::keys::mask_values(bytes, None));
        let key =
            ssh::keys::parse(kind, field, bytes, spec.ssh.passphrase.as_ref()).map_err(|e| e.to_string())?;
        mask.extend(ssh::keys::mask_values(bytes, Some(&key)));
        keys.push(key);
    }
    if let Some(p) = &spec.ssh.passphrase {
        mask.push(p.clone());
    }
    Ok(PreparedKeys {
        keys,
        known_hosts,
        mask,
    })
}

fn secrets_of(spec: &JobSpec, extra: &[Secret]) -> Vec<Secret> {
    spec.secrets
        .iter()
        .map(|s| s.value.clone())
        .chain(extra.iter().cloned())
        .collect()
}

/// A job's container: its root filesystem, who runs in it, the image's env.
struct PreparedImage {
    rootfs: Rootfs,
    user: User,
    env: Vec<String>,
    /// Keeps the image's layers in the cache while the job runs.
    layers: Option<Arc<Vec<LayerHold>>>,
}

/// The image's layers (or the host's root) under a fresh writable layer.
async fn prepare_image(registry: &Registry, spec: &JobSpec, run_dir: &Path) -> Result<PreparedImage, End> {
    let config = registry.config();
    let image = if spec.container.image.is_empty() {
        config.runtime.image.as_str()
    } else {
        spec.container.image.as_str()
    };
    let failed = |e: String| End::failed(FailureKind::Image, e);
    if image == "host" && config.runtime.userns_base.is_some() {
        return Err(failed(
            "the \"host\" image cannot run in a user namespace (runtime.userns = true): its files \
             belong to the host's users; name an image"
                .into(),
        ));
    }
    if image == "host" {
        let rootfs = Rootfs::overlay(run_dir, &[Path::new("/")], None)
            .map_err(|e| failed(format!("cannot prepare the root filesystem: {e}")))?;
        return Ok(PreparedImage {
            rootfs,
            user: User::root(),
            env: Vec::new(),
            layers: None,
        });
    }
    let pulled = registry
        .images
        .get(image)
        .await
        .map_err(|e| failed(format!("image {image:?}: {e}")))?;
    if pulled.layers.is_empty() {
        return Err(failed(format!("image {image:?} has no layers")));
    }
    let lower: Vec<&Path> = pulled.layers.iter().rev().map(PathBuf::as_path).collect();
    let root_owner = config.runtime.userns_base.map(|b| (b, b));
    let rootfs = Rootfs::overlay(run_dir, &lower, root_owner).map_err(|e| {
        failed(format!(
            "image {image:?}: cannot prepare the root filesystem: {e}"
        ))
    })?;
    let user = user::resolve(rootfs.path(), pulled.config.user.as_deref().unwrap_or(""))
        .map_err(|e| failed(format!("image {image:?}: {e}")))?;
    tracing::info!(image, digest = %pulled.digest, layers = pulled.layers.len(), "image ready");
    Ok(PreparedImage {
        rootfs,
        user,
        env: pulled.config.env.unwrap_or_default(),
        layers: Some(pulled.holds),
    })
}

fn base_env(spec: &JobSpec, job_id: &str, image_env: &[String], user: &User) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    env.insert("PATH".into(), oci::DEFAULT_PATH.into());
    for kv in image_env {
        if let Some((k, v)) = kv.split_once('=') {
            env.insert(k.to_string(), v.to_string());
        }
    }
    env.insert("HOME".into(), user.home.clone());
    env.insert("CI".into(), "true".into());
    env.insert("RUNNEL".into(), "true".into());
    env.insert("RUNNEL_JOB_ID".into(), job_id.into());
    env.extend(spec.env.clone());
    for s in &spec.secrets {
        env.insert(
            s.name.clone(),
            String::from_utf8_lossy(s.value.expose()).into_owned(),
        );
    }
    env
}

/// What every step of a job shares.
struct Steps<'a> {
    job: &'a Arc<Job>,
    env: BTreeMap<String, String>,
    user: User,
    masker: Arc<Masker>,
    limits: &'a Limits,
    grace: Duration,
    /// The container's cgroup and limits, to explain a kill.
    cgroup: String,
    resources: super::spec::Resources,
}

impl Steps<'_> {
    /// Runs the steps in order; the first that fails ends the job.
    async fn run_all(&self, container: &mut Container, steps: &[Step]) -> End {
        for (i, step) in steps.iter().enumerate() {
            let index = i as u32;
            let span = tracing::info_span!("step", step = %step.name, index);
            let (result, end) = self.run(container, index, step).instrument(span).await;
            self.job.step_finished(result);
            if let Some(end) = end {
                return end;
            }
        }
        End::ok()
    }

    /// Why the container's processes were killed, if a limit did it.
    fn limit_hit(&self, before: LimitsHit) -> Option<String> {
        let now = cgroup::limits_hit(&self.cgroup);
        if now.oom_kills > before.oom_kills {
            let limit = self
                .resources
                .memory_bytes
                .map(|m| format!(" of {} MiB", m >> 20))
                .unwrap_or_default();
            return Some(format!(
                "ran out of memory: the kernel killed it at the container's limit{limit} \
                 (container.resources.memory_bytes)"
            ));
        }
        if now.pids_max > before.pids_max {
            let limit = self
                .resources
                .max_pids
                .map(|p| format!(" of {p}"))
                .unwrap_or_default();
            return Some(format!(
                "hit the container's process limit{limit} (container.resources.max_pids): \
                 it could not start more processes"
            ));
        }
        None
    }

    async fn run(&self, container: &mut Container, index: u32, step: &Step) -> (StepResult, Option<End>) {
        let job = self.job;
        job.emit(EventKind::StepStarted {
            index,
            name: step.name.clone(),
        });
        let started = Instant::now();
        let before = cgroup::limits_hit(&self.cgroup);
        let mut result = StepResult {
            index,
            name: step.name.clone(),
            state: JobState::Failed,
            exit_code: -1,
            signal: 0,
            duration: Duration::ZERO,
        };
        let what = format!("step {:?}", step.name);
        let fail = |mut result: StepResult, message: String| {
            result.duration = started.elapsed();
            (result, Some(End::failed(FailureKind::Agent, message)))
        };

        let mut env = self.env.clone();
        env.extend(step.env.clone());
        env.insert("RUNNEL_STEP".into(), step.name.clone());
        let args = vec!["/bin/sh".into(), "-c".into(), step.run.clone()];
        let process = oci::process(args, &env, WORKSPACE, &self.user);
        let pipes = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .and_then(|o| nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map(|e| (o, e)));
        let ((out_r, out_w), (err_r, err_w)) = match pipes {
            Ok(p) => p,
            Err(e) => return fail(result, format!("cannot create pipes for {what}: {e}")),
        };
        let (mut child, _process_file) = match container.exec(&process, out_w, err_w) {
            Ok(c) => c,
            Err(e) => return fail(result, format!("cannot start {what}: {e}")),
        };
        let exited = CancellationToken::new();
        let pump_to_log = |pipe, stream: Out| {
            let job = job.clone();
            let chunker = Chunker::new(self.masker.clone(), CHUNK_CAP);
            pump(pipe, chunker, exited.clone(), move |data: Vec<u8>| {
                job.emit(EventKind::Log {
                    step: index,
                    stream,
                    data,
                })
            })
        };
        let work = async {
            let wait = async {
                let status = child.wait().await;
                exited.cancel();
                status
            };
            let (status, _, _) = tokio::join!(
                wait,
                pump_to_log(out_r, Out::Stdout),
                pump_to_log(err_r, Out::Stderr)
            );
            status
        };
        tokio::pin!(work);
        let step_limit = step.timeout.map(|t| (started + t, t));
        let interrupt = tokio::select! {
            status = &mut work => {
                result.duration = started.elapsed();
                return match status {
                    Ok(s) if s.success() => {
                        result.state = JobState::Succeeded;
                        result.exit_code = 0;
                        (result, None)
                    }
                    Ok(s) => {
                        let code = s.code().unwrap_or(-1);
                        result.exit_code = code;
                        let message = match self.limit_hit(before) {
                            Some(why) => format!("{what} {why}; exit status {code}"),
                            None => format!("{what} failed: exit status {code}"),
                        };
                        (result, Some(End::failed(FailureKind::Step, message)))
                    }
                    Err(e) => fail(result, format!("cannot wait for {what}: {e}")),
                };
            }
            why = self.limits.interrupted(step_limit) => why,
        };
        let mut end = interrupt.end(&what);
        if let Some(why) = self.limit_hit(before) {
            end.message.push_str(&format!("; it {why}"));
        }
        job.system_line(index, &format!("runnel: {}; stopping the container", end.message));
        container.stop(self.grace).await;
        let status = tokio::time::timeout(Duration::from_secs(10), work).await;
        result.duration = started.elapsed();
        result.state = end.state;
        result.exit_code = -1;
        result.signal = match status {
            Ok(Ok(s)) => s
                .code()
                .filter(|c| *c > 128)
                .map(|c| c - 128)
                .unwrap_or(libc::SIGKILL),
            _ => libc::SIGKILL,
        };
        (result, Some(end))
    }
}
