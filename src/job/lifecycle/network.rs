//! The job's network: which one it gets (its own, the host's, or none),
//! and for a private one, its resolver file before the container starts
//! and its veth on the agent's bridge right after (before any step).

use std::path::PathBuf;

use super::{End, Phases, blocking};
use crate::model::{FailureKind, Network};
use crate::runtime::network::NetNs;

/// Under the run directory: the `/etc/resolv.conf` of a private job.
const RESOLV_CONF: &str = "resolv.conf";

impl Phases<'_> {
    /// The job's network: its own choice, else the agent's default.
    pub(super) fn network(&self) -> Network {
        match self.spec.container.network {
            Network::Default => self.registry.config().runtime.network,
            n => n,
        }
    }

    /// Writes the job's `resolv.conf` (a private network) and `hosts`
    /// (with services: their names); returns the (host path, container
    /// path) pairs to bind them at.
    pub(super) async fn prepare_network(&self, run_dir: PathBuf) -> Result<Vec<(PathBuf, String)>, End> {
        let mut files = Vec::new();
        if self.network() == Network::Private {
            files.push((RESOLV_CONF, self.registry.bridge.resolv_conf().to_string()));
        }
        if !self.spec.container.services.is_empty() {
            files.push((
                super::services::HOSTS,
                super::services::hosts_file(&self.spec.container.services),
            ));
        }
        let mut mounts = Vec::new();
        for (name, text) in files {
            let path = run_dir.join(name);
            let host = path.clone();
            blocking(move || std::fs::write(&host, text)).await.map_err(|e| {
                End::failed(FailureKind::Agent, format!("cannot write the job's {name}: {e}"))
            })?;
            mounts.push((path, format!("/etc/{name}")));
        }
        Ok(mounts)
    }

    /// Opens the started container's network namespace (held until the
    /// container is gone: see `NetNs`) and, for a private network,
    /// attaches it to the agent's bridge with the job slot's address.
    pub(super) async fn join_network(&self, held: &mut super::Held) -> Result<(), End> {
        let network = self.network();
        if network == Network::Host {
            return Ok(());
        }
        let failed = |e: String| {
            End::failed(
                FailureKind::Agent,
                format!("cannot set up the job's network: {e}"),
            )
        };
        let pid = held
            .container
            .as_ref()
            .and_then(|c| c.init_pid())
            .ok_or_else(|| failed("the container's init has no pid".into()))?;
        let ns = NetNs::of(pid).map_err(|e| failed(format!("cannot open its network namespace: {e}")))?;
        held.netns = Some(ns.clone());
        if network != Network::Private {
            return Ok(());
        }
        let (bridge, slot) = (self.registry.bridge.clone(), self.slot);
        // Nothing more to hold: the veth pair goes with the namespace.
        blocking(move || bridge.attach(slot, &ns)).await.map_err(failed)
    }
}
