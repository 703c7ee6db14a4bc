//! The sync engine: every decision of both planes in one sans-I/O state machine.
//!
//! The node's event loop and the simulator (`tests/sim`) both drive this one type. They feed it
//! what happened ([`Input`]: a peer came or went, a message or an answer arrived, a batch was
//! applied, a chunk staged, time passed) with the current time, and carry out what it asks for
//! ([`Action`]: send, answer, serve from the store, publish, report a gossip verdict, apply, stage,
//! install, merge, dial, disconnect, announce). It reads the store only through the narrow
//! [`StoreView`] trait, and it never sleeps, spawns or touches a socket: [`Engine::poll_timeout`]
//! says when it wants a [`Input::Tick`].
//!
//! What it decides, by file (`io` holds the interface: inputs, actions, ids, settings):
//! - `peers`: who is connected and what each advertised; which peers a digest round talks to (a
//!   small fanout, not everyone); whom to dial and whom to drop; which addresses to remember.
//! - `apply`: where each origin's log stands once queued batches commit; duplicates, gaps and the
//!   gap buffer; gossip verdicts.
//! - `pulls`: digests and their schedule, replay pulls and their cursors, readiness.
//! - `snapshot`: replay or snapshot, manifest and chunk pulls, install sequencing.
//! - `repair`: divergence repair by bucket comparison.
//! - `members`: membership certificates, revocations, attestations, the member registry.
//! - `acks`: waits for other nodes to acknowledge this node's writes (`?ack=`).
//!
//! Must never depend on: the network's I/O, the store's internals, the node, a clock or a runtime.

mod acks;
mod apply;
#[cfg(test)]
mod fixed_store;
mod io;
mod leases;
mod members;
mod peers;
mod pulls;
mod repair;
mod snapshot;
mod status;
mod tombstones;

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use cid::Cid;
use libp2p::{Multiaddr, PeerId};
use rand::rngs::StdRng;
use rand::SeedableRng;

use super::{DigestPace, Phase, Readiness, Redial, ReplayPlanner};
use crate::ids::{Origin, Seq};
use crate::op::{OpBatch, Signer};
use crate::snapshot::SnapshotBrief;
use crate::store::VersionVector;
use crate::wire::SyncRequest;

pub use acks::{AckWanted, WaitId, ACK_HOLD_MAX, MAX_ACK_WAITS};
pub use apply::MAX_BATCH_OPS;
pub use io::{
    Action, ChunkVerdict, Count, EngineConfig, Found, GossipId, Input, ProviderKey, ReplyId, ReqId, StoreView, Ticket,
    Verdict,
};
pub use io::{DEFAULT_ATTEST_INTERVAL, DEFAULT_TOMBSTONE_HORIZON};
pub use members::{Membership, MEMBERSHIP_GRACE};
pub use peers::fanout;
pub use status::{AttestationStatus, MemberStatus, MembersStatus, PeerStatus, SnapshotStatus, SyncStatus};

/// Discovery period while a node has fewer peers than it wants, when the configured one is longer.
const SHORT_OF_PEERS_DISCOVERY: Duration = Duration::from_secs(5);

/// A lease message not answered in this time is given up (see [`Engine::timeout_of`]).
const LEASE_MESSAGE_TIMEOUT: Duration = Duration::from_secs(1);

/// Ops asked for in one pull at most.
pub const PULL_MAX_OPS: u32 = 16_384;
/// Op bytes asked for in one pull at most (the response limit is higher, to fit framing).
pub const PULL_MAX_BYTES: u32 = 8 << 20;

/// What one of the engine's requests was for. A digest is `held` when it asked the peer to hold
/// its answer (an acknowledgement).
#[derive(Debug, Clone)]
enum Pending {
    Digest { peer: PeerId, held: bool },
    Pull { peer: PeerId, origin: Origin },
    Manifest { peer: PeerId },
    Chunk { peer: PeerId, index: usize, cid: Cid },
    Buckets { peer: PeerId },
    Entries { peer: PeerId },
    Lease { peer: PeerId },
}

impl Pending {
    fn peer(&self) -> PeerId {
        match self {
            Pending::Digest { peer, .. }
            | Pending::Pull { peer, .. }
            | Pending::Manifest { peer }
            | Pending::Chunk { peer, .. }
            | Pending::Buckets { peer }
            | Pending::Entries { peer }
            | Pending::Lease { peer } => *peer,
        }
    }
}

/// What this node holds and serves, cached from the store: it changes only when a snapshot is made
/// or installed.
#[derive(Debug, Default)]
struct Holdings {
    log_floors: VersionVector,
    snapshot: Option<(Cid, SnapshotBrief)>,
}

pub struct Engine {
    me: PeerId,
    signer: Signer,
    cfg: EngineConfig,
    rng: StdRng,
    actions: VecDeque<Action>,
    next_req: u64,
    /// The engine's requests in flight, and when each was sent (timed out after `request_timeout`).
    requests: BTreeMap<ReqId, (Pending, Instant)>,
    peers: peers::Peers,
    readiness: Readiness,
    /// The phase last announced with [`Action::Phase`].
    announced: Phase,
    planner: ReplayPlanner,
    pace: DigestPace,
    next_digest: Instant,
    next_discovery: Instant,
    /// Bootstrap peers, dialed again while not connected.
    redial: Redial,
    /// Remembered peers, dialed again only while this node has fewer peers than it wants (they
    /// would otherwise add up to a full mesh).
    recall: Redial,
    /// Whether the provider record was announced since the first connection.
    provided: bool,
    apply: apply::Apply,
    snapshot: snapshot::Snapshots,
    repair: repair::Repair,
    holdings: Holdings,
    /// Inbound requests handed to the store and not yet answered.
    serving: usize,
    /// Whose request each of those is.
    serving_for: BTreeMap<ReplyId, PeerId>,
    /// The time of the last input.
    last_now: Instant,
    /// When the engine started: wall time is `cfg.wall_ms_at_start` plus the time since.
    started: Instant,
    /// Verified membership certificates by peer (membership mode), this node's own included.
    members: BTreeMap<PeerId, crate::cert::Certificate>,
    /// Revoked members by peer.
    revoked: BTreeMap<PeerId, crate::cert::Revocation>,
    /// The latest attestation of each peer: vector, root, and when it came (wall ms).
    attestations: BTreeMap<PeerId, tombstones::Heard>,
    /// When this node repeats its attestation next (while active).
    next_attest: Instant,
    /// The greatest stamp this engine asked to collect tombstones up to.
    collect_asked: crate::crdt::Hlc,
    /// Why collection was held back at the last try, if it was.
    holdback: Option<tombstones::Holdback>,
    /// Waits for acknowledgements, and digest answers held for peers' waits.
    acks: acks::Acks,
    /// The lease service's Raft group and what the engine keeps beside it.
    leases: leases::Leases,
}

impl Engine {
    /// A new engine for the node `signer` speaks for, with its store as it is at start.
    pub fn new(signer: Signer, cfg: EngineConfig, store: &dyn StoreView, now: Instant) -> Self {
        let me = signer.origin();
        // A node that was part of a cluster (its store holds other origins' ops) or was told where
        // its peers are waits for them however long it takes: calling itself current on its own
        // could serve stale reads. Only a node that never had peers and relies on mDNS alone goes
        // active after the grace; one with no way to find peers is active at once.
        let had_peers = store.version_vector().0.keys().any(|o| *o != me);
        let discoverable = !cfg.bootstrap.is_empty() || cfg.mdns || !cfg.remembered.is_empty() || had_peers;
        let grace = if cfg.serve_alone {
            Duration::ZERO
        } else if !cfg.bootstrap.is_empty() || had_peers {
            Duration::MAX
        } else {
            cfg.join_grace
        };
        if had_peers && !cfg.serve_alone {
            tracing::info!("this node was part of a cluster: syncing until it has caught up with a peer");
        }
        let recall: Vec<(Multiaddr, Option<PeerId>)> = cfg
            .remembered
            .iter()
            .filter(|(_, peer)| !cfg.bootstrap.iter().any(|(_, p)| *p == Some(*peer)))
            .map(|(a, p)| (a.clone(), Some(*p)))
            .collect();
        let group = (cfg.role == crate::ids::Role::Primary).then(|| {
            crate::sync::leases::LeaseGroup::new(me, &cfg.lease_boot, cfg.seed)
                .expect("the node checks the lease log (LeaseGroup::check_boot) before it starts")
        });
        let mut engine = Engine {
            leases: leases::Leases::new(group, now),
            me,
            signer,
            rng: StdRng::seed_from_u64(cfg.seed),
            actions: VecDeque::new(),
            next_req: 0,
            requests: BTreeMap::new(),
            peers: peers::Peers::default(),
            readiness: Readiness::new(discoverable, grace, now),
            announced: Phase::Joining,
            planner: ReplayPlanner::new(cfg.role, cfg.request_timeout),
            pace: DigestPace::new(cfg.digest_min, cfg.digest_max),
            next_digest: now + cfg.digest_min,
            next_discovery: now + cfg.discovery,
            redial: Redial::new(cfg.bootstrap.iter().cloned(), now),
            recall: Redial::new(recall, now),
            provided: false,
            apply: apply::Apply::new(cfg.gap),
            snapshot: snapshot::Snapshots::default(),
            repair: repair::Repair::default(),
            holdings: Holdings::default(),
            serving: 0,
            serving_for: BTreeMap::new(),
            last_now: now,
            started: now,
            members: BTreeMap::new(),
            attestations: BTreeMap::new(),
            next_attest: now,
            collect_asked: crate::crdt::Hlc::ZERO,
            holdback: None,
            acks: acks::Acks::default(),
            revoked: BTreeMap::new(),
            cfg,
        };
        engine.peers.gated = engine.cfg.membership.is_some();
        if let Some(m) = &engine.cfg.membership {
            engine.members.insert(me, m.cert.clone());
            for r in &engine.cfg.revocations {
                if r.verify(&m.authority).is_ok() {
                    engine.revoked.insert(r.peer, r.clone());
                }
            }
        }
        // Remembered peers are dialed at start like bootstrap peers (which the swarm dials itself).
        for (addr, _) in engine.cfg.remembered.clone() {
            engine.push(Action::Dial { peer: None, addr: Some(addr) });
        }
        engine.refresh_holdings(store);
        engine.check_ready(now, store);
        engine
    }

    pub fn local_peer_id(&self) -> PeerId {
        self.me
    }

    pub fn phase(&self) -> Phase {
        self.readiness.phase()
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// Decides on one input; the actions it leads to are queued for [`Engine::poll_action`].
    pub fn handle(&mut self, now: Instant, input: Input, store: &dyn StoreView) {
        self.last_now = now;
        match input {
            Input::Tick => self.on_tick(now, store),
            Input::Connected { peer, dialed } => self.on_connected(now, peer, dialed, store),
            Input::Disconnected { peer, remaining } => self.on_disconnected(now, peer, remaining, store),
            Input::Identified { peer, agent, listen_addrs } => {
                self.lease_learn_peer(peer);
                self.on_identified(peer, agent, listen_addrs)
            }
            Input::Rtt { peer, rtt } => self.peers.entry(peer).rtt = Some(rtt),
            Input::Discovered { via, peers } => self.on_discovered(via, peers),
            Input::Providers { key, peers } => self.on_providers(key, peers),
            Input::Gossip { id, from, data } => self.on_gossip(now, id, from, data, store),
            Input::Request { peer, reply, request } => self.on_request(now, peer, reply, request, store),
            Input::Served { reply, bytes } => {
                self.serving = self.serving.saturating_sub(1);
                if let Some(peer) = self.serving_for.remove(&reply) {
                    if let Some(p) = self.peers.map.get_mut(&peer) {
                        p.serving = p.serving.saturating_sub(1);
                        p.bytes_budget.0 -= bytes as f64;
                    }
                }
            }
            Input::Response { req, result } => self.on_response(now, req, result, store),
            Input::Applied { ticket, result } => self.on_applied(now, ticket, result, store),
            Input::ApplyFailed { origin } => {
                self.apply.forget(&origin);
                self.plan_pulls(now, store);
            }
            Input::Committed { batches } => self.on_committed(now, batches, store),
            Input::Staged { peer, index, len, verdict } => self.on_staged(now, peer, index, len, verdict, store),
            Input::Installed { result } => self.on_installed(now, result, store),
            Input::Merged { result } => {
                self.repair.merged(now, result.is_ok());
                self.check_ready(now, store);
            }
            Input::SnapshotCreated { cid } => {
                self.refresh_holdings(store);
                self.push(Action::Provide { key: ProviderKey::Snapshot(cid) });
            }
            Input::Revoke { revocation } => {
                if let Err(reason) = self.learn_revocation(revocation, true) {
                    tracing::warn!(%reason, "refused a revocation");
                }
            }
            Input::ServeAlone => {
                tracing::warn!("told to serve alone: active without a peer vouching for this node's state");
                self.readiness.force_active();
                self.check_ready(now, store);
            }
            Input::AwaitAcks { wait, seq, ack, timeout } => self.on_await_acks(now, wait, seq, ack, timeout, store),
            Input::Lease { wait, lease, key, request, timeout } => {
                self.on_lease_ask(now, wait, lease, key, request, timeout)
            }
            Input::LeaseLogFailed { error } => self.lease_log_failed(error),
        }
        self.drain_leases(now);
        // Any input may be the one after which the store holds what a held digest waits for, or
        // after which an acknowledgement's deadline has passed.
        self.release_held(now, store);
        self.settle_acks(now);
    }

    /// The next action to carry out, oldest first.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When the engine wants the next [`Input::Tick`].
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut at = self.next_digest.min(self.next_discovery);
        if let Some(t) = self.readiness.deadline() {
            at = at.min(t);
        }
        if self.gated() {
            // Certificates expire and strangers outstay their grace on a tick.
            at = at.min(self.last_now + Duration::from_secs(1));
        }
        if self.snapshot.is_pulling() {
            // Chunk requests paused on a source resume on a tick.
            at = at.min(self.last_now + self.cfg.digest_min);
        }
        if let Some(t) = self.requests.values().map(|(p, sent)| *sent + self.timeout_of(p)).min() {
            at = at.min(t);
        }
        if let Some(t) = self.acks.deadline() {
            at = at.min(t);
        }
        if let Some(g) = &self.leases.group {
            at = at.min(self.leases.next_tick);
            if let Some(t) = g.deadline() {
                at = at.min(t);
            }
        }
        Some(at)
    }

    /// How long a request may go unanswered. Lease messages are Raft's: it sends again on its own
    /// schedule, so one not answered soon is given up (and stops counting against the peer's
    /// messages in flight) rather than held for the transport's timeout.
    fn timeout_of(&self, pending: &Pending) -> Duration {
        match pending {
            Pending::Lease { .. } => self.cfg.request_timeout.min(LEASE_MESSAGE_TIMEOUT),
            _ => self.cfg.request_timeout,
        }
    }

    fn push(&mut self, action: Action) {
        self.actions.push_back(action);
    }

    fn count(&mut self, what: Count, n: u64) {
        if n > 0 {
            self.push(Action::Count { what, n });
        }
    }

    fn send(&mut self, now: Instant, peer: PeerId, request: SyncRequest, pending: Pending) -> ReqId {
        self.next_req += 1;
        let req = ReqId(self.next_req);
        self.requests.insert(req, (pending, now));
        self.push(Action::Send { peer, req, request });
        req
    }

    /// Re-reads the log floors and the latest snapshot.
    fn refresh_holdings(&mut self, store: &dyn StoreView) {
        self.holdings = Holdings { log_floors: store.log_floors(), snapshot: store.latest_snapshot() };
    }

    fn on_tick(&mut self, now: Instant, store: &dyn StoreView) {
        // Requests that outlived their deadline failed: the transport reports them too, but the
        // engine does not rely on it to move on.
        let expired: Vec<ReqId> = self
            .requests
            .iter()
            .filter(|(_, (pending, sent))| now.duration_since(*sent) >= self.timeout_of(pending))
            .map(|(r, _)| *r)
            .collect();
        for req in expired {
            self.on_response(now, req, Err("timed out".into()), store);
        }
        self.police_members(now);
        if now >= self.next_discovery {
            self.discovery_round(now);
            // Short of peers (a node that just joined through one bootstrap peer): look again soon.
            let short = self.peers.cluster_count(&self.cfg.cluster) < self.cfg.target_peers;
            let every = if short { self.cfg.discovery.min(SHORT_OF_PEERS_DISCOVERY) } else { self.cfg.discovery };
            self.next_discovery = now + every;
        }
        if now >= self.next_digest {
            self.digest_round(now, store);
        }
        self.drive_snapshot(now, store);
        self.check_ready(now, store);
        self.lease_round(now);
        self.tombstone_round(now, store);
    }

    /// Discovery: announce the provider record once someone can store it, and look for more peers
    /// of the cluster only while this node has fewer than it wants.
    fn discovery_round(&mut self, _now: Instant) {
        let connected = self.peers.connected_count();
        if connected == 0 {
            return;
        }
        if !self.provided {
            self.provided = true;
            self.push(Action::Provide { key: ProviderKey::Cluster });
            if let Some((cid, _)) = self.holdings.snapshot.clone() {
                self.push(Action::Provide { key: ProviderKey::Snapshot(cid) });
            }
        }
        if self.peers.cluster_count(&self.cfg.cluster) < self.cfg.target_peers {
            self.push(Action::FindProviders { key: ProviderKey::Cluster });
        }
    }

    /// Publishes the ops committed here. Batches that continue one another (commits that queued up
    /// while the loop was busy) go out as one message, up to the gossip size limit and
    /// `MAX_BATCH_OPS`: under load there are fewer, larger messages rather than more of them.
    fn on_committed(&mut self, now: Instant, batches: Vec<std::sync::Arc<OpBatch>>, store: &dyn StoreView) {
        // Room for the message's envelope, role and signed head around the ops.
        let budget = self.cfg.max_gossip_bytes.saturating_sub(1024);
        let mut joined: Vec<(OpBatch, usize)> = Vec::new();
        for batch in batches {
            let size = batch.ops_bytes();
            if let Some((last, last_size)) = joined.last_mut() {
                if *last_size + size <= budget
                    && last.ops.len() + batch.ops.len() <= MAX_BATCH_OPS
                    && last.append(&batch)
                {
                    *last_size += size;
                    continue;
                }
            }
            joined.push(((*batch).clone(), size));
        }
        for (batch, _) in joined {
            let message = crate::wire::GossipMessage::Ops { role: self.cfg.role, batch };
            self.push(Action::Publish { data: crate::wire::encode_gossip(&message) });
        }
        if !self.readiness.is_active() {
            self.check_ready(now, store);
        }
    }

    /// Status for `GET /v1/status`.
    pub fn status(&self, now: Instant, store: &dyn StoreView) -> SyncStatus {
        status::status(self, now, store)
    }

    /// Seq the engine considers `origin`'s log to stand at: committed, or queued to commit.
    pub fn cursor(&self, origin: &Origin, store: &dyn StoreView) -> Seq {
        self.apply.cursor(origin, store).seq
    }

    /// Ops held in the gap buffer now.
    pub fn buffered_ops(&self) -> usize {
        self.apply.buffered_ops()
    }

    /// The lease group's status (primaries only).
    pub fn lease_status(&self) -> Option<crate::sync::leases::LeaseGroupStatus> {
        self.leases.group.as_ref().map(|g| g.status())
    }

    /// Outbound requests in flight, inbound requests being served, apply tickets outstanding: each
    /// bounded by the configuration; the simulator checks it.
    pub fn queue_sizes(&self) -> (usize, usize, usize) {
        (self.requests.len(), self.serving, self.apply.in_flight())
    }
}
