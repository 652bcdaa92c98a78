//! runnel: a CI build agent. A scheduler hands it jobs over gRPC; for each
//! job it installs the job's SSH keys with pinned host keys, checks out the
//! repository and its submodules with libgit2 (user key before deploy key),
//! runs the steps in a clean container and streams every byte of output.

pub mod api;
pub mod checkout;
pub mod cli;
pub mod config;
pub mod job;
pub mod logs;
pub mod metrics;
pub mod model;
pub mod runtime;
pub mod ssh;
pub mod sys;
