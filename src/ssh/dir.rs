//! The job's private `.ssh` directory: keys, the pinned known_hosts and an
//! ssh config, written for OpenSSH inside the container. Key files are
//! overwritten and unlinked when the [`SshDir`] is dropped, however the job
//! ended; [`wipe_dir`] does the same for a directory an earlier run of the
//! agent left behind.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::keys::Key;
use super::known_hosts::KnownHosts;
use crate::model::KeyKind;

pub const USER_KEY_FILE: &str = "id_user";
pub const DEPLOY_KEY_FILE: &str = "id_deploy";

/// A step's own key (never the checkout's), offered to `host` when given.
#[derive(Debug, Clone)]
pub struct ExtraKey {
    pub key: Key,
    pub host: Option<String>,
}

/// The file an extra key is written to: `id_` and its fingerprint's
/// hash as a file name can hold it (`SHA256:ab+/c` → `id_ab-_c`).
pub fn extra_key_file(key: &Key) -> String {
    let hash = key
        .fingerprint
        .split_once(':')
        .map_or(key.fingerprint.as_str(), |(_, h)| h);
    let name: String = hash
        .trim_end_matches('=')
        .chars()
        .map(|c| match c {
            '+' => '-',
            '/' => '_',
            c => c,
        })
        .collect();
    format!("id_{name}")
}

/// A written `.ssh` directory; wiped on drop.
#[derive(Debug)]
pub struct SshDir {
    path: PathBuf,
}

impl SshDir {
    /// Creates `path` (0700) with the keys (0600, user key first in the
    /// config), the steps' extra keys (each offered first to its host, or
    /// last to every host), `known_hosts` holding only the pinned lines,
    /// and `config`.
    pub fn write(
        path: &Path,
        keys: &[Key],
        extra: &[ExtraKey],
        known_hosts: &KnownHosts,
    ) -> io::Result<SshDir> {
        fs::DirBuilder::new().mode(0o700).create(path)?;
        // From here on, a failure wipes what was written.
        let dir = SshDir {
            path: path.to_path_buf(),
        };
        let mut identity_lines = String::new();
        for key in keys {
            let name = match key.kind {
                KeyKind::User => USER_KEY_FILE,
                _ => DEPLOY_KEY_FILE,
            };
            write_file(&path.join(name), key.private.expose(), 0o600)?;
            write_file(
                &path.join(format!("{name}.pub")),
                format!("{}\n", key.public).as_bytes(),
                0o644,
            )?;
            identity_lines.push_str(&format!("    IdentityFile ~/.ssh/{name}\n"));
        }
        // ssh takes the IdentityFile lines of every matching Host block, in
        // order: a host's own keys come first.
        let mut host_blocks = String::new();
        for e in extra {
            let name = extra_key_file(&e.key);
            let written = path.join(&name);
            if written.exists() {
                continue; // the same key twice
            }
            write_file(&written, e.key.private.expose(), 0o600)?;
            write_file(
                &path.join(format!("{name}.pub")),
                format!("{}\n", e.key.public).as_bytes(),
                0o644,
            )?;
            match &e.host {
                Some(host) => host_blocks.push_str(&format!("Host {host}\n    IdentityFile ~/.ssh/{name}\n")),
                None => identity_lines.push_str(&format!("    IdentityFile ~/.ssh/{name}\n")),
            }
        }
        write_file(
            &path.join("known_hosts"),
            known_hosts.file_text().as_bytes(),
            0o644,
        )?;
        let config = format!(
            "# Written by runnel for this job: only the job's keys (user key first),\n\
             # only the pinned host keys.\n\
             {host_blocks}\
             Host *\n\
             {identity_lines}\
             \x20   IdentitiesOnly yes\n\
             \x20   StrictHostKeyChecking yes\n\
             \x20   UserKnownHostsFile ~/.ssh/known_hosts\n\
             \x20   GlobalKnownHostsFile /dev/null\n\
             \x20   PasswordAuthentication no\n\
             \x20   KbdInteractiveAuthentication no\n\
             \x20   BatchMode yes\n"
        );
        write_file(&path.join("config"), config.as_bytes(), 0o600)?;
        Ok(dir)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SshDir {
    fn drop(&mut self) {
        if let Err(e) = wipe_dir(&self.path) {
            tracing::error!(path = %self.path.display(), error = %e, "failed to wipe a job's ssh directory");
        }
    }
}

fn write_file(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Overwrites every regular file under `dir` with zeros, then removes the
/// directory. A missing directory is not an error.
pub fn wipe_dir(dir: &Path) -> io::Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let path = entry.path();
        let meta = fs::symlink_metadata(&path)?;
        if meta.is_dir() {
            wipe_dir(&path)?;
        } else {
            crate::sys::wipe::wipe_file(&path)?;
        }
    }
    fs::remove_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Secret;

    fn key(kind: KeyKind, fingerprint: &str) -> Key {
        Key {
            kind,
            fingerprint: fingerprint.into(),
            algorithm: "ssh-ed25519".into(),
            private: Secret::from(format!("private of {fingerprint}")),
            public: format!("ssh-ed25519 AAAA{fingerprint}"),
        }
    }

    #[test]
    fn extra_keys_go_first_to_their_host_and_last_to_every_host() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ssh");
        let extra = [
            ExtraKey {
                key: key(KeyKind::None, "SHA256:dep+loy/key="),
                host: Some("deploy.example.com".into()),
            },
            ExtraKey {
                key: key(KeyKind::None, "SHA256:any"),
                host: None,
            },
        ];
        let written = SshDir::write(
            &path,
            &[key(KeyKind::User, "SHA256:user")],
            &extra,
            &KnownHosts::parse(&[]).unwrap(),
        )
        .unwrap();
        let config = fs::read_to_string(path.join("config")).unwrap();
        let at = |s: &str| config.find(s).unwrap_or_else(|| panic!("{s:?} not in\n{config}"));
        assert!(at("Host deploy.example.com\n    IdentityFile ~/.ssh/id_dep-loy_key\n") < at("Host *\n"));
        assert!(at("IdentityFile ~/.ssh/id_user\n") < at("IdentityFile ~/.ssh/id_any\n"));
        assert!(at("Host *\n") < at("IdentityFile ~/.ssh/id_any\n"));
        assert_eq!(
            fs::read_to_string(path.join("id_dep-loy_key")).unwrap(),
            "private of SHA256:dep+loy/key="
        );
        drop(written);
        assert!(!path.exists());
    }
}
