//! This host's X25519 key pair, kept in the data folder, and the Ed25519
//! key it signs events with, derived from it in memory.
//!
//! The secret key is written once, with mode 0600, and is refused if it has
//! become readable by anyone else. It stays in the host: plugins only ever
//! see [`quiet_plugin_api::Identity`], the public half. The peer id is the
//! hex of the public key, so sealing to a peer id needs no lookup.
//!
//! **Signing** (docs/design/signed-events.md, §1): the Ed25519 key is the
//! same scalar, as Signal's XEdDSA has it ([`SigningIdentity`]), so the peer
//! id names the verifying key too ([`verifying_key_of`]), and existing key
//! files and peer ids stay as they are.

use std::{
    collections::HashMap,
    fs,
    io::{self, Write},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use crypto_box::{PublicKey, SalsaBox, SecretKey};
use curve25519_dalek::{EdwardsPoint, MontgomeryPoint};
use ed25519_dalek::{hazmat::ExpandedSecretKey, Signature, VerifyingKey};
use sha2::{Digest, Sha512};

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
    signing: SigningIdentity,
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
            signing: SigningIdentity::derive(&secret),
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

    /// A MAC of `bytes` under a key derived from `identity.key`: the CLI
    /// attaches it to the events it signs and queues for the host, which
    /// then need not check their signatures again. Only a holder of
    /// `identity.key` can make one: never a plugin, which may read but not
    /// write the queue, nor a peer.
    pub fn local_mac(&self, bytes: &[u8]) -> [u8; 32] {
        *self.local_mac_hash(bytes).as_bytes()
    }

    /// Whether `mac` is [`local_mac`](Self::local_mac) of `bytes`, compared
    /// in constant time.
    pub fn is_local_mac(&self, bytes: &[u8], mac: &[u8]) -> bool {
        <[u8; 32]>::try_from(mac).is_ok_and(|mac| self.local_mac_hash(bytes) == mac)
    }

    fn local_mac_hash(&self, bytes: &[u8]) -> blake3::Hash {
        let key = blake3::derive_key("quiet-host 2026 local submission", &self.secret.to_bytes());
        blake3::keyed_hash(&key, bytes)
    }

    /// The secret key. Host-internal: never hand it to a plugin.
    pub fn secret_key(&self) -> &SecretKey {
        &self.secret
    }

    /// The key this host signs its events with. Host-internal, as the
    /// secret key is.
    pub fn signing(&self) -> &SigningIdentity {
        &self.signing
    }

    /// The public parts, as plugins see them.
    pub fn public(&self) -> quiet_plugin_api::Identity {
        quiet_plugin_api::Identity {
            peer_id: self.peer_id().into(),
            public_key: self.public.as_bytes().to_vec().into(),
        }
    }
}

/// What the nonce prefix of [`SigningIdentity`] is derived under.
const NONCE_PREFIX_DOMAIN: &[u8] = b"quiet-host 2026 ed25519 nonce prefix";

/// This host's Ed25519 signing key: the Ed25519 form of its X25519 key.
///
/// Derived as Signal's XEdDSA does: `crypto_box`'s own scalar `a`, negated
/// if `a·B` has its sign bit set, so that the verifying key is the point of
/// sign 0 whose Montgomery form is the X25519 public key, and anyone gets
/// it from the peer id alone ([`verifying_key_of`]). Key agreement uses
/// only the Montgomery `u`, which a point and its negation share, so
/// `crypto_box` is unaffected. The nonce prefix is the first half of
/// SHA-512 of a domain string and `identity.key`: an X25519 secret has no
/// Ed25519 seed to expand.
///
/// Signing uses dalek's hazmat `raw_sign`, which leaks the key if it is
/// ever given another verifying key or prefix for the same scalar: so the
/// three are made together here and used only by [`SigningIdentity::sign`].
/// Never serialised, not `Clone`, and its `Debug` shows the public key only.
pub struct SigningIdentity {
    /// The scalar (maybe negated) and the nonce prefix.
    expanded: ExpandedSecretKey,
    /// `expanded.scalar · B`, of sign bit 0.
    verifying: VerifyingKey,
    /// The X25519 public key: the peer id's bytes, which signed events name
    /// as their author.
    peer_id: [u8; 32],
}

impl SigningIdentity {
    fn derive(secret: &SecretKey) -> Self {
        let a = secret.to_scalar();
        let point = EdwardsPoint::mul_base(&a);
        // The sign bit is the public key's, so branching on it leaks nothing.
        let (scalar, point) = match point.compress().as_bytes()[31] >> 7 {
            0 => (a, point),
            _ => (-a, -point),
        };
        let digest = Sha512::new()
            .chain_update(NONCE_PREFIX_DOMAIN)
            .chain_update(secret.to_bytes())
            .finalize();
        let mut hash_prefix = [0u8; 32];
        hash_prefix.copy_from_slice(&digest[..32]);
        Self {
            expanded: ExpandedSecretKey {
                scalar,
                hash_prefix,
            },
            verifying: VerifyingKey::from(point),
            peer_id: *secret.public_key().as_bytes(),
        }
    }

    /// An Ed25519 signature of `message`, which any Ed25519 verifier
    /// accepts under [`SigningIdentity::verifying_key`].
    pub fn sign(&self, message: &[u8]) -> Signature {
        ed25519_dalek::hazmat::raw_sign::<Sha512>(&self.expanded, message, &self.verifying)
    }

    /// The verifying key: what [`verifying_key_of`] gives for our peer id.
    pub fn verifying_key(&self) -> &VerifyingKey {
        &self.verifying
    }

    /// Our peer id's 32 bytes (the X25519 public key), as an author.
    pub fn peer_id(&self) -> &[u8; 32] {
        &self.peer_id
    }
}

impl std::fmt::Debug for SigningIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningIdentity")
            .field("verifying_key", &hex::encode(self.verifying.as_bytes()))
            .finish_non_exhaustive()
    }
}

/// The Ed25519 verifying key that a peer id (an X25519 public key `u`)
/// names: the point of sign 0 whose Montgomery form is `u`, as
/// [`SigningIdentity`] makes it. Uncached: an inversion and a square root;
/// receivers look authors up through [`VerifyingKeys`].
///
/// `None` for bytes that name no usable key: a `u` of the twist (X25519
/// takes it, Ed25519 has no point for it), a point of small order (which
/// would accept signatures of anything), or a non-canonical encoding
/// (`u ≥ p`, or the top bit set), which would give one key several ids.
pub fn verifying_key_of(peer_id: &[u8; 32]) -> Option<VerifyingKey> {
    let point = MontgomeryPoint(*peer_id).to_edwards(0)?;
    if point.is_small_order() || point.to_montgomery().as_bytes() != peer_id {
        return None;
    }
    Some(VerifyingKey::from(point))
}

/// The most authors whose key [`VerifyingKeys`] keeps. Authors come from
/// the network, so the set is bounded; past it, it starts over. A network's
/// active authors fit many times over, at about 200 bytes each.
const VERIFYING_KEYS: usize = 1024;

/// [`verifying_key_of`] for each author, derived once: a receiver meets
/// the same few authors event after event.
#[derive(Default)]
pub struct VerifyingKeys(Mutex<HashMap<[u8; 32], Option<VerifyingKey>>>);

impl VerifyingKeys {
    /// [`verifying_key_of`] `peer_id`, from the cache when it is there.
    pub fn get(&self, peer_id: &[u8; 32]) -> Option<VerifyingKey> {
        let keys = || self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(k) = keys().get(peer_id) {
            return *k;
        }
        // Derived outside the lock, as `pair_box` makes its boxes.
        let key = verifying_key_of(peer_id);
        let mut keys = keys();
        if keys.len() >= VERIFYING_KEYS {
            keys.clear();
        }
        keys.insert(*peer_id, key);
        key
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

    /// The checks of the plan's §1, over 64 keys read as `identity.key` is.
    #[test]
    fn the_signing_key_is_the_x25519_keys_and_every_ed25519_verifier_accepts_it() {
        use ed25519_dalek::Verifier as _;
        let message = b"quiet-host 2026 event signature\0 and 32 bytes of h..";
        let (mut keys, mut sigs, mut zebra_batch) =
            (vec![], vec![], ed25519_zebra::batch::Verifier::new());
        for _ in 0..64 {
            let dir = tempfile::tempdir().unwrap();
            let created = HostIdentity::load_or_create(dir.path()).unwrap();
            let path = dir.path().join(KEY_FILE);
            let file = fs::read(&path).unwrap();
            let me = HostIdentity::load(dir.path()).unwrap();
            let signing = me.signing();
            let vk = *signing.verifying_key();
            assert_eq!(
                vk,
                *created.signing().verifying_key(),
                "derived alike at every load"
            );
            // Its Montgomery form is the X25519 public key, and the peer id
            // alone gives it back, by the function and through the cache.
            assert_eq!(vk.to_montgomery().to_bytes(), *me.public_key().as_bytes());
            assert_eq!(signing.peer_id(), me.public_key().as_bytes());
            assert_eq!(vk.as_bytes()[31] >> 7, 0);
            assert_eq!(verifying_key_of(me.public_key().as_bytes()), Some(vk));
            let cache = VerifyingKeys::default();
            assert_eq!(cache.get(me.public_key().as_bytes()), Some(vk));
            assert_eq!(cache.get(me.public_key().as_bytes()), Some(vk));

            let sig = signing.sign(message);
            assert_eq!(sig, signing.sign(message), "deterministic");
            assert!(vk.verify(message, &sig).is_ok());
            assert!(vk.verify_strict(message, &sig).is_ok());
            let zvk = ed25519_zebra::VerificationKey::try_from(vk.to_bytes()).unwrap();
            let zsig = ed25519_zebra::Signature::from_bytes(&sig.to_bytes());
            assert!(zvk.verify(&zsig, message).is_ok());
            zebra_batch.queue((zvk.into(), zsig, &message[..]));
            // A flipped byte of the message or of the signature fails.
            let mut other = *message;
            other[5] ^= 1;
            assert!(vk.verify(&other, &sig).is_err());
            assert!(zvk.verify(&zsig, &other).is_err());
            let mut bad = sig.to_bytes();
            bad[40] ^= 1;
            let bad = Signature::from_bytes(&bad);
            assert!(vk.verify(message, &bad).is_err());
            let zbad = ed25519_zebra::Signature::from_bytes(&bad.to_bytes());
            assert!(zvk.verify(&zbad, message).is_err());

            // The key file is as it was, and still the owner's only.
            assert_eq!(fs::read(&path).unwrap(), file);
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let mode = fs::metadata(&path).unwrap().permissions().mode();
                assert_eq!(mode & 0o777, 0o600);
            }
            keys.push(vk);
            sigs.push(sig);
        }
        assert!(zebra_batch.verify(crate::crypto::entropy::HostRng).is_ok());
        let messages = vec![&message[..]; keys.len()];
        assert!(ed25519_dalek::verify_batch(&messages, &sigs, &keys).is_ok());
        sigs.swap(0, 1);
        assert!(ed25519_dalek::verify_batch(&messages, &sigs, &keys).is_err());
    }

    #[test]
    fn libsodiums_direction_agrees_with_crypto_box_and_ids_that_name_no_key_are_refused() {
        // An Ed25519 seed's X25519 form (libsodium's conversions) is the
        // key crypto_box derives from its scalar bytes: the two libraries
        // map the curve alike, which the derivation above relies on.
        for _ in 0..8 {
            let mut seed = [0u8; 32];
            crypto_box::aead::rand_core::RngCore::fill_bytes(
                &mut crate::crypto::entropy::HostRng,
                &mut seed,
            );
            let sk = ed25519_dalek::SigningKey::from_bytes(&seed);
            let x = SecretKey::from(sk.to_scalar_bytes());
            assert_eq!(
                x.public_key().as_bytes(),
                sk.verifying_key().to_montgomery().as_bytes()
            );
        }
        // u = 0 is of small order; 2 is on the twist; p - 1 = -1 has no
        // Edwards point; a key with its top bit set is non-canonical.
        let mut minus_one = [0xff; 32];
        minus_one[0] = 0xec;
        minus_one[31] = 0x7f;
        let mut two = [0u8; 32];
        two[0] = 2;
        let genuine = *SecretKey::generate(&mut crate::crypto::entropy::HostRng)
            .public_key()
            .as_bytes();
        let mut top_bit = genuine;
        top_bit[31] |= 0x80;
        for bad in [[0u8; 32], two, minus_one, top_bit] {
            assert_eq!(verifying_key_of(&bad), None, "{}", hex::encode(bad));
            assert_eq!(VerifyingKeys::default().get(&bad), None);
        }
        assert!(verifying_key_of(&genuine).is_some());
    }

    #[test]
    fn the_signing_identity_shows_no_secret_and_the_key_cache_stays_bounded() {
        let me =
            HostIdentity::from_secret(SecretKey::generate(&mut crate::crypto::entropy::HostRng));
        let shown = format!("{:?}", me.signing());
        assert!(shown.contains(&hex::encode(me.signing().verifying_key().as_bytes())));
        assert!(!shown.contains(&hex::encode(me.secret_key().to_bytes())));
        assert!(!shown.contains(&hex::encode(me.signing().expanded.hash_prefix)));
        let cache = VerifyingKeys::default();
        for _ in 0..VERIFYING_KEYS + 10 {
            let author = SecretKey::generate(&mut crate::crypto::entropy::HostRng).public_key();
            assert!(cache.get(author.as_bytes()).is_some());
        }
        assert!(cache.0.lock().unwrap().len() <= VERIFYING_KEYS);
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
