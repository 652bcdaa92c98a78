//! Secret values as a type: key bytes, passphrases and job secrets live in
//! [`Secret`], whose `Debug` prints `[MASKED]` and whose bytes are zeroed on
//! drop, so nothing can log or leave them behind by accident.

use std::fmt;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

/// What a masked value looks like wherever it would have appeared.
pub const MASK: &str = "[MASKED]";

/// Secret bytes (a private key, a passphrase, a secret variable's value).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(Zeroizing<Vec<u8>>);

impl Secret {
    pub fn new(bytes: impl Into<Vec<u8>>) -> Self {
        Secret(Zeroizing::new(bytes.into()))
    }

    /// The secret itself. Callers must not log or persist what they get.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    /// The secret as UTF-8, when it is.
    pub fn expose_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.0).ok()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Self {
        Secret::new(s.into_bytes())
    }
}

impl From<Vec<u8>> for Secret {
    fn from(v: Vec<u8>) -> Self {
        Secret::new(v)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(MASK)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(MASK)
    }
}

/// Overwrites a file with zeros, then unlinks it. A missing file is fine.
pub fn wipe_file(path: &Path) -> io::Result<()> {
    let len = match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_file() => m.len(),
        Ok(_) => return std::fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if len > 0 {
        let mut f = std::fs::OpenOptions::new().write(true).open(path)?;
        f.write_all(&vec![0u8; len as usize])?;
        f.sync_all()?;
    }
    std::fs::remove_file(path)
}

/// A file holding secret bytes, wiped when this guard is dropped.
#[derive(Debug)]
pub struct WipeOnDrop(pub PathBuf);

impl Drop for WipeOnDrop {
    fn drop(&mut self) {
        if let Err(e) = wipe_file(&self.0) {
            tracing::error!(path = %self.0.display(), error = %e, "cannot wipe a file holding secrets");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_never_show_the_value() {
        let s = Secret::from("hunter2".to_string());
        assert_eq!(format!("{s:?} {s}"), "[MASKED] [MASKED]");
        assert_eq!(s.expose(), b"hunter2");
    }
}
