//! The embedded OCI runtime: `runnel oci ...`, a runc-compatible subset of
//! commands (`run`, `exec`, `kill`, `delete`, `state`) implemented with
//! youki's `libcontainer`. The agent runs it as a child process per
//! container operation, exactly as it runs `runc`; libcontainer `chdir`s and
//! forks, which must not happen inside the multi-threaded agent.

use std::path::{Path, PathBuf};

use libcontainer::container::Container;
use libcontainer::container::builder::ContainerBuilder;
use libcontainer::signal::Signal;
use libcontainer::syscall::syscall::SyscallType;
use nix::sys::signal::{SigSet, Signal as NixSignal};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

type Result<T> = std::result::Result<T, OciError>;

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
    let mut container = ContainerBuilder::new(id.to_string(), SyscallType::default())
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
    let pid = container
        .pid()
        .map(|p| Pid::from_raw(p.as_raw()))
        .ok_or(OciError::NoInitPid)?;
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
pub fn exec(root: &Path, process: &Path, id: &str) -> Result<i32> {
    let pid = ContainerBuilder::new(id.to_string(), SyscallType::default())
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
