//! A real S3 server for the store's tests: Garage (installed by
//! scripts/test-servers into /var/cache/runnel-test/garage), one node on
//! free loopback ports, its metadata and data in a temporary directory,
//! one bucket and one key with read and write on it. Stopped and removed
//! on drop (and killed with the test process if that dies first).

use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use super::{free_port, wait_for};

pub const GARAGE: &str = "/var/cache/runnel-test/garage/bin/garage";
/// The region Garage's S3 API answers to (its config's `s3_region`).
pub const REGION: &str = "garage";

pub struct Garage {
    /// "http://127.0.0.1:PORT", the S3 API.
    pub endpoint: String,
    pub region: String,
    pub bucket: String,
    pub key_id: String,
    pub secret: String,
    config: PathBuf,
    child: Child,
    _dir: tempfile::TempDir,
}

fn hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    getrandom(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn getrandom(buf: &mut [u8]) {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(buf))
        .expect("/dev/urandom");
}

impl Garage {
    /// A new node with bucket "runnel-test".
    pub fn start() -> Garage {
        assert!(
            Path::new(GARAGE).is_file(),
            "{GARAGE} is missing: scripts/test-servers installs it (cargo install garage)"
        );
        let dir = tempfile::Builder::new()
            .prefix("runnel-garage.")
            .tempdir()
            .unwrap();
        let (rpc, s3, admin) = (free_port(), free_port(), free_port());
        let config = dir.path().join("garage.toml");
        std::fs::write(
            &config,
            format!(
                "metadata_dir = \"{d}/meta\"\n\
                 data_dir = \"{d}/data\"\n\
                 db_engine = \"lmdb\"\n\
                 replication_factor = 1\n\
                 rpc_bind_addr = \"127.0.0.1:{rpc}\"\n\
                 rpc_public_addr = \"127.0.0.1:{rpc}\"\n\
                 rpc_secret = \"{secret}\"\n\
                 [s3_api]\n\
                 s3_region = \"{REGION}\"\n\
                 api_bind_addr = \"127.0.0.1:{s3}\"\n\
                 root_domain = \".s3.garage.localhost\"\n\
                 [admin]\n\
                 api_bind_addr = \"127.0.0.1:{admin}\"\n",
                d = dir.path().display(),
                secret = hex(32),
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("garage.log")).unwrap();
        let mut cmd = Command::new(GARAGE);
        cmd.arg("-c")
            .arg(&config)
            .arg("server")
            .env("RUST_LOG", "garage=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        // SAFETY: prctl only sets this process's parent-death signal.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd.spawn().expect("start garage");
        let g = Garage {
            endpoint: format!("http://127.0.0.1:{s3}"),
            region: REGION.into(),
            bucket: "runnel-test".into(),
            key_id: format!("GK{}", hex(12)),
            secret: hex(32),
            config,
            child,
            _dir: dir,
        };
        wait_for("garage's S3 port", Duration::from_secs(30), || {
            TcpStream::connect(("127.0.0.1", s3)).is_ok()
        });
        // The node's id, then a layout of it alone.
        let mut id = String::new();
        wait_for("garage node id", Duration::from_secs(30), || {
            let out = g.cli(&["node", "id", "-q"]);
            id = String::from_utf8_lossy(&out.stdout)
                .trim()
                .split('@')
                .next()
                .unwrap_or_default()
                .to_string();
            out.status.success() && !id.is_empty()
        });
        g.ok(&["layout", "assign", "-z", "dc1", "-c", "10G", &id]);
        g.ok(&["layout", "apply", "--version", "1"]);
        let (bucket, key_id, secret) = (g.bucket.clone(), g.key_id.clone(), g.secret.clone());
        g.bucket(&bucket);
        g.ok(&["key", "import", "--yes", "-n", "runnel-test", &key_id, &secret]);
        g.allow(&bucket);
        g
    }

    /// Another bucket, the test key allowed to read and write it.
    pub fn bucket(&self, name: &str) {
        // The layout takes a moment to reach the node's own tables.
        wait_for("garage bucket create", Duration::from_secs(30), || {
            self.cli(&["bucket", "create", name]).status.success()
        });
        if self.key_exists() {
            self.allow(name);
        }
    }

    fn key_exists(&self) -> bool {
        self.cli(&["key", "info", &self.key_id]).status.success()
    }

    fn allow(&self, bucket: &str) {
        self.ok(&[
            "bucket",
            "allow",
            "--read",
            "--write",
            "--owner",
            bucket,
            "--key",
            &self.key_id,
        ]);
    }

    /// `garage -c CONFIG ARGS`, its output.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(GARAGE)
            .arg("-c")
            .arg(&self.config)
            .args(args)
            .output()
            .expect("run garage")
    }

    fn ok(&self, args: &[&str]) {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "garage {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// An AWS-style credentials file in `dir` with the test key.
    pub fn credentials_file(&self, dir: &Path) -> PathBuf {
        let p = dir.join("s3-credentials");
        std::fs::write(
            &p,
            format!(
                "[default]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
                self.key_id, self.secret
            ),
        )
        .unwrap();
        p
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
