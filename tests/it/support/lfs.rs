//! A real Git LFS server: giftless (from PyPI, installed once into a venv
//! under /var/cache/runnel-test and kept between runs) on a free loopback
//! port, its objects in a temporary directory, JWT bearer tokens (HS256)
//! as its only authentication. The test sshd's `git-lfs-authenticate`
//! answers with its address and a token ([`Giftless::authenticate_json`]).

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use sha2::Digest;

use super::sshd::sh;
use super::wait_for;

const VENV: &str = "/var/cache/runnel-test/giftless-venv";
/// giftless 0.6 declares no dependencies on PyPI: its imports, listed.
const PACKAGES: &[&str] = &[
    "giftless==0.6.2",
    "flask",
    "flask-marshmallow",
    "flask-classful",
    "marshmallow",
    "webargs",
    "figcan",
    "python-dotenv",
    "python-dateutil",
    "typing-extensions",
    "cachetools",
    "pyjwt",
    "pyyaml",
];

/// The venv's python, installing giftless first when it is not there.
fn python() -> PathBuf {
    static ONCE: Mutex<()> = Mutex::new(());
    let _one = ONCE.lock().unwrap_or_else(|e| e.into_inner());
    let python = Path::new(VENV).join("bin/python");
    let ok = |p: &Path| {
        Command::new(p)
            .args(["-c", "import giftless.wsgi_entrypoint, jwt"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !ok(&python) {
        std::fs::create_dir_all(Path::new(VENV).parent().unwrap()).unwrap();
        sh(Command::new("/usr/bin/python3").args(["-m", "venv", VENV]));
        sh(Command::new(Path::new(VENV).join("bin/pip"))
            .args(["install", "-q"])
            .args(PACKAGES));
        assert!(
            ok(&python),
            "giftless does not import after pip install into {VENV}"
        );
    }
    python
}

pub struct Giftless {
    pub port: u16,
    dir: tempfile::TempDir,
    secret: String,
    child: Child,
}

impl Giftless {
    pub fn start() -> Giftless {
        let python = python();
        let dir = tempfile::Builder::new()
            .prefix("runnel-giftless.")
            .tempdir()
            .unwrap();
        let secret = format!("test-secret-{}", std::process::id());
        let port = super::free_port();
        let config = dir.path().join("giftless.yaml");
        std::fs::write(
            &config,
            format!(
                "AUTH_PROVIDERS:\n  - factory: giftless.auth.jwt:factory\n    options:\n      algorithm: HS256\n      private_key: {secret}\n\
                 TRANSFER_ADAPTERS:\n  basic:\n    factory: giftless.transfer.basic_streaming:factory\n    options:\n      \
                 storage_class: giftless.storage.local_storage:LocalStorage\n      storage_options:\n        path: {}\n",
                dir.path().join("objects").display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("giftless.log")).unwrap();
        let child = Command::new(&python)
            .args([
                "-m",
                "flask",
                "--app",
                "giftless.wsgi_entrypoint",
                "run",
                "--host",
                "127.0.0.1",
            ])
            .args(["--port", &port.to_string()])
            .env("GIFTLESS_CONFIG_FILE", &config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start giftless");
        wait_for("giftless to listen", Duration::from_secs(60), || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        Giftless {
            port,
            dir,
            secret,
            child,
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("giftless.log")).unwrap_or_default()
    }

    /// Stores `bytes` as the object of `org/repo` (as an upload would);
    /// returns its pointer file's text.
    pub fn store(&self, org: &str, repo: &str, bytes: &[u8]) -> String {
        let oid = hex(&sha2::Sha256::digest(bytes));
        let at = self.dir.path().join("objects").join(org).join(repo);
        std::fs::create_dir_all(&at).unwrap();
        std::fs::write(at.join(&oid), bytes).unwrap();
        pointer(bytes)
    }

    /// A token that reads `org/repo`'s objects (`scope`: e.g.
    /// "obj:org/app/*:read"), signed with the server's secret, or with
    /// another when `forged`.
    pub fn token(&self, scope: &str, forged: bool) -> String {
        let secret = if forged { "not-the-secret" } else { &self.secret };
        sh(Command::new(python()).args([
            "-c",
            "import jwt, sys, time; print(jwt.encode({'sub': 'runnel-test', 'exp': int(time.time()) + 3600, \
             'scopes': [sys.argv[2]]}, sys.argv[1], algorithm='HS256'))",
            secret,
            scope,
        ]))
        .trim()
        .to_string()
    }

    /// What `git-lfs-authenticate org/repo.git download` prints for a
    /// token (GitHub's and Bitbucket's shape).
    pub fn authenticate_json(&self, org: &str, repo: &str, token: &str) -> String {
        format!(
            r#"{{"href": "http://127.0.0.1:{}/{org}/{repo}.git/info/lfs", "header": {{"Authorization": "Bearer {token}"}}, "expires_in": 3600}}"#,
            self.port
        )
    }
}

impl Drop for Giftless {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The LFS pointer (spec v1) of `bytes`.
pub fn pointer(bytes: &[u8]) -> String {
    format!(
        "version https://git-lfs.github.com/spec/v1\noid sha256:{}\nsize {}\n",
        hex(&sha2::Sha256::digest(bytes)),
        bytes.len()
    )
}
