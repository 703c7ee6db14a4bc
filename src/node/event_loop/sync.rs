//! The event loop's side of staying in sync: digest rounds, pulls of missing ops, and deciding when
//! the node is active. The decisions come from `sync::ReplayPlanner` and `sync::Readiness`.

use std::time::Instant;

use libp2p::PeerId;

use super::{EventLoop, PeerInfo, PULL_MAX_BYTES, PULL_MAX_OPS};
use crate::net::{cluster_topic, encode_gossip, Attestation, GossipMessage, SyncRequest};
use crate::store::VersionVector;
use crate::sync::{PeerView, Phase, Pull, Transition};

impl EventLoop {
    /// Sends this node's digest to every peer of the cluster, then picks the next period: short
    /// while syncing, behind, or after changes; doubling towards the maximum while idle.
    pub(super) fn digest_round(&mut self) {
        self.redial_bootstrap();
        let digest = self.my_digest();
        let applied = digest.version_vector.total();
        let targets: Vec<PeerId> = self.cluster_peers().map(|(id, _)| *id).collect();
        for peer in &targets {
            self.swarm.behaviour_mut().sync.send_request(peer, SyncRequest::Digest(digest.clone()));
        }
        let behind = self
            .peers
            .values()
            .filter_map(|p| p.digest.as_ref())
            .any(|d| !digest.version_vector.dominates(&d.version_vector));
        let busy = behind || !self.readiness.is_active() || targets.is_empty();
        self.digest_every = self.digest_pace.after_round(applied, busy);
        self.plan_pulls();
        self.drive_snapshot();
        self.check_ready();
    }

    /// Dials again the bootstrap peers that are not connected (see `net::Redial`): one that was
    /// down when this node started, or restarted since, is found again.
    fn redial_bootstrap(&mut self) {
        let peers = &self.peers;
        let any = peers.values().any(|p| p.connections > 0);
        let due = self.redial.due(Instant::now(), |p| peers.get(p).is_some_and(|i| i.connections > 0), any);
        for addr in due {
            tracing::debug!(%addr, "dialing a bootstrap peer again");
            if let Err(e) = self.swarm.dial(addr.clone()) {
                tracing::debug!(%addr, error = %e, "could not dial a bootstrap peer");
            }
        }
    }

    /// The connected peers of this node's cluster.
    pub(super) fn cluster_peers(&self) -> impl Iterator<Item = (&PeerId, &PeerInfo)> {
        self.peers.iter().filter(|(_, p)| p.connections > 0 && p.in_cluster(&self.cluster))
    }

    /// Re-evaluates the phase; announces an attestation on becoming active.
    pub(super) fn check_ready(&mut self) {
        let (root, vv) = self.store.state_root();
        let before = self.readiness.phase();
        let transition = self.readiness.check(&vv, root, Instant::now());
        if before != Phase::Verifying && self.readiness.phase() == Phase::Verifying {
            // Just caught up: ask the peers for their state now rather than at the next digest
            // round, so the proof of the root comes one round trip later.
            let digest = self.my_digest();
            let peers: Vec<PeerId> = self.cluster_peers().map(|(id, _)| *id).collect();
            for peer in peers {
                self.swarm.behaviour_mut().sync.send_request(&peer, SyncRequest::Digest(digest.clone()));
            }
        }
        match transition {
            Transition::None => {}
            Transition::BecameActive { proven_by } => {
                tracing::info!(?proven_by, ops = vv.total(), %root, "caught up and verified; node is active");
                let attestation = Attestation::sign(&self.signer, &self.cluster, vv, root);
                let data = encode_gossip(&GossipMessage::Attestation(attestation));
                let _ = self.swarm.behaviour_mut().gossipsub.publish(cluster_topic(&self.cluster), data);
            }
            Transition::Divergence { peer } => self.start_repair(peer),
        }
        self.phase.send_if_modified(|p| {
            let changed = *p != self.readiness.phase();
            *p = self.readiness.phase();
            changed
        });
    }

    /// Decides whether to pull a snapshot (before any replay, which it may spare), then starts the
    /// pulls the planner asks for.
    pub(super) fn plan_pulls(&mut self) {
        self.maybe_start_snapshot();
        let mut have = self.store.version_vector();
        let now = Instant::now();
        let timeout = self.timings.request_timeout;
        self.pulled.retain(|origin, (seq, at)| *seq > have.get(origin) && now.duration_since(*at) < timeout);
        for (origin, (seq, _)) in &self.pulled {
            have.0.insert(*origin, *seq);
        }
        // Ops a snapshot being pulled will bring are not replayed meanwhile.
        let snapshot_brings = self.snapshot.as_ref().and_then(|s| s.covers.as_ref());
        let views: Vec<PeerView> = self
            .cluster_peers()
            .filter_map(|(id, p)| {
                let d = p.digest.as_ref()?;
                // Only what the peer can replay: origins compacted past our position need a snapshot.
                let servable = d
                    .version_vector
                    .0
                    .iter()
                    .filter(|(o, _)| d.log_floors.get(o) <= have.get(o))
                    .filter(|(o, _)| snapshot_brings.is_none_or(|v| v.get(o) <= have.get(o)))
                    .map(|(o, s)| (*o, *s))
                    .collect();
                Some(PeerView { peer: *id, role: d.role, version_vector: VersionVector(servable), rtt: p.rtt })
            })
            .collect();
        for Pull { peer, origin, after } in self.planner.plan(&have, &views, now) {
            let request = SyncRequest::GetOps { origin, after, max_ops: PULL_MAX_OPS, max_bytes: PULL_MAX_BYTES };
            let id = self.swarm.behaviour_mut().sync.send_request(&peer, request);
            tracing::debug!(%peer, %origin, %after, "pulling ops");
            self.pulls.insert(id, (peer, origin));
        }
    }
}
