//! A job's events and their on-disk encoding.
//!
//! A record is `len: u32` (of what follows), `seq: u64`, `time: u64` (ns
//! since the Unix epoch), `tag: u8`, then the body. Log chunks, which are
//! nearly all the volume, have a binary body (`step: u32`, `stream: u8`,
//! bytes); the rare structured events have a JSON body.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::model::CheckoutDone;
use crate::model::state::{JobStatus, StepResult};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Stream {
    Stdout,
    Stderr,
    /// The agent's own lines about the job.
    System,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    State(JobStatus),
    Checkout(CheckoutDone),
    StepStarted {
        index: u32,
        name: String,
    },
    Log {
        step: u32,
        stream: Stream,
        data: Vec<u8>,
    },
    StepFinished(StepResult),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub seq: u64,
    pub time: SystemTime,
    pub kind: EventKind,
}

pub(crate) const HEADER_LEN: usize = 4 + 8 + 8 + 1;

const TAG_STATE: u8 = 1;
const TAG_CHECKOUT: u8 = 2;
const TAG_STEP_STARTED: u8 = 3;
const TAG_LOG: u8 = 4;
const TAG_STEP_FINISHED: u8 = 5;

#[derive(Serialize, Deserialize)]
struct StepStartedBody {
    index: u32,
    name: String,
}

impl Event {
    /// Appends the encoded record to `out`.
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(&self.seq.to_le_bytes());
        let nanos = self
            .time
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64;
        out.extend_from_slice(&nanos.to_le_bytes());
        let json = |out: &mut Vec<u8>, tag: u8, v: &dyn erased::Json| {
            out.push(tag);
            v.write(out);
        };
        match &self.kind {
            EventKind::State(s) => json(out, TAG_STATE, s),
            EventKind::Checkout(c) => json(out, TAG_CHECKOUT, c),
            EventKind::StepStarted { index, name } => json(
                out,
                TAG_STEP_STARTED,
                &StepStartedBody {
                    index: *index,
                    name: name.clone(),
                },
            ),
            EventKind::StepFinished(r) => json(out, TAG_STEP_FINISHED, r),
            EventKind::Log { step, stream, data } => {
                out.push(TAG_LOG);
                out.extend_from_slice(&step.to_le_bytes());
                out.push(match stream {
                    Stream::Stdout => 1,
                    Stream::Stderr => 2,
                    Stream::System => 3,
                });
                out.extend_from_slice(data);
            }
        }
        let len = (out.len() - start - 4) as u32;
        out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    }

    /// Decodes one record (without its length prefix).
    pub(crate) fn decode(rec: &[u8]) -> Result<Event, String> {
        if rec.len() < HEADER_LEN - 4 {
            return Err("record shorter than its header".into());
        }
        let seq = u64::from_le_bytes(rec[0..8].try_into().unwrap());
        let nanos = u64::from_le_bytes(rec[8..16].try_into().unwrap());
        let tag = rec[16];
        let body = &rec[17..];
        let bad = |e: serde_json::Error| format!("event {seq}: {e}");
        let kind = match tag {
            TAG_STATE => EventKind::State(serde_json::from_slice(body).map_err(bad)?),
            TAG_CHECKOUT => EventKind::Checkout(serde_json::from_slice(body).map_err(bad)?),
            TAG_STEP_STARTED => {
                let b: StepStartedBody = serde_json::from_slice(body).map_err(bad)?;
                EventKind::StepStarted {
                    index: b.index,
                    name: b.name,
                }
            }
            TAG_STEP_FINISHED => EventKind::StepFinished(serde_json::from_slice(body).map_err(bad)?),
            TAG_LOG if body.len() >= 5 => EventKind::Log {
                step: u32::from_le_bytes(body[0..4].try_into().unwrap()),
                stream: match body[4] {
                    1 => Stream::Stdout,
                    2 => Stream::Stderr,
                    _ => Stream::System,
                },
                data: body[5..].to_vec(),
            },
            other => return Err(format!("event {seq}: unknown record tag {other}")),
        };
        Ok(Event {
            seq,
            time: UNIX_EPOCH + Duration::from_nanos(nanos),
            kind,
        })
    }
}

/// Lets `encode` serialise its different bodies through one closure.
mod erased {
    pub trait Json {
        fn write(&self, out: &mut Vec<u8>);
    }
    impl<T: serde::Serialize> Json for T {
        fn write(&self, out: &mut Vec<u8>) {
            serde_json::to_writer(out, self).expect("event bodies always serialise");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::state::JobStatus;

    #[test]
    fn records_round_trip() {
        let events = [
            EventKind::State(JobStatus::new("j".into())),
            EventKind::StepStarted {
                index: 2,
                name: "build".into(),
            },
            EventKind::Log {
                step: 2,
                stream: Stream::Stderr,
                data: b"\0\xffbytes\n".to_vec(),
            },
        ];
        for (i, kind) in events.into_iter().enumerate() {
            let e = Event {
                seq: i as u64 + 1,
                time: UNIX_EPOCH + Duration::from_nanos(1_234_567_890),
                kind,
            };
            let mut buf = Vec::new();
            e.encode(&mut buf);
            let len = u32::from_le_bytes(buf[0..4].try_into().unwrap()) as usize;
            assert_eq!(len, buf.len() - 4);
            assert_eq!(Event::decode(&buf[4..]).unwrap(), e);
        }
    }
}
