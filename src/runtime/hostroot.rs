//! What the `host` image shows of the host: its software, not its data.
//!
//! The container's root is a fresh directory tree of its own (the links
//! and empty directories of [`HostView`]) with an overlay at each directory
//! of an allow-list — `/usr`, `/bin`, `/sbin`, every `/lib*`, `/etc`, `/opt`
//! — whose lower layer is the host's directory: a step may write into its
//! own copy, the host's stays as it is. Nothing else of the host is there:
//! `/root`, `/home`, `/var`, `/srv`, `/mnt`, `/run` and `/tmp` are empty and
//! the job's own. In `/etc`, files that hold secrets are whited out (they do
//! not exist in the container): a fixed list of what Debian and common
//! services keep there, and everything the host has made unreadable to
//! other users (a directory: all of it), which is how secrets are kept on
//! a Unix host; root in the container would read them anyway.

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Component, Path, PathBuf};

use nix::mount::MsFlags;
use nix::sys::stat::{Mode, SFlag};

/// Host directories shown (with every `/lib*` the host has), each as the
/// host has it: a directory becomes an overlay over the host's, a link
/// (`/bin -> usr/bin` on a merged-/usr system) stays the same link.
const SHOWN: &[&str] = &["usr", "bin", "sbin", "etc", "opt"];

/// Directories of the container's own, empty, with their modes: where
/// the host keeps data, and the mount points of the runtime.
const EMPTY: &[(&str, u32)] = &[
    ("root", 0o700),
    ("home", 0o755),
    ("var", 0o755),
    ("var/tmp", 0o1777),
    ("srv", 0o755),
    ("mnt", 0o755),
    ("run", 0o755),
    ("tmp", 0o1777),
    ("proc", 0o555),
    ("sys", 0o555),
    ("dev", 0o755),
    ("workspace", 0o755),
];

/// Debian's links from `/var` into `/run`.
const LINKS: &[(&str, &str)] = &[("var/run", "/run"), ("var/lock", "/run/lock")];

/// Under `/etc`, hidden whatever their mode: secrets of Debian (password
/// hashes, sudo rules, host keys, TLS keys), of runnel (its tokens and
/// keys), and of services that keep credentials in `/etc`. `*` matches
/// within one name.
pub const ETC_SECRETS: &[&str] = &[
    "shadow",
    "shadow-",
    "gshadow",
    "gshadow-",
    "security/opasswd",
    "sudoers",
    "sudoers.d",
    "ssh/*_key",
    "ssl/private",
    "runnel",
    "krb5.keytab",
    "ipsec.secrets",
    "ipsec.d/private",
    "ppp/chap-secrets",
    "ppp/pap-secrets",
    "wireguard",
    "openvpn",
    "NetworkManager/system-connections",
    "wpa_supplicant/wpa_supplicant.conf",
    "letsencrypt",
    "credstore",
    "credstore.encrypted",
    "apt/auth.conf",
    "apt/auth.conf.d",
    "mysql/debian.cnf",
    "ldap.secret",
    "pam_ldap.secret",
    "libnss-ldap.secret",
    "postfix/sasl_passwd",
    "postfix/sasl_passwd.db",
    "exim4/passwd.client",
    "docker/key.json",
    "docker/certs.d",
    "containers/auth.json",
    "gitlab-runner",
    "buildkite-agent",
];

/// What of a host the `host` image shows, read from its root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostView {
    /// Top-level links, as the host has them: (name, target).
    pub links: Vec<(String, PathBuf)>,
    /// Top-level directories shown through an overlay.
    pub dirs: Vec<String>,
    /// Paths relative to `/etc` that are whited out; none is below another.
    pub hidden: Vec<PathBuf>,
}

impl HostView {
    /// Reads `root` (the host's `/`; another directory in tests). `private`
    /// are the agent's own secret paths, hidden too where they are in
    /// `/etc`.
    pub fn scan(root: &Path, private: &[PathBuf]) -> io::Result<HostView> {
        let mut names: Vec<String> = SHOWN.iter().map(|s| s.to_string()).collect();
        for entry in fs::read_dir(root)? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if name.starts_with("lib") && !names.contains(&name) {
                names.push(name);
            }
        }
        let (mut links, mut dirs) = (Vec::new(), Vec::new());
        for name in names {
            match fs::symlink_metadata(root.join(&name)) {
                Ok(m) if m.file_type().is_symlink() => {
                    links.push((name.clone(), fs::read_link(root.join(&name))?))
                }
                Ok(m) if m.is_dir() => dirs.push(name),
                // Missing, or not a directory: not shown.
                _ => {}
            }
        }
        links.sort();
        dirs.sort();
        let etc = root.join("etc");
        let mut hidden = BTreeSet::new();
        if dirs.iter().any(|d| d == "etc") {
            for pattern in ETC_SECRETS {
                hidden.extend(matching(&etc, Path::new(pattern))?);
            }
            unreadable(&etc, Path::new(""), &mut hidden)?;
            for p in private {
                // The agent's paths are absolute host paths.
                if let Ok(rel) = p.strip_prefix("/etc")
                    && let Some(rel) = plain(rel)
                    && exists_below(&etc, &rel)
                {
                    hidden.insert(rel);
                }
            }
        }
        // A whiteout hides everything below it.
        let mut out: Vec<PathBuf> = Vec::new();
        for p in hidden {
            if !out.iter().any(|h| p.starts_with(h)) {
                out.push(p);
            }
        }
        Ok(HostView {
            links,
            dirs,
            hidden: out,
        })
    }

    /// Makes the container's tree at `skeleton`: the empty directories, the
    /// links, and a mount point for each shown directory.
    /// The job's own empty directories belong to `owner` (the job's root
    /// as the host sees it, in a user namespace; host root when `None`).
    pub fn write_skeleton(&self, skeleton: &Path, owner: Option<(u32, u32)>) -> io::Result<()> {
        fs::create_dir_all(skeleton)?;
        for (name, mode) in EMPTY {
            let p = skeleton.join(name);
            fs::create_dir(&p)?;
            fs::set_permissions(&p, fs::Permissions::from_mode(*mode))?;
            if let Some((uid, gid)) = owner {
                std::os::unix::fs::chown(&p, Some(uid), Some(gid))?;
            }
        }
        for d in &self.dirs {
            fs::create_dir(skeleton.join(d))?;
        }
        for (name, target) in LINKS {
            symlink(target, skeleton.join(name))?;
        }
        for (name, target) in &self.links {
            symlink(target, skeleton.join(name))?;
        }
        Ok(())
    }

    /// Makes the layer that hides [`HostView::hidden`] at `layer`: an
    /// overlay whiteout (a 0/0 character device) for each.
    pub fn write_hiding_layer(&self, layer: &Path) -> io::Result<()> {
        fs::create_dir_all(layer)?;
        for rel in &self.hidden {
            let p = layer.join(rel);
            if let Some(parent) = p.parent() {
                fs::create_dir_all(parent)?;
            }
            nix::sys::stat::mknod(&p, SFlag::S_IFCHR, Mode::empty(), 0).map_err(io::Error::from)?;
        }
        Ok(())
    }

    /// Mounts each shown directory of the host at `rootfs`, as an overlay
    /// whose upper and work directories are made under `layers`;
    /// `/etc` with `hiding` (see [`HostView::write_hiding_layer`]) above
    /// the host's.
    pub fn mount(&self, host: &Path, rootfs: &Path, layers: &Path, hiding: &Path) -> io::Result<()> {
        for d in &self.dirs {
            let (upper, work) = (layers.join(d).join("upper"), layers.join(d).join("work"));
            fs::create_dir_all(&upper)?;
            fs::create_dir_all(&work)?;
            let theirs = host.join(d);
            let mut lower = vec![theirs.as_path()];
            if d == "etc" {
                lower.insert(0, hiding);
            }
            crate::sys::mount::mount_overlay_with(
                &rootfs.join(d),
                &lower,
                &upper,
                &work,
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            )
            .map_err(|e| io::Error::other(format!("cannot show the host's /{d}: {e}")))?;
        }
        Ok(())
    }
}

/// `path` as plain names (no `..`, no root), or `None`.
fn plain(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            _ => return None,
        }
    }
    (!out.as_os_str().is_empty()).then_some(out)
}

/// Whether `rel` exists below `dir` with every directory on the way a
/// real directory (a whiteout below a link would turn the link into a
/// directory of the overlay's).
fn exists_below(dir: &Path, rel: &Path) -> bool {
    let mut p = dir.to_path_buf();
    let names: Vec<_> = rel.components().collect();
    for (i, c) in names.iter().enumerate() {
        p.push(c);
        match fs::symlink_metadata(&p) {
            Ok(m) if i + 1 == names.len() || m.is_dir() => {}
            _ => return false,
        }
    }
    true
}

/// The paths below `dir` that `pattern` (relative; `*` within a name)
/// names and that exist.
fn matching(dir: &Path, pattern: &Path) -> io::Result<Vec<PathBuf>> {
    let mut found = vec![PathBuf::new()];
    for part in pattern.components() {
        let part = part.as_os_str().to_string_lossy();
        let mut next = Vec::new();
        for rel in found {
            if !part.contains('*') {
                next.push(rel.join(&*part));
                continue;
            }
            let Ok(entries) = fs::read_dir(dir.join(&rel)) else {
                continue;
            };
            for e in entries {
                let name = e?.file_name().to_string_lossy().into_owned();
                if glob_match(&part, &name) {
                    next.push(rel.join(name));
                }
            }
        }
        found = next;
    }
    Ok(found.into_iter().filter(|rel| exists_below(dir, rel)).collect())
}

/// `*` matches any run of characters; nothing else is special.
fn glob_match(pattern: &str, name: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == name,
        Some((head, rest)) => {
            let Some(tail) = name.strip_prefix(head) else {
                return false;
            };
            (0..=tail.len()).any(|i| tail.is_char_boundary(i) && glob_match(rest, &tail[i..]))
        }
    }
}

/// Adds what below `dir/rel` other users may not read (a file) or list
/// and enter (a directory), without following links.
fn unreadable(dir: &Path, rel: &Path, out: &mut BTreeSet<PathBuf>) -> io::Result<()> {
    let entries = match fs::read_dir(dir.join(rel)) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_symlink() {
            continue;
        }
        let mode = entry.metadata()?.permissions().mode();
        let rel = rel.join(entry.file_name());
        if kind.is_dir() {
            if mode & 0o005 != 0o005 {
                out.insert(rel);
            } else {
                unreadable(dir, &rel, out)?;
            }
        } else if mode & 0o004 == 0 {
            out.insert(rel);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(p: &Path, mode: u32) {
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, "x").unwrap();
        fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn globs() {
        assert!(glob_match("*_key", "ssh_host_rsa_key"));
        assert!(!glob_match("*_key", "ssh_host_rsa_key.pub"));
        assert!(glob_match("a*b*c", "aXbYc"));
        assert!(glob_match("shadow", "shadow") && !glob_match("shadow", "shadow-"));
    }

    #[test]
    fn the_view_keeps_links_shows_lib_dirs_and_hides_secrets() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        for dir in ["usr/bin", "usr/lib", "lib32", "opt", "home/me", "var/lib"] {
            fs::create_dir_all(root.join(dir)).unwrap();
        }
        symlink("usr/bin", root.join("bin")).unwrap();
        symlink("usr/lib", root.join("lib")).unwrap();
        let etc = root.join("etc");
        file(&etc.join("passwd"), 0o644);
        file(&etc.join("shadow"), 0o640);
        file(&etc.join("sudoers"), 0o440);
        file(&etc.join("ssh/ssh_host_ed25519_key"), 0o600);
        file(&etc.join("ssh/ssh_host_ed25519_key.pub"), 0o644);
        // World-readable, but on the list: hidden anyway.
        file(&etc.join("apt/auth.conf"), 0o644);
        file(&etc.join("apt/sources.list"), 0o644);
        // Made unreadable by its owner: hidden, and so is all of a
        // directory others may not enter.
        file(&etc.join("app/token"), 0o600);
        file(&etc.join("ssl/private/k.pem"), 0o600);
        fs::set_permissions(etc.join("ssl/private"), fs::Permissions::from_mode(0o710)).unwrap();
        file(&etc.join("ssl/certs/ca.pem"), 0o644);
        file(&etc.join("runnel/agent.toml"), 0o644);
        file(&etc.join("other/agent.toml"), 0o644);
        // A listed name below a link is not whited out (the link would
        // become a directory).
        fs::create_dir_all(root.join("elsewhere")).unwrap();
        file(&root.join("elsewhere/sasl_passwd"), 0o644);
        symlink("../elsewhere", etc.join("postfix")).unwrap();

        let view = HostView::scan(root, &[PathBuf::from("/etc/other/agent.toml")]).unwrap();
        assert_eq!(
            view.links,
            vec![("bin".into(), "usr/bin".into()), ("lib".into(), "usr/lib".into())]
        );
        assert_eq!(view.dirs, vec!["etc", "lib32", "opt", "usr"]);
        let hidden: Vec<String> = view.hidden.iter().map(|p| p.display().to_string()).collect();
        assert_eq!(
            hidden,
            vec![
                "app/token",
                "apt/auth.conf",
                "other/agent.toml",
                "runnel",
                "shadow",
                "ssh/ssh_host_ed25519_key",
                "ssl/private",
                "sudoers",
            ]
        );
    }

    #[test]
    fn the_skeleton_has_empty_data_directories_and_the_hosts_links() {
        let d = tempfile::tempdir().unwrap();
        let view = HostView {
            links: vec![("bin".into(), "usr/bin".into())],
            dirs: vec!["usr".into(), "etc".into()],
            hidden: vec![],
        };
        let s = d.path().join("s");
        view.write_skeleton(&s, None).unwrap();
        assert_eq!(fs::read_link(s.join("bin")).unwrap(), Path::new("usr/bin"));
        assert_eq!(fs::read_link(s.join("var/run")).unwrap(), Path::new("/run"));
        let mode = |p: &str| fs::metadata(s.join(p)).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode("var/tmp"), 0o1777);
        assert_eq!(mode("root"), 0o700);
        for empty in ["home", "srv", "mnt", "run", "usr", "etc"] {
            assert_eq!(fs::read_dir(s.join(empty)).unwrap().count(), 0, "{empty}");
        }
    }
}
