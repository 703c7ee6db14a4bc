//! Replay planning: which op ranges to pull, and from whom.
//!
//! The node reports what it has applied and what each peer advertised (in digests); the planner
//! answers with `GetOps` requests to send. Per origin at most one request is in flight, its cursor
//! is the next seq wanted, so an interrupted pull resumes from wherever the log stands, from any peer
//! whose vector covers it. Among the peers that can serve a range it picks the nearest (lowest
//! round-trip time), and a replica prefers replicas so primaries do not carry every replica's load.
//! No I/O: the caller passes `now` and carries out the returned requests.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use libp2p::PeerId;

use crate::ids::{Origin, Role, Seq};
use crate::store::VersionVector;

/// What the planner knows of one peer.
#[derive(Debug, Clone)]
pub struct PeerView {
    pub peer: PeerId,
    pub role: Role,
    /// The version vector the peer last advertised.
    pub version_vector: VersionVector,
    /// Round-trip time measured by ping, when known.
    pub rtt: Option<Duration>,
}

/// A range to pull: ops of `origin` after `after`, from `peer`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pull {
    pub peer: PeerId,
    pub origin: Origin,
    pub after: Seq,
}

#[derive(Debug)]
struct InFlight {
    peer: PeerId,
    after: Seq,
    sent: Instant,
}

#[derive(Debug)]
pub struct ReplayPlanner {
    my_role: Role,
    /// A request not answered within this time is given up and planned again (perhaps elsewhere).
    timeout: Duration,
    in_flight: BTreeMap<Origin, InFlight>,
    /// Peers that recently failed a request, and until when they are skipped.
    backoff: BTreeMap<PeerId, (Instant, u32)>,
}

impl ReplayPlanner {
    pub fn new(my_role: Role, timeout: Duration) -> Self {
        ReplayPlanner { my_role, timeout, in_flight: BTreeMap::new(), backoff: BTreeMap::new() }
    }

    /// The pulls to start now. `have` is what this node has applied or already queued.
    pub fn plan(&mut self, have: &VersionVector, peers: &[PeerView], now: Instant) -> Vec<Pull> {
        self.in_flight.retain(|_, f| now.duration_since(f.sent) < self.timeout);
        self.backoff.retain(|_, (until, _)| *until > now);
        // For each origin, the best peer that has ops beyond ours.
        let mut wanted: BTreeMap<Origin, (&PeerView, (u8, Duration))> = BTreeMap::new();
        for p in peers.iter().filter(|p| !self.backoff.contains_key(&p.peer)) {
            for (origin, seq) in &p.version_vector.0 {
                if *seq <= have.get(origin) || self.in_flight.contains_key(origin) {
                    continue;
                }
                // A replica pulls from replicas first; everyone prefers the nearest.
                let role_rank = u8::from(self.my_role == Role::Replica && p.role == Role::Primary);
                let rank = (role_rank, p.rtt.unwrap_or(Duration::from_secs(3600)));
                if wanted.get(origin).is_none_or(|(_, best)| rank < *best) {
                    wanted.insert(*origin, (p, rank));
                }
            }
        }
        wanted
            .into_iter()
            .map(|(origin, (p, _))| {
                let after = have.get(&origin);
                self.in_flight.insert(origin, InFlight { peer: p.peer, after, sent: now });
                Pull { peer: p.peer, origin, after }
            })
            .collect()
    }

    /// `peer` answered the pull of `origin` (with ops or empty): the origin may be planned again.
    /// An answer to a pull given up on earlier changes nothing.
    pub fn answered(&mut self, peer: &PeerId, origin: &Origin) {
        if self.in_flight.get(origin).is_some_and(|f| f.peer == *peer) {
            self.in_flight.remove(origin);
        }
    }

    /// The pull of `origin` from `peer` failed (timeout, disconnect, bad data): plan it again
    /// elsewhere and skip the peer for a while, doubling the pause with each failure in a row.
    /// Other pulls outstanding at the peer stay as they are until answered or timed out.
    pub fn failed(&mut self, peer: &PeerId, origin: &Origin, now: Instant) {
        if self.in_flight.get(origin).is_some_and(|f| f.peer == *peer) {
            self.in_flight.remove(origin);
        }
        let strikes = self.backoff.get(peer).map_or(0, |(_, n)| *n) + 1;
        let pause = super::doubling(Duration::from_millis(200), strikes, Duration::from_millis(200 << 8));
        self.backoff.insert(*peer, (now + pause, strikes));
    }

    /// Whether `peer` failed recently and is being skipped.
    pub fn is_backing_off(&self, peer: &PeerId, now: Instant) -> bool {
        self.backoff.get(peer).is_some_and(|(until, _)| *until > now)
    }

    /// Every pull in flight: origin, peer, cursor.
    pub fn pulls(&self) -> impl Iterator<Item = (Origin, PeerId, Seq)> + '_ {
        self.in_flight.iter().map(|(o, f)| (*o, f.peer, f.after))
    }

    /// Whether a pull of `origin` is in flight, and from which cursor.
    pub fn in_flight(&self, origin: &Origin) -> Option<(PeerId, Seq)> {
        self.in_flight.get(origin).map(|f| (f.peer, f.after))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vv(entries: &[(Origin, u64)]) -> VersionVector {
        VersionVector(entries.iter().map(|(o, s)| (*o, Seq(*s))).collect())
    }

    fn view(role: Role, entries: &[(Origin, u64)], rtt_ms: u64) -> PeerView {
        PeerView { peer: PeerId::random(), role, version_vector: vv(entries), rtt: Some(Duration::from_millis(rtt_ms)) }
    }

    #[test]
    fn pulls_each_missing_origin_once_from_the_nearest_peer() {
        let (a, b) = (PeerId::random(), PeerId::random());
        let far = view(Role::Primary, &[(a, 10), (b, 5)], 50);
        let near = view(Role::Primary, &[(a, 8)], 1);
        let mut planner = ReplayPlanner::new(Role::Primary, Duration::from_secs(5));
        let now = Instant::now();
        let pulls = planner.plan(&vv(&[(a, 3)]), &[far.clone(), near.clone()], now);
        assert_eq!(pulls.len(), 2, "{pulls:?}");
        assert!(pulls.contains(&Pull { peer: near.peer, origin: a, after: Seq(3) }), "{pulls:?}");
        assert!(pulls.contains(&Pull { peer: far.peer, origin: b, after: Seq(0) }), "{pulls:?}");
        assert!(planner.plan(&vv(&[(a, 3)]), &[far.clone(), near.clone()], now).is_empty(), "one pull per origin");
        planner.answered(&near.peer, &a);
        let again = planner.plan(&vv(&[(a, 8)]), &[far.clone(), near], now);
        assert_eq!(again, vec![Pull { peer: far.peer, origin: a, after: Seq(8) }], "resume from the cursor");
    }

    #[test]
    fn replicas_prefer_replicas_and_failures_move_the_pull_elsewhere() {
        let a = PeerId::random();
        let primary = view(Role::Primary, &[(a, 10)], 1);
        let replica = view(Role::Replica, &[(a, 10)], 30);
        let mut planner = ReplayPlanner::new(Role::Replica, Duration::from_secs(5));
        let now = Instant::now();
        let first = planner.plan(&VersionVector::default(), &[primary.clone(), replica.clone()], now);
        assert_eq!(first[0].peer, replica.peer);
        planner.failed(&replica.peer, &a, now);
        let second = planner.plan(&VersionVector::default(), &[primary.clone(), replica.clone()], now);
        assert_eq!(second[0].peer, primary.peer, "the failed source is skipped while it backs off");
        // A request that is never answered times out and is planned again.
        let later = now + Duration::from_secs(6);
        assert_eq!(planner.plan(&VersionVector::default(), &[primary, replica.clone()], later)[0].peer, replica.peer);
    }
}
