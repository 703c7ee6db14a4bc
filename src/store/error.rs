use std::path::PathBuf;

use cid::Cid;

use crate::ids::StateRoot;
use crate::snapshot::{ChunkError, Kind, ManifestError};

/// Errors of the store. `Storage` covers I/O failures (a full disk among them): the transaction was
/// rolled back and nothing it held was acknowledged. `Corrupt` and `Format` mean the files are not
/// what this build can read.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the database at {path}: {source}; check that the data dir is writable and not used by another peersync process")]
    Open { path: PathBuf, source: redb::Error },
    #[error("database at {path} has on-disk format {found:?}, this build reads format 1")]
    Format { path: PathBuf, found: Option<u64> },
    #[error("storage error: {0}")]
    Storage(#[from] redb::Error),
    /// Refused before writing: the data dir's filesystem is short of free space (see `disk.rs`).
    #[error(
        "disk full: {available} bytes free on the filesystem of {dir}, a write needs {needed} (the reserve kept \
         free, --disk-reserve-mb, plus the write); nothing was written: free space and retry"
    )]
    DiskFull { dir: PathBuf, available: u64, needed: u64 },
    #[error("corrupt store: {0}")]
    Corrupt(String),
    /// Reading or writing a snapshot chunk's file failed (see `chunk_files.rs`).
    #[error("snapshot chunk file {path}: {source}")]
    ChunkFile { path: PathBuf, source: std::io::Error },
    /// A snapshot, chunk or list of entries was refused; nothing of it was written. Expected when a
    /// peer sends bad data (or chunks are still missing), not a fault of this store.
    #[error(transparent)]
    Snapshot(Box<SnapshotError>),
}

impl From<SnapshotError> for StoreError {
    fn from(e: SnapshotError) -> Self {
        StoreError::Snapshot(Box::new(e))
    }
}

/// Why a snapshot, a chunk or a list of state entries was refused.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot manifest refused: {0}")]
    Manifest(#[from] ManifestError),
    #[error("snapshot chunk {cid} refused: {source}")]
    Chunk { cid: Cid, source: ChunkError },
    #[error(
        "snapshot {manifest} needs {missing} chunk(s) not held here (first: {first}); put them, then install again"
    )]
    MissingChunks { manifest: Cid, missing: usize, first: Cid },
    #[error("state entry {index} refused: {reason}")]
    Entry { index: u64, reason: String },
    #[error("the snapshot's entries hash to state root {found}, but its manifest claims {claimed}")]
    RootMismatch { claimed: StateRoot, found: StateRoot },
    #[error("the snapshot holds {found} entries of {kind:?} {name:?}, its manifest lists {claimed}")]
    CountMismatch { kind: Kind, name: String, claimed: u64, found: u64 },
    #[error("chunk size {0} is out of range: use 1 ..= {max} raw bytes", max = crate::snapshot::MAX_CHUNK_RAW_BYTES)]
    ChunkSize(u64),
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Storage(e.into())
            }
        }
    )*};
}

from_redb!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError,
    redb::CompactionError
);
