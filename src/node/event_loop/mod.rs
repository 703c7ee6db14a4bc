//! The one task that owns the libp2p `Swarm`: a thin executor of the sync engine.
//!
//! It turns swarm events, commits and the results of background work into [`Input`]s for
//! [`sync::Engine`](crate::sync::Engine), and carries out the [`Action`]s that come back (see
//! `execute`). It decides nothing itself. Everything else reaches it through [`Command`]s on a
//! bounded channel, each with a oneshot reply where one is needed. No disk I/O happens on this
//! task: store reads and writes are handed to blocking tasks, the writer or the applier.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use libp2p::gossipsub::{self, MessageId};
use libp2p::kad::{self, GetProvidersOk, QueryResult};
use libp2p::request_response::{self, OutboundRequestId, ResponseChannel};
use libp2p::swarm::SwarmEvent;
use libp2p::{identify, mdns, ping, Multiaddr, PeerId, Swarm};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

mod execute;
mod status;

pub use status::NetStatus;

use super::applier::ApplyJob;
use super::metrics::Metrics;
use crate::ids::Origin;
use crate::net::{cluster_provider_key, on_identify, parse_agent_version, Behaviour, BehaviourEvent};
use crate::store::{CommitEvent, Store, WriteHandle};
use crate::sync::leases::{LeaseFailure, LeaseWait};
use crate::sync::{ChunkVerdict, Engine, Found, GossipId, Input, Phase, ProviderKey, ReplyId, ReqId, Ticket, WaitId};
use crate::wire::{SyncRequest, SyncResponse};

/// Commit events queued behind the one received that the loop takes with it in one go.
const MAX_COMMITS_JOINED: usize = 64;

/// Requests to the event loop.
pub(crate) enum Command {
    /// The answer to a peer's request, read from the store on a blocking task.
    Respond {
        reply: ReplyId,
        response: SyncResponse,
    },
    /// An apply job was verified and queued, or refused.
    Applied {
        ticket: Ticket,
        result: Result<(), String>,
    },
    /// A queued batch of `origin` failed to commit.
    ApplyFailed {
        origin: Origin,
    },
    /// A snapshot chunk from `peer` was checked, and persisted when it was good.
    Staged {
        peer: PeerId,
        index: usize,
        len: u64,
        verdict: ChunkVerdict,
    },
    /// The snapshot being pulled was installed, or failed to.
    Installed {
        result: Result<(), String>,
    },
    /// Entries from a divergence repair were merged, or failed to.
    Merged {
        result: Result<(), String>,
    },
    /// This node made a snapshot: announce it.
    SnapshotCreated {
        cid: cid::Cid,
    },
    /// The operator says this node may serve alone.
    ServeAlone,
    /// The operator hands in a revocation.
    Revoke {
        revocation: crate::cert::Revocation,
    },
    /// Wait until `ack` other nodes hold this node's ops up to `seq`, or `timeout`; the answer
    /// is how many do, and whether that is enough.
    AwaitAcks {
        seq: crate::ids::Seq,
        ack: crate::sync::AckWanted,
        timeout: std::time::Duration,
        reply: oneshot::Sender<(usize, bool)>,
    },
    /// Ask the lease group; the answer is the grant or why there is none.
    Lease {
        lease: String,
        key: Vec<u8>,
        request: crate::crdt::LeaseRequest,
        timeout: std::time::Duration,
        reply: oneshot::Sender<Result<crate::crdt::LeaseGrant, crate::sync::leases::LeaseFailure>>,
    },
    /// The lease log writer committed the writes up to `seq`, or failed to.
    LeasePersisted {
        seq: u64,
        result: Result<(), String>,
    },
    Status {
        reply: oneshot::Sender<NetStatus>,
    },
    Stop,
}

/// Everything the event loop is wired to.
pub(crate) struct Parts {
    pub swarm: Swarm<Behaviour>,
    pub engine: Engine,
    pub store: Store,
    pub cluster: String,
    pub data_dir: PathBuf,
    pub commands: mpsc::Receiver<Command>,
    pub commands_tx: mpsc::Sender<Command>,
    pub commits: broadcast::Receiver<Arc<CommitEvent>>,
    pub apply: mpsc::Sender<ApplyJob>,
    pub metrics: Arc<Metrics>,
    pub phase: watch::Sender<Phase>,
    pub writer: WriteHandle,
    pub lease_log: crate::node::lease_log::LeaseLogWriter,
}

/// Lease messages held until the lease log write before them is durable.
struct LeaseOutbox {
    /// Writes handed to the lease log writer, and the last of them reported durable.
    issued: u64,
    durable: u64,
    /// Messages in order, each with the write it must wait for.
    held: std::collections::VecDeque<(u64, PeerId, ReqId, SyncRequest)>,
    /// The lease log failed: no lease message leaves any more.
    broken: bool,
}

pub(crate) struct EventLoop {
    swarm: Swarm<Behaviour>,
    engine: Engine,
    store: Store,
    cluster: String,
    data_dir: PathBuf,
    commands: mpsc::Receiver<Command>,
    commands_tx: mpsc::Sender<Command>,
    commits: broadcast::Receiver<Arc<CommitEvent>>,
    /// Verifies and queues the batches the engine applies.
    apply: mpsc::Sender<ApplyJob>,
    metrics: Arc<Metrics>,
    /// Publishes the phase to the node's handle (reads answer 503 while syncing).
    phase: watch::Sender<Phase>,
    /// Installs pulled snapshots and merges repaired entries.
    writer: WriteHandle,
    listen_addrs: Vec<Multiaddr>,
    /// The engine's requests in flight, by the transport's id.
    requests: HashMap<OutboundRequestId, ReqId>,
    /// Inbound requests awaiting their answer.
    replies: HashMap<ReplyId, ResponseChannel<SyncResponse>>,
    next_reply: u64,
    /// Gossip messages awaiting their verdict.
    gossip: HashMap<GossipId, (MessageId, PeerId)>,
    next_gossip: u64,
    /// Callers waiting for acknowledgements of their writes.
    ack_waits: HashMap<WaitId, oneshot::Sender<(usize, bool)>>,
    next_wait: u64,
    /// Callers waiting for the lease group's answer.
    lease_waits: HashMap<LeaseWait, oneshot::Sender<Result<crate::crdt::LeaseGrant, LeaseFailure>>>,
    lease_log: crate::node::lease_log::LeaseLogWriter,
    lease_outbox: LeaseOutbox,
}

impl EventLoop {
    pub fn new(p: Parts) -> Self {
        EventLoop {
            swarm: p.swarm,
            engine: p.engine,
            store: p.store,
            cluster: p.cluster,
            data_dir: p.data_dir,
            commands: p.commands,
            commands_tx: p.commands_tx,
            commits: p.commits,
            apply: p.apply,
            metrics: p.metrics,
            phase: p.phase,
            writer: p.writer,
            listen_addrs: Vec::new(),
            requests: HashMap::new(),
            replies: HashMap::new(),
            next_reply: 0,
            gossip: HashMap::new(),
            next_gossip: 0,
            ack_waits: HashMap::new(),
            next_wait: 0,
            lease_waits: HashMap::new(),
            lease_log: p.lease_log,
            lease_outbox: LeaseOutbox { issued: 0, durable: 0, held: Default::default(), broken: false },
        }
    }

    pub async fn run(mut self) {
        self.execute_actions();
        let timer = tokio::time::sleep(std::time::Duration::ZERO);
        tokio::pin!(timer);
        loop {
            if let Some(at) = self.engine.poll_timeout() {
                timer.as_mut().reset(tokio::time::Instant::from_std(at));
            }
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                command = self.commands.recv() => match command {
                    Some(Command::Stop) | None => break,
                    Some(c) => self.on_command(c),
                },
                commit = self.commits.recv() => match commit {
                    Ok(c) => {
                        // Commits that queued up while the loop was busy are published together.
                        let mut batches = c.local_batches.clone();
                        for _ in 0..MAX_COMMITS_JOINED {
                            match self.commits.try_recv() {
                                Ok(more) => batches.extend(more.local_batches.iter().cloned()),
                                Err(broadcast::error::TryRecvError::Lagged(n)) => self.commits_lagged(n),
                                Err(_) => break,
                            }
                        }
                        self.feed(Input::Committed { batches });
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => self.commits_lagged(n),
                    Err(broadcast::error::RecvError::Closed) => break,
                },
                _ = &mut timer => {
                    self.metrics.sync_rounds.inc();
                    self.feed(Input::Tick);
                    self.update_gauges();
                }
            }
        }
        tracing::debug!("event loop stopped");
    }

    /// The writer's commit events overflowed this loop's queue: `n` were lost.
    fn commits_lagged(&mut self, n: u64) {
        tracing::warn!(missed = n, "publisher fell behind the writer; peers will pull the missed ops");
        self.metrics.events_lagged.inc_by(n);
    }

    /// Hands an input to the engine and carries out what it decided.
    fn feed(&mut self, input: Input) {
        self.engine.handle(Instant::now(), input, &self.store);
        self.execute_actions();
    }

    fn on_command(&mut self, command: Command) {
        let input = match command {
            Command::Respond { reply, response } => {
                let bytes = response.payload_len();
                self.respond(reply, response);
                Input::Served { reply, bytes }
            }
            Command::Applied { ticket, result } => Input::Applied { ticket, result },
            Command::ApplyFailed { origin } => Input::ApplyFailed { origin },
            Command::Staged { peer, index, len, verdict } => Input::Staged { peer, index, len, verdict },
            Command::Installed { result } => Input::Installed { result },
            Command::Merged { result } => Input::Merged { result },
            Command::SnapshotCreated { cid } => Input::SnapshotCreated { cid },
            Command::ServeAlone => Input::ServeAlone,
            Command::AwaitAcks { seq, ack, timeout, reply } => {
                self.next_wait += 1;
                let wait = WaitId(self.next_wait);
                self.ack_waits.insert(wait, reply);
                Input::AwaitAcks { wait, seq, ack, timeout }
            }
            Command::Revoke { revocation } => Input::Revoke { revocation },
            Command::Lease { lease, key, request, timeout, reply } => {
                self.next_wait += 1;
                let wait = LeaseWait(self.next_wait);
                self.lease_waits.insert(wait, reply);
                Input::Lease { wait, lease, key, request, timeout }
            }
            Command::LeasePersisted { seq, result } => match result {
                Ok(()) => {
                    self.lease_persisted(seq);
                    return;
                }
                Err(error) => self.lease_log_failed(error),
            },
            Command::Status { reply } => {
                let _ = reply.send(self.status());
                return;
            }
            Command::Stop => return,
        };
        self.feed(input);
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        let input = match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!(%address, "listening");
                self.listen_addrs.push(address);
                return;
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.listen_addrs.retain(|a| *a != address);
                return;
            }
            SwarmEvent::ConnectionEstablished { peer_id, endpoint, .. } => {
                self.metrics.connected_peers.set(self.swarm.connected_peers().count() as i64);
                let dialed = endpoint.is_dialer().then(|| endpoint.get_remote_address().clone());
                Input::Connected { peer: peer_id, dialed }
            }
            SwarmEvent::ConnectionClosed { peer_id, num_established, .. } => {
                self.metrics.connected_peers.set(self.swarm.connected_peers().count() as i64);
                Input::Disconnected { peer: peer_id, remaining: num_established }
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                tracing::debug!(peer = ?peer_id, %error, "dial failed");
                return;
            }
            SwarmEvent::Behaviour(event) => match self.behaviour_input(event) {
                Some(input) => input,
                None => return,
            },
            _ => return,
        };
        self.feed(input);
    }

    fn behaviour_input(&mut self, event: BehaviourEvent) -> Option<Input> {
        match event {
            BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. }) => {
                on_identify(&mut self.swarm, &peer_id, &info);
                let agent = parse_agent_version(&info.agent_version);
                Some(Input::Identified { peer: peer_id, agent, listen_addrs: info.listen_addrs })
            }
            BehaviourEvent::Ping(ping::Event { peer, result: Ok(rtt), .. }) => Some(Input::Rtt { peer, rtt }),
            BehaviourEvent::Mdns(mdns::Event::Discovered(found)) => {
                let me = *self.swarm.local_peer_id();
                let peers: Vec<_> = found.into_iter().filter(|(p, _)| *p != me).collect();
                for (peer, addr) in &peers {
                    self.swarm.behaviour_mut().kad.add_address(peer, addr.clone());
                }
                let peers = peers.into_iter().map(|(p, a)| (p, Some(a))).collect();
                Some(Input::Discovered { via: Found::Mdns, peers })
            }
            BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
                result: QueryResult::GetProviders(Ok(GetProvidersOk::FoundProviders { key, providers })),
                ..
            }) => {
                let key = if key == cluster_provider_key(&self.cluster) {
                    ProviderKey::Cluster
                } else {
                    ProviderKey::Snapshot(cid::Cid::try_from(key.as_ref()).ok()?)
                };
                Some(Input::Providers { key, peers: providers.into_iter().collect() })
            }
            BehaviourEvent::Gossipsub(gossipsub::Event::Message { propagation_source, message_id, message }) => {
                self.metrics.count_in("gossip", message.data.len());
                self.next_gossip += 1;
                let id = GossipId(self.next_gossip);
                self.gossip.insert(id, (message_id, propagation_source));
                Some(Input::Gossip { id, from: propagation_source, data: message.data })
            }
            BehaviourEvent::Gossipsub(gossipsub::Event::SlowPeer { peer_id, failed_messages }) => {
                // Reported once per heartbeat; gossipsub's own warning per dropped message is
                // silenced by the binary's default log filter.
                let unsent = (failed_messages.priority + failed_messages.non_priority) as u64;
                self.metrics.gossip_unsent.inc_by(unsent);
                tracing::warn!(peer = %peer_id, unsent, "gossip messages to a slow peer were not sent; it will pull their ops");
                None
            }
            BehaviourEvent::Sync(event) => self.sync_input(event),
            _ => None,
        }
    }

    fn sync_input(&mut self, event: request_response::Event<SyncRequest, SyncResponse>) -> Option<Input> {
        match event {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request { request, channel, .. } => {
                    self.next_reply += 1;
                    let reply = ReplyId(self.next_reply);
                    self.replies.insert(reply, channel);
                    Some(Input::Request { peer, reply, request })
                }
                request_response::Message::Response { request_id, response } => {
                    let req = self.requests.remove(&request_id)?;
                    self.count_response_in(&response);
                    Some(Input::Response { req, result: Ok(response) })
                }
            },
            request_response::Event::OutboundFailure { peer, request_id, error, .. } => {
                tracing::debug!(%peer, %error, "request failed");
                let req = self.requests.remove(&request_id)?;
                Some(Input::Response { req, result: Err(error.to_string()) })
            }
            request_response::Event::InboundFailure { peer, error, .. } => {
                tracing::debug!(%peer, %error, "answering a request failed");
                None
            }
            request_response::Event::ResponseSent { .. } => None,
        }
    }
}
