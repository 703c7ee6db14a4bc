//! Applying one op to the state tables inside a write transaction, keeping the bucket hashes in step.

use std::collections::BTreeSet;

use redb::{ReadableTable, Table, WriteTransaction};

use super::root::{entry_hash, identity_hash, Buckets, EntryKind};
use super::tables::*;
use super::StoreError;
use crate::crdt::{LeaseState, PnCounter, RegisterValue};
use crate::op::{Op, OpBody};

type StateTable<'t> = Table<'t, (&'static str, &'static [u8]), &'static [u8]>;
type LogTable<'t> = Table<'t, (&'static [u8], u64), &'static [u8]>;

/// What applying an op did to the state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// A register write. `won` is false when a newer write (by HLC, origin) was already there, so
    /// this one was recorded in the log but changed nothing: a resolved conflict.
    Register { won: bool, replaced_other_origin: bool },
    /// A counter delta; `value` is the counter's value after it.
    Counter { value: i64 },
    /// A lease write; `state` is the lease after the merge, `won` whether this write is it, and
    /// `displaced` the state it replaced when it won.
    Lease { state: LeaseState, won: bool, displaced: Option<Box<LeaseState>> },
}

/// The tables one group commit writes, opened once per transaction.
pub(crate) struct Tables<'t> {
    pub oplog: LogTable<'t>,
    pub heads: LogTable<'t>,
    registers: StateTable<'t>,
    counters: StateTable<'t>,
    leases: StateTable<'t>,
    /// Buckets touched in this transaction, to persist at commit.
    pub dirty: BTreeSet<usize>,
}

impl<'t> Tables<'t> {
    pub fn open(txn: &'t WriteTransaction) -> Result<Self, StoreError> {
        Ok(Tables {
            oplog: txn.open_table(OPLOG)?,
            heads: txn.open_table(HEADS)?,
            registers: txn.open_table(REGISTERS)?,
            counters: txn.open_table(COUNTERS)?,
            leases: txn.open_table(LEASES)?,
            dirty: BTreeSet::new(),
        })
    }

    pub fn lease(&self, lease: &str, key: &[u8]) -> Result<Option<LeaseState>, StoreError> {
        self.leases.get((lease, key))?.map(|g| decode(g.value(), "lease")).transpose()
    }

    /// Applies the state change of `op` (not its log entry) and updates `buckets`.
    pub fn apply(&mut self, buckets: &mut Buckets, op: &Op) -> Result<Effect, StoreError> {
        match &op.body {
            OpBody::RegisterPut { register, key, value } => {
                let new = RegisterValue { hlc: op.hlc, origin: op.origin, value: Some(value.clone()) };
                self.apply_register(buckets, register, key, new)
            }
            OpBody::RegisterDelete { register, key } => {
                let new = RegisterValue { hlc: op.hlc, origin: op.origin, value: None };
                self.apply_register(buckets, register, key, new)
            }
            OpBody::CounterAdd { counter, key, delta } => {
                let id = identity_hash(EntryKind::Counter, counter, key);
                let old = self.counters.get((counter.as_str(), key.as_slice()))?.map(|g| g.value().to_vec());
                let mut value: PnCounter = match &old {
                    Some(bytes) => decode(bytes, "counter")?,
                    None => PnCounter::default(),
                };
                value.add(op.origin, *delta);
                let new = encode(&value);
                self.replace(buckets, &id, old.as_deref(), &new);
                self.counters.insert((counter.as_str(), key.as_slice()), new.as_slice())?;
                Ok(Effect::Counter { value: value.value() })
            }
            OpBody::LeaseSet { lease, key, holder, token, expires_at_ms } => {
                let id = identity_hash(EntryKind::Lease, lease, key);
                let new = LeaseState {
                    holder: holder.clone(),
                    token: *token,
                    expires_at_ms: *expires_at_ms,
                    hlc: op.hlc,
                    origin: op.origin,
                };
                let old = self.leases.get((lease.as_str(), key.as_slice()))?.map(|g| g.value().to_vec());
                let current = old.as_deref().map(|b| decode::<LeaseState>(b, "lease")).transpose()?;
                if let Some(current) = &current {
                    if !new.wins_over(current) {
                        return Ok(Effect::Lease { state: current.clone(), won: false, displaced: None });
                    }
                }
                let bytes = encode(&new);
                self.replace(buckets, &id, old.as_deref(), &bytes);
                self.leases.insert((lease.as_str(), key.as_slice()), bytes.as_slice())?;
                Ok(Effect::Lease { state: new, won: true, displaced: current.map(Box::new) })
            }
        }
    }

    fn apply_register(
        &mut self,
        buckets: &mut Buckets,
        register: &str,
        key: &[u8],
        new: RegisterValue,
    ) -> Result<Effect, StoreError> {
        let old = self.registers.get((register, key))?.map(|g| g.value().to_vec());
        let mut replaced_other_origin = false;
        if let Some(bytes) = &old {
            let current: RegisterValue = decode(bytes, "register")?;
            if !new.wins_over(&current) {
                return Ok(Effect::Register { won: false, replaced_other_origin: false });
            }
            replaced_other_origin = current.origin != new.origin;
        }
        let id = identity_hash(EntryKind::Register, register, key);
        let bytes = encode(&new);
        self.replace(buckets, &id, old.as_deref(), &bytes);
        self.registers.insert((register, key), bytes.as_slice())?;
        Ok(Effect::Register { won: true, replaced_other_origin })
    }

    fn replace(&mut self, buckets: &mut Buckets, id: &[u8; 32], old: Option<&[u8]>, new: &[u8]) {
        if let Some(old) = old {
            buckets.toggle(id, &entry_hash(id, old));
        }
        let b = buckets.toggle(id, &entry_hash(id, new));
        self.dirty.insert(b);
    }
}

pub(crate) fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
    postcard::to_stdvec(value).expect("state values always encode")
}

pub(crate) fn decode<'a, T: serde::Deserialize<'a>>(bytes: &'a [u8], what: &str) -> Result<T, StoreError> {
    postcard::from_bytes(bytes).map_err(|e| StoreError::Corrupt(format!("stored {what} does not decode: {e}")))
}
