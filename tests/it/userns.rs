//! Steps are never root of the host: every job runs in a user namespace of
//! its own, its ids those of its job slot, so two jobs at once share none.
//! Root in the container works as root (images' layers are idmapped into
//! the job's ids), and is no one outside it. Tried as an attacker would,
//! with the embedded runtime and with runc.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use crate::sandbox::{
    RUNTIMES, agent, assert_results, attack, attacking, submit_until_ready, waiting_attack,
};
use crate::support::image::{Entry, busybox_layer, write_layout};
use crate::support::*;
use runnel::api::pb;

/// An image of busybox and the attack program, whose steps run as `user`.
fn attack_image(user: &str) -> tempfile::TempDir {
    let layout = tempfile::tempdir().unwrap();
    let mut layer = busybox_layer();
    layer.push(Entry::File("bin/attack", std::fs::read(attack()).unwrap(), 0o755));
    write_layout(layout.path(), "v1", &[layer], &["PATH=/bin:/usr/bin"], user);
    layout
}

fn in_image(mut spec: pb::JobSpec, layout: &Path) -> pb::JobSpec {
    spec.container = Some(pb::Container {
        image: format!("oci:{}:v1", layout.display()),
        ..Default::default()
    });
    spec
}

/// `/proc/PID/{uid,gid}_map`, one line, spaces squeezed.
fn id_map(pid: u32, which: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/{which}_map"))
        .unwrap()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// The real, effective, saved and file system uids of `pid`.
fn uids(pid: u32) -> Vec<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    line.split_whitespace()
        .skip(1)
        .map(|u| u.parse().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn two_jobs_at_once_have_disjoint_ids_and_cannot_reach_each_other() {
    require!(Root, Busybox, Runc);
    let layout = attack_image("");
    for kind in RUNTIMES {
        let agent = agent(kind, "max_jobs = 2");
        let mut c = agent.scheduler().await;
        let step = |me: &str| {
            format!(
                "echo {me}-secret > /workspace/secret && chmod 600 /workspace/secret
                 touch /workspace/ready
                 attack wait-for /workspace/go-{me}
                 attack open-r /workspace/planted"
            )
        };
        let ws_a = submit_until_ready(
            &agent,
            &mut c,
            in_image(job("ids-a", &[&step("a")]), layout.path()),
        )
        .await;
        let ws_b = submit_until_ready(
            &agent,
            &mut c,
            in_image(job("ids-b", &[&step("b")]), layout.path()),
        )
        .await;
        let pid_a = waiting_attack(&["wait-for", "/workspace/go-a"])[0];
        let pid_b = waiting_attack(&["wait-for", "/workspace/go-b"])[0];
        // Slot 0 and slot 1: 65536 ids each, none shared.
        for which in ["uid", "gid"] {
            assert_eq!(
                id_map(pid_a, which),
                "0 100000 65536",
                "{kind}: job a's {which}_map"
            );
            assert_eq!(
                id_map(pid_b, which),
                "0 165536 65536",
                "{kind}: job b's {which}_map"
            );
        }
        assert_eq!(uids(pid_a), [100_000; 4], "{kind}");
        assert_eq!(uids(pid_b), [165_536; 4], "{kind}");
        assert_eq!(std::fs::metadata(ws_a.join("secret")).unwrap().uid(), 100_000);

        // B's root as the kernel knows it (in B's namespace, its uid 0),
        // on the host where A's step is in sight: it can neither signal A's
        // step nor reach A's files through it.
        let as_b = |args: &[&str]| {
            let out = std::process::Command::new("nsenter")
                .arg(format!("--user=/proc/{pid_b}/ns/user"))
                .args(["--setuid=0", "--setgid=0"])
                .arg(attack())
                .args(args)
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let a_secret = format!("/proc/{pid_a}/root/workspace/secret");
        assert_results(
            &(as_b(&["kill", &pid_a.to_string()]) + &as_b(&["open-r", &a_secret])),
            &[("kill", "EPERM"), ("open-r", "EACCES")],
            &format!("{kind}: job b's root against job a"),
        );
        assert_eq!(
            attacking(&["wait-for", "/workspace/go-a"]),
            [pid_a],
            "{kind}: a lives"
        );
        // Each one's secret, put in the other's sight (a copy with its
        // owner and mode: each job's workspace is on a disk of its own, so
        // no hard link): mode 0600 of an owner the namespace does not map.
        for (from, to) in [(&ws_a, &ws_b), (&ws_b, &ws_a)] {
            let (secret, planted) = (from.join("secret"), to.join("planted"));
            let meta = std::fs::metadata(&secret).unwrap();
            std::fs::copy(&secret, &planted).unwrap();
            std::os::unix::fs::chown(&planted, Some(meta.uid()), Some(meta.gid())).unwrap();
            std::fs::set_permissions(&planted, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        for (me, ws) in [("a", &ws_a), ("b", &ws_b)] {
            std::fs::write(ws.join(format!("go-{me}")), "").unwrap();
            let events = watch(&mut c, &format!("ids-{me}"), 0).await;
            assert_succeeded(&final_status(&events), &events);
            let out = output(&events, pb::Stream::Stdout);
            assert_results(&out, &[("open-r", "EACCES")], &format!("{kind}: job {me}"));
            assert!(!out.contains("-secret"), "{kind}: {out}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn root_in_the_container_installs_and_chowns_and_is_no_one_on_the_host() {
    require!(Root, Busybox, Runc);
    let layout = attack_image("");
    let step = "touch /workspace/ready
        attack wait-for /workspace/go
        attack write /workspace/host-owned pwned
        mkdir -p /usr/share/pkg && echo data > /usr/share/pkg/file && echo \"install: ok\"
        chown 1000:1000 /usr/share/pkg/file && chmod 4755 /usr/share/pkg/file && echo \"chown: ok\"
        echo 'svc:x:1000:1000::/home/builder:/bin/sh' >> /etc/passwd && echo \"passwd: ok\"
        chown -R 1000:1000 /home/builder && chown 1000:1000 /workspace && echo \"chown -R: ok\"
        ls -ln /usr/share/pkg/file | awk '{print \"owner: \" $3 \":\" $4}'
        touch /workspace/installed
        attack wait-for /workspace/end";
    for kind in RUNTIMES {
        let agent = agent(kind, "");
        let mut c = agent.scheduler().await;
        let ws = submit_until_ready(&agent, &mut c, in_image(job("apt", &[step]), layout.path())).await;
        // A file of host root's, in the step's sight and mode 0644.
        std::fs::write(ws.join("host-owned"), "host\n").unwrap();
        std::fs::write(ws.join("go"), "").unwrap();
        wait_for("the install", Duration::from_secs(60), || {
            ws.join("installed").exists()
        });
        // What root in the container made, as the host sees it: the job's
        // ids (slot 0: 100000 + the container's), in the job's own layer.
        let upper = agent.state_dir().join("jobs/apt/run/disk/root/upper");
        let meta = std::fs::metadata(upper.join("usr/share/pkg/file")).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (101_000, 101_000), "{kind}");
        assert_eq!(
            std::fs::metadata(upper.join("etc/passwd")).unwrap().uid(),
            100_000
        );
        // The image's cached layer keeps its own owners and content.
        let cached: Vec<_> = glob_layers(&agent.state_dir(), "etc/passwd");
        assert_eq!(cached.len(), 1, "{kind}: {cached:?}");
        assert_eq!(std::fs::metadata(&cached[0]).unwrap().uid(), 0);
        assert!(!std::fs::read_to_string(&cached[0]).unwrap().contains("svc:"));
        std::fs::write(ws.join("end"), "").unwrap();
        let events = watch(&mut c, "apt", 0).await;
        assert_succeeded(&final_status(&events), &events);
        let out = output(&events, pb::Stream::Stdout);
        assert_results(
            &out,
            &[
                ("write", "EACCES"),
                ("install", "ok"),
                ("chown", "ok"),
                ("passwd", "ok"),
                ("chown -R", "ok"),
                ("owner", "1000:1000"),
            ],
            kind,
        );
    }
}

/// `rel` in each unpacked layer of the agent's image cache.
fn glob_layers(state_dir: &Path, rel: &str) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(state_dir.join("images/layers"))
        .unwrap()
        .flatten()
        .map(|e| e.path().join("fs").join(rel))
        .filter(|p| p.exists())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_host_image_runs_in_a_user_namespace_and_changes_nothing_of_the_host() {
    require!(Root, Runc);
    let a = attack().display().to_string();
    // A root-only host file the host image shows (it hides secrets in
    // /etc only): the namespace's root is no one to it.
    // (A temporary file: mode 0600, removed at the end.)
    let root_only_file = tempfile::Builder::new()
        .prefix("root-only.")
        .tempfile_in(attack().parent().unwrap())
        .unwrap();
    std::fs::write(root_only_file.path(), "host root's\n").unwrap();
    let root_only = root_only_file.path().display().to_string();
    let step = format!(
        "echo \"uid_map: $(tr -s ' ' < /proc/self/uid_map | sed 's/^ //')\"
         echo \"uid: $(id -u)\"
         echo \"etc owner: $(stat -c %u:%g /etc)\"
         {a} write /etc/hostname pwned
         {a} open-r {root_only}
         {a} open-r /etc/shadow | sed s/open-r/shadow/
         {a} mkdir /usr/local/runnel-userns-probe
         touch /root/made && echo \"home: ok\"
         echo made > /made-at-the-top && echo \"top: ok\""
    );
    let hostname = std::fs::read("/etc/hostname").unwrap();
    for kind in RUNTIMES {
        let agent = agent(kind, "");
        let (status, events) = run_job(&agent, job("host-userns", &[&step])).await;
        assert_succeeded(&status, &events);
        let out = output(&events, pb::Stream::Stdout);
        assert_results(
            &out,
            &[
                ("uid_map", "0 100000 65536"),
                ("uid", "0"),
                // The host's owners are not mapped: nobody, nogroup.
                ("etc owner", "65534:65534"),
                ("write", "EACCES"),
                ("open-r", "EACCES"),
                // Hidden by the host image's view: not even there.
                ("shadow", "ENOENT"),
                ("mkdir", "EACCES"),
                ("home", "ok"),
                ("top", "ok"),
            ],
            kind,
        );
    }
    assert_eq!(std::fs::read("/etc/hostname").unwrap(), hostname);
    assert!(!Path::new("/usr/local/runnel-userns-probe").exists());
    assert!(!Path::new("/made-at-the-top").exists());
}

/// A ramfs mounted over a directory; unmounted on drop.
struct Ramfs(std::path::PathBuf);

impl Ramfs {
    fn mount(at: &Path) -> Ramfs {
        std::fs::create_dir_all(at).unwrap();
        nix::mount::mount(
            Some("ramfs"),
            at,
            Some("ramfs"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .unwrap();
        Ramfs(at.to_path_buf())
    }
}

impl Drop for Ramfs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn where_idmapped_mounts_cannot_be_image_layers_are_shifted_per_slot() {
    require!(Root, Busybox);
    let layout = attack_image("");
    // ramfs takes no idmapped mounts.
    let mut agent = Agent::new("[runtime]\ngrace_period = \"1s\"");
    let _ramfs = Ramfs::mount(&agent.state_dir());
    agent.launch();
    let step = "echo \"uid_map: $(tr -s ' ' < /proc/self/uid_map | sed 's/^ //')\"
        echo x > /etc/made && echo \"etc: ok\"
        echo \"owner: $(stat -c %u /bin/busybox)\"";
    let (status, events) = run_job(&agent, in_image(job("shifted", &[step]), layout.path())).await;
    assert_succeeded(&status, &events);
    let out = output(&events, pb::Stream::Stdout);
    assert_results(
        &out,
        &[("uid_map", "0 100000 65536"), ("etc", "ok"), ("owner", "0")],
        "ramfs",
    );
    let log = agent.log();
    assert!(log.contains("idmapped mounts are not possible here"), "{log}");
    let layers: Vec<String> = std::fs::read_dir(agent.state_dir().join("images/layers"))
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(layers.len() == 1 && layers[0].ends_with("+100000"), "{layers:?}");
    drop(agent);
}
