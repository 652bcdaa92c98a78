//! The `runnel` command line: argument parsing and the subcommands, thin
//! over the library. Errors become exit codes here, in one place.

mod client;
mod fleet;
mod logging;
mod print;
mod run;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// A CI build agent: SSH-keyed checkouts, clean containers, live logs.
#[derive(Debug, Parser)]
#[command(name = "runnel", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where a running agent is and how to prove who we are.
#[derive(Debug, clap::Args)]
pub struct Remote {
    /// The agent's address: http(s)://HOST:PORT, or unix:/PATH for an
    /// agent listening on a Unix socket.
    #[arg(
        long,
        env = "RUNNEL_ADDR",
        default_value = "http://127.0.0.1:7450",
        global = true
    )]
    addr: String,
    /// A file holding the token to present.
    #[arg(long, env = "RUNNEL_TOKEN_FILE", global = true)]
    token_file: Option<PathBuf>,
    /// The token itself (prefer --token-file: arguments are visible to other users).
    #[arg(long, env = "RUNNEL_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
    /// Speak TLS, trusting the CA certificates in this PEM file (without it,
    /// an https:// address is checked against the system's roots).
    #[arg(long, env = "RUNNEL_TLS_CA", global = true)]
    tls_ca: Option<PathBuf>,
    /// A client certificate (PEM) for an agent that requires one (mutual TLS).
    #[arg(long, env = "RUNNEL_TLS_CERT", global = true, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, env = "RUNNEL_TLS_KEY", global = true, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// The name the agent's certificate must carry, when it is not the
    /// address's host.
    #[arg(long, env = "RUNNEL_TLS_DOMAIN", global = true)]
    tls_domain: Option<String>,
}

/// The fleet's NATS servers, instead of one agent.
#[derive(Debug, clap::Args)]
pub struct Nats {
    /// NATS server URL(s), comma-separated (nats://HOST:4222): publish to
    /// the fleet's queue, read the fleet's events stream.
    #[arg(long = "nats", env = "RUNNEL_NATS", value_name = "URL")]
    url: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent daemon.
    Agent {
        /// Config file (default /etc/runnel/agent.toml; every key has a default).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Run one job locally, without a daemon, printing its output as it comes.
    Run {
        /// The job file (TOML).
        job: PathBuf,
        /// Agent config to take runtime defaults from.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Keep state (logs, status) here instead of a temporary directory.
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
    /// Submit a job file to a running agent, or with --nats to the fleet's queue.
    Submit {
        job: PathBuf,
        /// Follow the job's output until it ends.
        #[arg(short, long)]
        follow: bool,
        #[command(flatten)]
        nats: Nats,
        /// With --nats: the subject of the agents to run it (theirs is
        /// runnel.jobs. and their labels, KEY=VALUE tokens in key order).
        #[arg(long, default_value = "runnel.jobs.default", requires = "url")]
        subject: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// List the agent's jobs; with a job id, that job's state and steps.
    Jobs {
        job: Option<String>,
        #[command(flatten)]
        remote: Remote,
    },
    /// Print a job's output; with -f, follow it until the job ends.
    Logs {
        job: String,
        #[arg(short, long)]
        follow: bool,
        /// Each line with the time the agent read it (RFC 3339, UTC).
        #[arg(short, long)]
        timestamps: bool,
        /// Start after this event seq (with --nats: this sequence of the
        /// events stream).
        #[arg(long, default_value_t = 0)]
        after: u64,
        #[command(flatten)]
        nats: Nats,
        #[command(flatten)]
        remote: Remote,
    },
    /// Cancel a job.
    Cancel {
        job: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Show the agent's identity and load.
    Info {
        #[command(flatten)]
        remote: Remote,
    },
    /// Ask the agent's gRPC health service; exit 0 only when SERVING.
    Health {
        /// The service to ask about ("" = the agent as a whole).
        #[arg(long, default_value = "")]
        service: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Print an SSH server's host keys as known_hosts lines, for pinning.
    Keyscan {
        /// HOST or HOST:PORT.
        host: String,
        /// Seconds to wait for the server.
        #[arg(long, default_value_t = 10)]
        timeout: u64,
    },
    /// The store's caches of a project (the agent's [storage]): list them,
    /// or remove one.
    Cache {
        #[command(subcommand)]
        op: CacheOp,
        /// Agent config naming the store (default /etc/runnel/agent.toml).
        #[arg(long, global = true)]
        config: Option<PathBuf>,
    },
    /// Files out of and into a job's container (used by the agent itself).
    #[command(hide = true)]
    StoreIo {
        /// The container's init, as the host sees it.
        #[arg(long)]
        pid: i32,
        #[arg(long)]
        uid: u32,
        #[arg(long)]
        gid: u32,
        /// The step's working directory and home, for relative and ~ paths.
        #[arg(long)]
        cwd: String,
        #[arg(long)]
        home: String,
        #[command(subcommand)]
        op: StoreIoOp,
    },
    /// The embedded OCI runtime (used by the agent itself).
    #[command(hide = true)]
    Oci {
        #[arg(long)]
        root: PathBuf,
        #[command(subcommand)]
        op: OciOp,
    },
}

#[derive(Debug, Subcommand)]
enum OciOp {
    Run {
        #[arg(long)]
        bundle: PathBuf,
        #[arg(long)]
        pid_file: PathBuf,
        id: String,
    },
    Exec {
        #[arg(long)]
        process: PathBuf,
        id: String,
    },
    Kill {
        id: String,
        #[arg(default_value = "TERM")]
        signal: String,
    },
    Delete {
        #[arg(long)]
        force: bool,
        id: String,
    },
    State {
        id: String,
    },
}

#[derive(Debug, Subcommand)]
enum CacheOp {
    /// The project's caches (with a KEY, those whose keys start with it):
    /// key, size, when saved.
    Ls { project: String, key: Option<String> },
    /// Removes the project's cache KEY.
    Rm { project: String, key: String },
}

#[derive(Debug, Subcommand)]
enum StoreIoOp {
    /// PATHs (under --base) as a tar on stdout.
    Pack {
        #[arg(long)]
        base: String,
        #[arg(long)]
        zstd: bool,
        paths: Vec<String>,
    },
    /// A tar + zstd stream on stdin, into DIR.
    Unpack {
        #[arg(long)]
        into: String,
    },
    /// The sha256 of each FILE, a line each ("-" for one that cannot be read).
    Checksum { files: Vec<String> },
}

/// A failure of the command itself, with its exit code.
#[derive(Debug)]
pub struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    /// Bad input: a job file, a config, an argument.
    fn input(message: impl ToString) -> Failure {
        Failure {
            code: 2,
            message: message.to_string(),
        }
    }

    /// The agent could not be reached or refused the call.
    fn remote(message: impl ToString) -> Failure {
        Failure {
            code: 3,
            message: message.to_string(),
        }
    }

    /// runnel itself could not do its part.
    fn internal(message: impl ToString) -> Failure {
        Failure {
            code: 4,
            message: message.to_string(),
        }
    }

    /// The job ran and did not succeed (its story is already printed).
    fn job_failed() -> Failure {
        Failure {
            code: 1,
            message: String::new(),
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::internal(format!("cannot start the async runtime: {e}")))
}

/// Runs the command line; the process's exit code.
pub fn main() -> ExitCode {
    crate::sys::tls::install_crypto_provider();
    crate::sys::malloc::return_large_blocks();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Oci { root, op } => return oci(&root, op),
        Command::StoreIo {
            pid,
            uid,
            gid,
            cwd,
            home,
            op,
        } => return store_io(pid, uid, gid, &cwd, &home, op),
        Command::Cache { op, config } => {
            logging::init("warn", crate::config::LogFormat::Text);
            runtime().and_then(|rt| rt.block_on(cache(op, config)))
        }
        Command::Agent { config } => {
            // SAFETY: no other thread exists yet: the async runtime starts below.
            let notify = unsafe { crate::sys::sd_notify::Notifier::take_from_env() };
            match crate::config::Config::load(config.as_deref()) {
                Err(e) => Err(Failure::input(e)),
                Ok(config) => {
                    logging::init("info", config.log_format);
                    notify
                        .map_err(Failure::input)
                        .and_then(|notify| runtime().and_then(|rt| rt.block_on(run::agent(config, notify))))
                }
            }
        }
        Command::Run {
            job,
            config,
            state_dir,
        } => {
            logging::init("warn", crate::config::LogFormat::Text);
            runtime().and_then(|rt| rt.block_on(run::local(&job, config, state_dir)))
        }
        Command::Keyscan { host, timeout } => keyscan(&host, timeout),
        Command::Submit {
            job,
            follow,
            nats: Nats { url: Some(url) },
            subject,
            ..
        } => runtime().and_then(|rt| rt.block_on(fleet::submit(&url, &subject, &job, follow))),
        Command::Submit {
            job, follow, remote, ..
        } => runtime().and_then(|rt| rt.block_on(client::submit(&remote, &job, follow))),
        Command::Jobs { job: None, remote } => runtime().and_then(|rt| rt.block_on(client::jobs(&remote))),
        Command::Jobs {
            job: Some(job),
            remote,
        } => runtime().and_then(|rt| rt.block_on(client::job(&remote, &job))),
        Command::Logs {
            job,
            follow,
            timestamps,
            after,
            nats: Nats { url: Some(url) },
            ..
        } => runtime().and_then(|rt| rt.block_on(fleet::logs_cmd(&url, &job, after, follow, timestamps))),
        Command::Logs {
            job,
            follow,
            timestamps,
            after,
            remote,
            ..
        } => runtime().and_then(|rt| rt.block_on(client::logs(&remote, &job, after, follow, timestamps))),
        Command::Cancel { job, remote } => {
            runtime().and_then(|rt| rt.block_on(client::cancel(&remote, &job)))
        }
        Command::Info { remote } => runtime().and_then(|rt| rt.block_on(client::info(&remote))),
        Command::Health { service, remote } => {
            runtime().and_then(|rt| rt.block_on(client::health(&remote, &service)))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            if !f.message.is_empty() {
                eprintln!("runnel: {}", f.message);
            }
            ExitCode::from(f.code)
        }
    }
}

fn keyscan(host: &str, timeout: u64) -> Result<(), Failure> {
    let (h, port) = crate::ssh::keyscan::split_host_port(host)
        .ok_or_else(|| Failure::input(format!("{host:?} is not HOST or HOST:PORT")))?;
    let lines = crate::ssh::keyscan::keyscan(&h, port, std::time::Duration::from_secs(timeout))
        .map_err(Failure::remote)?;
    for l in lines {
        println!("{l}");
    }
    Ok(())
}

/// `runnel store-io`: joins the container first, while this process has
/// one thread (see `store::archive`). Exit 0, 1 on an error (said on
/// stderr), 3 when an unpack refused entries.
fn store_io(pid: i32, uid: u32, gid: u32, cwd: &str, home: &str, op: StoreIoOp) -> ExitCode {
    use crate::store::archive;
    if let Err(e) = archive::join(pid, uid, gid) {
        eprintln!("error: {e}");
        return ExitCode::from(1);
    }
    let resolve = |p: &str| archive::resolve(p, cwd, home);
    let result = match op {
        StoreIoOp::Pack { base, zstd, paths } => {
            let base = resolve(&base);
            let paths: Vec<_> = paths
                .iter()
                .map(|p| archive::resolve(p, &base.to_string_lossy(), home))
                .collect();
            archive::pack(&base, &paths, zstd, std::io::stdout().lock()).map(|c| {
                eprintln!("packed: {}", c.paths);
                0
            })
        }
        StoreIoOp::Unpack { into } => archive::unpack(&resolve(&into), std::io::stdin().lock()).map(|c| {
            eprintln!("unpacked: {}", c.paths);
            if c.refused > 0 { 3 } else { 0 }
        }),
        StoreIoOp::Checksum { files } => {
            for f in files {
                match archive::checksum(&resolve(&f)) {
                    Ok(sum) => println!("{sum}"),
                    Err(e) => {
                        eprintln!("warning: {e}");
                        println!("-");
                    }
                }
            }
            Ok(0)
        }
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

/// `runnel cache ls|rm`: the store the agent's config names.
async fn cache(op: CacheOp, config: Option<PathBuf>) -> Result<(), Failure> {
    let config = crate::config::Config::load(config.as_deref()).map_err(Failure::input)?;
    let store = crate::store::Store::open(&config.storage.settings).map_err(Failure::input)?;
    match op {
        CacheOp::Ls { project, key } => {
            crate::model::spec::validate_name("PROJECT", &project).map_err(Failure::input)?;
            let caches = store
                .caches_with_sizes(&project, key.as_deref().unwrap_or(""))
                .await
                .map_err(Failure::remote)?;
            for c in caches {
                println!(
                    "{}\t{}\t{}",
                    c.key,
                    c.size,
                    humantime::format_rfc3339_seconds(c.created)
                );
            }
            Ok(())
        }
        CacheOp::Rm { project, key } => {
            crate::model::spec::validate_name("PROJECT", &project).map_err(Failure::input)?;
            crate::store::key::check("KEY", &key).map_err(Failure::input)?;
            match store
                .remove_cache(&project, &key)
                .await
                .map_err(Failure::remote)?
            {
                true => Ok(()),
                false => Err(Failure::input(format!(
                    "project {project:?} has no cache {key:?} in {} (runnel cache ls {project} lists them)",
                    store.name()
                ))),
            }
        }
    }
}

fn oci(root: &std::path::Path, op: OciOp) -> ExitCode {
    use crate::runtime::embedded;
    let result = match op {
        OciOp::Run { bundle, pid_file, id } => embedded::run(root, &bundle, &pid_file, &id),
        OciOp::Exec { process, id } => embedded::exec(root, &process, &id),
        OciOp::Kill { id, signal } => embedded::kill(root, &id, &signal).map(|_| 0),
        OciOp::Delete { force, id } => embedded::delete(root, &id, force).map(|_| 0),
        OciOp::State { id } => embedded::state(root, &id).map(|s| {
            println!("{s}");
            0
        }),
    };
    match result {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            // The agent puts this in a job's log or message: no NUL
            // (libcontainer's error texts may hold one).
            eprintln!("runnel oci: {}", e.to_string().replace('\0', ""));
            ExitCode::from(255)
        }
    }
}
