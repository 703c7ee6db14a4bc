//! Sync logic without I/O. [`Engine`] holds every decision of both planes; the node's event loop
//! and the simulator drive it, feeding it what they observed and carrying out what it asks. The
//! smaller parts it is built from (gap buffer, replay planner, readiness, snapshot choice and chunk
//! pulls, digest pace, redial) live beside it, each testable on its own. Nothing here touches the
//! network, the disk or the clock.
//!
//! Must never depend on: the store's internals, the network, or the node.

pub mod engine;
mod gap;
pub mod leases;
mod pace;
mod pause;
mod readiness;
mod redial;
mod replay;
pub mod serve;
mod snapshot;
mod snapshot_choice;

pub use engine::MAX_BATCH_OPS;
pub use engine::{
    AckWanted, Action, ChunkVerdict, Count, Engine, EngineConfig, Found, GossipId, Input, Membership, ProviderKey,
    ReplyId, ReqId, StoreView, Ticket, Verdict, WaitId, ACK_HOLD_MAX, MAX_ACK_WAITS,
};
pub use gap::{Admit, Gap, GapBuffer, GapLimits};
pub use pace::DigestPace;
pub use pause::doubling;
pub use readiness::{Phase, Readiness, Transition};
pub use redial::{Redial, FIRST_REDIAL_PAUSE, MAX_REDIAL_PAUSE};
pub use replay::{PeerView, Pull, ReplayPlanner};
pub use serve::{serve, ServeStore};
pub use snapshot::{ChunkRequest, PullProgress, SnapshotPull, SnapshotRetry};
pub use snapshot_choice::{choose_snapshot, Offer, SnapshotChoice, SnapshotReason};
