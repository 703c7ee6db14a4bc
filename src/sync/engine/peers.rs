//! Peers: who is connected, what each said about itself, and the engine's choices among them:
//! which few peers a digest round talks to, whom to dial when short of peers, whom to drop when
//! over the limit, and which addresses are worth redialing after a restart.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use rand::seq::SliceRandom;

use super::{Action, Engine, Found, Pending, StoreView};
use crate::ids::Role;
use crate::wire::{Digest, SyncRequest};

/// Misbehaviours within [`STRIKE_WINDOW`] that get a peer disconnected, and for how long it is
/// then kept away.
const MAX_STRIKES: u32 = 10;
const STRIKE_WINDOW: Duration = Duration::from_secs(60);
pub(super) const BAN: Duration = Duration::from_secs(60);
/// Requests one peer may make: a burst, then a steady rate (a node's own pulls and digests stay far
/// below it).
const REQUEST_BURST: f64 = 400.0;
const REQUESTS_PER_SEC: f64 = 200.0;
/// Digests that ask for an acknowledgement (`hold_until`, see `acks`) have a budget of their own:
/// a writer with `?ack=` asks each lagging peer once per write round trip (one ask out per peer),
/// which sequential acknowledged writes take past the request rate above, and they are answered
/// from memory.
const ACK_ASK_BURST: f64 = 4000.0;
const ACK_ASKS_PER_SEC: f64 = 2000.0;
/// Requests of one peer served from the store at once.
pub(super) const MAX_SERVING_PER_PEER: usize = 16;

/// A connection younger than this is not pruned: a lookup or a handshake may still be using it.
const PRUNE_MIN_AGE: Duration = Duration::from_secs(10);

/// Addresses remembered for redial after a restart, at most.
const MAX_REMEMBERED: usize = 64;

/// What the engine knows of one peer.
#[derive(Debug, Default)]
pub(super) struct Peer {
    pub addrs: BTreeSet<Multiaddr>,
    pub connections: u32,
    /// `(role, cluster)` from identify, once identified as a peersync node.
    pub meta: Option<(Role, String)>,
    pub rtt: Option<Duration>,
    /// The peer's last digest, and when it came.
    pub digest: Option<Digest>,
    pub digest_at: Option<Instant>,
    /// A digest request to it is in flight: one at a time.
    pub digest_pending: bool,
    /// This node's seq as the peer last acknowledged it: held answers only, which the peer gives
    /// once it holds those ops durably (see `acks.rs`).
    pub acked_mine: crate::ids::Seq,
    /// Membership is enforced: the peer counts only once it showed a certificate.
    pub gated: bool,
    /// The role its verified certificate gives it (membership mode).
    pub member: Option<Role>,
    /// When its current connection opened: a peer that shows no certificate within the grace is
    /// disconnected (membership mode).
    pub connected_at: Option<Instant>,
    /// Its requests being served from the store now.
    pub serving: usize,
    /// Request budget: tokens left and when they were last refilled.
    pub budget: (f64, Option<Instant>),
    /// Served-bytes budget, likewise; charged after each answer, so it can go below zero.
    pub bytes_budget: (f64, Option<Instant>),
    /// Budget of digests asking for an acknowledgement, likewise.
    pub ack_budget: (f64, Option<Instant>),
    /// Misbehaviour seen (rejected messages, corrupt chunks, bad answers) in the window that began
    /// at the instant given.
    pub strikes: (u32, Option<Instant>),
    /// Disconnected for misbehaving: connections from it are closed until then.
    pub banned_until: Option<Instant>,
}

impl Peer {
    /// Whether this peer is a peersync node of `cluster` (a certified member, in membership mode).
    pub fn in_cluster(&self, cluster: &str) -> bool {
        if self.gated {
            return self.member.is_some();
        }
        self.meta.as_ref().is_some_and(|(_, c)| c == cluster)
            || self.digest.as_ref().is_some_and(|d| d.cluster == cluster)
    }

    pub fn role(&self) -> Option<Role> {
        if self.gated {
            return self.member;
        }
        self.meta.as_ref().map(|(r, _)| *r).or(self.digest.as_ref().map(|d| d.role))
    }

    pub fn connected(&self) -> bool {
        self.connections > 0
    }
}

/// The peer table. Peers stay known after they disconnect (their digest and addresses are useful
/// when they come back); the table is bounded by forgetting disconnected peers first.
#[derive(Debug, Default)]
pub(super) struct Peers {
    pub map: BTreeMap<PeerId, Peer>,
    /// What was last handed out with [`Action::RememberPeers`].
    remembered: BTreeMap<PeerId, Multiaddr>,
    /// Membership is enforced (see [`Peer::gated`]).
    pub gated: bool,
}

/// Peers known at most; disconnected ones are forgotten beyond it.
const MAX_KNOWN: usize = 1024;

impl Peers {
    pub fn entry(&mut self, peer: PeerId) -> &mut Peer {
        if self.map.len() >= MAX_KNOWN && !self.map.contains_key(&peer) {
            self.map.retain(|_, p| p.connected());
        }
        let gated = self.gated;
        self.map.entry(peer).or_insert_with(|| Peer { gated, ..Peer::default() })
    }

    pub fn get(&self, peer: &PeerId) -> Option<&Peer> {
        self.map.get(peer)
    }

    pub fn is_connected(&self, peer: &PeerId) -> bool {
        self.map.get(peer).is_some_and(Peer::connected)
    }

    pub fn connected_count(&self) -> usize {
        self.map.values().filter(|p| p.connected()).count()
    }

    /// Connected peers of `cluster`.
    pub fn cluster<'a>(&'a self, cluster: &'a str) -> impl Iterator<Item = (&'a PeerId, &'a Peer)> + 'a {
        self.map.iter().filter(move |(_, p)| p.connected() && p.in_cluster(cluster))
    }

    pub fn cluster_count(&self, cluster: &str) -> usize {
        self.cluster(cluster).count()
    }
}

/// How many peers a digest round talks to in a cluster of `n` known peers: as Corrosion does,
/// clamp(n / 100, 3, 10), never more than there are.
pub fn fanout(n: usize) -> usize {
    (n / 100).clamp(3, 10).min(n)
}

/// An address worth dialing again: TCP or QUIC on a concrete IP (not 0.0.0.0), without `/p2p/`.
fn dialable(addr: &Multiaddr) -> bool {
    let mut ip = false;
    let mut transport = false;
    for p in addr.iter() {
        match p {
            Protocol::Ip4(a) => ip = !a.is_unspecified(),
            Protocol::Ip6(a) => ip = !a.is_unspecified(),
            Protocol::Dns(_) | Protocol::Dns4(_) | Protocol::Dns6(_) => ip = true,
            Protocol::Tcp(_) | Protocol::QuicV1 => transport = true,
            Protocol::P2p(_) => {}
            Protocol::Udp(_) => {}
            _ => return false,
        }
    }
    ip && transport
}

/// An address without its trailing `/p2p/<peer>` part, so each peer lists each address once.
pub(super) fn without_p2p(addr: &Multiaddr) -> Multiaddr {
    addr.iter().filter(|p| !matches!(p, Protocol::P2p(_))).collect()
}

impl Engine {
    pub(super) fn on_connected(
        &mut self,
        now: Instant,
        peer: PeerId,
        dialed: Option<Multiaddr>,
        store: &dyn StoreView,
    ) {
        let info = self.peers.entry(peer);
        info.connections += 1;
        if info.connections == 1 {
            info.connected_at = Some(now);
        }
        if let Some(addr) = &dialed {
            info.addrs.insert(without_p2p(addr));
        }
        if info.connections != 1 {
            return;
        }
        if info.banned_until.is_some_and(|t| now < t) {
            tracing::debug!(%peer, "a peer that misbehaved reconnected before its ban ended; closing");
            self.push(Action::Disconnect { peer });
            return;
        }
        let bootstrap = self.cfg.bootstrap.iter().any(|(_, p)| *p == Some(peer));
        // A flood of connections is cut at once; a few over the limit (Kademlia lookups dial
        // peers to query them) are pruned at the next rounds instead, once they are done.
        if self.peers.connected_count() > self.cfg.max_peers.saturating_mul(2) && !bootstrap {
            tracing::debug!(%peer, limit = self.cfg.max_peers, "far too many connections; closing this one");
            self.push(Action::Disconnect { peer });
            return;
        }
        tracing::info!(%peer, addr = ?dialed, "connected");
        if self.peers.gated && self.peers.get(&peer).is_some_and(|p| p.member.is_none()) {
            // Nothing of the cluster's gossip reaches it until it shows a certificate.
            self.push(Action::Gossip { peer, allow: false });
        }
        if !self.provided {
            // The first peer: announce and look for the others now rather than a period later.
            self.next_discovery = now;
        }
        // Exchange digests at once: how a new or returning peer learns what to pull.
        self.send_digest(now, peer, store);
    }

    pub(super) fn on_disconnected(&mut self, now: Instant, peer: PeerId, remaining: u32, store: &dyn StoreView) {
        let Some(info) = self.peers.map.get_mut(&peer) else { return };
        info.connections = remaining;
        if remaining > 0 {
            return;
        }
        info.digest_pending = false;
        tracing::info!(%peer, "disconnected");
        self.readiness.on_peer_gone(&peer);
        self.snapshot_source_gone(&peer);
        // Requests to it will not be answered: fail them now so their work moves elsewhere.
        let gone: Vec<_> = self.requests.iter().filter(|(_, (p, _))| p.peer() == peer).map(|(r, _)| *r).collect();
        for req in gone {
            self.on_response(now, req, Err("peer disconnected".into()), store);
        }
        self.check_ready(now, store);
    }

    pub(super) fn on_identified(&mut self, peer: PeerId, agent: Option<(Role, String)>, listen_addrs: Vec<Multiaddr>) {
        if agent.as_ref().is_some_and(|(_, c)| *c != self.cfg.cluster) {
            tracing::info!(%peer, agent = ?agent, "peer belongs to another cluster; not syncing with it");
        }
        let entry = self.peers.entry(peer);
        entry.meta = agent;
        entry.addrs.extend(listen_addrs.iter().filter(|a| dialable(a)).map(without_p2p));
    }

    pub(super) fn on_discovered(&mut self, via: Found, found: Vec<(PeerId, Option<Multiaddr>)>) {
        for (peer, addr) in found {
            if peer == self.me || self.peers.is_connected(&peer) {
                continue;
            }
            if let Some(a) = &addr {
                self.peers.entry(peer).addrs.insert(without_p2p(a));
            }
            // Found on the LAN: always worth a connection while short of peers; providers found
            // through Kademlia are dialed only to fill the target.
            if self.peers.connected_count() >= self.cfg.target_peers {
                continue;
            }
            tracing::info!(%peer, ?addr, ?via, "found a peer; dialing it");
            self.push(Action::Dial { peer: Some(peer), addr });
        }
    }

    /// Providers of the cluster key: dial a random few of those not connected, up to the target.
    pub(super) fn on_cluster_providers(&mut self, mut providers: Vec<PeerId>) {
        providers.retain(|p| *p != self.me && !self.peers.is_connected(p));
        providers.shuffle(&mut self.rng);
        let room = self.cfg.target_peers.saturating_sub(self.peers.cluster_count(&self.cfg.cluster));
        for peer in providers.into_iter().take(room) {
            tracing::debug!(%peer, "dialing a provider of the cluster");
            self.push(Action::Dial { peer: Some(peer), addr: None });
        }
    }

    /// Sends this node's digest to `peer`, unless one is already on its way.
    pub(super) fn send_digest(&mut self, now: Instant, peer: PeerId, store: &dyn StoreView) {
        self.send_digest_holding(now, peer, None, store);
    }

    /// Sends this node's digest to `peer`, unless one is already on its way; with `hold_until`,
    /// the peer holds its answer until it holds this node's ops up to that seq (see `acks`).
    pub(super) fn send_digest_holding(
        &mut self,
        now: Instant,
        peer: PeerId,
        hold_until: Option<crate::ids::Seq>,
        store: &dyn StoreView,
    ) {
        let Some(info) = self.peers.map.get_mut(&peer) else { return };
        if info.digest_pending {
            return;
        }
        info.digest_pending = true;
        let digest = Digest { hold_until, ..self.my_digest(store) };
        let held = hold_until.is_some();
        self.send(now, peer, SyncRequest::Digest(digest), Pending::Digest { peer, held });
        self.count(super::Count::DigestsSent, 1);
    }

    /// The few peers a digest round talks to: first those likely to hold what this node lacks
    /// (their last digest was ahead of it somewhere, or they sent none yet), nearest first; then
    /// one chosen at random among the rest, so every peer is compared with now and then and a
    /// silent difference cannot hide for long.
    pub(super) fn digest_targets(&mut self, store: &dyn StoreView) -> Vec<PeerId> {
        let have = store.version_vector();
        let mut likely: Vec<(Duration, PeerId)> = Vec::new();
        let mut others: Vec<PeerId> = Vec::new();
        for (id, p) in self.peers.cluster(&self.cfg.cluster) {
            let ahead = p.digest.as_ref().is_none_or(|d| !have.dominates(&d.version_vector));
            if ahead {
                likely.push((p.rtt.unwrap_or(Duration::from_secs(3600)), *id));
            } else {
                others.push(*id);
            }
        }
        let k = fanout(likely.len() + others.len());
        likely.sort();
        let mut targets: Vec<PeerId> = likely.into_iter().map(|(_, p)| p).collect();
        // Keep room for the random one.
        targets.truncate(k.saturating_sub(1).max(1));
        others.sort();
        others.shuffle(&mut self.rng);
        for p in others {
            if targets.len() >= k {
                break;
            }
            targets.push(p);
        }
        targets
    }

    /// Closes connections beyond `max_peers`: Kademlia lookups and peers dialing in add
    /// connections that gossipsub would otherwise keep open for good, until every node is connected
    /// to every other. Peers connected for less than a while, bootstrap peers and peers with
    /// requests in flight are kept; outsiders go first, then cluster peers at random.
    pub(super) fn prune_connections(&mut self, now: Instant) {
        let excess = self.peers.connected_count().saturating_sub(self.cfg.max_peers);
        if excess == 0 {
            return;
        }
        let busy: BTreeSet<PeerId> = self.requests.values().map(|(p, _)| p.peer()).collect();
        let mut candidates: Vec<(bool, PeerId)> = self
            .peers
            .map
            .iter()
            .filter(|(id, p)| p.connected() && !busy.contains(id))
            .filter(|(_, p)| p.connected_at.is_none_or(|t| now.saturating_duration_since(t) >= PRUNE_MIN_AGE))
            .filter(|(id, _)| !self.cfg.bootstrap.iter().any(|(_, b)| *b == Some(**id)))
            .map(|(id, p)| (p.in_cluster(&self.cfg.cluster), *id))
            .collect();
        candidates.shuffle(&mut self.rng);
        candidates.sort_by_key(|(in_cluster, _)| *in_cluster);
        for (_, peer) in candidates.into_iter().take(excess) {
            tracing::debug!(%peer, limit = self.cfg.max_peers, "more connections than needed; closing one");
            if let Some(p) = self.peers.map.get_mut(&peer) {
                p.connected_at = None;
            }
            self.push(Action::Disconnect { peer });
        }
    }

    /// Counts a misbehaviour of `peer`. Too many within a minute and it is disconnected and kept
    /// away for a while; its gossip score falls with each rejected message too (see `net`).
    /// `weight`: how many strikes it counts for; a rejected gossip message counts several, since
    /// a node forwards only what it validated, and gossip scoring soon stops delivering the
    /// sender's messages at all.
    pub(super) fn strike(&mut self, now: Instant, peer: PeerId, why: &str, weight: u32) {
        if peer == self.me {
            return;
        }
        let p = self.peers.entry(peer);
        let (count, since) = &mut p.strikes;
        if since.is_none_or(|t| now.saturating_duration_since(t) >= STRIKE_WINDOW) {
            *count = 0;
            *since = Some(now);
        }
        *count += weight;
        if *count < MAX_STRIKES {
            return;
        }
        *count = 0;
        p.banned_until = Some(now + BAN);
        tracing::warn!(%peer, %why, strikes = MAX_STRIKES, "peer keeps misbehaving; disconnecting it for a while");
        self.push(Action::Disconnect { peer });
    }

    /// Takes one ask for an acknowledgement from `peer`'s budget of them.
    pub(super) fn within_ack_budget(&mut self, now: Instant, peer: PeerId) -> Result<(), Spent> {
        let p = self.peers.entry(peer);
        take(&mut p.ack_budget, now, ACK_ASKS_PER_SEC, ACK_ASK_BURST).then_some(()).ok_or(Spent::Requests)
    }

    /// Takes one request from `peer`'s budgets; `Err` says which is spent.
    pub(super) fn within_budget(&mut self, now: Instant, peer: PeerId) -> Result<(), Spent> {
        let bytes_rate = self.cfg.serve_bytes_per_sec as f64;
        let p = self.peers.entry(peer);
        refill(&mut p.bytes_budget, now, bytes_rate, bytes_rate * 4.0);
        if p.bytes_budget.0 < 0.0 {
            return Err(Spent::Bytes);
        }
        take(&mut p.budget, now, REQUESTS_PER_SEC, REQUEST_BURST).then_some(()).ok_or(Spent::Requests)
    }

    /// The peers to redial after a restart: connected cluster peers with a dialable address. Handed
    /// out when the set changed.
    pub(super) fn remember_peers(&mut self) {
        let mut now: BTreeMap<PeerId, Multiaddr> = BTreeMap::new();
        for (id, p) in self.peers.cluster(&self.cfg.cluster) {
            if let Some(addr) = p.addrs.iter().find(|a| dialable(a)) {
                now.insert(*id, addr.clone());
            }
            if now.len() >= MAX_REMEMBERED {
                break;
            }
        }
        if now.is_empty() || now == self.peers.remembered {
            return;
        }
        // Keep what was remembered before of peers not connected now, so a node that restarts
        // while half its peers are down still knows the others; bounded.
        for (id, addr) in &self.peers.remembered {
            if now.len() >= MAX_REMEMBERED {
                break;
            }
            now.entry(*id).or_insert_with(|| addr.clone());
        }
        if now == self.peers.remembered {
            return;
        }
        self.peers.remembered = now.clone();
        let addrs = now.into_iter().map(|(id, a)| a.with(Protocol::P2p(id))).collect();
        self.push(Action::RememberPeers { addrs });
    }

    /// Dials again the bootstrap peers that are not connected (see `sync::Redial`), and the
    /// remembered ones while this node has fewer peers than it wants.
    pub(super) fn redial(&mut self, now: Instant) {
        let peers = &self.peers;
        let any = peers.connected_count() > 0;
        let mut due = self.redial.due(now, |p| peers.is_connected(p), any);
        if peers.cluster_count(&self.cfg.cluster) < self.cfg.target_peers {
            due.extend(self.recall.due(now, |p| peers.is_connected(p), any));
        }
        for addr in due {
            tracing::debug!(%addr, "dialing a bootstrap peer again");
            self.push(Action::Dial { peer: None, addr: Some(addr) });
        }
    }

    /// Whether `peer` is known (by identify or its digest) as a primary of this node's cluster.
    pub(super) fn is_primary_of_cluster(&self, peer: &PeerId) -> bool {
        self.peers.get(peer).is_some_and(|p| p.in_cluster(&self.cfg.cluster) && p.role() == Some(Role::Primary))
    }

    pub(super) fn on_providers(&mut self, key: super::ProviderKey, peers: Vec<PeerId>) {
        match key {
            super::ProviderKey::Cluster => self.on_cluster_providers(peers),
            super::ProviderKey::Snapshot(cid) => self.on_snapshot_providers(&cid, peers),
        }
    }
}

/// Which of a peer's budgets a refused request found spent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Spent {
    /// It asks faster than a node would: a flood.
    Requests,
    /// It has been sent more bytes than its share lately (a big snapshot, say): no misbehaviour.
    Bytes,
}

impl Spent {
    pub fn message(self) -> &'static str {
        match self {
            Spent::Requests => "too many requests from this peer; slow down",
            Spent::Bytes => "this peer was sent more bytes than its share lately; slow down",
        }
    }
}

/// Refills `bucket` and takes one token from it, if it holds one.
fn take(bucket: &mut (f64, Option<Instant>), now: Instant, rate: f64, burst: f64) -> bool {
    refill(bucket, now, rate, burst);
    let held = bucket.0 >= 1.0;
    if held {
        bucket.0 -= 1.0;
    }
    held
}

/// Refills a token bucket `(tokens, last refill)` at `rate` per second up to `burst`; a new bucket
/// starts full.
fn refill(bucket: &mut (f64, Option<Instant>), now: Instant, rate: f64, burst: f64) {
    let (tokens, at) = bucket;
    let earned = at.map_or(burst, |t| now.saturating_duration_since(t).as_secs_f64() * rate);
    *tokens = (*tokens + earned).min(burst);
    *at = Some(now);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fanout_is_small_and_grows_slowly() {
        assert_eq!(fanout(0), 0);
        assert_eq!(fanout(2), 2);
        assert_eq!(fanout(10), 3);
        assert_eq!(fanout(200), 3);
        assert_eq!(fanout(550), 5);
        assert_eq!(fanout(5000), 10);
    }

    #[test]
    fn only_concrete_tcp_or_quic_addresses_are_dialable() {
        assert!(dialable(&"/ip4/127.0.0.1/tcp/4001".parse().unwrap()));
        assert!(dialable(&"/ip4/10.0.0.1/udp/4001/quic-v1".parse().unwrap()));
        assert!(!dialable(&"/ip4/0.0.0.0/tcp/4001".parse().unwrap()));
        assert!(!dialable(&"/ip4/10.0.0.1/tcp/4001/ws".parse().unwrap()));
        assert!(!dialable(&"/memory/5".parse().unwrap()));
    }
}
