//! Test images, made at test time: an OCI image layout written from
//! Debian's busybox-static, and a real registry (Debian's docker-registry)
//! on a free loopback port that `skopeo` pushes the layout to.

use std::io::Write;
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::sshd::sh;
use super::{Need, expect, wait_for};

/// One entry of a layer.
pub enum Entry {
    File(&'static str, Vec<u8>, u32),
    Dir(&'static str),
    Symlink(String, String),
    /// Deletes `path` of a lower layer.
    Whiteout(&'static str),
    /// Hides what lower layers hold in the directory `path`.
    Opaque(&'static str),
    /// A hard link at `.0` to `.1`.
    HardLink(String, String),
    /// An entry written as is, with no check of its names: what a hostile
    /// layer holds (`../`, absolute names, entries through a symlink).
    Raw {
        path: String,
        kind: tar::EntryType,
        link: Option<String>,
        data: Vec<u8>,
    },
}

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy)]
pub enum Compression {
    Gzip,
    Zstd,
}

/// A layer holding busybox, its applets as symlinks, a passwd with root and
/// `builder` (1000:1000), and empty /tmp, /root, /home/builder.
pub fn busybox_layer() -> Vec<Entry> {
    expect(Need::Busybox);
    let mut e = vec![
        Entry::Dir("bin"),
        Entry::Dir("etc"),
        Entry::Dir("tmp"),
        Entry::Dir("root"),
        Entry::Dir("home"),
        Entry::Dir("home/builder"),
        Entry::Dir("usr"),
        Entry::Dir("usr/bin"),
        Entry::File(
            "bin/busybox",
            std::fs::read("/bin/busybox").expect("busybox-static (scripts/setup)"),
            0o755,
        ),
        Entry::File(
            "etc/passwd",
            b"root:x:0:0:root:/root:/bin/sh\nbuilder:x:1000:1000:builder:/home/builder:/bin/sh\n".to_vec(),
            0o644,
        ),
        Entry::File("etc/group", b"root:x:0:\nbuilder:x:1000:\n".to_vec(), 0o644),
        Entry::File("etc/image-release", b"runnel test image\n".to_vec(), 0o644),
    ];
    for applet in [
        "sh",
        "ls",
        "cat",
        "echo",
        "id",
        "ps",
        "kill",
        "touch",
        "mkdir",
        "sleep",
        "head",
        "tail",
        "tr",
        "wc",
        "env",
        "grep",
        "sed",
        "seq",
        "printf",
        "test",
        "true",
        "false",
        "rm",
        "uname",
        "hostname",
        "stat",
        "dd",
        "find",
        "sort",
        "xargs",
        "sha256sum",
        "mount",
        "cut",
        "awk",
        "nc",
        "ip",
    ] {
        e.push(Entry::Symlink(format!("bin/{applet}"), "busybox".into()));
    }
    e
}

/// Copies `value` into a header field as is (the tar crate's setters
/// refuse names that climb out or are absolute).
fn raw_field(field: &mut [u8], value: &str) {
    assert!(
        value.len() < field.len(),
        "{value:?} is too long for a plain tar header"
    );
    field.fill(0);
    field[..value.len()].copy_from_slice(value.as_bytes());
}

/// The layer blob of `entries` and its diff id.
fn layer_blob(entries: &[Entry], compression: Compression) -> (Vec<u8>, String) {
    let mut tar = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_gnu();
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        match e {
            Entry::File(path, data, mode) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                h.set_size(data.len() as u64);
                tar.append_data(&mut h, path, data.as_slice()).unwrap();
            }
            Entry::Dir(path) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(if *path == "tmp" { 0o1777 } else { 0o755 });
                h.set_size(0);
                tar.append_data(&mut h, path, &[][..]).unwrap();
            }
            Entry::Symlink(path, target) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_size(0);
                tar.append_link(&mut h, path, target).unwrap();
            }
            Entry::Whiteout(path) => {
                let p = Path::new(path);
                let name = format!(".wh.{}", p.file_name().unwrap().to_str().unwrap());
                let wh = p.parent().unwrap().join(name);
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(0o644);
                h.set_size(0);
                tar.append_data(&mut h, wh, &[][..]).unwrap();
            }
            Entry::Opaque(dir) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(0o644);
                h.set_size(0);
                tar.append_data(&mut h, Path::new(dir).join(".wh..wh..opq"), &[][..])
                    .unwrap();
            }
            Entry::HardLink(path, target) => {
                h.set_entry_type(tar::EntryType::Link);
                h.set_mode(0o644);
                h.set_size(0);
                tar.append_link(&mut h, path, target).unwrap();
            }
            Entry::Raw {
                path,
                kind,
                link,
                data,
            } => {
                h.set_entry_type(*kind);
                h.set_mode(0o644);
                h.set_size(data.len() as u64);
                raw_field(&mut h.as_old_mut().name, path);
                if let Some(link) = link {
                    raw_field(&mut h.as_old_mut().linkname, link);
                }
                h.set_cksum();
                tar.append(&h, data.as_slice()).unwrap();
            }
        }
    }
    let raw = tar.into_inner().unwrap();
    let diff_id = format!("sha256:{:x}", Sha256::digest(&raw));
    let blob = match compression {
        Compression::Gzip => {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            gz.write_all(&raw).unwrap();
            gz.finish().unwrap()
        }
        Compression::Zstd => zstd::encode_all(raw.as_slice(), 3).unwrap(),
    };
    (blob, diff_id)
}

fn put_blob(layout: &Path, bytes: &[u8]) -> (String, usize) {
    let hex = format!("{:x}", Sha256::digest(bytes));
    std::fs::write(layout.join("blobs/sha256").join(&hex), bytes).unwrap();
    (format!("sha256:{hex}"), bytes.len())
}

/// Writes an OCI image layout at `layout` with one image tagged `tag`.
/// Returns the layer digests (bottom first).
pub fn write_layout(
    layout: &Path,
    tag: &str,
    layers: &[Vec<Entry>],
    env: &[&str],
    user: &str,
) -> Vec<String> {
    let layers: Vec<_> = layers.iter().map(|l| (l.as_slice(), Compression::Gzip)).collect();
    write_layout_compressed(layout, tag, &layers, env, user)
}

/// [`write_layout`] with each layer compressed as it says.
pub fn write_layout_compressed(
    layout: &Path,
    tag: &str,
    layers: &[(&[Entry], Compression)],
    env: &[&str],
    user: &str,
) -> Vec<String> {
    write_layout_in(layout, tag, layers, env, user, "/")
}

/// [`write_layout_compressed`] with the image's `WorkingDir`.
pub fn write_layout_in(
    layout: &Path,
    tag: &str,
    layers: &[(&[Entry], Compression)],
    env: &[&str],
    user: &str,
    working_dir: &str,
) -> Vec<String> {
    std::fs::create_dir_all(layout.join("blobs/sha256")).unwrap();
    std::fs::write(layout.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let mut descs = Vec::new();
    let mut diff_ids = Vec::new();
    for (entries, compression) in layers {
        let (blob, diff_id) = layer_blob(entries, *compression);
        let (digest, size) = put_blob(layout, &blob);
        let media_type = match compression {
            Compression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            Compression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
        };
        descs.push(serde_json::json!({
            "mediaType": media_type, "digest": digest, "size": size
        }));
        diff_ids.push(diff_id);
    }
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": { "Env": env, "User": user, "WorkingDir": working_dir },
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
    });
    let (config_digest, config_size) = put_blob(layout, config.to_string().as_bytes());
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_size },
        "layers": descs,
    });
    let (manifest_digest, manifest_size) = put_blob(layout, manifest.to_string().as_bytes());
    let index_path = layout.join("index.json");
    let mut index: serde_json::Value = std::fs::read(&index_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_else(|| serde_json::json!({"schemaVersion": 2, "manifests": []}));
    index["manifests"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest, "size": manifest_size,
            "annotations": { "org.opencontainers.image.ref.name": tag },
        }));
    std::fs::write(&index_path, index.to_string()).unwrap();
    descs
        .iter()
        .map(|d| d["digest"].as_str().unwrap().to_string())
        .collect()
}

/// Debian's docker-registry on a free loopback port.
pub struct Registry {
    pub addr: String,
    dir: tempfile::TempDir,
    child: Child,
}

impl Registry {
    pub fn start() -> Registry {
        expect(Need::Registry);
        let dir = tempfile::Builder::new()
            .prefix("runnel-registry.")
            .tempdir()
            .unwrap();
        let port = super::free_port();
        let addr = format!("127.0.0.1:{port}");
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
                dir.path().join("data").display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
        let child = Command::new("/usr/bin/docker-registry")
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start docker-registry (scripts/setup installs it)");
        wait_for("the registry to listen", Duration::from_secs(20), || {
            TcpStream::connect(&addr).is_ok()
        });
        Registry { addr, dir, child }
    }

    /// Pushes the layout's `tag` as `name:tag`; returns the reference.
    pub fn push(&self, layout: &Path, tag: &str, name: &str) -> String {
        let reference = format!("{}/{name}:{tag}", self.addr);
        sh(Command::new("skopeo")
            .args(["--insecure-policy", "copy", "-q", "--dest-tls-verify=false"])
            .arg(format!("oci:{}:{tag}", layout.display()))
            .arg(format!("docker://{reference}")));
        reference
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
