//! Checkout over SSH against a real sshd that acts like Bitbucket: user key
//! before deploy key, pinned host keys, submodules, revisions, and the
//! failures a user must be told about plainly.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::support::sshd::{GitServer, KeyPair, big_repo, git, sh, write};
use crate::support::*;
use runnel::api::pb;

/// A git server with `org/app.git` (submodule `lib` → `../lib.git`, whose
/// submodule `deep` → `../deep.git`), `org/dep.git`, a user key for all of
/// them and a deploy key for `org/app.git` only.
struct Fixture {
    server: GitServer,
    keys: tempfile::TempDir,
    user: KeyPair,
    deploy: KeyPair,
    app: std::path::PathBuf,
}

impl Fixture {
    fn new() -> Fixture {
        let keys = tempfile::tempdir().unwrap();
        let user = KeyPair::generate(keys.path(), "user", "ed25519", "", &[]);
        let deploy = KeyPair::generate(keys.path(), "deploy", "ed25519", "", &[]);
        let server = GitServer::start(&[(&deploy, "org/app.git")], &[&user]);
        let repos = server.repos();
        server.create_repo("org/deep.git", |w| write(&w.join("deep.txt"), "deep\n"));
        server.create_repo("org/lib.git", |w| {
            write(&w.join("lib.txt"), "lib\n");
            git(
                w,
                &[
                    "submodule",
                    "add",
                    "-q",
                    repos.join("org/deep.git").to_str().unwrap(),
                    "deep",
                ],
            );
            git(
                w,
                &["config", "-f", ".gitmodules", "submodule.deep.url", "../deep.git"],
            );
        });
        let app = server.create_repo("org/app.git", |w| {
            write(&w.join("app.txt"), "app v1\n");
            write(&w.join("src/main.c"), "int main(void) { return 0; }\n");
            git(
                w,
                &[
                    "submodule",
                    "add",
                    "-q",
                    repos.join("org/lib.git").to_str().unwrap(),
                    "lib",
                ],
            );
            git(
                w,
                &["config", "-f", ".gitmodules", "submodule.lib.url", "../lib.git"],
            );
        });
        git(&app, &["tag", "v1"]);
        git(&app, &["push", "-q", "--tags", "origin", "main"]);
        server.create_repo("org/dep.git", |w| {
            write(&w.join("dep.txt"), "a private dependency\n")
        });
        Fixture {
            server,
            keys,
            user,
            deploy,
            app,
        }
    }

    fn spec(&self, id: &str, user: bool, deploy: bool, submodules: bool, steps: &[&str]) -> pb::JobSpec {
        let mut spec = job(id, steps);
        spec.checkout = Some(pb::Checkout {
            repo_url: self.server.url("org/app.git"),
            revision: String::new(),
            submodules,
            depth: 0,
            ..Default::default()
        });
        spec.ssh = Some(pb::SshCredentials {
            user_key: if user { self.user.private_bytes() } else { vec![] },
            deploy_key: if deploy {
                self.deploy.private_bytes()
            } else {
                vec![]
            },
            known_hosts: vec![self.server.known_hosts_line.clone()],
            passphrase: String::new(),
            ..Default::default()
        });
        spec
    }
}

fn checkout_done(events: &[pb::JobEvent]) -> pb::CheckoutDone {
    events
        .iter()
        .find_map(|e| match &e.event {
            Some(pb::job_event::Event::Checkout(c)) => Some(c.clone()),
            _ => None,
        })
        .expect("a CheckoutDone event")
}

/// A line from the middle of a private key file: must never be stored.
fn key_line(key: &KeyPair) -> Vec<u8> {
    let text = String::from_utf8(key.private_bytes()).unwrap();
    text.lines().nth(2).unwrap().as_bytes().to_vec()
}

fn assert_no_key_bytes(agent: &Agent, keys: &[&KeyPair]) {
    for k in keys {
        let found = files_containing(&agent.state_dir(), &key_line(k));
        assert!(
            found.is_empty(),
            "key bytes of {} left in {found:?}",
            k.fingerprint
        );
        assert!(!agent.log().contains(std::str::from_utf8(&key_line(k)).unwrap()));
    }
}

fn head(dir: &Path) -> String {
    git(dir, &["rev-parse", "HEAD"])
}

#[tokio::test(flavor = "multi_thread")]
async fn the_user_key_wins_and_nested_submodules_are_checked_out() {
    require!(Root, Sshd);
    let f = Fixture::new();
    let agent = Agent::start("");
    let spec = f.spec(
        "both-keys",
        true,
        true,
        true,
        &["cat app.txt lib/lib.txt lib/deep/deep.txt; git rev-parse HEAD; git rev-parse --abbrev-ref HEAD"],
    );
    let (status, events) = run_job(&agent, spec).await;
    assert_eq!(state(&status), pb::JobState::Succeeded, "{status:?}");
    let done = checkout_done(&events);
    assert_eq!(done.key, pb::KeyKind::User as i32);
    assert_eq!(done.key_fingerprint, f.user.fingerprint);
    assert_eq!(done.commit, head(&f.app));
    let subs: Vec<(&str, &str, i32)> = done
        .submodules
        .iter()
        .map(|s| (s.path.as_str(), s.url.as_str(), s.key))
        .collect();
    let lib_url = f.server.url("org/lib.git");
    let deep_url = f.server.url("org/deep.git");
    assert_eq!(
        subs,
        vec![
            ("lib", lib_url.as_str(), pb::KeyKind::User as i32),
            ("lib/deep", deep_url.as_str(), pb::KeyKind::User as i32)
        ]
    );
    let out = output(&events, pb::Stream::Stdout);
    assert_eq!(out, format!("app v1\nlib\ndeep\n{}\nmain\n", head(&f.app)));
    // The server saw the user key, and never the deploy key.
    let log = f.server.log();
    assert!(log.contains("Accepted publickey"), "{log}");
    assert!(
        !log.contains(&f.deploy.fingerprint),
        "the deploy key was offered:\n{log}"
    );
    assert_no_key_bytes(&agent, &[&f.user, &f.deploy]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deploy_key_alone_checks_out_its_repository() {
    require!(Root, Sshd);
    let f = Fixture::new();
    let agent = Agent::start("");
    let (status, events) = run_job(
        &agent,
        f.spec(
            "deploy-only",
            false,
            true,
            false,
            &["cat app.txt; test ! -e lib/lib.txt"],
        ),
    )
    .await;
    assert_eq!(state(&status), pb::JobState::Succeeded, "{status:?}");
    let done = checkout_done(&events);
    assert_eq!(done.key, pb::KeyKind::Deploy as i32);
    assert_eq!(done.key_fingerprint, f.deploy.fingerprint);
    assert!(done.submodules.is_empty());
    assert_no_key_bytes(&agent, &[&f.deploy]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deploy_key_cannot_read_a_submodule_and_the_user_is_told_why() {
    require!(Root, Sshd);
    let f = Fixture::new();
    let agent = Agent::start("");
    let (status, _) = run_job(&agent, f.spec("deploy-submodule", false, true, true, &["true"])).await;
    assert_eq!(state(&status), pb::JobState::Failed);
    assert_eq!(
        failure(&status),
        pb::FailureKind::RepoNotFound,
        "{}",
        status.message
    );
    let m = &status.message;
    assert!(m.starts_with("submodule lib: "), "{m}");
    assert!(m.contains("Repository not found"), "{m}");
    assert!(m.contains("A deploy key reads one repository only"), "{m}");
    assert!(m.contains("user key"), "{m}");
    assert!(m.contains(&f.deploy.fingerprint), "{m}");
    assert_no_key_bytes(&agent, &[&f.deploy]);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unknown_key_is_permission_denied_naming_the_keys_tried() {
    require!(Root, Sshd);
    let f = Fixture::new();
    let agent = Agent::start("");
    let stranger = KeyPair::generate(f.keys.path(), "stranger", "ed25519", "", &[]);
    let mut spec = f.spec("stranger", false, false, false, &["true"]);
    spec.ssh.as_mut().unwrap().user_key = stranger.private_bytes();
    let (status, _) = run_job(&agent, spec).await;
    assert_eq!(failure(&status), pb::FailureKind::Auth, "{}", status.message);
    assert!(
        status.message.contains("Permission denied (publickey)"),
        "{}",
        status.message
    );
    assert!(
        status.message.contains(&stranger.fingerprint),
        "{}",
        status.message
    );
    assert_no_key_bytes(&agent, &[&stranger]);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unpinned_or_changed_host_key_is_refused_before_any_key_is_offered() {
    require!(Root, Sshd);
    let f = Fixture::new();
    let agent = Agent::start("");

    let mut unpinned = f.spec("unpinned", true, true, false, &["true"]);
    unpinned.ssh.as_mut().unwrap().known_hosts = vec![];
    let (status, _) = run_job(&agent, unpinned).await;
    assert_eq!(failure(&status), pb::FailureKind::HostKey, "{}", status.message);
    let m = &status.message;
    assert!(m.contains("is not pinned"), "{m}");
    assert!(m.contains(&f.server.host_key_fingerprint), "{m}");
    assert!(
        m.contains(&format!("runnel keyscan 127.0.0.1:{}", f.server.port)),
        "{m}"
    );
    assert!(
        m.contains(&format!("[127.0.0.1]:{} ssh-ed25519", f.server.port)),
        "{m}"
    );

    let other = KeyPair::generate(f.keys.path(), "other_host", "ed25519", "", &[]);
    let mut changed = f.spec("changed", true, true, false, &["true"]);
    let other_b64 = other
        .public_line
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ");
    changed.ssh.as_mut().unwrap().known_hosts = vec![format!("[127.0.0.1]:{} {other_b64}", f.server.port)];
    let (status, _) = run_job(&agent, changed).await;
    assert_eq!(failure(&status), pb::FailureKind::HostKey, "{}", status.message);
    assert!(
        status.message.contains("differs from the pinned one"),
        "{}",
        status.message
    );

    // A portless entry does not pin a non-22 port (OpenSSH's rule).
    let mut portless = f.spec("portless", true, true, false, &["true"]);
    let host_b64 = f.server.known_hosts_line.split_once(' ').unwrap().1.to_string();
    portless.ssh.as_mut().unwrap().known_hosts = vec![format!("127.0.0.1 {host_b64}")];
    let (status, _) = run_job(&agent, portless).await;
    assert_eq!(failure(&status), pb::FailureKind::HostKey, "{}", status.message);

    let log = f.server.log();
    assert!(
        !log.contains("publickey"),
        "a key was offered to an unverified host:\n{log}"
    );
    assert_no_key_bytes(&agent, &[&f.user, &f.deploy]);
}

#[tokio::test(flavor = "multi_thread")]
async fn hashed_and_bracketed_known_hosts_entries_match() {
    require!(Root, Sshd);
    let f = Fixture::new();
    let agent = Agent::start("");
    let kh = f.keys.path().join("known_hosts");
    std::fs::write(&kh, format!("{}\n", f.server.known_hosts_line)).unwrap();
    sh(Command::new("ssh-keygen").arg("-H").arg("-f").arg(&kh));
    let hashed = std::fs::read_to_string(&kh)
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .to_string();
    assert!(hashed.starts_with("|1|"), "{hashed}");
    for (id, line) in [
        ("hashed", hashed),
        ("bracketed", f.server.known_hosts_line.clone()),
    ] {
        let mut spec = f.spec(id, true, false, false, &["true"]);
        spec.ssh.as_mut().unwrap().known_hosts = vec!["# a comment".into(), line];
        let (status, _) = run_job(&agent, spec).await;
        assert_eq!(state(&status), pb::JobState::Succeeded, "{id}: {status:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_of_every_kind_and_encrypted_ones() {
    require!(Root, Sshd);
    let f = Fixture::new();
    let dir = f.keys.path();
    let rsa_pem = KeyPair::generate(dir, "rsa_pem", "rsa", "", &["-m", "PEM"]);
    let ecdsa = KeyPair::generate(dir, "ecdsa", "ecdsa", "", &[]);
    let encrypted = KeyPair::generate(dir, "encrypted", "ed25519", "open sesame", &[]);
    let server = GitServer::start(&[], &[&rsa_pem, &ecdsa, &encrypted]);
    server.create_repo("org/app.git", |w| write(&w.join("app.txt"), "app\n"));
    let agent = Agent::start("");
    let spec = |id: &str, key: &KeyPair, pass: &str| {
        let mut s = job(id, &["cat app.txt"]);
        s.checkout = Some(pb::Checkout {
            repo_url: server.url("org/app.git"),
            ..Default::default()
        });
        s.ssh = Some(pb::SshCredentials {
            user_key: key.private_bytes(),
            known_hosts: vec![server.known_hosts_line.clone()],
            passphrase: pass.into(),
            ..Default::default()
        });
        s
    };
    for (id, key, pass) in [
        ("rsa-pem", &rsa_pem, ""),
        ("ecdsa", &ecdsa, ""),
        ("encrypted", &encrypted, "open sesame"),
    ] {
        let (status, events) = run_job(&agent, spec(id, key, pass)).await;
        assert_eq!(state(&status), pb::JobState::Succeeded, "{id}: {status:?}");
        assert_eq!(checkout_done(&events).key_fingerprint, key.fingerprint, "{id}");
    }
    for (id, pass, want) in [
        ("no-pass", "", "no passphrase was given"),
        ("wrong-pass", "nope", "wrong passphrase"),
    ] {
        let (status, _) = run_job(&agent, spec(id, &encrypted, pass)).await;
        assert_eq!(failure(&status), pb::FailureKind::BadSpec, "{id}");
        assert!(
            status.message.contains("ssh.user_key") && status.message.contains(want),
            "{id}: {}",
            status.message
        );
    }
    let mut garbage = spec("garbage", &ecdsa, "");
    garbage.ssh.as_mut().unwrap().deploy_key =
        b"-----BEGIN OPENSSH PRIVATE KEY-----\nnot a key\n-----END OPENSSH PRIVATE KEY-----\n".to_vec();
    let (status, _) = run_job(&agent, garbage).await;
    assert_eq!(failure(&status), pb::FailureKind::BadSpec);
    assert!(
        status.message.starts_with("ssh.deploy_key:"),
        "{}",
        status.message
    );
    assert_no_key_bytes(&agent, &[&rsa_pem, &ecdsa, &encrypted]);
}

#[tokio::test(flavor = "multi_thread")]
async fn revisions_by_sha_branch_and_tag() {
    require!(Root, Sshd);
    let f = Fixture::new();
    let first = head(&f.app);
    git(&f.app, &["checkout", "-q", "-b", "feature"]);
    f.server.push(&f.app, "on a branch", |w| {
        write(&w.join("app.txt"), "app on feature\n")
    });
    let feature = head(&f.app);
    git(&f.app, &["tag", "-a", "v2", "-m", "annotated"]);
    git(&f.app, &["push", "-q", "--tags", "origin", "feature"]);
    let agent = Agent::start("");
    for (rev, want, text) in [
        (first.as_str(), first.as_str(), "app v1"),
        (&first[..10], first.as_str(), "app v1"),
        ("feature", feature.as_str(), "app on feature"),
        ("v1", first.as_str(), "app v1"),
        ("v2", feature.as_str(), "app on feature"),
        ("", first.as_str(), "app v1"),
    ] {
        let mut spec = f.spec(
            &format!("rev-{}", if rev.is_empty() { "head" } else { rev }),
            true,
            false,
            false,
            &["cat app.txt; git rev-parse HEAD"],
        );
        spec.checkout.as_mut().unwrap().revision = rev.into();
        let (status, events) = run_job(&agent, spec).await;
        assert_eq!(state(&status), pb::JobState::Succeeded, "{rev}: {status:?}");
        assert_eq!(checkout_done(&events).commit, want, "{rev}");
        assert_eq!(
            output(&events, pb::Stream::Stdout),
            format!("{text}\n{want}\n"),
            "{rev}"
        );
    }
    let mut missing = f.spec("rev-missing", true, false, false, &["true"]);
    missing.checkout.as_mut().unwrap().revision = "no-such-branch".into();
    let (status, _) = run_job(&agent, missing).await;
    assert_eq!(failure(&status), pb::FailureKind::Revision, "{}", status.message);
    assert!(status.message.contains("no-such-branch"), "{}", status.message);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_submodule_that_escapes_the_workspace_is_refused() {
    require!(Root, Sshd);
    let f = Fixture::new();
    f.server.push(&f.app, "evil submodule", |w| {
        write(
            &w.join(".gitmodules"),
            "[submodule \"../../../../escaped\"]\n\tpath = lib\n\turl = ../lib.git\n",
        );
    });
    let agent = Agent::start("");
    let (status, _) = run_job(&agent, f.spec("evil", true, false, true, &["true"])).await;
    assert_eq!(failure(&status), pb::FailureKind::Checkout, "{}", status.message);
    // libgit2 refuses such a name already when it checks out the tree; ours
    // is the second line of defence (unit-tested in checkout::submodules).
    assert!(
        status.message.contains("submodule name: '../../../../escaped'"),
        "{}",
        status.message
    );
    assert!(!agent.state_dir().join("jobs/escaped").exists());
    assert!(!agent.state_dir().join("escaped").exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_step_clones_a_private_dependency_with_the_jobs_keys() {
    require!(Root, Sshd);
    let f = Fixture::new();
    let agent = Agent::start("");
    let dep = f.server.url("org/dep.git");
    // The test's sshd is on the host's loopback, which only the host's
    // network reaches.
    let spec = host_network(f.spec(
        "private-dep",
        true,
        true,
        false,
        &[
            &format!("git clone -q {dep} /tmp/dep && cat /tmp/dep/dep.txt"),
            "ls -l ~/.ssh | awk '{print $1, $NF}' | sort; touch ~/.ssh/x 2>/dev/null && echo WRITABLE || echo read-only",
            "cat ~/.ssh/id_user",
        ],
    ));
    let (status, events) = run_job(&agent, spec).await;
    assert_succeeded(&status, &events);
    let out = output(&events, pb::Stream::Stdout);
    assert!(out.contains("a private dependency\n"), "{out}");
    assert!(
        out.contains("-rw------- id_user") && out.contains("-rw------- id_deploy"),
        "{out}"
    );
    assert!(out.contains("read-only"), "{out}");
    // Printing the key shows no key material.
    assert!(
        !out.contains(std::str::from_utf8(&key_line(&f.user)).unwrap()),
        "{out}"
    );
    assert!(out.contains("[MASKED]"), "{out}");
    assert_no_key_bytes(&agent, &[&f.user, &f.deploy]);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_checkout_equals_git_clone_recurse_submodules_file_for_file() {
    require!(Root, Sshd);
    let f = Fixture::new();
    let agent = Agent::start("");
    let list = "find . -name .git -prune -o -type f -print | sort | xargs sha256sum";
    let (status, events) = run_job(&agent, f.spec("same-tree", true, false, true, &[list])).await;
    assert_eq!(state(&status), pb::JobState::Succeeded, "{status:?}");
    let ours = output(&events, pb::Stream::Stdout);

    let theirs = clone_listing(&f, list);
    assert_eq!(ours, theirs);
    assert!(theirs.contains("./lib/deep/deep.txt"), "{theirs}");
}

#[test]
fn keyscan_prints_pinnable_lines_with_fingerprints() {
    require!(Sshd);
    let f = Fixture::new();
    let out = sh(Command::new(runnel_bin()).args(["keyscan", &format!("127.0.0.1:{}", f.server.port)]));
    let line = out
        .lines()
        .find(|l| l.contains("ssh-ed25519"))
        .expect("an ed25519 line");
    assert!(
        line.starts_with(&f.server.known_hosts_line),
        "{line}\n{}",
        f.server.known_hosts_line
    );
    assert!(
        line.ends_with(&format!("# {}", f.server.host_key_fingerprint)),
        "{line}"
    );
    let failed = Command::new(runnel_bin())
        .args(["keyscan", "127.0.0.1:1"])
        .output()
        .unwrap();
    assert!(!failed.status.success());
    assert!(String::from_utf8_lossy(&failed.stderr).contains("cannot connect to 127.0.0.1:1"));
}

fn mirror_dirs(agent: &Agent) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(agent.state_dir().join("mirrors"))
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "git"))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_repeated_checkout_borrows_the_cache_and_sees_new_commits() {
    require!(Root, Sshd);
    let f = Fixture::new();
    let agent = Agent::start("max_jobs = 3");
    let inspect = "git log --format=%s -1; cat lib/lib.txt; git count-objects -v | grep -E '^(count|size-pack):'; cat .git/objects/info/alternates";
    let (s1, e1) = run_job(&agent, f.spec("warm-1", true, false, true, &[inspect])).await;
    assert_eq!(
        state(&s1),
        pb::JobState::Succeeded,
        "{s1:?}\n{}\n{}",
        output(&e1, pb::Stream::Stderr),
        agent.log()
    );
    assert_eq!(
        mirror_dirs(&agent).len(),
        3,
        "app, lib and deep each have a mirror"
    );
    f.server
        .push(&f.app, "second commit", |w| write(&w.join("app.txt"), "app v2\n"));
    let (s2, e2) = run_job(&agent, f.spec("warm-2", true, false, true, &[inspect])).await;
    assert_eq!(state(&s2), pb::JobState::Succeeded, "{s2:?}");
    assert_eq!(checkout_done(&e2).commit, head(&f.app));
    let out = output(&e2, pb::Stream::Stdout);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "second commit", "{out}");
    assert_eq!(lines[1], "lib");
    // No object was copied into the workspace: it borrows the mirror's.
    assert_eq!(lines[2], "count: 0", "{out}");
    assert_eq!(lines[3], "size-pack: 0", "{out}");
    assert!(lines[4].starts_with("/.runnel/mirrors/"), "{out}");
    // Concurrent jobs on one repository share the cache safely.
    let mut c = agent.scheduler().await;
    for i in 0..3 {
        submit(
            &mut c,
            f.spec(
                &format!("warm-c{i}"),
                true,
                true,
                true,
                &["cat lib/deep/deep.txt"],
            ),
        )
        .await;
    }
    for i in 0..3 {
        let events = watch(&mut c, &format!("warm-c{i}"), 0).await;
        assert_eq!(
            state(&final_status(&events)),
            pb::JobState::Succeeded,
            "warm-c{i}"
        );
    }
    assert_no_key_bytes(&agent, &[&f.user, &f.deploy]);
}

/// Every entry of a work tree but `.git`: type, mode, path, and the
/// content's digest or the link's target.
const TREE_LISTING: &str = "find . -mindepth 1 -name .git -prune -o \\( -type f -printf '%y %m %p ' -exec sh -c 'sha256sum < \"$1\"' _ {} \\; \\) -o -printf '%y %m %p %l\\n' | sort";

/// `list` run in a `git clone --recurse-submodules` of org/app.git.
fn clone_listing(f: &Fixture, list: &str) -> String {
    let clone = tempfile::tempdir().unwrap();
    let kh = f.keys.path().join("kh");
    std::fs::write(&kh, format!("{}\n", f.server.known_hosts_line)).unwrap();
    let ssh = format!(
        "ssh -i {} -o IdentitiesOnly=yes -o UserKnownHostsFile={} -o StrictHostKeyChecking=yes",
        f.user.private.display(),
        kh.display()
    );
    sh(Command::new("git")
        .args([
            "clone",
            "-q",
            "--recurse-submodules",
            &f.server.url("org/app.git"),
        ])
        .arg(clone.path().join("app"))
        .env("GIT_SSH_COMMAND", ssh));
    sh(Command::new("sh")
        .arg("-c")
        .arg(list)
        .current_dir(clone.path().join("app")))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_warm_workspace_is_laid_over_the_cached_tree_and_equals_git_clone() {
    require!(Root, Sshd);
    let f = Fixture::new();
    let agent = Agent::start("");
    // What the second commit turns into something else.
    f.server.push(&f.app, "before", |w| {
        write(&w.join("x"), "x is a file\n");
        write(&w.join("d/a.txt"), "d is a directory\n");
        write(&w.join("tool.sh"), "echo tool\n");
        write(&w.join("gone/deep/er.txt"), "a directory that goes\n");
        write(&w.join("keep/one.txt"), "stays\n");
        write(&w.join("keep/two.txt"), "goes\n");
    });
    let overlay = "awk '$5 == \"/workspace\" { for (i = 7; i < NF; i++) if ($i == \"-\") { print $(i + 1); break } }' /proc/self/mountinfo";
    let show = format!("{overlay}; git status --porcelain --ignore-submodules=none; echo ==; {TREE_LISTING}");
    let scribble = "echo scribbled > junk.txt; echo scribbled >> keep/one.txt; rm -r x";
    let (s1, e1) = run_job(&agent, f.spec("tree-1", true, false, true, &[&show, scribble])).await;
    assert_eq!(
        state(&s1),
        pb::JobState::Succeeded,
        "{s1:?}\n{}",
        output(&e1, pb::Stream::Stderr)
    );
    let out1 = output(&e1, pb::Stream::Stdout);
    let (head1, list1) = out1.split_once("==\n").unwrap();
    assert_eq!(
        head1,
        "overlay\n",
        "the workspace is an overlay of the cached tree, and git status is clean\n{}",
        agent.log()
    );
    assert_eq!(list1, clone_listing(&f, TREE_LISTING));

    f.server.push(&f.app, "after", |w| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::remove_file(w.join("x")).unwrap();
        write(&w.join("x/y.txt"), "x is a directory\n");
        std::fs::remove_dir_all(w.join("d")).unwrap();
        write(&w.join("d"), "d is a file\n");
        std::fs::set_permissions(w.join("tool.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::remove_dir_all(w.join("gone")).unwrap();
        std::fs::remove_file(w.join("keep/two.txt")).unwrap();
        std::fs::remove_dir_all(w.join("src")).unwrap();
        std::os::unix::fs::symlink("app.txt", w.join("link")).unwrap();
        write(&w.join("app.txt"), "app v3\n");
        write(&w.join("new/dir/file.txt"), "new\n");
    });
    let expected = clone_listing(&f, TREE_LISTING);
    for id in ["tree-2", "tree-3"] {
        let (s, e) = run_job(&agent, f.spec(id, true, false, true, &[&show, scribble])).await;
        assert_eq!(
            state(&s),
            pb::JobState::Succeeded,
            "{s:?}\n{}",
            output(&e, pb::Stream::Stderr)
        );
        assert_eq!(checkout_done(&e).commit, head(&f.app));
        let out = output(&e, pb::Stream::Stdout);
        let (head, list) = out.split_once("==\n").unwrap();
        assert_eq!(head, "overlay\n", "{id}: an overlay, git status clean");
        // Nothing the previous job scribbled is seen.
        assert_eq!(list, expected, "{id}");
    }
    assert!(expected.contains("l 777 ./link app.txt"), "{expected}");
    assert!(expected.contains("f 755 ./tool.sh"), "{expected}");
    assert!(!expected.contains("./gone"), "{expected}");
    assert_eq!(tree_layers(&agent), ["base", "delta"]);

    // A job holds its layers while it runs: a new base made meanwhile
    // (over 256 paths changed) leaves them be.
    let gate = Gate::new().await;
    let mut c = agent.scheduler().await;
    let holds = format!("{}; cat app.txt", gate.step());
    submit(
        &mut c,
        host_network(f.spec("tree-held", true, false, false, &[&holds])),
    )
    .await;
    let pass = gate.arrival().await;
    f.server.push(&f.app, "many files", |w| {
        for i in 0..300 {
            write(&w.join(format!("many/f{i}.txt")), &format!("{i}\n"));
        }
    });
    let (s, _) = run_job(
        &agent,
        f.spec("tree-new-base", true, false, false, &["test -f many/f299.txt"]),
    )
    .await;
    assert_eq!(state(&s), pb::JobState::Succeeded, "{s:?}");
    assert_eq!(tree_layers(&agent), ["base", "base", "delta"]);
    drop(pass);
    let held = watch(&mut c, "tree-held", 0).await;
    assert_eq!(state(&final_status(&held)), pb::JobState::Succeeded);
    assert!(output(&held, pb::Stream::Stdout).contains("app v3"));
    // Once no job uses them, the next new layer takes the old ones away.
    f.server
        .push(&f.app, "one more", |w| write(&w.join("app.txt"), "app v4\n"));
    let (s, e) = run_job(&agent, f.spec("tree-after", true, false, false, &["cat app.txt"])).await;
    assert_eq!(state(&s), pb::JobState::Succeeded, "{s:?}");
    assert_eq!(output(&e, pb::Stream::Stdout), "app v4\n");
    assert_eq!(tree_layers(&agent), ["base", "delta"]);
    assert!(
        mounts_under(&agent.state_dir()).is_empty(),
        "{:?}",
        mounts_under(&agent.state_dir())
    );
}

/// The kinds ("base", "delta") of the work tree layers kept, sorted.
fn tree_layers(agent: &Agent) -> Vec<String> {
    let mut kinds: Vec<String> = std::fs::read_dir(agent.state_dir().join("mirrors"))
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "trees"))
        .flat_map(|e| std::fs::read_dir(e.path()).unwrap().flatten())
        .filter(|e| e.file_type().unwrap().is_dir())
        .map(|e| {
            e.file_name()
                .to_string_lossy()
                .split('-')
                .next()
                .unwrap()
                .to_string()
        })
        .collect();
    kinds.sort();
    kinds
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unused_checkout_cache_expires_but_never_while_a_job_uses_it() {
    require!(Root, Sshd);
    let f = Fixture::new();
    let agent = Agent::start("[retention]\ncache_max_age = \"2s\"\ninterval = \"1s\"");
    let mut c = agent.scheduler().await;
    submit(
        &mut c,
        f.spec("holds-mirror", true, false, false, &["sleep 1000"]),
    )
    .await;
    wait_running(&c, "holds-mirror").await;
    assert_eq!(mirror_dirs(&agent).len(), 1);
    // Idle for longer than cache_max_age, with sweeps every second: the
    // mirror a running job borrows from stays.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(mirror_dirs(&agent).len(), 1, "{}", agent.log());
    c.cancel_job(pb::CancelJobRequest {
        job_id: "holds-mirror".into(),
    })
    .await
    .unwrap();
    watch(&mut c, "holds-mirror", 0).await;
    // Gone, and said so in the agent's log.
    wait_for("the unused mirror to go", Duration::from_secs(60), || {
        mirror_dirs(&agent).is_empty() && agent.log().contains("removed an unused checkout cache")
    });
    assert_eq!(tree_layers(&agent), Vec::<String>::new());
    // The next job makes it again.
    let (s, e) = run_job(
        &agent,
        f.spec("after-expiry", true, false, false, &["cat app.txt"]),
    )
    .await;
    assert_eq!(state(&s), pb::JobState::Succeeded, "{s:?}");
    assert!(output(&e, pb::Stream::Stdout).starts_with("app"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_never_uses_a_cache_it_could_not_fetch_itself() {
    require!(Root, Sshd);
    let f = Fixture::new();
    let agent = Agent::start("");
    let (s1, _) = run_job(&agent, f.spec("fills-cache", true, false, true, &["true"])).await;
    assert_eq!(state(&s1), pb::JobState::Succeeded);
    // A stranger's key, and a wrong host pin, fail as they would cold.
    let stranger = KeyPair::generate(f.keys.path(), "stranger2", "ed25519", "", &[]);
    let mut spec = f.spec("stranger-warm", false, false, false, &["true"]);
    spec.ssh.as_mut().unwrap().user_key = stranger.private_bytes();
    let (s2, _) = run_job(&agent, spec).await;
    assert_eq!(failure(&s2), pb::FailureKind::Auth, "{}", s2.message);
    let mut spec = f.spec("unpinned-warm", true, false, false, &["true"]);
    spec.ssh.as_mut().unwrap().known_hosts.clear();
    let (s3, _) = run_job(&agent, spec).await;
    assert_eq!(failure(&s3), pb::FailureKind::HostKey, "{}", s3.message);
    // The deploy key reads app from the cache, but not lib, which it cannot fetch.
    let (s4, _) = run_job(&agent, f.spec("deploy-warm", false, true, true, &["true"])).await;
    assert_eq!(failure(&s4), pb::FailureKind::RepoNotFound, "{}", s4.message);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_corrupt_cache_is_rebuilt_and_never_fails_a_job() {
    require!(Root, Sshd);
    let f = Fixture::new();
    let agent = Agent::start("");
    let (s1, _) = run_job(&agent, f.spec("before-corruption", true, false, false, &["true"])).await;
    assert_eq!(state(&s1), pb::JobState::Succeeded);
    let mut corrupted = 0;
    for m in mirror_dirs(&agent) {
        for e in std::fs::read_dir(m.join("objects/pack")).unwrap().flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "pack") {
                let len = std::fs::metadata(&p).unwrap().len();
                std::fs::write(&p, vec![0u8; len as usize]).unwrap();
                corrupted += 1;
            }
        }
    }
    assert!(corrupted > 0);
    f.server.push(&f.app, "after corruption", |w| {
        write(&w.join("app.txt"), "app v3\n")
    });
    for id in ["corrupt-1", "corrupt-2"] {
        let (s, e) = run_job(
            &agent,
            f.spec(
                id,
                true,
                false,
                false,
                &["cat app.txt; git fsck --no-dangling >/dev/null && echo fsck-ok"],
            ),
        )
        .await;
        assert_eq!(state(&s), pb::JobState::Succeeded, "{id}: {s:?}");
        assert_eq!(output(&e, pb::Stream::Stdout), "app v3\nfsck-ok\n", "{id}");
    }
    // Read from the agent's stderr by a thread of the test: it may lag.
    wait_for("rebuilt in the agent's log", Duration::from_secs(10), || {
        agent.log().contains("rebuilt")
    });
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_are_wiped_however_the_job_ends() {
    require!(Root, Sshd);
    let f = Fixture::new();
    let mut agent = Agent::start("[runtime]\ngrace_period = \"1s\"");
    // Markers of this run's steps alone: another run's (another checkout
    // of runnel testing at the same time) must not be taken for them.
    let marker = |n: u32| format!("1000.{n}{}", std::process::id());
    // Timed out.
    let mut spec = f.spec(
        "keys-timeout",
        true,
        true,
        false,
        &[&format!("sleep {}", marker(13))],
    );
    spec.timeout = Some(prost_types::Duration { seconds: 3, nanos: 0 });
    let (status, _) = run_job(&agent, spec).await;
    assert_eq!(state(&status), pb::JobState::TimedOut);
    assert_no_key_bytes(&agent, &[&f.user, &f.deploy]);
    // Cancelled.
    let mut c = agent.scheduler().await;
    submit(
        &mut c,
        f.spec(
            "keys-cancel",
            true,
            true,
            false,
            &[&format!("sleep {}", marker(14))],
        ),
    )
    .await;
    wait_for("the step to run", std::time::Duration::from_secs(30), || {
        !host_processes_with(&marker(14)).is_empty()
    });
    assert!(
        !files_containing(&agent.state_dir(), &key_line(&f.user)).is_empty(),
        "the keys are installed while it runs"
    );
    c.cancel_job(pb::CancelJobRequest {
        job_id: "keys-cancel".into(),
    })
    .await
    .unwrap();
    watch(&mut c, "keys-cancel", 0).await;
    assert_no_key_bytes(&agent, &[&f.user, &f.deploy]);
    // The agent killed while the job runs, then restarted.
    submit(
        &mut c,
        f.spec(
            "keys-kill9",
            true,
            true,
            false,
            &[&format!("sleep {}", marker(15))],
        ),
    )
    .await;
    wait_for("the step to run", std::time::Duration::from_secs(30), || {
        !host_processes_with(&marker(15)).is_empty()
    });
    agent.kill9();
    assert!(!files_containing(&agent.state_dir(), &key_line(&f.user)).is_empty());
    agent.launch();
    let mut op = agent.operator().await;
    let events = watch(&mut op, "keys-kill9", 0).await;
    assert_eq!(state(&final_status(&events)), pb::JobState::Lost);
    assert_no_key_bytes(&agent, &[&f.user, &f.deploy]);
    assert!(host_processes_with(&marker(15)).is_empty());
}

/// A key file unlinked before it is overwritten keeps its bytes in freed
/// blocks, where no listing of the state directory finds them. So the test
/// holds every key file open while the job runs: after the job, the files
/// are gone and what the (unlinked) inodes hold must be zeros.
#[tokio::test(flavor = "multi_thread")]
async fn every_key_file_is_overwritten_before_it_is_unlinked() {
    use std::io::{Read, Seek};
    require!(Root, Sshd);
    let f = Fixture::new();
    let agent = Agent::start("[runtime]\ngrace_period = \"1s\"");
    let marker = format!("1000.{}16", std::process::id());
    let mut c = agent.scheduler().await;
    submit(
        &mut c,
        f.spec("keys-held", true, true, false, &[&format!("sleep {marker}")]),
    )
    .await;
    wait_for("the step to run", std::time::Duration::from_secs(30), || {
        !host_processes_with(&marker).is_empty()
    });
    let mut held = Vec::new();
    for k in [&f.user, &f.deploy] {
        for path in files_containing(&agent.state_dir(), &key_line(k)) {
            let file = std::fs::File::open(&path).unwrap();
            held.push((path, file));
        }
    }
    assert!(
        held.len() >= 2,
        "the two keys are installed while the job runs: {held:?}"
    );
    c.cancel_job(pb::CancelJobRequest {
        job_id: "keys-held".into(),
    })
    .await
    .unwrap();
    let events = watch(&mut c, "keys-held", 0).await;
    assert_eq!(state(&final_status(&events)), pb::JobState::Cancelled);
    for (path, mut file) in held {
        assert!(!path.exists(), "{} is left", path.display());
        let mut bytes = Vec::new();
        file.rewind().unwrap();
        file.read_to_end(&mut bytes).unwrap();
        assert!(
            !bytes.is_empty(),
            "{} was truncated, not overwritten",
            path.display()
        );
        assert!(
            bytes.iter().all(|&b| b == 0),
            "{} was unlinked without being overwritten",
            path.display()
        );
    }
    assert!(!agent.log().contains("ERROR"), "{}", agent.log());
}

/// Paths under `dir`, relative, sorted; `.git`'s insides left out.
fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let rel = e.path().strip_prefix(dir).unwrap().display().to_string();
            if e.file_type().unwrap().is_dir() && rel != ".git" {
                todo.push(e.path());
            }
            out.push(rel);
        }
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn a_warm_checkout_for_a_non_root_image_user_copies_nothing_up() {
    require!(Root, Sshd, Busybox);
    use crate::support::image::{Entry, busybox_layer, write_layout};
    use std::os::unix::fs::MetadataExt;
    let f = Fixture::new();
    let layout = tempfile::tempdir().unwrap();
    let mut layer = busybox_layer();
    let attack = std::fs::read(crate::sandbox::attack()).unwrap();
    layer.push(Entry::File("bin/attack", attack, 0o755));
    write_layout(layout.path(), "v1", &[layer], &["PATH=/bin:/usr/bin"], "builder");
    let image = |mut spec: pb::JobSpec| {
        spec.container = Some(pb::Container {
            image: format!("oci:{}:v1", layout.path().display()),
            ..Default::default()
        });
        spec
    };
    let step = "echo \"owners: $(stat -c %u:%g app.txt src/main.c . | sort -u | tr '\\n' ' ')\"
        echo more >> app.txt && echo new > new.txt && echo \"write: ok\"
        touch ready
        attack wait-for go";
    // The step user, builder (1000:1000), as the host sees it: in slot 0's
    // user namespace (the default), and without one.
    for (config, host_id) in [("", 101_000), ("[runtime]\nuserns = false", 1000)] {
        let agent = Agent::start(config);
        let (s, _) = run_job(&agent, image(f.spec("fill", true, false, false, &["true"]))).await;
        assert_eq!(state(&s), pb::JobState::Succeeded, "{config}: {s:?}");
        let mut c = agent.scheduler().await;
        let spec = image(f.spec("warm", true, false, false, &[step]));
        let ws = crate::sandbox::submit_until_ready(&agent, &mut c, spec).await;
        // The job's writable layer holds its .git and what the step wrote:
        // no file of the tree was copied up to change its owner.
        let upper = ws.with_extension("upper");
        assert_eq!(
            files_under(&upper),
            [".git", "app.txt", "new.txt", "ready"],
            "{config}"
        );
        for name in [".", "app.txt", "new.txt", ".git/HEAD"] {
            let m = std::fs::symlink_metadata(upper.join(name)).unwrap();
            assert_eq!((m.uid(), m.gid()), (host_id, host_id), "{config}: {name}");
        }
        std::fs::write(ws.join("go"), "").unwrap();
        let events = watch(&mut c, "warm", 0).await;
        assert_succeeded(&final_status(&events), &events);
        let out = output(&events, pb::Stream::Stdout);
        assert!(
            out.contains("owners: 1000:1000 \n") && out.contains("write: ok"),
            "{config}: {out}"
        );
        assert!(
            mounts_under(&agent.state_dir()).is_empty(),
            "{config}: {:?}",
            mounts_under(&agent.state_dir())
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn extra_keys_push_a_tag_and_log_in_to_a_second_host_and_leave_nothing() {
    require!(Root, Sshd);
    let keys = tempfile::tempdir().unwrap();
    let pusher = KeyPair::generate(keys.path(), "pusher", "ed25519", "", &[]);
    let login = KeyPair::generate(keys.path(), "login", "ed25519", "", &[]);
    let stray = KeyPair::generate(keys.path(), "stray", "ed25519", "", &[]);
    let git_host = GitServer::start(&[], &[&pusher]);
    git_host.create_repo("org/app.git", |w| write(&w.join("app.txt"), "app\n"));
    let other = GitServer::start(&[], &[&login]);
    other.create_repo("org/other.git", |w| write(&w.join("other.txt"), "other\n"));
    let agent = Agent::start("");
    let mut spec = job(
        "extra-keys",
        &[
            &format!(
                "git clone -q {} /tmp/app && cd /tmp/app && git tag v1.0 && git push -q origin v1.0 && echo pushed",
                git_host.url("org/app.git")
            ),
            &format!(
                "git ls-remote {} | grep -c refs/heads/main",
                other.url("org/other.git")
            ),
            "ls ~/.ssh | grep -c '^id_.*[^b]$'",
        ],
    );
    let extra = |k: &KeyPair, host: &str| pb::ExtraKey {
        private_key: k.private_bytes(),
        host: host.into(),
    };
    spec.ssh = Some(pb::SshCredentials {
        known_hosts: vec![git_host.known_hosts_line.clone(), other.known_hosts_line.clone()],
        extra_keys: vec![
            extra(&pusher, "127.0.0.1"),
            extra(&login, ""),
            extra(&stray, "deploy.example.com"),
        ],
        ..Default::default()
    });
    // Its steps reach the test's sshds on the host's loopback.
    let (status, events) = run_job(&agent, host_network(spec)).await;
    assert_succeeded(&status, &events);
    assert_eq!(output(&events, pb::Stream::Stdout), "pushed\n1\n3\n");
    // The tag is on the server.
    let tags = git(&git_host.repos().join("org/app.git"), &["tag"]);
    assert_eq!(tags.trim(), "v1.0");
    // The log names each key by fingerprint and host, never by content.
    let system = output(&events, pb::Stream::System);
    for (k, host) in [
        (&pusher, "127.0.0.1"),
        (&login, "every host"),
        (&stray, "deploy.example.com"),
    ] {
        assert!(
            system.contains(&format!(
                "runnel: extra key for {host} ssh-ed25519 {}",
                k.fingerprint
            )),
            "{system}"
        );
    }
    // A key for another host is never offered to these.
    for server in [&git_host, &other] {
        assert!(!server.log().contains(&stray.fingerprint), "{}", server.log());
    }
    assert_no_key_bytes(&agent, &[&pusher, &login, &stray]);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_extra_key_whose_host_could_add_a_config_line_is_refused() {
    require!(Root);
    let agent = Agent::start("");
    let mut c = agent.scheduler().await;
    let keys = tempfile::tempdir().unwrap();
    let k = KeyPair::generate(keys.path(), "k", "ed25519", "", &[]);
    let mut spec = job("bad-host", &["true"]);
    spec.ssh = Some(pb::SshCredentials {
        extra_keys: vec![pb::ExtraKey {
            private_key: k.private_bytes(),
            host: "example.com\n    ProxyCommand sh -c id".into(),
        }],
        ..Default::default()
    });
    let e = c
        .submit_job(pb::SubmitJobRequest { job: Some(spec) })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("ssh.extra_keys[0].host"), "{}", e.message());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_long_fetch_says_how_far_it_has_come() {
    require!(Root, Sshd);
    // 24 MB that do not compress: the fetch takes longer than the
    // agent's progress interval of 10 ms.
    let (_keys, user, server) = big_repo(24 << 20);
    let agent = Agent::start("[logs]\nprogress_interval = \"10ms\"");
    let mut spec = job("big-fetch", &["ls -s --block-size=1M big.bin"]);
    spec.checkout = Some(pb::Checkout {
        repo_url: server.url("org/big.git"),
        ..Default::default()
    });
    spec.ssh = Some(pb::SshCredentials {
        user_key: user.private_bytes(),
        known_hosts: vec![server.known_hosts_line.clone()],
        ..Default::default()
    });
    let (status, events) = run_job(&agent, spec).await;
    assert_succeeded(&status, &events);
    let system = output(&events, pb::Stream::System);
    let progress: Vec<&str> = system
        .lines()
        .filter(|l| l.starts_with("runnel: fetching: "))
        .collect();
    assert!(!progress.is_empty(), "{system}");
    assert!(
        progress
            .iter()
            .all(|l| l.contains(" objects, ") && l.ends_with(" MB/s)")),
        "{progress:?}"
    );
}
