//! How state values are stored: postcard, with a fast path for the register encoding written once
//! per op, and the canonical-encoding check for values that come from elsewhere.

use super::StoreError;
use crate::crdt::RegisterValue;

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
