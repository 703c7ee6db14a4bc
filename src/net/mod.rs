//! The network layer: libp2p behaviours, swarm construction and wire formats. It knows how bytes
//! move between peers and what they look like, not what they mean to the store.
//!
//! # Layout
//! - `config`: [`NetConfig`] with documented defaults and `validate()`, and [`NetError`].
//! - `protocol`: protocol names; the wire types ([`GossipMessage`], [`SyncRequest`],
//!   [`SyncResponse`]) live in [`crate::wire`] and are re-exported here.
//! - `behaviour`: the composed [`Behaviour`] and the cluster's topic and provider key.
//! - `codec`: the sync protocol's codec (CBOR, one message per stream, buffers reused).
//! - `swarm`: [`build_swarm`], [`start`], and [`on_identify`] to feed Kademlia.
//!
//! The node's event loop owns the `Swarm` and decides what to do with each event; in particular it
//! must report every gossip message's validation result, or nothing is forwarded.
//!
//! Must never depend on: the store (except the plain [`VersionVector`](crate::store::VersionVector)
//! data type), the sync logic or the node.

mod behaviour;
mod codec;
mod config;
mod protocol;
mod swarm;

pub use crate::wire::{
    agent_version, decode_gossip, encode_gossip, parse_agent_version, Attestation, Digest, GossipMessage,
    ParseRoleError, Role, SyncRequest, SyncResponse, WireError, GOSSIP_WIRE_VERSION,
};
pub use behaviour::{
    cluster_provider_key, cluster_topic, Behaviour, BehaviourEvent, GOSSIP_ENVELOPE_OVERHEAD, WITHHELD_SCORE,
};
pub use codec::SyncCodec;
pub use config::{NetConfig, NetError, DEFAULT_PORT, MAX_CLUSTER_NAME_LEN, MIN_GOSSIP_BYTES};
pub use protocol::{IDENTIFY_PROTOCOL_VERSION, KAD_PROTOCOL, SYNC_PROTOCOL};
pub use swarm::{bootstrap_targets, build_swarm, kad_addresses, new_swarm_key, on_identify, read_swarm_key, start};
