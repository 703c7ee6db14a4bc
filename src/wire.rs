//! Wire formats: the gossip message codec (control plane) and the request/response types of the
//! repair plane. Kept apart from the behaviours so the formats can be read, versioned and fuzzed on
//! their own, and below the sync engine, which speaks them without knowing how they travel.
//!
//! Gossip payloads are one version byte followed by postcard; repair messages travel as CBOR through
//! request-response's codec. Byte payloads are `serde_bytes`, so CBOR carries them as byte strings
//! rather than arrays of integers.
//!
//! Must never depend on: the network, the store (except the plain `VersionVector` type), the sync
//! logic or the node.

use cid::Cid;
use serde::{Deserialize, Serialize};

use crate::crdt::Hlc;
use crate::ids::{Origin, Seq, StateRoot};
pub use crate::ids::{ParseRoleError, Role};
use crate::op::{public_key_of, AuthError, OpBatch, Signer};
use crate::snapshot::SnapshotBrief;
use crate::store::VersionVector;

/// First byte of every gossip payload. A node drops payloads of a version it does not know, so a
/// new version can be rolled out next to the old one on a new topic.
pub const GOSSIP_WIRE_VERSION: u8 = 1;

/// What travels on a cluster's gossip topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GossipMessage {
    /// Freshly written ops of one origin, with the head signature that vouches for them, published
    /// by that origin. `role` is the publisher's own claim; receivers also check it against what
    /// identify told them, and drop ops whose origin is not a primary.
    Ops { role: Role, batch: OpBatch },
    /// A node announces that it is active at this vector with this state root.
    Attestation(Attestation),
    /// The cluster authority revoked a member (encoded [`crate::cert::Revocation`]); spreads to
    /// every node.
    Revocation(#[serde(with = "serde_bytes")] Vec<u8>),
}

/// A node's signed statement that its state at `version_vector` has root `state_root`. Peers that
/// reach the same vector use it to prove their own state before calling themselves active. An active
/// node repeats it periodically; `clock` (its HLC, read before the vector) tells the others that
/// every op it writes from now on is stamped after it, which is what lets tombstones be collected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attestation {
    pub peer: Origin,
    pub cluster: String,
    pub version_vector: VersionVector,
    #[serde(with = "state_root_bytes")]
    pub state_root: StateRoot,
    pub clock: Hlc,
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

const ATTESTATION_DOMAIN: &[u8] = b"peersync/attestation/v2";

/// What an attestation states, before it is signed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attested {
    pub version_vector: VersionVector,
    pub state_root: StateRoot,
    pub clock: Hlc,
}

impl Attestation {
    fn payload(peer: &Origin, cluster: &str, vv: &VersionVector, root: &StateRoot, clock: Hlc) -> Vec<u8> {
        postcard::to_stdvec(&(peer, cluster, vv, root.0, clock)).expect("attestations encode")
    }

    pub fn sign(signer: &Signer, cluster: &str, what: Attested) -> Attestation {
        let peer = signer.origin();
        let Attested { version_vector, state_root, clock } = what;
        let payload = Self::payload(&peer, cluster, &version_vector, &state_root, clock);
        let signature = signer.sign_in_domain(ATTESTATION_DOMAIN, &payload);
        Attestation { peer, cluster: cluster.to_owned(), version_vector, state_root, clock, signature }
    }

    /// Checks the signature against the key inlined in `peer`.
    pub fn verify(&self) -> Result<(), AuthError> {
        let key = public_key_of(&self.peer)?;
        let mut message = ATTESTATION_DOMAIN.to_vec();
        message.extend(Self::payload(&self.peer, &self.cluster, &self.version_vector, &self.state_root, self.clock));
        if key.verify(&message, &self.signature) {
            Ok(())
        } else {
            Err(AuthError::BadSignature { origin: self.peer, seq: crate::ids::Seq::ZERO })
        }
    }
}

/// The identify agent version of a node: `peersync/VERSION role=ROLE cluster=NAME`.
pub fn agent_version(role: Role, cluster: &str) -> String {
    format!("peersync/{} role={role} cluster={cluster}", env!("CARGO_PKG_VERSION"))
}

/// Reads the role and cluster out of a peer's identify agent version; `None` for anything that is
/// not a peersync node.
pub fn parse_agent_version(agent: &str) -> Option<(Role, String)> {
    let rest = agent.strip_prefix("peersync/")?;
    let mut role = None;
    let mut cluster = None;
    for part in rest.split(' ').skip(1) {
        match part.split_once('=') {
            Some(("role", r)) => role = r.parse().ok(),
            Some(("cluster", c)) => cluster = Some(c.to_owned()),
            _ => {}
        }
    }
    Some((role?, cluster?))
}

/// Why bytes received from a peer were refused. Every variant means the sender misbehaved or runs
/// an incompatible version; none is fatal to this node.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The payload is larger than the receiver accepts; it was not decoded.
    #[error("message of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Size of the payload.
        len: usize,
        /// The receiver's limit.
        max: usize,
    },
    /// The payload has no version byte.
    #[error("empty message")]
    Empty,
    /// The payload is of a wire version this node does not speak.
    #[error("unknown wire version {found} (this node speaks version {GOSSIP_WIRE_VERSION})")]
    UnknownVersion {
        /// The version byte received.
        found: u8,
    },
    /// The body does not decode as a message.
    #[error("malformed message: {0}")]
    Malformed(#[from] postcard::Error),
    /// The body decodes but is followed by extra bytes.
    #[error("{0} unexpected bytes after the message")]
    TrailingBytes(usize),
}

/// Encodes a gossip message: the version byte, then postcard.
pub fn encode_gossip(message: &GossipMessage) -> Vec<u8> {
    let mut out = vec![GOSSIP_WIRE_VERSION];
    // Serializing into a Vec only fails for types serde cannot represent; ours all can.
    postcard::to_io(message, &mut out).expect("gossip messages always encode");
    out
}

/// Decodes a gossip payload of at most `max_bytes`. The size is checked before any decoding, and
/// garbage yields an error, never a panic or an allocation larger than the input allows.
pub fn decode_gossip(bytes: &[u8], max_bytes: usize) -> Result<GossipMessage, WireError> {
    if bytes.len() > max_bytes {
        return Err(WireError::TooLarge { len: bytes.len(), max: max_bytes });
    }
    let (&version, body) = bytes.split_first().ok_or(WireError::Empty)?;
    if version != GOSSIP_WIRE_VERSION {
        return Err(WireError::UnknownVersion { found: version });
    }
    let (message, rest) = postcard::take_from_bytes(body)?;
    if !rest.is_empty() {
        return Err(WireError::TrailingBytes(rest.len()));
    }
    Ok(message)
}

/// A node's summary of what it holds, exchanged on connect and periodically so peers can tell who
/// is behind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Digest {
    /// Cluster of the sender; a digest from another cluster is answered with an error.
    pub cluster: String,
    /// Role of the sender: replicas prefer syncing from replicas to spare primaries.
    pub role: Role,
    /// Per origin, the highest contiguous seq the sender has applied.
    pub version_vector: VersionVector,
    /// Digest of the sender's whole state at `version_vector`.
    #[serde(with = "state_root_bytes")]
    pub state_root: StateRoot,
    /// Per origin, the highest seq compacted out of the sender's op log: it can serve replay only
    /// after these. Absent origins have a floor of 0.
    #[serde(default)]
    pub log_floors: VersionVector,
    /// CIDs of the snapshots the sender holds and serves, newest first.
    #[serde(default)]
    pub snapshots: Vec<Cid>,
    /// What the first of `snapshots` holds (entries, version vector), so a node far behind can
    /// weigh pulling it against replaying. Absent in digests of older builds.
    #[serde(default)]
    pub snapshot_brief: Option<SnapshotBrief>,
    /// The sender's membership certificate (see [`crate::cert`]), when its cluster has an authority.
    #[serde(default)]
    pub cert: Option<serde_bytes::ByteBuf>,
    /// Certificates of the other members the sender knows, so members learn each other.
    #[serde(default)]
    pub members: Vec<serde_bytes::ByteBuf>,
    /// Revocations the sender holds, so a node that missed their gossip learns them.
    #[serde(default)]
    pub revocations: Vec<serde_bytes::ByteBuf>,
    /// The sender waits for acknowledgements of its own ops up to this seq (`?ack=`): the receiver
    /// holds its answer until it has durably applied them, or a short while passes. Absent in
    /// ordinary digests and in those of older builds.
    #[serde(default)]
    pub hold_until: Option<crate::ids::Seq>,
    /// The lease group the sender votes in (its founder's Raft id; see `sync::leases`), so a
    /// primary that is in none yet knows whom to ask to join. Absent in digests of older builds.
    #[serde(default)]
    pub lease_group: Option<u64>,
}

/// A repair-plane request. Requests are stateless so an interrupted transfer resumes by simply
/// asking again from where it stopped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SyncRequest {
    /// "Here is my digest; send me yours."
    Digest(Digest),
    /// Ops of `origin` after seq `after`, at most `max_ops` ops and about `max_bytes` of op bytes.
    GetOps {
        /// Whose log to read.
        origin: Origin,
        /// The requester's position in that log: the reply starts at `after + 1`.
        after: Seq,
        /// Most ops to return.
        max_ops: u32,
        /// Rough cap on the op bytes returned; at least one op is returned whatever its size.
        max_bytes: u32,
    },
    /// The signed manifest of the snapshot with this CID.
    GetManifest { cid: Cid },
    /// One snapshot chunk by CID.
    GetChunk { cid: Cid },
    /// The responder's state-root bucket hashes (to find where two states differ).
    GetBuckets,
    /// Every state entry in these buckets.
    GetEntries { buckets: Vec<u32> },
    /// The lease service: a Raft message between the primaries of a lease group, or a primary
    /// asking to join one.
    Lease(LeaseMessage),
}

/// What the primaries of a lease group say to each other (see `sync::leases`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LeaseMessage {
    /// A Raft message (protobuf `eraftpb::Message`) of group `group`.
    Raft {
        group: u64,
        #[serde(with = "serde_bytes")]
        msg: Vec<u8>,
    },
    /// "Add me to group `group` as a voter."
    Join { group: u64 },
}

/// The answer to a [`LeaseMessage`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseAnswer {
    /// The responder's group (0: none yet).
    pub group: u64,
    /// The group's leader as the responder knows it (peer id bytes), so a joiner asks it next.
    pub leader: Option<serde_bytes::ByteBuf>,
    /// A join was taken up (proposed, or the asker already votes).
    pub accepted: bool,
}

/// A repair-plane response.
// A response is moved a few times between the codec and the engine; boxing the digest would cost an
// allocation per digest for no gain.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SyncResponse {
    /// The responder's digest.
    Digest(Digest),
    /// Contiguous batches answering `GetOps`; empty when the responder has nothing after `after`.
    Ops(Vec<OpBatch>),
    /// Signed manifest bytes answering `GetManifest`.
    Manifest(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Chunk bytes answering `GetChunk` (the requester checks them against the CID).
    Chunk(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Bucket hashes answering `GetBuckets`: 32 bytes per bucket, in bucket order.
    Buckets(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Encoded state entries answering `GetEntries`.
    Entries(Vec<serde_bytes::ByteBuf>),
    /// Answers a [`SyncRequest::Lease`].
    Lease(LeaseAnswer),
    /// The request could not be served.
    Error {
        /// Stable machine-readable reason, e.g. `wrong_cluster` or `compacted`.
        code: String,
        /// What went wrong, for humans.
        message: String,
    },
}

impl SyncResponse {
    /// The bytes of data it carries (ops, chunks, entries...), not counting framing: what a
    /// peer's served-bytes budget is charged.
    pub fn payload_len(&self) -> u64 {
        let n: usize = match self {
            SyncResponse::Ops(batches) => batches.iter().flat_map(|b| &b.ops).map(|o| o.len()).sum(),
            SyncResponse::Manifest(b) | SyncResponse::Chunk(b) | SyncResponse::Buckets(b) => b.len(),
            SyncResponse::Entries(e) => e.iter().map(|b| b.len()).sum(),
            SyncResponse::Digest(_) | SyncResponse::Lease(_) | SyncResponse::Error { .. } => 0,
        };
        n as u64
    }
}

/// Carries a `StateRoot` as a CBOR byte string instead of an array of 32 integers.
mod state_root_bytes {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use crate::ids::StateRoot;

    pub fn serialize<S: Serializer>(root: &StateRoot, s: S) -> Result<S::Ok, S::Error> {
        serde_bytes::Bytes::new(&root.0).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<StateRoot, D::Error> {
        let bytes = serde_bytes::ByteArray::<32>::deserialize(d)?;
        Ok(StateRoot(bytes.into_array()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_version_carries_role_and_cluster() {
        let agent = agent_version(Role::Replica, "blue");
        assert_eq!(parse_agent_version(&agent), Some((Role::Replica, "blue".to_owned())));
        assert_eq!(parse_agent_version("rust-libp2p/0.47"), None);
        assert_eq!(parse_agent_version("peersync/1 role=boss cluster=x"), None);
    }

    #[test]
    fn role_round_trips() {
        for role in [Role::Primary, Role::Replica] {
            assert_eq!(role.to_string().parse::<Role>(), Ok(role));
        }
        assert!("leader".parse::<Role>().is_err());
    }

    #[test]
    fn digest_round_trips() {
        let digest = Digest {
            log_floors: VersionVector::default(),
            snapshots: vec![],
            snapshot_brief: Some(SnapshotBrief { entries: 3, version_vector: VersionVector::default() }),
            cluster: "c".into(),
            role: Role::Replica,
            version_vector: VersionVector::default(),
            state_root: StateRoot([7; 32]),
            cert: None,
            members: vec![],
            revocations: vec![],
            hold_until: Some(crate::ids::Seq(4)),
            lease_group: Some(9),
        };
        let bytes = postcard::to_stdvec(&digest).unwrap();
        assert_eq!(postcard::from_bytes::<Digest>(&bytes).unwrap(), digest);
    }
}
