//! Thin wrappers over the operating system that several modules need:
//! mounts (idmapped ones too), size-limited loop filesystems, user
//! namespaces for their mappings, lock files, network namespaces, wiping
//! files that held secrets, systemd's readiness notification, and malloc's
//! policy for large blocks. A leaf:
//! it uses no other module of the crate and knows nothing of jobs.

pub mod devfilter;
pub mod lockfile;
pub mod loopfs;
pub mod malloc;
pub mod mount;
pub mod netlink;
pub mod netns;
pub mod sd_notify;
pub mod tls;
pub mod userns;
pub mod wipe;
