//! When register tombstones may be collected: the cluster's stable horizon.
//!
//! A tombstone exists so that an older write of its key, arriving later, loses to it. It can go once
//! no such write can arrive any more. Every active node repeats its attestation every
//! `attest_interval`: its version vector and its HLC `clock`, read before the vector, so every op it
//! writes after the attestation is stamped after `clock`. From the latest attestation of each
//! member, a node takes:
//! - `S`, the pointwise minimum of the members' vectors (its own included): ops every member holds;
//! - `H`, the minimum of the members' clocks (its own included).
//!
//! When every member `m`'s own ops up to its attestation are in `S` (`S[m] >= vv_m[m]`), every op
//! any member wrote up to `H` is held by every member, and every op any member writes later is
//! stamped after `H`. So a tombstone stamped at or before `H` can lose no more writes: it is
//! collected (`Action::CollectTombstones`).
//!
//! Who counts as a member: every peer this node knows of (connected, remembered, certified, an
//! attestation heard, or an origin in a vector). A member whose latest attestation is older than
//! `tombstone_horizon` (or who has sent none since this node started that long ago) is away: it no
//! longer holds collection back. If it comes back, its stale copies of collected deletes are not
//! merged back (see `Store::collect_tombstones`), and it catches up from the log or a snapshot like
//! any node that was away. Until this node has run for `tombstone_horizon`, a known member it has
//! not heard from holds collection back: after a restart nothing is assumed about peers.
//!
//! Tombstones are not part of the state root, so nodes that collect at different moments keep equal
//! roots.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use libp2p::PeerId;

use super::{Action, Engine, StoreView};
use crate::crdt::Hlc;
use crate::ids::{Origin, Seq, StateRoot};
use crate::store::VersionVector;
use crate::wire::{encode_gossip, Attestation, Attested, GossipMessage};

/// A peer's latest verified attestation, and when it came (wall ms).
#[derive(Debug, Clone)]
pub(super) struct Heard {
    pub vv: VersionVector,
    pub root: StateRoot,
    pub clock: Hlc,
    pub at_ms: u64,
}

/// Why collection is held back now (for the status and the logs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Holdback {
    /// A member known to this node has not attested since it started.
    NotHeard(PeerId),
    /// A member's own ops up to its attestation are not yet held by every member.
    NotSpread { origin: Origin, held: Seq, written: Seq },
}

impl Engine {
    /// Signs and publishes this node's attestation: clock first, then the vector and root.
    pub(super) fn attest(&mut self, now: Instant, store: &dyn StoreView) {
        let clock = store.clock();
        let (root, vv) = store.state_root();
        let what = Attested { version_vector: vv, state_root: root, clock };
        let attestation = Attestation::sign(&self.signer, &self.cfg.cluster, what);
        self.push(Action::Publish { data: encode_gossip(&GossipMessage::Attestation(attestation)) });
        self.next_attest = now + self.cfg.attest_interval;
    }

    /// On every tick: repeats the attestation when due, and asks for collection when the stable
    /// horizon moved past what was collected.
    pub(super) fn tombstone_round(&mut self, now: Instant, store: &dyn StoreView) {
        if !self.readiness.is_active() || now < self.next_attest {
            return;
        }
        self.attest(now, store);
        match self.stable_horizon(now, store) {
            Ok(through) => {
                let collected = store.tombstones_collected().max(self.collect_asked);
                if through > collected {
                    tracing::debug!(%through, "tombstones stamped up to here can no longer lose a write");
                    self.collect_asked = through;
                    self.push(Action::CollectTombstones { through });
                }
                self.holdback = None;
            }
            Err(why) => {
                if self.holdback.as_ref() != Some(&why) {
                    tracing::debug!(?why, "tombstone collection held back");
                }
                self.holdback = Some(why);
            }
        }
    }

    /// Why tombstone collection is held back now, if it is (for the status).
    pub fn tombstone_holdback(&self) -> Option<String> {
        self.holdback.as_ref().map(|h| match h {
            Holdback::NotHeard(peer) => format!("{peer} has not attested since this node started"),
            Holdback::NotSpread { origin, held, written } => {
                format!("ops of {origin} up to {written} are not held by every member yet (all hold {held})")
            }
        })
    }

    /// The stamp up to which tombstones can be collected (see the module's documentation).
    pub(super) fn stable_horizon(&self, now: Instant, store: &dyn StoreView) -> Result<Hlc, Holdback> {
        let wall = self.wall_ms(now);
        let horizon_ms = self.cfg.tombstone_horizon.as_millis() as u64;
        let up_long_enough = now.saturating_duration_since(self.started) >= self.cfg.tombstone_horizon;
        // This node's own clock is read before its vector, as in its attestations.
        let my_clock = store.clock();
        let my_vv = store.version_vector();

        let mut known: BTreeSet<PeerId> = BTreeSet::new();
        known.extend(self.attestations.keys().copied());
        known.extend(self.peers.cluster(&self.cfg.cluster).map(|(p, _)| *p));
        known.extend(self.cfg.remembered.iter().map(|(_, p)| *p));
        known.extend(self.members.keys().copied());
        known.extend(my_vv.0.keys().copied());
        for heard in self.attestations.values() {
            known.extend(heard.vv.0.keys().copied());
        }
        known.remove(&self.me);
        for r in self.revoked.keys() {
            known.remove(r);
        }

        let mut counted: Vec<(&Origin, &VersionVector, Hlc)> = vec![(&self.me, &my_vv, my_clock)];
        for peer in &known {
            match self.attestations.get(peer) {
                Some(h) if wall.saturating_sub(h.at_ms) <= horizon_ms => counted.push((peer, &h.vv, h.clock)),
                // Heard from too long ago: away.
                Some(_) => {}
                None if up_long_enough => {}
                None => return Err(Holdback::NotHeard(*peer)),
            }
        }

        let mut stable: BTreeMap<Origin, Seq> = BTreeMap::new();
        let origins: BTreeSet<Origin> = counted.iter().flat_map(|(_, vv, _)| vv.0.keys().copied()).collect();
        for origin in origins {
            let low = counted.iter().map(|(_, vv, _)| vv.get(&origin)).min().unwrap_or(Seq(0));
            stable.insert(origin, low);
        }
        for (member, vv, _) in &counted {
            let written = vv.get(member);
            let held = stable.get(*member).copied().unwrap_or(Seq(0));
            if held < written {
                return Err(Holdback::NotSpread { origin: **member, held, written });
            }
        }
        Ok(counted.iter().map(|(_, _, clock)| *clock).min().unwrap_or(my_clock))
    }
}
