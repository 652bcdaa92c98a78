//! What a job asks for, as plain Rust, and the one place it is validated.
//! Both edges (the gRPC API and the TOML job file) build a [`JobSpec`] and
//! call [`JobSpec::validate`]; nothing past it re-checks.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::model::Secret;

pub const MAX_JOB_ID_LEN: usize = 128;
pub const MIN_MEMORY_BYTES: u64 = 4 << 20;
/// The kernel's limit on one string of a program's arguments or
/// environment, its NUL included (`MAX_ARG_STRLEN`, 32 pages).
pub const MAX_ARG_STRLEN: usize = 32 * 4096;
/// Of what one `execve` may carry, kept for what a step gets besides its
/// spec: the image's `Env`, runnel's own variables (PATH, HOME, CI,
/// RUNNEL_*) and the path of `sh`.
pub const EXEC_RESERVE: usize = 64 * 1024;
/// The kernel never lets arguments and environment take more than this,
/// whatever the stack limit (`_STK_LIM / 4 * 3`).
const EXEC_CEILING: usize = 6 << 20;
/// The smallest disk a job may have: room for a small workspace and
/// the filesystem's own metadata.
pub const MIN_DISK_BYTES: u64 = 16 << 20;
/// The largest: half of the largest file ext4 holds (16 TiB), the job's
/// disk being a sparse file on the host.
pub const MAX_DISK_BYTES: u64 = 8 << 40;
/// The longest timeout a job or step may ask for: a year. (Longer ones
/// would not survive the trip over the wire as a protobuf Duration.)
pub const MAX_TIMEOUT: Duration = Duration::from_secs(365 * 24 * 3600);

#[derive(Debug, Clone, Default)]
pub struct JobSpec {
    pub job_id: String,
    pub checkout: Option<CheckoutSpec>,
    pub ssh: SshCredentials,
    pub container: ContainerSpec,
    pub steps: Vec<Step>,
    pub env: BTreeMap<String, String>,
    pub secrets: Vec<SecretVar>,
    /// `None` = the agent's default.
    pub timeout: Option<Duration>,
    /// For every step without its own; `None` = the agent's default.
    pub no_output_timeout: Option<Duration>,
    /// What the job's caches, workspaces and artifacts belong to; empty:
    /// none (steps that use the store are refused).
    pub project: String,
    /// The workflow whose jobs share a workspace; empty: the job's own.
    pub workflow_id: String,
}

#[derive(Debug, Clone, Default)]
pub struct CheckoutSpec {
    pub repo_url: String,
    pub revision: String,
    pub submodules: bool,
    pub depth: u32,
    /// Refs fetched beyond branches and tags (`[+]refs/SRC[:refs/DST]`).
    pub refspecs: Vec<String>,
    /// Directories of a cone-mode sparse checkout; empty = every file.
    pub sparse_paths: Vec<String>,
    /// Git LFS objects smudged into the files that are LFS pointers.
    pub lfs: bool,
}

#[derive(Debug, Clone, Default)]
pub struct SshCredentials {
    pub deploy_key: Option<Secret>,
    pub user_key: Option<Secret>,
    pub known_hosts: Vec<String>,
    pub passphrase: Option<Secret>,
    /// For steps only, never for the checkout.
    pub extra_keys: Vec<ExtraKey>,
}

/// A key a step may use (to deploy, to push), offered to `host` only
/// when given.
#[derive(Debug, Clone)]
pub struct ExtraKey {
    pub private: Secret,
    pub host: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct ContainerSpec {
    /// Empty = the agent's default.
    pub image: String,
    pub resources: Resources,
    pub network: Network,
    pub services: Vec<ServiceSpec>,
}

/// A container beside the steps, in the job's network namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceSpec {
    /// Its host name; validation fills it from the image when empty.
    pub name: String,
    /// Empty = the job's image.
    pub image: String,
    pub env: BTreeMap<String, String>,
    /// Empty = the image's Entrypoint and Cmd.
    pub command: Vec<String>,
    pub ports: Vec<u16>,
    /// `None` = [`SERVICE_READINESS_TIMEOUT`].
    pub readiness_timeout: Option<Duration>,
}

/// How long a service may take to accept connections unless it says.
pub const SERVICE_READINESS_TIMEOUT: Duration = Duration::from_secs(60);
/// The most services a job may have.
pub const MAX_SERVICES: usize = 8;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Resources {
    pub memory_bytes: Option<u64>,
    pub max_pids: Option<u32>,
    pub cpu_millis: Option<u32>,
    /// What the job may write: its workspace and the container's writable
    /// layer, together.
    pub disk_bytes: Option<u64>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Network {
    #[default]
    Default,
    Host,
    None,
    /// A network namespace of its own, on the agent's bridge, with egress
    /// through NAT and nothing of the host's or of other jobs' in reach.
    Private,
}

#[derive(Debug, Clone, Default)]
pub struct Step {
    pub name: String,
    pub kind: StepKind,
    pub env: BTreeMap<String, String>,
    pub timeout: Option<Duration>,
    pub when: When,
    pub background: bool,
    pub no_output_timeout: Option<Duration>,
    /// Relative to /workspace, or absolute; `None`: the image's WorkingDir
    /// or /workspace.
    pub working_directory: Option<String>,
    /// The shell's words; `run` follows them after `-c`. Empty: [`DEFAULT_SHELL`].
    pub shell: Vec<String>,
}

/// What a step does: runs a script, or moves files between its container
/// and the store (CircleCI's special steps, with their semantics).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepKind {
    /// A script, given to the step's shell after `-c`.
    Run(String),
    /// `paths` saved under `key` (a template), unless the key exists.
    SaveCache { key: String, paths: Vec<String> },
    /// The first of `keys` (templates) that matches, exactly or as a
    /// prefix (the newest such cache), unpacked where it was saved from.
    RestoreCache { keys: Vec<String> },
    /// `paths` under `root` added to the workflow's workspace as a layer.
    PersistToWorkspace { root: String, paths: Vec<String> },
    /// The workflow's workspace, its layers in order, unpacked at `at`.
    AttachWorkspace { at: String },
    /// `path` kept as the job's artifacts under `destination`.
    StoreArtifacts { path: String, destination: String },
    /// The JUnit XML files under `path` parsed into the job's results,
    /// and kept as artifacts.
    StoreTestResults { path: String },
}

impl Default for StepKind {
    fn default() -> Self {
        StepKind::Run(String::new())
    }
}

impl StepKind {
    /// Its name in the proto and the job file.
    pub fn name(&self) -> &'static str {
        match self {
            StepKind::Run(_) => "run",
            StepKind::SaveCache { .. } => "save_cache",
            StepKind::RestoreCache { .. } => "restore_cache",
            StepKind::PersistToWorkspace { .. } => "persist_to_workspace",
            StepKind::AttachWorkspace { .. } => "attach_workspace",
            StepKind::StoreArtifacts { .. } => "store_artifacts",
            StepKind::StoreTestResults { .. } => "store_test_results",
        }
    }

    /// The name a step of this kind gets when it has none (CircleCI's).
    fn default_name(&self) -> Option<&'static str> {
        Some(match self {
            StepKind::Run(_) => return None,
            StepKind::SaveCache { .. } => "Saving cache",
            StepKind::RestoreCache { .. } => "Restoring cache",
            StepKind::PersistToWorkspace { .. } => "Persisting to workspace",
            StepKind::AttachWorkspace { .. } => "Attaching workspace",
            StepKind::StoreArtifacts { .. } => "Uploading artifacts",
            StepKind::StoreTestResults { .. } => "Uploading test results",
        })
    }

    /// Whether it uses the store (and so needs the job's project).
    pub fn uses_store(&self) -> bool {
        !matches!(self, StepKind::Run(_))
    }
}

/// The shell of a step that names none: stops at the first command that
/// fails, as CircleCI's and GitHub's steps do.
pub const DEFAULT_SHELL: &[&str] = &["/bin/sh", "-e"];

impl Step {
    /// The step's command line: its shell, `-c` and its script.
    pub fn argv(&self) -> Vec<String> {
        let mut argv: Vec<String> = if self.shell.is_empty() {
            DEFAULT_SHELL.iter().map(|s| s.to_string()).collect()
        } else {
            self.shell.clone()
        };
        argv.push("-c".into());
        argv.push(self.script().to_string());
        argv
    }

    /// A run step's script; empty for the other kinds.
    pub fn script(&self) -> &str {
        match &self.kind {
            StepKind::Run(script) => script,
            _ => "",
        }
    }

    /// Where the step runs, as the container sees it, if it says.
    pub fn cwd(&self, workspace: &str) -> Option<String> {
        let dir = self.working_directory.as_deref()?;
        Some(if dir.starts_with('/') {
            dir.to_string()
        } else {
            format!("{workspace}/{dir}")
        })
    }
}

/// When a step runs, given how the steps before it went.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum When {
    /// While no earlier step has failed.
    #[default]
    OnSuccess,
    /// Only after an earlier step failed.
    OnFail,
    Always,
}

impl When {
    pub fn name(self) -> &'static str {
        match self {
            When::OnSuccess => "on_success",
            When::OnFail => "on_fail",
            When::Always => "always",
        }
    }

    pub fn parse(s: &str) -> Option<When> {
        [When::OnSuccess, When::OnFail, When::Always]
            .into_iter()
            .find(|w| w.name() == s)
    }

    /// Whether a step runs when an earlier one has (or has not) failed.
    pub fn runs(self, failed: bool) -> bool {
        match self {
            When::OnSuccess => !failed,
            When::OnFail => failed,
            When::Always => true,
        }
    }
}

#[derive(Debug, Clone)]
pub struct SecretVar {
    pub name: String,
    pub value: Secret,
}

impl SecretVar {
    pub fn new(name: String, value: String) -> Self {
        SecretVar {
            name,
            value: Secret::from(value),
        }
    }
}

/// A spec that cannot run, with the field at fault named as in the proto
/// (`steps[1].run`), so the scheduler's author knows what to fix.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("{field}: {reason}")]
pub struct SpecError {
    pub field: String,
    pub reason: String,
}

fn err(field: impl Into<String>, reason: impl Into<String>) -> SpecError {
    SpecError {
        field: field.into(),
        reason: reason.into(),
    }
}

/// A step's kind: a run step's script is not empty; the store's steps
/// name what they need, and the job names its project.
fn validate_kind(field: &str, kind: &StepKind, project: &str) -> Result<(), SpecError> {
    let nonempty = |name: &str, value: &str| {
        if value.trim().is_empty() {
            Err(err(
                format!("{field}.{}.{name}", kind.name()),
                "must not be empty",
            ))
        } else {
            Ok(())
        }
    };
    let paths = |name: &str, values: &[String]| {
        if values.is_empty() {
            return Err(err(format!("{field}.{}.{name}", kind.name()), "names no path"));
        }
        for (j, v) in values.iter().enumerate() {
            if v.trim().is_empty() {
                return Err(err(
                    format!("{field}.{}.{name}[{j}]", kind.name()),
                    "must not be empty",
                ));
            }
        }
        Ok(())
    };
    match kind {
        StepKind::Run(script) => {
            if script.trim().is_empty() {
                return Err(err(format!("{field}.run"), "must not be empty"));
            }
        }
        StepKind::SaveCache { key, paths: p } => {
            nonempty("key", key)?;
            paths("paths", p)?;
        }
        StepKind::RestoreCache { keys } => paths("keys", keys)?,
        StepKind::PersistToWorkspace { root, paths: p } => {
            nonempty("root", root)?;
            paths("paths", p)?;
        }
        StepKind::AttachWorkspace { at } => nonempty("at", at)?,
        StepKind::StoreArtifacts { path, destination } => {
            nonempty("path", path)?;
            if destination.starts_with('/')
                || destination.split('/').any(|part| part == "..")
                || destination.contains('\0')
            {
                return Err(err(
                    format!("{field}.store_artifacts.destination"),
                    format!(
                        "{destination:?} must be a relative path without \"..\" (it names a place among the job's artifacts)"
                    ),
                ));
            }
        }
        StepKind::StoreTestResults { path } => nonempty("path", path)?,
    }
    let strings: Vec<&String> = match kind {
        StepKind::Run(s) => vec![s],
        StepKind::SaveCache { key, paths } => std::iter::once(key).chain(paths).collect(),
        StepKind::RestoreCache { keys } => keys.iter().collect(),
        StepKind::PersistToWorkspace { root, paths } => std::iter::once(root).chain(paths).collect(),
        StepKind::AttachWorkspace { at } => vec![at],
        StepKind::StoreArtifacts { path, destination } => vec![path, destination],
        StepKind::StoreTestResults { path } => vec![path],
    };
    if strings.iter().any(|s| s.contains('\0')) {
        return Err(err(format!("{field}.{}", kind.name()), "contains a NUL byte"));
    }
    if kind.uses_store() && project.is_empty() {
        return Err(err(
            "project",
            format!(
                "must be set: {field} is a {} step, and what the store keeps belongs to a project",
                kind.name()
            ),
        ));
    }
    Ok(())
}

/// Services: at most [`MAX_SERVICES`], each named (from its image when
/// not) with a distinct host name, ports 1-65535, no NUL anywhere.
fn validate_services(services: &mut [ServiceSpec]) -> Result<(), SpecError> {
    if services.len() > MAX_SERVICES {
        return Err(err(
            "container.services",
            format!("has {}; at most {MAX_SERVICES}", services.len()),
        ));
    }
    let mut names = Vec::new();
    for (i, s) in services.iter_mut().enumerate() {
        let field = format!("container.services[{i}]");
        if s.name.is_empty() {
            let base = s.image.rsplit('/').next().unwrap_or_default();
            let base = base.split(['@', ':']).next().unwrap_or_default();
            s.name = if base.is_empty() {
                format!("service-{i}")
            } else {
                base.to_ascii_lowercase()
            };
        }
        let valid = s.name.len() <= 63
            && !s.name.starts_with('-')
            && !s.name.ends_with('-')
            && s.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
        if !valid || s.name == "localhost" {
            return Err(err(
                format!("{field}.name"),
                format!(
                    "{:?} is not a host name: 1 to 63 letters, digits and '-', not \"localhost\"",
                    s.name
                ),
            ));
        }
        if names.contains(&s.name) {
            return Err(err(
                format!("{field}.name"),
                format!("{:?} names another service too", s.name),
            ));
        }
        names.push(s.name.clone());
        if s.image.contains('\0') || s.command.iter().any(|a| a.contains('\0')) {
            return Err(err(field, "contains a NUL byte"));
        }
        if s.ports.contains(&0) {
            return Err(err(format!("{field}.ports"), "a port is 1 to 65535"));
        }
        validate_env(&format!("{field}.env"), &s.env)?;
        validate_timeout(&format!("{field}.readiness_timeout"), s.readiness_timeout)?;
    }
    Ok(())
}

/// 1 to 128 of `[A-Za-z0-9._-]`, and not `.` or `..` (it names a directory).
pub fn validate_job_id(id: &str) -> Result<(), SpecError> {
    validate_name("job_id", id)
}

/// A job id, project or workflow: 1 to 128 of `[A-Za-z0-9._-]`, not `.`
/// or `..` (each names a directory, or a prefix of the store's keys).
pub fn validate_name(field: &str, id: &str) -> Result<(), SpecError> {
    if id.is_empty() {
        return Err(err(field, "must not be empty"));
    }
    if id.len() > MAX_JOB_ID_LEN {
        return Err(err(
            field,
            format!("is {} characters long; at most {MAX_JOB_ID_LEN}", id.len()),
        ));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(err(
            field,
            format!("contains {c:?}; only A-Z, a-z, 0-9, '.', '_' and '-' are allowed"),
        ));
    }
    if id == "." || id == ".." {
        return Err(err(field, "must not be \".\" or \"..\""));
    }
    Ok(())
}

/// A disk size between [`MIN_DISK_BYTES`] and [`MAX_DISK_BYTES`]; what is
/// wrong with it otherwise. (The agent's config checks its default with it.)
pub fn validate_disk_bytes(bytes: u64) -> Result<(), String> {
    if bytes < MIN_DISK_BYTES {
        return Err(format!(
            "is {bytes} bytes; must be at least 16 MiB ({MIN_DISK_BYTES})"
        ));
    }
    if bytes > MAX_DISK_BYTES {
        return Err(format!(
            "is {bytes} bytes; must be at most 8 TiB ({MAX_DISK_BYTES})"
        ));
    }
    Ok(())
}

fn validate_env(field: &str, env: &BTreeMap<String, String>) -> Result<(), SpecError> {
    for (name, value) in env {
        validate_env_name(&format!("{field}[{name:?}]"), name)?;
        if value.contains('\0') {
            return Err(err(format!("{field}[{name:?}]"), "value contains a NUL byte"));
        }
    }
    Ok(())
}

fn validate_env_name(field: &str, name: &str) -> Result<(), SpecError> {
    let mut chars = name.chars();
    let ok = matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(err(
            field,
            format!("{name:?} is not a valid environment variable name ([A-Za-z_][A-Za-z0-9_]*)"),
        ))
    }
}

fn validate_timeout(field: &str, t: Option<Duration>) -> Result<(), SpecError> {
    match t {
        Some(t) if t.is_zero() => Err(err(field, "must be more than zero (or unset for the default)")),
        Some(t) if t > MAX_TIMEOUT => Err(err(
            field,
            format!("must be at most {}", humantime::format_duration(MAX_TIMEOUT)),
        )),
        _ => Ok(()),
    }
}

/// What one `execve` of this agent's steps may carry, arguments and
/// environment with their pointers: `ARG_MAX` (a quarter of the stack
/// limit the agent, and so each step, runs under), as the kernel bounds it.
pub fn exec_limit() -> usize {
    // SAFETY: sysconf reads a limit; it has no preconditions.
    let arg_max = unsafe { libc::sysconf(libc::_SC_ARG_MAX) };
    usize::try_from(arg_max)
        .unwrap_or(MAX_ARG_STRLEN)
        .clamp(MAX_ARG_STRLEN, EXEC_CEILING)
}

/// Refuses one `NAME=value` string that `execve` would refuse.
fn env_string_fits(field: String, name: &str, value_len: usize) -> Result<(), SpecError> {
    let len = name.len() + 1 + value_len;
    if len < MAX_ARG_STRLEN {
        return Ok(());
    }
    Err(err(
        field,
        format!(
            "is {len} bytes as {name}=VALUE; execve refuses an environment string over {MAX_ARG_STRLEN} bytes \
             with its NUL (the kernel's MAX_ARG_STRLEN): pass large data in a file instead"
        ),
    ))
}

impl JobSpec {
    /// Refuses what `execve` would refuse when a step starts (E2BIG): one
    /// environment string or the script (`sh -c RUN`) too long, or a
    /// step's script and environment together over `exec_limit` less
    /// [`EXEC_RESERVE`].
    fn check_exec_size(&self, exec_limit: usize) -> Result<(), SpecError> {
        let mut base: BTreeMap<&str, usize> = BTreeMap::new();
        for (name, value) in &self.env {
            env_string_fits(format!("env[{name:?}]"), name, value.len())?;
            base.insert(name, value.len());
        }
        for (i, s) in self.secrets.iter().enumerate() {
            env_string_fits(format!("secrets[{i}].value"), &s.name, s.value.expose().len())?;
            base.insert(&s.name, s.value.expose().len());
        }
        let budget = exec_limit.saturating_sub(EXEC_RESERVE);
        for (i, step) in self.steps.iter().enumerate() {
            let field = format!("steps[{i}]");
            if step.script().len() + 1 > MAX_ARG_STRLEN {
                return Err(err(
                    format!("{field}.run"),
                    format!(
                        "is {} bytes; a step runs as `sh -c RUN`, and execve refuses an argument over \
                         {MAX_ARG_STRLEN} bytes with its NUL (the kernel's MAX_ARG_STRLEN): put a long script in \
                         a file and run that",
                        step.script().len()
                    ),
                ));
            }
            let mut env = base.clone();
            for (name, value) in &step.env {
                env_string_fits(format!("{field}.env[{name:?}]"), name, value.len())?;
                env.insert(name, value.len());
            }
            env_string_fits(format!("{field}.name"), "RUNNEL_STEP", step.name.len())?;
            env.insert("RUNNEL_STEP", step.name.len());
            // Each string with its NUL, and a pointer to each.
            // The kernel copies the program's path too: /bin/sh, then argv.
            let argv = step.argv();
            let strings: usize = env.iter().map(|(k, v)| k.len() + v + 2).sum::<usize>()
                + argv[0].len()
                + 1
                + argv.iter().map(|a| a.len() + 1).sum::<usize>();
            let total = strings + (env.len() + argv.len() + 2) * std::mem::size_of::<usize>();
            if total > budget {
                return Err(err(
                    field,
                    format!(
                        "its environment and script come to {total} bytes (job env, secrets, step env and run), \
                         and a step's execve on this agent takes at most {budget} bytes (ARG_MAX {exec_limit} \
                         less {EXEC_RESERVE} kept for the image's and runnel's own variables): pass large data \
                         in files instead"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Checks the whole spec, and fills in what has a derived default (step
    /// names). Returns the first problem found.
    pub fn validate(&mut self) -> Result<(), SpecError> {
        validate_job_id(&self.job_id)?;
        for (field, name) in [("project", &self.project), ("workflow_id", &self.workflow_id)] {
            if !name.is_empty() {
                validate_name(field, name)?;
            }
        }
        if let Some(c) = &self.checkout {
            if c.repo_url.trim().is_empty() {
                return Err(err("checkout.repo_url", "must not be empty"));
            }
            if c.repo_url.contains('\0') || c.revision.contains('\0') {
                return Err(err("checkout", "contains a NUL byte"));
            }
            if c.revision.starts_with('-') {
                return Err(err("checkout.revision", "must not start with '-'"));
            }
        }
        for (i, line) in self.ssh.known_hosts.iter().enumerate() {
            if line.contains('\n') || line.contains('\0') {
                return Err(err(
                    format!("ssh.known_hosts[{i}]"),
                    "holds more than one line; give one known_hosts line per entry",
                ));
            }
        }
        for (field, key) in [
            ("ssh.deploy_key", &self.ssh.deploy_key),
            ("ssh.user_key", &self.ssh.user_key),
        ] {
            if key.as_ref().is_some_and(Secret::is_empty) {
                return Err(err(field, "is empty; leave it unset instead"));
            }
        }
        for (i, k) in self.ssh.extra_keys.iter().enumerate() {
            if k.private.is_empty() {
                return Err(err(format!("ssh.extra_keys[{i}].private_key"), "is empty"));
            }
            // A pattern goes into the job's ssh_config: one word of these
            // characters, so that it can never add a line of its own.
            if let Some(host) = &k.host
                && (host.is_empty()
                    || !host
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || ".-_*?:[]".contains(c)))
            {
                return Err(err(
                    format!("ssh.extra_keys[{i}].host"),
                    format!(
                        "{host:?} is not a host name or pattern (letters, digits and . - _ * ? : [ ]); \
                         leave it empty for every host"
                    ),
                ));
            }
        }
        let r = &self.container.resources;
        if r.memory_bytes.is_some_and(|m| m < MIN_MEMORY_BYTES) {
            return Err(err("container.resources.memory_bytes", "must be at least 4 MiB"));
        }
        if let Some(d) = r.disk_bytes {
            validate_disk_bytes(d).map_err(|reason| err("container.resources.disk_bytes", reason))?;
        }
        validate_services(&mut self.container.services)?;
        if self.steps.is_empty() {
            return Err(err("steps", "a job needs at least one step"));
        }
        for (i, step) in self.steps.iter_mut().enumerate() {
            let field = format!("steps[{i}]");
            validate_kind(&field, &step.kind, &self.project)?;
            if step.name.contains('\0') {
                return Err(err(format!("{field}.name"), "contains a NUL byte"));
            }
            if step.name.is_empty() {
                step.name = match step.kind.default_name() {
                    Some(name) => name.to_string(),
                    None => format!("step {}", i + 1),
                };
            }
            if step.kind.uses_store() && step.background {
                return Err(err(
                    format!("{field}.background"),
                    format!("a {} step cannot run in the background", step.kind.name()),
                ));
            }
            validate_env(&format!("{field}.env"), &step.env)?;
            validate_timeout(&format!("{field}.timeout"), step.timeout)?;
            validate_timeout(&format!("{field}.no_output_timeout"), step.no_output_timeout)?;
            if let Some(dir) = &step.working_directory {
                if dir.trim().is_empty() || dir.contains('\0') {
                    return Err(err(
                        format!("{field}.working_directory"),
                        "must be a path (relative to /workspace, or absolute) without NUL bytes; leave it \
                         unset for the default",
                    ));
                }
            }
            if step.shell.iter().any(|w| w.contains('\0')) {
                return Err(err(format!("{field}.shell"), "contains a NUL byte"));
            }
            if step.shell.first().is_some_and(|p| !p.starts_with('/')) {
                return Err(err(
                    format!("{field}.shell"),
                    format!(
                        "must start with the shell's absolute path (\"/bin/bash -eo pipefail\"), not {:?}",
                        step.shell[0]
                    ),
                ));
            }
        }
        validate_env("env", &self.env)?;
        for (i, s) in self.secrets.iter().enumerate() {
            validate_env_name(&format!("secrets[{i}].name"), &s.name)?;
            if s.value.is_empty() {
                return Err(err(format!("secrets[{i}].value"), "must not be empty"));
            }
            if s.value.expose().contains(&0) {
                return Err(err(format!("secrets[{i}].value"), "contains a NUL byte"));
            }
        }
        validate_timeout("timeout", self.timeout)?;
        validate_timeout("no_output_timeout", self.no_output_timeout)?;
        if self.steps.iter().all(|s| s.background) {
            return Err(err(
                "steps",
                "every step is a background step: a job needs a step it waits for",
            ));
        }
        self.check_exec_size(exec_limit())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> JobSpec {
        JobSpec {
            job_id: "j-1".into(),
            steps: vec![Step {
                kind: StepKind::Run("true".into()),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn services_are_named_from_their_image_and_checked() {
        let with = |services: Vec<ServiceSpec>| {
            let mut s = valid();
            s.container.services = services;
            s.validate().map(|()| s.container.services)
        };
        let image = |i: &str| ServiceSpec {
            image: i.into(),
            ..Default::default()
        };
        let named = with(vec![image("registry:5000/library/Postgres:15"), image("")]).unwrap();
        assert_eq!(named[0].name, "postgres");
        assert_eq!(named[1].name, "service-1");
        let e = with(vec![image("redis"), image("other/redis@sha256:ab")]).unwrap_err();
        assert_eq!(e.field, "container.services[1].name");
        let mut bad = image("x");
        bad.name = "no_underscores".into();
        assert_eq!(with(vec![bad]).unwrap_err().field, "container.services[0].name");
        let mut port = image("x");
        port.ports = vec![5432, 0];
        assert_eq!(with(vec![port]).unwrap_err().field, "container.services[0].ports");
        assert!(with(vec![image("x"); MAX_SERVICES + 1]).is_err());
    }

    fn field_of(mut spec: JobSpec) -> String {
        spec.validate().unwrap_err().field
    }

    #[test]
    fn a_minimal_spec_is_valid_and_gets_step_names() {
        let mut s = valid();
        s.validate().unwrap();
        assert_eq!(s.steps[0].name, "step 1");
    }

    #[test]
    fn job_ids() {
        for bad in ["", ".", "..", "a/b", "a b", "ä", &"x".repeat(129)] {
            assert!(validate_job_id(bad).is_err(), "{bad:?}");
        }
        for good in ["a", "A.b_c-9", &"x".repeat(128)] {
            validate_job_id(good).unwrap();
        }
    }

    #[test]
    fn each_problem_names_its_field() {
        let mut s = valid();
        s.steps.clear();
        assert_eq!(field_of(s), "steps");

        let mut s = valid();
        s.steps[0].kind = StepKind::Run(" ".into());
        assert_eq!(field_of(s), "steps[0].run");

        let mut s = valid();
        s.timeout = Some(Duration::ZERO);
        assert_eq!(field_of(s), "timeout");

        let mut s = valid();
        s.steps[0].timeout = Some(Duration::ZERO);
        assert_eq!(field_of(s), "steps[0].timeout");

        let mut s = valid();
        s.env.insert("1BAD".into(), "x".into());
        assert_eq!(field_of(s), "env[\"1BAD\"]");

        let mut s = valid();
        s.secrets.push(SecretVar {
            name: "TOKEN".into(),
            value: Secret::default(),
        });
        assert_eq!(field_of(s), "secrets[0].value");

        let mut s = valid();
        s.checkout = Some(CheckoutSpec::default());
        assert_eq!(field_of(s), "checkout.repo_url");

        let mut s = valid();
        s.ssh.known_hosts.push("a\nb".into());
        assert_eq!(field_of(s), "ssh.known_hosts[0]");

        let mut s = valid();
        s.steps[0].name = "a\0b".into();
        assert_eq!(field_of(s), "steps[0].name");
    }

    /// The reason `check_exec_size` gives with the limit `arg_max`.
    fn exec_refusal(spec: &JobSpec, arg_max: usize) -> Option<SpecError> {
        spec.check_exec_size(arg_max).err()
    }

    #[test]
    fn one_string_over_max_arg_strlen_is_refused_naming_its_size_and_the_limit() {
        let big = "x".repeat(300_000);
        let mut s = valid();
        s.env.insert("BIG".into(), big.clone());
        let e = exec_refusal(&s, 2 << 20).unwrap();
        assert_eq!(e.field, "env[\"BIG\"]");
        assert!(
            e.reason.contains("300004 bytes") && e.reason.contains("131072"),
            "{e}"
        );

        let mut s = valid();
        s.steps[0].env.insert("BIG".into(), big.clone());
        assert_eq!(exec_refusal(&s, 2 << 20).unwrap().field, "steps[0].env[\"BIG\"]");

        let mut s = valid();
        s.secrets.push(SecretVar::new("TOKEN".into(), big.clone()));
        assert_eq!(exec_refusal(&s, 2 << 20).unwrap().field, "secrets[0].value");

        let mut s = valid();
        s.steps[0].kind = StepKind::Run(big);
        let e = exec_refusal(&s, 2 << 20).unwrap();
        assert_eq!(e.field, "steps[0].run");
        assert!(
            e.reason.contains("300000 bytes") && e.reason.contains("sh -c"),
            "{e}"
        );

        // The last length that fits: NAME=VALUE and its NUL are 131072.
        let mut s = valid();
        s.env.insert("A".into(), "x".repeat(MAX_ARG_STRLEN - 3));
        assert_eq!(exec_refusal(&s, 2 << 20), None);
        s.env.insert("A".into(), "x".repeat(MAX_ARG_STRLEN - 2));
        assert!(exec_refusal(&s, 2 << 20).is_some());
    }

    #[test]
    fn a_steps_whole_environment_must_fit_arg_max_less_the_reserve() {
        let mut s = valid();
        for i in 0..16 {
            s.env.insert(format!("V{i:02}"), "x".repeat(100_000));
        }
        // 16 x 100 kB: over 1 MiB, within 2 MiB.
        assert_eq!(exec_refusal(&s, 2 << 20), None);
        let e = exec_refusal(&s, 1 << 20).unwrap();
        assert_eq!(e.field, "steps[0]");
        let budget = (1 << 20) - EXEC_RESERVE;
        assert!(
            e.reason.contains(&format!("at most {budget} bytes")) && e.reason.contains("ARG_MAX 1048576"),
            "{e}"
        );
        // The total counts what a step adds: its env and script, per step.
        let mut s = valid();
        s.env.insert("JOB".into(), "x".repeat(100_000));
        s.steps.push(Step {
            name: "second".into(),
            kind: StepKind::Run("x".repeat(100_000)),
            env: BTreeMap::from([("STEP".to_string(), "x".repeat(100_000))]),
            ..Default::default()
        });
        let e = exec_refusal(&s, 256 << 10).unwrap();
        assert_eq!(e.field, "steps[1]");
        let total: usize = e.reason.split_whitespace().nth(6).unwrap().parse().unwrap();
        assert!(total > 300_000, "{e}");
    }

    #[test]
    fn the_exec_limit_is_arg_max_within_what_the_kernel_allows() {
        let l = exec_limit();
        assert!((MAX_ARG_STRLEN..=EXEC_CEILING).contains(&l), "{l}");
    }

    #[test]
    fn a_disk_limit_is_between_16_mib_and_8_tib() {
        let with_disk = |bytes| {
            let mut s = valid();
            s.container.resources.disk_bytes = Some(bytes);
            s.validate()
        };
        for bad in [0, 1, MIN_DISK_BYTES - 1, MAX_DISK_BYTES + 1, u64::MAX] {
            let e = with_disk(bad).unwrap_err();
            assert_eq!(e.field, "container.resources.disk_bytes", "{bad}");
            assert!(e.reason.contains(&bad.to_string()), "{e}");
        }
        assert_eq!(
            with_disk(1 << 20).unwrap_err().to_string(),
            "container.resources.disk_bytes: is 1048576 bytes; must be at least 16 MiB (16777216)"
        );
        for good in [MIN_DISK_BYTES, 10 << 30, MAX_DISK_BYTES] {
            with_disk(good).unwrap();
        }
    }
}
