//! Writing the memtable out: the transaction that carries the memtable (and the progress, buckets
//! and clock its groups changed) into redb, on the durability tick, at its bound, or inside any other
//! commit of the writer; and what a commit that holds everything applied so far means afterwards.

use std::collections::BTreeSet;
use std::sync::Arc;

use super::{CommitEvent, Writer};
use crate::ids::Origin;
use crate::store::buckets::DirtyBuckets;
use crate::store::memtable::Memtable;
use crate::store::tables::*;
use crate::store::{encode_hlc, encode_progress, StoreError};

/// The mirror's parts that groups applied in the memtable changed since the last flush.
#[derive(Default)]
pub(super) struct Unwritten {
    origins: BTreeSet<Origin>,
    buckets: DirtyBuckets,
}

impl Writer {
    /// Writes the memtable to redb in a transaction of its own, durable when asked (which also
    /// persists every non-durable commit before it). A failure is logged and the memtable kept, to
    /// be written by the next flush.
    pub(super) fn flush(&mut self, durable: bool) {
        if let Err(e) = self.try_flush(durable) {
            tracing::error!(error = %e, "could not write peers' ops to disk; will try again");
        }
    }

    pub(super) fn try_flush(&mut self, durable: bool) -> Result<(), StoreError> {
        let empty = self.store.memtable.read().expect("memtable lock").is_empty();
        if empty && !(durable && self.unflushed) {
            return Ok(());
        }
        let mut txn = self.store.db().begin_write()?;
        if !durable {
            txn.set_durability(redb::Durability::None)?;
        }
        let wrote = self.write_unwritten(&txn)?;
        txn.commit()?;
        self.committed(wrote, durable);
        if durable {
            // Tells the node that what it applied is on disk (acknowledgements wait for that).
            let _ = self.events.send(Arc::new(CommitEvent::default()));
        }
        Ok(())
    }

    /// Writes the memtable, and the progress and buckets its groups changed, into `txn`. Returns
    /// whether there was anything; [`Writer::memtable_written`] empties it once `txn` commits.
    pub(super) fn write_unwritten(&self, txn: &redb::WriteTransaction) -> Result<bool, StoreError> {
        let memtable = self.store.memtable.read().expect("memtable lock");
        if memtable.is_empty() && self.unwritten.origins.is_empty() {
            return Ok(false);
        }
        memtable.write(txn)?;
        self.write_group(txn, &self.unwritten.origins, &self.unwritten.buckets)?;
        Ok(true)
    }

    /// A transaction holding everything applied so far committed: the memtable is empty if it was
    /// `wrote` into it, and, if `durable`, the whole mirror is on disk.
    pub(super) fn committed(&mut self, wrote: bool, durable: bool) {
        if wrote {
            self.memtable_written();
        }
        self.unflushed = !durable;
        if durable {
            self.store.set_durable(&self.mirror);
        }
    }

    /// A group applied in its own memtable (`delta`) succeeded: the store's memtable takes it, and
    /// the progress of `touched` and the `dirty` buckets are written with it.
    pub(super) fn memtable_took(&mut self, delta: Memtable, touched: &BTreeSet<Origin>, dirty: &DirtyBuckets) {
        self.store.memtable.write().expect("memtable lock").absorb(delta);
        self.unwritten.origins.extend(touched.iter().copied());
        for b in dirty.iter() {
            self.unwritten.buckets.insert(b);
        }
    }

    /// The transaction that [`Writer::write_unwritten`] wrote into committed.
    fn memtable_written(&mut self) {
        self.store.memtable.write().expect("memtable lock").flushed();
        self.unwritten = Unwritten::default();
    }

    /// Writes the progress of the origins a group (or the memtable's groups) moved, the buckets it
    /// changed and the clock.
    pub(super) fn write_group(
        &self,
        txn: &redb::WriteTransaction,
        touched: &BTreeSet<Origin>,
        dirty: &DirtyBuckets,
    ) -> Result<(), StoreError> {
        let mut vv = txn.open_table(VERSION_VECTOR)?;
        for origin in touched {
            if let Some(p) = self.mirror.progress.get(origin) {
                vv.insert(origin.to_bytes().as_slice(), encode_progress(p).as_slice())?;
            }
        }
        crate::store::buckets::write_dirty(txn, &self.mirror.buckets, dirty)?;
        txn.open_table(META)?.insert(META_HLC, encode_hlc(self.mirror.hlc).as_slice())?;
        Ok(())
    }
}
