//! Register tombstones: the index that finds them by stamp, their collection, and the migration of
//! a format-1 database (whose state root counted them).
//!
//! A delete leaves a tombstone so that an older write of the same key, arriving later, loses to it.
//! Once no such write can arrive any more, the tombstone is dead weight. The sync engine decides
//! when that is (every member's vector covers the delete and every member's clock is past it; see
//! `sync::engine::tombstones`) and asks for the tombstones up to a stamp to be collected. Tombstones
//! are not part of the state root (see `root.rs`), so nodes that collect at different times keep
//! equal roots.

use redb::{ReadableTable, ReadableTableMetadata, WriteTransaction};

use super::encoding::decode;
use super::root::{identity_hash, EntryKind};
use super::tables::*;
use super::StoreError;
use crate::crdt::{Hlc, RegisterValue};

/// Tombstones dropped per transaction, so collecting a million never holds the writer for long.
pub(crate) const COLLECT_BATCH: usize = 20_000;

/// Drops up to [`COLLECT_BATCH`] register tombstones stamped at or before `through`, with their index
/// rows. Returns how many went and whether any older than `through` are left.
pub(crate) fn collect(txn: &WriteTransaction, through: Hlc) -> Result<(u64, bool), StoreError> {
    let mut index = txn.open_table(TOMBSTONES)?;
    let mut registers = txn.open_table(REGISTERS)?;
    let mut due: Vec<(u64, u32, String, Vec<u8>)> = Vec::new();
    let mut more = false;
    for row in index.range((0u64, 0u32, "", &[][..])..)? {
        let (k, _) = row?;
        let (wall_ms, logical, register, key) = k.value();
        if Hlc::new(wall_ms, logical) > through {
            break;
        }
        if due.len() == COLLECT_BATCH {
            more = true;
            break;
        }
        due.push((wall_ms, logical, register.to_owned(), key.to_vec()));
    }
    let mut dropped = 0;
    for (wall_ms, logical, register, key) in &due {
        index.remove((*wall_ms, *logical, register.as_str(), key.as_slice()))?;
        let current = registers.get((register.as_str(), key.as_slice()))?.map(|g| g.value().to_vec());
        // The index names only current tombstones; anything else is left as it is.
        if let Some(bytes) = current {
            let value: RegisterValue = decode(&bytes, "register")?;
            if value.is_tombstone() && value.hlc == Hlc::new(*wall_ms, *logical) {
                registers.remove((register.as_str(), key.as_slice()))?;
                dropped += 1;
            }
        }
    }
    // Remember how far collection reached: this node holds every write stamped up to `through`, so
    // a stale copy of a deleted key that old is recognised as such (see `Tables::merge_entry`).
    let mut meta = txn.open_table(META)?;
    let before = meta.get(META_COLLECTED)?.map(|v| super::decode_hlc(v.value())).transpose()?;
    if before.is_none_or(|b| b < through) {
        meta.insert(META_COLLECTED, super::encode_hlc(through).as_slice())?;
    }
    Ok((dropped, more))
}

/// Rebuilds the index from the register table (after a snapshot's entries became the state).
pub(crate) fn rebuild_index(txn: &WriteTransaction) -> Result<(), StoreError> {
    txn.delete_table(TOMBSTONES)?;
    let mut index = txn.open_table(TOMBSTONES)?;
    let registers = txn.open_table(REGISTERS)?;
    for row in registers.iter()? {
        let (k, v) = row?;
        let value: RegisterValue = decode(v.value(), "register")?;
        if value.is_tombstone() {
            let (register, key) = k.value();
            index.insert(tombstone_key(value.hlc, register, key), ())?;
        }
    }
    Ok(())
}

/// Tombstones held now.
pub(crate) fn count(txn: &redb::ReadTransaction) -> Result<u64, StoreError> {
    Ok(txn.open_table(TOMBSTONES)?.len()?)
}

/// Format 1 to 2: takes every register tombstone out of the state-root buckets and indexes it. The
/// snapshots held (and a pull staged) were made under format 1, whose roots count tombstones: they
/// are dropped, and the node takes a new snapshot on its usual schedule. The buckets are written in
/// rows, as format 3 keeps them.
pub(crate) fn migrate_v1(txn: &WriteTransaction) -> Result<u64, StoreError> {
    let mut buckets = super::buckets::read_v1(txn)?;
    let mut moved = 0u64;
    {
        let registers = txn.open_table(REGISTERS)?;
        let mut index = txn.open_table(TOMBSTONES)?;
        for row in registers.iter()? {
            let (k, v) = row?;
            let value: RegisterValue = decode(v.value(), "register")?;
            if value.is_tombstone() {
                let (register, key) = k.value();
                let id = identity_hash(EntryKind::Register, register, key);
                // Format 1 counted the tombstone's entry hash; toggling it again takes it out.
                buckets.toggle(&id, &super::root::entry_hash(&id, v.value()));
                index.insert(tombstone_key(value.hlc, register, key), ())?;
                moved += 1;
            }
        }
    }
    super::buckets::replace_v1(txn, &buckets)?;
    txn.delete_table(SNAPSHOTS)?;
    txn.delete_table(SNAPSHOT_ORDER)?;
    txn.open_table(SNAPSHOTS)?;
    txn.open_table(SNAPSHOT_ORDER)?;
    super::staging::clear(txn)?;
    Ok(moved)
}
