//! Leases: a named key held by one holder until an expiry, with a fencing token.
//!
//! A primary grants a lease when it is free, expired, or already held by the same holder; each new
//! holder gets a token one above the last, so consumers can reject a stale holder by its lower token.
//! Two primaries may grant concurrently: the merge keeps the state with the greatest
//! `(token, hlc, origin)`, so every replica settles on the same single holder and the other learns it
//! lost.

use serde::{Deserialize, Serialize};

use crate::crdt::Hlc;
use crate::ids::Origin;

/// The replicated state of one lease key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseState {
    /// Current holder, or `None` once released.
    pub holder: Option<String>,
    /// Fencing token of the current (or last) grant. Grows by one with each new holder.
    pub token: u64,
    /// Wall-clock milliseconds after which the lease is free to be taken.
    pub expires_at_ms: u64,
    /// When the state was written; orders writes with the same token.
    pub hlc: Hlc,
    /// The primary that wrote the state; the final tie-break.
    pub origin: Origin,
}

impl LeaseState {
    fn order_key(&self) -> (u64, Hlc, Origin, &Option<String>, u64) {
        (self.token, self.hlc, self.origin, &self.holder, self.expires_at_ms)
    }

    pub fn wins_over(&self, other: &LeaseState) -> bool {
        self.order_key() > other.order_key()
    }

    /// The merge of two states: the winner. Commutative, associative and idempotent.
    pub fn merge(self, other: LeaseState) -> LeaseState {
        if other.wins_over(&self) {
            other
        } else {
            self
        }
    }

    /// The holder at `now_ms`, if the lease is held and not expired.
    pub fn live_holder(&self, now_ms: u64) -> Option<&str> {
        match &self.holder {
            Some(h) if now_ms < self.expires_at_ms => Some(h),
            _ => None,
        }
    }
}

/// What a client asks of a lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LeaseRequest {
    Acquire { holder: String, ttl_ms: u64 },
    Renew { holder: String, ttl_ms: u64 },
    Release { holder: String },
}

/// The outcome of a granted request: the state to write (without its stamp).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseGrant {
    pub holder: Option<String>,
    pub token: u64,
    pub expires_at_ms: u64,
}

/// Why a lease request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseError {
    #[error("lease is held by {holder:?} (token {token}) until {until_ms} ms since the epoch")]
    Held { holder: String, token: u64, until_ms: u64 },
    #[error("{holder:?} does not hold this lease; acquire it first")]
    NotHolder { holder: String },
}

/// The part of a lease's state a decision reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseView<'a> {
    pub holder: Option<&'a str>,
    pub token: u64,
    pub expires_at_ms: u64,
}

impl<'a> LeaseView<'a> {
    fn live_holder(&self, now_ms: u64) -> Option<&'a str> {
        self.holder.filter(|_| now_ms < self.expires_at_ms)
    }
}

impl LeaseState {
    pub fn view(&self) -> LeaseView<'_> {
        LeaseView { holder: self.holder.as_deref(), token: self.token, expires_at_ms: self.expires_at_ms }
    }
}

/// Decides a request against the current state at `now_ms`. Pure: the caller writes the grant. A
/// new holder's token is one above the last; the lease service replaces it with its own (see
/// `sync::leases`), which is larger still.
pub fn decide(current: Option<LeaseView<'_>>, request: &LeaseRequest, now_ms: u64) -> Result<LeaseGrant, LeaseError> {
    let last_token = current.map_or(0, |s| s.token);
    let live = current.and_then(|s| s.live_holder(now_ms));
    match request {
        LeaseRequest::Acquire { holder, ttl_ms } => match live {
            Some(h) if h != holder => Err(held(current, h)),
            // Re-acquiring a live lease keeps its token: the holder never lost it.
            Some(_) => Ok(LeaseGrant {
                holder: Some(holder.clone()),
                token: last_token,
                expires_at_ms: now_ms.saturating_add(*ttl_ms),
            }),
            None => Ok(LeaseGrant {
                holder: Some(holder.clone()),
                token: last_token + 1,
                expires_at_ms: now_ms.saturating_add(*ttl_ms),
            }),
        },
        LeaseRequest::Renew { holder, ttl_ms } => match current {
            // An expired lease that nobody took since is still the holder's to renew with its token.
            Some(s) if s.holder == Some(holder.as_str()) => Ok(LeaseGrant {
                holder: Some(holder.clone()),
                token: s.token,
                expires_at_ms: now_ms.saturating_add(*ttl_ms),
            }),
            _ => match live {
                Some(h) => Err(held(current, h)),
                None => Err(LeaseError::NotHolder { holder: holder.clone() }),
            },
        },
        LeaseRequest::Release { holder } => match current {
            Some(s) if s.holder == Some(holder.as_str()) => {
                Ok(LeaseGrant { holder: None, token: s.token, expires_at_ms: now_ms })
            }
            _ => Err(LeaseError::NotHolder { holder: holder.clone() }),
        },
    }
}

fn held(current: Option<LeaseView<'_>>, holder: &str) -> LeaseError {
    let s = current.expect("a live holder implies a state");
    LeaseError::Held { holder: holder.to_owned(), token: s.token, until_ms: s.expires_at_ms }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(holder: Option<&str>, token: u64, expires_at_ms: u64) -> LeaseState {
        LeaseState {
            holder: holder.map(str::to_owned),
            token,
            expires_at_ms,
            hlc: Hlc::new(1, 0),
            origin: libp2p::identity::Keypair::generate_ed25519().public().to_peer_id(),
        }
    }

    fn acquire(h: &str) -> LeaseRequest {
        LeaseRequest::Acquire { holder: h.into(), ttl_ms: 100 }
    }

    #[test]
    fn free_lease_is_granted_with_next_token() {
        let g = decide(None, &acquire("a"), 1_000).unwrap();
        assert_eq!(g, LeaseGrant { holder: Some("a".into()), token: 1, expires_at_ms: 1_100 });
        let released = state(None, 4, 10);
        assert_eq!(decide(Some(released.view()), &acquire("b"), 1_000).unwrap().token, 5);
    }

    #[test]
    fn held_lease_refuses_another_holder_until_expiry() {
        let s = state(Some("a"), 3, 2_000);
        assert_eq!(
            decide(Some(s.view()), &acquire("b"), 1_999),
            Err(LeaseError::Held { holder: "a".into(), token: 3, until_ms: 2_000 })
        );
        assert_eq!(decide(Some(s.view()), &acquire("b"), 2_000).unwrap().token, 4);
        assert_eq!(decide(Some(s.view()), &acquire("a"), 1_500).unwrap().token, 3);
    }

    #[test]
    fn renew_and_release_need_the_holder() {
        let s = state(Some("a"), 3, 2_000);
        let renew = |h: &str| LeaseRequest::Renew { holder: h.into(), ttl_ms: 500 };
        assert_eq!(decide(Some(s.view()), &renew("a"), 1_900).unwrap().expires_at_ms, 2_400);
        assert!(matches!(decide(Some(s.view()), &renew("b"), 1_900), Err(LeaseError::Held { .. })));
        assert!(matches!(decide(None, &renew("b"), 1_900), Err(LeaseError::NotHolder { .. })));
        let rel = decide(Some(s.view()), &LeaseRequest::Release { holder: "a".into() }, 1_000).unwrap();
        assert_eq!(rel, LeaseGrant { holder: None, token: 3, expires_at_ms: 1_000 });
        assert!(decide(Some(s.view()), &LeaseRequest::Release { holder: "b".into() }, 1_000).is_err());
    }
}
