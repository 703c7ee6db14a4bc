use std::sync::Arc;

use crate::crdt::LeaseError;
use crate::store::{StoreError, WriterError};

/// Errors of the node API. The HTTP API maps each to a status and a stable code (see `api::error`).
#[derive(Debug, Clone, thiserror::Error)]
pub enum NodeError {
    /// The request itself is wrong (bad name, empty key, bad TTL...). Fix the request.
    #[error("{0}")]
    InvalidInput(String),
    #[error("value is {size} bytes, the limit is {max}")]
    ValueTooLarge { size: usize, max: usize },
    #[error("lease is held by {holder:?} (token {token}) until {until_ms} ms since the epoch")]
    LeaseHeld { holder: String, token: u64, until_ms: u64 },
    #[error("{holder:?} does not hold this lease; acquire it first")]
    NotHolder { holder: String },
    #[error("this node is a read-only replica; write to a primary instead (known primaries: {})", list(.primaries))]
    ReadOnlyReplica { primaries: Vec<String> },
    #[error("this node is still syncing and may be stale; retry later or read with stale=true")]
    Syncing,
    #[error("waited {waited_ms} ms and these writes are still not applied here: {}", .missing.join(", "))]
    Timeout { waited_ms: u64, missing: Vec<String> },
    /// `?ack=`: fewer other nodes than asked applied the write before the deadline. The write
    /// itself is durable here and goes on replicating.
    #[error(
        "the write is durable here, but only {acked} other nodes applied it before the deadline, of {wanted} asked"
    )]
    AckTimeout { acked: usize, wanted: String },
    /// A lease request: no quorum of the lease group's primaries answered in time.
    #[error("no quorum of the lease group's primaries: {0}")]
    NoQuorum(String),
    #[error("storage failure, the write was not committed: {0}")]
    Store(Arc<StoreError>),
    #[error("the node is shutting down")]
    ShuttingDown,
}

fn list(items: &[String]) -> String {
    if items.is_empty() {
        "none yet".into()
    } else {
        items.join(", ")
    }
}

impl From<StoreError> for NodeError {
    fn from(e: StoreError) -> Self {
        NodeError::Store(Arc::new(e))
    }
}

impl From<LeaseError> for NodeError {
    fn from(e: LeaseError) -> Self {
        match e {
            LeaseError::Held { holder, token, until_ms } => NodeError::LeaseHeld { holder, token, until_ms },
            LeaseError::NotHolder { holder } => NodeError::NotHolder { holder },
        }
    }
}

impl From<crate::sync::leases::LeaseFailure> for NodeError {
    fn from(e: crate::sync::leases::LeaseFailure) -> Self {
        match e {
            crate::sync::leases::LeaseFailure::Refused(e) => e.into(),
            crate::sync::leases::LeaseFailure::NoQuorum(reason) => NodeError::NoQuorum(reason),
        }
    }
}

impl From<WriterError> for NodeError {
    fn from(e: WriterError) -> Self {
        match e {
            WriterError::Lease(e) => e.into(),
            WriterError::Store(e) => NodeError::Store(e),
            WriterError::Closed => NodeError::ShuttingDown,
        }
    }
}
