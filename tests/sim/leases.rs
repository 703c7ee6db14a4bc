//! Lease clients and the lease invariant. Clients ask primaries to acquire, renew and release
//! leases on a few keys; the simulator records what each holder was told and checks, at every
//! answer, what no two holders may ever see (the engine's lease group decides; nothing here does):
//!
//! - a holder holds from the moment its grant is answered until the expiry it was told (read on
//!   the granting node's clock) or until it asks to release, whichever comes first;
//! - two different holders of one key never hold at overlapping times;
//! - a key's fencing tokens are never shared by two holders, and a later holder's token is larger.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use peersync::crdt::{LeaseGrant, LeaseRequest};
use peersync::ids::Role;
use peersync::sync::leases::{LeaseFailure, LeaseWait};
use rand::rngs::StdRng;
use rand::Rng;

use crate::cluster::Cluster;

/// What the sim's wall clocks read at simulated time zero (ms since the Unix epoch).
pub const EPOCH_MS: u64 = 1_800_000_000_000;

pub const HOLDERS: [&str; 3] = ["ann", "bob", "cy"];
pub const KEYS: u8 = 3;

/// A lease request in flight.
#[derive(Debug, Clone)]
pub struct Ask {
    pub key: u8,
    pub holder: &'static str,
    pub release: bool,
}

/// What a holder was told it holds.
#[derive(Debug, Clone)]
#[allow(dead_code)] // `node` is for the failure message (Debug)
pub struct Held {
    pub holder: &'static str,
    pub token: u64,
    /// The primary that granted it.
    pub node: usize,
    /// Simulated times: answered, and the end of the holder's view.
    pub from: Duration,
    pub until: Duration,
}

/// Every lease outcome of a run.
#[derive(Debug, Default)]
pub struct LeaseBook {
    /// Per key, the holdings answered so far.
    pub held: BTreeMap<u8, Vec<Held>>,
    /// (key, holder) pairs with a request in flight: a client asks one thing at a time.
    pub busy: BTreeMap<(u8, &'static str), usize>,
    pub granted: u64,
    pub refused: u64,
    pub no_quorum: u64,
}

impl Cluster {
    /// A client asks primary `n` (if up) for a lease on a random key; a third of the requests of a
    /// holder that holds one are renewals or releases.
    pub fn lease(&mut self, n: usize, r: &mut StdRng) {
        if self.nodes[n].role != Role::Primary || self.nodes[n].live.is_none() {
            return;
        }
        let key = r.gen_range(0..KEYS);
        let holder = HOLDERS[r.gen_range(0..HOLDERS.len())];
        if self.leases.busy.contains_key(&(key, holder)) {
            return;
        }
        let ttl_ms = r.gen_range(200..=2_000);
        let (request, release) = match r.gen_range(0..6) {
            0 => (LeaseRequest::Release { holder: holder.into() }, true),
            1 => (LeaseRequest::Renew { holder: holder.into(), ttl_ms }, false),
            _ => (LeaseRequest::Acquire { holder: holder.into(), ttl_ms }, false),
        };
        if release {
            // The holder stops using the lease the moment it asks to let it go.
            let now = self.net.now;
            for h in self.leases.held.entry(key).or_default().iter_mut().filter(|h| h.holder == holder) {
                h.until = h.until.min(now);
            }
        }
        self.next_id += 1;
        let wait = LeaseWait(self.next_id);
        let timeout = Duration::from_millis(r.gen_range(500..=3_000));
        self.leases.busy.insert((key, holder), n);
        let live = self.nodes[n].live.as_mut().expect("up");
        live.lease_waits.insert(wait, Ask { key, holder, release });
        let input = peersync::sync::Input::Lease { wait, lease: "sim".into(), key: vec![key], request, timeout };
        self.feed(n, input);
    }

    /// A crashed node's requests never answer: their clients give up (and may ask again).
    pub(crate) fn forget_lease_asks(&mut self, n: usize) {
        self.leases.busy.retain(|_, node| *node != n);
    }

    /// The answer to a lease request of node `n`: recorded and checked against every earlier one.
    pub(crate) fn on_lease_done(&mut self, n: usize, wait: LeaseWait, result: Result<LeaseGrant, LeaseFailure>) {
        let seed = self.seed;
        let live = self.nodes[n].live.as_mut().expect("up");
        let Some(ask) = live.lease_waits.remove(&wait) else {
            panic!("seed {seed}: node {n} answered lease request {wait:?} twice, or one it was never given")
        };
        self.leases.busy.remove(&(ask.key, ask.holder));
        let grant = match result {
            Ok(g) => g,
            Err(LeaseFailure::Refused(_)) => {
                self.leases.refused += 1;
                return;
            }
            Err(LeaseFailure::NoQuorum(_)) => {
                self.leases.no_quorum += 1;
                return;
            }
        };
        self.leases.granted += 1;
        if ask.release {
            assert_eq!(grant.holder, None, "seed {seed}: a release answered with a holder");
            return;
        }
        assert_eq!(grant.holder.as_deref(), Some(ask.holder), "seed {seed}: a grant to another holder");
        let now = self.net.now;
        let until = self.wall_to_sim(n, grant.expires_at_ms).max(now);
        let new = Held { holder: ask.holder, token: grant.token, node: n, from: now, until };
        for old in self.leases.held.entry(ask.key).or_default().iter() {
            if old.holder == new.holder {
                continue;
            }
            assert_ne!(
                old.token, new.token,
                "seed {seed}: key {} token {} granted to two holders: {old:?} and {new:?}",
                ask.key, new.token
            );
            assert!(
                old.until <= new.from,
                "seed {seed}: key {} granted to {} at {:?} while {} held it until {:?}: {old:?} then {new:?}",
                ask.key,
                new.holder,
                new.from,
                old.holder,
                old.until
            );
            assert!(
                old.token < new.token,
                "seed {seed}: key {}: a later holder got a smaller token: {old:?} then {new:?}",
                ask.key
            );
        }
        self.leases.held.entry(ask.key).or_default().push(new);
    }

    /// The node's wall clock reading at simulated time `t` (ms since the epoch).
    pub(crate) fn wall_ms(&self, n: usize, t: Duration) -> u64 {
        let c = &self.nodes[n].clock;
        EPOCH_MS + c.at(t).duration_since(c.base).as_millis() as u64
    }

    /// The first simulated time at which node `n`'s wall clock reads `ms`.
    fn wall_to_sim(&self, n: usize, ms: u64) -> Duration {
        let c = &self.nodes[n].clock;
        let at: Instant = c.base + Duration::from_millis(ms.saturating_sub(EPOCH_MS));
        c.when(at)
    }
}
