//! Chunks: runs of state entries, postcard-encoded back to back and zstd-compressed.

use cid::Cid;
use serde::{Deserialize, Serialize};

use super::manifest::ChunkRef;
use super::{MAX_CHUNK_BYTES, MAX_CHUNK_RAW_BYTES, ZSTD_LEVEL};
use crate::op::raw_cid;

/// The kind of a collection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Kind {
    Register,
    Counter,
    Lease,
}

/// One entry of the state: a key of a collection and its CRDT value, encoded exactly as stored
/// (postcard `RegisterValue`, `PnCounter` or `LeaseState`, by kind).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateEntry {
    pub kind: Kind,
    pub collection: String,
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
}

/// A finished chunk: its CID, compressed bytes and raw size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub cid: Cid,
    pub bytes: Vec<u8>,
    pub raw_size: u64,
    /// Entries in the chunk.
    pub entries: u64,
}

impl Chunk {
    pub fn chunk_ref(&self) -> ChunkRef {
        ChunkRef { cid: self.cid, size: self.bytes.len() as u64, raw_size: self.raw_size }
    }
}

/// Why a chunk was refused (or could not be made). A refused chunk is never stored or applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    #[error("chunk bytes hash to {found}, not to the CID they were asked for under")]
    CidMismatch { found: Cid },
    #[error("chunk is {found} bytes, the manifest says {expected}")]
    SizeMismatch { expected: u64, found: u64 },
    #[error("chunk of {0} bytes exceeds the limit of {MAX_CHUNK_BYTES}")]
    TooLarge(u64),
    #[error("chunk claims {0} raw bytes, more than the limit of {MAX_CHUNK_RAW_BYTES}")]
    RawTooLarge(u64),
    #[error("chunk decompresses to more than the {0} raw bytes its manifest allows (a decompression bomb?)")]
    Bomb(u64),
    #[error("chunk is not a valid zstd payload: {0}")]
    Decompress(String),
    #[error("chunk decompresses to {found} bytes, the manifest says {expected}")]
    RawSizeMismatch { expected: u64, found: u64 },
    #[error("entry {index} of the chunk does not decode: {reason}")]
    Entry { index: u64, reason: String },
    #[error("a state entry of {0} bytes is larger than the chunk limit of {MAX_CHUNK_RAW_BYTES}")]
    EntryTooLarge(u64),
    #[error("zstd compression failed: {0}")]
    Compress(String),
}

/// Cuts a stream of entries into chunks of at most `limit` raw bytes. An entry is never split: an
/// entry larger than `limit` (up to [`MAX_CHUNK_RAW_BYTES`]) gets a chunk of its own.
#[derive(Debug)]
pub struct ChunkBuilder {
    limit: u64,
    raw: Vec<u8>,
    entries: u64,
}

impl ChunkBuilder {
    /// `limit` is clamped to `1 ..= MAX_CHUNK_RAW_BYTES`.
    pub fn new(limit: u64) -> Self {
        ChunkBuilder { limit: limit.clamp(1, MAX_CHUNK_RAW_BYTES), raw: Vec::new(), entries: 0 }
    }

    /// Adds an entry; returns the chunk it closed, if any.
    pub fn push(&mut self, entry: &StateEntry) -> Result<Option<Chunk>, ChunkError> {
        let encoded = postcard::to_stdvec(entry).expect("state entries always encode");
        let len = encoded.len() as u64;
        if len > MAX_CHUNK_RAW_BYTES {
            return Err(ChunkError::EntryTooLarge(len));
        }
        let closed = if !self.raw.is_empty() && self.raw.len() as u64 + len > self.limit { self.seal()? } else { None };
        self.raw.extend_from_slice(&encoded);
        self.entries += 1;
        Ok(closed)
    }

    /// Closes the last chunk, if it holds anything.
    pub fn finish(mut self) -> Result<Option<Chunk>, ChunkError> {
        self.seal()
    }

    fn seal(&mut self) -> Result<Option<Chunk>, ChunkError> {
        if self.raw.is_empty() {
            return Ok(None);
        }
        let raw = std::mem::take(&mut self.raw);
        let bytes = zstd::bulk::compress(&raw, ZSTD_LEVEL).map_err(|e| ChunkError::Compress(e.to_string()))?;
        let entries = std::mem::take(&mut self.entries);
        Ok(Some(Chunk { cid: raw_cid(&bytes), bytes, raw_size: raw.len() as u64, entries }))
    }
}

/// Checks that `bytes` are the chunk `r` names and decodes its entries. The CID is checked before
/// anything is decompressed, and decompression never produces more than `r.raw_size` bytes.
pub fn decode_chunk(r: &ChunkRef, bytes: &[u8]) -> Result<Vec<StateEntry>, ChunkError> {
    let raw = decompress_chunk(r, bytes)?;
    chunk_entries(&raw).map(|entry| entry.map(|e| e.to_owned())).collect()
}

/// Checks that `bytes` are the chunk `r` names and returns its entries' bytes, to read with
/// [`chunk_entries`]. The CID is checked before anything is decompressed, and decompression never
/// produces more than `r.raw_size` bytes.
pub fn decompress_chunk(r: &ChunkRef, bytes: &[u8]) -> Result<Vec<u8>, ChunkError> {
    verify_chunk_cid(&r.cid, bytes)?;
    if bytes.len() as u64 != r.size {
        return Err(ChunkError::SizeMismatch { expected: r.size, found: bytes.len() as u64 });
    }
    if r.raw_size > MAX_CHUNK_RAW_BYTES {
        return Err(ChunkError::RawTooLarge(r.raw_size));
    }
    // One byte of room past the limit tells "more than allowed" apart from "exactly".
    let capacity = r.raw_size as usize + 1;
    let raw = match zstd::bulk::Decompressor::new().and_then(|mut d| d.decompress(bytes, capacity)) {
        Ok(raw) => raw,
        Err(e) if e.to_string().contains("Destination buffer is too small") => {
            return Err(ChunkError::Bomb(r.raw_size))
        }
        Err(e) => return Err(ChunkError::Decompress(e.to_string())),
    };
    if raw.len() as u64 > r.raw_size {
        return Err(ChunkError::Bomb(r.raw_size));
    }
    if raw.len() as u64 != r.raw_size {
        return Err(ChunkError::RawSizeMismatch { expected: r.raw_size, found: raw.len() as u64 });
    }
    Ok(raw)
}

/// A [`StateEntry`] read in place from a chunk's decompressed bytes: the same encoding, nothing
/// copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct StateEntryRef<'a> {
    pub kind: Kind,
    pub collection: &'a str,
    pub key: &'a [u8],
    pub value: &'a [u8],
}

impl StateEntryRef<'_> {
    pub fn to_owned(&self) -> StateEntry {
        StateEntry {
            kind: self.kind,
            collection: self.collection.to_owned(),
            key: self.key.to_vec(),
            value: self.value.to_vec(),
        }
    }
}

/// The entries of a chunk's decompressed bytes ([`decompress_chunk`]), in order; reading stops at
/// the first that does not decode.
pub fn chunk_entries(raw: &[u8]) -> impl Iterator<Item = Result<StateEntryRef<'_>, ChunkError>> {
    let mut rest = Some(raw);
    let mut index = 0u64;
    std::iter::from_fn(move || {
        let bytes = rest.filter(|r| !r.is_empty())?;
        let read = postcard::take_from_bytes::<StateEntryRef>(bytes);
        index += 1;
        Some(match read {
            Ok((entry, tail)) => {
                rest = Some(tail);
                Ok(entry)
            }
            Err(e) => {
                rest = None;
                Err(ChunkError::Entry { index: index - 1, reason: e.to_string() })
            }
        })
    })
}

/// Checks that `bytes` hash to `cid` (and are not too large to be a chunk).
pub fn verify_chunk_cid(cid: &Cid, bytes: &[u8]) -> Result<(), ChunkError> {
    if bytes.len() as u64 > MAX_CHUNK_BYTES {
        return Err(ChunkError::TooLarge(bytes.len() as u64));
    }
    let found = raw_cid(bytes);
    if &found != cid {
        return Err(ChunkError::CidMismatch { found });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(i: u32, len: usize) -> StateEntry {
        StateEntry {
            kind: Kind::Register,
            collection: "r".into(),
            key: i.to_be_bytes().to_vec(),
            value: vec![(i % 251) as u8; len],
        }
    }

    fn build(entries: &[StateEntry], limit: u64) -> Vec<Chunk> {
        let mut b = ChunkBuilder::new(limit);
        let mut out: Vec<Chunk> = entries.iter().filter_map(|e| b.push(e).unwrap()).collect();
        out.extend(b.finish().unwrap());
        out
    }

    #[test]
    fn entries_are_read_in_place_and_a_cut_one_is_named_by_its_index() {
        let entries: Vec<_> = (0..5).map(|i| entry(i, 3 + i as usize)).collect();
        let raw: Vec<u8> = entries.iter().flat_map(|e| postcard::to_stdvec(e).unwrap()).collect();
        let read: Vec<StateEntryRef> = chunk_entries(&raw).collect::<Result<_, _>>().unwrap();
        assert_eq!(read.iter().map(StateEntryRef::to_owned).collect::<Vec<_>>(), entries);
        let inside = raw.as_ptr_range();
        assert!(read.iter().all(|e| inside.contains(&e.value.as_ptr())), "values are not copied");
        // Cut inside the fourth entry: three read, then its error, then nothing.
        let cut = &raw[..raw.len() - postcard::to_stdvec(&entries[4]).unwrap().len() - 2];
        let results: Vec<_> = chunk_entries(cut).collect();
        assert_eq!(results.len(), 4);
        assert!(matches!(results[3], Err(ChunkError::Entry { index: 3, .. })), "{:?}", results[3]);
        assert_eq!(chunk_entries(&[]).count(), 0);
    }

    #[test]
    fn chunks_round_trip_and_respect_the_limit_without_splitting_entries() {
        let entries: Vec<_> = (0..200).map(|i| entry(i, 100)).collect();
        let chunks = build(&entries, 1000);
        assert!(chunks.len() > 10);
        assert!(chunks.iter().all(|c| c.raw_size <= 1000));
        let decoded: Vec<_> = chunks.iter().flat_map(|c| decode_chunk(&c.chunk_ref(), &c.bytes).unwrap()).collect();
        assert_eq!(decoded, entries);
        // An entry above the limit travels alone.
        let big = build(&[entry(1, 10), entry(2, 5000), entry(3, 10)], 1000);
        assert_eq!(big.iter().map(|c| c.entries).collect::<Vec<_>>(), vec![1, 1, 1]);
    }

    #[test]
    fn bad_chunks_are_refused_without_panicking() {
        let chunk = build(&[entry(1, 300), entry(2, 300)], 1 << 20).remove(0);
        let r = chunk.chunk_ref();
        let mut flipped = chunk.bytes.clone();
        flipped[chunk.bytes.len() / 2] ^= 1;
        assert!(matches!(decode_chunk(&r, &flipped), Err(ChunkError::CidMismatch { .. })));
        // Garbage and truncations that are named correctly (by a lying manifest) still fail cleanly.
        for bytes in [vec![], vec![0u8; 17], chunk.bytes[..chunk.bytes.len() - 3].to_vec()] {
            let r = ChunkRef { cid: raw_cid(&bytes), size: bytes.len() as u64, raw_size: r.raw_size };
            assert!(decode_chunk(&r, &bytes).is_err());
        }
        let small = ChunkRef { raw_size: r.raw_size - 1, ..r.clone() };
        assert!(matches!(decode_chunk(&small, &chunk.bytes), Err(ChunkError::Bomb(_))));
        let large = ChunkRef { raw_size: r.raw_size + 1, ..r.clone() };
        assert!(matches!(decode_chunk(&large, &chunk.bytes), Err(ChunkError::RawSizeMismatch { .. })));
        // Valid zstd of bytes that are not entries.
        let junk = zstd::bulk::compress(&[0xff; 64], 1).unwrap();
        let r = ChunkRef { cid: raw_cid(&junk), size: junk.len() as u64, raw_size: 64 };
        assert!(matches!(decode_chunk(&r, &junk), Err(ChunkError::Entry { .. })));
    }
}
