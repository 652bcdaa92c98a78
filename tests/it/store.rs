//! Caches, workspaces, artifacts and test results (issue 15), through the
//! real binary and runtime, on the `file://` backend and on a real S3
//! server (Garage): two agents with state of their own share the store;
//! templates, prefix fallback, immutable keys, projects kept apart,
//! digests checked, workspaces layered; and attacks: a step that
//! symlinks what it saves to the host's files, and archives crafted and
//! planted in the store with valid digests.

use std::path::Path;

use crate::support::garage::Garage;
use crate::support::*;
use runnel::api::pb;
use runnel::store::{Store, StoreSettings};

/// The store two agents of a test share.
struct Shared {
    /// The `[storage]` section of both agents' config.
    toml: String,
    settings: StoreSettings,
    /// Before each object's project: "" or "PREFIX/".
    prefix: String,
    /// For file://: the directory.
    dir: Option<tempfile::TempDir>,
    /// For s3://: the server, and the directory of its credentials file.
    _garage: Option<(Garage, tempfile::TempDir)>,
}

impl Shared {
    fn file() -> Shared {
        let dir = tempfile::Builder::new()
            .prefix("runnel-store.")
            .tempdir()
            .unwrap();
        let url = format!("file://{}", dir.path().display());
        Shared {
            toml: format!("[storage]\nurl = \"{url}\"\n"),
            settings: StoreSettings {
                url,
                endpoint: None,
                region: None,
                credentials_file: None,
                allow_http: false,
            },
            prefix: String::new(),
            dir: Some(dir),
            _garage: None,
        }
    }

    /// A Garage node of its own; the store under the prefix "ci".
    fn garage() -> Shared {
        let garage = Garage::start();
        let dir = tempfile::tempdir().unwrap();
        let creds = garage.credentials_file(dir.path());
        let url = format!("s3://{}/ci", garage.bucket);
        Shared {
            toml: format!(
                "[storage]\nurl = \"{url}\"\nendpoint = \"{}\"\nregion = \"{}\"\ncredentials_file = \"{}\"\nallow_http = true\n",
                garage.endpoint,
                garage.region,
                creds.display()
            ),
            settings: StoreSettings {
                url,
                endpoint: Some(garage.endpoint.clone()),
                region: Some(garage.region.clone()),
                credentials_file: Some(creds),
                allow_http: true,
            },
            prefix: "ci/".into(),
            dir: None,
            _garage: Some((garage, dir)),
        }
    }

    fn agent(&self) -> Agent {
        Agent::start(&self.toml)
    }

    fn store(&self) -> Store {
        Store::open(&self.settings).unwrap()
    }

    /// Plants `bytes` as cache `key` of `project`, with a manifest that
    /// matches them (as another job of the project could).
    async fn plant_cache(&self, project: &str, key: &str, bytes: &[u8]) {
        let store = self.store();
        let stem = Store::cache_stem(key);
        let p = runnel::store::Progress::default();
        let uploaded = store.upload(project, &stem, bytes, &p).await.unwrap();
        store.commit(project, &stem, "planted", uploaded).await.unwrap();
    }

    /// Replaces the bytes of cache `key` of `project`, its manifest kept.
    async fn corrupt_cache(&self, project: &str, key: &str) {
        let store = self.store();
        let m = store.cache_manifest(project, key).await.unwrap().unwrap();
        store
            .write(
                &store.cache_object(project, key, &m).unwrap(),
                b"not what was saved".to_vec(),
            )
            .await
            .unwrap();
    }
}

fn run(name: &str, script: &str) -> pb::Step {
    pb::Step {
        name: name.into(),
        kind: Some(pb::step::Kind::Run(script.into())),
        ..Default::default()
    }
}

fn kind(name: &str, kind: pb::step::Kind) -> pb::Step {
    pb::Step {
        name: name.into(),
        kind: Some(kind),
        ..Default::default()
    }
}

fn save(key: &str, paths: &[&str]) -> pb::Step {
    kind(
        "save",
        pb::step::Kind::SaveCache(pb::SaveCache {
            key: key.into(),
            paths: paths.iter().map(|p| p.to_string()).collect(),
        }),
    )
}

fn restore(keys: &[&str]) -> pb::Step {
    kind(
        "restore",
        pb::step::Kind::RestoreCache(pb::RestoreCache {
            keys: keys.iter().map(|p| p.to_string()).collect(),
        }),
    )
}

fn persist(root: &str, paths: &[&str]) -> pb::Step {
    kind(
        "persist",
        pb::step::Kind::PersistToWorkspace(pb::PersistToWorkspace {
            root: root.into(),
            paths: paths.iter().map(|p| p.to_string()).collect(),
        }),
    )
}

fn attach(at: &str) -> pb::Step {
    kind(
        "attach",
        pb::step::Kind::AttachWorkspace(pb::AttachWorkspace { at: at.into() }),
    )
}

fn job_in(project: &str, workflow: &str, id: &str, steps: Vec<pb::Step>) -> pb::JobSpec {
    pb::JobSpec {
        project: project.into(),
        workflow_id: workflow.into(),
        ..host_job(id, steps)
    }
}

/// The job succeeded; else its status and whole log.
fn ok(status: &pb::JobStatus, events: &[pb::JobEvent]) {
    assert_eq!(
        state(status),
        pb::JobState::Succeeded,
        "{status:?}\n{}\n{}",
        system(events),
        output(events, pb::Stream::Stderr)
    );
}

fn system(events: &[pb::JobEvent]) -> String {
    output(events, pb::Stream::System)
}

/// A unique name for this run of a test (jobs and projects).
fn unique(prefix: &str) -> String {
    use std::time::{SystemTime, UNIX_EPOCH};
    let n = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
    format!("{prefix}-{n}")
}

async fn caches_are_shared_with_templates_fallback_and_immutable_keys(shared: &Shared) {
    let (a, b) = (shared.agent(), shared.agent());
    let project = unique("p");
    // Agent A saves v1-deps-<checksum of lock one>, then tries to save
    // it again with other content: the first save wins.
    let spec = job_in(
        &project,
        "",
        &unique("save"),
        vec![
            run(
                "deps",
                "echo one > lock && mkdir -p node_modules/a ~/.npm && echo first > node_modules/a/index.js && echo npm > ~/.npm/c",
            ),
            save("v1-deps-{{ checksum \"lock\" }}", &["node_modules", "~/.npm"]),
            run("change", "echo second > node_modules/a/index.js"),
            save("v1-deps-{{ checksum \"lock\" }}", &["node_modules"]),
        ],
    );
    let (status, events) = run_job(&a, spec).await;
    ok(&status, &events);
    let log = system(&events);
    assert!(log.contains("runnel: saving cache v1-deps-"), "{log}");
    assert!(log.contains("exists, skipped"), "{log}");
    // Agent B (state of its own) has another lock file: its exact key
    // misses, the prefix finds A's cache.
    let spec = job_in(
        &project,
        "",
        &unique("restore"),
        vec![
            run("lock", "echo two > lock"),
            restore(&["v1-deps-{{ checksum \"lock\" }}", "v1-deps-"]),
            run("check", "cat node_modules/a/index.js ~/.npm/c"),
        ],
    );
    let (status, events) = run_job(&b, spec).await;
    ok(&status, &events);
    assert_eq!(
        output(&events, pb::Stream::Stdout),
        "first\nnpm\n",
        "{}",
        system(&events)
    );
    assert!(
        system(&events).contains("runnel: restoring cache v1-deps-"),
        "{}",
        system(&events)
    );
    // Project B names the same key: nothing of A's.
    let spec = job_in(
        &unique("other"),
        "",
        &unique("thief"),
        vec![
            restore(&[
                "v1-deps-",
                &format!("../{project}/caches/v1-deps-"),
                "/{{ .Branch }}",
                "v1",
            ]),
            run("check", "test ! -e node_modules && echo none"),
        ],
    );
    let (status, events) = run_job(&b, spec).await;
    ok(&status, &events);
    assert_eq!(output(&events, pb::Stream::Stdout), "none\n");
    let log = system(&events);
    assert!(log.contains("no cache found for keys v1-deps-, v1"), "{log}");
    assert!(
        log.contains("restore.restore_cache.keys[1]: the key") && log.contains("\"..\" segment"),
        "{log}"
    );
    assert!(
        log.contains("restore.restore_cache.keys[2]: the key \"/\" is absolute"),
        "{log}"
    );
}

async fn a_corrupted_cache_is_a_warning_and_a_corrupted_workspace_fails(shared: &Shared) {
    let agent = shared.agent();
    let project = unique("p");
    let spec = job_in(
        &project,
        "wf",
        &unique("save"),
        vec![
            run("make", "mkdir -p out && echo built > out/file"),
            save("v1-x", &["out"]),
            persist("/workspace", &["out"]),
        ],
    );
    let (status, events) = run_job(&agent, spec).await;
    ok(&status, &events);
    shared.corrupt_cache(&project, "v1-x").await;
    let spec = job_in(
        &project,
        "",
        &unique("restore"),
        vec![restore(&["v1-x"]), run("check", "test ! -e out && echo absent")],
    );
    let (status, events) = run_job(&agent, spec).await;
    ok(&status, &events);
    assert_eq!(output(&events, pb::Stream::Stdout), "absent\n");
    let log = system(&events);
    assert!(
        log.contains("runnel: warning:") && log.contains("corrupted or replaced"),
        "{log}"
    );
    // The workspace layer: corrupt its bytes in place.
    let store = shared.store();
    let (object, _) = store.workspace_layers(&project, "wf").await.unwrap().remove(0);
    store.write(&object, b"garbage".to_vec()).await.unwrap();
    let spec = job_in(&project, "wf", &unique("attach"), vec![attach("/workspace")]);
    let (status, events) = run_job(&agent, spec).await;
    assert_eq!(
        failure(&status),
        pb::FailureKind::Storage,
        "{status:?}\n{}",
        system(&events)
    );
    assert!(
        status.message.contains("corrupted or replaced"),
        "{}",
        status.message
    );
    assert!(
        status.message.contains(&object),
        "names the key: {}",
        status.message
    );
}

async fn workspace_layers_stack_in_order(shared: &Shared) {
    let (a, b) = (shared.agent(), shared.agent());
    let project = unique("p");
    let wf = unique("wf");
    let one = job_in(
        &project,
        &wf,
        &unique("one"),
        vec![
            run("build", "mkdir -p dist && echo one > dist/a && echo one > dist/b"),
            persist("/workspace", &["dist"]),
        ],
    );
    let (status, events) = run_job(&a, one).await;
    ok(&status, &events);
    let two = job_in(
        &project,
        &wf,
        &unique("two"),
        vec![
            attach("/workspace"),
            run(
                "more",
                "echo two > dist/b && mkdir -p /tmp/r && echo two > /tmp/r/c",
            ),
            persist("/tmp/r", &["c"]),
            persist("/workspace", &["dist/b"]),
        ],
    );
    let (status, events) = run_job(&b, two).await;
    ok(&status, &events);
    let three = job_in(
        &project,
        &wf,
        &unique("three"),
        vec![attach("ws"), run("check", "cat ws/dist/a ws/dist/b ws/c")],
    );
    let (status, events) = run_job(&a, three).await;
    ok(&status, &events);
    assert_eq!(
        output(&events, pb::Stream::Stdout),
        "one\ntwo\ntwo\n",
        "{}",
        system(&events)
    );
    // Another workflow sees none of it.
    let other = job_in(&project, &unique("wf"), &unique("four"), vec![attach("ws")]);
    let (status, _) = run_job(&a, other).await;
    assert_eq!(failure(&status), pb::FailureKind::Storage);
    assert!(status.message.contains("has no workspace"), "{}", status.message);
}

/// A tar + zstd archive of raw entries: (name, kind, body or link
/// target), names as a hostile archive writes them.
fn crafted(entries: &[(&str, tar::EntryType, &str)]) -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    for (name, kind, body) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(*kind);
        h.set_mode(0o644);
        h.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name.as_bytes());
        let data: &[u8] = if *kind == tar::EntryType::Symlink {
            h.set_link_name(body).unwrap();
            &[]
        } else {
            body.as_bytes()
        };
        h.set_size(data.len() as u64);
        h.set_cksum();
        tar.append(&h, data).unwrap();
    }
    zstd::encode_all(&tar.into_inner().unwrap()[..], 1).unwrap()
}

async fn a_planted_archive_writes_nothing_outside_its_target(shared: &Shared) {
    let agent = shared.agent();
    let project = unique("p");
    // A directory of the host, by absolute path: in a container that
    // sees the host's root (the host image), as a path of its own.
    let host = tempfile::Builder::new()
        .prefix("runnel-victim.")
        .tempdir()
        .unwrap();
    let victim = host.path().display().to_string();
    let agent_pid = agent.pid();
    let archive = crafted(&[
        ("ok/file", tar::EntryType::Regular, "fine"),
        ("../../../../../../escaped", tar::EntryType::Regular, "no"),
        (&format!("{victim}/absolute"), tar::EntryType::Regular, "no"),
        ("tmp/link", tar::EntryType::Symlink, &victim),
        ("tmp/link/through", tar::EntryType::Regular, "no"),
        (
            "tmp/proc",
            tar::EntryType::Symlink,
            &format!("/proc/{agent_pid}/root{victim}"),
        ),
        ("tmp/proc/through", tar::EntryType::Regular, "no"),
    ]);
    shared.plant_cache(&project, "evil", &archive).await;
    let store = shared.store();
    let p = runnel::store::Progress::default();
    let stem = format!("workspaces/wf/{:020}-planted-0", 1);
    let uploaded = store.upload(&project, &stem, &archive[..], &p).await.unwrap();
    store.commit(&project, &stem, "planted", uploaded).await.unwrap();
    let spec = job_in(
        &project,
        "",
        &unique("victim"),
        vec![
            restore(&["evil"]),
            run(
                "check",
                "cat /ok/file; echo; ls /tmp/link/ /tmp/proc/ 2>&1 | grep -c through || true",
            ),
        ],
    );
    let (status, events) = run_job(&agent, spec).await;
    ok(&status, &events);
    let log = system(&events);
    for refused in ["escaped", "/absolute", "tmp/link/through", "tmp/proc/through"] {
        assert!(
            log.lines().any(|l| l.contains("refused:") && l.contains(refused)),
            "{refused} was not refused:\n{log}"
        );
    }
    assert_eq!(output(&events, pb::Stream::Stdout), "fine\n0\n", "{log}");
    // As a workspace: refused entries fail the step, and nothing lands.
    let spec = job_in(&project, "wf", &unique("attach"), vec![attach("/workspace/at")]);
    let (status, events) = run_job(&agent, spec).await;
    assert_eq!(
        failure(&status),
        pb::FailureKind::Storage,
        "{status:?}\n{}",
        system(&events)
    );
    assert!(status.message.contains("refused"), "{}", status.message);
    assert_eq!(
        std::fs::read_dir(host.path()).unwrap().count(),
        0,
        "the host's directory was written"
    );
    for p in ["/escaped", "/workspace/escaped"] {
        assert!(!Path::new(p).exists(), "{p} exists on the host");
    }
}

/// Every file of a tar + zstd archive: (name, content or link target).
fn entries_of(archive: &[u8]) -> Vec<(String, String)> {
    let tar = zstd::decode_all(archive).unwrap();
    let mut ar = tar::Archive::new(&tar[..]);
    let mut out = Vec::new();
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let name = e.path().unwrap().display().to_string();
        let body = match e.link_name().unwrap() {
            Some(l) => l.display().to_string(),
            None => {
                let mut s = String::new();
                let _ = std::io::Read::read_to_string(&mut e, &mut s);
                s
            }
        };
        out.push((name, body));
    }
    out
}

async fn a_saved_symlink_to_a_host_file_saves_no_host_bytes(shared: &Shared) {
    let agent = shared.agent();
    let project = unique("p");
    // A secret of the host, in the agent's own state directory (where
    // other jobs' keys live).
    let secret_dir = agent.state_dir().join("jobs").join("other-job");
    std::fs::create_dir_all(&secret_dir).unwrap();
    let secret = secret_dir.join("id_ed25519");
    std::fs::write(&secret, "HOST-SECRET-KEY-BYTES").unwrap();
    let s = secret.display();
    let spec = job_in(
        &project,
        "",
        &unique("thief"),
        vec![
            run(
                "links",
                &format!(
                    "mkdir -p dist && ln -s {s} dist/key && ln -s /proc/{}/root{s} dist/viaproc && ln -s {} keys",
                    agent.pid(),
                    secret_dir.display()
                ),
            ),
            save(
                "stolen",
                &["dist", "keys", "keys/", "keys/id_ed25519", "dist/key"],
            ),
        ],
    );
    let (status, events) = run_job(&agent, spec).await;
    ok(&status, &events);
    let m = shared.store().cache_manifest(&project, "stolen").await.unwrap();
    let Some(m) = m else {
        // Nothing saved at all is as good.
        return;
    };
    let object = shared.store().cache_object(&project, "stolen", &m).unwrap();
    let bytes = shared.store().read(&object).await.unwrap();
    let entries = entries_of(&bytes);
    assert!(
        !entries.iter().any(|(_, body)| body.contains("HOST-SECRET")),
        "the host's secret is in the cache: {entries:?}"
    );
    assert!(
        entries
            .iter()
            .any(|(n, b)| n.ends_with("dist/key") && b == &s.to_string()),
        "{entries:?}"
    );
}

async fn artifacts_and_test_results_are_kept(shared: &Shared) {
    let agent = shared.agent();
    let project = unique("p");
    let id = unique("tests");
    let xml = r#"<testsuite name="unit" tests="3" failures="1"><testcase classname="a" name="ok"/><testcase classname="a" name="bad"><failure message="expected 1, got 2"/></testcase><testcase classname="a" name="ok2"/></testsuite>"#;
    let spec = job_in(
        &project,
        "",
        &id,
        vec![
            run(
                "write",
                &format!(
                    "mkdir -p reports/unit build && echo '{xml}' > reports/unit/results.xml && echo bin > build/app"
                ),
            ),
            kind(
                "artifacts",
                pb::step::Kind::StoreArtifacts(pb::StoreArtifacts {
                    path: "build".into(),
                    destination: "out".into(),
                }),
            ),
            kind(
                "results",
                pb::step::Kind::StoreTestResults(pb::StoreTestResults {
                    path: "reports".into(),
                }),
            ),
        ],
    );
    let (status, events) = run_job(&agent, spec).await;
    ok(&status, &events);
    let store = shared.store();
    let base = format!("{}{project}/artifacts/{id}", shared.prefix);
    assert_eq!(store.read(&format!("{base}/out/app")).await.unwrap(), b"bin\n");
    let xml_kept = store
        .read(&format!("{base}/test-results/unit/results.xml"))
        .await
        .unwrap();
    assert!(xml_kept.starts_with(b"<testsuite"));
    let r = status.test_results.clone().expect("test results in the status");
    assert_eq!(
        (r.tests, r.failures, r.files),
        (3, 1, 1),
        "{r:?}\n{}",
        system(&events)
    );
    assert_eq!(r.failed[0].name, "bad");
    assert_eq!(r.failed[0].message, "expected 1, got 2");
}

/// A busybox image whose steps run as 1000:1000.
fn user_image() -> tempfile::TempDir {
    use crate::support::image::{Entry, busybox_layer, write_layout};
    let layout = tempfile::tempdir().unwrap();
    let mut layer = busybox_layer();
    layer.push(Entry::File("etc/root-only", b"ROOT-ONLY-SECRET".to_vec(), 0o600));
    write_layout(
        layout.path(),
        "v1",
        &[layer],
        &["PATH=/bin:/usr/bin"],
        "1000:1000",
    );
    layout
}

/// Both runtimes: a cache saved and restored as a step user that is not
/// root; what is restored is that user's, in the container and on the
/// host (the job's range of ids), and the workspace too.
async fn restored_files_belong_to_the_step_user(runtime: &str) {
    let shared = Shared::file();
    let agent = Agent::start(&format!("{}\n[runtime]\nkind = \"{runtime}\"\n", shared.toml));
    let image = user_image();
    let in_image = |mut spec: pb::JobSpec| {
        spec.container = Some(pb::Container {
            image: format!("oci:{}:v1", image.path().display()),
            network: pb::Network::None as i32,
            ..Default::default()
        });
        spec
    };
    let project = unique("p");
    let spec = in_image(job_in(
        &project,
        "wf",
        &unique("save"),
        vec![
            run(
                "make",
                "mkdir -p /tmp/c/d && echo mine > /tmp/c/d/f && echo ws > out",
            ),
            save("v1", &["/tmp/c"]),
            persist(".", &["out"]),
        ],
    ));
    let (status, events) = run_job(&agent, spec).await;
    ok(&status, &events);
    let spec = in_image(job_in(
        &project,
        "wf",
        &unique("restore"),
        vec![
            restore(&["v1"]),
            attach("/tmp/ws"),
            run(
                "check",
                "stat -c '%u:%g %n' /tmp/c/d/f /tmp/c/d /tmp/ws/out; cat /tmp/c/d/f /tmp/ws/out",
            ),
        ],
    ));
    let (status, events) = run_job(&agent, spec).await;
    ok(&status, &events);
    let out = output(&events, pb::Stream::Stdout);
    assert_eq!(
        out,
        "1000:1000 /tmp/c/d/f\n1000:1000 /tmp/c/d\n1000:1000 /tmp/ws/out\nmine\nws\n",
        "{}",
        system(&events)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn restored_files_belong_to_the_step_user_with_the_embedded_runtime() {
    require!(Root, Busybox);
    restored_files_belong_to_the_step_user("libcontainer").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn restored_files_belong_to_the_step_user_with_runc() {
    require!(Root, Busybox, Runc);
    restored_files_belong_to_the_step_user("runc").await;
}

/// The agent's peak resident set size (VmHWM), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap()
        * 1024
}

#[tokio::test(flavor = "multi_thread")]
async fn a_large_cache_streams_with_progress_lines_and_the_agent_stays_small() {
    require!(Root);
    let shared = Shared::file();
    let agent = Agent::start(&format!(
        "{}\n[logs]\nprogress_interval = \"200ms\"\n",
        shared.toml
    ));
    let project = unique("p");
    let (status, events) = run_job(
        &agent,
        job_in(&project, "", &unique("warm"), vec![run("warm", "true")]),
    )
    .await;
    ok(&status, &events);
    let before = peak_rss(agent.pid());
    // 200 MB that zstd cannot shrink, in 200 files.
    let spec = job_in(
        &project,
        "",
        &unique("big"),
        vec![
            run(
                "make",
                "mkdir -p big && for i in $(seq 200); do head -c 1000000 /dev/urandom > big/$i; done",
            ),
            save("big", &["big"]),
            run("drop", "rm -rf big"),
            restore(&["big"]),
            run("check", "ls big | wc -l; du -sk big | cut -f1"),
        ],
    );
    let (status, events) = run_job(&agent, spec).await;
    ok(&status, &events);
    let out = output(&events, pb::Stream::Stdout);
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("200"));
    let kb: u64 = lines.next().unwrap().trim().parse().unwrap();
    assert!(kb >= 195_000, "{out}");
    let log = system(&events);
    assert!(
        log.lines()
            .any(|l| l.starts_with("runnel: saving cache big: ") && l.contains("MB/s")),
        "no progress line while saving:\n{log}"
    );
    assert!(
        log.lines()
            .any(|l| l.starts_with("runnel: saving cache big: ") && l.contains(" in ")),
        "no summary line:\n{log}"
    );
    // What the store holds at once is its parts and ranges in flight, not
    // the cache: the agent grows by a fixed amount (bench/run measures the
    // release build's whole RSS with a 1 GB cache).
    let peak = peak_rss(agent.pid());
    assert!(
        peak.saturating_sub(before) < 36 << 20,
        "the agent's peak RSS went from {} to {} MiB\n{log}",
        before >> 20,
        peak >> 20
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn old_caches_and_artifacts_are_swept_and_operators_list_and_remove_caches() {
    require!(Root);
    let shared = Shared::file();
    let project = unique("p");
    for key in ["v1-old", "v1-new", "v2-other"] {
        shared
            .plant_cache(&project, key, &crafted(&[("f", tar::EntryType::Regular, key)]))
            .await;
    }
    let store = shared.store();
    let p = runnel::store::Progress::default();
    let artifact = store
        .put_artifact(&project, "job1", "out/app", &b"bin"[..], &p)
        .await
        .unwrap();
    let root = shared.dir.as_ref().unwrap().path();
    // Two hours old: the cache and the artifact.
    let old = store.cache_manifest(&project, "v1-old").await.unwrap().unwrap();
    for f in [
        store.cache_object(&project, "v1-old", &old).unwrap(),
        format!("{project}/caches/v1-old.json"),
        artifact.clone(),
    ] {
        let status = std::process::Command::new("touch")
            .args(["-d", "2 hours ago"])
            .arg(root.join(&f))
            .status()
            .unwrap();
        assert!(status.success());
    }
    let agent = Agent::start(&format!(
        "{}cache_max_age = \"1h\"\nartifact_max_age = \"1h\"\n",
        shared.toml
    ));
    wait_for("the sweep", std::time::Duration::from_secs(30), || {
        !root.join(format!("{project}/caches/v1-old.json")).exists() && !root.join(&artifact).exists()
    });
    assert!(root.join(format!("{project}/caches/v1-new.json")).exists());
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(runnel_bin())
            .arg("cache")
            .args(args)
            .arg("--config")
            .arg(&agent.config_path)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, err) = cli(&["ls", &project]);
    assert_eq!(code, Some(0), "{err}");
    let keys: Vec<&str> = out.lines().map(|l| l.split('\t').next().unwrap()).collect();
    assert_eq!(keys, ["v1-new", "v2-other"], "{out}");
    let (_, out, _) = cli(&["ls", &project, "v1-"]);
    assert_eq!(out.lines().count(), 1, "{out}");
    let (code, _, err) = cli(&["rm", &project, "v1-new"]);
    assert_eq!(code, Some(0), "{err}");
    let (code, _, err) = cli(&["rm", &project, "v1-new"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("has no cache \"v1-new\""), "{err}");
    let (code, _, err) = cli(&["rm", &project, "../x"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("\"..\" segment"), "{err}");
    let (_, out, _) = cli(&["ls", &project]);
    assert_eq!(out.lines().count(), 1, "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cache_is_saved_with_the_step_users_rights_not_the_agents() {
    require!(Root, Busybox);
    let shared = Shared::file();
    let agent = shared.agent();
    let image = user_image();
    let project = unique("p");
    let mut spec = job_in(
        &project,
        "",
        &unique("steal"),
        vec![
            run(
                "link",
                "mkdir -p /tmp/c && ln -s /etc/root-only /tmp/c/leak && cat /etc/root-only || true",
            ),
            save("via-link", &["/tmp/c"]),
            save("direct", &["/etc/root-only"]),
        ],
    );
    spec.container = Some(pb::Container {
        image: format!("oci:{}:v1", image.path().display()),
        network: pb::Network::None as i32,
        ..Default::default()
    });
    let (status, events) = run_job(&agent, spec).await;
    ok(&status, &events);
    let log = system(&events);
    // The step itself cannot read it, nor can its save.
    assert!(output(&events, pb::Stream::Stdout).is_empty());
    assert!(
        log.lines()
            .any(|l| l.starts_with("runnel: warning:") && l.contains("Permission denied")),
        "{log}"
    );
    let store = shared.store();
    assert_eq!(store.cache_manifest(&project, "direct").await.unwrap(), None);
    // The link was saved as a link.
    let m = store.cache_manifest(&project, "via-link").await.unwrap().unwrap();
    let bytes = store
        .read(&store.cache_object(&project, "via-link", &m).unwrap())
        .await
        .unwrap();
    let entries = entries_of(&bytes);
    assert!(
        !entries.iter().any(|(_, b)| b.contains("ROOT-ONLY")),
        "{entries:?}"
    );
    assert!(
        entries
            .iter()
            .any(|(n, b)| n.ends_with("c/leak") && b == "/etc/root-only"),
        "{entries:?}"
    );
}

#[test]
fn runnel_run_saves_and_restores_a_cache_through_its_configs_store() {
    require!(Root);
    let shared = Shared::file();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, &shared.toml).unwrap();
    let job = |name: &str, body: &str| {
        let p = dir.path().join(name);
        std::fs::write(
            &p,
            format!("project = \"cli\"\n[container]\nnetwork = \"none\"\n{body}"),
        )
        .unwrap();
        p
    };
    let save = job(
        "save.toml",
        "[[steps]]\nrun = \"mkdir -p deps && echo cached > deps/x\"\n\
         [[steps]]\nsave_cache = { key = \"deps-{{ arch }}\", paths = [\"deps\"] }\n",
    );
    let restore = job(
        "restore.toml",
        "[[steps]]\nrestore_cache = { keys = [\"deps-\"] }\n[[steps]]\nrun = \"cat deps/x\"\n",
    );
    for (file, want) in [(&save, ""), (&restore, "cached\n")] {
        let out = std::process::Command::new(runnel_bin())
            .arg("run")
            .arg(file)
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap();
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(out.status.success(), "{stdout}\n{stderr}");
        assert_eq!(stdout, want, "{stderr}");
    }
}

async fn two_jobs_saving_one_key_at_once_leave_one_whole_cache(shared: &Shared) {
    let (a, b) = (shared.agent(), shared.agent());
    let project = unique("p");
    // 8 MB each: both jobs are still uploading when the other looks for
    // the key, so both pass the "exists" check and race to commit.
    let saver = |who: &str| {
        job_in(
            &project,
            "",
            &unique(who),
            vec![
                run(
                    "make",
                    &format!(
                        "mkdir -p out && echo {who} > out/who && head -c 8000000 /dev/urandom > out/blob \
                         && sha256sum out/blob > out/sum"
                    ),
                ),
                save("race", &["out"]),
            ],
        )
    };
    let ((s1, e1), (s2, e2)) = tokio::join!(run_job(&a, saver("one")), run_job(&b, saver("two")));
    ok(&s1, &e1);
    ok(&s2, &e2);
    let lost = |events: &[pb::JobEvent]| {
        let log = system(events);
        log.contains("exists, skipped") || log.contains("another job saved this key meanwhile")
    };
    // What a restore finds is one job's files, whole: its blob matches
    // its own sum, and its name says whose.
    let spec = job_in(
        &project,
        "",
        &unique("restore"),
        vec![
            restore(&["race"]),
            run("check", "sha256sum -c out/sum >/dev/null && cat out/who"),
        ],
    );
    let (status, events) = run_job(&a, spec).await;
    ok(&status, &events);
    let who = output(&events, pb::Stream::Stdout);
    assert!(who == "one\n" || who == "two\n", "{who:?}");
    // file:// creates a manifest only if none is there: one save won, the
    // other said so, and its object is gone. (An S3 store without
    // conditional writes lets the later commit replace the earlier.)
    if let Some(dir) = &shared.dir {
        assert_eq!(
            [lost(&e1), lost(&e2)].iter().filter(|l| **l).count(),
            1,
            "{}\n{}",
            system(&e1),
            system(&e2)
        );
        let winner = if lost(&e1) { "two\n" } else { "one\n" };
        assert_eq!(who, winner);
        let objects: Vec<String> = std::fs::read_dir(dir.path().join(&project).join("caches"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tar.zst"))
            .collect();
        assert_eq!(objects.len(), 1, "{objects:?}");
    }
}

async fn a_save_cut_short_by_its_timeout_commits_nothing(shared: &Shared) {
    let agent = shared.agent();
    let project = unique("p");
    let mut slow = save("cut", &["big"]);
    slow.timeout = Some(prost_types::Duration { seconds: 1, nanos: 0 });
    let spec = job_in(
        &project,
        "",
        &unique("cut"),
        vec![
            // 600 MB that do not compress: more than a second to save.
            run("make", "head -c 600000000 /dev/urandom > big"),
            slow,
        ],
    );
    let (status, events) = run_job(&agent, spec).await;
    assert_eq!(
        state(&status),
        pb::JobState::TimedOut,
        "{status:?}\n{}",
        system(&events)
    );
    assert_eq!(status.steps[1].state, pb::JobState::TimedOut as i32, "{status:?}");
    // No manifest: the key is free, and a restore finds nothing.
    assert_eq!(
        shared.store().cache_manifest(&project, "cut").await.unwrap(),
        None
    );
    let (status, events) = run_job(
        &agent,
        job_in(&project, "", &unique("after"), vec![restore(&["cut"])]),
    )
    .await;
    ok(&status, &events);
    assert!(system(&events).contains("no cache"), "{}", system(&events));
}

async fn a_key_that_names_a_secret_is_refused_and_the_secret_stored_nowhere(shared: &Shared) {
    let agent = shared.agent();
    let project = unique("p");
    let mut spec = job_in(
        &project,
        "",
        &unique("leak"),
        vec![
            run("make", "mkdir -p out && echo x > out/x"),
            save("deps-{{ .Environment.NPM_TOKEN }}", &["out"]),
        ],
    );
    spec.secrets.push(pb::Secret {
        name: "NPM_TOKEN".into(),
        value: "npm_s3cr3t_value".into(),
    });
    let (status, events) = run_job(&agent, spec).await;
    // A cache save that fails is a warning, as on CircleCI.
    ok(&status, &events);
    let log = system(&events);
    assert!(
        log.contains("{{ .Environment.NPM_TOKEN }} names a secret"),
        "{log}"
    );
    assert!(!log.contains("npm_s3cr3t_value"), "{log}");
    let caches = shared.store().caches(&project, "").await.unwrap();
    assert!(caches.is_empty(), "{caches:?}");
}

/// Each of these suites twice: `file_NAME` on a `file://` store, and
/// `s3_NAME` on a Garage node of its own.
macro_rules! on_both_backends {
    ($($name:ident: $suite:ident;)*) => {
        mod file_backend {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $name() {
                    require!(Root);
                    super::$suite(&Shared::file()).await;
                }
            )*
        }
        mod s3_backend {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $name() {
                    require!(Root, Garage);
                    super::$suite(&Shared::garage()).await;
                }
            )*
        }
    };
}

on_both_backends! {
    caches_are_shared_by_two_agents_with_templates_fallback_and_immutable_keys: caches_are_shared_with_templates_fallback_and_immutable_keys;
    a_corrupted_cache_is_a_warning_and_a_corrupted_workspace_fails: a_corrupted_cache_is_a_warning_and_a_corrupted_workspace_fails;
    workspace_layers_of_a_workflow_stack_in_order: workspace_layers_stack_in_order;
    a_planted_archive_writes_nothing_outside_its_target: a_planted_archive_writes_nothing_outside_its_target;
    a_saved_symlink_to_a_host_file_saves_no_host_bytes: a_saved_symlink_to_a_host_file_saves_no_host_bytes;
    artifacts_and_test_results_are_kept: artifacts_and_test_results_are_kept;
    two_jobs_saving_one_key_at_once_leave_one_whole_cache: two_jobs_saving_one_key_at_once_leave_one_whole_cache;
    a_save_cut_short_by_its_timeout_commits_nothing: a_save_cut_short_by_its_timeout_commits_nothing;
    a_key_that_names_a_secret_is_refused_and_the_secret_stored_nowhere: a_key_that_names_a_secret_is_refused_and_the_secret_stored_nowhere;
}
