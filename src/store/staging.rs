//! Staging the snapshot being pulled: every chunk, once verified, is decoded, checked and written
//! into staging tables of its own as it arrives, so the work of an install is spread over the
//! transfer instead of following it.
//!
//! The staging tables hold the snapshot's state alone, never mixed with the local state, so a
//! snapshot refused at install (its entries do not hash to its root) leaves the state untouched.
//! Installing into an empty state renames the staging tables into place; otherwise their entries
//! are merged with the CRDT merges. Staging commits are never fsynced and the chunk bytes live in
//! the chunk files: after a crash, a chunk held but not staged is staged at install, and entries
//! staged whose chunk was lost make the pull fetch that chunk again (staging it is then a no-op).

use std::collections::BTreeMap;
use std::ops::{Bound, Range};

use cid::Cid;
use redb::{ReadableTable, ReadableTableMetadata, TableDefinition, WriteTransaction};

use super::apply::entry_kind;
use super::encoding::{check_register, decode_canonical, encode};
use super::root::{entry_hash, identity_hash, Buckets, BUCKETS as BUCKET_COUNT};
use super::tables::*;
use super::{decode_hlc, encode_hlc, SnapshotError, StoreError};
use crate::crdt::{Hlc, LeaseState, PnCounter};
use crate::snapshot::{chunk_entries, decompress_chunk, ChunkRef, Kind, StateEntry};

/// A verified, decoded chunk with each entry's identity and entry hash, ready to stage. Made
/// outside any transaction (it is the CPU-heavy part), so chunks are prepared in parallel. Keys and
/// values stay in the chunk's decompressed bytes, read in place.
pub(crate) struct PreparedChunk {
    pub cid: Cid,
    raw: Vec<u8>,
    /// Collection names, one per run of entries of the same collection.
    collections: Vec<String>,
    entries: Vec<PreparedEntry>,
    /// Greatest HLC among the registers and leases not ahead of `horizon_ms`.
    hlc: Option<Hlc>,
}

struct PreparedEntry {
    kind: Kind,
    /// Index in `collections`.
    collection: usize,
    /// Where the key and the value are in `raw`.
    key: Range<usize>,
    value: Range<usize>,
    /// The entry's identity and its hash in the state root (none for a register tombstone).
    id: [u8; 32],
    hash: Option<[u8; 32]>,
    /// The stamp of a register tombstone, to index it.
    tombstone: Option<Hlc>,
}

impl PreparedChunk {
    fn collection(&self, e: &PreparedEntry) -> &str {
        &self.collections[e.collection]
    }

    fn key(&self, e: &PreparedEntry) -> &[u8] {
        &self.raw[e.key.clone()]
    }

    fn value(&self, e: &PreparedEntry) -> &[u8] {
        &self.raw[e.value.clone()]
    }
}

/// Checks `bytes` against `r` (CID, sizes), decodes its entries and checks that every value is a
/// canonical encoding of its kind. A refusal names the chunk.
pub(crate) fn prepare_chunk(r: &ChunkRef, bytes: &[u8], horizon_ms: u64) -> Result<PreparedChunk, StoreError> {
    let chunk_error = |source| SnapshotError::Chunk { cid: r.cid, source };
    let raw = decompress_chunk(r, bytes).map_err(chunk_error)?;
    let mut entries = Vec::new();
    let mut collections: Vec<String> = Vec::new();
    let mut hlc: Option<Hlc> = None;
    let mut known_origin = Vec::new();
    for (index, entry) in chunk_entries(&raw).enumerate() {
        let entry = entry.map_err(chunk_error)?;
        let checked = check_value(entry.kind, entry.value, &mut known_origin);
        let refused = |reason: String| SnapshotError::Entry {
            index: index as u64,
            reason: format!("in chunk {}: {reason}", r.cid),
        };
        let (stamp, tombstone) = checked.map_err(refused)?;
        if let Some(h) = stamp.filter(|h| h.wall_ms <= horizon_ms) {
            hlc = Some(hlc.map_or(h, |m| m.max(h)));
        }
        let kind = entry_kind(entry.kind);
        let id = identity_hash(kind, entry.collection, entry.key);
        // A register tombstone has no hash in the root (as `root_hash` decides from the bytes).
        let hash = (!tombstone).then(|| entry_hash(&id, entry.value));
        if collections.last().map(String::as_str) != Some(entry.collection) {
            collections.push(entry.collection.to_owned());
        }
        entries.push(PreparedEntry {
            kind: entry.kind,
            collection: collections.len() - 1,
            key: within(&raw, entry.key).ok_or_else(|| refused("key outside the chunk".into()))?,
            value: within(&raw, entry.value).ok_or_else(|| refused("value outside the chunk".into()))?,
            id,
            hash,
            tombstone: stamp.filter(|_| tombstone),
        });
    }
    Ok(PreparedChunk { cid: r.cid, raw, collections, entries, hlc })
}

/// Where `part`, read in place from `raw`, lies in it.
fn within(raw: &[u8], part: &[u8]) -> Option<Range<usize>> {
    if part.is_empty() {
        return Some(0..0);
    }
    let start = (part.as_ptr() as usize).checked_sub(raw.as_ptr() as usize)?;
    let range = start..start.checked_add(part.len())?;
    (range.end <= raw.len()).then_some(range)
}

/// The value must be a canonical encoding of its kind. Returns its HLC (registers and leases), and
/// whether it is a register tombstone. `known_origin`: see [`check_register`].
fn check_value(kind: Kind, value: &[u8], known_origin: &mut Vec<u8>) -> Result<(Option<Hlc>, bool), String> {
    Ok(match kind {
        Kind::Register => {
            let (stamp, tombstone) = check_register(value, known_origin)?;
            (Some(stamp), tombstone)
        }
        Kind::Counter => decode_canonical::<PnCounter>(value, "counter").map(|_| (None, false))?,
        Kind::Lease => (Some(decode_canonical::<LeaseState>(value, "lease")?.hlc), false),
    })
}

/// What the staged entries add up to.
#[derive(Debug, Default)]
pub(crate) struct Staged {
    pub manifest: Option<Cid>,
    pub buckets: Buckets,
    pub counts: BTreeMap<(Kind, String), u64>,
    pub hlc: Option<Hlc>,
    /// Whether `STAGE_TOMBSTONES` indexes the staged tombstones (see `STAGE_TOMBSTONES_KEPT`).
    pub tombstones_kept: bool,
}

impl Staged {
    pub fn load(txn: &WriteTransaction) -> Result<Staged, StoreError> {
        let corrupt = |what: &str, e: &dyn std::fmt::Display| StoreError::Corrupt(format!("staged {what}: {e}"));
        let meta = txn.open_table(STAGE_META)?;
        let mut staged = Staged::default();
        if let Some(v) = meta.get(STAGE_MANIFEST)? {
            staged.manifest = Some(Cid::try_from(v.value()).map_err(|e| corrupt("manifest CID", &e))?);
        }
        if let Some(v) = meta.get(STAGE_BUCKETS)? {
            let bytes = v.value();
            if bytes.len() != BUCKET_COUNT * 32 {
                return Err(corrupt("buckets", &format!("{} bytes", bytes.len())));
            }
            for (bucket, hash) in staged.buckets.0.iter_mut().zip(bytes.chunks_exact(32)) {
                bucket.copy_from_slice(hash);
            }
        }
        if let Some(v) = meta.get(STAGE_COUNTS)? {
            staged.counts = postcard::from_bytes(v.value()).map_err(|e| corrupt("counts", &e))?;
        }
        if let Some(v) = meta.get(STAGE_HLC)? {
            staged.hlc = Some(decode_hlc(v.value())?);
        }
        staged.tombstones_kept = meta.get(STAGE_TOMBSTONES_KEPT)?.is_some();
        Ok(staged)
    }

    fn save(&self, txn: &WriteTransaction) -> Result<(), StoreError> {
        let mut meta = txn.open_table(STAGE_META)?;
        if let Some(cid) = &self.manifest {
            meta.insert(STAGE_MANIFEST, cid.to_bytes().as_slice())?;
        }
        meta.insert(STAGE_BUCKETS, self.buckets.0.concat().as_slice())?;
        meta.insert(STAGE_COUNTS, encode(&self.counts).as_slice())?;
        if let Some(hlc) = self.hlc {
            meta.insert(STAGE_HLC, encode_hlc(hlc).as_slice())?;
        }
        if self.tombstones_kept {
            meta.insert(STAGE_TOMBSTONES_KEPT, [].as_slice())?;
        }
        Ok(())
    }
}

/// Drops everything staged.
pub(crate) fn clear(txn: &WriteTransaction) -> Result<(), StoreError> {
    for (_, _, stage) in STATE_TABLES {
        txn.delete_table(stage)?;
    }
    txn.delete_table(STAGE_TOMBSTONES)?;
    txn.delete_table(STAGE_CHUNKS)?;
    txn.delete_table(STAGE_META)?;
    Ok(())
}

/// Makes the staging tables belong to `manifest`: what was staged for another snapshot goes.
/// Returns what is staged for it so far.
pub(crate) fn begin(txn: &WriteTransaction, manifest: &Cid) -> Result<Staged, StoreError> {
    let staged = Staged::load(txn)?;
    if staged.manifest.as_ref() == Some(manifest) {
        return Ok(staged);
    }
    if staged.manifest.is_some() {
        tracing::info!(old = ?staged.manifest, new = %manifest, "dropping the entries staged for another snapshot");
    }
    clear(txn)?;
    let fresh = Staged { manifest: Some(*manifest), tombstones_kept: true, ..Staged::default() };
    fresh.save(txn)?;
    Ok(fresh)
}

/// Whether the chunk's entries are staged for the snapshot staged now.
pub(crate) fn is_staged(txn: &WriteTransaction, chunk: &Cid) -> Result<bool, StoreError> {
    Ok(txn.open_table(STAGE_CHUNKS)?.get(chunk.to_bytes().as_slice())?.is_some())
}

/// Writes a prepared chunk's entries into the staging tables of `manifest`. Returns false when the
/// chunk was staged already. A key staged twice means the snapshot is malformed: refused.
pub(crate) fn stage(txn: &WriteTransaction, manifest: &Cid, chunk: &PreparedChunk) -> Result<bool, StoreError> {
    Ok(stage_many(txn, manifest, &[chunk])?[0])
}

/// [`stage`] for several chunks in one transaction: what is staged so far is read and written once
/// for them all. Returns, per chunk, false when it was staged already. Any refusal refuses them all.
pub(crate) fn stage_many(
    txn: &WriteTransaction,
    manifest: &Cid,
    chunks: &[&PreparedChunk],
) -> Result<Vec<bool>, StoreError> {
    let mut staged = begin(txn, manifest)?;
    let mut fresh = Vec::with_capacity(chunks.len());
    for chunk in chunks {
        let new = !is_staged(txn, &chunk.cid)?;
        if new {
            stage_entries(txn, &mut staged, chunk)?;
        }
        fresh.push(new);
    }
    staged.save(txn)?;
    Ok(fresh)
}

/// Stages one chunk's entries and adds them to `staged` (saved by the caller).
fn stage_entries(txn: &WriteTransaction, staged: &mut Staged, chunk: &PreparedChunk) -> Result<(), StoreError> {
    for (kind, _, stage) in STATE_TABLES {
        let mut table = txn.open_table(stage)?;
        let run = chunk.entries.iter().enumerate().filter(|(_, e)| e.kind == kind);
        insert_run(&mut table, chunk, run)?;
    }
    let mut tombstones = txn.open_table(STAGE_TOMBSTONES)?;
    for e in &chunk.entries {
        if let Some(hash) = &e.hash {
            staged.buckets.toggle(&e.id, hash);
        }
        if let Some(stamp) = e.tombstone {
            tombstones.insert(tombstone_key(stamp, chunk.collection(e), chunk.key(e)), ())?;
        }
    }
    drop(tombstones);
    // A chunk holds each collection's entries together: counted run by run.
    for run in chunk.entries.chunk_by(|a, b| a.kind == b.kind && chunk.collection(a) == chunk.collection(b)) {
        let first = &run[0];
        *staged.counts.entry((first.kind, chunk.collection(first).to_owned())).or_default() += run.len() as u64;
    }
    if let Some(h) = chunk.hlc {
        staged.hlc = Some(staged.hlc.map_or(h, |m| m.max(h)));
    }
    txn.open_table(STAGE_CHUNKS)?.insert(chunk.cid.to_bytes().as_slice(), ())?;
    Ok(())
}

/// Inserts one kind's entries of a chunk (with their indexes in it) into its staging table. A
/// well-formed snapshot's chunk holds them in key order, after the entries of the chunks before it
/// and before those of the chunks after it, so they go in as one run through a cursor, which packs
/// the leaves it writes. The entries that do not continue the run (out of order, or a key staged
/// already) are inserted one by one, and a key staged twice refuses the snapshot.
fn insert_run<'e>(
    table: &mut redb::Table<(&'static str, &'static [u8]), &'static [u8]>,
    chunk: &PreparedChunk,
    run: impl Iterator<Item = (usize, &'e PreparedEntry)>,
) -> Result<(), StoreError> {
    let mut run = run.peekable();
    let Some((_, first)) = run.peek() else { return Ok(()) };
    let mut cursor = table.lower_bound_mut(Bound::Included((chunk.collection(first), chunk.key(first))))?;
    while let Some((_, e)) = run.peek() {
        match cursor.insert_before((chunk.collection(e), chunk.key(e)), chunk.value(e)) {
            Ok(()) => drop(run.next()),
            Err(redb::CursorError::UnorderedKey) => break,
            Err(e) => return Err(StoreError::Storage(e.into())),
        }
    }
    cursor.close()?;
    for (index, e) in run {
        if table.insert((chunk.collection(e), chunk.key(e)), chunk.value(e))?.is_some() {
            return Err(SnapshotError::Entry {
                index: index as u64,
                reason: format!("in chunk {}: key staged twice in {:?} {:?}", chunk.cid, e.kind, chunk.collection(e)),
            }
            .into());
        }
    }
    Ok(())
}

/// Whether the local state holds no entry at all.
pub(crate) fn state_is_empty(txn: &WriteTransaction) -> Result<bool, StoreError> {
    for (_, live, _) in STATE_TABLES {
        if !txn.open_table(live)?.is_empty()? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Makes the staged entries the state, replacing the (empty) state tables, and the staged
/// tombstone index the index (or indexes the tombstones by a scan, for a staging an older build
/// began); the caller sets the buckets.
pub(crate) fn adopt(txn: &WriteTransaction, staged: &Staged) -> Result<(), StoreError> {
    for (_, live, stage) in STATE_TABLES {
        rename_into(txn, stage, live)?;
    }
    if staged.tombstones_kept {
        rename_into(txn, STAGE_TOMBSTONES, TOMBSTONES)
    } else {
        super::tombstones::rebuild_index(txn)
    }
}

/// Replaces the table `live` by the table `stage`.
fn rename_into<K: redb::Key + 'static, V: redb::Value + 'static>(
    txn: &WriteTransaction,
    stage: TableDefinition<K, V>,
    live: TableDefinition<K, V>,
) -> Result<(), StoreError> {
    // Renaming needs the staging table to exist, even if the snapshot has no entry of its kind.
    drop(txn.open_table(stage)?);
    txn.delete_table(live)?;
    txn.rename_table(stage, live)?;
    Ok(())
}

/// Calls `f` with every staged entry, kind by kind.
pub(crate) fn for_each_staged(
    txn: &WriteTransaction,
    mut f: impl FnMut(StateEntry) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    for (kind, _, stage) in STATE_TABLES {
        let table = txn.open_table(stage)?;
        for row in table.iter()? {
            let (k, v) = row?;
            let (collection, key) = k.value();
            f(StateEntry { kind, collection: collection.to_owned(), key: key.to_vec(), value: v.value().to_vec() })?;
        }
    }
    Ok(())
}
