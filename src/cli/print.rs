//! Printing a job's events for a person: step output as it was written
//! (stdout to stdout, stderr to stderr), the agent's own lines and step
//! boundaries on stderr.

use std::io::Write;

use crate::api::pb;
use pb::job_event::Event;

/// Prints one event. Returns the job's state when the event ends the job.
pub fn event(e: &pb::JobEvent) -> Option<pb::JobState> {
    let mut out = std::io::stdout().lock();
    let mut err = std::io::stderr().lock();
    match e.event.as_ref()? {
        Event::Log(chunk) => {
            let w: &mut dyn Write = if chunk.stream == pb::Stream::Stdout as i32 {
                &mut out
            } else {
                &mut err
            };
            let _ = w.write_all(&chunk.data);
            let _ = w.flush();
        }
        Event::StepStarted(s) => {
            let _ = writeln!(err, "runnel: ── step {} \"{}\"", s.index + 1, s.name);
        }
        Event::StepFinished(r) => {
            let secs = r
                .duration
                .map(|d| d.seconds as f64 + d.nanos as f64 / 1e9)
                .unwrap_or(0.0);
            let how = match (r.exit_code, r.signal) {
                (0, _) => "succeeded".to_string(),
                (-1, s) if s > 0 => format!("killed (signal {s})"),
                (c, _) => format!("failed: exit status {c}"),
            };
            let _ = writeln!(
                err,
                "runnel: step {} \"{}\" {how} in {secs:.2}s",
                r.index + 1,
                r.name
            );
        }
        Event::Checkout(_) => {}
        Event::State(s) => {
            let state = pb::JobState::try_from(s.state).unwrap_or(pb::JobState::Unspecified);
            if matches!(
                state,
                pb::JobState::Succeeded
                    | pb::JobState::Failed
                    | pb::JobState::Cancelled
                    | pb::JobState::TimedOut
                    | pb::JobState::Lost
            ) {
                let failure = pb::FailureKind::try_from(s.failure)
                    .map(|f| f.as_str_name().trim_start_matches("FAILURE_KIND_").to_string())
                    .unwrap_or_default();
                let name = state.as_str_name().trim_start_matches("JOB_STATE_");
                if state == pb::JobState::Succeeded {
                    let _ = writeln!(err, "runnel: job {} {name}", s.job_id);
                } else {
                    let _ = writeln!(err, "runnel: job {} {name} ({failure}): {}", s.job_id, s.message);
                }
                return Some(state);
            }
        }
    }
    None
}
