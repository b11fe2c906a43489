//! The guard on plugin SQL. Plugins run SQL on the transaction the host
//! opened for their call, in the host's own database. Refused:
//!
//! - statements that would end, fork or escape that transaction (`BEGIN`,
//!   `COMMIT`, `ATTACH`, …), or change how the database is stored (pragmas
//!   that set something);
//! - writes to the host's own tables, [`HOST_TABLES`]: "the host verifies
//!   an event before it stores it" means nothing while a plugin can
//!   `INSERT INTO events`, and the same goes for forged submissions, deleted
//!   dead letters, rewritten counters or membership. So are the schema
//!   changes that would get round that: dropping, altering or indexing those
//!   tables, triggers on them, and tables or views named like them (in the
//!   `temp` schema one would shadow the host's table for the host's own
//!   statements).
//!
//! Reading the host's tables is allowed.
//!
//! Two checks: [`prepare`] judges a statement's text first, for a clear
//! message on the common mistakes, and SQLite's authorizer, which
//! [`crate::storage::db`] installs on every connection it opens, is the real
//! guard (comments, odd spacing, triggers). It judges while plugin SQL is
//! prepared or run ([`as_plugin`]: SQLite re-prepares a statement inside a
//! step when the schema changed) and while a plugin's migrations run
//! ([`execute_migration`]). The host's own statements are judged by one rule
//! only: no trigger may write the host's tables. The host makes no
//! triggers, so every trigger is a plugin's, and one on a table the host
//! also writes (`addresses`) runs inside the host's statement.
//!
//! The authorizer runs when a statement is compiled, never per row; the
//! host's statements pay one thread-local read per action compiled.

use std::cell::{Cell, RefCell};

use rusqlite::{
    fallible_iterator::FallibleIterator,
    hooks::{AuthAction, AuthContext, Authorization},
    Batch, CachedStatement, Connection,
};

/// The host's own tables: plugins may read them, never write them, nor
/// drop, alter, index or put triggers on them, nor make a table or view of
/// the same name. Add each new host table here, in the commit whose
/// migration (`storage::db`) creates it.
///
/// Not listed: `addresses`, which the host seeds when it joins a network
/// and the sync plugin keeps (it is that plugin's table of peers).
pub const HOST_TABLES: &[&str] = &[
    // What the event store verified and stored; plugins store events by
    // returning `store_event` envelopes.
    "events",
    // Envelopes CLI commands queued for the pipeline.
    "submissions",
    // What the pipeline could not deliver; plugins prune them through
    // `Context::prune_dead_letters`.
    "dead_letters",
    // Drops and traffic; plugins count under their own names through
    // `Context::count`.
    "counters",
    // Membership.
    "networks",
    "job_runs",
    "job_config",
    "plugins",
    "plugin_migrations",
    "host_state",
    // Planned by docs/design/signed-events.md (§5-7), reserved now so that
    // no plugin makes one first.
    "legacy_events",
    "event_waits",
    "event_ready",
    "plugin_cursors",
    "replay_requests",
    // Membership as folded from its signed events (storage/members.rs):
    // a plugin that could write it would decide who is a member.
    "membership",
    "membership_roles",
    "membership_dirty",
];

/// Whether `table` is one of [`HOST_TABLES`]; SQLite's names are
/// ASCII-case-insensitive.
pub fn is_host_table(table: &str) -> bool {
    HOST_TABLES.iter().any(|t| t.eq_ignore_ascii_case(table))
}

/// Statement kinds a plugin may not run: they would end, fork or escape the
/// transaction the host opened for the call.
const FORBIDDEN: &[&str] = &[
    "BEGIN",
    "COMMIT",
    "END",
    "ROLLBACK",
    "SAVEPOINT",
    "RELEASE",
    "ATTACH",
    "DETACH",
    "VACUUM",
];

/// Pragmas that take an argument yet only read.
const READ_PRAGMAS: &[&str] = &[
    "table_info",
    "table_xinfo",
    "index_list",
    "index_info",
    "index_xinfo",
    "foreign_key_list",
];

/// Put in front of a plugin statement's text, so that it has an entry of
/// its own in rusqlite's statement cache: a statement the host compiled
/// from the same text was never judged, and one compiled for a plugin
/// must not serve the host.
const PLUGIN_KEY: &str = "/* plugin */ ";

thread_local! {
    /// Set while plugin SQL is prepared or run on this thread.
    static PLUGIN_SQL: Cell<bool> = const { Cell::new(false) };
    /// Why the authorizer last refused plugin SQL, for the error message.
    static REFUSAL: RefCell<Option<String>> = const { RefCell::new(None) };
    /// Set when plugin SQL alters a table: SQLite does not tell the
    /// authorizer a rename's new name, so the text is checked.
    static ALTERS: Cell<bool> = const { Cell::new(false) };
}

/// Installs the guard on plugin SQL; [`crate::storage::db`] does it on every
/// connection it opens. It is installed once for good: setting an authorizer
/// expires every prepared statement of the connection, and doing that around
/// each plugin call cost a re-prepare of each statement used (12 % of a
/// catch-up).
pub fn install_authorizer(conn: &Connection) {
    conn.authorizer(Some(|ctx: AuthContext<'_>| {
        let plugin = PLUGIN_SQL.get();
        // The host's own statements, outside triggers: the common case.
        if !plugin && ctx.accessor.is_none() {
            return Authorization::Allow;
        }
        match refusal(&ctx, plugin) {
            None => Authorization::Allow,
            Some(why) if plugin => {
                REFUSAL.set(Some(why));
                Authorization::Deny
            }
            Some(why) => {
                // A plugin's trigger inside a host statement: the host's
                // statement fails, and the log says why.
                tracing::warn!("refused a host statement: {why}");
                Authorization::Deny
            }
        }
    }));
}

/// Why the action in `ctx` is refused, if it is: in plugin SQL (`plugin`)
/// or, for the trigger rule, anywhere.
fn refusal(ctx: &AuthContext<'_>, plugin: bool) -> Option<String> {
    use AuthAction::*;
    let host = |t: &str| is_host_table(t);
    if let (
        Some(trigger),
        Insert { table_name } | Update { table_name, .. } | Delete { table_name },
    ) = (ctx.accessor, &ctx.action)
    {
        if host(table_name) {
            return Some(format!(
                "trigger `{trigger}` may not write the host's table `{table_name}`"
            ));
        }
    }
    if !plugin {
        return None;
    }
    match ctx.action {
        Transaction { .. } | Savepoint { .. } => {
            Some("plugin SQL may not end or fork the host's transaction".into())
        }
        Attach { .. } | Detach { .. } => {
            Some("plugin SQL may not attach or detach databases".into())
        }
        // Reading pragmas is fine; setting them is not. These few take an
        // argument only to say what to read.
        Pragma {
            pragma_name,
            pragma_value: Some(_),
        } if !READ_PRAGMAS
            .iter()
            .any(|p| p.eq_ignore_ascii_case(pragma_name)) =>
        {
            Some(format!("plugin SQL may not set pragma `{pragma_name}`"))
        }
        Insert { table_name } | Update { table_name, .. } | Delete { table_name }
            if host(table_name) =>
        {
            Some(format!(
                "plugin SQL may not write the host's table `{table_name}`"
            ))
        }
        DropTable { table_name }
        | DropTempTable { table_name }
        | DropView {
            view_name: table_name,
        }
        | DropTempView {
            view_name: table_name,
        }
        | DropVtable { table_name, .. }
        | AlterTable { table_name, .. }
            if host(table_name) =>
        {
            Some(format!(
                "plugin SQL may not drop or alter the host's table `{table_name}`"
            ))
        }
        CreateIndex { table_name, .. }
        | CreateTempIndex { table_name, .. }
        | DropIndex { table_name, .. }
        | DropTempIndex { table_name, .. }
            if host(table_name) =>
        {
            Some(format!(
                "plugin SQL may not create or drop indexes on the host's table `{table_name}`"
            ))
        }
        CreateTrigger { table_name, .. }
        | CreateTempTrigger { table_name, .. }
        | DropTrigger { table_name, .. }
        | DropTempTrigger { table_name, .. }
            if host(table_name) =>
        {
            Some(format!(
                "plugin SQL may not put triggers on the host's table `{table_name}`"
            ))
        }
        CreateTable { table_name }
        | CreateTempTable { table_name }
        | CreateView {
            view_name: table_name,
        }
        | CreateTempView {
            view_name: table_name,
        }
        | CreateVtable { table_name, .. }
            if host(table_name) =>
        {
            Some(format!(
                "plugin SQL may not create a table or view named like the host's table `{table_name}`"
            ))
        }
        // A temp table renamed to a host table's name would shadow it.
        AlterTable {
            database_name,
            table_name,
        } if database_name.eq_ignore_ascii_case("temp") => Some(format!(
            "plugin SQL may not alter the temp table `{table_name}`"
        )),
        AlterTable { .. } => {
            ALTERS.set(true);
            None
        }
        _ => None,
    }
}

/// Restores the plugin-SQL flag when a scope of [`as_plugin`] ends, even by
/// a panic.
struct Scope(bool);

impl Drop for Scope {
    fn drop(&mut self) {
        PLUGIN_SQL.set(self.0);
    }
}

/// Runs `f`, which prepares or runs plugin SQL, under the guard; an error
/// the guard caused says what it refused. Nests.
pub fn as_plugin<T>(f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    let outer = PLUGIN_SQL.replace(true);
    let _scope = Scope(outer);
    if !outer {
        REFUSAL.take();
        ALTERS.set(false);
    }
    f().map_err(|e| REFUSAL.take().unwrap_or(e))
}

/// The host table that `sql`, an `ALTER TABLE`, names after `RENAME`, if
/// any: a table renamed to it would take its name. SQLite identifiers are
/// spelled out in the text (quoted or not) and compared ignoring ASCII
/// case, so a word scan finds them; a column renamed to such a name is
/// refused too.
fn renamed_to_host_table(sql: &str) -> Option<&'static str> {
    let mut words = sql
        .split(|c: char| !(c.is_alphanumeric() || c == '_' || c == '$'))
        .filter(|w| !w.is_empty());
    words.find(|w| w.eq_ignore_ascii_case("RENAME"))?;
    words.find_map(|w| {
        HOST_TABLES
            .iter()
            .find(|t| t.eq_ignore_ascii_case(w))
            .copied()
    })
}

/// The error for an `ALTER TABLE … RENAME` onto `table`.
fn rename_refusal(table: &str) -> String {
    format!("plugin SQL may not rename anything to the host's table name `{table}`")
}

/// Refuses plugin SQL whose first word would end or fork the host's
/// transaction, or that rolls it back from inside a statement; the clear
/// messages for common mistakes, in front of the authorizer.
fn judge(sql: &str) -> Result<(), String> {
    let first = sql
        .trim_start()
        .split(|c: char| !c.is_ascii_alphabetic())
        .next()
        .unwrap_or("");
    if FORBIDDEN.iter().any(|k| k.eq_ignore_ascii_case(first)) {
        return Err(format!(
            "{} statements are not allowed: the host owns the transaction",
            first.to_ascii_uppercase()
        ));
    }
    // `INSERT OR ROLLBACK …` and triggers with `RAISE(ROLLBACK, …)` end
    // the transaction from inside a statement; the authorizer cannot see
    // them.
    let rollback = sql
        .as_bytes()
        .windows(8)
        .any(|w| w.eq_ignore_ascii_case(b"ROLLBACK"));
    if rollback {
        return Err("ROLLBACK is not allowed in any form: the host owns the transaction".into());
    }
    Ok(())
}

/// Prepares (through rusqlite's statement cache, under a key of its own:
/// see `PLUGIN_KEY`) the plugin statement `sql` on `conn`, or says why it
/// is refused. A cached statement that SQLite re-prepares later (after a
/// schema change) is judged again if that happens under [`as_plugin`], as
/// plugin calls run.
pub fn prepare<'c>(conn: &'c Connection, sql: &str) -> Result<CachedStatement<'c>, String> {
    judge(sql)?;
    let key = format!("{PLUGIN_KEY}{sql}");
    as_plugin(|| {
        let stmt = conn.prepare_cached(&key).map_err(|e| e.to_string())?;
        // Only a fresh compile sets `ALTERS`; a refused statement is
        // discarded, so that it is compiled, and judged, again next time.
        if ALTERS.take() {
            if let Some(table) = renamed_to_host_table(sql) {
                stmt.discard();
                return Err(rename_refusal(table));
            }
        }
        Ok(stmt)
    })
}

/// Runs `sql`, one migration of a plugin (one or more statements), under
/// the same guard as its calls: it runs inside the host's transaction too,
/// and a trigger it made would outlive it.
pub fn execute_migration(conn: &Connection, sql: &str) -> Result<(), String> {
    judge(sql)?;
    as_plugin(|| {
        let mut batch = Batch::new(conn, sql);
        while let Some(mut stmt) = batch.next().map_err(|e| e.to_string())? {
            if ALTERS.take() {
                let text = stmt.expanded_sql().unwrap_or_default();
                if let Some(table) = renamed_to_host_table(&text) {
                    return Err(rename_refusal(table));
                }
            }
            // One step, as `execute_batch` does: some pragmas return rows.
            stmt.raw_query().next().map_err(|e| e.to_string())?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection with the guard, a few of the host's tables (one
    /// event, an index), the shared `addresses` and a plugin's table.
    fn conn() -> Connection {
        let conn = Connection::open_in_memory().unwrap();
        install_authorizer(&conn);
        conn.execute_batch(
            "CREATE TABLE events (event_id BLOB PRIMARY KEY, v INTEGER);
             CREATE INDEX events_v ON events(v);
             CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
             CREATE TABLE addresses (peer_id TEXT PRIMARY KEY);
             CREATE TABLE p_items (x);
             INSERT INTO events VALUES (x'01', 1);",
        )
        .unwrap();
        conn
    }

    /// Runs `sql` as a plugin's statement.
    fn plugin(conn: &Connection, sql: &str) -> Result<usize, String> {
        as_plugin(|| prepare(conn, sql)?.execute([]).map_err(|e| e.to_string()))
    }

    /// The events as `(id, v)`, and the schema, read by the host.
    fn state(conn: &Connection) -> (Vec<(Vec<u8>, i64)>, Vec<String>) {
        let events = conn
            .prepare("SELECT event_id, v FROM main.events ORDER BY event_id")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let schema = conn
            .prepare(
                "SELECT type || ' ' || name FROM sqlite_schema
                 UNION ALL SELECT 'temp ' || type || ' ' || name FROM sqlite_temp_schema
                 ORDER BY 1",
            )
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        (events, schema)
    }

    #[test]
    fn plugin_sql_may_not_write_or_reshape_the_hosts_tables() {
        let conn = conn();
        let before = state(&conn);
        let write = "plugin SQL may not write the host's table `events`";
        let reshape = "plugin SQL may not drop or alter the host's table `events`";
        let index = "plugin SQL may not create or drop indexes on the host's table `events`";
        let trigger = "plugin SQL may not put triggers on the host's table `events`";
        let named = "plugin SQL may not create a table or view named like the host's table";
        for (sql, why) in [
            ("INSERT INTO events VALUES (x'02', 2)", write),
            ("insert into MAIN.Events values (x'02', 2)", write),
            ("UPDATE events SET v = 2", write),
            ("DELETE FROM events", write),
            ("REPLACE INTO events VALUES (x'01', 2)", write),
            ("INSERT OR REPLACE INTO events VALUES (x'01', 2)", write),
            (
                "INSERT INTO events VALUES (x'01', 2) ON CONFLICT (event_id) DO UPDATE SET v = 9",
                write,
            ),
            ("WITH old AS (SELECT 1) DELETE FROM events", write),
            (
                "WITH doomed AS (SELECT event_id FROM events) \
                 DELETE FROM events WHERE event_id IN doomed",
                write,
            ),
            ("/* hi */ DELETE FROM events", write),
            ("DROP TABLE events", reshape),
            ("DROP TABLE IF EXISTS main.events", reshape),
            ("ALTER TABLE events RENAME TO mine", reshape),
            ("ALTER TABLE events ADD COLUMN forged INTEGER", reshape),
            ("CREATE INDEX p_idx ON events(v)", index),
            ("CREATE UNIQUE INDEX p_idx ON events(v)", index),
            ("DROP INDEX events_v", index),
            (
                "CREATE TRIGGER p_t AFTER INSERT ON events BEGIN SELECT 1; END",
                trigger,
            ),
            (
                "CREATE TEMP TRIGGER p_t BEFORE DELETE ON main.events BEGIN SELECT 1; END",
                trigger,
            ),
            ("CREATE TEMP TABLE events (x)", named),
            ("CREATE TEMP VIEW events AS SELECT 1", named),
            ("CREATE TABLE IF NOT EXISTS legacy_events (x)", named),
            ("CREATE VIEW Counters AS SELECT 1", named),
            (
                "ALTER TABLE p_items RENAME TO legacy_events",
                "plugin SQL may not rename anything to the host's table name `legacy_events`",
            ),
            (
                "ALTER TABLE p_items RENAME TO \"EVENT_READY\"",
                "plugin SQL may not rename anything to the host's table name `event_ready`",
            ),
            (
                "INSERT INTO counters VALUES ('drop_bad_seal', 0)",
                "plugin SQL may not write the host's table `counters`",
            ),
        ] {
            let err = plugin(&conn, sql).expect_err(sql);
            assert!(err.contains(why), "{sql}: {err}");
            assert!(!err.contains('\n'), "{err}");
        }
        assert_eq!(state(&conn), before);
        // A refused rename is compiled and judged again, not served from
        // rusqlite's cache.
        let err = plugin(&conn, "ALTER TABLE p_items RENAME TO legacy_events").unwrap_err();
        assert!(err.contains("legacy_events"), "{err}");
        // The host's own statements are not judged.
        conn.execute("UPDATE events SET v = 2", []).unwrap();
        conn.execute("INSERT INTO counters VALUES ('drop_bad_seal', 1)", [])
            .unwrap();
    }

    #[test]
    fn plugin_tables_and_reads_of_the_hosts_tables_still_work() {
        let conn = conn();
        for sql in [
            "CREATE TABLE p_log (n INTEGER)",
            "CREATE INDEX p_log_n ON p_log(n)",
            "INSERT INTO p_log SELECT v FROM events",
            "INSERT INTO p_log VALUES (1) ON CONFLICT DO NOTHING",
            "REPLACE INTO p_log VALUES (3)",
            "UPDATE p_log SET n = n + 1",
            "WITH e AS (SELECT v FROM events) DELETE FROM p_log WHERE n IN e",
            "ALTER TABLE p_log ADD COLUMN at_ms INTEGER",
            "CREATE TRIGGER p_log_t AFTER INSERT ON p_items BEGIN INSERT INTO p_log (n) VALUES (new.x); END",
            "INSERT INTO p_items VALUES (7)",
            "CREATE TEMP TABLE p_ids AS SELECT event_id FROM events",
            "DROP TABLE temp.p_ids",
            "CREATE VIEW p_events AS SELECT event_id FROM events",
            "INSERT INTO addresses VALUES ('peer')",
            "DELETE FROM addresses",
            "ALTER TABLE p_log RENAME TO p_log2",
            "DROP TABLE p_log2",
        ] {
            plugin(&conn, sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
        }
        let n: i64 = as_plugin(|| {
            prepare(
                &conn,
                "SELECT COUNT(*) FROM events JOIN p_events USING (event_id)",
            )?
            .query_row([], |r| r.get(0))
            .map_err(|e| e.to_string())
        })
        .unwrap();
        assert_eq!(n, 1);
    }

    #[test]
    fn no_trigger_may_write_the_hosts_tables_whoever_fires_it() {
        let conn = conn();
        let before = state(&conn).0;
        // SQLite shows the authorizer a trigger's body only when a
        // statement that fires it is compiled, naming the trigger.
        plugin(
            &conn,
            "CREATE TRIGGER p_forge AFTER INSERT ON p_items \
             BEGIN INSERT INTO events VALUES (randomblob(8), 0); END",
        )
        .unwrap();
        let err = plugin(&conn, "INSERT INTO p_items VALUES (1)").unwrap_err();
        assert_eq!(
            err,
            "trigger `p_forge` may not write the host's table `events`"
        );
        // On a table the host writes too, it would fire inside the host's
        // statement: refused there as well.
        plugin(
            &conn,
            "CREATE TEMP TRIGGER p_wipe AFTER INSERT ON main.addresses \
             BEGIN DELETE FROM events; END",
        )
        .unwrap();
        let err = conn
            .execute("INSERT INTO addresses VALUES ('peer')", [])
            .unwrap_err();
        assert!(err.to_string().contains("not authorized"), "{err}");
        assert_eq!(state(&conn).0, before);
    }

    #[test]
    fn a_statement_re_prepared_after_a_schema_change_is_judged_again() {
        let conn = conn();
        let insert = "INSERT INTO p_items VALUES (1)";
        plugin(&conn, insert).unwrap();
        plugin(
            &conn,
            "CREATE TRIGGER p_forge AFTER INSERT ON p_items \
             BEGIN UPDATE events SET v = 99; END",
        )
        .unwrap();
        // Served from rusqlite's cache; SQLite re-prepares it in its step.
        let err = plugin(&conn, insert).unwrap_err();
        assert!(err.contains("`p_forge` may not write"), "{err}");
        let v: i64 = conn
            .query_row("SELECT v FROM events", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, 1);
    }

    #[test]
    fn the_text_of_a_host_statement_sent_by_a_plugin_is_judged() {
        let conn = conn();
        // The host's statement, left compiled in rusqlite's cache.
        let host_insert = "INSERT OR IGNORE INTO events VALUES (?1, ?2)";
        conn.prepare_cached(host_insert)
            .unwrap()
            .execute((vec![2u8], 2))
            .unwrap();
        let err = as_plugin(|| prepare(&conn, host_insert).map(drop)).unwrap_err();
        assert_eq!(err, "plugin SQL may not write the host's table `events`");
        // And the host's still serves the host.
        conn.prepare_cached(host_insert)
            .unwrap()
            .execute((vec![3u8], 3))
            .unwrap();
        assert_eq!(state(&conn).0.len(), 3);
    }

    #[test]
    fn a_temp_table_would_shadow_a_host_table_so_none_may_take_its_name() {
        // Why: unqualified names find `temp` first, the host's included.
        let bare = Connection::open_in_memory().unwrap();
        bare.execute_batch(
            "CREATE TABLE events (v); CREATE TEMP TABLE events (v);
             INSERT INTO events VALUES (1);",
        )
        .unwrap();
        let main: i64 = bare
            .query_row("SELECT COUNT(*) FROM main.events", [], |r| r.get(0))
            .unwrap();
        assert_eq!(main, 0);

        let conn = conn();
        let before = state(&conn);
        plugin(&conn, "CREATE TEMP TABLE p_tmp (x)").unwrap();
        for (sql, why) in [
            (
                "CREATE TEMP TABLE events (x)",
                "named like the host's table `events`",
            ),
            (
                "ALTER TABLE temp.p_tmp RENAME TO events",
                "may not alter the temp table `p_tmp`",
            ),
            (
                "ALTER TABLE temp.p_tmp RENAME TO p_other",
                "may not alter the temp table `p_tmp`",
            ),
        ] {
            let err = plugin(&conn, sql).expect_err(sql);
            assert!(err.contains(why), "{sql}: {err}");
        }
        plugin(&conn, "DROP TABLE temp.p_tmp").unwrap();
        assert_eq!(state(&conn), before);
    }

    #[test]
    fn migrations_are_guarded_too() {
        let conn = conn();
        let before = state(&conn).0;
        // The messages plugin's kind of migration: reads the host's table.
        execute_migration(
            &conn,
            "CREATE TEMP TABLE p_map AS SELECT event_id FROM events;
             CREATE INDEX temp.p_map_id ON p_map (event_id);
             ALTER TABLE p_items ADD COLUMN y;
             DROP TABLE temp.p_map;",
        )
        .unwrap();
        for (sql, why) in [
            (
                "CREATE TABLE p_new (x); INSERT INTO events VALUES (x'09', 9);",
                "plugin SQL may not write the host's table `events`",
            ),
            (
                "CREATE TRIGGER p_t AFTER INSERT ON addresses BEGIN DELETE FROM counters; END;
                 INSERT INTO addresses VALUES ('x');",
                "trigger `p_t` may not write the host's table `counters`",
            ),
            (
                "CREATE TABLE p_new (x); ALTER TABLE p_new RENAME TO plugin_cursors;",
                "rename anything to the host's table name `plugin_cursors`",
            ),
            (
                "PRAGMA foreign_keys = OFF",
                "plugin SQL may not set pragma `foreign_keys`",
            ),
        ] {
            // The host runs a migration in its transaction, and rolls back
            // a failed one.
            conn.execute_batch("SAVEPOINT m").unwrap();
            let err = execute_migration(&conn, sql).expect_err(sql);
            assert!(err.contains(why), "{sql}: {err}");
            conn.execute_batch("ROLLBACK TO m; RELEASE m").unwrap();
        }
        assert_eq!(state(&conn).0, before);
    }
}
