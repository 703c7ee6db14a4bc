//! Divergence repair: two nodes at the same version vector with different state roots compare
//! their bucket hashes and exchange only the entries of the buckets that differ, merging them with
//! the CRDT joins. Each side repairs from the other, so both end with the join of the two.

use std::time::{Duration, Instant};

use libp2p::PeerId;

use super::{Action, Count, Engine, Pending, StoreView};
use crate::ids::StateRoot;
use crate::snapshot::StateEntry;
use crate::sync::serve::MAX_REPAIR_BUCKETS;
use crate::wire::SyncRequest;

/// A repair that started this long ago without finishing may be started again.
const REPAIR_TIMEOUT: Duration = Duration::from_secs(30);
/// After a repair failed (a request refused or lost, a malformed answer, a merge that did not
/// commit), the next one waits this long, so a peer that cannot answer now is not asked again at
/// every input.
const REPAIR_RETRY: Duration = Duration::from_secs(1);

/// What a repair compared: this node's root with the one `peer` advertised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Roots {
    peer: PeerId,
    theirs: Option<StateRoot>,
    mine: StateRoot,
}

#[derive(Debug)]
struct UnderWay {
    roots: Roots,
    since: Instant,
    /// Entry answers still awaited; 0 while the bucket list is out.
    left: usize,
    /// Some merge of this repair did not commit.
    merge_failed: bool,
}

#[derive(Debug, Default)]
pub(super) struct Repair {
    under_way: Option<UnderWay>,
    /// The last repair that ran to its end. Run again while neither root moved, it would fetch the
    /// same entries and change nothing: what still differs is for the peer to take from this node,
    /// by its own repair. Without this, the side holding more asked again at every input until the
    /// other side had merged, hundreds of requests a second against a busy peer.
    settled: Option<Roots>,
    /// No repair starts before this, after one failed.
    retry_at: Option<Instant>,
}

impl Repair {
    /// The repair under way (or an older one given up) lost a request or an answer.
    pub fn failed(&mut self, now: Instant) {
        self.under_way = None;
        self.retry_at = Some(now + REPAIR_RETRY);
    }

    /// One answer's entries were merged (`ok`) or failed to. A merge while no entries are awaited
    /// (the bucket list is still out, or it belongs to a repair given up) changes nothing: ending
    /// the repair then would start another at once, one more request out per stray merge (found
    /// by the engine fuzz target).
    pub fn merged(&mut self, now: Instant, ok: bool) {
        let Some(u) = &mut self.under_way else { return };
        if u.left == 0 {
            return;
        }
        u.left -= 1;
        u.merge_failed |= !ok;
        if u.left == 0 {
            if u.merge_failed {
                self.failed(now);
            } else {
                self.settle();
            }
        }
    }

    /// The repair under way ran to its end. A stray answer (of a repair given up) settles nothing
    /// and keeps what the last repair settled.
    fn settle(&mut self) {
        if let Some(u) = self.under_way.take() {
            self.settled = Some(u.roots);
        }
    }
}

impl Engine {
    /// Starts a repair against `peer`, whose advertised root differs from this node's `mine` at the
    /// same vector, unless one is under way, the last failed a moment ago, or the last one compared
    /// these same two roots.
    pub(super) fn start_repair(&mut self, now: Instant, peer: PeerId, mine: StateRoot) {
        let repair = &self.repair;
        if repair.under_way.as_ref().is_some_and(|u| now.duration_since(u.since) < REPAIR_TIMEOUT) {
            return;
        }
        if repair.retry_at.is_some_and(|at| now < at) {
            return;
        }
        let roots = Roots { peer, theirs: self.readiness.advertised_root(&peer), mine };
        if repair.settled == Some(roots) {
            return;
        }
        self.count(Count::Divergence, 1);
        tracing::warn!(%peer, "same version vector, different state root: comparing buckets");
        self.repair.under_way = Some(UnderWay { roots, since: now, left: 0, merge_failed: false });
        self.send(now, peer, SyncRequest::GetBuckets, Pending::Buckets { peer });
    }

    pub(super) fn on_buckets(&mut self, now: Instant, peer: PeerId, theirs: Vec<u8>, store: &dyn StoreView) {
        let mine = store.bucket_hashes();
        if theirs.len() != mine.len() * 32 {
            tracing::warn!(%peer, len = theirs.len(), "peer sent a malformed bucket list");
            self.repair.failed(now);
            return;
        }
        let differing: Vec<u32> = mine
            .iter()
            .zip(theirs.chunks(32))
            .enumerate()
            .filter(|(_, (m, t))| m.as_slice() != *t)
            .map(|(i, _)| i as u32)
            .collect();
        tracing::info!(%peer, buckets = differing.len(), "buckets differ");
        if differing.is_empty() {
            // The root it advertised is not the one it holds now: its next digest will say.
            self.repair.settle();
            return;
        }
        let parts: Vec<Vec<u32>> = differing.chunks(MAX_REPAIR_BUCKETS).map(<[u32]>::to_vec).collect();
        if let Some(u) = &mut self.repair.under_way {
            u.left = parts.len();
        }
        for buckets in parts {
            self.send(now, peer, SyncRequest::GetEntries { buckets }, Pending::Entries { peer });
        }
    }

    pub(super) fn on_entries(&mut self, now: Instant, peer: PeerId, encoded: Vec<serde_bytes::ByteBuf>) {
        let entries: Result<Vec<StateEntry>, _> = encoded.iter().map(|b| postcard::from_bytes(b)).collect();
        let Ok(entries) = entries else {
            tracing::warn!(%peer, "peer sent undecodable state entries; repair abandoned");
            self.repair.failed(now);
            return;
        };
        self.push(Action::Merge { peer, entries });
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use libp2p::identity::Keypair;
    use libp2p::PeerId;

    use super::REPAIR_RETRY;
    use crate::ids::{Role, StateRoot};
    use crate::op::Signer;
    use crate::sync::engine::fixed_store::FixedStore;
    use crate::sync::engine::{Action, Engine, EngineConfig, Input, ReplyId, ReqId};
    use crate::wire::{SyncRequest, SyncResponse};

    struct Setup {
        e: Engine,
        store: FixedStore,
        peer: PeerId,
        replies: u64,
    }

    impl Setup {
        /// An active node connected to one peer, both at the empty vector.
        fn new(now: Instant) -> Setup {
            let store = FixedStore { root: StateRoot([0; 32]), buckets: vec![[0; 32]; 4] };
            let e = Engine::new(
                Signer::new(Keypair::generate_ed25519()),
                EngineConfig::new(Role::Replica, "c"),
                &store,
                now,
            );
            let mut s = Setup { e, store, peer: PeerId::random(), replies: 0 };
            s.e.handle(now, Input::Connected { peer: s.peer, dialed: None }, &s.store);
            s.actions();
            s
        }

        fn actions(&mut self) -> Vec<Action> {
            std::iter::from_fn(|| self.e.poll_action()).collect()
        }

        /// The peer's digest, at this node's vector with `root`; returns the bucket list asked for.
        fn digest(&mut self, now: Instant, root: u8) -> Option<ReqId> {
            let mut theirs = self.e.my_digest(&self.store);
            theirs.state_root = StateRoot([root; 32]);
            self.replies += 1;
            let request = SyncRequest::Digest(theirs);
            self.e.handle(now, Input::Request { peer: self.peer, reply: ReplyId(self.replies), request }, &self.store);
            self.asked(|r| matches!(r, SyncRequest::GetBuckets))
        }

        /// The one request matching `which` among the actions, if any.
        fn asked(&mut self, which: impl Fn(&SyncRequest) -> bool) -> Option<ReqId> {
            let reqs: Vec<ReqId> = self
                .actions()
                .into_iter()
                .filter_map(|a| match a {
                    Action::Send { req, request, .. } if which(&request) => Some(req),
                    _ => None,
                })
                .collect();
            assert!(reqs.len() <= 1, "{} requests at once", reqs.len());
            reqs.first().copied()
        }

        fn answer(&mut self, now: Instant, req: ReqId, result: Result<SyncResponse, String>) {
            self.e.handle(now, Input::Response { req, result }, &self.store);
        }

        /// Answers a bucket list with bucket 1 differing, then its entries with none: the peer holds
        /// less than this node there. Returns what the engine asked to merge.
        fn run_repair(&mut self, now: Instant, buckets: ReqId) -> usize {
            let mut theirs = self.store.buckets.concat();
            theirs[32] = 1;
            self.answer(now, buckets, Ok(SyncResponse::Buckets(theirs)));
            let entries = self.asked(|r| matches!(r, SyncRequest::GetEntries { buckets } if buckets == &[1])).unwrap();
            self.answer(now, entries, Ok(SyncResponse::Entries(vec![])));
            self.actions().iter().filter(|a| matches!(a, Action::Merge { .. })).count()
        }
    }

    #[test]
    fn a_repair_that_ran_to_its_end_is_not_repeated_until_a_root_moves() {
        let now = Instant::now();
        let mut s = Setup::new(now);
        let first = s.digest(now, 7).expect("the divergence starts a repair");
        assert_eq!(s.run_repair(now, first), 1);
        s.e.handle(now, Input::Merged { result: Ok(()) }, &s.store);
        // Both roots as they were: what still differs is the peer's to take. Asking again at every
        // input was how one side flooded the other with requests.
        for i in 0..50 {
            assert_eq!(s.digest(now, 7), None, "repeated at digest {i}");
            s.e.handle(now, Input::Tick, &s.store);
            assert_eq!(s.asked(|r| matches!(r, SyncRequest::GetBuckets)), None);
        }
        // The peer's root moved (it merged, and something still differs): compare again.
        let second = s.digest(now, 8).expect("a new root of the peer's starts a repair");
        assert_eq!(s.run_repair(now, second), 1);
        s.e.handle(now, Input::Merged { result: Ok(()) }, &s.store);
        assert_eq!(s.digest(now, 8), None);
        // This node's root moved: compare again.
        s.store.root = StateRoot([3; 32]);
        assert!(s.digest(now, 8).is_some(), "a new root of this node's starts a repair");
    }

    #[test]
    fn stray_merges_do_not_restart_a_repair_whose_bucket_list_is_out() {
        let now = Instant::now();
        let mut s = Setup::new(now);
        assert!(s.digest(now, 1).is_some());
        for _ in 0..10 {
            s.e.handle(now, Input::Merged { result: Ok(()) }, &s.store);
        }
        assert_eq!(s.asked(|r| matches!(r, SyncRequest::GetBuckets)), None, "a stray merge started another repair");
    }

    #[test]
    fn a_failed_repair_is_retried_after_a_pause_not_at_once() {
        let now = Instant::now();
        let mut s = Setup::new(now);
        let buckets = s.digest(now, 7).unwrap();
        s.answer(now, buckets, Ok(SyncResponse::Error { code: "busy".into(), message: "later".into() }));
        assert_eq!(s.digest(now, 7), None, "retried at once");
        let later = now + REPAIR_RETRY;
        let buckets = s.digest(later, 7).expect("retried after the pause");
        // A merge that did not commit fails the repair too: it is not taken for done.
        assert_eq!(s.run_repair(later, buckets), 1);
        s.e.handle(later, Input::Merged { result: Err("disk full".into()) }, &s.store);
        assert_eq!(s.digest(later, 7), None);
        assert!(s.digest(later + REPAIR_RETRY, 7).is_some(), "a failed merge is not settled");
    }
}
