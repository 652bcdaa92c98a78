//! A job's network is its own (`NETWORK_PRIVATE`, the default): through
//! NAT it reaches the test's small internet (`support::internet`) by name,
//! and nothing of the host's, of other jobs', of link-local or of the
//! denied ranges; no packet socket; the host's network only where the
//! agent's config allows it; and nothing of a job's network is left after
//! it, nor after `kill -9` and a restart.

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use futures::StreamExt;
use runnel::api::pb;
use runnel::runtime::network::bridge_name;

use crate::support::internet::{Internet, METADATA};
use crate::support::*;

/// The host's IPv4 addresses, every interface's.
fn host_addresses() -> Vec<Ipv4Addr> {
    let out = Command::new("ip")
        .args(["-4", "-o", "addr", "show"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3))
        .filter_map(|a| a.split('/').next()?.parse().ok())
        .collect()
}

/// A step that tries every `addr:port` at once, printing `OPEN addr:port`
/// or `closed addr:port` for each (3 s to connect).
fn probe_step(targets: &[(Ipv4Addr, u16)]) -> String {
    let mut s = String::new();
    for (a, p) in targets {
        s.push_str(&format!(
            "(timeout 3 bash -c 'exec 3<>/dev/tcp/{a}/{p}' 2>/dev/null && echo OPEN {a}:{p} || echo closed {a}:{p}) & "
        ));
    }
    s.push_str("wait");
    s
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit(':').next().unwrap().parse().unwrap()
}

/// The links of the agent with state directory `state` (its bridge and
/// its jobs' veths) and its nftables tables' text.
fn what_is_left(state: &Path) -> (Vec<String>, String) {
    let name = bridge_name(state);
    let links = std::fs::read_dir("/sys/class/net")
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&name))
        .collect();
    let out = Command::new("nft").args(["list", "ruleset"]).output().unwrap();
    let rules = String::from_utf8_lossy(&out.stdout);
    let table = format!("runnel-{}", &name[2..]);
    let ours: String = rules
        .split("\ntable ")
        .filter(|t| t.contains(&table))
        .collect::<Vec<_>>()
        .join("\ntable ");
    (links, ours)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_private_job_downloads_by_name_and_reaches_nothing_of_the_host_or_link_local() {
    require!(Root);
    let net = Internet::new(&[("hello.txt", b"hello from the test internet\n")]);
    net.sparse_file("big", 32 << 20);
    let mut agent = Agent::new(&format!(
        "metrics_listen = \"0.0.0.0:0\"\ninsecure_listen = true\n[network]\ndns = [\"{}\"]\n\
         deny = [\"{}/24\"]\nallow = [\"{}\", \"{}\"]",
        net.dns,
        Ipv4Addr::from(u32::from(net.http) & !0xff),
        net.http,
        net.dns
    ));
    // The agent's gRPC port on every address of the host, not only loopback.
    let config = std::fs::read_to_string(&agent.config_path)
        .unwrap()
        .replace("listen = \"127.0.0.1:0\"", "listen = \"0.0.0.0:0\"");
    std::fs::write(&agent.config_path, config).unwrap();
    agent.launch();
    let (grpc, metrics) = (
        port_of(&agent.addr),
        port_of(agent.metrics_addr.as_ref().unwrap()),
    );
    let hosts = host_addresses();
    assert!(hosts.contains(&net.uplink), "{hosts:?}");
    let mut targets = Vec::new();
    for a in &hosts {
        for port in [grpc, metrics] {
            // Open from the host: what stops the job is its network.
            TcpStream::connect_timeout(&SocketAddr::from((*a, port)), Duration::from_secs(2))
                .unwrap_or_else(|e| panic!("the host cannot reach {a}:{port}: {e}"));
            targets.push((*a, port));
        }
    }
    // The test internet serves metadata and a denied address too.
    for a in [METADATA, net.other] {
        TcpStream::connect_timeout(&SocketAddr::from((a, 80)), Duration::from_secs(2)).unwrap();
        targets.push((a, 80));
    }
    let spec = job(
        "private",
        &[
            &format!("curl -sS --max-time 20 {}", net.url("hello.txt")),
            &format!(
                "curl -sS --max-time 60 -o /dev/null -w 'big: %{{size_download}}\\n' {}",
                net.url("big")
            ),
            &probe_step(&targets),
            "curl -sS --max-time 3 -g 'http://[fd00:ec2::254]/' >/dev/null 2>&1 && echo OPEN v6 || echo closed v6",
            "python3 -c 'import socket; socket.socket(socket.AF_PACKET, socket.SOCK_RAW)' 2>&1 | tail -1",
            "python3 -c 'import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP); print(\"icmp socket ok\")'",
        ],
    );
    let (status, events) = run_job(&agent, spec).await;
    assert_succeeded(&status, &events);
    let out = output(&events, pb::Stream::Stdout);
    assert!(out.contains("hello from the test internet"), "{out}");
    assert!(out.contains(&format!("big: {}\n", 32 << 20)), "{out}");
    assert!(!out.contains("OPEN"), "a job reached what it must not: {out}");
    for (a, p) in &targets {
        assert!(
            out.contains(&format!("closed {a}:{p}")),
            "{a}:{p} not probed: {out}"
        );
    }
    assert!(out.contains("closed v6"), "{out}");
    assert!(out.contains("PermissionError"), "a packet socket opened: {out}");
    assert!(out.contains("icmp socket ok"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn two_jobs_at_once_cannot_reach_each_other() {
    require!(Root);
    let agent = Agent::start("max_jobs = 2");
    let mut c = agent.scheduler().await;
    // Job A serves on every address of its own network.
    submit(
        &mut c,
        job(
            "listener",
            &["python3 -m http.server 8080 --bind 0.0.0.0 >/dev/null 2>&1 & \
               until bash -c 'exec 3<>/dev/tcp/127.0.0.1/8080' 2>/dev/null; do sleep 0.05; done; \
               ip -4 -o addr show eth0 | awk '{print \"ADDR\", $4}'; sleep 3004"],
        ),
    )
    .await;
    let mut stream = events(&mut c, "listener", 0).await;
    let mut seen = String::new();
    let addr = tokio::time::timeout(Duration::from_secs(120), async {
        while let Some(e) = stream.next().await {
            if let Some(pb::job_event::Event::Log(l)) = e.unwrap().event {
                seen.push_str(&String::from_utf8_lossy(&l.data));
                if let Some(a) = seen.lines().find_map(|l| l.strip_prefix("ADDR ")) {
                    return a.split('/').next().unwrap().to_string();
                }
            }
        }
        panic!("the listener ended: {seen}");
    })
    .await
    .expect("the listener printed its address");
    let (status, events) = run_job(
        &agent,
        job(
            "prober",
            &[&format!(
                "{}; ip -4 -o addr show eth0 | awk '{{print \"MINE\", $4}}'",
                probe_step(&[(addr.parse().unwrap(), 8080)])
            )],
        ),
    )
    .await;
    assert_succeeded(&status, &events);
    let out = output(&events, pb::Stream::Stdout);
    assert!(out.contains(&format!("closed {addr}:8080")), "{out}");
    assert!(
        out.contains("MINE") && !out.contains(&format!("MINE {addr}")),
        "{out}"
    );
    c.cancel_job(pb::CancelJobRequest {
        job_id: "listener".into(),
    })
    .await
    .unwrap();
    watch(&mut c, "listener", 0).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_hosts_network_is_refused_unless_the_config_allows_it() {
    require!(Root);
    let strict = Agent::start("[runtime]\nallow_host_network = false");
    let mut c = strict.scheduler().await;
    let err = c
        .submit_job(pb::SubmitJobRequest {
            job: Some(host_network(job("host-net", &["true"]))),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("runtime.allow_host_network"),
        "{}",
        err.message()
    );
    // The test agents allow it: the job sees the host's interfaces.
    let agent = Agent::start("");
    let (status, events) = run_job(&agent, host_network(job("host-net", &["ls /sys/class/net"]))).await;
    assert_succeeded(&status, &events);
    let out = output(&events, pb::Stream::Stdout);
    assert!(out.contains(&bridge_name(&agent.state_dir())), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn nothing_of_a_jobs_network_is_left_after_it_or_after_kill_9_and_a_restart() {
    require!(Root);
    let mut agent = Agent::start("max_jobs = 2");
    let state = agent.state_dir();
    let bridge = bridge_name(&state);
    let (links, rules) = what_is_left(&state);
    assert_eq!(links, vec![bridge.clone()], "{links:?}");
    // Each slot's veth, MAC and address are in the rules from the start:
    // a job's start and end change none.
    assert!(
        rules.contains("masquerade")
            && rules.contains(&format!("\"{bridge}v0\" . 02:72:6e:"))
            && rules.contains(&format!("\"{bridge}v1\" . 02:72:6e:"))
            && !rules.contains(&format!("\"{bridge}v2\"")),
        "{rules}"
    );
    // The job's veth goes with its namespace: the kernel removes the pair
    // once the container's last process is gone.
    let only_the_bridge = || {
        let (links, _) = what_is_left(&state);
        links == vec![bridge.clone()]
    };
    let (status, events) = run_job(&agent, job("one", &["cat /sys/class/net/eth0/address"])).await;
    assert_succeeded(&status, &events);
    assert!(output(&events, pb::Stream::Stdout).starts_with("02:72:6e:"));
    wait_for("the job's veth to go", Duration::from_secs(10), only_the_bridge);

    let mut c = agent.scheduler().await;
    submit(&mut c, job("killed", &["sleep 3005"])).await;
    wait_running(&c, "killed").await;
    let (links, _) = what_is_left(&state);
    assert!(links.contains(&format!("{bridge}v0")), "{links:?}");
    agent.kill9();
    agent.launch();
    let (links, _) = what_is_left(&state);
    assert_eq!(
        links,
        vec![bridge.clone()],
        "a killed job's veth is left: {links:?}"
    );
    let (status, events) = run_job(&agent, job("after", &["ip -4 -o addr show eth0"])).await;
    assert_succeeded(&status, &events);

    // A stopped agent takes its bridge and tables with it.
    drop(agent);
    let (links, rules) = what_is_left(&state);
    assert!(links.is_empty(), "{links:?}");
    assert!(rules.is_empty(), "{rules}");
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_need_their_token_when_one_is_configured_and_stay_on_loopback_unless_allowed() {
    require!(Root);
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("metrics.token");
    std::fs::write(&token, "metrics-token-for-tests\n").unwrap();
    let agent = Agent::start(&format!(
        "metrics_listen = \"127.0.0.1:0\"\nmetrics_token_file = \"{}\"",
        token.display()
    ));
    let (status, body) = agent.scrape("/metrics");
    assert!(status.contains("401"), "{status}");
    assert!(!body.contains("runnel_"), "{body}");
    let (status, _) = agent.scrape_with("/metrics", "Authorization: Bearer wrong\r\n");
    assert!(status.contains("401"), "{status}");
    let (status, body) = agent.scrape_with("/metrics", "Authorization: Bearer metrics-token-for-tests\r\n");
    assert!(status.contains("200"), "{status}");
    assert!(body.contains("runnel_jobs_running"), "{body}");

    // Off loopback, without a token, the agent does not start.
    let out = Command::new(runnel_bin())
        .args(["agent", "--config"])
        .arg({
            let p = dir.path().join("agent.toml");
            std::fs::write(&p, "metrics_listen = \"0.0.0.0:0\"\n").unwrap();
            p
        })
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("metrics_listen") && err.contains("metrics_token_file"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_api_can_listen_on_a_unix_socket_for_the_runnel_group_only() {
    require!(Root);
    let mut agent = Agent::new("");
    // In a directory anyone may pass through: the socket's mode decides.
    let dir = tempfile::Builder::new().prefix("runnel-sock.").tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let socket = dir.path().join("run/agent.sock");
    let config = std::fs::read_to_string(&agent.config_path).unwrap().replace(
        "listen = \"127.0.0.1:0\"",
        &format!("listen = \"unix:{}\"", socket.display()),
    );
    std::fs::write(&agent.config_path, config).unwrap();
    agent.launch();
    assert_eq!(agent.addr, format!("unix:{}", socket.display()));
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let meta = std::fs::metadata(&socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.mode() & 0o777, 0o660, "{:o}", meta.mode());
    if let Ok(Some(g)) = nix::unistd::Group::from_name("runnel") {
        assert_eq!(meta.gid(), g.gid.as_raw());
    }
    // The CLI reaches it there, with a token as over TCP.
    let info = Command::new(runnel_bin())
        .args(["info", "--addr", &agent.addr, "--token", OPERATOR_TOKEN])
        .output()
        .unwrap();
    assert!(info.status.success(), "{}", String::from_utf8_lossy(&info.stderr));
    let none = Command::new(runnel_bin())
        .args(["info", "--addr", &agent.addr])
        .output()
        .unwrap();
    assert!(!none.status.success());
    // Nobody else: a user outside root and the runnel group cannot connect.
    let nobody = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", runnel_bin()])
        .args(["info", "--addr", &agent.addr, "--token", OPERATOR_TOKEN])
        .output()
        .unwrap();
    assert!(!nobody.status.success());
    let err = String::from_utf8_lossy(&nobody.stderr);
    assert!(
        err.contains("cannot reach the agent") && err.contains("Permission denied"),
        "{err}"
    );
    agent.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(agent.wait(Duration::from_secs(60)).success());
    assert!(!socket.exists(), "the socket is left after the agent stopped");
}

#[tokio::test(flavor = "multi_thread")]
async fn two_agents_on_one_host_with_default_subnets_do_not_collide() {
    require!(Root);
    // No subnet in either config (the comment keeps the test support's
    // own out): each takes a free /21 of 10.250.0.0/16.
    let agents = [Agent::start("# default subnet"), Agent::start("# default subnet")];
    let names: Vec<String> = agents.iter().map(|a| bridge_name(&a.state_dir())).collect();
    assert_ne!(names[0], names[1]);
    let mut addrs = Vec::new();
    for (i, a) in agents.iter().enumerate() {
        let (status, events) = run_job(a, job(&format!("a{i}"), &["ip -4 -o addr show eth0"])).await;
        assert_succeeded(&status, &events);
        let out = output(&events, pb::Stream::Stdout);
        let addr = out.split_whitespace().nth(3).unwrap_or_default().to_string();
        assert!(addr.starts_with("10.250."), "{out}");
        addrs.push(addr);
    }
    assert_ne!(addrs[0], addrs[1]);
}
