//! The `peersync` binary: parses flags, sets up logging, and calls the library.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, CommandFactory, Parser, Subcommand};
use peersync::api::client::{segment, Client, ClientError};
use peersync::store::Store;
use reqwest::Method;

mod cluster;
mod config_file;
mod live;
mod memory;
mod node_command;
mod progress;
mod watch;

#[derive(Parser)]
#[command(name = "peersync", version, about = "Peer-to-peer sync node: replicated registers, counters and leases")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node.
    Node(Box<node_command::NodeArgs>),
    /// Configuration files of `peersync node --config FILE`.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Print the node's PeerId, creating its identity if missing.
    Id {
        #[arg(long, default_value = "./peersync-data")]
        data_dir: PathBuf,
    },
    /// Shrink the database files of a stopped node to what they hold (space freed by log
    /// compaction and pruned snapshots is otherwise kept for reuse, not given back).
    Compact {
        #[arg(long, default_value = "./peersync-data")]
        data_dir: PathBuf,
    },
    /// Write a register value.
    Put {
        register: String,
        key: String,
        value: String,
        #[command(flatten)]
        api: ApiArg,
    },
    /// Read a register value (printed raw).
    Get {
        register: String,
        key: String,
        /// Wait until these writes (ORIGIN:SEQ, comma-separated) are applied on the node.
        #[arg(long)]
        after: Option<String>,
        /// Answer even while the node is still syncing.
        #[arg(long)]
        stale: bool,
        #[command(flatten)]
        api: ApiArg,
    },
    /// Delete a register key.
    Del {
        register: String,
        key: String,
        #[command(flatten)]
        api: ApiArg,
    },
    /// Add to a counter (default +1) and print its value.
    Incr {
        counter: String,
        key: String,
        #[arg(allow_hyphen_values = true)]
        delta: Option<i64>,
        #[command(flatten)]
        api: ApiArg,
    },
    /// Acquire, renew or release a lease.
    Lease {
        #[arg(value_parser = ["acquire", "renew", "release"])]
        verb: String,
        lease: String,
        key: String,
        #[arg(long)]
        holder: String,
        #[arg(long)]
        ttl_ms: Option<u64>,
        #[command(flatten)]
        api: ApiArg,
    },
    /// Make a snapshot now, or list the snapshots the node holds.
    Snapshot {
        #[arg(value_parser = ["create", "list"])]
        action: String,
        #[command(flatten)]
        api: ApiArg,
    },
    /// Follow what the node applies: print a JSON line each time an origin's applied seq advances
    /// there (`GET /v1/progress`), until interrupted, or with --until until that seq is applied.
    Progress {
        /// Follow this origin (a peer id) only.
        #[arg(long)]
        origin: Option<String>,
        /// Exit once the followed origin's applied seq reaches this one.
        #[arg(long, requires = "origin", value_parser = clap::value_parser!(u64).range(1..))]
        until: Option<u64>,
        #[command(flatten)]
        api: ApiArg,
    },
    /// The cluster authority: make its key, admit members.
    #[command(subcommand)]
    Cluster(cluster::ClusterCommand),
    /// Print the node's status as JSON, or watch it live.
    Status {
        /// Show a live view, redrawn in place: phase, snapshot and replay progress with rate and
        /// ETA, traffic, leases and peers (with --json: print the JSON again at every interval).
        #[arg(long)]
        watch: bool,
        /// With --watch: pretty JSON at every interval instead of the view.
        #[arg(long)]
        json: bool,
        /// With --watch: time between polls.
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(100..))]
        interval_ms: u64,
        #[command(flatten)]
        api: ApiArg,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Print a commented configuration file with every key and its default.
    Example,
}

#[derive(Args)]
struct ApiArg {
    /// The node's HTTP API.
    #[arg(long, default_value = "http://127.0.0.1:7700", env = "PEERSYNC_API")]
    api: String,
    /// Bearer token for a node run with --api-token-file.
    #[arg(long, env = "PEERSYNC_API_TOKEN", hide_env_values = true)]
    api_token: Option<String>,
}

impl ApiArg {
    fn client(&self) -> Result<Client, ClientError> {
        Ok(Client::new(&self.api)?.with_token(self.api_token.clone()))
    }
}

fn main() -> ExitCode {
    memory::disable_transparent_huge_pages();
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let cli = match config_file::expand(&Cli::command(), argv.clone()) {
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
        Ok(expanded) if expanded == argv => Cli::parse_from(argv),
        Ok(expanded) => match Cli::try_parse_from(&expanded) {
            Ok(cli) => cli,
            // The command line alone is fine: the file's flags are at fault.
            Err(e) if Cli::try_parse_from(&argv).is_ok() => {
                eprintln!("error: in the --config file: {e}");
                return ExitCode::from(2);
            }
            Err(e) => e.exit(),
        },
    };
    let workers = match &cli.command {
        Command::Node(args) => args.worker_threads.map(usize::from),
        _ => None,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers.unwrap_or_else(default_worker_threads))
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// One fewer worker than the cores, at least 1. The writer thread commits every op outside the
/// runtime and is the busiest thread under load. On a 2-core machine a second worker measured no
/// faster and often worse: in six alternating W3 rounds of `scripts/bench.sh` a worse p99 every
/// time and 2-10 % more CPU per op; in W1 the same wall time at 4 % more CPU.
fn default_worker_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().saturating_sub(1).max(1))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Node(args) => node_command::run(*args).await,
        Command::Config(ConfigCommand::Example) => {
            print!("{}", config_file::example(&Cli::command()));
            Ok(())
        }
        Command::Cluster(command) => cluster::run(command).await,
        Command::Id { data_dir } => {
            let key = peersync::node::identity::load_or_create(&data_dir)?;
            println!("{}", key.public().to_peer_id());
            Ok(())
        }
        Command::Compact { data_dir } => {
            let path = data_dir.join(peersync::node::DATABASE_FILE);
            if !path.exists() {
                anyhow::bail!("no database at {}", path.display());
            }
            let report = tokio::task::spawn_blocking(move || Store::compact_files(&path)).await??;
            for (file, before, after) in report {
                println!("{}: {before} -> {after} bytes", file.display());
            }
            Ok(())
        }
        Command::Put { register, key, value, api } => {
            let path = format!("/v1/registers/{}/{}", segment(&register), segment(&key));
            print_json(api.client()?.call(Method::PUT, &path, Some(value.into_bytes())).await?)
        }
        Command::Get { register, key, after, stale, api } => {
            let mut path = format!("/v1/registers/{}/{}?stale={stale}", segment(&register), segment(&key));
            if let Some(after) = after {
                path.push_str(&format!("&after={}", segment(&after)));
            }
            let value = api.client()?.call(Method::GET, &path, None).await?;
            let mut out = std::io::stdout().lock();
            out.write_all(&value)?;
            out.write_all(b"\n")?;
            Ok(())
        }
        Command::Progress { origin, until, api } => {
            progress::run(&api.client()?, &api.api, origin.as_deref(), until).await
        }
        Command::Del { register, key, api } => {
            let path = format!("/v1/registers/{}/{}", segment(&register), segment(&key));
            print_json(api.client()?.call(Method::DELETE, &path, None).await?)
        }
        Command::Incr { counter, key, delta, api } => {
            let path = format!("/v1/counters/{}/{}", segment(&counter), segment(&key));
            let body = serde_json::json!({ "delta": delta.unwrap_or(1) }).to_string().into_bytes();
            print_json(api.client()?.call(Method::POST, &path, Some(body)).await?)
        }
        Command::Lease { verb, lease, key, holder, ttl_ms, api } => {
            let path = format!("/v1/leases/{}/{}/{verb}", segment(&lease), segment(&key));
            let body = serde_json::json!({ "holder": holder, "ttl_ms": ttl_ms }).to_string().into_bytes();
            print_json(api.client()?.call(Method::POST, &path, Some(body)).await?)
        }
        Command::Snapshot { action, api } => {
            let method = if action == "create" { Method::POST } else { Method::GET };
            print_json(api.client()?.call(method, "/v1/snapshots", None).await?)
        }
        Command::Status { watch, json, interval_ms, api } => {
            let client = api.client()?;
            let interval = Duration::from_millis(interval_ms);
            if watch && !json {
                return live::run(&client, &api.api, interval).await;
            }
            loop {
                print_json(client.call(Method::GET, "/v1/status", None).await?)?;
                if !watch {
                    return Ok(());
                }
                tokio::select! {
                    _ = tokio::time::sleep(interval) => {}
                    _ = tokio::signal::ctrl_c() => return Ok(()),
                }
            }
        }
    }
}

fn print_json(body: Vec<u8>) -> anyhow::Result<()> {
    let value: serde_json::Value = serde_json::from_slice(&body).map_err(|_| ClientError::Api {
        status: reqwest::StatusCode::OK,
        code: "bad_response".into(),
        message: String::from_utf8_lossy(&body).into_owned(),
    })?;
    println!("{}", serde_json::to_string_pretty(&value)?);
    Ok(())
}

/// Completes on Ctrl-C or SIGTERM.
pub(crate) async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
