//! Simulated-cluster tests: every node runs the real `peersync::sync::Engine`, driven over a
//! simulated network (loss, duplication, reordering, delay, partitions, crashes) with fake clocks
//! and an in-memory store, many seeds per scenario, in simulated time (no threads, no sockets, no
//! sleeps). `sim/chunks.rs` drives a `SnapshotPull` alone against lying and dying sources.
//!
//! Every run is a pure function of its seed. A failing seed prints itself and the command that
//! replays it. `SIM_SEED=S` runs seed `S` only; `SIM_SEEDS=N` runs `N` seeds per scenario (the
//! scale scenario fewer: `N / 100` at n = 10, `N / 500` at n = 50, `N / 2000` at n = 200, at
//! least one); a soak is `SIM_SEEDS=1000000 cargo test --release --test sim`. `SIM_TRACE=1` prints
//! every input and action of every node (with `SIM_SEED`, to follow one run).
//!
//! By default the engine scenarios run 10 300 seeds: most with 3 to 6 nodes for a few simulated
//! seconds, a few with 50 and 200 nodes.

#[path = "sim/checks.rs"]
mod checks;
#[path = "sim/chunks.rs"]
mod chunks;
#[path = "sim/cluster.rs"]
mod cluster;
#[path = "sim/exec.rs"]
mod exec;
#[path = "sim/leases.rs"]
mod leases;
#[path = "sim/net.rs"]
mod net;
#[path = "sim/store.rs"]
mod store;

use std::ops::RangeInclusive;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use chunks::PullSim;
use cluster::{Cluster, Config};
use peersync::ids::Seq;
use peersync::sync::{Count, GapLimits, StoreView};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Simulated time within which a cluster must converge once faults and writes stop.
const CONVERGE_BOUND: Duration = Duration::from_secs(60);
const STEP: Duration = Duration::from_millis(50);

/// The seeds a scenario runs: `SIM_SEED` alone, or `SIM_SEEDS` (divided by `share`), or `default`.
fn seeds(default: u64, share: u64) -> Vec<u64> {
    if let Some(seed) = std::env::var("SIM_SEED").ok().and_then(|s| s.parse().ok()) {
        return vec![seed];
    }
    let count =
        std::env::var("SIM_SEEDS").ok().and_then(|s| s.parse::<u64>().ok()).map_or(default, |n| (n / share).max(1));
    (0..count).collect()
}

/// Runs `run` for each seed of the scenario; a failing seed is named with the command replaying it.
/// `test` is the test's name, optionally followed by a space and what part of it this is.
fn for_seeds<R>(test: &str, default: u64, share: u64, mut run: impl FnMut(u64) -> R) -> Vec<R> {
    let list = seeds(default, share);
    let name = test.split(' ').next().unwrap_or(test);
    let began = Instant::now();
    let mut out = Vec::with_capacity(list.len());
    for seed in &list {
        match catch_unwind(AssertUnwindSafe(|| run(*seed))) {
            Ok(r) => out.push(r),
            Err(panic) => {
                eprintln!("\n{test}: seed {seed} failed; replay it with\n  SIM_SEED={seed} cargo test --test sim -- {name} --exact\n");
                resume_unwind(panic);
            }
        }
    }
    let secs = began.elapsed().as_secs_f64();
    eprintln!("{test}: {} seeds in {secs:.1} s ({:.0} seeds/s)", list.len(), list.len() as f64 / secs.max(1e-9));
    out
}

/// The scenario's own choices come from a stream apart from the cluster's.
fn scenario_rng(seed: u64, test: u64) -> StdRng {
    StdRng::seed_from_u64(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ test)
}

/// Mostly small clusters, now and then up to `max` nodes.
fn cluster_size(r: &mut StdRng, max: usize) -> usize {
    if r.gen_bool(0.15) {
        r.gen_range(3..=max)
    } else {
        r.gen_range(3..=max.min(5))
    }
}

/// For a random number of milliseconds in `millis`, each primary writes a batch with probability
/// `p` every step.
fn write_for(c: &mut Cluster, r: &mut StdRng, millis: RangeInclusive<u64>, p: f64) {
    let steps = r.gen_range(millis) / STEP.as_millis() as u64;
    for _ in 0..steps {
        for n in 0..c.primaries() {
            if r.gen_bool(p) {
                c.write(n);
            }
        }
        c.run_for(STEP);
    }
}

/// Stops the faults and runs until the cluster converges (panics naming the seed past the bound).
/// Tombstone collections the nodes asked for (the simulator checked each one safe).
fn collections(c: &Cluster) -> u64 {
    c.nodes.iter().map(|n| n.stats.collections).sum()
}

fn settle(c: &mut Cluster) -> Duration {
    c.set_faults(0.0, 0.0);
    c.heal_all();
    c.converge(CONVERGE_BOUND)
}

/// Sometimes small engine limits, so shedding (`busy`) and overload (`Ignore`) paths run too.
fn maybe_tight(r: &mut StdRng, cfg: &mut Config) {
    if r.gen_bool(0.2) {
        cfg.engine.max_serving = r.gen_range(1..=4);
        cfg.engine.max_applying = r.gen_range(1..=4);
    }
}

fn lossy(seed: u64, test: u64) -> (Cluster, StdRng) {
    let mut r = scenario_rng(seed, test);
    let nodes = cluster_size(&mut r, 8);
    let mut cfg = Config::new(nodes, r.gen_range(1..=3.min(nodes)));
    cfg.loss = r.gen_range(0.05..=0.3);
    cfg.dup = r.gen_range(0.0..=0.15);
    cfg.max_jitter = Duration::from_millis(r.gen_range(10..=150));
    maybe_tight(&mut r, &mut cfg);
    (Cluster::new(seed, cfg), r)
}

#[test]
fn converges_under_loss_reordering_and_duplication() {
    let runs = for_seeds("converges_under_loss_reordering_and_duplication", 3000, 1, |seed| {
        let (mut c, mut r) = lossy(seed, 1);
        write_for(&mut c, &mut r, 500..=2_000, 0.3);
        let took = settle(&mut c);
        let acks = c.nodes.iter().fold((0, 0), |a, n| (a.0 + n.stats.acks_met, a.1 + n.stats.acks_unmet));
        (took, c.net_stats().lost, c.net_stats().duplicated, c.total(Count::OpsReplayed), c.inputs, acks)
    });
    let worst = runs.iter().map(|r| r.0).max().unwrap_or_default();
    let (lost, dup, replayed, inputs): (u64, u64, u64, u64) =
        runs.iter().fold((0, 0, 0, 0), |a, r| (a.0 + r.1, a.1 + r.2, a.2 + r.3, a.3 + r.4));
    let (met, unmet) = runs.iter().fold((0, 0), |a, r| (a.0 + r.5 .0, a.1 + r.5 .1));
    assert!(runs.len() < 20 || (lost > 0 && dup > 0 && replayed > 0), "the runs must really lose and duplicate");
    // Every ended wait was checked against the stores (exec.rs); both endings must occur.
    assert!(runs.len() < 20 || (met > 0 && unmet > 0), "acknowledgement waits: {met} met, {unmet} unmet");
    eprintln!(
        "  converged within {worst:?}; {lost} messages lost, {dup} duplicated, {replayed} ops replayed, \
         {met} ack waits met and {unmet} timed out, {} engine inputs per seed",
        inputs / runs.len().max(1) as u64
    );
}

#[test]
fn crashes_and_restarts_while_writing() {
    let runs = for_seeds("crashes_and_restarts_while_writing", 2000, 1, |seed| {
        let mut r = scenario_rng(seed, 2);
        let nodes = cluster_size(&mut r, 6);
        let mut cfg = Config::new(nodes, r.gen_range(1..=2));
        cfg.loss = r.gen_range(0.0..=0.1);
        maybe_tight(&mut r, &mut cfg);
        let mut c = Cluster::new(seed, cfg);
        write_for(&mut c, &mut r, 200..=1_000, 0.3);
        for _ in 0..r.gen_range(1..=2) {
            // Replicas and primaries alike, sometimes two at once; the others keep writing.
            let victims: Vec<usize> = (0..r.gen_range(1..=2)).map(|_| r.gen_range(0..nodes)).collect();
            for v in &victims {
                c.crash(*v);
            }
            write_for(&mut c, &mut r, 100..=1_500, 0.3);
            for v in &victims {
                c.restart(*v);
            }
            write_for(&mut c, &mut r, 0..=1_000, 0.3);
        }
        let took = settle(&mut c);
        let restarts: u64 = c.nodes.iter().map(|n| n.stats.restarts).sum();
        let behind: u64 = c.nodes.iter().map(|n| n.stats.behind_at_join).sum();
        (took, restarts, behind, collections(&c))
    });
    let worst = runs.iter().map(|r| r.0).max().unwrap_or_default();
    let (restarts, behind) = runs.iter().fold((0, 0), |a, r| (a.0 + r.1, a.1 + r.2));
    assert!(runs.len() < 20 || behind * 4 > restarts, "restarts must find nodes behind: {behind} of {restarts}");
    let collected: u64 = runs.iter().map(|r| r.3).sum();
    // Each collection was checked safe when asked (see `exec.rs`); the check must have had work.
    assert!(runs.len() < 20 || collected > 0, "no node ever collected tombstones");
    eprintln!(
        "  {restarts} restarts, {behind} (re)starts behind their first digest; converged within {worst:?}; \
         {collected} tombstone collections, each checked safe"
    );
}

#[test]
fn partitions_heal() {
    let runs = for_seeds("partitions_heal", 2000, 1, |seed| {
        let mut r = scenario_rng(seed, 3);
        let nodes = cluster_size(&mut r, 6).max(4);
        let mut cfg = Config::new(nodes, r.gen_range(2..=3));
        cfg.loss = r.gen_range(0.0..=0.1);
        let mut c = Cluster::new(seed, cfg);
        // Primary 0 on side A, primary 1 on side B, the rest anywhere.
        let side_a: Vec<usize> = (0..nodes).filter(|n| *n == 0 || (*n >= 2 && r.gen_bool(0.5))).collect();
        write_for(&mut c, &mut r, 0..=500, 0.3);
        let clean = r.gen_bool(0.6);
        if clean {
            c.partition(&side_a);
        } else {
            // Links cut at random: paths may still exist through others (gossip relays, and a
            // digest only reaches direct peers).
            for a in 0..nodes {
                for b in a + 1..nodes {
                    if r.gen_bool(0.4) {
                        c.cut(a, b);
                    }
                }
            }
        }
        let before = c.acked();
        write_for(&mut c, &mut r, 500..=2_000, 0.3);
        // Nothing crossed the cut: a side holds of the other side's origins at most what they
        // had written before it.
        for n in (0..nodes).filter(|_| clean) {
            for o in 0..c.primaries() {
                if side_a.contains(&n) != side_a.contains(&o) {
                    let origin = c.nodes[o].peer;
                    assert!(
                        c.vv(n).get(&origin) <= before.get(&origin),
                        "seed {seed}: node {n} got ops of {o} across the partition\n{}",
                        c.describe()
                    );
                }
            }
        }
        c.heal_all();
        write_for(&mut c, &mut r, 0..=500, 0.3);
        (settle(&mut c), collections(&c))
    });
    let collected: u64 = runs.iter().map(|r| r.1).sum();
    assert!(runs.len() < 20 || collected > 0, "no node ever collected tombstones");
    eprintln!(
        "  converged within {:?} of healing; {collected} tombstone collections, each checked safe",
        runs.iter().map(|r| r.0).max().unwrap_or_default()
    );
}

#[test]
fn a_tiny_gap_buffer_overflows_but_replay_converges() {
    let runs = for_seeds("a_tiny_gap_buffer_overflows_but_replay_converges", 1500, 1, |seed| {
        let mut r = scenario_rng(seed, 4);
        let nodes = cluster_size(&mut r, 6);
        let mut cfg = Config::new(nodes, r.gen_range(1..=2));
        cfg.loss = r.gen_range(0.1..=0.3);
        cfg.max_jitter = Duration::from_millis(300);
        cfg.engine.gap = GapLimits { max_ops: r.gen_range(1..=6), max_bytes: r.gen_range(150..=600) };
        let mut c = Cluster::new(seed, cfg);
        // Every input checks `buffered_ops()` against the limits.
        write_for(&mut c, &mut r, 300..=1_500, 0.6);
        let took = settle(&mut c);
        (took, c.total(Count::GapOverflow))
    });
    let overflows: u64 = runs.iter().map(|r| r.1).sum();
    assert!(runs.len() < 20 || overflows > 0, "the limits must really be hit");
    eprintln!(
        "  {overflows} gap-buffer overflows; converged within {:?}",
        runs.iter().map(|r| r.0).max().unwrap_or_default()
    );
}

#[test]
fn a_late_joiner_below_every_log_floor_installs_a_snapshot() {
    let runs = for_seeds("a_late_joiner_below_every_log_floor_installs_a_snapshot", 800, 1, |seed| {
        let mut r = scenario_rng(seed, 5);
        let nodes = r.gen_range(3..=5);
        let joiner = nodes;
        let primaries = r.gen_range(1..=2);
        let mut cfg = Config::new(nodes + 1, primaries);
        cfg.late = vec![joiner];
        // Sometimes a replica lies when it serves: corrupt chunks, altered ops.
        if nodes - primaries >= 2 && r.gen_bool(0.3) {
            cfg.liars = vec![r.gen_range(primaries..nodes)];
        }
        cfg.loss = r.gen_range(0.0..=0.1);
        // Sometimes a snapshot is worth taking even where replay could do.
        let cheaper = r.gen_bool(0.3);
        if cheaper {
            cfg.engine.snapshot_min_saving = r.gen_range(5..=20);
        }
        let mut c = Cluster::new(seed, cfg);
        write_for(&mut c, &mut r, 500..=1_500, 0.4);
        settle(&mut c);
        for n in 0..nodes {
            // With `cheaper`, some nodes keep their whole log: replay stays possible.
            if !cheaper || r.gen_bool(0.5) {
                let retain = r.gen_range(0..=3);
                c.snapshot(n, retain);
            }
        }
        // Below every floor: for some origin, every peer compacted part of its log away.
        let must =
            !cheaper && c.written.keys().any(|o| (0..nodes).all(|n| c.nodes[n].store.log_floors().get(o) > Seq(0)));
        c.restart(joiner);
        write_for(&mut c, &mut r, 0..=1_000, 0.3);
        if r.gen_bool(0.3) {
            // A crash in the middle of the pull: it resumes with the chunks kept.
            c.crash(joiner);
            c.run_for(Duration::from_millis(r.gen_range(0..=300)));
            c.restart(joiner);
        }
        let took = settle(&mut c);
        let installed = c.nodes[joiner].stats.installs;
        assert!(
            !must || installed > 0,
            "seed {seed}: the joiner caught up below every log floor without a snapshot\n{}",
            c.describe()
        );
        (took, installed, cheaper)
    });
    let below: u64 = runs.iter().filter(|r| !r.2).map(|r| r.1).sum();
    let cheaper: u64 = runs.iter().filter(|r| r.2).map(|r| r.1).sum();
    assert!(runs.len() < 20 || below > 0);
    eprintln!(
        "  late joiners installed {below} snapshots below the floors, {cheaper} where replay could do \
         ({} seeds of those); converged within {:?}",
        runs.iter().filter(|r| r.2).count(),
        runs.iter().map(|r| r.0).max().unwrap_or_default()
    );
}

#[test]
fn clock_skew_and_drift_change_nothing() {
    let runs = for_seeds("clock_skew_and_drift_change_nothing", 1000, 1, |seed| {
        let (mut c, mut r) = {
            let mut r = scenario_rng(seed, 6);
            let nodes = cluster_size(&mut r, 6);
            let mut cfg = Config::new(nodes, r.gen_range(1..=2));
            cfg.loss = r.gen_range(0.0..=0.2);
            cfg.max_offset = Duration::from_secs(3600);
            cfg.max_drift_ppm = 50_000;
            (Cluster::new(seed, cfg), r)
        };
        write_for(&mut c, &mut r, 300..=1_500, 0.3);
        if r.gen_bool(0.5) {
            let victim = r.gen_range(0..c.nodes.len());
            c.crash(victim);
            write_for(&mut c, &mut r, 100..=1_000, 0.3);
            c.restart(victim);
        }
        write_for(&mut c, &mut r, 0..=500, 0.3);
        settle(&mut c)
    });
    eprintln!("  converged within {:?}", runs.iter().max().copied().unwrap_or_default());
}

/// Leases stay exclusive whatever happens: 1 to 3 primaries (and replicas) under loss, clock offsets
/// and drift within the documented bound, primaries crashing and restarting, and partitions that
/// leave a minority or a majority of the primaries on one side, while clients acquire, renew and
/// release. Every answer is checked as it comes (see `sim/leases.rs`).
#[test]
fn leases_stay_exclusive_under_partitions_crashes_and_drift() {
    // 1,000 seeds in the debug build (about a minute); the release build runs 10,000 (the soak:
    // `cargo test --release --test sim leases_stay`).
    let default = if cfg!(debug_assertions) { 1_000 } else { 10_000 };
    let runs = for_seeds("leases_stay_exclusive_under_partitions_crashes_and_drift", default, 1, |seed| {
        let mut r = scenario_rng(seed, 9);
        let nodes = r.gen_range(3..=5);
        let primaries = if r.gen_bool(0.8) { 3 } else { r.gen_range(1..=2) };
        let mut cfg = Config::new(nodes, primaries);
        cfg.loss = if r.gen_bool(0.5) { r.gen_range(0.0..=0.1) } else { 0.0 };
        cfg.max_jitter = Duration::from_millis(r.gen_range(1..=30));
        // Two clocks are at most 2 x 100 ms apart at start and drift 200 ppm apart at most: within
        // LEASE_CLOCK_DRIFT_MS (250 ms) for the run's length.
        cfg.max_offset = Duration::from_millis(r.gen_range(0..=100));
        cfg.max_drift_ppm = 100;
        cfg.bootstraps = nodes - 1;
        cfg.engine.lease_found_after = Duration::from_millis(600);
        let mut c = Cluster::new(seed, cfg);
        c.run_for(Duration::from_millis(1_500));
        let steps = r.gen_range(60..=160);
        for _ in 0..steps {
            if r.gen_bool(0.6) {
                let n = r.gen_range(0..primaries);
                c.lease(n, &mut r);
            }
            match r.gen_range(0..100) {
                0 | 1 => {
                    let victim = r.gen_range(0..nodes);
                    c.crash(victim);
                }
                2..=4 => {
                    let n = r.gen_range(0..nodes);
                    c.restart(n);
                }
                5 => {
                    let mut side: Vec<usize> = (0..nodes).filter(|_| r.gen_bool(0.4)).collect();
                    side.truncate(nodes - 1);
                    c.partition(&side);
                }
                6..=8 => c.heal_all(),
                _ => {}
            }
            c.run_for(STEP);
        }
        (c.leases.granted, c.leases.refused, c.leases.no_quorum)
    });
    let granted: u64 = runs.iter().map(|r| r.0).sum();
    let refused: u64 = runs.iter().map(|r| r.1).sum();
    let no_quorum: u64 = runs.iter().map(|r| r.2).sum();
    eprintln!("  lease answers: {granted} granted, {refused} refused (held / not the holder), {no_quorum} no quorum");
    // Both outcomes must occur, or the invariant was checked against nothing.
    assert!(granted > runs.len() as u64 && refused > 0 && no_quorum > 0);
}

/// What one scale run measured over its window.
#[derive(Debug, Default, Clone, Copy)]
struct Load {
    /// Digest requests a node sends per digest round (a tick that sent any).
    per_round: f64,
    /// Digest rounds per node per second.
    rounds_per_sec: f64,
    /// Digest requests sent per node per second (rounds, connects and catch-ups).
    sent_per_sec: f64,
    /// Digest requests received per second by the busiest node.
    max_received_per_sec: f64,
    /// Repair-plane messages (requests and answers of every kind) per node per round.
    repair_per_round: f64,
    /// Gossip messages sent (published or forwarded) per node per second.
    gossip_per_sec: f64,
}

/// `n` nodes, two primaries writing a little; the load measured over a window in steady state.
fn scale_run(seed: u64, n: usize) -> Load {
    let mut r = scenario_rng(seed, 7 + n as u64);
    let mut cfg = Config::new(n, 2);
    cfg.loss = 0.01;
    cfg.engine.digest_max = Duration::from_secs(10);
    // Attestations at the node's default pace: the load measured is the default configuration's.
    cfg.engine.attest_interval = peersync::sync::engine::DEFAULT_ATTEST_INTERVAL;
    let mut c = Cluster::new(seed, cfg);
    write_for(&mut c, &mut r, 3_000..=3_000, 0.05);
    let before: Vec<_> = c.nodes.iter().map(|n| n.stats.clone()).collect();
    let window = Duration::from_secs(5);
    write_for(&mut c, &mut r, window.as_millis() as u64..=window.as_millis() as u64, 0.05);
    let secs = window.as_secs_f64();
    let (mut sent, mut in_rounds, mut rounds, mut repair, mut gossip, mut busiest) = (0, 0, 0, 0, 0, 0);
    for (node, b) in c.nodes.iter().zip(&before) {
        let s = &node.stats;
        sent += s.digests_sent - b.digests_sent;
        in_rounds += s.round_digests - b.round_digests;
        rounds += s.rounds - b.rounds;
        repair += s.requests_sent + s.answers_sent - b.requests_sent - b.answers_sent;
        gossip += s.gossip_sent - b.gossip_sent;
        busiest = busiest.max(s.digests_received - b.digests_received);
    }
    settle(&mut c);
    let per_node = |x: u64| x as f64 / n as f64 / secs;
    Load {
        per_round: in_rounds as f64 / rounds.max(1) as f64,
        rounds_per_sec: per_node(rounds),
        sent_per_sec: per_node(sent),
        max_received_per_sec: busiest as f64 / secs,
        repair_per_round: repair as f64 / rounds.max(1) as f64,
        gossip_per_sec: per_node(gossip),
    }
}

#[test]
fn digest_load_per_node_stays_flat_as_the_cluster_grows() {
    let mut table = Vec::new();
    for (n, default, share) in [(10usize, 10u64, 100u64), (50, 3, 500), (200, 1, 2000)] {
        let test = format!("digest_load_per_node_stays_flat_as_the_cluster_grows n={n}");
        let runs = for_seeds(&test, default, share, |seed| scale_run(seed, n));
        let avg = |f: fn(&Load) -> f64| runs.iter().map(f).sum::<f64>() / runs.len() as f64;
        let load = Load {
            per_round: avg(|l| l.per_round),
            rounds_per_sec: avg(|l| l.rounds_per_sec),
            sent_per_sec: avg(|l| l.sent_per_sec),
            max_received_per_sec: runs.iter().map(|l| l.max_received_per_sec).fold(0.0, f64::max),
            repair_per_round: avg(|l| l.repair_per_round),
            gossip_per_sec: avg(|l| l.gossip_per_sec),
        };
        eprintln!(
            "  n={n:>3}: per node {:.2} digest requests per round ({:.2} rounds/s, {:.2} digest requests/s), \
             {:.2} repair-plane messages per round, {:.1} gossip sends/s; busiest node receives {:.1} digests/s",
            load.per_round,
            load.rounds_per_sec,
            load.sent_per_sec,
            load.repair_per_round,
            load.gossip_per_sec,
            load.max_received_per_sec
        );
        table.push((n, load));
    }
    let small = table[0].1;
    for (n, load) in &table[1..] {
        assert!(
            load.per_round <= small.per_round + 0.5
                && load.sent_per_sec <= small.sent_per_sec * 1.5 + 0.5
                && load.repair_per_round <= small.repair_per_round * 1.5 + 1.0,
            "the load per node grows with the cluster: n={n} {load:?} against n=10 {small:?}"
        );
        assert!(
            load.max_received_per_sec <= small.max_received_per_sec * 3.0 + 2.0,
            "a node receives digests from O(n) peers: n={n} {load:?} against n=10 {small:?}"
        );
    }
}

#[test]
fn each_run_is_a_pure_function_of_its_seed() {
    for_seeds("each_run_is_a_pure_function_of_its_seed", 30, 100, |seed| {
        let run = || {
            let (mut c, mut r) = lossy(seed, 8);
            write_for(&mut c, &mut r, 500..=1_500, 0.5);
            let victim = r.gen_range(0..c.nodes.len());
            c.crash(victim);
            write_for(&mut c, &mut r, 200..=800, 0.5);
            c.restart(victim);
            settle(&mut c);
            c.fingerprint()
        };
        let first = run();
        assert_eq!(first, run(), "seed {seed}: two runs of one seed differ");
        if std::env::var("SIM_SEED").is_ok() {
            // To compare with another process (another build, another machine).
            eprintln!("seed {seed}: fingerprint {first}");
        }
    });
}

#[test]
fn snapshot_pull_completes_while_one_honest_source_lives() {
    let (mut worst, mut total) = (Duration::ZERO, chunks::PullStats::default());
    for seed in seeds(300, 10) {
        let mut sim = PullSim::new(seed, true);
        assert!(sim.honest_alive());
        let took = sim.run(Duration::from_secs(3600), |_| {}).unwrap_or_else(|| {
            panic!("seed {seed}: incomplete with an honest source alive: {:?}", sim.pull.progress(sim.now))
        });
        worst = worst.max(took);
        let s = &sim.stats;
        total.requests += s.requests;
        total.corrupt += s.corrupt;
        total.failures += s.failures;
        total.late += s.late;
        total.deaths += s.deaths;
        total.stale_wakeups += s.stale_wakeups;
    }
    assert_eq!(total.stale_wakeups, 0, "next_wakeup() was already past right after next_requests(now)");
    eprintln!("snapshot pull: complete within {worst:?}; {total:?}");
}

#[test]
fn snapshot_pull_keeps_per_source_limit_with_late_answers() {
    for seed in seeds(300, 10) {
        let mut sim = PullSim::new(seed, true);
        sim.check_per_source = true;
        sim.run(Duration::from_secs(3600), |_| {});
    }
}

#[test]
fn snapshot_pull_with_every_source_dead_waits() {
    let mut saw_none_usable = 0;
    for seed in seeds(100, 10) {
        let mut sim = PullSim::all_dead(seed);
        let held = sim.held();
        let total = sim.sources.len();
        let mut none_usable = 0;
        let done = sim.run(Duration::from_secs(600), |s| {
            let usable = s.pull.progress(s.now).sources;
            let paused = s.surely_paused();
            assert!(usable <= total - paused, "seed {seed}: {usable} sources usable, {paused} of {total} paused");
            if paused == total {
                assert_eq!(usable, 0, "seed {seed}");
                none_usable += 1;
            }
        });
        assert_eq!(done, None, "seed {seed}: complete with every source dead");
        assert_eq!(sim.held(), held, "seed {seed}: chunks held without any answer");
        assert!(none_usable > 0, "seed {seed}: the sources were never all paused");
        saw_none_usable += none_usable;
    }
    eprintln!("dead sources: {saw_none_usable} checks with every source paused and none usable");
}

/// The store view the engine reads is the one the sim checks: a sanity check of the fake itself.
#[test]
fn the_in_memory_store_serves_what_it_logged() {
    let mut c = Cluster::new(0, Config::new(3, 1));
    for _ in 0..20 {
        c.write(0);
        c.run_for(STEP);
    }
    let store = &c.nodes[0].store;
    let vv = store.version_vector();
    let origin = c.nodes[0].peer;
    let read = peersync::sync::ServeStore::read_log(store, &origin, Seq(0), 1000, 1 << 20).unwrap().unwrap();
    assert_eq!(read.last().map(|b| b.head.seq), Some(vv.get(&origin)));
    let mut chain = peersync::op::ChainHash::GENESIS;
    for b in read {
        chain = b.verify(chain, 4096).expect("served batches verify").head.head;
    }
}
