//! Job output and events: masking secrets, cutting output into chunks, the
//! on-disk event log with its per-job `seq`, and watchers that replay it and
//! follow it live. This module never runs processes and never decides a
//! job's state; it records what the lifecycle tells it.

pub mod budget;
pub mod eventlog;
pub mod mask;
pub mod output;

pub use eventlog::{EventLog, Tip};
pub use mask::Masker;
