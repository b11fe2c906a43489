//! This host's X25519 key pair, kept in the data folder.
//!
//! The secret key is written once, with mode 0600, and is refused if it has
//! become readable by anyone else. It stays in the host: plugins only ever
//! see [`quiet_plugin_api::Identity`], the public half. The peer id is the
//! hex of the public key, so sealing to a peer id needs no lookup.

use std::{
    collections::HashMap,
    fs,
    io::{self, Write},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use crypto_box::{PublicKey, SalsaBox, SecretKey};

/// The secret key's file name inside the data folder.
pub const KEY_FILE: &str = "identity.key";

/// A failure to read or create the identity, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// Reading or writing the key file failed.
    #[error("{path}: {source}")]
    Io {
        /// The key file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The key file is not 32 bytes.
    #[error("{path}: not an identity key (expected 32 bytes, found {len})")]
    Malformed {
        /// The key file.
        path: PathBuf,
        /// Its length.
        len: usize,
    },
    /// Others can read the secret key.
    #[error("{path}: secret key is readable by others (mode {mode:o}); run `chmod 600 {path}`")]
    Permissions {
        /// The key file.
        path: PathBuf,
        /// Its mode bits.
        mode: u32,
    },
    /// The key file is gone from a folder that was already in use (it holds
    /// networks): a new identity would be another peer, unknown to them.
    #[error(
        "{path} is missing, and this data folder holds networks: restore the key from a backup; \
         a new one would make this host a stranger to its peers"
    )]
    Missing {
        /// The key file.
        path: PathBuf,
    },
}

/// The most peers whose [`HostIdentity::pair_box`] is kept. Sender keys
/// come from the network, so the set is bounded; past it, it starts over.
const PAIR_BOXES: usize = 256;

/// The host's key pair.
pub struct HostIdentity {
    secret: SecretKey,
    public: PublicKey,
    /// [`HostIdentity::pair_box`] by the peer's public key.
    pair_boxes: Mutex<HashMap<[u8; 32], Arc<SalsaBox>>>,
}

impl HostIdentity {
    /// Loads the identity from `data_dir`, creating one if there is none.
    pub fn load_or_create(data_dir: &Path) -> Result<Self, IdentityError> {
        Self::load_with(data_dir, true)
    }

    /// The identity of `data_dir`, which must already have one.
    pub fn load(data_dir: &Path) -> Result<Self, IdentityError> {
        Self::load_with(data_dir, false)
    }

    fn load_with(data_dir: &Path, create: bool) -> Result<Self, IdentityError> {
        let path = data_dir.join(KEY_FILE);
        let io_err = |source| IdentityError::Io {
            path: path.clone(),
            source,
        };
        match fs::read(&path) {
            Ok(bytes) => {
                check_permissions(&path)?;
                let key: [u8; 32] =
                    bytes
                        .as_slice()
                        .try_into()
                        .map_err(|_| IdentityError::Malformed {
                            path: path.clone(),
                            len: bytes.len(),
                        })?;
                Ok(Self::from_secret(SecretKey::from(key)))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound && !create => {
                Err(IdentityError::Missing { path })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let secret = SecretKey::generate(&mut crate::crypto::entropy::HostRng);
                write_private(&path, &secret.to_bytes()).map_err(io_err)?;
                Ok(Self::from_secret(secret))
            }
            Err(e) => Err(io_err(e)),
        }
    }

    fn from_secret(secret: SecretKey) -> Self {
        let public = secret.public_key();
        Self {
            secret,
            public,
            pair_boxes: Mutex::default(),
        }
    }

    /// The box of this host's secret key and `peer`'s public key, which
    /// proves who sealed a frame. It is the same for every frame between
    /// the two, and making it is an X25519 multiplication, a third of what
    /// sealing a request costs: so it is made once per peer.
    pub fn pair_box(&self, peer: &PublicKey) -> Arc<SalsaBox> {
        let boxes = || self.pair_boxes.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = boxes().get(peer.as_bytes()) {
            return b.clone();
        }
        // Made outside the lock: the reader and the engine both seal and open.
        let b = Arc::new(SalsaBox::new(peer, &self.secret));
        let mut boxes = boxes();
        if boxes.len() >= PAIR_BOXES {
            boxes.clear();
        }
        boxes.insert(*peer.as_bytes(), b.clone());
        b
    }

    /// The peer id: lowercase hex of the public key.
    pub fn peer_id(&self) -> String {
        hex::encode(self.public.as_bytes())
    }

    /// The public key.
    pub fn public_key(&self) -> &PublicKey {
        &self.public
    }

    /// The secret key. Host-internal: never hand it to a plugin.
    pub fn secret_key(&self) -> &SecretKey {
        &self.secret
    }

    /// The public parts, as plugins see them.
    pub fn public(&self) -> quiet_plugin_api::Identity {
        quiet_plugin_api::Identity {
            peer_id: self.peer_id().into(),
            public_key: self.public.as_bytes().to_vec().into(),
        }
    }
}

/// Creates `path` with `bytes`, readable by the owner only (0600), and
/// fails if it exists. Written whole or not at all: the bytes go to a
/// temporary file first, which is then hard-linked into place, so a crash
/// cannot leave an empty or partial key file that would keep the host from
/// starting.
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(format!(".tmp-{}", std::process::id()));
    let tmp = path.with_file_name(name);
    // A temporary file left by a crash of this same pid is stale.
    let _ = fs::remove_file(&tmp);
    let written = create_private(&tmp).and_then(|mut f| {
        f.write_all(bytes)?;
        f.sync_all()
    });
    let linked = written.and_then(|()| fs::hard_link(&tmp, path));
    let _ = fs::remove_file(&tmp);
    linked
}

#[cfg(unix)]
fn create_private(path: &Path) -> io::Result<fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
}

#[cfg(not(unix))]
fn create_private(path: &Path) -> io::Result<fs::File> {
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
}

/// The mode bits of the file at `path` if others than its owner may read or
/// write it, for files that hold secrets.
#[cfg(unix)]
pub fn exposed_mode(path: &Path) -> io::Result<Option<u32>> {
    use std::os::unix::fs::PermissionsExt;
    let mode = fs::metadata(path)?.permissions().mode() & 0o777;
    Ok((mode & 0o077 != 0).then_some(mode))
}

/// Never, where files have no Unix modes.
#[cfg(not(unix))]
pub fn exposed_mode(_: &Path) -> io::Result<Option<u32>> {
    Ok(None)
}

fn check_permissions(path: &Path) -> Result<(), IdentityError> {
    match exposed_mode(path) {
        Ok(None) => Ok(()),
        Ok(Some(mode)) => Err(IdentityError::Permissions {
            path: path.to_owned(),
            mode,
        }),
        Err(source) => Err(IdentityError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_with_0600_and_stable_across_loads() {
        let dir = tempfile::tempdir().unwrap();
        let a = HostIdentity::load_or_create(dir.path()).unwrap();
        let b = HostIdentity::load_or_create(dir.path()).unwrap();
        assert_eq!(a.peer_id(), b.peer_id());
        assert_eq!(a.peer_id().len(), 64);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(dir.path().join(KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
            fs::set_permissions(dir.path().join(KEY_FILE), fs::Permissions::from_mode(0o644))
                .unwrap();
            let err = HostIdentity::load_or_create(dir.path())
                .err()
                .unwrap()
                .to_string();
            assert!(err.contains("chmod 600"), "{err}");
        }
    }

    #[test]
    fn a_kept_pair_box_is_the_pairs_and_the_set_stays_bounded() {
        use crypto_box::aead::{Aead, AeadCore};
        let a =
            HostIdentity::from_secret(SecretKey::generate(&mut crate::crypto::entropy::HostRng));
        let b =
            HostIdentity::from_secret(SecretKey::generate(&mut crate::crypto::entropy::HostRng));
        let nonce = SalsaBox::generate_nonce(&mut crate::crypto::entropy::HostRng);
        for _ in 0..2 {
            // Made, then kept: both open what the other side's box sealed.
            let sealed = a.pair_box(b.public_key()).encrypt(&nonce, &b"hi"[..]);
            let opened = b
                .pair_box(a.public_key())
                .decrypt(&nonce, &sealed.unwrap()[..]);
            assert_eq!(opened.unwrap(), b"hi");
        }
        assert_eq!(a.pair_boxes.lock().unwrap().len(), 1);
        for _ in 0..PAIR_BOXES + 10 {
            let stranger = SecretKey::generate(&mut crate::crypto::entropy::HostRng).public_key();
            a.pair_box(&stranger);
        }
        assert!(a.pair_boxes.lock().unwrap().len() <= PAIR_BOXES);
    }

    #[test]
    fn private_files_are_written_whole_never_over_another_and_leave_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.key");
        write_private(&path, b"first").unwrap();
        let err = write_private(&path, b"second").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read(&path).unwrap(), b"first");
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["k.key"], "a temporary file was left behind");
    }
}
