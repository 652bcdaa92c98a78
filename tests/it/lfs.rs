//! Git LFS: with `lfs = true` a checkout gets the objects of its LFS
//! pointers from a real LFS server (giftless) found through the test
//! sshd's `git-lfs-authenticate`, with the job's key, and the workspace
//! holds the objects' bytes where git-lfs's smudge would put them; a
//! missing object or a refused token fails the job with CHECKOUT naming
//! the file and the oid.

use sha2::Digest;

use crate::support::lfs::{Giftless, pointer};
use crate::support::sshd::{GitServer, KeyPair, write};
use crate::support::*;
use runnel::api::pb;

const ATTRIBUTES: &str = "*.bin filter=lfs diff=lfs merge=lfs -text\n";
const REPORT: &str = "find . -name .git -prune -o -type f -print | sort | xargs sha256sum";

fn digest(bytes: &[u8]) -> String {
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Bytes no one would mistake for a pointer: `n` of them.
fn object(seed: u8, n: usize) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u32).wrapping_mul(2654435761).to_le_bytes()[1] ^ seed)
        .collect()
}

struct Lfs {
    server: GitServer,
    giftless: Giftless,
    user: KeyPair,
    _keys: tempfile::TempDir,
    work: std::path::PathBuf,
    big: Vec<u8>,
    deep: Vec<u8>,
}

impl Lfs {
    fn new() -> Lfs {
        let keys = tempfile::tempdir().unwrap();
        let user = KeyPair::generate(keys.path(), "user", "ed25519", "", &[]);
        let server = GitServer::start(&[], &[&user]);
        let giftless = Giftless::start();
        let (big, deep) = (object(1, 300_000), object(2, 5_000));
        let (pbig, pdeep) = (
            giftless.store("org", "app", &big),
            giftless.store("org", "app", &deep),
        );
        let work = server.create_repo("org/app.git", |w| {
            write(&w.join(".gitattributes"), ATTRIBUTES);
            write(&w.join("big.bin"), &pbig);
            write(&w.join("sub/deep.bin"), &pdeep);
            // filter=lfs but not a pointer: passes through, as git-lfs does.
            write(&w.join("plain.bin"), "not a pointer\n");
            // A pointer without filter=lfs: a file like any other.
            write(&w.join("pointer.txt"), &pbig);
        });
        let token = giftless.token("obj:org/app/*:read", false);
        server.set_lfs("org/app.git", &giftless.authenticate_json("org", "app", &token));
        Lfs {
            server,
            giftless,
            user,
            _keys: keys,
            work,
            big,
            deep,
        }
    }

    fn spec(&self, id: &str, lfs: bool) -> pb::JobSpec {
        let mut spec = job(id, &[REPORT]);
        spec.checkout = Some(pb::Checkout {
            repo_url: self.server.url("org/app.git"),
            lfs,
            ..Default::default()
        });
        spec.ssh = Some(self.server.user_credentials(&self.user));
        spec
    }

    /// What the step prints for a workspace with (or without) the objects.
    fn expected(&self, smudged: bool) -> String {
        let (big, deep) = match smudged {
            true => (digest(&self.big), digest(&self.deep)),
            false => (
                digest(pointer(&self.big).as_bytes()),
                digest(pointer(&self.deep).as_bytes()),
            ),
        };
        [
            (digest(ATTRIBUTES.as_bytes()), "./.gitattributes"),
            (big, "./big.bin"),
            (digest(b"not a pointer\n"), "./plain.bin"),
            (digest(pointer(&self.big).as_bytes()), "./pointer.txt"),
            (deep, "./sub/deep.bin"),
        ]
        .iter()
        .map(|(d, p)| format!("{d}  {p}\n"))
        .collect()
    }

    async fn assert_workspace(&self, agent: &Agent, id: &str, lfs: bool) {
        let (status, events) = run_job(agent, self.spec(id, lfs)).await;
        assert_eq!(
            state(&status),
            pb::JobState::Succeeded,
            "{id}: {status:?}\n{}\n{}\ngiftless:\n{}",
            output(&events, pb::Stream::Stderr),
            output(&events, pb::Stream::System),
            self.giftless.log()
        );
        assert_eq!(output(&events, pb::Stream::Stdout), self.expected(lfs), "{id}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn lfs_objects_are_fetched_with_the_jobs_key_cached_and_smudged() {
    require!(Root, Sshd);
    let lfs = Lfs::new();
    let agent = Agent::start("");
    lfs.assert_workspace(&agent, "cold", true).await;
    // Kept by oid next to the mirrors, verified.
    let store = agent.state_dir().join("mirrors/lfs");
    for bytes in [&lfs.big, &lfs.deep] {
        let oid = digest(bytes);
        let at = store.join(&oid[..2]).join(&oid[2..4]).join(&oid);
        assert_eq!(std::fs::read(&at).unwrap(), *bytes, "{}", at.display());
    }
    // The cached work tree of the commit has the objects (layers of their
    // own: a job without `lfs` gets the pointers).
    let lfs_trees: Vec<_> = std::fs::read_dir(agent.state_dir().join("mirrors"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().ends_with("-lfs.trees"))
        .collect();
    let bases: Vec<_> = lfs_trees
        .iter()
        .flat_map(|t| std::fs::read_dir(t).unwrap().flatten().map(|e| e.path()))
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("base-") && p.is_dir())
        .collect();
    assert_eq!(bases.len(), 1, "{lfs_trees:?}: {bases:?}");
    assert_eq!(std::fs::read(bases[0].join("big.bin")).unwrap(), lfs.big);
    // From the store: the LFS server is not asked again (a token that no
    // longer works would fail the job otherwise).
    let forged = lfs.giftless.token("obj:org/app/*:read", true);
    lfs.server.set_lfs(
        "org/app.git",
        &lfs.giftless.authenticate_json("org", "app", &forged),
    );
    lfs.assert_workspace(&agent, "warm", true).await;
    // Without `lfs`, the pointers as git stores them (the cached layers).
    lfs.assert_workspace(&agent, "pointers", false).await;
    let token = lfs.giftless.token("obj:org/app/*:read", false);
    lfs.server.set_lfs(
        "org/app.git",
        &lfs.giftless.authenticate_json("org", "app", &token),
    );
    // A push that changes an object: a delta layer, smudged too.
    let newer = object(4, 70_000);
    let pnewer = lfs.giftless.store("org", "app", &newer);
    lfs.server
        .push(&lfs.work, "a new big.bin", |w| write(&w.join("big.bin"), &pnewer));
    let (status, events) = run_job(&agent, lfs.spec("pushed", true)).await;
    assert_eq!(state(&status), pb::JobState::Succeeded, "{status:?}");
    let out = output(&events, pb::Stream::Stdout);
    assert!(out.contains(&format!("{}  ./big.bin\n", digest(&newer))), "{out}");
    assert!(
        out.contains(&format!("{}  ./sub/deep.bin\n", digest(&lfs.deep))),
        "{out}"
    );
    assert!(!agent.log().contains("will be rebuilt"), "{}", agent.log());

    // Without the cache: into the workspace's .git/lfs/objects, as git-lfs.
    let nocache = Agent::start("[checkout]\ncache = false");
    let (status, events) = run_job(&nocache, lfs.spec("no-cache", true)).await;
    assert_eq!(state(&status), pb::JobState::Succeeded, "{status:?}");
    let out = output(&events, pb::Stream::Stdout);
    assert!(out.contains(&format!("{}  ./big.bin\n", digest(&newer))), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_lfs_object_or_a_refused_token_fails_the_checkout_naming_the_file() {
    require!(Root, Sshd);
    let lfs = Lfs::new();
    let lost = object(3, 1000);
    lfs.server
        .push(&lfs.work, "a pointer whose object was never pushed", |w| {
            write(&w.join("lost/never-pushed.bin"), &pointer(&lost));
        });
    for cache in ["", "[checkout]\ncache = false"] {
        let agent = Agent::start(cache);
        let (status, _) = run_job(&agent, lfs.spec("missing", true)).await;
        assert_eq!(failure(&status), pb::FailureKind::Checkout, "{status:?}");
        assert!(
            status.message.contains("lost/never-pushed.bin") && status.message.contains(&digest(&lost)),
            "{}",
            status.message
        );
        assert!(!agent.log().contains("will be rebuilt"), "{}", agent.log());
    }
    // A token the server did not sign: refused, and the job says so.
    lfs.server.push(&lfs.work, "drop it", |w| {
        std::fs::remove_dir_all(w.join("lost")).unwrap();
    });
    let forged = lfs.giftless.token("obj:org/app/*:read", true);
    lfs.server.set_lfs(
        "org/app.git",
        &lfs.giftless.authenticate_json("org", "app", &forged),
    );
    let agent = Agent::start("");
    let (status, _) = run_job(&agent, lfs.spec("forged", true)).await;
    assert_eq!(failure(&status), pb::FailureKind::Checkout, "{status:?}");
    assert!(
        status.message.contains("refused")
            && status.message.contains("401")
            && [&lfs.big, &lfs.deep]
                .iter()
                .any(|b| status.message.contains(&digest(b))),
        "{}",
        status.message
    );
    // An SSH server that does not answer git-lfs-authenticate.
    std::fs::remove_file(lfs.server.dir.path().join("lfs/org_app.git")).unwrap();
    let (status, _) = run_job(&agent, lfs.spec("no-lfs", true)).await;
    assert_eq!(failure(&status), pb::FailureKind::Checkout, "{status:?}");
    assert!(
        status.message.contains("git-lfs-authenticate"),
        "{}",
        status.message
    );
}
