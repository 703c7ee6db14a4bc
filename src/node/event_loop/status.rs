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
        }
    }
}
