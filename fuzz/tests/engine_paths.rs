//! The engine target's executor reaches the deep paths: replay pulls and applies, a snapshot pull
//! (manifest, chunks, stage, install), divergence repair, membership. Each scenario here is one the
//! fuzzer could build; they guard against a harness change that would leave the engine shallow.
//!
//! `cargo test --manifest-path fuzz/Cargo.toml`

use std::collections::BTreeSet;

use peersync::sync::Action;
use peersync_fuzz::engine::{
    run_observed, CertSpec, DigestSpec, Judge, Knobs, RespSpec, Scenario, Step, StoreInit, TimeStep,
};

fn knobs(membership: bool) -> Knobs {
    Knobs {
        membership,
        replica: false,
        max_serving: 3,
        max_applying: 7,
        gap_ops: 63,
        gap_bytes: 4000,
        max_peers: 3,
        target_peers: 3,
        chunks_per_source: 1,
        request_timeout_s: 9,
        digest_min_ms: 249,
        digest_max_s: 9,
        discovery_s: 29,
        join_grace_ms: 0,
        snapshot_min_saving: 0,
        max_gossip_bytes: 60_000,
        mdns: false,
        serve_alone: false,
        bootstrap: vec![(0, true)],
        remembered: vec![],
        revocations: vec![],
        seed: 7,
    }
}

fn store() -> StoreInit {
    StoreInit { progress: vec![], floors: vec![], diverged: false, snapshot: None, buckets: 1 }
}

fn kinds(scenario: &Scenario) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    run_observed(scenario, &mut |a| {
        let name = match a {
            Action::Send { request, .. } => {
                format!("Send/{}", format!("{request:?}").split(['(', ' ', '{']).next().unwrap())
            }
            other => format!("{other:?}").split(['(', ' ', '{']).next().unwrap().to_owned(),
        };
        seen.insert(name);
    });
    seen
}

/// Respond to the oldest outstanding request as an honest peer would, `n` times, applying and
/// committing what comes back.
fn honest_rounds(steps: &mut Vec<Step>, n: usize, t: u8) {
    for _ in 0..n {
        steps.push(Step::Respond { which: 0, response: RespSpec::Fitting(t) });
        steps.push(Step::Applied { which: 0, ok: Judge::Honest });
        steps.push(Step::Commit { which: 0 });
        steps.push(Step::Staged { which: 0, verdict: Judge::Honest, len: None });
        steps.push(Step::Tick { step: TimeStep::Millis(300) });
    }
}

fn connect(steps: &mut Vec<Step>, peer: u8) {
    steps.push(Step::Connect { peer, dialed: true });
    steps.push(Step::Identify { peer, agent: 1, addrs: 1 });
    steps.push(Step::Tick { step: TimeStep::Millis(300) });
}

#[test]
fn replay_pulls_apply_and_commit() {
    let mut steps = vec![];
    connect(&mut steps, 0);
    honest_rounds(&mut steps, 30, 0);
    let seen = kinds(&Scenario { knobs: knobs(false), store: store(), steps });
    println!("{seen:?}");
    for k in ["Send/Digest", "Send/GetOps", "Apply"] {
        assert!(seen.contains(k), "{k} not reached: {seen:?}");
    }
}

#[test]
fn snapshot_pull_stages_and_installs() {
    let mut steps = vec![];
    connect(&mut steps, 0);
    // Floors at 30 on P0: replay cannot serve from 0, the snapshot (index 0) must be pulled.
    honest_rounds(&mut steps, 40, 0x30);
    steps.push(Step::Installed { ok: Judge::Honest });
    honest_rounds(&mut steps, 5, 0x30);
    let seen = kinds(&Scenario { knobs: knobs(false), store: store(), steps });
    println!("{seen:?}");
    for k in ["Send/GetManifest", "Send/GetChunk", "Stage", "Install"] {
        assert!(seen.contains(k), "{k} not reached: {seen:?}");
    }
}

#[test]
fn divergence_repair_asks_for_buckets_and_merges() {
    let mut steps = vec![];
    connect(&mut steps, 0);
    // Same vector (empty), another root: a digest with an empty vector and a changed root.
    steps.push(Step::RequestDigest {
        peer: 0,
        digest: DigestSpec {
            other_cluster: false,
            replica: false,
            vv: vec![],
            root: Some(3),
            floors: vec![],
            snapshot: None,
            brief: false,
            cert: CertSpec::Own,
            members: vec![],
            revocations: vec![],
        },
    });
    // Outstanding: the first digest (0), then the bucket request (1), then the entries request.
    steps.push(Step::Respond { which: 1, response: RespSpec::Buckets { differ: 1, wrong_len: false } });
    steps.push(Step::Respond { which: 1, response: RespSpec::Entries { n: 3, garbage: false } });
    let seen = kinds(&Scenario { knobs: knobs(false), store: store(), steps });
    println!("{seen:?}");
    for k in ["Send/GetBuckets", "Send/GetEntries", "Merge"] {
        assert!(seen.contains(k), "{k} not reached: {seen:?}");
    }
}

#[test]
fn membership_admits_certified_peers_and_pulls_from_them() {
    let mut steps = vec![];
    connect(&mut steps, 0);
    connect(&mut steps, 3); // the stranger: turned away after the grace
    honest_rounds(&mut steps, 20, 0);
    steps.push(Step::Tick { step: TimeStep::Secs(6) });
    steps.push(Step::Revoke { which: 0 });
    let seen = kinds(&Scenario { knobs: knobs(true), store: store(), steps });
    println!("{seen:?}");
    for k in ["Send/GetOps", "Apply", "Gossip", "Disconnect", "PersistRevocations"] {
        assert!(seen.contains(k), "{k} not reached: {seen:?}");
    }
}
