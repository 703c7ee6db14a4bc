//! Building and starting the `Swarm`: the transports (TCP with noise and yamux, and QUIC), joining
//! the cluster (listen, dial bootstrap peers, subscribe, provide), and the small address plumbing
//! libp2p leaves to the application (identify's listen addresses into Kademlia).
//!
//! The swarm is built and started here but driven by the node's event loop, which owns it.
//!
//! Must never depend on: the store, the sync logic or the node.

use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::{identify, noise, tcp, yamux, Multiaddr, PeerId, Swarm, SwarmBuilder};

use super::behaviour::{cluster_provider_key, cluster_topic, Behaviour};
use super::config::{check_transport, NetConfig, NetError};
use super::protocol::KAD_PROTOCOL;

/// Builds a swarm for the node owning `keypair`: TCP (nodelay) + noise + yamux, and QUIC, on tokio.
/// It neither listens nor dials: call [`start`] for that.
pub fn build_swarm(keypair: Keypair, config: &NetConfig) -> Result<Swarm<Behaviour>, NetError> {
    config.validate()?;
    let behaviour = Behaviour::new(&keypair, config)?;
    if let Some(psk) = config.swarm_key {
        return private_swarm(keypair, behaviour, psk, config);
    }
    let swarm = SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_tcp(tcp::Config::default().nodelay(true), noise::Config::new, yamux::Config::default)
        .map_err(|e| NetError::Transport { what: "tcp/noise", message: e.to_string() })?
        .with_quic()
        .with_behaviour(|_| behaviour)
        .expect("an already built behaviour is infallible")
        .with_swarm_config(|c| c.with_idle_connection_timeout(config.idle_connection_timeout))
        .build();
    Ok(swarm)
}

/// A swarm of a private network: TCP, then the pre-shared-key handshake, then noise and yamux. A
/// peer without the key fails the handshake before anything else is exchanged.
fn private_swarm(
    keypair: Keypair,
    behaviour: Behaviour,
    psk: libp2p::pnet::PreSharedKey,
    config: &NetConfig,
) -> Result<Swarm<Behaviour>, NetError> {
    use libp2p::core::upgrade::Version;
    use libp2p::Transport;
    let swarm = SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_other_transport(move |key| -> Result<_, Box<dyn std::error::Error + Send + Sync>> {
            let noise = noise::Config::new(key)?;
            Ok(tcp::tokio::Transport::new(tcp::Config::default().nodelay(true))
                .and_then(move |socket, _| libp2p::pnet::PnetConfig::new(psk).handshake(socket))
                .upgrade(Version::V1Lazy)
                .authenticate(noise)
                .multiplex(yamux::Config::default()))
        })
        .map_err(|e| NetError::Transport { what: "tcp/pnet/noise", message: e.to_string() })?
        .with_behaviour(|_| behaviour)
        .expect("an already built behaviour is infallible")
        .with_swarm_config(|c| c.with_idle_connection_timeout(config.idle_connection_timeout))
        .build();
    Ok(swarm)
}

/// A new random pre-shared key in the usual `swarm.key` format (`/key/swarm/psk/1.0.0/`).
pub fn new_swarm_key() -> String {
    let bytes: [u8; 32] = rand::random();
    libp2p::pnet::PreSharedKey::new(bytes).to_string()
}

/// Reads a `swarm.key` file.
pub fn read_swarm_key(path: &std::path::Path) -> Result<libp2p::pnet::PreSharedKey, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    text.trim().parse().map_err(|e| format!("{} is not a swarm key (/key/swarm/psk/1.0.0/): {e:?}", path.display()))
}

/// Joins the network: listens on every `listen` address, dials every bootstrap address (skipping
/// this node's own), adds bootstrap peers with a `/p2p/` suffix to Kademlia, subscribes to the
/// cluster topic and announces this node as a provider of the cluster key.
///
/// A node with no peer yet only records its provider entry locally; peers still find it when their
/// lookups reach it. The node may call `kad.start_providing` again once connected to republish.
pub fn start(swarm: &mut Swarm<Behaviour>, config: &NetConfig) -> Result<(), NetError> {
    for addr in &config.listen {
        swarm.listen_on(addr.clone()).map_err(|source| NetError::Listen { addr: addr.clone(), source })?;
    }
    let local = *swarm.local_peer_id();
    for addr in &config.bootstrap {
        let (dial_addr, peer) = split_p2p(addr);
        if peer == Some(local) {
            continue;
        }
        if let Some(peer) = peer {
            swarm.behaviour_mut().kad.add_address(&peer, dial_addr);
        }
        swarm.dial(addr.clone()).map_err(|source| NetError::Dial { addr: addr.clone(), source: Box::new(source) })?;
    }
    let behaviour = swarm.behaviour_mut();
    behaviour.gossipsub.subscribe(&cluster_topic(&config.cluster))?;
    behaviour.kad.start_providing(cluster_provider_key(&config.cluster))?;
    Ok(())
}

/// The bootstrap addresses `start` dials (this node's own skipped), each with the peer it names.
pub fn bootstrap_targets(config: &NetConfig, local: &PeerId) -> Vec<(Multiaddr, Option<PeerId>)> {
    config
        .bootstrap
        .iter()
        .map(|addr| (addr.clone(), split_p2p(addr).1))
        .filter(|(_, peer)| peer.as_ref() != Some(local))
        .collect()
}

/// The addresses of an identified peer worth adding to Kademlia: none unless the peer speaks
/// peersync's Kademlia protocol in server mode, else its listen addresses on transports this node
/// can dial (TCP, QUIC v1), without any `/p2p/` suffix.
///
/// Kademlia records addresses by itself only for peers this node dialed (rust-libp2p #5445), so a
/// peer that dialed us would otherwise never be routable through us.
pub fn kad_addresses(info: &identify::Info) -> Vec<Multiaddr> {
    if !info.protocols.contains(&KAD_PROTOCOL) {
        return Vec::new();
    }
    info.listen_addrs.iter().filter(|addr| check_transport(addr).is_ok()).map(|addr| split_p2p(addr).0).collect()
}

/// Feeds an identified peer's usable listen addresses into Kademlia (see [`kad_addresses`]).
/// Returns how many addresses were offered.
pub fn on_identify(swarm: &mut Swarm<Behaviour>, peer: &PeerId, info: &identify::Info) -> usize {
    let addrs = kad_addresses(info);
    for addr in &addrs {
        swarm.behaviour_mut().kad.add_address(peer, addr.clone());
    }
    addrs.len()
}

/// Splits a trailing `/p2p/<peer-id>` off an address.
fn split_p2p(addr: &Multiaddr) -> (Multiaddr, Option<PeerId>) {
    let mut addr = addr.clone();
    match addr.iter().last() {
        Some(Protocol::P2p(peer)) => {
            addr.pop();
            (addr, Some(peer))
        }
        _ => (addr, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(protocols: Vec<libp2p::StreamProtocol>, listen: &[&str]) -> identify::Info {
        identify::Info {
            public_key: Keypair::generate_ed25519().public(),
            protocol_version: String::new(),
            agent_version: String::new(),
            listen_addrs: listen.iter().map(|a| a.parse().unwrap()).collect(),
            protocols,
            observed_addr: Multiaddr::empty(),
            signed_peer_record: None,
        }
    }

    #[test]
    fn only_kad_servers_and_dialable_addresses_go_to_kademlia() {
        let peer = PeerId::random();
        let listen = [
            "/ip4/10.0.0.1/tcp/4001".to_owned(),
            format!("/ip4/10.0.0.1/udp/4001/quic-v1/p2p/{peer}"),
            "/ip4/10.0.0.1/tcp/4002/ws".to_owned(),
            "/ip4/10.0.0.1/udp/4003/webrtc-direct".to_owned(),
        ];
        let listen: Vec<&str> = listen.iter().map(String::as_str).collect();
        let got = kad_addresses(&info(vec![KAD_PROTOCOL], &listen));
        let want: Vec<Multiaddr> =
            vec!["/ip4/10.0.0.1/tcp/4001".parse().unwrap(), "/ip4/10.0.0.1/udp/4001/quic-v1".parse().unwrap()];
        assert_eq!(got, want);
        assert!(kad_addresses(&info(vec![], &listen)).is_empty());
    }
}
