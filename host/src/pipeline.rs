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
//! Nothing is dropped silently. A handler that fails or panics has its
//! savepoint rolled back and the envelope goes to `dead_letters` with the
//! handler and the reason; so does an envelope no handler subscribes to, one
//! the outbox refuses, and one past the hop limit (naming the handler that
//! keeps producing them). The caller owns the transaction around all of it.

use std::collections::VecDeque;

use quiet_plugin_api::{field, Envelope, Identity};
use rusqlite::Connection;

use crate::{
    context::HostContext,
    db,
    event_store::{EventStore, Opened, STORE_EVENT},
    handler::CallError,
    json::envelope_to_json,
    registry::Registry,
    watchdog,
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
    source: Source,
    /// A `store_event` already opened by [`EventStore::open_all`].
    opened: Option<Result<Opened, &'static str>>,
}

impl Queued {
    fn new(envelope: Envelope, hops: u32, source: Source) -> Self {
        Self {
            envelope,
            hops,
            source,
            opened: None,
        }
    }

    fn is_unopened_event(&self) -> bool {
        self.opened.is_none() && self.envelope.event_type() == Some(STORE_EVENT)
    }
}

/// The most `store_event` envelopes opened together; see
/// [`Pipeline::open_ahead`].
const OPEN_AHEAD: usize = 1024;

/// What a pipeline run uses besides the database and the handlers.
pub struct Services {
    /// This host's public identity, lent to handlers.
    pub identity: Identity,
    /// Where outgoing envelopes go.
    pub outbox: Box<dyn Outbox + Send>,
    /// The event store for `store_event` envelopes, on a host that keeps
    /// events.
    pub store: Option<EventStore>,
}

/// One pipeline run over a borrowed connection and registry generation.
pub struct Pipeline<'a> {
    conn: &'a Connection,
    registry: &'a Registry,
    services: &'a Services,
    hop_limit: u32,
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
        watchdog::check_not_abandoned()?;
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
            registry,
            services,
            hop_limit: DEFAULT_HOP_LIMIT,
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
        let mut queue: VecDeque<Queued> = envelopes
            .into_iter()
            .map(|envelope| Queued::new(envelope, 0, source.clone()))
            .collect();
        let mut report = Report::default();
        let mut steps = 0;
        while let Some(mut item) = queue.pop_front() {
            if item.is_unopened_event() {
                self.open_ahead(&mut item, &mut queue);
            }
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
            self.step(item, &mut queue, &mut report)?;
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

    /// Opens `item`, a `store_event`, together with the `store_event`s that
    /// follow it in the queue (a sync response yields a thousand at once),
    /// so that their decryption runs in parallel; storing them stays in
    /// queue order.
    fn open_ahead(&self, item: &mut Queued, queue: &mut VecDeque<Queued>) {
        let Some(store) = &self.services.store else {
            return;
        };
        let mut run: Vec<&mut Queued> = std::iter::once(item)
            .chain(
                queue
                    .iter_mut()
                    .take_while(|q| q.is_unopened_event())
                    .take(OPEN_AHEAD - 1),
            )
            .collect();
        let envelopes: Vec<&Envelope> = run.iter().map(|q| &q.envelope).collect();
        let opened = store.open_all(&envelopes);
        for (q, o) in run.iter_mut().zip(opened) {
            q.opened = Some(o);
        }
    }

    fn step(
        &self,
        item: Queued,
        queue: &mut VecDeque<Queued>,
        report: &mut Report,
    ) -> rusqlite::Result<()> {
        let Queued {
            mut envelope,
            hops,
            source,
            opened,
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
            let stored = match opened {
                Some(opened) => store.store_opened(self.conn, opened)?,
                None => store.store(self.conn, &envelope)?,
            };
            match stored {
                Some(decrypted) => envelope = decrypted,
                // A duplicate or a refused event, counted by the store.
                None => return Ok(()),
            }
        }
        if envelope.is_outgoing() {
            let kept = envelope.clone();
            return match self.services.outbox.send(envelope) {
                Ok(()) => {
                    report.sent += 1;
                    Ok(())
                }
                Err(reason) => self.dead_letter(report, &source, &reason, &kept),
            };
        }
        let event_type = envelope.event_type().unwrap_or("");
        let subscribers = self.registry.subscribers(event_type);
        if subscribers.is_empty() {
            let reason = format!("no loaded handler subscribes to event_type '{event_type}'");
            return self.dead_letter(report, &source, &reason, &envelope);
        }
        for handler in subscribers {
            let here = Source {
                plugin: Some(handler.plugin.to_string()),
                handler: handler.name.clone(),
            };
            match handler.filter(&envelope) {
                Ok(true) => {}
                Ok(false) => continue,
                Err(CallError::Sql(e)) => return Err(e),
                Err(CallError::Handler(e)) => {
                    self.dead_letter(report, &here, &format!("filter failed: {e}"), &envelope)?;
                    continue;
                }
            }
            let mut ctx = HostContext::new(self.conn, &handler.plugin, &self.services.identity);
            let outcome = db::with_savepoint(self.conn, || handler.process(&envelope, &mut ctx));
            match outcome {
                Ok(produced) => {
                    report.processed += 1;
                    if !produced.is_empty() && hops + 1 > self.hop_limit {
                        let reason = format!(
                            "hop limit {} reached: handler '{}' (plugin '{}') keeps producing envelopes",
                            self.hop_limit, handler.name, handler.plugin
                        );
                        for env in &produced {
                            self.dead_letter(report, &here, &reason, env)?;
                        }
                        continue;
                    }
                    queue.extend(
                        produced
                            .into_iter()
                            .map(|envelope| Queued::new(envelope, hops + 1, here.clone())),
                    );
                }
                Err(CallError::Sql(e)) => return Err(e),
                Err(CallError::Handler(e)) => {
                    self.dead_letter(report, &here, &e, &envelope)?;
                }
            }
        }
        Ok(())
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

/// Writes one row to `dead_letters`.
pub fn record_dead_letter(
    conn: &Connection,
    source: &Source,
    reason: &str,
    envelope: &Envelope,
) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO dead_letters(at_ms, plugin, handler, reason, envelope) VALUES (?1, ?2, ?3, ?4, ?5)",
        rusqlite::params![db::now_ms(), source.plugin, source.handler, reason, dead_letter_text(envelope)],
    )?;
    Ok(())
}

/// The most of an envelope a dead letter keeps, so that large or hostile
/// envelopes cannot fill the disk through the dead-letter table.
const MAX_DEAD_LETTER_BYTES: usize = 16 * 1024;

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
    let mut text = json.to_string();
    if text.len() > MAX_DEAD_LETTER_BYTES {
        let total = text.len();
        let mut cut = MAX_DEAD_LETTER_BYTES;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push_str(&format!("… (cut: {total} bytes in all)"));
    }
    text
}
