//! A simulated cluster: every node runs the real `peersync::sync::Engine`; the simulator is only its
//! executor (`exec.rs`) with fakes at the I/O edges: the network and clocks (`net.rs`) and an
//! in-memory store (`store.rs`).
//!
//! A crash drops a node's engine and everything volatile around it (writer queue, pending replies
//! and verdicts, gossip seen-cache) and keeps its store and the peers it was told to remember; a
//! restart builds a new engine over the kept store, as the node does.
//!
//! Checked at every input a node handles: its engine's queues and gap buffer stay within the
//! configuration's bounds, every gossip message gets exactly one verdict, every request at most one
//! answer, and the node never reports itself active while below the first version vector a peer
//! advertised to it since it (re)started. At the end (see [`Cluster::converge`]): every node holds
//! every acknowledged write, all hold the same vector and root, their states are the oracle's, and
//! all are active.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use peersync::ids::{Origin, Role, Seq};
use peersync::op::{ChainHash, OpBatch, Signer};
use peersync::store::VersionVector;
use peersync::sync::{AckWanted, Count, Engine, EngineConfig, GossipId, Input, Phase, ReplyId, ReqId, Ticket, WaitId};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use crate::checks::check_join_target;
use crate::net::{Clock, Event, Net};
use crate::store::MemStore;

pub const CLUSTER: &str = "sim";

/// Parameters of one simulated run.
#[derive(Debug, Clone)]
pub struct Config {
    pub nodes: usize,
    /// Nodes `0..primaries` are primaries, the rest replicas.
    pub primaries: usize,
    /// Nodes not started with the others (late joiners); started by [`Cluster::restart`].
    pub late: Vec<usize>,
    pub loss: f64,
    pub dup: f64,
    pub max_jitter: Duration,
    /// Each node's clock is offset by up to this much...
    pub max_offset: Duration,
    /// ...and runs off by up to this many millionths.
    pub max_drift_ppm: i64,
    /// Bootstrap peers of each node, chosen at random among the others.
    pub bootstraps: usize,
    /// Keys the primaries write to (a few keys, many overwrites).
    pub keys: u8,
    /// Raw bytes of a snapshot chunk at most (small, so snapshots have several chunks).
    pub chunk_raw: u64,
    /// Writer commit latency at most.
    pub commit_latency: Duration,
    /// Nodes that lie when they serve: chunks and replayed ops come out altered.
    pub liars: Vec<usize>,
    pub engine: EngineConfig,
}

impl Config {
    pub fn new(nodes: usize, primaries: usize) -> Self {
        let mut engine = EngineConfig::new(Role::Replica, CLUSTER);
        engine.discovery = Duration::from_secs(1);
        engine.digest_min = Duration::from_millis(250);
        engine.digest_max = Duration::from_secs(2);
        engine.attest_interval = Duration::from_secs(1);
        engine.request_timeout = Duration::from_secs(2);
        engine.chunks_per_source = 2;
        Config {
            nodes,
            primaries,
            late: Vec::new(),
            loss: 0.0,
            dup: 0.0,
            max_jitter: Duration::from_millis(40),
            max_offset: Duration::ZERO,
            max_drift_ppm: 0,
            bootstraps: 2,
            keys: 8,
            chunk_raw: 96,
            commit_latency: Duration::from_millis(3),
            liars: Vec::new(),
            engine,
        }
    }
}

/// Counters of one node over a run.
#[derive(Debug, Default, Clone)]
pub struct NodeStats {
    /// What the engine counted (`Action::Count`), by kind.
    pub counts: Vec<(Count, u64)>,
    /// Digest requests sent from ticks (digest rounds), and the ticks that sent any.
    pub round_digests: u64,
    pub rounds: u64,
    /// Requests (digests included) and answers sent: the repair plane.
    pub requests_sent: u64,
    pub answers_sent: u64,
    /// Gossip messages published or forwarded.
    pub gossip_sent: u64,
    pub digests_sent: u64,
    pub digests_received: u64,
    pub restarts: u64,
    /// Snapshots the store installed.
    pub installs: u64,
    /// Times a (re)started node's first digest was ahead of it.
    pub behind_at_join: u64,
    pub became_active: u64,
    /// Waits for acknowledgements (`Input::AwaitAcks`) that ended met, and unmet.
    pub acks_met: u64,
    pub acks_unmet: u64,
    /// Tombstone collections the engine asked for (each checked safe when asked).
    pub collections: u64,
}

impl NodeStats {
    pub fn count(&self, what: Count) -> u64 {
        self.counts.iter().find(|(c, _)| *c == what).map_or(0, |(_, n)| *n)
    }

    pub(crate) fn add(&mut self, what: Count, n: u64) {
        match self.counts.iter_mut().find(|(c, _)| *c == what) {
            Some((_, total)) => *total += n,
            None => self.counts.push((what, n)),
        }
    }
}

/// What an [`Action::Apply`](peersync::sync::Action::Apply) queued to the writer.
pub(crate) struct Queued {
    pub ticket: Ticket,
    pub origin: Origin,
    pub batches: Vec<OpBatch>,
    pub prev: Option<ChainHash>,
}

/// A gossip message handed to an engine, waiting for its verdict.
pub(crate) struct Unjudged {
    pub from: usize,
    /// Gossipsub's message id, to forward it under.
    pub id: u64,
    pub data: Rc<Vec<u8>>,
    pub at: Duration,
}

/// Everything a crash loses.
pub struct Live {
    pub engine: Engine,
    pub(crate) writer: VecDeque<Queued>,
    pub(crate) commit_scheduled: bool,
    /// Inbound requests not answered yet: requester, its request id, the connection.
    pub(crate) replies: BTreeMap<ReplyId, (usize, ReqId, u64)>,
    /// Gossip messages handed to the engine and not judged yet.
    pub(crate) verdicts: BTreeMap<GossipId, Unjudged>,
    /// Gossipsub's seen-cache: message id -> when first seen.
    pub(crate) seen: BTreeMap<u64, Duration>,
    /// The first version vector a peer advertised to this node since it started.
    pub join_target: Option<VersionVector>,
    pub(crate) tick_at: Option<Duration>,
    pub(crate) dialing: BTreeSet<usize>,
    /// Peers gossip must not flow to or from (`Action::Gossip`).
    pub(crate) gossip_blocked: BTreeSet<usize>,
    /// Whether the input being handled is a tick (a digest round, when it sends digests).
    pub(crate) in_tick: bool,
    pub(crate) tick_digests: u64,
    /// Waits for acknowledgements not ended yet: the seq each waits for.
    pub(crate) ack_waits: BTreeMap<WaitId, Seq>,
    /// Lease requests not answered yet.
    pub(crate) lease_waits: BTreeMap<peersync::sync::leases::LeaseWait, crate::leases::Ask>,
}

pub struct Node {
    pub signer: Signer,
    pub peer: PeerId,
    pub role: Role,
    pub addr: Multiaddr,
    pub store: MemStore,
    pub(crate) bootstrap: Vec<usize>,
    /// Peers the engine asked to remember (`Action::RememberPeers`): kept across restarts.
    pub(crate) remembered: Vec<(Multiaddr, PeerId)>,
    /// Revocations the engine asked to persist (`Action::PersistRevocations`): kept too.
    pub(crate) revocations: Vec<peersync::cert::Revocation>,
    /// The lease group's Raft log as the engine asked to persist it (`Action::PersistLeaseLog`):
    /// durable, so kept across crashes.
    pub(crate) lease_log: peersync::store::LeaseLogBoot,
    pub clock: Clock,
    pub live: Option<Live>,
    /// Incarnation: events of an earlier life are dropped.
    pub life: u64,
    /// Whether it was ever started (a late joiner is not, at first).
    pub started: bool,
    pub stats: NodeStats,
}

pub struct Cluster {
    pub seed: u64,
    pub cfg: Config,
    pub net: Net,
    pub nodes: Vec<Node>,
    pub(crate) index: BTreeMap<PeerId, usize>,
    pub(crate) by_addr: BTreeMap<Multiaddr, usize>,
    /// Kademlia's provider records: `None` is the cluster key, `Some(cid)` a snapshot.
    pub(crate) providers: BTreeMap<Option<cid::Cid>, BTreeSet<usize>>,
    /// Every write a primary acknowledged, per origin in seq order: the oracle.
    pub written: BTreeMap<Origin, Vec<(Vec<u8>, i64)>>,
    pub(crate) next_id: u64,
    /// A digest of everything that happened, to check a seed replays exactly.
    pub(crate) trace: blake3::Hasher,
    /// Inputs handed to engines.
    pub inputs: u64,
    /// Lease outcomes, checked as they come (see `leases.rs`).
    pub leases: crate::leases::LeaseBook,
    /// `SIM_TRACE=1`: print every input and action (for replaying one seed).
    pub(crate) tracing: bool,
}

fn addr_of(i: usize) -> Multiaddr {
    format!("/ip4/10.0.{}.{}/tcp/4001", i / 256, i % 256).parse().expect("a valid address")
}

/// An address without its `/p2p/` part.
pub(crate) fn bare(addr: &Multiaddr) -> Multiaddr {
    addr.iter().filter(|p| !matches!(p, Protocol::P2p(_))).collect()
}

impl Cluster {
    /// Builds the cluster and starts every node not marked late.
    pub fn new(seed: u64, cfg: Config) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let base = Instant::now();
        let nodes: Vec<Node> = (0..cfg.nodes)
            .map(|i| {
                let mut key = [0u8; 32];
                rng.fill(&mut key);
                let signer = Signer::new(Keypair::ed25519_from_bytes(key).expect("32 bytes are a valid key"));
                let others: Vec<usize> = (0..cfg.nodes).filter(|j| *j != i).collect();
                let bootstrap = others.choose_multiple(&mut rng, cfg.bootstraps.min(others.len())).copied().collect();
                let offset = Duration::from_millis(rng.gen_range(0..=cfg.max_offset.as_millis() as u64));
                let drift_ppm = rng.gen_range(-cfg.max_drift_ppm..=cfg.max_drift_ppm);
                Node {
                    peer: signer.origin(),
                    signer,
                    role: if i < cfg.primaries { Role::Primary } else { Role::Replica },
                    addr: addr_of(i),
                    store: MemStore::default(),
                    bootstrap,
                    remembered: Vec::new(),
                    revocations: Vec::new(),
                    lease_log: Default::default(),
                    clock: Clock { base, offset, drift_ppm },
                    live: None,
                    life: 0,
                    started: false,
                    stats: NodeStats::default(),
                }
            })
            .collect();
        let mut net = Net::new(cfg.nodes, StdRng::seed_from_u64(rng.gen()));
        net.loss = cfg.loss;
        net.dup = cfg.dup;
        net.max_jitter = cfg.max_jitter;
        let index = nodes.iter().enumerate().map(|(i, n)| (n.peer, i)).collect();
        let by_addr = nodes.iter().enumerate().map(|(i, n)| (n.addr.clone(), i)).collect();
        let mut c = Cluster {
            seed,
            cfg,
            net,
            nodes,
            index,
            by_addr,
            providers: BTreeMap::new(),
            written: BTreeMap::new(),
            next_id: 0,
            trace: blake3::Hasher::new(),
            inputs: 0,
            leases: Default::default(),
            tracing: std::env::var("SIM_TRACE").is_ok_and(|v| v == "1"),
        };
        for n in 0..c.nodes.len() {
            if !c.cfg.late.contains(&n) {
                c.boot(n);
            }
        }
        c
    }

    pub fn elapsed(&self) -> Duration {
        self.net.now
    }

    pub fn primaries(&self) -> usize {
        self.cfg.primaries
    }

    pub fn set_faults(&mut self, loss: f64, dup: f64) {
        self.net.loss = loss;
        self.net.dup = dup;
    }

    fn engine_config(&self, n: usize) -> EngineConfig {
        let node = &self.nodes[n];
        let mut cfg = self.cfg.engine.clone();
        cfg.role = node.role;
        cfg.bootstrap =
            node.bootstrap.iter().map(|b| (self.nodes[*b].addr.clone(), Some(self.nodes[*b].peer))).collect();
        cfg.remembered = node.remembered.clone();
        cfg.revocations = node.revocations.clone();
        cfg.seed = self.seed ^ ((n as u64) << 32) ^ (node.life << 48);
        cfg.lease_boot = node.lease_log.clone();
        cfg.wall_ms_at_start = self.wall_ms(n, self.net.now);
        cfg
    }

    /// Starts node `n` over its store: a fresh engine, which dials its bootstrap peers.
    fn boot(&mut self, n: usize) {
        let cfg = self.engine_config(n);
        let now = self.nodes[n].clock.at(self.net.now);
        let node = &mut self.nodes[n];
        node.started = true;
        let engine = Engine::new(node.signer.clone(), cfg, &node.store, now);
        node.live = Some(Live {
            engine,
            writer: VecDeque::new(),
            commit_scheduled: false,
            replies: BTreeMap::new(),
            verdicts: BTreeMap::new(),
            seen: BTreeMap::new(),
            join_target: None,
            tick_at: None,
            dialing: BTreeSet::new(),
            gossip_blocked: BTreeSet::new(),
            in_tick: false,
            tick_digests: 0,
            ack_waits: BTreeMap::new(),
            lease_waits: BTreeMap::new(),
        });
        // The swarm dials the bootstrap peers itself; the engine redials them later.
        for b in self.nodes[n].bootstrap.clone() {
            self.dial(n, b);
        }
        self.drain(n);
        self.after_input(n);
    }

    /// Node `n` crashes: its engine and everything volatile go, its connections close; its store
    /// stays (but for chunks staged without a durable commit).
    pub fn crash(&mut self, n: usize) {
        if self.nodes[n].live.take().is_none() {
            return;
        }
        self.nodes[n].life += 1;
        self.nodes[n].store.crash();
        self.forget_lease_asks(n);
        for (p, _) in self.net.peers(n) {
            self.net.close(n, p);
            self.local(p, Duration::ZERO, Input::Disconnected { peer: self.nodes[n].peer, remaining: 0 });
        }
    }

    /// Starts node `n` again (or for the first time, if it is a late joiner).
    pub fn restart(&mut self, n: usize) {
        if self.nodes[n].live.is_none() {
            self.nodes[n].stats.restarts += 1;
            self.boot(n);
        }
    }

    /// Closes the connection between `a` and `b`, if any: both ends hear of it.
    pub(crate) fn close(&mut self, a: usize, b: usize) {
        if self.net.close(a, b) {
            self.local(a, Duration::ZERO, Input::Disconnected { peer: self.nodes[b].peer, remaining: 0 });
            self.local(b, Duration::ZERO, Input::Disconnected { peer: self.nodes[a].peer, remaining: 0 });
        }
    }

    pub fn cut(&mut self, a: usize, b: usize) {
        self.net.set_cut(a, b, true);
        self.close(a, b);
    }

    /// Cuts every link between `side` and the rest.
    pub fn partition(&mut self, side: &[usize]) {
        for a in side.iter().copied() {
            for b in (0..self.nodes.len()).filter(|b| !side.contains(b)) {
                self.cut(a, b);
            }
        }
    }

    /// Lets every link carry messages again; connections come back when the engines dial.
    pub fn heal_all(&mut self) {
        self.net.heal_all();
    }

    /// Primary `n` writes a batch of 1..=5 ops to random keys, commits it, and hands it to its
    /// engine to publish. A quarter of the time it is two or three batches handed over together, as
    /// the node's loop does with commits that queued up while it was busy (the engine joins them).
    /// The write is acknowledged once committed.
    pub fn write(&mut self, n: usize) {
        if self.nodes[n].live.is_none() || self.nodes[n].role != Role::Primary {
            return;
        }
        let parts = if self.net.rng.gen_range(0..4) == 0 { self.net.rng.gen_range(2..=3) } else { 1 };
        let mut batches = Vec::with_capacity(parts);
        for _ in 0..parts {
            let count = self.net.rng.gen_range(1..=5);
            let keys = self.cfg.keys;
            let ops: Vec<(Vec<u8>, i64)> = (0..count)
                .map(|_| {
                    (
                        vec![self.net.rng.gen_range(0..keys)],
                        self.net.rng.gen_range(1..=9) * [-1, 1][self.net.rng.gen_range(0..2)],
                    )
                })
                .collect();
            let wall_ms = self.net.now.as_millis() as u64;
            let node = &mut self.nodes[n];
            batches.push(Arc::new(node.store.write_local(&node.signer, &ops, wall_ms)));
            self.written.entry(node.peer).or_default().extend(ops);
        }
        let seq = batches.last().expect("one batch at least").head.seq;
        self.feed(n, Input::Committed { batches });
        // A third of the writes wait for acknowledgements, as `?ack=` does.
        if self.net.rng.gen_range(0..3) == 0 {
            let ack = match self.net.rng.gen_range(0..4) {
                0 => AckWanted::Majority,
                1 => AckWanted::All,
                _ => AckWanted::Peers(self.net.rng.gen_range(1..=3)),
            };
            let timeout = Duration::from_millis(self.net.rng.gen_range(5..=3_000));
            // Seqs are unique per node: one names the wait.
            let wait = WaitId(seq.0);
            self.nodes[n].live.as_mut().expect("up").ack_waits.insert(wait, seq);
            self.feed(n, Input::AwaitAcks { wait, seq, ack, timeout });
        }
    }

    /// Node `n` makes a snapshot, tells its engine, and compacts its log down to `retain` ops.
    pub fn snapshot(&mut self, n: usize, retain: u64) -> u64 {
        if self.nodes[n].live.is_none() {
            return 0;
        }
        let chunk_raw = self.cfg.chunk_raw;
        let node = &mut self.nodes[n];
        let cid = node.store.create_snapshot(&node.signer, CLUSTER, chunk_raw);
        let deleted = node.store.compact(retain);
        self.feed(n, Input::SnapshotCreated { cid });
        deleted
    }

    /// Schedules an input for `n`'s engine from its executor, `delay` from now, in this life.
    pub(crate) fn local(&mut self, n: usize, delay: Duration, input: Input) {
        let life = self.nodes[n].life;
        self.net.after(delay, Event::Local { node: n, life, input });
    }

    /// Hands `input` to node `n`'s engine and carries out what it asks.
    pub(crate) fn feed(&mut self, n: usize, input: Input) {
        let now = self.nodes[n].clock.at(self.net.now);
        self.inputs += 1;
        self.trace.update(&(self.net.now.as_nanos() as u64).to_le_bytes());
        self.trace.update(&[n as u8, discriminant(&input)]);
        if self.tracing {
            eprintln!("{:>12?} node {n} <- {}", self.net.now, brief(&input));
        }
        let node = &mut self.nodes[n];
        let Some(live) = node.live.as_mut() else { return };
        live.in_tick = matches!(input, Input::Tick);
        live.tick_digests = 0;
        live.engine.handle(now, input, &node.store);
        self.drain(n);
        if let Some(live) = self.nodes[n].live.as_mut() {
            if live.in_tick && live.tick_digests > 0 {
                let d = live.tick_digests;
                self.nodes[n].stats.rounds += 1;
                self.nodes[n].stats.round_digests += d;
            }
        }
        self.after_input(n);
    }

    fn drain(&mut self, n: usize) {
        while let Some(action) = self.nodes[n].live.as_mut().and_then(|l| l.engine.poll_action()) {
            if self.tracing {
                eprintln!("{:>12?} node {n} -> {}", self.net.now, brief(&action));
            }
            self.execute(n, action);
        }
    }

    /// Checks the node's bounds and phase, and schedules its next tick.
    fn after_input(&mut self, n: usize) {
        let seed = self.seed;
        let cfg = &self.cfg;
        let node = &mut self.nodes[n];
        let Some(live) = node.live.as_mut() else { return };
        let e = &live.engine;
        let (out, serving, applying) = e.queue_sizes();
        let ec = e.config();
        let out_bound = ec.max_peers * (1 + ec.chunks_per_source)
            + cfg.primaries * (1 + peersync::sync::leases::MAX_MESSAGES_IN_FLIGHT)
            + 24;
        let apply_bound = ec.max_applying + ec.gap.max_ops + cfg.primaries + 1;
        assert!(
            out <= out_bound && serving <= ec.max_serving && applying <= apply_bound,
            "seed {seed}: node {n}'s queues are ({out} requests out, {serving} serving, {applying} applying), \
             bounds ({out_bound}, {}, {apply_bound})",
            ec.max_serving
        );
        let buffered = e.buffered_ops();
        assert!(buffered <= ec.gap.max_ops, "seed {seed}: node {n} buffers {buffered} ops, over {:?}", ec.gap);
        assert!(
            live.replies.len() <= 1024 && live.verdicts.len() <= 4096 && live.writer.len() <= apply_bound,
            "seed {seed}: node {n}'s executor queues grew: {} replies, {} verdicts, {} queued applies",
            live.replies.len(),
            live.verdicts.len(),
            live.writer.len()
        );
        if e.phase() == Phase::Active {
            check_join_target(seed, n, live, &node.store);
        }
        let Some(at) = e.poll_timeout() else { return };
        let at = node.clock.when(at).max(self.net.now);
        if live.tick_at != Some(at) {
            live.tick_at = Some(at);
            let life = node.life;
            self.net.schedule(at, Event::Tick { node: n, life });
        }
    }

    /// Runs every event due within `d` of simulated time.
    pub fn run_for(&mut self, d: Duration) {
        let until = self.net.now + d;
        while let Some(event) = self.net.pop(until) {
            self.handle(event);
        }
        self.net.now = until;
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Tick { node, life } => {
                let now = self.net.now;
                if self.nodes[node].life != life {
                    return;
                }
                let Some(live) = self.nodes[node].live.as_mut() else { return };
                if live.tick_at != Some(now) {
                    return; // superseded
                }
                live.tick_at = None;
                self.feed(node, Input::Tick);
            }
            Event::Local { node, life, input } => {
                if self.nodes[node].life == life {
                    self.feed(node, input);
                }
            }
            Event::Commit { node, life } => {
                if self.nodes[node].life == life {
                    self.commit(node);
                }
            }
            Event::Deliver { to, from, conn, msg } => {
                if self.net.conn(to, from) != Some(conn) {
                    self.net.stats.stale += 1;
                    return;
                }
                self.deliver(to, from, conn, msg);
            }
            Event::DialDone { from, to, life } => self.dial_done(from, to, life),
            Event::Identify { node, peer, conn } => {
                if self.net.conn(node, peer) == Some(conn) {
                    let p = &self.nodes[peer];
                    let identified = Input::Identified {
                        peer: p.peer,
                        agent: Some((p.role, CLUSTER.to_owned())),
                        listen_addrs: vec![p.addr.clone()],
                    };
                    let rtt = self.net.latency(node, peer) * 2;
                    let peer_id = p.peer;
                    self.feed(node, identified);
                    self.feed(node, Input::Rtt { peer: peer_id, rtt });
                }
            }
        }
    }
}

/// A number naming the kind of an input, for the trace (`DefaultHasher` has fixed keys).
fn discriminant(input: &Input) -> u8 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    std::mem::discriminant(input).hash(&mut h);
    h.finish() as u8
}

/// An input or action in one line, without the bulk (op bytes, chunks, entries).
fn brief(x: &dyn std::fmt::Debug) -> String {
    let s = format!("{x:?}");
    if s.len() > 300 {
        format!("{}...", &s[..s.char_indices().nth(300).map_or(s.len(), |(i, _)| i)])
    } else {
        s
    }
}
