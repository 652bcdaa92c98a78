//! runnel's benchmark suite: each figure is measured beside its peer in the
//! same run on the same machine, and reported as a ratio. Not a test: run it
//! with `bash bench/run` (which installs and starts what it needs: Debian's
//! docker.io, runc, sshd, a registry) or, on a prepared machine, with
//! `cargo bench --bench suite`. `RUNNEL_BENCH_ONLY=start,checkout` runs some
//! sections (start overhead latency throughput checkout checkout-wide concurrent
//! rootfs sandbox network fleet store); `RUNNEL_BENCH_N` sets the number of samples (default 50).
//!
//! It starts the real `runnel` binary (release build) as an agent and drives
//! it over gRPC, exactly as the integration tests do (tests/it/support).

// The bench drives the agent with a part of the tests' helpers.
#[allow(dead_code)]
#[path = "../tests/it/support/mod.rs"]
mod support;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use runnel::api::pb;
use support::image::{Entry, Registry, busybox_layer, write_layout};
use support::sshd::{GitServer, KeyPair, git, sh};
use support::{Agent, Client, job, submit};

/// One line of the result table.
struct Row {
    what: String,
    runnel: String,
    peer: String,
    ratio: String,
    target: String,
}

struct Report {
    rows: Vec<Row>,
    notes: Vec<String>,
}

impl Report {
    fn row(&mut self, what: &str, runnel: String, peer: String, ratio: String, target: &str) {
        println!("  {what}: runnel {runnel} | peer {peer} | {ratio} | target {target}");
        self.rows.push(Row {
            what: what.into(),
            runnel,
            peer,
            ratio,
            target: target.into(),
        });
    }

    fn note(&mut self, note: String) {
        println!("  note: {note}");
        self.notes.push(note);
    }

    fn markdown(&self) -> String {
        let mut s = String::from(
            "| measurement | runnel | peer (same run) | ratio | target |\n|---|---|---|---|---|\n",
        );
        for r in &self.rows {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} |",
                r.what, r.runnel, r.peer, r.ratio, r.target
            );
        }
        for n in &self.notes {
            let _ = write!(s, "\n- {n}");
        }
        s.push('\n');
        s
    }
}

/// Samples in milliseconds.
struct Samples(Vec<f64>);

impl Samples {
    fn pct(&self, p: f64) -> f64 {
        let mut v = self.0.clone();
        if v.is_empty() {
            return f64::NAN;
        }
        v.sort_by(f64::total_cmp);
        // Nearest rank.
        let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
        v[rank.min(v.len()) - 1]
    }
    fn p50(&self) -> f64 {
        self.pct(50.0)
    }
    fn p99(&self) -> f64 {
        self.pct(99.0)
    }
    fn show(&self) -> String {
        format!("p50 {} / p99 {}", ms(self.p50()), ms(self.p99()))
    }
}

/// A difference of two times: "+1.20 ms", "−0.40 ms".
fn signed_ms(v: f64) -> String {
    if v < 0.0 {
        format!("−{}", ms(-v))
    } else {
        format!("+{}", ms(v))
    }
}

fn ms(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0} ms")
    } else if v >= 10.0 {
        format!("{v:.1} ms")
    } else {
        format!("{v:.2} ms")
    }
}

fn since_ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

fn ratio(peer: f64, ours: f64) -> String {
    format!("{:.1}×", peer / ours)
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// Writes `files` files of `total` bytes in all under DIR/node_modules
/// (the same bytes for the same seed): base64 of random bytes, as
/// compressible as minified code. Python, on the host or in a step.
const NODE_MODULES: &str = r#"
import base64, os, random, sys
root, files, total = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
random.seed(15)
per = total // files
for i in range(files):
    d = os.path.join(root, "node_modules", "pkg%d" % (i // 40), "lib")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "f%d.js" % (i % 40)), "wb") as f:
        f.write(base64.b64encode(random.randbytes(per * 3 // 4)))
"#;

/// The seconds step `name` of a job took.
fn step_secs(status: &pb::JobStatus, name: &str) -> f64 {
    let s = status
        .steps
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no step {name}: {status:?}"));
    let d = s.duration.unwrap_or_default();
    d.seconds as f64 + d.nanos as f64 / 1e9
}

/// Save and restore of a 1 GB cache of 20,000 files through Garage:
/// runnel's steps against `tar -I zstd` piped to and from `aws s3 cp`,
/// to the same server in the same run.
async fn bench_store(r: &mut Report, dir: &Path) {
    const FILES: usize = 20_000;
    const BYTES: u64 = 1_000_000_000;
    println!("== store: 1 GB cache of {FILES} files, save + restore via Garage");
    if !Path::new(support::garage::GARAGE).is_file() {
        r.note("store: skipped, Garage is not installed (scripts/test-servers)".into());
        return;
    }
    let garage = support::garage::Garage::start();
    let creds = garage.credentials_file(dir);
    let agent = Agent::start(&format!(
        "[storage]\nurl = \"s3://{}/runnel\"\nendpoint = \"{}\"\nregion = \"{}\"\ncredentials_file = \"{}\"\nallow_http = true\n",
        garage.bucket,
        garage.endpoint,
        garage.region,
        creds.display()
    ));
    let mut c = agent.scheduler().await;
    let step = |name: &str, kind: pb::step::Kind| pb::Step {
        name: name.into(),
        kind: Some(kind),
        ..Default::default()
    };
    let spec = |id: &str, steps: Vec<pb::Step>| pb::JobSpec {
        project: "bench".into(),
        ..support::host_job(id, steps)
    };
    let script = NODE_MODULES.replace('\'', "'\\''");
    let save = spec(
        "store-save",
        vec![
            step(
                "make",
                pb::step::Kind::Run(format!("python3 -c '{script}' app {FILES} {BYTES}")),
            ),
            step(
                "save",
                pb::step::Kind::SaveCache(pb::SaveCache {
                    key: "node-{{ epoch }}".into(),
                    paths: vec!["app/node_modules".into()],
                }),
            ),
        ],
    );
    submit(&mut c, save).await;
    let events = support::watch(&mut c, "store-save", 0).await;
    let status = support::final_status(&events);
    assert_eq!(
        support::state(&status),
        pb::JobState::Succeeded,
        "{status:?}\n{}",
        support::output(&events, pb::Stream::System)
    );
    let saved = step_secs(&status, "save");
    let restore = spec(
        "store-restore",
        vec![
            step(
                "restore",
                pb::step::Kind::RestoreCache(pb::RestoreCache {
                    keys: vec!["node-".into()],
                }),
            ),
            step(
                "count",
                pb::step::Kind::Run("find app/node_modules -type f | wc -l".into()),
            ),
        ],
    );
    submit(&mut c, restore).await;
    let events = support::watch(&mut c, "store-restore", 0).await;
    let status = support::final_status(&events);
    assert_eq!(support::state(&status), pb::JobState::Succeeded, "{status:?}");
    assert_eq!(
        support::output(&events, pb::Stream::Stdout).trim(),
        FILES.to_string()
    );
    let restored = step_secs(&status, "restore");
    let peak = proc_kb(agent.pid(), "VmHWM");

    // The peer: the same files on the host, tar + zstd into aws s3 cp.
    let host = dir.join("peer");
    run_quiet(
        Command::new("python3")
            .args(["-c", NODE_MODULES])
            .arg(&host)
            .args([FILES.to_string(), BYTES.to_string()]),
    );
    let aws = |args: &str| {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", args])
            .env("AWS_ACCESS_KEY_ID", &garage.key_id)
            .env("AWS_SECRET_ACCESS_KEY", &garage.secret)
            .env("AWS_DEFAULT_REGION", &garage.region);
        cmd
    };
    let (e, b) = (&garage.endpoint, &garage.bucket);
    let t = Instant::now();
    run_quiet(&mut aws(&format!(
        "tar -I zstd -C {} -cf - node_modules | aws s3 cp --endpoint-url {e} - s3://{b}/peer.tar.zst",
        host.display()
    )));
    let peer_saved = t.elapsed().as_secs_f64();
    let out = dir.join("peer-out");
    std::fs::create_dir_all(&out).unwrap();
    let t = Instant::now();
    run_quiet(&mut aws(&format!(
        "aws s3 cp --endpoint-url {e} s3://{b}/peer.tar.zst - | tar -I zstd -C {} -xf -",
        out.display()
    )));
    let peer_restored = t.elapsed().as_secs_f64();
    let _ = std::fs::remove_dir_all(&host);
    let _ = std::fs::remove_dir_all(&out);
    let verdict = |ours: f64, peer: f64| {
        if ours <= peer && peak < 64 << 20 {
            "met"
        } else {
            "MISSED"
        }
    };
    r.row(
        "store: save_cache of 1 GB in 20,000 files → Garage (S3)",
        format!("{saved:.1} s, agent peak RSS {}", mib(peak)),
        format!("`tar -I zstd` → `aws s3 cp -`: {peer_saved:.1} s"),
        ratio(peer_saved, saved),
        &format!("≤ peer, RSS < 64 MiB ({})", verdict(saved, peer_saved)),
    );
    r.row(
        "store: restore_cache of the same (download, digest check, unpack)",
        format!("{restored:.1} s, agent peak RSS {}", mib(peak)),
        format!("`aws s3 cp … -` → `tar -I zstd -x`: {peer_restored:.1} s"),
        ratio(peer_restored, restored),
        &format!("≤ peer, RSS < 64 MiB ({})", verdict(restored, peer_restored)),
    );
}

/// A field of /proc/PID/status, in bytes (VmRSS, VmHWM).
fn proc_kb(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap()
        * 1024
}

fn event_time(e: &pb::JobEvent) -> f64 {
    let t = e.time.as_ref().expect("events carry a time");
    t.seconds as f64 * 1000.0 + t.nanos as f64 / 1e6
}

fn state_of(e: &pb::JobEvent) -> Option<pb::JobState> {
    match &e.event {
        Some(pb::job_event::Event::State(s)) => pb::JobState::try_from(s.state).ok(),
        _ => None,
    }
}

fn with_image(mut spec: pb::JobSpec, image: &str) -> pb::JobSpec {
    spec.container = Some(pb::Container {
        image: image.to_string(),
        ..Default::default()
    });
    spec
}

/// Runs `spec` and follows it to the end: its events, each with the time
/// (ms since `t0`) this client received it.
async fn run_timed(c: &mut Client, spec: pb::JobSpec, t0: Instant) -> Vec<(f64, pb::JobEvent)> {
    let id = spec.job_id.clone();
    submit(c, spec).await;
    let mut s = support::events(c, &id, 0).await;
    let mut out = Vec::new();
    while let Some(e) = s.next().await {
        out.push((since_ms(t0), e.expect("event")));
    }
    let last = state_of(&out.last().expect("events").1);
    assert_eq!(
        last,
        Some(pb::JobState::Succeeded),
        "bench job {id} did not succeed: {:?}",
        out.last()
    );
    out
}

fn docker_ok() -> bool {
    Command::new("docker")
        .arg("info")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn run_quiet(cmd: &mut Command) {
    let out = cmd.stdin(Stdio::null()).output().expect("run a peer command");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Times `n` runs of `cmd()`.
fn time_runs(n: usize, mut cmd: impl FnMut(usize) -> Command) -> Samples {
    Samples(
        (0..n)
            .map(|i| {
                let mut c = cmd(i);
                let t = Instant::now();
                run_quiet(&mut c);
                since_ms(t)
            })
            .collect(),
    )
}

/// The busybox image as an OCI layout; its single layer unpacked for runc.
struct BusyboxImage {
    layout: PathBuf,
    rootfs: PathBuf,
}

fn busybox_image(dir: &Path) -> BusyboxImage {
    let layout = dir.join("busybox-layout");
    let digests = write_layout(&layout, "1", &[busybox_layer()], &["PATH=/bin"], "");
    let rootfs = dir.join("runc-bundle/rootfs");
    std::fs::create_dir_all(&rootfs).unwrap();
    let blob = layout
        .join("blobs/sha256")
        .join(digests[0].trim_start_matches("sha256:"));
    sh(Command::new("tar").arg("-xzf").arg(&blob).arg("-C").arg(&rootfs));
    BusyboxImage { layout, rootfs }
}

/// `n` jobs running `true` in `image` on an agent configured with `extra`:
/// submit → end as a watcher sees it, and the phases inside the agent.
async fn job_starts(extra: &str, image: &str, n: usize) -> (Samples, [Samples; 4], String) {
    let mut agent = Agent::new(extra);
    agent.env.push(("RUNNEL_LOG".into(), PHASE_LOG.into()));
    agent.launch();
    let mut c = agent.scheduler().await;
    // The first job pulls and unpacks the image; the rest measure starts.
    run_timed(
        &mut c,
        with_image(job("start-warmup", &["true"]), image),
        Instant::now(),
    )
    .await;
    let mut ours = Vec::new();
    // Where the time goes, from the events' own timestamps: submit →
    // PREPARING (queueing), → RUNNING (rootfs, container start), → step
    // finished (exec of `true`), → the final state (container removal).
    let mut phases: [Vec<f64>; 4] = Default::default();
    for i in 0..n {
        let t0 = Instant::now();
        let events = run_timed(
            &mut c,
            with_image(job(&format!("start-{i}"), &["true"]), image),
            t0,
        )
        .await;
        ours.push(since_ms(t0));
        let at = |pred: &dyn Fn(&pb::JobEvent) -> bool| {
            events.iter().find(|(_, e)| pred(e)).map(|(_, e)| event_time(e))
        };
        let marks = [
            at(&|e| state_of(e) == Some(pb::JobState::Queued)),
            at(&|e| state_of(e) == Some(pb::JobState::Preparing)),
            at(&|e| state_of(e) == Some(pb::JobState::Running)),
            at(&|e| matches!(e.event, Some(pb::job_event::Event::StepFinished(_)))),
            at(&|e| state_of(e) == Some(pb::JobState::Succeeded)),
        ];
        for (k, w) in marks.windows(2).enumerate() {
            if let [Some(a), Some(b)] = w {
                phases[k].push(b - a);
            }
        }
    }
    (Samples(ours), phases.map(Samples), phase_profile(&agent.log(), n))
}

/// The agent's log filter that times each phase of a job.
const PHASE_LOG: &str = "info,runnel::job::lifecycle=debug";

/// p50 of each phase the agent timed (`phase took` lines of its log) over
/// the last `n` jobs, in the order the phases first appear.
fn phase_profile(log: &str, n: usize) -> String {
    let mut order: Vec<String> = Vec::new();
    let mut times: std::collections::HashMap<String, Vec<f64>> = Default::default();
    for line in log.lines().filter(|l| l.contains("phase took")) {
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
                .map(|v| v.trim_matches('"').to_string())
        };
        let (Some(phase), Some(ms)) = (field("phase"), field("ms").and_then(|m| m.parse::<f64>().ok()))
        else {
            continue;
        };
        if !times.contains_key(&phase) {
            order.push(phase.clone());
        }
        times.entry(phase).or_default().push(ms);
    }
    order
        .iter()
        .map(|p| {
            let t = &times[p];
            let last = t[t.len().saturating_sub(n)..].to_vec();
            format!("{p} {}", ms(Samples(last).p50()))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// 1. Step container start: a whole runnel job running `true` in the busybox
///    image (submit → final state seen by a watcher) against `docker run --rm`
///    of the same image and `runc run` on an unpacked bundle.
async fn bench_start(r: &mut Report, n: usize, dir: &Path) {
    println!("== step container start ({n} starts each)");
    let img = busybox_image(dir);
    let registry = Registry::start();
    let reference = registry.push(&img.layout, "1", "bench/busybox");
    let config = |kind: &str| {
        format!(
            "[runtime]\nkind = \"{kind}\"\nnetwork = \"host\"\ninsecure_registries = [\"{}\"]\n",
            registry.addr
        )
    };
    let (ours, phases, profile) = job_starts(&config("libcontainer"), &reference, n).await;
    let (ours_runc, _, profile_runc) = job_starts(&config("runc"), &reference, n).await;

    // runc on the unpacked rootfs: `runc spec`, then `true`, host network.
    let bundle = img.rootfs.parent().unwrap().to_path_buf();
    sh(Command::new("runc").args(["spec"]).current_dir(&bundle));
    let cfg_path = bundle.join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(&cfg_path).unwrap()).unwrap();
    cfg["process"]["terminal"] = false.into();
    cfg["process"]["args"] = serde_json::json!(["true"]);
    cfg["linux"]["namespaces"]
        .as_array_mut()
        .unwrap()
        .retain(|ns| ns["type"] != "network");
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let runc_root = dir.join("runc-root");
    let runc = time_runs(n, |i| {
        let mut cmd = Command::new("runc");
        cmd.arg("--root")
            .arg(&runc_root)
            .args(["run", "--bundle"])
            .arg(&bundle)
            .arg(format!("bench-{}-{i}", std::process::id()));
        cmd
    });

    r.row(
        "1. container start, runnel job `true` in busybox (submit → end)",
        ours.show(),
        format!("`runc run`: {}", runc.show()),
        format!("runc/runnel p50 {}", ratio(runc.p50(), ours.p50())),
        "—",
    );
    r.row(
        "1. the same with `[runtime] kind = \"runc\"`",
        ours_runc.show(),
        format!("`runc run`: {}", runc.show()),
        format!("runc/runnel p50 {}", ratio(runc.p50(), ours_runc.p50())),
        "—",
    );
    r.note(format!(
        "inside the agent, p50 of each phase of those jobs: queued → preparing {}; → running (overlay rootfs, \
         container start) {}; → step finished (exec of `true`) {}; → ended (container removed) {}",
        ms(phases[0].p50()),
        ms(phases[1].p50()),
        ms(phases[2].p50()),
        ms(phases[3].p50()),
    ));
    r.note(format!(
        "p50 of each step of those jobs, as the agent timed it: {profile}"
    ));
    r.note(format!("the same with `kind = \"runc\"`: {profile_runc}"));
    if docker_ok() {
        run_quiet(Command::new("docker").args(["pull", "-q", &reference]));
        let docker = time_runs(n, |_| {
            let mut cmd = Command::new("docker");
            cmd.args(["run", "--rm", "--network", "host", &reference, "true"]);
            cmd
        });
        let verdict = if docker.p50() / ours.p50() >= 10.0 {
            "met"
        } else {
            "MISSED"
        };
        r.row(
            "1. container start vs `docker run --rm --network host` of the same image",
            ours.show(),
            format!("docker: {}", docker.show()),
            format!(
                "docker/runnel p50 {}, p99 {}",
                ratio(docker.p50(), ours.p50()),
                ratio(docker.p99(), ours.p99())
            ),
            &format!("≥ 10× ({verdict})"),
        );
        let _ = Command::new("docker").args(["rmi", "-f", &reference]).output();
    } else {
        r.note("docker is not running: no docker row (bash bench/run starts dockerd)".into());
    }
}

/// 2. Job overhead: SubmitJob → the first byte of `echo hi`, host image.
async fn bench_overhead(r: &mut Report, n: usize) {
    println!("== job overhead ({n} jobs)");
    let agent = Agent::start("");
    let mut c = agent.scheduler().await;
    run_timed(&mut c, job("overhead-warmup", &["echo hi"]), Instant::now()).await;
    let mut first = Vec::new();
    for i in 0..n {
        let t0 = Instant::now();
        let events = run_timed(&mut c, job(&format!("overhead-{i}"), &["echo hi"]), t0).await;
        let (t, _) = events
            .iter()
            .find(|(_, e)| {
                matches!(&e.event, Some(pb::job_event::Event::Log(l)) if l.stream == pb::Stream::Stdout as i32)
            })
            .expect("the step's output");
        first.push(*t);
    }
    let s = Samples(first);
    let verdict = if s.p50() < 100.0 { "met" } else { "MISSED" };
    r.row(
        "2. job overhead: SubmitJob → first byte of `echo hi` (host image, no checkout)",
        s.show(),
        "—".into(),
        "—".into(),
        &format!("p50 < 100 ms ({verdict})"),
    );
}

/// 3. Log latency: a line with its own timestamp every 10 ms; the delay
///    until a gRPC watcher holds it.
async fn bench_latency(r: &mut Report, lines: usize) {
    println!("== log latency ({lines} lines)");
    let agent = Agent::start("");
    let mut c = agent.scheduler().await;
    let step = format!("i=0; while [ $i -lt {lines} ]; do date +%s%N; sleep 0.01; i=$((i+1)); done");
    let spec = job("latency", &[step.as_str()]);
    submit(&mut c, spec).await;
    let mut s = support::events(&mut c, "latency", 0).await;
    let mut delays = Vec::new();
    let mut partial = Vec::new();
    while let Some(e) = s.next().await {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as f64;
        if let Some(pb::job_event::Event::Log(l)) = e.expect("event").event
            && l.stream == pb::Stream::Stdout as i32
        {
            partial.extend_from_slice(&l.data);
            while let Some(nl) = partial.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = partial.drain(..=nl).collect();
                let stamp: f64 = String::from_utf8_lossy(&line).trim().parse().unwrap();
                delays.push((now - stamp) / 1e6);
            }
        }
    }
    assert_eq!(delays.len(), lines, "every line arrived");
    let s = Samples(delays);
    let verdict = if s.p99() < 50.0 { "met" } else { "MISSED" };
    r.row(
        "3. log latency: line printed → held by a gRPC watcher",
        s.show(),
        "—".into(),
        "—".into(),
        &format!("p99 < 50 ms ({verdict})"),
    );
}

/// 4. Log throughput: a step writes 1 GB; the rate it reaches a watcher, and
///    the agent's peak RSS. The peer is the same writer into a host pipe.
async fn bench_throughput(r: &mut Report) {
    const BYTES: u64 = 1_000_000_000;
    println!("== log throughput (1 GB)");
    let agent = Agent::start("");
    let writer =
        format!("yes 'runnel throughput line: 0123456789 abcdefghijklmnopqrstuvwxyz' | head -c {BYTES}");
    let mut c = agent.scheduler().await;
    submit(&mut c, job("throughput", &[writer.as_str()])).await;
    let mut s = support::events(&mut c, "throughput", 0).await;
    let mut got = 0u64;
    let mut first = None;
    let mut last = Instant::now();
    while let Some(e) = s.next().await {
        if let Some(pb::job_event::Event::Log(l)) = e.expect("event").event
            && l.stream == pb::Stream::Stdout as i32
        {
            first.get_or_insert_with(Instant::now);
            got += l.data.len() as u64;
            last = Instant::now();
        }
    }
    assert_eq!(got, BYTES, "every byte reached the watcher");
    let secs = (last - first.unwrap()).as_secs_f64();
    let rate = got as f64 / secs / 1e6;
    let peak = proc_kb(agent.pid(), "VmHWM");

    let t = Instant::now();
    run_quiet(Command::new("sh").args(["-c", &format!("{writer} | cat >/dev/null")]));
    let pipe = BYTES as f64 / t.elapsed().as_secs_f64() / 1e6;
    let verdict = if rate >= 200.0 && peak < 64 << 20 {
        "met"
    } else {
        "MISSED"
    };
    r.row(
        "4. log throughput: 1 GB written by a step → gRPC watcher",
        format!("{rate:.0} MB/s, agent peak RSS {}", mib(peak)),
        format!("same writer into a host pipe: {pipe:.0} MB/s"),
        format!("{:.2} of the pipe", rate / pipe),
        &format!("≥ 200 MB/s, RSS < 64 MiB ({verdict})"),
    );
}

/// A bare repository of `commits` commits made with git fast-import: a tree
/// of `files` files, each commit rewriting one line of one file.
fn big_repo(bare: &Path, commits: usize, files: usize) {
    std::fs::create_dir_all(bare).unwrap();
    git(bare, &["init", "-q", "--bare", "-b", "main"]);
    let mut stream = String::new();
    let mut content: Vec<Vec<String>> = (0..files)
        .map(|f| {
            (0..40)
                .map(|l| format!("file {f} line {l}: {}", "lorem ipsum dolor sit amet ".repeat(3)))
                .collect()
        })
        .collect();
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for i in 0..commits {
        let _ = write!(
            stream,
            "commit refs/heads/main\nmark :{}\ncommitter Bench <bench@localhost> {} +0000\n",
            i + 1,
            1_700_000_000 + i
        );
        let msg = format!("change {i}");
        let _ = write!(stream, "data {}\n{msg}\n", msg.len());
        if i > 0 {
            let _ = writeln!(stream, "from :{i}");
        }
        let touched: Vec<usize> = if i == 0 {
            (0..files).collect()
        } else {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let f = (seed % files as u64) as usize;
            let l = ((seed >> 20) % 40) as usize;
            content[f][l] = format!("file {f} line {l} changed by commit {i} ({seed:x})");
            vec![f]
        };
        for f in touched {
            let body = content[f].join("\n") + "\n";
            let _ = write!(
                stream,
                "M 100644 inline src/dir{}/file{f}.txt\ndata {}\n{body}\n",
                f % 50,
                body.len()
            );
        }
    }
    fast_import(bare, stream.as_bytes());
}

/// Feeds `stream` to `git fast-import` in `bare`, then packs it.
fn fast_import(bare: &Path, stream: &[u8]) {
    let mut child = Command::new("git")
        .args(["fast-import", "--quiet"])
        .current_dir(bare)
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    child.stdin.take().unwrap().write_all(stream).unwrap();
    assert!(child.wait().unwrap().success(), "git fast-import");
    git(bare, &["repack", "-adq"]);
}

/// A git server holding `org/NAME.git` (made by `make` in the bare
/// repository), a user key that reads it, and the ssh command `git` needs.
struct BenchRepo {
    server: GitServer,
    user: KeyPair,
    url: String,
    ssh_cmd: String,
}

impl BenchRepo {
    fn new(keys: &Path, name: &str, make: impl FnOnce(&Path)) -> BenchRepo {
        std::fs::create_dir_all(keys).unwrap();
        let user = KeyPair::generate(keys, "user", "ed25519", "", &[]);
        let server = GitServer::start(&[], &[&user]);
        make(&server.repos().join(format!("org/{name}.git")));
        let kh = keys.join("known_hosts");
        std::fs::write(&kh, format!("{}\n", server.known_hosts_line)).unwrap();
        let ssh_cmd = format!(
            "ssh -i {} -o IdentitiesOnly=yes -o UserKnownHostsFile={} -o StrictHostKeyChecking=yes -o BatchMode=yes",
            user.private.display(),
            kh.display()
        );
        BenchRepo {
            url: server.url(&format!("org/{name}.git")),
            server,
            user,
            ssh_cmd,
        }
    }

    /// A job that checks the repository out and runs `step`.
    fn spec(&self, id: &str, step: &str) -> pb::JobSpec {
        let mut s = job(id, &[step]);
        s.checkout = Some(pb::Checkout {
            repo_url: self.url.clone(),
            ..Default::default()
        });
        s.ssh = Some(pb::SshCredentials {
            user_key: self.user.private_bytes(),
            known_hosts: vec![self.server.known_hosts_line.clone()],
            ..Default::default()
        });
        s
    }
}

/// PREPARING → CheckoutDone of a job, from the events' own timestamps.
fn checkout_ms(events: &[(f64, pb::JobEvent)]) -> f64 {
    let prep = events
        .iter()
        .find(|(_, e)| state_of(e) == Some(pb::JobState::Preparing))
        .expect("PREPARING");
    let done = events
        .iter()
        .find(|(_, e)| matches!(e.event, Some(pb::job_event::Event::Checkout(_))))
        .expect("CheckoutDone");
    event_time(&done.1) - event_time(&prep.1)
}

/// 5. Checkout of a 10,000-commit repository over the local sshd: runnel
///    cold (empty mirror cache), warm (the mirror fetches one new commit),
///    and without a cache, against `git clone` and `git clone --reference`.
async fn bench_checkout(r: &mut Report, runs: usize, dir: &Path) {
    const COMMITS: usize = 10_000;
    println!("== checkout ({COMMITS}-commit repository, {runs} runs each)");
    let repo = BenchRepo::new(&dir.join("keys"), "big", |bare| big_repo(bare, COMMITS, 2000));
    let bare = repo.server.repos().join("org/big.git");
    let pack_bytes: u64 = std::fs::read_dir(bare.join("objects/pack"))
        .unwrap()
        .flatten()
        .map(|e| e.metadata().unwrap().len())
        .sum();
    let (url, ssh_cmd) = (repo.url.as_str(), repo.ssh_cmd.as_str());
    let clones = dir.join("clones");
    let git_clone = |extra: &[&str], dest: &Path| {
        let mut cmd = Command::new("git");
        cmd.env("GIT_SSH_COMMAND", ssh_cmd)
            .args(["clone", "-q"])
            .args(extra)
            .arg(url)
            .arg(dest);
        cmd
    };
    let reference = clones.join("reference");
    run_quiet(&mut git_clone(&[], &reference));
    let cold_git = time_runs(runs, |i| git_clone(&[], &clones.join(format!("cold-{i}"))));
    let ref_arg = format!("--reference={}", reference.display());
    let ref_git = time_runs(runs, |i| git_clone(&[&ref_arg], &clones.join(format!("ref-{i}"))));

    let spec = |id: &str| repo.spec(id, "test -f src/dir0/file0.txt");
    // Cold: a new agent (empty cache) each time.
    let mut cold = Vec::new();
    for i in 0..runs {
        let agent = Agent::start("");
        let mut c = agent.scheduler().await;
        cold.push(checkout_ms(
            &run_timed(&mut c, spec(&format!("cold-{i}")), Instant::now()).await,
        ));
    }
    let mut direct = Vec::new();
    for i in 0..runs {
        let agent = Agent::start("[checkout]\ncache = false\n");
        let mut c = agent.scheduler().await;
        direct.push(checkout_ms(
            &run_timed(&mut c, spec(&format!("direct-{i}")), Instant::now()).await,
        ));
    }
    // Warm: one agent; before each job a new commit lands on the server.
    let agent = Agent::start("");
    let mut c = agent.scheduler().await;
    run_timed(&mut c, spec("warm-first"), Instant::now()).await;
    let work = clones.join("reference");
    let mut warm = Vec::new();
    for i in 0..runs.max(5) {
        std::fs::write(work.join("NEWS"), format!("push {i}\n")).unwrap();
        git(&work, &["add", "NEWS"]);
        git(
            &work,
            &[
                "-c",
                "user.name=b",
                "-c",
                "user.email=b@localhost",
                "commit",
                "-q",
                "-m",
                "news",
            ],
        );
        run_quiet(
            Command::new("git")
                .env("GIT_SSH_COMMAND", ssh_cmd)
                .args(["push", "-q", "origin", "HEAD"])
                .current_dir(&work),
        );
        warm.push(checkout_ms(
            &run_timed(&mut c, spec(&format!("warm-{i}")), Instant::now()).await,
        ));
    }
    let (cold, direct, warm) = (Samples(cold), Samples(direct), Samples(warm));
    let verdict = if cold_git.p50() / warm.p50() >= 5.0 {
        "met"
    } else {
        "MISSED"
    };
    r.row(
        &format!(
            "5. checkout, warm (mirror + 1 new commit; {COMMITS} commits, pack {})",
            mib(pack_bytes)
        ),
        format!("p50 {}", ms(warm.p50())),
        format!("cold `git clone`: p50 {}", ms(cold_git.p50())),
        format!("git clone/runnel warm {}", ratio(cold_git.p50(), warm.p50())),
        &format!("≥ 5× ({verdict})"),
    );
    r.row(
        "5. checkout, warm vs `git clone --reference` (objects already local)",
        format!("p50 {}", ms(warm.p50())),
        format!("`git clone --reference`: p50 {}", ms(ref_git.p50())),
        ratio(ref_git.p50(), warm.p50()),
        "—",
    );
    r.row(
        "5. checkout, cold (empty cache: mirror fetch, then workspace)",
        format!("p50 {}", ms(cold.p50())),
        format!("cold `git clone`: p50 {}", ms(cold_git.p50())),
        ratio(cold_git.p50(), cold.p50()),
        "—",
    );
    r.row(
        "5. checkout without cache (`[checkout] cache = false`)",
        format!("p50 {}", ms(direct.p50())),
        format!("cold `git clone`: p50 {}", ms(cold_git.p50())),
        ratio(cold_git.p50(), direct.p50()),
        "—",
    );
}

/// A bare repository of one commit: `files` small files in 100
/// directories and one `big` bytes file of pseudo-random (incompressible)
/// bytes, made with git fast-import.
fn wide_repo(bare: &Path, files: usize, big: usize) {
    std::fs::create_dir_all(bare).unwrap();
    git(bare, &["init", "-q", "--bare", "-b", "main"]);
    let mut stream = Vec::new();
    stream.extend_from_slice(
        b"commit refs/heads/main\ncommitter Bench <bench@localhost> 1700000000 +0000\ndata 4\nwide\n",
    );
    for f in 0..files {
        let body = format!("file {f}\n{}", "lorem ipsum dolor sit amet\n".repeat(20 + f % 40));
        let _ = std::io::Write::write_all(
            &mut stream,
            format!(
                "M 100644 inline src/d{}/f{f}.txt\ndata {}\n{body}\n",
                f % 100,
                body.len()
            )
            .as_bytes(),
        );
    }
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut blob = Vec::with_capacity(big);
    while blob.len() < big {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        blob.extend_from_slice(&seed.to_le_bytes());
    }
    blob.truncate(big);
    stream.extend_from_slice(format!("M 100644 inline assets/big.bin\ndata {big}\n").as_bytes());
    stream.extend_from_slice(&blob);
    stream.push(b'\n');
    fast_import(bare, &stream);
}

/// 5b. Cold and warm checkout of a wide repository (20,000 files and a
///     50 MB file) against `git clone` in the same run: where writing the
///     files, not fetching history, is the cost.
async fn bench_checkout_wide(r: &mut Report, runs: usize, dir: &Path) {
    const FILES: usize = 20_000;
    const BIG: usize = 50 << 20;
    println!("== checkout of a wide repository ({FILES} files and a 50 MB file, {runs} runs each)");
    let repo = BenchRepo::new(&dir.join("keys-wide"), "wide", |bare| wide_repo(bare, FILES, BIG));
    let (url, ssh_cmd) = (repo.url.as_str(), repo.ssh_cmd.as_str());
    let clones = dir.join("clones-wide");
    let spec = |id: &str| repo.spec(id, "test -f assets/big.bin");
    // Interleaved, so that both see the same machine (page cache, other load).
    let (mut git_ms, mut cold, mut direct, mut warm) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..runs {
        let dest = clones.join(format!("cold-{i}"));
        let t = Instant::now();
        run_quiet(
            Command::new("git")
                .env("GIT_SSH_COMMAND", ssh_cmd)
                .args(["clone", "-q"])
                .arg(url)
                .arg(&dest),
        );
        // Kept until the end: deleting 20,000 files slows the next run's
        // inode allocation on ext4 (recently_deleted), which would be
        // git's handicap, not its cost.
        git_ms.push(since_ms(t));
        let agent = Agent::start("");
        let mut c = agent.scheduler().await;
        cold.push(checkout_ms(
            &run_timed(&mut c, spec(&format!("wide-cold-{i}")), Instant::now()).await,
        ));
        warm.push(checkout_ms(
            &run_timed(&mut c, spec(&format!("wide-warm-{i}")), Instant::now()).await,
        ));
        drop(agent);
        let agent = Agent::start("[checkout]\ncache = false\n");
        let mut c = agent.scheduler().await;
        direct.push(checkout_ms(
            &run_timed(&mut c, spec(&format!("wide-direct-{i}")), Instant::now()).await,
        ));
    }
    let (git_ms, cold, direct, warm) = (Samples(git_ms), Samples(cold), Samples(direct), Samples(warm));
    let verdict = |ours: &Samples| {
        if ours.p50() <= git_ms.p50() {
            "≤ git clone (met)"
        } else {
            "≤ git clone (MISSED)"
        }
    };
    for (what, ours) in [
        ("cold (empty cache: mirror fetch, base layer, workspace)", &cold),
        ("without cache (`[checkout] cache = false`)", &direct),
        ("warm (second job, nothing new)", &warm),
    ] {
        r.row(
            &format!("5b. checkout of {FILES} files + 50 MB, {what}"),
            format!("p50 {}", ms(ours.p50())),
            format!("`git clone`: p50 {}", ms(git_ms.p50())),
            ratio(git_ms.p50(), ours.p50()),
            verdict(ours),
        );
    }
}

/// 6. Idle RSS; 50 concurrent `sleep 1` jobs.
async fn bench_idle_and_concurrent(r: &mut Report) {
    const JOBS: usize = 50;
    println!("== idle RSS, {JOBS} concurrent jobs");
    let agent = Agent::start(&format!("max_jobs = {JOBS}\n"));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = proc_kb(agent.pid(), "VmRSS");
    let anon = proc_kb(agent.pid(), "RssAnon");
    let verdict = if idle < 15 << 20 { "met" } else { "MISSED" };
    r.row(
        "6. idle agent RSS",
        format!(
            "{} ({} anonymous; the rest is pages of the binary and shared libraries)",
            mib(idle),
            mib(anon)
        ),
        "—".into(),
        "—".into(),
        &format!("< 15 MiB ({verdict})"),
    );
    let c = agent.scheduler().await;
    let t0 = Instant::now();
    let tasks: Vec<_> = (0..JOBS)
        .map(|i| {
            let mut c = c.clone();
            tokio::spawn(async move {
                run_timed(&mut c, job(&format!("sleep-{i}"), &["sleep 1"]), Instant::now()).await;
            })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        if t.await.is_ok() {
            ok += 1;
        }
    }
    let wall = t0.elapsed().as_secs_f64();
    let peak = proc_kb(agent.pid(), "VmHWM");
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    r.row(
        &format!("6. {JOBS} concurrent `sleep 1` jobs on {nproc} cores"),
        format!(
            "{ok}/{JOBS} succeeded, wall {wall:.2} s, agent peak RSS {}",
            mib(peak)
        ),
        "ideal: 1 s".into(),
        format!("{:.2}× the ideal", wall),
        &format!("all succeed ({})", if ok == JOBS { "met" } else { "MISSED" }),
    );
    if docker_ok() {
        let img_dir = tempfile::tempdir().unwrap();
        let img = busybox_image(img_dir.path());
        let registry = Registry::start();
        let reference = registry.push(&img.layout, "1", "bench/busybox");
        run_quiet(Command::new("docker").args(["pull", "-q", &reference]));
        let t0 = Instant::now();
        let children: Vec<_> = (0..JOBS)
            .map(|_| {
                Command::new("docker")
                    .args(["run", "--rm", "--network", "host", &reference, "sleep", "1"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap()
            })
            .collect();
        let ok = children
            .into_iter()
            .filter_map(|mut c| c.wait().ok())
            .filter(|s| s.success())
            .count();
        let docker_wall = t0.elapsed().as_secs_f64();
        r.note(format!(
            "peer: {JOBS} concurrent `docker run --rm busybox sleep 1`: {ok}/{JOBS} succeeded, wall {docker_wall:.2} s ({:.1}× runnel's)",
            docker_wall / wall
        ));
        let _ = Command::new("docker").args(["rmi", "-f", &reference]).output();
    }
}

/// Issue 4: the cost of preparing the rootfs of a 100 MB image on second
/// use (an overlay mount over the cached layers: nothing is copied).
/// PREPARING → RUNNING of a job, by its events' own times: image lookup,
/// overlay rootfs, container start.
fn preparing_ms(events: &[(f64, pb::JobEvent)]) -> f64 {
    let at = |s| {
        events
            .iter()
            .find(|(_, e)| state_of(e) == Some(s))
            .map(|(_, e)| event_time(e))
            .unwrap()
    };
    at(pb::JobState::Running) - at(pb::JobState::Preparing)
}

async fn bench_rootfs(r: &mut Report, runs: usize, dir: &Path) {
    println!("== rootfs of a 100 MB image ({runs} jobs)");
    let layout = dir.join("big-layout");
    let mut data = vec![0u8; 100 << 20];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    write_layout(
        &layout,
        "1",
        &[
            busybox_layer(),
            vec![Entry::Dir("data"), Entry::File("data/blob", data, 0o644)],
        ],
        &["PATH=/bin"],
        "",
    );
    let small = busybox_image(dir).layout;
    let agent = Agent::start("");
    let mut c = agent.scheduler().await;
    let big_ref = format!("oci:{}:1", layout.display());
    let small_ref = format!("oci:{}:1", small.display());
    let first = preparing_ms(
        &run_timed(
            &mut c,
            with_image(job("big-first", &["true"]), &big_ref),
            Instant::now(),
        )
        .await,
    );
    run_timed(
        &mut c,
        with_image(job("small-first", &["true"]), &small_ref),
        Instant::now(),
    )
    .await;
    let mut big = Vec::new();
    let mut little = Vec::new();
    for i in 0..runs {
        let ev = run_timed(
            &mut c,
            with_image(job(&format!("big-{i}"), &["test -s /data/blob"]), &big_ref),
            Instant::now(),
        )
        .await;
        big.push(preparing_ms(&ev));
        let ev = run_timed(
            &mut c,
            with_image(job(&format!("small-{i}"), &["true"]), &small_ref),
            Instant::now(),
        )
        .await;
        little.push(preparing_ms(&ev));
    }
    let (big, little) = (Samples(big), Samples(little));
    r.row(
        "issue 4: rootfs + container start, 100 MB image, second use (PREPARING → RUNNING)",
        big.show(),
        format!("same for the 1 MB busybox image: {}", little.show()),
        format!(
            "{:.2}× the small image's (first use, with unpacking: {})",
            big.p50() / little.p50(),
            ms(first)
        ),
        "no copy: ≈ 1×",
    );
}

/// The sandbox's cost: job start (busybox, submit → end) with everything
/// on (the job's user namespace, its own disk, the seccomp filter, the
/// cgroup and device restrictions, as by default) against the same agent
/// with the configurable parts off (`userns = false`, `disk_bytes = 0`),
/// and each of those alone, jobs of the three agents taking turns.
async fn bench_sandbox(r: &mut Report, n: usize, dir: &Path) {
    println!("== job start with and without the sandbox ({n} jobs each)");
    let image = format!("oci:{}:1", busybox_image(dir).layout.display());
    let ([full, no_userns, none], [p_full, p_no_userns, p_none]) = starts_side_by_side(
        [
            "[runtime]\nnetwork = \"host\"",
            "[runtime]\nnetwork = \"host\"\nuserns = false",
            "[runtime]\nnetwork = \"host\"\nuserns = false\ndisk_bytes = 0",
        ],
        &image,
        "sandbox",
        n,
    )
    .await;
    let extra = full.p50() - none.p50();
    r.row(
        "sandbox: job start, busybox, full sandbox (default) vs `userns = false` + `disk_bytes = 0` (submit → end)",
        full.show(),
        format!("without: {}", none.show()),
        format!("{} p50", signed_ms(extra)),
        &format!("< 10 ms p50 more ({})", if extra < 10.0 { "met" } else { "MISSED" }),
    );
    r.note(format!(
        "of which the user namespace (idmapped layers, id maps) {} p50, the job's own disk {} p50; PREPARING → \
         RUNNING p50: {} full, {} without userns, {} without either",
        signed_ms(full.p50() - no_userns.p50()),
        signed_ms(no_userns.p50() - none.p50()),
        ms(p_full.p50()),
        ms(p_no_userns.p50()),
        ms(p_none.p50()),
    ));
    let t = Instant::now();
    let runs = 20;
    for _ in 0..runs {
        runnel::runtime::seccomp::bpf().unwrap();
    }
    r.note(format!(
        "the seccomp filter, which cannot be turned off, is compiled in each `runnel oci run`/`exec`: {} per \
         compile (mean of {runs}, in this process)",
        ms(since_ms(t) / runs as f64),
    ));
}

/// Job start with a private network (veth, rules, resolv.conf) against
/// `none` (a namespace with loopback only), two agents taking turns.
async fn bench_network(r: &mut Report, n: usize, dir: &Path) {
    println!("== job start with a private network and with none ({n} jobs each)");
    let image = format!("oci:{}:1", busybox_image(dir).layout.display());
    let ([private, none], [p_private, p_none]) = starts_side_by_side(
        [
            "[runtime]\nnetwork = \"private\"",
            "[runtime]\nnetwork = \"none\"",
        ],
        &image,
        "net",
        n,
    )
    .await;
    r.row(
        "job start, busybox, private network (submit → end)",
        private.show(),
        format!("`network = \"none\"`: {}", none.show()),
        format!("+{} p50", ms(private.p50() - none.p50())),
        "< 10 ms p50 more",
    );
    r.note(format!(
        "PREPARING → RUNNING (with the veth, its rules and resolv.conf): p50 {} private, {} none",
        ms(p_private.p50()),
        ms(p_none.p50()),
    ));
}

/// A 1 GB download from the test internet's HTTP server (by name,
/// through NAT) in a private job, against the same in a job on the host's
/// network, three of each taking turns; curl's own rate.
async fn bench_download(r: &mut Report) {
    const BYTES: u64 = 1 << 30;
    println!("== download of 1 GiB, private network and host network");
    let net = support::internet::Internet::new(&[]);
    net.sparse_file("big", BYTES);
    let agent = Agent::start(&format!("[network]\ndns = [\"{}\"]", net.dns));
    let mut c = agent.scheduler().await;
    let fetch = format!(
        "curl -sS -o /dev/null -w '%{{speed_download}}\\n' --resolve {}:80:{} {}",
        support::internet::NAME,
        net.http,
        net.url("big")
    );
    let mut rates: [Vec<f64>; 2] = Default::default();
    for i in 0..3 {
        for (k, host) in [false, true].into_iter().enumerate() {
            let mut spec = job(&format!("download-{i}-{k}"), &[fetch.as_str()]);
            if host {
                spec = support::host_network(spec);
            }
            let events = run_timed(&mut c, spec, Instant::now()).await;
            let out: String = events
                .iter()
                .filter_map(|(_, e)| match &e.event {
                    Some(pb::job_event::Event::Log(l)) if l.stream == pb::Stream::Stdout as i32 => {
                        Some(String::from_utf8_lossy(&l.data).into_owned())
                    }
                    _ => None,
                })
                .collect();
            let rate: f64 = out.trim().parse().unwrap_or_else(|_| panic!("curl said {out:?}"));
            rates[k].push(rate / 1e6);
        }
    }
    let [private, host] = rates.map(Samples);
    r.row(
        "download of 1 GiB over HTTP, private network (NAT), MB/s",
        format!("p50 {:.0} MB/s", private.p50()),
        format!("host network: p50 {:.0} MB/s", host.p50()),
        format!("{:.0} %", 100.0 * private.p50() / host.p50()),
        "≥ 80 % of host",
    );
}

/// `n` jobs of `true` in `image` on each of N agents (configs `extra`),
/// taking turns so that the machine's load falls on both alike: submit →
/// end, and PREPARING → RUNNING (rootfs, container start), per agent.
async fn starts_side_by_side<const N: usize>(
    extra: [&str; N],
    image: &str,
    prefix: &str,
    n: usize,
) -> ([Samples; N], [Samples; N]) {
    let agents = extra.map(Agent::start);
    let mut clients = Vec::new();
    for a in &agents {
        let mut c = a.scheduler().await;
        let warmup = with_image(job(&format!("{prefix}-warmup"), &["true"]), image);
        run_timed(&mut c, warmup, Instant::now()).await;
        clients.push(c);
    }
    let mut total: [Vec<f64>; N] = std::array::from_fn(|_| Vec::new());
    let mut prepare: [Vec<f64>; N] = std::array::from_fn(|_| Vec::new());
    for i in 0..n {
        for (k, c) in clients.iter_mut().enumerate() {
            let t0 = Instant::now();
            let events = run_timed(c, with_image(job(&format!("{prefix}-{i}"), &["true"]), image), t0).await;
            total[k].push(since_ms(t0));
            prepare[k].push(preparing_ms(&events));
        }
    }
    (total.map(Samples), prepare.map(Samples))
}

fn machine_summary() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")?
                .split_once(':')
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_default();
    let mem = proc_meminfo_gib();
    let kernel = sh(Command::new("uname").arg("-r")).trim().to_string();
    let os = std::fs::read_to_string("/etc/os-release")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("PRETTY_NAME=")
                .map(|v| v.trim_matches('"').to_string())
        })
        .unwrap_or_default();
    let cgroup = if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        "cgroup v2"
    } else {
        "cgroup v1"
    };
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let migration = cgroup_migration_ms().map_or(String::new(), |m| {
        format!(" (moving a process into a cgroup: {}, see BENCHMARKS.md)", ms(m))
    });
    format!("{nproc} × {cpu}, {mem:.0} GiB RAM, {os}, Linux {kernel}, {cgroup}{migration}")
}

/// p50 of moving a process into a cgroup of the cgroup2 hierarchy, 100 ms
/// apart: an RCU grace period each (5–15 ms) unless the kernel favours
/// dynamic cgroup changes (`cgroup_favordynmods`); every container start
/// and exec pays it, for runnel, runc and docker alike.
fn cgroup_migration_ms() -> Option<f64> {
    let root = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.join("cgroup.procs").exists() && p.join("cgroup.subtree_control").exists())?;
    let dir = root.join(format!("runnel-bench-{}", std::process::id()));
    std::fs::create_dir(&dir).ok()?;
    let mut child = Command::new("sleep").arg("10").spawn().ok()?;
    let pid = child.id().to_string();
    let mut times = Vec::new();
    for _ in 0..7 {
        std::thread::sleep(Duration::from_millis(100));
        let t = Instant::now();
        if std::fs::write(dir.join("cgroup.procs"), &pid).is_err() {
            break;
        }
        times.push(since_ms(t));
        let _ = std::fs::write(root.join("cgroup.procs"), &pid);
    }
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir(&dir);
    (!times.is_empty()).then(|| Samples(times).p50())
}

fn proc_meminfo_gib() -> f64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("MemTotal:")?
                .split_whitespace()
                .next()?
                .parse::<f64>()
                .ok()
        })
        .unwrap_or(0.0)
        / (1024.0 * 1024.0)
}

/// When each job was published (or queued by the push scheduler), taken
/// by an agent and finished, by job id.
#[derive(Default)]
struct FleetRun {
    queued: std::collections::HashMap<String, SystemTime>,
    taken: std::collections::HashMap<String, (SystemTime, SystemTime)>,
}

impl FleetRun {
    /// Jobs per second from the first queued to the last finished, and the
    /// waits from queued to taken.
    fn figures(&self) -> (f64, Samples) {
        let first = self.queued.values().min().copied().unwrap();
        let last = self.taken.values().map(|t| t.1).max().unwrap();
        let secs = last.duration_since(first).unwrap_or_default().as_secs_f64();
        let waits = self
            .taken
            .iter()
            .map(|(id, (taken, _))| {
                taken
                    .duration_since(self.queued[id])
                    .unwrap_or_default()
                    .as_secs_f64()
                    * 1000.0
            })
            .collect();
        (self.taken.len() as f64 / secs, Samples(waits))
    }
}

fn status_times(s: &pb::JobStatus) -> (SystemTime, SystemTime) {
    let t = |t: Option<prost_types::Timestamp>| SystemTime::try_from(t.unwrap()).unwrap();
    (t(s.created), t(s.finished))
}

/// `jobs` jobs of `true` through three agents: published to NATS JetStream
/// (the agents pull), then the same jobs pushed over gRPC to the same
/// agents by a scheduler that knows every agent and keeps one submitter
/// per slot (the push model at its best: it never asks a full agent).
async fn bench_fleet(r: &mut Report, jobs: usize) {
    use async_nats::jetstream;
    println!("== fleet: {jobs} jobs of `true` through three agents, NATS pull vs gRPC push");
    const SLOTS: usize = 4;
    let nats = support::nats::NatsServer::start();
    let agents: Vec<Agent> = (0..3)
        .map(|i| {
            Agent::start(&format!(
                "agent_id = \"bench-{i}\"\nmax_jobs = {SLOTS}\n[intake.nats]\nurl = \"{}\"\n[runtime]\nnetwork = \"none\"\n",
                nats.url()
            ))
        })
        .collect();
    for a in &agents {
        support::wait_for("the agent's NATS intake", Duration::from_secs(60), || {
            a.log().contains("taking jobs from NATS")
        });
    }
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = jetstream::new(client.clone());

    // Pull: every final state seen on the events stream's subjects.
    let mut pull = FleetRun::default();
    let mut finals = client.subscribe("runnel.events.>").await.unwrap();
    for i in 0..jobs {
        let id = format!("pull-{i}");
        pull.queued.insert(id.clone(), SystemTime::now());
        runnel::fleet::publish_job(&js, "runnel.jobs.default", &job(&id, &["true"]))
            .await
            .unwrap();
    }
    while pull.taken.len() < jobs {
        let m = tokio::time::timeout(Duration::from_secs(120), finals.next())
            .await
            .expect("the fleet finishes its jobs")
            .unwrap();
        let e: pb::JobEvent = prost::Message::decode(m.payload.as_ref()).unwrap();
        if let Some(pb::job_event::Event::State(s)) = &e.event
            && runnel::fleet::is_final(&e)
        {
            assert_eq!(s.state, pb::JobState::Succeeded as i32, "{s:?}");
            pull.taken.insert(s.job_id.clone(), status_times(s));
        }
    }

    // Push: one submitter per slot, each on its agent.
    let queue = std::sync::Arc::new(std::sync::Mutex::new(
        (0..jobs).map(|i| format!("push-{i}")).collect::<Vec<_>>(),
    ));
    let queued_at = SystemTime::now();
    let mut submitters = tokio::task::JoinSet::new();
    for a in &agents {
        for _ in 0..SLOTS {
            let mut c = a.scheduler().await;
            let queue = queue.clone();
            submitters.spawn(async move {
                let mut done = Vec::new();
                loop {
                    let Some(id) = queue.lock().unwrap().pop() else {
                        return done;
                    };
                    submit(&mut c, job(&id, &["true"])).await;
                    let events = support::watch(&mut c, &id, 0).await;
                    let s = support::final_status(&events);
                    assert_eq!(s.state, pb::JobState::Succeeded as i32, "{s:?}");
                    done.push((id, status_times(&s)));
                }
            });
        }
    }
    let mut push = FleetRun::default();
    while let Some(done) = submitters.join_next().await {
        for (id, times) in done.unwrap() {
            push.queued.insert(id.clone(), queued_at);
            push.taken.insert(id, times);
        }
    }
    let (pull_rate, pull_wait) = pull.figures();
    let (push_rate, push_wait) = push.figures();

    // An idle fleet: one job at a time, each published (pushed) once the
    // last has ended: the wait is the queue's (the API's) own.
    const ONE_BY_ONE: usize = 50;
    let mut pull_idle = Vec::new();
    for i in 0..ONE_BY_ONE {
        let id = format!("pull-idle-{i}");
        let t0 = SystemTime::now();
        runnel::fleet::publish_job(&js, "runnel.jobs.default", &job(&id, &["true"]))
            .await
            .unwrap();
        loop {
            let m = tokio::time::timeout(Duration::from_secs(60), finals.next())
                .await
                .expect("the fleet finishes its job")
                .unwrap();
            let e: pb::JobEvent = prost::Message::decode(m.payload.as_ref()).unwrap();
            if let Some(pb::job_event::Event::State(s)) = &e.event
                && s.job_id == id
                && runnel::fleet::is_final(&e)
            {
                let taken = status_times(s).0;
                pull_idle.push(taken.duration_since(t0).unwrap_or_default().as_secs_f64() * 1000.0);
                break;
            }
        }
    }
    let mut push_idle = Vec::new();
    let mut clients = Vec::new();
    for a in &agents {
        clients.push(a.scheduler().await);
    }
    for i in 0..ONE_BY_ONE {
        let id = format!("push-idle-{i}");
        let c = &mut clients[i % 3];
        let t0 = SystemTime::now();
        submit(c, job(&id, &["true"])).await;
        let s = support::final_status(&support::watch(c, &id, 0).await);
        let taken = status_times(&s).0;
        push_idle.push(taken.duration_since(t0).unwrap_or_default().as_secs_f64() * 1000.0);
    }
    let (pull_idle, push_idle) = (Samples(pull_idle), Samples(push_idle));
    r.row(
        &format!("fleet: {jobs} jobs of `true`, 3 agents × {SLOTS} slots, jobs/s"),
        format!("NATS pull: {pull_rate:.1} jobs/s"),
        format!("gRPC push, a submitter per slot: {push_rate:.1} jobs/s"),
        format!("{:.2}× push", pull_rate / push_rate),
        "≥ 0.9× push",
    );
    r.row(
        &format!("fleet: wait from publish (push: queued) to an agent taking the job, {jobs} at once"),
        format!("NATS pull: {}", pull_wait.show()),
        format!("gRPC push: {}", push_wait.show()),
        format!("p50 {}", signed_ms(pull_wait.p50() - push_wait.p50())),
        "— (the backlog's drain)",
    );
    r.row(
        &format!(
            "fleet: wait from publish (push: SubmitJob) to an agent taking the job, {ONE_BY_ONE} one by one"
        ),
        format!("NATS pull: {}", pull_idle.show()),
        format!("gRPC push: {}", push_idle.show()),
        format!("p50 {}", signed_ms(pull_idle.p50() - push_idle.p50())),
        "p50 within +10 ms of push",
    );
    r.note(format!(
        "fleet: the pull run's jobs are all published at once (publishing {jobs} took part of the run); the push \
         run's are all queued at its start, so both waits include the time the queue took to drain"
    ));
    drop(agents);
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is taken from argv.
    if let Some(reason) = support::unmet(&[support::Need::Root]) {
        panic!("the benchmark suite {reason}");
    }
    let n: usize = std::env::var("RUNNEL_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let only = std::env::var("RUNNEL_BENCH_ONLY").unwrap_or_default();
    let wanted = |s: &str| only.is_empty() || only.split(',').any(|o| o.trim() == s);
    let dir = tempfile::Builder::new()
        .prefix("runnel-bench.")
        .tempdir()
        .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut r = Report {
        rows: Vec::new(),
        notes: Vec::new(),
    };
    let started = Instant::now();
    rt.block_on(async {
        if wanted("start") {
            bench_start(&mut r, n, dir.path()).await;
        }
        if wanted("overhead") {
            bench_overhead(&mut r, n).await;
        }
        if wanted("latency") {
            bench_latency(&mut r, n.max(50) * 10).await;
        }
        if wanted("throughput") {
            bench_throughput(&mut r).await;
        }
        if wanted("checkout") {
            bench_checkout(&mut r, 3, dir.path()).await;
        }
        if wanted("checkout") || wanted("checkout-wide") {
            bench_checkout_wide(&mut r, 3, dir.path()).await;
        }
        if wanted("concurrent") {
            bench_idle_and_concurrent(&mut r).await;
        }
        if wanted("rootfs") {
            bench_rootfs(&mut r, n.min(20), dir.path()).await;
        }
        if wanted("sandbox") {
            bench_sandbox(&mut r, n, dir.path()).await;
        }
        if wanted("network") {
            bench_network(&mut r, n, dir.path()).await;
            bench_download(&mut r).await;
        }
        if wanted("fleet") {
            bench_fleet(&mut r, 500).await;
        }
        if wanted("store") {
            bench_store(&mut r, dir.path()).await;
        }
    });
    let date = sh(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]));
    let out = format!(
        "Run {} on {}; runnel {} (release), suite took {:.0} s.\n\n{}",
        date.trim(),
        machine_summary(),
        env!("CARGO_PKG_VERSION"),
        started.elapsed().as_secs_f64(),
        r.markdown()
    );
    println!("\n{out}");
    let target = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&target).unwrap();
    std::fs::write(target.join("results.md"), &out).unwrap();
    println!("(written to {})", target.join("results.md").display());
}
