//! The fleet: agents pulling jobs from a shared NATS JetStream queue
//! (real nats-server processes on loopback ports), a job redelivered when
//! its agent dies, NATS outages, a cluster losing a node, malformed
//! messages, the events stream followed without knowing the agent.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant, SystemTime};

use crate::support::nats::NatsServer;
use crate::support::*;
use async_nats::jetstream;
use futures::StreamExt;
use runnel::api::pb;
use runnel::fleet::{self, Published};

const SUBJECT: &str = "runnel.jobs.default";

/// An agent taking jobs from `urls` (comma-separated), steps without a
/// network (no veth per job: quicker).
fn fleet_agent(id: &str, urls: &str, max_jobs: u32, nats: &str) -> Agent {
    let urls = urls
        .split(',')
        .map(|u| format!("{u:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    let agent = Agent::start(&format!(
        "agent_id = \"{id}\"\nmax_jobs = {max_jobs}\n[intake.nats]\nurl = [{urls}]\n{nats}\n[runtime]\nnetwork = \"none\"\n"
    ));
    wait_for_line(&agent, "taking jobs from NATS");
    agent
}

fn wait_for_line(agent: &Agent, line: &str) {
    wait_for(
        &format!("{line:?} in the agent's log"),
        Duration::from_secs(60),
        || agent.log().contains(line),
    );
}

async fn connect(url: &str) -> jetstream::Context {
    let urls: Vec<&str> = url.split(',').collect();
    jetstream::new(async_nats::connect(urls).await.expect("connect to nats-server"))
}

async fn publish(js: &jetstream::Context, spec: &pb::JobSpec) {
    fleet::publish_job(js, SUBJECT, spec)
        .await
        .expect("publish a job");
}

/// Every event published for `job`, in stream order. (Read as an operator
/// reads them, with no retry: the stream answers or the test fails.)
async fn events_of(js: &jetstream::Context, job: &str) -> Vec<Published> {
    fleet::follow(js, job, 0, false)
        .await
        .unwrap_or_else(|e| panic!("cannot read the events of {job}: {e}"))
        .map(|p| p.expect("an event"))
        .collect()
        .await
}

fn final_states(events: &[Published]) -> Vec<(pb::JobStatus, String)> {
    events
        .iter()
        .filter(|p| fleet::is_final(&p.event))
        .filter_map(|p| match &p.event.event {
            Some(pb::job_event::Event::State(s)) => Some((s.clone(), p.agent.clone())),
            _ => None,
        })
        .collect()
}

/// What the job's steps wrote to stdout.
fn stdout_of(events: &[Published]) -> String {
    events
        .iter()
        .filter_map(|p| match &p.event.event {
            Some(pb::job_event::Event::Log(l)) if l.stream == pb::Stream::Stdout as i32 => {
                Some(String::from_utf8_lossy(&l.data).into_owned())
            }
            _ => None,
        })
        .collect()
}

/// One run's events: seq 1, 2, 3, ... each once.
fn assert_each_event_once_in_order(id: &str, events: &[Published]) {
    let seqs: Vec<u64> = events.iter().map(|p| p.event.seq).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "{id}");
}

/// Waits until a step of `job` has started (on `agent`, when named).
async fn wait_started(js: &jetstream::Context, job: &str, agent: Option<&str>) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let started = events_of(js, job).await.iter().any(|p| {
            agent.is_none_or(|a| p.agent == a)
                && matches!(&p.event.event, Some(pb::job_event::Event::StepStarted(_)))
        });
        if started {
            return;
        }
        assert!(Instant::now() < deadline, "{job} never started on {agent:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `runnel logs -f JOB --nats URL`, started.
fn follow_logs(url: &str, job: &str) -> std::process::Child {
    std::process::Command::new(runnel_bin())
        .args(["logs", "-f", job, "--nats", url])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// What a follower printed (stdout, stderr), once it exited 0.
async fn followed(follower: std::process::Child) -> (String, String) {
    let out = tokio::task::spawn_blocking(move || follower.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");
    (stdout, stderr)
}

/// Waits until every job in `ids` has a final event in the stream.
async fn wait_all_final(js: &jetstream::Context, ids: &[String], timeout: Duration) {
    let events = events_stream(js).await;
    let deadline = Instant::now() + timeout;
    let mut left: BTreeSet<String> = ids.iter().cloned().collect();
    while !left.is_empty() {
        let mut still = BTreeSet::new();
        for id in &left {
            match fleet::last_event(&events, id).await {
                Ok(Some(e)) if fleet::is_final(&e) => {}
                _ => {
                    still.insert(id.clone());
                }
            }
        }
        left = still;
        assert!(
            Instant::now() < deadline || left.is_empty(),
            "jobs without a final state: {left:?}"
        );
        if !left.is_empty() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// The events stream (a cluster that just lost a node may take a moment
/// to answer: asked again for a while).
async fn events_stream(js: &jetstream::Context) -> jetstream::stream::Stream {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match js.get_stream(fleet::EVENTS_STREAM).await {
            Ok(s) => return s,
            Err(e) if Instant::now() < deadline => eprintln!("finding the events stream: {e}; again"),
            Err(e) => panic!("cannot find the events stream: {e}"),
        }
    }
}

/// The largest number of `intervals` that overlap at one time.
fn most_at_once(intervals: &[(SystemTime, SystemTime)]) -> usize {
    let mut edges: Vec<(SystemTime, i32)> = intervals.iter().flat_map(|&(a, b)| [(a, 1), (b, -1)]).collect();
    // An end before a start at the same instant.
    edges.sort();
    let (mut now, mut most) = (0i32, 0i32);
    for (_, d) in edges {
        now += d;
        most = most.max(now);
    }
    most as usize
}

fn time(t: Option<prost_types::Timestamp>) -> SystemTime {
    SystemTime::try_from(t.expect("a time")).unwrap()
}

async fn jobs_stream_info(js: &jetstream::Context) -> jetstream::stream::Info {
    let mut stream = js.get_stream(fleet::JOBS_STREAM).await.unwrap();
    stream.info().await.unwrap().clone()
}

async fn consumer_info(js: &jetstream::Context) -> jetstream::consumer::Info {
    let stream = js.get_stream(fleet::JOBS_STREAM).await.unwrap();
    let mut consumer: jetstream::consumer::PullConsumer =
        stream.get_consumer(&SUBJECT.replace('.', "_")).await.unwrap();
    consumer.info().await.unwrap().clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn three_agents_take_sixty_jobs_each_once_spread_and_never_more_than_max_jobs() {
    require!(Root, Nats);
    let nats = NatsServer::start();
    let agents: Vec<Agent> = (0..3)
        .map(|i| fleet_agent(&format!("agent-{i}"), &nats.url(), 2, ""))
        .collect();
    let js = connect(&nats.url()).await;
    let ids: Vec<String> = (0..60).map(|i| format!("many-{i}")).collect();
    for id in &ids {
        publish(&js, &job(id, &["sleep 0.2; echo ran $RUNNEL_JOB_ID"])).await;
    }
    wait_all_final(&js, &ids, Duration::from_secs(240)).await;

    let mut per_agent: BTreeMap<String, Vec<(SystemTime, SystemTime)>> = BTreeMap::new();
    for id in &ids {
        let events = events_of(&js, id).await;
        let finals = final_states(&events);
        assert_eq!(finals.len(), 1, "{id}: final states {finals:?}");
        let (status, agent) = &finals[0];
        assert_eq!(state(status), pb::JobState::Succeeded, "{id}: {status:?}");
        assert_eq!(status.attempt, 1, "{id}");
        let out = stdout_of(&events);
        assert_eq!(out, format!("ran {id}\n"));
        assert_each_event_once_in_order(id, &events);
        per_agent
            .entry(agent.clone())
            .or_default()
            .push((time(status.created), time(status.finished)));
    }
    assert_eq!(
        per_agent.len(),
        3,
        "every agent takes jobs: {:?}",
        per_agent.keys()
    );
    for (agent, runs) in &per_agent {
        assert!(runs.len() >= 5, "{agent} ran only {} jobs", runs.len());
        assert!(
            most_at_once(runs) <= 2,
            "{agent} ran more than max_jobs = 2 at once"
        );
    }
    // Nothing is left in the queue, nothing waits for an acknowledgement.
    let info = consumer_info(&js).await;
    assert_eq!((info.num_pending, info.num_ack_pending), (0, 0), "{info:?}");
    drop(agents);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_whose_agent_is_killed_runs_again_on_another_as_attempt_two() {
    require!(Root, Nats);
    let nats = NatsServer::start();
    let mut first = fleet_agent("first", &nats.url(), 1, "ack_wait = \"2s\"");
    let js = connect(&nats.url()).await;
    publish(&js, &job("redelivered", &["echo started; sleep 4; echo done"])).await;
    // Running on the first agent: then it dies.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let events = events_of(&js, "redelivered").await;
        if events
            .iter()
            .any(|p| matches!(&p.event.event, Some(pb::job_event::Event::StepStarted(_))))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the job never started on the first agent"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    first.kill9();
    let second = fleet_agent("second", &nats.url(), 1, "ack_wait = \"2s\"");
    wait_all_final(&js, &["redelivered".to_string()], Duration::from_secs(60)).await;

    let events = events_of(&js, "redelivered").await;
    let finals = final_states(&events);
    assert_eq!(finals.len(), 1, "{finals:?}");
    let (status, agent) = &finals[0];
    assert_eq!(state(status), pb::JobState::Succeeded, "{status:?}");
    assert_eq!((status.attempt, agent.as_str()), (2, "second"));
    // The first attempt's events are there too, said to be attempt 1 of
    // the first agent; the second's from its QUEUED on.
    let runs: Vec<(u32, String)> = events.iter().map(|p| (p.attempt, p.agent.clone())).collect();
    let first_run = runs.iter().take_while(|r| r.0 == 1).count();
    assert!(first_run >= 3, "{runs:?}");
    assert!(runs[..first_run].iter().all(|r| r.1 == "first"), "{runs:?}");
    assert!(
        runs[first_run..].iter().all(|r| *r == (2, "second".to_string())),
        "{runs:?}"
    );
    assert_eq!(events[first_run].event.seq, 1);
    let info = consumer_info(&js).await;
    assert_eq!((info.num_pending, info.num_ack_pending), (0, 0), "{info:?}");

    // The first agent, back, finds the job it lost: LOST here, and nothing
    // of that is published (the job succeeded elsewhere).
    first.launch();
    wait_for_line(&first, "job marked LOST after an agent restart");
    wait_for_line(&first, "taking jobs from NATS");
    let last = fleet::last_event(&events_stream(&js).await, "redelivered")
        .await
        .unwrap()
        .unwrap();
    assert!(fleet::is_final(&last));
    drop(second);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_malformed_message_is_terminated_with_a_reason_and_never_redelivered() {
    require!(Root, Nats);
    let nats = NatsServer::start();
    let agent = fleet_agent("only", &nats.url(), 2, "ack_wait = \"2s\"");
    let js = connect(&nats.url()).await;
    // Not a JobSpec at all.
    js.publish(SUBJECT, b"\xff\xff\xffnot protobuf".to_vec().into())
        .await
        .unwrap()
        .await
        .unwrap();
    // A JobSpec that fails validation: no steps.
    publish(&js, &job("no-steps", &[])).await;
    // And a good one after them: the agent is not stuck.
    publish(&js, &job("fine", &["true"])).await;
    let ids = ["no-steps".to_string(), "fine".to_string()];
    wait_all_final(&js, &ids, Duration::from_secs(60)).await;

    let finals = final_states(&events_of(&js, "no-steps").await);
    assert_eq!(finals.len(), 1);
    let (status, agent_id) = &finals[0];
    assert_eq!(state(status), pb::JobState::Failed);
    assert_eq!(failure(status), pb::FailureKind::BadSpec);
    assert!(status.message.contains("steps"), "{}", status.message);
    assert_eq!(agent_id, "only");
    wait_for_line(&agent, "terminated a malformed job message");
    assert!(agent.log().contains("not a protobuf runnel.agent.v1.JobSpec"));
    let finals = final_states(&events_of(&js, "fine").await);
    assert_eq!(state(&finals[0].0), pb::JobState::Succeeded);
    // Terminated, not waiting for redelivery: after two ack waits, still
    // nothing pending and delivered once each.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let info = consumer_info(&js).await;
    assert_eq!(
        (info.num_pending, info.num_ack_pending, info.num_redelivered),
        (0, 0, 0),
        "{info:?}"
    );
    // And the job messages (which carry keys and secrets) are gone.
    assert_eq!(jobs_stream_info(&js).await.state.messages, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_operator_follows_a_job_through_the_events_stream_without_knowing_its_agent() {
    require!(Root, Nats);
    let nats = NatsServer::start();
    let _agents: Vec<Agent> = (0..2)
        .map(|i| fleet_agent(&format!("op-{i}"), &nats.url(), 1, ""))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let job_file = dir.path().join("job.toml");
    std::fs::write(
        &job_file,
        "job_id = \"followed\"\n[[secrets]]\nname = \"TOKEN\"\nvalue = \"hunter2-very-secret\"\n\
         [[steps]]\nrun = \"for i in 1 2 3; do echo line $i; sleep 0.3; done\"\n\
         [[steps]]\nrun = \"echo token is $TOKEN\"\n",
    )
    .unwrap();
    // The operator starts following before the job exists anywhere.
    let follower = follow_logs(&nats.url(), "followed");
    let submit = std::process::Command::new(runnel_bin())
        .args(["submit", "--nats", &nats.url()])
        .arg(&job_file)
        .output()
        .unwrap();
    assert!(
        submit.status.success(),
        "{}",
        String::from_utf8_lossy(&submit.stderr)
    );
    let (stdout, stderr) = followed(follower).await;
    assert_eq!(stdout, "line 1\nline 2\nline 3\ntoken is [MASKED]\n");
    assert!(stderr.contains("attempt 1 on agent op-"), "{stderr}");
    assert!(stderr.contains("SUCCEEDED"), "{stderr}");
    // Nothing published holds the secret.
    let js = connect(&nats.url()).await;
    for p in events_of(&js, "followed").await {
        let bytes = prost::Message::encode_to_vec(&p.event);
        assert!(!bytes.windows(8).any(|w| w == b"hunter2-"), "{:?}", p.event);
    }
    // Resuming after a stream sequence prints only what follows it.
    let all = events_of(&js, "followed").await;
    let after = all[all.len() - 3].stream_seq;
    let resumed = std::process::Command::new(runnel_bin())
        .args([
            "logs",
            "followed",
            "--nats",
            &nats.url(),
            "--after",
            &after.to_string(),
        ])
        .output()
        .unwrap();
    assert!(resumed.status.success());
    assert_eq!(String::from_utf8_lossy(&resumed.stdout), "");
    // A job the stream does not know is said to be unknown, with a failure.
    let unknown = std::process::Command::new(runnel_bin())
        .args(["logs", "never-published", "--nats", &nats.url()])
        .output()
        .unwrap();
    assert_eq!(unknown.status.code(), Some(3));
    let said = String::from_utf8_lossy(&unknown.stderr);
    assert!(said.contains("holds no event of job never-published"), "{said}");
    assert!(String::from_utf8_lossy(&resumed.stderr).contains("SUCCEEDED"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_nats_server_restart_mid_run_loses_no_job_and_no_event() {
    require!(Root, Nats);
    let mut nats = NatsServer::start();
    let agents: Vec<Agent> = (0..2)
        .map(|i| fleet_agent(&format!("r-{i}"), &nats.url(), 2, "ack_wait = \"20s\""))
        .collect();
    let ids: Vec<String> = (0..12).map(|i| format!("outage-{i}")).collect();
    // An operator follows one job through the outage.
    let follower = follow_logs(&nats.url(), "outage-followed");
    {
        let js = connect(&nats.url()).await;
        let lines = "for i in $(seq 1 12); do echo $i; sleep 0.5; done";
        publish(&js, &job("outage-followed", &[lines])).await;
        for id in &ids {
            publish(
                &js,
                &job(id, &["for i in 1 2 3 4 5; do echo $i; sleep 0.2; done"]),
            )
            .await;
        }
        // Some jobs run: then the server goes away, and comes back.
        let events = events_stream(&js).await;
        let deadline = Instant::now() + Duration::from_secs(60);
        while fleet::last_event(&events, &ids[0]).await.unwrap().is_none() {
            assert!(Instant::now() < deadline, "no job started");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    nats.kill9();
    // The outage itself (not a synchronisation): longer than the client's
    // 5 s wait for a publish's confirmation, so that publishing fails and
    // is tried again, and copies whose confirmation was lost are dropped.
    tokio::time::sleep(Duration::from_secs(7)).await;
    nats.launch();
    let js = connect(&nats.url()).await;
    wait_all_final(&js, &ids, Duration::from_secs(180)).await;
    // The operator saw every line once, across the outage.
    let (stdout, stderr) = followed(follower).await;
    let want: String = (1..=12).map(|i| format!("{i}\n")).collect();
    assert_eq!(stdout, want, "{stderr}");
    // Events were held back during the outage (in the jobs' event logs)
    // and published after it; the agents saw the server go.
    wait_for_line(&agents[0], "NATS event=disconnected");
    wait_for(
        "an agent that held events back and published them later",
        Duration::from_secs(30),
        || {
            agents.iter().any(|a| {
                let log = a.log();
                log.contains("cannot publish the job's events")
                    && log.contains("publishing the job's events again")
            })
        },
    );
    for id in &ids {
        let events = events_of(&js, id).await;
        let finals = final_states(&events);
        assert_eq!(finals.len(), 1, "{id}: {finals:?}");
        assert_eq!(state(&finals[0].0), pb::JobState::Succeeded, "{id}");
        assert_eq!(finals[0].0.attempt, 1, "{id}: ran again after the outage");
        assert_each_event_once_in_order(id, &events);
        assert_eq!(finals[0].0.last_seq, events.len() as u64, "{id}");
        let out = stdout_of(&events);
        assert_eq!(out, "1\n2\n3\n4\n5\n", "{id}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_three_node_cluster_with_a_node_killed_keeps_the_fleet_taking_and_finishing_jobs() {
    require!(Root, Nats);
    let mut nodes = NatsServer::cluster();
    let urls = nodes.iter().map(|n| n.url()).collect::<Vec<_>>().join(",");
    let _agents: Vec<Agent> = (0..2)
        .map(|i| fleet_agent(&format!("c-{i}"), &urls, 2, "replicas = 3\nack_wait = \"10s\""))
        .collect();
    let js = connect(&urls).await;
    let info = jobs_stream_info(&js).await;
    assert_eq!(info.config.num_replicas, 3);
    let before: Vec<String> = (0..6).map(|i| format!("cluster-a{i}")).collect();
    for id in &before {
        publish(&js, &job(id, &["sleep 0.3"])).await;
    }
    wait_all_final(&js, &before, Duration::from_secs(120)).await;

    nodes[0].kill9();
    let live = [nodes[1].url(), nodes[2].url()].join(",");
    let js = connect(&live).await;
    let after: Vec<String> = (0..6).map(|i| format!("cluster-b{i}")).collect();
    // An operator follows a job published after the node died.
    let follower = follow_logs(&live, &after[0]);
    for id in &after {
        // The stream may be electing a new leader for a moment.
        let deadline = Instant::now() + Duration::from_secs(30);
        let spec = job(id, &[&format!("echo {id} ran"), "sleep 0.3"]);
        while let Err(e) = fleet::publish_job(&js, SUBJECT, &spec).await {
            assert!(Instant::now() < deadline, "cannot publish after a node died: {e}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    wait_all_final(&js, &after, Duration::from_secs(120)).await;
    // Every job's events read at once, each read a new one: with one peer
    // of three dead, a read that depended on where the servers put it
    // (an R1 consumer on nats-server 2.9) would time out about one time in
    // three, each time after the 10 s request timeout.
    let started = Instant::now();
    for id in before.iter().chain(&after) {
        let finals = final_states(&events_of(&js, id).await);
        assert_eq!(finals.len(), 1, "{id}: {finals:?}");
        assert_eq!(state(&finals[0].0), pb::JobState::Succeeded, "{id}");
    }
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "reading 12 jobs' events took {:?}",
        started.elapsed()
    );
    let (stdout, stderr) = followed(follower).await;
    assert_eq!(stdout, "cluster-b0 ran\n", "{stderr}");
    assert!(stderr.contains("SUCCEEDED"), "{stderr}");
    for id in &after {
        let logs = std::process::Command::new(runnel_bin())
            .args(["logs", id, "--nats", &live])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&logs.stderr);
        assert!(logs.status.success(), "runnel logs {id}: {stderr}");
        assert_eq!(
            String::from_utf8_lossy(&logs.stdout),
            format!("{id} ran\n"),
            "{stderr}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_finishes_and_acks_its_job_and_leaves_the_queue_to_others() {
    require!(Root, Nats);
    let nats = NatsServer::start();
    let mut draining = fleet_agent("draining", &nats.url(), 1, "");
    let js = connect(&nats.url()).await;
    publish(&js, &job("before-term", &["sleep 2; echo finished"])).await;
    let events = events_stream(&js).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while fleet::last_event(&events, "before-term").await.unwrap().is_none() {
        assert!(Instant::now() < deadline, "the job never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    draining.signal(nix::sys::signal::Signal::SIGTERM);
    wait_for_line(&draining, "the NATS intake stopped taking jobs");
    publish(&js, &job("after-term", &["true"])).await;
    let status = tokio::task::spawn_blocking(move || {
        let s = draining.wait(Duration::from_secs(60));
        (s, draining)
    })
    .await
    .unwrap();
    assert!(status.0.success(), "{}", status.1.log());
    let finals = final_states(&events_of(&js, "before-term").await);
    assert_eq!(state(&finals[0].0), pb::JobState::Succeeded);
    // The job it never fetched waits for another agent, which runs it.
    let info = consumer_info(&js).await;
    assert_eq!((info.num_pending, info.num_ack_pending), (1, 0), "{info:?}");
    assert!(fleet::last_event(&events, "after-term").await.unwrap().is_none());
    let _other = fleet_agent("other", &nats.url(), 1, "");
    wait_all_final(&js, &["after-term".to_string()], Duration::from_secs(60)).await;
    let finals = final_states(&events_of(&js, "after-term").await);
    assert_eq!(finals[0].1, "other");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_given_out_max_deliver_times_ends_lost() {
    require!(Root, Nats);
    let nats = NatsServer::start();
    let config = "ack_wait = \"4s\"\nmax_deliver = 2";
    let mut first = fleet_agent("lost-1", &nats.url(), 1, config);
    let js = connect(&nats.url()).await;
    publish(&js, &job("doomed", &["sleep 60"])).await;
    wait_started(&js, "doomed", Some("lost-1")).await;
    first.kill9();
    let mut second = fleet_agent("lost-2", &nats.url(), 1, config);
    wait_started(&js, "doomed", Some("lost-2")).await;
    second.kill9();
    // An agent that does not run it hears that it was given out twice.
    let _third = fleet_agent("lost-3", &nats.url(), 1, config);
    wait_all_final(&js, &["doomed".to_string()], Duration::from_secs(60)).await;
    let finals = final_states(&events_of(&js, "doomed").await);
    assert_eq!(finals.len(), 1, "{finals:?}");
    let (status, agent) = &finals[0];
    assert_eq!(state(status), pb::JobState::Lost, "{status:?}");
    assert_eq!(failure(status), pb::FailureKind::Agent);
    assert_eq!((status.attempt, agent.as_str()), (2, "lost-3"));
    assert!(status.message.contains("max_deliver"), "{}", status.message);
    let info = consumer_info(&js).await;
    assert_eq!((info.num_pending, info.num_ack_pending), (0, 0), "{info:?}");
    let jobs = jobs_stream_info(&js).await;
    assert_eq!(jobs.state.messages, 0, "the LOST job is removed from the queue");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_back_from_a_kill_runs_its_lost_job_again_as_the_next_attempt() {
    require!(Root, Nats);
    let nats = NatsServer::start();
    let mut agent = fleet_agent("phoenix", &nats.url(), 1, "ack_wait = \"2s\"");
    let js = connect(&nats.url()).await;
    publish(&js, &job("again", &["sleep 2; echo done"])).await;
    wait_started(&js, "again", None).await;
    agent.kill9();
    // Back on the same state directory: the job is LOST here first, then
    // given out again, to this agent, whose record of attempt 1 makes way.
    agent.launch();
    wait_for_line(&agent, "job marked LOST after an agent restart");
    wait_all_final(&js, &["again".to_string()], Duration::from_secs(60)).await;
    let finals = final_states(&events_of(&js, "again").await);
    assert_eq!(finals.len(), 1, "{finals:?}");
    assert_eq!(state(&finals[0].0), pb::JobState::Succeeded);
    assert_eq!((finals[0].0.attempt, finals[0].1.as_str()), (2, "phoenix"));
    wait_for_line(&agent, "replacing the record of an earlier attempt");
    let mut c = agent.operator().await;
    let status = get_job(&mut c, "again").await.unwrap();
    assert_eq!((state(&status), status.attempt), (pb::JobState::Succeeded, 2));
    let events = watch(&mut c, "again", 0).await;
    assert_eq!(output(&events, pb::Stream::Stdout), "done\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn agents_reach_nats_over_mutual_tls_with_the_configured_files() {
    require!(Root, Nats);
    let ca = crate::tls::Ca::new("nats test CA");
    let (server_cert, server_key) = ca.issue("nats-server", &["127.0.0.1", "localhost"]);
    let (client_cert, client_key) = ca.issue("runnel-agent", &["runnel-agent"]);
    let path = |p: &std::path::Path| p.display().to_string();
    let nats = NatsServer::start_with(vec![
        "--tls".into(),
        "--tlscert".into(),
        path(&server_cert),
        "--tlskey".into(),
        path(&server_key),
        "--tlsverify".into(),
        "--tlscacert".into(),
        path(&ca.ca_path()),
    ]);
    let tls = format!(
        "tls_ca = {:?}\ntls_cert = {:?}\ntls_key = {:?}",
        path(&ca.ca_path()),
        path(&client_cert),
        path(&client_key)
    );
    let _agent = fleet_agent("tls", &nats.tls_url(), 1, &tls);
    let client = async_nats::ConnectOptions::new()
        .add_root_certificates(ca.ca_path())
        .add_client_certificate(client_cert.clone(), client_key.clone())
        .require_tls(true)
        .connect(nats.tls_url())
        .await
        .unwrap();
    let js = jetstream::new(client);
    publish(&js, &job("over-tls", &["echo private"])).await;
    wait_all_final(&js, &["over-tls".to_string()], Duration::from_secs(60)).await;
    let events = events_of(&js, "over-tls").await;
    assert_eq!(state(&final_states(&events)[0].0), pb::JobState::Succeeded);
    assert_eq!(stdout_of(&events), "private\n");
    // Without a client certificate the server does not let a client in.
    let refused = runnel::fleet::Servers {
        urls: vec![nats.tls_url()],
        tls_ca: Some(ca.ca_path()),
        name: "no certificate".into(),
        ..Default::default()
    }
    .connect(false)
    .await;
    assert!(refused.is_err(), "a client without a certificate was let in");
}
