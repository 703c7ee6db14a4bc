//! A simulated snapshot pull: a `SnapshotPull` driven against sources that answer late, die, or
//! serve corrupt chunks, with a model of what the pull should consider in flight and held.
//!
//! The caller's side is modelled as the node would do it: a verified chunk is `on_chunk`, one that
//! fails verification `on_corrupt` (corrupt = the model says verification fails), a request that a
//! dead source cannot answer `on_failure` (or the source is `remove_source`d when it disconnects).
//! Slow answers arrive after the pull's own timeout: then the network either still delivers them
//! (a late answer) or reports a failure.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use cid::Cid;
use libp2p::identity::Keypair;
use libp2p::PeerId;
use peersync::op::raw_cid;
use peersync::sync::SnapshotPull;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The least pause after a failure: 250 ms doubled for the first strike.
const MIN_PAUSE: Duration = Duration::from_millis(500);

#[derive(Debug, Clone)]
pub struct Source {
    pub peer: PeerId,
    rtt: Duration,
    /// Never serves a corrupt chunk.
    pub honest: bool,
    corrupt_p: f64,
    slow_p: f64,
    pub dies_at: Option<Instant>,
    /// On death the caller removes the source rather than failing its requests.
    remove_on_death: bool,
    dead: bool,
    last_failure: Option<Instant>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    Chunk,
    Corrupt,
    Failure,
}

#[derive(Debug, Clone, Copy)]
enum Ev {
    Answer { src: usize, index: usize, answer: Answer },
    Die { src: usize },
}

/// Counters, to check that the faults really happened.
#[derive(Debug, Default, Clone)]
pub struct PullStats {
    pub requests: u64,
    pub corrupt: u64,
    pub failures: u64,
    pub late: u64,
    pub deaths: u64,
    /// Times `next_wakeup()` named an instant already past right after `next_requests(now)`.
    pub stale_wakeups: u64,
}

pub struct PullSim {
    pub seed: u64,
    rng: StdRng,
    start: Instant,
    pub now: Instant,
    pub pull: SnapshotPull,
    chunks: Vec<(Cid, u64)>,
    pub sources: Vec<Source>,
    events: BTreeMap<(Instant, u64), Ev>,
    next_id: u64,
    timeout: Duration,
    per_source: usize,
    /// Whether to assert that no source has more than `per_source` requests in flight.
    pub check_per_source: bool,
    /// Requests the pull still counts as in flight, per chunk: (source, since).
    live: BTreeMap<usize, (usize, Instant)>,
    /// Chunks for which a verified answer was handed to the pull (or held at the start).
    held: BTreeSet<usize>,
    pub stats: PullStats,
}

fn peer(rng: &mut StdRng) -> PeerId {
    let mut key = [0u8; 32];
    rng.fill(&mut key);
    Keypair::ed25519_from_bytes(key).expect("32 bytes are a valid key").public().to_peer_id()
}

impl PullSim {
    /// A pull of 20..=200 chunks from 2..=4 sources. With `keeper`, source 0 is honest, never dies
    /// and always answers in time; every other source may lie, be slow, and die.
    pub fn new(seed: u64, keeper: bool) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let start = Instant::now();
        let n = rng.gen_range(20..=200);
        let chunks: Vec<(Cid, u64)> = (0..n)
            .map(|i: usize| {
                let mut bytes = (i as u64).to_le_bytes().to_vec();
                bytes.extend_from_slice(&seed.to_le_bytes());
                (raw_cid(&bytes), rng.gen_range(1..=1000))
            })
            .collect();
        let held: BTreeSet<usize> = (0..n).filter(|_| rng.gen_bool(0.1)).collect();
        let held_cids: BTreeSet<Cid> = held.iter().map(|i| chunks[*i].0).collect();
        let per_source = rng.gen_range(1..=4);
        let timeout = Duration::from_millis(rng.gen_range(500..=3000));
        let pull = SnapshotPull::new(chunks.clone(), |c| held_cids.contains(c), per_source, timeout);
        let count = rng.gen_range(2..=4);
        let sources = (0..count)
            .map(|i| {
                let keep = keeper && i == 0;
                let honest = keep || rng.gen_bool(0.3);
                Source {
                    peer: peer(&mut rng),
                    rtt: Duration::from_millis(rng.gen_range(1..=100)),
                    honest,
                    corrupt_p: if honest { 0.0 } else { rng.gen_range(0.05..0.6) },
                    slow_p: if keep { 0.0 } else { rng.gen_range(0.0..0.3) },
                    dies_at: (!keep && rng.gen_bool(0.6))
                        .then(|| start + Duration::from_millis(rng.gen_range(0..20_000))),
                    remove_on_death: rng.gen_bool(0.5),
                    dead: false,
                    last_failure: None,
                }
            })
            .collect();
        let mut sim = PullSim {
            seed,
            rng,
            start,
            now: start,
            pull,
            chunks,
            sources,
            events: BTreeMap::new(),
            next_id: 0,
            timeout,
            per_source,
            check_per_source: false,
            live: BTreeMap::new(),
            held,
            stats: PullStats::default(),
        };
        for i in 0..sim.sources.len() {
            let s = &sim.sources[i];
            sim.pull.add_source(s.peer, Some(s.rtt));
            if let Some(at) = s.dies_at {
                sim.schedule(at, Ev::Die { src: i });
            }
        }
        sim
    }

    /// Every source dies at once at the start, and failing requests are reported (not removed).
    pub fn all_dead(seed: u64) -> Self {
        let mut sim = PullSim::new(seed, false);
        sim.events.clear();
        for s in &mut sim.sources {
            s.dies_at = Some(sim.start);
            s.remove_on_death = false;
            s.dead = true;
        }
        sim
    }

    pub fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    fn schedule(&mut self, at: Instant, ev: Ev) {
        self.next_id += 1;
        self.events.insert((at, self.next_id), ev);
    }

    fn src_of(&self, peer: &PeerId) -> usize {
        self.sources.iter().position(|s| s.peer == *peer).expect("a known source")
    }

    /// The pull gave up on everything `src` had in flight.
    fn release(&mut self, src: usize) {
        self.live.retain(|_, (s, _)| *s != src);
    }

    fn failed(&mut self, src: usize) {
        self.release(src);
        self.sources[src].last_failure = Some(self.now);
    }

    /// Asks the pull for requests, checks them, and schedules their answers.
    fn issue(&mut self) {
        // Requests the pull will time out now, as `next_requests` does.
        let late: Vec<usize> = self
            .live
            .iter()
            .filter(|(_, (_, since))| self.now.duration_since(*since) >= self.timeout)
            .map(|(_, (s, _))| *s)
            .collect();
        for src in late {
            self.failed(src);
        }
        let reqs = self.pull.next_requests(self.now);
        let seed = self.seed;
        for r in &reqs {
            let src = self.src_of(&r.peer);
            assert_eq!(r.cid, self.chunks[r.index].0, "seed {seed}: request names the wrong cid");
            assert!(!self.held.contains(&r.index), "seed {seed}: chunk {} asked again though held", r.index);
            if let Some((other, _)) = self.live.get(&r.index) {
                panic!("seed {seed}: chunk {} asked of source {src} while in flight at source {other}", r.index);
            }
            if let Some(f) = self.sources[src].last_failure {
                assert!(
                    self.now >= f + MIN_PAUSE,
                    "seed {seed}: source {src} asked at {:?}, {:?} after it failed",
                    self.now - self.start,
                    self.now - f
                );
            }
            self.live.insert(r.index, (src, self.now));
            let at_source = self.live.values().filter(|(s, _)| *s == src).count();
            assert!(
                !self.check_per_source || at_source <= self.per_source,
                "seed {seed}: {at_source} requests in flight at source {src}, limit {} (at {:?})",
                self.per_source,
                self.elapsed()
            );
            self.stats.requests += 1;
            self.schedule_answer(src, r.index);
        }
        if self.pull.next_wakeup(self.now).is_some_and(|t| t <= self.now) {
            self.stats.stale_wakeups += 1;
        }
    }

    fn schedule_answer(&mut self, src: usize, index: usize) {
        let s = self.sources[src].clone();
        if s.dead {
            let at = self.now + Duration::from_millis(self.rng.gen_range(1..=5));
            self.schedule(at, Ev::Answer { src, index, answer: Answer::Failure });
            return;
        }
        let answer = if self.rng.gen_bool(s.corrupt_p) { Answer::Corrupt } else { Answer::Chunk };
        if self.rng.gen_bool(s.slow_p) {
            // Past the pull's timeout: a late answer, or the network's own timeout.
            let at = self.now
                + self.timeout
                + Duration::from_millis(self.rng.gen_range(0..=self.timeout.as_millis() as u64));
            let answer = if self.rng.gen_bool(0.5) { answer } else { Answer::Failure };
            self.schedule(at, Ev::Answer { src, index, answer });
        } else {
            let jitter = Duration::from_millis(self.rng.gen_range(0..=50));
            let at = self.now + (s.rtt + jitter).min(self.timeout - Duration::from_millis(1));
            self.schedule(at, Ev::Answer { src, index, answer });
        }
    }

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::Answer { src, index, answer } => {
                let peer = self.sources[src].peer;
                let expected = self.live.get(&index).is_some_and(|(s, _)| *s == src);
                if !expected {
                    self.stats.late += 1;
                }
                let len = self.chunks[index].1;
                match answer {
                    Answer::Chunk => {
                        self.pull.on_chunk(&peer, index, len);
                        // Verified bytes: held, whoever else still has the chunk in flight.
                        self.live.remove(&index);
                        self.held.insert(index);
                    }
                    Answer::Corrupt => {
                        assert!(!self.sources[src].honest, "model: honest sources never lie");
                        self.stats.corrupt += 1;
                        self.pull.on_corrupt(&peer, index, len, self.now);
                        self.failed(src);
                    }
                    Answer::Failure => {
                        self.stats.failures += 1;
                        self.pull.on_failure(&peer, index, self.now);
                        self.failed(src);
                    }
                }
            }
            Ev::Die { src } => {
                self.stats.deaths += 1;
                self.sources[src].dead = true;
                let peer = self.sources[src].peer;
                let pending: Vec<((Instant, u64), usize)> = self
                    .events
                    .iter()
                    .filter_map(|(k, e)| match e {
                        Ev::Answer { src: s, index, .. } if *s == src => Some((*k, *index)),
                        _ => None,
                    })
                    .collect();
                for (k, _) in &pending {
                    self.events.remove(k);
                }
                if self.sources[src].remove_on_death {
                    self.pull.remove_source(&peer);
                    self.release(src);
                } else {
                    for (_, index) in pending {
                        self.stats.failures += 1;
                        self.pull.on_failure(&peer, index, self.now);
                        self.failed(src);
                    }
                }
            }
        }
        self.check_held();
    }

    /// The pull holds exactly the chunks a verified answer came for.
    fn check_held(&self) {
        let p = self.pull.progress(self.now);
        let bytes: u64 = self.held.iter().map(|i| self.chunks[*i].1).sum();
        assert_eq!(
            (p.chunks_have, p.bytes_have),
            (self.held.len(), bytes),
            "seed {}: the pull's held chunks differ from the verified answers",
            self.seed
        );
    }

    /// Runs until complete or `bound`; returns the time taken when complete.
    pub fn run(&mut self, bound: Duration, mut each_step: impl FnMut(&PullSim)) -> Option<Duration> {
        loop {
            self.issue();
            each_step(self);
            if self.pull.is_complete() {
                assert_eq!(self.held.len(), self.chunks.len(), "seed {}: complete without every chunk", self.seed);
                return Some(self.elapsed());
            }
            let next_event = self.events.first_key_value().map(|(k, _)| k.0);
            let wakeup = self.pull.next_wakeup(self.now);
            let Some(next) = [next_event, wakeup].into_iter().flatten().min() else {
                // No answer pending and no future wakeup named: step past the longest pause
                // (250 ms << 11), so a resume hidden behind a stale `next_wakeup` is not missed.
                let resume = self.now + Duration::from_millis(250 << 11);
                if resume - self.start > bound {
                    return None;
                }
                self.now = resume;
                continue;
            };
            if next - self.start > bound {
                self.now = self.start + bound;
                return None;
            }
            self.now = next;
            while let Some(entry) = self.events.first_entry() {
                if entry.key().0 > self.now {
                    break;
                }
                let ev = entry.remove();
                self.handle(ev);
            }
        }
    }

    /// Sources the model knows are paused now (failed within the least pause).
    pub fn surely_paused(&self) -> usize {
        self.sources.iter().filter(|s| s.last_failure.is_some_and(|f| self.now < f + MIN_PAUSE)).count()
    }

    pub fn honest_alive(&self) -> bool {
        self.sources.iter().any(|s| s.honest && s.dies_at.is_none())
    }

    pub fn held(&self) -> usize {
        self.held.len()
    }
}
