//! The engine target's executor (see `fuzz_targets/engine.rs`): a configuration, a starting store
//! and a sequence of inputs chosen by `arbitrary`, played against `peersync::sync::Engine` with a
//! tiny in-memory `StoreView`, checking the engine's bounds and answer discipline after every input.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crate::fixtures::{self, root_of, Chain, Snapshot, CHAIN_LEN};
use cid::Cid;
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libp2p::{Multiaddr, PeerId};
use peersync::cert::{Certificate, Revocation};
use peersync::crdt::Hlc;
use peersync::ids::{Origin, Role, Seq, StateRoot};
use peersync::op::{OpBatch, Signer};
use peersync::snapshot::{ChunkRef, SignedManifest, SnapshotBrief, StateEntry};
use peersync::store::{OriginProgress, VersionVector};
use peersync::sync::{
    Action, ChunkVerdict, Engine, EngineConfig, Found, GapLimits, GossipId, Input, Membership, ProviderKey, ReplyId,
    ReqId, StoreView, Ticket,
};
use peersync::wire::{Attestation, Attested, Digest, GossipMessage, SyncRequest, SyncResponse};
use serde_bytes::ByteBuf;

const CLUSTER: &str = "c";
/// Peers that can connect: P0, P1 (primaries), P2 (a replica), P3 (a stranger: no certificate).
const PEERS: usize = 4;
/// Origins of fixture chains: P0, P1, P2 and this node.
const ORIGINS: usize = 4;
const ME: usize = 3;
/// Wall clock at the engine's start; certificates are valid for ten days from there.
const WALL_START_MS: u64 = 1_700_000_000_000;
const VALID_MS: u64 = 10 * 86_400_000;
/// Monotonic time never runs further than this past the start (a century): huge steps saturate.
const MAX_ELAPSED: Duration = Duration::from_secs(100 * 365 * 86_400);
/// Inputs played at most per run.
const MAX_STEPS: usize = 200;

struct World {
    me: Signer,
    peers: [PeerId; PEERS],
    signers: Vec<Signer>,
    /// Chains of P0, P1, P2 and this node, by origin index.
    chains: Vec<Chain>,
    addrs: Vec<Multiaddr>,
    /// Valid certificates: P0, P1 primaries, P2 replica, none for P3.
    certs: [Option<Certificate>; PEERS],
    /// This node's own certificate, as a primary and as a replica.
    my_certs: [Certificate; 2],
    /// Certificates that must not admit their bearer: P1's expired one, P3's from another authority,
    /// P0's certificate with a forged role.
    bad_certs: Vec<Certificate>,
    /// Revocations: P1 after seq 10, P2 after seq 0 (authority's), P0 by another authority, P1 again
    /// after seq 30 (a later cut).
    revocations: Vec<Revocation>,
    /// Snapshots: by P0 (primary) at {P0: 20, P1: 12}; by P2 (a replica) at {P0: 40, P1: 40}; by P1,
    /// empty, at {P1: 5}.
    snapshots: Vec<Snapshot>,
    /// State entries a repair could return.
    entries: Vec<ByteBuf>,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let me = fixtures::signer_of(100);
        let signers: Vec<Signer> = (0..PEERS as u8).map(|i| fixtures::signer_of(10 + i)).collect();
        let peers: [PeerId; PEERS] = std::array::from_fn(|i| signers[i].origin());
        let chains: Vec<Chain> =
            [&signers[0], &signers[1], &signers[2], &me].iter().map(|s| Chain::new(s, CHAIN_LEN)).collect();
        let addrs = (0..PEERS).map(|i| format!("/ip4/127.0.0.1/tcp/{}", 4001 + i).parse().unwrap()).collect();
        let valid =
            |peer: PeerId, role: Role, serial: u64| fixtures::cert(peer, role, 0, WALL_START_MS + VALID_MS, serial);
        let certs = [
            Some(valid(peers[0], Role::Primary, 1)),
            Some(valid(peers[1], Role::Primary, 2)),
            Some(valid(peers[2], Role::Replica, 3)),
            None,
        ];
        let my_certs = [valid(me.origin(), Role::Primary, 9), valid(me.origin(), Role::Replica, 10)];
        let mut forged = valid(peers[0], Role::Primary, 1);
        forged.role = Role::Replica;
        let bad_certs = vec![
            fixtures::cert(peers[1], Role::Primary, 0, WALL_START_MS - 1, 4),
            fixtures::foreign_cert(peers[3], Role::Primary),
            forged,
        ];
        let auth = crate::authority_key();
        let revocations = vec![
            Revocation::issue(auth, peers[1], Seq(10), WALL_START_MS),
            Revocation::issue(auth, peers[2], Seq(0), WALL_START_MS),
            Revocation::issue(&crate::key(201), peers[0], Seq(0), WALL_START_MS),
            Revocation::issue(auth, peers[1], Seq(30), WALL_START_MS),
        ];
        let snapshots = vec![
            Snapshot::new(&signers[0], CLUSTER, &[(0, 20), (1, 12)], &chains, 24, 256),
            Snapshot::new(&signers[2], CLUSTER, &[(0, 40), (1, 40)], &chains, 6, 1 << 20),
            Snapshot::new(&signers[1], CLUSTER, &[(1, 5)], &chains, 0, 1 << 20),
        ];
        let entries = (0..4u8)
            .map(|i| {
                let e = StateEntry {
                    kind: peersync::snapshot::Kind::Register,
                    collection: "r".into(),
                    key: vec![i],
                    value: vec![i; 3],
                };
                ByteBuf::from(postcard::to_stdvec(&e).unwrap())
            })
            .collect();
        World { me, peers, signers, chains, addrs, certs, my_certs, bad_certs, revocations, snapshots, entries }
    })
}

fn base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

fn origin(i: u8) -> Origin {
    let w = world();
    w.chains[i as usize % ORIGINS].origin
}

fn peer(i: u8) -> PeerId {
    world().peers[i as usize % PEERS]
}

// ---------------------------------------------------------------------------------------------
// What the fuzzer chooses.

#[derive(Arbitrary, Debug)]
pub struct Scenario {
    pub knobs: Knobs,
    pub store: StoreInit,
    pub steps: Vec<Step>,
}

#[derive(Arbitrary, Debug)]
pub struct Knobs {
    pub membership: bool,
    pub replica: bool,
    pub max_serving: u8,
    pub max_applying: u8,
    pub gap_ops: u8,
    pub gap_bytes: u16,
    pub max_peers: u8,
    pub target_peers: u8,
    pub chunks_per_source: u8,
    pub request_timeout_s: u8,
    pub digest_min_ms: u16,
    pub digest_max_s: u8,
    pub discovery_s: u8,
    pub join_grace_ms: u16,
    pub snapshot_min_saving: u16,
    pub max_gossip_bytes: u16,
    pub mdns: bool,
    pub serve_alone: bool,
    pub bootstrap: Vec<(u8, bool)>,
    pub remembered: Vec<u8>,
    pub revocations: Vec<u8>,
    pub seed: u64,
}

#[derive(Arbitrary, Debug)]
pub struct StoreInit {
    pub progress: Vec<(u8, u8)>,
    pub floors: Vec<(u8, u8)>,
    pub diverged: bool,
    pub snapshot: Option<u8>,
    pub buckets: u8,
}

#[derive(Arbitrary, Debug)]
pub enum Step {
    /// Connect, identify as a primary of the cluster, let a digest round pass.
    Join {
        peer: u8,
        agent: u8,
    },
    /// Answer the `which`th outstanding request as an honest peer would.
    Honest {
        which: u8,
        t: u8,
    },
    /// The executor does everything owed honestly: applies, commits, stages, installs, serves.
    Execute,
    Connect {
        peer: u8,
        dialed: bool,
    },
    Disconnect {
        peer: u8,
        remaining: u8,
    },
    Identify {
        peer: u8,
        agent: u8,
        addrs: u8,
    },
    Rtt {
        peer: u8,
        ms: u16,
    },
    Discover {
        peers: Vec<u8>,
        kad: bool,
    },
    Providers {
        peers: Vec<u8>,
        snapshot: Option<u8>,
    },
    GossipRaw {
        from: u8,
        data: Vec<u8>,
    },
    GossipOps {
        from: u8,
        ops: OpsSpec,
        replica_claim: bool,
    },
    GossipAttestation {
        from: u8,
        att: AttSpec,
    },
    GossipRevocation {
        from: u8,
        which: u8,
    },
    RequestDigest {
        peer: u8,
        digest: DigestSpec,
    },
    RequestOther {
        peer: u8,
        kind: u8,
        a: u8,
        b: u16,
    },
    RequestRaw {
        peer: u8,
        bytes: Vec<u8>,
    },
    Served {
        which: u8,
        bogus: bool,
    },
    Respond {
        which: u8,
        response: RespSpec,
    },
    RespondBogus {
        req: u16,
        response: RespSpec,
    },
    Applied {
        which: u8,
        ok: Judge,
    },
    AppliedBogus {
        ticket: u16,
        ok: bool,
    },
    Commit {
        which: u8,
    },
    ApplyFailed {
        origin: u8,
    },
    Committed {
        n: u8,
    },
    Staged {
        which: u8,
        verdict: Judge,
        len: Option<u32>,
    },
    StagedBogus {
        peer: u8,
        index: u8,
        len: u32,
        verdict: u8,
    },
    Installed {
        ok: Judge,
    },
    Merged {
        ok: bool,
    },
    SnapshotCreated {
        which: u8,
    },
    ServeAlone,
    Revoke {
        which: u8,
    },
    Status,
    Tick {
        step: TimeStep,
    },
}

/// How the executor judges what it was asked to do.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Judge {
    /// As a real executor would (genuine batches verify, chunks are checked against their ref...).
    Honest,
    /// Success, whatever it was.
    Ok,
    /// Failure, whatever it was.
    Fail,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum TimeStep {
    Millis(u16),
    Secs(u16),
    Huge(u64),
    /// To the engine's next deadline (`poll_timeout`).
    Deadline,
}

#[derive(Arbitrary, Debug)]
pub struct OpsSpec {
    pub origin: u8,
    pub after: u8,
    pub sizes: Vec<u8>,
    pub corrupt: Corrupt,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Corrupt {
    None,
    /// A head signed by another key.
    BadSignature,
    /// An op's bytes replaced by garbage.
    BadOp(u8),
    /// `after` says something else than the ops and head.
    After(u64),
    /// No ops, the genuine head.
    Empty,
    /// More ops than a batch may hold.
    TooMany,
    /// The last batch's head from another origin.
    OtherOrigin(u8),
}

#[derive(Arbitrary, Debug)]
pub struct AttSpec {
    pub peer: u8,
    pub other_cluster: bool,
    pub vv: Vec<(u8, u8)>,
    pub root: Option<u8>,
    pub bad_signature: bool,
}

#[derive(Arbitrary, Debug)]
pub struct DigestSpec {
    pub other_cluster: bool,
    pub replica: bool,
    pub vv: Vec<(u8, u8)>,
    /// `None`: the root its vector has; otherwise another one.
    pub root: Option<u8>,
    pub floors: Vec<(u8, u8)>,
    /// Index of a fixture snapshot to advertise (the last index names an unknown CID).
    pub snapshot: Option<u8>,
    pub brief: bool,
    pub cert: CertSpec,
    pub members: Vec<u8>,
    pub revocations: Vec<u8>,
}

#[derive(Arbitrary, Debug)]
pub enum CertSpec {
    None,
    /// The sender's own valid certificate (none for the stranger).
    Own,
    /// Another peer's valid certificate.
    Other(u8),
    /// A certificate that must not admit anyone.
    Bad(u8),
    Garbage(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
pub enum RespSpec {
    /// What a well-behaved peer would answer to the request (tweaked by the byte).
    Fitting(u8),
    Digest(DigestSpec),
    Ops(OpsSpec),
    Manifest {
        snapshot: u8,
        garbage: bool,
    },
    Chunk {
        snapshot: u8,
        index: u8,
        flip: bool,
    },
    Buckets {
        differ: u8,
        wrong_len: bool,
    },
    Entries {
        n: u8,
        garbage: bool,
    },
    Error {
        code: u8,
    },
    /// The transport failed (timeout, connection closed).
    Failed,
    /// Arbitrary bytes through the CBOR codec; nothing is fed when they do not decode.
    Raw(Vec<u8>),
}

// ---------------------------------------------------------------------------------------------
// The store the engine reads.

struct MemStore {
    progress: BTreeMap<Origin, OriginProgress>,
    floors: VersionVector,
    diverged: bool,
    latest: Option<(Cid, SnapshotBrief)>,
    chunks: BTreeSet<Cid>,
    buckets: usize,
}

impl MemStore {
    fn root(&self) -> StateRoot {
        let mut root = root_of(&self.version_vector());
        if self.diverged {
            root.0[0] ^= 1;
        }
        root
    }

    /// Commits batches that continue the log (what the writer does with a verified apply).
    fn commit(&mut self, origin: Origin, batches: &[OpBatch]) -> bool {
        let cur = self.progress(&origin).seq;
        let (Some(first), Some(last)) = (batches.first(), batches.last()) else { return false };
        if first.after > cur || last.head.seq <= cur {
            return false;
        }
        self.progress.insert(origin, OriginProgress { seq: last.head.seq, chain: last.head.head });
        true
    }

    fn install(&mut self, snapshot: &Snapshot) {
        for (o, s) in &snapshot.manifest.version_vector.0 {
            if self.progress(o).seq < *s {
                let chain = snapshot.manifest.heads[o];
                self.progress.insert(*o, OriginProgress { seq: *s, chain });
            }
        }
        self.latest = Some((snapshot.cid, snapshot.brief()));
        self.diverged = false;
    }
}

impl StoreView for MemStore {
    fn version_vector(&self) -> VersionVector {
        VersionVector(self.progress.iter().filter(|(_, p)| p.seq > Seq::ZERO).map(|(o, p)| (*o, p.seq)).collect())
    }

    fn state_root(&self) -> (StateRoot, VersionVector) {
        (self.root(), self.version_vector())
    }

    fn progress(&self, origin: &Origin) -> OriginProgress {
        self.progress.get(origin).copied().unwrap_or_default()
    }

    fn log_floors(&self) -> VersionVector {
        self.floors.clone()
    }

    fn latest_snapshot(&self) -> Option<(Cid, SnapshotBrief)> {
        self.latest.clone()
    }

    fn has_chunk(&self, cid: &Cid) -> bool {
        self.chunks.contains(cid)
    }

    fn clock(&self) -> Hlc {
        Hlc::default()
    }

    fn tombstones_collected(&self) -> Hlc {
        Hlc::default()
    }

    fn bucket_hashes(&self) -> Vec<[u8; 32]> {
        let root = self.root();
        (0..self.buckets as u32)
            .map(|i| {
                let mut h = blake3::Hasher::new();
                h.update(&root.0);
                h.update(&i.to_be_bytes());
                *h.finalize().as_bytes()
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// The executor.

struct Harness<'a> {
    /// Sees every action the engine asks for (tests use it to check what a scenario reaches).
    observe: &'a mut dyn FnMut(&Action),
    engine: Engine,
    store: MemStore,
    elapsed: Duration,
    next_reply: u64,
    next_gossip: u64,
    /// Requests the engine sent and nobody answered yet: (req, peer, request).
    sent: Vec<(ReqId, PeerId, SyncRequest)>,
    /// Inbound requests handed out with `Serve`.
    serving: Vec<ReplyId>,
    answered: BTreeSet<ReplyId>,
    verdicts: BTreeSet<GossipId>,
    applies: Vec<(Ticket, Origin, Vec<OpBatch>)>,
    /// Applies reported as verified, waiting to commit.
    queued: Vec<(Origin, Vec<OpBatch>)>,
    stages: Vec<(PeerId, usize, ChunkRef, Vec<u8>)>,
    installs: Vec<SignedManifest>,
    /// Inputs the executor owes the engine (connections it closed).
    owed: Vec<Input>,
}

fn clamp(v: u8, lo: usize, hi: usize) -> usize {
    lo + v as usize % (hi - lo + 1)
}

fn build_config(k: &Knobs) -> EngineConfig {
    let w = world();
    let role = if k.replica { Role::Replica } else { Role::Primary };
    let mut cfg = EngineConfig::new(role, CLUSTER);
    cfg.max_serving = clamp(k.max_serving, 1, 8);
    cfg.max_applying = clamp(k.max_applying, 1, 16);
    cfg.gap = GapLimits { max_ops: clamp(k.gap_ops, 1, 128), max_bytes: 1 + k.gap_bytes as usize * 16 };
    cfg.max_peers = clamp(k.max_peers, 1, 6);
    cfg.target_peers = clamp(k.target_peers, 1, 6);
    cfg.chunks_per_source = clamp(k.chunks_per_source, 1, 4);
    cfg.request_timeout = Duration::from_secs(1 + k.request_timeout_s as u64 % 60);
    cfg.digest_min = Duration::from_millis(1 + k.digest_min_ms as u64 % 2_000);
    cfg.digest_max = cfg.digest_min + Duration::from_secs(k.digest_max_s as u64 % 30);
    cfg.discovery = Duration::from_secs(1 + k.discovery_s as u64 % 60);
    cfg.join_grace = Duration::from_millis(k.join_grace_ms as u64);
    cfg.snapshot_min_saving = k.snapshot_min_saving as u64 % 64;
    cfg.max_gossip_bytes = 1024 + k.max_gossip_bytes as usize;
    cfg.mdns = k.mdns;
    cfg.serve_alone = k.serve_alone;
    cfg.bootstrap = k
        .bootstrap
        .iter()
        .take(4)
        .map(|(p, named)| (w.addrs[*p as usize % PEERS].clone(), named.then(|| peer(*p))))
        .collect();
    cfg.remembered = k.remembered.iter().take(4).map(|p| (w.addrs[*p as usize % PEERS].clone(), peer(*p))).collect();
    cfg.seed = k.seed;
    cfg.wall_ms_at_start = WALL_START_MS;
    if k.membership {
        let cert = w.my_certs[k.replica as usize].clone();
        cfg.membership = Some(Membership { authority: crate::authority(), cert });
        cfg.revocations =
            k.revocations.iter().take(4).map(|i| w.revocations[*i as usize % w.revocations.len()].clone()).collect();
    }
    cfg
}

fn build_store(s: &StoreInit) -> MemStore {
    let w = world();
    let mut store = MemStore {
        progress: BTreeMap::new(),
        floors: VersionVector::default(),
        diverged: s.diverged,
        latest: None,
        chunks: BTreeSet::new(),
        buckets: [1, 16, 600][s.buckets as usize % 3],
    };
    for (o, seq) in s.progress.iter().take(ORIGINS) {
        let chain = &w.chains[*o as usize % ORIGINS];
        let seq = *seq as u64 % (CHAIN_LEN + 1);
        store.progress.insert(chain.origin, OriginProgress { seq: Seq(seq), chain: chain.chains[seq as usize] });
    }
    for (o, seq) in s.floors.iter().take(ORIGINS) {
        let o = origin(*o);
        let seq = (*seq as u64 % (CHAIN_LEN + 1)).min(store.progress(&o).seq.0);
        if seq > 0 {
            store.floors.0.insert(o, Seq(seq));
        }
    }
    if let Some(i) = s.snapshot {
        let snap = &w.snapshots[i as usize % w.snapshots.len()];
        store.latest = Some((snap.cid, snap.brief()));
        store.chunks.extend(snap.chunks.iter().map(|(r, _)| r.cid));
    }
    store
}

fn vv_of(pairs: &[(u8, u8)]) -> VersionVector {
    VersionVector(
        pairs
            .iter()
            .take(ORIGINS)
            .filter(|(_, s)| !(*s as u64).is_multiple_of(CHAIN_LEN + 1))
            .map(|(o, s)| (origin(*o), Seq(*s as u64 % (CHAIN_LEN + 1))))
            .collect(),
    )
}

fn make_digest(from: PeerId, spec: &DigestSpec) -> Digest {
    let w = world();
    let version_vector = vv_of(&spec.vv);
    let mut state_root = root_of(&version_vector);
    if let Some(b) = spec.root {
        state_root.0[1] ^= b | 1;
    }
    let log_floors =
        VersionVector(vv_of(&spec.floors).0.into_iter().filter(|(o, s)| *s <= version_vector.get(o)).collect());
    let (snapshots, snapshot_brief) = match spec.snapshot {
        None => (vec![], None),
        Some(i) => match w.snapshots.get(i as usize % (w.snapshots.len() + 1)) {
            Some(s) => (vec![s.cid], spec.brief.then(|| s.brief())),
            None => (vec![peersync::op::raw_cid(b"no such snapshot")], None),
        },
    };
    let idx = w.peers.iter().position(|p| *p == from);
    let cert_bytes = |c: &Certificate| ByteBuf::from(c.encode());
    let cert = match &spec.cert {
        CertSpec::None => None,
        CertSpec::Own => idx.and_then(|i| w.certs[i].as_ref()).map(cert_bytes),
        CertSpec::Other(i) => w.certs[*i as usize % PEERS].as_ref().map(cert_bytes),
        CertSpec::Bad(i) => Some(cert_bytes(&w.bad_certs[*i as usize % w.bad_certs.len()])),
        CertSpec::Garbage(b) => Some(ByteBuf::from(b.clone())),
    };
    let members = spec
        .members
        .iter()
        .take(8)
        .filter_map(|i| {
            let i = *i as usize % (PEERS + w.bad_certs.len() + 2);
            if i < PEERS {
                w.certs[i].as_ref().map(cert_bytes)
            } else if i < PEERS + w.bad_certs.len() {
                Some(cert_bytes(&w.bad_certs[i - PEERS]))
            } else {
                Some(cert_bytes(&w.my_certs[i - PEERS - w.bad_certs.len()]))
            }
        })
        .collect();
    let revocations = spec
        .revocations
        .iter()
        .take(4)
        .map(|i| ByteBuf::from(w.revocations[*i as usize % w.revocations.len()].encode()))
        .collect();
    Digest {
        cluster: if spec.other_cluster { "other".into() } else { CLUSTER.into() },
        role: if spec.replica { Role::Replica } else { Role::Primary },
        version_vector,
        state_root,
        log_floors,
        snapshots,
        snapshot_brief,
        cert,
        members,
        revocations,
        hold_until: None,
        lease_group: None,
    }
}

/// Batches of a fixture chain from `after`, of the given sizes, then corrupted as asked.
fn make_batches(spec: &OpsSpec, default_origin: Option<Origin>) -> (Origin, Vec<OpBatch>) {
    let w = world();
    let chain = match default_origin {
        Some(o) if spec.origin.is_multiple_of(2) => w.chains.iter().find(|c| c.origin == o),
        _ => None,
    }
    .unwrap_or(&w.chains[spec.origin as usize % ORIGINS]);
    let mut after = spec.after as u64 % (CHAIN_LEN + 1);
    let mut batches = Vec::new();
    let sizes: Vec<u64> =
        if spec.sizes.is_empty() { vec![1] } else { spec.sizes.iter().take(8).map(|s| 1 + *s as u64 % 16).collect() };
    for n in sizes {
        let Some(b) = chain.batch(after, n) else { break };
        after = b.head.seq.0;
        batches.push(b);
    }
    if let Some(last) = batches.last_mut() {
        match spec.corrupt {
            Corrupt::None => {}
            Corrupt::BadSignature => {
                last.head.signature = w.signers[3].sign_head(last.head.seq, last.head.head).signature;
            }
            Corrupt::BadOp(b) => {
                let i = b as usize % last.ops.len();
                last.ops[i] = ByteBuf::from(vec![b; 1 + b as usize % 9]);
            }
            Corrupt::After(a) => last.after = Seq(a),
            Corrupt::Empty => last.ops.clear(),
            Corrupt::TooMany => {
                let op = last.ops[0].clone();
                last.ops = vec![op; peersync::sync::MAX_BATCH_OPS + 1];
                last.after = Seq(last.head.seq.0.saturating_sub(last.ops.len() as u64));
            }
            Corrupt::OtherOrigin(o) => {
                let other = &w.chains[o as usize % ORIGINS];
                let s = last.head.seq.0.min(CHAIN_LEN) as usize;
                last.head = other.heads[s.max(1)].clone();
            }
        }
    }
    (chain.origin, batches)
}

impl Harness<'_> {
    fn now(&self) -> Instant {
        base() + self.elapsed
    }

    fn feed(&mut self, input: Input) {
        let now = self.now();
        self.engine.handle(now, input, &self.store);
        self.drain();
        self.check_bounds();
        // Connections the executor closed on the engine's word.
        while let Some(input) = self.owed.pop() {
            self.engine.handle(now, input, &self.store);
            self.drain();
            self.check_bounds();
        }
    }

    fn drain(&mut self) {
        while let Some(action) = self.engine.poll_action() {
            (self.observe)(&action);
            match action {
                Action::Send { peer, req, request } => {
                    assert!(!self.sent.iter().any(|(r, _, _)| *r == req), "request id {req:?} handed out twice");
                    self.sent.push((req, peer, request));
                    if self.sent.len() > 512 {
                        self.sent.remove(0);
                    }
                }
                Action::Reply { reply, .. } => self.answer(reply),
                Action::Serve { reply, .. } => {
                    self.answer(reply);
                    self.serving.push(reply);
                }
                Action::Publish { data } => {
                    peersync::wire::decode_gossip(&data, usize::MAX).expect("what the engine publishes decodes");
                }
                Action::Verdict { id, .. } => {
                    assert!(id.0 < self.next_gossip, "a verdict on gossip {id:?} that never arrived");
                    assert!(self.verdicts.insert(id), "gossip {id:?} got two verdicts");
                }
                Action::Apply { ticket, origin, batches, .. } => {
                    assert!(!batches.is_empty(), "an apply without batches");
                    for b in &batches {
                        assert_eq!(b.head.origin, origin, "an apply of {origin} holds a batch of another origin");
                    }
                    for pair in batches.windows(2) {
                        assert_eq!(pair[0].head.seq, pair[1].after, "an apply's batches are not contiguous");
                    }
                    self.applies.push((ticket, origin, batches));
                }
                Action::Stage { peer, index, chunk, bytes, .. } => self.stages.push((peer, index, chunk, bytes)),
                Action::Install { manifest } => self.installs.push(manifest),
                Action::CollectChunks { keep } => self.store.chunks.retain(|c| keep.contains(c)),
                Action::Disconnect { peer } => self.owed.push(Input::Disconnected { peer, remaining: 0 }),
                Action::Merge { .. }
                | Action::Dial { .. }
                | Action::Gossip { .. }
                | Action::Provide { .. }
                | Action::FindProviders { .. }
                | Action::Phase { .. }
                | Action::RememberPeers { .. }
                | Action::PersistRevocations { .. }
                | Action::Count { .. }
                | Action::Acked { .. }
                | Action::PersistLeaseLog { .. }
                | Action::LeaseDone { .. }
                | Action::CollectTombstones { .. }
                | Action::Persist => {}
            }
        }
        // Bound the executor's own bookkeeping.
        if self.applies.len() > 4096 {
            self.applies.drain(..2048);
        }
        if self.stages.len() > 256 {
            self.stages.drain(..128);
        }
        if self.queued.len() > 256 {
            self.queued.drain(..128);
        }
    }

    fn answer(&mut self, reply: ReplyId) {
        assert!(reply.0 < self.next_reply, "an answer to request {reply:?} that never arrived");
        assert!(self.answered.insert(reply), "request {reply:?} answered twice");
    }

    fn check_bounds(&self) {
        let e = &self.engine;
        let c = e.config();
        let (out, serving, applying) = e.queue_sizes();
        // The simulator's bounds, with every fixture origin counted as a primary.
        let out_bound = c.max_peers.max(PEERS) * (1 + c.chunks_per_source) + ORIGINS + 24;
        let apply_bound = c.max_applying + c.gap.max_ops + ORIGINS + 1;
        assert!(out <= out_bound, "{out} requests out, bound {out_bound}");
        assert!(serving <= c.max_serving, "{serving} requests being served, max_serving {}", c.max_serving);
        assert!(applying <= apply_bound, "{applying} apply tickets out, bound {apply_bound}");
        let buffered = e.buffered_ops();
        assert!(buffered <= c.gap.max_ops, "{buffered} ops buffered, over {:?}", c.gap);
    }

    fn disconnect_failures(&mut self, peer: PeerId) {
        // The transport fails a closed connection's requests.
        let (failed, kept): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.sent).into_iter().partition(|(_, p, _)| *p == peer);
        self.sent = kept;
        for (req, _, _) in failed {
            self.feed(Input::Response { req, result: Err("connection closed".into()) });
        }
    }

    fn response(
        &self,
        request: Option<(&PeerId, &SyncRequest)>,
        spec: &RespSpec,
    ) -> Option<Result<SyncResponse, String>> {
        let w = world();
        Some(Ok(match spec {
            RespSpec::Fitting(t) => return Some(self.fitting(request, *t)),
            RespSpec::Digest(d) => SyncResponse::Digest(make_digest(*request.map_or(&w.peers[0], |r| r.0), d)),
            RespSpec::Ops(ops) => {
                let asked = match request {
                    Some((_, SyncRequest::GetOps { origin, .. })) => Some(*origin),
                    _ => None,
                };
                SyncResponse::Ops(make_batches(ops, asked).1)
            }
            RespSpec::Manifest { snapshot, garbage } => {
                let s = &w.snapshots[*snapshot as usize % w.snapshots.len()];
                let mut bytes = s.bytes.clone();
                if *garbage {
                    let i = (*snapshot as usize) % bytes.len();
                    bytes[i] ^= 0x5a;
                }
                SyncResponse::Manifest(bytes)
            }
            RespSpec::Chunk { snapshot, index, flip } => {
                let s = &w.snapshots[*snapshot as usize % w.snapshots.len()];
                let mut bytes = match s.chunks.get(*index as usize % s.chunks.len().max(1)) {
                    Some((_, b)) => b.clone(),
                    None => vec![*index; 8],
                };
                if *flip {
                    let i = *index as usize % bytes.len();
                    bytes[i] ^= 1;
                }
                SyncResponse::Chunk(bytes)
            }
            RespSpec::Buckets { differ, wrong_len } => {
                let mut hashes: Vec<u8> = self.store.bucket_hashes().concat();
                for k in 0..*differ as usize {
                    let at = (k * 97 * 32) % hashes.len().max(1);
                    if let Some(b) = hashes.get_mut(at) {
                        *b ^= 0xff;
                    }
                }
                if *wrong_len {
                    hashes.push(0);
                }
                SyncResponse::Buckets(hashes)
            }
            RespSpec::Entries { n, garbage } => {
                let mut entries: Vec<ByteBuf> = w.entries.iter().cycle().take(*n as usize % 9).cloned().collect();
                if *garbage {
                    entries.push(ByteBuf::from(vec![0xff, 0xff, 0xff]));
                }
                SyncResponse::Entries(entries)
            }
            RespSpec::Error { code } => SyncResponse::Error {
                code: ["busy", "compacted", "wrong_cluster", "not_a_member", "rate_limited", "x"][*code as usize % 6]
                    .into(),
                message: "refused".into(),
            },
            RespSpec::Failed => return Some(Err("timed out".into())),
            RespSpec::Raw(bytes) => crate::read_response(bytes).ok()?,
        }))
    }

    /// What an honest peer would answer.
    fn fitting(&self, request: Option<(&PeerId, &SyncRequest)>, t: u8) -> Result<SyncResponse, String> {
        let w = world();
        let Some((from, request)) = request else { return Err("no request".into()) };
        Ok(match request {
            SyncRequest::Digest(_) => {
                // The peer's digest: at the top of every chain but this node's, its certificate.
                let i = w.peers.iter().position(|p| p == from).unwrap_or(0);
                let mut vv: Vec<(u8, u8)> = (0..3).map(|o| (o, (CHAIN_LEN as u8).saturating_sub(t % 8 * o))).collect();
                vv.truncate(1 + t as usize % 3);
                SyncResponse::Digest(make_digest(
                    *from,
                    &DigestSpec {
                        other_cluster: false,
                        replica: i == 2,
                        vv,
                        root: None,
                        floors: if t & 0x10 != 0 { vec![(0, 30), (1, 30)] } else { vec![] },
                        snapshot: (t & 0x20 != 0).then_some(t >> 6),
                        brief: true,
                        cert: CertSpec::Own,
                        members: vec![0, 1, 2],
                        revocations: vec![],
                    },
                ))
            }
            SyncRequest::GetOps { origin, after, max_ops, .. } => {
                let Some(chain) = w.chains.iter().find(|c| c.origin == *origin) else {
                    return Ok(SyncResponse::Ops(vec![]));
                };
                let per = 1 + t as u64 % 8;
                let mut batches = Vec::new();
                let mut at = after.0;
                while let Some(b) = chain.batch(at, per.min(*max_ops as u64).max(1)) {
                    at = b.head.seq.0;
                    batches.push(b);
                    if batches.len() >= 6 {
                        break;
                    }
                }
                SyncResponse::Ops(batches)
            }
            SyncRequest::GetManifest { cid } => match w.snapshots.iter().find(|s| s.cid == *cid) {
                Some(s) => SyncResponse::Manifest(s.bytes.clone()),
                None => SyncResponse::Error { code: "not_found".into(), message: "no such snapshot".into() },
            },
            SyncRequest::GetChunk { cid } => {
                match w.snapshots.iter().flat_map(|s| &s.chunks).find(|(r, _)| r.cid == *cid) {
                    Some((_, b)) => SyncResponse::Chunk(b.clone()),
                    None => SyncResponse::Error { code: "not_found".into(), message: "no such chunk".into() },
                }
            }
            SyncRequest::GetBuckets => {
                let mut hashes = self.store.bucket_hashes().concat();
                let at = t as usize * 32 % hashes.len().max(1);
                if let Some(b) = hashes.get_mut(at) {
                    *b ^= 1;
                }
                SyncResponse::Buckets(hashes)
            }
            SyncRequest::GetEntries { .. } => {
                SyncResponse::Entries(w.entries.iter().take(t as usize % 5).cloned().collect())
            }
            // This node is no voter of the fixture's lease group.
            SyncRequest::Lease(_) => {
                SyncResponse::Error { code: "not_a_voter".into(), message: "no lease group here".into() }
            }
        })
    }

    fn step(&mut self, step: &Step) {
        let w = world();
        match step {
            Step::Join { peer: p, agent } => {
                self.step(&Step::Connect { peer: *p, dialed: true });
                self.step(&Step::Identify { peer: *p, agent: if agent % 4 == 0 { *agent } else { 1 }, addrs: 1 });
                self.step(&Step::Tick { step: TimeStep::Deadline });
            }
            Step::Honest { which, t } => self.step(&Step::Respond { which: *which, response: RespSpec::Fitting(*t) }),
            Step::Execute => {
                for _ in 0..self.applies.len() {
                    self.step(&Step::Applied { which: 0, ok: Judge::Honest });
                }
                for _ in 0..self.queued.len() {
                    self.step(&Step::Commit { which: 0 });
                }
                for _ in 0..self.stages.len() {
                    self.step(&Step::Staged { which: 0, verdict: Judge::Honest, len: None });
                }
                if !self.installs.is_empty() {
                    self.step(&Step::Installed { ok: Judge::Honest });
                }
                for _ in 0..self.serving.len() {
                    self.step(&Step::Served { which: 0, bogus: false });
                }
            }
            Step::Connect { peer: p, dialed } => {
                let p = peer(*p);
                let dialed = dialed.then(|| w.addrs[w.peers.iter().position(|x| *x == p).unwrap()].clone());
                self.feed(Input::Connected { peer: p, dialed });
            }
            Step::Disconnect { peer: p, remaining } => {
                let p = peer(*p);
                let remaining = *remaining as u32 % 3;
                self.feed(Input::Disconnected { peer: p, remaining });
                if remaining == 0 {
                    self.disconnect_failures(p);
                }
            }
            Step::Identify { peer: p, agent, addrs } => {
                let agent = match agent % 5 {
                    0 => None,
                    1 => Some((Role::Primary, CLUSTER.to_owned())),
                    2 => Some((Role::Replica, CLUSTER.to_owned())),
                    3 => Some((Role::Primary, "other".to_owned())),
                    _ => Some((Role::Replica, String::new())),
                };
                let mut listen_addrs: Vec<Multiaddr> =
                    (0..*addrs as usize % 4).map(|i| w.addrs[(*p as usize + i) % PEERS].clone()).collect();
                if addrs & 0x80 != 0 {
                    listen_addrs.push("/ip4/0.0.0.0/tcp/1".parse().unwrap());
                    listen_addrs.push("/dns/example.com/tcp/1".parse().unwrap());
                }
                self.feed(Input::Identified { peer: peer(*p), agent, listen_addrs });
            }
            Step::Rtt { peer: p, ms } => {
                self.feed(Input::Rtt { peer: peer(*p), rtt: Duration::from_millis(*ms as u64) })
            }
            Step::Discover { peers, kad } => {
                let peers = peers
                    .iter()
                    .take(8)
                    .map(|p| (peer(*p), (p & 1 == 0).then(|| w.addrs[*p as usize % PEERS].clone())))
                    .collect();
                self.feed(Input::Discovered { via: if *kad { Found::Kademlia } else { Found::Mdns }, peers });
            }
            Step::Providers { peers, snapshot } => {
                let key = match snapshot {
                    None => ProviderKey::Cluster,
                    Some(i) => ProviderKey::Snapshot(w.snapshots[*i as usize % w.snapshots.len()].cid),
                };
                let peers = peers.iter().take(8).map(|p| peer(*p)).collect();
                self.feed(Input::Providers { key, peers });
            }
            Step::GossipRaw { from, data } => self.gossip(*from, data.clone()),
            Step::GossipOps { from, ops, replica_claim } => {
                let (_, batches) = make_batches(ops, None);
                let Some(batch) = batches.into_iter().last() else { return };
                let role = if *replica_claim { Role::Replica } else { Role::Primary };
                self.gossip(*from, peersync::wire::encode_gossip(&GossipMessage::Ops { role, batch }));
            }
            Step::GossipAttestation { from, att } => {
                let i = att.peer as usize % ORIGINS;
                let signer = if i == ME { &w.me } else { &w.signers[i] };
                let vv = vv_of(&att.vv);
                let mut root = root_of(&vv);
                if let Some(b) = att.root {
                    root.0[2] ^= b | 1;
                }
                let cluster = if att.other_cluster { "other" } else { CLUSTER };
                let mut a = Attestation::sign(
                    signer,
                    cluster,
                    Attested { version_vector: vv, state_root: root, clock: Hlc::default() },
                );
                if att.bad_signature {
                    a.signature[0] ^= 1;
                }
                self.gossip(*from, peersync::wire::encode_gossip(&GossipMessage::Attestation(a)));
            }
            Step::GossipRevocation { from, which } => {
                let bytes = match w.revocations.get(*which as usize % (w.revocations.len() + 1)) {
                    Some(r) => r.encode(),
                    None => vec![*which; 5],
                };
                self.gossip(*from, peersync::wire::encode_gossip(&GossipMessage::Revocation(bytes)));
            }
            Step::RequestDigest { peer: p, digest } => {
                let p = peer(*p);
                let request = SyncRequest::Digest(make_digest(p, digest));
                self.request(p, request);
            }
            Step::RequestOther { peer: p, kind, a, b } => {
                let request = match kind % 5 {
                    0 => SyncRequest::GetOps {
                        origin: origin(*a),
                        after: Seq(*b as u64),
                        max_ops: (*b as u32) >> 4,
                        max_bytes: *b as u32 * 64,
                    },
                    1 => SyncRequest::GetManifest { cid: w.snapshots[*a as usize % w.snapshots.len()].cid },
                    2 => {
                        let s = &w.snapshots[*a as usize % w.snapshots.len()];
                        let cid = s.chunks.first().map_or(s.cid, |(r, _)| r.cid);
                        SyncRequest::GetChunk { cid }
                    }
                    3 => SyncRequest::GetBuckets,
                    _ => SyncRequest::GetEntries { buckets: (0..*a as u32 % 8).map(|i| i * *b as u32).collect() },
                };
                self.request(peer(*p), request);
            }
            Step::RequestRaw { peer: p, bytes } => {
                if let Ok(request) = crate::read_request(bytes) {
                    self.request(peer(*p), request);
                }
            }
            Step::Served { which, bogus } => {
                let reply = if *bogus || self.serving.is_empty() {
                    ReplyId(*which as u64)
                } else {
                    self.serving.remove(*which as usize % self.serving.len())
                };
                self.feed(Input::Served { reply, bytes: 0 });
            }
            Step::Respond { which, response } => {
                if self.sent.is_empty() {
                    return;
                }
                let i = *which as usize % self.sent.len();
                let (req, p, request) = self.sent[i].clone();
                let Some(result) = self.response(Some((&p, &request)), response) else { return };
                self.sent.remove(i);
                self.feed(Input::Response { req, result });
            }
            Step::RespondBogus { req, response } => {
                let Some(result) = self.response(None, response) else { return };
                self.feed(Input::Response { req: ReqId(*req as u64), result });
            }
            Step::Applied { which, ok } => {
                if self.applies.is_empty() {
                    return;
                }
                let (ticket, origin, batches) = self.applies.remove(*which as usize % self.applies.len());
                let genuine = || {
                    let chain = w.chains.iter().find(|c| c.origin == origin);
                    chain.is_some_and(|c| batches.iter().all(|b| c.is_genuine(b)))
                };
                let ok = match ok {
                    Judge::Honest => genuine(),
                    Judge::Ok => true,
                    Judge::Fail => false,
                };
                if ok {
                    self.queued.push((origin, batches));
                }
                let result = if ok { Ok(()) } else { Err("batch does not verify".into()) };
                self.feed(Input::Applied { ticket, result });
            }
            Step::AppliedBogus { ticket, ok } => {
                let result = if *ok { Ok(()) } else { Err("no".into()) };
                self.feed(Input::Applied { ticket: Ticket(*ticket as u64), result });
            }
            Step::Commit { which } => {
                if self.queued.is_empty() {
                    return;
                }
                let (origin, batches) = self.queued.remove(*which as usize % self.queued.len());
                if !self.store.commit(origin, &batches) {
                    self.feed(Input::ApplyFailed { origin });
                }
            }
            Step::ApplyFailed { origin: o } => self.feed(Input::ApplyFailed { origin: origin(*o) }),
            Step::Committed { n } => {
                let mine = &w.chains[ME];
                let at = self.store.progress(&mine.origin).seq.0;
                let Some(batch) = mine.batch(at, 1 + *n as u64 % 4) else { return };
                self.store.commit(mine.origin, std::slice::from_ref(&batch));
                self.feed(Input::Committed { batches: vec![Arc::new(batch)] });
            }
            Step::Staged { which, verdict, len } => {
                if self.stages.is_empty() {
                    return;
                }
                let (p, index, chunk, bytes) = self.stages.remove(*which as usize % self.stages.len());
                let verdict = match verdict {
                    Judge::Honest => match peersync::snapshot::decode_chunk(&chunk, &bytes) {
                        Ok(_) => ChunkVerdict::Stored,
                        Err(_) => ChunkVerdict::Corrupt,
                    },
                    Judge::Ok => ChunkVerdict::Stored,
                    Judge::Fail => {
                        if bytes.len() % 2 == 0 {
                            ChunkVerdict::LocalError
                        } else {
                            ChunkVerdict::Corrupt
                        }
                    }
                };
                if verdict == ChunkVerdict::Stored {
                    self.store.chunks.insert(chunk.cid);
                }
                let len = len.map_or(bytes.len() as u64, u64::from);
                self.feed(Input::Staged { peer: p, index, len, verdict });
            }
            Step::StagedBogus { peer: p, index, len, verdict } => {
                let verdict =
                    [ChunkVerdict::Stored, ChunkVerdict::Corrupt, ChunkVerdict::LocalError][*verdict as usize % 3];
                self.feed(Input::Staged { peer: peer(*p), index: *index as usize, len: *len as u64, verdict });
            }
            Step::Installed { ok } => {
                let install = self.installs.pop();
                let snapshot = install.as_ref().and_then(|m| w.snapshots.iter().find(|s| s.signed == *m));
                let ok = match ok {
                    // Every chunk is held and the entries hash to the root: the fixtures always do.
                    Judge::Honest => {
                        snapshot.is_some_and(|s| s.chunks.iter().all(|(r, _)| self.store.chunks.contains(&r.cid)))
                    }
                    Judge::Ok => true,
                    Judge::Fail => false,
                };
                if ok {
                    if let Some(s) = snapshot {
                        self.store.install(s);
                    }
                }
                let result = if ok { Ok(()) } else { Err("staged entries do not hash to the root".into()) };
                self.feed(Input::Installed { result });
            }
            Step::Merged { ok } => {
                let result = if *ok { Ok(()) } else { Err("the merge did not commit".into()) };
                self.feed(Input::Merged { result });
            }
            Step::SnapshotCreated { which } => {
                let s = &w.snapshots[*which as usize % w.snapshots.len()];
                self.store.latest = Some((s.cid, s.brief()));
                self.feed(Input::SnapshotCreated { cid: s.cid });
            }
            Step::ServeAlone => self.feed(Input::ServeAlone),
            Step::Revoke { which } => {
                let revocation = w.revocations[*which as usize % w.revocations.len()].clone();
                self.feed(Input::Revoke { revocation });
            }
            Step::Status => {
                let now = self.now();
                let _ = self.engine.status(now, &self.store);
                let _ = self.engine.members_status(&self.store);
                let _ = self.engine.phase();
                for o in 0..ORIGINS as u8 {
                    let _ = self.engine.cursor(&origin(o), &self.store);
                }
            }
            Step::Tick { step } => {
                let d = match step {
                    TimeStep::Millis(ms) => Duration::from_millis(*ms as u64),
                    TimeStep::Secs(s) => Duration::from_secs(*s as u64),
                    TimeStep::Huge(x) => Duration::from_millis(*x),
                    TimeStep::Deadline => match self.engine.poll_timeout() {
                        Some(at) => at.saturating_duration_since(self.now()),
                        None => Duration::ZERO,
                    },
                };
                self.elapsed = self.elapsed.saturating_add(d).min(MAX_ELAPSED);
                self.feed(Input::Tick);
            }
        }
    }

    fn gossip(&mut self, from: u8, data: Vec<u8>) {
        let id = GossipId(self.next_gossip);
        self.next_gossip += 1;
        self.feed(Input::Gossip { id, from: peer(from), data });
    }

    fn request(&mut self, peer: PeerId, request: SyncRequest) {
        let reply = ReplyId(self.next_reply);
        self.next_reply += 1;
        self.feed(Input::Request { peer, reply, request });
    }
}

/// Plays one scenario; panics on anything the checks above refuse.
pub fn run(scenario: &Scenario) {
    run_observed(scenario, &mut |_| {});
}

/// [`run`], showing every action to `observe`.
pub fn run_observed(scenario: &Scenario, observe: &mut dyn FnMut(&Action)) {
    let w = world();
    let cfg = build_config(&scenario.knobs);
    let store = build_store(&scenario.store);
    let now = base();
    let engine = Engine::new(w.me.clone(), cfg, &store, now);
    let mut h = Harness {
        observe,
        engine,
        store,
        elapsed: Duration::ZERO,
        next_reply: 0,
        next_gossip: 0,
        sent: Vec::new(),
        serving: Vec::new(),
        answered: BTreeSet::new(),
        verdicts: BTreeSet::new(),
        applies: Vec::new(),
        queued: Vec::new(),
        stages: Vec::new(),
        installs: Vec::new(),
        owed: Vec::new(),
    };
    h.drain();
    h.check_bounds();
    for step in scenario.steps.iter().take(MAX_STEPS) {
        h.step(step);
    }
    let _ = h.engine.poll_timeout();
}
