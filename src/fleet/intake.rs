//! The agent's pull intake: takes jobs from the `RUNNEL_JOBS` work queue,
//! as many as it has free slots and never more, runs each through the
//! same registry as a gRPC submission, tells the queue the job is in
//! progress while it runs, publishes its events and acknowledges it when
//! it ends.
//!
//! A job whose agent dies is given out again by JetStream after
//! `ack_wait`: its delivery count is the new run's attempt (in every
//! state event, and a header of every published event). Before running a
//! redelivered job the intake reads the job's last published event: a
//! final one means an earlier attempt ended and only its acknowledgement
//! was lost, so the job is acknowledged and not run again.
//!
//! The job's event log is the buffer that survives a NATS outage: the
//! publisher is one more watcher of the log, keeps its place, and
//! publishes each event until the stream confirms it, in order (a message
//! id per job, attempt and seq lets the stream drop a copy whose
//! confirmation was lost). A job is acknowledged only after its final
//! event is in the stream.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer::PullConsumer, stream};
use futures::StreamExt;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::{AGENT_HEADER, ATTEMPT_HEADER, FleetError, JOBS_STREAM, Servers, events_subject};
use crate::api::{convert, pb};
use crate::config::NatsConfig;
use crate::job::{Accepted, Job, Registry, SubmitError};

/// How long one pull waits for jobs. Short, so that a draining agent's
/// last pull ends soon (anything it receives then goes back at once).
const FETCH_WAIT: Duration = Duration::from_secs(2);
/// The longest pause between two tries to reach NATS.
const MAX_RETRY: Duration = Duration::from_secs(2);

/// Runs the intake until `stop` fires, then waits for every job it took
/// to end and be acknowledged.
pub async fn run(registry: Arc<Registry>, config: NatsConfig, stop: CancellationToken) {
    let servers = Servers {
        urls: config.servers.clone(),
        creds_file: config.creds_file.clone(),
        tls_ca: config.tls_ca.clone(),
        tls_client: config.tls_client.clone(),
        name: format!("runnel agent {}", registry.config().agent_id),
    };
    let client = match servers.connect(true).await {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "the NATS intake cannot start; jobs come over gRPC only");
            return;
        }
    };
    let js = jetstream::new(client.clone());
    let Some((consumers, jobs, events)) = set_up(&js, &config, &stop).await else {
        return;
    };
    let lost = tokio::spawn(end_lost_jobs(
        client.clone(),
        js.clone(),
        jobs,
        registry.config().agent_id.clone(),
        stop.clone(),
    ));
    tracing::info!(subjects = ?config.subjects, servers = ?config.servers, "taking jobs from NATS");
    let intake = Intake {
        taker: Taker {
            registry,
            js,
            events,
            ack_wait: config.ack_wait,
            waiting: Arc::default(),
        },
        jobs: JoinSet::new(),
    };
    intake.pull(consumers, stop).await;
    let _ = lost.await;
}

/// The streams and a durable consumer per subject; tried again until they
/// are there or `stop` fires.
async fn set_up(
    js: &jetstream::Context,
    config: &NatsConfig,
    stop: &CancellationToken,
) -> Option<(Vec<PullConsumer>, stream::Stream, stream::Stream)> {
    let mut retry = Duration::from_millis(100);
    loop {
        match try_set_up(js, config).await {
            Ok(done) => return Some(done),
            Err(e) => tracing::warn!(error = %e, "the NATS intake is not ready; trying again"),
        }
        tokio::select! {
            _ = stop.cancelled() => return None,
            _ = tokio::time::sleep(retry) => {}
        }
        retry = (retry * 2).min(MAX_RETRY);
    }
}

async fn try_set_up(
    js: &jetstream::Context,
    config: &NatsConfig,
) -> Result<(Vec<PullConsumer>, stream::Stream, stream::Stream), FleetError> {
    use jetstream::consumer::{AckPolicy, pull};
    let (jobs, events) = super::ensure_streams(js, config.replicas, config.events_max_age).await?;
    let mut consumers = Vec::new();
    for subject in &config.subjects {
        // One durable consumer per subject, shared by every agent that
        // takes jobs from it.
        let name = subject.replace('.', "_");
        let consumer = jobs
            .get_or_create_consumer(
                &name,
                pull::Config {
                    durable_name: Some(name.clone()),
                    description: Some(format!("runnel agents taking jobs from {subject}")),
                    filter_subject: subject.clone(),
                    ack_policy: AckPolicy::Explicit,
                    ack_wait: config.ack_wait,
                    max_deliver: i64::from(config.max_deliver),
                    max_ack_pending: 10_000,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| FleetError::JetStream {
                what: format!("cannot make or find the consumer {name} of {JOBS_STREAM}"),
                reason: e.to_string(),
            })?;
        consumers.push(consumer);
    }
    Ok((consumers, jobs, events))
}

struct Intake {
    taker: Taker,
    /// A task per message taken: its slot, then the job's progress, events
    /// and final acknowledgement.
    jobs: JoinSet<()>,
}

/// What a message's task needs.
#[derive(Clone)]
struct Taker {
    registry: Arc<Registry>,
    js: jetstream::Context,
    events: stream::Stream,
    ack_wait: Duration,
    /// Messages in hand that wait for a slot (a gRPC submission took the
    /// one they were asked for): the next pull asks for that many fewer.
    waiting: Arc<AtomicU32>,
}

/// A message counted in [`Taker::waiting`] until dropped.
struct Waiting(Arc<AtomicU32>);

impl Waiting {
    fn new(count: &Arc<AtomicU32>) -> Waiting {
        count.fetch_add(1, Ordering::SeqCst);
        Waiting(count.clone())
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Intake {
    async fn pull(mut self, consumers: Vec<PullConsumer>, stop: CancellationToken) {
        let mut next = 0usize;
        let mut retry = Duration::from_millis(100);
        while !stop.is_cancelled() {
            while self.jobs.try_join_next().is_some() {}
            let info = self.taker.registry.info();
            let waiting = self.taker.waiting.load(Ordering::SeqCst);
            let free = (info.max_jobs - info.running_jobs).saturating_sub(waiting);
            if free == 0 || info.draining {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = self.taker.registry.slot_freed() => {}
                    // A draining registry frees no slot for us: look again now and then.
                    _ = tokio::time::sleep(FETCH_WAIT) => {}
                }
                continue;
            }
            let consumer = &consumers[next % consumers.len()];
            next += 1;
            // A pull that waits (up to FETCH_WAIT) for up to `free` jobs,
            // each handed on as it comes.
            let batch = consumer
                .batch()
                .max_messages(free as usize)
                .expires(FETCH_WAIT)
                .messages()
                .await;
            let mut batch = match batch {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot ask NATS for jobs; trying again");
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(retry) => {}
                    }
                    retry = (retry * 2).min(MAX_RETRY);
                    continue;
                }
            };
            retry = Duration::from_millis(100);
            // The pull runs to its end even after `stop`: what it brings
            // then goes back to the queue at once.
            while let Some(m) = batch.next().await {
                match m {
                    Ok(m) if stop.is_cancelled() => {
                        if let Err(e) = m.ack_with(AckKind::Nak(None)).await {
                            tracing::warn!(error = %e, "cannot give a job back to the queue");
                        }
                    }
                    Ok(m) => {
                        // Each message in a task of its own: one that waits
                        // for a slot holds up no other.
                        let (taker, stop) = (self.taker.clone(), stop.clone());
                        let waiting = Waiting::new(&taker.waiting);
                        self.jobs
                            .spawn(async move { taker.take(m, &stop, waiting).await });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "a pull for jobs failed");
                        break;
                    }
                }
            }
        }
        tracing::info!(
            jobs = self.jobs.len(),
            "the NATS intake stopped taking jobs; finishing those it took"
        );
        while self.jobs.join_next().await.is_some() {}
    }
}

impl Taker {
    /// Runs one message's job, or says why not and settles the message.
    async fn take(self, m: jetstream::Message, stop: &CancellationToken, waiting: Waiting) {
        use prost::Message as _;
        let (delivered, stream_seq) = match m.info() {
            Ok(i) => (u32::try_from(i.delivered).unwrap_or(u32::MAX), i.stream_sequence),
            Err(e) => {
                tracing::warn!(error = %e, "a message without JetStream's delivery information; ignored");
                return;
            }
        };
        let (message, acker) = m.split();
        let spec = match pb::JobSpec::decode(message.payload.as_ref()) {
            Ok(s) => s,
            Err(e) => {
                let why = format!("not a protobuf runnel.agent.v1.JobSpec: {e}");
                tracing::warn!(subject = %message.subject, stream_seq, reason = %why, "terminated a malformed job message");
                terminate(&acker).await;
                return;
            }
        };
        let job_id = spec.job_id.clone();
        let spec = match crate::model::JobSpec::try_from(spec) {
            Ok(s) => s,
            Err(e) => {
                let why = format!("the job is not valid: {e}");
                self.refuse(&acker, &job_id, delivered, pb::FailureKind::BadSpec, &why)
                    .await;
                return;
            }
        };
        if delivered > 1 {
            match super::last_event(&self.events, &job_id).await {
                Ok(Some(e)) if super::is_final(&e) => {
                    tracing::info!(
                        job_id,
                        attempt = delivered,
                        "an earlier attempt of this job ended; acknowledging it"
                    );
                    settle(&acker, AckKind::Ack).await;
                    return;
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(job_id, error = %e, "cannot read the job's last event; running it"),
            }
        }
        let Some(reservation) = self.reserve(&acker, stop).await else {
            settle(&acker, AckKind::Nak(None)).await;
            return;
        };
        drop(waiting);
        match self.registry.submit_attempt(spec, delivered, reservation) {
            Ok(Accepted::Started(job)) => {
                let work = JobWork {
                    job,
                    acker,
                    js: self.js.clone(),
                    agent: self.registry.config().agent_id.clone(),
                    attempt: delivered,
                    progress_every: self.ack_wait / 3,
                };
                work.run().await;
            }
            Ok(Accepted::Known(job)) if !job.status().state.is_final() => {
                // Runs here already (its earlier delivery is kept in
                // progress by its own task).
                tracing::info!(job_id, "a job given out again runs here already");
            }
            Ok(Accepted::Known(_)) => {
                tracing::info!(
                    job_id,
                    attempt = delivered,
                    "this agent already ran a job of this id; as with SubmitJob, it is not run again"
                );
                settle(&acker, AckKind::Ack).await;
            }
            Err(SubmitError::Draining) => settle(&acker, AckKind::Nak(None)).await,
            Err(e @ (SubmitError::Internal(_) | SubmitError::Busy(_))) => {
                tracing::error!(job_id, error = %e, "cannot take a job from NATS; giving it back");
                settle(&acker, AckKind::Nak(Some(Duration::from_secs(5)))).await;
            }
            Err(e) => {
                let why = e.to_string();
                self.refuse(&acker, &job_id, delivered, pb::FailureKind::BadSpec, &why)
                    .await;
            }
        }
    }

    /// A slot for a job in hand. The intake asks for no more jobs than it
    /// has free slots, but a gRPC submission may take one meanwhile: then
    /// the job waits here (kept in progress) for the next free slot.
    /// `None` when the agent stops first.
    async fn reserve(
        &self,
        acker: &jetstream::message::Acker,
        stop: &CancellationToken,
    ) -> Option<crate::job::Reservation> {
        loop {
            if let Some(r) = self.registry.reserve() {
                return Some(r);
            }
            if stop.is_cancelled() || self.registry.info().draining {
                return None;
            }
            let _ = acker.ack_with(AckKind::Progress).await;
            tokio::select! {
                _ = stop.cancelled() => return None,
                _ = self.registry.slot_freed() => {}
                _ = tokio::time::sleep(self.ack_wait / 3) => {}
            }
        }
    }

    /// Ends a job the agent will not run: its final state (FAILED, with
    /// why) is published, and the message terminated, never redelivered.
    async fn refuse(
        &self,
        acker: &jetstream::message::Acker,
        job_id: &str,
        attempt: u32,
        failure: pb::FailureKind,
        why: &str,
    ) {
        tracing::warn!(job_id, reason = %why, "terminated a job message");
        let agent = &self.registry.config().agent_id;
        let end = End {
            state: crate::model::JobState::Failed,
            failure,
            why,
        };
        publish_end(&self.js, agent, job_id, attempt, end, Some(acker)).await;
        terminate(acker).await;
    }
}

/// How a job the agent does not run ends.
struct End<'a> {
    state: crate::model::JobState,
    failure: pb::FailureKind,
    why: &'a str,
}

/// Publishes the final state of a job that ran nowhere (a refused message,
/// a job given out `max_deliver` times), as its only event of this attempt.
async fn publish_end(
    js: &jetstream::Context,
    agent: &str,
    job_id: &str,
    attempt: u32,
    end: End<'_>,
    acker: Option<&jetstream::message::Acker>,
) {
    if crate::model::spec::validate_job_id(job_id).is_err() {
        return;
    }
    let mut status = crate::model::JobStatus::new(job_id.to_string());
    status.state = end.state;
    status.message = end.why.to_string();
    status.finished = Some(std::time::SystemTime::now());
    status.attempt = attempt;
    status.last_seq = 1;
    let mut event = convert::event_out(
        job_id,
        crate::model::Event {
            seq: 1,
            time: std::time::SystemTime::now(),
            kind: crate::model::EventKind::State(status),
        },
    );
    if let Some(pb::job_event::Event::State(s)) = event.event.as_mut() {
        s.failure = end.failure as i32;
    }
    let publisher = Publisher {
        js: js.clone(),
        subject: events_subject(job_id),
        agent: agent.to_string(),
        attempt,
        job_id: job_id.to_string(),
        id_tag: "end",
    };
    publisher.publish(&event, acker).await;
}

/// Ends LOST the jobs JetStream gave out `max_deliver` times without an
/// acknowledgement: its advisory comes to one agent of the queue group,
/// which publishes the job's final state and removes the message. Runs
/// until `stop` fires.
async fn end_lost_jobs(
    client: async_nats::Client,
    js: jetstream::Context,
    jobs: stream::Stream,
    agent: String,
    stop: CancellationToken,
) {
    #[derive(serde::Deserialize)]
    struct MaxDeliveries {
        stream_seq: u64,
        deliveries: u32,
    }
    let subject = format!("$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{JOBS_STREAM}.*");
    let mut advisories = match client.queue_subscribe(subject, "runnel-lost".into()).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot subscribe to JetStream's max-deliveries advisories: jobs given out max_deliver times will not be ended LOST");
            return;
        }
    };
    loop {
        let m = tokio::select! {
            _ = stop.cancelled() => return,
            m = advisories.next() => match m { Some(m) => m, None => return },
        };
        let Ok(a) = serde_json::from_slice::<MaxDeliveries>(&m.payload) else {
            continue;
        };
        let job_id = match jobs.get_raw_message(a.stream_seq).await {
            Ok(raw) => {
                use prost::Message as _;
                match pb::JobSpec::decode(raw.payload.as_ref()) {
                    Ok(spec) => spec.job_id,
                    Err(_) => String::new(),
                }
            }
            Err(e) => {
                tracing::warn!(stream_seq = a.stream_seq, error = %e, "cannot read a job given out max_deliver times");
                continue;
            }
        };
        let why = format!(
            "the job was given out {} times (intake.nats.max_deliver) and no agent finished it: each \
             agent that took it died or lost contact with NATS for longer than the ack wait. Publish \
             it again to retry",
            a.deliveries
        );
        tracing::warn!(
            job_id,
            deliveries = a.deliveries,
            "a job given out max_deliver times ends LOST"
        );
        let end = End {
            state: crate::model::JobState::Lost,
            failure: pb::FailureKind::Agent,
            why: &why,
        };
        publish_end(&js, &agent, &job_id, a.deliveries, end, None).await;
        if let Err(e) = jobs.delete_message(a.stream_seq).await {
            tracing::warn!(job_id, error = %e, "cannot remove a LOST job from the queue");
        }
    }
}

async fn terminate(acker: &jetstream::message::Acker) {
    settle(acker, AckKind::Term).await;
}

/// Settles a message; the server's answer is awaited (an ack that is
/// lost would run the job again), tried a few times.
async fn settle(acker: &jetstream::message::Acker, kind: AckKind) {
    for _ in 0..5 {
        let kind = match &kind {
            AckKind::Nak(d) => AckKind::Nak(*d),
            AckKind::Ack => AckKind::Ack,
            AckKind::Term => AckKind::Term,
            AckKind::Progress => AckKind::Progress,
            AckKind::Next => AckKind::Next,
        };
        let result = match kind {
            AckKind::Ack | AckKind::Term => acker.double_ack_with(kind).await,
            kind => acker.ack_with(kind).await,
        };
        match result {
            Ok(()) => return,
            Err(e) => tracing::warn!(error = %e, "cannot settle a job message with NATS; trying again"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Publishes a job's events to its subject, each until the stream has it.
struct Publisher {
    js: jetstream::Context,
    subject: String,
    agent: String,
    attempt: u32,
    job_id: String,
    /// Tells the message ids of a run's events from those of an end
    /// published for a job that did not run (the stream drops a message
    /// whose id it saw in the last two minutes).
    id_tag: &'static str,
}

impl Publisher {
    /// Publishes `event`, trying again (and keeping the job in progress
    /// meanwhile) until the stream confirms it.
    async fn publish(&self, event: &pb::JobEvent, acker: Option<&jetstream::message::Acker>) {
        use prost::Message;
        let payload = event.encode_to_vec();
        let mut retry = Duration::from_millis(50);
        let mut warned = false;
        loop {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(
                "Nats-Msg-Id",
                format!("{}:{}:{}{}", self.job_id, self.attempt, self.id_tag, event.seq).as_str(),
            );
            headers.insert(AGENT_HEADER, self.agent.as_str());
            headers.insert(ATTEMPT_HEADER, self.attempt.to_string().as_str());
            let sent = match self
                .js
                .publish_with_headers(self.subject.clone(), headers, payload.clone().into())
                .await
            {
                Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match sent {
                Ok(()) => {
                    if warned {
                        tracing::info!(job_id = %self.job_id, seq = event.seq, "publishing the job's events again");
                    }
                    return;
                }
                Err(e) if !warned => {
                    warned = true;
                    tracing::warn!(job_id = %self.job_id, seq = event.seq, error = %e, "cannot publish the job's events; they wait in its event log");
                }
                Err(_) => {}
            }
            if let Some(acker) = acker {
                let _ = acker.ack_with(AckKind::Progress).await;
            }
            tokio::time::sleep(retry).await;
            retry = (retry * 2).min(MAX_RETRY);
        }
    }
}

/// One job taken from the queue, while it runs and until it is settled.
struct JobWork {
    job: Arc<Job>,
    acker: jetstream::message::Acker,
    js: jetstream::Context,
    agent: String,
    attempt: u32,
    progress_every: Duration,
}

impl JobWork {
    async fn run(self) {
        let publisher = Publisher {
            js: self.js.clone(),
            subject: events_subject(&self.job.id),
            agent: self.agent.clone(),
            attempt: self.attempt,
            job_id: self.job.id.clone(),
            id_tag: "",
        };
        let mut events = std::pin::pin!(self.job.watch(0, true));
        let mut progress = tokio::time::interval(self.progress_every);
        progress.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                e = events.next() => match e {
                    Some(Ok(e)) => {
                        let event = convert::event_out(&self.job.id, e);
                        publisher.publish(&event, Some(&self.acker)).await;
                    }
                    Some(Err(e)) => {
                        tracing::error!(job_id = %self.job.id, error = %e, "cannot read the job's event log to publish it");
                        break;
                    }
                    None => break,
                },
                _ = progress.tick() => {
                    if let Err(e) = self.acker.ack_with(AckKind::Progress).await {
                        tracing::debug!(job_id = %self.job.id, error = %e, "cannot tell NATS the job is in progress");
                    }
                }
            }
        }
        settle(&self.acker, AckKind::Ack).await;
        tracing::info!(job_id = %self.job.id, attempt = self.attempt, state = ?self.job.status().state, "acknowledged a job taken from NATS");
    }
}
