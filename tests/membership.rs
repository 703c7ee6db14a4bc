//! Membership mode through real swarms on loopback: certified members sync; a stranger, a node
//! certified by another authority and a member whose certificate expired are disconnected and
//! their writes appear nowhere; a node without a valid certificate of its own does not start.

mod common;

use std::time::Duration;

use common::holds;
use common::members::{node, Authority};
use common::{dial_addr, eventually};
use libp2p::PeerId;
use peersync::node::{Node, NodeConfig, Role};
use peersync::sync::Membership;

const DEADLINE: Duration = Duration::from_secs(30);

fn connected_to(status: &peersync::node::NetStatus, peer: &PeerId) -> bool {
    status.peers.iter().any(|p| p.peer_id == peer.to_string() && p.connected)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_sync_and_strangers_or_foreign_members_get_nothing() {
    common::init_tracing();
    let authority = Authority::new();
    let other = Authority::new();
    let year = Duration::from_secs(365 * 86_400);
    let dirs: Vec<tempfile::TempDir> = (0..5).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = node(&dirs[0], Role::Primary, Some((&authority, year)), None).await;
    let ah = a.handle();
    let b = node(&dirs[1], Role::Primary, Some((&authority, year)), Some(&ah)).await;
    let r = node(&dirs[2], Role::Replica, Some((&authority, year)), Some(&ah)).await;
    let stranger = node(&dirs[3], Role::Primary, None, Some(&ah)).await;
    let foreign = node(&dirs[4], Role::Primary, Some((&other, year)), Some(&ah)).await;
    let (bh, rh, sh, fh) = (b.handle(), r.handle(), stranger.handle(), foreign.handle());

    sh.put("r", b"from-stranger".to_vec(), b"evil".to_vec()).await.unwrap();
    fh.put("r", b"from-foreign".to_vec(), b"evil".to_vec()).await.unwrap();
    // The outsiders are disconnected once they show no valid certificate.
    for (name, outsider) in [("stranger", &sh), ("foreign member", &fh)] {
        eventually(&format!("the {name} to be disconnected"), DEADLINE, || async {
            let s = ah.net_status().await.map_err(|e| e.to_string())?;
            if connected_to(&s, &outsider.peer_id()) {
                Err("still connected".into())
            } else {
                Ok(())
            }
        })
        .await;
    }
    ah.put("r", b"from-a".to_vec(), b"1".to_vec()).await.unwrap();
    bh.put("r", b"from-b".to_vec(), b"1".to_vec()).await.unwrap();

    for (name, n) in [("a", &ah), ("b", &bh), ("replica", &rh)] {
        eventually(&format!("{name} to hold both members' writes"), DEADLINE, || async {
            if holds(n, b"from-a").await && holds(n, b"from-b").await {
                Ok(())
            } else {
                Err(format!("{:?}", n.store().version_vector()))
            }
        })
        .await;
    }
    // Nothing crossed either way: the outsiders redial (A is their bootstrap peer) and are
    // turned away again each time.
    for (name, outsider) in [("stranger", &sh), ("foreign member", &fh)] {
        for n in [&ah, &bh, &rh] {
            assert_eq!(n.store().version_vector().get(&outsider.peer_id()).0, 0, "{name}'s ops applied on a member");
        }
        // (What an outsider receives while connected: nothing, see tests/hostile_members.rs.)
    }
    assert!(!holds(&ah, b"from-stranger").await && !holds(&ah, b"from-foreign").await);

    // The registry lists the three members with their certified roles.
    let members = ah.net_status().await.unwrap().members.expect("membership mode");
    assert_eq!(members.authority, authority.id().to_string());
    let mut roles: Vec<(String, Role)> = members.members.iter().map(|m| (m.peer_id.clone(), m.role)).collect();
    roles.sort_by(|x, y| x.0.cmp(&y.0));
    let mut want = vec![
        (ah.peer_id().to_string(), Role::Primary),
        (bh.peer_id().to_string(), Role::Primary),
        (rh.peer_id().to_string(), Role::Replica),
    ];
    want.sort_by(|x, y| x.0.cmp(&y.0));
    assert_eq!(roles, want);
    for n in [a, b, r, stranger, foreign] {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_whose_certificate_expires_is_cut_off() {
    common::init_tracing();
    let authority = Authority::new();
    let dirs: Vec<tempfile::TempDir> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = node(&dirs[0], Role::Primary, Some((&authority, Duration::from_secs(3600))), None).await;
    let ah = a.handle();
    let short = node(&dirs[1], Role::Primary, Some((&authority, Duration::from_secs(3))), Some(&ah)).await;
    let sh = short.handle();
    sh.put("r", b"while-valid".to_vec(), b"1".to_vec()).await.unwrap();
    eventually("the short-lived member's write to arrive", DEADLINE, || async {
        if holds(&ah, b"while-valid").await {
            Ok(())
        } else {
            Err("not yet".into())
        }
    })
    .await;
    eventually("the expired member to be disconnected", DEADLINE, || async {
        let s = ah.net_status().await.map_err(|e| e.to_string())?;
        if connected_to(&s, &sh.peer_id()) {
            Err("still connected".into())
        } else {
            Ok(())
        }
    })
    .await;
    let before = ah.store().version_vector().get(&sh.peer_id());
    sh.put("r", b"after-expiry".to_vec(), b"1".to_vec()).await.unwrap();
    // Its later writes never arrive: wait for several of the member's own rounds, then check.
    let rounds = ah.metrics().sync_rounds.get();
    eventually("more rounds on the member", DEADLINE, || async {
        if ah.metrics().sync_rounds.get() >= rounds + 10 {
            Ok(())
        } else {
            Err("waiting".into())
        }
    })
    .await;
    assert_eq!(ah.store().version_vector().get(&sh.peer_id()), before);
    assert!(!holds(&ah, b"after-expiry").await);
    a.shutdown().await;
    short.shutdown().await;
}

#[tokio::test]
async fn a_node_without_a_valid_certificate_of_its_own_does_not_start() {
    let authority = Authority::new();
    let dir = tempfile::tempdir().unwrap();
    let mut config = NodeConfig::local(dir.path());
    // A certificate of another peer.
    config.membership = Some(Membership {
        authority: authority.id(),
        cert: authority.certify(PeerId::random(), Role::Primary, Duration::from_secs(60)),
    });
    let err = Node::start(config.clone()).await.err().expect("must not start");
    assert!(err.to_string().contains("does not admit this node"), "{err}");
    // Its own, but for another role.
    let me = peersync::node::identity::load_or_create(dir.path()).unwrap().public().to_peer_id();
    config.membership = Some(Membership {
        authority: authority.id(),
        cert: authority.certify(me, Role::Replica, Duration::from_secs(60)),
    });
    let err = Node::start(config).await.err().expect("must not start");
    assert!(err.to_string().contains("disagrees"), "{err}");
}

/// A private network: nodes with the swarm key connect and sync; a node without it, or with another
/// key, never appears among their peers, and its writes never arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_the_swarm_key_never_connects() {
    common::init_tracing();
    let key: libp2p::pnet::PreSharedKey = peersync::net::new_swarm_key().parse().unwrap();
    let other: libp2p::pnet::PreSharedKey = peersync::net::new_swarm_key().parse().unwrap();
    let dirs: Vec<tempfile::TempDir> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let start =
        |dir: &tempfile::TempDir, psk: Option<libp2p::pnet::PreSharedKey>, bootstrap: Option<libp2p::Multiaddr>| {
            let mut config = NodeConfig::local(dir.path());
            config.net.swarm_key = psk;
            config.net.bootstrap = bootstrap.into_iter().collect();
            Node::start(config)
        };
    let a = start(&dirs[0], Some(key), None).await.unwrap();
    let ah = a.handle();
    let addr = dial_addr(&ah).await;
    let b = start(&dirs[1], Some(key), Some(addr.clone())).await.unwrap();
    let open = start(&dirs[2], None, Some(addr.clone())).await.unwrap();
    let wrong = start(&dirs[3], Some(other), Some(addr)).await.unwrap();
    let bh = b.handle();
    bh.put("r", b"k".to_vec(), b"v".to_vec()).await.unwrap();
    open.handle().put("r", b"open".to_vec(), b"x".to_vec()).await.unwrap();
    wrong.handle().put("r", b"wrong".to_vec(), b"x".to_vec()).await.unwrap();
    eventually("the member with the key to sync", DEADLINE, || async {
        if holds(&ah, b"k").await {
            Ok(())
        } else {
            Err("not yet".into())
        }
    })
    .await;
    // The outsiders keep redialing their bootstrap peer (0.5 s, 1 s, 2 s ...): let a few tries pass.
    let rounds = ah.metrics().sync_rounds.get();
    eventually("several rounds", DEADLINE, || async {
        if ah.metrics().sync_rounds.get() >= rounds + 20 {
            Ok(())
        } else {
            Err("waiting".into())
        }
    })
    .await;
    let peers = ah.net_status().await.unwrap().peers;
    for outsider in [open.handle().peer_id(), wrong.handle().peer_id()] {
        assert!(!peers.iter().any(|p| p.peer_id == outsider.to_string()), "{outsider} is among the peers: {peers:?}");
    }
    assert!(!holds(&ah, b"open").await && !holds(&ah, b"wrong").await);
    for n in [a, b, open, wrong] {
        n.shutdown().await;
    }
}
