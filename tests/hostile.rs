//! Hostile peers through real swarms: a raw libp2p peer that publishes garbage on the cluster's
//! topic, and one that floods the node with requests. Both are told no (rejected messages, `busy`
//! or `rate_limited` answers, never silence), lose their connection, and the node keeps working.

mod common;

use std::time::Duration;

use common::{dial_addr, eventually};
use futures::StreamExt;
use libp2p::gossipsub;
use libp2p::identity::Keypair;
use libp2p::request_response;
use libp2p::swarm::SwarmEvent;
use peersync::ids::Seq;
use peersync::net::{cluster_topic, BehaviourEvent, NetConfig, SyncRequest, SyncResponse};
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
