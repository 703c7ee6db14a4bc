//! The lease service's durable Raft log: hard state, the latest snapshot and the entries after it,
//! in a redb database of its own (`DATA_DIR/leases.redb`), so a lease write never waits behind a
//! large commit of the state store. The store knows these only as bytes; `sync::leases` encodes
//! them. Every [`LeaseLogWrite`] commits durably in one transaction before the Raft messages that
//! depend on it are sent.

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable};

use super::tables::{RAFT_ENTRIES, RAFT_META};
use super::StoreError;

const HARD_STATE: &str = "hard_state";
const SNAPSHOT: &str = "snapshot";

/// What one Raft ready changes in the log, applied in this order: truncate, compact, snapshot,
/// entries, hard state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeaseLogWrite {
    /// Entries at or above this index are deleted (a new leader overwrote them, or a snapshot from
    /// the leader replaced the log).
    pub truncate_from: Option<u64>,
    /// Entries at or below this index are deleted: the snapshot covers them.
    pub compact_through: Option<u64>,
    pub snapshot: Option<Vec<u8>>,
    /// Entries to store, by index.
    pub entries: Vec<(u64, Vec<u8>)>,
    pub hard_state: Option<Vec<u8>>,
}

impl LeaseLogWrite {
    pub fn is_empty(&self) -> bool {
        *self == LeaseLogWrite::default()
    }
}

/// The log as persisted: what the lease service starts from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeaseLogBoot {
    pub hard_state: Option<Vec<u8>>,
    pub snapshot: Option<Vec<u8>>,
    /// Entries in index order.
    pub entries: Vec<Vec<u8>>,
    /// Their indexes, in the same order.
    pub indexes: Vec<u64>,
}

impl LeaseLogBoot {
    /// Applies a write in memory, with the same meaning as [`LeaseLog::write`] on disk (the
    /// simulator keeps its nodes' logs this way).
    pub fn apply(&mut self, w: &LeaseLogWrite) {
        let mut rows: std::collections::BTreeMap<u64, Vec<u8>> =
            self.indexes.iter().copied().zip(std::mem::take(&mut self.entries)).collect();
        if let Some(from) = w.truncate_from {
            rows.retain(|i, _| *i < from);
        }
        if let Some(through) = w.compact_through {
            rows.retain(|i, _| *i > through);
        }
        if let Some(s) = &w.snapshot {
            self.snapshot = Some(s.clone());
        }
        for (i, e) in &w.entries {
            rows.insert(*i, e.clone());
        }
        if let Some(h) = &w.hard_state {
            self.hard_state = Some(h.clone());
        }
        self.indexes = rows.keys().copied().collect();
        self.entries = rows.into_values().collect();
    }
}

/// The durable log.
pub struct LeaseLog {
    db: Database,
}

impl LeaseLog {
    pub fn open(path: &Path) -> Result<LeaseLog, StoreError> {
        let db = Database::create(path)?;
        let tx = db.begin_write()?;
        tx.open_table(RAFT_ENTRIES)?;
        tx.open_table(RAFT_META)?;
        tx.commit()?;
        Ok(LeaseLog { db })
    }

    pub fn load(&self) -> Result<LeaseLogBoot, StoreError> {
        let tx = self.db.begin_read()?;
        let meta = tx.open_table(RAFT_META)?;
        let mut boot = LeaseLogBoot {
            hard_state: meta.get(HARD_STATE)?.map(|v| v.value().to_vec()),
            snapshot: meta.get(SNAPSHOT)?.map(|v| v.value().to_vec()),
            ..LeaseLogBoot::default()
        };
        for row in tx.open_table(RAFT_ENTRIES)?.iter()? {
            let (k, v) = row?;
            boot.indexes.push(k.value());
            boot.entries.push(v.value().to_vec());
        }
        Ok(boot)
    }

    /// Commits a write durably.
    pub fn write(&self, w: &LeaseLogWrite) -> Result<(), StoreError> {
        if w.is_empty() {
            return Ok(());
        }
        let tx = self.db.begin_write()?;
        {
            let mut entries = tx.open_table(RAFT_ENTRIES)?;
            if let Some(from) = w.truncate_from {
                entries.retain_in(from.., |_, _| false)?;
            }
            if let Some(through) = w.compact_through {
                entries.retain_in(..=through, |_, _| false)?;
            }
            for (i, e) in &w.entries {
                entries.insert(*i, e.as_slice())?;
            }
            let mut meta = tx.open_table(RAFT_META)?;
            if let Some(s) = &w.snapshot {
                meta.insert(SNAPSHOT, s.as_slice())?;
            }
            if let Some(h) = &w.hard_state {
                meta.insert(HARD_STATE, h.as_slice())?;
            }
        }
        tx.commit()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_and_memory_agree() {
        let dir = tempfile::tempdir().unwrap();
        let log = LeaseLog::open(&dir.path().join("leases.redb")).unwrap();
        let mut mem = LeaseLogBoot::default();
        let writes = [
            LeaseLogWrite { entries: (1..=5).map(|i| (i, vec![i as u8])).collect(), ..Default::default() },
            LeaseLogWrite {
                truncate_from: Some(4),
                entries: vec![(4, vec![40])],
                hard_state: Some(vec![1]),
                ..Default::default()
            },
            LeaseLogWrite { compact_through: Some(2), snapshot: Some(vec![9]), ..Default::default() },
        ];
        for w in &writes {
            log.write(w).unwrap();
            mem.apply(w);
            assert_eq!(log.load().unwrap(), mem);
        }
        assert_eq!(mem.indexes, vec![3, 4]);
        assert_eq!(mem.entries, vec![vec![3], vec![40]]);
        drop(log);
        let again = LeaseLog::open(&dir.path().join("leases.redb")).unwrap();
        assert_eq!(again.load().unwrap(), mem);
    }
}
