//! The steps of a job, run one after another in its container: each an
//! exec of the step's shell, its output masked and chunked into the log,
//! under the step's and the job's deadlines. A non-zero exit is an
//! outcome; when a limit of the container killed it, the message says
//! which.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;
use tokio::process::Child;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::disk::DiskLimit;
use super::{End, Interrupt, Limits};
use crate::job::Job;
use crate::logs::Masker;
use crate::logs::output::{CHUNK_CAP, Chunker, pump};
use crate::model::{EventKind, FailureKind, JobState, Resources, Step, StepResult, Stream as Out};
use crate::runtime::cgroup::LimitsHit;
use crate::runtime::spec as oci;
use crate::runtime::user::User;
use crate::runtime::{ContainerRuntime, JobContainer};
use crate::sys::wipe::WipeOnDrop;

/// What every step of a job shares.
pub(super) struct Steps<'a> {
    pub job: &'a Arc<Job>,
    pub env: BTreeMap<String, String>,
    /// Where each step starts: the image's WorkingDir, or the workspace.
    pub cwd: String,
    pub user: User,
    pub masker: Arc<Masker>,
    pub limits: &'a Limits,
    pub grace: Duration,
    /// For a step without its own.
    pub no_output_timeout: Duration,
    /// The container's cgroup and limits, to explain a kill.
    pub cgroup: String,
    pub resources: Resources,
    /// The job's disk, when limited, to explain a step that filled it.
    pub disk: Option<DiskLimit>,
    pub runtime: &'a dyn ContainerRuntime,
    /// What the store's steps need.
    pub store: super::store::StoreCx,
}

/// A step's process: started, its output on the way to the log.
struct Started {
    child: Child,
    _process_file: WipeOnDrop,
    /// Ends when both pipes have closed.
    output: BoxFuture<'static, ()>,
    /// When it last printed anything.
    last_output: Arc<Mutex<Instant>>,
    exited: CancellationToken,
}

impl Started {
    /// When it last printed, and its end: the process exited and both of
    /// its pipes drained into the log.
    fn into_end(
        self,
    ) -> (
        Arc<Mutex<Instant>>,
        BoxFuture<'static, std::io::Result<std::process::ExitStatus>>,
    ) {
        let Started {
            mut child,
            _process_file: file,
            output,
            last_output,
            exited,
        } = self;
        let end = Box::pin(async move {
            let _file = file;
            let wait = async {
                let status = child.wait().await;
                exited.cancel();
                status
            };
            let (status, ()) = tokio::join!(wait, output);
            status
        });
        (last_output, end)
    }
}

/// A background step still running, or how it ended.
struct Background {
    result: StepResult,
    started: Instant,
    what: String,
    task: tokio::task::JoinHandle<std::io::Result<std::process::ExitStatus>>,
}

impl Steps<'_> {
    /// Runs the steps in order. A step runs when its `when` says so given
    /// whether an earlier one failed; the job's outcome is the first
    /// failure's. Once the container was stopped (a timeout, a cancel) no
    /// step runs any more.
    pub async fn run_all(&self, container: &mut dyn JobContainer, steps: &[Step]) -> End {
        let mut first: Option<End> = None;
        let mut stopped: Option<String> = None;
        let mut background: Vec<Background> = Vec::new();
        for (i, step) in steps.iter().enumerate() {
            let index = i as u32;
            self.reap(&mut background, &mut first, false).await;
            let skip = match &stopped {
                Some(why) => Some(format!("skipped: {why}")),
                None if !step.when.runs(first.is_some()) => Some(format!(
                    "skipped: {} (when = {})",
                    if first.is_some() {
                        "an earlier step failed"
                    } else {
                        "no earlier step failed"
                    },
                    step.when.name()
                )),
                None => None,
            };
            if let Some(note) = skip {
                self.job
                    .system_line(index, &format!("runnel: step {:?} {note}", step.name));
                self.job.step_finished(StepResult {
                    index,
                    name: step.name.clone(),
                    state: JobState::Cancelled,
                    exit_code: -1,
                    signal: 0,
                    duration: Duration::ZERO,
                    started: None,
                    when: step.when,
                    note,
                    background: step.background,
                });
                continue;
            }
            if first.is_some() {
                self.job.system_line(
                    index,
                    &format!(
                        "runnel: step {:?} runs after a failure (when = {})",
                        step.name,
                        step.when.name()
                    ),
                );
            }
            let span = tracing::info_span!("step", step = %step.name, index);
            if step.kind.uses_store() {
                let (result, end) = self.run_store_step(container, index, step).instrument(span).await;
                self.job.step_finished(result);
                if let Some(end) = end {
                    first.get_or_insert(end);
                }
                continue;
            }
            if step.background {
                match self
                    .start_background(container, index, step)
                    .instrument(span)
                    .await
                {
                    Ok(b) => background.push(b),
                    Err((result, end)) => {
                        self.job.step_finished(result);
                        first.get_or_insert(end);
                    }
                }
                continue;
            }
            let (result, end, container_stopped) = self.run(container, index, step).instrument(span).await;
            self.job.step_finished(result);
            if let Some(end) = end {
                if container_stopped {
                    stopped = Some(format!("the container was stopped ({})", end.message));
                }
                first.get_or_insert(end);
            }
        }
        self.reap(&mut background, &mut first, true).await;
        first.unwrap_or_else(End::ok)
    }

    /// Reports the background steps that have ended: one that failed
    /// while the job's other steps ran fails the job (unless something
    /// failed first). At the `end` of the job, the rest are reported as
    /// stopped with the container.
    async fn reap(&self, background: &mut Vec<Background>, first: &mut Option<End>, end: bool) {
        let mut still = Vec::new();
        for mut b in background.drain(..) {
            if !b.task.is_finished() && !end {
                still.push(b);
                continue;
            }
            b.result.duration = b.started.elapsed();
            if !b.task.is_finished() {
                b.result.state = JobState::Succeeded;
                b.result.note = "running at the end of the job's steps: stopped with the container".into();
                self.job.step_finished(b.result);
                // Its output goes on to the log until the container stops.
                continue;
            }
            match (&mut b.task).await {
                Ok(Ok(status)) if status.success() => {
                    b.result.state = JobState::Succeeded;
                    b.result.exit_code = 0;
                    b.result.note = "ended by itself".into();
                }
                Ok(Ok(status)) => {
                    let code = status.code().unwrap_or(-1);
                    b.result.exit_code = code;
                    b.result.note = "failed while the job's steps ran".into();
                    first.get_or_insert(End::failed(
                        FailureKind::Step,
                        format!("background {} failed: exit status {code}", b.what),
                    ));
                }
                Ok(Err(e)) => {
                    first.get_or_insert(End::failed(
                        FailureKind::Agent,
                        format!("cannot wait for {}: {e}", b.what),
                    ));
                }
                Err(e) => {
                    first.get_or_insert(End::failed(
                        FailureKind::Agent,
                        format!("{} was lost: {e}", b.what),
                    ));
                }
            }
            self.job.step_finished(b.result);
        }
        *background = still;
    }

    /// Why the container's processes were killed, if a limit did it.
    fn limit_hit(&self, before: LimitsHit) -> Option<String> {
        let now = self.runtime.limits_hit(&self.cgroup);
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
        let disk = self.disk.as_ref().and_then(DiskLimit::full)?;
        Some(format!("ran out of disk space: it filled {disk}"))
    }

    /// The step's result before it has run.
    pub(super) fn result(&self, index: u32, step: &Step) -> StepResult {
        StepResult {
            index,
            name: step.name.clone(),
            state: JobState::Failed,
            exit_code: -1,
            signal: 0,
            duration: Duration::ZERO,
            started: Some(SystemTime::now()),
            when: step.when,
            note: String::new(),
            background: step.background,
        }
    }

    /// Starts the step's process in the container, its output pumped into
    /// the log under `index`.
    fn start(
        &self,
        container: &dyn JobContainer,
        index: u32,
        step: &Step,
        what: &str,
    ) -> Result<Started, String> {
        let job = self.job;
        let mut env = self.env.clone();
        env.extend(step.env.clone());
        env.insert("RUNNEL_STEP".into(), step.name.clone());
        let cwd = step.cwd(oci::WORKSPACE).unwrap_or_else(|| self.cwd.clone());
        let process = oci::process(step.argv(), &env, &cwd, &self.user);
        let pipes = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .and_then(|o| nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map(|e| (o, e)));
        let ((out_r, out_w), (err_r, err_w)) =
            pipes.map_err(|e| format!("cannot create pipes for {what}: {e}"))?;
        let (child, process_file) = container
            .exec(&process, out_w, err_w)
            .map_err(|e| format!("cannot start {what}: {e}"))?;
        let exited = CancellationToken::new();
        let last_output = Arc::new(Mutex::new(Instant::now()));
        let pump_to_log = |pipe, stream: Out| {
            let job = job.clone();
            let last = last_output.clone();
            let chunker = Chunker::new(self.masker.clone(), CHUNK_CAP);
            pump(pipe, chunker, exited.clone(), move |data: Vec<u8>| {
                *last.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
                job.emit(EventKind::Log {
                    step: index,
                    stream,
                    data,
                })
            })
        };
        let (out, err) = (pump_to_log(out_r, Out::Stdout), pump_to_log(err_r, Out::Stderr));
        let output = Box::pin(async move {
            let _ = tokio::join!(out, err);
        });
        Ok(Started {
            child,
            _process_file: process_file,
            output,
            last_output,
            exited,
        })
    }

    /// A step's working directory, made (as the step's user, by its
    /// shell) when it does not exist.
    async fn make_cwd(&self, container: &dyn JobContainer, step: &Step) -> Result<(), String> {
        let Some(dir) = step.cwd(oci::WORKSPACE) else {
            return Ok(());
        };
        let shell = step.argv()[0].clone();
        let args = vec![
            shell,
            "-c".into(),
            "mkdir -p -- \"$1\"".into(),
            "sh".into(),
            dir.clone(),
        ];
        let process = oci::process(args, &self.env, "/", &self.user);
        let devnull = |_| std::fs::File::open("/dev/null").map(OwnedFd::from);
        let (Ok(out), Ok(err)) = (devnull(()), devnull(())) else {
            return Err("cannot open /dev/null".into());
        };
        let (mut child, _file) = container.exec(&process, out, err).map_err(|e| e.to_string())?;
        match child.wait().await {
            Ok(s) if s.success() => Ok(()),
            Ok(s) => Err(format!(
                "cannot make its working_directory {dir}: mkdir -p exited with {s}"
            )),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Starts a background step: the job goes on at once.
    async fn start_background(
        &self,
        container: &mut dyn JobContainer,
        index: u32,
        step: &Step,
    ) -> Result<Background, (StepResult, End)> {
        let what = format!("step {:?}", step.name);
        self.job.emit(EventKind::StepStarted {
            index,
            name: step.name.clone(),
        });
        let started = Instant::now();
        let result = self.result(index, step);
        let failed = |message: String| (result.clone(), End::failed(FailureKind::Agent, message));
        self.make_cwd(container, step)
            .await
            .map_err(|e| failed(format!("{what}: {e}")))?;
        let s = self.start(container, index, step, &what).map_err(failed)?;
        self.job
            .system_line(index, &format!("runnel: {what} runs in the background"));
        // The task outlives this call: it ends when the process has exited
        // and its pipes have closed (the container stopped, at the latest).
        let task = tokio::spawn(s.into_end().1);
        Ok(Background {
            result,
            started,
            what,
            task,
        })
    }

    /// Runs one foreground step to its end. Returns its result, the end
    /// of the job if it failed, and whether the container was stopped.
    async fn run(
        &self,
        container: &mut dyn JobContainer,
        index: u32,
        step: &Step,
    ) -> (StepResult, Option<End>, bool) {
        let job = self.job;
        job.emit(EventKind::StepStarted {
            index,
            name: step.name.clone(),
        });
        let started = Instant::now();
        let before = self.runtime.limits_hit(&self.cgroup);
        let mut result = self.result(index, step);
        let what = format!("step {:?}", step.name);
        let fail = |mut result: StepResult, message: String| {
            result.duration = started.elapsed();
            (result, Some(End::failed(FailureKind::Agent, message)), false)
        };
        if let Err(e) = self.make_cwd(container, step).await {
            return fail(result, format!("{what}: {e}"));
        }
        let (last_output, mut work) = match self.start(container, index, step, &what) {
            Ok(s) => s.into_end(),
            Err(e) => return fail(result, e),
        };
        let step_limit = step.timeout.map(|t| (started + t, t));
        let quiet_limit = step.no_output_timeout.unwrap_or(self.no_output_timeout);
        let silence = async {
            loop {
                let last = *last_output.lock().unwrap_or_else(|e| e.into_inner());
                if last.elapsed() >= quiet_limit {
                    return Interrupt::NoOutput(quiet_limit);
                }
                tokio::time::sleep_until(last + quiet_limit).await;
            }
        };
        let interrupt = tokio::select! {
            status = &mut work => {
                result.duration = started.elapsed();
                return match status {
                    Ok(s) if s.success() => {
                        result.state = JobState::Succeeded;
                        result.exit_code = 0;
                        (result, None, false)
                    }
                    Ok(s) => {
                        let code = s.code().unwrap_or(-1);
                        result.exit_code = code;
                        let message = match self.limit_hit(before) {
                            Some(why) => format!("{what} {why}; exit status {code}"),
                            None => format!("{what} failed: exit status {code}"),
                        };
                        let mut end = End::failed(FailureKind::Step, message);
                        end.sigint = code == 130;
                        (result, Some(end), false)
                    }
                    Err(e) => fail(result, format!("cannot wait for {what}: {e}")),
                };
            }
            why = self.limits.interrupted(step_limit) => why,
            why = silence => why,
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
        // The runtime's exec reports a signal as 128 + n, or was itself
        // killed by it.
        result.signal = match status {
            Ok(Ok(s)) => s
                .code()
                .filter(|c| *c > 128)
                .map(|c| c - 128)
                .or(std::os::unix::process::ExitStatusExt::signal(&s))
                .unwrap_or(libc::SIGKILL),
            _ => libc::SIGKILL,
        };
        (result, Some(end), true)
    }
}

#[cfg(test)]
pub(super) mod tests {
    //! The lifecycle's own logic (timeouts, cancel, limit messages, the
    //! first failure ending the job) over a fake runtime whose "container"
    //! runs each step as a host process.

    use std::os::fd::OwnedFd;
    use std::path::{Path, PathBuf};
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU64, Ordering};

    use futures::StreamExt;
    use futures::future::BoxFuture;
    use oci_spec::runtime::{Process, Spec};
    use tokio::process::Child;

    use super::*;
    use crate::job::lifecycle::store::StoreCx;
    use crate::logs::EventLog;
    use crate::metrics::Metrics;
    use crate::model::JobStatus;
    use crate::model::When;
    use crate::runtime::RuntimeError;
    use crate::sys::wipe::WipeOnDrop;

    /// A runtime whose limit counters the test sets.
    #[derive(Debug, Default)]
    pub struct FakeRuntime {
        pub oom_kills: AtomicU64,
        /// What happened to its containers, in order.
        pub calls: Arc<Mutex<Vec<String>>>,
    }

    impl ContainerRuntime for FakeRuntime {
        fn name(&self) -> &'static str {
            "fake"
        }
        fn init_path(&self) -> &Path {
            Path::new("/nonexistent/init")
        }
        fn cgroup_path(&self, id: &str) -> String {
            format!("/fake/{id}")
        }
        fn start<'a>(
            &'a self,
            _id: &'a str,
            _bundle: &'a Path,
            _spec: &'a Spec,
        ) -> BoxFuture<'a, Result<Box<dyn JobContainer>, RuntimeError>> {
            Box::pin(async move { Ok(Box::new(self.container()) as Box<dyn JobContainer>) })
        }
        fn limits_hit(&self, _cgroup: &str) -> LimitsHit {
            LimitsHit {
                oom_kills: self.oom_kills.load(Ordering::SeqCst),
                pids_max: 0,
            }
        }
    }

    impl FakeRuntime {
        pub fn container(&self) -> FakeContainer {
            FakeContainer {
                pids: Mutex::new(Vec::new()),
                calls: self.calls.clone(),
                checks: Vec::new(),
            }
        }
    }

    /// Runs each exec'd process on the host; `stop` sends SIGTERM to them.
    #[derive(Debug)]
    pub struct FakeContainer {
        pids: Mutex<Vec<u32>>,
        calls: Arc<Mutex<Vec<String>>>,
        /// Paths whose existence `remove` records, to see what was still
        /// there when the container went.
        pub checks: Vec<PathBuf>,
    }

    impl FakeContainer {
        fn call(&self, what: String) {
            self.calls.lock().unwrap().push(what);
        }
    }

    impl JobContainer for FakeContainer {
        fn exec(
            &self,
            process: &Process,
            stdout: OwnedFd,
            stderr: OwnedFd,
        ) -> Result<(Child, WipeOnDrop), RuntimeError> {
            let args = process.args().clone().unwrap_or_default();
            let child = tokio::process::Command::new(&args[0])
                .args(&args[1..])
                .env_clear()
                .envs(process.env().iter().flatten().filter_map(|kv| kv.split_once('=')))
                .stdin(std::process::Stdio::null())
                .stdout(stdout)
                .stderr(stderr)
                .kill_on_drop(true)
                .spawn()
                .expect("sh runs");
            self.pids.lock().unwrap().push(child.id().unwrap());
            self.call("exec".into());
            Ok((child, WipeOnDrop(PathBuf::from("/nonexistent/process.json"))))
        }

        fn stop(&mut self, _grace: Duration) -> BoxFuture<'_, ()> {
            self.call("stop".into());
            for pid in self.pids.lock().unwrap().iter() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(*pid as i32),
                    nix::sys::signal::SIGTERM,
                );
            }
            Box::pin(async {})
        }

        fn remove(self: Box<Self>, _grace: Duration) -> BoxFuture<'static, ()> {
            let there: Vec<String> = self
                .checks
                .iter()
                .map(|p| format!("{}={}", p.file_name().unwrap().to_string_lossy(), p.exists()))
                .collect();
            self.call(format!("remove {}", there.join(" ")));
            Box::pin(async {})
        }
    }

    pub fn job(dir: &Path) -> Arc<Job> {
        let log = EventLog::create(&dir.join("events.log")).unwrap();
        Arc::new(Job::new(
            dir,
            "j",
            JobStatus::new("j".into()),
            log,
            &Arc::new(Metrics::default()),
        ))
    }

    fn step(name: &str, run: &str, timeout: Option<Duration>) -> Step {
        Step {
            name: name.into(),
            kind: crate::model::StepKind::Run(run.into()),
            timeout,
            ..Default::default()
        }
    }

    fn limits(cancel: &CancellationToken, job_timeout: Duration) -> Limits {
        Limits {
            cancel: cancel.clone(),
            job_deadline: Instant::now() + job_timeout,
            job_timeout,
        }
    }

    async fn run(runtime: &FakeRuntime, limits: &Limits, dir: &Path, steps: &[Step]) -> (End, Arc<Job>) {
        let job = job(dir);
        let s = Steps {
            job: &job,
            env: BTreeMap::from([("PATH".to_string(), "/usr/bin:/bin".to_string())]),
            cwd: oci::WORKSPACE.to_string(),
            user: User::root(),
            masker: Arc::new(Masker::new(&[])),
            limits,
            grace: Duration::from_millis(100),
            no_output_timeout: Duration::from_secs(600),
            cgroup: runtime.cgroup_path("j"),
            resources: Resources {
                memory_bytes: Some(64 << 20),
                max_pids: Some(32),
                cpu_millis: None,
                disk_bytes: Some(64 << 20),
            },
            disk: None,
            runtime,
            store: StoreCx::none(),
        };
        let mut container = runtime.container();
        let end = s.run_all(&mut container, steps).await;
        (end, job)
    }

    /// Every log line the job recorded.
    async fn log_text(job: &Job) -> String {
        job.log.close();
        let events: Vec<_> = job.watch(0, false).collect().await;
        let mut out = String::new();
        for e in events {
            if let EventKind::Log { data, .. } = e.unwrap().kind {
                out.push_str(&String::from_utf8_lossy(&data));
            }
        }
        out
    }

    #[tokio::test]
    async fn steps_run_in_order_and_the_first_failure_ends_the_job() {
        let dir = tempfile::tempdir().unwrap();
        let rt = FakeRuntime::default();
        let cancel = CancellationToken::new();
        let steps = [
            step("one", "echo first", None),
            step("two", "echo second; exit 3", None),
            step("three", "echo never", None),
        ];
        let (end, job) = run(&rt, &limits(&cancel, Duration::from_secs(30)), dir.path(), &steps).await;
        assert_eq!((end.state, end.failure), (JobState::Failed, FailureKind::Step));
        assert_eq!(end.message, "step \"two\" failed: exit status 3");
        let status = job.status();
        assert_eq!(status.steps.len(), 3);
        assert_eq!(status.steps[1].exit_code, 3);
        // The third did not run, and says why.
        assert_eq!(status.steps[2].started, None);
        assert_eq!(
            status.steps[2].note,
            "skipped: an earlier step failed (when = on_success)"
        );
        assert_eq!(
            log_text(&job).await,
            "first\nsecond\nrunnel: step \"three\" skipped: an earlier step failed (when = on_success)\n"
        );
        assert_eq!(*rt.calls.lock().unwrap(), ["exec", "exec"]);
    }

    fn when(mut s: Step, when: When) -> Step {
        s.when = when;
        s
    }

    #[tokio::test]
    async fn on_fail_and_always_steps_run_after_a_failure_which_stays_the_jobs() {
        let dir = tempfile::tempdir().unwrap();
        let rt = FakeRuntime::default();
        let cancel = CancellationToken::new();
        let steps = [
            when(step("only-on-fail", "echo not-yet", None), When::OnFail),
            step("fails", "exit 3", None),
            step("on-success", "echo skipped", None),
            when(step("on-fail", "echo cleanup; exit 5", None), When::OnFail),
            when(step("always", "echo always", None), When::Always),
        ];
        let (end, job) = run(&rt, &limits(&cancel, Duration::from_secs(30)), dir.path(), &steps).await;
        // The first failure is the job's, not the on_fail step's.
        assert_eq!(end.message, "step \"fails\" failed: exit status 3");
        let status = job.status();
        let ran: Vec<(&str, bool)> = status
            .steps
            .iter()
            .map(|s| (s.name.as_str(), s.started.is_some()))
            .collect();
        assert_eq!(
            ran,
            [
                ("only-on-fail", false),
                ("fails", true),
                ("on-success", false),
                ("on-fail", true),
                ("always", true)
            ]
        );
        assert_eq!(
            status.steps[0].note,
            "skipped: no earlier step failed (when = on_fail)"
        );
        assert_eq!(status.steps[3].when, When::OnFail);
        assert_eq!(status.steps[3].exit_code, 5);
        let log = log_text(&job).await;
        assert!(log.contains("cleanup\n") && log.contains("always\n"), "{log}");
        assert!(!log.contains("not-yet") && !log.contains("skipped\n"), "{log}");
    }

    #[tokio::test]
    async fn a_step_silent_for_its_no_output_timeout_ends_the_job_with_no_output() {
        let dir = tempfile::tempdir().unwrap();
        let rt = FakeRuntime::default();
        let cancel = CancellationToken::new();
        let mut chatty = step(
            "chatty",
            "for i in 1 2 3 4 5 6; do echo $i; sleep 0.1; done",
            None,
        );
        chatty.no_output_timeout = Some(Duration::from_millis(400));
        let mut silent = step("silent", "echo once; sleep 30", None);
        silent.no_output_timeout = Some(Duration::from_millis(300));
        let steps = [
            chatty,
            silent,
            when(step("after", "echo after", None), When::Always),
        ];
        let (end, job) = run(&rt, &limits(&cancel, Duration::from_secs(30)), dir.path(), &steps).await;
        assert_eq!(
            (end.state, end.failure),
            (JobState::Failed, FailureKind::NoOutput)
        );
        assert_eq!(
            end.message,
            "step \"silent\" printed nothing for 300ms (its no_output_timeout) and was ended"
        );
        let status = job.status();
        assert_eq!(status.steps[0].state, JobState::Succeeded);
        // The container was stopped: nothing runs after it.
        assert!(
            status.steps[2]
                .note
                .starts_with("skipped: the container was stopped"),
            "{:?}",
            status.steps[2]
        );
        assert_eq!(*rt.calls.lock().unwrap(), ["exec", "exec", "stop"]);
    }

    #[tokio::test]
    async fn a_background_step_runs_beside_the_next_and_fails_the_job_only_while_they_run() {
        let dir = tempfile::tempdir().unwrap();
        let rt = FakeRuntime::default();
        let cancel = CancellationToken::new();
        let mut server = step("server", "echo serving; sleep 0.2; exit 4", None);
        server.background = true;
        let steps = [server, step("client", "sleep 1; echo client-done", None)];
        let (end, job) = run(&rt, &limits(&cancel, Duration::from_secs(30)), dir.path(), &steps).await;
        assert_eq!((end.state, end.failure), (JobState::Failed, FailureKind::Step));
        assert_eq!(end.message, "background step \"server\" failed: exit status 4");
        let status = job.status();
        let names: Vec<&str> = status.steps.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["client", "server"]);
        assert!(status.steps[1].background);
        assert_eq!(status.steps[1].note, "failed while the job's steps ran");

        // Still running when the others end: stopped with the container,
        // the job succeeds.
        let dir = tempfile::tempdir().unwrap();
        let mut server = step("server", "echo serving; sleep 30", None);
        server.background = true;
        let steps = [server, step("client", "sleep 0.2", None)];
        let (end, job) = run(&rt, &limits(&cancel, Duration::from_secs(30)), dir.path(), &steps).await;
        assert_eq!(end.state, JobState::Succeeded, "{}", end.message);
        let status = job.status();
        assert_eq!(
            status.steps[1].note,
            "running at the end of the job's steps: stopped with the container"
        );
        assert!(log_text(&job).await.contains("serving\n"));
    }

    #[tokio::test]
    async fn a_step_past_its_timeout_stops_the_container_and_the_job_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let rt = FakeRuntime::default();
        let cancel = CancellationToken::new();
        let steps = [
            step("slow", "sleep 30", Some(Duration::from_millis(200))),
            step("after", "echo never", None),
        ];
        let (end, job) = run(&rt, &limits(&cancel, Duration::from_secs(30)), dir.path(), &steps).await;
        assert_eq!(
            (end.state, end.failure),
            (JobState::TimedOut, FailureKind::Timeout)
        );
        assert_eq!(end.message, "step \"slow\" exceeded its timeout of 200ms");
        assert_eq!(*rt.calls.lock().unwrap(), ["exec", "stop"]);
        let result = &job.status().steps[0];
        assert_eq!((result.state, result.signal), (JobState::TimedOut, libc::SIGTERM));
        assert!(
            log_text(&job)
                .await
                .contains("runnel: step \"slow\" exceeded its timeout of 200ms; stopping the container")
        );
    }

    #[tokio::test]
    async fn the_job_timeout_wins_when_it_comes_before_the_step_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let rt = FakeRuntime::default();
        let cancel = CancellationToken::new();
        let steps = [step("slow", "sleep 30", Some(Duration::from_secs(20)))];
        let (end, _) = run(
            &rt,
            &limits(&cancel, Duration::from_millis(200)),
            dir.path(),
            &steps,
        )
        .await;
        assert_eq!(end.state, JobState::TimedOut);
        assert_eq!(
            end.message,
            "the job exceeded its timeout of 200ms during step \"slow\""
        );
    }

    #[tokio::test]
    async fn a_cancel_during_a_step_stops_it_and_cancels_the_job() {
        let dir = tempfile::tempdir().unwrap();
        let rt = FakeRuntime::default();
        let cancel = CancellationToken::new();
        let limits = limits(&cancel, Duration::from_secs(30));
        let steps = [step("long", "sleep 30", None)];
        let canceller = {
            let cancel = cancel.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(150)).await;
                cancel.cancel();
            })
        };
        let (end, _) = run(&rt, &limits, dir.path(), &steps).await;
        canceller.await.unwrap();
        assert_eq!(
            (end.state, end.failure),
            (JobState::Cancelled, FailureKind::Cancelled)
        );
        assert_eq!(end.message, "cancelled during step \"long\"");
        assert_eq!(*rt.calls.lock().unwrap(), ["exec", "stop"]);
    }

    #[tokio::test]
    async fn a_step_killed_at_the_memory_limit_is_told_so_with_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let rt = Arc::new(FakeRuntime::default());
        let cancel = CancellationToken::new();
        // The kernel's OOM killer, as the cgroup counter shows it: bumped
        // while the step runs.
        let flag = dir.path().join("started");
        let steps = [step(
            "hungry",
            &format!("touch {}; sleep 0.3; exit 137", flag.display()),
            None,
        )];
        let bump = {
            let rt = rt.clone();
            tokio::spawn(async move {
                while !flag.exists() {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                rt.oom_kills.fetch_add(1, Ordering::SeqCst);
            })
        };
        let (end, _) = run(&rt, &limits(&cancel, Duration::from_secs(30)), dir.path(), &steps).await;
        bump.await.unwrap();
        assert_eq!(end.failure, FailureKind::Step);
        assert_eq!(
            end.message,
            "step \"hungry\" ran out of memory: the kernel killed it at the container's limit of 64 MiB \
             (container.resources.memory_bytes); exit status 137"
        );
    }
}
