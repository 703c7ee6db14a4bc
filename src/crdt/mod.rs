//! Conflict-free replicated data types: the values peersync keeps and how two versions merge.
//!
//! Every merge here is commutative, associative and idempotent, so replicas that saw the same writes
//! in any order hold the same state. Pure data: this module must never depend on the store, the
//! network, the clock or the node.

mod counter;
mod hlc;
mod lease;
mod register;

pub use counter::{Contribution, PnCounter};
pub use hlc::{Hlc, HlcClock, MAX_CLOCK_AHEAD_MS};
pub use lease::{decide as decide_lease, LeaseError, LeaseGrant, LeaseRequest, LeaseState, LeaseView};
pub use register::RegisterValue;
