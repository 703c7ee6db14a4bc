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
