//! What every run must come to, checked by the simulator (never by the engine's own logic): the
//! readiness rule at every input, and at the end convergence to the oracle's state; plus the
//! reports of a run (where every node stands, its fingerprint, counters).

use std::time::Duration;

use peersync::store::VersionVector;
use peersync::sync::{Count, Phase, StoreView};

use crate::cluster::{Cluster, Live};
use crate::net::NetStats;
use crate::store::{state_of, Buckets, MemStore};

impl Cluster {
    /// Every write acknowledged so far, as a vector.
    pub fn acked(&self) -> VersionVector {
        VersionVector(self.written.iter().map(|(o, ops)| (*o, peersync::ids::Seq(ops.len() as u64))).collect())
    }

    pub fn vv(&self, n: usize) -> VersionVector {
        self.nodes[n].store.version_vector()
    }

    /// Whether every node is up, holds every acknowledged write and nothing else, all share one
    /// root, and all are active.
    pub fn converged(&self) -> bool {
        let want = self.acked();
        let mut started = self.nodes.iter().filter(|n| n.started);
        let root = started.clone().next().map(|n| n.store.state_root().0);
        started.all(|n| {
            n.live.as_ref().is_some_and(|l| l.engine.phase() == Phase::Active)
                && n.store.version_vector() == want
                && Some(n.store.state_root().0) == root
        })
    }

    /// Runs until [`Cluster::converged`], checking every 50 ms, and then checks the final state;
    /// panics naming the seed past `bound`. Returns the time it took.
    pub fn converge(&mut self, bound: Duration) -> Duration {
        let begin = self.net.now;
        while !self.converged() {
            assert!(
                self.net.now - begin <= bound,
                "seed {}: not converged within {bound:?} of the faults stopping\n{}",
                self.seed,
                self.describe()
            );
            self.run_for(Duration::from_millis(50));
        }
        self.check_final();
        self.net.now - begin
    }

    /// Every node's state is what the acknowledged writes give, and nothing is left unjudged.
    fn check_final(&self) {
        let want = self.acked();
        let oracle = state_of(&self.written, &want);
        let buckets = Buckets::of(&oracle);
        for (i, n) in self.nodes.iter().enumerate().filter(|(_, n)| n.started) {
            assert!(n.store.state() == &oracle, "seed {}: node {i}'s state is not what the writes give", self.seed);
            assert_eq!(n.store.state_root().0, buckets.root(), "seed {}: node {i}'s root", self.seed);
            let live = n.live.as_ref().expect("converged nodes are up");
            if let Some((id, u)) = live.verdicts.iter().find(|(_, u)| self.net.now - u.at > Duration::from_secs(10)) {
                panic!("seed {}: node {i} never judged gossip message {id:?} handed to it at {:?}", self.seed, u.at);
            }
        }
    }

    /// What each node holds and where it stands, for failure messages.
    pub fn describe(&self) -> String {
        let short = |vv: &VersionVector| -> Vec<(usize, u64)> {
            vv.0.iter().map(|(o, s)| (self.index.get(o).copied().unwrap_or(usize::MAX), s.0)).collect()
        };
        let mut out = format!("at {:?}, acked {:?}\n", self.elapsed(), short(&self.acked()));
        for (i, n) in self.nodes.iter().enumerate() {
            let (root, vv) = n.store.state_root();
            out += &format!(
                "  node {i} {:?} life={} vv={:?} floors={:?} root={} peers={:?}",
                n.role,
                n.life,
                short(&vv),
                short(&n.store.log_floors()),
                &root.to_string()[..8],
                self.net.peers(i).iter().map(|(p, _)| *p).collect::<Vec<_>>()
            );
            match &n.live {
                None => out += " DOWN\n",
                Some(l) => {
                    out += &format!(
                        " phase={:?} queues={:?} buffered={} join_target={:?}\n",
                        l.engine.phase(),
                        l.engine.queue_sizes(),
                        l.engine.buffered_ops(),
                        l.join_target.as_ref().map(short)
                    );
                }
            }
        }
        out
    }

    /// The run's fingerprint: equal for two runs of one seed.
    pub fn fingerprint(&self) -> String {
        let mut h = self.trace.clone();
        for n in &self.nodes {
            h.update(n.store.state_root().0 .0.as_slice());
        }
        h.finalize().to_hex().to_string()
    }

    pub fn net_stats(&self) -> &NetStats {
        &self.net.stats
    }

    /// Sums a counter over the nodes.
    pub fn total(&self, what: Count) -> u64 {
        self.nodes.iter().map(|n| n.stats.count(what)).sum()
    }
}

/// A node active while below the first vector a peer advertised to it since it started would serve
/// stale reads: the one thing readiness must prevent.
pub(crate) fn check_join_target(seed: u64, n: usize, live: &Live, store: &MemStore) {
    if let Some(target) = &live.join_target {
        let have = store.version_vector();
        assert!(
            have.dominates(target),
            "seed {seed}: node {n} is active at {have:?}, below the first vector a peer advertised to it \
             after it started: {target:?}"
        );
    }
}
