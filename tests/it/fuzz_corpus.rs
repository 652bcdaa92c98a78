//! Replays the committed corpus of malformed inputs (`tests/corpus/TARGET/`)
//! through the same entry points as the fuzz targets (`fuzz/entries.rs`):
//! each input must be refused with the error its `EXPECTED` line names (or
//! accepted, where it says `ok`), and nothing may panic. This is also what
//! keeps the fuzz targets compiling with a stable toolchain.

#[path = "../../fuzz/entries.rs"]
mod entries;

use std::collections::BTreeMap;
use std::path::Path;

/// `EXPECTED`: one `FILE: what the error must contain` per line, or
/// `FILE: ok` for an input that must be accepted.
fn expectations(dir: &Path) -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(dir.join("EXPECTED"))
        .unwrap_or_else(|e| panic!("{}/EXPECTED: {e}", dir.display()));
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (file, want) = l
                .split_once(": ")
                .unwrap_or_else(|| panic!("{}/EXPECTED: {l:?} is not `FILE: text`", dir.display()));
            (file.to_string(), want.to_string())
        })
        .collect()
}

fn replay(target: &str, entry: fn(&[u8]) -> Result<(), String>) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/corpus")
        .join(target);
    let mut expected = expectations(&dir);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|f| f != "EXPECTED")
        .collect();
    files.sort();
    assert!(files.len() >= 5, "{target}: too small a corpus ({files:?})");
    let mut failures = Vec::new();
    for file in files {
        let want = expected
            .remove(&file)
            .unwrap_or_else(|| panic!("{target}/{file} has no line in EXPECTED"));
        let data = std::fs::read(dir.join(&file)).unwrap();
        let outcome = std::panic::catch_unwind(|| entry(&data));
        match (outcome, want.as_str()) {
            (Err(_), _) => failures.push(format!("{file}: panicked")),
            (Ok(Ok(())), "ok") => {}
            (Ok(Ok(())), want) => failures.push(format!("{file}: accepted, but should fail with {want:?}")),
            (Ok(Err(e)), "ok") => failures.push(format!("{file}: refused ({e}), but is valid")),
            (Ok(Err(e)), want) if !e.contains(want) => {
                failures.push(format!("{file}: {e:?} does not say {want:?}"))
            }
            (Ok(Err(_)), _) => {}
        }
    }
    assert!(
        expected.is_empty(),
        "{target}: EXPECTED names missing files {expected:?}"
    );
    assert!(failures.is_empty(), "{target}:\n{}", failures.join("\n"));
}

#[test]
fn job_files() {
    replay("job_file", entries::job_file);
}

#[test]
fn job_specs_from_protobuf() {
    replay("job_spec_proto", entries::job_spec_proto);
}

#[test]
fn known_hosts_lines() {
    replay("known_hosts", entries::known_hosts);
}

#[test]
fn ssh_keys() {
    replay("ssh_key", entries::ssh_key);
}

/// Real keys, made with ssh-keygen now (no key is ever committed): a valid
/// one, encrypted ones with a missing or wrong passphrase, and one whose KDF
/// asks for billions of rounds.
#[test]
fn generated_keys() {
    require!(SshKeygen);
    use base64::Engine;
    let dir = tempfile::tempdir().unwrap();
    let keygen = |name: &str, pass: &str, rounds: &str| {
        let path = dir.path().join(name);
        let ok = std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-a", rounds, "-N", pass, "-f"])
            .arg(&path)
            .status()
            .expect("ssh-keygen (openssh-client, scripts/setup)")
            .success();
        assert!(ok, "ssh-keygen failed");
        std::fs::read(&path).unwrap()
    };
    let with_pass = |pass: &str, key: &[u8]| [format!("passphrase={pass}\n").as_bytes(), key].concat();
    let plain = keygen("plain", "", "16");
    let encrypted = keygen("encrypted", "right", "16");
    // The same encrypted key, its KDF rounds patched to 4,000,000,000.
    let text = String::from_utf8(encrypted.clone()).unwrap();
    let body: String = text.lines().filter(|l| !l.starts_with("-----")).collect();
    let mut raw = base64::engine::general_purpose::STANDARD.decode(body).unwrap();
    let at = {
        // "openssh-key-v1\0", string cipher, string kdf, string kdfoptions =
        // (string salt, uint32 rounds).
        let mut i = 15;
        let read = |i: &mut usize| {
            let n = u32::from_be_bytes(raw[*i..*i + 4].try_into().unwrap()) as usize;
            *i += 4 + n;
        };
        read(&mut i);
        read(&mut i);
        i += 4; // kdfoptions length
        read(&mut i); // salt
        i
    };
    raw[at..at + 4].copy_from_slice(&4_000_000_000u32.to_be_bytes());
    let b64 = base64::engine::general_purpose::STANDARD.encode(&raw);
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(70)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    let many_rounds = format!(
        "-----BEGIN OPENSSH PRIVATE KEY-----\n{}\n-----END OPENSSH PRIVATE KEY-----\n",
        lines.join("\n")
    );
    let cases: Vec<(&str, Vec<u8>, Option<&str>)> = vec![
        ("plain", plain, None),
        (
            "encrypted, right passphrase",
            with_pass("right", &encrypted),
            None,
        ),
        (
            "encrypted, no passphrase",
            encrypted.clone(),
            Some("ssh.user_key: is encrypted and no passphrase was given"),
        ),
        (
            "encrypted, wrong passphrase",
            with_pass("wrong", &encrypted),
            Some("ssh.user_key: cannot be decrypted: wrong passphrase"),
        ),
        (
            "many KDF rounds",
            with_pass("right", many_rounds.as_bytes()),
            Some("ssh.user_key: is encrypted with 4000000000 KDF rounds"),
        ),
    ];
    for (what, input, want) in cases {
        match (entries::ssh_key(&input), want) {
            (Ok(()), None) => {}
            (Err(e), Some(w)) => assert!(e.contains(w), "{what}: {e}"),
            (got, want) => panic!("{what}: got {got:?}, want {want:?}"),
        }
    }
}
