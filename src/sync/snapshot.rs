//! Pulling a snapshot's chunks from several sources: which chunk to ask of whom, and what to do
//! when a source is slow, dies, or lies.
//!
//! The destination drives: it knows the manifest (chunk CIDs and sizes) and which chunks it already
//! holds (verified and persisted, so a restart resumes with only the missing ones). Each missing
//! chunk is asked of one source at a time; sources are used nearest first (lowest round-trip time),
//! each with a bounded number of requests in flight. A source that serves a corrupt chunk or fails
//! is dropped for a while, with a pause that doubles with every strike, and its chunks go to the
//! others. No I/O and no clock: the caller passes `now`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use cid::Cid;
use libp2p::PeerId;

use super::doubling;
use crate::snapshot::SnapshotBrief;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Missing,
    /// Asked of this source; the request itself is tracked in the source's `in_flight`.
    Assigned(PeerId),
    Have,
}

#[derive(Debug, Clone)]
struct Source {
    rtt: Option<Duration>,
    /// Requests outstanding at this source: chunk index -> when it was sent. An answer removes its
    /// entry; a failure abandons them all (late answers then change nothing here).
    in_flight: BTreeMap<usize, Instant>,
    strikes: u32,
    paused_until: Option<Instant>,
}

impl Source {
    fn usable(&self, now: Instant) -> bool {
        self.paused_until.is_none_or(|t| t <= now)
    }
}

/// When a snapshot whose pull failed (no source served its manifest, or its install was refused) may
/// be chosen again: 1 s after the first failure, doubling up to 60 s, so a node that needs a snapshot
/// nobody serves correctly keeps trying without spinning. Bounded to 64 snapshots.
#[derive(Debug, Default)]
pub struct SnapshotRetry {
    failures: BTreeMap<Cid, (u32, Instant)>,
}

impl SnapshotRetry {
    pub fn failed(&mut self, cid: Cid, now: Instant) {
        if self.failures.len() >= 64 && !self.failures.contains_key(&cid) {
            self.failures.clear();
        }
        let strikes = self.failures.get(&cid).map_or(0, |(n, _)| *n) + 1;
        let pause = doubling(Duration::from_secs(1), strikes - 1, Duration::from_secs(60));
        self.failures.insert(cid, (strikes, now + pause));
    }

    pub fn succeeded(&mut self, cid: &Cid) {
        self.failures.remove(cid);
    }

    /// Whether `cid` may be pulled at `now`.
    pub fn allows(&self, cid: &Cid, now: Instant) -> bool {
        self.failures.get(cid).is_none_or(|(_, until)| *until <= now)
    }
}

/// Longest wait of a pull after chunks could not be kept locally.
pub const MAX_LOCAL_PAUSE: Duration = Duration::from_secs(30);

/// A chunk request to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkRequest {
    pub peer: PeerId,
    pub index: usize,
    pub cid: Cid,
}

/// How far a pull has come, for status.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct PullProgress {
    pub chunks_total: usize,
    pub chunks_have: usize,
    pub bytes_total: u64,
    pub bytes_have: u64,
    /// Sources usable now (not paused).
    pub sources: usize,
    /// Chunk bytes received over the network, including any that failed verification.
    pub bytes_fetched: u64,
}

#[derive(Debug)]
pub struct SnapshotPull {
    chunks: Vec<(Cid, u64, Slot)>,
    sources: BTreeMap<PeerId, Source>,
    per_source: usize,
    timeout: Duration,
    bytes_fetched: u64,
    /// Local failures to keep a chunk in a row (a full disk, say), and until when the whole pull
    /// waits because of them: asking again at once would fetch the same bytes only to drop them.
    local_strikes: u32,
    local_paused_until: Option<Instant>,
}

impl SnapshotPull {
    /// `chunks`: CID and size of each chunk in manifest order; `have` tells which are already held.
    pub fn new(chunks: Vec<(Cid, u64)>, have: impl Fn(&Cid) -> bool, per_source: usize, timeout: Duration) -> Self {
        let chunks = chunks
            .into_iter()
            .map(|(cid, size)| (cid, size, if have(&cid) { Slot::Have } else { Slot::Missing }))
            .collect();
        SnapshotPull {
            chunks,
            sources: BTreeMap::new(),
            per_source: per_source.max(1),
            timeout,
            bytes_fetched: 0,
            local_strikes: 0,
            local_paused_until: None,
        }
    }

    /// A peer that holds the snapshot (found through Kademlia or a digest).
    pub fn add_source(&mut self, peer: PeerId, rtt: Option<Duration>) {
        let s = self.sources.entry(peer).or_insert(Source {
            rtt,
            in_flight: BTreeMap::new(),
            strikes: 0,
            paused_until: None,
        });
        if rtt.is_some() {
            s.rtt = rtt;
        }
    }

    /// A source went away: its chunks are asked elsewhere.
    pub fn remove_source(&mut self, peer: &PeerId) {
        self.sources.remove(peer);
        self.unassign(peer);
    }

    /// Chunks assigned to `peer` and not yet held go back to missing.
    fn unassign(&mut self, peer: &PeerId) {
        for (_, _, slot) in &mut self.chunks {
            if *slot == Slot::Assigned(*peer) {
                *slot = Slot::Missing;
            }
        }
    }

    /// The requests to send now: missing chunks in order, to the nearest usable sources first.
    pub fn next_requests(&mut self, now: Instant) -> Vec<ChunkRequest> {
        // Requests that took too long count against their source, and their chunks go elsewhere.
        let late: Vec<(PeerId, usize)> = self
            .sources
            .iter()
            .flat_map(|(p, s)| s.in_flight.iter().map(move |(i, since)| (*p, *i, *since)))
            .filter(|(_, _, since)| now.duration_since(*since) >= self.timeout)
            .map(|(p, i, _)| (p, i))
            .collect();
        for (peer, index) in late {
            self.fail(&peer, index, now);
        }
        for s in self.sources.values_mut() {
            if s.paused_until.is_some_and(|t| t <= now) {
                s.paused_until = None;
            }
        }
        if self.local_paused_until.is_some_and(|t| t > now) {
            return Vec::new();
        }
        let mut order: Vec<(PeerId, Duration)> = self
            .sources
            .iter()
            .filter(|(_, s)| s.usable(now))
            .map(|(p, s)| (*p, s.rtt.unwrap_or(Duration::from_secs(3600))))
            .collect();
        order.sort_by_key(|(p, rtt)| (*rtt, *p));
        let mut missing = self.chunks.iter().enumerate().filter(|(_, c)| c.2 == Slot::Missing).map(|(i, _)| i);
        let mut out = Vec::new();
        'sources: for (peer, _) in order {
            let source = self.sources.get_mut(&peer).expect("listed above");
            while source.in_flight.len() < self.per_source {
                let Some(index) = missing.next() else { break 'sources };
                source.in_flight.insert(index, now);
                out.push(ChunkRequest { peer, index, cid: self.chunks[index].0 });
            }
        }
        for r in &out {
            self.chunks[r.index].2 = Slot::Assigned(r.peer);
        }
        out
    }

    /// `peer` answered chunk `index` with `len` bytes that verified and were persisted. A late
    /// answer (its request was abandoned) still delivers a good chunk, but frees no request slot.
    pub fn on_chunk(&mut self, peer: &PeerId, index: usize, len: u64) {
        self.bytes_fetched += len;
        self.local_strikes = 0;
        if let Some(source) = self.sources.get_mut(peer) {
            if source.in_flight.remove(&index).is_some() {
                source.strikes = 0;
            }
        }
        if let Some(c) = self.chunks.get_mut(index) {
            // Held now: a request for it still out at another source is no longer needed.
            if let Slot::Assigned(other) = c.2 {
                if other != *peer {
                    if let Some(s) = self.sources.get_mut(&other) {
                        s.in_flight.remove(&index);
                    }
                }
            }
            c.2 = Slot::Have;
        }
    }

    /// `peer` answered chunk `index` with bytes that failed verification: a lying or broken source.
    pub fn on_corrupt(&mut self, peer: &PeerId, index: usize, len: u64, now: Instant) {
        self.bytes_fetched += len;
        self.fail(peer, index, now);
    }

    /// Chunk `index` from `peer` could not be kept for a local reason (a full disk, say): not the
    /// source's fault, so the source is not paused; the whole pull is, doubling with each such
    /// failure in a row (up to [`MAX_LOCAL_PAUSE`]), and the chunk is asked again after it.
    pub fn on_local_failure(&mut self, peer: &PeerId, index: usize, now: Instant) {
        self.local_strikes += 1;
        let pause = doubling(Duration::from_millis(100), self.local_strikes, MAX_LOCAL_PAUSE);
        self.local_paused_until = Some(now + pause);
        if let Some(source) = self.sources.get_mut(peer) {
            source.in_flight.remove(&index);
        }
        if let Some(c) = self.chunks.get_mut(index) {
            if c.2 == Slot::Assigned(*peer) {
                c.2 = Slot::Missing;
            }
        }
    }

    /// The request for chunk `index` to `peer` failed (timeout, refused, connection lost).
    pub fn on_failure(&mut self, peer: &PeerId, index: usize, now: Instant) {
        self.fail(peer, index, now);
    }

    /// A failing source is paused (doubling with each strike in a row); everything it was asked
    /// goes elsewhere, and its outstanding requests are abandoned.
    fn fail(&mut self, peer: &PeerId, _index: usize, now: Instant) {
        if let Some(source) = self.sources.get_mut(peer) {
            source.in_flight.clear();
            source.strikes += 1;
            let pause = doubling(Duration::from_millis(250), source.strikes, Duration::from_millis(250 << 10));
            source.paused_until = Some(now + pause);
        }
        self.unassign(peer);
    }

    pub fn is_complete(&self) -> bool {
        self.chunks.iter().all(|c| c.2 == Slot::Have)
    }

    /// When something will change if nothing else happens (a paused source resumes or an
    /// outstanding request times out), if that is after `now`; `None` when nothing is waiting.
    pub fn next_wakeup(&self, now: Instant) -> Option<Instant> {
        let resumes = self.sources.values().filter_map(|s| s.paused_until).chain(self.local_paused_until);
        let timeouts = self.sources.values().flat_map(|s| s.in_flight.values().map(|since| *since + self.timeout));
        resumes.chain(timeouts).filter(|t| *t > now).min()
    }

    pub fn progress(&self, now: Instant) -> PullProgress {
        let have = self.chunks.iter().filter(|c| c.2 == Slot::Have);
        PullProgress {
            chunks_total: self.chunks.len(),
            chunks_have: have.clone().count(),
            bytes_total: self.chunks.iter().map(|c| c.1).sum(),
            bytes_have: have.map(|c| c.1).sum(),
            sources: self.sources.values().filter(|s| s.usable(now)).count(),
            bytes_fetched: self.bytes_fetched,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::op::raw_cid;

    fn chunks(n: usize) -> Vec<(Cid, u64)> {
        (0..n).map(|i| (raw_cid(&[i as u8]), 100)).collect()
    }

    #[test]
    fn spreads_chunks_nearest_first_and_never_asks_twice() {
        let (near, far) = (PeerId::random(), PeerId::random());
        let mut pull = SnapshotPull::new(chunks(10), |_| false, 3, Duration::from_secs(10));
        pull.add_source(far, Some(Duration::from_millis(20)));
        pull.add_source(near, Some(Duration::from_millis(1)));
        let now = Instant::now();
        let first = pull.next_requests(now);
        assert_eq!(first.len(), 6);
        assert!(first[..3].iter().all(|r| r.peer == near), "nearest first: {first:?}");
        assert!(pull.next_requests(now).is_empty(), "every source is at its limit");
        for r in &first {
            pull.on_chunk(&r.peer, r.index, 100);
        }
        let second = pull.next_requests(now);
        assert_eq!(second.iter().map(|r| r.index).collect::<Vec<_>>(), vec![6, 7, 8, 9]);
        let mut asked: Vec<usize> = first.iter().chain(&second).map(|r| r.index).collect();
        asked.sort();
        asked.dedup();
        assert_eq!(asked.len(), 10, "each chunk asked once");
    }

    #[test]
    fn a_dead_or_lying_source_loses_its_chunks_to_the_others() {
        let (a, b) = (PeerId::random(), PeerId::random());
        let mut pull = SnapshotPull::new(chunks(4), |_| false, 2, Duration::from_secs(10));
        pull.add_source(a, Some(Duration::from_millis(1)));
        pull.add_source(b, Some(Duration::from_millis(5)));
        let now = Instant::now();
        let reqs = pull.next_requests(now);
        let from_a: Vec<usize> = reqs.iter().filter(|r| r.peer == a).map(|r| r.index).collect();
        pull.on_corrupt(&a, from_a[0], 100, now);
        for r in reqs.iter().filter(|r| r.peer == b) {
            pull.on_chunk(&b, r.index, 100);
        }
        let retry = pull.next_requests(now);
        assert!(retry.iter().all(|r| r.peer == b), "the lying source is paused: {retry:?}");
        assert_eq!(retry.iter().map(|r| r.index).collect::<Vec<_>>(), from_a);
        pull.remove_source(&b);
        assert!(pull.next_requests(now).is_empty(), "a is paused and b is gone");
        let later = now + Duration::from_secs(1);
        assert_eq!(pull.next_requests(later).len(), 2, "a is tried again after its pause");
        assert_eq!(pull.progress(later).bytes_fetched, 300);
    }

    #[test]
    fn a_local_failure_pauses_the_pull_not_the_source() {
        let a = PeerId::random();
        let mut pull = SnapshotPull::new(chunks(2), |_| false, 1, Duration::from_secs(10));
        pull.add_source(a, None);
        let now = Instant::now();
        let first = pull.next_requests(now);
        pull.on_local_failure(&a, first[0].index, now);
        assert!(pull.next_requests(now).is_empty(), "nothing is fetched again at once only to be dropped");
        let resume = pull.next_wakeup(now).expect("a wake-up when the pause ends");
        assert_eq!(pull.next_requests(resume), first, "asked again after the pause, of the same source");
        assert_eq!(pull.progress(resume).sources, 1, "the source was not paused");
        // Failing again doubles the pause, up to its bound; a kept chunk ends the streak.
        pull.on_local_failure(&a, first[0].index, resume);
        let second = pull.next_wakeup(resume).unwrap() - resume;
        assert_eq!(second, (resume - now) * 2);
        let mut t = resume;
        for _ in 0..20 {
            pull.on_local_failure(&a, first[0].index, t);
            t = pull.next_wakeup(t).unwrap();
            assert!(pull.next_requests(t).len() == 1);
        }
        assert_eq!(pull.next_wakeup(t).map(|w| w - t), Some(Duration::from_secs(10)), "only the request timeout");
        pull.on_local_failure(&a, first[0].index, t);
        assert_eq!(pull.next_wakeup(t).unwrap() - t, MAX_LOCAL_PAUSE);
        t += MAX_LOCAL_PAUSE;
        let again = pull.next_requests(t);
        pull.on_chunk(&a, again[0].index, 100);
        pull.on_local_failure(&a, 1, t);
        assert_eq!(pull.next_wakeup(t).unwrap() - t, Duration::from_millis(200), "the streak starts over");
    }

    #[test]
    fn resumes_with_only_missing_chunks_and_times_out_slow_sources() {
        let cs = chunks(5);
        let held: Vec<Cid> = cs[..3].iter().map(|c| c.0).collect();
        let mut pull = SnapshotPull::new(cs, |c| held.contains(c), 8, Duration::from_secs(2));
        let a = PeerId::random();
        pull.add_source(a, None);
        let now = Instant::now();
        assert_eq!(pull.next_requests(now).iter().map(|r| r.index).collect::<Vec<_>>(), vec![3, 4]);
        assert_eq!(pull.progress(now).chunks_have, 3);
        assert_eq!(pull.next_wakeup(now), Some(now + Duration::from_secs(2)));
        let b = PeerId::random();
        pull.add_source(b, None);
        let later = now + Duration::from_secs(3);
        let retry = pull.next_requests(later);
        assert!(retry.iter().all(|r| r.peer == b), "the slow source is paused: {retry:?}");
        for r in retry {
            pull.on_chunk(&r.peer, r.index, 100);
        }
        assert!(pull.is_complete());
    }
}

/// What a peer offers for catching up, from its digest.
#[derive(Debug, Clone)]
pub struct Offer {
    pub peer: PeerId,
    pub version_vector: crate::store::VersionVector,
    /// Per origin, the highest seq compacted out of the peer's log.
    pub log_floors: crate::store::VersionVector,
    /// Snapshots the peer serves, newest first.
    pub snapshots: Vec<Cid>,
    /// What the first of `snapshots` holds, when the peer said.
    pub latest: Option<SnapshotBrief>,
}

/// Why a snapshot is pulled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotReason {
    /// Ops this node lacks are below every source's log floor: replay cannot bring it up to date.
    BelowFloors,
    /// Replay could, but installing the snapshot and replaying what follows it costs less: it
    /// spares `saves_ops` ops of replay for `entries` entries to install.
    Cheaper { saves_ops: u64, entries: u64 },
}

/// A snapshot to pull.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotChoice {
    pub cid: Cid,
    /// The peers offering it.
    pub peers: Vec<PeerId>,
    pub reason: SnapshotReason,
    /// The version vector it was made at, when its sources said: what it will bring, so that
    /// replay meanwhile skips it.
    pub covers: Option<crate::store::VersionVector>,
}

/// What installing one snapshot entry costs, as a fraction of replaying one op, into an empty state:
/// 1M entries of 100 B were installed and active in 1.31 s where replaying 1M ops took 2.2 s
/// (release build, 2 cores; `scripts/bench.sh` W1 and its snapshot variant).
const EMPTY_ENTRY_COST: (u64, u64) = (3, 5);
/// The same into a state that already holds entries, where each one is read, merged and written
/// back: taken as two ops, a cautious guess (not measured).
const MERGE_ENTRY_COST: (u64, u64) = (2, 1);

/// Decides between replay and snapshot, as Redis chooses between partial and full resync.
///
/// When some origin has ops this node lacks and no peer can replay them (each peer that has them
/// compacted them away), a snapshot is needed: the one offered by the most peers. Otherwise a
/// snapshot is still taken when it spares at least `min_saving` ops of replay and installing its
/// entries costs less than replaying those ops (a log full of overwrites of few keys, or a new node
/// joining a long history): the snapshot that spares the most. Replay then brings the rest.
pub fn choose_snapshot(
    have: &crate::store::VersionVector,
    offers: &[Offer],
    min_saving: u64,
) -> Option<SnapshotChoice> {
    let stuck = offers.iter().flat_map(|o| o.version_vector.0.iter()).any(|(origin, seq)| {
        *seq > have.get(origin)
            && !offers.iter().any(|o| {
                o.version_vector.get(origin) > have.get(origin) && o.log_floors.get(origin) <= have.get(origin)
            })
    });
    let offered = |cid: &Cid| -> Vec<PeerId> {
        offers.iter().filter(|o| o.snapshots.first() == Some(cid)).map(|o| o.peer).collect()
    };
    let brief = |cid: &Cid| offers.iter().find(|o| o.snapshots.first() == Some(cid)).and_then(|o| o.latest.clone());
    if stuck {
        let mut counts: Vec<(Cid, usize)> = Vec::new();
        for cid in offers.iter().filter_map(|o| o.snapshots.first()) {
            match counts.iter_mut().find(|(c, _)| c == cid) {
                Some((_, n)) => *n += 1,
                None => counts.push((*cid, 1)),
            }
        }
        let (cid, _) = counts.into_iter().max_by_key(|(_, n)| *n)?;
        let covers = brief(&cid).map(|b| b.version_vector);
        return Some(SnapshotChoice { cid, peers: offered(&cid), reason: SnapshotReason::BelowFloors, covers });
    }

    // Where the peers are, all together: what catching up must reach.
    let mut target = std::collections::BTreeMap::new();
    for (origin, seq) in offers.iter().flat_map(|o| o.version_vector.0.iter()) {
        let t = target.entry(*origin).or_insert(*seq);
        *t = (*t).max(*seq);
    }
    let missing: u64 = target.iter().map(|(o, seq)| seq.0.saturating_sub(have.get(o).0)).sum();
    if missing < min_saving.max(1) {
        return None;
    }
    let (num, den) = if have.0.is_empty() { EMPTY_ENTRY_COST } else { MERGE_ENTRY_COST };
    let mut best: Option<(u64, Cid, SnapshotBrief, u64)> = None;
    for o in offers {
        let (Some(cid), Some(b)) = (o.snapshots.first(), &o.latest) else { continue };
        let tail: u64 = target
            .iter()
            .map(|(origin, seq)| seq.0.saturating_sub(have.get(origin).max(b.version_vector.get(origin)).0))
            .sum();
        let saves = missing - tail;
        let cost = b.entries.saturating_mul(num) / den;
        if saves >= min_saving && cost < saves && best.as_ref().is_none_or(|(gain, ..)| saves - cost > *gain) {
            best = Some((saves - cost, *cid, b.clone(), saves));
        }
    }
    let (_, cid, b, saves_ops) = best?;
    Some(SnapshotChoice {
        cid,
        peers: offered(&cid),
        reason: SnapshotReason::Cheaper { saves_ops, entries: b.entries },
        covers: Some(b.version_vector),
    })
}

#[cfg(test)]
mod retry_tests {
    use super::*;
    use crate::op::raw_cid;

    #[test]
    fn a_failed_snapshot_is_tried_again_after_a_doubling_pause() {
        let (a, b) = (raw_cid(b"a"), raw_cid(b"b"));
        let mut r = SnapshotRetry::default();
        let t0 = Instant::now();
        assert!(r.allows(&a, t0));
        let mut at = t0;
        for pause in [1, 2, 4, 8, 16, 32, 60, 60] {
            r.failed(a, at);
            let pause = Duration::from_secs(pause);
            assert!(!r.allows(&a, at + pause - Duration::from_millis(1)));
            assert!(r.allows(&a, at + pause));
            assert!(r.allows(&b, at), "others are not held back");
            at += pause;
        }
        r.succeeded(&a);
        r.failed(a, at);
        assert!(r.allows(&a, at + Duration::from_secs(1)), "a success starts the pauses over");
    }
}

#[cfg(test)]
mod choose_tests {
    use super::*;
    use crate::ids::Seq;
    use crate::op::raw_cid;
    use crate::store::VersionVector;

    fn vv(entries: &[(PeerId, u64)]) -> VersionVector {
        VersionVector(entries.iter().map(|(o, s)| (*o, Seq(*s))).collect())
    }

    fn offer(peer: PeerId, version_vector: VersionVector, floors: VersionVector, snapshots: Vec<Cid>) -> Offer {
        Offer { peer, version_vector, log_floors: floors, snapshots, latest: None }
    }

    #[test]
    fn replay_when_any_peer_still_has_the_ops_snapshot_otherwise() {
        let (o, p, q) = (PeerId::random(), PeerId::random(), PeerId::random());
        let snap = raw_cid(b"snap");
        let compacted = offer(p, vv(&[(o, 100)]), vv(&[(o, 80)]), vec![snap]);
        let full = offer(q, vv(&[(o, 100)]), VersionVector::default(), vec![]);
        let off = u64::MAX;
        assert_eq!(choose_snapshot(&vv(&[(o, 10)]), &[compacted.clone(), full], off), None, "q can replay from 10");
        let chosen = choose_snapshot(&vv(&[(o, 10)]), std::slice::from_ref(&compacted), off).unwrap();
        assert_eq!((chosen.cid, chosen.peers, chosen.reason), (snap, vec![p], SnapshotReason::BelowFloors));
        assert_eq!(choose_snapshot(&vv(&[(o, 85)]), &[compacted], off), None, "above the floor: replay");
    }

    #[test]
    fn a_snapshot_is_taken_when_it_spares_more_replay_than_installing_it_costs() {
        let (o, p, q) = (PeerId::random(), PeerId::random(), PeerId::random());
        let (small, big) = (raw_cid(b"small"), raw_cid(b"big"));
        let with = |peer, cid, entries, at| Offer {
            latest: Some(SnapshotBrief { entries, version_vector: vv(&[(o, at)]) }),
            ..offer(peer, vv(&[(o, 1_000_000)]), VersionVector::default(), vec![cid])
        };
        let min = 100_000;
        let empty = VersionVector::default();
        // A log of a million ops over a thousand keys: install the thousand, replay the last 10 000.
        let chosen = choose_snapshot(&empty, &[with(p, small, 1000, 990_000)], min).unwrap();
        assert_eq!(chosen.reason, SnapshotReason::Cheaper { saves_ops: 990_000, entries: 1000 });
        assert_eq!((chosen.cid, chosen.peers, chosen.covers), (small, vec![p], Some(vv(&[(o, 990_000)]))));
        // Into an empty state an entry costs 3/5 of an op; into existing state, two ops.
        assert!(choose_snapshot(&empty, &[with(p, big, 1_600_000, 1_000_000)], min).is_some());
        assert_eq!(choose_snapshot(&empty, &[with(p, big, 1_700_000, 1_000_000)], min), None);
        let some = vv(&[(o, 5)]);
        assert!(choose_snapshot(&some, &[with(p, big, 490_000, 1_000_000)], min).is_some());
        assert_eq!(choose_snapshot(&some, &[with(p, big, 510_000, 1_000_000)], min), None);
        // A short lag, a snapshot that spares too little, or one whose size is unknown: replay.
        assert_eq!(choose_snapshot(&vv(&[(o, 950_000)]), &[with(p, small, 10, 990_000)], min), None);
        assert_eq!(choose_snapshot(&empty, &[with(p, small, 10, 50_000)], min), None);
        let unknown = offer(p, vv(&[(o, 1_000_000)]), VersionVector::default(), vec![small]);
        assert_eq!(choose_snapshot(&empty, &[unknown], min), None);
        // Of two, the one that gains the most, with every peer offering it.
        let offers =
            [with(p, small, 1000, 500_000), with(q, big, 1000, 990_000), with(PeerId::random(), small, 1000, 500_000)];
        let chosen = choose_snapshot(&empty, &offers, min).unwrap();
        assert_eq!((chosen.cid, chosen.peers), (big, vec![q]));
    }
}
