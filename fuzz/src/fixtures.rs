//! Well-formed peer data made from fixed keys: op chains with a signed head at every seq, snapshots
//! (signed manifest and chunks), certificates and revocations. The seed corpora and the engine
//! target build on them, so both start from what real peers send.

use std::collections::BTreeMap;

use cid::Cid;
use libp2p::identity::Keypair;
use libp2p::PeerId;
use peersync::crdt::Hlc;
use peersync::ids::{Role, Seq, StateRoot};
use peersync::op::{ChainHash, Op, OpBatch, OpBody, SignedHead, Signer};
use peersync::snapshot::{
    ChunkBuilder, ChunkRef, CollectionInfo, Kind, Manifest, SignedManifest, SnapshotBrief, StateEntry, FORMAT,
};
use peersync::store::VersionVector;
use serde_bytes::ByteBuf;

/// Ops in each fixture chain.
pub const CHAIN_LEN: u64 = 48;

/// One origin's log: its op bytes, its chain value and a signed head at every seq.
pub struct Chain {
    pub origin: PeerId,
    /// `ops[i]` is the op at seq `i + 1`.
    pub ops: Vec<Vec<u8>>,
    /// `chains[s]` is the chain value at seq `s` (`chains[0]` is genesis).
    pub chains: Vec<ChainHash>,
    /// `heads[s]` is the signed head at seq `s` (`heads[0]` is unused).
    pub heads: Vec<SignedHead>,
}

fn body(seq: u64) -> OpBody {
    let key = format!("k{}", seq % 5).into_bytes();
    match seq % 4 {
        0 => OpBody::RegisterPut { register: "r".into(), key, value: vec![seq as u8; (seq % 7) as usize] },
        1 => OpBody::CounterAdd { counter: "c".into(), key, delta: seq as i64 - 20 },
        2 => OpBody::LeaseSet {
            lease: "l".into(),
            key,
            holder: Some(format!("w{seq}")),
            token: seq,
            expires_at_ms: 1_000 + seq,
        },
        _ => OpBody::RegisterDelete { register: "r".into(), key },
    }
}

impl Chain {
    pub fn new(signer: &Signer, len: u64) -> Chain {
        let origin = signer.origin();
        let mut ops = Vec::new();
        let mut chains = vec![ChainHash::GENESIS];
        let mut heads = vec![signer.sign_head(Seq(0), ChainHash::GENESIS)];
        for seq in 1..=len {
            let op = Op { origin, seq: Seq(seq), hlc: Hlc::new(1_000 + seq, 0), body: body(seq) };
            let bytes = op.encode();
            let chain = chains.last().unwrap().extend(blake3::hash(&bytes).as_bytes());
            heads.push(signer.sign_head(Seq(seq), chain));
            chains.push(chain);
            ops.push(bytes);
        }
        Chain { origin, ops, chains, heads }
    }

    pub fn len(&self) -> u64 {
        self.ops.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// The genuine batch of ops `after + 1 ..= after + n` (clamped to the chain).
    pub fn batch(&self, after: u64, n: u64) -> Option<OpBatch> {
        let after = after.min(self.len());
        let last = (after + n).min(self.len());
        if last <= after {
            return None;
        }
        let ops = self.ops[after as usize..last as usize].iter().map(|b| ByteBuf::from(b.clone())).collect();
        Some(OpBatch { after: Seq(after), ops, head: self.heads[last as usize].clone() })
    }

    /// Whether `batch` is exactly a stretch of this chain with its genuine head.
    pub fn is_genuine(&self, batch: &OpBatch) -> bool {
        let after = batch.after.0;
        let Some(last) = after.checked_add(batch.ops.len() as u64) else { return false };
        if batch.ops.is_empty() || last > self.len() {
            return false;
        }
        batch.head == self.heads[last as usize]
            && batch.ops.iter().zip(&self.ops[after as usize..last as usize]).all(|(a, b)| a.as_slice() == b.as_slice())
    }
}

/// The state root the fixtures give a version vector (a stand-in for the store's real root: equal
/// vectors have equal roots unless a store is told it diverged).
pub fn root_of(vv: &VersionVector) -> StateRoot {
    StateRoot(*blake3::hash(&postcard::to_stdvec(vv).unwrap()).as_bytes())
}

/// A snapshot: its signed manifest, CID and chunks.
pub struct Snapshot {
    pub signed: SignedManifest,
    pub bytes: Vec<u8>,
    pub cid: Cid,
    pub manifest: Manifest,
    pub chunks: Vec<(ChunkRef, Vec<u8>)>,
}

impl Snapshot {
    /// A snapshot by `creator` of the state at `vv` (heads from `chains`), with `entries` register
    /// entries cut into chunks of `chunk_limit` raw bytes.
    pub fn new(
        creator: &Signer,
        cluster: &str,
        vv: &[(usize, u64)],
        chains: &[Chain],
        entries: u32,
        chunk_limit: u64,
    ) -> Snapshot {
        let version_vector = VersionVector(vv.iter().map(|(i, s)| (chains[*i].origin, Seq(*s))).collect());
        let heads: BTreeMap<PeerId, ChainHash> =
            vv.iter().map(|(i, s)| (chains[*i].origin, chains[*i].chains[*s as usize])).collect();
        let mut builder = ChunkBuilder::new(chunk_limit);
        let mut chunks = Vec::new();
        for i in 0..entries {
            let entry = StateEntry {
                kind: Kind::Register,
                collection: "r".into(),
                key: format!("key-{i}").into_bytes(),
                value: vec![i as u8; 16 + (i % 13) as usize],
            };
            chunks.extend(builder.push(&entry).unwrap());
        }
        chunks.extend(builder.finish().unwrap());
        let manifest = Manifest {
            format: FORMAT,
            cluster: cluster.into(),
            creator: creator.origin(),
            created_at_ms: 1_700_000_000_000,
            state_root: root_of(&version_vector),
            version_vector,
            heads,
            collections: if entries > 0 {
                vec![CollectionInfo { kind: Kind::Register, name: "r".into(), entries: entries as u64 }]
            } else {
                vec![]
            },
            chunks: chunks.iter().map(|c| c.chunk_ref()).collect(),
        };
        let signed = manifest.sign(creator).expect("the fixture manifest is valid");
        Snapshot {
            bytes: signed.encode(),
            cid: signed.cid(),
            chunks: chunks.into_iter().map(|c| (c.chunk_ref(), c.bytes)).collect(),
            signed,
            manifest,
        }
    }

    pub fn brief(&self) -> SnapshotBrief {
        self.manifest.brief()
    }
}

/// A signer for fixture key `n` (see [`crate::key`]).
pub fn signer_of(n: u8) -> Signer {
    Signer::new(crate::key(n))
}

/// A certificate of the fixtures' authority.
pub fn cert(
    peer: PeerId,
    role: Role,
    not_before_ms: u64,
    not_after_ms: u64,
    serial: u64,
) -> peersync::cert::Certificate {
    peersync::cert::Certificate::issue(crate::authority_key(), peer, role, not_before_ms, not_after_ms, serial)
}

/// A certificate of another authority.
pub fn foreign_cert(peer: PeerId, role: Role) -> peersync::cert::Certificate {
    let other: Keypair = crate::key(201);
    peersync::cert::Certificate::issue(&other, peer, role, 0, u64::MAX, 1)
}
