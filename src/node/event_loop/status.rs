//! What the event loop reports for `GET /v1/status`: listen addresses, peers, pulls in flight, lag
//! behind the best peer per origin, and the snapshot being pulled.

use std::collections::BTreeMap;

use serde::Serialize;

use super::{EventLoop, SnapshotStatus};
use crate::ids::Role;
use crate::node::vv_json;

/// One known peer, as shown in status.
#[derive(Debug, Clone, Serialize)]
pub struct PeerStatus {
    pub peer_id: String,
    pub addrs: Vec<String>,
    pub connected: bool,
    /// From the peer's identify agent version, once identified.
    pub role: Option<Role>,
    pub cluster: Option<String>,
    /// Round-trip time measured by ping.
    pub rtt_ms: Option<f64>,
    /// The version vector of the peer's last digest.
    pub version_vector: Option<BTreeMap<String, u64>>,
}

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
}

impl EventLoop {
    pub(super) fn status(&self) -> NetStatus {
        let have = self.store.version_vector();
        let mut lag: BTreeMap<String, u64> = BTreeMap::new();
        let peers = self
            .peers
            .iter()
            .map(|(id, p)| {
                if let Some(d) = &p.digest {
                    for (origin, seq) in &d.version_vector.0 {
                        let behind = seq.0.saturating_sub(have.get(origin).0);
                        let e = lag.entry(origin.to_string()).or_default();
                        *e = (*e).max(behind);
                    }
                }
                PeerStatus {
                    peer_id: id.to_string(),
                    addrs: p.addrs.iter().map(|a| a.to_string()).collect(),
                    connected: p.connections > 0,
                    role: p.role(),
                    cluster: p.meta.as_ref().map(|(_, c)| c.clone()).or(p.digest.as_ref().map(|d| d.cluster.clone())),
                    rtt_ms: p.rtt.map(|r| r.as_secs_f64() * 1000.0),
                    version_vector: p.digest.as_ref().map(|d| vv_json(&d.version_vector)),
                }
            })
            .collect();
        let pulls = self
            .pulls
            .values()
            .filter_map(|(_, origin)| {
                self.planner.in_flight(origin).map(|(peer, after)| (origin.to_string(), (peer.to_string(), after.0)))
            })
            .collect();
        NetStatus {
            listen_addrs: self.listen_addrs.iter().map(|a| a.to_string()).collect(),
            peers,
            pulls,
            lag_ops: lag,
            snapshot: self.snapshot_status(),
        }
    }
}
