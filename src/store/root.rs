//! The state root: a digest of the whole replicated state that updates in O(1) per write.
//!
//! Every state entry (kind, collection, key, value) hashes to a 32-byte entry hash and belongs to one
//! of [`BUCKETS`] buckets chosen by its identity (kind, collection, key). A bucket's hash is the XOR of
//! its entries' hashes, so replacing a value is `bucket ^= old ^ new`, and the result depends only on
//! the set of entries, not on the order writes arrived in. The root is blake3 over all bucket hashes:
//! O(buckets) to compute, and two nodes that disagree can compare buckets to find where.

use crate::ids::StateRoot;

/// Number of buckets. Fixed by the on-disk format (`state_buckets_v1`).
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

    pub fn root(&self) -> StateRoot {
        let mut h = blake3::Hasher::new();
        for b in &self.0 {
            h.update(b);
        }
        StateRoot(*h.finalize().as_bytes())
    }
}
