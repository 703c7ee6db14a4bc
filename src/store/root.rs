//! The state root: a digest of the whole replicated state that updates in O(1) per write.
//!
//! Every state entry (kind, collection, key, value) hashes to a 32-byte entry hash and belongs to one
//! of [`BUCKETS`] buckets chosen by its identity (kind, collection, key). A bucket's hash is the XOR of
//! its entries' hashes, so replacing a value is `bucket ^= old ^ new`, and the result depends only on
//! the set of entries, not on the order writes arrived in. The root is blake3 over all bucket hashes:
//! O(buckets) to compute, and two nodes that disagree can compare buckets to find where.
//!
//! A register tombstone is not part of the root: the root digests the state a reader sees, and a
//! tombstone reads as "absent" whether or not it is still held. Tombstones are collected at different
//! times on different nodes (see `Store::collect_tombstones`), and their states stay equal.

use super::encoding::{canonical_varint, length_prefixed};
use crate::ids::StateRoot;

/// Number of buckets. Fixed by the on-disk format (`state_bucket_rows_v3`).
pub const BUCKETS: usize = 4096;

/// The kind of a state entry, part of its identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum EntryKind {
    Register = 1,
    Counter = 2,
    Lease = 3,
}

/// Identity hash of an entry: which bucket it is in, and the prefix of its entry hash.
pub fn identity_hash(kind: EntryKind, collection: &str, key: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(&[kind as u8]);
    h.update(&(collection.len() as u32).to_be_bytes());
    h.update(collection.as_bytes());
    h.update(&(key.len() as u32).to_be_bytes());
    h.update(key);
    *h.finalize().as_bytes()
}

pub fn bucket_of(identity: &[u8; 32]) -> usize {
    u16::from_be_bytes([identity[0], identity[1]]) as usize % BUCKETS
}

/// Hash of an entry: its identity together with its encoded value.
pub fn entry_hash(identity: &[u8; 32], value: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(identity);
    h.update(value);
    *h.finalize().as_bytes()
}

/// What an entry adds to its bucket: its entry hash, or nothing for a register tombstone.
pub fn root_hash(kind: EntryKind, identity: &[u8; 32], value: &[u8]) -> Option<[u8; 32]> {
    if kind == EntryKind::Register && register_is_tombstone(value) {
        return None;
    }
    Some(entry_hash(identity, value))
}

/// Whether postcard bytes of a `RegisterValue` hold a tombstone (`value: None`), read without
/// decoding: varint wall ms, varint logical, length-prefixed origin, then the option's tag (read as
/// the canonical-encoding check of snapshot registers reads them). Bytes that do not parse count as
/// a value (they are refused elsewhere).
pub fn register_is_tombstone(bytes: &[u8]) -> bool {
    let mut at = 0;
    let parsed = (|| {
        canonical_varint(bytes, &mut at, u64::BITS)?;
        canonical_varint(bytes, &mut at, u32::BITS)?;
        length_prefixed(bytes, &mut at)?;
        bytes.get(at).copied()
    })();
    parsed == Some(0) && at + 1 == bytes.len()
}

/// The bucket hashes of a state.
#[derive(Clone, PartialEq, Eq)]
pub struct Buckets(pub Vec<[u8; 32]>);

impl Default for Buckets {
    fn default() -> Self {
        Buckets(vec![[0; 32]; BUCKETS])
    }
}

impl std::fmt::Debug for Buckets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Buckets(root {})", self.root())
    }
}

impl Buckets {
    /// Folds an entry hash in or out of its bucket (XOR is its own inverse). Returns the bucket index.
    pub fn toggle(&mut self, identity: &[u8; 32], entry: &[u8; 32]) -> usize {
        let b = bucket_of(identity);
        for (x, y) in self.0[b].iter_mut().zip(entry) {
            *x ^= y;
        }
        b
    }

    /// Replaces an entry's old value (if any) by its new one in the buckets, as [`root_hash`] counts
    /// them. Returns the bucket, for the caller to persist.
    pub fn replace(&mut self, kind: EntryKind, identity: &[u8; 32], old: Option<&[u8]>, new: &[u8]) -> usize {
        if let Some(h) = old.and_then(|old| root_hash(kind, identity, old)) {
            self.toggle(identity, &h);
        }
        if let Some(h) = root_hash(kind, identity, new) {
            self.toggle(identity, &h);
        }
        bucket_of(identity)
    }

    /// blake3 over the bucket hashes in order, taken as one 128 KiB input: blake3 hashes the
    /// input's 1 KiB chunks side by side (SIMD) only when they come in one piece, and fed 32 bytes
    /// at a time it took several times longer. The engine asks for the root after every apply.
    pub fn root(&self) -> StateRoot {
        StateRoot(*blake3::hash(self.0.as_flattened()).as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_root_is_blake3_of_the_buckets_in_order_however_they_are_fed() {
        let mut buckets = Buckets::default();
        for i in 0..200u32 {
            let id = identity_hash(EntryKind::Register, "r", &i.to_be_bytes());
            buckets.toggle(&id, &entry_hash(&id, &i.to_le_bytes()));
        }
        // As earlier builds computed it, one bucket at a time: the same root (it is compared
        // between nodes and stored in snapshot manifests).
        let mut h = blake3::Hasher::new();
        for b in &buckets.0 {
            h.update(b);
        }
        assert_eq!(buckets.root(), StateRoot(*h.finalize().as_bytes()));
        assert_ne!(buckets.root(), Buckets::default().root());
    }
}
