//! The op log's rows: one row per signed batch, holding the batch's ops in order, each with the
//! chain hash after it. A row's key is (origin, seq of its last op), and that seq has a signed head,
//! so a row is exactly what a relay serves (or the tail of it, for a reader that is partway in).
//!
//! One B-tree insert per batch instead of one per op: replaying 1M ops spent ~40 % of the writer's
//! time inserting log entries one by one.

use redb::{ReadableTable, ReadableTableMetadata, Table};

use super::tables::*;
use super::StoreError;
use crate::ids::Seq;
use crate::op::ChainHash;

/// Encodes a row: per op, the 32-byte chain hash after it, its length (4 bytes, big-endian) and its
/// canonical bytes.
pub(crate) fn encode_row<'a>(ops: impl Iterator<Item = (&'a ChainHash, &'a [u8])>) -> Vec<u8> {
    let mut row = Vec::new();
    for (chain, bytes) in ops {
        row.reserve(36 + bytes.len());
        row.extend_from_slice(&chain.0);
        row.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
        row.extend_from_slice(bytes);
    }
    row
}

/// One op of a row.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LoggedOp<'a> {
    pub seq: Seq,
    /// The chain hash after this op.
    pub chain: ChainHash,
    pub bytes: &'a [u8],
}

/// Decodes the row of `origin`'s ops that ends at `last`; a row that does not parse is corruption.
pub(crate) fn decode_row(last: u64, row: &[u8]) -> Result<Vec<LoggedOp<'_>>, StoreError> {
    let corrupt = || StoreError::Corrupt(format!("op log row ending at seq {last} does not parse"));
    let mut parts = Vec::new();
    let mut rest = row;
    while !rest.is_empty() {
        if rest.len() < 36 {
            return Err(corrupt());
        }
        let chain = ChainHash(rest[..32].try_into().expect("32 bytes"));
        let len = u32::from_be_bytes(rest[32..36].try_into().expect("4 bytes")) as usize;
        let bytes = rest.get(36..36 + len).ok_or_else(corrupt)?;
        parts.push((chain, bytes));
        rest = &rest[36 + len..];
    }
    let first =
        (last + 1).checked_sub(parts.len() as u64).filter(|f| *f > 0 && !parts.is_empty()).ok_or_else(corrupt)?;
    Ok(parts
        .into_iter()
        .enumerate()
        .map(|(i, (chain, bytes))| LoggedOp { seq: Seq(first + i as u64), chain, bytes })
        .collect())
}

/// Adds `delta` ops to the count of ops held for `origin` (negative when rows are deleted).
pub(crate) fn count_ops(counts: &mut Table<&'static [u8], u64>, origin: &[u8], delta: i64) -> Result<(), StoreError> {
    let held = counts.get(origin)?.map_or(0, |v| v.value());
    counts.insert(origin, held.saturating_add_signed(delta))?;
    Ok(())
}

/// Deletes `origin`'s rows (and signed heads) up to and including seq `upto`, which must end a
/// row or lie beyond the last one. Returns the ops deleted.
pub(crate) fn delete_upto(
    oplog: &mut Table<(&'static [u8], u64), &'static [u8]>,
    heads: &mut Table<(&'static [u8], u64), &'static [u8]>,
    counts: &mut Table<&'static [u8], u64>,
    origin: &[u8],
    upto: u64,
) -> Result<u64, StoreError> {
    let mut deleted = 0u64;
    let mut failure = None;
    oplog.retain_in((origin, 0u64)..=(origin, upto), |k, v| {
        match decode_row(k.1, v) {
            Ok(ops) => deleted += ops.len() as u64,
            Err(e) => failure = Some(e),
        }
        false
    })?;
    if let Some(e) = failure {
        return Err(e);
    }
    heads.retain_in((origin, 0u64)..=(origin, upto), |_, _| false)?;
    count_ops(counts, origin, -(deleted as i64))?;
    Ok(deleted)
}

/// Moves a log kept one op per row (format v1, `oplog_v1`) into rows per signed batch. Runs once,
/// at open, inside the opening transaction.
pub(crate) fn migrate_v1(txn: &redb::WriteTransaction) -> Result<(), StoreError> {
    let old = txn.open_table(OPLOG_V1)?;
    if old.is_empty()? {
        drop(old);
        txn.delete_table(OPLOG_V1)?;
        return Ok(());
    }
    let heads = txn.open_table(HEADS)?;
    let mut oplog = txn.open_table(OPLOG)?;
    let mut counts = txn.open_table(LOG_COUNTS)?;
    let mut batch: Vec<(ChainHash, Vec<u8>)> = Vec::new();
    let mut current: Option<Vec<u8>> = None;
    for row in old.iter()? {
        let (k, v) = row?;
        let (origin, seq) = k.value();
        let v = v.value();
        if v.len() < 32 {
            return Err(StoreError::Corrupt(format!("v1 log entry at seq {seq} is truncated")));
        }
        if current.as_deref() != Some(origin) {
            // A v1 log always ends each origin at a signed head; ops left over would be refused
            // here, never merged into another origin's row.
            if !batch.is_empty() {
                return Err(StoreError::Corrupt("v1 log: ops after the last signed head".into()));
            }
            current = Some(origin.to_vec());
        }
        batch.push((ChainHash(v[..32].try_into().expect("32 bytes")), v[32..].to_vec()));
        if heads.get((origin, seq))?.is_some() {
            let row = encode_row(batch.iter().map(|(c, b)| (c, b.as_slice())));
            oplog.insert((origin, seq), row.as_slice())?;
            count_ops(&mut counts, origin, batch.len() as i64)?;
            batch.clear();
        }
    }
    if !batch.is_empty() {
        return Err(StoreError::Corrupt("v1 log: ops after the last signed head".into()));
    }
    drop(old);
    txn.delete_table(OPLOG_V1)?;
    tracing::info!("moved the op log to one row per signed batch");
    Ok(())
}
