//! The repair plane's requests and answers: digests, op ranges, snapshot manifests and chunks,
//! bucket hashes and entries. Answers that read the store run on blocking threads and come back as
//! commands; what the answers mean for sync is decided in `sync` and the other event-loop files.

use std::time::Instant;

use libp2p::request_response::{self, OutboundRequestId, ResponseChannel};
use libp2p::PeerId;
use tokio::sync::oneshot;

use super::{snapshot, Command, EventLoop, PULL_MAX_BYTES, PULL_MAX_OPS};
use crate::net::{Digest, SyncRequest, SyncResponse};
use crate::node::applier::Inbound;
use crate::store::Store;

impl EventLoop {
    pub(super) fn on_sync_event(&mut self, event: request_response::Event<SyncRequest, SyncResponse>) {
        match event {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request { request, channel, .. } => self.on_request(peer, request, channel),
                request_response::Message::Response { request_id, response } => {
                    self.on_response(peer, request_id, response)
                }
            },
            request_response::Event::OutboundFailure { peer, request_id, error, .. } => {
                tracing::debug!(%peer, %error, "request failed");
                self.request_failed(request_id);
            }
            request_response::Event::InboundFailure { peer, error, .. } => {
                tracing::debug!(%peer, %error, "answering a request failed");
            }
            request_response::Event::ResponseSent { .. } => {}
        }
    }

    /// A request of ours failed or was refused: whatever waited on it moves on.
    fn request_failed(&mut self, request_id: OutboundRequestId) {
        if let Some((peer, origin)) = self.pulls.remove(&request_id) {
            self.planner.failed(&peer, &origin, Instant::now());
        }
        if let Some(request) = self.snapshot_requests.remove(&request_id) {
            self.on_snapshot_request_failed(request);
        }
        if self.repair_requests.remove(&request_id).is_some() {
            self.repair = None;
        }
    }

    fn on_request(&mut self, peer: PeerId, request: SyncRequest, channel: ResponseChannel<SyncResponse>) {
        match request {
            SyncRequest::Digest(theirs) => {
                let mine = self.my_digest();
                self.record_digest(peer, theirs);
                let _ = self.swarm.behaviour_mut().sync.send_response(channel, SyncResponse::Digest(mine));
                self.plan_pulls();
            }
            other => {
                if !self.peers.get(&peer).is_some_and(|p| p.in_cluster(&self.cluster)) {
                    let response = SyncResponse::Error {
                        code: "not_in_cluster".into(),
                        message: format!("this node serves cluster {:?} only", self.cluster),
                    };
                    let _ = self.swarm.behaviour_mut().sync.send_response(channel, response);
                    return;
                }
                self.serve_from_store(channel, move |store| serve(store, other));
            }
        }
    }

    /// Answers a request from the store on a blocking thread, so reads never stall the swarm.
    fn serve_from_store(
        &self,
        channel: ResponseChannel<SyncResponse>,
        read: impl FnOnce(&Store) -> SyncResponse + Send + 'static,
    ) {
        let store = self.store.clone();
        let commands = self.commands_tx.clone();
        tokio::spawn(async move {
            let response = tokio::task::spawn_blocking(move || read(&store)).await.unwrap_or_else(|_| {
                SyncResponse::Error { code: "internal".into(), message: "read task failed".into() }
            });
            let _ = commands.send(Command::Respond { channel, response }).await;
        });
    }

    fn on_response(&mut self, peer: PeerId, request_id: OutboundRequestId, response: SyncResponse) {
        match response {
            SyncResponse::Digest(theirs) => {
                self.record_digest(peer, theirs);
                self.plan_pulls();
            }
            SyncResponse::Ops(batches) => {
                let Some((_, origin)) = self.pulls.remove(&request_id) else { return };
                let ops: usize = batches.iter().map(|b| b.ops.len()).sum();
                let bytes: usize = batches.iter().flat_map(|b| b.ops.iter()).map(|o| o.len()).sum();
                self.metrics.count_in("replay", bytes);
                self.metrics.ops_replayed.inc_by(ops as u64);
                if batches.is_empty() {
                    // The peer has nothing after our cursor (anymore): let the next digest decide.
                    if let Some(p) = self.peers.get_mut(&peer) {
                        p.digest = None;
                    }
                    self.planner.answered(&peer, &origin);
                    return;
                }
                let (done, result) = oneshot::channel();
                let commands = self.commands_tx.clone();
                let inbound = self.inbound.clone();
                tokio::spawn(async move {
                    if inbound.send(Inbound::Replayed { peer, origin, batches, done }).await.is_err() {
                        return;
                    }
                    let result = result.await.unwrap_or_else(|_| Err("applier stopped".into()));
                    let _ = commands.send(Command::PullDone { peer, origin, result }).await;
                });
            }
            SyncResponse::Manifest(bytes) => {
                if let Some(snapshot::SnapshotRequest::Manifest { .. }) = self.snapshot_requests.remove(&request_id) {
                    self.on_manifest(peer, bytes);
                }
            }
            SyncResponse::Chunk(bytes) => {
                if let Some(snapshot::SnapshotRequest::Chunk { peer, index, cid }) =
                    self.snapshot_requests.remove(&request_id)
                {
                    self.on_chunk(peer, index, cid, bytes);
                }
            }
            SyncResponse::Buckets(bytes) => {
                if self.repair_requests.remove(&request_id).is_some() {
                    self.on_buckets(peer, bytes);
                }
            }
            SyncResponse::Entries(entries) => {
                if self.repair_requests.remove(&request_id).is_some() {
                    self.on_entries(peer, entries);
                }
            }
            SyncResponse::Error { code, message } => {
                tracing::warn!(%peer, %code, %message, "peer refused a request");
                self.request_failed(request_id);
            }
        }
    }

    fn record_digest(&mut self, peer: PeerId, digest: Digest) {
        if digest.cluster != self.cluster {
            tracing::debug!(%peer, cluster = %digest.cluster, "digest from another cluster ignored");
            return;
        }
        tracing::trace!(%peer, vv = ?digest.version_vector, "digest");
        self.readiness.on_peer_state(peer, digest.version_vector.clone(), digest.state_root);
        self.peers.entry(peer).or_default().digest = Some(digest);
        self.check_ready();
    }
}

/// Buckets asked for in one `GetEntries` at most.
pub(super) const MAX_REPAIR_BUCKETS: usize = 256;

fn not_found(message: String) -> SyncResponse {
    SyncResponse::Error { code: "not_found".into(), message }
}

/// Answers a repair request from the store (runs on a blocking thread).
fn serve(store: &Store, request: SyncRequest) -> SyncResponse {
    let storage = |e: crate::store::StoreError| SyncResponse::Error { code: "storage".into(), message: e.to_string() };
    match request {
        SyncRequest::GetOps { origin, after, max_ops, max_bytes } => {
            let (max_ops, max_bytes) = (max_ops.min(PULL_MAX_OPS) as usize, max_bytes.min(PULL_MAX_BYTES) as usize);
            match store.read_log(&origin, after, max_ops, max_bytes) {
                Ok(read) if read.below_floor => SyncResponse::Error {
                    code: "compacted".into(),
                    message: format!("ops of {origin} up to {} were compacted here; use a snapshot", read.floor),
                },
                Ok(read) => SyncResponse::Ops(read.batches),
                Err(e) => storage(e),
            }
        }
        SyncRequest::Digest(_) => {
            SyncResponse::Error { code: "internal".into(), message: "digests are not read from the store".into() }
        }
        SyncRequest::GetManifest { cid } => match store.snapshot_manifest(&cid) {
            Ok(Some(m)) => SyncResponse::Manifest(m.encode()),
            Ok(None) => not_found(format!("no snapshot {cid} here")),
            Err(e) => storage(e),
        },
        SyncRequest::GetChunk { cid } => match store.snapshot_chunk(&cid) {
            Ok(Some(bytes)) => SyncResponse::Chunk(bytes),
            Ok(None) => not_found(format!("no chunk {cid} here")),
            Err(e) => storage(e),
        },
        SyncRequest::GetBuckets => SyncResponse::Buckets(store.bucket_hashes().concat()),
        SyncRequest::GetEntries { buckets } => {
            if buckets.len() > MAX_REPAIR_BUCKETS {
                return SyncResponse::Error {
                    code: "too_many_buckets".into(),
                    message: format!("ask for at most {MAX_REPAIR_BUCKETS} buckets at a time"),
                };
            }
            match store.entries_in_buckets(&buckets) {
                Ok(entries) => SyncResponse::Entries(
                    entries
                        .iter()
                        .map(|e| serde_bytes::ByteBuf::from(postcard::to_stdvec(e).expect("entries encode")))
                        .collect(),
                ),
                Err(e) => storage(e),
            }
        }
    }
}
