//! Key managers: where the CA's and JWT signer's private keys live.
//!
//! [`DiskKeyManager`] keeps each key as a PKCS#8 DER file, mode 0600, in a 0700 directory
//! under the data dir, written atomically (temp file + rename), so keys persist across
//! restarts. [`MemoryKeyManager`] keeps them in memory only (keys die with the process,
//! as SPIRE's `memory` key manager).

use std::collections::HashMap;
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use zeroize::Zeroizing;

pub use writ_spiffe::fingerprint::sha256;
pub use writ_spiffe::key::{KeyError, PrivateKey};

/// What the CA needs of a [`PrivateKey`]: the key as an rcgen signing key.
pub trait ToRcgen {
    /// The key as an rcgen signing key.
    ///
    /// # Errors
    /// [`KeyError::Crypto`] if the stored bytes no longer parse.
    fn to_rcgen(&self) -> Result<rcgen::KeyPair, KeyError>;
}

impl ToRcgen for PrivateKey {
    fn to_rcgen(&self) -> Result<rcgen::KeyPair, KeyError> {
        rcgen::KeyPair::try_from(self.pkcs8_der()).map_err(|e| KeyError::Crypto(e.to_string()))
    }
}

/// Stores private keys by id.
pub trait KeyManager: Send + Sync + fmt::Debug {
    /// Generates and stores a new key under `id`, replacing any key with that id.
    ///
    /// # Errors
    /// [`KeyError`] if generation or storage fails.
    fn generate(&self, id: &str) -> Result<PrivateKey, KeyError>;
    /// Stores a given key under `id`.
    ///
    /// # Errors
    /// [`KeyError`] if storage fails.
    fn put(&self, id: &str, key: &PrivateKey) -> Result<(), KeyError>;
    /// The key stored under `id`.
    ///
    /// # Errors
    /// [`KeyError::NotFound`] if there is none, or a read error.
    fn get(&self, id: &str) -> Result<PrivateKey, KeyError>;
    /// Forgets the key under `id` (no error if absent).
    ///
    /// # Errors
    /// [`KeyError::Io`] if the file cannot be removed.
    fn delete(&self, id: &str) -> Result<(), KeyError>;
}

/// A shared key manager handle.
pub type SharedKeyManager = Arc<dyn KeyManager>;

fn check_id(id: &str) -> Result<(), KeyError> {
    if id.is_empty()
        || id.len() > 128
        || !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(KeyError::InvalidId(id.chars().take(64).collect()));
    }
    Ok(())
}

/// Keys in memory only.
#[derive(Debug, Default)]
pub struct MemoryKeyManager {
    keys: Mutex<HashMap<String, PrivateKey>>,
}

impl MemoryKeyManager {
    /// An empty key manager.
    pub fn new() -> Self {
        Self::default()
    }

    fn keys(&self) -> std::sync::MutexGuard<'_, HashMap<String, PrivateKey>> {
        self.keys.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl KeyManager for MemoryKeyManager {
    fn generate(&self, id: &str) -> Result<PrivateKey, KeyError> {
        let key = PrivateKey::generate()?;
        self.put(id, &key)?;
        Ok(key)
    }

    fn put(&self, id: &str, key: &PrivateKey) -> Result<(), KeyError> {
        check_id(id)?;
        self.keys().insert(id.to_owned(), key.clone());
        Ok(())
    }

    fn get(&self, id: &str) -> Result<PrivateKey, KeyError> {
        self.keys()
            .get(id)
            .cloned()
            .ok_or_else(|| KeyError::NotFound(id.to_owned()))
    }

    fn delete(&self, id: &str) -> Result<(), KeyError> {
        self.keys().remove(id);
        Ok(())
    }
}

/// Keys as 0600 PKCS#8 files in a 0700 directory.
#[derive(Debug)]
pub struct DiskKeyManager {
    dir: PathBuf,
}

impl DiskKeyManager {
    /// Opens (creating if needed, mode 0700) the key directory.
    ///
    /// # Errors
    /// [`KeyError::Io`] if the directory cannot be created or secured.
    pub fn open(dir: &Path) -> Result<Self, KeyError> {
        let io = |source| KeyError::Io {
            path: dir.to_path_buf(),
            source,
        };
        create_private_dir(dir).map_err(io)?;
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    fn path(&self, id: &str) -> Result<PathBuf, KeyError> {
        check_id(id)?;
        Ok(self.dir.join(format!("{id}.p8")))
    }

    /// The ids of the keys stored, sorted.
    ///
    /// # Errors
    /// [`KeyError::Io`] if the directory cannot be read.
    pub fn ids(&self) -> Result<Vec<String>, KeyError> {
        let io = |source| KeyError::Io {
            path: self.dir.clone(),
            source,
        };
        let mut ids = Vec::new();
        for file in std::fs::read_dir(&self.dir).map_err(io)? {
            let name = file.map_err(io)?.file_name();
            if let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".p8"))
                && check_id(id).is_ok()
            {
                ids.push(id.to_owned());
            }
        }
        ids.sort();
        Ok(ids)
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl KeyManager for DiskKeyManager {
    fn generate(&self, id: &str) -> Result<PrivateKey, KeyError> {
        let key = PrivateKey::generate()?;
        self.put(id, &key)?;
        Ok(key)
    }

    fn put(&self, id: &str, key: &PrivateKey) -> Result<(), KeyError> {
        let path = self.path(id)?;
        write_secret_file(&path, key.pkcs8_der())
    }

    fn get(&self, id: &str) -> Result<PrivateKey, KeyError> {
        let path = self.path(id)?;
        let bytes = match std::fs::read(&path) {
            Ok(b) => Zeroizing::new(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(KeyError::NotFound(id.to_owned()));
            }
            Err(source) => return Err(KeyError::Io { path, source }),
        };
        PrivateKey::from_pkcs8_der(&bytes)
    }

    fn delete(&self, id: &str) -> Result<(), KeyError> {
        let path = self.path(id)?;
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(KeyError::Io { path, source }),
        }
    }
}

/// Writes `data` to `path` atomically with mode 0600 (temp file in the same directory,
/// fsync, rename).
///
/// # Errors
/// [`KeyError::Io`] on any file-system failure.
pub fn write_secret_file(path: &Path, data: &[u8]) -> Result<(), KeyError> {
    let io = |source| KeyError::Io {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(&tmp).map_err(io)?;
    file.write_all(data).map_err(io)?;
    file.sync_all().map_err(io)?;
    drop(file);
    set_mode(&tmp, 0o600).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// Creates the data directory `path` (and missing parents) with mode 0700, or, if it
/// exists with group or other permission bits, tightens it to 0700 and logs a warning
/// naming the old mode. See [`create_dir_with_mode`].
///
/// # Errors
/// The OS error (the caller names the path) if it cannot be created or secured (e.g.
/// it belongs to another user), or if `path` exists and is not a directory.
pub fn create_private_dir(path: &Path) -> std::io::Result<()> {
    create_dir_with_mode(path, 0o700)
}

/// Creates the directory `path` (missing parents too) with permission bits `mode`; an
/// existing one with bits outside `mode` is tightened to `mode` at start (logged as a
/// warning), one already tighter is left as it is.
///
/// # Errors
/// As [`create_private_dir`].
pub fn create_dir_with_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        match std::fs::metadata(path) {
            Ok(meta) if !meta.is_dir() => Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "exists and is not a directory",
            )),
            Ok(meta) => {
                let old = meta.permissions().mode() & 0o7777;
                if old & !mode != 0 {
                    set_mode(path, mode)?;
                    tracing::warn!(path = %path.display(), old = format!("{old:o}"),
                        new = format!("{mode:o}"), "directory permissions were looser than Writ's; tightened");
                }
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(mode)
                    .create(path)?;
                // The umask may have taken bits away; the mode is exact.
                set_mode(path, mode)
            }
            Err(e) => Err(e),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = mode;
        std::fs::create_dir_all(path)
    }
}

/// Sets Unix permission bits (no-op elsewhere).
///
/// # Errors
/// The OS error.
pub fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
    }
    #[cfg(not(unix))]
    {
        let _ = (path, mode);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn disk_keys_persist_with_0600() {
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("keys");
        let km = DiskKeyManager::open(&keys).unwrap();
        let k = km.generate("x509-ca-1").unwrap();
        let mode = std::fs::metadata(keys.join("x509-ca-1.p8"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(
            std::fs::metadata(&keys).unwrap().permissions().mode() & 0o777,
            0o700
        );
        let again = DiskKeyManager::open(&keys)
            .unwrap()
            .get("x509-ca-1")
            .unwrap();
        assert_eq!(again.pkcs8_der(), k.pkcs8_der());
        assert!(matches!(km.get("missing"), Err(KeyError::NotFound(_))));
        assert!(matches!(
            km.get("../etc/passwd"),
            Err(KeyError::InvalidId(_))
        ));
    }

    #[test]
    fn memory_manager_round_trips() {
        let km = MemoryKeyManager::new();
        let k = km.generate("a").unwrap();
        assert_eq!(km.get("a").unwrap().pkcs8_der(), k.pkcs8_der());
        km.delete("a").unwrap();
        assert!(km.get("a").is_err());
        assert!(k.ec_p256_xy().is_some());
    }
}
