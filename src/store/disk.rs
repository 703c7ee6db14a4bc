//! The free-space reserve of the data dir.
//!
//! redb answers a commit that hits a full disk with an I/O error and from then on refuses every
//! transaction until the database is closed and opened again. So writes are refused before that
//! can happen: while the filesystem holding the data dir has less than the reserve free, a write
//! fails with [`StoreError::DiskFull`] and nothing is written; once space is freed, writes go
//! through again without a restart. Reads are never refused.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::StoreError;

/// Free bytes kept on the data dir's filesystem by default: 64 MiB.
pub const DEFAULT_DISK_RESERVE: u64 = 64 << 20;

#[derive(Debug)]
pub(crate) struct DiskGuard {
    dir: PathBuf,
    reserve: AtomicU64,
}

impl DiskGuard {
    pub fn new(dir: PathBuf) -> Self {
        DiskGuard { dir, reserve: AtomicU64::new(DEFAULT_DISK_RESERVE) }
    }

    pub fn set_reserve(&self, bytes: u64) {
        self.reserve.store(bytes, Ordering::Relaxed);
    }

    /// Whether a write of about `bytes` leaves the reserve free. A filesystem whose free space
    /// cannot be read lets the write try (redb's own error then says what happened).
    pub fn check(&self, bytes: u64) -> Result<(), StoreError> {
        let reserve = self.reserve.load(Ordering::Relaxed);
        if reserve == 0 {
            return Ok(());
        }
        let needed = reserve.saturating_add(bytes);
        match available_bytes(&self.dir) {
            Ok(available) if available < needed => {
                Err(StoreError::DiskFull { dir: self.dir.clone(), available, needed })
            }
            Ok(_) => Ok(()),
            Err(e) => {
                tracing::debug!(dir = %self.dir.display(), error = %e, "cannot read the free space of the data dir");
                Ok(())
            }
        }
    }
}

/// Bytes available to this process on the filesystem holding `dir`.
pub fn available_bytes(dir: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())?;
    // SAFETY: `path` is a NUL-terminated string that outlives the call, and `stat` is a plain
    // struct statvfs fills in; it is read only when the call succeeded.
    let stat = unsafe {
        let mut stat: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(path.as_ptr(), &mut stat) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        stat
    };
    Ok((stat.f_bavail as u64).saturating_mul(stat.f_frsize as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reserve_larger_than_the_free_space_refuses_and_zero_turns_the_check_off() {
        let dir = tempfile::tempdir().unwrap();
        let free = available_bytes(dir.path()).unwrap();
        assert!(free > 0);
        let guard = DiskGuard::new(dir.path().to_owned());
        guard.set_reserve(1);
        guard.check(0).unwrap();
        guard.set_reserve(free.saturating_mul(4).max(1 << 50));
        let err = guard.check(0).unwrap_err();
        assert!(matches!(err, StoreError::DiskFull { available, needed, .. } if available < needed), "{err}");
        guard.set_reserve(0);
        guard.check(u64::MAX).unwrap();
    }
}
