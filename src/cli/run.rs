//! `runnel agent` (the daemon) and `runnel run` (one job, locally).

use std::path::{Path, PathBuf};

use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use super::{Failure, print};
use crate::api::{self, convert};
use crate::config::Config;
use crate::daemon;
use crate::job::{Registry, SubmitError};
use crate::sys::sd_notify::Notifier;

/// Fires `first` on the first SIGTERM or SIGINT and `second` on the next.
fn on_signals(first: CancellationToken, second: CancellationToken) -> Result<(), Failure> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(Failure::internal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(Failure::internal)?;
    tokio::spawn(async move {
        for token in [first, second] {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            token.cancel();
        }
    });
    Ok(())
}

pub async fn agent(config: Config, notify: Notifier) -> Result<(), Failure> {
    if config.auth.scheduler_tokens.is_empty() {
        tracing::warn!(
            "no scheduler token is configured ([auth] scheduler_tokens_file): every SubmitJob will be refused"
        );
    }
    let bind = |key: &'static str, addr: std::net::SocketAddr| async move {
        tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| Failure::internal(format!("cannot listen on {addr} (config key `{key}`): {e}")))
    };
    let api = daemon::ApiListener::bind(&config.listen).await.map_err(|e| {
        Failure::internal(format!(
            "cannot listen on {} (config key `listen`): {e}",
            config.listen
        ))
    })?;
    let metrics = match config.metrics_listen {
        Some(addr) => Some(bind("metrics_listen", addr).await?),
        None => None,
    };
    let registry = Registry::open(config).await.map_err(Failure::internal)?;
    let (shutdown, hurry) = (CancellationToken::new(), CancellationToken::new());
    on_signals(shutdown.clone(), hurry.clone())?;
    daemon::serve(
        registry,
        daemon::Listeners { api, metrics },
        &notify,
        shutdown,
        hurry,
    )
    .await
    .map_err(|e| Failure::internal(format!("the server failed: {e}")))
}

pub async fn local(job: &Path, config: Option<PathBuf>, state_dir: Option<PathBuf>) -> Result<(), Failure> {
    let spec = crate::job::file::load(job).map_err(Failure::input)?;
    let mut config = Config::load(config.as_deref()).map_err(Failure::input)?;
    let _tmp = match state_dir {
        Some(dir) => {
            config.state_dir = std::path::absolute(&dir).map_err(Failure::input)?;
            None
        }
        None => {
            let tmp = tempfile::Builder::new()
                .prefix("runnel-run.")
                .tempdir()
                .map_err(|e| Failure::internal(format!("cannot create a state directory: {e}")))?;
            config.state_dir = tmp.path().to_path_buf();
            Some(tmp)
        }
    };
    config.max_jobs = 1;
    let registry = Registry::open(config).await.map_err(Failure::internal)?;
    let id = spec.job_id.clone();
    registry.submit(spec).map_err(|e| match e {
        SubmitError::HostImageNotAllowed(_)
        | SubmitError::HostNetworkNotAllowed
        | SubmitError::ServicesOnHostNetwork => Failure::input(e),
        e => Failure::internal(e),
    })?;
    let job = registry.get(&id).expect("a submitted job is registered");

    let stop = CancellationToken::new();
    on_signals(stop.clone(), CancellationToken::new())?;
    let mut events = Box::pin(job.watch(0, true));
    let mut end = None;
    let mut cancelling = false;
    loop {
        tokio::select! {
            e = events.next() => match e {
                Some(Ok(e)) => {
                    if let Some(state) = print::event(&convert::event_out(&id, e)) {
                        end = Some(state);
                    }
                }
                Some(Err(e)) => return Err(Failure::internal(format!("cannot read the job's events: {e}"))),
                None => break,
            },
            _ = stop.cancelled(), if !cancelling => {
                cancelling = true;
                eprintln!("runnel: cancelling job {id}");
                registry.cancel(&id);
            }
        }
    }
    registry.shutdown().await;
    match end {
        Some(api::pb::JobState::Succeeded) => Ok(()),
        Some(_) => Err(Failure::job_failed()),
        None => Err(Failure::internal(
            "the job's event log ended without a final state",
        )),
    }
}
