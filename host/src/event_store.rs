//! The event store: the host's own pipeline stage for `store_event`
//! envelopes, which carry one encrypted event (`network_id`,
//! `event_ciphertext`) from the network or from a local command.
//!
//! It decrypts the event with the network's key (so only members' events are
//! kept), derives its id from its bytes, stores it once (`events.event_id` is
//! the primary key: a duplicate stops here), and hands the decrypted event on
//! to the plugins under its own type, such as `message`. Plugins never see
//! network keys. Sync requests never come here: they carry no event.

use std::sync::Arc;

use quiet_plugin_api::{field, Envelope, Value};
use rusqlite::Connection;

use crate::{codec, counters::Counters, db, event_crypto, networks::NetworkKeys};

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
        conn: &Connection,
        envelope: &Envelope,
    ) -> rusqlite::Result<Option<Envelope>> {
        let (Some(network_id), Some(event)) = (
            envelope.str(field::NETWORK_ID),
            envelope.bytes(field::EVENT_CIPHERTEXT),
        ) else {
            return Ok(self.refuse("drop_malformed_store_event"));
        };
        if event.len() > MAX_EVENT_BYTES {
            return Ok(self.refuse("drop_oversized_event"));
        }
        let Some(key) = self.keys.get(network_id) else {
            return Ok(self.refuse("drop_event_for_unknown_network"));
        };
        let Ok((created_ms, plaintext)) = event_crypto::decrypt_event(&key, event) else {
            return Ok(self.refuse("drop_undecryptable_event"));
        };
        let Ok(plaintext) = codec::decode(&plaintext) else {
            return Ok(self.refuse("drop_malformed_event"));
        };
        let Some(event_type) = plaintext
            .get("type")
            .and_then(Value::as_str)
            .map(str::to_owned)
        else {
            return Ok(self.refuse("drop_malformed_event"));
        };
        let id = event_crypto::event_id(event);
        let inserted = conn
            .prepare_cached(
                "INSERT OR IGNORE INTO events(event_id, network_id, created_ms, event_type, event, received_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?
            .execute(rusqlite::params![&id[..], network_id, created_ms, event_type, event, db::now_ms()])?;
        if inserted == 0 {
            return Ok(self.refuse("duplicate_events"));
        }
        Ok(Some(
            Envelope::of_type(&event_type)
                .with(field::EVENT_ID, id)
                .with(field::NETWORK_ID, network_id)
                .with(field::EVENT_PLAINTEXT, plaintext)
                .with(field::EVENT_CIPHERTEXT, event),
        ))
    }

    fn refuse(&self, counter: &'static str) -> Option<Envelope> {
        self.counters.bump(counter);
        None
    }

    /// Encrypts a new local event of `network_id`, created now, and wraps it
    /// in a `store_event` envelope.
    pub fn new_local_event(&self, network_id: &str, plaintext: &Value) -> Result<Envelope, String> {
        let key = self
            .keys
            .get(network_id)
            .ok_or_else(|| format!("not a member of network {network_id}"))?;
        let event = event_crypto::encrypt_event(&key, db::now_ms(), &codec::encode(plaintext));
        Ok(Envelope::of_type(STORE_EVENT)
            .with(field::NETWORK_ID, network_id)
            .with(field::EVENT_CIPHERTEXT, event))
    }
}
