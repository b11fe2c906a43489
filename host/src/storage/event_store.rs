//! The event store: the host's own pipeline stage for `store_event`
//! envelopes, which carry one encrypted, signed event (`network_id`,
//! `event_ciphertext`) from the network or from a local command.
//!
//! It opens the event with the network's key (so only members' events are
//! kept), checks its author's signature (format 3,
//! [`crate::crypto::signed_event`]), stores it once
//! (`events.event_id`, a hash of what was signed, is the primary key: a
//! duplicate, even re-encrypted, stops here), and hands the decrypted event
//! on to the plugins under its own type, such as `message`, with `author`
//! set to the verified signer and `created_ms` to the signed time. Plugins
//! never see network keys, and no plugin can name an author. Sync requests
//! never come here: they carry no event.
//!
//! Signatures are checked in batches (about a fifth of a single check's
//! cost each), off the engine thread: the events of a sync response by
//! the network's reader as it accepts the frame
//! ([`EventStore::pre_open`], [`crate::storage::pre_opened`]), the rest on
//! a helper beside the engine ([`EventStore::open_all`]).

use std::sync::Arc;

use quiet_plugin_api::{
    abi_stable::std_types::{RString, RVec},
    field, Envelope, Value,
};
use rusqlite::{Connection, OptionalExtension};

use crate::{
    crypto::{
        entropy::BatchWeights,
        event_crypto::NetworkKey,
        identity::{HostIdentity, SigningIdentity, VerifyingKeys},
        signed_event::{self, EventError, EventId, SignedEvent, Unverified},
    },
    storage::{
        counters::Counters, db, networks::NetworkKeys, pre_opened::PreOpened,
        statements::Statements,
    },
};

/// An event opened and verified by [`EventStore::open`], not yet stored.
/// Its network id and bytes stay in its envelope until they are stored.
#[derive(Debug)]
pub struct Opened(SignedEvent);

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

/// Events whose signatures are checked in one batch by one thread in
/// [`EventStore::open_all`]: large enough that a batch costs little more
/// per signature than one of thousands (measured: 8.5–11 µs at 256, 7.6 at
/// 4,096, against 36–43 alone), small enough that both threads get work
/// from a sync response of a thousand.
const VERIFY_CHUNK: usize = 128;

/// The event type that asks the host to store an event.
pub const STORE_EVENT: &str = "store_event";

/// The field of a queued `store_event` that carries the CLI's
/// [`local_mac`](HostIdentity::local_mac) of its event.
pub const LOCAL_MAC: &str = "local_mac";

/// Marks a network for [`crate::storage::members`] to fold again.
pub const MARK_MEMBERSHIP: &str = "INSERT OR IGNORE INTO membership_dirty(network_id) VALUES (?1)";

/// The largest event accepted, in bytes.
pub const MAX_EVENT_BYTES: usize = 64 * 1024;

/// Stores events; see the [module docs](self).
#[derive(Clone)]
pub struct EventStore {
    keys: Arc<NetworkKeys>,
    /// This host, which signs the events plugins create; `None` on a store
    /// that only receives.
    me: Option<Arc<HostIdentity>>,
    /// Authors' verifying keys, derived from their peer ids once.
    authors: Arc<VerifyingKeys>,
    counters: Arc<Counters>,
    /// Events the network opened ahead ([`pre_open`](Self::pre_open)),
    /// shared by every clone of this store.
    pre_opened: Arc<PreOpened>,
}

impl EventStore {
    /// A store using `keys`, counting what it refuses in `counters`.
    pub fn new(keys: Arc<NetworkKeys>, counters: Arc<Counters>) -> Self {
        Self {
            keys,
            me: None,
            authors: Arc::default(),
            counters,
            pre_opened: Arc::default(),
        }
    }

    /// This store, signing the events plugins create
    /// ([`create_event`](Self::create_event)) as `me`.
    pub fn signing_as(mut self, me: Arc<HostIdentity>) -> Self {
        self.me = Some(me);
        self
    }

    /// [`new_local_event`](Self::new_local_event), signed by this host: an
    /// event a plugin creates through its `Context`, of any type but the
    /// host's own ([`HOSTS_PREFIX`](crate::encoding::event_type::HOSTS_PREFIX)).
    /// `deps` are 32 bytes each.
    pub fn create_event(
        &self,
        network_id: &str,
        event_type: &str,
        content: &Value,
        deps: &[u8],
    ) -> Result<(EventId, Envelope), String> {
        crate::encoding::event_type::check_not_hosts(event_type)?;
        let me = self
            .me
            .as_ref()
            .ok_or("this host has no identity to sign events with")?;
        let deps: Vec<EventId> = deps
            .chunks(32)
            .map(|d| d.try_into().map_err(|_| "a dep is a 32-byte event id"))
            .collect::<Result<_, _>>()?;
        self.new_local_event(me.signing(), network_id, event_type, content, &deps)
    }

    /// Stores the event in `envelope`. Returns the decrypted event to route
    /// on, or `None` when it was a duplicate or refused (and counted).
    pub fn store(
        &self,
        statements: &Statements<'_>,
        envelope: Envelope,
    ) -> rusqlite::Result<Option<Envelope>> {
        let opened = self.open(&envelope);
        self.store_opened(statements, &envelope, opened)
    }

    /// The part of storing that needs no database: decrypting, decoding,
    /// hashing the event and checking its signature. `Err` names the
    /// counter a refused event goes under.
    pub fn open(&self, envelope: &Envelope) -> Result<Opened, &'static str> {
        let unverified = self.open_unverified(envelope, &mut LastKey::default())?;
        unverified.verify().map(Opened).map_err(EventError::counter)
    }

    /// Whether the event in `envelope` is one this host's CLI signed and
    /// queued: it names us as author and carries our
    /// [`local_mac`](HostIdentity::local_mac), which only a holder of
    /// `identity.key` can make. Its signature is then ours, and not checked
    /// again.
    fn made_here(&self, envelope: &Envelope, event: &Unverified) -> bool {
        let (Some(me), Some(mac), Some(bytes)) = (
            &self.me,
            envelope.bytes(LOCAL_MAC),
            envelope.bytes(field::EVENT_CIPHERTEXT),
        ) else {
            return false;
        };
        event.author() == me.signing().peer_id() && me.is_local_mac(bytes, mac)
    }

    /// Everything [`open`](Self::open) checks but the signature.
    fn open_unverified(
        &self,
        envelope: &Envelope,
        last: &mut LastKey,
    ) -> Result<Unverified, &'static str> {
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
        signed_event::open_event_v3(network_id, key, event, &self.authors)
            .map_err(EventError::counter)
    }

    /// [`open`](Self::open) for each of `envelopes`, in order, with the
    /// signatures checked in batches of up to [`VERIFY_CHUNK`].
    fn open_chunk(
        &self,
        envelopes: &[&Envelope],
        last: &mut LastKey,
    ) -> Vec<Result<Opened, &'static str>> {
        let opened: Vec<Result<Unverified, &'static str>> = envelopes
            .iter()
            .map(|e| self.open_unverified(e, last))
            .collect();
        let (mut unverified, mut at) = (Vec::new(), Vec::new());
        let mut results: Vec<Option<Result<Opened, &'static str>>> = opened
            .into_iter()
            .zip(envelopes)
            .enumerate()
            .map(|(i, (o, envelope))| match o {
                Ok(u) if self.made_here(envelope, &u) => Some(Ok(Opened(u.stored()))),
                Ok(u) => {
                    unverified.push(u);
                    at.push(i);
                    None
                }
                Err(counter) => Some(Err(counter)),
            })
            .collect();
        let verified = signed_event::verify_batch(unverified, BatchWeights::new());
        for (i, v) in at.into_iter().zip(verified) {
            results[i] = Some(v.map(Opened).map_err(EventError::counter));
        }
        results
            .into_iter()
            .map(|r| r.expect("every event is opened or refused"))
            .collect()
    }

    /// [`open`](Self::open) for each of `envelopes`, in order.
    pub fn open_all(&self, envelopes: &[&Envelope]) -> Vec<Result<Opened, &'static str>> {
        let mut out = Vec::with_capacity(envelopes.len());
        let _: Result<(), ()> = self.open_each(envelopes, |_, opened| {
            out.push(opened);
            Ok(())
        });
        out
    }

    /// Opens, ahead of the engine, the events in `plaintext`, the payload
    /// of an authenticated frame about `network_id`: each byte string in
    /// it (in its map, or in a list in its map) shaped like a signed event,
    /// up to [`MAX_OPENED_AHEAD`]. Called by the network's reader thread,
    /// so that the checks of a sync response's events overlap the engine's
    /// storing of the one before; [`open_each`](Self::open_each) takes the
    /// results. See [`crate::storage::pre_opened`].
    pub fn pre_open(&self, network_id: &str, plaintext: &Value) {
        let events: Vec<&[u8]> = event_shaped(plaintext).take(MAX_OPENED_AHEAD).collect();
        let bytes = events.iter().map(|e| e.len()).sum();
        if events.is_empty() || !self.pre_opened.has_room(events.len(), bytes) {
            return;
        }
        let Some(key) = self.keys.get(network_id) else {
            return;
        };
        let (mut unverified, mut opened) = (Vec::new(), Vec::new());
        for event in events {
            match signed_event::open_event_v3(network_id, &key, event, &self.authors) {
                Ok(u) => {
                    unverified.push(u);
                    opened.push(event);
                }
                Err(e) => self.pre_opened.put(network_id, event, Err(e.counter())),
            }
        }
        let verified = signed_event::verify_batch(unverified, BatchWeights::new());
        for (event, outcome) in opened.into_iter().zip(verified) {
            let outcome = outcome.map_err(EventError::counter);
            self.pre_opened.put(network_id, event, outcome);
        }
    }

    /// What the network opened ahead of the event in `envelope`, if it did.
    fn take_pre_opened(&self, envelope: &Envelope) -> Option<Result<Opened, &'static str>> {
        let network_id = envelope.str(field::NETWORK_ID)?;
        let event = envelope.bytes(field::EVENT_CIPHERTEXT)?;
        let outcome = self.pre_opened.take(network_id, event)?;
        Some(outcome.map(Opened))
    }

    /// [`open`](Self::open) for each of `envelopes`, handed to `each` in
    /// order, on this thread, as soon as it is ready. What the network
    /// opened ahead ([`pre_open`](Self::pre_open)) is handed as it is;
    /// the rest is opened here, checked in batches on a helper thread. An
    /// error of `each` stops it.
    pub fn open_each<E>(
        &self,
        envelopes: &[&Envelope],
        mut each: impl FnMut(usize, Result<Opened, &'static str>) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut ahead: Vec<Option<Result<Opened, &'static str>>> =
            envelopes.iter().map(|e| self.take_pre_opened(e)).collect();
        if ahead.iter().all(Option::is_none) {
            return self.open_here(envelopes, each);
        }
        let rest: Vec<usize> = (0..envelopes.len())
            .filter(|&i| ahead[i].is_none())
            .collect();
        let rest_envelopes: Vec<&Envelope> = rest.iter().map(|&i| envelopes[i]).collect();
        // The next index to hand: those opened ahead go out between the
        // ones opened here, in order.
        let mut next = 0;
        self.open_here(&rest_envelopes, |j, opened| {
            for (i, opened) in ahead.iter_mut().enumerate().take(rest[j]).skip(next) {
                each(i, opened.take().expect("opened ahead"))?;
            }
            each(rest[j], opened)?;
            next = rest[j] + 1;
            Ok(())
        })?;
        for (i, opened) in ahead.iter_mut().enumerate().skip(next) {
            each(i, opened.take().expect("opened ahead"))?;
        }
        Ok(())
    }

    /// [`open`](Self::open) for each of `envelopes`, handed to `each` in
    /// order, on this thread, as soon as it is ready: a helper thread
    /// opens and checks signatures a chunk at a time (in batches, a fifth
    /// of the cost of single checks), at most two chunks ahead, while this
    /// thread stores what it was handed. So a receiver's engine runs only
    /// SQLite and plugins, and the other core checks signatures: during a
    /// catch-up they are the two largest parts of its work. The first
    /// chunk is small, so that storing starts at once. An error of `each`
    /// stops it.
    fn open_here<E>(
        &self,
        envelopes: &[&Envelope],
        mut each: impl FnMut(usize, Result<Opened, &'static str>) -> Result<(), E>,
    ) -> Result<(), E> {
        const ON_A_HELPER_FROM: usize = 64;
        if envelopes.len() < ON_A_HELPER_FROM {
            let opened = self.open_chunk(envelopes, &mut LastKey::default());
            return opened
                .into_iter()
                .enumerate()
                .try_for_each(|(i, o)| each(i, o));
        }
        let mut handed = 0;
        let result = std::thread::scope(|s| {
            let (tx, rx) = std::sync::mpsc::sync_channel(2);
            let helper = s.spawn(move || {
                let mut last = LastKey::default();
                let mut at = 0;
                for size in std::iter::once(VERIFY_CHUNK / 2).chain(std::iter::repeat(VERIFY_CHUNK))
                {
                    let end = (at + size).min(envelopes.len());
                    if at == end
                        || tx
                            .send(self.open_chunk(&envelopes[at..end], &mut last))
                            .is_err()
                    {
                        break;
                    }
                    at = end;
                }
            });
            for chunk in rx {
                for opened in chunk {
                    each(handed, opened)?;
                    handed += 1;
                }
            }
            // Joined here, so that a panic in it does not become ours.
            let _ = helper.join();
            Ok(())
        });
        result?;
        // Opening does not panic on any input (fuzzed); if it ever did on
        // the helper, what it had not handed over is opened here.
        for (i, envelope) in envelopes.iter().enumerate().skip(handed) {
            each(i, self.open(envelope))?;
        }
        Ok(())
    }

    /// Stores what [`open`](Self::open) made of the event in `envelope`;
    /// see [`store`](Self::store).
    pub fn store_opened(
        &self,
        statements: &Statements<'_>,
        envelope: &Envelope,
        opened: Result<Opened, &'static str>,
    ) -> rusqlite::Result<Option<Envelope>> {
        let Opened(event) = match opened {
            Ok(opened) => opened,
            Err(counter) => return Ok(self.refuse(counter)),
        };
        // Copied into the decrypted event (a thread may still be reading
        // the envelope); `open` checked both.
        let (Some(network_id), Some(bytes)) = (
            envelope.str(field::NETWORK_ID),
            envelope.bytes(field::EVENT_CIPHERTEXT),
        ) else {
            return Ok(self.refuse("drop_malformed_store_event"));
        };
        let (network_id, bytes) = (RString::from(network_id), RVec::from(bytes));
        let waits_for = self.unrouted(statements, &network_id, &event.deps)?;
        let inserted = statements
            .get(
                "INSERT OR IGNORE INTO events(event_id, network_id, created_ms, event_type, event, received_ms, routed)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6,
                         CASE WHEN ?7 THEN (SELECT COALESCE(MAX(routed), 0) + 1 FROM events) END)",
                Connection::prepare_cached,
            )?
            .execute(rusqlite::params![
                &event.id[..],
                network_id.as_str(),
                event.created_ms,
                event.event_type.as_str(),
                bytes.as_slice(),
                db::now_ms(),
                waits_for.is_empty(),
            ])?;
        if inserted == 0 {
            return Ok(self.refuse("duplicate_events"));
        }
        if !waits_for.is_empty() {
            // Stored, so that sync converges; routed when its deps are.
            let mut wait = statements.get(
                "INSERT OR IGNORE INTO event_waits(dep_id, event_id, network_id, since_ms)
                 VALUES (?1, ?2, ?3, ?4)",
                Connection::prepare_cached,
            )?;
            for dep in &waits_for {
                wait.execute(rusqlite::params![
                    &dep[..],
                    &event.id[..],
                    network_id.as_str(),
                    db::now_ms()
                ])?;
            }
            self.counters.bump("events_waited");
            return Ok(None);
        }
        self.release_waiters(statements, &event.id)?;
        self.mark_membership(statements, &network_id, &event.event_type)?;
        Ok(Some(routed(event, network_id, bytes)))
    }

    /// Which of `deps` have not been routed in `network_id`: not stored
    /// yet, waiting themselves, or of another network (never satisfied:
    /// an id covers its network, so such an event waits on every host).
    fn unrouted(
        &self,
        statements: &Statements<'_>,
        network_id: &str,
        deps: &[EventId],
    ) -> rusqlite::Result<Vec<EventId>> {
        if deps.is_empty() {
            return Ok(Vec::new());
        }
        let mut routed = statements.get(
            "SELECT routed IS NOT NULL FROM events WHERE event_id = ?1 AND network_id = ?2",
            Connection::prepare_cached,
        )?;
        let mut out = Vec::new();
        for dep in deps {
            let done: Option<bool> = routed
                .query_row(rusqlite::params![&dep[..], network_id], |r| r.get(0))
                .optional()?;
            if done != Some(true) {
                out.push(*dep);
            }
        }
        Ok(out)
    }

    /// Now that `id` is routed, its waiters no longer wait for it; those
    /// that wait for nothing else are ready ([`take_ready`](Self::take_ready)).
    fn release_waiters(&self, statements: &Statements<'_>, id: &EventId) -> rusqlite::Result<()> {
        let waiters: Vec<Vec<u8>> = statements
            .get(
                "DELETE FROM event_waits WHERE dep_id = ?1 RETURNING event_id",
                Connection::prepare_cached,
            )?
            .query_map([&id[..]], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        if waiters.is_empty() {
            return Ok(());
        }
        let mut ready = statements.get(
            "INSERT OR IGNORE INTO event_ready(event_id)
             SELECT ?1 WHERE NOT EXISTS (SELECT 1 FROM event_waits WHERE event_id = ?1)",
            Connection::prepare_cached,
        )?;
        for waiter in waiters {
            ready.execute([waiter])?;
        }
        Ok(())
    }

    /// Routes up to `limit` events whose deps have all been routed, oldest
    /// first: numbers them, releases their own waiters (which may then be
    /// ready in turn), and returns them decrypted, as `store` returns a new
    /// event. A cascade is so routed a batch at a time, in the engine's
    /// turns, however long it is.
    pub fn take_ready(
        &self,
        statements: &Statements<'_>,
        limit: usize,
    ) -> rusqlite::Result<Vec<Envelope>> {
        let ready: Vec<(Vec<u8>, String, Vec<u8>)> = statements
            .get(
                "SELECT r.event_id, e.network_id, e.event FROM event_ready r
                 JOIN events e ON e.event_id = r.event_id
                 ORDER BY r.event_id LIMIT ?1",
                Connection::prepare_cached,
            )?
            .query_map([limit as i64], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<Result<_, _>>()?;
        let mut out = Vec::with_capacity(ready.len());
        for (id, network_id, bytes) in ready {
            statements
                .get(
                    "DELETE FROM event_ready WHERE event_id = ?1",
                    Connection::prepare_cached,
                )?
                .execute([&id])?;
            let Some(envelope) = self.reopen(&network_id, bytes) else {
                continue;
            };
            statements
                .get(
                    "UPDATE events SET routed = (SELECT COALESCE(MAX(routed), 0) + 1 FROM events)
                     WHERE event_id = ?1",
                    Connection::prepare_cached,
                )?
                .execute([&id])?;
            let id = EventId::try_from(&id[..]).expect("a stored id is 32 bytes");
            self.release_waiters(statements, &id)?;
            self.mark_membership(statements, &network_id, envelope.event_type().unwrap_or(""))?;
            out.push(envelope);
        }
        Ok(out)
    }

    /// Routing a membership event (`quiet.*`) marks its network for
    /// [`crate::storage::members`] to fold again, in this transaction.
    fn mark_membership(
        &self,
        statements: &Statements<'_>,
        network_id: &str,
        event_type: &str,
    ) -> rusqlite::Result<()> {
        if event_type.starts_with(crate::encoding::event_type::HOSTS_PREFIX) {
            statements
                .get(MARK_MEMBERSHIP, Connection::prepare_cached)?
                .execute([network_id])?;
        }
        Ok(())
    }

    fn refuse(&self, counter: &'static str) -> Option<Envelope> {
        self.counters.bump(counter);
        None
    }

    /// A stored event of `network_id` whose bytes are `event`, decrypted to
    /// be routed as [`store`](Self::store) routes a new one, its signature
    /// not checked again: the store checked it, and only the host writes
    /// `events`. `None`, logged and counted, if it no longer opens (its
    /// network's key is gone).
    pub fn reopen(&self, network_id: &str, event: Vec<u8>) -> Option<Envelope> {
        match self.reopen_event(network_id, &event) {
            Ok(opened) => Some(routed(opened, network_id.into(), event.into())),
            Err(counter) => {
                tracing::warn!(
                    network = network_id,
                    "a stored event no longer opens ({counter}): it stays stored, unrouted"
                );
                self.counters.bump("drop_unopenable_stored_event");
                None
            }
        }
    }

    /// A stored event of `network_id`, opened as [`reopen`](Self::reopen)
    /// opens it, but not routed: `None` if it no longer opens.
    pub fn reopen_signed(&self, network_id: &str, event: &[u8]) -> Option<SignedEvent> {
        self.reopen_event(network_id, event).ok()
    }

    fn reopen_event(&self, network_id: &str, event: &[u8]) -> Result<SignedEvent, &'static str> {
        let key = self
            .keys
            .get(network_id)
            .ok_or("drop_event_for_unknown_network")?;
        signed_event::open_event_v3(network_id, &key, event, &self.authors)
            .map(Unverified::stored)
            .map_err(EventError::counter)
    }

    /// The host this store signs as, if it signs.
    pub fn me(&self) -> Option<&HostIdentity> {
        self.me.as_deref()
    }

    /// Signs and encrypts a new event of `event_type` in `network_id`,
    /// created now by `author`, depending on `deps`, whose content is the
    /// map `content`, and wraps it in a `store_event` envelope. Returns its
    /// id too. Refuses, in one line, what no host would store: content
    /// that is not a map or uses a key the host sets, a bad type, too many
    /// deps, or an event larger than [`MAX_EVENT_BYTES`].
    pub fn new_local_event(
        &self,
        author: &SigningIdentity,
        network_id: &str,
        event_type: &str,
        content: &Value,
        deps: &[EventId],
    ) -> Result<(EventId, Envelope), String> {
        let content = crate::encoding::codec::encode(content);
        self.check_local_event(network_id, event_type, &content, deps)?;
        self.seal_checked(author, network_id, event_type, &content, deps)
    }

    /// What [`new_local_event`](Self::new_local_event) refuses, of content
    /// already encoded, checked without signing: a command that queues many
    /// events refuses them all before it queues any.
    pub fn check_local_event(
        &self,
        network_id: &str,
        event_type: &str,
        content: &[u8],
        deps: &[EventId],
    ) -> Result<(), String> {
        if self.keys.get(network_id).is_none() {
            return Err(format!("not a member of network {network_id}"));
        }
        let len = signed_event::check_parts(network_id, event_type, deps, content)
            .map_err(|e| format!("cannot make this {event_type} event: {e}"))?;
        // Refused here, where it is made, rather than dropped by every
        // store that would receive it, this one included.
        if len > MAX_EVENT_BYTES {
            return Err(format!(
                "the event would be {len} bytes, over the limit of {MAX_EVENT_BYTES} bytes an event \
                 may take: shorten it by at least {} bytes",
                len - MAX_EVENT_BYTES
            ));
        }
        Ok(())
    }

    /// Signs and encrypts an event that
    /// [`check_local_event`](Self::check_local_event) accepted, created
    /// now, in a `store_event` envelope.
    pub fn seal_checked(
        &self,
        author: &SigningIdentity,
        network_id: &str,
        event_type: &str,
        content: &[u8],
        deps: &[EventId],
    ) -> Result<(EventId, Envelope), String> {
        let key = self
            .keys
            .get(network_id)
            .ok_or_else(|| format!("not a member of network {network_id}"))?;
        let (id, event) = signed_event::seal_event_v3(
            author,
            network_id,
            &key,
            db::now_ms(),
            event_type,
            deps,
            content,
        )
        .map_err(|e| format!("cannot make this {event_type} event: {e}"))?;
        let envelope = Envelope::of_type(STORE_EVENT)
            .with(field::NETWORK_ID, network_id)
            .with(field::EVENT_CIPHERTEXT, event);
        Ok((id, envelope))
    }
}

/// The most events of one frame [`EventStore::pre_open`] opens: a frame
/// holds up to 8 MiB, and a sync response up to a thousand events.
pub const MAX_OPENED_AHEAD: usize = 2048;

/// The byte strings in `payload` (in its map, or in a list in its map)
/// shaped like a signed event: its format byte where format 3 puts it, and
/// no longer than an event may be. What they hold is checked when they
/// are opened.
fn event_shaped(payload: &Value) -> impl Iterator<Item = &[u8]> {
    let fields = payload.as_map().unwrap_or_default();
    fields
        .iter()
        .flat_map(|f| match &f.value {
            Value::List(items) => items.as_slice(),
            v => std::slice::from_ref(v),
        })
        .filter_map(Value::as_bytes)
        .filter(|b| b.get(8) == Some(&signed_event::FORMAT_3) && b.len() <= MAX_EVENT_BYTES)
}

/// The envelope a stored event is routed on: its type, id, network, the
/// verified author and signed time, its deps if it has any, its content
/// and its bytes.
fn routed(event: SignedEvent, network_id: RString, bytes: RVec<u8>) -> Envelope {
    let author = event.author_peer_id();
    let SignedEvent {
        id,
        created_ms,
        event_type,
        deps,
        content,
        ..
    } = event;
    let mut envelope = Envelope::new()
        .with(field::EVENT_TYPE, event_type)
        .with(field::EVENT_ID, id)
        .with(field::NETWORK_ID, network_id)
        .with(field::AUTHOR, author)
        .with(field::CREATED_MS, created_ms);
    if !deps.is_empty() {
        let deps: Vec<Value> = deps.into_iter().map(Value::from).collect();
        envelope.set(field::DEPS, deps);
    }
    envelope
        .with(field::EVENT_PLAINTEXT, content)
        .with(field::EVENT_CIPHERTEXT, bytes)
}

/// For tests: a store with a fresh key of `network_id`, in a temporary
/// folder that lasts as long as the returned guard.
#[cfg(test)]
impl EventStore {
    pub(crate) fn with_one_network(network_id: &str) -> (tempfile::TempDir, EventStore) {
        let dir = tempfile::tempdir().unwrap();
        let keys = NetworkKeys::new(dir.path());
        keys.store(network_id, &NetworkKey::generate()).unwrap();
        let store = EventStore::new(Arc::new(keys), Arc::new(Counters::default()));
        (dir, store)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn author(dir: &tempfile::TempDir) -> HostIdentity {
        HostIdentity::load_or_create(dir.path()).unwrap()
    }

    fn message(text: &str) -> Value {
        Value::map([("text", Value::from(text))])
    }

    #[test]
    fn plugins_cannot_create_events_of_the_hosts_own_types() {
        let net = "ab".repeat(16);
        let (dir, store) = EventStore::with_one_network(&net);
        let store = store.signing_as(Arc::new(author(&dir)));
        let err = store
            .create_event(&net, "quiet.remove", &message("x"), &[])
            .unwrap_err();
        assert!(err.contains("are the host's own"), "{err}");
        assert!(store
            .create_event(&net, "quiet_remove", &message("x"), &[])
            .is_ok());
    }

    /// 600 events of `me`, of which these must be refused, each for its
    /// own reason, in different chunks of a batch check: 7 does not
    /// decrypt, 100 is of an unknown network, 150 is too large, and 300,
    /// 301 and 599 (the same bytes) are signed by another author who claims
    /// to be `me`, so they decrypt and fail the signature alone.
    fn mixed_events(store: &EventStore, net: &str, me: &HostIdentity) -> Vec<Envelope> {
        let mut envelopes: Vec<Envelope> = (0..600)
            .map(|i| {
                let (_, envelope) = store
                    .new_local_event(me.signing(), net, "message", &message(&i.to_string()), &[])
                    .unwrap();
                envelope
            })
            .collect();
        envelopes[7].set(field::EVENT_CIPHERTEXT, vec![0u8; 80]);
        envelopes[100].set(field::NETWORK_ID, "cd".repeat(16));
        envelopes[150].set(field::EVENT_CIPHERTEXT, vec![0u8; MAX_EVENT_BYTES + 1]);
        let other = HostIdentity::load_or_create(tempfile::tempdir().unwrap().path()).unwrap();
        let forged = forge_author(store, net, other.signing(), me.signing().peer_id());
        for i in [300, 301, 599] {
            envelopes[i].set(field::EVENT_CIPHERTEXT, forged.clone());
        }
        envelopes
    }

    type Summary = Result<(EventId, i64, [u8; 32], Value), &'static str>;

    fn summary(r: &Result<Opened, &'static str>) -> Summary {
        match r {
            Ok(Opened(e)) => Ok((e.id, e.created_ms, e.author, e.content.clone())),
            Err(counter) => Err(*counter),
        }
    }

    #[test]
    fn opening_in_parallel_gives_what_opening_one_by_one_gives_in_order() {
        let net = "ab".repeat(16);
        let (dir, store) = EventStore::with_one_network(&net);
        let me = author(&dir);
        let envelopes = mixed_events(&store, &net, &me);
        let refs: Vec<&Envelope> = envelopes.iter().collect();
        let together: Vec<_> = store.open_all(&refs).iter().map(summary).collect();
        let one_by_one: Vec<_> = refs.iter().map(|e| summary(&store.open(e))).collect();
        assert_eq!(together, one_by_one);
        assert_eq!(together[7], Err("drop_undecryptable_event"));
        assert_eq!(together[100], Err("drop_event_for_unknown_network"));
        assert_eq!(together[150], Err("drop_oversized_event"));
        for i in [300, 301, 599] {
            assert_eq!(together[i], Err("drop_bad_signature"));
        }
        assert_eq!(together.iter().filter(|r| r.is_ok()).count(), 594);
        assert_eq!(
            together[42].as_ref().unwrap().2,
            *me.signing().peer_id(),
            "the author is the signer"
        );
    }

    #[test]
    fn events_opened_ahead_are_taken_as_they_are_and_only_for_the_same_bytes() {
        let net = "ab".repeat(16);
        let (dir, store) = EventStore::with_one_network(&net);
        let me = author(&dir);
        let mut envelopes = mixed_events(&store, &net, &me);
        let bytes = |e: &Envelope| Value::from(e.bytes(field::EVENT_CIPHERTEXT).unwrap().to_vec());
        // A frame holding events 0..400 in a list, and 500 in a field of
        // its own; 450..600 arrive some other way.
        let frame = Value::map([
            (
                "events",
                Value::from(envelopes[..400].iter().map(bytes).collect::<Vec<_>>()),
            ),
            ("one", bytes(&envelopes[500])),
            ("not an event", Value::from(vec![1u8; 100])),
        ]);
        store.pre_open(&net, &frame);
        // 7 and 150 are not shaped like events, and 301 shares 300's
        // nonce. 100 is opened as of the frame's network, so it will not
        // be taken for its envelope's.
        assert_eq!(store.pre_opened.len(), 400 + 1 - 3);
        // Event 60 changed after it was opened ahead: the same nonce, other
        // bytes, so it is opened again, and refused.
        let mut changed = envelopes[60]
            .bytes(field::EVENT_CIPHERTEXT)
            .unwrap()
            .to_vec();
        *changed.last_mut().unwrap() ^= 1;
        envelopes[60].set(field::EVENT_CIPHERTEXT, changed);

        let refs: Vec<&Envelope> = envelopes.iter().collect();
        let mut order = Vec::new();
        let mut got = Vec::new();
        let _: Result<(), ()> = store.open_each(&refs, |i, opened| {
            order.push(i);
            got.push(summary(&opened));
            Ok(())
        });
        assert_eq!(order, (0..600).collect::<Vec<_>>(), "handed in order");
        let one_by_one: Vec<_> = refs.iter().map(|e| summary(&store.open(e))).collect();
        assert_eq!(got, one_by_one);
        assert_eq!(got[60], Err("drop_undecryptable_event"));
        assert_eq!(got[300], Err("drop_bad_signature"));
        // What was not taken (60's and 100's entries) stays until it is
        // let go of; nothing else is left.
        assert_eq!(store.pre_opened.len(), 2);
    }

    fn forge_author(
        store: &EventStore,
        net: &str,
        signer: &SigningIdentity,
        claimed: &[u8; 32],
    ) -> Vec<u8> {
        let (_, envelope) = store
            .new_local_event(signer, net, "message", &message("forged"), &[])
            .unwrap();
        let event = envelope.bytes(field::EVENT_CIPHERTEXT).unwrap();
        let key = store.keys.get(net).unwrap();
        let mut inner = signed_event::open_inner(&key, event).unwrap();
        inner[signed_event::AUTHOR_IN_INNER].copy_from_slice(claimed);
        let created_ms = i64::from_be_bytes(event[..8].try_into().unwrap());
        signed_event::seal_inner(&key, created_ms, &inner)
    }

    #[test]
    fn only_a_local_mac_made_with_this_hosts_key_spares_checking_its_signature() {
        let net = "ab".repeat(16);
        let (dir, store) = EventStore::with_one_network(&net);
        let me = Arc::new(author(&dir));
        let store = store.signing_as(me.clone());
        let other = HostIdentity::load_or_create(tempfile::tempdir().unwrap().path()).unwrap();
        // Naming us, signed by another: only a holder of our key could vouch
        // for it, and then it could sign it too.
        let forged = forge_author(&store, &net, other.signing(), me.signing().peer_id());
        let queued = |mac: [u8; 32]| {
            Envelope::of_type(STORE_EVENT)
                .with(field::NETWORK_ID, net.as_str())
                .with(field::EVENT_CIPHERTEXT, forged.clone())
                .with(LOCAL_MAC, mac)
        };
        let ours = queued(me.local_mac(&forged));
        let theirs = queued(other.local_mac(&forged));
        let none = Envelope::of_type(STORE_EVENT)
            .with(field::NETWORK_ID, net.as_str())
            .with(field::EVENT_CIPHERTEXT, forged.clone());
        let opened = store.open_all(&[&ours, &theirs, &none]);
        assert!(opened[0].is_ok(), "our MAC: not checked again");
        assert_eq!(opened[1].as_ref().err(), Some(&"drop_bad_signature"));
        assert_eq!(opened[2].as_ref().err(), Some(&"drop_bad_signature"));
    }

    #[test]
    fn the_routed_event_names_its_verified_author_and_signed_time() {
        let net = "ab".repeat(16);
        let (dir, store) = EventStore::with_one_network(&net);
        let me = author(&dir);
        let conn = db::open(dir.path()).unwrap();
        let statements = Statements::new(&conn);
        let (id, envelope) = store
            .new_local_event(me.signing(), &net, "message", &message("hi"), &[])
            .unwrap();
        let routed = store.store(&statements, envelope.clone()).unwrap().unwrap();
        assert_eq!(routed.event_type(), Some("message"));
        assert_eq!(routed.bytes(field::EVENT_ID), Some(&id[..]));
        assert_eq!(routed.author(), Some(me.peer_id().as_str()));
        assert_eq!(
            routed.created_ms(),
            Some(i64::from_be_bytes(id[..8].try_into().unwrap()))
        );
        assert_eq!(routed.plaintext(), Some(&message("hi")));
        assert_eq!(routed.get(field::DEPS), None, "no deps, no field");
        // Stored once: the same event again is a duplicate.
        assert!(store.store(&statements, envelope).unwrap().is_none());
    }

    /// A store with one network, its database, and a way to make events of
    /// it depending on others.
    fn deps_setup() -> (tempfile::TempDir, EventStore, Connection, String) {
        let net = "ab".repeat(16);
        let (dir, store) = EventStore::with_one_network(&net);
        let conn = db::open(dir.path()).unwrap();
        (dir, store, conn, net)
    }

    fn event_after(
        store: &EventStore,
        me: &HostIdentity,
        net: &str,
        text: &str,
        deps: &[EventId],
    ) -> (EventId, Envelope) {
        store
            .new_local_event(me.signing(), net, "message", &message(text), deps)
            .unwrap()
    }

    fn routed_number(conn: &Connection, id: &EventId) -> Option<i64> {
        conn.query_row(
            "SELECT routed FROM events WHERE event_id = ?1",
            [&id[..]],
            |r| r.get(0),
        )
        .unwrap()
    }

    #[test]
    fn an_event_is_stored_at_once_and_routed_only_after_its_deps() {
        let (dir, store, conn, net) = deps_setup();
        let me = author(&dir);
        let statements = Statements::new(&conn);
        let (a, a_env) = event_after(&store, &me, &net, "a", &[]);
        let (b, b_env) = event_after(&store, &me, &net, "b", &[a]);
        let (c, c_env) = event_after(&store, &me, &net, "c", &[a, b]);
        // C and B arrive first: stored, not routed, waiting.
        assert!(store.store(&statements, c_env).unwrap().is_none());
        assert!(store.store(&statements, b_env).unwrap().is_none());
        assert_eq!(routed_number(&conn, &c), None);
        let waits = |sql: &str| conn.query_row(sql, [], |r| r.get::<_, i64>(0)).unwrap();
        assert_eq!(waits("SELECT COUNT(*) FROM event_waits"), 3);
        assert!(store.take_ready(&statements, 10).unwrap().is_empty());
        // A comes: routed at once; B is ready, and once B is routed, C.
        let routed_a = store.store(&statements, a_env).unwrap().unwrap();
        assert_eq!(routed_a.event_id(), Some(quiet_plugin_api::EventId(a)));
        let ready = store.take_ready(&statements, 10).unwrap();
        assert_eq!(ready.len(), 1);
        assert_eq!(ready[0].event_id(), Some(quiet_plugin_api::EventId(b)));
        assert_eq!(ready[0].deps(), [quiet_plugin_api::EventId(a)]);
        assert_eq!(ready[0].author(), Some(me.peer_id().as_str()));
        let ready = store.take_ready(&statements, 10).unwrap();
        assert_eq!(ready.len(), 1);
        assert_eq!(ready[0].event_id(), Some(quiet_plugin_api::EventId(c)));
        assert!(store.take_ready(&statements, 10).unwrap().is_empty());
        // Routed in dependency order, whatever the order of arrival.
        let order: Vec<i64> = [a, b, c]
            .iter()
            .map(|id| routed_number(&conn, id).unwrap())
            .collect();
        assert!(order[0] < order[1] && order[1] < order[2], "{order:?}");
        assert_eq!(waits("SELECT COUNT(*) FROM event_waits"), 0);
        assert_eq!(waits("SELECT COUNT(*) FROM event_ready"), 0);
        crate::storage::counters::write(&conn, &store.counters.take()).unwrap();
        assert_eq!(
            waits("SELECT value FROM counters WHERE name = 'events_waited'"),
            2
        );
    }

    #[test]
    fn a_dep_that_never_comes_or_is_of_another_network_keeps_an_event_waiting() {
        let (dir, store, conn, net) = deps_setup();
        let other = "cd".repeat(16);
        store.keys.store(&other, &NetworkKey::generate()).unwrap();
        let me = author(&dir);
        let statements = Statements::new(&conn);
        let (elsewhere, elsewhere_env) = event_after(&store, &me, &other, "there", &[]);
        assert!(store.store(&statements, elsewhere_env).unwrap().is_some());
        let (_, across) = event_after(&store, &me, &net, "across", &[elsewhere]);
        let (_, missing) = event_after(&store, &me, &net, "missing", &[[7; 32]]);
        assert!(store.store(&statements, across).unwrap().is_none());
        assert!(store.store(&statements, missing).unwrap().is_none());
        assert!(store.take_ready(&statements, 10).unwrap().is_empty());
        let stored_unrouted: i64 = conn
            .query_row(
                "SELECT COUNT(*) FROM events WHERE routed IS NULL",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(stored_unrouted, 2, "kept, never dropped");
    }

    #[test]
    fn a_local_event_the_stores_would_drop_is_refused_where_it_is_made() {
        let net = "ab".repeat(16);
        let (dir, store) = EventStore::with_one_network(&net);
        let me = author(&dir);
        let make = |content: &Value| {
            store
                .new_local_event(me.signing(), &net, "message", content, &[])
                .map(|(_, envelope)| envelope)
        };
        let text = |n: usize| message(&"x".repeat(n));
        let err = make(&text(MAX_EVENT_BYTES)).unwrap_err();
        assert!(err.contains("over the limit of 65536 bytes"), "{err}");
        let over: usize = err
            .split("at least ")
            .nth(1)
            .and_then(|s| s.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap();
        // Exactly that much shorter, it is made and stored.
        let fits = make(&text(MAX_EVENT_BYTES - over)).unwrap();
        assert!(store.open(&fits).is_ok());
        assert!(make(&text(MAX_EVENT_BYTES - over + 1)).is_err());
        // Content may not name an author, nor be anything but a map.
        let claims = Value::map([("text", Value::from("hi")), ("author", Value::from("x"))]);
        let err = make(&claims).unwrap_err();
        assert!(err.contains("`author`"), "{err}");
        assert!(make(&Value::from("just text")).is_err());
    }
}
