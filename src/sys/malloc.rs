//! The allocator's policy for a long-running process that moves large
//! buffers now and then (the store's 5-8 MiB parts and ranges).

/// Makes glibc's malloc serve every block of 256 KiB or more from its own
/// mapping, unmapped when freed. By default the threshold grows to the
/// largest block freed (up to 32 MiB), after which such blocks come from
/// per-thread arenas that keep the memory once freed: a cache upload's
/// parts, freed on several threads, left the agent at 150 MiB resident
/// for 40 MiB live. Call it before the threads start.
pub fn return_large_blocks() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt takes two integers and changes only malloc's
    // tunables; no allocation is in flight on another thread yet.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 10);
    }
}
