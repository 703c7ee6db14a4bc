//! CID-addressed snapshots of the replicated state: the format, with no I/O.
//!
//! A snapshot is a signed [`Manifest`] plus chunks. The manifest says what the snapshot holds (the
//! version vector and each origin's chain hash at it, the state root, the collections) and lists the
//! chunks by CID. A chunk is a run of [`StateEntry`]s, postcard-encoded one after the other and
//! zstd-compressed; its CID is the raw-codec blake3 CID of the compressed bytes, so a puller can
//! check every chunk on its own, from any source, before storing it. The manifest's CID is the raw
//! CID of its canonical bytes; the creator signs those bytes (domain-separated) with its identity key.
//!
//! # Layout
//! - `manifest`: `Manifest`, `SignedManifest`, signing and verification.
//! - `chunk`: `StateEntry`, building chunks, and decoding them with every check a chunk needs.
//!
//! Must never depend on: the store's tables or writer (it borrows only the plain `VersionVector`
//! type), the network, the sync logic or the node.

mod chunk;
mod manifest;

pub use chunk::{
    chunk_entries, decode_chunk, decompress_chunk, verify_chunk_cid, Chunk, ChunkBuilder, ChunkError, Kind, StateEntry,
    StateEntryRef,
};
pub use manifest::{ChunkRef, CollectionInfo, Manifest, ManifestError, SignedManifest, SnapshotBrief};

/// Format version of manifests and chunks written by this build.
pub const FORMAT: u32 = 1;

/// Default raw (uncompressed) size of a chunk: 4 MiB.
pub const DEFAULT_CHUNK_RAW_BYTES: u64 = 4 * 1024 * 1024;

/// Largest raw chunk accepted, and so the largest single state entry a snapshot can hold. Bounds the
/// memory one chunk can make a decoder allocate.
pub const MAX_CHUNK_RAW_BYTES: u64 = 64 * 1024 * 1024;

/// Largest compressed chunk accepted (zstd's worst case on incompressible data stays well below).
pub const MAX_CHUNK_BYTES: u64 = MAX_CHUNK_RAW_BYTES + MAX_CHUNK_RAW_BYTES / 64 + 64 * 1024;

/// Largest encoded manifest accepted: room for about 300 000 chunk references.
pub const MAX_MANIFEST_BYTES: usize = 16 * 1024 * 1024;

/// How many snapshots a node keeps by default.
pub const DEFAULT_KEEP_SNAPSHOTS: usize = 2;

/// zstd level of chunks: fast, and most of the gain of higher levels on this kind of data.
pub const ZSTD_LEVEL: i32 = 2;
