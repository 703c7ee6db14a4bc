//! What the engine reports for `GET /v1/status`: peers, pulls in flight, lag behind the best peer
//! per origin, the snapshot being pulled, gaps; and for `GET /v1/cluster/members`, the member registry.

use std::collections::BTreeMap;
use std::time::Instant;

use serde::Serialize;

use super::{Engine, StoreView};
use crate::ids::Role;
use crate::sync::{Gap, PullProgress};

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
    /// How long ago that digest came, in ms: a peer whose digests stop is not telling this node
    /// what it misses.
    pub digest_age_ms: Option<u64>,
}

/// Snapshot progress for status: the snapshot's CID and how far its pull has come.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotStatus {
    pub cid: String,
    #[serde(flatten)]
    pub progress: PullProgress,
}

/// The sync part of the node's status.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SyncStatus {
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
}

fn vv_json(vv: &crate::store::VersionVector) -> BTreeMap<String, u64> {
    vv.0.iter().map(|(o, s)| (o.to_string(), s.0)).collect()
}

pub(super) fn status(engine: &Engine, now: Instant, store: &dyn StoreView) -> SyncStatus {
    let have = store.version_vector();
    let mut lag: BTreeMap<String, u64> = BTreeMap::new();
    let peers = engine
        .peers
        .map
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
                connected: p.connected(),
                role: p.role(),
                cluster: p.meta.as_ref().map(|(_, c)| c.clone()).or(p.digest.as_ref().map(|d| d.cluster.clone())),
                rtt_ms: p.rtt.map(|r| r.as_secs_f64() * 1000.0),
                version_vector: p.digest.as_ref().map(|d| vv_json(&d.version_vector)),
                digest_age_ms: p.digest_at.map(|at| now.saturating_duration_since(at).as_millis() as u64),
            }
        })
        .collect();
    let pulls =
        engine.planner.pulls().map(|(origin, peer, after)| (origin.to_string(), (peer.to_string(), after.0))).collect();
    let snapshot = engine.snapshot.active.as_ref().map(|a| SnapshotStatus {
        cid: a.cid.to_string(),
        progress: a.pull.as_ref().map(|p| p.progress(now)).unwrap_or_default(),
    });
    SyncStatus {
        peers,
        pulls,
        lag_ops: lag,
        snapshot,
        gaps: engine.apply.gaps(store),
        buffered_ops: engine.apply.buffered_ops(),
    }
}

/// One member as `GET /v1/cluster/members` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MemberStatus {
    pub peer_id: String,
    pub role: Role,
    pub serial: u64,
    pub not_after_ms: u64,
    pub revoked: bool,
    pub connected: bool,
    /// `active` once it announced an attestation, `unknown` before.
    pub state: &'static str,
    pub attestation: Option<AttestationStatus>,
}

/// A member's latest attestation, and whether it agrees with this node's state at that vector.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AttestationStatus {
    pub version_vector: std::collections::BTreeMap<String, u64>,
    pub state_root: String,
    pub at_ms: u64,
    /// `Some(true)` when this node is at the same vector with the same root, `Some(false)` at the
    /// same vector with another root, `None` when the vectors differ (nothing to compare).
    pub agrees: Option<bool>,
}

/// The member registry.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MembersStatus {
    pub authority: String,
    pub members: Vec<MemberStatus>,
}

impl Engine {
    /// The member registry (membership mode), `None` in open mode.
    pub fn members_status(&self, store: &dyn StoreView) -> Option<MembersStatus> {
        let m = self.cfg.membership.as_ref()?;
        let (root, vv) = store.state_root();
        let revoked = self.revoked.values().map(|r| MemberStatus {
            peer_id: r.peer.to_string(),
            role: Role::Replica,
            serial: 0,
            not_after_ms: r.at_ms,
            revoked: true,
            connected: self.peers.is_connected(&r.peer),
            state: "revoked",
            attestation: None,
        });
        let members = self
            .members
            .values()
            .map(|c| {
                let attestation = self.attestations.get(&c.peer).map(|h| AttestationStatus {
                    version_vector: h.vv.0.iter().map(|(o, s)| (o.to_string(), s.0)).collect(),
                    state_root: h.root.to_string(),
                    at_ms: h.at_ms,
                    agrees: (h.vv == vv).then_some(h.root == root),
                });
                MemberStatus {
                    peer_id: c.peer.to_string(),
                    role: c.role,
                    serial: c.serial,
                    not_after_ms: c.not_after_ms,
                    revoked: false,
                    connected: c.peer == self.me || self.peers.is_connected(&c.peer),
                    state: if c.peer == self.me {
                        if self.readiness.is_active() {
                            "active"
                        } else {
                            "syncing"
                        }
                    } else if attestation.is_some() {
                        "active"
                    } else {
                        "unknown"
                    },
                    attestation,
                }
            })
            .chain(revoked)
            .collect();
        Some(MembersStatus { authority: m.authority.to_string(), members })
    }
}
