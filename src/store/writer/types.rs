//! What the writer takes and answers: its limits, a local write's intents, what applying ops came
//! to, the commit events it publishes, and its errors.

use std::sync::Arc;

use cid::Cid;

use crate::crdt::{LeaseError, LeaseGrant, LeaseState};
use crate::ids::{Origin, Seq, Token};
use crate::op::OpBatch;
use crate::store::{Effect, StoreError};

/// Limits of the writer. Every queue and group is bounded.
#[derive(Debug, Clone)]
pub struct WriterConfig {
    /// Requests that may wait for the writer; callers wait (backpressure) beyond it. Default 4096.
    pub queue: usize,
    /// Ops in one transaction at most; bounds the latency a group adds. Default 16384.
    pub max_group_ops: usize,
    /// Local ops under one signed head at most (one published batch). Default 256.
    pub batch_max_ops: usize,
    /// Op bytes under one signed head at most, to stay under the gossip transmit limit. Default 48 KiB.
    pub batch_max_bytes: usize,
    /// Bytes of peers' ops the memtable holds before it is flushed to redb ahead of the durability
    /// tick (see `memtable.rs`). Default [`DEFAULT_MEMTABLE_BYTES`].
    pub memtable_bytes: usize,
}

/// Default bound of the memtable: at 300k replayed ops a second of 100 B values, the 100 ms between
/// durability ticks hold about 8 MiB.
pub const DEFAULT_MEMTABLE_BYTES: usize = 32 << 20;

impl Default for WriterConfig {
    fn default() -> Self {
        WriterConfig {
            queue: 4096,
            max_group_ops: 16384,
            batch_max_ops: 256,
            batch_max_bytes: 48 * 1024,
            memtable_bytes: DEFAULT_MEMTABLE_BYTES,
        }
    }
}

/// A local mutation asked for by a client.
#[derive(Debug, Clone)]
pub enum LocalIntent {
    Put {
        register: String,
        key: Vec<u8>,
        value: Vec<u8>,
    },
    Delete {
        register: String,
        key: Vec<u8>,
    },
    CounterAdd {
        counter: String,
        key: Vec<u8>,
        delta: i64,
    },
    /// A lease grant the lease service decided (see `sync::leases`): written as the lease's
    /// replicated state, so every node can read who holds it.
    Lease {
        lease: String,
        key: Vec<u8>,
        grant: LeaseGrant,
    },
}

/// A local op once committed.
#[derive(Debug, Clone)]
pub struct AppliedOp {
    pub token: Token,
    pub cid: Cid,
    pub effect: Effect,
}

/// What became of a remote batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RemoteOutcome {
    /// `ops` new ops were applied (the rest of the batch was already here).
    Applied { ops: usize },
    /// Every op of the batch was already applied.
    Duplicate,
    /// The batch starts after `have + 1`: ops are missing in between. Nothing was applied.
    Gap { have: Seq, batch_after: Seq },
    /// The batch does not continue the chain this node holds for its origin: the origin signed two
    /// different histories, or this node's log is not the origin's. Nothing was applied.
    Fork { at: Seq },
}

/// What one commit changed, for subscribers (gossip publishing, events, waiters).
#[derive(Debug, Clone, Default)]
pub struct CommitEvent {
    /// Local ops of this commit, as signed batches ready to publish.
    pub local_batches: Vec<Arc<OpBatch>>,
    /// Ranges `(origin, first, last)` of remote ops applied.
    pub remote: Vec<(Origin, Seq, Seq)>,
    /// Leases whose state changed: (lease, key, new state).
    pub leases: Vec<(String, Vec<u8>, LeaseState)>,
    /// Grants this node made that a concurrent grant of another primary overrode.
    pub leases_lost: Vec<LeaseLoss>,
    /// Register writes that arrived after a newer concurrent write and lost, plus writes that
    /// replaced another origin's value.
    pub conflicts: u64,
    /// The manifest CID of a snapshot installed by this commit (its state is merged and the version
    /// vector jumped to it; no ops of the jump are listed in `remote`).
    pub snapshot_installed: Option<Cid>,
}

/// A lease grant of this node that lost to a concurrent grant elsewhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseLoss {
    pub lease: String,
    pub key: Vec<u8>,
    /// The grant this node had made.
    pub lost: LeaseState,
    /// The state that won.
    pub winner: LeaseState,
}

/// Why a write failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WriterError {
    #[error(transparent)]
    Lease(#[from] LeaseError),
    #[error("write not committed: {0}")]
    Store(Arc<StoreError>),
    #[error("the store is shutting down")]
    Closed,
}
