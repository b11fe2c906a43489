//! Event crypto: sealing to a peer, opening what was sealed to us, and
//! encrypting events with a network's key. All of it runs in the host;
//! plugins only ever see plaintext maps and opaque ciphertext bytes.
//!
//! - **Sealed** (`seal_to`): libsodium's `crypto_box_seal` format (an
//!   ephemeral X25519 key, then XSalsa20-Poly1305), so only the recipient can
//!   open it and the sender cannot. A sealed box says nothing about who sent
//!   it, so inside it we put the sender's public key and a proof: a
//!   `crypto_box` from the sender's secret key to the recipient over a hash of
//!   the payload. Opening checks the proof, so a peer cannot claim another's
//!   id. A message about a network also carries a membership proof: a MAC of
//!   the payload under a key derived from the network key, so only members
//!   are answered. Requests are sealed; a response is not sealed again but
//!   carries only the membership proof ([`with_member_proof`]), under the
//!   request's transit secret (see `transit`), which names its sender.
//! - **Network events**: XChaCha20-Poly1305 (`crypto_secretbox`'s) under
//!   the network's symmetric key, so every member, the author included, can
//!   decrypt (events made before, with XSalsa20-Poly1305, still do). The
//!   creation time stays in clear in front (reconciliation orders by it).
//!   The event id is that time followed by 24 bytes of the BLAKE3 hash of
//!   the whole event: ids cannot be chosen to collide, and they sort by
//!   time, so indexes keyed by id grow at their end instead of at a random
//!   page (see [`event_id`]). Signed events, format 3, have a module of
//!   their own ([`crate::crypto::signed_event`]).

use crypto_box::{
    aead::{generic_array::GenericArray, Aead, AeadCore, AeadInPlace},
    PublicKey, SalsaBox, SecretKey,
};
use crypto_secretbox::{KeyInit, XChaCha20Poly1305, XSalsa20Poly1305};
use quiet_plugin_api::Value;

use crate::{
    crypto::{entropy::HostRng, identity::HostIdentity},
    encoding::codec,
};

const NONCE: usize = 24;

/// Why something did not decrypt or verify. Deliberately coarse: the
/// details would only help an attacker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    /// Not a valid peer id (64 hex characters).
    #[error("not a peer id")]
    BadPeerId,
    /// The sealed box did not open with our key.
    #[error("sealed box does not open")]
    BadSeal,
    /// The sender's proof does not match.
    #[error("sender proof does not verify")]
    BadProof,
    /// The payload inside is malformed.
    #[error("malformed sealed payload")]
    Malformed,
    /// The event does not decrypt under the network key.
    #[error("event does not decrypt under the network key")]
    BadEvent,
}

/// The public key a peer id names.
pub fn peer_key(peer_id: &str) -> Result<PublicKey, CryptoError> {
    let mut key = [0u8; 32];
    hex::decode_to_slice(peer_id, &mut key).map_err(|_| CryptoError::BadPeerId)?;
    Ok(PublicKey::from(key))
}

/// `crypto_box_seal`: only `recipient` can open it.
pub fn seal(recipient: &PublicKey, message: &[u8]) -> Vec<u8> {
    recipient
        .seal(&mut HostRng, message)
        .expect("sealing cannot fail for in-memory input")
}

/// `crypto_box_seal_open` with our secret key.
pub fn open(ours: &SecretKey, sealed: &[u8]) -> Result<Vec<u8>, CryptoError> {
    ours.unseal(sealed).map_err(|_| CryptoError::BadSeal)
}

/// What [`open_from`] found inside a sealed box.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    /// The verified sender's peer id.
    pub sender: String,
    /// The payload.
    pub payload: Vec<u8>,
    /// The network the sender says the payload is about, and its
    /// membership proof, if it attached them. Check the proof with
    /// [`member_proof`] before decoding the payload.
    pub network: Option<(String, [u8; 32])>,
}

/// The membership proof of `payload` for `network`.
pub fn member_proof(network: &NetworkKey, payload: &[u8]) -> [u8; 32] {
    *proof_hash(network, payload).as_bytes()
}

fn proof_hash(network: &NetworkKey, payload: &[u8]) -> blake3::Hash {
    let key = blake3::derive_key("quiet-host 2026 network membership proof", &network.0);
    blake3::keyed_hash(&key, payload)
}

/// Whether `proof` is the membership proof of `payload` under `network`,
/// compared in constant time: a comparison that stopped at the first wrong
/// byte would let a stranger find a valid proof a byte at a time.
pub fn is_member_proof(network: &NetworkKey, payload: &[u8], proof: &[u8; 32]) -> bool {
    // `blake3::Hash`'s equality is constant-time.
    proof_hash(network, payload) == *proof
}

/// `member_proof ‖ payload`: a payload with our proof of membership, for a
/// frame that already names its sender (a response, see `transit`).
pub fn with_member_proof(network: &NetworkKey, payload: &[u8]) -> Vec<u8> {
    let mut body = Vec::with_capacity(32 + payload.len());
    put_with_member_proof(network, &mut body, |out| out.extend_from_slice(payload));
    body
}

/// Appends what [`with_member_proof`] makes to `out`, where `put_payload`
/// appends the payload: a response is built in its frame's buffer, not
/// copied into it.
pub fn put_with_member_proof(
    network: &NetworkKey,
    out: &mut Vec<u8>,
    put_payload: impl FnOnce(&mut Vec<u8>),
) {
    let at = out.len();
    out.extend_from_slice(&[0; 32]);
    put_payload(out);
    let proof = member_proof(network, &out[at + 32..]);
    out[at..at + 32].copy_from_slice(&proof);
}

/// Splits what [`with_member_proof`] made; `None` if it is too short.
/// Check the proof with [`member_proof`] before decoding the payload.
pub fn split_member_proof(body: &[u8]) -> Option<(&[u8; 32], &[u8])> {
    body.split_first_chunk()
}

/// Seals `payload` to `recipient`, with proof that we sent it and, given a
/// network id and key, that we are a member of that network.
pub fn seal_from(
    me: &HostIdentity,
    recipient: &PublicKey,
    payload: &[u8],
    network: Option<(&str, &NetworkKey)>,
) -> Vec<u8> {
    let nonce = SalsaBox::generate_nonce(&mut HostRng);
    let digest = blake3::hash(payload);
    let tag = me
        .pair_box(recipient)
        .encrypt(&nonce, digest.as_bytes().as_slice())
        .expect("boxing 32 bytes cannot fail");
    let mut proof = nonce.to_vec();
    proof.extend_from_slice(&tag);
    let inner = Value::map([
        ("p", Value::from(payload)),
        ("s", Value::from(me.public_key().as_bytes().as_slice())),
        ("a", Value::from(proof)),
        ("n", Value::from(network.map(|(id, _)| id))),
        (
            "m",
            Value::from(network.map(|(_, k)| member_proof(k, payload))),
        ),
    ]);
    seal(recipient, &codec::encode(&inner))
}

/// Opens what [`seal_from`] made for us and verifies the sender.
pub fn open_from(me: &HostIdentity, sealed: &[u8]) -> Result<Opened, CryptoError> {
    let inner =
        codec::decode(&open(me.secret_key(), sealed)?).map_err(|_| CryptoError::Malformed)?;
    let field = |k| {
        inner
            .get(k)
            .and_then(Value::as_bytes)
            .ok_or(CryptoError::Malformed)
    };
    let (payload, sender, proof) = (field("p")?, field("s")?, field("a")?);
    let sender: [u8; 32] = sender.try_into().map_err(|_| CryptoError::Malformed)?;
    if proof.len() < NONCE {
        return Err(CryptoError::Malformed);
    }
    let sender = PublicKey::from(sender);
    let (nonce, tag) = proof.split_at(NONCE);
    let digest = me
        .pair_box(&sender)
        .decrypt(GenericArray::from_slice(nonce), tag)
        .map_err(|_| CryptoError::BadProof)?;
    // Authenticated by the box already; compared in constant time all the
    // same (`blake3::Hash`'s equality).
    if blake3::hash(payload) != digest[..] {
        return Err(CryptoError::BadProof);
    }
    let network = match (inner.get("n"), inner.get("m")) {
        (None | Some(Value::Null), None | Some(Value::Null)) => None,
        (Some(Value::Text(id)), Some(Value::Bytes(m))) => {
            let proof = m
                .as_slice()
                .try_into()
                .map_err(|_| CryptoError::Malformed)?;
            Some((id.to_string(), proof))
        }
        _ => return Err(CryptoError::Malformed),
    };
    Ok(Opened {
        sender: hex::encode(sender.as_bytes()),
        payload: payload.to_vec(),
        network,
    })
}

/// A network's symmetric key.
#[derive(Clone)]
pub struct NetworkKey(pub [u8; 32]);

impl NetworkKey {
    /// A fresh random key.
    pub fn generate() -> Self {
        NetworkKey(XSalsa20Poly1305::generate_key(&mut HostRng).into())
    }
}

/// The byte after the time that marks an event of the current format.
const EVENT_FORMAT_2: u8 = 2;

/// An event as stored and sent: `created_ms` (8 bytes, big-endian) ‖ `2`
/// (the format) ‖ nonce ‖ XChaCha20-Poly1305 (`crypto_secretbox`'s) of
/// (`created_ms` ‖ plaintext). Secretbox has no associated data, so the
/// time is repeated inside the ciphertext and must match the clear copy: it
/// cannot be changed without the key.
///
/// Events made before format 2 have no format byte and XSalsa20-Poly1305;
/// [`decrypt_event`] still opens them (stored events are content-addressed
/// and never rewritten). ChaCha20 has a SIMD backend and XSalsa20 does not:
/// 0.93 ms per MiB instead of 2.08 here, and a receiver opens every event.
pub fn encrypt_event(key: &NetworkKey, created_ms: i64, plaintext: &[u8]) -> Vec<u8> {
    let cipher = XChaCha20Poly1305::new(&key.0.into());
    let nonce = XChaCha20Poly1305::generate_nonce(&mut HostRng);
    let head = created_ms.to_be_bytes();
    let mut inner = Vec::with_capacity(8 + plaintext.len());
    inner.extend_from_slice(&head);
    inner.extend_from_slice(plaintext);
    let body = cipher
        .encrypt(&nonce, inner.as_slice())
        .expect("encrypting in memory cannot fail");
    let mut event = Vec::with_capacity(9 + NONCE + body.len());
    event.extend_from_slice(&head);
    event.push(EVENT_FORMAT_2);
    event.extend_from_slice(&nonce);
    event.extend_from_slice(&body);
    event
}

/// Decrypts an event; returns its creation time and plaintext.
pub fn decrypt_event(key: &NetworkKey, event: &[u8]) -> Result<(i64, Vec<u8>), CryptoError> {
    if event.len() < 8 + NONCE + 16 + 8 {
        return Err(CryptoError::BadEvent);
    }
    let (head, rest) = event.split_at(8);
    // An older event's nonce starts with the format byte one time in 256:
    // the tag decides, so it then takes a second try.
    let inner = match rest.split_first() {
        Some((&EVENT_FORMAT_2, rest)) => open_in_place::<XChaCha20Poly1305>(key, rest),
        _ => None,
    };
    let mut inner = inner
        .or_else(|| open_in_place::<XSalsa20Poly1305>(key, rest))
        .ok_or(CryptoError::BadEvent)?;
    if inner.len() < 8 || inner[..8] != *head {
        return Err(CryptoError::BadEvent);
    }
    // A receiver opens every event: one buffer each, not three.
    inner.drain(..8);
    Ok((i64::from_be_bytes(head.try_into().expect("8 bytes")), inner))
}

/// Opens secretbox's `nonce ‖ tag ‖ ciphertext` into one new buffer.
pub(crate) fn open_in_place<C: KeyInit + AeadInPlace>(
    key: &NetworkKey,
    sealed: &[u8],
) -> Option<Vec<u8>> {
    if sealed.len() < NONCE + 16 {
        return None;
    }
    let (nonce, rest) = sealed.split_at(NONCE);
    let (tag, ciphertext) = rest.split_at(16);
    let mut plaintext = ciphertext.to_vec();
    C::new_from_slice(&key.0)
        .ok()?
        .decrypt_in_place_detached(
            GenericArray::from_slice(nonce),
            b"",
            &mut plaintext,
            GenericArray::from_slice(tag),
        )
        .ok()?;
    Some(plaintext)
}

/// An event's id: its first 8 bytes (the creation time, big-endian), then
/// the first 24 bytes of the BLAKE3 hash of all its bytes.
///
/// Why not the whole hash: random ids put every insert into the
/// `events` primary key on a random page, so a commit of a thousand events
/// rewrote about a page per event, more as the store grew (SQLite
/// microbenchmark of 1 KiB events, 1,000 per commit: 4.9 KB of WAL per event
/// at 100k events and 6.6 KB at 400k, against 3.1 KB for time-first ids at
/// both; CPU 31 us against 16 us per event at 400k). 192 bits of hash keep
/// ids collision-resistant, and the time in front is covered by the hash.
pub fn event_id(event: &[u8]) -> [u8; 32] {
    let mut id = [0u8; 32];
    let head = event.len().min(8);
    id[..head].copy_from_slice(&event[..head]);
    id[8..].copy_from_slice(&blake3::hash(event).as_bytes()[..24]);
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> HostIdentity {
        let dir = tempfile::tempdir().unwrap();
        HostIdentity::load_or_create(dir.path()).unwrap()
    }

    #[test]
    fn sealed_with_proof_opens_only_for_the_recipient_and_names_the_sender() {
        let (a, b, c) = (identity(), identity(), identity());
        let key = NetworkKey::generate();
        let sealed = seal_from(&a, b.public_key(), b"hello", Some(("net", &key)));
        let opened = open_from(&b, &sealed).unwrap();
        assert_eq!(
            (opened.sender, opened.payload),
            (a.peer_id(), b"hello".to_vec())
        );
        let (id, proof) = opened.network.unwrap();
        assert_eq!((id.as_str(), proof), ("net", member_proof(&key, b"hello")));
        assert_ne!(proof, member_proof(&NetworkKey::generate(), b"hello"));
        assert!(is_member_proof(&key, b"hello", &proof));
        let mut wrong = proof;
        wrong[31] ^= 1;
        assert!(!is_member_proof(&key, b"hello", &wrong));
        assert_eq!(open_from(&c, &sealed), Err(CryptoError::BadSeal));

        // C seals a payload claiming to be A: the proof cannot verify.
        let forged_inner = Value::map([
            ("p", Value::from(b"evil".as_slice())),
            ("s", Value::from(a.public_key().as_bytes().as_slice())),
            ("a", Value::from(vec![0u8; 24 + 48])),
        ]);
        let forged = seal(b.public_key(), &codec::encode(&forged_inner));
        assert_eq!(open_from(&b, &forged), Err(CryptoError::BadProof));
    }

    /// An event as made before format 2: no format byte, XSalsa20.
    fn format_1_event(
        key: &NetworkKey,
        created_ms: i64,
        nonce: [u8; NONCE],
        text: &[u8],
    ) -> Vec<u8> {
        let head = created_ms.to_be_bytes();
        let inner = [&head[..], text].concat();
        let body = XSalsa20Poly1305::new(&key.0.into())
            .encrypt(GenericArray::from_slice(&nonce), inner.as_slice())
            .unwrap();
        [&head[..], &nonce, &body].concat()
    }

    #[test]
    fn events_of_the_earlier_format_still_decrypt() {
        let key = NetworkKey::generate();
        let event = encrypt_event(&key, 7, b"new");
        assert_eq!(event[8], EVENT_FORMAT_2);
        // Including one whose nonce happens to start with the format byte.
        for first in [0u8, EVENT_FORMAT_2, 0xff] {
            let mut nonce = [first; NONCE];
            nonce[1] = 0x5a;
            let old = format_1_event(&key, 1234, nonce, b"old");
            assert_eq!(decrypt_event(&key, &old).unwrap(), (1234, b"old".to_vec()));
            assert_eq!(
                decrypt_event(&NetworkKey::generate(), &old),
                Err(CryptoError::BadEvent)
            );
        }
        // The format byte is covered: changed, the event opens under neither.
        let mut changed = event.clone();
        changed[8] = 1;
        assert_eq!(decrypt_event(&key, &changed), Err(CryptoError::BadEvent));
    }

    #[test]
    fn events_decrypt_for_members_only_and_ids_cover_the_time() {
        let key = NetworkKey::generate();
        let event = encrypt_event(&key, 1234, b"msg");
        assert_eq!(
            decrypt_event(&key, &event).unwrap(),
            (1234, b"msg".to_vec())
        );
        assert_eq!(
            decrypt_event(&NetworkKey::generate(), &event),
            Err(CryptoError::BadEvent)
        );
        let mut retimed = event.clone();
        retimed[7] ^= 1;
        assert_eq!(decrypt_event(&key, &retimed), Err(CryptoError::BadEvent));
        assert_ne!(event_id(&event), event_id(&retimed));
        assert_eq!(
            decrypt_event(&key, &event[..20]),
            Err(CryptoError::BadEvent)
        );
    }
}
