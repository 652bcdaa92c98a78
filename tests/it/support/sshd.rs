//! A real OpenSSH `sshd` on a free loopback port that serves git the way
//! Bitbucket does: a deploy key is forced to one repository (any other
//! answers "ERROR: Repository not found.", pushes are refused) and a user key
//! reaches every repository. Keys and repositories are made at test time.

use std::io::Write;
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{Need, expect, free_port, wait_for};

/// Runs a command; panics with its output when it fails. Returns stdout.
pub fn sh(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn git(dir: &Path, args: &[&str]) -> String {
    sh(Command::new("git")
        .arg("-C")
        .arg(dir)
        .args([
            "-c",
            "protocol.file.allow=always",
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@example.org",
        ])
        .args(args)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("HOME", dir))
    .trim()
    .to_string()
}

/// A key pair made with ssh-keygen.
pub struct KeyPair {
    pub private: PathBuf,
    pub public_line: String,
    /// "SHA256:..." as `ssh-keygen -lf` prints it.
    pub fingerprint: String,
}

impl KeyPair {
    /// `kind`: "ed25519", "rsa", "ecdsa"; `extra`: e.g. ["-m", "PEM"].
    pub fn generate(dir: &Path, name: &str, kind: &str, passphrase: &str, extra: &[&str]) -> KeyPair {
        expect(Need::SshKeygen);
        let private = dir.join(name);
        let mut cmd = Command::new("ssh-keygen");
        cmd.args(["-q", "-t", kind, "-N", passphrase, "-C", name, "-f"])
            .arg(&private)
            .args(extra);
        if kind == "rsa" {
            cmd.args(["-b", "2048"]);
        }
        sh(&mut cmd);
        let public_line = std::fs::read_to_string(private.with_extension("pub"))
            .unwrap()
            .trim()
            .to_string();
        let fingerprint = sh(Command::new("ssh-keygen")
            .arg("-lf")
            .arg(private.with_extension("pub")))
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_string();
        KeyPair {
            private,
            public_line,
            fingerprint,
        }
    }

    pub fn private_bytes(&self) -> Vec<u8> {
        std::fs::read(&self.private).unwrap()
    }
}

pub struct GitServer {
    pub port: u16,
    pub dir: tempfile::TempDir,
    child: Child,
    /// The server's host key as a known_hosts line for `[127.0.0.1]:port`.
    pub known_hosts_line: String,
    pub host_key_fingerprint: String,
}

impl GitServer {
    /// Starts sshd. `deploy` keys are each forced to one repository
    /// (`org/app.git`-style path); `users` reach every repository.
    pub fn start(deploy: &[(&KeyPair, &str)], users: &[&KeyPair]) -> GitServer {
        expect(Need::Sshd);
        std::fs::create_dir_all("/run/sshd").unwrap();
        let dir = tempfile::Builder::new().prefix("runnel-sshd.").tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir_all(d.join("repos")).unwrap();
        let host = KeyPair::generate(d, "host_ed25519", "ed25519", "", &[]);
        let git_bin = sh(Command::new("sh").args(["-c", "command -v git"]))
            .trim()
            .to_string();
        let wrapper = d.join("git-serve");
        std::fs::write(
            &wrapper,
            format!(
                r#"#!/bin/sh
# Serves git like Bitbucket: $1 = user|deploy, $2 = the deploy key's repository.
set -f
cmd=${{SSH_ORIGINAL_COMMAND%% *}}
repo=${{SSH_ORIGINAL_COMMAND#* }}
# git-lfs-authenticate 'org/app.git' download
if [ "$cmd" = git-lfs-authenticate ]; then repo=${{repo% *}}; fi
repo=$(printf '%s' "$repo" | tr -d "'\"")
repo=${{repo#/}}
case "$repo" in *..*) echo "ERROR: Repository not found." >&2; exit 1;; esac
if [ "$1" = deploy ] && [ "$repo" != "$2" ]; then
  echo "ERROR: Repository not found." >&2; exit 1
fi
if [ "$1" = deploy ] && [ "$cmd" = git-receive-pack ]; then
  echo "ERROR: This deploy key does not have write access." >&2; exit 1
fi
if [ ! -d "{repos}/$repo" ]; then echo "ERROR: Repository not found." >&2; exit 1; fi
case "$cmd" in
  git-upload-pack) exec {git} upload-pack "{repos}/$repo";;
  git-receive-pack) exec {git} receive-pack "{repos}/$repo";;
  git-lfs-authenticate)
    lfs="{lfs}/$(printf '%s' "$repo" | tr / _)"
    if [ -f "$lfs" ]; then exec cat "$lfs"; fi
    echo "ERROR: Git LFS is not enabled for this repository." >&2; exit 1;;
  *) echo "ERROR: unsupported command" >&2; exit 1;;
esac
"#,
                repos = d.join("repos").display(),
                lfs = d.join("lfs").display(),
                git = git_bin
            ),
        )
        .unwrap();
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
        // SHLVL=1: Debian's bash sources ~/.bashrc for commands run by sshd
        // (at shell level 1 only); root's may be slow (pyenv: 100 ms here),
        // which a git host does not do on every connection.
        let opts = "no-pty,no-port-forwarding,no-agent-forwarding,no-X11-forwarding,environment=\"SHLVL=1\"";
        let mut authorized = String::new();
        for (key, repo) in deploy {
            authorized.push_str(&format!(
                "command=\"{} deploy {repo}\",{opts} {}\n",
                wrapper.display(),
                key.public_line
            ));
        }
        for key in users {
            authorized.push_str(&format!(
                "command=\"{} user\",{opts} {}\n",
                wrapper.display(),
                key.public_line
            ));
        }
        std::fs::write(d.join("authorized_keys"), authorized).unwrap();
        let port = free_port();
        std::fs::write(
            d.join("sshd_config"),
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {hk}\nPidFile {d}/sshd.pid\n\
                 AuthorizedKeysFile {d}/authorized_keys\nStrictModes no\nUsePAM no\n\
                 PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n\
                 PermitRootLogin prohibit-password\nPermitUserEnvironment SHLVL\nAllowUsers root\nLogLevel VERBOSE\nMaxAuthTries 6\n",
                hk = host.private.display(),
                d = d.display()
            ),
        )
        .unwrap();
        let child = Command::new("/usr/sbin/sshd")
            .args(["-D", "-f"])
            .arg(d.join("sshd_config"))
            .arg("-E")
            .arg(d.join("sshd.log"))
            .stdin(Stdio::null())
            .spawn()
            .expect("start /usr/sbin/sshd (scripts/setup installs openssh-server)");
        wait_for("sshd to listen", Duration::from_secs(20), || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        let key_b64 = host
            .public_line
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ");
        GitServer {
            port,
            known_hosts_line: format!("[127.0.0.1]:{port} {key_b64}"),
            host_key_fingerprint: host.fingerprint,
            dir,
            child,
        }
    }

    pub fn repos(&self) -> PathBuf {
        self.dir.path().join("repos")
    }

    /// A job's SSH credentials: `user`'s key, this server's host key pinned.
    pub fn user_credentials(&self, user: &KeyPair) -> runnel::api::pb::SshCredentials {
        runnel::api::pb::SshCredentials {
            user_key: user.private_bytes(),
            known_hosts: vec![self.known_hosts_line.clone()],
            ..Default::default()
        }
    }

    pub fn url(&self, repo: &str) -> String {
        format!("ssh://root@127.0.0.1:{}/{repo}", self.port)
    }

    /// What `git-lfs-authenticate <repo> ...` prints from now on (JSON
    /// naming an LFS server: see `support::lfs`).
    pub fn set_lfs(&self, repo: &str, json: &str) {
        let dir = self.dir.path().join("lfs");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(repo.replace('/', "_")), json).unwrap();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default()
    }

    /// Makes a bare repository `path` (e.g. "org/lib.git") from a work tree
    /// that `fill` prepares; returns the work tree.
    pub fn create_repo(&self, path: &str, fill: impl FnOnce(&Path)) -> PathBuf {
        let work = self.dir.path().join("work").join(path.trim_end_matches(".git"));
        std::fs::create_dir_all(&work).unwrap();
        git(&work, &["init", "-q", "-b", "main"]);
        fill(&work);
        git(&work, &["add", "-A"]);
        git(&work, &["commit", "-q", "-m", &format!("first commit of {path}")]);
        let bare = self.repos().join(path);
        std::fs::create_dir_all(bare.parent().unwrap()).unwrap();
        sh(Command::new("git")
            .args(["clone", "-q", "--bare"])
            .arg(&work)
            .arg(&bare));
        git(&work, &["remote", "add", "origin", bare.to_str().unwrap()]);
        git(&work, &["fetch", "-q", "origin"]);
        work
    }

    /// Commits what `change` did in `work` and pushes it (with tags).
    pub fn push(&self, work: &Path, message: &str, change: impl FnOnce(&Path)) {
        change(work);
        git(work, &["add", "-A"]);
        git(work, &["commit", "-q", "-m", message]);
        git(work, &["push", "-q", "--tags", "origin", "HEAD"]);
    }
}

impl Drop for GitServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes `text` to `path`, creating parent directories.
/// A git server whose repository `org/big.git` holds `bytes` that do not
/// compress (a fetch that takes a while, a checkout that fills a disk),
/// and the user key that reads it (its directory kept alive with it).
pub fn big_repo(bytes: usize) -> (tempfile::TempDir, KeyPair, GitServer) {
    let keys = tempfile::tempdir().unwrap();
    let user = KeyPair::generate(keys.path(), "user", "ed25519", "", &[]);
    let server = GitServer::start(&[], &[&user]);
    server.create_repo("org/big.git", |w| {
        std::fs::write(w.join("big.bin"), super::incompressible(bytes)).unwrap();
    });
    (keys, user, server)
}

pub fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(text.as_bytes()).unwrap();
}
