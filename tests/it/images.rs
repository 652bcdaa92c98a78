//! Real images in clean containers: pulled from a real registry on loopback
//! or read from an OCI layout, fresh every time, isolated and limited.

use std::path::Path;
use std::time::Duration;

use crate::support::image::{
    Compression, Entry, Registry, busybox_layer, write_layout, write_layout_compressed, write_layout_in,
};
use crate::support::*;
use runnel::api::pb;

fn with_image(id: &str, image: &str, steps: &[&str]) -> pb::JobSpec {
    let mut spec = job(id, steps);
    spec.container = Some(pb::Container {
        image: image.to_string(),
        ..Default::default()
    });
    spec
}

/// A layout with `v1` (busybox; user `builder`; env from the image) and
/// `v2` (v1 plus a layer deleting /etc/image-release).
fn layout() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let env = ["PATH=/bin:/usr/bin", "IMAGE_VAR=from-the-image"];
    write_layout(dir.path(), "v1", &[busybox_layer()], &env, "builder");
    write_layout(
        dir.path(),
        "v2",
        &[busybox_layer(), vec![Entry::Whiteout("etc/image-release")]],
        &env,
        "",
    );
    dir
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_runs_in_an_image_from_a_registry() {
    require!(Root, Busybox, Registry);
    let layout = layout();
    let registry = Registry::start();
    let reference = registry.push(layout.path(), "v1", "test/busybox");
    let agent = Agent::start(&format!(
        "[runtime]\ninsecure_registries = [\"{}\"]",
        registry.addr
    ));
    let (status, events) = run_job(
        &agent,
        with_image(
            "from-registry",
            &reference,
            &["cat /etc/image-release; id -u; echo $IMAGE_VAR $HOME; pwd; touch /workspace/mine && echo ws-writable"],
        ),
    )
    .await;
    assert_succeeded(&status, &events);
    let want = "runnel test image\n1000\nfrom-the-image /home/builder\n/workspace\nws-writable\n";
    assert_eq!(output(&events, pb::Stream::Stdout), want);

    // The image's config is kept by digest: the next job asks the registry
    // only for the tag's manifest. A cached config that is not what its
    // digest says (tampered with) is fetched again, never used.
    let configs = agent.state_dir().join("images/configs");
    let cached: Vec<_> = std::fs::read_dir(&configs)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(cached.len(), 1, "{cached:?}");
    let tampered = String::from_utf8(std::fs::read(&cached[0]).unwrap())
        .unwrap()
        .replace("from-the-image", "from-an-attacker");
    std::fs::write(&cached[0], tampered).unwrap();
    let (status, events) = run_job(
        &agent,
        with_image(
            "from-registry-again",
            &reference,
            &["cat /etc/image-release; id -u; echo $IMAGE_VAR $HOME; pwd; touch /workspace/mine && echo ws-writable"],
        ),
    )
    .await;
    assert_succeeded(&status, &events);
    assert_eq!(output(&events, pb::Stream::Stdout), want);
    assert!(
        !std::fs::read_to_string(&cached[0])
            .unwrap()
            .contains("from-an-attacker")
    );

    // The root's writable layer is thrown away with the job: its overlay
    // is volatile (never synced; unmounting it waits for no disk).
    let (status, events) = run_job(
        &agent,
        with_image(
            "volatile-root",
            &reference,
            &["grep ' / / ' /proc/self/mountinfo | grep -qE '(fsync=|,)volatile' && echo volatile"],
        ),
    )
    .await;
    assert_succeeded(&status, &events);
    assert_eq!(output(&events, pb::Stream::Stdout), "volatile\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn steps_start_in_the_images_working_dir_or_else_in_the_workspace() {
    require!(Root, Busybox);
    let dir = tempfile::tempdir().unwrap();
    let layer = busybox_layer();
    let layers = [(layer.as_slice(), Compression::Gzip)];
    // One the image has, one it has not (made for the job, in its own
    // layer), and none: the workspace, as with "/".
    write_layout_in(dir.path(), "home", &layers, &[], "builder", "/home/builder");
    write_layout_in(dir.path(), "new", &layers, &[], "", "/src/app/");
    write_layout_in(dir.path(), "none", &layers, &[], "", "");
    let agent = Agent::start("");
    for (tag, want) in [
        ("home", "/home/builder"),
        ("new", "/src/app"),
        ("none", "/workspace"),
    ] {
        let image = format!("oci:{}:{tag}", dir.path().display());
        let (status, events) = run_job(
            &agent,
            with_image(
                &format!("workdir-{tag}"),
                &image,
                &["pwd; touch /workspace/w && echo ws-writable", "pwd"],
            ),
        )
        .await;
        assert_succeeded(&status, &events);
        assert_eq!(
            output(&events, pb::Stream::Stdout),
            format!("{want}\nws-writable\n{want}\n"),
            "{tag}"
        );
    }
    // The directory made for a job is in that job's layer, not the cache.
    let (status, events) = run_job(
        &agent,
        with_image(
            "workdir-not-kept",
            &format!("oci:{}:none", dir.path().display()),
            &["test -e /src && echo KEPT || echo not-kept"],
        ),
    )
    .await;
    assert_succeeded(&status, &events);
    assert_eq!(output(&events, pb::Stream::Stdout), "not-kept\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn layers_are_shared_whiteouts_honoured_and_each_job_fresh() {
    require!(Root, Busybox);
    let layout = layout();
    let agent = Agent::start("");
    let v1 = format!("oci:{}:v1", layout.path().display());
    let v2 = format!("oci:{}:v2", layout.path().display());
    let (s1, _) = run_job(
        &agent,
        with_image(
            "first",
            &v2,
            &["echo runnel-first-job-wrote-this > /etc/mark; touch /home/builder/mark2"],
        ),
    )
    .await;
    assert_eq!(state(&s1), pb::JobState::Succeeded, "{s1:?}");
    let (s2, e2) = run_job(
        &agent,
        with_image(
            "second",
            &v2,
            &["set +e; ls -A /home/builder; ls /etc/mark 2>/dev/null; echo end"],
        ),
    )
    .await;
    assert_eq!(state(&s2), pb::JobState::Succeeded, "{s2:?}");
    assert_eq!(
        output(&e2, pb::Stream::Stdout),
        "end\n",
        "the second job saw what the first wrote"
    );
    let (s3, e3) = run_job(
        &agent,
        with_image(
            "whiteout",
            &v2,
            &["test -e /etc/image-release && echo present || echo deleted; id -u"],
        ),
    )
    .await;
    assert_eq!(state(&s3), pb::JobState::Succeeded, "{s3:?}");
    assert_eq!(output(&e3, pb::Stream::Stdout), "deleted\n0\n");
    let (s4, e4) = run_job(
        &agent,
        with_image("lower", &v1, &["cat /etc/image-release; id -u"]),
    )
    .await;
    assert_eq!(state(&s4), pb::JobState::Succeeded, "{s4:?}");
    assert_eq!(output(&e4, pb::Stream::Stdout), "runnel test image\n1000\n");
    // One unpacked copy of the busybox layer serves all three jobs, untouched.
    let unpacked = cached_layers(&agent);
    assert_eq!(unpacked.len(), 2, "{unpacked:?}");
    let layers = agent.state_dir().join("images/layers");
    assert!(files_containing(&layers, b"runnel-first-job-wrote-this").is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_jobs_download_an_image_once() {
    require!(Root, Busybox, Registry);
    let layout = tempfile::tempdir().unwrap();
    let layers = write_layout(layout.path(), "v1", &[busybox_layer()], &[], "");
    let registry = Registry::start();
    let reference = registry.push(layout.path(), "v1", "test/once");
    let agent = Agent::start(&format!(
        "max_jobs = 4\n[runtime]\ninsecure_registries = [\"{}\"]",
        registry.addr
    ));
    let mut c = agent.scheduler().await;
    for i in 0..4 {
        submit(&mut c, with_image(&format!("same-{i}"), &reference, &["true"])).await;
    }
    for i in 0..4 {
        let events = watch(&mut c, &format!("same-{i}"), 0).await;
        assert_eq!(state(&final_status(&events)), pb::JobState::Succeeded);
    }
    let log = registry.log();
    let layer_gets: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(&format!("\"GET /v2/test/once/blobs/{} ", layers[0])))
        .collect();
    assert_eq!(layer_gets.len(), 1, "{layer_gets:#?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn image_failures_say_which() {
    require!(Root, Busybox, Registry);
    let layout = layout();
    let registry = Registry::start();
    let agent = Agent::start(&format!(
        "[runtime]\ninsecure_registries = [\"{}\", \"127.0.0.1:1\"]",
        registry.addr
    ));
    // A blob whose bytes do not match its digest.
    let corrupt = tempfile::tempdir().unwrap();
    let layers = write_layout(corrupt.path(), "v1", &[busybox_layer()], &[], "");
    let blob = corrupt
        .path()
        .join("blobs/sha256")
        .join(layers[0].trim_start_matches("sha256:"));
    let mut bytes = std::fs::read(&blob).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 0xff;
    std::fs::write(&blob, bytes).unwrap();
    let cases = [
        (format!("oci:{}:v1", corrupt.path().display()), "digest mismatch"),
        (
            format!("oci:{}:nope", layout.path().display()),
            "no image tagged \"nope\"",
        ),
        (
            format!("{}/test/missing:v1", registry.addr),
            "not found in registry",
        ),
        ("127.0.0.1:1/test/busybox:v1".to_string(), "unreachable"),
        ("Not A Reference".to_string(), "not an image reference"),
    ];
    for (i, (image, want)) in cases.iter().enumerate() {
        let (status, _) = run_job(&agent, with_image(&format!("bad-{i}"), image, &["true"])).await;
        assert_eq!(failure(&status), pb::FailureKind::Image, "{image}: {status:?}");
        assert!(status.message.contains(want), "{image}: {}", status.message);
        assert!(
            status.message.contains(image.as_str()),
            "{image}: {}",
            status.message
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_sees_only_what_is_its_own() {
    require!(Root, Busybox);
    let layout = layout();
    let agent = Agent::start("max_jobs = 2\n[runtime]\ngrace_period = \"1s\"");
    let image = format!("oci:{}:v2", layout.path().display());
    let secret_file = format!("/root/runnel-host-secret-{}", std::process::id());
    std::fs::write(&secret_file, "host only").unwrap();
    let mut c = agent.scheduler().await;
    // A neighbour job, running while the other looks around.
    submit(
        &mut c,
        with_image(
            "neighbour",
            &image,
            &["touch /workspace/neighbour-file; sleep 1000.551"],
        ),
    )
    .await;
    wait_for("the neighbour to run", Duration::from_secs(30), || {
        !host_processes_with("1000.551").is_empty()
    });
    let agent_pid = agent.pid();
    let (status, events) = run_job(
        &agent,
        with_image(
            "looker",
            &image,
            &[&format!(
                "cat {secret_file} 2>/dev/null || echo no-host-file; \
                 ps -o args | grep -c '[1]000.551' || true; \
                 kill -0 {agent_pid} 2>/dev/null && echo CAN-SIGNAL || echo cannot-signal; \
                 find / -name neighbour-file 2>/dev/null | wc -l; \
                 ls /dev | sort | tr '\\n' ' '; echo; \
                 echo x > /bin/new-in-rootfs && echo rootfs-writable; \
                 cat /proc/1/cmdline | tr '\\0' ' '; echo"
            )],
        ),
    )
    .await;
    std::fs::remove_file(&secret_file).unwrap();
    assert_eq!(state(&status), pb::JobState::Succeeded, "{status:?}");
    let out = output(&events, pb::Stream::Stdout);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "no-host-file", "{out}");
    assert_eq!(lines[1], "0", "the neighbour's processes are visible: {out}");
    assert_eq!(lines[2], "cannot-signal", "{out}");
    assert_eq!(lines[3], "0", "the neighbour's workspace is visible: {out}");
    for dev in lines[4].split_whitespace() {
        assert!(
            [
                ".runnel-init",
                "console",
                "full",
                "mqueue",
                "null",
                "ptmx",
                "pts",
                "random",
                "shm",
                "tty",
                "urandom",
                "zero",
                "core",
                "fd",
                "stderr",
                "stdin",
                "stdout"
            ]
            .contains(&dev),
            "unexpected /dev entry {dev}: {out}"
        );
    }
    assert_eq!(lines[5], "rootfs-writable");
    assert_eq!(lines[6], "/dev/.runnel-init ");
    assert!(files_containing(&agent.state_dir().join("images"), b"new-in-rootfs").is_empty());
    c.cancel_job(pb::CancelJobRequest {
        job_id: "neighbour".into(),
    })
    .await
    .unwrap();
    watch(&mut c, "neighbour", 0).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn network_none_leaves_only_loopback() {
    require!(Root, Busybox);
    let layout = layout();
    let agent = Agent::start("");
    let mut spec = with_image(
        "no-net",
        &format!("oci:{}:v2", layout.path().display()),
        &["ls /sys/class/net | tr '\\n' ' '; echo; cat /sys/class/net/lo/flags"],
    );
    spec.container.as_mut().unwrap().network = pb::Network::None as i32;
    let (status, events) = run_job(&agent, spec).await;
    assert_eq!(state(&status), pb::JobState::Succeeded, "{status:?}");
    let out = output(&events, pb::Stream::Stdout);
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("lo "), "{out}");
    let flags = u32::from_str_radix(lines.next().unwrap().trim_start_matches("0x"), 16).unwrap();
    assert_eq!(flags & 1, 1, "loopback is down: {out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn running_out_of_memory_is_said_plainly() {
    require!(Root, Busybox);
    let layout = layout();
    let agent = Agent::start("");
    let mut spec = with_image(
        "oom",
        &format!("oci:{}:v2", layout.path().display()),
        &["x=$(head -c 300000000 /dev/zero | tr '\\0' a); echo survived ${#x}"],
    );
    spec.container.as_mut().unwrap().resources = Some(pb::Resources {
        memory_bytes: 64 << 20,
        ..Default::default()
    });
    let (status, events) = run_job(&agent, spec).await;
    assert_eq!(failure(&status), pb::FailureKind::Step, "{status:?}");
    assert!(status.message.contains("ran out of memory"), "{}", status.message);
    assert!(status.message.contains("64 MiB"), "{}", status.message);
    assert!(!output(&events, pb::Stream::Stdout).contains("survived"));
    // The agent keeps serving.
    let (ok, _) = run_job(&agent, job("after-oom", &["true"])).await;
    assert_eq!(state(&ok), pb::JobState::Succeeded);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fork_bomb_hits_the_pids_limit_and_the_host_stays_fine() {
    require!(Root, Busybox);
    let layout = layout();
    let agent = Agent::start("[runtime]\ngrace_period = \"1s\"");
    let mut spec = with_image(
        "forkbomb",
        &format!("oci:{}:v2", layout.path().display()),
        &["bomb() { bomb | bomb & }; bomb; sleep 1000.662"],
    );
    spec.steps[0].timeout = Some(prost_types::Duration { seconds: 5, nanos: 0 });
    spec.container.as_mut().unwrap().resources = Some(pb::Resources {
        max_pids: 64,
        ..Default::default()
    });
    let (status, _) = run_job(&agent, spec).await;
    assert_eq!(state(&status), pb::JobState::TimedOut, "{status:?}");
    assert!(
        status.message.contains("process limit of 64"),
        "{}",
        status.message
    );
    assert!(host_processes_with("1000.662").is_empty());
    let (ok, _) = run_job(&agent, job("after-bomb", &["true"])).await;
    assert_eq!(state(&ok), pb::JobState::Succeeded);
}

#[tokio::test(flavor = "multi_thread")]
async fn cpu_and_pids_limits_reach_the_cgroup() {
    require!(Root);
    let agent = Agent::start("[runtime]\ngrace_period = \"1s\"");
    let mut spec = job("limited", &["sleep 1000.771"]);
    spec.container = Some(pb::Container {
        image: "host".into(),
        resources: Some(pb::Resources {
            memory_bytes: 256 << 20,
            max_pids: 99,
            cpu_millis: 500,
            ..Default::default()
        }),
        ..Default::default()
    });
    let mut c = agent.scheduler().await;
    submit(&mut c, spec).await;
    wait_for("the step to run", Duration::from_secs(30), || {
        !host_processes_with("1000.771").is_empty()
    });
    let pid = host_processes_with("1000.771")[0];
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let path_of = |ctrl: &str| {
        cgroups
            .lines()
            .find_map(|l| {
                let mut f = l.splitn(3, ':');
                let (_, ctrls, path) = (f.next()?, f.next()?, f.next()?);
                ctrls.split(',').any(|c| c == ctrl).then(|| path.to_string())
            })
            .unwrap_or_else(|| panic!("no {ctrl} cgroup in {cgroups}"))
    };
    let read = |ctrl: &str, file: &str| {
        std::fs::read_to_string(
            Path::new("/sys/fs/cgroup")
                .join(ctrl)
                .join(path_of(ctrl).trim_start_matches('/'))
                .join(file),
        )
        .unwrap()
        .trim()
        .to_string()
    };
    assert_eq!(read("pids", "pids.max"), "99");
    assert_eq!(
        read("memory", "memory.limit_in_bytes"),
        (256u64 << 20).to_string()
    );
    assert_eq!(read("cpu", "cpu.cfs_quota_us"), "50000");
    c.cancel_job(pb::CancelJobRequest {
        job_id: "limited".into(),
    })
    .await
    .unwrap();
    watch(&mut c, "limited", 0).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn after_kill_9_a_restart_removes_the_jobs_container_mounts_and_cgroups() {
    require!(Root, Busybox);
    let layout = layout();
    let mut agent = Agent::start("[runtime]\ngrace_period = \"1s\"");
    let mut c = agent.scheduler().await;
    submit(
        &mut c,
        with_image(
            "orphan",
            &format!("oci:{}:v2", layout.path().display()),
            &["sleep 1000.881"],
        ),
    )
    .await;
    wait_for("the step to run", Duration::from_secs(30), || {
        !host_processes_with("1000.881").is_empty()
    });
    let pid = host_processes_with("1000.881")[0];
    let cgroup_line = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let pids_cgroup = cgroup_line
        .lines()
        .find(|l| l.split(':').nth(1) == Some("pids"))
        .and_then(|l| l.split(':').nth(2))
        .unwrap()
        .to_string();
    agent.kill9();
    let state_dir = agent.state_dir();
    let mounts = || runnel::sys::mount::mounts_under(&state_dir).unwrap();
    assert!(
        !mounts().is_empty(),
        "the job's root filesystem should still be mounted"
    );
    agent.launch();
    let mut c = agent.operator().await;
    let events = watch(&mut c, "orphan", 0).await;
    let status = final_status(&events);
    assert_eq!(state(&status), pb::JobState::Lost, "{status:?}");
    assert_eq!(failure(&status), pb::FailureKind::Agent);
    assert!(
        host_processes_with("1000.881").is_empty(),
        "the container outlived the restart"
    );
    assert!(mounts().is_empty(), "mounts left: {:?}", mounts());
    assert!(
        !Path::new("/sys/fs/cgroup/pids")
            .join(pids_cgroup.trim_start_matches('/'))
            .exists()
    );
    assert!(!agent.state_dir().join("jobs/orphan/run").exists());
    let log = agent.log();
    assert!(
        log.contains("removed a container left by a previous run"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn in_a_user_namespace_container_root_is_not_host_root() {
    require!(Root, Busybox);
    use std::os::unix::fs::MetadataExt;
    let layout = layout();
    let agent = Agent::start("[runtime]\nkind = \"runc\"\nuserns = true\ngrace_period = \"1s\"");
    let mut c = agent.scheduler().await;
    let image = format!("oci:{}:v2", layout.path().display());
    submit(
        &mut c,
        with_image(
            "userns",
            &image,
            &["cat /proc/self/uid_map; id -u; touch /workspace/made-by-root; echo x > /etc/written && echo etc-writable; sleep 1000.12"],
        ),
    )
    .await;
    let made = agent
        .state_dir()
        .join("jobs/userns/run/disk/workspace/made-by-root");
    // The shell's own command line holds "1000.12" too: wait for its file,
    // made before the sleep starts.
    wait_for("the step to run", Duration::from_secs(60), || {
        made.exists() && !host_processes_with("1000.12").is_empty()
    });
    let pid = host_processes_with("1000.12")[0];
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(
        uid_line.split_whitespace().skip(1).all(|u| u == "100000"),
        "{uid_line}"
    );
    assert_eq!(std::fs::metadata(&made).unwrap().uid(), 100_000);
    c.cancel_job(pb::CancelJobRequest {
        job_id: "userns".into(),
    })
    .await
    .unwrap();
    let events = watch(&mut c, "userns", 0).await;
    let out = output(&events, pb::Stream::Stdout);
    let mut lines = out.lines();
    let map: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(map, ["0", "100000", "65536"], "{out}");
    assert_eq!(lines.next(), Some("0"));
    assert_eq!(
        lines.next(),
        Some("etc-writable"),
        "{out}\n{}",
        output(&events, pb::Stream::Stderr)
    );
    // The host image runs in a user namespace too: tests/it/userns.rs.
}

/// The unpacked layers in the agent's image cache.
fn cached_layers(agent: &Agent) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(agent.state_dir().join("images/layers"))
        .map(|d| d.flatten().map(|e| e.path()).filter(|p| p.is_dir()).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn unused_image_layers_expire_but_never_while_a_job_uses_them() {
    require!(Root, Busybox);
    let layout = layout();
    let agent = Agent::start("[retention]\ncache_max_age = \"2s\"\ninterval = \"1s\"");
    let mut c = agent.scheduler().await;
    let image = format!("oci:{}:v2", layout.path().display());
    submit(&mut c, with_image("holds-layers", &image, &["sleep 1000"])).await;
    wait_running(&c, "holds-layers").await;
    assert_eq!(cached_layers(&agent).len(), 2);
    // Idle for longer than cache_max_age, with sweeps every second: a
    // running job's layers stay.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(cached_layers(&agent).len(), 2, "{}", agent.log());
    c.cancel_job(pb::CancelJobRequest {
        job_id: "holds-layers".into(),
    })
    .await
    .unwrap();
    watch(&mut c, "holds-layers", 0).await;
    // Gone, and said so in the agent's log.
    wait_for("the unused layers to go", Duration::from_secs(60), || {
        cached_layers(&agent).is_empty() && agent.log().contains("removed an unused image layer")
    });
    // The next job pulls them again.
    let (s, e) = run_job(
        &agent,
        with_image(
            "after-expiry",
            &image,
            &["set +e; cat /etc/os-release >/dev/null; echo ok"],
        ),
    )
    .await;
    assert_eq!(state(&s), pb::JobState::Succeeded, "{s:?}");
    assert_eq!(output(&e, pb::Stream::Stdout), "ok\n");
}

/// A directory under /var/tmp, outside the agent's state directory, that
/// hostile layers aim at: a file and a directory with a file.
fn canary() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("runnel-canary-")
        .tempdir_in("/var/tmp")
        .unwrap();
    std::fs::write(dir.path().join("victim"), "precious").unwrap();
    std::fs::create_dir(dir.path().join("dir")).unwrap();
    std::fs::write(dir.path().join("dir/inner"), "also precious").unwrap();
    dir
}

/// All that can be told of `path` and what is below it: names, types,
/// contents, modes, owners, link counts, times and extended attributes.
fn snapshot(path: &Path) -> Vec<String> {
    use std::os::unix::fs::MetadataExt;
    let mut out = Vec::new();
    let mut stack = vec![path.to_path_buf()];
    while let Some(p) = stack.pop() {
        let m = std::fs::symlink_metadata(&p).unwrap();
        let xattrs = xattrs(&p);
        let content = if m.is_file() {
            String::from_utf8_lossy(&std::fs::read(&p).unwrap()).into_owned()
        } else {
            String::new()
        };
        out.push(format!(
            "{} {:o} {}:{} n{} t{}.{} {content:?} {xattrs:?}",
            p.display(),
            m.mode(),
            m.uid(),
            m.gid(),
            m.nlink(),
            m.mtime(),
            m.mtime_nsec()
        ));
        if m.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
        }
    }
    out.sort();
    out
}

/// The extended attributes of `path` (not following a symlink), with values.
fn xattrs(path: &Path) -> Vec<(String, Vec<u8>)> {
    use std::os::unix::ffi::OsStrExt;
    let p = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut names = vec![0u8; 64 * 1024];
    // SAFETY: p is NUL-terminated; the buffer has names.len() writable bytes.
    let n = unsafe { libc::llistxattr(p.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    assert!(
        n >= 0,
        "llistxattr {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    names.truncate(n as usize);
    names
        .split(|b| *b == 0)
        .filter(|n| !n.is_empty())
        .map(|name| {
            let c = std::ffi::CString::new(name).unwrap();
            let mut value = vec![0u8; 64 * 1024];
            // SAFETY: both strings are NUL-terminated; the buffer has value.len() writable bytes.
            let n =
                unsafe { libc::lgetxattr(p.as_ptr(), c.as_ptr(), value.as_mut_ptr().cast(), value.len()) };
            assert!(
                n >= 0,
                "lgetxattr {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            );
            value.truncate(n as usize);
            (String::from_utf8_lossy(name).into_owned(), value)
        })
        .collect()
}

fn raw(path: &str, kind: tar::EntryType, link: Option<&str>, data: &[u8]) -> Entry {
    Entry::Raw {
        path: path.into(),
        kind,
        link: link.map(str::to_string),
        data: data.to_vec(),
    }
}

/// Hostile layers, each with the entry that should be blamed.
fn hostile_layers(canary: &Path) -> Vec<(&'static str, Vec<Entry>, String)> {
    use tar::EntryType as T;
    let c = canary.display().to_string();
    // From the layer's root (images/tmp/<id>/fs under the state dir) up to
    // / and down again.
    let up = format!("../../../../../../../../../..{c}");
    vec![
        (
            "a whiteout through a symlink deletes a host file",
            vec![
                Entry::Symlink("x".into(), c.clone()),
                raw("x/.wh.victim", T::Regular, None, b""),
            ],
            "x/.wh.victim".into(),
        ),
        (
            "an opaque marker through a symlink marks a host directory",
            vec![
                Entry::Symlink("x".into(), c.clone()),
                raw("x/dir/.wh..wh..opq", T::Regular, None, b""),
            ],
            "x/dir/.wh..wh..opq".into(),
        ),
        (
            "an opaque marker through a symlink makes host directories",
            vec![
                Entry::Symlink("x".into(), c.clone()),
                raw("x/made/deeper/.wh..wh..opq", T::Regular, None, b""),
            ],
            "x/made/deeper/.wh..wh..opq".into(),
        ),
        (
            "a hard link to /etc/shadow",
            vec![Entry::HardLink("shadow".into(), "/etc/shadow".into())],
            "shadow".into(),
        ),
        (
            "a hard link up and out to the canary",
            vec![raw("stolen", T::Link, Some(&format!("{up}/victim")), b"")],
            "stolen".into(),
        ),
        (
            "a hard link through a symlink to the canary",
            vec![
                Entry::Symlink("x".into(), c.clone()),
                Entry::HardLink("stolen".into(), "x/victim".into()),
            ],
            "stolen".into(),
        ),
        (
            "a file written up and out",
            vec![raw(&format!("{up}/victim"), T::Regular, None, b"pwned")],
            format!("{up}/victim"),
        ),
        (
            "an absolute symlink, then a write through it",
            vec![
                Entry::Dir("etc"),
                Entry::Symlink("etc/conf".into(), c.clone()),
                raw("etc/conf/victim", T::Regular, None, b"pwned"),
            ],
            "etc/conf/victim".into(),
        ),
        (
            "a relative symlink to a host directory, then a directory and a file under it",
            vec![
                Entry::Symlink("d".into(), format!("{up}/dir")),
                raw("d/sub/", T::Directory, None, b""),
                raw("d/inner", T::Regular, None, b"pwned"),
            ],
            "d/sub/".into(),
        ),
    ]
}

/// Asserts that a job with a hostile image ended as it should: failed for
/// its image, blaming the layer and the entry.
fn assert_refused(what: &str, status: &pb::JobStatus, digest: &str, entry: &str) {
    assert_eq!(state(status), pb::JobState::Failed, "{what}: {status:?}");
    assert_eq!(failure(status), pb::FailureKind::Image, "{what}: {status:?}");
    assert!(
        status.message.contains(&format!("layer {digest}")),
        "{what}: {}",
        status.message
    );
    assert!(
        status.message.contains(&format!("entry {entry:?}")),
        "{what}: {}",
        status.message
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_layers_are_refused_and_the_host_is_untouched() {
    require!(Root, Busybox);
    let canary = canary();
    let before = snapshot(canary.path());
    let shadow = snapshot(Path::new("/etc/shadow"));
    let agent = Agent::start("");
    for (i, (what, entries, entry)) in hostile_layers(canary.path()).into_iter().enumerate() {
        let layout = tempfile::tempdir().unwrap();
        let digests = write_layout(layout.path(), "v1", &[entries], &[], "");
        let image = format!("oci:{}:v1", layout.path().display());
        let (status, _) = run_job(&agent, with_image(&format!("hostile-{i}"), &image, &["true"])).await;
        assert_refused(what, &status, &digests[0], &entry);
        assert_eq!(snapshot(canary.path()), before, "{what}");
        assert_eq!(snapshot(Path::new("/etc/shadow")), shadow, "{what}");
    }
    // Nothing of the refused layers is cached, not even in part.
    assert_eq!(cached_layers(&agent), Vec::<std::path::PathBuf>::new());
    let tmp = agent.state_dir().join("images/tmp");
    assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 0, "{}", tmp.display());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hostile_layer_from_a_registry_is_refused() {
    require!(Root, Busybox, Registry);
    let canary = canary();
    let before = snapshot(canary.path());
    let layout = tempfile::tempdir().unwrap();
    let (what, entries, entry) = hostile_layers(canary.path()).remove(0);
    let digests = write_layout(layout.path(), "v1", &[busybox_layer(), entries], &[], "");
    let registry = Registry::start();
    let reference = registry.push(layout.path(), "v1", "test/hostile");
    let agent = Agent::start(&format!(
        "[runtime]\ninsecure_registries = [\"{}\"]",
        registry.addr
    ));
    let (status, _) = run_job(&agent, with_image("hostile", &reference, &["true"])).await;
    assert_refused(what, &status, &digests[1], &entry);
    assert_eq!(snapshot(canary.path()), before);
    // The good layer below it is cached; the hostile one is not.
    assert_eq!(cached_layers(&agent).len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn links_whiteouts_and_opaque_directories_of_a_layer_work() {
    require!(Root, Busybox, Registry);
    let layout = tempfile::tempdir().unwrap();
    let mut base = busybox_layer();
    base.extend([
        Entry::Dir("opt"),
        Entry::Dir("opt/old"),
        Entry::File("opt/old/lower", b"lower\n".to_vec(), 0o644),
        Entry::File("etc/gone", b"gone\n".to_vec(), 0o644),
    ]);
    let top = vec![
        Entry::Dir("data"),
        Entry::File("data/a", b"A\n".to_vec(), 0o644),
        Entry::Symlink("data/rel".into(), "a".into()),
        Entry::Symlink("data/up".into(), "../data/./a".into()),
        Entry::Symlink("data/abs".into(), "/data/a".into()),
        Entry::HardLink("data/hard".into(), "data/a".into()),
        Entry::HardLink("data/hard-abs".into(), "/data/a".into()),
        Entry::Whiteout("etc/gone"),
        Entry::Opaque("opt/old"),
        Entry::File("opt/old/upper", b"upper\n".to_vec(), 0o644),
    ];
    write_layout(layout.path(), "v1", &[base, top], &["PATH=/bin"], "");
    let agent = Agent::start("");
    let (status, events) = run_job(
        &agent,
        with_image(
            "legit",
            &format!("oci:{}:v1", layout.path().display()),
            &["cat /data/rel /data/up /data/abs /data/hard /data/hard-abs; stat -c %h /data/a; ls /opt/old; \
               test -e /etc/gone && echo present || echo whited-out"],
        ),
    )
    .await;
    assert_succeeded(&status, &events);
    assert_eq!(
        output(&events, pb::Stream::Stdout),
        "A\nA\nA\nA\nA\n3\nupper\nwhited-out\n"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn zstd_layers_run_from_a_layout_and_a_registry() {
    require!(Root, Busybox, Registry);
    let layout = tempfile::tempdir().unwrap();
    let base = busybox_layer();
    let top = vec![Entry::File("etc/zstd", b"from a zstd layer\n".to_vec(), 0o644)];
    write_layout_compressed(
        layout.path(),
        "v1",
        &[(&base, Compression::Zstd), (&top, Compression::Zstd)],
        &["PATH=/bin"],
        "",
    );
    let manifest = std::fs::read_dir(layout.path().join("blobs/sha256"))
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap_or_default())
        .find(|b| b.contains("layer.v1.tar+zstd"));
    assert!(manifest.is_some(), "the layout's manifest names zstd layers");
    let registry = Registry::start();
    let reference = registry.push(layout.path(), "v1", "test/zstd");
    let agent = Agent::start(&format!(
        "[runtime]\ninsecure_registries = [\"{}\"]",
        registry.addr
    ));
    for (id, image) in [
        ("zstd-layout", format!("oci:{}:v1", layout.path().display())),
        ("zstd-registry", reference),
    ] {
        let (status, events) = run_job(&agent, with_image(id, &image, &["cat /etc/zstd"])).await;
        assert_eq!(
            state(&status),
            pb::JobState::Succeeded,
            "{image}: {status:?}\n{}",
            output(&events, pb::Stream::Stderr)
        );
        assert_eq!(
            output(&events, pb::Stream::Stdout),
            "from a zstd layer\n",
            "{image}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pull_says_what_it_got_and_how_far_it_has_come() {
    require!(Root, Busybox, Registry);
    let dir = tempfile::tempdir().unwrap();
    // A layer of 64 MB: unpacking it takes longer than the agent's
    // progress interval of 10 ms.
    write_layout(
        dir.path(),
        "big",
        &[
            busybox_layer(),
            vec![Entry::File("big.bin", vec![0u8; 64 << 20], 0o644)],
        ],
        &["PATH=/bin"],
        "",
    );
    let registry = Registry::start();
    let reference = registry.push(dir.path(), "big", "test/big");
    let agent = Agent::start(&format!(
        "[runtime]\ninsecure_registries = [\"{}\"]\n[logs]\nprogress_interval = \"10ms\"",
        registry.addr
    ));
    let (status, events) = run_job(&agent, with_image("pull-1", &reference, &["true"])).await;
    assert_succeeded(&status, &events);
    let system = output(&events, pb::Stream::System);
    let said = |what: &str| system.lines().filter(|l| l.contains(what)).count();
    assert!(said(&format!("runnel: pulling {reference}: ")) >= 1, "{system}");
    assert!(
        system.contains("layers ready") && system.contains("MB fetched"),
        "{system}"
    );
    let line = system
        .lines()
        .find(|l| l.starts_with(&format!("runnel: image {reference} is sha256:")))
        .unwrap_or_else(|| panic!("{system}"));
    assert!(line.contains("(pulled 2 of 2 layers, "), "{line}");

    // The next job finds it in the cache, and says so.
    let (status, events) = run_job(&agent, with_image("pull-2", &reference, &["true"])).await;
    assert_succeeded(&status, &events);
    let system = output(&events, pb::Stream::System);
    assert!(
        system.contains(&format!("runnel: image {reference} is sha256:")),
        "{system}"
    );
    assert!(system.contains("(cached)"), "{system}");
    assert!(!system.contains("runnel: pulling"), "{system}");
}
