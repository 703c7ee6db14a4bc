//! Carrying out the engine's actions: sends, answers, publishes and verdicts on the swarm; store
//! reads on blocking threads; applies, stages, installs and merges on the applier and the writer.
//! Their results come back as [`Command`]s and from there as engine inputs.

use libp2p::gossipsub::{self, MessageAcceptance};
use libp2p::kad::RecordKey;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::dial_opts::DialOpts;

use super::{Command, EventLoop};
use crate::net::{cluster_provider_key, cluster_topic};
use crate::node::applier::ApplyJob;
use crate::node::known_peers;
use crate::store::StoreError;
use crate::sync::{Action, ChunkVerdict, Count, Input, ProviderKey, ReplyId, Verdict};
use crate::wire::{SyncRequest, SyncResponse};

impl EventLoop {
    /// Carries out every queued action, feeding back the inputs some of them produce at once.
    pub(super) fn execute_actions(&mut self) {
        while let Some(action) = self.engine.poll_action() {
            if let Some(input) = self.execute(action) {
                self.engine.handle(std::time::Instant::now(), input, &self.store);
            }
        }
    }

    fn send_request(&mut self, peer: libp2p::PeerId, req: crate::sync::ReqId, request: SyncRequest) {
        let id = self.swarm.behaviour_mut().sync.send_request(&peer, request);
        self.requests.insert(id, req);
    }

    /// The lease log writes up to `seq` are durable: the lease messages waiting for them leave.
    pub(super) fn lease_persisted(&mut self, seq: u64) {
        self.lease_outbox.durable = self.lease_outbox.durable.max(seq);
        while self.lease_outbox.held.front().is_some_and(|(after, ..)| *after <= self.lease_outbox.durable) {
            let (_, peer, req, request) = self.lease_outbox.held.pop_front().expect("front exists");
            self.send_request(peer, req, request);
        }
    }

    /// The lease log failed: nothing it held may leave, and the engine stops the group.
    pub(super) fn lease_log_failed(&mut self, error: String) -> Input {
        tracing::error!(%error, "lease log write failed");
        self.lease_outbox.broken = true;
        self.lease_outbox.held.clear();
        Input::LeaseLogFailed { error }
    }

    fn key(&self, key: &ProviderKey) -> RecordKey {
        match key {
            ProviderKey::Cluster => cluster_provider_key(&self.cluster),
            ProviderKey::Snapshot(cid) => RecordKey::new(&cid.to_bytes()),
        }
    }

    fn execute(&mut self, action: Action) -> Option<Input> {
        match action {
            Action::Send { peer, req, request: request @ SyncRequest::Lease(_) } => {
                let o = &mut self.lease_outbox;
                if o.broken {
                    return Some(Input::Response { req, result: Err("the lease log failed".into()) });
                }
                if o.held.is_empty() && o.durable == o.issued {
                    self.send_request(peer, req, request);
                } else {
                    o.held.push_back((o.issued, peer, req, request));
                }
            }
            Action::Send { peer, req, request } => self.send_request(peer, req, request),
            Action::PersistLeaseLog { write } => {
                let o = &mut self.lease_outbox;
                if o.broken {
                    return None;
                }
                o.issued += 1;
                if let Err(error) = self.lease_log.write(o.issued, write) {
                    return Some(self.lease_log_failed(error));
                }
            }
            Action::LeaseDone { wait, result } => {
                if let Some(reply) = self.lease_waits.remove(&wait) {
                    let _ = reply.send(result);
                }
            }
            Action::Reply { reply, response } => self.respond(reply, response),
            Action::Serve { reply, request, .. } => {
                let store = self.store.clone();
                let commands = self.commands_tx.clone();
                tokio::spawn(async move {
                    let response =
                        tokio::task::spawn_blocking(move || crate::sync::serve(&store, request)).await.unwrap_or_else(
                            |_| SyncResponse::Error { code: "internal".into(), message: "read task failed".into() },
                        );
                    let _ = commands.send(Command::Respond { reply, response }).await;
                });
            }
            Action::Publish { data } => self.publish(data),
            Action::Persist => {
                // The durable commit's event comes back as `Input::Committed`, which releases the
                // answers that waited for it.
                let writer = self.writer.clone();
                tokio::spawn(async move { writer.flush().await });
            }
            Action::Verdict { id, verdict } => {
                let (message_id, source) = self.gossip.remove(&id)?;
                let acceptance = match verdict {
                    Verdict::Accept => MessageAcceptance::Accept,
                    Verdict::Reject => MessageAcceptance::Reject,
                    Verdict::Ignore => MessageAcceptance::Ignore,
                };
                self.swarm.behaviour_mut().gossipsub.report_message_validation_result(&message_id, &source, acceptance);
            }
            Action::Apply { ticket, origin, batches, prev } => {
                if let Err(e) = self.apply.try_send(ApplyJob { ticket, origin, batches, prev }) {
                    // The engine bounds its tickets below the queue's capacity; should it still be
                    // full, the batches are refused and come back through replay.
                    let reason = match e {
                        tokio::sync::mpsc::error::TrySendError::Full(_) => "apply queue full",
                        tokio::sync::mpsc::error::TrySendError::Closed(_) => "applier stopped",
                    };
                    return Some(Input::Applied { ticket, result: Err(reason.into()) });
                }
            }
            Action::Stage { peer, snapshot, index, chunk, bytes, durable } => {
                self.metrics.count_in("snapshot", bytes.len());
                let (store, commands) = (self.store.clone(), self.commands_tx.clone());
                tokio::spawn(async move {
                    let len = bytes.len() as u64;
                    // `stage_chunk` checks the bytes against the chunk's CID and sizes, and every
                    // entry, before it writes anything.
                    let cid = chunk.cid;
                    let verdict =
                        tokio::task::spawn_blocking(move || match store.stage_chunk(&snapshot, &chunk, &bytes, durable) {
                            Ok(_) => ChunkVerdict::Stored,
                            Err(StoreError::Snapshot(e)) => {
                                tracing::debug!(%cid, error = %e, "chunk refused");
                                ChunkVerdict::Corrupt
                            }
                            Err(e) => {
                                tracing::warn!(%cid, error = %e, "cannot keep a snapshot chunk; the pull waits, then asks for it again");
                                ChunkVerdict::LocalError
                            }
                        })
                        .await
                        .unwrap_or(ChunkVerdict::LocalError);
                    let _ = commands.send(Command::Staged { peer, index, len, verdict }).await;
                });
            }
            Action::Install { manifest } => {
                let (writer, commands) = (self.writer.clone(), self.commands_tx.clone());
                tokio::spawn(async move {
                    let result = writer.install_snapshot(manifest).await.map(|_| ()).map_err(|e| e.to_string());
                    let _ = commands.send(Command::Installed { result }).await;
                });
            }
            Action::Merge { peer, entries } => {
                let (writer, commands) = (self.writer.clone(), self.commands_tx.clone());
                tokio::spawn(async move {
                    let n = entries.len();
                    let result = match writer.merge_entries(entries).await {
                        Ok(o) => {
                            tracing::info!(%peer, entries = n, changed = o.changed, "merged a peer's entries");
                            Ok(())
                        }
                        Err(e) => {
                            tracing::warn!(%peer, error = %e, "merging a peer's entries failed");
                            Err(e.to_string())
                        }
                    };
                    let _ = commands.send(Command::Merged { result }).await;
                });
            }
            Action::CollectTombstones { through } => {
                let writer = self.writer.clone();
                tokio::spawn(async move {
                    match writer.collect_tombstones(through).await {
                        Ok(0) => {}
                        Ok(n) => tracing::info!(tombstones = n, %through, "collected tombstones every member has seen"),
                        Err(e) => tracing::warn!(error = %e, %through, "collecting tombstones failed"),
                    }
                });
            }
            Action::CollectChunks { keep } => {
                let store = self.store.clone();
                tokio::task::spawn_blocking(move || match store.collect_chunks(&keep) {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(chunks = n, "deleted the chunks of abandoned snapshot pulls"),
                    Err(e) => tracing::warn!(error = %e, "could not delete unused snapshot chunks"),
                });
            }
            Action::Dial { peer, addr } => self.dial(peer, addr),
            Action::Disconnect { peer } => {
                let _ = self.swarm.disconnect_peer_id(peer);
            }
            Action::Acked { wait, acked, met } => {
                if let Some(reply) = self.ack_waits.remove(&wait) {
                    let _ = reply.send((acked, met));
                }
            }
            Action::Gossip { peer, allow } => {
                let gossipsub = &mut self.swarm.behaviour_mut().gossipsub;
                if allow {
                    gossipsub.remove_blacklisted_peer(&peer);
                } else {
                    gossipsub.blacklist_peer(&peer);
                }
                // Gossipsub learned of the peer before this node did, so it is already a topic
                // peer: its score is what keeps our messages from it.
                let score = if allow { 0.0 } else { crate::net::WITHHELD_SCORE };
                gossipsub.set_application_score(&peer, score);
            }
            Action::Provide { key } => {
                let key = self.key(&key);
                if let Err(e) = self.swarm.behaviour_mut().kad.start_providing(key) {
                    tracing::debug!(error = %e, "could not announce a provider record");
                }
            }
            Action::FindProviders { key } => {
                let key = self.key(&key);
                self.swarm.behaviour_mut().kad.get_providers(key);
            }
            Action::Phase { phase } => {
                self.phase.send_replace(phase);
            }
            Action::RememberPeers { addrs } => {
                let dir = self.data_dir.clone();
                tokio::task::spawn_blocking(move || {
                    if let Err(e) = known_peers::save(&dir, &addrs) {
                        tracing::warn!(error = %e, "could not save the known peers; a restart will rely on bootstrap");
                    }
                });
            }
            Action::PersistRevocations { all } => {
                let dir = self.data_dir.clone();
                tokio::task::spawn_blocking(move || {
                    if let Err(e) = crate::node::revocations::save(&dir, &all) {
                        tracing::error!(error = %e, "could not save the revocations; a restart would forget them");
                    }
                });
            }
            Action::Count { what, n } => self.count(what, n),
        }
        None
    }

    fn count(&self, what: Count, n: u64) {
        let m = &self.metrics;
        match what {
            Count::GossipRejected => m.gossip_rejected.inc_by(n),
            Count::ReplayRejected => m.replay_rejected.inc_by(n),
            Count::GapOverflow => m.gap_overflows.inc_by(n),
            Count::OpsReplayed => m.ops_replayed.inc_by(n),
            Count::Divergence => m.divergences.inc_by(n),
            Count::SnapshotInstalled => m.snapshots_installed.inc_by(n),
            Count::ChunkRejected => m.chunks_rejected.inc_by(n),
            Count::DigestsSent => m.digests_sent.inc_by(n),
            Count::RequestsShed => m.requests_shed.inc_by(n),
            Count::RequestsReceived => m.requests_received("all").inc_by(n),
            Count::DigestsReceived => m.requests_received("digest").inc_by(n),
            Count::GossipIgnored => m.gossip_ignored.inc_by(n),
        };
    }

    pub(super) fn respond(&mut self, reply: ReplyId, response: SyncResponse) {
        let Some(channel) = self.replies.remove(&reply) else { return };
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

    pub(super) fn count_response_in(&self, response: &SyncResponse) {
        if let SyncResponse::Ops(batches) = response {
            let bytes: usize = batches.iter().flat_map(|b| b.ops.iter()).map(|o| o.len()).sum();
            self.metrics.count_in("replay", bytes);
        }
    }

    fn publish(&mut self, data: Vec<u8>) {
        let len = data.len();
        match self.swarm.behaviour_mut().gossipsub.publish(cluster_topic(&self.cluster), data) {
            Ok(_) => self.metrics.count_out("gossip", len),
            Err(gossipsub::PublishError::NoPeersSubscribedToTopic | gossipsub::PublishError::Duplicate) => {}
            // A value larger than a gossip message may be: expected, not a fault.
            Err(gossipsub::PublishError::MessageTooLarge) => {
                tracing::debug!(bytes = len, "message too large to gossip; peers will pull its ops")
            }
            Err(e) => tracing::warn!(error = %e, "could not publish; peers will pull the ops"),
        }
    }

    fn dial(&mut self, peer: Option<libp2p::PeerId>, addr: Option<libp2p::Multiaddr>) {
        let result = match (peer, addr) {
            (Some(peer), Some(addr)) => {
                self.swarm.behaviour_mut().kad.add_address(&peer, addr.clone());
                self.swarm.dial(DialOpts::peer_id(peer).addresses(vec![addr]).build())
            }
            (Some(peer), None) => self.swarm.dial(peer),
            (None, Some(addr)) => {
                if let Some(Protocol::P2p(peer)) = addr.iter().last() {
                    let bare: libp2p::Multiaddr = addr.iter().filter(|p| !matches!(p, Protocol::P2p(_))).collect();
                    self.swarm.behaviour_mut().kad.add_address(&peer, bare);
                }
                self.swarm.dial(addr)
            }
            (None, None) => return,
        };
        if let Err(e) = result {
            tracing::debug!(error = %e, "could not dial");
        }
    }
}
