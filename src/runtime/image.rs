//! Container images: references, pulling from a registry (`oci-client`:
//! indexes resolved by platform, token auth) or reading an OCI image layout
//! on disk (`oci:<path>[:tag]`), digests verified, layers cached
//! content-addressed under the state directory and unpacked once. Jobs that
//! need the same layer at the same time download it once. A job holds a
//! shared lock on each layer it stacks (`layers/<id>.lock`, whose mtime
//! says when it was last used); [`ImageStore::expire`] removes layers
//! unused for a while, never one that is locked.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use super::layer;
use crate::sys::lockfile;

/// Why an image cannot be had, in a sentence naming it.
#[derive(Debug, thiserror::Error)]
#[error("image {image:?}: {reason}")]
pub struct ImageError {
    pub image: String,
    pub reason: String,
}

/// What the image's config says about running it.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RunConfig {
    #[serde(rename = "Env", default)]
    pub env: Option<Vec<String>>,
    #[serde(rename = "User", default)]
    pub user: Option<String>,
    #[serde(rename = "WorkingDir", default)]
    pub working_dir: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct ConfigFile {
    #[serde(default)]
    config: Option<RunConfig>,
}

/// A pulled image, ready to be stacked. Its layers stay in the cache at
/// least as long as this (or a clone) lives.
#[derive(Debug, Clone)]
pub struct Image {
    /// The manifest's digest.
    pub digest: String,
    /// Unpacked layers, bottom first.
    pub layers: Vec<PathBuf>,
    pub config: RunConfig,
    pub holds: Arc<Vec<LayerHold>>,
}

/// A shared lock on a cached layer: [`ImageStore::expire`] leaves it be.
#[derive(Debug)]
pub struct LayerHold(#[allow(dead_code)] nix::fcntl::Flock<std::fs::File>);

#[derive(Debug, Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    #[serde(default)]
    annotations: HashMap<String, String>,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Debug, Deserialize)]
struct Platform {
    architecture: String,
    os: String,
}

#[derive(Debug, Deserialize)]
struct Index {
    manifests: Vec<Descriptor>,
}

#[derive(Debug, Deserialize)]
struct Manifest {
    config: Descriptor,
    layers: Vec<Descriptor>,
}

/// Where an image comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Registry(Reference),
    /// An OCI image layout directory and the tag to take from it.
    Layout {
        path: PathBuf,
        tag: Option<String>,
    },
}

/// Parses `oci:<path>[:tag]` or a registry reference (`name[:tag][@digest]`,
/// Docker Hub short names normalised as Docker does).
pub fn parse(image: &str) -> Result<Source, ImageError> {
    let fail = |reason: String| ImageError {
        image: image.to_string(),
        reason,
    };
    if let Some(rest) = image.strip_prefix("oci:") {
        let (path, tag) = match rest.rsplit_once(':') {
            Some((p, t)) if !t.contains('/') && !t.is_empty() => (p, Some(t.to_string())),
            _ => (rest, None),
        };
        if !Path::new(path).is_absolute() {
            return Err(fail(
                "an OCI layout path must be absolute (oci:/path/to/layout[:tag])".into(),
            ));
        }
        return Ok(Source::Layout {
            path: PathBuf::from(path),
            tag,
        });
    }
    image
        .parse::<Reference>()
        .map(Source::Registry)
        .map_err(|e| fail(format!("not an image reference ({e}); expected e.g. \"registry:5000/team/img:tag\" or \"debian@sha256:...\"")))
}

/// Pulls and caches images.
pub struct ImageStore {
    dir: PathBuf,
    client: Client,
    /// One lock per layer digest, so a layer is fetched once at a time.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Added to every owner when unpacking (user namespaces).
    shift: u32,
}

impl std::fmt::Debug for ImageStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageStore").field("dir", &self.dir).finish()
    }
}

fn hex_of(digest: &str) -> Option<&str> {
    let hex = digest.strip_prefix("sha256:")?;
    (hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit())).then_some(hex)
}

impl ImageStore {
    /// `insecure`: registries (`host:port`) spoken to over plain HTTP.
    pub fn new(state_dir: &Path, insecure: &[String], shift: u32) -> std::io::Result<ImageStore> {
        let dir = state_dir.join("images");
        for sub in ["layers", "tmp"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        // Half-made downloads and unpacks of an earlier run.
        let _ = std::fs::remove_dir_all(dir.join("tmp"));
        std::fs::create_dir_all(dir.join("tmp"))?;
        let config = ClientConfig {
            protocol: if insecure.is_empty() {
                ClientProtocol::Https
            } else {
                ClientProtocol::HttpsExcept(insecure.to_vec())
            },
            connect_timeout: Some(std::time::Duration::from_secs(15)),
            read_timeout: Some(std::time::Duration::from_secs(120)),
            ..Default::default()
        };
        Ok(ImageStore {
            dir,
            client: Client::new(config),
            locks: Mutex::new(HashMap::new()),
            shift,
        })
    }

    fn lock_for(&self, digest: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.locks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(digest.to_string())
            .or_default()
            .clone()
    }

    /// A layer's directory; layers for user namespaces are kept apart,
    /// with their owners shifted.
    fn layer_dir(&self, hex: &str) -> PathBuf {
        match self.shift {
            0 => self.dir.join("layers").join(hex),
            s => self.dir.join("layers").join(format!("{hex}+{s}")),
        }
    }

    /// The image, pulled and unpacked (or taken from the cache).
    pub async fn get(&self, image: &str) -> Result<Image, ImageError> {
        let fail = |reason: String| ImageError {
            image: image.to_string(),
            reason,
        };
        match parse(image)? {
            Source::Layout { path, tag } => self.pull_layout(&path, tag.as_deref()).await.map_err(fail),
            Source::Registry(reference) => self.pull_registry(&reference).await.map_err(fail),
        }
    }

    /// Unpacks the layer with `digest` (of `media_type`) unless the cache
    /// has it; `fetch` writes the blob to the path it is given.
    async fn layer<F, Fut>(
        &self,
        digest: &str,
        media_type: &str,
        fetch: F,
    ) -> Result<(PathBuf, LayerHold), String>
    where
        F: FnOnce(PathBuf) -> Fut,
        Fut: Future<Output = Result<(), String>>,
    {
        let hex = hex_of(digest).ok_or_else(|| format!("layer digest {digest:?} is not a sha256 digest"))?;
        let dir = self.layer_dir(hex);
        let fs_dir = dir.join("fs");
        // Held before the cache is looked at: expire() cannot take the
        // layer away from here on (it may be removing it right now: then
        // this waits, and finds it gone).
        let lock_path = dir.with_extension("lock");
        let hold = tokio::task::spawn_blocking(move || {
            let held = lockfile::lock(&lock_path, nix::fcntl::FlockArg::LockShared)?;
            lockfile::touch(&held);
            Ok::<_, std::io::Error>(LayerHold(held))
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("cannot lock the cache of layer {digest}: {e}"))?;
        if dir.join("complete").exists() {
            return Ok((fs_dir, hold));
        }
        let lock = self.lock_for(digest);
        let _held = lock.lock().await;
        if dir.join("complete").exists() {
            return Ok((fs_dir, hold)); // another job unpacked it meanwhile
        }
        let format = layer::Format::of(digest, media_type).map_err(|e| e.to_string())?;
        let tmp = tempfile::Builder::new()
            .prefix(hex)
            .tempdir_in(self.dir.join("tmp"))
            .map_err(|e| format!("cannot make a temporary directory: {e}"))?;
        let blob = tmp.path().join("blob");
        fetch(blob.clone()).await?;
        verify(&blob, digest).await?;
        let unpacked = tmp.path().join("fs");
        let (b, u, d, shift) = (blob.clone(), unpacked.clone(), digest.to_string(), self.shift);
        tokio::task::spawn_blocking(move || {
            std::fs::create_dir(&u).map_err(|e| format!("cannot unpack layer {d}: {e}"))?;
            layer::unpack(&b, format, &d, &u, shift).map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| format!("unpacking layer {digest} failed: {e}"))??;
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .and_then(|_| std::fs::rename(&unpacked, &fs_dir))
            .and_then(|_| std::fs::write(dir.join("complete"), digest))
            .map_err(|e| format!("cannot store layer {digest}: {e}"))?;
        Ok((fs_dir, hold))
    }

    /// Removes the unpacked layers no job has used for `max_age` and none
    /// holds now. Returns their ids. The lock files stay (a job may be
    /// waiting on one).
    pub fn expire(&self, max_age: std::time::Duration) -> Vec<String> {
        let layers = self.dir.join("layers");
        let mut removed = Vec::new();
        for (id, lock) in lockfile::idle_in(&layers, ".lock", max_age) {
            let dir = layers.join(&id);
            if !dir.exists() {
                continue;
            }
            let Some(_unused) = lockfile::try_exclusive(&lock) else {
                continue;
            };
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => removed.push(id),
                Err(e) => {
                    tracing::warn!(path = %dir.display(), error = %e, "cannot remove an unused image layer")
                }
            }
        }
        removed
    }

    async fn pull_layout(&self, root: &Path, tag: Option<&str>) -> Result<Image, String> {
        let read_json = |path: PathBuf| async move {
            tokio::fs::read(&path)
                .await
                .map_err(|e| format!("cannot read {}: {e}", path.display()))
        };
        let index: Index = serde_json::from_slice(&read_json(root.join("index.json")).await?)
            .map_err(|e| format!("{}/index.json is not an OCI image index: {e}", root.display()))?;
        let wanted = tag.unwrap_or("latest");
        let by_tag = index.manifests.iter().find(|d| {
            d.annotations
                .get("org.opencontainers.image.ref.name")
                .map(String::as_str)
                == Some(wanted)
        });
        let desc = match (by_tag, tag, index.manifests.as_slice()) {
            (Some(d), _, _) => d,
            (None, None, [only]) => only,
            _ => {
                return Err(format!(
                    "the layout at {} has no image tagged {wanted:?}",
                    root.display()
                ));
            }
        };
        let blob_path = |digest: &str| -> Result<PathBuf, String> {
            let hex = hex_of(digest).ok_or_else(|| format!("{digest:?} is not a sha256 digest"))?;
            Ok(root.join("blobs/sha256").join(hex))
        };
        let read_blob = |digest: String| async move {
            let path = blob_path(&digest)?;
            let bytes = read_json(path).await?;
            let got = format!("sha256:{:x}", Sha256::digest(&bytes));
            if got != digest {
                return Err(format!("digest mismatch: blob {digest} has content {got}"));
            }
            Ok::<_, String>(bytes)
        };
        let mut manifest_digest = desc.digest.clone();
        let mut bytes = read_blob(manifest_digest.clone()).await?;
        if desc.media_type.contains("index") || desc.media_type.contains("manifest.list") {
            let nested: Index =
                serde_json::from_slice(&bytes).map_err(|e| format!("bad image index: {e}"))?;
            let d = nested
                .manifests
                .iter()
                .find(|d| {
                    d.platform
                        .as_ref()
                        .is_some_and(|p| p.os == "linux" && p.architecture == go_arch())
                })
                .ok_or_else(|| format!("the image has no manifest for linux/{}", go_arch()))?;
            manifest_digest = d.digest.clone();
            bytes = read_blob(manifest_digest.clone()).await?;
        }
        let manifest: Manifest =
            serde_json::from_slice(&bytes).map_err(|e| format!("bad image manifest: {e}"))?;
        let config: ConfigFile = serde_json::from_slice(&read_blob(manifest.config.digest.clone()).await?)
            .map_err(|e| format!("bad image config: {e}"))?;
        let mut layers = Vec::new();
        let mut holds = Vec::new();
        for l in &manifest.layers {
            let src = blob_path(&l.digest)?;
            let (dir, hold) = self
                .layer(&l.digest, &l.media_type, |dest| async move {
                    tokio::fs::copy(&src, &dest)
                        .await
                        .map(|_| ())
                        .map_err(|e| format!("cannot read layer {}: {e}", src.display()))
                })
                .await?;
            layers.push(dir);
            holds.push(hold);
        }
        Ok(Image {
            digest: manifest_digest,
            layers,
            config: config.config.unwrap_or_default(),
            holds: Arc::new(holds),
        })
    }

    async fn pull_registry(&self, reference: &Reference) -> Result<Image, String> {
        let registry = reference.resolve_registry().to_string();
        let (manifest, digest, config) = self
            .client
            .pull_manifest_and_config(reference, &RegistryAuth::Anonymous)
            .await
            .map_err(|e| registry_error(&registry, reference, e))?;
        let config: ConfigFile =
            serde_json::from_str(&config).map_err(|e| format!("bad image config: {e}"))?;
        let mut layers = Vec::new();
        let mut holds = Vec::new();
        for l in &manifest.layers {
            let registry = &registry;
            let (dir, hold) = self
                .layer(&l.digest, &l.media_type, |dest| async move {
                    let mut stream = self
                        .client
                        .pull_blob_stream(reference, l)
                        .await
                        .map_err(|e| registry_error(registry, reference, e))?;
                    let mut file = tokio::fs::File::create(&dest)
                        .await
                        .map_err(|e| format!("cannot write {}: {e}", dest.display()))?;
                    while let Some(chunk) = stream.next().await {
                        let chunk =
                            chunk.map_err(|e| format!("download of layer {} failed: {e}", l.digest))?;
                        file.write_all(&chunk)
                            .await
                            .map_err(|e| format!("cannot write {}: {e}", dest.display()))?;
                    }
                    file.flush().await.map_err(|e| e.to_string())
                })
                .await?;
            layers.push(dir);
            holds.push(hold);
        }
        Ok(Image {
            digest,
            layers,
            config: config.config.unwrap_or_default(),
            holds: Arc::new(holds),
        })
    }
}

fn registry_error(
    registry: &str,
    reference: &Reference,
    e: oci_client::errors::OciDistributionError,
) -> String {
    use oci_client::errors::OciDistributionError as E;
    match &e {
        E::ImageManifestNotFoundError(_) => format!("not found in registry {registry}"),
        E::RequestError(r) if r.is_connect() || r.is_timeout() => {
            format!("registry {registry} is unreachable ({r})")
        }
        E::RegistryError { envelope, .. }
            if envelope
                .errors
                .iter()
                .any(|x| format!("{:?}", x.code).contains("Unknown")) =>
        {
            format!("not found in registry {registry} ({})", reference.whole())
        }
        E::AuthenticationFailure(m) => format!("registry {registry} refused access ({m})"),
        E::DigestError(d) => format!("digest mismatch ({d})"),
        _ => format!("cannot pull from registry {registry}: {e}"),
    }
}

/// Checks that the file at `path` has `digest`.
async fn verify(path: &Path, digest: &str) -> Result<(), String> {
    let p = path.to_path_buf();
    let got = tokio::task::spawn_blocking(move || -> std::io::Result<String> {
        let mut f = std::fs::File::open(&p)?;
        let mut h = Sha256::new();
        std::io::copy(&mut f, &mut h)?;
        Ok(format!("sha256:{:x}", h.finalize()))
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| format!("cannot read a downloaded layer: {e}"))?;
    if got == digest {
        Ok(())
    } else {
        Err(format!("digest mismatch: layer {digest} has content {got}"))
    }
}

/// This machine's architecture as OCI names it.
fn go_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references() {
        let Source::Registry(r) = parse("busybox").unwrap() else {
            panic!()
        };
        assert_eq!(r.whole(), "docker.io/library/busybox:latest");
        let Source::Registry(r) = parse("127.0.0.1:5000/team/img:v1").unwrap() else {
            panic!()
        };
        assert_eq!(
            (r.registry(), r.repository(), r.tag()),
            ("127.0.0.1:5000", "team/img", Some("v1"))
        );
        assert_eq!(
            parse("oci:/srv/layout:v2").unwrap(),
            Source::Layout {
                path: "/srv/layout".into(),
                tag: Some("v2".into())
            }
        );
        assert_eq!(
            parse("oci:/srv/layout").unwrap(),
            Source::Layout {
                path: "/srv/layout".into(),
                tag: None
            }
        );
        for bad in ["a b", "oci:relative/path", "", "x:y:z@bad"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
