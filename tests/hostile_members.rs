//! Hostile peers against a certified cluster, through real swarms on loopback. Raw libp2p peers
//! (peersync's protocols, driven by the test) play a stranger that listens for gossip and asks for
//! ops, snapshots and digests; a certified replica that publishes ops as if it were a primary; and a
//! certified primary that forges ops for another origin and stamps ops an hour ahead. None of it
//! reaches a member's state, and the members keep syncing.

mod common;

use std::time::Duration;

use common::members::{node, now_ms, Authority};
use common::raw::{bare_digest, one_op_gossip, raw_config, rejected_after, RawPeer};
use common::{dial_addr, eventually, holds, wait_holds};
use libp2p::identity::Keypair;
use peersync::cert::Certificate;
use peersync::ids::{Role, Seq};
use peersync::net::{Digest, SyncRequest, SyncResponse};
use peersync::node::NodeHandle;
use peersync::op::{ChainHash, OpBody, Signer};
use serde_bytes::ByteBuf;

const DEADLINE: Duration = Duration::from_secs(30);
const YEAR: Duration = Duration::from_secs(365 * 86_400);

/// A digest request as a node with nothing would send it, showing `cert`.
fn digest(role: Role, cert: Option<&Certificate>) -> SyncRequest {
    SyncRequest::Digest(Digest { cert: cert.map(|c| ByteBuf::from(c.encode())), ..bare_digest(role) })
}

/// A register write of `key` at seq `seq` of `signer`'s log (after `chain`), stamped `wall_ms`,
/// as the gossip message its origin publishes; and the chain hash after it.
fn put(signer: &Signer, seq: u64, chain: ChainHash, wall_ms: u64, key: &[u8]) -> (Vec<u8>, ChainHash) {
    let body = OpBody::RegisterPut { register: "r".into(), key: key.to_vec(), value: b"evil".to_vec() };
    one_op_gossip(signer, seq, chain, wall_ms, body)
}

/// Connects a raw peer to `node`; returns once it has seen the node's subscription.
async fn raw_peer(key: Keypair, node: &NodeHandle) -> RawPeer {
    let raw = RawPeer::spawn(key, &raw_config(), dial_addr(node).await);
    raw.wait_subscribed().await;
    raw
}

/// A raw peer that shows `cert` in a digest; returns once the node has answered (the member is
/// then admitted) and the raw peer can publish.
async fn raw_member(key: Keypair, node: &NodeHandle, role: Role, cert: &Certificate) -> (RawPeer, SyncResponse) {
    let raw = raw_peer(key, node).await;
    let answer = raw.request(node.peer_id(), digest(role, Some(cert))).await;
    (raw, answer.unwrap_or_else(|e| panic!("no answer to the digest: {e}")))
}

fn refused(answer: &Result<SyncResponse, String>) -> bool {
    matches!(answer, Ok(SyncResponse::Error { code, .. }) if code == "not_a_member")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranger_gets_no_gossip_and_is_refused_ops_snapshots_and_digests() {
    common::init_tracing();
    let authority = Authority::new();
    let dirs: Vec<tempfile::TempDir> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = node(&dirs[0], Role::Primary, Some((&authority, YEAR)), None).await;
    let ah = a.handle();
    let b = node(&dirs[1], Role::Primary, Some((&authority, YEAR)), Some(&ah)).await;
    let bh = b.handle();

    let stranger = raw_peer(Keypair::generate_ed25519(), &ah).await;
    // Writes while the stranger is connected and subscribed: the member B gets every one by gossip.
    for i in 0..20u32 {
        ah.put("r", format!("k{i}").into_bytes(), b"v".to_vec()).await.unwrap();
    }
    wait_holds(&bh, b"k19", "B to hold A's writes").await;
    let ops = SyncRequest::GetOps { origin: ah.peer_id(), after: Seq(0), max_ops: 100, max_bytes: 1 << 20 };
    let cid = peersync::op::raw_cid(b"any snapshot");
    for request in [ops, SyncRequest::GetManifest { cid }, SyncRequest::GetChunk { cid }, SyncRequest::GetBuckets] {
        let answer = stranger.request(ah.peer_id(), request.clone()).await;
        // Refused, or cut off already by the grace period (a closed stream): never served.
        assert!(refused(&answer) || answer.is_err(), "{request:?} was answered {answer:?}");
    }
    assert_eq!(stranger.gossip_received(), 0, "gossip reached a stranger");
    // A digest without a certificate is refused, and the stranger is disconnected at once.
    let answer = stranger.request(ah.peer_id(), digest(Role::Primary, None)).await;
    assert!(refused(&answer) || answer.is_err(), "a digest without a certificate was answered: {answer:?}");
    eventually("the stranger to be disconnected", DEADLINE, || async {
        if stranger.connected() {
            Err("still connected".into())
        } else {
            Ok(())
        }
    })
    .await;
    assert_eq!(stranger.gossip_received(), 0, "gossip reached a stranger");
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_misattributed_and_far_future_ops_of_members_are_refused() {
    common::init_tracing();
    let authority = Authority::new();
    let dirs: Vec<tempfile::TempDir> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = node(&dirs[0], Role::Primary, Some((&authority, YEAR)), None).await;
    let ah = a.handle();
    let b = node(&dirs[1], Role::Primary, Some((&authority, YEAR)), Some(&ah)).await;
    let bh = b.handle();

    // A certified replica publishes ops of its own, saying it is a primary.
    let replica_key = Keypair::generate_ed25519();
    let replica = Signer::new(replica_key.clone());
    let cert = authority.certify(replica.origin(), Role::Replica, YEAR);
    let (raw_replica, answer) = raw_member(replica_key, &ah, Role::Replica, &cert).await;
    assert!(matches!(answer, SyncResponse::Digest(_)), "a certified replica was refused: {answer:?}");
    let before = ah.metrics().gossip_rejected.get();
    raw_replica.publish(put(&replica, 1, ChainHash::GENESIS, now_ms(), b"by-replica").0);
    rejected_after(&ah, before, "the replica's ops to be rejected").await;

    // A certified primary forges a batch for B (B's origin, its own signature)...
    let primary_key = Keypair::generate_ed25519();
    let primary = Signer::new(primary_key.clone());
    let cert = authority.certify(primary.origin(), Role::Primary, YEAR);
    let (raw_primary, _) = raw_member(primary_key, &ah, Role::Primary, &cert).await;
    let before = ah.metrics().gossip_rejected.get();
    let mut forged = put(&primary, 1, ChainHash::GENESIS, now_ms(), b"forged-for-b").0;
    // The head's origin is the batch's origin: put B's id where the signer's is.
    let (mine, theirs) = (primary.origin().to_bytes(), bh.peer_id().to_bytes());
    let at = forged.windows(mine.len()).rposition(|w| w == mine.as_slice()).expect("the head names its origin");
    forged.splice(at..at + mine.len(), theirs);
    raw_primary.publish(forged);
    rejected_after(&ah, before, "the forged ops to be rejected").await;

    // ...then writes one op of its own, which members take, and one stamped an hour ahead.
    let (now_op, chain) = put(&primary, 1, ChainHash::GENESIS, now_ms(), b"by-primary");
    raw_primary.publish(now_op);
    wait_holds(&bh, b"by-primary", "the certified primary's op to reach B").await;
    let before = ah.metrics().gossip_rejected.get();
    raw_primary.publish(put(&primary, 2, chain, now_ms() + 3_600_000, b"from-the-future").0);
    rejected_after(&ah, before, "the far-future op to be rejected").await;

    // Members still sync with each other, and nothing wrongful is anywhere.
    ah.put("r", b"after".to_vec(), b"1".to_vec()).await.unwrap();
    wait_holds(&bh, b"after", "B to hold A's later write").await;
    for n in [&ah, &bh] {
        for key in [&b"by-replica"[..], b"forged-for-b", b"from-the-future"] {
            assert!(!holds(n, key).await, "{} applied on a member", String::from_utf8_lossy(key));
        }
        assert_eq!(n.store().version_vector().get(&replica.origin()), Seq(0));
        assert_eq!(n.store().version_vector().get(&primary.origin()), Seq(1));
    }
    a.shutdown().await;
    b.shutdown().await;
}
