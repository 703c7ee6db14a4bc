//! Divergence repair: two nodes at the same version vector with different state roots compare
//! their bucket hashes and exchange only the entries of the buckets that differ, merging them with
//! the CRDT joins. Each side repairs from the other, so both end with the join of the two.

use std::time::{Duration, Instant};

use libp2p::PeerId;

use super::{Action, Count, Engine, Pending, StoreView};
use crate::snapshot::StateEntry;
use crate::sync::serve::MAX_REPAIR_BUCKETS;
use crate::wire::SyncRequest;

/// A repair that started this long ago without finishing may be started again.
const REPAIR_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Default)]
pub(super) struct Repair {
    /// The repair under way: with whom, since when, and entry answers still awaited.
    under_way: Option<(PeerId, Instant, usize)>,
}

impl Repair {
    pub fn failed(&mut self) {
        self.under_way = None;
    }

    /// One answer's entries were merged. A merge while no entries are awaited (the bucket list
    /// is still out, or it belongs to a repair given up) changes nothing: ending the repair then
    /// would start another at once, one more request out per stray merge (found by the engine
    /// fuzz target).
    pub fn merged(&mut self) {
        if let Some((_, _, left)) = &mut self.under_way {
            if *left > 0 {
                *left -= 1;
                if *left == 0 {
                    self.under_way = None;
                }
            }
        }
    }
}

impl Engine {
    /// Starts a repair against `peer` unless one is under way.
    pub(super) fn start_repair(&mut self, now: Instant, peer: PeerId, _store: &dyn StoreView) {
        if self.repair.under_way.is_some_and(|(_, since, _)| now.duration_since(since) < REPAIR_TIMEOUT) {
            return;
        }
        self.count(Count::Divergence, 1);
        tracing::warn!(%peer, "same version vector, different state root: comparing buckets");
        self.repair.under_way = Some((peer, now, 0));
        self.send(now, peer, SyncRequest::GetBuckets, Pending::Buckets { peer });
    }

    pub(super) fn on_buckets(&mut self, now: Instant, peer: PeerId, theirs: Vec<u8>, store: &dyn StoreView) {
        let mine = store.bucket_hashes();
        if theirs.len() != mine.len() * 32 {
            tracing::warn!(%peer, len = theirs.len(), "peer sent a malformed bucket list");
            self.repair.failed();
            return;
        }
        let differing: Vec<u32> = mine
            .iter()
            .zip(theirs.chunks(32))
            .enumerate()
            .filter(|(_, (m, t))| m.as_slice() != *t)
            .map(|(i, _)| i as u32)
            .collect();
        tracing::info!(%peer, buckets = differing.len(), "buckets differ");
        if differing.is_empty() {
            self.repair.failed();
            return;
        }
        let parts: Vec<Vec<u32>> = differing.chunks(MAX_REPAIR_BUCKETS).map(<[u32]>::to_vec).collect();
        if let Some((_, _, left)) = &mut self.repair.under_way {
            *left = parts.len();
        }
        for buckets in parts {
            self.send(now, peer, SyncRequest::GetEntries { buckets }, Pending::Entries { peer });
        }
    }

    pub(super) fn on_entries(&mut self, peer: PeerId, encoded: Vec<serde_bytes::ByteBuf>) {
        let entries: Result<Vec<StateEntry>, _> = encoded.iter().map(|b| postcard::from_bytes(b)).collect();
        let Ok(entries) = entries else {
            tracing::warn!(%peer, "peer sent undecodable state entries; repair abandoned");
            self.repair.failed();
            return;
        };
        self.push(Action::Merge { peer, entries });
    }
}
