//! What the agent counts about its own work, rendered as Prometheus text
//! (the daemon serves it). The job registry owns one [`Metrics`]; the job
//! code bumps it in a few places (a job ended, a step ended, a checkout
//! ended, log bytes written or streamed, a watcher came or went). Gauges
//! that the registry already knows (running jobs, slots) are read when
//! scraped, not kept twice. Only numbers live here: never a job's output,
//! never a secret.

use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use crate::model::Stream;
use crate::model::state::JobState;

/// Final states, in the order they are shown.
const FINAL_STATES: [JobState; 5] = [
    JobState::Succeeded,
    JobState::Failed,
    JobState::Cancelled,
    JobState::TimedOut,
    JobState::Lost,
];

const STEP_BUCKETS: &[f64] = &[0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0, 1800.0, 3600.0];
const CHECKOUT_BUCKETS: &[f64] = &[0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0];

/// A Prometheus histogram of durations, lock-free.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Per bucket (not cumulative); the last is +Inf.
    counts: Vec<AtomicU64>,
    sum_micros: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = self
            .bounds
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(self.bounds.len());
        self.counts[i].fetch_add(1, Relaxed);
        self.sum_micros
            .fetch_add(d.as_micros().min(u64::MAX as u128) as u64, Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        header(out, name, help, "histogram");
        let mut cumulative = 0;
        for (i, count) in self.counts.iter().enumerate() {
            cumulative += count.load(Relaxed);
            let le = self.bounds.get(i).map_or("+Inf".to_string(), |b| b.to_string());
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
        }
        let sum = self.sum_micros.load(Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}");
        let _ = writeln!(out, "{name}_count {cumulative}");
    }
}

/// The agent's counters.
#[derive(Debug)]
pub struct Metrics {
    jobs_ended: [AtomicU64; FINAL_STATES.len()],
    jobs_removed: AtomicU64,
    step_seconds: Histogram,
    checkout_seconds: Histogram,
    /// Log bytes written to event logs, by stream (stdout, stderr, system).
    log_bytes: [AtomicU64; 3],
    /// Log bytes sent to watchers.
    streamed_bytes: AtomicU64,
    watchers: AtomicI64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            jobs_ended: Default::default(),
            jobs_removed: AtomicU64::new(0),
            step_seconds: Histogram::new(STEP_BUCKETS),
            checkout_seconds: Histogram::new(CHECKOUT_BUCKETS),
            log_bytes: Default::default(),
            streamed_bytes: AtomicU64::new(0),
            watchers: AtomicI64::new(0),
        }
    }
}

/// What the registry knows at scrape time.
#[derive(Debug, Clone, Copy)]
pub struct Gauges {
    pub running_jobs: u32,
    pub slots: u32,
    pub known_jobs: usize,
    pub draining: bool,
}

fn stream_index(s: Stream) -> usize {
    match s {
        Stream::Stdout => 0,
        Stream::Stderr => 1,
        Stream::System => 2,
    }
}

fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn single(out: &mut String, name: &str, help: &str, kind: &str, value: impl std::fmt::Display) {
    header(out, name, help, kind);
    let _ = writeln!(out, "{name} {value}");
}

impl Metrics {
    /// A job reached its final state.
    pub fn job_ended(&self, state: JobState) {
        if let Some(i) = FINAL_STATES.iter().position(|&s| s == state) {
            self.jobs_ended[i].fetch_add(1, Relaxed);
        }
    }

    pub fn jobs_removed(&self, n: usize) {
        self.jobs_removed.fetch_add(n as u64, Relaxed);
    }

    pub fn step_ended(&self, d: Duration) {
        self.step_seconds.observe(d);
    }

    pub fn checkout_ended(&self, d: Duration) {
        self.checkout_seconds.observe(d);
    }

    pub fn log_written(&self, stream: Stream, bytes: usize) {
        self.log_bytes[stream_index(stream)].fetch_add(bytes as u64, Relaxed);
    }

    pub fn log_streamed(&self, bytes: usize) {
        self.streamed_bytes.fetch_add(bytes as u64, Relaxed);
    }

    /// Counts a connected watcher until the returned guard is dropped.
    pub fn watcher(self: &Arc<Self>) -> WatcherGuard {
        self.watchers.fetch_add(1, Relaxed);
        WatcherGuard(self.clone())
    }

    /// The Prometheus text exposition format (version 0.0.4).
    pub fn render(&self, g: Gauges) -> String {
        let mut out = String::with_capacity(4096);
        single(&mut out, "runnel_up", "The agent runs.", "gauge", 1);
        single(
            &mut out,
            "runnel_job_slots",
            "Jobs that may run at once (max_jobs).",
            "gauge",
            g.slots,
        );
        single(
            &mut out,
            "runnel_jobs_running",
            "Jobs running now.",
            "gauge",
            g.running_jobs,
        );
        single(
            &mut out,
            "runnel_jobs_known",
            "Jobs the agent knows: running, or ended and kept for their logs.",
            "gauge",
            g.known_jobs,
        );
        single(
            &mut out,
            "runnel_draining",
            "1 while the agent drains and takes no new jobs.",
            "gauge",
            u8::from(g.draining),
        );
        header(
            &mut out,
            "runnel_jobs_ended_total",
            "Jobs that ended since the agent started, by final state.",
            "counter",
        );
        for (state, n) in FINAL_STATES.iter().zip(&self.jobs_ended) {
            let state = state.name().to_ascii_lowercase();
            let _ = writeln!(
                out,
                "runnel_jobs_ended_total{{state=\"{state}\"}} {}",
                n.load(Relaxed)
            );
        }
        single(
            &mut out,
            "runnel_jobs_removed_total",
            "Ended jobs whose logs and status were removed by retention.",
            "counter",
            self.jobs_removed.load(Relaxed),
        );
        self.step_seconds.render(
            &mut out,
            "runnel_step_duration_seconds",
            "How long steps ran, whatever their outcome.",
        );
        self.checkout_seconds.render(
            &mut out,
            "runnel_checkout_duration_seconds",
            "How long checkouts (with submodules) took, done or failed (not cancelled).",
        );
        header(
            &mut out,
            "runnel_log_bytes_total",
            "Bytes of job output written to event logs, by stream.",
            "counter",
        );
        for (name, n) in ["stdout", "stderr", "system"].iter().zip(&self.log_bytes) {
            let _ = writeln!(
                out,
                "runnel_log_bytes_total{{stream=\"{name}\"}} {}",
                n.load(Relaxed)
            );
        }
        single(
            &mut out,
            "runnel_log_bytes_streamed_total",
            "Bytes of job output sent to watchers.",
            "counter",
            self.streamed_bytes.load(Relaxed),
        );
        single(
            &mut out,
            "runnel_watchers",
            "Watchers (WatchJob streams) connected now.",
            "gauge",
            self.watchers.load(Relaxed),
        );
        out
    }
}

/// A connected watcher; uncounted on drop.
#[derive(Debug)]
pub struct WatcherGuard(Arc<Metrics>);

impl Drop for WatcherGuard {
    fn drop(&mut self) {
        self.0.watchers.fetch_sub(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_lines(text: &str, lines: &[&str]) {
        for line in lines {
            assert!(text.lines().any(|l| l == *line), "{line} not in\n{text}");
        }
    }

    fn gauges() -> Gauges {
        Gauges {
            running_jobs: 1,
            slots: 4,
            known_jobs: 3,
            draining: false,
        }
    }

    #[test]
    fn histograms_are_cumulative_with_sum_and_count() {
        let m = Metrics::default();
        m.step_ended(Duration::from_millis(50));
        m.step_ended(Duration::from_millis(700));
        m.step_ended(Duration::from_secs(7200));
        let text = m.render(gauges());
        assert_lines(
            &text,
            &[
                "runnel_step_duration_seconds_bucket{le=\"0.1\"} 1",
                "runnel_step_duration_seconds_bucket{le=\"0.5\"} 1",
                "runnel_step_duration_seconds_bucket{le=\"1\"} 2",
                "runnel_step_duration_seconds_bucket{le=\"3600\"} 2",
                "runnel_step_duration_seconds_bucket{le=\"+Inf\"} 3",
                "runnel_step_duration_seconds_sum 7200.75",
                "runnel_step_duration_seconds_count 3",
                "runnel_checkout_duration_seconds_count 0",
            ],
        );
    }

    #[test]
    fn counters_gauges_and_watchers() {
        let m = Arc::new(Metrics::default());
        m.job_ended(JobState::Succeeded);
        m.job_ended(JobState::Lost);
        m.job_ended(JobState::Running);
        m.log_written(Stream::Stderr, 10);
        let w = m.watcher();
        let text = m.render(gauges());
        assert_lines(
            &text,
            &[
                "runnel_jobs_ended_total{state=\"succeeded\"} 1",
                "runnel_jobs_ended_total{state=\"lost\"} 1",
                "runnel_jobs_ended_total{state=\"timed_out\"} 0",
                "runnel_log_bytes_total{stream=\"stderr\"} 10",
                "runnel_jobs_running 1",
                "runnel_job_slots 4",
                "runnel_watchers 1",
            ],
        );
        drop(w);
        assert!(m.render(gauges()).contains("runnel_watchers 0\n"));
        // Every sample line belongs to a declared metric.
        for l in text.lines().filter(|l| !l.starts_with('#')) {
            let name = l.split(['{', ' ']).next().unwrap();
            let base = name
                .trim_end_matches("_bucket")
                .trim_end_matches("_sum")
                .trim_end_matches("_count");
            assert!(
                text.contains(&format!("# TYPE {name} "))
                    || text.contains(&format!("# TYPE {base} histogram")),
                "{l}"
            );
        }
    }
}
