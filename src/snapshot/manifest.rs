//! The snapshot manifest, its canonical encoding and its signature.

use std::collections::{BTreeMap, BTreeSet};

use cid::Cid;
use multihash_codetable::Code;
use serde::{Deserialize, Serialize};

use super::chunk::Kind;
use super::{FORMAT, MAX_CHUNK_BYTES, MAX_CHUNK_RAW_BYTES, MAX_MANIFEST_BYTES};
use crate::ids::{Origin, Seq, StateRoot};
use crate::op::{public_key_of, raw_cid, ChainHash, Signer, RAW_CODEC};

/// What a snapshot holds. Encoded canonically with postcard (maps are `BTreeMap`s); its CID is the
/// raw CID of those bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`FORMAT`] of the writer; a reader refuses formats it does not know.
    pub format: u32,
    /// The cluster the state belongs to, so a snapshot is never installed across clusters.
    pub cluster: String,
    /// The node that made the snapshot and signed the manifest.
    pub creator: Origin,
    /// The creator's wall clock when it made the snapshot; informational only.
    pub created_at_ms: u64,
    /// Per origin, the highest seq whose effects the state holds.
    pub version_vector: crate::store::VersionVector,
    /// Per origin, the chain hash at its seq in `version_vector`, so ops replayed after an install
    /// can be checked to continue exactly this history.
    pub heads: BTreeMap<Origin, ChainHash>,
    /// Root of the state the chunks hold.
    pub state_root: StateRoot,
    /// The collections in the state, named by kind and name (never by position).
    pub collections: Vec<CollectionInfo>,
    /// The chunks, in the order they were written.
    pub chunks: Vec<ChunkRef>,
}

/// One named collection of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CollectionInfo {
    pub kind: Kind,
    pub name: String,
    /// Number of entries (keys, tombstones included) of the collection in the snapshot.
    pub entries: u64,
}

/// A snapshot in brief, as a holder advertises it in its digest (see `sync::choose_snapshot`): how
/// many entries it holds and the version vector it was made at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotBrief {
    pub entries: u64,
    pub version_vector: crate::store::VersionVector,
}

/// A chunk as the manifest lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    /// Raw-codec blake3 CID of the compressed bytes.
    pub cid: Cid,
    /// Compressed size in bytes.
    pub size: u64,
    /// Decompressed size in bytes: the decoder allocates no more than this.
    pub raw_size: u64,
}

/// A manifest in its canonical bytes with the creator's signature over them. This is what is stored
/// and what moves between nodes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedManifest {
    #[serde(with = "serde_bytes")]
    pub manifest_bytes: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

/// Domain separation: a manifest signature can never be taken for a signed head or anything else.
const MANIFEST_DOMAIN: &[u8] = b"peersync/snapshot-manifest/v1";

/// Why a manifest was refused. Every variant means its sender (or its creator) sent something wrong.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest is {0} bytes, more than the limit of {MAX_MANIFEST_BYTES}")]
    TooLarge(usize),
    #[error("manifest does not decode: {0}")]
    Malformed(String),
    #[error("manifest bytes are not in canonical encoding")]
    NotCanonical,
    #[error("manifest has format {0}; this build reads format {FORMAT}")]
    Format(u32),
    #[error("manifest creator {0} does not embed an ed25519 public key")]
    NoPublicKey(Origin),
    #[error("manifest signature does not verify against its creator {0}")]
    BadSignature(Origin),
    #[error("manifest names {0} as its creator, but another key was asked to sign it")]
    WrongSigner(Origin),
    #[error("manifest is inconsistent: {0}")]
    Invalid(String),
}

impl Manifest {
    /// The canonical bytes of the manifest.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("manifests always encode")
    }

    /// Signs the canonical bytes with the creator's key.
    pub fn sign(&self, signer: &Signer) -> Result<SignedManifest, ManifestError> {
        if signer.origin() != self.creator {
            return Err(ManifestError::WrongSigner(self.creator));
        }
        self.validate()?;
        let manifest_bytes = self.encode();
        let signature = signer.sign_in_domain(MANIFEST_DOMAIN, &manifest_bytes);
        Ok(SignedManifest { manifest_bytes, signature })
    }

    /// Total compressed bytes of the chunks.
    pub fn compressed_bytes(&self) -> u64 {
        self.chunks.iter().map(|c| c.size).sum()
    }

    /// Total raw bytes of the chunks.
    pub fn raw_bytes(&self) -> u64 {
        self.chunks.iter().map(|c| c.raw_size).sum()
    }

    /// Total entries over the collections.
    pub fn entries(&self) -> u64 {
        self.collections.iter().map(|c| c.entries).sum()
    }

    /// What a node far behind needs to weigh this snapshot against replay.
    pub fn brief(&self) -> SnapshotBrief {
        SnapshotBrief { entries: self.entries(), version_vector: self.version_vector.clone() }
    }

    /// Checks what can be checked without the chunks.
    fn validate(&self) -> Result<(), ManifestError> {
        if self.format != FORMAT {
            return Err(ManifestError::Format(self.format));
        }
        let invalid = |m: String| Err(ManifestError::Invalid(m));
        let vv_origins: BTreeSet<_> = self.version_vector.0.keys().collect();
        let head_origins: BTreeSet<_> = self.heads.keys().collect();
        if vv_origins != head_origins {
            return invalid("the version vector and the heads name different origins".into());
        }
        if let Some((o, _)) = self.version_vector.0.iter().find(|(_, s)| **s == Seq::ZERO) {
            return invalid(format!("origin {o} is listed at seq 0"));
        }
        let mut names = BTreeSet::new();
        for c in &self.collections {
            if !names.insert((c.kind, c.name.as_str())) {
                return invalid(format!("collection {:?} {:?} is listed twice", c.kind, c.name));
            }
        }
        let mut cids = BTreeSet::new();
        for (i, c) in self.chunks.iter().enumerate() {
            if c.cid.version() != cid::Version::V1
                || c.cid.codec() != RAW_CODEC
                || c.cid.hash().code() != u64::from(Code::Blake3_256)
            {
                return invalid(format!("chunk {i} is not named by a raw blake3 CIDv1"));
            }
            if c.size == 0 || c.size > MAX_CHUNK_BYTES || c.raw_size == 0 || c.raw_size > MAX_CHUNK_RAW_BYTES {
                return invalid(format!("chunk {i} has sizes {} / {} raw, out of range", c.size, c.raw_size));
            }
            if !cids.insert(c.cid) {
                return invalid(format!("chunk {} is listed twice", c.cid));
            }
        }
        if self.chunks.is_empty() != (self.entries() == 0) {
            return invalid("the chunks and the collection counts disagree on whether the state is empty".into());
        }
        Ok(())
    }
}

impl SignedManifest {
    /// The manifest's content address: raw CID of its canonical bytes.
    pub fn cid(&self) -> Cid {
        raw_cid(&self.manifest_bytes)
    }

    /// Bytes to store or send.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("signed manifests always encode")
    }

    /// Decodes stored or received bytes, without verifying them (see [`SignedManifest::verify`]).
    pub fn decode(bytes: &[u8]) -> Result<SignedManifest, ManifestError> {
        if bytes.len() > MAX_MANIFEST_BYTES + 1024 {
            return Err(ManifestError::TooLarge(bytes.len()));
        }
        let (signed, rest) =
            postcard::take_from_bytes::<SignedManifest>(bytes).map_err(|e| ManifestError::Malformed(e.to_string()))?;
        if !rest.is_empty() {
            return Err(ManifestError::Malformed(format!("{} trailing bytes", rest.len())));
        }
        Ok(signed)
    }

    /// Decodes the manifest and checks its signature by the creator it names, its format and its
    /// internal consistency. Whether the creator is trusted, and the cluster, are for the caller.
    pub fn verify(&self) -> Result<Manifest, ManifestError> {
        if self.manifest_bytes.len() > MAX_MANIFEST_BYTES {
            return Err(ManifestError::TooLarge(self.manifest_bytes.len()));
        }
        let manifest: Manifest =
            postcard::from_bytes(&self.manifest_bytes).map_err(|e| ManifestError::Malformed(e.to_string()))?;
        // One manifest, one CID: trailing or overlong encodings would give the same manifest many names.
        if manifest.encode() != self.manifest_bytes {
            return Err(ManifestError::NotCanonical);
        }
        let key = public_key_of(&manifest.creator).map_err(|_| ManifestError::NoPublicKey(manifest.creator))?;
        let mut msg = Vec::with_capacity(MANIFEST_DOMAIN.len() + self.manifest_bytes.len());
        msg.extend_from_slice(MANIFEST_DOMAIN);
        msg.extend_from_slice(&self.manifest_bytes);
        if !key.verify(&msg, &self.signature) {
            return Err(ManifestError::BadSignature(manifest.creator));
        }
        manifest.validate()?;
        Ok(manifest)
    }

    /// Decodes the manifest without checking anything: only for manifests this store verified before
    /// keeping them.
    pub(crate) fn manifest_unverified(&self) -> Result<Manifest, ManifestError> {
        postcard::from_bytes(&self.manifest_bytes).map_err(|e| ManifestError::Malformed(e.to_string()))
    }
}
