//! Private keys: parsed and fingerprinted up front, so a bad key fails the
//! job with a sentence naming it, never a crash halfway through a checkout.
//!
//! Every key is normalised to an unencrypted OpenSSH private key, which both
//! libssh2 (the checkout, from memory) and OpenSSH (steps in the container)
//! read without a prompt. Error messages never quote key bytes.

use ssh_key::private::{EcdsaKeypair, Ed25519Keypair, KeypairData, RsaKeypair};
use ssh_key::{HashAlg, LineEnding, PrivateKey};

use crate::model::KeyKind;
use crate::model::Secret;

/// Most bcrypt rounds an encrypted key may ask for: each costs real time,
/// and a key asking for billions would hold a job slot for hours.
pub const MAX_KDF_ROUNDS: u32 = 1024;

/// A usable private key.
#[derive(Debug, Clone)]
pub struct Key {
    pub kind: KeyKind,
    /// "SHA256:..." exactly as `ssh-keygen -lf` prints it.
    pub fingerprint: String,
    /// "ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256", ...
    pub algorithm: String,
    /// Unencrypted OpenSSH private key text.
    pub private: Secret,
    /// The public key as an authorized_keys line.
    pub public: String,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("{field}: {reason}")]
pub struct KeyError {
    /// "ssh.user_key", "ssh.deploy_key", "ssh.extra_keys[0].private_key".
    pub field: String,
    pub reason: String,
}

/// Parses an OpenSSH or PEM private key (ed25519, RSA, ECDSA), decrypting
/// it with `passphrase` if it is encrypted.
pub fn parse(
    kind: KeyKind,
    field: &str,
    bytes: &Secret,
    passphrase: Option<&Secret>,
) -> Result<Key, KeyError> {
    let fail = |reason: String| KeyError {
        field: field.to_string(),
        reason,
    };
    let text = bytes
        .expose_str()
        .ok_or_else(|| fail("is not text; give the private key file's contents".into()))?
        .trim();
    let key = if text.starts_with("-----BEGIN OPENSSH PRIVATE KEY-----") {
        let key = PrivateKey::from_openssh(text)
            .map_err(|e| fail(format!("is not a valid OpenSSH private key ({e})")))?;
        if key.is_encrypted() {
            if let ssh_key::Kdf::Bcrypt { rounds, .. } = key.kdf()
                && *rounds > MAX_KDF_ROUNDS
            {
                return Err(fail(format!(
                    "is encrypted with {rounds} KDF rounds; runnel decrypts keys with at most \
                     {MAX_KDF_ROUNDS} (ssh-keygen's default is 16): re-encrypt it with \
                     `ssh-keygen -p -a 100 -f KEYFILE`"
                )));
            }
            let Some(pass) = passphrase else {
                return Err(fail(
                    "is encrypted and no passphrase was given (set ssh.passphrase)".into(),
                ));
            };
            key.decrypt(pass.expose())
                .map_err(|_| fail("cannot be decrypted: wrong passphrase".into()))?
        } else {
            key
        }
    } else if text.starts_with("-----BEGIN ") {
        from_pem(text).map_err(fail)?
    } else if text.starts_with("ssh-") || text.starts_with("ecdsa-") {
        return Err(fail(
            "is a public key; give the private key (the file without .pub)".into(),
        ));
    } else {
        return Err(fail(
            "is not an OpenSSH or PEM private key (expected \"-----BEGIN ... PRIVATE KEY-----\")".into(),
        ));
    };
    let public = key.public_key();
    let private = key
        .to_openssh(LineEnding::LF)
        .map_err(|e| fail(format!("cannot be re-encoded ({e})")))?;
    Ok(Key {
        kind,
        fingerprint: public.fingerprint(HashAlg::Sha256).to_string(),
        algorithm: public.algorithm().as_str().to_string(),
        private: Secret::new(private.as_bytes().to_vec()),
        public: public.to_openssh().unwrap_or_default(),
    })
}

fn from_pem(text: &str) -> Result<PrivateKey, String> {
    use p256::pkcs8::DecodePrivateKey;
    use rsa::pkcs1::DecodeRsaPrivateKey;

    if text.contains("Proc-Type: 4,ENCRYPTED") || text.starts_with("-----BEGIN ENCRYPTED PRIVATE KEY") {
        return Err(
            "is an encrypted PEM key, which runnel does not read; convert it to the \
                    OpenSSH format with `ssh-keygen -p -f KEYFILE`"
                .into(),
        );
    }
    let data: KeypairData = if text.starts_with("-----BEGIN RSA PRIVATE KEY-----") {
        let key = rsa::RsaPrivateKey::from_pkcs1_pem(text)
            .map_err(|e| format!("is not a valid PEM RSA private key ({e})"))?;
        rsa_keypair(&key)?
    } else if text.starts_with("-----BEGIN EC PRIVATE KEY-----") {
        if let Ok(k) = p256::SecretKey::from_sec1_pem(text) {
            p256_keypair(k)
        } else if let Ok(k) = p384::SecretKey::from_sec1_pem(text) {
            p384_keypair(k)
        } else {
            return Err("is not a valid PEM EC private key on P-256 or P-384".into());
        }
    } else if text.starts_with("-----BEGIN PRIVATE KEY-----") {
        if let Ok(k) = rsa::RsaPrivateKey::from_pkcs8_pem(text) {
            rsa_keypair(&k)?
        } else if let Ok(k) = p256::SecretKey::from_pkcs8_pem(text) {
            p256_keypair(k)
        } else if let Ok(k) = p384::SecretKey::from_pkcs8_pem(text) {
            p384_keypair(k)
        } else if let Ok(k) = ed25519_dalek::SigningKey::from_pkcs8_pem(text) {
            KeypairData::Ed25519(Ed25519Keypair::from(k))
        } else {
            return Err("is a PKCS#8 key of a type runnel does not know \
                        (supported: ed25519, RSA, ECDSA P-256/P-384)"
                .into());
        }
    } else {
        return Err("is a PEM block that is not a private key".into());
    };
    PrivateKey::new(data, "").map_err(|e| format!("is not a usable key ({e})"))
}

fn rsa_keypair(key: &rsa::RsaPrivateKey) -> Result<KeypairData, String> {
    RsaKeypair::try_from(key)
        .map(KeypairData::Rsa)
        .map_err(|e| format!("is an RSA key runnel cannot use ({e})"))
}

fn p256_keypair(k: p256::SecretKey) -> KeypairData {
    use p256::elliptic_curve::sec1::ToEncodedPoint;
    KeypairData::Ecdsa(EcdsaKeypair::NistP256 {
        public: k.public_key().to_encoded_point(false),
        private: k.into(),
    })
}

fn p384_keypair(k: p384::SecretKey) -> KeypairData {
    use p384::elliptic_curve::sec1::ToEncodedPoint;
    KeypairData::Ecdsa(EcdsaKeypair::NistP384 {
        public: k.public_key().to_encoded_point(false),
        private: k.into(),
    })
}

/// The values to mask for a key: the key as given, as normalised, and each
/// of their base64 lines (a step may print a key with other line breaks).
pub fn mask_values(original: &Secret, key: Option<&Key>) -> Vec<Secret> {
    let mut out = vec![original.clone()];
    let mut texts = vec![original.expose().to_vec()];
    if let Some(k) = key {
        out.push(k.private.clone());
        texts.push(k.private.expose().to_vec());
    }
    for text in texts {
        for line in text.split(|&b| b == b'\n') {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.len() >= 16 && !line.starts_with(b"-----") && !line.contains(&b':') {
                out.push(Secret::new(line.to_vec()));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_what_is_not_a_private_key_without_quoting_it() {
        let cases = [
            (
                "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB secret-comment",
                "public key",
            ),
            ("hello secret-comment", "not an OpenSSH or PEM"),
            (
                "-----BEGIN OPENSSH PRIVATE KEY-----\nsecret-comment\n-----END OPENSSH PRIVATE KEY-----",
                "not a valid OpenSSH",
            ),
        ];
        for (text, want) in cases {
            let e = parse(
                KeyKind::User,
                "ssh.user_key",
                &Secret::from(text.to_string()),
                None,
            )
            .unwrap_err();
            assert_eq!(e.field, "ssh.user_key");
            assert!(e.to_string().contains(want), "{e}");
            assert!(!e.to_string().contains("secret-comment"), "{e}");
        }
    }

    #[test]
    fn mask_values_cover_each_base64_line() {
        let k = Secret::from("-----BEGIN X-----\nAAAABBBBCCCCDDDDEEEE\nshort\n-----END X-----\n".to_string());
        let v = mask_values(&k, None);
        assert!(v.iter().any(|s| s.expose() == b"AAAABBBBCCCCDDDDEEEE"));
        assert!(!v.iter().any(|s| s.expose() == b"short"));
    }
}
