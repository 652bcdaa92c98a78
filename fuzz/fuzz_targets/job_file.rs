//! cargo-fuzz target: `entries::job_file`.
#![no_main]

#[path = "../entries.rs"]
mod entries;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = entries::job_file(data);
});
