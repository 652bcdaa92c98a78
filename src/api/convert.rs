//! The one translation point between protobuf types and ours: requests in
//! (validated once, here, into a [`JobSpec`]), statuses and events out.

use std::time::{Duration, SystemTime};

use super::pb;
use crate::job::AgentInfo;
use crate::model::Secret;
use crate::model::spec::{
    CheckoutSpec, ContainerSpec, ExtraKey, JobSpec, Network, Resources, SecretVar, ServiceSpec, SpecError,
    SshCredentials, Step, StepKind, When,
};
use crate::model::state::{FailureKind, JobState, JobStatus, StepResult, TestResults};
use crate::model::{CheckoutDone, SubmoduleDone};
use crate::model::{Event, EventKind, KeyKind, Stream};

fn err(field: impl Into<String>, reason: impl Into<String>) -> SpecError {
    SpecError {
        field: field.into(),
        reason: reason.into(),
    }
}

fn duration_in(field: &str, d: Option<prost_types::Duration>) -> Result<Option<Duration>, SpecError> {
    match d {
        None => Ok(None),
        Some(d) => Duration::try_from(d)
            .map(Some)
            .map_err(|_| err(field, "must not be negative")),
    }
}

fn duration_out(d: Duration) -> prost_types::Duration {
    prost_types::Duration::try_from(d).unwrap_or_default()
}

fn time_out(t: SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(t)
}

fn nonzero<T: PartialEq + Default>(v: T) -> Option<T> {
    (v != T::default()).then_some(v)
}

impl TryFrom<pb::JobSpec> for JobSpec {
    type Error = SpecError;

    fn try_from(p: pb::JobSpec) -> Result<JobSpec, SpecError> {
        let ssh = p.ssh.unwrap_or_default();
        let container = p.container.unwrap_or_default();
        let network = match pb::Network::try_from(container.network) {
            Ok(pb::Network::Unspecified) => Network::Default,
            Ok(pb::Network::Host) => Network::Host,
            Ok(pb::Network::None) => Network::None,
            Ok(pb::Network::Private) => Network::Private,
            Err(_) => {
                return Err(err(
                    "container.network",
                    format!("{} is not a Network value", container.network),
                ));
            }
        };
        let resources = container.resources.unwrap_or_default();
        let mut steps = Vec::with_capacity(p.steps.len());
        for (i, s) in p.steps.into_iter().enumerate() {
            let when = match pb::StepWhen::try_from(s.when) {
                Ok(pb::StepWhen::Unspecified | pb::StepWhen::OnSuccess) => When::OnSuccess,
                Ok(pb::StepWhen::OnFail) => When::OnFail,
                Ok(pb::StepWhen::Always) => When::Always,
                Err(_) => {
                    return Err(err(
                        format!("steps[{i}].when"),
                        format!("{} is not a StepWhen value", s.when),
                    ));
                }
            };
            let kind = step_kind_in(&format!("steps[{i}]"), s.kind)?;
            steps.push(Step {
                name: s.name,
                kind,
                env: s.env.into_iter().collect(),
                timeout: duration_in(&format!("steps[{i}].timeout"), s.timeout)?,
                when,
                background: s.background,
                no_output_timeout: duration_in(
                    &format!("steps[{i}].no_output_timeout"),
                    s.no_output_timeout,
                )?,
                working_directory: nonzero(s.working_directory),
                shell: s.shell.split_whitespace().map(str::to_string).collect(),
            });
        }
        let mut services = Vec::with_capacity(container.services.len());
        for (i, s) in container.services.into_iter().enumerate() {
            let field = format!("container.services[{i}]");
            let ports = s
                .ports
                .iter()
                .map(|p| {
                    u16::try_from(*p).map_err(|_| err(format!("{field}.ports"), format!("{p} is not a port")))
                })
                .collect::<Result<_, _>>()?;
            services.push(ServiceSpec {
                name: s.name,
                image: s.image,
                env: s.env.into_iter().collect(),
                command: s.command,
                ports,
                readiness_timeout: duration_in(&format!("{field}.readiness_timeout"), s.readiness_timeout)?,
            });
        }
        let mut spec = JobSpec {
            job_id: p.job_id,
            checkout: p.checkout.map(|c| CheckoutSpec {
                repo_url: c.repo_url,
                revision: c.revision,
                submodules: c.submodules,
                depth: c.depth,
                refspecs: c.refspecs,
                sparse_paths: c.sparse_paths,
                lfs: c.lfs,
            }),
            ssh: SshCredentials {
                deploy_key: nonzero(ssh.deploy_key).map(Secret::new),
                user_key: nonzero(ssh.user_key).map(Secret::new),
                known_hosts: ssh.known_hosts,
                passphrase: nonzero(ssh.passphrase).map(Secret::from),
                extra_keys: ssh
                    .extra_keys
                    .into_iter()
                    .map(|k| ExtraKey {
                        private: Secret::new(k.private_key),
                        host: nonzero(k.host),
                    })
                    .collect(),
            },
            container: ContainerSpec {
                image: container.image,
                resources: Resources {
                    memory_bytes: nonzero(resources.memory_bytes),
                    max_pids: nonzero(resources.max_pids),
                    cpu_millis: nonzero(resources.cpu_millis),
                    disk_bytes: nonzero(resources.disk_bytes),
                },
                network,
                services,
            },
            steps,
            env: p.env.into_iter().collect(),
            secrets: p
                .secrets
                .into_iter()
                .map(|s| SecretVar::new(s.name, s.value))
                .collect(),
            timeout: duration_in("timeout", p.timeout)?,
            no_output_timeout: duration_in("no_output_timeout", p.no_output_timeout)?,
            project: p.project,
            workflow_id: p.workflow_id,
        };
        spec.validate()?;
        Ok(spec)
    }
}

/// For clients (`runnel submit`): our spec as the wire wants it.
impl From<&JobSpec> for pb::JobSpec {
    fn from(s: &JobSpec) -> pb::JobSpec {
        let expose = |k: &Option<Secret>| k.as_ref().map(|k| k.expose().to_vec()).unwrap_or_default();
        pb::JobSpec {
            job_id: s.job_id.clone(),
            checkout: s.checkout.as_ref().map(|c| pb::Checkout {
                refspecs: c.refspecs.clone(),
                sparse_paths: c.sparse_paths.clone(),
                repo_url: c.repo_url.clone(),
                revision: c.revision.clone(),
                submodules: c.submodules,
                depth: c.depth,
                lfs: c.lfs,
            }),
            ssh: Some(pb::SshCredentials {
                deploy_key: expose(&s.ssh.deploy_key),
                user_key: expose(&s.ssh.user_key),
                known_hosts: s.ssh.known_hosts.clone(),
                passphrase: s
                    .ssh
                    .passphrase
                    .as_ref()
                    .map(|p| String::from_utf8_lossy(p.expose()).into_owned())
                    .unwrap_or_default(),
                extra_keys: s
                    .ssh
                    .extra_keys
                    .iter()
                    .map(|k| pb::ExtraKey {
                        private_key: k.private.expose().to_vec(),
                        host: k.host.clone().unwrap_or_default(),
                    })
                    .collect(),
            }),
            container: Some(pb::Container {
                image: s.container.image.clone(),
                resources: Some(pb::Resources {
                    memory_bytes: s.container.resources.memory_bytes.unwrap_or(0),
                    max_pids: s.container.resources.max_pids.unwrap_or(0),
                    cpu_millis: s.container.resources.cpu_millis.unwrap_or(0),
                    disk_bytes: s.container.resources.disk_bytes.unwrap_or(0),
                }),
                network: match s.container.network {
                    Network::Default => pb::Network::Unspecified,
                    Network::Host => pb::Network::Host,
                    Network::None => pb::Network::None,
                    Network::Private => pb::Network::Private,
                } as i32,
                services: s
                    .container
                    .services
                    .iter()
                    .map(|v| pb::Service {
                        name: v.name.clone(),
                        image: v.image.clone(),
                        env: v.env.clone().into_iter().collect(),
                        command: v.command.clone(),
                        ports: v.ports.iter().map(|p| u32::from(*p)).collect(),
                        readiness_timeout: v.readiness_timeout.map(duration_out),
                    })
                    .collect(),
            }),
            steps: s
                .steps
                .iter()
                .map(|st| pb::Step {
                    name: st.name.clone(),
                    kind: Some(step_kind_out(&st.kind)),
                    env: st.env.clone().into_iter().collect(),
                    timeout: st.timeout.map(duration_out),
                    when: when_out(st.when) as i32,
                    background: st.background,
                    no_output_timeout: st.no_output_timeout.map(duration_out),
                    working_directory: st.working_directory.clone().unwrap_or_default(),
                    shell: st.shell.join(" "),
                })
                .collect(),
            env: s.env.clone().into_iter().collect(),
            secrets: s
                .secrets
                .iter()
                .map(|v| pb::Secret {
                    name: v.name.clone(),
                    value: String::from_utf8_lossy(v.value.expose()).into_owned(),
                })
                .collect(),
            timeout: s.timeout.map(duration_out),
            no_output_timeout: s.no_output_timeout.map(duration_out),
            project: s.project.clone(),
            workflow_id: s.workflow_id.clone(),
        }
    }
}

pub fn state_out(s: JobState) -> pb::JobState {
    match s {
        JobState::Queued => pb::JobState::Queued,
        JobState::Preparing => pb::JobState::Preparing,
        JobState::Running => pb::JobState::Running,
        JobState::Succeeded => pb::JobState::Succeeded,
        JobState::Failed => pb::JobState::Failed,
        JobState::Cancelled => pb::JobState::Cancelled,
        JobState::TimedOut => pb::JobState::TimedOut,
        JobState::Lost => pb::JobState::Lost,
    }
}

fn failure_out(f: FailureKind) -> pb::FailureKind {
    match f {
        FailureKind::None => pb::FailureKind::Unspecified,
        FailureKind::BadSpec => pb::FailureKind::BadSpec,
        FailureKind::HostKey => pb::FailureKind::HostKey,
        FailureKind::Auth => pb::FailureKind::Auth,
        FailureKind::RepoNotFound => pb::FailureKind::RepoNotFound,
        FailureKind::Revision => pb::FailureKind::Revision,
        FailureKind::Checkout => pb::FailureKind::Checkout,
        FailureKind::Image => pb::FailureKind::Image,
        FailureKind::Step => pb::FailureKind::Step,
        FailureKind::Timeout => pb::FailureKind::Timeout,
        FailureKind::Cancelled => pb::FailureKind::Cancelled,
        FailureKind::Agent => pb::FailureKind::Agent,
        FailureKind::Service => pb::FailureKind::Service,
        FailureKind::NoOutput => pb::FailureKind::NoOutput,
        FailureKind::Storage => pb::FailureKind::Storage,
    }
}

/// A step's kind off the wire; a step without one says what it lacks.
fn step_kind_in(field: &str, kind: Option<pb::step::Kind>) -> Result<StepKind, SpecError> {
    use pb::step::Kind as K;
    Ok(match kind {
        None => {
            return Err(err(
                format!("{field}.run"),
                "must not be empty (or give the step another kind: save_cache, restore_cache, \
                 persist_to_workspace, attach_workspace, store_artifacts, store_test_results)",
            ));
        }
        Some(K::Run(script)) => StepKind::Run(script),
        Some(K::SaveCache(c)) => StepKind::SaveCache {
            key: c.key,
            paths: c.paths,
        },
        Some(K::RestoreCache(c)) => StepKind::RestoreCache { keys: c.keys },
        Some(K::PersistToWorkspace(p)) => StepKind::PersistToWorkspace {
            root: p.root,
            paths: p.paths,
        },
        Some(K::AttachWorkspace(a)) => StepKind::AttachWorkspace { at: a.at },
        Some(K::StoreArtifacts(a)) => StepKind::StoreArtifacts {
            path: a.path,
            destination: a.destination,
        },
        Some(K::StoreTestResults(t)) => StepKind::StoreTestResults { path: t.path },
    })
}

fn step_kind_out(kind: &StepKind) -> pb::step::Kind {
    use pb::step::Kind as K;
    match kind.clone() {
        StepKind::Run(script) => K::Run(script),
        StepKind::SaveCache { key, paths } => K::SaveCache(pb::SaveCache { key, paths }),
        StepKind::RestoreCache { keys } => K::RestoreCache(pb::RestoreCache { keys }),
        StepKind::PersistToWorkspace { root, paths } => {
            K::PersistToWorkspace(pb::PersistToWorkspace { root, paths })
        }
        StepKind::AttachWorkspace { at } => K::AttachWorkspace(pb::AttachWorkspace { at }),
        StepKind::StoreArtifacts { path, destination } => {
            K::StoreArtifacts(pb::StoreArtifacts { path, destination })
        }
        StepKind::StoreTestResults { path } => K::StoreTestResults(pb::StoreTestResults { path }),
    }
}

impl From<&TestResults> for pb::TestResults {
    fn from(t: &TestResults) -> Self {
        pb::TestResults {
            tests: t.tests,
            failures: t.failures,
            errors: t.errors,
            skipped: t.skipped,
            failed: t
                .failed
                .iter()
                .map(|f| pb::TestFailure {
                    suite: f.suite.clone(),
                    classname: f.classname.clone(),
                    name: f.name.clone(),
                    message: f.message.clone(),
                    file: f.file.clone(),
                })
                .collect(),
            files: t.files,
            unreadable: t.unreadable.clone(),
        }
    }
}

fn when_out(w: When) -> pb::StepWhen {
    match w {
        When::OnSuccess => pb::StepWhen::OnSuccess,
        When::OnFail => pb::StepWhen::OnFail,
        When::Always => pb::StepWhen::Always,
    }
}

fn key_out(k: KeyKind) -> pb::KeyKind {
    match k {
        KeyKind::None => pb::KeyKind::None,
        KeyKind::User => pb::KeyKind::User,
        KeyKind::Deploy => pb::KeyKind::Deploy,
    }
}

impl From<&StepResult> for pb::StepResult {
    fn from(r: &StepResult) -> Self {
        pb::StepResult {
            index: r.index,
            name: r.name.clone(),
            // A step that did not run has no state.
            state: match r.started {
                Some(_) => state_out(r.state) as i32,
                None => pb::JobState::Unspecified as i32,
            },
            exit_code: r.exit_code,
            signal: r.signal,
            duration: Some(duration_out(r.duration)),
            started: r.started.map(time_out),
            when: when_out(r.when) as i32,
            note: r.note.clone(),
            background: r.background,
        }
    }
}

impl From<&JobStatus> for pb::JobStatus {
    fn from(s: &JobStatus) -> Self {
        pb::JobStatus {
            job_id: s.job_id.clone(),
            state: state_out(s.state) as i32,
            failure: failure_out(s.failure) as i32,
            message: s.message.clone(),
            created: Some(time_out(s.created)),
            started: s.started.map(time_out),
            finished: s.finished.map(time_out),
            last_seq: s.last_seq,
            steps: s.steps.iter().map(Into::into).collect(),
            attempt: s.attempt,
            test_results: s.test_results.as_ref().map(Into::into),
        }
    }
}

impl From<&SubmoduleDone> for pb::SubmoduleDone {
    fn from(s: &SubmoduleDone) -> Self {
        pb::SubmoduleDone {
            path: s.path.clone(),
            url: s.url.clone(),
            commit: s.commit.clone(),
            key: key_out(s.key) as i32,
        }
    }
}

impl From<&CheckoutDone> for pb::CheckoutDone {
    fn from(c: &CheckoutDone) -> Self {
        pb::CheckoutDone {
            commit: c.commit.clone(),
            key: key_out(c.key) as i32,
            key_fingerprint: c.key_fingerprint.clone(),
            submodules: c.submodules.iter().map(Into::into).collect(),
        }
    }
}

pub fn event_out(job_id: &str, e: Event) -> pb::JobEvent {
    use pb::job_event::Event as E;
    let event = match e.kind {
        EventKind::State(s) => E::State((&s).into()),
        EventKind::Checkout(c) => E::Checkout((&c).into()),
        EventKind::StepStarted { index, name } => E::StepStarted(pb::StepStarted { index, name }),
        EventKind::Log { step, stream, data } => E::Log(pb::LogChunk {
            step,
            stream: match stream {
                Stream::Stdout => pb::Stream::Stdout,
                Stream::Stderr => pb::Stream::Stderr,
                Stream::System => pb::Stream::System,
            } as i32,
            data,
        }),
        EventKind::StepFinished(r) => E::StepFinished((&r).into()),
    };
    pb::JobEvent {
        job_id: job_id.to_string(),
        seq: e.seq,
        time: Some(time_out(e.time)),
        event: Some(event),
    }
}

impl From<AgentInfo> for pb::AgentInfo {
    fn from(i: AgentInfo) -> Self {
        pb::AgentInfo {
            agent_id: i.agent_id,
            version: i.version,
            labels: i.labels.into_iter().collect(),
            max_jobs: i.max_jobs,
            running_jobs: i.running_jobs,
            draining: i.draining,
            runtime: i.runtime,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> pb::JobSpec {
        pb::JobSpec {
            job_id: "j".into(),
            steps: vec![pb::Step {
                kind: Some(pb::step::Kind::Run("true".into())),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn round_trips_through_the_wire_type() {
        let mut p = spec();
        p.timeout = Some(prost_types::Duration { seconds: 5, nanos: 0 });
        p.secrets.push(pb::Secret {
            name: "T".into(),
            value: "v".into(),
        });
        let ours = JobSpec::try_from(p).unwrap();
        let back = pb::JobSpec::from(&ours);
        assert_eq!(back.timeout.unwrap().seconds, 5);
        assert_eq!(back.secrets[0].value, "v");
        assert_eq!(back.steps[0].name, "step 1");
    }

    #[test]
    fn bad_values_name_the_field() {
        let mut p = spec();
        p.timeout = Some(prost_types::Duration {
            seconds: -1,
            nanos: 0,
        });
        assert_eq!(JobSpec::try_from(p).unwrap_err().field, "timeout");
        let mut p = spec();
        p.container = Some(pb::Container {
            network: 9,
            ..Default::default()
        });
        assert_eq!(JobSpec::try_from(p).unwrap_err().field, "container.network");
    }
}
