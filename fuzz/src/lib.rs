//! What the fuzz targets share: fixed keys, the repair-plane codec exactly as the node configures it,
//! and the checks every decoded peer message goes through. A check may see a decode or verification
//! error (that is the point of feeding it garbage); it must never panic.
//!
//! Besides "does not panic", a few round-trip properties are asserted where they must hold for any
//! input: what decodes re-encodes to something that decodes to the same value, and what a fixed key
//! re-signs verifies. A failing property is a logic bug (reported as a panic in this crate, not in
//! peersync); see `fuzz/regressions/README.md` for how each target's failures were triaged.

pub mod engine;
pub mod fixtures;

use std::sync::OnceLock;

use futures::executor::block_on;
use futures::io::Cursor;
use libp2p::identity::Keypair;
use libp2p::request_response::Codec as _;
use libp2p::PeerId;
use peersync::cert::{Certificate, Revocation};
use peersync::ids::Seq;
use peersync::op::{ChainHash, OpBatch, Signer};
use peersync::snapshot::{Manifest, SignedManifest, StateEntry};
use peersync::sync::MAX_BATCH_OPS;
use peersync::wire::{Attestation, Attested, Digest, GossipMessage, SyncRequest, SyncResponse};

/// The codec of the repair plane, as `net::behaviour` builds it.
pub use peersync::net::SyncCodec;

/// The node's request and response size limits (`NetConfig::default()`: 1 MiB and 16 MiB).
pub fn size_limits() -> (u64, u64) {
    static LIMITS: OnceLock<(u64, u64)> = OnceLock::new();
    *LIMITS.get_or_init(|| {
        let net = peersync::net::NetConfig::default();
        (net.max_request_bytes as u64, net.max_response_bytes as u64)
    })
}

/// The codec with the node's limits.
pub fn sync_codec() -> SyncCodec {
    let (request, response) = size_limits();
    SyncCodec::new(request as usize, response as usize)
}

/// Reads a request off a stream holding `bytes`, through the real codec.
pub fn read_request(bytes: &[u8]) -> std::io::Result<SyncRequest> {
    block_on(sync_codec().read_request(&peersync::net::SYNC_PROTOCOL, &mut Cursor::new(bytes)))
}

/// Reads a response off a stream holding `bytes`, through the real codec.
pub fn read_response(bytes: &[u8]) -> std::io::Result<SyncResponse> {
    block_on(sync_codec().read_response(&peersync::net::SYNC_PROTOCOL, &mut Cursor::new(bytes)))
}

/// What the codec writes for a request (seeds, and the engine target's well-formed inputs).
pub fn write_request(request: SyncRequest) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    block_on(sync_codec().write_request(&peersync::net::SYNC_PROTOCOL, &mut out, request)).expect("encodes");
    out.into_inner()
}

/// What the codec writes for a response.
pub fn write_response(response: SyncResponse) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    block_on(sync_codec().write_response(&peersync::net::SYNC_PROTOCOL, &mut out, response)).expect("encodes");
    out.into_inner()
}

/// A fixed ed25519 key: the same for every run, so seeds made by one build match the next.
pub fn key(n: u8) -> Keypair {
    Keypair::ed25519_from_bytes([n; 32]).expect("any 32 bytes are an ed25519 secret key")
}

/// The key seeds sign with: ops, attestations and manifests of this origin are re-signed by the
/// checks below, so mutations of their content still reach the code past signature verification.
pub fn signer() -> &'static Signer {
    static SIGNER: OnceLock<Signer> = OnceLock::new();
    SIGNER.get_or_init(|| Signer::new(key(1)))
}

/// The cluster authority of the fixtures.
pub fn authority_key() -> &'static Keypair {
    static KEY: OnceLock<Keypair> = OnceLock::new();
    KEY.get_or_init(|| key(200))
}

pub fn authority() -> PeerId {
    static ID: OnceLock<PeerId> = OnceLock::new();
    *ID.get_or_init(|| authority_key().public().to_peer_id())
}

/// Every check a received op batch goes through (gossip and replay).
pub fn check_batch(batch: &OpBatch) {
    let _ = batch.head.verify();
    let _ = batch.clone().verify(ChainHash::GENESIS, MAX_BATCH_OPS);
    resigned_batch_verifies(batch);
}

/// A batch whose head claims the fixed signer, re-signed over the chain its ops really hash to,
/// verifies exactly when its ops decode, are all of that origin and run contiguously from
/// `after + 1`; and a verified batch goes back on the wire unchanged.
fn resigned_batch_verifies(batch: &OpBatch) {
    let signer = signer();
    if batch.head.origin != signer.origin() || batch.ops.is_empty() || batch.ops.len() > MAX_BATCH_OPS {
        return;
    }
    let Some(last) = batch.after.0.checked_add(batch.ops.len() as u64) else { return };
    if last == u64::MAX {
        // Verification computes the seq after the last op (see the regressions README).
        return;
    }
    let mut chain = ChainHash::GENESIS;
    for op in &batch.ops {
        chain = chain.extend(blake3::hash(&op[..]).as_bytes());
    }
    let resigned = OpBatch { after: batch.after, ops: batch.ops.clone(), head: signer.sign_head(Seq(last), chain) };
    let well_formed = batch.ops.iter().enumerate().all(|(i, bytes)| {
        peersync::op::Op::decode(bytes)
            .is_ok_and(|op| op.origin == signer.origin() && op.seq == Seq(batch.after.0 + 1 + i as u64))
    });
    match resigned.clone().verify(ChainHash::GENESIS, MAX_BATCH_OPS) {
        Ok(verified) => {
            assert!(well_formed, "a batch with a malformed op verified");
            assert_eq!(verified.to_wire(), resigned, "a verified batch does not go back on the wire unchanged");
        }
        Err(e) => assert!(!well_formed, "a well-formed, correctly signed batch was refused: {e}"),
    }
}

/// An attestation's checks; re-signed by the fixed signer it must verify.
pub fn check_attestation(a: &Attestation) {
    let _ = a.verify();
    if a.peer == signer().origin() {
        let resigned = Attestation::sign(
            signer(),
            &a.cluster,
            Attested { version_vector: a.version_vector.clone(), state_root: a.state_root, clock: a.clock },
        );
        assert!(resigned.verify().is_ok(), "a freshly signed attestation does not verify");
    }
}

/// A gossip payload, decoded as the node decodes it, then every check of what it carries.
pub fn check_gossip(data: &[u8]) {
    let Ok(message) = peersync::wire::decode_gossip(data, 64 * 1024) else { return };
    match &message {
        GossipMessage::Ops { batch, .. } => check_batch(batch),
        GossipMessage::Attestation(a) => check_attestation(a),
        GossipMessage::Revocation(bytes) => check_revocation_bytes(bytes),
    }
    let again = peersync::wire::encode_gossip(&message);
    let decoded = peersync::wire::decode_gossip(&again, usize::MAX).expect("a re-encoded gossip message decodes");
    assert_eq!(decoded, message, "gossip message changed through encode and decode");
}

/// A membership certificate's bytes: decoded, checked against the fixtures' authority and against
/// the authority it names; the same fields re-issued by the fixtures' authority verify.
pub fn check_cert_bytes(bytes: &[u8]) {
    let Ok(cert) = Certificate::decode(bytes) else { return };
    check_cert(&cert);
}

pub fn check_cert(cert: &Certificate) {
    let _ = cert.verify(&authority(), &cert.peer, cert.not_before_ms);
    let _ = cert.verify(&cert.authority, &cert.peer, cert.not_after_ms.saturating_sub(1));
    assert_eq!(Certificate::decode(&cert.encode()).as_ref(), Ok(cert), "certificate changed through encode and decode");
    assert_eq!(Certificate::from_text(&cert.to_text()).as_ref(), Ok(cert), "certificate changed through its text form");
    let reissued =
        Certificate::issue(authority_key(), cert.peer, cert.role, cert.not_before_ms, cert.not_after_ms, cert.serial);
    if cert.not_before_ms < cert.not_after_ms {
        assert_eq!(
            reissued.verify(&authority(), &cert.peer, cert.not_before_ms),
            Ok(()),
            "a freshly issued certificate does not admit its peer"
        );
    }
}

pub fn check_revocation_bytes(bytes: &[u8]) {
    let Ok(r) = Revocation::decode(bytes) else { return };
    check_revocation(&r);
}

pub fn check_revocation(r: &Revocation) {
    let _ = r.verify(&authority());
    let _ = r.verify(&r.authority);
    assert_eq!(Revocation::decode(&r.encode()).as_ref(), Ok(r), "revocation changed through encode and decode");
    assert_eq!(Revocation::from_text(&r.to_text()).as_ref(), Ok(r), "revocation changed through its text form");
    let reissued = Revocation::issue(authority_key(), r.peer, r.last_seq, r.at_ms);
    assert_eq!(reissued.verify(&authority()), Ok(()), "a freshly issued revocation does not verify");
}

/// The certificates, member list and revocations a digest carries.
pub fn check_digest(d: &Digest) {
    if let Some(cert) = &d.cert {
        check_cert_bytes(cert);
    }
    for cert in &d.members {
        check_cert_bytes(cert);
    }
    for r in &d.revocations {
        check_revocation_bytes(r);
    }
}

/// Signed manifest bytes as a node receives them: decode, verify. A manifest that decodes is also
/// re-signed by the fixed signer (as its creator), so `validate` sees arbitrary manifests: signing
/// refuses exactly what verification would, and what it signs verifies to the same manifest.
pub fn check_manifest_bytes(bytes: &[u8]) {
    let Ok(signed) = SignedManifest::decode(bytes) else { return };
    let _ = signed.verify();
    let _ = signed.cid();
    let Ok(mut manifest) = postcard::from_bytes::<Manifest>(&signed.manifest_bytes) else { return };
    manifest.creator = signer().origin();
    let _ = (manifest.compressed_bytes(), manifest.raw_bytes(), manifest.entries(), manifest.brief());
    if let Ok(resigned) = manifest.sign(signer()) {
        match resigned.verify() {
            Ok(back) => assert_eq!(back, manifest, "a signed manifest verifies to another manifest"),
            Err(e) if resigned.manifest_bytes.len() > peersync::snapshot::MAX_MANIFEST_BYTES => {
                let _ = e;
            }
            Err(e) => panic!("a manifest signed by its creator does not verify: {e}"),
        }
    }
}

/// Encoded state entries (repair answers): each decoded as the engine decodes it.
pub fn check_entries(entries: &[serde_bytes::ByteBuf]) {
    for bytes in entries {
        if let Ok(entry) = postcard::from_bytes::<StateEntry>(bytes) {
            let again = postcard::to_stdvec(&entry).expect("entries encode");
            assert_eq!(postcard::from_bytes::<StateEntry>(&again).ok().as_ref(), Some(&entry));
        }
    }
}

/// Every check of a repair response.
pub fn check_response(response: &SyncResponse) {
    match response {
        SyncResponse::Digest(d) => check_digest(d),
        SyncResponse::Ops(batches) => batches.iter().for_each(check_batch),
        SyncResponse::Manifest(bytes) => check_manifest_bytes(bytes),
        SyncResponse::Chunk(bytes) => {
            let _ = peersync::snapshot::verify_chunk_cid(&peersync::op::raw_cid(bytes), bytes);
        }
        SyncResponse::Buckets(_) | SyncResponse::Error { .. } | SyncResponse::Lease(_) => {}
        SyncResponse::Entries(entries) => check_entries(entries),
    }
}

/// Every check of a repair request.
pub fn check_request(request: &SyncRequest) {
    if let SyncRequest::Digest(d) = request {
        check_digest(d);
    }
}
