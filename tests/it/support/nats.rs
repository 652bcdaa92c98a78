//! Real `nats-server` processes with JetStream on loopback ports (Debian's
//! nats-server, installed by scripts/setup): one server, or a cluster of
//! three. Each keeps its store in a directory of its own, so that it can
//! be killed and started again on the same port with what it stored.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{Need, expect, free_port, wait_for};

pub const NATS_SERVER: &str = "/usr/sbin/nats-server";

pub struct NatsServer {
    pub port: u16,
    name: String,
    /// More options: `--cluster` and `--routes` of a cluster's node, TLS.
    cluster: Vec<String>,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl NatsServer {
    /// One server with JetStream, on a free port.
    pub fn start() -> NatsServer {
        NatsServer::start_with(Vec::new())
    }

    /// One server with JetStream and these options too (`--tls ...`).
    pub fn start_with(options: Vec<String>) -> NatsServer {
        let mut s = NatsServer::new("n0", options);
        s.launch();
        s
    }

    /// Three servers with JetStream that form one cluster.
    pub fn cluster() -> Vec<NatsServer> {
        let routes: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let all = routes
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut nodes: Vec<NatsServer> = routes
            .iter()
            .enumerate()
            .map(|(i, p)| {
                NatsServer::new(
                    &format!("n{i}"),
                    vec![
                        "--cluster_name".into(),
                        "runnel-test".into(),
                        "--cluster".into(),
                        format!("nats://127.0.0.1:{p}"),
                        "--routes".into(),
                        all.clone(),
                    ],
                )
            })
            .collect();
        for n in &mut nodes {
            n.spawn();
        }
        for n in &nodes {
            n.wait_ready();
        }
        nodes
    }

    fn new(name: &str, cluster: Vec<String>) -> NatsServer {
        expect(Need::Nats);
        NatsServer {
            port: free_port(),
            name: name.to_string(),
            cluster,
            dir: tempfile::Builder::new().prefix("runnel-nats.").tempdir().unwrap(),
            child: None,
        }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The same, for a server started with `--tls`.
    pub fn tls_url(&self) -> String {
        format!("tls://127.0.0.1:{}", self.port)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn spawn(&mut self) {
        let child = Command::new(NATS_SERVER)
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-n",
                &self.name,
                "-js",
            ])
            .arg("-sd")
            .arg(self.dir.path().join("store"))
            .arg("-l")
            .arg(self.log_path())
            .args(&self.cluster)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server");
        self.child = Some(child);
    }

    fn wait_ready(&self) {
        wait_for(
            &format!("nats-server {} to accept", self.name),
            Duration::from_secs(30),
            || {
                self.log().contains("Server is ready")
                    && std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
            },
        );
    }

    /// (Re)starts the server on its port, with its store.
    pub fn launch(&mut self) {
        let _ = std::fs::remove_file(self.log_path());
        self.spawn();
        self.wait_ready();
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill9();
    }
}
