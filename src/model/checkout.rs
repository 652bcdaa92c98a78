//! What a checkout produced: the commit, the key the server accepted and
//! the submodules, as the CheckoutDone event records them.

use serde::{Deserialize, Serialize};

/// Which of the job's keys this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeyKind {
    /// No SSH was involved (file://, a path, https).
    None,
    User,
    Deploy,
}

impl KeyKind {
    pub fn label(self) -> &'static str {
        match self {
            KeyKind::None => "no key",
            KeyKind::User => "user key",
            KeyKind::Deploy => "deploy key",
        }
    }
}

/// What was checked out, for the CheckoutDone event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckoutDone {
    pub commit: String,
    /// The key the server accepted.
    pub key: KeyKind,
    /// "SHA256:..." as `ssh-keygen -lf` prints it; empty without SSH.
    pub key_fingerprint: String,
    pub submodules: Vec<SubmoduleDone>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubmoduleDone {
    pub path: String,
    pub url: String,
    pub commit: String,
    pub key: KeyKind,
}
