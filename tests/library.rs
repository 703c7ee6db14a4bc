//! The library API of a single node, through `NodeHandle`.

mod common;

use std::time::Duration;

use common::start_node;
use peersync::crdt::LeaseRequest;
use peersync::ids::{Seq, Token};
use peersync::node::{Node, NodeConfig, NodeError, NodeEvent, Role};

#[tokio::test]
async fn registers_put_get_delete_list_and_batch() {
    let (node, _dir) = start_node(|_| {}).await;
    let h = node.handle();
    let r1 = h.put("users", "alice", "a1").await.unwrap();
    assert_eq!(r1.seq, 1);
    assert_eq!(r1.token, format!("{}:1", h.peer_id()));
    assert!(r1.cid.starts_with('b'), "CIDv1 base32: {}", r1.cid);
    assert_eq!(h.get("users", b"alice").await.unwrap().as_deref(), Some(&b"a1"[..]));
    h.put("users", "alice", "a2").await.unwrap();
    assert_eq!(h.get("users", b"alice").await.unwrap().as_deref(), Some(&b"a2"[..]));

    let last = h
        .put_batch("users", (0..25).map(|i| (format!("k{i:02}").into_bytes(), vec![i as u8; 3])).collect())
        .await
        .unwrap();
    assert_eq!(last.seq, 27, "a batch takes one seq per entry");
    h.delete("users", "k05").await.unwrap();
    assert_eq!(h.get("users", b"k05").await.unwrap(), None);
    assert_eq!(h.get("users", b"never").await.unwrap(), None);

    // Paging over the prefix skips the tombstone and walks every live key once.
    let mut seen = Vec::new();
    let mut after: Option<Vec<u8>> = None;
    loop {
        let page = h.list("users", b"k", after.as_deref(), 10).await.unwrap();
        seen.extend(page.entries.iter().map(|(k, _)| String::from_utf8(k.clone()).unwrap()));
        match page.next_after {
            Some(a) => after = Some(a),
            None => break,
        }
    }
    let expected: Vec<String> = (0..25).filter(|i| *i != 5).map(|i| format!("k{i:02}")).collect();
    assert_eq!(seen, expected);
    let other = h.list("users", b"alice", None, 10).await.unwrap();
    assert_eq!(other.entries, vec![(b"alice".to_vec(), b"a2".to_vec())]);
    node.shutdown().await;
}

#[tokio::test]
async fn counters_sum_every_delta() {
    let (node, _dir) = start_node(|_| {}).await;
    let h = node.handle();
    let mut tasks = Vec::new();
    for i in 0..20i64 {
        let h = h.clone();
        tasks.push(tokio::spawn(async move {
            h.counter_add("hits", "home", if i % 2 == 0 { 3 } else { -1 }).await.unwrap()
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(h.counter_get("hits", b"home").await.unwrap(), 10 * 3 - 10);
    assert_eq!(h.counter_get("hits", b"other").await.unwrap(), 0);
    node.shutdown().await;
}

#[tokio::test]
async fn leases_grant_refuse_renew_release_with_fencing_tokens() {
    let (node, _dir) = start_node(|_| {}).await;
    let h = node.handle();
    let mut events = h.events();
    let acquire = |holder: &str, ttl_ms| LeaseRequest::Acquire { holder: holder.into(), ttl_ms };
    let a = h.lease("locks", "db", acquire("w1", 60_000)).await.unwrap();
    assert_eq!(a.holder.as_deref(), Some("w1"));
    assert!(a.token > 0);

    match h.lease("locks", "db", acquire("w2", 60_000)).await {
        Err(NodeError::LeaseHeld { holder, token, until_ms }) => {
            // The grantors hold the lease a little longer than its holder is told it lasts.
            assert_eq!((holder.as_str(), token), ("w1", a.token));
            assert_eq!(until_ms, a.expires_at_ms + peersync::sync::leases::LEASE_CLOCK_DRIFT_MS);
        }
        other => panic!("expected LeaseHeld, got {other:?}"),
    }
    let renewed = h.lease("locks", "db", LeaseRequest::Renew { holder: "w1".into(), ttl_ms: 120_000 }).await.unwrap();
    assert_eq!(renewed.token, a.token);
    assert!(renewed.expires_at_ms > a.expires_at_ms);
    assert!(matches!(
        h.lease("locks", "db", LeaseRequest::Release { holder: "w2".into() }).await,
        Err(NodeError::NotHolder { .. })
    ));
    let released = h.lease("locks", "db", LeaseRequest::Release { holder: "w1".into() }).await.unwrap();
    assert_eq!(released.holder, None);
    let b = h.lease("locks", "db", acquire("w2", 60_000)).await.unwrap();
    assert_eq!(b.holder.as_deref(), Some("w2"));
    assert!(b.token > a.token, "a new holder gets a larger fencing token");

    // A short lease expires and can then be taken over.
    let short = h.lease("locks", "tmp", acquire("w1", 1)).await.unwrap();
    let grantors_expiry = short.expires_at_ms + peersync::sync::leases::LEASE_CLOCK_DRIFT_MS;
    common::eventually("the short lease to expire", Duration::from_secs(5), || async {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
        if now >= grantors_expiry {
            Ok(())
        } else {
            Err(format!("now {now}"))
        }
    })
    .await;
    assert!(h.lease("locks", "tmp", acquire("w2", 1_000)).await.unwrap().token > short.token);

    // acquire, renew, release, acquire on db; acquire, acquire on tmp.
    let mut holders = Vec::new();
    while holders.len() < 6 {
        match tokio::time::timeout(Duration::from_secs(10), events.recv()).await {
            Ok(Ok(NodeEvent::LeaseChanged { lease, key, state })) => {
                assert_eq!(lease, "locks");
                holders.push((String::from_utf8(key).unwrap(), state.holder, state.token));
            }
            Ok(Ok(NodeEvent::OpsApplied { .. })) => {}
            other => panic!("expected 6 lease events, got {holders:?} then {other:?}"),
        }
    }
    let db = |h: Option<&str>, t| ("db".to_string(), h.map(str::to_owned), t);
    assert_eq!(
        &holders[..4],
        &[db(Some("w1"), a.token), db(Some("w1"), a.token), db(None, a.token), db(Some("w2"), b.token)]
    );
    node.shutdown().await;
}

#[tokio::test]
async fn bad_input_is_refused_with_clear_errors() {
    let (node, _dir) = start_node(|c| c.limits.max_value_bytes = 10).await;
    let h = node.handle();
    assert!(
        matches!(h.put("bad name", "k", "v").await, Err(NodeError::InvalidInput(m)) if m.contains("register name"))
    );
    assert!(matches!(h.put("r", "", "v").await, Err(NodeError::InvalidInput(m)) if m.contains("empty")));
    assert!(matches!(h.put("r", "k", vec![0u8; 11]).await, Err(NodeError::ValueTooLarge { size: 11, max: 10 })));
    assert!(matches!(h.put_batch("r", vec![]).await, Err(NodeError::InvalidInput(_))));
    assert!(matches!(
        h.lease("l", "k", LeaseRequest::Acquire { holder: "h".into(), ttl_ms: 0 }).await,
        Err(NodeError::InvalidInput(m)) if m.contains("ttl_ms")
    ));
    assert!(matches!(h.list("r", b"", None, 0).await, Err(NodeError::InvalidInput(_))));
    // Nothing was written by the refused requests.
    assert_eq!(h.store().version_vector().total(), 0);
    node.shutdown().await;
}

#[tokio::test]
async fn replica_refuses_writes() {
    let (node, _dir) = start_node(|c| c.net.role = Role::Replica).await;
    assert!(matches!(node.handle().put("r", "k", "v").await, Err(NodeError::ReadOnlyReplica { .. })));
    node.shutdown().await;
}

#[tokio::test]
async fn wait_applied_resolves_when_the_write_lands_and_times_out_otherwise() {
    let (node, _dir) = start_node(|_| {}).await;
    let h = node.handle();
    let me = h.peer_id();
    let future = Token { origin: me, seq: Seq(3) };
    let waiter = {
        let h = h.clone();
        tokio::spawn(async move { h.wait_applied(&[future], Duration::from_secs(20)).await })
    };
    for i in 0..3 {
        h.put("r", format!("k{i}"), "v").await.unwrap();
    }
    waiter.await.unwrap().unwrap();
    let never = Token { origin: me, seq: Seq(100) };
    match h.wait_applied(&[future, never], Duration::from_millis(50)).await {
        Err(NodeError::Timeout { missing, .. }) => assert_eq!(missing, vec![never.to_string()]),
        other => panic!("expected a timeout, got {other:?}"),
    }
    node.shutdown().await;
}

#[tokio::test]
async fn concurrent_writes_are_group_committed_and_survive_restart() {
    let dir = tempfile::tempdir().unwrap();
    let config = NodeConfig::local(dir.path());
    let node = Node::start(config.clone()).await.unwrap();
    let h = node.handle();
    let peer = h.peer_id();
    let mut tasks = Vec::new();
    for t in 0..16 {
        let h = h.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..50 {
                h.put("r", format!("t{t}-{i}"), format!("v{i}")).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let commits = h.metrics().render();
    let (root, vv) = h.store().state_root();
    assert_eq!(vv.get(&peer), Seq(800));
    drop(h); // the database stays open while any handle lives
    node.shutdown().await;
    let commit_count: u64 = commits
        .lines()
        .find_map(|l| l.strip_prefix("peersync_commits_total ").map(|v| v.parse().unwrap()))
        .expect("commit counter exported");
    assert!(commit_count < 800, "16 concurrent writers must share commits, saw {commit_count} commits for 800 writes");

    let node = Node::start(config).await.unwrap();
    let h = node.handle();
    assert_eq!(h.peer_id(), peer, "identity survives a restart");
    assert_eq!(h.store().state_root(), (root, vv.clone()));
    assert_eq!(h.get("r", b"t15-49").await.unwrap().as_deref(), Some(&b"v49"[..]));
    let report = h.store().check_log().unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!(report.ops, 800);
    assert_eq!(h.put("r", "after", "restart").await.unwrap().seq, 801, "seq continues after a restart");
    node.shutdown().await;
}
