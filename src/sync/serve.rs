//! Answering the requests of peers from a store: op ranges, snapshot manifests and chunks, bucket
//! hashes and entries. The engine decides whether a request is served at all ([`super::Action::Serve`]);
//! the executor runs [`serve`] off the event loop (it reads the disk) against its store, as the
//! simulator does against its in-memory one.

use cid::Cid;

use super::engine::{PULL_MAX_BYTES, PULL_MAX_OPS};
use crate::ids::{Origin, Seq};
use crate::op::OpBatch;
use crate::snapshot::{SignedManifest, StateEntry};
use crate::wire::{SyncRequest, SyncResponse};

/// Buckets asked for in one `GetEntries` at most.
pub const MAX_REPAIR_BUCKETS: usize = 256;

/// What answering a request reads. Errors are the store's, shown to the requester as text.
pub trait ServeStore {
    /// Batches of `origin` after `after` within the bounds; `Err(floor)` when `after` is below the
    /// log floor (those ops were compacted away).
    fn read_log(
        &self,
        origin: &Origin,
        after: Seq,
        max_ops: usize,
        max_bytes: usize,
    ) -> Result<Result<Vec<OpBatch>, Seq>, String>;
    fn manifest(&self, cid: &Cid) -> Result<Option<SignedManifest>, String>;
    fn chunk(&self, cid: &Cid) -> Result<Option<Vec<u8>>, String>;
    fn bucket_hashes(&self) -> Vec<[u8; 32]>;
    fn entries_in_buckets(&self, buckets: &[u32]) -> Result<Vec<StateEntry>, String>;
}

fn error(code: &str, message: String) -> SyncResponse {
    SyncResponse::Error { code: code.into(), message }
}

/// Answers a request from `store`. Bounds asked for beyond this node's own are clamped.
pub fn serve(store: &dyn ServeStore, request: SyncRequest) -> SyncResponse {
    match request {
        SyncRequest::GetOps { origin, after, max_ops, max_bytes } => {
            let (max_ops, max_bytes) = (max_ops.min(PULL_MAX_OPS) as usize, max_bytes.min(PULL_MAX_BYTES) as usize);
            match store.read_log(&origin, after, max_ops.max(1), max_bytes.max(1)) {
                Ok(Ok(batches)) => SyncResponse::Ops(batches),
                Ok(Err(floor)) => {
                    error("compacted", format!("ops of {origin} up to {floor} were compacted here; use a snapshot"))
                }
                Err(e) => error("storage", e),
            }
        }
        SyncRequest::Digest(_) => error("internal", "digests are not read from the store".into()),
        SyncRequest::Lease(_) => error("internal", "lease messages are not read from the store".into()),
        SyncRequest::GetManifest { cid } => match store.manifest(&cid) {
            Ok(Some(m)) => SyncResponse::Manifest(m.encode()),
            Ok(None) => error("not_found", format!("no snapshot {cid} here")),
            Err(e) => error("storage", e),
        },
        SyncRequest::GetChunk { cid } => match store.chunk(&cid) {
            Ok(Some(bytes)) => SyncResponse::Chunk(bytes),
            Ok(None) => error("not_found", format!("no chunk {cid} here")),
            Err(e) => error("storage", e),
        },
        SyncRequest::GetBuckets => SyncResponse::Buckets(store.bucket_hashes().concat()),
        SyncRequest::GetEntries { buckets } => {
            if buckets.len() > MAX_REPAIR_BUCKETS {
                return error("too_many_buckets", format!("ask for at most {MAX_REPAIR_BUCKETS} buckets at a time"));
            }
            match store.entries_in_buckets(&buckets) {
                Ok(entries) => SyncResponse::Entries(
                    entries
                        .iter()
                        .map(|e| serde_bytes::ByteBuf::from(postcard::to_stdvec(e).expect("entries encode")))
                        .collect(),
                ),
                Err(e) => error("storage", e),
            }
        }
    }
}
