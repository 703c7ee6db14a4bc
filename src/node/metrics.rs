//! Prometheus metrics of a node.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

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
    /// Total ops applied (sum of the version vector).
    pub applied_total: Gauge,
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
            registry: Registry::default(),
        };
        registry.register("ops_local", "Ops created by this node and committed", m.ops_local.clone());
        registry.register("ops_remote", "Ops of other origins applied here", m.ops_remote.clone());
        registry.register("commits", "Group commits that changed the store", m.commits.clone());
        registry.register("conflicts", "Concurrent register writes where one overwrote the other", m.conflicts.clone());
        registry.register("lease_changes", "Lease state changes applied", m.lease_changes.clone());
        registry.register("events_lagged", "Commit events missed by a slow subscriber", m.events_lagged.clone());
        registry.register("applied_ops", "Ops applied in total (sum of the version vector)", m.applied_total.clone());
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
