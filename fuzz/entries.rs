//! The fuzzed entry points, shared by the cargo-fuzz targets
//! (`fuzz/fuzz_targets/`) and the corpus replay test
//! (`tests/it/fuzz_corpus.rs`), so that both run the same code. Each takes raw
//! bytes and returns the message a user would see when the input is
//! refused. A panic anywhere is a bug; so is a broken invariant on an
//! accepted input (asserted here).

use std::path::Path;

use prost::Message;
use runnel::api::pb;
use runnel::model::{JobSpec, KeyKind, Secret};
use runnel::ssh::KnownHosts;

/// A job file in a directory that does not exist: relative paths in it
/// lead nowhere.
const JOB_FILE: &str = "/nonexistent/runnel-fuzz/job.toml";

/// A job file's text (`runnel run` / `runnel submit`).
pub fn job_file(data: &[u8]) -> Result<(), String> {
    let text = std::str::from_utf8(data).map_err(|e| format!("the job file is not UTF-8: {e}"))?;
    let spec = runnel::job::file::parse(text, Path::new(JOB_FILE)).map_err(|e| e.to_string())?;
    // What `runnel submit` sends of a valid job file, the agent accepts.
    if let Err(e) = JobSpec::try_from(pb::JobSpec::from(&spec)) {
        panic!("a valid job file is refused on the wire: {e}");
    }
    Ok(())
}

/// The bytes of a `JobSpec` message, as SubmitJob receives them.
pub fn job_spec_proto(data: &[u8]) -> Result<(), String> {
    let wire = pb::JobSpec::decode(data).map_err(|e| format!("not a JobSpec message: {e}"))?;
    let spec = JobSpec::try_from(wire).map_err(|e| format!("job.{e}"))?;
    // A valid spec survives a trip over the wire unchanged.
    let again = match JobSpec::try_from(pb::JobSpec::from(&spec)) {
        Ok(s) => s,
        Err(e) => panic!("a valid spec is refused after a round trip: {e}"),
    };
    assert_eq!(pb::JobSpec::from(&again), pb::JobSpec::from(&spec));
    Ok(())
}

/// known_hosts lines, one per line of the input.
pub fn known_hosts(data: &[u8]) -> Result<(), String> {
    let lines: Vec<String> = String::from_utf8_lossy(data)
        .lines()
        .map(str::to_string)
        .collect();
    let pinned = KnownHosts::parse(&lines).map_err(|e| e.to_string())?;
    // Matching takes any name and any presented blob without panicking.
    let _ = pinned.check("git.example.org", 22, data);
    let _ = pinned.check("127.0.0.1", 2222, data);
    // What is written for OpenSSH parses back to the same lines.
    let written: Vec<String> = pinned.file_text().lines().map(str::to_string).collect();
    match KnownHosts::parse(&written) {
        Ok(back) => assert_eq!(back.file_text(), pinned.file_text()),
        Err(e) => panic!("the known_hosts file runnel writes does not parse: {e}"),
    }
    Ok(())
}

/// A private key; an input that starts with `passphrase=...` and a newline
/// gives the passphrase to decrypt it with.
pub fn ssh_key(data: &[u8]) -> Result<(), String> {
    let (passphrase, key) = match data.strip_prefix(b"passphrase=") {
        Some(rest) => {
            let end = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
            (
                Some(Secret::new(&rest[..end])),
                rest.get(end + 1..).unwrap_or_default(),
            )
        }
        None => (None, data),
    };
    let parse = |bytes: &Secret, pass: Option<&Secret>| {
        runnel::ssh::keys::parse(KeyKind::User, "ssh.user_key", bytes, pass)
    };
    let parsed = match parse(&Secret::new(key), passphrase.as_ref()) {
        Ok(k) => k,
        Err(e) => {
            let message = e.to_string();
            // Errors never quote key material (base64 lines of the input).
            for line in key.split(|&b| b == b'\n') {
                let line = String::from_utf8_lossy(line);
                let line = line.trim();
                let base64 = line
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(&b));
                if line.len() >= 16 && base64 {
                    assert!(!message.contains(line), "the error quotes the key: {message}");
                }
            }
            return Err(message);
        }
    };
    // The normalised key (what is written for ssh) parses to the same key.
    match parse(&parsed.private, None) {
        Ok(again) => assert_eq!(again.fingerprint, parsed.fingerprint),
        Err(e) => panic!("the key runnel writes does not parse: {e}"),
    }
    Ok(())
}
