//! Signed events, format 3 (docs/design/signed-events.md, §2): who wrote an
//! event, when, of what type, after which others, signed by its author and
//! encrypted under the network's key.
//!
//! ```text
//! event     = created_ms:8 BE ‖ 0x03 ‖ nonce:24 ‖ XChaCha20-Poly1305(network key, inner)
//! inner     = signature:64 ‖ body
//! body      = created_ms:8 BE ‖ author:32 ‖ type_len:1 ‖ type ‖ dep_count:1 ‖ deps:32 each ‖ content
//! h         = BLAKE3 derive_key("quiet-host 2026 signed event v3", network_id:16 ‖ body)
//! signature = Ed25519(author, "quiet-host 2026 event signature\0" ‖ h)
//! event_id  = created_ms:8 BE ‖ h[0..24]
//! ```
//!
//! - The signature covers the network, time, author, type, deps and content
//!   as the bytes that travel, so the codec need not be canonical; it signs
//!   64 bytes, not the body, since `h` is needed for the id anyway.
//! - It sits inside the encryption: a non-member learns only the time.
//! - The id is a hash of what is signed, not of the ciphertext: an event
//!   re-encrypted under a fresh nonce is the same event.
//! - Verification is ZIP215 (ed25519-zebra), whose batch and single checks
//!   accept exactly the same signatures, so hosts that batch differently
//!   agree on which events exist. Signing is [`SigningIdentity::sign`].
//!
//! Opening checks, in order: the format byte; decryption; that the two
//! times agree; the body's rules (type, at most [`MAX_DEPS`] strictly
//! ascending deps, content a map without [`RESERVED_KEYS`]); the author's
//! key. The signature is checked apart ([`Unverified::verify`],
//! [`verify_batch`]), so that many can be checked in one batch. Each
//! refusal is an [`EventError`], named after the counter it goes under.

use std::ops::Range;

use crypto_box::aead::{
    rand_core::{CryptoRng, RngCore},
    AeadCore, AeadInPlace,
};
use crypto_secretbox::{KeyInit, XChaCha20Poly1305};
use ed25519_zebra::{batch, Signature, VerificationKeyBytes};
use quiet_plugin_api::Value;

use crate::{
    crypto::{
        entropy::HostRng,
        event_crypto::{self, NetworkKey},
        identity::{SigningIdentity, VerifyingKeys},
    },
    encoding::{codec, event_type},
};

/// The byte after the time that marks a signed event.
pub const FORMAT_3: u8 = 3;

/// The most events one event may depend on.
pub const MAX_DEPS: usize = 16;

/// Content keys the host vouches for: an author cannot write them, so no
/// plugin ever reads an author, time, type or deps that the author chose
/// apart from the signed ones.
pub const RESERVED_KEYS: [&str; 4] = ["type", "author", "created_ms", "deps"];

/// What `h` is derived under.
const HASH_CONTEXT: &str = "quiet-host 2026 signed event v3";

/// What the signature signs before `h`: 32 bytes, so the message is 64.
const SIGNATURE_DOMAIN: &[u8; 32] = b"quiet-host 2026 event signature\0";

const NONCE: usize = 24;
const TAG: usize = 16;
const SIGNATURE: usize = 64;
/// `created_ms ‖ 0x03 ‖ nonce ‖ tag`: what precedes the encrypted inner.
const HEAD: usize = 8 + 1 + NONCE + TAG;

/// An event's id: its creation time (8 bytes, big-endian), then the first
/// 24 bytes of `h`, the hash of what was signed.
pub type EventId = [u8; 32];

/// Why a received event is dropped. Deliberately coarse, as
/// [`event_crypto::CryptoError`] is; [`EventError::counter`] names the
/// counter it goes under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    /// Format 1 or 2: made before signatures, so its author is only claimed.
    #[error("event is unsigned (format 1 or 2)")]
    Unsigned,
    /// It does not decrypt under the network's key.
    #[error("event does not decrypt under the network key")]
    Undecryptable,
    /// It decrypts, but the times differ or the body breaks its rules.
    #[error("malformed signed event")]
    Malformed,
    /// The author names no usable key, or did not sign this, in this network.
    #[error("signature does not verify")]
    BadSignature,
}

impl EventError {
    /// The counter a dropped event goes under.
    pub fn counter(self) -> &'static str {
        match self {
            EventError::Unsigned => "drop_unsigned_event",
            EventError::Undecryptable => "drop_undecryptable_event",
            EventError::Malformed => "drop_malformed_event",
            EventError::BadSignature => "drop_bad_signature",
        }
    }
}

/// What is wrong with an event's body: refused when one is made
/// ([`seal_event_v3`]), [`EventError::Malformed`] when one arrives.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    /// The network id is not 32 lowercase hex characters.
    #[error("not a network id (32 lowercase hex characters)")]
    NetworkId,
    /// The body ends before its fields do.
    #[error("signed event body is cut short")]
    Truncated,
    /// The type is not 1 to 64 of `A-Z a-z 0-9 _ . : -`.
    #[error("an event type is 1 to 64 of A-Z a-z 0-9 _ . : -")]
    Type,
    /// More than [`MAX_DEPS`] deps.
    #[error("an event has at most {MAX_DEPS} deps")]
    TooManyDeps,
    /// The deps are not strictly ascending (so a dep is repeated, or out
    /// of order: one body per set of deps).
    #[error("deps are not strictly ascending")]
    DepsOrder,
    /// The content is not a codec-encoded map.
    #[error("content is not an encoded map")]
    Content,
    /// The content has a key the host reserves.
    #[error("content may not have the key `{0}`: the host sets it")]
    ReservedKey(&'static str),
}

/// A body, parsed by [`parse_body`], borrowing its bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Body<'a> {
    /// Creation time, milliseconds since the Unix epoch.
    pub created_ms: i64,
    /// The author's peer id (its X25519 public key).
    pub author: [u8; 32],
    /// The type, valid by [`event_type::is_valid`].
    pub event_type: &'a str,
    /// The events this one depends on, strictly ascending.
    pub deps: Vec<EventId>,
    /// The content, a map without [`RESERVED_KEYS`].
    pub content: Value,
    /// The content's bytes, as they travel.
    pub content_bytes: &'a [u8],
}

/// Parses a body and checks its rules. Never panics, whatever the bytes.
pub fn parse_body(body: &[u8]) -> Result<Body<'_>, BodyError> {
    let (created_ms, rest) = body.split_first_chunk::<8>().ok_or(BodyError::Truncated)?;
    let (author, rest) = rest.split_first_chunk::<32>().ok_or(BodyError::Truncated)?;
    let (&type_len, rest) = rest.split_first().ok_or(BodyError::Truncated)?;
    if rest.len() < usize::from(type_len) {
        return Err(BodyError::Truncated);
    }
    let (name, rest) = rest.split_at(usize::from(type_len));
    let event_type = std::str::from_utf8(name)
        .ok()
        .filter(|t| event_type::is_valid(t))
        .ok_or(BodyError::Type)?;
    let (&dep_count, rest) = rest.split_first().ok_or(BodyError::Truncated)?;
    let dep_count = usize::from(dep_count);
    if dep_count > MAX_DEPS {
        return Err(BodyError::TooManyDeps);
    }
    if rest.len() < dep_count * 32 {
        return Err(BodyError::Truncated);
    }
    let (deps, content_bytes) = rest.split_at(dep_count * 32);
    let deps: Vec<EventId> = deps
        .chunks_exact(32)
        .map(|d| d.try_into().expect("32 bytes"))
        .collect();
    if deps.windows(2).any(|w| w[0] >= w[1]) {
        return Err(BodyError::DepsOrder);
    }
    let content = checked_content(content_bytes)?;
    Ok(Body {
        created_ms: i64::from_be_bytes(*created_ms),
        author: *author,
        event_type,
        deps,
        content,
        content_bytes,
    })
}

/// The content decoded, if it is a map without reserved keys.
fn checked_content(bytes: &[u8]) -> Result<Value, BodyError> {
    let content = codec::decode(bytes).map_err(|_| BodyError::Content)?;
    let Value::Map(fields) = &content else {
        return Err(BodyError::Content);
    };
    // Every field, not `get`: a map may repeat a key.
    for f in fields.iter() {
        if let Some(k) = RESERVED_KEYS.iter().find(|k| **k == f.key.as_str()) {
            return Err(BodyError::ReservedKey(k));
        }
    }
    Ok(content)
}

/// Appends a body's bytes to `out`; the caller has checked its parts.
fn put_body(
    out: &mut Vec<u8>,
    created_ms: i64,
    author: &[u8; 32],
    event_type: &str,
    deps: &[EventId],
    content: &[u8],
) {
    out.extend_from_slice(&created_ms.to_be_bytes());
    out.extend_from_slice(author);
    out.push(u8::try_from(event_type.len()).expect("a type is at most 64 bytes"));
    out.extend_from_slice(event_type.as_bytes());
    out.push(u8::try_from(deps.len()).expect("at most 16 deps"));
    for d in deps {
        out.extend_from_slice(d);
    }
    out.extend_from_slice(content);
}

/// A network id's 16 bytes, from its 32 lowercase hex characters.
fn network_id_bytes(network_id: &str) -> Option<[u8; 16]> {
    if network_id.bytes().any(|b| b.is_ascii_uppercase()) {
        return None;
    }
    let mut id = [0u8; 16];
    hex::decode_to_slice(network_id, &mut id).ok()?;
    Some(id)
}

/// `h`: what the id is cut from and the signature signs. It covers the
/// network, so an event copied into another network does not verify there.
fn hash(network_id: &[u8; 16], body: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_derive_key(HASH_CONTEXT);
    h.update(network_id);
    h.update(body);
    *h.finalize().as_bytes()
}

/// The 64 bytes the author signs.
fn signed_message(h: &[u8; 32]) -> [u8; 64] {
    let mut m = [0u8; 64];
    m[..32].copy_from_slice(SIGNATURE_DOMAIN);
    m[32..].copy_from_slice(h);
    m
}

fn id_of(created_ms: i64, h: &[u8; 32]) -> EventId {
    let mut id = [0u8; 32];
    id[..8].copy_from_slice(&created_ms.to_be_bytes());
    id[8..].copy_from_slice(&h[..24]);
    id
}

/// What [`seal_event_v3`] refuses, checked without signing: so that a
/// command queueing many events can refuse them all before it queues any.
/// Returns the length of the event it would make.
pub fn check_parts(
    network_id: &str,
    event_type: &str,
    deps: &[EventId],
    content: &[u8],
) -> Result<usize, BodyError> {
    network_id_bytes(network_id).ok_or(BodyError::NetworkId)?;
    if !event_type::is_valid(event_type) {
        return Err(BodyError::Type);
    }
    let mut unique = deps.to_vec();
    unique.sort_unstable();
    unique.dedup();
    if unique.len() > MAX_DEPS {
        return Err(BodyError::TooManyDeps);
    }
    checked_content(content)?;
    let body_len = 8 + 32 + 1 + event_type.len() + 1 + 32 * unique.len() + content.len();
    Ok(HEAD + SIGNATURE + body_len)
}

/// Makes a signed event of `event_type` in `network_id`, by `signing`,
/// depending on `deps` (sorted and deduplicated here), whose content is
/// `content`, a codec-encoded map without [`RESERVED_KEYS`]. Returns its id
/// and its bytes, encrypted under `key`. Refuses what no host would accept,
/// except the size: the event store bounds that, as for every event.
pub fn seal_event_v3(
    signing: &SigningIdentity,
    network_id: &str,
    key: &NetworkKey,
    created_ms: i64,
    event_type: &str,
    deps: &[EventId],
    content: &[u8],
) -> Result<(EventId, Vec<u8>), BodyError> {
    check_parts(network_id, event_type, deps, content)?;
    let network = network_id_bytes(network_id).ok_or(BodyError::NetworkId)?;
    let mut deps = deps.to_vec();
    deps.sort_unstable();
    deps.dedup();
    let nonce = XChaCha20Poly1305::generate_nonce(&mut HostRng);
    let body_len = 8 + 32 + 1 + event_type.len() + 1 + 32 * deps.len() + content.len();
    let mut event = Vec::with_capacity(HEAD + SIGNATURE + body_len);
    event.extend_from_slice(&created_ms.to_be_bytes());
    event.push(FORMAT_3);
    event.extend_from_slice(&nonce);
    event.extend_from_slice(&[0; TAG + SIGNATURE]);
    put_body(
        &mut event,
        created_ms,
        signing.peer_id(),
        event_type,
        &deps,
        content,
    );
    let h = hash(&network, &event[HEAD + SIGNATURE..]);
    let signature = signing.sign(&signed_message(&h));
    event[HEAD..HEAD + SIGNATURE].copy_from_slice(&signature.to_bytes());
    let tag = XChaCha20Poly1305::new(&key.0.into())
        .encrypt_in_place_detached(&nonce, b"", &mut event[HEAD..])
        .expect("encrypting in memory cannot fail");
    event[HEAD - TAG..HEAD].copy_from_slice(&tag);
    Ok((id_of(created_ms, &h), event))
}

/// Where the author's 32 bytes sit in an event's inner plaintext
/// (`signature ‖ body`, see [`open_inner`]).
pub const AUTHOR_IN_INNER: std::ops::Range<usize> = SIGNATURE + 8..SIGNATURE + 8 + 32;

/// The inner plaintext (`signature ‖ body`) of a format 3 event, as any
/// member holding the network key can read it; `None` if it does not
/// decrypt. With [`seal_inner`], what a member can rewrite: tools, and
/// tests that build the events a malicious member would.
pub fn open_inner(key: &NetworkKey, event: &[u8]) -> Option<Vec<u8>> {
    match event.get(8) {
        Some(&FORMAT_3) => event_crypto::open_in_place::<XChaCha20Poly1305>(key, &event[9..]),
        _ => None,
    }
}

/// `inner` encrypted afresh under `key` as a format 3 event whose clear
/// time is `created_ms`: what a member holding `key` can make of any inner
/// plaintext. Nothing is checked: a host opens what this makes with
/// [`open_event_v3`]'s checks, like any other event.
pub fn seal_inner(key: &NetworkKey, created_ms: i64, inner: &[u8]) -> Vec<u8> {
    let nonce = XChaCha20Poly1305::generate_nonce(&mut HostRng);
    let mut body = inner.to_vec();
    let tag = XChaCha20Poly1305::new(&key.0.into())
        .encrypt_in_place_detached(&nonce, b"", &mut body)
        .expect("encrypting in memory cannot fail");
    let mut event = Vec::with_capacity(HEAD + body.len());
    event.extend_from_slice(&created_ms.to_be_bytes());
    event.push(FORMAT_3);
    event.extend_from_slice(&nonce);
    event.extend_from_slice(&tag);
    event.extend_from_slice(&body);
    event
}

/// A signed event, opened (and, once out of [`Unverified`], verified).
#[derive(Debug, Clone, PartialEq)]
pub struct SignedEvent {
    /// Its id.
    pub id: EventId,
    /// Creation time, milliseconds since the Unix epoch, as signed.
    pub created_ms: i64,
    /// The author's peer id bytes: the key that signed it.
    pub author: [u8; 32],
    /// Its type.
    pub event_type: String,
    /// The events it depends on, strictly ascending.
    pub deps: Vec<EventId>,
    /// Its content, a map without [`RESERVED_KEYS`].
    pub content: Value,
}

impl SignedEvent {
    /// The author as a peer id (lowercase hex).
    pub fn author_peer_id(&self) -> String {
        hex::encode(self.author)
    }
}

/// An event that opened, whose signature is yet to be checked: by
/// [`Unverified::verify`] alone, or by [`verify_batch`] with others. Its
/// fields are out of reach until then.
#[derive(Debug, Clone)]
pub struct Unverified {
    event: SignedEvent,
    /// The author's key, signature and hashed message, for zebra.
    item: batch::Item,
}

impl Unverified {
    /// Its id, known before the signature is checked (an id names the
    /// signed body, so an event already stored need not be checked again).
    pub fn id(&self) -> &EventId {
        &self.event.id
    }

    /// The author it names, before its signature is checked.
    pub fn author(&self) -> &[u8; 32] {
        &self.event.author
    }

    /// The event, its signature unchecked: only for an event this host
    /// verified before storing it (only the host writes `events`; plugin
    /// SQL may not), read back to be routed or replayed.
    pub fn stored(self) -> SignedEvent {
        self.event
    }

    /// Checks the signature alone (ZIP215).
    pub fn verify(self) -> Result<SignedEvent, EventError> {
        match self.item.verify_single() {
            Ok(()) => Ok(self.event),
            Err(_) => Err(EventError::BadSignature),
        }
    }
}

/// Opens a signed event of `network_id`, whose key is `key`, with authors'
/// keys from `authors`; see the [module docs](self) for the checks. The
/// signature is left to [`Unverified::verify`] or [`verify_batch`].
pub fn open_event_v3(
    network_id: &str,
    key: &NetworkKey,
    event: &[u8],
    authors: &VerifyingKeys,
) -> Result<Unverified, EventError> {
    // The caller found `key` by the network id, so a bad id cannot happen.
    let network = network_id_bytes(network_id).ok_or(EventError::Undecryptable)?;
    let inner = match event.get(8) {
        Some(&FORMAT_3) => event_crypto::open_in_place::<XChaCha20Poly1305>(key, &event[9..]),
        // Format 2, the unsigned events before this one.
        Some(&2) => return Err(EventError::Unsigned),
        _ => None,
    };
    let Some(inner) = inner else {
        // Format 1 has no format byte: its nonce may start with a 3.
        return Err(match event_crypto::decrypt_event(key, event) {
            Ok(_) => EventError::Unsigned,
            Err(_) => EventError::Undecryptable,
        });
    };
    let (signature, body) = inner
        .split_first_chunk::<SIGNATURE>()
        .ok_or(EventError::Malformed)?;
    let parsed = parse_body(body).map_err(|_| EventError::Malformed)?;
    if parsed.created_ms.to_be_bytes() != event[..8] {
        return Err(EventError::Malformed);
    }
    let author = authors
        .get(&parsed.author)
        .ok_or(EventError::BadSignature)?;
    let h = hash(&network, body);
    let item = batch::Item::from((
        VerificationKeyBytes::from(author.to_bytes()),
        Signature::from_bytes(signature),
        &signed_message(&h),
    ));
    Ok(Unverified {
        event: SignedEvent {
            id: id_of(parsed.created_ms, &h),
            created_ms: parsed.created_ms,
            author: parsed.author,
            event_type: parsed.event_type.to_owned(),
            deps: parsed.deps,
            content: parsed.content,
        },
        item,
    })
}

/// Checks the signatures of `events` in one ZIP215 batch; if it fails,
/// halves until the bad ones are found, each by a single check, which
/// accepts exactly what a batch would. `k` bad signatures among `n` cost
/// O(k log n) batches. Returns each event, verified or refused, in order.
/// `rng` draws the batch's weights: an attacker must not know them.
pub fn verify_batch(
    events: Vec<Unverified>,
    mut rng: impl RngCore + CryptoRng,
) -> Vec<Result<SignedEvent, EventError>> {
    let items: Vec<batch::Item> = events.iter().map(|e| e.item.clone()).collect();
    let mut ok = vec![false; items.len()];
    if !items.is_empty() {
        settle(&items, 0..items.len(), false, &mut ok, &mut rng);
    }
    events
        .into_iter()
        .zip(ok)
        .map(|(e, ok)| ok.then_some(e.event).ok_or(EventError::BadSignature))
        .collect()
}

/// Sets `ok` for the items of `range` whose signatures verify; returns
/// whether all did. `known_bad`: one of them is known to fail, so the
/// batch of the whole range would be wasted.
fn settle(
    items: &[batch::Item],
    range: Range<usize>,
    known_bad: bool,
    ok: &mut [bool],
    rng: &mut (impl RngCore + CryptoRng),
) -> bool {
    if range.len() == 1 {
        let good = items[range.start].clone().verify_single().is_ok();
        ok[range.start] = good;
        return good;
    }
    if !known_bad {
        let mut verifier = batch::Verifier::new();
        for item in &items[range.clone()] {
            verifier.queue(item.clone());
        }
        if verifier.verify(&mut *rng).is_ok() {
            ok[range].fill(true);
            return true;
        }
    }
    let mid = range.start + range.len() / 2;
    let left = settle(items, range.start..mid, false, ok, rng);
    // The range failed: if its left half did not, the bad ones are right.
    settle(items, mid..range.end, left, ok, rng);
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::identity::HostIdentity;
    use crypto_box::aead::{generic_array::GenericArray, Aead};

    const NET: &str = "0123456789abcdef0123456789abcdef";
    const NET_B: &str = "fedcba9876543210fedcba9876543210";

    fn identity() -> HostIdentity {
        let dir = tempfile::tempdir().unwrap();
        HostIdentity::load_or_create(dir.path()).unwrap()
    }

    fn content(text: &str) -> Vec<u8> {
        codec::encode(&Value::map([("text", Value::from(text))]))
    }

    fn open(net: &str, key: &NetworkKey, event: &[u8]) -> Result<SignedEvent, EventError> {
        open_event_v3(net, key, event, &VerifyingKeys::default()).and_then(Unverified::verify)
    }

    /// A body signed by `signer`, whatever it says: what a member with its
    /// own key can make, bypassing `seal_event_v3`'s checks.
    fn signed_inner(signer: &SigningIdentity, net: &str, body: &[u8]) -> Vec<u8> {
        let h = hash(&network_id_bytes(net).unwrap(), body);
        [&signer.sign(&signed_message(&h)).to_bytes()[..], body].concat()
    }

    fn body(author: &[u8; 32], event_type: &str, deps: &[EventId], content: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        put_body(&mut out, 1234, author, event_type, deps, content);
        out
    }

    #[test]
    fn an_event_opens_as_sealed_naming_its_signer() {
        let (me, key) = (identity(), NetworkKey::generate());
        let deps = [[9u8; 32], [1u8; 32], [9u8; 32]];
        let (id, event) = seal_event_v3(
            me.signing(),
            NET,
            &key,
            1234,
            "message",
            &deps,
            &content("hi"),
        )
        .unwrap();
        assert_eq!(event[..8], 1234i64.to_be_bytes());
        assert_eq!(event[8], FORMAT_3);
        let opened = open(NET, &key, &event).unwrap();
        assert_eq!(opened.id, id);
        assert_eq!(id[..8], 1234i64.to_be_bytes());
        assert_eq!(opened.created_ms, 1234);
        assert_eq!(opened.author_peer_id(), me.peer_id());
        assert_eq!(opened.event_type, "message");
        assert_eq!(
            opened.deps,
            vec![[1u8; 32], [9u8; 32]],
            "sorted, deduplicated"
        );
        assert_eq!(opened.content, Value::map([("text", Value::from("hi"))]));
        // Not readable as an event of the earlier formats.
        assert!(event_crypto::decrypt_event(&key, &event).is_err());
    }

    #[test]
    fn what_no_host_would_accept_is_refused_at_creation() {
        let (me, key) = (identity(), NetworkKey::generate());
        let seal = |net: &str, t: &str, deps: &[EventId], content: &[u8]| {
            seal_event_v3(me.signing(), net, &key, 1, t, deps, content).map(|_| ())
        };
        for k in RESERVED_KEYS {
            let c = codec::encode(&Value::map([
                ("text", Value::from("x")),
                (k, Value::from(1)),
            ]));
            assert_eq!(
                seal(NET, "message", &[], &c),
                Err(BodyError::ReservedKey(k))
            );
        }
        let list = codec::encode(&Value::List(vec![].into()));
        assert_eq!(seal(NET, "message", &[], &list), Err(BodyError::Content));
        assert_eq!(seal(NET, "message", &[], b"\xff"), Err(BodyError::Content));
        for t in ["", "a b", &"t".repeat(65)] {
            assert_eq!(seal(NET, t, &[], &content("x")), Err(BodyError::Type));
        }
        let many: Vec<EventId> = (0..=MAX_DEPS as u8).map(|i| [i; 32]).collect();
        assert_eq!(
            seal(NET, "m", &many, &content("x")),
            Err(BodyError::TooManyDeps)
        );
        assert_eq!(seal(NET, "m", &many[..MAX_DEPS], &content("x")), Ok(()));
        for net in ["", "0123", &NET.to_uppercase()] {
            assert_eq!(
                seal(net, "m", &[], &content("x")),
                Err(BodyError::NetworkId)
            );
        }
    }

    /// A message sealed at 77 ms with one dep, and its network's key.
    fn a_message() -> (NetworkKey, Vec<u8>) {
        let (me, key) = (identity(), NetworkKey::generate());
        let (_, event) = seal_event_v3(
            me.signing(),
            NET,
            &key,
            77,
            "message",
            &[[3; 32]],
            &content("x"),
        )
        .unwrap();
        (key, event)
    }

    #[test]
    fn every_byte_changed_outside_is_refused_by_the_aead_or_the_times() {
        let (key, event) = a_message();
        for at in 0..event.len() {
            let mut changed = event.clone();
            changed[at] ^= 0x10;
            let expected = match at {
                // The clear time is not covered by the AEAD: by the copy inside.
                0..8 => EventError::Malformed,
                _ => EventError::Undecryptable,
            };
            assert_eq!(open(NET, &key, &changed).err(), Some(expected), "byte {at}");
        }
        assert_eq!(
            open(NET, &key, &event[..HEAD + 10]).err(),
            Some(EventError::Undecryptable)
        );
        assert_eq!(open(NET, &key, &[]).err(), Some(EventError::Undecryptable));
        assert_eq!(
            open(NET, &NetworkKey::generate(), &event).err(),
            Some(EventError::Undecryptable)
        );
    }

    #[test]
    fn every_byte_a_key_holder_changes_inside_fails_the_signature_or_the_rules() {
        let (key, event) = a_message();
        let inner = open_inner(&key, &event).unwrap();
        let mut bad_signatures = 0;
        for at in 0..inner.len() {
            let mut changed = inner.clone();
            changed[at] ^= 0x01;
            let result = open(NET, &key, &seal_inner(&key, 77, &changed)).err();
            match at {
                // The signature itself, the author, the type, the deps and
                // the content's value: still well formed, not signed.
                0..SIGNATURE => assert_eq!(result, Some(EventError::BadSignature), "byte {at}"),
                // The inner time no longer matches the clear one.
                _ if at < SIGNATURE + 8 => assert_eq!(result, Some(EventError::Malformed)),
                _ => assert!(
                    matches!(
                        result,
                        Some(EventError::BadSignature | EventError::Malformed)
                    ),
                    "byte {at}: {result:?}"
                ),
            }
            bad_signatures += usize::from(result == Some(EventError::BadSignature));
        }
        assert!(bad_signatures > SIGNATURE + 32, "{bad_signatures}");
    }

    #[test]
    fn every_field_a_key_holder_rewrites_well_formed_fails_the_signature() {
        let (me, other, key) = (identity(), identity(), NetworkKey::generate());
        let (_, event) = seal_event_v3(
            me.signing(),
            NET,
            &key,
            1234,
            "message",
            &[[3; 32]],
            &content("x"),
        )
        .unwrap();
        let inner = open_inner(&key, &event).unwrap();
        let (signature, _) = inner.split_at(SIGNATURE);
        let resigned =
            |body: Vec<u8>, clear_ms: i64| seal_inner(&key, clear_ms, &[signature, &body].concat());
        let author = *me.signing().peer_id();
        assert!(open(
            NET,
            &key,
            &resigned(body(&author, "message", &[[3; 32]], &content("x")), 1234)
        )
        .is_ok());
        // The time, changed in both copies.
        let mut retimed = body(&author, "message", &[[3; 32]], &content("x"));
        retimed[..8].copy_from_slice(&99i64.to_be_bytes());
        let forged = [
            resigned(retimed, 99),
            resigned(
                body(
                    other.signing().peer_id(),
                    "message",
                    &[[3; 32]],
                    &content("x"),
                ),
                1234,
            ),
            resigned(body(&author, "reaction", &[[3; 32]], &content("x")), 1234),
            resigned(body(&author, "message", &[[4; 32]], &content("x")), 1234),
            resigned(body(&author, "message", &[], &content("x")), 1234),
            resigned(body(&author, "message", &[[3; 32]], &content("y")), 1234),
        ];
        for (i, event) in forged.iter().enumerate() {
            assert_eq!(
                open(NET, &key, event).err(),
                Some(EventError::BadSignature),
                "{i}"
            );
        }
    }

    #[test]
    fn an_event_copied_into_another_network_fails_the_signature() {
        let (me, key, key_b) = (identity(), NetworkKey::generate(), NetworkKey::generate());
        let (_, event) =
            seal_event_v3(me.signing(), NET, &key, 5, "message", &[], &content("x")).unwrap();
        let copied = seal_inner(&key_b, 5, &open_inner(&key, &event).unwrap());
        assert_eq!(
            open(NET_B, &key_b, &copied).err(),
            Some(EventError::BadSignature)
        );
        // Under the right network's key and id, the same inner is fine.
        assert!(open(
            NET,
            &key,
            &seal_inner(&key, 5, &open_inner(&key, &event).unwrap())
        )
        .is_ok());
    }

    #[test]
    fn a_claimed_author_that_did_not_sign_fails_and_one_naming_no_key_too() {
        let (alice, mallory, key) = (identity(), identity(), NetworkKey::generate());
        let claims_alice = body(alice.signing().peer_id(), "message", &[], &content("x"));
        let forged = seal_inner(
            &key,
            1234,
            &signed_inner(mallory.signing(), NET, &claims_alice),
        );
        assert_eq!(
            open(NET, &key, &forged).err(),
            Some(EventError::BadSignature)
        );
        let honest = body(mallory.signing().peer_id(), "message", &[], &content("x"));
        let opened = open(
            NET,
            &key,
            &seal_inner(&key, 1234, &signed_inner(mallory.signing(), NET, &honest)),
        );
        assert_eq!(opened.unwrap().author_peer_id(), mallory.peer_id());
        // An author of small order would accept any signature: refused.
        let nobody = body(&[0; 32], "message", &[], &content("x"));
        let event = seal_inner(&key, 1234, &signed_inner(mallory.signing(), NET, &nobody));
        assert_eq!(
            open_event_v3(NET, &key, &event, &VerifyingKeys::default()).err(),
            Some(EventError::BadSignature)
        );
    }

    #[test]
    fn a_signed_body_that_breaks_the_rules_is_malformed() {
        let (me, key) = (identity(), NetworkKey::generate());
        let author = *me.signing().peer_id();
        let reserved = codec::encode(&Value::map([("author", Value::from("someone else"))]));
        let many: Vec<EventId> = (0..=MAX_DEPS as u8).map(|i| [i; 32]).collect();
        for (i, b) in [
            body(&author, "message", &[], &reserved),
            body(&author, "message", &[[2; 32], [1; 32]], &content("x")),
            body(&author, "message", &[[1; 32], [1; 32]], &content("x")),
            body(&author, "message", &many, &content("x")),
            body(&author, "a b", &[], &content("x")),
            body(
                &author,
                "message",
                &[],
                &codec::encode(&Value::from("text")),
            ),
            body(&author, "message", &[], &[content("x"), vec![0]].concat()),
        ]
        .into_iter()
        .enumerate()
        {
            let event = seal_inner(&key, 1234, &signed_inner(me.signing(), NET, &b));
            assert_eq!(
                open(NET, &key, &event).err(),
                Some(EventError::Malformed),
                "{i}"
            );
        }
    }

    #[test]
    fn events_of_formats_1_and_2_are_unsigned() {
        let key = NetworkKey::generate();
        let format_2 = event_crypto::encrypt_event(&key, 5, b"plaintext");
        assert_eq!(open(NET, &key, &format_2).err(), Some(EventError::Unsigned));
        // Format 1 has no format byte: one whose nonce starts with 3 too.
        for first in [0u8, FORMAT_3, 0xff] {
            let mut nonce = [first; NONCE];
            nonce[1] = 0x5a;
            let inner = [&5i64.to_be_bytes()[..], b"old"].concat();
            let sealed = crypto_secretbox::XSalsa20Poly1305::new(&key.0.into())
                .encrypt(GenericArray::from_slice(&nonce), inner.as_slice())
                .unwrap();
            let format_1 = [&5i64.to_be_bytes()[..], &nonce, &sealed].concat();
            assert!(event_crypto::decrypt_event(&key, &format_1).is_ok());
            assert_eq!(
                open(NET, &key, &format_1).err(),
                Some(EventError::Unsigned),
                "{first}"
            );
        }
        assert_eq!(EventError::Unsigned.counter(), "drop_unsigned_event");
        assert_eq!(EventError::Malformed.counter(), "drop_malformed_event");
        assert_eq!(EventError::BadSignature.counter(), "drop_bad_signature");
        assert_eq!(
            EventError::Undecryptable.counter(),
            "drop_undecryptable_event"
        );
    }

    #[test]
    fn an_event_re_encrypted_keeps_its_id() {
        let (me, key) = (identity(), NetworkKey::generate());
        let (id, event) =
            seal_event_v3(me.signing(), NET, &key, 5, "message", &[], &content("x")).unwrap();
        let again = seal_inner(&key, 5, &open_inner(&key, &event).unwrap());
        assert_ne!(again, event);
        assert_eq!(open(NET, &key, &again).unwrap().id, id);
        // The same content sealed twice is signed twice alike, also one id.
        let (id2, event2) =
            seal_event_v3(me.signing(), NET, &key, 5, "message", &[], &content("x")).unwrap();
        assert_ne!(event2, event);
        assert_eq!(id2, id);
        let (id3, _) =
            seal_event_v3(me.signing(), NET_B, &key, 5, "message", &[], &content("x")).unwrap();
        assert_ne!(id3, id, "ids cover the network");
    }

    #[test]
    fn a_batch_with_bad_signatures_is_halved_to_exactly_the_bad_ones() {
        let (authors, key, keys) = (
            [identity(), identity(), identity(), identity()],
            NetworkKey::generate(),
            VerifyingKeys::default(),
        );
        let bad_at = [0usize, 41, 42];
        let events: Vec<Unverified> = (0..100)
            .map(|i| {
                let author = &authors[i % authors.len()];
                let text = format!("event {i}");
                let (_, event) = seal_event_v3(
                    author.signing(),
                    NET,
                    &key,
                    i as i64,
                    "message",
                    &[],
                    &content(&text),
                )
                .unwrap();
                let event = match bad_at.iter().position(|&b| b == i) {
                    // A signature byte changed; one of R, one of s; and one
                    // by another author than it names.
                    Some(k) if k < 2 => {
                        let mut inner = open_inner(&key, &event).unwrap();
                        inner[[3, 40][k]] ^= 0x04;
                        seal_inner(&key, i as i64, &inner)
                    }
                    Some(_) => {
                        let claims = body(
                            authors[0].signing().peer_id(),
                            "message",
                            &[],
                            &content(&text),
                        );
                        let mut claims = claims;
                        claims[..8].copy_from_slice(&(i as i64).to_be_bytes());
                        seal_inner(
                            &key,
                            i as i64,
                            &signed_inner(authors[1].signing(), NET, &claims),
                        )
                    }
                    None => event,
                };
                open_event_v3(NET, &key, &event, &keys).unwrap()
            })
            .collect();
        let singles: Vec<bool> = events.iter().map(|e| e.clone().verify().is_ok()).collect();
        let results = verify_batch(events, HostRng);
        let bad: Vec<usize> = (0..100).filter(|&i| results[i].is_err()).collect();
        assert_eq!(bad, bad_at);
        let batched: Vec<bool> = results.iter().map(Result::is_ok).collect();
        assert_eq!(batched, singles, "batch and single checks agree");
        assert_eq!(results[7].as_ref().unwrap().created_ms, 7, "in order");
        assert!(verify_batch(vec![], HostRng).is_empty());
    }
}
