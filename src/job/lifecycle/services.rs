//! Service containers beside the steps (`container.services`): each a
//! container of its own image, sandboxed as the steps' is (the same
//! seccomp, capabilities, devices and limits, its own cgroup), in the
//! job's user and network namespaces — so a step reaches it at
//! `localhost:PORT`, and by its name through the job's `/etc/hosts`. Each
//! starts after the job's container and before the first step; the job
//! waits until it accepts connections on its ports (or fails naming it).
//! Its output goes to the job's log, every line marked `[NAME]`. It is
//! removed before the job's container (`Held`'s order).

use std::collections::BTreeMap;
use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use oci_spec::runtime::{LinuxNamespaceBuilder, LinuxNamespaceType};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{End, Held, ImageRoot, Phases};
use crate::logs::output::{CHUNK_CAP, Chunker, pump};
use crate::model::{EventKind, FailureKind, ServiceSpec, Stream as Out};
use crate::runtime::JobContainer;
use crate::runtime::image::LayerHold;
use crate::runtime::network::NetNs;
use crate::runtime::rootfs::Rootfs;
use crate::runtime::spec::{self as oci, ContainerConfig, DEFAULT_PATH};

/// Under the job's disk: each service's root and empty workspace.
const SERVICES: &str = "services";
/// Under the run directory: the job's `/etc/hosts` when it has services.
pub(super) const HOSTS: &str = "hosts";

/// A running service and what it holds, let go of in this order.
#[derive(Debug, Default)]
pub(super) struct Service {
    pub container: Option<Box<dyn JobContainer>>,
    /// Its process's wait and output pumps; ends once the container goes.
    pub task: Option<tokio::task::JoinHandle<()>>,
    /// How its process ended, once it has.
    pub exit: Arc<std::sync::Mutex<Option<String>>>,
    pub rootfs: Option<Rootfs>,
    pub layers: Option<Arc<Vec<LayerHold>>>,
}

/// The job's `/etc/hosts`: its services' names on loopback.
pub(super) fn hosts_file(services: &[ServiceSpec]) -> String {
    let mut s = String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
    for svc in services {
        s.push_str(&format!("127.0.0.1\t{}\n", svc.name));
    }
    s
}

impl Phases<'_> {
    /// Starts every service and waits until each accepts connections.
    pub(super) async fn start_services(&self, held: &mut Held) -> Result<(), End> {
        let services = &self.spec.container.services;
        if services.is_empty() {
            return Ok(());
        }
        let pid = held
            .container
            .as_ref()
            .and_then(|c| c.init_pid())
            .ok_or_else(|| End::failed(FailureKind::Agent, "the job's container has no init pid"))?;
        let ns = held
            .netns
            .clone()
            .ok_or_else(|| End::failed(FailureKind::Agent, "the job's network namespace is not open"))?;
        for (i, svc) in services.iter().enumerate() {
            held.services.push(Service::default());
            let at = held.services.len() - 1;
            self.start_service(i, svc, pid, held, at).await?;
        }
        for (i, svc) in services.iter().enumerate() {
            self.wait_ready(svc, &ns, &held.services[i]).await?;
            self.job
                .system_line(0, &format!("runnel: service {} is ready", svc.name));
        }
        Ok(())
    }

    async fn start_service(
        &self,
        index: usize,
        svc: &ServiceSpec,
        job_pid: i32,
        held: &mut Held,
        at: usize,
    ) -> Result<(), End> {
        let failed = |e: String| {
            End::failed(
                FailureKind::Service,
                format!("service {:?} did not start: {e}", svc.name),
            )
        };
        let (registry, job) = (self.registry, self.job);
        let image = match (svc.image.as_str(), self.spec.container.image.as_str()) {
            ("", "") => registry.config().runtime.image.clone(),
            ("", job_image) => job_image.to_string(),
            (i, _) => i.to_string(),
        };
        job.system_line(0, &format!("runnel: starting service {} ({image})", svc.name));
        let dir = held.disk().join(SERVICES).join(&svc.name);
        let workspace = dir.join("workspace");
        let mode = crate::job::dir_mode(self.userns_base.is_some());
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(mode)
            .create(&workspace)
            .map_err(|e| failed(format!("cannot make its directory: {e}")))?;
        if let Some(b) = self.userns_base {
            let _ = nix::unistd::chown(&workspace, Some(b.into()), Some(b.into()));
        }
        let mut root = ImageRoot::default();
        let prepared = self.image_root(&image, dir.join("root"), &mut root).await;
        let service = &mut held.services[at];
        service.layers = root.layers;
        service.rootfs = root.rootfs;
        let prepared = prepared.map_err(|e| failed(e.message))?;
        let command = if svc.command.is_empty() {
            prepared.command.clone()
        } else {
            svc.command.clone()
        };
        if command.is_empty() {
            return Err(failed(format!(
                "image {image:?} names no Entrypoint or Cmd; give the service a command"
            )));
        }
        let config = registry.config();
        let id = format!("{}.svc-{index}", job.id);
        let container_config = ContainerConfig {
            hostname: svc.name.clone(),
            rootfs: service.rootfs.as_ref().expect("prepared").path().to_path_buf(),
            workspace,
            ssh_dir: None,
            home: prepared.user.home.clone(),
            init: registry.runtime.init_path().to_path_buf(),
            network: crate::model::Network::None,
            resources: self.resources(),
            cgroup_path: registry.runtime.cgroup_path(&id),
            userns_base: self.userns_base,
            readonly_mounts: vec![(held.run_dir().join(HOSTS), "/etc/hosts".to_string())],
            masked: config.private_paths.clone(),
        };
        let mut spec = oci::container_spec(&container_config);
        join_namespaces(&mut spec, job_pid);
        let bundle = held.run_dir().join(format!("bundle-svc-{index}"));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&bundle)
            .map_err(|e| failed(format!("cannot make its bundle: {e}")))?;
        let runtime: &dyn crate::runtime::ContainerRuntime = &registry.runtime;
        let container = runtime
            .start(&id, &bundle, &spec)
            .await
            .map_err(|e| failed(e.to_string()))?;
        let service = &mut held.services[at];
        let container = service.container.insert(container);

        let mut env = BTreeMap::new();
        env.insert("PATH".to_string(), DEFAULT_PATH.to_string());
        for kv in &prepared.env {
            if let Some((k, v)) = kv.split_once('=') {
                env.insert(k.to_string(), v.to_string());
            }
        }
        env.insert("HOME".into(), prepared.user.home.clone());
        env.extend(svc.env.clone());
        let cwd = prepared.workdir.clone().unwrap_or_else(|| "/".to_string());
        let process = oci::process(command, &env, &cwd, &prepared.user);
        let pipes = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .and_then(|o| nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map(|e| (o, e)));
        let ((out_r, out_w), (err_r, err_w)) =
            pipes.map_err(|e| failed(format!("cannot create pipes: {e}")))?;
        let (mut child, process_file) = container
            .exec(&process, out_w, err_w)
            .map_err(|e| failed(e.to_string()))?;
        let masker = job.masker.get().cloned().expect("set before any phase");
        let exited = CancellationToken::new();
        let pump_to_log = |pipe, stream: Out| {
            let job = job.clone();
            let chunker = Chunker::new(masker.clone(), CHUNK_CAP);
            let mut marked = Marker::new(&svc.name);
            pump(pipe, chunker, exited.clone(), move |data: Vec<u8>| {
                job.emit(EventKind::Log {
                    step: 0,
                    stream,
                    data: marked.mark(&data),
                })
            })
        };
        let (out, err) = (pump_to_log(out_r, Out::Stdout), pump_to_log(err_r, Out::Stderr));
        let (job2, name, exit) = (job.clone(), svc.name.clone(), service.exit.clone());
        service.task = Some(tokio::spawn(async move {
            let _process_file = process_file;
            let wait = async {
                let status = child.wait().await;
                exited.cancel();
                status
            };
            let (status, _, _) = tokio::join!(wait, out, err);
            let how = match status {
                Ok(s) => s.to_string(),
                Err(e) => format!("cannot wait for it: {e}"),
            };
            job2.system_line(0, &format!("runnel: service {name} exited ({how})"));
            *exit.lock().unwrap_or_else(|e| e.into_inner()) = Some(how);
        }));
        Ok(())
    }

    /// Waits until `svc` accepts TCP connections on each of its ports in
    /// the job's network namespace, for its readiness timeout at most.
    async fn wait_ready(&self, svc: &ServiceSpec, ns: &NetNs, service: &Service) -> Result<(), End> {
        if svc.ports.is_empty() {
            return Ok(());
        }
        let timeout = svc
            .readiness_timeout
            .unwrap_or(crate::model::spec::SERVICE_READINESS_TIMEOUT);
        let give_up = Arc::new(AtomicBool::new(false));
        let deadline = std::time::Instant::now() + timeout;
        let ports = svc.ports.clone();
        let (stop, ns) = (give_up.clone(), ns.clone());
        let mut probe = tokio::task::spawn_blocking(move || {
            crate::runtime::network::wait_accepting(&ns, &ports, deadline, &stop)
        });
        let exited = async {
            loop {
                if service.task.as_ref().is_none_or(|t| t.is_finished()) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        let started = Instant::now();
        let result = tokio::select! {
            r = &mut probe => r.unwrap_or_else(|e| Err(std::io::Error::other(e).into())),
            _ = exited => {
                give_up.store(true, Ordering::Relaxed);
                let _ = probe.await;
                let how = service.exit.lock().unwrap_or_else(|e| e.into_inner()).clone().unwrap_or_default();
                return Err(End::failed(
                    FailureKind::Service,
                    format!(
                        "service {:?} exited ({how}) before it accepted connections (its output is in the log, \
                         marked [{}])",
                        svc.name, svc.name
                    ),
                ));
            }
            why = self.limits.interrupted(None) => {
                give_up.store(true, Ordering::Relaxed);
                let _ = probe.await;
                return Err(why.end(&format!("the start of service {:?}", svc.name)));
            }
        };
        match result {
            Ok(()) => {
                tracing::info!(service = %svc.name, seconds = started.elapsed().as_secs_f64(), "service ready");
                Ok(())
            }
            Err(crate::runtime::network::NotReady::Port(port)) => Err(End::failed(
                FailureKind::Service,
                format!(
                    "service {:?} did not accept connections on port {port} within its readiness timeout of {} \
                     (container.services[].readiness_timeout)",
                    svc.name,
                    humantime::format_duration(timeout)
                ),
            )),
            Err(crate::runtime::network::NotReady::Io(e)) => Err(End::failed(
                FailureKind::Agent,
                format!("cannot wait for service {:?}: {e}", svc.name),
            )),
        }
    }
}

/// The job container's user and network namespaces, for a service to
/// join (its id mappings stay in the spec: they are the job's, and runc
/// checks them against the namespace's).
fn join_namespaces(spec: &mut oci_spec::runtime::Spec, job_pid: i32) {
    let Some(linux) = spec.linux_mut() else { return };
    let mut namespaces = linux.namespaces().clone().unwrap_or_default();
    namespaces.retain(|n| !matches!(n.typ(), LinuxNamespaceType::User | LinuxNamespaceType::Network));
    for (typ, name) in [
        (LinuxNamespaceType::User, "user"),
        (LinuxNamespaceType::Network, "net"),
    ] {
        namespaces.push(
            LinuxNamespaceBuilder::default()
                .typ(typ)
                .path(PathBuf::from(format!("/proc/{job_pid}/ns/{name}")))
                .build()
                .expect("namespace fields set"),
        );
    }
    linux.set_namespaces(Some(namespaces));
}

/// Puts `[NAME] ` at the start of every line of a service's output.
struct Marker {
    prefix: Vec<u8>,
    at_line_start: bool,
}

impl Marker {
    fn new(name: &str) -> Marker {
        Marker {
            prefix: format!("[{name}] ").into_bytes(),
            at_line_start: true,
        }
    }

    fn mark(&mut self, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(data.len() + self.prefix.len());
        for &b in data {
            if self.at_line_start {
                out.extend_from_slice(&self.prefix);
            }
            out.push(b);
            self.at_line_start = b == b'\n';
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_line_is_marked_across_chunks() {
        let mut m = Marker::new("db");
        let mut out = m.mark(b"one\ntw");
        out.extend(m.mark(b"o\nthree"));
        assert_eq!(String::from_utf8(out).unwrap(), "[db] one\n[db] two\n[db] three");
    }

    #[test]
    fn services_are_named_in_hosts() {
        let svc = ServiceSpec {
            name: "postgres".into(),
            ..Default::default()
        };
        assert!(hosts_file(&[svc]).contains("127.0.0.1\tpostgres\n"));
    }
}
