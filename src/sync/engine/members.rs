//! Membership (a node started with an authority): who may exchange anything with this node.
//!
//! A peer shows its certificate in its digest, the first thing exchanged on a connection. Until it
//! does, it gets nothing: its requests are refused, gossip neither reaches it nor is taken from it,
//! and after a short grace it is disconnected. Digests of members also carry the certificates their
//! sender knows, so a node learns every member, including origins it is not connected to whose
//! ops reach it by relay. Ops count only from origins certified as primaries, attestations and
//! snapshots only from members. Expired certificates end membership.

use std::time::{Duration, Instant};

use libp2p::PeerId;
use serde_bytes::ByteBuf;

use super::{Action, Engine};
use crate::cert::{Certificate, Revocation};
use crate::ids::Role;
use crate::wire::Digest;

/// How long a connected peer may take to show a certificate before it is disconnected.
pub const MEMBERSHIP_GRACE: Duration = Duration::from_secs(5);
/// Certificates carried in one digest at most.
const MAX_CERTS_PER_DIGEST: usize = 256;
/// Members known at most.
const MAX_MEMBERS: usize = 4096;

/// This node's cluster authority and its own certificate.
#[derive(Debug, Clone)]
pub struct Membership {
    pub authority: PeerId,
    pub cert: Certificate,
}

impl Engine {
    /// Milliseconds since the Unix epoch at `now`, from the wall clock read once at start.
    pub(super) fn wall_ms(&self, now: Instant) -> u64 {
        self.cfg.wall_ms_at_start.saturating_add(now.saturating_duration_since(self.started).as_millis() as u64)
    }

    /// Whether membership is enforced.
    pub(super) fn gated(&self) -> bool {
        self.cfg.membership.is_some()
    }

    /// Checks the certificate `peer` showed in its digest. Open mode admits everyone.
    pub(super) fn admit(&mut self, now: Instant, peer: PeerId, digest: &Digest) -> Result<(), String> {
        let Some(m) = self.cfg.membership.clone() else { return Ok(()) };
        let now_ms = self.wall_ms(now);
        // Revocations first: one the peer carries may be about itself.
        for bytes in digest.revocations.iter().take(MAX_CERTS_PER_DIGEST) {
            if let Ok(r) = Revocation::decode(bytes) {
                let _ = self.learn_revocation(r, false);
            }
        }
        if let Some(r) = self.revoked.get(&peer) {
            return Err(format!("its membership was revoked (after seq {})", r.last_seq));
        }
        let bytes = digest.cert.as_ref().ok_or("no membership certificate shown")?;
        let cert = Certificate::decode(bytes).map_err(|e| e.to_string())?;
        cert.verify(&m.authority, &peer, now_ms).map_err(|e| e.to_string())?;
        let newly = self.peers.get(&peer).is_none_or(|p| p.member != Some(cert.role));
        if newly {
            tracing::info!(%peer, role = %cert.role, serial = cert.serial, "peer showed a valid membership certificate");
            self.push(Action::Gossip { peer, allow: true });
        }
        self.peers.entry(peer).member = Some(cert.role);
        self.learn_member(cert);
        // What it knows of other members: each certificate is checked for its own peer.
        for bytes in digest.members.iter().take(MAX_CERTS_PER_DIGEST) {
            let Ok(cert) = Certificate::decode(bytes) else { continue };
            if self.members.get(&cert.peer) == Some(&cert) {
                continue;
            }
            if cert.verify(&m.authority, &cert.peer, now_ms).is_ok() {
                self.learn_member(cert);
            }
        }
        Ok(())
    }

    fn learn_member(&mut self, cert: Certificate) {
        // Other members still pass on a revoked member's certificate: it stays revoked.
        if self.revoked.contains_key(&cert.peer) {
            return;
        }
        if self.members.len() >= MAX_MEMBERS && !self.members.contains_key(&cert.peer) {
            return;
        }
        // A newer certificate of the same peer (a later serial) replaces the older one.
        match self.members.get(&cert.peer) {
            Some(old) if old.serial > cert.serial => {}
            _ => {
                self.members.insert(cert.peer, cert);
            }
        }
    }

    /// A revocation from the API (`from_operator`), gossip or a digest. A new one that verifies is
    /// kept, persisted and passed on; the peer is cut off. Returns why one is refused.
    pub(super) fn learn_revocation(&mut self, r: Revocation, from_operator: bool) -> Result<(), String> {
        let Some(m) = self.cfg.membership.clone() else {
            return Err("this node runs in open mode: there is no membership to revoke".into());
        };
        r.verify(&m.authority).map_err(|e| e.to_string())?;
        if let Some(old) = self.revoked.get(&r.peer) {
            if old.last_seq <= r.last_seq {
                return Ok(()); // Known already (an earlier cut stands).
            }
        }
        let peer = r.peer;
        tracing::warn!(%peer, last_seq = %r.last_seq, from_operator, "membership revoked; its later ops are refused");
        self.revoked.insert(peer, r.clone());
        self.cut_off(peer);
        self.push(Action::PersistRevocations { all: self.revoked.values().cloned().collect() });
        let data = crate::wire::encode_gossip(&crate::wire::GossipMessage::Revocation(r.encode()));
        self.push(Action::Publish { data });
        Ok(())
    }

    /// Ends `peer`'s membership here: no longer a member, its state vouches for nothing, and its
    /// connection and gossip are closed.
    fn cut_off(&mut self, peer: PeerId) {
        self.members.remove(&peer);
        if let Some(p) = self.peers.map.get_mut(&peer) {
            p.member = None;
            p.digest = None;
        }
        self.readiness.on_peer_gone(&peer);
        if self.peers.is_connected(&peer) {
            self.push(Action::Gossip { peer, allow: false });
            self.push(Action::Disconnect { peer });
        }
    }

    /// The seq after which `origin`'s ops are refused, when it was revoked.
    pub(super) fn revoked_after(&self, origin: &PeerId) -> Option<crate::ids::Seq> {
        self.revoked.get(origin).map(|r| r.last_seq)
    }

    /// Whether `origin` may originate ops: a certified primary, or anyone in open mode (then the
    /// checks on identify and the message's claim apply).
    pub(super) fn certified_role(&self, origin: &PeerId, now: Instant) -> Option<Role> {
        if self.revoked.contains_key(origin) {
            return None;
        }
        let cert = self.members.get(origin)?;
        (self.wall_ms(now) < cert.not_after_ms).then_some(cert.role)
    }

    /// Membership mode: whether a snapshot made by `manifest.creator` may be installed. Its
    /// entries are checked only against the root its creator signed, so that creator must be a
    /// certified primary, or another certified member's latest attestation must vouch for the same
    /// root at the same vector.
    pub(super) fn check_manifest_creator(
        &self,
        manifest: &crate::snapshot::Manifest,
        now: Instant,
    ) -> Result<(), String> {
        let creator = manifest.creator;
        match self.certified_role(&creator, now) {
            None => Err(format!("manifest made by {creator}, which is not a member")),
            Some(Role::Primary) => Ok(()),
            Some(role) => {
                let confirmed = self.attestations.iter().any(|(peer, heard)| {
                    *peer != creator
                        && *peer != self.me
                        && self.certified_role(peer, now).is_some()
                        && heard.vv == manifest.version_vector
                        && heard.root == manifest.state_root
                });
                if confirmed {
                    Ok(())
                } else {
                    Err(format!(
                        "manifest made by {creator}, a {role}, and no other member has attested its state \
                         root at its vector; only a certified primary's snapshot is taken unconfirmed"
                    ))
                }
            }
        }
    }

    /// Own certificate and the other members' certificates, for a digest.
    pub(super) fn certs_for_digest(&self) -> (Option<ByteBuf>, Vec<ByteBuf>, Vec<ByteBuf>) {
        let Some(m) = &self.cfg.membership else { return (None, Vec::new(), Vec::new()) };
        let others = self
            .members
            .values()
            .filter(|c| c.peer != self.me)
            .take(MAX_CERTS_PER_DIGEST)
            .map(|c| ByteBuf::from(c.encode()));
        let revoked = self.revoked.values().take(MAX_CERTS_PER_DIGEST).map(|r| ByteBuf::from(r.encode()));
        (Some(ByteBuf::from(m.cert.encode())), others.collect(), revoked.collect())
    }

    /// On a tick: members whose certificate expired are members no more, and peers that showed no
    /// certificate within the grace are disconnected.
    pub(super) fn police_members(&mut self, now: Instant) {
        if !self.gated() {
            return;
        }
        let now_ms = self.wall_ms(now);
        let expired: Vec<PeerId> = self.members.values().filter(|c| now_ms >= c.not_after_ms).map(|c| c.peer).collect();
        for peer in expired {
            tracing::warn!(%peer, "membership certificate expired; no longer exchanging with it");
            self.cut_off(peer);
        }
        let strangers: Vec<PeerId> = self
            .peers
            .map
            .iter()
            .filter(|(_, p)| p.connected() && p.member.is_none())
            .filter(|(_, p)| p.connected_at.is_some_and(|t| now.saturating_duration_since(t) >= MEMBERSHIP_GRACE))
            .map(|(id, _)| *id)
            .collect();
        for peer in strangers {
            tracing::info!(%peer, "peer showed no membership certificate; disconnecting");
            if let Some(p) = self.peers.map.get_mut(&peer) {
                p.connected_at = None;
            }
            self.push(Action::Disconnect { peer });
        }
    }
}

impl Engine {
    /// Records a verified attestation of `peer` for the member registry.
    /// This node's own is not kept: what it holds is read from its store.
    pub(super) fn note_attestation(&mut self, now: Instant, a: &crate::wire::Attestation) {
        let at = self.wall_ms(now);
        if a.peer == self.me {
            return;
        }
        if self.attestations.len() >= MAX_MEMBERS && !self.attestations.contains_key(&a.peer) {
            return;
        }
        let heard =
            super::tombstones::Heard { vv: a.version_vector.clone(), root: a.state_root, clock: a.clock, at_ms: at };
        self.attestations.insert(a.peer, heard);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use libp2p::identity::Keypair;

    use super::*;
    use crate::ids::{Seq, StateRoot};
    use crate::op::{ChainHash, OpBatch, Signer};
    use crate::store::VersionVector;
    use crate::sync::engine::fixed_store::EMPTY;
    use crate::sync::engine::{EngineConfig, GossipId, Input, ReplyId, Verdict};
    use crate::wire::{encode_gossip, GossipMessage, SyncRequest, SyncResponse};

    const NOW_MS: u64 = 1_000_000;

    fn member(authority: &Keypair, role: Role) -> (Signer, Certificate) {
        let signer = Signer::new(Keypair::generate_ed25519());
        let cert = Certificate::issue(authority, signer.origin(), role, 0, NOW_MS + 60_000, 1);
        (signer, cert)
    }

    fn engine(authority: &Keypair, now: Instant) -> Engine {
        let (signer, cert) = member(authority, Role::Primary);
        let mut cfg = EngineConfig::new(Role::Primary, "c");
        cfg.membership = Some(Membership { authority: authority.public().to_peer_id(), cert });
        cfg.wall_ms_at_start = NOW_MS;
        Engine::new(signer, cfg, &EMPTY, now)
    }

    fn digest_of(e: &Engine, cert: Option<&Certificate>) -> crate::wire::Digest {
        let mut d = e.my_digest(&EMPTY);
        d.cert = cert.map(|c| serde_bytes::ByteBuf::from(c.encode()));
        d.members.clear();
        d
    }

    fn drain(e: &mut Engine) -> Vec<Action> {
        std::iter::from_fn(|| e.poll_action()).collect()
    }

    fn one_op_batch(signer: &Signer) -> OpBatch {
        let op = serde_bytes::ByteBuf::from(b"op".to_vec());
        // The engine checks shape and origin; the chain itself is verified by the executor.
        let head = signer.sign_head(Seq(1), ChainHash::GENESIS.extend(&[1; 32]));
        OpBatch { after: Seq(0), ops: vec![op], head }
    }

    #[test]
    fn a_snapshot_is_taken_from_a_certified_primary_or_on_another_members_attestation() {
        let authority = Keypair::generate_ed25519();
        let now = Instant::now();
        let mut e = engine(&authority, now);
        let (replica, replica_cert) = member(&authority, Role::Replica);
        let (primary, primary_cert) = member(&authority, Role::Primary);
        let (witness, witness_cert) = member(&authority, Role::Replica);
        for (i, (signer, cert)) in
            [(&replica, &replica_cert), (&primary, &primary_cert), (&witness, &witness_cert)].into_iter().enumerate()
        {
            let request = SyncRequest::Digest(digest_of(&e, Some(cert)));
            e.handle(now, Input::Request { peer: signer.origin(), reply: ReplyId(i as u64), request }, &EMPTY);
        }
        drain(&mut e);
        let vv = VersionVector([(primary.origin(), Seq(5))].into_iter().collect());
        let manifest = |creator: &Signer, root: u8| crate::snapshot::Manifest {
            format: crate::snapshot::FORMAT,
            cluster: "c".into(),
            creator: creator.origin(),
            created_at_ms: NOW_MS,
            version_vector: vv.clone(),
            heads: Default::default(),
            state_root: StateRoot([root; 32]),
            collections: vec![],
            chunks: vec![],
        };
        let stranger = Signer::new(Keypair::generate_ed25519());
        assert!(e.check_manifest_creator(&manifest(&stranger, 1), now).is_err());
        assert!(e.check_manifest_creator(&manifest(&primary, 1), now).is_ok());
        // A replica's snapshot: refused until another member attests the same root at that vector.
        assert!(e.check_manifest_creator(&manifest(&replica, 1), now).is_err());
        let attest = |signer: &Signer, root: u8| {
            let a = crate::wire::Attestation::sign(
                signer,
                "c",
                crate::wire::Attested {
                    version_vector: vv.clone(),
                    state_root: StateRoot([root; 32]),
                    clock: crate::crdt::Hlc::default(),
                },
            );
            encode_gossip(&GossipMessage::Attestation(a))
        };
        // Its own attestation vouches for nothing, nor does another member's of another root.
        for (i, data) in [attest(&replica, 1), attest(&witness, 2)].into_iter().enumerate() {
            e.handle(now, Input::Gossip { id: GossipId(100 + i as u64), from: witness.origin(), data }, &EMPTY);
            assert!(e.check_manifest_creator(&manifest(&replica, 1), now).is_err());
        }
        e.handle(now, Input::Gossip { id: GossipId(102), from: witness.origin(), data: attest(&witness, 1) }, &EMPTY);
        assert!(e.check_manifest_creator(&manifest(&replica, 1), now).is_ok());
        assert!(e.check_manifest_creator(&manifest(&replica, 2), now).is_err());
    }

    #[test]
    fn strangers_get_nothing_and_members_are_admitted() {
        let authority = Keypair::generate_ed25519();
        let other_authority = Keypair::generate_ed25519();
        let now = Instant::now();
        let mut e = engine(&authority, now);
        drain(&mut e);
        let stranger = PeerId::random();
        e.handle(now, Input::Connected { peer: stranger, dialed: None }, &EMPTY);
        let on_connect = drain(&mut e);
        assert!(
            on_connect.iter().any(|a| matches!(a, Action::Gossip { peer, allow: false } if *peer == stranger)),
            "{on_connect:?}"
        );
        // A digest without a certificate, or with one of another authority: refused, disconnected.
        let (foreign, foreign_cert) = member(&other_authority, Role::Primary);
        for (peer, cert) in [(stranger, None), (foreign.origin(), Some(&foreign_cert))] {
            let request = SyncRequest::Digest(digest_of(&e, cert));
            e.handle(now, Input::Request { peer, reply: ReplyId(1), request }, &EMPTY);
            let acts = drain(&mut e);
            assert!(acts.iter().any(|a| matches!(a, Action::Reply { response: SyncResponse::Error { code, .. }, .. } if code == "not_a_member")), "{acts:?}");
            assert!(acts.iter().any(|a| matches!(a, Action::Disconnect { peer: p } if *p == peer)), "{acts:?}");
        }
        // Any other request of a stranger is refused, never served.
        let pull = SyncRequest::GetOps { origin: stranger, after: Seq(0), max_ops: 10, max_bytes: 1000 };
        e.handle(now, Input::Request { peer: stranger, reply: ReplyId(2), request: pull }, &EMPTY);
        let acts = drain(&mut e);
        assert!(!acts.iter().any(|a| matches!(a, Action::Serve { .. })), "{acts:?}");
        assert!(acts.iter().any(
            |a| matches!(a, Action::Reply { response: SyncResponse::Error { code, .. }, .. } if code == "not_a_member")
        ));
        // Ops of an origin that is no certified primary are rejected: the stranger, and a replica.
        let (replica, replica_cert) = member(&authority, Role::Replica);
        let request = SyncRequest::Digest(digest_of(&e, Some(&replica_cert)));
        e.handle(now, Input::Request { peer: replica.origin(), reply: ReplyId(3), request }, &EMPTY);
        drain(&mut e);
        let forger = Signer::new(Keypair::generate_ed25519());
        for (i, signer) in [&forger, &replica].into_iter().enumerate() {
            let data = encode_gossip(&GossipMessage::Ops { role: Role::Primary, batch: one_op_batch(signer) });
            e.handle(now, Input::Gossip { id: GossipId(i as u64), from: replica.origin(), data }, &EMPTY);
            let acts = drain(&mut e);
            assert!(acts.iter().any(|a| matches!(a, Action::Verdict { verdict: Verdict::Reject, .. })), "{acts:?}");
            assert!(!acts.iter().any(|a| matches!(a, Action::Apply { .. })), "{acts:?}");
        }
        // A certified primary's digest admits it and lets gossip flow; its ops are applied.
        let (primary, primary_cert) = member(&authority, Role::Primary);
        e.handle(now, Input::Connected { peer: primary.origin(), dialed: None }, &EMPTY);
        drain(&mut e);
        let request = SyncRequest::Digest(digest_of(&e, Some(&primary_cert)));
        e.handle(now, Input::Request { peer: primary.origin(), reply: ReplyId(4), request }, &EMPTY);
        let acts = drain(&mut e);
        assert!(acts.iter().any(|a| matches!(a, Action::Gossip { allow: true, .. })), "{acts:?}");
        assert!(acts.iter().any(|a| matches!(a, Action::Reply { response: SyncResponse::Digest(_), .. })), "{acts:?}");
        let data = encode_gossip(&GossipMessage::Ops { role: Role::Primary, batch: one_op_batch(&primary) });
        e.handle(now, Input::Gossip { id: GossipId(9), from: primary.origin(), data }, &EMPTY);
        assert!(drain(&mut e).iter().any(|a| matches!(a, Action::Apply { .. })));
        // Past its certificate's end it is a member no more.
        let later = now + std::time::Duration::from_secs(61);
        e.handle(later, Input::Tick, &EMPTY);
        let acts = drain(&mut e);
        assert!(acts.iter().any(|a| matches!(a, Action::Disconnect { peer } if *peer == primary.origin())), "{acts:?}");
    }

    #[test]
    fn a_member_asking_for_acks_at_the_pace_of_sequential_writes_is_never_cut_off() {
        // `?ack=1` writes one after another: the writer asks this node once per write, ~1 ms apart,
        // far past the request rate meant for store reads.
        let authority = Keypair::generate_ed25519();
        let start = Instant::now();
        let mut e = engine(&authority, start);
        let (primary, cert) = member(&authority, Role::Primary);
        let mut refused = 0;
        for i in 0..3000u64 {
            let now = start + std::time::Duration::from_millis(i);
            let request =
                SyncRequest::Digest(crate::wire::Digest { hold_until: Some(Seq(i + 1)), ..digest_of(&e, Some(&cert)) });
            e.handle(now, Input::Request { peer: primary.origin(), reply: ReplyId(i), request }, &EMPTY);
            for a in drain(&mut e) {
                match a {
                    Action::Disconnect { peer } if peer == primary.origin() => panic!("cut off after {i} asks"),
                    Action::Reply { response: SyncResponse::Error { code, .. }, .. } if code == "rate_limited" => {
                        refused += 1
                    }
                    _ => {}
                }
            }
        }
        assert_eq!(refused, 0);
        // Other requests keep their own, smaller budget: a flood of them is still cut off.
        let flood_at = start + std::time::Duration::from_secs(4);
        let disconnected = (0..2000u64).any(|i| {
            let request = SyncRequest::Digest(digest_of(&e, Some(&cert)));
            e.handle(flood_at, Input::Request { peer: primary.origin(), reply: ReplyId(10_000 + i), request }, &EMPTY);
            drain(&mut e).iter().any(|a| matches!(a, Action::Disconnect { peer } if *peer == primary.origin()))
        });
        assert!(disconnected, "a flood of plain digests was never cut off");
    }
}
