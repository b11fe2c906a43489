//! Where each handler stands in the stored events: per handler and type it
//! subscribes to, how far along the routed events it has been offered
//! (`plugin_cursors`). The pipeline reads them once per run that routes a
//! stored event, offers new events only to the handlers caught up, and
//! moves those on at the run's end; [`crate::engine::replay`] serves the
//! ones behind, and explains the whole.

use std::collections::{HashMap, HashSet};

use quiet_plugin_api::ANY_EVENT_TYPE;
use rusqlite::Connection;

use crate::{
    plugins::{handler::LoadedHandler, registry::Registry},
    storage::statements::Statements,
};

/// Where the loaded handlers stand, as a run began.
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
pub(crate) fn head(conn: &Connection) -> rusqlite::Result<i64> {
    conn.prepare_cached("SELECT COALESCE(MAX(routed), 0) FROM events")?
        .query_row([], |r| r.get(0))
}

/// Each loaded handler with each type it subscribes to.
pub(crate) fn pairs(registry: &Registry) -> impl Iterator<Item = (&LoadedHandler, &str)> {
    registry.plugins.iter().flat_map(|p| {
        p.handlers
            .iter()
            .flat_map(|h| h.event_types.iter().map(move |t| (&**h, t.as_str())))
    })
}
