//! PN-counters: one increment total and one decrement total per origin.
//!
//! An origin only ever raises its own totals, so merging two states takes the pointwise maximum and
//! every increment is counted exactly once, however often states are merged.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::ids::Origin;

/// The totals contributed by one origin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Contribution {
    /// Sum of the origin's positive deltas.
    pub incr: u64,
    /// Sum of the magnitudes of the origin's negative deltas.
    pub decr: u64,
}

/// A counter value: contributions keyed by origin (a `BTreeMap` so its encoding is canonical).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PnCounter {
    pub contributions: BTreeMap<Origin, Contribution>,
}

impl PnCounter {
    /// Records one delta made by `origin`. Saturates instead of wrapping.
    pub fn add(&mut self, origin: Origin, delta: i64) {
        let c = self.contributions.entry(origin).or_default();
        if delta >= 0 {
            c.incr = c.incr.saturating_add(delta as u64);
        } else {
            c.decr = c.decr.saturating_add(delta.unsigned_abs());
        }
    }

    /// The counter's value, clamped to the `i64` range.
    pub fn value(&self) -> i64 {
        let total: i128 = self.contributions.values().map(|c| c.incr as i128 - c.decr as i128).sum();
        total.clamp(i64::MIN as i128, i64::MAX as i128) as i64
    }

    /// Pointwise maximum of both states. Commutative, associative and idempotent.
    pub fn merge(mut self, other: &PnCounter) -> PnCounter {
        for (origin, theirs) in &other.contributions {
            let ours = self.contributions.entry(*origin).or_default();
            ours.incr = ours.incr.max(theirs.incr);
            ours.decr = ours.decr.max(theirs.decr);
        }
        self
    }
}
