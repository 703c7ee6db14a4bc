//! Writes the seed corpora: well-formed messages of every kind, made from the fixtures' fixed keys,
//! so the fuzzer starts past the decoders and into verification. Deterministic: running it again
//! writes the same files.
//!
//! ```sh
//! cargo run --manifest-path fuzz/Cargo.toml --example seeds -- fuzz/seeds
//! ```

use std::path::{Path, PathBuf};

use peersync::cert::Revocation;
use peersync::crdt::Hlc;
use peersync::ids::{Role, Seq, StateRoot};
use peersync::op::raw_cid;
use peersync::snapshot::{Kind, SnapshotBrief, StateEntry};
use peersync::store::VersionVector;
use peersync::wire::{encode_gossip, Attestation, Attested, Digest, GossipMessage, SyncRequest, SyncResponse};
use peersync_fuzz::fixtures::{self, Chain, Snapshot};
use peersync_fuzz::{write_request, write_response};
use serde_bytes::ByteBuf;

fn write(dir: &Path, target: &str, name: &str, bytes: &[u8]) {
    let dir = dir.join(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), bytes).unwrap();
}

fn main() {
    let out: PathBuf = std::env::args().nth(1).unwrap_or_else(|| "fuzz/seeds".into()).into();
    let me = peersync_fuzz::signer();
    let other = fixtures::signer_of(2);
    let chain = Chain::new(me, 12);
    let other_chain = Chain::new(&other, 4);
    let chains = [chain, other_chain];
    let peer = me.origin();

    // Gossip.
    let vv = VersionVector([(peer, Seq(12)), (other.origin(), Seq(4))].into_iter().collect());
    let attestation = Attestation::sign(
        me,
        "default",
        Attested { version_vector: vv.clone(), state_root: StateRoot([7; 32]), clock: Hlc::default() },
    );
    let cert = fixtures::cert(peer, Role::Primary, 1_000, 2_000_000_000_000, 7);
    let revocation = Revocation::issue(peersync_fuzz::authority_key(), other.origin(), Seq(3), 1_234);
    let gossip = [
        ("ops-1", GossipMessage::Ops { role: Role::Primary, batch: chains[0].batch(0, 1).unwrap() }),
        ("ops-4", GossipMessage::Ops { role: Role::Primary, batch: chains[0].batch(3, 4).unwrap() }),
        ("ops-replica", GossipMessage::Ops { role: Role::Replica, batch: chains[1].batch(0, 4).unwrap() }),
        ("attestation", GossipMessage::Attestation(attestation)),
        ("revocation", GossipMessage::Revocation(revocation.encode())),
    ];
    for (name, m) in &gossip {
        write(&out, "gossip", name, &encode_gossip(m));
    }

    // Snapshots.
    let snapshot = Snapshot::new(me, "default", &[(0, 12), (1, 4)], &chains, 40, 300);
    let empty = Snapshot::new(me, "default", &[(0, 3)], &chains, 0, 1 << 20);
    write(&out, "manifest", "manifest-chunks", &snapshot.bytes);
    write(&out, "manifest", "manifest-empty", &empty.bytes);
    for (i, (r, bytes)) in snapshot.chunks.iter().enumerate().take(3) {
        let mut seed = vec![0u8];
        seed.extend(r.raw_size.to_le_bytes());
        seed.extend(r.size.to_le_bytes());
        seed.extend(bytes);
        write(&out, "chunk", &format!("chunk-{i}"), &seed);
    }

    // Certificates.
    write(&out, "cert", "cert", &cert.encode());
    write(&out, "cert", "cert-text", cert.to_text().as_bytes());
    write(&out, "cert", "revocation", &revocation.encode());
    write(&out, "cert", "revocation-text", revocation.to_text().as_bytes());

    // Repair plane.
    let digest = Digest {
        cluster: "default".into(),
        role: Role::Primary,
        version_vector: vv.clone(),
        state_root: StateRoot([3; 32]),
        log_floors: VersionVector([(peer, Seq(2))].into_iter().collect()),
        snapshots: vec![snapshot.cid],
        snapshot_brief: Some(SnapshotBrief { entries: 40, version_vector: vv.clone() }),
        cert: Some(ByteBuf::from(cert.encode())),
        members: vec![ByteBuf::from(fixtures::cert(other.origin(), Role::Replica, 0, u64::MAX, 8).encode())],
        revocations: vec![ByteBuf::from(revocation.encode())],
        hold_until: Some(Seq(12)),
        lease_group: Some(1),
    };
    let requests = [
        ("digest", SyncRequest::Digest(digest.clone())),
        ("get-ops", SyncRequest::GetOps { origin: peer, after: Seq(3), max_ops: 16_384, max_bytes: 8 << 20 }),
        ("get-manifest", SyncRequest::GetManifest { cid: snapshot.cid }),
        ("get-chunk", SyncRequest::GetChunk { cid: snapshot.chunks[0].0.cid }),
        ("get-buckets", SyncRequest::GetBuckets),
        ("get-entries", SyncRequest::GetEntries { buckets: vec![0, 7, 4095] }),
    ];
    for (name, r) in requests {
        write(&out, "sync_request", name, &write_request(r));
    }
    let entry = StateEntry { kind: Kind::Counter, collection: "c".into(), key: b"k".to_vec(), value: vec![1, 2, 3] };
    let responses = [
        ("digest", SyncResponse::Digest(digest)),
        ("ops", SyncResponse::Ops(vec![chains[0].batch(0, 5).unwrap(), chains[0].batch(5, 7).unwrap()])),
        ("ops-empty", SyncResponse::Ops(vec![])),
        ("manifest", SyncResponse::Manifest(snapshot.bytes.clone())),
        ("chunk", SyncResponse::Chunk(snapshot.chunks[0].1.clone())),
        ("buckets", SyncResponse::Buckets(vec![9; 64])),
        ("entries", SyncResponse::Entries(vec![ByteBuf::from(postcard::to_stdvec(&entry).unwrap())])),
        ("error", SyncResponse::Error { code: "busy".into(), message: "later".into() }),
    ];
    for (name, r) in responses {
        write(&out, "sync_response", name, &write_response(r));
    }
    let _ = raw_cid(b"");
    println!("seeds written under {}", out.display());
}
