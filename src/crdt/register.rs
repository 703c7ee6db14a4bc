//! Last-writer-wins register values.
//!
//! Each key of a register holds the value of the write with the greatest `(hlc, origin)`. A delete is a
//! write of `None` (a tombstone), so a delete and a concurrent put resolve like any two writes.

use serde::{Deserialize, Serialize};

use crate::crdt::Hlc;
use crate::ids::Origin;

/// The current value of one register key, with the stamp that decides which write wins.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterValue {
    /// When the winning write happened.
    pub hlc: Hlc,
    /// Who made the winning write; breaks ties between equal timestamps.
    pub origin: Origin,
    /// The value, or `None` for a tombstone.
    #[serde(with = "serde_bytes")]
    pub value: Option<Vec<u8>>,
}

impl RegisterValue {
    /// Whether `self` wins over `other`. Equal stamps only come from the same op, but a forged pair is
    /// still ordered deterministically by its bytes so every replica picks the same one.
    pub fn wins_over(&self, other: &RegisterValue) -> bool {
        (self.hlc, self.origin, &self.value) > (other.hlc, other.origin, &other.value)
    }

    /// The merge of two values: the winner. Commutative, associative and idempotent.
    pub fn merge(self, other: RegisterValue) -> RegisterValue {
        if other.wins_over(&self) {
            other
        } else {
            self
        }
    }

    pub fn is_tombstone(&self) -> bool {
        self.value.is_none()
    }
}
