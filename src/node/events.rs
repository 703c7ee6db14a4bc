//! Events a node reports to library users, derived from the writer's commit events.

use std::sync::Arc;

use tokio::sync::broadcast;

use super::metrics::Metrics;
use crate::crdt::LeaseState;
use crate::ids::{Origin, Seq};
use crate::store::CommitEvent;

/// Something that happened to the node's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeEvent {
    /// Ops `first..=last` of `origin` were committed; `local` when this node created them.
    OpsApplied { origin: Origin, first: Seq, last: Seq, local: bool },
    /// A lease changed hands, was renewed or released. A holder that lost a concurrent grant learns
    /// it here: the state names the winner.
    LeaseChanged { lease: String, key: Vec<u8>, state: LeaseState },
    /// A grant this node made lost to a concurrent grant of another primary: `holder` no longer
    /// holds the lease; `winner` does.
    LeaseLost { lease: String, key: Vec<u8>, holder: String, token: u64, winner: LeaseState },
}

/// Turns commit events into node events and metrics until the writer's sender is gone.
pub(crate) async fn forward(
    mut commits: broadcast::Receiver<Arc<CommitEvent>>,
    events: broadcast::Sender<NodeEvent>,
    metrics: Arc<Metrics>,
) {
    loop {
        let commit = match commits.recv().await {
            Ok(c) => c,
            Err(broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!(missed = n, "event subscriber fell behind; some node events were dropped");
                metrics.events_lagged.inc_by(n);
                continue;
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        metrics.commits.inc();
        metrics.conflicts.inc_by(commit.conflicts);
        for batch in &commit.local_batches {
            let first = batch.after.next();
            metrics.ops_local.inc_by(batch.head.seq.0 - batch.after.0);
            let _ = events.send(NodeEvent::OpsApplied {
                origin: batch.head.origin,
                first,
                last: batch.head.seq,
                local: true,
            });
        }
        for (origin, first, last) in &commit.remote {
            metrics.ops_remote.inc_by(last.0 - first.0 + 1);
            let _ = events.send(NodeEvent::OpsApplied { origin: *origin, first: *first, last: *last, local: false });
        }
        for (lease, key, state) in &commit.leases {
            metrics.lease_changes.inc();
            let _ =
                events.send(NodeEvent::LeaseChanged { lease: lease.clone(), key: key.clone(), state: state.clone() });
        }
        for loss in &commit.leases_lost {
            tracing::warn!(lease = %loss.lease, holder = ?loss.lost.holder, winner = ?loss.winner.holder,
                token = loss.winner.token, "a lease this node granted lost to a concurrent grant");
            let _ = events.send(NodeEvent::LeaseLost {
                lease: loss.lease.clone(),
                key: loss.key.clone(),
                holder: loss.lost.holder.clone().unwrap_or_default(),
                token: loss.lost.token,
                winner: loss.winner.clone(),
            });
        }
    }
}
