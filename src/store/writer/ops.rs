//! The writer's op work inside a group's transaction: numbering, stamping and chaining local ops
//! (signing the chain head every batch), and applying verified batches of peers' ops in order.

use std::sync::Arc;

use serde_bytes::ByteBuf;

use super::{now_ms, AppliedOp, CommitEvent, LeaseLoss, LocalIntent, RemoteOutcome, Writer, MAX_CLOCK_AHEAD_MS};
use crate::ids::{Origin, Seq};
use crate::op::{cid_from_digest, ChainHash, Op, OpBatch, OpBody, VerifiedBatch};
use crate::store::apply::{apply_op, Effect, Prepared, StateSink};
use crate::store::log::encode_row;
use crate::store::memtable::PendingRow;
use crate::store::{OriginProgress, StoreError};

/// The local ops of the group not yet under a signed head.
#[derive(Default)]
pub(super) struct OpenBatch {
    after: Seq,
    ops: Vec<ByteBuf>,
    /// The chain hash after each op in `ops`.
    chains: Vec<ChainHash>,
    bytes: usize,
}

impl Writer {
    /// Turns intents into ops of this node and applies them.
    pub(super) fn apply_local(
        &mut self,
        tables: &mut impl StateSink,
        intents: Vec<LocalIntent>,
        open: &mut OpenBatch,
        event: &mut CommitEvent,
    ) -> Result<Vec<AppliedOp>, LocalFailure> {
        let now = now_ms();
        let mut bodies = Vec::with_capacity(intents.len());
        for intent in intents {
            bodies.push(match intent {
                LocalIntent::Put { register, key, value } => OpBody::RegisterPut { register, key, value },
                LocalIntent::Delete { register, key } => OpBody::RegisterDelete { register, key },
                LocalIntent::CounterAdd { counter, key, delta } => OpBody::CounterAdd { counter, key, delta },
                LocalIntent::Lease { lease, key, grant } => OpBody::LeaseSet {
                    lease,
                    key,
                    holder: grant.holder,
                    token: grant.token,
                    expires_at_ms: grant.expires_at_ms,
                },
            });
        }
        let me = self.signer.origin();
        let me_bytes = me.to_bytes();
        let mut applied = Vec::with_capacity(bodies.len());
        for body in bodies {
            let prev = self.mirror.progress.get(&me).copied().unwrap_or_default();
            let op = Op { origin: me, seq: prev.seq.next(), hlc: self.clock.now(now), body };
            let bytes = op.encode();
            let digest = *blake3::hash(&bytes).as_bytes();
            let chain = prev.chain.extend(&digest);
            let effect = apply_op(tables, &mut self.mirror.buckets, &op, &me_bytes, None)?;
            self.mirror.progress.insert(me, OriginProgress { seq: op.seq, chain });
            note_effect(event, &op, &effect, me);
            if open.ops.is_empty() {
                open.after = prev.seq;
            }
            open.bytes += bytes.len();
            open.ops.push(ByteBuf::from(bytes));
            open.chains.push(chain);
            if open.ops.len() >= self.config.batch_max_ops || open.bytes >= self.config.batch_max_bytes {
                self.seal_batch(tables, open, event)?;
            }
            applied.push(AppliedOp { token: op.token(), cid: cid_from_digest(&digest), effect });
        }
        Ok(applied)
    }

    /// Signs the chain head after the open local ops and turns them into a publishable batch.
    pub(super) fn seal_batch(
        &mut self,
        tables: &mut impl StateSink,
        open: &mut OpenBatch,
        event: &mut CommitEvent,
    ) -> Result<(), StoreError> {
        if open.ops.is_empty() {
            return Ok(());
        }
        let me = self.signer.origin();
        let p = self.mirror.progress[&me];
        let head = self.signer.sign_head(p.seq, p.chain);
        let row = encode_row(open.chains.iter().zip(open.ops.iter().map(|b| b.as_slice())));
        let row = PendingRow { row, signature: head.signature.clone(), ops: open.ops.len() as u64 };
        tables.log_batch(&me.to_bytes(), p.seq, row)?;
        let ops = std::mem::take(&mut open.ops);
        open.chains.clear();
        open.bytes = 0;
        event.local_batches.push(Arc::new(OpBatch { after: open.after, ops, head }));
        Ok(())
    }

    /// Applies the part of a verified batch this node does not have yet.
    pub(super) fn apply_remote(
        &mut self,
        tables: &mut impl StateSink,
        batch: VerifiedBatch,
        prepared: Vec<Prepared>,
        event: &mut CommitEvent,
    ) -> Result<RemoteOutcome, StoreError> {
        let origin = batch.origin;
        let have = self.mirror.progress.get(&origin).copied().unwrap_or_default();
        let after = Seq(batch.ops[0].op.seq.0 - 1);
        if batch.head.seq <= have.seq {
            return Ok(RemoteOutcome::Duplicate);
        }
        if after > have.seq {
            return Ok(RemoteOutcome::Gap { have: have.seq, batch_after: after });
        }
        let skip = (have.seq.0 - after.0) as usize;
        let new = &batch.ops[skip..];
        if have.chain.extend(&new[0].digest) != new[0].chain {
            return Ok(RemoteOutcome::Fork { at: new[0].op.seq });
        }
        let origin_bytes = origin.to_bytes();
        let horizon = now_ms().saturating_add(MAX_CLOCK_AHEAD_MS);
        let mut prepared = prepared.into_iter().skip(skip);
        for v in new {
            // A remote clock far ahead would drag this node's clock with it; apply, but don't follow.
            if v.op.hlc.wall_ms <= horizon {
                self.clock.observe(v.op.hlc);
            }
            let effect = apply_op(tables, &mut self.mirror.buckets, &v.op, &origin_bytes, prepared.next())?;
            note_effect(event, &v.op, &effect, self.signer.origin());
        }
        let row = encode_row(new.iter().map(|v| (&v.chain, v.bytes.as_slice())));
        let row = PendingRow { row, signature: batch.head.signature.clone(), ops: new.len() as u64 };
        tables.log_batch(&origin_bytes, batch.head.seq, row)?;
        self.mirror.progress.insert(origin, OriginProgress { seq: batch.head.seq, chain: batch.head.head });
        event.remote.push((origin, new[0].op.seq, batch.head.seq));
        Ok(RemoteOutcome::Applied { ops: new.len() })
    }
}

pub(super) enum LocalFailure {
    Store(StoreError),
}

impl From<StoreError> for LocalFailure {
    fn from(e: StoreError) -> Self {
        LocalFailure::Store(e)
    }
}

fn note_effect(event: &mut CommitEvent, op: &Op, effect: &Effect, me: Origin) {
    match (effect, &op.body) {
        (Effect::Register { won: false, .. }, _) | (Effect::Register { replaced_other_origin: true, .. }, _) => {
            event.conflicts += 1
        }
        (Effect::Lease { state, won: true, displaced }, OpBody::LeaseSet { lease, key, .. }) => {
            event.leases.push((lease.clone(), key.clone(), state.clone()));
            if let Some(lost) = displaced {
                let overridden = lost.holder.is_some() && lost.token == state.token && lost.holder != state.holder;
                if lost.origin == me && op.origin != me && overridden {
                    event.leases_lost.push(LeaseLoss {
                        lease: lease.clone(),
                        key: key.clone(),
                        lost: (**lost).clone(),
                        winner: state.clone(),
                    });
                }
            }
        }
        _ => {}
    }
}
