//! Reads of the state and the op log. Each read is one redb read transaction: a consistent view
//! that never blocks the writer.

use redb::{ReadableDatabase, ReadableTable};

use std::collections::{BTreeMap, BTreeSet};

use super::apply::entry_kind;
use super::encoding::decode;
use super::log::decode_row;
use super::root::{bucket_of, identity_hash};
use super::tables::*;
use super::{decode_progress, origin_from_bytes, Store, StoreError};
use crate::crdt::{LeaseState, PnCounter, RegisterValue};
use serde_bytes::ByteBuf;

use crate::ids::{Origin, Seq};
use crate::op::{ChainHash, OpBatch, SignedHead};
use crate::snapshot::{Kind, StateEntry};

/// A key and its stored value.
type KeyValue = (Vec<u8>, Vec<u8>);

/// One page of a register listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListPage {
    /// Live entries (tombstones are skipped), in key order.
    pub entries: Vec<(Vec<u8>, Vec<u8>)>,
    /// The key to pass as `after` for the next page; `None` on the last page.
    pub next_after: Option<Vec<u8>>,
}

/// The result of checking the op log against the version vector.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogReport {
    pub origins: usize,
    pub ops: u64,
    /// Every inconsistency found; empty when the log is sound.
    pub problems: Vec<String>,
}

impl Store {
    pub fn register(&self, register: &str, key: &[u8]) -> Result<Option<RegisterValue>, StoreError> {
        self.state_value(Kind::Register, register, key)?.map(|v| decode(&v, "register")).transpose()
    }

    /// Live entries of `register` whose key starts with `prefix`, strictly after `after`, at most
    /// `limit` of them.
    pub fn list_register(
        &self,
        register: &str,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<ListPage, StoreError> {
        let start: &[u8] = match after {
            Some(a) if a >= prefix => a,
            _ => prefix,
        };
        let in_range = |k: &(String, Vec<u8>)| k.0 == register && k.1.starts_with(prefix);
        // The memtable's entries in range, up to the one that makes `limit + 1` live ones: the page
        // ends before any key past it.
        let (txn, pending) = self.overlay(|m| {
            let (mut out, mut live) = (Vec::new(), 0);
            let from = (register.to_owned(), start.to_vec());
            for (k, v) in m.state[Kind::Register as usize].range(from..).take_while(|(k, _)| in_range(k)) {
                if after == Some(k.1.as_slice()) {
                    continue;
                }
                out.push((k.1.clone(), v.clone()));
                live += !super::root::register_is_tombstone(v) as usize;
                if live > limit {
                    break;
                }
            }
            out
        })?;
        let mut pending = pending.unwrap_or_default().into_iter().peekable();
        let table = txn.open_table(REGISTERS)?;
        let mut rows = table.range((register, start)..)?;
        let mut next_row = || -> Result<Option<KeyValue>, StoreError> {
            let Some(row) = rows.next() else { return Ok(None) };
            let (k, v) = row?;
            let (reg, key) = k.value();
            Ok((reg == register && key.starts_with(prefix)).then(|| (key.to_vec(), v.value().to_vec())))
        };
        let mut row = next_row()?;
        let mut entries = Vec::new();
        let mut next_after = None;
        loop {
            // Merge by key; the memtable's value of a key is the newer.
            let (key, value) = match (pending.peek(), &row) {
                (None, None) => break,
                (Some((pk, _)), Some((rk, _))) if pk <= rk => {
                    if pk == rk {
                        row = next_row()?;
                    }
                    pending.next().expect("peeked")
                }
                (Some(_), None) => pending.next().expect("peeked"),
                (_, Some(_)) => {
                    let r = row.take().expect("matched");
                    row = next_row()?;
                    r
                }
            };
            if after == Some(key.as_slice()) {
                continue;
            }
            let value: RegisterValue = decode(&value, "register")?;
            let Some(bytes) = value.value else { continue };
            if entries.len() == limit {
                next_after = entries.last().map(|(k, _): &(Vec<u8>, Vec<u8>)| k.clone());
                break;
            }
            entries.push((key, bytes));
        }
        Ok(ListPage { entries, next_after })
    }

    pub fn counter(&self, counter: &str, key: &[u8]) -> Result<i64, StoreError> {
        let value = self.state_value(Kind::Counter, counter, key)?;
        Ok(value.map(|v| decode::<PnCounter>(&v, "counter")).transpose()?.map_or(0, |c| c.value()))
    }

    pub fn lease(&self, lease: &str, key: &[u8]) -> Result<Option<LeaseState>, StoreError> {
        self.state_value(Kind::Lease, lease, key)?.map(|v| decode(&v, "lease")).transpose()
    }

    /// Number of ops held in the log, over all origins.
    pub fn log_len(&self) -> Result<u64, StoreError> {
        let (txn, pending) = self.overlay(|m| m.log.values().map(|r| r.ops).sum::<u64>())?;
        let mut held = pending.unwrap_or(0);
        for row in txn.open_table(LOG_COUNTS)?.iter()? {
            held += row?.1.value();
        }
        Ok(held)
    }

    /// Checks that, for every origin, the log holds exactly seqs `floor+1 ..= vv[origin]`, that each
    /// op decodes and belongs there, that the hash chain links every op, and that the version vector's
    /// chain hash is the one after its last op. A sound store after any crash passes.
    pub fn check_log(&self) -> Result<LogReport, StoreError> {
        let (txn, pending) = self.overlay(|m| m.log.clone())?;
        let pending = pending.unwrap_or_default();
        let oplog = txn.open_table(OPLOG)?;
        let heads = txn.open_table(HEADS)?;
        let counts = txn.open_table(LOG_COUNTS)?;
        let floors = txn.open_table(LOG_FLOORS)?;
        let mut report = LogReport::default();
        // Each origin's progress as the table holds it, moved on by the memtable's rows.
        let mut progress = BTreeMap::new();
        for row in txn.open_table(VERSION_VECTOR)?.iter()? {
            let (k, v) = row?;
            progress.insert(k.value().to_vec(), decode_progress(v.value())?);
        }
        for ((origin, last), row) in &pending {
            let chain = decode_row(*last, &row.row)?.last().expect("rows are never empty").chain;
            progress.insert(origin.clone(), super::OriginProgress { seq: Seq(*last), chain });
        }
        for (origin_bytes, progress) in &progress {
            let origin = origin_from_bytes(origin_bytes)?;
            report.origins += 1;
            let floor = floors.get(origin_bytes.as_slice())?.map_or(0, |f| f.value());
            let mut check = ChainCheck {
                origin,
                expected: Seq(floor + 1),
                chain: (floor == 0).then_some(ChainHash::GENESIS),
                held: 0,
            };
            let mut stopped = false;
            for row in oplog.range((origin_bytes.as_slice(), 0u64)..=(origin_bytes.as_slice(), u64::MAX))? {
                let (k, v) = row?;
                let last = k.value().1;
                let signed = heads.get((origin_bytes.as_slice(), last))?.is_some();
                if !check.row(last, v.value(), signed, &mut report) {
                    stopped = true;
                    break;
                }
            }
            let from = (origin_bytes.clone(), 0);
            let to = (origin_bytes.clone(), u64::MAX);
            for ((_, last), row) in pending.range(from..=to).take_while(|_| !stopped) {
                if !check.row(*last, &row.row, true, &mut report) {
                    break;
                }
            }
            let pending_ops: u64 = pending
                .range((origin_bytes.clone(), 0)..)
                .take_while(|((o, _), _)| o == origin_bytes)
                .map(|(_, r)| r.ops)
                .sum();
            let counted = counts.get(origin_bytes.as_slice())?.map_or(0, |c| c.value()) + pending_ops;
            if counted != check.held {
                report.problems.push(format!("{origin}: the log's op count is not the {} ops it holds", check.held));
            }
            let last = Seq(check.expected.0 - 1);
            if last != progress.seq {
                report
                    .problems
                    .push(format!("{origin}: version vector says {} but the log ends at {last}", progress.seq));
            } else if check.chain.is_some_and(|c| c != progress.chain) && last.0 > floor {
                report.problems.push(format!("{origin}: version vector chain hash differs from the log's"));
            }
        }
        // Ops of an origin the version vector does not know would be invisible to sync.
        for row in oplog.iter()? {
            let (k, _) = row?;
            let (origin, seq) = k.value();
            if !progress.contains_key(origin) {
                report.problems.push(format!("log holds seq {seq} of an origin missing from the version vector"));
                break;
            }
        }
        Ok(report)
    }
}

/// Walks one origin's log rows in order for [`Store::check_log`].
struct ChainCheck {
    origin: Origin,
    /// The seq the next op must have.
    expected: Seq,
    /// The chain hash after the last op checked (`None` below a floor: not known).
    chain: Option<ChainHash>,
    held: u64,
}

impl ChainCheck {
    /// Checks the row ending at `last`; false when it does not parse (the walk stops).
    fn row(&mut self, last: u64, bytes: &[u8], signed: bool, report: &mut LogReport) -> bool {
        let origin = self.origin;
        let ops = match decode_row(last, bytes) {
            Ok(ops) => ops,
            Err(e) => {
                report.problems.push(format!("{origin}: {e}"));
                return false;
            }
        };
        if !signed {
            report.problems.push(format!("{origin}: log row ending at seq {last} has no signed head"));
        }
        for logged in ops {
            let seq = logged.seq;
            report.ops += 1;
            self.held += 1;
            if seq != self.expected {
                report.problems.push(format!("{origin}: log holds seq {seq} where {} was expected", self.expected));
                self.expected = seq;
            }
            match crate::op::Op::decode(logged.bytes) {
                Ok(op) if op.origin == origin && op.seq == seq => {}
                Ok(_) => report.problems.push(format!("{origin}: log entry {seq} holds another op")),
                Err(e) => report.problems.push(format!("{origin}: log entry {seq}: {e}")),
            }
            if let Some(prev) = self.chain {
                if prev.extend(blake3::hash(logged.bytes).as_bytes()) != logged.chain {
                    report.problems.push(format!("{origin}: chain broken at seq {seq}"));
                }
            }
            self.chain = Some(logged.chain);
            self.expected = self.expected.next();
        }
        true
    }
}

impl Store {
    /// The chain hash of `origin` after `seq`: genesis for 0, `None` when that op is not held (not
    /// applied yet, or compacted away).
    pub fn chain_at(&self, origin: &Origin, seq: Seq) -> Result<Option<ChainHash>, StoreError> {
        if seq == Seq::ZERO {
            return Ok(Some(ChainHash::GENESIS));
        }
        if let Some(p) = self.mirror.read().expect("mirror lock").mirror.progress.get(origin) {
            if p.seq == seq {
                return Ok(Some(p.chain));
            }
        }
        let ob = origin.to_bytes();
        // The memtable first: a row missing from it was flushed before the transaction below began.
        {
            let memtable = self.memtable.read().expect("memtable lock");
            let mut rows = memtable.log.range((ob.clone(), seq.0)..=(ob.clone(), u64::MAX));
            if let Some(((_, last), row)) = rows.next() {
                if let Some(op) = decode_row(*last, &row.row)?.iter().find(|o| o.seq == seq) {
                    return Ok(Some(op.chain));
                }
            }
        }
        let txn = self.db().begin_read()?;
        let oplog = txn.open_table(OPLOG)?;
        // The row holding `seq` is the first that ends at or after it.
        let Some(row) = oplog.range((ob.as_slice(), seq.0)..=(ob.as_slice(), u64::MAX))?.next() else {
            return Ok(None);
        };
        let (k, v) = row?;
        let ops = decode_row(k.value().1, v.value())?;
        Ok(ops.iter().find(|o| o.seq == seq).map(|o| o.chain))
    }

    /// Signed batches of `origin`'s ops after `after`, in order, each ending at a signed head, until
    /// `max_ops` or `max_bytes` is reached (at least one batch when any is held). A relay serves
    /// these unchanged: the receiver verifies them against the origin's signature. Empty both when
    /// nothing newer is held and when `after` is below the log floor: [`Store::read_log`] tells which.
    pub fn read_batches(
        &self,
        origin: &Origin,
        after: Seq,
        max_ops: usize,
        max_bytes: usize,
    ) -> Result<Vec<OpBatch>, StoreError> {
        Ok(self.read_log(origin, after, max_ops, max_bytes)?.batches)
    }

    /// Like [`Store::read_batches`], with the log floor read in the same transaction, so a caller
    /// knows whether an empty answer means "up to date" or "compacted away: use a snapshot".
    pub fn read_log(
        &self,
        origin: &Origin,
        after: Seq,
        max_ops: usize,
        max_bytes: usize,
    ) -> Result<LogRead, StoreError> {
        let origin_bytes = origin.to_bytes();
        let (txn, pending) = self.overlay(|m| m.rows_after(&origin_bytes, after.0))?;
        let floor = Seq(txn.open_table(LOG_FLOORS)?.get(origin_bytes.as_slice())?.map_or(0, |f| f.value()));
        if after < floor {
            return Ok(LogRead { batches: Vec::new(), floor, below_floor: true });
        }
        let oplog = txn.open_table(OPLOG)?;
        let heads = txn.open_table(HEADS)?;
        let mut serve =
            Serve { origin: *origin, start: after, ops: 0, bytes: 0, batches: Vec::new(), max_ops, max_bytes };
        // Rows end at signed heads; the first may begin before `after` (served from partway in).
        let mut more = true;
        for row in
            oplog.range((origin_bytes.as_slice(), after.0.saturating_add(1))..=(origin_bytes.as_slice(), u64::MAX))?
        {
            let (k, v) = row?;
            let end = k.value().1;
            let Some(signature) = heads.get((origin_bytes.as_slice(), end))? else {
                return Err(StoreError::Corrupt(format!("log row of {origin} ending at {end} has no signed head")));
            };
            more = serve.row(end, v.value(), signature.value())?;
            if !more {
                break;
            }
        }
        // The memtable's rows come after every row in the transaction.
        for (end, row) in pending.unwrap_or_default() {
            if !more {
                break;
            }
            more = serve.row(end, &row.row, &row.signature)?;
        }
        let batches = serve.batches;
        Ok(LogRead { batches, floor, below_floor: false })
    }

    /// The highest seq of `origin` compacted out of the log (0 when none).
    pub fn log_floor(&self, origin: &Origin) -> Result<Seq, StoreError> {
        let txn = self.db().begin_read()?;
        let floor = txn.open_table(LOG_FLOORS)?.get(origin.to_bytes().as_slice())?.map_or(0, |f| f.value());
        Ok(Seq(floor))
    }

    /// Every origin's log floor that is above 0.
    pub fn log_floors(&self) -> Result<BTreeMap<Origin, Seq>, StoreError> {
        let txn = self.db().begin_read()?;
        let mut floors = BTreeMap::new();
        for row in txn.open_table(LOG_FLOORS)?.iter()? {
            let (k, v) = row?;
            if v.value() > 0 {
                floors.insert(origin_from_bytes(k.value())?, Seq(v.value()));
            }
        }
        Ok(floors)
    }

    /// The state-root bucket hashes as of the last commit, to compare with a peer's.
    pub fn bucket_hashes(&self) -> Vec<[u8; 32]> {
        self.mirror.read().expect("mirror lock").mirror.buckets.0.clone()
    }

    /// Every state entry (tombstones included) in the given buckets, to send to a peer whose buckets
    /// differ. A full scan of the state, in one read transaction.
    pub fn entries_in_buckets(&self, buckets: &[u32]) -> Result<Vec<StateEntry>, StoreError> {
        let wanted: BTreeSet<usize> = buckets.iter().map(|b| *b as usize).collect();
        let in_wanted = |kind: Kind, collection: &str, key: &[u8]| {
            wanted.contains(&bucket_of(&identity_hash(entry_kind(kind), collection, key)))
        };
        let (txn, pending) = self.overlay(|m| {
            let mut held = BTreeSet::new();
            let mut entries = Vec::new();
            for (kind, _, _) in STATE_TABLES {
                for ((collection, key), value) in &m.state[kind as usize] {
                    held.insert((kind as usize, collection.clone(), key.clone()));
                    if in_wanted(kind, collection, key) {
                        let (collection, key, value) = (collection.clone(), key.clone(), value.clone());
                        entries.push(StateEntry { kind, collection, key, value });
                    }
                }
            }
            (held, entries)
        })?;
        // The memtable's entries replace the table's.
        let (held, mut out) = pending.unwrap_or_default();
        for (kind, def, _) in STATE_TABLES {
            for row in txn.open_table(def)?.iter()? {
                let (k, v) = row?;
                let (collection, key) = k.value();
                let replaced = || held.contains(&(kind as usize, collection.to_owned(), key.to_vec()));
                if in_wanted(kind, collection, key) && (held.is_empty() || !replaced()) {
                    out.push(StateEntry {
                        kind,
                        collection: collection.to_owned(),
                        key: key.to_vec(),
                        value: v.value().to_vec(),
                    });
                }
            }
        }
        Ok(out)
    }
}

/// Batches read for [`Store::read_log`], row by row, until a limit is reached.
struct Serve {
    origin: Origin,
    /// The last seq served so far.
    start: Seq,
    ops: usize,
    bytes: usize,
    batches: Vec<OpBatch>,
    max_ops: usize,
    max_bytes: usize,
}

impl Serve {
    /// Adds the ops of the row ending at `end` after `start`; false when no more are wanted.
    fn row(&mut self, end: u64, row: &[u8], signature: &[u8]) -> Result<bool, StoreError> {
        let logged = decode_row(end, row)?;
        if logged[0].seq > self.start.next() {
            // Part of the range was compacted away: the caller must use a snapshot.
            return Ok(false);
        }
        let ops: Vec<ByteBuf> =
            logged.iter().filter(|o| o.seq > self.start).map(|o| ByteBuf::from(o.bytes.to_vec())).collect();
        self.bytes += ops.iter().map(|o| o.len()).sum::<usize>();
        self.ops += ops.len();
        let head = SignedHead {
            origin: self.origin,
            seq: Seq(end),
            head: logged.last().expect("rows are never empty").chain,
            signature: signature.to_vec(),
        };
        self.batches.push(OpBatch { after: self.start, ops, head });
        self.start = Seq(end);
        Ok(self.ops < self.max_ops && self.bytes < self.max_bytes)
    }
}

/// Batches read from an origin's log, with the floor they were read against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRead {
    pub batches: Vec<OpBatch>,
    /// The origin's log floor: ops at or below it are compacted away.
    pub floor: Seq,
    /// True when the request started below the floor: the ops are gone, replay cannot serve it and
    /// the caller needs a snapshot.
    pub below_floor: bool,
}
