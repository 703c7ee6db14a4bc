//! The engine's interface with its executor: what it reads of the store ([`StoreView`]), what it is
//! told ([`Input`]), what it asks for ([`Action`]), the ids both sides name things by, and its
//! settings ([`EngineConfig`]).

use std::time::Duration;

use cid::Cid;
use libp2p::{Multiaddr, PeerId};

use super::{AckWanted, Membership, WaitId};
use crate::crdt::{Hlc, LeaseGrant, LeaseRequest};
use crate::ids::{Origin, Role, Seq, StateRoot};
use crate::op::{ChainHash, OpBatch};
use crate::snapshot::{ChunkRef, SignedManifest, SnapshotBrief, StateEntry};
use crate::store::{LeaseLogBoot, LeaseLogWrite, OriginProgress, VersionVector};
use crate::sync::leases::{LeaseFailure, LeaseWait};
use crate::sync::{GapLimits, Phase};
use crate::wire::{SyncRequest, SyncResponse};

/// What the engine reads of the store. Every method is a cheap read of committed state.
pub trait StoreView {
    fn version_vector(&self) -> VersionVector;
    /// The state root and the vector it is at, read together.
    fn state_root(&self) -> (StateRoot, VersionVector);
    /// Where `origin`'s committed log stands.
    fn progress(&self, origin: &Origin) -> OriginProgress;
    /// Per origin, the highest seq compacted out of the log (origins at 0 left out).
    fn log_floors(&self) -> VersionVector;
    /// The newest snapshot this node holds and serves.
    fn latest_snapshot(&self) -> Option<(Cid, SnapshotBrief)>;
    /// Whether a verified chunk with this CID is held.
    fn has_chunk(&self, cid: &Cid) -> bool;
    /// The state root's bucket hashes, in bucket order.
    fn bucket_hashes(&self) -> Vec<[u8; 32]>;
    /// The greatest HLC this node issued or observed: every op it writes later is stamped after
    /// it. Read before the version vector when the two are paired.
    fn clock(&self) -> Hlc;
    /// The stamp up to which tombstones were collected.
    fn tombstones_collected(&self) -> Hlc;
    /// The vector of what is on disk (survives a crash): at most [`StoreView::version_vector`].
    /// Peers' ops are applied before they are durable (see `store::memtable`); a store that makes
    /// every op durable as it applies it keeps the default.
    fn durable_version_vector(&self) -> VersionVector {
        self.version_vector()
    }
}

/// Names an outbound request the engine made; the executor maps it to its transport's id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReqId(pub u64);

/// Names an inbound request to answer; chosen by the executor, which keeps the reply channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReplyId(pub u64);

/// Names a received gossip message; chosen by the executor. Every one gets exactly one verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GossipId(pub u64);

/// Names an [`Action::Apply`]; its outcome comes back as [`Input::Applied`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ticket(pub u64);

/// A gossip message's fate, as gossipsub wants it reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Valid: forward it.
    Accept,
    /// Invalid: do not forward, penalise the sender.
    Reject,
    /// Not judged (overload): neither forward nor penalise.
    Ignore,
}

/// Kademlia provider keys the engine announces and looks up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProviderKey {
    /// Every node of the cluster provides it: how sync-capable peers are found.
    Cluster,
    /// Holders of a snapshot provide its CID.
    Snapshot(Cid),
}

/// What became of a received chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkVerdict {
    /// It matched its CID and is persisted.
    Stored,
    /// It did not match its CID or the manifest: the source lied or is broken.
    Corrupt,
    /// It could not be persisted here (storage error): not the source's fault.
    LocalError,
}

/// How peers were found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    Mdns,
    Kademlia,
}

/// Something that happened, for the engine to decide on.
#[derive(Debug)]
pub enum Input {
    /// Time passed: run what is due (digest rounds, discovery, timeouts, redials).
    Tick,
    /// A connection to `peer` opened; `dialed` is the address when this node dialed it.
    Connected { peer: PeerId, dialed: Option<Multiaddr> },
    /// A connection to `peer` closed; `remaining` connections are left.
    Disconnected { peer: PeerId, remaining: u32 },
    /// Identify told us what `peer` is: `(role, cluster)` for a peersync node, `None` otherwise.
    Identified { peer: PeerId, agent: Option<(Role, String)>, listen_addrs: Vec<Multiaddr> },
    /// A ping measured the round trip to `peer`.
    Rtt { peer: PeerId, rtt: Duration },
    /// Discovery found these peers.
    Discovered { via: Found, peers: Vec<(PeerId, Option<Multiaddr>)> },
    /// A Kademlia lookup found providers of a key.
    Providers { key: ProviderKey, peers: Vec<PeerId> },
    /// A gossip message arrived through `from`.
    Gossip { id: GossipId, from: PeerId, data: Vec<u8> },
    /// A peer's request.
    Request { peer: PeerId, reply: ReplyId, request: SyncRequest },
    /// Wait until `ack` other nodes have durably applied this node's ops up to `seq`, or
    /// `timeout` passes; the end comes as [`Action::Acked`].
    AwaitAcks { wait: WaitId, seq: Seq, ack: AckWanted, timeout: Duration },
    /// A request handed out by [`Action::Serve`] was answered with `bytes` of payload
    /// ([`SyncResponse::payload_len`]).
    Served { reply: ReplyId, bytes: u64 },
    /// The answer to one of the engine's requests, or why there is none (timeout, disconnect...).
    Response { req: ReqId, result: Result<SyncResponse, String> },
    /// The batches of an [`Action::Apply`] were verified and queued to the writer, or refused.
    Applied { ticket: Ticket, result: Result<(), String> },
    /// A queued batch of `origin` did not commit: its log stands where the store says.
    ApplyFailed { origin: Origin },
    /// This node committed local ops: publish them.
    Committed { batches: Vec<std::sync::Arc<OpBatch>> },
    /// A chunk handed out by [`Action::Stage`] was checked (and persisted when good).
    Staged { peer: PeerId, index: usize, len: u64, verdict: ChunkVerdict },
    /// The snapshot handed out by [`Action::Install`] was installed, or not.
    Installed { result: Result<(), String> },
    /// The entries handed out by [`Action::Merge`] were merged, or failed to.
    Merged { result: Result<(), String> },
    /// This node made a snapshot.
    SnapshotCreated { cid: Cid },
    /// The operator says this node may serve alone: active now, whatever its peers.
    ServeAlone,
    /// The operator hands in a revocation signed by the cluster's authority.
    Revoke { revocation: crate::cert::Revocation },
    /// A client's lease request; the answer comes as [`Action::LeaseDone`] within `timeout`.
    Lease { wait: LeaseWait, lease: String, key: Vec<u8>, request: LeaseRequest, timeout: Duration },
    /// An [`Action::PersistLeaseLog`] failed: the lease group must stop on this node.
    LeaseLogFailed { error: String },
}

/// Something for the executor to carry out.
#[derive(Debug)]
pub enum Action {
    /// Send a request; its answer comes back as [`Input::Response`] with `req`.
    Send { peer: PeerId, req: ReqId, request: SyncRequest },
    /// Answer an inbound request now.
    Reply { reply: ReplyId, response: SyncResponse },
    /// Answer an inbound request from the store (see [`super::serve`]), then report
    /// [`Input::Served`].
    Serve { reply: ReplyId, peer: PeerId, request: SyncRequest },
    /// Publish encoded bytes on the cluster's gossip topic.
    Publish { data: Vec<u8> },
    /// Make every op applied so far durable: a held digest answer (an acknowledgement) waits for
    /// it. The input after the durable commit releases it.
    Persist,
    /// Report a gossip message's verdict.
    Verdict { id: GossipId, verdict: Verdict },
    /// Verify these contiguous batches of `origin` and queue them to the writer, in order with
    /// every earlier `Apply`. `prev` is the chain hash before the first; `None` means the one the
    /// store holds at `batches[0].after` once the earlier batches of that origin are committed.
    Apply { ticket: Ticket, origin: Origin, batches: Vec<OpBatch>, prev: Option<ChainHash> },
    /// Check a received chunk against its manifest entry and persist it into the staging of
    /// `snapshot`; `durable` asks for a commit that survives a crash.
    Stage { peer: PeerId, snapshot: Cid, index: usize, chunk: ChunkRef, bytes: Vec<u8>, durable: bool },
    /// Install the staged snapshot.
    Install { manifest: SignedManifest },
    /// Merge a peer's state entries with the CRDT joins.
    Merge { peer: PeerId, entries: Vec<StateEntry> },
    /// Drop the register tombstones stamped at or before `through`: no write they could still win
    /// over can arrive (see `engine::tombstones`).
    CollectTombstones { through: Hlc },
    /// Delete held chunks that are not in `keep` (left by abandoned pulls).
    CollectChunks { keep: Vec<Cid> },
    /// Dial a peer (by id, through known addresses) or an address.
    Dial { peer: Option<PeerId>, addr: Option<Multiaddr> },
    /// Close every connection to a peer.
    Disconnect { peer: PeerId },
    /// A wait of [`Input::AwaitAcks`] ended: `acked` other nodes hold the ops, and `met` says
    /// whether that is as many as asked (otherwise its timeout passed).
    Acked { wait: WaitId, acked: usize, met: bool },
    /// Let gossip flow to and from a peer, or stop it (a peer without a membership certificate).
    Gossip { peer: PeerId, allow: bool },
    /// Announce this node as a provider of a key.
    Provide { key: ProviderKey },
    /// Look up the providers of a key.
    FindProviders { key: ProviderKey },
    /// The phase changed.
    Phase { phase: Phase },
    /// The peers worth redialing after a restart changed: persist them.
    RememberPeers { addrs: Vec<Multiaddr> },
    /// The revocations this node holds changed: persist them all.
    PersistRevocations { all: Vec<crate::cert::Revocation> },
    /// Something worth counting happened.
    Count { what: Count, n: u64 },
    /// Persist this change of the lease service's Raft log durably. Lease messages
    /// ([`SyncRequest::Lease`]) the engine asks to send after it must not leave before it is
    /// durable; on failure report [`Input::LeaseLogFailed`].
    PersistLeaseLog { write: LeaseLogWrite },
    /// A lease request of [`Input::Lease`] ended.
    LeaseDone { wait: LeaseWait, result: Result<LeaseGrant, LeaseFailure> },
}

/// What [`Action::Count`] counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Count {
    GossipRejected,
    ReplayRejected,
    GapOverflow,
    OpsReplayed,
    Divergence,
    SnapshotInstalled,
    ChunkRejected,
    /// Digest requests this node sent.
    DigestsSent,
    /// Requests of peers answered with `busy`.
    RequestsShed,
    /// Requests of peers received, digests included.
    RequestsReceived,
    /// Digest requests of peers received.
    DigestsReceived,
    /// Gossip messages ignored for overload.
    GossipIgnored,
}

/// Settings of the engine. Defaults are the node's; tests shorten the intervals.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub role: Role,
    pub cluster: String,
    /// Bootstrap addresses, dialed at start and again while their peer is not connected, each with
    /// the peer it names.
    pub bootstrap: Vec<(Multiaddr, Option<PeerId>)>,
    /// Peers this node knew before it restarted (see [`Action::RememberPeers`]): dialed again.
    pub remembered: Vec<(Multiaddr, PeerId)>,
    /// Whether mDNS discovery is on.
    pub mdns: bool,
    /// The operator said the node may serve alone (no peer needed to become active).
    pub serve_alone: bool,
    /// A node that can find peers but has none, never had any and has no bootstrap address is
    /// active by itself after this long.
    pub join_grace: Duration,
    /// Discovery period: provider records, lookups while short of peers.
    pub discovery: Duration,
    pub digest_min: Duration,
    pub digest_max: Duration,
    /// A request not answered in this time has failed.
    pub request_timeout: Duration,
    /// Chunk requests in flight per source while pulling a snapshot.
    pub chunks_per_source: usize,
    /// Ops of replay a snapshot must spare before it is pulled when replay could do.
    pub snapshot_min_saving: u64,
    pub gap: GapLimits,
    /// Largest gossip payload accepted.
    pub max_gossip_bytes: usize,
    /// Cluster peers this node keeps connections to when it can choose; below it, it looks for more.
    pub target_peers: usize,
    /// Connections kept at most: extra ones are closed at the next digest round, and beyond twice
    /// as many a new one at once (bootstrap peers excepted).
    pub max_peers: usize,
    /// Inbound requests served from the store at once; more are answered `busy`.
    pub max_serving: usize,
    /// Payload bytes served to one peer per second, on average; a peer past it (and past a burst
    /// of four seconds' worth) is answered `rate_limited` until its budget refills.
    pub serve_bytes_per_sec: u64,
    /// Apply tickets outstanding at once; gossip beyond it is ignored and left to replay.
    pub max_applying: usize,
    /// Seeds the engine's random choices (the random digest target, whom to dial).
    pub seed: u64,
    /// The cluster's authority and this node's certificate: membership is enforced. `None` is open
    /// mode: anyone who names the cluster may join.
    pub membership: Option<Membership>,
    /// Revocations persisted by an earlier run.
    pub revocations: Vec<crate::cert::Revocation>,
    /// The wall clock (ms since the Unix epoch) at the `now` given to [`Engine::new`]; certificate
    /// validity is judged against it plus the monotonic time since.
    pub wall_ms_at_start: u64,
    /// The lease service's Raft log as persisted by an earlier run (empty for a new node).
    pub lease_boot: LeaseLogBoot,
    /// Raft's clock: heartbeats every 2 ticks, elections after 10 to 20.
    pub lease_tick: Duration,
    /// A primary that finds no lease group waits this long after it starts before it founds one
    /// (see `sync::leases`).
    pub lease_found_after: Duration,
    /// How often an active node repeats its attestation (vector, root, clock).
    pub attest_interval: Duration,
    /// A member not heard from for this long no longer holds tombstone collection back.
    pub tombstone_horizon: Duration,
}

/// Default of [`EngineConfig::attest_interval`].
pub const DEFAULT_ATTEST_INTERVAL: Duration = Duration::from_secs(10);
/// Default of [`EngineConfig::tombstone_horizon`].
pub const DEFAULT_TOMBSTONE_HORIZON: Duration = Duration::from_secs(3600);

impl EngineConfig {
    pub fn new(role: Role, cluster: impl Into<String>) -> Self {
        EngineConfig {
            role,
            cluster: cluster.into(),
            bootstrap: Vec::new(),
            remembered: Vec::new(),
            mdns: false,
            serve_alone: false,
            join_grace: Duration::from_secs(5),
            discovery: Duration::from_secs(30),
            digest_min: Duration::from_millis(250),
            digest_max: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            chunks_per_source: 8,
            snapshot_min_saving: 100_000,
            gap: GapLimits::default(),
            max_gossip_bytes: 64 * 1024,
            target_peers: 8,
            max_peers: 24,
            max_serving: 64,
            serve_bytes_per_sec: 256 << 20,
            max_applying: 1024,
            seed: 0,
            membership: None,
            revocations: Vec::new(),
            wall_ms_at_start: 0,
            lease_boot: LeaseLogBoot::default(),
            lease_tick: Duration::from_millis(100),
            lease_found_after: Duration::from_secs(3),
            attest_interval: DEFAULT_ATTEST_INTERVAL,
            tombstone_horizon: DEFAULT_TOMBSTONE_HORIZON,
        }
    }
}
