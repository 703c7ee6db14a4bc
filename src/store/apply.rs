//! Applying one op to the state tables inside a write transaction, keeping the bucket hashes in step.

use redb::{ReadableTable, Table, WriteTransaction};

use super::buckets::BucketChanges;
use super::encoding::{decode, decode_canonical, encode, encode_register};
use super::memtable::PendingRow;
use super::root::{identity_hash, root_hash, Buckets, EntryKind};
use super::tables::*;
use super::{SnapshotError, StoreError};
use crate::crdt::{Hlc, LeaseState, PnCounter, RegisterValue};
use crate::ids::Seq;
use crate::op::{Op, OpBody};
use crate::snapshot::{Kind, StateEntry};

type StateTable<'t> = Table<'t, (&'static str, &'static [u8]), &'static [u8]>;
type LogTable<'t> = Table<'t, (&'static [u8], u64), &'static [u8]>;
pub(crate) type TombstoneTable<'t> = Table<'t, (u64, u32, &'static str, &'static [u8]), ()>;

/// What applying an op did to the state.
// Short-lived (returned once per op and consumed at once): boxing the lease would only add an
// allocation per lease write.
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

/// Where applying an op reads and writes: a write transaction's tables ([`Tables`]), or the
/// memtable in front of them (see `memtable.rs`). The CRDT rules live once, in [`apply_op`].
pub(crate) trait StateSink {
    fn get(&mut self, kind: Kind, collection: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    fn put(&mut self, kind: Kind, collection: &str, key: &[u8], value: &[u8]) -> Result<(), StoreError>;
    /// Stores `value` and returns the value it replaced.
    fn swap(&mut self, kind: Kind, collection: &str, key: &[u8], value: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    /// Keeps the tombstone index in step when `new` replaces `old` as a register key's value.
    fn index_tombstone(
        &mut self,
        register: &str,
        key: &[u8],
        old: Option<&RegisterValue>,
        new: &RegisterValue,
    ) -> Result<(), StoreError>;
    /// Writes one signed batch of `origin` as one log row, with its head's signature.
    fn log_batch(&mut self, origin: &[u8], last: Seq, row: PendingRow) -> Result<(), StoreError>;
    /// The buckets this sink's writes changed.
    fn changes(&mut self) -> &mut BucketChanges;
}

/// The part of applying an op that depends on the op alone: its entry's identity hash and, for a
/// register write, the register's encoded value and that value's hash in the state root. Peers'
/// ops are prepared by whoever queues them to the writer ([`super::WriteHandle::submit_remote`]),
/// on another core, so the single writer thread is spared two of its three hashes per op (a
/// fifth of its time in a replay, W1 of `scripts/bench.sh`).
pub(crate) struct Prepared {
    id: [u8; 32],
    register: Option<PreparedRegister>,
}

/// A register write's value, encoded, and its hash in the root (none for a tombstone).
struct PreparedRegister {
    value: RegisterValue,
    bytes: Vec<u8>,
    hash: Option<[u8; 32]>,
}

impl Prepared {
    pub fn of(op: &Op, origin_bytes: &[u8]) -> Prepared {
        let (kind, collection, key) = match &op.body {
            OpBody::RegisterPut { register, key, .. } | OpBody::RegisterDelete { register, key } => {
                (EntryKind::Register, register, key)
            }
            OpBody::CounterAdd { counter, key, .. } => (EntryKind::Counter, counter, key),
            OpBody::LeaseSet { lease, key, .. } => (EntryKind::Lease, lease, key),
        };
        let id = identity_hash(kind, collection, key);
        let register = register_value(op).map(|value| {
            let bytes = encode_register(&value, origin_bytes);
            let hash = root_hash(EntryKind::Register, &id, &bytes);
            PreparedRegister { value, bytes, hash }
        });
        Prepared { id, register }
    }
}

/// The value a register write of `op` stores, if it is one.
fn register_value(op: &Op) -> Option<RegisterValue> {
    let value = match &op.body {
        OpBody::RegisterPut { value, .. } => Some(value.clone()),
        OpBody::RegisterDelete { .. } => None,
        _ => return None,
    };
    Some(RegisterValue { hlc: op.hlc, origin: op.origin, value })
}

/// Applies the state change of `op` (not its log entry) and updates `buckets`. `origin_bytes` are
/// the bytes of `op.origin`; `prepared`, if given, must be `Prepared::of` this op.
pub(crate) fn apply_op<S: StateSink>(
    sink: &mut S,
    buckets: &mut Buckets,
    op: &Op,
    origin_bytes: &[u8],
    prepared: Option<Prepared>,
) -> Result<Effect, StoreError> {
    let prepared = prepared.unwrap_or_else(|| Prepared::of(op, origin_bytes));
    let id = prepared.id;
    match &op.body {
        OpBody::RegisterPut { register, key, .. } | OpBody::RegisterDelete { register, key } => {
            let new = prepared.register.expect("a register write's preparation holds its value");
            apply_register(sink, buckets, register, key, &id, new)
        }
        OpBody::CounterAdd { counter, key, delta } => {
            let old = sink.get(Kind::Counter, counter, key)?;
            let mut value: PnCounter = match &old {
                Some(bytes) => decode(bytes, "counter")?,
                None => PnCounter::default(),
            };
            value.add(op.origin, *delta);
            let new = encode(&value);
            sink.changes().replace(buckets, EntryKind::Counter, &id, old.as_deref(), &new);
            sink.put(Kind::Counter, counter, key, &new)?;
            Ok(Effect::Counter { value: value.value() })
        }
        OpBody::LeaseSet { lease, key, holder, token, expires_at_ms } => {
            let new = LeaseState {
                holder: holder.clone(),
                token: *token,
                expires_at_ms: *expires_at_ms,
                hlc: op.hlc,
                origin: op.origin,
            };
            let old = sink.get(Kind::Lease, lease, key)?;
            let current = old.as_deref().map(|b| decode::<LeaseState>(b, "lease")).transpose()?;
            if let Some(current) = &current {
                if !new.wins_over(current) {
                    return Ok(Effect::Lease { state: current.clone(), won: false, displaced: None });
                }
            }
            let bytes = encode(&new);
            sink.changes().replace(buckets, EntryKind::Lease, &id, old.as_deref(), &bytes);
            sink.put(Kind::Lease, lease, key, &bytes)?;
            Ok(Effect::Lease { state: new, won: true, displaced: current.map(Box::new) })
        }
    }
}

/// Applies a register write of the value `new` to the entry `id`.
fn apply_register<S: StateSink>(
    sink: &mut S,
    buckets: &mut Buckets,
    register: &str,
    key: &[u8],
    id: &[u8; 32],
    new: PreparedRegister,
) -> Result<Effect, StoreError> {
    let PreparedRegister { value: new, bytes, hash } = new;
    // Store first and look at what it replaced: one B-tree walk for the usual case (a new key or a
    // newer write); a write that loses puts the winner back.
    let old = sink.swap(Kind::Register, register, key, &bytes)?;
    let mut replaced_other_origin = false;
    let mut current = None;
    if let Some(old_bytes) = &old {
        let value: RegisterValue = decode(old_bytes, "register")?;
        if !new.wins_over(&value) {
            sink.put(Kind::Register, register, key, old_bytes)?;
            return Ok(Effect::Register { won: false, replaced_other_origin: false });
        }
        replaced_other_origin = value.origin != new.origin;
        current = Some(value);
    }
    sink.index_tombstone(register, key, current.as_ref(), &new)?;
    let old_hash = old.as_deref().and_then(|o| root_hash(EntryKind::Register, id, o));
    sink.changes().replace_hashed(buckets, id, old_hash, hash);
    Ok(Effect::Register { won: true, replaced_other_origin })
}

/// Keeps the tombstone index in step when `new` replaces `old` as a register key's value.
pub(crate) fn reindex_tombstone(
    index: &mut TombstoneTable,
    register: &str,
    key: &[u8],
    old: Option<&RegisterValue>,
    new: &RegisterValue,
) -> Result<(), StoreError> {
    if let Some(old) = old.filter(|o| o.is_tombstone()) {
        index.remove(tombstone_key(old.hlc, register, key))?;
    }
    if new.is_tombstone() {
        index.insert(tombstone_key(new.hlc, register, key), ())?;
    }
    Ok(())
}

/// The tables one group commit writes, opened once per transaction.
pub(crate) struct Tables<'t> {
    pub oplog: LogTable<'t>,
    pub heads: LogTable<'t>,
    pub log_counts: Table<'t, &'static [u8], u64>,
    registers: StateTable<'t>,
    counters: StateTable<'t>,
    leases: StateTable<'t>,
    tombstones: TombstoneTable<'t>,
    /// Buckets touched in this transaction, to persist at commit.
    pub changes: BucketChanges,
}

impl StateSink for Tables<'_> {
    fn get(&mut self, kind: Kind, collection: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.table(kind).get((collection, key))?.map(|g| g.value().to_vec()))
    }

    fn put(&mut self, kind: Kind, collection: &str, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.table(kind).insert((collection, key), value)?;
        Ok(())
    }

    fn swap(&mut self, kind: Kind, collection: &str, key: &[u8], value: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.table(kind).insert((collection, key), value)?.map(|g| g.value().to_vec()))
    }

    fn index_tombstone(
        &mut self,
        register: &str,
        key: &[u8],
        old: Option<&RegisterValue>,
        new: &RegisterValue,
    ) -> Result<(), StoreError> {
        reindex_tombstone(&mut self.tombstones, register, key, old, new)
    }

    fn log_batch(&mut self, origin: &[u8], last: Seq, row: PendingRow) -> Result<(), StoreError> {
        self.oplog.insert((origin, last.0), row.row.as_slice())?;
        self.heads.insert((origin, last.0), row.signature.as_slice())?;
        super::log::count_ops(&mut self.log_counts, origin, row.ops as i64)
    }

    fn changes(&mut self) -> &mut BucketChanges {
        &mut self.changes
    }
}

impl<'t> Tables<'t> {
    pub fn open(txn: &'t WriteTransaction) -> Result<Self, StoreError> {
        Ok(Tables {
            oplog: txn.open_table(OPLOG)?,
            heads: txn.open_table(HEADS)?,
            log_counts: txn.open_table(LOG_COUNTS)?,
            registers: txn.open_table(REGISTERS)?,
            counters: txn.open_table(COUNTERS)?,
            leases: txn.open_table(LEASES)?,
            tombstones: txn.open_table(TOMBSTONES)?,
            changes: BucketChanges::default(),
        })
    }

    fn table(&mut self, kind: Kind) -> &mut StateTable<'t> {
        match kind {
            Kind::Register => &mut self.registers,
            Kind::Counter => &mut self.counters,
            Kind::Lease => &mut self.leases,
        }
    }

    /// Merges a state entry (from a snapshot or a repair) into the state with its kind's CRDT merge.
    /// An entry whose value does not decode canonically is refused as entry `index`.
    ///
    /// A register entry stamped at or before `collected` (the tombstones this node collected) for a
    /// key this node does not hold is dropped: this node has applied every write that old, so the
    /// key's absence means a delete that was collected, and the entry is a stale copy of what it
    /// deleted (from a node that was away; see `Store::collect_tombstones`).
    pub fn merge_entry(
        &mut self,
        buckets: &mut Buckets,
        index: u64,
        entry: &StateEntry,
        collected: Hlc,
    ) -> Result<MergeEffect, StoreError> {
        let refuse = |reason: String| StoreError::from(SnapshotError::Entry { index, reason });
        let table = self.table(entry.kind);
        let old = table.get((entry.collection.as_str(), entry.key.as_slice()))?.map(|g| g.value().to_vec());
        let mut reindex = None;
        let (new, hlc, lease) = match entry.kind {
            Kind::Register => {
                let (incoming, current) = decode_pair::<RegisterValue>(&entry.value, old.as_deref(), "register")
                    .map_err(|e| e.map_refused(refuse))?;
                let hlc = incoming.hlc;
                if current.is_none() && hlc <= collected {
                    return Ok(MergeEffect { changed: false, hlc: None, lease: None });
                }
                let merged = match &current {
                    Some(c) => c.clone().merge(incoming),
                    None => incoming,
                };
                let bytes = encode(&merged);
                reindex = Some((current, merged));
                (bytes, Some(hlc), None)
            }
            Kind::Counter => {
                let (incoming, current) = decode_pair::<PnCounter>(&entry.value, old.as_deref(), "counter")
                    .map_err(|e| e.map_refused(refuse))?;
                (encode(&current.unwrap_or_default().merge(&incoming)), None, None)
            }
            Kind::Lease => {
                let (incoming, current) = decode_pair::<LeaseState>(&entry.value, old.as_deref(), "lease")
                    .map_err(|e| e.map_refused(refuse))?;
                let hlc = incoming.hlc;
                let merged = current.map_or(incoming.clone(), |c| c.merge(incoming));
                (encode(&merged), Some(hlc), Some(merged))
            }
        };
        if old.as_deref() == Some(new.as_slice()) {
            return Ok(MergeEffect { changed: false, hlc, lease: None });
        }
        self.table(entry.kind).insert((entry.collection.as_str(), entry.key.as_slice()), new.as_slice())?;
        if let Some((current, merged)) = reindex {
            self.index_tombstone(&entry.collection, &entry.key, current.as_ref(), &merged)?;
        }
        let kind = entry_kind(entry.kind);
        let id = identity_hash(kind, &entry.collection, &entry.key);
        self.changes.replace(buckets, kind, &id, old.as_deref(), &new);
        Ok(MergeEffect { changed: true, hlc, lease })
    }

    /// After a snapshot was merged into a non-empty state: drops each local register entry the
    /// snapshot does not hold (`staged` is its register table) when the snapshot covers the
    /// entry's origin as far as this node did before (`covered`). Every write of that origin this
    /// node holds was then seen where the snapshot was made, so the entry is missing there only
    /// because it was deleted and its tombstone collected: kept here, it would bring the key back.
    /// Returns how many entries went.
    pub fn drop_collected_registers(
        &mut self,
        buckets: &mut Buckets,
        staged: &impl ReadableTable<(&'static str, &'static [u8]), &'static [u8]>,
        covered: impl Fn(&crate::ids::Origin) -> bool,
    ) -> Result<u64, StoreError> {
        let mut gone = Vec::new();
        for row in self.registers.iter()? {
            let (k, v) = row?;
            let (register, key) = k.value();
            if staged.get((register, key))?.is_some() {
                continue;
            }
            let Ok(value) = postcard::from_bytes::<RegisterValue>(v.value()) else { continue };
            if covered(&value.origin) {
                gone.push((register.to_owned(), key.to_vec(), v.value().to_vec(), value));
            }
        }
        for (register, key, bytes, value) in &gone {
            self.registers.remove((register.as_str(), key.as_slice()))?;
            if value.is_tombstone() {
                self.tombstones.remove(tombstone_key(value.hlc, register, key))?;
            }
            let id = identity_hash(EntryKind::Register, register, key);
            if let Some(h) = super::root::root_hash(EntryKind::Register, &id, bytes) {
                self.changes.dirty.insert(buckets.toggle(&id, &h));
            }
        }
        Ok(gone.len() as u64)
    }
}

/// What merging one state entry did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MergeEffect {
    /// Whether the stored value changed.
    pub changed: bool,
    /// The incoming value's stamp (registers and leases), for the local clock to observe.
    pub hlc: Option<Hlc>,
    /// The lease state after the merge, when a lease changed.
    pub lease: Option<LeaseState>,
}

/// The snapshot format's kind of an entry as the state root names it.
pub(crate) fn entry_kind(kind: Kind) -> EntryKind {
    match kind {
        Kind::Register => EntryKind::Register,
        Kind::Counter => EntryKind::Counter,
        Kind::Lease => EntryKind::Lease,
    }
}

/// Decoding an incoming value failed (the sender's fault) or the stored one did (this store's).
enum PairError {
    Refused(String),
    Store(StoreError),
}

impl PairError {
    fn map_refused(self, refuse: impl FnOnce(String) -> StoreError) -> StoreError {
        match self {
            PairError::Refused(reason) => refuse(reason),
            PairError::Store(e) => e,
        }
    }
}

/// Decodes an incoming value, which must be in canonical encoding (one value, one entry hash), and
/// the stored one if any.
fn decode_pair<T: serde::Serialize + serde::de::DeserializeOwned>(
    incoming: &[u8],
    stored: Option<&[u8]>,
    what: &str,
) -> Result<(T, Option<T>), PairError> {
    let value: T = decode_canonical(incoming, what).map_err(PairError::Refused)?;
    let current = stored.map(|b| decode::<T>(b, what)).transpose().map_err(PairError::Store)?;
    Ok((value, current))
}
