//! A small "internet" inside the machine for private-network tests: a
//! network namespace of the test's own, joined to the host by a veth pair
//! on 198.18.N.0/24 (the benchmarking range), holding an HTTP server and a
//! DNS server on 198.19.N.80 and 198.19.N.53 (and a fake cloud metadata
//! server on 169.254.169.254), with host routes to those addresses only:
//! the host's default route is never touched, and a job's NATed traffic
//! has nowhere else to go. Everything is removed on drop.

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::wait_for;

/// The name the DNS server answers for the HTTP server.
pub const NAME: &str = "files.runnel.test";
/// Where clouds serve instance metadata.
pub const METADATA: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);

/// Answers A queries for [`NAME`] with the HTTP server's address and
/// NXDOMAIN for everything else.
const DNS_SERVER: &str = r#"
import socket, sys
name, answer, bind = sys.argv[1].lower().rstrip('.'), socket.inet_aton(sys.argv[2]), sys.argv[3]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((bind, 53))
while True:
    q, peer = s.recvfrom(512)
    i, labels = 12, []
    while q[i]:
        labels.append(q[i + 1:i + 1 + q[i]].decode(errors='replace'))
        i += 1 + q[i]
    qtype = q[i + 1:i + 3]
    question = q[12:i + 5]
    found = '.'.join(labels).lower() == name
    flags = b'\x81\x80' if found else b'\x81\x83'
    ancount = b'\x00\x01' if found and qtype == b'\x00\x01' else b'\x00\x00'
    r = q[:2] + flags + b'\x00\x01' + ancount + b'\x00\x00\x00\x00' + question
    if ancount == b'\x00\x01':
        r += b'\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04' + answer
    s.sendto(r, peer)
"#;

pub struct Internet {
    ns: String,
    link: String,
    /// The host's end of the link: what a job's traffic is NATed to.
    pub uplink: Ipv4Addr,
    pub http: Ipv4Addr,
    /// Also served, for `deny` tests.
    pub other: Ipv4Addr,
    pub dns: Ipv4Addr,
    servers: Vec<Child>,
    routes: Vec<String>,
    _files: tempfile::TempDir,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Internet {
    /// Builds it; its HTTP server serves `files` (name → contents).
    pub fn new(files: &[(&str, &[u8])]) -> Internet {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let routes = super::host_routes();
        let n = loop {
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            assert!(n < 256, "no free 198.18.N.0/24 left");
            if !routes.contains(&format!("198.18.{n}.")) && !routes.contains(&format!("198.19.{n}.")) {
                break n;
            }
        };
        let dir = tempfile::tempdir().unwrap();
        for (name, data) in files {
            std::fs::write(dir.path().join(name), data).unwrap();
        }
        let ns = format!("rntest-{}-{n}", std::process::id());
        let link = format!("rnti{}x{n}", std::process::id() % 10_000);
        let mut net = Internet {
            ns: ns.clone(),
            link: link.clone(),
            uplink: Ipv4Addr::new(198, 18, n as u8, 1),
            http: Ipv4Addr::new(198, 19, n as u8, 80),
            other: Ipv4Addr::new(198, 19, n as u8, 81),
            dns: Ipv4Addr::new(198, 19, n as u8, 53),
            servers: Vec::new(),
            routes: Vec::new(),
            _files: dir,
        };
        ip(&["netns", "add", &ns]);
        ip(&[
            "link", "add", &link, "type", "veth", "peer", "name", "up0", "netns", &ns,
        ]);
        ip(&["addr", "add", &format!("{}/24", net.uplink), "dev", &link]);
        ip(&["link", "set", &link, "up"]);
        let far = format!("198.18.{n}.2");
        for args in [
            vec!["addr", "add", &format!("{far}/24"), "dev", "up0"],
            vec!["link", "set", "up0", "up"],
            vec!["link", "set", "lo", "up"],
        ] {
            let mut a = vec!["-n", &ns];
            a.extend(args);
            ip(&a);
        }
        for addr in [net.http, net.other, net.dns, METADATA] {
            ip(&["-n", &ns, "addr", "add", &format!("{addr}/32"), "dev", "lo"]);
        }
        for dst in [format!("198.19.{n}.0/24"), format!("{METADATA}/32")] {
            ip(&["route", "add", &dst, "via", &far]);
            net.routes.push(dst);
        }
        let in_ns = |args: &[&str]| {
            Command::new("ip")
                .args(["netns", "exec", &ns])
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start a server in the test internet")
        };
        let files_dir = net._files.path().to_string_lossy().into_owned();
        net.servers.push(in_ns(&[
            "/usr/bin/python3",
            "-m",
            "http.server",
            "80",
            "--bind",
            "0.0.0.0",
            "--directory",
            &files_dir,
        ]));
        net.servers.push(in_ns(&[
            "/usr/bin/python3",
            "-c",
            DNS_SERVER,
            NAME,
            &net.http.to_string(),
            &net.dns.to_string(),
        ]));
        let http = SocketAddr::from((net.http, 80));
        wait_for("the test internet's HTTP server", Duration::from_secs(30), || {
            TcpStream::connect_timeout(&http, Duration::from_millis(200)).is_ok()
        });
        let dns = net.dns;
        wait_for("the test internet's DNS server", Duration::from_secs(30), || {
            resolves(dns)
        });
        net
    }

    /// A file of `bytes` zeros (sparse: it takes no disk) to serve.
    pub fn sparse_file(&self, name: &str, bytes: u64) {
        let f = std::fs::File::create(self._files.path().join(name)).unwrap();
        f.set_len(bytes).unwrap();
    }

    pub fn url(&self, file: &str) -> String {
        format!("http://{NAME}/{file}")
    }
}

/// Whether the DNS server at `server` answers a query for [`NAME`].
fn resolves(server: Ipv4Addr) -> bool {
    let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
    s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let mut q = vec![0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in NAME.split('.') {
        q.push(label.len() as u8);
        q.extend(label.as_bytes());
    }
    q.extend([0, 0, 1, 0, 1]);
    if s.send_to(&q, (server, 53)).is_err() {
        return false;
    }
    let mut buf = [0u8; 512];
    matches!(s.recv(&mut buf), Ok(n) if n > 12 && buf[7] == 1)
}

impl Drop for Internet {
    fn drop(&mut self) {
        for s in &mut self.servers {
            let _ = s.kill();
            let _ = s.wait();
        }
        for r in &self.routes {
            let _ = Command::new("ip").args(["route", "del", r]).status();
        }
        let _ = Command::new("ip").args(["link", "del", &self.link]).status();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}
