//! Tombstones in the store: outside the state root, indexed, collected up to a stamp, stale copies
//! refused after collection, and data dirs of formats 1 and 2 migrated.

use std::thread::JoinHandle;

use peersync::crdt::Hlc;
use peersync::ids::Origin;
use peersync::op::Signer;
use peersync::store::{LocalIntent, RemoteOutcome, Store, WriteHandle, WriterConfig};

struct Node {
    store: Store,
    writer: WriteHandle,
    signer: Signer,
    join: Option<JoinHandle<()>>,
}

fn open_with(path: &std::path::Path, signer: Signer) -> Node {
    let store = Store::open(path).unwrap();
    let (events, _) = tokio::sync::broadcast::channel(1024);
    let (writer, join) = store.spawn_writer(signer.clone(), WriterConfig::default(), events);
    Node { store, writer, signer, join: Some(join) }
}

fn open(dir: &tempfile::TempDir, name: &str) -> Node {
    open_with(&dir.path().join(name), Signer::new(libp2p::identity::Keypair::generate_ed25519()))
}

impl Node {
    fn origin(&self) -> Origin {
        self.signer.origin()
    }

    async fn close(mut self) -> Signer {
        self.writer.stop().await;
        self.join.take().unwrap().join().unwrap();
        self.signer
    }
}

fn key(i: u32) -> Vec<u8> {
    i.to_be_bytes().to_vec()
}

async fn put(node: &Node, keys: std::ops::Range<u32>) {
    let intents = keys.map(|i| LocalIntent::Put { register: "r".into(), key: key(i), value: vec![7; 20] }).collect();
    node.writer.local(intents).await.unwrap();
}

async fn delete(node: &Node, keys: std::ops::Range<u32>) {
    let intents = keys.map(|i| LocalIntent::Delete { register: "r".into(), key: key(i) }).collect();
    node.writer.local(intents).await.unwrap();
}

/// Replays every op of `origin` that `to` lacks from `from`.
async fn replay(from: &Store, to: &Node, origin: &Origin) {
    loop {
        let have = to.store.version_vector().get(origin);
        let read = from.read_log(origin, have, 256, usize::MAX).unwrap();
        if read.batches.is_empty() {
            // Peers' ops wait in the memtable until a flush; a snapshot made next covers them after it.
            to.writer.persist().await.unwrap();
            return;
        }
        for batch in read.batches {
            let prev = to.store.chain_at(origin, batch.after).unwrap().expect("chain at the batch start");
            let outcome = to.writer.remote(batch.verify(prev, 100_000).unwrap()).await.unwrap();
            assert!(matches!(outcome, RemoteOutcome::Applied { .. }), "{outcome:?}");
        }
    }
}

/// Live keys of the register.
fn live(store: &Store) -> usize {
    store.list_register("r", &[], None, usize::MAX).unwrap().entries.len()
}

fn all_buckets() -> Vec<u32> {
    (0..peersync::store::root::BUCKETS as u32).collect()
}

#[tokio::test]
async fn tombstones_stay_out_of_the_root_and_are_collected_up_to_a_stamp() {
    let dir = tempfile::tempdir().unwrap();
    let a = open(&dir, "a.redb");
    let b = open(&dir, "b.redb");
    put(&a, 0..1_000).await;
    let (live_root, _) = a.store.state_root();
    put(&a, 1_000..3_000).await;
    delete(&a, 1_000..2_000).await;
    let before_second = a.store.clock();
    delete(&a, 2_000..3_000).await;
    assert_eq!(a.store.tombstones().unwrap(), 2_000);
    // Deleted keys read as absent and leave the root as if they had never been written.
    assert_eq!(a.store.state_root().0, live_root);
    assert_eq!(live(&a.store), 1_000);

    // b has every op and keeps its tombstones; a collects the first thousand, then the rest.
    replay(&a.store, &b, &a.origin()).await;
    assert_eq!(b.store.tombstones().unwrap(), 2_000);
    assert_eq!(a.writer.collect_tombstones(before_second).await.unwrap(), 1_000);
    assert_eq!(a.store.tombstones().unwrap(), 1_000);
    assert_eq!(a.store.tombstones_collected(), before_second);
    assert_eq!(a.store.state_root(), b.store.state_root());
    assert_eq!(a.writer.collect_tombstones(a.store.clock()).await.unwrap(), 1_000);
    assert_eq!(a.writer.collect_tombstones(a.store.clock()).await.unwrap(), 0);
    assert_eq!(a.store.tombstones().unwrap(), 0);
    assert_eq!(a.store.state_root(), b.store.state_root());
    // Collected keys are gone from the table, not only from reads.
    assert_eq!(a.store.entries_in_buckets(&all_buckets()).unwrap().len(), 1_000);

    // A key written again after its delete is a live value, not a tombstone to collect.
    put(&a, 2_500..2_510).await;
    assert_eq!(a.writer.collect_tombstones(a.store.clock()).await.unwrap(), 0);
    assert_eq!(live(&a.store), 1_010);

    // The count and the collection stamp survive a restart.
    let collected = a.store.tombstones_collected();
    let path = dir.path().join("a.redb");
    let signer = a.close().await;
    let a = open_with(&path, signer);
    assert_eq!(a.store.tombstones_collected(), collected);
    assert_eq!(a.store.tombstones().unwrap(), 0);
    b.close().await;
    a.close().await;
}

#[tokio::test]
async fn a_stale_copy_of_a_collected_delete_is_not_merged_back() {
    let dir = tempfile::tempdir().unwrap();
    let a = open(&dir, "a.redb");
    let away = open(&dir, "away.redb");
    put(&a, 0..10).await;
    replay(&a.store, &away, &a.origin()).await;
    // `away` misses the deletes; `a` collects them.
    delete(&a, 0..5).await;
    a.writer.collect_tombstones(a.store.clock()).await.unwrap();
    let root = a.store.state_root().0;

    // Its state entries (the five deleted keys still live there) are refused as stale copies.
    let stale = away.store.entries_in_buckets(&all_buckets()).unwrap();
    assert_eq!(stale.len(), 10);
    assert_eq!(a.writer.merge_entries(stale).await.unwrap().changed, 0);
    assert_eq!(a.store.state_root().0, root);
    assert_eq!(live(&a.store), 5);

    // A write made after the collection is newer than it and merges as usual.
    let fresh = open(&dir, "fresh.redb");
    put(&fresh, 0..3).await;
    let newer = fresh.store.entries_in_buckets(&all_buckets()).unwrap();
    assert_eq!(a.writer.merge_entries(newer).await.unwrap().changed, 3);
    assert_eq!(live(&a.store), 8);
    for n in [a, away, fresh] {
        n.close().await;
    }
}

/// A node away while keys were deleted and collected, which catches up by a snapshot merged into its
/// state, drops its stale copies of them: the snapshot covers their origin, so their absence there
/// is a collected delete. An entry of an origin the snapshot does not cover as far is kept.
#[tokio::test]
async fn a_snapshot_merged_into_a_stale_state_drops_the_collected_deletes() {
    let dir = tempfile::tempdir().unwrap();
    let a = open(&dir, "a.redb");
    let away = open(&dir, "away.redb");
    put(&a, 0..10).await;
    replay(&a.store, &away, &a.origin()).await;
    // `away` writes keys of its own that `a` never sees.
    put(&away, 100..103).await;
    delete(&a, 0..5).await;
    a.writer.collect_tombstones(a.store.clock()).await.unwrap();
    let info = a.store.create_snapshot(&a.signer, "test", 256).unwrap();

    let signed = a.store.snapshot_manifest(&info.cid).unwrap().unwrap();
    let manifest = signed.verify().unwrap();
    for c in away.store.missing_chunks(&manifest).unwrap() {
        assert!(away.store.put_chunk(&c, &a.store.snapshot_chunk(&c).unwrap().unwrap()).unwrap());
    }
    let outcome = away.writer.install_snapshot(signed).await.unwrap();
    assert!(matches!(outcome, peersync::store::InstallOutcome::Installed { .. }), "{outcome:?}");
    for i in 0..5 {
        assert_eq!(away.store.register("r", &key(i)).unwrap(), None, "key {i} came back");
    }
    for i in (5..10).chain(100..103) {
        assert!(away.store.register("r", &key(i)).unwrap().and_then(|v| v.value).is_some(), "key {i} lost");
    }
    assert_eq!(live(&away.store), 8);
    // Its own three keys are the only difference from `a`: once `a` has them the roots agree.
    replay(&away.store, &a, &away.origin()).await;
    assert_eq!(a.store.state_root().0, away.store.state_root().0);
    for n in [a, away] {
        n.close().await;
    }
}

mod old_formats {
    use peersync::store::root::BUCKETS;
    use redb::{ReadableDatabase, ReadableTable, TableDefinition, TableHandle};

    pub const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta_v1");
    pub const REGISTERS: TableDefinition<(&str, &[u8]), &[u8]> = TableDefinition::new("registers_v1");
    pub const TOMBSTONES: TableDefinition<(u64, u32, &str, &[u8]), ()> = TableDefinition::new("tombstones_v1");
    /// Formats 1 and 2: one row per bucket.
    const BUCKETS_V1: TableDefinition<u32, &[u8]> = TableDefinition::new("state_buckets_v1");
    /// Format 3: rows of 64 buckets.
    const BUCKET_ROWS: TableDefinition<u32, &[u8]> = TableDefinition::new("state_bucket_rows_v3");

    /// Moves the buckets of a format-3 file into the table of formats 1 and 2, one per row, and
    /// returns them.
    pub fn buckets_to_v1(txn: &redb::WriteTransaction) -> Vec<[u8; 32]> {
        let mut hashes = vec![[0u8; 32]; BUCKETS];
        for row in txn.open_table(BUCKET_ROWS).unwrap().iter().unwrap() {
            let (k, v) = row.unwrap();
            let r = k.value() as usize;
            assert_eq!(v.value().len(), 64 * 32);
            for (i, h) in v.value().chunks_exact(32).enumerate() {
                hashes[r * 64 + i] = h.try_into().unwrap();
            }
        }
        txn.delete_table(BUCKET_ROWS).unwrap();
        write_v1(txn, &hashes);
        hashes
    }

    pub fn write_v1(txn: &redb::WriteTransaction, hashes: &[[u8; 32]]) {
        let mut table = txn.open_table(BUCKETS_V1).unwrap();
        for (b, h) in hashes.iter().enumerate() {
            table.insert(b as u32, h.as_slice()).unwrap();
        }
    }

    pub fn set_format(txn: &redb::WriteTransaction, version: u64) {
        txn.open_table(META).unwrap().insert("format_version", version.to_be_bytes().as_slice()).unwrap();
    }

    /// The format version of the file and whether it still has the one-row-per-bucket table.
    pub fn format_of(path: &std::path::Path) -> (u64, bool) {
        let db = redb::Database::open(path).unwrap();
        let read = db.begin_read().unwrap();
        let format = read.open_table(META).unwrap().get("format_version").unwrap().unwrap().value().to_vec();
        let has_v1 = read.list_tables().unwrap().any(|t| t.name() == "state_buckets_v1");
        (u64::from_be_bytes(format.try_into().unwrap()), has_v1)
    }
}

/// A node at `path` that wrote `puts` and deleted `deletes`, then stopped: its signer, and the root
/// and version vector it had.
async fn written_and_closed(
    path: &std::path::Path,
    puts: std::ops::Range<u32>,
    deletes: std::ops::Range<u32>,
) -> (Signer, (peersync::ids::StateRoot, peersync::store::VersionVector)) {
    let a = open_with(path, Signer::new(libp2p::identity::Keypair::generate_ed25519()));
    put(&a, puts).await;
    delete(&a, deletes).await;
    let state = a.store.state_root();
    (a.close().await, state)
}

#[tokio::test]
async fn a_format_1_data_dir_is_migrated_with_its_root_and_tombstones() {
    use old_formats::*;
    use peersync::store::root::{entry_hash, identity_hash, EntryKind};
    use redb::ReadableTable;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.redb");
    let (signer, (root, vv)) = written_and_closed(&path, 0..100, 0..40).await;

    // Turn it into what format 1 wrote: tombstones counted in the buckets (one row per bucket), no index.
    {
        let db = redb::Database::open(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut hashes = buckets_to_v1(&txn);
            let registers = txn.open_table(REGISTERS).unwrap();
            for row in registers.iter().unwrap() {
                let (k, v) = row.unwrap();
                let (register, key) = k.value();
                if peersync::store::root::register_is_tombstone(v.value()) {
                    let id = identity_hash(EntryKind::Register, register, key);
                    let b = peersync::store::root::bucket_of(&id);
                    for (x, y) in hashes[b].iter_mut().zip(entry_hash(&id, v.value())) {
                        *x ^= y;
                    }
                }
            }
            write_v1(&txn, &hashes);
            set_format(&txn, 1);
        }
        txn.delete_table(TOMBSTONES).unwrap();
        txn.commit().unwrap();
    }
    assert_eq!(format_of(&path), (1, true));

    let a = open_with(&path, signer);
    assert_eq!(a.store.state_root(), (root, vv));
    assert_eq!(a.store.tombstones().unwrap(), 40);
    assert_eq!(a.writer.collect_tombstones(a.store.clock()).await.unwrap(), 40);
    assert_eq!(a.store.state_root().0, root);
    a.close().await;
    assert_eq!(format_of(&path), (3, false));
    // A format this build does not know is refused, naming it.
    {
        let db = redb::Database::open(&path).unwrap();
        let txn = db.begin_write().unwrap();
        set_format(&txn, 9);
        txn.commit().unwrap();
    }
    let err = Store::open(&path).unwrap_err().to_string();
    assert!(err.contains('9'), "{err}");
}

#[tokio::test]
async fn a_format_2_data_dir_keeps_its_root_and_takes_writes_after_migration() {
    use old_formats::*;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v2.redb");
    let (signer, (root, vv)) = written_and_closed(&path, 0..300, 0..10).await;
    {
        let db = redb::Database::open(&path).unwrap();
        let txn = db.begin_write().unwrap();
        buckets_to_v1(&txn);
        set_format(&txn, 2);
        txn.commit().unwrap();
    }
    assert_eq!(format_of(&path), (2, true));

    let a = open_with(&path, signer);
    assert_eq!(a.store.state_root(), (root, vv));
    // Writes after the migration keep the persisted rows in step with the mirror: a reopened node
    // has the root of a node that never stopped.
    put(&a, 300..400).await;
    let after = a.store.state_root();
    assert_ne!(after.0, root);
    let signer = a.close().await;
    assert_eq!(format_of(&path), (3, false));
    let a = open_with(&path, signer);
    assert_eq!(a.store.state_root(), after);
    // The same ops applied to a node that was never migrated give the same root.
    let fresh = open(&dir, "fresh");
    replay(&a.store, &fresh, &a.origin()).await;
    assert_eq!(fresh.store.state_root().0, after.0);
    a.close().await;
    fresh.close().await;
}

#[test]
fn tombstone_bytes_are_recognised_without_decoding() {
    use peersync::crdt::RegisterValue;
    let origin = libp2p::identity::Keypair::generate_ed25519().public().to_peer_id();
    for value in [None, Some(vec![]), Some(vec![0]), Some(vec![0; 300])] {
        for hlc in [Hlc::new(0, 0), Hlc::new(1_765_000_000_000, 70_000)] {
            let v = RegisterValue { hlc, origin, value: value.clone() };
            let bytes = postcard::to_stdvec(&v).unwrap();
            assert_eq!(peersync::store::root::register_is_tombstone(&bytes), value.is_none(), "{v:?}");
        }
    }
    assert!(!peersync::store::root::register_is_tombstone(&[]));
    assert!(!peersync::store::root::register_is_tombstone(&[0xff; 12]));
}
