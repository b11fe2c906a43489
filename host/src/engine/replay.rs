//! Replay for late plugins: every handler is offered every stored event of
//! the types it subscribes to, in the order they were routed, whenever it
//! was installed.
//!
//! The host keeps, per handler and subscribed type, how far along the
//! routed events it has been offered (`plugin_cursors.offered`, a
//! `events.routed` number). A pair first seen (a plugin installed, or a
//! new build subscribing to a new type) starts at 0; a removed plugin's
//! pairs stay where they were, so that when it is put back it resumes.
//!
//! - **Live:** a run hands a new stored event only to the handlers that
//!   are caught up with its type (their cursor at the head when the run
//!   began), and moves those cursors to the new head when it ends, in the
//!   same transaction ([`Cursors`]).
//! - **Behind:** the replayer, an engine unit taking turns with frames and
//!   jobs ([`turn`]), offers a handler the next [`REPLAY_BATCH`] stored
//!   events after its cursor, then moves the cursor; at the head, the
//!   handler is caught up. One thread does both, so there is no gap and no
//!   event offered twice, except after `quiet-host plugins replay NAME`,
//!   which resets a plugin's projection (its handlers' `reset`) and its
//!   cursors to 0. Projections must therefore be idempotent.
//!
//! A stored event that no caught-up handler takes is not a dead letter: it
//! waits in the store for the plugin that wants it.
//!
//! Events stored before signatures (`legacy_events`) are not replayed:
//! their authors are only claimed, and the plugins projected them when
//! they came.

use std::collections::{HashMap, HashSet};

use quiet_plugin_api::ANY_EVENT_TYPE;
use rusqlite::Connection;

use crate::{
    engine::pipeline::{Pipeline, Services},
    plugins::{handler::LoadedHandler, registry::Registry},
    storage::statements::Statements,
};

/// Stored events the replayer offers one handler in one turn.
pub const REPLAY_BATCH: usize = 1_000;

/// Where the loaded handlers stand, as a run began; see the module docs.
pub struct Cursors {
    /// The last routed number when the run began.
    head: i64,
    /// The pairs at the head: offered this run's events, moved on at its end.
    caught_up: Vec<(String, String)>,
    /// The pairs behind, which the replayer serves.
    behind: HashSet<(String, String)>,
}

impl Cursors {
    /// Reads the cursors of `registry`'s handlers, adding those first seen.
    pub fn load(statements: &Statements<'_>, registry: &Registry) -> rusqlite::Result<Self> {
        let conn = statements.conn();
        let head = head(conn)?;
        let known: HashMap<(String, String), i64> = conn
            .prepare_cached("SELECT handler, event_type, offered FROM plugin_cursors")?
            .query_map([], |r| Ok(((r.get(0)?, r.get(1)?), r.get(2)?)))?
            .collect::<Result<_, _>>()?;
        let mut cursors = Cursors {
            head,
            caught_up: Vec::new(),
            behind: HashSet::new(),
        };
        for (handler, event_type) in pairs(registry) {
            let key = (handler.name.clone(), event_type.to_owned());
            let offered = match known.get(&key) {
                Some(&offered) => offered,
                None => {
                    conn.prepare_cached(
                        "INSERT INTO plugin_cursors (handler, event_type, plugin, offered)
                         VALUES (?1, ?2, ?3, 0)",
                    )?
                    .execute((&key.0, &key.1, &*handler.plugin))?;
                    0
                }
            };
            match offered >= head {
                true => cursors.caught_up.push(key),
                false => {
                    cursors.behind.insert(key);
                }
            }
        }
        Ok(cursors)
    }

    /// Whether `handler` is behind in the stored events of `event_type`.
    pub fn is_behind(&self, handler: &str, event_type: &str) -> bool {
        !self.behind.is_empty()
            && [event_type, ANY_EVENT_TYPE]
                .iter()
                .any(|t| self.behind.contains(&(handler.to_owned(), (*t).to_owned())))
    }

    /// Moves the caught-up pairs to the head the run ends at: they were
    /// offered every event routed in it.
    pub fn advance(&self, statements: &Statements<'_>) -> rusqlite::Result<()> {
        let conn = statements.conn();
        let now = head(conn)?;
        if now == self.head {
            return Ok(());
        }
        let mut update = conn.prepare_cached(
            "UPDATE plugin_cursors SET offered = ?1
             WHERE handler = ?2 AND event_type = ?3 AND offered = ?4",
        )?;
        for (handler, event_type) in &self.caught_up {
            update.execute((now, handler, event_type, self.head))?;
        }
        Ok(())
    }
}

/// The last routed number.
fn head(conn: &Connection) -> rusqlite::Result<i64> {
    conn.prepare_cached("SELECT COALESCE(MAX(routed), 0) FROM events")?
        .query_row([], |r| r.get(0))
}

/// Each loaded handler with each type it subscribes to.
fn pairs(registry: &Registry) -> impl Iterator<Item = (&LoadedHandler, &str)> {
    registry.plugins.iter().flat_map(|p| {
        p.handlers
            .iter()
            .flat_map(|h| h.event_types.iter().map(move |t| (&**h, t.as_str())))
    })
}

/// One turn of the replayer, in one transaction: first the replays that
/// `quiet-host plugins replay` asked for (of loaded plugins), then the next
/// [`REPLAY_BATCH`] events for the loaded handler furthest behind. Returns
/// whether it did anything, for the engine to come straight back. With
/// nothing to do it only reads, and takes no write lock.
pub fn turn(conn: &Connection, registry: &Registry, services: &Services) -> rusqlite::Result<bool> {
    let Some(store) = &services.store else {
        return Ok(false);
    };
    if requested(conn, registry)?.is_empty() && furthest_behind(conn, registry)?.is_none() {
        return Ok(false);
    }
    services.write_tx(conn, |conn| {
        for plugin in requested(conn, registry)? {
            reset(conn, registry, services, &plugin)?;
        }
        let Some((name, event_type, offered, head)) = furthest_behind(conn, registry)? else {
            return Ok(true);
        };
        let handler = registry.handler(&name).expect("a loaded pair's handler");
        let rows: Vec<(i64, String, Vec<u8>)> = conn
            .prepare_cached(
                "SELECT routed, network_id, event FROM events
                 WHERE routed > ?1 AND routed <= ?2 AND (?3 = '*' OR event_type = ?3)
                 ORDER BY routed LIMIT ?4",
            )?
            .query_map((offered, head, &event_type, REPLAY_BATCH as i64), |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })?
            .collect::<Result<_, _>>()?;
        let reached = match rows.len() < REPLAY_BATCH {
            true => head,
            false => rows.last().map_or(head, |r| r.0),
        };
        let events: Vec<_> = rows
            .into_iter()
            .filter_map(|(_, network_id, event)| store.reopen(&network_id, event))
            .collect();
        let replayed = events.len() as i64;
        Pipeline::new(conn, registry, services)
            .replay(handler, events)
            .map(drop)?;
        conn.prepare_cached(
            "UPDATE plugin_cursors SET offered = ?1 WHERE handler = ?2 AND event_type = ?3",
        )?
        .execute((reached, &name, &event_type))?;
        crate::storage::counters::add(conn, "events_replayed", replayed)?;
        Ok(true)
    })
}

/// The loaded (handler, type) furthest behind the head: its cursor, and
/// the head.
fn furthest_behind(
    conn: &Connection,
    registry: &Registry,
) -> rusqlite::Result<Option<(String, String, i64, i64)>> {
    let head = head(conn)?;
    let behind: Vec<(String, String, i64)> = conn
        .prepare_cached(
            "SELECT handler, event_type, offered FROM plugin_cursors
             WHERE offered < ?1 ORDER BY offered, handler, event_type",
        )?
        .query_map([head], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<Result<_, _>>()?;
    if behind.is_empty() {
        return Ok(None);
    }
    let loaded: HashSet<(&str, &str)> =
        pairs(registry).map(|(h, t)| (h.name.as_str(), t)).collect();
    Ok(behind
        .into_iter()
        .find(|(h, t, _)| loaded.contains(&(h.as_str(), t.as_str())))
        .map(|(h, t, offered)| (h, t, offered, head)))
}

/// The loaded plugins `quiet-host plugins replay` asked to replay; the
/// others' requests wait until they are loaded.
fn requested(conn: &Connection, registry: &Registry) -> rusqlite::Result<Vec<String>> {
    let asked: Vec<String> = conn
        .prepare_cached("SELECT plugin FROM replay_requests ORDER BY requested_ms")?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    Ok(asked
        .into_iter()
        .filter(|p| registry.plugins.iter().any(|l| *l.name == **p))
        .collect())
}

/// Resets `plugin`'s handlers' projections (`reset`) and its cursors, so
/// that the replayer offers it every stored event again.
fn reset(
    conn: &Connection,
    registry: &Registry,
    services: &Services,
    plugin: &str,
) -> rusqlite::Result<()> {
    let loaded = registry.plugins.iter().filter(|p| *p.name == *plugin);
    for handler in loaded.flat_map(|p| p.handlers.iter()) {
        Pipeline::new(conn, registry, services).reset(handler)?;
    }
    conn.prepare_cached("UPDATE plugin_cursors SET offered = 0 WHERE plugin = ?1")?
        .execute([plugin])?;
    conn.prepare_cached("DELETE FROM replay_requests WHERE plugin = ?1")?
        .execute([plugin])?;
    tracing::info!(plugin, "replaying every stored event to it, as asked");
    Ok(())
}
