//! Jobs: the model ([`spec`], [`state`]), the registry of jobs with its
//! slots and metrics, the lifecycle that takes one job from QUEUED to its
//! end ([`lifecycle`]) — the only place that calls across the other
//! modules — and the retention of ended jobs ([`retention`]).

pub mod file;
mod lifecycle;
mod retention;

use std::collections::HashMap;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::SystemTime;

use futures::Stream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::logs::{EventLog, Masker};
use crate::metrics::{Gauges, Metrics};
use crate::model::{Event, EventKind, FailureKind, JobSpec, JobState, JobStatus, Stream as Out};
use crate::runtime::Runtime;

const STATUS_FILE: &str = "status.json";
const EVENTS_FILE: &str = "events.log";
/// The per-run part of a job directory: keys, workspace, container root.
/// Removed when the job ends; status and events stay.
const RUN_DIR: &str = "run";

/// Why a job could not be accepted.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("every job slot is busy ({0} jobs running)")]
    Busy(u32),
    #[error("the agent is draining and takes no new jobs")]
    Draining,
    #[error("cannot set up the job: {0}")]
    Internal(String),
    /// The job names (or defaults to) the `host` image, which this agent's
    /// config does not allow.
    #[error(
        "container.image: this agent does not run the \"host\" image (runtime.allow_host_image = false \
         in its config){0}; name an image in container.image"
    )]
    HostImageNotAllowed(&'static str),
    /// The job asks for the host's network, which this agent's config does
    /// not allow.
    #[error(
        "container.network: this agent does not let jobs share the host's network \
         (runtime.allow_host_network = false in its config); use the private network (the \
         default) or none"
    )]
    HostNetworkNotAllowed,
    /// Services need the job's own network namespace.
    #[error(
        "container.services: services run in the job's own network namespace, and this job shares the \
         host's (container.network, or the agent's runtime.network); use the private network or none"
    )]
    ServicesOnHostNetwork,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot use state directory {path}: {source}")]
    StateDir { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Runtime(#[from] crate::runtime::RuntimeError),
    #[error("cannot isolate libgit2 from the agent's home: {0}")]
    Git(#[from] git2::Error),
    #[error(
        "runtime.disk_bytes = {bytes}: cannot make the jobs' disks here: {source}. A disk limit needs \
         mkfs.ext4 (Debian's e2fsprogs) and loop devices; runtime.disk_bytes = 0 turns it off"
    )]
    Disk { bytes: u64, source: io::Error },
    #[error("cannot set up the network for jobs with a private network: {0}")]
    Network(#[from] crate::runtime::network::NetworkError),
}

/// A job the agent knows: running, or ended and kept for its logs.
#[derive(Debug)]
pub struct Job {
    pub id: String,
    dir: PathBuf,
    status: Mutex<JobStatus>,
    log: EventLog,
    masker: OnceLock<Arc<Masker>>,
    /// The log's budget, when `[logs] max_bytes` limits it.
    budget: OnceLock<Mutex<crate::logs::budget::Budget>>,
    cancel: CancellationToken,
    metrics: Arc<Metrics>,
}

impl Job {
    fn new(dir: &Path, id: &str, status: JobStatus, log: EventLog, metrics: &Arc<Metrics>) -> Job {
        Job {
            id: id.to_string(),
            dir: dir.to_path_buf(),
            status: Mutex::new(status),
            log,
            masker: OnceLock::new(),
            budget: OnceLock::new(),
            cancel: CancellationToken::new(),
            metrics: metrics.clone(),
        }
    }

    /// The job's status, complete up to the last event.
    pub fn status(&self) -> JobStatus {
        let mut s = self.status.lock().unwrap_or_else(|e| e.into_inner()).clone();
        s.last_seq = self.log.tip().seq;
        s
    }

    pub fn watch(&self, after_seq: u64, follow: bool) -> impl Stream<Item = io::Result<Event>> + use<> {
        self.log.watch(after_seq, follow)
    }

    fn is_final(&self) -> bool {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .state
            .is_final()
    }

    /// Changes the job's status and records the change as an event. The
    /// message is masked, and loses any NUL byte (a runtime's error text
    /// may end in one; clients take messages as C strings too).
    fn transition(&self, change: impl FnOnce(&mut JobStatus)) {
        let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        change(&mut status);
        if let Some(m) = self.masker.get() {
            status.message = String::from_utf8_lossy(&m.mask_all(status.message.as_bytes())).into_owned();
        }
        if status.message.contains('\0') {
            status.message.retain(|c| c != '\0');
        }
        let result = self.log.append_with(|seq| {
            status.last_seq = seq;
            EventKind::State(status.clone())
        });
        if let Err(e) = result {
            tracing::error!(job_id = %self.id, error = %e, "cannot append to the event log");
        }
        if let Err(e) = write_status(&self.dir, &status) {
            tracing::error!(job_id = %self.id, error = %e, "cannot write the job's status file");
        }
    }

    /// Records a finished step: its event, and its result in the status
    /// (which is not a change of state, so no state event).
    fn step_finished(&self, result: crate::model::StepResult) {
        self.metrics.step_ended(result.duration);
        self.emit(EventKind::StepFinished(result.clone()));
        let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        status.steps.push(result);
        if let Err(e) = write_status(&self.dir, &status) {
            tracing::error!(job_id = %self.id, error = %e, "cannot write the job's status file");
        }
    }

    /// Adds what a store_test_results step read to the job's results.
    pub(crate) fn add_test_results(&self, results: crate::model::TestResults) {
        let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        status
            .test_results
            .get_or_insert_with(Default::default)
            .merge(results);
        if let Err(e) = write_status(&self.dir, &status) {
            tracing::error!(job_id = %self.id, error = %e, "cannot write the job's status file");
        }
    }

    fn emit(&self, kind: EventKind) {
        let kind = match (kind, self.budget.get()) {
            // A step's output counts against the log's budget; the agent's
            // own lines do not.
            (EventKind::Log { step, stream, data }, Some(budget)) if stream != Out::System => {
                let admitted = budget
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .admit(step, stream, data);
                match admitted {
                    Some(data) => EventKind::Log { step, stream, data },
                    None => return,
                }
            }
            (kind, _) => kind,
        };
        if let EventKind::Log { stream, data, .. } = &kind {
            self.metrics.log_written(*stream, data.len());
        }
        if let Err(e) = self.log.append(kind) {
            tracing::error!(job_id = %self.id, error = %e, "cannot append to the event log");
        }
    }

    /// Limits the output the job's log keeps to `max` bytes (its first and
    /// last half).
    fn limit_log(&self, max: Option<u64>) {
        if let Some(max) = max {
            let _ = self.budget.set(Mutex::new(crate::logs::budget::Budget::new(max)));
        }
    }

    /// Records what a limited log held back: the marker line, then the
    /// last part of the output.
    fn flush_log(&self) {
        let Some(budget) = self.budget.get() else { return };
        let (marker, tail) = budget.lock().unwrap_or_else(|e| e.into_inner()).finish();
        if let Some(marker) = marker {
            self.system_line(tail.first().map_or(0, |c| c.0), &marker);
        }
        for (step, stream, data) in tail {
            self.metrics.log_written(stream, data.len());
            if let Err(e) = self.log.append(EventKind::Log { step, stream, data }) {
                tracing::error!(job_id = %self.id, error = %e, "cannot append to the event log");
            }
        }
    }

    /// A line of the agent's own about the job, in its log.
    fn system_line(&self, step: u32, text: &str) {
        let mut data = format!("{text}\n").into_bytes();
        if let Some(m) = self.masker.get() {
            data = m.mask_all(&data);
        }
        self.emit(EventKind::Log {
            step,
            stream: Out::System,
            data,
        });
    }
}

fn write_status(dir: &Path, status: &JobStatus) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = dir.join(".status.json.tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(&serde_json::to_vec_pretty(status)?)?;
    drop(f);
    std::fs::rename(&tmp, dir.join(STATUS_FILE))
}

/// Directory mode on the way to a container's files: with user
/// namespaces, the container's root (an unprivileged host uid) must be
/// able to pass through to reach its root filesystem, workspace and keys
/// (each of which is its own, or read-only).
pub(crate) fn dir_mode(userns: bool) -> u32 {
    if userns { 0o711 } else { 0o700 }
}

/// The jobs of this agent, its slots and what runs them.
#[derive(Debug)]
pub struct Registry {
    config: Config,
    runtime: Runtime,
    images: crate::runtime::image::ImageStore,
    /// The checkout cache, unless disabled.
    mirrors: Option<crate::checkout::Mirrors>,
    jobs: Mutex<HashMap<String, Arc<Job>>>,
    /// Held while a job is being accepted (see [`Registry::submit`]).
    submitting: Mutex<()>,
    slots: Arc<Slots>,
    /// Whether image layers can be idmapped into a job's user namespace
    /// (else each slot gets its own copy, with shifted owners).
    idmap_layers: bool,
    /// The bridge private job networks are attached to.
    bridge: Arc<crate::runtime::network::Bridge>,
    tasks: TaskTracker,
    draining: AtomicBool,
    metrics: Arc<Metrics>,
    /// The store of caches, workspaces and artifacts, or why it cannot
    /// be opened (said by each step that needs it).
    store: Result<crate::store::Store, String>,
}

/// What GetAgentInfo reports.
#[derive(Debug, Clone)]
pub struct AgentInfo {
    pub agent_id: String,
    pub version: String,
    pub labels: std::collections::BTreeMap<String, String>,
    pub max_jobs: u32,
    pub running_jobs: u32,
    pub draining: bool,
    pub runtime: String,
}

impl Registry {
    /// Opens the state directory, cleans up after a previous run of the
    /// agent (containers, mounts, keys of jobs that were running: those
    /// jobs end LOST) and loads the jobs it kept.
    pub async fn open(config: Config) -> Result<Arc<Registry>, AgentError> {
        let state_err = |source| AgentError::StateDir {
            path: config.state_dir.clone(),
            source,
        };
        let mode = dir_mode(config.runtime.userns_base.is_some());
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(config.state_dir.join("jobs"))
            .map_err(state_err)?;
        for dir in [config.state_dir.clone(), config.state_dir.join("jobs")] {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode)).map_err(state_err)?;
        }
        crate::checkout::isolate_libgit2(&config.state_dir.join("home"))?;
        let runtime = Runtime::new(&config.runtime.settings, &config.state_dir)?;
        for id in runtime.remove_leftovers().await {
            tracing::warn!(container = %id, "removed a container left by a previous run of the agent");
        }
        for id in runtime.remove_leftover_cgroups() {
            tracing::warn!(cgroup = %id, "removed a cgroup left by a previous run of the agent");
        }
        if let Some(bytes) = config.runtime.disk_bytes {
            crate::sys::loopfs::prepare(bytes).map_err(|source| AgentError::Disk { bytes, source })?;
        }
        let bridge = Arc::new(crate::runtime::network::Bridge::up(
            &config.network,
            &config.state_dir,
            config.max_jobs,
        )?);
        let images =
            crate::runtime::image::ImageStore::new(&config.state_dir, &config.runtime.insecure_registries)
                .map_err(state_err)?;
        let idmap_layers =
            config.runtime.userns_base.is_some() && idmap_works(&config.state_dir.join("images"));
        let mirrors = if config.checkout_cache {
            Some(crate::checkout::Mirrors::new(config.state_dir.join("mirrors")).map_err(state_err)?)
        } else {
            None
        };
        Registry::finish_removals(&config.state_dir);
        let metrics = Arc::new(Metrics::default());
        let jobs = recover_jobs(&config.state_dir.join("jobs"), &metrics).map_err(state_err)?;
        let slots = Arc::new(Slots::new(config.max_jobs));
        let store = crate::store::Store::open(&config.storage.settings).map_err(|e| e.to_string());
        if let Err(e) = &store {
            tracing::warn!(error = %e, "the store cannot be opened: steps that use it will fail");
        }
        Ok(Arc::new(Registry {
            store,
            runtime,
            images,
            mirrors,
            jobs: Mutex::new(jobs),
            submitting: Mutex::new(()),
            slots,
            idmap_layers,
            bridge,
            tasks: TaskTracker::new(),
            draining: AtomicBool::new(false),
            metrics,
            config,
        }))
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Removes the store's caches older than `storage.cache_max_age`, and
    /// its artifacts and workspaces older than `storage.artifact_max_age`.
    pub async fn sweep_store(&self) {
        let Ok(store) = &self.store else { return };
        let s = &self.config.storage;
        match store.sweep(s.cache_max_age, s.artifact_max_age).await {
            Ok(0) => {}
            Ok(removed) => tracing::info!(
                removed,
                store = store.name(),
                "expired caches and artifacts removed"
            ),
            Err(e) => tracing::warn!(error = %e, "the store's retention sweep failed"),
        }
    }

    /// The store of caches, workspaces and artifacts.
    pub fn store(&self) -> Result<&crate::store::Store, &str> {
        self.store.as_ref().map_err(String::as_str)
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The metrics in Prometheus' text format, with the registry's gauges.
    pub fn render_metrics(&self) -> String {
        let info = self.info();
        self.metrics.render(Gauges {
            running_jobs: info.running_jobs,
            slots: info.max_jobs,
            known_jobs: self.jobs.lock().unwrap_or_else(|e| e.into_inner()).len(),
            draining: info.draining,
        })
    }

    /// Accepts a validated job and starts it; a job id already known
    /// returns that job's status and runs nothing.
    pub fn submit(self: &Arc<Self>, spec: JobSpec) -> Result<JobStatus, SubmitError> {
        self.check_spec(&spec)?;
        // Submissions take turns, so that one job id is created once; the
        // job map's lock is not held while the job's files are made, so
        // readers (watchers, listings, metrics) never wait on the disk.
        let _turn = self.submitting.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(job) = self.get(&spec.job_id) {
            return Ok(job.status());
        }
        if self.draining.load(Ordering::SeqCst) {
            return Err(SubmitError::Draining);
        }
        let slot = Slots::take(&self.slots).ok_or(SubmitError::Busy(self.config.max_jobs))?;
        Ok(self.start(spec, slot, 1)?.status())
    }

    /// Sets a slot aside for a job not received yet; `None` when every
    /// slot is busy or the agent drains. The fleet's intake asks its queue
    /// for one job per reservation, so it never takes more than it can run.
    pub fn reserve(&self) -> Option<Reservation> {
        if self.draining.load(Ordering::SeqCst) {
            return None;
        }
        Slots::take(&self.slots).map(Reservation)
    }

    /// Returns when a slot may have been given back since the last call.
    pub async fn slot_freed(&self) {
        self.slots.freed.notified().await;
    }

    /// Starts attempt `attempt` of a job taken from a queue, in the slot
    /// `reservation` holds. A job id this agent knows is run again only
    /// when its record here is of an earlier attempt and has ended (the
    /// agent ran it before and was killed, or the job was LOST at the
    /// agent's restart): that record — status and events of the earlier
    /// run — is replaced by the new run's. Otherwise the known job is
    /// returned and nothing runs, as [`Registry::submit`] does.
    pub fn submit_attempt(
        self: &Arc<Self>,
        spec: JobSpec,
        attempt: u32,
        reservation: Reservation,
    ) -> Result<Accepted, SubmitError> {
        self.check_spec(&spec)?;
        let _turn = self.submitting.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(job) = self.get(&spec.job_id) {
            let status = job.status();
            if !status.state.is_final() || status.attempt >= attempt {
                return Ok(Accepted::Known(job));
            }
            self.forget(&job).map_err(|e| {
                SubmitError::Internal(format!("cannot move the earlier attempt's record aside: {e}"))
            })?;
            tracing::info!(job_id = %job.id, earlier = status.attempt, attempt, "replacing the record of an earlier attempt");
        }
        if self.draining.load(Ordering::SeqCst) {
            return Err(SubmitError::Draining);
        }
        Ok(Accepted::Started(self.start(spec, reservation.0, attempt)?))
    }

    /// Removes an ended job from the registry and its directory from disk.
    fn forget(&self, job: &Job) -> io::Result<()> {
        let removed = self.removed_dir();
        std::fs::create_dir_all(&removed)?;
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let to = removed.join(format!("{}.{nanos}", job.id));
        std::fs::rename(&job.dir, &to)?;
        self.jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&job.id);
        if let Err(e) = std::fs::remove_dir_all(&to) {
            tracing::error!(path = %to.display(), error = %e, "cannot remove an earlier attempt's directory");
        }
        Ok(())
    }

    /// What the agent's config refuses in a valid spec.
    fn check_spec(&self, spec: &JobSpec) -> Result<(), SubmitError> {
        self.check_image(spec)?;
        let network = match spec.container.network {
            crate::model::Network::Default => self.config.runtime.network,
            n => n,
        };
        if spec.container.network == crate::model::Network::Host && !self.config.runtime.allow_host_network {
            return Err(SubmitError::HostNetworkNotAllowed);
        }
        if network == crate::model::Network::Host && !spec.container.services.is_empty() {
            return Err(SubmitError::ServicesOnHostNetwork);
        }
        Ok(())
    }

    /// Makes the job's record and starts its lifecycle in `slot`. Called
    /// with `submitting` held.
    fn start(self: &Arc<Self>, spec: JobSpec, slot: Slot, attempt: u32) -> Result<Arc<Job>, SubmitError> {
        let dir = self.config.state_dir.join("jobs").join(&spec.job_id);
        let mode = dir_mode(self.config.runtime.userns_base.is_some());
        let job = create_job(&dir, &spec.job_id, mode, attempt, &self.metrics).map_err(|e| {
            SubmitError::Internal(format!("cannot create the job directory {}: {e}", dir.display()))
        })?;
        let job = Arc::new(job);
        self.jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(spec.job_id.clone(), job.clone());
        tracing::info!(job_id = %job.id, steps = spec.steps.len(), attempt, "job accepted");
        let registry = self.clone();
        let running = job.clone();
        self.tasks.spawn(async move {
            lifecycle::run(&registry, &running, spec, slot.index).await;
            registry.metrics.job_ended(running.status().state);
            drop(slot);
        });
        Ok(job)
    }

    /// Refuses the `host` image where the config does not allow it.
    fn check_image(&self, spec: &JobSpec) -> Result<(), SubmitError> {
        let runtime = &self.config.runtime;
        if runtime.allow_host_image {
            return Ok(());
        }
        match spec.container.image.as_str() {
            "host" => Err(SubmitError::HostImageNotAllowed("")),
            "" if runtime.image == "host" => Err(SubmitError::HostImageNotAllowed(
                ", and the job names no image while the agent's default (runtime.image) is \"host\"",
            )),
            _ => Ok(()),
        }
    }

    pub fn get(&self, id: &str) -> Option<Arc<Job>> {
        self.jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
    }

    /// Cancels a queued or running job; an ended job is left as it is.
    pub fn cancel(&self, id: &str) -> Option<JobStatus> {
        let job = self.get(id)?;
        if !job.is_final() {
            tracing::info!(job_id = %id, "cancel requested");
            job.cancel.cancel();
        }
        Some(job.status())
    }

    fn all(&self) -> Vec<Arc<Job>> {
        self.jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Every job known, oldest first.
    pub fn list(&self) -> Vec<JobStatus> {
        let jobs = self.all();
        let mut out: Vec<JobStatus> = jobs.iter().map(|j| j.status()).collect();
        out.sort_by(|a, b| a.created.cmp(&b.created).then(a.job_id.cmp(&b.job_id)));
        out
    }

    pub fn info(&self) -> AgentInfo {
        AgentInfo {
            agent_id: self.config.agent_id.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            labels: self.config.labels.clone(),
            max_jobs: self.config.max_jobs,
            running_jobs: self.config.max_jobs - self.slots.free(),
            draining: self.draining.load(Ordering::SeqCst),
            runtime: self.runtime.name().to_string(),
        }
    }

    /// Stops taking jobs.
    pub fn drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Cancels every job still running and waits for all to end.
    pub async fn shutdown(&self) {
        self.drain();
        let jobs = self.all();
        for job in jobs {
            job.cancel.cancel();
        }
        self.tasks.close();
        self.tasks.wait().await;
        // Every container is gone: so goes this agent's (now empty) parent
        // cgroup, rather than one per state directory ever used.
        self.runtime.remove_leftover_cgroups();
        self.bridge.down();
    }

    /// Waits until every job started so far has ended.
    pub async fn wait_idle(&self) {
        self.tasks.close();
        self.tasks.wait().await;
        self.tasks.reopen();
    }
}

/// The job slots: `max_jobs` of them, numbered from 0. A job holds one
/// while it runs; its number picks the job's user namespace ids, so two
/// jobs at once never share ids.
#[derive(Debug)]
struct Slots {
    free: Mutex<std::collections::BTreeSet<u32>>,
    /// Told each time a slot is given back.
    freed: tokio::sync::Notify,
}

/// A slot set aside by [`Registry::reserve`]; given back on drop unless a
/// job takes it.
#[derive(Debug)]
pub struct Reservation(Slot);

/// What [`Registry::submit_attempt`] did.
#[derive(Debug)]
pub enum Accepted {
    /// The job runs, as a new attempt.
    Started(Arc<Job>),
    /// The agent knows this job id (running, or ended at this attempt or
    /// a later one): nothing new runs.
    Known(Arc<Job>),
}

/// A slot taken; given back on drop.
#[derive(Debug)]
struct Slot {
    index: u32,
    slots: Arc<Slots>,
}

impl Slots {
    fn new(count: u32) -> Slots {
        Slots {
            free: Mutex::new((0..count).collect()),
            freed: tokio::sync::Notify::new(),
        }
    }

    /// The lowest free slot.
    fn take(slots: &Arc<Slots>) -> Option<Slot> {
        let index = slots.free.lock().unwrap_or_else(|e| e.into_inner()).pop_first()?;
        Some(Slot {
            index,
            slots: slots.clone(),
        })
    }

    fn free(&self) -> u32 {
        self.free.lock().unwrap_or_else(|e| e.into_inner()).len() as u32
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.slots
            .free
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(self.index);
        self.slots.freed.notify_one();
    }
}

/// Whether `dir`'s file system takes idmapped mounts; says why not, and
/// what runnel does instead, in the agent's log.
fn idmap_works(dir: &Path) -> bool {
    use crate::sys::userns::{IdRange, UserNs};
    use std::os::fd::AsFd;
    let range = [IdRange::from_zero(crate::config::USERNS_BASE, 1)];
    match UserNs::new(&range, &range).and_then(|ns| crate::sys::mount::idmap_supported(dir, ns.as_fd())) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(
                path = %dir.display(),
                error = %e,
                "idmapped mounts are not possible here: image layers are unpacked once per job slot \
                 with shifted owners instead (slower first use, more disk)"
            );
            false
        }
    }
}

fn create_job(dir: &Path, id: &str, mode: u32, attempt: u32, metrics: &Arc<Metrics>) -> io::Result<Job> {
    std::fs::DirBuilder::new().mode(mode).create(dir)?;
    let log = EventLog::create(&dir.join(EVENTS_FILE))?;
    let mut status = JobStatus::new(id.to_string());
    status.attempt = attempt;
    let job = Job::new(dir, id, status, log, metrics);
    job.transition(|_| {});
    Ok(job)
}

/// Loads the jobs under `jobs_dir`. A job that was not over when the agent
/// stopped is cleaned up (keys wiped, mounts and workspace removed) and
/// ends LOST, with that as the last event of its log.
fn recover_jobs(jobs_dir: &Path, metrics: &Arc<Metrics>) -> io::Result<HashMap<String, Arc<Job>>> {
    let mut out = HashMap::new();
    for entry in std::fs::read_dir(jobs_dir)? {
        let entry = entry?;
        let dir = entry.path();
        let id = entry.file_name().to_string_lossy().to_string();
        if crate::model::spec::validate_job_id(&id).is_err() || !dir.is_dir() {
            continue;
        }
        let run = dir.join(RUN_DIR);
        if run.exists() {
            lifecycle::remove_run_dir(&run);
            tracing::warn!(job_id = %id, "removed the keys, mounts and workspace of a job cut short by an agent stop");
        }
        let status: Option<JobStatus> = std::fs::read(dir.join(STATUS_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let events = dir.join(EVENTS_FILE);
        if !events.exists() {
            continue;
        }
        let job = match status {
            Some(s) if s.state.is_final() => Job::new(&dir, &id, s, EventLog::open_closed(&events)?, metrics),
            status => {
                let status = status.unwrap_or_else(|| JobStatus::new(id.clone()));
                let job = Job::new(&dir, &id, status, EventLog::reopen(&events)?, metrics);
                job.transition(|s| {
                    s.state = JobState::Lost;
                    s.failure = FailureKind::Agent;
                    s.message = "the agent stopped while this job ran; its container was removed \
                                 and its keys wiped. Submit it again under a new job id"
                        .to_string();
                    s.finished = Some(SystemTime::now());
                });
                job.log.close();
                metrics.job_ended(JobState::Lost);
                tracing::warn!(job_id = %id, "job marked LOST after an agent restart");
                job
            }
        };
        out.insert(id, Arc::new(job));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_nul_byte_reaches_a_jobs_message() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("j");
        let job = create_job(&dir, "j", 0o700, 1, &Arc::new(Metrics::default())).unwrap();
        job.transition(|s| {
            s.state = JobState::Failed;
            s.message = "step \"s\" failed: failed to execute workload\0".into();
        });
        assert_eq!(
            job.status().message,
            "step \"s\" failed: failed to execute workload"
        );
        let stored = std::fs::read_to_string(dir.join(STATUS_FILE)).unwrap();
        assert!(!stored.contains("\\u0000"), "{stored}");
    }

    #[test]
    fn a_job_takes_the_lowest_free_slot_and_gives_it_back() {
        let slots = Arc::new(Slots::new(3));
        let a = Slots::take(&slots).unwrap();
        let b = Slots::take(&slots).unwrap();
        let c = Slots::take(&slots).unwrap();
        assert_eq!([a.index, b.index, c.index], [0, 1, 2]);
        assert!(Slots::take(&slots).is_none());
        assert_eq!(slots.free(), 0);
        drop(b);
        assert_eq!(slots.free(), 1);
        // Slot 1's ids are free again, and only they.
        assert_eq!(Slots::take(&slots).unwrap().index, 1);
        drop((a, c));
        assert_eq!(slots.free(), 3);
    }
}
