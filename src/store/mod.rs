//! The store that caches, workspaces, artifacts and test results go to,
//! shared by a fleet of agents: keys scoped by project, objects verified
//! against their digests, and the JUnit reader for test results.
//!
//! Layout under the backend's prefix (`[storage] url`), for each project:
//!
//! ```text
//! PROJECT/caches/KEY.tar.zst          a cache: tar + zstd
//! PROJECT/caches/KEY.json             its manifest: sha256, size, when, by which job
//! PROJECT/workspaces/WORKFLOW/LAYER.tar.zst (+ .json)
//!                                     LAYER = NANOS-JOB-STEP: in the order persisted
//! PROJECT/artifacts/JOB/DESTINATION/...   each file as it was
//! ```
//!
//! A manifest is written after its object, so its presence says the
//! object is complete; its digest is checked on every restore. This
//! module does the object I/O; what moves files out of and into a job's
//! container is [`archive`], run in a process of its own. It never
//! touches jobs or containers.

pub mod archive;
pub mod junit;
pub mod key;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::{StreamExt, TryStreamExt};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Where the store is and how to reach it: `[storage]` of the agent's
/// config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreSettings {
    /// `file:///DIR`, `s3://BUCKET[/PREFIX]`, `gs://BUCKET[/PREFIX]`,
    /// `az://CONTAINER[/PREFIX]`.
    pub url: String,
    /// An S3-compatible server's address (Garage, MinIO, Ceph RGW).
    pub endpoint: Option<String>,
    pub region: Option<String>,
    /// An INI file whose `[default]` keys are the backend's credentials
    /// (`aws_access_key_id`, `aws_secret_access_key`, `aws_session_token`;
    /// `azure_storage_account_name`, `azure_storage_account_key`); for
    /// `gs://`, a service account's JSON key file.
    pub credentials_file: Option<PathBuf>,
    /// Allow an `http://` endpoint (a store on loopback or a trusted net).
    pub allow_http: bool,
}

/// Why the store could not do something: each names the backend and the
/// key.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("[storage] url {url:?}: {message}")]
    Url { url: String, message: String },
    #[error("[storage] credentials_file {path}: {message}")]
    Credentials { path: PathBuf, message: String },
    #[error("{backend}: {key}: {source}")]
    Backend {
        backend: String,
        key: String,
        #[source]
        source: object_store::Error,
    },
    #[error(
        "{backend}: {key}: its sha256 is {actual}, but its manifest says {expected}: the object was \
         corrupted or replaced; it was not used"
    )]
    Digest {
        backend: String,
        key: String,
        expected: String,
        actual: String,
    },
    #[error("{backend}: {key}: its manifest is unreadable ({message}); it was not used")]
    Manifest {
        backend: String,
        key: String,
        message: String,
    },
    #[error("{backend}: {key}: {what}: {source}")]
    Io {
        backend: String,
        key: String,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// What is stored beside each cache and workspace layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Of the object's bytes, hex.
    pub sha256: String,
    pub size: u64,
    /// Seconds since the epoch.
    pub created: u64,
    pub job_id: String,
    /// sha256 (hex) of each [`CHUNK_BYTES`] of the object, in order: a
    /// restore checks each before a byte of it is used.
    #[serde(default)]
    pub chunks: Vec<String>,
    /// The object's name, beside the manifest: unique to its upload, so
    /// that two jobs saving one key at once never mix their bytes.
    #[serde(default)]
    pub data: String,
}

impl Manifest {
    /// The manifest of what `job_id` just uploaded.
    fn of(uploaded: Uploaded, job_id: &str) -> Manifest {
        Manifest {
            sha256: uploaded.sha256,
            size: uploaded.size,
            created: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs(),
            job_id: job_id.to_string(),
            chunks: uploaded.chunks,
            data: uploaded.data,
        }
    }
}

/// The unit of a manifest's digests and of a download's ranges.
pub const CHUNK_BYTES: u64 = 4 << 20;

/// What an upload stored: the digests of its object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uploaded {
    pub sha256: String,
    pub size: u64,
    pub chunks: Vec<String>,
    /// The object's name (its last segment).
    pub data: String,
}

/// A cache as `runnel cache ls` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheEntry {
    pub key: String,
    pub size: u64,
    pub created: SystemTime,
}

/// Bytes moved so far, for progress lines.
#[derive(Debug, Default)]
pub struct Progress(AtomicU64);

impl Progress {
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Multipart uploads go in parts of this size, this many at once: the
/// agent holds at most their product of an upload.
/// (S3's smallest part is 5 MiB.)
const PART_BYTES: usize = 5 << 20;
const PARTS_AT_ONCE: usize = 4;
/// What an upload reads at a time (a fifth of a part).
const BLOCK_BYTES: usize = 1 << 20;
/// Downloads: this many ranges ([`CHUNK_BYTES`] each) at once.
const RANGES_AT_ONCE: usize = 4;

pub const TAR_ZST: &str = ".tar.zst";
const MANIFEST: &str = ".json";

/// The store: a backend and the prefix under it.
#[derive(Debug, Clone)]
pub struct Store {
    backend: Arc<dyn ObjectStore>,
    prefix: String,
    /// The url, for messages.
    name: String,
}

impl Store {
    /// Opens the backend `settings` name. Nothing is contacted yet.
    pub fn open(settings: &StoreSettings) -> Result<Store, StoreError> {
        let url_err = |message: String| StoreError::Url {
            url: settings.url.clone(),
            message,
        };
        let url = url::Url::parse(&settings.url).map_err(|e| url_err(format!("not a url: {e}")))?;
        let name = settings.url.clone();
        if url.scheme() == "file" {
            let dir = url
                .to_file_path()
                .map_err(|()| url_err("a file:// url names an absolute local directory".into()))?;
            std::fs::create_dir_all(&dir)
                .map_err(|e| url_err(format!("cannot make the directory {}: {e}", dir.display())))?;
            let fs = object_store::local::LocalFileSystem::new_with_prefix(&dir)
                .map_err(|e| url_err(e.to_string()))?;
            return Ok(Store {
                backend: Arc::new(fs),
                prefix: String::new(),
                name,
            });
        }
        // The backends' usual environment first (AWS_*, GOOGLE_*, AZURE_*);
        // the config's own settings override it.
        // reqwest (without a provider of its own) panics without one.
        crate::sys::tls::install_crypto_provider();
        let mut options: Vec<(String, String)> = std::env::vars()
            .map(|(k, v)| (k.to_ascii_lowercase(), v))
            .filter(|(k, _)| ["aws_", "google_", "azure_"].iter().any(|p| k.starts_with(p)))
            .collect();
        let scheme = url.scheme().to_string();
        let s3 = matches!(scheme.as_str(), "s3" | "s3a");
        if let Some(e) = &settings.endpoint {
            if !s3 {
                return Err(url_err("endpoint is for s3:// urls only".into()));
            }
            options.push(("aws_endpoint".into(), e.clone()));
        }
        if let Some(r) = &settings.region {
            options.push(("aws_region".into(), r.clone()));
        }
        if settings.allow_http {
            options.push(("allow_http".into(), "true".into()));
        }
        if let Some(path) = &settings.credentials_file {
            if matches!(scheme.as_str(), "gs" | "gcs") {
                options.push(("google_service_account_path".into(), path.display().to_string()));
            } else {
                options.extend(read_credentials(path)?);
            }
        }
        let (backend, prefix) =
            object_store::parse_url_opts(&url, options).map_err(|e| url_err(e.to_string()))?;
        Ok(Store {
            backend: Arc::from(backend),
            prefix: prefix.to_string(),
            name,
        })
    }

    /// The backend, for messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `PROJECT/REST` under the prefix; `rest` is checked already.
    fn path(&self, project: &str, rest: &str) -> ObjectPath {
        // The prefix is a path already; each segment of ours is encoded
        // once, as its own part.
        let mut at = ObjectPath::parse(&self.prefix).unwrap_or_default();
        for part in std::iter::once(project)
            .chain(rest.split('/'))
            .filter(|s| !s.is_empty())
        {
            at = at.join(part);
        }
        at
    }

    fn backend_err(&self, key: &ObjectPath) -> impl FnOnce(object_store::Error) -> StoreError + '_ {
        let key = key.to_string();
        move |source| StoreError::Backend {
            backend: self.name.clone(),
            key,
            source,
        }
    }

    fn io_err(&self, key: &ObjectPath, what: &'static str) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
        let key = key.to_string();
        move |source| StoreError::Io {
            backend: self.name.clone(),
            key,
            what,
            source,
        }
    }

    /// The object cache `key` of `project` is, by its manifest.
    pub fn cache_object(&self, project: &str, key: &str, m: &Manifest) -> Result<String, StoreError> {
        self.data_beside(&self.path(project, &format!("caches/{key}{MANIFEST}")), m)
    }

    /// The object manifest `m` (at `at`) names: beside it, its name the
    /// manifest's own stem and an upload's suffix. A manifest naming
    /// anything else (another directory, another project) is refused.
    fn data_beside(&self, at: &ObjectPath, m: &Manifest) -> Result<String, StoreError> {
        let text = at.to_string();
        let (dir, name) = text.rsplit_once('/').unwrap_or(("", &text));
        let stem = name.strip_suffix(MANIFEST).unwrap_or(name);
        let ok = m
            .data
            .strip_prefix(stem)
            .and_then(|rest| rest.strip_prefix('.'))
            .and_then(|rest| rest.strip_suffix(TAR_ZST))
            .is_some_and(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()));
        if !ok {
            return Err(StoreError::Manifest {
                backend: self.name.clone(),
                key: text.clone(),
                message: format!("it names {:?}, not an object beside it", m.data),
            });
        }
        Ok(format!("{dir}/{}", m.data))
    }

    /// The manifest of cache `key`, if it was saved.
    pub async fn cache_manifest(&self, project: &str, key: &str) -> Result<Option<Manifest>, StoreError> {
        self.manifest(&self.path(project, &format!("caches/{key}{MANIFEST}")))
            .await
    }

    async fn manifest(&self, at: &ObjectPath) -> Result<Option<Manifest>, StoreError> {
        let bytes = match self.backend.get(at).await {
            Ok(r) => r.bytes().await.map_err(self.backend_err(at))?,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.backend_err(at)(e)),
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| StoreError::Manifest {
                backend: self.name.clone(),
                key: at.to_string(),
                message: e.to_string(),
            })
    }

    /// The newest cache of `project` whose key is `key` or, failing that,
    /// starts with it.
    /// Its manifest comes with it, read once.
    pub async fn find_cache(
        &self,
        project: &str,
        key: &str,
    ) -> Result<Option<(String, Manifest)>, StoreError> {
        if let Some(m) = self.cache_manifest(project, key).await? {
            return Ok(Some((key.to_string(), m)));
        }
        let newest = self
            .caches(project, key)
            .await?
            .into_iter()
            .max_by_key(|c| (c.created, c.key.clone()));
        let Some(newest) = newest else {
            return Ok(None);
        };
        Ok(self
            .cache_manifest(project, &newest.key)
            .await?
            .map(|m| (newest.key, m)))
    }

    /// The caches of `project` whose keys start with `prefix`.
    pub async fn caches(&self, project: &str, prefix: &str) -> Result<Vec<CacheEntry>, StoreError> {
        let base = self.path(project, "caches");
        // Listing is by whole segments: list the prefix's directory.
        let dir = match prefix.rfind('/') {
            Some(i) => self.path(project, &format!("caches/{}", &prefix[..i])),
            None => base.clone(),
        };
        let base_text = format!("{base}/");
        let mut out = Vec::new();
        let mut list = self.backend.list(Some(&dir));
        while let Some(meta) = list.try_next().await.map_err(self.backend_err(&dir))? {
            let full = meta.location.to_string();
            let Some(key) = full
                .strip_prefix(&base_text)
                .and_then(|k| k.strip_suffix(MANIFEST))
            else {
                continue;
            };
            if key.starts_with(prefix) {
                out.push(CacheEntry {
                    key: key.to_string(),
                    size: 0,
                    created: meta.last_modified.into(),
                });
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    /// [`Store::caches`] with each one's size, from its manifest.
    pub async fn caches_with_sizes(
        &self,
        project: &str,
        prefix: &str,
    ) -> Result<Vec<CacheEntry>, StoreError> {
        let mut out = self.caches(project, prefix).await?;
        for c in &mut out {
            if let Some(m) = self.cache_manifest(project, &c.key).await? {
                c.size = m.size;
            }
        }
        Ok(out)
    }

    /// Removes cache `key` of `project`: its manifest (from then on it
    /// is not restored), then its object. False when it was not there.
    pub async fn remove_cache(&self, project: &str, key: &str) -> Result<bool, StoreError> {
        let manifest = self.path(project, &format!("caches/{key}{MANIFEST}"));
        let m = match self.manifest(&manifest).await {
            Ok(None) => return Ok(false),
            Ok(Some(m)) => Some(m),
            // An unreadable manifest goes too.
            Err(StoreError::Manifest { .. }) => None,
            Err(e) => return Err(e),
        };
        let data = m.and_then(|m| self.data_beside(&manifest, &m).ok());
        let data = data.and_then(|d| ObjectPath::parse(d).ok());
        for at in std::iter::once(manifest.clone()).chain(data) {
            match self.backend.delete(&at).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(self.backend_err(&at)(e)),
            }
        }
        Ok(true)
    }

    /// A full object path as this store printed it (already encoded).
    fn object(&self, key: &str) -> Result<ObjectPath, StoreError> {
        ObjectPath::parse(key).map_err(|e| StoreError::Manifest {
            backend: self.name.clone(),
            key: key.to_string(),
            message: e.to_string(),
        })
    }

    /// Where cache `key`'s objects are, under its project (for
    /// [`Store::upload`] and [`Store::commit`]).
    pub fn cache_stem(key: &str) -> String {
        format!("caches/{key}")
    }

    /// A new layer of `workflow`'s workspace: layers sort in the order
    /// they were persisted.
    pub fn workspace_stem(workflow: &str, job_id: &str, step: u32) -> String {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        format!("workspaces/{workflow}/{nanos:020}-{job_id}-{step}")
    }

    /// The layers of `workflow`'s workspace, oldest first: (object,
    /// manifest) of each whose manifest is there.
    pub async fn workspace_layers(
        &self,
        project: &str,
        workflow: &str,
    ) -> Result<Vec<(String, Manifest)>, StoreError> {
        let dir = self.path(project, &format!("workspaces/{workflow}"));
        let mut names: Vec<ObjectPath> = self
            .backend
            .list(Some(&dir))
            .try_filter(|m| futures::future::ready(m.location.as_ref().ends_with(MANIFEST)))
            .map_ok(|m| m.location)
            .try_collect()
            .await
            .map_err(self.backend_err(&dir))?;
        names.sort();
        let mut out = Vec::new();
        for at in names {
            let Some(m) = self.manifest(&at).await? else {
                continue;
            };
            out.push((self.data_beside(&at, &m)?, m));
        }
        Ok(out)
    }

    /// Streams what `from` reads to a new object `STEM.ID.tar.zst` of
    /// `project`; its digests and name. Not yet visible to a restore:
    /// see [`Store::commit`].
    pub async fn upload(
        &self,
        project: &str,
        stem: &str,
        from: impl AsyncRead + Unpin,
        progress: &Progress,
    ) -> Result<Uploaded, StoreError> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let at = self.path(project, &format!("{stem}.{nanos}{TAR_ZST}"));
        let mut uploaded = self.upload_to(&at, from, progress).await?;
        uploaded.data = at.filename().unwrap_or_default().to_string();
        Ok(uploaded)
    }

    /// Replaces object `key` (a full object path of this store) with
    /// `bytes`: for tests, and operators repairing by hand.
    pub async fn write(&self, key: &str, bytes: Vec<u8>) -> Result<(), StoreError> {
        let at = self.object(key)?;
        self.backend
            .put(&at, PutPayload::from(bytes))
            .await
            .map(drop)
            .map_err(self.backend_err(&at))
    }

    /// Writes the manifest of `STEM.tar.zst`: from now on it is restored.
    pub async fn commit(
        &self,
        project: &str,
        stem: &str,
        job_id: &str,
        uploaded: Uploaded,
    ) -> Result<Manifest, StoreError> {
        let manifest = Manifest::of(uploaded, job_id);
        let at = self.path(project, &format!("{stem}{MANIFEST}"));
        let json = serde_json::to_vec(&manifest).unwrap_or_default();
        self.backend
            .put(&at, PutPayload::from(json))
            .await
            .map_err(self.backend_err(&at))?;
        Ok(manifest)
    }

    /// As [`Store::commit`], but only when no manifest is there yet: of
    /// two jobs saving one cache key at once, the first to commit wins
    /// and the other's object is deleted (`None`). On a backend without
    /// conditional writes the later commit replaces the earlier (each
    /// manifest names its own whole object, so a restore never mixes them).
    pub async fn commit_once(
        &self,
        project: &str,
        stem: &str,
        job_id: &str,
        uploaded: Uploaded,
    ) -> Result<Option<Manifest>, StoreError> {
        let manifest = Manifest::of(uploaded.clone(), job_id);
        let at = self.path(project, &format!("{stem}{MANIFEST}"));
        let json = serde_json::to_vec(&manifest).unwrap_or_default();
        let opts = object_store::PutOptions::from(object_store::PutMode::Create);
        match self.backend.put_opts(&at, PutPayload::from(json), opts).await {
            Ok(_) => Ok(Some(manifest)),
            Err(object_store::Error::AlreadyExists { .. }) => {
                let data = self.data_beside(&at, &manifest).and_then(|d| self.object(&d))?;
                match self.backend.delete(&data).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(None),
                    Err(e) => Err(self.backend_err(&data)(e)),
                }
            }
            Err(object_store::Error::NotImplemented { .. }) => {
                self.commit(project, stem, job_id, uploaded).await.map(Some)
            }
            Err(e) => Err(self.backend_err(&at)(e)),
        }
    }

    /// Uploads file `rel` of job `job_id`'s artifacts of `project`.
    pub async fn put_artifact(
        &self,
        project: &str,
        job_id: &str,
        rel: &str,
        from: impl AsyncRead + Unpin,
        progress: &Progress,
    ) -> Result<String, StoreError> {
        let at = self.path(project, &format!("artifacts/{job_id}/{rel}"));
        self.upload_to(&at, from, progress).await?;
        Ok(at.to_string())
    }

    /// Streams `from` to `at` in parts, several at once; its digests.
    async fn upload_to(
        &self,
        at: &ObjectPath,
        mut from: impl AsyncRead + Unpin,
        progress: &Progress,
    ) -> Result<Uploaded, StoreError> {
        let upload = self
            .backend
            .put_multipart(at)
            .await
            .map_err(self.backend_err(at))?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_BYTES);
        let mut hash = Sha256::new();
        let mut chunk = Sha256::new();
        let mut chunks = Vec::new();
        let mut size = 0u64;
        loop {
            // Whole 1 MiB blocks, handed over as they are: a part is five
            // of them, each its own mapping (see sys::malloc), not a pile
            // of small blocks freed on other threads. Full blocks until
            // the last, so chunks (4 blocks) end on block boundaries.
            let mut block = vec![0u8; BLOCK_BYTES];
            let n = match fill(&mut from, &mut block).await {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => {
                    let _ = writer.abort().await;
                    return Err(self.io_err(at, "cannot read what to store")(e));
                }
            };
            block.truncate(n);
            hash.update(&block);
            chunk.update(&block);
            size += n as u64;
            if size % CHUNK_BYTES == 0 {
                chunks.push(hex(&std::mem::take(&mut chunk).finalize()));
            }
            progress.add(n as u64);
            if let Err(e) = writer.wait_for_capacity(PARTS_AT_ONCE).await {
                return Err(self.backend_err(at)(e));
            }
            writer.put(bytes::Bytes::from(block));
            if n < BLOCK_BYTES {
                break;
            }
        }
        if size % CHUNK_BYTES != 0 {
            chunks.push(hex(&chunk.finalize()));
        }
        writer.finish().await.map_err(self.backend_err(at))?;
        Ok(Uploaded {
            sha256: hex(&hash.finalize()),
            size,
            chunks,
            data: String::new(),
        })
    }

    /// Streams object `key` (a full object path of this store) into `to`,
    /// several ranges at once, each checked against `manifest` before a
    /// byte of it is written: nothing of a range that differs is used,
    /// and the whole is checked at the end too.
    pub async fn download_verified(
        &self,
        key: &str,
        manifest: &Manifest,
        mut to: impl AsyncWrite + Unpin,
        progress: &Progress,
    ) -> Result<(), StoreError> {
        let at = self.object(key)?;
        let digest_err = |expected: &str, actual: String| StoreError::Digest {
            backend: self.name.clone(),
            key: key.to_string(),
            expected: expected.to_string(),
            actual,
        };
        let size = self.backend.head(&at).await.map_err(self.backend_err(&at))?.size;
        let count = size.div_ceil(CHUNK_BYTES) as usize;
        if size != manifest.size || count != manifest.chunks.len() {
            return Err(digest_err(
                &format!("{} bytes in {} chunks", manifest.size, manifest.chunks.len()),
                format!("{size} bytes"),
            ));
        }
        let ranges = (0..count as u64).map(|i| i * CHUNK_BYTES..((i + 1) * CHUNK_BYTES).min(size));
        let mut parts = futures::stream::iter(ranges)
            .map(|r| {
                let at = at.clone();
                let backend = self.backend.clone();
                async move { backend.get_range(&at, r).await }
            })
            .buffered(RANGES_AT_ONCE);
        let mut hash = Sha256::new();
        let mut i = 0;
        while let Some(part) = parts.next().await {
            let part = part.map_err(self.backend_err(&at))?;
            let actual = hex(&Sha256::digest(&part));
            if actual != manifest.chunks[i] {
                return Err(digest_err(
                    &manifest.chunks[i],
                    format!("{actual} (bytes {} on)", i as u64 * CHUNK_BYTES),
                ));
            }
            hash.update(&part);
            progress.add(part.len() as u64);
            to.write_all(&part)
                .await
                .map_err(self.io_err(&at, "cannot pass on the download"))?;
            i += 1;
        }
        to.flush()
            .await
            .map_err(self.io_err(&at, "cannot pass on the download"))?;
        let actual = hex(&hash.finalize());
        if actual != manifest.sha256 {
            return Err(digest_err(&manifest.sha256, actual));
        }
        Ok(())
    }

    /// The whole of object `key` (a full object path of this store), in
    /// memory: for small objects (manifests, a test's look).
    pub async fn read(&self, key: &str) -> Result<Vec<u8>, StoreError> {
        let at = self.object(key)?;
        let r = self.backend.get(&at).await.map_err(self.backend_err(&at))?;
        Ok(r.bytes().await.map_err(self.backend_err(&at))?.to_vec())
    }

    /// Removes the caches older than `cache_max_age` and the artifacts
    /// and workspace layers older than `artifact_max_age`, of every
    /// project. How many objects were removed.
    pub async fn sweep(
        &self,
        cache_max_age: Duration,
        artifact_max_age: Duration,
    ) -> Result<usize, StoreError> {
        let root = ObjectPath::parse(&self.prefix).unwrap_or_default();
        let now = SystemTime::now();
        let expired: Vec<ObjectPath> = self
            .backend
            .list(if self.prefix.is_empty() { None } else { Some(&root) })
            .try_filter(|m| {
                let rel = m
                    .location
                    .as_ref()
                    .strip_prefix(self.prefix.as_str())
                    .unwrap_or(m.location.as_ref())
                    .trim_start_matches('/');
                let area = rel.split('/').nth(1).unwrap_or("");
                let max = match area {
                    "caches" => Some(cache_max_age),
                    "artifacts" | "workspaces" => Some(artifact_max_age),
                    _ => None,
                };
                let modified: SystemTime = m.last_modified.into();
                let old = max.is_some_and(|max| now.duration_since(modified).is_ok_and(|age| age > max));
                futures::future::ready(old)
            })
            .map_ok(|m| m.location)
            .try_collect()
            .await
            .map_err(self.backend_err(&root))?;
        let mut removed = 0;
        for at in expired {
            match self.backend.delete(&at).await {
                Ok(()) => removed += 1,
                Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(self.backend_err(&at)(e)),
            }
        }
        Ok(removed)
    }
}

/// Reads into `block` until it is full or `from` ends: how much it read.
async fn fill(from: &mut (impl AsyncRead + Unpin), block: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < block.len() {
        match from.read(&mut block[n..]).await? {
            0 => break,
            m => n += m,
        }
    }
    Ok(n)
}

/// The `[default]` keys (and those before any section) of an INI file.
fn read_credentials(path: &Path) -> Result<Vec<(String, String)>, StoreError> {
    let err = |message: String| StoreError::Credentials {
        path: path.to_path_buf(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let mut section = String::from("default");
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.trim().to_string();
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            return Err(err(format!(
                "line {}: not KEY = VALUE (the file is INI: [default], aws_access_key_id = ..., \
                 aws_secret_access_key = ...)",
                n + 1
            )));
        };
        if section == "default" {
            out.push((k.trim().to_lowercase(), v.trim().trim_matches('"').to_string()));
        }
    }
    if out.is_empty() {
        return Err(err("no keys in its [default] section".into()));
    }
    Ok(out)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_the_default_section_of_an_ini_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c");
        std::fs::write(
            &p,
            "# garage\n[default]\naws_access_key_id = GK1\naws_secret_access_key=\"s\"\n[other]\naws_access_key_id = no\n",
        )
        .unwrap();
        assert_eq!(
            read_credentials(&p).unwrap(),
            vec![
                ("aws_access_key_id".to_string(), "GK1".to_string()),
                ("aws_secret_access_key".to_string(), "s".to_string())
            ]
        );
        std::fs::write(&p, "garbage\n").unwrap();
        let e = read_credentials(&p).unwrap_err().to_string();
        assert!(e.contains("line 1: not KEY = VALUE"), "{e}");
    }

    #[tokio::test]
    async fn caches_round_trip_on_the_file_backend_and_a_bad_digest_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&StoreSettings {
            url: format!("file://{}", dir.path().display()),
            endpoint: None,
            region: None,
            credentials_file: None,
            allow_http: false,
        })
        .unwrap();
        let p = Progress::default();
        let data = vec![7u8; 20 << 20];
        for (key, data) in [("v1-deps-a", &data[..]), ("v1-deps-b", &b"x"[..])] {
            let stem = Store::cache_stem(key);
            let uploaded = store.upload("proj", &stem, data, &p).await.unwrap();
            store.commit("proj", &stem, "j1", uploaded).await.unwrap();
        }
        assert_eq!(
            store
                .find_cache("proj", "v1-deps-a")
                .await
                .unwrap()
                .map(|(k, m)| (k, m.size)),
            Some(("v1-deps-a".to_string(), 20 << 20))
        );
        assert!(store.find_cache("proj", "v1-deps-").await.unwrap().is_some());
        assert_eq!(store.find_cache("other", "v1-deps-").await.unwrap(), None);
        let m = store.cache_manifest("proj", "v1-deps-a").await.unwrap().unwrap();
        assert_eq!(m.size, 20 << 20);
        let out = dir.path().join("out");
        let mut f = tokio::fs::File::create(&out).await.unwrap();
        let key = store.cache_object("proj", "v1-deps-a", &m).unwrap();
        let mut forged = m.clone();
        forged.data = "../../other/caches/x.1.tar.zst".into();
        let e = store
            .cache_object("proj", "v1-deps-a", &forged)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not an object beside it"), "{e}");
        store.download_verified(&key, &m, &mut f, &p).await.unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), data);
        std::fs::write(dir.path().join(&key), b"corrupt").unwrap();
        let mut f = tokio::fs::File::create(&out).await.unwrap();
        let e = store
            .download_verified(&key, &m, &mut f, &p)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("corrupted or replaced"), "{e}");
        assert!(store.remove_cache("proj", "v1-deps-a").await.unwrap());
        assert_eq!(store.cache_manifest("proj", "v1-deps-a").await.unwrap(), None);
    }
}
