//! The envelope pipeline: every envelope visits the handlers that want it,
//! and what they return goes round again until nothing is left.
//!
//! Order, for each envelope taken first-in first-out from the queue:
//! 0. a `store_event` envelope goes through the host's event store first,
//!    which decrypts, dedups and stores it, and continues with the decrypted
//!    event under its own type (a duplicate stops there);
//! 1. an envelope marked `is_outgoing` leaves through the [`Outbox`] (event
//!    crypto, transit crypto and the network live behind it) and visits no
//!    handler;
//! 2. otherwise it visits each handler subscribed to its `event_type`, in
//!    registry order (plugins by file name, then handlers as declared), and
//!    each whose `filter` accepts it runs `process` inside a savepoint;
//! 3. envelopes a handler returns join the back of the queue, one hop further
//!    from where they started.
//!
//! `store_event`s that arrive together (a sync response holds a thousand)
//! are stored together, in queue order, as the event store's helper thread
//! opens and checks them (so the engine runs only SQLite and plugins), and
//! then handed to their
//! handlers under **one** savepoint rather than one per call, which was 6 %
//! of a receiver's instructions per event. That savepoint is optimistic: if
//! any call of the batch fails, or anything would become a dead letter, the
//! batch's handler work is rolled back and run again one call per savepoint,
//! so that what ends up committed is what per-call savepoints would have
//! committed.
//!
//! Nothing is dropped silently. A handler that fails or panics has its
//! savepoint rolled back and the envelope goes to `dead_letters` with the
//! handler and the reason; so does an envelope no handler subscribes to, one
//! the outbox refuses, and one past the hop limit (naming the handler that
//! keeps producing them). The caller owns the transaction around all of it.

use std::{cell::RefCell, collections::VecDeque, sync::Arc};

use arc_swap::ArcSwap;
use quiet_plugin_api::{abi_stable::std_types::RVec, field, Envelope, Identity};
use rusqlite::Connection;

use crate::{
    encoding::json::envelope_to_json,
    engine::{cursors::Cursors, jobs::JobsConfig},
    plugins::{
        call_budget,
        context::HostContext,
        handler::{CallError, LoadedHandler},
        registry::Registry,
    },
    storage::{
        db,
        event_store::{EventStore, STORE_EVENT},
        members,
        statements::Statements,
    },
};

/// How many times envelopes may beget envelopes before the chain is cut.
pub const DEFAULT_HOP_LIMIT: u32 = 16;

/// How many envelopes one run (one job run, one batch of frames) may handle.
pub const MAX_ENVELOPES_PER_RUN: usize = 100_000;

/// Dead letters of one run that are logged one by one; the rest are
/// counted in one line, so that a flood of them cannot flood the log (the
/// table and `status` still have each).
const LOGGED_DEAD_LETTERS: usize = 10;

/// Where outgoing envelopes go.
///
/// Sending happens in two steps so that nothing leaves the host for work
/// that is then rolled back: `send` checks and prepares an envelope inside
/// the transaction, and `flush` releases what was prepared once the
/// transaction has committed (`discard` drops it if it did not).
pub trait Outbox {
    /// Takes one outgoing envelope, or says why it cannot.
    fn send(&self, envelope: Envelope) -> Result<(), String>;

    /// Releases what `send` prepared; called after a commit.
    fn flush(&self) {}

    /// Drops what `send` prepared; called after a rollback.
    fn discard(&self) {}
}

/// The outbox of a host with no transport: it refuses, so that outgoing
/// envelopes show up in `dead_letters` instead of vanishing.
pub struct NoTransport;

impl Outbox for NoTransport {
    fn send(&self, _: Envelope) -> Result<(), String> {
        Err("no transport is configured for outgoing envelopes".into())
    }
}

/// What one run of the pipeline did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    /// Successful `process` calls.
    pub processed: usize,
    /// Envelopes sent to the outbox.
    pub sent: usize,
    /// Envelopes that went to `dead_letters`.
    pub dead_letters: usize,
}

/// Who produced an envelope, for error messages.
#[derive(Clone, Debug)]
pub struct Source {
    /// The plugin, if the envelope came from one.
    pub plugin: Option<String>,
    /// The handler, a job, or a host component such as `network`.
    pub handler: String,
}

struct Queued {
    envelope: Envelope,
    hops: u32,
    /// Shared by everything one call produced: a sync response yields a
    /// thousand events, and a copy of the names each was two allocations.
    source: Arc<Source>,
    /// A stored event the event store routes: offered only to the handlers
    /// that are caught up with the stored events of its type.
    stored: bool,
}

impl Queued {
    fn new(envelope: Envelope, hops: u32, source: Arc<Source>) -> Self {
        Self {
            envelope,
            hops,
            source,
            stored: false,
        }
    }

    fn is_event(&self) -> bool {
        self.envelope.event_type() == Some(STORE_EVENT)
    }
}

/// The most `store_event` envelopes stored together; see
/// [`Pipeline::step_events`].
const OPEN_AHEAD: usize = 1024;

/// Events whose deps have all been routed that one run routes at most, and
/// how many it takes from the event store at a time.
const READY_PER_RUN: usize = 1_000;
const READY_BATCH: usize = 256;

/// How an envelope is handed to its subscribers.
#[derive(Clone, Copy)]
struct Delivery {
    isolation: Isolation,
    /// A stored event: see [`Queued::stored`].
    stored: bool,
}

/// How a handler call's writes are kept apart from the others'.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Isolation {
    /// In a savepoint of its own: a failed call is rolled back alone and
    /// its envelope becomes a dead letter.
    Own,
    /// In the savepoint of its batch: a failed call abandons the batch.
    Shared,
}

/// Why a batch's shared savepoint was rolled back.
enum Batch {
    /// A call failed, or something would have become a dead letter.
    Abandoned,
    /// The database failed: the whole unit fails.
    Sql(rusqlite::Error),
}

impl From<rusqlite::Error> for Batch {
    fn from(e: rusqlite::Error) -> Self {
        Batch::Sql(e)
    }
}

/// What a pipeline run uses besides the database and the handlers.
pub struct Services {
    /// This host's public identity, lent to handlers.
    pub identity: Identity,
    /// Where outgoing envelopes go.
    pub outbox: Box<dyn Outbox + Send>,
    /// The event store for `store_event` envelopes, on a host that keeps
    /// events.
    pub store: Option<EventStore>,
    /// The configuration the reloader keeps current, for the plugins'
    /// settings: a run reads it once, so that its calls agree.
    pub config: Arc<ArcSwap<JobsConfig>>,
}

/// One pipeline run over a borrowed connection and registry generation.
pub struct Pipeline<'a> {
    conn: &'a Connection,
    /// Shared by the run's handler calls and its event store.
    statements: Statements<'a>,
    registry: &'a Registry,
    services: &'a Services,
    /// Whose settings the run's calls get.
    config: Arc<JobsConfig>,
    hop_limit: u32,
    /// Where handlers stand in the stored events, once the run routes one.
    cursors: RefCell<Option<Cursors>>,
}

impl Services {
    /// Runs `f` in a write transaction, then sends what it queued for the
    /// network if the transaction committed, or drops it if not. On an
    /// engine the watchdog abandoned, starts no transaction and fails.
    pub fn write_tx<T, E: From<rusqlite::Error>>(
        &self,
        conn: &Connection,
        f: impl FnOnce(&Connection) -> Result<T, E>,
    ) -> Result<T, E> {
        call_budget::check_not_abandoned()?;
        let result = db::with_write_tx(conn, f);
        match result {
            Ok(_) => self.outbox.flush(),
            Err(_) => self.outbox.discard(),
        }
        result
    }
}

impl<'a> Pipeline<'a> {
    /// A pipeline on `conn`, which must be inside a write transaction.
    pub fn new(conn: &'a Connection, registry: &'a Registry, services: &'a Services) -> Self {
        Self {
            conn,
            statements: Statements::new(conn),
            registry,
            services,
            config: services.config.load_full(),
            hop_limit: DEFAULT_HOP_LIMIT,
            cursors: RefCell::new(None),
        }
    }

    /// Sets the hop limit.
    pub fn hop_limit(mut self, limit: u32) -> Self {
        self.hop_limit = limit;
        self
    }

    /// Runs `envelopes`, produced by `source`, until the queue is empty.
    pub fn run(
        &self,
        envelopes: impl IntoIterator<Item = Envelope>,
        source: Source,
    ) -> rusqlite::Result<Report> {
        self.run_queue(envelopes.into_iter().map(unvouched), source)
    }

    /// [`run`](Self::run) for envelopes as the event store routes them,
    /// `author` included: for test hosts, which play the event store
    /// (`TestHost` in quiet-plugin-test-support). A real host sets `author`
    /// only from a verified signature, so never call this with envelopes
    /// from a peer, a plugin or a command.
    pub fn run_as_routed(
        &self,
        envelopes: impl IntoIterator<Item = Envelope>,
        source: Source,
    ) -> rusqlite::Result<Report> {
        self.run_queue(envelopes, source)
    }

    fn run_queue(
        &self,
        envelopes: impl IntoIterator<Item = Envelope>,
        source: Source,
    ) -> rusqlite::Result<Report> {
        let source = Arc::new(source);
        let queue: VecDeque<Queued> = envelopes
            .into_iter()
            .map(|envelope| Queued::new(envelope, 0, source.clone()))
            .collect();
        self.drain(queue, Report::default())
    }

    /// Offers `events`, stored events as the event store routes them, to
    /// `handler` alone, in order, each call in a savepoint of its own, and
    /// runs what they produce: the replayer's turn (`engine::replay`).
    pub fn replay(
        &self,
        handler: &LoadedHandler,
        events: impl IntoIterator<Item = Envelope>,
    ) -> rusqlite::Result<Report> {
        let (mut queue, mut report) = (VecDeque::new(), Report::default());
        self.cursors()?;
        for event in events {
            self.offer(handler, &event, 0, Isolation::Own, &mut queue, &mut report)?;
        }
        self.drain(queue, report)
    }

    /// Calls `handler`'s `reset` in a savepoint: its projection is to be
    /// rebuilt from the stored events. A failed reset is logged, and the
    /// replay goes on (projections are idempotent).
    pub fn reset(&self, handler: &LoadedHandler) -> rusqlite::Result<()> {
        let mut ctx = HostContext::new(
            &self.statements,
            &handler.plugin,
            &self.services.identity,
            self.services.store.as_ref(),
        );
        let settings = self.config.settings_of(&handler.plugin);
        match db::with_savepoint(self.conn, || handler.reset(&mut ctx, settings)) {
            Ok(()) => Ok(()),
            Err(CallError::Sql(e)) => Err(e),
            Err(CallError::Handler(e)) => {
                tracing::warn!(handler = %handler.name, "reset failed, replaying anyway: {e}");
                Ok(())
            }
        }
    }

    /// Runs the queue until it is empty.
    fn drain(&self, mut queue: VecDeque<Queued>, mut report: Report) -> rusqlite::Result<Report> {
        let mut steps = 0;
        let mut ready_budget = READY_PER_RUN;
        loop {
            let Some(item) = queue.pop_front() else {
                // Events whose deps have now all been routed, a batch at a
                // time: a long cascade continues in the next runs.
                match self.take_ready(&mut ready_budget)? {
                    Some(ready) => {
                        queue.extend(ready);
                        continue;
                    }
                    None => break,
                }
            };
            steps += 1;
            if steps > MAX_ENVELOPES_PER_RUN {
                // The hop limit bounds depth; this bounds breadth, so that one
                // unit of work cannot hold the write lock and memory without
                // end. One dead letter stands for all that was cut.
                let reason = format!(
                    "more than {MAX_ENVELOPES_PER_RUN} envelopes in one run: {} cut, the last from handler '{}'",
                    queue.len() + 1,
                    item.source.handler
                );
                self.dead_letter(&mut report, &item.source, &reason, &item.envelope)?;
                break;
            }
            if !item.is_event() || self.services.store.is_none() {
                self.step(item, &mut queue, &mut report)?;
                continue;
            }
            // The events right behind it (a sync response holds a thousand),
            // within the run's budget, stored together.
            let mut batch = vec![item];
            while steps < MAX_ENVELOPES_PER_RUN
                && batch.len() < OPEN_AHEAD
                && queue.front().is_some_and(Queued::is_event)
            {
                batch.extend(queue.pop_front());
                steps += 1;
            }
            self.step_events(batch, &mut queue, &mut report)?;
        }
        if let Some(cursors) = self.cursors.borrow().as_ref() {
            cursors.advance(&self.statements)?;
        }
        // Once a run, however many membership events it routed.
        if let Some(store) = &self.services.store {
            members::refold(self.conn, store)?;
        }
        if report.dead_letters > LOGGED_DEAD_LETTERS {
            tracing::warn!(
                "{} dead letters in one run, {} of them not logged one by one (see `quiet-host status`)",
                report.dead_letters,
                report.dead_letters - LOGGED_DEAD_LETTERS
            );
        }
        Ok(report)
    }

    /// Up to `budget` events made ready to route (their last dep was
    /// routed), queued as the event store routes a new event; `None` when
    /// there are none or the budget is spent.
    fn take_ready(&self, budget: &mut usize) -> rusqlite::Result<Option<Vec<Queued>>> {
        let Some(store) = &self.services.store else {
            return Ok(None);
        };
        if *budget == 0 {
            return Ok(None);
        }
        self.cursors()?;
        let ready = store.take_ready(&self.statements, (*budget).min(READY_BATCH))?;
        if ready.is_empty() {
            return Ok(None);
        }
        *budget = budget.saturating_sub(ready.len());
        let source = Arc::new(Source {
            plugin: None,
            handler: "event store".into(),
        });
        Ok(Some(
            ready
                .into_iter()
                .map(|envelope| Queued {
                    stored: true,
                    ..Queued::new(envelope, 0, source.clone())
                })
                .collect(),
        ))
    }

    /// Takes one envelope through the pipeline: the event store first if it
    /// is a `store_event`, then the outbox or its handlers.
    fn step(
        &self,
        item: Queued,
        queue: &mut VecDeque<Queued>,
        report: &mut Report,
    ) -> rusqlite::Result<()> {
        // Opened events go to `step_events` instead.
        let Queued {
            mut envelope,
            hops,
            source,
            mut stored,
            ..
        } = item;
        if envelope.event_type() == Some(STORE_EVENT) {
            let Some(store) = &self.services.store else {
                return self.dead_letter(
                    report,
                    &source,
                    "this host has no event store",
                    &envelope,
                );
            };
            self.cursors()?;
            envelope = match store.store(&self.statements, envelope)? {
                Some(decrypted) => decrypted,
                // A duplicate or a refused event, counted by the store.
                None => return Ok(()),
            };
            stored = true;
        }
        let delivery = Delivery {
            isolation: Isolation::Own,
            stored,
        };
        self.deliver(&envelope, hops, &source, delivery, queue, report)
            .map(drop)
    }

    /// Stores a batch of `store_event`s in queue order, then hands
    /// the new ones to their handlers under one shared savepoint; see the
    /// module docs.
    fn step_events(
        &self,
        batch: Vec<Queued>,
        queue: &mut VecDeque<Queued>,
        report: &mut Report,
    ) -> rusqlite::Result<()> {
        let Some(store) = &self.services.store else {
            // Batches are made only on a host with an event store.
            for item in batch {
                self.step(item, queue, report)?;
            }
            return Ok(());
        };
        self.cursors()?;
        // Stored as the event store's helper thread opens them.
        let envelopes: Vec<&Envelope> = batch.iter().map(|q| &q.envelope).collect();
        let mut decrypted = Vec::with_capacity(batch.len());
        store.open_each(&envelopes, |i, opened| {
            // `None`: a duplicate or a refused event, counted by the store.
            if let Some(envelope) = store.store_opened(&self.statements, envelopes[i], opened)? {
                decrypted.push((envelope, batch[i].hops, batch[i].source.clone()));
            }
            Ok::<(), rusqlite::Error>(())
        })?;
        if decrypted.len() > 1 {
            let (queued, before) = (queue.len(), report.clone());
            let shared = db::with_savepoint(self.conn, || {
                for (envelope, hops, source) in &decrypted {
                    let shared = Delivery {
                        isolation: Isolation::Shared,
                        stored: true,
                    };
                    let done = self.deliver(envelope, *hops, source, shared, queue, report)?;
                    if !done {
                        return Err(Batch::Abandoned);
                    }
                }
                Ok(())
            });
            match shared {
                Ok(()) => return Ok(()),
                Err(Batch::Sql(e)) => return Err(e),
                // Rolled back: run the batch again, one savepoint per call.
                Err(Batch::Abandoned) => {
                    queue.truncate(queued);
                    *report = before;
                }
            }
        }
        for (envelope, hops, source) in &decrypted {
            let own = Delivery {
                isolation: Isolation::Own,
                stored: true,
            };
            self.deliver(envelope, *hops, source, own, queue, report)?;
        }
        Ok(())
    }

    /// Sends `envelope` out if it is outgoing, or else hands it to each
    /// handler that subscribes to it (for a stored event, each that is
    /// caught up with its type: the replayer offers it to the others, in
    /// order). Under [`Isolation::Shared`] it stops and returns `false`
    /// where it would send, or write a dead letter.
    fn deliver(
        &self,
        envelope: &Envelope,
        hops: u32,
        source: &Source,
        delivery: Delivery,
        queue: &mut VecDeque<Queued>,
        report: &mut Report,
    ) -> rusqlite::Result<bool> {
        let own = delivery.isolation == Isolation::Own;
        if envelope.is_outgoing() {
            if !own {
                return Ok(false);
            }
            match self.services.outbox.send(envelope.clone()) {
                Ok(()) => report.sent += 1,
                Err(reason) => self.dead_letter(report, source, &reason, envelope)?,
            }
            return Ok(true);
        }
        let event_type = envelope.event_type().unwrap_or("");
        let subscribers = self.registry.subscribers(event_type);
        if subscribers.is_empty() {
            // A stored event waits in the store for a plugin that wants it
            // (its cursor starts at the beginning): not a dead letter.
            if own && !delivery.stored {
                let reason = format!("no loaded handler subscribes to event_type '{event_type}'");
                self.dead_letter(report, source, &reason, envelope)?;
            }
            return Ok(own);
        }
        for handler in subscribers {
            if delivery.stored && self.is_behind(handler, event_type) {
                continue;
            }
            if !self.offer(handler, envelope, hops, delivery.isolation, queue, report)? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Hands `envelope` to `handler`: its `filter`, then its `process`, whose
    /// envelopes join the queue. Returns `false` where a shared batch must
    /// be abandoned (a failure, or too many hops).
    fn offer(
        &self,
        handler: &LoadedHandler,
        envelope: &Envelope,
        hops: u32,
        isolation: Isolation,
        queue: &mut VecDeque<Queued>,
        report: &mut Report,
    ) -> rusqlite::Result<bool> {
        let own = isolation == Isolation::Own;
        let settings = self.config.settings_of(&handler.plugin);
        // Named only when something needs the name: most calls produce
        // nothing and fail nothing.
        let here = || Source {
            plugin: Some(handler.plugin.to_string()),
            handler: handler.name.clone(),
        };
        match handler.filter(envelope, settings) {
            Ok(true) => {}
            Ok(false) => return Ok(true),
            Err(CallError::Sql(e)) => return Err(e),
            Err(CallError::Handler(_)) if !own => return Ok(false),
            Err(CallError::Handler(e)) => {
                self.dead_letter(report, &here(), &format!("filter failed: {e}"), envelope)?;
                return Ok(true);
            }
        }
        let mut ctx = HostContext::new(
            &self.statements,
            &handler.plugin,
            &self.services.identity,
            self.services.store.as_ref(),
        );
        let outcome = match isolation {
            Isolation::Own => {
                db::with_savepoint(self.conn, || handler.process(envelope, &mut ctx, settings))
            }
            Isolation::Shared => handler.process(envelope, &mut ctx, settings),
        };
        let produced = match outcome {
            Ok(produced) => with_created(ctx.take_created(), produced),
            Err(CallError::Sql(e)) => return Err(e),
            Err(CallError::Handler(_)) if !own => return Ok(false),
            Err(CallError::Handler(e)) => {
                self.dead_letter(report, &here(), &e, envelope)?;
                return Ok(true);
            }
        };
        report.processed += 1;
        if !produced.is_empty() && hops + 1 > self.hop_limit {
            if !own {
                return Ok(false);
            }
            let reason = format!(
                "hop limit {} reached: handler '{}' (plugin '{}') keeps producing envelopes",
                self.hop_limit, handler.name, handler.plugin
            );
            let here = here();
            for env in &produced {
                self.dead_letter(report, &here, &reason, env)?;
            }
            return Ok(true);
        }
        if !produced.is_empty() {
            let here = Arc::new(here());
            queue.extend(
                produced
                    .into_iter()
                    .map(|envelope| Queued::new(from_plugin(envelope), hops + 1, here.clone())),
            );
        }
        Ok(true)
    }

    /// Loads, once per run and before its first stored event, where each
    /// handler stands in the stored events of each type it subscribes to
    /// (`plugin_cursors`); a pair seen for the first time (a plugin
    /// installed, or subscribing to a new type) starts at the beginning.
    fn cursors(&self) -> rusqlite::Result<()> {
        if self.cursors.borrow().is_some() {
            return Ok(());
        }
        let loaded = Cursors::load(&self.statements, self.registry)?;
        *self.cursors.borrow_mut() = Some(loaded);
        Ok(())
    }

    fn is_behind(&self, handler: &LoadedHandler, event_type: &str) -> bool {
        self.cursors
            .borrow()
            .as_ref()
            .is_some_and(|c| c.is_behind(&handler.name, event_type))
    }

    fn dead_letter(
        &self,
        report: &mut Report,
        source: &Source,
        reason: &str,
        envelope: &Envelope,
    ) -> rusqlite::Result<()> {
        report.dead_letters += 1;
        if report.dead_letters <= LOGGED_DEAD_LETTERS {
            tracing::warn!(handler = %source.handler, plugin = source.plugin.as_deref().unwrap_or("-"), "dead letter: {reason}");
        }
        record_dead_letter(self.conn, source, reason, envelope)
    }
}

/// The events a call created, then the envelopes it returned: its
/// subscribers see an event before any envelope about it. A failed call's
/// created events are dropped with it, so they never existed.
pub fn with_created(created: Vec<Envelope>, produced: RVec<Envelope>) -> RVec<Envelope> {
    if created.is_empty() {
        return produced;
    }
    created.into_iter().chain(produced).collect()
}

/// `envelope`, which a plugin returned (from `process` or `run_job`),
/// without the fields only the host sets: the verified `author` of a
/// stored event and the verified `sender_peer_id` of a frame. No plugin
/// can hand another a forged author or sender.
pub fn from_plugin(mut envelope: Envelope) -> Envelope {
    envelope.remove(field::SENDER_PEER_ID);
    unvouched(envelope)
}

/// `envelope` without the fields only the host's event store may set
/// (`author`: the verified signer), as every envelope entering a run or
/// returned by a handler is: no plugin, job or peer can hand a handler an
/// author that no signature vouches for.
fn unvouched(mut envelope: Envelope) -> Envelope {
    envelope.remove(field::AUTHOR);
    envelope
}

/// Writes one row to `dead_letters`.
pub fn record_dead_letter(
    conn: &Connection,
    source: &Source,
    reason: &str,
    envelope: &Envelope,
) -> rusqlite::Result<()> {
    // A reason can quote what a peer sent (an event type, a handler's
    // error about a field): cut like the envelope.
    let reason = cut(reason.to_owned(), MAX_REASON_BYTES);
    conn.execute(
        "INSERT INTO dead_letters(at_ms, plugin, handler, reason, envelope) VALUES (?1, ?2, ?3, ?4, ?5)",
        rusqlite::params![db::now_ms(), source.plugin, source.handler, reason, dead_letter_text(envelope)],
    )?;
    Ok(())
}

/// The most of an envelope a dead letter keeps, so that large or hostile
/// envelopes cannot fill the disk through the dead-letter table.
const MAX_DEAD_LETTER_BYTES: usize = 16 * 1024;
/// The most of a reason a dead letter keeps.
const MAX_REASON_BYTES: usize = 1024;

/// `text` cut to at most `max` bytes (on a character boundary), saying how
/// long it was.
fn cut(mut text: String, max: usize) -> String {
    if text.len() > max {
        let total = text.len();
        let mut at = max;
        while !text.is_char_boundary(at) {
            at -= 1;
        }
        text.truncate(at);
        text.push_str(&format!("… (cut: {total} bytes in all)"));
    }
    text
}

/// An envelope as people read it in `dead_letters`: JSON, without transit
/// secrets, cut to [`MAX_DEAD_LETTER_BYTES`].
fn dead_letter_text(envelope: &Envelope) -> String {
    let mut json = envelope_to_json(envelope);
    if let Some(map) = json.as_object_mut() {
        map.remove("transit_secret");
        if let Some(plaintext) = map
            .get_mut(field::EVENT_PLAINTEXT)
            .and_then(|p| p.as_object_mut())
        {
            plaintext.remove("transit_secret");
        }
    }
    cut(json.to_string(), MAX_DEAD_LETTER_BYTES)
}

#[cfg(test)]
pub(crate) mod tests {
    use std::path::Path;

    use quiet_plugin_api::{
        __private::{make_handlers, module, HandlersResult, RStr},
        bail, envelope, into_abi, params, Context, Handler, PluginError, Value,
    };

    use super::*;
    use crate::plugins::loader;

    /// Notes each `note`'s `n`, refusing (after a write that must be rolled
    /// back) those in `refused`; each note it keeps begets a `noted`.
    struct Notes;

    impl Handler for Notes {
        fn name(&self) -> &str {
            "notes"
        }
        fn event_types(&self) -> &[&str] {
            &["note"]
        }
        fn process(
            &self,
            env: &Envelope,
            ctx: &mut Context<'_>,
        ) -> Result<Vec<Envelope>, PluginError> {
            let n = env
                .plaintext()
                .and_then(|p| p.get("n"))
                .and_then(Value::as_int)
                .unwrap_or(-1);
            ctx.execute("INSERT INTO notes (n, kept) VALUES (?1, 0)", params![n])?;
            if n % 4 == 3 {
                bail!("refusing note {n}");
            }
            ctx.execute("UPDATE notes SET kept = 1 WHERE n = ?1", params![n])?;
            Ok(vec![envelope! { "event_type" => "noted", "n" => n }])
        }
    }

    /// Counts the `noted`s.
    struct Noted;

    impl Handler for Noted {
        fn name(&self) -> &str {
            "noted"
        }
        fn event_types(&self) -> &[&str] {
            &["noted"]
        }
        fn process(
            &self,
            env: &Envelope,
            ctx: &mut Context<'_>,
        ) -> Result<Vec<Envelope>, PluginError> {
            ctx.execute("INSERT INTO noted (n) VALUES (?1)", params![env.int("n")])?;
            Ok(vec![])
        }
    }

    fn notes_module() -> quiet_plugin_api::PluginModRef {
        static MIGRATIONS: &[RStr<'static>] = &[RStr::from_str(
            "CREATE TABLE notes (n INTEGER NOT NULL, kept INTEGER NOT NULL);
             CREATE TABLE noted (n INTEGER NOT NULL);",
        )];
        extern "C" fn handlers() -> HandlersResult {
            make_handlers(|| vec![into_abi(Notes), into_abi(Noted)])
        }
        module("notes", "1", MIGRATIONS, handlers)
    }

    /// Runs `count` notes, arrived together as a sync response's events
    /// arrive, through a host with an event store and the notes plugin.
    /// Returns the report and the database.
    fn deliver_notes(count: i64) -> (Report, Connection) {
        let notes = NotesHost::new();
        let report = notes.run((0..count).map(|n| notes.note(n)).collect());
        (report, notes.conn)
    }

    /// A host with an event store and the notes plugin.
    pub(crate) struct NotesHost {
        _dir: tempfile::TempDir,
        me: crate::crypto::identity::HostIdentity,
        net: String,
        pub(crate) conn: Connection,
        pub(crate) registry: Registry,
        pub(crate) services: Services,
    }

    impl NotesHost {
        pub(crate) fn new() -> Self {
            let net = "ab".repeat(16);
            let (dir, store) = EventStore::with_one_network(&net);
            let me = crate::crypto::identity::HostIdentity::load_or_create(dir.path()).unwrap();
            let plugin =
                loader::from_module(notes_module(), Path::new("<test>"), 1, String::new()).unwrap();
            let conn = db::open_in_memory().unwrap();
            db::apply_plugin_migrations(&conn, &plugin.name, &plugin.migrations).unwrap();
            let services = Services {
                identity: me.public(),
                outbox: Box::new(crate::engine::pipeline::NoTransport),
                store: Some(store),
                config: Default::default(),
            };
            let registry = Registry::new(1, vec![plugin.into()]);
            NotesHost {
                _dir: dir,
                me,
                net,
                conn,
                registry,
                services,
            }
        }

        /// A `store_event` of note `n`.
        pub(crate) fn note(&self, n: i64) -> Envelope {
            let note = Value::map([("n", Value::from(n))]);
            let store = self.services.store.as_ref().unwrap();
            store
                .new_local_event(self.me.signing(), &self.net, "note", &note, &[])
                .unwrap()
                .1
        }

        /// `events`, as if they had arrived from the network.
        pub(crate) fn run(&self, events: Vec<Envelope>) -> Report {
            let source = Source {
                plugin: None,
                handler: "network".into(),
            };
            self.services
                .write_tx(&self.conn, |conn| {
                    Pipeline::new(conn, &self.registry, &self.services).run(events, source)
                })
                .unwrap()
        }
    }

    pub(crate) fn column(conn: &Connection, sql: &str) -> Vec<i64> {
        let mut stmt = conn.prepare(sql).unwrap();
        let rows = stmt.query_map([], |r| r.get(0)).unwrap();
        rows.map(Result::unwrap).collect()
    }

    #[test]
    fn events_that_arrive_together_are_handled_under_one_savepoint() {
        let (report, conn) = deliver_notes(3);
        assert_eq!(
            report,
            Report {
                processed: 6,
                sent: 0,
                dead_letters: 0
            }
        );
        assert_eq!(
            column(&conn, "SELECT n FROM notes WHERE kept = 1 ORDER BY n"),
            [0, 1, 2]
        );
        assert_eq!(column(&conn, "SELECT n FROM noted ORDER BY n"), [0, 1, 2]);
    }

    #[test]
    fn a_dead_letters_reason_and_envelope_are_cut_to_their_bounds() {
        let conn = db::open_in_memory().unwrap();
        let source = Source {
            plugin: Some("p".into()),
            handler: "h".into(),
        };
        let huge = "é".repeat(1 << 20);
        let envelope = Envelope::of_type("x").with("blob", huge.as_str());
        record_dead_letter(&conn, &source, &format!("bad field '{huge}'"), &envelope).unwrap();
        let (reason, text): (String, String) = conn
            .query_row("SELECT reason, envelope FROM dead_letters", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        assert!(reason.len() < MAX_REASON_BYTES + 64, "{}", reason.len());
        assert!(
            reason.ends_with("(cut: 2097164 bytes in all)"),
            "{}",
            &reason[1000..]
        );
        assert!(text.len() < MAX_DEAD_LETTER_BYTES + 64, "{}", text.len());
    }

    #[test]
    fn a_failed_call_in_a_batch_rolls_back_that_call_alone() {
        let (report, conn) = deliver_notes(10);
        // Notes 3 and 7 were refused: each a dead letter, its write undone.
        assert_eq!(
            column(&conn, "SELECT n FROM notes ORDER BY n"),
            [0, 1, 2, 4, 5, 6, 8, 9]
        );
        assert_eq!(
            column(&conn, "SELECT COUNT(*) FROM notes WHERE kept = 0"),
            [0]
        );
        let dead: Vec<String> = conn
            .prepare("SELECT handler || ': ' || reason FROM dead_letters ORDER BY id")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(dead.len(), 2, "{dead:?}");
        assert!(
            dead[0].starts_with("notes: ") && dead[0].contains("refusing note 3"),
            "{dead:?}"
        );
        assert!(dead[1].contains("refusing note 7"), "{dead:?}");
        // What the abandoned shared pass produced was dropped with it: one
        // `noted` per kept note, and the report counts each call once.
        assert_eq!(
            column(&conn, "SELECT n FROM noted ORDER BY n"),
            [0, 1, 2, 4, 5, 6, 8, 9]
        );
        assert_eq!(
            report,
            Report {
                processed: 16,
                sent: 0,
                dead_letters: 2
            }
        );
        // Every event is stored, refused by its handler or not.
        assert_eq!(column(&conn, "SELECT COUNT(*) FROM events"), [10]);
    }
}
