//! Service containers beside the steps (`container.services`): a
//! PostgreSQL server (Debian's, in the `host` image) that a step queries at
//! localhost and by name; a service that never becomes ready, or exits,
//! fails the job naming it; services are refused on the host's network;
//! nothing of a service is left after the job.

use runnel::api::pb;

use crate::support::*;

fn service(name: &str, command: &[&str], ports: &[u32]) -> pb::Service {
    pb::Service {
        name: name.to_string(),
        command: command.iter().map(|s| s.to_string()).collect(),
        ports: ports.to_vec(),
        ..Default::default()
    }
}

fn with_services(mut spec: pb::JobSpec, services: Vec<pb::Service>) -> pb::JobSpec {
    spec.container.get_or_insert_with(Default::default).services = services;
    spec
}

#[tokio::test(flavor = "multi_thread")]
async fn a_step_queries_a_postgresql_service_at_localhost_and_by_name() {
    require!(Root, Postgres, Runc);
    for kind in crate::sandbox::RUNTIMES {
        let agent = crate::sandbox::agent(kind, "");
        postgres_service(&agent).await;
    }
}

async fn postgres_service(agent: &Agent) {
    // PostgreSQL will not run as root: its own user, as Debian made it.
    let postgres = "PG=$(ls -d /usr/lib/postgresql/*/bin | tail -1); \
         exec setpriv --reuid=postgres --regid=postgres --init-groups sh -c \
         \"$PG/initdb --no-sync -A trust -U postgres -D /tmp/pg && exec $PG/postgres -D /tmp/pg -k /tmp -c listen_addresses=localhost\"";
    let mut db = service("db", &["sh", "-c", postgres], &[5432]);
    db.readiness_timeout = Some(prost_types::Duration {
        seconds: 120,
        nanos: 0,
    });
    let spec = with_services(
        job(
            "with-postgres",
            &[
                "psql -h localhost -U postgres -tAc 'select 1'",
                "psql -h db -U postgres -tAc \"select 'by ' || 'name'\"",
            ],
        ),
        vec![db],
    );
    let (status, events) = run_job(agent, spec).await;
    assert_succeeded(&status, &events);
    let out = output(&events, pb::Stream::Stdout);
    assert!(out.contains("\n1\n") || out.starts_with("1\n"), "{out}");
    assert!(out.contains("by name"), "{out}");
    let system = output(&events, pb::Stream::System);
    assert!(system.contains("service db is ready"), "{system}");
    let all = format!("{out}{}", output(&events, pb::Stream::Stderr));
    assert!(
        all.lines().any(|l| l.starts_with("[db] ")),
        "the service's output is not marked: {all}"
    );
    // Nothing of it is left: no process, no mount.
    assert!(host_processes_with("/tmp/pg").is_empty());
    assert!(
        mounts_under(&agent.state_dir()).is_empty(),
        "{:?}",
        mounts_under(&agent.state_dir())
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_service_that_never_becomes_ready_or_exits_fails_the_job_naming_it() {
    require!(Root);
    let agent = Agent::start("max_jobs = 2");
    let mut sleeper = service("sleeper", &["sleep", "3003"], &[9]);
    sleeper.readiness_timeout = Some(prost_types::Duration { seconds: 2, nanos: 0 });
    let (status, events) = run_job(
        &agent,
        with_services(job("never-ready", &["echo MUST-NOT-RUN"]), vec![sleeper]),
    )
    .await;
    assert_eq!(state(&status), pb::JobState::Failed, "{status:?}");
    assert_eq!(failure(&status), pb::FailureKind::Service, "{status:?}");
    assert!(
        status.message.contains("\"sleeper\"")
            && status.message.contains("port 9")
            && status.message.contains("2s"),
        "{}",
        status.message
    );
    assert!(!output(&events, pb::Stream::Stdout).contains("MUST-NOT-RUN"));
    assert!(host_processes_with("sleep 3003").is_empty());

    let (status, _) = run_job(
        &agent,
        with_services(
            job("exits", &["true"]),
            vec![service("quitter", &["sh", "-c", "echo bye; exit 3"], &[9])],
        ),
    )
    .await;
    assert_eq!(failure(&status), pb::FailureKind::Service, "{status:?}");
    assert!(
        status
            .message
            .contains("\"quitter\" exited (exit status: 3) before"),
        "{}",
        status.message
    );
    assert!(mounts_under(&agent.state_dir()).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn services_are_refused_on_the_hosts_network() {
    require!(Root);
    let agent = Agent::start("");
    let mut c = agent.scheduler().await;
    let err = c
        .submit_job(pb::SubmitJobRequest {
            job: Some(with_services(
                host_network(job("svc-host", &["true"])),
                vec![service("x", &["true"], &[])],
            )),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("container.services"), "{}", err.message());
}

#[tokio::test(flavor = "multi_thread")]
async fn after_kill_9_and_a_restart_nothing_of_a_service_is_left() {
    require!(Root);
    let mut agent = Agent::start("");
    let mut c = agent.scheduler().await;
    let spec = with_services(
        job("svc-killed", &["sleep 3002"]),
        vec![service("idler", &["sleep", "3001"], &[])],
    );
    submit(&mut c, spec).await;
    wait_running(&c, "svc-killed").await;
    wait_for(
        "the service's process",
        std::time::Duration::from_secs(60),
        || !host_processes_with("sleep 3001").is_empty(),
    );
    agent.kill9();
    agent.launch();
    assert!(host_processes_with("sleep 3001").is_empty());
    assert!(host_processes_with("sleep 3002").is_empty());
    assert!(
        mounts_under(&agent.state_dir()).is_empty(),
        "{:?}",
        mounts_under(&agent.state_dir())
    );
    let status = get_job(&mut agent.scheduler().await, "svc-killed").await.unwrap();
    assert_eq!(state(&status), pb::JobState::Lost, "{status:?}");
}
