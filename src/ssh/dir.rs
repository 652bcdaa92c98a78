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

/// A written `.ssh` directory; wiped on drop.
#[derive(Debug)]
pub struct SshDir {
    path: PathBuf,
}

impl SshDir {
    /// Creates `path` (0700) with the keys (0600, user key first in the
    /// config), `known_hosts` holding only the pinned lines, and `config`.
    pub fn write(path: &Path, keys: &[Key], known_hosts: &KnownHosts) -> io::Result<SshDir> {
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
        write_file(
            &path.join("known_hosts"),
            known_hosts.file_text().as_bytes(),
            0o644,
        )?;
        let config = format!(
            "# Written by runnel for this job: only the job's keys (user key first),\n\
             # only the pinned host keys.\n\
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
