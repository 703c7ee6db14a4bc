//! The executor: carries out each `Action` an engine asks for over the simulated network and the
//! in-memory store, and reports outcomes back as `Input`s, the way the node's event loop does. It
//! decides nothing the engine decides: it sends, answers, serves, verifies and commits, stages,
//! installs, dials, and plays gossipsub (forward what was accepted, once per node) and Kademlia
//! (provider records).

use std::rc::Rc;
use std::time::Duration;

use peersync::op::{OpBatch, VerifiedBatch};
use peersync::sync::{
    serve, Action, Count, GossipId, Input, Phase, ProviderKey, ReplyId, StoreView, Verdict, MAX_BATCH_OPS,
};
use peersync::wire::{SyncRequest, SyncResponse};
use rand::seq::SliceRandom;
use rand::Rng;

use crate::cluster::{bare, Cluster, Queued, Unjudged};
use crate::net::{Event, Msg};

/// How long gossipsub remembers a message id...
const SEEN_TTL: Duration = Duration::from_secs(30);
/// ...checked once this many are remembered.
const SEEN_MAX: usize = 512;
/// Providers a Kademlia lookup returns at most.
const MAX_PROVIDERS: usize = 20;

impl Cluster {
    pub(crate) fn execute(&mut self, n: usize, action: Action) {
        match action {
            Action::Send { peer, req, request } => {
                let to = self.index[&peer];
                let Some(conn) = self.net.conn(n, to) else {
                    self.local(
                        n,
                        Duration::from_millis(1),
                        Input::Response { req, result: Err("not connected".into()) },
                    );
                    return;
                };
                let stats = &mut self.nodes[n].stats;
                stats.requests_sent += 1;
                if matches!(request, SyncRequest::Digest(_)) {
                    stats.digests_sent += 1;
                    self.nodes[n].live.as_mut().expect("up").tick_digests += 1;
                }
                self.net.transmit(n, to, conn, Msg::Request { from: n, req, request });
            }
            Action::Reply { reply, response } => self.respond(n, reply, response),
            Action::Serve { reply, request, .. } => {
                let mut response = serve(&self.nodes[n].store, request);
                if self.cfg.liars.contains(&n) {
                    lie(&mut response);
                }
                let bytes = response.payload_len();
                self.respond(n, reply, response);
                let delay = Duration::from_micros(self.net.rng.gen_range(0..=1_000));
                self.local(n, delay, Input::Served { reply, bytes });
            }
            Action::Publish { data } => {
                let id = u64::from_le_bytes(blake3::hash(&data).as_bytes()[..8].try_into().expect("8 bytes"));
                let now = self.net.now;
                self.nodes[n].live.as_mut().expect("up").seen.insert(id, now);
                self.forward(n, None, Rc::new(data), id);
            }
            Action::Verdict { id, verdict } => self.on_verdict(n, id, verdict),
            Action::Apply { ticket, origin, batches, prev } => {
                let live = self.nodes[n].live.as_mut().expect("up");
                live.writer.push_back(Queued { ticket, origin, batches, prev });
                if !live.commit_scheduled {
                    live.commit_scheduled = true;
                    let max = self.cfg.commit_latency.as_micros() as u64;
                    let delay = Duration::from_micros(self.net.rng.gen_range(0..=max));
                    let life = self.nodes[n].life;
                    self.net.after(delay, Event::Commit { node: n, life });
                }
            }
            Action::Stage { peer, index, chunk, bytes, durable, .. } => {
                let len = bytes.len() as u64;
                let verdict = self.nodes[n].store.stage(&chunk, bytes, durable);
                self.local(n, Duration::from_millis(1), Input::Staged { peer, index, len, verdict });
            }
            Action::Install { manifest } => {
                let result = self.nodes[n].store.install(&manifest);
                self.nodes[n].stats.installs += u64::from(result.is_ok());
                self.local(n, Duration::from_millis(2), Input::Installed { result });
            }
            Action::Merge { entries, .. } => {
                self.nodes[n].store.merge(&entries);
                self.local(n, Duration::from_millis(1), Input::Merged { result: Ok(()) });
            }
            Action::CollectChunks { keep } => self.nodes[n].store.collect_chunks(&keep),
            Action::CollectTombstones { through } => self.collect_tombstones(n, through),
            Action::Dial { peer, addr } => {
                let target = peer
                    .and_then(|p| self.index.get(&p).copied())
                    .or_else(|| addr.as_ref().and_then(|a| self.by_addr.get(&bare(a)).copied()));
                if let Some(to) = target {
                    self.dial(n, to);
                }
            }
            Action::Disconnect { peer } => {
                let p = self.index[&peer];
                self.close(n, p);
            }
            Action::Gossip { peer, allow } => {
                let p = self.index[&peer];
                let live = self.nodes[n].live.as_mut().expect("up");
                if allow {
                    live.gossip_blocked.remove(&p);
                } else {
                    live.gossip_blocked.insert(p);
                }
            }
            Action::Provide { key } => {
                self.providers.entry(provider_key(&key)).or_default().insert(n);
            }
            Action::FindProviders { key } => {
                let mut found: Vec<usize> = self
                    .providers
                    .get(&provider_key(&key))
                    .into_iter()
                    .flatten()
                    .copied()
                    .filter(|p| *p != n)
                    .collect();
                found.shuffle(&mut self.net.rng);
                found.truncate(MAX_PROVIDERS);
                let peers = found.into_iter().map(|p| self.nodes[p].peer).collect();
                let delay = Duration::from_millis(self.net.rng.gen_range(5..=50));
                self.local(n, delay, Input::Providers { key, peers });
            }
            Action::Phase { phase } => {
                if phase == Phase::Active {
                    self.nodes[n].stats.became_active += 1;
                }
            }
            Action::RememberPeers { addrs } => {
                self.nodes[n].remembered = addrs
                    .iter()
                    .filter_map(|a| {
                        let peer = a.iter().find_map(|p| match p {
                            libp2p::multiaddr::Protocol::P2p(id) => Some(id),
                            _ => None,
                        })?;
                        Some((a.clone(), peer))
                    })
                    .collect();
            }
            Action::PersistRevocations { all } => self.nodes[n].revocations = all,
            // The simulated store makes every op durable as it applies it.
            Action::Persist => {}
            // Durable at once: the lease messages the engine asks to send after it leave after it.
            Action::PersistLeaseLog { write } => self.nodes[n].lease_log.apply(&write),
            Action::LeaseDone { wait, result } => self.on_lease_done(n, wait, result),
            Action::Acked { wait, acked, met } => {
                let live = self.nodes[n].live.as_mut().expect("up");
                let Some(seq) = live.ack_waits.remove(&wait) else {
                    panic!("seed {}: node {n} ended wait {wait:?} twice, or one it was never given", self.seed)
                };
                // An acknowledgement is a promise: that many other stores hold the ops now.
                let origin = self.nodes[n].peer;
                let holders = (0..self.nodes.len())
                    .filter(|i| *i != n && self.nodes[*i].store.version_vector().get(&origin) >= seq)
                    .count();
                assert!(
                    holders >= acked,
                    "seed {}: node {n} counted {acked} acknowledgements of its seq {seq}, but {holders} other stores hold it",
                    self.seed
                );
                let stats = &mut self.nodes[n].stats;
                if met {
                    stats.acks_met += 1;
                } else {
                    stats.acks_unmet += 1;
                }
            }
            Action::Count { what, n: k } => {
                if what == Count::DigestsReceived {
                    self.nodes[n].stats.digests_received += k;
                }
                self.nodes[n].stats.add(what, k);
            }
        }
    }

    /// Sends the answer to inbound request `reply` back on the connection it came on.
    fn respond(&mut self, n: usize, reply: ReplyId, response: SyncResponse) {
        let seed = self.seed;
        let live = self.nodes[n].live.as_mut().expect("up");
        let Some((to, req, conn)) = live.replies.remove(&reply) else {
            panic!("seed {seed}: node {n} answered request {reply:?} twice, or one it never got")
        };
        if self.net.conn(n, to) == Some(conn) {
            self.nodes[n].stats.answers_sent += 1;
            self.net.transmit(n, to, conn, Msg::Response { req, result: Ok(response) });
        }
    }

    /// Gossipsub: sends a message to every connected peer but the one it came from.
    fn forward(&mut self, n: usize, came_from: Option<usize>, data: Rc<Vec<u8>>, id: u64) {
        let blocked = self.nodes[n].live.as_ref().map(|l| l.gossip_blocked.clone()).unwrap_or_default();
        for (p, conn) in self.net.peers(n) {
            if Some(p) != came_from && !blocked.contains(&p) {
                self.nodes[n].stats.gossip_sent += 1;
                self.net.transmit(n, p, conn, Msg::Gossip { from: n, data: data.clone(), id, copy: false });
            }
        }
    }

    /// Node `n` asks to collect the tombstones stamped up to `through`. That is safe only if no write
    /// stamped that early can still reach it: every op of an origin it knows, held by any node of
    /// the simulation (crashed and cut-off ones too), stamped at or before `through`, must already be
    /// applied at `n`. (Origins it has never heard of are outside what the engine can promise.)
    fn collect_tombstones(&mut self, n: usize, through: peersync::crdt::Hlc) {
        let vv = self.nodes[n].store.version_vector();
        for (m, other) in self.nodes.iter().enumerate() {
            if let Some((origin, seq, hlc)) = other.store.ops_beyond(&vv, through).first() {
                panic!(
                    "seed {}: node {n} collects tombstones up to {through}, but node {m} holds op {seq} of \
                     {origin} stamped {hlc}, which node {n} has not applied (it holds {})",
                    self.seed,
                    vv.get(origin).0
                );
            }
        }
        self.nodes[n].store.collect_tombstones(through);
        self.nodes[n].stats.collections += 1;
    }

    fn on_verdict(&mut self, n: usize, id: GossipId, verdict: Verdict) {
        let seed = self.seed;
        let live = self.nodes[n].live.as_mut().expect("up");
        let Some(u) = live.verdicts.remove(&id) else {
            panic!("seed {seed}: node {n} judged gossip message {id:?} twice, or one it never got")
        };
        if verdict == Verdict::Accept {
            self.forward(n, Some(u.from), u.data, u.id);
        }
    }

    /// A message arrives at `to` on connection `conn`.
    pub(crate) fn deliver(&mut self, to: usize, from: usize, conn: u64, msg: Msg) {
        let now = self.net.now;
        let peer = self.nodes[from].peer;
        let Some(live) = self.nodes[to].live.as_mut() else { return };
        match msg {
            Msg::Request { from, req, request } => {
                self.next_id += 1;
                let reply = ReplyId(self.next_id);
                let live = self.nodes[to].live.as_mut().expect("up");
                live.replies.insert(reply, (from, req, conn));
                if let SyncRequest::Digest(d) = &request {
                    self.note_digest(to, &d.version_vector);
                }
                self.feed(to, Input::Request { peer, reply, request });
            }
            Msg::Response { req, result } => {
                if let Ok(SyncResponse::Digest(d)) = &result {
                    self.note_digest(to, &d.version_vector);
                }
                self.feed(to, Input::Response { req, result });
            }
            Msg::Gossip { from, data, id, copy } => {
                if live.gossip_blocked.contains(&from) {
                    return;
                }
                if live.seen.len() >= SEEN_MAX {
                    live.seen.retain(|_, at| now.saturating_sub(*at) < SEEN_TTL);
                }
                if !copy && live.seen.contains_key(&id) {
                    return;
                }
                live.seen.insert(id, now);
                self.next_id += 1;
                let gid = GossipId(self.next_id);
                let live = self.nodes[to].live.as_mut().expect("up");
                live.verdicts.insert(gid, Unjudged { from, id, data: data.clone(), at: now });
                self.feed(to, Input::Gossip { id: gid, from: peer, data: (*data).clone() });
            }
        }
    }

    /// Remembers the first vector a peer advertised to `n` since it started.
    fn note_digest(&mut self, n: usize, vv: &peersync::store::VersionVector) {
        let node = &mut self.nodes[n];
        let live = node.live.as_mut().expect("up");
        if live.join_target.is_none() {
            live.join_target = Some(vv.clone());
            if !node.store.version_vector().dominates(vv) {
                node.stats.behind_at_join += 1;
            }
        }
    }

    /// Starts a dial from `from` to `to`; the handshake takes a round trip.
    pub(crate) fn dial(&mut self, from: usize, to: usize) {
        if from == to || self.net.conn(from, to).is_some() {
            return;
        }
        let Some(live) = self.nodes[from].live.as_mut() else { return };
        if !live.dialing.insert(to) {
            return;
        }
        let life = self.nodes[from].life;
        let rtt = self.net.latency(from, to) * 2;
        self.net.after(rtt, Event::DialDone { from, to, life });
    }

    pub(crate) fn dial_done(&mut self, from: usize, to: usize, life: u64) {
        if self.nodes[from].life != life {
            return;
        }
        let Some(live) = self.nodes[from].live.as_mut() else { return };
        live.dialing.remove(&to);
        if !self.net.reachable(from, to) || self.nodes[to].live.is_none() || self.net.conn(from, to).is_some() {
            return;
        }
        let conn = self.net.open(from, to);
        let (a, b) = (self.nodes[from].peer, self.nodes[to].peer);
        let dialed = Some(self.nodes[to].addr.clone());
        self.local(from, Duration::ZERO, Input::Connected { peer: b, dialed });
        self.local(to, Duration::ZERO, Input::Connected { peer: a, dialed: None });
        let l = self.net.latency(from, to);
        self.net.after(l, Event::Identify { node: from, peer: to, conn });
        self.net.after(l, Event::Identify { node: to, peer: from, conn });
    }

    /// The writer commits everything queued, in order: each apply's batches are verified against
    /// the chain hash before them (the one given, or the one the store holds once the earlier
    /// applies committed), then appended.
    pub(crate) fn commit(&mut self, n: usize) {
        let Some(live) = self.nodes[n].live.as_mut() else { return };
        live.commit_scheduled = false;
        let queued = std::mem::take(&mut live.writer);
        let mut outcomes = Vec::new();
        for Queued { ticket, origin, batches, prev } in queued {
            let store = &mut self.nodes[n].store;
            let verified = verify(store, origin, batches, prev);
            match verified {
                Err(reason) => outcomes.push(Input::Applied { ticket, result: Err(reason) }),
                Ok(verified) => {
                    outcomes.push(Input::Applied { ticket, result: Ok(()) });
                    for v in verified {
                        if store.append_verified(v).is_err() {
                            outcomes.push(Input::ApplyFailed { origin });
                            break;
                        }
                    }
                }
            }
        }
        for input in outcomes {
            self.feed(n, input);
        }
    }
}

/// Verifies contiguous batches of `origin`, the first against `prev` or the chain hash the store
/// holds where it starts.
fn verify(
    store: &crate::store::MemStore,
    origin: peersync::ids::Origin,
    batches: Vec<OpBatch>,
    prev: Option<peersync::op::ChainHash>,
) -> Result<Vec<VerifiedBatch>, String> {
    let first = batches.first().ok_or("an apply without batches")?.after;
    let mut chain = prev
        .or_else(|| store.chain_at(&origin, first))
        .ok_or_else(|| format!("no chain hash held at seq {first} of {origin}"))?;
    let mut out = Vec::with_capacity(batches.len());
    for b in batches {
        if b.head.origin != origin {
            return Err(format!("a batch of {} in an apply of {origin}", b.head.origin));
        }
        let v = b.verify(chain, MAX_BATCH_OPS).map_err(|e| e.to_string())?;
        chain = v.head.head;
        out.push(v);
    }
    Ok(out)
}

/// What a lying node does to what it serves: flips a byte of every chunk and of an op of every
/// replayed batch (the signature then no longer matches).
fn lie(response: &mut SyncResponse) {
    match response {
        SyncResponse::Chunk(bytes) => {
            if let Some(b) = bytes.last_mut() {
                *b ^= 1;
            }
        }
        SyncResponse::Ops(batches) => {
            for b in batches.iter_mut() {
                if let Some(op) = b.ops.first_mut().and_then(|o| o.last_mut()) {
                    *op ^= 1;
                }
            }
        }
        _ => {}
    }
}

fn provider_key(key: &ProviderKey) -> Option<cid::Cid> {
    match key {
        ProviderKey::Cluster => None,
        ProviderKey::Snapshot(cid) => Some(*cid),
    }
}
