//! `runnel submit --nats` and `runnel logs --nats`: a job published to the
//! fleet's queue, and a job's events read from the fleet's events stream,
//! whichever agent runs it.

use std::path::Path;

use futures::StreamExt;

use super::{Failure, print};
use crate::api::pb;
use crate::fleet::{self, Servers};

async fn connect(url: &str) -> Result<async_nats::jetstream::Context, Failure> {
    let client = Servers::from_urls(url, "runnel client")
        .connect(false)
        .await
        .map_err(Failure::remote)?;
    Ok(async_nats::jetstream::new(client))
}

pub async fn submit(url: &str, subject: &str, job: &Path, follow: bool) -> Result<(), Failure> {
    let spec = crate::job::file::load(job).map_err(Failure::input)?;
    let js = connect(url).await?;
    let spec = pb::JobSpec::from(&spec);
    let seq = fleet::publish_job(&js, subject, &spec)
        .await
        .map_err(Failure::remote)?;
    eprintln!(
        "runnel: job {} published to {subject} (queue sequence {seq})",
        spec.job_id
    );
    if follow {
        return logs(&js, &spec.job_id, 0, true, &mut print::Printer::default()).await;
    }
    println!("{}", spec.job_id);
    Ok(())
}

pub async fn logs_cmd(
    url: &str,
    job: &str,
    after: u64,
    follow: bool,
    timestamps: bool,
) -> Result<(), Failure> {
    let js = connect(url).await?;
    logs(&js, job, after, follow, &mut print::Printer::new(timestamps)).await
}

/// Prints a job's events from the events stream (after stream sequence
/// `after`); with `follow`, until the job ends, and its exit code says
/// whether it succeeded.
async fn logs(
    js: &async_nats::jetstream::Context,
    job: &str,
    after: u64,
    follow: bool,
    printer: &mut print::Printer,
) -> Result<(), Failure> {
    let mut events = fleet::follow(js, job, after, follow)
        .await
        .map_err(Failure::remote)?;
    let mut run = None;
    let mut end = None;
    while let Some(p) = events.next().await {
        let p = p.map_err(Failure::remote)?;
        if run.as_ref() != Some(&(p.attempt, p.agent.clone())) {
            eprintln!("runnel: job {job}: attempt {} on agent {}", p.attempt, p.agent);
            run = Some((p.attempt, p.agent.clone()));
        }
        if let Some(state) = printer.event(&p.event) {
            end = Some(state);
        }
        if fleet::is_final(&p.event) && follow {
            break;
        }
    }
    if run.is_none() && !follow {
        return Err(Failure::remote(format!(
            "the events stream {} holds no event of job {job}{}: was it published to the fleet, \
             and is it younger than the stream's max age?",
            fleet::EVENTS_STREAM,
            if after > 0 {
                format!(" after sequence {after}")
            } else {
                String::new()
            },
        )));
    }
    match (follow, end) {
        (false, _) | (true, Some(pb::JobState::Succeeded)) => Ok(()),
        _ => Err(Failure::job_failed()),
    }
}
