//! The fleet: agents that pull jobs from a shared NATS JetStream work queue
//! beside the gRPC push, and publish every event of those jobs to a stream
//! that anyone may follow without knowing which agent runs a job.
//!
//! Two streams, made by the first agent that needs them: `RUNNEL_JOBS`
//! (work-queue retention, subjects `runnel.jobs.>`: a message is a
//! protobuf `JobSpec`) and `RUNNEL_EVENTS` (limits retention, subjects
//! `runnel.events.<job_id>`: a message is a protobuf `JobEvent`, masked as
//! the event log is). [`intake`] is the agent's side, the functions here
//! are what a client (`runnel submit --nats`, `runnel logs --nats`) needs
//! too. Owns the NATS connection and its streams; never touches a job's
//! internals (it speaks to [`crate::job::Registry`] and reads a job's
//! event log like any watcher).

pub mod intake;

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use futures::{FutureExt, Stream, StreamExt};

use crate::api::pb;

/// The work queue of jobs.
pub const JOBS_STREAM: &str = "RUNNEL_JOBS";
/// Every event of every job taken from the queue.
pub const EVENTS_STREAM: &str = "RUNNEL_EVENTS";
const EVENTS_SUBJECTS: &str = "runnel.events.>";
/// Headers on each published event: who ran it, and which attempt.
pub const AGENT_HEADER: &str = "Runnel-Agent";
pub const ATTEMPT_HEADER: &str = "Runnel-Attempt";

/// The subject of a job's events.
pub fn events_subject(job_id: &str) -> String {
    format!("runnel.events.{job_id}")
}

/// What went wrong talking to NATS, said for the person who runs it.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("cannot connect to NATS at {servers}: {reason}")]
    Connect { servers: String, reason: String },
    #[error("NATS JetStream: {what}: {reason}")]
    JetStream { what: String, reason: String },
}

fn js_err(what: impl Into<String>) -> impl FnOnce(&dyn std::fmt::Display) -> FleetError {
    let what = what.into();
    move |e| FleetError::JetStream {
        what,
        reason: e.to_string(),
    }
}

/// How to reach the servers.
#[derive(Debug, Clone, Default)]
pub struct Servers {
    pub urls: Vec<String>,
    pub creds_file: Option<std::path::PathBuf>,
    pub tls_ca: Option<std::path::PathBuf>,
    pub tls_client: Option<(std::path::PathBuf, std::path::PathBuf)>,
    /// The connection's name, as the servers show it.
    pub name: String,
}

impl Servers {
    /// `url`: one URL or several, comma-separated.
    pub fn from_urls(url: &str, name: &str) -> Servers {
        Servers {
            urls: url
                .split(',')
                .map(|u| u.trim().to_string())
                .filter(|u| !u.is_empty())
                .collect(),
            name: name.to_string(),
            ..Servers::default()
        }
    }

    /// Connects. With `keep_trying`, a server that is not up yet is tried
    /// again and again (an agent starts while NATS is down and pulls once
    /// it is up); otherwise the first failure is returned.
    pub async fn connect(&self, keep_trying: bool) -> Result<async_nats::Client, FleetError> {
        let fail = |reason: String| FleetError::Connect {
            servers: self.urls.join(","),
            reason,
        };
        let mut options = async_nats::ConnectOptions::new()
            .name(&self.name)
            .connection_timeout(Duration::from_secs(5))
            .max_reconnects(None)
            .event_callback(|event| async move {
                match event {
                    async_nats::Event::Connected => tracing::info!(%event, "NATS"),
                    event => tracing::warn!(%event, "NATS"),
                }
            });
        if keep_trying {
            options = options.retry_on_initial_connect();
        }
        if let Some(creds) = &self.creds_file {
            options = options.credentials_file(creds).await.map_err(|e| {
                fail(format!(
                    "cannot read the credentials file {} (intake.nats.creds_file): {e}",
                    creds.display()
                ))
            })?;
        }
        if let Some(ca) = &self.tls_ca {
            options = options.add_root_certificates(ca.clone()).require_tls(true);
        }
        if let Some((cert, key)) = &self.tls_client {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        options
            .connect(self.urls.clone())
            .await
            .map_err(|e| fail(e.to_string()))
    }
}

/// Makes the two streams unless they exist (an existing stream is used
/// as it is: its operator may have tuned it).
pub async fn ensure_streams(
    js: &jetstream::Context,
    replicas: u32,
    events_max_age: Duration,
) -> Result<(stream::Stream, stream::Stream), FleetError> {
    let jobs = js
        .get_or_create_stream(stream::Config {
            name: JOBS_STREAM.to_string(),
            description: Some("runnel: jobs waiting for an agent (protobuf JobSpec)".into()),
            subjects: vec![format!("{}>", crate::config::NATS_JOBS_PREFIX)],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            num_replicas: replicas as usize,
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        })
        .await
        .map_err(|e| js_err(format!("cannot make or find the stream {JOBS_STREAM}"))(&e))?;
    let events = js
        .get_or_create_stream(stream::Config {
            name: EVENTS_STREAM.to_string(),
            description: Some("runnel: every event of the jobs agents took from RUNNEL_JOBS".into()),
            subjects: vec![EVENTS_SUBJECTS.to_string()],
            retention: stream::RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            num_replicas: replicas as usize,
            max_age: events_max_age,
            duplicate_window: Duration::from_secs(120),
            allow_direct: true,
            ..Default::default()
        })
        .await
        .map_err(|e| js_err(format!("cannot make or find the stream {EVENTS_STREAM}"))(&e))?;
    Ok((jobs, events))
}

/// Publishes a job to `subject` (under `runnel.jobs.`). A second publish of
/// the same job id within two minutes is dropped by the stream. Returns
/// the job's sequence in the queue.
pub async fn publish_job(
    js: &jetstream::Context,
    subject: &str,
    spec: &pb::JobSpec,
) -> Result<u64, FleetError> {
    use prost::Message;
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", spec.job_id.as_str());
    let ack = js
        .publish_with_headers(subject.to_string(), headers, spec.encode_to_vec().into())
        .await
        .map_err(|e| js_err(format!("cannot publish to {subject}"))(&e))?
        .await
        .map_err(|e| {
            let what = format!("no stream took the job published to {subject}");
            let mut err = js_err(what)(&e);
            if let FleetError::JetStream { reason, .. } = &mut err {
                reason.push_str(
                    " (is an agent with [intake.nats] running? The first one makes the streams; \
                     the subject must be one an agent takes jobs from)",
                );
            }
            err
        })?;
    Ok(ack.sequence)
}

/// A job's event as published, with where it sits in the events stream.
#[derive(Debug)]
pub struct Published {
    /// The stream's sequence: where a follower resumes.
    pub stream_seq: u64,
    pub agent: String,
    pub attempt: u32,
    pub event: pb::JobEvent,
}

fn decode_event(m: &async_nats::jetstream::message::StreamMessage) -> Option<Published> {
    use prost::Message;
    let header = |name: &str| {
        m.headers
            .get(name)
            .map(|v| v.as_str().to_string())
            .unwrap_or_default()
    };
    Some(Published {
        stream_seq: m.sequence,
        agent: header(AGENT_HEADER),
        attempt: header(ATTEMPT_HEADER).parse().unwrap_or(0),
        event: pb::JobEvent::decode(m.payload.as_ref()).ok()?,
    })
}

/// Whether `event` ends the job (a final state).
pub fn is_final(event: &pb::JobEvent) -> bool {
    use pb::job_event::Event as E;
    matches!(
        &event.event,
        Some(E::State(s)) if matches!(
            pb::JobState::try_from(s.state),
            Ok(pb::JobState::Succeeded
                | pb::JobState::Failed
                | pb::JobState::Cancelled
                | pb::JobState::TimedOut
                | pb::JobState::Lost)
        )
    )
}

/// The last event published for `job_id`, if any.
pub async fn last_event(events: &stream::Stream, job_id: &str) -> Result<Option<pb::JobEvent>, FleetError> {
    use prost::Message;
    match events
        .get_last_raw_message_by_subject(&events_subject(job_id))
        .await
    {
        Ok(m) => Ok(pb::JobEvent::decode(m.payload.as_ref()).ok()),
        Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
        Err(e) => Err(js_err(format!("cannot read the last event of job {job_id}"))(&e)),
    }
}

/// Follows a job's events in the events stream from the stream sequence
/// after `after` (0: from its first), until an event ends the job (with
/// `follow`) or what is stored is read.
///
/// Each event is asked of the stream's leader by sequence ("the next
/// message of this subject at or after N", `$JS.API.STREAM.MSG.GET`), not
/// through a consumer: nothing is made on the servers, so nothing can be
/// placed on a dead one. (nats-server 2.9 puts an R1 ephemeral consumer,
/// such as an ordered one, on a random peer of the stream, dead or alive:
/// on a cluster that lost one of three nodes, a third of them were never
/// made and their request timed out.) A follower that reached the end
/// waits for the next publish on the subject (a core subscription, only a
/// wake-up: the event itself is then read from the stream) or two seconds,
/// whichever comes first. Resuming from the last sequence seen after a
/// failure (a dropped connection, a server restart, a cluster electing a
/// leader) misses nothing and gives nothing twice. Gives up after a minute
/// without reaching the stream (from the start too: a follower started
/// while a cluster elects a leader waits for it), at once if the stream is
/// not there.
pub async fn follow(
    js: &jetstream::Context,
    job_id: &str,
    after: u64,
    follow: bool,
) -> Result<impl Stream<Item = Result<Published, FleetError>> + use<>, FleetError> {
    let patience = std::time::Instant::now() + FOLLOW_PATIENCE;
    let events = with_patience(patience, "finding the events stream", || async {
        match js.get_stream(EVENTS_STREAM).await {
            Ok(s) => Ok(Ok(s)),
            // A stream that is not there will not come by waiting.
            Err(e)
                if matches!(
                    e.kind(),
                    jetstream::context::GetStreamErrorKind::JetStream(ref j)
                        if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
                ) =>
            {
                Ok(Err(e))
            }
            Err(e) => Err(e),
        }
    })
    .await
    .and_then(|r| r)
    .map_err(|e| {
        js_err(format!(
            "cannot find the stream {EVENTS_STREAM} (has an agent with [intake.nats] run yet?)"
        ))(&e)
    })?;
    let subject = events_subject(job_id);
    // Subscribed before the first read, so that no publish after it is missed.
    let wake = if follow {
        Some(
            js.client()
                .subscribe(subject.clone())
                .await
                .map_err(|e| js_err(format!("cannot follow {subject}"))(&e))?,
        )
    } else {
        None
    };
    // Where the stored events end, for a follower that does not follow.
    let stored_until = with_patience(patience, "reading the last event", || async {
        match events.get_last_raw_message_by_subject(&subject).await {
            Ok(m) => Ok(m.sequence),
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(0),
            Err(e) => Err(e),
        }
    })
    .await
    .map_err(|e| js_err(format!("cannot read the events of job {job_id}"))(&e))?;
    let follower = Follower {
        events,
        subject,
        follow,
        stored_until,
        last: after,
        wake,
        done: !follow && stored_until <= after,
    };
    Ok(futures::stream::unfold(follower, |mut f| async move {
        let item = f.next().await?;
        Some((item, f))
    })
    .boxed())
}

/// `attempt` again every half second while it fails (a cluster electing a
/// leader does not answer for a few seconds), until `deadline`.
async fn with_patience<T, E: std::fmt::Display, F: std::future::Future<Output = Result<T, E>>>(
    deadline: std::time::Instant,
    what: &str,
    mut attempt: impl FnMut() -> F,
) -> Result<T, E> {
    loop {
        match attempt().await {
            Ok(t) => return Ok(t),
            Err(e) if std::time::Instant::now() < deadline => {
                tracing::warn!(error = %e, "{what}: the events stream is out of reach; trying again");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// How long a follower keeps trying to reach the events stream.
const FOLLOW_PATIENCE: Duration = Duration::from_secs(60);
/// How long a follower at the end waits without a wake-up before it asks
/// again (a publish while the connection was down wakes no one).
const FOLLOW_POLL: Duration = Duration::from_secs(2);

struct Follower {
    events: stream::Stream,
    subject: String,
    follow: bool,
    stored_until: u64,
    /// The last stream sequence seen.
    last: u64,
    /// Publishes on the subject, with `follow`: wake-ups only.
    wake: Option<async_nats::Subscriber>,
    done: bool,
}

impl Follower {
    async fn next(&mut self) -> Option<Result<Published, FleetError>> {
        let mut failing_since: Option<std::time::Instant> = None;
        loop {
            if self.done || (!self.follow && self.last >= self.stored_until) {
                self.done = true;
                return None;
            }
            let m = match self
                .events
                .get_first_raw_message_by_subject(&self.subject, self.last + 1)
                .await
            {
                Ok(m) => m,
                Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => {
                    failing_since = None;
                    if !self.follow {
                        // The stream no longer holds what was stored (its
                        // max_age passed meanwhile).
                        self.done = true;
                        return None;
                    }
                    self.wait_for_more().await;
                    continue;
                }
                Err(e) => {
                    let e = js_err(format!("cannot follow {}", self.subject))(&e);
                    let since = *failing_since.get_or_insert_with(std::time::Instant::now);
                    if since.elapsed() > FOLLOW_PATIENCE {
                        self.done = true;
                        return Some(Err(e));
                    }
                    tracing::warn!(error = %e, after = self.last, "the events stream is out of reach; trying again");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            failing_since = None;
            if m.sequence <= self.last {
                continue;
            }
            self.last = m.sequence;
            let Some(p) = decode_event(&m) else { continue };
            self.done =
                (self.follow && is_final(&p.event)) || (!self.follow && p.stream_seq >= self.stored_until);
            return Some(Ok(p));
        }
    }

    /// Until an event is published on the subject (or a while passed).
    async fn wait_for_more(&mut self) {
        let Some(wake) = self.wake.as_mut() else {
            tokio::time::sleep(FOLLOW_POLL).await;
            return;
        };
        match tokio::time::timeout(FOLLOW_POLL, wake.next()).await {
            // Wake-ups already here are for events the next read returns too.
            Ok(Some(_)) => while let Some(Some(_)) = wake.next().now_or_never() {},
            // The subscription ended (the client closed): polling it is.
            Ok(None) => self.wake = None,
            Err(_) => {}
        }
    }
}
