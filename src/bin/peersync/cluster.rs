//! `peersync cluster …`: the cluster authority's commands (make its key, admit, revoke, hand over,
//! write a swarm key). Revoke and handover talk to a node through its HTTP API.

use std::path::PathBuf;
use std::time::Duration;

use clap::Subcommand;
use peersync::api::client::Client;
use peersync::node::Role;
use reqwest::Method;

use super::{print_json, ApiArg};

#[derive(Subcommand)]
pub enum ClusterCommand {
    /// Make a new authority key (never overwrites one) and print the authority's id.
    Init {
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
    },
    /// Certify PEER_ID as a member with a role; writes the certificate to --out, or prints it.
    Admit {
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        peer_id: libp2p::PeerId,
        #[arg(long)]
        role: Role,
        /// How long the certificate is valid, e.g. 30d, 12h, 90m.
        #[arg(long, default_value = "30d")]
        valid_for: String,
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Revoke a member: signs a revocation naming the highest seq of PEER_ID the node at --api holds,
    /// and posts it there; it spreads to every node, and PEER_ID's later ops are refused.
    Revoke {
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        peer_id: libp2p::PeerId,
        #[command(flatten)]
        api: ApiArg,
    },
    /// Move a provider: waits until NEW_PEER_ID holds every op of OLD_PEER_ID that the node at
    /// --api holds, then revokes OLD_PEER_ID at that seq. Point writers at NEW first: writes OLD
    /// acknowledges after the revocation is made are refused by the others.
    Handover {
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        old_peer_id: libp2p::PeerId,
        new_peer_id: libp2p::PeerId,
        /// Give up after this long, e.g. 5m.
        #[arg(long, default_value = "10m")]
        timeout: String,
        #[command(flatten)]
        api: ApiArg,
    },
    /// Write a new swarm key (a libp2p private network's pre-shared key) to FILE; never overwrites.
    SwarmKey {
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
}

pub async fn run(command: ClusterCommand) -> anyhow::Result<()> {
    match command {
        ClusterCommand::Revoke { key, peer_id, api } => {
            let authority = peersync::cert::load_authority_key(&key)?;
            let client = api.client()?;
            let last_seq = seq_of(&client, &peer_id.to_string(), None).await?;
            print_json(revoke(&client, &authority, peer_id, last_seq).await?)
        }
        ClusterCommand::Handover { key, old_peer_id, new_peer_id, timeout, api } => {
            let authority = peersync::cert::load_authority_key(&key)?;
            let timeout = peersync::cert::parse_period(&timeout).map_err(|e| anyhow::anyhow!("--timeout {e}"))?;
            let client = api.client()?;
            let (old, new) = (old_peer_id.to_string(), new_peer_id.to_string());
            let deadline = std::time::Instant::now() + timeout;
            loop {
                let held = seq_of(&client, &old, None).await?;
                let covered = seq_of(&client, &old, Some(&new)).await?;
                if covered >= held {
                    eprintln!("{new} holds all {held} ops of {old} that the node holds; revoking {old}");
                    return print_json(revoke(&client, &authority, old_peer_id, held).await?);
                }
                if std::time::Instant::now() >= deadline {
                    anyhow::bail!(
                        "{new} holds {covered} of the {held} ops of {old} after {timeout:?}; nothing was revoked"
                    );
                }
                eprintln!("waiting: {new} holds {covered} of the {held} ops of {old}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        ClusterCommand::SwarmKey { out } => {
            use std::io::Write as _;
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            let mut file = options.open(&out).map_err(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => {
                    anyhow::anyhow!("{} already exists; a swarm key is never overwritten", out.display())
                }
                _ => anyhow::anyhow!("cannot write {}: {e}", out.display()),
            })?;
            writeln!(file, "{}", peersync::net::new_swarm_key())?;
            eprintln!("swarm key written to {}; give it to every node with --swarm-key", out.display());
            Ok(())
        }
        ClusterCommand::Init { key } => {
            let key = peersync::cert::create_authority_key(&key)?;
            println!("authority: {}", key.public().to_peer_id());
            Ok(())
        }
        ClusterCommand::Admit { key, peer_id, role, valid_for, out } => {
            let authority = peersync::cert::load_authority_key(&key)?;
            let period = peersync::cert::parse_period(&valid_for).map_err(|e| anyhow::anyhow!("--valid-for {e}"))?;
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() as u64;
            let not_after =
                now.checked_add(period.as_millis() as u64).ok_or_else(|| anyhow::anyhow!("--valid-for is too long"))?;
            // Serials increase with time, so a later certificate of the same peer replaces an earlier one.
            // Valid from a minute ago, so a node whose clock is a little behind accepts it at once.
            let cert = peersync::cert::Certificate::issue(
                &authority,
                peer_id,
                role,
                now.saturating_sub(60_000),
                not_after,
                now,
            );
            match out {
                Some(path) => {
                    std::fs::write(&path, cert.to_text())
                        .map_err(|e| anyhow::anyhow!("cannot write --out {}: {e}", path.display()))?;
                    eprintln!(
                        "certificate for {peer_id} ({role}, serial {}) written to {}",
                        cert.serial,
                        path.display()
                    );
                }
                None => print!("{}", cert.to_text()),
            }
            Ok(())
        }
    }
}

/// The highest seq of `origin` that the node at `client` holds, or (with `peer`) that `peer` held
/// in its last digest to that node (0 when it is not connected there).
async fn seq_of(client: &Client, origin: &str, peer: Option<&str>) -> anyhow::Result<u64> {
    let status: serde_json::Value = serde_json::from_slice(&client.call(Method::GET, "/v1/status", None).await?)?;
    let vv = match peer {
        None => status.get("version_vector").cloned(),
        Some(p) => status["peers"]
            .as_array()
            .and_then(|peers| peers.iter().find(|x| x["peer_id"] == p && x["connected"] == true))
            .and_then(|x| x.get("version_vector").cloned()),
    };
    Ok(vv.and_then(|v| v.get(origin).and_then(|s| s.as_u64())).unwrap_or(0))
}

async fn revoke(
    client: &Client,
    authority: &libp2p::identity::Keypair,
    peer: libp2p::PeerId,
    last_seq: u64,
) -> anyhow::Result<Vec<u8>> {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() as u64;
    let revocation = peersync::cert::Revocation::issue(authority, peer, peersync::ids::Seq(last_seq), now);
    Ok(client.call(Method::POST, "/v1/cluster/revocations", Some(revocation.to_text().into_bytes())).await?)
}
