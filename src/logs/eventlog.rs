//! The per-job event log on disk, and the watchers that read it.
//!
//! Every event gets the next `seq` and is appended to the file before anyone
//! can see it; the log then publishes its new tip (last seq, end offset) on a
//! watch channel. Watchers never get events pushed at them: they read the
//! file from their own position up to the published tip, so a slow or
//! stalled watcher costs a file offset, not memory, and never slows the job.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use futures::Stream;
use tokio::sync::watch;

use crate::model::event::{Event, EventKind, HEADER_LEN};

/// How far the log has been written, as watchers see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Tip {
    pub seq: u64,
    pub offset: u64,
    /// No event will ever be added.
    pub closed: bool,
}

#[derive(Debug)]
pub struct EventLog {
    path: PathBuf,
    writer: Mutex<Option<File>>,
    tip: watch::Sender<Tip>,
}

/// Reading a batch stops after about this many bytes of records.
const BATCH_BYTES: usize = 256 * 1024;

impl EventLog {
    /// Starts a new, empty log.
    pub fn create(path: &Path) -> io::Result<EventLog> {
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .mode(0o600)
            .open(path)?;
        Ok(EventLog {
            path: path.to_path_buf(),
            writer: Mutex::new(Some(file)),
            tip: watch::channel(Tip::default()).0,
        })
    }

    /// Opens an existing log to append to. A record torn by a crash at the
    /// end is cut off, so the log stays readable.
    pub fn reopen(path: &Path) -> io::Result<EventLog> {
        let tip = scan(path)?;
        let file = OpenOptions::new().write(true).open(path)?;
        file.set_len(tip.offset)?;
        drop(file);
        let file = OpenOptions::new().append(true).open(path)?;
        Ok(EventLog {
            path: path.to_path_buf(),
            writer: Mutex::new(Some(file)),
            tip: watch::channel(tip).0,
        })
    }

    /// Opens an ended job's log, read-only.
    pub fn open_closed(path: &Path) -> io::Result<EventLog> {
        let mut tip = scan(path)?;
        tip.closed = true;
        Ok(EventLog {
            path: path.to_path_buf(),
            writer: Mutex::new(None),
            tip: watch::channel(tip).0,
        })
    }

    pub fn tip(&self) -> Tip {
        *self.tip.borrow()
    }

    /// Appends the event that `make` builds, given the seq it will carry.
    pub fn append_with(&self, make: impl FnOnce(u64) -> EventKind) -> io::Result<Event> {
        let mut writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let Some(file) = writer.as_mut() else {
            return Err(io::Error::other("the event log is closed"));
        };
        let tip = self.tip();
        let event = Event {
            seq: tip.seq + 1,
            time: SystemTime::now(),
            kind: make(tip.seq + 1),
        };
        let mut buf = Vec::with_capacity(64);
        event.encode(&mut buf);
        file.write_all(&buf)?;
        self.tip.send_replace(Tip {
            seq: event.seq,
            offset: tip.offset + buf.len() as u64,
            closed: false,
        });
        Ok(event)
    }

    pub fn append(&self, kind: EventKind) -> io::Result<Event> {
        self.append_with(|_| kind)
    }

    /// No more events: flushes to disk and lets followers finish.
    pub fn close(&self) {
        let mut writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(file) = writer.take() {
            let _ = file.sync_all();
        }
        self.tip.send_modify(|t| t.closed = true);
    }

    /// The events with seq > `after_seq`: what is stored, then (with
    /// `follow`) live ones until the log is closed.
    pub fn watch(&self, after_seq: u64, follow: bool) -> impl Stream<Item = io::Result<Event>> + use<> {
        let state = WatchState {
            reader: Some(Reader {
                path: self.path.clone(),
                file: None,
                offset: 0,
                after_seq,
            }),
            tip: self.tip.subscribe(),
            queue: std::collections::VecDeque::new(),
            follow,
            done: false,
        };
        futures::stream::unfold(state, |mut st| async move {
            let item = st.next().await?;
            Some((item, st))
        })
    }
}

struct WatchState {
    reader: Option<Reader>,
    tip: watch::Receiver<Tip>,
    queue: std::collections::VecDeque<Event>,
    follow: bool,
    done: bool,
}

impl WatchState {
    async fn next(&mut self) -> Option<io::Result<Event>> {
        loop {
            if let Some(e) = self.queue.pop_front() {
                return Some(Ok(e));
            }
            if self.done {
                return None;
            }
            let tip = *self.tip.borrow_and_update();
            let mut reader = self.reader.take()?;
            let (reader, batch) = tokio::task::spawn_blocking(move || {
                let batch = reader.read_batch(tip.offset);
                (reader, batch)
            })
            .await
            .ok()?;
            self.reader = Some(reader);
            match batch {
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
                Ok(batch) if !batch.is_empty() => self.queue.extend(batch),
                Ok(_) if tip.closed || !self.follow => self.done = true,
                Ok(_) => {
                    if self.tip.changed().await.is_err() {
                        // The log was dropped; what is on disk is all there is.
                        let _ = self.tip.borrow_and_update();
                        self.follow = false;
                    }
                }
            }
        }
    }
}

/// A watcher's position in the file.
struct Reader {
    path: PathBuf,
    file: Option<File>,
    offset: u64,
    after_seq: u64,
}

impl Reader {
    /// Reads the records between its position and `end`, up to a batch.
    fn read_batch(&mut self, end: u64) -> io::Result<Vec<Event>> {
        let mut out = Vec::new();
        if self.offset >= end {
            return Ok(out);
        }
        let file = match &mut self.file {
            Some(f) => f,
            None => self.file.insert(File::open(&self.path)?),
        };
        file.seek(SeekFrom::Start(self.offset))?;
        let mut bytes = 0;
        let mut header = [0u8; HEADER_LEN];
        while self.offset < end && bytes < BATCH_BYTES {
            file.read_exact(&mut header)?;
            let len = u32::from_le_bytes(header[0..4].try_into().unwrap()) as u64;
            let seq = u64::from_le_bytes(header[4..12].try_into().unwrap());
            let next = self.offset + 4 + len;
            if next > end {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "event log {}: record {seq} runs past the end",
                        self.path.display()
                    ),
                ));
            }
            if seq <= self.after_seq {
                file.seek(SeekFrom::Start(next))?;
            } else {
                let mut rec = vec![0u8; len as usize];
                rec[..HEADER_LEN - 4].copy_from_slice(&header[4..]);
                file.read_exact(&mut rec[HEADER_LEN - 4..])?;
                let event = Event::decode(&rec).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                bytes += rec.len();
                self.after_seq = seq;
                out.push(event);
            }
            self.offset = next;
        }
        Ok(out)
    }
}

/// Finds the end of the last complete record.
fn scan(path: &Path) -> io::Result<Tip> {
    let mut file = File::open(path)?;
    let size = file.metadata()?.len();
    let mut tip = Tip::default();
    let mut header = [0u8; HEADER_LEN];
    while tip.offset + HEADER_LEN as u64 <= size {
        file.seek(SeekFrom::Start(tip.offset))?;
        file.read_exact(&mut header)?;
        let len = u32::from_le_bytes(header[0..4].try_into().unwrap()) as u64;
        let seq = u64::from_le_bytes(header[4..12].try_into().unwrap());
        let next = tip.offset + 4 + len;
        if len < (HEADER_LEN - 4) as u64 || next > size || seq != tip.seq + 1 {
            break;
        }
        tip.seq = seq;
        tip.offset = next;
    }
    Ok(tip)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::event::Stream as Out;
    use futures::StreamExt;

    fn log_line(i: u32) -> EventKind {
        EventKind::Log {
            step: 0,
            stream: Out::Stdout,
            data: format!("line {i}\n").into_bytes(),
        }
    }

    async fn seqs(log: &EventLog, after: u64, follow: bool) -> Vec<u64> {
        log.watch(after, follow).map(|e| e.unwrap().seq).collect().await
    }

    #[tokio::test]
    async fn replay_then_follow_until_closed() {
        let dir = tempfile::tempdir().unwrap();
        let log = std::sync::Arc::new(EventLog::create(&dir.path().join("events")).unwrap());
        for i in 0..5 {
            log.append(log_line(i)).unwrap();
        }
        assert_eq!(seqs(&log, 0, false).await, vec![1, 2, 3, 4, 5]);
        assert_eq!(seqs(&log, 3, false).await, vec![4, 5]);

        let follower = tokio::spawn({
            let log = log.clone();
            async move { seqs(&log, 2, true).await }
        });
        for i in 5..8 {
            log.append(log_line(i)).unwrap();
        }
        log.close();
        assert_eq!(follower.await.unwrap(), vec![3, 4, 5, 6, 7, 8]);
        assert!(log.append(log_line(9)).is_err());
    }

    #[tokio::test]
    async fn a_torn_tail_is_cut_on_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events");
        let log = EventLog::create(&path).unwrap();
        log.append(log_line(0)).unwrap();
        log.append(log_line(1)).unwrap();
        drop(log);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&[40, 0, 0, 0, 3, 0]).unwrap();
        let log = EventLog::reopen(&path).unwrap();
        assert_eq!(log.tip().seq, 2);
        log.append(log_line(2)).unwrap();
        log.close();
        assert_eq!(seqs(&log, 0, true).await, vec![1, 2, 3]);
    }
}
