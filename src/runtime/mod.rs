//! Containers for jobs. Owns the OCI bundle of a job, the runtime that runs
//! it, and the lifetime of everything in it: one container per job whose
//! PID 1 is runnel's static init, steps exec'd into it, and on stop SIGTERM
//! to every process, a grace period, then SIGKILL.
//!
//! Every runtime is driven through the same runc-style command line
//! (`run`, `exec`, `kill`, `delete`): `runc`, `crun`, or the runnel binary
//! itself (`runnel oci ...`, youki's libcontainer, see `embedded.rs`). A
//! process per container keeps libcontainer's process-wide side effects
//! (it `chdir`s) out of the agent, and containers reapable across an agent
//! restart. This module never reads a job's output and never decides a
//! job's state.

pub mod cgroup;
pub mod embedded;
pub mod hostroot;
pub mod image;
pub mod layer;
pub mod network;
pub mod rootfs;
pub mod seccomp;
pub mod spec;
pub mod user;

use std::ffi::OsString;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;
use oci_spec::runtime::{Process, Spec};
use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};
use tokio::time::Instant;

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;

use crate::sys::wipe::WipeOnDrop;

/// The static init, built by build.rs from `init.c`.
const INIT_BINARY: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/runnel-init"));

/// How long a container may take to start before we give up.
const START_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(
        "runtime.kind = {kind:?}, but no `{kind}` binary was found on PATH; install it or set runtime.path"
    )]
    NotInstalled { kind: &'static str },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("the container did not start: {0}")]
    Start(#[from] StartError),
    #[error(transparent)]
    Delegate(#[from] cgroup::DelegateError),
}

/// Why a container did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot write {path}: {source}")]
    WriteConfig {
        path: PathBuf,
        #[source]
        source: oci_spec::OciSpecError,
    },
    #[error("cannot run {program}: {source}")]
    Spawn {
        program: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The runtime's `run` ended before the init ran; what it printed.
    #[error("the runtime exited ({status}): {stderr}")]
    RuntimeExited { status: ExitStatus, stderr: String },
    #[error("no init after {}s", .waited.as_secs())]
    NoInit { waited: Duration },
    #[error("the init's pid file {path} is unreadable")]
    NoInitPid { path: PathBuf },
    #[error("cannot bring up lo: {0}")]
    Loopback(#[source] io::Error),
    #[error("cannot restrict the container's devices: {0}")]
    Devices(String),
}

/// Why a short runtime command (`kill`, `delete`) failed. A runtime's
/// stderr is read in one place, [`CommandError::check`].
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("cannot run {program}: {source}")]
    Spawn {
        program: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The runtime knows no container of that id (already deleted).
    #[error("container {id} does not exist")]
    NotFound { id: String },
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: ExitStatus,
        stderr: String,
    },
    #[error("cannot signal the init of container {id}: {source}")]
    Signal {
        id: String,
        #[source]
        source: nix::errno::Errno,
    },
}

impl CommandError {
    /// How the runtime command `command` on container `id` ended, from its
    /// exit status and stderr. runc and `runnel oci` both say a container
    /// they do not know "does not exist".
    pub fn check(command: &str, id: &str, status: ExitStatus, stderr: &[u8]) -> Result<(), CommandError> {
        if status.success() {
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(stderr).trim().to_string();
        if stderr.contains("does not exist") {
            return Err(CommandError::NotFound { id: id.to_string() });
        }
        Err(CommandError::Failed {
            command: command.to_string(),
            status,
            stderr,
        })
    }
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> RuntimeError {
    let what = what.into();
    move |source| RuntimeError::Io { what, source }
}

/// Which OCI runtime runs the containers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuntimeKind {
    /// youki's libcontainer, inside the runnel binary (the default).
    Embedded,
    Runc,
    Crun,
}

impl RuntimeKind {
    pub fn name(self) -> &'static str {
        match self {
            RuntimeKind::Embedded => "libcontainer",
            RuntimeKind::Runc => "runc",
            RuntimeKind::Crun => "crun",
        }
    }
}

/// What the agent's configuration says about the runtime itself.
#[derive(Debug, Clone)]
pub struct RuntimeSettings {
    pub kind: RuntimeKind,
    /// The runtime binary for `runc`/`crun`; found on PATH when unset.
    pub path: Option<PathBuf>,
}

/// A configured OCI runtime.
#[derive(Debug)]
pub struct Runtime {
    kind: RuntimeKind,
    handle: RuntimeHandle,
    init: PathBuf,
    /// Tells this agent's cgroups apart from another agent's.
    cgroup_parent: String,
}

impl Runtime {
    /// Prepares the runtime: its state root and the init binary under
    /// `state_dir`.
    pub fn new(config: &RuntimeSettings, state_dir: &Path) -> Result<Runtime, RuntimeError> {
        let (program, prefix) = match config.kind {
            RuntimeKind::Embedded => (
                std::env::current_exe().map_err(io_err("cannot find the runnel binary"))?,
                vec![OsString::from("oci")],
            ),
            kind => {
                let name = kind.name();
                let program = match &config.path {
                    Some(p) => p.clone(),
                    None => find_on_path(name).ok_or(RuntimeError::NotInstalled { kind: name })?,
                };
                (program, Vec::new())
            }
        };
        let root = state_dir.join("runtime").join(config.kind.name());
        std::fs::create_dir_all(&root).map_err(io_err(format!("cannot create {}", root.display())))?;
        let bin = state_dir.join("bin");
        std::fs::create_dir_all(&bin).map_err(io_err(format!("cannot create {}", bin.display())))?;
        let init = bin.join("runnel-init");
        write_executable(&init, INIT_BINARY)?;
        let digest = {
            use sha2::Digest;
            let d = sha2::Sha256::digest(state_dir.as_os_str().as_encoded_bytes());
            d.iter().take(4).map(|b| format!("{b:02x}")).collect::<String>()
        };
        Ok(Runtime {
            kind: config.kind,
            handle: RuntimeHandle {
                program,
                prefix,
                root,
            },
            init,
            cgroup_parent: cgroup::job_parent(&format!("/runnel.{digest}"))?,
        })
    }

    /// The runtime's name, as AgentInfo reports it.
    pub fn name(&self) -> &'static str {
        self.kind.name()
    }

    pub fn init_path(&self) -> &Path {
        &self.init
    }

    pub fn cgroup_path(&self, id: &str) -> String {
        format!("{}/{id}", self.cgroup_parent)
    }

    /// Removes the cgroups of containers a previous run left; their ids.
    pub fn remove_leftover_cgroups(&self) -> Vec<String> {
        cgroup::remove_tree(&self.cgroup_parent)
    }

    /// Writes `spec` into `bundle` and starts the container `id`. Returns
    /// once its init runs.
    pub async fn start(&self, id: &str, bundle: &Path, spec: &Spec) -> Result<Container, RuntimeError> {
        let config = bundle.join("config.json");
        spec.save(&config)
            .map_err(|source| StartError::WriteConfig { path: config, source })?;
        let pid_file = bundle.join("init.pid");
        let mut child = self
            .handle
            .command()
            .arg("run")
            .arg("--bundle")
            .arg(bundle)
            .arg("--pid-file")
            .arg(&pid_file)
            .arg(id)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| StartError::Spawn {
                program: self.handle.program.clone(),
                source,
            })?;
        let mut stderr = child.stderr.take().expect("stderr is piped");
        let stderr_task = tokio::spawn(async move {
            let mut buf = Vec::new();
            let _ = (&mut stderr).take(16 * 1024).read_to_end(&mut buf).await;
            buf
        });
        let mut container = Container {
            id: id.to_string(),
            runtime: self.handle.clone(),
            bundle: bundle.to_path_buf(),
            init: child,
            init_stderr: Some(stderr_task),
            execs: AtomicU32::new(0),
            removed: false,
            init_pid: None,
            cgroup: spec
                .linux()
                .as_ref()
                .and_then(|l| l.cgroups_path().as_ref())
                .map(|p| p.to_string_lossy().to_string()),
        };
        container.wait_started(&pid_file).await?;
        if let Some(path) = &container.cgroup {
            // Init runs without CAP_MKNOD and no step has started: no node
            // can have been made with the rules taken out.
            cgroup::restrict_devices(path)
                .map_err(|e| RuntimeError::Start(StartError::Devices(e.to_string())))?;
        }
        container.init_pid = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok())
            .map(nix::unistd::Pid::from_raw);
        let own_network = spec
            .linux()
            .as_ref()
            .and_then(|l| l.namespaces().as_ref())
            .is_some_and(|ns| {
                ns.iter()
                    .any(|n| n.typ() == oci_spec::runtime::LinuxNamespaceType::Network)
            });
        if own_network {
            // runc brings the loopback up in a new network namespace;
            // libcontainer does not. Do it from outside, for every runtime.
            let pid = container
                .init_pid
                .ok_or(StartError::NoInitPid { path: pid_file })?
                .as_raw();
            // A thread of its own enters the namespace: wait for it off
            // the async threads.
            tokio::task::spawn_blocking(move || crate::sys::netns::loopback_up(pid))
                .await
                .unwrap_or_else(|e| Err(io::Error::other(e)))
                .map_err(StartError::Loopback)?;
        }
        Ok(container)
    }

    /// Removes every container a previous run of this agent left behind.
    /// Returns their ids.
    pub async fn remove_leftovers(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(&self.handle.root) else {
            return Vec::new();
        };
        let mut removed = Vec::new();
        for entry in entries.flatten() {
            let id = entry.file_name().to_string_lossy().to_string();
            if let Err(e) = self.handle.run(&id, &["delete", "--force", &id]).await {
                tracing::warn!(container = %id, error = %e, "could not delete a leftover container");
                let _ = may_block(|| std::fs::remove_dir_all(entry.path()));
            }
            removed.push(id);
        }
        removed
    }
}

/// Runs `f`, file work that may take long (removing a tree), on this
/// thread: when that is a worker of tokio's multi-threaded runtime (a
/// `Drop` in an async task), its other tasks move to another thread first.
pub(crate) fn may_block<R>(f: impl FnOnce() -> R) -> R {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")
        .unwrap_or_else(|| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn write_executable(path: &Path, bytes: &[u8]) -> Result<(), RuntimeError> {
    use std::os::unix::fs::PermissionsExt;
    if std::fs::read(path).is_ok_and(|b| b == bytes) {
        return Ok(());
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)
        .and_then(|_| std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)))
        .and_then(|_| std::fs::rename(&tmp, path))
        .map_err(io_err(format!("cannot write {}", path.display())))
}

/// What a container needs of its runtime to manage itself.
#[derive(Debug, Clone)]
struct RuntimeHandle {
    program: PathBuf,
    prefix: Vec<OsString>,
    root: PathBuf,
}

impl RuntimeHandle {
    fn command(&self) -> Command {
        Command::from(self.std_command())
    }

    /// The runtime's command line. It gets none of the agent's
    /// environment but `PATH`: nothing the agent was started with (a
    /// token, `LD_LIBRARY_PATH` or `LD_PRELOAD`) reaches a process that
    /// enters a job's container; every step's environment is in its own
    /// process spec.
    fn std_command(&self) -> std::process::Command {
        let mut cmd = std::process::Command::new(&self.program);
        cmd.env_clear();
        if let Some(path) = std::env::var_os("PATH") {
            cmd.env("PATH", path);
        }
        cmd.args(&self.prefix).arg("--root").arg(&self.root);
        cmd.stdin(Stdio::null());
        // A process group of its own: Ctrl-C at the terminal of an agent
        // run in the foreground signals the terminal's process group, and
        // `runnel oci run/exec` would pass SIGINT on to the step. The
        // agent alone should get it, and drain or cancel.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        cmd
    }

    /// Runs a short runtime command on container `id` to completion.
    async fn run(&self, id: &str, args: &[&str]) -> Result<(), CommandError> {
        let out = self
            .command()
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .await
            .map_err(|source| self.spawn_error(source))?;
        CommandError::check(&args.join(" "), id, out.status, &out.stderr)
    }

    fn spawn_error(&self, source: io::Error) -> CommandError {
        CommandError::Spawn {
            program: self.program.clone(),
            source,
        }
    }

    /// Starts `delete --force id` and returns at once: for [`Container`]'s
    /// drop, which may run on an async thread. A thread of its own waits for
    /// the runtime and logs how it ended; the runtime process deletes the
    /// container even if the agent exits first.
    fn delete_in_background(&self, id: &str) {
        let args = ["delete", "--force", id];
        let spawned = self
            .std_command()
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn();
        let child = match spawned {
            Ok(c) => c,
            Err(e) => {
                let e = self.spawn_error(e);
                tracing::error!(container = %id, error = %e, "cannot delete the container");
                return;
            }
        };
        let (id, command) = (id.to_string(), args.join(" "));
        let reaper = move || match child.wait_with_output() {
            Ok(out) => log_delete(&id, CommandError::check(&command, &id, out.status, &out.stderr)),
            Err(e) => tracing::warn!(container = %id, error = %e, "cannot wait for the container's deletion"),
        };
        if let Err(e) = std::thread::Builder::new()
            .name("runnel-delete".into())
            .spawn(reaper)
        {
            // The runtime still deletes the container; only its exit goes
            // unread.
            tracing::warn!(error = %e, "cannot wait for a container's deletion");
        }
    }
}

/// A running job container. Removed (killed and deleted) on drop if
/// [`Container::remove`] was not awaited.
#[derive(Debug)]
pub struct Container {
    id: String,
    runtime: RuntimeHandle,
    bundle: PathBuf,
    /// The runtime's foreground `run` process: it lives as long as init.
    init: Child,
    init_stderr: Option<tokio::task::JoinHandle<Vec<u8>>>,
    execs: AtomicU32,
    removed: bool,
    /// The container's init, as the host sees it.
    init_pid: Option<nix::unistd::Pid>,
    /// Its cgroup (as in the spec), removed with it.
    cgroup: Option<String>,
}

impl Container {
    async fn wait_started(&mut self, pid_file: &Path) -> Result<(), StartError> {
        let started = Instant::now();
        let deadline = started + START_TIMEOUT;
        loop {
            if std::fs::metadata(pid_file).is_ok_and(|m| m.len() > 0) {
                return Ok(());
            }
            if let Ok(Some(status)) = self.init.try_wait() {
                let stderr = self.runtime_stderr().await;
                return Err(StartError::RuntimeExited { status, stderr });
            }
            if Instant::now() > deadline {
                return Err(StartError::NoInit {
                    waited: START_TIMEOUT,
                });
            }
            // A container starts in milliseconds: look every millisecond
            // at first, so that a job does not wait for the backoff.
            let pause = if started.elapsed() < Duration::from_millis(200) {
                Duration::from_millis(1)
            } else {
                Duration::from_millis(20)
            };
            tokio::time::sleep(pause).await;
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Starts `process` in the container with the given stdout and stderr.
    /// The returned child is the runtime's exec process; its exit status is
    /// the process's (128 + n when killed by signal n). The process spec
    /// holds the step's environment (secrets too): it is wiped when the
    /// returned guard is dropped.
    pub fn exec(
        &self,
        process: &Process,
        stdout: OwnedFd,
        stderr: OwnedFd,
    ) -> Result<(Child, WipeOnDrop), RuntimeError> {
        let n = self.execs.fetch_add(1, Ordering::Relaxed);
        let path = self.bundle.join(format!("process-{n}.json"));
        let json = serde_json::to_vec(process).expect("a process spec serialises");
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(io_err(format!("cannot write {}", path.display())))?;
        let guard = WipeOnDrop(path.clone());
        file.write_all(&json)
            .map_err(io_err(format!("cannot write {}", path.display())))?;
        drop(file);
        let child = self
            .runtime
            .command()
            .arg("exec")
            .arg("--process")
            .arg(&path)
            .arg(&self.id)
            .stdout(Stdio::from(stdout))
            .stderr(Stdio::from(stderr))
            .kill_on_drop(true)
            .spawn()
            .map_err(io_err("cannot start the runtime's exec"))?;
        Ok((child, guard))
    }

    /// Whether init still runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.init.try_wait(), Ok(None))
    }

    /// SIGTERM to every process of the container, up to `grace` for them to
    /// end, then SIGKILL. Returns once init is gone.
    pub async fn stop(&mut self, grace: Duration) {
        if !self.is_running() {
            return;
        }
        // init passes SIGTERM to every process and exits when none is left.
        let _ = self.signal(nix::sys::signal::Signal::SIGTERM).await;
        if tokio::time::timeout(grace, self.init.wait()).await.is_ok() {
            return;
        }
        tracing::info!(container = %self.id, "grace period over; killing the container");
        let _ = self.signal(nix::sys::signal::Signal::SIGKILL).await;
        if tokio::time::timeout(Duration::from_secs(10), self.init.wait())
            .await
            .is_err()
        {
            let _ = self.init.start_kill();
        }
    }

    async fn signal(&mut self, sig: nix::sys::signal::Signal) -> Result<(), CommandError> {
        // While the runtime's foreground `run` lives it has not reaped the
        // init (its child), so the pid is still the init's: signal it
        // directly rather than through one more runtime process. (It is
        // PID 1 of the container: SIGKILL ends every process in it.)
        if let Some(pid) = self.init_pid
            && self.is_running()
        {
            return nix::sys::signal::kill(pid, sig).map_err(|source| CommandError::Signal {
                id: self.id.clone(),
                source,
            });
        }
        let name = sig.as_str().trim_start_matches("SIG");
        self.runtime.run(&self.id, &["kill", &self.id, name]).await
    }

    /// Stops (if needed) and deletes the container.
    pub async fn remove(mut self, grace: Duration) {
        self.stop(grace).await;
        // The foreground `run` deletes the container when its init exits;
        // delete only what it left (it was killed, say).
        if self.runtime.root.join(&self.id).exists() {
            let deleted = self.runtime.run(&self.id, &["delete", "--force", &self.id]).await;
            log_delete(&self.id, deleted);
        }
        if let Some(t) = self.init_stderr.take() {
            t.abort();
        }
        self.remove_cgroup();
        self.removed = true;
    }

    /// Removes the container's cgroups in every hierarchy, with whatever
    /// was made below them (the runtime removes only its own).
    fn remove_cgroup(&self) {
        let Some(path) = &self.cgroup else { return };
        for (dir, e) in cgroup::remove(path, Duration::from_secs(2)) {
            tracing::warn!(container = %self.id, cgroup = %dir.display(), error = %e, "cannot remove a cgroup of the container");
        }
    }

    /// What the runtime printed on its stderr, for error messages.
    pub async fn runtime_stderr(&mut self) -> String {
        match self.init_stderr.take() {
            Some(t) => String::from_utf8_lossy(&t.await.unwrap_or_default())
                .trim()
                .to_string(),
            None => String::new(),
        }
    }
}

/// A container that is already gone needs no deleting.
fn log_delete(id: &str, deleted: Result<(), CommandError>) {
    match deleted {
        Ok(()) | Err(CommandError::NotFound { .. }) => {}
        Err(e) => tracing::warn!(container = %id, error = %e, "cannot delete the container"),
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if !self.removed {
            // The job's task was cut short (a panic, a dropped future).
            self.runtime.delete_in_background(&self.id);
            self.remove_cgroup();
        }
    }
}

/// The seam between a job's lifecycle and the container runtime: what the
/// lifecycle asks of a runtime, so that its timeout, cancel, limit and
/// teardown logic can be tested with a fake one. [`Runtime`] is the real
/// implementation.
pub trait ContainerRuntime: Send + Sync + std::fmt::Debug {
    /// The runtime's name, as AgentInfo reports it.
    fn name(&self) -> &'static str;
    /// runnel's init on the host, bind-mounted into every container.
    fn init_path(&self) -> &Path;
    /// The cgroup of the container `id`.
    fn cgroup_path(&self, id: &str) -> String;
    /// Writes `spec` into `bundle` and starts the container `id`; resolves
    /// once its init runs.
    fn start<'a>(
        &'a self,
        id: &'a str,
        bundle: &'a Path,
        spec: &'a Spec,
    ) -> BoxFuture<'a, Result<Box<dyn JobContainer>, RuntimeError>>;
    /// How often the kernel has enforced a container's memory and process
    /// limits so far.
    fn limits_hit(&self, cgroup: &str) -> cgroup::LimitsHit;
}

/// A started container, as the lifecycle uses it.
pub trait JobContainer: Send + Sync + std::fmt::Debug {
    /// Starts `process` in the container; see [`Container::exec`].
    fn exec(
        &self,
        process: &Process,
        stdout: OwnedFd,
        stderr: OwnedFd,
    ) -> Result<(Child, WipeOnDrop), RuntimeError>;
    /// SIGTERM to every process, `grace`, then SIGKILL.
    fn stop(&mut self, grace: Duration) -> BoxFuture<'_, ()>;
    /// Stops (if needed) and deletes the container.
    fn remove(self: Box<Self>, grace: Duration) -> BoxFuture<'static, ()>;
    /// The host pid of the container's init, while it runs.
    fn init_pid(&self) -> Option<i32> {
        None
    }
}

impl ContainerRuntime for Runtime {
    fn name(&self) -> &'static str {
        Runtime::name(self)
    }

    fn init_path(&self) -> &Path {
        Runtime::init_path(self)
    }

    fn cgroup_path(&self, id: &str) -> String {
        Runtime::cgroup_path(self, id)
    }

    fn start<'a>(
        &'a self,
        id: &'a str,
        bundle: &'a Path,
        spec: &'a Spec,
    ) -> BoxFuture<'a, Result<Box<dyn JobContainer>, RuntimeError>> {
        Box::pin(async move {
            let c = Runtime::start(self, id, bundle, spec).await?;
            Ok(Box::new(c) as Box<dyn JobContainer>)
        })
    }

    fn limits_hit(&self, cgroup: &str) -> cgroup::LimitsHit {
        cgroup::limits_hit(cgroup)
    }
}

impl JobContainer for Container {
    fn exec(
        &self,
        process: &Process,
        stdout: OwnedFd,
        stderr: OwnedFd,
    ) -> Result<(Child, WipeOnDrop), RuntimeError> {
        Container::exec(self, process, stdout, stderr)
    }

    fn stop(&mut self, grace: Duration) -> BoxFuture<'_, ()> {
        Box::pin(Container::stop(self, grace))
    }

    fn remove(self: Box<Self>, grace: Duration) -> BoxFuture<'static, ()> {
        Box::pin(Container::remove(*self, grace))
    }

    fn init_pid(&self) -> Option<i32> {
        self.init_pid.map(nix::unistd::Pid::as_raw)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;

    use super::*;

    fn handle(program: PathBuf, prefix: &[&str], root: &Path) -> RuntimeHandle {
        RuntimeHandle {
            program,
            prefix: prefix.iter().map(OsString::from).collect(),
            root: root.to_path_buf(),
        }
    }

    /// An exit status with `code`, as `wait` reports it.
    fn exited(code: i32) -> ExitStatus {
        ExitStatus::from_raw(code << 8)
    }

    #[test]
    fn the_runtime_gets_none_of_the_agents_environment_but_path() {
        // Under cargo the test process has HOME, CARGO_* and maybe
        // LD_LIBRARY_PATH; `sh -c env` stands in for the runtime.
        assert!(std::env::var_os("CARGO_MANIFEST_DIR").is_some());
        let root = tempfile::tempdir().unwrap();
        let out = handle("/bin/sh".into(), &["-c", "env", "sh"], root.path())
            .std_command()
            .output()
            .unwrap();
        let env = String::from_utf8(out.stdout).unwrap();
        let names: Vec<&str> = env
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, _)| k)
            .collect();
        // sh itself adds PWD (and maybe SHLVL, _).
        let unexpected: Vec<&&str> = names
            .iter()
            .filter(|n| !["PATH", "PWD", "SHLVL", "_"].contains(n))
            .collect();
        assert!(unexpected.is_empty(), "the runtime got {unexpected:?}");
        assert!(names.contains(&"PATH"));
    }

    #[test]
    fn runnel_oci_says_a_missing_container_does_not_exist() {
        let root = tempfile::tempdir().unwrap();
        for e in [
            embedded::delete(root.path(), "gone", true).unwrap_err(),
            embedded::kill(root.path(), "gone", "TERM").unwrap_err(),
            embedded::state(root.path(), "gone").unwrap_err(),
        ] {
            assert!(
                matches!(&e, embedded::OciError::NotFound { id } if id == "gone"),
                "{e}"
            );
            // What `runnel oci` prints for it (cli::oci), as the agent reads it.
            let stderr = format!("runnel oci: {e}\n");
            let read = CommandError::check("delete --force gone", "gone", exited(255), stderr.as_bytes());
            assert!(
                matches!(&read, Err(CommandError::NotFound { id }) if id == "gone"),
                "{read:?}"
            );
        }
    }

    #[test]
    fn other_runtime_failures_keep_status_and_stderr() {
        assert!(CommandError::check("kill c1 TERM", "c1", exited(0), b"noise").is_ok());
        let e = CommandError::check("kill c1 TERM", "c1", exited(1), b"permission denied\n").unwrap_err();
        let CommandError::Failed {
            command,
            status,
            stderr,
        } = &e
        else {
            panic!("{e:?}")
        };
        assert_eq!(
            (command.as_str(), status.code(), stderr.as_str()),
            ("kill c1 TERM", Some(1), "permission denied")
        );
        assert_eq!(
            e.to_string(),
            "`kill c1 TERM` failed (exit status: 1): permission denied"
        );
    }

    #[tokio::test]
    async fn a_runtime_that_cannot_run_says_which() {
        let root = tempfile::tempdir().unwrap();
        let missing = root.path().join("no-such-runtime");
        let e = handle(missing.clone(), &[], root.path())
            .run("c1", &["delete", "--force", "c1"])
            .await
            .unwrap_err();
        assert!(
            matches!(&e, CommandError::Spawn { program, source } if *program == missing && source.kind() == io::ErrorKind::NotFound),
            "{e:?}"
        );
    }

    /// runc, when installed (scripts/setup installs it); with `CI` set its
    /// absence fails the test.
    fn runc() -> Option<PathBuf> {
        let found = find_on_path("runc");
        if found.is_none() {
            assert!(
                std::env::var_os("CI").is_none(),
                "runc is not on PATH (scripts/setup installs it)"
            );
            eprintln!("skipped: runc is not on PATH (scripts/setup installs it)");
        }
        found
    }

    #[tokio::test]
    async fn runc_says_a_missing_container_does_not_exist() {
        let Some(runc) = runc() else { return };
        let root = tempfile::tempdir().unwrap();
        let runc = handle(runc, &[], root.path());
        for args in [["kill", "gone", "KILL"].as_slice(), &["delete", "gone"]] {
            let e = runc.run("gone", args).await.unwrap_err();
            assert!(
                matches!(&e, CommandError::NotFound { id } if id == "gone"),
                "{args:?}: {e:?}"
            );
        }
        // A forced delete of what is gone succeeds.
        runc.run("gone", &["delete", "--force", "gone"]).await.unwrap();
    }
}
