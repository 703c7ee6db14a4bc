//! The state-root buckets on disk: [`ROWS`] rows of [`ROW_BUCKETS`] bucket hashes each, so a commit
//! writes one row per 64 buckets it changed rather than one B-tree entry per bucket.
//!
//! A group of a thousand ops with random keys changes most rows: 64 inserts of 2 KiB replace ~900
//! of 32 bytes, which were a tenth of a W4 writer thread's samples. Format 2 kept one row per bucket
//! (`state_buckets_v1`); it is moved here at open.
//!
//! Also the bookkeeping of a run of writes: which buckets it marked ([`DirtyBuckets`]) and what
//! each held before ([`BucketChanges`]), to persist or to put back.

use redb::{ReadableTable, ReadableTableMetadata, WriteTransaction};

use super::root::{bucket_of, root_hash, Buckets, EntryKind, BUCKETS};
use super::tables::{BUCKETS_V1, BUCKET_ROWS};
use super::StoreError;

/// Buckets per row: one word of [`DirtyBuckets`] is one row.
pub(crate) const ROW_BUCKETS: usize = u64::BITS as usize;
/// Rows in all.
pub(crate) const ROWS: usize = BUCKETS / ROW_BUCKETS;
const ROW_BYTES: usize = ROW_BUCKETS * 32;

/// The bucket hashes persisted in a `BUCKET_ROWS` table; a row not written yet is all zero.
pub(crate) fn read(table: &impl ReadableTable<u32, &'static [u8]>) -> Result<Buckets, StoreError> {
    let mut buckets = Buckets::default();
    for row in table.iter()? {
        let (k, v) = row?;
        let r = k.value() as usize;
        let bytes = v.value();
        if r >= ROWS || bytes.len() != ROW_BYTES {
            return Err(StoreError::Corrupt(format!("bucket row {r} of {} bytes", bytes.len())));
        }
        for (hash, stored) in buckets.0[r * ROW_BUCKETS..(r + 1) * ROW_BUCKETS].iter_mut().zip(bytes.chunks_exact(32)) {
            hash.copy_from_slice(stored);
        }
    }
    Ok(buckets)
}

/// Writes the rows holding a bucket in `dirty`.
pub(crate) fn write_dirty(txn: &WriteTransaction, buckets: &Buckets, dirty: &DirtyBuckets) -> Result<(), StoreError> {
    write_rows(txn, buckets, dirty.rows())
}

/// Writes every row.
pub(crate) fn write_all(txn: &WriteTransaction, buckets: &Buckets) -> Result<(), StoreError> {
    write_rows(txn, buckets, 0..ROWS)
}

fn write_rows(txn: &WriteTransaction, buckets: &Buckets, rows: impl Iterator<Item = usize>) -> Result<(), StoreError> {
    let mut table = txn.open_table(BUCKET_ROWS)?;
    for r in rows {
        table.insert(r as u32, buckets.0[r * ROW_BUCKETS..(r + 1) * ROW_BUCKETS].as_flattened())?;
    }
    Ok(())
}

/// The buckets of formats 1 and 2, one per row of `state_buckets_v1`.
pub(crate) fn read_v1(txn: &WriteTransaction) -> Result<Buckets, StoreError> {
    let mut buckets = Buckets::default();
    for row in txn.open_table(BUCKETS_V1)?.iter()? {
        let (k, v) = row?;
        let b = k.value() as usize;
        let hash = buckets.0.get_mut(b).ok_or_else(|| StoreError::Corrupt(format!("bucket index {b} out of range")))?;
        *hash = v.value().try_into().map_err(|_| StoreError::Corrupt(format!("bucket {b} is not 32 bytes")))?;
    }
    Ok(buckets)
}

/// Writes `buckets` as rows and drops the table of formats 1 and 2.
pub(crate) fn replace_v1(txn: &WriteTransaction, buckets: &Buckets) -> Result<(), StoreError> {
    write_all(txn, buckets)?;
    txn.delete_table(BUCKETS_V1)?;
    Ok(())
}

/// Format 2 to 3: moves the buckets kept one per row (`state_buckets_v1`) into rows of 64, and drops
/// the old table (already gone after a format-1 migration). Runs at open, inside the opening
/// transaction.
pub(crate) fn migrate_v2(txn: &WriteTransaction) -> Result<(), StoreError> {
    if txn.open_table(BUCKETS_V1)?.is_empty()? {
        txn.delete_table(BUCKETS_V1)?;
        return Ok(());
    }
    replace_v1(txn, &read_v1(txn)?)
}

/// A set of bucket indexes, one bit each (a write marks one per op).
pub(crate) struct DirtyBuckets([u64; BUCKETS / 64]);

impl Default for DirtyBuckets {
    fn default() -> Self {
        DirtyBuckets([0; BUCKETS / 64])
    }
}

impl DirtyBuckets {
    pub fn insert(&mut self, bucket: usize) {
        self.0[bucket / 64] |= 1 << (bucket % 64);
    }

    /// The rows of 64 buckets (see `buckets.rs`) holding a marked bucket, in increasing order.
    pub fn rows(&self) -> impl Iterator<Item = usize> + '_ {
        self.0.iter().enumerate().filter(|(_, bits)| **bits != 0).map(|(r, _)| r)
    }

    /// The marked buckets in increasing order.
    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.0
            .iter()
            .enumerate()
            .flat_map(|(w, bits)| (0..64).filter(move |b| bits & (1 << b) != 0).map(move |b| w * 64 + b))
    }
}

/// Buckets changed by a run of writes: which ones (to persist), and what each held before (to put
/// back if the run is not committed).
#[derive(Default)]
pub(crate) struct BucketChanges {
    pub dirty: DirtyBuckets,
    undo: Vec<(usize, [u8; 32])>,
}

impl BucketChanges {
    pub fn replace(&mut self, buckets: &mut Buckets, kind: EntryKind, id: &[u8; 32], old: Option<&[u8]>, new: &[u8]) {
        let old = old.and_then(|old| root_hash(kind, id, old));
        self.replace_hashed(buckets, id, old, root_hash(kind, id, new));
    }

    /// Like [`BucketChanges::replace`], with the old and new values' hashes in the root already
    /// computed (none for a value the root leaves out).
    pub fn replace_hashed(
        &mut self,
        buckets: &mut Buckets,
        id: &[u8; 32],
        old: Option<[u8; 32]>,
        new: Option<[u8; 32]>,
    ) {
        let b = bucket_of(id);
        self.undo.push((b, buckets.0[b]));
        for h in old.iter().chain(new.iter()) {
            buckets.toggle(id, h);
        }
        self.dirty.insert(b);
    }

    /// Puts back every bucket hash these changes replaced.
    pub fn undo(self, buckets: &mut Buckets) {
        for (b, hash) in self.undo.into_iter().rev() {
            buckets.0[b] = hash;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirty_buckets_list_each_marked_bucket_once_in_order() {
        let mut d = DirtyBuckets::default();
        for b in [4095, 0, 63, 64, 0, 1000, 63] {
            d.insert(b);
        }
        assert_eq!(d.iter().collect::<Vec<_>>(), vec![0, 63, 64, 1000, 4095]);
        assert_eq!(DirtyBuckets::default().iter().count(), 0);
    }
}
