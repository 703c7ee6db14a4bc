//! What the event loop reports for `GET /v1/status`: its listen addresses, and the engine's view of
//! peers, pulls, lag, gaps and the snapshot being pulled.

use std::collections::BTreeMap;
use std::time::Instant;

use serde::Serialize;

use super::EventLoop;
use crate::sync::engine::{PeerStatus, SnapshotStatus};
use crate::sync::Gap;

/// The network part of the node's status.
#[derive(Debug, Clone, Default, Serialize)]
pub struct NetStatus {
    pub listen_addrs: Vec<String>,
    pub peers: Vec<PeerStatus>,
    /// Pulls in flight: origin -> (peer, cursor).
    pub pulls: BTreeMap<String, (String, u64)>,
    /// Per origin, how many ops the best peer has beyond this node.
    pub lag_ops: BTreeMap<String, u64>,
    /// The snapshot being pulled, if any.
    pub snapshot: Option<SnapshotStatus>,
    /// Holes in origins' logs behind buffered batches.
    pub gaps: Vec<Gap>,
    pub buffered_ops: usize,
    /// The member registry; `None` in open mode.
    pub members: Option<crate::sync::engine::MembersStatus>,
    /// The lease group as this primary sees it; `None` on replicas.
    pub leases: Option<crate::sync::leases::LeaseGroupStatus>,
    /// Why tombstone collection is held back, when it is.
    pub tombstone_holdback: Option<String>,
}

impl EventLoop {
    pub(super) fn status(&self) -> NetStatus {
        let s = self.engine.status(Instant::now(), &self.store);
        NetStatus {
            listen_addrs: self.listen_addrs.iter().map(|a| a.to_string()).collect(),
            peers: s.peers,
            pulls: s.pulls,
            lag_ops: s.lag_ops,
            snapshot: s.snapshot,
            gaps: s.gaps,
            buffered_ops: s.buffered_ops,
            members: self.engine.members_status(&self.store),
            leases: self.engine.lease_status(),
            tombstone_holdback: self.engine.tombstone_holdback(),
        }
    }

    /// Sets the gauges of `/metrics` from the engine's view (at every tick).
    pub(super) fn update_gauges(&self) {
        use crate::node::metrics::{OriginLabel, PeerLabel};
        let s = self.engine.status(Instant::now(), &self.store);
        let m = &self.metrics;
        m.lag_ops.clear();
        // Every origin this node holds ops of, 0 when no peer is ahead, and those only peers hold.
        let held = crate::sync::StoreView::version_vector(&self.store);
        m.applied_total.set(held.total() as i64);
        for origin in held.0.keys().map(|o| o.to_string()).chain(s.lag_ops.keys().cloned()) {
            let lag = s.lag_ops.get(&origin).copied().unwrap_or(0);
            m.lag_ops.get_or_create(&OriginLabel { origin }).set(lag as i64);
        }
        m.peers.clear();
        for p in &s.peers {
            let role = match p.role {
                Some(crate::ids::Role::Primary) => "primary",
                Some(crate::ids::Role::Replica) => "replica",
                None => "unknown",
            };
            let state = if p.connected { "connected" } else { "known" };
            m.peers.get_or_create(&PeerLabel { role, state }).inc();
        }
        let (requests, serving, applies) = self.engine.queue_sizes();
        m.requests_in_flight.set(requests as i64);
        m.requests_serving.set(serving as i64);
        m.applies_in_flight.set(applies as i64);
        m.gap_buffer_ops.set(s.buffered_ops as i64);
        m.replay_pulls.set(s.pulls.len() as i64);
        let (have, total) = s.snapshot.as_ref().map_or((0, 0), |p| (p.progress.bytes_have, p.progress.bytes_total));
        m.snapshot_pull_bytes_have.set(have as i64);
        m.snapshot_pull_bytes_wanted.set(total as i64);
        if let Ok(n) = self.store.tombstones() {
            m.tombstones.set(n as i64);
        }
    }
}
