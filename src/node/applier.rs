//! The apply pipeline: carries out the engine's [`Action::Apply`](crate::sync::Action::Apply).
//!
//! Each job is a run of contiguous batches of one origin that the engine decided to apply. The
//! applier verifies them (hash chain and signature, CPU work kept off the swarm task), queues them
//! to the writer in order without waiting for each commit, and reports back: `Applied` once the
//! batches are verified and queued (or why they were refused), `ApplyFailed` when a queued batch
//! later failed to commit. Nothing here decides what to apply.

use futures::stream::FuturesUnordered;
use futures::StreamExt;
use tokio::sync::{mpsc, oneshot};

use super::event_loop::Command;
use crate::ids::{Origin, Seq};
use crate::op::{ChainHash, OpBatch};
use crate::store::{RemoteOutcome, Store, StoreError, WriteHandle, WriterError};
use crate::sync::{Ticket, MAX_BATCH_OPS};

/// One `Action::Apply`.
pub(crate) struct ApplyJob {
    pub ticket: Ticket,
    pub origin: Origin,
    pub batches: Vec<OpBatch>,
    pub prev: Option<ChainHash>,
}

/// The writer's answer to one queued batch.
type WriteResult = Result<Result<RemoteOutcome, WriterError>, oneshot::error::RecvError>;
type Outcome = (Origin, WriteResult);

pub(crate) struct Applier {
    pub store: Store,
    pub writer: WriteHandle,
    pub commands: mpsc::Sender<Command>,
    in_flight: FuturesUnordered<futures::future::BoxFuture<'static, Outcome>>,
}

impl Applier {
    pub fn new(store: Store, writer: WriteHandle, commands: mpsc::Sender<Command>) -> Self {
        Applier { store, writer, commands, in_flight: FuturesUnordered::new() }
    }

    pub async fn run(mut self, mut jobs: mpsc::Receiver<ApplyJob>) {
        loop {
            tokio::select! {
                job = jobs.recv() => match job {
                    Some(j) => self.apply(j).await,
                    None => break,
                },
                Some((origin, outcome)) = self.in_flight.next(), if !self.in_flight.is_empty() => {
                    self.on_outcome(origin, outcome).await;
                }
            }
        }
        while let Some((origin, outcome)) = self.in_flight.next().await {
            self.on_outcome(origin, outcome).await;
        }
    }

    async fn apply(&mut self, job: ApplyJob) {
        let ApplyJob { ticket, origin, batches, prev } = job;
        let result = self.verify_and_queue(origin, batches, prev).await;
        let _ = self.commands.send(Command::Applied { ticket, result }).await;
    }

    async fn verify_and_queue(
        &mut self,
        origin: Origin,
        batches: Vec<OpBatch>,
        prev: Option<ChainHash>,
    ) -> Result<(), String> {
        let Some(first) = batches.first() else { return Ok(()) };
        let mut prev = match prev {
            Some(p) => p,
            None => self
                .chain_at(&origin, first.after)
                .await
                .ok_or_else(|| format!("no chain hash held at seq {} of {origin}", first.after))?,
        };
        for batch in batches {
            let verified = batch.verify(prev, MAX_BATCH_OPS).map_err(|e| e.to_string())?;
            verified.check_clock(super::wall_ms()).map_err(|e| e.to_string())?;
            prev = verified.head.head;
            let rx = self.writer.submit_remote(verified).await.map_err(|e| e.to_string())?;
            self.in_flight.push(Box::pin(async move { (origin, rx.await) }));
        }
        Ok(())
    }

    /// The chain hash at `seq`, waiting for queued batches to commit if it is theirs.
    async fn chain_at(&mut self, origin: &Origin, seq: Seq) -> Option<ChainHash> {
        loop {
            if let Ok(Some(c)) = self.store.chain_at(origin, seq) {
                return Some(c);
            }
            let (o, outcome) = self.in_flight.next().await?;
            self.on_outcome(o, outcome).await;
        }
    }

    async fn on_outcome(&mut self, origin: Origin, outcome: WriteResult) {
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
        let _ = self.commands.send(Command::ApplyFailed { origin }).await;
    }
}
