//! Hybrid logical clock.
//!
//! An [`Hlc`] orders events by wall-clock milliseconds, then by a logical counter that breaks ties and
//! keeps the clock moving forward when the wall clock stalls or steps backwards. The clock never goes
//! backwards: every timestamp it hands out is strictly greater than every timestamp it handed out or
//! observed before, whatever the wall clock says.
//!
//! Must never depend on: the store, the network, or the system clock (callers pass `wall_ms`).

use serde::{Deserialize, Serialize};

/// How far ahead of a node's wall clock a timestamp from elsewhere may be. A remote op further ahead
/// is refused until the node's clock comes within this bound (replay brings it again), so a peer
/// with a wrong or lying clock cannot win every register for the time it is ahead, nor drag the
/// node's clock with it. It is also the documented bound on clock differences between nodes.
pub const MAX_CLOCK_AHEAD_MS: u64 = 60_000;

/// A hybrid logical timestamp. Ordered by `(wall_ms, logical)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
pub struct Hlc {
    /// Milliseconds since the Unix epoch, as the physical part of the timestamp.
    pub wall_ms: u64,
    /// Tie-breaker for events within one millisecond, or while the wall clock lags behind.
    pub logical: u32,
}

impl Hlc {
    pub const ZERO: Hlc = Hlc { wall_ms: 0, logical: 0 };

    pub fn new(wall_ms: u64, logical: u32) -> Self {
        Hlc { wall_ms, logical }
    }

    /// The smallest timestamp strictly greater than `self`.
    fn successor(self) -> Hlc {
        match self.logical.checked_add(1) {
            Some(logical) => Hlc { wall_ms: self.wall_ms, logical },
            None => Hlc { wall_ms: self.wall_ms + 1, logical: 0 },
        }
    }
}

impl std::fmt::Display for Hlc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.wall_ms, self.logical)
    }
}

/// The clock state of one node: the greatest timestamp issued or observed so far.
#[derive(Debug, Clone, Copy, Default)]
pub struct HlcClock {
    /// Greatest timestamp issued or observed; every new timestamp is strictly above it.
    last: Hlc,
}

impl HlcClock {
    /// A clock that resumes after `last` (for example the value persisted before a restart).
    pub fn resume(last: Hlc) -> Self {
        HlcClock { last }
    }

    /// The greatest timestamp issued or observed.
    pub fn last(&self) -> Hlc {
        self.last
    }

    /// Issues a timestamp for a local event at wall-clock time `wall_ms`.
    pub fn now(&mut self, wall_ms: u64) -> Hlc {
        let next = if wall_ms > self.last.wall_ms { Hlc::new(wall_ms, 0) } else { self.last.successor() };
        self.last = next;
        next
    }

    /// Takes a remote timestamp into account so later local events order after it.
    pub fn observe(&mut self, remote: Hlc) {
        if remote > self.last {
            self.last = remote;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_goes_backwards_when_wall_clock_does() {
        let mut clock = HlcClock::default();
        let a = clock.now(1_000);
        let b = clock.now(900);
        let c = clock.now(900);
        let d = clock.now(1_001);
        assert!(a < b && b < c && c < d, "{a} {b} {c} {d}");
        assert_eq!(d, Hlc::new(1_001, 0));
    }

    #[test]
    fn observed_remote_time_orders_later_events_after_it() {
        let mut clock = HlcClock::default();
        clock.now(10);
        clock.observe(Hlc::new(5_000, 7));
        assert!(clock.now(20) > Hlc::new(5_000, 7));
    }

    #[test]
    fn logical_overflow_moves_to_next_millisecond() {
        let mut clock = HlcClock::resume(Hlc::new(3, u32::MAX));
        assert_eq!(clock.now(0), Hlc::new(4, 0));
    }
}
