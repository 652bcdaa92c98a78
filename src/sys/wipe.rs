//! Files that held secrets: overwritten with zeros before they are unlinked.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

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
