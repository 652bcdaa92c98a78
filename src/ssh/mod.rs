//! SSH material of a job: private keys (parse, fingerprint), pinned
//! known_hosts (parse, match as strictly as OpenSSH), the job's `.ssh`
//! directory (write, wipe), and keyscan. This module never connects to a git
//! server for a checkout and never runs a container.

pub mod dir;
pub mod keys;
pub mod keyscan;
pub mod known_hosts;

pub use dir::{ExtraKey, SshDir};
pub use keys::{Key, KeyError};
pub use known_hosts::{HostKeyCheck, KnownHosts, KnownHostsError};
