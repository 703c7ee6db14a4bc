use std::path::PathBuf;

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
    #[error("corrupt store: {0}")]
    Corrupt(String),
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

from_redb!(redb::DatabaseError, redb::TransactionError, redb::TableError, redb::StorageError, redb::CommitError);
