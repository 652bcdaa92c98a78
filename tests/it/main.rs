//! The integration tests: one binary, a module per area. They drive the
//! real `runnel` binary, a real sshd, a real registry and real containers
//! through the helpers in `support`, and replay the fuzz corpus.

/// Begins a test that needs what a contributor's machine may lack, e.g.
/// `require!(Root, Sshd)` (see `support::Need`): where a need is unmet the
/// test returns at once after printing `skipped: TEST: REASON`, or fails
/// with that reason when `CI` is set.
macro_rules! require {
    ($($need:ident),+ $(,)?) => {
        if let Some(reason) = $crate::support::unmet(&[$($crate::support::Need::$need),+]) {
            fn here() {}
            $crate::support::skip(std::any::type_name_of_val(&here), &reason);
            return;
        }
    };
}

mod agent;
mod checkout;
mod cli;
mod disk;
mod fidelity;
mod fleet;
mod fuzz_corpus;
mod hostimg;
mod images;
mod lfs;
mod network;
mod runtime;
mod sandbox;
mod service;
mod services;
mod steps;
mod store;
mod support;
mod tls;
mod userns;
