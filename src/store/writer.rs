//! The single writer: a thread that group-commits local writes and remote op batches.
//!
//! Requests queue on a bounded channel. The thread takes the first, then every request already queued
//! (up to [`WriterConfig::max_group_ops`]), applies them all in one redb transaction and answers each
//! one only after the commit is durable. Under load many writes share one fsync; an idle writer
//! commits a lone request at once, so grouping adds no waiting. A small group of peers' ops opens
//! no transaction: it is applied in the memtable (see `memtable.rs`), which the next transaction
//! writes.
//!
//! Local ops are numbered, stamped and threaded into this node's hash chain here, and the chain head
//! is signed every [`WriterConfig::batch_max_ops`] ops or [`WriterConfig::batch_max_bytes`] bytes,
//! so the batches published afterwards stay under the gossip size limit.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::{broadcast, mpsc, oneshot};

mod flush;
mod maintenance;
mod ops;
mod types;

use flush::Unwritten;
use ops::{LocalFailure, OpenBatch};

pub use maintenance::{CompactOutcome, InstallOutcome, MergeOutcome};
pub use types::*;

use super::apply::{Prepared, StateSink, Tables};
use super::memtable::MemSink;
use super::publish::Changed;
use super::{Mirror, Store, StoreError};
use crate::crdt::HlcClock;
use crate::ids::Origin;
use crate::op::{Signer, VerifiedBatch};

enum Request {
    Local {
        intents: Vec<LocalIntent>,
        reply: oneshot::Sender<Result<Vec<AppliedOp>, WriterError>>,
    },
    Remote {
        batch: Box<VerifiedBatch>,
        /// Each op's `Prepared::of`, made by the sender.
        prepared: Vec<Prepared>,
        reply: oneshot::Sender<Result<RemoteOutcome, WriterError>>,
    },
    /// Commit what came before, then stop: later writes fail with `Closed`.
    Stop,
    /// Make every write so far durable (see `Writer::unflushed`), then answer (if asked to).
    Flush(Option<oneshot::Sender<()>>),
    /// Snapshot install, entry merge or compaction: runs alone in its own transaction (see
    /// `maintenance`).
    Maintenance(maintenance::Task),
}

impl Request {
    fn ops(&self) -> usize {
        match self {
            Request::Local { intents, .. } => intents.len(),
            Request::Remote { batch, .. } => batch.ops.len(),
            Request::Stop | Request::Flush(_) | Request::Maintenance(_) => 0,
        }
    }

    /// Roughly what the request adds to the files: each op is written to the log and the state,
    /// and a commit rewrites the pages it touches.
    fn disk_bytes(&self) -> u64 {
        let ops: usize = match self {
            Request::Local { intents, .. } => intents
                .iter()
                .map(|i| match i {
                    LocalIntent::Put { register, key, value } => register.len() + key.len() + value.len(),
                    LocalIntent::Delete { register: name, key }
                    | LocalIntent::CounterAdd { counter: name, key, .. }
                    | LocalIntent::Lease { lease: name, key, .. } => name.len() + key.len() + 64,
                })
                .sum(),
            Request::Remote { batch, .. } => batch.ops.iter().map(|o| o.bytes.len()).sum(),
            Request::Stop | Request::Flush(_) | Request::Maintenance(_) => 0,
        };
        ops as u64 * 3
    }
}

/// Sends writes to the writer thread. Cloneable.
#[derive(Clone, Debug)]
pub struct WriteHandle {
    tx: mpsc::Sender<Request>,
}

impl WriteHandle {
    /// Commits the intents atomically (all or none) and returns one applied op per intent.
    pub async fn local(&self, intents: Vec<LocalIntent>) -> Result<Vec<AppliedOp>, WriterError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Request::Local { intents, reply }).await.map_err(|_| WriterError::Closed)?;
        rx.await.map_err(|_| WriterError::Closed)?
    }

    /// Applies a verified batch of another origin's ops.
    pub async fn remote(&self, batch: VerifiedBatch) -> Result<RemoteOutcome, WriterError> {
        self.submit_remote(batch).await?.await.map_err(|_| WriterError::Closed)?
    }

    /// Queues a verified batch and returns at once with a receiver for the outcome, so a caller can
    /// keep verifying the next batches while this one commits. Batches queued by one caller are
    /// applied in the order queued. What of applying them depends on the ops alone (hashing and
    /// encoding their entries, see `Prepared`) is done here, by the caller, not by the writer.
    pub async fn submit_remote(
        &self,
        batch: VerifiedBatch,
    ) -> Result<oneshot::Receiver<Result<RemoteOutcome, WriterError>>, WriterError> {
        let origin_bytes = batch.origin.to_bytes();
        let prepared = batch.ops.iter().map(|v| Prepared::of(&v.op, &origin_bytes)).collect();
        let (reply, rx) = oneshot::channel();
        let request = Request::Remote { batch: Box::new(batch), prepared, reply };
        self.tx.send(request).await.map_err(|_| WriterError::Closed)?;
        Ok(rx)
    }

    /// Makes the commits of peers' ops so far durable. The node calls this every
    /// [`REMOTE_FLUSH_INTERVAL`]; local writes are durable before they are acknowledged anyway.
    pub async fn flush(&self) {
        let _ = self.tx.send(Request::Flush(None)).await;
    }

    /// Makes everything applied so far durable in redb (peers' ops in the memtable included), and
    /// returns once it is: a snapshot made afterwards covers every op applied before the call.
    pub async fn persist(&self) -> Result<(), WriterError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Request::Flush(Some(reply))).await.map_err(|_| WriterError::Closed)?;
        rx.await.map_err(|_| WriterError::Closed)
    }

    /// Asks the writer to stop after committing every write queued before this call.
    pub async fn stop(&self) {
        let _ = self.tx.send(Request::Stop).await;
    }
}

impl Store {
    /// Starts the writer thread. It stops when every [`WriteHandle`] is dropped.
    pub fn spawn_writer(
        &self,
        signer: Signer,
        config: WriterConfig,
        events: broadcast::Sender<Arc<CommitEvent>>,
    ) -> (WriteHandle, std::thread::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(config.queue.max(1));
        let mirror = self.mirror();
        let writer = Writer {
            store: self.clone(),
            clock: HlcClock::resume(mirror.hlc),
            mirror,
            signer,
            config,
            events,
            unflushed: false,
            unwritten: Unwritten::default(),
            disk_full: false,
        };
        let join = std::thread::Builder::new()
            .name("peersync-writer".into())
            .spawn(move || writer.run(rx))
            .expect("spawn writer thread");
        (WriteHandle { tx }, join)
    }
}

struct Writer {
    store: Store,
    /// Working copy of the mirror; published to readers after each commit.
    mirror: Mirror,
    clock: HlcClock,
    signer: Signer,
    config: WriterConfig,
    events: broadcast::Sender<Arc<CommitEvent>>,
    /// Whether commits were made without fsync since the last durable one. Peers' ops are written
    /// that way (in the memtable, or a large group of them): they are visible at once, the next
    /// durable commit persists them, and a crash in between only loses ops that their origins hold
    /// durably and peers re-serve.
    unflushed: bool,
    /// What the memtable's groups changed of the mirror, to write with the memtable.
    unwritten: Unwritten,
    /// Whether the last group was refused for want of free space (logged once, not per group).
    disk_full: bool,
}

/// Groups of peers' ops with fewer ops than this are applied in the memtable; a larger group (a
/// replay, a catch-up, replicated batches under load) shares one transaction among enough ops to
/// pay for it, and skips the memtable's extra copies. A transaction costs about as much as 20-40
/// ops applied (W3 and W4 of `scripts/bench.sh`: 60 µs of the writer per single-op group, against
/// 2-3 µs per op in large groups).
const MEMTABLE_GROUP_OPS: usize = 32;

/// How often the commits of peers' ops are made durable (at most this much of them can be lost in
/// a crash, to be pulled again).
pub const REMOTE_FLUSH_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

/// An answer held back until the commit is durable.
enum Pending {
    Local(oneshot::Sender<Result<Vec<AppliedOp>, WriterError>>, Result<Vec<AppliedOp>, WriterError>),
    Remote(oneshot::Sender<Result<RemoteOutcome, WriterError>>, Result<RemoteOutcome, WriterError>),
}

pub(in crate::store) fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Request>) {
        let mut stopping = false;
        while !stopping {
            let Some(first) = rx.blocking_recv() else {
                break;
            };
            let mut ops = first.ops();
            let mut group = vec![first];
            while ops < self.config.max_group_ops {
                match rx.try_recv() {
                    Ok(r) => {
                        ops += r.ops();
                        group.push(r);
                    }
                    Err(_) => break,
                }
            }
            if let Some(i) = group.iter().position(|r| matches!(r, Request::Stop)) {
                stopping = true;
                group.drain(i..).for_each(abandon);
            }
            let mut flush = stopping;
            let mut flushed = Vec::new();
            group.retain_mut(|r| match r {
                Request::Flush(reply) => {
                    flush = true;
                    flushed.extend(reply.take());
                    false
                }
                _ => true,
            });
            if !group.is_empty() {
                self.commit_segments(group);
            }
            if flush {
                self.flush(true);
            }
            for reply in flushed {
                let _ = reply.send(());
            }
        }
        // Every handle gone (or a stop): what the memtable holds goes to disk before the thread ends.
        self.flush(true);
        rx.close();
        // Whatever raced in after the stop is refused, not silently dropped.
        while let Ok(late) = rx.try_recv() {
            abandon(late);
        }
        tracing::debug!("writer stopped");
    }

    fn commit_group(&mut self, group: Vec<Request>) {
        let mut event = CommitEvent::default();
        let mut pending = Vec::with_capacity(group.len());
        match self.try_commit(group, &mut pending, &mut event) {
            Ok(changed) => {
                if std::mem::take(&mut self.disk_full) {
                    tracing::info!("the data dir has free space again; writes are accepted");
                }
                self.store.publish(&self.mirror, Some(&changed));
                for p in pending {
                    match p {
                        Pending::Local(tx, r) => drop(tx.send(r)),
                        Pending::Remote(tx, r) => drop(tx.send(r)),
                    }
                }
                if !(event.local_batches.is_empty() && event.remote.is_empty() && event.leases.is_empty()) {
                    // No subscriber is fine: a node without network has nobody to publish to.
                    let _ = self.events.send(Arc::new(event));
                }
            }
            Err(e) => {
                let disk_full = matches!(e, StoreError::DiskFull { .. });
                if !disk_full {
                    tracing::error!(error = %e, "group commit failed; its writes were not acknowledged");
                } else if !self.disk_full {
                    tracing::warn!(error = %e, "refusing writes until the data dir has free space again");
                }
                self.disk_full = disk_full;
                let e = Arc::new(e);
                for p in pending {
                    match p {
                        Pending::Local(tx, _) => drop(tx.send(Err(WriterError::Store(e.clone())))),
                        Pending::Remote(tx, _) => drop(tx.send(Err(WriterError::Store(e.clone())))),
                    }
                }
                // `try_commit` put the working copy back as it was before the group.
            }
        }
    }

    /// Applies and commits a group, pushing each request's answer to `pending`. On error nothing of
    /// the group was committed, the working mirror is as it was before, and the caller tells every
    /// pending request so.
    ///
    /// A small group of peers' ops only is applied in the memtable (see `memtable.rs`). Any other
    /// group is committed in redb together with the memtable: durably when it holds a local write,
    /// which is acknowledged, and without fsync otherwise (the next durability tick persists it).
    fn try_commit(
        &mut self,
        group: Vec<Request>,
        pending: &mut Vec<Pending>,
        event: &mut CommitEvent,
    ) -> Result<Changed, StoreError> {
        let durable = group.iter().any(|r| matches!(r, Request::Local { .. }));
        let in_memory = !durable && group.iter().map(Request::ops).sum::<usize>() < MEMTABLE_GROUP_OPS;
        let bytes = group.iter().map(Request::disk_bytes).sum();
        let full = in_memory && self.store.memtable.read().expect("memtable lock").bytes >= self.config.memtable_bytes;
        let begun = self.store.check_disk(bytes).and_then(|()| match in_memory {
            false => {
                let mut txn = self.store.db().begin_write()?;
                if !durable {
                    txn.set_durability(redb::Durability::None)?;
                }
                Ok(Some(txn))
            }
            // A memtable at its bound is written out before it takes more.
            true if full => self.try_flush(false).map(|()| None),
            true => Ok(None),
        });
        let txn = match begun {
            Ok(t) => t,
            Err(e) => {
                // Nothing was applied; the caller answers every request with the error.
                for r in group {
                    match r {
                        Request::Local { reply, .. } => pending.push(Pending::Local(reply, Err(WriterError::Closed))),
                        Request::Remote { reply, .. } => pending.push(Pending::Remote(reply, Err(WriterError::Closed))),
                        other => abandon(other),
                    }
                }
                return Err(e);
            }
        };
        let progress = self.mirror.progress.clone();
        let (mut delta, mut wrote) = (None, false);
        let (run, changes) = match &txn {
            Some(txn) => {
                // The memtable goes in first: the group's local writes read the state through the
                // tables, and a value still in the memtable is newer than the table's.
                wrote = match self.write_unwritten(txn) {
                    Ok(wrote) => wrote,
                    Err(e) => {
                        group.into_iter().for_each(abandon);
                        return Err(e);
                    }
                };
                let mut tables = Tables::open(txn)?;
                let run = self.run_group(&mut tables, group, pending, event);
                (run, std::mem::take(&mut tables.changes))
            }
            None => {
                let mut sink = MemSink::new(self.store.clone());
                let run = self.run_group(&mut sink, group, pending, event);
                let changes = std::mem::take(&mut sink.changes);
                delta = Some(sink.delta);
                (run, changes)
            }
        };
        self.mirror.hlc = self.clock.last();
        let committed = run.and_then(|touched| {
            if let Some(txn) = txn {
                self.write_group(&txn, &touched, &changes.dirty)?;
                txn.commit()?;
                self.committed(wrote, durable);
            } else if let Some(delta) = delta {
                self.memtable_took(delta, &touched, &changes.dirty);
            }
            Ok(touched)
        });
        match committed {
            Ok(origins) => Ok(Changed { buckets: changes.dirty, origins }),
            Err(e) => {
                changes.undo(&mut self.mirror.buckets);
                self.mirror.progress = progress;
                Err(e)
            }
        }
    }

    /// Applies a group's requests through `sink`, pushing each answer to `pending`, and signs the
    /// local ops left open. Returns the origins whose progress moved.
    fn run_group(
        &mut self,
        sink: &mut impl StateSink,
        group: Vec<Request>,
        pending: &mut Vec<Pending>,
        event: &mut CommitEvent,
    ) -> Result<BTreeSet<Origin>, StoreError> {
        let me = self.signer.origin();
        let mut open = OpenBatch::default();
        let mut touched = BTreeSet::new();
        let mut requests = group.into_iter();
        while let Some(request) = requests.next() {
            let failure = match request {
                Request::Local { intents, reply } => match self.apply_local(sink, intents, &mut open, event) {
                    Ok(applied) => {
                        touched.insert(me);
                        pending.push(Pending::Local(reply, Ok(applied)));
                        None
                    }
                    Err(LocalFailure::Store(e)) => {
                        pending.push(Pending::Local(reply, Err(WriterError::Closed)));
                        Some(e)
                    }
                },
                Request::Remote { batch, prepared, reply } => {
                    let origin = batch.origin;
                    match self.apply_remote(sink, *batch, prepared, event) {
                        Ok(outcome) => {
                            if matches!(outcome, RemoteOutcome::Applied { .. }) {
                                touched.insert(origin);
                            }
                            pending.push(Pending::Remote(reply, Ok(outcome)));
                            None
                        }
                        Err(e) => {
                            pending.push(Pending::Remote(reply, Err(WriterError::Closed)));
                            Some(e)
                        }
                    }
                }
                Request::Stop | Request::Flush(_) => None,
                // `commit_segments` never puts one in a group; refuse rather than run it half-way.
                Request::Maintenance(task) => {
                    task.abandon();
                    None
                }
            };
            if let Some(e) = failure {
                requests.for_each(abandon);
                return Err(e);
            }
        }
        self.seal_batch(sink, &mut open, event)?;
        Ok(touched)
    }
}

/// How far ahead of the local wall clock a remote timestamp may pull the local HLC.
pub(in crate::store) use crate::crdt::MAX_CLOCK_AHEAD_MS;

/// Answers a request that will not be carried out with `Closed`.
fn abandon(r: Request) {
    match r {
        Request::Local { reply, .. } => drop(reply.send(Err(WriterError::Closed))),
        Request::Remote { reply, .. } => drop(reply.send(Err(WriterError::Closed))),
        Request::Stop => {}
        // Dropping the reply tells a waiting `persist` that the flush did not happen.
        Request::Flush(_) => {}
        Request::Maintenance(task) => task.abandon(),
    }
}
