//! Snapshot chunks as files: one file per chunk in a directory next to the state database, named
//! by the chunk's CID. A chunk is immutable and content-addressed, so it needs no B-tree: a write is
//! one direct `write` of its bytes to the device (see [`write_new`]), a read one `read`. In redb,
//! keeping a 4 MiB chunk cost page allocation, copies and checksums on top of that, and a snapshot
//! pull kept every byte twice (chunk, then staged entries); W5 of `scripts/bench.sh` spent about a
//! fifth of the puller's CPU keeping chunks.
//!
//! A chunk is written to a temporary file and renamed into place, so a file under a chunk's name
//! is never half-written by a running node. A write that is not durable is fsynced later, by
//! [`ChunkFiles::sync`] (a durable write syncs every write before it too); a crash before that may
//! leave a file cut short or empty. Readers that rely on the bytes check them: an install hashes
//! every chunk it reads (and removes one that does not hash to its name), a puller counts a chunk
//! whose size is not the manifest's as missing, and a chunk is hashed before it is first served
//! (see [`ChunkFiles::get_served`]), so a damaged disk makes a node lack a chunk rather than serve
//! bytes that make its pullers take it for a liar.

use std::collections::{BTreeSet, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use cid::Cid;

use super::StoreError;
use crate::snapshot::verify_chunk_cid;

/// Suffix of a chunk being written; any left at open are a crash's leftovers.
const PARTIAL: &str = ".partial";

#[derive(Debug)]
pub(crate) struct ChunkFiles {
    dir: PathBuf,
    /// Chunks written since the last sync, by file name.
    unsynced: Mutex<BTreeSet<String>>,
    /// Numbers the temporary files, so two threads writing one chunk do not share one.
    next_partial: AtomicU64,
    /// Chunks whose files this process wrote or hashed: served without hashing them again.
    checked: Mutex<HashSet<Cid>>,
}

impl ChunkFiles {
    /// Opens (or creates) the directory and removes what a crash left half-written.
    pub fn open(dir: &Path) -> Result<ChunkFiles, StoreError> {
        let io = |source| StoreError::ChunkFile { path: dir.to_owned(), source };
        std::fs::create_dir_all(dir).map_err(io)?;
        for entry in std::fs::read_dir(dir).map_err(io)? {
            let path = entry.map_err(io)?.path();
            if path.to_str().is_some_and(|p| p.ends_with(PARTIAL)) {
                std::fs::remove_file(&path).map_err(|source| StoreError::ChunkFile { path, source })?;
            }
        }
        Ok(ChunkFiles {
            dir: dir.to_owned(),
            unsynced: Mutex::default(),
            next_partial: AtomicU64::new(0),
            checked: Mutex::default(),
        })
    }

    fn path(&self, cid: &Cid) -> PathBuf {
        self.dir.join(cid.to_string())
    }

    /// The bytes held under `cid`, as they are on disk (not hashed: see [`ChunkFiles::get_checked`]).
    pub fn get(&self, cid: &Cid) -> Result<Option<Vec<u8>>, StoreError> {
        self.at(cid, |p| std::fs::read(p))
    }

    /// `f` on the file of `cid`: `None` when there is no such file.
    fn at<T>(&self, cid: &Cid, f: impl FnOnce(&Path) -> std::io::Result<T>) -> Result<Option<T>, StoreError> {
        let path = self.path(cid);
        match f(&path) {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StoreError::ChunkFile { path, source }),
        }
    }

    /// The bytes held under `cid` if they hash to it. A file that does not (cut short by a crash
    /// before it was synced, or damaged on disk) is removed and counts as not held, so that the
    /// chunk is fetched again.
    pub fn get_checked(&self, cid: &Cid) -> Result<Option<Vec<u8>>, StoreError> {
        let Some(bytes) = self.get(cid)? else { return Ok(None) };
        match verify_chunk_cid(cid, &bytes) {
            Ok(()) => Ok(Some(bytes)),
            Err(e) => {
                tracing::warn!(%cid, error = %e, "a held snapshot chunk does not hash to its CID; removed, to fetch again");
                self.remove(cid)?;
                Ok(None)
            }
        }
    }

    /// The bytes held under `cid`, to serve to a peer: hashed the first time this process serves
    /// them (unless it wrote them itself), so that a file damaged on disk is removed and reported as
    /// not held instead of being sent. Damage after that first check goes unseen until a restart,
    /// and the receiver's own check refuses it.
    pub fn get_served(&self, cid: &Cid) -> Result<Option<Vec<u8>>, StoreError> {
        if self.checked.lock().expect("chunk files lock").contains(cid) {
            return self.get(cid);
        }
        let bytes = self.get_checked(cid)?;
        if bytes.is_some() {
            self.checked.lock().expect("chunk files lock").insert(*cid);
        }
        Ok(bytes)
    }

    /// The size of the file held under `cid`, if any.
    pub fn size(&self, cid: &Cid) -> Result<Option<u64>, StoreError> {
        self.at(cid, |p| std::fs::metadata(p).map(|m| m.len()))
    }

    /// Keeps `bytes` under `cid` (the caller checked that they hash to it) unless a file of that
    /// name and size is there already (one of another size, cut short by a crash, is replaced).
    /// Returns whether there was none. With `durable`, every chunk written so far is on disk when
    /// it returns.
    pub fn put(&self, cid: &Cid, bytes: &[u8], durable: bool) -> Result<bool, StoreError> {
        let held = self.size(cid)?;
        if held != Some(bytes.len() as u64) {
            self.write(cid, bytes)?;
        }
        let added = held.is_none();
        if durable {
            self.sync()?;
        }
        Ok(added)
    }

    /// Writes `bytes` under `cid`, replacing any file there, without syncing it.
    pub fn write(&self, cid: &Cid, bytes: &[u8]) -> Result<(), StoreError> {
        let name = cid.to_string();
        let n = self.next_partial.fetch_add(1, Ordering::Relaxed);
        let partial = self.dir.join(format!("{name}.{n}{PARTIAL}"));
        let written = write_new(&partial, bytes);
        if let Err(source) = written.and_then(|()| std::fs::rename(&partial, self.dir.join(&name))) {
            let _ = std::fs::remove_file(&partial);
            return Err(StoreError::ChunkFile { path: partial, source });
        }
        self.unsynced.lock().expect("chunk files lock").insert(name);
        // Every caller checked the bytes against the CID (or moves chunks an older build checked).
        self.checked.lock().expect("chunk files lock").insert(*cid);
        Ok(())
    }

    /// Makes every chunk written so far durable: their data, then the directory's entries.
    pub fn sync(&self) -> Result<(), StoreError> {
        let mut unsynced = self.unsynced.lock().expect("chunk files lock");
        if unsynced.is_empty() {
            return Ok(());
        }
        for name in unsynced.iter() {
            let path = self.dir.join(name);
            match std::fs::File::open(&path).and_then(|f| f.sync_data()) {
                // Removed since (collected, or found damaged): nothing to make durable.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(StoreError::ChunkFile { path, source }),
                Ok(()) => {}
            }
        }
        std::fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|source| StoreError::ChunkFile { path: self.dir.clone(), source })?;
        unsynced.clear();
        Ok(())
    }

    /// Removes the chunk held under `cid`. Returns whether there was one.
    pub fn remove(&self, cid: &Cid) -> Result<bool, StoreError> {
        self.checked.lock().expect("chunk files lock").remove(cid);
        Ok(self.at(cid, |p| std::fs::remove_file(p))?.is_some())
    }

    /// The CIDs of every chunk held. Files whose names are not CIDs are left alone.
    pub fn list(&self) -> Result<Vec<Cid>, StoreError> {
        let io = |source| StoreError::ChunkFile { path: self.dir.clone(), source };
        let mut cids = Vec::new();
        for entry in std::fs::read_dir(&self.dir).map_err(io)? {
            let entry = entry.map_err(io)?;
            if let Some(cid) = entry.file_name().to_str().and_then(|n| Cid::try_from(n).ok()) {
                cids.push(cid);
            }
        }
        Ok(cids)
    }
}

/// Alignment of the address, length and offset of a direct write: the largest logical block size
/// in common use.
const DIRECT_ALIGN: usize = 4096;

/// Writes `bytes` into a new file at `path`. The data goes straight to the device (`O_DIRECT`),
/// bypassing the page cache: a snapshot pull writes as many bytes of chunks as of staged state,
/// and copying them into cold page-cache pages (then writing those back) took a fifth of a
/// puller's CPU in W5 of `scripts/bench.sh`. A filesystem that refuses direct writes (tmpfs, some
/// network filesystems) gets an ordinary write.
fn write_new(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    match write_direct(path, bytes) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => write_buffered(path, bytes),
        other => other,
    }
}

fn write_buffered(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::File::create(path).and_then(|mut f| f.write_all(bytes))
}

fn write_direct(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file =
        std::fs::OpenOptions::new().write(true).create(true).truncate(true).custom_flags(libc::O_DIRECT).open(path)?;
    let padded = bytes.len().next_multiple_of(DIRECT_ALIGN);
    DIRECT_BUFFER.with_borrow_mut(|buffer| {
        // Kept per thread, so its pages stay mapped from one chunk to the next.
        if buffer.len() < padded + DIRECT_ALIGN {
            *buffer = vec![0; padded + DIRECT_ALIGN];
        }
        let at = buffer.as_ptr().align_offset(DIRECT_ALIGN);
        let aligned = &mut buffer[at..at + padded];
        aligned[..bytes.len()].copy_from_slice(bytes);
        aligned[bytes.len()..].fill(0);
        // One write: a direct write of an aligned buffer is done whole or fails (a short one
        // would leave the rest unaligned), and the file is cut to the chunk's size after it.
        let n = file.write(aligned)?;
        if n != padded {
            return Err(std::io::Error::other(format!("direct write of {padded} bytes wrote {n}")));
        }
        file.set_len(bytes.len() as u64)
    })
}

thread_local! {
    /// The aligned staging buffer of [`write_direct`].
    static DIRECT_BUFFER: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::op::raw_cid;

    #[test]
    fn chunks_are_kept_read_listed_and_removed_by_cid() {
        let dir = tempfile::tempdir().unwrap();
        let files = ChunkFiles::open(&dir.path().join("chunks")).unwrap();
        let (a, b) = (b"chunk a".to_vec(), b"chunk b".to_vec());
        let (ca, cb) = (raw_cid(&a), raw_cid(&b));
        assert!(files.put(&ca, &a, false).unwrap());
        assert!(!files.put(&ca, &a, false).unwrap(), "held already");
        assert!(files.put(&cb, &b, true).unwrap());
        assert_eq!(files.get(&ca).unwrap(), Some(a.clone()));
        assert_eq!(files.size(&cb).unwrap(), Some(b.len() as u64));
        let mut listed = files.list().unwrap();
        listed.sort();
        let mut want = vec![ca, cb];
        want.sort();
        assert_eq!(listed, want);
        assert!(files.remove(&ca).unwrap());
        assert!(!files.remove(&ca).unwrap());
        assert_eq!(files.get(&ca).unwrap(), None);
        assert_eq!(files.list().unwrap(), vec![cb]);
    }

    #[test]
    fn direct_and_buffered_writes_leave_the_same_file_whatever_the_size() {
        let dir = tempfile::tempdir().unwrap();
        for len in [0, 1, 511, 4095, 4096, 4097, 3 * 4096 + 17, (4 << 20) + 3] {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 7 + len) as u8).collect();
            let (direct, buffered) = (dir.path().join(format!("d{len}")), dir.path().join(format!("b{len}")));
            match write_direct(&direct, &bytes) {
                Ok(()) => assert_eq!(std::fs::read(&direct).unwrap(), bytes, "direct, {len} bytes"),
                // A filesystem without direct I/O: `write_new` falls back, as below.
                Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EINVAL), "{e}"),
            }
            write_new(&direct, &bytes).unwrap();
            assert_eq!(std::fs::read(&direct).unwrap(), bytes, "write_new, {len} bytes");
            write_buffered(&buffered, &bytes).unwrap();
            assert_eq!(std::fs::read(&buffered).unwrap(), bytes, "buffered, {len} bytes");
        }
    }

    #[test]
    fn a_damaged_or_cut_chunk_is_removed_when_read_checked_and_a_partial_one_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let at = dir.path().join("chunks");
        let files = ChunkFiles::open(&at).unwrap();
        let bytes = vec![7u8; 10_000];
        let cid = raw_cid(&bytes);
        files.put(&cid, &bytes, true).unwrap();
        assert_eq!(files.get_checked(&cid).unwrap(), Some(bytes.clone()));
        // What a crash before the sync can leave: the file cut short.
        std::fs::write(at.join(cid.to_string()), &bytes[..100]).unwrap();
        assert_eq!(files.get_checked(&cid).unwrap(), None);
        assert_eq!(files.size(&cid).unwrap(), None, "removed, to fetch again");
        // A write interrupted before its rename.
        std::fs::write(at.join(format!("{cid}.3{PARTIAL}")), b"half").unwrap();
        drop(files);
        let files = ChunkFiles::open(&at).unwrap();
        assert!(files.list().unwrap().is_empty());
        assert_eq!(std::fs::read_dir(&at).unwrap().count(), 0);
    }
}
