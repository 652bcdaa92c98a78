//! Replays the committed corpus of malformed inputs (`tests/corpus/TARGET/`)
//! through the same entry points as the fuzz targets (`fuzz/entries.rs`):
//! each input must be refused with the error its `EXPECTED` line names (or
//! accepted, where it says `ok`), and nothing may panic. This is also what
//! keeps the fuzz targets compiling with a stable toolchain.

#[path = "../fuzz/entries.rs"]
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
