//! Steps as CircleCI runs them, through the real binary and runtime: step
//! conditions (`when`), background steps, the no-output timeout, a step's
//! working directory and shell, and the step summary.

use crate::support::*;
use runnel::api::pb;

/// A step named `name` running `run`, as the tests below change it.
fn step(name: &str, run: &str) -> pb::Step {
    pb::Step {
        name: name.into(),
        kind: Some(pb::step::Kind::Run(run.into())),
        ..Default::default()
    }
}

fn with_when(mut s: pb::Step, when: pb::StepWhen) -> pb::Step {
    s.when = when as i32;
    s
}

#[tokio::test(flavor = "multi_thread")]
async fn on_fail_and_always_steps_run_after_a_failure_and_the_first_failure_is_the_jobs() {
    require!(Root);
    let agent = Agent::start("");
    let spec = host_job(
        "when-steps",
        vec![
            step("build", "echo building; exit 3"),
            step("deploy", "echo deploying"),
            with_when(step("report", "echo build failed"), pb::StepWhen::OnFail),
            with_when(step("clean", "echo cleaning"), pb::StepWhen::Always),
        ],
    );
    let (status, events) = run_job(&agent, spec).await;
    assert_eq!(failure(&status), pb::FailureKind::Step, "{status:?}");
    assert_eq!(status.message, "step \"build\" failed: exit status 3");
    assert_eq!(
        output(&events, pb::Stream::Stdout),
        "building\nbuild failed\ncleaning\n"
    );
    let summary: Vec<(String, bool, String)> = status
        .steps
        .iter()
        .map(|s| (s.name.clone(), s.started.is_some(), s.note.clone()))
        .collect();
    assert_eq!(
        summary,
        [
            ("build".into(), true, String::new()),
            (
                "deploy".into(),
                false,
                "skipped: an earlier step failed (when = on_success)".into()
            ),
            ("report".into(), true, String::new()),
            ("clean".into(), true, String::new()),
        ]
    );
    assert_eq!(status.steps[2].when, pb::StepWhen::OnFail as i32);
    let system = output(&events, pb::Stream::System);
    assert!(
        system.contains("runnel: step \"report\" runs after a failure (when = on_fail)")
            && system.contains("runnel: step \"clean\" runs after a failure (when = always)"),
        "{system}"
    );

    // Without a failure: on_fail is skipped, always runs.
    let spec = host_job(
        "when-ok",
        vec![
            step("build", "echo building"),
            with_when(step("report", "echo never"), pb::StepWhen::OnFail),
            with_when(step("clean", "echo cleaning"), pb::StepWhen::Always),
        ],
    );
    let (status, events) = run_job(&agent, spec).await;
    assert_succeeded(&status, &events);
    assert_eq!(output(&events, pb::Stream::Stdout), "building\ncleaning\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_background_server_serves_the_next_steps_and_is_stopped_with_the_job() {
    require!(Root);
    let agent = Agent::start("");
    let marker = "runnel-bg-server-7731";
    let mut server = step(
        "server",
        &format!(
            "mkdir -p /tmp/site && echo served > /tmp/site/index.txt && cd /tmp/site && exec python3 -m http.server 7731 --bind 127.0.0.1 # {marker}"
        ),
    );
    server.background = true;
    let client = step(
        "client",
        "for i in $(seq 100); do python3 -c 'import urllib.request,sys; sys.stdout.write(urllib.request.urlopen(\"http://127.0.0.1:7731/index.txt\").read().decode())' 2>/dev/null && exit 0; sleep 0.1; done; exit 1",
    );
    let (status, events) = run_job(&agent, host_job("background", vec![server, client])).await;
    assert_succeeded(&status, &events);
    assert_eq!(output(&events, pb::Stream::Stdout), "served\n");
    // The server's own log lines are under its step.
    let server_lines: usize = events
        .iter()
        .filter_map(|e| match &e.event {
            Some(pb::job_event::Event::Log(l)) if l.step == 0 && l.stream == pb::Stream::Stderr as i32 => {
                Some(String::from_utf8_lossy(&l.data).matches("GET /index.txt").count())
            }
            _ => None,
        })
        .sum();
    assert_eq!(server_lines, 1);
    let names: Vec<(&str, bool)> = status
        .steps
        .iter()
        .map(|s| (s.name.as_str(), s.background))
        .collect();
    assert_eq!(names, [("client", false), ("server", true)]);
    assert_eq!(
        status.steps[1].note,
        "running at the end of the job's steps: stopped with the container"
    );
    assert!(
        host_processes_with(marker).is_empty(),
        "the background server outlived its job"
    );

    // One that fails while the others run fails the job.
    let mut broken = step("broken", "sleep 0.2; exit 4");
    broken.background = true;
    let (status, _) = run_job(
        &agent,
        host_job("background-fails", vec![broken, step("slow", "sleep 2")]),
    )
    .await;
    assert_eq!(failure(&status), pb::FailureKind::Step, "{status:?}");
    assert_eq!(status.message, "background step \"broken\" failed: exit status 4");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_step_silent_for_its_no_output_timeout_fails_the_job_with_no_output() {
    require!(Root);
    let agent = Agent::start("");
    let mut silent = step("silent", "echo started; sleep 60.4471");
    silent.no_output_timeout = Some(prost_types::Duration { seconds: 1, nanos: 0 });
    let (status, events) = run_job(&agent, host_job("no-output", vec![silent])).await;
    assert_eq!(failure(&status), pb::FailureKind::NoOutput, "{status:?}");
    assert_eq!(
        status.message,
        "step \"silent\" printed nothing for 1s (its no_output_timeout) and was ended"
    );
    assert_eq!(output(&events, pb::Stream::Stdout), "started\n");
    assert!(host_processes_with("60.4471").is_empty());

    // The job's default applies to a step without its own; output resets
    // the clock.
    let mut spec = host_job(
        "no-output-job-default",
        vec![step("ticks", "for i in 1 2 3 4 5 6; do echo $i; sleep 0.3; done")],
    );
    spec.no_output_timeout = Some(prost_types::Duration { seconds: 1, nanos: 0 });
    let (status, events) = run_job(&agent, spec).await;
    assert_succeeded(&status, &events);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_step_runs_in_its_working_directory_with_its_shell() {
    require!(Root);
    let agent = Agent::start("");
    let mut relative = step("relative", "pwd; touch made-here");
    relative.working_directory = "sub/dir".into();
    let mut absolute = step("absolute", "pwd");
    absolute.working_directory = "/var/tmp/elsewhere".into();
    let listing = step("listing", "ls /workspace/sub/dir");
    // bash with pipefail: a failing command in a pipeline fails the step.
    let mut pipefail = step("pipefail", "false | true; echo not-reached");
    pipefail.shell = "/bin/bash -eo pipefail".into();
    let (status, events) = run_job(
        &agent,
        host_job("cwd-shell", vec![relative, absolute, listing, pipefail]),
    )
    .await;
    assert_eq!(failure(&status), pb::FailureKind::Step, "{status:?}");
    assert_eq!(status.message, "step \"pipefail\" failed: exit status 1");
    assert_eq!(
        output(&events, pb::Stream::Stdout),
        "/workspace/sub/dir\n/var/tmp/elsewhere\nmade-here\n"
    );

    // The default shell is /bin/sh -e: the first failing command ends the
    // step.
    let (status, events) = run_job(
        &agent,
        host_job("sh-e", vec![step("e", "false; echo not-reached")]),
    )
    .await;
    assert_eq!(failure(&status), pb::FailureKind::Step, "{status:?}");
    assert_eq!(output(&events, pb::Stream::Stdout), "");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_shell_that_is_not_an_absolute_path_is_refused_at_submit() {
    require!(Root);
    let agent = Agent::start("");
    let mut c = agent.scheduler().await;
    let mut s = step("s", "true");
    s.shell = "bash -e".into();
    let e = c
        .submit_job(pb::SubmitJobRequest {
            job: Some(host_job("bad-shell", vec![s])),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("steps[0].shell"), "{}", e.message());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_log_over_its_limit_keeps_head_and_tail_with_a_marker_and_the_agent_stays_small() {
    require!(Root);
    let agent = Agent::start("[logs]\nmax_bytes = 1048576");
    // 100 MB of numbered lines: the head and the tail are recognisable.
    let spec = host_job(
        "big-log",
        vec![step(
            "loud",
            "seq -w 1 20000000 | head -c 100000000; echo; echo the-end",
        )],
    );
    let (status, events) = run_job(&agent, spec).await;
    assert_succeeded(&status, &events);
    let out = output(&events, pb::Stream::Stdout);
    // seq may say on stderr that its pipe closed: that counts too.
    let err = output(&events, pb::Stream::Stderr);
    let total = 100_000_000 + "\nthe-end\n".len() + err.len();
    assert_eq!(out.len() + err.len(), 1 << 20);
    assert!(out.starts_with("00000001\n00000002\n"), "{}", &out[..40]);
    assert!(out.ends_with("\nthe-end\n"), "{}", &out[out.len() - 40..]);
    let system = output(&events, pb::Stream::System);
    assert!(
        system.contains(&format!(
            "runnel: {} bytes of output dropped here: the job's log is limited to 1048576 bytes (logs.max_bytes)",
            total - (1 << 20)
        )),
        "{system}"
    );
    // The marker sits between the head and the tail.
    let kinds: Vec<i32> = events
        .iter()
        .filter_map(|e| match &e.event {
            Some(pb::job_event::Event::Log(l)) if l.stream != pb::Stream::Stderr as i32 => Some(l.stream),
            _ => None,
        })
        .collect();
    let marker_at = events
        .iter()
        .filter_map(|e| match &e.event {
            Some(pb::job_event::Event::Log(l)) if l.stream != pb::Stream::Stderr as i32 => Some(l),
            _ => None,
        })
        .position(|l| String::from_utf8_lossy(&l.data).contains("bytes of output dropped"))
        .unwrap();
    assert!(kinds[..marker_at].contains(&(pb::Stream::Stdout as i32)));
    assert!(kinds[marker_at + 1..].contains(&(pb::Stream::Stdout as i32)));
    // The agent never held the 100 MB: its peak memory stays small.
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.pid())).unwrap();
    let hwm_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    assert!(hwm_kib < 96 * 1024, "the agent's peak RSS was {hwm_kib} KiB");
}
