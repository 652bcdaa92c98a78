//! A job's disk limit: what a job writes (its workspace and its container's
//! writable layer) lives on a filesystem of its own; a job that writes past
//! it fails with a message naming the limit, and the agent, the host and
//! the next job carry on. No loop device or mount outlives a job, or a
//! `kill -9` of the agent followed by a restart.

use std::path::Path;
use std::time::Duration;

use crate::support::image::{busybox_layer, write_layout};
use crate::support::sshd::big_repo;
use crate::support::*;
use runnel::api::pb;

const LIMIT: &str = "the job's disk limit of 64 MiB (container.resources.disk_bytes)";

/// A job of `steps` in `image` whose disk is `bytes` (0: the agent's default).
fn with_disk(id: &str, image: &str, bytes: u64, steps: &[&str]) -> pb::JobSpec {
    let mut spec = job(id, steps);
    spec.container = Some(pb::Container {
        image: image.to_string(),
        resources: Some(pb::Resources {
            disk_bytes: bytes,
            ..Default::default()
        }),
        ..Default::default()
    });
    spec
}

/// Writes `mb` MB to `path` and says so if it could.
fn write(path: &str, mb: u32) -> String {
    format!("dd if=/dev/zero of={path} bs=1M count={mb} && echo wrote-it-all")
}

/// Writes 100 MB to `path`: more than 64 MiB.
fn fill(path: &str) -> String {
    write(path, 100)
}

/// Nothing of the agent's jobs is left attached or mounted.
fn assert_nothing_left(state_dir: &Path) {
    let devices = runnel::sys::loopfs::devices_under(state_dir).unwrap();
    assert!(devices.is_empty(), "loop devices left: {devices:?}");
    let mounts = runnel::sys::mount::mounts_under(state_dir).unwrap();
    assert!(mounts.is_empty(), "mounts left: {mounts:?}");
}

fn assert_filled(status: &pb::JobStatus, events: &[pb::JobEvent]) {
    assert_eq!(failure(status), pb::FailureKind::Step, "{status:?}");
    assert!(
        status
            .message
            .contains(&format!("ran out of disk space: it filled {LIMIT}")),
        "{}",
        status.message
    );
    let err = output(events, pb::Stream::Stderr);
    assert!(err.contains("No space left on device"), "{err}");
    assert!(!output(events, pb::Stream::Stdout).contains("wrote-it-all"));
}

#[tokio::test(flavor = "multi_thread")]
async fn writing_past_the_disk_limit_fails_naming_it_and_the_next_job_runs() {
    require!(Root, Busybox);
    let layout = tempfile::tempdir().unwrap();
    write_layout(layout.path(), "v1", &[busybox_layer()], &["PATH=/bin"], "");
    let image = format!("oci:{}:v1", layout.path().display());
    let agent = Agent::start("");

    // In the workspace.
    let spec = with_disk("fill-workspace", "host", 64 << 20, &[&fill("/workspace/big")]);
    let (status, events) = run_job(&agent, spec).await;
    assert_filled(&status, &events);
    assert_nothing_left(&agent.state_dir());

    // In the container's own root (its writable layer), image or host.
    for (id, image) in [("fill-root", image.as_str()), ("fill-host-root", "host")] {
        let spec = with_disk(id, image, 64 << 20, &[&fill("/big")]);
        let (status, events) = run_job(&agent, spec).await;
        assert_filled(&status, &events);
        assert_nothing_left(&agent.state_dir());
    }

    // The agent carries on; the next job has a disk of its own, empty:
    // 40 MB fit, which they would not beside what the last job left.
    let spec = with_disk(
        "after-fill",
        &image,
        64 << 20,
        &[
            "test ! -e /big && test ! -e /workspace/big",
            &write("/workspace/again", 40),
        ],
    );
    let (status, events) = run_job(&agent, spec).await;
    assert_succeeded(&status, &events);
    assert_nothing_left(&agent.state_dir());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_agents_disk_limit_applies_when_the_job_sets_none() {
    require!(Root);
    let agent = Agent::start("[runtime]\ndisk_bytes = 67108864");
    let (status, events) = run_job(&agent, job("default-limit", &[&fill("/workspace/big")])).await;
    assert_filled(&status, &events);
    // A job's own limit wins over the agent's.
    let spec = with_disk("own-limit", "host", 256 << 20, &[&fill("/workspace/big")]);
    let (status, events) = run_job(&agent, spec).await;
    assert_succeeded(&status, &events);
    assert_nothing_left(&agent.state_dir());

    // With no limit, the job writes to the state directory's disk.
    let agent = Agent::start("[runtime]\ndisk_bytes = 0");
    let spec = job(
        "no-limit",
        &["df /workspace /; ! df /workspace / | grep -q /dev/loop"],
    );
    let (status, events) = run_job(&agent, spec).await;
    assert_succeeded(&status, &events);
    assert_nothing_left(&agent.state_dir());
}

#[tokio::test(flavor = "multi_thread")]
async fn after_kill_9_a_restart_detaches_the_jobs_disk() {
    require!(Root);
    let mut agent = Agent::start("[runtime]\ngrace_period = \"1s\"");
    let mut c = agent.scheduler().await;
    submit(
        &mut c,
        with_disk("orphan-disk", "host", 64 << 20, &["sleep 1000.931"]),
    )
    .await;
    wait_for("the step to run", Duration::from_secs(30), || {
        !host_processes_with("1000.931").is_empty()
    });
    let state_dir = agent.state_dir();
    let devices = || runnel::sys::loopfs::devices_under(&state_dir).unwrap();
    assert_eq!(devices().len(), 1, "the job's disk is one loop device");
    agent.kill9();
    assert_eq!(devices().len(), 1, "the job's disk outlives the agent");

    agent.launch();
    let mut c = agent.operator().await;
    let status = final_status(&watch(&mut c, "orphan-disk", 0).await);
    assert_eq!(state(&status), pb::JobState::Lost, "{status:?}");
    assert_nothing_left(&state_dir);
    assert!(!state_dir.join("jobs/orphan-disk/run").exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_checkout_that_fills_the_disk_says_so() {
    require!(Root, Sshd);
    // 24 MiB that do not compress, for a 16 MiB disk.
    let (_keys, user, server) = big_repo(24 << 20);
    // Without the cache, the repository itself is in the workspace.
    let agent = Agent::start("[checkout]\ncache = false");
    let mut spec = with_disk("big-checkout", "host", 16 << 20, &["true"]);
    spec.checkout = Some(pb::Checkout {
        repo_url: server.url("org/big.git"),
        ..Default::default()
    });
    spec.ssh = Some(pb::SshCredentials {
        user_key: user.private_bytes(),
        known_hosts: vec![server.known_hosts_line.clone()],
        ..Default::default()
    });
    let (status, _) = run_job(&agent, spec).await;
    assert_eq!(state(&status), pb::JobState::Failed, "{status:?}");
    assert!(
        status
            .message
            .contains("the job's disk limit of 16 MiB (container.resources.disk_bytes) is full"),
        "{}",
        status.message
    );
    assert_nothing_left(&agent.state_dir());
}
