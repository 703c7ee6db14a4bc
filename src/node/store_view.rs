//! The store as the sync engine reads it ([`StoreView`]) and as requests of peers are answered from
//! it ([`ServeStore`]). Adapters only: what to read and when is decided in `sync`.

use cid::Cid;

use crate::ids::{Origin, Seq, StateRoot};
use crate::op::OpBatch;
use crate::snapshot::{SignedManifest, SnapshotBrief, StateEntry};
use crate::store::{OriginProgress, Store, VersionVector};
use crate::sync::{ServeStore, StoreView};

impl StoreView for Store {
    fn version_vector(&self) -> VersionVector {
        Store::version_vector(self)
    }

    fn state_root(&self) -> (StateRoot, VersionVector) {
        Store::state_root(self)
    }

    fn progress(&self, origin: &Origin) -> OriginProgress {
        Store::progress(self, origin)
    }

    fn log_floors(&self) -> VersionVector {
        let floors = Store::log_floors(self).unwrap_or_default();
        VersionVector(floors.into_iter().filter(|(_, s)| s.0 > 0).collect())
    }

    fn latest_snapshot(&self) -> Option<(Cid, SnapshotBrief)> {
        Store::latest_snapshot(self).ok().flatten().map(|s| (s.cid, s.manifest.brief()))
    }

    fn has_chunk(&self, cid: &Cid) -> bool {
        Store::has_chunk(self, cid).unwrap_or(false)
    }

    fn bucket_hashes(&self) -> Vec<[u8; 32]> {
        Store::bucket_hashes(self)
    }

    fn clock(&self) -> crate::crdt::Hlc {
        Store::clock(self)
    }

    fn tombstones_collected(&self) -> crate::crdt::Hlc {
        Store::tombstones_collected(self)
    }

    fn durable_version_vector(&self) -> VersionVector {
        Store::durable_version_vector(self)
    }
}

impl ServeStore for Store {
    fn read_log(
        &self,
        origin: &Origin,
        after: Seq,
        max_ops: usize,
        max_bytes: usize,
    ) -> Result<Result<Vec<OpBatch>, Seq>, String> {
        let read = Store::read_log(self, origin, after, max_ops, max_bytes).map_err(|e| e.to_string())?;
        Ok(if read.below_floor { Err(read.floor) } else { Ok(read.batches) })
    }

    fn manifest(&self, cid: &Cid) -> Result<Option<SignedManifest>, String> {
        self.snapshot_manifest(cid).map_err(|e| e.to_string())
    }

    fn chunk(&self, cid: &Cid) -> Result<Option<Vec<u8>>, String> {
        self.served_chunk(cid).map_err(|e| e.to_string())
    }

    fn bucket_hashes(&self) -> Vec<[u8; 32]> {
        Store::bucket_hashes(self)
    }

    fn entries_in_buckets(&self, buckets: &[u32]) -> Result<Vec<StateEntry>, String> {
        Store::entries_in_buckets(self, buckets).map_err(|e| e.to_string())
    }
}
