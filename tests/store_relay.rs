//! Ops served from one store's log (as a relay would) verify and apply on another store, from any
//! cursor, and the two end with the same state root.

use peersync::ids::Seq;
use peersync::op::Signer;
use peersync::store::{LocalIntent, RemoteOutcome, Store, WriterConfig};

fn open(dir: &tempfile::TempDir, name: &str, config: WriterConfig) -> (Store, peersync::store::WriteHandle, Signer) {
    let store = Store::open(&dir.path().join(name)).unwrap();
    let signer = Signer::new(libp2p::identity::Keypair::generate_ed25519());
    let (events, _) = tokio::sync::broadcast::channel(1024);
    let (writer, _) = store.spawn_writer(signer.clone(), config, events);
    (store, writer, signer)
}

#[tokio::test]
async fn batches_read_from_a_log_verify_and_replay_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let (a, a_writer, a_signer) = open(&dir, "a.redb", WriterConfig { batch_max_ops: 4, ..Default::default() });
    let origin = a_signer.origin();
    for i in 0..10u8 {
        let intents =
            (0..3u8).map(|j| LocalIntent::Put { register: "r".into(), key: vec![i, j], value: vec![i; 20] }).collect();
        a_writer.local(intents).await.unwrap();
    }
    a_writer.local(vec![LocalIntent::CounterAdd { counter: "c".into(), key: b"k".to_vec(), delta: 7 }]).await.unwrap();
    assert_eq!(a.version_vector().get(&origin), Seq(31));

    let (b, b_writer, _) = open(&dir, "b.redb", WriterConfig::default());
    // Start from a cursor in the middle of a signed batch: the first served batch starts there.
    let first = a.read_batches(&origin, Seq(0), 5, usize::MAX).unwrap();
    assert!(first.iter().map(|x| x.ops.len()).sum::<usize>() >= 5);
    let verified = first[0].clone().verify(b.chain_at(&origin, Seq(0)).unwrap().unwrap(), 1000).unwrap();
    assert!(matches!(b_writer.remote(verified).await.unwrap(), RemoteOutcome::Applied { .. }));

    // Resume from wherever B is, batch after batch, until it has everything.
    loop {
        let have = b.version_vector().get(&origin);
        let batches = a.read_batches(&origin, have, 7, usize::MAX).unwrap();
        if batches.is_empty() {
            break;
        }
        for batch in batches {
            let prev = b.chain_at(&origin, batch.after).unwrap().expect("B holds the chain at the batch start");
            let verified = batch.verify(prev, 1000).unwrap();
            assert!(matches!(b_writer.remote(verified).await.unwrap(), RemoteOutcome::Applied { .. }));
        }
    }
    assert_eq!(b.version_vector(), a.version_vector());
    assert_eq!(b.state_root(), a.state_root());
    assert_eq!(b.counter("c", b"k").unwrap(), 7);
    assert!(b.check_log().unwrap().problems.is_empty());

    // A replayed batch that is already applied is a duplicate; one with a hole is a gap.
    let again = a.read_batches(&origin, Seq(0), 1, usize::MAX).unwrap().remove(0);
    let v = again.verify(b.chain_at(&origin, Seq(0)).unwrap().unwrap(), 1000).unwrap();
    assert_eq!(b_writer.remote(v).await.unwrap(), RemoteOutcome::Duplicate);

    let (c, c_writer, _) = open(&dir, "c.redb", WriterConfig::default());
    let later = a.read_batches(&origin, Seq(8), 1, usize::MAX).unwrap().remove(0);
    let prev = a.chain_at(&origin, later.after).unwrap().unwrap();
    let v = later.verify(prev, 1000).unwrap();
    assert_eq!(c_writer.remote(v).await.unwrap(), RemoteOutcome::Gap { have: Seq(0), batch_after: Seq(8) });
    assert_eq!(c.version_vector().total(), 0);
}

/// Signed batches that continue one another join into one batch under the last head (as the node
/// publishes commits that queued up): it verifies with one signature check and replays elsewhere to
/// the same root. Batches that do not continue one another do not join.
#[tokio::test]
async fn continuing_batches_join_into_one_that_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let (a, a_writer, a_signer) = open(&dir, "a.redb", WriterConfig { batch_max_ops: 2, ..Default::default() });
    let origin = a_signer.origin();
    for i in 0..4u8 {
        let intents =
            (0..3u8).map(|j| LocalIntent::Put { register: "r".into(), key: vec![i, j], value: vec![i; 20] }).collect();
        a_writer.local(intents).await.unwrap();
    }
    let batches = a.read_batches(&origin, Seq(0), 1000, usize::MAX).unwrap();
    assert!(batches.len() >= 4, "{} batches", batches.len());

    let mut joined = batches[0].clone();
    // A batch that skips one does not continue it.
    assert!(!joined.append(&batches[2]));
    assert_eq!(joined, batches[0]);
    for b in &batches[1..] {
        assert!(joined.append(b));
    }
    assert_eq!((joined.after, joined.head.seq, joined.ops.len()), (Seq(0), Seq(12), 12));
    // Another origin's batch does not continue it either.
    let (o, o_writer, o_signer) = open(&dir, "o.redb", WriterConfig::default());
    o_writer
        .local(vec![LocalIntent::Put { register: "r".into(), key: b"x".to_vec(), value: b"y".to_vec() }])
        .await
        .unwrap();
    let other = o.read_batches(&o_signer.origin(), Seq(0), 10, usize::MAX).unwrap().remove(0);
    assert!(!joined.clone().append(&other));

    let (b, b_writer, _) = open(&dir, "b.redb", WriterConfig::default());
    let verified = joined.clone().verify(b.chain_at(&origin, Seq(0)).unwrap().unwrap(), 1000).unwrap();
    assert!(matches!(b_writer.remote(verified).await.unwrap(), RemoteOutcome::Applied { .. }));
    assert_eq!(b.version_vector(), a.version_vector());
    assert_eq!(b.state_root(), a.state_root());

    // A joined batch with a batch left out of its middle does not verify.
    let mut holed = batches[0].clone();
    holed.ops.extend(batches[2].ops.iter().cloned());
    holed.head = batches[2].head.clone();
    assert!(holed.verify(a.chain_at(&origin, Seq(0)).unwrap().unwrap(), 1000).is_err());
}

/// A batch that overlaps ops already applied applies only the rest, each op with its own value:
/// puts, overwrites and deletes (whose tombstones add nothing to the root) land as on the origin.
#[tokio::test]
async fn a_batch_overlapping_applied_ops_applies_each_new_op_once() {
    let dir = tempfile::tempdir().unwrap();
    let (a, a_writer, a_signer) = open(&dir, "a.redb", WriterConfig { batch_max_ops: 2, ..Default::default() });
    let origin = a_signer.origin();
    let put =
        |key: &[u8], value: &[u8]| LocalIntent::Put { register: "r".into(), key: key.to_vec(), value: value.to_vec() };
    let delete = |key: &[u8]| LocalIntent::Delete { register: "r".into(), key: key.to_vec() };
    for intents in [
        vec![put(b"a", b"1"), put(b"b", b"1")],
        vec![put(b"a", b"2"), delete(b"b")],
        vec![put(b"c", b"1"), LocalIntent::CounterAdd { counter: "c".into(), key: b"k".to_vec(), delta: 3 }],
        vec![delete(b"c"), put(b"b", b"3")],
    ] {
        a_writer.local(intents).await.unwrap();
    }
    let batches = a.read_batches(&origin, Seq(0), 1000, usize::MAX).unwrap();
    assert_eq!(batches.len(), 4);

    let (b, b_writer, _) = open(&dir, "b.redb", WriterConfig::default());
    let genesis = b.chain_at(&origin, Seq(0)).unwrap().unwrap();
    let first = batches[0].clone().verify(genesis, 1000).unwrap();
    assert_eq!(b_writer.remote(first).await.unwrap(), RemoteOutcome::Applied { ops: 2 });
    // Ops 1..=8 under the last head, of which B holds 1 and 2.
    let mut all = batches[0].clone();
    for next in &batches[1..] {
        assert!(all.append(next));
    }
    let overlapping = all.verify(genesis, 1000).unwrap();
    assert_eq!(b_writer.remote(overlapping).await.unwrap(), RemoteOutcome::Applied { ops: 6 });

    assert_eq!(b.version_vector(), a.version_vector());
    assert_eq!(b.state_root(), a.state_root());
    for key in [&b"a"[..], b"b", b"c"] {
        assert_eq!(b.register("r", key).unwrap(), a.register("r", key).unwrap(), "key {key:?}");
    }
    assert_eq!(b.register("r", b"a").unwrap().unwrap().value.as_deref(), Some(&b"2"[..]));
    assert_eq!(b.register("r", b"b").unwrap().unwrap().value.as_deref(), Some(&b"3"[..]));
    assert!(b.register("r", b"c").unwrap().is_none_or(|v| v.value.is_none()));
    assert_eq!(b.counter("c", b"k").unwrap(), 3);
}

/// Peers' ops are applied without fsync (visible at once, from the memtable) and made durable by
/// `flush` or a clean close; local writes are durable before they are acknowledged; the log always
/// matches the version vector. (A SIGKILL of a replica before a flush is exercised by the process
/// tests in `binary.rs`: the restarted node pulls whatever it lost.)
#[tokio::test]
async fn peers_ops_are_visible_at_once_and_durable_after_flush_or_clean_close() {
    let dir = tempfile::tempdir().unwrap();
    let (a, a_writer, a_signer) = open(&dir, "a.redb", WriterConfig::default());
    let origin = a_signer.origin();
    for i in 0..3u8 {
        a_writer.local(vec![LocalIntent::Put { register: "r".into(), key: vec![i], value: vec![i] }]).await.unwrap();
    }
    let batches = a.read_batches(&origin, Seq(0), 100, usize::MAX).unwrap();

    let apply_all = |writer: peersync::store::WriteHandle, store: Store, batches: Vec<peersync::op::OpBatch>| async move {
        for b in batches {
            let prev = store.chain_at(&origin, b.after).unwrap().unwrap();
            writer.remote(b.verify(prev, 100).unwrap()).await.unwrap();
        }
    };
    // No flush: the writer's channel closes without a stop, then the database closes cleanly.
    {
        let b = Store::open(&dir.path().join("b.redb")).unwrap();
        let (events, _) = tokio::sync::broadcast::channel(16);
        let (b_writer, join) =
            b.spawn_writer(Signer::new(libp2p::identity::Keypair::generate_ed25519()), WriterConfig::default(), events);
        apply_all(b_writer.clone(), b.clone(), batches.clone()).await;
        assert_eq!(b.version_vector().get(&origin), Seq(3), "visible at once");
        drop(b_writer);
        join.join().unwrap();
    }
    let b = Store::open(&dir.path().join("b.redb")).unwrap();
    assert_eq!(b.version_vector().get(&origin), Seq(3), "a clean close persists them");
    assert!(b.check_log().unwrap().problems.is_empty());
    drop(b);

    // Applying them again is a no-op; a flush and a local write after it are durable.
    {
        let b = Store::open(&dir.path().join("b.redb")).unwrap();
        let (events, _) = tokio::sync::broadcast::channel(16);
        let (b_writer, join) =
            b.spawn_writer(Signer::new(libp2p::identity::Keypair::generate_ed25519()), WriterConfig::default(), events);
        apply_all(b_writer.clone(), b.clone(), batches).await;
        b_writer.flush().await;
        // A local write after the flush is durable on its own.
        b_writer
            .local(vec![LocalIntent::Put { register: "r".into(), key: b"mine".to_vec(), value: vec![9] }])
            .await
            .unwrap();
        drop(b_writer);
        join.join().unwrap();
    }
    let b = Store::open(&dir.path().join("b.redb")).unwrap();
    assert_eq!(b.version_vector().get(&origin), Seq(3));
    assert_eq!(b.register("r", b"mine").unwrap().and_then(|v| v.value), Some(vec![9]));
    assert!(b.check_log().unwrap().problems.is_empty());
}

/// Peers' ops applied in the memtable (half of them written to redb first, the rest still in
/// memory) read exactly as on the store that wrote them: point reads, pages of a listing with
/// deletes among them, counters, tombstones, repair entries, the log as relays serve it and its
/// check. With a memtable bound of one byte every group is written out as it lands, and the reads
/// are the same. A local write to a key the memtable holds wins, and keeps winning on disk.
#[tokio::test]
async fn peers_ops_in_the_memtable_read_as_on_the_origin() {
    let dir = tempfile::tempdir().unwrap();
    let (a, a_writer, a_signer) = open(&dir, "a.redb", WriterConfig::default());
    let origin = a_signer.origin();
    for i in 0..40u8 {
        let intent = match i % 5 {
            3 => LocalIntent::Delete { register: "r".into(), key: vec![i - 3] },
            4 => LocalIntent::CounterAdd { counter: "c".into(), key: b"k".to_vec(), delta: i.into() },
            _ => LocalIntent::Put { register: "r".into(), key: vec![i], value: vec![i; 30] },
        };
        a_writer.local(vec![intent]).await.unwrap();
    }
    let batches = a.read_batches(&origin, Seq(0), 1000, usize::MAX).unwrap();
    let all: Vec<u32> = (0..4096).collect();
    let sorted = |mut e: Vec<peersync::snapshot::StateEntry>| {
        e.sort_by(|x, y| (x.kind as u8, &x.collection, &x.key).cmp(&(y.kind as u8, &y.collection, &y.key)));
        e
    };
    for (name, bound) in [("b.redb", peersync::store::DEFAULT_MEMTABLE_BYTES), ("c.redb", 1)] {
        let b = Store::open(&dir.path().join(name)).unwrap();
        let (events, _) = tokio::sync::broadcast::channel(1024);
        let config = WriterConfig { memtable_bytes: bound, ..Default::default() };
        let (b_writer, join) =
            b.spawn_writer(Signer::new(libp2p::identity::Keypair::generate_ed25519()), config, events);
        for (n, batch) in batches.iter().enumerate() {
            let prev = b.chain_at(&origin, batch.after).unwrap().unwrap();
            b_writer.remote(batch.clone().verify(prev, 1000).unwrap()).await.unwrap();
            if n == batches.len() / 2 {
                b_writer.persist().await.unwrap();
            }
        }
        assert_eq!(b.state_root(), a.state_root(), "{name}");
        for key in 0..40u8 {
            assert_eq!(b.register("r", &[key]).unwrap(), a.register("r", &[key]).unwrap(), "{name} key {key}");
        }
        assert_eq!(b.counter("c", b"k").unwrap(), a.counter("c", b"k").unwrap());
        for limit in [1, 3, 100] {
            let (mut pages_a, mut pages_b) = (Vec::new(), Vec::new());
            for (store, pages) in [(&a, &mut pages_a), (&b, &mut pages_b)] {
                let mut after = None;
                loop {
                    let page = store.list_register("r", &[], after.as_deref(), limit).unwrap();
                    pages.push(page.entries);
                    match page.next_after {
                        Some(k) => after = Some(k),
                        None => break,
                    }
                }
            }
            assert_eq!(pages_b, pages_a, "{name}: pages of {limit}");
        }
        assert_eq!(b.tombstones().unwrap(), a.tombstones().unwrap(), "{name}");
        assert_eq!(b.log_len().unwrap(), 40);
        assert_eq!(sorted(b.entries_in_buckets(&all).unwrap()), sorted(a.entries_in_buckets(&all).unwrap()));
        for after in 0..40 {
            assert_eq!(
                b.read_log(&origin, Seq(after), 7, usize::MAX).unwrap(),
                a.read_log(&origin, Seq(after), 7, usize::MAX).unwrap()
            );
            assert_eq!(b.chain_at(&origin, Seq(after + 1)).unwrap(), a.chain_at(&origin, Seq(after + 1)).unwrap());
        }
        let report = b.check_log().unwrap();
        assert!(report.problems.is_empty(), "{name}: {:?}", report.problems);
        assert_eq!(report.ops, 40);

        // The last put of A is in B's memtable (or just written out); B's own write is newer.
        b_writer
            .local(vec![LocalIntent::Put { register: "r".into(), key: vec![37], value: b"b".to_vec() }])
            .await
            .unwrap();
        assert_eq!(b.register("r", &[37]).unwrap().unwrap().value.as_deref(), Some(&b"b"[..]));
        b_writer.stop().await;
        join.join().unwrap();
        drop(b);
        let b = Store::open(&dir.path().join(name)).unwrap();
        assert_eq!(b.register("r", &[37]).unwrap().unwrap().value.as_deref(), Some(&b"b"[..]), "{name}");
        assert!(b.check_log().unwrap().problems.is_empty());
        assert_eq!(b.log_len().unwrap(), 41);
    }
}
