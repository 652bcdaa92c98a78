//! The runtime driven directly (with runc): a container whose job's task is
//! cut short — its `Container` dropped, never removed — is still deleted,
//! though the drop no longer waits for the runtime on the async thread.

use std::path::Path;
use std::time::Duration;

use crate::support::*;
use runnel::config::Config;
use runnel::model::Network;
use runnel::runtime::Runtime;
use runnel::runtime::rootfs::Rootfs;
use runnel::runtime::spec::{ContainerConfig, container_spec};

#[tokio::test(flavor = "multi_thread")]
async fn a_dropped_container_is_deleted() {
    require!(Root, Runc);
    let state = tempfile::tempdir().unwrap();
    let config = Config::from_toml(&format!(
        "state_dir = {:?}\n[runtime]\nkind = \"runc\"",
        state.path()
    ))
    .unwrap();
    let runtime =
        Runtime::new(&config.runtime.settings, state.path()).expect("runc (scripts/setup installs it)");
    let run = state.path().join("run");
    let (workspace, bundle) = (run.join("workspace"), run.join("bundle"));
    for d in [&workspace, &bundle] {
        std::fs::create_dir_all(d).unwrap();
    }
    let rootfs = Rootfs::overlay(&run.join("root"), &[Path::new("/")], None).unwrap();
    let id = "dropped";
    let cgroup = runtime.cgroup_path(id);
    let spec = container_spec(&ContainerConfig {
        hostname: id.into(),
        rootfs: rootfs.path().to_path_buf(),
        workspace,
        ssh_dir: None,
        home: "/root".into(),
        init: runtime.init_path().to_path_buf(),
        // Its own network namespace: the start brings lo up too.
        network: Network::None,
        resources: Default::default(),
        cgroup_path: cgroup.clone(),
        masked: vec![state.path().to_path_buf()],
        readonly_mounts: vec![],
        userns_base: None,
    });
    let container = runtime.start(id, &bundle, &spec).await.unwrap();
    assert!(
        !processes_in_cgroup(&cgroup).is_empty(),
        "the container's init is not running"
    );
    let state_of = state.path().join("runtime/runc").join(id);
    assert!(state_of.exists());

    drop(container);
    wait_for(
        "the dropped container's deletion",
        Duration::from_secs(20),
        || processes_in_cgroup(&cgroup).is_empty() && !state_of.exists(),
    );
    drop(rootfs);
    assert!(!run.join("root").exists());
}
