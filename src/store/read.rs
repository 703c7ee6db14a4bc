//! Reads of the state and the op log. Each read is one redb read transaction: a consistent view
//! that never blocks the writer.

use redb::{ReadableDatabase, ReadableTable};

use std::collections::{BTreeMap, BTreeSet};

use super::apply::{decode, entry_kind};
use super::log::decode_row;
use super::root::{bucket_of, identity_hash};
use super::tables::*;
use super::{decode_progress, origin_from_bytes, Store, StoreError};
use crate::crdt::{LeaseState, PnCounter, RegisterValue};
use serde_bytes::ByteBuf;

use crate::ids::{Origin, Seq};
use crate::op::{ChainHash, OpBatch, SignedHead};
use crate::snapshot::StateEntry;

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
        let txn = self.db().begin_read()?;
        let table = txn.open_table(REGISTERS)?;
        let value = table.get((register, key))?;
        value.map(|v| decode(v.value(), "register")).transpose()
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
        let txn = self.db().begin_read()?;
        let table = txn.open_table(REGISTERS)?;
        let start: &[u8] = match after {
            Some(a) if a >= prefix => a,
            _ => prefix,
        };
        let mut entries = Vec::new();
        let mut next_after = None;
        for row in table.range((register, start)..)? {
            let (k, v) = row?;
            let (reg, key) = k.value();
            if reg != register || !key.starts_with(prefix) {
                break;
            }
            if after == Some(key) {
                continue;
            }
            let value: RegisterValue = decode(v.value(), "register")?;
            let Some(bytes) = value.value else { continue };
            if entries.len() == limit {
                next_after = entries.last().map(|(k, _): &(Vec<u8>, Vec<u8>)| k.clone());
                break;
            }
            entries.push((key.to_vec(), bytes));
        }
        Ok(ListPage { entries, next_after })
    }

    pub fn counter(&self, counter: &str, key: &[u8]) -> Result<i64, StoreError> {
        let txn = self.db().begin_read()?;
        let table = txn.open_table(COUNTERS)?;
        let value = table.get((counter, key))?;
        Ok(value.map(|v| decode::<PnCounter>(v.value(), "counter")).transpose()?.map_or(0, |c| c.value()))
    }

    pub fn lease(&self, lease: &str, key: &[u8]) -> Result<Option<LeaseState>, StoreError> {
        let txn = self.db().begin_read()?;
        let table = txn.open_table(LEASES)?;
        let value = table.get((lease, key))?;
        value.map(|v| decode(v.value(), "lease")).transpose()
    }

    /// Number of ops held in the log, over all origins.
    pub fn log_len(&self) -> Result<u64, StoreError> {
        let txn = self.db().begin_read()?;
        let mut held = 0;
        for row in txn.open_table(LOG_COUNTS)?.iter()? {
            held += row?.1.value();
        }
        Ok(held)
    }

    /// Checks that, for every origin, the log holds exactly seqs `floor+1 ..= vv[origin]`, that each
    /// op decodes and belongs there, that the hash chain links every op, and that the version vector's
    /// chain hash is the one after its last op. A sound store after any crash passes.
    pub fn check_log(&self) -> Result<LogReport, StoreError> {
        let txn = self.db().begin_read()?;
        let oplog = txn.open_table(OPLOG)?;
        let heads = txn.open_table(HEADS)?;
        let counts = txn.open_table(LOG_COUNTS)?;
        let floors = txn.open_table(LOG_FLOORS)?;
        let mut report = LogReport::default();
        let mut vv_origins = Vec::new();
        for row in txn.open_table(VERSION_VECTOR)?.iter()? {
            let (k, v) = row?;
            let origin_bytes = k.value().to_vec();
            let origin = origin_from_bytes(&origin_bytes)?;
            let progress = decode_progress(v.value())?;
            report.origins += 1;
            let floor = floors.get(origin_bytes.as_slice())?.map_or(0, |f| f.value());
            let mut expected = Seq(floor + 1);
            let mut chain: Option<ChainHash> = (floor == 0).then_some(ChainHash::GENESIS);
            let mut held = 0u64;
            for row in oplog.range((origin_bytes.as_slice(), 0u64)..=(origin_bytes.as_slice(), u64::MAX))? {
                let (k, v) = row?;
                let last = k.value().1;
                let ops = match decode_row(last, v.value()) {
                    Ok(ops) => ops,
                    Err(e) => {
                        report.problems.push(format!("{origin}: {e}"));
                        break;
                    }
                };
                if heads.get((origin_bytes.as_slice(), last))?.is_none() {
                    report.problems.push(format!("{origin}: log row ending at seq {last} has no signed head"));
                }
                for logged in ops {
                    let seq = logged.seq;
                    report.ops += 1;
                    held += 1;
                    if seq != expected {
                        report.problems.push(format!("{origin}: log holds seq {seq} where {expected} was expected"));
                        expected = seq;
                    }
                    match crate::op::Op::decode(logged.bytes) {
                        Ok(op) if op.origin == origin && op.seq == seq => {}
                        Ok(_) => report.problems.push(format!("{origin}: log entry {seq} holds another op")),
                        Err(e) => report.problems.push(format!("{origin}: log entry {seq}: {e}")),
                    }
                    if let Some(prev) = chain {
                        if prev.extend(blake3::hash(logged.bytes).as_bytes()) != logged.chain {
                            report.problems.push(format!("{origin}: chain broken at seq {seq}"));
                        }
                    }
                    chain = Some(logged.chain);
                    expected = expected.next();
                }
            }
            if counts.get(origin_bytes.as_slice())?.map_or(0, |c| c.value()) != held {
                report.problems.push(format!("{origin}: the log's op count is not the {held} ops it holds"));
            }
            let last = Seq(expected.0 - 1);
            if last != progress.seq {
                report
                    .problems
                    .push(format!("{origin}: version vector says {} but the log ends at {last}", progress.seq));
            } else if chain.is_some_and(|c| c != progress.chain) && last.0 > floor {
                report.problems.push(format!("{origin}: version vector chain hash differs from the log's"));
            }
            vv_origins.push(origin_bytes);
        }
        // Ops of an origin the version vector does not know would be invisible to sync.
        for row in oplog.iter()? {
            let (k, _) = row?;
            let (origin, seq) = k.value();
            if !vv_origins.iter().any(|o| o.as_slice() == origin) {
                report.problems.push(format!("log holds seq {seq} of an origin missing from the version vector"));
                break;
            }
        }
        Ok(report)
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
        let txn = self.db().begin_read()?;
        let floor = Seq(txn.open_table(LOG_FLOORS)?.get(origin_bytes.as_slice())?.map_or(0, |f| f.value()));
        if after < floor {
            return Ok(LogRead { batches: Vec::new(), floor, below_floor: true });
        }
        let oplog = txn.open_table(OPLOG)?;
        let heads = txn.open_table(HEADS)?;
        let (mut ops_total, mut bytes_total) = (0usize, 0usize);
        let mut batches = Vec::new();
        let mut start = after;
        // Rows end at signed heads; the first may begin before `after` (served from partway in).
        for row in
            oplog.range((origin_bytes.as_slice(), after.0.saturating_add(1))..=(origin_bytes.as_slice(), u64::MAX))?
        {
            let (k, v) = row?;
            let end = Seq(k.value().1);
            let logged = decode_row(end.0, v.value())?;
            if logged[0].seq > start.next() {
                // Part of the range was compacted away: the caller must use a snapshot.
                break;
            }
            let Some(signature) = heads.get((origin_bytes.as_slice(), end.0))? else {
                return Err(StoreError::Corrupt(format!("log row of {origin} ending at {end} has no signed head")));
            };
            let ops: Vec<ByteBuf> =
                logged.iter().filter(|o| o.seq > start).map(|o| ByteBuf::from(o.bytes.to_vec())).collect();
            bytes_total += ops.iter().map(|o| o.len()).sum::<usize>();
            ops_total += ops.len();
            let head = SignedHead {
                origin: *origin,
                seq: end,
                head: logged.last().expect("rows are never empty").chain,
                signature: signature.value().to_vec(),
            };
            batches.push(OpBatch { after: start, ops, head });
            start = end;
            if ops_total >= max_ops || bytes_total >= max_bytes {
                break;
            }
        }
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
        let txn = self.db().begin_read()?;
        let mut out = Vec::new();
        for (kind, def, _) in STATE_TABLES {
            for row in txn.open_table(def)?.iter()? {
                let (k, v) = row?;
                let (collection, key) = k.value();
                if wanted.contains(&bucket_of(&identity_hash(entry_kind(kind), collection, key))) {
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
