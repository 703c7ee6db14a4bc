//! `peersync node`: its flags, its logging, and running a node with its HTTP API until a signal.

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use peersync::node::{Node, NodeConfig, Role};

/// Log filter when `RUST_LOG` is unset. gossipsub warns once per message it could not queue for a
/// slow peer (thousands a second under load); the node logs one line per slow peer and heartbeat
/// instead and counts them in `peersync_gossip_unsent_total`.
const DEFAULT_LOG: &str = "info,libp2p_gossipsub::behaviour=error";

/// How the node writes its log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Args)]
pub(crate) struct NodeArgs {
    /// A TOML file of these flags, keys named as the flags without their -- (`peersync config
    /// example` prints one); a flag given on the command line overrides the file.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Where the node keeps its identity key and database.
    #[arg(long, default_value = "./peersync-data")]
    data_dir: PathBuf,
    /// Multiaddr to listen on (repeatable).
    #[arg(long, value_name = "MULTIADDR", default_value = "/ip4/0.0.0.0/tcp/4001")]
    listen: Vec<libp2p::Multiaddr>,
    /// Multiaddr of a peer to join through (repeatable).
    #[arg(long, value_name = "MULTIADDR")]
    bootstrap: Vec<libp2p::Multiaddr>,
    /// Address of the HTTP API (port 0 picks a free port).
    #[arg(long, value_name = "HOST:PORT", default_value = "127.0.0.1:7700")]
    api: SocketAddr,
    /// Log lines as text, or as one JSON object per line (timestamp, level, target, message and
    /// the event's fields: peer, reason...). `RUST_LOG` filters either.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// primary or replica [default: primary, or the certificate's role with --cert].
    #[arg(long)]
    role: Option<Role>,
    /// Enforce membership: the cluster authority's id (printed by `peersync cluster init`).
    #[arg(long, value_name = "ID", requires = "cert")]
    authority: Option<libp2p::PeerId>,
    /// This node's membership certificate (from `peersync cluster admit`).
    #[arg(long, value_name = "FILE", requires = "authority")]
    cert: Option<PathBuf>,
    /// The cluster to join: nodes sync only with nodes of the same cluster.
    #[arg(long, default_value = "default")]
    cluster: String,
    /// Turn off mDNS discovery on the LAN.
    #[arg(long)]
    no_mdns: bool,
    /// Become active without a peer vouching for this node's state, even though its data shows it
    /// was part of a cluster (for a node whose peers are gone for good). Without it such a node
    /// answers reads with 503 until it has caught up with a peer; `POST /v1/sync/serve-alone`
    /// says the same at run time.
    #[arg(long)]
    serve_alone: bool,
    /// File holding the API's bearer token: every endpoint then requires
    /// `Authorization: Bearer TOKEN` and answers 401 without it.
    #[arg(long, value_name = "FILE")]
    api_token_file: Option<PathBuf>,
    /// A private network's pre-shared key (`peersync cluster swarm-key`): nodes without it cannot
    /// connect. TCP only.
    #[arg(long, value_name = "FILE")]
    swarm_key: Option<PathBuf>,
    /// Leave /metrics open when --api-token-file is given.
    #[arg(long)]
    metrics_public: bool,
    /// Largest register value in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    max_value_bytes: usize,
    /// Largest HTTP request body in bytes.
    #[arg(long, default_value_t = 16 << 20)]
    max_body_bytes: usize,
    /// Free space to keep on the data dir's filesystem, in MiB: writes that would leave less are
    /// refused (HTTP 507) until space is freed. 0 turns the check off.
    #[arg(long, default_value_t = 64)]
    disk_reserve_mb: u64,
    /// Gossipsub heartbeat in ms (lower in tests and local clusters for faster mesh forming).
    #[arg(long, default_value_t = 1000, hide = true)]
    gossip_heartbeat_ms: u64,
    /// How often to look for peers and exchange digests, in ms.
    #[arg(long, default_value_t = 30_000, hide = true)]
    discovery_interval_ms: u64,
    /// Shortest and longest period between digest exchanges, in ms.
    #[arg(long, default_value_t = 250, hide = true)]
    digest_min_ms: u64,
    #[arg(long, default_value_t = 10_000, hide = true)]
    digest_max_ms: u64,
    /// How often an active node repeats its signed attestation (vector, state root, clock), in ms.
    #[arg(long, default_value_t = 10_000, hide = true)]
    attest_interval_ms: u64,
    /// A member not heard from for this long, in ms, no longer holds back the collection of
    /// tombstones (deletes every member has seen); if it returns, its stale copies of collected
    /// deletes are discarded.
    #[arg(long, default_value_t = 3_600_000)]
    tombstone_horizon_ms: u64,
    /// How often to consider a periodic snapshot, in ms, and how many new ops make one.
    #[arg(long, default_value_t = 60_000, hide = true)]
    snapshot_interval_ms: u64,
    #[arg(long, default_value_t = 100_000, hide = true)]
    snapshot_min_ops: u64,
    /// Raw bytes per snapshot chunk.
    #[arg(long, default_value_t = 4 << 20, hide = true)]
    snapshot_chunk_bytes: u64,
    /// Chunk requests in flight per source while pulling a snapshot.
    #[arg(long, default_value_t = 4, hide = true)]
    snapshot_chunks_per_source: usize,
    /// Ops of replay a snapshot must spare to be pulled when replay could do.
    #[arg(long, default_value_t = 100_000, hide = true)]
    snapshot_min_saving_ops: u64,
    /// Bound of the database page cache, in bytes.
    #[arg(long, default_value_t = peersync::store::DEFAULT_CACHE_BYTES, hide = true)]
    cache_bytes: usize,
    /// Bytes of peers' ops held in memory, in front of the database, before they are written to it
    /// ahead of the 100 ms durability tick.
    #[arg(long, default_value_t = peersync::store::DEFAULT_MEMTABLE_BYTES as u64,
        value_parser = clap::value_parser!(u64).range(1..=(1 << 40)))]
    memtable_bytes: u64,
    /// Threads that run the node's network, sync and HTTP tasks. Default: one fewer than the
    /// cores, at least 1, which leaves a core to the thread that commits to the database.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub worker_threads: Option<u16>,
    /// Op log kept beyond the latest snapshot, in ops and bytes.
    #[arg(long, default_value_t = 1_000_000, hide = true)]
    log_retention_ops: u64,
    #[arg(long, default_value_t = 256 << 20, hide = true)]
    log_retention_bytes: u64,
}

/// `peersync node`: starts the node and its API, and stops both on Ctrl-C or SIGTERM.
pub(crate) async fn run(args: NodeArgs) -> anyhow::Result<()> {
    let logs = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| DEFAULT_LOG.into()))
        .with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => logs.json().flatten_event(true).with_current_span(false).init(),
    }
    let mut config = NodeConfig { data_dir: args.data_dir, api_addr: args.api, ..Default::default() };
    config.net.listen = args.listen;
    config.net.bootstrap = args.bootstrap;
    config.net.mdns = !args.no_mdns;
    config.serve_alone = args.serve_alone;
    if let Some(file) = &args.api_token_file {
        let token = std::fs::read_to_string(file)
            .map_err(|e| anyhow::anyhow!("cannot read --api-token-file {}: {e}", file.display()))?;
        let token = token.trim().to_owned();
        if token.is_empty() {
            anyhow::bail!("--api-token-file {} is empty: put the token on its first line", file.display());
        }
        config.api_token = Some(token);
    }
    config.metrics_public = args.metrics_public;
    if let Some(file) = &args.swarm_key {
        config.net.swarm_key =
            Some(peersync::net::read_swarm_key(file).map_err(|e| anyhow::anyhow!("--swarm-key {e}"))?);
    }
    config.net.cluster = args.cluster;
    if let (Some(authority), Some(file)) = (args.authority, &args.cert) {
        let text =
            std::fs::read_to_string(file).map_err(|e| anyhow::anyhow!("cannot read --cert {}: {e}", file.display()))?;
        let cert = peersync::cert::Certificate::from_text(&text)
            .map_err(|e| anyhow::anyhow!("--cert {} is not a membership certificate: {e}", file.display()))?;
        if let Some(role) = args.role.filter(|r| *r != cert.role) {
            anyhow::bail!(
                "--role {role} disagrees with --cert {}, which makes this node a {}",
                file.display(),
                cert.role
            );
        }
        config.net.role = cert.role;
        config.membership = Some(peersync::sync::Membership { authority, cert });
    } else {
        config.net.role = args.role.unwrap_or(Role::Primary);
    }
    config.net.gossip_heartbeat = Duration::from_millis(args.gossip_heartbeat_ms);
    config.discovery_interval = Duration::from_millis(args.discovery_interval_ms);
    config.digest_interval_min = Duration::from_millis(args.digest_min_ms);
    config.digest_interval_max = Duration::from_millis(args.digest_max_ms);
    config.attest_interval = Duration::from_millis(args.attest_interval_ms);
    config.tombstone_horizon = Duration::from_millis(args.tombstone_horizon_ms);
    config.snapshot_interval = Duration::from_millis(args.snapshot_interval_ms);
    config.snapshot_min_ops = args.snapshot_min_ops;
    config.snapshot_chunk_bytes = args.snapshot_chunk_bytes;
    config.snapshot_chunks_per_source = args.snapshot_chunks_per_source;
    config.snapshot_min_saving_ops = args.snapshot_min_saving_ops;
    config.log_retention_ops = args.log_retention_ops;
    config.cache_bytes = args.cache_bytes;
    config.writer.memtable_bytes = usize::try_from(args.memtable_bytes).unwrap_or(usize::MAX);
    config.log_retention_bytes = args.log_retention_bytes;
    config.limits.max_value_bytes = args.max_value_bytes;
    config.limits.max_body_bytes = args.max_body_bytes;
    config.disk_reserve_bytes = args.disk_reserve_mb.saturating_mul(1 << 20);
    config.validate()?;
    let listener = tokio::net::TcpListener::bind(config.api_addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on --api {}: {e}", config.api_addr))?;
    let node = Node::start(config).await?;
    let handle = node.handle();
    let api_addr = listener.local_addr()?;
    // Scripts and tests read these two lines to find the node.
    println!("peer_id: {}", handle.peer_id());
    println!("api: http://{api_addr}");
    std::io::stdout().flush()?;

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(peersync::api::serve(listener, handle, async {
        let _ = stop_rx.await;
    }));
    crate::shutdown_signal().await;
    tracing::info!("shutting down");
    let _ = stop_tx.send(());
    match tokio::time::timeout(std::time::Duration::from_secs(10), server).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "http server stopped with an error"),
        Ok(Err(e)) => tracing::warn!(error = %e, "http server task failed"),
        Err(_) => tracing::warn!("http server did not stop within 10 s"),
    }
    node.shutdown().await;
    Ok(())
}
