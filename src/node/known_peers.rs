//! The peers a node knew, kept in its data dir (`known-peers`, one `/…/p2p/<id>` address a line)
//! so that after a restart it dials them again, even without bootstrap addresses. Which peers are
//! worth keeping is the sync engine's choice; this file only reads and writes the list.

use std::path::{Path, PathBuf};

use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};

/// File name of the list inside the data dir.
pub const KNOWN_PEERS_FILE: &str = "known-peers";

fn path(data_dir: &Path) -> PathBuf {
    data_dir.join(KNOWN_PEERS_FILE)
}

/// The remembered peers, each with the address to dial. A missing file is an empty list; a line
/// that does not parse is skipped with a warning.
pub fn load(data_dir: &Path) -> Vec<(Multiaddr, PeerId)> {
    let Ok(text) = std::fs::read_to_string(path(data_dir)) else { return Vec::new() };
    let mut out = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        match line.parse::<Multiaddr>() {
            Ok(addr) => match addr.iter().last() {
                Some(Protocol::P2p(peer)) => out.push((addr.clone(), peer)),
                _ => tracing::warn!(%line, "known-peers: address without /p2p/<peer-id> skipped"),
            },
            Err(e) => tracing::warn!(%line, error = %e, "known-peers: line is not a multiaddr; skipped"),
        }
    }
    out
}

/// Replaces the list (write to a temporary file, then rename, so a crash leaves the old or the new).
pub fn save(data_dir: &Path, addrs: &[Multiaddr]) -> std::io::Result<()> {
    let mut text = String::from("# peers this node knew; redialed after a restart (written by peersync)\n");
    for a in addrs {
        text.push_str(&a.to_string());
        text.push('\n');
    }
    let tmp = data_dir.join(format!("{KNOWN_PEERS_FILE}.tmp"));
    std::fs::write(&tmp, text)?;
    std::fs::rename(tmp, path(data_dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_skips_bad_lines() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load(dir.path()).is_empty());
        let peer = PeerId::random();
        let addr: Multiaddr = format!("/ip4/127.0.0.1/tcp/4001/p2p/{peer}").parse().unwrap();
        save(dir.path(), std::slice::from_ref(&addr)).unwrap();
        let mut text = std::fs::read_to_string(path(dir.path())).unwrap();
        text.push_str("not an address\n/ip4/127.0.0.1/tcp/9\n");
        std::fs::write(path(dir.path()), text).unwrap();
        assert_eq!(load(dir.path()), vec![(addr, peer)]);
    }
}
