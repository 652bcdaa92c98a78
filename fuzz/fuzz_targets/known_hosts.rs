//! cargo-fuzz target: `entries::known_hosts`.
#![no_main]

#[path = "../entries.rs"]
mod entries;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = entries::known_hosts(data);
});
