//! Network configuration: what to listen on, whom to bootstrap from, and the timing and size limits
//! of every protocol, with documented defaults and a `validate()` that names the bad value.
//!
//! Must never depend on: the store, the sync logic or the node.

use std::time::Duration;

use libp2p::multiaddr::Protocol;
use libp2p::Multiaddr;

use crate::ids::Role;

/// Settings of the libp2p side of a node. The CLI maps onto these fields one to one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// Addresses to listen on (TCP and/or QUIC). Default `/ip4/0.0.0.0/tcp/4001`. May be empty for a
    /// node that only dials out.
    pub listen: Vec<Multiaddr>,
    /// Peers to dial at start. With a `/p2p/<peer-id>` suffix the peer also goes straight into the
    /// Kademlia table; without it the peer is learnt through identify once connected.
    pub bootstrap: Vec<Multiaddr>,
    /// Whether to discover peers on the LAN with mDNS. Default on; off in tests and where multicast
    /// is blocked.
    pub mdns: bool,
    /// Name of the cluster: it scopes the gossip topic and the Kademlia provider key, so clusters
    /// sharing a network never exchange ops. Default `default`.
    pub cluster: String,
    /// This node's role, advertised to peers through identify and on every gossip message.
    pub role: Role,
    /// Gossipsub heartbeat (mesh maintenance, lazy gossip). Default 1 s; tests use ~100 ms so meshes
    /// form quickly.
    pub gossip_heartbeat: Duration,
    /// How often Kademlia refreshes its routing table with a bootstrap query. Default 5 min.
    pub kad_bootstrap_interval: Duration,
    /// How long a connection with no active stream stays open. Default 60 s (libp2p's own default of
    /// 10 s drops peers between periodic digest exchanges).
    pub idle_connection_timeout: Duration,
    /// Deadline of one repair request, including the transfer of its response. Default 30 s.
    pub request_timeout: Duration,
    /// Largest encoded gossip message accepted or published. Default 64 KiB; bigger deltas must be
    /// split into batches or left to the repair plane.
    pub max_gossip_bytes: usize,
    /// Largest encoded repair request accepted. Default 1 MiB.
    pub max_request_bytes: usize,
    /// Largest encoded repair response accepted. Default 16 MiB; replies to `GetOps` are capped below
    /// this by the request's own `max_bytes`.
    pub max_response_bytes: usize,
    /// A private network (`--swarm-key`): every connection starts with a handshake on this
    /// pre-shared key, so a node without it cannot complete a connection. TCP only (QUIC has no
    /// such handshake). Default none.
    pub swarm_key: Option<libp2p::pnet::PreSharedKey>,
    /// Established connections at most, inbound and outbound each; beyond it the transport refuses
    /// new ones before any protocol runs. A hard cap under a connection flood: the node itself
    /// already keeps far fewer (it prunes down to its `max_peers`). Default 128.
    pub max_connections: usize,
}

/// Connections being set up (not yet established) from others at once, at most.
pub const MAX_PENDING_INCOMING: u32 = 32;

/// Connections to one peer at most (a simultaneous dial makes two).
pub const MAX_CONNECTIONS_PER_PEER: u32 = 4;

/// Default TCP port of a node.
pub const DEFAULT_PORT: u16 = 4001;

/// Longest accepted cluster name, so topics and provider keys stay short.
pub const MAX_CLUSTER_NAME_LEN: usize = 64;

/// Smallest `max_gossip_bytes` that still fits a one-op batch with its signed head.
pub const MIN_GOSSIP_BYTES: usize = 1024;

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            listen: vec![Multiaddr::empty().with(Protocol::Ip4([0, 0, 0, 0].into())).with(Protocol::Tcp(DEFAULT_PORT))],
            bootstrap: Vec::new(),
            mdns: true,
            cluster: "default".to_owned(),
            role: Role::Primary,
            gossip_heartbeat: Duration::from_secs(1),
            kad_bootstrap_interval: Duration::from_secs(5 * 60),
            idle_connection_timeout: Duration::from_secs(60),
            request_timeout: Duration::from_secs(30),
            max_gossip_bytes: 64 * 1024,
            max_request_bytes: 1024 * 1024,
            max_response_bytes: 16 * 1024 * 1024,
            swarm_key: None,
            max_connections: 128,
        }
    }
}

/// Why the network could not be configured or started. Everything here is fatal at start-up: the
/// operator has to fix the configuration or the environment.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The cluster name is empty, too long, or has characters unfit for a topic name.
    #[error(
        "cluster name {0:?} is invalid: use 1 to {MAX_CLUSTER_NAME_LEN} characters \
         among ASCII letters, digits, '.', '_' and '-'"
    )]
    ClusterName(String),
    /// A duration or size that must be positive is zero.
    #[error("{field} must be greater than zero")]
    Zero {
        /// Name of the `NetConfig` field.
        field: &'static str,
    },
    /// `max_gossip_bytes` cannot hold even a small batch.
    #[error("max_gossip_bytes is {0}, below the minimum of {MIN_GOSSIP_BYTES} bytes")]
    GossipTooSmall(usize),
    /// A bootstrap address names no transport this node can dial.
    #[error(
        "bootstrap address {addr} is not dialable: {reason} \
         (expected e.g. /ip4/10.0.0.1/tcp/4001/p2p/<peer-id>)"
    )]
    BootstrapAddr {
        /// The address as configured.
        addr: Multiaddr,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A listen address names no transport this node can listen on.
    #[error(
        "listen address {addr} is not supported: {reason} \
         (expected e.g. /ip4/0.0.0.0/tcp/4001 or /ip4/0.0.0.0/udp/4001/quic-v1)"
    )]
    ListenAddr {
        /// The address as configured.
        addr: Multiaddr,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The OS refused a listener (port in use, address not local, ...).
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address as configured.
        addr: Multiaddr,
        /// The transport's error.
        source: libp2p::TransportError<std::io::Error>,
    },
    /// A bootstrap dial could not even be started. A dial that starts and then fails is reported
    /// later as a swarm event, not here.
    #[error("cannot dial bootstrap address {addr}: {source}")]
    Dial {
        /// The address as configured.
        addr: Multiaddr,
        /// Boxed: a dial error is large and would bloat every `Result` of this module.
        source: Box<libp2p::swarm::DialError>,
    },
    /// A transport could not be set up.
    #[error("cannot set up the {what} transport: {message}")]
    Transport {
        /// Which transport.
        what: &'static str,
        /// The underlying error, as text.
        message: String,
    },
    /// A protocol refused its configuration.
    #[error("invalid {protocol} configuration: {message}")]
    Behaviour {
        /// Which protocol.
        protocol: &'static str,
        /// The protocol's complaint, as text.
        message: String,
    },
    /// Gossipsub refused the subscription to the cluster topic.
    #[error("cannot subscribe to the cluster topic: {0}")]
    Subscribe(#[from] libp2p::gossipsub::SubscriptionError),
    /// The provider record of the cluster key could not be stored locally.
    #[error("cannot announce this node as a provider of the cluster key: {0}")]
    Provide(#[from] libp2p::kad::store::Error),
}

impl NetConfig {
    /// Checks every field; the error names the first bad value and says what is expected.
    pub fn validate(&self) -> Result<(), NetError> {
        validate_cluster(&self.cluster)?;
        let durations = [
            ("gossip_heartbeat", self.gossip_heartbeat),
            ("kad_bootstrap_interval", self.kad_bootstrap_interval),
            ("idle_connection_timeout", self.idle_connection_timeout),
            ("request_timeout", self.request_timeout),
        ];
        for (field, value) in durations {
            if value.is_zero() {
                return Err(NetError::Zero { field });
            }
        }
        let sizes = [
            ("max_gossip_bytes", self.max_gossip_bytes),
            ("max_request_bytes", self.max_request_bytes),
            ("max_response_bytes", self.max_response_bytes),
            ("max_connections", self.max_connections),
        ];
        for (field, value) in sizes {
            if value == 0 {
                return Err(NetError::Zero { field });
            }
        }
        if self.max_gossip_bytes < MIN_GOSSIP_BYTES {
            return Err(NetError::GossipTooSmall(self.max_gossip_bytes));
        }
        for addr in &self.listen {
            check_transport(addr).map_err(|reason| NetError::ListenAddr { addr: addr.clone(), reason })?;
            if self.swarm_key.is_some() && addr.iter().any(|p| matches!(p, Protocol::QuicV1)) {
                let reason = "QUIC cannot run in a private network (--swarm-key); listen on TCP";
                return Err(NetError::ListenAddr { addr: addr.clone(), reason });
            }
        }
        for addr in &self.bootstrap {
            check_transport(addr).map_err(|reason| NetError::BootstrapAddr { addr: addr.clone(), reason })?;
        }
        Ok(())
    }
}

fn validate_cluster(cluster: &str) -> Result<(), NetError> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if cluster.is_empty() || cluster.len() > MAX_CLUSTER_NAME_LEN || !cluster.chars().all(allowed) {
        return Err(NetError::ClusterName(cluster.to_owned()));
    }
    Ok(())
}

/// Whether the address names a transport this node speaks: an IP or DNS host, then TCP, or UDP with
/// QUIC v1. Only a `/p2p/` suffix may follow.
pub(crate) fn check_transport(addr: &Multiaddr) -> Result<(), &'static str> {
    let mut parts = addr.iter();
    match parts.next() {
        Some(Protocol::Ip4(_) | Protocol::Ip6(_) | Protocol::Dns(_) | Protocol::Dns4(_) | Protocol::Dns6(_)) => {}
        Some(_) => return Err("it does not start with an /ip4, /ip6 or /dns host"),
        None => return Err("it is empty"),
    }
    match parts.next() {
        Some(Protocol::Tcp(_)) => {}
        Some(Protocol::Udp(_)) => {
            if !matches!(parts.next(), Some(Protocol::QuicV1)) {
                return Err("a /udp port must be followed by /quic-v1");
            }
        }
        _ => return Err("it has no /tcp or /udp port"),
    }
    match (parts.next(), parts.next()) {
        (None, _) | (Some(Protocol::P2p(_)), None) => Ok(()),
        _ => Err("only a /p2p/<peer-id> suffix may follow the transport"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_valid() {
        NetConfig::default().validate().unwrap();
    }

    #[test]
    fn transports() {
        let peer = libp2p::PeerId::random();
        let ok = [
            "/ip4/1.2.3.4/tcp/1".to_owned(),
            "/ip6/::1/udp/1/quic-v1".to_owned(),
            format!("/dns4/a.example/tcp/1/p2p/{peer}"),
        ];
        for a in ok {
            assert_eq!(check_transport(&a.parse().unwrap()), Ok(()), "{a}");
        }
        let bad = ["/ip4/1.2.3.4", "/ip4/1.2.3.4/udp/1", "/tcp/1", "/ip4/1.2.3.4/tcp/1/ws"];
        for a in bad {
            assert!(check_transport(&a.parse().unwrap()).is_err(), "{a}");
        }
    }
}
