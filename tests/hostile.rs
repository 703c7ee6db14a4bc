//! Hostile peers through real swarms: a raw libp2p peer that publishes garbage on the cluster's
//! topic, one that floods the node with requests, one that sends oversize requests and gossip, and a
//! flood of connections. Each is told no (rejected messages, `busy` or `rate_limited` answers, closed
//! streams or connections), and the node keeps working.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::raw::{bare_digest, one_op_gossip, raw_config, rejected_after, RawPeer};
use common::{dial_addr, eventually};
use futures::StreamExt;
use libp2p::gossipsub;
use libp2p::identity::Keypair;
use libp2p::request_response;
use libp2p::swarm::SwarmEvent;
use peersync::ids::{Role, Seq};
use peersync::net::{cluster_topic, BehaviourEvent, GossipMessage, NetConfig, SyncRequest, SyncResponse};
use peersync::op::{ChainHash, OpBody, Signer};
use serde_bytes::ByteBuf;
use tokio::sync::mpsc;

const DEADLINE: Duration = Duration::from_secs(30);

fn hostile_config() -> NetConfig {
    NetConfig {
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
        mdns: false,
        gossip_heartbeat: Duration::from_millis(100),
        ..NetConfig::default()
    }
}

/// What the hostile swarm saw.
#[derive(Debug)]
enum Seen {
    Subscribed,
    Answer(Box<SyncResponse>),
    Failure,
    Closed,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_publishing_garbage_is_rejected_and_disconnected() {
    common::init_tracing();
    let (node, _dir) = common::start_node(|_| {}).await;
    let h = node.handle();
    let addr = dial_addr(&h).await;
    let mut swarm = peersync::net::build_swarm(Keypair::generate_ed25519(), &hostile_config()).unwrap();
    let me = *swarm.local_peer_id();
    let topic = cluster_topic("default");
    swarm.behaviour_mut().gossipsub.subscribe(&topic).unwrap();
    swarm.dial(addr).unwrap();
    let (tx, mut seen) = mpsc::unbounded_channel();
    let (publish_tx, mut publish) = mpsc::unbounded_channel::<Vec<u8>>();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                event = swarm.select_next_some() => match event {
                    SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(gossipsub::Event::Subscribed { .. })) => {
                        let _ = tx.send(Seen::Subscribed);
                    }
                    SwarmEvent::ConnectionClosed { num_established: 0, .. } => {
                        let _ = tx.send(Seen::Closed);
                    }
                    _ => {}
                },
                Some(data) = publish.recv() => {
                    let _ = swarm.behaviour_mut().gossipsub.publish(topic.clone(), data);
                }
            }
        }
    });
    while !matches!(seen.recv().await, Some(Seen::Subscribed)) {}
    for i in 0..40u32 {
        // Garbage: a wrong wire version, then junk bodies of the right one.
        let mut data = vec![if i % 2 == 0 { 9 } else { 1 }];
        data.extend(i.to_le_bytes().repeat(8));
        publish_tx.send(data).unwrap();
    }
    eventually("the garbage to be rejected and its sender disconnected", DEADLINE, || async {
        let rejected = h.metrics().gossip_rejected.get();
        let s = h.net_status().await.map_err(|e| e.to_string())?;
        let connected = s.peers.iter().any(|p| p.peer_id == me.to_string() && p.connected);
        // After a few, gossip scoring stops delivering its messages at all.
        if rejected >= 3 && !connected {
            Ok(())
        } else {
            Err(format!("{rejected} rejected, connected: {connected}"))
        }
    })
    .await;
    // The node still works.
    h.put("r", b"k".to_vec(), b"v".to_vec()).await.unwrap();
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_flood_is_answered_busy_or_rate_limited_then_cut_off() {
    common::init_tracing();
    let (node, _dir) = common::start_node(|_| {}).await;
    let h = node.handle();
    let addr = dial_addr(&h).await;
    let mut swarm = peersync::net::build_swarm(Keypair::generate_ed25519(), &hostile_config()).unwrap();
    let target = h.peer_id();
    swarm.dial(addr).unwrap();
    let (tx, mut seen) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        // Far faster than any node asks (the node allows a burst of 400, then 200 a second), until
        // the node hangs up; bounded all the same.
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        // Outstanding requests stay below what one yamux connection carries at once (the flooder's
        // own multiplexer would close the connection otherwise, and test nothing of the node).
        let (mut connected, mut sent, mut answered) = (false, 0u32, 0u32);
        loop {
            tokio::select! {
                event = swarm.select_next_some() => match event {
                    SwarmEvent::ConnectionEstablished { .. } => connected = true,
                    SwarmEvent::Behaviour(BehaviourEvent::Sync(request_response::Event::Message {
                        message: request_response::Message::Response { response, .. },
                        ..
                    })) => {
                        answered += 1;
                        let _ = tx.send(Seen::Answer(Box::new(response)));
                    }
                    SwarmEvent::Behaviour(BehaviourEvent::Sync(request_response::Event::OutboundFailure { .. })) => {
                        answered += 1;
                        let _ = tx.send(Seen::Failure);
                    }
                    SwarmEvent::ConnectionClosed { num_established: 0, .. } => {
                        let _ = tx.send(Seen::Closed);
                        return;
                    }
                    _ => {}
                },
                _ = tick.tick(), if connected && sent < 50_000 => {
                    while sent - answered < 200 {
                        let request = SyncRequest::GetOps { origin: target, after: Seq(0), max_ops: 10, max_bytes: 100 };
                        swarm.behaviour_mut().sync.send_request(&target, request);
                        sent += 1;
                    }
                }
            }
        }
    });
    let (mut refused, mut served, mut closed) = (0u32, 0u32, false);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !closed {
        match tokio::time::timeout_at(deadline, seen.recv()).await {
            Ok(Some(Seen::Answer(answer)))
                if matches!(&*answer, SyncResponse::Error { code, .. }
                    if ["rate_limited", "busy", "not_in_cluster"].contains(&code.as_str())) =>
            {
                refused += 1
            }
            Ok(Some(Seen::Answer(_))) => served += 1,
            Ok(Some(Seen::Closed)) => closed = true,
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => panic!("no disconnect: {refused} refused, {served} served"),
        }
    }
    assert!(refused > 0, "the flood was never told no: {refused} refused, {served} served");
    assert!(h.metrics().requests_shed.get() >= 10, "{} shed", h.metrics().requests_shed.get());
    h.put("r", b"k".to_vec(), b"v".to_vec()).await.unwrap();
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_requests_and_gossip_are_dropped_and_the_node_keeps_serving() {
    common::init_tracing();
    let (node, _dir) = common::start_node(|_| {}).await;
    let h = node.handle();
    let addr = dial_addr(&h).await;
    // A peer whose own limits let it send far more than the node takes (1 MiB requests, 64 KiB gossip).
    let big = NetConfig { max_request_bytes: 8 << 20, max_gossip_bytes: 1 << 20, ..raw_config() };
    let key = Keypair::generate_ed25519();
    let signer = Signer::new(key.clone());
    let raw = RawPeer::spawn(key, &big, addr.clone());
    raw.wait_subscribed().await;
    let mut digest = bare_digest(Role::Primary);
    digest.members = vec![ByteBuf::from(vec![7u8; 2 << 20])];
    let answer = raw.request(h.peer_id(), SyncRequest::Digest(digest.clone())).await;
    assert!(answer.is_err(), "a 2 MiB request was answered: {answer:?}");
    // A signed batch with a 300 KiB value, well past the gossip limit: never applied.
    let body = OpBody::RegisterPut { register: "r".into(), key: b"huge".to_vec(), value: vec![1; 300 << 10] };
    raw.publish(one_op_gossip(&signer, 1, ChainHash::GENESIS, 1, body).0);

    // The node still serves: a fresh peer's digest is answered, and writes go through.
    let fresh = RawPeer::spawn(Keypair::generate_ed25519(), &raw_config(), addr);
    digest.members.clear();
    let answer = eventually("a fresh peer's digest to be answered", DEADLINE, || async {
        match fresh.request(h.peer_id(), SyncRequest::Digest(digest.clone())).await {
            Ok(a) => Ok(a),
            Err(e) => Err(e),
        }
    })
    .await;
    assert!(matches!(answer, SyncResponse::Digest(_)), "{answer:?}");
    h.put("r", b"k".to_vec(), b"v".to_vec()).await.unwrap();
    assert!(h.get("r", b"huge").await.unwrap().is_none(), "an oversize gossip message was applied");
    assert_eq!(h.store().version_vector().get(&signer.origin()), Seq(0));
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_flood_is_capped_and_members_still_get_in() {
    common::init_tracing();
    let (a, _da) = common::start_node(|c| {
        c.target_peers = 2;
        c.max_peers = 4;
        c.net.max_connections = 6;
    })
    .await;
    let ah = a.handle();
    let addr = dial_addr(&ah).await;
    let flood: Vec<RawPeer> =
        (0..40).map(|_| RawPeer::spawn(Keypair::generate_ed25519(), &raw_config(), addr.clone())).collect();
    // While the flood lands, the node never holds more than its transport allows (the node alone
    // would close connections only beyond 2 x max_peers = 8).
    let most = AtomicUsize::new(0);
    eventually("every dial of the flood to be taken, closed or refused", DEADLINE, || {
        let (flood, ah, most) = (&flood, &ah, &most);
        async move {
            let s = ah.net_status().await.map_err(|e| e.to_string())?;
            most.fetch_max(s.peers.iter().filter(|p| p.connected).count(), Ordering::SeqCst);
            let settled = flood.iter().filter(|r| r.settled()).count();
            if settled == flood.len() {
                Ok(())
            } else {
                Err(format!("{settled} of {} settled", flood.len()))
            }
        }
    })
    .await;
    let most = most.into_inner();
    assert!(most <= 6, "{most} connections at once, above the limit of 6");
    // A real node still joins through it and syncs.
    ah.put("r", b"before-b".to_vec(), b"1".to_vec()).await.unwrap();
    let (b, _db) = common::start_node(|c| c.net.bootstrap = vec![addr.clone()]).await;
    let bh = b.handle();
    eventually("B to sync from A through the flood", DEADLINE, || async {
        match bh.get("r", b"before-b").await {
            Ok(Some(_)) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    drop(flood);
    a.shutdown().await;
    b.shutdown().await;
}

fn from_hex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

/// The two overflows in fuzz/regressions/README.md, sent by a peer to a debug build (overflow
/// checks on): a batch whose signed head is at seq u64::MAX, and `GetOps` after u64::MAX. The first
/// is rejected, the second answered with nothing, and the node goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_at_the_last_seq_and_get_ops_after_it_are_refused_without_overflow() {
    common::init_tracing();
    let (node, _dir) = common::start_node(|_| {}).await;
    let h = node.handle();
    let raw = RawPeer::spawn(Keypair::generate_ed25519(), &raw_config(), dial_addr(&h).await);
    raw.wait_subscribed().await;
    let last_seq = from_hex(concat!(
        "010000feffffffffffffffff010138260024080112208a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf374",
        "8801b40f6f5cffffffffffffffffff010100010172016b260024080112208a88e3dd7409f195fd52db2d3cba5d72ca67",
        "09bf1d94121bf3748801b40f6f5cffffffffffffffffff017d334e1e8ffa46d73a52d713acf889f7d87a28a9a26a4da7",
        "ced4b0de9af3169540153a13d460b171e87403833427711069aeaebd05b0af88541a6bb9ae3bb39b16290126bed19828",
        "879ad763e804f018f581d2dbac2cc6640dce8190aee3d13f09"
    ));
    let GossipMessage::Ops { batch, .. } = peersync::net::decode_gossip(&last_seq, 64 << 10).unwrap() else {
        panic!("the reproducer is an ops message")
    };
    assert_eq!(batch.head.seq, Seq(u64::MAX));
    let origin = batch.head.origin;
    let before = h.metrics().gossip_rejected.get();
    raw.publish(last_seq);
    rejected_after(&h, before, "the batch at the last seq to be rejected").await;
    assert_eq!(h.store().version_vector().get(&origin), Seq(0));

    let request = SyncRequest::GetOps { origin, after: Seq(u64::MAX), max_ops: 1, max_bytes: 1 };
    let answer = eventually("GetOps after u64::MAX to be served", DEADLINE, || async {
        match raw.request(h.peer_id(), request.clone()).await {
            // Until identify has told the node the raw peer's cluster.
            Ok(SyncResponse::Error { code, .. }) if code == "not_in_cluster" => Err(code),
            Ok(a) => Ok(a),
            Err(e) => Err(e),
        }
    })
    .await;
    assert!(matches!(&answer, SyncResponse::Ops(b) if b.is_empty()), "{answer:?}");
    h.put("r", b"k".to_vec(), b"v".to_vec()).await.unwrap();
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_sent_more_than_its_byte_share_is_answered_rate_limited() {
    common::init_tracing();
    // 64 KiB/s with a burst of 256 KiB; the log holds about 800 KiB.
    let (node, _dir) = common::start_node(|c| c.serve_bytes_per_sec = 64 << 10).await;
    let h = node.handle();
    for i in 0..20u32 {
        h.put("r", format!("k{i}").into_bytes(), vec![i as u8; 40 << 10]).await.unwrap();
    }
    let raw = RawPeer::spawn(Keypair::generate_ed25519(), &raw_config(), dial_addr(&h).await);
    let request = SyncRequest::GetOps { origin: h.peer_id(), after: Seq(0), max_ops: 1000, max_bytes: 4 << 20 };
    let first = eventually("the log to be served", DEADLINE, || async {
        match raw.request(h.peer_id(), request.clone()).await {
            Ok(SyncResponse::Ops(b)) if !b.is_empty() => Ok(b),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let served: usize = first.iter().flat_map(|b| &b.ops).map(|o| o.len()).sum();
    assert!(served > 256 << 10, "only {served} bytes served at once");
    // Well past its share now: told so, and not cut off (being sent much is no misbehaviour).
    let answer = raw.request(h.peer_id(), request.clone()).await;
    assert!(
        matches!(&answer, Ok(SyncResponse::Error { code, message }) if code == "rate_limited" && message.contains("bytes")),
        "{answer:?}"
    );
    let digest = SyncRequest::GetBuckets;
    assert!(matches!(raw.request(h.peer_id(), digest).await, Ok(SyncResponse::Error { .. })));
    assert!(raw.connected());
    node.shutdown().await;
}
