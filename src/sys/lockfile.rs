//! Lock files: flock(2) on a file made on first use, so that a lock holds
//! across threads and processes. The checkout cache and the image cache
//! use them to keep what a running job uses from being removed, and their
//! mtime to tell when it was last used. A lock file is never removed while
//! someone may wait on it: a waiter would then hold a lock on a file no one
//! else sees.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use nix::fcntl::{Flock, FlockArg};

/// Takes the lock at `path` as `how` says (blocking unless a `Nonblock`
/// kind), making the file if there is none.
pub fn lock(path: &Path, how: FlockArg) -> io::Result<Flock<File>> {
    let f = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)?;
    Flock::lock(f, how).map_err(|(_, e)| io::Error::from(e))
}

/// The lock at `path`, exclusively, if no one holds it now.
pub fn try_exclusive(path: &Path) -> Option<Flock<File>> {
    lock(path, FlockArg::LockExclusiveNonblock).ok()
}

/// Marks what `held` guards as used now (its lock file's mtime).
pub fn touch(held: &Flock<File>) {
    let _ = held.set_modified(SystemTime::now());
}

/// The lock files `<stem><suffix>` in `dir` last touched more than
/// `max_age` ago: their stems and paths.
pub fn idle_in(dir: &Path, suffix: &str, max_age: Duration) -> Vec<(String, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let now = SystemTime::now();
    entries
        .flatten()
        .filter_map(|e| {
            let stem = e.file_name().to_str()?.strip_suffix(suffix)?.to_string();
            let touched = e.metadata().and_then(|m| m.modified()).ok()?;
            (now.duration_since(touched).unwrap_or_default() > max_age).then(|| (stem, e.path()))
        })
        .collect()
}
