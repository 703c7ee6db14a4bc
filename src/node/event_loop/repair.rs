//! Divergence repair: two nodes at the same version vector with different state roots compare
//! their 4096 bucket hashes and exchange only the entries of the buckets that differ, merging them
//! with the CRDT joins. Each side repairs from the other, so both end with the join of the two.

use std::time::{Duration, Instant};

use libp2p::PeerId;

use super::requests::MAX_REPAIR_BUCKETS;
use super::{Command, EventLoop};
use crate::net::SyncRequest;
use crate::snapshot::StateEntry;

/// What a repair request was for.
pub(super) enum RepairRequest {
    Buckets,
    Entries,
}

/// A repair that started this long ago without finishing may be started again.
const REPAIR_TIMEOUT: Duration = Duration::from_secs(30);

impl EventLoop {
    /// Starts a repair against `peer` unless one is under way.
    pub(super) fn start_repair(&mut self, peer: PeerId) {
        if self.repair.is_some_and(|(_, since)| since.elapsed() < REPAIR_TIMEOUT) {
            return;
        }
        self.metrics.divergences.inc();
        tracing::warn!(%peer, "same version vector, different state root: comparing buckets");
        self.repair = Some((peer, Instant::now()));
        let id = self.swarm.behaviour_mut().sync.send_request(&peer, SyncRequest::GetBuckets);
        self.repair_requests.insert(id, RepairRequest::Buckets);
    }

    pub(super) fn on_buckets(&mut self, peer: PeerId, theirs: Vec<u8>) {
        let mine = self.store.bucket_hashes();
        if theirs.len() != mine.len() * 32 {
            tracing::warn!(%peer, len = theirs.len(), "peer sent a malformed bucket list");
            self.repair = None;
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
            self.repair = None;
            return;
        }
        for part in differing.chunks(MAX_REPAIR_BUCKETS) {
            let id =
                self.swarm.behaviour_mut().sync.send_request(&peer, SyncRequest::GetEntries { buckets: part.to_vec() });
            self.repair_requests.insert(id, RepairRequest::Entries);
        }
    }

    pub(super) fn on_entries(&mut self, peer: PeerId, encoded: Vec<serde_bytes::ByteBuf>) {
        let entries: Result<Vec<StateEntry>, _> = encoded.iter().map(|b| postcard::from_bytes(b)).collect();
        let Ok(entries) = entries else {
            tracing::warn!(%peer, "peer sent undecodable state entries; repair abandoned");
            self.repair = None;
            return;
        };
        let writer = self.writer.clone();
        let commands = self.commands_tx.clone();
        tokio::spawn(async move {
            let n = entries.len();
            match writer.merge_entries(entries).await {
                Ok(outcome) => tracing::info!(%peer, entries = n, changed = outcome.changed, "merged a peer's entries"),
                Err(e) => tracing::warn!(%peer, error = %e, "merging a peer's entries failed"),
            }
            let _ = commands.send(Command::RepairDone).await;
        });
    }
}
