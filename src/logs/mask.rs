//! Masking of secret values in a byte stream, including a secret split
//! across two reads: bytes that could be the start of a secret are held back
//! until the next read (or the end of the stream) decides.

use std::sync::Arc;

use aho_corasick::{AhoCorasick, MatchKind};

use crate::model::{MASK, Secret};

/// The set of values to mask for one job.
#[derive(Debug, Default)]
pub struct Masker {
    patterns: Vec<Vec<u8>>,
    searcher: Option<AhoCorasick>,
    /// `starts[b]`: some pattern starts with byte `b`.
    starts: Vec<bool>,
    max_len: usize,
}

impl Masker {
    pub fn new<'a>(secrets: impl IntoIterator<Item = &'a Secret>) -> Masker {
        let mut patterns: Vec<Vec<u8>> = secrets
            .into_iter()
            .map(|s| s.expose().to_vec())
            .filter(|p| !p.is_empty())
            .collect();
        patterns.sort();
        patterns.dedup();
        if patterns.is_empty() {
            return Masker::default();
        }
        let searcher = AhoCorasick::builder()
            .match_kind(MatchKind::Standard)
            .build(&patterns)
            .expect("literal byte patterns always build");
        let mut starts = vec![false; 256];
        for p in &patterns {
            starts[p[0] as usize] = true;
        }
        let max_len = patterns.iter().map(Vec::len).max().unwrap_or(0);
        Masker {
            patterns,
            searcher: Some(searcher),
            starts,
            max_len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.searcher.is_none()
    }

    /// Masks every occurrence in a complete piece of text.
    pub fn mask_all(&self, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(data.len());
        self.emit(data, &self.intervals(data), &mut out);
        out
    }

    /// Merged byte ranges covered by any occurrence of any pattern.
    fn intervals(&self, data: &[u8]) -> Vec<(usize, usize)> {
        let Some(searcher) = &self.searcher else {
            return Vec::new();
        };
        let mut ranges: Vec<(usize, usize)> = searcher
            .find_overlapping_iter(data)
            .map(|m| (m.start(), m.end()))
            .collect();
        ranges.sort_unstable();
        let mut merged: Vec<(usize, usize)> = Vec::with_capacity(ranges.len());
        for (s, e) in ranges {
            match merged.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        merged
    }

    /// Length of the longest suffix of `data` that is a proper prefix of a
    /// pattern: those bytes may become a secret once more arrives.
    fn holdback(&self, data: &[u8]) -> usize {
        let longest = (self.max_len.saturating_sub(1)).min(data.len());
        for k in (1..=longest).rev() {
            let suffix = &data[data.len() - k..];
            if !self.starts[suffix[0] as usize] {
                continue;
            }
            if self.patterns.iter().any(|p| p.len() > k && p.starts_with(suffix)) {
                return k;
            }
        }
        0
    }

    fn emit(&self, data: &[u8], intervals: &[(usize, usize)], out: &mut Vec<u8>) {
        let mut at = 0;
        for &(s, e) in intervals {
            out.extend_from_slice(&data[at..s]);
            out.extend_from_slice(MASK.as_bytes());
            at = e;
        }
        out.extend_from_slice(&data[at..]);
    }
}

/// Masks one stream (stdout or stderr of a step) as it is read.
#[derive(Debug)]
pub struct MaskStream {
    masker: Arc<Masker>,
    held: Vec<u8>,
}

impl MaskStream {
    pub fn new(masker: Arc<Masker>) -> Self {
        MaskStream {
            masker,
            held: Vec::new(),
        }
    }

    /// Feeds `data`; appends to `out` what is now safe to show.
    pub fn push(&mut self, data: &[u8], out: &mut Vec<u8>) {
        if self.masker.is_empty() {
            out.extend_from_slice(data);
            return;
        }
        self.held.extend_from_slice(data);
        let intervals = self.masker.intervals(&self.held);
        let mut boundary = self.held.len() - self.masker.holdback(&self.held);
        // A whole occurrence reaching past the boundary is held with it.
        if let Some(&(s, _)) = intervals.iter().find(|&&(s, e)| s < boundary && e > boundary) {
            boundary = s;
        }
        let done: Vec<(usize, usize)> = intervals.into_iter().filter(|&(_, e)| e <= boundary).collect();
        self.masker.emit(&self.held[..boundary], &done, out);
        self.held.drain(..boundary);
    }

    /// The stream ended: whatever is held is not a secret after all.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        let held = std::mem::take(&mut self.held);
        out.extend_from_slice(&self.masker.mask_all(&held));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masker(secrets: &[&str]) -> Arc<Masker> {
        let s: Vec<Secret> = secrets.iter().map(|s| Secret::from(s.to_string())).collect();
        Arc::new(Masker::new(&s))
    }

    fn run(secrets: &[&str], pieces: &[&str]) -> String {
        let mut m = MaskStream::new(masker(secrets));
        let mut out = Vec::new();
        for p in pieces {
            m.push(p.as_bytes(), &mut out);
        }
        m.finish(&mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn masks_whole_occurrences() {
        assert_eq!(run(&["hunter2"], &["pw=hunter2 ok\n"]), "pw=[MASKED] ok\n");
        assert_eq!(run(&[], &["pw=hunter2\n"]), "pw=hunter2\n");
    }

    #[test]
    fn masks_a_secret_split_across_reads() {
        assert_eq!(run(&["hunter2"], &["pw=hun", "ter2!\n"]), "pw=[MASKED]!\n");
        let bytes: Vec<String> = "a hunter2 b".chars().map(String::from).collect();
        let pieces: Vec<&str> = bytes.iter().map(String::as_str).collect();
        assert_eq!(run(&["hunter2"], &pieces), "a [MASKED] b");
    }

    #[test]
    fn holds_back_only_what_could_be_a_secret() {
        let mut m = MaskStream::new(masker(&["hunter2"]));
        let mut out = Vec::new();
        m.push(b"line one\nhun", &mut out);
        assert_eq!(out, b"line one\n");
        m.push(b"gry\n", &mut out);
        assert_eq!(out, b"line one\nhungry\n");
    }

    #[test]
    fn overlapping_secrets_are_both_covered() {
        assert_eq!(run(&["abc", "bcdef"], &["xab", "cdefy"]), "x[MASKED]y");
        assert_eq!(run(&["abc", "abcdef"], &["abc", "def"]), "[MASKED]");
        assert_eq!(run(&["aa"], &["aaaa"]), "[MASKED]");
    }

    #[test]
    fn a_prefix_at_the_end_is_released() {
        assert_eq!(run(&["hunter2"], &["say hunt"]), "say hunt");
    }
}
