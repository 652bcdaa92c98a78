//! The integration tests: one binary, one module per area, all driving the
//! real `runnel` binary, a real sshd, a real registry and real containers
//! through the helpers in `support`.

mod agent;
mod checkout;
mod cli;
mod fuzz_corpus;
mod images;
mod service;
mod support;
mod tls;
