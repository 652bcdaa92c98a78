//! The gRPC face of the agent: `runnel.agent.v1.Agent`, plus standard
//! health and reflection. Authenticates calls, turns requests into domain
//! types (`convert.rs`) and domain errors into statuses (here, in one
//! place). Protobuf types never travel past this module.

pub mod auth;
pub mod convert;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::job::spec::{JobSpec, SpecError};
use crate::job::{Registry, SubmitError};
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
        let stream = job.watch(r.after_seq, r.follow).map(move |e| match e {
            Ok(e) => Ok(convert::event_out(&id, e)),
            Err(e) => Err(Status::internal(format!("cannot read the job's event log: {e}"))),
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

/// Serves the agent on `listener` until `shutdown` fires, then drains:
/// health turns NOT_SERVING, new jobs are refused, running jobs get up to
/// the drain timeout to finish (or until `hurry` fires), the rest are
/// cancelled.
pub async fn serve(
    registry: Arc<Registry>,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
    hurry: CancellationToken,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let addr: SocketAddr = listener.local_addr()?;
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
    let server = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(AgentServer::new(AgentService::new(registry.clone())))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            server_stop.clone().cancelled_owned(),
        );
    tracing::info!(%addr, "runnel agent listening");
    let server = tokio::spawn(server);

    shutdown.cancelled().await;
    tracing::info!("shutting down: draining");
    registry.drain();
    health.set_not_serving::<AgentServer<AgentService>>().await;
    health
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    let drain = registry.config().drain_timeout;
    tokio::select! {
        _ = registry.wait_idle() => {}
        _ = tokio::time::sleep(drain) => tracing::warn!("drain timeout over; cancelling the jobs still running"),
        _ = hurry.cancelled() => tracing::warn!("asked again to stop; cancelling the jobs still running"),
    }
    registry.shutdown().await;
    server_stop.cancel();
    server.await??;
    Ok(())
}
