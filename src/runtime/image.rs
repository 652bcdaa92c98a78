//! Container images: references, pulling from a registry (`oci-client`:
//! indexes resolved by platform, token auth) or reading an OCI image layout
//! on disk (`oci:<path>[:tag]`), digests verified, layers cached
//! content-addressed under the state directory and unpacked once. Jobs that
//! need the same layer at the same time download it once. A job holds a
//! shared lock on each layer it stacks (`layers/<id>.lock`, whose mtime
//! says when it was last used); [`ImageStore::expire`] removes layers
//! unused for a while, never one that is locked.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use super::layer::{self, LayerError};
use crate::sys::lockfile;

/// Why an image cannot be had. The caller names the image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(
        "not an image reference ({source}); expected e.g. \"registry:5000/team/img:tag\" or \"debian@sha256:...\""
    )]
    BadReference {
        #[source]
        source: oci_client::ParseError,
    },
    #[error("an OCI layout path must be absolute (oci:/path/to/layout[:tag])")]
    RelativeLayout,
    #[error("{path} is not an OCI image index: {source}")]
    NotALayout {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("the layout at {layout} has no image tagged {tag:?}")]
    NoSuchTag { layout: PathBuf, tag: String },
    /// An index, manifest or config that does not parse.
    #[error("bad {what}: {source}")]
    Malformed {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("the image has no manifest for {platform}")]
    NoPlatform { platform: String },
    #[error("{digest:?} is not a sha256 digest")]
    BadDigest { digest: String },
    #[error("digest mismatch: blob {digest} has content {actual}")]
    DigestMismatch { digest: String, actual: String },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("not found in registry {registry} ({reference})")]
    NotFound {
        registry: String,
        reference: String,
        #[source]
        source: OciDistributionError,
    },
    #[error("registry {registry} is unreachable ({source})")]
    Unreachable {
        registry: String,
        #[source]
        source: OciDistributionError,
    },
    #[error("registry {registry} refused access ({source})")]
    Refused {
        registry: String,
        #[source]
        source: OciDistributionError,
    },
    #[error("cannot pull from registry {registry}: {source}")]
    Registry {
        registry: String,
        #[source]
        source: OciDistributionError,
    },
    #[error("download of layer {digest} failed: {source}")]
    Download {
        digest: String,
        #[source]
        source: io::Error,
    },
    /// The layer's own error names its digest and entry.
    #[error(transparent)]
    Unpack(#[from] LayerError),
    /// The agent's own layer cache failed (a full disk, say).
    #[error("cannot {what}: {source}")]
    Cache {
        what: String,
        #[source]
        source: io::Error,
    },
}

fn cache_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> ImageError {
    let what = what.into();
    move |source| ImageError::Cache { what, source }
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
    #[serde(rename = "Entrypoint", default)]
    pub entrypoint: Option<Vec<String>>,
    #[serde(rename = "Cmd", default)]
    pub cmd: Option<Vec<String>>,
}

impl RunConfig {
    /// Where the image's processes start, if it says so and names other
    /// than `/` (what images that do not say get): absolute, with `.` and
    /// `..` resolved by name.
    pub fn workdir(&self) -> Option<String> {
        let mut names: Vec<&str> = Vec::new();
        for name in self.working_dir.as_deref()?.split('/') {
            match name {
                "" | "." => {}
                ".." => {
                    names.pop();
                }
                n => names.push(n),
            }
        }
        (!names.is_empty()).then(|| format!("/{}", names.join("/")))
    }
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

/// How far getting an image has come, for the job's log: written by the
/// store as it goes, read by whoever reports it.
#[derive(Debug, Default)]
pub struct PullProgress(Mutex<PullState>);

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PullState {
    /// The image's layers, once its manifest is read.
    pub layers: usize,
    /// Layers ready (from the cache, or fetched and unpacked).
    pub done: usize,
    /// Layers that were not in the cache.
    pub fetched: usize,
    pub fetched_bytes: u64,
    /// A layer is being unpacked.
    pub unpacking: bool,
}

impl PullProgress {
    pub fn state(&self) -> PullState {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn update(&self, change: impl FnOnce(&mut PullState)) {
        change(&mut self.0.lock().unwrap_or_else(|e| e.into_inner()));
    }
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
    if let Some(rest) = image.strip_prefix("oci:") {
        let (path, tag) = match rest.rsplit_once(':') {
            Some((p, t)) if !t.contains('/') && !t.is_empty() => (p, Some(t.to_string())),
            _ => (rest, None),
        };
        if !Path::new(path).is_absolute() {
            return Err(ImageError::RelativeLayout);
        }
        return Ok(Source::Layout {
            path: PathBuf::from(path),
            tag,
        });
    }
    image
        .parse::<Reference>()
        .map(Source::Registry)
        .map_err(|source| ImageError::BadReference { source })
}

/// Pulls and caches images.
pub struct ImageStore {
    dir: PathBuf,
    client: Client,
    /// One lock per layer digest, so a layer is fetched once at a time.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl std::fmt::Debug for ImageStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageStore").field("dir", &self.dir).finish()
    }
}

fn hex_of(digest: &str) -> Result<&str, ImageError> {
    digest
        .strip_prefix("sha256:")
        .filter(|hex| hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit()))
        .ok_or_else(|| ImageError::BadDigest {
            digest: digest.to_string(),
        })
}

impl ImageStore {
    /// `insecure`: registries (`host:port`) spoken to over plain HTTP.
    pub fn new(state_dir: &Path, insecure: &[String]) -> std::io::Result<ImageStore> {
        let dir = state_dir.join("images");
        for sub in ["layers", "configs", "tmp"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        // Layers keep the owners they were built with: a set-user-ID root
        // program of an image must be out of reach of the host's users
        // (the state directory is passable for user namespaces).
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        // Half-made downloads and unpacks of an earlier run.
        let _ = super::may_block(|| std::fs::remove_dir_all(dir.join("tmp")));
        std::fs::create_dir_all(dir.join("tmp"))?;
        crate::sys::tls::install_crypto_provider();
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

    /// A layer's directory; layers unpacked with their owners shifted
    /// (for a user namespace, where idmapped mounts cannot be had) are
    /// kept apart, one copy per shift.
    fn layer_dir(&self, hex: &str, shift: u32) -> PathBuf {
        match shift {
            0 => self.dir.join("layers").join(hex),
            s => self.dir.join("layers").join(format!("{hex}+{s}")),
        }
    }

    /// The image, pulled and unpacked (or taken from the cache), with
    /// `shift` added to every owner of its files (0: as built).
    pub async fn get(&self, image: &str, shift: u32) -> Result<Image, ImageError> {
        self.get_reporting(image, shift, &PullProgress::default()).await
    }

    /// [`ImageStore::get`], telling `progress` how far it has come.
    pub async fn get_reporting(
        &self,
        image: &str,
        shift: u32,
        progress: &PullProgress,
    ) -> Result<Image, ImageError> {
        match parse(image)? {
            Source::Layout { path, tag } => self.pull_layout(&path, tag.as_deref(), shift, progress).await,
            Source::Registry(reference) => self.pull_registry(&reference, shift, progress).await,
        }
    }

    /// Unpacks the layer with `digest` (of `media_type`) unless the cache
    /// has it; `fetch` writes the blob to the path it is given.
    async fn layer<F, Fut>(
        &self,
        digest: &str,
        media_type: &str,
        shift: u32,
        progress: &PullProgress,
        fetch: F,
    ) -> Result<(PathBuf, LayerHold), ImageError>
    where
        F: FnOnce(PathBuf) -> Fut,
        Fut: Future<Output = Result<(), ImageError>>,
    {
        let hex = hex_of(digest)?;
        let dir = self.layer_dir(hex, shift);
        let fs_dir = dir.join("fs");
        // Held before the cache is looked at: expire() cannot take the
        // layer away from here on (it may be removing it right now: then
        // this waits, and finds it gone).
        let lock_path = dir.with_extension("lock");
        let lock_err = cache_err(format!("lock the cache of layer {digest}"));
        let hold = blocking(move || {
            let held = lockfile::lock(&lock_path, nix::fcntl::FlockArg::LockShared).map_err(lock_err)?;
            lockfile::touch(&held);
            Ok(LayerHold(held))
        })
        .await?;
        let ready = || progress.update(|p| p.done += 1);
        if dir.join("complete").exists() {
            ready();
            return Ok((fs_dir, hold));
        }
        let unpacking = self.lock_for(digest).lock_owned().await;
        if dir.join("complete").exists() {
            ready();
            return Ok((fs_dir, hold)); // another job unpacked it meanwhile
        }
        progress.update(|p| p.fetched += 1);
        let format = layer::Format::of(digest, media_type)?;
        let tmp = tempfile::Builder::new()
            .prefix(hex)
            .tempdir_in(self.dir.join("tmp"))
            .map_err(cache_err("make a temporary directory"))?;
        let blob = tmp.path().join("blob");
        fetch(blob.clone()).await?;
        progress.update(|p| p.unpacking = true);
        let (digest, fs) = (digest.to_string(), fs_dir.clone());
        // Hashing, unpacking and removing trees take long: off the async
        // threads, the temporary directory (a half-unpacked layer, maybe)
        // removed there too. The task holds the layer's lock: should this
        // job be cancelled meanwhile, the next one waits for it.
        blocking(move || {
            let _unpacking = unpacking;
            verify(&blob, &digest)?;
            let unpacked = tmp.path().join("fs");
            std::fs::create_dir(&unpacked).map_err(cache_err(format!("unpack layer {digest}")))?;
            layer::unpack(&blob, format, &digest, &unpacked, shift)?;
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir)
                .and_then(|_| std::fs::rename(&unpacked, &fs))
                .and_then(|_| std::fs::write(dir.join("complete"), &digest))
                .map_err(cache_err(format!("store layer {digest}")))?;
            drop(tmp);
            Ok(())
        })
        .await?;
        progress.update(|p| {
            p.unpacking = false;
            p.done += 1;
        });
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

    async fn pull_layout(
        &self,
        root: &Path,
        tag: Option<&str>,
        shift: u32,
        progress: &PullProgress,
    ) -> Result<Image, ImageError> {
        let read = |path: PathBuf| async move {
            tokio::fs::read(&path)
                .await
                .map_err(|source| ImageError::Read { path, source })
        };
        let index_path = root.join("index.json");
        let index: Index = serde_json::from_slice(&read(index_path.clone()).await?).map_err(|source| {
            ImageError::NotALayout {
                path: index_path,
                source,
            }
        })?;
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
                return Err(ImageError::NoSuchTag {
                    layout: root.to_path_buf(),
                    tag: wanted.to_string(),
                });
            }
        };
        let blob_path = |digest: &str| Ok::<_, ImageError>(root.join("blobs/sha256").join(hex_of(digest)?));
        let read_blob = |digest: String| async move {
            let bytes = read(blob_path(&digest)?).await?;
            let actual = format!("sha256:{:x}", Sha256::digest(&bytes));
            if actual != digest {
                return Err(ImageError::DigestMismatch { digest, actual });
            }
            Ok(bytes)
        };
        let mut manifest_digest = desc.digest.clone();
        let mut bytes = read_blob(manifest_digest.clone()).await?;
        if desc.media_type.contains("index") || desc.media_type.contains("manifest.list") {
            let nested: Index = parse_json("image index", &bytes)?;
            let d = nested
                .manifests
                .iter()
                .find(|d| {
                    d.platform
                        .as_ref()
                        .is_some_and(|p| p.os == "linux" && p.architecture == go_arch())
                })
                .ok_or_else(|| ImageError::NoPlatform {
                    platform: format!("linux/{}", go_arch()),
                })?;
            manifest_digest = d.digest.clone();
            bytes = read_blob(manifest_digest.clone()).await?;
        }
        let manifest: Manifest = parse_json("image manifest", &bytes)?;
        let config: ConfigFile =
            parse_json("image config", &read_blob(manifest.config.digest.clone()).await?)?;
        let mut layers = Vec::new();
        let mut holds = Vec::new();
        progress.update(|p| p.layers = manifest.layers.len());
        for l in &manifest.layers {
            let src = blob_path(&l.digest)?;
            let (dir, hold) = self
                .layer(&l.digest, &l.media_type, shift, progress, |dest| async move {
                    match tokio::fs::copy(&src, &dest).await {
                        Ok(n) => {
                            progress.update(|p| p.fetched_bytes += n);
                            Ok(())
                        }
                        Err(source) => Err(ImageError::Read { path: src, source }),
                    }
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

    async fn pull_registry(
        &self,
        reference: &Reference,
        shift: u32,
        progress: &PullProgress,
    ) -> Result<Image, ImageError> {
        let registry = reference.resolve_registry().to_string();
        let (manifest, digest) = self
            .client
            .pull_image_manifest(reference, &RegistryAuth::Anonymous)
            .await
            .map_err(|e| registry_error(&registry, reference, e))?;
        let config = self.config_blob(&registry, reference, &manifest.config).await?;
        let config: ConfigFile = parse_json("image config", &config)?;
        let mut layers = Vec::new();
        let mut holds = Vec::new();
        progress.update(|p| p.layers = manifest.layers.len());
        for l in &manifest.layers {
            let registry = &registry;
            let (dir, hold) = self
                .layer(&l.digest, &l.media_type, shift, progress, |dest| async move {
                    let mut stream = self
                        .client
                        .pull_blob_stream(reference, l)
                        .await
                        .map_err(|e| registry_error(registry, reference, e))?;
                    let write_err = cache_err(format!("write {}", dest.display()));
                    let mut file = match tokio::fs::File::create(&dest).await {
                        Ok(f) => f,
                        Err(e) => return Err(write_err(e)),
                    };
                    while let Some(chunk) = stream.next().await {
                        let chunk = chunk.map_err(|source| ImageError::Download {
                            digest: l.digest.clone(),
                            source,
                        })?;
                        if let Err(e) = file.write_all(&chunk).await {
                            return Err(write_err(e));
                        }
                        progress.update(|p| p.fetched_bytes += chunk.len() as u64);
                    }
                    file.flush().await.map_err(write_err)
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

impl ImageStore {
    /// The image's config blob: from the cache (`images/configs`, by
    /// digest), else from the registry. A job's lookup of a known image is
    /// then one request (the tag's manifest) instead of two.
    async fn config_blob(
        &self,
        registry: &str,
        reference: &Reference,
        desc: &oci_client::manifest::OciDescriptor,
    ) -> Result<Vec<u8>, ImageError> {
        let path = self.dir.join("configs").join(hex_of(&desc.digest)?);
        if let Ok(bytes) = tokio::fs::read(&path).await
            && sha256_digest(&bytes) == desc.digest
        {
            return Ok(bytes);
        }
        let mut bytes = Vec::new();
        self.client
            .pull_blob(reference, desc, &mut bytes)
            .await
            .map_err(|e| registry_error(registry, reference, e))?;
        let actual = sha256_digest(&bytes);
        if actual != desc.digest {
            return Err(ImageError::DigestMismatch {
                digest: desc.digest.clone(),
                actual,
            });
        }
        // Written whole or not at all; a cache that cannot be written
        // only costs the next job a request.
        static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = path.with_extension(format!("{}-{n}.tmp", std::process::id()));
        if tokio::fs::write(&tmp, &bytes).await.is_ok() && tokio::fs::rename(&tmp, &path).await.is_err() {
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        Ok(bytes)
    }
}

fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(bytes))
}

fn parse_json<T: serde::de::DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T, ImageError> {
    serde_json::from_slice(bytes).map_err(|source| ImageError::Malformed { what, source })
}

/// What a registry's answer means for the user.
fn registry_error(registry: &str, reference: &Reference, e: OciDistributionError) -> ImageError {
    use oci_client::errors::DigestError;
    use oci_client::errors::OciDistributionError as E;
    let registry = registry.to_string();
    match e {
        E::ImageManifestNotFoundError(_) => ImageError::NotFound {
            registry,
            reference: reference.whole(),
            source: e,
        },
        E::RequestError(ref r) if r.is_connect() || r.is_timeout() => {
            ImageError::Unreachable { registry, source: e }
        }
        E::RegistryError { ref envelope, .. }
            if envelope
                .errors
                .iter()
                .any(|x| format!("{:?}", x.code).contains("Unknown")) =>
        {
            ImageError::NotFound {
                registry,
                reference: reference.whole(),
                source: e,
            }
        }
        E::AuthenticationFailure(_) => ImageError::Refused { registry, source: e },
        E::DigestError(DigestError::VerificationError { expected, actual }) => ImageError::DigestMismatch {
            digest: expected,
            actual,
        },
        _ => ImageError::Registry { registry, source: e },
    }
}

/// Checks that the file at `path` has `digest`. Blocks: hashes the file.
fn verify(path: &Path, digest: &str) -> Result<(), ImageError> {
    let read_err = |source| ImageError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(read_err)?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(read_err)?;
    let actual = format!("sha256:{:x}", h.finalize());
    if actual == digest {
        Ok(())
    } else {
        Err(ImageError::DigestMismatch {
            digest: digest.to_string(),
            actual,
        })
    }
}

/// Runs file work that may take long (locks, hashing, unpacking, removing
/// trees) off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ImageError> + Send + 'static,
) -> Result<T, ImageError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(cache_err("finish the layer's file work")(io::Error::other(e))))
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
    fn the_working_dir_is_absolute_and_plain_and_slash_is_none() {
        let w = |d: Option<&str>| {
            RunConfig {
                working_dir: d.map(str::to_string),
                ..Default::default()
            }
            .workdir()
        };
        assert_eq!(w(None), None);
        assert_eq!(w(Some("")), None);
        assert_eq!(w(Some("/")), None);
        assert_eq!(w(Some("/src/app/")), Some("/src/app".into()));
        assert_eq!(w(Some("src//./app")), Some("/src/app".into()));
        assert_eq!(w(Some("/../../etc/../go")), Some("/go".into()));
    }

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
        for bad in ["a b", "", "x:y:z@bad", "Not A Reference"] {
            let e = parse(bad).unwrap_err();
            assert!(matches!(e, ImageError::BadReference { .. }), "{bad}: {e:?}");
            assert!(e.to_string().starts_with("not an image reference ("), "{e}");
        }
        assert!(matches!(
            parse("oci:relative/path"),
            Err(ImageError::RelativeLayout)
        ));
    }

    fn store() -> (tempfile::TempDir, ImageStore) {
        let state = tempfile::tempdir().unwrap();
        let store = ImageStore::new(state.path(), &["127.0.0.1:1".to_string()]).unwrap();
        (state, store)
    }

    #[tokio::test]
    async fn layout_errors_say_what_is_wrong() {
        let (state, store) = store();
        let layout = state.path().join("layout");
        let e = store
            .get(&format!("oci:{}", layout.display()), 0)
            .await
            .unwrap_err();
        assert!(
            matches!(&e, ImageError::Read { path, source } if *path == layout.join("index.json") && source.kind() == io::ErrorKind::NotFound),
            "{e:?}"
        );
        std::fs::create_dir(&layout).unwrap();
        std::fs::write(layout.join("index.json"), "not json").unwrap();
        let e = store
            .get(&format!("oci:{}", layout.display()), 0)
            .await
            .unwrap_err();
        assert!(matches!(e, ImageError::NotALayout { .. }), "{e:?}");
        std::fs::write(layout.join("index.json"), r#"{"manifests": []}"#).unwrap();
        let e = store
            .get(&format!("oci:{}:v9", layout.display()), 0)
            .await
            .unwrap_err();
        assert!(
            matches!(&e, ImageError::NoSuchTag { tag, .. } if tag == "v9"),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            format!("the layout at {} has no image tagged \"v9\"", layout.display())
        );
        let manifest = br#"{"config": {"digest": "sha256:1"}, "layers": []}"#;
        let digest = format!("sha256:{:x}", Sha256::digest(manifest));
        std::fs::create_dir_all(layout.join("blobs/sha256")).unwrap();
        std::fs::write(
            layout.join("blobs/sha256").join(hex_of(&digest).unwrap()),
            b"tampered",
        )
        .unwrap();
        std::fs::write(
            layout.join("index.json"),
            format!(r#"{{"manifests": [{{"digest": "{digest}"}}]}}"#),
        )
        .unwrap();
        let e = store
            .get(&format!("oci:{}", layout.display()), 0)
            .await
            .unwrap_err();
        assert!(
            matches!(&e, ImageError::DigestMismatch { digest: d, .. } if *d == digest),
            "{e:?}"
        );
        std::fs::write(
            layout.join("blobs/sha256").join(hex_of(&digest).unwrap()),
            manifest,
        )
        .unwrap();
        let e = store
            .get(&format!("oci:{}", layout.display()), 0)
            .await
            .unwrap_err();
        assert!(
            matches!(&e, ImageError::BadDigest { digest } if digest == "sha256:1"),
            "{e:?}"
        );
    }

    #[tokio::test]
    async fn a_registry_nobody_listens_on_is_unreachable() {
        let (_state, store) = store();
        let e = store.get("127.0.0.1:1/team/img:v1", 0).await.unwrap_err();
        assert!(
            matches!(&e, ImageError::Unreachable { registry, .. } if registry == "127.0.0.1:1"),
            "{e:?}"
        );
        assert!(
            e.to_string().starts_with("registry 127.0.0.1:1 is unreachable ("),
            "{e}"
        );
    }
}
