//! TLS and mutual TLS on the gRPC API, with certificates made at test time:
//! the generated client and the `runnel` CLI over TLS, clients without the
//! right CA or certificate refused, and plain text off loopback refused by
//! the config.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::*;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use runnel::api::pb;
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

/// A CA, and PEM files of certificates it signed (the fleet's tests use
/// it for NATS too).
pub(crate) struct Ca {
    dir: tempfile::TempDir,
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

impl Ca {
    pub(crate) fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.self_signed(&key).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), cert.pem()).unwrap();
        Ca {
            dir,
            issuer: Issuer::new(params, key),
            cert_pem: cert.pem(),
        }
    }

    pub(crate) fn ca_path(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// Writes `NAME.pem` and `NAME.key` for a certificate valid for `names`.
    pub(crate) fn issue(&self, name: &str, names: &[&str]) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let (cert_path, key_path) = (
            self.dir.path().join(format!("{name}.pem")),
            self.dir.path().join(format!("{name}.key")),
        );
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (cert_path, key_path)
    }

    fn client_tls(&self) -> ClientTlsConfig {
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&self.cert_pem))
    }
}

fn identity(cert: &Path, key: &Path) -> Identity {
    Identity::from_pem(std::fs::read(cert).unwrap(), std::fs::read(key).unwrap())
}

fn tls_config(cert: &Path, key: &Path, client_ca: Option<&Path>) -> String {
    let mut s = format!(
        "[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
        cert.display(),
        key.display()
    );
    if let Some(ca) = client_ca {
        s.push_str(&format!("client_ca = \"{}\"\n", ca.display()));
    }
    s
}

/// Runs the CLI; its exit code, stdout and stderr.
fn cli(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(runnel_bin())
        .args(args)
        .env_remove("RUNNEL_ADDR")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn agent_info(c: &mut Client) -> Result<pb::AgentInfo, tonic::Status> {
    c.get_agent_info(pb::GetAgentInfoRequest {})
        .await
        .map(|r| r.into_inner())
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_serves_the_api_and_the_cli_speaks_it() {
    require!(Root);
    let ca = Ca::new("runnel test CA");
    let (cert, key) = ca.issue("agent", &["127.0.0.1", "localhost"]);
    let agent = Agent::start(&tls_config(&cert, &key, None));
    assert!(agent.addr.starts_with("https://127.0.0.1:"), "{}", agent.addr);
    assert!(agent.log().contains("tls=true"), "{}", agent.log());

    let mut c = agent
        .client_over(Some(ca.client_tls()), Some(OPERATOR_TOKEN))
        .await
        .expect("a TLS client that trusts the CA connects");
    agent_info(&mut c).await.unwrap();

    // Plain text, and a client that trusts another CA, get nowhere.
    let plain = agent.addr.replace("https://", "http://");
    let channel = tonic::transport::Endpoint::from_shared(plain)
        .unwrap()
        .connect()
        .await;
    if let Ok(channel) = channel {
        let mut c = pb::agent_client::AgentClient::new(channel);
        c.get_agent_info(pb::GetAgentInfoRequest {})
            .await
            .expect_err("a plain-text call to a TLS agent must fail");
    }
    let other = Ca::new("another CA");
    assert!(
        agent
            .client_over(Some(other.client_tls()), Some(OPERATOR_TOKEN))
            .await
            .is_err(),
        "a client that does not trust the agent's CA connected"
    );

    // The CLI: info and health over TLS, a job submitted and followed.
    let tokens = agent.state.path();
    let (ca_path, addr) = (ca.ca_path(), agent.addr.clone());
    let remote = |token: &str| {
        vec![
            "--addr".to_string(),
            addr.clone(),
            "--tls-ca".into(),
            ca_path.display().to_string(),
            "--token-file".into(),
            tokens.join(token).display().to_string(),
        ]
    };
    let args = |cmd: &[&str], token: &str| {
        let mut v: Vec<String> = cmd.iter().map(|s| s.to_string()).collect();
        v.extend(remote(token));
        v
    };
    let run = |v: Vec<String>| cli(&v.iter().map(String::as_str).collect::<Vec<_>>());
    let (code, out, err) = run(args(&["info"], "operator.tokens"));
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("agent_id:"), "{out}");
    let (code, out, err) = run(args(&["health"], "operator.tokens"));
    assert_eq!((code, out.trim()), (0, "SERVING"), "{err}");
    let job_file = agent.state.path().join("tls-job.toml");
    std::fs::write(
        &job_file,
        "job_id = \"over-tls\"\n[[steps]]\nrun = \"echo via-tls\"\n",
    )
    .unwrap();
    let (code, out, err) = run(args(
        &["submit", "-f", job_file.to_str().unwrap()],
        "scheduler.tokens",
    ));
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("via-tls"), "{out}{err}");

    // Without --tls-ca the system's roots do not know our CA.
    let (code, _, err) = cli(&["info", "--addr", &agent.addr]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("cannot reach the agent"), "{err}");
    // TLS options with an http:// address are a mistake, said so.
    let (code, _, err) = cli(&[
        "info",
        "--addr",
        "http://127.0.0.1:1",
        "--tls-ca",
        ca_path.to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("use https://"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn mutual_tls_refuses_a_client_without_a_certificate_of_the_client_ca() {
    require!(Root);
    let ca = Ca::new("runnel server CA");
    let clients = Ca::new("runnel clients CA");
    let (cert, key) = ca.issue("agent", &["127.0.0.1"]);
    let (client_cert, client_key) = clients.issue("scheduler", &["scheduler.example"]);
    let agent = Agent::start(&tls_config(&cert, &key, Some(&clients.ca_path())));
    assert!(agent.log().contains("mtls=true"), "{}", agent.log());

    let with_cert = ca.client_tls().identity(identity(&client_cert, &client_key));
    let mut c = agent
        .client_over(Some(with_cert), Some(SCHEDULER_TOKEN))
        .await
        .expect("a client with a certificate connects");
    let (status, events) = {
        let id = "mtls-job";
        submit(&mut c, job(id, &["echo mutual"])).await;
        let events = watch(&mut c, id, 0).await;
        (final_status(&events), events)
    };
    assert_eq!(state(&status), pb::JobState::Succeeded);
    assert_eq!(output(&events, pb::Stream::Stdout), "mutual\n");

    // No certificate: refused at the handshake or at the first call.
    let refused = match agent
        .client_over(Some(ca.client_tls()), Some(SCHEDULER_TOKEN))
        .await
    {
        Err(_) => true,
        Ok(mut c) => agent_info(&mut c).await.is_err(),
    };
    assert!(refused, "a client without a certificate was served");
    // A certificate from a CA the agent does not trust: refused too.
    let (stray_cert, stray_key) = ca.issue("stray", &["stray.example"]);
    let stray = ca.client_tls().identity(identity(&stray_cert, &stray_key));
    let refused = match agent.client_over(Some(stray), Some(SCHEDULER_TOKEN)).await {
        Err(_) => true,
        Ok(mut c) => agent_info(&mut c).await.is_err(),
    };
    assert!(refused, "a client with an untrusted certificate was served");

    // The CLI with and without its certificate.
    let token = agent.state.path().join("operator.tokens");
    let base = [
        "info",
        "--addr",
        &agent.addr,
        "--tls-ca",
        ca.ca_path().to_str().unwrap(),
        "--token-file",
        token.to_str().unwrap(),
    ]
    .map(str::to_string);
    let mut with = base.to_vec();
    with.extend([
        "--tls-cert".into(),
        client_cert.display().to_string(),
        "--tls-key".into(),
        client_key.display().to_string(),
    ]);
    let (code, out, err) = cli(&with.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = cli(&base.iter().map(String::as_str).collect::<Vec<_>>());
    assert_ne!(code, 0, "served without a client certificate: {out}");
    assert_eq!(code, 3, "{err}");
}

#[test]
fn a_bad_listen_or_tls_setup_stops_the_agent_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let run = |config: &str| {
        let path = dir.path().join("agent.toml");
        std::fs::write(
            &path,
            format!("state_dir = \"{}\"\n{config}", dir.path().join("state").display()),
        )
        .unwrap();
        let out = Command::new(runnel_bin())
            .args(["agent", "--config", path.to_str().unwrap()])
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // Plain text on every address: refused, naming the keys to change.
    let (code, err) = run("listen = \"0.0.0.0:0\"");
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("config key `listen`") && err.contains("insecure_listen = true"),
        "{err}"
    );
    // A certificate with the key of another: refused before listening.
    let ca = Ca::new("ca");
    let (cert, _) = ca.issue("agent", &["127.0.0.1"]);
    let (_, other_key) = ca.issue("other", &["127.0.0.1"]);
    let (code, err) = run(&format!(
        "listen = \"127.0.0.1:0\"\n{}",
        tls_config(&cert, &other_key, None)
    ));
    assert_ne!(code, Some(0), "{err}");
    assert!(err.contains("[tls] cert and key"), "{err}");
    assert!(!err.contains("runnel agent listening"), "{err}");
}
