//! Writer requests that run alone, each in a transaction of its own, between group commits:
//! installing a snapshot, merging state entries (repair of divergent buckets) and compacting the log.
//!
//! Running on the writer thread serializes them with every write. Each works on a copy of the mirror
//! and publishes it only once its transaction is durable, so a refused snapshot or a failed commit
//! leaves both the database and the in-memory state as they were.

use std::collections::BTreeMap;

use cid::Cid;
use redb::{ReadableTable, WriteTransaction};
use tokio::sync::oneshot;

use super::{now_ms, CommitEvent, Request, WriteHandle, Writer, WriterError, MAX_CLOCK_AHEAD_MS};
use crate::crdt::{Hlc, HlcClock};
use crate::ids::{Origin, Seq};
use crate::snapshot::{Kind, Manifest, SignedManifest, StateEntry};
use crate::store::apply::Tables;
use crate::store::chunk_files::ChunkFiles;
use crate::store::log;
use crate::store::snapshots::{keep_manifest, latest_in};
use crate::store::staging::{self, Staged};
use crate::store::tables::*;
use crate::store::{encode_hlc, encode_progress, Mirror, OriginProgress, SnapshotError, StoreError};

/// A maintenance request and where its answer goes.
pub(in crate::store) enum Task {
    Install { manifest: Box<SignedManifest>, reply: oneshot::Sender<Result<InstallOutcome, WriterError>> },
    Merge { entries: Vec<StateEntry>, reply: oneshot::Sender<Result<MergeOutcome, WriterError>> },
    Compact { keep_ops: u64, keep_bytes: u64, reply: oneshot::Sender<Result<CompactOutcome, WriterError>> },
    CollectTombstones { through: Hlc, reply: oneshot::Sender<Result<u64, WriterError>> },
}

impl Task {
    /// Answers a task that will not run with `Closed`.
    pub(super) fn abandon(self) {
        self.refuse(WriterError::Closed)
    }

    fn refuse(self, e: WriterError) {
        match self {
            Task::Install { reply, .. } => drop(reply.send(Err(e))),
            Task::Merge { reply, .. } => drop(reply.send(Err(e))),
            Task::Compact { reply, .. } => drop(reply.send(Err(e))),
            Task::CollectTombstones { reply, .. } => drop(reply.send(Err(e))),
        }
    }
}

/// What installing a snapshot did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InstallOutcome {
    /// The local version vector already covered the snapshot's: nothing was read or written.
    AlreadyCovered,
    Installed {
        /// The manifest CID; the snapshot is now held and can be served.
        cid: Cid,
        /// Entries merged, and how many of them changed the local state.
        entries: u64,
        changed: u64,
        /// Origins the snapshot was ahead for: `(origin, local seq before, snapshot seq)`. Their log
        /// now starts after the snapshot seq (the log floor).
        advanced: Vec<(Origin, Seq, Seq)>,
    },
}

/// What merging state entries did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MergeOutcome {
    pub entries: u64,
    /// Entries that changed the local state.
    pub changed: u64,
}

/// What compaction did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CompactOutcome {
    /// Origins whose floor rose: `(origin, old floor, new floor)`.
    pub floors: Vec<(Origin, Seq, Seq)>,
    pub ops_deleted: u64,
}

impl WriteHandle {
    /// Installs a snapshot whose chunks are all held (see `Store::put_chunk`): verifies the manifest,
    /// every chunk and the state root, merges the entries into the local state, and moves the log of
    /// every origin the snapshot is ahead for to the snapshot's seq. One transaction: all or nothing.
    /// Whether the creator and cluster are acceptable is the caller's decision.
    pub async fn install_snapshot(&self, manifest: SignedManifest) -> Result<InstallOutcome, WriterError> {
        let (reply, rx) = oneshot::channel();
        let task = Task::Install { manifest: Box::new(manifest), reply };
        self.tx.send(Request::Maintenance(task)).await.map_err(|_| WriterError::Closed)?;
        rx.await.map_err(|_| WriterError::Closed)?
    }

    /// Merges state entries (as `Store::entries_in_buckets` returns them) with the CRDT merges,
    /// without touching the version vector or the log: repairs buckets that diverged. All or nothing.
    pub async fn merge_entries(&self, entries: Vec<StateEntry>) -> Result<MergeOutcome, WriterError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Request::Maintenance(Task::Merge { entries, reply })).await.map_err(|_| WriterError::Closed)?;
        rx.await.map_err(|_| WriterError::Closed)?
    }

    /// Drops the register tombstones stamped at or before `through`, in transactions of a bounded
    /// size. Returns how many went. Which stamp is safe is the sync engine's decision.
    pub async fn collect_tombstones(&self, through: Hlc) -> Result<u64, WriterError> {
        let (reply, rx) = oneshot::channel();
        let task = Task::CollectTombstones { through, reply };
        self.tx.send(Request::Maintenance(task)).await.map_err(|_| WriterError::Closed)?;
        rx.await.map_err(|_| WriterError::Closed)?
    }

    /// Per origin, deletes the log older than its newest `keep_ops` ops and newest `keep_bytes` op
    /// bytes (whichever keeps more), but never past what the latest held snapshot covers, and raises
    /// the log floors. Without a snapshot nothing is compacted.
    pub async fn compact(&self, keep_ops: u64, keep_bytes: u64) -> Result<CompactOutcome, WriterError> {
        let (reply, rx) = oneshot::channel();
        let task = Task::Compact { keep_ops, keep_bytes, reply };
        self.tx.send(Request::Maintenance(task)).await.map_err(|_| WriterError::Closed)?;
        rx.await.map_err(|_| WriterError::Closed)?
    }
}

/// The working copies a maintenance transaction changes; kept only if it commits.
struct Work {
    mirror: Mirror,
    clock: HlcClock,
    event: CommitEvent,
}

fn refused(e: impl Into<SnapshotError>) -> WriterError {
    WriterError::Store(std::sync::Arc::new(StoreError::from(e.into())))
}

fn store_err(e: impl Into<StoreError>) -> WriterError {
    WriterError::Store(std::sync::Arc::new(e.into()))
}

impl Writer {
    /// Commits a group in runs of ordinary requests, with each maintenance task alone in between, in
    /// the order they were queued.
    pub(super) fn commit_segments(&mut self, group: Vec<Request>) {
        let mut run = Vec::new();
        for request in group {
            match request {
                Request::Maintenance(task) => {
                    if !run.is_empty() {
                        self.commit_group(std::mem::take(&mut run));
                    }
                    self.run_task(task);
                }
                other => run.push(other),
            }
        }
        if !run.is_empty() {
            self.commit_group(run);
        }
    }

    fn run_task(&mut self, task: Task) {
        // Installs and merges write the state; compaction and collection only free space, so they
        // always run.
        if !matches!(task, Task::Compact { .. } | Task::CollectTombstones { .. }) {
            if let Err(e) = self.store.check_disk(0) {
                return task.refuse(store_err(e));
            }
        }
        match task {
            Task::Install { manifest, reply } => drop(reply.send(self.install(&manifest))),
            Task::Merge { entries, reply } => {
                let r = self.transact(|txn, work| {
                    let mut tables = Tables::open(txn)?;
                    let mut changed = 0;
                    for (index, entry) in entries.iter().enumerate() {
                        changed += merge_one(&mut tables, work, index as u64, entry)? as u64;
                    }
                    persist_buckets(txn, &mut tables, &work.mirror)?;
                    Ok(MergeOutcome { entries: entries.len() as u64, changed })
                });
                drop(reply.send(r));
            }
            Task::CollectTombstones { through, reply } => {
                let mut total = 0;
                let result = loop {
                    let step = self.transact(|txn, work| {
                        let (n, more) = crate::store::tombstones::collect(txn, through)?;
                        work.mirror.collected = work.mirror.collected.max(through);
                        Ok((n, more))
                    });
                    match step {
                        Ok((n, more)) => {
                            total += n;
                            if !more {
                                break Ok(total);
                            }
                        }
                        Err(e) => break Err(e),
                    }
                };
                drop(reply.send(result));
            }
            Task::Compact { keep_ops, keep_bytes, reply } => {
                drop(reply.send(self.transact(|txn, work| compact(txn, &work.mirror, keep_ops, keep_bytes))));
            }
        }
    }

    fn install(&mut self, signed: &SignedManifest) -> Result<InstallOutcome, WriterError> {
        let manifest = signed.verify().map_err(refused)?;
        let cid = signed.cid();
        if self.mirror.version_vector().dominates(&manifest.version_vector) {
            // What was staged for it is of no use any more.
            self.transact(|txn, _| match Staged::load(txn)?.manifest == Some(cid) {
                true => staging::clear(txn),
                false => Ok(()),
            })?;
            return Ok(InstallOutcome::AlreadyCovered);
        }
        // Staged chunks may have been stored without fsync: they are durable before the manifest
        // that lists them is kept.
        let store = self.store.clone();
        store.chunk_files().sync().map_err(store_err)?;
        self.transact(|txn, work| {
            let (entries, changed) = install_staged(txn, store.chunk_files(), work, &cid, &manifest)?;
            let advanced = advance_logs(txn, &mut work.mirror, &manifest)?;
            keep_manifest(txn, &cid, &signed.encode())?;
            work.event.snapshot_installed = Some(cid);
            Ok(InstallOutcome::Installed { cid, entries, changed, advanced })
        })
    }

    /// Runs `f` in a write transaction of its own on copies of the mirror and clock, and keeps them,
    /// publishes the mirror and the version vector and sends the commit event only once it committed.
    fn transact<T>(
        &mut self,
        f: impl FnOnce(&WriteTransaction, &mut Work) -> Result<T, StoreError>,
    ) -> Result<T, WriterError> {
        let mut work = Work { mirror: self.mirror.clone(), clock: self.clock, event: CommitEvent::default() };
        let txn = self.store.db().begin_write().map_err(store_err)?;
        // The memtable goes first, so the task sees (and changes) the whole state in redb.
        let wrote = self.write_unwritten(&txn).map_err(store_err)?;
        // On error the transaction is dropped uncommitted: redb rolls it back.
        let value = f(&txn, &mut work).map_err(store_err)?;
        if work.clock.last() != self.clock.last() {
            work.mirror.hlc = work.clock.last();
            let mut meta = txn.open_table(META).map_err(store_err)?;
            meta.insert(META_HLC, encode_hlc(work.mirror.hlc).as_slice()).map_err(store_err)?;
        }
        txn.commit().map_err(store_err)?;
        // Peers' ops written without fsync until now are on disk as well: the node hears of it
        // (acknowledgements wait for that), as after a flush.
        let persisted = wrote || self.unflushed;
        self.mirror = work.mirror;
        self.clock = work.clock;
        self.committed(wrote, true);
        self.store.publish(&self.mirror, None);
        let e = work.event;
        if e.snapshot_installed.is_some() || !e.leases.is_empty() || persisted {
            let _ = self.events.send(std::sync::Arc::new(e));
        }
        Ok(value)
    }
}

/// Merges one entry, keeping the working mirror's buckets and clock in step. Returns whether it
/// changed the state.
fn merge_one(tables: &mut Tables, work: &mut Work, index: u64, entry: &StateEntry) -> Result<bool, StoreError> {
    let effect = tables.merge_entry(&mut work.mirror.buckets, index, entry, work.mirror.collected)?;
    // A stamp far ahead of the wall clock is merged, but the clock does not follow it.
    if let Some(hlc) = effect.hlc.filter(|h| h.wall_ms <= now_ms().saturating_add(MAX_CLOCK_AHEAD_MS)) {
        work.clock.observe(hlc);
    }
    if let Some(state) = effect.lease {
        work.event.leases.push((entry.collection.clone(), entry.key.clone(), state));
    }
    Ok(effect.changed)
}

/// Writes the buckets the transaction touched.
fn persist_buckets(txn: &WriteTransaction, tables: &mut Tables, mirror: &Mirror) -> Result<(), StoreError> {
    crate::store::buckets::write_dirty(txn, &mirror.buckets, &std::mem::take(&mut tables.changes).dirty)
}

/// Brings the snapshot's entries into the local state: stages the chunks held but not staged yet
/// (put with `Store::put_chunk`, or staged before a restart under another manifest), checks that the
/// staged entries hash to the manifest's state root and match its collection counts, then renames
/// the staging tables into place when the local state is empty, or merges them into it. Returns
/// (entries, changed).
fn install_staged(
    txn: &WriteTransaction,
    chunks: &ChunkFiles,
    work: &mut Work,
    cid: &Cid,
    manifest: &Manifest,
) -> Result<(u64, u64), StoreError> {
    staging::begin(txn, cid)?;
    let (mut missing, mut unstaged) = (Vec::new(), Vec::new());
    for c in &manifest.chunks {
        if staging::is_staged(txn, &c.cid)? {
            continue;
        }
        // Checked here: a chunk cut short by a crash is removed and counts as missing.
        match chunks.get_checked(&c.cid)? {
            Some(bytes) => unstaged.push((c, bytes)),
            None => missing.push(c.cid),
        }
    }
    if let Some(first) = missing.first() {
        return Err(SnapshotError::MissingChunks { manifest: *cid, missing: missing.len(), first: *first }.into());
    }
    let horizon = now_ms().saturating_add(MAX_CLOCK_AHEAD_MS);
    for (c, bytes) in unstaged {
        staging::stage(txn, cid, &staging::prepare_chunk(c, &bytes, horizon)?)?;
    }

    let staged = Staged::load(txn)?;
    if staged.buckets.root() != manifest.state_root {
        return Err(SnapshotError::RootMismatch { claimed: manifest.state_root, found: staged.buckets.root() }.into());
    }
    let mut claimed: BTreeMap<(Kind, String), u64> =
        manifest.collections.iter().map(|c| ((c.kind, c.name.clone()), c.entries)).collect();
    for ((kind, name), found) in &staged.counts {
        let claimed = claimed.remove(&(*kind, name.clone())).unwrap_or(0);
        if claimed != *found {
            return Err(SnapshotError::CountMismatch { kind: *kind, name: name.clone(), claimed, found: *found }.into());
        }
    }
    if let Some(((kind, name), claimed)) = claimed.into_iter().find(|(_, n)| *n > 0) {
        return Err(SnapshotError::CountMismatch { kind, name, claimed, found: 0 }.into());
    }

    let entries = manifest.entries();
    let changed = if staging::state_is_empty(txn)? {
        staging::adopt(txn, &staged)?;
        work.mirror.buckets = staged.buckets;
        crate::store::buckets::write_all(txn, &work.mirror.buckets)?;
        if let Some(hlc) = staged.hlc {
            work.clock.observe(hlc);
        }
        for row in txn.open_table(LEASES)?.iter()? {
            let (k, v) = row?;
            let (lease, key) = k.value();
            let state = crate::store::encoding::decode(v.value(), "lease")?;
            work.event.leases.push((lease.to_owned(), key.to_vec(), state));
        }
        entries
    } else {
        let mut tables = Tables::open(txn)?;
        let (mut index, mut changed) = (0u64, 0u64);
        staging::for_each_staged(txn, |entry| {
            changed += merge_one(&mut tables, work, index, &entry)? as u64;
            index += 1;
            Ok(())
        })?;
        // The logs have not advanced yet: `progress` is what this node held before the snapshot.
        let progress = &work.mirror.progress;
        let covered = |origin: &Origin| {
            let have = progress.get(origin).map_or(Seq::ZERO, |p| p.seq);
            manifest.version_vector.get(origin) >= have
        };
        let staged = txn.open_table(STAGE_REGISTERS)?;
        let dropped = tables.drop_collected_registers(&mut work.mirror.buckets, &staged, covered)?;
        if dropped > 0 {
            tracing::info!(dropped, "dropped local entries the snapshot shows deleted and collected");
        }
        changed += dropped;
        persist_buckets(txn, &mut tables, &work.mirror)?;
        changed
    };
    staging::clear(txn)?;
    Ok((entries, changed))
}

/// For every origin the snapshot is ahead for: its progress becomes the snapshot's (seq, head), its
/// log floor the snapshot seq, and its older log entries and signed heads go (they no longer join
/// the log that continues after the floor).
fn advance_logs(
    txn: &WriteTransaction,
    mirror: &mut Mirror,
    manifest: &Manifest,
) -> Result<Vec<(Origin, Seq, Seq)>, StoreError> {
    let mut oplog = txn.open_table(OPLOG)?;
    let mut heads = txn.open_table(HEADS)?;
    let mut counts = txn.open_table(LOG_COUNTS)?;
    let mut floors = txn.open_table(LOG_FLOORS)?;
    let mut vv = txn.open_table(VERSION_VECTOR)?;
    let mut advanced = Vec::new();
    for (origin, seq) in &manifest.version_vector.0 {
        let have = mirror.progress.get(origin).map_or(Seq::ZERO, |p| p.seq);
        if *seq <= have {
            continue;
        }
        let ob = origin.to_bytes();
        // The local log of this origin ends at `have`, before the snapshot's seq: all of it goes.
        log::delete_upto(&mut oplog, &mut heads, &mut counts, &ob, seq.0)?;
        floors.insert(ob.as_slice(), seq.0)?;
        let progress = OriginProgress { seq: *seq, chain: manifest.heads[origin] };
        vv.insert(ob.as_slice(), encode_progress(&progress).as_slice())?;
        mirror.progress.insert(*origin, progress);
        advanced.push((*origin, have, *seq));
    }
    Ok(advanced)
}

fn compact(
    txn: &WriteTransaction,
    mirror: &Mirror,
    keep_ops: u64,
    keep_bytes: u64,
) -> Result<CompactOutcome, StoreError> {
    let mut outcome = CompactOutcome::default();
    let Some(snapshot) = latest_in(txn)? else {
        return Ok(outcome);
    };
    let mut oplog = txn.open_table(OPLOG)?;
    let mut heads = txn.open_table(HEADS)?;
    let mut counts = txn.open_table(LOG_COUNTS)?;
    let mut floors = txn.open_table(LOG_FLOORS)?;
    for (origin, progress) in &mirror.progress {
        let ob = origin.to_bytes();
        let floor = floors.get(ob.as_slice())?.map_or(0, |f| f.value());
        let cap = snapshot.version_vector.get(origin).min(progress.seq).0;
        if cap <= floor {
            continue;
        }
        // Walk back from the newest row until both quotas are met; the rows before may go, as far
        // as the snapshot covers them. Whole rows only: a row is a signed batch.
        let (mut kept_ops, mut kept_bytes, mut new_floor) = (0u64, 0u64, floor);
        for row in oplog.range((ob.as_slice(), floor + 1)..=(ob.as_slice(), progress.seq.0))?.rev() {
            let (k, v) = row?;
            let last = k.value().1;
            if kept_ops >= keep_ops && kept_bytes >= keep_bytes && last <= cap {
                new_floor = last;
                break;
            }
            let ops = log::decode_row(last, v.value())?;
            kept_ops += ops.len() as u64;
            kept_bytes += ops.iter().map(|o| o.bytes.len() as u64).sum::<u64>();
        }
        if new_floor <= floor {
            continue;
        }
        let deleted = log::delete_upto(&mut oplog, &mut heads, &mut counts, &ob, new_floor)?;
        floors.insert(ob.as_slice(), new_floor)?;
        outcome.ops_deleted += deleted;
        outcome.floors.push((*origin, Seq(floor), Seq(new_floor)));
    }
    Ok(outcome)
}
