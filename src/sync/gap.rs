//! The gap buffer: batches that arrived ahead of a missing part of their origin's log wait here
//! until the missing ops arrive (or repair fetches them).
//!
//! Bounded in ops and bytes across all origins; a batch that would overflow it is refused and its
//! ops are left to repair. Pure data structure: no I/O, no clock.

use std::collections::BTreeMap;

use crate::ids::{Origin, Seq};
use crate::op::OpBatch;

/// Bounds of the gap buffer.
#[derive(Debug, Clone, Copy)]
pub struct GapLimits {
    /// Ops buffered at most, over all origins. Default 100 000.
    pub max_ops: usize,
    /// Op bytes buffered at most, over all origins. Default 64 MiB.
    pub max_bytes: usize,
}

impl Default for GapLimits {
    fn default() -> Self {
        GapLimits { max_ops: 100_000, max_bytes: 64 << 20 }
    }
}

/// What the buffer did with a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    Buffered,
    /// A batch with the same range is already buffered.
    AlreadyBuffered,
    /// Buffering it would exceed the limits; it was dropped.
    Overflow,
}

/// A hole in an origin's log as seen from the buffered batches.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Gap {
    pub origin: Origin,
    /// Ops after this seq are missing...
    pub missing_after: Seq,
    /// ...up to and including this seq (the first buffered batch starts after it).
    pub missing_through: Seq,
    /// Ops buffered for this origin beyond the gap.
    pub buffered_ops: usize,
}

#[derive(Debug, Default)]
pub struct GapBuffer {
    limits: GapLimits,
    /// Per origin, batches keyed by `(after, head seq)`.
    origins: BTreeMap<Origin, BTreeMap<(Seq, Seq), OpBatch>>,
    ops: usize,
    bytes: usize,
}

fn size(batch: &OpBatch) -> (usize, usize) {
    (batch.ops.len(), batch.ops.iter().map(|o| o.len()).sum())
}

impl GapBuffer {
    pub fn new(limits: GapLimits) -> Self {
        GapBuffer { limits, ..Default::default() }
    }

    /// Buffers a batch that starts after `have + 1` for its origin.
    pub fn insert(&mut self, batch: OpBatch) -> Admit {
        let (ops, bytes) = size(&batch);
        if self.ops + ops > self.limits.max_ops || self.bytes + bytes > self.limits.max_bytes {
            return Admit::Overflow;
        }
        let slot = self.origins.entry(batch.head.origin).or_default();
        let key = (batch.after, batch.head.seq);
        if slot.contains_key(&key) {
            return Admit::AlreadyBuffered;
        }
        slot.insert(key, batch);
        self.ops += ops;
        self.bytes += bytes;
        Admit::Buffered
    }

    /// Removes and returns, in order, the buffered batches of `origin` that continue a log applied
    /// through `have`, each one continuing the previous. Batches wholly at or below the reached seq
    /// are dropped as duplicates.
    pub fn take_ready(&mut self, origin: &Origin, mut have: Seq) -> Vec<OpBatch> {
        let mut ready = Vec::new();
        let Some(slot) = self.origins.get_mut(origin) else {
            return ready;
        };
        while let Some((&key, _)) = slot.first_key_value() {
            if key.0 > have {
                break;
            }
            let batch = slot.remove(&key).expect("key just seen");
            let (ops, bytes) = size(&batch);
            self.ops -= ops;
            self.bytes -= bytes;
            if key.1 > have {
                have = key.1;
                ready.push(batch);
            }
        }
        if slot.is_empty() {
            self.origins.remove(origin);
        }
        ready
    }

    /// Holes between what is applied (`have(origin)`) and what is buffered.
    pub fn gaps(&self, have: impl Fn(&Origin) -> Seq) -> Vec<Gap> {
        self.origins
            .iter()
            .filter_map(|(origin, slot)| {
                let (first, _) = slot.keys().next()?;
                Some(Gap {
                    origin: *origin,
                    missing_after: have(origin),
                    missing_through: *first,
                    buffered_ops: slot.values().map(|b| b.ops.len()).sum(),
                })
            })
            .collect()
    }

    /// Ops and bytes buffered now.
    pub fn usage(&self) -> (usize, usize) {
        (self.ops, self.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::op::{ChainHash, Signer};
    use serde_bytes::ByteBuf;

    fn batch(signer: &Signer, after: u64, last: u64) -> OpBatch {
        OpBatch {
            after: Seq(after),
            ops: (after + 1..=last).map(|s| ByteBuf::from(vec![s as u8; 10])).collect(),
            head: signer.sign_head(Seq(last), ChainHash::GENESIS),
        }
    }

    #[test]
    fn releases_batches_in_order_once_the_gap_fills() {
        let s = Signer::new(libp2p::identity::Keypair::generate_ed25519());
        let o = s.origin();
        let mut buf = GapBuffer::new(GapLimits::default());
        assert_eq!(buf.insert(batch(&s, 6, 9)), Admit::Buffered);
        assert_eq!(buf.insert(batch(&s, 3, 6)), Admit::Buffered);
        assert_eq!(buf.insert(batch(&s, 3, 6)), Admit::AlreadyBuffered);
        assert_eq!(buf.insert(batch(&s, 12, 13)), Admit::Buffered);
        assert!(buf.take_ready(&o, Seq(2)).is_empty(), "seq 3 is still missing");
        assert_eq!(
            buf.gaps(|_| Seq(2)),
            vec![Gap { origin: o, missing_after: Seq(2), missing_through: Seq(3), buffered_ops: 7 }]
        );
        let ready = buf.take_ready(&o, Seq(3));
        assert_eq!(ready.iter().map(|b| b.head.seq.0).collect::<Vec<_>>(), vec![6, 9]);
        assert_eq!(buf.gaps(|_| Seq(9))[0].missing_through, Seq(12));
        assert_eq!(buf.usage(), (1, 10));
        assert_eq!(buf.take_ready(&o, Seq(20)).len(), 0, "covered batches are dropped");
        assert_eq!(buf.usage(), (0, 0));
        assert!(buf.gaps(|_| Seq(20)).is_empty());
    }

    #[test]
    fn refuses_what_would_overflow() {
        let s = Signer::new(libp2p::identity::Keypair::generate_ed25519());
        let mut buf = GapBuffer::new(GapLimits { max_ops: 4, max_bytes: 1_000 });
        assert_eq!(buf.insert(batch(&s, 10, 14)), Admit::Buffered, "4 ops fit");
        assert_eq!(buf.insert(batch(&s, 20, 21)), Admit::Overflow);
        let mut buf = GapBuffer::new(GapLimits { max_ops: 100, max_bytes: 25 });
        assert_eq!(buf.insert(batch(&s, 10, 12)), Admit::Buffered);
        assert_eq!(buf.insert(batch(&s, 20, 21)), Admit::Overflow);
    }
}
