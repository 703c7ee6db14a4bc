//! Membership certificates: a cluster authority (an ed25519 key) vouches that a peer belongs to
//! the cluster, with a role, for a period. A node started with `--authority ID --cert FILE`
//! exchanges nothing with peers that cannot show such a certificate, and accepts ops only from
//! origins certified as primaries (the decisions are the sync engine's; this file is the format).
//!
//! On the wire and in files a certificate is postcard bytes; [`Certificate::to_text`] wraps them in
//! base64 with a header line so the file can be pasted and read.
//!
//! Must never depend on: the store, the network, the sync logic or the node.

use base64::Engine as _;
use libp2p::identity::Keypair;
use libp2p::PeerId;
use serde::{Deserialize, Serialize};

use crate::ids::Role;
use crate::op::public_key_of;

const CERT_DOMAIN: &[u8] = b"peersync/membership-certificate/v1";
const TEXT_HEADER: &str = "peersync membership certificate v1";
/// Largest encoded certificate accepted: a few ids and numbers and one signature.
pub const MAX_CERT_BYTES: usize = 1024;

/// A signed statement of the authority: `peer` is a member with `role` from `not_before_ms` to
/// `not_after_ms` (milliseconds since the Unix epoch).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Certificate {
    pub authority: PeerId,
    pub peer: PeerId,
    pub role: Role,
    pub not_before_ms: u64,
    pub not_after_ms: u64,
    /// Chosen by the authority; names this certificate in revocations and in the member list.
    pub serial: u64,
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

/// Why a certificate does not admit a peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertError {
    #[error("certificate does not decode: {0}")]
    Malformed(String),
    #[error("certificate of {found} presented by {peer}")]
    WrongPeer { peer: String, found: String },
    #[error("certificate signed by authority {found}, not this cluster's authority {expected}")]
    WrongAuthority { expected: String, found: String },
    #[error("certificate signature does not verify")]
    BadSignature,
    #[error("certificate of {peer} is not valid yet (from {not_before_ms} ms, now {now_ms} ms)")]
    NotYetValid { peer: String, not_before_ms: u64, now_ms: u64 },
    #[error("certificate of {peer} expired at {not_after_ms} ms (now {now_ms} ms)")]
    Expired { peer: String, not_after_ms: u64, now_ms: u64 },
}

impl Certificate {
    fn payload(&self) -> Vec<u8> {
        let fields = (&self.authority, &self.peer, self.role, self.not_before_ms, self.not_after_ms, self.serial);
        let mut out = CERT_DOMAIN.to_vec();
        out.extend(postcard::to_stdvec(&fields).expect("certificate fields encode"));
        out
    }

    /// The authority `key` certifies `peer`.
    pub fn issue(key: &Keypair, peer: PeerId, role: Role, not_before_ms: u64, not_after_ms: u64, serial: u64) -> Self {
        let mut cert = Certificate {
            authority: key.public().to_peer_id(),
            peer,
            role,
            not_before_ms,
            not_after_ms,
            serial,
            signature: Vec::new(),
        };
        cert.signature = key.sign(&cert.payload()).expect("ed25519 signing cannot fail");
        cert
    }

    /// Checks that the certificate admits `peer` into the cluster of `authority` at `now_ms`.
    pub fn verify(&self, authority: &PeerId, peer: &PeerId, now_ms: u64) -> Result<(), CertError> {
        if self.authority != *authority {
            return Err(CertError::WrongAuthority {
                expected: authority.to_string(),
                found: self.authority.to_string(),
            });
        }
        if self.peer != *peer {
            return Err(CertError::WrongPeer { peer: peer.to_string(), found: self.peer.to_string() });
        }
        let key = public_key_of(authority).map_err(|_| CertError::BadSignature)?;
        if !key.verify(&self.payload(), &self.signature) {
            return Err(CertError::BadSignature);
        }
        if now_ms < self.not_before_ms {
            let peer = self.peer.to_string();
            return Err(CertError::NotYetValid { peer, not_before_ms: self.not_before_ms, now_ms });
        }
        if now_ms >= self.not_after_ms {
            return Err(CertError::Expired { peer: self.peer.to_string(), not_after_ms: self.not_after_ms, now_ms });
        }
        Ok(())
    }

    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("certificates encode")
    }

    /// Decodes at most [`MAX_CERT_BYTES`]; garbage is an error, never a panic.
    pub fn decode(bytes: &[u8]) -> Result<Certificate, CertError> {
        if bytes.len() > MAX_CERT_BYTES {
            return Err(CertError::Malformed(format!("{} bytes, more than {MAX_CERT_BYTES}", bytes.len())));
        }
        let (cert, rest) = postcard::take_from_bytes(bytes).map_err(|e| CertError::Malformed(e.to_string()))?;
        if !rest.is_empty() {
            return Err(CertError::Malformed(format!("{} bytes after the certificate", rest.len())));
        }
        Ok(cert)
    }

    /// The file form: a header line, a line of who and what for people, and the base64 bytes.
    pub fn to_text(&self) -> String {
        format!(
            "{TEXT_HEADER}\n# peer {} role {} serial {} valid {}..{} ms, authority {}\n{}\n",
            self.peer,
            self.role,
            self.serial,
            self.not_before_ms,
            self.not_after_ms,
            self.authority,
            base64::engine::general_purpose::STANDARD.encode(self.encode())
        )
    }

    pub fn from_text(text: &str) -> Result<Certificate, CertError> {
        Certificate::decode(&from_armored(text, TEXT_HEADER)?)
    }
}

const REVOCATION_DOMAIN: &[u8] = b"peersync/membership-revocation/v1";
const REVOCATION_HEADER: &str = "peersync membership revocation v1";

/// A signed statement of the authority: `peer` is a member no more. Its ops up to `last_seq` (what
/// the authority's node had seen of it when the revocation was made) stay; later ones are refused
/// everywhere, and connections to it are closed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    pub authority: PeerId,
    pub peer: PeerId,
    pub last_seq: crate::ids::Seq,
    pub at_ms: u64,
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

impl Revocation {
    fn payload(&self) -> Vec<u8> {
        let mut out = REVOCATION_DOMAIN.to_vec();
        out.extend(postcard::to_stdvec(&(&self.authority, &self.peer, self.last_seq, self.at_ms)).expect("encodes"));
        out
    }

    pub fn issue(key: &Keypair, peer: PeerId, last_seq: crate::ids::Seq, at_ms: u64) -> Self {
        let mut r = Revocation { authority: key.public().to_peer_id(), peer, last_seq, at_ms, signature: Vec::new() };
        r.signature = key.sign(&r.payload()).expect("ed25519 signing cannot fail");
        r
    }

    pub fn verify(&self, authority: &PeerId) -> Result<(), CertError> {
        if self.authority != *authority {
            return Err(CertError::WrongAuthority {
                expected: authority.to_string(),
                found: self.authority.to_string(),
            });
        }
        let key = public_key_of(authority).map_err(|_| CertError::BadSignature)?;
        if key.verify(&self.payload(), &self.signature) {
            Ok(())
        } else {
            Err(CertError::BadSignature)
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("revocations encode")
    }

    pub fn decode(bytes: &[u8]) -> Result<Revocation, CertError> {
        if bytes.len() > MAX_CERT_BYTES {
            return Err(CertError::Malformed(format!("{} bytes, more than {MAX_CERT_BYTES}", bytes.len())));
        }
        let (r, rest) = postcard::take_from_bytes(bytes).map_err(|e| CertError::Malformed(e.to_string()))?;
        if !rest.is_empty() {
            return Err(CertError::Malformed(format!("{} bytes after the revocation", rest.len())));
        }
        Ok(r)
    }

    pub fn to_text(&self) -> String {
        format!(
            "{REVOCATION_HEADER}\n# peer {} revoked after seq {}, authority {}\n{}\n",
            self.peer,
            self.last_seq,
            self.authority,
            base64::engine::general_purpose::STANDARD.encode(self.encode())
        )
    }

    pub fn from_text(text: &str) -> Result<Revocation, CertError> {
        Revocation::decode(&from_armored(text, REVOCATION_HEADER)?)
    }
}

/// The bytes of a text form: `header` on the first line, `#` comment lines, then base64.
fn from_armored(text: &str, header: &str) -> Result<Vec<u8>, CertError> {
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    if lines.next() != Some(header) {
        return Err(CertError::Malformed(format!("the first line is not {header:?}")));
    }
    let body: String = lines.filter(|l| !l.starts_with('#')).collect();
    base64::engine::general_purpose::STANDARD
        .decode(body.as_bytes())
        .map_err(|e| CertError::Malformed(format!("not base64: {e}")))
}

/// Why an authority key file could not be made or read.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("{0} already exists; an authority key is never overwritten (choose another --key)")]
    Exists(std::path::PathBuf),
    #[error("cannot write the authority key {path}: {source}")]
    Write { path: std::path::PathBuf, source: std::io::Error },
    #[error("cannot read the authority key {path}: {source}")]
    Read { path: std::path::PathBuf, source: std::io::Error },
    #[error("{0} is not an authority key (made by `peersync cluster init`)")]
    Decode(std::path::PathBuf),
}

/// Makes a new authority key at `path` (readable by its owner only); refuses to overwrite.
pub fn create_authority_key(path: &std::path::Path) -> Result<Keypair, KeyFileError> {
    use std::io::Write;
    let key = Keypair::generate_ed25519();
    let bytes = key.to_protobuf_encoding().expect("ed25519 keys encode");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::AlreadyExists => KeyFileError::Exists(path.to_owned()),
        _ => KeyFileError::Write { path: path.to_owned(), source },
    })?;
    file.write_all(&bytes)
        .and_then(|_| file.sync_all())
        .map_err(|source| KeyFileError::Write { path: path.to_owned(), source })?;
    Ok(key)
}

pub fn load_authority_key(path: &std::path::Path) -> Result<Keypair, KeyFileError> {
    let bytes = std::fs::read(path).map_err(|source| KeyFileError::Read { path: path.to_owned(), source })?;
    Keypair::from_protobuf_encoding(&bytes).map_err(|_| KeyFileError::Decode(path.to_owned()))
}

/// Parses a period such as `30d`, `12h`, `90m`, `45s` or `500ms`.
pub fn parse_period(text: &str) -> Result<std::time::Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number.parse().map_err(|_| format!("{text:?} is not a period like 30d, 12h, 90m or 45s"))?;
    let ms = match unit {
        "ms" => Some(n),
        "s" => n.checked_mul(1_000),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        "d" => n.checked_mul(86_400_000),
        _ => return Err(format!("{text:?}: unknown unit {unit:?} (use ms, s, m, h or d)")),
    };
    match ms {
        Some(ms) if ms > 0 => Ok(std::time::Duration::from_millis(ms)),
        Some(_) => Err(format!("{text:?}: a period must be longer than zero")),
        None => Err(format!("{text:?} is too long")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_certificates_verify_and_every_field_is_covered() {
        let authority = Keypair::generate_ed25519();
        let auth_id = authority.public().to_peer_id();
        let peer = PeerId::random();
        let cert = Certificate::issue(&authority, peer, Role::Primary, 1_000, 2_000, 7);
        assert_eq!(cert.verify(&auth_id, &peer, 1_500), Ok(()));
        assert_eq!(Certificate::from_text(&cert.to_text()).unwrap(), cert);
        assert!(matches!(cert.verify(&auth_id, &peer, 999), Err(CertError::NotYetValid { .. })));
        assert!(matches!(cert.verify(&auth_id, &peer, 2_000), Err(CertError::Expired { .. })));
        assert!(matches!(cert.verify(&auth_id, &PeerId::random(), 1_500), Err(CertError::WrongPeer { .. })));
        let other = Keypair::generate_ed25519().public().to_peer_id();
        assert!(matches!(cert.verify(&other, &peer, 1_500), Err(CertError::WrongAuthority { .. })));
        let mut forged = cert.clone();
        forged.role = Role::Replica;
        assert_eq!(forged.verify(&auth_id, &peer, 1_500), Err(CertError::BadSignature));
        let mut forged = cert.clone();
        forged.not_after_ms = 9_999;
        assert_eq!(forged.verify(&auth_id, &peer, 1_500), Err(CertError::BadSignature));
        assert!(Certificate::decode(&[0xff; 10]).is_err());
        assert!(Certificate::from_text("garbage").is_err());
    }

    #[test]
    fn revocations_verify_and_round_trip() {
        let authority = Keypair::generate_ed25519();
        let auth_id = authority.public().to_peer_id();
        let r = Revocation::issue(&authority, PeerId::random(), crate::ids::Seq(41), 5);
        assert_eq!(r.verify(&auth_id), Ok(()));
        assert_eq!(Revocation::from_text(&r.to_text()).unwrap(), r);
        let mut forged = r.clone();
        forged.last_seq = crate::ids::Seq(1_000);
        assert_eq!(forged.verify(&auth_id), Err(CertError::BadSignature));
        let other = Keypair::generate_ed25519().public().to_peer_id();
        assert!(r.verify(&other).is_err());
    }

    #[test]
    fn periods_parse_and_bad_ones_are_refused() {
        assert_eq!(parse_period("30d").unwrap(), std::time::Duration::from_secs(30 * 86_400));
        assert_eq!(parse_period("500ms").unwrap(), std::time::Duration::from_millis(500));
        for bad in ["", "d", "30", "30y", "0s", "99999999999999999999d"] {
            assert!(parse_period(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn authority_keys_are_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("authority.key");
        let key = create_authority_key(&path).unwrap();
        assert!(matches!(create_authority_key(&path), Err(KeyFileError::Exists(_))));
        assert_eq!(load_authority_key(&path).unwrap().public(), key.public());
    }
}
