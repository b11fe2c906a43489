//! What one sender may cost: a member holds the network key and its
//! connections are trusted, so the budget of opens for strangers does not
//! slow it. Each sender's requests (responses answer our own requests, so
//! their rate is ours) pass a token bucket of frames and one of bytes; past
//! either, a request is dropped and counted, `drop_sender_over_rate`.
//!
//! The rates are far above what sync needs (a catch-up's requester sends
//! one request per response, some tens a second), so an honest peer never
//! meets them. A member can make more identities to get more buckets; what
//! bounds all of them together is the connection slots, the listener's
//! read budget and the engine's queue budget, of which each sender may hold
//! at most 16 frames (see `engine::inbox::QueueBudget`), so an honest peer's
//! frame waits behind at most that many of each identity's.

use std::{collections::HashMap, sync::Mutex};

use crate::storage::db;

/// Requests per second one sender may send, on average.
pub const FRAMES_PER_SEC: f64 = 200.0;
/// How many it may send at once.
const FRAMES_BURST: f64 = 400.0;
/// Bytes of requests per second one sender may send, on average.
pub const BYTES_PER_SEC: f64 = (16 << 20) as f64;
/// How many it may send at once.
const BYTES_BURST: f64 = (32 << 20) as f64;
/// Senders remembered at once. Past it, those whose buckets have filled
/// again are forgotten (they owe nothing); if none has, a new sender is
/// not limited until one has.
const MAX_SENDERS: usize = 4096;

/// How long one sender's buckets take to refill a request of `bytes`.
pub fn refill_time(bytes: usize) -> std::time::Duration {
    std::time::Duration::from_secs_f64((1.0 / FRAMES_PER_SEC).max(bytes as f64 / BYTES_PER_SEC))
}

struct Bucket {
    frames: f64,
    bytes: f64,
    /// When it was last refilled, on the host's clock (a simulator's
    /// virtual one in a simulation, where seconds pass in milliseconds).
    at_ms: i64,
}

impl Bucket {
    fn full(at_ms: i64) -> Self {
        Self {
            frames: FRAMES_BURST,
            bytes: BYTES_BURST,
            at_ms,
        }
    }

    fn refill(&mut self, now_ms: i64) {
        // A clock that went back refills nothing.
        let secs = (now_ms - self.at_ms).max(0) as f64 / 1000.0;
        self.frames = (self.frames + secs * FRAMES_PER_SEC).min(FRAMES_BURST);
        self.bytes = (self.bytes + secs * BYTES_PER_SEC).min(BYTES_BURST);
        self.at_ms = self.at_ms.max(now_ms);
    }

    fn is_full(&self) -> bool {
        self.frames >= FRAMES_BURST && self.bytes >= BYTES_BURST
    }
}

/// The buckets of the senders heard from lately.
#[derive(Default)]
pub struct SenderRates(Mutex<HashMap<String, Bucket>>);

impl SenderRates {
    /// Whether `sender` may send a request of `bytes` now; takes its
    /// share if so.
    pub fn admit(&self, sender: &str, bytes: usize) -> bool {
        self.admit_at(sender, bytes, db::now_ms())
    }

    fn admit_at(&self, sender: &str, bytes: usize, now: i64) -> bool {
        let mut senders = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if !senders.contains_key(sender) && senders.len() >= MAX_SENDERS {
            senders.retain(|_, b| {
                b.refill(now);
                !b.is_full()
            });
            if senders.len() >= MAX_SENDERS {
                return true;
            }
        }
        let bucket = senders
            .entry(sender.to_owned())
            .or_insert_with(|| Bucket::full(now));
        bucket.refill(now);
        let bytes = bytes as f64;
        if bucket.frames < 1.0 || bucket.bytes < bytes {
            return false;
        }
        bucket.frames -= 1.0;
        bucket.bytes -= bytes;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sender_past_its_rate_is_refused_and_others_are_not() {
        let rates = SenderRates::default();
        let t0 = db::now_ms();
        let sent = (0..1000).filter(|_| rates.admit_at("m", 100, t0)).count();
        assert_eq!(sent, FRAMES_BURST as usize);
        // Another sender has its own bucket.
        assert!(rates.admit_at("honest", 100, t0));
        // A second later, a second's worth more.
        let t1 = t0 + 1000;
        let more = (0..1000).filter(|_| rates.admit_at("m", 100, t1)).count();
        assert_eq!(more, FRAMES_PER_SEC as usize);
        // Bytes bound too: one request larger than the burst never passes.
        assert!(!rates.admit_at("big", BYTES_BURST as usize + 1, t1));
        assert!(rates.admit_at("big", 1 << 20, t1));
    }

    #[test]
    fn the_senders_remembered_are_bounded() {
        let rates = SenderRates::default();
        let t0 = db::now_ms();
        for i in 0..MAX_SENDERS + 10 {
            rates.admit_at(&format!("s{i}"), 1, t0);
        }
        assert!(rates.0.lock().unwrap().len() <= MAX_SENDERS);
        // Once their buckets fill again, the old ones make room.
        let later = t0 + 10_000;
        assert!(rates.admit_at("new", 1, later));
        assert!(rates.0.lock().unwrap().contains_key("new"));
    }
}
