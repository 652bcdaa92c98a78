//! Printing a job's events for a person: step output as it was written
//! (stdout to stdout, stderr to stderr), the agent's own lines and step
//! boundaries on stderr.

use std::io::Write;

use crate::api::pb;
use pb::job_event::Event;

/// Prints one event. Returns the job's state when the event ends the job.
pub fn event(e: &pb::JobEvent) -> Option<pb::JobState> {
    Printer::default().event(e)
}

/// Prints events, optionally each line with the time the agent read it.
#[derive(Debug, Default)]
pub struct Printer {
    timestamps: bool,
    /// Per stream: the last chunk ended mid-line.
    mid_line: [bool; 4],
}

impl Printer {
    pub fn new(timestamps: bool) -> Printer {
        Printer {
            timestamps,
            ..Printer::default()
        }
    }

    /// Prints one event. Returns the job's state when the event ends the
    /// job.
    pub fn event(&mut self, e: &pb::JobEvent) -> Option<pb::JobState> {
        if let Some(Event::Log(chunk)) = e.event.as_ref() {
            let stdout = chunk.stream == pb::Stream::Stdout as i32;
            let data = if self.timestamps {
                let slot = (chunk.stream.clamp(0, 3)) as usize;
                let when = e
                    .time
                    .and_then(|t| std::time::SystemTime::try_from(t).ok())
                    .map(|t| humantime::format_rfc3339_millis(t).to_string())
                    .unwrap_or_default();
                stamp(&chunk.data, &when, &mut self.mid_line[slot])
            } else {
                chunk.data.clone()
            };
            let (mut out, mut err) = (std::io::stdout().lock(), std::io::stderr().lock());
            let w: &mut dyn Write = if stdout { &mut out } else { &mut err };
            let _ = w.write_all(&data);
            let _ = w.flush();
            return None;
        }
        print_other(e)
    }
}

/// `data` with `when ` at the start of each line (`mid_line`: the last
/// chunk of this stream did not end its line).
fn stamp(data: &[u8], when: &str, mid_line: &mut bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 32);
    for line in data.split_inclusive(|b| *b == b'\n') {
        if !*mid_line {
            out.extend_from_slice(when.as_bytes());
            out.push(b' ');
        }
        out.extend_from_slice(line);
        *mid_line = !line.ends_with(b"\n");
    }
    out
}

fn print_other(e: &pb::JobEvent) -> Option<pb::JobState> {
    let mut err = std::io::stderr().lock();
    match e.event.as_ref()? {
        Event::Log(_) => {}
        Event::StepStarted(s) => {
            let _ = writeln!(err, "runnel: ── step {} \"{}\"", s.index + 1, s.name);
        }
        Event::StepFinished(r) => {
            if r.started.is_some() {
                let _ = writeln!(
                    err,
                    "runnel: step {} \"{}\" {} in {:.2}s",
                    r.index + 1,
                    r.name,
                    how(r),
                    seconds(r)
                );
            }
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
                if !s.steps.is_empty() {
                    let _ = err.write_all(steps_table(&s.steps).as_bytes());
                }
                if let Some(t) = &s.test_results {
                    let _ = err.write_all(test_results(t).as_bytes());
                }
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

fn seconds(r: &pb::StepResult) -> f64 {
    r.duration
        .map(|d| d.seconds as f64 + d.nanos as f64 / 1e9)
        .unwrap_or(0.0)
}

/// How a step ended, in a few words.
fn how(r: &pb::StepResult) -> String {
    let ended = match (r.exit_code, r.signal) {
        (0, _) => "succeeded".to_string(),
        (-1, s) if s > 0 => format!("killed (signal {s})"),
        (c, _) => format!("failed: exit status {c}"),
    };
    match (r.started.is_some(), r.note.as_str()) {
        (false, note) => note.to_string(),
        (true, "") => ended,
        (true, note) if r.background && r.exit_code == -1 && r.signal == 0 => note.to_string(),
        (true, note) => format!("{ended} ({note})"),
    }
}

/// The job's steps, one line each: when each ran, how it ended, how long
/// it took.
pub fn steps_table(steps: &[pb::StepResult]) -> String {
    let when = |r: &pb::StepResult| {
        pb::StepWhen::try_from(r.when)
            .ok()
            .filter(|w| *w != pb::StepWhen::Unspecified)
            .map_or("on_success".to_string(), |w| {
                w.as_str_name().trim_start_matches("STEP_WHEN_").to_lowercase()
            })
    };
    let name = |r: &pb::StepResult| {
        if r.background {
            format!("{} (background)", r.name)
        } else {
            r.name.clone()
        }
    };
    let width = steps
        .iter()
        .map(|r| name(r).chars().count())
        .max()
        .unwrap_or(4)
        .max(4);
    let mut out = format!(
        "runnel: {:>3}  {:<width$}  {:<10}  {:>8}  result\n",
        "#", "step", "when", "time"
    );
    for r in steps {
        let time = if r.started.is_some() {
            format!("{:.2}s", seconds(r))
        } else {
            "-".to_string()
        };
        out.push_str(&format!(
            "runnel: {:>3}  {:<width$}  {:<10}  {:>8}  {}\n",
            r.index + 1,
            name(r),
            when(r),
            time,
            how(r)
        ));
    }
    out
}

/// A job's test results: the totals, each failed test with its message,
/// and the result files that could not be read.
pub fn test_results(t: &pb::TestResults) -> String {
    let passed = t
        .tests
        .saturating_sub(t.failures)
        .saturating_sub(t.errors)
        .saturating_sub(t.skipped);
    let mut out = format!(
        "runnel: tests: {} run, {passed} passed, {} failed, {} errors, {} skipped ({} result file{})\n",
        t.tests,
        t.failures,
        t.errors,
        t.skipped,
        t.files,
        if t.files == 1 { "" } else { "s" }
    );
    for f in &t.failed {
        let name = match (f.classname.is_empty(), f.suite.is_empty()) {
            (false, _) => format!("{}.{}", f.classname, f.name),
            (true, false) => format!("{} {}", f.suite, f.name),
            (true, true) => f.name.clone(),
        };
        let message = f.message.lines().next().unwrap_or_default();
        out.push_str(&format!("runnel:   FAILED {name}: {message}\n"));
    }
    let named = t.failed.len() as u32;
    let all = t.failures.saturating_add(t.errors);
    if all > named {
        out.push_str(&format!("runnel:   ... and {} more\n", all - named));
    }
    for u in &t.unreadable {
        out.push_str(&format!("runnel:   unreadable: {u}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_start_every_line_and_only_lines() {
        let mut mid = false;
        assert_eq!(stamp(b"a\nb", "T1", &mut mid), b"T1 a\nT1 b");
        assert!(mid);
        assert_eq!(stamp(b"c\nd\n", "T2", &mut mid), b"c\nT2 d\n");
        assert!(!mid);
    }

    #[test]
    fn the_steps_table_says_when_each_ran_how_it_ended_and_how_long_it_took() {
        let started = Some(prost_types::Timestamp::default());
        let d = |ms: i32| {
            Some(prost_types::Duration {
                seconds: 0,
                nanos: ms * 1_000_000,
            })
        };
        let steps = [
            pb::StepResult {
                index: 0,
                name: "build".into(),
                exit_code: 2,
                duration: d(250),
                started,
                ..Default::default()
            },
            pb::StepResult {
                index: 1,
                name: "deploy".into(),
                exit_code: -1,
                note: "skipped: an earlier step failed (when = on_success)".into(),
                ..Default::default()
            },
            pb::StepResult {
                index: 2,
                name: "logs".into(),
                when: pb::StepWhen::Always as i32,
                duration: d(10),
                started,
                ..Default::default()
            },
            pb::StepResult {
                index: 3,
                name: "db".into(),
                exit_code: -1,
                background: true,
                duration: d(500),
                started,
                note: "running at the end of the job's steps: stopped with the container".into(),
                ..Default::default()
            },
        ];
        assert_eq!(
            steps_table(&steps),
            "runnel:   #  step             when            time  result\n\
             runnel:   1  build            on_success     0.25s  failed: exit status 2\n\
             runnel:   2  deploy           on_success         -  skipped: an earlier step failed (when = on_success)\n\
             runnel:   3  logs             always         0.01s  succeeded\n\
             runnel:   4  db (background)  on_success     0.50s  running at the end of the job's steps: stopped with the container\n"
        );
    }

    #[test]
    fn test_results_print_totals_each_failure_and_what_was_unreadable() {
        let t = pb::TestResults {
            tests: 205,
            failures: 2,
            errors: 1,
            skipped: 2,
            failed: vec![
                pb::TestFailure {
                    suite: "unit".into(),
                    classname: "a.B".into(),
                    name: "subtracts".into(),
                    message: "expected 1, got 2\nmore".into(),
                    file: "r.xml".into(),
                },
                pb::TestFailure {
                    suite: "unit".into(),
                    name: "divides".into(),
                    message: "division by zero".into(),
                    ..Default::default()
                },
            ],
            files: 2,
            unreadable: vec!["bad.xml: is not XML".into()],
        };
        assert_eq!(
            test_results(&t),
            "runnel: tests: 205 run, 200 passed, 2 failed, 1 errors, 2 skipped (2 result files)\n\
             runnel:   FAILED a.B.subtracts: expected 1, got 2\n\
             runnel:   FAILED unit divides: division by zero\n\
             runnel:   ... and 1 more\n\
             runnel:   unreadable: bad.xml: is not XML\n"
        );
    }
}
