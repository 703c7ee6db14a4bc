//! [`NodeHandle`]: the cloneable library API of a running node.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use super::config::{NodeConfig, Role};
use super::event_loop::{Command, NetStatus};
use super::events::NodeEvent;
use super::metrics::Metrics;
use super::vv_json;
use super::{validate, NodeError};
use crate::crdt::LeaseRequest;
use crate::ids::{Origin, Token};
use crate::op::Signer;
use crate::store::{AppliedOp, Effect, ListPage, LocalIntent, Store, WriteHandle};
use crate::sync::engine::PeerStatus;
use crate::sync::Phase;

/// Names a committed write: where it came from, its position, its content address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WriteReceipt {
    pub origin: String,
    pub seq: u64,
    pub cid: String,
    /// `ORIGIN:SEQ`, to pass as `after` to a read on any node.
    pub token: String,
}

impl WriteReceipt {
    /// `origin` is this node's peer id as text, computed once: formatting a peer id costs about
    /// as much as the rest of the receipt.
    fn new(origin: &str, a: &AppliedOp) -> Self {
        let token = format!("{origin}:{}", a.token.seq);
        WriteReceipt { origin: origin.to_owned(), seq: a.token.seq.0, cid: a.cid.to_string(), token }
    }
}

/// A snapshot this node made or holds.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotSummary {
    /// CID of the signed manifest: the snapshot's name.
    pub cid: String,
    pub version_vector: BTreeMap<String, u64>,
    pub state_root: String,
    pub entries: u64,
    pub chunks: usize,
    pub raw_bytes: u64,
    /// Compressed bytes of all chunks.
    pub bytes: u64,
    /// Log entries compacted after making it (0 in listings).
    pub ops_compacted: u64,
}

/// A granted lease request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LeaseInfo {
    /// `None` after a release.
    pub holder: Option<String>,
    /// Fencing token: consumers reject requests carrying a lower one.
    pub token: u64,
    pub expires_at_ms: u64,
    /// The write that recorded the grant.
    pub write: WriteReceipt,
}

/// Whether the node may be trusted to be current.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncState {
    Syncing,
    Active,
}

/// A snapshot of the node's state for `GET /v1/status`.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub peer_id: String,
    pub role: Role,
    pub state: SyncState,
    pub cluster: String,
    pub listen_addrs: Vec<String>,
    pub version_vector: BTreeMap<String, u64>,
    pub state_root: String,
    pub log_ops: u64,
    /// Register tombstones held (deletes not yet collected).
    pub tombstones: u64,
    pub peers: Vec<PeerStatus>,
    pub sync: serde_json::Value,
}

pub(crate) struct Inner {
    pub peer_id: Origin,
    /// `peer_id` as text, for receipts.
    pub origin: String,
    pub config: NodeConfig,
    pub store: Store,
    pub writer: WriteHandle,
    pub events: broadcast::Sender<NodeEvent>,
    pub metrics: Arc<Metrics>,
    /// Commands to the event loop that owns the swarm.
    pub net: mpsc::Sender<Command>,
    /// The sync phase, published by the event loop.
    pub phase: watch::Receiver<Phase>,
    /// Signs the snapshots this node makes.
    pub signer: Signer,
}

/// The library API of a running node. Cloneable; every clone talks to the same node.
#[derive(Clone)]
pub struct NodeHandle {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for NodeHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeHandle").field("peer_id", &self.inner.peer_id).finish_non_exhaustive()
    }
}

impl NodeHandle {
    pub fn peer_id(&self) -> Origin {
        self.inner.peer_id
    }

    pub fn config(&self) -> &NodeConfig {
        &self.inner.config
    }

    /// Direct read access to the store (for tools and tests; writes go through the handle).
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// Node events from now on. A subscriber that falls far behind misses events (bounded buffer).
    pub fn events(&self) -> broadcast::Receiver<NodeEvent> {
        self.inner.events.subscribe()
    }

    /// Writes `value` under `key` in `register`.
    pub async fn put(
        &self,
        register: &str,
        key: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
    ) -> Result<WriteReceipt, NodeError> {
        self.put_batch(register, vec![(key.into(), value.into())]).await
    }

    /// Writes every entry atomically (all or none, one transaction) and returns the last write's receipt.
    pub async fn put_batch(&self, register: &str, entries: Vec<(Vec<u8>, Vec<u8>)>) -> Result<WriteReceipt, NodeError> {
        self.write_batch(register, entries.into_iter().map(|(k, v)| (k, Some(v))).collect()).await
    }

    /// Puts (`Some(value)`) and deletes (`None`) in one transaction, all or none, in order; returns
    /// the last write's receipt.
    pub async fn write_batch(
        &self,
        register: &str,
        entries: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    ) -> Result<WriteReceipt, NodeError> {
        let l = &self.inner.config.limits;
        validate::name("register", register)?;
        if entries.is_empty() || entries.len() > l.max_batch_entries {
            return Err(NodeError::InvalidInput(format!("a batch holds 1 to {} entries", l.max_batch_entries)));
        }
        for (k, v) in &entries {
            validate::key(k, l.max_key_bytes)?;
            if let Some(v) = v {
                validate::value(v, l.max_value_bytes)?;
            }
        }
        let register = register.to_owned();
        let intents = entries
            .into_iter()
            .map(|(key, value)| match value {
                Some(value) => LocalIntent::Put { register: register.clone(), key, value },
                None => LocalIntent::Delete { register: register.clone(), key },
            })
            .collect();
        let applied = self.write(intents).await?;
        Ok(WriteReceipt::new(&self.inner.origin, applied.last().expect("one op per entry")))
    }

    /// Deletes `key` (writes a tombstone).
    pub async fn delete(&self, register: &str, key: impl Into<Vec<u8>>) -> Result<WriteReceipt, NodeError> {
        let key = key.into();
        validate::name("register", register)?;
        validate::key(&key, self.inner.config.limits.max_key_bytes)?;
        let applied = self.write(vec![LocalIntent::Delete { register: register.to_owned(), key }]).await?;
        Ok(WriteReceipt::new(&self.inner.origin, &applied[0]))
    }

    /// The value of `key`, `None` when absent or deleted.
    pub async fn get(&self, register: &str, key: &[u8]) -> Result<Option<Vec<u8>>, NodeError> {
        validate::name("register", register)?;
        validate::key(key, self.inner.config.limits.max_key_bytes)?;
        Ok(self.inner.store.register(register, key)?.and_then(|v| v.value))
    }

    /// A page of live entries whose key starts with `prefix`, after `after`.
    pub async fn list(
        &self,
        register: &str,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<ListPage, NodeError> {
        validate::name("register", register)?;
        let max = self.inner.config.limits.max_list_limit;
        if limit == 0 || limit > max {
            return Err(NodeError::InvalidInput(format!("limit must be between 1 and {max}")));
        }
        Ok(self.inner.store.list_register(register, prefix, after, limit)?)
    }

    /// Adds `delta` to a counter and returns its value after the add, with the write's receipt.
    pub async fn counter_add(
        &self,
        counter: &str,
        key: impl Into<Vec<u8>>,
        delta: i64,
    ) -> Result<(i64, WriteReceipt), NodeError> {
        let key = key.into();
        validate::name("counter", counter)?;
        validate::key(&key, self.inner.config.limits.max_key_bytes)?;
        let applied = self.write(vec![LocalIntent::CounterAdd { counter: counter.to_owned(), key, delta }]).await?;
        let value = match applied[0].effect {
            Effect::Counter { value } => value,
            ref other => unreachable!("a counter op had effect {other:?}"),
        };
        Ok((value, WriteReceipt::new(&self.inner.origin, &applied[0])))
    }

    pub async fn counter_get(&self, counter: &str, key: &[u8]) -> Result<i64, NodeError> {
        validate::name("counter", counter)?;
        validate::key(key, self.inner.config.limits.max_key_bytes)?;
        Ok(self.inner.store.counter(counter, key)?)
    }

    /// Acquires, renews or releases a lease. The primaries' lease group decides (see
    /// [`crate::sync::leases`]): the answer comes once a quorum of them committed it, and the grant
    /// is then written as the lease's replicated state. A lease held by another holder answers
    /// [`NodeError::LeaseHeld`] naming the holder and the expiry; a group without a reachable
    /// quorum answers [`NodeError::NoQuorum`].
    pub async fn lease(
        &self,
        lease: &str,
        key: impl Into<Vec<u8>>,
        request: LeaseRequest,
    ) -> Result<LeaseInfo, NodeError> {
        let key = key.into();
        let l = &self.inner.config.limits;
        validate::name("lease", lease)?;
        validate::key(&key, l.max_key_bytes)?;
        match &request {
            LeaseRequest::Acquire { holder, ttl_ms } | LeaseRequest::Renew { holder, ttl_ms } => {
                validate::holder(holder)?;
                validate::ttl(*ttl_ms, l.max_lease_ttl_ms)?;
            }
            LeaseRequest::Release { holder } => validate::holder(holder)?,
        }
        self.refuse_on_replica().await?;
        let (reply, rx) = oneshot::channel();
        let timeout = self.inner.config.lease_timeout;
        let command = Command::Lease { lease: lease.to_owned(), key: key.clone(), request, timeout, reply };
        self.inner.net.send(command).await.map_err(|_| NodeError::ShuttingDown)?;
        let grant = rx.await.map_err(|_| NodeError::ShuttingDown)??;
        let applied =
            self.write(vec![LocalIntent::Lease { lease: lease.to_owned(), key, grant: grant.clone() }]).await?;
        let write = WriteReceipt::new(&self.inner.origin, &applied[0]);
        match &applied[0].effect {
            // The grant is the group's answer, whatever a concurrent op did to the replicated view.
            Effect::Lease { .. } => {
                Ok(LeaseInfo { holder: grant.holder, token: grant.token, expires_at_ms: grant.expires_at_ms, write })
            }
            other => unreachable!("a lease op had effect {other:?}"),
        }
    }

    /// The current state of a lease, if it was ever written.
    pub async fn lease_state(&self, lease: &str, key: &[u8]) -> Result<Option<crate::crdt::LeaseState>, NodeError> {
        validate::name("lease", lease)?;
        Ok(self.inner.store.lease(lease, key)?)
    }

    /// Waits until every write named by `tokens` is applied here, or `timeout` passes.
    pub async fn wait_applied(&self, tokens: &[Token], timeout: Duration) -> Result<(), NodeError> {
        let store = &self.inner.store;
        // Each wait is woken only by the commit that applies its op, not by every commit.
        let all = async {
            for token in tokens {
                if store.applied(token).await.is_err() {
                    // More waiters than the store keeps: follow the version vector instead.
                    let mut rx = store.watch_version_vector();
                    rx.wait_for(|vv| vv.covers(token)).await.map_err(|_| NodeError::ShuttingDown)?;
                }
            }
            Ok(())
        };
        match tokio::time::timeout(timeout, all).await {
            Ok(result) => result,
            Err(_) => {
                let vv = self.inner.store.version_vector();
                let missing = tokens.iter().filter(|t| !vv.covers(t)).map(|t| t.to_string()).collect();
                Err(NodeError::Timeout { waited_ms: timeout.as_millis() as u64, missing })
            }
        }
    }

    /// Whether reads may be served as current.
    pub fn sync_state(&self) -> SyncState {
        if *self.inner.phase.borrow() == Phase::Active {
            SyncState::Active
        } else {
            SyncState::Syncing
        }
    }

    /// The detailed sync phase.
    pub fn phase(&self) -> Phase {
        *self.inner.phase.borrow()
    }

    /// Waits until the node is active, or `timeout` passes.
    pub async fn wait_active(&self, timeout: Duration) -> Result<(), NodeError> {
        let mut rx = self.inner.phase.clone();
        let waited = tokio::time::timeout(timeout, rx.wait_for(|p| *p == Phase::Active)).await.map(|r| r.is_ok());
        match waited {
            Ok(true) => Ok(()),
            Ok(false) => Err(NodeError::ShuttingDown),
            Err(_) => Err(NodeError::Syncing),
        }
    }

    /// Makes a snapshot now at a consistent version vector, keeps the newest two, compacts the op
    /// log down to the configured retention, and announces the snapshot to the network.
    pub async fn create_snapshot(&self) -> Result<SnapshotSummary, NodeError> {
        let c = &self.inner.config;
        // Peers' ops applied in the memtable go to disk first, so the snapshot covers them.
        self.inner.writer.persist().await?;
        let (store, signer, cluster, chunk) =
            (self.inner.store.clone(), self.inner.signer.clone(), c.net.cluster.clone(), c.snapshot_chunk_bytes);
        let info = tokio::task::spawn_blocking(move || {
            let info = store.create_snapshot(&signer, &cluster, chunk)?;
            store.prune_snapshots(crate::snapshot::DEFAULT_KEEP_SNAPSHOTS)?;
            Ok::<_, crate::store::StoreError>(info)
        })
        .await
        .map_err(|_| NodeError::ShuttingDown)??;
        let compacted = self.inner.writer.compact(c.log_retention_ops, c.log_retention_bytes).await?;
        let _ = self.inner.net.send(Command::SnapshotCreated { cid: info.cid }).await;
        tracing::info!(cid = %info.cid, ops = info.version_vector.total(), chunks = info.chunks,
            bytes = info.compressed_bytes, compacted = compacted.ops_deleted, "snapshot made");
        Ok(SnapshotSummary {
            cid: info.cid.to_string(),
            version_vector: vv_json(&info.version_vector),
            state_root: info.state_root.to_string(),
            entries: info.entries,
            chunks: info.chunks,
            raw_bytes: info.raw_bytes,
            bytes: info.compressed_bytes,
            ops_compacted: compacted.ops_deleted,
        })
    }

    /// The snapshots this node holds and serves, oldest first.
    pub async fn list_snapshots(&self) -> Result<Vec<SnapshotSummary>, NodeError> {
        let store = self.inner.store.clone();
        let list = tokio::task::spawn_blocking(move || store.list_snapshots())
            .await
            .map_err(|_| NodeError::ShuttingDown)??;
        Ok(list
            .into_iter()
            .map(|s| SnapshotSummary {
                cid: s.cid.to_string(),
                version_vector: vv_json(&s.manifest.version_vector),
                state_root: s.manifest.state_root.to_string(),
                entries: s.manifest.collections.iter().map(|c| c.entries).sum(),
                chunks: s.manifest.chunks.len(),
                raw_bytes: s.manifest.chunks.iter().map(|c| c.raw_size).sum(),
                bytes: s.manifest.chunks.iter().map(|c| c.size).sum(),
                ops_compacted: 0,
            })
            .collect())
    }

    /// Merges state entries into this node's state with the CRDT joins, without creating ops. This
    /// is what divergence repair does with a peer's entries; it is exposed for repair tools and
    /// tests. Entries that lose their merge change nothing.
    pub async fn merge_entries(&self, entries: Vec<crate::snapshot::StateEntry>) -> Result<u64, NodeError> {
        Ok(self.inner.writer.merge_entries(entries).await?.changed as u64)
    }

    /// Waits until `ack` other nodes have durably applied this node's writes up to `seq` (a
    /// receipt's `seq`), as Redis `WAIT` does: `Ok(n)` with how many did. At `timeout` it is
    /// [`NodeError::AckTimeout`] with how many did by then; the write stays durable here either
    /// way. The nodes counted are the other certified members in membership mode, the connected
    /// peers of the cluster in open mode.
    pub async fn wait_for_acks(
        &self,
        seq: u64,
        ack: crate::sync::AckWanted,
        timeout: Duration,
    ) -> Result<usize, NodeError> {
        let (reply, rx) = oneshot::channel();
        let command = Command::AwaitAcks { seq: crate::ids::Seq(seq), ack, timeout, reply };
        self.inner.net.send(command).await.map_err(|_| NodeError::ShuttingDown)?;
        match rx.await.map_err(|_| NodeError::ShuttingDown)? {
            (acked, true) => Ok(acked),
            (acked, false) => Err(NodeError::AckTimeout { acked, wanted: ack.to_string() }),
        }
    }

    /// The operator's word that this node may serve alone: it becomes active now, without a peer
    /// vouching for its state (for a node whose peers are gone for good).
    pub async fn serve_alone(&self) -> Result<(), NodeError> {
        self.inner.net.send(Command::ServeAlone).await.map_err(|_| NodeError::ShuttingDown)
    }

    /// Revokes a member with a revocation signed by the cluster's authority: it is checked, kept,
    /// passed on to every node, and the member's later ops are refused.
    pub async fn revoke(&self, revocation: crate::cert::Revocation) -> Result<(), NodeError> {
        let Some(m) = &self.inner.config.membership else {
            return Err(NodeError::InvalidInput(
                "this node runs in open mode: there is no membership to revoke".into(),
            ));
        };
        revocation.verify(&m.authority).map_err(|e| NodeError::InvalidInput(format!("revocation refused: {e}")))?;
        self.inner.net.send(Command::Revoke { revocation }).await.map_err(|_| NodeError::ShuttingDown)
    }

    /// The network's view: listen addresses, peers, pulls in flight.
    pub async fn net_status(&self) -> Result<NetStatus, NodeError> {
        let (reply, rx) = oneshot::channel();
        self.inner.net.send(Command::Status { reply }).await.map_err(|_| NodeError::ShuttingDown)?;
        rx.await.map_err(|_| NodeError::ShuttingDown)
    }

    pub async fn status(&self) -> Result<Status, NodeError> {
        let net = self.net_status().await?;
        let (root, vv) = self.inner.store.state_root();
        let busy = !(net.pulls.is_empty() && net.gaps.is_empty() && net.lag_ops.values().all(|l| *l == 0));
        let m = &self.inner.metrics;
        let rejected = m.gossip_rejected.get() + m.replay_rejected.get();
        Ok(Status {
            peer_id: self.inner.peer_id.to_string(),
            role: self.inner.config.net.role,
            state: self.sync_state(),
            cluster: self.inner.config.net.cluster.clone(),
            listen_addrs: net.listen_addrs,
            version_vector: vv.0.iter().map(|(o, s)| (o.to_string(), s.0)).collect(),
            state_root: root.to_string(),
            log_ops: self.inner.store.log_len()?,
            tombstones: self.inner.store.tombstones()?,
            peers: net.peers,
            sync: serde_json::json!({
                "phase": self.phase(),
                "busy": busy,
                "lag_ops": net.lag_ops,
                "pulls": net.pulls,
                "gaps": net.gaps,
                "buffered_ops": net.buffered_ops,
                "rejected_messages": rejected,
                "snapshot": net.snapshot,
                "leases": net.leases,
                "tombstones_collected_through": self.inner.store.tombstones_collected().to_string(),
                "tombstone_holdback": net.tombstone_holdback,
                "bytes_in": m.bytes_in_total(),
                "bytes_out": m.bytes_out_total(),
                "gossip_unsent": m.gossip_unsent.get(),
                "gossip_ignored": m.gossip_ignored.get(),
                "gap_overflows": m.gap_overflows.get(),
            }),
        })
    }

    async fn write(&self, intents: Vec<LocalIntent>) -> Result<Vec<AppliedOp>, NodeError> {
        self.refuse_on_replica().await?;
        Ok(self.inner.writer.local(intents).await?)
    }

    /// Replicas take no writes: the error names the primaries this node knows.
    async fn refuse_on_replica(&self) -> Result<(), NodeError> {
        if self.inner.config.net.role == Role::Replica {
            let peers = self.net_status().await.map(|n| n.peers).unwrap_or_default();
            let primaries = peers
                .into_iter()
                .filter(|p| p.role == Some(Role::Primary))
                .map(|p| match p.addrs.first() {
                    Some(addr) => format!("{addr}/p2p/{}", p.peer_id),
                    None => p.peer_id,
                })
                .collect();
            return Err(NodeError::ReadOnlyReplica { primaries });
        }
        Ok(())
    }
}
