//! One job, from QUEUED to its end, as named phases: make the job's disk
//! (`disk.rs`) → prepare the keys → check out → prepare the image → start
//! the container → run the steps (`steps.rs`) → tear down. Every resource a phase acquires goes into one
//! [`Held`] (`held.rs`), whose fields are in teardown order, so every way a
//! job ends (success, failure, timeout, cancel, panic) lets go of them in
//! the same order.

mod disk;
mod held;
mod network;
mod services;
mod steps;
mod store;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use futures::FutureExt;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::{Job, RUN_DIR, Registry};
use crate::checkout::{self, Auth, Checkout, TransferProgress};
use crate::logs::Masker;
use crate::model::{EventKind, FailureKind, JobSpec, JobState, KeyKind, Resources, Secret};
use crate::runtime::ContainerRuntime;
use crate::runtime::image::{PullProgress, PullState};
use crate::runtime::rootfs::Rootfs;
use crate::runtime::spec::USERNS_SIZE;
use crate::runtime::spec::{self as oci, ContainerConfig};
use crate::runtime::user::{self, User};
use crate::ssh::{self, ExtraKey, KnownHosts, SshDir};
use crate::sys::userns::chown_tree;
pub(super) use held::remove_run_dir;
use held::{BUNDLE, Held, ROOT, SSH};
use steps::Steps;

/// How a job ended.
#[derive(Debug)]
struct End {
    state: JobState,
    failure: FailureKind,
    message: String,
    /// A step ended with exit status 130, as a process does on SIGINT.
    sigint: bool,
}

impl End {
    /// The outcome once the job is torn down. A step that ended on SIGINT
    /// in a job that has been cancelled by then was cancelled: under
    /// systemd, `systemctl kill -s INT runnel` (the "stop now" signal)
    /// reaches every process of the service, the jobs' own included
    /// (they sit in its delegated cgroup), and the agent cancels its jobs
    /// on it. The step may end first; the teardown gives the agent's own
    /// handler the time to cancel.
    fn settle(self, cancelled: bool) -> End {
        if !(self.sigint && cancelled && self.failure == FailureKind::Step) {
            return self;
        }
        End {
            state: JobState::Cancelled,
            failure: FailureKind::Cancelled,
            message: format!("cancelled: {} (SIGINT)", self.message),
            sigint: true,
        }
    }

    fn ok() -> End {
        End {
            state: JobState::Succeeded,
            failure: FailureKind::None,
            message: String::new(),
            sigint: false,
        }
    }

    fn failed(failure: FailureKind, message: impl Into<String>) -> End {
        End {
            state: JobState::Failed,
            failure,
            message: message.into(),
            sigint: false,
        }
    }
}

/// Why a phase was cut short.
#[derive(Debug, Clone, Copy)]
enum Interrupt {
    Cancelled,
    JobTimeout(Duration),
    StepTimeout(Duration),
    /// A step printed nothing for this long.
    NoOutput(Duration),
}

impl Interrupt {
    fn end(self, during: &str) -> End {
        match self {
            Interrupt::Cancelled => End {
                state: JobState::Cancelled,
                failure: FailureKind::Cancelled,
                message: format!("cancelled during {during}"),
                sigint: false,
            },
            Interrupt::JobTimeout(t) => End {
                state: JobState::TimedOut,
                failure: FailureKind::Timeout,
                message: format!(
                    "the job exceeded its timeout of {} during {during}",
                    humantime::format_duration(t)
                ),
                sigint: false,
            },
            Interrupt::StepTimeout(t) => End {
                state: JobState::TimedOut,
                failure: FailureKind::Timeout,
                message: format!(
                    "{during} exceeded its timeout of {}",
                    humantime::format_duration(t)
                ),
                sigint: false,
            },
            Interrupt::NoOutput(t) => End {
                state: JobState::Failed,
                failure: FailureKind::NoOutput,
                message: format!(
                    "{during} printed nothing for {} (its no_output_timeout) and was ended",
                    humantime::format_duration(t)
                ),
                sigint: false,
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

/// Runs the job in slot `slot` (of `max_jobs`) to its end.
pub(super) async fn run(registry: &Arc<Registry>, job: &Arc<Job>, spec: JobSpec, slot: u32) {
    let span = tracing::info_span!("job", job_id = %job.id);
    async {
        let started = Instant::now();
        job.limit_log(registry.config().log_max_bytes);
        let end = std::panic::AssertUnwindSafe(phases(registry, job, &spec, slot))
            .catch_unwind()
            .await
            .unwrap_or_else(|_| {
                End::failed(
                    FailureKind::Agent,
                    "runnel itself failed while running this job (a bug); see the agent's log",
                )
            });
        job.flush_log();
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

async fn phases(registry: &Registry, job: &Arc<Job>, spec: &JobSpec, slot: u32) -> End {
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
    // Keys: parsed and checked before anything touches the disk or the
    // network; from here on the log masks them.
    let keys = match prepare_keys(spec) {
        Ok(p) => p,
        Err(message) => {
            let _ = job.masker.set(Arc::new(Masker::new(&secrets_of(spec, &[]))));
            return End::failed(FailureKind::BadSpec, message);
        }
    };
    let masker = Arc::new(Masker::new(&secrets_of(spec, &keys.mask)));
    let _ = job.masker.set(masker.clone());

    let mode = super::dir_mode(config.runtime.userns_base.is_some());
    let mut held = match Held::create(job.dir.join(RUN_DIR), mode) {
        Ok(h) => h,
        Err(e) => {
            return End::failed(
                FailureKind::Agent,
                format!("cannot create the job's run directory: {e}"),
            );
        }
    };
    let phase = Phases {
        registry,
        job,
        spec,
        limits: &limits,
        userns_base: userns_base(config.runtime.userns_base, slot),
        slot,
    };
    let end = match phase.all(&keys, masker, &mut held).await {
        Ok(end) | Err(end) => end,
    };
    held.teardown(config.runtime.grace_period).await;
    end.settle(job.cancel.is_cancelled())
}

/// Runs `$phase` and logs, at debug level, how long it took: the start
/// path's profile (`RUNNEL_LOG=info,runnel::job::lifecycle=debug`; the
/// benchmarks read it).
macro_rules! timed {
    ($phase:literal, $work:expr) => {{
        let started = Instant::now();
        let result = $work;
        tracing::debug!(
            phase = $phase,
            ms = started.elapsed().as_secs_f64() * 1e3,
            "phase took"
        );
        result
    }};
}
use timed;

/// The phases of one job, each adding what it acquires to the job's
/// [`Held`]; an `Err` ends the job there.
struct Phases<'a> {
    registry: &'a Registry,
    job: &'a Arc<Job>,
    spec: &'a JobSpec,
    limits: &'a Limits,
    /// The host uid/gid of the container's root: the job's own range of
    /// ids (its slot's), when it runs in a user namespace.
    userns_base: Option<u32>,
    /// The job's slot: its address on a private network.
    slot: u32,
}

impl Phases<'_> {
    async fn all(&self, keys: &PreparedKeys, masker: Arc<Masker>, held: &mut Held) -> Result<End, End> {
        timed!("make_disk", self.make_disk(held).await)?;
        timed!("install_keys", self.install_keys(keys, held).await)?;
        // The image first: its user owns the files the checkout writes.
        let image = timed!("prepare_image", self.prepare_image(held).await)?;
        let commit = timed!(
            "check_out",
            self.check_out(keys, self.owner(&image.user), held).await
        )?;
        timed!("give_workspace", self.give_workspace(&image.user, held).await)?;
        let files = timed!(
            "prepare_network",
            self.prepare_network(held.run_dir().to_path_buf()).await
        )?;
        let (resources, cgroup) = timed!(
            "start_container",
            self.start_container(&image.user, files, held).await
        )?;
        timed!("join_network", self.join_network(held).await)?;
        timed!("start_services", self.start_services(held).await)?;
        self.job.transition(|s| s.state = JobState::Running);
        let steps = Steps {
            job: self.job,
            env: base_env(self.spec, &self.job.id, &image.env, &image.user),
            cwd: image.workdir.unwrap_or_else(|| oci::WORKSPACE.to_string()),
            user: image.user,
            masker,
            limits: self.limits,
            grace: self.registry.config().runtime.grace_period,
            no_output_timeout: self
                .spec
                .no_output_timeout
                .unwrap_or(self.registry.config().runtime.no_output_timeout),
            cgroup,
            resources,
            disk: held.disk.as_ref().map(|d| d.limit()),
            runtime: &self.registry.runtime,
            store: store::StoreCx::new(self.registry, self.spec, commit),
        };
        let container = held.container.as_deref_mut().expect("started above");
        Ok(steps.run_all(container, &self.spec.steps).await)
    }

    /// The job's `.ssh` (keys, known_hosts, config), written off the async
    /// threads; the log names each key by fingerprint.
    async fn install_keys(&self, keys: &PreparedKeys, held: &mut Held) -> Result<(), End> {
        if keys.keys.is_empty() && keys.extra.is_empty() && keys.known_hosts.is_empty() {
            return Ok(());
        }
        let path = held.run_dir().join(SSH);
        let (k, e, kh) = (keys.keys.clone(), keys.extra.clone(), keys.known_hosts.clone());
        let written = blocking(move || SshDir::write(&path, &k, &e, &kh)).await;
        held.ssh_dir = Some(written.map_err(|e| {
            End::failed(
                FailureKind::Agent,
                format!("cannot write the job's ssh directory: {e}"),
            )
        })?);
        for k in &keys.keys {
            self.job.system_line(
                0,
                &format!("runnel: {} {} {}", k.kind.label(), k.algorithm, k.fingerprint),
            );
        }
        for e in &keys.extra {
            let host = e.host.as_deref().unwrap_or("every host");
            self.job.system_line(
                0,
                &format!(
                    "runnel: extra key for {host} {} {} (~/.ssh/{})",
                    e.key.algorithm,
                    e.key.fingerprint,
                    ssh::dir::extra_key_file(&e.key)
                ),
            );
        }
        Ok(())
    }

    /// The repository and its submodules, into the workspace (libgit2, off
    /// the async threads, cancellable).
    async fn check_out(
        &self,
        keys: &PreparedKeys,
        owner: Option<checkout::Owner>,
        held: &mut Held,
    ) -> Result<Option<String>, End> {
        let Some(co) = &self.spec.checkout else {
            return Ok(None);
        };
        let (job, registry) = (self.job, self.registry);
        let auth = Auth::new(keys.keys.clone(), keys.known_hosts.clone());
        let progress = auth.progress();
        job.system_line(0, &format!("runnel: checking out {}", co.repo_url));
        let cancel = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let task = tokio::task::spawn_blocking({
            let (co, workspace, cancel) = (co.clone(), held.workspace(), cancel.clone());
            let mirrors = registry.mirrors.clone();
            move || checkout::checkout(&co, &workspace, &auth, &cancel, mirrors.as_ref(), owner)
        });
        tokio::pin!(task);
        let result = tokio::select! {
            r = &mut task => r,
            never = self.report_fetch(&progress, started) => match never {},
            why = self.limits.interrupted(None) => {
                cancel.store(true, Ordering::Relaxed);
                if let Ok(Ok(c)) = task.await {
                    held.borrowed = c.mirrors;
                }
                return Err(why.end("the checkout"));
            }
        };
        registry.metrics.checkout_ended(started.elapsed());
        let Checkout { done, mirrors } = match result {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                let full = held.disk.as_ref().and_then(|d| d.limit().filled(&e.message));
                let message = match full {
                    Some(limit) => format!("{}; {limit} is full", e.message),
                    None => e.message,
                };
                return Err(End::failed(e.kind, message));
            }
            Err(e) => {
                return Err(End::failed(
                    FailureKind::Agent,
                    format!("the checkout task failed: {e}"),
                ));
            }
        };
        tracing::info!(
            seconds = started.elapsed().as_secs_f64(),
            cached = !mirrors.is_empty(),
            "checked out"
        );
        held.borrowed = mirrors;
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
        let commit = done.commit.clone();
        job.emit(EventKind::Checkout(done));
        Ok(Some(commit))
    }

    /// The image's layers (or the host's root) under a fresh writable
    /// layer: the container's root filesystem, fresh every time.
    async fn prepare_image(&self, held: &mut Held) -> Result<PreparedImage, End> {
        let config = self.registry.config();
        let image = if self.spec.container.image.is_empty() {
            config.runtime.image.clone()
        } else {
            self.spec.container.image.clone()
        };
        let mut root = ImageRoot::default();
        let prepared = self.image_root(&image, held.disk().join(ROOT), &mut root).await;
        held.image_layers = root.layers;
        held.rootfs = root.rootfs;
        prepared
    }

    /// Image `image`'s root filesystem in `dir`, into `root` (so that what
    /// was made is let go of even when a later part fails).
    async fn image_root(
        &self,
        image: &str,
        dir: PathBuf,
        root: &mut ImageRoot,
    ) -> Result<PreparedImage, End> {
        let image = image.to_string();
        let failed = |e: String| End::failed(FailureKind::Image, e);
        if image == "host" {
            return self.host_image(dir, root).await;
        }
        // Layers keep their owners and are idmapped into the job's ids;
        // where that cannot be, each slot has its own shifted copy.
        let idmap = self.registry.idmap_layers;
        let shift = self.userns_base.filter(|_| !idmap).unwrap_or(0);
        let progress = PullProgress::default();
        let started = Instant::now();
        let get = self.registry.images.get_reporting(&image, shift, &progress);
        let pulled = tokio::select! {
            p = async { timed!("image_lookup", get.await) } => p.map_err(|e| failed(format!("image {image:?}: {e}")))?,
            never = self.report_pull(&image, &progress, started) => match never {},
            why = self.limits.interrupted(None) => return Err(why.end("the image pull")),
        };
        let state = progress.state();
        let how = if state.fetched == 0 {
            "cached".to_string()
        } else {
            format!(
                "pulled {} of {} layers, {} in {:.1}s",
                state.fetched,
                state.layers,
                megabytes(state.fetched_bytes),
                started.elapsed().as_secs_f64()
            )
        };
        self.job
            .system_line(0, &format!("runnel: image {image} is {} ({how})", pulled.digest));
        root.layers = Some(pulled.holds.clone());
        if pulled.layers.is_empty() {
            return Err(failed(format!("image {image:?} has no layers")));
        }
        let lower: Vec<PathBuf> = pulled.layers.iter().rev().cloned().collect();
        let base = self.userns_base;
        let image_user = pulled.config.user.clone().unwrap_or_default();
        let workdir = pulled.config.workdir();
        let made = workdir.clone();
        let (rootfs, user) = timed!(
            "rootfs",
            blocking(move || {
                let lower: Vec<&Path> = lower.iter().map(PathBuf::as_path).collect();
                let rootfs = match base {
                    Some(base) if idmap => Rootfs::overlay_idmapped(&dir, &lower, base),
                    _ => Rootfs::overlay(&dir, &lower, base.map(|b| (b, b))),
                }
                .map_err(|e| format!("cannot prepare the root filesystem: {e}"))?;
                if let Some(w) = &made {
                    rootfs
                        .make_dir(w, base.map(|b| (b, b)))
                        .map_err(|e| format!("cannot make its WorkingDir {w}: {e}"))?;
                }
                let user = user::resolve(rootfs.path(), &image_user);
                Ok::<_, String>((rootfs, user))
            })
            .await
        )
        .map_err(|e| failed(format!("image {image:?}: {e}")))?;
        root.rootfs = Some(rootfs);
        let user = user.map_err(|e| failed(format!("image {image:?}: {e}")))?;
        tracing::info!(image, digest = %pulled.digest, layers = pulled.layers.len(), "image ready");
        let c = &pulled.config;
        Ok(PreparedImage {
            user,
            env: c.env.clone().unwrap_or_default(),
            workdir,
            command: c
                .entrypoint
                .iter()
                .chain(c.cmd.iter())
                .flatten()
                .cloned()
                .collect(),
        })
    }

    /// Says every `progress_interval` how far the image's pull has come;
    /// runs until dropped.
    async fn report_pull(
        &self,
        image: &str,
        progress: &PullProgress,
        started: Instant,
    ) -> std::convert::Infallible {
        self.report_progress(
            || Some(progress.state()).filter(|s| s.fetched > 0),
            |state: &PullState| {
                format!(
                    "runnel: pulling {image}: {}/{} layers ready, {} fetched ({}){}",
                    state.done,
                    state.layers,
                    megabytes(state.fetched_bytes),
                    rate(state.fetched_bytes, started),
                    if state.unpacking { ", unpacking" } else { "" }
                )
            },
        )
        .await
    }

    /// Says every `progress_interval` how far the checkout's fetch has
    /// come (libgit2's transfer progress); runs until dropped.
    async fn report_fetch(&self, progress: &TransferProgress, started: Instant) -> std::convert::Infallible {
        self.report_progress(
            || Some(progress.get()).filter(|(_, total, _)| *total > 0),
            |&(objects, total, bytes): &(usize, usize, u64)| {
                format!(
                    "runnel: fetching: {objects}/{total} objects, {} ({})",
                    megabytes(bytes),
                    rate(bytes, started)
                )
            },
        )
        .await
    }

    /// Every `progress_interval`, a line saying what `state` reads, when
    /// it reads something (quiet while it says `None`) that has moved
    /// since the last line. Runs until dropped.
    async fn report_progress<T: PartialEq>(
        &self,
        state: impl Fn() -> Option<T>,
        line: impl Fn(&T) -> String,
    ) -> std::convert::Infallible {
        let every = self.registry.config().progress_interval;
        report_progress(self.job, 0, every, state, line).await
    }

    /// The `host` image: the host's software, not its data (see
    /// `runtime::hostroot`), as root.
    async fn host_image(&self, dir: PathBuf, root: &mut ImageRoot) -> Result<PreparedImage, End> {
        let private = self.registry.config().private_paths.clone();
        let base = self.userns_base;
        let started = Instant::now();
        let rootfs = blocking(move || Rootfs::host(&dir, &private, base))
            .await
            .map_err(|e| {
                End::failed(
                    FailureKind::Image,
                    format!("cannot prepare the host image's root: {e}"),
                )
            })?;
        root.rootfs = Some(rootfs);
        tracing::info!(seconds = started.elapsed().as_secs_f64(), "host image ready");
        Ok(PreparedImage {
            user: User::root(),
            env: Vec::new(),
            workdir: None,
            command: Vec::new(),
        })
    }

    /// Who owns the files of the checkout: the step user, as the host and
    /// the container see them; `None` when that is host root.
    fn owner(&self, user: &User) -> Option<checkout::Owner> {
        let shift = self.userns_base.unwrap_or(0);
        let host = (user.uid + shift, user.gid + shift);
        (host.0 != 0).then_some(checkout::Owner {
            host,
            inside: (user.uid, user.gid),
        })
    }

    /// The step user owns the workspace and its keys, as the host sees it.
    /// A warm checkout's cached layers are idmapped to them (no file is
    /// copied up) and its writable layer changes owner; a written checkout
    /// is theirs already (its writer gave each file away as it made it);
    /// only where idmapped mounts fail does the whole workspace change owner.
    async fn give_workspace(&self, user: &User, held: &Held) -> Result<(), End> {
        let Some(checkout::Owner { host: (uid, gid), .. }) = self.owner(user) else {
            return Ok(());
        };
        let written = self.spec.checkout.is_some();
        let workspace = held.workspace();
        let ssh = held.ssh_dir.as_ref().map(|d| d.path().to_path_buf());
        let layers = held
            .borrowed
            .iter()
            .map(|m| m.layer_dirs().to_vec())
            .find(|l| !l.is_empty());
        let span = tracing::Span::current();
        blocking(move || {
            let given = match layers {
                None => written,
                Some(layers) => match checkout::give_warm_workspace(&workspace, &layers, uid, gid)? {
                    Ok(()) => true,
                    Err(e) => {
                        let _in = span.enter();
                        tracing::warn!(
                            error = %e,
                            "idmapped mounts failed: giving the workspace away file by file, which \
                             copies every file of the cached work tree up"
                        );
                        false
                    }
                },
            };
            if !given {
                chown_tree(&workspace, uid, gid)?;
            }
            match ssh {
                Some(d) => chown_tree(&d, uid, gid),
                None => Ok(()),
            }
        })
        .await
        .map_err(|e| {
            End::failed(
                FailureKind::Agent,
                format!("cannot give the workspace to uid {uid}: {e}"),
            )
        })
    }

    /// The job's limits: its own, else the agent's defaults.
    fn resources(&self) -> Resources {
        let r = &self.spec.container.resources;
        let d = &self.registry.config().runtime;
        Resources {
            memory_bytes: r.memory_bytes.or(d.memory_bytes),
            max_pids: r.max_pids.or(d.max_pids),
            cpu_millis: r.cpu_millis.or(d.cpu_millis),
            disk_bytes: r.disk_bytes.or(d.disk_bytes),
        }
    }

    /// The container, its init running; its limits and cgroup.
    async fn start_container(
        &self,
        user: &User,
        files: Vec<(PathBuf, String)>,
        held: &mut Held,
    ) -> Result<(Resources, String), End> {
        let (registry, job) = (self.registry, self.job);
        let config = registry.config();
        let container_config = ContainerConfig {
            hostname: job.id.chars().take(63).collect(),
            rootfs: held.rootfs.as_ref().expect("prepared").path().to_path_buf(),
            workspace: held.workspace(),
            ssh_dir: held.ssh_dir.as_ref().map(|d| d.path().to_path_buf()),
            home: user.home.clone(),
            init: registry.runtime.init_path().to_path_buf(),
            network: self.network(),
            resources: self.resources(),
            cgroup_path: registry.runtime.cgroup_path(&job.id),
            userns_base: self.userns_base,
            readonly_mounts: held
                .borrowed
                .iter()
                .map(|m| (m.objects.clone(), m.container_objects.clone()))
                .chain(files)
                .collect(),
            masked: config.private_paths.clone(),
        };
        let oci_spec = oci::container_spec(&container_config);
        let bundle = held.run_dir().join(BUNDLE);
        let runtime: &dyn ContainerRuntime = &registry.runtime;
        let start = runtime.start(&job.id, &bundle, &oci_spec);
        tokio::pin!(start);
        let started = tokio::select! {
            c = &mut start => c,
            why = self.limits.interrupted(None) => {
                // A start cut short would leave its container's init running
                // with no one to stop it: let it finish (it takes
                // milliseconds); teardown removes the container.
                if let Ok(c) = start.await {
                    held.container = Some(c);
                }
                return Err(why.end("the container start"));
            }
        };
        let container = started.map_err(|e| {
            End::failed(
                FailureKind::Agent,
                format!("cannot start the job's container ({}): {e}", runtime.name()),
            )
        })?;
        held.container = Some(container);
        Ok((container_config.resources, container_config.cgroup_path))
    }
}

/// "12.3 MB".
fn megabytes(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

/// Every `every`, a line of step `index` saying what `state` reads, when
/// it reads something (quiet while it says `None`) that has moved since
/// the last line. Runs until dropped.
async fn report_progress<T: PartialEq>(
    job: &Job,
    index: u32,
    every: Duration,
    state: impl Fn() -> Option<T>,
    line: impl Fn(&T) -> String,
) -> std::convert::Infallible {
    let mut last = None;
    loop {
        tokio::time::sleep(every).await;
        let Some(now) = state() else { continue };
        if last.as_ref() != Some(&now) {
            job.system_line(index, &line(&now));
            last = Some(now);
        }
    }
}

/// "4.5 MB/s": `bytes` over the time since `started`.
fn rate(bytes: u64, started: Instant) -> String {
    let per_second = bytes as f64 / started.elapsed().as_secs_f64().max(1e-3);
    format!("{}/s", megabytes(per_second as u64))
}

/// The host id of the container's root for the job in `slot`: slot i of
/// `max_jobs` gets ids `base + i * 65536`.., so that two jobs at once never
/// share one.
fn userns_base(base: Option<u32>, slot: u32) -> Option<u32> {
    base.map(|b| b + slot * USERNS_SIZE)
}

/// Runs blocking work (the disk, mounts) off the async threads.
async fn blocking<T, E>(work: impl FnOnce() -> Result<T, E> + Send + 'static) -> Result<T, String>
where
    T: Send + 'static,
    E: std::fmt::Display + Send + 'static,
{
    match tokio::task::spawn_blocking(work).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(e) => Err(format!("the task failed: {e}")),
    }
}

/// The job's keys and pinned hosts, checked; the values to mask.
struct PreparedKeys {
    keys: Vec<ssh::Key>,
    /// The steps' own keys.
    extra: Vec<ExtraKey>,
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
    let mut extra = Vec::new();
    for (i, k) in spec.ssh.extra_keys.iter().enumerate() {
        let field = format!("ssh.extra_keys[{i}].private_key");
        mask.extend(ssh::keys::mask_values(&k.private, None));
        let key = ssh::keys::parse(KeyKind::None, &field, &k.private, spec.ssh.passphrase.as_ref())
            .map_err(|e| e.to_string())?;
        mask.extend(ssh::keys::mask_values(&k.private, Some(&key)));
        extra.push(ExtraKey {
            key,
            host: k.host.clone(),
        });
    }
    if let Some(p) = &spec.ssh.passphrase {
        mask.push(p.clone());
    }
    Ok(PreparedKeys {
        keys,
        extra,
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

/// Who runs the steps, the image's environment, and where steps start
/// when not in the workspace.
struct PreparedImage {
    user: User,
    env: Vec<String>,
    workdir: Option<String>,
    /// The image's Entrypoint and Cmd.
    command: Vec<String>,
}

/// What making an image's root acquires.
#[derive(Default)]
struct ImageRoot {
    layers: Option<Arc<Vec<crate::runtime::image::LayerHold>>>,
    rootfs: Option<Rootfs>,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_ended_by_sigint_in_a_cancelled_job_is_a_cancel() {
        let step = |code: i32| {
            let mut end = End::failed(
                FailureKind::Step,
                format!("step \"s\" failed: exit status {code}"),
            );
            end.sigint = code == 130;
            end
        };
        // systemctl kill -s INT: the step got the signal too; the agent cancelled.
        let end = step(130).settle(true);
        assert_eq!(
            (end.state, end.failure),
            (JobState::Cancelled, FailureKind::Cancelled)
        );
        assert_eq!(
            end.message,
            "cancelled: step \"s\" failed: exit status 130 (SIGINT)"
        );
        // Not cancelled: the step's own 130 stands.
        assert_eq!(step(130).settle(false).failure, FailureKind::Step);
        // Cancelled after another failure: that failure stands.
        assert_eq!(step(1).settle(true).failure, FailureKind::Step);
        assert_eq!(
            End::failed(FailureKind::Checkout, "x").settle(true).failure,
            FailureKind::Checkout
        );
    }
}
