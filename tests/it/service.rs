//! The agent as a service, through the real binary: drain on SIGTERM (and a
//! second signal cutting it short), sd_notify, recovery after kill -9,
//! retention of ended jobs, the metrics endpoint and the agent's own log.

use std::time::Duration;

use crate::support::sshd::KeyPair;
use crate::support::*;
use futures::StreamExt;
use nix::sys::signal::Signal;
use runnel::api::pb;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

/// A watch stream opened now, collected until the job ends.
async fn follow(c: &mut Client, id: &str) -> tokio::task::JoinHandle<Vec<pb::JobEvent>> {
    let mut stream = events(c, id, 0).await;
    tokio::spawn(async move {
        let mut out = Vec::new();
        while let Some(e) = stream.next().await {
            out.push(e.expect("event"));
        }
        out
    })
}

/// Submits a job whose step sleeps (marked by `marker` on its command
/// line), waits until it runs, and follows it.
async fn sleeping_job(agent: &Agent, id: &str, marker: &str) -> tokio::task::JoinHandle<Vec<pb::JobEvent>> {
    let mut c = agent.scheduler().await;
    submit(&mut c, job(id, &[&format!("sleep {marker}")])).await;
    wait_for("the step to run", Duration::from_secs(60), || {
        !host_processes_with(marker).is_empty()
    });
    follow(&mut c, id).await
}

async fn until_draining(agent: &Agent) {
    wait_until("health NOT_SERVING", Duration::from_secs(30), || async {
        agent.health().await == ServingStatus::NotServing
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_running_jobs_refuses_new_ones_then_exits_0() {
    require!(Root);
    let mut agent = Agent::start("drain_timeout = \"10m\"");
    assert_eq!(agent.health().await, ServingStatus::Serving);
    let gate = Gate::new().await;
    let mut c = agent.scheduler().await;
    submit(
        &mut c,
        host_network(job("drain-me", &[&gate.step(), "echo after-the-gate"])),
    )
    .await;
    let held = gate.arrival().await;
    let events = follow(&mut c, "drain-me").await;

    agent.signal(Signal::SIGTERM);
    until_draining(&agent).await;
    let e = c
        .submit_job(pb::SubmitJobRequest {
            job: Some(job("too-late", &["true"])),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("draining"), "{}", e.message());
    let info = c
        .get_agent_info(pb::GetAgentInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(info.draining);
    assert_eq!(info.running_jobs, 1);
    // The running job is not cut short: it still runs, and finishes.
    assert_eq!(
        state(&get_job(&mut c, "drain-me").await.unwrap()),
        pb::JobState::Running
    );
    drop(held);
    let events = events.await.unwrap();
    let status = final_status(&events);
    assert_eq!(state(&status), pb::JobState::Succeeded, "{status:?}");
    assert!(output(&events, pb::Stream::Stdout).contains("after-the-gate\n"));

    let exit = agent.wait(Duration::from_secs(60));
    assert_eq!(exit.code(), Some(0), "{exit:?}; log:\n{}", agent.log());
    // Nothing of the agent is left in the cgroup tree either.
    let parent = agent.cgroup_parent();
    let left: Vec<_> = std::fs::read_dir("/sys/fs/cgroup")
        .unwrap()
        .flatten()
        .map(|h| h.path().join(parent.trim_start_matches('/')))
        .filter(|p| p.exists())
        .collect();
    assert!(left.is_empty(), "{left:?}");
    // Read from the agent's stderr by a thread of the test: it may lag.
    wait_for("draining in the agent's log", Duration::from_secs(10), || {
        agent.log().contains("draining")
    });
    // Nothing was made for the refused job.
    assert!(!agent.state_dir().join("jobs/too-late").exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_signal_cuts_the_drain_short_and_cancels_what_runs() {
    require!(Root);
    let mut agent = Agent::start("drain_timeout = \"1h\"\n[runtime]\ngrace_period = \"1s\"");
    let events = sleeping_job(&agent, "stubborn", "1000.661").await;
    agent.signal(Signal::SIGTERM);
    until_draining(&agent).await;
    agent.signal(Signal::SIGINT);
    let exit = agent.wait(Duration::from_secs(60));
    assert_eq!(exit.code(), Some(0), "{exit:?}; log:\n{}", agent.log());
    let status = final_status(&events.await.unwrap());
    assert_eq!(state(&status), pb::JobState::Cancelled, "{status:?}");
    assert_eq!(failure(&status), pb::FailureKind::Cancelled);
    assert!(host_processes_with("1000.661").is_empty());
}

/// `systemctl kill -s INT runnel` signals every process of the service:
/// under systemd the jobs' steps are in its (delegated) cgroup and get the
/// SIGINT too, maybe before the agent does. Here the step gets it first,
/// the worst order: the job still ends CANCELLED, not FAILED (STEP) 130.
#[tokio::test(flavor = "multi_thread")]
async fn a_sigint_to_every_process_of_the_service_ends_the_jobs_cancelled() {
    require!(Root);
    let mut agent = Agent::start("drain_timeout = \"1h\"\n[runtime]\ngrace_period = \"1s\"");
    let events = sleeping_job(&agent, "everyone", "1000.662").await;
    agent.signal(Signal::SIGTERM);
    until_draining(&agent).await;
    let step = host_processes_with("1000.662");
    assert!(!step.is_empty());
    for pid in step {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGINT);
    }
    agent.signal(Signal::SIGINT);
    let exit = agent.wait(Duration::from_secs(60));
    assert_eq!(exit.code(), Some(0), "{exit:?}; log:\n{}", agent.log());
    let status = final_status(&events.await.unwrap());
    assert_eq!(state(&status), pb::JobState::Cancelled, "{status:?}");
    assert_eq!(failure(&status), pb::FailureKind::Cancelled, "{status:?}");
    assert!(host_processes_with("1000.662").is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_drain_timeout_cancels_what_still_runs_then_exits_0() {
    require!(Root);
    let mut agent = Agent::start("drain_timeout = \"1s\"\n[runtime]\ngrace_period = \"1s\"");
    let events = sleeping_job(&agent, "too-slow", "1000.771").await;
    agent.signal(Signal::SIGTERM);
    let exit = agent.wait(Duration::from_secs(60));
    assert_eq!(exit.code(), Some(0), "{exit:?}; log:\n{}", agent.log());
    // Read from the agent's stderr by a thread of the test: it may lag.
    wait_for(
        "drain timeout over in the agent's log",
        Duration::from_secs(10),
        || agent.log().contains("drain timeout over"),
    );
    let status = final_status(&events.await.unwrap());
    assert_eq!(state(&status), pb::JobState::Cancelled, "{status:?}");
    assert!(host_processes_with("1000.771").is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn ready_and_stopping_reach_the_notify_socket_and_no_child_inherits_it() {
    require!(Root);
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let receive = || {
        let mut buf = [0u8; 1024];
        let n = socket.recv(&mut buf).expect("a notification in time");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let mut agent = Agent::new("");
    agent
        .env
        .push(("NOTIFY_SOCKET".into(), socket_path.display().to_string()));
    agent.launch();
    let ready = receive();
    let port = agent.addr.rsplit(':').next().unwrap();
    assert!(ready.starts_with("READY=1\n"), "{ready}");
    assert!(
        ready.contains(&format!("STATUS=listening on 127.0.0.1:{port}")),
        "{ready}"
    );
    // READY means the API answers.
    assert_eq!(agent.health().await, ServingStatus::Serving);

    // The runtime processes the agent starts do not see NOTIFY_SOCKET.
    let gate = Gate::new().await;
    let mut c = agent.scheduler().await;
    submit(&mut c, host_network(job("notified", &[&gate.step()]))).await;
    let held = gate.arrival().await;
    let runtime_root = agent.state_dir().join("runtime");
    let helpers = host_processes_with(&runtime_root.display().to_string());
    assert!(!helpers.is_empty(), "no runtime process found");
    for pid in helpers {
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        assert!(
            !String::from_utf8_lossy(&environ).contains("NOTIFY_SOCKET"),
            "process {pid} inherited NOTIFY_SOCKET"
        );
    }

    agent.signal(Signal::SIGTERM);
    let stopping = receive();
    assert!(stopping.starts_with("STOPPING=1\n"), "{stopping}");
    assert!(stopping.contains("STATUS=draining: 1 jobs running"), "{stopping}");
    assert!(stopping.contains("EXTEND_TIMEOUT_USEC="), "{stopping}");
    drop(held);
    assert_eq!(agent.wait(Duration::from_secs(60)).code(), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn after_kill_9_a_running_job_is_lost_its_keys_wiped_its_container_gone_and_its_log_kept() {
    require!(Root, SshKeygen);
    let mut agent = Agent::start("");
    let keys = tempfile::tempdir().unwrap();
    let deploy = KeyPair::generate(keys.path(), "deploy", "ed25519", "", &[]);
    let private = std::fs::read(&deploy.private).unwrap();
    let key_line = String::from_utf8_lossy(&private)
        .lines()
        .find(|l| l.len() >= 40 && !l.starts_with("-----"))
        .unwrap()
        .to_string();
    let mut spec = job("cut-short", &["echo started; sleep 1000.551"]);
    spec.ssh = Some(pb::SshCredentials {
        deploy_key: private.clone(),
        known_hosts: vec![format!("git.example.org {}", deploy.public_line)],
        ..Default::default()
    });
    let mut c = agent.scheduler().await;
    submit(&mut c, spec).await;
    // Follow until the step has printed, remembering the last seq seen.
    let mut stream = events(&mut c, "cut-short", 0).await;
    let mut seen = Vec::new();
    while let Some(e) = stream.next().await {
        let e = e.unwrap();
        let started = matches!(&e.event, Some(pb::job_event::Event::Log(l)) if l.data == b"started\n");
        seen.push(e);
        if started {
            break;
        }
    }
    wait_for("the step to run", Duration::from_secs(60), || {
        !host_processes_with("1000.551").is_empty()
    });
    let run_dir = agent.state_dir().join("jobs/cut-short/run");
    assert!(
        run_dir.join("ssh/id_deploy").exists(),
        "the key was not installed"
    );
    assert!(!mounts_under(&agent.state_dir()).is_empty());

    agent.kill9();
    drop(stream);
    agent.launch();

    // The next start removed the container, its mounts, the keys and the workspace.
    wait_for("the job's processes to be gone", Duration::from_secs(30), || {
        host_processes_with("1000.551").is_empty()
    });
    assert!(!run_dir.exists(), "the run directory is still there");
    assert_eq!(mounts_under(&agent.state_dir()), Vec::<String>::new());
    let leaks = files_containing(&agent.state_dir(), key_line.as_bytes());
    assert!(leaks.is_empty(), "key material left in {leaks:?}");

    // A watcher resuming where it was cut off gets the rest, LOST last.
    let mut c = agent.scheduler().await;
    let last_seen = seen.last().unwrap().seq;
    let rest = watch(&mut c, "cut-short", last_seen).await;
    let status = final_status(&rest);
    assert_eq!(state(&status), pb::JobState::Lost, "{status:?}");
    assert_eq!(failure(&status), pb::FailureKind::Agent);
    assert!(status.message.contains("agent stopped"), "{}", status.message);
    // The whole log is still readable, from the start.
    let all = watch(&mut c, "cut-short", 0).await;
    assert_eq!(all[..seen.len()], seen[..]);
    assert_eq!(all.last(), rest.last());
    assert!(output(&all, pb::Stream::Stdout).contains("started\n"));
    // GetJob agrees, and resubmitting the id does not run it again.
    assert_eq!(
        state(&get_job(&mut c, "cut-short").await.unwrap()),
        pb::JobState::Lost
    );
    let again = submit(&mut c, job("cut-short", &["echo ran-again"])).await;
    assert_eq!(state(&again), pb::JobState::Lost);
}

#[tokio::test(flavor = "multi_thread")]
async fn retention_removes_ended_jobs_beyond_count_bytes_and_age_never_running_ones() {
    require!(Root);
    let agent = Agent::start("[retention]\nmax_jobs = 2\nmax_bytes = 1000000\ninterval = \"100ms\"");
    let gate = Gate::new().await;
    let mut c = agent.scheduler().await;
    submit(&mut c, host_network(job("r-running", &[&gate.step()]))).await;
    let held = gate.arrival().await;
    for id in ["r1", "r2", "r3"] {
        let (status, _) = run_job(&agent, job(id, &[&format!("echo {id}")])).await;
        assert_eq!(state(&status), pb::JobState::Succeeded);
    }
    let jobs_dir = agent.state_dir().join("jobs");
    wait_until("r1 to be removed", Duration::from_secs(30), || {
        let mut c = c.clone();
        async move {
            get_job(&mut c, "r1")
                .await
                .is_err_and(|e| e.code() == Code::NotFound)
        }
    })
    .await;
    assert!(!jobs_dir.join("r1").exists());
    let e = c
        .watch_job(pb::WatchJobRequest {
            job_id: "r1".into(),
            after_seq: 0,
            follow: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    // The two newest ended jobs stay, and the running one.
    for id in ["r2", "r3", "r-running"] {
        get_job(&mut c, id).await.unwrap();
        assert!(jobs_dir.join(id).join("events.log").exists(), "{id}");
    }

    // A job whose log alone is over max_bytes goes; the small ones stay.
    let (status, _) = run_job(
        &agent,
        job("r-big", &["head -c 2000000 /dev/zero | tr '\\0' x | fold -w 100"]),
    )
    .await;
    assert_eq!(state(&status), pb::JobState::Succeeded);
    // The job leaves the registry first, then its files go (outside the
    // registry's lock): wait for both.
    let removed = agent.state_dir().join("removed/r-big");
    wait_until("r-big to be removed", Duration::from_secs(30), || {
        let mut c = c.clone();
        let removed = removed.clone();
        async move { get_job(&mut c, "r-big").await.is_err() && !removed.exists() }
    })
    .await;
    get_job(&mut c, "r3").await.unwrap();
    assert!(!jobs_dir.join("r-big").exists());

    // The running job was never touched; once it ends, it counts like any.
    assert_eq!(
        state(&get_job(&mut c, "r-running").await.unwrap()),
        pb::JobState::Running
    );
    drop(held);
    let events = watch(&mut c, "r-running", 0).await;
    assert_eq!(state(&final_status(&events)), pb::JobState::Succeeded);
    wait_until("r2 to be removed", Duration::from_secs(30), || {
        let mut c = c.clone();
        async move { get_job(&mut c, "r2").await.is_err() }
    })
    .await;
    let list = c.list_jobs(pb::ListJobsRequest {}).await.unwrap().into_inner();
    let mut ids: Vec<_> = list.jobs.iter().map(|j| j.job_id.as_str()).collect();
    ids.sort();
    assert_eq!(ids, vec!["r-running", "r3"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn retention_by_age_removes_old_ended_jobs() {
    require!(Root);
    let agent = Agent::start("[retention]\nmax_age = \"1s\"\ninterval = \"100ms\"");
    let (status, _) = run_job(&agent, job("aged", &["echo old news"])).await;
    assert_eq!(state(&status), pb::JobState::Succeeded);
    let mut c = agent.operator().await;
    wait_until("the aged job to be removed", Duration::from_secs(30), || {
        let mut c = c.clone();
        async move { get_job(&mut c, "aged").await.is_err() }
    })
    .await;
    assert!(!agent.state_dir().join("jobs/aged").exists());
    // The agent's stderr is read by a thread of the test's own: its line
    // may come a moment after the removal is seen.
    wait_for("the removal in the agent's log", Duration::from_secs(10), || {
        agent.log().contains("removed an ended job's logs and status")
    });
    let list = c.list_jobs(pb::ListJobsRequest {}).await.unwrap().into_inner();
    assert!(list.jobs.is_empty());
}

/// A git repository with one commit, for a checkout from a local path.
fn local_repo(dir: &std::path::Path) -> String {
    use crate::support::sshd::git;
    std::fs::write(dir.join("README"), "metrics\n").unwrap();
    git(dir, &["init", "-q", "-b", "main"]);
    git(dir, &["add", "README"]);
    git(dir, &["commit", "-q", "-m", "one"]);
    dir.display().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_jobs_steps_checkouts_log_bytes_and_watchers() {
    require!(Root);
    let agent = Agent::start("metrics_listen = \"127.0.0.1:0\"\nmax_jobs = 3");
    assert_eq!(agent.metric("runnel_job_slots"), 3.0);
    assert_eq!(agent.metric("runnel_jobs_running"), 0.0);
    let (status, _) = agent.scrape("/nope");
    assert!(status.contains(" 404 "), "{status}");

    let repo = tempfile::tempdir().unwrap();
    let mut spec = job("m-ok", &["echo hello-metrics", "echo oops >&2"]);
    spec.checkout = Some(pb::Checkout {
        repo_url: local_repo(repo.path()),
        ..Default::default()
    });
    let (status, events) = run_job(&agent, spec).await;
    assert_eq!(state(&status), pb::JobState::Succeeded, "{status:?}");
    let (status, _) = run_job(&agent, job("m-fail", &["exit 3"])).await;
    assert_eq!(state(&status), pb::JobState::Failed);

    assert_eq!(agent.metric("runnel_jobs_ended_total{state=\"succeeded\"}"), 1.0);
    assert_eq!(agent.metric("runnel_jobs_ended_total{state=\"failed\"}"), 1.0);
    assert_eq!(agent.metric("runnel_jobs_ended_total{state=\"lost\"}"), 0.0);
    assert_eq!(agent.metric("runnel_step_duration_seconds_count"), 3.0);
    assert_eq!(
        agent.metric("runnel_step_duration_seconds_bucket{le=\"+Inf\"}"),
        3.0
    );
    assert_eq!(agent.metric("runnel_checkout_duration_seconds_count"), 1.0);
    assert!(agent.metric("runnel_checkout_duration_seconds_sum") > 0.0);
    assert_eq!(agent.metric("runnel_log_bytes_total{stream=\"stdout\"}"), 14.0);
    assert_eq!(agent.metric("runnel_log_bytes_total{stream=\"stderr\"}"), 5.0);
    // What the watcher of m-ok was sent, at least (m-fail's too).
    let watched: usize = events
        .iter()
        .filter_map(|e| match &e.event {
            Some(pb::job_event::Event::Log(l)) => Some(l.data.len()),
            _ => None,
        })
        .sum();
    assert!(agent.metric("runnel_log_bytes_streamed_total") >= watched as f64);
    assert_eq!(agent.metric("runnel_jobs_known"), 2.0);

    // A running job and a connected watcher are seen while they last.
    let gate = Gate::new().await;
    let mut c = agent.scheduler().await;
    submit(&mut c, host_network(job("m-running", &[&gate.step()]))).await;
    let held = gate.arrival().await;
    let watcher = follow(&mut c, "m-running").await;
    assert_eq!(agent.metric("runnel_jobs_running"), 1.0);
    assert_eq!(agent.metric("runnel_watchers"), 1.0);
    drop(held);
    watcher.await.unwrap();
    wait_for("the watcher to be uncounted", Duration::from_secs(30), || {
        agent.metric("runnel_watchers") == 0.0
    });
    wait_for("the job to be over", Duration::from_secs(30), || {
        agent.metric("runnel_jobs_running") == 0.0
    });
    assert_eq!(agent.metric("runnel_jobs_ended_total{state=\"succeeded\"}"), 2.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_log_is_json_by_config_with_job_ids_and_no_secret() {
    require!(Root);
    const SECRET: &str = "s3cr3t-for-the-log-test";
    let mut spec = job("log-json", &["echo \"$TOKEN\"", "exit 4"]);
    spec.secrets.push(pb::Secret {
        name: "TOKEN".into(),
        value: SECRET.into(),
    });
    let agent = Agent::start("log_format = \"json\"");
    let (status, _) = run_job(&agent, spec.clone()).await;
    assert_eq!(state(&status), pb::JobState::Failed);
    let log = agent.log();
    assert!(!log.contains(SECRET), "the secret is in the agent's log");
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let ended = lines
        .iter()
        .find(|l| l["fields"]["message"] == "job ended")
        .unwrap_or_else(|| panic!("no \"job ended\" line in\n{log}"));
    assert_eq!(ended["span"]["job_id"], "log-json", "{ended}");
    assert_eq!(ended["fields"]["state"], "FAILED");
    // Every line logged inside the job's span names the job.
    let in_job: Vec<_> = lines.iter().filter(|l| l["spans"].is_array()).collect();
    assert!(!in_job.is_empty());
    for l in in_job {
        assert_eq!(l["spans"][0]["job_id"], "log-json", "{l}");
    }

    // The text format: no colours off a terminal, the job's span in front.
    let agent = Agent::start("");
    run_job(&agent, spec).await;
    let log = agent.log();
    assert!(!log.contains('\x1b'), "ANSI escapes in\n{log}");
    assert!(!log.contains(SECRET));
    assert!(
        log.lines()
            .any(|l| l.contains("job{job_id=log-json}") && l.contains("job ended")),
        "{log}"
    );
}
