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
pub mod image;
pub mod layer;
pub mod rootfs;
pub mod seccomp;
pub mod spec;
pub mod user;

use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

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
    Io { what: String, source: std::io::Error },
    #[error("the container did not start: {0}")]
    Start(String),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> RuntimeError {
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
            cgroup_parent: format!("/runnel.{digest}"),
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
            .map_err(|e| RuntimeError::Start(format!("cannot write {}: {e}", config.display())))?;
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
            .map_err(io_err(format!("cannot run {}", self.handle.program.display())))?;
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
                .map_err(|e| RuntimeError::Start(format!("cannot restrict the container's devices: {e}")))?;
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
                .ok_or_else(|| RuntimeError::Start("the init's pid file is unreadable".into()))?;
            crate::sys::netns::loopback_up(pid.as_raw())
                .map_err(|e| RuntimeError::Start(format!("cannot bring up lo: {e}")))?;
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
            if let Err(e) = self.handle.run(&["delete", "--force", &id]).await {
                tracing::warn!(container = %id, error = %e, "could not delete a leftover container");
                let _ = std::fs::remove_dir_all(entry.path());
            }
            removed.push(id);
        }
        removed
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
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.prefix).arg("--root").arg(&self.root);
        cmd.stdin(Stdio::null());
        cmd
    }

    /// Runs a short runtime command to completion; its stderr on failure.
    async fn run(&self, args: &[&str]) -> Result<(), String> {
        let out = self
            .command()
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .await
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
        }
    }

    fn command_sync(&self) -> std::process::Command {
        let mut cmd = std::process::Command::new(&self.program);
        cmd.args(&self.prefix).arg("--root").arg(&self.root);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        cmd
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
    async fn wait_started(&mut self, pid_file: &Path) -> Result<(), RuntimeError> {
        let started = Instant::now();
        let deadline = started + START_TIMEOUT;
        loop {
            if std::fs::metadata(pid_file).is_ok_and(|m| m.len() > 0) {
                return Ok(());
            }
            if let Ok(Some(status)) = self.init.try_wait() {
                let stderr = self.runtime_stderr().await;
                return Err(RuntimeError::Start(format!(
                    "the runtime exited ({status}): {stderr}"
                )));
            }
            if Instant::now() > deadline {
                return Err(RuntimeError::Start(format!(
                    "no init after {}s",
                    START_TIMEOUT.as_secs()
                )));
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

    async fn signal(&mut self, sig: nix::sys::signal::Signal) -> Result<(), String> {
        // While the runtime's foreground `run` lives it has not reaped the
        // init (its child), so the pid is still the init's: signal it
        // directly rather than through one more runtime process. (It is
        // PID 1 of the container: SIGKILL ends every process in it.)
        if let Some(pid) = self.init_pid
            && self.is_running()
        {
            return nix::sys::signal::kill(pid, sig).map_err(|e| e.to_string());
        }
        let name = sig.as_str().trim_start_matches("SIG");
        self.runtime.run(&["kill", &self.id, name]).await
    }

    /// Stops (if needed) and deletes the container.
    pub async fn remove(mut self, grace: Duration) {
        self.stop(grace).await;
        // The foreground `run` deletes the container when its init exits;
        // delete only what it left (it was killed, say).
        if self.runtime.root.join(&self.id).exists() {
            match self.runtime.run(&["delete", "--force", &self.id]).await {
                Err(e) if e.contains("does not exist") => {}
                Err(e) => tracing::warn!(container = %self.id, error = %e, "cannot delete the container"),
                Ok(()) => {}
            }
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

impl Drop for Container {
    fn drop(&mut self) {
        if !self.removed {
            // The job's task was cut short (a panic, a dropped future).
            let _ = self
                .runtime
                .command_sync()
                .args(["delete", "--force", &self.id])
                .status();
            self.remove_cgroup();
        }
    }
}
