//! A checkout equals `git clone --recurse-submodules` of the same revision:
//! a corpus of repositories built byte for byte with `git fast-import`
//! (attributes of every kind and directory, symlinks, exec bits, nested
//! and `update = none` submodules, a submodule pinned to a commit no ref
//! advertises, refs a pull request build names), served by the test sshd,
//! each workspace compared entry by entry (path, type, mode, link target,
//! sha256) and by what `git status`, `git log` and `git submodule status`
//! say inside the step; cold, warm, after a push and without the cache.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::support::sshd::{GitServer, KeyPair, git, sh};
use crate::support::*;
use runnel::api::pb;

/// What a step prints about its workspace, and what the same script prints
/// in git's clone: the root's mode; every entry but `.git` (type, mode,
/// path, then the content's digest or the link's target); what git says.
const REPORT: &str = r#"stat -c 'root %a' .
find . -mindepth 1 -name .git -prune -o \( -type f -printf '%y %m %p ' -exec sh -c 'sha256sum < "$1"' _ {} \; \) -o -printf '%y %m %p %l\n' | sort
echo '== status'; git status --porcelain --ignore-submodules=none
echo '== log'; git log -1 --format='%H %s'
echo '== branch'; git rev-parse --abbrev-ref HEAD; git rev-parse --abbrev-ref '@{u}' 2>/dev/null || echo 'no upstream'
echo '== submodules'; git submodule status --recursive | cut -d' ' -f1-3
echo '== libs/a'; git -C libs/a log -1 --format='%H %s' 2>&1 || true
git -C libs/a log --format=%s 2>/dev/null | wc -l; git -C libs/a rev-parse --is-shallow-repository 2>&1 || true
"#;

/// A file of a commit for `git fast-import`.
enum Item {
    File(&'static str, &'static str, Vec<u8>),
    Link(&'static str, &'static str),
    Gitlink(&'static str, String),
}

fn file(path: &'static str, bytes: &[u8]) -> Item {
    Item::File(path, "100644", bytes.to_vec())
}

/// Commits `items` (the whole tree) on `refname` of the bare repository
/// `bare` with `git fast-import`, on top of what `refname` holds; returns
/// the commit id. Dates are fixed: the ids are the same in every run.
fn import(bare: &Path, refname: &str, message: &str, items: &[Item]) -> String {
    let mut s = Vec::new();
    let data = |s: &mut Vec<u8>, bytes: &[u8]| {
        s.extend_from_slice(format!("data {}\n", bytes.len()).as_bytes());
        s.extend_from_slice(bytes);
        s.push(b'\n');
    };
    s.extend_from_slice(format!("commit {refname}\n").as_bytes());
    s.extend_from_slice(b"committer T <t@example.org> 1700000000 +0000\n");
    data(&mut s, message.as_bytes());
    let parent = Command::new("git")
        .arg("-C")
        .arg(bare)
        .args(["rev-parse", "--verify", "-q", refname])
        .output()
        .unwrap();
    if parent.status.success() {
        s.extend_from_slice(format!("from {}", String::from_utf8_lossy(&parent.stdout)).as_bytes());
    }
    s.extend_from_slice(b"deleteall\n");
    for item in items {
        match item {
            Item::File(path, mode, bytes) => {
                s.extend_from_slice(format!("M {mode} inline {path}\n").as_bytes());
                data(&mut s, bytes);
            }
            Item::Link(path, target) => {
                s.extend_from_slice(format!("M 120000 inline {path}\n").as_bytes());
                data(&mut s, target.as_bytes());
            }
            Item::Gitlink(path, sha) => {
                s.extend_from_slice(format!("M 160000 {sha} {path}\n").as_bytes());
            }
        }
    }
    let mut child = Command::new("git")
        .arg("-C")
        .arg(bare)
        .args(["fast-import", "--quiet"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&s).unwrap();
    assert!(
        child.wait().unwrap().success(),
        "git fast-import into {}",
        bare.display()
    );
    git(bare, &["rev-parse", refname])
}

fn bare(server: &GitServer, path: &str) -> PathBuf {
    let dir = server.repos().join(path);
    std::fs::create_dir_all(&dir).unwrap();
    git(&dir, &["init", "-q", "--bare", "-b", "main"]);
    dir
}

/// The repositories: `org/app.git` (HEAD is `trunk`; `main` points at the
/// same commit), its submodules `libs/a` (→ `org/lib.git`, itself with a
/// submodule), `libs/none` (`update = none`) and `pinned` (→ `org/sub.git`
/// at a commit no ref advertises).
pub struct Corpus {
    pub server: GitServer,
    keys: tempfile::TempDir,
    user: KeyPair,
    pub app: PathBuf,
}

/// What app's commits hold: `v` changes files whose bytes depend on their
/// attributes; `sub_attrs` is `sub/.gitattributes`.
fn app_tree(v: &str, sub_attrs: &str, lib: &str, none: &str, pinned: &str) -> Vec<Item> {
    vec![
        file(
            ".gitattributes",
            b"* text=auto eol=crlf\n*.id ident\n*.utf16 text working-tree-encoding=UTF-16\n\
              *.bin -text\n*.lfs filter=lfs diff=lfs merge=lfs -text\n[attr]keep -text\n*.keep keep\n",
        ),
        file(
            ".gitmodules",
            b"[submodule \"libs/a\"]\n\tpath = libs/a\n\turl = ../lib.git\n\tshallow = true\n\
              [submodule \"none\"]\n\tpath = libs/none\n\turl = ../none.git\n\tupdate = none\n\
              [submodule \"pinned\"]\n\tpath = pinned\n\turl = ../sub.git\n",
        ),
        file(
            "#hash.txt",
            format!("sorts before .gitattributes\n{v}\n").as_bytes(),
        ),
        file("-early.txt", b"also before\nit\n"),
        file("plain.txt", format!("one\ntwo {v}\n").as_bytes()),
        file("mixed.txt", b"already\r\nmixed\n"),
        file("two.id", format!("first $Id$ and\nsecond $Id$ {v}\n").as_bytes()),
        file("w.utf16", format!("h\u{e9}llo {v}\nw\u{f6}rld\n").as_bytes()),
        file("data.bin", b"\0binary\nfile\n"),
        file("nul.txt", b"looks\0binary\n"),
        file(
            "big.lfs",
            b"version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 1\n",
        ),
        file("x.keep", b"a macro\nkeeps LF\n"),
        file("sub/.gitattributes", sub_attrs.as_bytes()),
        file("sub/keep.txt", b"lf\nhere\n"),
        file("sub/deep/x.txt", b"deep\nfile\n"),
        file("sub/deep/y.md", b"markdown\nfile\n"),
        Item::File("run.sh", "100755", b"#!/bin/sh\necho run\n".to_vec()),
        Item::Link("link", "plain.txt"),
        Item::Link("dirlink", "sub/deep"),
        Item::Link("dangling", "nowhere/at/all"),
        Item::Gitlink("libs/a", lib.to_string()),
        Item::Gitlink("libs/none", none.to_string()),
        Item::Gitlink("pinned", pinned.to_string()),
    ]
}

impl Corpus {
    pub fn new() -> Corpus {
        let keys = tempfile::tempdir().unwrap();
        let user = KeyPair::generate(keys.path(), "user", "ed25519", "", &[]);
        let server = GitServer::start(&[], &[&user]);
        let deep = bare(&server, "org/deep.git");
        let deep_c = import(&deep, "refs/heads/main", "deep", &[file("deep.txt", b"deep\n")]);
        let lib = bare(&server, "org/lib.git");
        import(&lib, "refs/heads/main", "lib 0", &[file("lib.txt", b"lib 0\n")]);
        let lib_c = import(
            &lib,
            "refs/heads/main",
            "lib",
            &[
                file(".gitattributes", b"*.txt eol=crlf\n"),
                file("lib.txt", b"lib\nfile\n"),
                file(
                    ".gitmodules",
                    b"[submodule \"d\"]\n\tpath = nested/deep\n\turl = ../deep.git\n",
                ),
                Item::Gitlink("nested/deep", deep_c),
            ],
        );
        let none = bare(&server, "org/none.git");
        let none_c = import(&none, "refs/heads/main", "none", &[file("none.txt", b"none\n")]);
        // sub: main moves on; the pinned commit was on a branch since deleted.
        let sub = bare(&server, "org/sub.git");
        import(&sub, "refs/heads/main", "sub 1", &[file("sub.txt", b"sub 1\n")]);
        let pinned = import(&sub, "refs/heads/gone", "pinned", &[file("sub.txt", b"pinned\n")]);
        git(&sub, &["update-ref", "-d", "refs/heads/gone"]);
        import(&sub, "refs/heads/main", "sub 2", &[file("sub.txt", b"sub 2\n")]);
        git(&sub, &["config", "uploadpack.allowAnySHA1InWant", "true"]);
        let app = bare(&server, "org/app.git");
        let tree = app_tree("v1", "*.txt -text\n", &lib_c, &none_c, &pinned);
        let c1 = import(&app, "refs/heads/trunk", "app v1", &tree);
        git(&app, &["update-ref", "refs/heads/main", &c1]);
        git(&app, &["symbolic-ref", "HEAD", "refs/heads/trunk"]);
        Corpus {
            server,
            keys,
            user,
            app,
        }
    }

    /// A new commit on trunk (and main): `v` changes attribute-dependent
    /// files; `sub_attrs` changes a directory's `.gitattributes`.
    pub fn push(&self, v: &str, sub_attrs: &str) -> String {
        let gitlink = |path: &str| {
            let line = git(&self.app, &["ls-tree", "trunk", path]);
            line.split_whitespace().nth(2).unwrap().to_string()
        };
        let (lib, none, pinned) = (gitlink("libs/a"), gitlink("libs/none"), gitlink("pinned"));
        let c = import(
            &self.app,
            "refs/heads/trunk",
            &format!("app {v}"),
            &app_tree(v, sub_attrs, &lib, &none, &pinned),
        );
        git(&self.app, &["update-ref", "refs/heads/main", &c]);
        c
    }

    pub fn spec(&self, id: &str, revision: &str, steps: &[&str]) -> pb::JobSpec {
        let mut spec = job(id, steps);
        spec.checkout = Some(pb::Checkout {
            repo_url: self.server.url("org/app.git"),
            revision: revision.to_string(),
            submodules: true,
            ..Default::default()
        });
        spec.ssh = Some(self.server.user_credentials(&self.user));
        spec
    }

    fn ssh_command(&self) -> String {
        let kh = self.keys.path().join("kh");
        std::fs::write(&kh, format!("{}\n", self.server.known_hosts_line)).unwrap();
        format!(
            "ssh -i {} -o IdentitiesOnly=yes -o UserKnownHostsFile={} -o StrictHostKeyChecking=yes",
            self.user.private.display(),
            kh.display()
        )
    }

    /// `script` run in `git clone --recurse-submodules` of `revision` (a
    /// branch, or any ref: fetched and checked out detached, as a pull
    /// request build does), sparse with a cone of `sparse` if not empty.
    pub fn clone_report(&self, revision: &str, sparse: &[&str], script: &str) -> String {
        let dir = tempfile::tempdir().unwrap();
        let work = dir.path().join("app");
        let run = |cmd: &mut Command| {
            sh(cmd
                .env("GIT_SSH_COMMAND", self.ssh_command())
                .env("GIT_CONFIG_NOSYSTEM", "1")
                .env("HOME", dir.path()))
        };
        let by_id = revision.len() == 40 && revision.bytes().all(|b| b.is_ascii_hexdigit());
        let fetched = by_id || revision.starts_with("refs/") && !revision.starts_with("refs/heads/");
        let mut clone = Command::new("git");
        clone.args(["clone", "-q"]);
        if fetched {
            clone.arg("--no-checkout");
        }
        if !sparse.is_empty() {
            clone.arg("--sparse");
        }
        if !fetched && sparse.is_empty() {
            clone.arg("--recurse-submodules");
        }
        if let Some(branch) = revision
            .strip_prefix("refs/heads/")
            .or((!fetched && !revision.is_empty()).then_some(revision))
        {
            clone.args(["-b", branch]);
        }
        clone.arg(self.server.url("org/app.git")).arg(&work);
        run(&mut clone);
        let git_in = |args: &[&str]| {
            run(Command::new("git").arg("-C").arg(&work).args(args));
        };
        if !sparse.is_empty() {
            git_in(&[&["sparse-checkout", "set", "--cone"][..], sparse].concat());
        }
        if fetched {
            git_in(&["fetch", "-q", "origin", revision]);
            git_in(&["checkout", "-q", "--detach", "FETCH_HEAD"]);
        }
        if fetched || !sparse.is_empty() {
            git_in(&["submodule", "update", "-q", "--init", "--recursive"]);
        }
        run(Command::new("sh").arg("-c").arg(script).current_dir(&work))
    }

    /// Runs a job at `revision` that reports on its workspace, and
    /// asserts the report equals git's.
    pub async fn assert_same(&self, agent: &Agent, id: &str, revision: &str) {
        self.assert_same_sparse(agent, id, revision, &[]).await
    }

    /// [`Corpus::assert_same`] for a sparse checkout of the cone `sparse`.
    pub async fn assert_same_sparse(&self, agent: &Agent, id: &str, revision: &str, sparse: &[&str]) {
        let mut spec = self.spec(id, revision, &[REPORT]);
        spec.checkout.as_mut().unwrap().sparse_paths = sparse.iter().map(|s| s.to_string()).collect();
        let (status, events) = run_job(agent, spec).await;
        assert_eq!(
            state(&status),
            pb::JobState::Succeeded,
            "{id}: {status:?}\n{}\n{}",
            output(&events, pb::Stream::Stderr),
            output(&events, pb::Stream::System)
        );
        let ours = output(&events, pb::Stream::Stdout);
        let theirs = self.clone_report(revision, sparse, REPORT);
        if ours != theirs {
            let diff = first_difference(&ours, &theirs);
            panic!(
                "{id}: the workspace differs from git clone's:\n{diff}\n--- ours:\n{ours}\n--- git:\n{theirs}"
            );
        }
    }
}

/// The lines only one of two reports has.
fn first_difference(ours: &str, theirs: &str) -> String {
    let a: Vec<&str> = ours.lines().collect();
    let b: Vec<&str> = theirs.lines().collect();
    let mut out = String::new();
    for l in &a {
        if !b.contains(l) {
            out.push_str(&format!("ours only: {l}\n"));
        }
    }
    for l in &b {
        if !a.contains(l) {
            out.push_str(&format!("git only:  {l}\n"));
        }
    }
    out
}

fn git_clone_is_what_it_should_be(report: &str) {
    // The corpus exercises what it says it does: CRLF from the top
    // .gitattributes, LF where a directory's turns text off, both $Id$
    // expanded, UTF-16 with a BOM, the update = none submodule empty.
    for want in [
        "root 755",
        "l 777 ./link plain.txt",
        "f 755 ./run.sh",
        "d 755 ./libs/none",
        "trunk\norigin/trunk\n",
    ] {
        assert!(report.contains(want), "{want:?} not in git's report:\n{report}");
    }
    assert!(
        report
            .lines()
            .any(|l| l.starts_with('-') && l.ends_with(" libs/none")),
        "{report}"
    );
    assert!(
        report.ends_with("\n1\ntrue\n"),
        "libs/a is shallow = true: {report}"
    );
    let digest = |bytes: &[u8]| {
        use sha2::Digest;
        sha2::Sha256::digest(bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    for (path, bytes) in [
        ("./plain.txt", &b"one\r\ntwo v1\r\n"[..]),
        ("./#hash.txt", b"sorts before .gitattributes\r\nv1\r\n"),
        ("./sub/keep.txt", b"lf\nhere\n"),
        ("./mixed.txt", b"already\r\nmixed\n"),
        ("./x.keep", b"a macro\nkeeps LF\n"),
        (
            "./w.utf16",
            b"\xff\xfeh\0\xe9\0l\0l\0o\0 \0v\x001\0\r\0\n\0w\0\xf6\0r\0l\0d\0\r\0\n\0",
        ),
    ] {
        let line = report
            .lines()
            .find(|l| l.split(' ').nth(2) == Some(path))
            .unwrap_or_else(|| panic!("{path} not in {report}"));
        assert!(line.contains(&digest(bytes)), "{path}: {line}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_checkout_equals_git_clone_cold_warm_after_a_push_and_without_the_cache() {
    require!(Root, Sshd);
    let corpus = Corpus::new();
    git_clone_is_what_it_should_be(&corpus.clone_report("", &[], REPORT));
    let agent = Agent::start("");
    corpus.assert_same(&agent, "cold", "").await;
    corpus.assert_same(&agent, "warm", "").await;
    // Attribute-dependent files change: a delta layer over the base.
    corpus.push("v2", "*.txt -text\n");
    corpus.assert_same(&agent, "pushed", "").await;
    // A directory's .gitattributes changes: a new base.
    corpus.push("v3", "*.md text eol=crlf\n");
    corpus.assert_same(&agent, "attributes-pushed", "").await;
    // Sparse (cone mode): written, not laid over the cached layers.
    corpus
        .assert_same_sparse(&agent, "sparse", "", &["sub/deep"])
        .await;
    corpus
        .assert_same_sparse(&agent, "sparse-pinned-out", "refs/heads/main", &["sub"])
        .await;
    let nocache = Agent::start("[checkout]\ncache = false");
    corpus.assert_same(&nocache, "no-cache", "").await;
    corpus
        .assert_same_sparse(&nocache, "no-cache-sparse", "", &["sub/deep"])
        .await;
    assert!(
        !agent.log().contains("will be rebuilt"),
        "no checkout cache was found corrupt:\n{}",
        agent.log()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn any_ref_is_a_revision_and_a_remote_deleting_branches_is_no_corruption() {
    require!(Root, Sshd);
    let corpus = Corpus::new();
    let app = &corpus.app;
    let first = git(app, &["rev-parse", "trunk"]);
    let second = corpus.push("v2", "*.txt -text\n");
    // Pull request refs as Bitbucket Server and GitHub advertise them,
    // pointing at the first commit (not a branch tip any more).
    git(app, &["update-ref", "refs/pull-requests/1/from", &first]);
    git(app, &["update-ref", "refs/pull/1/head", &first]);
    git(app, &["update-ref", "refs/heads/feat", &second]);
    // A commit no ref advertises (a force-pushed build): fetched by id.
    let hidden = import(
        app,
        "refs/heads/hidden",
        "hidden",
        &[file("hidden.txt", b"hidden\n")],
    );
    git(app, &["update-ref", "-d", "refs/heads/hidden"]);
    git(app, &["config", "uploadpack.allowAnySHA1InWant", "true"]);
    for cache in ["", "[checkout]\ncache = false"] {
        let agent = Agent::start(cache);
        for (i, revision) in [
            "refs/pull-requests/1/from",
            "refs/pull/1/head",
            "refs/heads/main",
            "feat",
            &hidden,
        ]
        .iter()
        .enumerate()
        {
            corpus
                .assert_same(&agent, &format!("ref-{i}-{}", cache.is_empty()), revision)
                .await;
        }
        // The remote deletes `feat` and pushes `feat/x`.
        git(app, &["update-ref", "-d", "refs/heads/feat"]);
        git(app, &["update-ref", "refs/heads/feat/x", &first]);
        corpus
            .assert_same(&agent, &format!("feat-x-{}", cache.is_empty()), "feat/x")
            .await;
        assert!(
            !agent.log().contains("will be rebuilt"),
            "a remote's normal change is no corruption:\n{}",
            agent.log()
        );
        git(app, &["update-ref", "-d", "refs/heads/feat/x"]);
        git(app, &["update-ref", "refs/heads/feat", &second]);

        // Refspecs: more refs for the step (a merge build's target).
        let mut spec = corpus.spec(
            &format!("refspecs-{}", cache.is_empty()),
            "refs/pull/1/head",
            &["git rev-parse HEAD origin/target pr/1 refs/pull-requests/1/from"],
        );
        spec.checkout.as_mut().unwrap().refspecs = vec![
            "+refs/heads/main:refs/remotes/origin/target".into(),
            "refs/pull/*/head:refs/remotes/pr/*".into(),
            "refs/pull-requests/1/from".into(),
        ];
        let (status, events) = run_job(&agent, spec).await;
        assert_succeeded(&status, &events);
        assert_eq!(
            output(&events, pb::Stream::Stdout),
            format!("{first}\n{second}\n{first}\n{first}\n")
        );
        let mut bad = corpus.spec(&format!("bad-refspec-{}", cache.is_empty()), "", &["true"]);
        bad.checkout.as_mut().unwrap().refspecs = vec!["main:target".into()];
        let (status, _) = run_job(&agent, bad).await;
        assert_eq!(failure(&status), pb::FailureKind::BadSpec, "{status:?}");
        assert!(status.message.contains("\"main:target\""), "{}", status.message);

        // depth: the workspace's history is as shallow as asked, cache or not.
        let mut shallow = corpus.spec(
            &format!("depth-{}", cache.is_empty()),
            "",
            &["git rev-parse --is-shallow-repository; git log --format=%s | wc -l; git status --porcelain"],
        );
        shallow.checkout.as_mut().unwrap().depth = 1;
        let (status, events) = run_job(&agent, shallow).await;
        assert_succeeded(&status, &events);
        assert_eq!(output(&events, pb::Stream::Stdout), "true\n1\n");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn paths_git_refuses_are_refused_before_anything_reads_them() {
    require!(Root, Sshd);
    let corpus = Corpus::new();
    let agent = Agent::start("");
    // A .gitmodules that is a link to a host file the agent would read (its
    // submodule code opens .gitmodules), and a `.GIT.` directory that
    // would be the repository's own on some file systems.
    let cases: [(&str, Vec<Item>, &str); 2] = [
        (
            "link-gitmodules",
            vec![file("a.txt", b"a\n"), Item::Link(".gitmodules", "/etc/shadow")],
            "\".gitmodules\" is a symbolic link; git refuses",
        ),
        (
            "dot-git-alias",
            vec![
                file("a.txt", b"a\n"),
                file(".GIT./hooks/post-checkout", b"#!/bin/sh\necho runnel-evil-hook\n"),
            ],
            "a path git refuses to check out: \".GIT.\"",
        ),
    ];
    for (name, items, says) in cases {
        let bare = bare(&corpus.server, &format!("org/{name}.git"));
        import(&bare, "refs/heads/main", name, &items);
        for cache in [true, false] {
            let agent = if cache {
                &agent
            } else {
                &Agent::start("[checkout]\ncache = false")
            };
            let mut spec = corpus.spec(&format!("{name}-{cache}"), "", &["true"]);
            spec.checkout.as_mut().unwrap().repo_url = corpus.server.url(&format!("org/{name}.git"));
            let (status, _) = run_job(agent, spec).await;
            assert_eq!(failure(&status), pb::FailureKind::Checkout, "{name}: {status:?}");
            assert!(status.message.contains(says), "{name}: {}", status.message);
            assert!(!status.message.contains("root:"), "{}", status.message);
        }
    }
    // Nothing of them was written into the checkout cache's layers, and
    // the cache was not blamed for the repository's content.
    let found = files_containing(&agent.state_dir(), b"runnel-evil-hook");
    assert!(found.is_empty(), "{found:?}");
    assert!(!agent.log().contains("will be rebuilt"), "{}", agent.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pin_the_server_will_not_give_fails_the_job_and_never_the_cache() {
    require!(Root, Sshd);
    let corpus = Corpus::new();
    let sub = corpus.server.repos().join("org/sub.git");
    git(&sub, &["config", "uploadpack.allowAnySHA1InWant", "false"]);
    let agent = Agent::start("");
    for i in 0..2 {
        let (status, _) = run_job(&agent, corpus.spec(&format!("unfetchable-{i}"), "", &["true"])).await;
        assert_eq!(failure(&status), pb::FailureKind::Checkout, "{status:?}");
        assert!(
            status.message.contains("submodule pinned: its pinned commit")
                && status.message.contains("not even fetched by id"),
            "{}",
            status.message
        );
    }
    assert!(
        !agent.log().contains("will be rebuilt"),
        "the job's failure is not the cache's:\n{}",
        agent.log()
    );
}

/// Whether the files of a written workspace (and of its submodule) still
/// have the ctime the index recorded as they were written, and are all the
/// step user's (root in its namespace): a chown of every file after the
/// writing changes each ctime (and sends the first `git status` reading
/// every file again).
const GIVEN: &str = r#"given() {
  ( cd "$1" &&
    git ls-files --debug | awk 'NF == 1 { p = $1 } $1 == "ctime:" { split($2, t, ":"); if (t[1] != 0) printf "%s %d.%09d\n", p, t[1], t[2] }' | sort > /tmp/index &&
    cut -d' ' -f1 /tmp/index | xargs stat -c '%n %.9Z' -- | sort > /tmp/disk &&
    if cmp -s /tmp/index /tmp/disk; then echo "$1: ctime as written ($(wc -l < /tmp/index) files)"; else echo "$1: ctime changed after writing"; diff /tmp/index /tmp/disk | head -5; fi )
}
given .; given libs/a
echo "not the step user's: $(find . ! -user 0 -o ! -group 0 | wc -l)"; find . ! -user 0 -o ! -group 0 | head -3
echo "status: $(git status --porcelain --ignore-submodules=none | wc -l)"
"#;

#[tokio::test(flavor = "multi_thread")]
async fn a_written_checkout_is_the_step_users_as_written_never_chowned_afterwards() {
    require!(Root, Sshd);
    let corpus = Corpus::new();
    let cached = Agent::start("");
    let nocache = Agent::start("[checkout]\ncache = false");
    for (agent, id, sparse) in [(&nocache, "direct", &[][..]), (&cached, "sparse", &["sub"][..])] {
        let mut spec = corpus.spec(id, "", &[GIVEN]);
        spec.checkout.as_mut().unwrap().sparse_paths = sparse.iter().map(|s| s.to_string()).collect();
        let (status, events) = run_job(agent, spec).await;
        let out = output(&events, pb::Stream::Stdout);
        assert_eq!(
            state(&status),
            pb::JobState::Succeeded,
            "{id}: {status:?}\n{out}\n{}",
            output(&events, pb::Stream::Stderr)
        );
        for line in [
            ".: ctime as written (",
            "libs/a: ctime as written (",
            "not the step user's: 0",
            "status: 0",
        ] {
            assert!(out.contains(line), "{id}: no {line:?} in\n{out}");
        }
    }
}
