//! Statements a pipeline run prepares once and reuses for every envelope.
//!
//! A catch-up's receiver runs two statements per event: the event store's
//! insert and the projection's. rusqlite's `prepare_cached` hashes the SQL
//! and moves the statement out of its LRU and back (resetting it and
//! clearing its bindings) on every use: about 3,000 instructions a use,
//! 4 % of the receiver's work. A run holds the statements it used instead,
//! found by comparing their text, and hands them back to rusqlite's cache
//! when it ends.
//!
//! A run holds the host's statements and the plugins' apart: a plugin
//! sending the text of a host statement (the event store's insert) must get
//! a statement compiled, and judged, for it (see
//! [`crate::storage::plugin_sql`]), not the host's.
//!
//! A held statement is always reset by the time it is held again: rusqlite
//! resets a statement after `execute` and when a query's rows are dropped.
//! Its bindings are not cleared, and need not be: rusqlite binds every
//! parameter of a statement on each use, or fails.

use std::{
    cell::RefCell,
    ops::{Deref, DerefMut},
};

use rusqlite::{CachedStatement, Connection};

/// The most statements a run holds; past that the oldest goes back to
/// rusqlite's cache. Runs use a handful.
const HELD: usize = 16;

/// One held statement: its text, whether a plugin sent it, the statement.
type Entry<'c> = (Box<str>, bool, CachedStatement<'c>);

/// The statements of one run over `conn`; see the [module docs](self).
pub struct Statements<'c> {
    conn: &'c Connection,
    held: RefCell<Vec<Entry<'c>>>,
}

impl<'c> Statements<'c> {
    /// An empty set over `conn`.
    pub fn new(conn: &'c Connection) -> Self {
        Self {
            conn,
            held: RefCell::new(Vec::new()),
        }
    }

    /// The connection the statements are of.
    pub fn conn(&self) -> &'c Connection {
        self.conn
    }

    /// The host's statement for `sql`: the one this run used before, or else
    /// what `prepare` makes of it.
    pub fn get<E>(
        &self,
        sql: &str,
        prepare: impl FnOnce(&'c Connection, &str) -> Result<CachedStatement<'c>, E>,
    ) -> Result<Held<'_, 'c>, E> {
        self.take(false, sql, prepare)
    }

    /// A plugin's statement for `sql`: the one this run prepared for a
    /// plugin before, or else what `prepare` makes of it (only then is
    /// `prepare` called, so checks in it run once per run and text). Never
    /// one of the host's.
    pub fn get_for_plugin<E>(
        &self,
        sql: &str,
        prepare: impl FnOnce(&'c Connection, &str) -> Result<CachedStatement<'c>, E>,
    ) -> Result<Held<'_, 'c>, E> {
        self.take(true, sql, prepare)
    }

    fn take<E>(
        &self,
        plugin: bool,
        sql: &str,
        prepare: impl FnOnce(&'c Connection, &str) -> Result<CachedStatement<'c>, E>,
    ) -> Result<Held<'_, 'c>, E> {
        let found = {
            let mut held = self.held.borrow_mut();
            let at = held
                .iter()
                .rposition(|(text, by_plugin, _)| *by_plugin == plugin && **text == *sql);
            at.map(|i| held.remove(i))
        };
        let entry = match found {
            Some(entry) => entry,
            None => (sql.into(), plugin, prepare(self.conn, sql)?),
        };
        Ok(Held {
            home: self,
            entry: Some(entry),
        })
    }
}

/// A statement taken from [`Statements`]; it goes back when dropped.
pub struct Held<'s, 'c> {
    home: &'s Statements<'c>,
    entry: Option<Entry<'c>>,
}

impl<'c> Deref for Held<'_, 'c> {
    type Target = CachedStatement<'c>;

    fn deref(&self) -> &Self::Target {
        &self.entry.as_ref().expect("held until dropped").2
    }
}

impl DerefMut for Held<'_, '_> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.entry.as_mut().expect("held until dropped").2
    }
}

impl Drop for Held<'_, '_> {
    fn drop(&mut self) {
        let Some(entry) = self.entry.take() else {
            return;
        };
        let mut held = self.home.held.borrow_mut();
        if held.len() == HELD {
            // Back to rusqlite's cache.
            held.remove(0);
        }
        held.push(entry);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_statement_is_prepared_once_per_run_and_reused() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch("CREATE TABLE t(a INTEGER)").unwrap();
        let statements = Statements::new(&conn);
        let prepared = std::cell::Cell::new(0);
        let insert = |a: i64| {
            let mut stmt = statements
                .get("INSERT INTO t VALUES (?1)", |conn, sql| {
                    prepared.set(prepared.get() + 1);
                    conn.prepare_cached(sql)
                })
                .unwrap();
            stmt.execute([a]).unwrap();
        };
        for a in 0..5 {
            insert(a);
        }
        assert_eq!(prepared.get(), 1);
        // A query's statement is reset once its rows are dropped, and a
        // held one binds afresh.
        for a in [1, 3] {
            let mut stmt = statements
                .get("SELECT COUNT(*) FROM t WHERE a >= ?1", |conn, sql| {
                    conn.prepare_cached(sql)
                })
                .unwrap();
            let n: i64 = stmt.query_row([a], |r| r.get(0)).unwrap();
            assert_eq!(n, 5 - a);
        }
        // A refused statement is not held, and is judged again next time.
        for _ in 0..2 {
            let refused = statements.get("SELECT nope FROM t", |_, _| {
                Err::<CachedStatement<'_>, _>("refused")
            });
            assert!(matches!(refused, Err("refused")));
        }
        assert_eq!(statements.held.borrow().len(), 2);
    }

    #[test]
    fn host_and_plugin_statements_of_one_text_are_held_apart() {
        let conn = Connection::open_in_memory().unwrap();
        let statements = Statements::new(&conn);
        let (host, plugin) = (std::cell::Cell::new(0), std::cell::Cell::new(0));
        for _ in 0..2 {
            let held = statements.get("SELECT 1", |conn, sql| {
                host.set(host.get() + 1);
                conn.prepare_cached(sql)
            });
            drop(held.unwrap());
            let held = statements.get_for_plugin("SELECT 1", |conn, sql| {
                plugin.set(plugin.get() + 1);
                conn.prepare_cached(sql)
            });
            drop(held.unwrap());
        }
        assert_eq!((host.get(), plugin.get()), (1, 1));
    }

    #[test]
    fn past_the_limit_the_oldest_goes_back() {
        let conn = Connection::open_in_memory().unwrap();
        let statements = Statements::new(&conn);
        for i in 0..HELD + 3 {
            let sql = format!("SELECT {i}");
            let mut stmt = statements
                .get(&sql, |conn, sql| conn.prepare_cached(sql))
                .unwrap();
            let got: usize = stmt.query_row([], |r| r.get(0)).unwrap();
            assert_eq!(got, i);
        }
        let held = statements.held.borrow();
        assert_eq!(held.len(), HELD);
        assert_eq!(&*held[0].0, "SELECT 3");
    }
}
