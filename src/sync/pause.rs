//! The doubling pause every retry in the sync logic waits: a failing peer, a snapshot that could not
//! be had, a chunk that could not be kept, a bootstrap peer that is not connected.

use std::time::Duration;

/// `first` doubled `doublings` times, at most `max`.
pub fn doubling(first: Duration, doublings: u32, max: Duration) -> Duration {
    first.saturating_mul(1u32.checked_shl(doublings).unwrap_or(u32::MAX)).min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_from_the_first_pause_up_to_the_bound() {
        let ms = Duration::from_millis;
        let pauses: Vec<_> = (0..8).map(|n| doubling(ms(100), n, ms(5000))).collect();
        assert_eq!(pauses, [100, 200, 400, 800, 1600, 3200, 5000, 5000].map(ms));
        assert_eq!(doubling(ms(100), 40, Duration::MAX), ms(100).saturating_mul(u32::MAX), "no overflow");
    }
}
