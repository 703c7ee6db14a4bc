//! Digests and their schedule, requests of peers and answers to ours, replay pulls, and deciding
//! when the node is active.

use std::time::Instant;

use libp2p::PeerId;

use super::{Action, Count, Engine, Pending, ReplyId, ReqId, StoreView, PULL_MAX_BYTES, PULL_MAX_OPS};
use crate::store::VersionVector;
use crate::sync::{PeerView, Phase, Pull, Transition};
use crate::wire::{Digest, SyncRequest, SyncResponse};

impl Engine {
    pub(super) fn my_digest(&self, store: &dyn StoreView) -> Digest {
        let (state_root, version_vector) = store.state_root();
        let (cert, members, revocations) = self.certs_for_digest();
        Digest {
            cert,
            members,
            revocations,
            hold_until: None,
            lease_group: self.leases.group_id(),
            cluster: self.cfg.cluster.clone(),
            role: self.cfg.role,
            version_vector,
            state_root,
            log_floors: self.holdings.log_floors.clone(),
            snapshots: self.holdings.snapshot.iter().map(|(c, _)| *c).collect(),
            snapshot_brief: self.holdings.snapshot.as_ref().map(|(_, b)| b.clone()),
        }
    }

    /// A digest round: digests go to a small fanout of peers (see `digest_targets`), never to every
    /// peer, so a node's cost per round does not grow with the cluster. Then the next period: short
    /// while syncing, behind or after changes; doubling towards the maximum while idle.
    pub(super) fn digest_round(&mut self, now: Instant, store: &dyn StoreView) {
        self.redial(now);
        self.prune_connections(now);
        self.remember_peers();
        let targets = self.digest_targets(store);
        for peer in &targets {
            self.send_digest(now, *peer, store);
        }
        let have = store.version_vector();
        let behind = self
            .peers
            .cluster(&self.cfg.cluster)
            .filter_map(|(_, p)| p.digest.as_ref())
            .any(|d| !have.dominates(&d.version_vector));
        let busy = behind || !self.readiness.is_active() || targets.is_empty();
        self.next_digest = now + self.pace.after_round(have.total(), busy);
        self.plan_pulls(now, store);
        self.drive_snapshot(now, store);
        self.check_ready(now, store);
    }

    pub(super) fn on_request(
        &mut self,
        now: Instant,
        peer: PeerId,
        reply: ReplyId,
        request: SyncRequest,
        store: &dyn StoreView,
    ) {
        self.count(Count::RequestsReceived, 1);
        // Raft's messages between the lease group's voters are answered from memory and come as
        // fast as leases are asked for (each voter keeps at most MAX_MESSAGES_IN_FLIGHT of them
        // unanswered): they are not charged to the budget meant for store reads, which would
        // otherwise strike a busy voter out of the group for a request flood.
        let voter_message =
            matches!(request, SyncRequest::Lease(_)) && self.leases.group.as_ref().is_some_and(|g| g.is_voter(&peer));
        let ack_ask = matches!(&request, SyncRequest::Digest(d) if d.hold_until.is_some());
        let budget = if voter_message {
            Ok(())
        } else if ack_ask {
            self.within_ack_budget(now, peer)
        } else {
            self.within_budget(now, peer)
        };
        if let Err(spent) = budget {
            self.count(Count::RequestsShed, 1);
            let response = SyncResponse::Error { code: "rate_limited".into(), message: spent.message().into() };
            self.push(Action::Reply { reply, response });
            if spent == super::peers::Spent::Requests {
                self.strike(now, peer, "request flood", 1);
            }
            return;
        }
        match request {
            SyncRequest::Digest(theirs) => {
                self.count(Count::DigestsReceived, 1);
                if let Err(reason) = self.admit(now, peer, &theirs) {
                    tracing::info!(%peer, %reason, "refused a digest of a peer that is not a member; disconnecting");
                    let response = SyncResponse::Error { code: "not_a_member".into(), message: reason };
                    self.push(Action::Reply { reply, response });
                    self.push(Action::Disconnect { peer });
                    // Its redials are closed at once for a while, without another look.
                    self.peers.entry(peer).banned_until = Some(now + super::peers::BAN);
                    return;
                }
                let held = theirs.hold_until.is_some_and(|seq| self.hold_digest(now, peer, reply, seq, store));
                if !held {
                    let mine = self.my_digest(store);
                    self.push(Action::Reply { reply, response: SyncResponse::Digest(mine) });
                }
                self.record_digest(now, peer, theirs, store);
            }
            other => {
                let in_cluster = self.peers.get(&peer).is_some_and(|p| p.in_cluster(&self.cfg.cluster));
                if let (true, SyncRequest::Lease(msg)) = (in_cluster, &other) {
                    self.on_lease_message(peer, reply, msg.clone());
                    return;
                }
                if !in_cluster {
                    let response = if self.gated() {
                        SyncResponse::Error {
                            code: "not_a_member".into(),
                            message: "this node serves certified members of its cluster only".into(),
                        }
                    } else {
                        SyncResponse::Error {
                            code: "not_in_cluster".into(),
                            message: format!("this node serves cluster {:?} only", self.cfg.cluster),
                        }
                    };
                    self.push(Action::Reply { reply, response });
                    return;
                }
                let theirs = self.peers.get(&peer).map_or(0, |p| p.serving);
                if self.serving >= self.cfg.max_serving || theirs >= super::peers::MAX_SERVING_PER_PEER {
                    // Shed with an answer that says so: the requester backs off and asks elsewhere.
                    self.count(Count::RequestsShed, 1);
                    let response = SyncResponse::Error {
                        code: "busy".into(),
                        message: format!("{} requests in service here; ask again later", self.serving),
                    };
                    self.push(Action::Reply { reply, response });
                    return;
                }
                self.serving += 1;
                self.peers.entry(peer).serving += 1;
                self.serving_for.insert(reply, peer);
                self.push(Action::Serve { reply, peer, request: other });
            }
        }
    }

    pub(super) fn on_response(
        &mut self,
        now: Instant,
        req: ReqId,
        result: Result<SyncResponse, String>,
        store: &dyn StoreView,
    ) {
        let Some((pending, _)) = self.requests.remove(&req) else { return };
        let peer = pending.peer();
        let response = match result {
            Ok(SyncResponse::Error { code, message }) => {
                tracing::debug!(%peer, %code, %message, "peer refused a request");
                Err(format!("{code}: {message}"))
            }
            Ok(r) => Ok(r),
            Err(e) => {
                tracing::debug!(%peer, error = %e, "request failed");
                Err(e)
            }
        };
        match (pending, response) {
            (Pending::Lease { peer }, r) => self.on_lease_answer(peer, r),
            (Pending::Digest { peer, held }, r) => {
                if let Some(p) = self.peers.map.get_mut(&peer) {
                    p.digest_pending = false;
                }
                if let Ok(SyncResponse::Digest(theirs)) = r {
                    match self.admit(now, peer, &theirs) {
                        Ok(()) => {
                            if held {
                                let mine = theirs.version_vector.get(&self.me);
                                let p = self.peers.entry(peer);
                                p.acked_mine = p.acked_mine.max(mine);
                            }
                            self.record_digest(now, peer, theirs, store)
                        }
                        Err(reason) => {
                            tracing::info!(%peer, %reason, "the peer is not a member; disconnecting");
                            self.push(Action::Disconnect { peer });
                            self.peers.entry(peer).banned_until = Some(now + super::peers::BAN);
                        }
                    }
                }
            }
            (Pending::Pull { peer, origin }, Ok(SyncResponse::Ops(batches))) => {
                if batches.is_empty() {
                    // The peer has nothing after our cursor (anymore): let the next digest decide.
                    if let Some(p) = self.peers.map.get_mut(&peer) {
                        p.digest = None;
                    }
                    self.planner.answered(&peer, &origin);
                    return;
                }
                match self.offer_pulled(peer, origin, batches, store) {
                    Ok(true) => {} // The pull ends when its batches are applied.
                    Ok(false) => {
                        self.planner.answered(&peer, &origin);
                        self.plan_pulls(now, store);
                    }
                    Err(reason) => {
                        tracing::warn!(%peer, %origin, %reason, "rejected replayed ops");
                        self.count(Count::ReplayRejected, 1);
                        self.planner.failed(&peer, &origin, now);
                        self.strike(now, peer, "rejected replay", 1);
                    }
                }
            }
            (Pending::Pull { peer, origin }, _) => {
                tracing::debug!(%peer, %origin, "pull failed; trying another source");
                self.planner.failed(&peer, &origin, now);
            }
            (Pending::Manifest { peer }, Ok(SyncResponse::Manifest(bytes))) => {
                self.on_manifest(now, peer, bytes, store)
            }
            (Pending::Manifest { peer }, _) => self.on_manifest_failed(now, peer),
            (Pending::Chunk { peer, index, cid }, Ok(SyncResponse::Chunk(bytes))) => {
                self.on_chunk(peer, index, cid, bytes)
            }
            (Pending::Chunk { peer, index, .. }, _) => self.on_chunk_failed(now, peer, index, store),
            (Pending::Buckets { peer }, Ok(SyncResponse::Buckets(bytes))) => self.on_buckets(now, peer, bytes, store),
            (Pending::Entries { peer }, Ok(SyncResponse::Entries(entries))) => self.on_entries(now, peer, entries),
            (Pending::Buckets { .. } | Pending::Entries { .. }, _) => self.repair.failed(now),
        }
    }

    fn record_digest(&mut self, now: Instant, peer: PeerId, digest: Digest, store: &dyn StoreView) {
        if digest.cluster != self.cfg.cluster {
            tracing::debug!(%peer, cluster = %digest.cluster, "digest from another cluster ignored");
            return;
        }
        tracing::trace!(%peer, vv = ?digest.version_vector, "digest");
        self.readiness.on_peer_state(peer, digest.version_vector.clone(), digest.state_root);
        let entry = self.peers.entry(peer);
        entry.digest = Some(digest);
        entry.digest_at = Some(now);
        self.check_ready(now, store);
        self.plan_pulls(now, store);
        self.settle_acks(now);
        self.ask_acks(now, store);
    }

    /// Re-evaluates the phase; announces an attestation on becoming active.
    pub(super) fn check_ready(&mut self, now: Instant, store: &dyn StoreView) {
        if self.snapshot.active.as_ref().is_some_and(|a| a.installing) {
            // The store may hold the snapshot's state (its commit event can come first) before the
            // install's outcome does; `on_installed` checks again once the pull is over.
            return;
        }
        if self.announced == Phase::Active && !self.readiness.compares(&store.version_vector()) {
            // Active, and no peer's recorded state is at this vector: nothing to compare, and the
            // root (a hash of every bucket) is not needed. This runs after every input.
            return;
        }
        let (root, vv) = store.state_root();
        let ops = vv.total();
        let before = self.readiness.phase();
        let transition = self.readiness.check(&vv, root, now);
        if before != Phase::Verifying && self.readiness.phase() == Phase::Verifying {
            // Just caught up: ask the peers this node learnt from for their state now rather than at
            // the next round, so the proof of the root comes one round trip later.
            let peers: Vec<PeerId> = self.digest_targets(store);
            for peer in peers {
                self.send_digest(now, peer, store);
            }
        }
        match transition {
            Transition::None => {}
            Transition::BecameActive { proven_by } => {
                tracing::info!(?proven_by, ops = vv.total(), %root, "caught up and verified; node is active");
                self.attest(now, store);
            }
            Transition::Divergence { peer } => self.start_repair(now, peer, root),
        }
        let phase = self.readiness.phase();
        if phase != self.announced {
            tracing::info!(from = ?self.announced, to = ?phase, ops, %root, "phase changed");
            self.announced = phase;
            self.push(Action::Phase { phase });
        }
    }

    /// Decides whether to pull a snapshot (before any replay, which it may spare), then starts the
    /// pulls the planner asks for.
    pub(super) fn plan_pulls(&mut self, now: Instant, store: &dyn StoreView) {
        self.maybe_start_snapshot(now, store);
        let have = self.apply.have(store);
        // Ops a snapshot being pulled will bring are not replayed meanwhile.
        let snapshot_brings = self.snapshot.covers().cloned();
        let views: Vec<PeerView> = self
            .peers
            .cluster(&self.cfg.cluster)
            .filter_map(|(id, p)| {
                let d = p.digest.as_ref()?;
                // Only what the peer can replay: origins compacted past our position need a snapshot.
                let servable = d
                    .version_vector
                    .0
                    .iter()
                    .filter(|(o, _)| d.log_floors.get(o) <= have.get(o))
                    .filter(|(o, _)| snapshot_brings.as_ref().is_none_or(|v| v.get(o) <= have.get(o)))
                    .map(|(o, s)| (*o, *s))
                    .collect();
                Some(PeerView { peer: *id, role: d.role, version_vector: VersionVector(servable), rtt: p.rtt })
            })
            .collect();
        for Pull { peer, origin, after } in self.planner.plan(&have, &views, now) {
            let request = SyncRequest::GetOps { origin, after, max_ops: PULL_MAX_OPS, max_bytes: PULL_MAX_BYTES };
            tracing::debug!(%peer, %origin, %after, "pulling ops");
            self.send(now, peer, request, Pending::Pull { peer, origin });
        }
    }
}
