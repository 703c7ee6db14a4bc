//! Handing each commit to readers: the published mirror, its state root (hashed once per commit, on
//! first ask) and the callers waiting for an op to be applied.
//!
//! A commit copies to the published mirror only what it changed (the buckets it touched and the
//! progress of the origins it advanced), and wakes only the waiters whose op it applied: the cost of
//! publishing a one-op commit does not grow with the state or with the number of waiters.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::OnceLock;

use tokio::sync::oneshot;

use super::buckets::DirtyBuckets;
use super::{Mirror, Store};
use crate::ids::{Origin, Seq, StateRoot, Token};

/// What readers see: the mirror of the last commit and, once someone asked, its state root.
pub(super) struct Published {
    pub mirror: Mirror,
    root: OnceLock<StateRoot>,
}

impl Published {
    pub fn new(mirror: Mirror) -> Self {
        Published { mirror, root: OnceLock::new() }
    }

    /// The state root of the published mirror: hashed at most once per commit.
    pub fn root(&self) -> StateRoot {
        *self.root.get_or_init(|| self.mirror.buckets.root())
    }
}

/// What one commit changed of the writer's mirror.
#[derive(Default)]
pub(super) struct Changed {
    pub buckets: DirtyBuckets,
    pub origins: BTreeSet<Origin>,
}

/// Waiting for a waiter's op to be applied gives up once this many waiters are pending: an
/// unbounded number of long-polls for ops that never come must not grow memory without bound.
pub const MAX_WAITERS: usize = 65_536;

/// Callers waiting for an op of an origin to be applied, in seq order per origin.
#[derive(Default)]
pub(super) struct Waiters {
    by_origin: HashMap<Origin, BTreeMap<(Seq, u64), oneshot::Sender<()>>>,
    next_id: u64,
    len: usize,
}

impl Waiters {
    fn add(&mut self, token: &Token) -> Option<oneshot::Receiver<()>> {
        if self.len >= MAX_WAITERS {
            self.prune();
            if self.len >= MAX_WAITERS {
                return None;
            }
        }
        let (tx, rx) = oneshot::channel();
        self.next_id += 1;
        self.by_origin.entry(token.origin).or_default().insert((token.seq, self.next_id), tx);
        self.len += 1;
        Some(rx)
    }

    /// Wakes every waiter of `origin` for an op at or below `reached`.
    fn wake(&mut self, origin: &Origin, reached: Seq) {
        let Some(waiting) = self.by_origin.get_mut(origin) else {
            return;
        };
        let later = waiting.split_off(&(Seq(reached.0.saturating_add(1)), 0));
        let done = std::mem::replace(waiting, later);
        self.len -= done.len();
        for (_, tx) in done {
            let _ = tx.send(());
        }
        if waiting.is_empty() {
            self.by_origin.remove(origin);
        }
    }

    /// Drops the waiters that stopped waiting (timed out, or their request went away).
    fn prune(&mut self) {
        for waiting in self.by_origin.values_mut() {
            waiting.retain(|_, tx| !tx.is_closed());
        }
        self.by_origin.retain(|_, w| !w.is_empty());
        self.len = self.by_origin.values().map(BTreeMap::len).sum();
    }
}

/// How a wait for an op ended before the op was applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitRefused {
    /// [`MAX_WAITERS`] callers are waiting already.
    TooManyWaiters,
}

impl Store {
    /// Publishes the writer's mirror after a commit: only the `changed` parts are copied, or all of
    /// it when `changed` is `None` (a snapshot install or an entry merge). Then wakes the waiters
    /// of the ops it applied and sends the version vector to its watchers.
    pub(super) fn publish(&self, working: &Mirror, changed: Option<&Changed>) {
        {
            let mut published = self.mirror.write().expect("mirror lock");
            match changed {
                Some(c) => {
                    let m = &mut published.mirror;
                    for b in c.buckets.iter() {
                        m.buckets.0[b] = working.buckets.0[b];
                    }
                    for origin in &c.origins {
                        if let Some(p) = working.progress.get(origin) {
                            m.progress.insert(*origin, *p);
                        }
                    }
                    m.hlc = working.hlc;
                    m.collected = working.collected;
                    debug_assert!(m.buckets == working.buckets && m.progress == working.progress);
                }
                None => published.mirror = working.clone(),
            }
            published.root = OnceLock::new();
        }
        {
            let mut waiters = self.waiters.lock().expect("waiters lock");
            match changed {
                Some(c) => {
                    for origin in &c.origins {
                        if let Some(p) = working.progress.get(origin) {
                            waiters.wake(origin, p.seq);
                        }
                    }
                }
                None => {
                    for (origin, p) in &working.progress {
                        waiters.wake(origin, p.seq);
                    }
                }
            }
        }
        let vv = working.version_vector();
        self.vv_watch.send_if_modified(|current| {
            let modified = *current != vv;
            *current = vv;
            modified
        });
    }

    /// Resolves once the op named by `token` is applied here; at once if it already is. Only the
    /// commit that applies it wakes the caller.
    pub async fn applied(&self, token: &Token) -> Result<(), WaitRefused> {
        let rx = {
            let mut waiters = self.waiters.lock().expect("waiters lock");
            // Checked under the waiters' lock: a commit publishes its progress before it takes the
            // lock to wake, so either the op shows here or that commit wakes this waiter.
            if self.progress(&token.origin).seq >= token.seq {
                return Ok(());
            }
            waiters.add(token).ok_or(WaitRefused::TooManyWaiters)?
        };
        // The sender lives in the store for as long as the waiter is pending; a store dropped with
        // it pending has no op left to apply either.
        let _ = rx.await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(origin: Origin, seq: u64) -> Token {
        Token { origin, seq: Seq(seq) }
    }

    #[test]
    fn wake_answers_the_waiters_reached_and_keeps_the_rest() {
        let a = Origin::random();
        let b = Origin::random();
        let mut w = Waiters::default();
        let mut a3 = w.add(&token(a, 3)).unwrap();
        let mut a5 = w.add(&token(a, 5)).unwrap();
        let mut b1 = w.add(&token(b, 1)).unwrap();
        w.wake(&a, Seq(4));
        assert_eq!(a3.try_recv(), Ok(()));
        assert!(a5.try_recv().is_err());
        assert!(b1.try_recv().is_err());
        assert_eq!(w.len, 2);
        w.wake(&a, Seq(5));
        assert_eq!(a5.try_recv(), Ok(()));
        assert_eq!(w.len, 1);
        assert!(!w.by_origin.contains_key(&a));
    }

    #[test]
    fn waiters_that_gave_up_are_pruned_when_the_bound_is_reached() {
        let a = Origin::random();
        let mut w = Waiters::default();
        for seq in 0..MAX_WAITERS as u64 {
            drop(w.add(&token(a, seq + 1)).unwrap());
        }
        assert_eq!(w.len, MAX_WAITERS);
        let kept = w.add(&token(a, 1)).expect("room once the abandoned waiters are pruned");
        assert_eq!(w.len, 1);
        drop(kept);
    }
}
