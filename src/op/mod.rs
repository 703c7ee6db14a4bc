//! Ops: the unit of replication, their canonical encoding, content address and authentication.
//!
//! Every mutation is an [`Op`] `{origin, seq, hlc, body}`. Its canonical bytes (postcard) are
//! content-addressed by a CIDv1 (raw codec, blake3). Ops are authenticated cheaply at volume: each
//! origin threads its ops into a hash chain (`head_n = blake3(head_{n-1} || digest(op_n))`) and signs
//! only heads ([`SignedHead`]), one signature per batch. A receiver recomputes the chain over a batch
//! and checks the one signature, so a replica relaying ops cannot forge or alter them.
//!
//! Must never depend on: the store, the network or the node.

mod batch;
mod chain;

use cid::Cid;
use multihash_codetable::{Code, MultihashDigest};
use serde::{Deserialize, Serialize};

use crate::crdt::Hlc;
use crate::ids::{Origin, Seq, Token};

pub use batch::{OpBatch, VerifiedBatch, VerifiedOp, VerifyError};
pub use chain::{public_key_of, AuthError, ChainHash, SignedHead, Signer};

/// Multicodec code of raw bytes, used for op CIDs and opaque chunks.
pub const RAW_CODEC: u64 = 0x55;

/// One mutation, as created by its origin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Op {
    /// The primary that created the op and signed its chain.
    pub origin: Origin,
    /// Position in the origin's log: contiguous from 1.
    pub seq: Seq,
    /// When the origin created the op; orders concurrent register and lease writes.
    pub hlc: Hlc,
    pub body: OpBody,
}

/// What an op changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum OpBody {
    RegisterPut {
        register: String,
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
    },
    RegisterDelete {
        register: String,
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
    },
    CounterAdd {
        counter: String,
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        delta: i64,
    },
    LeaseSet {
        lease: String,
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        holder: Option<String>,
        token: u64,
        expires_at_ms: u64,
    },
}

/// Why bytes could not be decoded as an op.
#[derive(Debug, thiserror::Error)]
#[error("malformed op encoding: {0}")]
pub struct DecodeError(#[from] postcard::Error);

impl Op {
    /// The canonical bytes of the op: the same op always encodes to the same bytes.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("ops always encode")
    }

    pub fn decode(bytes: &[u8]) -> Result<Op, DecodeError> {
        Ok(postcard::from_bytes(bytes)?)
    }

    pub fn token(&self) -> Token {
        Token { origin: self.origin, seq: self.seq }
    }
}

/// The content address of encoded op bytes (or any raw blob): CIDv1, raw codec, blake3-256.
pub fn raw_cid(bytes: &[u8]) -> Cid {
    Cid::new_v1(RAW_CODEC, Code::Blake3_256.digest(bytes))
}

/// The CID of op bytes whose blake3 digest is already known (saves hashing twice on the hot path).
pub fn cid_from_digest(digest: &[u8; 32]) -> Cid {
    let mh = cid::multihash::Multihash::<64>::wrap(u64::from(Code::Blake3_256), digest).expect("32 bytes fit");
    Cid::new_v1(RAW_CODEC, mh)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_is_canonical_and_cid_matches_digest() {
        let origin = libp2p::identity::Keypair::generate_ed25519().public().to_peer_id();
        let op = Op {
            origin,
            seq: Seq(7),
            hlc: Hlc::new(123, 4),
            body: OpBody::RegisterPut { register: "r".into(), key: b"k".to_vec(), value: vec![1, 2, 3] },
        };
        let bytes = op.encode();
        assert_eq!(bytes, op.clone().encode());
        assert_eq!(Op::decode(&bytes).unwrap(), op);
        assert_eq!(raw_cid(&bytes), cid_from_digest(blake3::hash(&bytes).as_bytes()));
        assert!(Op::decode(&bytes[..bytes.len() - 2]).is_err());
    }
}
