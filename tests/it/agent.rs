//! One job end to end through the real agent: gRPC API, lifecycle, event
//! log, masking, containers, timeouts and cancellation.

use std::time::Duration;

use crate::support::*;
use futures::StreamExt;
use runnel::api::pb;
use tonic::Code;

#[tokio::test(flavor = "multi_thread")]
async fn a_job_runs_in_a_container_and_its_output_streams_back() {
    require!(Root);
    let agent = Agent::start("");
    let (status, events) = run_job(
        &agent,
        job(
            "hello",
            &[
                "echo hello from $RUNNEL_JOB_ID; echo to-stderr >&2",
                "echo CI=$CI RUNNEL=$RUNNEL; pwd",
            ],
        ),
    )
    .await;
    assert_eq!(state(&status), pb::JobState::Succeeded, "{status:?}");
    let out = output(&events, pb::Stream::Stdout);
    assert!(out.contains("hello from hello\n"), "{out}");
    assert!(out.contains("CI=true RUNNEL=true\n/workspace\n"), "{out}");
    assert_eq!(output(&events, pb::Stream::Stderr), "to-stderr\n");

    // seq is 1, 2, 3, ... with no gaps; the states go in order.
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e.seq, i as u64 + 1);
        assert_eq!(e.job_id, "hello");
    }
    let states: Vec<pb::JobState> = events
        .iter()
        .filter_map(|e| match &e.event {
            Some(pb::job_event::Event::State(s)) => Some(state(s)),
            _ => None,
        })
        .collect();
    use pb::JobState::*;
    assert_eq!(states, vec![Queued, Preparing, Running, Succeeded]);
    assert_eq!(status.steps.len(), 2);
    assert_eq!(status.last_seq, events.len() as u64);

    // GetJob agrees; ListJobs lists it; AgentInfo names the runtime.
    let mut op = agent.operator().await;
    let got = op
        .get_job(pb::GetJobRequest {
            job_id: "hello".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.state, Succeeded as i32);
    assert_eq!(got.last_seq, events.len() as u64);
    let list = op.list_jobs(pb::ListJobsRequest {}).await.unwrap().into_inner();
    assert!(list.jobs.iter().any(|j| j.job_id == "hello"));
    let info = op
        .get_agent_info(pb::GetAgentInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.runtime, "libcontainer");
    assert_eq!(info.running_jobs, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn resubmitting_a_job_id_never_runs_it_twice() {
    require!(Root);
    let agent = Agent::start("");
    let marker = agent.state.path().join("ran");
    let spec = job("once", &["echo ran"]);
    let mut c = agent.scheduler().await;
    submit(&mut c, spec.clone()).await;
    let again = submit(&mut c, spec.clone()).await;
    assert_eq!(again.job_id, "once");
    let events = watch(&mut c, "once", 0).await;
    let third = submit(&mut c, spec).await;
    assert_eq!(state(&third), pb::JobState::Succeeded);
    let started = events
        .iter()
        .filter(|e| matches!(e.event, Some(pb::job_event::Event::StepStarted(_))))
        .count();
    assert_eq!(started, 1);
    assert_eq!(output(&events, pb::Stream::Stdout), "ran\n");
    assert!(!marker.exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_watcher_resuming_from_a_seq_gets_exactly_the_rest() {
    require!(Root);
    let agent = Agent::start("");
    let (_, all) = run_job(
        &agent,
        job(
            "resume",
            &["for i in 1 2 3 4 5; do echo line $i; done", "echo done"],
        ),
    )
    .await;
    assert!(all.len() > 6);
    let mut op = agent.operator().await;
    for mid in [1, all.len() as u64 / 2, all.len() as u64 - 1, all.len() as u64] {
        let tail = watch(&mut op, "resume", mid).await;
        assert_eq!(tail, all[mid as usize..].to_vec(), "resuming after {mid}");
    }
    // Not following: the stored events, then the end of the stream.
    let stored: Vec<_> = op
        .watch_job(pb::WatchJobRequest {
            job_id: "resume".into(),
            after_seq: 0,
            follow: false,
        })
        .await
        .unwrap()
        .into_inner()
        .map(|e| e.unwrap())
        .collect()
        .await;
    assert_eq!(stored, all);
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_decide_who_may_call_what() {
    require!(Root);
    let agent = Agent::start("");
    let spec = job("authz", &["true"]);

    let mut anon = agent.client(None).await;
    let e = anon
        .submit_job(pb::SubmitJobRequest {
            job: Some(spec.clone()),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let e = anon.list_jobs(pb::ListJobsRequest {}).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);

    let mut wrong = agent.client(Some("not-a-token")).await;
    let e = wrong
        .get_agent_info(pb::GetAgentInfoRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);

    let mut op = agent.operator().await;
    let e = op
        .submit_job(pb::SubmitJobRequest {
            job: Some(spec.clone()),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = op
        .cancel_job(pb::CancelJobRequest {
            job_id: "authz".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    op.list_jobs(pb::ListJobsRequest {}).await.unwrap();
    op.get_agent_info(pb::GetAgentInfoRequest {}).await.unwrap();

    let mut s = agent.scheduler().await;
    submit(&mut s, spec).await;
    // An operator may watch and get.
    let events = watch(&mut op, "authz", 0).await;
    assert_eq!(state(&final_status(&events)), pb::JobState::Succeeded);
    let e = op
        .get_job(pb::GetJobRequest {
            job_id: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_spec_is_refused_naming_the_field() {
    require!(Root);
    let agent = Agent::start("");
    let mut c = agent.scheduler().await;
    let zero = prost_types::Duration { seconds: 0, nanos: 0 };
    let mut no_steps = job("ok-id", &[]);
    no_steps.steps.clear();
    let mut zero_timeout = job("ok-id", &["true"]);
    zero_timeout.timeout = Some(zero);
    let mut zero_step_timeout = job("ok-id", &["true"]);
    zero_step_timeout.steps[0].timeout = Some(zero);
    let mut bad_env = job("ok-id", &["true"]);
    bad_env.env.insert("NOT VALID".into(), "x".into());
    let cases = [
        (job("", &["true"]), "job_id"),
        (job("a/b", &["true"]), "job_id"),
        (job("..", &["true"]), "job_id"),
        (job(&"x".repeat(129), &["true"]), "job_id"),
        (no_steps, "steps"),
        (job("ok-id", &["  "]), "steps[0].run"),
        (zero_timeout, "timeout"),
        (zero_step_timeout, "steps[0].timeout"),
        (bad_env, "env"),
    ];
    for (spec, field) in cases {
        let e = c
            .submit_job(pb::SubmitJobRequest { job: Some(spec) })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{field}: {e:?}");
        assert!(e.message().contains(field), "{field}: {}", e.message());
    }
    let e = c
        .submit_job(pb::SubmitJobRequest { job: None })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    // Nothing was created for any of them.
    let list = c.list_jobs(pb::ListJobsRequest {}).await.unwrap().into_inner();
    assert!(list.jobs.is_empty(), "{:?}", list.jobs);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_environment_too_large_for_execve_is_refused_at_submit_naming_size_and_limit() {
    require!(Root);
    let agent = Agent::start("");
    let mut c = agent.scheduler().await;
    let mut big = job("big-env", &["true"]);
    big.env.insert("BIG".into(), "x".repeat(300_000));
    let e = c
        .submit_job(pb::SubmitJobRequest { job: Some(big) })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let m = e.message();
    assert!(m.contains("env[\"BIG\"]"), "{m}");
    assert!(m.contains("300004 bytes") && m.contains("131072"), "{m}");
    assert!(!m.contains('\0'), "{m:?}");
    // Just under the limit for one string, it runs.
    let mut fits = job("fits", &["echo ${#BIG}"]);
    fits.env.insert("BIG".into(), "x".repeat(131_000));
    let (status, events) = run_job(&agent, fits).await;
    assert_succeeded(&status, &events);
    assert_eq!(output(&events, pb::Stream::Stdout), "131000\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_step_ends_the_job_with_its_exit_code() {
    require!(Root);
    let agent = Agent::start("");
    let (status, events) = run_job(
        &agent,
        job("fails", &["echo first", "echo boom >&2; exit 3", "echo never"]),
    )
    .await;
    assert_eq!(state(&status), pb::JobState::Failed);
    assert_eq!(failure(&status), pb::FailureKind::Step);
    assert!(status.message.contains("exit status 3"), "{}", status.message);
    // The third did not run: its result says so.
    assert_eq!(status.steps.len(), 3);
    assert_eq!(status.steps[1].exit_code, 3);
    assert_eq!(status.steps[2].started, None);
    assert_eq!(status.steps[2].state, pb::JobState::Unspecified as i32);
    assert_eq!(output(&events, pb::Stream::Stdout), "first\n");
    assert_eq!(output(&events, pb::Stream::Stderr), "boom\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_step_timeout_kills_the_whole_container() {
    require!(Root);
    let agent = Agent::start("[runtime]\ngrace_period = \"2s\"");
    let mut spec = job("slow-step", &["sleep 1000.111 & sleep 1000.112"]);
    spec.steps[0].timeout = Some(prost_types::Duration { seconds: 1, nanos: 0 });
    let (status, _) = run_job(&agent, spec).await;
    assert_eq!(state(&status), pb::JobState::TimedOut, "{status:?}");
    assert_eq!(failure(&status), pb::FailureKind::Timeout);
    assert!(status.message.contains("timeout of 1s"), "{}", status.message);
    assert_eq!(status.steps[0].exit_code, -1);
    assert!(
        host_processes_with("1000.11").is_empty(),
        "a step's process outlived the job"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_timeout_ends_it_timed_out() {
    require!(Root);
    let agent = Agent::start("[runtime]\ngrace_period = \"1s\"");
    let mut spec = job("slow-job", &["true", "sleep 1000.221"]);
    spec.timeout = Some(prost_types::Duration { seconds: 2, nanos: 0 });
    let (status, _) = run_job(&agent, spec).await;
    assert_eq!(state(&status), pb::JobState::TimedOut, "{status:?}");
    assert!(
        status.message.contains("the job exceeded its timeout of 2s"),
        "{}",
        status.message
    );
    assert!(host_processes_with("1000.221").is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_kills_a_running_step_even_one_that_ignores_sigterm() {
    require!(Root);
    let agent = Agent::start("[runtime]\ngrace_period = \"1s\"");
    let mut c = agent.scheduler().await;
    submit(
        &mut c,
        job(
            "cancel-me",
            &["trap '' TERM; echo started; sleep 1000.331; sleep 1000.332"],
        ),
    )
    .await;
    // Wait until the step runs, then cancel.
    let mut s = c
        .watch_job(pb::WatchJobRequest {
            job_id: "cancel-me".into(),
            after_seq: 0,
            follow: true,
        })
        .await
        .unwrap()
        .into_inner();
    while let Some(e) = s.next().await {
        if let Some(pb::job_event::Event::Log(l)) = e.unwrap().event
            && l.data == b"started\n"
        {
            break;
        }
    }
    wait_for("the sleep to start", Duration::from_secs(30), || {
        !host_processes_with("1000.331").is_empty()
    });
    let st = c
        .cancel_job(pb::CancelJobRequest {
            job_id: "cancel-me".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(st.job_id, "cancel-me");
    let events = watch(&mut c, "cancel-me", 0).await;
    let status = final_status(&events);
    assert_eq!(state(&status), pb::JobState::Cancelled);
    assert_eq!(failure(&status), pb::FailureKind::Cancelled);
    assert!(host_processes_with("1000.33").is_empty());
    // Cancelling an ended job is a no-op returning its status.
    let again = c
        .cancel_job(pb::CancelJobRequest {
            job_id: "cancel-me".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state(&again), pb::JobState::Cancelled);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_secret_is_masked_even_split_across_writes_and_never_stored() {
    require!(Root);
    let agent = Agent::start("");
    let mut spec = job(
        "masked",
        &["printf 'token=hun'; sleep 0.3; printf 'ter2-xyz\\n'; echo \"env=$MY_TOKEN\" >&2"],
    );
    spec.secrets.push(pb::Secret {
        name: "MY_TOKEN".into(),
        value: "hunter2-xyz".into(),
    });
    let (status, events) = run_job(&agent, spec).await;
    assert_succeeded(&status, &events);
    assert_eq!(output(&events, pb::Stream::Stdout), "token=[MASKED]\n");
    assert_eq!(output(&events, pb::Stream::Stderr), "env=[MASKED]\n");
    let leaks = files_containing(&agent.state_dir(), b"hunter2-xyz");
    assert!(leaks.is_empty(), "the secret is stored in {leaks:?}");
    assert!(
        !agent.log().contains("hunter2"),
        "the secret is in the agent's log"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_watcher_does_not_grow_the_agent() {
    require!(Root);
    let agent = Agent::start("");
    let mut c = agent.scheduler().await;
    let before = rss_bytes(agent.pid());
    submit(
        &mut c,
        job(
            "flood",
            &["head -c 200000000 /dev/zero | tr '\\0' 'x' | fold -w 100"],
        ),
    )
    .await;
    // A watcher that asks for everything and then reads nothing.
    let mut stalled = agent.operator().await;
    let _held = stalled
        .watch_job(pb::WatchJobRequest {
            job_id: "flood".into(),
            after_seq: 0,
            follow: true,
        })
        .await
        .unwrap()
        .into_inner();
    let mut peak = before;
    let mut op = agent.operator().await;
    loop {
        peak = peak.max(rss_bytes(agent.pid()));
        let s = op
            .get_job(pb::GetJobRequest {
                job_id: "flood".into(),
            })
            .await
            .unwrap()
            .into_inner();
        if s.finished.is_some() {
            assert_eq!(state(&s), pb::JobState::Succeeded, "{s:?}");
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let size = std::fs::metadata(agent.state_dir().join("jobs/flood/events.log"))
        .unwrap()
        .len();
    assert!(size > 200_000_000, "the log holds all output ({size} bytes)");
    let growth = peak.saturating_sub(before);
    println!("agent RSS before {} MB, peak {} MB", before >> 20, peak >> 20);
    assert!(
        growth < 40 << 20,
        "agent RSS grew by {} MB while a watcher stalled",
        growth >> 20
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_step_sees_its_workspace_and_cannot_touch_the_host() {
    require!(Root);
    let agent = Agent::start("");
    // The step's own root directory is writable (its layer); the host's
    // /usr, in its user namespace, is not even there.
    let marker = format!("/runnel-test-{}", std::process::id());
    let in_usr = format!("/usr{marker}");
    let (status, events) = run_job(
        &agent,
        job(
            "isolated",
            &[
                "test \"$(pwd)\" = /workspace && touch /workspace/built && echo ws-ok",
                &format!(
                    "echo x > {marker} && echo wrote-in-container; echo x 2>/dev/null > {in_usr} || echo usr-refused"
                ),
                &format!(
                    "ls {} >/dev/null 2>&1 && echo SEES-STATE || echo state-hidden",
                    agent.state_dir().display()
                ),
                "echo $$; ps -e -o pid= | wc -l",
            ],
        ),
    )
    .await;
    assert_eq!(state(&status), pb::JobState::Succeeded, "{status:?}");
    let out = output(&events, pb::Stream::Stdout);
    assert!(
        out.contains("ws-ok\nwrote-in-container\nusr-refused\nstate-hidden\n"),
        "{out}"
    );
    assert!(
        !std::path::Path::new(&marker).exists(),
        "the step wrote the host's /"
    );
    assert!(
        !std::path::Path::new(&in_usr).exists(),
        "the step wrote the host's /usr"
    );
    // The container is gone, and its run directory with it.
    assert!(!agent.state_dir().join("jobs/isolated/run").exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn runc_runs_the_same_bundle() {
    require!(Root, Runc);
    let agent = Agent::start("[runtime]\nkind = \"runc\"");
    let (status, events) = run_job(
        &agent,
        job(
            "with-runc",
            &["echo via runc; cat /proc/1/cmdline | tr '\\0' ' '"],
        ),
    )
    .await;
    assert_eq!(state(&status), pb::JobState::Succeeded, "{status:?}");
    let out = output(&events, pb::Stream::Stdout);
    assert!(out.starts_with("via runc\n/dev/.runnel-init"), "{out}");
    let mut op = agent.operator().await;
    let info = op
        .get_agent_info(pb::GetAgentInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.runtime, "runc");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_cancelled_while_its_container_starts_leaves_nothing_running() {
    require!(Root);
    let agent = Agent::start("[runtime]\ngrace_period = \"1s\"");
    let mut c = agent.scheduler().await;
    // Cancelled at once: most land while the container starts.
    for i in 0..5 {
        let id = format!("early-cancel-{i}");
        submit(&mut c, job(&id, &["sleep 1000.552"])).await;
        c.cancel_job(pb::CancelJobRequest { job_id: id.clone() })
            .await
            .unwrap();
        let events = watch(&mut c, &id, 0).await;
        assert_eq!(state(&final_status(&events)), pb::JobState::Cancelled, "{id}");
        assert_eq!(
            agent.container_processes(&id),
            Vec::<u32>::new(),
            "{id}: its container is left running"
        );
    }
    assert!(host_processes_with("1000.552").is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn busy_slots_answer_resource_exhausted() {
    require!(Root);
    let agent = Agent::start("max_jobs = 1\n[runtime]\ngrace_period = \"1s\"");
    let mut c = agent.scheduler().await;
    submit(&mut c, job("long", &["sleep 1000.441"])).await;
    let e = c
        .submit_job(pb::SubmitJobRequest {
            job: Some(job("second", &["true"])),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    c.cancel_job(pb::CancelJobRequest {
        job_id: "long".into(),
    })
    .await
    .unwrap();
    let events = watch(&mut c, "long", 0).await;
    assert_eq!(state(&final_status(&events)), pb::JobState::Cancelled);
    wait_for("the slot to be free", Duration::from_secs(10), || {
        let rt = tokio::runtime::Handle::current();
        let mut c2 = c.clone();
        std::thread::spawn(move || {
            rt.block_on(async {
                c2.get_agent_info(pb::GetAgentInfoRequest {})
                    .await
                    .unwrap()
                    .into_inner()
                    .running_jobs
                    == 0
            })
        })
        .join()
        .unwrap()
    });
    submit(&mut c, job("second", &["true"])).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn standard_health_and_reflection_are_served() {
    require!(Root);
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
    };

    let agent = Agent::start("");
    let channel = tonic::transport::Endpoint::from_shared(agent.addr.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel.clone());
    for service in ["", "runnel.agent.v1.Agent"] {
        let r = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.status, ServingStatus::Serving as i32, "{service:?}");
    }
    let mut reflection = ServerReflectionClient::new(channel);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut resp = reflection
        .server_reflection_info(futures::stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let msg = resp.next().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = msg.message_response else {
        panic!("{msg:?}")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.contains(&"runnel.agent.v1.Agent".to_string()), "{names:?}");
    assert!(names.contains(&"grpc.health.v1.Health".to_string()), "{names:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn fifty_jobs_at_once_all_succeed() {
    require!(Root);
    const JOBS: usize = 50;
    let agent = Agent::start(&format!("max_jobs = {JOBS}\n"));
    let tasks: Vec<_> = (0..JOBS)
        .map(|i| {
            let mut c = futures::executor::block_on(agent.scheduler());
            tokio::spawn(async move {
                submit(&mut c, job(&format!("many-{i}"), &["sleep 1"])).await;
                watch(&mut c, &format!("many-{i}"), 0).await
            })
        })
        .collect();
    let mut failed = Vec::new();
    for t in tasks {
        let events = t.await.unwrap();
        let status = final_status(&events);
        if state(&status) != pb::JobState::Succeeded {
            failed.push(format!(
                "{}: {status:?}\n{}",
                status.job_id,
                output(&events, pb::Stream::Stderr)
            ));
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {JOBS} failed:\n{}",
        failed.len(),
        failed.join("\n")
    );
}
