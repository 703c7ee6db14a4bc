//! Snapshots in the store, through the public API: create on one store, move manifest and chunks by
//! CID, install on another, replay the rest of the log; merges onto existing state; refusal of bad
//! data with nothing written; compaction and log floors; atomicity across a reopen.

use std::collections::BTreeMap;
use std::thread::JoinHandle;

use peersync::crdt::LeaseGrant;
use peersync::ids::{Origin, Seq, Token};
use peersync::op::{raw_cid, Signer};
use peersync::snapshot::{
    ChunkBuilder, ChunkError, ChunkRef, Kind, Manifest, ManifestError, SignedManifest, StateEntry,
};
use peersync::store::{
    InstallOutcome, LocalIntent, RemoteOutcome, SnapshotError, Store, StoreError, WriteHandle, WriterConfig,
    WriterError,
};

struct Node {
    store: Store,
    writer: WriteHandle,
    signer: Signer,
    join: Option<JoinHandle<()>>,
}

fn open_with(path: &std::path::Path, signer: Signer) -> Node {
    let store = Store::open(path).unwrap();
    let (events, _) = tokio::sync::broadcast::channel(1024);
    let config = WriterConfig { batch_max_ops: 4, ..Default::default() };
    let (writer, join) = store.spawn_writer(signer.clone(), config, events);
    Node { store, writer, signer, join: Some(join) }
}

fn open(dir: &tempfile::TempDir, name: &str) -> Node {
    open_with(&dir.path().join(name), Signer::new(libp2p::identity::Keypair::generate_ed25519()))
}

impl Node {
    fn origin(&self) -> Origin {
        self.signer.origin()
    }

    /// Stops the writer and drops every handle, so the database file is closed.
    async fn close(mut self) -> Signer {
        self.writer.stop().await;
        self.join.take().unwrap().join().unwrap();
        self.signer
    }
}

/// `rounds` rounds of mixed writes: registers (shared keys, so origins conflict, and deletes, so there
/// are tombstones), a shared counter, a per-origin lease and a shared lease granted with ttl 0.
async fn write(node: &Node, tag: u8, rounds: u8) {
    for i in 0..rounds {
        let mut intents = vec![
            LocalIntent::Put { register: "reg".into(), key: vec![i % 7], value: vec![tag, i] },
            LocalIntent::Put { register: format!("own-{tag}"), key: vec![i], value: vec![i; 40] },
            LocalIntent::CounterAdd { counter: "ctr".into(), key: b"hits".to_vec(), delta: i as i64 - 3 },
            LocalIntent::Lease {
                lease: "lk".into(),
                key: b"shared".to_vec(),
                grant: LeaseGrant { holder: Some(format!("h{tag}")), token: i as u64 + 1, expires_at_ms: 0 },
            },
        ];
        if i % 3 == 2 {
            intents.push(LocalIntent::Delete { register: "reg".into(), key: vec![(i + 1) % 7] });
        }
        if i == 0 {
            intents.push(LocalIntent::Lease {
                lease: "lk".into(),
                key: vec![tag],
                grant: LeaseGrant { holder: Some(format!("h{tag}")), token: 1, expires_at_ms: u64::MAX },
            });
        }
        node.writer.local(intents).await.unwrap();
    }
}

/// Replays `origin`'s ops from `from` onto `to`, batch after batch, as a puller would; stops after
/// `max_ops` ops (roughly: whole batches) or when `to` has everything.
async fn replay(from: &Store, to: &Node, origin: &Origin, max_ops: usize) {
    let mut moved = 0;
    while moved < max_ops {
        let have = to.store.version_vector().get(origin);
        let read = from.read_log(origin, have, 16, usize::MAX).unwrap();
        assert!(!read.below_floor, "replay of {origin} from {have} is below the source's floor {}", read.floor);
        if read.batches.is_empty() {
            break;
        }
        for batch in read.batches {
            let prev = to.store.chain_at(origin, batch.after).unwrap().expect("chain at the batch start");
            let verified = batch.verify(prev, 10_000).unwrap();
            moved += verified.ops.len();
            let outcome = to.writer.remote(verified).await.unwrap();
            assert!(matches!(outcome, RemoteOutcome::Applied { .. }), "{outcome:?}");
        }
    }
    // Peers' ops wait in the memtable until a flush; a snapshot made next covers them only after it.
    to.writer.persist().await.unwrap();
}

/// Copies a snapshot's manifest and chunks from one store to another, by CID, verifying each chunk.
fn copy_snapshot(from: &Store, to: &Store, cid: &cid::Cid) -> SignedManifest {
    let signed = from.snapshot_manifest(cid).unwrap().expect("manifest held");
    let manifest = signed.verify().unwrap();
    for c in to.missing_chunks(&manifest).unwrap() {
        assert!(to.put_chunk(&c, &from.snapshot_chunk(&c).unwrap().unwrap()).unwrap());
    }
    assert!(to.missing_chunks(&manifest).unwrap().is_empty());
    signed
}

fn assert_sound(store: &Store) {
    let report = store.check_log().unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}

fn refusal(e: WriterError) -> SnapshotError {
    match e {
        WriterError::Store(e) => match std::sync::Arc::try_unwrap(e).expect("sole owner") {
            StoreError::Snapshot(e) => *e,
            other => panic!("expected a refusal, got {other}"),
        },
        other => panic!("expected a refusal, got {other}"),
    }
}

#[tokio::test]
async fn snapshot_installs_on_an_empty_store_and_replay_continues_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let a = open(&dir, "a.redb");
    let p = open(&dir, "p.redb");
    write(&a, 1, 20).await;
    write(&p, 2, 15).await;
    replay(&p.store, &a, &p.origin(), usize::MAX).await;

    let info = a.store.create_snapshot(&a.signer, "test", 512).unwrap();
    assert!(info.chunks > 3, "{info:?}");
    assert_eq!((info.state_root, info.version_vector.clone()), a.store.state_root());
    assert_eq!(a.store.latest_snapshot().unwrap().unwrap().cid, info.cid);

    let b = open(&dir, "b.redb");
    let signed = copy_snapshot(&a.store, &b.store, &info.cid);
    let manifest = signed.verify().unwrap();
    assert_eq!(manifest.cluster, "test");
    assert_eq!(manifest.entries(), info.entries);
    // A caller waiting for an op the snapshot covers is woken by the install.
    let covered = Token { origin: a.origin(), seq: info.version_vector.get(&a.origin()) };
    let waiter = tokio::spawn({
        let store = b.store.clone();
        async move { store.applied(&covered).await }
    });
    let outcome = b.writer.install_snapshot(signed.clone()).await.unwrap();
    let woken = tokio::time::timeout(std::time::Duration::from_secs(30), waiter).await;
    assert_eq!(woken.expect("the install wakes the waiter").unwrap(), Ok(()));
    let InstallOutcome::Installed { cid, entries, changed, advanced } = outcome else { panic!("{outcome:?}") };
    assert_eq!((cid, entries, changed, advanced.len()), (info.cid, info.entries, info.entries, 2));
    assert_eq!(b.store.state_root(), a.store.state_root());
    assert_eq!(b.store.counter("ctr", b"hits").unwrap(), a.store.counter("ctr", b"hits").unwrap());
    assert_eq!(b.store.lease("lk", b"shared").unwrap(), a.store.lease("lk", b"shared").unwrap());
    assert_sound(&b.store);
    assert_eq!(b.store.log_len().unwrap(), 0);
    assert_eq!(b.store.log_floors().unwrap(), info.version_vector.0);
    // B serves what it installed.
    assert_eq!(b.store.snapshot_manifest(&info.cid).unwrap().unwrap(), signed);
    for c in &manifest.chunks {
        assert_eq!(b.store.snapshot_chunk(&c.cid).unwrap(), a.store.snapshot_chunk(&c.cid).unwrap());
    }
    assert_eq!(b.store.latest_snapshot().unwrap().unwrap().cid, info.cid);
    // Installing it again changes nothing.
    assert_eq!(b.writer.install_snapshot(signed).await.unwrap(), InstallOutcome::AlreadyCovered);

    // Later ops continue the snapshot's chain heads: replay onto B verifies and converges.
    write(&a, 1, 9).await;
    write(&p, 2, 6).await;
    replay(&p.store, &a, &p.origin(), usize::MAX).await;
    // A caller waiting for a replayed op is woken by the commit that applies it, not before.
    let last = Token { origin: a.origin(), seq: a.store.progress(&a.origin()).seq };
    let mut waiter = tokio::spawn({
        let store = b.store.clone();
        async move { store.applied(&last).await }
    });
    let early = tokio::time::timeout(std::time::Duration::from_millis(50), &mut waiter).await;
    assert!(early.is_err(), "woken before the op was applied: {early:?}");
    for origin in [a.origin(), p.origin()] {
        replay(&a.store, &b, &origin, usize::MAX).await;
    }
    let woken = tokio::time::timeout(std::time::Duration::from_secs(30), waiter).await;
    assert_eq!(woken.expect("the replay wakes the waiter").unwrap(), Ok(()));
    assert_eq!(b.store.state_root(), a.store.state_root());
    assert_sound(&b.store);
    // B's own writes continue after the snapshot too.
    write(&b, 3, 2).await;
    assert_sound(&b.store);
}

#[tokio::test]
async fn install_onto_overlapping_and_newer_state_equals_the_crdt_merge() {
    let dir = tempfile::tempdir().unwrap();
    let (p1, p2) = (open(&dir, "p1.redb"), open(&dir, "p2.redb"));
    write(&p1, 1, 24).await;
    write(&p2, 2, 12).await;
    let a = open(&dir, "a.redb");
    replay(&p1.store, &a, &p1.origin(), usize::MAX).await;
    replay(&p2.store, &a, &p2.origin(), usize::MAX).await;
    let info = a.store.create_snapshot(&a.signer, "test", 700).unwrap();
    write(&p2, 2, 10).await;

    // B: part of p1's log (behind the snapshot), all of p2's (ahead of it), and writes of its own.
    let b = open(&dir, "b.redb");
    replay(&p1.store, &b, &p1.origin(), 20).await;
    replay(&p2.store, &b, &p2.origin(), usize::MAX).await;
    write(&b, 3, 8).await;
    let b_p1_before = b.store.version_vector().get(&p1.origin());
    assert!(b_p1_before < info.version_vector.get(&p1.origin()));

    // The reference applied every op.
    let r = open(&dir, "r.redb");
    for origin in [p1.origin(), p2.origin()] {
        replay(&a.store, &r, &origin, usize::MAX).await;
    }
    replay(&p2.store, &r, &p2.origin(), usize::MAX).await;
    replay(&b.store, &r, &b.origin(), usize::MAX).await;

    let signed = copy_snapshot(&a.store, &b.store, &info.cid);
    let outcome = b.writer.install_snapshot(signed.clone()).await.unwrap();
    let InstallOutcome::Installed { advanced, .. } = outcome else { panic!("{outcome:?}") };
    assert_eq!(advanced, vec![(p1.origin(), b_p1_before, info.version_vector.get(&p1.origin()))]);
    assert_eq!(b.store.state_root(), r.store.state_root());
    assert_sound(&b.store);
    let floors = b.store.log_floors().unwrap();
    assert_eq!(floors, BTreeMap::from([(p1.origin(), info.version_vector.get(&p1.origin()))]));

    // A store that already covers the snapshot is left exactly as it was.
    copy_snapshot(&a.store, &r.store, &info.cid);
    let before = r.store.state_root();
    assert_eq!(r.writer.install_snapshot(signed).await.unwrap(), InstallOutcome::AlreadyCovered);
    assert_eq!(r.store.state_root(), before);
    assert!(r.store.list_snapshots().unwrap().is_empty());

    // Repair by entries: a store missing a collection gets it from the buckets that differ.
    let c = open(&dir, "c.redb");
    replay(&p2.store, &c, &p2.origin(), usize::MAX).await;
    let (ours, theirs) = (c.store.bucket_hashes(), r.store.bucket_hashes());
    let differ: Vec<u32> = (0..ours.len() as u32).filter(|i| ours[*i as usize] != theirs[*i as usize]).collect();
    let entries = r.store.entries_in_buckets(&differ).unwrap();
    let merged = c.writer.merge_entries(entries.clone()).await.unwrap();
    assert!(merged.changed > 0 && merged.changed <= merged.entries);
    assert_eq!(c.store.bucket_hashes(), r.store.bucket_hashes());
    assert_eq!(c.writer.merge_entries(entries).await.unwrap().changed, 0);
}

/// A manifest over `chunks` signed by `forger` (who is its creator, so the signature is valid).
fn forged(forger: &Signer, template: &Manifest, chunks: Vec<ChunkRef>) -> SignedManifest {
    let m = Manifest { creator: forger.origin(), chunks, ..template.clone() };
    m.sign(forger).unwrap()
}

#[tokio::test]
async fn bad_manifests_and_chunks_are_refused_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let a = open(&dir, "a.redb");
    write(&a, 1, 20).await;
    let info = a.store.create_snapshot(&a.signer, "test", 400).unwrap();
    let good = a.store.snapshot_manifest(&info.cid).unwrap().unwrap();
    let manifest = good.verify().unwrap();
    let b = open(&dir, "b.redb");
    let empty = b.store.state_root();

    // A chunk is stored only under the CID its bytes hash to.
    let (c0, c1) = (&manifest.chunks[0], &manifest.chunks[1]);
    let bytes0 = a.store.snapshot_chunk(&c0.cid).unwrap().unwrap();
    let err = b.store.put_chunk(&c1.cid, &bytes0).unwrap_err();
    let StoreError::Snapshot(e) = err else { panic!("{err}") };
    assert!(matches!(*e, SnapshotError::Chunk { source: ChunkError::CidMismatch { .. }, .. }), "{e}");
    let mut flipped = bytes0.clone();
    flipped[3] ^= 0x40;
    assert!(b.store.put_chunk(&c0.cid, &flipped).is_err());
    assert_eq!(b.store.chunk_count().unwrap(), 0);

    // Chunks missing: refused, named.
    let e = refusal(b.writer.install_snapshot(good.clone()).await.unwrap_err());
    assert!(matches!(e, SnapshotError::MissingChunks { missing, .. } if missing == manifest.chunks.len()), "{e}");

    // Bad signatures and garbage manifests.
    let mut bad_sig = good.clone();
    bad_sig.signature[10] ^= 1;
    let e = refusal(b.writer.install_snapshot(bad_sig).await.unwrap_err());
    assert!(matches!(e, SnapshotError::Manifest(ManifestError::BadSignature(_))), "{e}");
    let mut altered = good.clone();
    let last = altered.manifest_bytes.len() - 1;
    altered.manifest_bytes[last] ^= 1;
    assert!(altered.verify().is_err());
    let stranger = Signer::new(libp2p::identity::Keypair::generate_ed25519());
    let mut resigned = forged(&stranger, &manifest, manifest.chunks.clone());
    resigned.manifest_bytes = good.manifest_bytes.clone();
    assert!(matches!(resigned.verify(), Err(ManifestError::BadSignature(_))));
    for garbage in [vec![], vec![0xff; 7], vec![1; 300]] {
        let signed = SignedManifest { manifest_bytes: garbage.clone(), signature: vec![0; 64] };
        let e = refusal(b.writer.install_snapshot(signed).await.unwrap_err());
        assert!(matches!(e, SnapshotError::Manifest(ManifestError::Malformed(_))), "{e}");
        assert!(SignedManifest::decode(&garbage).is_err());
    }
    let mut trailing = good.manifest_bytes.clone();
    trailing.push(0);
    let e = SignedManifest { manifest_bytes: trailing, ..good.clone() }.verify().unwrap_err();
    assert!(matches!(e, ManifestError::NotCanonical | ManifestError::BadSignature(_)), "{e}");

    // Validly signed by a (malicious) creator, but the chunks lie: truncated zstd, a bomb, wrong
    // sizes, or a state root the entries do not hash to.
    for c in &manifest.chunks {
        b.store.put_chunk(&c.cid, &a.store.snapshot_chunk(&c.cid).unwrap().unwrap()).unwrap();
    }
    let truncated = bytes0[..bytes0.len() - 4].to_vec();
    let bomb = zstd::bulk::compress(&vec![0u8; 8 << 20], 3).unwrap();
    let cases: Vec<(Vec<u8>, u64, &str)> = vec![(truncated, c0.raw_size, "truncated"), (bomb, 1 << 16, "bomb")];
    for (bytes, raw_size, what) in cases {
        let cid = raw_cid(&bytes);
        b.store.put_chunk(&cid, &bytes).unwrap();
        let mut chunks = manifest.chunks.clone();
        // The bad chunk comes last: the good ones before it are merged, then all is rolled back.
        chunks.push(ChunkRef { cid, size: bytes.len() as u64, raw_size });
        let e = refusal(b.writer.install_snapshot(forged(&stranger, &manifest, chunks)).await.unwrap_err());
        match (what, &e) {
            ("truncated", SnapshotError::Chunk { source: ChunkError::Decompress(_), .. }) => {}
            ("bomb", SnapshotError::Chunk { source: ChunkError::Bomb(_), .. }) => {}
            _ => panic!("{what}: {e}"),
        }
    }
    let mut sizes = manifest.chunks.clone();
    sizes[0].raw_size += 1;
    let e = refusal(b.writer.install_snapshot(forged(&stranger, &manifest, sizes)).await.unwrap_err());
    assert!(matches!(e, SnapshotError::Chunk { source: ChunkError::RawSizeMismatch { .. }, .. }), "{e}");
    let wrong_root =
        Manifest { creator: stranger.origin(), state_root: peersync::ids::StateRoot([7; 32]), ..manifest.clone() };
    let e = refusal(b.writer.install_snapshot(wrong_root.sign(&stranger).unwrap()).await.unwrap_err());
    assert!(matches!(e, SnapshotError::RootMismatch { .. }), "{e}");
    let mut short = manifest.chunks.clone();
    short.pop();
    let e = refusal(b.writer.install_snapshot(forged(&stranger, &manifest, short)).await.unwrap_err());
    assert!(matches!(e, SnapshotError::RootMismatch { .. }), "{e}");

    // Bad entries in repairs are refused too.
    let bad =
        StateEntry { kind: peersync::snapshot::Kind::Counter, collection: "c".into(), key: vec![1], value: vec![9; 5] };
    let e = refusal(b.writer.merge_entries(vec![bad]).await.unwrap_err());
    assert!(matches!(e, SnapshotError::Entry { index: 0, .. }), "{e}");

    // Nothing of any of it was written.
    assert_eq!(b.store.state_root(), empty);
    assert!(b.store.list_snapshots().unwrap().is_empty());
    assert!(b.store.log_floors().unwrap().is_empty());
    assert_sound(&b.store);
    let b_path = dir.path().join("b.redb");
    b.close().await;
    let reopened = Store::open(&b_path).unwrap();
    assert_eq!(reopened.state_root(), empty);

    // And the good one still installs.
    drop(reopened);
    let b = open(&dir, "b.redb");
    assert!(matches!(b.writer.install_snapshot(good).await.unwrap(), InstallOutcome::Installed { .. }));
    assert_eq!(b.store.state_root(), a.store.state_root());
}

#[tokio::test]
async fn compaction_keeps_newest_ops_and_never_passes_the_latest_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let a = open(&dir, "a.redb");
    let me = a.origin();
    write(&a, 1, 15).await;
    // No snapshot: nothing may be compacted.
    assert_eq!(a.writer.compact(0, 0).await.unwrap().ops_deleted, 0);
    let first = a.store.create_snapshot(&a.signer, "test", 4096).unwrap();
    let at_snapshot = first.version_vector.get(&me);
    write(&a, 1, 15).await;
    let total = a.store.version_vector().get(&me);

    let out = a.writer.compact(10, 0).await.unwrap();
    assert_eq!(out.floors, vec![(me, Seq(0), at_snapshot)], "capped at the snapshot, not at total - 10");
    assert_eq!(a.store.log_floor(&me).unwrap(), at_snapshot);
    assert_eq!(a.store.log_len().unwrap(), total.0 - at_snapshot.0);
    assert_sound(&a.store);

    // Below the floor is told apart from "nothing newer".
    let below = a.store.read_log(&me, Seq(3), 100, usize::MAX).unwrap();
    assert!(below.below_floor && below.batches.is_empty());
    let at_end = a.store.read_log(&me, total, 100, usize::MAX).unwrap();
    assert!(!at_end.below_floor && at_end.batches.is_empty());
    assert!(!a.store.read_log(&me, at_snapshot, 100, usize::MAX).unwrap().batches.is_empty());

    // A peer that installs the snapshot replays the rest from the compacted log.
    let b = open(&dir, "b.redb");
    let signed = copy_snapshot(&a.store, &b.store, &first.cid);
    b.writer.install_snapshot(signed).await.unwrap();
    replay(&a.store, &b, &me, usize::MAX).await;
    assert_eq!(b.store.state_root(), a.store.state_root());

    // With a newer snapshot, the quotas decide: the newest 10 ops stay, or enough of them for the
    // byte quota, whichever keeps more; the log goes in whole signed batches, so the floor is the
    // end of a batch, and one batch more would have broken a quota.
    let second = a.store.create_snapshot(&a.signer, "test", 4096).unwrap();
    assert_eq!(second.version_vector.get(&me), total);
    let batches = a.store.read_log(&me, at_snapshot, usize::MAX, usize::MAX).unwrap().batches;
    let ends: Vec<u64> = batches.iter().map(|b| b.head.seq.0).collect();
    let mut op_bytes = BTreeMap::new();
    for b in &batches {
        for (i, op) in b.ops.iter().enumerate() {
            op_bytes.insert(b.after.0 + 1 + i as u64, op.len() as u64);
        }
    }
    let kept = |floor: u64| (total.0 - floor, op_bytes.range(floor + 1..).map(|(_, n)| n).sum::<u64>());
    let bytes_of_newest_20 = kept(total.0 - 20).1;
    let check = |floor: u64, keep_ops: u64, keep_bytes: u64| {
        assert!(ends.contains(&floor), "floor {floor} is the end of a batch: {ends:?}");
        let (ops, bytes) = kept(floor);
        assert!(ops >= keep_ops && bytes >= keep_bytes, "quotas kept: {ops} ops, {bytes} bytes");
        let next = ends.iter().find(|e| **e > floor).copied().unwrap_or(total.0);
        let (ops, bytes) = kept(next);
        assert!(ops < keep_ops || bytes < keep_bytes, "one batch more would have been dropped");
    };
    let out = a.writer.compact(10, bytes_of_newest_20).await.unwrap();
    let [(origin, from, first_floor)] = out.floors[..] else { panic!("{out:?}") };
    assert_eq!((origin, from), (me, at_snapshot));
    check(first_floor.0, 10, bytes_of_newest_20);
    assert_eq!(a.store.log_len().unwrap(), total.0 - first_floor.0);
    let out = a.writer.compact(10, 0).await.unwrap();
    let [(_, from, second_floor)] = out.floors[..] else { panic!("{out:?}") };
    assert_eq!(from, first_floor);
    check(second_floor.0, 10, 0);
    assert_eq!(out.ops_deleted, second_floor.0 - first_floor.0);
    assert_eq!(a.store.log_len().unwrap(), total.0 - second_floor.0);
    assert_eq!(a.writer.compact(10, 0).await.unwrap().ops_deleted, 0);
    assert_sound(&a.store);
    // Writes go on after compaction, and the log stays sound.
    write(&a, 1, 3).await;
    assert_sound(&a.store);

    // Pruning keeps the latest snapshot and every chunk it lists.
    let held = a.store.chunk_count().unwrap();
    let pruned = a.store.prune_snapshots(0).unwrap();
    assert_eq!(pruned.snapshots, 1);
    let latest = a.store.latest_snapshot().unwrap().unwrap();
    assert_eq!(latest.cid, second.cid);
    assert_eq!(a.store.chunk_count().unwrap(), held - pruned.chunks as u64);
    assert!(a.store.missing_chunks(&latest.manifest).unwrap().is_empty());
    assert!(a.store.snapshot_manifest(&first.cid).unwrap().is_none());
}

#[tokio::test]
async fn create_and_install_survive_a_reopen_whole() {
    let dir = tempfile::tempdir().unwrap();
    let a = open(&dir, "a.redb");
    write(&a, 1, 12).await;
    let info = a.store.create_snapshot(&a.signer, "test", 300).unwrap();
    let root = a.store.state_root();
    let a_signer = a.close().await;

    // Reopened: the snapshot is there whole and verifies.
    let a = open_with(&dir.path().join("a.redb"), a_signer);
    assert_eq!(a.store.state_root(), root);
    let snapshot = a.store.latest_snapshot().unwrap().unwrap();
    assert_eq!(snapshot.cid, info.cid);
    assert!(a.store.missing_chunks(&snapshot.manifest).unwrap().is_empty());
    let signed = a.store.snapshot_manifest(&info.cid).unwrap().unwrap();
    assert_eq!(signed.verify().unwrap(), snapshot.manifest);

    let b = open(&dir, "b.redb");
    copy_snapshot(&a.store, &b.store, &info.cid);
    b.writer.install_snapshot(signed).await.unwrap();
    let b_signer = b.close().await;
    let b = open_with(&dir.path().join("b.redb"), b_signer);
    assert_eq!(b.store.state_root(), root);
    assert_eq!(b.store.log_floors().unwrap(), info.version_vector.0);
    assert_eq!(b.store.latest_snapshot().unwrap().unwrap().cid, info.cid);
    assert_sound(&b.store);
    // The reopened node continues the chain it installed.
    write(&a, 1, 3).await;
    replay(&a.store, &b, &a.origin(), usize::MAX).await;
    assert_eq!(b.store.state_root(), a.store.state_root());
}

/// A chunk of the given entries, as a creator would make it.
fn chunk_of(entries: &[StateEntry]) -> (ChunkRef, Vec<u8>) {
    let mut builder = ChunkBuilder::new(1 << 20);
    for e in entries {
        assert!(builder.push(e).unwrap().is_none());
    }
    let chunk = builder.finish().unwrap().unwrap();
    (chunk.chunk_ref(), chunk.bytes)
}

#[tokio::test]
async fn chunks_are_staged_as_they_arrive_and_install_by_rename_or_by_merge() {
    let dir = tempfile::tempdir().unwrap();
    let a = open(&dir, "a.redb");
    write(&a, 1, 20).await;
    for key in [200u8, 201] {
        let put = LocalIntent::Put { register: "reg".into(), key: vec![key], value: vec![key] };
        a.writer.local(vec![put]).await.unwrap();
        a.writer.local(vec![LocalIntent::Delete { register: "reg".into(), key: vec![key] }]).await.unwrap();
    }
    let s1 = a.store.create_snapshot(&a.signer, "test", 400).unwrap();
    let s1_tombstones = a.store.tombstones().unwrap();
    assert!(s1_tombstones > 0);
    write(&a, 1, 10).await;
    let s2 = a.store.create_snapshot(&a.signer, "test", 400).unwrap();
    let manifest = |cid| a.store.snapshot_manifest(cid).unwrap().unwrap();
    let (m1, m2) = (manifest(&s1.cid).verify().unwrap(), manifest(&s2.cid).verify().unwrap());
    let bytes = |c: &ChunkRef| a.store.snapshot_chunk(&c.cid).unwrap().unwrap();
    assert!(m1.chunks.len() > 3, "{s1:?}");

    // All of S1's chunks but the last are staged (and held), last first, so each goes in before
    // entries staged already; staging one again is a no-op.
    let b = open(&dir, "b.redb");
    let (last, rest) = m1.chunks.split_last().unwrap();
    for c in rest.iter().rev() {
        assert!(b.store.stage_chunk(&s1.cid, c, &bytes(c), true).unwrap());
    }
    assert!(!b.store.stage_chunk(&s1.cid, &rest[0], &bytes(&rest[0]), false).unwrap());
    assert!(b.store.missing_chunks(&m1).unwrap() == vec![last.cid]);

    // Chunks whose bytes match their CID but whose entries are bad are refused before anything is
    // written: a value that is not in canonical encoding, and a key S1's staged chunks already hold.
    let value = peersync::crdt::RegisterValue { hlc: Default::default(), origin: a.origin(), value: Some(vec![1]) };
    let mut padded = postcard::to_stdvec(&value).unwrap();
    padded.push(0);
    let entry = |key: &[u8], value: Vec<u8>| StateEntry {
        kind: Kind::Register,
        collection: "reg".into(),
        key: key.to_vec(),
        value,
    };
    let (r, b1) = chunk_of(&[entry(b"new", padded)]);
    let err = b.store.stage_chunk(&s1.cid, &r, &b1, true).unwrap_err();
    assert!(matches!(err, StoreError::Snapshot(ref e) if matches!(**e, SnapshotError::Entry { .. })), "{err}");
    let staged = peersync::snapshot::decode_chunk(&rest[0], &bytes(&rest[0])).unwrap();
    let (r, b2) = chunk_of(&staged[..1]);
    let err = b.store.stage_chunk(&s1.cid, &r, &b2, true).unwrap_err();
    assert!(err.to_string().contains("staged twice"), "{err}");
    assert!(!b.store.has_chunk(&r.cid).unwrap());

    // The staging survives a restart; a chunk of another snapshot starts its staging over.
    let b_signer = b.close().await;
    let b = open_with(&dir.path().join("b.redb"), b_signer);
    assert!(b.store.stage_chunk(&s2.cid, &m2.chunks[0], &bytes(&m2.chunks[0]), true).unwrap());
    let e = refusal(b.writer.install_snapshot(manifest(&s1.cid)).await.unwrap_err());
    assert!(matches!(e, SnapshotError::MissingChunks { missing: 1, .. }), "{e}");

    // Once the last chunk is there, the install stages what is held but not staged for S1, and
    // the empty state becomes S1's.
    assert!(b.store.stage_chunk(&s1.cid, last, &bytes(last), false).unwrap());
    let outcome = b.writer.install_snapshot(manifest(&s1.cid)).await.unwrap();
    let InstallOutcome::Installed { entries, changed, .. } = outcome else { panic!("{outcome:?}") };
    assert_eq!((entries, changed), (s1.entries, s1.entries));
    assert_eq!(b.store.state_root(), (s1.state_root, s1.version_vector.clone()));
    assert_eq!(b.store.lease("lk", b"shared").unwrap().map(|l| l.holder), Some(Some("h1".into())));
    // The tombstones were indexed as they were staged.
    assert_eq!(b.store.tombstones().unwrap(), s1_tombstones);
    assert_sound(&b.store);

    // S2 onto S1's state: staged in an order of its own, then merged into the non-empty state.
    for c in m2.chunks.iter().skip(1).chain(m2.chunks.first()) {
        b.store.stage_chunk(&s2.cid, c, &bytes(c), false).unwrap();
    }
    let outcome = b.writer.install_snapshot(manifest(&s2.cid)).await.unwrap();
    assert!(matches!(outcome, InstallOutcome::Installed { .. }), "{outcome:?}");
    assert_eq!(b.store.state_root(), (s2.state_root, s2.version_vector.clone()));
    assert_eq!(b.store.register("reg", &[0]).unwrap(), a.store.register("reg", &[0]).unwrap());
    assert_eq!(b.store.tombstones().unwrap(), a.store.tombstones().unwrap());
    assert_sound(&b.store);
    write(&b, 3, 2).await;
    assert_sound(&b.store);
}

#[test]
fn chunks_kept_in_redb_by_older_builds_move_to_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.redb");
    drop(Store::open(&path).unwrap());
    let chunk = |key: u8| {
        chunk_of(&[StateEntry { kind: Kind::Counter, collection: "c".into(), key: vec![key], value: vec![0, 0] }])
    };
    let ((r1, bytes1), (r2, bytes2)) = (chunk(1), chunk(2));
    let old: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("snapshot_chunks_v1");
    let keep_in = |db: &std::path::Path, cid: &cid::Cid, bytes: &[u8]| {
        let db = redb::Database::create(db).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(old).unwrap().insert(cid.to_bytes().as_slice(), bytes).unwrap();
        txn.commit().unwrap();
    };
    // The oldest builds kept chunks in the state database, later ones in a database of their own.
    keep_in(&path, &r1.cid, &bytes1);
    let legacy = peersync::store::chunks_path(&path);
    assert!(legacy.ends_with("state-chunks.redb"));
    keep_in(&legacy, &r2.cid, &bytes2);

    let store = Store::open(&path).unwrap();
    assert_eq!(store.snapshot_chunk(&r1.cid).unwrap(), Some(bytes1.clone()));
    assert_eq!(store.snapshot_chunk(&r2.cid).unwrap(), Some(bytes2));
    assert!(!legacy.exists(), "the chunk database is gone once its chunks are files");
    let files = peersync::store::chunks_dir(&path);
    assert!(files.ends_with("state-chunks"));
    assert_eq!(std::fs::read(files.join(r1.cid.to_string())).unwrap(), bytes1);
    drop(store);
    assert_eq!(Store::open(&path).unwrap().chunk_count().unwrap(), 2);
}

#[tokio::test]
async fn a_held_chunk_cut_short_by_a_crash_counts_as_missing_and_is_fetched_again() {
    let dir = tempfile::tempdir().unwrap();
    let a = open(&dir, "a.redb");
    write(&a, 1, 12).await;
    let snap = a.store.create_snapshot(&a.signer, "test", 300).unwrap();
    let signed = a.store.snapshot_manifest(&snap.cid).unwrap().unwrap();
    let m = signed.verify().unwrap();
    assert!(m.chunks.len() > 1);
    let bytes = |c: &cid::Cid| a.store.snapshot_chunk(c).unwrap().unwrap();

    let b = open(&dir, "b.redb");
    for c in &m.chunks {
        b.store.put_chunk(&c.cid, &bytes(&c.cid)).unwrap();
    }
    assert!(b.store.missing_chunks(&m).unwrap().is_empty());
    // What a crash before the chunk was synced can leave: its file cut short.
    let cut = m.chunks[0].cid;
    let file = peersync::store::chunks_dir(&dir.path().join("b.redb")).join(cut.to_string());
    std::fs::write(&file, &bytes(&cut)[..10]).unwrap();
    assert_eq!(b.store.missing_chunks(&m).unwrap(), vec![cut], "a resumed pull fetches it again");
    assert!(b.store.has_chunk(&cut).unwrap());
    // An install before that refuses, naming it missing, and removes the damaged file.
    let e = refusal(b.writer.install_snapshot(signed.clone()).await.unwrap_err());
    assert!(matches!(e, SnapshotError::MissingChunks { missing: 1, first, .. } if first == cut), "{e}");
    assert!(!b.store.has_chunk(&cut).unwrap());
    // Fetched again, it installs.
    b.store.put_chunk(&cut, &bytes(&cut)).unwrap();
    let outcome = b.writer.install_snapshot(signed).await.unwrap();
    assert!(matches!(outcome, InstallOutcome::Installed { .. }), "{outcome:?}");
    assert_eq!(b.store.state_root().0, snap.state_root);
}

#[tokio::test]
async fn a_chunk_damaged_on_disk_is_not_served_but_reported_not_held() {
    let dir = tempfile::tempdir().unwrap();
    let a = open(&dir, "a.redb");
    write(&a, 1, 12).await;
    let snap = a.store.create_snapshot(&a.signer, "test", 300).unwrap();
    let m = a.store.snapshot_manifest(&snap.cid).unwrap().unwrap().verify().unwrap();
    assert!(m.chunks.len() > 1);
    let (bad, good) = (m.chunks[0].cid, m.chunks[1].cid);
    let signer = a.close().await;
    // Damaged while the node was down (a bad disk, a stray write): same size, one byte flipped.
    let file = peersync::store::chunks_dir(&dir.path().join("a.redb")).join(bad.to_string());
    let mut bytes = std::fs::read(&file).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&file, &bytes).unwrap();

    let a = open_with(&dir.path().join("a.redb"), signer);
    let served = |cid| peersync::sync::serve(&a.store, peersync::wire::SyncRequest::GetChunk { cid });
    match served(bad) {
        peersync::wire::SyncResponse::Error { code, .. } => assert_eq!(code, "not_found"),
        other => panic!("a damaged chunk was answered with {other:?}"),
    }
    assert!(!a.store.has_chunk(&bad).unwrap(), "removed, so the node no longer counts it held");
    assert_eq!(a.store.missing_chunks(&m).unwrap(), vec![bad]);
    // A sound chunk is served, the first time and again.
    for _ in 0..2 {
        match served(good) {
            peersync::wire::SyncResponse::Chunk(bytes) => peersync::snapshot::verify_chunk_cid(&good, &bytes).unwrap(),
            other => panic!("a sound chunk was answered with {other:?}"),
        }
    }
}

#[tokio::test]
async fn chunks_no_held_snapshot_lists_are_collected_unless_kept() {
    let dir = tempfile::tempdir().unwrap();
    let a = open(&dir, "a.redb");
    write(&a, 1, 12).await;
    let old = a.store.create_snapshot(&a.signer, "test", 300).unwrap();
    write(&a, 1, 12).await;
    let new = a.store.create_snapshot(&a.signer, "test", 300).unwrap();
    let manifest = |cid| a.store.snapshot_manifest(cid).unwrap().unwrap().verify().unwrap();
    let (m_old, m_new) = (manifest(&old.cid), manifest(&new.cid));

    // B pulled part of the old snapshot, gave up, and now pulls the new one.
    let b = open(&dir, "b.redb");
    for c in &m_old.chunks[..3] {
        b.store.put_chunk(&c.cid, &a.store.snapshot_chunk(&c.cid).unwrap().unwrap()).unwrap();
    }
    let new_cids: Vec<_> = m_new.chunks.iter().map(|c| c.cid).collect();
    b.store.put_chunk(&new_cids[0], &a.store.snapshot_chunk(&new_cids[0]).unwrap().unwrap()).unwrap();
    let shared = m_old.chunks[..3].iter().filter(|c| new_cids.contains(&c.cid)).count() as u64;
    assert_eq!(b.store.collect_chunks(&new_cids).unwrap(), 3 - shared);
    assert_eq!(b.store.chunk_count().unwrap(), 1 + shared);
    assert!(b.store.has_chunk(&new_cids[0]).unwrap());

    // On A, every chunk belongs to a held snapshot: nothing goes.
    let held = a.store.chunk_count().unwrap();
    assert_eq!(a.store.collect_chunks(&[]).unwrap(), 0);
    assert_eq!(a.store.chunk_count().unwrap(), held);
}

#[tokio::test]
async fn a_log_kept_one_op_per_row_by_an_older_build_is_moved_to_one_row_per_batch() {
    let dir = tempfile::tempdir().unwrap();
    let a = open(&dir, "a.redb");
    write(&a, 1, 10).await;
    let (root, ops) = (a.store.state_root(), a.store.log_len().unwrap());
    let signer = a.close().await;

    // Rewrite the log as the older build kept it: (origin, seq) -> chain hash after the op, op bytes.
    let path = dir.path().join("a.redb");
    {
        type Log = redb::TableDefinition<'static, (&'static [u8], u64), &'static [u8]>;
        let (v1, v2): (Log, Log) = (redb::TableDefinition::new("oplog_v1"), redb::TableDefinition::new("oplog_v2"));
        let counts: redb::TableDefinition<&[u8], u64> = redb::TableDefinition::new("log_counts_v1");
        let db = redb::Database::open(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let rows = txn.open_table(v2).unwrap();
            let mut old = txn.open_table(v1).unwrap();
            for row in redb::ReadableTable::iter(&rows).unwrap() {
                let (k, v) = row.unwrap();
                let ((origin, last), mut rest) = (k.value(), v.value());
                let mut ops = Vec::new();
                while !rest.is_empty() {
                    let len = u32::from_be_bytes(rest[32..36].try_into().unwrap()) as usize;
                    ops.push([&rest[..32], &rest[36..36 + len]].concat());
                    rest = &rest[36 + len..];
                }
                let first = last + 1 - ops.len() as u64;
                for (i, op) in ops.iter().enumerate() {
                    old.insert((origin, first + i as u64), op.as_slice()).unwrap();
                }
            }
        }
        txn.delete_table(v2).unwrap();
        txn.delete_table(counts).unwrap();
        txn.commit().unwrap();
    }

    let a = open_with(&path, signer);
    assert_eq!(a.store.state_root(), root);
    assert_eq!(a.store.log_len().unwrap(), ops);
    assert_sound(&a.store);
    let b = open(&dir, "b.redb");
    replay(&a.store, &b, &a.origin(), usize::MAX).await;
    assert_eq!(b.store.state_root(), root);
    write(&a, 1, 2).await;
    assert_sound(&a.store);
}

fn disk_full(e: &StoreError) -> bool {
    matches!(e, StoreError::DiskFull { available, needed, .. } if available < needed)
}

#[tokio::test]
async fn short_of_free_space_every_write_is_refused_and_nothing_is_lost_until_space_returns() {
    let dir = tempfile::tempdir().unwrap();
    let a = open(&dir, "a");
    let b = open(&dir, "b");
    write(&a, 1, 12).await;
    let kept = a.store.state_root();
    let snap = a.store.create_snapshot(&a.signer, "test", 512).unwrap();

    // A reserve larger than the filesystem's free space: as if the disk were full.
    let free = peersync::store::available_bytes(dir.path()).unwrap();
    for node in [&a, &b] {
        node.store.set_disk_reserve(free.saturating_mul(4).max(1 << 50));
    }
    let put = LocalIntent::Put { register: "reg".into(), key: b"late".to_vec(), value: b"v".to_vec() };
    match a.writer.local(vec![put.clone()]).await {
        Err(WriterError::Store(e)) => assert!(disk_full(&e), "{e}"),
        other => panic!("a write on a full disk must be refused, got {other:?}"),
    }
    let e = a.store.create_snapshot(&a.signer, "test", 512).unwrap_err();
    assert!(disk_full(&e), "{e}");
    let manifest = a.store.snapshot_manifest(&snap.cid).unwrap().unwrap().verify().unwrap();
    let chunk = manifest.chunks[0].clone();
    let bytes = a.store.snapshot_chunk(&chunk.cid).unwrap().unwrap();
    let e = b.store.put_chunk(&chunk.cid, &bytes).unwrap_err();
    assert!(disk_full(&e), "{e}");
    let e = b.store.stage_chunk(&snap.cid, &chunk, &bytes, true).unwrap_err();
    assert!(disk_full(&e), "{e}");
    assert!(!b.store.has_chunk(&chunk.cid).unwrap(), "a refused chunk is not kept");
    match replay_err(&a.store, &b, &a.origin()).await {
        WriterError::Store(e) => assert!(disk_full(&e), "{e}"),
        other => panic!("peers' ops on a full disk must be refused, got {other:?}"),
    }
    // Nothing changed, and reads still answer.
    assert_eq!(a.store.state_root(), kept);
    assert_eq!(b.store.version_vector(), Default::default());
    assert!(a.store.register("reg", &[0]).unwrap().is_some());
    assert_eq!(a.store.register("reg", b"late").unwrap(), None);

    // Space is back: the same writes go through, without reopening anything.
    for node in [&a, &b] {
        node.store.set_disk_reserve(peersync::store::DEFAULT_DISK_RESERVE.min(free / 2));
    }
    a.writer.local(vec![put]).await.unwrap();
    assert!(a.store.register("reg", b"late").unwrap().is_some());
    replay(&a.store, &b, &a.origin(), usize::MAX).await;
    assert_eq!(b.store.state_root(), a.store.state_root());
    assert!(b.store.put_chunk(&chunk.cid, &bytes).unwrap());
    a.close().await;
    b.close().await;
}

/// Offers `to` the first batch of `origin`'s log held by `from` and returns the writer's error.
async fn replay_err(from: &Store, to: &Node, origin: &Origin) -> WriterError {
    let read = from.read_log(origin, Seq(0), 5, usize::MAX).unwrap();
    let batch = read.batches.into_iter().next().expect("a batch to offer");
    let verified = batch.verify(to.store.progress(origin).chain, 4096).unwrap();
    to.writer.remote(verified).await.unwrap_err()
}
