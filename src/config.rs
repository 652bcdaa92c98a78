//! The agent's TOML configuration: one validated [`Config`], with every
//! default in one place. Raw serde structs reject unknown keys; `Config::load`
//! turns them into values the rest of the agent can trust (parsed addresses,
//! loaded tokens), naming the key at fault when something is wrong.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::model::{Network, Secret};
use crate::runtime::network::{Cidr, NetworkSettings};
use crate::runtime::spec::USERNS_SIZE;
use crate::runtime::{RuntimeKind, RuntimeSettings};

pub const DEFAULT_CONFIG_PATH: &str = "/etc/runnel/agent.toml";
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7450";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/runnel";
/// What a job may write unless it or the config says otherwise.
pub const DEFAULT_DISK_BYTES: u64 = 10 << 30;
/// A job's memory and CPU when neither the job nor the config says.
pub const DEFAULT_MEMORY_BYTES: u64 = 4 << 30;
pub const DEFAULT_CPU_MILLIS: u32 = 2000;
/// The first host uid/gid of containers' user namespaces when neither the
/// config nor `/etc/subuid` says.
pub const USERNS_BASE: u32 = 100_000;
/// The user whose entries in `/etc/subuid` and `/etc/subgid`, when there
/// are any, give the ids of containers' user namespaces.
pub const SUBORDINATE_USER: &str = "runnel";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config key `{key}`: {message}")]
    Invalid { key: &'static str, message: String },
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}

/// The raw file, as written by the operator.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    agent_id: Option<String>,
    listen: Option<String>,
    state_dir: Option<PathBuf>,
    max_jobs: Option<u32>,
    drain_timeout: Option<String>,
    insecure_listen: Option<bool>,
    metrics_listen: Option<String>,
    metrics_token_file: Option<PathBuf>,
    log_format: Option<String>,
    #[serde(default)]
    auth: RawAuth,
    tls: Option<RawTls>,
    #[serde(default)]
    retention: RawRetention,
    #[serde(default)]
    runtime: RawRuntime,
    #[serde(default)]
    checkout: RawCheckout,
    #[serde(default)]
    logs: RawLogs,
    #[serde(default)]
    network: RawNetwork,
    #[serde(default)]
    storage: RawStorage,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    intake: RawIntake,
}

/// Where jobs come from besides the gRPC API.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIntake {
    nats: Option<RawNats>,
}

/// A server's URL, or several (a cluster).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNats {
    url: OneOrMany,
    creds_file: Option<PathBuf>,
    tls_ca: Option<PathBuf>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    subjects: Option<Vec<String>>,
    ack_wait: Option<String>,
    max_deliver: Option<u32>,
    replicas: Option<u32>,
    events_max_age: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLogs {
    max_bytes: Option<u64>,
    progress_interval: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    scheduler_tokens_file: Option<PathBuf>,
    operator_tokens_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    client_ca: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetention {
    max_age: Option<String>,
    max_jobs: Option<usize>,
    max_bytes: Option<u64>,
    interval: Option<String>,
    cache_max_age: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStorage {
    url: Option<String>,
    endpoint: Option<String>,
    region: Option<String>,
    credentials_file: Option<PathBuf>,
    allow_http: Option<bool>,
    cache_max_age: Option<String>,
    artifact_max_age: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCheckout {
    cache: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNetwork {
    subnet: Option<String>,
    #[serde(default)]
    dns: Vec<String>,
    #[serde(default)]
    deny: Vec<String>,
    #[serde(default)]
    allow: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRuntime {
    kind: Option<String>,
    path: Option<PathBuf>,
    image: Option<String>,
    network: Option<String>,
    memory_bytes: Option<u64>,
    max_pids: Option<u32>,
    cpu_millis: Option<u32>,
    disk_bytes: Option<u64>,
    grace_period: Option<String>,
    job_timeout: Option<String>,
    no_output_timeout: Option<String>,
    #[serde(default)]
    insecure_registries: Vec<String>,
    userns: Option<bool>,
    userns_base: Option<u32>,
    allow_host_image: Option<bool>,
    allow_host_network: Option<bool>,
}

/// Defaults for every job's container, each overridable per job.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Which runtime, and where its binary is.
    pub settings: RuntimeSettings,
    pub image: String,
    pub network: Network,
    pub memory_bytes: Option<u64>,
    pub max_pids: Option<u32>,
    pub cpu_millis: Option<u32>,
    /// What a job may write (workspace and writable layer), on a
    /// filesystem of its own; `None` (`disk_bytes = 0`): no limit, the
    /// job writes to the state directory's disk.
    pub disk_bytes: Option<u64>,
    /// Between SIGTERM and SIGKILL when a container is stopped.
    pub grace_period: Duration,
    pub job_timeout: Duration,
    /// A step silent this long is ended (NO_OUTPUT), unless the job or
    /// step says otherwise.
    pub no_output_timeout: Duration,
    /// Registries (`host:port`) spoken to over plain HTTP.
    pub insecure_registries: Vec<String>,
    /// Run containers in user namespaces (the default): job slot i's
    /// root is host uid/gid `userns_base + i * 65536`, and 65536 ids are
    /// mapped. `None`: containers' root is the host's (`userns = false`).
    pub userns_base: Option<u32>,
    /// Whether jobs may use the `host` image (the host's `/usr`, `/etc`,
    /// `/opt`, ... with secrets hidden); when not, such a job is refused at
    /// submit.
    pub allow_host_image: bool,
    /// Whether jobs may share the host's network (`host`); when not, such
    /// a job is refused at submit.
    pub allow_host_network: bool,
}

/// Where the gRPC API listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    Tcp(SocketAddr),
    /// A Unix socket (`unix:/run/runnel/agent.sock`): mode 0660, group
    /// `runnel` when that group exists.
    Unix(PathBuf),
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Listen::Tcp(a) => write!(f, "{a}"),
            Listen::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// The agent's own log on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One line per event, spans (`job{job_id=..}:step{step=..}`) in front;
    /// no colours unless stderr is a terminal.
    Text,
    /// One JSON object per line, with the current span's fields and the
    /// list of spans (so every line of a job carries its `job_id`).
    Json,
}

/// TLS for the gRPC API; the files are read (and checked) at load time.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    /// PEM certificate chain of the agent.
    pub cert: Vec<u8>,
    /// PEM private key of the agent.
    pub key: Secret,
    /// PEM CA certificates that client certificates must chain to: with it,
    /// a client without a valid certificate is refused (mutual TLS).
    pub client_ca: Option<Vec<u8>>,
}

/// How long ended jobs' event logs and status are kept. A job is removed
/// (directory and registry entry) when it is older than `max_age`, when
/// more than `max_jobs` ended jobs are newer, or when the ended jobs newer
/// than it hold more than `max_bytes` on disk. Running jobs are never
/// removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetentionConfig {
    pub max_age: Duration,
    pub max_jobs: usize,
    pub max_bytes: u64,
    /// How often the retention sweep runs.
    pub interval: Duration,
    /// A checkout mirror or an image layer no job has used for this long
    /// is removed (never while a job uses it).
    pub cache_max_age: Duration,
}

/// Where caches, workspaces, artifacts and test results are kept
/// (`[storage]`), and for how long.
///
/// `credentials_file` is an INI file; its `[default]` section's keys are
/// the backend's own (for S3: `aws_access_key_id`,
/// `aws_secret_access_key`, optionally `aws_session_token`), as awscli's
/// credentials file; for `gs://` it is a service account's JSON key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageConfig {
    pub settings: crate::store::StoreSettings,
    /// A cache saved longer ago than this is removed by the sweep.
    pub cache_max_age: Duration,
    /// Artifacts and workspace layers older than this are removed.
    pub artifact_max_age: Duration,
}

#[derive(Debug, Clone, Default)]
pub struct AuthConfig {
    pub scheduler_tokens: Vec<Secret>,
    pub operator_tokens: Vec<Secret>,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub agent_id: String,
    pub listen: Listen,
    pub state_dir: PathBuf,
    pub max_jobs: u32,
    /// How long a stopping agent lets running jobs finish.
    pub drain_timeout: Duration,
    /// `None`: plain HTTP/2, allowed on loopback only unless
    /// `insecure_listen = true`.
    pub tls: Option<TlsConfig>,
    /// Where the Prometheus text endpoint (`/metrics`) listens, if anywhere.
    pub metrics_listen: Option<SocketAddr>,
    /// When set, `/metrics` answers only requests bearing one of these
    /// tokens (`Authorization: Bearer ...`).
    pub metrics_tokens: Vec<Secret>,
    pub log_format: LogFormat,
    pub retention: RetentionConfig,
    pub storage: StorageConfig,
    pub auth: AuthConfig,
    pub runtime: RuntimeConfig,
    /// Private job networks: the subnet, resolvers, denied and allowed
    /// ranges.
    pub network: NetworkSettings,
    /// Keep a mirror per repository to check out from (warm checkouts).
    pub checkout_cache: bool,
    /// A job's log keeps at most this many bytes of output (its first and
    /// last half); `None`: all of it.
    pub log_max_bytes: Option<u64>,
    /// How often a long image pull says how far it has come.
    pub progress_interval: Duration,
    pub labels: BTreeMap<String, String>,
    /// `[intake.nats]`: take jobs from a NATS JetStream queue too.
    pub nats: Option<NatsConfig>,
    /// Paths on the host that hold agent secrets (token files): hidden from
    /// containers that see the host's root filesystem.
    pub private_paths: Vec<PathBuf>,
}

impl Config {
    /// Reads `path`. The default path may be absent (every key has a
    /// default); an explicitly given one must exist.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let (path, required) = match path {
            Some(p) => (p.to_path_buf(), true),
            None => (PathBuf::from(DEFAULT_CONFIG_PATH), false),
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(source) => return Err(ConfigError::Read { path, source }),
        };
        let mut config = Self::from_toml(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.clone(),
                message,
            },
            other => other,
        })?;
        config.private_paths.push(path);
        Ok(config)
    }

    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::new(),
            message: e.to_string(),
        })?;
        Self::validate(raw)
    }

    fn validate(raw: RawConfig) -> Result<Config, ConfigError> {
        let listen = match raw.listen.as_deref().unwrap_or(DEFAULT_LISTEN) {
            l if l.starts_with("unix:") => {
                let path = PathBuf::from(&l["unix:".len()..]);
                if !path.is_absolute() {
                    return Err(invalid(
                        "listen",
                        format!(
                            "{l:?}: a Unix socket needs an absolute path, e.g. \"unix:/run/runnel/agent.sock\""
                        ),
                    ));
                }
                Listen::Unix(path)
            }
            l => Listen::Tcp(parse_addr(l, "listen")?),
        };
        let metrics_listen = match raw.metrics_listen.as_deref() {
            None | Some("") => None,
            Some(m) => Some(parse_addr(m, "metrics_listen")?),
        };
        let log_format = match raw.log_format.as_deref().unwrap_or("text") {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                return Err(invalid(
                    "log_format",
                    format!("{other:?} is not \"text\" or \"json\""),
                ));
            }
        };
        let state_dir = raw.state_dir.unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
        if !state_dir.is_absolute() {
            return Err(invalid("state_dir", "must be an absolute path"));
        }
        let max_jobs = raw.max_jobs.unwrap_or(4);
        if max_jobs == 0 || max_jobs > 1024 {
            return Err(invalid("max_jobs", "must be between 1 and 1024"));
        }
        let agent_id = match raw.agent_id {
            Some(id) if id.trim().is_empty() => {
                return Err(invalid("agent_id", "must not be empty"));
            }
            Some(id) => id,
            None => nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_else(|| "runnel".to_string()),
        };

        let mut private_paths = vec![state_dir.clone()];
        let tls = match raw.tls {
            None => None,
            Some(t) => Some(read_tls(t, &mut private_paths)?),
        };
        if let Listen::Tcp(listen) = listen
            && tls.is_none()
            && !listen.ip().is_loopback()
            && raw.insecure_listen != Some(true)
        {
            return Err(invalid(
                "listen",
                format!(
                    "{listen} is not a loopback address and [tls] is not configured: job keys and \
                     secrets would cross the network in clear text. Configure [tls] cert and key, \
                     or set insecure_listen = true if this network is private and trusted"
                ),
            ));
        }
        let mut metrics_tokens = Vec::new();
        if let Some(p) = &raw.metrics_token_file {
            metrics_tokens = read_tokens(p, "metrics_token_file")?;
            private_paths.push(p.clone());
        }
        if let Some(m) = metrics_listen
            && !m.ip().is_loopback()
            && metrics_tokens.is_empty()
            && raw.insecure_listen != Some(true)
        {
            return Err(invalid(
                "metrics_listen",
                format!(
                    "{m} is not a loopback address: anyone who reaches it (a job on the host's \
                     network too) would read the agent's metrics. Set metrics_token_file, or \
                     insecure_listen = true if this network is private and trusted"
                ),
            ));
        }
        let retention = read_retention(raw.retention)?;
        let storage = read_storage(raw.storage, &state_dir, &mut private_paths)?;
        let mut auth = AuthConfig::default();
        if let Some(p) = &raw.auth.scheduler_tokens_file {
            auth.scheduler_tokens = read_tokens(p, "auth.scheduler_tokens_file")?;
            private_paths.push(p.clone());
        }
        if let Some(p) = &raw.auth.operator_tokens_file {
            auth.operator_tokens = read_tokens(p, "auth.operator_tokens_file")?;
            private_paths.push(p.clone());
        }

        let r = raw.runtime;
        let kind = match r.kind.as_deref().unwrap_or("libcontainer") {
            "libcontainer" | "embedded" | "youki" => RuntimeKind::Embedded,
            "runc" => RuntimeKind::Runc,
            "crun" => RuntimeKind::Crun,
            other => {
                return Err(invalid(
                    "runtime.kind",
                    format!("{other:?} is not one of \"libcontainer\", \"runc\", \"crun\""),
                ));
            }
        };
        let network = match r.network.as_deref().unwrap_or("private") {
            "private" => Network::Private,
            "host" => Network::Host,
            "none" => Network::None,
            other => {
                return Err(invalid(
                    "runtime.network",
                    format!("{other:?} is not \"private\", \"host\" or \"none\""),
                ));
            }
        };
        let allow_host_network = r.allow_host_network.unwrap_or(false);
        if network == Network::Host && !allow_host_network {
            return Err(invalid(
                "runtime.network",
                "is \"host\", which runtime.allow_host_network = false does not allow: set \
                 allow_host_network = true to let jobs share the host's network, or use \"private\"",
            ));
        }
        let network_settings = read_network(raw.network, max_jobs)?;
        let memory_bytes = match r.memory_bytes.unwrap_or(DEFAULT_MEMORY_BYTES) {
            0 => None,
            m if m < crate::model::spec::MIN_MEMORY_BYTES => {
                return Err(invalid(
                    "runtime.memory_bytes",
                    "must be at least 4 MiB, or 0 for no limit",
                ));
            }
            m => Some(m),
        };
        let disk_bytes = match r.disk_bytes.unwrap_or(DEFAULT_DISK_BYTES) {
            0 => None,
            d => {
                crate::model::spec::validate_disk_bytes(d)
                    .map_err(|e| invalid("runtime.disk_bytes", format!("{e}, or 0 for no limit")))?;
                Some(d)
            }
        };
        if r.max_pids == Some(0) {
            return Err(invalid("runtime.max_pids", "must be at least 1"));
        }
        let cpu_millis = Some(r.cpu_millis.unwrap_or(DEFAULT_CPU_MILLIS)).filter(|&c| c != 0);
        let grace_period = parse_duration(r.grace_period.as_deref(), "runtime.grace_period", "10s")?;
        let job_timeout = positive_duration(r.job_timeout.as_deref(), "runtime.job_timeout", "1h")?;
        let no_output_timeout =
            positive_duration(r.no_output_timeout.as_deref(), "runtime.no_output_timeout", "10m")?;
        let drain_timeout = parse_duration(raw.drain_timeout.as_deref(), "drain_timeout", "10m")?;
        let userns_base = match r.userns.unwrap_or(true) {
            false => None,
            true => Some(userns_base(r.userns_base, max_jobs, &subordinate_files)?),
        };
        Ok(Config {
            agent_id,
            listen,
            state_dir,
            max_jobs,
            drain_timeout,
            tls,
            metrics_listen,
            metrics_tokens,
            log_format,
            retention,
            storage,
            auth,
            runtime: RuntimeConfig {
                settings: RuntimeSettings { kind, path: r.path },
                image: r.image.unwrap_or_else(|| "host".to_string()),
                network,
                memory_bytes,
                max_pids: Some(r.max_pids.unwrap_or(4096)),
                cpu_millis,
                disk_bytes,
                grace_period,
                job_timeout,
                no_output_timeout,
                insecure_registries: r.insecure_registries,
                userns_base,
                allow_host_image: r.allow_host_image.unwrap_or(true),
                allow_host_network,
            },
            network: network_settings,
            checkout_cache: raw.checkout.cache.unwrap_or(true),
            progress_interval: positive_duration(
                raw.logs.progress_interval.as_deref(),
                "logs.progress_interval",
                "1s",
            )?,
            log_max_bytes: match raw.logs.max_bytes {
                None | Some(0) => None,
                Some(b) if b < 1024 => {
                    return Err(invalid(
                        "logs.max_bytes",
                        format!(
                            "{b} bytes is too small to keep anything useful: at least 1024, or 0 for no limit"
                        ),
                    ));
                }
                Some(b) => Some(b),
            },
            nats: match raw.intake.nats {
                None => None,
                Some(n) => Some(read_nats(n, &raw.labels, &mut private_paths)?),
            },
            labels: raw.labels,
            private_paths,
        })
    }
}

/// `/etc/subuid` and `/etc/subgid`, empty when missing.
fn subordinate_files() -> (String, String) {
    let read = |p| std::fs::read_to_string(p).unwrap_or_default();
    (read("/etc/subuid"), read("/etc/subgid"))
}

/// The first host id of slot 0's user namespace: `configured`, else the
/// range `/etc/subuid` and `/etc/subgid` give [`SUBORDINATE_USER`] (it
/// must be the same in both), else [`USERNS_BASE`]. Every slot's 65536
/// ids must fit.
fn userns_base(
    configured: Option<u32>,
    max_jobs: u32,
    files: &dyn Fn() -> (String, String),
) -> Result<u32, ConfigError> {
    const KEY: &str = "runtime.userns_base";
    let needed = u64::from(max_jobs) * u64::from(USERNS_SIZE);
    if let Some(base) = configured {
        if base == 0 || u64::from(base) + needed > 1 << 32 {
            return Err(invalid(
                KEY,
                format!(
                    "must be between 1 and {}: {max_jobs} job slots (max_jobs) of {USERNS_SIZE} ids each \
                     must fit below 2^32",
                    (1u64 << 32) - needed
                ),
            ));
        }
        return Ok(base);
    }
    let (subuid, subgid) = files();
    let (uids, gids) = (
        subordinate_range(&subuid, SUBORDINATE_USER),
        subordinate_range(&subgid, SUBORDINATE_USER),
    );
    let (start, count) = match (uids, gids) {
        (None, None) => return Ok(USERNS_BASE),
        (Some(u), Some(g)) if u == g => u,
        (u, g) => {
            let show = |r: Option<(u32, u64)>| r.map_or("none".to_string(), |(s, c)| format!("{s}:{c}"));
            return Err(invalid(
                KEY,
                format!(
                    "/etc/subuid gives {SUBORDINATE_USER} {} and /etc/subgid {}: runnel maps the same \
                     range for both; make them equal or set runtime.userns_base",
                    show(u),
                    show(g)
                ),
            ));
        }
    };
    if count < needed || start == 0 || u64::from(start) + needed > 1 << 32 {
        return Err(invalid(
            KEY,
            format!(
                "/etc/subuid gives {SUBORDINATE_USER} {count} ids from {start}; {max_jobs} job slots \
                 (max_jobs) need {needed} ({USERNS_SIZE} each): give it more, lower max_jobs or set \
                 runtime.userns_base"
            ),
        ));
    }
    Ok(start)
}

/// `(start, count)` of `user`'s line (`user:start:count`) in a subuid or
/// subgid file.
fn subordinate_range(text: &str, user: &str) -> Option<(u32, u64)> {
    text.lines().find_map(|l| {
        let mut f = l.trim().split(':');
        if f.next()? != user {
            return None;
        }
        Some((f.next()?.trim().parse().ok()?, f.next()?.trim().parse().ok()?))
    })
}

fn parse_duration(text: Option<&str>, key: &'static str, default: &str) -> Result<Duration, ConfigError> {
    let text = text.unwrap_or(default);
    humantime::parse_duration(text)
        .map_err(|e| invalid(key, format!("{text:?} is not a duration such as \"30s\": {e}")))
}

/// Where the JetStream streams' subjects begin.
pub const NATS_JOBS_PREFIX: &str = "runnel.jobs.";

/// `[intake.nats]`, validated.
#[derive(Debug, Clone)]
pub struct NatsConfig {
    /// `nats://HOST:PORT` (or `tls://`), one per server of a cluster.
    pub servers: Vec<String>,
    /// A NATS credentials file (JWT and NKey seed).
    pub creds_file: Option<PathBuf>,
    /// CA certificates (PEM) to trust for the servers' TLS.
    pub tls_ca: Option<PathBuf>,
    /// A client certificate and its key (PEM), for servers that ask.
    pub tls_client: Option<(PathBuf, PathBuf)>,
    /// The subjects jobs are taken from, each under `runnel.jobs.`; agents
    /// with the same subject share its durable consumer.
    pub subjects: Vec<String>,
    /// How long a job may go without word from its agent before the queue
    /// gives it to another.
    pub ack_wait: Duration,
    /// How many times a job is given out before it ends LOST.
    pub max_deliver: u32,
    /// Replicas of the streams this agent creates (a cluster: 3).
    pub replicas: u32,
    /// How long the events stream keeps a job's events.
    pub events_max_age: Duration,
}

/// The subject a set of labels takes jobs from: `runnel.jobs.` and the
/// labels as `KEY=VALUE` tokens in key order, or `runnel.jobs.default`.
fn subject_of_labels(labels: &BTreeMap<String, String>) -> Result<String, ConfigError> {
    if labels.is_empty() {
        return Ok(format!("{NATS_JOBS_PREFIX}default"));
    }
    let tokens: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let subject = format!("{NATS_JOBS_PREFIX}{}", tokens.join("."));
    check_subject(&subject).map_err(|why| {
        invalid(
            "intake.nats.subjects",
            format!(
                "the default subject, made of [labels] ({subject:?}), {why}; set intake.nats.subjects, e.g. [\"{NATS_JOBS_PREFIX}linux\"]"
            ),
        )
    })?;
    Ok(subject)
}

/// Why `subject` cannot name a queue of jobs.
fn check_subject(subject: &str) -> Result<(), String> {
    let Some(rest) = subject.strip_prefix(NATS_JOBS_PREFIX) else {
        return Err(format!("is not under \"{NATS_JOBS_PREFIX}\""));
    };
    if subject.len() > 200 {
        return Err("is longer than 200 characters".into());
    }
    let fine = |t: &str| !t.is_empty() && t.chars().all(|c| c.is_ascii_alphanumeric() || "_-=".contains(c));
    if !rest.split('.').all(fine) {
        return Err(
            "has a token that is empty or holds a character other than letters, digits, '_', '-' and '=' \
             (no wildcards)"
                .into(),
        );
    }
    Ok(())
}

fn read_nats(
    raw: RawNats,
    labels: &BTreeMap<String, String>,
    private_paths: &mut Vec<PathBuf>,
) -> Result<NatsConfig, ConfigError> {
    let servers = match raw.url {
        OneOrMany::One(u) => vec![u],
        OneOrMany::Many(u) => u,
    };
    if servers.is_empty() {
        return Err(invalid(
            "intake.nats.url",
            "names no server: give \"nats://HOST:4222\"",
        ));
    }
    for s in &servers {
        let scheme = s.split_once("://").map(|(s, _)| s);
        if !matches!(scheme, Some("nats" | "tls")) || s.split_once("://").is_some_and(|(_, h)| h.is_empty()) {
            return Err(invalid(
                "intake.nats.url",
                format!("{s:?} is not a server URL such as \"nats://127.0.0.1:4222\" or \"tls://HOST:4222\""),
            ));
        }
    }
    let subjects = match raw.subjects {
        Some(s) if s.is_empty() => {
            return Err(invalid(
                "intake.nats.subjects",
                "is empty: name at least one subject, or remove the key",
            ));
        }
        Some(s) => s,
        None => vec![subject_of_labels(labels)?],
    };
    for s in &subjects {
        check_subject(s).map_err(|why| invalid("intake.nats.subjects", format!("{s:?} {why}")))?;
    }
    let tls_client = match (raw.tls_cert, raw.tls_key) {
        (Some(c), Some(k)) => Some((c, k)),
        (None, None) => None,
        _ => {
            return Err(invalid(
                "intake.nats.tls_cert",
                "and intake.nats.tls_key go together: give both or neither",
            ));
        }
    };
    for p in [&raw.creds_file, &tls_client.as_ref().map(|c| c.1.clone())]
        .into_iter()
        .flatten()
    {
        private_paths.push(p.clone());
    }
    let max_deliver = raw.max_deliver.unwrap_or(3);
    if max_deliver == 0 {
        return Err(invalid("intake.nats.max_deliver", "must be at least 1"));
    }
    let replicas = raw.replicas.unwrap_or(1);
    if !(1..=5).contains(&replicas) {
        return Err(invalid(
            "intake.nats.replicas",
            "must be between 1 and 5 (JetStream's limit)",
        ));
    }
    let ack_wait = positive_duration(raw.ack_wait.as_deref(), "intake.nats.ack_wait", "30s")?;
    if ack_wait < Duration::from_secs(1) {
        return Err(invalid(
            "intake.nats.ack_wait",
            "must be at least 1s: the agent tells the queue a job is in progress every third of it",
        ));
    }
    Ok(NatsConfig {
        servers,
        creds_file: raw.creds_file,
        tls_ca: raw.tls_ca,
        tls_client,
        subjects,
        ack_wait,
        max_deliver,
        replicas,
        events_max_age: positive_duration(raw.events_max_age.as_deref(), "intake.nats.events_max_age", "7d")?,
    })
}

fn read_tls(raw: RawTls, private_paths: &mut Vec<PathBuf>) -> Result<TlsConfig, ConfigError> {
    let (Some(cert_path), Some(key_path)) = (raw.cert, raw.key) else {
        return Err(invalid(
            "tls",
            "needs both `cert` and `key` (PEM files); remove [tls] to serve without TLS on loopback",
        ));
    };
    let read = |key: &'static str, path: &Path, want: &str| {
        let bytes =
            std::fs::read(path).map_err(|e| invalid(key, format!("cannot read {}: {e}", path.display())))?;
        if !String::from_utf8_lossy(&bytes).contains(want) {
            return Err(invalid(
                key,
                format!("{} holds no PEM block \"{want}\"", path.display()),
            ));
        }
        Ok(bytes)
    };
    let cert = read("tls.cert", &cert_path, "-----BEGIN CERTIFICATE-----")?;
    let key = Secret::new(read("tls.key", &key_path, "PRIVATE KEY-----")?);
    let client_ca = match &raw.client_ca {
        Some(p) => Some(read("tls.client_ca", p, "-----BEGIN CERTIFICATE-----")?),
        None => None,
    };
    private_paths.push(key_path);
    Ok(TlsConfig { cert, key, client_ca })
}

fn read_network(n: RawNetwork, max_jobs: u32) -> Result<NetworkSettings, ConfigError> {
    let cidrs = |list: &[String], key: &'static str| -> Result<Vec<Cidr>, ConfigError> {
        list.iter()
            .map(|c| c.parse().map_err(|e: String| invalid(key, e)))
            .collect()
    };
    let subnet: Option<Cidr> = match n.subnet.as_deref() {
        None => None,
        Some(s) => Some(s.parse().map_err(|e: String| invalid("network.subnet", e))?),
    };
    if let Some(subnet) = subnet
        && subnet.job_addresses() < u64::from(max_jobs)
    {
        return Err(invalid(
            "network.subnet",
            format!(
                "{subnet} holds {} job addresses; max_jobs = {max_jobs} needs one each (and the bridge one): \
                 use a larger range",
                subnet.job_addresses()
            ),
        ));
    }
    let dns = n
        .dns
        .iter()
        .map(|d| {
            d.parse::<std::net::Ipv4Addr>()
                .ok()
                .filter(|a| !a.is_loopback())
                .ok_or_else(|| {
                    invalid(
                        "network.dns",
                        format!("{d:?} is not an IPv4 address a job can reach (not loopback)"),
                    )
                })
        })
        .collect::<Result<_, _>>()?;
    Ok(NetworkSettings {
        subnet,
        dns,
        deny: cidrs(&n.deny, "network.deny")?,
        allow: cidrs(&n.allow, "network.allow")?,
    })
}

fn read_retention(r: RawRetention) -> Result<RetentionConfig, ConfigError> {
    let max_age = parse_duration(r.max_age.as_deref(), "retention.max_age", "7d")?;
    let interval = positive_duration(r.interval.as_deref(), "retention.interval", "1m")?;
    let cache_max_age = positive_duration(r.cache_max_age.as_deref(), "retention.cache_max_age", "7d")?;
    Ok(RetentionConfig {
        max_age,
        max_jobs: r.max_jobs.unwrap_or(1000),
        max_bytes: r.max_bytes.unwrap_or(10 << 30),
        interval,
        cache_max_age,
    })
}

fn read_storage(
    s: RawStorage,
    state_dir: &Path,
    private_paths: &mut Vec<PathBuf>,
) -> Result<StorageConfig, ConfigError> {
    let url = s
        .url
        .unwrap_or_else(|| format!("file://{}", state_dir.join("store").display()));
    let scheme = url.split_once("://").map(|(s, _)| s).unwrap_or("");
    if !matches!(
        scheme,
        "file" | "s3" | "s3a" | "gs" | "gcs" | "az" | "azure" | "abfs" | "abfss"
    ) {
        return Err(invalid(
            "storage.url",
            format!(
                "{url:?}: the store is file:///DIR, s3://BUCKET[/PREFIX], gs://BUCKET[/PREFIX] or \
                 az://CONTAINER[/PREFIX]"
            ),
        ));
    }
    if scheme == "file" && !url["file://".len()..].starts_with('/') {
        return Err(invalid(
            "storage.url",
            format!("{url:?}: a file:// url names an absolute directory: file:///var/lib/runnel/store"),
        ));
    }
    if let Some(e) = &s.endpoint {
        let http = e.starts_with("http://");
        if !http && !e.starts_with("https://") {
            return Err(invalid(
                "storage.endpoint",
                format!("{e:?} is not an http(s):// address"),
            ));
        }
        if http && s.allow_http != Some(true) {
            return Err(invalid(
                "storage.endpoint",
                format!(
                    "{e:?} is plain HTTP: credentials and objects would cross the network in clear; set allow_http = true if it is on loopback or a trusted network"
                ),
            ));
        }
    }
    if let Some(p) = &s.credentials_file {
        if !p.is_file() {
            return Err(invalid(
                "storage.credentials_file",
                format!("{} is not a readable file", p.display()),
            ));
        }
        private_paths.push(p.clone());
    }
    if url::Url::parse(&url).is_err() {
        return Err(invalid("storage.url", format!("{url:?} is not a url")));
    }
    let settings = crate::store::StoreSettings {
        url: url.clone(),
        endpoint: s.endpoint,
        region: s.region,
        credentials_file: s.credentials_file,
        allow_http: s.allow_http.unwrap_or(false),
    };
    if let Some(dir) = url.strip_prefix("file://") {
        // A host image's container must not see other projects' caches.
        private_paths.push(PathBuf::from(dir));
    }
    Ok(StorageConfig {
        settings,
        cache_max_age: positive_duration(s.cache_max_age.as_deref(), "storage.cache_max_age", "15d")?,
        artifact_max_age: positive_duration(
            s.artifact_max_age.as_deref(),
            "storage.artifact_max_age",
            "30d",
        )?,
    })
}

fn positive_duration(text: Option<&str>, key: &'static str, default: &str) -> Result<Duration, ConfigError> {
    let d = parse_duration(text, key, default)?;
    if d.is_zero() {
        return Err(invalid(key, "must be more than zero"));
    }
    Ok(d)
}

fn parse_addr(text: &str, key: &'static str) -> Result<SocketAddr, ConfigError> {
    text.parse().map_err(|_| {
        invalid(
            key,
            format!("{text:?} is not an address:port such as \"127.0.0.1:7450\""),
        )
    })
}

/// One token per line; blank lines and `#` comments are ignored.
fn read_tokens(path: &Path, key: &'static str) -> Result<Vec<Secret>, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| invalid(key, format!("cannot read {}: {e}", path.display())))?;
    let tokens: Vec<Secret> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| Secret::new(l.as_bytes().to_vec()))
        .collect();
    if tokens.is_empty() {
        return Err(invalid(key, format!("{} holds no token", path.display())));
    }
    Ok(tokens)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_config_has_every_default() {
        let c = Config::from_toml("").unwrap();
        assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(c.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
        assert_eq!(c.runtime.settings.kind, RuntimeKind::Embedded);
        assert_eq!(c.runtime.image, "host");
        assert!(c.runtime.allow_host_image);
        assert_eq!(c.runtime.grace_period, Duration::from_secs(10));
        assert!(c.tls.is_none());
        assert_eq!(c.metrics_listen, None);
        assert_eq!(c.log_format, LogFormat::Text);
        assert_eq!(c.retention.max_age, Duration::from_secs(7 * 24 * 3600));
        assert_eq!(c.retention.max_jobs, 1000);
        assert_eq!(c.retention.max_bytes, 10 << 30);
        assert_eq!(c.runtime.disk_bytes, Some(10 << 30));
        assert_eq!(c.runtime.memory_bytes, Some(DEFAULT_MEMORY_BYTES));
        assert_eq!(c.runtime.cpu_millis, Some(DEFAULT_CPU_MILLIS));
    }

    #[test]
    fn zero_memory_or_cpu_means_no_limit() {
        let c = Config::from_toml("[runtime]\nmemory_bytes = 0\ncpu_millis = 0").unwrap();
        assert_eq!((c.runtime.memory_bytes, c.runtime.cpu_millis), (None, None));
        let e = Config::from_toml("[runtime]\nmemory_bytes = 1024")
            .unwrap_err()
            .to_string();
        assert!(e.contains("or 0 for no limit"), "{e}");
    }

    /// Keys of packaging/agent.toml that have no default value (unset), so
    /// the file shows an example; every other commented key shows its
    /// default.
    const EXAMPLES: &[&str] = &[
        "agent_id",
        "metrics_listen",
        "metrics_token_file",
        "auth.scheduler_tokens_file",
        "auth.operator_tokens_file",
        "tls.cert",
        "tls.key",
        "tls.client_ca",
        "runtime.path",
        "runtime.insecure_registries",
        "network.subnet",
        "network.dns",
        "network.deny",
        "network.allow",
        "storage.endpoint",
        "storage.region",
        "storage.credentials_file",
        "labels.pool",
        // [intake.nats] is off unless configured: each key is an example.
        "intake.nats.url",
        "intake.nats.creds_file",
        "intake.nats.tls_ca",
        "intake.nats.tls_cert",
        "intake.nats.tls_key",
        "intake.nats.subjects",
        "intake.nats.ack_wait",
        "intake.nats.max_deliver",
        "intake.nats.replicas",
        "intake.nats.events_max_age",
    ];

    #[test]
    fn the_nats_intake_takes_jobs_from_the_subject_of_its_labels_unless_told() {
        let c = Config::from_toml("[intake.nats]\nurl = \"nats://127.0.0.1:4222\"\n").unwrap();
        let n = c.nats.unwrap();
        assert_eq!(n.subjects, ["runnel.jobs.default"]);
        assert_eq!(
            (n.ack_wait, n.max_deliver, n.replicas),
            (Duration::from_secs(30), 3, 1)
        );
        let c = Config::from_toml(
            "[labels]\npool = \"linux\"\narch = \"x86_64\"\n[intake.nats]\nurl = [\"nats://a:4222\", \"tls://b:4222\"]\n",
        )
        .unwrap();
        let n = c.nats.unwrap();
        assert_eq!(n.subjects, ["runnel.jobs.arch=x86_64.pool=linux"]);
        assert_eq!(n.servers, ["nats://a:4222", "tls://b:4222"]);
    }

    #[test]
    fn a_bad_nats_intake_is_refused_naming_the_key_and_the_fix() {
        let err = |text: &str| Config::from_toml(text).unwrap_err().to_string();
        let e = err("[labels]\npool = \"linux x86\"\n[intake.nats]\nurl = \"nats://a:4222\"\n");
        assert!(
            e.contains("intake.nats.subjects") && e.contains("set intake.nats.subjects"),
            "{e}"
        );
        let e = err("[intake.nats]\nurl = \"nats://a:4222\"\nsubjects = [\"jobs.linux\"]\n");
        assert!(e.contains("is not under \"runnel.jobs.\""), "{e}");
        let e = err("[intake.nats]\nurl = \"nats://a:4222\"\nsubjects = [\"runnel.jobs.*\"]\n");
        assert!(e.contains("no wildcards"), "{e}");
        let e = err("[intake.nats]\nurl = \"http://a:4222\"\n");
        assert!(
            e.contains("intake.nats.url") && e.contains("nats://127.0.0.1:4222"),
            "{e}"
        );
        let e = err("[intake.nats]\nurl = \"nats://a:4222\"\ntls_cert = \"/c.pem\"\n");
        assert!(e.contains("tls_key go together"), "{e}");
        let e = err("[intake.nats]\nurl = \"nats://a:4222\"\nack_wait = \"100ms\"\n");
        assert!(e.contains("intake.nats.ack_wait"), "{e}");
        let e = err("[intake.nats]\nurl = \"nats://a:4222\"\nmax_deliver = 0\n");
        assert!(e.contains("intake.nats.max_deliver"), "{e}");
    }

    /// `(section, key, the line uncommented)` of every `#key = value` line
    /// of the packaged config, in the section (`[x]` or `#[x]`) it sits in.
    fn documented_keys(text: &str) -> Vec<(String, String, String)> {
        let mut section = String::new();
        let mut out = Vec::new();
        for line in text.lines() {
            let bare = line.strip_prefix('#').unwrap_or(line);
            if let Some(name) = bare.strip_prefix('[').and_then(|b| b.strip_suffix(']')) {
                section = name.to_string();
                continue;
            }
            let Some(body) = line.strip_prefix('#') else {
                continue;
            };
            let Some((key, _)) = body.split_once(" = ") else {
                continue;
            };
            if !key.is_empty() && key.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
                out.push((section.clone(), key.to_string(), body.to_string()));
            }
        }
        out
    }

    #[test]
    fn the_packaged_config_shows_the_codes_defaults() {
        let text = include_str!("../packaging/agent.toml");
        let keys = documented_keys(text);
        assert!(keys.len() > 40, "found only {} keys: {keys:?}", keys.len());
        // The file as shipped (every key commented) is the defaults.
        let defaults = format!("{:?}", Config::from_toml(text).unwrap());
        assert_eq!(defaults, format!("{:?}", Config::from_toml("").unwrap()));
        let mut wrong = Vec::new();
        for (section, key, line) in &keys {
            let name = if section.is_empty() {
                key.clone()
            } else {
                format!("{section}.{key}")
            };
            let doc = if section.is_empty() {
                format!("{line}\n")
            } else {
                format!("[{section}]\n{line}\n")
            };
            let example = EXAMPLES.contains(&name.as_str());
            match Config::from_toml(&doc) {
                Ok(c) if format!("{c:?}") == defaults && example => wrong.push(format!(
                    "{name}: listed as an example, but `{line}` is the default"
                )),
                Ok(c) if format!("{c:?}") == defaults => {}
                Ok(_) if !example => wrong.push(format!("{name}: `{line}` is not the default")),
                Err(e) if !example => wrong.push(format!("{name}: `{line}` does not load: {e}")),
                _ => {}
            }
        }
        assert!(
            wrong.is_empty(),
            "packaging/agent.toml disagrees with Config:\n{}",
            wrong.join("\n")
        );
        for name in EXAMPLES {
            let found = keys.iter().any(|(s, k, _)| {
                &(if s.is_empty() {
                    k.clone()
                } else {
                    format!("{s}.{k}")
                }) == name
            });
            assert!(found, "{name} is no longer in packaging/agent.toml");
        }
    }

    #[test]
    fn jobs_get_a_private_network_unless_configured_and_host_must_be_allowed() {
        let c = Config::from_toml("").unwrap();
        assert_eq!(c.runtime.network, Network::Private);
        assert!(!c.runtime.allow_host_network);
        assert_eq!(c.network.subnet, None);
        let e = Config::from_toml("[runtime]\nnetwork = \"host\"")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("runtime.allow_host_network") || e.contains("allow_host_network = true"),
            "{e}"
        );
        let c = Config::from_toml("[runtime]\nnetwork = \"host\"\nallow_host_network = true").unwrap();
        assert_eq!(c.runtime.network, Network::Host);
        let c = Config::from_toml(
            "[network]\nsubnet = \"10.9.0.0/24\"\ndns = [\"198.18.0.53\"]\ndeny = [\"10.0.0.0/8\"]\nallow = [\"10.1.2.3\"]",
        )
        .unwrap();
        assert_eq!(c.network.dns, vec![std::net::Ipv4Addr::new(198, 18, 0, 53)]);
        assert_eq!(c.network.deny[0].to_string(), "10.0.0.0/8");
        assert_eq!(c.network.allow[0].to_string(), "10.1.2.3/32");
        for (text, key, says) in [
            ("[network]\ndns = [\"127.0.0.53\"]", "network.dns", "loopback"),
            (
                "[network]\nsubnet = \"10.9.0.1/24\"",
                "network.subnet",
                "10.9.0.0/24",
            ),
            (
                "max_jobs = 8\n[network]\nsubnet = \"10.9.0.0/29\"",
                "network.subnet",
                "max_jobs = 8",
            ),
            ("[network]\ndeny = [\"nope\"]", "network.deny", "IPv4 range"),
        ] {
            let e = Config::from_toml(text).unwrap_err().to_string();
            assert!(e.contains(key) && e.contains(says), "{text}: {e}");
        }
    }

    #[test]
    fn the_disk_limit_is_a_size_or_0_for_none() {
        let disk =
            |text: &str| Config::from_toml(&format!("[runtime]\n{text}")).map(|c| c.runtime.disk_bytes);
        assert_eq!(disk("disk_bytes = 0").unwrap(), None);
        assert_eq!(disk("disk_bytes = 67108864").unwrap(), Some(64 << 20));
        let err = disk("disk_bytes = 1048576").unwrap_err().to_string();
        assert_eq!(
            err,
            "config key `runtime.disk_bytes`: is 1048576 bytes; must be at least 16 MiB (16777216), \
             or 0 for no limit"
        );
        assert!(disk("disk_bytes = 9007199254740992").is_err());
    }

    #[test]
    fn user_namespaces_are_on_by_default_with_a_range_per_slot() {
        let none = || (String::new(), String::new());
        assert_eq!(userns_base(None, 4, &none).unwrap(), USERNS_BASE);
        assert!(Config::from_toml("").unwrap().runtime.userns_base.is_some());
        assert_eq!(
            Config::from_toml("[runtime]\nuserns = false")
                .unwrap()
                .runtime
                .userns_base,
            None
        );
        assert_eq!(userns_base(Some(200_000), 4, &none).unwrap(), 200_000);
        // Every slot's 65536 ids must fit below 2^32.
        let top = (1u64 << 32) - 4 * 65_536;
        assert_eq!(userns_base(Some(top as u32), 4, &none).unwrap(), top as u32);
        let e = userns_base(Some(top as u32 + 1), 4, &none)
            .unwrap_err()
            .to_string();
        assert!(e.contains("runtime.userns_base") && e.contains("max_jobs"), "{e}");
        assert!(userns_base(Some(0), 1, &none).is_err());
    }

    #[test]
    fn subordinate_ids_of_runnel_give_the_range() {
        let files = |u: &str, g: &str| {
            let (u, g) = (u.to_string(), g.to_string());
            move || (u.clone(), g.clone())
        };
        let both = "admin:100000:65536\nrunnel:300000:262144\n";
        assert_eq!(userns_base(None, 4, &files(both, both)).unwrap(), 300_000);
        // The config wins.
        assert_eq!(
            userns_base(Some(100_000), 4, &files(both, both)).unwrap(),
            100_000
        );
        let e = userns_base(None, 5, &files(both, both)).unwrap_err().to_string();
        assert!(
            e.contains("262144 ids from 300000") && e.contains("327680"),
            "{e}"
        );
        let e = userns_base(None, 1, &files(both, "runnel:400000:65536\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("300000:262144") && e.contains("400000:65536"), "{e}");
        let e = userns_base(None, 1, &files(both, "")).unwrap_err().to_string();
        assert!(e.contains("none"), "{e}");
        // A line that does not parse is skipped.
        assert_eq!(
            subordinate_range("runnel:x:1\nrunnel:5:6", "runnel"),
            Some((5, 6))
        );
    }

    #[test]
    fn plain_text_off_loopback_needs_insecure_listen() {
        let err = Config::from_toml("listen = \"0.0.0.0:7450\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("`listen`"), "{err}");
        assert!(err.contains("insecure_listen = true"), "{err}");
        assert!(err.contains("[tls]"), "{err}");
        let c = Config::from_toml("listen = \"0.0.0.0:7450\"\ninsecure_listen = true").unwrap();
        assert_eq!(c.listen.to_string(), "0.0.0.0:7450");
        Config::from_toml("listen = \"[::1]:7450\"").unwrap();
        Config::from_toml("listen = \"127.0.0.2:7450\"").unwrap();
        let c = Config::from_toml("listen = \"unix:/run/runnel/agent.sock\"").unwrap();
        assert_eq!(c.listen, Listen::Unix(PathBuf::from("/run/runnel/agent.sock")));
        assert_eq!(c.listen.to_string(), "unix:/run/runnel/agent.sock");
        let err = Config::from_toml("listen = \"unix:agent.sock\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("absolute path"), "{err}");
    }

    #[test]
    fn metrics_off_loopback_need_a_token_or_insecure_listen() {
        let e = Config::from_toml("metrics_listen = \"0.0.0.0:9750\"")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("metrics_listen") && e.contains("metrics_token_file"),
            "{e}"
        );
        Config::from_toml("metrics_listen = \"0.0.0.0:9750\"\ninsecure_listen = true").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m");
        std::fs::write(&p, "mtoken\n").unwrap();
        let c = Config::from_toml(&format!(
            "metrics_listen = \"0.0.0.0:9750\"\nmetrics_token_file = {:?}",
            p.display().to_string()
        ))
        .unwrap();
        assert_eq!(c.metrics_tokens[0].expose(), b"mtoken");
        assert!(c.private_paths.contains(&p));
    }

    #[test]
    fn tls_files_are_read_checked_and_the_key_hidden_from_jobs() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        std::fs::write(
            &cert,
            "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        std::fs::write(
            &key,
            "-----BEGIN PRIVATE KEY-----\nAA==\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let text = format!(
            "listen = \"0.0.0.0:1\"\n[tls]\ncert = {:?}\nkey = {:?}",
            cert.display().to_string(),
            key.display().to_string()
        );
        let c = Config::from_toml(&text).unwrap();
        let tls = c.tls.unwrap();
        assert!(tls.client_ca.is_none());
        assert_eq!(format!("{:?}", tls.key), "[MASKED]");
        assert!(c.private_paths.contains(&key));
        // A key where the certificate should be is named.
        let swapped = text.replace("c.pem", "k.pem");
        let err = Config::from_toml(&swapped).unwrap_err().to_string();
        assert!(
            err.contains("tls.cert") && err.contains("BEGIN CERTIFICATE"),
            "{err}"
        );
    }

    #[test]
    fn errors_name_the_key() {
        for (text, key) in [
            ("listen = \"nope\"", "listen"),
            ("max_jobs = 0", "max_jobs"),
            ("[runtime]\nkind = \"docker\"", "runtime.kind"),
            ("[runtime]\ngrace_period = \"soon\"", "runtime.grace_period"),
            ("state_dir = \"relative\"", "state_dir"),
            ("metrics_listen = \"localhost\"", "metrics_listen"),
            ("log_format = \"xml\"", "log_format"),
            ("[retention]\nmax_age = \"forever\"", "retention.max_age"),
            ("[retention]\ninterval = \"0s\"", "retention.interval"),
            ("[retention]\ncache_max_age = \"soon\"", "retention.cache_max_age"),
            ("[tls]\ncert = \"/nonexistent.pem\"", "tls"),
            (
                "[tls]\ncert = \"/nonexistent.pem\"\nkey = \"/nonexistent.key\"",
                "tls.cert",
            ),
        ] {
            let err = Config::from_toml(text).unwrap_err().to_string();
            assert!(err.contains(key), "{text}: {err}");
        }
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = Config::from_toml("lisen = \"127.0.0.1:1\"").unwrap_err();
        assert!(err.to_string().contains("lisen"), "{err}");
    }

    #[test]
    fn tokens_files_are_loaded_and_must_hold_a_token() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t");
        std::fs::write(&p, "# comment\n\n  abc \n").unwrap();
        let c = Config::from_toml(&format!(
            "[auth]\nscheduler_tokens_file = {:?}",
            p.display().to_string()
        ))
        .unwrap();
        assert_eq!(c.auth.scheduler_tokens[0].expose(), b"abc");
        std::fs::write(&p, "# none\n").unwrap();
        let err = Config::from_toml(&format!(
            "[auth]\noperator_tokens_file = {:?}",
            p.display().to_string()
        ))
        .unwrap_err();
        assert!(err.to_string().contains("auth.operator_tokens_file"));
    }
}
