//! The node's identity key, kept in the data dir so a restarted node keeps its PeerId.

use std::io::Write;
use std::path::{Path, PathBuf};

use libp2p::identity::Keypair;

/// File name of the identity key inside the data dir (protobuf-encoded ed25519 keypair).
pub const IDENTITY_FILE: &str = "identity.key";

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot create data dir {path}: {source}")]
    DataDir { path: PathBuf, source: std::io::Error },
    #[error("cannot read identity key {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("identity key {path} is not a valid ed25519 key; restore it from a backup or move it away to create a new identity")]
    Decode { path: PathBuf },
    #[error("cannot write identity key {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
}

/// Loads the identity key from `data_dir`, creating the dir and a new key when missing.
pub fn load_or_create(data_dir: &Path) -> Result<Keypair, IdentityError> {
    std::fs::create_dir_all(data_dir).map_err(|source| IdentityError::DataDir { path: data_dir.to_owned(), source })?;
    let path = data_dir.join(IDENTITY_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => Keypair::from_protobuf_encoding(&bytes).map_err(|_| IdentityError::Decode { path }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let keypair = Keypair::generate_ed25519();
            write_new(&path, &keypair.to_protobuf_encoding().expect("ed25519 keys encode"))
                .map_err(|source| IdentityError::Write { path, source })?;
            Ok(keypair)
        }
        Err(source) => Err(IdentityError::Read { path, source }),
    }
}

/// Writes the key to a temporary file readable only by the owner, syncs it, then renames it into place,
/// so a crash never leaves a half-written identity.
fn write_new(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("key.tmp");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    #[test]
    fn identity_survives_reload_and_garbage_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let a = super::load_or_create(dir.path()).unwrap();
        let b = super::load_or_create(dir.path()).unwrap();
        assert_eq!(a.public().to_peer_id(), b.public().to_peer_id());
        std::fs::write(dir.path().join(super::IDENTITY_FILE), b"garbage").unwrap();
        assert!(matches!(super::load_or_create(dir.path()), Err(super::IdentityError::Decode { .. })));
    }
}
