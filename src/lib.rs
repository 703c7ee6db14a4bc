//! peersync: a peer-to-peer sync node. Each node keeps registers (last-writer-wins), counters
//! (PN-counters) and leases (holder, fencing token, expiry) in redb, gossips its writes to the
//! other nodes of its cluster, and repairs whatever gossip missed by pulling op ranges or a
//! CID-addressed snapshot from the nearest peer that has them.
//!
//! # Layout
//!
//! Dependencies point down; nothing points up.
//!
//! | module | what it is | must never depend on |
//! |---|---|---|
//! | `bin/peersync` | flag parsing, logging, calls into [`node`] and [`api`] | — |
//! | [`api`] | HTTP API (axum) and the CLI's HTTP client, over [`node::NodeHandle`] | store or network internals |
//! | [`node`] | [`node::Node`] / [`node::NodeHandle`]; the event loop that owns the libp2p `Swarm` and executes the engine's actions; the apply pipeline that verifies and queues batches | — (the only place the layers meet) |
//! | [`net`] | libp2p behaviours (Kademlia, mDNS, gossipsub, request-response, identify, ping), protocol names, swarm construction | the store, the sync logic, the node |
//! | [`sync`] | [`sync::Engine`]: every sync decision as a sans-I/O state machine (peers, digests with a bounded fanout, pulls, gaps, snapshots, repair, readiness, redial), and the parts it is built from | I/O of any kind, the clock, the network, the node |
//! | [`wire`] | wire formats: gossip messages, digests, repair requests and responses, attestations | the network, the store's internals, the sync logic, the node |
//! | [`snapshot`] | snapshot manifests and chunks: format, signing, verification | the network, the node |
//! | [`store`] | redb tables, the group-committing writer, op log, state, version vector, state root | the network, the sync logic, the node |
//! | [`op`] | ops, their canonical encoding and CIDs, per-origin hash chains and signed heads | the store, the network |
//! | [`crdt`] | register, counter and lease values and their merges; the hybrid logical clock | everything else |
//! | [`ids`] | typed ids shared by all layers: origins, seqs, tokens, roles, state roots | everything else |
//!
//! # Data flow
//!
//! ```text
//! local write:  HTTP/library -> NodeHandle -> store writer (one redb txn: op log + state + version
//!               vector; group commit) -> commit event -> event loop -> gossipsub (signed batches)
//! remote write: gossipsub -> event loop -> engine (decode, check role and cluster, duplicate or
//!               gap?) -> Apply -> applier (verify hash chain and signature) -> store writer, in
//!               order per origin -> engine reports the verdict; a batch past a gap waits in the
//!               engine's bounded gap buffer
//! repair:       digests {version vector, state root, log floors, snapshots} on connect and with a
//!               small fanout each round -> replay planner -> GetOps pulls (cursor = next seq);
//!               ops below every peer's log floor -> snapshot: manifest + chunks by CID from several
//!               peers -> verified, persisted -> installed in one transaction -> replay resumes;
//!               same vector, other root -> bucket comparison -> entries of differing buckets merged
//! readiness:    syncing until caught up with what peers advertised at join and a peer vouches for
//!               the same (vector, root); then active, announced with a signed attestation
//! ```

pub mod api;
pub mod cert;
pub mod crdt;
pub mod ids;
pub mod net;
pub mod node;
pub mod op;
pub mod snapshot;
pub mod store;
pub mod sync;
pub mod wire;
