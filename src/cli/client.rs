//! Clients of a running agent: submit, jobs, logs, cancel, info, health;
//! over TLS (with a client certificate for mutual TLS) when asked to.

use std::path::Path;
use std::time::Duration;

use futures::StreamExt;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Request, Status};

use super::{Failure, Remote, print};
use crate::api::pb;
use crate::api::pb::agent_client::AgentClient;

type Client = AgentClient<InterceptedService<Channel, BearerToken>>;

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone)]
pub struct BearerToken(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

fn token(remote: &Remote) -> Result<BearerToken, Failure> {
    let token = match (&remote.token_file, &remote.token) {
        (Some(f), _) => Some(
            std::fs::read_to_string(f)
                .map_err(|e| Failure::input(format!("cannot read token file {}: {e}", f.display())))?
                .lines()
                .map(str::trim)
                .find(|l| !l.is_empty() && !l.starts_with('#'))
                .ok_or_else(|| Failure::input(format!("token file {} holds no token", f.display())))?
                .to_string(),
        ),
        (None, Some(t)) => Some(t.trim().to_string()),
        (None, None) => None,
    };
    let value = token
        .map(|t| {
            format!("Bearer {t}")
                .parse()
                .map_err(|_| Failure::input("the token holds characters not allowed in metadata"))
        })
        .transpose()?;
    Ok(BearerToken(value))
}

fn read_pem(flag: &str, path: &Path) -> Result<Vec<u8>, Failure> {
    std::fs::read(path).map_err(|e| Failure::input(format!("{flag}: cannot read {}: {e}", path.display())))
}

/// The client side of TLS, from the `--tls-*` options; `None` for plain
/// HTTP/2.
fn client_tls(remote: &Remote, https: bool) -> Result<Option<ClientTlsConfig>, Failure> {
    let wanted = remote.tls_ca.is_some() || remote.tls_cert.is_some() || remote.tls_domain.is_some();
    if !https {
        if wanted {
            return Err(Failure::input(format!(
                "--addr {:?} is http://, but TLS options were given; use https://",
                remote.addr
            )));
        }
        return Ok(None);
    }
    let mut tls = ClientTlsConfig::new();
    tls = match &remote.tls_ca {
        Some(ca) => tls.ca_certificate(Certificate::from_pem(read_pem("--tls-ca", ca)?)),
        None => tls.with_native_roots(),
    };
    if let (Some(cert), Some(key)) = (&remote.tls_cert, &remote.tls_key) {
        tls = tls.identity(Identity::from_pem(
            read_pem("--tls-cert", cert)?,
            read_pem("--tls-key", key)?,
        ));
    }
    if let Some(domain) = &remote.tls_domain {
        tls = tls.domain_name(domain.clone());
    }
    Ok(Some(tls))
}

async fn channel(remote: &Remote) -> Result<Channel, Failure> {
    if let Some(path) = remote.addr.strip_prefix("unix:") {
        return unix_channel(std::path::PathBuf::from(path)).await;
    }
    let addr = if remote.addr.contains("://") {
        remote.addr.clone()
    } else if remote.tls_ca.is_some() || remote.tls_cert.is_some() {
        format!("https://{}", remote.addr)
    } else {
        format!("http://{}", remote.addr)
    };
    let mut endpoint = Endpoint::from_shared(addr.clone())
        .map_err(|e| Failure::input(format!("{addr:?} is not an agent address: {e}")))?
        .connect_timeout(Duration::from_secs(10));
    if let Some(tls) = client_tls(remote, addr.starts_with("https://"))? {
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|e| Failure::input(format!("cannot set up TLS for {addr}: {e}")))?;
    }
    endpoint.connect().await.map_err(|e| unreachable(&addr, &e))
}

/// The transport error alone says "transport error"; its causes say why.
fn unreachable(addr: &str, e: &tonic::transport::Error) -> Failure {
    let mut why = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        why = format!("{why}: {s}");
        source = s.source();
    }
    Failure::remote(format!("cannot reach the agent at {addr}: {why}"))
}

/// A channel to an agent listening on the Unix socket `path` (plain
/// HTTP/2: the socket's mode and group decide who may connect).
async fn unix_channel(path: std::path::PathBuf) -> Result<Channel, Failure> {
    let shown = path.display().to_string();
    Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
        .map_err(|e| unreachable(&format!("unix:{shown}"), &e))
}

async fn connect(remote: &Remote) -> Result<Client, Failure> {
    let channel = channel(remote).await?;
    Ok(AgentClient::with_interceptor(channel, token(remote)?))
}

fn refused(s: Status) -> Failure {
    Failure::remote(format!("{}: {}", s.code().description(), s.message()))
}

fn state_name(s: i32) -> String {
    pb::JobState::try_from(s)
        .map(|s| s.as_str_name().trim_start_matches("JOB_STATE_").to_string())
        .unwrap_or_else(|_| s.to_string())
}

pub async fn submit(remote: &Remote, job: &Path, follow: bool) -> Result<(), Failure> {
    let spec = crate::job::file::load(job).map_err(Failure::input)?;
    let mut client = connect(remote).await?;
    let status = client
        .submit_job(pb::SubmitJobRequest {
            job: Some((&spec).into()),
        })
        .await
        .map_err(refused)?
        .into_inner();
    eprintln!("runnel: job {} {}", status.job_id, state_name(status.state));
    if follow {
        return follow_logs(&mut client, &status.job_id, 0, &mut print::Printer::default()).await;
    }
    println!("{}", status.job_id);
    Ok(())
}

pub async fn jobs(remote: &Remote) -> Result<(), Failure> {
    let mut client = connect(remote).await?;
    let jobs = client
        .list_jobs(pb::ListJobsRequest {})
        .await
        .map_err(refused)?
        .into_inner()
        .jobs;
    println!("{:<32} {:<10} {:<15} MESSAGE", "JOB", "STATE", "FAILURE");
    for j in jobs {
        let failure = pb::FailureKind::try_from(j.failure)
            .map(|f| {
                f.as_str_name()
                    .trim_start_matches("FAILURE_KIND_")
                    .replace("UNSPECIFIED", "-")
            })
            .unwrap_or_default();
        println!(
            "{:<32} {:<10} {:<15} {}",
            j.job_id,
            state_name(j.state),
            failure,
            j.message
        );
    }
    Ok(())
}

/// One job: its state, why it failed, and its steps.
pub async fn job(remote: &Remote, job: &str) -> Result<(), Failure> {
    let mut client = connect(remote).await?;
    let s = client
        .get_job(pb::GetJobRequest {
            job_id: job.to_string(),
        })
        .await
        .map_err(refused)?
        .into_inner();
    let failure = pb::FailureKind::try_from(s.failure)
        .ok()
        .filter(|f| *f != pb::FailureKind::Unspecified)
        .map(|f| format!(" ({})", f.as_str_name().trim_start_matches("FAILURE_KIND_")))
        .unwrap_or_default();
    println!("{} {}{failure}", s.job_id, state_name(s.state));
    if !s.message.is_empty() {
        println!("{}", s.message);
    }
    print!("{}", print::steps_table(&s.steps).replace("runnel: ", ""));
    if let Some(t) = &s.test_results {
        print!("{}", print::test_results(t).replace("runnel: ", ""));
    }
    Ok(())
}

pub async fn logs(
    remote: &Remote,
    job: &str,
    after: u64,
    follow: bool,
    timestamps: bool,
) -> Result<(), Failure> {
    let mut client = connect(remote).await?;
    let mut printer = print::Printer::new(timestamps);
    if follow {
        return follow_logs(&mut client, job, after, &mut printer).await;
    }
    let mut stream = client
        .watch_job(pb::WatchJobRequest {
            job_id: job.to_string(),
            after_seq: after,
            follow: false,
        })
        .await
        .map_err(refused)?
        .into_inner();
    while let Some(e) = stream.next().await {
        printer.event(&e.map_err(refused)?);
    }
    Ok(())
}

/// Follows a job until it ends, reconnecting after a dropped connection
/// and resuming after the last seq printed: nothing missed, nothing twice.
async fn follow_logs(
    client: &mut Client,
    job: &str,
    after: u64,
    printer: &mut print::Printer,
) -> Result<(), Failure> {
    let mut last = after;
    let mut retry = Duration::from_millis(200);
    let mut end = None;
    while end.is_none() {
        let call = client
            .watch_job(pb::WatchJobRequest {
                job_id: job.to_string(),
                after_seq: last,
                follow: true,
            })
            .await;
        let mut stream = match call {
            Ok(s) => s.into_inner(),
            Err(s) if s.code() == tonic::Code::Unavailable || s.code() == tonic::Code::Unknown => {
                eprintln!("runnel: connection lost ({}); retrying in {retry:?}", s.message());
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(Duration::from_secs(10));
                continue;
            }
            Err(s) => return Err(refused(s)),
        };
        loop {
            match stream.next().await {
                Some(Ok(e)) => {
                    last = e.seq;
                    retry = Duration::from_millis(200);
                    if let Some(state) = printer.event(&e) {
                        end = Some(state);
                    }
                }
                Some(Err(s)) => {
                    eprintln!(
                        "runnel: connection lost ({}); resuming after event {last}",
                        s.message()
                    );
                    tokio::time::sleep(retry).await;
                    break;
                }
                None => break,
            }
        }
        if end.is_none() {
            // The stream ended without a final state: the job ended before we
            // asked (nothing after `last`), or the connection was cut.
            let status = client
                .get_job(pb::GetJobRequest {
                    job_id: job.to_string(),
                })
                .await
                .map(|s| s.into_inner());
            if let Ok(s) = status
                && s.last_seq <= last
                && s.finished.is_some()
            {
                end = pb::JobState::try_from(s.state).ok();
            }
        }
    }
    match end {
        Some(pb::JobState::Succeeded) => Ok(()),
        _ => Err(Failure::job_failed()),
    }
}

pub async fn cancel(remote: &Remote, job: &str) -> Result<(), Failure> {
    let mut client = connect(remote).await?;
    let status = client
        .cancel_job(pb::CancelJobRequest {
            job_id: job.to_string(),
        })
        .await
        .map_err(refused)?
        .into_inner();
    println!("{} {}", status.job_id, state_name(status.state));
    Ok(())
}

pub async fn info(remote: &Remote) -> Result<(), Failure> {
    let mut client = connect(remote).await?;
    let i = client
        .get_agent_info(pb::GetAgentInfoRequest {})
        .await
        .map_err(refused)?
        .into_inner();
    println!("agent_id:     {}", i.agent_id);
    println!("version:      {}", i.version);
    println!("runtime:      {}", i.runtime);
    println!("jobs:         {} running of {}", i.running_jobs, i.max_jobs);
    println!("draining:     {}", i.draining);
    let mut labels: Vec<_> = i.labels.into_iter().collect();
    labels.sort();
    for (k, v) in labels {
        println!("label:        {k}={v}");
    }
    Ok(())
}

pub async fn health(remote: &Remote, service: &str) -> Result<(), Failure> {
    use tonic_health::pb::health_check_response::ServingStatus;
    let mut client = tonic_health::pb::health_client::HealthClient::new(channel(remote).await?);
    let status = client
        .check(tonic_health::pb::HealthCheckRequest {
            service: service.to_string(),
        })
        .await
        .map_err(refused)?
        .into_inner()
        .status();
    println!("{}", status.as_str_name());
    match status {
        ServingStatus::Serving => Ok(()),
        _ => Err(Failure::remote(format!(
            "the agent is not serving (health: {})",
            status.as_str_name()
        ))),
    }
}
