//! Version vectors: per origin, the highest contiguous seq applied.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::ids::{Origin, Seq, Token};

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct VersionVector(pub BTreeMap<Origin, Seq>);

impl VersionVector {
    pub fn get(&self, origin: &Origin) -> Seq {
        self.0.get(origin).copied().unwrap_or(Seq::ZERO)
    }

    /// Whether the write named by `token` has been applied.
    pub fn covers(&self, token: &Token) -> bool {
        self.get(&token.origin) >= token.seq
    }

    /// Whether every op `other` has applied is applied here too.
    pub fn dominates(&self, other: &VersionVector) -> bool {
        other.0.iter().all(|(o, s)| self.get(o) >= *s)
    }

    /// The origins whose seq here is above their seq in `earlier`, with the seq here.
    pub fn advanced_since<'a>(&'a self, earlier: &'a VersionVector) -> impl Iterator<Item = (&'a Origin, Seq)> + 'a {
        self.0.iter().filter(|(o, s)| **s > earlier.get(o)).map(|(o, s)| (o, *s))
    }

    /// Total number of ops applied across origins.
    pub fn total(&self) -> u64 {
        self.0.values().map(|s| s.0).sum()
    }
}
