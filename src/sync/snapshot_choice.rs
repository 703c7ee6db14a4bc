//! Choosing between a snapshot and replay: which snapshot a peer offers spares the most replay,
//! at what cost to install it, and whether that beats replaying the log.

use cid::Cid;
use libp2p::PeerId;

use crate::snapshot::SnapshotBrief;

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
