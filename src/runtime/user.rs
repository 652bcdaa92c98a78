//! The user steps run as: from the image's config (`User`: "name",
//! "uid", "name:group", "uid:gid"), resolved against the image's own
//! `/etc/passwd` and `/etc/group`. Root when the image does not say.

use std::path::Path;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub uid: u32,
    pub gid: u32,
    pub home: String,
}

impl User {
    pub fn root() -> User {
        User {
            uid: 0,
            gid: 0,
            home: "/root".to_string(),
        }
    }
}

/// `(name, id, gid, home)` of each line of a passwd-style file.
fn entries(rootfs: &Path, file: &str) -> Vec<(String, u32, u32, String)> {
    let text = std::fs::read_to_string(rootfs.join(file)).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            let id = f.get(2)?.parse().ok()?;
            let gid = f.get(3).and_then(|g| g.parse().ok()).unwrap_or(id);
            let home = f.get(5).map(|h| h.to_string()).unwrap_or_default();
            Some((f[0].to_string(), id, gid, home))
        })
        .collect()
}

/// Resolves `spec` in the image mounted at `rootfs`.
pub fn resolve(rootfs: &Path, spec: &str) -> Result<User, String> {
    let spec = spec.trim();
    if spec.is_empty() {
        return Ok(User::root());
    }
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let passwd = entries(rootfs, "etc/passwd");
    let found = passwd
        .iter()
        .find(|(name, id, ..)| name == user || id.to_string() == user);
    let (uid, mut gid, home) = match (found, user.parse::<u32>()) {
        (Some((_, uid, gid, home)), _) => (*uid, *gid, home.clone()),
        (None, Ok(uid)) => (uid, uid, "/".to_string()),
        (None, Err(_)) => return Err(format!("user {user:?} is not in the image's /etc/passwd")),
    };
    if let Some(g) = group {
        gid = match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => entries(rootfs, "etc/group")
                .iter()
                .find(|(name, ..)| name == g)
                .map(|(_, id, ..)| *id)
                .ok_or_else(|| format!("group {g:?} is not in the image's /etc/group"))?,
        };
    }
    let home = if home.is_empty() { "/".to_string() } else { home };
    Ok(User { uid, gid, home })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_ids_and_groups() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("etc")).unwrap();
        std::fs::write(
            root.path().join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\nbuilder:x:1000:1001::/home/builder:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(root.path().join("etc/group"), "root:x:0:\nstaff:x:50:\n").unwrap();
        let r = |s| resolve(root.path(), s);
        assert_eq!(r("").unwrap(), User::root());
        assert_eq!(
            r("builder").unwrap(),
            User {
                uid: 1000,
                gid: 1001,
                home: "/home/builder".into()
            }
        );
        assert_eq!(r("1000").unwrap().home, "/home/builder");
        assert_eq!(r("builder:staff").unwrap().gid, 50);
        assert_eq!(
            r("4242:4343").unwrap(),
            User {
                uid: 4242,
                gid: 4343,
                home: "/".into()
            }
        );
        assert!(r("nobody-here").unwrap_err().contains("/etc/passwd"));
        assert!(r("builder:nogroup").unwrap_err().contains("/etc/group"));
    }
}
