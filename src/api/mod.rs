//! The gRPC face of the agent: `runnel.agent.v1.Agent`, plus standard
//! health and reflection, over TLS (optionally mutual) when configured.
//! Authenticates calls, turns requests into domain types (`convert.rs`) and
//! domain errors into statuses (here, in one place). Protobuf types never
//! travel past this module. Serving it (listeners, TLS, health, the drain)
//! is the daemon's (`daemon/`).

pub mod auth;
pub mod convert;

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use crate::job::{Registry, SubmitError};
use crate::model::EventKind;
use crate::model::spec::{JobSpec, SpecError};
use auth::{Role, Tokens};

#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("runnel.agent.v1");

    /// For gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/runnel_descriptor.bin"));
}

use pb::agent_server::Agent;
pub use pb::agent_server::AgentServer;

impl From<SubmitError> for Status {
    fn from(e: SubmitError) -> Status {
        match e {
            SubmitError::Busy(_) => Status::resource_exhausted(e.to_string()),
            SubmitError::Draining => Status::unavailable(e.to_string()),
            SubmitError::Internal(_) => Status::internal(e.to_string()),
            SubmitError::HostImageNotAllowed(_)
            | SubmitError::HostNetworkNotAllowed
            | SubmitError::ServicesOnHostNetwork => Status::invalid_argument(format!("job.{e}")),
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
