//! Per-origin hash chains and the signed heads that authenticate them.

use libp2p::identity::{Keypair, PublicKey};
use serde::{Deserialize, Serialize};

use crate::ids::{Origin, Seq};

/// The chain value after some op of an origin: `blake3(previous || blake3(op bytes))`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct ChainHash(pub [u8; 32]);

impl ChainHash {
    /// The chain value before an origin's first op.
    pub const GENESIS: ChainHash = ChainHash([0; 32]);

    /// The chain value after appending an op whose blake3 digest is `op_digest`.
    pub fn extend(&self, op_digest: &[u8; 32]) -> ChainHash {
        let mut h = blake3::Hasher::new();
        h.update(&self.0);
        h.update(op_digest);
        ChainHash(*h.finalize().as_bytes())
    }
}

/// An origin's signature over its chain value at `seq`: vouches for every op up to `seq`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedHead {
    pub origin: Origin,
    pub seq: Seq,
    pub head: ChainHash,
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

/// Domain separation, so a head signature can never be mistaken for any other signed message.
const HEAD_DOMAIN: &[u8] = b"peersync/signed-head/v1";

fn head_message(origin: &Origin, seq: Seq, head: &ChainHash) -> Vec<u8> {
    let origin = origin.to_bytes();
    let mut msg = Vec::with_capacity(HEAD_DOMAIN.len() + origin.len() + 8 + 32);
    msg.extend_from_slice(HEAD_DOMAIN);
    msg.extend_from_slice(&origin);
    msg.extend_from_slice(&seq.0.to_be_bytes());
    msg.extend_from_slice(&head.0);
    msg
}

/// Why a signed head is not authentic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("origin {0} does not embed an ed25519 public key")]
    NoPublicKey(Origin),
    #[error("signature of {origin} over its head at seq {seq} does not verify")]
    BadSignature { origin: Origin, seq: Seq },
}

impl SignedHead {
    /// Checks the signature against the public key embedded in the origin's peer id.
    pub fn verify(&self) -> Result<(), AuthError> {
        let key = public_key_of(&self.origin)?;
        if key.verify(&head_message(&self.origin, self.seq, &self.head), &self.signature) {
            Ok(())
        } else {
            Err(AuthError::BadSignature { origin: self.origin, seq: self.seq })
        }
    }
}

/// The public key inlined in an ed25519 peer id (identity multihash of the protobuf-encoded key).
pub fn public_key_of(origin: &Origin) -> Result<PublicKey, AuthError> {
    let mh: &libp2p::multihash::Multihash<64> = origin.as_ref();
    if mh.code() != 0 {
        return Err(AuthError::NoPublicKey(*origin));
    }
    PublicKey::try_decode_protobuf(mh.digest()).map_err(|_| AuthError::NoPublicKey(*origin))
}

/// Signs this node's chain heads with its identity key.
#[derive(Clone)]
pub struct Signer {
    keypair: Keypair,
    origin: Origin,
}

impl Signer {
    pub fn new(keypair: Keypair) -> Self {
        let origin = keypair.public().to_peer_id();
        Signer { keypair, origin }
    }

    pub fn origin(&self) -> Origin {
        self.origin
    }

    pub fn sign_head(&self, seq: Seq, head: ChainHash) -> SignedHead {
        let signature =
            self.keypair.sign(&head_message(&self.origin, seq, &head)).expect("ed25519 signing cannot fail");
        SignedHead { origin: self.origin, seq, head, signature }
    }

    /// Signs `domain || payload`. `domain` must be a distinct, prefix-free tag per kind of signed
    /// message (like [`HEAD_DOMAIN`]), so no signature can be replayed as another kind.
    pub(crate) fn sign_in_domain(&self, domain: &[u8], payload: &[u8]) -> Vec<u8> {
        let mut msg = Vec::with_capacity(domain.len() + payload.len());
        msg.extend_from_slice(domain);
        msg.extend_from_slice(payload);
        self.keypair.sign(&msg).expect("ed25519 signing cannot fail")
    }
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer").field("origin", &self.origin).finish_non_exhaustive()
    }
}
