//! Transit crypto: what goes on the wire around a payload.
//!
//! A frame's first byte is its **tag**: the wire protocol's version in the
//! high four bits, the frame's kind in the low four. Builds before the
//! version existed sent tags `0x01` and `0x02`, which read as version 0,
//! so a host tells a peer of another version from junk, and says so (see
//! [`wire_version`]). Two frame kinds:
//! - a **request** (kind 1) is just the sealed box: the responder has no
//!   shared secret with us yet;
//! - a **response** (kind 2) is `request_id` (16 bytes) ‖ nonce ‖
//!   XChaCha20-Poly1305 (`crypto_secretbox`'s) under the request's transit
//!   secret, of `request_id` ‖ body. The requester put that secret inside
//!   its sealed request, so only the peer it sealed to can answer: a
//!   response that decrypts under it comes from that peer, about that
//!   request's network, which [`LiveRequests`] remembers. So a response is
//!   not sealed a second time; it is the seed's "sealed back to it" with
//!   one pass of a cipher instead of two, over a megabyte per response in a
//!   catch-up. ChaCha20 has a SIMD backend and XSalsa20 does not: 0.93 ms
//!   per MiB instead of 2.08 here. We accept a response only while the
//!   request is live (default TTL 30 s) and only once: a replayed or
//!   duplicated response finds no live request and is dropped.

use std::{collections::HashMap, sync::Mutex};

use crypto_box::aead::{generic_array::GenericArray, AeadCore, AeadInPlace};
use crypto_secretbox::{KeyInit, XChaCha20Poly1305};

/// The wire protocol this build speaks. Raise it with any change that
/// hosts of the previous version cannot read.
pub const WIRE_VERSION: u8 = 2;
/// Frame tag: a sealed request.
pub const REQUEST: u8 = WIRE_VERSION << 4 | 1;
/// Frame tag: a response wrapped in a transit secret.
pub const RESPONSE: u8 = WIRE_VERSION << 4 | 2;

/// The wire version a frame's tag says it was written in, if the tag is of
/// a request or a response of some version; `None` for any other byte.
pub fn wire_version(tag: u8) -> Option<u8> {
    matches!(tag & 0x0f, 1 | 2).then_some(tag >> 4)
}

/// The bytes of a request id, which a response's frame starts with (after
/// its tag).
pub const REQUEST_ID_LEN: usize = 16;

const NONCE: usize = 24;
const TAG: usize = 16;
/// Where a response's ciphertext starts: after the frame's tag, the request
/// id, the nonce and the Poly1305 tag (which secretbox puts in front).
const SEALED_AT: usize = 1 + 16 + NONCE + TAG;
/// Where the body starts once decrypted: after the request id inside.
const BODY_AT: usize = SEALED_AT + 16;

/// Why a response frame was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransitError {
    /// Too short to be a response.
    Malformed,
    /// No live request has that id: unknown, expired, or already answered.
    UnknownRequest,
    /// It does not decrypt under the request's transit secret.
    BadSecret,
}

impl TransitError {
    /// The counter this drop is recorded under.
    pub fn counter(self) -> &'static str {
        match self {
            TransitError::Malformed => "drop_malformed_frame",
            TransitError::UnknownRequest => "drop_unknown_or_expired_request",
            TransitError::BadSecret => "drop_bad_transit_secret",
        }
    }
}

/// What we keep of a request of ours until it is answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Live {
    /// Its transit secret.
    pub secret: [u8; 32],
    /// The peer it was sealed to: the only one that can answer it.
    pub peer_id: String,
    /// The network it is about.
    pub network_id: String,
}

/// A response accepted for a live request of ours.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Accepted {
    /// The request it answers.
    pub request_id: [u8; 16],
    /// The peer the request was sealed to, so the one that answered.
    pub peer_id: String,
    /// The request's network.
    pub network_id: String,
    /// The frame, decrypted where it lay; [`Accepted::body`] is its end.
    frame: Vec<u8>,
}

impl Accepted {
    /// What the responder wrapped.
    pub fn body(&self) -> &[u8] {
        &self.frame[BODY_AT..]
    }
}

/// Request id → (what we keep of it, expiry in ms).
type Secrets = HashMap<[u8; 16], (Live, i64)>;

/// Transit secrets of our requests that may still be answered.
#[derive(Default)]
pub struct LiveRequests {
    live: Mutex<Secrets>,
}

impl LiveRequests {
    /// Remembers a request until `now + ttl_ms`.
    pub fn register(&self, request_id: [u8; 16], request: Live, now: i64, ttl_ms: i64) {
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        live.retain(|_, (_, expires)| *expires > now);
        live.insert(request_id, (request, now + ttl_ms));
    }

    /// Whether `request_id` names a request that may still be answered at
    /// `now`: a cheap look, before a response's body is even read.
    pub fn is_live(&self, request_id: &[u8], now: i64) -> bool {
        let Ok(id) = <[u8; 16]>::try_from(request_id) else {
            return false;
        };
        let live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        live.get(&id).is_some_and(|(_, expires)| *expires > now)
    }

    /// How many requests are live.
    pub fn len(&self) -> usize {
        self.live.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether no request is live.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Unwraps a response frame (its tag byte included), decrypting it in
    /// place: a response is a megabyte. On success the request stops being
    /// live.
    pub fn accept(&self, mut frame: Vec<u8>, now: i64) -> Result<Accepted, TransitError> {
        if frame.len() < BODY_AT {
            return Err(TransitError::Malformed);
        }
        let id: [u8; 16] = frame[1..17].try_into().expect("16 bytes");
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        let secret = match live.get(&id) {
            Some((request, expires)) if *expires > now => request.secret,
            _ => return Err(TransitError::UnknownRequest),
        };
        let (head, sealed) = frame.split_at_mut(SEALED_AT);
        let nonce = GenericArray::from_slice(&head[17..17 + NONCE]);
        let tag = GenericArray::from_slice(&head[17 + NONCE..]);
        XChaCha20Poly1305::new(&secret.into())
            .decrypt_in_place_detached(nonce, b"", sealed, tag)
            .map_err(|_| TransitError::BadSecret)?;
        // The request id is inside too, so a frame cannot be re-labelled
        // to answer another request made with the same secret.
        if sealed[..16] != id {
            return Err(TransitError::BadSecret);
        }
        let (request, _) = live.remove(&id).expect("looked up above");
        Ok(Accepted {
            request_id: id,
            peer_id: request.peer_id,
            network_id: request.network_id,
            frame,
        })
    }
}

/// Wraps `body` as the response to `request_id`.
pub fn wrap_response(request_id: [u8; 16], secret: &[u8; 32], body: &[u8]) -> Vec<u8> {
    wrap_response_with(request_id, secret, body.len(), |out| {
        out.extend_from_slice(body)
    })
}

/// Wraps as the response to `request_id` the `body_len` bytes `put_body`
/// appends, encrypting them where they were written: the frame is the only
/// buffer, allocated once. (Five buffers of a megabyte each per response
/// made the allocator hand pages back and fault them in again: a fifth of
/// a serving host's time.)
pub fn wrap_response_with(
    request_id: [u8; 16],
    secret: &[u8; 32],
    body_len: usize,
    put_body: impl FnOnce(&mut Vec<u8>),
) -> Vec<u8> {
    let nonce = XChaCha20Poly1305::generate_nonce(&mut crate::crypto::entropy::HostRng);
    let mut frame = Vec::with_capacity(BODY_AT + body_len);
    frame.push(RESPONSE);
    frame.extend_from_slice(&request_id);
    frame.extend_from_slice(&nonce);
    frame.extend_from_slice(&[0; TAG]);
    frame.extend_from_slice(&request_id);
    put_body(&mut frame);
    let tag = XChaCha20Poly1305::new(&(*secret).into())
        .encrypt_in_place_detached(&nonce, b"", &mut frame[SEALED_AT..])
        .expect("encrypting in memory cannot fail");
    frame[SEALED_AT - TAG..SEALED_AT].copy_from_slice(&tag);
    frame
}

/// Frames a sealed request.
pub fn wrap_request(sealed: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(1 + sealed.len());
    frame.push(REQUEST);
    frame.extend_from_slice(sealed);
    frame
}

/// Parses a 32-hex-character request id.
pub fn parse_request_id(hex_id: &str) -> Option<[u8; 16]> {
    let mut id = [0u8; 16];
    hex::decode_to_slice(hex_id, &mut id).ok().map(|()| id)
}

#[cfg(test)]
mod tests {
    use crypto_box::aead::Aead;

    use super::*;

    #[test]
    fn a_response_is_accepted_once_while_live_and_only_with_its_secret() {
        let live = LiveRequests::default();
        let (id, secret) = ([7u8; 16], [9u8; 32]);
        let request = Live {
            secret,
            peer_id: "peer".into(),
            network_id: "net".into(),
        };
        live.register(id, request.clone(), 1000, 30_000);
        let frame = wrap_response(id, &secret, b"body");
        assert_eq!(frame[0], RESPONSE);
        // The frame is its only buffer: allocated once, at its exact size.
        assert_eq!(frame.capacity(), frame.len());
        // Wrong secret: refused, and the request stays live.
        let forged = wrap_response(id, &[1u8; 32], b"evil");
        assert_eq!(live.accept(forged, 2000), Err(TransitError::BadSecret));
        // So does a frame altered after it was wrapped.
        let mut altered = frame.clone();
        *altered.last_mut().unwrap() ^= 1;
        assert_eq!(live.accept(altered, 2000), Err(TransitError::BadSecret));
        let accepted = live.accept(frame.clone(), 2000).unwrap();
        assert_eq!(accepted.body(), b"body");
        assert_eq!(
            (
                accepted.request_id,
                &*accepted.peer_id,
                &*accepted.network_id
            ),
            (id, "peer", "net")
        );
        // A replay of the same frame.
        assert_eq!(
            live.accept(frame.clone(), 2001),
            Err(TransitError::UnknownRequest)
        );
        // Expired.
        live.register(id, request, 1000, 30_000);
        assert_eq!(
            live.accept(frame.clone(), 31_000),
            Err(TransitError::UnknownRequest)
        );
        assert_eq!(
            live.accept(frame[..BODY_AT - 1].to_vec(), 2000),
            Err(TransitError::Malformed)
        );
        // The frame is what a response wrapped in separate buffers was:
        // tag, id, nonce, then secretbox's tag-first ciphertext of id ‖ body.
        let nonce = GenericArray::from_slice(&frame[17..17 + NONCE]);
        let sealed = XChaCha20Poly1305::new(&secret.into())
            .encrypt(nonce, [&id[..], b"body"].concat().as_slice())
            .unwrap();
        assert_eq!(frame[17 + NONCE..], sealed[..]);
    }
}
