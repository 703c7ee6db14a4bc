//! Several nodes in one process over loopback TCP: gossip, convergence, leases, multi-hop, roles.

mod common;

use std::time::Duration;

use common::{dial_addr, eventually};
use peersync::crdt::LeaseRequest;
use peersync::node::{Node, NodeConfig, NodeHandle, Role};

const DEADLINE: Duration = Duration::from_secs(30);

struct Cluster {
    nodes: Vec<Node>,
    _dirs: Vec<tempfile::TempDir>,
}

impl Cluster {
    fn handles(&self) -> Vec<NodeHandle> {
        self.nodes.iter().map(Node::handle).collect()
    }

    async fn shutdown(self) {
        for n in self.nodes {
            n.shutdown().await;
        }
    }
}

/// Starts nodes with the given roles, each bootstrapped to the one before it (a chain).
async fn chain(roles: &[Role], configure: impl Fn(&mut NodeConfig)) -> Cluster {
    common::init_tracing();
    let mut nodes: Vec<Node> = Vec::new();
    let mut dirs = Vec::new();
    for role in roles {
        let dir = tempfile::tempdir().unwrap();
        let mut config = NodeConfig::local(dir.path());
        config.net.role = *role;
        if let Some(prev) = nodes.last() {
            config.net.bootstrap = vec![dial_addr(&prev.handle()).await];
        }
        configure(&mut config);
        nodes.push(Node::start(config).await.unwrap());
        dirs.push(dir);
    }
    Cluster { nodes, _dirs: dirs }
}

/// Waits until every node has applied everything every other node has, and all roots agree.
async fn converged(nodes: &[NodeHandle]) {
    eventually("all nodes to converge", DEADLINE, || async {
        let mut seen = Vec::new();
        for n in nodes {
            let (root, vv) = n.store().state_root();
            seen.push((root, vv));
        }
        if seen.windows(2).all(|w| w[0] == w[1]) {
            Ok(())
        } else {
            Err(format!("{seen:?}"))
        }
    })
    .await;
}

/// Waits until each node sees `n` peers of its cluster connected (so gossip has a mesh to use).
async fn connected(nodes: &[NodeHandle], n: usize) {
    for node in nodes {
        eventually("peers to connect", DEADLINE, || async {
            let s = node.net_status().await.map_err(|e| e.to_string())?;
            let ok = s.peers.iter().filter(|p| p.connected && p.role.is_some()).count();
            if ok >= n {
                Ok(())
            } else {
                Err(format!("{ok} identified peers: {:?}", s.peers))
            }
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_on_every_primary_converge_everywhere() {
    let cluster = chain(&[Role::Primary; 3], |_| {}).await;
    let nodes = cluster.handles();
    connected(&nodes, 1).await;
    let mut tasks = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let node = node.clone();
        tasks.push(tokio::spawn(async move {
            for round in 0..30 {
                // Every node writes the same keys: last writer (by HLC, then origin) wins everywhere.
                node.put("shared", format!("k{}", round % 5), format!("n{i}-r{round}")).await.unwrap();
                node.counter_add("hits", "total", (i as i64) + 1).await.unwrap();
                if round % 7 == 0 {
                    node.delete("shared", format!("k{}", (round + 1) % 5)).await.unwrap();
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    converged(&nodes).await;
    // Counters sum every increment exactly: 30 rounds × (1 + 2 + 3).
    for n in &nodes {
        assert_eq!(n.counter_get("hits", b"total").await.unwrap(), 30 * 6);
    }
    for k in 0..5 {
        let key = format!("k{k}");
        let first = nodes[0].get("shared", key.as_bytes()).await.unwrap();
        for n in &nodes[1..] {
            assert_eq!(n.get("shared", key.as_bytes()).await.unwrap(), first, "{key} differs");
        }
    }
    for n in &nodes {
        let report = n.store().check_log().unwrap();
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        assert_eq!(report.ops, 3 * (30 + 30 + 5));
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_lease_acquires_on_three_primaries_grant_one_holder_and_a_minority_refuses() {
    let cluster = chain(&[Role::Primary; 3], |c| c.lease_timeout = Duration::from_secs(2)).await;
    let nodes = cluster.handles();
    connected(&nodes, 2).await;
    let acquire = |h: &str| LeaseRequest::Acquire { holder: h.into(), ttl_ms: 60_000 };
    // The lease group forms (one primary founds it, the others join): then a grant is possible.
    eventually("a first grant through the lease group", DEADLINE, || async {
        nodes[2].lease("warmup", "k", acquire("w")).await.map(|_| ()).map_err(|e| e.to_string())
    })
    .await;
    // Three primaries asked at once for the same free lease, by three holders.
    let (a, b, c) = tokio::join!(
        nodes[0].lease("locks", "db", acquire("alice")),
        nodes[1].lease("locks", "db", acquire("bob")),
        nodes[2].lease("locks", "db", acquire("cy"))
    );
    let results = [a, b, c];
    let granted: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(granted.len(), 1, "exactly one holder is granted the lease: {results:?}");
    let winner = granted[0];
    for r in &results {
        match r {
            Ok(_) => {}
            Err(peersync::node::NodeError::LeaseHeld { holder, token, .. }) => {
                assert_eq!((Some(holder.as_str()), *token), (winner.holder.as_deref(), winner.token));
            }
            Err(e) => panic!("a losing acquire should name the holder, got {e}"),
        }
    }
    // Released, it goes to the next holder with a larger fencing token.
    let holder = winner.holder.clone().unwrap();
    let i = ["alice", "bob", "cy"].iter().position(|h| *h == holder).unwrap();
    nodes[i].lease("locks", "db", LeaseRequest::Release { holder: holder.clone() }).await.unwrap();
    let next = nodes[(i + 1) % 3].lease("locks", "db", acquire("dan")).await.unwrap();
    assert!(next.token > winner.token, "tokens grow: {} then {}", winner.token, next.token);

    // Two of the three primaries stop: the one left is a minority and refuses rather than grant.
    let mut rest = cluster.nodes.into_iter();
    let first = rest.next().unwrap();
    for n in rest {
        n.shutdown().await;
    }
    match first.handle().lease("locks", "other", acquire("eve")).await {
        Err(e @ peersync::node::NodeError::NoQuorum(_)) => assert!(e.to_string().contains("no quorum"), "{e}"),
        other => panic!("a primary without a quorum must answer NoQuorum, got {other:?}"),
    }
    first.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_bootstrapped_to_a_neighbour_receives_everything() {
    // A <- B <- C <- D: D only knows C, yet gets A's writes (through gossip relays or discovery).
    let cluster = chain(&[Role::Primary, Role::Replica, Role::Replica, Role::Replica], |_| {}).await;
    let nodes = cluster.handles();
    let mut last = None;
    for i in 0..200 {
        last = Some(nodes[0].put("docs", format!("d{i}"), format!("v{i}")).await.unwrap());
    }
    let token = last.unwrap().token.parse().unwrap();
    for n in &nodes[1..] {
        n.wait_applied(&[token], DEADLINE).await.unwrap();
        assert_eq!(n.get("docs", b"d199").await.unwrap().as_deref(), Some(&b"v199"[..]));
    }
    converged(&nodes).await;
    // The replicas refuse writes and name the primary they know.
    match nodes[3].put("docs", "x", "y").await {
        Err(peersync::node::NodeError::ReadOnlyReplica { .. }) => {}
        other => panic!("a replica must refuse writes, got {other:?}"),
    }
    match nodes[1].put("docs", "x", "y").await {
        Err(peersync::node::NodeError::ReadOnlyReplica { primaries }) => {
            assert!(primaries.iter().any(|p| p.ends_with(&nodes[0].peer_id().to_string())), "{primaries:?}");
        }
        other => panic!("a replica must refuse writes, got {other:?}"),
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_joins_late_catches_up_by_replay() {
    let cluster = chain(&[Role::Primary], |_| {}).await;
    let a = cluster.nodes[0].handle();
    for i in 0..500 {
        a.put("early", format!("k{i}"), vec![i as u8; 100]).await.unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let mut config = NodeConfig::local(dir.path());
    config.net.bootstrap = vec![dial_addr(&a).await];
    config.net.role = Role::Replica;
    let late = Node::start(config).await.unwrap();
    converged(&[a.clone(), late.handle()]).await;
    assert_eq!(late.handle().get("early", b"k499").await.unwrap(), Some(vec![243u8; 100]));
    // The counter moves just after the commit it counts.
    eventually("the late node to count the ops it pulled by replay", DEADLINE, || async {
        let metrics = late.handle().metrics().render();
        match metrics.contains("peersync_ops_replayed_total 500\n") {
            true => Ok(()),
            false => Err(metrics),
        }
    })
    .await;
    late.shutdown().await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_of_another_cluster_are_not_synced_with() {
    let cluster = chain(&[Role::Primary], |_| {}).await;
    let a = cluster.nodes[0].handle();
    a.put("r", "k", "v").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = NodeConfig::local(dir.path());
    config.net.bootstrap = vec![dial_addr(&a).await];
    config.net.cluster = "other".into();
    let other = Node::start(config).await.unwrap();
    let o = other.handle();
    // It connects and identifies A as a node of cluster "default", but never syncs.
    eventually("identify", DEADLINE, || async {
        let s = o.net_status().await.map_err(|e| e.to_string())?;
        if s.peers.iter().any(|p| p.cluster.as_deref() == Some("default")) {
            Ok(())
        } else {
            Err(format!("{:?}", s.peers))
        }
    })
    .await;
    o.put("r", "mine", "x").await.unwrap();
    a.put("r", "k2", "v2").await.unwrap();
    // Let several sync rounds pass (in which a digest could wrongly have triggered a pull) before
    // checking that nothing moved.
    let rounds = |h: &NodeHandle| -> u64 {
        let text = h.metrics().render();
        text.lines()
            .find_map(|l| l.strip_prefix("peersync_sync_rounds_total "))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let (start_o, start_a) = (rounds(&o), rounds(&a));
    eventually("three sync rounds on both nodes", DEADLINE, || async {
        let (now_o, now_a) = (rounds(&o), rounds(&a));
        if now_o >= start_o + 3 && now_a >= start_a + 3 {
            Ok(())
        } else {
            Err(format!("rounds: other {now_o}, default {now_a}"))
        }
    })
    .await;
    assert_eq!(o.get("r", b"k").await.unwrap(), None);
    assert_eq!(a.get("r", b"mine").await.unwrap(), None);
    assert_eq!(o.store().version_vector().0.len(), 1);
    other.shutdown().await;
    cluster.shutdown().await;
}

/// A rogue publisher: a bare swarm of the cluster that publishes hand-made op batches.
struct Rogue {
    swarm: libp2p::Swarm<peersync::net::Behaviour>,
    signer: peersync::op::Signer,
}

impl Rogue {
    async fn join(role: Role, target: &NodeHandle) -> Rogue {
        let keypair = libp2p::identity::Keypair::generate_ed25519();
        let mut config = peersync::net::NetConfig {
            listen: vec![],
            bootstrap: vec![dial_addr(target).await],
            mdns: false,
            role,
            gossip_heartbeat: Duration::from_millis(100),
            ..Default::default()
        };
        config.cluster = target.status().await.unwrap().cluster;
        let mut swarm = peersync::net::build_swarm(keypair.clone(), &config).unwrap();
        peersync::net::start(&mut swarm, &config).unwrap();
        Rogue { swarm, signer: peersync::op::Signer::new(keypair) }
    }

    /// Drives the swarm until `target` is in its gossip mesh.
    async fn wait_mesh(&mut self, target: &NodeHandle, cluster: &str) {
        use futures::StreamExt;
        let topic = peersync::net::cluster_topic(cluster).hash();
        let peer = target.peer_id();
        tokio::time::timeout(DEADLINE, async {
            while !self.swarm.behaviour().gossipsub.mesh_peers(&topic).any(|p| *p == peer) {
                tokio::select! {
                    _ = self.swarm.select_next_some() => {}
                    _ = tokio::time::sleep(Duration::from_millis(25)) => {}
                }
            }
        })
        .await
        .expect("the rogue joins the target's mesh");
    }

    /// Publishes one signed put as `claimed` and drives the swarm a little so it goes out.
    fn publish(&mut self, claimed: Role, seq: u64, prev: peersync::op::ChainHash) -> peersync::op::ChainHash {
        use peersync::op::{Op, OpBatch, OpBody};
        let op = Op {
            origin: self.signer.origin(),
            seq: peersync::ids::Seq(seq),
            hlc: peersync::crdt::Hlc::new(1, 0),
            body: OpBody::RegisterPut {
                register: "r".into(),
                key: format!("rogue{seq}").into_bytes(),
                value: b"x".to_vec(),
            },
        };
        let bytes = op.encode();
        let chain = prev.extend(blake3::hash(&bytes).as_bytes());
        let batch = OpBatch {
            after: peersync::ids::Seq(seq - 1),
            ops: vec![serde_bytes::ByteBuf::from(bytes)],
            head: self.signer.sign_head(peersync::ids::Seq(seq), chain),
        };
        let data = peersync::net::encode_gossip(&peersync::net::GossipMessage::Ops { role: claimed, batch });
        let topic = peersync::net::cluster_topic("default");
        self.swarm.behaviour_mut().gossipsub.publish(topic, data).unwrap();
        chain
    }

    async fn drive_until(&mut self, what: &str, mut done: impl FnMut() -> bool) {
        use futures::StreamExt;
        tokio::time::timeout(DEADLINE, async {
            while !done() {
                tokio::select! {
                    _ = self.swarm.select_next_some() => {}
                    _ = tokio::time::sleep(Duration::from_millis(25)) => {}
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
    }
}

fn rejected(node: &NodeHandle) -> u64 {
    let text = node.metrics().render();
    text.lines()
        .find_map(|l| l.strip_prefix("peersync_gossip_rejected_total "))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_from_a_non_primary_origin_are_rejected() {
    let cluster = chain(&[Role::Primary], |_| {}).await;
    let a = cluster.nodes[0].handle();

    // A replica that says so on the message.
    let mut honest = Rogue::join(Role::Replica, &a).await;
    honest.wait_mesh(&a, "default").await;
    honest.publish(Role::Replica, 1, peersync::op::ChainHash::GENESIS);
    honest.drive_until("the claimed-replica message to be rejected", || rejected(&a) >= 1).await;

    // A replica (per identify) that claims to be a primary on the message.
    let mut liar = Rogue::join(Role::Replica, &a).await;
    liar.wait_mesh(&a, "default").await;
    eventually("A identifies the liar as a replica", DEADLINE, || async {
        let s = a.net_status().await.map_err(|e| e.to_string())?;
        let id = liar.signer.origin().to_string();
        if s.peers.iter().any(|p| p.peer_id == id && p.role == Some(Role::Replica)) {
            Ok(())
        } else {
            Err(format!("{:?}", s.peers))
        }
    })
    .await;
    liar.publish(Role::Primary, 1, peersync::op::ChainHash::GENESIS);
    liar.drive_until("the lying message to be rejected", || rejected(&a) >= 2).await;

    // A well-formed message from a primary-claiming peer is applied, so the test can tell apart.
    let mut primary = Rogue::join(Role::Primary, &a).await;
    primary.wait_mesh(&a, "default").await;
    primary.publish(Role::Primary, 1, peersync::op::ChainHash::GENESIS);
    let origin = primary.signer.origin();
    primary.drive_until("the primary's op to apply", || a.store().version_vector().get(&origin).0 == 1).await;

    assert_eq!(a.store().version_vector().get(&honest.signer.origin()).0, 0);
    assert_eq!(a.store().version_vector().get(&liar.signer.origin()).0, 0);
    assert_eq!(a.status().await.unwrap().sync["rejected_messages"], 2);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_joining_under_sustained_writes_becomes_active() {
    let cluster = chain(&[Role::Primary], |_| {}).await;
    let a = cluster.nodes[0].handle();
    for i in 0..2_000 {
        a.put("before", format!("k{i}"), vec![1; 64]).await.unwrap();
    }
    // Writes keep landing on the primary from 8 writers until the newcomer is active.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (0..8u64)
        .map(|w| {
            let (a, stop) = (a.clone(), stop.clone());
            tokio::spawn(async move {
                let mut i = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    a.put("during", format!("k{w}-{}", i % 1_000), i.to_be_bytes().to_vec()).await.unwrap();
                    i += 1;
                }
                i
            })
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let mut config = NodeConfig::local(dir.path());
    config.net.bootstrap = vec![dial_addr(&a).await];
    config.net.role = Role::Replica;
    let late = Node::start(config).await.unwrap();
    let h = late.handle();
    h.wait_active(DEADLINE).await.unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        assert!(w.await.unwrap() > 0);
    }
    converged(&[a, h]).await;
    late.shutdown().await;
    cluster.shutdown().await;
}

/// Starts a primary on `dir`, listening on `listen` (port 0 picks one).
async fn primary_at(dir: &std::path::Path, listen: libp2p::Multiaddr) -> Node {
    let mut config = NodeConfig::local(dir);
    config.net.listen = vec![listen];
    Node::start(config).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bootstrap_peer_that_is_down_at_start_or_restarts_later_is_dialed_again() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = primary_at(da.path(), "/ip4/127.0.0.1/tcp/0".parse().unwrap()).await;
    let addr = dial_addr(&a.handle()).await;
    let listen: libp2p::Multiaddr = addr.iter().filter(|p| !matches!(p, libp2p::multiaddr::Protocol::P2p(_))).collect();
    a.handle().put("r", "first", "1").await.unwrap();
    a.shutdown().await;

    // B starts while its only bootstrap peer is down; A comes back on the same address later.
    let mut config = NodeConfig::local(db.path());
    config.net.role = Role::Replica;
    config.net.bootstrap = vec![addr];
    let b = Node::start(config).await.unwrap();
    let bh = b.handle();
    let a = primary_at(da.path(), listen.clone()).await;
    converged(&[a.handle(), bh.clone()]).await;
    assert_eq!(bh.get("r", b"first").await.unwrap().as_deref(), Some(&b"1"[..]));

    // A restarts while B runs: B finds it again and receives what was written since.
    a.shutdown().await;
    let a = primary_at(da.path(), listen).await;
    a.handle().put("r", "second", "2").await.unwrap();
    converged(&[a.handle(), bh.clone()]).await;
    assert_eq!(bh.get("r", b"second").await.unwrap().as_deref(), Some(&b"2"[..]));
    b.shutdown().await;
    a.shutdown().await;
}

/// The head of a chain (no bootstrap address, no mDNS) that restarts after its peers wrote must not
/// call itself active before it caught up: its store shows it was part of a cluster, so it redials
/// the peers it remembers and stays syncing until then. Every read it would serve as active has the
/// key written while it was down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_chain_head_is_never_active_without_what_it_missed() {
    let cluster = chain(&[Role::Primary, Role::Primary], |_| {}).await;
    let hs = cluster.handles();
    connected(&hs, 1).await;
    hs[0].put("r", b"from-head".to_vec(), b"1".to_vec()).await.unwrap();
    hs[1].put("r", b"from-tail".to_vec(), b"1".to_vec()).await.unwrap();
    converged(&hs).await;
    let head_dir = hs[0].config().data_dir.clone();
    let known = head_dir.join(peersync::node::KNOWN_PEERS_FILE);
    eventually("the head to remember the tail", DEADLINE, || async {
        let text = std::fs::read_to_string(&known).unwrap_or_default();
        if text.contains(&hs[1].peer_id().to_string()) {
            Ok(())
        } else {
            Err(text)
        }
    })
    .await;
    let t = hs[1].clone();
    drop(hs); // The head's handles keep its database open.
    let mut nodes = cluster.nodes;
    let tail = nodes.pop().unwrap();
    nodes.pop().unwrap().shutdown().await;
    let missed = t.put("r", b"missed".to_vec(), b"written while the head was down".to_vec()).await.unwrap();
    // A new port: the tail cannot redial the head; the head must find the tail by itself.
    let head = Node::start(NodeConfig::local(head_dir)).await.unwrap();
    let h = head.handle();
    let syncing_seen = std::sync::atomic::AtomicUsize::new(0);
    eventually("the restarted head to be active with the missed key", DEADLINE, || async {
        let active = h.sync_state() == peersync::node::SyncState::Active;
        let value = h.get("r", b"missed").await.map_err(|e| e.to_string())?;
        if active {
            assert!(value.is_some(), "active without the key written while it was down (token {})", missed.token);
            Ok(())
        } else {
            syncing_seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Err(format!("syncing ({:?})", h.phase()))
        }
    })
    .await;
    assert!(syncing_seen.into_inner() > 0, "the head was active at once after its restart");
    head.shutdown().await;
    tail.shutdown().await;
}

/// A node that was part of a cluster and whose peers are gone for good becomes active when the
/// operator says it may serve alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_alone_makes_a_lone_former_member_active() {
    common::init_tracing();
    let cluster = chain(&[Role::Primary, Role::Primary], |_| {}).await;
    let hs = cluster.handles();
    connected(&hs, 1).await;
    hs[1].put("r", b"k".to_vec(), b"v".to_vec()).await.unwrap();
    converged(&hs).await;
    let dir = hs[0].config().data_dir.clone();
    let mut nodes = cluster.nodes;
    let tail = nodes.pop().unwrap();
    let head = nodes.pop().unwrap();
    head.shutdown().await;
    tail.shutdown().await;
    drop(hs);
    let mut config = NodeConfig::local(dir);
    config.join_grace = Duration::from_millis(100);
    let head = Node::start(config).await.unwrap();
    let h = head.handle();
    // Well past the grace a node that never had peers would wait, and several engine rounds later,
    // it is still syncing: its data shows it was part of a cluster.
    let started = std::time::Instant::now();
    eventually("time past the join grace", DEADLINE, || async {
        let rounds = h.metrics().sync_rounds.get();
        if started.elapsed() > Duration::from_millis(600) && rounds >= 5 {
            Ok(())
        } else {
            Err(format!("{rounds} rounds"))
        }
    })
    .await;
    assert_eq!(h.sync_state(), peersync::node::SyncState::Syncing, "its peer is gone; it must not vouch for itself");
    h.serve_alone().await.unwrap();
    h.wait_active(DEADLINE).await.unwrap();
    assert_eq!(h.get("r", b"k").await.unwrap(), Some(b"v".to_vec()));
    head.shutdown().await;
}
