//! Git LFS: the objects of a commit's LFS pointers, fetched as `git lfs`
//! fetches them from Bitbucket or GitHub (`git-lfs-authenticate <path>
//! download` over SSH with the job's keys and pinned host keys, then the LFS
//! batch API over HTTP with the `href` and `header` it printed), verified
//! (sha256 = oid, size) and kept by oid in a [`Store`] that jobs share. The
//! work tree writer ([`super::worktree`]) smudges: a file whose attributes
//! say `filter=lfs` and whose blob is a pointer gets the object's bytes.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::CheckoutError;
use super::auth::Auth;
use crate::model::FailureKind;

/// The largest pointer git-lfs reads as one (its spec: 1024 bytes).
const MAX_POINTER: usize = 1024;

/// An LFS pointer: the object's sha256 (64 lowercase hex digits) and size.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Pointer {
    pub oid: String,
    pub size: u64,
}

impl Pointer {
    /// `blob` as an LFS pointer (spec v1), or `None` when it is not one.
    pub(crate) fn parse(blob: &[u8]) -> Option<Pointer> {
        if blob.len() > MAX_POINTER {
            return None;
        }
        let text = std::str::from_utf8(blob).ok()?;
        let mut lines = text.strip_suffix('\n')?.split('\n');
        if lines.next()? != "version https://git-lfs.github.com/spec/v1" {
            return None;
        }
        let (mut oid, mut size) = (None, None);
        for line in lines {
            let (key, value) = line.split_once(' ')?;
            match key {
                "oid" => {
                    let hex = value.strip_prefix("sha256:")?;
                    if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
                        return None;
                    }
                    oid = Some(hex.to_string());
                }
                "size" => size = Some(value.parse().ok()?),
                k if k.starts_with("ext-") => {}
                _ => return None,
            }
        }
        Some(Pointer {
            oid: oid?,
            size: size?,
        })
    }
}

/// LFS objects by oid: `<dir>/ab/cd/<oid>`, as git-lfs keeps them.
#[derive(Debug, Clone)]
pub(crate) struct Store {
    dir: PathBuf,
}

impl Store {
    pub(crate) fn new(dir: PathBuf) -> Store {
        Store { dir }
    }

    pub(crate) fn path(&self, oid: &str) -> PathBuf {
        self.dir.join(&oid[..2]).join(&oid[2..4]).join(oid)
    }

    fn has(&self, p: &Pointer) -> bool {
        std::fs::metadata(self.path(&p.oid)).is_ok_and(|m| m.len() == p.size)
    }

    /// The object's bytes (when it is stored).
    pub(crate) fn read(&self, p: &Pointer) -> std::io::Result<Vec<u8>> {
        let bytes = std::fs::read(self.path(&p.oid))?;
        if bytes.len() as u64 != p.size {
            return Err(std::io::Error::other(format!(
                "the stored LFS object {} has {} bytes, not {}",
                p.oid,
                bytes.len(),
                p.size
            )));
        }
        Ok(bytes)
    }

    /// Removes the objects no job has used for `max_age` (a use touches
    /// the object). Returns how many.
    pub(crate) fn expire(&self, max_age: Duration) -> usize {
        let mut removed = 0;
        let Ok(top) = std::fs::read_dir(&self.dir) else {
            return 0;
        };
        for a in top.flatten() {
            for b in std::fs::read_dir(a.path()).into_iter().flatten().flatten() {
                for o in std::fs::read_dir(b.path()).into_iter().flatten().flatten() {
                    let old = o
                        .metadata()
                        .and_then(|m| m.modified())
                        .is_ok_and(|t| t.elapsed().is_ok_and(|age| age > max_age));
                    if old && std::fs::remove_file(o.path()).is_ok() {
                        removed += 1;
                    }
                }
            }
        }
        removed
    }

    fn touch(&self, p: &Pointer) {
        if let Ok(f) = std::fs::File::options().append(true).open(self.path(&p.oid)) {
            let _ = f.set_modified(std::time::SystemTime::now());
        }
    }
}

/// A pointer of the commit: the file (path relative to the work tree) and
/// its object.
#[derive(Debug, Clone)]
pub(crate) struct PointerFile {
    pub path: String,
    pub pointer: Pointer,
}

/// What `git-lfs-authenticate` prints.
#[derive(Debug, Deserialize)]
struct Authenticated {
    href: String,
    #[serde(default)]
    header: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
struct BatchResponse {
    #[serde(default)]
    objects: Vec<BatchObject>,
}

#[derive(Debug, Deserialize)]
struct BatchObject {
    oid: String,
    #[serde(default)]
    actions: Option<Actions>,
    #[serde(default)]
    error: Option<ObjectError>,
}

#[derive(Debug, Deserialize)]
struct Actions {
    download: Option<Action>,
}

#[derive(Debug, Deserialize)]
struct Action {
    href: String,
    #[serde(default)]
    header: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
struct ObjectError {
    code: i64,
    message: String,
}

const LFS_JSON: &str = "application/vnd.git-lfs+json";

/// The repository path `git-lfs-authenticate` takes for an SSH URL
/// (`org/app.git` of `ssh://git@host/org/app.git` or `git@host:org/app.git`).
fn ssh_path(url: &str) -> Option<String> {
    let path = match url.split_once("://") {
        Some((_, rest)) => rest.split_once('/')?.1,
        None => url.split_once(':')?.1,
    };
    let path = path.trim_start_matches('/');
    (!path.is_empty() && !path.contains(['\'', '\n', '\0'])).then(|| path.to_string())
}

fn checkout_error(message: String) -> CheckoutError {
    CheckoutError::new(FailureKind::Checkout, message)
}

/// Makes sure `store` holds the objects of `files` (pointers of the
/// repository at `url`), fetching the missing ones with the job's keys.
pub(crate) fn fetch(
    url: &str,
    files: &[PointerFile],
    store: &Store,
    auth: &Auth,
) -> Result<(), CheckoutError> {
    let mut missing: BTreeMap<&str, &PointerFile> = BTreeMap::new();
    for f in files {
        if store.has(&f.pointer) {
            store.touch(&f.pointer);
        } else {
            missing.entry(&f.pointer.oid).or_insert(f);
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    let what = "the repository's Git LFS objects";
    let path = ssh_path(url)
        .filter(|_| super::auth::ssh_target(url).is_some())
        .ok_or_else(|| {
            checkout_error(format!(
                "{what}: runnel fetches LFS objects only from SSH repositories, and {url} is not one; \
             set checkout.lfs = false or use an SSH URL"
            ))
        })?;
    let command = format!("git-lfs-authenticate '{path}' download");
    let mut printed = Vec::new();
    auth.with_each_key(url, what, |attempt| {
        printed = attempt.exec(&command)?;
        Ok(())
    })?;
    let endpoint: Authenticated = serde_json::from_slice(&printed).map_err(|e| {
        checkout_error(format!(
            "{what}: the server's answer to `{command}` is not Git LFS's JSON ({e}): {:?}",
            String::from_utf8_lossy(&printed[..printed.len().min(200)])
        ))
    })?;
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(600))
        .build()
        .map_err(|e| checkout_error(format!("{what}: cannot make an HTTP client: {e}")))?;
    let batch_url = format!("{}/objects/batch", endpoint.href.trim_end_matches('/'));
    let body = serde_json::json!({
        "operation": "download",
        "transfers": ["basic"],
        "objects": missing.values().map(|f| serde_json::json!({"oid": f.pointer.oid, "size": f.pointer.size})).collect::<Vec<_>>(),
    });
    let mut request = client
        .post(&batch_url)
        .header("Accept", LFS_JSON)
        .header("Content-Type", LFS_JSON)
        .body(body.to_string());
    for (k, v) in &endpoint.header {
        request = request.header(k, v);
    }
    let response = request.send().map_err(|e| {
        checkout_error(format!(
            "{what}: the LFS batch request to {batch_url} failed: {e}"
        ))
    })?;
    let status = response.status();
    let text = response.text().unwrap_or_default();
    if !status.is_success() {
        let first = missing
            .values()
            .next()
            .map(|f| format!(" (first: {} {})", f.path, f.pointer.oid));
        return Err(checkout_error(format!(
            "{what}: the LFS server at {batch_url} refused the download of {} object(s){} with {status}: {}. \
             Check that the job's key may read the repository's LFS objects",
            missing.len(),
            first.unwrap_or_default(),
            text.trim()
        )));
    }
    let batch: BatchResponse = serde_json::from_str(&text).map_err(|e| {
        checkout_error(format!(
            "{what}: the LFS server's batch answer is not JSON it should be ({e})"
        ))
    })?;
    for (oid, file) in &missing {
        let object = batch.objects.iter().find(|o| o.oid == *oid);
        let action = match object {
            Some(BatchObject { error: Some(err), .. }) => {
                return Err(checkout_error(format!(
                    "Git LFS object {oid} of {} cannot be downloaded: the server says {} ({}). \
                     Push it with `git lfs push --all` or fix the pointer",
                    file.path, err.message, err.code
                )));
            }
            Some(BatchObject {
                actions: Some(Actions { download: Some(a) }),
                ..
            }) => a,
            _ => {
                return Err(checkout_error(format!(
                    "Git LFS object {oid} of {} cannot be downloaded: the server gave no download \
                     for it. Push it with `git lfs push --all` or fix the pointer",
                    file.path
                )));
            }
        };
        download(&client, action, file, store)?;
    }
    Ok(())
}

/// Downloads one object into the store, verifying its size and sha256.
fn download(
    client: &reqwest::blocking::Client,
    action: &Action,
    file: &PointerFile,
    store: &Store,
) -> Result<(), CheckoutError> {
    let p = &file.pointer;
    let fail = |why: String| {
        checkout_error(format!(
            "Git LFS object {} of {} cannot be downloaded: {why}",
            p.oid, file.path
        ))
    };
    let mut request = client.get(&action.href);
    for (k, v) in &action.header {
        request = request.header(k, v);
    }
    let mut response = request.send().map_err(|e| fail(format!("{e}")))?;
    if !response.status().is_success() {
        return Err(fail(format!("the server answered {}", response.status())));
    }
    let dest = store.path(&p.oid);
    let dir = dest.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(dir).map_err(|e| fail(format!("cannot create {}: {e}", dir.display())))?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(|e| fail(format!("{e}")))?;
    let mut hash = Sha256::new();
    let mut len = 0u64;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = response.read(&mut buf).map_err(|e| fail(format!("{e}")))?;
        if n == 0 {
            break;
        }
        len += n as u64;
        if len > p.size {
            return Err(fail(format!(
                "the server sent more than the pointer's {} bytes",
                p.size
            )));
        }
        hash.update(&buf[..n]);
        tmp.write_all(&buf[..n]).map_err(|e| fail(format!("{e}")))?;
    }
    let got: String = hash.finalize().iter().map(|b| format!("{b:02x}")).collect();
    if len != p.size || got != p.oid {
        return Err(fail(format!(
            "the server sent {len} bytes with sha256 {got}, not the pointer's {} bytes with sha256 {}",
            p.size, p.oid
        )));
    }
    tmp.persist(&dest).map_err(|e| fail(format!("{}", e.error)))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const OID: &str = "4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393";

    #[test]
    fn pointers() {
        let p = format!("version https://git-lfs.github.com/spec/v1\noid sha256:{OID}\nsize 12345\n");
        assert_eq!(
            Pointer::parse(p.as_bytes()),
            Some(Pointer {
                oid: OID.into(),
                size: 12345
            })
        );
        assert_eq!(Pointer::parse(p.trim_end().as_bytes()), None);
        assert_eq!(
            Pointer::parse(p.replace("sha256:4d", "sha256:XX").as_bytes()),
            None
        );
        assert_eq!(Pointer::parse(p.replace("size", "bytes").as_bytes()), None);
        assert_eq!(Pointer::parse(b"plain text\n"), None);
    }

    #[test]
    fn ssh_paths() {
        assert_eq!(
            ssh_path("ssh://git@h:2222/org/app.git").as_deref(),
            Some("org/app.git")
        );
        assert_eq!(
            ssh_path("git@bitbucket.org:org/app.git").as_deref(),
            Some("org/app.git")
        );
        assert_eq!(ssh_path("ssh://git@h/org/it's.git"), None);
    }
}
