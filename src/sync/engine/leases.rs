//! The engine's part in the lease service (see [`crate::sync::leases`]): when a primary founds a
//! group or asks to join one, whom the leader admits or removes, Raft's clock, and carrying the
//! group's messages, log writes and answers out as actions.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use libp2p::PeerId;

use super::{Action, Engine, Pending};
use crate::crdt::LeaseRequest;
use crate::ids::Role;
use crate::sync::leases::{
    raft_id, GroupOut, LeaseAsk, LeaseFailure, LeaseGroup, LeaseWait, ELECTION_TICKS, MAX_MESSAGES_IN_FLIGHT,
};
use crate::wire::{LeaseAnswer, LeaseMessage, SyncRequest, SyncResponse};

/// A primary outside a group asks to join this often.
const JOIN_EVERY: Duration = Duration::from_secs(1);

/// The engine's lease state besides the group itself.
pub(super) struct Leases {
    /// The Raft group; `None` on replicas, which neither vote nor grant.
    pub group: Option<LeaseGroup>,
    pub next_tick: Instant,
    next_join: Instant,
    /// The leader a join answer named, asked next.
    leader_hint: Option<PeerId>,
    /// Raft messages in flight per peer.
    in_flight: BTreeMap<PeerId, usize>,
    /// A group some primary reported (by digest or answer) while this node was in none: once a
    /// group is known to exist, this node only ever joins it, however long it is cut off from
    /// its members. Founding a second group would let two groups grant the same lease.
    heard_of: Option<u64>,
    /// A primary of the cluster with a lower Raft id was seen: this node leaves founding to it
    /// (or to another), for good. Only a primary that never saw a lower one founds.
    saw_lower: bool,
}

impl Leases {
    pub fn new(group: Option<LeaseGroup>, now: Instant) -> Self {
        Leases {
            group,
            next_tick: now,
            next_join: now,
            leader_hint: None,
            in_flight: BTreeMap::new(),
            heard_of: None,
            saw_lower: false,
        }
    }

    pub fn group_id(&self) -> Option<u64> {
        self.group.as_ref().and_then(LeaseGroup::group_id)
    }
}

impl Engine {
    /// A client's lease request (primaries only; the node refuses it on replicas).
    pub(super) fn on_lease_ask(
        &mut self,
        now: Instant,
        wait: LeaseWait,
        lease: String,
        key: Vec<u8>,
        request: LeaseRequest,
        timeout: Duration,
    ) {
        let wall = self.wall_ms(now);
        match self.leases.group.as_mut() {
            Some(g) => g.ask(now, wall, wait, LeaseAsk { lease, key, request }, timeout),
            None => {
                let reason = "this node is a replica: leases are granted by the primaries".to_owned();
                self.push(Action::LeaseDone { wait, result: Err(LeaseFailure::NoQuorum(reason)) });
            }
        }
    }

    /// A peer's lease message; answered at once.
    pub(super) fn on_lease_message(&mut self, peer: PeerId, reply: super::ReplyId, msg: LeaseMessage) {
        let primary =
            self.peers.get(&peer).and_then(|p| p.role()) == Some(Role::Primary) && !self.revoked.contains_key(&peer);
        let answer = match self.leases.group.as_mut() {
            None => LeaseAnswer { group: 0, leader: None, accepted: false },
            // Only primaries vote: a replica's Raft messages could only disturb the group.
            Some(g) if !primary => {
                let mut a = g.on_join(peer, false);
                a.accepted = false;
                a
            }
            Some(g) => match msg {
                LeaseMessage::Raft { group, msg } => g.on_message(peer, group, &msg),
                LeaseMessage::Join { group } if Some(group) == g.group_id() => g.on_join(peer, true),
                LeaseMessage::Join { .. } => g.on_join(peer, false),
            },
        };
        self.push(Action::Reply { reply, response: SyncResponse::Lease(answer) });
    }

    /// The answer to a join request: the leader it names is asked next.
    pub(super) fn on_lease_answer(&mut self, peer: PeerId, answer: Result<SyncResponse, String>) {
        if let Some(n) = self.leases.in_flight.get_mut(&peer) {
            *n = n.saturating_sub(1);
        }
        if let Ok(SyncResponse::Lease(a)) = answer {
            if a.group != 0 && self.leases.group_id().is_none() {
                self.leases.heard_of = Some(a.group);
            }
            if let Some(leader) = a.leader.and_then(|b| PeerId::from_bytes(&b).ok()) {
                if leader != self.me {
                    self.leases.leader_hint = Some(leader);
                }
            }
        }
    }

    /// Raft's clock, founding and joining, and removing revoked voters.
    pub(super) fn lease_round(&mut self, now: Instant) {
        let Some(group) = self.leases.group.as_mut() else { return };
        let tick = self.cfg.lease_tick;
        group.expire_waits(now);
        // After a pause (SIGSTOP, a stalled machine) time jumps: ticks beyond two election
        // timeouts change nothing more.
        let mut ticks = 0;
        while now >= self.leases.next_tick && ticks < 2 * ELECTION_TICKS {
            group.tick();
            ticks += 1;
            self.leases.next_tick += tick;
        }
        if now >= self.leases.next_tick {
            self.leases.next_tick = now + tick;
        }
        if group.group_id().is_none() {
            self.join_or_found(now);
        } else if group.is_leader() && !self.revoked.is_empty() {
            let revoked: Vec<PeerId> = group.voters().into_iter().filter(|p| self.revoked.contains_key(p)).collect();
            if let Some(peer) = revoked.first() {
                if let Some(g) = self.leases.group.as_mut() {
                    g.remove_voter(*peer);
                }
            }
        }
    }

    fn join_or_found(&mut self, now: Instant) {
        let cluster = self.cfg.cluster.clone();
        // A digest counts only if it came on the current connection: one kept from before (when
        // the peer was in no group yet) says nothing of now. And every connected peer must be
        // known, as a primary or not, before this node may found.
        let fresh = |p: &super::peers::Peer| matches!((p.digest_at, p.connected_at), (Some(d), Some(c)) if d >= c);
        let unknown = self.peers.map.values().any(|p| p.connected() && p.meta.is_none() && !fresh(p));
        let connected_primaries: Vec<(PeerId, Option<u64>, bool)> = self
            .peers
            .map
            .iter()
            .filter(|(_, p)| p.connected() && p.in_cluster(&cluster) && p.role() == Some(Role::Primary))
            .map(|(id, p)| (*id, p.digest.as_ref().and_then(|d| d.lease_group), fresh(p)))
            .collect();
        let me = raft_id(&self.me);
        let lower_primary = self
            .peers
            .map
            .iter()
            .any(|(id, p)| p.in_cluster(&cluster) && p.role() == Some(Role::Primary) && raft_id(id) < me);
        self.leases.saw_lower |= lower_primary;
        if let Some((peer, group)) = connected_primaries.iter().find_map(|(id, g, _)| g.map(|g| (*id, g))) {
            self.leases.heard_of = Some(group);
            if now < self.leases.next_join {
                return;
            }
            self.leases.next_join = now + JOIN_EVERY;
            let target = self.leases.leader_hint.take().filter(|l| self.peers.get(l).is_some_and(|p| p.connected()));
            let target = target.unwrap_or(peer);
            tracing::debug!(%target, group, "asking to join the lease group");
            self.send_lease(now, target, LeaseMessage::Join { group });
            return;
        }
        if self.leases.heard_of.is_some() || self.leases.saw_lower {
            return; // wait to reach a member of the group, or for the lower one to found it
        }
        let waited = now.saturating_duration_since(self.started);
        if waited < self.cfg.lease_found_after {
            return;
        }
        let bootstrap_up = self
            .cfg
            .bootstrap
            .iter()
            .filter_map(|(_, p)| *p)
            .all(|p| p == self.me || self.peers.get(&p).is_some_and(|x| x.connected()));
        // Never without them, however long they stay away: two primaries cut off from each other
        // would each found a group, and two groups can grant the same lease.
        if !bootstrap_up {
            return;
        }
        // Every connected primary must have told us (by a digest on this connection) that it is
        // in no group.
        let defer = unknown || connected_primaries.iter().any(|(_, _, seen)| !seen);
        if !defer {
            if let Some(g) = self.leases.group.as_mut() {
                g.found();
            }
        }
    }

    fn send_lease(&mut self, now: Instant, peer: PeerId, msg: LeaseMessage) {
        let n = self.leases.in_flight.entry(peer).or_default();
        if *n >= MAX_MESSAGES_IN_FLIGHT {
            return;
        }
        *n += 1;
        self.send(now, peer, SyncRequest::Lease(msg), Pending::Lease { peer });
    }

    /// Carries out what the group asked for.
    pub(super) fn drain_leases(&mut self, now: Instant) {
        loop {
            let Some(out) = self.leases.group.as_mut().and_then(LeaseGroup::poll) else { return };
            match out {
                GroupOut::Send { to, msg } => {
                    let group = self.leases.group_id().unwrap_or(0);
                    self.send_lease(now, to, LeaseMessage::Raft { group, msg });
                }
                GroupOut::Persist(write) => self.push(Action::PersistLeaseLog { write }),
                GroupOut::Done { wait, mut result } => {
                    // A node that learns late of its own command's commit (it was cut off from the
                    // leader) may find the lease it granted already over: it is not handed to the
                    // client as a grant, which the client would take as current.
                    let wall = self.wall_ms(now);
                    if result.as_ref().is_ok_and(|g| g.holder.is_some() && g.expires_at_ms <= wall) {
                        let reason = "the grant was committed, but this node learned of it only after the lease had \
                                      expired; ask again";
                        result = Err(LeaseFailure::NoQuorum(reason.to_owned()));
                    }
                    self.push(Action::LeaseDone { wait, result });
                }
            }
        }
    }

    /// Peers that may become voters are remembered by Raft id, so messages can reach them.
    pub(super) fn lease_learn_peer(&mut self, peer: PeerId) {
        if let Some(g) = self.leases.group.as_mut() {
            g.learn_peer(peer);
        }
    }

    /// The lease log could not be persisted: the group stops here, rather than send messages
    /// that promise what the disk does not hold.
    pub(super) fn lease_log_failed(&mut self, error: String) {
        let Some(mut g) = self.leases.group.take() else { return };
        tracing::error!(%error, "the lease log could not be written: this node stops voting and granting leases until it restarts");
        g.abandon("this node's lease log could not be written; ask another primary");
        while let Some(out) = g.poll() {
            if let GroupOut::Done { wait, result } = out {
                self.push(Action::LeaseDone { wait, result });
            }
        }
    }
}
