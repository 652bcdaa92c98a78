//! Who we are to a git server: the host keys we trust and the keys we offer.
//!
//! For an SSH URL every key is tried on a connection of its own, user key
//! first: the certificate callback checks the server's host key against the
//! pinned known_hosts before any credential is offered, and the credential
//! callback offers exactly one key. A key that is refused (`Permission
//! denied (publickey)`) and a key that is accepted but reads no such
//! repository (a deploy key used on another repository: the server prints
//! "ERROR: Repository not found." and closes) both move on to the next key;
//! only when every key failed does the checkout fail, with a sentence that
//! says which keys were tried and what to do.

use std::cell::{Cell, RefCell};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use git2::{CertificateCheckStatus, Cred, CredentialType, ErrorClass, ErrorCode, RemoteCallbacks};

use super::CheckoutError;
pub use crate::model::KeyKind;
use crate::model::state::FailureKind;
pub use crate::ssh::Key;
use crate::ssh::known_hosts::{self, HostKeyCheck, KnownHosts};

/// The keys (user key first) and pinned host keys of a job.
#[derive(Debug, Default)]
pub struct Auth {
    keys: Vec<Key>,
    known_hosts: KnownHosts,
    progress: Arc<TransferProgress>,
}

/// How far the fetches of a checkout have come (libgit2's transfer
/// progress of the latest one), for the job's log.
#[derive(Debug, Default)]
pub struct TransferProgress {
    objects: AtomicUsize,
    total: AtomicUsize,
    bytes: AtomicU64,
}

impl TransferProgress {
    /// Objects received, of how many, and bytes received.
    pub fn get(&self) -> (usize, usize, u64) {
        (
            self.objects.load(Ordering::Relaxed),
            self.total.load(Ordering::Relaxed),
            self.bytes.load(Ordering::Relaxed),
        )
    }
}

/// Where an SSH URL points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SshTarget {
    pub user: Option<String>,
    pub host: String,
    pub port: u16,
}

/// `url` as libgit2 should see it.
pub(crate) fn git_url(url: &str) -> String {
    url.to_string()
}

/// The SSH host of `url`, or `None` when it does not use SSH.
pub(crate) fn ssh_target(url: &str) -> Option<SshTarget> {
    let split_user = |s: &str| match s.rsplit_once('@') {
        Some((u, h)) => (Some(u.to_string()), h.to_string()),
        None => (None, s.to_string()),
    };
    for scheme in ["ssh://", "git+ssh://", "ssh+git://"] {
        if let Some(rest) = url.strip_prefix(scheme) {
            let authority = rest.split('/').next().unwrap_or("");
            let (user, hostport) = split_user(authority);
            let (host, port) = crate::ssh::keyscan::split_host_port(&hostport)?;
            return Some(SshTarget { user, host, port });
        }
    }
    if url.contains("://") || url.starts_with('/') || url.starts_with('.') {
        return None;
    }
    // scp-like: [user@]host:path, with no '/' before the ':'.
    let (before, _) = url.split_once(':')?;
    if before.is_empty() || before.contains('/') {
        return None;
    }
    let (user, host) = split_user(before);
    Some(SshTarget {
        user,
        host: host.trim_start_matches('[').trim_end_matches(']').to_string(),
        port: 22,
    })
}

/// One connection attempt with (at most) one key.
pub(crate) struct Attempt<'a> {
    key: Option<&'a Key>,
    known_hosts: &'a KnownHosts,
    progress: &'a TransferProgress,
    target: Option<SshTarget>,
    cred_calls: Cell<u32>,
    host_key_error: RefCell<Option<String>>,
}

impl<'a> Attempt<'a> {
    /// The callbacks for a fetch: host key pinning, the key, cancellation.
    pub(crate) fn callbacks(&'a self, cancel: &'a AtomicBool) -> RemoteCallbacks<'a> {
        let mut cb = RemoteCallbacks::new();
        cb.certificate_check(move |cert, host| {
            let Some(hostkey) = cert.as_hostkey() else {
                // A TLS certificate (https): libgit2 verifies it against the system CAs.
                return Ok(CertificateCheckStatus::CertificatePassthrough);
            };
            let port = self.target.as_ref().map(|t| t.port).unwrap_or(22);
            let Some(blob) = hostkey.hostkey() else {
                *self.host_key_error.borrow_mut() =
                    Some(format!("{host}:{port} presented no host key runnel could read"));
                return Err(git2::Error::from_str("no raw host key"));
            };
            match self.known_hosts.check(host, port, blob) {
                HostKeyCheck::Pinned => Ok(CertificateCheckStatus::CertificateOk),
                verdict => {
                    *self.host_key_error.borrow_mut() = Some(host_key_message(host, port, blob, &verdict));
                    Err(git2::Error::from_str("host key refused"))
                }
            }
        });
        cb.credentials(move |_url, username_from_url, allowed| {
            let user = self
                .target
                .as_ref()
                .and_then(|t| t.user.clone())
                .or_else(|| username_from_url.map(str::to_string))
                .unwrap_or_else(|| "git".to_string());
            if allowed.contains(CredentialType::USERNAME) {
                return Cred::username(&user);
            }
            if !allowed.intersects(CredentialType::SSH_KEY | CredentialType::SSH_MEMORY) {
                return Err(git2::Error::from_str(
                    "the server asked for a kind of credential runnel does not offer",
                ));
            }
            // Called again only after the server refused the key: never loop.
            self.cred_calls.set(self.cred_calls.get() + 1);
            match self.key {
                Some(k) if self.cred_calls.get() == 1 => {
                    let private = k.private.expose_str().unwrap_or_default();
                    Cred::ssh_key_from_memory(&user, Some(&k.public), private, None)
                }
                Some(_) => Err(git2::Error::from_str("Permission denied (publickey)")),
                None => Err(git2::Error::from_str("no SSH key was given")),
            }
        });
        let progress = self.progress;
        cb.transfer_progress(move |stats| {
            progress
                .objects
                .store(stats.received_objects(), Ordering::Relaxed);
            progress.total.store(stats.total_objects(), Ordering::Relaxed);
            progress
                .bytes
                .store(stats.received_bytes() as u64, Ordering::Relaxed);
            !cancel.load(Ordering::Relaxed)
        });
        cb
    }

    /// Runs `command` on the SSH server of this attempt's URL with its key
    /// (the host key checked against the pinned known_hosts first, as for a
    /// fetch) and returns what it printed. Errors read as a fetch's do, so
    /// [`Auth::with_each_key`] sorts a refused key from a missing repository.
    pub(crate) fn exec(&self, command: &str) -> Result<Vec<u8>, git2::Error> {
        use std::io::Read;
        let ssh = |e: ssh2::Error| git2::Error::new(ErrorCode::GenericError, ErrorClass::Ssh, e.message());
        let t = self
            .target
            .as_ref()
            .ok_or_else(|| git2::Error::from_str("not an SSH URL"))?;
        let addr = std::net::ToSocketAddrs::to_socket_addrs(&(t.host.as_str(), t.port))
            .map_err(|e| git2::Error::from_str(&format!("cannot resolve {}: {e}", t.host)))?
            .next()
            .ok_or_else(|| git2::Error::from_str(&format!("{} has no address", t.host)))?;
        let tcp = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(30))
            .map_err(|e| git2::Error::from_str(&format!("cannot connect to {addr}: {e}")))?;
        let mut session = ssh2::Session::new().map_err(ssh)?;
        session.set_timeout(120_000);
        session.set_tcp_stream(tcp);
        session.handshake().map_err(ssh)?;
        let Some((blob, _)) = session.host_key() else {
            *self.host_key_error.borrow_mut() = Some(format!(
                "{}:{} presented no host key runnel could read",
                t.host, t.port
            ));
            return Err(git2::Error::from_str("no raw host key"));
        };
        match self.known_hosts.check(&t.host, t.port, blob) {
            HostKeyCheck::Pinned => {}
            verdict => {
                *self.host_key_error.borrow_mut() = Some(host_key_message(&t.host, t.port, blob, &verdict));
                return Err(git2::Error::from_str("host key refused"));
            }
        }
        let user = t.user.clone().unwrap_or_else(|| "git".to_string());
        let Some(key) = self.key else {
            return Err(git2::Error::from_str("no SSH key was given"));
        };
        self.cred_calls.set(1);
        let private = key.private.expose_str().unwrap_or_default();
        if session
            .userauth_pubkey_memory(&user, Some(&key.public), private, None)
            .is_err()
            || !session.authenticated()
        {
            self.cred_calls.set(2);
            return Err(git2::Error::new(
                ErrorCode::Auth,
                ErrorClass::Ssh,
                "Permission denied (publickey)",
            ));
        }
        let mut channel = session.channel_session().map_err(ssh)?;
        channel.exec(command).map_err(ssh)?;
        let mut out = Vec::new();
        channel
            .read_to_end(&mut out)
            .map_err(|e| git2::Error::from_str(&e.to_string()))?;
        let mut err = String::new();
        let _ = channel.stderr().read_to_string(&mut err);
        channel.wait_close().map_err(ssh)?;
        match channel.exit_status().map_err(ssh)? {
            0 => Ok(out),
            code => Err(git2::Error::new(
                ErrorCode::GenericError,
                ErrorClass::Ssh,
                format!("`{command}` exited with {code}: {}", err.trim()),
            )),
        }
    }

    fn key_refused(&self, e: &git2::Error) -> bool {
        self.cred_calls.get() >= 2
            || e.code() == ErrorCode::Auth
            || e.message().contains("authentication")
            || e.message().contains("Permission denied")
    }

    /// Logged in, then the server had no such repository for this key: it
    /// printed its refusal and closed the channel (an SSH-level EOF).
    fn repo_missing(&self, e: &git2::Error) -> bool {
        self.cred_calls.get() == 1
            && ((e.class() == ErrorClass::Ssh && e.code() == ErrorCode::Eof)
                || e.message().contains("Repository not found")
                || e.message().contains("does not appear to be a git repository"))
    }
}

fn host_key_message(host: &str, port: u16, blob: &[u8], verdict: &HostKeyCheck) -> String {
    let presented = known_hosts::describe(blob);
    let line = known_hosts::line_for(host, port, blob);
    let name = known_hosts::lookup_name(host, port);
    match verdict {
        HostKeyCheck::NotPinned => format!(
            "host key of {name} is not pinned: the server presented {presented}, and \
             ssh.known_hosts has no entry for {name}; no key was offered. If that is the \
             server's key, pin it: `{line}` (`runnel keyscan {host}:{port}` prints it)"
        ),
        HostKeyCheck::Mismatch { pinned } => format!(
            "host key of {name} differs from the pinned one: the server presented {presented}, \
             but ssh.known_hosts pins another {} key for {name}; no key was offered. The \
             server's key changed or someone is in between: check before pinning `{line}`",
            pinned.join("/")
        ),
        HostKeyCheck::Revoked => format!(
            "host key of {name} is revoked in ssh.known_hosts: the server presented {presented}; \
             no key was offered"
        ),
        HostKeyCheck::Pinned => String::new(),
    }
}

impl Auth {
    pub fn new(keys: Vec<Key>, known_hosts: KnownHosts) -> Self {
        let mut keys = keys;
        // The user key first, whatever order they came in.
        keys.sort_by_key(|k| k.kind != KeyKind::User);
        Auth {
            keys,
            known_hosts,
            progress: Arc::default(),
        }
    }

    /// What its fetches report as they go.
    pub fn progress(&self) -> Arc<TransferProgress> {
        self.progress.clone()
    }

    /// Runs `op` (a fetch of `url`, `what` naming it for messages) once per
    /// key until one works. Returns the key the server accepted (`None`
    /// when `url` does not use SSH).
    pub(crate) fn with_each_key(
        &self,
        url: &str,
        what: &str,
        mut op: impl FnMut(&Attempt<'_>) -> Result<(), git2::Error>,
    ) -> Result<Option<&Key>, CheckoutError> {
        let target = ssh_target(url);
        fn attempt<'k>(auth: &'k Auth, key: Option<&'k Key>, target: &Option<SshTarget>) -> Attempt<'k> {
            Attempt {
                key,
                known_hosts: &auth.known_hosts,
                progress: &auth.progress,
                target: target.clone(),
                cred_calls: Cell::new(0),
                host_key_error: RefCell::new(None),
            }
        }
        let Some(t) = &target else {
            return match op(&attempt(self, None, &target)) {
                Ok(()) => Ok(None),
                Err(e) => Err(plain_error(&e, url, what)),
            };
        };
        let keys: Vec<Option<&Key>> = if self.keys.is_empty() {
            vec![None]
        } else {
            self.keys.iter().map(Some).collect()
        };
        let mut refused: Vec<&Key> = Vec::new();
        let mut not_found: Vec<&Key> = Vec::new();
        for key in keys {
            let a = attempt(self, key, &target);
            let Err(e) = op(&a) else {
                return Ok(key);
            };
            if let Some(msg) = a.host_key_error.take() {
                return Err(CheckoutError::new(FailureKind::HostKey, format!("{what}: {msg}")));
            }
            let Some(key) = key else {
                return Err(CheckoutError::new(
                    FailureKind::Auth,
                    format!(
                        "{what}: {url} needs an SSH key and the job has none; set ssh.user_key \
                         or ssh.deploy_key"
                    ),
                ));
            };
            if a.key_refused(&e) {
                refused.push(key);
            } else if a.repo_missing(&e) {
                not_found.push(key);
            } else {
                return Err(CheckoutError::new(
                    FailureKind::Checkout,
                    format!(
                        "{what}: cannot fetch {url} with the {}: {}",
                        key.kind.label(),
                        e.message()
                    ),
                ));
            }
        }
        Err(all_keys_failed(what, url, &t.host, &refused, &not_found))
    }
}

fn describe_keys(keys: &[&Key]) -> String {
    keys.iter()
        .map(|k| format!("{} {}", k.kind.label(), k.fingerprint))
        .collect::<Vec<_>>()
        .join(", ")
}

fn all_keys_failed(what: &str, url: &str, host: &str, refused: &[&Key], not_found: &[&Key]) -> CheckoutError {
    if not_found.is_empty() {
        return CheckoutError::new(
            FailureKind::Auth,
            format!(
                "{what}: Permission denied (publickey): {host} accepted none of the keys offered \
                 for {url} ({}). Add the deploy key to the repository's access keys, or the user \
                 key to the (machine) user's account",
                describe_keys(refused)
            ),
        );
    }
    let only_deploy = not_found.iter().all(|k| k.kind == KeyKind::Deploy);
    let advice = if only_deploy {
        "A deploy key reads one repository only: to check out submodules or other private \
         repositories, add a user key of a (machine) user that can read them"
    } else {
        "The repository does not exist, or the user key's account cannot read it"
    };
    let mut msg = format!(
        "{what}: ERROR: Repository not found: {host} accepted the {} but gives it no access \
         to {url}. {advice}",
        describe_keys(not_found)
    );
    if !refused.is_empty() {
        msg.push_str(&format!(" ({} was refused)", describe_keys(refused)));
    }
    CheckoutError::new(FailureKind::RepoNotFound, msg)
}

/// A failure of a fetch that used no SSH key (a path, file://, https).
fn plain_error(e: &git2::Error, url: &str, what: &str) -> CheckoutError {
    let kind = if e.code() == ErrorCode::NotFound || e.message().contains("not found") {
        FailureKind::RepoNotFound
    } else {
        FailureKind::Checkout
    };
    CheckoutError::new(kind, format!("{what}: cannot fetch {url}: {}", e.message()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssh_targets() {
        let t = |u: &str| ssh_target(u).map(|t| (t.user, t.host, t.port));
        assert_eq!(
            t("ssh://git@127.0.0.1:2222/org/app.git"),
            Some((Some("git".into()), "127.0.0.1".into(), 2222))
        );
        assert_eq!(t("ssh://host/app"), Some((None, "host".into(), 22)));
        assert_eq!(
            t("git@bitbucket.org:org/app.git"),
            Some((Some("git".into()), "bitbucket.org".into(), 22))
        );
        assert_eq!(t("file:///srv/app"), None);
        assert_eq!(t("/srv/app"), None);
        assert_eq!(t("./app"), None);
        assert_eq!(t("https://example.org/app.git"), None);
    }
}
