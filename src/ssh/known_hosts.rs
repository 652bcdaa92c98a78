//! Pinned host keys. Lines are parsed by the `ssh-key` crate; matching is
//! ours, because libssh2's is laxer than OpenSSH's (a portless entry matches
//! any port, `@revoked` is ignored, key types are not compared). Ours is
//! OpenSSH's: the name looked up is `host` on port 22 and `[host]:port`
//! otherwise; patterns may use `*`, `?` and `!`; hashed `|1|` names are
//! HMAC-SHA1 of that name; `@revoked` refuses a key; `@cert-authority` is
//! refused up front (runnel does not verify host certificates).

use base64::Engine;
use hmac::{Hmac, Mac};
use ssh_key::known_hosts::{Entry, HostPatterns, Marker};
use ssh_key::{HashAlg, PublicKey};

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("ssh.known_hosts[{index}]: {reason}")]
pub struct KnownHostsError {
    pub index: usize,
    pub reason: String,
}

#[derive(Debug, Clone, Default)]
pub struct KnownHosts {
    entries: Vec<Entry>,
    lines: Vec<String>,
}

/// The outcome of checking a presented host key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostKeyCheck {
    Pinned,
    /// No entry names this host.
    NotPinned,
    /// Entries name the host, with other keys (their types given).
    Mismatch {
        pinned: Vec<String>,
    },
    /// The key is listed as `@revoked`.
    Revoked,
}

impl KnownHosts {
    /// Parses known_hosts lines. Blank lines and comments are allowed.
    pub fn parse(lines: &[String]) -> Result<KnownHosts, KnownHostsError> {
        let mut out = KnownHosts::default();
        for (index, line) in lines.iter().enumerate() {
            let trimmed = line.split('#').next().unwrap_or("").trim();
            if trimmed.is_empty() {
                continue;
            }
            let fail = |reason: String| KnownHostsError { index, reason };
            let entry: Entry = trimmed
                .parse()
                .map_err(|e| fail(format!("not a known_hosts line (\"host keytype base64\"): {e}")))?;
            if entry.marker() == Some(&Marker::CertAuthority) {
                return Err(fail(
                    "@cert-authority lines are not supported; pin the host's own keys \
                     (`runnel keyscan HOST[:PORT]` prints them)"
                        .into(),
                ));
            }
            out.entries.push(entry);
            out.lines.push(trimmed.to_string());
        }
        Ok(out)
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The pinned lines, as a known_hosts file for OpenSSH.
    pub fn file_text(&self) -> String {
        let mut s = self.lines.join("\n");
        if !s.is_empty() {
            s.push('\n');
        }
        s
    }

    /// Checks the raw key blob a server presented for `host` on `port`.
    pub fn check(&self, host: &str, port: u16, key_blob: &[u8]) -> HostKeyCheck {
        let name = lookup_name(host, port);
        let presented = PublicKey::from_bytes(key_blob).ok();
        let same = |e: &Entry| {
            presented
                .as_ref()
                .is_some_and(|p| p.key_data() == e.public_key().key_data())
        };
        let for_host: Vec<&Entry> = self
            .entries
            .iter()
            .filter(|e| host_matches(e.host_patterns(), &name))
            .collect();
        if for_host
            .iter()
            .any(|e| e.marker() == Some(&Marker::Revoked) && same(e))
        {
            return HostKeyCheck::Revoked;
        }
        let pinned: Vec<&&Entry> = for_host.iter().filter(|e| e.marker().is_none()).collect();
        if pinned.iter().any(|e| same(e)) {
            HostKeyCheck::Pinned
        } else if pinned.is_empty() {
            HostKeyCheck::NotPinned
        } else {
            let mut types: Vec<String> = pinned
                .iter()
                .map(|e| e.public_key().algorithm().as_str().to_string())
                .collect();
            types.dedup();
            HostKeyCheck::Mismatch { pinned: types }
        }
    }
}

/// The name OpenSSH looks up: `host`, or `[host]:port` off port 22.
pub fn lookup_name(host: &str, port: u16) -> String {
    if port == 22 {
        host.to_string()
    } else {
        format!("[{host}]:{port}")
    }
}

/// A known_hosts line for a key blob, commented with its fingerprint.
pub fn line_for(host: &str, port: u16, key_blob: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(key_blob);
    match PublicKey::from_bytes(key_blob) {
        Ok(k) => format!(
            "{} {} {b64} # {}",
            lookup_name(host, port),
            k.algorithm().as_str(),
            k.fingerprint(HashAlg::Sha256)
        ),
        Err(_) => format!("{} unknown {b64}", lookup_name(host, port)),
    }
}

/// "ssh-ed25519 SHA256:..." for a key blob, as people compare them.
pub fn describe(key_blob: &[u8]) -> String {
    match PublicKey::from_bytes(key_blob) {
        Ok(k) => format!("{} {}", k.algorithm().as_str(), k.fingerprint(HashAlg::Sha256)),
        Err(_) => "an unparseable key".to_string(),
    }
}

fn host_matches(patterns: &HostPatterns, name: &str) -> bool {
    match patterns {
        HostPatterns::HashedName { salt, hash } => {
            let Ok(mut mac) = Hmac::<sha1::Sha1>::new_from_slice(salt) else {
                return false;
            };
            mac.update(name.as_bytes());
            mac.verify_slice(hash).is_ok()
        }
        HostPatterns::Patterns(list) => {
            let name = name.to_ascii_lowercase();
            let mut positive = false;
            for p in list {
                let (negated, p) = match p.strip_prefix('!') {
                    Some(rest) => (true, rest),
                    None => (false, p.as_str()),
                };
                if glob(p.to_ascii_lowercase().as_bytes(), name.as_bytes()) {
                    if negated {
                        return false;
                    }
                    positive = true;
                }
            }
            positive
        }
    }
}

/// OpenSSH's `match_pattern`: `*` any run, `?` any one character.
fn glob(p: &[u8], s: &[u8]) -> bool {
    let (mut pi, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if pi < p.len() && (p[pi] == b'?' || p[pi] == s[si]) {
            pi += 1;
            si += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, si));
            pi += 1;
        } else if let Some((sp, ss)) = star {
            pi = sp + 1;
            si = ss + 1;
            star = Some((sp, ss + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    // Two real ed25519 public keys (no private part anywhere).
    const K1: &str = "AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl";
    const K2: &str = "AAAAC3NzaC1lZDI1NTE5AAAAIFf4UX3Fd1wCXqmfnGnEHb0mGqlLMBGNAS1z6GkBdwQz";

    fn blob(b64: &str) -> Vec<u8> {
        base64::engine::general_purpose::STANDARD.decode(b64).unwrap()
    }

    fn kh(lines: &[&str]) -> KnownHosts {
        KnownHosts::parse(&lines.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn plain_and_bracketed_port_entries() {
        let k = kh(&[&format!("example.org,10.0.0.1 ssh-ed25519 {K1}")]);
        assert_eq!(k.check("example.org", 22, &blob(K1)), HostKeyCheck::Pinned);
        assert_eq!(k.check("10.0.0.1", 22, &blob(K1)), HostKeyCheck::Pinned);
        // OpenSSH: a portless entry is for port 22 only.
        assert_eq!(k.check("example.org", 2222, &blob(K1)), HostKeyCheck::NotPinned);
        let k = kh(&[&format!("[127.0.0.1]:2222 ssh-ed25519 {K1}")]);
        assert_eq!(k.check("127.0.0.1", 2222, &blob(K1)), HostKeyCheck::Pinned);
        assert_eq!(k.check("127.0.0.1", 22, &blob(K1)), HostKeyCheck::NotPinned);
    }

    #[test]
    fn a_different_key_is_a_mismatch() {
        let k = kh(&[&format!("example.org ssh-ed25519 {K1}")]);
        assert_eq!(
            k.check("example.org", 22, &blob(K2)),
            HostKeyCheck::Mismatch {
                pinned: vec!["ssh-ed25519".into()]
            }
        );
    }

    #[test]
    fn hashed_names_match() {
        // `ssh-keygen -H` form for "[127.0.0.1]:2222", salt of 20 zero bytes.
        let salt = [0u8; 20];
        let mut mac = Hmac::<sha1::Sha1>::new_from_slice(&salt).unwrap();
        mac.update(b"[127.0.0.1]:2222");
        let hash = mac.finalize().into_bytes();
        let e = base64::engine::general_purpose::STANDARD;
        let line = format!("|1|{}|{} ssh-ed25519 {K1}", e.encode(salt), e.encode(hash));
        let k = kh(&[&line]);
        assert_eq!(k.check("127.0.0.1", 2222, &blob(K1)), HostKeyCheck::Pinned);
        assert_eq!(k.check("127.0.0.2", 2222, &blob(K1)), HostKeyCheck::NotPinned);
    }

    #[test]
    fn wildcards_and_negation() {
        let k = kh(&[&format!("*.example.org,!evil.example.org ssh-ed25519 {K1}")]);
        assert_eq!(k.check("git.example.org", 22, &blob(K1)), HostKeyCheck::Pinned);
        assert_eq!(
            k.check("evil.example.org", 22, &blob(K1)),
            HostKeyCheck::NotPinned
        );
        assert_eq!(k.check("GIT.Example.org", 22, &blob(K1)), HostKeyCheck::Pinned);
    }

    #[test]
    fn revoked_wins_and_cert_authority_is_refused() {
        let k = kh(&[
            &format!("example.org ssh-ed25519 {K1}"),
            &format!("@revoked example.org ssh-ed25519 {K1}"),
        ]);
        assert_eq!(k.check("example.org", 22, &blob(K1)), HostKeyCheck::Revoked);
        let err =
            KnownHosts::parse(&[format!("@cert-authority *.example.org ssh-ed25519 {K1}")]).unwrap_err();
        assert!(err.to_string().contains("@cert-authority"), "{err}");
        let err = KnownHosts::parse(&["".into(), "garbage".into()]).unwrap_err();
        assert_eq!(err.index, 1);
    }

    #[test]
    fn lines_carry_their_fingerprint() {
        let line = line_for("127.0.0.1", 2222, &blob(K1));
        assert!(
            line.starts_with(&format!("[127.0.0.1]:2222 ssh-ed25519 {K1} # SHA256:")),
            "{line}"
        );
        // The commented line parses back and matches.
        let k = kh(&[&line]);
        assert_eq!(k.check("127.0.0.1", 2222, &blob(K1)), HostKeyCheck::Pinned);
    }
}
