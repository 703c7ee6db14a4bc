//! The composed libp2p behaviour of a node (identify, ping, Kademlia, mDNS, gossipsub and the
//! repair request-response protocol) and the names it uses in the network: the cluster's gossip
//! topic and its Kademlia provider key.
//!
//! Every protocol is configured here from [`NetConfig`]; nothing in this file does I/O or decides
//! what to do with an event: that is the node's job.
//!
//! Must never depend on: the store, the sync logic or the node.

use libp2p::identity::Keypair;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::NetworkBehaviour;
use libp2p::{connection_limits, gossipsub, identify, kad, mdns, ping, request_response};

use super::codec::SyncCodec;
use super::config::{NetConfig, NetError, MAX_CONNECTIONS_PER_PEER, MAX_PENDING_INCOMING};
use super::protocol::{IDENTIFY_PROTOCOL_VERSION, KAD_PROTOCOL, SYNC_PROTOCOL};
use crate::wire::agent_version;

/// Room left in a gossipsub frame around the payload: the signed envelope (author, sequence number,
/// signature, topic) and protobuf framing. Payloads themselves are capped at `max_gossip_bytes`.
pub const GOSSIP_ENVELOPE_OVERHEAD: usize = 1024;

/// Message ids in one IHAVE at most (gossipsub's `max_control_messages_sent`, which also bounds the
/// ids of IWANTs it answers per peer). gossipsub 0.50 refuses an inbound RPC whose control part
/// exceeds `max_control_message_size` (16 KiB by default) and drops that inbound stream; the sender,
/// left writing into a stream nobody reads, never sends that peer gossip again on the connection.
/// Its default of 5,000 ids (32-byte ids here, ~170 KB) did exactly that under W3's load: the writer
/// stopped publishing to three of its four peers two seconds in, which then heard its writes only
/// through the fourth, one hop later, while its send queues filled and overflowed. 400 ids fit in a
/// default receiver's limit, so other libp2p implementations are safe from ours too.
pub const MAX_IHAVE_IDS: usize = 400;

/// The control part of one gossipsub RPC accepted from a peer at most: room for the 5,000-id IHAVEs
/// other implementations send by default (go-libp2p's and js-libp2p's `MaxIHaveLength`), so their
/// gossip is not cut off as ours was. The whole RPC is bounded by `max_transmit_size` anyway.
pub const MAX_CONTROL_BYTES: usize = 256 * 1024;

/// Request-response streams open at once per connection handler at most.
pub const MAX_CONCURRENT_STREAMS: usize = 512;

/// All protocols of a node, driven by one `Swarm`.
#[derive(NetworkBehaviour)]
pub struct Behaviour {
    /// Refuses connections beyond `NetConfig::max_connections` (and pending or per-peer limits).
    pub limits: connection_limits::Behaviour,
    /// Exchanges listen addresses and supported protocols; feeds Kademlia (see `swarm::on_identify`).
    pub identify: identify::Behaviour,
    /// Detects dead connections.
    pub ping: ping::Behaviour,
    /// Peer routing and the cluster's provider records, on peersync's own DHT protocol.
    pub kad: kad::Behaviour<kad::store::MemoryStore>,
    /// LAN discovery; disabled when `NetConfig::mdns` is off.
    pub mdns: Toggle<mdns::tokio::Behaviour>,
    /// The control plane: op deltas on the cluster topic. Messages are only forwarded after the node
    /// reports them valid with `report_message_validation_result`.
    pub gossipsub: gossipsub::Behaviour,
    /// The repair plane: digests and op ranges.
    pub sync: request_response::Behaviour<SyncCodec>,
}

impl Behaviour {
    /// Builds the behaviour for the node owning `keypair`. Kademlia starts in server mode: peersync
    /// runs on LANs and private networks where every node is reachable.
    pub fn new(keypair: &Keypair, config: &NetConfig) -> Result<Self, NetError> {
        let peer_id = keypair.public().to_peer_id();

        let identify = identify::Behaviour::new(
            identify::Config::new(IDENTIFY_PROTOCOL_VERSION.to_owned(), keypair.public())
                .with_agent_version(agent_version(config.role, &config.cluster)),
        );

        let mut kad_config = kad::Config::new(KAD_PROTOCOL);
        kad_config.set_periodic_bootstrap_interval(Some(config.kad_bootstrap_interval));
        let mut kad = kad::Behaviour::with_config(peer_id, kad::store::MemoryStore::new(peer_id), kad_config);
        kad.set_mode(Some(kad::Mode::Server));

        let mdns = if config.mdns {
            let mdns = mdns::tokio::Behaviour::new(mdns::Config::default(), peer_id)
                .map_err(|e| NetError::Behaviour { protocol: "mdns", message: e.to_string() })?;
            Some(mdns)
        } else {
            None
        };

        let max = u32::try_from(config.max_connections).unwrap_or(u32::MAX);
        let limits = connection_limits::ConnectionLimits::default()
            .with_max_pending_incoming(Some(MAX_PENDING_INCOMING))
            .with_max_established_incoming(Some(max))
            .with_max_established_outgoing(Some(max))
            .with_max_established_per_peer(Some(MAX_CONNECTIONS_PER_PEER));
        Ok(Behaviour {
            limits: connection_limits::Behaviour::new(limits),
            identify,
            ping: ping::Behaviour::default(),
            kad,
            mdns: mdns.into(),
            gossipsub: gossipsub_behaviour(config)?,
            sync: sync_behaviour(config),
        })
    }
}

fn gossipsub_behaviour(config: &NetConfig) -> Result<gossipsub::Behaviour, NetError> {
    let invalid = |message: String| NetError::Behaviour { protocol: "gossipsub", message };
    let gossip_config = gossipsub::ConfigBuilder::default()
        // Small clusters (2-5 nodes): the defaults (6/5/12, outbound 2) never form a full mesh.
        .mesh_n_low(1)
        .mesh_n(3)
        .mesh_n_high(6)
        .mesh_outbound_min(1)
        .heartbeat_interval(config.gossip_heartbeat)
        // The default initial delay is 5 s whatever the interval; tie it to the heartbeat.
        .heartbeat_initial_delay(config.gossip_heartbeat)
        .max_transmit_size(config.max_gossip_bytes + GOSSIP_ENVELOPE_OVERHEAD)
        .max_control_messages_sent(MAX_IHAVE_IDS)
        .max_control_message_size(MAX_CONTROL_BYTES)
        .validation_mode(gossipsub::ValidationMode::Anonymous)
        .validate_messages()
        // Content-addressed ids: the same batch relayed by two peers, or republished, is one message.
        .message_id_fn(|message: &gossipsub::Message| gossipsub::MessageId::new(blake3::hash(&message.data).as_bytes()))
        .build()
        .map_err(|e| invalid(e.to_string()))?;
    // Unsigned, anonymous envelopes: every payload carries its own signature (ops under their
    // origin's signed chain head, attestations signed by their peer), so a second ed25519 signature
    // per message and per hop would only cost CPU. Message ids are content hashes.
    let mut behaviour = gossipsub::Behaviour::new(gossipsub::MessageAuthenticity::Anonymous, gossip_config)
        .map_err(|e| invalid(e.to_owned()))?;
    let (params, thresholds) = peer_score(&config.cluster);
    behaviour.with_peer_score(params, thresholds).map_err(invalid)?;
    Ok(behaviour)
}

/// The application score of a peer that may not have the cluster's gossip (one that has not shown
/// a membership certificate): below the publish (-50) and gossip (-10) thresholds, so no publish,
/// forward, IHAVE or IWANT answer reaches it and it is never grafted, yet above the graylist
/// (-80), so its subscriptions are still recorded and it gets gossip once it is admitted.
/// Gossipsub's blacklist alone would not do: it only refuses a peer's messages, and a peer is
/// blacklisted only after its connection, by which time its subscriptions are known.
pub const WITHHELD_SCORE: f64 = -60.0;

/// Gossipsub peer scoring: a peer whose messages the node rejects (malformed, forged, from a
/// non-primary or another cluster) loses score with every one, quadratically; below -10 it gets no
/// gossip from us, below -50 our publishes skip it, below -80 its messages are ignored. Positive
/// score is kept small so a long-standing peer cannot bank credit against bad messages, and peers
/// sharing an IP are not penalised (a cluster often runs several nodes per host).
fn peer_score(cluster: &str) -> (gossipsub::PeerScoreParams, gossipsub::PeerScoreThresholds) {
    let topic = gossipsub::TopicScoreParams {
        topic_weight: 1.0,
        time_in_mesh_weight: 0.0,
        first_message_deliveries_weight: 0.1,
        first_message_deliveries_cap: 100.0,
        // An idle cluster delivers nothing in the mesh; that is no fault.
        mesh_message_deliveries_weight: 0.0,
        mesh_failure_penalty_weight: 0.0,
        invalid_message_deliveries_weight: -10.0,
        invalid_message_deliveries_decay: 0.5,
        ..Default::default()
    };
    let params = gossipsub::PeerScoreParams {
        topics: [(cluster_topic(cluster).hash(), topic)].into_iter().collect(),
        ip_colocation_factor_weight: 0.0,
        app_specific_weight: 1.0,
        ..Default::default()
    };
    (params, gossipsub::PeerScoreThresholds::default())
}

fn sync_behaviour(config: &NetConfig) -> request_response::Behaviour<SyncCodec> {
    let codec = SyncCodec::new(config.max_request_bytes, config.max_response_bytes);
    request_response::Behaviour::with_codec(
        codec,
        [(SYNC_PROTOCOL, request_response::ProtocolSupport::Full)],
        // Inbound requests beyond the engine's own bound are answered `busy` by the engine, so the
        // transport's limit sits above it and streams are not dropped silently.
        request_response::Config::default()
            .with_request_timeout(config.request_timeout)
            .with_max_concurrent_streams(MAX_CONCURRENT_STREAMS),
    )
}

/// The gossip topic carrying a cluster's ops.
pub fn cluster_topic(cluster: &str) -> gossipsub::IdentTopic {
    gossipsub::IdentTopic::new(format!("peersync/{cluster}/ops/1"))
}

/// The Kademlia key under which every node of a cluster announces itself as a provider, so a node
/// can find sync-capable peers of its cluster by asking the DHT.
pub fn cluster_provider_key(cluster: &str) -> kad::RecordKey {
    kad::RecordKey::new(&format!("peersync/cluster/{cluster}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_scoped_by_cluster() {
        assert_eq!(cluster_topic("a").to_string(), "peersync/a/ops/1");
        assert_ne!(cluster_topic("a").hash(), cluster_topic("b").hash());
        assert_eq!(cluster_provider_key("a").as_ref(), b"peersync/cluster/a");
    }

    /// What a node sends fits what a default gossipsub receives: an IHAVE of the most ids, each a
    /// 32-byte blake3 id with its protobuf tag and length, plus the topic and message framing.
    #[test]
    fn the_largest_ihave_fits_a_default_receivers_control_limit() {
        const DEFAULT_RECEIVE_LIMIT: usize = 16 * 1024;
        let topic = cluster_topic(&"c".repeat(64)).to_string();
        let largest = MAX_IHAVE_IDS * (1 + 1 + 32) + topic.len() + 16;
        assert!(largest <= DEFAULT_RECEIVE_LIMIT, "{largest} bytes");
        // And a default sender's (5,000 ids) fits ours.
        assert!(5_000 * (1 + 1 + 32) + topic.len() + 16 <= MAX_CONTROL_BYTES);
    }

    #[test]
    fn builds_with_default_config() {
        let config = NetConfig { mdns: false, ..NetConfig::default() };
        Behaviour::new(&Keypair::generate_ed25519(), &config).unwrap();
    }
}
