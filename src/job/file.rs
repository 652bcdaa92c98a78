//! The TOML job file of `runnel run` and `runnel submit`: the fields of
//! `JobSpec` with the same names, plus keys and known_hosts given as files.
//! Relative paths (a local repository, key files) are relative to the job
//! file's directory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::model::Secret;
use crate::model::spec::{
    CheckoutSpec, ContainerSpec, ExtraKey, JobSpec, Network, Resources, SecretVar, ServiceSpec, SpecError,
    Step, StepKind, When,
};

#[derive(Debug, thiserror::Error)]
pub enum JobFileError {
    #[error("cannot read job file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("job file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("job file {path}: {source}")]
    Invalid { path: PathBuf, source: SpecError },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJob {
    job_id: Option<String>,
    checkout: Option<RawCheckout>,
    #[serde(default)]
    ssh: RawSsh,
    #[serde(default)]
    container: RawContainer,
    #[serde(default)]
    steps: Vec<RawStep>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    secrets: Vec<RawSecret>,
    timeout: Option<RawDuration>,
    no_output_timeout: Option<RawDuration>,
    #[serde(default)]
    project: String,
    #[serde(default)]
    workflow_id: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCheckout {
    repo_url: String,
    #[serde(default)]
    revision: String,
    #[serde(default)]
    submodules: bool,
    #[serde(default)]
    depth: u32,
    #[serde(default)]
    refspecs: Vec<String>,
    #[serde(default)]
    sparse_paths: Vec<String>,
    #[serde(default)]
    lfs: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSsh {
    deploy_key: Option<String>,
    deploy_key_file: Option<PathBuf>,
    user_key: Option<String>,
    user_key_file: Option<PathBuf>,
    #[serde(default)]
    known_hosts: Vec<String>,
    known_hosts_file: Option<PathBuf>,
    passphrase: Option<String>,
    #[serde(default)]
    extra_keys: Vec<RawExtraKey>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExtraKey {
    key: Option<String>,
    key_file: Option<PathBuf>,
    host: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawContainer {
    #[serde(default)]
    image: String,
    #[serde(default)]
    resources: RawResources,
    network: Option<String>,
    #[serde(default)]
    services: Vec<RawService>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    #[serde(default)]
    name: String,
    #[serde(default)]
    image: String,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    command: Vec<String>,
    #[serde(default)]
    ports: Vec<u16>,
    readiness_timeout: Option<RawDuration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawResources {
    memory_bytes: Option<u64>,
    max_pids: Option<u32>,
    cpu_millis: Option<u32>,
    disk_bytes: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    #[serde(default)]
    name: String,
    /// One of these (the step's kind).
    run: Option<String>,
    save_cache: Option<RawSaveCache>,
    restore_cache: Option<RawRestoreCache>,
    persist_to_workspace: Option<RawPersist>,
    attach_workspace: Option<RawAttach>,
    store_artifacts: Option<RawArtifacts>,
    store_test_results: Option<RawTestResults>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    timeout: Option<RawDuration>,
    /// "on_success" (default), "on_fail", "always".
    when: Option<String>,
    #[serde(default)]
    background: bool,
    no_output_timeout: Option<RawDuration>,
    working_directory: Option<String>,
    /// "/bin/bash -eo pipefail"
    shell: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSaveCache {
    key: String,
    paths: Vec<String>,
}

/// `key = "..."` or `keys = ["...", "..."]`, as CircleCI takes either.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRestoreCache {
    key: Option<String>,
    #[serde(default)]
    keys: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPersist {
    root: String,
    paths: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAttach {
    at: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawArtifacts {
    path: String,
    #[serde(default)]
    destination: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTestResults {
    path: String,
}

impl RawStep {
    /// The one kind it names; a field error when it names none or several.
    fn kind(&mut self, field: &str) -> Result<StepKind, SpecError> {
        let mut kinds = Vec::new();
        if let Some(run) = self.run.take() {
            kinds.push(StepKind::Run(run));
        }
        if let Some(c) = self.save_cache.take() {
            kinds.push(StepKind::SaveCache {
                key: c.key,
                paths: c.paths,
            });
        }
        if let Some(c) = self.restore_cache.take() {
            kinds.push(StepKind::RestoreCache {
                keys: c.key.into_iter().chain(c.keys).collect(),
            });
        }
        if let Some(p) = self.persist_to_workspace.take() {
            kinds.push(StepKind::PersistToWorkspace {
                root: p.root,
                paths: p.paths,
            });
        }
        if let Some(a) = self.attach_workspace.take() {
            kinds.push(StepKind::AttachWorkspace { at: a.at });
        }
        if let Some(a) = self.store_artifacts.take() {
            kinds.push(StepKind::StoreArtifacts {
                path: a.path,
                destination: a.destination,
            });
        }
        if let Some(t) = self.store_test_results.take() {
            kinds.push(StepKind::StoreTestResults { path: t.path });
        }
        let names: Vec<&str> = kinds.iter().map(StepKind::name).collect();
        match kinds.len() {
            1 => Ok(kinds.remove(0)),
            0 => Err(SpecError {
                field: field.to_string(),
                reason: "says nothing to do: give it `run`, or one of save_cache, restore_cache, \
                         persist_to_workspace, attach_workspace, store_artifacts, store_test_results"
                    .into(),
            }),
            _ => Err(SpecError {
                field: field.to_string(),
                reason: format!("is {}: a step is one of them", names.join(" and ")),
            }),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSecret {
    name: String,
    value: String,
}

/// `30` (seconds) or `"1m30s"`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawDuration {
    Seconds(u64),
    Text(String),
}

fn duration(field: &str, d: Option<RawDuration>) -> Result<Option<Duration>, SpecError> {
    match d {
        None => Ok(None),
        Some(RawDuration::Seconds(s)) => Ok(Some(Duration::from_secs(s))),
        Some(RawDuration::Text(t)) => humantime::parse_duration(&t).map(Some).map_err(|e| SpecError {
            field: field.to_string(),
            reason: format!("{t:?} is not a duration such as \"90s\" or \"10m\": {e}"),
        }),
    }
}

/// Reads and validates a job file. Without a `job_id`, one is made up.
pub fn load(path: &Path) -> Result<JobSpec, JobFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| JobFileError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(&text, path)
}

/// Validates the text of a job file found at `path` (which names it in
/// errors, and whose directory relative paths are relative to).
pub fn parse(text: &str, path: &Path) -> Result<JobSpec, JobFileError> {
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let base = if base.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        base
    };
    let invalid = |source| JobFileError::Invalid {
        path: path.to_path_buf(),
        source,
    };
    let raw: RawJob = toml::from_str(text).map_err(|e| JobFileError::Parse {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let mut spec = from_raw(raw, &base).map_err(invalid)?;
    spec.validate().map_err(invalid)?;
    Ok(spec)
}

fn read_beside(base: &Path, field: &str, file: &Path) -> Result<Vec<u8>, SpecError> {
    let p = base.join(file);
    std::fs::read(&p).map_err(|e| SpecError {
        field: field.to_string(),
        reason: format!("cannot read {}: {e}", p.display()),
    })
}

fn key(
    base: &Path,
    field: &str,
    inline: Option<String>,
    file: Option<PathBuf>,
) -> Result<Option<Secret>, SpecError> {
    match (inline, file) {
        (Some(_), Some(_)) => Err(SpecError {
            field: field.to_string(),
            reason: format!("give either {field} or {field}_file, not both"),
        }),
        (Some(k), None) => Ok(Some(Secret::from(k))),
        (None, Some(f)) => Ok(Some(Secret::new(read_beside(
            base,
            &format!("{field}_file"),
            &f,
        )?))),
        (None, None) => Ok(None),
    }
}

/// A repository given as a relative path is relative to the job file.
fn repo_url(base: &Path, url: &str) -> String {
    let looks_remote =
        url.contains("://") || (url.contains(':') && !url.starts_with('.') && !url.starts_with('/'));
    // A blank one stays blank, for validation to name.
    if looks_remote || url.trim().is_empty() || Path::new(url).is_absolute() {
        return url.to_string();
    }
    let p = base.join(url);
    std::fs::canonicalize(&p)
        .unwrap_or(p)
        .to_string_lossy()
        .into_owned()
}

fn from_raw(raw: RawJob, base: &Path) -> Result<JobSpec, SpecError> {
    let job_id = raw.job_id.unwrap_or_else(|| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        format!("local-{}-{}", t.as_secs(), std::process::id())
    });
    let mut known_hosts = raw.ssh.known_hosts;
    if let Some(f) = raw.ssh.known_hosts_file {
        let text = read_beside(base, "ssh.known_hosts_file", &f)?;
        known_hosts.extend(String::from_utf8_lossy(&text).lines().map(str::to_string));
    }
    let network = match raw.container.network.as_deref() {
        None | Some("") => Network::Default,
        Some("host") => Network::Host,
        Some("none") => Network::None,
        Some("private") => Network::Private,
        Some(other) => {
            return Err(SpecError {
                field: "container.network".into(),
                reason: format!("{other:?} is not \"private\", \"host\" or \"none\""),
            });
        }
    };
    let mut extra_keys = Vec::new();
    for (i, k) in raw.ssh.extra_keys.into_iter().enumerate() {
        let field = format!("ssh.extra_keys[{i}].key");
        let private = key(base, &field, k.key, k.key_file)?.ok_or_else(|| SpecError {
            field: field.clone(),
            reason: format!("give {field} or {field}_file"),
        })?;
        extra_keys.push(ExtraKey {
            private,
            host: k.host.filter(|h| !h.is_empty()),
        });
    }
    let mut services = Vec::new();
    for (i, s) in raw.container.services.into_iter().enumerate() {
        services.push(ServiceSpec {
            name: s.name,
            image: s.image,
            env: s.env,
            command: s.command,
            ports: s.ports,
            readiness_timeout: duration(
                &format!("container.services[{i}].readiness_timeout"),
                s.readiness_timeout,
            )?,
        });
    }
    let mut steps = Vec::new();
    for (i, mut s) in raw.steps.into_iter().enumerate() {
        let kind = s.kind(&format!("steps[{i}]"))?;
        let when = match s.when.as_deref() {
            None | Some("") => When::OnSuccess,
            Some(w) => When::parse(w).ok_or_else(|| SpecError {
                field: format!("steps[{i}].when"),
                reason: format!("{w:?} is not \"on_success\", \"on_fail\" or \"always\""),
            })?,
        };
        steps.push(Step {
            name: s.name,
            kind,
            env: s.env,
            timeout: duration(&format!("steps[{i}].timeout"), s.timeout)?,
            when,
            background: s.background,
            no_output_timeout: duration(&format!("steps[{i}].no_output_timeout"), s.no_output_timeout)?,
            working_directory: s.working_directory.filter(|d| !d.is_empty()),
            shell: s
                .shell
                .unwrap_or_default()
                .split_whitespace()
                .map(str::to_string)
                .collect(),
        });
    }
    Ok(JobSpec {
        job_id,
        checkout: raw.checkout.map(|c| CheckoutSpec {
            repo_url: repo_url(base, &c.repo_url),
            revision: c.revision,
            submodules: c.submodules,
            depth: c.depth,
            refspecs: c.refspecs,
            sparse_paths: c.sparse_paths,
            lfs: c.lfs,
        }),
        ssh: crate::model::spec::SshCredentials {
            deploy_key: key(
                base,
                "ssh.deploy_key",
                raw.ssh.deploy_key,
                raw.ssh.deploy_key_file,
            )?,
            user_key: key(base, "ssh.user_key", raw.ssh.user_key, raw.ssh.user_key_file)?,
            known_hosts,
            passphrase: raw.ssh.passphrase.map(Secret::from),
            extra_keys,
        },
        container: ContainerSpec {
            image: raw.container.image,
            resources: Resources {
                memory_bytes: raw.container.resources.memory_bytes.filter(|&m| m > 0),
                max_pids: raw.container.resources.max_pids.filter(|&p| p > 0),
                cpu_millis: raw.container.resources.cpu_millis.filter(|&c| c > 0),
                disk_bytes: raw.container.resources.disk_bytes.filter(|&d| d > 0),
            },
            network,
            services,
        },
        steps,
        env: raw.env,
        secrets: raw
            .secrets
            .into_iter()
            .map(|s| SecretVar::new(s.name, s.value))
            .collect(),
        timeout: duration("timeout", raw.timeout)?,
        no_output_timeout: duration("no_output_timeout", raw.no_output_timeout)?,
        project: raw.project,
        workflow_id: raw.workflow_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_str(text: &str) -> Result<JobSpec, JobFileError> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("job.toml");
        std::fs::write(&p, text).unwrap();
        load(&p)
    }

    #[test]
    fn a_full_job_file() {
        let spec = load_str(
            r#"
job_id = "j1"
timeout = "10m"
env = { A = "1" }
[checkout]
repo_url = "."
revision = "main"
[container]
network = "none"
[[steps]]
name = "hi"
run = "echo hi"
timeout = 30
[[secrets]]
name = "TOKEN"
value = "s3cret"
"#,
        )
        .unwrap();
        assert_eq!(spec.job_id, "j1");
        assert_eq!(spec.timeout, Some(Duration::from_secs(600)));
        assert_eq!(spec.steps[0].timeout, Some(Duration::from_secs(30)));
        assert_eq!(spec.container.network, Network::None);
        assert!(Path::new(&spec.checkout.unwrap().repo_url).is_absolute());
    }

    #[test]
    fn errors_name_the_field() {
        let e = load_str("[[steps]]\nrun = \"x\"\ntimeout = \"soon\"").unwrap_err();
        assert!(e.to_string().contains("steps[0].timeout"), "{e}");
        let e = load_str("steps = []").unwrap_err();
        assert!(e.to_string().contains("steps"), "{e}");
        let e = load_str("[[steps]]\nrun = \"x\"\n[ssh]\nuser_key_file = \"nope\"").unwrap_err();
        assert!(e.to_string().contains("ssh.user_key_file"), "{e}");
        let e = load_str("[[steps]]\nrn = \"x\"").unwrap_err();
        assert!(e.to_string().contains("rn"), "{e}");
    }

    #[test]
    fn step_conditions_background_shell_and_directories() {
        let spec = load_str(
            r#"
no_output_timeout = "5m"
[[steps]]
run = "serve"
background = true
[[steps]]
run = "make test"
shell = "/bin/bash -eo pipefail"
working_directory = "app"
no_output_timeout = "30s"
[[steps]]
run = "upload"
when = "on_fail"
"#,
        )
        .unwrap();
        assert_eq!(spec.no_output_timeout, Some(Duration::from_secs(300)));
        let [serve, test, upload] = &spec.steps[..] else {
            panic!("{:?}", spec.steps)
        };
        assert!(serve.background && !test.background);
        assert_eq!(serve.argv(), ["/bin/sh", "-e", "-c", "serve"]);
        assert_eq!(test.argv(), ["/bin/bash", "-eo", "pipefail", "-c", "make test"]);
        assert_eq!(test.cwd("/workspace").as_deref(), Some("/workspace/app"));
        assert_eq!(test.no_output_timeout, Some(Duration::from_secs(30)));
        assert_eq!(upload.when, When::OnFail);
        assert_eq!(serve.when, When::OnSuccess);

        let e = load_str("[[steps]]\nrun = \"x\"\nwhen = \"sometimes\"").unwrap_err();
        assert!(e.to_string().contains("steps[0].when"), "{e}");
        let e = load_str("[[steps]]\nrun = \"x\"\nbackground = true").unwrap_err();
        assert!(e.to_string().contains("every step is a background step"), "{e}");
        let e = load_str("[[steps]]\nrun = \"x\"\nshell = \"bash\"").unwrap_err();
        assert!(e.to_string().contains("steps[0].shell"), "{e}");
    }

    #[test]
    fn an_environment_execve_would_refuse_is_refused_here_too() {
        let big = "x".repeat(300_000);
        let e = load_str(&format!("[[steps]]\nrun = \"true\"\nenv = {{ BIG = \"{big}\" }}")).unwrap_err();
        let e = e.to_string();
        assert!(e.contains("steps[0].env[\"BIG\"]"), "{e}");
        assert!(e.contains("300004 bytes") && e.contains("131072"), "{e}");
    }

    #[test]
    fn the_store_steps_are_read_with_circlecis_names_and_need_a_project() {
        let spec = load_str(
            r#"
project = "acme.widgets"
workflow_id = "wf-1"
[[steps]]
restore_cache = { keys = ["deps-{{ checksum \"Cargo.lock\" }}", "deps-"] }
[[steps]]
restore_cache = { key = "one" }
[[steps]]
run = "make"
[[steps]]
save_cache = { key = "deps-{{ checksum \"Cargo.lock\" }}", paths = ["target", "~/.cargo"] }
[[steps]]
persist_to_workspace = { root = ".", paths = ["dist"] }
[[steps]]
attach_workspace = { at = "/tmp/ws" }
[[steps]]
store_artifacts = { path = "dist", destination = "build" }
[[steps]]
store_test_results = { path = "reports" }
"#,
        )
        .unwrap();
        assert_eq!(
            (spec.project.as_str(), spec.workflow_id.as_str()),
            ("acme.widgets", "wf-1")
        );
        let kinds: Vec<&str> = spec.steps.iter().map(|s| s.kind.name()).collect();
        assert_eq!(
            kinds,
            [
                "restore_cache",
                "restore_cache",
                "run",
                "save_cache",
                "persist_to_workspace",
                "attach_workspace",
                "store_artifacts",
                "store_test_results"
            ]
        );
        assert_eq!(spec.steps[0].name, "Restoring cache");
        assert_eq!(spec.steps[2].name, "step 3");
        assert_eq!(
            spec.steps[1].kind,
            StepKind::RestoreCache {
                keys: vec!["one".into()]
            }
        );

        let e = load_str("[[steps]]\nsave_cache = { key = \"k\", paths = [\"a\"] }").unwrap_err();
        assert!(
            e.to_string()
                .contains("project: must be set: steps[0] is a save_cache step"),
            "{e}"
        );
        let e = load_str("[[steps]]\nname = \"x\"").unwrap_err();
        assert!(e.to_string().contains("steps[0]: says nothing to do"), "{e}");
        let e = load_str("project = \"p\"\n[[steps]]\nrun = \"x\"\nattach_workspace = { at = \".\" }")
            .unwrap_err();
        assert!(e.to_string().contains("is run and attach_workspace"), "{e}");
        let e = load_str("project = \"../p\"\n[[steps]]\nrun = \"x\"").unwrap_err();
        assert!(e.to_string().contains("project: contains '/'"), "{e}");
        let e = load_str(
            "project = \"p\"\n[[steps]]\nstore_artifacts = { path = \"a\", destination = \"../x\" }",
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("steps[0].store_artifacts.destination"),
            "{e}"
        );
        let e = load_str("project = \"p\"\n[[steps]]\nsave_cache = { key = \"k\", paths = [] }").unwrap_err();
        assert!(
            e.to_string().contains("steps[0].save_cache.paths: names no path"),
            "{e}"
        );
    }
}
