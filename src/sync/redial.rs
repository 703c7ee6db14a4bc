//! Dialing the bootstrap peers again while they are not connected.
//!
//! A bootstrap address is dialed once at start. A peer that was down then, or that restarted later,
//! would otherwise never be connected again unless it dialed this node itself. So each bootstrap
//! address whose peer is not connected is dialed again, after 500 ms, then doubling up to
//! [`MAX_REDIAL_PAUSE`]; the pause starts over once the peer is connected. An address without a
//! `/p2p/` suffix names no peer and is redialed only while this node has no connection at all.
//! No I/O: the caller says what is connected and dials what [`Redial::due`] returns.

use std::time::{Duration, Instant};

use libp2p::{Multiaddr, PeerId};

use super::doubling;

/// First pause before a bootstrap address is dialed again.
pub const FIRST_REDIAL_PAUSE: Duration = Duration::from_millis(500);
/// Longest pause between two dials of one bootstrap address.
pub const MAX_REDIAL_PAUSE: Duration = Duration::from_secs(30);

#[derive(Debug)]
struct Target {
    addr: Multiaddr,
    peer: Option<PeerId>,
    next: Instant,
    /// Dials since the peer was last seen connected.
    misses: u32,
}

#[derive(Debug)]
pub struct Redial {
    targets: Vec<Target>,
}

impl Redial {
    /// `bootstrap`: the addresses dialed at `now` (the start), with their peer when they name one.
    pub fn new(bootstrap: impl IntoIterator<Item = (Multiaddr, Option<PeerId>)>, now: Instant) -> Self {
        let targets = bootstrap
            .into_iter()
            .map(|(addr, peer)| Target { addr, peer, next: now + FIRST_REDIAL_PAUSE, misses: 0 })
            .collect();
        Redial { targets }
    }

    /// The addresses to dial now. `connected` tells whether a peer is connected; `any` whether this
    /// node has any connection.
    pub fn due(&mut self, now: Instant, connected: impl Fn(&PeerId) -> bool, any: bool) -> Vec<Multiaddr> {
        let mut out = Vec::new();
        for t in &mut self.targets {
            let up = match &t.peer {
                Some(p) => connected(p),
                None => any,
            };
            if up {
                // Connected: the next loss is answered quickly again.
                t.misses = 0;
                t.next = now + FIRST_REDIAL_PAUSE;
            } else if now >= t.next {
                out.push(t.addr.clone());
                t.misses += 1;
                t.next = now + doubling(FIRST_REDIAL_PAUSE, t.misses - 1, MAX_REDIAL_PAUSE);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unconnected_bootstrap_peers_are_dialed_again_with_a_doubling_pause_that_starts_over_once_connected() {
        let peer = PeerId::random();
        let named: Multiaddr = format!("/ip4/127.0.0.1/tcp/4001/p2p/{peer}").parse().unwrap();
        let bare: Multiaddr = "/ip4/127.0.0.1/tcp/4002".parse().unwrap();
        let t0 = Instant::now();
        let mut r = Redial::new([(named.clone(), Some(peer)), (bare.clone(), None)], t0);
        let down = |_: &PeerId| false;
        assert!(r.due(t0, down, false).is_empty(), "both were just dialed at start");
        let ms = |n| t0 + Duration::from_millis(n);
        assert_eq!(r.due(ms(500), down, false), vec![named.clone(), bare.clone()]);
        assert!(r.due(ms(900), down, false).is_empty());
        // Pauses of 0.5, 1, 2, 4 ... s after each dial, up to 30 s.
        let mut at = ms(500);
        let mut dials = vec![at];
        while at < t0 + Duration::from_secs(200) {
            at += Duration::from_millis(100);
            if !r.due(at, down, false).is_empty() {
                dials.push(at);
            }
        }
        let gaps: Vec<u64> = dials.windows(2).map(|w| (w[1] - w[0]).as_millis() as u64).collect();
        assert_eq!(&gaps[..7], &[500, 1000, 2000, 4000, 8000, 16000, 30000], "{gaps:?}");
        assert!(gaps[7..].iter().all(|g| *g == 30000), "{gaps:?}");

        // Connected: nothing is dialed, and once it is lost the redials start over at 500 ms.
        let up = |p: &PeerId| *p == peer;
        assert!(r.due(at, up, true).is_empty());
        let after = |n| at + Duration::from_millis(n);
        assert!(r.due(after(100), down, true).is_empty());
        assert_eq!(r.due(after(500), down, true), vec![named.clone()], "a bare address waits while any peer is up");
        assert_eq!(r.due(after(1000), down, false), vec![named, bare]);
    }
}
