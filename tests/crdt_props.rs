//! Property tests: CRDT merges are commutative, associative and idempotent, and a store that applies
//! the same ops in any order (each origin's ops in their own order) ends with the same state and root.

use std::collections::BTreeMap;

use peersync::crdt::{Contribution, Hlc, LeaseState, PnCounter, RegisterValue};
use peersync::ids::{Origin, Seq};
use peersync::op::{ChainHash, Op, OpBatch, OpBody, Signer};
use peersync::store::{Store, WriterConfig};
use proptest::prelude::*;
use serde_bytes::ByteBuf;

fn origins() -> &'static [Origin] {
    use std::sync::OnceLock;
    static O: OnceLock<Vec<Origin>> = OnceLock::new();
    O.get_or_init(|| (0..3).map(|_| libp2p::identity::Keypair::generate_ed25519().public().to_peer_id()).collect())
}

fn origin() -> impl Strategy<Value = Origin> {
    (0..3usize).prop_map(|i| origins()[i])
}

fn hlc() -> impl Strategy<Value = Hlc> {
    (0..5u64, 0..3u32).prop_map(|(w, l)| Hlc::new(w, l))
}

fn register() -> impl Strategy<Value = RegisterValue> {
    (hlc(), origin(), prop::option::of(prop::collection::vec(any::<u8>(), 0..3)))
        .prop_map(|(hlc, origin, value)| RegisterValue { hlc, origin, value })
}

fn counter() -> impl Strategy<Value = PnCounter> {
    prop::collection::btree_map(origin(), (0..100u64, 0..100u64), 0..3).prop_map(|m| PnCounter {
        contributions: m.into_iter().map(|(o, (incr, decr))| (o, Contribution { incr, decr })).collect(),
    })
}

fn lease() -> impl Strategy<Value = LeaseState> {
    (prop::option::of("[ab]"), 0..3u64, 0..3u64, hlc(), origin()).prop_map(
        |(holder, token, expires_at_ms, hlc, origin)| LeaseState { holder, token, expires_at_ms, hlc, origin },
    )
}

proptest! {
    #[test]
    fn register_merge_is_a_semilattice(a in register(), b in register(), c in register()) {
        prop_assert_eq!(a.clone().merge(b.clone()), b.clone().merge(a.clone()));
        prop_assert_eq!(a.clone().merge(b.clone()).merge(c.clone()), a.clone().merge(b.clone().merge(c.clone())));
        prop_assert_eq!(a.clone().merge(a.clone()), a);
    }

    #[test]
    fn counter_merge_is_a_semilattice(a in counter(), b in counter(), c in counter()) {
        prop_assert_eq!(a.clone().merge(&b), b.clone().merge(&a));
        prop_assert_eq!(a.clone().merge(&b).merge(&c), a.clone().merge(&b.clone().merge(&c)));
        prop_assert_eq!(a.clone().merge(&a), a);
    }

    #[test]
    fn lease_merge_is_a_semilattice(a in lease(), b in lease(), c in lease()) {
        prop_assert_eq!(a.clone().merge(b.clone()), b.clone().merge(a.clone()));
        prop_assert_eq!(a.clone().merge(b.clone()).merge(c.clone()), a.clone().merge(b.clone().merge(c.clone())));
        prop_assert_eq!(a.clone().merge(a.clone()), a);
    }

    #[test]
    fn counter_counts_every_delta_once(deltas in prop::collection::vec((origin(), -1000i64..1000), 0..40)) {
        let mut c = PnCounter::default();
        for (o, d) in &deltas {
            c.add(*o, *d);
        }
        prop_assert_eq!(c.value(), deltas.iter().map(|(_, d)| d).sum::<i64>());
        prop_assert_eq!(c.clone().merge(&c), c);
    }
}

/// One op body over a small key space so that ops collide.
fn body() -> impl Strategy<Value = OpBody> {
    let key = (0..4u8).prop_map(|k| vec![b'k', b'0' + k]);
    prop_oneof![
        (key.clone(), prop::collection::vec(any::<u8>(), 0..4))
            .prop_map(|(key, value)| { OpBody::RegisterPut { register: "r".into(), key, value } }),
        key.clone().prop_map(|key| OpBody::RegisterDelete { register: "r".into(), key }),
        (key.clone(), -5i64..5).prop_map(|(key, delta)| OpBody::CounterAdd { counter: "c".into(), key, delta }),
        (key, prop::option::of("[ab]"), 0..3u64, 0..10u64).prop_map(|(key, holder, token, expires_at_ms)| {
            OpBody::LeaseSet { lease: "l".into(), key, holder, token, expires_at_ms }
        }),
    ]
}

/// Signed single-op batches for each origin, in each origin's seq order.
fn signed_logs(signers: &[Signer], bodies: &[(usize, u64, OpBody)]) -> Vec<Vec<OpBatch>> {
    let mut logs = vec![Vec::new(); signers.len()];
    let mut chains = vec![ChainHash::GENESIS; signers.len()];
    for (who, wall, body) in bodies {
        let s = &signers[*who];
        let seq = Seq(logs[*who].len() as u64 + 1);
        let op = Op { origin: s.origin(), seq, hlc: Hlc::new(*wall, 0), body: body.clone() };
        let bytes = op.encode();
        chains[*who] = chains[*who].extend(blake3::hash(&bytes).as_bytes());
        logs[*who].push(OpBatch {
            after: Seq(seq.0 - 1),
            ops: vec![ByteBuf::from(bytes)],
            head: s.sign_head(seq, chains[*who]),
        });
    }
    logs
}

/// Applies the logs interleaved as `order` says (an index into the origins, taken while it has ops
/// left) and returns the resulting state root and a dump of the state.
fn apply_interleaved(logs: &[Vec<OpBatch>], order: &[usize]) -> (String, BTreeMap<String, String>) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("s.redb")).unwrap();
    let me = Signer::new(libp2p::identity::Keypair::generate_ed25519());
    let (events, _) = tokio::sync::broadcast::channel(16);
    let (writer, _join) = store.spawn_writer(me, WriterConfig::default(), events);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let mut next = vec![0usize; logs.len()];
    let total: usize = logs.iter().map(Vec::len).sum();
    for pick in order.iter().cycle().take(total * logs.len()) {
        // Take the origin `order` names, or the first one with ops left once it has none.
        let Some(who) = Some(pick % logs.len())
            .filter(|w| next[*w] < logs[*w].len())
            .or_else(|| (0..logs.len()).find(|w| next[*w] < logs[*w].len()))
        else {
            break;
        };
        let prev = if next[who] == 0 { ChainHash::GENESIS } else { logs[who][next[who] - 1].head.head };
        let verified = logs[who][next[who]].clone().verify(prev, 10).unwrap();
        rt.block_on(writer.remote(verified)).unwrap();
        next[who] += 1;
    }
    assert!(next.iter().zip(logs).all(|(n, l)| *n == l.len()), "every op applied");
    let mut dump = BTreeMap::new();
    for k in 0..4u8 {
        let key = [b'k', b'0' + k];
        dump.insert(format!("r/{k}"), format!("{:?}", store.register("r", &key).unwrap()));
        dump.insert(format!("c/{k}"), format!("{:?}", store.counter("c", &key).unwrap()));
        dump.insert(format!("l/{k}"), format!("{:?}", store.lease("l", &key).unwrap()));
    }
    let report = store.check_log().unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    (store.state_root().0.to_string(), dump)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

    #[test]
    fn any_interleaving_gives_the_same_state_and_root(
        bodies in prop::collection::vec((0..3usize, 0..6u64, body()), 1..30),
        order_a in prop::collection::vec(0..3usize, 1..20),
        order_b in prop::collection::vec(0..3usize, 1..20),
    ) {
        let signers: Vec<Signer> = (0..3).map(|_| Signer::new(libp2p::identity::Keypair::generate_ed25519())).collect();
        let logs = signed_logs(&signers, &bodies);
        let (root_a, state_a) = apply_interleaved(&logs, &order_a);
        let (root_b, state_b) = apply_interleaved(&logs, &order_b);
        prop_assert_eq!(state_a, state_b);
        prop_assert_eq!(root_a, root_b);
    }
}
