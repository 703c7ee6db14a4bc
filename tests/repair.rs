//! The repair plane across nodes in one process: snapshot + replay beyond log retention, a snapshot
//! pulled from two sources when one dies, replicas syncing from replicas, divergence repair.

mod common;

use std::time::Duration;

use common::{dial_addr, eventually};
use peersync::node::{Node, NodeConfig, NodeHandle, Role};

const DEADLINE: Duration = Duration::from_secs(60);

async fn start(
    dir: &tempfile::TempDir,
    role: Role,
    bootstrap: &[&NodeHandle],
    configure: impl FnOnce(&mut NodeConfig),
) -> Node {
    common::init_tracing();
    let mut config = NodeConfig::local(dir.path());
    config.net.role = role;
    for b in bootstrap {
        config.net.bootstrap.push(dial_addr(b).await);
    }
    configure(&mut config);
    Node::start(config).await.unwrap()
}

fn metric(node: &NodeHandle, name: &str) -> u64 {
    let text = node.metrics().render();
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Waits until a counter reaches `at_least` and returns it: counters move just after the commit
/// they count, so a test that saw the state change may read them a moment early.
async fn counted(node: &NodeHandle, name: &str, at_least: u64) -> u64 {
    eventually(name, DEADLINE, || async {
        let n = metric(node, name);
        if n >= at_least {
            Ok(n)
        } else {
            Err(format!("{n}"))
        }
    })
    .await
}

async fn converged(nodes: &[&NodeHandle]) {
    eventually("nodes to converge", DEADLINE, || async {
        let seen: Vec<_> = nodes.iter().map(|n| n.store().state_root()).collect();
        if seen.windows(2).all(|w| w[0] == w[1]) {
            Ok(())
        } else {
            // What a failure needs to be read: whether the nodes still talk, and what they did.
            let talk: Vec<String> = nodes
                .iter()
                .map(|n| {
                    let m = |name| metric(n, name);
                    format!(
                        "{}: connected {}, divergences {}, requests shed {}, in flight {}",
                        n.peer_id(),
                        m("peersync_connected_peers"),
                        m("peersync_divergences_total"),
                        m("peersync_sync_requests_shed_total"),
                        m("peersync_requests_in_flight"),
                    )
                })
                .collect();
            Err(format!("{seen:?}; {talk:?}"))
        }
    })
    .await;
}

/// Writes `n` keys of `size` random-ish bytes (incompressible, so chunks stay large).
async fn fill(node: &NodeHandle, prefix: &str, n: usize, size: usize) {
    let mut seed = 0x9e3779b97f4a7c15u64 ^ prefix.len() as u64;
    for start in (0..n).step_by(500) {
        let entries = (start..(start + 500).min(n))
            .map(|i| {
                let value: Vec<u8> = (0..size)
                    .map(|_| {
                        seed ^= seed << 13;
                        seed ^= seed >> 7;
                        seed ^= seed << 17;
                        seed as u8
                    })
                    .collect();
                (format!("{prefix}{i:06}").into_bytes(), value)
            })
            .collect();
        node.put_batch("data", entries).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_beyond_log_retention_catches_up_by_snapshot_then_replay() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = start(&da, Role::Primary, &[], |c| {
        c.log_retention_ops = 50;
        c.log_retention_bytes = 1;
    })
    .await;
    let ah = a.handle();
    fill(&ah, "old", 1000, 50).await;
    let snap = ah.create_snapshot().await.unwrap();
    // Down to the retention of 50 ops, in whole signed batches (at most 256 ops each).
    assert!(snap.ops_compacted >= 1000 - 50 - 256, "the log was compacted down to the retention: {snap:?}");
    fill(&ah, "new", 120, 50).await;

    let b = start(&db, Role::Replica, &[&ah], |_| {}).await;
    let bh = b.handle();
    converged(&[&ah, &bh]).await;
    bh.wait_active(DEADLINE).await.unwrap();
    assert_eq!(counted(&bh, "peersync_snapshots_installed_total", 1).await, 1, "the snapshot path ran");
    let replayed = counted(&bh, "peersync_ops_replayed_total", 120).await;
    assert!((120..1000).contains(&replayed), "then only the ops after the snapshot were replayed: {replayed}");
    assert!(
        bh.get("data", b"old000999").await.unwrap().is_some() && bh.get("data", b"new000119").await.unwrap().is_some()
    );
    assert!(bh.store().check_log().unwrap().problems.is_empty());
    // B now serves the snapshot it installed.
    assert_eq!(bh.list_snapshots().await.unwrap().last().unwrap().cid, snap.cid);
    b.shutdown().await;
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_pull_survives_the_death_of_one_source_without_refetching() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let small = |c: &mut NodeConfig| {
        c.snapshot_chunk_bytes = 4096;
        c.log_retention_ops = 10;
        c.log_retention_bytes = 1;
        c.snapshot_chunks_per_source = 1;
    };
    let a = start(&dirs[0], Role::Primary, &[], small).await;
    let ah = a.handle();
    fill(&ah, "k", 3000, 1000).await;
    let snap = ah.create_snapshot().await.unwrap();
    assert!(snap.chunks > 500, "a snapshot of many chunks: {}", snap.chunks);
    // A replica takes the snapshot and so becomes a second source.
    let r1 = start(&dirs[1], Role::Replica, &[&ah], small).await;
    let r1h = r1.handle();
    converged(&[&ah, &r1h]).await;

    let r2 = start(&dirs[2], Role::Replica, &[&ah, &r1h], small).await;
    let r2h = r2.handle();
    let progress = eventually("the pull to be under way from two sources", DEADLINE, || async {
        let s = r2h.net_status().await.map_err(|e| e.to_string())?;
        match s.snapshot {
            Some(s)
                if s.progress.sources >= 2
                    && s.progress.chunks_have >= 20
                    && s.progress.chunks_have < s.progress.chunks_total / 2 =>
            {
                Ok(s)
            }
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    a.shutdown().await;
    drop(ah);
    converged(&[&r1h, &r2h]).await;
    r2h.wait_active(DEADLINE).await.unwrap();
    assert_eq!(counted(&r2h, "peersync_snapshots_installed_total", 1).await, 1);
    let received = r2h.metrics().render();
    let bytes: u64 = received
        .lines()
        .find_map(|l| l.strip_prefix("peersync_bytes_received_total{protocol=\"snapshot\"} "))
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert_eq!(bytes, snap.bytes, "every chunk fetched exactly once (killed at {progress:?})");
    r2.shutdown().await;
    r1.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_replica_syncs_from_a_replica_when_the_primary_is_gone() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = start(&dirs[0], Role::Primary, &[], |_| {}).await;
    let ah = a.handle();
    fill(&ah, "k", 800, 100).await;
    let r1 = start(&dirs[1], Role::Replica, &[&ah], |_| {}).await;
    let r1h = r1.handle();
    converged(&[&ah, &r1h]).await;
    r1h.wait_active(DEADLINE).await.unwrap();
    a.shutdown().await;
    drop(ah);

    let r2 = start(&dirs[2], Role::Replica, &[&r1h], |_| {}).await;
    let r2h = r2.handle();
    converged(&[&r1h, &r2h]).await;
    r2h.wait_active(DEADLINE).await.unwrap();
    assert_eq!(r2h.get("data", b"k000799").await.unwrap().map(|v| v.len()), Some(100));
    r2.shutdown().await;
    r1.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_at_the_same_vector_with_different_roots_repair_by_buckets() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = start(&da, Role::Primary, &[], |_| {}).await;
    let ah = a.handle();
    fill(&ah, "k", 300, 20).await;
    let b = start(&db, Role::Replica, &[&ah], |_| {}).await;
    let bh = b.handle();
    converged(&[&ah, &bh]).await;
    bh.wait_active(DEADLINE).await.unwrap();

    // Corrupt B's state behind the log's back: an entry no op ever wrote.
    let ghost = peersync::crdt::RegisterValue {
        hlc: peersync::crdt::Hlc::new(1, 0),
        origin: ah.peer_id(),
        value: Some(b"ghost".to_vec()),
    };
    let entry = peersync::snapshot::StateEntry {
        kind: peersync::snapshot::Kind::Register,
        collection: "data".into(),
        key: b"ghost".to_vec(),
        value: postcard::to_stdvec(&ghost).unwrap(),
    };
    assert_eq!(bh.merge_entries(vec![entry]).await.unwrap(), 1);
    assert_eq!(ah.store().version_vector(), bh.store().version_vector());
    assert_ne!(ah.store().state_root(), bh.store().state_root(), "same vector, different root");

    // Digests reveal it; the nodes compare buckets and exchange only the differing entries.
    converged(&[&ah, &bh]).await;
    assert_eq!(ah.get("data", b"ghost").await.unwrap().as_deref(), Some(&b"ghost"[..]));
    let divergences = metric(&ah, "peersync_divergences_total") + metric(&bh, "peersync_divergences_total");
    assert!(divergences >= 1, "the divergence was counted");
    b.shutdown().await;
    a.shutdown().await;
}

/// A peer that looks like a replica of the cluster holding everything A holds, but forges the ops
/// it replays and corrupts the chunks it serves.
struct Liar {
    addr: libp2p::Multiaddr,
    forged_ops_served: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    corrupt_chunks_served: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

/// A peer that serves the honest node's data corrupted. With `fake_snapshot` it also advertises a
/// snapshot of a single entry that it cannot serve.
async fn liar(honest: NodeHandle, fake_snapshot: bool) -> Liar {
    use futures::StreamExt;
    use libp2p::request_response::{Event, Message};
    use libp2p::swarm::SwarmEvent;
    use peersync::net::{BehaviourEvent, Digest, SyncRequest, SyncResponse};
    use peersync::snapshot::SnapshotBrief;
    use std::sync::atomic::Ordering;

    let keypair = libp2p::identity::Keypair::generate_ed25519();
    let peer = keypair.public().to_peer_id();
    let config = peersync::net::NetConfig {
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
        mdns: false,
        role: Role::Replica,
        gossip_heartbeat: Duration::from_millis(100),
        ..Default::default()
    };
    let mut swarm = peersync::net::build_swarm(keypair, &config).unwrap();
    peersync::net::start(&mut swarm, &config).unwrap();
    let addr = loop {
        if let SwarmEvent::NewListenAddr { address, .. } = swarm.select_next_some().await {
            break format!("{address}/p2p/{peer}").parse().unwrap();
        }
    };
    let forged = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let corrupt = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (forged_c, corrupt_c) = (forged.clone(), corrupt.clone());
    let task = tokio::spawn(async move {
        loop {
            let event = swarm.select_next_some().await;
            let SwarmEvent::Behaviour(BehaviourEvent::Sync(Event::Message {
                message: Message::Request { request, channel, .. },
                ..
            })) = event
            else {
                if let SwarmEvent::Behaviour(BehaviourEvent::Identify(libp2p::identify::Event::Received {
                    peer_id,
                    info,
                    ..
                })) = event
                {
                    peersync::net::on_identify(&mut swarm, &peer_id, &info);
                }
                continue;
            };
            let store = honest.store();
            let response = match request {
                SyncRequest::Digest(_) => {
                    let (state_root, version_vector) = store.state_root();
                    let mut snapshots: Vec<_> = store.latest_snapshot().unwrap().map(|s| s.cid).into_iter().collect();
                    let mut snapshot_brief = None;
                    if fake_snapshot {
                        snapshots = vec![peersync::op::raw_cid(b"a snapshot nobody has")];
                        snapshot_brief = Some(SnapshotBrief { entries: 1, version_vector: version_vector.clone() });
                    }
                    // Claims the whole log (no floors), so it is asked to replay.
                    SyncResponse::Digest(Digest {
                        cluster: "default".into(),
                        role: Role::Replica,
                        version_vector,
                        state_root,
                        log_floors: Default::default(),
                        snapshots,
                        snapshot_brief,
                        cert: None,
                        members: vec![],
                        revocations: vec![],
                        hold_until: None,
                        lease_group: None,
                    })
                }
                SyncRequest::GetOps { origin, after, max_ops, .. } => {
                    let read = store.read_log(&origin, after, max_ops as usize, 1 << 20).unwrap();
                    let mut batches = read.batches;
                    if batches.is_empty() {
                        // Below the honest floor: invent a batch that claims to continue the log.
                        let real = store.read_batches(&origin, store.log_floor(&origin).unwrap(), 1, 1 << 20).unwrap();
                        batches = real
                            .into_iter()
                            .map(|mut b| {
                                b.after = after;
                                b
                            })
                            .collect();
                    }
                    for b in &mut batches {
                        let last = b.ops[0].len() - 1;
                        b.ops[0][last] ^= 0xff;
                    }
                    forged_c.fetch_add(1, Ordering::SeqCst);
                    SyncResponse::Ops(batches)
                }
                SyncRequest::GetManifest { cid } => match store.snapshot_manifest(&cid).unwrap() {
                    Some(m) => SyncResponse::Manifest(m.encode()),
                    None => SyncResponse::Error { code: "not_found".into(), message: "no such snapshot".into() },
                },
                SyncRequest::GetChunk { cid } => {
                    let mut bytes = store.snapshot_chunk(&cid).unwrap().unwrap();
                    bytes[0] ^= 0xff;
                    corrupt_c.fetch_add(1, Ordering::SeqCst);
                    SyncResponse::Chunk(bytes)
                }
                _ => SyncResponse::Error { code: "no".into(), message: "no".into() },
            };
            let _ = swarm.behaviour_mut().sync.send_response(channel, response);
        }
    });
    Liar { addr, forged_ops_served: forged, corrupt_chunks_served: corrupt, task }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lying_peer_is_rejected_and_honest_sources_are_used() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = start(&da, Role::Primary, &[], |c| {
        c.log_retention_ops = 20;
        c.log_retention_bytes = 1;
        c.snapshot_chunk_bytes = 4096;
    })
    .await;
    let ah = a.handle();
    fill(&ah, "old", 400, 200).await;
    ah.create_snapshot().await.unwrap();
    fill(&ah, "new", 50, 200).await;

    let liar = liar(ah.clone(), false).await;
    let a_addr = dial_addr(&ah).await;
    let mut config = NodeConfig::local(db.path());
    config.net.role = Role::Replica;
    config.net.bootstrap = vec![liar.addr.clone(), a_addr];
    let b = Node::start(config).await.unwrap();
    let bh = b.handle();
    converged(&[&ah, &bh]).await;
    bh.wait_active(DEADLINE).await.unwrap();

    use std::sync::atomic::Ordering;
    let (forged, corrupt) =
        (liar.forged_ops_served.load(Ordering::SeqCst), liar.corrupt_chunks_served.load(Ordering::SeqCst));
    assert!(forged + corrupt > 0, "the liar was asked for something");
    // Every forged replay and every corrupt chunk that reached B was rejected (answers to requests
    // B had already given up on may not have arrived before the liar stopped).
    let (replay_rejected, chunks_rejected) =
        (metric(&bh, "peersync_replay_rejected_total"), metric(&bh, "peersync_chunks_rejected_total"));
    assert!(replay_rejected <= forged as u64 && chunks_rejected <= corrupt as u64);
    assert!(
        replay_rejected + chunks_rejected >= 1,
        "the lies were caught: {replay_rejected} replays, {chunks_rejected} chunks"
    );
    // And nothing corrupt was applied: B holds exactly A's state, with a sound log.
    assert_eq!(bh.store().state_root(), ah.store().state_root());
    let report = bh.store().check_log().unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    println!("liar served {forged} forged replays and {corrupt} corrupt chunks; all rejected");
    liar.task.abort();
    b.shutdown().await;
    a.shutdown().await;
}

/// `rounds` x 100 writes over 30 keys: a long log of overwrites whose state is small.
async fn overwrite(node: &NodeHandle, rounds: usize) {
    for round in 0..rounds {
        let entries = (0..100).map(|i| (format!("hot{:02}", i % 30).into_bytes(), format!("{round}-{i}").into_bytes()));
        node.put_batch("data", entries.collect()).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_node_takes_a_snapshot_when_it_spares_more_replay_than_it_costs() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = start(&dirs[0], Role::Primary, &[], |_| {}).await;
    let ah = a.handle();
    overwrite(&ah, 30).await;
    let snap = ah.create_snapshot().await.unwrap();
    assert_eq!((snap.entries, snap.ops_compacted), (30, 0), "a small state, and the whole log kept");
    overwrite(&ah, 1).await;

    // Replay is possible (nothing was compacted), but 30 entries spare 3000 ops of it.
    let b = start(&dirs[1], Role::Replica, &[&ah], |c| c.snapshot_min_saving_ops = 1000).await;
    let bh = b.handle();
    converged(&[&ah, &bh]).await;
    bh.wait_active(DEADLINE).await.unwrap();
    assert_eq!(counted(&bh, "peersync_snapshots_installed_total", 1).await, 1, "the snapshot path ran");
    let replayed = counted(&bh, "peersync_ops_replayed_total", 100).await;
    assert!(replayed < 1000, "only the ops after the snapshot were replayed: {replayed}");
    assert_eq!(bh.get("data", b"hot29").await.unwrap().as_deref(), Some(&b"0-89"[..]), "the last write wins");
    assert!(bh.store().check_log().unwrap().problems.is_empty());

    // Below the minimum saving, the same join replays the whole log.
    let c = start(&dirs[2], Role::Replica, &[&ah], |c| c.snapshot_min_saving_ops = 10_000).await;
    let ch = c.handle();
    converged(&[&ah, &ch]).await;
    ch.wait_active(DEADLINE).await.unwrap();
    assert_eq!(counted(&ch, "peersync_ops_replayed_total", 3100).await, 3100, "replayed from the start");
    assert_eq!(metric(&ch, "peersync_snapshots_installed_total"), 0);
    for n in [c, b, a] {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_advertising_a_cheap_snapshot_it_cannot_serve_does_not_hold_replay_back() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = start(&da, Role::Primary, &[], |_| {}).await;
    let ah = a.handle();
    // More ops than one pull brings, so the liar's digest is in before replay is done.
    overwrite(&ah, 300).await;
    let liar = liar(ah.clone(), true).await;
    // B hears of a one-entry snapshot sparing every op, from a peer that cannot serve it (and
    // forges the ops it replays); the primary has no snapshot at all.
    let b = start(&db, Role::Replica, &[&ah], |c| {
        c.snapshot_min_saving_ops = 1000;
        c.net.bootstrap.insert(0, liar.addr.clone());
    })
    .await;
    let bh = b.handle();
    converged(&[&ah, &bh]).await;
    bh.wait_active(DEADLINE).await.unwrap();
    assert_eq!(metric(&bh, "peersync_snapshots_installed_total"), 0);
    // Received through replay: the primary's 30 000, plus whatever the liar forged (refused).
    counted(&bh, "peersync_ops_replayed_total", 30_000).await;
    assert!(bh.store().check_log().unwrap().problems.is_empty());
    liar.task.abort();
    b.shutdown().await;
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_made_by_a_replica_is_not_taken_when_replay_can_do() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = start(&dirs[0], Role::Primary, &[], |_| {}).await;
    let ah = a.handle();
    overwrite(&ah, 30).await;
    let r = start(&dirs[1], Role::Replica, &[&ah], |_| {}).await;
    let rh = r.handle();
    converged(&[&ah, &rh]).await;
    // Only the replica holds a snapshot, made by itself: its entries are checked against nothing but
    // the replica's own signature, so a node that can replay does.
    rh.create_snapshot().await.unwrap();
    let c = start(&dirs[2], Role::Replica, &[&rh], |c| c.snapshot_min_saving_ops = 1000).await;
    let ch = c.handle();
    converged(&[&ah, &ch]).await;
    ch.wait_active(DEADLINE).await.unwrap();
    assert_eq!(metric(&ch, "peersync_snapshots_installed_total"), 0, "the replica's snapshot was not installed");
    counted(&ch, "peersync_ops_replayed_total", 3000).await;
    for n in [c, r, a] {
        n.shutdown().await;
    }
}
