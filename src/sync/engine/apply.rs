//! Ops that come from peers (gossip and replay): where each origin's log stands once the queued
//! batches commit, what is a duplicate, what waits behind a gap, and the verdict on each gossip
//! message. Verification (hash chain, signature) and the write itself are the executor's part of
//! [`Action::Apply`]; its outcome comes back as [`Input::Applied`](super::Input::Applied).

use std::collections::BTreeMap;
use std::time::Instant;

use libp2p::PeerId;

use super::{Action, Count, Engine, GossipId, StoreView, Ticket, Verdict};
use crate::ids::{Origin, Role, Seq};
use crate::op::OpBatch;
use crate::store::OriginProgress;
use crate::sync::{Admit, GapBuffer, GapLimits, Transition};
use crate::wire::{decode_gossip, GossipMessage};

/// Ops in one received batch at most.
pub const MAX_BATCH_OPS: usize = 4096;

/// What an apply ticket was for.
#[derive(Debug, Clone)]
enum For {
    /// A gossip message: its verdict waits for the outcome.
    Gossip { id: GossipId, origin: Origin },
    /// Batches a pull of `origin` from `peer` brought.
    Pull { peer: PeerId, origin: Origin },
    /// Batches released from the gap buffer.
    Released { origin: Origin },
}

#[derive(Debug)]
pub(super) struct Apply {
    gaps: GapBuffer,
    /// Per origin, where the log stands once every batch queued to the writer is committed.
    cursors: BTreeMap<Origin, OriginProgress>,
    tickets: BTreeMap<Ticket, For>,
    next_ticket: u64,
}

impl Apply {
    pub fn new(limits: GapLimits) -> Self {
        Apply { gaps: GapBuffer::new(limits), cursors: BTreeMap::new(), tickets: BTreeMap::new(), next_ticket: 0 }
    }

    /// Where `origin`'s log stands once the queued batches commit. The store may have moved past
    /// the cursor without this pipeline (a snapshot install), so it is never behind what is
    /// committed.
    pub fn cursor(&self, origin: &Origin, store: &dyn StoreView) -> OriginProgress {
        let committed = store.progress(origin);
        match self.cursors.get(origin) {
            Some(c) if c.seq > committed.seq => *c,
            _ => committed,
        }
    }

    /// Forgets the queued position of `origin`: the next batch is judged against the store.
    pub fn forget(&mut self, origin: &Origin) {
        self.cursors.remove(origin);
    }

    pub fn buffered_ops(&self) -> usize {
        self.gaps.usage().0
    }

    pub fn in_flight(&self) -> usize {
        self.tickets.len()
    }

    pub fn gaps(&self, store: &dyn StoreView) -> Vec<crate::sync::Gap> {
        self.gaps.gaps(|o| self.cursor(o, store).seq)
    }

    /// The queued-or-committed vector: the store's, raised by the cursors.
    pub fn have(&self, store: &dyn StoreView) -> crate::store::VersionVector {
        let mut have = store.version_vector();
        for (origin, c) in &self.cursors {
            let e = have.0.entry(*origin).or_default();
            *e = (*e).max(c.seq);
        }
        have
    }
}

/// What offering a batch came to.
enum Offered {
    /// Queued for apply under this ticket.
    Queued(Ticket),
    /// Already applied or queued, or buffered behind a gap: nothing to wait for.
    Done,
}

impl Engine {
    pub(super) fn on_gossip(&mut self, now: Instant, id: GossipId, from: PeerId, data: Vec<u8>, store: &dyn StoreView) {
        match self.judge_gossip(now, id, &data, store) {
            Ok(Some(_)) => {} // The verdict waits for the apply.
            Ok(None) => self.push(Action::Verdict { id, verdict: Verdict::Accept }),
            Err(None) => {
                self.count(Count::GossipIgnored, 1);
                self.push(Action::Verdict { id, verdict: Verdict::Ignore })
            }
            Err(Some(reason)) => {
                tracing::warn!(peer = %from, %reason, "rejected a gossip message");
                self.count(Count::GossipRejected, 1);
                self.push(Action::Verdict { id, verdict: Verdict::Reject });
                self.strike(now, from, "rejected gossip", 4);
            }
        }
    }

    /// Checks a gossip message. Envelopes are anonymous: what counts is the payload's own signature
    /// (an origin's signed chain head, an attestation's signature) and what identify told us about
    /// the origin. `Ok(Some(ticket))`: the verdict waits for that apply; `Err(None)`: overloaded.
    fn judge_gossip(
        &mut self,
        now: Instant,
        id: GossipId,
        data: &[u8],
        store: &dyn StoreView,
    ) -> Result<Option<Ticket>, Option<String>> {
        let (role, batch) = match decode_gossip(data, self.cfg.max_gossip_bytes).map_err(|e| Some(e.to_string()))? {
            GossipMessage::Ops { role, batch } => (role, batch),
            GossipMessage::Revocation(bytes) => {
                let r = crate::cert::Revocation::decode(&bytes).map_err(|e| Some(e.to_string()))?;
                return self.learn_revocation(r, false).map(|_| None).map_err(Some);
            }
            GossipMessage::Attestation(a) => {
                if self.gated() && self.certified_role(&a.peer, now).is_none() {
                    return Err(Some(format!("attestation of {}, which is not a member", a.peer)));
                }
                if a.cluster != self.cfg.cluster {
                    return Err(Some(format!("attestation for cluster {:?}, not {:?}", a.cluster, self.cfg.cluster)));
                }
                a.verify().map_err(|e| Some(e.to_string()))?;
                self.note_attestation(now, &a);
                if a.peer == self.me {
                    return Ok(None);
                }
                self.readiness.on_attestation(a.peer, a.version_vector, a.state_root);
                if self.readiness.is_active() {
                    // Only this attestation is new: compare it alone rather than every peer's
                    // latest (members attest every `attest_interval`, so a full check per
                    // attestation would cost O(members) each, O(members²) per interval).
                    let (root, vv) = store.state_root();
                    if let Transition::Divergence { peer } = self.readiness.check_peer(&a.peer, &vv, root) {
                        self.start_repair(now, peer, root);
                    }
                } else {
                    self.check_ready(now, store);
                }
                return Ok(None);
            }
        };
        let origin = batch.head.origin;
        if origin == self.me {
            // Our own ops relayed back: nothing to apply, nothing wrong.
            return batch.head.verify().map(|_| None).map_err(|e| Some(e.to_string()));
        }
        if self.gated() {
            self.check_origin(&origin, now).or_else(|e| self.within_revocation(&batch, e)).map_err(Some)?;
        } else if let Some((known_role, cluster)) = self.peers.get(&origin).and_then(|p| p.meta.clone()) {
            if cluster != self.cfg.cluster {
                return Err(Some(format!(
                    "origin {origin} belongs to cluster {cluster:?}, not {:?}",
                    self.cfg.cluster
                )));
            }
            if known_role != Role::Primary {
                return Err(Some(format!("origin {origin} is a {known_role}; only primaries originate ops")));
            }
        }
        if role != Role::Primary && !self.gated() {
            return Err(Some(format!("the message says its origin is a {role}; only primaries originate ops")));
        }
        if self.apply.tickets.len() >= self.cfg.max_applying {
            // Overloaded: neither accept nor punish; the ops come back through replay.
            return Err(None);
        }
        match self.offer(batch, For::Gossip { id, origin }, store).map_err(Some)? {
            Offered::Queued(t) => Ok(Some(t)),
            Offered::Done => Ok(None),
        }
    }

    /// Batches a pull brought. `Ok(true)` when the last of them were queued (the pull ends when
    /// they are applied), `Ok(false)` when there is nothing to wait for.
    pub(super) fn offer_pulled(
        &mut self,
        peer: PeerId,
        origin: Origin,
        batches: Vec<OpBatch>,
        store: &dyn StoreView,
    ) -> Result<bool, String> {
        let ops: usize = batches.iter().map(|b| b.ops.len()).sum();
        self.count(Count::OpsReplayed, ops as u64);
        if self.gated() {
            if let Err(e) = self.check_origin(&origin, self.last_now) {
                for b in &batches {
                    self.within_revocation(b, e.clone())?;
                }
            }
        }
        // Contiguous batches go out in one apply; the last group's ticket carries the pull.
        let mut group: Vec<OpBatch> = Vec::new();
        for batch in batches {
            if batch.head.origin != origin {
                return Err(format!("peer {peer} answered a pull of {origin} with ops of another origin"));
            }
            check_shape(&batch)?;
            let continues = group.last().is_some_and(|last| last.head.seq == batch.after);
            if !group.is_empty() && !continues {
                let g = std::mem::take(&mut group);
                self.offer_group(g, For::Released { origin }, store)?;
            }
            group.push(batch);
        }
        self.offer_group(group, For::Pull { peer, origin }, store)
    }

    /// Offers contiguous batches: those already applied are skipped; the rest are queued as one
    /// apply when they continue the log, buffered otherwise. `Ok(true)`: queued under `what`.
    fn offer_group(&mut self, batches: Vec<OpBatch>, what: For, store: &dyn StoreView) -> Result<bool, String> {
        let Some(origin) = batches.first().map(|b| b.head.origin) else { return Ok(false) };
        let cursor = self.apply.cursor(&origin, store);
        let fresh: Vec<OpBatch> = batches.into_iter().filter(|b| b.head.seq > cursor.seq).collect();
        let Some(first) = fresh.first() else { return Ok(false) };
        if first.after > cursor.seq {
            // Ahead of a gap: buffer them all, each checked on its own.
            for b in fresh {
                self.buffer(b, cursor.seq)?;
            }
            return Ok(false);
        }
        let prev = (first.after == cursor.seq).then_some(cursor.chain);
        self.queue_apply(origin, fresh, prev, what);
        self.release(origin, store);
        Ok(true)
    }

    /// Queues a batch for apply, or buffers it behind a gap.
    fn offer(&mut self, batch: OpBatch, what: For, store: &dyn StoreView) -> Result<Offered, String> {
        check_shape(&batch)?;
        let origin = batch.head.origin;
        let cursor = self.apply.cursor(&origin, store);
        if batch.head.seq <= cursor.seq {
            // Already applied or queued; still check it is authentic before saying so.
            batch.head.verify().map_err(|e| e.to_string())?;
            return Ok(Offered::Done);
        }
        if batch.after > cursor.seq {
            self.buffer(batch, cursor.seq)?;
            return Ok(Offered::Done);
        }
        let prev = (batch.after == cursor.seq).then_some(cursor.chain);
        let ticket = self.queue_apply(origin, vec![batch], prev, what);
        self.release(origin, store);
        Ok(Offered::Queued(ticket))
    }

    fn buffer(&mut self, batch: OpBatch, have: Seq) -> Result<(), String> {
        batch.head.verify().map_err(|e| e.to_string())?;
        let origin = batch.head.origin;
        tracing::debug!(%origin, %have, after = %batch.after, "buffered a batch behind a gap");
        if self.apply.gaps.insert(batch) == Admit::Overflow {
            tracing::warn!(%origin, %have, "gap buffer full; dropping a batch that will be repaired by replay");
            self.count(Count::GapOverflow, 1);
        }
        Ok(())
    }

    fn queue_apply(
        &mut self,
        origin: Origin,
        batches: Vec<OpBatch>,
        prev: Option<crate::op::ChainHash>,
        what: For,
    ) -> Ticket {
        self.apply.next_ticket += 1;
        let ticket = Ticket(self.apply.next_ticket);
        let last = batches.last().expect("an apply has batches");
        self.apply.cursors.insert(origin, OriginProgress { seq: last.head.seq, chain: last.head.head });
        self.apply.tickets.insert(ticket, what);
        self.push(Action::Apply { ticket, origin, batches, prev });
        ticket
    }

    /// Releases what waited behind a gap the queued batches closed.
    fn release(&mut self, origin: Origin, store: &dyn StoreView) {
        loop {
            let cursor = self.apply.cursor(&origin, store);
            let ready = self.apply.gaps.take_ready(&origin, cursor.seq);
            if ready.is_empty() {
                return;
            }
            for batch in ready {
                let cursor = self.apply.cursor(&origin, store);
                if batch.head.seq <= cursor.seq {
                    continue;
                }
                let prev = (batch.after == cursor.seq).then_some(cursor.chain);
                self.queue_apply(origin, vec![batch], prev, For::Released { origin });
            }
        }
    }

    pub(super) fn on_applied(
        &mut self,
        now: Instant,
        ticket: super::Ticket,
        result: Result<(), String>,
        store: &dyn StoreView,
    ) {
        let Some(what) = self.apply.tickets.remove(&ticket) else { return };
        if let Err(reason) = &result {
            // Forget the optimistic cursor: the next batch is judged against what is committed.
            let (For::Gossip { origin, .. } | For::Pull { origin, .. } | For::Released { origin }) = &what;
            self.apply.forget(origin);
            match &what {
                For::Gossip { .. } => {}
                For::Pull { peer, origin } => {
                    tracing::warn!(%peer, %origin, %reason, "rejected replayed ops");
                    self.count(Count::ReplayRejected, 1);
                    self.strike(now, *peer, "rejected replay", 1);
                }
                For::Released { origin } => {
                    tracing::warn!(%origin, %reason, "dropped batches that failed verification; replay fills the hole")
                }
            }
        }
        match what {
            For::Gossip { id, .. } => {
                let verdict = match &result {
                    Ok(()) => Verdict::Accept,
                    Err(reason) => {
                        tracing::warn!(%reason, "rejected a gossip message");
                        self.count(Count::GossipRejected, 1);
                        Verdict::Reject
                    }
                };
                self.push(Action::Verdict { id, verdict });
            }
            For::Pull { peer, origin } => {
                match result {
                    Ok(()) => self.planner.answered(&peer, &origin),
                    Err(_) => self.planner.failed(&peer, &origin, now),
                }
                self.plan_pulls(now, store);
            }
            For::Released { .. } => {}
        }
    }
}

impl Engine {
    /// A revoked origin's ops up to its revocation's seq are still taken (they were accepted before
    /// it was revoked); later ones are refused with `refusal`.
    fn within_revocation(&self, batch: &OpBatch, refusal: String) -> Result<(), String> {
        match self.revoked_after(&batch.head.origin) {
            Some(last) if batch.head.seq <= last => Ok(()),
            Some(last) => Err(format!("origin {} was revoked after seq {last}", batch.head.origin)),
            None => Err(refusal),
        }
    }

    /// Membership mode: only origins certified as primaries originate ops.
    fn check_origin(&self, origin: &crate::ids::Origin, now: Instant) -> Result<(), String> {
        match self.certified_role(origin, now) {
            Some(Role::Primary) => Ok(()),
            Some(role) => Err(format!("origin {origin} is certified as a {role}; only primaries originate ops")),
            None => Err(format!("origin {origin} is not a certified member of this cluster")),
        }
    }
}

/// Checks the size and seq range of a batch before anything else looks at it. `after` is not
/// covered by the signature, so it is checked against the signed head without underflow.
fn check_shape(batch: &OpBatch) -> Result<(), String> {
    if batch.ops.is_empty() || batch.ops.len() > MAX_BATCH_OPS {
        return Err(format!("batch of {} ops (1 to {MAX_BATCH_OPS} allowed)", batch.ops.len()));
    }
    if batch.head.seq.0 == u64::MAX {
        return Err("batch ends at the last possible seq; no op may come after it".into());
    }
    let span = batch.head.seq.0.checked_sub(batch.after.0);
    if span != Some(batch.ops.len() as u64) {
        return Err(format!(
            "batch of {} ops says it runs from after seq {} to seq {}",
            batch.ops.len(),
            batch.after,
            batch.head.seq
        ));
    }
    Ok(())
}
