//! Prometheus metrics of a node.

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Label of the byte counters: which protocol carried the bytes.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProtocolLabel {
    pub protocol: &'static str,
}

impl Metrics {
    pub fn count_in(&self, protocol: &'static str, bytes: usize) {
        self.bytes_in.get_or_create(&ProtocolLabel { protocol }).inc_by(bytes as u64);
    }

    pub fn count_out(&self, protocol: &'static str, bytes: usize) {
        self.bytes_out.get_or_create(&ProtocolLabel { protocol }).inc_by(bytes as u64);
    }
}

/// Label of the request counters: what kind of request.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

impl Metrics {
    /// Requests of peers received, by kind (`digest`, or `all` for every kind).
    pub fn requests_received(&self, kind: &'static str) -> Counter {
        self.requests_in.get_or_create(&KindLabel { kind }).clone()
    }
}

/// The node's counters. Cheap to update from any task.
pub struct Metrics {
    registry: Registry,
    /// Ops created by this node and committed.
    pub ops_local: Counter,
    /// Ops of other origins applied here.
    pub ops_remote: Counter,
    /// Group commits made by the writer that changed something.
    pub commits: Counter,
    /// Register writes that lost to, or replaced, a concurrent write of another origin.
    pub conflicts: Counter,
    /// Lease state changes.
    pub lease_changes: Counter,
    /// Commit events a slow subscriber missed (it then relies on repair).
    pub events_lagged: Counter,
    /// Gossip messages rejected (malformed, forged, from a non-primary or another cluster).
    pub gossip_rejected: Counter,
    /// Replayed batches rejected (failed verification, wrong origin).
    pub replay_rejected: Counter,
    /// Batches dropped because the gap buffer was full (left to replay).
    pub gap_overflows: Counter,
    /// Gossip messages not sent because a peer's send queue was full (the peer pulls their ops).
    pub gossip_unsent: Counter,
    /// Ops received through replay pulls.
    pub ops_replayed: Counter,
    /// Discovery and digest rounds run by the event loop.
    pub sync_rounds: Counter,
    /// Times a peer held the same version vector with another state root.
    pub divergences: Counter,
    /// Snapshots pulled and installed.
    pub snapshots_installed: Counter,
    /// Snapshot chunks or manifests that failed verification.
    pub chunks_rejected: Counter,
    /// Bytes received, by protocol.
    pub bytes_in: Family<ProtocolLabel, Counter>,
    /// Bytes sent, by protocol.
    pub bytes_out: Family<ProtocolLabel, Counter>,
    /// Total ops applied (sum of the version vector).
    pub applied_total: Gauge,
    /// Peers connected now.
    pub connected_peers: Gauge,
    /// Digest requests this node sent.
    pub digests_sent: Counter,
    /// Requests of peers received, by kind.
    pub requests_in: Family<KindLabel, Counter>,
    /// Requests of peers answered `busy` because too many were in service.
    pub requests_shed: Counter,
    /// Gossip messages neither accepted nor rejected because the apply pipeline was full.
    pub gossip_ignored: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("peersync");
        let m = Metrics {
            ops_local: Counter::default(),
            ops_remote: Counter::default(),
            commits: Counter::default(),
            conflicts: Counter::default(),
            lease_changes: Counter::default(),
            events_lagged: Counter::default(),
            applied_total: Gauge::default(),
            gossip_rejected: Counter::default(),
            replay_rejected: Counter::default(),
            gap_overflows: Counter::default(),
            gossip_unsent: Counter::default(),
            ops_replayed: Counter::default(),
            sync_rounds: Counter::default(),
            divergences: Counter::default(),
            snapshots_installed: Counter::default(),
            chunks_rejected: Counter::default(),
            bytes_in: Family::default(),
            bytes_out: Family::default(),
            connected_peers: Gauge::default(),
            digests_sent: Counter::default(),
            requests_in: Family::default(),
            requests_shed: Counter::default(),
            gossip_ignored: Counter::default(),
            registry: Registry::default(),
        };
        registry.register("ops_local", "Ops created by this node and committed", m.ops_local.clone());
        registry.register("ops_remote", "Ops of other origins applied here", m.ops_remote.clone());
        registry.register("commits", "Group commits that changed the store", m.commits.clone());
        registry.register("conflicts", "Concurrent register writes where one overwrote the other", m.conflicts.clone());
        registry.register("lease_changes", "Lease state changes applied", m.lease_changes.clone());
        registry.register("events_lagged", "Commit events missed by a slow subscriber", m.events_lagged.clone());
        registry.register("applied_ops", "Ops applied in total (sum of the version vector)", m.applied_total.clone());
        registry.register("gossip_rejected", "Gossip messages rejected", m.gossip_rejected.clone());
        registry.register("replay_rejected", "Replayed batches rejected", m.replay_rejected.clone());
        registry.register("gap_overflows", "Batches dropped because the gap buffer was full", m.gap_overflows.clone());
        registry.register(
            "gossip_unsent",
            "Gossip messages not sent because a peer's send queue was full",
            m.gossip_unsent.clone(),
        );
        registry.register("ops_replayed", "Ops received through replay pulls", m.ops_replayed.clone());
        registry.register(
            "divergences",
            "Same version vector as a peer with another state root",
            m.divergences.clone(),
        );
        registry.register("snapshots_installed", "Snapshots pulled and installed", m.snapshots_installed.clone());
        registry.register(
            "chunks_rejected",
            "Snapshot chunks or manifests that failed verification",
            m.chunks_rejected.clone(),
        );
        registry.register("sync_rounds", "Discovery and digest rounds run", m.sync_rounds.clone());
        registry.register("bytes_received", "Bytes received, by protocol", m.bytes_in.clone());
        registry.register("connected_peers", "Peers connected now", m.connected_peers.clone());
        registry.register("digests_sent", "Digest requests sent to peers", m.digests_sent.clone());
        registry.register(
            "sync_requests_received",
            "Requests of peers received, by kind (digest, or all)",
            m.requests_in.clone(),
        );
        registry.register("sync_requests_shed", "Requests of peers answered busy", m.requests_shed.clone());
        registry.register(
            "gossip_ignored",
            "Gossip messages ignored because the apply pipeline was full",
            m.gossip_ignored.clone(),
        );
        registry.register("bytes_sent", "Bytes sent, by protocol", m.bytes_out.clone());
        Metrics { registry, ..m }
    }
}

impl Metrics {
    /// The OpenMetrics text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}
