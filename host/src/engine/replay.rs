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
//!   same transaction ([`crate::engine::cursors`]).
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

use std::collections::HashSet;

use rusqlite::Connection;

use crate::{
    engine::{
        cursors::{head, pairs},
        pipeline::{Pipeline, Services},
    },
    plugins::registry::Registry,
};

/// Stored events the replayer offers one handler in one turn.
pub const REPLAY_BATCH: usize = 1_000;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::pipeline::tests::{column, NotesHost};

    #[test]
    fn a_handler_behind_gets_no_live_event_and_the_replayer_brings_it_up_in_order() {
        let notes = NotesHost::new();
        notes.run((0..3).map(|n| notes.note(n)).collect());
        assert_eq!(
            column(&notes.conn, "SELECT n FROM notes ORDER BY rowid"),
            [0, 1, 2]
        );
        // As if the plugin had been away since the first note.
        notes
            .conn
            .execute(
                "UPDATE plugin_cursors SET offered = 1 WHERE handler = 'notes'",
                [],
            )
            .unwrap();
        notes.run(vec![notes.note(4), notes.note(5)]);
        assert_eq!(
            column(&notes.conn, "SELECT n FROM notes ORDER BY rowid"),
            [0, 1, 2],
            "offered live before older events it has not seen"
        );
        while turn(&notes.conn, &notes.registry, &notes.services).unwrap() {}
        // The events after its cursor, in the order they were routed.
        assert_eq!(
            column(&notes.conn, "SELECT n FROM notes ORDER BY rowid"),
            [0, 1, 2, 1, 2, 4, 5]
        );
        let offered = column(
            &notes.conn,
            "SELECT offered FROM plugin_cursors WHERE handler = 'notes'",
        );
        assert_eq!(offered, [5], "caught up");
        // Caught up, it gets the next one live.
        notes.run(vec![notes.note(6)]);
        assert_eq!(column(&notes.conn, "SELECT MAX(rowid) FROM notes"), [8]);
    }
}
