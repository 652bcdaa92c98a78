//! The store that caches, workspaces, artifacts and test results go to,
//! shared by a fleet of agents: keys scoped by project, objects verified
//! against their digests, and the JUnit reader for test results.

pub mod junit;
