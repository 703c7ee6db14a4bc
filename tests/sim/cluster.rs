//! A simulated cluster that drives the sync state machines (`GapBuffer`, `ReplayPlanner`,
//! `Readiness`) the way the node's event loop and applier do, over a simulated network.
//!
//! What is modelled, and what is not:
//! - Each node keeps per-origin applied logs (contiguous seqs, with the signed heads that end each
//!   applied batch) that survive a crash; the gap buffer, planner, readiness and known digests are
//!   lost on a crash and start fresh on restart.
//! - Primaries create real `OpBatch`es signed by a `Signer`; the op bytes encode `(origin, seq)` so
//!   every apply can check that it extends its log contiguously with the right op.
//! - Messages: gossip of a batch from its origin to every connected node; digest request/response
//!   carrying `(VersionVector, root = hash of the vector)`; `GetOps` pulls answered with the
//!   server's batches after the cursor, in the boundaries of its signed heads (as
//!   `Store::read_batches` does), up to `pull_max_ops`.
//! - Each message is dropped with probability `loss`, otherwise delivered after the link's latency
//!   plus random jitter (so messages reorder). A message of a connection that has since closed is
//!   never delivered. Cutting a link or crashing a node closes connections: both ends see it (peer
//!   gone, pulls to it fail), as libp2p reports `ConnectionClosed` and `OutboundFailure`.
//! - A pull not answered within `request_timeout` fails (`OutboundFailure::Timeout`).
//! - Verification of chains and signatures is not modelled; the node's `pulled` cursor map is not
//!   either (applies are synchronous here, so it never differs from the applied vector).
//! - Time is simulated: one real `Instant` at start plus simulated offsets; events run in
//!   `(time, id)` order and the only randomness is the seeded RNG, so a seed replays exactly.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use libp2p::identity::Keypair;
use libp2p::PeerId;
use peersync::ids::{Origin, Role, Seq, StateRoot};
use peersync::op::{ChainHash, OpBatch, SignedHead, Signer};
use peersync::store::VersionVector;
use peersync::sync::{Admit, DigestPace, GapBuffer, GapLimits, PeerView, Readiness, ReplayPlanner, Transition};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_bytes::ByteBuf;

/// Parameters of one simulated run.
#[derive(Debug, Clone)]
pub struct Config {
    pub nodes: usize,
    /// Nodes `0..primaries` are primaries, the rest replicas.
    pub primaries: usize,
    /// Fraction of messages dropped.
    pub loss: f64,
    pub gap: GapLimits,
    /// Most ops a pull answer carries (whole batches; the last one may pass it).
    pub pull_max_ops: usize,
    pub request_timeout: Duration,
    pub digest_min: Duration,
    pub digest_max: Duration,
    /// Readiness grace; the node uses `Duration::MAX` when it has bootstrap addresses.
    pub grace: Duration,
    /// Random extra delay of each message on top of its link's latency.
    pub max_jitter: Duration,
}

impl Config {
    pub fn new(nodes: usize, primaries: usize) -> Self {
        Config {
            nodes,
            primaries,
            loss: 0.0,
            gap: GapLimits::default(),
            pull_max_ops: 16,
            request_timeout: Duration::from_secs(3),
            digest_min: Duration::from_millis(250),
            digest_max: Duration::from_secs(10),
            grace: Duration::MAX,
            max_jitter: Duration::from_millis(80),
        }
    }
}

/// Counters over a run, for reports and for checking that faults really happened.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub sent: u64,
    pub lost: u64,
    pub buffered: u64,
    pub overflows: u64,
    pub pulls: u64,
    pub pull_failures: u64,
    pub max_gap_ops: usize,
    /// Most pulls of one origin a node had outstanding at once (the planner means one).
    pub max_pulls_per_origin: usize,
    /// Restarts after which the first digest received was ahead of the node.
    pub behind_at_first_digest: u64,
}

#[derive(Debug, Clone)]
struct Digest {
    role: Role,
    vv: VersionVector,
    root: StateRoot,
}

#[derive(Debug)]
enum Msg {
    Gossip(OpBatch),
    DigestReq(Digest),
    DigestResp(Digest),
    GetOps { req: u64, origin: Origin, after: Seq },
    Ops { req: u64, batches: Vec<OpBatch> },
}

#[derive(Debug)]
enum Event {
    Deliver { from: usize, to: usize, epoch: u64, msg: Msg },
    DigestTimer { node: usize, life: u64 },
    PullDeadline { node: usize, req: u64, life: u64 },
}

/// One origin's applied log as a node holds it.
#[derive(Debug, Default)]
struct Log {
    /// `ops[i]` is the op with seq `i + 1`.
    ops: Vec<ByteBuf>,
    /// The signed heads held, keyed by seq: one at the end of every applied batch.
    heads: BTreeMap<Seq, SignedHead>,
}

/// What a node loses when it crashes.
struct Volatile {
    gaps: GapBuffer,
    planner: ReplayPlanner,
    readiness: Readiness,
    /// Latest digest of each peer (kept across disconnects, as the event loop's peer table does).
    digests: BTreeMap<usize, Digest>,
    /// Pulls in flight: request id -> (peer, origin).
    pulls: BTreeMap<u64, (usize, Origin)>,
    digest_pace: DigestPace,
}

/// What a restarted node must respect until it is active.
#[derive(Debug, Clone)]
pub struct Watch {
    /// The first version vector a peer advertised to the node after its restart.
    pub first_digest: Option<VersionVector>,
    pub became_active: bool,
}

pub struct Node {
    signer: Signer,
    pub peer: PeerId,
    pub role: Role,
    logs: BTreeMap<Origin, Log>,
    /// Chain value after this node's own last op (primaries).
    chain: ChainHash,
    pub up: bool,
    /// Incarnation: timers of an earlier life are ignored.
    life: u64,
    s: Volatile,
    pub watch: Option<Watch>,
}

#[derive(Debug, Clone, Copy)]
struct Link {
    ok: bool,
    /// Bumped whenever the connection closes or opens, so messages of an old connection are lost.
    epoch: u64,
    /// One-way latency.
    latency: Duration,
}

pub struct Cluster {
    pub seed: u64,
    cfg: Config,
    pub rng: StdRng,
    start: Instant,
    now: Instant,
    events: BTreeMap<(Instant, u64), Event>,
    next_id: u64,
    pub nodes: Vec<Node>,
    index: BTreeMap<PeerId, usize>,
    links: Vec<Vec<Link>>,
    pub stats: Stats,
}

/// Op bytes: origin index, seq, then padding so op sizes vary.
fn op_bytes(origin: usize, seq: u64, pad: usize) -> ByteBuf {
    let mut b = vec![origin as u8];
    b.extend_from_slice(&seq.to_le_bytes());
    b.extend(std::iter::repeat_n(0xab, pad));
    ByteBuf::from(b)
}

fn root_of(vv: &VersionVector) -> StateRoot {
    let mut h = blake3::Hasher::new();
    for (o, s) in &vv.0 {
        h.update(&o.to_bytes());
        h.update(&s.0.to_le_bytes());
    }
    StateRoot(*h.finalize().as_bytes())
}

impl Volatile {
    fn new(cfg: &Config, role: Role, now: Instant) -> Self {
        Volatile {
            gaps: GapBuffer::new(cfg.gap),
            planner: ReplayPlanner::new(role, cfg.request_timeout),
            readiness: Readiness::new(true, cfg.grace, now),
            digests: BTreeMap::new(),
            pulls: BTreeMap::new(),
            digest_pace: DigestPace::new(cfg.digest_min, cfg.digest_max),
        }
    }
}

impl Cluster {
    /// Builds the cluster with every link up and starts every node.
    pub fn new(seed: u64, cfg: Config) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let start = Instant::now();
        let nodes: Vec<Node> = (0..cfg.nodes)
            .map(|i| {
                let mut key = [0u8; 32];
                rng.fill(&mut key);
                let signer = Signer::new(Keypair::ed25519_from_bytes(key).expect("32 bytes are a valid key"));
                let role = if i < cfg.primaries { Role::Primary } else { Role::Replica };
                Node {
                    peer: signer.origin(),
                    signer,
                    role,
                    logs: BTreeMap::new(),
                    chain: ChainHash::GENESIS,
                    up: false,
                    life: 0,
                    s: Volatile::new(&cfg, role, start),
                    watch: None,
                }
            })
            .collect();
        let mut links = vec![vec![Link { ok: true, epoch: 0, latency: Duration::ZERO }; cfg.nodes]; cfg.nodes];
        for a in 0..cfg.nodes {
            for b in a + 1..cfg.nodes {
                let latency = Duration::from_millis(rng.gen_range(1..=30));
                for (x, y) in [(a, b), (b, a)] {
                    links[x][y].latency = latency;
                }
            }
        }
        let index = nodes.iter().enumerate().map(|(i, n)| (n.peer, i)).collect();
        let mut c = Cluster {
            seed,
            cfg,
            rng,
            start,
            now: start,
            events: BTreeMap::new(),
            next_id: 0,
            nodes,
            index,
            links,
            stats: Stats::default(),
        };
        for n in 0..c.nodes.len() {
            c.boot(n, false);
        }
        c
    }

    /// Simulated time since the start.
    pub fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    pub fn set_loss(&mut self, loss: f64) {
        self.cfg.loss = loss;
    }

    pub fn primaries(&self) -> usize {
        self.cfg.primaries
    }

    pub fn gap_limits(&self) -> GapLimits {
        self.cfg.gap
    }

    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn schedule(&mut self, at: Instant, e: Event) {
        let id = self.id();
        self.events.insert((at, id), e);
    }

    fn connected(&self, a: usize, b: usize) -> bool {
        a != b && self.nodes[a].up && self.nodes[b].up && self.links[a][b].ok
    }

    fn send(&mut self, from: usize, to: usize, msg: Msg) {
        if !self.connected(from, to) {
            return;
        }
        self.stats.sent += 1;
        if self.rng.gen_bool(self.cfg.loss) {
            self.stats.lost += 1;
            return;
        }
        let jitter = self.rng.gen_range(Duration::ZERO..=self.cfg.max_jitter);
        let link = self.links[from][to];
        self.schedule(self.now + link.latency + jitter, Event::Deliver { from, to, epoch: link.epoch, msg });
    }

    // ---- durable state -------------------------------------------------------------------------

    fn have(&self, n: usize, origin: &Origin) -> Seq {
        self.nodes[n].logs.get(origin).map_or(Seq::ZERO, |l| Seq(l.ops.len() as u64))
    }

    /// The applied version vector of node `n`.
    pub fn vv(&self, n: usize) -> VersionVector {
        VersionVector(self.nodes[n].logs.iter().map(|(o, l)| (*o, Seq(l.ops.len() as u64))).collect())
    }

    /// Every op written so far: each primary's own log.
    pub fn written(&self) -> VersionVector {
        let mut vv = VersionVector::default();
        for n in &self.nodes[..self.cfg.primaries] {
            if let Some(l) = n.logs.get(&n.peer) {
                vv.0.insert(n.peer, Seq(l.ops.len() as u64));
            }
        }
        vv
    }

    /// Appends a batch to node `n`'s log; it must continue the log without a hole.
    fn apply(&mut self, n: usize, batch: &OpBatch) {
        let origin = batch.head.origin;
        let oi = self.index[&origin];
        let seed = self.seed;
        let log = self.nodes[n].logs.entry(origin).or_default();
        let have = log.ops.len() as u64;
        assert!(
            batch.after.0 <= have,
            "seed {seed}: node {n} applied ops {}..={} of origin {oi} holding only 1..={have}: out of order",
            batch.after.0 + 1,
            batch.head.seq.0
        );
        assert!(batch.head.seq.0 > have, "seed {seed}: node {n} applied a batch it already holds");
        assert_eq!(batch.ops.len() as u64, batch.head.seq.0 - batch.after.0, "seed {seed}: malformed batch");
        for (i, op) in batch.ops.iter().enumerate() {
            let seq = batch.after.0 + 1 + i as u64;
            if seq <= have {
                assert_eq!(&log.ops[seq as usize - 1], op, "seed {seed}: node {n} got another op at seq {seq}");
                continue;
            }
            assert_eq!(op[0] as usize, oi, "seed {seed}: op of another origin");
            assert_eq!(op[1..9], seq.to_le_bytes(), "seed {seed}: node {n} applied the wrong op as seq {seq}");
            log.ops.push(op.clone());
        }
        log.heads.insert(batch.head.seq, batch.head.clone());
    }

    /// A primary creates and publishes a batch of 1..=5 ops.
    pub fn write(&mut self, n: usize) {
        if !self.nodes[n].up {
            return;
        }
        assert_eq!(self.nodes[n].role, Role::Primary);
        let origin = self.nodes[n].peer;
        let have = self.have(n, &origin).0;
        let count = self.rng.gen_range(1..=5u64);
        let mut chain = self.nodes[n].chain;
        let ops: Vec<ByteBuf> = (have + 1..=have + count)
            .map(|seq| {
                let op = op_bytes(n, seq, self.rng.gen_range(0..8));
                chain = chain.extend(blake3::hash(&op).as_bytes());
                op
            })
            .collect();
        let head = self.nodes[n].signer.sign_head(Seq(have + count), chain);
        self.nodes[n].chain = chain;
        let batch = OpBatch { after: Seq(have), ops, head };
        self.apply(n, &batch);
        for to in 0..self.nodes.len() {
            self.send(n, to, Msg::Gossip(batch.clone()));
        }
        if !self.nodes[n].s.readiness.is_active() {
            self.check_ready(n);
        }
    }

    // ---- the node's handlers -------------------------------------------------------------------

    fn digest_of(&self, n: usize) -> Digest {
        let vv = self.vv(n);
        Digest { role: self.nodes[n].role, root: root_of(&vv), vv }
    }

    /// The applier's `offer`: apply what continues the log, buffer what is ahead of a gap, then
    /// release what the apply made ready.
    fn offer(&mut self, n: usize, batch: OpBatch) {
        let origin = batch.head.origin;
        let have = self.have(n, &origin);
        if batch.head.seq <= have {
            return;
        }
        if batch.after > have {
            match self.nodes[n].s.gaps.insert(batch) {
                Admit::Buffered => self.stats.buffered += 1,
                Admit::Overflow => self.stats.overflows += 1,
                Admit::AlreadyBuffered => {}
            }
            self.check_gap_bounds(n);
            return;
        }
        self.apply(n, &batch);
        loop {
            let have = self.have(n, &origin);
            let ready = self.nodes[n].s.gaps.take_ready(&origin, have);
            if ready.is_empty() {
                break;
            }
            for b in &ready {
                self.apply(n, b);
            }
        }
        self.check_gap_bounds(n);
        if !self.nodes[n].s.readiness.is_active() {
            self.check_ready(n);
        }
    }

    fn check_gap_bounds(&mut self, n: usize) {
        let (ops, bytes) = self.nodes[n].s.gaps.usage();
        let limits = self.cfg.gap;
        assert!(
            ops <= limits.max_ops && bytes <= limits.max_bytes,
            "seed {}: node {n}'s gap buffer holds {ops} ops / {bytes} bytes, over {limits:?}",
            self.seed
        );
        self.stats.max_gap_ops = self.stats.max_gap_ops.max(ops);
    }

    fn check_ready(&mut self, n: usize) {
        let vv = self.vv(n);
        let root = root_of(&vv);
        let now = self.now;
        match self.nodes[n].s.readiness.check(&vv, root, now) {
            Transition::Divergence { peer } => {
                panic!(
                    "seed {}: node {n} reports a divergence from {peer}, but roots are a function of vectors",
                    self.seed
                )
            }
            Transition::BecameActive { .. } | Transition::None => {}
        }
        self.check_watch(n);
    }

    /// A restarted node may be active only once it holds what a peer advertised to it first.
    fn check_watch(&mut self, n: usize) {
        let node = &mut self.nodes[n];
        let Some(w) = &mut node.watch else { return };
        if !node.up || !node.s.readiness.is_active() {
            return;
        }
        let vv = VersionVector(node.logs.iter().map(|(o, l)| (*o, Seq(l.ops.len() as u64))).collect());
        match &w.first_digest {
            None => panic!("seed {}: restarted node {n} became active before any peer's digest", self.seed),
            Some(first) => assert!(
                vv.dominates(first),
                "seed {}: restarted node {n} is active at {vv:?}, behind the first digest it got after restart {first:?}",
                self.seed
            ),
        }
        w.became_active = true;
    }

    fn record_digest(&mut self, n: usize, from: usize, d: Digest) {
        let peer = self.nodes[from].peer;
        let node = &mut self.nodes[n];
        node.s.readiness.on_peer_state(peer, d.vv.clone(), d.root);
        if let Some(w) = &mut node.watch {
            if w.first_digest.is_none() {
                let vv = VersionVector(node.logs.iter().map(|(o, l)| (*o, Seq(l.ops.len() as u64))).collect());
                self.stats.behind_at_first_digest += u64::from(!vv.dominates(&d.vv));
                w.first_digest = Some(d.vv.clone());
            }
        }
        node.s.digests.insert(from, d);
        self.check_ready(n);
    }

    /// The event loop's `plan_pulls`: views of the connected peers' latest digests.
    fn plan_pulls(&mut self, n: usize) {
        let have = self.vv(n);
        let views: Vec<PeerView> = self.nodes[n]
            .s
            .digests
            .iter()
            .filter(|(p, _)| self.connected(n, **p))
            .map(|(p, d)| PeerView {
                peer: self.nodes[*p].peer,
                role: d.role,
                version_vector: d.vv.clone(),
                rtt: Some(self.links[n][*p].latency * 2),
            })
            .collect();
        let now = self.now;
        let pulls = self.nodes[n].s.planner.plan(&have, &views, now);
        for pull in pulls {
            let to = self.index[&pull.peer];
            assert_eq!(pull.after, have.get(&pull.origin), "seed {}: a pull must start at the cursor", self.seed);
            let view = views.iter().find(|v| v.peer == pull.peer).expect("planned from a view");
            assert!(
                view.version_vector.get(&pull.origin) > pull.after,
                "seed {}: pull from a peer with nothing",
                self.seed
            );
            let req = self.id();
            let pulls = &mut self.nodes[n].s.pulls;
            pulls.insert(req, (to, pull.origin));
            let same = pulls.values().filter(|(_, o)| *o == pull.origin).count();
            self.stats.max_pulls_per_origin = self.stats.max_pulls_per_origin.max(same);
            self.stats.pulls += 1;
            self.send(n, to, Msg::GetOps { req, origin: pull.origin, after: pull.after });
            let life = self.nodes[n].life;
            self.schedule(now + self.cfg.request_timeout, Event::PullDeadline { node: n, req, life });
        }
    }

    /// The server side of `GetOps`: batches after `after`, cut at the server's signed heads.
    fn serve(&self, n: usize, origin: &Origin, after: Seq) -> Vec<OpBatch> {
        let Some(log) = self.nodes[n].logs.get(origin) else { return Vec::new() };
        let mut batches = Vec::new();
        let (mut start, mut total) = (after.0, 0);
        for (end, head) in log.heads.range(after.next()..) {
            let ops = log.ops[start as usize..end.0 as usize].to_vec();
            total += ops.len();
            batches.push(OpBatch { after: Seq(start), ops, head: head.clone() });
            start = end.0;
            if total >= self.cfg.pull_max_ops {
                break;
            }
        }
        batches
    }

    fn on_ops(&mut self, n: usize, from: usize, req: u64, batches: Vec<OpBatch>) {
        let Some((_, origin)) = self.nodes[n].s.pulls.remove(&req) else { return };
        if batches.is_empty() {
            // The peer has nothing after our cursor (anymore): let the next digest decide.
            self.nodes[n].s.digests.remove(&from);
            let from_id = self.nodes[from].peer;
            self.nodes[n].s.planner.answered(&from_id, &origin);
            return;
        }
        for b in batches {
            assert_eq!(b.head.origin, origin, "seed {}: a pull answered with another origin", self.seed);
            self.offer(n, b);
        }
        let from_id = self.nodes[from].peer;
        self.nodes[n].s.planner.answered(&from_id, &origin);
        self.plan_pulls(n);
    }

    fn digest_round(&mut self, n: usize) {
        let digest = self.digest_of(n);
        let applied = digest.vv.total();
        let targets: Vec<usize> = (0..self.nodes.len()).filter(|p| self.connected(n, *p)).collect();
        for &p in &targets {
            self.send(n, p, Msg::DigestReq(digest.clone()));
        }
        let life = self.nodes[n].life;
        let s = &mut self.nodes[n].s;
        let behind = s.digests.values().any(|d| !digest.vv.dominates(&d.vv));
        let busy = behind || !s.readiness.is_active() || targets.is_empty();
        let at = self.now + s.digest_pace.after_round(applied, busy);
        self.schedule(at, Event::DigestTimer { node: n, life });
        self.plan_pulls(n);
        self.check_ready(n);
    }

    fn deliver(&mut self, from: usize, to: usize, msg: Msg) {
        match msg {
            Msg::Gossip(batch) => {
                assert_ne!(batch.head.origin, self.nodes[to].peer, "seed {}: own ops gossiped back", self.seed);
                self.offer(to, batch);
            }
            Msg::DigestReq(d) => {
                let mine = self.digest_of(to);
                self.record_digest(to, from, d);
                self.send(to, from, Msg::DigestResp(mine));
                self.plan_pulls(to);
            }
            Msg::DigestResp(d) => {
                self.record_digest(to, from, d);
                self.plan_pulls(to);
            }
            Msg::GetOps { req, origin, after } => {
                let batches = self.serve(to, &origin, after);
                self.send(to, from, Msg::Ops { req, batches });
            }
            Msg::Ops { req, batches } => self.on_ops(to, from, req, batches),
        }
    }

    // ---- connections, crashes ------------------------------------------------------------------

    /// `n` sees its connection to `peer` close: the peer's state no longer vouches, pulls fail.
    fn on_closed(&mut self, n: usize, peer: usize) {
        let id = self.nodes[peer].peer;
        let s = &mut self.nodes[n].s;
        s.readiness.on_peer_gone(&id);
        let failed: Vec<(u64, Origin)> =
            s.pulls.iter().filter(|(_, (p, _))| *p == peer).map(|(r, (_, o))| (*r, *o)).collect();
        for (r, origin) in failed {
            s.pulls.remove(&r);
            s.planner.failed(&id, &origin, self.now);
            self.stats.pull_failures += 1;
        }
    }

    /// A new connection: each side sends its digest.
    fn on_established(&mut self, a: usize, b: usize) {
        self.links[a][b].epoch += 1;
        self.links[b][a].epoch += 1;
        let (da, db) = (self.digest_of(a), self.digest_of(b));
        self.send(a, b, Msg::DigestReq(da));
        self.send(b, a, Msg::DigestReq(db));
    }

    fn close(&mut self, a: usize, b: usize) {
        self.links[a][b].epoch += 1;
        self.links[b][a].epoch += 1;
        self.on_closed(a, b);
        self.on_closed(b, a);
    }

    pub fn cut(&mut self, a: usize, b: usize) {
        if self.connected(a, b) {
            self.close(a, b);
        }
        self.links[a][b].ok = false;
        self.links[b][a].ok = false;
    }

    pub fn heal(&mut self, a: usize, b: usize) {
        let was = self.connected(a, b);
        self.links[a][b].ok = true;
        self.links[b][a].ok = true;
        if !was && self.connected(a, b) {
            self.on_established(a, b);
        }
    }

    /// Cuts every link between `side` and the rest.
    pub fn partition(&mut self, side: &[usize]) {
        for a in side.iter().copied() {
            for b in (0..self.nodes.len()).filter(|b| !side.contains(b)) {
                self.cut(a, b);
            }
        }
    }

    pub fn heal_all(&mut self) {
        for a in 0..self.nodes.len() {
            for b in a + 1..self.nodes.len() {
                self.heal(a, b);
            }
        }
    }

    /// The node loses its memory and its connections; its logs stay.
    pub fn crash(&mut self, n: usize) {
        if !self.nodes[n].up {
            return;
        }
        for p in 0..self.nodes.len() {
            if self.connected(n, p) {
                self.links[n][p].epoch += 1;
                self.links[p][n].epoch += 1;
                self.on_closed(p, n);
            }
        }
        self.nodes[n].up = false;
        self.nodes[n].life += 1;
    }

    pub fn restart(&mut self, n: usize) {
        if !self.nodes[n].up {
            self.boot(n, true);
        }
    }

    fn boot(&mut self, n: usize, watched: bool) {
        let node = &mut self.nodes[n];
        node.up = true;
        node.s = Volatile::new(&self.cfg, node.role, self.now);
        node.watch = watched.then_some(Watch { first_digest: None, became_active: false });
        let (at, life) = (self.now + self.cfg.digest_min, node.life);
        self.schedule(at, Event::DigestTimer { node: n, life });
        self.check_ready(n);
        for p in 0..self.nodes.len() {
            if self.connected(n, p) {
                self.on_established(n, p);
            }
        }
    }

    // ---- running -------------------------------------------------------------------------------

    /// Runs every event due within `d` of simulated time.
    pub fn run_for(&mut self, d: Duration) {
        let until = self.now + d;
        while let Some(entry) = self.events.first_entry() {
            if entry.key().0 > until {
                break;
            }
            let ((at, _), event) = entry.remove_entry();
            self.now = at;
            match event {
                Event::Deliver { from, to, epoch, msg } => {
                    if self.connected(from, to) && self.links[from][to].epoch == epoch {
                        self.deliver(from, to, msg);
                        self.check_watch(to);
                    }
                }
                Event::DigestTimer { node, life } => {
                    if self.nodes[node].up && self.nodes[node].life == life {
                        self.digest_round(node);
                    }
                }
                Event::PullDeadline { node, req, life } => {
                    let n = &mut self.nodes[node];
                    if n.up && n.life == life {
                        if let Some((peer, origin)) = n.s.pulls.remove(&req) {
                            let id = self.nodes[peer].peer;
                            self.nodes[node].s.planner.failed(&id, &origin, at);
                            self.stats.pull_failures += 1;
                        }
                    }
                }
            }
        }
        self.now = until;
    }

    pub fn is_active(&self, n: usize) -> bool {
        self.nodes[n].s.readiness.is_active()
    }

    /// Whether every node is up, holds every op written, and is active.
    pub fn settled(&self) -> bool {
        let all = self.written();
        (0..self.nodes.len()).all(|n| self.nodes[n].up && self.vv(n) == all && self.is_active(n))
    }

    /// Runs until `settled`, checking every `step`; the time it took, or `None` past `bound`.
    pub fn run_until_settled(&mut self, bound: Duration) -> Option<Duration> {
        let begin = self.now;
        let step = Duration::from_millis(50);
        while self.now - begin <= bound {
            if self.settled() {
                return Some(self.now - begin);
            }
            self.run_for(step);
        }
        None
    }

    /// What each node holds and its phase, for failure messages.
    pub fn describe(&self) -> String {
        let short =
            |vv: &VersionVector| -> Vec<(usize, u64)> { vv.0.iter().map(|(o, s)| (self.index[o], s.0)).collect() };
        let mut out = format!("at {:?} written {:?}\n", self.elapsed(), short(&self.written()));
        for (i, n) in self.nodes.iter().enumerate() {
            let s = &n.s;
            out += &format!(
                "  node {i} {:?} up={} phase={:?} vv={:?} target={:?} gaps={:?} pulls={:?} digests={:?}\n",
                n.role,
                n.up,
                s.readiness.phase(),
                short(&self.vv(i)),
                short(s.readiness.target()),
                s.gaps.usage(),
                s.pulls.values().map(|(p, o)| (*p, self.index[o])).collect::<Vec<_>>(),
                s.digests.iter().map(|(p, d)| (*p, short(&d.vv))).collect::<Vec<_>>(),
            );
        }
        out
    }
}
