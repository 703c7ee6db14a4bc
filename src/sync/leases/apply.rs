//! Applying the group's committed entries: lease commands to the [`Table`], configuration changes
//! to the voters; and compacting the log into a snapshot of the table.

use libp2p::PeerId;
use protobuf::Message as _;
use raft::eraftpb::{ConfChange, ConfChangeType, ConfState, EntryType, Snapshot};

use super::{Command, GroupOut, LeaseGroup, Table, COMPACT_EVERY};
use crate::store::LeaseLogWrite;

impl LeaseGroup {
    pub(super) fn apply(&mut self, entries: Vec<raft::eraftpb::Entry>) {
        for e in entries {
            if e.data.is_empty() {
                continue;
            }
            match e.get_entry_type() {
                EntryType::EntryNormal => {
                    let cmd: Command = match postcard::from_bytes(&e.data) {
                        Ok(c) => c,
                        Err(err) => {
                            tracing::warn!(index = e.index, error = %err, "an undecodable lease command skipped");
                            continue;
                        }
                    };
                    let result = self.table.apply(e.index, &cmd);
                    if e.index % COMPACT_EVERY == 0 {
                        self.table.forget_expired(cmd.at_ms.saturating_sub(60_000));
                    }
                    if let Some(result) = result.filter(|_| cmd.proposer == self.me) {
                        if let Some(w) = self.waits.remove(&cmd.id) {
                            self.out.push_back(GroupOut::Done { wait: w.wait, result: result.map_err(Into::into) });
                        }
                    }
                    if e.index >= self.raw.store().snapshot_index() + COMPACT_EVERY {
                        let conf = self.raw.raft.prs().conf().to_conf_state();
                        self.compact(e.index, conf);
                    }
                }
                EntryType::EntryConfChange => {
                    let cc = match ConfChange::parse_from_bytes(&e.data) {
                        Ok(c) => c,
                        Err(err) => {
                            tracing::warn!(index = e.index, error = %err, "an undecodable configuration change skipped");
                            continue;
                        }
                    };
                    let conf = match self.raw.apply_conf_change(&cc) {
                        Ok(c) => c,
                        Err(err) => {
                            tracing::warn!(index = e.index, error = %err, "a configuration change refused");
                            continue;
                        }
                    };
                    match cc.get_change_type() {
                        ConfChangeType::AddNode | ConfChangeType::AddLearnerNode => {
                            self.table.voters.insert(cc.node_id, cc.context.to_vec());
                            if let Ok(p) = PeerId::from_bytes(&cc.context) {
                                self.peers.insert(cc.node_id, p);
                            }
                        }
                        ConfChangeType::RemoveNode => {
                            self.table.voters.remove(&cc.node_id);
                        }
                    }
                    tracing::info!(voters = ?conf.voters, "lease group configuration changed");
                    // The persisted configuration is the snapshot's: take one at this entry.
                    self.compact(e.index, conf);
                }
                EntryType::EntryConfChangeV2 => {}
            }
        }
    }

    pub(super) fn compact(&mut self, index: u64, conf: ConfState) {
        let mut write = LeaseLogWrite::default();
        let table = self.table.encode();
        self.raw.mut_store().compact(index, conf, table, &mut write);
        if !write.is_empty() {
            self.out.push_back(GroupOut::Persist(write));
        }
    }
}

pub(super) fn decode_table(snap: &Snapshot) -> Table {
    match Table::decode(snap.get_data()) {
        Ok(t) => t,
        Err(e) => {
            // Snapshots come from our own log or from the leader, whose bytes were checked as a
            // Raft message; a table that does not decode is a bug, not an attack.
            tracing::error!(error = %e, "the lease table in a snapshot does not decode; starting from an empty one");
            Table::new(0)
        }
    }
}
