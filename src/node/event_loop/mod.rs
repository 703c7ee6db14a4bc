//! The one task that owns the libp2p `Swarm`.
//!
//! It turns swarm events into calls on the sync logic and the applier, and their decisions into
//! network actions: publishing local ops on gossip, reporting gossip verdicts, exchanging digests,
//! serving and sending replay pulls, and discovery (Kademlia providers, mDNS, identify). Everything
//! else reaches it through [`Command`]s on a bounded channel, each with a oneshot reply where one is
//! needed. No disk I/O happens on this task: store reads are handed to blocking tasks.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::gossipsub::{self, MessageAcceptance, MessageId};
use libp2p::kad::{self, GetProvidersOk, QueryResult};
use libp2p::request_response::{OutboundRequestId, ResponseChannel};
use libp2p::swarm::SwarmEvent;
use libp2p::{identify, mdns, ping, Multiaddr, PeerId, Swarm};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

mod repair;
mod requests;
mod snapshot;
mod status;
mod sync;

pub use status::{NetStatus, PeerStatus};

pub use snapshot::SnapshotStatus;

use super::applier::Inbound;
use super::metrics::Metrics;
use crate::ids::{Origin, Role, Seq, StateRoot};
use crate::net::{
    cluster_provider_key, cluster_topic, encode_gossip, on_identify, parse_agent_version, Behaviour, BehaviourEvent,
    Digest, GossipMessage, SyncRequest, SyncResponse,
};
use crate::op::Signer;
use crate::snapshot::SnapshotBrief;
use crate::store::{CommitEvent, Store, VersionVector, WriteHandle};
use crate::sync::{DigestPace, Phase, Readiness, ReplayPlanner};

/// Ops asked for in one pull at most.
const PULL_MAX_OPS: u32 = 16_384;
/// Op bytes asked for in one pull at most (the response limit is higher, to fit framing).
const PULL_MAX_BYTES: u32 = 8 << 20;

/// Requests to the event loop.
pub(crate) enum Command {
    /// The applier's verdict on a gossip message.
    Verdict {
        message_id: MessageId,
        propagation_source: PeerId,
        acceptance: MessageAcceptance,
    },
    /// The answer to a peer's request, read from the store on a blocking task.
    Respond {
        channel: ResponseChannel<SyncResponse>,
        response: SyncResponse,
    },
    /// A pull's batches went through the applier: `Ok(seq reached)` or why they were refused.
    PullDone {
        peer: PeerId,
        origin: Origin,
        result: Result<Seq, String>,
    },
    /// A snapshot chunk from `peer` was checked, and persisted when it was good.
    ChunkChecked {
        peer: PeerId,
        index: usize,
        len: u64,
        verdict: snapshot::ChunkVerdict,
    },
    /// The snapshot being pulled was installed, or failed to.
    SnapshotInstalled {
        result: Result<(), String>,
    },
    /// This node made a snapshot: announce it.
    SnapshotCreated {
        cid: cid::Cid,
    },
    /// Entries from a divergence repair were merged.
    RepairDone,
    /// A verified attestation: `peer` holds `vv` with `root`.
    PeerState {
        peer: PeerId,
        vv: VersionVector,
        root: StateRoot,
    },
    Status {
        reply: oneshot::Sender<NetStatus>,
    },
    Stop,
}

#[derive(Debug, Default)]
struct PeerInfo {
    addrs: BTreeSet<Multiaddr>,
    connections: u32,
    meta: Option<(Role, String)>,
    rtt: Option<Duration>,
    digest: Option<Digest>,
}

impl PeerInfo {
    /// Whether this peer is a peersync node of our cluster.
    fn in_cluster(&self, cluster: &str) -> bool {
        self.meta.as_ref().is_some_and(|(_, c)| c == cluster)
            || self.digest.as_ref().is_some_and(|d| d.cluster == cluster)
    }

    fn role(&self) -> Option<Role> {
        self.meta.as_ref().map(|(r, _)| *r).or(self.digest.as_ref().map(|d| d.role))
    }
}

/// Timings of the event loop.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timings {
    pub discovery: Duration,
    pub digest_min: Duration,
    pub digest_max: Duration,
    pub join_grace: Duration,
    pub request_timeout: Duration,
    /// Chunk requests in flight per source while pulling a snapshot.
    pub chunks_per_source: usize,
    /// Ops of replay a snapshot must spare before it is pulled when replay could do (see
    /// `sync::choose_snapshot`).
    pub snapshot_min_saving: u64,
}

/// Everything the event loop is wired to.
pub(crate) struct Parts {
    pub swarm: Swarm<Behaviour>,
    pub store: Store,
    pub signer: Signer,
    pub role: Role,
    pub cluster: String,
    pub discoverable: bool,
    pub timings: Timings,
    pub commands: mpsc::Receiver<Command>,
    pub commands_tx: mpsc::Sender<Command>,
    pub commits: broadcast::Receiver<Arc<CommitEvent>>,
    pub inbound: mpsc::Sender<Inbound>,
    pub metrics: Arc<Metrics>,
    pub phase: watch::Sender<Phase>,
    pub writer: WriteHandle,
    pub identified: super::applier::Identified,
    /// The bootstrap peers, dialed again while they are not connected.
    pub redial: crate::sync::Redial,
}

pub(crate) struct EventLoop {
    swarm: Swarm<Behaviour>,
    store: Store,
    signer: Signer,
    role: Role,
    cluster: String,
    timings: Timings,
    commands: mpsc::Receiver<Command>,
    commands_tx: mpsc::Sender<Command>,
    commits: broadcast::Receiver<Arc<CommitEvent>>,
    inbound: mpsc::Sender<Inbound>,
    metrics: Arc<Metrics>,
    planner: ReplayPlanner,
    readiness: Readiness,
    /// Publishes the phase to the node's handle (reads answer 503 while syncing).
    phase: watch::Sender<Phase>,
    /// Installs pulled snapshots and merges repaired entries.
    writer: WriteHandle,
    /// Role and cluster of identified peers, shared with the applier for its role checks.
    identified: super::applier::Identified,
    /// The snapshot being pulled, when replay cannot catch up.
    snapshot: Option<snapshot::ActivePull>,
    snapshot_requests: snapshot::SnapshotRequests,
    /// The divergence repair under way: with whom, since when.
    repair: Option<(PeerId, Instant)>,
    repair_requests: HashMap<OutboundRequestId, repair::RepairRequest>,
    peers: HashMap<PeerId, PeerInfo>,
    listen_addrs: Vec<Multiaddr>,
    pulls: HashMap<OutboundRequestId, (PeerId, Origin)>,
    /// Per origin, how far pulled ops reached the applier (they may not be committed yet) and when,
    /// so the next pull starts after them rather than fetching them again. An entry the store has
    /// not caught up with within the request timeout is dropped: those ops failed to apply.
    pulled: HashMap<Origin, (Seq, Instant)>,
    /// Current digest period, from `digest_pace`.
    digest_every: Duration,
    digest_pace: DigestPace,
    /// Whether the provider record was published since the first connection (a record announced
    /// with no peer is only stored locally).
    provided: bool,
    /// Per origin, the highest seq compacted out of the log (see `refresh_holdings`).
    log_floors: VersionVector,
    /// The snapshot this node serves, newest first (see `refresh_holdings`).
    snapshots: Vec<cid::Cid>,
    /// What the first of `snapshots` holds.
    snapshot_brief: Option<SnapshotBrief>,
    /// Snapshots pulled because they were cheaper than replay, then given up (see
    /// `ActivePull::optional`); bounded.
    declined_snapshots: std::collections::HashSet<cid::Cid>,
    /// Needed snapshots whose pull failed, and when they may be tried again.
    snapshot_retry: crate::sync::SnapshotRetry,
    redial: crate::sync::Redial,
}

impl EventLoop {
    pub fn new(p: Parts) -> Self {
        let now = Instant::now();
        let mut event_loop = EventLoop {
            readiness: Readiness::new(p.discoverable, p.timings.join_grace, now),
            planner: ReplayPlanner::new(p.role, p.timings.request_timeout),
            digest_every: p.timings.digest_min,
            digest_pace: DigestPace::new(p.timings.digest_min, p.timings.digest_max),
            swarm: p.swarm,
            store: p.store,
            signer: p.signer,
            role: p.role,
            cluster: p.cluster,
            timings: p.timings,
            commands: p.commands,
            commands_tx: p.commands_tx,
            commits: p.commits,
            inbound: p.inbound,
            metrics: p.metrics,
            phase: p.phase,
            writer: p.writer,
            identified: p.identified,
            snapshot: None,
            snapshot_requests: HashMap::new(),
            repair: None,
            repair_requests: HashMap::new(),
            peers: HashMap::new(),
            listen_addrs: Vec::new(),
            pulls: HashMap::new(),
            pulled: HashMap::new(),
            provided: false,
            log_floors: VersionVector::default(),
            snapshots: Vec::new(),
            snapshot_brief: None,
            declined_snapshots: Default::default(),
            snapshot_retry: Default::default(),
            redial: p.redial,
        };
        event_loop.refresh_holdings();
        event_loop
    }

    pub async fn run(mut self) {
        let mut tick = tokio::time::interval(self.timings.discovery);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let digest = tokio::time::sleep(self.digest_every);
        tokio::pin!(digest);
        self.check_ready();
        loop {
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                command = self.commands.recv() => match command {
                    Some(Command::Stop) | None => break,
                    Some(c) => self.on_command(c),
                },
                commit = self.commits.recv() => match commit {
                    Ok(c) => {
                        self.publish(&c);
                        if !self.readiness.is_active() {
                            self.check_ready();
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "publisher fell behind the writer; peers will pull the missed ops");
                        self.metrics.events_lagged.inc_by(n);
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                },
                _ = tick.tick() => self.on_tick(),
                _ = &mut digest => {
                    self.digest_round();
                    digest.as_mut().reset(tokio::time::Instant::now() + self.digest_every);
                }
            }
        }
        tracing::debug!("event loop stopped");
    }

    fn is_connected(&self, peer: &PeerId) -> bool {
        self.peers.get(peer).is_some_and(|p| p.connections > 0)
    }

    fn my_digest(&self) -> Digest {
        let (state_root, version_vector) = self.store.state_root();
        Digest {
            cluster: self.cluster.clone(),
            role: self.role,
            version_vector,
            state_root,
            log_floors: self.log_floors.clone(),
            snapshots: self.snapshots.clone(),
            snapshot_brief: self.snapshot_brief.clone(),
        }
    }

    /// Re-reads the log floors and the latest snapshot. They change only when this node makes a
    /// snapshot (which also compacts) or installs one, so they are cached rather than read from the
    /// store for every digest on this task.
    pub(super) fn refresh_holdings(&mut self) {
        let floors = self.store.log_floors().unwrap_or_default();
        self.log_floors = VersionVector(floors.into_iter().filter(|(_, s)| s.0 > 0).collect());
        let latest = self.store.latest_snapshot().ok().flatten();
        self.snapshots = latest.iter().map(|s| s.cid).collect();
        self.snapshot_brief = latest.map(|s| s.manifest.brief());
    }

    /// Publishes this node's freshly committed ops on the cluster topic.
    fn publish(&mut self, commit: &CommitEvent) {
        let topic = cluster_topic(&self.cluster);
        for batch in &commit.local_batches {
            let data = encode_gossip(&GossipMessage::Ops { role: self.role, batch: (**batch).clone() });
            let len = data.len();
            match self.swarm.behaviour_mut().gossipsub.publish(topic.clone(), data) {
                Ok(_) => self.metrics.count_out("gossip", len),
                Err(gossipsub::PublishError::NoPeersSubscribedToTopic | gossipsub::PublishError::Duplicate) => {}
                // A value larger than a gossip message may be: expected, not a fault.
                Err(gossipsub::PublishError::MessageTooLarge) => {
                    tracing::debug!(bytes = len, seq = %batch.head.seq, "ops too large to gossip; peers will pull them")
                }
                Err(e) => {
                    tracing::warn!(error = %e, seq = %batch.head.seq, "could not publish ops; peers will pull them")
                }
            }
        }
    }

    /// Discovery: refresh the provider record and look for other nodes of the cluster.
    fn on_tick(&mut self) {
        self.metrics.sync_rounds.inc();
        let connected = self.peers.values().any(|p| p.connections > 0);
        if connected {
            let kad = &mut self.swarm.behaviour_mut().kad;
            if !self.provided {
                // Announced again now that someone can store the record.
                if kad.start_providing(cluster_provider_key(&self.cluster)).is_ok() {
                    self.provided = true;
                }
                if let Some(latest) = self.snapshots.first() {
                    let _ = kad.start_providing(snapshot::snapshot_key(latest));
                }
            }
            kad.get_providers(cluster_provider_key(&self.cluster));
        }
        self.check_ready();
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Verdict { message_id, propagation_source, acceptance } => {
                self.swarm.behaviour_mut().gossipsub.report_message_validation_result(
                    &message_id,
                    &propagation_source,
                    acceptance,
                );
            }
            Command::Respond { channel, response } => {
                match &response {
                    SyncResponse::Ops(batches) => {
                        let bytes: usize = batches.iter().flat_map(|b| b.ops.iter()).map(|o| o.len()).sum();
                        self.metrics.count_out("replay", bytes);
                    }
                    SyncResponse::Chunk(bytes) => self.metrics.count_out("snapshot", bytes.len()),
                    _ => {}
                }
                if self.swarm.behaviour_mut().sync.send_response(channel, response).is_err() {
                    tracing::debug!("a peer went away before its answer was ready");
                }
            }
            Command::PullDone { peer, origin, result } => {
                match result {
                    Ok(seq) => {
                        let reached = self.pulled.entry(origin).or_insert((seq, Instant::now()));
                        *reached = (reached.0.max(seq), Instant::now());
                        self.planner.answered(&peer, &origin);
                    }
                    Err(reason) => {
                        tracing::warn!(%peer, %origin, %reason, "pull failed; trying another source");
                        self.planner.failed(&peer, &origin, Instant::now());
                    }
                }
                self.plan_pulls();
            }
            Command::ChunkChecked { peer, index, len, verdict } => self.on_chunk_checked(peer, index, len, verdict),
            Command::SnapshotInstalled { result } => self.on_snapshot_installed(result),
            Command::SnapshotCreated { cid } => {
                self.refresh_holdings();
                self.provide_snapshot(&cid);
            }
            Command::RepairDone => {
                if self.repair_requests.is_empty() {
                    self.repair = None;
                }
                self.check_ready();
            }
            Command::PeerState { peer, vv, root } => {
                self.readiness.on_peer_state(peer, vv, root);
                self.check_ready();
            }
            Command::Status { reply } => {
                let _ = reply.send(self.status());
            }
            Command::Stop => {}
        }
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!(%address, "listening");
                self.listen_addrs.push(address);
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => self.listen_addrs.retain(|a| *a != address),
            SwarmEvent::ConnectionEstablished { peer_id, endpoint, .. } => {
                let info = self.peers.entry(peer_id).or_default();
                info.connections += 1;
                if endpoint.is_dialer() {
                    info.addrs.insert(without_p2p(endpoint.get_remote_address()));
                }
                if info.connections == 1 {
                    tracing::info!(peer = %peer_id, addr = %endpoint.get_remote_address(), "connected");
                    let digest = self.my_digest();
                    self.swarm.behaviour_mut().sync.send_request(&peer_id, SyncRequest::Digest(digest));
                }
            }
            SwarmEvent::ConnectionClosed { peer_id, num_established, .. } => {
                if let Some(info) = self.peers.get_mut(&peer_id) {
                    info.connections = num_established;
                }
                if num_established == 0 {
                    tracing::info!(peer = %peer_id, "disconnected");
                    self.readiness.on_peer_gone(&peer_id);
                    if let Some(pull) = self.snapshot.as_mut().and_then(|a| a.pull.as_mut()) {
                        pull.remove_source(&peer_id);
                    }
                }
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                tracing::debug!(peer = ?peer_id, %error, "dial failed");
            }
            SwarmEvent::Behaviour(event) => self.on_behaviour_event(event),
            _ => {}
        }
    }

    fn on_behaviour_event(&mut self, event: BehaviourEvent) {
        match event {
            BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. }) => {
                let meta = parse_agent_version(&info.agent_version);
                if meta.as_ref().is_some_and(|(_, c)| *c != self.cluster) {
                    tracing::info!(peer = %peer_id, agent = %info.agent_version, "peer belongs to another cluster; not syncing with it");
                }
                on_identify(&mut self.swarm, &peer_id, &info);
                match &meta {
                    Some(m) => self.identified.write().expect("identified lock").insert(peer_id, m.clone()),
                    None => self.identified.write().expect("identified lock").remove(&peer_id),
                };
                let entry = self.peers.entry(peer_id).or_default();
                entry.meta = meta;
                entry.addrs.extend(info.listen_addrs.iter().map(without_p2p));
            }
            BehaviourEvent::Ping(ping::Event { peer, result: Ok(rtt), .. }) => {
                self.peers.entry(peer).or_default().rtt = Some(rtt);
            }
            BehaviourEvent::Mdns(mdns::Event::Discovered(found)) => {
                for (peer, addr) in found {
                    if peer != *self.swarm.local_peer_id() && !self.is_connected(&peer) {
                        tracing::info!(%peer, %addr, "found on the LAN");
                        self.swarm.behaviour_mut().kad.add_address(&peer, addr.clone());
                        let _ = self.swarm.dial(addr);
                    }
                }
            }
            BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
                result: QueryResult::GetProviders(Ok(GetProvidersOk::FoundProviders { key, providers })),
                ..
            }) => {
                if key != cluster_provider_key(&self.cluster) {
                    self.on_snapshot_providers(&key, providers);
                    return;
                }
                let me = *self.swarm.local_peer_id();
                for peer in providers {
                    if peer != me && !self.is_connected(&peer) {
                        tracing::debug!(%peer, "dialing a provider of the cluster");
                        let _ = self.swarm.dial(peer);
                    }
                }
            }
            BehaviourEvent::Gossipsub(gossipsub::Event::Message { propagation_source, message_id, message }) => {
                self.metrics.count_in("gossip", message.data.len());
                let inbound =
                    Inbound::Gossip { propagation_source, message_id: message_id.clone(), data: message.data };
                if self.inbound.try_send(inbound).is_err() {
                    // Overloaded: neither accept nor punish; the ops come back through replay.
                    self.swarm.behaviour_mut().gossipsub.report_message_validation_result(
                        &message_id,
                        &propagation_source,
                        MessageAcceptance::Ignore,
                    );
                }
            }
            BehaviourEvent::Gossipsub(gossipsub::Event::SlowPeer { peer_id, failed_messages }) => {
                // Reported once per heartbeat; gossipsub's own warning per dropped message is
                // silenced by the binary's default log filter.
                let unsent = (failed_messages.priority + failed_messages.non_priority) as u64;
                self.metrics.gossip_unsent.inc_by(unsent);
                tracing::warn!(peer = %peer_id, unsent, "gossip messages to a slow peer were not sent; it will pull their ops");
            }
            BehaviourEvent::Sync(event) => self.on_sync_event(event),
            _ => {}
        }
    }
}

/// An address without its trailing `/p2p/<peer>` part, so each peer lists each address once.
fn without_p2p(addr: &Multiaddr) -> Multiaddr {
    addr.iter().filter(|p| !matches!(p, libp2p::multiaddr::Protocol::P2p(_))).collect()
}
