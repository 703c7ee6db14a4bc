//! A raw libp2p peer for hostile tests: peersync's own behaviour (so it speaks the protocols), driven
//! by the test instead of a node. It publishes what it is told to, sends the requests it is told to,
//! and records what reached it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use libp2p::identity::Keypair;
use libp2p::swarm::SwarmEvent;
use libp2p::{gossipsub, request_response, Multiaddr, PeerId};
use peersync::crdt::Hlc;
use peersync::ids::{Role, Seq, StateRoot};
use peersync::net::{
    cluster_topic, encode_gossip, BehaviourEvent, Digest, GossipMessage, NetConfig, SyncRequest, SyncResponse,
};
use peersync::node::NodeHandle;
use peersync::op::{ChainHash, Op, OpBatch, OpBody, Signer};
use serde_bytes::ByteBuf;
use tokio::sync::{mpsc, oneshot};

const DEADLINE: Duration = Duration::from_secs(30);

enum Cmd {
    Publish(Vec<u8>),
    Request(PeerId, Box<SyncRequest>, oneshot::Sender<Result<SyncResponse, String>>),
}

/// What the raw peer has seen so far.
#[derive(Default)]
pub struct Seen {
    /// Gossip messages of the cluster's topic that reached it.
    pub gossip: AtomicUsize,
    /// Whether a peer subscribed to the cluster's topic towards it.
    pub subscribed: AtomicBool,
    /// Whether it has a connection now.
    pub connected: AtomicBool,
    /// Connections it lost.
    pub closed: AtomicUsize,
    /// Dials that failed (refused, or closed before the connection was established).
    pub failed: AtomicUsize,
}

pub struct RawPeer {
    pub id: PeerId,
    pub seen: Arc<Seen>,
    cmds: mpsc::UnboundedSender<Cmd>,
}

/// A configuration for raw peers: loopback, no mDNS, a fast gossip heartbeat.
pub fn raw_config() -> NetConfig {
    NetConfig {
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
        mdns: false,
        gossip_heartbeat: Duration::from_millis(100),
        ..NetConfig::default()
    }
}

impl RawPeer {
    /// Starts a raw peer with `key`, subscribed to the `default` cluster's topic, dialing `dial`.
    pub fn spawn(key: Keypair, config: &NetConfig, dial: Multiaddr) -> RawPeer {
        let mut swarm = peersync::net::build_swarm(key, config).unwrap();
        let id = *swarm.local_peer_id();
        let topic = cluster_topic(&config.cluster);
        swarm.behaviour_mut().gossipsub.subscribe(&topic).unwrap();
        swarm.dial(dial).unwrap();
        let seen = Arc::new(Seen::default());
        let (cmds, mut rx) = mpsc::unbounded_channel();
        let s = seen.clone();
        tokio::spawn(async move {
            let mut pending: HashMap<request_response::OutboundRequestId, oneshot::Sender<_>> = HashMap::new();
            loop {
                tokio::select! {
                    event = swarm.select_next_some() => match event {
                        SwarmEvent::ConnectionEstablished { .. } => s.connected.store(true, Ordering::SeqCst),
                        SwarmEvent::ConnectionClosed { num_established: 0, .. } => {
                            s.connected.store(false, Ordering::SeqCst);
                            s.closed.fetch_add(1, Ordering::SeqCst);
                        }
                        SwarmEvent::OutgoingConnectionError { .. } => {
                            s.failed.fetch_add(1, Ordering::SeqCst);
                        }
                        SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(e)) => match e {
                            gossipsub::Event::Subscribed { .. } => s.subscribed.store(true, Ordering::SeqCst),
                            gossipsub::Event::Message { .. } => {
                                s.gossip.fetch_add(1, Ordering::SeqCst);
                            }
                            _ => {}
                        },
                        SwarmEvent::Behaviour(BehaviourEvent::Sync(e)) => match e {
                            request_response::Event::Message {
                                message: request_response::Message::Response { request_id, response },
                                ..
                            } => {
                                if let Some(tx) = pending.remove(&request_id) {
                                    let _ = tx.send(Ok(response));
                                }
                            }
                            request_response::Event::OutboundFailure { request_id, error, .. } => {
                                if let Some(tx) = pending.remove(&request_id) {
                                    let _ = tx.send(Err(error.to_string()));
                                }
                            }
                            _ => {}
                        },
                        _ => {}
                    },
                    cmd = rx.recv() => match cmd {
                        None => return,
                        Some(Cmd::Publish(data)) => {
                            let _ = swarm.behaviour_mut().gossipsub.publish(topic.clone(), data);
                        }
                        Some(Cmd::Request(to, request, reply)) => {
                            let id = swarm.behaviour_mut().sync.send_request(&to, *request);
                            pending.insert(id, reply);
                        }
                    }
                }
            }
        });
        RawPeer { id, seen, cmds }
    }

    pub fn publish(&self, data: Vec<u8>) {
        self.cmds.send(Cmd::Publish(data)).unwrap();
    }

    /// Sends `request` to `to` and waits for its answer, or the transport's failure.
    pub async fn request(&self, to: PeerId, request: SyncRequest) -> Result<SyncResponse, String> {
        let (tx, rx) = oneshot::channel();
        self.cmds.send(Cmd::Request(to, Box::new(request), tx)).unwrap();
        rx.await.unwrap_or_else(|_| Err("the raw peer stopped".into()))
    }

    pub fn gossip_received(&self) -> usize {
        self.seen.gossip.load(Ordering::SeqCst)
    }

    pub fn connected(&self) -> bool {
        self.seen.connected.load(Ordering::SeqCst)
    }

    /// Whether its dial has come to something: connected now, or closed or refused.
    pub fn settled(&self) -> bool {
        self.connected() || self.seen.closed.load(Ordering::SeqCst) > 0 || self.seen.failed.load(Ordering::SeqCst) > 0
    }

    pub fn subscribed(&self) -> bool {
        self.seen.subscribed.load(Ordering::SeqCst)
    }

    /// Waits (with a deadline) until a peer's subscription to the topic reached it, so what it
    /// publishes has somewhere to go.
    pub async fn wait_subscribed(&self) {
        super::eventually("the raw peer to see the node's subscription", DEADLINE, || async {
            if self.subscribed() {
                Ok(())
            } else {
                Err("not yet".to_string())
            }
        })
        .await;
    }
}

/// The digest a node holding nothing sends, of the `default` cluster, showing no certificate.
pub fn bare_digest(role: Role) -> Digest {
    Digest {
        cluster: "default".into(),
        role,
        version_vector: Default::default(),
        state_root: StateRoot([0; 32]),
        log_floors: Default::default(),
        snapshots: vec![],
        snapshot_brief: None,
        cert: None,
        members: vec![],
        revocations: vec![],
        hold_until: None,
        lease_group: None,
    }
}

/// One op `body` at seq `seq` of `signer`'s log (after `chain`), stamped `wall_ms`, as the gossip
/// message its origin publishes (claiming to be a primary); and the chain hash after it.
pub fn one_op_gossip(signer: &Signer, seq: u64, chain: ChainHash, wall_ms: u64, body: OpBody) -> (Vec<u8>, ChainHash) {
    let op = Op { origin: signer.origin(), seq: Seq(seq), hlc: Hlc::new(wall_ms, 0), body };
    let bytes = op.encode();
    let chain = chain.extend(blake3::hash(&bytes).as_bytes());
    let head = signer.sign_head(Seq(seq), chain);
    let batch = OpBatch { after: Seq(seq - 1), ops: vec![ByteBuf::from(bytes)], head };
    (encode_gossip(&GossipMessage::Ops { role: Role::Primary, batch }), chain)
}

/// Waits (with a deadline) until `node` has rejected more than `before` gossip messages.
pub async fn rejected_after(node: &NodeHandle, before: u64, what: &str) {
    super::eventually(what, DEADLINE, || async {
        let n = node.metrics().gossip_rejected.get();
        if n > before {
            Ok(())
        } else {
            Err(format!("{n} rejected"))
        }
    })
    .await;
}
