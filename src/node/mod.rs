//! A running node: opens the store, starts the writer, and hands out a [`NodeHandle`].
//!
//! This is the only module that joins the layers: store, sync and net meet here. Everything else
//! talks to the node through the cloneable handle.

mod applier;
mod config;
mod error;
mod event_loop;
mod events;
mod handle;
pub mod identity;
mod known_peers;
mod lease_log;
mod metrics;
mod revocations;
mod store_view;
pub(crate) mod validate;

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{broadcast, mpsc, watch};

use crate::op::Signer;
use crate::store::Store;

pub use crate::sync::engine::{PeerStatus, SnapshotStatus};
pub use config::{ConfigError, Limits, NodeConfig, Role};
pub use error::NodeError;
pub use event_loop::NetStatus;
pub use events::NodeEvent;
pub use handle::{LeaseInfo, NodeHandle, SnapshotSummary, Status, SyncState, WriteReceipt};
pub use known_peers::KNOWN_PEERS_FILE;
pub use metrics::Metrics;

/// File name of the database inside the data dir.
pub const DATABASE_FILE: &str = "state.redb";
/// File name of the lease service's Raft log inside the data dir.
pub const LEASE_LOG_FILE: &str = "leases.redb";

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Identity(#[from] identity::IdentityError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Net(#[from] crate::net::NetError),
}

/// A started node. Dropping it without [`Node::shutdown`] leaves the writer to stop once every
/// handle is gone.
pub struct Node {
    handle: NodeHandle,
    writer_thread: std::thread::JoinHandle<()>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Node {
    /// Opens the data dir, joins the network and starts the node. Must be called within a tokio
    /// runtime.
    pub async fn start(config: NodeConfig) -> Result<Node, StartError> {
        config.validate()?;
        let keypair = identity::load_or_create(&config.data_dir)?;
        if let Some(m) = &config.membership {
            let me = keypair.public().to_peer_id();
            m.cert.verify(&m.authority, &me, wall_ms()).map_err(|e| {
                ConfigError(format!(
                    "--cert does not admit this node ({me}) into the cluster of authority {}: {e}",
                    m.authority
                ))
            })?;
            if m.cert.role != config.net.role {
                return Err(ConfigError(format!(
                    "--role {} disagrees with the certificate, which makes this node a {}",
                    config.net.role, m.cert.role
                ))
                .into());
            }
        }
        let path = config.data_dir.join(DATABASE_FILE);
        let cache = config.cache_bytes;
        let store = tokio::task::spawn_blocking(move || Store::open_with_cache(&path, cache))
            .await
            .expect("store open task")?;
        store.set_disk_reserve(config.disk_reserve_bytes);
        let lease_path = config.data_dir.join(LEASE_LOG_FILE);
        let (lease_log, lease_boot) = tokio::task::spawn_blocking(move || {
            let log = crate::store::LeaseLog::open(&lease_path)?;
            let boot = log.load()?;
            Ok::<_, crate::store::StoreError>((log, boot))
        })
        .await
        .expect("lease log open task")?;
        crate::sync::leases::LeaseGroup::check_boot(&lease_boot).map_err(|e| ConfigError(e.to_string()))?;
        let signer = Signer::new(keypair.clone());
        let peer_id = signer.origin();
        let writer_signer = signer.clone();

        let mut swarm = crate::net::build_swarm(keypair, &config.net)?;
        crate::net::start(&mut swarm, &config.net)?;

        let (commit_tx, commit_rx) = broadcast::channel(1024);
        let publisher_rx = commit_tx.subscribe();
        let (writer, writer_thread) = store.spawn_writer(writer_signer, config.writer.clone(), commit_tx);
        let (events, _) = broadcast::channel(4096);
        let metrics = Arc::new(Metrics::default());
        metrics.applied_total.set(store.version_vector().total() as i64);

        let (net_tx, net_rx) = mpsc::channel(1024);
        // The engine keeps fewer apply tickets outstanding than this queue holds.
        let (apply_tx, apply_rx) = mpsc::channel(config.inbound_queue + 16);
        let applier = applier::Applier::new(store.clone(), writer.clone(), net_tx.clone());
        let engine_config = crate::sync::EngineConfig {
            role: config.net.role,
            cluster: config.net.cluster.clone(),
            bootstrap: crate::net::bootstrap_targets(&config.net, &peer_id),
            remembered: known_peers::load(&config.data_dir).into_iter().filter(|(_, p)| *p != peer_id).collect(),
            mdns: config.net.mdns,
            serve_alone: config.serve_alone,
            join_grace: config.join_grace,
            discovery: config.discovery_interval,
            digest_min: config.digest_interval_min,
            digest_max: config.digest_interval_max,
            request_timeout: config.net.request_timeout,
            chunks_per_source: config.snapshot_chunks_per_source,
            snapshot_min_saving: config.snapshot_min_saving_ops,
            gap: config.gap,
            max_gossip_bytes: config.net.max_gossip_bytes,
            target_peers: config.target_peers,
            max_peers: config.max_peers,
            max_serving: config.max_serving_requests,
            serve_bytes_per_sec: config.serve_bytes_per_sec,
            max_applying: config.inbound_queue,
            // New on every start: election timeouts, and the ids of lease proposals, must not
            // repeat those of an earlier life.
            seed: rand::random(),
            membership: config.membership.clone(),
            revocations: revocations::load(&config.data_dir),
            wall_ms_at_start: wall_ms(),
            lease_boot,
            lease_tick: config.lease_tick,
            lease_found_after: config.lease_found_after,
            attest_interval: config.attest_interval,
            tombstone_horizon: config.tombstone_horizon,
        };
        let engine = crate::sync::Engine::new(signer.clone(), engine_config, &store, Instant::now());
        let (phase_tx, phase) = watch::channel(engine.phase());
        let event_loop = event_loop::EventLoop::new(event_loop::Parts {
            swarm,
            engine,
            store: store.clone(),
            cluster: config.net.cluster.clone(),
            data_dir: config.data_dir.clone(),
            commands: net_rx,
            commands_tx: net_tx.clone(),
            commits: publisher_rx,
            apply: apply_tx,
            metrics: metrics.clone(),
            phase: phase_tx,
            writer: writer.clone(),
            lease_log: lease_log::LeaseLogWriter::spawn(lease_log, net_tx.clone()),
        });
        let tasks = vec![
            tokio::spawn(flush_peers_ops(writer.clone())),
            tokio::spawn(events::forward(commit_rx, events.clone(), metrics.clone())),
            tokio::spawn(applier.run(apply_rx)),
            tokio::spawn(event_loop.run()),
        ];

        tracing::info!(%peer_id, role = %config.net.role, cluster = %config.net.cluster, data_dir = %config.data_dir.display(), "node started");
        match &config.membership {
            Some(m) => tracing::info!(authority = %m.authority, role = %m.cert.role, serial = m.cert.serial,
                "membership enforced: only peers certified by the authority are exchanged with"),
            None => tracing::warn!(cluster = %config.net.cluster,
                "open mode: any peer that can reach this node and names its cluster may join as a primary and write; \
                 run it only on a network you trust, or give --authority and --cert"),
        }
        if config.api_token.is_none() {
            tracing::info!(api = %config.api_addr, "the HTTP API is open to whoever reaches it (no --api-token-file)");
        }
        let inner = handle::Inner {
            peer_id,
            origin: peer_id.to_string(),
            config,
            store,
            writer,
            events,
            metrics,
            net: net_tx,
            phase,
            signer,
        };
        let handle = NodeHandle { inner: Arc::new(inner) };
        let mut tasks = tasks;
        tasks.push(tokio::spawn(snapshot_maintenance(handle.clone())));
        Ok(Node { handle, writer_thread, tasks })
    }

    pub fn handle(&self) -> NodeHandle {
        self.handle.clone()
    }

    /// Leaves the network, commits every write already queued, and stops the writer and the node's
    /// tasks. The database file closes once the last [`NodeHandle`] is dropped too.
    pub async fn shutdown(self) {
        let _ = self.handle.inner.net.send(event_loop::Command::Stop).await;
        self.handle.inner.writer.stop().await;
        let join = self.writer_thread;
        let _ = tokio::task::spawn_blocking(move || join.join()).await;
        // Awaiting the aborted tasks makes sure their store handles are dropped before returning.
        for t in self.tasks {
            t.abort();
            let _ = t.await;
        }
        tracing::info!(peer_id = %self.handle.inner.peer_id, "node stopped");
    }
}

/// Makes a snapshot (and compacts the log) every `snapshot_interval` once `snapshot_min_ops` ops
/// were applied since the last one, so the log stays bounded and late joiners have something recent.
async fn snapshot_maintenance(handle: NodeHandle) {
    let every = handle.config().snapshot_interval;
    let min_ops = handle.config().snapshot_min_ops;
    let mut last = handle.store().latest_snapshot().ok().flatten().map_or(0, |s| s.manifest.version_vector.total());
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tick.tick().await;
        let applied = handle.store().version_vector().total();
        if applied.saturating_sub(last) < min_ops {
            continue;
        }
        match handle.create_snapshot().await {
            Ok(_) => last = applied,
            Err(NodeError::ShuttingDown) => return,
            Err(e) => tracing::warn!(error = %e, "periodic snapshot failed; will try again"),
        }
    }
}

/// Makes the writer's non-durable commits of peers' ops durable every `REMOTE_FLUSH_INTERVAL`.
async fn flush_peers_ops(writer: crate::store::WriteHandle) {
    let mut tick = tokio::time::interval(crate::store::REMOTE_FLUSH_INTERVAL);
    loop {
        tick.tick().await;
        writer.flush().await;
    }
}

/// A version vector as JSON shows it: origin peer id -> seq.
pub(crate) fn vv_json(vv: &crate::store::VersionVector) -> std::collections::BTreeMap<String, u64> {
    vv.0.iter().map(|(o, s)| (o.to_string(), s.0)).collect()
}

/// Milliseconds since the Unix epoch, by the wall clock.
pub(crate) fn wall_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}
