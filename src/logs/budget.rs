//! A job's bounded log (`[logs] max_bytes`): the first half of the budget
//! is recorded as it comes; after that, output is held back in a window of
//! the last half, whose oldest bytes drop out as new ones come. When the
//! job ends, one marker line says how many bytes were dropped and the
//! window follows it. The stored log and every watcher see the same, and
//! the agent holds at most half the budget per job in memory.

use std::collections::VecDeque;

use crate::model::Stream;

/// A chunk of a step's output: its step, its stream, its bytes.
pub type Chunk = (u32, Stream, Vec<u8>);

#[derive(Debug)]
pub struct Budget {
    max: u64,
    /// Recorded as it came.
    head: u64,
    /// The last bytes, held back.
    tail: VecDeque<Chunk>,
    tail_bytes: u64,
    dropped: u64,
}

impl Budget {
    pub fn new(max: u64) -> Budget {
        Budget {
            max,
            head: 0,
            tail: VecDeque::new(),
            tail_bytes: 0,
            dropped: 0,
        }
    }

    fn head_max(&self) -> u64 {
        self.max / 2
    }

    fn tail_max(&self) -> u64 {
        self.max - self.max / 2
    }

    /// Takes a chunk of output; returns the part to record now (the rest,
    /// if any, is held back).
    pub fn admit(&mut self, step: u32, stream: Stream, mut data: Vec<u8>) -> Option<Vec<u8>> {
        let room = self.head_max().saturating_sub(self.head) as usize;
        let now = if room > 0 && self.tail.is_empty() {
            let rest = if data.len() > room {
                data.split_off(room)
            } else {
                Vec::new()
            };
            let now = std::mem::replace(&mut data, rest);
            self.head += now.len() as u64;
            Some(now)
        } else {
            None
        };
        if !data.is_empty() {
            self.tail_bytes += data.len() as u64;
            self.tail.push_back((step, stream, data));
            self.trim();
        }
        now
    }

    /// Drops the oldest held-back bytes past the tail's half.
    fn trim(&mut self) {
        while self.tail_bytes > self.tail_max() {
            let over = (self.tail_bytes - self.tail_max()) as usize;
            let front = self.tail.front_mut().expect("bytes are held");
            if front.2.len() <= over {
                let n = front.2.len() as u64;
                self.tail.pop_front();
                self.tail_bytes -= n;
                self.dropped += n;
            } else {
                front.2.drain(..over);
                self.tail_bytes -= over as u64;
                self.dropped += over as u64;
            }
        }
    }

    /// At the end of the job: the marker line (if anything was dropped)
    /// and the held-back chunks, to record in that order.
    pub fn finish(&mut self) -> (Option<String>, Vec<Chunk>) {
        let marker = (self.dropped > 0).then(|| {
            format!(
                "runnel: {} bytes of output dropped here: the job's log is limited to {} bytes (logs.max_bytes); \
                 it keeps the first and the last half",
                self.dropped, self.max
            )
        });
        self.dropped = 0;
        self.tail_bytes = 0;
        (marker, self.tail.drain(..).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(chunks: &[Chunk]) -> String {
        chunks
            .iter()
            .map(|c| String::from_utf8_lossy(&c.2).into_owned())
            .collect()
    }

    #[test]
    fn keeps_the_first_and_the_last_half_and_counts_the_rest() {
        let mut b = Budget::new(10);
        let mut now = String::new();
        for (i, piece) in ["abc", "defg", "hijkl", "mnop", "qrstuvwxyz"].iter().enumerate() {
            if let Some(d) = b.admit(i as u32, Stream::Stdout, piece.as_bytes().to_vec()) {
                now.push_str(&String::from_utf8(d).unwrap());
            }
        }
        assert_eq!(now, "abcde");
        let (marker, tail) = b.finish();
        assert_eq!(text(&tail), "vwxyz");
        // 26 letters: 5 recorded, 5 held, 16 dropped.
        assert!(
            marker
                .unwrap()
                .starts_with("runnel: 16 bytes of output dropped here")
        );
        // Each held chunk keeps its step.
        assert_eq!(tail.iter().map(|c| c.0).collect::<Vec<_>>(), [4]);
    }

    #[test]
    fn under_the_budget_everything_is_recorded_at_once_and_no_marker() {
        let mut b = Budget::new(100);
        assert_eq!(
            b.admit(0, Stream::Stderr, b"hello".to_vec()),
            Some(b"hello".to_vec())
        );
        let (marker, tail) = b.finish();
        assert!(marker.is_none() && tail.is_empty());
    }
}
