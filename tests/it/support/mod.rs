//! Test support: starts the real `runnel` binary as an agent on a free
//! loopback port with tokens and a private state directory, and talks to it
//! with the generated tonic client (over TLS when the agent has `[tls]`).
//! Everything started here is stopped and removed on drop.

pub mod garage;
pub mod image;
pub mod internet;
pub mod lfs;
pub mod nats;
pub mod sshd;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use futures::StreamExt;
use runnel::api::pb;
use runnel::api::pb::agent_client::AgentClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, ClientTlsConfig};

pub const SCHEDULER_TOKEN: &str = "sched-token-for-tests";
pub const OPERATOR_TOKEN: &str = "oper-token-for-tests";

pub fn runnel_bin() -> &'static str {
    env!("CARGO_BIN_EXE_runnel")
}

/// What a test needs that a contributor's machine may lack. A test names
/// its needs first, with `require!` (tests/it/main.rs).
#[derive(Clone, Copy, Debug)]
pub enum Need {
    /// Containers, mounts and cgroups: every test that starts an agent.
    Root,
    /// A real sshd serving git, which logs in as root.
    Sshd,
    /// ssh-keygen, to make keys at test time.
    SshKeygen,
    /// busybox-static, the one binary of the test images.
    Busybox,
    /// A real registry and skopeo to push to it.
    Registry,
    /// runc, the alternative runtime.
    Runc,
    /// Debian's PostgreSQL server and client, for a service container.
    Postgres,
    /// Garage, a real S3 server (scripts/test-servers installs it).
    Garage,
    /// Debian's nats-server (JetStream), for the fleet.
    Nats,
}

impl Need {
    /// Why this need is not met here, or `None` when it is.
    fn unmet(self) -> Option<String> {
        let root = |why: &str| (!nix::unistd::geteuid().is_root()).then(|| format!("needs root: {why}"));
        let program = |name: &str, package: &str| {
            (!installed(name))
                .then(|| format!("needs {name} (Debian's {package}; scripts/setup installs it)"))
        };
        match self {
            // Every agent makes its jobs' bridge and nftables rules.
            Need::Root => root("starts containers, mounts and cgroups")
                .or_else(|| program("nft", "nftables"))
                .or_else(|| program("/usr/bin/python3", "python3")),
            Need::Sshd => root("runs sshd, which serves git to root")
                .or_else(|| program("/usr/sbin/sshd", "openssh-server"))
                .or_else(|| program("git", "git"))
                .or_else(|| program("ssh-keygen", "openssh-client")),
            Need::SshKeygen => program("ssh-keygen", "openssh-client"),
            Need::Busybox => program("/bin/busybox", "busybox-static"),
            Need::Registry => {
                program("/usr/bin/docker-registry", "docker-registry").or_else(|| program("skopeo", "skopeo"))
            }
            Need::Runc => program("runc", "runc"),
            Need::Garage => (!installed(garage::GARAGE)).then(|| {
                format!(
                    "needs Garage at {} (scripts/test-servers installs it)",
                    garage::GARAGE
                )
            }),
            Need::Nats => program(nats::NATS_SERVER, "nats-server"),
            Need::Postgres => program("psql", "postgresql").or_else(|| {
                let server = std::fs::read_dir("/usr/lib/postgresql")
                    .into_iter()
                    .flatten()
                    .flatten()
                    .any(|v| v.path().join("bin/postgres").exists());
                (!server).then(|| {
                    "needs PostgreSQL's server (Debian's postgresql; scripts/setup installs it)".into()
                })
            }),
        }
    }
}

/// Whether `program` (a path, or a name looked up on PATH) is a file.
fn installed(program: &str) -> bool {
    if program.contains('/') {
        return Path::new(program).is_file();
    }
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

/// Why a test with `needs` cannot run here (the first unmet need), or `None`.
pub fn unmet(needs: &[Need]) -> Option<String> {
    needs.iter().find_map(|n| n.unmet())
}

/// Says that `test` (its function's type name) is skipped for `reason`;
/// panics with the reason instead when `CI` is set, so that CI never
/// passes by skipping.
pub fn skip(test: &str, reason: &str) {
    use std::io::Write;
    // `it::agent::name::{{closure}}::here` → `agent::name`, as libtest names it.
    let name = test
        .split("::")
        .skip(1)
        .filter(|part| *part != "{{closure}}" && *part != "here")
        .collect::<Vec<_>>()
        .join("::");
    assert!(
        std::env::var_os("CI").is_none(),
        "{name}: {reason} (CI is set: there a test fails rather than skip)"
    );
    // To stderr itself: libtest hides what a passing test prints with eprintln!.
    let _ = writeln!(std::io::stderr(), "skipped: {name}: {reason}");
}

/// For the helpers that start what a test needs: panics naming `need` when
/// it is unmet, i.e. when the test forgot to begin with `require!`.
pub fn expect(need: Need) {
    if let Some(reason) = need.unmet() {
        panic!("{reason}; a test that needs it begins with `require!({need:?})`");
    }
}

/// Host processes in the cgroup `path` (any hierarchy).
pub fn processes_in_cgroup(path: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
                .is_ok_and(|c| c.lines().any(|l| l.ends_with(path)))
        })
        .collect()
}

/// Waits for `cond` with a deadline; panics with `what` when it never holds.
pub fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub struct Agent {
    child: Option<Child>,
    /// `http://` or `https://` (with `[tls]`) and the address it listens on.
    pub addr: String,
    /// Where `/metrics` is served, with `metrics_listen`.
    pub metrics_addr: Option<String>,
    pub state: tempfile::TempDir,
    pub config_path: PathBuf,
    /// Extra environment for the agent process.
    pub env: Vec<(String, String)>,
    log: Arc<Mutex<Vec<String>>>,
}

/// A field of the agent's "runnel agent listening" line, in the text or the
/// JSON log format.
fn listening_field(line: &str, name: &str) -> Option<String> {
    if line.starts_with('{') {
        let v: serde_json::Value = serde_json::from_str(line).ok()?;
        return match &v["fields"][name] {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Null => None,
            other => Some(other.to_string()),
        };
    }
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
        .map(str::to_string)
}

#[derive(Clone)]
pub struct Bearer(Option<String>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(t) = &self.0 {
            req.metadata_mut()
                .insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        Ok(req)
    }
}

pub type Client = AgentClient<InterceptedService<Channel, Bearer>>;

impl Agent {
    /// Starts an agent whose config is the defaults plus `extra` (TOML).
    pub fn start(extra: &str) -> Agent {
        let mut agent = Agent::new(extra);
        agent.launch();
        agent
    }

    /// An agent configured as [`Agent::start`] does, not started yet.
    pub fn new(extra: &str) -> Agent {
        expect(Need::Root);
        let state = tempfile::Builder::new().prefix("runnel-test.").tempdir().unwrap();
        let dir = state.path();
        std::fs::write(dir.join("scheduler.tokens"), format!("{SCHEDULER_TOKEN}\n")).unwrap();
        std::fs::write(
            dir.join("operator.tokens"),
            format!("# operators\n{OPERATOR_TOKEN}\n"),
        )
        .unwrap();
        let extra = test_network(extra);
        let config = format!(
            "listen = \"127.0.0.1:0\"\nstate_dir = \"{}\"\n{extra}\n[auth]\nscheduler_tokens_file = \"{}\"\noperator_tokens_file = \"{}\"\n",
            dir.join("state").display(),
            dir.join("scheduler.tokens").display(),
            dir.join("operator.tokens").display(),
        );
        let config_path = dir.join("agent.toml");
        std::fs::write(&config_path, config).unwrap();
        Agent {
            child: None,
            addr: String::new(),
            metrics_addr: None,
            state,
            config_path,
            env: Vec::new(),
            log: Arc::new(Mutex::new(Vec::new())),
        }
    }

    /// (Re)starts the agent process on the same state directory.
    pub fn launch(&mut self) {
        let mut child = Command::new(runnel_bin())
            .arg("agent")
            .arg("--config")
            .arg(&self.config_path)
            // RUNNEL_TEST_AGENT_LOG: another filter for the agents tests and
            // benchmarks start (`info,runnel::job::lifecycle=debug`: the
            // time of each phase of each job).
            .env(
                "RUNNEL_LOG",
                std::env::var("RUNNEL_TEST_AGENT_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start runnel agent");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        let log = self.log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                // Logged first: once launch() returns, the line is in log().
                log.lock().unwrap().push(line.clone());
                if line.contains("runnel agent listening")
                    && let Some(addr) = listening_field(&line, "addr")
                {
                    let tls = listening_field(&line, "tls").is_some_and(|t| t == "true");
                    let metrics = listening_field(&line, "metrics_addr").filter(|m| m != "-");
                    let _ = tx.send((addr, tls, metrics));
                }
            }
        });
        let Ok((addr, tls, metrics)) = rx.recv_timeout(Duration::from_secs(60)) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the agent did not start listening; its log:
{}",
                self.log.lock().unwrap().join(
                    "
"
                )
            );
        };
        self.addr = match addr.starts_with("unix:") {
            true => addr,
            false => format!("{}://{addr}", if tls { "https" } else { "http" }),
        };
        self.metrics_addr = metrics;
        self.child = Some(child);
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn state_dir(&self) -> PathBuf {
        self.state.path().join("state")
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Sends a signal to the agent process.
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid() as i32), sig).unwrap();
    }

    /// Waits for the agent to exit; its exit status.
    pub fn wait(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let child = self.child.as_mut().unwrap();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                self.child = None;
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "the agent did not exit; its log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub async fn client(&self, token: Option<&str>) -> Client {
        self.client_over(None, token).await.expect("connect to the agent")
    }

    /// A client over `tls` (`None`: plain HTTP/2).
    pub async fn client_over(
        &self,
        tls: Option<ClientTlsConfig>,
        token: Option<&str>,
    ) -> Result<Client, tonic::transport::Error> {
        let mut endpoint = tonic::transport::Endpoint::from_shared(self.addr.clone()).unwrap();
        if let Some(tls) = tls {
            runnel::sys::tls::install_crypto_provider();
            endpoint = endpoint.tls_config(tls)?;
        }
        let channel = endpoint.connect().await?;
        Ok(AgentClient::with_interceptor(
            channel,
            Bearer(token.map(str::to_string)),
        ))
    }

    /// The health service's answer for the whole agent (plain HTTP/2).
    pub async fn health(&self) -> tonic_health::pb::health_check_response::ServingStatus {
        let channel = tonic::transport::Endpoint::from_shared(self.addr.clone())
            .unwrap()
            .connect()
            .await
            .expect("connect to the agent");
        tonic_health::pb::health_client::HealthClient::new(channel)
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .expect("health check")
            .into_inner()
            .status()
    }

    /// `GET path` on the metrics endpoint: the status line and the body.
    pub fn scrape(&self, path: &str) -> (String, String) {
        self.scrape_with(path, "")
    }

    /// [`Agent::scrape`] with more request header lines (each ending in CRLF).
    pub fn scrape_with(&self, path: &str, headers: &str) -> (String, String) {
        use std::io::{Read, Write};
        let addr = self.metrics_addr.as_ref().expect("the agent serves metrics");
        let mut conn = std::net::TcpStream::connect(addr).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        write!(
            conn,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{headers}Connection: close\r\n\r\n"
        )
        .unwrap();
        let mut response = String::new();
        conn.read_to_string(&mut response).unwrap();
        let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
        (head.lines().next().unwrap_or("").to_string(), body.to_string())
    }

    /// The value of a metric sample (e.g. `runnel_jobs_running` or
    /// `runnel_jobs_ended_total{state="failed"}`) in a scrape of `/metrics`.
    pub fn metric(&self, sample: &str) -> f64 {
        let (status, body) = self.scrape("/metrics");
        assert!(status.contains(" 200 "), "{status}");
        body.lines()
            .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no {sample} in\n{body}"))
            .parse()
            .unwrap()
    }

    /// The parent of this agent's job cgroups, e.g. `/runnel.0a1b2c3d`.
    pub fn cgroup_parent(&self) -> String {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(self.state_dir().as_os_str().as_encoded_bytes());
        let hex: String = digest.iter().take(4).map(|b| format!("{b:02x}")).collect();
        format!("/runnel.{hex}")
    }

    /// Host processes in the cgroup of job `id`'s container (any
    /// hierarchy): what would be left running if the container leaked.
    pub fn container_processes(&self, id: &str) -> Vec<u32> {
        processes_in_cgroup(&format!("{}/{id}", self.cgroup_parent()))
    }

    pub async fn scheduler(&self) -> Client {
        self.client(Some(SCHEDULER_TOKEN)).await
    }

    pub async fn operator(&self) -> Client {
        self.client(Some(OPERATOR_TOKEN)).await
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGINT,
            );
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        // A failed test may leave mounts behind; never leave them to the next.
        if let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") {
            let base = self.state.path().to_string_lossy().to_string();
            for mp in info
                .lines()
                .filter_map(|l| l.split(' ').nth(4))
                .filter(|m| m.starts_with(&base))
            {
                let _ = nix::mount::umount2(mp, nix::mount::MntFlags::MNT_DETACH);
            }
        }
    }
}

/// What every test agent's config adds to `extra` unless it says
/// otherwise: a subnet of its own for private job networks (tests run
/// agents side by side: no two may share one), and the host's network
/// allowed for the tests whose steps talk to a loopback service of the
/// test ([`Gate`], the test sshd), which ask for it with [`host_network`].
fn test_network(extra: &str) -> String {
    let mut extra = extra.to_string();
    if !extra.contains("allow_host_network") {
        extra = match extra.contains("[runtime]") {
            true => extra.replacen("[runtime]", "[runtime]\nallow_host_network = true", 1),
            false => format!("{extra}\n[runtime]\nallow_host_network = true\n"),
        };
    }
    if !extra.contains("subnet") {
        let line = format!("subnet = \"{}\"", free_subnet());
        extra = match extra.contains("[network]") {
            true => extra.replacen("[network]", &format!("[network]\n{line}"), 1),
            false => format!("{extra}\n[network]\n{line}\n"),
        };
    }
    extra
}

/// A /24 of 10.252.0.0/16 that this process has not handed out and no
/// route of the host covers.
pub fn free_subnet() -> String {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let routes = host_routes();
    loop {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        assert!(n < 256, "no free test subnet left in 10.252.0.0/16");
        let prefix = format!("10.252.{n}.");
        if !routes.lines().any(|l| l.starts_with(&prefix)) {
            return format!("10.252.{n}.0/24");
        }
    }
}

/// The host's IPv4 routes, every table's, one a line (`ip -o route`).
pub fn host_routes() -> String {
    Command::new("ip")
        .args(["-4", "-o", "route", "show", "table", "all"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// `spec`, on the host's network: for steps that reach a loopback service
/// of the test (the test agents allow it).
pub fn host_network(mut spec: pb::JobSpec) -> pb::JobSpec {
    spec.container.get_or_insert_with(Default::default).network = pb::Network::Host as i32;
    spec
}

/// A job of shell steps.
pub fn job(id: &str, steps: &[&str]) -> pb::JobSpec {
    pb::JobSpec {
        job_id: id.to_string(),
        steps: steps
            .iter()
            .enumerate()
            .map(|(i, run)| pb::Step {
                name: format!("s{i}"),
                kind: Some(pb::step::Kind::Run(run.to_string())),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

pub async fn submit(c: &mut Client, spec: pb::JobSpec) -> pb::JobStatus {
    c.submit_job(pb::SubmitJobRequest { job: Some(spec) })
        .await
        .expect("SubmitJob")
        .into_inner()
}

/// A WatchJob stream of the events after `after`, following the job.
pub async fn events(c: &mut Client, id: &str, after: u64) -> tonic::Streaming<pb::JobEvent> {
    c.watch_job(pb::WatchJobRequest {
        job_id: id.to_string(),
        after_seq: after,
        follow: true,
    })
    .await
    .expect("WatchJob")
    .into_inner()
}

/// Every event after `after`, following until the job ends.
pub async fn watch(c: &mut Client, id: &str, after: u64) -> Vec<pb::JobEvent> {
    let mut s = events(c, id, after).await;
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
    while let Some(e) = tokio::time::timeout_at(deadline, s.next())
        .await
        .expect("the job ended in time")
    {
        out.push(e.expect("event"));
    }
    out
}

/// The job's final status (from its last event).
pub fn final_status(events: &[pb::JobEvent]) -> pb::JobStatus {
    match events.last().and_then(|e| e.event.clone()) {
        Some(pb::job_event::Event::State(s)) => s,
        other => panic!("the last event is not a state: {other:?}"),
    }
}

/// All output of `stream` (stdout = 1, stderr = 2, system = 3), concatenated.
pub fn output(events: &[pb::JobEvent], stream: pb::Stream) -> String {
    let mut out = Vec::new();
    for e in events {
        if let Some(pb::job_event::Event::Log(l)) = &e.event
            && l.stream == stream as i32
        {
            out.extend_from_slice(&l.data);
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub async fn run_job(agent: &Agent, spec: pb::JobSpec) -> (pb::JobStatus, Vec<pb::JobEvent>) {
    let mut c = agent.scheduler().await;
    let id = spec.job_id.clone();
    submit(&mut c, spec).await;
    let events = watch(&mut c, &id, 0).await;
    (final_status(&events), events)
}

pub fn state(s: &pb::JobStatus) -> pb::JobState {
    pb::JobState::try_from(s.state).unwrap()
}

/// Asserts the job succeeded; on failure shows its status and stderr.
pub fn assert_succeeded(status: &pb::JobStatus, events: &[pb::JobEvent]) {
    assert_eq!(
        state(status),
        pb::JobState::Succeeded,
        "{status:?}\n{}",
        output(events, pb::Stream::Stderr)
    );
}

pub fn failure(s: &pb::JobStatus) -> pb::FailureKind {
    pb::FailureKind::try_from(s.failure).unwrap()
}

/// Host processes whose command line contains `needle`.
pub fn host_processes_with(needle: &str) -> Vec<u32> {
    let me = std::process::id();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).replace('\0', " ").contains(needle))
                .unwrap_or(false)
        })
        .collect()
}

/// Every regular file under `dir` whose bytes contain `needle`. Does not
/// cross into other file systems (a running job's root is a whole host).
pub fn files_containing(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(dir).map(|m| m.dev()).unwrap_or(0);
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            let Ok(m) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            if m.dev() != dev {
                continue;
            }
            if m.is_dir() {
                stack.push(p);
            } else if m.is_file() && file_contains(&p, needle) {
                out.push(p);
            }
        }
    }
    out
}

/// Whether the file at `path` holds `needle`: read in pieces, and only
/// where it has data (a job's disk is a sparse file of gigabytes).
fn file_contains(path: &Path, needle: &[u8]) -> bool {
    use nix::unistd::{Whence, lseek};
    use std::os::unix::fs::FileExt;
    let Ok(file) = std::fs::File::open(path) else {
        return false;
    };
    let mut buf = vec![0u8; 1 << 20];
    let mut offset = 0;
    // Each extent of data, to its end; ENXIO past the last.
    while let Ok(start) = lseek(&file, offset, Whence::SeekData) {
        let end = lseek(&file, start, Whence::SeekHole).unwrap_or(start);
        // What may begin the needle at the end of the last piece.
        let mut window: Vec<u8> = Vec::new();
        let mut at = start;
        while at < end {
            let want = buf.len().min((end - at) as usize);
            let Ok(n) = file.read_at(&mut buf[..want], at as u64) else {
                return false;
            };
            if n == 0 {
                break;
            }
            window.extend_from_slice(&buf[..n]);
            if window.windows(needle.len()).any(|w| w == needle) {
                return true;
            }
            window.drain(..window.len().saturating_sub(needle.len() - 1));
            at += n as i64;
        }
        offset = end.max(start + 1);
    }
    false
}

/// Resident set size of a process, in bytes.
pub fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb * 1024
}

/// Holds a step until the test lets it go: the step connects to a loopback
/// port (bash's /dev/tcp; the job must be on the host's network: see
/// [`host_network`]) and reads until the test drops the connection.
pub struct Gate {
    listener: tokio::net::TcpListener,
}

impl Gate {
    pub async fn new() -> Gate {
        Gate {
            listener: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        }
    }

    /// The shell command of a step that waits at this gate.
    pub fn step(&self) -> String {
        let port = self.listener.local_addr().unwrap().port();
        format!("bash -c 'exec 3<>/dev/tcp/127.0.0.1/{port} && cat <&3 >/dev/null' && echo through-the-gate")
    }

    /// Waits for a step to arrive at the gate; it passes when the returned
    /// connection is dropped.
    pub async fn arrival(&self) -> tokio::net::TcpStream {
        tokio::time::timeout(Duration::from_secs(120), self.listener.accept())
            .await
            .expect("a step reached the gate in time")
            .unwrap()
            .0
    }
}

/// Waits, with a deadline, for an async condition.
pub async fn wait_until<F: std::future::Future<Output = bool>>(
    what: &str,
    timeout: Duration,
    mut cond: impl FnMut() -> F,
) {
    let deadline = Instant::now() + timeout;
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits, with a deadline, until job `id` is RUNNING.
pub async fn wait_running(c: &Client, id: &str) {
    wait_until(&format!("{id} to run"), Duration::from_secs(60), || {
        let mut c = c.clone();
        async move {
            get_job(&mut c, id)
                .await
                .is_ok_and(|s| state(&s) == pb::JobState::Running)
        }
    })
    .await;
}

/// The job's status as the agent reports it (GetJob), or the call's error.
pub async fn get_job(c: &mut Client, id: &str) -> Result<pb::JobStatus, tonic::Status> {
    c.get_job(pb::GetJobRequest {
        job_id: id.to_string(),
    })
    .await
    .map(|r| r.into_inner())
}

/// Mount points under `dir`.
pub fn mounts_under(dir: &Path) -> Vec<String> {
    let base = dir.to_string_lossy().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| m.starts_with(&base))
        .map(str::to_string)
        .collect()
}

/// A job of `steps` on the host image, without a network.
pub fn host_job(id: &str, steps: Vec<pb::Step>) -> pb::JobSpec {
    pb::JobSpec {
        job_id: id.into(),
        steps,
        container: Some(pb::Container {
            image: "host".into(),
            network: pb::Network::None as i32,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A loopback port nothing listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `len` bytes that do not compress (xorshift), made fast.
pub fn incompressible(len: usize) -> Vec<u8> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
