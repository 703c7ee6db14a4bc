//! Cluster benchmarks (release mode, nodes in one process over loopback TCP):
//!
//! - latency: 5 nodes in a chain; one primary writes at a fixed rate (default 1 000/s); for each
//!   write, the time from calling `put` until the op is applied on every node (p50, p99, max).
//! - throughput: 3 primaries write concurrently (batches through the library) and the clock stops
//!   when all three have converged (same version vector and state root everywhere).
//!
//! Run: `cargo bench --bench cluster -- [--quick] [--rate N] [--writes N] [--ops N] [--json PATH]`

use std::collections::HashMap;
use std::time::{Duration, Instant};

use peersync::ids::{Origin, Seq};
use peersync::node::{Node, NodeConfig, NodeEvent, NodeHandle, Role};

struct Args {
    rate: u64,
    writes: u64,
    ops: u64,
    json: Option<String>,
}

fn args() -> Args {
    let mut a = Args { rate: 1000, writes: 10_000, ops: 300_000, json: None };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().expect("flag needs a value");
        match flag.as_str() {
            "--quick" => {
                a.writes = 2_000;
                a.ops = 30_000;
            }
            "--rate" => a.rate = value().parse().unwrap(),
            "--writes" => a.writes = value().parse().unwrap(),
            "--ops" => a.ops = value().parse().unwrap(),
            "--json" => a.json = Some(value()),
            "--bench" => {}
            other => panic!("unknown flag {other}"),
        }
    }
    a
}

async fn start_chain(roles: &[Role], dirs: &[tempfile::TempDir]) -> Vec<Node> {
    let mut nodes: Vec<Node> = Vec::new();
    for (role, dir) in roles.iter().zip(dirs) {
        let mut config = NodeConfig::local(dir.path());
        config.net.role = *role;
        if let Some(prev) = nodes.last() {
            let h = prev.handle();
            let addr = loop {
                if let Some(a) = h.net_status().await.unwrap().listen_addrs.first() {
                    break a.clone();
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            };
            config.net.bootstrap = vec![format!("{addr}/p2p/{}", h.peer_id()).parse().unwrap()];
        }
        nodes.push(Node::start(config).await.unwrap());
    }
    nodes
}

/// Waits until every node lists `n` identified, connected peers and a warm-up write reached all.
async fn settle(handles: &[NodeHandle]) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut ok = true;
        for h in handles {
            let s = h.net_status().await.unwrap();
            ok &= s.peers.iter().filter(|p| p.connected && p.role.is_some()).count() >= 1;
        }
        if ok {
            break;
        }
        assert!(Instant::now() < deadline, "nodes did not connect within 60 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Let gossipsub build its mesh (a few heartbeats) before measuring.
    tokio::time::sleep(Duration::from_millis(1500)).await;
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn latency(args: &Args) -> serde_json::Value {
    let dirs: Vec<_> = (0..5).map(|_| tempfile::tempdir().unwrap()).collect();
    let roles = [Role::Primary, Role::Replica, Role::Replica, Role::Replica, Role::Replica];
    let nodes = start_chain(&roles, &dirs).await;
    let handles: Vec<NodeHandle> = nodes.iter().map(Node::handle).collect();
    settle(&handles).await;
    let writer = handles[0].clone();
    let origin = writer.peer_id();
    let base = writer.store().version_vector().get(&origin).0;

    // Each node reports when each seq of the writer became applied there.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(usize, u64, Instant)>();
    for (i, h) in handles.iter().enumerate() {
        let mut events = h.events();
        let tx = tx.clone();
        tokio::spawn(async move {
            while let Ok(e) = events.recv().await {
                if let NodeEvent::OpsApplied { origin: o, first, last, .. } = e {
                    if o == origin {
                        let now = Instant::now();
                        for s in first.0..=last.0 {
                            let _ = tx.send((i, s, now));
                        }
                    }
                }
            }
        });
    }
    drop(tx);

    let mut sent: HashMap<u64, Instant> = HashMap::new();
    let mut ticker = tokio::time::interval(Duration::from_micros(1_000_000 / args.rate));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    let mut puts = Vec::new();
    for i in 0..args.writes {
        ticker.tick().await;
        let w = writer.clone();
        let t0 = Instant::now();
        puts.push(tokio::spawn(async move {
            let r = w.put("bench", format!("k{i}"), vec![7u8; 100]).await.unwrap();
            (r.seq, t0)
        }));
    }
    for p in puts {
        let (seq, t0) = p.await.unwrap();
        sent.insert(seq, t0);
    }
    let write_secs = started.elapsed().as_secs_f64();
    let last = base + args.writes;
    let mut seen: HashMap<u64, (usize, Instant)> = HashMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while seen.values().filter(|(n, _)| *n == 5).count() < args.writes as usize {
        let Ok(Some((_, seq, at))) = tokio::time::timeout_at(deadline, rx.recv()).await else {
            panic!("not every write reached every node within 120 s")
        };
        if seq > base && seq <= last {
            let e = seen.entry(seq).or_insert((0, at));
            e.0 += 1;
            e.1 = e.1.max(at);
        }
    }
    let mut lat: Vec<Duration> = seen.iter().map(|(seq, (_, at))| at.duration_since(sent[seq])).collect();
    lat.sort();
    let (p50, p99, max) = (percentile(&lat, 0.5), percentile(&lat, 0.99), *lat.last().unwrap());
    println!(
        "latency   5 nodes, {} writes at {}/s (achieved {:.0}/s): put -> applied on all 5: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms   (goal p99 <= 10 ms)",
        args.writes,
        args.rate,
        args.writes as f64 / write_secs,
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3,
        max.as_secs_f64() * 1e3
    );
    for n in nodes {
        n.shutdown().await;
    }
    serde_json::json!({"workload": "propagation_latency", "nodes": 5, "writes": args.writes, "rate": args.rate,
        "p50_ms": p50.as_secs_f64() * 1e3, "p99_ms": p99.as_secs_f64() * 1e3, "max_ms": max.as_secs_f64() * 1e3})
}

async fn throughput(args: &Args) -> serde_json::Value {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let nodes = start_chain(&[Role::Primary; 3], &dirs).await;
    let handles: Vec<NodeHandle> = nodes.iter().map(Node::handle).collect();
    settle(&handles).await;
    let per_node = args.ops / 3;
    let batch = 1000u64;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (n, h) in handles.iter().enumerate() {
        for t in 0..4u64 {
            let h = h.clone();
            tasks.push(tokio::spawn(async move {
                let mut i = t * batch;
                while i < per_node {
                    let entries = (i..(i + batch).min(per_node))
                        .map(|k| (format!("n{n}-{k}").into_bytes(), vec![1u8; 100]))
                        .collect();
                    h.put_batch("bench", entries).await.unwrap();
                    i += 4 * batch;
                }
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let written = started.elapsed();
    let target: Vec<(Origin, Seq)> =
        handles.iter().map(|h| (h.peer_id(), h.store().version_vector().get(&h.peer_id()))).collect();
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let done = handles.iter().all(|h| {
            let vv = h.store().version_vector();
            target.iter().all(|(o, s)| vv.get(o) >= *s)
        });
        if done {
            break;
        }
        assert!(Instant::now() < deadline, "no convergence within 300 s");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let converged = started.elapsed();
    let roots: Vec<_> = handles.iter().map(|h| h.store().state_root().0).collect();
    assert!(roots.windows(2).all(|w| w[0] == w[1]), "state roots differ after convergence");
    let total = per_node * 3;
    let rate = total as f64 / converged.as_secs_f64();
    println!(
        "throughput 3 primaries, {} ops of 100 B (batches of {batch}): written in {:.2} s, all converged after {:.2} s = {:.0} ops/s replicated   (goal >= 100k ops/s)",
        total,
        written.as_secs_f64(),
        converged.as_secs_f64(),
        rate
    );
    for n in nodes {
        n.shutdown().await;
    }
    serde_json::json!({"workload": "replicated_throughput", "nodes": 3, "ops": total,
        "write_s": written.as_secs_f64(), "converged_s": converged.as_secs_f64(), "ops_per_s": rate})
}

fn main() {
    let args = args();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let results = rt.block_on(async { vec![latency(&args).await, throughput(&args).await] });
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&results).unwrap()).unwrap();
    }
}
