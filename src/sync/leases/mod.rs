//! The lease service: exclusive leases on a Raft group of the primaries (tikv/raft-rs, sans-I/O).
//!
//! Every acquire, renew and release is a command in the group's Raft log. A command is answered
//! only once a quorum of the voters has it and it is applied, and each voter applies the same
//! commands in the same order to the same [`Table`]: so no two holders are granted a lease for
//! overlapping periods, and fencing tokens (the log index of the grant) never repeat and only grow.
//! A node on the minority side of a partition cannot commit, and its clients get `no_quorum`.
//!
//! How a group forms (the rule in open mode and in membership mode alike):
//! - A primary with no lease log of its own asks to join a group a peer reports in its digest.
//! - Only a primary that has never seen a lower Raft id among the cluster's primaries, and never
//!   heard of a group (a digest or an answer named one), founds the group: once it has waited
//!   `lease_found_after` since it started, every one of its bootstrap peers is connected (never
//!   without them) and every connected primary's digest says it is in no group.
//! - The leader adds a joining primary as a voter (in membership mode only a certified primary)
//!   and removes revoked members.
//!
//! [`LeaseGroup`] wraps the Raft node and its in-memory log; the engine decides when it founds,
//! whom it asks to join and whom it admits, and carries its messages. The executor persists what
//! it hands out ([`crate::store::LeaseLogWrite`]) before sending the messages that follow it.
//!
//! Must never depend on: the network, the store's internals, the node, a clock or a runtime.

mod apply;
mod machine;
mod raft_config;
mod storage;

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use libp2p::PeerId;
use protobuf::Message as _;
use raft::eraftpb::{ConfChange, ConfChangeType, Message, Snapshot};
use raft::{RawNode, StateRole};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use apply::decode_table;
pub use machine::{Command, Table, LEASE_CLOCK_DRIFT_MS};
use raft_config::{config, logger};
pub use storage::BootError;
use storage::GroupStorage;

use crate::crdt::{LeaseError, LeaseGrant, LeaseRequest};
use crate::store::{LeaseLogBoot, LeaseLogWrite};
use crate::wire::LeaseAnswer;

/// Raft ticks: heartbeats every 2 ticks, elections after 10 to 20 ticks without a leader.
pub const HEARTBEAT_TICKS: usize = 2;
pub const ELECTION_TICKS: usize = 10;
/// Lease messages in flight to one peer at most; more are dropped (Raft sends again).
pub const MAX_MESSAGES_IN_FLIGHT: usize = 16;

/// Lease requests waiting for their command to be applied, at most; more are refused.
pub const MAX_LEASE_WAITS: usize = 1024;
/// A snapshot of the table replaces the log every this many applied entries.
const COMPACT_EVERY: u64 = 1024;
/// Largest Raft append sent in one message.
const MAX_MSG_BYTES: u64 = 256 * 1024;

/// Names a lease request of the executor's; its answer comes back with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseWait(pub u64);

/// Why a lease request got no grant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseFailure {
    /// The group decided: no (held by another, or not the holder).
    #[error(transparent)]
    Refused(#[from] LeaseError),
    /// No quorum of the group's voters could be reached in time. The request may still take
    /// effect if it reached the log.
    #[error("no quorum of the lease group's primaries answered: {0}")]
    NoQuorum(String),
}

/// The Raft id of a peer: 64 bits of the hash of its peer id (never 0, which Raft reserves).
pub fn raft_id(peer: &PeerId) -> u64 {
    let h = blake3::hash(&peer.to_bytes());
    u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes")).max(1)
}

/// What the group asks the engine to carry out.
#[derive(Debug)]
pub enum GroupOut {
    /// Send a Raft message to a voter.
    Send { to: PeerId, msg: Vec<u8> },
    /// Persist this before anything that follows it.
    Persist(LeaseLogWrite),
    /// A lease request ended.
    Done { wait: LeaseWait, result: Result<LeaseGrant, LeaseFailure> },
}

/// Status of the group, for `GET /v1/status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LeaseGroupStatus {
    /// The group's id (its founder's Raft id); `None` until this node founds or joins one.
    pub group: Option<u64>,
    pub role: &'static str,
    pub term: u64,
    pub leader: Option<String>,
    pub voters: Vec<String>,
    pub commit: u64,
    pub applied: u64,
    pub leases: usize,
    pub waiting: usize,
}

/// A client's lease request: which lease, the key it guards and what is asked.
#[derive(Debug, Clone)]
pub struct LeaseAsk {
    pub lease: String,
    pub key: Vec<u8>,
    pub request: LeaseRequest,
}

struct Waiting {
    wait: LeaseWait,
    deadline: Instant,
    cmd: Command,
    /// Raft ticks since the command was last handed to Raft; `None` until it first is (that needs
    /// a leader). A proposal a follower forwards to the leader can be lost on the way, and Raft
    /// does not send it again: it is proposed again every [`REPROPOSE_TICKS`] until it commits
    /// (the table drops a second copy).
    proposed: Option<usize>,
}

/// Ticks after which a command not yet committed is proposed again.
const REPROPOSE_TICKS: usize = ELECTION_TICKS;

pub struct LeaseGroup {
    me: u64,
    peer: PeerId,
    raw: RawNode<GroupStorage>,
    table: Table,
    /// Seeds election timeouts: raft-rs draws them from the thread's RNG, which would make a
    /// simulated run depend on more than its seed.
    rng: StdRng,
    /// The election timeout last set, to notice when Raft drew a new one.
    timeout: usize,
    next_id: u64,
    waits: BTreeMap<u64, Waiting>,
    /// Peer ids by Raft id, for everyone this node may send to: voters, and peers it heard from.
    peers: BTreeMap<u64, PeerId>,
    out: VecDeque<GroupOut>,
}

impl LeaseGroup {
    /// The group as an earlier run left it (empty for a new node). `seed` seeds election timeouts.
    pub fn new(peer: PeerId, boot: &LeaseLogBoot, seed: u64) -> Result<LeaseGroup, BootError> {
        let me = raft_id(&peer);
        let storage = GroupStorage::boot(boot)?;
        let table = if storage.is_empty() { Table::new(0) } else { decode_table(&storage.snap) };
        let applied = storage.snapshot_index();
        let raw =
            RawNode::new(&config(me, applied), storage, &logger()).expect("the lease log's configuration is valid");
        let mut rng = StdRng::seed_from_u64(seed ^ me);
        // A proposal is recognised by (proposer, id) when it commits, possibly long after: ids
        // start at a random point in each life, so a command an earlier life proposed is never
        // taken for the answer to a request of this one.
        let next_id = rng.gen::<u64>() & !0xffff_ffff;
        let mut group = LeaseGroup {
            me,
            peer,
            raw,
            table,
            rng,
            timeout: 0,
            next_id,
            waits: BTreeMap::new(),
            peers: BTreeMap::new(),
            out: VecDeque::new(),
        };
        group.peers.insert(me, peer);
        let voters: Vec<(u64, PeerId)> = group.table.voter_peers().collect();
        group.peers.extend(voters);
        group.seed_timeout();
        Ok(group)
    }

    /// Checks that a persisted log can be read back, before a node starts on it.
    pub fn check_boot(boot: &LeaseLogBoot) -> Result<(), BootError> {
        GroupStorage::boot(boot).map(|_| ())
    }

    /// The group this node votes in (its founder's Raft id), once it founded or joined one.
    pub fn group_id(&self) -> Option<u64> {
        (self.table.group != 0).then_some(self.table.group)
    }

    pub fn my_raft_id(&self) -> u64 {
        self.me
    }

    pub fn is_leader(&self) -> bool {
        self.raw.raft.state == StateRole::Leader
    }

    /// The leader's peer id, when known.
    pub fn leader(&self) -> Option<PeerId> {
        let id = self.raw.raft.leader_id;
        (id != raft::INVALID_ID).then(|| self.peers.get(&id).copied()).flatten()
    }

    /// The voters' peer ids.
    pub fn voters(&self) -> Vec<PeerId> {
        self.table.voter_peers().map(|(_, p)| p).collect()
    }

    /// Whether `peer` votes in the group (without decoding every voter's peer id).
    pub fn is_voter(&self, peer: &PeerId) -> bool {
        let bytes = peer.to_bytes();
        self.table.voters.values().any(|v| *v == bytes)
    }

    /// Remembers how to reach a peer that may be (or become) a voter.
    pub fn learn_peer(&mut self, peer: PeerId) {
        self.peers.insert(raft_id(&peer), peer);
    }

    pub fn poll(&mut self) -> Option<GroupOut> {
        self.out.pop_front()
    }

    /// Founds a new group with this node as its only voter.
    pub fn found(&mut self) {
        if self.group_id().is_some() {
            return;
        }
        tracing::info!(
            group = self.me,
            "founding the lease group: no peer reported one, and this primary has the lowest id"
        );
        let mut table = Table::new(self.me);
        table.voters.insert(self.me, self.peer.to_bytes());
        let mut snap = Snapshot::default();
        snap.set_data(table.encode().into());
        let meta = snap.mut_metadata();
        meta.index = 1;
        meta.term = 1;
        meta.mut_conf_state().voters = vec![self.me];
        let mut write = LeaseLogWrite::default();
        let mut storage = GroupStorage::default();
        storage.install(snap, &mut write);
        self.out.push_back(GroupOut::Persist(write));
        self.raw = RawNode::new(&config(self.me, 1), storage, &logger()).expect("a one-voter configuration is valid");
        self.table = table;
        self.seed_timeout();
        // Alone, it need not wait an election timeout to lead.
        let _ = self.raw.campaign();
        self.drive();
    }

    /// Advances Raft's clock by one tick.
    pub fn tick(&mut self) {
        self.raw.tick();
        for w in self.waits.values_mut() {
            if let Some(ticks) = w.proposed.as_mut() {
                *ticks += 1;
            }
        }
        self.propose_waiting();
        self.drive();
    }

    /// A Raft message from `from`, for group `group`.
    pub fn on_message(&mut self, from: PeerId, group: u64, bytes: &[u8]) -> LeaseAnswer {
        let mine = self.table.group;
        // A primary that is joining (group 0) answers the leader before it has the snapshot.
        if mine != 0 && group != 0 && group != mine {
            tracing::debug!(%from, group, mine, "a Raft message of another lease group dropped");
            return self.answer(false);
        }
        let msg = match Message::parse_from_bytes(bytes) {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(%from, error = %e, "a malformed Raft message dropped");
                return self.answer(false);
            }
        };
        // A peer speaks only for itself: a message naming another sender is dropped.
        if msg.from != raft_id(&from) || msg.to != self.me {
            tracing::debug!(%from, "a Raft message with a forged sender or another recipient dropped");
            return self.answer(false);
        }
        self.peers.insert(msg.from, from);
        if let Err(e) = self.raw.step(msg) {
            tracing::debug!(%from, error = %e, "Raft refused a message");
        }
        self.propose_waiting();
        self.drive();
        self.answer(true)
    }

    /// A primary asks to join as a voter; `may_vote` is the engine's judgement of it.
    pub fn on_join(&mut self, peer: PeerId, may_vote: bool) -> LeaseAnswer {
        let id = raft_id(&peer);
        if !self.is_leader() || !may_vote {
            return self.answer(false);
        }
        if self.raw.raft.prs().conf().voters().contains(id) {
            return self.answer(true);
        }
        let proposed = self.change_voter(ConfChangeType::AddNode, id, peer);
        if proposed {
            tracing::info!(%peer, "adding a primary to the lease group");
        }
        self.answer(proposed)
    }

    /// Proposes to remove a voter (a revoked member); only the leader can, one change at a time.
    pub fn remove_voter(&mut self, peer: PeerId) -> bool {
        let id = raft_id(&peer);
        if !self.is_leader() || !self.raw.raft.prs().conf().voters().contains(id) || id == self.me {
            return false;
        }
        let removed = self.change_voter(ConfChangeType::RemoveNode, id, peer);
        if removed {
            tracing::info!(%peer, "removing a revoked member from the lease group");
        }
        removed
    }

    fn change_voter(&mut self, kind: ConfChangeType, id: u64, peer: PeerId) -> bool {
        if self.raw.raft.has_pending_conf() {
            return false;
        }
        let mut cc = ConfChange::default();
        cc.set_change_type(kind);
        cc.node_id = id;
        cc.context = peer.to_bytes().into();
        let ok = self.raw.propose_conf_change(vec![], cc).is_ok();
        self.drive();
        ok
    }

    /// Asks the group to decide a lease request; the answer comes as [`GroupOut::Done`].
    pub fn ask(&mut self, now: Instant, wall_ms: u64, wait: LeaseWait, ask: LeaseAsk, timeout: Duration) {
        if self.waits.len() >= MAX_LEASE_WAITS {
            let reason = format!("{MAX_LEASE_WAITS} lease requests are waiting already; try again later");
            self.out.push_back(GroupOut::Done { wait, result: Err(LeaseFailure::NoQuorum(reason)) });
            return;
        }
        self.next_id = self.next_id.wrapping_add(1);
        let LeaseAsk { lease, key, request } = ask;
        let cmd = Command { proposer: self.me, id: self.next_id, lease, key, request, at_ms: wall_ms };
        self.waits.insert(self.next_id, Waiting { wait, deadline: now + timeout, cmd, proposed: None });
        self.propose_waiting();
        self.drive();
    }

    /// Answers every waiting request with `no_quorum`: the group stops on this node.
    pub fn abandon(&mut self, reason: &str) {
        for (_, w) in std::mem::take(&mut self.waits) {
            let result = Err(LeaseFailure::NoQuorum(reason.to_owned()));
            self.out.push_back(GroupOut::Done { wait: w.wait, result });
        }
    }

    /// The earliest deadline of a waiting request.
    pub fn deadline(&self) -> Option<Instant> {
        self.waits.values().map(|w| w.deadline).min()
    }

    pub fn status(&self) -> LeaseGroupStatus {
        let r = &self.raw.raft;
        LeaseGroupStatus {
            group: self.group_id(),
            role: match r.state {
                StateRole::Leader => "leader",
                StateRole::Candidate | StateRole::PreCandidate => "candidate",
                StateRole::Follower => "follower",
            },
            term: r.term,
            leader: self.leader().map(|p| p.to_string()),
            voters: self.voters().iter().map(|p| p.to_string()).collect(),
            commit: r.raft_log.committed,
            applied: r.raft_log.applied,
            leases: self.table.len(),
            waiting: self.waits.len(),
        }
    }

    fn answer(&self, accepted: bool) -> LeaseAnswer {
        LeaseAnswer {
            group: self.table.group,
            leader: self.leader().map(|p| serde_bytes::ByteBuf::from(p.to_bytes())),
            accepted,
        }
    }

    /// Ends the waits whose deadline passed. Called on every engine tick, not only on Raft's: a
    /// deadline is the caller's, not a multiple of Raft's tick.
    pub fn expire_waits(&mut self, now: Instant) {
        let late: Vec<u64> = self.waits.iter().filter(|(_, w)| w.deadline <= now).map(|(id, _)| *id).collect();
        for id in late {
            let w = self.waits.remove(&id).expect("listed");
            let reason = if w.proposed.is_none() {
                "no leader of the lease group could be reached in time; nothing was proposed".to_owned()
            } else {
                "the request was proposed but a quorum did not commit it in time; it may still take effect".to_owned()
            };
            self.out.push_back(GroupOut::Done { wait: w.wait, result: Err(LeaseFailure::NoQuorum(reason)) });
        }
    }

    /// Hands waiting commands to Raft once a leader is known (a proposal without one is dropped).
    fn propose_waiting(&mut self) {
        if self.raw.raft.leader_id == raft::INVALID_ID || self.group_id().is_none() {
            return;
        }
        for w in self.waits.values_mut() {
            if w.proposed.is_some_and(|ticks| ticks < REPROPOSE_TICKS) {
                continue;
            }
            let data = postcard::to_stdvec(&w.cmd).expect("commands encode");
            if self.raw.propose(vec![], data).is_err() {
                return;
            }
            w.proposed = Some(0);
        }
    }

    /// raft-rs draws a new election timeout from the thread's RNG at every term change; this
    /// replaces it with one from the seeded RNG.
    fn seed_timeout(&mut self) {
        let now = self.raw.raft.randomized_election_timeout();
        if now != self.timeout {
            self.timeout = self.rng.gen_range(ELECTION_TICKS..2 * ELECTION_TICKS);
            self.raw.raft.set_randomized_election_timeout(self.timeout);
        }
    }

    /// Processes Raft's ready: persist, then send, then apply.
    fn drive(&mut self) {
        self.seed_timeout();
        if !self.raw.has_ready() {
            return;
        }
        let mut write = LeaseLogWrite::default();
        let mut rd = self.raw.ready();
        let mut msgs = rd.take_messages();
        if !rd.snapshot().is_empty() {
            let snap = rd.snapshot().clone();
            self.table = decode_table(&snap);
            tracing::info!(
                group = self.table.group,
                index = snap.get_metadata().index,
                "lease group snapshot installed"
            );
            self.raw.mut_store().install(snap, &mut write);
        }
        let mut committed = rd.take_committed_entries();
        self.raw.mut_store().append(rd.entries(), &mut write);
        if let Some(hs) = rd.hs() {
            self.raw.mut_store().set_hard_state(hs.clone(), &mut write);
        }
        msgs.extend(rd.take_persisted_messages());
        let mut light = self.raw.advance(rd);
        if let Some(commit) = light.commit_index() {
            self.raw.mut_store().set_commit(commit, &mut write);
        }
        msgs.extend(light.take_messages());
        committed.extend(light.take_committed_entries());
        if !write.is_empty() {
            self.out.push_back(GroupOut::Persist(write));
        }
        for m in msgs {
            match self.peers.get(&m.to) {
                Some(to) => {
                    let to = *to;
                    self.out.push_back(GroupOut::Send { to, msg: m.write_to_bytes().expect("messages encode") });
                }
                None => tracing::debug!(to = m.to, "no peer id known for a Raft id; message dropped"),
            }
        }
        self.apply(committed);
        self.raw.advance_apply();
        self.seed_timeout();
        // Applying may have proposed nothing new, but a conf change or a campaign can leave more.
        if self.raw.has_ready() {
            self.drive();
        }
    }
}
