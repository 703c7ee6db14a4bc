//! Typed identifiers shared by every layer: origins, sequence numbers, write tokens, state roots.
//!
//! Must never depend on: the store, the network or the node.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The node that created an op. It is the node's libp2p `PeerId`, which embeds its ed25519 public key,
/// so an origin is enough to check an origin's signature.
pub type Origin = libp2p::PeerId;

/// Position of an op in its origin's log. Contiguous per origin, starting at 1; 0 means "nothing yet".
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Seq(pub u64);

impl Seq {
    pub const ZERO: Seq = Seq(0);

    pub fn next(self) -> Seq {
        Seq(self.0 + 1)
    }
}

impl fmt::Display for Seq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Names a write: `ORIGIN:SEQ`. A node has applied the write once its version vector covers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Token {
    pub origin: Origin,
    pub seq: Seq,
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.origin, self.seq)
    }
}

/// Why a token string was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenParseError {
    #[error("token {0:?} is not of the form ORIGIN:SEQ")]
    Shape(String),
    #[error("token {0:?} names an origin that is not a valid peer id")]
    Origin(String),
    #[error("token {0:?} has a sequence number that is not a positive integer")]
    Seq(String),
}

impl FromStr for Token {
    type Err = TokenParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (origin, seq) = s.split_once(':').ok_or_else(|| TokenParseError::Shape(s.to_owned()))?;
        let origin = origin.parse().map_err(|_| TokenParseError::Origin(s.to_owned()))?;
        let seq: u64 = seq.parse().map_err(|_| TokenParseError::Seq(s.to_owned()))?;
        if seq == 0 {
            return Err(TokenParseError::Seq(s.to_owned()));
        }
        Ok(Token { origin, seq: Seq(seq) })
    }
}

/// A 32-byte blake3 digest of the whole replicated state (see `store::root`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct StateRoot(pub [u8; 32]);

impl fmt::Display for StateRoot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// Role of a node in its cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Accepts writes and originates ops.
    Primary,
    /// Read-only; keeps the op log and snapshots to serve other replicas.
    Replica,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Primary => "primary",
            Role::Replica => "replica",
        })
    }
}

/// A role name that is neither `primary` nor `replica`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown role {0:?}: expected \"primary\" or \"replica\"")]
pub struct ParseRoleError(pub String);

impl FromStr for Role {
    type Err = ParseRoleError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "primary" => Ok(Role::Primary),
            "replica" => Ok(Role::Replica),
            other => Err(ParseRoleError(other.to_owned())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_round_trips_and_rejects_garbage() {
        let origin = libp2p::identity::Keypair::generate_ed25519().public().to_peer_id();
        let token = Token { origin, seq: Seq(42) };
        assert_eq!(token.to_string().parse::<Token>().unwrap(), token);
        assert!(matches!("nocolon".parse::<Token>(), Err(TokenParseError::Shape(_))));
        assert!(matches!("abc:1".parse::<Token>(), Err(TokenParseError::Origin(_))));
        assert!(matches!(format!("{origin}:x").parse::<Token>(), Err(TokenParseError::Seq(_))));
        assert!(matches!(format!("{origin}:0").parse::<Token>(), Err(TokenParseError::Seq(_))));
    }
}
