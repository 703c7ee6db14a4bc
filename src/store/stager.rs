//! Staging the chunks of a snapshot being pulled, in turns (see [`Stager`]).

use std::sync::{Arc, Mutex};

use cid::Cid;
use redb::WriteTransaction;

use super::{staging, Store, StoreError};

/// Stages chunks into the state database in turns: staging is serialized on its write lock, so the
/// chunks that arrive while one turn runs are staged together in the next, in one transaction (what
/// is staged so far is read and written once per turn, not per chunk; one commit). A refusal in a
/// shared turn stages that turn's chunks again one by one, so it refuses only its own chunk.
#[derive(Default)]
pub(crate) struct Stager {
    waiting: Mutex<Vec<Arc<Waiting>>>,
    turn: Mutex<()>,
}

struct Waiting {
    manifest: Cid,
    chunk: staging::PreparedChunk,
    result: Mutex<Option<Result<bool, StoreError>>>,
}

impl Stager {
    /// Stages `chunk` for `manifest`, with whatever else is waiting when its turn comes. Returns
    /// false when it was staged already.
    pub(super) fn stage(
        &self,
        store: &Store,
        manifest: Cid,
        chunk: staging::PreparedChunk,
    ) -> Result<bool, StoreError> {
        let me = Arc::new(Waiting { manifest, chunk, result: Mutex::new(None) });
        self.waiting.lock().expect("stager lock").push(me.clone());
        let _turn = self.turn.lock().expect("stager turn");
        if me.result.lock().expect("stage result").is_none() {
            // Not staged by an earlier turn: it is in the queue, with all that came before the turn.
            let turn = std::mem::take(&mut *self.waiting.lock().expect("stager lock"));
            Self::run(store, &turn);
        }
        let result = me.result.lock().expect("stage result").take();
        result.expect("a turn stages every chunk it takes")
    }

    fn run(store: &Store, turn: &[Arc<Waiting>]) {
        let started = std::time::Instant::now();
        let manifest = turn[0].manifest;
        let together = turn.len() > 1 && turn.iter().all(|w| w.manifest == manifest);
        if together {
            let chunks: Vec<&staging::PreparedChunk> = turn.iter().map(|w| &w.chunk).collect();
            if let Ok(fresh) = Self::transact(store, |txn| staging::stage_many(txn, &manifest, &chunks)) {
                for (w, f) in turn.iter().zip(fresh) {
                    *w.result.lock().expect("stage result") = Some(Ok(f));
                }
                tracing::debug!(chunks = turn.len(), took = ?started.elapsed(), "chunks staged");
                return;
            }
        }
        for w in turn {
            let r = Self::transact(store, |txn| staging::stage(txn, &w.manifest, &w.chunk));
            *w.result.lock().expect("stage result") = Some(r);
        }
        tracing::debug!(chunks = turn.len(), took = ?started.elapsed(), shared = together, "chunks staged one by one");
    }

    /// Runs `f` in a staging transaction. Staging commits are never fsynced (the install's commit
    /// is): staging lost in a crash is redone at install from the held chunks, with nothing fetched
    /// again.
    fn transact<T>(store: &Store, f: impl FnOnce(&WriteTransaction) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let mut txn = store.db().begin_write()?;
        txn.set_durability(redb::Durability::None)?;
        let value = f(&txn)?;
        txn.commit()?;
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::{ChunkBuilder, Kind, StateEntry};

    /// A chunk of counters `keys` (each an empty counter), prepared to stage.
    fn chunk(keys: std::ops::Range<u8>) -> staging::PreparedChunk {
        let mut builder = ChunkBuilder::new(1 << 20);
        let value = crate::store::encoding::encode(&crate::crdt::PnCounter::default());
        for k in keys {
            let e = StateEntry { kind: Kind::Counter, collection: "c".into(), key: vec![k], value: value.clone() };
            assert!(builder.push(&e).unwrap().is_none());
        }
        let c = builder.finish().unwrap().unwrap();
        staging::prepare_chunk(&c.chunk_ref(), &c.bytes, u64::MAX).unwrap()
    }

    fn waiting(manifest: Cid, chunk: staging::PreparedChunk) -> Arc<Waiting> {
        Arc::new(Waiting { manifest, chunk, result: Mutex::new(None) })
    }

    fn result(w: &Waiting) -> Result<bool, StoreError> {
        w.result.lock().unwrap().take().expect("staged")
    }

    #[test]
    fn a_turn_stages_its_chunks_together_and_a_refusal_refuses_only_its_own_chunk() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb")).unwrap();
        let manifest = crate::op::raw_cid(b"manifest");
        // One transaction for three chunks, one of them staged already.
        let (a, b) = (chunk(0..10), chunk(10..20));
        let again = chunk(0..10);
        let turn = [waiting(manifest, a), waiting(manifest, b), waiting(manifest, again)];
        Stager::run(&store, &turn);
        let results: Vec<bool> = turn.iter().map(|w| result(w).unwrap()).collect();
        assert_eq!(results, vec![true, true, false]);
        let staged = |store: &Store| {
            let txn = store.db().begin_write().unwrap();
            let s = staging::Staged::load(&txn).unwrap();
            (s.counts.values().sum::<u64>(), s.buckets.root())
        };
        assert_eq!(staged(&store).0, 20);

        // A chunk repeating a staged key is refused; the others of its turn are staged all the same.
        let (c, clash, d) = (chunk(20..30), chunk(25..26), chunk(30..40));
        let turn = [waiting(manifest, c), waiting(manifest, clash), waiting(manifest, d)];
        Stager::run(&store, &turn);
        assert!(result(&turn[0]).unwrap());
        assert!(matches!(result(&turn[1]), Err(StoreError::Snapshot(_))));
        assert!(result(&turn[2]).unwrap());
        let (count, root) = staged(&store);
        assert_eq!(count, 40);

        // The same chunks staged one turn each give the same staged state.
        let dir2 = tempfile::tempdir().unwrap();
        let other = Store::open(&dir2.path().join("s.redb")).unwrap();
        for keys in [0..10, 10..20, 20..30, 30..40] {
            let turn = [waiting(manifest, chunk(keys))];
            Stager::run(&other, &turn);
            assert!(result(&turn[0]).unwrap());
        }
        assert_eq!(staged(&other), (count, root));
    }

    #[test]
    fn chunks_staged_from_many_threads_are_each_answered() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb")).unwrap();
        let manifest = crate::op::raw_cid(b"manifest");
        let threads: Vec<_> = (0..8u8)
            .map(|i| {
                let store = store.clone();
                std::thread::spawn(move || store.stager.stage(&store, manifest, chunk(i * 10..i * 10 + 10)))
            })
            .collect();
        for t in threads {
            assert!(t.join().unwrap().unwrap());
        }
        let txn = store.db().begin_write().unwrap();
        assert_eq!(staging::Staged::load(&txn).unwrap().counts.values().sum::<u64>(), 80);
    }
}
