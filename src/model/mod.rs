//! The job's model, as plain Rust: what a scheduler asks for ([`spec`]), the
//! states and failure kinds a job goes through ([`state`]), the events its
//! log records ([`event`]), what a checkout produced ([`checkout`]) and
//! secret values as a type ([`secret`]). A leaf: it uses no other module of
//! the crate, does no I/O, and every other module may use it.

pub mod checkout;
pub mod event;
pub mod secret;
pub mod spec;
pub mod state;

pub use checkout::{CheckoutDone, KeyKind, SubmoduleDone};
pub use event::{Event, EventKind, Stream};
pub use secret::{MASK, Secret};
pub use spec::{CheckoutSpec, JobSpec, Network, Resources, ServiceSpec, SpecError, Step, StepKind, When};
pub use state::{FailureKind, JobState, JobStatus, StepResult, TestFailure, TestResults};
