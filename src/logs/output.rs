//! From a step's pipe to events: read, mask, cut into chunks.
//!
//! A chunk ends at a newline (so a printed line reaches watchers at once),
//! at a size cap, or when a partial line has waited for the flush interval.

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::mask::{MaskStream, Masker};

/// Largest chunk.
pub const CHUNK_CAP: usize = 64 * 1024;
/// How long a partial line waits before it is sent anyway.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(20);
/// After the step's process exited, how long its pipe may stay quiet before
/// we stop reading (a background process may hold it open forever)...
const DRAIN_IDLE: Duration = Duration::from_millis(100);
/// ...and how long we read at most.
const DRAIN_MAX: Duration = Duration::from_secs(2);

/// Masking and chunking of one stream, without I/O.
#[derive(Debug)]
pub struct Chunker {
    mask: MaskStream,
    ready: Vec<u8>,
    cap: usize,
}

impl Chunker {
    pub fn new(masker: Arc<Masker>, cap: usize) -> Self {
        Chunker {
            mask: MaskStream::new(masker),
            ready: Vec::new(),
            cap,
        }
    }

    /// Feeds bytes read; returns the chunks complete now.
    pub fn push(&mut self, data: &[u8]) -> Vec<Vec<u8>> {
        self.mask.push(data, &mut self.ready);
        let mut out = Vec::new();
        while self.ready.len() >= self.cap {
            let rest = self.ready.split_off(self.cap);
            out.push(std::mem::replace(&mut self.ready, rest));
        }
        if let Some(nl) = memchr::memrchr(b'\n', &self.ready) {
            let rest = self.ready.split_off(nl + 1);
            out.push(std::mem::replace(&mut self.ready, rest));
        }
        out
    }

    /// A partial line is waiting.
    pub fn has_partial(&self) -> bool {
        !self.ready.is_empty()
    }

    /// The flush interval passed: sends the partial line (but not bytes that
    /// may still turn out to be a secret).
    pub fn flush(&mut self) -> Option<Vec<u8>> {
        (!self.ready.is_empty()).then(|| std::mem::take(&mut self.ready))
    }

    /// End of stream: everything left.
    pub fn finish(&mut self) -> Option<Vec<u8>> {
        self.mask.finish(&mut self.ready);
        self.flush()
    }
}

/// Reads `pipe` until it ends (or, once `exited` fires, until it goes quiet)
/// and hands each chunk to `sink`. Returns how many bytes were read.
pub async fn pump(
    pipe: OwnedFd,
    mut chunker: Chunker,
    exited: CancellationToken,
    mut sink: impl FnMut(Vec<u8>),
) -> std::io::Result<u64> {
    let mut rx = tokio::net::unix::pipe::Receiver::from_owned_fd(pipe)?;
    let mut buf = vec![0u8; CHUNK_CAP];
    let mut total = 0u64;
    let mut flush_at: Option<Instant> = None;
    let mut drain_until: Option<Instant> = None;
    loop {
        let idle_deadline = drain_until.map(|d| d.min(Instant::now() + DRAIN_IDLE));
        tokio::select! {
            r = rx.read(&mut buf) => {
                let n = r?;
                if n == 0 {
                    break;
                }
                total += n as u64;
                for chunk in chunker.push(&buf[..n]) {
                    sink(chunk);
                }
                flush_at = match (flush_at, chunker.has_partial()) {
                    (_, false) => None,
                    (None, true) => Some(Instant::now() + FLUSH_INTERVAL),
                    (Some(t), true) => Some(t),
                };
            }
            _ = tokio::time::sleep_until(flush_at.unwrap_or_else(Instant::now)), if flush_at.is_some() => {
                flush_at = None;
                if let Some(chunk) = chunker.flush() {
                    sink(chunk);
                }
            }
            _ = exited.cancelled(), if drain_until.is_none() => {
                drain_until = Some(Instant::now() + DRAIN_MAX);
            }
            _ = tokio::time::sleep_until(idle_deadline.unwrap_or_else(Instant::now)), if idle_deadline.is_some() => {
                break;
            }
        }
    }
    if let Some(chunk) = chunker.finish() {
        sink(chunk);
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Secret;

    fn chunker(secrets: &[&str], cap: usize) -> Chunker {
        let s: Vec<Secret> = secrets.iter().map(|s| Secret::from(s.to_string())).collect();
        Chunker::new(Arc::new(Masker::new(&s)), cap)
    }

    #[test]
    fn cuts_at_the_last_newline() {
        let mut c = chunker(&[], 1024);
        assert_eq!(c.push(b"a\nb\nc"), vec![b"a\nb\n".to_vec()]);
        assert!(c.has_partial());
        assert_eq!(c.push(b"d\n"), vec![b"cd\n".to_vec()]);
        assert!(!c.has_partial());
    }

    #[test]
    fn cuts_at_the_cap() {
        let mut c = chunker(&[], 4);
        assert_eq!(c.push(b"abcdefghij"), vec![b"abcd".to_vec(), b"efgh".to_vec()]);
        assert_eq!(c.finish(), Some(b"ij".to_vec()));
    }

    #[test]
    fn flush_keeps_a_possible_secret_back() {
        let mut c = chunker(&["hunter2"], 1024);
        assert!(c.push(b"pw: hun").is_empty());
        assert_eq!(c.flush(), Some(b"pw: ".to_vec()));
        assert_eq!(c.push(b"ter2\n"), vec![b"[MASKED]\n".to_vec()]);
    }

    #[tokio::test]
    async fn pump_reads_until_eof() {
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let writer = std::thread::spawn(move || {
            let mut f = std::fs::File::from(w);
            use std::io::Write;
            f.write_all(b"one\ntw").unwrap();
            f.write_all(b"o\n").unwrap();
        });
        let mut got = Vec::new();
        let n = pump(r, chunker(&[], 1024), CancellationToken::new(), |c| got.extend(c))
            .await
            .unwrap();
        writer.join().unwrap();
        assert_eq!(n, 8);
        assert_eq!(got, b"one\ntwo\n");
    }
}
