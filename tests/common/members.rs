//! Membership for tests: a cluster authority that certifies peers, and certified nodes.

use std::time::Duration;

use libp2p::identity::Keypair;
use libp2p::PeerId;
use peersync::cert::Certificate;
use peersync::node::{Node, NodeConfig, NodeHandle, Role};
use peersync::sync::Membership;

use super::dial_addr;

pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

pub struct Authority {
    pub key: Keypair,
}

impl Authority {
    pub fn new() -> Self {
        Authority { key: Keypair::generate_ed25519() }
    }

    pub fn id(&self) -> PeerId {
        self.key.public().to_peer_id()
    }

    pub fn certify(&self, peer: PeerId, role: Role, valid: Duration) -> Certificate {
        let now = now_ms();
        Certificate::issue(&self.key, peer, role, now - 60_000, now + valid.as_millis() as u64, now)
    }
}

/// A node on `dir` certified by `authority` (or open when `None`), bootstrapped to `bootstrap`.
pub async fn node(
    dir: &tempfile::TempDir,
    role: Role,
    authority: Option<(&Authority, Duration)>,
    bootstrap: Option<&NodeHandle>,
) -> Node {
    let mut config = NodeConfig::local(dir.path());
    config.net.role = role;
    let me = peersync::node::identity::load_or_create(dir.path()).unwrap().public().to_peer_id();
    if let Some((a, valid)) = authority {
        config.membership = Some(Membership { authority: a.id(), cert: a.certify(me, role, valid) });
    }
    if let Some(b) = bootstrap {
        config.net.bootstrap = vec![dial_addr(b).await];
    }
    Node::start(config).await.unwrap()
}
