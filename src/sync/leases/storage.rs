//! The Raft log as the lease group reads it: hard state, the latest snapshot and the entries after
//! it, all in memory. The executor keeps the durable copy ([`crate::store::LeaseLogWrite`]): every
//! change made here is also handed out to persist, before any message that depends on it is sent.

use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, StorageError};

use crate::store::{LeaseLogBoot, LeaseLogWrite};

/// Why the persisted log could not be read back.
#[derive(Debug, thiserror::Error)]
#[error("the lease log in the data directory is corrupt ({what}): {source}")]
pub struct BootError {
    what: &'static str,
    source: protobuf::ProtobufError,
}

#[derive(Debug, Default)]
pub struct GroupStorage {
    pub(super) hard_state: HardState,
    /// The latest snapshot: its metadata (index, term, configuration) and the lease table at it.
    pub(super) snap: Snapshot,
    /// Entries after the snapshot, contiguous.
    entries: Vec<Entry>,
}

impl GroupStorage {
    /// The storage as persisted by an earlier run.
    pub fn boot(boot: &LeaseLogBoot) -> Result<GroupStorage, BootError> {
        let mut s = GroupStorage::default();
        if let Some(b) = &boot.hard_state {
            s.hard_state = HardState::parse_from_bytes(b).map_err(|source| BootError { what: "hard state", source })?;
        }
        if let Some(b) = &boot.snapshot {
            s.snap = Snapshot::parse_from_bytes(b).map_err(|source| BootError { what: "snapshot", source })?;
        }
        for b in &boot.entries {
            let e = Entry::parse_from_bytes(b).map_err(|source| BootError { what: "entry", source })?;
            // Entries the snapshot covers, or that do not follow on, were left by a crash between
            // the two writes that replace them: the snapshot wins.
            if e.index == s.last_index() + 1 {
                s.entries.push(e);
            }
        }
        Ok(s)
    }

    pub fn is_empty(&self) -> bool {
        self.snap.get_metadata().index == 0 && self.entries.is_empty()
    }

    pub fn snapshot_index(&self) -> u64 {
        self.snap.get_metadata().index
    }

    pub fn conf_state(&self) -> &ConfState {
        self.snap.get_metadata().get_conf_state()
    }

    fn first_index(&self) -> u64 {
        self.snap.get_metadata().index + 1
    }

    fn last_index(&self) -> u64 {
        self.snap.get_metadata().index + self.entries.len() as u64
    }

    /// Appends entries from a ready, replacing any conflicting suffix.
    pub fn append(&mut self, entries: &[Entry], write: &mut LeaseLogWrite) {
        let Some(first) = entries.first() else { return };
        if first.index < self.first_index() {
            // Raft never hands out entries the snapshot covers.
            return;
        }
        let keep = (first.index - self.first_index()) as usize;
        if keep < self.entries.len() {
            self.entries.truncate(keep);
            write.truncate_from = Some(write.truncate_from.map_or(first.index, |t| t.min(first.index)));
        }
        for e in entries {
            write.entries.push((e.index, e.write_to_bytes().expect("entries encode")));
        }
        self.entries.extend_from_slice(entries);
    }

    pub fn set_hard_state(&mut self, hs: HardState, write: &mut LeaseLogWrite) {
        write.hard_state = Some(hs.write_to_bytes().expect("hard state encodes"));
        self.hard_state = hs;
    }

    pub fn set_commit(&mut self, commit: u64, write: &mut LeaseLogWrite) {
        let mut hs = self.hard_state.clone();
        hs.commit = commit;
        self.set_hard_state(hs, write);
    }

    /// Installs a snapshot received from the leader: it replaces the whole log.
    pub fn install(&mut self, snap: Snapshot, write: &mut LeaseLogWrite) {
        let meta = snap.get_metadata();
        let mut hs = self.hard_state.clone();
        hs.commit = hs.commit.max(meta.index);
        hs.term = hs.term.max(meta.term);
        self.entries.clear();
        write.truncate_from = Some(0);
        write.entries.clear();
        write.snapshot = Some(snap.write_to_bytes().expect("snapshots encode"));
        self.snap = snap;
        self.set_hard_state(hs, write);
    }

    /// Makes a snapshot at applied `index` with this configuration and table, and drops the
    /// entries it covers.
    pub fn compact(&mut self, index: u64, conf: ConfState, table: Vec<u8>, write: &mut LeaseLogWrite) {
        if index <= self.snapshot_index() || index > self.last_index() {
            return;
        }
        let term = self.entry_term(index).expect("index is within the log");
        let mut snap = Snapshot::default();
        snap.set_data(table.into());
        let meta = snap.mut_metadata();
        meta.index = index;
        meta.term = term;
        meta.set_conf_state(conf);
        let drop = (index - self.snapshot_index()) as usize;
        self.entries.drain(..drop);
        write.snapshot = Some(snap.write_to_bytes().expect("snapshots encode"));
        write.compact_through = Some(index);
        self.snap = snap;
    }

    fn entry_term(&self, idx: u64) -> Option<u64> {
        if idx == self.snapshot_index() {
            return Some(self.snap.get_metadata().term);
        }
        let i = idx.checked_sub(self.first_index())?;
        self.entries.get(i as usize).map(|e| e.term)
    }
}

impl raft::Storage for GroupStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(self.hard_state.clone(), self.conf_state().clone()))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low < self.first_index() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last_index() + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let lo = (low - self.first_index()) as usize;
        let hi = (high - self.first_index()) as usize;
        let mut out = self.entries[lo..hi].to_vec();
        raft::util::limit_size(&mut out, max_size.into());
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        if idx < self.snapshot_index() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        self.entry_term(idx).ok_or(raft::Error::Store(StorageError::Unavailable))
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(GroupStorage::first_index(self))
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(GroupStorage::last_index(self))
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        if self.snapshot_index() < request_index {
            // Compaction makes a newer one soon; until then the follower is sent entries.
            return Err(raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable));
        }
        Ok(self.snap.clone())
    }
}
