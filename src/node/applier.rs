//! The apply pipeline for ops that come from peers (gossip and replay).
//!
//! Gossip messages are checked here (decoding, sizes, the origin is the publisher and a primary of
//! this cluster, hash chain and signature) and the verdict goes back to gossipsub through the event
//! loop, so a bad sender is penalised and its message not forwarded. Verified batches are queued to
//! the writer in per-origin order without waiting for each commit; batches that arrive ahead of a gap
//! wait in the bounded [`GapBuffer`] until the missing ops arrive by gossip or replay.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::stream::FuturesUnordered;
use futures::StreamExt;
use libp2p::gossipsub::{MessageAcceptance, MessageId};
use libp2p::PeerId;
use tokio::sync::{mpsc, oneshot};

use super::event_loop::Command;
use super::metrics::Metrics;
use crate::ids::{Origin, Role, Seq};
use crate::net::{decode_gossip, GossipMessage};
use crate::op::{ChainHash, OpBatch};
use crate::store::{OriginProgress, RemoteOutcome, Store, StoreError, WriteHandle, WriterError};
use crate::sync::{Admit, Gap, GapBuffer, GapLimits};

/// Role and cluster of each peer identify told the event loop about.
pub(crate) type Identified = Arc<std::sync::RwLock<HashMap<PeerId, (Role, String)>>>;

/// Ops in one received batch at most.
pub const MAX_BATCH_OPS: usize = 4096;

/// Something for the applier to process.
pub(crate) enum Inbound {
    /// A gossip message, to validate and report on.
    Gossip { propagation_source: PeerId, message_id: MessageId, data: Vec<u8> },
    /// Batches a peer served in answer to a pull.
    Replayed { peer: PeerId, origin: Origin, batches: Vec<OpBatch>, done: oneshot::Sender<Result<Seq, String>> },
}

/// What the applier shows in status.
#[derive(Debug, Clone, Default)]
pub struct ApplierView {
    pub gaps: Vec<Gap>,
    pub buffered_ops: usize,
    pub rejected: u64,
}

/// The writer's answer to one queued batch.
type WriteResult = Result<Result<RemoteOutcome, WriterError>, oneshot::error::RecvError>;
type Outcome = (Origin, WriteResult);

pub(crate) struct Applier {
    pub store: Store,
    pub writer: WriteHandle,
    pub me: PeerId,
    pub cluster: String,
    pub max_gossip_bytes: usize,
    pub commands: mpsc::Sender<Command>,
    pub view: Arc<Mutex<ApplierView>>,
    pub metrics: Arc<Metrics>,
    /// Role and cluster of the peers identify told us about, kept by the event loop.
    identified: Identified,
    gaps: GapBuffer,
    /// Per origin, where the log stands once every batch queued to the writer is committed.
    cursors: HashMap<Origin, OriginProgress>,
    in_flight: FuturesUnordered<futures::future::BoxFuture<'static, Outcome>>,
}

/// Why a batch was refused.
type Refusal = String;

impl Applier {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Store,
        writer: WriteHandle,
        me: PeerId,
        cluster: String,
        max_gossip_bytes: usize,
        gap: GapLimits,
        commands: mpsc::Sender<Command>,
        view: Arc<Mutex<ApplierView>>,
        metrics: Arc<Metrics>,
        identified: Identified,
    ) -> Self {
        Applier {
            store,
            writer,
            me,
            cluster,
            max_gossip_bytes,
            commands,
            view,
            metrics,
            identified,
            gaps: GapBuffer::new(gap),
            cursors: HashMap::new(),
            in_flight: FuturesUnordered::new(),
        }
    }

    pub async fn run(mut self, mut inbound: mpsc::Receiver<Inbound>) {
        loop {
            tokio::select! {
                msg = inbound.recv() => match msg {
                    Some(m) => self.on_inbound(m).await,
                    None => break,
                },
                Some((origin, outcome)) = self.in_flight.next(), if !self.in_flight.is_empty() => {
                    self.on_outcome(origin, outcome);
                }
            }
        }
        while let Some((origin, outcome)) = self.in_flight.next().await {
            self.on_outcome(origin, outcome);
        }
    }

    async fn on_inbound(&mut self, msg: Inbound) {
        match msg {
            Inbound::Gossip { propagation_source, message_id, data } => {
                let acceptance = match self.admit_gossip(&data).await {
                    Ok(()) => MessageAcceptance::Accept,
                    Err(reason) => {
                        tracing::warn!(peer = %propagation_source, %reason, "rejected a gossip message");
                        self.metrics.gossip_rejected.inc();
                        self.view.lock().expect("view lock").rejected += 1;
                        MessageAcceptance::Reject
                    }
                };
                let _ = self.commands.send(Command::Verdict { message_id, propagation_source, acceptance }).await;
            }
            Inbound::Replayed { peer, origin, batches, done } => {
                let mut result = Ok(self.cursor(&origin).seq);
                for batch in batches {
                    if batch.head.origin != origin {
                        result = Err(format!("peer {peer} answered a pull of {origin} with ops of another origin"));
                        break;
                    }
                    match self.offer(batch).await {
                        Ok(()) => result = Ok(self.cursor(&origin).seq),
                        Err(reason) => {
                            result = Err(reason);
                            break;
                        }
                    }
                }
                if let Err(reason) = &result {
                    tracing::warn!(%peer, %origin, %reason, "rejected replayed ops");
                    self.metrics.replay_rejected.inc();
                }
                let _ = done.send(result);
            }
        }
        self.publish_view();
    }

    /// Checks a gossip message. Envelopes are anonymous: what counts is the payload's own signature
    /// (an origin's signed chain head, an attestation's signature) and what identify told us about
    /// the origin.
    async fn admit_gossip(&mut self, data: &[u8]) -> Result<(), Refusal> {
        let (role, batch) = match decode_gossip(data, self.max_gossip_bytes).map_err(|e| e.to_string())? {
            GossipMessage::Ops { role, batch } => (role, batch),
            GossipMessage::Attestation(a) => {
                if a.cluster != self.cluster {
                    return Err(format!("attestation for cluster {:?}, not {:?}", a.cluster, self.cluster));
                }
                a.verify().map_err(|e| e.to_string())?;
                let _ = self
                    .commands
                    .send(Command::PeerState { peer: a.peer, vv: a.version_vector, root: a.state_root })
                    .await;
                return Ok(());
            }
        };
        let origin = batch.head.origin;
        if origin == self.me {
            // Our own ops relayed back: nothing to apply, nothing wrong.
            return batch.head.verify().map_err(|e| e.to_string());
        }
        let known = self.identified.read().expect("identified lock").get(&origin).cloned();
        if let Some((known_role, cluster)) = known {
            if cluster != self.cluster {
                return Err(format!("origin {origin} belongs to cluster {cluster:?}, not {:?}", self.cluster));
            }
            if known_role != Role::Primary {
                return Err(format!("origin {origin} is a {known_role}; only primaries originate ops"));
            }
        }
        if role != Role::Primary {
            return Err(format!("the message says its origin is a {role}; only primaries originate ops"));
        }
        self.offer(batch).await
    }

    /// Where `origin`'s log stands once the queued batches commit. The store may have moved past
    /// the cached cursor without this pipeline (a snapshot install), so the cursor is never behind
    /// what is committed.
    fn cursor(&mut self, origin: &Origin) -> OriginProgress {
        let committed = self.store.progress(origin);
        let cursor = self.cursors.entry(*origin).or_insert(committed);
        if committed.seq > cursor.seq {
            *cursor = committed;
        }
        *cursor
    }

    /// Verifies a batch and queues it to the writer, or buffers it behind a gap.
    async fn offer(&mut self, batch: OpBatch) -> Result<(), Refusal> {
        if batch.ops.is_empty() || batch.ops.len() > MAX_BATCH_OPS {
            return Err(format!("batch of {} ops (1 to {MAX_BATCH_OPS} allowed)", batch.ops.len()));
        }
        let origin = batch.head.origin;
        let cursor = self.cursor(&origin);
        if batch.head.seq <= cursor.seq {
            // Already applied or queued; still check it is authentic before saying so.
            return batch.head.verify().map_err(|e| e.to_string());
        }
        if batch.after > cursor.seq {
            batch.head.verify().map_err(|e| e.to_string())?;
            if batch.ops.len() as u64 != batch.head.seq.0 - batch.after.0 {
                return Err("batch's op count does not match its seq range".into());
            }
            tracing::debug!(%origin, have = %cursor.seq, after = %batch.after, "buffered a batch behind a gap");
            if self.gaps.insert(batch) == Admit::Overflow {
                tracing::warn!(%origin, have = %cursor.seq, "gap buffer full; dropping a batch that will be repaired by replay");
                self.metrics.gap_overflows.inc();
            }
            return Ok(());
        }
        self.submit(batch, cursor).await?;
        // The batch may have closed a gap: release what waited behind it.
        loop {
            let cursor = self.cursor(&origin);
            let ready = self.gaps.take_ready(&origin, cursor.seq);
            if ready.is_empty() {
                return Ok(());
            }
            for batch in ready {
                let cursor = self.cursor(&origin);
                if let Err(reason) = self.submit(batch, cursor).await {
                    // A buffered batch turned out bad: drop it; replay fills the hole.
                    tracing::warn!(%origin, %reason, "dropped a buffered batch that failed verification");
                }
            }
        }
    }

    /// Verifies a batch that starts at or before `cursor` and queues it to the writer.
    async fn submit(&mut self, batch: OpBatch, cursor: OriginProgress) -> Result<(), Refusal> {
        let origin = batch.head.origin;
        let prev =
            if batch.after == cursor.seq { Some(cursor.chain) } else { self.chain_at(&origin, batch.after).await };
        let prev: ChainHash = prev.ok_or_else(|| format!("no chain hash held at seq {} of {origin}", batch.after))?;
        let verified = batch.verify(prev, MAX_BATCH_OPS).map_err(|e| e.to_string())?;
        let next = OriginProgress { seq: verified.head.seq, chain: verified.head.head };
        let rx = self.writer.submit_remote(verified).await.map_err(|e| e.to_string())?;
        self.cursors.insert(origin, next);
        self.in_flight.push(Box::pin(async move { (origin, rx.await) }));
        Ok(())
    }

    /// The chain hash at `seq`, waiting for queued batches to commit if it is theirs.
    async fn chain_at(&mut self, origin: &Origin, seq: Seq) -> Option<ChainHash> {
        loop {
            if let Ok(Some(c)) = self.store.chain_at(origin, seq) {
                return Some(c);
            }
            let (o, outcome) = self.in_flight.next().await?;
            self.on_outcome(o, outcome);
        }
    }

    fn on_outcome(&mut self, origin: Origin, outcome: WriteResult) {
        match outcome {
            Ok(Ok(RemoteOutcome::Applied { .. } | RemoteOutcome::Duplicate)) => return,
            Ok(Ok(other)) => tracing::warn!(%origin, ?other, "a queued batch did not apply; resyncing its origin"),
            // The writer says so once; replay brings the batch back when there is space again.
            Ok(Err(WriterError::Store(e))) if matches!(*e, StoreError::DiskFull { .. }) => {
                tracing::debug!(%origin, error = %e, "a queued batch was refused: disk full")
            }
            Ok(Err(e)) => tracing::warn!(%origin, error = %e, "a queued batch failed to commit; resyncing its origin"),
            Err(_) => tracing::warn!(%origin, "the writer dropped a queued batch"),
        }
        // Forget the optimistic cursor: the next batch is judged against what is really committed.
        self.cursors.remove(&origin);
    }

    fn publish_view(&mut self) {
        let cursors = &self.cursors;
        let store = &self.store;
        let gaps = self.gaps.gaps(|o| cursors.get(o).map_or_else(|| store.progress(o).seq, |c| c.seq));
        let mut view = self.view.lock().expect("view lock");
        view.buffered_ops = self.gaps.usage().0;
        view.gaps = gaps;
    }
}
