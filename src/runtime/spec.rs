//! The OCI runtime spec of a job container and the process spec of a step:
//! own mount, PID, IPC, UTS and cgroup namespaces (and network, unless the
//! job shares the host's), no new privileges, a reduced capability set
//! (nothing inheritable or ambient), runnel's seccomp filter, Docker's
//! device allow-list, cgroup files read-only, a fresh `/tmp`, the
//! workspace at `/workspace`, the job's ssh directory read-only at
//! `$HOME/.ssh`, agent paths masked, and resource limits.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use oci_spec::runtime::{
    Capability, LinuxBuilder, LinuxCapabilities, LinuxCapabilitiesBuilder, LinuxCpuBuilder,
    LinuxDeviceCgroup, LinuxDeviceCgroupBuilder, LinuxDeviceType, LinuxIdMappingBuilder, LinuxMemoryBuilder,
    LinuxNamespaceBuilder, LinuxNamespaceType, LinuxPidsBuilder, LinuxResourcesBuilder, Mount, MountBuilder,
    Process, ProcessBuilder, RootBuilder, Spec, SpecBuilder, UserBuilder,
};

use super::user::User;
use super::{cgroup, seccomp};
use crate::model::spec::{Network, Resources};

pub const USERNS_SIZE: u32 = 65_536;

/// Where runnel's init is mounted in every container.
pub const INIT_PATH: &str = "/dev/.runnel-init";
pub const WORKSPACE: &str = "/workspace";
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[derive(Debug, Clone)]
pub struct ContainerConfig {
    pub hostname: String,
    /// The prepared root filesystem (a fresh writable layer over the image).
    pub rootfs: PathBuf,
    pub workspace: PathBuf,
    /// Mounted read-only at `$HOME/.ssh`.
    pub ssh_dir: Option<PathBuf>,
    pub home: String,
    /// The static init on the host.
    pub init: PathBuf,
    pub network: Network,
    pub resources: Resources,
    /// Absolute cgroup path, e.g. `/runnel.abcd/job-1`.
    pub cgroup_path: String,
    /// Host paths to hide inside the container (the agent's state, tokens).
    pub masked: Vec<PathBuf>,
    /// (host path, container path) bound read-only, e.g. checkout caches.
    pub readonly_mounts: Vec<(PathBuf, String)>,
    /// A user namespace whose root is this host uid/gid.
    pub userns_base: Option<u32>,
}

/// A build needs these; the rest (SYS_ADMIN, NET_ADMIN, SYS_PTRACE, ...) are
/// dropped. Docker's default set without NET_RAW (raw sockets: spoofing
/// on a shared network), MKNOD (device nodes) and AUDIT_WRITE.
const CAPABILITIES: &[Capability] = &[
    Capability::Chown,
    Capability::DacOverride,
    Capability::Fowner,
    Capability::Fsetid,
    Capability::Kill,
    Capability::NetBindService,
    Capability::Setfcap,
    Capability::Setgid,
    Capability::Setpcap,
    Capability::Setuid,
    Capability::SysChroot,
];

/// Bounding, effective and permitted: [`CAPABILITIES`]; inheritable and
/// ambient empty, so that nothing passes capabilities to a program
/// through `execve` (oci-spec's defaults would fill them).
fn capabilities() -> LinuxCapabilities {
    let set: oci_spec::runtime::Capabilities = CAPABILITIES.iter().copied().collect();
    LinuxCapabilitiesBuilder::default()
        .bounding(set.clone())
        .effective(set.clone())
        .permitted(set)
        .inheritable(oci_spec::runtime::Capabilities::new())
        .ambient(oci_spec::runtime::Capabilities::new())
        .build()
        .expect("capability sets are complete")
}

/// Docker's default device allow-list: everything denied, then read,
/// write and mknod of null, zero, full, random, urandom, tty, console,
/// ptmx and the pts. (No `c *:* m`, `b *:* m`: a step cannot make other
/// nodes, and none it finds opens.)
fn devices() -> Vec<LinuxDeviceCgroup> {
    let rule = |allow: bool, typ: LinuxDeviceType, major: Option<i64>, minor: Option<i64>| {
        let mut b = LinuxDeviceCgroupBuilder::default()
            .allow(allow)
            .typ(typ)
            .access("rwm");
        if let Some(m) = major {
            b = b.major(m);
        }
        if let Some(m) = minor {
            b = b.minor(m);
        }
        b.build().expect("device rule fields set")
    };
    let char_dev = |major, minor| rule(true, LinuxDeviceType::C, Some(major), minor);
    vec![
        rule(false, LinuxDeviceType::A, None, None),
        char_dev(1, Some(3)), // null
        char_dev(1, Some(5)), // zero
        char_dev(1, Some(7)), // full
        char_dev(1, Some(8)), // random
        char_dev(1, Some(9)), // urandom
        char_dev(5, Some(0)), // tty
        char_dev(5, Some(1)), // console
        char_dev(5, Some(2)), // ptmx
        char_dev(136, None),  // pts/*
    ]
}

/// [`devices`]' allow rules as the cgroup v2 device filter takes them.
pub fn device_filter() -> Vec<crate::sys::devfilter::Allow> {
    use crate::sys::devfilter::{Allow, Kind, MKNOD, READ, WRITE};
    devices()
        .iter()
        .filter(|d| d.allow())
        .filter_map(|d| {
            let kind = match d.typ()? {
                LinuxDeviceType::C | LinuxDeviceType::U => Kind::Char,
                LinuxDeviceType::B => Kind::Block,
                _ => return None,
            };
            let access = d.access().as_deref().unwrap_or("rwm");
            let bit = |c: char, b: u32| if access.contains(c) { b } else { 0 };
            Some(Allow {
                kind,
                major: d.major().map(|m| m as u32),
                minor: d.minor().map(|m| m as u32),
                access: bit('r', READ) | bit('w', WRITE) | bit('m', MKNOD),
            })
        })
        .collect()
}

fn mount(dest: &str, typ: &str, source: &str, options: &[&str]) -> Mount {
    MountBuilder::default()
        .destination(dest)
        .typ(typ)
        .source(source)
        .options(options.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .build()
        .expect("mount fields are complete")
}

fn bind(source: &Path, dest: &str, readonly: bool) -> Mount {
    let mut opts = vec!["rbind", "nosuid", "nodev"];
    opts.push(if readonly { "ro" } else { "rw" });
    mount(dest, "bind", &source.to_string_lossy(), &opts)
}

/// A process running as `user` in the container with our capability set.
pub fn process(args: Vec<String>, env: &BTreeMap<String, String>, cwd: &str, user: &User) -> Process {
    let env: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    ProcessBuilder::default()
        .terminal(false)
        .user(
            UserBuilder::default()
                .uid(user.uid)
                .gid(user.gid)
                .build()
                .expect("uid and gid set"),
        )
        .args(args)
        .env(env)
        .cwd(cwd)
        .capabilities(capabilities())
        .no_new_privileges(true)
        .build()
        .expect("process fields are complete")
}

pub fn container_spec(c: &ContainerConfig) -> Spec {
    let mut mounts = vec![
        mount("/proc", "proc", "proc", &["nosuid", "noexec", "nodev"]),
        mount(
            "/dev",
            "tmpfs",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        ),
        mount(
            "/dev/pts",
            "devpts",
            "devpts",
            &["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"],
        ),
        mount(
            "/dev/shm",
            "tmpfs",
            "shm",
            &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        ),
        mount("/dev/mqueue", "mqueue", "mqueue", &["nosuid", "noexec", "nodev"]),
        mount("/tmp", "tmpfs", "tmpfs", &["nosuid", "nodev", "mode=1777"]),
    ];
    // sysfs can only be mounted in a network namespace of our own.
    if c.network != Network::Host {
        mounts.push(mount(
            "/sys",
            "sysfs",
            "sysfs",
            &["nosuid", "noexec", "nodev", "ro"],
        ));
    } else {
        mounts.push(mount(
            "/sys",
            "bind",
            "/sys",
            &["rbind", "nosuid", "noexec", "nodev", "ro"],
        ));
    }
    mounts.push(mount(
        "/sys/fs/cgroup",
        "cgroup",
        "cgroup",
        &["nosuid", "noexec", "nodev", "relatime", "ro"],
    ));
    mounts.push(bind(&c.init, INIT_PATH, true));
    mounts.push(bind(&c.workspace, WORKSPACE, false));
    for (host, dest) in &c.readonly_mounts {
        mounts.push(bind(host, dest, true));
    }
    if let Some(ssh) = &c.ssh_dir {
        mounts.push(bind(ssh, &format!("{}/.ssh", c.home.trim_end_matches('/')), true));
    }

    let mut namespaces = vec![
        LinuxNamespaceType::Pid,
        LinuxNamespaceType::Ipc,
        LinuxNamespaceType::Uts,
        LinuxNamespaceType::Mount,
        LinuxNamespaceType::Cgroup,
    ];
    if c.network != Network::Host {
        namespaces.push(LinuxNamespaceType::Network);
    }
    if c.userns_base.is_some() {
        namespaces.push(LinuxNamespaceType::User);
    }
    let namespaces: Vec<_> = namespaces
        .into_iter()
        .map(|t| {
            LinuxNamespaceBuilder::default()
                .typ(t)
                .build()
                .expect("namespace type set")
        })
        .collect();

    let mut resources = LinuxResourcesBuilder::default();
    if let Some(m) = c.resources.memory_bytes {
        resources = resources.memory(
            LinuxMemoryBuilder::default()
                .limit(m as i64)
                .swap(m as i64)
                .build()
                .expect("memory fields set"),
        );
    }
    resources = resources.devices(devices());
    if let Some(p) = c.resources.max_pids {
        resources = resources.pids(
            LinuxPidsBuilder::default()
                .limit(p as i64)
                .build()
                .expect("pids set"),
        );
    }
    if let Some(millis) = c.resources.cpu_millis {
        resources = resources.cpu(
            LinuxCpuBuilder::default()
                .period(100_000u64)
                .quota(millis as i64 * 100)
                .build()
                .expect("cpu fields set"),
        );
    }

    let mut masked: Vec<String> = [
        "/proc/acpi",
        "/proc/asound",
        "/proc/kcore",
        "/proc/keys",
        "/proc/latency_stats",
        "/proc/timer_list",
        "/proc/timer_stats",
        "/proc/sched_debug",
        "/proc/scsi",
        "/sys/firmware",
        "/sys/devices/virtual/powercap",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    masked.extend(c.masked.iter().map(|p| p.to_string_lossy().to_string()));

    let mut linux = LinuxBuilder::default();
    if let Some(base) = c.userns_base {
        let map = vec![
            LinuxIdMappingBuilder::default()
                .container_id(0u32)
                .host_id(base)
                .size(USERNS_SIZE)
                .build()
                .expect("mapping fields set"),
        ];
        linux = linux.uid_mappings(map.clone()).gid_mappings(map);
    }
    let mut readonly: Vec<String> = [
        "/proc/bus",
        "/proc/fs",
        "/proc/irq",
        "/proc/sys",
        "/proc/sysrq-trigger",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    // libcontainer mounts cgroup v1 hierarchies writable whatever the
    // mount's options say; read-only paths are remounted by every runtime.
    readonly.extend(cgroup::mount_points());
    let linux = linux
        .namespaces(namespaces)
        .cgroups_path(PathBuf::from(&c.cgroup_path))
        .resources(resources.build().expect("resources are complete"))
        .masked_paths(masked)
        .readonly_paths(readonly)
        .seccomp(seccomp::oci_profile())
        .build()
        .expect("linux fields are complete");

    let mut env = BTreeMap::new();
    env.insert("PATH".to_string(), DEFAULT_PATH.to_string());
    SpecBuilder::default()
        .version("1.0.2")
        .hostname(c.hostname.clone())
        .root(
            RootBuilder::default()
                .path(&c.rootfs)
                .readonly(false)
                .build()
                .expect("root fields set"),
        )
        .process(process(vec![INIT_PATH.to_string()], &env, "/", &User::root()))
        .mounts(mounts)
        .linux(linux)
        .build()
        .expect("spec fields are complete")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> ContainerConfig {
        ContainerConfig {
            hostname: "job".into(),
            rootfs: "/r".into(),
            workspace: "/w".into(),
            ssh_dir: Some("/s".into()),
            home: "/root".into(),
            init: "/i".into(),
            network: Network::None,
            resources: Resources {
                memory_bytes: Some(64 << 20),
                max_pids: Some(100),
                cpu_millis: Some(500),
                disk_bytes: None,
            },
            cgroup_path: "/runnel.x/job".into(),
            masked: vec!["/var/lib/runnel".into()],
            readonly_mounts: vec![],
            userns_base: None,
        }
    }

    #[test]
    fn the_spec_isolates_and_limits() {
        let spec = container_spec(&config());
        let json = serde_json::to_value(&spec).unwrap();
        let linux = &json["linux"];
        let ns: Vec<&str> = linux["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["type"].as_str().unwrap())
            .collect();
        for want in ["pid", "ipc", "uts", "mount", "network"] {
            assert!(ns.contains(&want), "{ns:?}");
        }
        assert_eq!(linux["resources"]["memory"]["limit"], 64 << 20);
        assert_eq!(linux["resources"]["pids"]["limit"], 100);
        assert_eq!(linux["resources"]["cpu"]["quota"], 50_000);
        assert!(linux["maskedPaths"].to_string().contains("/var/lib/runnel"));
        assert_eq!(json["process"]["noNewPrivileges"], true);
        let caps = json["process"]["capabilities"]["bounding"].to_string();
        assert!(
            !caps.contains("CAP_SYS_ADMIN") && caps.contains("CAP_CHOWN"),
            "{caps}"
        );
        for dropped in ["CAP_NET_RAW", "CAP_MKNOD", "CAP_AUDIT_WRITE"] {
            assert!(!caps.contains(dropped), "{caps}");
        }
        for empty in ["inheritable", "ambient"] {
            assert_eq!(
                json["process"]["capabilities"][empty],
                serde_json::json!([]),
                "{empty}"
            );
        }
        assert_eq!(
            linux["seccomp"],
            serde_json::to_value(seccomp::oci_profile()).unwrap()
        );
        let devices = linux["resources"]["devices"].as_array().unwrap();
        assert_eq!(
            devices[0],
            serde_json::json!({"allow": false, "type": "a", "access": "rwm"})
        );
        assert_eq!(devices.len(), 10);
        assert!(
            devices[1..]
                .iter()
                .all(|d| d["allow"] == true && d["type"] == "c")
        );
        let readonly = linux["readonlyPaths"].to_string();
        assert!(readonly.contains("\"/sys/fs/cgroup\""), "{readonly}");
        let mounts = json["mounts"].to_string();
        assert!(mounts.contains("\"/workspace\"") && mounts.contains("\"/root/.ssh\""));
    }

    #[test]
    fn host_network_has_no_network_namespace() {
        let mut c = config();
        c.network = Network::Host;
        let json = serde_json::to_value(container_spec(&c)).unwrap();
        assert!(!json["linux"]["namespaces"].to_string().contains("network"));
    }
}
