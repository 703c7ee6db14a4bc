//! Protocol names of peersync in the libp2p network. The message formats themselves are in
//! [`crate::wire`].

use libp2p::StreamProtocol;

/// Kademlia protocol of peersync: a DHT of our own, so nodes never join the public IPFS DHT.
pub const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/peersync/kad/1.0.0");

/// Request-response protocol of the repair plane.
pub const SYNC_PROTOCOL: StreamProtocol = StreamProtocol::new("/peersync/sync/1.0.0");

/// The `protocol_version` a node announces through identify.
pub const IDENTIFY_PROTOCOL_VERSION: &str = "/peersync/id/1.0.0";
