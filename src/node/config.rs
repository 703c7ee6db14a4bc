//! Node configuration: every knob with its default and a `validate()`. The CLI maps onto it one to one.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use crate::ids::Role;
use crate::net::NetConfig;
use crate::store::WriterConfig;
use crate::sync::GapLimits;

/// Sizes of what clients may send. Bigger input is refused with a clear error, never truncated.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest register value in bytes. Default 1 MiB.
    pub max_value_bytes: usize,
    /// Largest key in bytes. Default 1 KiB.
    pub max_key_bytes: usize,
    /// Largest HTTP request body (a batch write) in bytes. Default 16 MiB.
    pub max_body_bytes: usize,
    /// Most entries in one batch write. Default 10 000.
    pub max_batch_entries: usize,
    /// Most entries in one listing page. Default 1 000.
    pub max_list_limit: usize,
    /// Longest a read may wait for `after` tokens, in ms. Default 60 000.
    pub max_wait_ms: u64,
    /// Longest lease TTL in ms. Default one day.
    pub max_lease_ttl_ms: u64,
    /// `GET /v1/progress` streams open at once. Default 256.
    pub max_progress_streams: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_value_bytes: 1 << 20,
            max_key_bytes: 1024,
            max_body_bytes: 16 << 20,
            max_batch_entries: 10_000,
            max_list_limit: 1_000,
            max_wait_ms: 60_000,
            max_lease_ttl_ms: 24 * 3600 * 1000,
            max_progress_streams: 256,
        }
    }
}

/// Everything a node needs to start.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Holds the identity key (`identity.key`) and the database (`state.redb`). Default `./peersync-data`.
    pub data_dir: PathBuf,
    /// Address of the HTTP API. Default `127.0.0.1:7700`; port 0 picks a free port.
    pub api_addr: SocketAddr,
    /// The network side: listen and bootstrap addresses, mDNS, cluster, role, protocol timings.
    pub net: NetConfig,
    /// How often to look up the cluster's other nodes in Kademlia and refresh this node's provider
    /// record. Default 30 s; tests use much less.
    pub discovery_interval: Duration,
    /// Shortest period between digest exchanges: used while syncing, behind, or after changes.
    /// Default 250 ms.
    pub digest_interval_min: Duration,
    /// Longest period between digest exchanges, reached by doubling while idle. Default 10 s.
    pub digest_interval_max: Duration,
    /// A node that discovers peers by mDNS only (no bootstrap address) and hears from none within
    /// this time after start calls itself active on its own (it may be the first node of its
    /// cluster). A node with bootstrap addresses waits for its peers. Default 5 s.
    pub join_grace: Duration,
    /// The lease service's Raft tick: heartbeats every 2 ticks, elections after 10 to 20 ticks
    /// without a leader. Default 100 ms.
    pub lease_tick: Duration,
    /// A primary that finds no lease group among its peers waits this long after start before it
    /// may found one (the lowest-id primary of those connected does). Default 3 s.
    pub lease_found_after: Duration,
    /// How often an active node repeats its attestation (vector, state root, clock), from which
    /// every node learns how far the others have come. Default 10 s.
    pub attest_interval: Duration,
    /// A member not heard from for this long no longer holds tombstone collection back; if it
    /// returns, its stale copies of collected deletes are discarded. Default 1 hour.
    pub tombstone_horizon: Duration,
    /// How long a lease request waits for the lease group's quorum before it is answered
    /// `no_quorum`. Default 5 s.
    pub lease_timeout: Duration,
    /// How often to consider making a snapshot. Default 60 s.
    pub snapshot_interval: Duration,
    /// Ops applied since the last snapshot before a periodic one is made. Default 100 000.
    pub snapshot_min_ops: u64,
    /// Raw bytes per snapshot chunk (before zstd). Default 4 MiB.
    pub snapshot_chunk_bytes: u64,
    /// Chunk requests in flight per source while pulling a snapshot. Default 4.
    pub snapshot_chunks_per_source: usize,
    /// A node that could catch up by replay still pulls a snapshot when that spares at least this
    /// many ops of replay and installing its entries costs less than replaying them (a log of many
    /// overwrites, a new node joining a long history). Default 100 000.
    pub snapshot_min_saving_ops: u64,
    /// Op log kept per origin beyond the latest snapshot, in ops and in bytes (whichever keeps more).
    /// Older ops are compacted once a snapshot covers them; a peer that needs them takes a snapshot.
    /// Defaults 1 000 000 ops and 256 MiB.
    pub log_retention_ops: u64,
    pub log_retention_bytes: u64,
    /// Bound of the database page cache in bytes. Default [`crate::store::DEFAULT_CACHE_BYTES`] (64 MiB).
    pub cache_bytes: usize,
    /// Free bytes kept on the data dir's filesystem: writes that would leave less are refused
    /// (HTTP 507 `disk_full`) and go through again once space is freed. 0 turns the check off.
    /// Default 64 MiB.
    pub disk_reserve_bytes: u64,
    pub limits: Limits,
    pub writer: WriterConfig,
    /// Bounds of the buffer of ops that arrived ahead of a gap.
    pub gap: GapLimits,
    /// Gossip messages waiting for validation at most; beyond it they are ignored (and repaired
    /// later). Default 1024.
    pub inbound_queue: usize,
    /// Cluster peers a node keeps connections to when it can choose: below it, it looks for more
    /// through Kademlia; gossipsub's mesh and the digest fanout need no more. Default 8.
    pub target_peers: usize,
    /// Connections kept at most: beyond it the extra ones are closed at the next digest round
    /// (bootstrap peers and peers in the middle of a request excepted), and beyond twice as many a
    /// new one is closed at once. Default 24.
    pub max_peers: usize,
    /// Requests of peers served from the store at once; more are answered `busy`. Default 64.
    pub max_serving_requests: usize,
    /// Payload bytes (ops, chunks, entries) served to one peer per second on average, with a burst
    /// of four seconds' worth; past it the peer's requests are answered `rate_limited`. Default
    /// 256 MiB/s, above what one node serves: a share, not a throttle.
    pub serve_bytes_per_sec: u64,
    /// The cluster's authority and this node's membership certificate (`--authority ID --cert FILE`):
    /// only certified members exchange anything. Default none: open mode.
    pub membership: Option<crate::sync::Membership>,
    /// With a token, every HTTP endpoint requires `Authorization: Bearer TOKEN` and answers 401
    /// without it (`--api-token-file`). Default none: the API is open to whoever reaches it.
    pub api_token: Option<String>,
    /// Leave `/metrics` open when an API token is set (`--metrics-public`), for a scraper without
    /// the token. Default off.
    pub metrics_public: bool,
    /// Become active without a peer vouching for this node's state, even when its store shows it
    /// was part of a cluster (`--serve-alone`): for a node whose peers are gone for good. Default
    /// off: such a node stays syncing until it has caught up with a peer.
    pub serve_alone: bool,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            data_dir: PathBuf::from("./peersync-data"),
            api_addr: SocketAddr::from(([127, 0, 0, 1], 7700)),
            net: NetConfig::default(),
            discovery_interval: Duration::from_secs(30),
            digest_interval_min: Duration::from_millis(250),
            digest_interval_max: Duration::from_secs(10),
            join_grace: Duration::from_secs(5),
            lease_tick: Duration::from_millis(100),
            lease_found_after: Duration::from_secs(3),
            attest_interval: crate::sync::engine::DEFAULT_ATTEST_INTERVAL,
            tombstone_horizon: crate::sync::engine::DEFAULT_TOMBSTONE_HORIZON,
            lease_timeout: Duration::from_secs(5),
            snapshot_interval: Duration::from_secs(60),
            snapshot_min_ops: 100_000,
            snapshot_chunk_bytes: 4 << 20,
            snapshot_chunks_per_source: 4,
            snapshot_min_saving_ops: 100_000,
            log_retention_ops: 1_000_000,
            log_retention_bytes: 256 << 20,
            cache_bytes: crate::store::DEFAULT_CACHE_BYTES,
            disk_reserve_bytes: crate::store::DEFAULT_DISK_RESERVE,
            limits: Limits::default(),
            writer: WriterConfig::default(),
            gap: GapLimits::default(),
            inbound_queue: 1024,
            target_peers: 8,
            max_peers: 24,
            max_serving_requests: 64,
            serve_bytes_per_sec: 256 << 20,
            serve_alone: false,
            membership: None,
            api_token: None,
            metrics_public: false,
        }
    }
}

/// A configuration value that cannot work.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub String);

impl NodeConfig {
    /// A configuration for tests and embedding: loopback only, ephemeral ports, no mDNS, and short
    /// protocol intervals so that a few nodes in one process find each other in milliseconds.
    pub fn local(data_dir: impl Into<PathBuf>) -> NodeConfig {
        let mut c = NodeConfig { data_dir: data_dir.into(), ..Default::default() };
        c.api_addr = SocketAddr::from(([127, 0, 0, 1], 0));
        c.net.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().expect("valid multiaddr")];
        c.net.mdns = false;
        c.net.gossip_heartbeat = Duration::from_millis(100);
        c.discovery_interval = Duration::from_millis(500);
        c.digest_interval_min = Duration::from_millis(100);
        c.digest_interval_max = Duration::from_millis(500);
        c.join_grace = Duration::from_secs(2);
        c.lease_tick = Duration::from_millis(50);
        c.lease_found_after = Duration::from_millis(500);
        c.attest_interval = Duration::from_millis(500);
        c
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        crate::node::validate::name("cluster", &self.net.cluster).map_err(|e| ConfigError(e.to_string()))?;
        self.net.validate().map_err(|e| ConfigError(e.to_string()))?;
        let l = &self.limits;
        if l.max_value_bytes == 0 || l.max_key_bytes == 0 || l.max_batch_entries == 0 || l.max_list_limit == 0 {
            return Err(ConfigError("limits must be greater than zero".into()));
        }
        if l.max_body_bytes < l.max_value_bytes {
            return Err(ConfigError(format!(
                "max_body_bytes ({}) must be at least max_value_bytes ({})",
                l.max_body_bytes, l.max_value_bytes
            )));
        }
        if self.attest_interval.is_zero() {
            return Err(ConfigError("attest_interval must be greater than zero".into()));
        }
        if self.tombstone_horizon < self.attest_interval * 3 {
            return Err(ConfigError(format!(
                "tombstone_horizon ({:?}) must be at least 3 attest intervals ({:?}): members would count as away \
                 between their attestations",
                self.tombstone_horizon,
                self.attest_interval * 3
            )));
        }
        if self.lease_tick.is_zero() || self.lease_timeout.is_zero() {
            return Err(ConfigError("lease_tick and lease_timeout must be greater than zero".into()));
        }
        let w = &self.writer;
        if w.queue == 0 || w.max_group_ops == 0 || w.batch_max_ops == 0 || w.batch_max_bytes == 0 {
            return Err(ConfigError("writer limits must be greater than zero".into()));
        }
        if w.batch_max_bytes + 4096 > self.net.max_gossip_bytes {
            return Err(ConfigError(format!(
                "writer batch_max_bytes ({}) must leave 4 KiB of room under the gossip limit ({})",
                w.batch_max_bytes, self.net.max_gossip_bytes
            )));
        }
        if self.snapshot_interval.is_zero() || self.snapshot_chunk_bytes < 4096 || self.snapshot_chunks_per_source == 0
        {
            return Err(ConfigError(
                "snapshot_interval must be positive and snapshot_chunk_bytes at least 4096".into(),
            ));
        }
        if self.digest_interval_min.is_zero() || self.digest_interval_max < self.digest_interval_min {
            return Err(ConfigError("digest intervals must be positive with min <= max".into()));
        }
        if self
            .api_token
            .as_ref()
            .is_some_and(|t| t.is_empty() || t.chars().any(|c| c.is_whitespace() || c.is_control()))
        {
            return Err(ConfigError("the API token must be non-empty, without spaces or control characters".into()));
        }
        if self.serve_bytes_per_sec == 0 {
            return Err(ConfigError("serve_bytes_per_sec must be greater than zero".into()));
        }
        if self.target_peers == 0 || self.max_peers < self.target_peers || self.max_serving_requests == 0 {
            return Err(ConfigError(
                "target_peers and max_serving_requests must be greater than zero, and max_peers at least target_peers"
                    .into(),
            ));
        }
        if self.discovery_interval.is_zero() || self.inbound_queue == 0 {
            return Err(ConfigError("discovery_interval and inbound_queue must be greater than zero".into()));
        }
        Ok(())
    }
}
