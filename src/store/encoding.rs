//! How state values are stored: postcard, with a fast path for the register encoding written once
//! per op, and the canonical-encoding check for values that come from elsewhere.

use super::StoreError;
use crate::crdt::{Hlc, RegisterValue};

/// postcard's encoding of a register value (as `encode` makes it), written straight into a buffer
/// of the right size: the serde path copies the origin into a fresh allocation and grows its buffer
/// several times, once per op on the writer thread. `origin_bytes` are the bytes of `value.origin`.
pub(crate) fn encode_register(value: &RegisterValue, origin_bytes: &[u8]) -> Vec<u8> {
    fn varint(out: &mut Vec<u8>, mut n: u64) {
        while n >= 0x80 {
            out.push(n as u8 | 0x80);
            n >>= 7;
        }
        out.push(n as u8);
    }
    let len = value.value.as_ref().map_or(0, Vec::len);
    let mut out = Vec::with_capacity(10 + 5 + 10 + origin_bytes.len() + 1 + 10 + len);
    varint(&mut out, value.hlc.wall_ms);
    varint(&mut out, value.hlc.logical.into());
    varint(&mut out, origin_bytes.len() as u64);
    out.extend_from_slice(origin_bytes);
    match &value.value {
        None => out.push(0),
        Some(v) => {
            out.push(1);
            varint(&mut out, v.len() as u64);
            out.extend_from_slice(v);
        }
    }
    out
}

/// Decodes a value that came from elsewhere (a peer's snapshot or repair), which must be in
/// canonical encoding: one value, one entry hash. The refusal says why.
pub(crate) fn decode_canonical<T: serde::Serialize + serde::de::DeserializeOwned>(
    bytes: &[u8],
    what: &str,
) -> Result<T, String> {
    let value: T = postcard::from_bytes(bytes).map_err(|e| format!("value is not a valid {what} encoding: {e}"))?;
    // Encoded again, the value must give the same bytes: compared as they are written, with no copy.
    if !postcard::serialize_with_flavor(&value, SameAs { expected: bytes, at: 0 }).unwrap_or(false) {
        return Err(format!("{what} value is not in canonical encoding"));
    }
    Ok(value)
}

/// [`decode_canonical`] for a register value, without building it: checks that `bytes` are the
/// canonical postcard encoding of a [`RegisterValue`] and returns its stamp and whether it is a
/// tombstone. The value is neither copied nor encoded again, so a snapshot's million registers are
/// checked for the cost of reading them. `known_origin` holds the last origin found valid: the
/// entries of a chunk are mostly of a few writers, and each is parsed as a peer id once in a row.
/// Agrees with `decode_canonical::<RegisterValue>` on every input (a test checks).
pub(crate) fn check_register(bytes: &[u8], known_origin: &mut Vec<u8>) -> Result<(Hlc, bool), String> {
    let invalid = |what: &str| format!("value is not a valid register encoding: {what}");
    let mut at = 0;
    let wall_ms = canonical_varint(bytes, &mut at, u64::BITS).ok_or_else(|| invalid("wall clock"))?;
    let logical = canonical_varint(bytes, &mut at, u32::BITS).ok_or_else(|| invalid("logical clock"))?;
    let origin = length_prefixed(bytes, &mut at).ok_or_else(|| invalid("origin"))?;
    if origin != known_origin.as_slice() {
        let peer = libp2p::PeerId::from_bytes(origin).map_err(|e| invalid(&format!("origin: {e}")))?;
        if peer.to_bytes() != origin {
            return Err("register value is not in canonical encoding".into());
        }
        known_origin.clear();
        known_origin.extend_from_slice(origin);
    }
    let tombstone = match bytes.get(at) {
        Some(0) => {
            at += 1;
            true
        }
        Some(1) => {
            at += 1;
            length_prefixed(bytes, &mut at).ok_or_else(|| invalid("value"))?;
            false
        }
        _ => return Err(invalid("value tag")),
    };
    if at != bytes.len() {
        return Err("register value is not in canonical encoding".into());
    }
    // At most 32 bits, as `canonical_varint` checked.
    Ok((Hlc::new(wall_ms, logical as u32), tombstone))
}

/// A varint of at most `bits` bits at `*at`, in its shortest form (postcard writes no other); `None`
/// when it is cut short, too wide, or padded.
pub(super) fn canonical_varint(bytes: &[u8], at: &mut usize, bits: u32) -> Option<u64> {
    let mut n = 0u64;
    let mut shift = 0;
    loop {
        let byte = *bytes.get(*at)?;
        *at += 1;
        let low = u64::from(byte & 0x7f);
        if shift >= bits || (shift + 7 > bits && low >> (bits - shift) != 0) {
            return None;
        }
        n |= low << shift;
        if byte & 0x80 == 0 {
            return (byte != 0 || shift == 0).then_some(n);
        }
        shift += 7;
    }
}

/// A byte string (a canonical varint length, then the bytes) at `*at`.
pub(super) fn length_prefixed<'b>(bytes: &'b [u8], at: &mut usize) -> Option<&'b [u8]> {
    let len = usize::try_from(canonical_varint(bytes, at, u64::BITS)?).ok()?;
    let slice = bytes.get(*at..at.checked_add(len)?)?;
    *at += len;
    Some(slice)
}

/// A postcard output that checks the bytes serialized against `expected` instead of keeping them:
/// it stops at the first difference, and its output is whether all of `expected` was matched.
struct SameAs<'a> {
    expected: &'a [u8],
    at: usize,
}

impl postcard::ser_flavors::Flavor for SameAs<'_> {
    type Output = bool;

    fn try_push(&mut self, byte: u8) -> postcard::Result<()> {
        self.try_extend(&[byte])
    }

    fn try_extend(&mut self, bytes: &[u8]) -> postcard::Result<()> {
        let end = self.at.saturating_add(bytes.len());
        if self.expected.get(self.at..end) != Some(bytes) {
            return Err(postcard::Error::SerializeBufferFull);
        }
        self.at = end;
        Ok(())
    }

    fn finalize(self) -> postcard::Result<bool> {
        Ok(self.at == self.expected.len())
    }
}

pub(crate) fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
    postcard::to_stdvec(value).expect("state values always encode")
}

pub(crate) fn decode<'a, T: serde::Deserialize<'a>>(bytes: &'a [u8], what: &str) -> Result<T, StoreError> {
    postcard::from_bytes(bytes).map_err(|e| StoreError::Corrupt(format!("stored {what} does not decode: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crdt::Hlc;

    #[test]
    fn register_encoding_is_postcards() {
        let origin = libp2p::identity::Keypair::generate_ed25519().public().to_peer_id();
        let bytes = origin.to_bytes();
        let walls = [0, 1, 127, 128, 16_383, 16_384, 1_763_000_000_000, u64::MAX];
        let logicals = [0, 1, 127, 128, 70_000, u32::MAX];
        let values =
            [None, Some(vec![]), Some(vec![7; 1]), Some(vec![8; 127]), Some(vec![9; 128]), Some(vec![1; 20_000])];
        for wall_ms in walls {
            for logical in logicals {
                for value in &values {
                    let v = RegisterValue { hlc: Hlc::new(wall_ms, logical), origin, value: value.clone() };
                    assert_eq!(encode_register(&v, &bytes), encode(&v), "{v:?}");
                }
            }
        }
    }

    /// Every way a register's bytes can be wrong, and right: the fast check and the decoding one
    /// must agree on each, with and without the origin already known.
    #[test]
    fn the_register_check_agrees_with_canonical_decoding() {
        let origins: Vec<_> =
            (0..3).map(|_| libp2p::identity::Keypair::generate_ed25519().public().to_peer_id()).collect();
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let walls = [0, 1, 127, 128, 16_384, 1_763_000_000_000, u64::MAX];
        let logicals = [0, 1, 127, 128, 70_000, u32::MAX];
        let lens = [0, 1, 100, 127, 128, 300];
        let (mut checked, mut accepted) = (0, 0);
        for round in 0..3000 {
            let r = next();
            let value = match r % 7 {
                0 => None,
                i => Some(vec![(r >> 8) as u8; lens[i as usize - 1]]),
            };
            let origin = origins[(r >> 16) as usize % origins.len()];
            let v = RegisterValue {
                hlc: Hlc::new(walls[(r >> 20) as usize % walls.len()], logicals[(r >> 24) as usize % logicals.len()]),
                origin,
                value,
            };
            let good = encode(&v);
            let mut candidates = vec![good.clone()];
            let at = next() as usize % good.len();
            let mut flipped = good.clone();
            flipped[at] ^= 1 << (next() % 8);
            candidates.push(flipped);
            let mut set = good.clone();
            set[at] = next() as u8;
            candidates.push(set);
            candidates.push(good[..at].to_vec());
            candidates.push([&good[..], &[next() as u8]].concat());
            // A continuation bit added in front of a byte, and a zero byte after it: the same
            // number in a longer varint, wherever that lands.
            let mut padded = good.clone();
            padded[at] |= 0x80;
            padded.insert(at + 1, 0);
            candidates.push(padded);
            if round % 50 == 0 {
                candidates.push(vec![0xff; 11]);
                candidates.push(vec![]);
            }
            for bytes in candidates {
                let slow = decode_canonical::<RegisterValue>(&bytes, "register")
                    .map(|d| (d.hlc, d.value.is_none()))
                    .map_err(|_| ());
                for known in [Vec::new(), origin.to_bytes()] {
                    let fast = check_register(&bytes, &mut known.clone()).map_err(|_| ());
                    assert_eq!(fast, slow, "{bytes:?}, origin known: {}", !known.is_empty());
                }
                checked += 1;
                accepted += usize::from(slow.is_ok());
            }
        }
        // Both outcomes were exercised in numbers.
        assert!(accepted > 3000 && checked - accepted > 6000, "{accepted} of {checked} accepted");
    }

    #[test]
    fn only_the_canonical_encoding_decodes_canonically() {
        let origin = libp2p::identity::Keypair::generate_ed25519().public().to_peer_id();
        let v = RegisterValue { hlc: Hlc::new(1_763_000_000_000, 3), origin, value: Some(vec![5; 300]) };
        let bytes = encode(&v);
        assert_eq!(decode_canonical::<RegisterValue>(&bytes, "register"), Ok(v.clone()));
        // A byte more, a byte less, a byte changed, and an overlong varint (logical 3 as 0x83 0x00)
        // that postcard decodes to the same value.
        let mut longer = bytes.clone();
        longer.push(0);
        let mut changed = bytes.clone();
        *changed.last_mut().unwrap() ^= 1;
        let wall_len = bytes.iter().position(|b| b & 0x80 == 0).unwrap() + 1;
        let overlong = [&bytes[..wall_len], &[0x83, 0x00], &bytes[wall_len + 1..]].concat();
        assert!(postcard::from_bytes::<RegisterValue>(&overlong).is_ok());
        for bad in [longer, bytes[..bytes.len() - 1].to_vec(), overlong] {
            assert!(decode_canonical::<RegisterValue>(&bad, "register").is_err(), "{bad:?}");
        }
        assert!(decode_canonical::<RegisterValue>(&changed, "register").is_ok_and(|d| d.value != v.value));
    }
}
