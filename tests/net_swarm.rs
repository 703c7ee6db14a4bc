//! Three real swarms in one process over loopback TCP (noise + yamux), driven by one tokio task:
//! multi-hop gossip with validation, provider discovery through Kademlia, and a repair-plane round
//! trip. Every wait polls a condition with a deadline and reports what was seen when it expires.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use futures::StreamExt;
use libp2p::core::transport::ListenerId;
use libp2p::gossipsub::{self, MessageAcceptance};
use libp2p::identity::Keypair;
use libp2p::kad::{self, GetProvidersOk, QueryResult, RecordKey};
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, OutboundRequestId};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, Swarm};
use peersync::crdt::Hlc;
use peersync::ids::{Role, Seq, StateRoot};
use peersync::net::{self, Behaviour, BehaviourEvent, GossipMessage, NetConfig, SyncRequest, SyncResponse};
use peersync::op::{ChainHash, Op, OpBatch, OpBody, Signer};
use peersync::store::VersionVector;
use serde_bytes::ByteBuf;

const DEADLINE: Duration = Duration::from_secs(20);

fn test_config(cluster: &str, listen: bool, bootstrap: Vec<Multiaddr>) -> NetConfig {
    let loopback = Multiaddr::empty().with(Protocol::Ip4([127, 0, 0, 1].into())).with(Protocol::Tcp(0));
    NetConfig {
        listen: if listen { vec![loopback] } else { Vec::new() },
        bootstrap,
        mdns: false,
        cluster: cluster.to_owned(),
        gossip_heartbeat: Duration::from_millis(100),
        ..NetConfig::default()
    }
}

/// Batches `1..=n` of a fresh origin, one op each, each chained onto the previous one.
fn signed_batches(n: u64) -> Vec<OpBatch> {
    let signer = Signer::new(Keypair::generate_ed25519());
    let mut chain = ChainHash::GENESIS;
    (1..=n)
        .map(|seq| {
            let op = Op {
                origin: signer.origin(),
                seq: Seq(seq),
                hlc: Hlc::new(seq, 0),
                body: OpBody::CounterAdd { counter: "c".into(), key: b"k".to_vec(), delta: 1 },
            };
            let bytes = op.encode();
            chain = chain.extend(blake3::hash(&bytes).as_bytes());
            OpBatch { after: Seq(seq - 1), ops: vec![ByteBuf::from(bytes)], head: signer.sign_head(Seq(seq), chain) }
        })
        .collect()
}

/// One swarm and what the test harness saw of it. The harness plays the node's part: it feeds
/// identify into Kademlia, validates gossip and answers repair requests.
struct Node {
    name: &'static str,
    swarm: Swarm<Behaviour>,
    config: NetConfig,
    listeners: Vec<(ListenerId, Multiaddr)>,
    closed_listeners: HashSet<ListenerId>,
    /// Gossip messages this node received, with the peer that forwarded each and whether the
    /// harness accepted it.
    gossip: Vec<(PeerId, GossipMessage, MessageAcceptance)>,
    /// Which gossip messages this node rejects.
    reject: fn(&GossipMessage) -> bool,
    /// A provider lookup to repeat until it finds the given peer.
    lookup: Option<(RecordKey, PeerId)>,
    providers: HashSet<PeerId>,
    /// What this node answers to any repair request.
    serve: Option<SyncResponse>,
    requests: Vec<SyncRequest>,
    responses: HashMap<OutboundRequestId, SyncResponse>,
    failures: Vec<String>,
}

impl Node {
    fn new(name: &'static str, config: NetConfig) -> Node {
        let mut swarm = net::build_swarm(Keypair::generate_ed25519(), &config).unwrap();
        net::start(&mut swarm, &config).unwrap();
        Node {
            name,
            swarm,
            config,
            listeners: Vec::new(),
            closed_listeners: HashSet::new(),
            gossip: Vec::new(),
            reject: |_| false,
            lookup: None,
            providers: HashSet::new(),
            serve: None,
            requests: Vec::new(),
            responses: HashMap::new(),
            failures: Vec::new(),
        }
    }

    fn id(&self) -> PeerId {
        *self.swarm.local_peer_id()
    }

    /// The first listen address, with `/p2p/<id>`.
    fn addr(&self) -> Multiaddr {
        self.listeners[0].1.clone().with(Protocol::P2p(self.id()))
    }

    fn received(&self, message: &GossipMessage) -> bool {
        self.gossip.iter().any(|(_, m, _)| m == message)
    }

    fn in_mesh(&self, peer: &PeerId) -> bool {
        self.swarm.behaviour().gossipsub.mesh_peers(&net::cluster_topic(&self.config.cluster).hash()).any(|p| p == peer)
    }

    fn handle(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { listener_id, address } => self.listeners.push((listener_id, address)),
            SwarmEvent::ListenerClosed { listener_id, .. } => {
                self.closed_listeners.insert(listener_id);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Identify(libp2p::identify::Event::Received {
                peer_id,
                info,
                ..
            })) => {
                net::on_identify(&mut self.swarm, &peer_id, &info);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            })) => {
                let decoded = net::decode_gossip(&message.data, self.config.max_gossip_bytes)
                    .expect("peers only publish well-formed gossip");
                let acceptance =
                    if (self.reject)(&decoded) { MessageAcceptance::Reject } else { MessageAcceptance::Accept };
                self.swarm.behaviour_mut().gossipsub.report_message_validation_result(
                    &message_id,
                    &propagation_source,
                    acceptance,
                );
                self.gossip.push((propagation_source, decoded, acceptance));
            }
            SwarmEvent::Behaviour(BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
                result: QueryResult::GetProviders(result),
                step,
                ..
            })) => self.on_providers(result, step.last),
            SwarmEvent::Behaviour(BehaviourEvent::Sync(event)) => self.on_sync(event),
            _ => {}
        }
    }

    fn on_providers(&mut self, result: Result<GetProvidersOk, kad::GetProvidersError>, last: bool) {
        match result {
            // A remote with no provider yields an empty set: keep going, it is not the answer.
            Ok(GetProvidersOk::FoundProviders { providers, .. }) => self.providers.extend(providers),
            Ok(GetProvidersOk::FinishedWithNoAdditionalRecord { .. }) => {}
            Err(e) => self.failures.push(format!("get_providers: {e}")),
        }
        if let Some((key, target)) = self.lookup.clone() {
            if self.providers.contains(&target) {
                self.lookup = None;
            } else if last {
                // The lookup ended before the routing table reached the provider: ask again.
                self.swarm.behaviour_mut().kad.get_providers(key);
            }
        }
    }

    fn on_sync(&mut self, event: request_response::Event<SyncRequest, SyncResponse>) {
        match event {
            request_response::Event::Message { message, .. } => match message {
                request_response::Message::Request { request, channel, .. } => {
                    self.requests.push(request);
                    let response = self.serve.clone().expect("this node serves no requests");
                    if self.swarm.behaviour_mut().sync.send_response(channel, response).is_err() {
                        self.failures.push("response channel closed".into());
                    }
                }
                request_response::Message::Response { request_id, response } => {
                    self.responses.insert(request_id, response);
                }
            },
            request_response::Event::OutboundFailure { error, .. } => self.failures.push(format!("outbound: {error}")),
            request_response::Event::InboundFailure { error, .. } => self.failures.push(format!("inbound: {error}")),
            request_response::Event::ResponseSent { .. } => {}
        }
    }

    fn summary(&self) -> String {
        let connected: Vec<PeerId> = self.swarm.connected_peers().copied().collect();
        format!(
            "{} ({}): connected {:?}, {} gossip messages, providers {:?}, {} requests, {} responses, failures {:?}",
            self.name,
            self.id(),
            connected,
            self.gossip.len(),
            self.providers,
            self.requests.len(),
            self.responses.len(),
            self.failures
        )
    }
}

/// Drives every swarm from one task until `done` holds, or panics at the deadline with what each
/// node saw.
async fn run_until(nodes: &mut [Node], what: &str, done: impl Fn(&[Node]) -> bool) {
    let run = async {
        // Gossipsub changes its mesh on heartbeats without emitting events: re-check on a tick too.
        let mut tick = tokio::time::interval(Duration::from_millis(25));
        while !done(nodes) {
            let event = {
                let next = futures::future::select_all(nodes.iter_mut().map(|n| n.swarm.select_next_some()));
                tokio::select! {
                    (event, index, _) = next => Some((index, event)),
                    _ = tick.tick() => None,
                }
            };
            if let Some((index, event)) = event {
                nodes[index].handle(event);
            }
        }
    };
    if tokio::time::timeout(DEADLINE, run).await.is_err() {
        let seen: Vec<String> = nodes.iter().map(Node::summary).collect();
        panic!("timed out after {DEADLINE:?} waiting for {what}; seen:\n{}", seen.join("\n"));
    }
}

const A: usize = 0;
const B: usize = 1;
const C: usize = 2;

/// Gossip from A reaches C only through B, and only when B accepts it.
///
/// Kademlia would otherwise connect C to A directly (C's bootstrap query asks B, which knows A),
/// and A would then publish straight to C. To keep the chain strict, A stops listening once B is
/// connected and C never listens: nobody can reach A again, and nobody can reach C.
#[tokio::test]
async fn gossip_crosses_two_hops_and_stops_where_rejected() {
    let cluster = "gossip-chain";
    let mut nodes = vec![Node::new("A", test_config(cluster, true, vec![]))];
    run_until(&mut nodes, "A to listen", |n| !n[A].listeners.is_empty()).await;

    nodes.push(Node::new("B", test_config(cluster, true, vec![nodes[A].addr()])));
    let (a, b) = (nodes[A].id(), nodes[B].id());
    run_until(&mut nodes, "B to connect to A and listen", |n| {
        n[B].swarm.is_connected(&a) && !n[B].listeners.is_empty()
    })
    .await;

    let a_listener = nodes[A].listeners[0].0;
    assert!(nodes[A].swarm.remove_listener(a_listener));
    run_until(&mut nodes, "A's listener to close", |n| n[A].closed_listeners.contains(&a_listener)).await;

    nodes.push(Node::new("C", test_config(cluster, false, vec![nodes[B].addr()])));
    let c = nodes[C].id();
    // B forwards only to its mesh peers; A publishes to every subscribed peer it knows.
    run_until(&mut nodes, "the A-B-C gossip mesh", |n| {
        n[A].in_mesh(&b) && n[B].in_mesh(&a) && n[B].in_mesh(&c) && n[C].in_mesh(&b)
    })
    .await;

    let batches = signed_batches(3);
    let [first, rejected, barrier] =
        [0, 1, 2].map(|i| GossipMessage::Ops { role: Role::Primary, batch: batches[i].clone() });
    nodes[B].reject = |m| matches!(m, GossipMessage::Ops { batch, .. } if batch.after == Seq(1));
    let topic = net::cluster_topic(cluster);

    nodes[A].swarm.behaviour_mut().gossipsub.publish(topic.clone(), net::encode_gossip(&first)).unwrap();
    run_until(&mut nodes, "the first message at C", |n| n[C].received(&first)).await;
    let (via, _, _) = nodes[C].gossip.iter().find(|(_, m, _)| *m == first).unwrap();
    assert_eq!(*via, b, "C got the message from B");
    assert!(!nodes[C].swarm.is_connected(&a), "C and A stayed apart");

    // B sees `rejected` before `barrier` on the same stream from A, so had B forwarded it, C would
    // have received it before `barrier`.
    for message in [&rejected, &barrier] {
        let data = net::encode_gossip(message);
        nodes[A].swarm.behaviour_mut().gossipsub.publish(topic.clone(), data).unwrap();
    }
    run_until(&mut nodes, "the barrier message at C", |n| n[C].received(&barrier)).await;
    assert!(nodes[B].gossip.iter().any(|(_, m, v)| *m == rejected && *v == MessageAcceptance::Reject));
    assert!(!nodes[C].received(&rejected), "B forwarded a message it rejected");
}

/// C finds A through Kademlia as a provider of the cluster key, then fetches ops from A over the
/// repair protocol, including a response above the codec's default 10 MiB cap.
#[tokio::test]
async fn provider_lookup_and_repair_round_trip() {
    let cluster = "kad-repair";
    let mut nodes = vec![Node::new("A", test_config(cluster, true, vec![]))];
    run_until(&mut nodes, "A to listen", |n| !n[A].listeners.is_empty()).await;
    nodes.push(Node::new("B", test_config(cluster, true, vec![nodes[A].addr()])));
    run_until(&mut nodes, "B to listen", |n| !n[B].listeners.is_empty()).await;
    nodes.push(Node::new("C", test_config(cluster, true, vec![nodes[B].addr()])));
    let a = nodes[A].id();

    let key = net::cluster_provider_key(cluster);
    nodes[C].lookup = Some((key.clone(), a));
    nodes[C].swarm.behaviour_mut().kad.get_providers(key);
    run_until(&mut nodes, "C to find A as a provider", |n| n[C].providers.contains(&a)).await;

    let mut batches = signed_batches(2);
    nodes[A].serve = Some(SyncResponse::Ops(batches.clone()));
    let a_addr = nodes[A].addr();
    nodes[C].swarm.add_peer_address(a, a_addr);
    let request =
        SyncRequest::GetOps { origin: batches[0].head.origin, after: Seq(0), max_ops: 100, max_bytes: 1 << 20 };
    let id = nodes[C].swarm.behaviour_mut().sync.send_request(&a, request.clone());
    run_until(&mut nodes, "the GetOps response at C", |n| n[C].responses.contains_key(&id)).await;
    assert_eq!(nodes[A].requests, vec![request.clone()]);
    assert_eq!(nodes[C].responses[&id], SyncResponse::Ops(batches.clone()));

    // 11 MiB of op bytes: over request-response's default response cap, under ours (16 MiB). It
    // also fails if op bytes were encoded as CBOR integer arrays (about twice the size).
    batches[1].ops = vec![ByteBuf::from(vec![0xa5; 11 << 20])];
    nodes[A].serve = Some(SyncResponse::Ops(batches.clone()));
    let id = nodes[C].swarm.behaviour_mut().sync.send_request(&a, request);
    run_until(&mut nodes, "the 11 MiB response at C", |n| {
        n[C].responses.contains_key(&id) || !n[C].failures.is_empty()
    })
    .await;
    assert!(nodes[C].failures.is_empty(), "{}", nodes[C].summary());
    assert_eq!(nodes[C].responses[&id], SyncResponse::Ops(batches));
}

/// The QUIC transport works too, and digests cross the repair protocol intact.
#[tokio::test]
async fn digest_exchange_over_quic() {
    let cluster = "quic";
    let quic: Multiaddr = "/ip4/127.0.0.1/udp/0/quic-v1".parse().unwrap();
    let mut config = test_config(cluster, false, vec![]);
    config.listen = vec![quic];
    let mut nodes = vec![Node::new("A", config)];
    run_until(&mut nodes, "A to listen on QUIC", |n| !n[A].listeners.is_empty()).await;
    let a_addr = nodes[A].addr();
    assert!(a_addr.iter().any(|p| p == Protocol::QuicV1), "{a_addr}");
    nodes.push(Node::new("B", test_config(cluster, false, vec![a_addr])));
    let a = nodes[A].id();

    let digest = |role, origin, seq, root| net::Digest {
        log_floors: Default::default(),
        snapshots: vec![],
        snapshot_brief: None,
        cluster: cluster.to_owned(),
        role,
        version_vector: VersionVector([(origin, Seq(seq))].into_iter().collect()),
        state_root: StateRoot([root; 32]),
        cert: None,
        members: vec![],
        revocations: vec![],
        hold_until: None,
        lease_group: None,
    };
    let mine = digest(net::Role::Replica, nodes[B].id(), 3, 1);
    let theirs = digest(net::Role::Primary, a, 9, 2);
    nodes[A].serve = Some(SyncResponse::Digest(theirs.clone()));
    let request = SyncRequest::Digest(mine);
    let id = nodes[B].swarm.behaviour_mut().sync.send_request(&a, request.clone());
    run_until(&mut nodes, "the digest at B", |n| n[B].responses.contains_key(&id) || !n[B].failures.is_empty()).await;
    assert_eq!(nodes[A].requests, vec![request]);
    assert_eq!(nodes[B].responses.get(&id), Some(&SyncResponse::Digest(theirs)));
}
