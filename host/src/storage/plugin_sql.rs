//! The guard on plugin SQL: plugins run SQL on the transaction the host
//! opened for their call, so statements that would end, fork or escape it
//! (`BEGIN`, `COMMIT`, `ATTACH`, …), or change how the database is stored,
//! are refused.
//!
//! Two checks: [`prepare`] judges a statement's text first, for a clear
//! message on the common mistakes, and SQLite's authorizer, which
//! [`crate::storage::db`] installs on every connection it opens, is the real
//! guard (comments, odd spacing). The authorizer judges only while a plugin's
//! statement compiles, so the host's own statements are unaffected.

use std::cell::Cell;

use rusqlite::{
    hooks::{AuthAction, AuthContext, Authorization},
    CachedStatement, Connection,
};

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
    /// Set while a plugin's statement compiles on this thread.
    static COMPILING_PLUGIN_SQL: Cell<bool> = const { Cell::new(false) };
}

/// Installs the guard on plugin SQL; [`crate::storage::db`] does it on every
/// connection it opens. It is installed once for good: setting an authorizer
/// expires every prepared statement of the connection, and doing that around
/// each plugin call cost a re-prepare of each statement used (12 % of a
/// catch-up).
pub fn install_authorizer(conn: &Connection) {
    conn.authorizer(Some(|ctx: AuthContext<'_>| {
        if COMPILING_PLUGIN_SQL.get() {
            plugin_authorizer(ctx)
        } else {
            Authorization::Allow
        }
    }));
}

/// Denies plugin statements that would end, fork or escape the host's
/// transaction, or change how the database is stored.
fn plugin_authorizer(ctx: AuthContext<'_>) -> Authorization {
    match ctx.action {
        AuthAction::Transaction { .. }
        | AuthAction::Savepoint { .. }
        | AuthAction::Attach { .. }
        | AuthAction::Detach { .. } => Authorization::Deny,
        // Reading pragmas is fine; setting them is not. These few take an
        // argument only to say what to read.
        AuthAction::Pragma {
            pragma_name,
            pragma_value: Some(_),
        } if !READ_PRAGMAS
            .iter()
            .any(|p| p.eq_ignore_ascii_case(pragma_name)) =>
        {
            Authorization::Deny
        }
        _ => Authorization::Allow,
    }
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
/// schema change) is the same text, already judged.
pub fn prepare<'c>(conn: &'c Connection, sql: &str) -> Result<CachedStatement<'c>, String> {
    judge(sql)?;
    let key = format!("{PLUGIN_KEY}{sql}");
    COMPILING_PLUGIN_SQL.set(true);
    let stmt = conn.prepare_cached(&key);
    COMPILING_PLUGIN_SQL.set(false);
    stmt.map_err(|e| e.to_string())
}
