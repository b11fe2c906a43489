//! The event store: the host's own pipeline stage for `store_event`
//! envelopes, which carry one encrypted event (`network_id`,
//! `event_ciphertext`) from the network or from a local command.
//!
//! It decrypts the event with the network's key (so only members' events are
//! kept), derives its id from its bytes, stores it once (`events.event_id` is
//! the primary key: a duplicate stops here), and hands the decrypted event on
//! to the plugins under its own type, such as `message`. Plugins never see
//! network keys. Sync requests never come here: they carry no event.

use std::sync::{
    atomic::{AtomicUsize, Ordering},
    Arc, OnceLock,
};

use quiet_plugin_api::{abi_stable::std_types::RString, field, Envelope, Value};
use rusqlite::Connection;

use crate::{
    crypto::event_crypto::{self, NetworkKey},
    encoding::{codec, event_type},
    storage::{counters::Counters, db, networks::NetworkKeys, statements::Statements},
};

/// An event decrypted and checked by [`EventStore::open`], not yet stored.
/// Its network id and bytes stay in its envelope until they are stored.
#[derive(Debug)]
pub struct Opened {
    id: [u8; 32],
    created_ms: i64,
    /// Moved into the decrypted envelope.
    event_type: RString,
    plaintext: Value,
}

/// The network key [`EventStore::open`] found last: the events of a batch
/// are nearly always of one network, and looking a key up (checking the
/// id, a locked map) was about 700 instructions per event.
#[derive(Default)]
struct LastKey(Option<(String, NetworkKey)>);

impl LastKey {
    fn get(&mut self, keys: &NetworkKeys, network_id: &str) -> Option<&NetworkKey> {
        if self.0.as_ref().is_none_or(|(id, _)| id != network_id) {
            self.0 = Some((network_id.to_owned(), keys.get(network_id)?));
        }
        self.0.as_ref().map(|(_, key)| key)
    }
}

/// The event type that asks the host to store an event.
pub const STORE_EVENT: &str = "store_event";

/// The largest event accepted, in bytes.
pub const MAX_EVENT_BYTES: usize = 64 * 1024;

/// Stores events; see the [module docs](self).
#[derive(Clone)]
pub struct EventStore {
    keys: Arc<NetworkKeys>,
    counters: Arc<Counters>,
}

impl EventStore {
    /// A store using `keys`, counting what it refuses in `counters`.
    pub fn new(keys: Arc<NetworkKeys>, counters: Arc<Counters>) -> Self {
        Self { keys, counters }
    }

    /// Stores the event in `envelope`. Returns the decrypted event to route
    /// on, or `None` when it was a duplicate or refused (and counted).
    pub fn store(
        &self,
        statements: &Statements<'_>,
        envelope: Envelope,
    ) -> rusqlite::Result<Option<Envelope>> {
        let opened = self.open(&envelope);
        self.store_opened(statements, envelope, opened)
    }

    /// The part of storing that needs no database: decrypting, decoding and
    /// hashing the event. `Err` names the counter a refused event goes under.
    pub fn open(&self, envelope: &Envelope) -> Result<Opened, &'static str> {
        self.open_with(envelope, &mut LastKey::default())
    }

    fn open_with(&self, envelope: &Envelope, last: &mut LastKey) -> Result<Opened, &'static str> {
        let (Some(network_id), Some(event)) = (
            envelope.str(field::NETWORK_ID),
            envelope.bytes(field::EVENT_CIPHERTEXT),
        ) else {
            return Err("drop_malformed_store_event");
        };
        if event.len() > MAX_EVENT_BYTES {
            return Err("drop_oversized_event");
        }
        let key = last
            .get(&self.keys, network_id)
            .ok_or("drop_event_for_unknown_network")?;
        let (created_ms, plaintext) =
            event_crypto::decrypt_event(key, event).map_err(|_| "drop_undecryptable_event")?;
        let plaintext = codec::decode(&plaintext).map_err(|_| "drop_malformed_event")?;
        let event_type = event_type::of(&plaintext)
            .ok_or("drop_malformed_event")?
            .into();
        Ok(Opened {
            id: event_crypto::event_id(event),
            created_ms,
            event_type,
            plaintext,
        })
    }

    /// [`open`](Self::open) for each of `envelopes`, spread over two threads
    /// when there are enough to pay for it: during a catch-up decryption is
    /// a tenth of the engine's work, and the other core is otherwise idle
    /// half the time.
    pub fn open_all(&self, envelopes: &[&Envelope]) -> Vec<Result<Opened, &'static str>> {
        const PARALLEL_FROM: usize = 64;
        if envelopes.len() < PARALLEL_FROM {
            let mut last = LastKey::default();
            return envelopes
                .iter()
                .map(|e| self.open_with(e, &mut last))
                .collect();
        }
        // Both threads take the next unopened event until none is left,
        // rather than half each: on two busy cores the helper may start
        // late or be descheduled, and the engine then opens what it has
        // not taken instead of waiting for it.
        let next = AtomicUsize::new(0);
        let slots: Vec<OnceLock<Result<Opened, &'static str>>> =
            envelopes.iter().map(|_| OnceLock::new()).collect();
        let work = || {
            let mut last = LastKey::default();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(envelope) = envelopes.get(i) else {
                    break;
                };
                let _ = slots[i].set(self.open_with(envelope, &mut last));
            }
        };
        std::thread::scope(|s| {
            let helper = s.spawn(work);
            work();
            // Joined here, so that a panic in it does not become ours.
            let _ = helper.join();
        });
        slots
            .into_iter()
            .zip(envelopes)
            // Opening does not panic on any input (fuzzed); if it ever did
            // in the helper, the event it held is opened here instead.
            .map(|(slot, e)| slot.into_inner().unwrap_or_else(|| self.open(e)))
            .collect()
    }

    /// Stores what [`open`](Self::open) made of the event in `envelope`;
    /// see [`store`](Self::store).
    pub fn store_opened(
        &self,
        statements: &Statements<'_>,
        mut envelope: Envelope,
        opened: Result<Opened, &'static str>,
    ) -> rusqlite::Result<Option<Envelope>> {
        let opened = match opened {
            Ok(opened) => opened,
            Err(counter) => return Ok(self.refuse(counter)),
        };
        // Moved, not copied, into the decrypted event: `open` checked both.
        let (Some(Value::Text(network_id)), Some(Value::Bytes(event))) = (
            envelope.remove(field::NETWORK_ID),
            envelope.remove(field::EVENT_CIPHERTEXT),
        ) else {
            return Ok(self.refuse("drop_malformed_store_event"));
        };
        let inserted = statements
            .get(
                "INSERT OR IGNORE INTO events(event_id, network_id, created_ms, event_type, event, received_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                Connection::prepare_cached,
            )?
            .execute(rusqlite::params![
                &opened.id[..],
                network_id.as_str(),
                opened.created_ms,
                opened.event_type.as_str(),
                event.as_slice(),
                db::now_ms()
            ])?;
        if inserted == 0 {
            return Ok(self.refuse("duplicate_events"));
        }
        Ok(Some(
            Envelope::new()
                .with(field::EVENT_TYPE, opened.event_type)
                .with(field::EVENT_ID, opened.id)
                .with(field::NETWORK_ID, network_id)
                .with(field::EVENT_PLAINTEXT, opened.plaintext)
                .with(field::EVENT_CIPHERTEXT, event),
        ))
    }

    fn refuse(&self, counter: &'static str) -> Option<Envelope> {
        self.counters.bump(counter);
        None
    }

    /// Encrypts a new local event of `network_id`, created now, and wraps it
    /// in a `store_event` envelope; refuses one larger than
    /// [`MAX_EVENT_BYTES`], which no host would store.
    pub fn new_local_event(&self, network_id: &str, plaintext: &Value) -> Result<Envelope, String> {
        let key = self
            .keys
            .get(network_id)
            .ok_or_else(|| format!("not a member of network {network_id}"))?;
        let event = event_crypto::encrypt_event(&key, db::now_ms(), &codec::encode(plaintext));
        // Refused here, where it is made, rather than dropped by every
        // store that would receive it, this one included.
        if event.len() > MAX_EVENT_BYTES {
            return Err(format!(
                "the event would be {} bytes, over the limit of {MAX_EVENT_BYTES} bytes an event \
                 may take: shorten it by at least {} bytes",
                event.len(),
                event.len() - MAX_EVENT_BYTES
            ));
        }
        Ok(Envelope::of_type(STORE_EVENT)
            .with(field::NETWORK_ID, network_id)
            .with(field::EVENT_CIPHERTEXT, event))
    }
}

/// For tests: a store with a fresh key of `network_id`, in a temporary
/// folder that lasts as long as the returned guard.
#[cfg(test)]
impl EventStore {
    pub(crate) fn with_one_network(network_id: &str) -> (tempfile::TempDir, EventStore) {
        let dir = tempfile::tempdir().unwrap();
        let keys = NetworkKeys::new(dir.path());
        keys.store(network_id, &event_crypto::NetworkKey::generate())
            .unwrap();
        let store = EventStore::new(Arc::new(keys), Arc::new(Counters::default()));
        (dir, store)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opening_in_parallel_gives_what_opening_one_by_one_gives_in_order() {
        let net = "ab".repeat(16);
        let (_dir, store) = EventStore::with_one_network(&net);
        let mut envelopes: Vec<Envelope> = (0..200)
            .map(|i| {
                let plaintext = Value::map([("type", Value::from("message")), ("i", i.into())]);
                store.new_local_event(&net, &plaintext).unwrap()
            })
            .collect();
        // Some that must be refused, each for its own reason.
        envelopes[7].set(field::EVENT_CIPHERTEXT, vec![0u8; 80]);
        envelopes[100].set(field::NETWORK_ID, "cd".repeat(16));
        envelopes[150].set(field::EVENT_CIPHERTEXT, vec![0u8; MAX_EVENT_BYTES + 1]);

        let summary = |r: &Result<Opened, &'static str>| match r {
            Ok(o) => Ok((o.id, o.created_ms, o.event_type.clone())),
            Err(counter) => Err(*counter),
        };
        let refs: Vec<&Envelope> = envelopes.iter().collect();
        let together: Vec<_> = store.open_all(&refs).iter().map(summary).collect();
        let one_by_one: Vec<_> = refs.iter().map(|e| summary(&store.open(e))).collect();
        assert_eq!(together, one_by_one);
        assert_eq!(together[7], Err("drop_undecryptable_event"));
        assert_eq!(together[100], Err("drop_event_for_unknown_network"));
        assert_eq!(together[150], Err("drop_oversized_event"));
        assert_eq!(together.iter().filter(|r| r.is_ok()).count(), 197);
    }

    #[test]
    fn a_local_event_the_stores_would_drop_is_refused_where_it_is_made() {
        let net = "ab".repeat(16);
        let (_dir, store) = EventStore::with_one_network(&net);
        let text = |n: usize| {
            Value::map([
                ("type", Value::from("message")),
                ("text", Value::from("x".repeat(n).as_str())),
            ])
        };
        let err = store
            .new_local_event(&net, &text(MAX_EVENT_BYTES))
            .unwrap_err();
        assert!(err.contains("over the limit of 65536 bytes"), "{err}");
        let over: usize = err
            .split("at least ")
            .nth(1)
            .and_then(|s| s.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap();
        // Exactly that much shorter, it is made and stored.
        let fits = store
            .new_local_event(&net, &text(MAX_EVENT_BYTES - over))
            .unwrap();
        assert!(store.open(&fits).is_ok());
        assert!(store
            .new_local_event(&net, &text(MAX_EVENT_BYTES - over + 1))
            .is_err());
    }
}
