//! A store view for the engine's unit tests: at the empty vector, holding nothing, with the root
//! and bucket hashes a test sets.

use cid::Cid;

use super::StoreView;
use crate::crdt::Hlc;
use crate::ids::{Origin, StateRoot};
use crate::snapshot::SnapshotBrief;
use crate::store::{OriginProgress, VersionVector};

pub(super) struct FixedStore {
    pub root: StateRoot,
    pub buckets: Vec<[u8; 32]>,
}

/// An empty store: the zero root and no buckets.
pub(super) const EMPTY: FixedStore = FixedStore { root: StateRoot([0; 32]), buckets: Vec::new() };

impl StoreView for FixedStore {
    fn version_vector(&self) -> VersionVector {
        VersionVector::default()
    }
    fn state_root(&self) -> (StateRoot, VersionVector) {
        (self.root, VersionVector::default())
    }
    fn progress(&self, _: &Origin) -> OriginProgress {
        OriginProgress::default()
    }
    fn log_floors(&self) -> VersionVector {
        VersionVector::default()
    }
    fn latest_snapshot(&self) -> Option<(Cid, SnapshotBrief)> {
        None
    }
    fn clock(&self) -> Hlc {
        Hlc::default()
    }
    fn tombstones_collected(&self) -> Hlc {
        Hlc::default()
    }
    fn has_chunk(&self, _: &Cid) -> bool {
        false
    }
    fn bucket_hashes(&self) -> Vec<[u8; 32]> {
        self.buckets.clone()
    }
}
