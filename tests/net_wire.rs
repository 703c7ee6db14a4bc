//! The gossip codec and the network configuration, through the public API: round trips, refusals of
//! oversized, wrongly versioned and random input (never a panic), and `NetConfig::validate`.

use std::time::Duration;

use libp2p::identity::Keypair;
use libp2p::Multiaddr;
use peersync::crdt::Hlc;
use peersync::ids::{Role, Seq};
use peersync::net::{decode_gossip, encode_gossip, GossipMessage, NetConfig, NetError, WireError, GOSSIP_WIRE_VERSION};
use peersync::op::{ChainHash, Op, OpBatch, OpBody, Signer};
use proptest::prelude::*;
use serde_bytes::ByteBuf;

const MAX: usize = 64 * 1024;

fn message(ops: usize) -> GossipMessage {
    let signer = Signer::new(Keypair::generate_ed25519());
    let mut chain = ChainHash::GENESIS;
    let mut bytes = Vec::new();
    for seq in 1..=ops as u64 {
        let op = Op {
            origin: signer.origin(),
            seq: Seq(seq),
            hlc: Hlc::new(seq, 0),
            body: OpBody::RegisterPut { register: "r".into(), key: b"k".to_vec(), value: vec![seq as u8; 100] },
        };
        let encoded = op.encode();
        chain = chain.extend(blake3::hash(&encoded).as_bytes());
        bytes.push(ByteBuf::from(encoded));
    }
    GossipMessage::Ops {
        role: Role::Primary,
        batch: OpBatch { after: Seq(0), ops: bytes, head: signer.sign_head(Seq(ops as u64), chain) },
    }
}

#[test]
fn gossip_round_trips_and_starts_with_the_version() {
    let msg = message(3);
    let bytes = encode_gossip(&msg);
    assert_eq!(bytes[0], GOSSIP_WIRE_VERSION);
    assert_eq!(decode_gossip(&bytes, MAX).unwrap(), msg);
}

#[test]
fn gossip_decoder_refuses_bad_input() {
    let bytes = encode_gossip(&message(3));

    let err = decode_gossip(&bytes, bytes.len() - 1).unwrap_err();
    assert!(matches!(err, WireError::TooLarge { len, max } if len == bytes.len() && max == len - 1));
    // The size check comes first: a huge garbage buffer is refused without being parsed.
    assert!(matches!(decode_gossip(&vec![0xff; MAX + 1], MAX), Err(WireError::TooLarge { .. })));

    assert!(matches!(decode_gossip(&[], MAX), Err(WireError::Empty)));

    let mut wrong_version = bytes.clone();
    wrong_version[0] = GOSSIP_WIRE_VERSION + 1;
    assert!(matches!(
        decode_gossip(&wrong_version, MAX),
        Err(WireError::UnknownVersion { found }) if found == GOSSIP_WIRE_VERSION + 1
    ));

    let mut trailing = bytes.clone();
    trailing.push(0);
    assert!(matches!(decode_gossip(&trailing, MAX), Err(WireError::TrailingBytes(1))));

    assert!(matches!(decode_gossip(&bytes[..bytes.len() - 10], MAX), Err(WireError::Malformed(_))));
    // A length prefix claiming far more elements than the input holds.
    let huge_count = [GOSSIP_WIRE_VERSION, 0, 0, 0xff, 0xff, 0xff, 0xff, 0x0f];
    assert!(decode_gossip(&huge_count, MAX).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn gossip_decoder_never_panics_on_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = decode_gossip(&bytes, 1024);
    }

    #[test]
    fn gossip_decoder_survives_corruption(index in any::<prop::sample::Index>(), byte in any::<u8>()) {
        let mut bytes = encode_gossip(&message(2));
        let i = index.index(bytes.len());
        bytes[i] = byte;
        let _ = decode_gossip(&bytes, MAX);
    }
}

fn invalid(config: NetConfig) -> String {
    config.validate().unwrap_err().to_string()
}

#[test]
fn config_validation_names_the_bad_value() {
    let ok = NetConfig::default();
    ok.validate().unwrap();

    let msg = invalid(NetConfig { cluster: String::new(), ..ok.clone() });
    assert!(msg.contains("cluster name \"\""), "{msg}");
    let msg = invalid(NetConfig { cluster: "a/b".into(), ..ok.clone() });
    assert!(msg.contains("\"a/b\""), "{msg}");

    let msg = invalid(NetConfig { max_response_bytes: 0, ..ok.clone() });
    assert!(msg.contains("max_response_bytes"), "{msg}");
    let msg = invalid(NetConfig { max_request_bytes: 0, ..ok.clone() });
    assert!(msg.contains("max_request_bytes"), "{msg}");
    let err = NetConfig { max_gossip_bytes: 100, ..ok.clone() }.validate();
    assert!(matches!(err, Err(NetError::GossipTooSmall(100))));
    let msg = invalid(NetConfig { gossip_heartbeat: Duration::ZERO, ..ok.clone() });
    assert!(msg.contains("gossip_heartbeat"), "{msg}");
    let msg = invalid(NetConfig { request_timeout: Duration::ZERO, ..ok.clone() });
    assert!(msg.contains("request_timeout"), "{msg}");

    let peer = Keypair::generate_ed25519().public().to_peer_id();
    let bad = ["/ip4/10.0.0.1".to_owned(), "/ip4/10.0.0.1/udp/4001".to_owned(), format!("/p2p/{peer}")];
    for bad in bad {
        let addr: Multiaddr = bad.parse().unwrap();
        let msg = invalid(NetConfig { bootstrap: vec![addr], ..ok.clone() });
        assert!(msg.contains(&bad) && msg.contains("bootstrap"), "{msg}");
    }
    let addr: Multiaddr = "/ip4/0.0.0.0/udp/4001".parse().unwrap();
    let msg = invalid(NetConfig { listen: vec![addr], ..ok.clone() });
    assert!(msg.contains("/ip4/0.0.0.0/udp/4001") && msg.contains("quic-v1"), "{msg}");

    let good: Multiaddr = format!("/ip4/10.0.0.1/tcp/4001/p2p/{peer}").parse().unwrap();
    NetConfig { bootstrap: vec![good], ..ok }.validate().unwrap();
}
