//! The `runnel` command line: a local run of the README's example, and the
//! clients of a running agent, including `logs -f` across a dropped
//! connection.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;

use crate::support::*;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

fn runnel(args: &[&str]) -> Command {
    let mut c = Command::new(runnel_bin());
    c.args(args).stdin(Stdio::null());
    c
}

fn run_ok(cmd: &mut Command) -> (String, String) {
    let out = cmd.output().unwrap();
    let (o, e) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "{cmd:?} failed ({}):\n{o}\n{e}", out.status);
    (o, e)
}

#[test]
fn runnel_run_runs_the_readme_example() {
    require!(Root);
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/hello.toml");
    let (out, err) = run_ok(&mut runnel(&["run", example.to_str().unwrap()]));
    assert!(out.contains("hello from runnel\n"), "{out}");
    assert!(out.contains("written by the job\n"), "{out}");
    assert!(out.contains("Cargo.toml"), "the checkout is missing: {out}");
    assert!(err.contains("SUCCEEDED"), "{err}");
    assert!(
        !Path::new("/runnel-was-here").exists(),
        "the example wrote the host's /"
    );
}

#[test]
fn runnel_run_exits_non_zero_for_a_failed_job_or_a_bad_file() {
    require!(Root);
    let dir = tempfile::tempdir().unwrap();
    let failing = dir.path().join("fail.toml");
    std::fs::write(&failing, "[[steps]]\nrun = \"echo about to fail; exit 7\"\n").unwrap();
    let out = runnel(&["run", failing.to_str().unwrap()]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "about to fail\n");
    assert!(String::from_utf8_lossy(&out.stderr).contains("exit status 7"));

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[[steps]]\nrun = \"true\"\ntimeout = \"soon\"\n").unwrap();
    let out = runnel(&["run", bad.to_str().unwrap()]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("steps[0].timeout") && err.contains("bad.toml"),
        "{err}"
    );
}

#[test]
fn runnel_oci_says_a_missing_container_does_not_exist_as_the_agent_reads_it() {
    use runnel::runtime::CommandError;
    let root = tempfile::tempdir().unwrap();
    for args in [
        ["delete", "--force", "gone"].as_slice(),
        &["kill", "gone", "TERM"],
    ] {
        let out = runnel(&["oci", "--root", root.path().to_str().unwrap()])
            .args(args)
            .output()
            .unwrap();
        let read = CommandError::check(&args.join(" "), "gone", out.status, &out.stderr);
        assert!(
            matches!(&read, Err(CommandError::NotFound { id }) if id == "gone"),
            "{args:?}: {read:?}"
        );
    }
}

#[test]
fn the_clients_of_a_running_agent() {
    require!(Root);
    let agent = Agent::start("[runtime]\ngrace_period = \"1s\"");
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, format!("{SCHEDULER_TOKEN}\n")).unwrap();
    let remote = |cmd: &mut Command| {
        cmd.env("RUNNEL_ADDR", &agent.addr)
            .env("RUNNEL_TOKEN_FILE", &token);
    };
    let job_file = dir.path().join("job.toml");
    std::fs::write(
        &job_file,
        "job_id = \"cli-1\"\n[[steps]]\nname = \"greet\"\nrun = \"echo hi from cli\"\n",
    )
    .unwrap();
    let mut submit = runnel(&["submit", "-f", job_file.to_str().unwrap()]);
    remote(&mut submit);
    let (out, err) = run_ok(&mut submit);
    assert_eq!(out, "hi from cli\n");
    assert!(err.contains("job cli-1 SUCCEEDED"), "{err}");

    let mut jobs = runnel(&["jobs"]);
    remote(&mut jobs);
    let (out, _) = run_ok(&mut jobs);
    assert!(
        out.lines()
            .any(|l| l.starts_with("cli-1") && l.contains("SUCCEEDED")),
        "{out}"
    );

    let mut logs = runnel(&["logs", "cli-1"]);
    remote(&mut logs);
    assert_eq!(run_ok(&mut logs).0, "hi from cli\n");
    // With the time the agent read each line.
    let mut logs = runnel(&["logs", "--timestamps", "cli-1"]);
    remote(&mut logs);
    let (out, _) = run_ok(&mut logs);
    let (when, line) = out.trim_end().split_once(' ').unwrap();
    assert_eq!(line, "hi from cli", "{out}");
    assert!(
        when.len() == "2026-11-29T09:48:35.123Z".len() && when.ends_with('Z') && when.contains('T'),
        "{out}"
    );
    // One job: its state and a table of its steps.
    let mut one = runnel(&["jobs", "cli-1"]);
    remote(&mut one);
    let (out, _) = run_ok(&mut one);
    assert!(out.starts_with("cli-1 SUCCEEDED\n"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.contains("on_success") && l.ends_with("succeeded")),
        "{out}"
    );

    let mut info = runnel(&["info"]);
    remote(&mut info);
    let (out, _) = run_ok(&mut info);
    assert!(out.contains("runtime:      libcontainer"), "{out}");

    std::fs::write(
        &job_file,
        "job_id = \"cli-2\"\n[[steps]]\nrun = \"sleep 1000.991\"\n",
    )
    .unwrap();
    let mut submit = runnel(&["submit", job_file.to_str().unwrap()]);
    remote(&mut submit);
    assert_eq!(run_ok(&mut submit).0, "cli-2\n");
    let mut cancel = runnel(&["cancel", "cli-2"]);
    remote(&mut cancel);
    run_ok(&mut cancel);
    let mut follow = runnel(&["logs", "-f", "cli-2"]);
    remote(&mut follow);
    let out = follow.output().unwrap();
    assert_eq!(out.status.code(), Some(1), "a cancelled job is not a success");
    assert!(String::from_utf8_lossy(&out.stderr).contains("CANCELLED"));

    // Without a token, the agent's refusal is shown.
    let out = runnel(&["jobs", "--addr", &agent.addr])
        .env_remove("RUNNEL_TOKEN")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unauthenticated")
            || String::from_utf8_lossy(&out.stderr)
                .to_lowercase()
                .contains("token")
    );
}

/// A TCP proxy whose connections can all be cut at once.
async fn proxy(to: String) -> (String, Arc<std::sync::Mutex<CancellationToken>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    let cut = Arc::new(std::sync::Mutex::new(CancellationToken::new()));
    let c = cut.clone();
    tokio::spawn(async move {
        loop {
            let (mut inbound, _) = listener.accept().await.unwrap();
            let token = c.lock().unwrap().clone();
            let to = to.clone();
            tokio::spawn(async move {
                let mut outbound = TcpStream::connect(to.trim_start_matches("http://"))
                    .await
                    .unwrap();
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                    _ = token.cancelled() => {}
                }
            });
        }
    });
    (addr, cut)
}

#[tokio::test(flavor = "multi_thread")]
async fn logs_follow_resumes_after_a_dropped_connection() {
    require!(Root);
    let agent = Agent::start("");
    let mut c = agent.scheduler().await;
    submit(
        &mut c,
        job(
            "dropped",
            &["for i in $(seq 1 40); do echo line $i; sleep 0.05; done"],
        ),
    )
    .await;
    let (addr, cut) = proxy(agent.addr.clone()).await;
    let mut child = runnel(&[
        "logs",
        "-f",
        "dropped",
        "--addr",
        &addr,
        "--token",
        OPERATOR_TOKEN,
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(stdout).lines() {
            let line = line.unwrap();
            if line == "line 5" {
                // Cut every connection through the proxy; new ones still work.
                let mut t = cut.lock().unwrap();
                t.cancel();
                *t = CancellationToken::new();
            }
            lines.push(line);
        }
        lines
    });
    let lines = tokio::task::spawn_blocking(move || reader.join().unwrap())
        .await
        .unwrap();
    let status = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    let want: Vec<String> = (1..=40).map(|i| format!("line {i}")).collect();
    assert_eq!(lines, want, "stderr: {}", String::from_utf8_lossy(&status.stderr));
    assert!(status.status.success());
    assert!(
        String::from_utf8_lossy(&status.stderr).contains("connection lost"),
        "the connection was never cut"
    );
}
