//! The memtable: peers' ops applied since the last flush, held in memory in front of the redb tables.
//!
//! A group of peers' ops (no local write in it) is applied here instead of in a redb transaction:
//! its state changes, log rows and signed heads go into sorted maps that readers consult before the
//! tables. The writer moves everything into redb in one transaction (a flush) when a local write is
//! committed (its durable transaction carries the memtable too), on the node's durability tick
//! ([`super::REMOTE_FLUSH_INTERVAL`]), before any maintenance task, and whenever the memtable grows
//! past [`super::WriterConfig::memtable_bytes`]. So redb always holds a consistent point (log,
//! state, version vector and buckets of one moment), and a crash loses exactly what it lost before
//! the memtable existed: peers' ops applied in the last interval, which their origins hold durably
//! and peers serve again. Nothing needs replaying at start.
//!
//! A memtable at 1,000 single-op batches a second turns a thousand redb transactions into ten.
//!
//! Readers pair the memtable with a redb read transaction through its generation: the memtable
//! holds what flush number `generation` will write, and every flush records its number in redb
//! (`META_FLUSH`). A view is consistent when the transaction has seen the flush before this
//! memtable's and not its own (see [`super::Store::overlay`]).

use std::collections::BTreeMap;

use redb::{ReadableDatabase, WriteTransaction};

use super::apply::{reindex_tombstone, StateSink};
use super::buckets::BucketChanges;
use super::encoding::decode;
use super::tables::*;
use super::{Store, StoreError};
use crate::crdt::RegisterValue;
use crate::ids::Seq;
use crate::snapshot::Kind;

/// A log row waiting in the memtable: the encoded row (as `log::encode_row` makes it), the signed
/// head's signature and how many ops the row holds.
#[derive(Debug, Clone)]
pub(crate) struct PendingRow {
    pub row: Vec<u8>,
    pub signature: Vec<u8>,
    pub ops: u64,
}

/// State entries by (collection, key), one map per kind (in the order of `Kind`'s variants).
pub(crate) type StateMaps = [BTreeMap<(String, Vec<u8>), Vec<u8>>; 3];

#[derive(Debug, Default)]
pub(crate) struct Memtable {
    /// The latest value of every entry changed since the last flush (whole encoded values, as the
    /// state tables hold them; nothing is ever removed here).
    pub state: StateMaps,
    /// Log rows by (origin bytes, seq of the row's last op).
    pub log: BTreeMap<(Vec<u8>, u64), PendingRow>,
    /// Bytes held (keys, values and rows), to bound the memtable.
    pub bytes: usize,
    /// Register tombstones the writes held add, less those they replace, against the state before
    /// them: a reader adds it to the tombstone index's count rather than look up every entry.
    pub tombstones: i64,
    /// The number of the flush that will write this memtable.
    pub generation: u64,
}

impl Memtable {
    pub fn is_empty(&self) -> bool {
        self.log.is_empty() && self.state.iter().all(BTreeMap::is_empty)
    }

    pub fn get(&self, kind: Kind, collection: &str, key: &[u8]) -> Option<&[u8]> {
        // The maps are keyed by owned pairs; a range of one looks up borrowed ones without copying.
        let map = &self.state[kind as usize];
        let probe = (collection.to_owned(), key.to_vec());
        map.get(&probe).map(Vec::as_slice)
    }

    pub fn put(&mut self, kind: Kind, collection: &str, key: &[u8], value: &[u8]) {
        let map = &mut self.state[kind as usize];
        match map.get_mut(&(collection.to_owned(), key.to_vec())) {
            Some(held) => {
                self.bytes = self.bytes.saturating_sub(held.len()) + value.len();
                held.clear();
                held.extend_from_slice(value);
            }
            None => {
                self.bytes += collection.len() + key.len() + value.len() + 48;
                map.insert((collection.to_owned(), key.to_vec()), value.to_vec());
            }
        }
    }

    pub fn log_row(&mut self, origin: &[u8], last: u64, row: PendingRow) {
        self.bytes += origin.len() + row.row.len() + row.signature.len() + 48;
        self.log.insert((origin.to_vec(), last), row);
    }

    /// Moves everything `other` holds in here (its values are newer than any held here).
    pub fn absorb(&mut self, other: Memtable) {
        for (kind, map) in other.state.into_iter().enumerate() {
            for (k, value) in map {
                let len = value.len();
                let entry = k.0.len() + k.1.len() + len + 48;
                match self.state[kind].insert(k, value) {
                    Some(old) => self.bytes = self.bytes.saturating_sub(old.len()) + len,
                    None => self.bytes += entry,
                }
            }
        }
        for ((origin, last), row) in other.log {
            self.log_row(&origin, last, row);
        }
        self.tombstones += other.tombstones;
    }

    /// Empties the memtable once flush number `generation` is committed.
    pub fn flushed(&mut self) {
        self.state = StateMaps::default();
        self.log.clear();
        self.bytes = 0;
        self.tombstones = 0;
        self.generation += 1;
    }

    /// Log rows of `origin` ending after `after`, in order.
    pub fn rows_after(&self, origin: &[u8], after: u64) -> Vec<(u64, PendingRow)> {
        let from = (origin.to_vec(), after.saturating_add(1));
        let to = (origin.to_vec(), u64::MAX);
        self.log.range(from..=to).map(|((_, last), row)| (*last, row.clone())).collect()
    }

    /// Ops held in the memtable's log rows, per origin.
    pub fn ops_per_origin(&self) -> BTreeMap<Vec<u8>, u64> {
        let mut out: BTreeMap<Vec<u8>, u64> = BTreeMap::new();
        for ((origin, _), row) in &self.log {
            *out.entry(origin.clone()).or_default() += row.ops;
        }
        out
    }

    /// Writes the memtable into the tables of `txn`, in key order, keeping the tombstone index and
    /// the log's op counts in step. The version vector, buckets and clock are the writer's to write.
    pub fn write(&self, txn: &WriteTransaction) -> Result<(), StoreError> {
        for (kind, def, _) in STATE_TABLES {
            let map = &self.state[kind as usize];
            if map.is_empty() {
                continue;
            }
            let mut table = txn.open_table(def)?;
            let mut index = match kind {
                Kind::Register => Some(txn.open_table(TOMBSTONES)?),
                _ => None,
            };
            for ((collection, key), value) in map {
                let old = table.insert((collection.as_str(), key.as_slice()), value.as_slice())?;
                let Some(index) = index.as_mut() else { continue };
                let old = old.map(|g| decode::<RegisterValue>(g.value(), "register")).transpose()?;
                let new: RegisterValue = decode(value, "register")?;
                reindex_tombstone(index, collection, key, old.as_ref(), &new)?;
            }
        }
        if !self.log.is_empty() {
            let mut oplog = txn.open_table(OPLOG)?;
            let mut heads = txn.open_table(HEADS)?;
            for ((origin, last), row) in &self.log {
                oplog.insert((origin.as_slice(), *last), row.row.as_slice())?;
                heads.insert((origin.as_slice(), *last), row.signature.as_slice())?;
            }
            drop((oplog, heads));
            let mut counts = txn.open_table(LOG_COUNTS)?;
            for (origin, ops) in self.ops_per_origin() {
                super::log::count_ops(&mut counts, &origin, ops as i64)?;
            }
        }
        txn.open_table(META)?.insert(META_FLUSH, self.generation.to_be_bytes().as_slice())?;
        Ok(())
    }
}

/// A state table opened for reading.
type StateReadTable = redb::ReadOnlyTable<(&'static str, &'static [u8]), &'static [u8]>;

/// Applies a group of peers' ops in a memtable of its own (`delta`), reading through it, the
/// store's memtable and a redb read transaction in that order. The writer moves the delta into the
/// store's memtable once the whole group applied, so readers never see half a group.
pub(super) struct MemSink {
    store: Store,
    pub delta: Memtable,
    read: Option<redb::ReadTransaction>,
    tables: [Option<StateReadTable>; 3],
    pub changes: BucketChanges,
}

impl MemSink {
    pub fn new(store: Store) -> Self {
        MemSink {
            store,
            delta: Memtable::default(),
            read: None,
            tables: [None, None, None],
            changes: Default::default(),
        }
    }
}

impl StateSink for MemSink {
    fn get(&mut self, kind: Kind, collection: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        if let Some(v) = self.delta.get(kind, collection, key) {
            return Ok(Some(v.to_vec()));
        }
        if let Some(v) = self.store.memtable.read().expect("memtable lock").get(kind, collection, key) {
            return Ok(Some(v.to_vec()));
        }
        // Only this thread writes to redb, so a transaction begun once per group stays current.
        let table = match &mut self.tables[kind as usize] {
            Some(t) => t,
            slot => {
                if self.read.is_none() {
                    self.read = Some(self.store.db().begin_read()?);
                }
                let txn = self.read.as_ref().expect("just begun");
                slot.insert(txn.open_table(STATE_TABLES[kind as usize].1)?)
            }
        };
        Ok(table.get((collection, key))?.map(|g| g.value().to_vec()))
    }

    fn put(&mut self, kind: Kind, collection: &str, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.delta.put(kind, collection, key, value);
        Ok(())
    }

    fn swap(&mut self, kind: Kind, collection: &str, key: &[u8], value: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let old = self.get(kind, collection, key)?;
        self.delta.put(kind, collection, key, value);
        Ok(old)
    }

    fn index_tombstone(
        &mut self,
        _register: &str,
        _key: &[u8],
        old: Option<&RegisterValue>,
        new: &RegisterValue,
    ) -> Result<(), StoreError> {
        // The flush indexes tombstones from what each value replaces in redb (`Memtable::write`);
        // readers count them from here until then.
        self.delta.tombstones += new.is_tombstone() as i64 - old.is_some_and(RegisterValue::is_tombstone) as i64;
        Ok(())
    }

    fn log_batch(&mut self, origin: &[u8], last: Seq, row: PendingRow) -> Result<(), StoreError> {
        self.delta.log_row(origin, last.0, row);
        Ok(())
    }

    fn changes(&mut self) -> &mut BucketChanges {
        &mut self.changes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_later_value_replaces_the_held_one_and_the_size_follows() {
        let mut m = Memtable::default();
        m.put(Kind::Register, "r", b"k", &[1; 10]);
        let one = m.bytes;
        m.put(Kind::Register, "r", b"k", &[2; 30]);
        assert_eq!(m.get(Kind::Register, "r", b"k"), Some(&[2; 30][..]));
        assert_eq!(m.bytes, one + 20);
        assert_eq!(m.get(Kind::Counter, "r", b"k"), None);
        let mut other = Memtable::default();
        other.put(Kind::Register, "r", b"k", &[3; 5]);
        other.log_row(b"o", 4, PendingRow { row: vec![0; 40], signature: vec![1; 64], ops: 1 });
        m.absorb(other);
        assert_eq!(m.get(Kind::Register, "r", b"k"), Some(&[3; 5][..]));
        assert_eq!(m.rows_after(b"o", 3).len(), 1);
        assert!(m.rows_after(b"o", 4).is_empty());
        assert_eq!(m.ops_per_origin()[&b"o"[..]], 1);
        m.flushed();
        assert!(m.is_empty());
        assert_eq!((m.bytes, m.generation), (0, 1));
    }
}
