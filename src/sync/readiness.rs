//! When a node may call itself active.
//!
//! A node starts *syncing*. It becomes *active* once (1) it has caught up with the version vectors
//! its peers advertised when it joined, and (2) its state root is proven: a peer advertised the same
//! version vector with the same root (a root signed by that peer, over an authenticated channel or in
//! a signed attestation), or the node holds strictly more than every peer it knows, so no peer can
//! vouch for its exact state and there is nothing left to fetch. The same vector with a different
//! root is a divergence: the node stays syncing until it is repaired.
//!
//! A node with no way to find peers (no bootstrap address, no mDNS) is active at once; one that can
//! find peers but hears from none within the grace period is active by itself too.
//! No I/O: the caller reports digests and its own state and reads the phase.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use libp2p::PeerId;

use crate::ids::StateRoot;
use crate::store::VersionVector;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// No peer heard from yet.
    Joining,
    /// Behind what peers advertised: pulling ops or a snapshot.
    CatchingUp,
    /// Caught up; waiting for a peer to vouch for the state root.
    Verifying,
    /// Same vector as a peer but another root: repairing the difference.
    Diverged,
    Active,
}

/// What a check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    None,
    /// The node just became active: announce it.
    BecameActive {
        proven_by: Option<PeerId>,
    },
    /// A peer holds the same vector with another root.
    Divergence {
        peer: PeerId,
    },
}

#[derive(Debug)]
pub struct Readiness {
    phase: Phase,
    started: Instant,
    /// Silence from every peer for this long after start makes a lone node active.
    grace: Duration,
    /// Pointwise max of the first vector each peer advertised while this node was syncing.
    target: VersionVector,
    /// The latest (vector, root) each peer advertised.
    latest: BTreeMap<PeerId, (VersionVector, StateRoot)>,
}

impl Readiness {
    /// `discoverable`: whether the node has any way to find peers (bootstrap addresses or mDNS).
    pub fn new(discoverable: bool, grace: Duration, now: Instant) -> Self {
        let phase = if discoverable { Phase::Joining } else { Phase::Active };
        Readiness { phase, started: now, grace, target: VersionVector::default(), latest: BTreeMap::new() }
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    pub fn is_active(&self) -> bool {
        self.phase == Phase::Active
    }

    /// The vector this node must reach before it can be active.
    pub fn target(&self) -> &VersionVector {
        &self.target
    }

    /// A peer advertised `vv` with `root` (a digest or an attestation).
    pub fn on_peer_state(&mut self, peer: PeerId, vv: VersionVector, root: StateRoot) {
        if !self.is_active() && !self.latest.contains_key(&peer) {
            for (origin, seq) in &vv.0 {
                let t = self.target.0.entry(*origin).or_default();
                *t = (*t).max(*seq);
            }
        }
        self.latest.insert(peer, (vv, root));
    }

    /// A peer's signed attestation `{vv, root}`. It proves a root like a digest does, but only once
    /// this node heard a peer's digest: relayed by gossip, an attestation may be older than what
    /// the peers hold now, so on its own it must not be taken for where the cluster is.
    pub fn on_attestation(&mut self, peer: PeerId, vv: VersionVector, root: StateRoot) {
        if !self.latest.is_empty() {
            self.on_peer_state(peer, vv, root);
        }
    }

    /// For an active node, whether `peer`'s latest known state (as recorded) is at this node's
    /// vector `vv` with another root: the one-peer form of [`Readiness::check`]'s divergence test,
    /// for when only that peer's state is new.
    pub fn check_peer(&self, peer: &PeerId, vv: &VersionVector, root: StateRoot) -> Transition {
        match self.latest.get(peer) {
            Some((v, r)) if self.is_active() && v == vv && *r != root => Transition::Divergence { peer: *peer },
            _ => Transition::None,
        }
    }

    /// The root `peer` last advertised, if any.
    pub fn advertised_root(&self, peer: &PeerId) -> Option<StateRoot> {
        self.latest.get(peer).map(|(_, root)| *root)
    }

    /// The operator's word that this node may serve alone: active now.
    pub fn force_active(&mut self) {
        self.phase = Phase::Active;
    }

    /// When a node hearing from nobody becomes active by itself, if it ever does.
    pub fn deadline(&self) -> Option<Instant> {
        if self.is_active() || !self.latest.is_empty() {
            return None;
        }
        self.started.checked_add(self.grace)
    }

    /// A peer is gone; its advertised state no longer vouches for anything.
    pub fn on_peer_gone(&mut self, peer: &PeerId) {
        self.latest.remove(peer);
    }

    /// Whether [`check`](Self::check) at `vv` needs the state root: always before the node is
    /// active; once active, only when some peer's recorded state is at `vv` (the divergence test).
    pub fn compares(&self, vv: &VersionVector) -> bool {
        !self.is_active() || self.latest.values().any(|(v, _)| v == vv)
    }

    /// Re-evaluates the phase given this node's own vector and root.
    pub fn check(&mut self, vv: &VersionVector, root: StateRoot, now: Instant) -> Transition {
        if self.is_active() {
            return match self.latest.iter().find(|(_, (v, r))| v == vv && *r != root) {
                Some((peer, _)) => Transition::Divergence { peer: *peer },
                None => Transition::None,
            };
        }
        if self.latest.is_empty() {
            if now.duration_since(self.started) >= self.grace {
                self.phase = Phase::Active;
                return Transition::BecameActive { proven_by: None };
            }
            self.phase = Phase::Joining;
            return Transition::None;
        }
        if !vv.dominates(&self.target) {
            self.phase = Phase::CatchingUp;
            return Transition::None;
        }
        if let Some((peer, _)) = self.latest.iter().find(|(_, (v, r))| v == vv && *r == root) {
            self.phase = Phase::Active;
            return Transition::BecameActive { proven_by: Some(*peer) };
        }
        if let Some((peer, _)) = self.latest.iter().find(|(_, (v, r))| v == vv && *r != root) {
            self.phase = Phase::Diverged;
            return Transition::Divergence { peer: *peer };
        }
        let ahead_of_all = self.latest.values().all(|(v, _)| vv.dominates(v) && v != vv);
        if ahead_of_all {
            self.phase = Phase::Active;
            return Transition::BecameActive { proven_by: None };
        }
        self.phase =
            if self.latest.values().any(|(v, _)| !vv.dominates(v)) { Phase::CatchingUp } else { Phase::Verifying };
        Transition::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::Seq;

    fn vv(entries: &[(PeerId, u64)]) -> VersionVector {
        VersionVector(entries.iter().map(|(o, s)| (*o, Seq(*s))).collect())
    }

    const R1: StateRoot = StateRoot([1; 32]);
    const R2: StateRoot = StateRoot([2; 32]);

    #[test]
    fn undiscoverable_node_is_active_at_once_and_a_lone_one_after_the_grace() {
        let now = Instant::now();
        assert!(Readiness::new(false, Duration::from_secs(5), now).is_active());
        let mut r = Readiness::new(true, Duration::from_secs(5), now);
        assert_eq!(r.check(&VersionVector::default(), R1, now), Transition::None);
        assert_eq!(r.phase(), Phase::Joining);
        assert_eq!(
            r.check(&VersionVector::default(), R1, now + Duration::from_secs(5)),
            Transition::BecameActive { proven_by: None }
        );
    }

    #[test]
    fn catches_up_then_needs_a_matching_root() {
        let (o, p, q) = (PeerId::random(), PeerId::random(), PeerId::random());
        let now = Instant::now();
        let mut r = Readiness::new(true, Duration::from_secs(5), now);
        r.on_peer_state(p, vv(&[(o, 150)]), R1);
        assert_eq!(r.check(&vv(&[(o, 100)]), R2, now), Transition::None);
        assert_eq!(r.phase(), Phase::CatchingUp);
        // Caught up, but the only peer moved on: nothing vouches for our exact state yet.
        r.on_peer_state(p, vv(&[(o, 160)]), R1);
        assert_eq!(r.check(&vv(&[(o, 150)]), R2, now), Transition::None);
        assert_eq!(r.phase(), Phase::CatchingUp);
        // A peer at the same vector with the same root proves it.
        r.on_peer_state(q, vv(&[(o, 160)]), R2);
        assert_eq!(r.check(&vv(&[(o, 160)]), R2, now), Transition::BecameActive { proven_by: Some(q) });
        assert!(r.is_active());
    }

    #[test]
    fn same_vector_other_root_is_a_divergence() {
        let (o, p) = (PeerId::random(), PeerId::random());
        let now = Instant::now();
        let mut r = Readiness::new(true, Duration::from_secs(5), now);
        r.on_peer_state(p, vv(&[(o, 10)]), R1);
        assert_eq!(r.check(&vv(&[(o, 10)]), R2, now), Transition::Divergence { peer: p });
        assert_eq!(r.phase(), Phase::Diverged);
        r.on_peer_state(p, vv(&[(o, 10)]), R2);
        assert_eq!(r.check(&vv(&[(o, 10)]), R2, now), Transition::BecameActive { proven_by: Some(p) });
    }

    #[test]
    fn a_node_ahead_of_every_peer_is_active_without_a_voucher() {
        let (me, p) = (PeerId::random(), PeerId::random());
        let now = Instant::now();
        let mut r = Readiness::new(true, Duration::from_secs(5), now);
        r.on_peer_state(p, vv(&[(me, 3)]), R1);
        assert_eq!(r.check(&vv(&[(me, 5)]), R2, now), Transition::BecameActive { proven_by: None });
    }

    #[test]
    fn an_attestation_alone_does_not_make_a_joining_node_active() {
        let (o, p, q) = (PeerId::random(), PeerId::random(), PeerId::random());
        let now = Instant::now();
        let mut r = Readiness::new(true, Duration::MAX, now);
        r.on_attestation(p, VersionVector::default(), R1);
        assert_eq!(r.check(&VersionVector::default(), R1, now), Transition::None);
        assert_eq!(r.phase(), Phase::Joining, "no digest heard yet");
        r.on_peer_state(q, vv(&[(o, 5)]), R2);
        r.on_attestation(p, vv(&[(o, 5)]), R1);
        assert_eq!(r.check(&vv(&[(o, 5)]), R1, now), Transition::BecameActive { proven_by: Some(p) });
    }

    #[test]
    fn the_target_is_what_peers_had_when_we_joined() {
        let (o, p) = (PeerId::random(), PeerId::random());
        let now = Instant::now();
        let mut r = Readiness::new(true, Duration::from_secs(5), now);
        r.on_peer_state(p, vv(&[(o, 50)]), R1);
        r.on_peer_state(p, vv(&[(o, 80)]), R1);
        assert_eq!(r.target(), &vv(&[(o, 50)]), "later digests of the same peer do not move the target");
    }
}
