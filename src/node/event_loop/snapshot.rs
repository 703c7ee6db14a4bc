//! The event loop's side of snapshot transfer: deciding to pull one, fetching its manifest and
//! chunks from several sources, and installing it. The decisions come from `sync::choose_snapshot`
//! and `sync::SnapshotPull`; this file only carries them out. Chunk verification and persistence run
//! on blocking threads and report back as commands.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use cid::Cid;
use libp2p::kad::RecordKey;
use libp2p::request_response::OutboundRequestId;
use libp2p::PeerId;
use serde::Serialize;

use super::{Command, EventLoop};
use crate::ids::Role;
use crate::net::SyncRequest;
use crate::snapshot::{Manifest, SignedManifest};
use crate::store::StoreError;
use crate::store::VersionVector;
use crate::sync::{choose_snapshot, Offer, PullProgress, SnapshotChoice, SnapshotPull, SnapshotReason};

/// A snapshot being pulled.
pub(super) struct ActivePull {
    pub cid: Cid,
    /// Peers offering it; the manifest is asked of them in turn.
    pub offered_by: Vec<PeerId>,
    pub manifest: Option<SignedManifest>,
    /// The manifest's content, once verified: the chunk list staging needs.
    pub decoded: Option<Arc<Manifest>>,
    pub pull: Option<SnapshotPull>,
    /// Chunk bytes staged since the last durable staging commit.
    pub undurable_bytes: u64,
    pub installing: bool,
    pub started: Instant,
    /// The version vector the snapshot was made at, once known (from its sources' digests, then
    /// from its verified manifest): replay meanwhile leaves these ops to it.
    pub covers: Option<VersionVector>,
    /// Chosen because it is cheaper than replay, which could do without it: given up (and not
    /// chosen that way again) when it fails or stalls, so a peer advertising a snapshot it does not
    /// serve cannot hold replay back.
    pub optional: bool,
    /// When the pull last moved (started, manifest verified, chunk stored).
    pub progressed_at: Instant,
}

/// An optional pull that has not moved for this many request timeouts is given up for replay.
const OPTIONAL_PULL_STALL: u32 = 3;

/// What a snapshot request was for.
pub(super) enum SnapshotRequest {
    Manifest { peer: PeerId },
    Chunk { peer: PeerId, index: usize, cid: Cid },
}

/// What became of a received chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ChunkVerdict {
    /// It matched its CID and is persisted.
    Stored,
    /// It did not match its CID: the source lied or is broken.
    Corrupt,
    /// It could not be persisted here (storage error): not the source's fault.
    LocalError,
}

/// Snapshot progress for status: the snapshot's CID and how far its pull has come.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotStatus {
    pub cid: String,
    #[serde(flatten)]
    pub progress: PullProgress,
}

pub(super) fn snapshot_key(cid: &Cid) -> RecordKey {
    RecordKey::new(&cid.to_bytes())
}

impl EventLoop {
    /// Starts a snapshot pull when replay cannot bring this node up to date, or costs more (see
    /// `sync::choose_snapshot`).
    pub(super) fn maybe_start_snapshot(&mut self) {
        if self.snapshot.is_some() {
            return;
        }
        let now = Instant::now();
        let offers: Vec<Offer> = self
            .cluster_peers()
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
                    // A snapshot given up on is not weighed against replay again.
                    latest: d
                        .snapshot_brief
                        .clone()
                        .filter(|_| d.snapshots.first().is_some_and(|c| !self.declined_snapshots.contains(c))),
                })
            })
            .collect();
        let have = self.store.version_vector();
        let Some(SnapshotChoice { cid, peers: offered_by, reason, covers }) =
            choose_snapshot(&have, &offers, self.timings.snapshot_min_saving)
        else {
            return;
        };
        if !self.snapshot_retry.allows(&cid, now) {
            return;
        }
        match reason {
            SnapshotReason::BelowFloors => tracing::info!(%cid, sources = offered_by.len(),
                "ops needed are below every source's log floor; pulling a snapshot"),
            SnapshotReason::Cheaper { saves_ops, entries } => tracing::info!(%cid, sources = offered_by.len(),
                saves_ops, entries, "a snapshot spares more replay than installing it costs; pulling it"),
        }
        self.snapshot = Some(ActivePull {
            cid,
            offered_by,
            covers,
            optional: matches!(reason, SnapshotReason::Cheaper { .. }),
            progressed_at: Instant::now(),
            manifest: None,
            decoded: None,
            pull: None,
            undurable_bytes: 0,
            installing: false,
            started: Instant::now(),
        });
        self.swarm.behaviour_mut().kad.get_providers(snapshot_key(&cid));
        self.request_manifest();
    }

    fn request_manifest(&mut self) {
        let Some(active) = &mut self.snapshot else { return };
        let Some(peer) = active.offered_by.first().copied() else {
            tracing::warn!(cid = %active.cid, "no source left for the snapshot's manifest; will decide again");
            self.give_up_snapshot();
            return;
        };
        let cid = active.cid;
        let id = self.swarm.behaviour_mut().sync.send_request(&peer, SyncRequest::GetManifest { cid });
        self.snapshot_requests.insert(id, SnapshotRequest::Manifest { peer });
    }

    pub(super) fn on_manifest(&mut self, peer: PeerId, bytes: Vec<u8>) {
        let Some((cid, optional)) = self.snapshot.as_ref().map(|a| (a.cid, a.optional)) else { return };
        let checked = SignedManifest::decode(&bytes).map_err(|e| e.to_string()).and_then(|signed| {
            let manifest = signed.verify().map_err(|e| e.to_string())?;
            if signed.cid() != cid {
                return Err(format!("manifest hashes to {}, not the CID asked for", signed.cid()));
            }
            if manifest.cluster != self.cluster {
                return Err(format!("manifest is for cluster {:?}", manifest.cluster));
            }
            Ok((signed, manifest))
        });
        let untrusted = matches!(&checked, Ok((_, m)) if optional && !self.is_primary_of_cluster(&m.creator));
        let Some(active) = &mut self.snapshot else { return };
        match checked {
            Ok((_, manifest)) if untrusted => {
                // Replay can do without it, so a snapshot is only taken on the word of a primary (its
                // entries are not checked against ops, only against its creator's signed root).
                tracing::info!(cid = %active.cid, creator = %manifest.creator,
                    "not taking a snapshot made by a peer not known as a primary; replaying instead");
                self.give_up_snapshot();
                self.plan_pulls();
            }
            Ok((signed, manifest)) => {
                let store = self.store.clone();
                let chunks = manifest.chunks.iter().map(|c| (c.cid, c.size)).collect();
                let mut pull = SnapshotPull::new(
                    chunks,
                    |cid| store.has_chunk(cid).unwrap_or(false),
                    self.timings.chunks_per_source,
                    self.timings.request_timeout,
                );
                for p in &active.offered_by {
                    pull.add_source(*p, self.peers.get(p).and_then(|i| i.rtt));
                }
                let progress = pull.progress(Instant::now());
                tracing::info!(cid = %active.cid, chunks = progress.chunks_total, have = progress.chunks_have,
                    bytes = progress.bytes_total, "snapshot manifest verified");
                // Chunks of an earlier pull that was given up are of no use now.
                let keep: Vec<Cid> = manifest.chunks.iter().map(|c| c.cid).collect();
                let store = self.store.clone();
                tokio::task::spawn_blocking(move || match store.collect_chunks(&keep) {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(chunks = n, "deleted the chunks of abandoned snapshot pulls"),
                    Err(e) => tracing::warn!(error = %e, "could not delete unused snapshot chunks"),
                });
                active.covers = Some(manifest.version_vector.clone());
                active.progressed_at = Instant::now();
                active.manifest = Some(signed);
                active.decoded = Some(Arc::new(manifest));
                active.pull = Some(pull);
                self.drive_snapshot();
            }
            Err(reason) => {
                tracing::warn!(%peer, %reason, "rejected a snapshot manifest");
                self.metrics.chunks_rejected.inc();
                active.offered_by.retain(|p| *p != peer);
                self.request_manifest();
            }
        }
    }

    /// Sends the chunk requests the pull asks for, and installs once every chunk is held.
    pub(super) fn drive_snapshot(&mut self) {
        let Some(active) = &mut self.snapshot else { return };
        let stall = self.timings.request_timeout * OPTIONAL_PULL_STALL;
        if active.optional && !active.installing && active.progressed_at.elapsed() >= stall {
            tracing::warn!(cid = %active.cid, "the snapshot pull is not progressing; catching up by replay instead");
            self.give_up_snapshot();
            self.plan_pulls();
            return;
        }
        let Some(pull) = &mut active.pull else { return };
        if pull.is_complete() {
            if !active.installing {
                active.installing = true;
                tracing::info!(cid = %active.cid, secs = active.started.elapsed().as_secs_f64(),
                    "every snapshot chunk is staged; installing");
                let signed = active.manifest.clone().expect("a pull has its manifest");
                let writer = self.writer.clone();
                let commands = self.commands_tx.clone();
                tokio::spawn(async move {
                    let result = writer.install_snapshot(signed).await.map(|_| ()).map_err(|e| e.to_string());
                    let _ = commands.send(Command::SnapshotInstalled { result }).await;
                });
            }
            return;
        }
        for req in pull.next_requests(Instant::now()) {
            let id = self.swarm.behaviour_mut().sync.send_request(&req.peer, SyncRequest::GetChunk { cid: req.cid });
            self.snapshot_requests
                .insert(id, SnapshotRequest::Chunk { peer: req.peer, index: req.index, cid: req.cid });
        }
    }

    pub(super) fn on_chunk(&mut self, peer: PeerId, index: usize, cid: Cid, bytes: Vec<u8>) {
        self.metrics.count_in("snapshot", bytes.len());
        let Some(active) = &mut self.snapshot else { return };
        let Some(manifest) = active.decoded.clone() else { return };
        let Some(chunk) = manifest.chunks.get(index).filter(|c| c.cid == cid).cloned() else { return };
        // A crash loses the staging commits since the last durable one: one in every twentieth of the
        // snapshot's bytes bounds what a restarted pull fetches again to about 5 %.
        active.undurable_bytes += bytes.len() as u64;
        let durable = active.undurable_bytes >= manifest.compressed_bytes() / 20;
        if durable {
            active.undurable_bytes = 0;
        }
        let (store, commands, snapshot) = (self.store.clone(), self.commands_tx.clone(), active.cid);
        tokio::spawn(async move {
            let len = bytes.len() as u64;
            // `stage_chunk` checks the bytes against the chunk's CID and sizes, and every entry,
            // before it writes anything.
            let verdict =
                tokio::task::spawn_blocking(move || match store.stage_chunk(&snapshot, &chunk, &bytes, durable) {
                    Ok(_) => ChunkVerdict::Stored,
                    Err(StoreError::Snapshot(e)) => {
                        tracing::debug!(%cid, error = %e, "chunk refused");
                        ChunkVerdict::Corrupt
                    }
                    Err(e) => {
                        tracing::warn!(%cid, error = %e, "cannot keep a snapshot chunk; the pull waits, then asks for it again");
                        ChunkVerdict::LocalError
                    }
                })
                .await
                .unwrap_or(ChunkVerdict::LocalError);
            let _ = commands.send(Command::ChunkChecked { peer, index, len, verdict }).await;
        });
    }

    pub(super) fn on_chunk_checked(&mut self, peer: PeerId, index: usize, len: u64, verdict: ChunkVerdict) {
        if verdict == ChunkVerdict::Corrupt {
            tracing::warn!(%peer, index, "a source served a corrupt snapshot chunk; dropping it for a while");
            self.metrics.chunks_rejected.inc();
        }
        let Some(active) = self.snapshot.as_mut() else { return };
        if verdict == ChunkVerdict::Stored {
            active.progressed_at = Instant::now();
        }
        let Some(pull) = active.pull.as_mut() else { return };
        match verdict {
            ChunkVerdict::Stored => pull.on_chunk(&peer, index, len),
            ChunkVerdict::Corrupt => pull.on_corrupt(&peer, index, len, Instant::now()),
            ChunkVerdict::LocalError => pull.on_local_failure(&peer, index, Instant::now()),
        }
        self.drive_snapshot();
    }

    pub(super) fn on_snapshot_request_failed(&mut self, request: SnapshotRequest) {
        match request {
            SnapshotRequest::Manifest { peer } => {
                if let Some(active) = &mut self.snapshot {
                    active.offered_by.retain(|p| *p != peer);
                }
                self.request_manifest();
            }
            SnapshotRequest::Chunk { peer, index, .. } => {
                if let Some(pull) = self.snapshot.as_mut().and_then(|a| a.pull.as_mut()) {
                    pull.on_failure(&peer, index, Instant::now());
                }
                self.drive_snapshot();
            }
        }
    }

    pub(super) fn on_snapshot_installed(&mut self, result: Result<(), String>) {
        let Some(active) = self.snapshot.take() else { return };
        match result {
            Ok(()) => {
                let fetched = active.pull.as_ref().map(|p| p.progress(Instant::now()).bytes_fetched).unwrap_or(0);
                tracing::info!(cid = %active.cid, fetched_bytes = fetched, secs = active.started.elapsed().as_secs_f64(),
                    "snapshot installed; replaying from its version vector");
                self.metrics.snapshots_installed.inc();
                self.snapshot_retry.succeeded(&active.cid);
                self.refresh_holdings();
                self.provide_snapshot(&active.cid);
                self.plan_pulls();
            }
            Err(reason) => {
                tracing::warn!(cid = %active.cid, %reason, "installing the snapshot failed; will decide again");
                self.snapshot = Some(active);
                self.give_up_snapshot();
            }
        }
    }

    /// Whether `peer` is known (by identify or its digest) as a primary of this node's cluster.
    fn is_primary_of_cluster(&self, peer: &PeerId) -> bool {
        self.peers.get(peer).is_some_and(|p| p.in_cluster(&self.cluster) && p.role() == Some(Role::Primary))
    }

    /// Drops the pull in progress. One that was only chosen as cheaper than replay is not chosen
    /// that way again; a snapshot that is needed is tried again after a pause (`SnapshotRetry`).
    fn give_up_snapshot(&mut self) {
        let Some(active) = self.snapshot.take() else { return };
        if active.optional {
            if self.declined_snapshots.len() >= 64 {
                self.declined_snapshots.clear();
            }
            self.declined_snapshots.insert(active.cid);
        } else {
            self.snapshot_retry.failed(active.cid, Instant::now());
        }
    }

    /// Announces in Kademlia that this node serves the snapshot.
    pub(super) fn provide_snapshot(&mut self, cid: &Cid) {
        if let Err(e) = self.swarm.behaviour_mut().kad.start_providing(snapshot_key(cid)) {
            tracing::debug!(%cid, error = %e, "could not announce the snapshot");
        }
    }

    /// A Kademlia lookup found providers of the snapshot being pulled.
    pub(super) fn on_snapshot_providers(&mut self, key: &RecordKey, providers: impl IntoIterator<Item = PeerId>) {
        let me = *self.swarm.local_peer_id();
        let Some(active) = &mut self.snapshot else { return };
        if snapshot_key(&active.cid) != *key {
            return;
        }
        for peer in providers.into_iter().filter(|p| *p != me) {
            if !active.offered_by.contains(&peer) {
                active.offered_by.push(peer);
            }
            let rtt = self.peers.get(&peer).and_then(|i| i.rtt);
            if let Some(pull) = &mut active.pull {
                pull.add_source(peer, rtt);
            }
            if self.peers.get(&peer).is_none_or(|p| p.connections == 0) {
                let _ = self.swarm.dial(peer);
            }
        }
    }

    pub(super) fn snapshot_status(&self) -> Option<SnapshotStatus> {
        let active = self.snapshot.as_ref()?;
        let progress = active.pull.as_ref().map(|p| p.progress(Instant::now())).unwrap_or_default();
        Some(SnapshotStatus { cid: active.cid.to_string(), progress })
    }
}

/// Snapshot requests in flight, by request id.
pub(super) type SnapshotRequests = HashMap<OutboundRequestId, SnapshotRequest>;
