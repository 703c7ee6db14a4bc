//! Snapshots kept in the store: creating one from a single read transaction, the chunks and manifests
//! a node holds (to install them, and to serve them to others), and deleting old ones.
//!
//! Creation reads everything from one redb read transaction, so the version vector, the heads, the
//! state root and the entries belong to one commit while the writer keeps committing; it then writes
//! the chunks and the manifest in one short write transaction (a crash leaves all or none of them).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{SystemTime, UNIX_EPOCH};

use cid::Cid;
use redb::{ReadableDatabase, ReadableTable, WriteTransaction};

use super::apply::entry_kind;
use super::root::{identity_hash, Buckets};
use super::staging;
use super::tables::*;
use super::{decode_progress, origin_from_bytes, SnapshotError, Store, StoreError, VersionVector};
use crate::ids::StateRoot;
use crate::op::Signer;
use crate::snapshot::{
    verify_chunk_cid, Chunk, ChunkBuilder, ChunkRef, CollectionInfo, Kind, Manifest, SignedManifest, StateEntry,
    FORMAT, MAX_CHUNK_RAW_BYTES,
};

/// What [`Store::create_snapshot`] made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// CID of the manifest: the snapshot's name.
    pub cid: Cid,
    pub version_vector: VersionVector,
    pub state_root: StateRoot,
    pub entries: u64,
    pub chunks: usize,
    /// Uncompressed bytes of all chunks.
    pub raw_bytes: u64,
    /// Compressed bytes of all chunks.
    pub compressed_bytes: u64,
    /// Bytes of the signed manifest as stored and served.
    pub manifest_bytes: u64,
}

/// A snapshot this store holds (created here or installed), with its manifest decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSnapshot {
    pub cid: Cid,
    pub manifest: Manifest,
}

/// What [`Store::prune_snapshots`] deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PruneOutcome {
    pub snapshots: usize,
    pub chunks: usize,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl Store {
    /// Makes a snapshot of the state as redb holds it (peers' ops still in the memtable are left
    /// for the next one; [`crate::store::WriteHandle::persist`] writes them first), signed by `signer`, in chunks of at most
    /// `chunk_raw_bytes` raw bytes (see [`crate::snapshot::DEFAULT_CHUNK_RAW_BYTES`]), and keeps it.
    /// Blocking (it reads the whole state): call it from a blocking thread. The writer keeps
    /// committing meanwhile, except during the short final write.
    pub fn create_snapshot(
        &self,
        signer: &Signer,
        cluster: &str,
        chunk_raw_bytes: u64,
    ) -> Result<SnapshotInfo, StoreError> {
        if chunk_raw_bytes == 0 || chunk_raw_bytes > MAX_CHUNK_RAW_BYTES {
            return Err(SnapshotError::ChunkSize(chunk_raw_bytes).into());
        }
        let _serial = self.snapshot_lock.lock().expect("snapshot lock");
        let txn = self.db().begin_read()?;
        let mut version_vector = VersionVector::default();
        let mut heads = BTreeMap::new();
        for row in txn.open_table(VERSION_VECTOR)?.iter()? {
            let (k, v) = row?;
            let origin = origin_from_bytes(k.value())?;
            let p = decode_progress(v.value())?;
            if p.seq.0 > 0 {
                version_vector.0.insert(origin, p.seq);
                heads.insert(origin, p.chain);
            }
        }
        let stored = super::buckets::read(&txn.open_table(BUCKET_ROWS)?)?;

        // The entries, checked against the stored buckets as they go into chunks: a snapshot of a
        // state that does not match its own root would be refused by every installer.
        let mut recomputed = Buckets::default();
        let mut counts: BTreeMap<(Kind, String), u64> = BTreeMap::new();
        let mut builder = ChunkBuilder::new(chunk_raw_bytes);
        let mut chunks = ChunkWriter::new(self);
        let mut index = 0u64;
        for (kind, def, _) in STATE_TABLES {
            let table = txn.open_table(def)?;
            for row in table.iter()? {
                let (k, v) = row?;
                let (collection, key) = k.value();
                let entry = StateEntry {
                    kind,
                    collection: collection.to_owned(),
                    key: key.to_vec(),
                    value: v.value().to_vec(),
                };
                let kind_id = entry_kind(kind);
                let id = identity_hash(kind_id, collection, key);
                recomputed.replace(kind_id, &id, None, &entry.value);
                match counts.get_mut(&(kind, entry.collection.clone())) {
                    Some(n) => *n += 1,
                    None => drop(counts.insert((kind, entry.collection.clone()), 1)),
                }
                let sealed = builder.push(&entry).map_err(|e| SnapshotError::Entry { index, reason: e.to_string() })?;
                chunks.add(sealed)?;
                index += 1;
            }
        }
        chunks.add(builder.finish().map_err(|e| SnapshotError::Entry { index, reason: e.to_string() })?)?;
        drop(txn);
        if recomputed != stored {
            chunks.abandon()?;
            return Err(StoreError::Corrupt("the state entries do not hash to the stored state-root buckets".into()));
        }
        // Every chunk is durable before the manifest that names them is.
        let chunks = chunks.finish()?;

        let manifest = Manifest {
            format: FORMAT,
            cluster: cluster.to_owned(),
            creator: signer.origin(),
            created_at_ms: now_ms(),
            version_vector: version_vector.clone(),
            heads,
            state_root: stored.root(),
            collections: counts
                .into_iter()
                .map(|((kind, name), entries)| CollectionInfo { kind, name, entries })
                .collect(),
            chunks,
        };
        let signed = manifest.sign(signer).map_err(SnapshotError::from)?;
        let cid = signed.cid();
        let encoded = signed.encode();

        let wtxn = self.db().begin_write()?;
        keep_manifest(&wtxn, &cid, &encoded)?;
        wtxn.commit()?;
        Ok(SnapshotInfo {
            cid,
            version_vector,
            state_root: manifest.state_root,
            entries: index,
            chunks: manifest.chunks.len(),
            raw_bytes: manifest.raw_bytes(),
            compressed_bytes: manifest.compressed_bytes(),
            manifest_bytes: encoded.len() as u64,
        })
    }

    /// The snapshots held, oldest first.
    pub fn list_snapshots(&self) -> Result<Vec<StoredSnapshot>, StoreError> {
        let txn = self.db().begin_read()?;
        let order = txn.open_table(SNAPSHOT_ORDER)?;
        let manifests = txn.open_table(SNAPSHOTS)?;
        let mut out = Vec::new();
        for row in order.iter()? {
            let (_, cid) = row?;
            out.push(stored_snapshot(&manifests, cid.value())?);
        }
        Ok(out)
    }

    /// The snapshot stored last (created or installed), if any.
    pub fn latest_snapshot(&self) -> Result<Option<StoredSnapshot>, StoreError> {
        let txn = self.db().begin_read()?;
        let manifests = txn.open_table(SNAPSHOTS)?;
        let order = txn.open_table(SNAPSHOT_ORDER)?;
        let last = order.last()?;
        last.map(|(_, cid)| stored_snapshot(&manifests, cid.value())).transpose()
    }

    /// The signed manifest of a held snapshot, to serve as is.
    pub fn snapshot_manifest(&self, cid: &Cid) -> Result<Option<SignedManifest>, StoreError> {
        let txn = self.db().begin_read()?;
        let value = txn.open_table(SNAPSHOTS)?.get(cid.to_bytes().as_slice())?;
        value
            .map(|v| {
                SignedManifest::decode(v.value()).map_err(|e| StoreError::Corrupt(format!("stored manifest: {e}")))
            })
            .transpose()
    }

    /// The compressed bytes of a held chunk.
    /// (Read as kept: whoever uses the bytes checks them against the CID.)
    pub fn snapshot_chunk(&self, cid: &Cid) -> Result<Option<Vec<u8>>, StoreError> {
        self.chunk_files().get(cid)
    }

    /// The compressed bytes of a held chunk, to send to a peer: hashed against the CID the first
    /// time this process serves them, so that a file damaged on disk is removed and reads as not
    /// held (the peer asks elsewhere) instead of being sent.
    pub fn served_chunk(&self, cid: &Cid) -> Result<Option<Vec<u8>>, StoreError> {
        self.chunk_files().get_served(cid)
    }

    pub fn has_chunk(&self, cid: &Cid) -> Result<bool, StoreError> {
        Ok(self.chunk_files().size(cid)?.is_some())
    }

    /// The chunks of `manifest` not held yet: what a resumed pull still has to fetch. A chunk held
    /// with a size other than the manifest's (cut short by a crash) counts as missing.
    pub fn missing_chunks(&self, manifest: &Manifest) -> Result<Vec<Cid>, StoreError> {
        let mut missing = Vec::new();
        for c in &manifest.chunks {
            if self.chunk_files().size(&c.cid)? != Some(c.size) {
                missing.push(c.cid);
            }
        }
        Ok(missing)
    }

    /// Number of chunks held (of all snapshots, and of pulls not installed yet).
    pub fn chunk_count(&self) -> Result<u64, StoreError> {
        Ok(self.chunk_files().list()?.len() as u64)
    }

    /// Keeps a chunk fetched from a peer, after checking that its bytes hash to `cid` (one durable
    /// write per chunk, so a restarted pull fetches only what is missing). Returns false when it was
    /// already held. Blocking.
    pub fn put_chunk(&self, cid: &Cid, bytes: &[u8]) -> Result<bool, StoreError> {
        verify_chunk_cid(cid, bytes).map_err(|source| SnapshotError::Chunk { cid: *cid, source })?;
        if self.has_chunk(cid)? {
            return Ok(false);
        }
        self.check_disk(bytes.len() as u64 * 2)?;
        self.chunk_files().put(cid, bytes, true)
    }

    /// Keeps a chunk of the snapshot named `manifest`, fetched from a peer, and stages its entries for
    /// the install (see `staging.rs`): checks the bytes against `chunk` (CID, sizes) and every entry
    /// before anything is written. Returns false when the chunk was staged already. The chunk is
    /// fsynced only when `durable` (else it becomes durable with the next fsync: the caller spaces
    /// them so a crash costs a restarted pull a bounded refetch). Blocking; the decoding and
    /// hashing run before any write transaction, so several chunks can be staged from parallel
    /// threads.
    pub fn stage_chunk(
        &self,
        manifest: &Cid,
        chunk: &ChunkRef,
        bytes: &[u8],
        durable: bool,
    ) -> Result<bool, StoreError> {
        let started = std::time::Instant::now();
        let horizon = super::writer::now_ms().saturating_add(super::writer::MAX_CLOCK_AHEAD_MS);
        let prepared = staging::prepare_chunk(chunk, bytes, horizon)?;
        let prepared_at = started.elapsed();
        // The chunk, then its entries in the staging tables: staged entries whose chunk a crash
        // lost are fetched again (and staged as no-ops); a chunk held but not staged is staged at
        // install. A `durable` call fsyncs even when the chunk was held already, so the earlier
        // chunks it covers are durable too.
        self.check_disk(bytes.len() as u64 + chunk.raw_size * 2)?;
        let added = self.chunk_files().put(&chunk.cid, bytes, durable)?;
        let kept_at = started.elapsed();
        tracing::debug!(cid = %chunk.cid, prepare = ?prepared_at, keep = ?(kept_at - prepared_at), "chunk kept");
        let staged = self.stager.stage(self, *manifest, prepared);
        if staged.is_err() && added {
            // Refused (a key staged twice) or not written: the chunk is not kept either.
            self.chunk_files().remove(&chunk.cid)?;
        }
        staged
    }

    /// Deletes every chunk that no held snapshot lists and `keep` does not name: the chunks of pulls
    /// that were abandoned (for a newer snapshot, or because their sources went away) and of
    /// snapshots whose making was interrupted. Returns how many went. Blocking.
    pub fn collect_chunks(&self, keep: &[Cid]) -> Result<u64, StoreError> {
        let _serial = self.snapshot_lock.lock().expect("snapshot lock");
        let mut listed: BTreeSet<Cid> = keep.iter().copied().collect();
        for snapshot in self.list_snapshots()? {
            listed.extend(snapshot.manifest.chunks.iter().map(|c| c.cid));
        }
        let mut deleted = 0;
        for cid in self.chunk_files().list()? {
            if !listed.contains(&cid) {
                deleted += u64::from(self.chunk_files().remove(&cid)?);
            }
        }
        Ok(deleted)
    }

    /// Deletes all but the latest `keep` snapshots (at least one is always kept, since compaction
    /// relies on the latest), with their chunks unless a kept snapshot lists them too. Chunks no
    /// manifest lists (a pull in progress) are left alone. Blocking.
    pub fn prune_snapshots(&self, keep: usize) -> Result<PruneOutcome, StoreError> {
        let keep = keep.max(1);
        let _serial = self.snapshot_lock.lock().expect("snapshot lock");
        let txn = self.db().begin_write()?;
        let mut outcome = PruneOutcome::default();
        let mut doomed = BTreeSet::new();
        {
            let mut order = txn.open_table(SNAPSHOT_ORDER)?;
            let mut manifests = txn.open_table(SNAPSHOTS)?;
            let mut all = Vec::new();
            for row in order.iter()? {
                let (k, v) = row?;
                all.push((k.value(), v.value().to_vec()));
            }
            let cut = all.len().saturating_sub(keep);
            let chunk_set = |cid: &[u8]| -> Result<BTreeSet<Cid>, StoreError> {
                let s = stored_snapshot(&manifests, cid)?;
                Ok(s.manifest.chunks.iter().map(|c| c.cid).collect())
            };
            let mut kept = BTreeSet::new();
            for (_, cid) in &all[cut..] {
                kept.extend(chunk_set(cid)?);
            }
            for (_, cid) in &all[..cut] {
                doomed.extend(chunk_set(cid)?.into_iter().filter(|c| !kept.contains(c)));
            }
            for (n, cid) in &all[..cut] {
                order.remove(*n)?;
                manifests.remove(cid.as_slice())?;
                outcome.snapshots += 1;
            }
        }
        txn.commit()?;
        // The manifests are gone first: a crash in between leaves unlisted chunks, never a listed
        // chunk missing.
        for cid in &doomed {
            outcome.chunks += self.chunk_files().remove(cid)? as usize;
        }
        Ok(outcome)
    }
}

/// Writes the chunks of a snapshot being made as they are sealed (the snapshot is never held in
/// memory whole), and syncs them all once it is complete.
struct ChunkWriter<'a> {
    store: &'a Store,
    refs: Vec<ChunkRef>,
    /// Chunks this snapshot added (not held before), to take back if it is abandoned.
    added: Vec<Cid>,
}

impl<'a> ChunkWriter<'a> {
    fn new(store: &'a Store) -> Self {
        ChunkWriter { store, refs: Vec::new(), added: Vec::new() }
    }

    fn add(&mut self, chunk: Option<Chunk>) -> Result<(), StoreError> {
        let Some(chunk) = chunk else { return Ok(()) };
        self.refs.push(chunk.chunk_ref());
        self.store.check_disk(chunk.bytes.len() as u64 * 2)?;
        if self.store.chunk_files().put(&chunk.cid, &chunk.bytes, false)? {
            self.added.push(chunk.cid);
        }
        Ok(())
    }

    /// Makes every chunk durable; returns the chunk list for the manifest.
    fn finish(self) -> Result<Vec<ChunkRef>, StoreError> {
        self.store.chunk_files().sync()?;
        Ok(self.refs)
    }

    /// Deletes the chunks this snapshot added.
    fn abandon(self) -> Result<(), StoreError> {
        for cid in &self.added {
            self.store.chunk_files().remove(cid)?;
        }
        Ok(())
    }
}

/// Stores a verified signed manifest and appends it to the order, unless it is already held.
pub(super) fn keep_manifest(txn: &WriteTransaction, cid: &Cid, signed: &[u8]) -> Result<(), StoreError> {
    let key = cid.to_bytes();
    let mut manifests = txn.open_table(SNAPSHOTS)?;
    if manifests.get(key.as_slice())?.is_some() {
        return Ok(());
    }
    manifests.insert(key.as_slice(), signed)?;
    let mut order = txn.open_table(SNAPSHOT_ORDER)?;
    let next = order.last()?.map_or(0, |(k, _)| k.value() + 1);
    order.insert(next, key.as_slice())?;
    Ok(())
}

/// The latest held snapshot's manifest, read inside a write transaction.
pub(super) fn latest_in(txn: &WriteTransaction) -> Result<Option<Manifest>, StoreError> {
    let manifests = txn.open_table(SNAPSHOTS)?;
    let order = txn.open_table(SNAPSHOT_ORDER)?;
    let last = order.last()?;
    last.map(|(_, cid)| stored_snapshot(&manifests, cid.value()).map(|s| s.manifest)).transpose()
}

fn stored_snapshot(
    manifests: &impl ReadableTable<&'static [u8], &'static [u8]>,
    cid: &[u8],
) -> Result<StoredSnapshot, StoreError> {
    let corrupt = |what: String| StoreError::Corrupt(format!("snapshot index: {what}"));
    let cid = Cid::try_from(cid).map_err(|e| corrupt(format!("bad CID: {e}")))?;
    let value = manifests.get(cid.to_bytes().as_slice())?.ok_or_else(|| corrupt(format!("{cid} has no manifest")))?;
    let signed = SignedManifest::decode(value.value()).map_err(|e| corrupt(e.to_string()))?;
    let manifest = signed.manifest_unverified().map_err(|e| corrupt(e.to_string()))?;
    Ok(StoredSnapshot { cid, manifest })
}
