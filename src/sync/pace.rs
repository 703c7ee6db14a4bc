//! How often digests are exchanged: the shortest period while this node is behind a peer, not yet
//! active, alone, or has applied ops since the last round; otherwise doubling up to the longest.

use std::time::Duration;

use super::doubling;

#[derive(Debug, Clone)]
pub struct DigestPace {
    min: Duration,
    max: Duration,
    /// Idle rounds in a row (nothing of the above).
    idle: u32,
    /// Ops applied at the last round, to tell whether anything changed since.
    applied: u64,
}

impl DigestPace {
    /// `min` is also the period before the first round.
    pub fn new(min: Duration, max: Duration) -> Self {
        DigestPace { min, max, idle: 0, applied: 0 }
    }

    /// Records a round and returns the period until the next one. `applied`: ops applied in total;
    /// `busy`: this node is behind a peer, not yet active, or has no peer to exchange with.
    pub fn after_round(&mut self, applied: u64, busy: bool) -> Duration {
        let changed = applied != self.applied;
        self.applied = applied;
        if busy || changed {
            self.idle = 0;
        } else {
            self.idle += 1;
        }
        doubling(self.min, self.idle, self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_while_busy_or_changing_doubling_while_idle() {
        let ms = Duration::from_millis;
        let mut pace = DigestPace::new(ms(250), ms(10_000));
        assert_eq!(pace.after_round(5, false), ms(250), "ops applied since the start");
        let idle: Vec<_> = (0..8).map(|_| pace.after_round(5, false)).collect();
        assert_eq!(idle, [500, 1000, 2000, 4000, 8000, 10_000, 10_000, 10_000].map(ms));
        assert_eq!(pace.after_round(5, true), ms(250), "behind, not active or alone");
        assert_eq!(pace.after_round(5, false), ms(500));
        assert_eq!(pace.after_round(6, false), ms(250), "a change");
    }
}
