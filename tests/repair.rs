//! The repair plane across nodes in one process: snapshot + replay beyond log retention, a snapshot
//! pulled from two sources when one dies, replicas syncing from replicas, divergence repair.

mod common;

use std::time::Duration;

use common::eventually;
use libp2p::Multiaddr;
use peersync::node::{Node, NodeConfig, NodeHandle, Role};

const DEADLINE: Duration = Duration::from_secs(60);

async fn dial_addr(node: &NodeHandle) -> Multiaddr {
    let listen = eventually("a listen address", DEADLINE, || async {
        let s = node.net_status().await.map_err(|e| e.to_string())?;
        s.listen_addrs.first().cloned().ok_or_else(|| "none yet".to_string())
    })
    .await;
    format!("{listen}/p2p/{}", node.peer_id()).parse().unwrap()
}

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

async fn converged(nodes: &[&NodeHandle]) {
    eventually("nodes to converge", DEADLINE, || async {
        let seen: Vec<_> = nodes.iter().map(|n| n.store().state_root()).collect();
        if seen.windows(2).all(|w| w[0] == w[1]) {
            Ok(())
        } else {
            Err(format!("{seen:?}"))
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
    assert!(snap.ops_compacted >= 900, "the log was compacted down to the retention: {snap:?}");
    fill(&ah, "new", 120, 50).await;

    let b = start(&db, Role::Replica, &[&ah], |_| {}).await;
    let bh = b.handle();
    converged(&[&ah, &bh]).await;
    bh.wait_active(DEADLINE).await.unwrap();
    assert_eq!(metric(&bh, "peersync_snapshots_installed_total"), 1, "the snapshot path ran");
    let replayed = metric(&bh, "peersync_ops_replayed_total");
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
            Some(p) if p.sources >= 2 && p.chunks_have >= 20 && p.chunks_have < p.chunks_total / 2 => Ok(p),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    a.shutdown().await;
    drop(ah);
    converged(&[&r1h, &r2h]).await;
    r2h.wait_active(DEADLINE).await.unwrap();
    assert_eq!(metric(&r2h, "peersync_snapshots_installed_total"), 1);
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
