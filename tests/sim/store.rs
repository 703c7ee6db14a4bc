//! The simulator's disk: an in-memory store behind the engine's [`StoreView`] and the serving
//! [`ServeStore`] traits, with the store's own rules and nothing of the engine's.
//!
//! - The op log keeps, per origin, rows of verified ops ending at signed heads (one row per applied
//!   batch, as `store::log` does), each op with the chain hash after it, above a log floor. Replay
//!   is served from rows, from partway into the first one if need be.
//! - The state is one collection of counters: each key maps origin -> (seq of its last op on the
//!   key, sum of its deltas), a join-semilattice per origin (the higher seq wins). The state root is
//!   the store's own bucket hashing (`store::root`) over those entries, so two stores at one version
//!   vector have one root, and a snapshot's entries can be checked against its signed root.
//! - Snapshots are real: entries cut into zstd chunks by `ChunkBuilder`, a `Manifest` signed by the
//!   creator; chunks are checked against the manifest on stage (`decode_chunk`), and an install
//!   checks the staged entries against the manifest's root before they replace or join the state.
//! - Chunks staged without `durable` since the last durable one are lost in a crash.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet};

use cid::Cid;
use peersync::crdt::{Hlc, HlcClock};
use peersync::ids::{Origin, Seq, StateRoot};
use peersync::op::{ChainHash, Op, OpBatch, OpBody, SignedHead, Signer, VerifiedBatch};
use peersync::snapshot::{
    decode_chunk, ChunkBuilder, ChunkRef, CollectionInfo, Kind, Manifest, SignedManifest, SnapshotBrief, StateEntry,
    FORMAT,
};
use peersync::store::root::{entry_hash, identity_hash, EntryKind};
use peersync::store::{OriginProgress, VersionVector};
use peersync::sync::{ChunkVerdict, ServeStore, StoreView};
use serde_bytes::ByteBuf;

/// The one collection of the simulated state.
pub const COLLECTION: &str = "c";
/// State-root buckets. The node's store has 4096 (`store::root::BUCKETS`); the engine takes any
/// number, and hashing 128 KiB at every commit of every simulated node would be most of a run.
const BUCKETS: usize = 64;

/// Bucket hashes of a state, as `store::root::Buckets` makes them: each bucket the XOR of its
/// entries' hashes (entries hashed by `store::root`), the root a hash over the buckets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Buckets(pub Vec<[u8; 32]>);

impl Default for Buckets {
    fn default() -> Self {
        Buckets(vec![[0; 32]; BUCKETS])
    }
}

fn bucket_of(identity: &[u8; 32]) -> usize {
    identity[0] as usize % BUCKETS
}

impl Buckets {
    pub fn toggle(&mut self, identity: &[u8; 32], entry: &[u8; 32]) {
        for (x, y) in self.0[bucket_of(identity)].iter_mut().zip(entry) {
            *x ^= y;
        }
    }

    pub fn root(&self) -> StateRoot {
        let mut h = blake3::Hasher::new();
        for b in &self.0 {
            h.update(b);
        }
        StateRoot(*h.finalize().as_bytes())
    }

    /// The buckets of a state.
    pub fn of(state: &BTreeMap<Vec<u8>, Counter>) -> Buckets {
        let mut b = Buckets::default();
        for (k, v) in state {
            let id = identity(k);
            b.toggle(&id, &entry_hash(&id, &encode_counter(v)));
        }
        b
    }
}
/// Snapshots kept, as the node keeps them.
const KEEP_SNAPSHOTS: usize = 2;

/// One row of the log: ops (chain hash after each, canonical bytes) ending at a signed head.
#[derive(Debug, Clone)]
struct Row {
    ops: Vec<(ChainHash, Vec<u8>)>,
    signature: Vec<u8>,
}

#[derive(Debug, Clone, Default)]
struct OriginLog {
    progress: OriginProgress,
    /// Ops up to here were compacted away (or came in a snapshot); the chain hash there.
    floor: (Seq, ChainHash),
    /// Rows keyed by the seq of their last op, all above the floor.
    rows: BTreeMap<Seq, Row>,
}

/// A counter entry: origin -> (seq of its last op on this key, sum of its deltas).
pub type Counter = BTreeMap<Origin, (u64, i64)>;

#[derive(Debug, Clone)]
struct Held {
    cid: Cid,
    signed: SignedManifest,
    manifest: Manifest,
}

/// Why a verified batch did not commit (the writer's `RemoteOutcome`s other than applied).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    Gap { have: Seq, after: Seq },
    Fork { at: Seq },
}

#[derive(Debug, Default)]
pub struct MemStore {
    logs: BTreeMap<Origin, OriginLog>,
    state: BTreeMap<Vec<u8>, Counter>,
    /// Each entry's hash as folded into the buckets (to fold it out when the entry changes).
    hashes: BTreeMap<Vec<u8>, [u8; 32]>,
    buckets: Buckets,
    /// The root of `buckets`, computed when first asked after a change.
    root: Cell<Option<StateRoot>>,
    /// The version vector, computed when first asked after a change.
    vv: RefCell<Option<VersionVector>>,
    /// Snapshots held, oldest first.
    snapshots: Vec<Held>,
    chunks: BTreeMap<Cid, Vec<u8>>,
    /// Chunks kept without a durable commit since the last durable one: lost in a crash.
    undurable: Vec<Cid>,
    /// The node's HLC, as the store keeps it: every local op is stamped after every op seen.
    clock: HlcClock,
    /// Where the engine last asked tombstones to be collected up to (the simulated state has
    /// none; the simulator checks that the stamp was safe).
    collected: Hlc,
}

fn encode_counter(c: &Counter) -> Vec<u8> {
    postcard::to_stdvec(c).expect("counters encode")
}

fn identity(key: &[u8]) -> [u8; 32] {
    identity_hash(EntryKind::Counter, COLLECTION, key)
}

/// Joins `theirs` into `mine`: per origin the later op wins.
fn join(mine: &mut Counter, theirs: &Counter) {
    for (o, (seq, sum)) in theirs {
        let e = mine.entry(*o).or_insert((0, 0));
        if *seq > e.0 {
            *e = (*seq, *sum);
        }
    }
}

/// The state a set of ops gives, applied in seq order per origin: what every store must hold at the
/// same vector (the oracle of the final checks).
pub fn state_of(ops: &BTreeMap<Origin, Vec<(Vec<u8>, i64)>>, vv: &VersionVector) -> BTreeMap<Vec<u8>, Counter> {
    let mut state: BTreeMap<Vec<u8>, Counter> = BTreeMap::new();
    for (origin, log) in ops {
        for (i, (key, delta)) in log.iter().take(vv.get(origin).0 as usize).enumerate() {
            let e = state.entry(key.clone()).or_default().entry(*origin).or_insert((0, 0));
            *e = (i as u64 + 1, e.1 + delta);
        }
    }
    state
}

impl MemStore {
    fn vv(&self) -> VersionVector {
        let mut cached = self.vv.borrow_mut();
        cached
            .get_or_insert_with(|| {
                VersionVector(
                    self.logs.iter().filter(|(_, l)| l.progress.seq.0 > 0).map(|(o, l)| (*o, l.progress.seq)).collect(),
                )
            })
            .clone()
    }

    pub fn state(&self) -> &BTreeMap<Vec<u8>, Counter> {
        &self.state
    }

    /// Replaces a key's entry, keeping the buckets in step.
    fn put(&mut self, key: Vec<u8>, value: Counter) {
        let id = identity(&key);
        let hash = entry_hash(&id, &encode_counter(&value));
        if let Some(old) = self.hashes.insert(key.clone(), hash) {
            self.buckets.toggle(&id, &old);
        }
        self.buckets.toggle(&id, &hash);
        self.state.insert(key, value);
        self.root.set(None);
    }

    fn apply_op(&mut self, op: &Op) {
        let OpBody::CounterAdd { key, delta, .. } = &op.body else { panic!("the simulator writes counter ops only") };
        self.clock.observe(op.hlc);
        let mut c = self.state.get(key).cloned().unwrap_or_default();
        let e = c.entry(op.origin).or_insert((0, 0));
        *e = (op.seq.0, e.1 + delta);
        self.put(key.clone(), c);
    }

    /// Writes local ops of `signer` (a primary) as one signed batch: committed at once, like the
    /// writer's local path. Returns the batch to publish.
    pub fn write_local(&mut self, signer: &Signer, ops: &[(Vec<u8>, i64)], wall_ms: u64) -> OpBatch {
        let origin = signer.origin();
        let stamps: Vec<Hlc> = ops.iter().map(|_| self.clock.now(wall_ms)).collect();
        let log = self.logs.entry(origin).or_default();
        let after = log.progress.seq;
        let mut chain = log.progress.chain;
        let mut row = Vec::new();
        let mut verified = Vec::new();
        for (i, (key, delta)) in ops.iter().enumerate() {
            let op = Op {
                origin,
                seq: Seq(after.0 + 1 + i as u64),
                hlc: stamps[i],
                body: OpBody::CounterAdd { counter: COLLECTION.into(), key: key.clone(), delta: *delta },
            };
            let bytes = op.encode();
            chain = chain.extend(blake3::hash(&bytes).as_bytes());
            row.push((chain, bytes));
            verified.push(op);
        }
        let head = signer.sign_head(Seq(after.0 + ops.len() as u64), chain);
        let batch =
            OpBatch { after, ops: row.iter().map(|(_, b)| ByteBuf::from(b.clone())).collect(), head: head.clone() };
        log.rows.insert(head.seq, Row { ops: row, signature: head.signature.clone() });
        log.progress = OriginProgress { seq: head.seq, chain };
        self.vv.replace(None);
        for op in &verified {
            self.apply_op(op);
        }
        batch
    }

    /// The chain hash held at `seq` of `origin`, if the log (or its floor) still knows it.
    pub fn chain_at(&self, origin: &Origin, seq: Seq) -> Option<ChainHash> {
        if seq == Seq::ZERO {
            return Some(ChainHash::GENESIS);
        }
        let log = self.logs.get(origin)?;
        if log.progress.seq == seq {
            return Some(log.progress.chain);
        }
        if log.floor.0 == seq {
            return Some(log.floor.1);
        }
        let (last, row) = log.rows.range(seq..).next()?;
        let first = last.0 + 1 - row.ops.len() as u64;
        (seq.0 >= first).then(|| row.ops[(seq.0 - first) as usize].0)
    }

    /// Commits the part of a verified batch not held yet, as the writer's remote path does.
    /// `Ok(ops)` applied (0 for a duplicate).
    pub fn append_verified(&mut self, batch: VerifiedBatch) -> Result<usize, Refused> {
        let origin = batch.origin;
        let have = self.logs.get(&origin).map(|l| l.progress).unwrap_or_default();
        let after = Seq(batch.ops[0].op.seq.0 - 1);
        if batch.head.seq <= have.seq {
            return Ok(0);
        }
        if after > have.seq {
            return Err(Refused::Gap { have: have.seq, after });
        }
        let new = &batch.ops[(have.seq.0 - after.0) as usize..];
        if have.chain.extend(&new[0].digest) != new[0].chain {
            return Err(Refused::Fork { at: new[0].op.seq });
        }
        for v in new {
            self.apply_op(&v.op);
        }
        let log = self.logs.entry(origin).or_default();
        let row =
            Row { ops: new.iter().map(|v| (v.chain, v.bytes.clone())).collect(), signature: batch.head.signature };
        log.rows.insert(batch.head.seq, row);
        log.progress = OriginProgress { seq: batch.head.seq, chain: batch.head.head };
        self.vv.replace(None);
        Ok(new.len())
    }

    /// Makes a snapshot of the state, signed by `signer`, in chunks of at most `chunk_raw` raw bytes.
    pub fn create_snapshot(&mut self, signer: &Signer, cluster: &str, chunk_raw: u64) -> Cid {
        let mut builder = ChunkBuilder::new(chunk_raw);
        let mut chunks = Vec::new();
        for (key, value) in &self.state {
            let entry = StateEntry {
                kind: Kind::Counter,
                collection: COLLECTION.into(),
                key: key.clone(),
                value: encode_counter(value),
            };
            chunks.extend(builder.push(&entry).expect("small entries chunk"));
        }
        chunks.extend(builder.finish().expect("small entries chunk"));
        let vv = self.vv();
        let manifest = Manifest {
            format: FORMAT,
            cluster: cluster.to_owned(),
            creator: signer.origin(),
            created_at_ms: 0,
            heads: vv.0.keys().map(|o| (*o, self.logs[o].progress.chain)).collect(),
            version_vector: vv,
            state_root: self.buckets.root(),
            collections: if self.state.is_empty() {
                Vec::new()
            } else {
                vec![CollectionInfo { kind: Kind::Counter, name: COLLECTION.into(), entries: self.state.len() as u64 }]
            },
            chunks: chunks.iter().map(|c| c.chunk_ref()).collect(),
        };
        for c in chunks {
            self.chunks.insert(c.cid, c.bytes);
        }
        let signed = manifest.sign(signer).expect("the creator signs");
        let cid = signed.cid();
        self.keep_snapshot(Held { cid, signed, manifest });
        cid
    }

    fn keep_snapshot(&mut self, held: Held) {
        if self.snapshots.iter().any(|h| h.cid == held.cid) {
            return;
        }
        self.snapshots.push(held);
        if self.snapshots.len() > KEEP_SNAPSHOTS {
            let gone = self.snapshots.remove(0);
            let kept: BTreeSet<Cid> =
                self.snapshots.iter().flat_map(|h| h.manifest.chunks.iter().map(|c| c.cid)).collect();
            for c in gone.manifest.chunks.iter().filter(|c| !kept.contains(&c.cid)) {
                self.chunks.remove(&c.cid);
            }
        }
    }

    /// Compacts each origin's log down to `retain` ops, in whole rows, never past the latest snapshot.
    /// Returns the ops deleted.
    pub fn compact(&mut self, retain: u64) -> u64 {
        let Some(latest) = self.snapshots.last() else { return 0 };
        let limit = latest.manifest.version_vector.clone();
        let mut deleted = 0;
        for (origin, log) in &mut self.logs {
            let target = limit.get(origin).min(Seq(log.progress.seq.0.saturating_sub(retain)));
            let Some((&end, _)) = log.rows.range(..=target).next_back() else { continue };
            let row = &log.rows[&end];
            log.floor = (end, row.ops.last().expect("rows are never empty").0);
            let gone: Vec<Seq> = log.rows.range(..=end).map(|(k, _)| *k).collect();
            for k in gone {
                deleted += log.rows.remove(&k).map_or(0, |r| r.ops.len() as u64);
            }
        }
        deleted
    }

    /// Checks a chunk against its manifest entry and keeps it when good.
    pub fn stage(&mut self, chunk: &ChunkRef, bytes: Vec<u8>, durable: bool) -> ChunkVerdict {
        if decode_chunk(chunk, &bytes).is_err() {
            return ChunkVerdict::Corrupt;
        }
        if self.chunks.insert(chunk.cid, bytes).is_none() && !durable {
            self.undurable.push(chunk.cid);
        }
        if durable {
            self.undurable.clear();
        }
        ChunkVerdict::Stored
    }

    /// Installs a pulled snapshot: its staged entries must hash to its signed root; they replace an
    /// empty state or join the state there is; the vector becomes the pointwise max, and origins the
    /// snapshot is ahead on get their log floor (and chain) at the snapshot's seq.
    pub fn install(&mut self, signed: &SignedManifest) -> Result<(), String> {
        let manifest = signed.verify().map_err(|e| e.to_string())?;
        let mut entries = Vec::new();
        for r in &manifest.chunks {
            let bytes = self.chunks.get(&r.cid).ok_or_else(|| format!("chunk {} is not staged", r.cid))?;
            entries.extend(decode_chunk(r, bytes).map_err(|e| e.to_string())?);
        }
        let mut buckets = Buckets::default();
        let mut decoded = Vec::new();
        for e in entries {
            if e.kind != Kind::Counter || e.collection != COLLECTION {
                return Err(format!("unexpected entry {:?} {:?}", e.kind, e.collection));
            }
            let id = identity(&e.key);
            buckets.toggle(&id, &entry_hash(&id, &e.value));
            let value: Counter = postcard::from_bytes(&e.value).map_err(|e| e.to_string())?;
            decoded.push((e.key, value));
        }
        if buckets.root() != manifest.state_root {
            return Err("the staged entries do not hash to the manifest's state root".into());
        }
        for (key, value) in decoded {
            let mut mine = self.state.get(&key).cloned().unwrap_or_default();
            join(&mut mine, &value);
            self.put(key, mine);
        }
        for (origin, seq) in &manifest.version_vector.0 {
            let log = self.logs.entry(*origin).or_default();
            if *seq > log.progress.seq {
                let chain = manifest.heads[origin];
                log.progress = OriginProgress { seq: *seq, chain };
                log.floor = (*seq, chain);
                log.rows.clear();
            }
        }
        self.vv.replace(None);
        self.keep_snapshot(Held { cid: signed.cid(), signed: signed.clone(), manifest });
        Ok(())
    }

    /// Joins a peer's entries into the state (divergence repair).
    pub fn merge(&mut self, entries: &[StateEntry]) {
        for e in entries {
            let Ok(theirs) = postcard::from_bytes::<Counter>(&e.value) else { continue };
            let mut mine = self.state.get(&e.key).cloned().unwrap_or_default();
            join(&mut mine, &theirs);
            self.put(e.key.clone(), mine);
        }
    }

    /// Deletes held chunks no held snapshot lists and `keep` does not name.
    pub fn collect_chunks(&mut self, keep: &[Cid]) {
        let listed: BTreeSet<Cid> = self
            .snapshots
            .iter()
            .flat_map(|h| h.manifest.chunks.iter().map(|c| c.cid))
            .chain(keep.iter().copied())
            .collect();
        self.chunks.retain(|c, _| listed.contains(c));
    }

    /// What a crash loses: chunks kept since the last durable commit (unless a snapshot lists them).
    pub fn crash(&mut self) {
        let listed: BTreeSet<Cid> =
            self.snapshots.iter().flat_map(|h| h.manifest.chunks.iter().map(|c| c.cid)).collect();
        for c in std::mem::take(&mut self.undurable) {
            if !listed.contains(&c) {
                self.chunks.remove(&c);
            }
        }
    }
}

impl StoreView for MemStore {
    fn version_vector(&self) -> VersionVector {
        self.vv()
    }

    fn state_root(&self) -> (StateRoot, VersionVector) {
        let root = self.root.get().unwrap_or_else(|| {
            let r = self.buckets.root();
            self.root.set(Some(r));
            r
        });
        (root, self.vv())
    }

    fn progress(&self, origin: &Origin) -> OriginProgress {
        self.logs.get(origin).map(|l| l.progress).unwrap_or_default()
    }

    fn log_floors(&self) -> VersionVector {
        VersionVector(self.logs.iter().filter(|(_, l)| l.floor.0 .0 > 0).map(|(o, l)| (*o, l.floor.0)).collect())
    }

    fn latest_snapshot(&self) -> Option<(Cid, SnapshotBrief)> {
        self.snapshots.last().map(|h| (h.cid, h.manifest.brief()))
    }

    fn has_chunk(&self, cid: &Cid) -> bool {
        self.chunks.contains_key(cid)
    }

    fn bucket_hashes(&self) -> Vec<[u8; 32]> {
        self.buckets.0.clone()
    }

    fn clock(&self) -> Hlc {
        self.clock.last()
    }

    fn tombstones_collected(&self) -> Hlc {
        self.collected
    }
}

impl MemStore {
    /// Records a collection the engine asked for.
    pub fn collect_tombstones(&mut self, through: Hlc) {
        self.collected = self.collected.max(through);
    }

    /// Ops this store's log holds beyond `vv` (for origins `vv` names) stamped at or before
    /// `through`: (origin, seq, stamp).
    pub fn ops_beyond(&self, vv: &VersionVector, through: Hlc) -> Vec<(Origin, Seq, Hlc)> {
        let mut found = Vec::new();
        for (origin, have) in &vv.0 {
            let Some(log) = self.logs.get(origin) else { continue };
            for row in log.rows.range(Seq(have.0 + 1)..).map(|(_, r)| r) {
                for (_, bytes) in &row.ops {
                    let op = Op::decode(bytes).expect("the simulated log holds valid ops");
                    if op.seq > *have && op.hlc <= through {
                        found.push((*origin, op.seq, op.hlc));
                    }
                }
            }
        }
        found
    }
}

impl ServeStore for MemStore {
    fn read_log(
        &self,
        origin: &Origin,
        after: Seq,
        max_ops: usize,
        max_bytes: usize,
    ) -> Result<Result<Vec<OpBatch>, Seq>, String> {
        let Some(log) = self.logs.get(origin) else { return Ok(Ok(Vec::new())) };
        if after < log.floor.0 {
            return Ok(Err(log.floor.0));
        }
        let (mut ops_total, mut bytes_total) = (0, 0);
        let mut batches = Vec::new();
        let mut start = after;
        for (end, row) in log.rows.range(after.next()..) {
            let first = end.0 + 1 - row.ops.len() as u64;
            if first > start.0 + 1 {
                break;
            }
            let ops: Vec<ByteBuf> =
                row.ops[(start.0 + 1 - first) as usize..].iter().map(|(_, b)| ByteBuf::from(b.clone())).collect();
            ops_total += ops.len();
            bytes_total += ops.iter().map(|o| o.len()).sum::<usize>();
            let head = SignedHead {
                origin: *origin,
                seq: *end,
                head: row.ops.last().expect("rows are never empty").0,
                signature: row.signature.clone(),
            };
            batches.push(OpBatch { after: start, ops, head });
            start = *end;
            if ops_total >= max_ops || bytes_total >= max_bytes {
                break;
            }
        }
        Ok(Ok(batches))
    }

    fn manifest(&self, cid: &Cid) -> Result<Option<SignedManifest>, String> {
        Ok(self.snapshots.iter().find(|h| h.cid == *cid).map(|h| h.signed.clone()))
    }

    fn chunk(&self, cid: &Cid) -> Result<Option<Vec<u8>>, String> {
        Ok(self.chunks.get(cid).cloned())
    }

    fn bucket_hashes(&self) -> Vec<[u8; 32]> {
        self.buckets.0.clone()
    }

    fn entries_in_buckets(&self, buckets: &[u32]) -> Result<Vec<StateEntry>, String> {
        let wanted: BTreeSet<usize> = buckets.iter().map(|b| *b as usize).collect();
        Ok(self
            .state
            .iter()
            .filter(|(k, _)| wanted.contains(&bucket_of(&identity(k))))
            .map(|(k, v)| StateEntry {
                kind: Kind::Counter,
                collection: COLLECTION.into(),
                key: k.clone(),
                value: encode_counter(v),
            })
            .collect())
    }
}
