//! The daemon: the agent's wiring while it runs. Binds nothing itself;
//! given listeners it serves the gRPC API (with health, reflection and TLS),
//! the metrics endpoint, the retention sweep and, with `[intake.nats]`, the
//! fleet's pull intake, tells systemd when it is ready, and on shutdown
//! drains: the intake stops pulling, new jobs are refused, running jobs get
//! the drain timeout, the rest are cancelled, and the intake publishes and
//! acknowledges what it took. It owns every task it starts.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

use crate::api::{AgentServer, AgentService, pb};
use crate::config::TlsConfig;
use crate::job::Registry;
use crate::sys::sd_notify::Notifier;

/// The server side of `[tls]`.
fn server_tls(tls: &TlsConfig) -> ServerTlsConfig {
    let mut config = ServerTlsConfig::new().identity(Identity::from_pem(&tls.cert, tls.key.expose()));
    if let Some(ca) = &tls.client_ca {
        config = config.client_ca_root(Certificate::from_pem(ca));
    }
    config
}

/// The gRPC API's listener.
#[derive(Debug)]
pub enum ApiListener {
    Tcp(tokio::net::TcpListener),
    /// A Unix socket, removed when the agent stops.
    Unix(tokio::net::UnixListener, std::path::PathBuf),
}

impl ApiListener {
    /// Binds `listen`. A Unix socket's directory is made if missing; a
    /// socket left at its path (an agent that died) is replaced; it gets
    /// mode 0660 and group `runnel` when that group exists.
    pub async fn bind(listen: &crate::config::Listen) -> std::io::Result<ApiListener> {
        use std::os::unix::fs::{FileTypeExt, PermissionsExt};
        match listen {
            crate::config::Listen::Tcp(a) => Ok(ApiListener::Tcp(tokio::net::TcpListener::bind(a).await?)),
            crate::config::Listen::Unix(path) => {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                match std::fs::symlink_metadata(path) {
                    Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)?,
                    Ok(_) => {
                        return Err(std::io::Error::other(format!(
                            "{} exists and is not a socket; remove it or choose another path",
                            path.display()
                        )));
                    }
                    Err(_) => {}
                }
                let l = tokio::net::UnixListener::bind(path)?;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
                if let Ok(Some(g)) = nix::unistd::Group::from_name(crate::config::SUBORDINATE_USER) {
                    nix::unistd::chown(path, None, Some(g.gid)).map_err(std::io::Error::from)?;
                }
                Ok(ApiListener::Unix(l, path.clone()))
            }
        }
    }

    fn addr(&self) -> std::io::Result<String> {
        match self {
            ApiListener::Tcp(l) => Ok(l.local_addr()?.to_string()),
            ApiListener::Unix(_, p) => Ok(format!("unix:{}", p.display())),
        }
    }
}

/// Where the agent listens: bound before [`serve`], so that an address in
/// use is reported before anything else happens.
#[derive(Debug)]
pub struct Listeners {
    pub api: ApiListener,
    pub metrics: Option<tokio::net::TcpListener>,
}

/// Serves the agent until `shutdown` fires, then drains: health turns
/// NOT_SERVING, new jobs are refused, running jobs get up to the drain
/// timeout to finish (or until `hurry` fires), the rest are cancelled.
/// Tells `notify` when it is ready and when it stops. Runs the metrics
/// endpoint and the retention sweep meanwhile, and stops them last.
pub async fn serve(
    registry: Arc<Registry>,
    listeners: Listeners,
    notify: &Notifier,
    shutdown: CancellationToken,
    hurry: CancellationToken,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let config = registry.config();
    let listener = listeners.api;
    let addr = listener.addr()?;
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &config.tls {
        builder = builder.tls_config(server_tls(tls)).map_err(|e| {
            format!("[tls] cert and key cannot be used together (a key of another certificate?): {e}")
        })?;
    }
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<AgentServer<AgentService>>().await;
    health
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let server_stop = CancellationToken::new();
    let router = builder
        .add_service(health_service)
        .add_service(reflection)
        .add_service(AgentServer::new(AgentService::new(registry.clone())));
    let stopped = server_stop.clone().cancelled_owned();
    let mut socket = None;
    let server: futures::future::BoxFuture<'static, Result<(), tonic::transport::Error>> = match listener {
        ApiListener::Tcp(l) => Box::pin(
            router.serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(l), stopped),
        ),
        ApiListener::Unix(l, path) => {
            socket = Some(path);
            Box::pin(
                router.serve_with_incoming_shutdown(
                    tokio_stream::wrappers::UnixListenerStream::new(l),
                    stopped,
                ),
            )
        }
    };
    let mut server = tokio::spawn(server);

    // The endpoint and the sweep stop after the drain, so both see it.
    let helpers_stop = CancellationToken::new();
    let mut helpers = tokio::task::JoinSet::new();
    let metrics_addr = match listeners.metrics {
        Some(l) => {
            let metrics_addr = l.local_addr()?;
            let r = registry.clone();
            let stop = helpers_stop.clone();
            let tokens = Arc::new(config.metrics_tokens.clone());
            helpers.spawn(async move {
                if let Err(e) = serve_metrics(l, move || r.render_metrics(), tokens, stop).await {
                    tracing::error!(error = %e, "the metrics endpoint failed");
                }
            });
            Some(metrics_addr)
        }
        None => None,
    };
    helpers.spawn(keep_tidy(registry.clone(), helpers_stop.clone()));
    // The NATS intake stops taking jobs first, and ends last: once the
    // jobs it took have ended and are acknowledged.
    let intake_stop = CancellationToken::new();
    let mut intake = config.nats.clone().map(|nats| {
        tokio::spawn(crate::fleet::intake::run(
            registry.clone(),
            nats,
            intake_stop.clone(),
        ))
    });
    tracing::info!(
        %addr,
        tls = config.tls.is_some(),
        mtls = config.tls.as_ref().is_some_and(|t| t.client_ca.is_some()),
        metrics_addr = %metrics_addr.map_or_else(|| "-".to_string(), |a| a.to_string()),
        "runnel agent listening"
    );
    notify.ready(&format!("listening on {addr}"));

    let server_failed = tokio::select! {
        _ = shutdown.cancelled() => None,
        // The server stopped by itself: end everything, and fail (so that
        // the service manager restarts the agent).
        result = &mut server => Some(match result {
            Ok(Err(e)) => format!("the gRPC server stopped: {e}"),
            Ok(Ok(())) => "the gRPC server stopped".to_string(),
            Err(e) => format!("the gRPC server failed: {e}"),
        }),
    };
    if let Some(why) = server_failed {
        tracing::error!(error = %why, "stopping");
        intake_stop.cancel();
        registry.shutdown().await;
        finish_intake(intake.take()).await;
        helpers_stop.cancel();
        while helpers.join_next().await.is_some() {}
        return Err(why.into());
    }
    let running = registry.info().running_jobs;
    tracing::info!(running, "shutting down: draining");
    let drain = config.drain_timeout;
    // Time to drain, to stop the containers still running, and a margin.
    notify.stopping(
        &format!("draining: {running} jobs running"),
        drain + config.runtime.grace_period + Duration::from_secs(30),
    );
    intake_stop.cancel();
    registry.drain();
    health.set_not_serving::<AgentServer<AgentService>>().await;
    health
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    tokio::select! {
        _ = registry.wait_idle() => {}
        _ = tokio::time::sleep(drain) => tracing::warn!("drain timeout over; cancelling the jobs still running"),
        _ = hurry.cancelled() => tracing::warn!("asked again to stop; cancelling the jobs still running"),
    }
    registry.shutdown().await;
    finish_intake(intake.take()).await;
    notify.status("every job has ended; stopping");
    server_stop.cancel();
    helpers_stop.cancel();
    while helpers.join_next().await.is_some() {}
    server.await??;
    if let Some(path) = socket {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

/// How long a stopping agent waits for NATS to take the last events and
/// acknowledgements of the jobs it took from there (past that, the queue
/// gives those jobs out again after their ack wait).
const INTAKE_FINISH: Duration = Duration::from_secs(30);

/// Waits for the NATS intake to publish and settle what it took.
async fn finish_intake(intake: Option<tokio::task::JoinHandle<()>>) {
    let Some(mut intake) = intake else { return };
    tokio::select! {
        _ = &mut intake => {}
        _ = tokio::time::sleep(INTAKE_FINISH) => {
            tracing::warn!("NATS did not take the last events of the jobs in time; stopping without");
            intake.abort();
        }
    }
}

/// Serves `GET /metrics` on `listener` until `stop` fires, with what
/// `render` returns; with `tokens`, only to a request bearing one of them
/// (401 otherwise).
async fn serve_metrics(
    listener: tokio::net::TcpListener,
    render: impl Fn() -> String + Clone + Send + Sync + 'static,
    tokens: Arc<Vec<crate::model::Secret>>,
    stop: CancellationToken,
) -> std::io::Result<()> {
    use axum::http::{StatusCode, header};
    use axum::response::IntoResponse;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move |headers: axum::http::HeaderMap| {
            let (render, tokens) = (render.clone(), tokens.clone());
            async move {
                let bearer = headers
                    .get(header::AUTHORIZATION)
                    .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
                    .unwrap_or_default();
                let allowed = tokens.is_empty()
                    || tokens
                        .iter()
                        .any(|t| bool::from(subtle::ConstantTimeEq::ct_eq(t.expose(), bearer)));
                if !allowed {
                    return (
                        StatusCode::UNAUTHORIZED,
                        [(header::WWW_AUTHENTICATE, "Bearer")],
                        "a bearer token of metrics_token_file is required\n",
                    )
                        .into_response();
                }
                (
                    [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
                    render(),
                )
                    .into_response()
            }
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
}

/// Runs the retention sweep ([`Registry::sweep`]) now and then every
/// `retention.interval`, off the async threads, until `stop` fires. The
/// store's (a listing of the whole bucket, shared by the fleet) runs at
/// start and then at most every [`STORE_SWEEP_EVERY`].
const STORE_SWEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(3600);

async fn keep_tidy(registry: Arc<Registry>, stop: CancellationToken) {
    let mut store_swept: Option<tokio::time::Instant> = None;
    loop {
        let r = registry.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || r.sweep()).await {
            tracing::error!(error = %e, "the retention sweep failed");
        }
        if store_swept.is_none_or(|t| t.elapsed() >= STORE_SWEEP_EVERY) {
            store_swept = Some(tokio::time::Instant::now());
            tokio::select! {
                _ = stop.cancelled() => return,
                () = registry.sweep_store() => {}
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(registry.config().retention.interval) => {}
        }
    }
}
