//! The embedded OCI runtime: `runnel oci ...`, a runc-compatible subset of
//! commands (`run`, `exec`, `kill`, `delete`, `state`) implemented with
//! youki's `libcontainer`. The agent runs it as a child process per
//! container operation, exactly as it runs `runc`; libcontainer `chdir`s and
//! forks, which must not happen inside the multi-threaded agent.
//!
//! What libcontainer 0.7 (built without libseccomp) leaves out, this adds:
//! the container's seccomp filter and a session keyring of its own, for
//! init and for every exec'd process ([`Sandboxed`]), and exec'd processes
//! in the container's user namespace ([`exec`] joins it first).

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use libcontainer::container::Container;
use libcontainer::container::builder::ContainerBuilder;
use libcontainer::signal::Signal;
use libcontainer::syscall::syscall::SyscallType;
use libcontainer::workload::default::DefaultExecutor;
use libcontainer::workload::{Executor, ExecutorError, ExecutorValidationError};
use nix::sys::signal::{SigSet, Signal as NixSignal};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use oci_spec::runtime::{LinuxNamespaceType, Spec};
use seccompiler::BpfProgram;

use super::seccomp;

type Result<T> = std::result::Result<T, OciError>;

/// Execs the container's process as libcontainer's default executor
/// does, last thing after libcontainer has set up namespaces, mounts,
/// user and capabilities: first a new (anonymous) session keyring, so
/// that no key of the agent's session is reachable, then the seccomp
/// filter.
#[derive(Clone)]
struct Sandboxed {
    filters: Option<Arc<Vec<BpfProgram>>>,
}

impl Executor for Sandboxed {
    fn exec(&self, spec: &Spec) -> std::result::Result<(), ExecutorError> {
        // SAFETY: KEYCTL_JOIN_SESSION_KEYRING with a null name creates and
        // joins a new anonymous keyring; no pointer is read.
        let r = unsafe {
            libc::syscall(
                libc::SYS_keyctl,
                libc::KEYCTL_JOIN_SESSION_KEYRING,
                std::ptr::null::<libc::c_char>(),
            )
        };
        if r < 0 {
            return Err(ExecutorError::Other(format!(
                "cannot join a new session keyring: {}",
                std::io::Error::last_os_error()
            )));
        }
        if let Some(filters) = &self.filters {
            seccomp::install(filters).map_err(|e| ExecutorError::Other(e.to_string()))?;
        }
        DefaultExecutor {}.exec(spec)
    }

    fn validate(&self, spec: &Spec) -> std::result::Result<(), ExecutorValidationError> {
        DefaultExecutor {}.validate(spec)
    }
}

/// The container spec in `bundle`.
fn bundle_spec(bundle: &Path) -> Result<Spec> {
    let path = bundle.join("config.json");
    Spec::load(&path).map_err(|source| OciError::Spec { path, source })
}

fn cgroups_path(spec: &Spec) -> Option<String> {
    spec.linux()
        .as_ref()
        .and_then(|l| l.cgroups_path().as_ref())
        .map(|p| p.to_string_lossy().to_string())
}

/// The executor for the spec's `linux.seccomp`: runnel's own filter or
/// none. Any other profile is refused rather than ignored.
fn executor(spec: &Spec) -> Result<Sandboxed> {
    let filters = match spec.linux().as_ref().and_then(|l| l.seccomp().as_ref()) {
        None => None,
        Some(p) if *p == seccomp::oci_profile() => Some(Arc::new(seccomp::bpf().map_err(OciError::Seccomp)?)),
        Some(_) => return Err(OciError::ForeignSeccomp),
    };
    Ok(Sandboxed { filters })
}

/// Why a `runnel oci` command failed. Printed on stderr, where the agent's
/// command runner reads it (`super::CommandError`): a missing container
/// says "does not exist", as runc says it.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error("container {id} does not exist")]
    NotFound { id: String },
    #[error("{what}: {source}")]
    Libcontainer {
        what: &'static str,
        #[source]
        source: libcontainer::error::LibcontainerError,
    },
    #[error("cannot load container {id}: {source}")]
    Load {
        id: String,
        #[source]
        source: libcontainer::error::LibcontainerError,
    },
    #[error("the container has no init pid")]
    NoInitPid,
    #[error("cannot block the signals to pass on: {0}")]
    Signals(#[source] nix::errno::Errno),
    #[error("cannot write {path}: {source}")]
    PidFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read {path}: {source}")]
    Spec {
        path: PathBuf,
        #[source]
        source: oci_spec::OciSpecError,
    },
    #[error("cannot build the seccomp filter: {0}")]
    Seccomp(#[source] seccomp::SeccompError),
    #[error(
        "linux.seccomp is not runnel's profile: the embedded runtime can apply only runnel's own \
         filter; use runtime.kind = \"runc\" for another"
    )]
    ForeignSeccomp,
    #[error(transparent)]
    Cgroup(#[from] super::cgroup::MoveError),
    #[error("cannot make the exec non-dumpable: {0}")]
    NotDumpable(#[source] std::io::Error),
    #[error("cannot open {path}: {source}")]
    OpenUserns {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot join the container's user namespace: {0}")]
    JoinUserns(#[source] nix::errno::Errno),
    #[error("waiting for the process: {0}")]
    Wait(#[source] nix::errno::Errno),
    #[error("bad signal {signal:?}: {source}")]
    BadSignal {
        signal: String,
        #[source]
        source: libcontainer::signal::SignalError<String>,
    },
}

fn err(what: &'static str) -> impl FnOnce(libcontainer::error::LibcontainerError) -> OciError {
    move |source| OciError::Libcontainer { what, source }
}

/// `run --bundle B --pid-file P ID`: creates and starts the container, then
/// stays in the foreground until its init exits, passing on SIGTERM, SIGINT
/// and SIGHUP. Deletes the container at the end. Returns init's exit code.
pub fn run(root: &Path, bundle: &Path, pid_file: &Path, id: &str) -> Result<i32> {
    // Block the signals we pass on before init exists, so none is lost.
    let mut forwarded = SigSet::empty();
    for s in [
        NixSignal::SIGTERM,
        NixSignal::SIGINT,
        NixSignal::SIGHUP,
        NixSignal::SIGCHLD,
    ] {
        forwarded.add(s);
    }
    let spec = bundle_spec(bundle)?;
    let executor = executor(&spec)?;
    let entered = match cgroups_path(&spec) {
        Some(path) => Some(super::cgroup::enter_unmanaged(&path, true)?),
        None => None,
    };
    let mut container = ContainerBuilder::new(id.to_string(), SyscallType::default())
        .with_executor(executor)
        .with_root_path(root)
        .map_err(err("invalid runtime root"))?
        .validate_id()
        .map_err(err("invalid container id"))?
        .as_init(bundle)
        .with_systemd(false)
        .with_detach(false)
        .build()
        .map_err(err("cannot create the container"))?;
    container.start().map_err(err("cannot start the container"))?;
    // This process waits for init as long as it runs: outside the job's
    // cgroups, as runc's would be.
    if let Some(e) = entered {
        e.leave()?;
    }
    let pid = container
        .pid()
        .map(|p| Pid::from_raw(p.as_raw()))
        .ok_or(OciError::NoInitPid)?;
    wait_exec(pid);
    forwarded.thread_block().map_err(OciError::Signals)?;
    let tmp = pid_file.with_extension("tmp");
    std::fs::write(&tmp, pid.to_string())
        .and_then(|_| std::fs::rename(&tmp, pid_file))
        .map_err(|source| OciError::PidFile {
            path: pid_file.to_path_buf(),
            source,
        })?;
    let code = wait_forwarding(pid, &forwarded);
    if let Err(e) = container.delete(true) {
        eprintln!("runnel oci: failed to delete container {id}: {e}");
    }
    Ok(code)
}

/// Waits (up to 10 s) until init has exec'd the container's program.
/// libcontainer's `start` returns once init is let go, before its
/// `execve`: until then init is a non-dumpable copy of this process, which
/// a step's exec, already in the job's user namespace, may not inspect (it
/// failed to stat `/proc/INIT/ns/net` with exit status 255, and left init
/// deaf to SIGTERM: one job in 20 with a network namespace of its own).
/// So the pid file, which says "started", is written only after it.
fn wait_exec(pid: Pid) {
    use std::os::unix::fs::MetadataExt;
    let Ok(me) = std::fs::metadata("/proc/self/exe") else {
        return;
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while let Ok(m) = std::fs::metadata(format!("/proc/{pid}/exe")) {
        if (m.dev(), m.ino()) != (me.dev(), me.ino()) || std::time::Instant::now() > deadline {
            return;
        }
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
}

/// Waits for `pid` (our child) to exit, passing on the signals we get.
fn wait_forwarding(pid: Pid, set: &SigSet) -> i32 {
    loop {
        match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, code)) => return code,
            Ok(WaitStatus::Signaled(_, sig, _)) => return 128 + sig as i32,
            Err(nix::errno::Errno::ECHILD) => return 0,
            _ => {}
        }
        match set.wait() {
            Ok(NixSignal::SIGCHLD) | Err(_) => {}
            Ok(sig) => {
                let _ = nix::sys::signal::kill(pid, sig);
            }
        }
    }
}

/// `exec --process P ID`: runs the process described in `P` (an OCI
/// process spec) in the container, with our stdio. Returns its exit code,
/// 128 + n when killed by signal n.
///
/// libcontainer's tenant joins every namespace of the container but the
/// user namespace, and applies no seccomp filter: this process joins the
/// user namespace itself first (it is single-threaded, as `setns` of a
/// user namespace requires), so the step's ids are the container's, and
/// the filter is the one of the container's spec.
pub fn exec(root: &Path, process: &Path, id: &str) -> Result<i32> {
    let container = load(root, id)?;
    let spec = bundle_spec(container.bundle())?;
    let executor = executor(&spec)?;
    // Until it execs, the step's process is in the container with the
    // step's uid and capabilities but without its filter: not ptrace-able
    // by the container's other processes (runc does the same).
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        return Err(OciError::NotDumpable(std::io::Error::last_os_error()));
    }
    // This process lives exactly as long as the step: it stays there too.
    if let Some(path) = cgroups_path(&spec) {
        super::cgroup::enter_unmanaged(&path, false)?;
    }
    let userns = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .is_some_and(|ns| ns.iter().any(|n| n.typ() == LinuxNamespaceType::User));
    if userns {
        let init = container.pid().ok_or(OciError::NoInitPid)?;
        let path = format!("/proc/{}/ns/user", init.as_raw());
        let ns = std::fs::File::open(&path).map_err(|source| OciError::OpenUserns { path, source })?;
        nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWUSER).map_err(OciError::JoinUserns)?;
    }
    let pid = ContainerBuilder::new(id.to_string(), SyscallType::default())
        .with_executor(executor)
        .with_root_path(root)
        .map_err(err("invalid runtime root"))?
        .validate_id()
        .map_err(err("invalid container id"))?
        .as_tenant()
        .with_detach(false)
        .with_process(Some(process))
        .build()
        .map_err(err("cannot start the process in the container"))?;
    let pid = Pid::from_raw(pid.as_raw());
    loop {
        match waitpid(pid, None) {
            Ok(WaitStatus::Exited(_, code)) => return Ok(code),
            Ok(WaitStatus::Signaled(_, sig, _)) => return Ok(128 + sig as i32),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(OciError::Wait(e)),
            Ok(_) => continue,
        }
    }
}

fn load(root: &Path, id: &str) -> Result<Container> {
    let dir: PathBuf = root.join(id);
    if !dir.exists() {
        return Err(OciError::NotFound { id: id.to_string() });
    }
    Container::load(dir).map_err(|source| OciError::Load {
        id: id.to_string(),
        source,
    })
}

/// `kill ID SIGNAL`: signals the container's init.
pub fn kill(root: &Path, id: &str, signal: &str) -> Result<()> {
    let mut c = load(root, id)?;
    let sig = Signal::try_from(signal).map_err(|source| OciError::BadSignal {
        signal: signal.to_string(),
        source,
    })?;
    c.kill(sig, false).map_err(err("cannot signal the container"))
}

/// `delete [--force] ID`.
pub fn delete(root: &Path, id: &str, force: bool) -> Result<()> {
    let mut c = load(root, id)?;
    c.delete(force).map_err(err("cannot delete the container"))
}

/// `state ID`: the container's state as JSON.
pub fn state(root: &Path, id: &str) -> Result<String> {
    let mut c = load(root, id)?;
    c.refresh_status()
        .map_err(err("cannot read the container's status"))?;
    Ok(serde_json::json!({
        "id": id,
        "status": format!("{:?}", c.status()).to_lowercase(),
        "pid": c.pid().map(|p| p.as_raw()).unwrap_or(0),
        "bundle": c.bundle(),
    })
    .to_string())
}
