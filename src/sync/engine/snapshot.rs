//! Snapshot transfer: deciding to pull one (see `sync::choose_snapshot`), fetching its manifest and
//! chunks from several sources (see `sync::SnapshotPull`), and sequencing its install. Chunk checks
//! and persistence are the executor's part of [`Action::Stage`].

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Instant;

use cid::Cid;
use libp2p::PeerId;

use super::{Action, ChunkVerdict, Count, Engine, Pending, ProviderKey, StoreView};
use crate::snapshot::{Manifest, SignedManifest};
use crate::store::VersionVector;
use crate::sync::{choose_snapshot, Offer, SnapshotChoice, SnapshotPull, SnapshotReason, SnapshotRetry};
use crate::wire::SyncRequest;

/// A pull that has not moved for this many request timeouts is given up: an optional one for
/// replay, a needed one until its retry pause ends (then the choice is made again, and replay
/// may be possible by then), so sources that serve only corrupt chunks, or none, cannot hold a
/// node forever.
const PULL_STALL: u32 = 3;
/// Snapshots given up on and remembered, at most.
const MAX_DECLINED: usize = 64;

/// A snapshot being pulled.
#[derive(Debug)]
pub(super) struct ActivePull {
    pub cid: Cid,
    /// Peers offering it; the manifest is asked of them in turn.
    pub offered_by: Vec<PeerId>,
    pub manifest: Option<SignedManifest>,
    /// The manifest's content, once verified.
    pub decoded: Option<Arc<Manifest>>,
    pub pull: Option<SnapshotPull>,
    /// Chunk bytes staged since the last durable staging commit.
    pub undurable_bytes: u64,
    pub installing: bool,
    pub started: Instant,
    /// The version vector the snapshot was made at, once known: replay meanwhile leaves it alone.
    pub covers: Option<VersionVector>,
    /// Chosen because it is cheaper than replay, which could do without it: given up (and not
    /// chosen that way again) when it fails or stalls, so a peer advertising a snapshot it does not
    /// serve cannot hold replay back.
    pub optional: bool,
    /// When the pull last moved (started, manifest verified, chunk stored).
    pub progressed_at: Instant,
}

#[derive(Debug, Default)]
pub(super) struct Snapshots {
    pub active: Option<ActivePull>,
    /// Optional snapshots given up on: not weighed against replay again. Bounded.
    declined: BTreeSet<Cid>,
    /// Needed snapshots whose pull failed, and when they may be tried again.
    retry: SnapshotRetry,
}

impl Snapshots {
    pub fn covers(&self) -> Option<&VersionVector> {
        self.active.as_ref().and_then(|a| a.covers.as_ref())
    }

    pub fn is_pulling(&self) -> bool {
        self.active.is_some()
    }
}

impl Engine {
    /// Starts a snapshot pull when replay cannot bring this node up to date, or costs more.
    pub(super) fn maybe_start_snapshot(&mut self, now: Instant, store: &dyn StoreView) {
        if self.snapshot.active.is_some() {
            return;
        }
        let offers: Vec<Offer> = self
            .peers
            .cluster(&self.cfg.cluster)
            .filter_map(|(id, p)| {
                let d = p.digest.as_ref()?;
                // A peer whose replay just failed (it may be lying) does not count as able to
                // replay, or it could keep this node from ever taking the snapshot path.
                let log_floors =
                    if self.planner.is_backing_off(id, now) { d.version_vector.clone() } else { d.log_floors.clone() };
                Some(Offer {
                    peer: *id,
                    version_vector: d.version_vector.clone(),
                    log_floors,
                    snapshots: d.snapshots.clone(),
                    latest: d
                        .snapshot_brief
                        .clone()
                        .filter(|_| d.snapshots.first().is_some_and(|c| !self.snapshot.declined.contains(c))),
                })
            })
            .collect();
        let have = store.version_vector();
        let Some(SnapshotChoice { cid, peers: offered_by, reason, covers }) =
            choose_snapshot(&have, &offers, self.cfg.snapshot_min_saving)
        else {
            return;
        };
        if !self.snapshot.retry.allows(&cid, now) {
            return;
        }
        match reason {
            SnapshotReason::BelowFloors => tracing::info!(%cid, sources = offered_by.len(),
                "ops needed are below every source's log floor; pulling a snapshot"),
            SnapshotReason::Cheaper { saves_ops, entries } => tracing::info!(%cid, sources = offered_by.len(),
                saves_ops, entries, "a snapshot spares more replay than installing it costs; pulling it"),
        }
        self.snapshot.active = Some(ActivePull {
            cid,
            offered_by,
            covers,
            optional: matches!(reason, SnapshotReason::Cheaper { .. }),
            progressed_at: now,
            manifest: None,
            decoded: None,
            pull: None,
            undurable_bytes: 0,
            installing: false,
            started: now,
        });
        self.push(Action::FindProviders { key: ProviderKey::Snapshot(cid) });
        self.request_manifest(now);
    }

    fn request_manifest(&mut self, now: Instant) {
        let Some(active) = &self.snapshot.active else { return };
        let Some(peer) = active.offered_by.first().copied() else {
            tracing::warn!(cid = %active.cid, "no source left for the snapshot's manifest; will decide again");
            self.give_up_snapshot(now);
            return;
        };
        let cid = active.cid;
        self.send(now, peer, SyncRequest::GetManifest { cid }, Pending::Manifest { peer });
    }

    pub(super) fn on_manifest_failed(&mut self, now: Instant, peer: PeerId) {
        if let Some(active) = &mut self.snapshot.active {
            active.offered_by.retain(|p| *p != peer);
        }
        self.request_manifest(now);
    }

    pub(super) fn on_manifest(&mut self, now: Instant, peer: PeerId, bytes: Vec<u8>, store: &dyn StoreView) {
        let Some((cid, optional)) = self.snapshot.active.as_ref().map(|a| (a.cid, a.optional)) else { return };
        let checked = SignedManifest::decode(&bytes).map_err(|e| e.to_string()).and_then(|signed| {
            let manifest = signed.verify().map_err(|e| e.to_string())?;
            if signed.cid() != cid {
                return Err(format!("manifest hashes to {}, not the CID asked for", signed.cid()));
            }
            if manifest.cluster != self.cfg.cluster {
                return Err(format!("manifest is for cluster {:?}", manifest.cluster));
            }
            if self.gated() {
                self.check_manifest_creator(&manifest, now)?;
            }
            Ok((signed, manifest))
        });
        match checked {
            Ok((_, manifest)) if optional && !self.is_primary_of_cluster(&manifest.creator) => {
                // Replay can do without it, so a snapshot is only taken on the word of a primary (its
                // entries are not checked against ops, only against its creator's signed root).
                tracing::info!(%cid, creator = %manifest.creator,
                    "not taking a snapshot made by a peer not known as a primary; replaying instead");
                self.give_up_snapshot(now);
                self.plan_pulls(now, store);
            }
            Ok((signed, manifest)) => {
                let chunks = manifest.chunks.iter().map(|c| (c.cid, c.size)).collect();
                let mut pull = SnapshotPull::new(
                    chunks,
                    |cid| store.has_chunk(cid),
                    self.cfg.chunks_per_source,
                    self.cfg.request_timeout,
                );
                let Some(active) = &mut self.snapshot.active else { return };
                for p in &active.offered_by {
                    pull.add_source(*p, self.peers.get(p).and_then(|i| i.rtt));
                }
                let progress = pull.progress(now);
                tracing::info!(%cid, chunks = progress.chunks_total, have = progress.chunks_have,
                    bytes = progress.bytes_total, "snapshot manifest verified");
                active.covers = Some(manifest.version_vector.clone());
                active.progressed_at = now;
                active.manifest = Some(signed);
                // Chunks of an earlier pull that was given up are of no use now.
                let keep: Vec<Cid> = manifest.chunks.iter().map(|c| c.cid).collect();
                active.decoded = Some(Arc::new(manifest));
                active.pull = Some(pull);
                self.push(Action::CollectChunks { keep });
                self.drive_snapshot(now, store);
            }
            Err(reason) => {
                tracing::warn!(%peer, %reason, "rejected a snapshot manifest");
                self.count(Count::ChunkRejected, 1);
                self.on_manifest_failed(now, peer);
            }
        }
    }

    /// Sends the chunk requests the pull asks for, and installs once every chunk is held.
    pub(super) fn drive_snapshot(&mut self, now: Instant, store: &dyn StoreView) {
        let Some(active) = &mut self.snapshot.active else { return };
        let stall = self.cfg.request_timeout * PULL_STALL;
        if !active.installing && now.duration_since(active.progressed_at) >= stall {
            tracing::warn!(cid = %active.cid, optional = active.optional, "the snapshot pull is not progressing; giving it up");
            self.give_up_snapshot(now);
            self.plan_pulls(now, store);
            return;
        }
        let Some(pull) = &mut active.pull else { return };
        if pull.is_complete() {
            if !active.installing {
                active.installing = true;
                tracing::info!(cid = %active.cid, secs = now.duration_since(active.started).as_secs_f64(),
                    "every snapshot chunk is staged; installing");
                let manifest = active.manifest.clone().expect("a pull has its manifest");
                self.push(Action::Install { manifest });
            }
            return;
        }
        let requests = pull.next_requests(now);
        for r in requests {
            self.send(
                now,
                r.peer,
                SyncRequest::GetChunk { cid: r.cid },
                Pending::Chunk { peer: r.peer, index: r.index, cid: r.cid },
            );
        }
    }

    pub(super) fn on_chunk(&mut self, peer: PeerId, index: usize, cid: Cid, bytes: Vec<u8>) {
        let Some(active) = &mut self.snapshot.active else { return };
        let Some(manifest) = active.decoded.clone() else { return };
        let Some(chunk) = manifest.chunks.get(index).filter(|c| c.cid == cid).cloned() else { return };
        // A crash loses the staging commits since the last durable one: one in every twentieth of the
        // snapshot's bytes bounds what a restarted pull fetches again to about 5 %.
        active.undurable_bytes += bytes.len() as u64;
        let durable = active.undurable_bytes >= manifest.compressed_bytes() / 20;
        if durable {
            active.undurable_bytes = 0;
        }
        let snapshot = active.cid;
        self.push(Action::Stage { peer, snapshot, index, chunk, bytes, durable });
    }

    pub(super) fn on_chunk_failed(&mut self, now: Instant, peer: PeerId, index: usize, store: &dyn StoreView) {
        if let Some(pull) = self.snapshot.active.as_mut().and_then(|a| a.pull.as_mut()) {
            pull.on_failure(&peer, index, now);
        }
        self.drive_snapshot(now, store);
    }

    pub(super) fn on_staged(
        &mut self,
        now: Instant,
        peer: PeerId,
        index: usize,
        len: u64,
        verdict: ChunkVerdict,
        store: &dyn StoreView,
    ) {
        if verdict == ChunkVerdict::Corrupt {
            tracing::warn!(%peer, index, "a source served a corrupt snapshot chunk; dropping it for a while");
            self.count(Count::ChunkRejected, 1);
            self.strike(now, peer, "corrupt chunk", 1);
        }
        let Some(active) = self.snapshot.active.as_mut() else { return };
        if verdict == ChunkVerdict::Stored {
            active.progressed_at = now;
        }
        let Some(pull) = active.pull.as_mut() else { return };
        match verdict {
            ChunkVerdict::Stored => pull.on_chunk(&peer, index, len),
            ChunkVerdict::Corrupt => pull.on_corrupt(&peer, index, len, now),
            ChunkVerdict::LocalError => pull.on_local_failure(&peer, index, now),
        }
        self.drive_snapshot(now, store);
    }

    pub(super) fn on_installed(&mut self, now: Instant, result: Result<(), String>, store: &dyn StoreView) {
        let Some(active) = self.snapshot.active.take() else { return };
        match result {
            Ok(()) => {
                let fetched = active.pull.as_ref().map(|p| p.progress(now).bytes_fetched).unwrap_or(0);
                tracing::info!(cid = %active.cid, fetched_bytes = fetched,
                    secs = now.duration_since(active.started).as_secs_f64(),
                    "snapshot installed; replaying from its version vector");
                self.count(Count::SnapshotInstalled, 1);
                self.snapshot.retry.succeeded(&active.cid);
                self.refresh_holdings(store);
                self.push(Action::Provide { key: ProviderKey::Snapshot(active.cid) });
                self.plan_pulls(now, store);
                self.check_ready(now, store);
            }
            Err(reason) => {
                tracing::warn!(cid = %active.cid, %reason, "installing the snapshot failed; will decide again");
                self.snapshot.active = Some(active);
                self.give_up_snapshot(now);
            }
        }
    }

    /// Drops the pull in progress. One that was only chosen as cheaper than replay is not chosen
    /// that way again; a snapshot that is needed is tried again after a pause (`SnapshotRetry`).
    fn give_up_snapshot(&mut self, now: Instant) {
        let Some(active) = self.snapshot.active.take() else { return };
        if active.optional {
            if self.snapshot.declined.len() >= MAX_DECLINED {
                self.snapshot.declined.clear();
            }
            self.snapshot.declined.insert(active.cid);
        } else {
            self.snapshot.retry.failed(active.cid, now);
        }
    }

    /// A source of the snapshot being pulled is gone.
    pub(super) fn snapshot_source_gone(&mut self, peer: &PeerId) {
        if let Some(pull) = self.snapshot.active.as_mut().and_then(|a| a.pull.as_mut()) {
            pull.remove_source(peer);
        }
    }

    /// A Kademlia lookup found providers of the snapshot being pulled.
    pub(super) fn on_snapshot_providers(&mut self, cid: &Cid, providers: Vec<PeerId>) {
        let me = self.me;
        let Some(active) = &mut self.snapshot.active else { return };
        if active.cid != *cid {
            return;
        }
        let mut dial = Vec::new();
        for peer in providers.into_iter().filter(|p| *p != me) {
            if !active.offered_by.contains(&peer) {
                active.offered_by.push(peer);
            }
            let rtt = self.peers.get(&peer).and_then(|i| i.rtt);
            if let Some(pull) = &mut active.pull {
                pull.add_source(peer, rtt);
            }
            if !self.peers.is_connected(&peer) {
                dial.push(peer);
            }
        }
        for peer in dial {
            self.push(Action::Dial { peer: Some(peer), addr: None });
        }
    }
}
