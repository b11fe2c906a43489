//! Frames in: the receiving half of the crypto, frame → authenticated
//! envelope. Transit crypto unwraps a response with the transit secret of a
//! live request of ours; event crypto opens a request's sealed box with our
//! key and verifies the sender; either way the membership proof must hold
//! for a network we are in, before the payload is decoded.

use std::{
    collections::HashSet,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use quiet_plugin_api::{field, Envelope, Value};

use crate::{
    crypto::{event_crypto, transit},
    encoding::{codec, event_type},
    network::{
        sender_rates::SenderRates,
        wire::{Wire, DEFAULT_TRANSIT_TTL_MS},
    },
    storage::{counters::Counters, db, event_store::EventStore},
};

/// The receiving half of the crypto: frame → authenticated envelope.
pub struct Inbound {
    wire: Wire,
    /// Addresses already warned about for speaking another wire version.
    warned: Mutex<HashSet<std::net::IpAddr>>,
    /// Requests opened lately, by the hash of their sealed box: the same
    /// box again is a replay (an honest host seals every request afresh,
    /// with a new ephemeral key).
    seen: Mutex<Seen>,
    /// Each member's request rate.
    senders: SenderRates,
    /// The engine's event store, when responses' events are to be opened
    /// ahead of it ([`Inbound::opening_events_ahead`]).
    store: Option<EventStore>,
}

/// How long a request is remembered against replays, and how far its
/// `timestamp_ms` may be from our clock for it to make its connection
/// trusted: the transit TTL, as a request is answered within it.
const FRESH_MS: i64 = DEFAULT_TRANSIT_TTL_MS;
/// The most requests remembered against replays per [`FRESH_MS`]. Only
/// members' requests are, so only members can fill it; past it, requests
/// go unremembered until the next period, and the sync plugin's own replay
/// check still holds.
const MAX_SEEN: usize = 1 << 15;

/// The hashes of the requests of this period of [`FRESH_MS`] and of the
/// one before: each is remembered for one to two periods, and forgetting
/// is dropping a whole set, so no look costs more than a hash lookup.
#[derive(Default)]
struct Seen {
    since_ms: i64,
    current: HashSet<[u8; 32]>,
    previous: HashSet<[u8; 32]>,
}

impl Seen {
    /// Remembers `hash` at `now`; false if it was remembered already.
    fn first_sight(&mut self, hash: [u8; 32], now: i64) -> bool {
        if now - self.since_ms >= FRESH_MS {
            self.previous = match now - self.since_ms >= 2 * FRESH_MS {
                true => HashSet::new(),
                false => std::mem::take(&mut self.current),
            };
            self.current.clear();
            self.since_ms = now;
        }
        if self.current.contains(&hash) || self.previous.contains(&hash) {
            return false;
        }
        if self.current.len() < MAX_SEEN {
            self.current.insert(hash);
        }
        true
    }
}

/// Addresses [`Inbound`] remembers having warned about: past that it stops
/// warning, so that a flood of forged tags cannot grow memory.
const MAX_WARNED: usize = 1024;

impl Inbound {
    /// Opens frames sealed to us, accepting responses to our live requests
    /// and messages about networks we are in.
    pub fn new(wire: Wire) -> Self {
        Self {
            wire,
            warned: Mutex::default(),
            seen: Mutex::default(),
            senders: SenderRates::default(),
            store: None,
        }
    }

    /// This, opening the events in each response it accepts for `store`
    /// (the engine's, or a clone of it) on the thread that opens the frame:
    /// [`EventStore::pre_open`]. Only responses: they answer our own
    /// requests, and carry the events a catch-up stores.
    pub fn opening_events_ahead(mut self, store: EventStore) -> Self {
        self.store = Some(store);
        self
    }

    /// Where this side's drops are counted.
    pub fn counters(&self) -> &Arc<Counters> {
        &self.wire.counters
    }

    /// Whether the start of a response frame (its tag and request id)
    /// names a live request of ours: only then is its body worth reading.
    pub fn answers_live_request(&self, head: &[u8]) -> bool {
        head.get(1..1 + transit::REQUEST_ID_LEN)
            .is_some_and(|id| self.wire.live.is_live(id, db::now_ms()))
    }

    /// Whether an envelope that [`Inbound::open`] made makes its
    /// connection trusted: a response always does (transit accepts one per
    /// live request), a request only if it is fresh, its `timestamp_ms`
    /// within the transit TTL of our clock. A captured request replayed
    /// later still authenticates, and reaches the plugins (which refuse
    /// it), but must not buy its connection trust.
    pub fn grants_trust(&self, envelope: &Envelope) -> bool {
        if envelope.get(field::IN_RESPONSE_TO).is_some() {
            return true;
        }
        let sent = envelope
            .plaintext()
            .and_then(|p| p.get("timestamp_ms"))
            .and_then(Value::as_int);
        sent.is_some_and(|t| (t - db::now_ms()).abs() <= FRESH_MS)
    }

    /// Remembers the sealed box of a member's request; false if it was seen
    /// already, within one to two [`FRESH_MS`].
    fn first_sight(&self, sealed: &[u8]) -> bool {
        let hash = *blake3::hash(sealed).as_bytes();
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.first_sight(hash, db::now_ms())
    }

    /// Whether a frame with `tag` comes from a host of another wire
    /// version; if so, it is counted, and warned about once per address.
    pub fn other_version(&self, from: SocketAddr, tag: u8) -> bool {
        let Some(theirs) = transit::wire_version(tag).filter(|&v| v != transit::WIRE_VERSION)
        else {
            return false;
        };
        self.wire.counters.bump("drop_wire_version");
        let mut warned = self.warned.lock().unwrap_or_else(|e| e.into_inner());
        if warned.len() < MAX_WARNED && warned.insert(from.ip()) {
            let age = match theirs < transit::WIRE_VERSION {
                true => "an older",
                false => "a newer",
            };
            tracing::warn!(
                %from,
                "{age} quiet-host sends frames of wire protocol version {theirs}, and this one \
                 speaks version {}: they cannot sync until both run the same version \
                 (its frames are dropped, counted as drop_wire_version)",
                transit::WIRE_VERSION
            );
        }
        true
    }

    /// The envelope in a frame that came `from` a socket address, or the
    /// counter it was dropped under (and counted) if it does not
    /// authenticate or decode.
    pub fn open(&self, from: SocketAddr, frame: Vec<u8>) -> Result<Envelope, &'static str> {
        if self.other_version(from, frame.first().copied().unwrap_or(0)) {
            return Err("drop_wire_version");
        }
        self.try_open(frame).inspect_err(|counter| {
            tracing::debug!(%from, "dropped frame: {counter}");
            self.wire.counters.bump(counter);
        })
    }

    fn try_open(&self, frame: Vec<u8>) -> Result<Envelope, &'static str> {
        let frame_len = frame.len();
        // What `payload` borrows from: a request's opened box, or a
        // response's frame, decrypted in place.
        let (unsealed, accepted);
        // A request's sealed box, to tell a replay.
        let mut sealed = None;
        // Who sent it, about which network, its membership proof and the
        // payload; and the request it answers, for a response.
        let (sender, network_id, proof, payload, in_response_to) = match frame.first() {
            Some(&transit::REQUEST) => {
                let opened = event_crypto::open_from(&self.wire.identity, &frame[1..]).map_err(
                    |e| match e {
                        event_crypto::CryptoError::BadSeal => "drop_bad_seal",
                        event_crypto::CryptoError::BadProof => "drop_bad_sender_proof",
                        _ => "drop_malformed_payload",
                    },
                )?;
                let (network_id, proof) = opened.network.ok_or("drop_not_a_member")?;
                sealed = Some(&frame[1..]);
                unsealed = opened.payload;
                (opened.sender, network_id, proof, &unsealed[..], None)
            }
            Some(&transit::RESPONSE) => {
                // Only the peer we sealed the request to holds its transit
                // secret: the request names the sender and the network.
                accepted = self
                    .wire
                    .live
                    .accept(frame, db::now_ms())
                    .map_err(|e| e.counter())?;
                let (proof, payload) = event_crypto::split_member_proof(accepted.body())
                    .ok_or("drop_malformed_payload")?;
                (
                    accepted.peer_id.clone(),
                    accepted.network_id.clone(),
                    *proof,
                    payload,
                    Some(hex::encode(accepted.request_id)),
                )
            }
            _ => return Err("drop_malformed_frame"),
        };
        // Every message is about a network: only members of it are heard,
        // and only when we are one. Checked before the payload is decoded.
        let key = self.wire.keys.get(&network_id).ok_or("drop_not_a_member")?;
        if !event_crypto::is_member_proof(&key, payload, &proof) {
            return Err("drop_not_a_member");
        }
        // Remembered only once a member's: strangers cannot fill the memory.
        if sealed.is_some_and(|box_| !self.first_sight(box_)) {
            return Err("drop_replayed_frame");
        }
        if sealed.is_some() && !self.senders.admit(&sender, frame_len) {
            return Err("drop_sender_over_rate");
        }
        let plaintext = codec::decode(payload).map_err(|_| "drop_malformed_payload")?;
        let event_type = event_type::of(&plaintext)
            .ok_or("drop_malformed_payload")?
            .to_owned();
        if let (Some(store), Some(_)) = (&self.store, &in_response_to) {
            store.pre_open(&network_id, &plaintext);
        }
        let mut envelope = Envelope::of_type(&event_type)
            .with(field::SENDER_PEER_ID, sender)
            .with(field::NETWORK_ID, network_id)
            .with(field::EVENT_PLAINTEXT, plaintext);
        if let Some(id) = in_response_to {
            envelope.set(field::IN_RESPONSE_TO, id);
        }
        Ok(envelope)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_is_remembered_for_one_to_two_periods_and_the_memory_is_bounded() {
        let mut seen = Seen::default();
        let t = 1_000_000;
        assert!(seen.first_sight([1; 32], t));
        assert!(!seen.first_sight([1; 32], t + FRESH_MS - 1));
        // Into the next period: still remembered, in the previous set.
        assert!(!seen.first_sight([1; 32], t + FRESH_MS + 1));
        // Two periods on, forgotten.
        assert!(seen.first_sight([1; 32], t + 3 * FRESH_MS));
        for i in 0..MAX_SEEN + 100 {
            let mut h = [0u8; 32];
            h[..8].copy_from_slice(&(i as u64).to_le_bytes());
            seen.first_sight(h, t + 3 * FRESH_MS);
        }
        assert_eq!(seen.current.len(), MAX_SEEN);
    }
}
