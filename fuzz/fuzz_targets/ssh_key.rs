//! cargo-fuzz target: `entries::ssh_key`.
#![no_main]

#[path = "../entries.rs"]
mod entries;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = entries::ssh_key(data);
});
