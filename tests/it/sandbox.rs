//! The container as a security boundary, tried as an attacker would: each
//! test runs hostile steps (a static C program built at test time,
//! `support/attack.c`) with the embedded runtime and with runc, and asserts
//! that the kernel stopped every attempt and with which error. (crun
//! refuses this cgroup-v1-hybrid host and is not tried here.)

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use crate::support::image::{Entry, busybox_layer, write_layout};
use crate::support::*;
use runnel::api::pb;

pub(crate) const RUNTIMES: &[&str] = &["libcontainer", "runc"];

/// The attack program, built once per test run as a static executable.
/// It is installed on the host under /usr/local/libexec/runnel-tests: the
/// `host` image shows the host's /usr, and nothing of where the checkout
/// or /var/tmp are.
pub(crate) fn attack() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let dir = Path::new("/usr/local/libexec/runnel-tests");
        std::fs::create_dir_all(dir).unwrap();
        let out = dir.join("runnel-attack");
        let tmp = dir.join(format!("runnel-attack.{}", std::process::id()));
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/support/attack.c");
        let status = std::process::Command::new("cc")
            .args(["-static", "-O2", "-Wall", "-o"])
            .arg(&tmp)
            .arg(&source)
            .arg("-lpthread")
            .status()
            .expect("run cc (gcc and libc6-dev are needed)");
        assert!(status.success(), "building {} failed", source.display());
        std::fs::rename(&tmp, &out).unwrap();
        out
    })
}

/// An agent with runtime `kind`; `top` holds top-level settings.
pub(crate) fn agent(kind: &str, top: &str) -> Agent {
    agent_with(kind, top, "")
}

/// An agent with runtime `kind` and more `[runtime]` settings.
fn agent_with(kind: &str, top: &str, runtime: &str) -> Agent {
    Agent::start(&format!(
        "{top}\n[runtime]\nkind = \"{kind}\"\ngrace_period = \"1s\"\n{runtime}"
    ))
}

/// `name: result` lines of the attack program, by name.
pub(crate) fn results(out: &str) -> BTreeMap<String, String> {
    out.lines()
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

pub(crate) fn assert_results(out: &str, want: &[(&str, &str)], context: &str) {
    let got = results(out);
    for (name, result) in want {
        assert_eq!(
            got.get(*name).map(String::as_str),
            Some(*result),
            "{name} ({context})\n{out}"
        );
    }
}

/// The host pid of the attack program running with `args`, once there is
/// exactly one.
pub(crate) fn waiting_attack(args: &[&str]) -> Vec<u32> {
    let mut found = Vec::new();
    wait_for(
        &format!("attack {}", args.join(" ")),
        Duration::from_secs(60),
        || {
            found = attacking(args);
            found.len() == 1
        },
    );
    found
}

/// Host pids of the attack program running with `args`.
pub(crate) fn attacking(args: &[&str]) -> Vec<u32> {
    host_processes_with(&args.join(" "))
        .into_iter()
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let argv: Vec<&[u8]> = cmdline.split(|b| *b == 0).filter(|a| !a.is_empty()).collect();
            argv.first().is_some_and(|a0| a0.ends_with(b"attack"))
                && argv[1..].iter().copied().eq(args.iter().map(|a| a.as_bytes()))
        })
        .collect()
}

/// Submits `spec`, whose step touches `/workspace/ready` and then waits,
/// and returns once it is there with the job's workspace as the host sees
/// it.
pub(crate) async fn submit_until_ready(agent: &Agent, c: &mut Client, spec: pb::JobSpec) -> PathBuf {
    let ws = agent
        .state_dir()
        .join("jobs")
        .join(&spec.job_id)
        .join("run/disk/workspace");
    let status = ws
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("status.json");
    submit(c, spec).await;
    wait_for("the step to be ready", Duration::from_secs(60), || {
        // A job that ended before its step was ready: say how.
        let now = std::fs::read_to_string(&status).unwrap_or_default();
        assert!(
            now.is_empty() || now.contains("\"finished\": null"),
            "the job ended: {now}\n{}",
            agent.log()
        );
        ws.join("ready").exists()
    });
    ws
}

/// Bounding, effective and permitted: chown, dac_override, fowner,
/// fsetid, kill, setgid, setuid, setpcap, net_bind_service, sys_chroot,
/// setfcap. Not net_raw (13), mknod (27), audit_write (29).
const CAPS: &str = "00000000800405fb";

#[tokio::test(flavor = "multi_thread")]
async fn seccomp_stops_namespaces_keyrings_mounts_bpf_and_perf_in_init_and_steps() {
    require!(Root, Runc);
    let a = attack().display().to_string();
    let step = format!(
        "grep -E '^(NoNewPrivs|Seccomp|CapInh|CapPrm|CapEff|CapBnd|CapAmb):' /proc/self/status | tr -s '\\t ' ' '
         echo \"init $(grep '^Seccomp:' /proc/1/status | tr -s '\\t ' ' ')\"
         for x in unshare-user unshare-mount clone-user clone3 setns mount keyring bpf perf userfaultfd \
                  io-uring personality thread; do {a} $x; done
         echo \"unshare -U: $(unshare -U true 2>&1)\""
    );
    for kind in RUNTIMES {
        let agent = agent(kind, "");
        let (status, events) = run_job(&agent, job("filtered", &[&step])).await;
        let out = output(&events, pb::Stream::Stdout);
        assert_eq!(
            state(&status),
            pb::JobState::Succeeded,
            "{kind}: {}\n{out}\n{}",
            status.message,
            output(&events, pb::Stream::Stderr)
        );
        assert_results(
            &out,
            &[
                ("NoNewPrivs", "1"),
                ("Seccomp", "2"),
                ("init Seccomp", "2"),
                ("CapInh", "0000000000000000"),
                ("CapAmb", "0000000000000000"),
                ("CapBnd", CAPS),
                ("CapEff", CAPS),
                ("CapPrm", CAPS),
                ("unshare-user", "EPERM"),
                ("unshare-mount", "EPERM"),
                ("clone-user", "EPERM"),
                // libc then falls back to clone, which the filter can see:
                ("clone3", "ENOSYS"),
                ("thread", "ok"),
                ("setns", "EPERM"),
                ("mount", "EPERM"),
                ("keyring", "EPERM"),
                ("bpf", "EPERM"),
                ("perf", "EPERM"),
                ("userfaultfd", "EPERM"),
                ("io-uring", "EPERM"),
                ("personality", "EPERM"),
                ("unshare -U", "unshare: unshare failed: Operation not permitted"),
            ],
            kind,
        );
    }
}

/// Every hierarchy's directory of the cgroup `path` that exists.
fn cgroup_dirs(path: &str) -> Vec<PathBuf> {
    std::fs::read_dir("/sys/fs/cgroup")
        .unwrap()
        .flatten()
        .map(|h| h.path().join(path.trim_start_matches('/')))
        .filter(|d| d.is_dir())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_step_sees_only_its_own_cgroup_cannot_write_it_and_what_was_made_in_it_goes() {
    require!(Root, Runc);
    let a = attack().display().to_string();
    // try LABEL ATTACK ARGS: the attack's line under its own label.
    let step = format!(
        "try() {{ l=$1; shift; {a} \"$@\" | sed \"s|^[^:]*:|$l:|\"; }}
         try memory.limit_in_bytes write /sys/fs/cgroup/memory/memory.limit_in_bytes 2147483648
         try pids.max write /sys/fs/cgroup/pids/pids.max max
         try devices.allow write /sys/fs/cgroup/devices/devices.allow a
         try mkdir-memory mkdir /sys/fs/cgroup/memory/escape
         try mkdir-systemd mkdir /sys/fs/cgroup/systemd/escape
         try mkdir-unified mkdir /sys/fs/cgroup/unified/escape
         try mkdir-root mkdir /sys/fs/cgroup/escape
         echo \"own cgroup: $(cut -d: -f3 /proc/self/cgroup | sort -u | tr '\\n' ' ')\"
         echo \"other cgroups: $(find /sys/fs/cgroup -mindepth 2 -type d | wc -l)\"
         touch /workspace/ready
         {a} wait-for /workspace/go"
    );
    // The cgroup files are read-only mounts, and in a user namespace (the
    // default) they belong to host root besides, which the namespace does
    // not map: the mounts alone without one (EROFS), both with (EACCES).
    let configs = [("userns = false", "EROFS"), ("", "EACCES")];
    for (kind, (userns, refused)) in RUNTIMES.iter().flat_map(|k| configs.map(|c| (k, c))) {
        let kind = &format!("{kind} {userns}");
        let agent = agent_with(kind.split(' ').next().unwrap(), "", userns);
        let mut c = agent.scheduler().await;
        let mut spec = job("cgroups", &[&step]);
        spec.container = Some(pb::Container {
            resources: Some(pb::Resources {
                memory_bytes: 64 << 20,
                max_pids: 100,
                cpu_millis: 0,
                ..Default::default()
            }),
            ..Default::default()
        });
        let ws = submit_until_ready(&agent, &mut c, spec).await;
        let cgroup = format!("{}/cgroups", agent.cgroup_parent());
        let rel = cgroup.trim_start_matches('/');
        let read = |file: &str| std::fs::read_to_string(Path::new("/sys/fs/cgroup").join(file)).unwrap();
        assert_eq!(
            read(&format!("memory/{rel}/memory.limit_in_bytes")).trim(),
            "67108864",
            "{kind}"
        );
        assert_eq!(read(&format!("pids/{rel}/pids.max")).trim(), "100", "{kind}");
        // The devices cgroup is Docker's allow-list, nothing more: no
        // `c *:* m`, no `b *:* m`, no tun.
        let mut devices: Vec<String> = read(&format!("devices/{rel}/devices.list"))
            .lines()
            .map(str::to_string)
            .collect();
        devices.sort();
        assert_eq!(
            devices,
            [
                "c 136:* rwm",
                "c 1:3 rwm",
                "c 1:5 rwm",
                "c 1:7 rwm",
                "c 1:8 rwm",
                "c 1:9 rwm",
                "c 5:0 rwm",
                "c 5:1 rwm",
                "c 5:2 rwm"
            ],
            "{kind}"
        );
        // Something (the host, here) makes cgroups in the job's: they go
        // with the job.
        let dirs = cgroup_dirs(&cgroup);
        assert!(dirs.len() >= 5, "{kind}: {dirs:?}");
        for d in &dirs {
            std::fs::create_dir_all(d.join("child/grandchild")).unwrap();
        }
        std::fs::write(ws.join("go"), "").unwrap();
        let events = watch(&mut c, "cgroups", 0).await;
        let out = output(&events, pb::Stream::Stdout);
        assert_eq!(
            state(&final_status(&events)),
            pb::JobState::Succeeded,
            "{kind}: {out}"
        );
        assert_results(
            &out,
            &[
                ("memory.limit_in_bytes", refused),
                ("pids.max", refused),
                ("devices.allow", refused),
                ("mkdir-memory", "EROFS"),
                ("mkdir-systemd", "EROFS"),
                ("mkdir-root", "EROFS"),
                ("own cgroup", "/"),
                ("other cgroups", "0"),
            ],
            kind,
        );
        // libcontainer does not mount cgroup2 beside v1 hierarchies.
        let unified = results(&out)["mkdir-unified"].clone();
        assert!(unified == "EROFS" || unified == "ENOENT", "{kind}: {out}");
        assert_eq!(
            cgroup_dirs(&cgroup),
            Vec::<PathBuf>::new(),
            "{kind}: cgroups left"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn device_nodes_beyond_docker_allow_list_neither_appear_nor_open() {
    require!(Root, Runc);
    let a = attack().display().to_string();
    let step = format!(
        "{a} mknod-block /dev/loop-made
         {a} mknod-kvm /dev/kvm
         {a} open-w /dev/kmsg
         touch /workspace/ready
         {a} wait-for /dev/planted
         for d in loop kvm; do {a} open-rw /dev/planted-$d | sed s/open-rw/$d/; done
         {a} open-w /dev/planted-kmsg | sed s/open-w/kmsg/
         {a} open-rw /dev/null | sed s/open-rw/null/"
    );
    for kind in RUNTIMES {
        // The devices cgroup alone, without a user namespace: in one (the
        // default) the container's /dev is a tmpfs of the namespace's, on
        // which no device node opens at all and where host root cannot
        // even plant one (EOVERFLOW: its uid is not mapped).
        let agent = agent_with(kind, "", "userns = false");
        let mut c = agent.scheduler().await;
        submit_until_ready(&agent, &mut c, job("devices", &[&step])).await;
        // A node the step could not make, planted by the host in the
        // container's /dev: the devices cgroup still refuses it.
        let waiting = waiting_attack(&["wait-for", "/dev/planted"]);
        let proc = PathBuf::from(format!("/proc/{}", waiting[0]));
        let ns = |p: &Path| std::fs::read_link(p.join("ns/mnt")).unwrap();
        assert_ne!(
            ns(&proc),
            ns(Path::new("/proc/self")),
            "{kind}: the step is in the host's mount namespace"
        );
        let dev = proc.join("root/dev");
        use nix::sys::stat::{Mode, SFlag, makedev, mknod};
        let mode = Mode::from_bits_truncate(0o666);
        mknod(&dev.join("planted-loop"), SFlag::S_IFBLK, mode, makedev(7, 0)).unwrap();
        mknod(&dev.join("planted-kvm"), SFlag::S_IFCHR, mode, makedev(10, 232)).unwrap();
        mknod(&dev.join("planted-kmsg"), SFlag::S_IFCHR, mode, makedev(1, 11)).unwrap();
        std::fs::write(dev.join("planted"), "").unwrap();
        let events = watch(&mut c, "devices", 0).await;
        let out = output(&events, pb::Stream::Stdout);
        assert_eq!(
            state(&final_status(&events)),
            pb::JobState::Succeeded,
            "{kind}: {out}"
        );
        assert_results(
            &out,
            &[
                ("mknod-block", "EPERM"),
                ("mknod-kvm", "EPERM"),
                ("open-w", "ENOENT"),
                ("loop", "EPERM"),
                ("kvm", "EPERM"),
                ("kmsg", "EPERM"),
                ("null", "ok"),
            ],
            kind,
        );
    }
}

/// `KEYCTL_INVALIDATE`.
const KEYCTL_INVALIDATE: libc::c_long = 21;
const KEY_SPEC_USER_KEYRING: libc::c_long = -4;

/// A key in host root's user keyring, invalidated on drop.
struct HostKey(libc::c_long);

impl HostKey {
    fn add(name: &str, secret: &str) -> HostKey {
        let (ty, desc) = (c"user", std::ffi::CString::new(name).unwrap());
        // SAFETY: add_key with valid NUL-terminated strings and a payload
        // buffer of the given length.
        let id = unsafe {
            libc::syscall(
                libc::SYS_add_key,
                ty.as_ptr(),
                desc.as_ptr(),
                secret.as_ptr(),
                secret.len(),
                KEY_SPEC_USER_KEYRING,
            )
        };
        assert!(id > 0, "add_key: {}", std::io::Error::last_os_error());
        HostKey(id)
    }
}

impl Drop for HostKey {
    fn drop(&mut self) {
        // SAFETY: keyctl with integer arguments.
        unsafe { libc::syscall(libc::SYS_keyctl, KEYCTL_INVALIDATE, self.0) };
    }
}

/// Whether host root's user keyring holds a "user" key named `name`.
fn host_has_key(name: &str) -> bool {
    let desc = std::ffi::CString::new(name).unwrap();
    // SAFETY: KEYCTL_SEARCH (10) with valid NUL-terminated strings.
    unsafe {
        libc::syscall(
            libc::SYS_keyctl,
            10,
            KEY_SPEC_USER_KEYRING,
            c"user".as_ptr(),
            desc.as_ptr(),
            0,
        ) > 0
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn jobs_cannot_reach_the_kernel_keyring_of_the_host_or_of_each_other() {
    require!(Root, Runc);
    let a = attack().display().to_string();
    let secret = format!("runnel-host-secret-{}", std::process::id());
    let host_key = format!("runnel-sandbox-host-{}", std::process::id());
    let job_key = format!("runnel-sandbox-job-{}", std::process::id());
    let _key = HostKey::add(&host_key, &secret);
    for kind in RUNTIMES {
        let agent = agent(kind, "max_jobs = 2");
        // Job A stores a key; job B, at the same time, looks for it and
        // for the host's.
        let gate = Gate::new().await;
        let mut c = agent.scheduler().await;
        submit(
            &mut c,
            host_network(job(
                "key-a",
                &[&format!("{a} add-key {job_key}; {}", gate.step())],
            )),
        )
        .await;
        let held = gate.arrival().await;
        let (status, events) = run_job(
            &agent,
            job(
                "key-b",
                &[&format!(
                    "{a} read-key {job_key}; {a} read-key {host_key} | sed s/read-key/host/"
                )],
            ),
        )
        .await;
        drop(held);
        let out_b = output(&events, pb::Stream::Stdout);
        assert_eq!(state(&status), pb::JobState::Succeeded, "{kind}: {out_b}");
        assert_results(&out_b, &[("read-key", "EPERM"), ("host", "EPERM")], kind);
        assert!(!out_b.contains(&secret), "{kind}: {out_b}");
        let events = watch(&mut c, "key-a", 0).await;
        assert_results(
            &output(&events, pb::Stream::Stdout),
            &[("add-key", "EPERM")],
            kind,
        );
        assert!(
            !host_has_key(&job_key),
            "{kind}: job A's key reached the host's keyring"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn with_userns_an_exec_d_step_of_the_embedded_runtime_is_not_host_root() {
    require!(Root, Busybox);
    let layout = tempfile::tempdir().unwrap();
    let mut layer = busybox_layer();
    layer.push(Entry::File("bin/attack", std::fs::read(attack()).unwrap(), 0o755));
    write_layout(layout.path(), "v1", &[layer], &["PATH=/bin:/usr/bin"], "");
    let agent = Agent::start("[runtime]\nuserns = true\ngrace_period = \"1s\"");
    let mut c = agent.scheduler().await;
    let mut spec = job(
        "userns",
        &[
            "echo \"uid_map: $(cat /proc/self/uid_map | tr -s ' ' | sed 's/^ //')\"
           touch /workspace/ready
           attack wait-for /workspace/go
           attack write /workspace/host-owned pwned
           attack unshare-user
           grep Seccomp: /proc/self/status | tr -s '\\t' ' '",
        ],
    );
    spec.container = Some(pb::Container {
        image: format!("oci:{}:v1", layout.path().display()),
        ..Default::default()
    });
    let ws = submit_until_ready(&agent, &mut c, spec).await;
    // A file of host root's, in the step's sight and mode 0644.
    std::fs::write(ws.join("host-owned"), "host\n").unwrap();
    let waiting = waiting_attack(&["wait-for", "/workspace/go"]);
    let status = std::fs::read_to_string(format!("/proc/{}/status", waiting[0])).unwrap();
    let uids = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(
        uids.split_whitespace().skip(1).all(|u| u == "100000"),
        "the exec'd step as the host sees it: {uids}"
    );
    std::fs::write(ws.join("go"), "").unwrap();
    let events = watch(&mut c, "userns", 0).await;
    let out = output(&events, pb::Stream::Stdout);
    assert_eq!(
        state(&final_status(&events)),
        pb::JobState::Succeeded,
        "{out}\n{}",
        output(&events, pb::Stream::Stderr)
    );
    assert_results(
        &out,
        &[
            ("uid_map", "0 100000 65536"),
            ("write", "EACCES"),
            ("unshare-user", "EPERM"),
            ("Seccomp", "2"),
        ],
        "libcontainer, userns",
    );
}

/// The cgroup2 hierarchy: the whole tree, or beside v1.
fn cgroup2_root() -> std::path::PathBuf {
    let whole = std::path::Path::new("/sys/fs/cgroup");
    if whole.join("cgroup.controllers").exists() {
        whole.to_path_buf()
    } else {
        whole.join("unified")
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cgroup_v2_device_filter_opens_only_the_allow_list() {
    require!(Root);
    let root = cgroup2_root();
    assert!(
        root.join("cgroup.procs").exists(),
        "no cgroup2 hierarchy at {}",
        root.display()
    );
    let dir = root.join(format!("runnel-devfilter-test-{}", std::process::id()));
    std::fs::create_dir(&dir).unwrap();
    runnel::sys::devfilter::attach(&dir, &runnel::runtime::spec::device_filter()).unwrap();
    // A shell moves itself into the cgroup, then tries: /dev/null and
    // /dev/urandom are on the list; /dev/loop-control (c 10:237) and
    // /dev/kmsg (c 1:11) are not, and neither is making a block device.
    let tmp = tempfile::tempdir().unwrap();
    let script = format!(
        "echo $$ > {procs}; \
         for d in /dev/null /dev/urandom /dev/loop-control /dev/kmsg; do \
           if head -c 1 $d >/dev/null 2>{tmp}/err; then echo \"$d opens\"; else echo \"$d: $(cat {tmp}/err)\"; fi; \
         done; \
         mknod {tmp}/blk b 7 0 2>&1 || true; mknod {tmp}/null c 1 3 && echo mknod-null-ok",
        procs = dir.join("cgroup.procs").display(),
        tmp = tmp.path().display(),
    );
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(&script)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let _ = std::fs::remove_dir(&dir);
    assert!(
        text.contains("/dev/null opens\n") && text.contains("/dev/urandom opens\n"),
        "{text}"
    );
    assert!(
        text.contains(
            "/dev/loop-control: head: cannot open '/dev/loop-control' for reading: Operation not permitted"
        ),
        "{text}"
    );
    assert!(
        text.contains("/dev/kmsg: head: cannot open '/dev/kmsg' for reading: Operation not permitted"),
        "{text}"
    );
    assert!(
        text.contains("Operation not permitted") && text.contains("mknod-null-ok"),
        "{text}"
    );
    assert!(!text.contains("/dev/loop-control opens"), "{text}");
    // Outside the cgroup the same opens work: the filter, nothing else, refused them.
    assert!(std::fs::File::open("/dev/loop-control").is_ok());

    // Every job's cgroup2 gets it (on this host beside v1's devices cgroup).
    let agent = Agent::start("");
    let (status, events) = run_job(&agent, job("v2-filter", &["true"])).await;
    assert_succeeded(&status, &events);
    assert!(!agent.log().contains("no device filter"), "{}", agent.log());
}
