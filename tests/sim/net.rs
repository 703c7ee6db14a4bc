//! The simulator's network and clocks: an event queue in simulated time, links with latency that
//! lose, duplicate and reorder messages, connections that partitions and crashes close, and one
//! clock per node that may be offset and run fast or slow.
//!
//! Events run in `(time, id)` order and every random choice comes from one seeded RNG, so a run is a
//! pure function of its seed.

use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;
use std::time::{Duration, Instant};

use peersync::sync::{Input, ReqId};
use peersync::wire::{SyncRequest, SyncResponse};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// What travels on a connection.
#[derive(Debug)]
pub enum Msg {
    Request {
        from: usize,
        req: ReqId,
        request: SyncRequest,
    },
    Response {
        req: ReqId,
        result: Result<SyncResponse, String>,
    },
    /// A gossip payload; `copy` marks a duplicate the network made, which gossipsub's seen-cache
    /// would not catch (it arrives after the cache forgot the first).
    Gossip {
        from: usize,
        data: Rc<Vec<u8>>,
        id: u64,
        copy: bool,
    },
}

#[derive(Debug)]
pub enum Event {
    Deliver {
        to: usize,
        from: usize,
        conn: u64,
        msg: Msg,
    },
    /// The engine's timer: due when its `poll_timeout` said.
    Tick {
        node: usize,
        life: u64,
    },
    /// Something the executor reports to its own engine (a store outcome, a connection event...).
    Local {
        node: usize,
        life: u64,
        input: Input,
    },
    /// The writer commits what is queued.
    Commit {
        node: usize,
        life: u64,
    },
    /// A dial's handshake is done (or failed).
    DialDone {
        from: usize,
        to: usize,
        life: u64,
    },
    /// Identify and ping of `peer` reach `node`.
    Identify {
        node: usize,
        peer: usize,
        conn: u64,
    },
}

/// A node's clock: the run's base instant, an offset, and a rate off by `drift_ppm` millionths.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    pub base: Instant,
    pub offset: Duration,
    pub drift_ppm: i64,
}

impl Clock {
    /// The node's reading at simulated time `t`.
    pub fn at(&self, t: Duration) -> Instant {
        let t = t.as_nanos() as i128;
        let local = t + t * self.drift_ppm as i128 / 1_000_000;
        self.base + self.offset + Duration::from_nanos(local as u64)
    }

    /// The first simulated time at which the node's clock reads `when` or later.
    pub fn when(&self, when: Instant) -> Duration {
        let Some(local) = when.checked_duration_since(self.base + self.offset) else { return Duration::ZERO };
        let local = local.as_nanos() as i128;
        let mut t = Duration::from_nanos((local * 1_000_000 / (1_000_000 + self.drift_ppm as i128)) as u64);
        while self.at(t) < when {
            t += Duration::from_nanos(1);
        }
        t
    }
}

/// Counters of what the network did.
#[derive(Debug, Default, Clone)]
pub struct NetStats {
    pub sent: u64,
    pub lost: u64,
    pub duplicated: u64,
    /// Delivered after its connection closed: dropped.
    pub stale: u64,
    pub max_events: usize,
}

pub struct Net {
    pub now: Duration,
    /// Boxed: entries move around as the map grows, and events are a few hundred bytes.
    events: BTreeMap<(Duration, u64), Box<Event>>,
    next_event: u64,
    pub rng: StdRng,
    /// One-way latency of each link.
    latency: Vec<Vec<Duration>>,
    /// Links that carry nothing (partitions).
    cut: BTreeSet<(usize, usize)>,
    /// Open connections: per node, peer -> connection id.
    adj: Vec<BTreeMap<usize, u64>>,
    next_conn: u64,
    pub loss: f64,
    pub dup: f64,
    pub max_jitter: Duration,
    pub stats: NetStats,
}

/// Events pending at most: the simulator's own queue is bounded too.
const MAX_EVENTS: usize = 2_000_000;

fn pair(a: usize, b: usize) -> (usize, usize) {
    (a.min(b), a.max(b))
}

impl Net {
    pub fn new(nodes: usize, mut rng: StdRng) -> Self {
        // Each link's latency, 1 to 30 ms to the microsecond (so nearest-first choices rarely
        // tie), drawn from the pair and one seed: the same both ways.
        let base: u64 = rng.gen();
        let link = |a: usize, b: usize| {
            let mut pair = StdRng::seed_from_u64(base ^ ((a.min(b) as u64) << 32) ^ a.max(b) as u64);
            Duration::from_micros(pair.gen_range(1_000..=30_000))
        };
        let latency = (0..nodes)
            .map(|a| (0..nodes).map(|b| if a == b { Duration::ZERO } else { link(a, b) }).collect())
            .collect();
        Net {
            now: Duration::ZERO,
            events: BTreeMap::new(),
            next_event: 0,
            rng,
            latency,
            cut: BTreeSet::new(),
            adj: vec![BTreeMap::new(); nodes],
            next_conn: 0,
            loss: 0.0,
            dup: 0.0,
            max_jitter: Duration::from_millis(50),
            stats: NetStats::default(),
        }
    }

    pub fn schedule(&mut self, at: Duration, event: Event) {
        self.next_event += 1;
        self.events.insert((at.max(self.now), self.next_event), Box::new(event));
        self.stats.max_events = self.stats.max_events.max(self.events.len());
        assert!(self.events.len() <= MAX_EVENTS, "the simulator's event queue passed {MAX_EVENTS}");
    }

    pub fn after(&mut self, d: Duration, event: Event) {
        self.schedule(self.now + d, event);
    }

    /// The next event due at or before `until`, advancing the time to it.
    pub fn pop(&mut self, until: Duration) -> Option<Event> {
        let entry = self.events.first_entry()?;
        if entry.key().0 > until {
            return None;
        }
        let ((at, _), event) = entry.remove_entry();
        self.now = at;
        Some(*event)
    }

    pub fn latency(&self, a: usize, b: usize) -> Duration {
        self.latency[a][b]
    }

    /// Whether the network lets `a` and `b` talk (not whether they are up or connected).
    pub fn reachable(&self, a: usize, b: usize) -> bool {
        a != b && !self.cut.contains(&pair(a, b))
    }

    pub fn conn(&self, a: usize, b: usize) -> Option<u64> {
        self.adj[a].get(&b).copied()
    }

    pub fn peers(&self, n: usize) -> Vec<(usize, u64)> {
        self.adj[n].iter().map(|(p, c)| (*p, *c)).collect()
    }

    pub fn open(&mut self, a: usize, b: usize) -> u64 {
        self.next_conn += 1;
        self.adj[a].insert(b, self.next_conn);
        self.adj[b].insert(a, self.next_conn);
        self.next_conn
    }

    /// Closes the connection between `a` and `b`; whether there was one.
    pub fn close(&mut self, a: usize, b: usize) -> bool {
        self.adj[b].remove(&a);
        self.adj[a].remove(&b).is_some()
    }

    pub fn set_cut(&mut self, a: usize, b: usize, cut: bool) {
        if cut {
            self.cut.insert(pair(a, b));
        } else {
            self.cut.remove(&pair(a, b));
        }
    }

    pub fn heal_all(&mut self) {
        self.cut.clear();
    }

    /// Sends `msg` on connection `conn` from `from` to `to`: lost, or delivered after the link's
    /// latency plus jitter (so messages reorder), sometimes twice.
    pub fn transmit(&mut self, from: usize, to: usize, conn: u64, msg: Msg) {
        self.stats.sent += 1;
        if self.loss > 0.0 && self.rng.gen_bool(self.loss) {
            self.stats.lost += 1;
            return;
        }
        let copy = if self.dup > 0.0 && self.rng.gen_bool(self.dup) { duplicate(&msg) } else { None };
        let base = self.latency[from][to];
        let jitter = self.jitter();
        self.after(base + jitter, Event::Deliver { to, from, conn, msg });
        if let Some(copy) = copy {
            self.stats.duplicated += 1;
            let jitter = self.jitter();
            self.after(base + jitter * 2, Event::Deliver { to, from, conn, msg: copy });
        }
    }

    fn jitter(&mut self) -> Duration {
        if self.max_jitter.is_zero() {
            return Duration::ZERO;
        }
        Duration::from_micros(self.rng.gen_range(0..=self.max_jitter.as_micros() as u64))
    }
}

fn duplicate(msg: &Msg) -> Option<Msg> {
    Some(match msg {
        Msg::Request { from, req, request } => Msg::Request { from: *from, req: *req, request: request.clone() },
        Msg::Response { req, result } => Msg::Response { req: *req, result: result.clone() },
        Msg::Gossip { from, data, id, .. } => Msg::Gossip { from: *from, data: data.clone(), id: *id, copy: true },
    })
}
