//! Snapshot chunks (answers to `GetChunk`): `decode_chunk` checks the bytes against the `ChunkRef`
//! the manifest lists (CID, size, raw size), decompresses at most `raw_size` bytes and decodes the
//! state entries. The input is a 17-byte header choosing the `ChunkRef`, then the chunk's bytes:
//!
//! - byte 0, bit 0 clear: `size` is the length of the bytes; set: bytes 9..17 (LE) are `size`.
//! - bit 1 clear: the CID is the bytes' own (a lying manifest naming garbage correctly, so the
//!   decompressor and the entry decoder see it); set: the CID of other bytes (a mismatch).
//! - bit 2 clear: `raw_size` is bytes 1..9 (LE) modulo 1 MiB; set: all 64 bits (bombs, limits).
//!
//! What decodes is cut into chunks again by `ChunkBuilder`, which must decode to the same entries.
#![no_main]

use libfuzzer_sys::fuzz_target;
use peersync::op::raw_cid;
use peersync::snapshot::{decode_chunk, verify_chunk_cid, ChunkBuilder, ChunkRef, MAX_CHUNK_RAW_BYTES};

const HEADER: usize = 17;

fuzz_target!(|data: &[u8]| {
    let (head, bytes) = data.split_at(data.len().min(HEADER));
    let mut h = [0u8; HEADER];
    h[..head.len()].copy_from_slice(head);
    let mode = h[0];
    let raw_field = u64::from_le_bytes(h[1..9].try_into().unwrap());
    let size_field = u64::from_le_bytes(h[9..17].try_into().unwrap());
    let raw_size = if mode & 4 == 0 { raw_field % (1 << 20) } else { raw_field };
    let size = if mode & 1 == 0 { bytes.len() as u64 } else { size_field };
    let cid = if mode & 2 == 0 { raw_cid(bytes) } else { raw_cid(&bytes[..bytes.len() / 2]) };
    let _ = verify_chunk_cid(&cid, bytes);
    let r = ChunkRef { cid, size, raw_size };
    if let Ok(entries) = decode_chunk(&r, bytes) {
        assert!(raw_size <= MAX_CHUNK_RAW_BYTES);
        let mut builder = ChunkBuilder::new(MAX_CHUNK_RAW_BYTES);
        let mut chunks = Vec::new();
        for e in &entries {
            chunks.extend(builder.push(e).expect("a decoded entry fits a chunk"));
        }
        chunks.extend(builder.finish().expect("chunks compress"));
        let mut back = Vec::new();
        for c in &chunks {
            back.extend(decode_chunk(&c.chunk_ref(), &c.bytes).expect("a chunk just built decodes"));
        }
        assert_eq!(back, entries, "entries changed through a chunk");
    }
});
