//! Sync logic without I/O: decisions about what to apply, buffer or fetch, driven by the node's
//! event loop. Nothing here touches the network, the disk or the clock; the callers pass in what
//! they observed and carry out what comes back, so the logic is testable deterministically.
//!
//! Must never depend on: the store's internals, the network, or the node.

mod gap;
mod pace;
mod pause;
mod readiness;
mod redial;
mod replay;
mod snapshot;

pub use gap::{Admit, Gap, GapBuffer, GapLimits};
pub use pace::DigestPace;
pub use pause::doubling;
pub use readiness::{Phase, Readiness, Transition};
pub use redial::{Redial, FIRST_REDIAL_PAUSE, MAX_REDIAL_PAUSE};
pub use replay::{PeerView, Pull, ReplayPlanner};
pub use snapshot::{
    choose_snapshot, ChunkRequest, Offer, PullProgress, SnapshotChoice, SnapshotPull, SnapshotReason, SnapshotRetry,
};
