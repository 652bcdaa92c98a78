//! The gRPC face of the agent: `runnel.agent.v1.Agent`, plus standard
//! health and reflection, over TLS (optionally mutual) when configured.
//! Authenticates calls, turns requests into domain types (`convert.rs`) and
//! domain errors into statuses (here, in one place). Protobuf types never
//! travel past this module. [`serve`] owns the agent's tasks while it runs:
//! the server, the metrics endpoint and the retention sweep, and the drain.

pub mod auth;
pub mod convert;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use tonic::{Request, Response, Status};

use crate::config::TlsConfig;
use crate::job::spec::{JobSpec, SpecError};
use crate::job::{Registry, SubmitError};
use crate::logs::EventKind;
use crate::sd_notify::Notifier;
use auth::{Role, Tokens};

#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("runnel.agent.v1");

    /// For gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/runnel_descriptor.bin"));
}

use pb::agent_server::{Agent, AgentServer};

impl From<SubmitError> for Status {
    fn from(e: SubmitError) -> Status {
        match e {
            SubmitError::Busy(_) => Status::resource_exhausted(e.to_string()),
            SubmitError::Draining => Status::unavailable(e.to_string()),
            SubmitError::Internal(_) => Status::internal(e.to_string()),
        }
    }
}

impl From<SpecError> for Status {
    fn from(e: SpecError) -> Status {
        Status::invalid_argument(format!("job.{e}"))
    }
}

fn not_found(id: &str) -> Status {
    Status::not_found(format!("no job {id:?} on this agent"))
}

/// The `Agent` service over a [`Registry`].
pub struct AgentService {
    registry: Arc<Registry>,
    tokens: Tokens,
}

impl AgentService {
    pub fn new(registry: Arc<Registry>) -> Self {
        let tokens = Tokens::new(&registry.config().auth);
        AgentService { registry, tokens }
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::JobEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Agent for AgentService {
    async fn submit_job(
        &self,
        req: Request<pb::SubmitJobRequest>,
    ) -> Result<Response<pb::JobStatus>, Status> {
        self.tokens.check(&req, Role::Scheduler)?;
        let spec = req
            .into_inner()
            .job
            .ok_or_else(|| Status::invalid_argument("job: required"))?;
        let spec = JobSpec::try_from(spec)?;
        let status = self.registry.submit(spec)?;
        Ok(Response::new((&status).into()))
    }

    type WatchJobStream = EventStream;

    async fn watch_job(&self, req: Request<pb::WatchJobRequest>) -> Result<Response<EventStream>, Status> {
        self.tokens.check(&req, Role::Operator)?;
        let r = req.into_inner();
        let job = self.registry.get(&r.job_id).ok_or_else(|| not_found(&r.job_id))?;
        let id = r.job_id.clone();
        let metrics = self.registry.metrics().clone();
        let watcher = metrics.watcher();
        let stream = job.watch(r.after_seq, r.follow).map(move |e| {
            let _counted_until_the_stream_is_dropped = &watcher;
            match e {
                Ok(e) => {
                    if let EventKind::Log { data, .. } = &e.kind {
                        metrics.log_streamed(data.len());
                    }
                    Ok(convert::event_out(&id, e))
                }
                Err(e) => Err(Status::internal(format!("cannot read the job's event log: {e}"))),
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn cancel_job(
        &self,
        req: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::JobStatus>, Status> {
        self.tokens.check(&req, Role::Scheduler)?;
        let id = req.into_inner().job_id;
        let status = self.registry.cancel(&id).ok_or_else(|| not_found(&id))?;
        Ok(Response::new((&status).into()))
    }

    async fn get_job(&self, req: Request<pb::GetJobRequest>) -> Result<Response<pb::JobStatus>, Status> {
        self.tokens.check(&req, Role::Operator)?;
        let id = req.into_inner().job_id;
        let job = self.registry.get(&id).ok_or_else(|| not_found(&id))?;
        Ok(Response::new((&job.status()).into()))
    }

    async fn list_jobs(
        &self,
        req: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        self.tokens.check(&req, Role::Operator)?;
        let jobs = self.registry.list().iter().map(Into::into).collect();
        Ok(Response::new(pb::ListJobsResponse { jobs }))
    }

    async fn get_agent_info(
        &self,
        req: Request<pb::GetAgentInfoRequest>,
    ) -> Result<Response<pb::AgentInfo>, Status> {
        self.tokens.check(&req, Role::Operator)?;
        Ok(Response::new(self.registry.info().into()))
    }
}

/// Installs rustls's process-wide crypto provider: ring, the only one
/// compiled in. tonic would pick it itself, but the registry client's
/// reqwest (built without a provider of its own) only reads the process
/// default and panics in `oci_client::Client::new` if none is installed.
/// Call it before any TLS or registry client is set up; calling it again is
/// harmless.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The server side of `[tls]`.
fn server_tls(tls: &TlsConfig) -> ServerTlsConfig {
    let mut config = ServerTlsConfig::new().identity(Identity::from_pem(&tls.cert, tls.key.expose()));
    if let Some(ca) = &tls.client_ca {
        config = config.client_ca_root(Certificate::from_pem(ca));
    }
    config
}

/// Where the agent listens: bound before [`serve`], so that an address in
/// use is reported before anything else happens.
#[derive(Debug)]
pub struct Listeners {
    pub api: tokio::net::TcpListener,
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
    let addr: SocketAddr = listener.local_addr()?;
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
    let server = builder
        .add_service(health_service)
        .add_service(reflection)
        .add_service(AgentServer::new(AgentService::new(registry.clone())))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            server_stop.clone().cancelled_owned(),
        );
    let mut server = tokio::spawn(server);

    // The endpoint and the sweep stop after the drain, so both see it.
    let helpers_stop = CancellationToken::new();
    let mut helpers = tokio::task::JoinSet::new();
    let metrics_addr = match listeners.metrics {
        Some(l) => {
            let metrics_addr = l.local_addr()?;
            let r = registry.clone();
            let stop = helpers_stop.clone();
            helpers.spawn(async move {
                if let Err(e) = crate::metrics::serve(l, move || r.render_metrics(), stop).await {
                    tracing::error!(error = %e, "the metrics endpoint failed");
                }
            });
            Some(metrics_addr)
        }
        None => None,
    };
    helpers.spawn(registry.clone().keep_tidy(helpers_stop.clone()));
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
        registry.shutdown().await;
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
        drain + config.runtime.grace_period + std::time::Duration::from_secs(30),
    );
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
    notify.status("every job has ended; stopping");
    server_stop.cancel();
    helpers_stop.cancel();
    while helpers.join_next().await.is_some() {}
    server.await??;
    Ok(())
}
