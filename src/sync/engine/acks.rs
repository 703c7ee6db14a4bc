//! Writes acknowledged by other nodes (`?ack=N|majority|all`, as Redis `WAIT`): a wait for this
//! node's own seq to be durably applied elsewhere, and the held digest answers that tell it.
//!
//! The writer asks each peer that counts, and lags, with a digest whose `hold_until` names the
//! seq. The peer holds its answer until its store holds this node's ops up to it durably (on disk:
//! peers' ops are applied first and made durable within 100 ms, so a held answer asks for that at
//! once), or [`ACK_HOLD_MAX`] passes; the answer's version vector is the acknowledgement. One
//! digest per peer is out at once, for the highest seq awaited, so concurrent waits share it.

use std::str::FromStr;
use std::time::{Duration, Instant};

use libp2p::PeerId;

use super::{Action, Engine, ReplyId, StoreView};
use crate::ids::Seq;
use crate::wire::SyncResponse;

/// How long a node holds a digest answer that waits for the asker's ops.
pub const ACK_HOLD_MAX: Duration = Duration::from_secs(2);
/// Digest answers held at once at most; beyond it they are answered at once.
const MAX_HELD: usize = 256;
/// Waits for acknowledgements at once at most; beyond it a wait ends at once, unmet.
pub const MAX_ACK_WAITS: usize = 4096;

/// How many other nodes must acknowledge a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckWanted {
    /// This many other nodes.
    Peers(usize),
    /// A majority of the nodes counted (this one included).
    Majority,
    /// Every node counted.
    All,
}

impl FromStr for AckWanted {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "majority" => Ok(AckWanted::Majority),
            "all" => Ok(AckWanted::All),
            n => n
                .parse::<usize>()
                .map(AckWanted::Peers)
                .map_err(|_| format!("ack must be a number of peers, `majority` or `all`, not {n:?}")),
        }
    }
}

impl std::fmt::Display for AckWanted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AckWanted::Peers(n) => write!(f, "{n}"),
            AckWanted::Majority => f.write_str("majority"),
            AckWanted::All => f.write_str("all"),
        }
    }
}

impl AckWanted {
    /// Other nodes needed out of `others` counted.
    fn needed(self, others: usize) -> usize {
        match self {
            AckWanted::Peers(n) => n,
            // A majority of others + 1, less this node.
            AckWanted::Majority => others.div_ceil(2),
            AckWanted::All => others,
        }
    }
}

/// Names a wait for acknowledgements; its end comes as [`Action::Acked`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WaitId(pub u64);

#[derive(Debug)]
struct Wait {
    seq: Seq,
    wanted: AckWanted,
    deadline: Instant,
}

#[derive(Debug)]
struct Held {
    reply: ReplyId,
    peer: PeerId,
    seq: Seq,
    until: Instant,
}

#[derive(Debug, Default)]
pub(super) struct Acks {
    waits: std::collections::BTreeMap<WaitId, Wait>,
    held: Vec<Held>,
    /// When this node last asked for its applied ops to be made durable for a held answer.
    persist_asked: Option<Instant>,
}

/// How long a request to make ops durable for a held answer stands before it is repeated.
const PERSIST_RETRY: Duration = Duration::from_millis(50);

impl Acks {
    /// When a wait or a held answer ends.
    pub fn deadline(&self) -> Option<Instant> {
        let waits = self.waits.values().map(|w| w.deadline);
        waits.chain(self.held.iter().map(|h| h.until)).min()
    }
}

impl Engine {
    pub(super) fn on_await_acks(
        &mut self,
        now: Instant,
        wait: WaitId,
        seq: Seq,
        wanted: AckWanted,
        timeout: Duration,
        store: &dyn StoreView,
    ) {
        if self.acks.waits.len() >= MAX_ACK_WAITS {
            let acked = self.acked(seq, &self.ack_voters(now));
            self.push(Action::Acked { wait, acked, met: false });
            return;
        }
        self.acks.waits.insert(wait, Wait { seq, wanted, deadline: now + timeout });
        self.settle_acks(now);
        self.ask_acks(now, store);
    }

    /// The nodes whose acknowledgement counts: the other certified members in membership mode,
    /// the connected peers of the cluster in open mode.
    fn ack_voters(&self, now: Instant) -> Vec<PeerId> {
        if self.gated() {
            let members = self.members.keys().filter(|p| **p != self.me);
            members.filter(|p| self.certified_role(p, now).is_some()).copied().collect()
        } else {
            self.peers.cluster(&self.cfg.cluster).filter(|(_, p)| p.connected()).map(|(id, _)| *id).collect()
        }
    }

    /// This node's seq as `peer` acknowledged holding it durably: from its answers to digests that
    /// asked it to hold them, never from an ordinary digest (those tell what it applied, which may
    /// not be on its disk yet).
    fn holds_of_mine(&self, peer: &PeerId) -> Seq {
        self.peers.get(peer).map_or(Seq(0), |p| p.acked_mine)
    }

    fn acked(&self, seq: Seq, voters: &[PeerId]) -> usize {
        voters.iter().filter(|p| self.holds_of_mine(p) >= seq).count()
    }

    /// Ends the waits that are met or past their deadline.
    pub(super) fn settle_acks(&mut self, now: Instant) {
        if self.acks.waits.is_empty() {
            return;
        }
        let voters = self.ack_voters(now);
        let mut ended = Vec::new();
        for (id, w) in &self.acks.waits {
            let acked = self.acked(w.seq, &voters);
            let met = acked >= w.wanted.needed(voters.len());
            if met || now >= w.deadline {
                ended.push((*id, acked, met));
            }
        }
        for (wait, acked, met) in ended {
            self.acks.waits.remove(&wait);
            self.push(Action::Acked { wait, acked, met });
        }
    }

    /// Asks each voter that lags behind the highest awaited seq, unless a digest to it is out.
    pub(super) fn ask_acks(&mut self, now: Instant, store: &dyn StoreView) {
        let Some(seq) = self.acks.waits.values().map(|w| w.seq).max() else { return };
        let lagging: Vec<PeerId> = self
            .ack_voters(now)
            .into_iter()
            .filter(|p| self.peers.is_connected(p) && self.holds_of_mine(p) < seq)
            .collect();
        for peer in lagging {
            self.send_digest_holding(now, peer, Some(seq), store);
        }
    }

    /// A peer's digest asks this node to hold its answer until it holds the peer's ops up to `seq`.
    /// `true` when held (answered later by [`Engine::release_held`]).
    pub(super) fn hold_digest(
        &mut self,
        now: Instant,
        peer: PeerId,
        reply: ReplyId,
        seq: Seq,
        store: &dyn StoreView,
    ) -> bool {
        if store.durable_version_vector().get(&peer) >= seq || self.acks.held.len() >= MAX_HELD {
            return false;
        }
        self.acks.held.push(Held { reply, peer, seq, until: now + ACK_HOLD_MAX });
        self.persist_for_held(now, store);
        true
    }

    /// Asks for the applied ops to be made durable when a held answer waits only for that.
    fn persist_for_held(&mut self, now: Instant, store: &dyn StoreView) {
        let applied = store.version_vector();
        if !self.acks.held.iter().any(|h| applied.get(&h.peer) >= h.seq) {
            return;
        }
        if self.acks.persist_asked.is_some_and(|at| now < at + PERSIST_RETRY) {
            return;
        }
        self.acks.persist_asked = Some(now);
        self.push(Action::Persist);
    }

    /// Answers the held digests whose ops are now held (or whose time is up).
    pub(super) fn release_held(&mut self, now: Instant, store: &dyn StoreView) {
        if self.acks.held.is_empty() {
            return;
        }
        let vv = store.durable_version_vector();
        let (done, kept): (Vec<Held>, Vec<Held>) = std::mem::take(&mut self.acks.held)
            .into_iter()
            .partition(|h| vv.get(&h.peer) >= h.seq || now >= h.until || !self.peers.is_connected(&h.peer));
        self.acks.held = kept;
        if done.is_empty() {
            self.persist_for_held(now, store);
            return;
        }
        self.acks.persist_asked = None;
        self.persist_for_held(now, store);
        let mine = self.my_digest(store);
        for h in done {
            self.push(Action::Reply { reply: h.reply, response: SyncResponse::Digest(mine.clone()) });
        }
    }
}
