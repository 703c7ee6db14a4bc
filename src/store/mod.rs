//! The replicated state on disk: op log, registers, counters, leases, version vector and state root,
//! in one redb database.
//!
//! All writes go through one writer thread (`writer`) that group-commits: it takes every request
//! queued while the previous commit was being made, applies them in one transaction (log + state +
//! version vector together) and answers each request only after the commit is durable. Small groups
//! of peers' ops go to the memtable instead (`memtable`), which the next transaction carries. Reads
//! look in the memtable, then in redb (readers never block the writer).
//!
//! Must never depend on: the network, the sync logic or the node.

mod apply;
mod buckets;
mod chunk_files;
mod disk;
mod encoding;
mod error;
mod lease_log;
mod log;
mod memtable;
mod publish;
mod read;
pub mod root;
mod snapshots;
mod stager;
mod staging;
mod tables;
mod tombstones;
mod vv;
mod writer;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, RwLock};

use redb::{Database, ReadableDatabase, ReadableTable};
use tokio::sync::watch;

use crate::crdt::Hlc;
use crate::ids::{Origin, Seq, StateRoot};
use crate::op::ChainHash;
use chunk_files::ChunkFiles;
use tables::*;

pub use apply::Effect;
pub use disk::{available_bytes, DEFAULT_DISK_RESERVE};
pub use error::{SnapshotError, StoreError};
pub use lease_log::{LeaseLog, LeaseLogBoot, LeaseLogWrite};
pub use publish::{WaitRefused, MAX_WAITERS};
pub use read::{ListPage, LogRead, LogReport};
pub use root::Buckets;
pub use snapshots::{PruneOutcome, SnapshotInfo, StoredSnapshot};
pub use vv::VersionVector;
pub use writer::{
    AppliedOp, CommitEvent, CompactOutcome, InstallOutcome, LeaseLoss, LocalIntent, MergeOutcome, RemoteOutcome,
    WriteHandle, WriterConfig, WriterError, DEFAULT_MEMTABLE_BYTES, REMOTE_FLUSH_INTERVAL,
};

/// Default bound of redb's page cache (redb's own default is 1 GiB). The kernel's page cache holds
/// the file as well, so a larger one mostly doubles what is cached: at 1M keys x 100 B the node's
/// RSS was 573-674 MiB with 256 MiB and 140-143 MiB with 64 MiB, with replay, catch-up, replicated
/// writes and snapshot installs as fast (`scripts/bench.sh` W1, W2, W4, W5).
pub const DEFAULT_CACHE_BYTES: usize = 64 << 20;

/// Moves the chunks an older build kept in redb into files: those in the state database's table
/// (older still), inside its opening transaction, and those in the chunk database
/// (`<name>-chunks.redb`), which is then deleted. The files are synced before either source goes,
/// so a crash midway moves them again on the next open.
fn move_chunks_to_files(txn: &redb::WriteTransaction, path: &Path, files: &ChunkFiles) -> Result<(), StoreError> {
    let mut moved = take_chunks(&txn.open_table(SNAPSHOT_CHUNKS)?, files)?;
    let legacy = chunks_path(path);
    if legacy.exists() {
        let open_error = |e: redb::DatabaseError| StoreError::Open { path: legacy.clone(), source: e.into() };
        let db = redb::Database::open(&legacy).map_err(open_error)?;
        // Read only, through a write transaction (which opens the table if an older build never
        // made it) dropped uncommitted.
        let legacy_txn = db.begin_write()?;
        moved += take_chunks(&legacy_txn.open_table(SNAPSHOT_CHUNKS)?, files)?;
    }
    files.sync()?;
    if legacy.exists() {
        std::fs::remove_file(&legacy).map_err(|source| StoreError::ChunkFile { path: legacy.clone(), source })?;
    }
    txn.delete_table(SNAPSHOT_CHUNKS)?;
    if moved > 0 {
        tracing::info!(chunks = moved, dir = %chunks_dir(path).display(), "moved snapshot chunks out of redb into files");
    }
    Ok(())
}

/// Writes every chunk of `table` into `files` (not synced). Returns how many.
fn take_chunks(
    table: &impl ReadableTable<&'static [u8], &'static [u8]>,
    files: &ChunkFiles,
) -> Result<u64, StoreError> {
    let mut moved = 0;
    for row in table.iter()? {
        let (k, v) = row?;
        match cid::Cid::try_from(k.value()) {
            Ok(cid) => {
                files.write(&cid, v.value())?;
                moved += 1;
            }
            Err(e) => tracing::warn!(error = %e, "dropping a kept chunk whose key is not a CID"),
        }
    }
    Ok(moved)
}

/// Where an older build kept the snapshot chunks of the state database at `path`:
/// `state.redb` -> `state-chunks.redb`. Moved into [`chunks_dir`] at open.
pub fn chunks_path(path: &Path) -> std::path::PathBuf {
    beside(path, "-chunks.redb")
}

/// Where the snapshot chunks of the state database at `path` are kept, a file per chunk:
/// `state.redb` -> `state-chunks/`.
pub fn chunks_dir(path: &Path) -> std::path::PathBuf {
    beside(path, "-chunks")
}

/// `<stem of path><suffix>`, in the directory of `path`.
fn beside(path: &Path, suffix: &str) -> std::path::PathBuf {
    let stem = path.file_stem().map_or_else(|| "state".into(), |s| s.to_string_lossy().into_owned());
    path.with_file_name(format!("{stem}{suffix}"))
}

/// Where each origin's log stands: highest contiguous seq and the chain hash there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OriginProgress {
    pub seq: Seq,
    pub chain: ChainHash,
}

/// The part of the state kept in memory and shared with readers: always the state of the last
/// committed transaction.
#[derive(Debug, Clone, Default)]
pub struct Mirror {
    pub progress: BTreeMap<Origin, OriginProgress>,
    pub buckets: Buckets,
    pub hlc: Hlc,
    /// Tombstones stamped up to here were collected (see `tombstones.rs`).
    pub collected: Hlc,
}

impl Mirror {
    pub fn version_vector(&self) -> VersionVector {
        VersionVector(self.progress.iter().map(|(o, p)| (*o, p.seq)).collect())
    }
}

/// Read access to the store. Cloneable; cheap to share.
#[derive(Clone)]
pub struct Store {
    db: Arc<Database>,
    /// Snapshot chunks, a file each in `<name>-chunks/` beside the state (see `chunk_files.rs`):
    /// storing a fetched chunk never waits for the state's write lock, and the state's commits never
    /// carry chunk bytes.
    chunks: Arc<ChunkFiles>,
    /// Serializes making and pruning snapshots, which write the database and the chunk files.
    snapshot_lock: Arc<std::sync::Mutex<()>>,
    /// Stages the chunks of a snapshot being pulled in turns (see `stager.rs`).
    stager: Arc<stager::Stager>,
    /// The state as of the last commit; written only by the writer thread (see `publish`).
    mirror: Arc<RwLock<publish::Published>>,
    /// Callers waiting for an op to be applied, woken by the commit that applies it.
    waiters: Arc<std::sync::Mutex<publish::Waiters>>,
    /// The version vector as of the last commit, for callers waiting until a write is applied.
    vv_watch: Arc<watch::Sender<VersionVector>>,
    /// Refuses writes while the data dir's filesystem is short of free space.
    disk: Arc<disk::DiskGuard>,
    /// Peers' ops applied since the last flush, in front of the tables (see `memtable.rs`);
    /// written only by the writer thread.
    memtable: Arc<RwLock<memtable::Memtable>>,
    /// The version vector of the last durable commit: what a crash keeps.
    durable: Arc<RwLock<VersionVector>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (or creates) the database at `path` and loads the in-memory mirror.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        Self::open_with_cache(path, DEFAULT_CACHE_BYTES)
    }

    /// Like [`Store::open`], with redb's page cache bounded to `cache_bytes`.
    pub fn open_with_cache(path: &Path, cache_bytes: usize) -> Result<Store, StoreError> {
        let open = |path: &Path, cache: usize| {
            redb::Builder::new()
                .set_cache_size(cache)
                .create(path)
                .map_err(|e| StoreError::Open { path: path.to_owned(), source: e.into() })
        };
        let db = open(path, cache_bytes)?;
        let txn = db.begin_write()?;
        let mut migrate_from = None;
        {
            let mut meta = txn.open_table(META)?;
            let found = meta.get(META_FORMAT)?.map(|v| be_u64(v.value()));
            match found {
                None => {
                    meta.insert(META_FORMAT, FORMAT_VERSION.to_be_bytes().as_slice())?;
                }
                Some(Ok(v)) if v == FORMAT_VERSION => {}
                Some(Ok(v @ (1 | 2))) => migrate_from = Some(v),
                Some(v) => return Err(StoreError::Format { path: path.to_owned(), found: v.ok() }),
            }
            txn.open_table(OPLOG)?;
            txn.open_table(HEADS)?;
            txn.open_table(LOG_COUNTS)?;
            txn.open_table(REGISTERS)?;
            txn.open_table(COUNTERS)?;
            txn.open_table(LEASES)?;
            txn.open_table(VERSION_VECTOR)?;
            txn.open_table(LOG_FLOORS)?;
            txn.open_table(BUCKET_ROWS)?;
            txn.open_table(SNAPSHOTS)?;
            txn.open_table(SNAPSHOT_ORDER)?;
            txn.open_table(TOMBSTONES)?;
        }
        log::migrate_v1(&txn)?;
        if migrate_from == Some(1) {
            let moved = tombstones::migrate_v1(&txn)?;
            tracing::info!(path = %path.display(), tombstones = moved, "migrated the data dir from format 1 to 2: tombstones left the state root; snapshots held were dropped");
        }
        if let Some(from) = migrate_from {
            buckets::migrate_v2(&txn)?;
            txn.open_table(META)?.insert(META_FORMAT, FORMAT_VERSION.to_be_bytes().as_slice())?;
            tracing::info!(path = %path.display(), from, "migrated the data dir to format 3: state-root buckets in rows of 64");
        }
        let chunks = ChunkFiles::open(&chunks_dir(path))?;
        move_chunks_to_files(&txn, path, &chunks)?;
        txn.commit()?;
        let db = Arc::new(db);
        let mirror = load_mirror(&db)?;
        let memtable = memtable::Memtable { generation: flushes(&db.begin_read()?)? + 1, ..Default::default() };
        let durable = mirror.version_vector();
        let vv_watch = Arc::new(watch::Sender::new(mirror.version_vector()));
        Ok(Store {
            db,
            chunks: Arc::new(chunks),
            snapshot_lock: Arc::default(),
            stager: Arc::default(),
            mirror: Arc::new(RwLock::new(publish::Published::new(mirror))),
            waiters: Arc::default(),
            vv_watch,
            disk: Arc::new(disk::DiskGuard::new(match path.parent() {
                Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
                _ => ".".into(),
            })),
            memtable: Arc::new(RwLock::new(memtable)),
            durable: Arc::new(RwLock::new(durable)),
        })
    }

    /// Free bytes to keep on the data dir's filesystem: writes that would leave less are refused
    /// with [`StoreError::DiskFull`] (see `disk.rs`). 0 turns the check off. Default
    /// [`DEFAULT_DISK_RESERVE`].
    pub fn set_disk_reserve(&self, bytes: u64) {
        self.disk.set_reserve(bytes);
    }

    /// Refuses a write of about `bytes` while the data dir is short of free space.
    pub(crate) fn check_disk(&self, bytes: u64) -> Result<(), StoreError> {
        self.disk.check(bytes)
    }

    /// Rewrites the database at `path` (and a chunk database an older build left) so that free pages (left by
    /// compacted logs, pruned snapshots, installs) are given back and the files shrink to what they
    /// hold. The files must not be open elsewhere (stop the node first). Returns each file with its
    /// size before and after. Blocking; takes about as long as reading the files.
    pub fn compact_files(path: &Path) -> Result<Vec<(std::path::PathBuf, u64, u64)>, StoreError> {
        let mut report = Vec::new();
        for file in [path.to_owned(), chunks_path(path)] {
            if !file.exists() {
                continue;
            }
            let size = |f: &Path| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0);
            let before = size(&file);
            let mut db =
                redb::Database::open(&file).map_err(|e| StoreError::Open { path: file.clone(), source: e.into() })?;
            // Each pass moves pages toward the start of the file; stop when one moves nothing.
            for _ in 0..8 {
                if !db.compact()? {
                    break;
                }
            }
            drop(db);
            report.push((file.clone(), before, size(&file)));
        }
        Ok(report)
    }

    /// A copy of the in-memory view of the last commit.
    pub fn mirror(&self) -> Mirror {
        self.mirror.read().expect("mirror lock").mirror.clone()
    }

    pub fn version_vector(&self) -> VersionVector {
        self.mirror.read().expect("mirror lock").mirror.version_vector()
    }

    /// Where `origin`'s log stands (seq 0 and the genesis chain hash for an unknown origin).
    pub fn progress(&self, origin: &Origin) -> OriginProgress {
        self.mirror.read().expect("mirror lock").mirror.progress.get(origin).copied().unwrap_or_default()
    }

    /// The state root and the version vector it belongs to, read together.
    pub fn state_root(&self) -> (StateRoot, VersionVector) {
        let p = self.mirror.read().expect("mirror lock");
        (p.root(), p.mirror.version_vector())
    }

    /// The greatest HLC this node issued or observed, as of the last commit: every op it writes
    /// later is stamped after it. Read it before the version vector to pair the two safely.
    pub fn clock(&self) -> Hlc {
        self.mirror.read().expect("mirror lock").mirror.hlc
    }

    /// The stamp up to which tombstones were collected here.
    pub fn tombstones_collected(&self) -> Hlc {
        self.mirror.read().expect("mirror lock").mirror.collected
    }

    /// Register tombstones held now.
    pub fn tombstones(&self) -> Result<u64, StoreError> {
        let (txn, pending) = self.overlay(|m| m.tombstones)?;
        let held = tombstones::count(&txn)? as i64 + pending.unwrap_or(0);
        Ok(held.max(0) as u64)
    }

    /// A state value: the memtable's when it holds one (the newest), else the table's. The memtable
    /// is emptied only after its flush committed, so a value missing from it is in any transaction
    /// begun afterwards.
    fn state_value(
        &self,
        kind: crate::snapshot::Kind,
        collection: &str,
        key: &[u8],
    ) -> Result<Option<Vec<u8>>, StoreError> {
        if let Some(v) = self.memtable.read().expect("memtable lock").get(kind, collection, key) {
            return Ok(Some(v.to_vec()));
        }
        let txn = self.db.begin_read()?;
        let table = txn.open_table(tables::STATE_TABLES[kind as usize].1)?;
        Ok(table.get((collection, key))?.map(|v| v.value().to_vec()))
    }

    /// A read transaction and what `take` copies out of the memtable to go with it: exactly the
    /// writes the transaction does not see, or `None` when it sees them all. The memtable holds what
    /// flush `generation` will write; a transaction that saw flush `generation - 1` lacks just that.
    /// One that saw an older flush began before a flush that has since emptied the memtable: it is
    /// read again.
    fn overlay<T>(
        &self,
        take: impl Fn(&memtable::Memtable) -> T,
    ) -> Result<(redb::ReadTransaction, Option<T>), StoreError> {
        // A flush is ~100 ms apart from the next: a second try finds the pair in step. The bound
        // turns a broken invariant into an error instead of a reader spinning.
        for _ in 0..1000 {
            let txn = self.db.begin_read()?;
            let flushed = flushes(&txn)?;
            let memtable = self.memtable.read().expect("memtable lock");
            if memtable.generation <= flushed {
                // Written and committed, not emptied yet: the transaction holds all of it.
                return Ok((txn, None));
            }
            if memtable.generation == flushed + 1 {
                return Ok((txn, Some(take(&memtable))));
            }
        }
        Err(StoreError::Corrupt("the memtable and the database do not pair up (flush numbers out of step)".into()))
    }

    /// The version vector of what is on disk: peers' ops are applied (and in
    /// [`Store::version_vector`]) before they are made durable, within
    /// [`REMOTE_FLUSH_INTERVAL`] or at [`WriteHandle::persist`].
    pub fn durable_version_vector(&self) -> VersionVector {
        self.durable.read().expect("durable lock").clone()
    }

    /// After a durable commit: everything the writer's `mirror` holds is on disk.
    pub(crate) fn set_durable(&self, mirror: &Mirror) {
        *self.durable.write().expect("durable lock") = mirror.version_vector();
    }

    /// Follows the version vector: changes after each commit that applied ops.
    pub fn watch_version_vector(&self) -> watch::Receiver<VersionVector> {
        self.vv_watch.subscribe()
    }

    pub(crate) fn db(&self) -> &Database {
        &self.db
    }

    pub(crate) fn chunk_files(&self) -> &ChunkFiles {
        &self.chunks
    }
}

/// The number of the last memtable flush the transaction sees (0 before the first).
fn flushes(txn: &redb::ReadTransaction) -> Result<u64, StoreError> {
    txn.open_table(META)?.get(META_FLUSH)?.map_or(Ok(0), |v| be_u64(v.value()))
}

/// Loads the mirror from the committed tables (at open).
fn load_mirror(db: &Database) -> Result<Mirror, StoreError> {
    let txn = db.begin_read()?;
    let mut mirror = Mirror::default();
    for row in txn.open_table(VERSION_VECTOR)?.iter()? {
        let (k, v) = row?;
        let origin = origin_from_bytes(k.value())?;
        mirror.progress.insert(origin, decode_progress(v.value())?);
    }
    mirror.buckets = buckets::read(&txn.open_table(BUCKET_ROWS)?)?;
    if let Some(v) = txn.open_table(META)?.get(META_HLC)? {
        mirror.hlc = decode_hlc(v.value())?;
    }
    if let Some(v) = txn.open_table(META)?.get(META_COLLECTED)? {
        mirror.collected = decode_hlc(v.value())?;
    }
    Ok(mirror)
}

pub(crate) fn origin_from_bytes(bytes: &[u8]) -> Result<Origin, StoreError> {
    Origin::from_bytes(bytes).map_err(|_| StoreError::Corrupt("stored origin is not a valid peer id".into()))
}

fn be_u64(bytes: &[u8]) -> Result<u64, StoreError> {
    Ok(u64::from_be_bytes(bytes.try_into().map_err(|_| StoreError::Corrupt("expected 8 bytes".into()))?))
}

pub(crate) fn encode_progress(p: &OriginProgress) -> [u8; 40] {
    let mut out = [0; 40];
    out[..8].copy_from_slice(&p.seq.0.to_be_bytes());
    out[8..].copy_from_slice(&p.chain.0);
    out
}

pub(crate) fn decode_progress(bytes: &[u8]) -> Result<OriginProgress, StoreError> {
    if bytes.len() != 40 {
        return Err(StoreError::Corrupt("version vector entry is not 40 bytes".into()));
    }
    Ok(OriginProgress { seq: Seq(be_u64(&bytes[..8])?), chain: ChainHash(bytes[8..].try_into().expect("32 bytes")) })
}

pub(crate) fn encode_hlc(h: Hlc) -> [u8; 12] {
    let mut out = [0; 12];
    out[..8].copy_from_slice(&h.wall_ms.to_be_bytes());
    out[8..].copy_from_slice(&h.logical.to_be_bytes());
    out
}

pub(crate) fn decode_hlc(bytes: &[u8]) -> Result<Hlc, StoreError> {
    if bytes.len() != 12 {
        return Err(StoreError::Corrupt("stored hlc is not 12 bytes".into()));
    }
    Ok(Hlc::new(be_u64(&bytes[..8])?, u32::from_be_bytes(bytes[8..].try_into().expect("4 bytes"))))
}
