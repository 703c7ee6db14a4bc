//! The revocations a node holds, kept in its data dir (`revocations`, one text block each) so that
//! a restarted node still refuses a revoked member. Which revocations count is the sync engine's
//! decision; this file only reads and writes them.

use std::path::Path;

use crate::cert::Revocation;

/// File name inside the data dir.
pub const REVOCATIONS_FILE: &str = "revocations";

const SEPARATOR: &str = "\n---\n";

/// The persisted revocations; a missing file is none, a block that does not parse is skipped with
/// a warning (the engine verifies the rest against the authority).
pub fn load(data_dir: &Path) -> Vec<Revocation> {
    let Ok(text) = std::fs::read_to_string(data_dir.join(REVOCATIONS_FILE)) else { return Vec::new() };
    text.split(SEPARATOR)
        .filter(|b| !b.trim().is_empty())
        .filter_map(|block| match Revocation::from_text(block) {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!(error = %e, "revocations: a block does not parse; skipped");
                None
            }
        })
        .collect()
}

/// Replaces the file (temporary file, fsync, rename).
pub fn save(data_dir: &Path, all: &[Revocation]) -> std::io::Result<()> {
    use std::io::Write;
    let text: Vec<String> = all.iter().map(Revocation::to_text).collect();
    let tmp = data_dir.join(format!("{REVOCATIONS_FILE}.tmp"));
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(text.join(SEPARATOR).as_bytes())?;
    file.sync_all()?;
    std::fs::rename(tmp, data_dir.join(REVOCATIONS_FILE))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load(dir.path()).is_empty());
        let key = libp2p::identity::Keypair::generate_ed25519();
        let all: Vec<Revocation> =
            (0..3).map(|i| Revocation::issue(&key, libp2p::PeerId::random(), crate::ids::Seq(i), 10 + i)).collect();
        save(dir.path(), &all).unwrap();
        assert_eq!(load(dir.path()), all);
    }
}
