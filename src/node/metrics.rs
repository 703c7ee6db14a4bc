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

/// Every protocol the byte counters are labelled with; the totals in status sum these.
pub const PROTOCOLS: [&str; 3] = ["gossip", "replay", "snapshot"];

impl Metrics {
    pub fn count_in(&self, protocol: &'static str, bytes: usize) {
        debug_assert!(PROTOCOLS.contains(&protocol), "unlisted protocol {protocol}");
        self.bytes_in.get_or_create(&ProtocolLabel { protocol }).inc_by(bytes as u64);
    }

    pub fn count_out(&self, protocol: &'static str, bytes: usize) {
        debug_assert!(PROTOCOLS.contains(&protocol), "unlisted protocol {protocol}");
        self.bytes_out.get_or_create(&ProtocolLabel { protocol }).inc_by(bytes as u64);
    }

    /// Bytes received over all protocols.
    pub fn bytes_in_total(&self) -> u64 {
        PROTOCOLS.iter().filter_map(|&protocol| self.bytes_in.get(&ProtocolLabel { protocol }).map(|c| c.get())).sum()
    }

    /// Bytes sent over all protocols.
    pub fn bytes_out_total(&self) -> u64 {
        PROTOCOLS.iter().filter_map(|&protocol| self.bytes_out.get(&ProtocolLabel { protocol }).map(|c| c.get())).sum()
    }
}

/// Label of the per-origin gauges.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OriginLabel {
    pub origin: String,
}

/// Label of the peer gauge: role (or `unknown` before identify) and state.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabel {
    pub role: &'static str,
    pub state: &'static str,
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
    /// Per origin, how many ops the most advanced peer holds beyond this node.
    pub lag_ops: Family<OriginLabel, Gauge>,
    /// Known peers by role and state (`connected` or `known`).
    pub peers: Family<PeerLabel, Gauge>,
    /// Ops buffered behind gaps in origins' logs.
    pub gap_buffer_ops: Gauge,
    /// This node's requests to peers awaiting an answer.
    pub requests_in_flight: Gauge,
    /// Peers' requests being served from the store.
    pub requests_serving: Gauge,
    /// Batches handed to the applier and not yet settled.
    pub applies_in_flight: Gauge,
    /// Replay pulls in flight.
    pub replay_pulls: Gauge,
    /// The snapshot being pulled: bytes held and bytes in all (0 when none).
    pub snapshot_pull_bytes_have: Gauge,
    pub snapshot_pull_bytes_wanted: Gauge,
    /// Register tombstones held (deletes not yet collected).
    pub tombstones: Gauge,
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
            lag_ops: Family::default(),
            peers: Family::default(),
            gap_buffer_ops: Gauge::default(),
            requests_in_flight: Gauge::default(),
            requests_serving: Gauge::default(),
            applies_in_flight: Gauge::default(),
            replay_pulls: Gauge::default(),
            snapshot_pull_bytes_have: Gauge::default(),
            snapshot_pull_bytes_wanted: Gauge::default(),
            tombstones: Gauge::default(),
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
        registry.register(
            "lag_ops",
            "Per origin, ops the most advanced peer holds beyond this node",
            m.lag_ops.clone(),
        );
        registry.register("peers", "Known peers by role and state", m.peers.clone());
        registry.register("gap_buffer_ops", "Ops buffered behind gaps in origins' logs", m.gap_buffer_ops.clone());
        registry.register("requests_in_flight", "Requests to peers awaiting an answer", m.requests_in_flight.clone());
        registry.register("requests_serving", "Peers' requests being served now", m.requests_serving.clone());
        registry.register(
            "applies_in_flight",
            "Batches handed to the applier, not yet settled",
            m.applies_in_flight.clone(),
        );
        registry.register("replay_pulls", "Replay pulls in flight", m.replay_pulls.clone());
        registry.register(
            "snapshot_pull_bytes_have",
            "Bytes held of the snapshot being pulled (0 when none)",
            m.snapshot_pull_bytes_have.clone(),
        );
        registry.register(
            "snapshot_pull_bytes_wanted",
            "Bytes in all of the snapshot being pulled (0 when none)",
            m.snapshot_pull_bytes_wanted.clone(),
        );
        registry.register("tombstones", "Register tombstones held (deletes not yet collected)", m.tombstones.clone());
        Metrics { registry, ..m }
    }
}

impl Metrics {
    /// The OpenMetrics text exposition.
    /// The metrics in Prometheus's text format (0.0.4), which every scraper and `promtool check
    /// metrics` read. The encoder writes OpenMetrics, where a counter's HELP and TYPE name the
    /// family (`x`) and its sample is `x_total`; the text format wants them to name the sample.
    pub fn render(&self) -> String {
        let mut open = String::new();
        encode(&mut open, &self.registry).expect("writing to a String cannot fail");
        to_text_format(&open)
    }
}

/// OpenMetrics text to Prometheus's text format: counters' HELP and TYPE renamed to their
/// `_total` samples, and no `# EOF`.
fn to_text_format(open: &str) -> String {
    let counters: std::collections::HashSet<&str> = open
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .filter(|name| !name.ends_with("_total"))
        .collect();
    let mut out = String::with_capacity(open.len() + 8 * counters.len());
    for line in open.lines().filter(|l| *l != "# EOF") {
        let meta = ["# HELP ", "# TYPE "].iter().find_map(|kind| Some((*kind, line.strip_prefix(kind)?)));
        match meta {
            Some((kind, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                let suffix = if counters.contains(name) { "_total" } else { "" };
                out.push_str(&format!("{kind}{name}{suffix} {tail}"));
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_text_format_counters_named_by_their_samples() {
        let m = Metrics::default();
        m.ops_local.inc();
        m.count_in("gossip", 10);
        let text = m.render();
        assert!(text.contains("# HELP peersync_ops_local_total Ops created"), "{text}");
        assert!(text.contains("# TYPE peersync_ops_local_total counter\npeersync_ops_local_total 1\n"), "{text}");
        assert!(text.contains("# TYPE peersync_bytes_received_total counter"), "{text}");
        assert!(text.contains("peersync_bytes_received_total{protocol=\"gossip\"} 10"), "{text}");
        assert!(text.contains("# TYPE peersync_connected_peers gauge"), "{text}");
        assert!(!text.contains("# EOF"));
    }
}
