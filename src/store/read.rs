//! Reads of the state and the op log. Each read is one redb read transaction: a consistent view
//! that never blocks the writer.

use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata};

use super::apply::decode;
use super::tables::*;
use super::{decode_progress, origin_from_bytes, Store, StoreError};
use crate::crdt::{LeaseState, PnCounter, RegisterValue};
use crate::ids::Seq;
use crate::op::ChainHash;

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
    pub fn register(
        &self,
        register: &str,
        key: &[u8],
    ) -> Result<Option<RegisterValue>, StoreError> {
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
        Ok(ListPage {
            entries,
            next_after,
        })
    }

    pub fn counter(&self, counter: &str, key: &[u8]) -> Result<i64, StoreError> {
        let txn = self.db().begin_read()?;
        let table = txn.open_table(COUNTERS)?;
        let value = table.get((counter, key))?;
        Ok(value
            .map(|v| decode::<PnCounter>(v.value(), "counter"))
            .transpose()?
            .map_or(0, |c| c.value()))
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
        Ok(txn.open_table(OPLOG)?.len()?)
    }

    /// Checks that, for every origin, the log holds exactly seqs `floor+1 ..= vv[origin]`, that each
    /// op decodes and belongs there, that the hash chain links every op, and that the version vector's
    /// chain hash is the one after its last op. A sound store after any crash passes.
    pub fn check_log(&self) -> Result<LogReport, StoreError> {
        let txn = self.db().begin_read()?;
        let oplog = txn.open_table(OPLOG)?;
        let floors = txn.open_table(LOG_FLOORS)?;
        let mut report = LogReport::default();
        let mut vv_origins = Vec::new();
        for row in txn.open_table(VERSION_VECTOR)?.iter()? {
            let (k, v) = row?;
            let origin_bytes = k.value().to_vec();
            let origin = origin_from_bytes(&origin_bytes)?;
            let progress = decode_progress(v.value())?;
            report.origins += 1;
            let floor = floors
                .get(origin_bytes.as_slice())?
                .map_or(0, |f| f.value());
            let mut expected = Seq(floor + 1);
            let mut chain: Option<ChainHash> = (floor == 0).then_some(ChainHash::GENESIS);
            for row in oplog
                .range((origin_bytes.as_slice(), 0u64)..=(origin_bytes.as_slice(), u64::MAX))?
            {
                let (k, v) = row?;
                let seq = Seq(k.value().1);
                let value = v.value();
                report.ops += 1;
                if seq != expected {
                    report.problems.push(format!(
                        "{origin}: log holds seq {seq} where {expected} was expected"
                    ));
                    expected = seq;
                }
                if value.len() < 32 {
                    report
                        .problems
                        .push(format!("{origin}: log entry {seq} is truncated"));
                    break;
                }
                let stored = ChainHash(value[..32].try_into().expect("32 bytes"));
                let bytes = &value[32..];
                match crate::op::Op::decode(bytes) {
                    Ok(op) if op.origin == origin && op.seq == seq => {}
                    Ok(_) => report
                        .problems
                        .push(format!("{origin}: log entry {seq} holds another op")),
                    Err(e) => report
                        .problems
                        .push(format!("{origin}: log entry {seq}: {e}")),
                }
                if let Some(prev) = chain {
                    if prev.extend(blake3::hash(bytes).as_bytes()) != stored {
                        report
                            .problems
                            .push(format!("{origin}: chain broken at seq {seq}"));
                    }
                }
                chain = Some(stored);
                expected = expected.next();
            }
            let last = Seq(expected.0 - 1);
            if last != progress.seq {
                report.problems.push(format!(
                    "{origin}: version vector says {} but the log ends at {last}",
                    progress.seq
                ));
            } else if chain.is_some_and(|c| c != progress.chain) && last.0 > floor {
                report.problems.push(format!(
                    "{origin}: version vector chain hash differs from the log's"
                ));
            }
            vv_origins.push(origin_bytes);
        }
        // Ops of an origin the version vector does not know would be invisible to sync.
        for row in oplog.iter()? {
            let (k, _) = row?;
            let (origin, seq) = k.value();
            if !vv_origins.iter().any(|o| o.as_slice() == origin) {
                report.problems.push(format!(
                    "log holds seq {seq} of an origin missing from the version vector"
                ));
                break;
            }
        }
        Ok(report)
    }
}
