//! The `host` image shows the host's software, not its data, tried as an
//! attacker would: a step looks for the host's secrets (password hashes,
//! ssh host keys, TLS keys, a file the host keeps unreadable to others) and
//! its data (in /root, /home, /var, /srv) that the test plants first, and
//! finds none of it; the host's programs still run. An agent whose config
//! does not allow the host image refuses such jobs at submit.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::support::*;
use runnel::api::pb;
use tonic::Code;

/// Files a test puts on the host, removed on drop.
struct Planted(Vec<PathBuf>);

impl Planted {
    fn file(&mut self, path: &str, text: &str, mode: u32) -> String {
        let p = PathBuf::from(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        self.0.push(p);
        path.to_string()
    }

    /// `path` in a directory of its own (removed with it).
    fn file_in_dir(&mut self, dir: &str, name: &str, text: &str, mode: u32) -> String {
        let p = self.file(&format!("{dir}/{name}"), text, mode);
        self.0.push(PathBuf::from(dir));
        p
    }
}

impl Drop for Planted {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p).or_else(|_| std::fs::remove_dir_all(p));
        }
    }
}

/// The lines a step prints as `PATH: absent` or `PATH: PRESENT`.
fn presence(paths: &[String]) -> String {
    let list = paths
        .iter()
        .map(|p| format!("'{p}'"))
        .collect::<Vec<_>>()
        .join(" ");
    format!(
        "for f in {list}; do if test -e \"$f\" || test -L \"$f\"; then echo \"$f: PRESENT\"; \
         else echo \"$f: absent\"; fi; done"
    )
}

async fn secrets_and_data_are_out_of_sight(runtime: &str) {
    let id = std::process::id();
    let mut planted = Planted(Vec::new());
    // Per runtime: the tests run at once in one process.
    let tag = format!("runnel-hostimg-{runtime}-{id}");
    let data = [
        planted.file(&format!("/root/.{tag}"), "host data in /root\n", 0o644),
        planted.file_in_dir(&format!("/home/{tag}"), "notes", "host data in /home\n", 0o644),
        planted.file_in_dir(&format!("/var/lib/{tag}"), "db", "host data in /var\n", 0o644),
        planted.file_in_dir(&format!("/srv/{tag}"), "site", "host data in /srv\n", 0o644),
        // Unreadable to others: a secret, although on no list.
        planted.file(&format!("/etc/{tag}.conf"), "password=host-secret\n", 0o600),
    ];
    let tool = planted.file_in_dir(&format!("/opt/{tag}"), "tool.sh", "echo opt-shown\n", 0o755);
    // The host's secrets that exist here (each is asserted to be absent).
    let mut secrets: Vec<String> = [
        "/etc/shadow",
        "/etc/shadow-",
        "/etc/gshadow",
        "/etc/gshadow-",
        "/etc/sudoers",
        "/etc/sudoers.d",
        "/etc/security/opasswd",
        "/etc/ssl/private",
    ]
    .iter()
    .map(|s| s.to_string())
    .filter(|p| Path::new(p).exists())
    .collect();
    let mut host_keys: Vec<String> = std::fs::read_dir("/etc/ssh")
        .map(|d| {
            d.flatten()
                .map(|e| e.path().display().to_string())
                .filter(|p| p.ends_with("_key"))
                .collect()
        })
        .unwrap_or_default();
    host_keys.sort();
    secrets.extend(host_keys.iter().cloned());
    assert!(
        secrets.iter().any(|s| s == "/etc/shadow"),
        "this host has no /etc/shadow to hide: {secrets:?}"
    );
    let public_keys: Vec<String> = host_keys.iter().map(|k| format!("{k}.pub")).collect();
    let visible: Vec<String> = ["/etc/passwd", "/etc/group"]
        .iter()
        .map(|s| s.to_string())
        .chain(public_keys.iter().filter(|p| Path::new(p).exists()).cloned())
        .collect();

    let all: Vec<String> = secrets.iter().chain(&data).cloned().collect();
    let steps = [
        presence(&all),
        presence(&visible),
        format!(
            "set +e; cat /etc/shadow {} 2>&1; cat /etc/shadow /etc/{tag}.conf 2>/dev/null; echo end-of-cat",
            data[4]
        ),
        "for d in /root /home /var /srv /mnt /run; do echo \"$d=[$(ls -A $d | tr '\\n' ' ')]\"; done; \
         echo \"var-tmp=$(stat -c %a /var/tmp)\"; echo \"root-mode=$(stat -c %a /root)\""
            .to_string(),
        format!(
            "git --version | cut -d' ' -f1-2; python3 -c 'print(\"python-runs\")'; ssh -V 2>&1 | cut -c1-7; \
             sh {tool}; command -v sh"
        ),
    ];
    let steps: Vec<&str> = steps.iter().map(String::as_str).collect();
    let agent = Agent::start(&format!("[runtime]\nkind = \"{runtime}\""));
    let (status, events) = run_job(&agent, job("peek", &steps)).await;
    assert_succeeded(&status, &events);
    let out = output(&events, pb::Stream::Stdout);
    for p in &all {
        assert!(
            out.contains(&format!("{p}: absent\n")),
            "{runtime}: {p} is visible\n{out}"
        );
    }
    for p in &visible {
        assert!(
            out.contains(&format!("{p}: PRESENT\n")),
            "{runtime}: {p} is hidden\n{out}"
        );
    }
    assert!(
        out.contains(&format!(
            "cat: /etc/shadow: No such file or directory\ncat: {}: No such file or directory\nend-of-cat\n",
            data[4]
        )),
        "{runtime}\n{out}"
    );
    assert!(
        !out.contains("host-secret") && !out.contains("host data"),
        "{runtime}\n{out}"
    );
    assert!(
        out.contains(
            "/root=[]\n/home=[]\n/var=[lock run tmp ]\n/srv=[]\n/mnt=[]\n/run=[]\nvar-tmp=1777\nroot-mode=700\n"
        ),
        "{runtime}\n{out}"
    );
    assert!(
        out.contains("git version\npython-runs\nOpenSSH\nopt-shown\n/usr/bin/sh\n")
            || out.contains("git version\npython-runs\nOpenSSH\nopt-shown\n/bin/sh\n"),
        "{runtime}\n{out}"
    );
    // What the container saw is still on the host, untouched.
    for p in &data {
        assert!(Path::new(p).exists(), "{p}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_host_image_shows_software_but_no_secrets_or_data() {
    require!(Root, Sshd);
    secrets_and_data_are_out_of_sight("libcontainer").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_host_image_shows_the_same_with_runc() {
    require!(Root, Sshd, Runc);
    secrets_and_data_are_out_of_sight("runc").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_that_does_not_allow_the_host_image_refuses_it_at_submit() {
    require!(Root);
    let agent = Agent::start("[runtime]\nallow_host_image = false");
    let mut c = agent.scheduler().await;
    let mut named = job("named-host", &["true"]);
    named.container = Some(pb::Container {
        image: "host".into(),
        ..Default::default()
    });
    for spec in [named, job("default-host", &["true"])] {
        let id = spec.job_id.clone();
        let e = c
            .submit_job(pb::SubmitJobRequest { job: Some(spec) })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{id}: {e:?}");
        assert!(
            e.message().contains("runtime.allow_host_image = false")
                && e.message().contains("container.image"),
            "{id}: {}",
            e.message()
        );
    }
    let list = c.list_jobs(pb::ListJobsRequest {}).await.unwrap().into_inner();
    assert!(list.jobs.is_empty(), "{:?}", list.jobs);
}
