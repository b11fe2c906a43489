//! Events opened ahead: what the network's reader thread made of the
//! events in a frame before the engine got to it.
//!
//! Why: checking a signature is the largest part of receiving an event
//! (about 15 µs in a batch; SQLite's part, on the engine, about 20 µs). When
//! the engine opened the events of a sync response itself, on a helper
//! thread beside it, the helper idled while the engine committed one
//! response, and the engine waited for the helper's first chunk of the
//! next: a catch-up kept the two cores about 70 % busy. The reader opens
//! the events of a response it has authenticated while the engine stores
//! the one before, and leaves the results here; the event store takes them
//! instead of opening the events again. An event not found here (the
//! cache was full, it came another way) is opened by the event store as
//! before, so this changes what an event costs, never what becomes of it.
//!
//! A result is taken only for the same bytes in the same network: an
//! entry is found by the event's nonce and then compared by a BLAKE3 hash
//! of all its bytes, as a member who holds the network key could make two
//! events that share a nonce (and a Poly1305 tag, whose key it knows).
//! What it holds is bounded ([`MAX_ENTRIES`], [`MAX_BYTES`]), and an entry
//! nobody took (its frame was dropped before the engine saw it, or its
//! plugin stored nothing) is let go after [`STALE_AFTER`].

use std::{
    collections::{HashMap, VecDeque},
    sync::Mutex,
    time::{Duration, Instant},
};

use crate::crypto::signed_event::SignedEvent;

/// The most events held: a few sync responses' worth.
pub const MAX_ENTRIES: usize = 4096;
/// The most bytes of events held, counted as their ciphertexts' length
/// (what they open to is about as large): two sync responses of a
/// thousand 1 KiB events, room for the one the engine will take next
/// while the reader opens another. Holding 12 MiB of ciphertexts and what
/// they opened to raised a receiver's peak RSS in a 1M catch-up from 91
/// to 110 MiB.
pub const MAX_BYTES: usize = 3 << 20;
/// How long an entry nobody took is kept, once room is needed: longer than
/// a frame waits for the engine (`drop_sender_backlog` after 2 s).
pub const STALE_AFTER: Duration = Duration::from_secs(10);

/// Where an event's nonce lies in its bytes: after its 8-byte creation
/// time and its format byte.
const NONCE: std::ops::Range<usize> = 9..33;

/// What opening an event gave: the event, verified, or the counter it is
/// refused under.
pub type Outcome = Result<SignedEvent, &'static str>;

/// Events opened ahead; see the [module docs](self).
#[derive(Default)]
pub struct PreOpened(Mutex<Held>);

#[derive(Default)]
struct Held {
    by_nonce: HashMap<[u8; 24], Entry>,
    /// Nonces in the order they came, with when: the oldest are let go
    /// first. Entries taken since leave their nonce here until it reaches
    /// the front.
    order: VecDeque<([u8; 24], Instant)>,
    bytes: usize,
}

struct Entry {
    network_id: Box<str>,
    /// The event's BLAKE3 hash, to tell it from another with its nonce.
    digest: [u8; 32],
    len: usize,
    outcome: Outcome,
    at: Instant,
}

impl PreOpened {
    /// Whether there is room for `count` events of `bytes` in all, after
    /// letting go of entries older than [`STALE_AFTER`]. Asked before
    /// opening a frame's events, so that a full cache costs no work.
    pub fn has_room(&self, count: usize, bytes: usize) -> bool {
        let mut held = self.lock();
        held.let_go_stale(Instant::now());
        held.fits(count, bytes)
    }

    /// Keeps what opening `event` of `network_id` gave, unless an event
    /// with its nonce is held already or there is no room.
    pub fn put(&self, network_id: &str, event: &[u8], outcome: Outcome) {
        let Some(nonce) = nonce_of(event) else {
            return;
        };
        // Hashed before the lock, which the engine takes per event.
        let digest = *blake3::hash(event).as_bytes();
        let mut held = self.lock();
        if !held.fits(1, event.len()) || held.by_nonce.contains_key(&nonce) {
            return;
        }
        let at = Instant::now();
        held.bytes += event.len();
        held.by_nonce.insert(
            nonce,
            Entry {
                network_id: network_id.into(),
                digest,
                len: event.len(),
                outcome,
                at,
            },
        );
        held.order.push_back((nonce, at));
        // Nonces of taken entries are dropped as they reach the front;
        // one entry never taken must not hold a long tail behind it.
        if held.order.len() > 4 * MAX_ENTRIES {
            let Held {
                by_nonce, order, ..
            } = &mut *held;
            order.retain(|(n, at)| by_nonce.get(n).is_some_and(|e| e.at == *at));
        }
    }

    /// What opening `event` of `network_id` gave, if it was opened ahead:
    /// the entry is removed.
    pub fn take(&self, network_id: &str, event: &[u8]) -> Option<Outcome> {
        let nonce = nonce_of(event)?;
        let mut held = self.lock();
        let entry = held.by_nonce.get(&nonce)?;
        if &*entry.network_id != network_id || entry.digest != *blake3::hash(event).as_bytes() {
            return None;
        }
        let entry = held.by_nonce.remove(&nonce)?;
        held.bytes -= entry.len;
        held.pop_taken();
        Some(entry.outcome)
    }

    /// How many events are held.
    pub fn len(&self) -> usize {
        self.lock().by_nonce.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Held> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Held {
    /// Whether `count` more events of `bytes` in all stay within bounds.
    fn fits(&self, count: usize, bytes: usize) -> bool {
        self.by_nonce.len() + count <= MAX_ENTRIES && self.bytes + bytes <= MAX_BYTES
    }

    /// Drops the front of `order` while it names entries already taken.
    fn pop_taken(&mut self) {
        while let Some((nonce, at)) = self.order.front() {
            if self.by_nonce.get(nonce).is_some_and(|e| e.at == *at) {
                break;
            }
            self.order.pop_front();
        }
    }

    fn let_go_stale(&mut self, now: Instant) {
        while let Some(&(nonce, at)) = self.order.front() {
            if self.by_nonce.get(&nonce).is_some_and(|e| e.at == at) {
                if now.duration_since(at) < STALE_AFTER {
                    break;
                }
                if let Some(e) = self.by_nonce.remove(&nonce) {
                    self.bytes -= e.len;
                }
            }
            self.order.pop_front();
        }
    }
}

fn nonce_of(event: &[u8]) -> Option<[u8; 24]> {
    event.get(NONCE)?.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(nonce: u8, body: u8) -> Vec<u8> {
        let mut e = vec![0u8; 64];
        e[8] = 3;
        e[NONCE].fill(nonce);
        e[40] = body;
        e
    }

    #[test]
    fn a_result_is_given_once_and_only_for_the_same_bytes_in_the_same_network() {
        let cache = PreOpened::default();
        let (a, same_nonce) = (event(1, 1), event(1, 2));
        cache.put("net", &a, Err("drop_bad_signature"));
        assert!(cache.take("other", &a).is_none());
        assert!(cache.take("net", &same_nonce).is_none());
        // A second event with the nonce of one held is not kept.
        cache.put("net", &same_nonce, Err("drop_malformed_event"));
        assert_eq!(cache.take("net", &a), Some(Err("drop_bad_signature")));
        assert!(cache.take("net", &a).is_none());
        assert!(cache.take("net", &same_nonce).is_none());
        assert!(cache.is_empty());
        assert_eq!(cache.lock().bytes, 0);
        assert!(cache.lock().order.is_empty());
    }

    #[test]
    fn it_holds_at_most_its_bound_and_lets_go_of_what_nobody_took() {
        let cache = PreOpened::default();
        let mut nonce = [0u8; 24];
        for i in 0..MAX_ENTRIES + 10 {
            nonce[..8].copy_from_slice(&(i as u64).to_le_bytes());
            let mut e = event(0, 0);
            e[NONCE].copy_from_slice(&nonce);
            cache.put("net", &e, Err("x"));
        }
        assert_eq!(cache.len(), MAX_ENTRIES);
        assert!(!cache.has_room(1, 64));
        // Made stale: the next look lets all of them go.
        for (_, at) in cache.lock().order.iter_mut() {
            *at -= STALE_AFTER;
        }
        for entry in cache.lock().by_nonce.values_mut() {
            entry.at -= STALE_AFTER;
        }
        assert!(cache.has_room(1, 64));
        assert!(cache.is_empty());
        assert_eq!(cache.lock().bytes, 0);
    }

    #[test]
    fn taken_entries_do_not_pile_up_behind_one_never_taken() {
        let cache = PreOpened::default();
        cache.put("net", &event(255, 0), Err("x"));
        let mut nonce = [0u8; 24];
        for i in 0..5 * MAX_ENTRIES {
            nonce[..8].copy_from_slice(&(i as u64).to_le_bytes());
            let mut e = event(0, 0);
            e[NONCE].copy_from_slice(&nonce);
            cache.put("net", &e, Err("x"));
            assert!(cache.take("net", &e).is_some());
        }
        assert_eq!(cache.len(), 1);
        assert!(cache.lock().order.len() <= 4 * MAX_ENTRIES + 1);
    }
}
