//! The lease service's replicated state machine: what each committed command does to the lease
//! table. Every voter applies the same commands in the same (Raft log) order, so every voter holds
//! the same table; nothing here reads a clock or a random source.
//!
//! Fencing tokens are the Raft log index of the command that granted the lease to its holder:
//! unique and increasing across the whole group by construction, so two grants never share one and
//! a key's tokens only grow.
//!
//! Expiry rests on a bound on clock drift ([`LEASE_CLOCK_DRIFT_MS`]). A command carries its
//! proposer's wall clock; the table (the grantors' view) keeps the lease until that time plus the
//! TTL plus the bound, while the holder is told it expires at that time plus the TTL. A holder's
//! view therefore ends before its grantors' view does, as in Chubby, as long as no two clocks of
//! the cluster are further apart than the bound.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use libp2p::PeerId;
use serde::{Deserialize, Serialize};

use crate::crdt::{decide_lease, LeaseError, LeaseGrant, LeaseRequest, LeaseView};

/// The assumed bound on how far apart two nodes' wall clocks are, in milliseconds. Grantors hold a
/// lease this much longer than its holder is told it lasts.
pub const LEASE_CLOCK_DRIFT_MS: u64 = 250;

/// A lease request, as proposed to the group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    /// The Raft id of the node that proposed it, and which of its proposals this is: how the
    /// proposer recognises the answer it waits for.
    pub proposer: u64,
    pub id: u64,
    pub lease: String,
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    pub request: LeaseRequest,
    /// The proposer's wall clock when it proposed (ms since the Unix epoch).
    pub at_ms: u64,
}

/// One lease key as the grantors see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Record {
    holder: Option<String>,
    token: u64,
    /// The grantors' expiry: the holder's plus [`LEASE_CLOCK_DRIFT_MS`].
    expires_at_ms: u64,
}

/// The table every voter keeps: the group, its voters and the leases.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Table {
    /// The group's id: the Raft id of the node that founded it. Messages of another group are
    /// dropped.
    pub group: u64,
    /// The voters' peer ids by Raft id (the Raft configuration names them by number only).
    pub voters: BTreeMap<u64, Vec<u8>>,
    leases: BTreeMap<(String, Vec<u8>), Record>,
    /// The last [`RECENT_COMMANDS`] commands applied, by (proposer, id), oldest first: a proposer
    /// proposes again a command it has not seen commit (a lost forward to the leader), and the
    /// copy that commits second must change nothing.
    recent: VecDeque<(u64, u64)>,
    #[serde(skip)]
    recent_set: BTreeSet<(u64, u64)>,
}

/// How many applied commands the table remembers to drop duplicates: far more than are proposed
/// within a request's timeout.
pub const RECENT_COMMANDS: usize = 4096;

impl Table {
    pub fn new(group: u64) -> Self {
        Table { group, ..Table::default() }
    }

    /// Applies a committed command at log `index`; the answer its proposer gives its client, or
    /// `None` for a second copy of a command already applied (it changes nothing).
    pub fn apply(&mut self, index: u64, cmd: &Command) -> Option<Result<LeaseGrant, LeaseError>> {
        let id = (cmd.proposer, cmd.id);
        if self.recent_set.contains(&id) {
            return None;
        }
        self.recent.push_back(id);
        self.recent_set.insert(id);
        if self.recent.len() > RECENT_COMMANDS {
            if let Some(old) = self.recent.pop_front() {
                self.recent_set.remove(&old);
            }
        }
        Some(self.decide(index, cmd))
    }

    fn decide(&mut self, index: u64, cmd: &Command) -> Result<LeaseGrant, LeaseError> {
        let slot = (cmd.lease.clone(), cmd.key.clone());
        let current = self.leases.get(&slot);
        let view =
            current.map(|r| LeaseView { holder: r.holder.as_deref(), token: r.token, expires_at_ms: r.expires_at_ms });
        // The grantors decide on their own (longer) view of every lease.
        let padded = match &cmd.request {
            LeaseRequest::Acquire { holder, ttl_ms } => {
                LeaseRequest::Acquire { holder: holder.clone(), ttl_ms: ttl_ms.saturating_add(LEASE_CLOCK_DRIFT_MS) }
            }
            LeaseRequest::Renew { holder, ttl_ms } => {
                LeaseRequest::Renew { holder: holder.clone(), ttl_ms: ttl_ms.saturating_add(LEASE_CLOCK_DRIFT_MS) }
            }
            release => release.clone(),
        };
        let mut grant = decide_lease(view, &padded, cmd.at_ms)?;
        let new_holder = grant.holder.is_some() && current.is_none_or(|r| r.token != grant.token);
        if new_holder {
            grant.token = index;
        } else if let Some(r) = current.filter(|r| grant.holder.is_some() && r.holder == grant.holder) {
            // The holder renews or acquires again: its lease is extended, never shortened. A
            // shorter TTL, or a proposer whose clock is behind, must not end the lease before the
            // holder hears of it, while the holder still acts on the expiry it was told before.
            grant.expires_at_ms = grant.expires_at_ms.max(r.expires_at_ms);
        }
        let record = Record { holder: grant.holder.clone(), token: grant.token, expires_at_ms: grant.expires_at_ms };
        if record.holder.is_none() {
            // Released: nothing to remember. A later grant's token is a later log index, so it is
            // larger than this one without the record.
            self.leases.remove(&slot);
        } else {
            self.leases.insert(slot, record);
        }
        if grant.holder.is_some() {
            grant.expires_at_ms = grant.expires_at_ms.saturating_sub(LEASE_CLOCK_DRIFT_MS);
        }
        Ok(grant)
    }

    /// Drops leases whose grantors' view expired before `now_ms`: a later grant's token is a later
    /// log index, larger than theirs without the record. Deterministic when `now_ms` comes from a
    /// command.
    pub fn forget_expired(&mut self, now_ms: u64) {
        self.leases.retain(|_, r| r.expires_at_ms > now_ms);
    }

    /// Leases held in the table.
    pub fn len(&self) -> usize {
        self.leases.len()
    }

    pub fn is_empty(&self) -> bool {
        self.leases.is_empty()
    }

    /// The voters' peer ids.
    pub fn voter_peers(&self) -> impl Iterator<Item = (u64, PeerId)> + '_ {
        self.voters.iter().filter_map(|(id, bytes)| Some((*id, PeerId::from_bytes(bytes).ok()?)))
    }

    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("the lease table encodes")
    }

    pub fn decode(bytes: &[u8]) -> Result<Table, postcard::Error> {
        let mut t: Table = postcard::from_bytes(bytes)?;
        t.recent_set = t.recent.iter().copied().collect();
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A command with an id of its own (the table drops a second copy of one id).
    fn cmd(request: LeaseRequest, at_ms: u64) -> Command {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Command {
            proposer: 1,
            id: NEXT.fetch_add(1, Ordering::Relaxed),
            lease: "l".into(),
            key: b"k".to_vec(),
            request,
            at_ms,
        }
    }

    /// Applies a command that is no duplicate.
    fn apply(t: &mut Table, index: u64, c: &Command) -> Result<LeaseGrant, LeaseError> {
        t.apply(index, c).expect("not a duplicate")
    }

    #[test]
    fn a_second_copy_of_a_command_changes_nothing() {
        let mut t = Table::new(7);
        let a = cmd(acquire("a", 1_000), 100);
        assert_eq!(apply(&mut t, 3, &a).unwrap().token, 3);
        apply(&mut t, 4, &cmd(LeaseRequest::Release { holder: "a".into() }, 200)).unwrap();
        // The retried acquire commits again after the release: it must not grant "a" the lease anew.
        assert!(t.apply(5, &a).is_none());
        assert!(t.is_empty());
        // The memory of applied commands survives the snapshot's encoding.
        let t2 = Table::decode(&t.encode()).unwrap();
        assert!(t2.clone().apply(6, &a).is_none());
    }

    fn acquire(holder: &str, ttl_ms: u64) -> LeaseRequest {
        LeaseRequest::Acquire { holder: holder.into(), ttl_ms }
    }

    #[test]
    fn tokens_are_log_indexes_and_holders_never_overlap() {
        let mut t = Table::new(7);
        let a = apply(&mut t, 10, &cmd(acquire("a", 1_000), 5_000)).unwrap();
        assert_eq!((a.token, a.expires_at_ms), (10, 6_000));
        // The holder's view ends at 6 000; the grantors refuse another holder until 6 000 + drift.
        let refused = apply(&mut t, 11, &cmd(acquire("b", 1_000), 6_000 + LEASE_CLOCK_DRIFT_MS - 1));
        assert!(matches!(refused, Err(LeaseError::Held { .. })));
        let b = apply(&mut t, 12, &cmd(acquire("b", 1_000), 6_000 + LEASE_CLOCK_DRIFT_MS)).unwrap();
        assert_eq!(b.token, 12);
        // Re-acquiring and renewing keep the token.
        assert_eq!(apply(&mut t, 13, &cmd(acquire("b", 1_000), 6_500)).unwrap().token, 12);
        let renew = LeaseRequest::Renew { holder: "b".into(), ttl_ms: 1_000 };
        assert_eq!(apply(&mut t, 14, &cmd(renew, 6_600)).unwrap().token, 12);
    }

    #[test]
    fn a_renewal_extends_but_never_shortens() {
        let mut t = Table::new(7);
        let a = apply(&mut t, 1, &cmd(acquire("a", 2_000), 1_000)).unwrap();
        assert_eq!(a.expires_at_ms, 3_000);
        // A shorter TTL, or a proposer whose clock is behind, keeps the expiry already told.
        assert_eq!(apply(&mut t, 2, &cmd(acquire("a", 200), 1_100)).unwrap().expires_at_ms, 3_000);
        let renew = LeaseRequest::Renew { holder: "a".into(), ttl_ms: 100 };
        assert_eq!(apply(&mut t, 3, &cmd(renew, 900)).unwrap().expires_at_ms, 3_000);
        // So another holder still waits for the first expiry plus the drift bound.
        let early = apply(&mut t, 4, &cmd(acquire("b", 100), 3_000 + LEASE_CLOCK_DRIFT_MS - 1));
        assert!(matches!(early, Err(LeaseError::Held { .. })));
        assert_eq!(apply(&mut t, 5, &cmd(acquire("a", 5_000), 2_000)).unwrap().expires_at_ms, 7_000);
    }

    #[test]
    fn released_leases_are_forgotten_and_the_next_token_is_still_larger() {
        let mut t = Table::new(7);
        apply(&mut t, 3, &cmd(acquire("a", 1_000), 100)).unwrap();
        let rel = apply(&mut t, 4, &cmd(LeaseRequest::Release { holder: "a".into() }, 200)).unwrap();
        assert_eq!(rel.holder, None);
        assert!(t.is_empty());
        assert_eq!(apply(&mut t, 9, &cmd(acquire("c", 1_000), 300)).unwrap().token, 9);
    }

    #[test]
    fn the_table_round_trips() {
        let mut t = Table::new(3);
        t.voters.insert(3, PeerId::random().to_bytes());
        apply(&mut t, 2, &cmd(acquire("a", 10), 1)).unwrap();
        assert_eq!(Table::decode(&t.encode()).unwrap(), t);
    }
}
