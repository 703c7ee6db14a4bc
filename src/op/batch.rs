//! Batches of one origin's contiguous ops with the signed head that vouches for them, and their
//! verification. A batch is what gossip carries and what replay returns.

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use super::chain::{AuthError, ChainHash, SignedHead};
use super::{DecodeError, Op};
use crate::crdt::MAX_CLOCK_AHEAD_MS;
use crate::ids::{Origin, Seq};

/// Contiguous ops of one origin, `after + 1 ..= head.seq`, as their canonical bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpBatch {
    /// Seq of the op just before the first op of the batch (0 when the batch starts the log).
    pub after: Seq,
    /// Canonical op bytes, in seq order.
    pub ops: Vec<ByteBuf>,
    /// The origin's signature over its chain value after the last op.
    pub head: SignedHead,
}

/// An op whose bytes, position and chain value have been checked.
#[derive(Debug, Clone)]
pub struct VerifiedOp {
    pub op: Op,
    /// Canonical bytes, kept so they are stored and relayed exactly as signed.
    pub bytes: Vec<u8>,
    /// blake3 of `bytes`: the op CID's digest.
    pub digest: [u8; 32],
    /// Chain value after this op.
    pub chain: ChainHash,
}

/// A batch whose every op is authentic and contiguous.
#[derive(Debug, Clone)]
pub struct VerifiedBatch {
    pub origin: Origin,
    pub ops: Vec<VerifiedOp>,
    pub head: SignedHead,
}

/// Why a batch was rejected. Every variant but `Ahead` (which may be the receiver's clock) means
/// the sender sent something wrong.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("batch holds no ops")]
    Empty,
    #[error("batch holds {count} ops, more than the limit of {limit}")]
    TooMany { count: usize, limit: usize },
    #[error("op {index} of the batch: {source}")]
    Malformed { index: usize, source: DecodeError },
    #[error("op {index} of the batch has another origin than the batch's signer")]
    WrongOrigin { index: usize },
    #[error("op {index} of the batch has seq {found}, expected {expected}")]
    NotContiguous { index: usize, expected: Seq, found: Seq },
    #[error("batch ends at seq {last} but its signed head is for seq {head}")]
    HeadSeq { last: Seq, head: Seq },
    #[error("the ops do not hash to the signed head at seq {0}: altered or forged ops")]
    ChainMismatch(Seq),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("op {index} of the batch is stamped {ahead_ms} ms ahead of this node's clock (at most {max_ms} allowed); refused until it is not")]
    Ahead { index: usize, ahead_ms: u64, max_ms: u64 },
}

impl OpBatch {
    /// Bytes of the ops, with a few per op for their framing: what the batch adds to a message.
    pub fn ops_bytes(&self) -> usize {
        self.ops.iter().map(|o| o.len() + 4).sum()
    }

    /// Joins `next`, which continues this batch (same origin, first op right after this batch's
    /// last), into one batch under `next`'s head: that head's chain value covers every op before it,
    /// so the joined batch verifies as both did, with one signature check instead of two. Returns
    /// false, changing nothing, when `next` does not continue this batch.
    pub fn append(&mut self, next: &OpBatch) -> bool {
        if next.head.origin != self.head.origin || next.after != self.head.seq || next.ops.is_empty() {
            return false;
        }
        self.ops.extend(next.ops.iter().cloned());
        self.head = next.head.clone();
        true
    }

    /// Verifies the batch given the chain value the receiver holds at `self.after`.
    pub fn verify(self, prev: ChainHash, max_ops: usize) -> Result<VerifiedBatch, VerifyError> {
        if self.ops.is_empty() {
            return Err(VerifyError::Empty);
        }
        if self.ops.len() > max_ops {
            return Err(VerifyError::TooMany { count: self.ops.len(), limit: max_ops });
        }
        let origin = self.head.origin;
        let mut chain = prev;
        let mut expected = self.after.next();
        let mut ops = Vec::with_capacity(self.ops.len());
        for (index, bytes) in self.ops.into_iter().enumerate() {
            let bytes = bytes.into_vec();
            let op = Op::decode(&bytes).map_err(|source| VerifyError::Malformed { index, source })?;
            if op.origin != origin {
                return Err(VerifyError::WrongOrigin { index });
            }
            if op.seq != expected {
                return Err(VerifyError::NotContiguous { index, expected, found: op.seq });
            }
            let digest = *blake3::hash(&bytes).as_bytes();
            chain = chain.extend(&digest);
            ops.push(VerifiedOp { op, bytes, digest, chain });
            expected = expected.next();
        }
        let last = Seq(expected.0 - 1);
        if last != self.head.seq {
            return Err(VerifyError::HeadSeq { last, head: self.head.seq });
        }
        if chain != self.head.head {
            return Err(VerifyError::ChainMismatch(last));
        }
        self.head.verify()?;
        Ok(VerifiedBatch { origin, ops, head: self.head })
    }
}

impl VerifiedBatch {
    /// Checks that no op is stamped more than [`MAX_CLOCK_AHEAD_MS`] past `wall_ms`, the
    /// receiver's wall clock. Such a batch is refused now and taken once the clock has caught up.
    pub fn check_clock(&self, wall_ms: u64) -> Result<(), VerifyError> {
        let horizon = wall_ms.saturating_add(MAX_CLOCK_AHEAD_MS);
        match self.ops.iter().position(|o| o.op.hlc.wall_ms > horizon) {
            None => Ok(()),
            Some(index) => Err(VerifyError::Ahead {
                index,
                ahead_ms: self.ops[index].op.hlc.wall_ms - wall_ms,
                max_ms: MAX_CLOCK_AHEAD_MS,
            }),
        }
    }

    /// The wire form of the batch, to relay it unchanged.
    pub fn to_wire(&self) -> OpBatch {
        let after = Seq(self.ops[0].op.seq.0 - 1);
        OpBatch {
            after,
            ops: self.ops.iter().map(|o| ByteBuf::from(o.bytes.clone())).collect(),
            head: self.head.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crdt::Hlc;
    use crate::op::{OpBody, Signer};

    fn signed_batch(signer: &Signer, n: u64) -> OpBatch {
        let mut chain = ChainHash::GENESIS;
        let mut ops = Vec::new();
        for seq in 1..=n {
            let op = Op {
                origin: signer.origin(),
                seq: Seq(seq),
                hlc: Hlc::new(seq, 0),
                body: OpBody::CounterAdd { counter: "c".into(), key: b"k".to_vec(), delta: 1 },
            };
            let bytes = op.encode();
            chain = chain.extend(blake3::hash(&bytes).as_bytes());
            ops.push(ByteBuf::from(bytes));
        }
        OpBatch { after: Seq(0), ops, head: signer.sign_head(Seq(n), chain) }
    }

    #[test]
    fn a_batch_stamped_too_far_ahead_is_refused_until_the_clock_catches_up() {
        let signer = Signer::new(libp2p::identity::Keypair::generate_ed25519());
        let mut v = signed_batch(&signer, 5).verify(ChainHash::GENESIS, 100).unwrap();
        v.ops[2].op.hlc.wall_ms = 70_000;
        assert!(matches!(v.check_clock(9_999), Err(VerifyError::Ahead { index: 2, ahead_ms: 60_001, .. })));
        assert!(v.check_clock(10_000).is_ok());
        assert!(v.check_clock(u64::MAX).is_ok());
    }

    #[test]
    fn authentic_batch_verifies() {
        let signer = Signer::new(libp2p::identity::Keypair::generate_ed25519());
        let verified = signed_batch(&signer, 5).verify(ChainHash::GENESIS, 100).unwrap();
        assert_eq!(verified.ops.len(), 5);
        assert_eq!(verified.ops[4].chain, verified.head.head);
    }

    #[test]
    fn forged_or_altered_batches_are_rejected() {
        let signer = Signer::new(libp2p::identity::Keypair::generate_ed25519());
        let other = Signer::new(libp2p::identity::Keypair::generate_ed25519());

        let mut altered = signed_batch(&signer, 3);
        let mut op = Op::decode(&altered.ops[1]).unwrap();
        op.body = OpBody::CounterAdd { counter: "c".into(), key: b"k".to_vec(), delta: 1_000 };
        altered.ops[1] = ByteBuf::from(op.encode());
        assert!(matches!(altered.verify(ChainHash::GENESIS, 100), Err(VerifyError::ChainMismatch(_))));

        let mut resigned = signed_batch(&signer, 3);
        resigned.head.signature = other.sign_head(Seq(3), resigned.head.head).signature;
        assert!(matches!(resigned.verify(ChainHash::GENESIS, 100), Err(VerifyError::Auth(_))));

        let mut gap = signed_batch(&signer, 3);
        gap.ops.remove(1);
        assert!(matches!(gap.verify(ChainHash::GENESIS, 100), Err(VerifyError::NotContiguous { .. })));

        let mut garbage = signed_batch(&signer, 2);
        garbage.ops[0] = ByteBuf::from(vec![0xff; 3]);
        assert!(matches!(garbage.verify(ChainHash::GENESIS, 100), Err(VerifyError::Malformed { .. })));

        assert!(matches!(signed_batch(&signer, 3).verify(ChainHash::GENESIS, 2), Err(VerifyError::TooMany { .. })));
        assert!(matches!(signed_batch(&signer, 3).verify(ChainHash([1; 32]), 100), Err(VerifyError::ChainMismatch(_))));
    }
}
